//! Finding running processes: through a definition's pid file, and by their recorded
//! identity after an agent restart, always under the ownership rule
//! ([`super::ownership`]). The pid file and `/proc` are read on the file-system pool, so a
//! pid file on a hung mount delays only its own process.

use std::sync::Arc;
use std::time::Duration;

use super::registry::{Entry, Instance, Registry};
use super::{Detection, Engine, ownership, watch};
use crate::spec::ProcKey;

/// A definition's side of an ownership check, copied out of the registry so that the check
/// can run off the async workers.
#[derive(Debug, Clone)]
pub struct ClaimData {
    /// The account, once resolved: its uid, and the file-system identity its pid file is
    /// read with (`None`: the agent's own).
    acct: std::sync::OnceLock<(u32, Option<crate::sys::FsIdentity>)>,
    pub key: ProcKey,
    pub account: String,
    pub proc_name: String,
    pub setup_path: String,
    pub pid_path: String,
    pub spawns: Vec<ownership::Spawn>,
    pub recorded: Vec<(i32, u64)>,
    /// Containment on: the agent's subtree and this definition's cgroup directory.
    pub cgroup: Option<(crate::cgroup::Tree, std::path::PathBuf)>,
}

/// What a pid-file probe found.
#[derive(Debug)]
pub enum Probe {
    /// A process that belongs to the definition, attached.
    Adopt(watch::Attached),
    /// The pid file names a process that does not belong to it (or is unusable), and why.
    Refused(String),
    /// No pid file, or its process is gone.
    Nothing,
}

impl ClaimData {
    /// The claim of an entry (`None` when its definition is invalid).
    pub(crate) fn of(e: &Entry, tree: Option<&crate::cgroup::Tree>) -> Option<ClaimData> {
        if e.invalid.is_some() {
            return None;
        }
        Some(ClaimData {
            acct: std::sync::OnceLock::new(),
            key: e.def.key.clone(),
            account: e.def.spec.account.clone(),
            proc_name: e.def.spec.proc_name.clone(),
            setup_path: e.def.spec.setup_path.clone(),
            pid_path: e.def.spec.pid_path.clone(),
            spawns: e.spawns.iter().copied().collect(),
            recorded: e.recorded.clone(),
            cgroup: tree.map(|t| (t.clone(), t.process_dir(&e.def.key))),
        })
    }

    /// Run `f` with the claim built: the account's uid resolved (an NSS lookup, once) and the
    /// evidence in place. Blocking; run it on the file-system pool.
    pub fn with_claim<R>(
        &self,
        engine: &Engine,
        setup_real: Option<&str>,
        f: impl FnOnce(&watch::Claim<'_>) -> R,
    ) -> Result<R, String> {
        let uid = self.account()?.0;
        let key = self.key.clone();
        let elsewhere = move |pid: i32| engine.tracked_elsewhere(pid, &key);
        let claim = watch::Claim {
            owner: ownership::Owner {
                uid,
                proc_name: &self.proc_name,
                setup_path: &self.setup_path,
                has_pid_file: !self.pid_path.is_empty(),
            },
            spawns: &self.spawns,
            recorded: &self.recorded,
            setup_real,
            tracked_elsewhere: &elsewhere,
            cgroup: self.cgroup.as_ref().map(|(t, d)| (t, d.as_path())),
        };
        Ok(f(&claim))
    }

    /// The account resolved (an NSS lookup, once): its uid and, when the agent runs as root
    /// and the account is another, its file-system identity. Blocking.
    fn account(&self) -> Result<&(u32, Option<crate::sys::FsIdentity>), String> {
        if let Some(a) = self.acct.get() {
            return Ok(a);
        }
        let a = crate::executor::resolve_account(&self.account).map_err(|e| e.to_string())?;
        let fs = crate::executor::fs_identity_of(&a);
        Ok(self.acct.get_or_init(|| (a.uid, fs)))
    }

    /// Resolve the account on the pool (NSS) and return the identity the jobs on this
    /// claim's pid file run with ([`crate::fspool::FsPool::run_as`]).
    pub async fn fs_identity(
        self: &Arc<Self>,
        fs: &crate::fspool::FsPool,
    ) -> Result<Option<crate::sys::FsIdentity>, String> {
        let c = self.clone();
        fs.run_unkeyed("resolving an account", Duration::from_secs(30), move || {
            c.account().map(|a| a.1.clone())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Read the definition's pid file with its account's permissions (root never reads a
    /// pid file for an account that could not read it: neither its number nor whether it
    /// exists is disclosed). Blocking; run it on the file-system pool, with `run_as` and
    /// [`ClaimData::fs_identity`] so that the pool's walk is the account's too.
    pub fn read_pid_file(&self) -> Result<i32, crate::procinfo::PidFileError> {
        use crate::procinfo::{PidFileError, read_pid_file};
        let path = std::path::Path::new(&self.pid_path);
        let unreadable = |reason: String| PidFileError::Unreadable {
            path: self.pid_path.clone(),
            reason,
        };
        let who = self.account().map_err(unreadable)?.1.as_ref();
        crate::sys::as_account_fs(who, || read_pid_file(path))
            .map_err(|e| unreadable(format!("cannot take on the account's identity: {e}")))?
    }

    /// Attach to `pid` under the ownership rule. Blocking; run it on the file-system pool.
    pub fn attach(
        &self,
        engine: &Engine,
        pid: i32,
        want_fd: bool,
    ) -> Result<watch::Attached, String> {
        self.with_claim(engine, None, |c| {
            watch::attach(pid, c, want_fd).map_err(|e| e.to_string())
        })?
    }

    /// Read the pid file and attach to the process it names when it belongs to the
    /// definition. Blocking; run it on the file-system pool, keyed by the pid file.
    /// `setup_real` is the canonical `setup_path`, resolved by its own pool job (a
    /// `setup_path` on a hung mount must not hold the pid file's).
    fn probe(
        &self,
        engine: &Engine,
        want_fd: bool,
        setup_real: Option<String>,
    ) -> Result<Probe, String> {
        let pid = match self.read_pid_file() {
            Ok(p) => p,
            Err(crate::procinfo::PidFileError::Missing(_)) => return Ok(Probe::Nothing),
            Err(e) => return Ok(Probe::Refused(e.to_string())),
        };
        self.with_claim(engine, setup_real.as_deref(), |c| {
            match watch::attach(pid, c, want_fd) {
                Ok(a) => Probe::Adopt(a),
                Err(watch::AttachError::Gone(_)) => Probe::Nothing,
                Err(e) => Probe::Refused(format!(
                    "the pid file {} names pid {pid}, which is not adopted: {e}",
                    self.pid_path
                )),
            }
        })
    }
}

impl Engine {
    /// A recorded process ended while the agent was down: its last exit (unknown), and the
    /// lifecycle is told.
    fn record_gone_while_down(self: &Arc<Self>, key: &ProcKey, slot: usize, pid: i32) {
        if let Some(e) = self.reg().get_mut(key) {
            e.last_exit = Some(super::registry::LastExit {
                pid,
                at: crate::util::unix_now(),
                exit: crate::sys::ExitInfo::Unknown,
                by_operator: false,
                oom: false,
            });
        }
        let i = self
            .reg()
            .get(key)
            .map(|e| slot.min(e.life.instances.len().saturating_sub(1)))
            .unwrap_or(0);
        self.feed_instance(key, i, super::lifecycle::Input::Lost);
    }

    /// Is `pid` tracked under a key other than `key`?
    pub(crate) fn tracked_elsewhere(&self, pid: i32, key: &ProcKey) -> bool {
        self.reg().key_of_pid(pid).is_some_and(|k| k != key)
    }

    /// The claim of `key` (`None` when gone or invalid).
    pub(crate) fn claim_of(&self, key: &ProcKey) -> Option<ClaimData> {
        self.reg()
            .get(key)
            .and_then(|e| ClaimData::of(e, self.cgroups.tree()))
    }

    /// Look for a running process of `key` through its pid file and adopt it into instance
    /// `i` (or the first idle one) when it belongs to the definition. Returns whether one was
    /// adopted, or why the pid file could not be read in time.
    pub async fn discover(
        self: &Arc<Self>,
        key: &ProcKey,
        i: Option<usize>,
    ) -> Result<bool, String> {
        let wanted = {
            let reg = self.reg();
            let Some(e) = reg.get(key) else {
                return Ok(false);
            };
            let has_room = match i {
                Some(_) => true,
                None => e.idle_instance().is_some(),
            };
            has_room && e.tracked.is_empty() && !e.def.spec.pid_path.is_empty()
        };
        let Some(claim) = self.claim_of(key).filter(|_| wanted) else {
            return Ok(false);
        };
        let want_fd = self.detection == Detection::Pidfd;
        let path = std::path::PathBuf::from(&claim.pid_path);
        let setup = std::path::PathBuf::from(&claim.setup_path);
        let s2 = setup.clone();
        let engine = self.clone();
        let claim = Arc::new(claim);
        let who = claim
            .fs_identity(&self.fs)
            .await
            .map_err(|e| format!("cannot read the pid file: {e}"))?;
        // Resolved as the account too: root's canonical form of a path through another
        // account's private directory (`PRIVATE/NAME/../..`) would tell, through the
        // ownership rule's answer, whether NAME exists there.
        let who2 = who.clone();
        let setup_real = self
            .fs
            .run_as(
                &setup,
                who.clone(),
                crate::fspool::PROBE_DEADLINE,
                move || {
                    crate::sys::as_account_fs(who2.as_ref(), || std::fs::canonicalize(&s2).ok())
                        .ok()
                        .flatten()
                },
            )
            .await
            .ok()
            .flatten()
            .map(|p| p.display().to_string());
        let probe = self
            .fs
            .run_as(&path, who, crate::fspool::PROBE_DEADLINE, move || {
                claim.probe(&engine, want_fd, setup_real)
            })
            .await
            .map_err(|e| format!("cannot read the pid file: {e}"))??;
        match probe {
            Probe::Adopt(att) => {
                let (pid, origin) = (att.pid, att.origin);
                if !self.feed_adopted(key, i, att, false) {
                    return Ok(false);
                }
                self.events.emit(
                    Some(key),
                    "adopted",
                    format!(
                        "found running through its pid file (pid {pid}, {})",
                        origin.describe()
                    ),
                    serde_json::json!({"pid": pid}),
                );
                self.refresh_version(key);
                Ok(true)
            }
            Probe::Refused(why) => {
                let new = {
                    let mut reg = self.reg();
                    match reg.get_mut(key) {
                        Some(e) if e.last_refusal.as_deref() != Some(why.as_str()) => {
                            e.last_refusal = Some(why.clone());
                            true
                        }
                        _ => false,
                    }
                };
                if new {
                    self.events
                        .emit(Some(key), "not_adopted", why, serde_json::Value::Null);
                }
                Ok(false)
            }
            Probe::Nothing => Ok(false),
        }
    }
}

/// At most this many pid-file discoveries start per housekeeping sweep.
pub const DISCOVERIES_PER_SWEEP: usize = 64;

impl Engine {
    /// Start a background pid-file discovery for every process that has none in flight (at
    /// the agent's start; housekeeping takes them in turn).
    pub fn discover_untracked(self: &Arc<Self>) {
        self.discover_picked(|reg| {
            super::registry::round_robin(&reg.entries, None, usize::MAX, Self::discovery_due)
        });
    }

    /// Housekeeping's share of [`Engine::discover_untracked`]: at most
    /// [`DISCOVERIES_PER_SWEEP`] discoveries start per sweep, round-robin over the due
    /// processes (each one is a few pool jobs: the account, the setup_path, the pid file).
    /// Every sweep looking at every stopped process was 35 % of a core, idle, with a
    /// thousand registered processes stopped; now a process started outside the agent while
    /// its definition is stopped is found within ceil(stopped / 64) sweeps.
    pub fn discover_untracked_in_turn(self: &Arc<Self>) {
        self.discover_picked(|reg| {
            let due = super::registry::round_robin(
                &reg.entries,
                reg.discovered_last.as_ref(),
                DISCOVERIES_PER_SWEEP,
                Self::discovery_due,
            );
            if let Some(last) = due.last() {
                reg.discovered_last = Some(last.clone());
            }
            due
        });
    }

    /// [`Engine::discover_untracked`] for `key` alone (a definition just registered: the
    /// others are housekeeping's, which takes them in turn).
    pub fn discover_one(self: &Arc<Self>, key: &ProcKey) {
        self.discover_picked(|reg| {
            reg.get(key)
                .filter(|e| Self::discovery_due(e))
                .map(|_| key.clone())
                .into_iter()
                .collect()
        });
    }

    /// Whether `e` wants a pid-file discovery now.
    fn discovery_due(e: &Entry) -> bool {
        e.tracked.is_empty()
            && !e.discovering
            && e.invalid.is_none()
            && !e.def.spec.pid_path.is_empty()
            && e.idle_instance().is_some()
            && !e.life.busy()
    }

    /// Mark the processes `pick` names (under the registry's lock) `discovering`, then
    /// discover each in a task of its own.
    fn discover_picked(self: &Arc<Self>, pick: impl FnOnce(&mut Registry) -> Vec<ProcKey>) {
        let due = {
            let mut reg = self.reg();
            let due = pick(&mut reg);
            for k in &due {
                if let Some(e) = reg.get_mut(k) {
                    e.discovering = true;
                }
            }
            due
        };
        for key in due {
            let engine = self.clone();
            tokio::spawn(async move {
                if let Err(why) = engine.discover(&key, None).await {
                    tracing::debug!(process = %key, "{why}");
                }
                if let Some(e) = engine.reg().get_mut(&key) {
                    e.discovering = false;
                }
            });
        }
    }

    /// Re-adopt every recorded instance after an agent (re)start: the same pid, start time
    /// and boot, and still the definition's process (the ownership rule), is adopted without
    /// restart; otherwise it is gone and supervision will start it. Only `/proc` is read (on
    /// the pool); pid files are read in the background afterwards. Invalid stored
    /// definitions are reported here.
    pub async fn readopt_all(self: &Arc<Self>) {
        let recorded: Vec<(ProcKey, Vec<Instance>, Option<String>)> = {
            let mut reg = self.reg();
            reg.entries
                .values_mut()
                .map(|e| {
                    (
                        e.def.key.clone(),
                        std::mem::take(&mut e.to_readopt),
                        e.invalid.clone(),
                    )
                })
                .collect()
        };
        let want_fd = self.detection == Detection::Pidfd;
        for (key, insts, invalid) in recorded {
            if let Some(why) = invalid {
                tracing::error!(process = %key, "{why}");
                self.events.emit(
                    Some(&key),
                    "invalid_definition",
                    why,
                    serde_json::Value::Null,
                );
                continue;
            }
            let Some(claim) = self.claim_of(&key) else {
                continue;
            };
            for (slot, inst) in insts.into_iter().enumerate() {
                let (engine, claim) = (self.clone(), claim.clone());
                let boot = inst.boot_id.clone();
                let pid = inst.pid;
                let r = self
                    .fs
                    .run_unkeyed("re-adoption", Duration::from_secs(5), move || {
                        if !boot.is_empty() && boot != crate::procinfo::boot_id() {
                            return Err("the host rebooted since it was recorded".to_string());
                        }
                        claim.attach(&engine, pid, want_fd)
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                let err = match r {
                    Ok(att) if att.facts.starttime == inst.starttime => {
                        if self.feed_adopted(&key, Some(slot), att, inst.started_by_agent) {
                            self.events.emit(
                                Some(&key),
                                "adopted",
                                format!("re-adopted pid {} after agent start", inst.pid),
                                serde_json::json!({"pid": inst.pid}),
                            );
                            continue;
                        }
                        format!("pid {} could not be taken back", inst.pid)
                    }
                    Ok(att) => format!(
                        "pid {} now belongs to another process (start time {} differs from the recorded {})",
                        att.pid, att.facts.starttime, inst.starttime
                    ),
                    Err(e) => e,
                };
                self.record_gone_while_down(&key, slot, inst.pid);
                self.events.emit(
                    Some(&key),
                    "exited",
                    format!("pid {} ended while the agent was down ({err})", inst.pid),
                    serde_json::json!({"pid": inst.pid}),
                );
            }
            self.refresh_version(&key);
            if let Some(e) = self.reg().get(&key) {
                self.store.put_state_bg(&key, e.state_json());
            }
        }
    }
}
