//! What a stop ends and how it tells it ended: an instance's process, its descendants and
//! the members of its process group, each checked by the ownership rule just before it is
//! signalled through a pidfd; what is left read from one `/proc` snapshot per look.
//! Blocking: run on the file-system pool.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::sys::signal::Signal;

use super::discover::ClaimData;
use super::registry::{Instance, Registry};
use super::{Engine, watch};
use crate::spec::ProcKey;

/// What a stop must end.
pub struct Targets {
    /// The instance's process (its identity when the stop began), if it still ran.
    pub instance: Option<Instance>,
    /// The process groups whose members go with it.
    pub groups: Vec<i32>,
    pub fds: HashMap<i32, Arc<OwnedFd>>,
    /// `None` when the definition is gone or invalid: nothing is signalled.
    pub claim: Option<ClaimData>,
    /// Containment on: the instance's cgroup (everything in it goes with the instance).
    pub cgroup: Option<(crate::cgroup::Tree, std::path::PathBuf)>,
}

impl Targets {
    /// The targets of `pid`, instance `i` of `key`.
    pub(crate) fn of(
        engine: &Engine,
        reg: &Registry,
        key: &ProcKey,
        i: usize,
        pid: Option<i32>,
    ) -> Targets {
        let e = reg.get(key);
        let tracked = pid.and_then(|p| e.and_then(|e| e.tracked.get(&p)));
        let instance = tracked.map(|t| t.identity.clone());
        let mut fds = HashMap::new();
        if let Some(t) = tracked
            && let Some(fd) = &t.fd
        {
            fds.insert(t.identity.pid, fd.clone());
        }
        let own_pgid = nix::unistd::getpgrp().as_raw();
        let mut groups = Vec::new();
        if let Some(i) = &instance {
            // Whole-group kills only for groups the process leads or that our command
            // created: never the agent's own group, never init's.
            if i.pgid > 1 && i.pgid != own_pgid && (i.pgid == i.pid || i.started_by_agent) {
                groups.push(i.pgid);
            }
        }
        Targets {
            instance,
            groups,
            fds,
            claim: e.and_then(|e| ClaimData::of(e, engine.cgroups.tree())),
            cgroup: engine
                .cgroups
                .tree()
                .map(|t| (t.clone(), t.instance(key, i))),
        }
    }

    /// What is left, from one /proc snapshot: the instance if alive, and the members of its
    /// groups that may be signalled for the definition.
    pub fn left(&self, engine: &Engine) -> Vec<i32> {
        let snap = crate::procinfo::Snapshot::take();
        let mut left: Vec<i32> = self
            .instance
            .iter()
            .filter(|i| snap.alive(i.pid, i.starttime))
            .map(|i| i.pid)
            .collect();
        let Some(claim) = &self.claim else {
            return left;
        };
        // Containment: the cgroup's members are left like the groups' (what may be signalled
        // for the definition: a reused key's cgroup may hold another account's leftovers).
        let mut members: Vec<i32> = Vec::new();
        if let Some((_, dir)) = &self.cgroup
            && crate::cgroup::populated(dir) == Some(true)
        {
            members.extend(crate::cgroup::procs(dir));
        }
        members.extend(
            self.groups
                .iter()
                .flat_map(|g| snap.group(*g).map(|s| s.pid))
                .filter(|p| !left.contains(p)),
        );
        if members.is_empty() {
            return left;
        }
        let _ = claim.with_claim(engine, None, |c| {
            for p in members {
                if crate::procinfo::read_facts(p).is_some_and(|f| watch::may_signal_member(&f, c))
                    && !left.contains(&p)
                {
                    left.push(p);
                }
            }
        });
        left
    }

    /// Send `sig` to the instance, its descendants and the members of its groups that may be
    /// signalled for the definition, each through a pidfd after its checks.
    pub fn signal(&self, engine: &Engine, sig: Signal) {
        let Some(claim) = &self.claim else { return };
        if let Some((tree, dir)) = &self.cgroup {
            // Everything the instance started is in its cgroup, whatever session it made.
            signal_cgroup(engine, tree, dir, claim, sig);
        }
        let snap = crate::procinfo::Snapshot::take();
        let _ = claim.with_claim(engine, None, |c| {
            if let Some(i) = &self.instance {
                watch::signal_member(i.pid, self.fds.get(&i.pid), Some(i.starttime), None, c, sig);
                for d in snap.descendants(i.pid) {
                    watch::signal_member(d.pid, None, Some(d.starttime), None, c, sig);
                }
            }
            for g in &self.groups {
                for m in snap.group(*g) {
                    watch::signal_member(m.pid, None, None, Some(*g), c, sig);
                }
            }
        });
    }
}

/// The members of cgroup `dir`, split by whether they may be signalled for `claim` (the
/// ownership rule's points 1 and 2: a cgroup a key reuses may still hold what an earlier,
/// unregistered definition of another account left there): the pidfds of those that may
/// (each checked through it to be still in the cgroup), and the pids of those that may not.
/// All of them count as foreign when the claim cannot be built (the account does not
/// resolve). Blocking: run on the file-system pool.
pub(crate) fn cgroup_members(
    engine: &Engine,
    tree: &crate::cgroup::Tree,
    dir: &std::path::Path,
    claim: &ClaimData,
) -> (Vec<OwnedFd>, Vec<i32>) {
    let members: Vec<(i32, OwnedFd)> = crate::cgroup::procs(dir)
        .into_iter()
        .filter_map(|p| {
            let fd = crate::sys::pidfd_open(p).ok()?;
            tree.holds(dir, p).then_some((p, fd))
        })
        .collect();
    let may: Vec<bool> = claim
        .with_claim(engine, None, |c| {
            members
                .iter()
                .map(|(p, _)| {
                    crate::procinfo::read_facts(*p).is_some_and(|f| watch::may_signal_member(&f, c))
                })
                .collect()
        })
        .unwrap_or_else(|_| vec![false; members.len()]);
    let (ours, foreign): (Vec<_>, Vec<_>) = members.into_iter().zip(may).partition(|(_, may)| *may);
    let ours: Vec<OwnedFd> = ours.into_iter().map(|((_, fd), _)| fd).collect();
    let foreign: Vec<i32> = foreign.into_iter().map(|((p, _), _)| p).collect();
    (ours, foreign)
}

/// Send `sig` to the processes of cgroup `dir` that may be signalled for `claim`
/// ([`cgroup_members`]), through their pidfds; a SIGKILL kills the whole cgroup at once
/// (`cgroup.kill`) only when every member may be signalled, so nothing is signalled
/// blindly. Returns the members that may not. Blocking: run on the file-system pool.
pub(crate) fn signal_cgroup(
    engine: &Engine,
    tree: &crate::cgroup::Tree,
    dir: &std::path::Path,
    claim: &ClaimData,
    sig: Signal,
) -> Vec<i32> {
    let (ours, foreign) = cgroup_members(engine, tree, dir, claim);
    if sig == Signal::SIGKILL
        && foreign.is_empty()
        && let Err(e) = crate::cgroup::kill(dir)
    {
        tracing::warn!(cgroup = %dir.display(), error = %e, "cgroup.kill failed; signalling its processes one by one");
    }
    for fd in &ours {
        let _ = crate::sys::pidfd_signal(std::os::fd::AsFd::as_fd(fd), sig);
    }
    foreign
}
