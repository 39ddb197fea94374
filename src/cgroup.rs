//! Containment: where the agent's cgroup v2 subtree is, and the cgroups of each process in
//! it (docs/architecture.md "Containment").
//!
//! `[supervisor] cgroup_root` chooses the mode ([`detect`]): `""` is off (today's tracking by
//! pidfd, process group and session); a path is that subtree (it must be a writable
//! directory of the cgroup v2 hierarchy); `"auto"` uses the subtree systemd delegates to the
//! agent (`Delegate=yes`), and is off where the agent does not run under systemd.
//!
//! Each instance I of a process runs in `ROOT/procs/<namespace>/<name>/<I>` and the process's
//! control commands (stop, reload, health, version) in the sibling `.../control`, so killing
//! an instance's cgroup never kills the command stopping it. Names are escaped
//! ([`escape`]): the escaping is injective, so two keys never share a cgroup, and no key
//! can name a kernel file (`cgroup.procs`).
//!
//! Everything here touches the cgroup file system and blocks: callers run it on the
//! file-system pool or at start-up, never on an async worker.

use std::io;
use std::path::{Path, PathBuf};

use crate::spec::ProcKey;

/// Why containment is off, or where it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Off { why: String },
    On(Tree),
}

impl Mode {
    /// The subtree, when containment is on.
    pub fn tree(&self) -> Option<&Tree> {
        match self {
            Mode::On(t) => Some(t),
            Mode::Off { .. } => None,
        }
    }

    /// One line for health and logs: "off (why)" or "on at PATH (controllers: ...)".
    pub fn describe(&self) -> String {
        match self {
            Mode::Off { why } => format!("off ({why})"),
            Mode::On(t) => format!(
                "on at {} (controllers: {})",
                t.root.display(),
                match (&t.enabled[..], &t.no_controllers) {
                    ([], Some(why)) => format!("none ({why})"),
                    ([], None) => "none".to_string(),
                    (on, _) => on.join(" "),
                }
            ),
        }
    }
}

/// The agent's subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The cgroup v2 mount point.
    pub mount: PathBuf,
    pub root: PathBuf,
    /// The controllers available in it (`cgroup.controllers` of the root).
    pub controllers: Vec<String>,
    /// The controllers enabled for the processes' cgroups ([`WANTED`] of `controllers`,
    /// written into `cgroup.subtree_control` from the root down to each process's directory).
    pub enabled: Vec<String>,
    /// Why none is enabled although some are available (the root holds processes itself).
    pub no_controllers: Option<String>,
}

/// The controllers the agent enables for its processes where the subtree has them.
pub const WANTED: [&str; 4] = ["cpu", "memory", "io", "pids"];

/// The cgroup v2 mount point in the text of `/proc/self/mountinfo` (the first `cgroup2`).
pub fn v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| crate::procinfo::mountinfo_path(point))
    })
}

/// The cgroup v2 path of a process in the text of `/proc/PID/cgroup` (the `0::PATH` line).
pub fn v2_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_string())
}

/// A key part as a cgroup directory name: ASCII letters, digits, `_` and `-` kept, every
/// other byte `%XX`; so the escaping is injective, never empty, never `.`-led and never a
/// kernel file name. Longer than 200 bytes (a cgroup name is at most 255): the first 160
/// escaped bytes, `~`, and 32 hex digits of SHA-256 over the raw part.
pub fn escape(part: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write as _;
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    // The common case, a name of plain characters, is itself (the sampler builds each
    // instance's path every pass).
    if !part.is_empty() && part.len() <= 200 && part.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(part);
    }
    let mut out = String::new();
    for b in part.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    if out.len() > 200 {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(part.as_bytes());
        out.truncate(160);
        // Not inside an escape.
        while out.ends_with('%') || out.len() >= 2 && out.as_bytes()[out.len() - 2] == b'%' {
            out.pop();
        }
        out.push('~');
        for b in &d[..16] {
            let _ = write!(out, "{b:02x}");
        }
    }
    out.into()
}

impl Tree {
    /// The directory of `key`'s cgroups.
    pub fn process_dir(&self, key: &ProcKey) -> PathBuf {
        self.dir_of(key, None)
    }

    /// Instance `i`'s cgroup.
    pub fn instance(&self, key: &ProcKey, i: usize) -> PathBuf {
        self.dir_of(key, Some(i))
    }

    /// `key`'s directory, or its instance `i`'s, built in one allocation.
    fn dir_of(&self, key: &ProcKey, i: Option<usize>) -> PathBuf {
        use std::fmt::Write as _;
        let (ns, name) = (escape(&key.namespace), escape(&key.name));
        let root = self.root.as_os_str();
        let mut tail = String::with_capacity(ns.len() + name.len() + 30);
        let _ = write!(tail, "/procs/{ns}/{name}");
        if let Some(i) = i {
            let _ = write!(tail, "/{i}");
        }
        let mut p = std::ffi::OsString::with_capacity(root.len() + tail.len());
        p.push(root);
        // One separator (the root is a path like any other: it may end in one).
        let tail = match root.as_encoded_bytes().last() {
            Some(b'/') => &tail[1..],
            _ => &tail[..],
        };
        p.push(tail);
        PathBuf::from(p)
    }

    /// The control leaf: where `key`'s stop, reload, health and version commands run.
    pub fn control(&self, key: &ProcKey) -> PathBuf {
        self.process_dir(key).join("control")
    }

    /// Is controller `c` enabled for the processes' cgroups?
    pub fn has(&self, c: &str) -> bool {
        self.enabled.iter().any(|e| e == c)
    }

    /// Create `dir` (and its parents below the root) if missing. With controllers enabled,
    /// each level above `dir` gets them in its `cgroup.subtree_control` (written only when
    /// missing), so `dir` has their files. Blocking.
    pub fn ensure(&self, dir: &Path) -> io::Result<()> {
        let Ok(below) = dir.strip_prefix(&self.root) else {
            return Err(io::Error::other(format!(
                "{} is outside the agent's cgroup subtree {}",
                dir.display(),
                self.root.display()
            )));
        };
        if self.enabled.is_empty() {
            return std::fs::create_dir_all(dir);
        }
        let mut level = self.root.clone();
        let parts: Vec<_> = below.components().collect();
        for (n, part) in parts.iter().enumerate() {
            level.push(part);
            match std::fs::create_dir(&level) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            if n + 1 < parts.len() {
                enable_controllers(&level, &self.enabled)?;
            }
        }
        Ok(())
    }
}

/// Make `dir`'s `cgroup.subtree_control` hold `controllers` (only the missing ones are
/// written). Blocking.
pub fn enable_controllers(dir: &Path, controllers: &[String]) -> io::Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let have = std::fs::read_to_string(&file)?;
    let have: Vec<&str> = have.split_whitespace().collect();
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !have.contains(&c.as_str()))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::write(&file, missing.join(" "))
}

/// The limits of one instance's cgroup, from its definition (`None`: no limit, `max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// `memory.high`: `mem_lmt` of MemTotal. Over it the kernel throttles the cgroup and
    /// counts a `high` event, which the agent answers with GSE's stop path.
    pub memory_high: Option<u64>,
    /// `memory.max`: above `memory.high` by the margin, the backstop that protects the host
    /// while stop_cmd runs (with `memory.oom.group` 1: an OOM kill takes the whole cgroup).
    pub memory_max: Option<u64>,
    /// `cpu.max` quota per 100 ms period (throttling, when chosen instead of stopping).
    pub cpu_quota_usec: Option<u64>,
}

/// The period of `cpu.max` (the kernel's default).
pub const CPU_PERIOD_USEC: u64 = 100_000;

impl Limits {
    /// The limits of a definition: `mem_lmt` and `cpu_lmt` are percents (of MemTotal, of
    /// the whole machine); 0 is none. `margin` is `memory.max` above `memory.high`, a
    /// percent of it; `throttle` says whether cpu is throttled (`cpu.max`) or polled.
    pub fn of(
        mem_lmt: f64,
        cpu_lmt: f64,
        mem_total: u64,
        cpus: usize,
        margin: f64,
        throttle: bool,
    ) -> Limits {
        let memory_high = (mem_lmt > 0.0 && mem_lmt.is_finite())
            .then(|| ((mem_total as f64) * mem_lmt.min(100.0) / 100.0) as u64)
            .map(|b| b.max(1 << 20));
        let memory_max = memory_high.map(|h| {
            let m = (h as f64 * (1.0 + margin.clamp(0.0, 1000.0) / 100.0)) as u64;
            m.max(h + (1 << 20))
        });
        let cpu_quota_usec = (throttle && cpu_lmt > 0.0 && cpu_lmt.is_finite()).then(|| {
            let q = CPU_PERIOD_USEC as f64 * cpus.max(1) as f64 * cpu_lmt.min(100.0) / 100.0;
            // The kernel refuses a quota under 1 ms.
            (q as u64).max(1000)
        });
        Limits {
            memory_high,
            memory_max,
            cpu_quota_usec,
        }
    }

    /// Write them into cgroup `dir`, for the controllers `tree` enabled (`max` where there
    /// is no limit, so a limit removed from the definition is lifted). Blocking.
    pub fn apply(&self, tree: &Tree, dir: &Path) -> io::Result<()> {
        let num = |v: Option<u64>| v.map_or_else(|| "max".to_string(), |b| b.to_string());
        if tree.has("memory") {
            // The kernel takes them in either order (high may exceed max). A limit lowered
            // under the current usage acts at once: reclaim, the high event, or an OOM kill.
            std::fs::write(dir.join("memory.max"), num(self.memory_max))?;
            std::fs::write(dir.join("memory.high"), num(self.memory_high))?;
            std::fs::write(dir.join("memory.oom.group"), "1")?;
        }
        if tree.has("cpu") {
            std::fs::write(
                dir.join("cpu.max"),
                format!("{} {CPU_PERIOD_USEC}", num(self.cpu_quota_usec)),
            )?;
        }
        Ok(())
    }
}

/// The counts of a cgroup's `memory.events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEvents {
    /// Times usage went over `memory.high` (and was throttled).
    pub high: u64,
    /// Times usage reached `memory.max`.
    pub max: u64,
    /// Processes the OOM killer killed in it.
    pub oom_kill: u64,
    /// Times the OOM killer killed the whole group (`memory.oom.group`).
    pub oom_group_kill: u64,
}

/// Parse a `memory.events` text (unknown lines ignored).
pub fn parse_memory_events(text: &str) -> MemoryEvents {
    let mut e = MemoryEvents::default();
    for l in text.lines() {
        let Some((k, v)) = l.split_once(' ') else {
            continue;
        };
        let Ok(v) = v.trim().parse::<u64>() else {
            continue;
        };
        match k {
            "high" => e.high = v,
            "max" => e.max = v,
            "oom_kill" => e.oom_kill = v,
            "oom_group_kill" => e.oom_group_kill = v,
            _ => {}
        }
    }
    e
}

/// Read cgroup `dir`'s `memory.events` (`None` without the memory controller). Blocking.
pub fn memory_events(dir: &Path) -> Option<MemoryEvents> {
    std::fs::read_to_string(dir.join("memory.events"))
        .ok()
        .map(|t| parse_memory_events(&t))
}

/// Where a command is placed: a cgroup of the agent's subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub tree: Tree,
    pub dir: PathBuf,
}

impl Placement {
    /// Create the cgroup if missing and open its directory for the child (created inside
    /// it: `clone3` with `CLONE_INTO_CGROUP`; on a kernel without that, the child moves
    /// itself through the directory's `cgroup.procs`). Blocking.
    pub fn open(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.tree.ensure(&self.dir)?;
        Ok(std::os::fd::OwnedFd::from(std::fs::File::open(&self.dir)?))
    }
}

/// The pids in cgroup `dir` (empty when it does not exist). Blocking.
pub fn procs(dir: &Path) -> Vec<i32> {
    let Ok(f) = rustix::fs::openat(
        rustix::fs::CWD,
        dir.join("cgroup.procs"),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return Vec::new();
    };
    read_procs(&f, usize::MAX, &mut Vec::new())
        .map(|(pids, _)| pids)
        .unwrap_or_default()
}

/// Does cgroup `dir` hold a process (`cgroup.events` `populated`)? `None` when it does not
/// exist. Blocking.
pub fn populated(dir: &Path) -> Option<bool> {
    let t = std::fs::read_to_string(dir.join("cgroup.events")).ok()?;
    t.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() == "1")
}

/// An inotify descriptor (non-blocking) that becomes readable when cgroup `dir`'s
/// `cgroup.events` changes (the kernel notifies a modification when `populated` flips), so a
/// stop waits for its cgroup to empty without polling it.
pub fn events_watch(dir: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    inotify::add_watch(&fd, dir.join("cgroup.events"), inotify::WatchFlags::MODIFY)?;
    Ok(fd)
}

/// Read (and discard) what an [`events_watch`] descriptor holds.
pub fn drain_events(fd: &std::os::fd::OwnedFd) {
    let mut buf = [0u8; 1024];
    while rustix::io::read(fd, &mut buf).is_ok_and(|n| n > 0) {}
}

/// Kill every process of cgroup `dir` and its descendants at once (`cgroup.kill`, 5.14+).
/// Blocking.
pub fn kill(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.kill"), b"1")
}

impl Tree {
    /// The cgroup directory `pid` is in, when it can be read. Blocking.
    pub fn cgroup_of(&self, pid: i32) -> Option<PathBuf> {
        let t = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let p = v2_path(&t)?;
        Some(self.mount.join(p.trim_start_matches('/')))
    }

    /// Is `pid` in cgroup `dir` or below it? Blocking.
    pub fn holds(&self, dir: &Path, pid: i32) -> bool {
        self.cgroup_of(pid).is_some_and(|c| c.starts_with(dir))
    }

    /// Move `pid` into cgroup `dir` (created if missing). Blocking.
    pub fn move_into(&self, dir: &Path, pid: i32) -> io::Result<()> {
        self.ensure(dir)?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
    }

    /// Would moving a process out of cgroup `from` take it out of a limit? The first limit
    /// (`memory.max`, `memory.high`, `cpu.max`, `pids.max`, `io.max`) set in `from` or an
    /// ancestor that is not also an ancestor of the agent's subtree (whose limits stay with
    /// it), as "PATH: FILE VALUE". Blocking.
    pub fn limit_left_behind(&self, from: &Path) -> Option<String> {
        let mut dir = from;
        while dir.starts_with(&self.mount) && dir != self.mount && !self.root.starts_with(dir) {
            if let Some(l) = limit_in(dir) {
                return Some(format!("{}: {l}", dir.display()));
            }
            dir = dir.parent()?;
        }
        None
    }
}

/// The first limit set in cgroup `dir` ("FILE VALUE"), of the files that exist there.
pub fn limit_in(dir: &Path) -> Option<String> {
    for f in ["memory.max", "memory.high", "cpu.max", "pids.max", "io.max"] {
        let Ok(t) = std::fs::read_to_string(dir.join(f)) else {
            continue;
        };
        let t = t.trim();
        let unlimited = match f {
            // "max 100000": no quota; io.max lists only the devices that have a limit.
            "cpu.max" => t.split_whitespace().next() == Some("max"),
            "io.max" => t.is_empty(),
            _ => t == "max",
        };
        if !unlimited {
            return Some(format!("{f} {t}"));
        }
    }
    None
}

/// Remove `key`'s cgroups that hold no process (leaves first). Blocking.
pub fn remove_empty(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty(&e.path());
        }
    }
    // rmdir fails (EBUSY) while the cgroup holds a process or a child cgroup.
    let _ = std::fs::remove_dir(dir);
}

/// Figures of one cgroup (its whole tree), each where its file exists.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    /// `cpu.stat` `usage_usec` (present without the cpu controller).
    pub cpu_usec: Option<u64>,
    /// `memory.current` (the memory controller).
    pub memory_bytes: Option<u64>,
    /// `pids.current` (the pids controller), else the lines of `cgroup.procs`.
    pub pids: u64,
    /// `io.stat` `rbytes + wbytes` over every device (the io controller), cumulative since
    /// the cgroup was created.
    pub io_bytes: Option<u64>,
    /// Pressure stall `some avg10` of cpu, memory and io (PSI, where the kernel has it).
    pub psi_cpu: Option<f64>,
    pub psi_memory: Option<f64>,
    pub psi_io: Option<f64>,
}

/// The `usage_usec` line of a `cpu.stat` text.
pub fn parse_cpu_usage(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// The bytes read and written (`rbytes` + `wbytes`) over the devices of an `io.stat` text.
pub fn parse_io_bytes(text: &str) -> u64 {
    text.split_whitespace()
        .filter_map(|f| {
            f.strip_prefix("rbytes=")
                .or_else(|| f.strip_prefix("wbytes="))
        })
        .filter_map(|v| v.parse::<u64>().ok())
        .fold(0u64, u64::saturating_add)
}

/// The `some avg10=` figure of a `*.pressure` text.
pub fn parse_pressure_some_avg10(text: &str) -> Option<f64> {
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

/// Which of the optional figure files a process cgroup has: those of the controllers
/// enabled for it. Without a controller its files do not exist, and a lookup that fails
/// costs as much as one that succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FigureFiles {
    /// `memory.current` (memory controller).
    pub memory: bool,
    /// `pids.current` (pids controller; else the processes are counted from `cgroup.procs`).
    pub pids: bool,
    /// `io.stat` (io controller).
    pub io: bool,
}

impl FigureFiles {
    /// Try every file (a cgroup whose controllers are not known).
    pub const ALL: FigureFiles = FigureFiles {
        memory: true,
        pids: true,
        io: true,
    };

    /// The files of the controllers `enabled` (a [`Tree`]'s).
    pub fn of(enabled: &[String]) -> FigureFiles {
        let on = |c: &str| enabled.iter().any(|e| e == c);
        FigureFiles {
            memory: on("memory"),
            pids: on("pids"),
            io: on("io"),
        }
    }
}

/// A full reading of cgroup `dir`: the first `max_procs` processes `cgroup.procs` lists
/// (sorted), and the figures besides its cpu (`cpu_usec` is left `None`: the caller reads
/// `cpu.stat` on its own); of the optional files only those `files` names are tried. Every file is
/// opened relative to one handle of the directory, so the path is walked once. `None` when
/// the directory cannot be opened (removed) or a file that exists cannot be read. Blocking
/// (small reads of the cgroup file system; `cgroup.procs` is read in pieces, so a cgroup of
/// any size costs no more memory than `max_procs`).
pub fn full_reading(
    dir: &Path,
    files: FigureFiles,
    max_procs: usize,
) -> Option<(Vec<i32>, Figures)> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::openat(
        rustix::fs::CWD,
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut text = Vec::with_capacity(4096);
    let procs_file = rustix::fs::openat(
        &fd,
        c"cgroup.procs",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let (mut procs, listed) = read_procs(&procs_file, max_procs, &mut text).ok()?;
    procs.sort_unstable();
    let mut num = |name, on| {
        read_at(&fd, name, on, &mut text).map(|t| t.and_then(|t| t.trim().parse::<u64>().ok()))
    };
    let memory_bytes = num(c"memory.current", files.memory).ok()?;
    let pids = num(c"pids.current", files.pids).ok()?.unwrap_or(listed);
    let mut pressure =
        |name| read_at(&fd, name, true, &mut text).map(|t| t.and_then(parse_pressure_some_avg10));
    let psi_cpu = pressure(c"cpu.pressure").ok()?;
    let psi_memory = pressure(c"memory.pressure").ok()?;
    let psi_io = pressure(c"io.pressure").ok()?;
    let io_bytes = read_at(&fd, c"io.stat", files.io, &mut text)
        .ok()?
        .map(parse_io_bytes);
    let figures = Figures {
        cpu_usec: None,
        memory_bytes,
        pids,
        io_bytes,
        psi_cpu,
        psi_memory,
        psi_io,
    };
    Some((procs, figures))
}

/// The first `max` pids a `cgroup.procs` file `f` lists, and how many it lists in all,
/// read in pieces through `buf`.
fn read_procs(
    f: &std::os::fd::OwnedFd,
    max: usize,
    buf: &mut Vec<u8>,
) -> rustix::io::Result<(Vec<i32>, u64)> {
    let (mut pids, mut listed, mut current) = (Vec::new(), 0u64, None::<i32>);
    buf.clear();
    buf.resize(16 << 10, 0);
    loop {
        let n = match rustix::io::read(f, &mut buf[..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e),
        };
        for &b in &buf[..n] {
            match b {
                b'0'..=b'9' => {
                    let d = i32::from(b - b'0');
                    current = Some(current.unwrap_or(0).saturating_mul(10).saturating_add(d));
                }
                _ => {
                    if let Some(p) = current.take() {
                        listed += 1;
                        if pids.len() < max {
                            pids.push(p);
                        }
                    }
                }
            }
        }
    }
    if let Some(p) = current {
        listed += 1;
        if pids.len() < max {
            pids.push(p);
        }
    }
    Ok((pids, listed))
}

/// The text of file `name` of the directory behind `dir`, into `text`: `Ok(None)` when `on`
/// is false or the file does not exist, an error when it exists but cannot be read. Read by
/// plain `read`s into the reused buffer (no `statx` for a size hint, which a cgroup file
/// does not give anyway), at most 64 KiB (these files are a few lines).
fn read_at<'a>(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::CStr,
    on: bool,
    text: &'a mut Vec<u8>,
) -> rustix::io::Result<Option<&'a str>> {
    if !on {
        return Ok(None);
    }
    let f = match rustix::fs::openat(
        dir,
        name,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        Ok(f) => f,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    text.clear();
    text.resize(64 << 10, 0);
    let mut len = 0;
    while len < text.len() {
        match rustix::io::read(&f, &mut text[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    text.truncate(len);
    Ok(std::str::from_utf8(text).ok())
}

/// Remove the cgroups below `tree`'s `procs` whose process directory is not in `known`, once
/// they hold no process, and namespace directories left empty. Blocking.
pub fn prune(tree: &Tree, known: &std::collections::HashSet<PathBuf>) {
    let procs = tree.root.join("procs");
    let Ok(namespaces) = std::fs::read_dir(&procs) else {
        return;
    };
    for ns in namespaces.flatten() {
        if !ns.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for p in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let dir = p.path();
            if p.file_type().is_ok_and(|t| t.is_dir()) && !known.contains(&dir) {
                remove_empty(&dir);
            }
        }
        // Only when it has no process directory left.
        let _ = std::fs::remove_dir(ns.path());
    }
}

/// Decide the mode from the `cgroup_root` setting, reading `/proc/self/mountinfo` and
/// `/proc/self/cgroup`. Blocking (start-up only).
pub fn detect(setting: &str) -> Mode {
    let setting = setting.trim();
    if setting.is_empty() {
        return Mode::Off {
            why: "cgroup_root is empty".into(),
        };
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(mount) = v2_mount(&mountinfo) else {
        return Mode::Off {
            why: "no cgroup v2 hierarchy is mounted (cgroup v1 only: tracking by pidfd, process group and session)".into(),
        };
    };
    let root = if setting == "auto" {
        match systemd_subtree(&mount) {
            Ok(r) => r,
            Err(why) => return Mode::Off { why },
        }
    } else {
        let p = PathBuf::from(setting);
        if !p.starts_with(&mount) {
            return Mode::Off {
                why: format!(
                    "cgroup_root {setting} is not below the cgroup v2 mount {}",
                    mount.display()
                ),
            };
        }
        p
    };
    match open_tree(&mount, &root) {
        Ok(t) => Mode::On(t),
        Err(e) => Mode::Off {
            why: format!("cgroup_root {}: {e}", root.display()),
        },
    }
}

/// The subtree systemd delegated to the agent: the agent runs in its unit's cgroup, or in
/// its `agent` subgroup (`DelegateSubgroup=agent`, systemd 254+), and the unit's cgroup is
/// delegated (`Delegate=yes`: systemd's `trusted.delegate` attribute) and writable.
fn systemd_subtree(mount: &Path) -> Result<PathBuf, String> {
    let init = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if init.trim() != "systemd" {
        return Err("cgroup_root is \"auto\" and the agent does not run under systemd".into());
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| v2_path(&t))
        .ok_or("the agent's own cgroup cannot be read")?;
    let own_dir = mount.join(own.trim_start_matches('/'));
    let unit = if own_dir.file_name().is_some_and(|n| n == "agent") {
        own_dir.parent().map(Path::to_path_buf).unwrap_or(own_dir)
    } else {
        own_dir
    };
    // systemd marks a delegated cgroup with the `trusted.delegate` extended attribute
    // (v251+); without it the subtree is systemd's own and the agent keeps out of it.
    let delegated = rustix::fs::getxattr_query(&unit, "trusted.delegate").is_ok();
    if !delegated || rustix::fs::access(&unit, rustix::fs::Access::WRITE_OK).is_err() {
        return Err(format!(
            "the agent's cgroup {} is not delegated to it (Delegate=yes in the unit)",
            unit.display()
        ));
    }
    Ok(unit)
}

fn open_tree(mount: &Path, root: &Path) -> io::Result<Tree> {
    let meta = std::fs::metadata(root.join("cgroup.procs"))?;
    if !meta.is_file() {
        return Err(io::Error::other("not a cgroup directory"));
    }
    rustix::fs::access(root, rustix::fs::Access::WRITE_OK).map_err(io::Error::from)?;
    let controllers: Vec<String> = std::fs::read_to_string(root.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let procs = root.join("procs");
    std::fs::create_dir_all(&procs)?;
    let wanted: Vec<String> = WANTED
        .iter()
        .filter(|w| controllers.iter().any(|c| c == *w))
        .map(|w| w.to_string())
        .collect();
    let (enabled, no_controllers) = if wanted.is_empty() {
        (Vec::new(), None)
    } else if !self::procs(root).is_empty() {
        // The "no internal processes" rule: a cgroup that holds processes cannot give
        // domain controllers to its children. Under systemd this is the agent itself in its
        // unit's cgroup (systemd before 254 has no DelegateSubgroup=).
        (
            Vec::new(),
            Some(format!(
                "{} holds processes itself (the agent? under systemd, DelegateSubgroup=agent needs systemd 254 or later)",
                root.display()
            )),
        )
    } else {
        match enable_controllers(root, &wanted).and_then(|()| enable_controllers(&procs, &wanted)) {
            Ok(()) => (wanted, None),
            Err(e) => (
                Vec::new(),
                Some(format!(
                    "cannot enable {} in {}: {e}",
                    wanted.join(" "),
                    root.display()
                )),
            ),
        }
    };
    Ok(Tree {
        mount: mount.to_path_buf(),
        root: root.to_path_buf(),
        controllers,
        enabled,
        no_controllers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount() {
        let mi = "25 30 0:22 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                  26 30 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(v2_mount(mi), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let mi2 = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(v2_mount(mi2), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            v2_mount("31 1 0:27 / /a\\040b rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/a b"))
        );
        assert_eq!(v2_mount("25 30 0:22 / /x rw - cgroup cgroup rw\n"), None);
    }

    #[test]
    fn reads_the_v2_path() {
        let t = "12:memory:/user.slice\n0::/system.slice/procagentd.service/agent\n";
        assert_eq!(
            v2_path(t).as_deref(),
            Some("/system.slice/procagentd.service/agent")
        );
        assert_eq!(v2_path("1:name=systemd:/\n"), None);
    }

    #[test]
    fn escaping_is_injective_and_never_a_kernel_name() {
        let cases = [
            ("web", "web"),
            ("a.b", "a%2Eb"),
            ("a/b", "a%2Fb"),
            ("cgroup.procs", "cgroup%2Eprocs"),
            ("..", "%2E%2E"),
            ("中", "%E4%B8%AD"),
            ("a%2Eb", "a%252Eb"),
            ("", "%"),
        ];
        for (raw, want) in cases {
            assert_eq!(escape(raw), want, "{raw:?}");
        }
        let long_a = "a".repeat(300);
        let long_b = format!("{}b", "a".repeat(299));
        assert_ne!(escape(&long_a), escape(&long_b));
        assert!(escape(&long_a).len() <= 200);
        assert!(escape(&"/".repeat(300)).len() <= 200);
    }

    #[test]
    fn figure_files() {
        assert_eq!(
            parse_cpu_usage("usage_usec 123456\nuser_usec 100\nsystem_usec 23\n"),
            Some(123_456)
        );
        assert_eq!(parse_cpu_usage("user_usec 1\n"), None);
        let p = "some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_pressure_some_avg10(p), Some(1.5));
        assert_eq!(parse_pressure_some_avg10("full avg10=3.00 total=1\n"), None);
        let io = "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n259:0 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=9 dios=1\n";
        assert_eq!(parse_io_bytes(io), 4096 + 8192 + 3);
        assert_eq!(parse_io_bytes(""), 0);
    }

    #[test]
    fn paths_of_a_process() {
        let t = Tree {
            mount: PathBuf::from("/sys/fs/cgroup/unified"),
            root: PathBuf::from("/sys/fs/cgroup/unified/test"),
            controllers: vec![],
            enabled: vec![],
            no_controllers: None,
        };
        let k = ProcKey::new("ns", "web.1");
        assert_eq!(
            t.instance(&k, 0),
            PathBuf::from("/sys/fs/cgroup/unified/test/procs/ns/web%2E1/0")
        );
        assert_eq!(
            t.control(&k),
            PathBuf::from("/sys/fs/cgroup/unified/test/procs/ns/web%2E1/control")
        );
        assert!(t.ensure(Path::new("/sys/fs/cgroup/unified/other")).is_err());
        // The same bytes as the paths joined part by part, a root ending in `/` included.
        let slash = Tree {
            root: PathBuf::from("/sys/fs/cgroup/unified/test/"),
            ..t.clone()
        };
        for k in [
            ProcKey::new("ns", "plain-1"),
            ProcKey::new("", "a/b"),
            k.clone(),
        ] {
            let joined = t
                .root
                .join("procs")
                .join(&*escape(&k.namespace))
                .join(&*escape(&k.name));
            for tree in [&t, &slash] {
                assert_eq!(tree.process_dir(&k).as_os_str(), joined.as_os_str());
                assert_eq!(
                    tree.instance(&k, 12).as_os_str(),
                    joined.join("12").as_os_str()
                );
            }
        }
    }

    #[test]
    fn limits_of_a_definition() {
        const GIB: u64 = 1 << 30;
        // 10 % of 24 GiB, max 20 % above; cpu 50 % of 2 cores is one core per period.
        let l = Limits::of(10.0, 50.0, 24 * GIB, 2, 20.0, true);
        assert_eq!(l.memory_high, Some(24 * GIB / 10));
        assert_eq!(l.memory_max, Some((24 * GIB / 10) * 12 / 10));
        assert_eq!(l.cpu_quota_usec, Some(CPU_PERIOD_USEC));
        // Polled cpu: no cpu.max; no limit: nothing.
        assert_eq!(
            Limits::of(10.0, 50.0, 24 * GIB, 2, 20.0, false).cpu_quota_usec,
            None
        );
        assert_eq!(
            Limits::of(0.0, 0.0, 24 * GIB, 2, 20.0, true),
            Limits::default()
        );
        // Tiny figures are raised to what the kernel takes: 1 MiB, a margin of 1 MiB, 1 ms.
        let t = Limits::of(0.000_001, 0.001, 24 * GIB, 2, 0.0, true);
        assert_eq!(t.memory_high, Some(1 << 20));
        assert_eq!(t.memory_max, Some(2 << 20));
        assert_eq!(t.cpu_quota_usec, Some(1000));
        // Nonsense is no limit, not a panic or a zero.
        assert_eq!(
            Limits::of(f64::NAN, f64::INFINITY, GIB, 2, 10.0, true),
            Limits::default()
        );
    }

    /// A full reading tries only the files of the enabled controllers (others count as
    /// absent, and the processes are counted from `cgroup.procs`), and reads each file
    /// through the directory's handle.
    #[test]
    fn a_full_reading_reads_the_files_of_the_enabled_controllers_only() {
        let d = tempfile::tempdir().unwrap();
        for (f, text) in [
            ("cgroup.procs", "12\n34\n"),
            ("memory.current", "4096\n"),
            ("pids.current", "7\n"),
            ("io.stat", "8:0 rbytes=10 wbytes=5 rios=1 wios=1\n"),
            (
                "cpu.pressure",
                "some avg10=1.50 avg60=0.00 avg300=0.00 total=9\n",
            ),
            (
                "io.pressure",
                "some avg10=0.25 avg60=0.00 avg300=0.00 total=1\n",
            ),
        ] {
            std::fs::write(d.path().join(f), text).unwrap();
        }
        let (procs, f) = full_reading(d.path(), FigureFiles::ALL, 10).unwrap();
        assert_eq!(procs, vec![12, 34]);
        let want = Figures {
            cpu_usec: None,
            memory_bytes: Some(4096),
            pids: 7,
            io_bytes: Some(15),
            psi_cpu: Some(1.5),
            psi_memory: None,
            psi_io: Some(0.25),
        };
        assert_eq!(f, want);
        let none = FigureFiles::of(&["cpu".to_string()]);
        let (_, f) = full_reading(d.path(), none, 10).unwrap();
        assert_eq!(
            (f.memory_bytes, f.pids, f.io_bytes, f.psi_cpu),
            (None, 2, None, Some(1.5))
        );
        assert_eq!(
            FigureFiles::of(&["memory".into(), "pids".into(), "io".into()]),
            FigureFiles::ALL
        );
        assert!(full_reading(&d.path().join("gone"), FigureFiles::ALL, 10).is_none());
        // The processes past the most kept are counted all the same.
        std::fs::write(d.path().join("cgroup.procs"), "9\n3\n5\n7").unwrap();
        let (procs, f) = full_reading(d.path(), none, 2).unwrap();
        assert_eq!((procs, f.pids), (vec![3, 9], 4));
        assert_eq!(
            super::procs(d.path()),
            vec![9, 3, 5, 7],
            "every one, as listed"
        );
        assert!(super::procs(&d.path().join("gone")).is_empty());
        // A file that exists but cannot be read fails the reading (not a reading of zeros).
        std::fs::remove_file(d.path().join("cpu.pressure")).unwrap();
        std::fs::create_dir(d.path().join("cpu.pressure")).unwrap();
        assert!(full_reading(d.path(), none, 10).is_none());
    }

    #[test]
    fn limits_are_written_for_the_enabled_controllers_only() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tree {
            mount: d.path().to_path_buf(),
            root: d.path().to_path_buf(),
            controllers: vec!["memory".into(), "cpu".into()],
            enabled: vec!["memory".into()],
            no_controllers: None,
        };
        let l = Limits {
            memory_high: Some(100 << 20),
            memory_max: Some(120 << 20),
            cpu_quota_usec: Some(50_000),
        };
        l.apply(&t, d.path()).unwrap();
        let read = |f: &str| std::fs::read_to_string(d.path().join(f)).ok();
        assert_eq!(read("memory.high").as_deref(), Some("104857600"));
        assert_eq!(read("memory.max").as_deref(), Some("125829120"));
        assert_eq!(read("memory.oom.group").as_deref(), Some("1"));
        assert_eq!(read("cpu.max"), None);
        t.enabled.push("cpu".into());
        Limits::default().apply(&t, d.path()).unwrap();
        assert_eq!(read("memory.high").as_deref(), Some("max"));
        assert_eq!(read("memory.max").as_deref(), Some("max"));
        assert_eq!(read("cpu.max").as_deref(), Some("max 100000"));
    }

    #[test]
    fn only_missing_controllers_are_enabled() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("cgroup.subtree_control");
        std::fs::write(&f, "cpu io\n").unwrap();
        enable_controllers(d.path(), &["cpu".into(), "memory".into()]).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "+memory");
        std::fs::write(&f, "cpu memory\n").unwrap();
        enable_controllers(d.path(), &["cpu".into(), "memory".into()]).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "cpu memory\n");
    }

    #[test]
    fn memory_events_counts() {
        let t = "low 0\nhigh 12\nmax 3\noom 1\noom_kill 1\noom_group_kill 1\nsock_throttled 0\n";
        assert_eq!(
            parse_memory_events(t),
            MemoryEvents {
                high: 12,
                max: 3,
                oom_kill: 1,
                oom_group_kill: 1
            }
        );
        assert_eq!(
            parse_memory_events("garbage\nhigh x\n"),
            MemoryEvents::default()
        );
    }
}
