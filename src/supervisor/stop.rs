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
        // Containment: the cgroup is the truth; what is in it is left (zombies included,
        // until reaped: cgroup.events says populated 0 only once they are gone).
        if let Some((_, dir)) = &self.cgroup
            && crate::cgroup::populated(dir) == Some(true)
        {
            for p in crate::cgroup::procs(dir) {
                if !left.contains(&p) {
                    left.push(p);
                }
            }
            if left.is_empty() {
                // Populated but no pid listed yet (a race with an exit): look again.
                left.push(-1);
            }
        }
        let Some(claim) = &self.claim else {
            return left;
        };
        let members: Vec<i32> = self
            .groups
            .iter()
            .flat_map(|g| snap.group(*g).map(|s| s.pid))
            .filter(|p| !left.contains(p))
            .collect();
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
            if sig == Signal::SIGKILL
                && let Err(e) = crate::cgroup::kill(dir)
            {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cgroup.kill failed; signalling its processes one by one");
            }
            tree.signal_members(dir, sig);
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
