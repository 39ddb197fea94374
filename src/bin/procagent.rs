//! `procagent`: the operator CLI.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

fn main() -> ExitCode {
    // `COMPLETE=SHELL procagent -- WORDS`: a completion request from a shell script that
    // `procagent completions SHELL` printed; answered and exited here.
    clap_complete::CompleteEnv::with_factory(procagent::cli::Cli::command).complete();
    let cli = procagent::cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("procagent: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    ExitCode::from(rt.block_on(procagent::cli::run(cli)))
}
