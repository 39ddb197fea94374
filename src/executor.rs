//! Running control commands: `sh -c CMD` in `setup_path`, as the configured account, in its
//! own session, with a clean environment, its output appended to the process's output file.
//!
//! * Identity: the account is resolved in the parent (uid, gid, supplementary groups from
//!   `getgrouplist`, HOME and SHELL from passwd); the child only makes syscalls
//!   ([`crate::sys::install_pre_exec`]). `HOME`, `USER`, `LOGNAME`, `SHELL` and a fixed `PATH`
//!   are set for the account, never inherited from root.
//! * Output: stdout and stderr go to `STATE/output/<key>.log` (append), never to a pipe: a
//!   daemon started by the command inherits them and would hold a pipe open forever. The part
//!   a command wrote is read back, bounded, once its shell exits.
//! * Waiting: the reaper reports the shell's exit; on `op_timeout` the command's whole process
//!   group (its session) is killed with SIGKILL.
//! * Off the runtime: `setup_path` (a caller's path, perhaps on a hung mount) is opened as a
//!   directory on the [`FsPool`], and the child enters it with `fchdir` (no path lookup after
//!   the fork); the account lookup (NSS) and the fork run on the pool too, never on an async
//!   worker.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::fspool::FsPool;
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
    #[error("setup_path {0} does not exist or is not a directory")]
    NoSetupPath(String),
    #[error("setup_path {path}: {reason}")]
    SetupPathUnavailable { path: String, reason: String },
    #[error("cannot open the output file {path}: {source}")]
    Output {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the command: {0}")]
    Spawn(#[source] std::io::Error),
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
}

/// A command that was started.
#[derive(Debug)]
pub struct Spawned {
    /// The shell's pid (also its process group and session id).
    pub pid: i32,
    /// Resolves when the reaper collects the shell.
    pub exit: tokio::sync::oneshot::Receiver<ExitInfo>,
    /// Where its output goes and the offset it started at.
    pub output: PathBuf,
    pub output_start: u64,
    /// Boot-clock ticks just before the spawn: every process it forks starts at or after this.
    pub spawned_ticks: u64,
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
    output_dir: PathBuf,
    max_output: usize,
    umask: u32,
    agent_uid: u32,
}

/// Output files larger than this are trimmed: the newest half stays, the half before it
/// moves to `<stem>.log.1`, so a process's output never takes more than twice this on disk
/// (plus what it writes between two checks).
pub const MAX_OUTPUT_FILE: u64 = 16 << 20;

/// How often a running command's output size is checked.
const OUTPUT_CHECK: Duration = Duration::from_millis(100);

impl Executor {
    pub fn new(
        reaper: Reaper,
        fs: FsPool,
        output_dir: PathBuf,
        max_output: usize,
        umask: u32,
    ) -> Executor {
        Executor {
            reaper,
            fs,
            output_dir,
            max_output,
            umask,
            agent_uid: nix::unistd::getuid().as_raw(),
        }
    }

    /// The output file of a process.
    pub fn output_path(&self, key: &ProcKey) -> PathBuf {
        self.output_dir.join(format!(
            "{}.log",
            crate::util::safe_file_stem(&key.namespace, &key.name)
        ))
    }

    fn open_output(&self, key: &ProcKey) -> Result<(File, PathBuf), ExecError> {
        let path = self.output_path(key);
        let err = |source| ExecError::Output {
            path: path.display().to_string(),
            source,
        };
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(err)?;
        trim_if_large(&path);
        Ok((f, path))
    }

    /// Resolve the identity a command runs with (an NSS lookup: blocking).
    fn identity(&self, account: &str) -> Result<(SpawnIdentity, Account), ExecError> {
        let acct = resolve_account(account)?;
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
            },
            acct,
        ))
    }

    /// Start `sh -c CMD` in `setup_path` and return once it runs. The directory is opened on
    /// the file-system pool (a hung mount fails this start after a deadline and delays
    /// nothing else), then the account is resolved and the command forked on the pool.
    pub async fn spawn(&self, req: &CommandRequest) -> Result<Spawned, ExecError> {
        let cwd = req.cwd.clone();
        let unavailable = |reason: String| ExecError::SetupPathUnavailable {
            path: req.cwd.display().to_string(),
            reason,
        };
        let dir = self
            .fs
            .run(&req.cwd, crate::fspool::PROBE_DEADLINE, move || {
                open_dir(&cwd)
            })
            .await
            .map_err(|e| unavailable(e.to_string()))??;
        let this = self.clone();
        let req = req.clone();
        self.fs
            .run_unkeyed("spawning a command", Duration::from_secs(30), move || {
                this.spawn_in(&req, dir)
            })
            .await
            .map_err(|e| ExecError::Spawn(std::io::Error::other(e.to_string())))?
    }

    /// The blocking part of [`Executor::spawn`]: `dir` is the opened `setup_path`.
    fn spawn_in(&self, req: &CommandRequest, dir: OwnedFd) -> Result<Spawned, ExecError> {
        let (mut ident, acct) = self.identity(&req.account)?;
        ident.cwd = Some(std::sync::Arc::new(dir));
        // A state directory that is full or read-only must not stop supervision: without an
        // output file the command still runs, its output discarded.
        let (mut out, path) = match self.open_output(&req.key) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(process = %req.key, error = %e, "running {} without capturing its output", req.label);
                let null = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open("/dev/null")
                    .map_err(|source| ExecError::Output {
                        path: "/dev/null".into(),
                        source,
                    })?;
                (null, PathBuf::from("/dev/null"))
            }
        };
        let _ = writeln!(
            out,
            "--- {} {} as {}: {}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            req.label,
            acct.name,
            req.command
        );
        let start = out.seek(SeekFrom::End(0)).unwrap_or(0);
        let err_out = out.try_clone().map_err(ExecError::Spawn)?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&req.command)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", &acct.home)
            .env("USER", &acct.name)
            .env("LOGNAME", &acct.name)
            .env(
                "SHELL",
                if acct.shell.is_empty() {
                    "/bin/sh"
                } else {
                    &acct.shell
                },
            )
            .env("PROCAGENT_NAMESPACE", &req.key.namespace)
            .env("PROCAGENT_NAME", &req.key.name)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err_out));
        for var in ["LANG", "LC_ALL", "TZ"] {
            if let Ok(v) = std::env::var(var) {
                cmd.env(var, v);
            }
        }
        for (k, v) in &req.env {
            cmd.env(k, v);
        }
        sys::install_pre_exec(&mut cmd, ident);
        let spawned_ticks = crate::procinfo::now_ticks_floor();
        let child = cmd.spawn().map_err(ExecError::Spawn)?;
        let pid = child.id() as i32;
        // Never wait on the Child: the reaper collects it.
        drop(child);
        let exit = self.reaper.wait_for(pid);
        Ok(Spawned {
            pid,
            exit,
            output: path,
            output_start: start,
            spawned_ticks,
        })
    }

    /// Kill a command's whole process group (its session), if the shell is not reaped yet.
    pub fn kill_group(&self, pid: i32) {
        // While the shell is unreaped its pid, and so its group id, cannot be reused; each
        // member is signalled through a pidfd after checking, with the pidfd held, that it
        // is still in the group (twice: a member may have been forking during the first).
        self.reaper.with_unreaped(pid, || {
            for _ in 0..2 {
                for p in crate::procinfo::pids_in_group(pid) {
                    let Ok(fd) = sys::pidfd_open(p) else { continue };
                    let same = crate::procinfo::read_stat(p)
                        .is_some_and(|s| s.pgrp == pid && !s.is_exited());
                    if same {
                        let _ = sys::pidfd_signal(
                            std::os::fd::AsFd::as_fd(&fd),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        });
    }

    /// Trim a running command's output file when it is over the bound; its output then
    /// starts where the kept part begins.
    fn bound_output(&self, sp: &mut Spawned) {
        if let Some(kept_from) = trim_if_large(&sp.output) {
            sp.output_start = kept_from;
        }
    }

    /// Trim every output file that is over the bound (daemons keep writing to the output
    /// file they inherited from their start command; called from housekeeping).
    pub fn bound_outputs(&self) {
        let Ok(dir) = std::fs::read_dir(&self.output_dir) else {
            return;
        };
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                trim_if_large(&p);
            }
        }
    }

    /// The bounded output a spawned command has written so far.
    pub fn read_output(&self, sp: &Spawned) -> String {
        read_span(&sp.output, sp.output_start, self.max_output)
    }

    /// Run a command to completion (or until its timeout, when its group is killed).
    pub async fn run(&self, req: &CommandRequest) -> Result<Finished, ExecError> {
        let mut sp = self.spawn(req).await?;
        self.wait(&mut sp, req.timeout).await
    }

    /// Wait for a spawned command, killing its group at `timeout`. While it runs, its output
    /// file is kept under the size bound (a command flooding its output cannot fill the disk).
    pub async fn wait(&self, sp: &mut Spawned, timeout: Duration) -> Result<Finished, ExecError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut check = tokio::time::interval(OUTPUT_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (exit, timed_out) = loop {
            tokio::select! {
                r = &mut sp.exit => break (r.unwrap_or(ExitInfo::Unknown), false),
                _ = tokio::time::sleep_until(deadline) => {
                    self.kill_group(sp.pid);
                    let exit = tokio::time::timeout(Duration::from_secs(5), &mut sp.exit)
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .unwrap_or(ExitInfo::Unknown);
                    break (exit, true);
                }
                _ = check.tick() => self.bound_output(sp),
            }
        };
        self.bound_output(sp);
        Ok(Finished {
            exit,
            timed_out,
            output: self.read_output(sp),
        })
    }
}

/// Open `setup_path` as a directory (`O_PATH`, no side effects) for the child's `fchdir`.
fn open_dir(path: &Path) -> Result<OwnedFd, ExecError> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|_| ExecError::NoSetupPath(path.display().to_string()))
}

/// Trims and reads of output files take turns: a read in the middle of a trim (between
/// its truncation and its rewrite) would see an empty file.
static OUTPUT_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn output_turn() -> std::sync::MutexGuard<'static, ()> {
    OUTPUT_TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read `[start, end)` of a file, keeping at most `max` bytes from the end.
pub fn read_span(path: &Path, start: u64, max: usize) -> String {
    let _turn = output_turn();
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let end = f.metadata().map(|m| m.len()).unwrap_or(0);
    if end <= start {
        return String::new();
    }
    let from = start.max(end.saturating_sub(max as u64));
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::with_capacity((end - from) as usize);
    let _ = f.take(end - from).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    if from > start {
        format!("[... {} bytes cut ...]\n{}", from - start, text)
    } else {
        text
    }
}

/// Trim `path` when it is over [`MAX_OUTPUT_FILE`]; returns the offset where the kept
/// output starts.
fn trim_if_large(path: &Path) -> Option<u64> {
    let len = std::fs::symlink_metadata(path).ok()?.len();
    if len <= MAX_OUTPUT_FILE {
        return None;
    }
    trim_file(path, MAX_OUTPUT_FILE / 2)
}

/// Keep only the last `keep` bytes of a file, in place (writers with O_APPEND keep working);
/// the `keep` bytes before them go to `<file>.1`, replacing it. Returns the offset where the
/// kept bytes start in the trimmed file.
fn trim_file(path: &Path, keep: u64) -> Option<u64> {
    let _turn = output_turn();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let len = f.metadata().ok()?.len();
    if len <= keep {
        return None;
    }
    let older_from = len.saturating_sub(keep.saturating_mul(2));
    let mut older = Vec::new();
    f.seek(SeekFrom::Start(older_from)).ok()?;
    (&mut f)
        .take(len - keep - older_from)
        .read_to_end(&mut older)
        .ok()?;
    let mut tail = Vec::new();
    (&mut f).take(keep).read_to_end(&mut tail).ok()?;
    let rotated = path.with_extension("log.1");
    let _ = std::fs::remove_file(&rotated);
    if let Ok(mut r) = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&rotated)
    {
        let _ = r.write_all(&older);
    }
    const NOTE: &[u8] = b"[... older output moved to .log.1 ...]\n";
    f.set_len(0).ok()?;
    f.seek(SeekFrom::Start(0)).ok()?;
    f.write_all(NOTE).ok()?;
    f.write_all(&tail).ok()?;
    Some(NOTE.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_span_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.log");
        std::fs::write(&p, "headerHELLO WORLD").unwrap();
        assert_eq!(read_span(&p, 6, 100), "HELLO WORLD");
        let t = read_span(&p, 6, 5);
        assert!(t.ends_with("WORLD") && t.contains("6 bytes cut"), "{t}");
        assert_eq!(read_span(&p, 100, 5), "");
    }

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
