//! Reading what the kernel says about a process: identity (pid + start time + boot id),
//! state, process group, parent, name, and the pid-file parser.
//!
//! A process is identified by `(pid, starttime, boot_id)`: `starttime` is field 22 of
//! `/proc/PID/stat` (clock ticks since boot, immune to pid reuse) and `boot_id` comes from
//! `/proc/sys/kernel/random/boot_id` (so a record from before a reboot never matches).
//! Parsing of `stat` is done by the `procfs` crate, which splits at the last `)` so a `comm`
//! with spaces or parentheses is read correctly.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use procfs::FromRead;

/// The fields of `/proc/PID/stat` the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub utime: u64,
    pub stime: u64,
    pub starttime: u64,
    pub rss_pages: u64,
    /// The kernel's flags word (`PF_*`).
    pub flags: u32,
    /// Threads of the process (field 20).
    pub num_threads: i64,
}

impl ProcStat {
    /// A zombie or dead task: it has exited, only its entry remains.
    pub fn is_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    fn from_procfs(s: procfs::process::Stat) -> ProcStat {
        ProcStat {
            pid: s.pid,
            comm: s.comm,
            state: s.state,
            ppid: s.ppid,
            pgrp: s.pgrp,
            session: s.session,
            utime: s.utime,
            stime: s.stime,
            starttime: s.starttime,
            rss_pages: s.rss,
            flags: s.flags,
            num_threads: s.num_threads,
        }
    }
}

/// Parse the text of a `/proc/PID/stat` file (used by the sampler and by fixture tests).
pub fn parse_stat(text: &[u8]) -> Option<ProcStat> {
    // procfs slices around the parentheses without checking the bounds (it panics on
    // "1 (x)" or "(x) S", found by fuzzing): check the shape "PID (COMM) REST" first.
    let line = String::from_utf8_lossy(text);
    let t = line.trim();
    let open = t.find('(')?;
    let close = t.rfind(')')?;
    if open < 2 || close < open || !t[..open].ends_with(' ') || !t[close + 1..].starts_with(' ') {
        return None;
    }
    procfs::process::Stat::from_read(text)
        .ok()
        .map(ProcStat::from_procfs)
}

/// Read `/proc/PID/stat`; `None` when the process does not exist (or cannot be read).
pub fn read_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    let mut buf = Vec::with_capacity(512);
    let mut f = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    f.read_to_end(&mut buf).ok()?;
    parse_stat(&buf)
}

/// The kernel's boot id; empty when unreadable (then boot checks are skipped).
pub fn boot_id() -> &'static str {
    static BOOT_ID: OnceLock<String> = OnceLock::new();
    BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of start times and cpu times.
pub fn ticks_per_second() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| procfs::ticks_per_second().max(1))
}

/// Page size in bytes.
pub fn page_size() -> u64 {
    static PS: OnceLock<u64> = OnceLock::new();
    *PS.get_or_init(|| procfs::page_size().max(1))
}

/// The current boot-time clock in start-time ticks, rounded down and minus one tick of margin:
/// any process forked after this call has `starttime >=` the returned value.
pub fn now_ticks_floor() -> u64 {
    let ns = crate::sys::boottime_nanos();
    let ticks = (ns as u128 * ticks_per_second() as u128 / 1_000_000_000u128) as u64;
    ticks.saturating_sub(1)
}

/// The process's argv, split on NUL; empty when unreadable (kernel threads, gone).
pub fn cmdline(pid: i32) -> Vec<String> {
    let Ok(bytes) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Vec::new();
    };
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The process's executable path, with a " (deleted)" suffix removed (a binary replaced on
/// upgrade is still the same program).
pub fn exe(pid: i32) -> Option<String> {
    let p = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let s = p.to_string_lossy().into_owned();
    Some(s.strip_suffix(" (deleted)").unwrap_or(&s).to_string())
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

/// Does the process look like `proc_name`? True when the executable's file name, `comm`
/// (which the kernel truncates to 15 bytes), or the file name of `argv[0]` or `argv[1]`
/// (an interpreter running a script: `sh ./daemon.sh`, `python3 app.py`) equals it.
pub fn matches_proc_name(pid: i32, comm: &str, proc_name: &str) -> bool {
    let want = basename(proc_name.trim());
    if want.is_empty() {
        return true;
    }
    if comm == want || (comm.len() >= 15 && want.starts_with(comm)) {
        return true;
    }
    if let Some(exe) = exe(pid)
        && basename(&exe) == want
    {
        return true;
    }
    let argv = cmdline(pid);
    argv.iter().take(2).any(|a| {
        // argv[0] may carry arguments when a daemon rewrites its title ("nginx: master").
        let first = a.split_whitespace().next().unwrap_or("");
        basename(first) == want || basename(first).trim_end_matches(':') == want
    })
}

/// Every pid whose process group is `pgid` (scan of /proc).
pub fn pids_in_group(pgid: i32) -> Vec<i32> {
    all_stats()
        .into_iter()
        .filter(|s| s.pgrp == pgid && !s.is_exited())
        .map(|s| s.pid)
        .collect()
}

/// The ancestors of a process whose parent is `ppid`, nearest first, by parent links (at most
/// 64; ends below init).
pub fn ancestors(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut p = ppid;
    while p > 1 && out.len() < 64 && !out.contains(&p) {
        out.push(p);
        match read_stat(p) {
            Some(s) => p = s.ppid,
            None => break,
        }
    }
    out
}

/// Every process of the host at one moment, indexed by process group and by parent: one
/// scan of /proc serves a whole stop step (who is left in a group, who descends from whom).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub stats: Vec<ProcStat>,
    by_pgrp: std::collections::HashMap<i32, Vec<usize>>,
    by_ppid: std::collections::HashMap<i32, Vec<usize>>,
}

impl Snapshot {
    /// Scan /proc now (blocking: run it off the async workers).
    pub fn take() -> Snapshot {
        Snapshot::of(all_stats())
    }

    /// Index a list of stats (also for tests).
    pub fn of(stats: Vec<ProcStat>) -> Snapshot {
        let mut by_pgrp: std::collections::HashMap<i32, Vec<usize>> = Default::default();
        let mut by_ppid: std::collections::HashMap<i32, Vec<usize>> = Default::default();
        for (i, s) in stats.iter().enumerate() {
            if s.is_exited() {
                continue;
            }
            by_pgrp.entry(s.pgrp).or_default().push(i);
            by_ppid.entry(s.ppid).or_default().push(i);
        }
        Snapshot {
            stats,
            by_pgrp,
            by_ppid,
        }
    }

    /// The live members of process group `pgid`.
    pub fn group(&self, pgid: i32) -> impl Iterator<Item = &ProcStat> {
        self.by_pgrp
            .get(&pgid)
            .into_iter()
            .flatten()
            .map(|i| &self.stats[*i])
    }

    /// The live descendants of `pid` (not `pid` itself), each once.
    pub fn descendants(&self, pid: i32) -> Vec<&ProcStat> {
        let mut out: Vec<&ProcStat> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut todo = vec![pid];
        seen.insert(pid);
        while let Some(p) = todo.pop() {
            for i in self.by_ppid.get(&p).into_iter().flatten() {
                let s = &self.stats[*i];
                if seen.insert(s.pid) {
                    out.push(s);
                    todo.push(s.pid);
                }
            }
        }
        out
    }

    /// Is `pid` alive with this start time?
    pub fn alive(&self, pid: i32, starttime: u64) -> bool {
        self.stats
            .iter()
            .any(|s| s.pid == pid && s.starttime == starttime && !s.is_exited())
    }
}

/// `pid` and all its living descendants (by parent links at the time of the scan), each with
/// its start time so a later signal can check it is still the same process.
pub fn descendants(pid: i32) -> Vec<(i32, u64)> {
    let stats = all_stats();
    let mut out: Vec<(i32, u64)> = stats
        .iter()
        .find(|s| s.pid == pid)
        .map(|s| vec![(pid, s.starttime)])
        .unwrap_or_else(|| vec![(pid, 0)]);
    let mut i = 0;
    while i < out.len() {
        let parent = out[i].0;
        for s in &stats {
            if s.ppid == parent && !s.is_exited() && !out.iter().any(|(p, _)| *p == s.pid) {
                out.push((s.pid, s.starttime));
            }
        }
        i += 1;
    }
    out
}

/// The stat of every process on the host.
pub fn all_stats() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter_map(read_stat)
        .collect()
}

/// The kernel's maximum pid.
pub fn pid_max() -> i64 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304)
}

/// Why a pid file was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PidFileError {
    #[error("pid file {0} does not exist")]
    Missing(String),
    #[error("pid file {path} is a symlink or not a regular file")]
    NotRegular { path: String },
    #[error("pid file {path} could not be read: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("pid file {path} does not hold a pid: {reason}")]
    Invalid { path: String, reason: String },
}

/// Largest pid file we read; anything longer is not a pid file.
const PID_FILE_MAX: u64 = 128;

/// Parse pid-file text strictly: optional surrounding whitespace, then decimal digits only,
/// within `2..=pid_max`, and not `own_pid` (the agent itself). Pid 1 (init) is never a
/// managed process.
pub fn parse_pid_text(text: &str, pid_max: i64, own_pid: i32) -> Result<i32, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty".into());
    }
    if !t.bytes().all(|b| b.is_ascii_digit()) {
        // Never its text: the file is read as root, and an admin may name any file as a
        // pid file; its content would reach every reader through the event history.
        return Err(format!("not a decimal number ({} bytes)", t.len()));
    }
    if t.len() > 10 {
        return Err("number too large".into());
    }
    let n: i64 = t.parse().map_err(|_| "number too large".to_string())?;
    if n <= 1 {
        return Err(format!("pid {n} is not a manageable process"));
    }
    if n > pid_max {
        return Err(format!("pid {n} is above pid_max {pid_max}"));
    }
    if n == own_pid as i64 {
        return Err(format!("pid {n} is the agent itself"));
    }
    // Never truncate: a pid_max above i32 (a corrupt read) must not wrap to another pid
    // (found by fuzzing).
    i32::try_from(n).map_err(|_| format!("pid {n} does not fit a pid"))
}

/// Read and validate a pid file without side effects: the path is first examined with
/// `lstat` and must be a regular file (a symlink, FIFO, socket or device node is never opened:
/// opening `/dev/watchdog` or a tty has effects); it is then opened with
/// `O_NOFOLLOW|O_NONBLOCK|O_NOCTTY` and must still be the same file (device and inode), so a
/// swap between the two steps is refused; at most 128 bytes are read. Blocking: callers run it
/// on the [`crate::fspool`] pool, as the path may sit on a hung mount.
pub fn read_pid_file(path: &Path) -> Result<i32, PidFileError> {
    use std::os::unix::fs::MetadataExt;
    let disp = path.display().to_string();
    let before = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PidFileError::Missing(disp));
        }
        Err(e) => {
            return Err(PidFileError::Unreadable {
                path: disp,
                reason: e.to_string(),
            });
        }
    };
    if !before.file_type().is_file() {
        return Err(PidFileError::NotRegular { path: disp });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PidFileError::Missing(disp));
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(PidFileError::NotRegular { path: disp });
        }
        Err(e) => {
            return Err(PidFileError::Unreadable {
                path: disp,
                reason: e.to_string(),
            });
        }
    };
    match file.metadata() {
        Ok(m) if m.is_file() && m.dev() == before.dev() && m.ino() == before.ino() => {}
        _ => return Err(PidFileError::NotRegular { path: disp }),
    }
    let mut buf = Vec::new();
    (&mut file)
        .take(PID_FILE_MAX + 1)
        .read_to_end(&mut buf)
        .map_err(|e| PidFileError::Unreadable {
            path: disp.clone(),
            reason: e.to_string(),
        })?;
    if buf.len() as u64 > PID_FILE_MAX {
        return Err(PidFileError::Invalid {
            path: disp,
            reason: format!("longer than {PID_FILE_MAX} bytes"),
        });
    }
    let text = String::from_utf8_lossy(&buf);
    parse_pid_text(&text, pid_max(), std::process::id() as i32)
        .map_err(|reason| PidFileError::Invalid { path: disp, reason })
}

/// A path field of `/proc/PID/mountinfo` (a mount point or root), its octal escapes
/// (`\\040` for a space, ...) undone.
pub fn mountinfo_path(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                let v = d.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// `PF_KTHREAD` in the `flags` field of `/proc/PID/stat`: a kernel thread.
const PF_KTHREAD: u32 = 0x0020_0000;

/// What the ownership rule looks at in one process (see
/// [`crate::supervisor::ownership`]), read from `/proc/PID/{stat,status,exe,cwd,cmdline}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcFacts {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub starttime: u64,
    pub comm: String,
    /// Exited (zombie) or dead.
    pub exited: bool,
    pub kernel_thread: bool,
    /// The real uid (`Uid:` first field of /proc/PID/status).
    pub uid: Option<u32>,
    /// The executable, " (deleted)" removed.
    pub exe: Option<String>,
    pub cwd: Option<String>,
    /// The first two arguments (argv[0], argv[1]).
    pub argv: Vec<String>,
    /// The lineage token of the agent's command it descends from, when its environment
    /// carries one ([`crate::util::LINEAGE_VAR`]).
    pub lineage: Option<u128>,
}

/// Read the facts about `pid`; `None` when it does not exist.
pub fn read_facts(pid: i32) -> Option<ProcFacts> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let st = parse_stat(&text)?;
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_status_uid(&s));
    Some(ProcFacts {
        pid,
        ppid: st.ppid,
        pgrp: st.pgrp,
        session: st.session,
        starttime: st.starttime,
        exited: st.is_exited(),
        kernel_thread: st.flags & PF_KTHREAD != 0,
        comm: st.comm,
        uid,
        exe: exe(pid),
        cwd: std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned()),
        argv: cmdline(pid).into_iter().take(2).collect(),
        lineage: lineage(pid),
    })
}

/// Most bytes of `/proc/PID/environ` read for the lineage token (environments are a few KiB;
/// the kernel limits them to a quarter of the stack limit).
const MAX_ENVIRON: u64 = 256 * 1024;

/// The lineage token in `pid`'s environment block (its memory now: a program that overwrote
/// it for its title has none, and a process may write one of its own account's tokens there).
pub fn lineage(pid: i32) -> Option<u128> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/environ"))
        .ok()?
        .take(MAX_ENVIRON)
        .read_to_end(&mut buf)
        .ok()?;
    parse_lineage(&buf)
}

/// The first `PROCAGENT_SPAWN=<32 hex digits>` entry of an environment block.
pub fn parse_lineage(environ: &[u8]) -> Option<u128> {
    let prefix = format!("{}=", crate::util::LINEAGE_VAR);
    environ
        .split(|b| *b == 0)
        .find_map(|e| e.strip_prefix(prefix.as_bytes()))
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| v.len() == 32)
        .and_then(|v| u128::from_str_radix(v, 16).ok())
}

/// The real uid in the text of `/proc/PID/status` (`Uid:\treal\teffective\tsaved\tfs`).
pub fn parse_status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pid_file_that_is_no_number_is_refused_without_its_content() {
        let e = super::parse_pid_text("adm2-private-data\n", 4_194_304, 1).unwrap_err();
        assert!(!e.contains("private"), "{e}");
        assert_eq!(e, "not a decimal number (17 bytes)");
    }

    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let line = b"4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 123456 10000000 250 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        let s = parse_stat(line).expect("parses");
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "my (odd) proc");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.utime, 7);
        assert_eq!(s.stime, 3);
        assert_eq!(s.starttime, 123456);
        assert_eq!(s.rss_pages, 250);
    }

    #[test]
    fn pid_text_table() {
        let cases: &[(&str, Result<i32, ()>)] = &[
            ("1234\n", Ok(1234)),
            ("  77  ", Ok(77)),
            ("", Err(())),
            ("abc", Err(())),
            ("-5", Err(())),
            ("12 34", Err(())),
            ("1", Err(())),
            ("0", Err(())),
            ("99999999999999999999", Err(())),
            ("5000000", Err(())),
            ("4242", Err(())), // own pid
            ("0x10", Err(())),
        ];
        for (text, want) in cases {
            let got = parse_pid_text(text, 4_194_304, 4242).map_err(|_| ());
            assert_eq!(&got, want, "input {text:?}");
        }
    }

    #[test]
    fn pid_file_symlink_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.pid");
        std::fs::write(&real, "1234\n").unwrap();
        let link = dir.path().join("link.pid");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            read_pid_file(&link),
            Err(PidFileError::NotRegular { .. })
        ));
        assert_eq!(read_pid_file(&real), Ok(1234));
        assert!(matches!(
            read_pid_file(&dir.path().join("none.pid")),
            Err(PidFileError::Missing(_))
        ));
        // A FIFO is never opened (opening one blocks or has effects), nor a device node.
        let fifo = dir.path().join("fifo.pid");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(matches!(
            read_pid_file(&fifo),
            Err(PidFileError::NotRegular { .. })
        ));
        assert!(matches!(
            read_pid_file(Path::new("/dev/null")),
            Err(PidFileError::NotRegular { .. })
        ));
        assert!(matches!(
            read_pid_file(dir.path()),
            Err(PidFileError::NotRegular { .. })
        ));
        let big = dir.path().join("big.pid");
        std::fs::write(&big, "1".repeat(500)).unwrap();
        assert!(matches!(
            read_pid_file(&big),
            Err(PidFileError::Invalid { .. })
        ));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        const PID_MAX: i64 = 4_194_304;
        const OWN: i32 = 4242;

        fn ws() -> impl Strategy<Value = String> {
            proptest::string::string_regex("[ \t\r\n]{0,3}").expect("regex")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Whatever the text, an accepted pid is the decimal number written, within
            /// 2..=pid_max, and not the agent's own.
            #[test]
            fn accepted_pids_are_exactly_what_was_written(text in ".{0,40}") {
                if let Ok(pid) = parse_pid_text(&text, PID_MAX, OWN) {
                    let t = text.trim();
                    prop_assert!(t.bytes().all(|b| b.is_ascii_digit()), "{:?}", text);
                    prop_assert_eq!(t.parse::<i64>().ok(), Some(i64::from(pid)));
                    prop_assert!(pid >= 2 && i64::from(pid) <= PID_MAX && pid != OWN);
                }
            }

            /// Every valid pid, with any surrounding whitespace, is read back.
            #[test]
            fn valid_pids_round_trip(pid in 2i32..=PID_MAX as i32, a in ws(), b in ws()) {
                prop_assume!(pid != OWN);
                prop_assert_eq!(parse_pid_text(&format!("{a}{pid}{b}"), PID_MAX, OWN), Ok(pid));
            }

            /// Negative numbers, signs, pid 0 and 1, numbers above pid_max (however large),
            /// the agent's own pid, and anything after the number are refused.
            #[test]
            fn bad_pids_are_refused(n in any::<u64>(), junk in "[^0-9 \t\r\n][ -~]{0,8}") {
                let neg = parse_pid_text(&format!("-{n}"), PID_MAX, OWN);
                let plus = parse_pid_text(&format!("+{n}"), PID_MAX, OWN);
                let trailing = parse_pid_text(&format!("{n}{junk}"), PID_MAX, OWN);
                prop_assert!(neg.is_err() && plus.is_err() && trailing.is_err());
                if n <= 1 || n as u128 > PID_MAX as u128 || n == OWN as u64 {
                    prop_assert!(parse_pid_text(&n.to_string(), PID_MAX, OWN).is_err());
                }
                let huge = format!("{n}{n}{n}");
                if huge.trim_start_matches('0').len() > 7 {
                    prop_assert!(parse_pid_text(&huge, PID_MAX, OWN).is_err());
                }
            }

            /// A pid file that is a symlink is refused whatever it points at; a regular file
            /// with the same text gives the text parser's answer.
            #[test]
            fn pid_file_symlinks_are_refused(pid in 2i32..100_000) {
                let dir = tempfile::tempdir().expect("tempdir");
                let real = dir.path().join("real.pid");
                std::fs::write(&real, format!("{pid}\n")).expect("write");
                let link = dir.path().join("link.pid");
                std::os::unix::fs::symlink(&real, &link).expect("symlink");
                let refused = matches!(read_pid_file(&link), Err(PidFileError::NotRegular { .. }));
                prop_assert!(refused);
                let want = parse_pid_text(&format!("{pid}\n"), pid_max(), std::process::id() as i32);
                prop_assert_eq!(read_pid_file(&real).ok(), want.ok());
            }

            /// /proc/PID/stat lines: whatever the command name (spaces, parentheses,
            /// digits), the fields after it are read correctly.
            #[test]
            fn stat_lines_parse_whatever_the_comm(
                pid in 1i32..=PID_MAX as i32,
                comm in "[ -~]{0,15}",
                state in prop::sample::select(vec!['R', 'S', 'D', 'Z', 'T', 'I', 'X']),
                ppid in 0i32..=PID_MAX as i32,
                pgrp in 0i32..=PID_MAX as i32,
                utime in any::<u32>(),
                starttime in any::<u64>(),
                rss in any::<u32>(),
            ) {
                let line = format!(
                    "{pid} ({comm}) {state} {ppid} {pgrp} {pgrp} 0 -1 4194560 100 0 0 0 {utime} 3 0 0 20 0 1 0 {starttime} 10000000 {rss} 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
                );
                let s = parse_stat(line.as_bytes());
                prop_assert!(s.is_some(), "{}", line);
                let s = s.expect("checked");
                prop_assert_eq!(s.pid, pid);
                prop_assert_eq!(&s.comm, &comm);
                prop_assert_eq!(s.state, state);
                prop_assert_eq!((s.ppid, s.pgrp), (ppid, pgrp));
                prop_assert_eq!(s.utime, u64::from(utime));
                prop_assert_eq!(s.starttime, starttime);
                prop_assert_eq!(s.rss_pages, u64::from(rss));
            }

            /// Arbitrary bytes never make the parsers panic.
            #[test]
            fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
                crate::fuzzing::proc_parsers(&data);
            }
        }
    }

    #[test]
    fn snapshot_indexes_groups_and_descendants() {
        let st = |pid, ppid, pgrp, state| ProcStat {
            pid,
            comm: "x".into(),
            state,
            ppid,
            pgrp,
            session: pgrp,
            utime: 0,
            stime: 0,
            starttime: pid as u64,
            rss_pages: 0,
            flags: 0,
            num_threads: 1,
        };
        let snap = Snapshot::of(vec![
            st(10, 1, 10, 'S'),
            st(11, 10, 10, 'S'),
            st(12, 11, 12, 'S'),
            st(13, 12, 12, 'Z'),
            st(20, 1, 20, 'S'),
        ]);
        let g: Vec<i32> = snap.group(10).map(|s| s.pid).collect();
        assert_eq!(g, vec![10, 11]);
        let mut d: Vec<i32> = snap.descendants(10).iter().map(|s| s.pid).collect();
        d.sort();
        assert_eq!(d, vec![11, 12], "zombies are not live descendants");
        assert!(snap.alive(12, 12) && !snap.alive(12, 99) && !snap.alive(13, 13));
    }

    #[test]
    fn status_uid_is_the_real_uid() {
        let text = "Name:\tx\nUmask:\t0022\nUid:\t1001\t0\t0\t0\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_status_uid(text), Some(1001));
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
    }

    #[test]
    fn facts_of_self_and_of_a_kernel_thread() {
        let me = std::process::id() as i32;
        let f = read_facts(me).expect("own facts");
        assert_eq!(f.uid, Some(nix::unistd::getuid().as_raw()));
        assert!(!f.kernel_thread && !f.exited);
        assert!(f.exe.is_some() && f.cwd.is_some() && !f.argv.is_empty());
        // kthreadd is pid 2 on every Linux with a kernel-thread parent; in a pid namespace
        // it may be absent.
        if let Some(k) = read_facts(2).filter(|k| k.comm == "kthreadd") {
            assert!(k.kernel_thread);
        }
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        let s = read_stat(me).expect("own stat");
        assert_eq!(s.pid, me);
        assert!(s.starttime > 0);
        assert!(!boot_id().is_empty());
    }
}
