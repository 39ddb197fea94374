//! `GET /v1/logs`: a process's logs through the socket, so an operator who may not read the
//! files themselves (a read-only group member) sees them, and nobody sees more than the
//! process's own account could.
//!
//! Two sources, in this order:
//! * `output`: what the agent captured from the process's commands and the daemons they
//!   started (their stdout and stderr): `STATE/output/<stem>.log` and its rotated
//!   `.log.1`, `.log.2`, ... (see [`crate::output::record`]): a header line
//!   `--- <time> <label> as <account>: <command>` per command, then a record per line. The
//!   initial lines reach back into the rotated files when the current one has fewer.
//! * `log`: the definition's `log_path`. A file is tailed. A directory (GSE v2 documents
//!   `log_path` as the log *directory*) contributes its regular files directly inside it
//!   (not recursive; hidden files, symlinks and compressed archives `.gz .xz .bz2 .zst .zip
//!   .lz4` skipped), the [`MAX_DIR_FILES`] most recently modified, oldest first.
//!
//! Reading with care: `log_path` comes from an authorized registration, but the agent runs as
//! root and must not become a way to read other files. Each path is resolved once, following
//! only symlinks owned by root or by the process's account (a link another account swapped
//! into a directory it may write leads nowhere; a log directory's own entries are never
//! followed), then walked component by component from `/` with `O_NOFOLLOW` (a symlink
//! swapped in afterwards fails the walk); when the process runs as another account all of
//! it is done as that account ([`crate::sys::as_account_fs`]), and every directory on the way
//! must be searchable and the file readable by it (owner, group, other bits, and the
//! kernel's own checks). Only regular files are read; at most [`TAIL_SCAN_BYTES`] from the end for
//! the initial lines, at most [`MAX_LINE`] bytes per line, at most [`READ_CHUNK`] per file
//! per poll when following.
//!
//! Query: `key=NS/NAME` (required), `lines=N` (initial lines per file, default 100, at most
//! 10000, 0 for none), `source=all|output|log` (default all), `follow=1`.
//! Without `follow` the answer is the usual envelope, `data.lines` a list of line objects.
//! With `follow` it is a newline-delimited JSON stream of the same objects: the initial
//! lines, then new lines as they are written (polled every 250 ms; truncation and
//! rotation are noticed; a blank keep-alive line every 15 s). A line object is
//! `{"source","file","line"}`, or `{"source","file","notice"}` for something the reader
//! should know (a file that cannot be read, a truncation). A captured `output` record adds
//! `"stream"` (`"out"` or `"err"`) and `"time"` (when the agent read it, RFC 3339 UTC with
//! milliseconds), its `line` being the text the process wrote.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use rustix::fs::{FileType, Mode, OFlags};
use serde_json::Value;

use super::auth;
use super::{ApiError, AppState, ok};
use crate::executor::Account;
use crate::proto::{LogLine, LogLines, codes};
use crate::spec::ProcKey;

/// Files of a log directory that are shown.
pub const MAX_DIR_FILES: usize = 5;
/// Bytes read from the end of a file for its initial lines.
pub const TAIL_SCAN_BYTES: u64 = 4 << 20;
/// Longer lines are cut here.
pub const MAX_LINE: usize = 16 * 1024;
/// Bytes read from one file per poll when following.
pub const READ_CHUNK: u64 = 1 << 20;
/// Most initial lines per file.
pub const MAX_LINES: usize = 10_000;
const POLL: Duration = Duration::from_millis(250);
const RESCAN: Duration = Duration::from_secs(1);
const KEEPALIVE: Duration = Duration::from_secs(15);
const COMPRESSED: &[&str] = &["gz", "xz", "bz2", "zst", "zip", "lz4"];

/// Query of `GET /v1/logs`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct LogsQuery {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub lines: Option<usize>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub follow: Option<String>,
}

/// Can `acct` read (`want` = 4) or search (`want` = 1) a file with this mode and owner?
/// None: no account to check (the agent's own, or root).
pub fn permits(mode: u32, uid: u32, gid: u32, acct: Option<&Account>, want: u32) -> bool {
    let Some(a) = acct else { return true };
    if a.uid == 0 {
        return true;
    }
    let bits = if uid == a.uid {
        mode >> 6
    } else if a.gid == gid || a.groups.contains(&gid) {
        mode >> 3
    } else {
        mode
    };
    bits & want == want
}

fn stat_ok(st: &rustix::fs::Stat, acct: Option<&Account>, want: u32) -> bool {
    permits(st.st_mode, st.st_uid, st.st_gid, acct, want)
}

/// Why a path cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Io(String),
    #[error("not readable by the process's account {0}; not shown")]
    Denied(String),
    #[error("not a regular file; not shown")]
    NotRegular,
    #[error(
        "goes through the symlink {0}, owned by uid {1} (neither root nor the process's account); not followed"
    )]
    NotTrusted(String, u32),
}

/// A checked, opened path: a regular file (`file`) or a directory (`dir` true).
pub struct Opened {
    pub file: Option<File>,
    pub dir: bool,
    pub real: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

/// Open `path` for reading as described in the module docs: resolve it, walk the resolved
/// path from `/` without following symlinks, check the account's permissions on the way.
/// For an account other than the agent's, all of it is done with the account's own
/// file-system identity ([`crate::sys::as_account_fs`]): the kernel's own checks (ACLs
/// included) apply, and whether a file the account cannot reach exists is not told.
pub fn open_checked(path: &Path, acct: Option<&Account>) -> Result<Opened, OpenError> {
    open_checked_as(path, acct, true)
}

/// [`open_checked`] for a file of a log directory: its last component is never followed
/// (the directory's symlinks are not shown, also when one is swapped in after the listing).
fn open_checked_in_dir(path: &Path, acct: Option<&Account>) -> Result<Opened, OpenError> {
    open_checked_as(path, acct, false)
}

fn open_checked_as(
    path: &Path,
    acct: Option<&Account>,
    follow_last: bool,
) -> Result<Opened, OpenError> {
    crate::sys::as_account_fs(identity(acct).as_ref(), || {
        open_walked(path, acct, follow_last)
    })
    .unwrap_or_else(|_| {
        Err(OpenError::Denied(
            acct.map(|a| a.name.clone()).unwrap_or_default(),
        ))
    })
}

/// The file-system identity files are reached with for `acct` (`None`: the agent's own).
fn identity(acct: Option<&Account>) -> Option<crate::sys::FsIdentity> {
    acct.and_then(crate::executor::fs_identity_of)
}

/// `path` made absolute and free of symlinks, following only the symlinks owned by a uid
/// of `trusted` (at most 40); a symlink owned by anyone else is refused (`NotTrusted`).
fn resolve_trusted(path: &Path, trusted: &[u32]) -> Result<PathBuf, OpenError> {
    use std::collections::VecDeque;
    use std::os::unix::fs::MetadataExt;
    let denied_or_io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            OpenError::Denied(String::new())
        } else {
            OpenError::Io(e.to_string())
        }
    };
    let mut todo: VecDeque<std::ffi::OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::from("/");
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let meta = std::fs::symlink_metadata(&next).map_err(denied_or_io)?;
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        if !trusted.contains(&meta.uid()) {
            return Err(OpenError::NotTrusted(
                next.display().to_string(),
                meta.uid(),
            ));
        }
        links += 1;
        if links > 40 {
            return Err(OpenError::Io("too many levels of symbolic links".into()));
        }
        let target = std::fs::read_link(&next).map_err(denied_or_io)?;
        if target.is_absolute() {
            cur = PathBuf::from("/");
        }
        for comp in target.components().rev() {
            match comp {
                Component::Normal(n) => todo.push_front(n.to_os_string()),
                Component::ParentDir => todo.push_front("..".into()),
                _ => {}
            }
        }
    }
    Ok(cur)
}

/// [`open_checked`]'s walk, as whoever the calling thread is.
fn open_walked(
    path: &Path,
    acct: Option<&Account>,
    follow_last: bool,
) -> Result<Opened, OpenError> {
    let denied = || OpenError::Denied(acct.map(|a| a.name.clone()).unwrap_or_default());
    // Refused by the kernel (as the account) or by the mode bits: the same answer.
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            denied()
        } else {
            OpenError::Io(e.to_string())
        }
    };
    // Symlinks on the way are followed only when root or the process's own account made
    // them: a link another account swapped into a directory it may write (a service
    // account's log directory under a root definition) leads nowhere.
    let trusted = [0, acct.map_or(0, |a| a.uid)];
    let named = |e: OpenError| match e {
        OpenError::Denied(_) => denied(),
        other => other,
    };
    let real = match (follow_last, path.parent(), path.file_name()) {
        (false, Some(parent), Some(name)) => {
            resolve_trusted(parent, &trusted).map_err(named)?.join(name)
        }
        _ => resolve_trusted(path, &trusted).map_err(named)?,
    };
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd: OwnedFd = rustix::fs::open("/", flags | OFlags::DIRECTORY, Mode::empty())
        .map_err(|e| io(e.into()))?;
    let comps: Vec<&std::ffi::OsStr> = real
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for (i, c) in comps.iter().enumerate() {
        let st = rustix::fs::fstat(&fd).map_err(|e| io(e.into()))?;
        if !stat_ok(&st, acct, 1) {
            return Err(denied());
        }
        let last = i + 1 == comps.len();
        let f = if last {
            flags
        } else {
            flags | OFlags::DIRECTORY
        };
        fd = rustix::fs::openat(&fd, *c, f, Mode::empty()).map_err(|e| io(e.into()))?;
    }
    let st = rustix::fs::fstat(&fd).map_err(|e| io(e.into()))?;
    let ft = FileType::from_raw_mode(st.st_mode);
    let (dev, ino) = (st.st_dev, st.st_ino);
    match ft {
        FileType::Directory => {
            if !stat_ok(&st, acct, 4 | 1) {
                return Err(denied());
            }
            Ok(Opened {
                file: None,
                dir: true,
                real,
                dev,
                ino,
            })
        }
        FileType::RegularFile => {
            if !stat_ok(&st, acct, 4) {
                return Err(denied());
            }
            // Reopen the O_PATH descriptor for reading: the same inode, no new lookup.
            let file = File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(io)?;
            Ok(Opened {
                file: Some(file),
                dir: false,
                real,
                dev,
                ino,
            })
        }
        _ => Err(OpenError::NotRegular),
    }
}

/// The last `n` lines of `f` (at most [`TAIL_SCAN_BYTES`] read); returns them and the end
/// offset.
pub fn tail_lines(f: &mut File, n: usize) -> std::io::Result<(Vec<String>, u64)> {
    let (lines, end) = tail_raw(f, n)?;
    Ok((lines.iter().map(|l| line_text(l)).collect(), end))
}

fn line_text(l: &[u8]) -> String {
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    if l.len() > MAX_LINE {
        let mut s = String::from_utf8_lossy(&l[..MAX_LINE]).into_owned();
        s.push_str(" [line cut]");
        s
    } else {
        String::from_utf8_lossy(l).into_owned()
    }
}

fn line_obj(source: &str, file: &Path, line: String) -> Value {
    super::handlers::to_data(&LogLine {
        source: source.to_string(),
        file: file.display().to_string(),
        line: Some(line),
        ..LogLine::default()
    })
}

/// The object of one line of a captured output file: a record's text, stream and time; a
/// header or an older plain line as it is.
fn output_line_obj(file: &Path, raw: &[u8]) -> Value {
    use crate::output::record::{Line, parse};
    match parse(raw) {
        Line::Record { time, stream, text } => super::handlers::to_data(&LogLine {
            source: "output".into(),
            file: file.display().to_string(),
            line: Some(line_text(text)),
            stream: Some(stream.mark().into()),
            time: Some(time.to_string()),
            notice: None,
        }),
        Line::Header(l) | Line::Plain(l) => line_obj("output", file, line_text(l)),
    }
}

/// The last `n` raw lines of `f` and its end offset (see [`tail_lines`]).
fn tail_raw(f: &mut File, n: usize) -> std::io::Result<(Vec<Vec<u8>>, u64)> {
    let len = f.metadata()?.len();
    if n == 0 {
        return Ok((Vec::new(), len));
    }
    let start = len.saturating_sub(TAIL_SCAN_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf)?;
    let mut text: &[u8] = &buf;
    if start > 0 {
        // Drop the partial first line.
        match text.iter().position(|b| *b == b'\n') {
            Some(p) => text = &text[p + 1..],
            None => text = &[],
        }
    }
    let mut lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let skip = lines.len().saturating_sub(n);
    let end = start + buf.len() as u64;
    Ok((lines[skip..].iter().map(|l| l.to_vec()).collect(), end))
}

/// Rotated predecessors of a captured output file (`X.log.1`, `X.log.2`, ...), newest first,
/// as far as they exist.
fn rotated_outputs(current: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for i in 1..=1000u32 {
        let mut name = current.as_os_str().to_owned();
        name.push(format!(".{i}"));
        let p = PathBuf::from(name);
        if !std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
            break;
        }
        out.push(p);
    }
    out
}

/// Open one of the agent's own files (no account check: the agent names and writes them).
fn open_own(p: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
}

fn notice_obj(source: &str, file: &Path, notice: impl Into<String>) -> Value {
    super::handlers::to_data(&LogLine {
        source: source.to_string(),
        file: file.display().to_string(),
        notice: Some(notice.into()),
        ..LogLine::default()
    })
}

/// [`dir_files`] listed with `acct`'s file-system identity (an account other than the
/// agent's), as [`open_checked`] opens.
fn dir_files_as(dir: &Path, acct: Option<&Account>) -> std::io::Result<Vec<(PathBuf, SystemTime)>> {
    crate::sys::as_account_fs(identity(acct).as_ref(), || dir_files(dir))?
}

/// The regular files of a log directory to show, oldest first (see the module docs).
pub fn dir_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, SystemTime)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n.starts_with('.') {
            continue;
        }
        let p = e.path();
        if p.extension()
            .is_some_and(|x| COMPRESSED.iter().any(|c| x == *c))
        {
            continue;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if !m.file_type().is_file() {
            continue;
        }
        out.push((p, m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out.truncate(MAX_DIR_FILES);
    out.reverse();
    Ok(out)
}

/// One file being read.
struct Tracked {
    source: &'static str,
    path: PathBuf,
    file: Option<File>,
    id: (u64, u64),
    offset: u64,
    partial: Vec<u8>,
    /// The last notice given for this file (not repeated).
    noticed: Option<String>,
    /// Part of a directory (dropped when it leaves the newest files).
    in_dir: bool,
    /// The agent's own output file: no account check (the agent names and writes it), and
    /// no notice while it does not exist (no command has run yet).
    agent_file: bool,
}

impl Tracked {
    fn new(source: &'static str, path: PathBuf, in_dir: bool) -> Tracked {
        Tracked {
            source,
            path,
            file: None,
            id: (0, 0),
            offset: 0,
            partial: Vec::new(),
            noticed: None,
            in_dir,
            agent_file: false,
        }
    }

    fn agent_output(path: PathBuf) -> Tracked {
        Tracked {
            agent_file: true,
            ..Tracked::new("output", path, false)
        }
    }

    fn notice(&mut self, msg: String, out: &mut Vec<Value>) {
        if self.noticed.as_deref() != Some(msg.as_str()) {
            out.push(notice_obj(self.source, &self.path, msg.clone()));
            self.noticed = Some(msg);
        }
    }

    /// Open the file (when not open); `tail` initial lines, or from `start_at_end`.
    fn open(&mut self, acct: Option<&Account>, tail: Option<usize>, out: &mut Vec<Value>) {
        let acct = if self.agent_file { None } else { acct };
        let missing = self.agent_file && !self.path.exists();
        if missing {
            return;
        }
        let opened = if self.in_dir {
            open_checked_in_dir(&self.path, acct)
        } else {
            open_checked(&self.path, acct)
        };
        match opened {
            Ok(Opened {
                file: Some(mut f),
                dev,
                ino,
                ..
            }) => {
                self.id = (dev, ino);
                self.partial.clear();
                self.noticed = None;
                match tail {
                    Some(n) if self.agent_file => match tail_raw(&mut f, n) {
                        Ok((lines, end)) => {
                            self.older_outputs(n.saturating_sub(lines.len()), out);
                            out.extend(lines.iter().map(|l| output_line_obj(&self.path, l)));
                            self.offset = end;
                        }
                        Err(e) => {
                            self.notice(format!("cannot read: {e}"), out);
                            return;
                        }
                    },
                    Some(n) => match tail_lines(&mut f, n) {
                        Ok((lines, end)) => {
                            out.extend(
                                lines
                                    .into_iter()
                                    .map(|l| line_obj(self.source, &self.path, l)),
                            );
                            self.offset = end;
                        }
                        Err(e) => {
                            self.notice(format!("cannot read: {e}"), out);
                            return;
                        }
                    },
                    None => self.offset = 0,
                }
                self.file = Some(f);
            }
            Ok(_) => self.notice("is a directory; not shown".into(), out),
            Err(e) => self.notice(format!("cannot open: {e}"), out),
        }
    }

    /// The last `need` lines of the rotated output files, oldest first (initial lines of a
    /// captured output file that has fewer than asked).
    fn older_outputs(&self, mut need: usize, out: &mut Vec<Value>) {
        let mut parts: Vec<Vec<Value>> = Vec::new();
        for p in rotated_outputs(&self.path) {
            if need == 0 {
                break;
            }
            let Ok(mut f) = open_own(&p) else { break };
            let Ok((lines, _)) = tail_raw(&mut f, need) else {
                break;
            };
            need = need.saturating_sub(lines.len());
            parts.push(lines.iter().map(|l| output_line_obj(&p, l)).collect());
        }
        out.extend(parts.into_iter().rev().flatten());
    }

    /// Read what was appended since the last poll.
    fn poll(&mut self, acct: Option<&Account>, out: &mut Vec<Value>) {
        let Some(f) = self.file.as_mut() else {
            // Not there (yet): try again, from its start (tail -F).
            self.open(acct, None, out);
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            self.offset = 0;
            self.partial.clear();
            out.push(notice_obj(
                self.source,
                &self.path,
                "file truncated; reading from its start",
            ));
        }
        if len > self.offset {
            let mut buf = Vec::new();
            let res = f
                .seek(SeekFrom::Start(self.offset))
                .and_then(|_| (&mut *f).take(READ_CHUNK).read_to_end(&mut buf));
            match res {
                Ok(n) => {
                    self.offset += n as u64;
                    self.partial.extend_from_slice(&buf);
                    let mut rest: &[u8] = &self.partial;
                    let mut lines: Vec<&[u8]> = Vec::new();
                    while let Some(p) = rest.iter().position(|b| *b == b'\n') {
                        lines.push(&rest[..p]);
                        rest = &rest[p + 1..];
                    }
                    if rest.len() > MAX_LINE {
                        lines.push(rest);
                        rest = &[];
                    }
                    let objs: Vec<Value> = lines
                        .into_iter()
                        .map(|l| {
                            if self.agent_file {
                                output_line_obj(&self.path, l)
                            } else {
                                line_obj(self.source, &self.path, line_text(l))
                            }
                        })
                        .collect();
                    self.partial = rest.to_vec();
                    out.extend(objs);
                }
                Err(e) => self.notice(format!("cannot read: {e}"), out),
            }
        }
    }

    /// Has the path been replaced by another file (rotation) or removed? Only acted on once
    /// the old file has been read to its end. The path is looked up as the account (as it
    /// is opened): root's `stat` of a path swapped for a symlink would tell whether its
    /// target exists where the account cannot look.
    fn rotated(&self, acct: Option<&Account>) -> bool {
        let Some(f) = &self.file else { return false };
        let fully_read = f.metadata().map(|m| m.len() <= self.offset).unwrap_or(true);
        if !fully_read {
            return false;
        }
        use std::os::unix::fs::MetadataExt;
        let acct = if self.agent_file { None } else { acct };
        let m =
            crate::sys::as_account_fs(identity(acct).as_ref(), || std::fs::metadata(&self.path))
                .and_then(|r| r);
        match m {
            Ok(m) => (m.dev(), m.ino()) != self.id,
            Err(_) => false,
        }
    }
}

/// Which files a request covers.
struct Sources {
    acct: Option<Account>,
    files: Vec<Tracked>,
    /// A log directory whose file set is rescanned while following.
    dir: Option<PathBuf>,
}

impl Sources {
    /// Open what a request covers: the agent's output file and the definition's `log_path`
    /// (checked as its account). Blocking (an NSS lookup, and `log_path` may sit on a hung
    /// mount): run on the file-system pool.
    fn resolve(
        spec: &crate::spec::ProcSpec,
        account: Result<Account, crate::executor::ExecError>,
        output: PathBuf,
        which: &str,
        out: &mut Vec<Value>,
    ) -> Sources {
        // The account whose view of the file system bounds what is shown. The agent's own
        // account (root) needs no check; an account that no longer exists sees nothing.
        let agent_uid = nix::unistd::getuid().as_raw();
        let acct = match account {
            Ok(a) if a.uid == agent_uid || a.uid == 0 => None,
            Ok(a) => Some(a),
            Err(e) => {
                if which != "output" && !spec.log_path.is_empty() {
                    out.push(notice_obj(
                        "log",
                        Path::new(&spec.log_path),
                        format!("{e}; log_path not shown"),
                    ));
                }
                Some(Account {
                    name: spec.account.clone(),
                    uid: u32::MAX,
                    gid: u32::MAX,
                    groups: Vec::new(),
                    home: String::new(),
                    shell: String::new(),
                })
            }
        };
        let mut files = Vec::new();
        let mut dir = None;
        if which == "all" || which == "output" {
            files.push(Tracked::agent_output(output));
        }
        if (which == "all" || which == "log") && !spec.log_path.is_empty() {
            let lp = PathBuf::from(&spec.log_path);
            match open_checked(&lp, acct.as_ref()) {
                Ok(o) if o.dir => {
                    match dir_files_as(&o.real, acct.as_ref()) {
                        Ok(list) => {
                            if list.is_empty() {
                                out.push(notice_obj("log", &lp, "no log files in this directory"));
                            }
                            files
                                .extend(list.into_iter().map(|(p, _)| Tracked::new("log", p, true)))
                        }
                        Err(e) => out.push(notice_obj("log", &lp, format!("cannot list: {e}"))),
                    }
                    dir = Some(o.real);
                }
                _ => files.push(Tracked::new("log", lp, false)),
            }
        } else if which == "log" {
            out.push(notice_obj(
                "log",
                Path::new(""),
                "the process has no log_path",
            ));
        }
        Sources { acct, files, dir }
    }

    /// Bring the file set of the log directory up to date (new files join, from their start
    /// when small, from their end otherwise; files beyond the newest few leave).
    fn rescan(&mut self, out: &mut Vec<Value>) {
        let Some(dir) = &self.dir else { return };
        let Ok(list) = dir_files_as(dir, self.acct.as_ref()) else {
            return;
        };
        self.files
            .retain(|t| !t.in_dir || list.iter().any(|(p, _)| *p == t.path));
        for (p, _) in list {
            if self.files.iter().any(|t| t.path == p) {
                continue;
            }
            let mut t = Tracked::new("log", p, true);
            t.open(self.acct.as_ref(), None, out);
            if let Some(f) = &t.file {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len > READ_CHUNK {
                    t.offset = len;
                }
            }
            self.files.push(t);
        }
    }

    fn initial(&mut self, lines: usize, out: &mut Vec<Value>) {
        let acct = self.acct.clone();
        for t in &mut self.files {
            t.open(acct.as_ref(), Some(lines), out);
        }
    }

    fn poll(&mut self, out: &mut Vec<Value>) {
        let acct = self.acct.clone();
        for t in &mut self.files {
            if t.rotated(acct.as_ref()) {
                t.file = None;
                t.offset = 0;
                out.push(notice_obj(
                    t.source,
                    &t.path,
                    "file replaced (rotated); reading the new one",
                ));
            }
            t.poll(acct.as_ref(), out);
        }
    }
}

fn ndjson(values: &[Value]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in values {
        if serde_json::to_writer(&mut b, v).is_ok() {
            b.push(b'\n');
        }
    }
    b
}

/// `GET /v1/logs` (see the module docs). Every authorized role may read logs.
pub async fn handler(State(st): State<AppState>, req: Request) -> Response {
    let engine = st.engine;
    engine.counters.api_request("logs");
    if let Err(e) = auth::access_of(&req) {
        return e.into_response();
    }
    let q: LogsQuery = match super::strict_query(req.uri()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let key: ProcKey = match q.key.parse() {
        Ok(k) => k,
        Err(e) => return ApiError::bad(format!("key: {e}")).into_response(),
    };
    let which = q.source.as_deref().unwrap_or("all");
    if !matches!(which, "all" | "output" | "log") {
        return ApiError::bad(format!(
            "source: {which:?} must be \"all\", \"output\" or \"log\""
        ))
        .into_response();
    }
    let lines = q.lines.unwrap_or(100);
    if lines > MAX_LINES {
        return ApiError::bad(format!("lines: at most {MAX_LINES}, got {lines}")).into_response();
    }
    let follow = q
        .follow
        .as_deref()
        .is_some_and(|f| f != "0" && f != "false");
    let Some(spec) = engine.spec_of(&key) else {
        return ApiError::new(codes::NOT_FOUND, format!("process {key} is not registered"))
            .into_response();
    };
    // Every read runs on the file-system pool, keyed by the log path: a log on a hung mount
    // stalls its own request (answered with a notice at the deadline), nothing else.
    let probe_key = probe_key(&spec, &engine.exec.output_path(&key));
    let output = engine.exec.output_path(&key);
    let which_s = which.to_string();
    // The account first (NSS, on the pool): the pool walks the log path as that account.
    let name = spec.account.clone();
    let account = match engine
        .fs
        .run_unkeyed("resolving an account", Duration::from_secs(30), move || {
            crate::executor::resolve_account(&name)
        })
        .await
    {
        Ok(a) => a,
        Err(e) => {
            return ApiError::new(codes::UNAVAILABLE, format!("cannot read the logs: {e}"))
                .into_response();
        }
    };
    // (An account that no longer exists opens no log_path: see `Sources::resolve`.)
    let who = identity(account.as_ref().ok());
    let res = engine
        .fs
        .run_as(
            &probe_key,
            who.clone(),
            crate::fspool::PROBE_DEADLINE,
            move || {
                let mut first = Vec::new();
                let mut src = Sources::resolve(&spec, account, output, &which_s, &mut first);
                src.initial(lines, &mut first);
                (src, first)
            },
        )
        .await;
    let (src, first) = match res {
        Ok(v) => v,
        Err(e) => {
            return ApiError::new(codes::UNAVAILABLE, format!("cannot read the logs: {e}"))
                .into_response();
        }
    };
    if !follow {
        return ok(super::handlers::to_data(&LogLines { lines: first }));
    }
    let head = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(ndjson(&first))]);
    let follower = Follower {
        fs: engine.fs.clone(),
        probe_key,
        who,
        src: Some(src),
        last_scan: Instant::now(),
        last_sent: Instant::now(),
    };
    let live = futures_util::stream::unfold(follower, |mut f| async move {
        let chunk = f.next().await?;
        Some((Ok(chunk), f))
    });
    use futures_util::StreamExt;
    (
        [
            ("content-type", "application/x-ndjson"),
            ("cache-control", "no-cache"),
        ],
        axum::body::Body::from_stream(head.chain(live)),
    )
        .into_response()
}

/// The path a request's reads are keyed by on the file-system pool: its `log_path` (the one
/// that may hang), else the agent's own output file.
fn probe_key(spec: &crate::spec::ProcSpec, output: &Path) -> PathBuf {
    if spec.log_path.is_empty() {
        output.to_path_buf()
    } else {
        PathBuf::from(&spec.log_path)
    }
}

/// A `follow` stream: polls its sources on the file-system pool every [`POLL`].
struct Follower {
    fs: crate::fspool::FsPool,
    probe_key: PathBuf,
    /// The account the pool walks the log path as.
    who: Option<crate::sys::FsIdentity>,
    /// `None` once the sources stopped answering (the stream then ends).
    src: Option<Sources>,
    last_scan: Instant,
    last_sent: Instant,
}

impl Follower {
    /// The next chunk to send (new lines, a notice or a keep-alive); `None` ends the stream.
    async fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            let mut src = self.src.take()?;
            tokio::time::sleep(POLL).await;
            let scan = self.last_scan.elapsed() >= RESCAN;
            if scan {
                self.last_scan = Instant::now();
            }
            let r = self
                .fs
                .run_as(
                    &self.probe_key,
                    self.who.clone(),
                    crate::fspool::PROBE_DEADLINE,
                    move || {
                        let mut out = Vec::new();
                        if scan {
                            src.rescan(&mut out);
                        }
                        src.poll(&mut out);
                        (src, out)
                    },
                )
                .await;
            let out = match r {
                Ok((src, out)) => {
                    self.src = Some(src);
                    out
                }
                Err(e) => {
                    // The files did not answer in time: say so and end the stream (the stuck
                    // read keeps its sources until the kernel returns).
                    let note =
                        notice_obj("log", &self.probe_key, format!("stopped following: {e}"));
                    return Some(ndjson(&[note]));
                }
            };
            if !out.is_empty() {
                self.last_sent = Instant::now();
                return Some(ndjson(&out));
            }
            if self.last_sent.elapsed() >= KEEPALIVE {
                self.last_sent = Instant::now();
                return Some(b"\n".to_vec());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn acct(uid: u32, gid: u32, groups: Vec<u32>) -> Account {
        Account {
            name: "u".into(),
            uid,
            gid,
            groups,
            home: "/".into(),
            shell: "/bin/sh".into(),
        }
    }

    #[test]
    fn permission_bits_follow_owner_group_other() {
        let a = acct(1000, 1000, vec![1000, 50]);
        // (mode, uid, gid, want, expected)
        let table: &[(u32, u32, u32, u32, bool)] = &[
            (0o600, 1000, 0, 4, true),
            (0o600, 0, 0, 4, false),
            (0o640, 0, 50, 4, true),
            (0o604, 0, 0, 4, true),
            (0o640, 0, 0, 4, false),
            (0o044, 1000, 1000, 4, false), // owner bits win, as in the kernel
            (0o711, 0, 0, 1, true),
            (0o700, 0, 0, 1, false),
            (0o750, 0, 50, 5, true),
            (0o740, 0, 50, 5, false),
        ];
        for &(mode, uid, gid, want, exp) in table {
            assert_eq!(
                permits(mode, uid, gid, Some(&a), want),
                exp,
                "mode {mode:o} uid {uid} gid {gid} want {want}"
            );
        }
        assert!(permits(0o000, 0, 0, None, 4));
        assert!(permits(0o000, 5, 5, Some(&acct(0, 0, vec![])), 4));
    }

    #[test]
    fn tail_and_follow_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        let mut w = File::create(&p).unwrap();
        for i in 0..10 {
            writeln!(w, "line {i}").unwrap();
        }
        let mut t = Tracked::new("log", p.clone(), false);
        let mut out = Vec::new();
        t.open(None, Some(3), &mut out);
        let got: Vec<&str> = out.iter().map(|v| v["line"].as_str().unwrap()).collect();
        assert_eq!(got, ["line 7", "line 8", "line 9"]);
        out.clear();
        write!(w, "partial").unwrap();
        t.poll(None, &mut out);
        assert!(out.is_empty(), "a partial line waits: {out:?}");
        writeln!(w, " done").unwrap();
        t.poll(None, &mut out);
        assert_eq!(out[0]["line"], "partial done");
        out.clear();
        // Truncation is noticed and reading restarts at the start.
        w.set_len(0).unwrap();
        drop(w);
        std::fs::write(&p, "fresh\n").unwrap();
        t.poll(None, &mut out);
        assert!(
            out[0]["notice"].as_str().unwrap().contains("truncated"),
            "{out:?}"
        );
        assert_eq!(out[1]["line"], "fresh");
    }

    #[test]
    fn captured_output_records_and_their_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let cur = dir.path().join("ns__a.1234.log");
        std::fs::write(
            dir.path().join("ns__a.1234.log.2"),
            "2026-01-01T00:00:00.000Z out zero\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("ns__a.1234.log.1"),
            "--- 2026-01-01T00:00:01Z start_cmd as root: x\n2026-01-01T00:00:01.500Z err one\n",
        )
        .unwrap();
        std::fs::write(&cur, "2026-01-01T00:00:02.000Z out two\nold plain line\n").unwrap();
        let mut t = Tracked::agent_output(cur.clone());
        let mut out = Vec::new();
        t.open(None, Some(4), &mut out);
        let got: Vec<(String, String)> = out
            .iter()
            .map(|v| {
                (
                    v["line"].as_str().unwrap().to_string(),
                    v["stream"].as_str().unwrap_or("-").to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "--- 2026-01-01T00:00:01Z start_cmd as root: x".into(),
                    "-".into()
                ),
                ("one".into(), "err".into()),
                ("two".into(), "out".into()),
                ("old plain line".into(), "-".into()),
            ]
        );
        assert_eq!(out[1]["time"], "2026-01-01T00:00:01.500Z");
        assert!(out[1]["file"].as_str().unwrap().ends_with(".log.1"));
        // Followed lines are parsed the same way.
        out.clear();
        let mut w = std::fs::OpenOptions::new().append(true).open(&cur).unwrap();
        writeln!(w, "2026-01-01T00:00:03.000Z err three").unwrap();
        t.poll(None, &mut out);
        assert_eq!(out[0]["line"], "three");
        assert_eq!(out[0]["stream"], "err");
    }

    /// A symlink another account made (in a directory it may write) is not followed; root's
    /// and the process's own account's are.
    #[test]
    fn symlinks_of_other_accounts_are_not_followed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give a symlink another owner");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.log");
        std::fs::write(&real, "x\n").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let other = nix::unistd::Uid::from_raw(54321);
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            Some(other),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert!(matches!(
            open_checked(&link, None),
            Err(OpenError::NotTrusted(_, 54321))
        ));
        // The same link through a directory symlink of that account: refused too.
        let sub = dir.path().join("sub");
        std::os::unix::fs::symlink(dir.path(), &sub).unwrap();
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &sub,
            Some(other),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert!(matches!(
            open_checked(&sub.join("real.log"), None),
            Err(OpenError::NotTrusted(_, 54321))
        ));
    }

    #[test]
    fn symlinks_resolve_but_non_regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.log");
        std::fs::write(&real, "x\n").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let o = open_checked(&link, None).unwrap();
        assert_eq!(o.real, std::fs::canonicalize(&real).unwrap());
        assert!(matches!(
            open_checked(Path::new("/dev/null"), None),
            Err(OpenError::NotRegular)
        ));
        // An account that cannot search the directory sees nothing.
        use std::os::unix::fs::PermissionsExt;
        let sub = dir.path().join("private");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("f.log"), "secret\n").unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        let me = nix::unistd::getuid().as_raw();
        let stranger = acct(me.wrapping_add(12345), 54321, vec![54321]);
        assert!(matches!(
            open_checked(&sub.join("f.log"), Some(&stranger)),
            Err(OpenError::Denied(_))
        ));
    }

    #[test]
    fn directory_keeps_the_newest_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..7 {
            let p = dir.path().join(format!("f{i}.log"));
            std::fs::write(&p, format!("{i}\n")).unwrap();
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i);
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        std::fs::write(dir.path().join("old.log.gz"), "z").unwrap();
        std::fs::write(dir.path().join(".hidden"), "h").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let names: Vec<String> = dir_files(dir.path())
            .unwrap()
            .into_iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["f2.log", "f3.log", "f4.log", "f5.log", "f6.log"]);
    }
}
