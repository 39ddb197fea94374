//! Resource sampling of the processes the agent tracks, and the agent's own counters.
//!
//! # What a sample holds (docs/api.md, "Resource figures and limits", states the same)
//! * `cpu_usage`: percent of **one core** (the top/ps convention: a busy single thread reads
//!   100, two busy threads 200), from the `utime + stime` delta of `/proc/PID/stat` between two
//!   passes divided by the monotonic time between them. The previous reading is keyed by
//!   (pid, start time), so a reused pid never mixes with its predecessor; a process seen for
//!   the first time reads 0 until the next pass.
//! * `mem_usage`: resident set size as a percent of `MemTotal`; `rss_bytes`: the same in bytes
//!   (`/proc/PID/stat` rss × page size).
//! * `fd`: open file descriptors (the size of `/proc/PID/fd` on Linux 6.2+, else its entries).
//! * `disk`: bytes the process caused to be read from and written to the storage layer since
//!   it started (`/proc/PID/io` `read_bytes + write_bytes`; writes are counted when pages are
//!   dirtied, so they show before writeback; page-cache hits and tmpfs do not count; the I/O
//!   of children it has reaped is included, as the kernel folds it into the parent).
//! * network, for the **whole tree** of each instance (its descendants by parent links, or
//!   with containment every process of its cgroup): the TCP sockets its processes hold, found
//!   by joining the socket inodes of their descriptors (`/proc/PID/fd`) with one host-wide
//!   `sock_diag` dump per pass ([`crate::sockdiag`]), each socket once however many of the
//!   tree's processes hold it. `net_sent_bytes` / `net_received_bytes` are cumulative
//!   (`tcp_info` `bytes_acked` / `bytes_received`, kept per socket so a closed connection's
//!   bytes stay counted, [`crate::nettally`]); `net` is their sum's rate in bytes per second
//!   over the last sample; `net_sockets` counts the TCP and UDP sockets held (listening ones
//!   included). Not counted: UDP bytes, unix sockets, sockets of other network namespaces,
//!   and connections that open and close between two samples. The counters start from 0
//!   when the set of instances changes (a restart), as `disk` does.
//!
//! A definition with several instances (`instance_num`) reports the **sum** over its
//! instances (so `cpu_usage` can exceed 100). Children and other descendants of an instance
//! are not included (a forked worker of a managed process is not counted), except with
//! containment: then each instance's cgroup gives cpu (`cpu.stat`), memory (`memory.current`,
//! with the memory controller), the number of processes and the pressure stall figures, for
//! its whole tree ([`crate::cgroup::figures`]).
//!
//! # Cost
//! For each instance the sampler keeps five handles open across passes (`/proc/PID`, its
//! `stat`, its `io`, its main thread's `children` and `schedstat` files), so a full reading
//! is one `pread` of `stat`, one of `io`, one of `children` (a single-threaded process) and
//! one `stat` of the `fd` directory (whose size is the descriptor count) per instance:
//! opening the files costs several times more than reading them. A single-threaded
//! instance without children whose `schedstat` (time on a cpu, times scheduled) has not
//! moved since its latest full reading did not run, so its figures stand and its pass is
//! that one `pread`; it is read in full again as soon as it runs, and at least every
//! [`FULL_READ_PASSES`] passes (what can change without it running: memory reclaimed from
//! it, an orphan handed to it as a subreaper, a descriptor table it shares, its memory
//! grown by a process sharing it, `CLONE_VM`, or writing into it, `process_vm_writev`).
//! Instances of a definition with a cpu or memory limit are read in full every pass, so
//! that every sample the limits count is a new observation. Processes that wake up between
//! passes (most daemons' timers do) are read in full every pass. The start time is checked on every read, and
//! a handle to a process that has exited cannot read a newer process with the same pid, so
//! figures never mix two processes. The handles are kept for at most [`handle_budget`]
//! instances (derived from the descriptor limit); others are opened and closed each pass.
//!
//! With containment each instance's cgroup is read too, first, and the same way: its
//! `cpu.stat` is kept open (within the same budget) and read; when its `usage_usec` has not
//! moved, nothing in the cgroup ran, and its latest full reading stands, for at most
//! [`FULL_READ_PASSES`] passes, unless that reading showed pressure or the definition has a
//! limit (`CgroupMemo` says what can change unseen). Nor is an instance that was in such a
//! cgroup read (not even its `schedstat`): it did not run. A full reading opens the cgroup's
//! directory once and, relative to it, `cgroup.procs`, the three pressure files and those
//! of the controllers enabled (`memory.current`, `pids.current`, `io.stat`): opening a
//! cgroup file by path walks every component of it, several times the cost of reading it.
//! So a contained idle host costs what an uncontained one does, a `pread` per instance a
//! pass, plus the full readings.
//!
//! The network figures add, per pass, one `sock_diag` dump (every TCP and UDP socket of the
//! host's namespace, at most [`crate::sockdiag::MAX_SOCKETS`]; only while some tree held a
//! socket at its last listing, so a socket that appears is counted from the next pass) and,
//! per process of a tree
//! (at most [`MAX_TREE`] per definition), a read of its `task/*/children` files and a `stat`
//! of its `fd` directory. Descriptor listings are bounded per definition and pass as well
//! ([`MAX_TREE_FDS`] entries read and kept; a socket on many descriptors is kept once), since
//! processes can share one descriptor table. Finding its sockets means listing the descriptors and reading each
//! link, the most expensive read, so it is done only when the process's descriptor count
//! changed since the previous pass, when one of the sockets it held is gone from the dump
//! (closed: it may have been replaced under the same count), and otherwise every
//! [`NET_RESCAN_PASSES`] passes (staggered by pid); in between the last listing stands, and
//! a socket that was listed unconnected is picked up as soon as the dump shows it. Status
//! queries never read `/proc` nor the dump: they report the latest sample.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use rustix::fs::{Mode, OFlags};

use crate::spec::ProcKey;
use crate::supervisor::Engine;

/// Figures of the sampler itself, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassStats {
    /// Passes completed since the agent started.
    pub passes: u64,
    /// Duration of the latest pass.
    pub last_duration: Duration,
    /// Instances read in the latest pass.
    pub last_processes: usize,
}

/// Counters the API and the sampler bump.
#[derive(Debug)]
pub struct Counters {
    api: Mutex<BTreeMap<String, u64>>,
    /// Duration of every sampling pass, in seconds.
    pub sample_seconds: Histogram,
    pass: Mutex<PassStats>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            api: Mutex::new(BTreeMap::new()),
            sample_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            pass: Mutex::new(PassStats::default()),
        }
    }
}

impl Counters {
    /// Count one API request (unknown endpoints are counted as "other" so a client cannot
    /// grow the map without bound).
    pub fn api_request(&self, api: &str) {
        let name = if api.len() <= 64 && api.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            api
        } else {
            "other"
        };
        let mut m = self.api.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < 256 || m.contains_key(name) {
            *m.entry(name.to_string()).or_default() += 1;
        } else {
            *m.entry("other".to_string()).or_default() += 1;
        }
    }

    /// A copy of the API request counts.
    pub fn api_requests(&self) -> BTreeMap<String, u64> {
        self.api.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Record one sampling pass.
    pub fn record_pass(&self, took: Duration, processes: usize) {
        self.sample_seconds.observe(took.as_secs_f64());
        let mut p = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        p.passes += 1;
        p.last_duration = took;
        p.last_processes = processes;
    }

    /// The sampler's own figures.
    pub fn pass_stats(&self) -> PassStats {
        *self.pass.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Host-wide figures the sampler needs (from sysinfo, read once at start: total memory and
/// the number of logical CPUs do not change while we run).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostFigures {
    pub mem_total_bytes: u64,
    pub cpus: usize,
}

impl HostFigures {
    pub fn read() -> HostFigures {
        let fallback_cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        match sysinfo::System::new() {
            Ok(mut sys) => {
                sys.refresh_memory();
                sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
                let cpus = if sys.cpus().is_empty() {
                    fallback_cpus
                } else {
                    sys.cpus().len()
                };
                HostFigures {
                    mem_total_bytes: sys.total_memory().max(1),
                    cpus,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "sysinfo unavailable; reading MemTotal from /proc/meminfo");
                let total = <procfs::Meminfo as procfs::Current>::current()
                    .map(|m| m.mem_total)
                    .unwrap_or(1);
                HostFigures {
                    mem_total_bytes: total.max(1),
                    cpus: fallback_cpus,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parsers (pure; fixture-tested below)

/// `read_bytes + write_bytes` of a `/proc/PID/io` text (parsed by the `procfs` crate);
/// `None` when it does not parse.
pub fn parse_io(text: &[u8]) -> Option<u64> {
    use procfs::FromRead;
    let io = procfs::process::Io::from_read(text).ok()?;
    Some(io.read_bytes.saturating_add(io.write_bytes))
}

/// The inode of an fd link target `socket:[12345]`; `None` for anything else.
pub fn socket_inode(link: &[u8]) -> Option<u64> {
    let inner = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if inner.is_empty() || !inner.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// The pids of a `/proc/PID/task/TID/children` file (space-separated); anything that is
/// not a positive pid is skipped.
pub fn parse_children(text: &[u8], out: &mut Vec<i32>) {
    for w in text.split(|b| b.is_ascii_whitespace()) {
        if let Some(pid) = std::str::from_utf8(w)
            .ok()
            .and_then(|w| w.parse::<i32>().ok())
            .filter(|p| *p > 0)
        {
            out.push(pid);
        }
    }
}

/// The fields of `/proc/PID/stat` the sampler uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatFields {
    pub utime: u64,
    pub stime: u64,
    /// Clock ticks since boot (the identity check).
    pub starttime: u64,
    pub rss_pages: u64,
    /// Threads (field 20): a single-threaded process's children are in one file.
    pub threads: i64,
}

/// Parse the fields the sampler needs from `/proc/PID/stat`, with the `procfs` crate's
/// parser (through [`crate::procinfo::parse_stat`], which first checks the line's shape:
/// procfs panics on some truncated lines). `comm` (field 2) may hold any byte but NUL,
/// spaces and parentheses included, and is not escaped: procfs splits at the **last** `)`.
pub fn parse_stat_fields(text: &[u8]) -> Option<StatFields> {
    let st = crate::procinfo::parse_stat(text)?;
    Some(StatFields {
        utime: st.utime,
        stime: st.stime,
        starttime: st.starttime,
        rss_pages: st.rss_pages,
        threads: st.num_threads,
    })
}

/// Percent of one core used between two readings `dt` apart.
pub fn cpu_percent(
    prev_ticks: u64,
    now_ticks: u64,
    dt: Duration,
    ticks_per_sec: u64,
    cpus: usize,
) -> f64 {
    let secs = dt.as_secs_f64();
    if secs <= 0.0 || now_ticks < prev_ticks {
        return 0.0;
    }
    let used = (now_ticks - prev_ticks) as f64 / ticks_per_sec.max(1) as f64;
    (used / secs * 100.0).clamp(0.0, 100.0 * cpus.max(1) as f64)
}

// ---------------------------------------------------------------------------------------
// Reading one process

/// The raw counters of one process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Raw {
    /// `utime + stime`, clock ticks.
    pub cpu_ticks: u64,
    pub rss_bytes: u64,
    pub fds: u64,
    /// `read_bytes + write_bytes` (0 when `/proc/PID/io` is unreadable).
    pub io_bytes: u64,
    pub threads: i64,
}

fn read_file_at(dir: &OwnedFd, name: &std::ffi::CStr, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let fd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    buf.clear();
    std::fs::File::from(fd).read_to_end(buf)?;
    Ok(())
}

/// Does the kernel have `/proc/PID/task/TID/children` (`CONFIG_PROC_CHILDREN`)? Without it
/// a tree is found from a scan of every process's parent.
fn children_files() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::path::Path::new("/proc/thread-self/children").exists())
}

/// The children of process `pid` behind `dir` (of all its `threads` threads). Empty when it
/// is gone. A single-threaded process (the common case) costs one small file read.
fn children_of(dir: &OwnedFd, pid: i32, threads: i64, buf: &mut Vec<u8>) -> Vec<i32> {
    let mut out = Vec::new();
    if threads == 1 {
        if let Ok(path) = std::ffi::CString::new(format!("task/{pid}/children"))
            && let Ok(fd) = rustix::fs::openat(
                dir,
                path.as_c_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            && pread_all(&fd, buf).is_ok()
        {
            parse_children(buf, &mut out);
        }
        return out;
    }
    let Ok(task) = rustix::fs::openat(
        dir,
        c"task",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return out;
    };
    let Ok(mut threads) = rustix::fs::Dir::new(task) else {
        return out;
    };
    let mut tids = Vec::new();
    while let Some(Ok(ent)) = threads.read() {
        if let Some(tid) = ent
            .file_name()
            .to_str()
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
        {
            tids.push(tid);
        }
    }
    for tid in tids {
        let Ok(path) = std::ffi::CString::new(format!("task/{tid}/children")) else {
            continue;
        };
        if read_file_at(dir, &path, buf).is_ok() {
            parse_children(buf, &mut out);
        }
    }
    out
}

/// Open `/proc/PID` of a tree member: the directory handle, its `stat` fields and its
/// descriptor count (0 where the kernel does not give it as the `fd` directory's size).
fn open_member(pid: i32, buf: &mut Vec<u8>) -> Option<(OwnedFd, StatFields, u64)> {
    let dir = rustix::fs::openat(
        rustix::fs::CWD,
        format!("/proc/{pid}").as_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    read_file_at(&dir, c"stat", buf).ok()?;
    let st = parse_stat_fields(buf)?;
    let fds = rustix::fs::statat(&dir, c"fd", rustix::fs::AtFlags::empty())
        .map(|st| st.st_size.max(0) as u64)
        .unwrap_or(0);
    Some((dir, st, fds))
}

/// List `/proc/PID/fd`, reading at most `limit` entries: the number of descriptors read and
/// the distinct inodes of the sockets among them (a socket duplicated on many descriptors is
/// one entry).
fn list_fds(dir: &OwnedFd, limit: usize) -> Option<(u64, Vec<u64>)> {
    let fd_dir = rustix::fs::openat(
        dir,
        c"fd",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut entries = rustix::fs::Dir::new(fd_dir).ok()?;
    let mut n = 0;
    let mut sockets = Vec::new();
    let mut link = [0u8; 64];
    while let Some(Ok(ent)) = entries.read() {
        if n as usize >= limit {
            break;
        }
        let name = ent.file_name();
        if name.to_bytes().first() == Some(&b'.') {
            continue;
        }
        n += 1;
        // "socket:[N]" fits in 64 bytes; longer targets are truncated and are no socket.
        if let Ok(dfd) = entries.fd()
            && let Ok(len) = rustix::fs::readlinkat_raw(dfd, name, &mut link[..])
            && let Some(ino) = socket_inode(&link[..len.min(link.len())])
        {
            sockets.push(ino);
        }
    }
    sockets.sort_unstable();
    sockets.dedup();
    Some((n, sockets))
}

/// Read handles on one process: `/proc/PID` (a directory handle, for the descriptor count,
/// its children and the occasional socket listing), and its `stat` and `io` files, re-read
/// with `pread`.
/// Kept open across passes they make a pass several times cheaper than opening the files
/// each time (opening, not reading, dominates), and they stay bound to the process they were
/// opened on: once it is gone every read fails (ESRCH), even if its pid is reused.
#[derive(Debug)]
pub struct Handles {
    dir: OwnedFd,
    stat: OwnedFd,
    /// `None` when unreadable (another account's process without privilege).
    io: Option<OwnedFd>,
    /// Its main thread's `children` file (the network figures' tree walk), where the kernel
    /// has one.
    children: Option<OwnedFd>,
    /// Its main thread's `schedstat` (time on a cpu, in ns, and times scheduled): whether a
    /// single-threaded process ran at all since the previous pass ([`Quiet`]).
    schedstat: Option<OwnedFd>,
}

impl Handles {
    /// Open the handles of `pid` (`None` when it does not exist). The identity is checked by
    /// [`read_raw`] on every read.
    pub fn open(pid: i32) -> Option<Handles> {
        if pid <= 0 {
            return None;
        }
        let path = format!("/proc/{pid}");
        let dir = rustix::fs::openat(
            rustix::fs::CWD,
            path.as_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let stat = rustix::fs::openat(
            &dir,
            c"stat",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let io =
            rustix::fs::openat(&dir, c"io", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok();
        let children = rustix::fs::openat(
            &dir,
            format!("task/{pid}/children").as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok();
        let schedstat = rustix::fs::openat(
            &dir,
            c"schedstat",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok();
        Some(Handles {
            dir,
            stat,
            io,
            children,
            schedstat,
        })
    }

    /// Descriptors these handles hold.
    pub const FDS: usize = 5;

    /// The main thread's time on a cpu (ns) and times scheduled, `None` when unreadable or
    /// when the kernel keeps no such figures (it then shows zeros).
    pub fn ran(&self, buf: &mut Vec<u8>) -> Option<(u64, u64)> {
        pread_all(self.schedstat.as_ref()?, buf).ok()?;
        parse_schedstat(buf)
    }
}

/// Read a whole single-record `/proc` file (`stat`, `io`) from offset 0: such files are
/// generated afresh by each read at offset 0, so one `pread` that does not fill the buffer
/// has everything.
fn pread_all(fd: &OwnedFd, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut size = 2048;
    loop {
        buf.clear();
        buf.resize(size, 0);
        let n = rustix::io::pread(fd, &mut buf[..], 0)?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(());
        }
        if size >= 1 << 16 {
            return Err(std::io::Error::other("a /proc record larger than 64 KiB"));
        }
        size *= 2;
    }
}

/// `/proc/PID/schedstat`: "RUNTIME_NS RUN_DELAY_NS TIMES_SCHEDULED"; the first and the last,
/// `None` for zeros (a kernel without scheduler statistics) or another shape.
pub fn parse_schedstat(text: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(text).ok()?;
    let mut f = text.split_ascii_whitespace();
    let runtime = f.next()?.parse::<u64>().ok()?;
    let pcount = f.nth(1)?.parse::<u64>().ok()?;
    (runtime > 0 || pcount > 0).then_some((runtime, pcount))
}

/// Read the counters of the process behind `h` if it still has start time `starttime`
/// (`None` when it is gone or is another process). `buf` is scratch space.
pub fn read_raw(h: &Handles, starttime: u64, buf: &mut Vec<u8>) -> Option<Raw> {
    pread_all(&h.stat, buf).ok()?;
    let st = parse_stat_fields(buf)?;
    if st.starttime != starttime {
        return None;
    }
    let mut raw = Raw {
        cpu_ticks: st.utime.saturating_add(st.stime),
        rss_bytes: st.rss_pages.saturating_mul(crate::procinfo::page_size()),
        threads: st.threads,
        ..Raw::default()
    };
    // Another account's io and fd directory are unreadable without privilege: then 0.
    if let Some(io) = &h.io
        && pread_all(io, buf).is_ok()
    {
        raw.io_bytes = parse_io(buf).unwrap_or(0);
    }
    let dir = &h.dir;
    // Linux 6.2+ gives the descriptor count as the size of the fd directory; older kernels
    // say 0, and then the directory is listed.
    let quick = rustix::fs::statat(dir, c"fd", rustix::fs::AtFlags::empty())
        .ok()
        .map(|st| st.st_size.max(0) as u64)
        .filter(|n| *n > 0);
    raw.fds = match quick {
        Some(n) => n,
        None => list_fds(dir, usize::MAX).map(|(n, _)| n).unwrap_or(0),
    };
    Some(raw)
}

/// How many instances the sampler may keep [`Handles`] open for (and, with containment, as
/// many instance cgroups' `cpu.stat`): as many as the descriptor limit holds after a
/// reserve, counting with each instance's handles what else the agent holds for it (a pidfd,
/// the two read ends of its captured output, its cgroup's `cpu.stat`), so that the sampler
/// never starves the rest of the agent. Instances beyond it are read by opening the files
/// each pass.
pub fn handle_budget() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20)
        .min(1 << 20) as usize;
    soft.saturating_sub(512) / (Handles::FDS + 4)
}

// ---------------------------------------------------------------------------------------
// Passes

/// One definition to sample: its key and its instances (pid, start time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: ProcKey,
    pub instances: Vec<(i32, u64)>,
    /// Containment on: the cgroup of each running instance. Its figures (the whole tree)
    /// replace the main processes' where the kernel has them (module docs).
    pub cgroups: Vec<std::path::PathBuf>,
    /// The definition has a cpu or memory limit: its instances are read in full every pass
    /// (never [`Quiet`]), so that each sample the limits count is a new observation.
    pub limited: bool,
}

/// A process's descriptors are listed for sockets at least every this many passes
/// (staggered by pid), besides whenever its descriptor count changes or one of its sockets
/// closes.
pub const NET_RESCAN_PASSES: u64 = 20;

/// The most processes of one definition's trees the network figures walk in a pass (a
/// fork bomb costs the sampler no more than this).
pub const MAX_TREE: usize = 4096;

/// The most descriptors of one definition's trees the network figures list, and socket
/// entries they keep, in a pass. Processes may share one descriptor table (`clone` with
/// `CLONE_FILES`), so without it 4096 processes sharing 65536 descriptors would cost 2^28
/// reads and as many kept entries a pass; past it the remaining processes' sockets are not
/// counted in that pass.
pub const MAX_TREE_FDS: usize = 1 << 16;

/// What the sampler remembers of one process of a tree between passes (its sockets).
#[derive(Debug, Clone, Default)]
struct MemberMemo {
    /// Descriptor count at the latest listing check.
    fds: u64,
    /// Socket inodes of its descriptors, at the latest listing.
    sockets: Vec<u64>,
    /// Those of them the latest dump had.
    inet: Vec<u64>,
}

/// What the sampler remembers of one definition's network figures between passes.
#[derive(Debug, Clone)]
struct NetMemo {
    /// The instances the counters are for; another set starts them again.
    instances: Vec<(i32, u64)>,
    tally: crate::nettally::Tally,
    /// `tally.total()` at `at`, for the rate.
    total: u64,
    at: Instant,
    sockets: u64,
    /// `total`, `at` and `sockets` come from a dump (else there is no reading yet).
    dumped: bool,
}

/// The network part of one pass: the dump, and the listings of the trees' processes.
struct TreeWalk<'a> {
    /// This pass's dump; `None` when no tree held a socket at the previous pass (or the dump
    /// failed): descriptors are still listed, so a new socket is seen, and dumped next pass.
    table: Option<&'a crate::sockdiag::SockTable>,
    passes: u64,
    old: HashMap<(i32, u64), MemberMemo>,
    seen: HashMap<(i32, u64), MemberMemo>,
    /// Every process's parent, where the kernel has no children files (taken once a pass).
    snapshot: Option<crate::procinfo::Snapshot>,
    buf: Vec<u8>,
    walk_children: bool,
    /// Descriptor listings the current definition may still read or keep
    /// ([`MAX_TREE_FDS`]); reset for each definition.
    budget: usize,
}

impl TreeWalk<'_> {
    /// The sockets of the process behind `dir` (identity `id`, `fds` descriptors), listed
    /// anew only when needed (module docs), added to `out`.
    ///
    /// `quiet`: the process has not run since the previous pass ([`Quiet`]), so its
    /// descriptors cannot have been replaced under the same count: no periodic listing.
    fn member(&mut self, dir: &OwnedFd, id: (i32, u64), fds: u64, quiet: bool, out: &mut Vec<u64>) {
        if let Some(m) = self.seen.get(&id) {
            if m.inet.len() <= self.budget {
                self.budget -= m.inet.len();
                out.extend_from_slice(&m.inet);
            }
            return;
        }
        let old = self.old.remove(&id);
        let relist = match &old {
            None => true,
            Some(m) => {
                fds == 0
                    || m.fds != fds
                    || (!quiet && (self.passes + id.0 as u64).is_multiple_of(NET_RESCAN_PASSES))
                    || self
                        .table
                        .is_some_and(|t| m.inet.iter().any(|i| !t.contains_key(i)))
            }
        };
        let kept = old.map(|m| m.sockets).unwrap_or_default();
        let (fds, sockets) = if !relist && kept.len() <= self.budget {
            self.budget -= kept.len();
            (fds, kept)
        } else if relist && self.budget > 0 {
            let (read, sockets) = list_fds(dir, self.budget).unwrap_or_default();
            self.budget = self
                .budget
                .saturating_sub((read as usize).max(sockets.len()));
            (fds, sockets)
        } else {
            // Over the budget: not counted this pass, and listed anew when next reached.
            (0, Vec::new())
        };
        let inet: Vec<u64> = match self.table {
            Some(t) => sockets
                .iter()
                .copied()
                .filter(|i| t.contains_key(i))
                .collect(),
            None => Vec::new(),
        };
        out.extend_from_slice(&inet);
        self.seen.insert(id, MemberMemo { fds, sockets, inet });
    }

    /// The sockets of `root`'s descendants (not `root` itself), by parent links. Returns
    /// the number of its children.
    fn descendants(
        &mut self,
        root: &Handles,
        pid: i32,
        root_threads: i64,
        visited: &mut HashSet<i32>,
        out: &mut Vec<u64>,
    ) -> usize {
        let (root_dir, root_children, root) = (&root.dir, &root.children, pid);
        let mut todo: Vec<(i32, Option<u64>)> = if self.walk_children {
            let mut kids = Vec::new();
            // One thread: its kept children file is all there is (a pread, no open).
            match root_children {
                Some(f) if root_threads == 1 && pread_all(f, &mut self.buf).is_ok() => {
                    parse_children(&self.buf, &mut kids)
                }
                _ => kids = children_of(root_dir, root, root_threads, &mut self.buf),
            }
            kids.into_iter().map(|p| (p, None)).collect()
        } else {
            self.snapshot
                .get_or_insert_with(crate::procinfo::Snapshot::take)
                .descendants(root)
                .into_iter()
                .map(|s| (s.pid, Some(s.starttime)))
                .collect()
        };
        let children = todo.len();
        while let Some((pid, start)) = todo.pop() {
            if visited.len() >= MAX_TREE {
                return children;
            }
            if !visited.insert(pid) {
                continue;
            }
            let Some((dir, st, fds)) = open_member(pid, &mut self.buf) else {
                continue;
            };
            if start.is_some_and(|s| s != st.starttime) {
                continue;
            }
            self.member(&dir, (pid, st.starttime), fds, false, out);
            if start.is_none() {
                todo.extend(
                    children_of(&dir, pid, st.threads, &mut self.buf)
                        .into_iter()
                        .map(|p| (p, None)),
                );
            }
        }
        children
    }

    /// The sockets of processes `pids`, those of a definition's cgroups (containment: the
    /// whole tree).
    fn cgroup_members(&mut self, pids: &[i32], visited: &mut HashSet<i32>, out: &mut Vec<u64>) {
        for &pid in pids {
            if visited.len() >= MAX_TREE {
                return;
            }
            if !visited.insert(pid) {
                continue;
            }
            if let Some((dir, st, fds)) = open_member(pid, &mut self.buf) {
                self.member(&dir, (pid, st.starttime), fds, false, out);
            }
        }
    }
}

/// What the sampler remembers of one instance between passes.
#[derive(Debug)]
struct Memo {
    cpu_ticks: u64,
    at: Instant,
    /// Kept open while within the budget.
    handles: Option<Handles>,
    /// The latest full reading, while the process may be skipped when it did not run.
    quiet: Option<Quiet>,
}

/// A process that has not run since its latest full reading has the same figures: a
/// single-threaded process without children whose `schedstat` (time on a cpu, times
/// scheduled) did not move cannot have used cpu, touched memory, done I/O, opened a
/// descriptor or forked, so its pass is that one small read instead of `stat`, `io`, the
/// descriptor count and its children. What can change without it running (memory reclaimed
/// from it, an orphan given to it as a subreaper, a descriptor table shared with another
/// process) shows at the next full reading, at most [`FULL_READ_PASSES`] passes later.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    raw: Raw,
    /// `schedstat` (runtime ns, times scheduled), read just before that full reading.
    ran: (u64, u64),
    /// Passes since it.
    skipped: u64,
}

/// An instance that does not run is read in full at least every this many passes.
pub const FULL_READ_PASSES: u64 = 10;

/// The sampler's state between passes: previous readings and scratch buffers.
pub struct Sampler {
    host: HostFigures,
    memo: HashMap<(i32, u64), Memo>,
    buf: Vec<u8>,
    ticks_per_sec: u64,
    passes: u64,
    budget: usize,
    /// Each instance cgroup's latest readings (containment), by path.
    cgroups: HashMap<std::ffi::OsString, CgroupMemo>,
    /// The sockets of each process of the trees, at the previous pass.
    members: HashMap<(i32, u64), MemberMemo>,
    /// The network figures of each definition, at the previous pass.
    nets: HashMap<ProcKey, NetMemo>,
    /// A failed dump was logged (once, until one succeeds).
    dump_failed: bool,
    /// Socket dumps asked for so far.
    dumps: u64,
    /// Trees are walked through `task/*/children` (else through a scan of every process).
    walk_children: bool,
    /// Instances read in full so far (the others were skipped: [`Quiet`]).
    full_reads: u64,
    /// Instance cgroups read in full so far (the others by their `cpu.stat` alone).
    cgroup_full_reads: u64,
    /// The optional files a full reading of a cgroup tries.
    cgroup_files: crate::cgroup::FigureFiles,
}

impl Sampler {
    pub fn new(host: HostFigures) -> Sampler {
        Sampler::with_budget(host, handle_budget())
    }

    /// A sampler that keeps handles open for at most `budget` instances.
    pub fn with_budget(host: HostFigures, budget: usize) -> Sampler {
        Sampler {
            host,
            memo: HashMap::new(),
            buf: Vec::with_capacity(4096),
            ticks_per_sec: crate::procinfo::ticks_per_second(),
            passes: 0,
            budget,
            cgroups: HashMap::new(),
            members: HashMap::new(),
            nets: HashMap::new(),
            dump_failed: false,
            dumps: 0,
            walk_children: children_files(),
            full_reads: 0,
            cgroup_full_reads: 0,
            cgroup_files: crate::cgroup::FigureFiles::ALL,
        }
    }

    /// The optional files (those of the controllers enabled for the processes' cgroups) a
    /// full reading of a cgroup tries; every one by default.
    pub fn with_cgroup_files(self, files: crate::cgroup::FigureFiles) -> Sampler {
        Sampler {
            cgroup_files: files,
            ..self
        }
    }

    /// Instances read in full since the sampler started (each pass reads every instance
    /// either in full or, when it did not run, by its `schedstat` alone).
    pub fn full_reads(&self) -> u64 {
        self.full_reads
    }

    /// Instance cgroups read in full since the sampler started (containment: each pass
    /// reads every instance cgroup either in full or, when nothing in it ran, by its
    /// `cpu.stat` alone).
    pub fn cgroup_full_reads(&self) -> u64 {
        self.cgroup_full_reads
    }

    /// Instance cgroups whose `cpu.stat` is kept open now.
    pub fn open_cgroup_handles(&self) -> usize {
        self.cgroups
            .values()
            .filter(|m| m.cpu_stat.is_some())
            .count()
    }

    /// Instances whose handles are kept open now.
    pub fn open_handles(&self) -> usize {
        self.memo.values().filter(|m| m.handles.is_some()).count()
    }

    pub fn host(&self) -> HostFigures {
        self.host
    }

    /// One pass over `targets` at `now` (`at_unix` is stamped on the samples). Returns one
    /// entry per target, in order (`None` when none of its instances could be read: gone
    /// between the listing and the read), and the number of instances read.
    ///
    /// The network figures come from one socket dump per pass and the sockets of each
    /// instance's tree (module docs, "Cost").
    pub fn pass(
        &mut self,
        targets: &[Target],
        now: Instant,
        at_unix: i64,
    ) -> (Vec<Option<Sample>>, usize) {
        self.passes += 1;
        // The host's sockets are asked for only while some tree holds one (at its last
        // listing): a host of processes without sockets costs no dump.
        let table = if self.members.values().any(|m| !m.sockets.is_empty()) {
            self.dump(targets)
        } else {
            None
        };
        let mut walk = TreeWalk {
            table: table.as_ref(),
            passes: self.passes,
            old: std::mem::take(&mut self.members),
            seen: HashMap::new(),
            snapshot: None,
            buf: Vec::with_capacity(1024),
            walk_children: self.walk_children,
            budget: MAX_TREE_FDS,
        };
        let mut old_nets = std::mem::take(&mut self.nets);
        let mut seen: HashMap<(i32, u64), Memo> = HashMap::with_capacity(self.memo.len());
        let mut out = Vec::with_capacity(targets.len());
        let mut read = 0;
        let mut kept = 0;
        let mut kept_cgroups = 0;
        let (mut members, mut idle) = (Vec::new(), Vec::new());
        for t in targets {
            let mut s = Sample {
                at: at_unix,
                ..Sample::default()
            };
            let mut any = false;
            let mut tree_sockets = Vec::new();
            let mut visited = HashSet::new();
            walk.budget = MAX_TREE_FDS;
            // Containment: the cgroups first, whose readings tell which instances did not
            // run; their figures replace the instances' after them.
            members.clear();
            idle.clear();
            let cgroups = (!t.cgroups.is_empty())
                .then(|| self.read_cgroups(t, now, &mut kept_cgroups, &mut members, &mut idle));
            idle.sort_unstable();
            for &(pid, start) in &t.instances {
                let mut old = self.memo.remove(&(pid, start));
                let (handles, held) = match old.as_mut().and_then(|m| m.handles.take()) {
                    Some(h) => (Some(h), true),
                    None => (Handles::open(pid), false),
                };
                let Some(handles) = handles else {
                    continue;
                };
                // Only handles kept since the latest full reading are known to be the same
                // process without one (a pid opened anew may be reused).
                let prev = old
                    .as_ref()
                    .and_then(|m| m.quiet)
                    .filter(|q| held && !t.limited && q.skipped + 1 < FULL_READ_PASSES);
                // Nothing in its cgroup ran since the previous pass, and it was in it: it did
                // not run either. Else its `schedstat`, read before the full reading, so that
                // anything it does after this read shows at the next pass.
                let cgroup_idle = prev.is_some() && idle.binary_search(&pid).is_ok();
                let ran = if cgroup_idle {
                    None
                } else {
                    handles.ran(&mut self.buf)
                };
                let still = prev.filter(|q| cgroup_idle || ran == Some(q.ran));
                let (raw, quiet) = match still {
                    Some(q) => (
                        q.raw,
                        Some(Quiet {
                            skipped: q.skipped + 1,
                            ..q
                        }),
                    ),
                    None => {
                        self.full_reads += 1;
                        let Some(raw) = read_raw(&handles, start, &mut self.buf) else {
                            // Gone (or another process): its handles are closed here.
                            continue;
                        };
                        (raw, None)
                    }
                };
                let mut children = 0;
                if visited.insert(pid) {
                    let id = (pid, start);
                    walk.member(
                        &handles.dir,
                        id,
                        raw.fds,
                        quiet.is_some(),
                        &mut tree_sockets,
                    );
                    if t.cgroups.is_empty() && quiet.is_none() {
                        children = walk.descendants(
                            &handles,
                            pid,
                            raw.threads,
                            &mut visited,
                            &mut tree_sockets,
                        );
                    }
                }
                // A full reading: the next pass may skip it if it does not run.
                let quiet = quiet.or_else(|| {
                    let ran = ran.filter(|_| raw.threads == 1 && children == 0)?;
                    Some(Quiet {
                        raw,
                        ran,
                        skipped: 0,
                    })
                });
                any = true;
                read += 1;
                s.pids += 1;
                if let Some(m) = &old {
                    s.cpu_usage += cpu_percent(
                        m.cpu_ticks,
                        raw.cpu_ticks,
                        now.saturating_duration_since(m.at),
                        self.ticks_per_sec,
                        self.host.cpus,
                    );
                }
                let keep = kept < self.budget;
                kept += usize::from(keep);
                seen.insert(
                    (pid, start),
                    Memo {
                        cpu_ticks: raw.cpu_ticks,
                        at: now,
                        handles: keep.then_some(handles),
                        quiet,
                    },
                );
                s.rss_bytes = s.rss_bytes.saturating_add(raw.rss_bytes);
                s.fd += raw.fds as i64;
                s.disk = s
                    .disk
                    .saturating_add(raw.io_bytes.min(i64::MAX as u64) as i64);
            }
            if !any {
                out.push(None);
                continue;
            }
            if let Some(c) = cgroups {
                c.apply(&mut s);
                walk.cgroup_members(&members, &mut visited, &mut tree_sockets);
            }
            let memo = old_nets
                .remove(&t.key)
                .filter(|m| m.instances == t.instances);
            let memo = net_figures(memo, t, table.as_ref(), &tree_sockets, now, &mut s);
            self.nets.insert(t.key.clone(), memo);
            s.mem_usage = s.rss_bytes as f64 / self.host.mem_total_bytes.max(1) as f64 * 100.0;
            s.cpu_usage = (s.cpu_usage * 100.0).round() / 100.0;
            s.mem_usage = (s.mem_usage * 100.0).round() / 100.0;
            out.push(Some(s));
        }
        self.memo = seen;
        // Cgroups of instances gone (or no longer sampled) go, with their handles.
        let pass = self.passes;
        self.cgroups.retain(|_, m| m.pass == pass);
        self.members = walk.seen;
        (out, read)
    }

    /// The socket dump of this pass (`None` when there is nothing to sample or it failed; a
    /// failure is logged once until a dump succeeds again).
    fn dump(&mut self, targets: &[Target]) -> Option<crate::sockdiag::SockTable> {
        if targets.iter().all(|t| t.instances.is_empty()) {
            return None;
        }
        self.dumps += 1;
        match crate::sockdiag::dump() {
            Ok(t) => {
                self.dump_failed = false;
                Some(t)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.dump_failed, true) {
                    tracing::warn!(error = %e, "sock_diag dump failed: no network figures until it works");
                }
                None
            }
        }
    }

    /// Containment: read `t`'s instance cgroups (the whole tree of each), whose figures
    /// ([`CgroupTotals`]) replace the main processes' where the kernel has them. The
    /// processes the cgroups hold (at most [`MAX_TREE`] of each) are added to `members`, and
    /// `t`'s instances listed in a cgroup in which nothing ran since the previous pass to
    /// `idle`; `kept` counts the handles kept so far in this pass.
    ///
    /// A cgroup whose `usage_usec` has not moved since the previous pass held nothing that
    /// ran, so its latest full reading stands ([`CgroupMemo`]), and its pass is that one read
    /// (through its `cpu.stat` kept open, within the handle budget: a `pread`, no path walk).
    fn read_cgroups(
        &mut self,
        t: &Target,
        now: Instant,
        kept: &mut usize,
        members: &mut Vec<i32>,
        idle: &mut Vec<i32>,
    ) -> CgroupTotals {
        let mut sum = CgroupTotals::default();
        let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.max(y)),
            (x, y) => x.or(y),
        };
        for dir in &t.cgroups {
            let key = dir.as_os_str();
            if !self.cgroups.contains_key(key) {
                self.cgroups.insert(key.to_owned(), CgroupMemo::new(now));
            }
            let Some(m) = self.cgroups.get_mut(key) else {
                continue;
            };
            m.pass = self.passes;
            let (usec, handle) = cgroup_usage(dir, m.cpu_stat.take(), &mut self.buf);
            let ran = match (usec, m.usec) {
                (Some(u), Some(prev)) => {
                    let elapsed = now.saturating_duration_since(m.at).as_micros();
                    if u >= prev && elapsed > 0 {
                        sum.cpu += (u - prev) as f64 / elapsed as f64 * 100.0;
                    }
                    u != prev
                }
                _ => true,
            };
            (m.usec, m.at) = (usec, now);
            if !ran && m.still(t) {
                m.skipped += 1;
            } else {
                self.cgroup_full_reads += 1;
                let reading = crate::cgroup::full_reading(dir, self.cgroup_files, MAX_TREE);
                // Gone, or a file could not be read: nothing of it stands for the next pass
                // (read in full again), while the cpu, read on its own, still counts.
                let skipped = if reading.is_some() {
                    0
                } else {
                    FULL_READ_PASSES
                };
                let (procs, figures) = reading.unwrap_or_default();
                if m.instances != t.instances {
                    m.instances.clone_from(&t.instances);
                }
                m.figures = crate::cgroup::Figures {
                    cpu_usec: usec,
                    ..figures
                };
                (m.procs, m.skipped) = (procs, skipped);
            }
            let f = m.figures;
            sum.cpu_known |= f.cpu_usec.is_some();
            sum.pids += f.pids;
            if let Some(b) = f.memory_bytes {
                sum.memory = Some(sum.memory.unwrap_or(0).saturating_add(b));
            }
            if let Some(b) = f.io_bytes {
                sum.io = Some(sum.io.unwrap_or(0).saturating_add(b));
            }
            sum.psi_cpu = max(sum.psi_cpu, f.psi_cpu);
            sum.psi_memory = max(sum.psi_memory, f.psi_memory);
            sum.psi_io = max(sum.psi_io, f.psi_io);
            members.extend_from_slice(&m.procs);
            if !ran {
                idle.extend(
                    t.instances
                        .iter()
                        .map(|&(pid, _)| pid)
                        .filter(|pid| m.procs.binary_search(pid).is_ok()),
                );
            }
            let keep = *kept < self.budget;
            *kept += usize::from(keep);
            m.cpu_stat = handle.filter(|_| keep);
        }
        sum
    }
}

/// The figures of a definition's instance cgroups in one pass (containment): cpu from
/// `cpu.stat` (the first pass of a cgroup reads 0, as a new process does), memory from
/// `memory.current`, disk from `io.stat`, the number of processes, and the pressure stall
/// figures (the highest over the instances).
#[derive(Debug, Default, Clone, Copy)]
struct CgroupTotals {
    cpu: f64,
    cpu_known: bool,
    memory: Option<u64>,
    io: Option<u64>,
    pids: u64,
    psi_cpu: Option<f64>,
    psi_memory: Option<f64>,
    psi_io: Option<f64>,
}

impl CgroupTotals {
    /// Replace the instances' figures in `s` with these, where the kernel has them.
    fn apply(self, s: &mut Sample) {
        if self.cpu_known {
            s.cpu_usage = self.cpu;
        }
        if let Some(m) = self.memory {
            s.rss_bytes = m;
        }
        if let Some(b) = self.io {
            s.disk = b.min(i64::MAX as u64) as i64;
        }
        s.pids = self.pids;
        (s.psi_cpu, s.psi_memory, s.psi_io) = (self.psi_cpu, self.psi_memory, self.psi_io);
        s.from_cgroup = true;
    }
}

/// What the sampler remembers of one instance cgroup between passes (containment).
///
/// Nothing in a cgroup whose `cpu.stat` `usage_usec` did not move ran since (for as long
/// as a microsecond), so nothing in it forked, exited, allocated, did I/O or opened a
/// socket: its latest full reading stands. What can change without anything in it running
/// shows at the next full reading, at most [`FULL_READ_PASSES`] passes later: memory
/// reclaimed from it or charged to it by the kernel for it (socket buffers of data that
/// arrives), writeback of its dirty pages by the kernel's flusher threads (charged to its
/// `io.stat`), a stall that began just before that reading (a cgroup whose reading showed
/// any pressure is read in full every pass), and a process moved into or out of it by
/// whoever may write the cgroup files (root: the agent's cgroups are its own; a process
/// moved out and running elsewhere is not read, as its instance was listed in an idle
/// cgroup, until then). A reading that failed (a file there but unreadable) does not
/// stand: the next pass reads the cgroup in full again. Cgroups of a definition with a cpu
/// or memory limit are read in full every pass, as its processes are.
#[derive(Debug)]
struct CgroupMemo {
    /// Its `cpu.stat`, kept open while within the handle budget.
    cpu_stat: Option<OwnedFd>,
    /// `usage_usec` at `at` (the latest pass).
    usec: Option<u64>,
    at: Instant,
    /// The definition's instances at the latest full reading: other instances (a restart)
    /// are read in full.
    instances: Vec<(i32, u64)>,
    /// The latest full reading: the figures, and the processes `cgroup.procs` listed.
    figures: crate::cgroup::Figures,
    procs: Vec<i32>,
    /// Passes since it.
    skipped: u64,
    /// The latest pass that read it.
    pass: u64,
}

impl CgroupMemo {
    /// A cgroup not read yet.
    fn new(now: Instant) -> CgroupMemo {
        CgroupMemo {
            cpu_stat: None,
            usec: None,
            at: now,
            instances: Vec::new(),
            figures: crate::cgroup::Figures::default(),
            procs: Vec::new(),
            skipped: 0,
            pass: 0,
        }
    }

    /// May the latest full reading stand for this pass of `t`, nothing in the cgroup having
    /// run since the previous pass?
    fn still(&self, t: &Target) -> bool {
        let f = &self.figures;
        let calm = [f.psi_cpu, f.psi_memory, f.psi_io]
            .iter()
            .all(|p| p.unwrap_or(0.0) == 0.0);
        !t.limited
            && calm
            && self.usec.is_some()
            && self.instances == t.instances
            && self.skipped + 1 < FULL_READ_PASSES
    }
}

/// `usage_usec` of cgroup `dir`'s `cpu.stat`, read through `kept` (its handle from the
/// previous pass) or a handle opened now, and the handle (`None` when it cannot be opened).
/// A kept handle of a cgroup removed since fails (`ENODEV`), and the path is opened anew:
/// a cgroup made again there is another one. Blocking.
fn cgroup_usage(
    dir: &std::path::Path,
    kept: Option<OwnedFd>,
    buf: &mut Vec<u8>,
) -> (Option<u64>, Option<OwnedFd>) {
    let usage = |buf: &[u8]| {
        std::str::from_utf8(buf)
            .ok()
            .and_then(crate::cgroup::parse_cpu_usage)
    };
    if let Some(fd) = kept.filter(|fd| pread_all(fd, buf).is_ok()) {
        return (usage(buf), Some(fd));
    }
    let Ok(fd) = rustix::fs::openat(
        rustix::fs::CWD,
        dir.join("cpu.stat"),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return (None, None);
    };
    match pread_all(&fd, buf) {
        Ok(()) => (usage(buf), Some(fd)),
        Err(_) => (None, None),
    }
}

/// The latest resource figures of a process (one sampling pass).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub at: i64,
    pub cpu_usage: f64,
    pub mem_usage: f64,
    pub rss_bytes: u64,
    pub fd: i64,
    pub disk: i64,
    /// Network I/O of the trees: TCP bytes sent + received per second over the last sample.
    pub net: i64,
    /// TCP bytes sent (acknowledged by the peer) and received by the trees, cumulative.
    pub net_sent_bytes: u64,
    pub net_received_bytes: u64,
    /// TCP and UDP sockets the trees hold.
    pub net_sockets: u64,
    /// Processes counted: the instances, or (containment) every process of their cgroups.
    pub pids: u64,
    /// Pressure stall `some avg10` (containment, where the kernel has PSI).
    pub psi_cpu: Option<f64>,
    pub psi_memory: Option<f64>,
    pub psi_io: Option<f64>,
    /// cpu (and memory, with the memory controller) came from the cgroups.
    pub from_cgroup: bool,
}

/// The network figures of target `t` from this pass's dump (`table`) and the sockets its
/// trees hold; `memo` is the previous pass's for the same instances. Without a dump the
/// previous counters stand (they never go back) and the rate reads 0.
fn net_figures(
    memo: Option<NetMemo>,
    t: &Target,
    table: Option<&crate::sockdiag::SockTable>,
    tree_sockets: &[u64],
    now: Instant,
    s: &mut Sample,
) -> NetMemo {
    let mut m = memo.unwrap_or_else(|| NetMemo {
        instances: t.instances.clone(),
        tally: crate::nettally::Tally::default(),
        total: 0,
        at: now,
        sockets: 0,
        dumped: false,
    });
    if let Some(table) = table {
        let held = crate::nettally::held(tree_sockets, table);
        m.tally.update(&held.tcp, table);
        let total = m.tally.total();
        // The first figures of these instances have no previous reading: 0, as for cpu.
        s.net = if m.dumped {
            crate::nettally::rate(m.total, total, now.saturating_duration_since(m.at))
        } else {
            0
        };
        m.total = total;
        m.at = now;
        m.sockets = held.sockets;
        m.dumped = true;
    }
    s.net_sent_bytes = m.tally.sent();
    s.net_received_bytes = m.tally.received();
    s.net_sockets = m.sockets;
    m
}

/// What one pass did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    /// Instances read.
    pub processes: usize,
    pub took: Duration,
}

/// One sampling pass over every tracked instance; the figures go to the supervisor, which
/// keeps them and checks the limits.
pub fn sample_once(engine: &Arc<Engine>, sampler: &mut Sampler) -> PassReport {
    let t0 = Instant::now();
    let targets = engine.sample_targets();
    let (samples, processes) = sampler.pass(&targets, Instant::now(), crate::util::unix_now());
    engine.apply_samples(&targets, samples, sampler.host().cpus);
    let took = t0.elapsed();
    engine.counters.record_pass(took, processes);
    PassReport { processes, took }
}

/// The sampler task: one pass every `metrics.sample_interval` until shutdown, its /proc
/// reads on a blocking thread.
pub async fn run_sampler(engine: Arc<Engine>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let host = HostFigures::read();
    // Containment: a full reading of a cgroup tries only the files of the controllers the
    // agent enabled for the processes' cgroups.
    let files = engine
        .cgroups
        .tree()
        .map_or(crate::cgroup::FigureFiles::ALL, |t| {
            crate::cgroup::FigureFiles::of(&t.enabled)
        });
    let new = move || Sampler::new(host).with_cgroup_files(files);
    let mut sampler = Some(new());
    let mut tick = tokio::time::interval(engine.config.metrics.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        let e = engine.clone();
        let mut s = sampler.take().unwrap_or_else(new);
        match tokio::task::spawn_blocking(move || {
            sample_once(&e, &mut s);
            s
        })
        .await
        {
            Ok(s) => sampler = Some(s),
            Err(e) => tracing::error!(error = %e, "sampling pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_text() {
        let t = b"rchar: 100\nwchar: 200\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 10485760\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_io(t), Some(4096 + 10_485_760));
        assert_eq!(parse_io(b"rchar: 1\n"), None);
        assert_eq!(parse_io(b"read_bytes: x\nwrite_bytes: 1\n"), None);
        assert_eq!(parse_io(b"\xff\xfe"), None);
    }

    #[test]
    fn socket_links() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"socket:[12345]", Some(12345)),
            (b"socket:[]", None),
            (b"socket:[12a]", None),
            (b"pipe:[77]", None),
            (b"/tmp/socket:[1]", None),
            (b"anon_inode:[eventfd]", None),
            (b"socket:[18446744073709551615]", Some(u64::MAX)),
            (b"socket:[99999999999999999999999]", None),
        ];
        for (link, want) in cases {
            assert_eq!(
                socket_inode(link),
                *want,
                "{}",
                String::from_utf8_lossy(link)
            );
        }
    }

    #[test]
    fn children_files() {
        let mut out = Vec::new();
        parse_children(b"12 345 6\n", &mut out);
        parse_children(b"", &mut out);
        parse_children(b"x -1 0 7 99999999999", &mut out);
        assert_eq!(out, vec![12, 345, 6, 7]);
    }

    fn stat_line(comm: &[u8]) -> Vec<u8> {
        let mut v = b"4242 (".to_vec();
        v.extend_from_slice(comm);
        v.extend_from_slice(b") S 1 4242 4242 0 -1 4194560 100 0 0 0 700 300 0 0 20 0 1 0 123456 10000000 250 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n");
        v
    }

    const WANT: StatFields = StatFields {
        utime: 700,
        stime: 300,
        starttime: 123456,
        rss_pages: 250,
        threads: 1,
    };

    /// The sampler's `stat` parser survives a `comm` with spaces and parentheses (the
    /// kernel does not escape it), and agrees with the full parser used for identity.
    #[test]
    fn stat_with_hostile_comm() {
        for comm in [
            "a b",
            "x) (y",
            "))",
            "(",
            "a) R 1 2 3 (b",
            "",
            "x\ny",
            "1 2 3 4 5 6 7",
        ] {
            let line = stat_line(comm.as_bytes());
            assert_eq!(parse_stat_fields(&line), Some(WANT), "comm {comm:?}");
            let full = crate::procinfo::parse_stat(&line)
                .unwrap_or_else(|| panic!("comm {comm:?} did not parse"));
            assert_eq!(full.comm, comm);
            assert_eq!(
                (full.utime, full.stime, full.starttime, full.rss_pages),
                (700, 300, 123456, 250)
            );
        }
        // Not UTF-8: still fine, only the fields after the last ')' are read.
        assert_eq!(parse_stat_fields(&stat_line(b"\xff\xfe) (")), Some(WANT));
        for bad in [
            &b""[..],
            b"4242 (x S 1",
            b"4242 (x) S 1 2 3",
            b"4242 (x) S 1 2 3 4 5 6 7 8 9 10 u s",
        ] {
            assert_eq!(
                parse_stat_fields(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // The real file of this process.
        let me = std::fs::read(format!("/proc/{}/stat", std::process::id())).expect("stat");
        let full = crate::procinfo::parse_stat(&me).expect("full");
        let f = parse_stat_fields(&me).expect("fields");
        assert_eq!(f.starttime, full.starttime);
    }

    proptest::proptest! {
        #[test]
        fn stat_fields_for_any_comm(comm in proptest::collection::vec(1u8..=255, 0..64),
                                    utime in 0u64..u64::MAX / 2, stime in 0u64..u64::MAX / 2,
                                    start in proptest::num::u64::ANY) {
            let mut v = b"77 (".to_vec();
            v.extend_from_slice(&comm);
            v.extend_from_slice(format!(") R 1 77 77 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 {start} 0 9 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n").as_bytes());
            let f = parse_stat_fields(&v).expect("parses");
            proptest::prop_assert_eq!(f, StatFields { utime, stime, starttime: start, rss_pages: 9, threads: 1 });
        }
    }

    #[test]
    fn cpu_percent_table() {
        let s = Duration::from_secs;
        let cases = [
            // prev, now, dt, tck, cpus, want
            (0, 100, s(1), 100, 2, 100.0),
            (0, 50, s(1), 100, 2, 50.0),
            (0, 200, s(1), 100, 2, 200.0),
            (0, 900, s(1), 100, 2, 200.0), // clamped to the machine
            (100, 50, s(1), 100, 2, 0.0),  // counter went back: no figure
            (0, 100, s(0), 100, 2, 0.0),
            (0, 300, s(3), 100, 4, 100.0),
        ];
        for (p, n, dt, tck, cpus, want) in cases {
            assert_eq!(cpu_percent(p, n, dt, tck, cpus), want, "{p} {n} {dt:?}");
        }
    }

    #[test]
    fn reads_itself_and_refuses_a_wrong_start_time() {
        let me = std::process::id() as i32;
        let st = crate::procinfo::read_stat(me).expect("own stat");
        let mut buf = Vec::new();
        let _held: Vec<std::fs::File> = (0..5)
            .map(|_| std::fs::File::open("/dev/null").expect("open"))
            .collect();
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let h = Handles::open(me).expect("own handles");
        let r = read_raw(&h, st.starttime, &mut buf).expect("readable");
        assert!(r.fds >= 10, "{r:?}");
        assert!(r.rss_bytes > 0);
        let (n, sockets) = list_fds(&h.dir, usize::MAX).expect("own fds");
        assert!(n >= 10 && sockets.len() >= 2, "{n} {sockets:?}");
        assert!(read_raw(&h, st.starttime + 1, &mut buf).is_none());
        assert!(Handles::open(-1).is_none());
        assert!(Handles::open(0).is_none());
        drop((l, u));
    }

    #[test]
    fn pass_sums_instances_and_keys_cpu_by_start_time() {
        let me = std::process::id() as i32;
        let st = crate::procinfo::read_stat(me).expect("own stat");
        // A quiet child for exact sums (this test process changes while other tests run).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("sleep");
        let cpid = child.id() as i32;
        let cst = crate::procinfo::read_stat(cpid).expect("child stat");
        let mut s = Sampler::new(HostFigures {
            mem_total_bytes: 1 << 30,
            cpus: 2,
        });
        let me_t = Target {
            key: ProcKey::new("t", "me"),
            instances: vec![(me, st.starttime)],
            cgroups: Vec::new(),
            limited: false,
        };
        let one = Target {
            key: ProcKey::new("t", "one"),
            instances: vec![(cpid, cst.starttime)],
            cgroups: Vec::new(),
            limited: false,
        };
        let two = Target {
            key: ProcKey::new("t", "two"),
            instances: vec![(cpid, cst.starttime), (cpid, cst.starttime)],
            cgroups: Vec::new(),
            limited: false,
        };
        let gone = Target {
            key: ProcKey::new("t", "gone"),
            instances: vec![(cpid, cst.starttime + 1)],
            cgroups: Vec::new(),
            limited: false,
        };
        let (a, n) = s.pass(std::slice::from_ref(&me_t), Instant::now(), 1);
        assert_eq!(n, 1);
        let a = a[0].clone().expect("sample");
        assert_eq!(a.cpu_usage, 0.0, "no previous reading yet");
        assert_eq!(a.at, 1);
        // Burn some cpu, then a second pass has a figure.
        let until = Instant::now() + Duration::from_millis(300);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let (b, n) = s.pass(&[me_t, one, two, gone], Instant::now(), 2);
        assert_eq!(n, 4);
        let mine = b[0].clone().expect("sample");
        assert!(mine.cpu_usage > 0.0, "{mine:?}");
        let b1 = b[1].clone().expect("sample");
        let b2 = b[2].clone().expect("sample");
        assert!(b1.fd >= 1 && b1.rss_bytes > 0, "{b1:?}");
        assert_eq!(b2.fd, 2 * b1.fd, "summed over instances");
        assert_eq!(b2.rss_bytes, 2 * b1.rss_bytes, "summed over instances");
        assert_eq!(
            b1.mem_usage,
            (b1.rss_bytes as f64 / (1u64 << 30) as f64 * 10_000.0).round() / 100.0
        );
        assert!(b[3].is_none(), "a wrong start time is another process");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kept handles are bound to the process they were opened on: after it exits they read
    /// nothing, whatever process gets its pid later.
    #[test]
    fn handles_of_an_exited_process_read_nothing() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let st = crate::procinfo::read_stat(pid).expect("child stat");
        let h = Handles::open(pid).expect("handles");
        let mut buf = Vec::new();
        assert!(read_raw(&h, st.starttime, &mut buf).is_some());
        let _ = child.kill();
        let _ = child.wait();
        assert!(read_raw(&h, st.starttime, &mut buf).is_none());
    }

    #[test]
    fn handles_are_kept_within_the_budget() {
        let mut kids: Vec<std::process::Child> = (0..3)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .expect("sleep")
            })
            .collect();
        let targets: Vec<Target> = kids
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pid = c.id() as i32;
                Target {
                    key: ProcKey::new("t", format!("k{i}")),
                    instances: vec![(
                        pid,
                        crate::procinfo::read_stat(pid).expect("stat").starttime,
                    )],
                    cgroups: Vec::new(),
                    limited: false,
                }
            })
            .collect();
        let host = HostFigures {
            mem_total_bytes: 1 << 30,
            cpus: 2,
        };
        let mut s = Sampler::with_budget(host, 2);
        for _ in 0..3 {
            let (out, read) = s.pass(&targets, Instant::now(), 1);
            assert_eq!(read, 3);
            assert!(out.iter().all(|o| o.as_ref().is_some_and(|x| x.fd >= 1)));
            assert_eq!(s.open_handles(), 2);
        }
        let mut none = Sampler::with_budget(host, 0);
        let (_, read) = none.pass(&targets, Instant::now(), 1);
        assert_eq!((read, none.open_handles()), (3, 0));
        // A process that is gone drops out, and so do its handles.
        let _ = kids[0].kill();
        let _ = kids[0].wait();
        let (out, read) = s.pass(&targets, Instant::now(), 2);
        assert_eq!(read, 2);
        assert!(out[0].is_none());
        assert_eq!(s.open_handles(), 2);
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        let _ = s.pass(&targets, Instant::now(), 3);
        assert_eq!(s.open_handles(), 0);
        assert!(handle_budget() > 0);
    }

    /// A process that has not run since the previous pass costs one `schedstat` read and
    /// keeps its figures; once it runs (here: opens a descriptor) the next pass reads it in
    /// full and shows the change; and it is read in full at least every
    /// [`FULL_READ_PASSES`] passes however idle it stays.
    #[test]
    fn a_process_that_did_not_run_is_read_in_full_only_when_it_ran_or_every_tenth_pass() {
        let mut child = descriptor_shell();
        let pid = child.id() as i32;
        let start = crate::procinfo::read_stat(pid).expect("stat").starttime;
        let targets = vec![Target {
            key: ProcKey::new("t", "quiet"),
            instances: vec![(pid, start)],
            cgroups: Vec::new(),
            limited: false,
        }];
        let host = HostFigures {
            mem_total_bytes: 1 << 30,
            cpus: 2,
        };
        let finish = |mut child: std::process::Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        if Handles::open(pid)
            .and_then(|h| h.ran(&mut Vec::new()))
            .is_none()
        {
            eprintln!("skipped: this kernel keeps no /proc/PID/schedstat figures");
            return finish(child);
        }
        let mut s = Sampler::with_budget(host, 16);
        // Passes until one skips it (the shell has reached its `read`), and its figures.
        let deadline = Instant::now() + Duration::from_secs(10);
        let before =
            pass_until_skipped(&mut s, &targets, Sampler::full_reads, deadline, "the shell");
        // Skipped, it keeps its figures.
        let full = s.full_reads();
        let (out, _) = s.pass(&targets, Instant::now(), 2);
        let again = out[0].clone().expect("a sample");
        assert_eq!(s.full_reads(), full, "an idle process is skipped");
        assert_eq!(
            (again.fd, again.rss_bytes, again.cpu_usage),
            (before.fd, before.rss_bytes, 0.0)
        );
        // It runs and opens a descriptor: the next pass reads it in full.
        open_descriptor_7(&mut child, deadline);
        let (out, _) = s.pass(&targets, Instant::now(), 3);
        assert_eq!(
            s.full_reads(),
            full + 1,
            "a process that ran is read in full"
        );
        assert_eq!(out[0].as_ref().expect("a sample").fd, before.fd + 1);
        // However idle, at most FULL_READ_PASSES - 1 passes in a row skip it.
        let longest = longest_skipped_run(|i| {
            let full = s.full_reads();
            s.pass(&targets, Instant::now(), 4 + i);
            s.full_reads() == full
        });
        assert!(longest >= 1, "the idle shell was never skipped");
        assert!(
            longest < FULL_READ_PASSES,
            "{longest} passes in a row skipped it"
        );
        // With a cpu or memory limit every pass reads it in full: each sample the limits
        // count is a new observation.
        let limited = vec![Target {
            limited: true,
            ..targets[0].clone()
        }];
        let mut s = Sampler::with_budget(host, 16);
        for i in 0..FULL_READ_PASSES {
            let full = s.full_reads();
            s.pass(&limited, Instant::now(), 100 + i as i64);
            assert_eq!(
                s.full_reads(),
                full + 1,
                "pass {i} of a limited process skipped it"
            );
        }
        finish(child);
    }

    /// A shell that waits for a line on its stdin, then opens descriptor 7 and waits again.
    fn descriptor_shell() -> std::process::Child {
        std::process::Command::new("sh")
            .arg("-c")
            .arg("read a; exec 7</dev/null; read b")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("sh")
    }

    /// Let a [`descriptor_shell`] go on, and wait (until `deadline`) until it holds its
    /// descriptor 7.
    fn open_descriptor_7(child: &mut std::process::Child, deadline: Instant) {
        use std::io::Write;
        child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("write");
        let fd7 = format!("/proc/{}/fd/7", child.id());
        while std::fs::symlink_metadata(&fd7).is_err() {
            assert!(
                Instant::now() < deadline,
                "the shell never opened its descriptor"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Passes over `targets`, 20 ms apart, until one in which `count` (of full readings)
    /// does not move (the processes stopped running; `what` did not, by `deadline`): its
    /// sample of the first target.
    fn pass_until_skipped<K: PartialEq>(
        s: &mut Sampler,
        targets: &[Target],
        count: impl Fn(&Sampler) -> K,
        deadline: Instant,
        what: &str,
    ) -> Sample {
        loop {
            let before = count(s);
            let (out, _) = s.pass(targets, Instant::now(), 1);
            if count(s) == before {
                return out[0].clone().expect("a sample");
            }
            assert!(Instant::now() < deadline, "{what} never stopped running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Over `3 * FULL_READ_PASSES` passes (`pass(i)` runs the i-th and says whether it
    /// skipped the full reading), the longest run of skipped ones.
    fn longest_skipped_run(mut pass: impl FnMut(i64) -> bool) -> u64 {
        let (mut in_a_row, mut longest) = (0, 0);
        for i in 0..(3 * FULL_READ_PASSES) {
            if pass(i as i64) {
                in_a_row += 1;
                longest = longest.max(in_a_row);
            } else {
                in_a_row = 0;
            }
        }
        longest
    }

    /// A cgroup of this test's own below the cgroup v2 mount (root), killed and removed
    /// when dropped; `None` with the reason printed where it cannot be made.
    struct TestCgroup(std::path::PathBuf);

    impl TestCgroup {
        fn make(name: &str) -> Option<TestCgroup> {
            let skip = |why: String| {
                eprintln!("skipped: {why}");
                None
            };
            if !rustix::process::geteuid().is_root() {
                return skip("needs root".into());
            }
            let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            let Some(mount) = crate::cgroup::v2_mount(&info) else {
                return skip("no cgroup v2 mount".into());
            };
            let dir = mount.join(format!(
                "procagent-test-probe-{}-{name}",
                std::process::id()
            ));
            match std::fs::create_dir(&dir) {
                Ok(()) if dir.join("cgroup.kill").exists() => Some(TestCgroup(dir)),
                Ok(()) => {
                    let _ = std::fs::remove_dir(&dir);
                    skip("cgroup.kill is not supported".into())
                }
                Err(e) => skip(format!("{}: {e}", dir.display())),
            }
        }

        /// Start `sh -c script` and move it in; its pid and start time.
        fn spawn(&self, script: &str) -> (std::process::Child, (i32, u64)) {
            let child = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("sh");
            let pid = child.id() as i32;
            std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move in");
            let start = crate::procinfo::read_stat(pid).expect("stat").starttime;
            (child, (pid, start))
        }

        /// Kill what it holds and wait (bounded) until it is empty.
        fn empty(&self) {
            let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(10);
            while crate::cgroup::populated(&self.0) == Some(true) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            self.empty();
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// Containment: a cgroup in which nothing ran since the previous pass costs one read of
    /// its kept `cpu.stat` and keeps its figures; one in which something ran (here: a second
    /// process moved in and spinning) is read in full at the next pass and shows it; however
    /// idle, it is read in full at least every [`FULL_READ_PASSES`] passes; with a limit,
    /// every pass. A cgroup removed and made again at the same path is read anew.
    #[test]
    fn an_idle_cgroup_is_read_by_its_cpu_stat_alone_and_in_full_when_it_ran() {
        let Some(cg) = TestCgroup::make("quiet") else {
            return;
        };
        let (mut idle, id) = cg.spawn("exec sleep 100");
        let target = |instances: Vec<(i32, u64)>, limited: bool| Target {
            key: ProcKey::new("t", "contained"),
            instances,
            cgroups: vec![cg.0.clone()],
            limited,
        };
        let targets = vec![target(vec![id], false)];
        let host = HostFigures {
            mem_total_bytes: 1 << 30,
            cpus: 2,
        };
        let mut s = Sampler::with_budget(host, 16);
        let deadline = Instant::now() + Duration::from_secs(10);
        let before = pass_until_skipped(
            &mut s,
            &targets,
            Sampler::cgroup_full_reads,
            deadline,
            "the cgroup",
        );
        assert!(before.from_cgroup);
        assert_eq!((before.pids, before.cpu_usage), (1, 0.0));
        assert_eq!(s.open_cgroup_handles(), 1, "its cpu.stat is kept open");
        // However idle, at most FULL_READ_PASSES - 1 passes in a row skip it.
        let longest = longest_skipped_run(|i| {
            let full = s.cgroup_full_reads();
            let (out, _) = s.pass(&targets, Instant::now(), 2 + i);
            assert_eq!(out[0].as_ref().map(|o| o.pids), Some(1));
            s.cgroup_full_reads() == full
        });
        assert!(longest >= 1, "the idle cgroup was never skipped");
        assert!(
            longest < FULL_READ_PASSES,
            "{longest} passes in a row skipped it"
        );
        // Something else in it runs: the next pass reads it in full.
        let (mut busy, _) = cg.spawn("while :; do :; done");
        std::thread::sleep(Duration::from_millis(50));
        let full = s.cgroup_full_reads();
        let (out, _) = s.pass(&targets, Instant::now(), 100);
        assert_eq!(
            s.cgroup_full_reads(),
            full + 1,
            "a cgroup that ran is read in full"
        );
        let busy_sample = out[0].clone().expect("a sample");
        assert_eq!(busy_sample.pids, 2, "{busy_sample:?}");
        let _ = busy.kill();
        let _ = busy.wait();
        // With a limit, every pass reads it in full.
        let limited = vec![target(vec![id], true)];
        for i in 0..FULL_READ_PASSES {
            let full = s.cgroup_full_reads();
            s.pass(&limited, Instant::now(), 200 + i as i64);
            assert_eq!(
                s.cgroup_full_reads(),
                full + 1,
                "pass {i} of a limited cgroup skipped it"
            );
        }
        // Without a kept handle (no budget) the figures are the same.
        let mut none = Sampler::with_budget(host, 0);
        let (out, _) = none.pass(&targets, Instant::now(), 300);
        assert_eq!(
            out[0].as_ref().map(|o| (o.pids, o.from_cgroup)),
            Some((1, true))
        );
        assert_eq!(none.open_cgroup_handles(), 0);
        // Removed and made again: the kept handle reads a removed cgroup, so the path is opened
        // anew and the new cgroup's process counted.
        let spun = s.cgroups[cg.0.as_os_str()].usec.expect("usage read");
        cg.empty();
        let _ = idle.wait();
        std::fs::remove_dir(&cg.0).expect("rmdir");
        std::fs::create_dir(&cg.0).expect("mkdir");
        let (mut again, id2) = cg.spawn("exec sleep 100");
        let (out, _) = s.pass(&[target(vec![id2], false)], Instant::now(), 400);
        assert_eq!(out[0].as_ref().map(|o| o.pids), Some(1));
        assert_eq!(s.open_cgroup_handles(), 1);
        let usec = s.cgroups[cg.0.as_os_str()]
            .usec
            .expect("the new cgroup's cpu.stat read");
        assert!(
            usec < spun,
            "{usec} usec: the removed cgroup's figures ({spun} usec) read"
        );
        cg.empty();
        let _ = again.wait();
    }

    /// Containment: a full reading that failed (here: a pressure file that cannot be read)
    /// does not stand (the next pass reads the cgroup in full again, though its cpu did not
    /// move) and does not stop the cpu from counting. A directory of files stands for the
    /// cgroup.
    #[test]
    fn a_failed_cgroup_reading_is_read_again_and_the_cpu_still_counts() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cgroup.procs"), "").unwrap();
        std::fs::create_dir(d.path().join("cpu.pressure")).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let start = crate::procinfo::read_stat(pid).expect("stat").starttime;
        let targets = vec![Target {
            key: ProcKey::new("t", "unreadable"),
            instances: vec![(pid, start)],
            cgroups: vec![d.path().to_path_buf()],
            limited: false,
        }];
        let host = HostFigures {
            mem_total_bytes: 1 << 30,
            cpus: 2,
        };
        let mut s = Sampler::with_budget(host, 16);
        let t0 = Instant::now();
        let usage = |u: u64| std::fs::write(d.path().join("cpu.stat"), format!("usage_usec {u}\n"));
        usage(1_000).unwrap();
        s.pass(&targets, t0, 1);
        usage(301_000).unwrap();
        let (out, _) = s.pass(&targets, t0 + Duration::from_secs(1), 2);
        let cpu = out[0].as_ref().expect("a sample").cpu_usage;
        assert!((cpu - 30.0).abs() < 0.01, "{cpu}");
        let full = s.cgroup_full_reads();
        s.pass(&targets, t0 + Duration::from_secs(2), 3);
        assert_eq!(s.cgroup_full_reads(), full + 1, "a failed reading stood");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Containment: an instance in a cgroup in which nothing ran is not read (its cgroup's
    /// `cpu.stat` says it did not run); once it runs (here: opens a descriptor) the next pass
    /// reads it in full and shows the change. An instance that is not in its cgroup (an
    /// adopted process left where it was) is read by its own `schedstat`.
    #[test]
    fn an_instance_in_an_idle_cgroup_is_read_in_full_once_it_runs() {
        let Some(cg) = TestCgroup::make("instance") else {
            return;
        };
        let host = HostFigures {
            mem_total_bytes: 1 << 30,
            cpus: 2,
        };
        let shell = |inside: bool| {
            let child = descriptor_shell();
            let pid = child.id() as i32;
            if inside {
                std::fs::write(cg.0.join("cgroup.procs"), pid.to_string()).expect("move in");
            }
            let start = crate::procinfo::read_stat(pid).expect("stat").starttime;
            (child, (pid, start))
        };
        // The one in the cgroup first (it stays idle in it while the other is checked).
        let (mut inside, id_in) = shell(true);
        let (mut outside, id_out) = shell(false);
        for (child, id) in [(&mut inside, id_in), (&mut outside, id_out)] {
            let targets = vec![Target {
                key: ProcKey::new("t", "in-cgroup"),
                instances: vec![id],
                cgroups: vec![cg.0.clone()],
                limited: false,
            }];
            let mut s = Sampler::with_budget(host, 16);
            let deadline = Instant::now() + Duration::from_secs(10);
            let both = |s: &Sampler| (s.full_reads(), s.cgroup_full_reads());
            let before = pass_until_skipped(&mut s, &targets, both, deadline, "the shell");
            open_descriptor_7(child, deadline);
            let full = s.full_reads();
            let (out, _) = s.pass(&targets, Instant::now(), 2);
            assert_eq!(
                s.full_reads(),
                full + 1,
                "an instance that ran is read in full"
            );
            assert_eq!(out[0].as_ref().expect("a sample").fd, before.fd + 1);
        }
        for c in [&mut inside, &mut outside] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The network figures cover the whole tree: a socket made by a process and shared with
    /// its forked child counts once, with the bytes that went over it, through the children
    /// files and through the scan of every process alike.
    #[test]
    fn tree_sockets_count_once_and_keep_their_bytes() {
        use std::io::{Read, Write};
        if crate::sockdiag::dump().is_err() {
            eprintln!("no sock_diag here: skipped");
            return;
        }
        for walk_children in [true, false] {
            if walk_children && !super::children_files() {
                continue;
            }
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = l.local_addr().expect("addr").port();
            // The parent (two threads: its children are found through the task directory)
            // connects and forks; the child (one thread: its own children file) sends 1000
            // bytes on the shared socket and 500 on one of its own, then waits for a line on
            // stdin, closes the shared one, and sleeps.
            let script = format!(
                "import os, socket, sys, threading, time\n\
                 threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n\
                 c = socket.create_connection(('127.0.0.1', {port}))\n\
                 if os.fork() == 0:\n\
                 \x20   c.sendall(b'z' * 1000)\n\
                 \x20   d = socket.create_connection(('127.0.0.1', {port}))\n\
                 \x20   d.sendall(b'w' * 500)\n\
                 \x20   sys.stdin.readline()\n\
                 \x20   c.close()\n\
                 time.sleep(60)\n"
            );
            let mut child = std::process::Command::new("python3")
                .arg("-c")
                .arg(&script)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("python3");
            let pid = child.id() as i32;
            let (mut a, _) = l.accept().expect("accept");
            let mut got = [0u8; 1000];
            a.read_exact(&mut got).expect("1000 bytes");
            let (mut b, _) = l.accept().expect("accept the child's own");
            b.read_exact(&mut got[..500]).expect("500 bytes");
            let target = Target {
                key: ProcKey::new("t", "tree"),
                instances: vec![(
                    pid,
                    crate::procinfo::read_stat(pid).expect("stat").starttime,
                )],
                cgroups: Vec::new(),
                limited: false,
            };
            let mut s = Sampler::new(HostFigures {
                mem_total_bytes: 1 << 30,
                cpus: 2,
            });
            s.walk_children = walk_children;
            let deadline = Instant::now() + Duration::from_secs(20);
            let first = loop {
                let (out, _) = s.pass(std::slice::from_ref(&target), Instant::now(), 1);
                let x = out[0].clone().expect("sample");
                if x.net_sent_bytes >= 1502 {
                    break x;
                }
                assert!(Instant::now() < deadline, "{walk_children}: {x:?}");
                std::thread::sleep(Duration::from_millis(20));
            };
            // bytes_acked counts each SYN as a byte; the parent's and the child's copy of the
            // shared socket count once (2502 would be twice).
            assert_eq!(
                first.net_sent_bytes, 1502,
                "{walk_children}: once, {first:?}"
            );
            assert_eq!(first.net_sockets, 2, "{walk_children}: {first:?}");
            // The child closes its copy: the parent still holds the socket.
            let stdin = child.stdin.as_mut().expect("stdin");
            stdin.write_all(b"\n").expect("write");
            stdin.flush().expect("flush");
            a.write_all(&[1u8; 300]).expect("reply");
            let deadline = Instant::now() + Duration::from_secs(20);
            let later = loop {
                let (out, _) = s.pass(std::slice::from_ref(&target), Instant::now(), 2);
                let x = out[0].clone().expect("sample");
                if x.net_received_bytes >= 300 {
                    break x;
                }
                assert!(Instant::now() < deadline, "{walk_children}: {x:?}");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert_eq!(later.net_sent_bytes, 1502, "{later:?}");
            assert_eq!(later.net_received_bytes, 300, "{later:?}");
            // The whole tree exits: no sample.
            let _ = child.kill();
            let _ = child.wait();
            let (out, _) = s.pass(std::slice::from_ref(&target), Instant::now(), 3);
            assert!(out[0].is_none(), "the instance is gone");
        }
    }

    /// `python3 ARGS` with its stdout piped, once it printed `ready`; `None` (the reason
    /// printed) where there is no python3.
    fn python_ready(args: &[&str]) -> Option<std::process::Child> {
        let have = std::process::Command::new("python3")
            .args(["-c", "1"])
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            eprintln!("skipped: needs python3");
            return None;
        }
        let mut child = std::process::Command::new("python3")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("ready");
        assert_eq!(line.trim(), "ready");
        Some(child)
    }

    #[test]
    fn the_host_sockets_are_dumped_only_while_a_tree_holds_a_socket() {
        let host = HostFigures {
            mem_total_bytes: 1 << 30,
            cpus: 2,
        };
        let target = |child: &std::process::Child, name: &str| {
            let pid = child.id() as i32;
            Target {
                key: ProcKey::new("t", name),
                instances: vec![(
                    pid,
                    crate::procinfo::read_stat(pid).expect("stat").starttime,
                )],
                cgroups: Vec::new(),
                limited: false,
            }
        };
        let quiet = |cmd: &mut std::process::Command| {
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn")
        };
        // No socket anywhere in the tree: three passes, no dump.
        let mut plain = quiet(std::process::Command::new("sleep").arg("30"));
        let t = target(&plain, "plain");
        let mut s = Sampler::new(host);
        for at in 1..=3 {
            let (out, _) = s.pass(std::slice::from_ref(&t), Instant::now(), at);
            assert_eq!(out[0].as_ref().expect("sample").net_sockets, 0);
        }
        assert_eq!(s.dumps, 0, "no tree holds a socket");
        let _ = plain.kill();
        let _ = plain.wait();
        // A listening socket: found by the first pass, dumped and counted from the second.
        let Some(mut child) = python_ready(&[
            "-c",
            "import socket,sys,time\ns=socket.socket(); s.bind(('127.0.0.1',0)); s.listen()\nprint('ready',flush=True)\ntime.sleep(30)",
        ]) else {
            return;
        };
        let t = target(&child, "listener");
        let mut s = Sampler::new(host);
        let _ = s.pass(std::slice::from_ref(&t), Instant::now(), 1);
        let (out, _) = s.pass(std::slice::from_ref(&t), Instant::now(), 2);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(s.dumps, 1, "dumped once the tree was seen holding a socket");
        assert_eq!(out[0].as_ref().expect("sample").net_sockets, 1);
    }

    /// A managed account's processes may share one descriptor table (`clone` with
    /// `CLONE_FILES`): each is a member of the tree whose `/proc/PID/fd` lists the same
    /// descriptors. 41 such processes over 3000 descriptors must not make the root sampler
    /// read and keep 41 x 3000 entries a pass (4096 x 65536 in the worst case): what one
    /// definition's trees cost is bounded, and a socket duplicated on every descriptor is one.
    #[test]
    fn processes_sharing_a_descriptor_table_cost_the_sampler_a_bounded_listing() {
        let script = concat!(
            "import ctypes, os, resource, socket, sys, time\n",
            "n, kids, distinct = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == '1'\n",
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n",
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))\n",
            "keep = []\n",
            "base = socket.socket(); base.bind(('127.0.0.1', 0)); base.listen()\n",
            "for _ in range(n):\n",
            "    keep.append(socket.socketpair()[0] if distinct else os.dup(base.fileno()))\n",
            "libc = ctypes.CDLL(None, use_errno=True)\n",
            "for _ in range(kids):\n",
            "    if libc.syscall(56, 0x400 | 17, 0, 0, 0, 0) == 0:\n",
            "        time.sleep(60); os._exit(0)\n",
            "print('ready', flush=True)\n",
            "time.sleep(60)\n",
        );
        if !cfg!(target_arch = "x86_64") {
            eprintln!("skipped: needs x86_64 (raw clone)");
            return;
        }
        for distinct in ["0", "1"] {
            let Some(mut child) = python_ready(&["-c", script, "3000", "40", distinct]) else {
                return;
            };
            let pid = child.id() as i32;
            let st = crate::procinfo::read_stat(pid).expect("stat");
            let mut s = Sampler::new(HostFigures {
                mem_total_bytes: 1 << 30,
                cpus: 2,
            });
            let t = Target {
                key: ProcKey::new("t", "shared"),
                instances: vec![(pid, st.starttime)],
                cgroups: Vec::new(),
                limited: false,
            };
            // The first pass finds the sockets; the dump that places them comes with the
            // next one.
            let _ = s.pass(std::slice::from_ref(&t), Instant::now(), 1);
            let (out, _) = s.pass(std::slice::from_ref(&t), Instant::now(), 1);
            let sample = out[0].clone().expect("sample");
            let members = s.members.len();
            // The budget bounds the socket entries listed or kept; `inet` is a subset of them.
            let listed: usize = s.members.values().map(|m| m.sockets.len()).sum();
            assert!(
                s.members.values().all(|m| m.inet.len() <= m.sockets.len()),
                "inet entries are sockets the listing found"
            );
            let kept = listed;
            let _ = child.kill();
            let _ = child.wait();
            assert!(members >= 41, "the tree's processes: {members}");
            assert!(
                kept <= 1 << 16,
                "distinct={distinct}: {kept} socket entries kept for one definition"
            );
            if distinct == "0" {
                assert_eq!(sample.net_sockets, 1, "{sample:?}");
                assert!(
                    kept <= 2 * members,
                    "one socket on every descriptor: {kept}"
                );
            }
        }
    }
}
