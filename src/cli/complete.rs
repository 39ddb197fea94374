//! Shell completion. The scripts `procagent completions SHELL` prints register the shell to
//! call back into `procagent` on every TAB (clap_complete's dynamic completion: `COMPLETE=SHELL
//! procagent -- WORDS`), which completes subcommands, flags and values from the clap
//! definitions, and registered process names from the agent: [`process_names`] asks it with
//! a deadline of [`DEADLINE`], so a TAB never hangs when the agent is down or busy (nothing
//! is offered then). The socket is `$PROCAGENT_SOCKET`, else the default one (as the CLI
//! picks it without `--socket` or `--config`).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use clap_complete::engine::CompletionCandidate;

use crate::api::client::Client;
use crate::proto::{ProcDetail, ProcList, ProcsQuery};

/// The longest a TAB waits for the agent's list of processes.
pub const DEADLINE: Duration = Duration::from_millis(800);

/// Registered process names (`NAMESPACE/NAME`) that start with what is typed.
pub fn process_names(current: &OsStr) -> Vec<CompletionCandidate> {
    let typed = current.to_string_lossy();
    let mut names = fetch_names().unwrap_or_default();
    names.retain(|n| n.starts_with(typed.as_ref()));
    names.sort();
    names.into_iter().map(CompletionCandidate::new).collect()
}

/// The agent's socket for completion: `$PROCAGENT_SOCKET`, else the defaults.
fn socket() -> Option<PathBuf> {
    if let Some(s) = std::env::var_os("PROCAGENT_SOCKET").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(s));
    }
    let (main, root) = super::configured_sockets(None).ok()?;
    Some(if super::prefer_root_socket(&root) {
        root
    } else {
        main
    })
}

/// Every registered process, or `None` when the agent did not answer within [`DEADLINE`].
fn fetch_names() -> Option<Vec<String>> {
    let client = Client::new(socket()?).with_timeout(DEADLINE);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let q = ProcsQuery {
        brief: true,
        ..ProcsQuery::default()
    };
    let list = rt.block_on(async {
        tokio::time::timeout(
            DEADLINE,
            client.call_typed::<_, ProcList<ProcDetail>>("procs", &q),
        )
        .await
        .ok()?
        .ok()
    })?;
    Some(
        list.list
            .into_iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect(),
    )
}

/// The script that registers `shell`'s completion of `procagent` (calling back into the
/// `procagent` found on `PATH`).
pub fn registration(shell: clap_complete::Shell) -> std::io::Result<String> {
    use clap_complete::env::{Bash, Elvish, EnvCompleter, Fish, Powershell, Zsh};
    let completer: &dyn EnvCompleter = match shell {
        clap_complete::Shell::Bash => &Bash,
        clap_complete::Shell::Zsh => &Zsh,
        clap_complete::Shell::Fish => &Fish,
        clap_complete::Shell::Elvish => &Elvish,
        clap_complete::Shell::PowerShell => &Powershell,
        _ => &Bash,
    };
    let mut buf = Vec::new();
    completer.write_registration("COMPLETE", "procagent", "procagent", "procagent", &mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
