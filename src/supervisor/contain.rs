//! Containment's limits: what each instance cgroup is given from its definition
//! (`memory.high`, `memory.max`, `cpu.max`), and the agent's answer to its memory events
//! (docs/architecture.md "Containment", docs/api.md "Resource figures and limits").
//!
//! With the memory controller, `mem_lmt` is `memory.high` of each instance cgroup and
//! `memory.max` is above it by `supervisor.memory_max_margin`; a rise of the cgroup's `high`
//! count runs GSE's stop path at once (the lifecycle's limit breach, as a polled breach does)
//! and an OOM kill is told as such. With the cpu controller and `supervisor.cpu_limit =
//! "throttle"`, `cpu_lmt` is `cpu.max`. Without the controllers the polled check
//! ([`super::limits`]) enforces both.

use std::sync::Arc;
use std::time::Duration;

use super::Engine;
use super::lifecycle::{Input, State};
use crate::cgroup::{Limits, Tree};
use crate::cgwatch::{Report, Rise};
use crate::config::CpuLimit;
use crate::spec::{ProcKey, ProcSpec};

/// How one limit of a process is enforced (`mem_limit_by`, `cpu_limit_by` in status).
pub fn enforcement_names(
    tree: Option<&Tree>,
    spec: &ProcSpec,
    cpu: CpuLimit,
) -> (&'static str, &'static str) {
    let mem = if spec.mem_lmt <= 0.0 {
        "none"
    } else if tree.is_some_and(|t| t.has("memory")) {
        "memory.high"
    } else {
        "polled"
    };
    let cpu = if spec.cpu_lmt <= 0.0 {
        "none"
    } else if cpu == CpuLimit::Throttle && tree.is_some_and(|t| t.has("cpu")) {
        "cpu.max"
    } else {
        "polled"
    };
    (mem, cpu)
}

impl Engine {
    /// The host's total memory and cpus (read once; blocking the first time).
    fn host_figures(&self) -> crate::probe::HostFigures {
        *self
            .host_figures
            .get_or_init(crate::probe::HostFigures::read)
    }

    /// How `spec`'s memory and cpu limits are enforced: "none", "polled", "memory.high",
    /// "cpu.max".
    pub fn enforcement(&self, spec: &ProcSpec) -> (&'static str, &'static str) {
        enforcement_names(self.cgroups.tree(), spec, self.config.supervisor.cpu_limit)
    }

    /// The limits of `spec`'s instance cgroups. Blocking the first time (MemTotal).
    fn cgroup_limits(&self, spec: &ProcSpec) -> Limits {
        let h = self.host_figures();
        let sup = &self.config.supervisor;
        Limits::of(
            spec.mem_lmt,
            spec.cpu_lmt,
            h.mem_total_bytes,
            h.cpus,
            sup.memory_max_margin,
            sup.cpu_limit == CpuLimit::Throttle,
        )
    }

    /// Before instance `i` of `key` starts (or a process is moved into it): refuse when its
    /// cgroup holds processes that do not belong to the definition ([`Engine::foreign_in`]:
    /// what another account's definition of the same key left running there, which the
    /// definition's limits, its OOM group and its commands must never reach); create the
    /// cgroup with the controllers, write the definition's limits (`max` where it has none,
    /// so a removed limit is lifted) and watch its memory events from their counts now.
    /// Only the check without controllers. Blocking.
    pub(crate) fn prepare_instance_blocking(
        &self,
        key: &ProcKey,
        i: usize,
        spec: &ProcSpec,
    ) -> std::io::Result<()> {
        let Some(tree) = self.cgroups.tree() else {
            return Ok(());
        };
        let dir = tree.instance(key, i);
        let foreign = self
            .foreign_in(tree, key, &dir)
            .map_err(std::io::Error::other)?;
        if !foreign.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} holds processes that do not belong to it (pids {foreign:?}); they are left alone and the cgroup is not given this definition's limits",
                dir.display()
            )));
        }
        if tree.enabled.is_empty() {
            return Ok(());
        }
        tree.ensure(&dir)?;
        self.cgroup_limits(spec).apply(tree, &dir)?;
        if let Some(w) = &self.memwatch
            && spec.mem_lmt > 0.0
        {
            w.add(key, i, &dir)?;
        }
        Ok(())
    }

    /// [`Engine::prepare_instance_blocking`] on the pool.
    pub(crate) async fn prepare_instance(
        self: &Arc<Self>,
        key: &ProcKey,
        i: usize,
        spec: &ProcSpec,
    ) -> Result<(), String> {
        if self.cgroups.tree().is_none() {
            return Ok(());
        }
        let (e, k, s) = (self.clone(), key.clone(), spec.clone());
        self.fs
            .run_unkeyed(
                "setting a cgroup's limits",
                Duration::from_secs(5),
                move || e.prepare_instance_blocking(&k, i, &s),
            )
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot set the limits of its cgroup: {e}"))
    }

    /// A definition changed: its running instances' cgroups get the new limits now (a
    /// changed `mem_lmt` needs no restart). On the pool; a failure is logged.
    pub(crate) fn reapply_limits(self: &Arc<Self>, key: &ProcKey) {
        if self.cgroups.tree().is_none_or(|t| t.enabled.is_empty()) {
            return;
        }
        let Some((spec, running)) = self.reg().get(key).map(|e| {
            let running: Vec<usize> = (0..e.life.instances.len())
                .filter(|i| e.life.instances[*i].state.pid().is_some())
                .collect();
            (e.def.spec.clone(), running)
        }) else {
            return;
        };
        for i in running {
            let (e, k, s) = (self.clone(), key.clone(), spec.clone());
            tokio::spawn(async move {
                if let Err(why) = e.prepare_instance(&k, i, &s).await {
                    tracing::warn!(process = %k, instance = i, error = %why, "cannot update the limits of a running instance");
                }
            });
        }
    }

    /// The processes in cgroup `dir` of `key` that may not be signalled for its definition
    /// (the ownership rule's points 1 and 2, as a stop decides): a key's cgroups outlive
    /// its definitions, so a key registered again, by another account, may find there what
    /// the earlier one left running. Nothing when `dir` holds no process. Blocking.
    pub(crate) fn foreign_in(
        &self,
        tree: &Tree,
        key: &ProcKey,
        dir: &std::path::Path,
    ) -> Result<Vec<i32>, String> {
        if crate::cgroup::populated(dir) != Some(true) {
            return Ok(Vec::new());
        }
        let claim = self
            .claim_of(key)
            .ok_or_else(|| format!("{key} has no valid definition"))?;
        Ok(super::stop::cgroup_members(self, tree, dir, &claim).1)
    }

    /// Was instance `i`'s last exit an OOM kill (memory.events counted one since its start)?
    pub(crate) fn took_oom(&self, key: &ProcKey, i: usize) -> bool {
        self.memwatch.as_ref().is_some_and(|w| w.take_oom(key, i))
    }

    /// Answer memory events until shutdown: a rise of `high` is a limit breach of a managed
    /// running instance (GSE's stop path, then the restart); an OOM kill is an event, and the
    /// exit that follows is reported as one.
    pub async fn memwatch_loop(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(w) = self.memwatch.clone() else {
            return;
        };
        let fd = match w.fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch memory events; memory limits are polled");
                return;
            }
        };
        let afd = match crate::sys::async_owned(fd) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch memory events; memory limits are polled");
                return;
            }
        };
        loop {
            let mut guard = tokio::select! {
                g = afd.readable() => match g {
                    Ok(g) => g,
                    Err(_) => return,
                },
                _ = shutdown.changed() => return,
            };
            // Cleared before the read: an event that arrives while it runs makes the
            // descriptor ready again, so it is never left for the one after it.
            guard.clear_ready();
            drop(guard);
            let w2 = w.clone();
            let reports = self
                .fs
                .run_unkeyed("reading memory events", Duration::from_secs(5), move || {
                    w2.read()
                })
                .await
                .unwrap_or_default();
            self.on_memory_reports(reports);
        }
    }

    fn on_memory_reports(self: &Arc<Self>, reports: Vec<Report>) {
        for r in reports {
            match r.rise {
                Rise::High { by } => {
                    let acted = {
                        let reg = self.reg();
                        reg.get(&r.key).is_some_and(|e| {
                            e.life.intent.managed
                                && !e.life.busy()
                                && e.life
                                    .instances
                                    .get(r.instance)
                                    .is_some_and(|x| matches!(x.state, State::Running { .. }))
                        })
                    };
                    let Some(spec) = self.definition(&r.key).map(|d| d.spec) else {
                        continue;
                    };
                    if !acted {
                        continue;
                    }
                    let cause = format!(
                        "memory reached memory.high (mem_lmt {}% of MemTotal) in its cgroup ({by} time(s))",
                        spec.mem_lmt
                    );
                    self.events.emit(
                        Some(&r.key),
                        "limit_exceeded",
                        format!("{cause}; stopping instance {}", r.instance),
                        serde_json::json!({
                            "mem_lmt": spec.mem_lmt,
                            "enforcement": "memory.high",
                            "instance": r.instance,
                            "high_events": by,
                        }),
                    );
                    self.feed_instance(&r.key, r.instance, Input::LimitBreach { cause });
                }
                Rise::OomKill { by } => {
                    self.events.emit(
                        Some(&r.key),
                        "oom_kill",
                        format!(
                            "the OOM killer killed {by} process(es) of instance {} (memory.max)",
                            r.instance
                        ),
                        serde_json::json!({"instance": r.instance, "oom_kills": by}),
                    );
                }
            }
        }
    }
}

/// How a move of an adopted process into its cgroup ended.
#[derive(Debug, PartialEq, Eq)]
enum Moved {
    Done,
    /// Left where it is: moving it would take it out of a limit of its own cgroup.
    Limited(String),
    /// Left where it is: the instance's cgroup holds these processes, which do not belong
    /// to the definition.
    Foreign(Vec<i32>),
    /// It exited around the move.
    Gone,
}

impl Engine {
    /// Containment: a process adopted from outside every cgroup of the agent (started before
    /// containment was turned on, or by hand) is moved into instance `i`'s cgroup, with the
    /// definition's limits, so what it starts from now on stays there. A process whose own
    /// cgroup (or an ancestor outside the agent's) has a limit is left there, since the
    /// move would free it of that limit; so is one whose instance cgroup holds processes that
    /// do not belong to the definition (a reused key's: nothing joins them, and their cgroup
    /// is never given this definition's limits). The move is by pid (the kernel takes
    /// nothing else), so the process's pidfd checks that it was the one moved. On the pool;
    /// the outcome is logged.
    /// Called with the registry locked: it only spawns the move.
    pub(crate) fn move_into_cgroup(
        self: &Arc<Self>,
        key: &ProcKey,
        i: usize,
        spec: ProcSpec,
        att: &super::watch::Attached,
    ) {
        let Some(tree) = self.cgroups.tree().cloned() else {
            return;
        };
        let pid = att.pid;
        let starttime = att.facts.starttime;
        let pidfd = att.fd.as_ref().and_then(|f| f.try_clone().ok());
        let dir = tree.instance(key, i);
        let (e, key) = (self.clone(), key.clone());
        tokio::spawn(async move {
            let (d, k) = (dir.clone(), key.clone());
            let e2 = e.clone();
            let r =
                e.fs.run_unkeyed(
                    "moving a process into its cgroup",
                    Duration::from_secs(5),
                    move || {
                        move_checked(&e2, &tree, &k, i, &spec, &d, pid, starttime, pidfd.as_ref())
                    },
                )
                .await;
            match r {
                Ok(Ok(Moved::Done)) => {
                    tracing::info!(process = %key, pid, cgroup = %dir.display(), "adopted process moved into its cgroup")
                }
                Ok(Ok(Moved::Gone)) => {
                    tracing::info!(process = %key, pid, "an adopted process exited while it was moved into its cgroup")
                }
                Ok(Ok(Moved::Foreign(pids))) => {
                    tracing::warn!(process = %key, pid, cgroup = %dir.display(), foreign = ?pids, "adopted process left in its own cgroup: the instance's cgroup holds processes of another definition");
                    e.events.emit(
                        Some(&key),
                        "not_contained",
                        format!("pid {pid} stays in its own cgroup: {} holds processes that do not belong to this definition (pids {pids:?}), left by an earlier definition of the key; it is tracked without containment", dir.display()),
                        serde_json::json!({"pid": pid, "foreign": pids}),
                    );
                }
                Ok(Ok(Moved::Limited(why))) => {
                    tracing::warn!(process = %key, pid, limit = %why, "adopted process left in its own cgroup: moving it would lift a limit");
                    e.events.emit(
                        Some(&key),
                        "not_contained",
                        format!("pid {pid} stays in its own cgroup, which has a limit ({why}); it is tracked without containment"),
                        serde_json::json!({"pid": pid, "limit": why}),
                    );
                }
                Ok(Err(err)) => {
                    tracing::warn!(process = %key, pid, error = %err, "cannot move an adopted process into its cgroup")
                }
                Err(err) => {
                    tracing::warn!(process = %key, pid, error = %err, "cannot move an adopted process into its cgroup")
                }
            }
        });
    }
}

/// The move itself. The pidfd was opened (and the ownership rule checked) before: while it
/// says the process runs, `pid` is that process, so a check after the write shows that the
/// write moved it. The cgroup is prepared first (its limits' writes can take a while: the
/// kernel reclaims down to a lowered limit), and the pidfd checked right before the write,
/// so the window in which the pid could be reused is the write's own. If it exited
/// meanwhile, whatever may have been given its pid since and moved with it is put back
/// beside its parent. Blocking.
#[allow(clippy::too_many_arguments)]
fn move_checked(
    engine: &Engine,
    tree: &Tree,
    key: &ProcKey,
    i: usize,
    spec: &ProcSpec,
    dir: &std::path::Path,
    pid: i32,
    starttime: u64,
    pidfd: Option<&std::os::fd::OwnedFd>,
) -> std::io::Result<Moved> {
    use std::os::fd::AsFd;
    let gone = || match pidfd {
        Some(fd) => crate::sys::pidfd_exited(fd.as_fd()),
        None => !super::watch::alive(pid, starttime),
    };
    let Some(from) = tree.cgroup_of(pid) else {
        return Ok(Moved::Gone);
    };
    if gone() {
        return Ok(Moved::Gone);
    }
    if let Some(why) = tree.limit_left_behind(&from) {
        return Ok(Moved::Limited(why));
    }
    let foreign = engine
        .foreign_in(tree, key, dir)
        .map_err(std::io::Error::other)?;
    if !foreign.is_empty() {
        return Ok(Moved::Foreign(foreign));
    }
    engine.prepare_instance_blocking(key, i, spec)?;
    if gone() {
        return Ok(Moved::Gone);
    }
    let wrote = tree.move_into(dir, pid);
    if gone() {
        // The pid may have been reused between the check and the write: a process that is
        // not the adopted one, now in this cgroup, goes back to its parent's cgroup.
        if let Some(f) = crate::procinfo::read_facts(pid)
            && f.starttime != starttime
            && tree.holds(dir, pid)
            && let Some(back) = tree.cgroup_of(f.ppid)
        {
            let _ = std::fs::write(back.join("cgroup.procs"), pid.to_string());
        }
        return Ok(Moved::Gone);
    }
    wrote.map(|()| Moved::Done)
}
