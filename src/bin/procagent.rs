//! `procagent`: the operator CLI.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
