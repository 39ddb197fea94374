//! The one module that talks to the kernel below the safe crates.
//!
//! Everything that needs `unsafe`, or a raw syscall that the rest of the agent must not call
//! directly, lives here behind small safe functions:
//!
//! * pidfds: open, signal, reap (`waitid(P_PIDFD)`), exit info (`PIDFD_GET_INFO`, Linux 6.15+),
//!   and registration with tokio's reactor;
//! * the child-subreaper flag and the reaper's `waitid` calls (peek at an exited child with
//!   `WNOWAIT`, then reap that pid);
//! * the child's setup ([`ChildSetup`]) that puts a command in its own session and switches
//!   its identity (setgroups, setgid, setuid, umask), async-signal-safe because every id was
//!   resolved in the parent: after the `clone3` of [`spawn_command`] (posix_spawn-like,
//!   `CLONE_VM | CLONE_VFORK`, optionally inside its cgroup with `CLONE_INTO_CGROUP`), or as
//!   the `pre_exec` hook of a `Command` (the output keeper, and the fallback without clone3);
//! * registration of owned descriptors (pidfds, inotify) with tokio's reactor;
//! * the boot-time clock, to compare with `/proc/PID/stat` start times;
//! * [`as_account_fs`]: the calling thread alone takes on an account's file-system identity
//!   (fsuid, fsgid, supplementary groups) while the agent opens a path on its behalf;
//! * the allocators' settings: jemalloc's ([`JEMALLOC_CONF`], read back by
//!   [`allocator_settings`]) and glibc's, which the C code (SQLite, NSS) still allocates from.
//!
//! Every `unsafe` block carries a `// SAFETY:` note. The crate root denies `unsafe_code`; this
//! module alone allows it.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How a process ended, as far as the agent could learn it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum ExitInfo {
    /// Exited normally with this code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
    /// Not our child and the kernel gave no exit information (before Linux 6.15, or the
    /// parent had not reaped it yet).
    Unknown,
}

impl ExitInfo {
    /// Decode a raw `wait(2)` status word.
    pub fn from_raw_wait_status(status: i32) -> ExitInfo {
        if libc::WIFEXITED(status) {
            ExitInfo::Code(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            ExitInfo::Signal(libc::WTERMSIG(status))
        } else {
            ExitInfo::Unknown
        }
    }

    /// True for a clean `exit(0)`.
    pub fn success(&self) -> bool {
        matches!(self, ExitInfo::Code(0))
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit code {c}"),
            ExitInfo::Signal(s) => write!(f, "signal {s} ({})", signal_name(*s)),
            ExitInfo::Unknown => write!(f, "exit status unknown"),
        }
    }
}

/// A short name for a signal number (SIGKILL, SIGTERM, ...).
pub fn signal_name(sig: i32) -> &'static str {
    match nix::sys::signal::Signal::try_from(sig) {
        Ok(s) => s.as_str(),
        Err(_) => "unknown",
    }
}

/// Open a non-blocking pidfd for `pid`. `ESRCH` means the process is gone.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid must be positive"))?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).map_err(io::Error::from)
}

/// Has the process behind `fd` exited (its pidfd is readable)? Never waits.
pub fn pidfd_exited(fd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // An error (EINTR) says nothing: take it as not exited, the caller checks again later.
    poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0)
}

/// Send `sig` through a pidfd. Cannot hit a recycled pid. `ESRCH` means it already exited.
pub fn pidfd_signal(fd: BorrowedFd<'_>, sig: nix::sys::signal::Signal) -> io::Result<()> {
    let sig = rustix::process::Signal::from_named_raw(sig as i32)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unsupported signal"))?;
    rustix::process::pidfd_send_signal(fd, sig).map_err(io::Error::from)
}

/// If the process behind `fd` is our child and has exited, reap it now and return how it
/// ended. `Ok(None)` when it is still running; `Err(ECHILD)` when it is not our child (or
/// was reaped already by someone else).
pub fn pidfd_try_reap(fd: BorrowedFd<'_>) -> io::Result<Option<ExitInfo>> {
    use rustix::process::{WaitId, WaitIdOptions, waitid};
    let status = waitid(
        WaitId::PidFd(fd),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    )
    .map_err(io::Error::from)?;
    Ok(status.map(|s| {
        if let Some(code) = s.exit_status()
            && s.exited()
        {
            return ExitInfo::Code(code);
        }
        match s.terminating_signal() {
            Some(sig) => ExitInfo::Signal(sig),
            None => ExitInfo::Unknown,
        }
    }))
}

/// Layout of `struct pidfd_info` up to `exit_code` (include/uapi/linux/pidfd.h, Linux 6.15).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

const PIDFD_INFO_EXIT: u64 = 1 << 3;
/// `_IOWR(0xFF, 11, struct pidfd_info)` with the 64-byte layout above.
const PIDFD_GET_INFO: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;

/// The exit status the kernel kept for a reaped process (Linux 6.15+, after EPOLLHUP).
/// `None` when the kernel is older, the process is not reaped yet, or the info is missing.
pub fn pidfd_exit_info(fd: BorrowedFd<'_>) -> Option<ExitInfo> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: `fd` is a valid open pidfd for the duration of the call, and `info` is a live,
    // properly aligned `#[repr(C)]` buffer whose size is encoded in the request number, so the
    // kernel writes at most `size_of::<PidfdInfo>()` bytes into it. Kernels that do not know
    // the request return ENOTTY/EINVAL and write nothing.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            PIDFD_GET_INFO as _,
            &mut info as *mut PidfdInfo,
        )
    };
    if rc != 0 || info.mask & PIDFD_INFO_EXIT == 0 {
        return None;
    }
    Some(ExitInfo::from_raw_wait_status(info.exit_code))
}

/// Register a pidfd with tokio's reactor so that `readable()` resolves when the process exits.
pub fn async_pidfd(fd: Arc<OwnedFd>) -> io::Result<AsyncFd<Arc<OwnedFd>>> {
    // SAFETY: the `AsyncFd` holds a strong reference to the `OwnedFd` until it is dropped, and
    // an `OwnedFd` is only closed when its last reference goes, so the raw fd stays open and
    // refers to the same pidfd for the `AsyncFd`'s whole lifetime.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// Register a descriptor the agent owns (an inotify watch, say) with tokio's reactor for
/// readability.
pub fn async_owned(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` takes the `OwnedFd` itself, so the raw fd stays open, and refers
    // to the same open file, until the `AsyncFd` is dropped (which deregisters it first).
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// Make the agent a child subreaper: orphans of the processes it starts (double-forking
/// daemons) are reparented to the agent, so their exit statuses reach our reaper.
pub fn set_child_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// One non-blocking `waitid(idtype, id, WEXITED | WNOHANG | extra)`: the pid and exit of an
/// exited child, `Ok(None)` when none has exited, `Err(ECHILD)` when there is no such child.
/// Decoded from the raw `siginfo_t`, so a child killed by a real-time signal is reported
/// too (nix's decoder fails on those, which would leave the zombie unreaped for good).
fn waitid_exited(
    idtype: libc::idtype_t,
    id: libc::id_t,
    extra: libc::c_int,
) -> io::Result<Option<(i32, ExitInfo)>> {
    // SAFETY: `siginfo_t` is plain old data for which all-zero bytes are a valid value (and
    // `si_pid` must read 0 when WNOHANG finds nothing, which zeroing guarantees).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `siginfo_t` for the whole call; waitid writes only
    // into it and keeps no reference after returning.
    let rc = unsafe { libc::waitid(idtype, id, &mut info, libc::WEXITED | libc::WNOHANG | extra) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded, so `info` holds a SIGCHLD siginfo (or zeroes under WNOHANG
    // with nothing to report), for which the kernel fills `si_pid` and `si_status`.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    let exit = match info.si_code {
        libc::CLD_EXITED => ExitInfo::Code(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => ExitInfo::Signal(status),
        _ => ExitInfo::Unknown,
    };
    Ok(Some((pid, exit)))
}

/// Peek at one exited child without reaping it (`waitid(P_ALL, WEXITED|WNOHANG|WNOWAIT)`):
/// it stays a zombie, so its pid cannot be reused and its `/proc/PID/stat` (its start time)
/// can still be read. `Ok(None)` when no child has exited, `Err(ECHILD)` with no children.
pub fn peek_exited() -> io::Result<Option<(i32, ExitInfo)>> {
    waitid_exited(libc::P_ALL, 0, libc::WNOWAIT)
}

/// Reap exited child `pid` (`waitid(P_PID, pid, WEXITED|WNOHANG)`): `Ok(None)` when it has
/// not exited, `Err(ECHILD)` when it is not (or no longer) our child.
pub fn reap_exited(pid: i32) -> io::Result<Option<ExitInfo>> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ECHILD));
    }
    Ok(waitid_exited(libc::P_PID, pid as libc::id_t, 0)?.map(|(_, e)| e))
}

/// The identity a spawned command switches to, resolved in the parent (no NSS lookups may
/// happen after fork in a multi-threaded process).
#[derive(Debug, Clone)]
pub struct SpawnIdentity {
    /// `Some` when the command must switch accounts (the agent runs as root and the account
    /// differs from the agent's own); `None` keeps the agent's identity.
    pub switch_to: Option<(u32, u32, Vec<u32>)>,
    /// The umask the command starts with.
    pub umask: u32,
    /// The open-file limit (soft, hard) the command starts with: the one the agent itself
    /// was started with, before it raised its own for pidfds.
    pub nofile: Option<(u64, u64)>,
    /// The working directory, opened in the parent: the child enters it with `fchdir`, so no
    /// path is looked up after the fork (a hung mount cannot hold the fork).
    pub cwd: Option<Arc<OwnedFd>>,
    /// The `cgroup.procs` file of the cgroup the command runs in (containment), opened for
    /// writing in the parent: the child writes `0` into it (moving itself) before it drops
    /// privileges, so everything it starts begins there.
    pub cgroup_procs: Option<Arc<OwnedFd>>,
    /// The directory of that cgroup (opened `O_RDONLY|O_DIRECTORY`), for creating the
    /// command inside it (`clone3` with `CLONE_INTO_CGROUP`).
    pub cgroup_dir: Option<Arc<OwnedFd>>,
    /// The command resets its `oom_score_adj` to 0 when the agent's is negative (every
    /// managed command; not the output keeper, which is part of the agent).
    pub reset_oom: bool,
}

impl SpawnIdentity {
    /// The file-system identity of the account switched to, for the paths the agent opens on
    /// the command's behalf (`None`: the command keeps the agent's identity).
    pub fn fs_identity(&self) -> Option<FsIdentity> {
        self.switch_to
            .as_ref()
            .map(|(uid, gid, groups)| FsIdentity {
                uid: *uid,
                gid: *gid,
                groups: groups.clone(),
            })
    }
}

/// What a child does between the fork and the exec, prepared in the parent (no lookups,
/// no allocation in the child): own session (so the agent can signal the whole tree and no
/// terminal signal reaches it), its cgroup when not placed at creation, the oom shield
/// reset, umask, open-file limit, then supplementary groups, gid, uid in that order, and
/// last the working directory (entered as the account).
pub struct ChildSetup {
    groups: Vec<libc::gid_t>,
    ids: Option<(libc::uid_t, libc::gid_t)>,
    mask: nix::sys::stat::Mode,
    nofile: Option<(u64, u64)>,
    cwd: Option<Arc<OwnedFd>>,
    cgroup_procs: Option<Arc<OwnedFd>>,
    reset_oom: bool,
}

impl ChildSetup {
    pub fn new(ident: SpawnIdentity) -> ChildSetup {
        ChildSetup {
            groups: ident
                .switch_to
                .as_ref()
                .map(|(_, _, g)| g.clone())
                .unwrap_or_default(),
            ids: ident.switch_to.as_ref().map(|(u, g, _)| (*u, *g)),
            mask: nix::sys::stat::Mode::from_bits_truncate(ident.umask as libc::mode_t),
            nofile: ident.nofile,
            cwd: ident.cwd,
            cgroup_procs: ident.cgroup_procs,
            reset_oom: ident.reset_oom && agent_oom_shielded(),
        }
    }

    /// Run in the child, before exec: direct syscalls only, on values prepared in the parent.
    /// The identity switch uses the raw syscalls, never libc's `setuid` family: those
    /// broadcast the change to every thread libc knows of, which in a child created by
    /// `clone3` (sharing or copying the agent's memory) are the agent's own threads.
    fn run(&self) -> io::Result<()> {
        self.run_with(ChildFds {
            cwd: self.cwd.as_ref().map(|d| d.as_raw_fd()),
            procs: self.cgroup_procs.as_ref().map(|d| d.as_raw_fd()),
        })
    }

    /// [`ChildSetup::run`] with its working directory and `cgroup.procs` found at `fds`
    /// (the same files, under the numbers of the child's own descriptor table).
    fn run_with(&self, fds: ChildFds) -> io::Result<()> {
        if self.reset_oom {
            // The agent's own shield (OOMScoreAdjust=) is not for what it runs. Raising the
            // value needs no privilege; a failure leaves the inherited one.
            if let Ok(fd) = nix::fcntl::open(
                c"/proc/self/oom_score_adj",
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ) {
                let _ = nix::unistd::write(&fd, b"0");
            }
        }
        if let Some(procs) = fds.procs {
            // SAFETY: a descriptor number of this child's table, open until its exec.
            let procs = unsafe { BorrowedFd::borrow_raw(procs) };
            nix::unistd::write(procs, b"0").map_err(io::Error::from)?;
        }
        nix::unistd::setsid().map_err(io::Error::from)?;
        // SAFETY: umask only sets this process's file mode creation mask.
        unsafe {
            libc::umask(self.mask.bits());
        }
        if let Some((soft, hard)) = self.nofile {
            // Best effort: a failure leaves the agent's (higher) limit, which is harmless.
            let _ = nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                soft,
                hard,
            );
        }
        if let Some((uid, gid)) = self.ids {
            if uid == libc::uid_t::MAX || gid == libc::gid_t::MAX {
                // -1 means "unchanged" to setresuid: it would keep root.
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let check = |r: libc::c_long| {
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            // SAFETY: raw setgroups/setresgid/setresuid on this (single-threaded) child: the
            // group list is a slice of gid_t that lives in the parent's frame (borrowed, not
            // freed before the exec), its length passed with it.
            unsafe {
                check(libc::syscall(
                    libc::SYS_setgroups,
                    self.groups.len(),
                    self.groups.as_ptr(),
                ))?;
                check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
                check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
            }
        }
        // Entered as the account (after the switch): the kernel checks the account's
        // search permission on the directory itself, as a `cd` by the account would.
        if let Some(dir) = fds.cwd {
            // SAFETY: a descriptor number of this child's table, open until its exec.
            let dir = unsafe { BorrowedFd::borrow_raw(dir) };
            nix::unistd::fchdir(dir).map_err(io::Error::from)?;
        }
        Ok(())
    }
}

/// The descriptors [`ChildSetup::run_with`] uses, by number in the child's table.
#[derive(Clone, Copy)]
struct ChildFds {
    cwd: Option<libc::c_int>,
    procs: Option<libc::c_int>,
}

/// Install the child's setup ([`ChildSetup`]) as the `pre_exec` hook of `cmd`.
pub fn install_pre_exec(cmd: &mut Command, ident: SpawnIdentity) {
    let setup = ChildSetup::new(ident);
    // SAFETY: the hook runs in the forked child before exec. It only makes direct syscalls
    // (open and write of /proc/self/oom_score_adj through a static C string, write of the
    // cgroup.procs fd, setsid, fchdir, umask, setrlimit, setgroups, setgid, setuid) on
    // values computed before the fork; it does not allocate (the group vector was built in
    // the parent and is only borrowed), take locks, or touch state shared with other
    // threads, so it is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || setup.run());
    }
}

/// `CLONE_INTO_CGROUP` of `clone3(2)` (bit 33: wider than libc's `c_int` constant).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of `clone3(2)` (the fields up to `cgroup`, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Why [`spawn_command`] started nothing.
#[derive(Debug)]
pub enum CloneError {
    /// `clone3` itself failed (ENOSYS, EINVAL on a kernel without `CLONE_INTO_CGROUP`, ...).
    Clone(io::Error),
    /// The child failed in its setup or exec (and has exited).
    Child(io::Error),
}

/// The stack a `CLONE_VM` child runs on until its exec: its own, never the parent's.
const CHILD_STACK: usize = 128 * 1024;

/// Child stacks alive (one per thread that spawned, freed when the thread ends).
static LIVE_STACKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A thread's stack for its `CLONE_VM` children: mapped with a guard page below it (an
/// overflow faults instead of writing the agent's memory), unmapped when the thread ends.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    fn map() -> io::Result<ChildStack> {
        let len = CHILD_STACK + page_size();
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the lowest page of the mapping made above becomes the guard.
        if unsafe { libc::mprotect(base, page_size(), libc::PROT_NONE) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping what was mapped above.
            unsafe { libc::munmap(base, len) };
            return Err(e);
        }
        LIVE_STACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(ChildStack { base, len })
    }

    /// (lowest usable address, size): above the guard page; the top is page-aligned.
    fn usable(&self) -> (u64, u64) {
        (self.base as u64 + page_size() as u64, CHILD_STACK as u64)
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, used by no child any more (the thread that owns
        // it is ending, and its children ran only while it waited).
        unsafe { libc::munmap(self.base, self.len) };
        LIVE_STACKS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// What the child of [`spawn_command`] needs, prepared in the parent and only read by the
/// child (its `err` slot aside).
struct ChildArgs<'a> {
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    stdio: [libc::c_int; 3],
    setup: &'a ChildSetup,
    /// The errno of a failed setup or exec, written by the child before it exits (the
    /// memory is shared with `CLONE_VM`; with a copy, the child writes `err_fd` instead).
    err: &'a std::sync::atomic::AtomicI32,
    err_fd: libc::c_int,
    /// The setup's descriptors, by number in the child's table.
    fds: ChildFds,
    /// Created sharing the agent's descriptor table (`CLONE_FILES`): the child's first act is
    /// to take a private copy of the descriptors below this number only ([`SpawnSlots`]);
    /// -1: created with a copy of the whole table.
    unshare_below: libc::c_int,
}

/// Descriptors a command's child reaches its own files through: per group, its stdin,
/// stdout, stderr, working directory, `cgroup.procs` and (a fork) the error pipe.
const SLOT_FDS: usize = 6;
/// Spawns that can use slots at once (more wait for nothing: they take the plain way).
const SLOT_GROUPS: usize = 16;
/// Or'ed into a child's errno when it could not take its private descriptor table.
const UNSHARE_FAILED: i32 = 1 << 30;

/// Low descriptor numbers reserved at the agent's start ([`reserve_spawn_slots`]) through
/// which a command's child receives its own descriptors.
///
/// A child created with a copy of the agent's descriptor table (8 per supervised process:
/// at a thousand processes, 8000) pays for every one of them twice: once when the table is
/// copied at the clone and once when its exec closes them all (close-on-exec; each close
/// reaches the file and its inode). Measured at N = 1000: 2.5 to 3.4 ms from the clone to
/// the exec of `/bin/sh`, most of a restart. Instead the child is created *sharing* the
/// table (`CLONE_FILES`) while its parent thread waits (`CLONE_VFORK`), the files it needs
/// are placed in this spawn's group of slots, all below [`SpawnSlots::below`], and the
/// child's first syscall on descriptors, `close_range(below, ~0, CLOSE_RANGE_UNSHARE)`,
/// gives it a private table of the descriptors below that number only (Linux 5.9+; the
/// kernel copies a table in words of 64 descriptors, so the bound is a multiple of 64,
/// padded with more `/dev/null` copies): the agent's first few (close-on-exec) and the
/// slots. Every slot is a close-on-exec copy of `/dev/null` between spawns.
///
/// Two kernel bugs of this path are kept out: a bound that is not a multiple of 64 made
/// kernels before 5.18 (d888c83fcec7) copy descriptors between the bound and the end of its
/// word without marking them open, so the exec never closed them (the padding); and kernels
/// without 9a2fa1472083 (CVE-2024-45025, August 2024) copied the "word full" marks of the
/// words above the bound, so a command that opened more than the bound's worth of files
/// was handed numbers thousands higher (and EMFILE under a normal limit). The reservation
/// tries that very case in a child ([`unshare_works`]) and uses no slots where it fails.
struct SpawnSlots {
    fds: Vec<OwnedFd>,
    /// A `/dev/null` the slots are reset to.
    idle: OwnedFd,
    /// A multiple of 64 above every slot.
    below: libc::c_int,
    free: std::sync::Mutex<Vec<usize>>,
    /// The `/dev/null` copies between the highest slot and `below`, held only to keep the
    /// agent's own descriptors above the bound.
    _pad: Vec<OwnedFd>,
}

static SLOTS: std::sync::OnceLock<SpawnSlots> = std::sync::OnceLock::new();
/// Set when slots cannot be used: the reservation's trial failed, or a child's unshare was
/// refused as unsupported (ENOSYS, EINVAL, EPERM: a kernel before 5.9, a seccomp filter).
static SLOTS_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reserve the descriptor slots [`spawn_command`] hands a command its files through (see
/// [`SpawnSlots`]). Call it once, first thing (the slots take the lowest free numbers, and
/// the fewer descriptors below them the less each child copies); later calls do nothing.
/// Without it, children are created with a copy of the whole table, as before. `Ok(false)`:
/// reserved, but this kernel failed the trial, so no slot is used.
pub fn reserve_spawn_slots() -> io::Result<bool> {
    let in_use = || !SLOTS_OFF.load(std::sync::atomic::Ordering::Relaxed);
    if SLOTS.get().is_some() {
        return Ok(in_use());
    }
    let idle = rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut fds = Vec::with_capacity(SLOT_FDS * SLOT_GROUPS);
    for _ in 0..SLOT_FDS * SLOT_GROUPS {
        // Above the standard descriptors: a child's dup2 onto 0, 1 and 2 must never
        // overwrite a slot it has yet to read.
        fds.push(rustix::io::fcntl_dupfd_cloexec(&idle, 3)?);
    }
    let mut below = fds.iter().map(|f| f.as_raw_fd()).max().unwrap_or(2) + 1;
    let mut pad = Vec::new();
    while below % 64 != 0 {
        let fd = rustix::io::fcntl_dupfd_cloexec(&idle, 3)?;
        below = below.max(fd.as_raw_fd() + 1);
        pad.push(fd);
    }
    let works = unshare_works(&idle, fds[0].as_raw_fd(), below);
    let slots = SpawnSlots {
        fds,
        idle,
        below,
        free: std::sync::Mutex::new((0..SLOT_GROUPS).collect()),
        _pad: pad,
    };
    // Reserved meanwhile by another thread: these are dropped (closed) here.
    if SLOTS.set(slots).is_ok() && !works {
        SLOTS_OFF.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(in_use())
}

/// Whether a child created sharing this table (`CLONE_FILES | CLONE_VFORK`) gets, from
/// `close_range(below, ~0, CLOSE_RANGE_UNSHARE)`, a private table whose lowest free number
/// at or above `below` is `below` itself while the 64 descriptors above the bound are all
/// open here (the case CVE-2024-45025's kernels get wrong). The child answers through a pipe
/// whose write end sits in `slot` (below the bound); no answer (the unshare refused, a
/// seccomp filter that kills, no clone3) is a no. Blocking for a fork of the agent: call it
/// once, at the start, while the agent is small.
fn unshare_works(idle: &OwnedFd, slot: libc::c_int, below: libc::c_int) -> bool {
    let Ok((r, w)) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) else {
        return false;
    };
    // The word above the bound full, for the trial: new /dev/null copies at the lowest free
    // numbers from the bound on (only numbers the kernel hands out: another thread's
    // descriptors there are left alone and count as open) until one lands past the word.
    let mut full = Vec::new();
    loop {
        let Ok(fd) = rustix::io::fcntl_dupfd_cloexec(idle, below) else {
            return false;
        };
        if fd.as_raw_fd() >= below + 64 {
            break;
        }
        full.push(fd);
    }
    // SAFETY: dup3 onto a slot reserved by the caller and used by nothing yet.
    if unsafe { libc::dup3(w.as_raw_fd(), slot, libc::O_CLOEXEC) } < 0 {
        return false;
    }
    let mut clone = CloneArgs {
        flags: (libc::CLONE_FILES | libc::CLONE_VFORK) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork; this thread waits (CLONE_VFORK) until the
    // child has exited. The child makes only raw syscalls on integers (async-signal-safe),
    // then _exit: it never returns into Rust code of this process.
    let pid = unsafe { fork_clone3(&mut clone) };
    if pid == 0 {
        // SAFETY: in the child; see above.
        unsafe {
            let unshared = libc::syscall(
                libc::SYS_close_range,
                below as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) == 0;
            if unshared && libc::fcntl(slot, libc::F_DUPFD_CLOEXEC, below) == below {
                libc::write(slot, b"1".as_ptr().cast(), 1);
            }
            libc::_exit(0);
        }
    }
    // The child has exited (it was a vfork).
    reset_slot(idle, slot);
    drop(full);
    drop(w);
    if pid < 0 {
        return false;
    }
    let mut status = 0;
    // SAFETY: waitpid on the child made above, status a local. Another reaper of this
    // process may have collected it first (ECHILD): the answer is in the pipe anyway.
    unsafe {
        libc::waitpid(pid as libc::pid_t, &mut status, 0);
    }
    let mut b = [0u8; 1];
    matches!(rustix::io::read(&r, &mut b), Ok(1)) && b[0] == b'1'
}

/// A group of slots held by one spawn; reset to `/dev/null` and given back when dropped.
struct SlotLease {
    slots: &'static SpawnSlots,
    group: usize,
}

impl SpawnSlots {
    fn lease() -> Option<SlotLease> {
        if SLOTS_OFF.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let slots = SLOTS.get()?;
        let group = slots.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(SlotLease { slots, group })
    }
}

impl SlotLease {
    fn fd(&self, k: usize) -> libc::c_int {
        self.slots.fds[self.group * SLOT_FDS + k].as_raw_fd()
    }

    /// Put a close-on-exec copy of `src` in slot `k`; its number.
    fn put(&self, k: usize, src: libc::c_int) -> io::Result<libc::c_int> {
        let slot = self.fd(k);
        // SAFETY: dup3 onto a slot this lease holds (its previous file, a /dev/null copy,
        // is closed by the call); `src` is a descriptor the caller keeps open meanwhile.
        if unsafe { libc::dup3(src, slot, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(slot)
    }
}

/// Put `idle` (/dev/null) back in `slot`: the copy the slot held (a pipe end, a
/// directory) is closed. Only for a slot whose user is done with it (its lease's, or the
/// trial's, child has its own table).
fn reset_slot(idle: &OwnedFd, slot: libc::c_int) {
    // SAFETY: dup3 onto a reserved slot number (always open: the call replaces its file and
    // cannot fail with EMFILE); a failure would leave the copy open until the slot's next
    // use.
    unsafe {
        libc::dup3(idle.as_raw_fd(), slot, libc::O_CLOEXEC);
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        for k in 0..SLOT_FDS {
            reset_slot(&self.slots.idle, self.fd(k));
        }
        self.slots
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.group);
    }
}

/// Start `argv` with `envp`, `stdio` as its descriptors 0, 1 and 2 and `setup` run before
/// the exec, inside the cgroup whose directory is `cgroup` when given (`CLONE_INTO_CGROUP`,
/// Linux 5.7+, so it never has to migrate there: a migration waits for an RCU grace period).
/// Returns the child's pid once it has exec'd, or why it could not ([`CloneError`]: on a
/// `Clone` error the caller may fall back to a fork, or to a migration into the cgroup).
///
/// A command that keeps the agent's account is created like `posix_spawn` creates one (on
/// x86_64): `clone3` with `CLONE_VM | CLONE_VFORK` on a stack of its own, so no page of the
/// agent is copied or write-protected (a fork of the multi-threaded agent made every thread
/// fault and flush TLBs across CPUs after each fork: at a thousand starts that was most of
/// the agent's time). The calling thread waits until the child has exec'd or failed; other
/// threads run on. A command that switches accounts is forked (its own copy of the memory):
/// a credential change on the agent's shared memory would make the agent non-dumpable, or,
/// with `fs.suid_dumpable` 1, let the target account trace the child, and with it the
/// agent's memory, until the exec.
pub fn spawn_command(
    argv: &[std::ffi::CString],
    envp: &[std::ffi::CString],
    stdio: [BorrowedFd<'_>; 3],
    setup: &ChildSetup,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<i32, CloneError> {
    spawn_with(argv, envp, stdio, setup, cgroup, true)
}

/// [`spawn_command`], through a group of slots when `slots` and one is free.
fn spawn_with(
    argv: &[std::ffi::CString],
    envp: &[std::ffi::CString],
    stdio: [BorrowedFd<'_>; 3],
    setup: &ChildSetup,
    cgroup: Option<BorrowedFd<'_>>,
    slots: bool,
) -> Result<i32, CloneError> {
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    if argv_p.len() < 2 {
        return Err(CloneError::Child(io::Error::from_raw_os_error(
            libc::EINVAL,
        )));
    }
    let cgroup_flags = cgroup.map_or(0, |_| CLONE_INTO_CGROUP);
    let cgroup_fd = cgroup.map_or(0, |fd| fd.as_raw_fd() as u64);
    let err = std::sync::atomic::AtomicI32::new(0);
    let stdio = [
        stdio[0].as_raw_fd(),
        stdio[1].as_raw_fd(),
        stdio[2].as_raw_fd(),
    ];
    let mut args = ChildArgs {
        argv: &argv_p,
        envp: &envp_p,
        stdio,
        setup,
        err: &err,
        err_fd: -1,
        fds: ChildFds {
            cwd: setup.cwd.as_ref().map(|d| d.as_raw_fd()),
            procs: setup.cgroup_procs.as_ref().map(|d| d.as_raw_fd()),
        },
        unshare_below: -1,
    };
    // The child's files through this spawn's slots, when one is free (see SpawnSlots).
    let lease = if slots { SpawnSlots::lease() } else { None };
    let leased = lease.is_some();
    let mut flags = cgroup_flags;
    if let Some(l) = &lease {
        for (k, fd) in stdio.iter().enumerate() {
            args.stdio[k] = l.put(k, *fd).map_err(CloneError::Clone)?;
        }
        if let Some(fd) = args.fds.cwd {
            args.fds.cwd = Some(l.put(3, fd).map_err(CloneError::Clone)?);
        }
        if let Some(fd) = args.fds.procs {
            args.fds.procs = Some(l.put(4, fd).map_err(CloneError::Clone)?);
        }
        args.unshare_below = l.slots.below;
        flags |= libc::CLONE_FILES as u64;
    }
    #[cfg(target_arch = "x86_64")]
    let r = if setup.ids.is_none() {
        vfork_child_of(&args, flags, cgroup_fd)
    } else {
        fork_child(&mut args, lease.as_ref(), flags, cgroup_fd)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let r = fork_child(&mut args, lease.as_ref(), flags, cgroup_fd);
    drop(lease);
    match r {
        Err(CloneError::Child(e))
            if leased && e.raw_os_error().is_some_and(|c| c & UNSHARE_FAILED != 0) =>
        {
            // The child could not take its private table and exited before touching
            // anything. Unsupported here (a kernel before 5.9, a seccomp filter): from now on
            // children copy the whole table. Anything else (ENOMEM, EMFILE): this once.
            let errno = e.raw_os_error().unwrap_or(0) & !UNSHARE_FAILED;
            if [libc::ENOSYS, libc::EINVAL, libc::EPERM].contains(&errno) {
                tracing::warn!(
                    error = %io::Error::from_raw_os_error(errno),
                    "close_range(CLOSE_RANGE_UNSHARE) refused: commands get a copy of every descriptor of the agent"
                );
                SLOTS_OFF.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            spawn_with(argv, envp, stdio_fds(&stdio), setup, cgroup, false)
        }
        r => r,
    }
}

/// `clone3(clone)` as a fork (no `CLONE_VM`, no stack): the child's pid, 0 in the child,
/// -1 with errno set.
///
/// # Safety
/// `clone` must not ask for `CLONE_VM`; in the child (0) only async-signal-safe code may run
/// (the agent is multi-threaded), ending in an exec or `_exit`.
unsafe fn fork_clone3(clone: &mut CloneArgs) -> libc::c_long {
    // SAFETY: see the function's contract.
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            clone as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    }
}

/// Borrow descriptor numbers that the caller of [`spawn_command`] keeps open.
fn stdio_fds<'a>(fds: &'a [libc::c_int; 3]) -> [BorrowedFd<'a>; 3] {
    // SAFETY: the numbers come from the `BorrowedFd`s `spawn_with` was given, which
    // outlive its call (and so this retry within it).
    fds.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) })
}

/// The `CLONE_VM | CLONE_VFORK` clone of [`spawn_command`].
#[cfg(target_arch = "x86_64")]
fn vfork_child_of(
    args: &ChildArgs<'_>,
    cgroup_flags: u64,
    cgroup_fd: u64,
) -> Result<i32, CloneError> {
    thread_local! {
        static STACK: std::cell::OnceCell<ChildStack> = const { std::cell::OnceCell::new() };
    }
    STACK.with(|cell| {
        let stack = match cell.get() {
            Some(s) => s,
            None => {
                let s = ChildStack::map().map_err(CloneError::Clone)?;
                cell.get_or_init(|| s)
            }
        };
        let (lowest, size) = stack.usable();
        let mut clone = CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | cgroup_flags,
            exit_signal: libc::SIGCHLD as u64,
            stack: lowest,
            stack_size: size,
            cgroup: cgroup_fd,
            ..CloneArgs::default()
        };
        // No handler of the agent may run in the child, which shares the agent's memory:
        // every signal (libc's internal ones too) stays blocked from before the clone until
        // the child has reset the handlers; it unblocks them just before its exec.
        let blocked = block_all_signals();
        // SAFETY: clone3 with CLONE_VM | CLONE_VFORK and a stack of its own (this thread's
        // mapping, used by no one else while this thread is suspended until the child
        // exec'd or exited). The child starts on that stack in the asm below, which calls
        // `vfork_child` at once and never returns to Rust code of this frame; the parent
        // resumes after the `syscall` with the pid (or -errno) in rax. rcx and r11 are
        // clobbered by `syscall`; r12/r13 carry the child's entry and argument across it.
        let pid: i64 = unsafe {
            let ret: i64;
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                // The child: on its own stack (page-aligned top), no frame to return to.
                "xor ebp, ebp",
                "mov rdi, r12",
                "call r13",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") &mut clone as *mut CloneArgs,
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") args as *const ChildArgs as usize,
                in("r13") vfork_child as *const () as usize,
                lateout("rcx") _,
                lateout("r11") _,
            );
            ret
        };
        restore_signals(blocked);
        if pid < 0 {
            return Err(CloneError::Clone(io::Error::from_raw_os_error(-pid as i32)));
        }
        let e = args.err.load(std::sync::atomic::Ordering::Acquire);
        if e != 0 {
            // The child failed before its exec and has exited (127); the reaper collects it.
            return Err(CloneError::Child(io::Error::from_raw_os_error(e)));
        }
        Ok(pid as i32)
    })
}

/// The kernel's signal set (64 signals), for the raw syscalls below.
type KernelSigset = u64;

/// Block every signal on this thread, libc's internal ones included (pthread_sigmask
/// leaves those out); returns the mask to restore.
fn block_all_signals() -> KernelSigset {
    let all: KernelSigset = !0;
    let mut old: KernelSigset = 0;
    // SAFETY: rt_sigprocmask on this thread with two 8-byte sets of this frame.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const KernelSigset,
            &mut old as *mut KernelSigset,
            std::mem::size_of::<KernelSigset>(),
        );
    }
    old
}

fn restore_signals(old: KernelSigset) {
    // SAFETY: restores this thread's mask saved by `block_all_signals`.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &old as *const KernelSigset,
            std::ptr::null_mut::<KernelSigset>(),
            std::mem::size_of::<KernelSigset>(),
        );
    }
}

/// The kernel's `struct sigaction` on x86_64 (not libc's, whose mask is 128 bytes).
#[cfg(target_arch = "x86_64")]
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: KernelSigset,
}

/// The entry of the `CLONE_VM` child, on its own stack, every signal blocked.
#[cfg(target_arch = "x86_64")]
extern "C" fn vfork_child(args: *const ChildArgs<'_>) -> ! {
    // SAFETY: `args` points at the parent's `ChildArgs`, alive while the parent waits
    // (CLONE_VFORK); the child only reads it and stores into its atomic `err`.
    let args = unsafe { &*args };
    // SAFETY: raw rt_sigaction on this child's own handler table (a copy: no
    // CLONE_SIGHAND), on structs of this frame: every caught signal (libc's internal
    // ones too) goes back to its default, so no handler of the agent can run on the shared
    // memory once the mask is emptied in `exec_child`.
    unsafe {
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: KernelSigaction = std::mem::zeroed();
            let got = libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                std::mem::size_of::<KernelSigset>(),
            );
            if got == 0 && old.handler != libc::SIG_DFL && old.handler != libc::SIG_IGN {
                let dfl: KernelSigaction = std::mem::zeroed();
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    std::mem::size_of::<KernelSigset>(),
                );
            }
        }
        exec_child(args)
    }
}

/// The fork-like clone of [`spawn_command`]: the child gets a copy of the address space;
/// failures come back through a pipe.
fn fork_child(
    args: &mut ChildArgs<'_>,
    lease: Option<&SlotLease>,
    flags: u64,
    cgroup_fd: u64,
) -> Result<i32, CloneError> {
    let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| CloneError::Clone(e.into()))?;
    args.err_fd = err_w.as_raw_fd();
    let mut flags = flags;
    if let Some(l) = lease {
        args.err_fd = l.put(5, err_w.as_raw_fd()).map_err(CloneError::Clone)?;
        // Sharing the table, the child must have its own copy before this thread goes on
        // (and the lease's slots are reset): it waits until the exec, as a vfork does.
        flags |= libc::CLONE_VFORK as u64;
    }
    let mut clone = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_fd,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM or a stack is a fork: the child gets a copy of this
    // address space with one thread. In the child only `exec_child` runs, which makes direct
    // syscalls on values prepared above and never returns.
    let pid = unsafe { fork_clone3(&mut clone) };
    if pid < 0 {
        return Err(CloneError::Clone(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the child of the clone3 above.
        unsafe { exec_child(args) }
    }
    drop(err_w);
    if let Some(l) = lease {
        // The slot's copy of the write end too, or the read below would never see its end
        // (the child, exec'd or exited: CLONE_VFORK, has its own table).
        reset_slot(&l.slots.idle, l.fd(5));
    }
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match rustix::io::read(&err_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            // Cannot tell how the child fared: it runs (or ran) on, the reaper collects it.
            Err(_) => break,
        }
    }
    if got == 4 {
        // The child failed before its exec and has exited (127); the reaper collects it.
        return Err(CloneError::Child(io::Error::from_raw_os_error(
            i32::from_ne_bytes(buf),
        )));
    }
    Ok(pid as i32)
}

/// The child's side of [`spawn_command`]: the signal mask emptied and SIGPIPE back to its
/// default, the standard descriptors, the setup, the exec; on a failure the errno goes to
/// the parent (`err`, or `err_fd`) and the child exits 127.
///
/// # Safety
/// Only in the child of a clone, before exec.
unsafe fn exec_child(args: &ChildArgs<'_>) -> ! {
    let fail = |e: i32| -> ! {
        args.err.store(e, std::sync::atomic::Ordering::Release);
        if args.err_fd >= 0 {
            let b = e.to_ne_bytes();
            // SAFETY: write is async-signal-safe; `b` lives on this stack.
            unsafe {
                libc::write(args.err_fd, b.as_ptr().cast(), b.len());
            }
        }
        // SAFETY: _exit ends this child only (it is its own process).
        unsafe { libc::_exit(127) }
    };
    if args.unshare_below >= 0 {
        // First, before any descriptor changes: created sharing the agent's table, the child
        // takes a private one holding only the descriptors below `unshare_below` (see
        // SpawnSlots). Should this fail, the table is still the agent's: touch nothing.
        // SAFETY: close_range on this child's (shared) table, which the kernel copies (the
        // descriptors below the bound) before it closes anything, so the agent's stay open.
        let r = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                args.unshare_below as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            )
        };
        if r != 0 {
            // SAFETY: errno of this thread, just set by the failed syscall.
            fail(unsafe { *libc::__errno_location() } | UNSHARE_FAILED);
        }
    }
    // SAFETY: async-signal-safe calls on values of this frame: SIGPIPE back to its default
    // (the agent ignores it; what it runs must not), the standard descriptors, then an
    // emptied signal mask.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        for (i, fd) in args.stdio.iter().enumerate() {
            if libc::dup2(*fd, i as libc::c_int) < 0 {
                fail(*libc::__errno_location());
            }
        }
    }
    if let Err(e) = args.setup.run_with(args.fds) {
        fail(e.raw_os_error().unwrap_or(libc::EIO));
    }
    // SAFETY: as above; then `argv` and `envp` are NUL-terminated arrays of pointers to
    // NUL-terminated strings owned by the parent's frame.
    unsafe {
        let set: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::execve(args.argv[0], args.argv.as_ptr(), args.envp.as_ptr());
        fail(*libc::__errno_location())
    }
}

/// An account's file-system identity: what the kernel checks when the agent opens a path for
/// a command that runs as that account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsIdentity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Run `f` with the calling thread's fsuid, fsgid and supplementary groups set to `who`'s,
/// and restore root's after it (also when it panics), so that a path a caller named (a
/// `setup_path`, a pid file) is reached with the permissions of the account the definition
/// runs as, never with root's. Only this thread changes: the raw `setgroups`, `setfsgid` and
/// `setfsuid` syscalls act on the calling task (glibc's `setgroups` would change every
/// thread of the agent). A non-zero fsuid also drops the file-system capabilities
/// (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`, ...) from the thread's effective set; setting
/// it back to 0 raises them again. Needs `CAP_SETUID`/`CAP_SETGID` (an agent running as
/// root); the error when the switch did not take, before `f` runs. `None` (the agent's own
/// identity) runs `f` as it is.
pub fn as_account_fs<R>(who: Option<&FsIdentity>, f: impl FnOnce() -> R) -> io::Result<R> {
    let Some(who) = who else {
        return Ok(f());
    };
    if who.uid == u32::MAX || who.gid == u32::MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let saved = nix::unistd::getgroups().map_err(io::Error::from)?;
    let saved: Vec<libc::gid_t> = saved.into_iter().map(|g| g.as_raw()).collect();
    let mut guard = FsRestore {
        caps: None,
        uid: fs_id(libc::SYS_setfsuid),
        gid: fs_id(libc::SYS_setfsgid),
        groups: saved,
    };
    set_thread_groups(&who.groups)?;
    // SAFETY: setfsgid/setfsuid take one integer and change only the calling thread's
    // credentials; their return value is the previous id whatever happened, so success is
    // checked by reading the id back.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, who.gid as libc::c_long);
        libc::syscall(libc::SYS_setfsuid, who.uid as libc::c_long);
    }
    if fs_id(libc::SYS_setfsgid) != who.gid || fs_id(libc::SYS_setfsuid) != who.uid {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    // Not CAP_SYS_PTRACE either (nor any other): with it the thread would follow
    // `/proc/PID/cwd`, `root` and `fd/N` of any process, which the account may not.
    guard.caps = Some(thread_caps_keep_only_setid()?);
    let r = f();
    drop(guard);
    Ok(r)
}

/// `struct __user_cap_header_struct` of capget(2)/capset(2).
#[repr(C)]
#[derive(Clone, Copy)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct` of capget(2)/capset(2) (two of them, version 3).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;
const CAP_SETGID_BIT: u32 = 1 << 6;
const CAP_SETUID_BIT: u32 = 1 << 7;

/// Lower the calling thread's effective capabilities to CAP_SETUID and CAP_SETGID (what
/// putting the ids back needs): a non-zero fsuid drops only the file-system ones, and
/// CAP_SYS_PTRACE would still let the thread follow `/proc/PID/cwd`, `root` and `fd/N` of
/// any process, which the account may not. Returns the sets to put back (an error: capget
/// failed, nothing changed).
fn thread_caps_keep_only_setid() -> io::Result<[CapData; 2]> {
    let mut h = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: capget writes two `CapData` (version 3) for the calling thread (pid 0).
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut CapHeader, d.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = d;
    d[0].effective &= CAP_SETUID_BIT | CAP_SETGID_BIT;
    d[1].effective = 0;
    thread_caps_set(&d);
    Ok(old)
}

/// Set the calling thread's capability sets (capset acts on the calling thread alone); a
/// thread whose capabilities cannot be set as wanted must not go on.
fn thread_caps_set(d: &[CapData; 2]) {
    let mut h = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads two `CapData` (version 3) and changes only the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut CapHeader, d.as_ptr()) };
    if r != 0 {
        eprintln!("procagentd: cannot set a thread's capabilities; aborting");
        std::process::abort();
    }
}

/// The calling thread's current fsuid (`SYS_setfsuid`) or fsgid (`SYS_setfsgid`): an id of
/// -1 is never valid, so the call changes nothing and returns the current one.
fn fs_id(nr: libc::c_long) -> u32 {
    // SAFETY: an invalid id changes nothing; the call only returns the current id.
    unsafe { libc::syscall(nr, -1 as libc::c_long) as u32 }
}

/// The calling thread's supplementary groups, set with the raw syscall (per thread).
fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    let list: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: `list` is a valid array of `list.len()` gid_t for the duration of the call; the
    // kernel copies it.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, list.len(), list.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts a thread's file-system identity back when dropped.
struct FsRestore {
    /// The thread's capability sets before they were lowered (put back first).
    caps: Option<[CapData; 2]>,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

impl Drop for FsRestore {
    fn drop(&mut self) {
        if let Some(c) = self.caps.take() {
            thread_caps_set(&c);
        }
        // SAFETY: as in `as_account_fs`; ids the thread held a moment ago.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, self.uid as libc::c_long);
            libc::syscall(libc::SYS_setfsgid, self.gid as libc::c_long);
        }
        let groups_back = set_thread_groups(&self.groups).is_ok();
        if !groups_back
            || fs_id(libc::SYS_setfsuid) != self.uid
            || fs_id(libc::SYS_setfsgid) != self.gid
        {
            // A pool thread that kept an account's identity would do the agent's later
            // file-system work as that account: never go on.
            eprintln!("procagentd: cannot restore a thread's file-system identity; aborting");
            std::process::abort();
        }
    }
}

/// jemalloc's settings (procagentd's global allocator), read by jemalloc when it starts,
/// before `main`: one arena and no per-thread caches, freed pages given back after about a
/// second without waiting in a second ("muzzy") stage. The agent's threads are few and
/// mostly idle; measured at N = 1000 (docs/performance.md), jemalloc's defaults (an arena
/// per thread group, thread caches) kept 24 MiB PSS as glibc did, and these 19-20 MiB: the
/// thread caches alone held about 4 MiB.
const JEMALLOC_SETTINGS: &std::ffi::CStr =
    c"narenas:1,tcache:false,dirty_decay_ms:1000,muzzy_decay_ms:0";

/// The `malloc_conf` symbol jemalloc looks for (under the `_rjem_` prefix of the sys crate),
/// pointing at [`JEMALLOC_SETTINGS`].
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: the pointer is that of a 'static NUL-terminated literal; jemalloc only reads
    // the C string behind it.
    Some(unsafe { &*JEMALLOC_SETTINGS.as_ptr() });

/// jemalloc's option `opt.NAME` as it runs with it (`T`: the option's C type), or None if
/// it has no such option of that size.
fn jemalloc_opt<T: Copy + Default>(name: &std::ffi::CStr) -> Option<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: `name` is NUL-terminated; `value` and `len` describe a buffer of `len` bytes,
    // which mallctl fills only when the option's size is `len` (EINVAL otherwise); no new
    // value is given (null, 0).
    let r = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            (&raw mut value).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (r == 0 && len == std::mem::size_of::<T>()).then_some(value)
}

/// The settings jemalloc runs with, read back from it (for the agent's start-up log; the
/// reference to [`JEMALLOC_CONF`] also keeps that symbol in the binary).
pub fn allocator_settings() -> String {
    let _ = &JEMALLOC_CONF;
    let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    format!(
        "jemalloc: narenas {}, tcache {}, dirty_decay_ms {}, muzzy_decay_ms {}",
        show(jemalloc_opt::<u32>(c"opt.narenas").map(|v| v.to_string())),
        show(jemalloc_opt::<u8>(c"opt.tcache").map(|v| (v != 0).to_string())),
        show(jemalloc_opt::<isize>(c"opt.dirty_decay_ms").map(|v| v.to_string())),
        show(jemalloc_opt::<isize>(c"opt.muzzy_decay_ms").map(|v| v.to_string())),
    )
}

/// Limit glibc's malloc to two arenas (instead of eight per core): the agent's threads
/// are few and mostly idle, and each extra arena kept a few hundred KiB to MiBs of freed
/// memory resident (about 3 MiB of RSS at a thousand processes, bench/compare.sh, when the
/// agent's own allocations went there too; now only the C code's do: SQLite, NSS). A no-op
/// with another libc. Call before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt(M_ARENA_MAX) only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Give the allocators' free memory back to the kernel: jemalloc's unused dirty pages of
/// every arena at once (`arena.<all>.purge`; it would within about a second anyway,
/// [`JEMALLOC_SETTINGS`]) and glibc's (`malloc_trim(0)`: free pages in the middle of every
/// arena too, not only at its top; what the C code freed). A large answer (a
/// `sync_proc_status` page of a thousand processes) would leave several MiB of RSS behind.
/// Blocking for a moment: call it off the async workers.
pub fn trim_heap() {
    // MALLCTL_ARENAS_ALL (4096): every arena.
    // SAFETY: a NUL-terminated name, no value read or written; purging only returns pages
    // jemalloc holds unused.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns memory that is free in the allocator to the kernel;
    // no memory in use is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Nanoseconds of `CLOCK_BOOTTIME`: the clock `/proc/PID/stat` start times are counted in.
pub fn boottime_nanos() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// Whether this kernel lets us open and poll pidfds (5.3+, non-blocking 5.10+).
pub fn pidfd_supported() -> bool {
    pidfd_open(std::process::id() as i32).is_ok()
}

/// The open-file limit the agent was started with, (soft, hard), once
/// [`raise_nofile_limit`] ran.
static ORIGINAL_NOFILE: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Raise the agent's own soft open-file limit to its hard limit (capped at 1<<20): it holds
/// one pidfd per watched process, so 1024 would cap it near a thousand processes. The
/// commands it spawns get the original limit back ([`SpawnIdentity::nofile`]). Returns
/// (original soft, new soft).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let _ = ORIGINAL_NOFILE.set((soft, hard));
    let want = hard.min(1 << 20);
    if want > soft {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).map_err(io::Error::from)?;
    }
    Ok((soft, want.max(soft)))
}

/// Whether the agent itself is shielded from the OOM killer (`OOMScoreAdjust=` below 0 in
/// its unit): its commands must not inherit that, so each resets its own to 0 before exec.
/// Read once.
pub fn agent_oom_shielded() -> bool {
    static SHIELDED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SHIELDED.get_or_init(|| {
        std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .is_some_and(|v| v < 0)
    })
}

/// The limit spawned commands should get (the agent's original one), if it was raised.
pub fn original_nofile() -> Option<(u64, u64)> {
    ORIGINAL_NOFILE.get().copied()
}

/// Mark every descriptor from 3 up that the agent inherited (from its parent's shell, say)
/// close-on-exec, so no managed process inherits it. Returns how many were changed.
pub fn mark_inherited_fds_cloexec() -> usize {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|fd| *fd > 2)
        .collect();
    let mut n = 0;
    for raw in fds {
        // SAFETY: `raw` was listed in /proc/self/fd a moment ago and is only borrowed for
        // the two fcntl calls below; if it was closed meanwhile (the read_dir handle itself),
        // fcntl fails with EBADF and nothing happens. Nothing here closes or takes ownership.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let inherited =
            fcntl(fd, FcntlArg::F_GETFD).is_ok_and(|flags| flags & libc::FD_CLOEXEC == 0);
        if inherited && fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).is_ok() {
            n += 1;
        }
    }
    n
}

/// Review tests of [`spawn_command`]'s `CLONE_VM | CLONE_VFORK` child: concurrent spawns
/// under allocation and signal load, the identity switch, failures before the exec, and
/// what the shared address space must not change in the agent.
#[cfg(test)]
mod vfork_tests {
    use super::*;
    use std::ffi::CString;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    static USR1_SEEN: AtomicUsize = AtomicUsize::new(0);
    static USR1_ELSEWHERE: AtomicBool = AtomicBool::new(false);
    static TEST_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

    extern "C" fn on_usr1(_: libc::c_int) {
        // SAFETY: getpid is async-signal-safe.
        if unsafe { libc::getpid() } != TEST_PID.load(Ordering::Relaxed) {
            USR1_ELSEWHERE.store(true, Ordering::Relaxed);
        }
        USR1_SEEN.fetch_add(1, Ordering::Relaxed);
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn ident(switch_to: Option<(u32, u32, Vec<u32>)>, cwd: Option<OwnedFd>) -> SpawnIdentity {
        SpawnIdentity {
            switch_to,
            umask: 0o027,
            nofile: None,
            cwd: cwd.map(Arc::new),
            cgroup_procs: None,
            cgroup_dir: None,
            reset_oom: false,
        }
    }

    /// Run `sh -c script` with `env` through [`spawn_command`]; returns the pid (or the
    /// error) and what it wrote on stdout.
    fn run_sh(
        script: &str,
        env: &[String],
        setup: &ChildSetup,
    ) -> (Result<i32, CloneError>, String) {
        let argv: Vec<CString> = ["/bin/sh", "-c", script]
            .iter()
            .map(|s| CString::new(*s).unwrap())
            .collect();
        run_argv(&argv, env, setup)
    }

    fn run_argv(
        argv: &[CString],
        env: &[String],
        setup: &ChildSetup,
    ) -> (Result<i32, CloneError>, String) {
        let envp: Vec<CString> = env
            .iter()
            .map(|s| CString::new(s.as_str()).unwrap())
            .collect();
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let res = spawn_command(
            argv,
            &envp,
            [null.as_fd(), w.as_fd(), w.as_fd()],
            setup,
            None,
        );
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        (res, out)
    }

    /// Reap `pid` (ours), returning its wait status.
    fn reap(pid: i32) -> i32 {
        let mut status = 0;
        // SAFETY: waitpid on our own child, status is a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid, "waitpid({pid})");
        status
    }

    /// Children of this process named `comm` that exited and wait to be reaped.
    fn zombie_children(comm: &str) -> Vec<i32> {
        let me = std::process::id().to_string();
        let mut z = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let named = stat
                .split_once('(')
                .is_some_and(|(_, r)| r.starts_with(&format!("{comm})")));
            if named && f.first() == Some(&"Z") && f.get(1) == Some(&me.as_str()) {
                z.push(pid);
            }
        }
        z
    }

    fn status_field(path: &str, field: &str) -> String {
        let st = std::fs::read_to_string(path).unwrap();
        st.lines()
            .find(|l| l.starts_with(field))
            .unwrap_or("")
            .trim_start_matches(field)
            .trim()
            .to_string()
    }

    /// Every thread of this process: (Uid, Gid, Groups) lines.
    fn thread_ids() -> Vec<(String, String, String)> {
        let mut v = Vec::new();
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let p = t.path().join("status");
            let p = p.to_str().unwrap();
            if std::fs::metadata(p).is_err() {
                continue; // the thread ended meanwhile
            }
            v.push((
                status_field(p, "Uid:"),
                status_field(p, "Gid:"),
                status_field(p, "Groups:"),
            ));
        }
        v
    }

    /// This kernel's release, and whether it is 6.11 or later (mainline has had both fixes
    /// the slots' trial looks for since then: there the trial must pass).
    fn linux_with_unshare_fixes() -> (String, bool) {
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let mut v = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let fixed = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 11);
        (release, fixed)
    }

    /// The reservation's trial: yes on this kernel (when it has the fixes), and no when the
    /// child's answer cannot come (its pipe end above the bound is not in its private table):
    /// the trial answers only what the child saw.
    #[test]
    fn the_unshare_trial_answers_what_the_child_saw() {
        let idle = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let low = rustix::io::fcntl_dupfd_cloexec(&idle, 3).unwrap();
        let bound = (low.as_raw_fd() / 64 + 1) * 64;
        let (release, fixed) = linux_with_unshare_fixes();
        if fixed {
            assert!(
                unshare_works(&idle, low.as_raw_fd(), bound),
                "Linux {release}"
            );
        } else {
            eprintln!("not asserting the trial's yes on Linux {release} (before 6.11)");
        }
        let high = rustix::io::fcntl_dupfd_cloexec(&idle, bound + 200).unwrap();
        assert!(!unshare_works(&idle, high.as_raw_fd(), bound));
    }

    /// This process's descriptors without close-on-exec.
    fn inheritable_fds() -> Vec<i32> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&fd| {
                // SAFETY: F_GETFD only reads the flags of a descriptor number.
                let fl = unsafe { libc::fcntl(fd, libc::F_GETFD) };
                fl >= 0 && fl & libc::FD_CLOEXEC == 0
            })
            .collect()
    }

    /// A command is not handed a copy of every descriptor the agent holds (eight per
    /// supervised process: copying them at the clone and closing them at the exec was most of
    /// a restart at a thousand processes): with the slots reserved, the child of a process
    /// holding 3000 descriptors starts with a small table (`FDSize`, the size of the table
    /// the kernel made for it), holding its stdio and nothing else, in its own working
    /// directory; the same when it switches accounts (the fork, as root), and the slots are
    /// /dev/null again afterwards (no pipe end of a command is kept in them).
    #[test]
    fn a_command_gets_a_small_descriptor_table_of_its_own() {
        if !reserve_spawn_slots().unwrap() {
            let (release, fixed) = linux_with_unshare_fixes();
            assert!(
                !fixed,
                "the trial of close_range(CLOSE_RANGE_UNSHARE) failed on Linux {release}"
            );
            eprintln!(
                "skipping: this kernel failed the trial of close_range(CLOSE_RANGE_UNSHARE), so no slot is used"
            );
            return;
        }
        let many: Vec<OwnedFd> = (0..3000)
            .map(|_| {
                rustix::fs::open(
                    "/dev/null",
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .unwrap()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut cases = vec![None];
        if is_root() {
            cases.push(Some((65534, 65534, vec![])));
        } else {
            eprintln!("skipping the account-switching case: not root");
        }
        for switch in cases {
            let cwd = rustix::fs::open(
                dir.path(),
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            let setup = ChildSetup::new(ident(switch.clone(), Some(cwd)));
            let (res, out) = run_sh(
                "grep FDSize /proc/self/status; pwd; exec ls /proc/self/fd",
                &[],
                &setup,
            );
            let pid = res.unwrap();
            assert_eq!(reap(pid), 0, "{switch:?}: {out}");
            let mut lines = out.lines();
            let size: usize = lines
                .next()
                .and_then(|l| l.strip_prefix("FDSize:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{switch:?}: {out}"));
            assert!(
                size < 1024,
                "{switch:?}: the command's descriptor table has room for {size} (the agent's was copied): {out}"
            );
            assert_eq!(lines.next(), dir.path().to_str(), "{switch:?}: {out}");
            let mut fds: Vec<i32> = lines.filter_map(|l| l.parse().ok()).collect();
            fds.sort();
            // ls's own (its stdio and the directory it reads), and what this test process
            // itself inherited without close-on-exec from whoever started it, if it sits
            // below the slots (above them, not even that reaches a command now).
            let below = SLOTS.get().unwrap().below;
            let mut want = vec![0, 1, 2, 3];
            want.extend(
                inheritable_fds()
                    .into_iter()
                    .filter(|&fd| fd > 3 && fd < below),
            );
            want.sort();
            assert_eq!(fds, want, "{switch:?}: the command's descriptors: {out}");
        }
        drop(many);
        let slots = SLOTS.get().unwrap();
        let idle = rustix::fs::fstat(&slots.idle).unwrap();
        assert_eq!(
            slots.below % 64,
            0,
            "the bound is a whole number of 64-descriptor words"
        );
        for fd in &slots.fds {
            assert!(fd.as_raw_fd() < slots.below);
            let st = rustix::fs::fstat(fd).unwrap();
            assert_eq!(
                (st.st_dev, st.st_ino, st.st_rdev),
                (idle.st_dev, idle.st_ino, idle.st_rdev)
            );
        }
    }

    /// Several threads spawn at once while others allocate and signals (SIGUSR1 with a
    /// handler, SIGCHLD) hit the process: every child sees exactly its own argv, env, cwd
    /// and umask, exits 0, and no handler ever runs outside this process.
    #[test]
    fn concurrent_spawns_under_allocation_and_signals() {
        TEST_PID.store(std::process::id() as i32, Ordering::Relaxed);
        // SAFETY: installs a handler that only touches atomics and calls getpid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_usr1 as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = Vec::new();
        for _ in 0..2 {
            let stop = stop.clone();
            load.push(std::thread::spawn(move || {
                let mut keep: Vec<Vec<u8>> = Vec::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    keep.push(vec![n as u8; 1 + (n * 7919) % 200_000]);
                    if keep.len() > 64 {
                        keep.drain(..32);
                    }
                    n += 1;
                }
                n
            }));
        }
        {
            let stop = stop.clone();
            load.push(std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: signals to this process; SIGUSR1 has a handler, SIGCHLD is
                    // ignored by default or handled by whatever installed one.
                    unsafe {
                        libc::kill(libc::getpid(), libc::SIGUSR1);
                        libc::kill(libc::getpid(), libc::SIGCHLD);
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    n += 1;
                }
                n
            }));
        }
        let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let spawners: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(t, d)| {
                let path = d.path().to_path_buf();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        let cwd = rustix::fs::open(
                            &path,
                            rustix::fs::OFlags::RDONLY
                                | rustix::fs::OFlags::DIRECTORY
                                | rustix::fs::OFlags::CLOEXEC,
                            rustix::fs::Mode::empty(),
                        )
                        .unwrap();
                        let setup = ChildSetup::new(ident(None, Some(cwd)));
                        let tag = format!("t{t}-i{i}");
                        let (res, out) = run_sh(
                            "printf '%s|%s|%s|%s' \"$TAG\" \"$0\" \"$(pwd)\" \"$(umask)\"",
                            &[format!("TAG={tag}"), "PATH=/usr/bin:/bin".into()],
                            &setup,
                        );
                        let pid = match res {
                            Ok(p) => p,
                            Err(e) => panic!("spawn {tag}: {e:?}"),
                        };
                        let status = reap(pid);
                        assert!(
                            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                            "{tag}: status {status:#x}, out {out:?}"
                        );
                        let want = format!("{tag}|/bin/sh|{}|0027", path.display());
                        assert_eq!(out, want);
                    }
                })
            })
            .collect();
        for s in spawners {
            s.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let counts: Vec<usize> = load.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(counts.iter().all(|n| *n > 0), "{counts:?}");
        assert!(USR1_SEEN.load(Ordering::Relaxed) > 0);
        assert!(
            !USR1_ELSEWHERE.load(Ordering::Relaxed),
            "the agent's SIGUSR1 handler ran in another process (a CLONE_VM child)"
        );
        // The parent still allocates and spawns normally.
        let v: Vec<u64> = (0..1_000_000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_999_500_000);
    }

    /// A setup that fails (fchdir into a file) reports its errno, leaves one child that
    /// exited 127 (for the reaper), and nothing else.
    #[test]
    fn failed_setup_reports_errno_and_exits_127() {
        // The failed child keeps this thread's name: its zombie is told from others by it.
        const NAME: &str = "vfk-failsetup";
        // SAFETY: PR_SET_NAME with a NUL-terminated name of this frame.
        unsafe { libc::prctl(libc::PR_SET_NAME, c"vfk-failsetup".as_ptr()) };
        let before = zombie_children(NAME);
        let file = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let setup = ChildSetup::new(ident(None, Some(file)));
        let (res, out) = run_sh("echo ran", &[], &setup);
        match res {
            Err(CloneError::Child(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR)),
            other => panic!("{other:?}"),
        }
        assert_eq!(out, "", "the command must not have run");
        // The failed child exits right away; give the kernel a moment to make it a zombie.
        let mut new = Vec::new();
        for _ in 0..200 {
            new = zombie_children(NAME)
                .into_iter()
                .filter(|p| !before.contains(p))
                .collect();
            if !new.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(new.len(), 1, "{new:?}");
        let status = reap(new[0]);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 127);
    }

    /// An exec that fails reports ENOENT and the child exits 127.
    #[test]
    fn failed_exec_reports_enoent() {
        let setup = ChildSetup::new(ident(None, None));
        let argv = [CString::new("/nonexistent/procagent-review").unwrap()];
        let (res, _) = run_argv(&argv, &[], &setup);
        match res {
            Err(CloneError::Child(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
            other => panic!("{other:?}"),
        }
    }

    /// Root: the command runs as nobody with exactly the supplementary groups given, while
    /// every thread of this process keeps uid 0, gid 0 and its groups.
    #[test]
    fn switches_identity_in_the_child_only() {
        if !is_root() {
            eprintln!("skipped: not root");
            return;
        }
        let agent_before = thread_ids();
        let groups = vec![65534, 100, 4242];
        let setup = ChildSetup::new(ident(Some((65534, 65534, groups)), None));
        let (res, out) = run_sh("cat /proc/self/status", &[], &setup);
        let pid = res.unwrap();
        assert_eq!(reap(pid) & 0xffff, 0);
        let field = |f: &str| {
            out.lines()
                .find(|l| l.starts_with(f))
                .unwrap()
                .trim_start_matches(f)
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(field("Uid:"), ["65534"; 4], "{out}");
        assert_eq!(field("Gid:"), ["65534"; 4], "{out}");
        let mut g = field("Groups:");
        g.sort();
        assert_eq!(g, ["100", "4242", "65534"], "{out}");
        for (u, gid, _) in thread_ids() {
            assert!(
                u.split_whitespace().all(|v| v == "0"),
                "agent thread Uid: {u}"
            );
            assert!(
                gid.split_whitespace().all(|v| v == "0"),
                "agent thread Gid: {gid}"
            );
        }
        let groups_before: std::collections::BTreeSet<_> =
            agent_before.iter().map(|t| t.2.clone()).collect();
        for t in thread_ids() {
            assert!(groups_before.contains(&t.2), "agent thread Groups: {}", t.2);
        }
    }

    /// Root: a failing setgroups (more groups than NGROUPS_MAX) is reported (EINVAL) and
    /// changes nothing in this process.
    #[test]
    fn failed_setgroups_is_reported() {
        if !is_root() {
            eprintln!("skipped: not root");
            return;
        }
        let groups: Vec<u32> = (1..=70_000).collect();
        let setup = ChildSetup::new(ident(Some((65534, 65534, groups)), None));
        let (res, out) = run_sh("echo ran", &[], &setup);
        match res {
            Err(CloneError::Child(e)) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("{other:?} {out:?}"),
        }
        assert_eq!(status_field("/proc/self/status", "Uid:"), "0\t0\t0\t0");
    }

    /// Root: an account whose uid/gid is `(uid_t)-1` must not run as root. libc's setuid
    /// (the code before this change) refused it with EINVAL; raw setresuid(-1, -1, -1) means
    /// "leave every id unchanged" and succeeds.
    #[test]
    fn uid_minus_one_never_runs_as_root() {
        if !is_root() {
            eprintln!("skipped: not root");
            return;
        }
        let setup = ChildSetup::new(ident(Some((u32::MAX, u32::MAX, vec![])), None));
        let (res, out) = run_sh("id -u; id -g", &[], &setup);
        if let Ok(pid) = res {
            reap(pid);
            let ids: Vec<&str> = out.split_whitespace().collect();
            assert!(
                ids.iter().all(|v| *v != "0"),
                "a command for uid/gid 4294967295 ran as uid {ids:?}"
            );
        }
    }

    /// Root: the identity switch is the child's alone; the agent's address space (shared by
    /// the CLONE_VM child until its exec) must keep its dumpable flag. commit_creds() sets
    /// `task->mm`'s dumpable to fs.suid_dumpable on a uid change, and that mm is the agent's.
    #[test]
    fn identity_switch_keeps_the_agent_dumpable() {
        if !is_root() {
            eprintln!("skipped: not root");
            return;
        }
        // SAFETY: prctl PR_GET_DUMPABLE/PR_SET_DUMPABLE on this process.
        let dumpable = || unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
        assert_eq!(dumpable(), 1);
        let setup = ChildSetup::new(ident(Some((65534, 65534, vec![65534])), None));
        let (res, _) = run_sh("true", &[], &setup);
        reap(res.unwrap());
        let after = dumpable();
        // SAFETY: as above (restore, for the other tests).
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
        assert_eq!(
            after, 1,
            "the agent became non-dumpable after one spawn as another account"
        );
    }

    /// The child's stack is per spawning thread; a thread that ends must not leave its
    /// 128 KiB behind (the file-system pool's threads end after 30 s idle and new ones take
    /// their place, for the agent's whole life).
    #[test]
    fn child_stacks_of_ended_threads_are_freed() {
        let live = || LIVE_STACKS.load(Ordering::Relaxed);
        let before = live();
        for _ in 0..50 {
            std::thread::spawn(|| {
                let setup = ChildSetup::new(ident(None, None));
                let (res, _) = run_sh("exit 0", &[], &setup);
                reap(res.unwrap());
            })
            .join()
            .unwrap();
        }
        // Other tests' threads may hold a few at this moment; a leak would be 50 more.
        assert!(
            live() < before + 10,
            "{} child stacks alive after 50 spawning threads ended (were {before})",
            live()
        );
    }
}

#[cfg(test)]
mod account_fs_tests {
    use super::*;

    /// The fs uid, fs gid and groups of thread `tid` of this process, from /proc.
    fn creds_of(tid: i32) -> (u32, u32, String) {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let field = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let last = |v: String| v.split_whitespace().last().unwrap_or("").parse().unwrap();
        (last(field("Uid:")), last(field("Gid:")), field("Groups:"))
    }

    fn tid() -> i32 {
        nix::unistd::gettid().as_raw()
    }

    /// Only the calling thread takes on the account, for the closure alone; a 0700 directory
    /// of root's is closed to it; root's identity (and its capabilities) comes back after,
    /// and after a panic in the closure too.
    #[test]
    fn the_account_reaches_paths_as_itself_on_this_thread_only() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to take on another account's identity");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::write(closed.join("f"), "x").unwrap();
        std::fs::set_permissions(&closed, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let who = FsIdentity {
            uid: 65534,
            gid: 65533,
            groups: vec![65533, 4242],
        };
        let main = tid();
        let before = creds_of(main);
        let (err, inside, other) = std::thread::scope(|s| {
            s.spawn(|| {
                as_account_fs(Some(&who), || {
                    // Not CAP_SYS_PTRACE either: /proc/1/cwd (root's) is not followed.
                    assert!(
                        std::fs::read_dir("/proc/1/cwd").is_err(),
                        "/proc/1/cwd followed"
                    );
                    let err = std::fs::read(closed.join("f")).unwrap_err().kind();
                    (err, creds_of(tid()), creds_of(main))
                })
                .unwrap()
            })
            .join()
            .unwrap()
        });
        assert_eq!(err, io::ErrorKind::PermissionDenied);
        assert_eq!(
            (inside.0, inside.1, inside.2.as_str()),
            (65534, 65533, "4242 65533")
        );
        assert_eq!(other, before, "another thread changed");
        // The same thread gets root's identity back, also after a panic.
        std::thread::spawn(move || {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                as_account_fs(Some(&who), || panic!("inside"))
            }));
            assert!(caught.is_err());
            assert_eq!(creds_of(tid()), before);
            let capeff = |t: i32| {
                std::fs::read_to_string(format!("/proc/self/task/{t}/status"))
                    .unwrap()
                    .lines()
                    .find(|l| l.starts_with("CapEff:"))
                    .unwrap()
                    .to_string()
            };
            assert_eq!(
                capeff(tid()),
                capeff(main),
                "capabilities not back after a panic"
            );
            assert_eq!(std::fs::read(closed.join("f")).unwrap(), b"x");
        })
        .join()
        .unwrap();
        let invalid = FsIdentity {
            uid: u32::MAX,
            gid: 1,
            groups: vec![],
        };
        assert!(as_account_fs(Some(&invalid), || ()).is_err());
        assert_eq!(as_account_fs(None, || 5).ok(), Some(5));
    }
}

#[cfg(test)]
mod allocator_tests {
    use super::*;

    #[test]
    fn jemalloc_runs_with_the_settings_the_agent_gives_it() {
        assert_eq!(
            allocator_settings(),
            "jemalloc: narenas 1, tcache false, dirty_decay_ms 1000, muzzy_decay_ms 0"
        );
        // A purge of every arena is a known command (it would answer an error otherwise,
        // and trim_heap would give nothing back).
        trim_heap();
        assert_eq!(jemalloc_opt::<u8>(c"opt.no_such_option"), None);
    }
}
