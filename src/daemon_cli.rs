//! procagentd's command line: the clap definition the daemon parses and procagentd(8) is
//! generated from (`procagent man procagentd`).

use std::path::PathBuf;

use clap::Parser;

/// The config file procagentd reads when `--config` is not given (the path the systemd unit
/// passes, and the conffile the Debian package installs).
pub const DEFAULT_CONFIG: &str = "/etc/procagent/agent.toml";

/// procagentd: supervise processes and serve GSE's process APIs on a unix socket.
#[derive(Debug, Parser)]
#[command(name = "procagentd", version, about)]
pub struct Args {
    /// The agent config (TOML).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    pub check: bool,
    /// Run as the output keeper of this output directory (started by the agent itself).
    #[arg(long, hide = true, value_name = "DIR")]
    pub output_keeper: Option<PathBuf>,
}
