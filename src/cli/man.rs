//! The man pages `procagent man` prints or writes: procagent(1) and its subcommands' pages
//! from the CLI's clap definition, procagentd(8) from the daemon's (with the hand-written
//! sections of man/procagentd.8.in), and agent.toml(5) (man/agent.toml.5, hand-written).

use std::path::Path;

use clap::CommandFactory;

use super::{Cli, CliError, exit, out, outln};

/// The pages that are not the CLI's own, by the name `procagent man NAME` takes.
pub const OTHER_PAGES: [&str; 2] = ["procagentd", "agent.toml"];

/// procagentd(8)'s hand-written sections (OPERATION, EXIT STATUS, SIGNALS, ENVIRONMENT,
/// FILES, SEE ALSO).
const PROCAGENTD_SECTIONS: &str = include_str!("../../man/procagentd.8.in");

/// agent.toml(5); `@VERSION@` in its title line is this build's version.
const AGENT_TOML: &str = include_str!("../../man/agent.toml.5");

/// agent.toml(5), as installed.
pub fn agent_toml_page() -> String {
    AGENT_TOML.replace("@VERSION@", env!("CARGO_PKG_VERSION"))
}

/// procagentd(8): the generated title, NAME, SYNOPSIS, DESCRIPTION and OPTIONS, then the
/// hand-written sections, then the generated VERSION.
pub fn procagentd_page() -> std::io::Result<String> {
    let cmd = crate::daemon_cli::Args::command();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd).section("8").render(&mut buf)?;
    let page = String::from_utf8_lossy(&buf).into_owned();
    let at = page.find("\n.SH VERSION").map_or(page.len(), |i| i + 1);
    let (head, tail) = page.split_at(at);
    let head = if head.ends_with('\n') {
        head.to_string()
    } else {
        format!("{head}\n")
    };
    Ok(format!("{head}{PROCAGENTD_SECTIONS}{tail}"))
}

/// `procagent man [NAME] [--dir DIR]`.
pub fn man(name: Option<&str>, dir: Option<&Path>) -> Result<u8, CliError> {
    let fail = |e: std::io::Error| CliError::new(exit::FAILED, e.to_string());
    if let Some(dir) = dir {
        clap_mangen::generate_to(Cli::command(), dir).map_err(fail)?;
        outln(&format!("man pages written to {}", dir.display()));
        return Ok(exit::OK);
    }
    match name {
        Some("procagentd") => {
            out(&procagentd_page().map_err(fail)?);
            return Ok(exit::OK);
        }
        Some("agent.toml") => {
            out(&agent_toml_page());
            return Ok(exit::OK);
        }
        _ => {}
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let page = match name {
        None => cmd,
        Some(name) => cmd.find_subcommand(name).cloned().ok_or_else(|| {
            CliError::new(
                exit::USAGE,
                format!(
                    "no subcommand or page {name:?} (pages: a subcommand, {})",
                    OTHER_PAGES.join(", ")
                ),
            )
        })?,
    };
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf).map_err(fail)?;
    out(&String::from_utf8_lossy(&buf));
    Ok(exit::OK)
}
