//! Running control commands: `sh -c CMD` in `setup_path`, as the configured account, in its
//! own session, with a clean environment, its output captured by the output keeper.
//!
//! * Identity: the account is resolved in the parent (uid, gid, supplementary groups from
//!   `getgrouplist`, HOME and SHELL from passwd); the child only makes syscalls
//!   ([`crate::sys::install_pre_exec`]). `HOME`, `USER`, `LOGNAME`, `SHELL` and a fixed `PATH`
//!   are set for the account, never inherited from root.
//! * Output: stdout and stderr are pipes whose read ends the output keeper holds
//!   ([`crate::output`]); it writes them, line by line, to `STATE/output/<key>.log` after
//!   this command's header line, and keeps the file within its bound. A daemon started by
//!   the command inherits the pipes; the keeper outlives the agent, so the daemon's output
//!   goes on being captured across agent restarts. A command's result carries what its pipes
//!   held when its shell exited (bounded), never waiting for their end. When the keeper
//!   cannot be reached the command still runs, its output discarded.
//! * Waiting: the reaper reports the shell's exit; on `op_timeout` the command's whole process
//!   group (its session) is killed with SIGKILL.
//! * Off the runtime: `setup_path` (a caller's path, perhaps on a hung mount) is opened as a
//!   directory on the [`FsPool`] with the file-system identity of the account the command
//!   runs as ([`FsPool::run_as`]: root never looks a path up for an account that could not),
//!   and the child enters it with `fchdir` once it is that account (no path lookup after
//!   the fork); the account lookup (NSS) and the fork run on the pool too, never on an async
//!   worker.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::fspool::FsPool;
use crate::output::{Capture, OutputClient};
use crate::reaper::Reaper;
use crate::spec::ProcKey;
use crate::sys::{self, ExitInfo, SpawnIdentity};

/// Failures to run a command at all (as opposed to a command that ran and failed).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("account {0:?} does not exist")]
    NoSuchAccount(String),
    #[error(
        "the agent runs as uid {agent_uid} and cannot run commands as account {account:?} (only root can switch accounts)"
    )]
    CannotSwitch { agent_uid: u32, account: String },
    #[error(
        "account {account:?} has uid {uid} / gid {gid}: 4294967295 is not an id (to the kernel it means \"leave unchanged\"), so nothing runs as it"
    )]
    InvalidIds { account: String, uid: u32, gid: u32 },
    #[error("setup_path {0} does not exist or is not a directory")]
    NoSetupPath(String),
    #[error("setup_path {path}: {reason}")]
    SetupPathUnavailable { path: String, reason: String },
    #[error("cannot open {path} for a command's output: {source}")]
    Output {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the command: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot place the command in its cgroup {dir}: {reason}")]
    Cgroup { dir: String, reason: String },
    /// The agent's own pool could not do the work in time (no path is to blame).
    #[error("cannot start the command now: {0}")]
    Pool(#[source] crate::fspool::FsError),
}

/// A resolved account.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: String,
}

/// Resolve `name` (empty: the agent's own account).
pub fn resolve_account(name: &str) -> Result<Account, ExecError> {
    let user = if name.is_empty() {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
    } else {
        nix::unistd::User::from_name(name).ok().flatten()
    };
    let Some(u) = user else {
        if name.is_empty() {
            // No passwd entry for our own uid (containers): run as we are.
            let uid = nix::unistd::getuid().as_raw();
            let gid = nix::unistd::getgid().as_raw();
            return Ok(Account {
                name: uid.to_string(),
                uid,
                gid,
                groups: vec![gid],
                home: "/".into(),
                shell: "/bin/sh".into(),
            });
        }
        return Err(ExecError::NoSuchAccount(name.to_string()));
    };
    let groups = CString::new(u.name.clone())
        .ok()
        .and_then(|c| nix::unistd::getgrouplist(&c, u.gid).ok())
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![u.gid.as_raw()]);
    Ok(Account {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        groups,
        home: u.dir.display().to_string(),
        shell: u.shell.display().to_string(),
    })
}

/// The file-system identity the agent takes on to reach paths for `acct` (its `setup_path`,
/// pid file, log files): `Some` when the agent runs as root and the account is another.
pub fn fs_identity_of(acct: &Account) -> Option<sys::FsIdentity> {
    let agent = nix::unistd::getuid().as_raw();
    (agent == 0 && acct.uid != agent).then(|| sys::FsIdentity {
        uid: acct.uid,
        gid: acct.gid,
        groups: acct.groups.clone(),
    })
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub key: ProcKey,
    /// `start_cmd`, `stop_cmd`, ... (written in the output file's header line).
    pub label: String,
    pub command: String,
    pub cwd: PathBuf,
    pub account: String,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    /// The cgroup the command runs in (containment on), created if missing.
    pub cgroup: Option<crate::cgroup::Placement>,
}

/// A command that was started.
#[derive(Debug)]
pub struct Spawned {
    /// The shell's pid (also its process group and session id).
    pub pid: i32,
    /// Resolves when the reaper collects the shell.
    pub exit: tokio::sync::oneshot::Receiver<ExitInfo>,
    /// Its output, held by the keeper until this is dropped (`None`: not captured).
    pub capture: Option<Capture>,
    /// Boot-clock ticks just before the spawn: every process it forks starts at or after this.
    pub spawned_ticks: u64,
    /// The command's lineage token, in its environment as [`crate::util::LINEAGE_VAR`]
    /// (inherited by everything it starts, wherever it is reparented to).
    pub token: u128,
    /// The uid it runs as.
    pub uid: u32,
}

impl Spawned {
    /// The shell as the reaper names it (its pid and when it was spawned).
    pub fn child(&self) -> crate::reaper::Child {
        crate::reaper::Child::spawned(self.pid, self.spawned_ticks)
    }
}

/// How a command finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub exit: ExitInfo,
    pub timed_out: bool,
    /// Its output, bounded.
    pub output: String,
}

impl Finished {
    pub fn success(&self) -> bool {
        !self.timed_out && self.exit.success()
    }
}

/// Runs commands; cheap to clone.
#[derive(Clone)]
pub struct Executor {
    reaper: Reaper,
    fs: FsPool,
    output: OutputClient,
    output_dir: PathBuf,
    umask: u32,
    agent_uid: u32,
}

impl Executor {
    pub fn new(
        reaper: Reaper,
        fs: FsPool,
        output: OutputClient,
        output_dir: PathBuf,
        umask: u32,
    ) -> Executor {
        Executor {
            reaper,
            fs,
            output,
            output_dir,
            umask,
            agent_uid: nix::unistd::getuid().as_raw(),
        }
    }

    /// The current output file of a process (rotated ones are `.log.1`, `.log.2`, ...).
    pub fn output_path(&self, key: &ProcKey) -> PathBuf {
        self.output_dir.join(format!("{}.log", output_stem(key)))
    }

    /// Resolve the identity a command runs with (an NSS lookup: blocking).
    fn identity(&self, account: &str) -> Result<(SpawnIdentity, Account), ExecError> {
        let acct = resolve_account(account)?;
        if acct.uid == libc::uid_t::MAX || acct.gid == libc::gid_t::MAX {
            return Err(ExecError::InvalidIds {
                account: account.to_string(),
                uid: acct.uid,
                gid: acct.gid,
            });
        }
        let switch_to = if acct.uid == self.agent_uid {
            None
        } else if self.agent_uid == 0 {
            Some((acct.uid, acct.gid, acct.groups.clone()))
        } else {
            return Err(ExecError::CannotSwitch {
                agent_uid: self.agent_uid,
                account: account.to_string(),
            });
        };
        Ok((
            SpawnIdentity {
                switch_to,
                umask: self.umask,
                nofile: sys::original_nofile(),
                cwd: None,
                cgroup_procs: None,
                cgroup_dir: None,
                reset_oom: true,
            },
            acct,
        ))
    }

    /// Start `sh -c CMD` in `setup_path` and return once it runs. The directory is opened on
    /// the file-system pool (a hung mount fails this start after a deadline and delays
    /// nothing else); the account is resolved (NSS) and the command forked on the pool too;
    /// its stdout and stderr are pipes from the output keeper.
    pub async fn spawn(&self, req: &CommandRequest) -> Result<Spawned, ExecError> {
        let pool_err = ExecError::Pool;
        let this = self.clone();
        let account = req.account.clone();
        let (mut ident, acct) = self
            .fs
            .run_unkeyed("resolving an account", Duration::from_secs(30), move || {
                this.identity(&account)
            })
            .await
            .map_err(pool_err)??;
        let cwd = req.cwd.clone();
        let unavailable = |reason: String| ExecError::SetupPathUnavailable {
            path: req.cwd.display().to_string(),
            reason,
        };
        // Looked up with the account's own permissions (and entered as the account, after
        // the switch): a command never starts in a directory its account could not enter.
        let who = ident.fs_identity();
        let who2 = who.clone();
        let dir = self
            .fs
            .run_as(&req.cwd, who, crate::fspool::PROBE_DEADLINE, move || {
                open_dir_as(who2.as_ref(), &cwd)
            })
            .await
            .map_err(|e| {
                // Only a path that did not answer is blamed on setup_path; a busy pool is
                // the agent's.
                if e.blames_path() {
                    unavailable(e.to_string())
                } else {
                    ExecError::Pool(e)
                }
            })??;
        ident.cwd = Some(std::sync::Arc::new(dir));
        if let Some(place) = req.cgroup.clone() {
            let fd = self
                .fs
                .run_unkeyed(
                    "placing a command in its cgroup",
                    Duration::from_secs(5),
                    move || place.open().map_err(|e| (place.dir.clone(), e)),
                )
                .await
                .map_err(pool_err)?
                .map_err(|(dir, e)| ExecError::Cgroup {
                    dir: dir.display().to_string(),
                    reason: e.to_string(),
                })?;
            ident.cgroup_dir = Some(std::sync::Arc::new(fd));
        }
        let header = format!(
            "{} {} as {}: {}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            req.label,
            acct.name,
            req.command
        );
        // A keeper that cannot be reached must not stop supervision: the command still
        // runs, its output discarded.
        let (out, err_out, capture) = match self.output.open(&output_stem(&req.key), header).await {
            Ok(p) => (p.stdout, p.stderr, Some(p.capture)),
            Err(e) => {
                tracing::warn!(process = %req.key, error = %e, "running {} without capturing its output", req.label);
                let (a, b) = null_pair()?;
                (a, b, None)
            }
        };
        let req = req.clone();
        let uid = acct.uid;
        let (pid, spawned_ticks, token) = self
            .fs
            .run_unkeyed("spawning a command", Duration::from_secs(30), move || {
                fork_command(&req, &acct, ident, out, err_out)
            })
            .await
            .map_err(pool_err)??;
        let exit = self
            .reaper
            .wait_for(crate::reaper::Child::spawned(pid, spawned_ticks));
        Ok(Spawned {
            pid,
            exit,
            capture,
            spawned_ticks,
            token,
            uid,
        })
    }

    /// Kill a command's whole process group (its session), if the shell is not reaped yet:
    /// the members that run as the command's account (any member, for a root command; a
    /// member's real uid is the account's even when it ran a set-uid program). The /proc scan
    /// and the signals run on the file-system pool.
    pub async fn kill_group(&self, sp: &Spawned) {
        let (reaper, child, uid) = (self.reaper.clone(), sp.child(), sp.uid);
        let killed = self
            .fs
            .run_unkeyed(
                "killing a command's group",
                Duration::from_secs(10),
                move || kill_group_now(&reaper, child, uid),
            )
            .await;
        if let Err(e) = killed {
            tracing::warn!(pid = sp.pid, error = %e, "could not kill a command's process group");
        }
    }

    /// What a spawned command has written so far, bounded (`store.max_output_bytes`).
    pub async fn collect(&self, sp: &Spawned) -> String {
        match &sp.capture {
            Some(c) => self.output.collect(c).await,
            None => String::new(),
        }
    }

    /// Run a command to completion (or until its timeout, when its group is killed).
    pub async fn run(&self, req: &CommandRequest) -> Result<Finished, ExecError> {
        let mut sp = self.spawn(req).await?;
        self.wait(&mut sp, req.timeout).await
    }

    /// Wait for a spawned command, killing its group at `timeout`; then take its output
    /// (what its pipes hold at that moment: a child it left behind may keep writing).
    pub async fn wait(&self, sp: &mut Spawned, timeout: Duration) -> Result<Finished, ExecError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (exit, timed_out) = tokio::select! {
            r = &mut sp.exit => (r.unwrap_or(ExitInfo::Unknown), false),
            _ = tokio::time::sleep_until(deadline) => {
                self.kill_group(sp).await;
                let exit = tokio::time::timeout(Duration::from_secs(5), &mut sp.exit)
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .unwrap_or(ExitInfo::Unknown);
                (exit, true)
            }
        };
        Ok(Finished {
            exit,
            timed_out,
            output: self.collect(sp).await,
        })
    }
}

/// [`Executor::kill_group`]'s blocking part. While the shell is unreaped its pid, and so its
/// group id, cannot be reused; each member is signalled through a pidfd after checking, with
/// the pidfd held, that it is still in the group and runs as `uid` (twice: a member may have
/// been forking during the first pass).
fn kill_group_now(reaper: &Reaper, child: crate::reaper::Child, uid: u32) {
    let pid = child.pid;
    reaper.with_unreaped(child, || {
        for _ in 0..2 {
            for p in crate::procinfo::pids_in_group(pid) {
                let Ok(fd) = sys::pidfd_open(p) else { continue };
                let same =
                    crate::procinfo::read_stat(p).is_some_and(|s| s.pgrp == pid && !s.is_exited());
                let account_ok = uid == 0
                    || std::fs::read_to_string(format!("/proc/{p}/status"))
                        .ok()
                        .and_then(|s| crate::procinfo::parse_status_uid(&s))
                        == Some(uid);
                if same && account_ok {
                    let _ = sys::pidfd_signal(
                        std::os::fd::AsFd::as_fd(&fd),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    });
}

/// Fork `sh -c CMD` as `acct` with `ident` (its working directory entered with `fchdir`)
/// and the given stdout and stderr; returns its pid, the boot-clock ticks just before the
/// fork and its lineage token. With containment the command is created inside its cgroup
/// (`clone3` with `CLONE_INTO_CGROUP`); on a kernel without that it moves itself there
/// before exec. Blocking: run on the file-system pool.
fn fork_command(
    req: &CommandRequest,
    acct: &Account,
    ident: SpawnIdentity,
    out: OwnedFd,
    err_out: OwnedFd,
) -> Result<(i32, u64, u128), ExecError> {
    let token = crate::util::lineage_token().map_err(ExecError::Spawn)?;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    let shell = if acct.shell.is_empty() {
        "/bin/sh"
    } else {
        &acct.shell
    };
    for (k, v) in [
        ("PATH", path),
        ("HOME", acct.home.as_str()),
        ("USER", acct.name.as_str()),
        ("LOGNAME", acct.name.as_str()),
        ("SHELL", shell),
        ("PROCAGENT_NAMESPACE", req.key.namespace.as_str()),
        ("PROCAGENT_NAME", req.key.name.as_str()),
    ] {
        env.insert(k.into(), v.into());
    }
    for var in ["LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(var) {
            env.insert(var.into(), v);
        }
    }
    for (k, v) in &req.env {
        env.insert(k.clone(), v.clone());
    }
    // After the definition's env: a definition cannot set (or unset) its own lineage.
    env.insert(crate::util::LINEAGE_VAR.into(), format!("{token:032x}"));
    let spawned_ticks = crate::procinfo::now_ticks_floor();
    let mut ident = ident;
    let cgroup = ident.cgroup_dir.clone();
    // Only the answers that mean "this kernel cannot" fall back; any other (EAGAIN at a
    // full pids.max above all: a migration would bypass it) fails the start.
    let unsupported = |e: &std::io::Error, cgroup: bool| {
        let codes: &[i32] = if cgroup {
            &[libc::ENOSYS, libc::EPERM, libc::EINVAL, libc::E2BIG]
        } else {
            &[libc::ENOSYS, libc::EPERM]
        };
        e.raw_os_error().is_some_and(|c| codes.contains(&c))
    };
    match spawn_direct(req, &env, &ident, cgroup.as_deref(), &out, &err_out) {
        Ok(pid) => return Ok((pid, spawned_ticks, token)),
        Err(sys::CloneError::Child(e)) => return Err(ExecError::Spawn(e)),
        Err(sys::CloneError::Clone(e)) if unsupported(&e, cgroup.is_some()) => {
            tracing::debug!(error = %e, "clone3 unavailable; falling back");
        }
        Err(sys::CloneError::Clone(e)) => return Err(ExecError::Spawn(e)),
    }
    if let Some(dir) = cgroup {
        // An older kernel: no CLONE_INTO_CGROUP; the command moves itself (cgroup.procs).
        let procs = rustix::fs::openat(
            &*dir,
            "cgroup.procs",
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| ExecError::Spawn(e.into()))?;
        ident.cgroup_procs = Some(std::sync::Arc::new(procs));
        match spawn_direct(req, &env, &ident, None, &out, &err_out) {
            Ok(pid) => return Ok((pid, spawned_ticks, token)),
            Err(sys::CloneError::Child(e)) => return Err(ExecError::Spawn(e)),
            Err(sys::CloneError::Clone(e)) if unsupported(&e, false) => {}
            Err(sys::CloneError::Clone(e)) => return Err(ExecError::Spawn(e)),
        }
    }
    // No clone3 at all (before Linux 5.3): std's fork with the same setup.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&req.command)
        .env_clear()
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err_out));
    sys::install_pre_exec(&mut cmd, ident);
    let child = cmd.spawn().map_err(ExecError::Spawn);
    // The agent keeps no write end: the pipes end when the command's last writer does.
    drop(cmd);
    let child = child?;
    let pid = child.id() as i32;
    // Never wait on the Child: the reaper collects it.
    drop(child);
    Ok((pid, spawned_ticks, token))
}

/// [`fork_command`]'s spawn: `sh -c CMD` created by [`sys::spawn_command`], inside its
/// cgroup when `cgroup` is given.
fn spawn_direct(
    req: &CommandRequest,
    env: &BTreeMap<String, String>,
    ident: &SpawnIdentity,
    cgroup: Option<&OwnedFd>,
    out: &OwnedFd,
    err_out: &OwnedFd,
) -> Result<i32, sys::CloneError> {
    use std::ffi::CString;
    use std::os::fd::AsFd;
    let c = |s: &str| {
        CString::new(s).map_err(|_| {
            sys::CloneError::Child(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a command or environment value holds a NUL byte",
            ))
        })
    };
    let argv = vec![c("/bin/sh")?, c("-c")?, c(&req.command)?];
    let envp = env
        .iter()
        .map(|(k, v)| c(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let null = std::fs::File::open("/dev/null").map_err(sys::CloneError::Child)?;
    // Created inside the cgroup: the setup has nothing to move.
    let setup = sys::ChildSetup::new(if cgroup.is_some() {
        SpawnIdentity {
            cgroup_procs: None,
            ..ident.clone()
        }
    } else {
        ident.clone()
    });
    sys::spawn_command(
        &argv,
        &envp,
        [null.as_fd(), out.as_fd(), err_out.as_fd()],
        &setup,
        cgroup.map(|d| d.as_fd()),
    )
}

/// Open `setup_path` as a directory for the child's `fchdir`, as the account the command runs
/// as (`None`: the agent's own), so that root never opens a way in for it.
fn open_dir_as(account: Option<&sys::FsIdentity>, path: &Path) -> Result<OwnedFd, ExecError> {
    sys::as_account_fs(account, || open_dir(path)).map_err(|e| ExecError::SetupPathUnavailable {
        path: path.display().to_string(),
        reason: format!("cannot take on the account's file-system identity: {e}"),
    })?
}

/// Open `setup_path` as a directory (`O_PATH`, no side effects) for the child's `fchdir`.
fn open_dir(path: &Path) -> Result<OwnedFd, ExecError> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::ACCESS | rustix::io::Errno::PERM => ExecError::SetupPathUnavailable {
            path: path.display().to_string(),
            reason: "permission denied: the account cannot enter it".into(),
        },
        _ => ExecError::NoSetupPath(path.display().to_string()),
    })
}

/// The file name stem of a process's output files.
pub fn output_stem(key: &ProcKey) -> String {
    crate::util::safe_file_stem(&key.namespace, &key.name)
}

/// Two write descriptors on `/dev/null` (stdout and stderr of a command whose output is not
/// captured).
fn null_pair() -> Result<(OwnedFd, OwnedFd), ExecError> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|source| ExecError::Output {
                path: "/dev/null".into(),
                source,
            })
    };
    Ok((open()?, open()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_account_resolves() {
        let a = resolve_account("").unwrap();
        assert_eq!(a.uid, nix::unistd::getuid().as_raw());
        assert!(matches!(
            resolve_account("no-such-user-xyz"),
            Err(ExecError::NoSuchAccount(_))
        ));
    }
}
