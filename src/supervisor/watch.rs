//! Attaching to processes (under the ownership rule) and signalling them safely.
//!
//! Attach = open a pidfd, *then* read the process's facts and apply the ownership rule
//! ([`super::ownership::check`]): the pidfd pins the process, so facts read after the open are
//! those of the process the fd refers to (no pid-reuse race). Signals go through pidfds only,
//! so a recycled pid is never hit. Everything here reads `/proc` and blocks: callers run it
//! on the [`crate::fspool`] pool, never on an async worker.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::signal::Signal;

use super::ownership::{self, Evidence, NotOwned, Origin, Owner, Role};
use crate::procinfo::{self, ProcFacts};
use crate::sys::{self, ExitInfo};

/// Why a pid was not attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("process {0} is not running")]
    Gone(i32),
    #[error("{0}")]
    NotOwned(String),
    #[error("cannot open a pidfd for {pid}: {reason}")]
    Pidfd { pid: i32, reason: String },
}

/// An attached process.
#[derive(Debug)]
pub struct Attached {
    pub pid: i32,
    /// Its facts, read after the pidfd pinned it.
    pub facts: ProcFacts,
    /// `None` in poll mode.
    pub fd: Option<OwnedFd>,
    /// How it was shown to belong to the definition.
    pub origin: Origin,
    /// Containment on and it is outside every cgroup of the agent: the caller moves it into
    /// its instance's cgroup.
    pub outside_cgroup: bool,
}

/// What an attach checks a candidate against: the definition and the evidence the agent
/// holds. `tracked_elsewhere` says whether a pid is an instance of another definition.
pub struct Claim<'a> {
    pub owner: Owner<'a>,
    pub spawns: &'a [ownership::Spawn],
    pub recorded: &'a [(i32, u64)],
    pub setup_real: Option<&'a str>,
    pub tracked_elsewhere: &'a dyn Fn(i32) -> bool,
    /// Containment on: the agent's subtree and the definition's cgroup directory.
    pub cgroup: Option<(&'a crate::cgroup::Tree, &'a std::path::Path)>,
}

/// Where `pid` is, as point 5 of the ownership rule sees it. Blocking (reads /proc).
fn cgroup_fact(claim: &Claim<'_>, pid: i32) -> ownership::CgroupFact {
    use ownership::CgroupFact;
    let Some((tree, dir)) = claim.cgroup else {
        return CgroupFact::Off;
    };
    match tree.cgroup_of(pid) {
        Some(c) if c.starts_with(dir) => CgroupFact::Own,
        Some(c) if c.starts_with(tree.root.join("procs")) => CgroupFact::Other,
        Some(_) => CgroupFact::Outside,
        None => CgroupFact::Off,
    }
}

/// The evidence of a claim about `facts` (its ancestors are read here).
fn evidence<'a>(claim: &'a Claim<'a>, facts: &ProcFacts, ancestors: &'a [i32]) -> Evidence<'a> {
    Evidence {
        cgroup: cgroup_fact(claim, facts.pid),
        spawns: claim.spawns,
        recorded: claim.recorded,
        ancestors,
        tracked_elsewhere: (claim.tracked_elsewhere)(facts.pid),
        agent_pid: std::process::id() as i32,
        setup_real: claim.setup_real,
    }
}

/// Attach to `pid` if it belongs to the claim's definition (the ownership rule, as its main
/// process).
pub fn attach(pid: i32, claim: &Claim<'_>, want_pidfd: bool) -> Result<Attached, AttachError> {
    if pid <= 1 || pid == std::process::id() as i32 {
        return Err(AttachError::NotOwned(format!(
            "pid {pid} cannot be managed (init or the agent itself)"
        )));
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
    let facts = procinfo::read_facts(pid).ok_or(AttachError::Gone(pid))?;
    let ancestors = procinfo::ancestors(facts.ppid);
    let ev = evidence(claim, &facts, &ancestors);
    match ownership::check(&facts, &claim.owner, &ev, Role::Main) {
        Ok(origin) => Ok(Attached {
            pid,
            facts,
            fd,
            origin,
            outside_cgroup: ev.cgroup == ownership::CgroupFact::Outside,
        }),
        Err(NotOwned::Gone(p)) => Err(AttachError::Gone(p)),
        Err(e) => Err(AttachError::NotOwned(e.to_string())),
    }
}

/// May `facts` be signalled as a member of an owned instance's process tree (points 1 and 2
/// of the ownership rule)?
pub fn may_signal_member(facts: &ProcFacts, claim: &Claim<'_>) -> bool {
    let ev = evidence(claim, facts, &[]);
    ownership::check(facts, &claim.owner, &ev, Role::Member).is_ok()
}

/// Is the recorded process still alive (same start time, not a zombie)?
pub fn alive(pid: i32, starttime: u64) -> bool {
    procinfo::read_stat(pid).is_some_and(|s| s.starttime == starttime && !s.is_exited())
}

/// How exited process (`pid`, `starttime`) ended: reap it through the reaper if it is our
/// child, else ask the reaper (which may have collected it; an exit of an older process with
/// the same pid is not this one's), else the kernel's pidfd exit info (6.15+), else unknown.
pub fn collect_exit(
    pid: i32,
    starttime: u64,
    fd: Option<&OwnedFd>,
    reaper: &crate::reaper::Reaper,
) -> ExitInfo {
    let child = crate::reaper::Child::exact(pid, starttime);
    if let Some(fd) = fd
        && let Some(exit) = reaper.reap_pidfd(child, fd.as_fd())
    {
        return exit;
    }
    if let Some(exit) = reaper.recent_exit(child) {
        return exit;
    }
    if let Some(fd) = fd
        && let Some(exit) = sys::pidfd_exit_info(fd.as_fd())
    {
        return exit;
    }
    ExitInfo::Unknown
}

/// Send `sig` to `pid` through a pidfd (the one held, or one opened now) when, read after the
/// pidfd pinned it, it still is the process meant (start time and process group, when given)
/// and it may be signalled for the claim's definition ([`may_signal_member`]). Returns true
/// when the signal was delivered.
pub fn signal_member(
    pid: i32,
    held: Option<&Arc<OwnedFd>>,
    starttime: Option<u64>,
    pgrp: Option<i32>,
    claim: &Claim<'_>,
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
    let Some(facts) = procinfo::read_facts(pid) else {
        return false;
    };
    if starttime.is_some_and(|t| t != facts.starttime)
        || pgrp.is_some_and(|g| g != facts.pgrp)
        || !may_signal_member(&facts, claim)
    {
        return false;
    }
    sys::pidfd_signal(fd.as_fd(), sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim_of<'a>(owner: Owner<'a>, none: &'a dyn Fn(i32) -> bool) -> Claim<'a> {
        Claim {
            owner,
            spawns: &[],
            recorded: &[],
            setup_real: None,
            tracked_elsewhere: none,
            cgroup: None,
        }
    }

    const OWNER: Owner<'static> = Owner {
        uid: 0,
        proc_name: "x",
        setup_path: "/",
        has_pid_file: true,
    };

    #[test]
    fn attach_refuses_init_and_self() {
        let none = |_| false;
        let c = claim_of(OWNER, &none);
        assert!(matches!(attach(1, &c, true), Err(AttachError::NotOwned(_))));
        let me = std::process::id() as i32;
        assert!(matches!(
            attach(me, &c, true),
            Err(AttachError::NotOwned(_))
        ));
    }

    #[test]
    fn attach_to_a_gone_pid() {
        let none = |_| false;
        let pid = (procinfo::pid_max() as i32).saturating_sub(1);
        if procinfo::read_stat(pid).is_none() {
            assert!(matches!(
                attach(pid, &claim_of(OWNER, &none), true),
                Err(AttachError::Gone(_))
            ));
        }
    }
}
