//! Attaching to processes (with identity checks) and signalling them safely.
//!
//! Attach = open a pidfd, *then* re-read `/proc/PID/stat` and check the identity the caller
//! expects: the pidfd pins the process, so a match after the open proves the fd refers to the
//! process we mean (no pid-reuse race). Signals go through pidfds only, so a recycled pid is
//! never hit.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::signal::Signal;

use crate::procinfo::{self, ProcStat};
use crate::sys::{self, ExitInfo};

/// What the caller expects of the process behind a pid.
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// Started by our start command: start time at or after `min_ticks`, named like
    /// `proc_name`.
    Fresh { min_ticks: u64, proc_name: &'a str },
    /// A process we recorded: exact start time, same boot.
    Known { starttime: u64, boot_id: &'a str },
    /// Named in the pid file of a registered process: named like `proc_name`.
    Named { proc_name: &'a str },
    /// Our own just-spawned child (a foreground start): any name.
    Child,
}

/// Why a pid was not attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("process {0} is not running")]
    Gone(i32),
    #[error("pid {pid} now belongs to another process ({reason})")]
    Mismatch { pid: i32, reason: String },
    #[error("pid {0} cannot be managed (init or the agent itself)")]
    Forbidden(i32),
    #[error("cannot open a pidfd for {pid}: {reason}")]
    Pidfd { pid: i32, reason: String },
}

/// An attached process.
#[derive(Debug)]
pub struct Attached {
    pub pid: i32,
    pub stat: ProcStat,
    /// `None` in poll mode.
    pub fd: Option<OwnedFd>,
}

/// Attach to `pid` if it is the process `expect` describes.
pub fn attach(pid: i32, expect: Expect<'_>, want_pidfd: bool) -> Result<Attached, AttachError> {
    if pid <= 1 || pid == std::process::id() as i32 {
        return Err(AttachError::Forbidden(pid));
    }
    let fd = if want_pidfd {
        match sys::pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(AttachError::Gone(pid)),
            Err(e) => {
                return Err(AttachError::Pidfd {
                    pid,
                    reason: e.to_string(),
                });
            }
        }
    } else {
        None
    };
    let stat = procinfo::read_stat(pid).ok_or(AttachError::Gone(pid))?;
    if stat.is_exited() {
        return Err(AttachError::Gone(pid));
    }
    let mismatch = |reason: String| AttachError::Mismatch { pid, reason };
    match expect {
        Expect::Fresh {
            min_ticks,
            proc_name,
        } => {
            if stat.starttime < min_ticks {
                return Err(mismatch(format!(
                    "it started before the start command ({} < {} ticks): a stale pid file",
                    stat.starttime, min_ticks
                )));
            }
            if !procinfo::matches_proc_name(pid, &stat.comm, proc_name) {
                return Err(mismatch(format!(
                    "it is {:?}, not {proc_name:?}",
                    stat.comm
                )));
            }
        }
        Expect::Known { starttime, boot_id } => {
            if !boot_id.is_empty() && boot_id != procinfo::boot_id() {
                return Err(mismatch("the host rebooted since it was recorded".into()));
            }
            if stat.starttime != starttime {
                return Err(mismatch(format!(
                    "start time {} differs from the recorded {}",
                    stat.starttime, starttime
                )));
            }
        }
        Expect::Named { proc_name } => {
            if !procinfo::matches_proc_name(pid, &stat.comm, proc_name) {
                return Err(mismatch(format!(
                    "it is {:?}, not {proc_name:?}",
                    stat.comm
                )));
            }
        }
        Expect::Child => {}
    }
    Ok(Attached { pid, stat, fd })
}

/// Is the recorded process still alive (same start time, not a zombie)?
pub fn alive(pid: i32, starttime: u64) -> bool {
    procinfo::read_stat(pid).is_some_and(|s| s.starttime == starttime && !s.is_exited())
}

/// How an exited process ended: reap it if it is our child, else ask the reaper (which may
/// have collected it), else the kernel's pidfd exit info (6.15+), else unknown.
pub fn collect_exit(pid: i32, fd: Option<&OwnedFd>, reaper: &crate::reaper::Reaper) -> ExitInfo {
    if let Some(fd) = fd
        && let Ok(Some(exit)) = sys::pidfd_try_reap(fd.as_fd())
    {
        return exit;
    }
    if let Some(exit) = reaper.recent_exit(pid) {
        return exit;
    }
    if let Some(fd) = fd
        && let Some(exit) = sys::pidfd_exit_info(fd.as_fd())
    {
        return exit;
    }
    ExitInfo::Unknown
}

/// Send `sig` to `pid` through a pidfd, but only if it still is the process we mean:
/// start time `starttime` (when given) and process group `pgrp` (when given).
/// Returns true when the signal was delivered.
pub fn signal_checked(
    pid: i32,
    held: Option<&Arc<OwnedFd>>,
    starttime: Option<u64>,
    pgrp: Option<i32>,
    sig: Signal,
) -> bool {
    if pid <= 1 || pid == std::process::id() as i32 {
        return false;
    }
    let opened;
    let fd: &OwnedFd = match held {
        Some(f) => f.as_ref(),
        None => match sys::pidfd_open(pid) {
            Ok(f) => {
                opened = f;
                &opened
            }
            Err(_) => return false,
        },
    };
    // Verify after the fd pins the process.
    if held.is_none() || pgrp.is_some() {
        let Some(st) = procinfo::read_stat(pid) else {
            return false;
        };
        if starttime.is_some_and(|t| t != st.starttime)
            || pgrp.is_some_and(|g| g != st.pgrp)
            || st.is_exited()
        {
            return false;
        }
    }
    sys::pidfd_signal(fd.as_fd(), sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_refuses_init_and_self() {
        assert_eq!(
            attach(1, Expect::Child, true).unwrap_err(),
            AttachError::Forbidden(1)
        );
        let me = std::process::id() as i32;
        assert_eq!(
            attach(me, Expect::Child, true).unwrap_err(),
            AttachError::Forbidden(me)
        );
    }

    #[test]
    fn attach_to_a_gone_pid() {
        // pid_max + something cannot exist.
        let pid = (procinfo::pid_max() as i32).saturating_sub(1);
        if procinfo::read_stat(pid).is_none() {
            assert!(matches!(
                attach(pid, Expect::Child, true),
                Err(AttachError::Gone(_))
            ));
        }
    }
}
