//! The output keeper: one long-lived process per state directory (`procagentd
//! --output-keeper DIR`, named `procagent-out`) that holds the read end of every command's
//! stdout and stderr pipes, turns what they carry into records ([`super::record`]) in the
//! process's output file, and rotates those files ([`super::rotate`]).
//!
//! It outlives the agent on purpose: a daemon inherits its start command's pipes, and a
//! pipe whose reader dies breaks its writer (EPIPE, SIGPIPE). Because the keeper, not the
//! agent, reads them, the agent can stop, be killed or be upgraded while every daemon's
//! output goes on being captured; the next agent connects to the same keeper.
//!
//! * Single instance per state directory: `DIR/keeper.lock` (flock). A second keeper exits
//!   at once; the agent then connects to the first.
//! * One thread, one epoll set: the listening socket ([`super::wire`]), agent connections,
//!   a signalfd, and the pipes. A pipe is read in turns of at most [`READ_TURN`] bytes, so
//!   a flooding process cannot starve the others; what it writes beyond what the keeper can
//!   store simply waits in its pipe (the writer blocks, as with any log relay).
//! * The agent holds a duplicate of every read end ([`super::wire`]): when the keeper dies or
//!   stops, no writer gets EPIPE; the agent starts the next keeper (from its own, possibly
//!   newer, binary) and hands the read ends over, and what waited in the pipes is read then.
//!   Only the agent and the keeper gone together break the daemons' output.
//! * Exits as soon as it is idle (no agent connected and no pipe open) once an agent has
//!   been connected (within [`LINGER`] of its start otherwise), so that it holds the state
//!   directory's file system no longer than needed; or on SIGTERM or SIGINT (unfinished
//!   lines are written first). SIGHUP is ignored. Killing it breaks the stdout of every
//!   daemon whose pipes it holds: leave it running.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use rustix::event::epoll;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use super::record::{self, Splitter, Stream};
use super::rotate::{Limits, Rotor, Space};
use super::wire::{self, HeldPipe, MAX_FDS, MAX_PAYLOAD, PROTOCOL, Reply, Request};

/// How long a keeper that no agent has connected to yet waits for one.
pub const LINGER: Duration = Duration::from_secs(2);
/// Bytes read from one pipe before the others get their turn.
pub const READ_TURN: usize = 256 * 1024;
/// Most bytes one [`Request::Collect`] reads from one pipe (a process that writes faster
/// than the keeper reads must not keep a collect going forever).
pub const DRAIN_LIMIT: usize = 4 << 20;
/// The process name (`comm`) the keeper gives itself.
pub const NAME: &str = "procagent-out";
/// File names in the output directory.
pub const SOCKET: &str = "keeper.sock";
pub const LOCK: &str = "keeper.lock";

const TOKEN_LISTENER: u64 = 0;
const TOKEN_SIGNALS: u64 = 1;

/// Why the keeper could not start.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("output keeper: cannot {what} {path}: {source}")]
    Setup {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn setup(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeeperError {
    let path = path.display().to_string();
    move |source| KeeperError::Setup { what, path, source }
}

/// One pipe read end.
struct Pipe {
    fd: OwnedFd,
    /// The pipe's inode (its name on the wire).
    ino: u64,
    stem: String,
    splitter: Splitter,
    capture: Option<u64>,
}

/// A command whose output the agent will ask for.
struct Capture {
    conn: u64,
    tail: VecDeque<u8>,
    total: u64,
    pipes: [u64; 2],
}

/// A file and how many open pipes write to it.
struct FileRef {
    rotor: Rotor,
    pipes: usize,
}

struct Keeper {
    dir: PathBuf,
    epoll: OwnedFd,
    listener: OwnedFd,
    signals: SignalFd,
    limits: Limits,
    tail_bytes: usize,
    space: Space,
    next: u64,
    conns: HashMap<u64, OwnedFd>,
    pipes: HashMap<u64, Pipe>,
    /// Pipe inode to token.
    by_ino: HashMap<u64, u64>,
    files: HashMap<String, FileRef>,
    captures: HashMap<u64, Capture>,
    buf: Vec<u8>,
    out: Vec<u8>,
    idle_since: Option<Instant>,
    /// An agent has been connected (idle from then on means: exit).
    served: bool,
    stop: bool,
}

/// Run the keeper for the output directory `dir` until it is idle or told to stop.
/// Returns at once (Ok) when another keeper already holds the directory.
pub fn run(dir: &Path) -> Result<(), KeeperError> {
    let _ = nix::sys::prctl::set_name(c"procagent-out");
    let _ = std::env::set_current_dir("/");
    let _ = crate::sys::raise_nofile_limit();
    let lock_path = dir.join(LOCK);
    let lockf = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(setup("open", &lock_path))?;
    // A keeper that is exiting still holds the lock for a moment: wait a little for it.
    let mut lockf = lockf;
    let deadline = Instant::now() + Duration::from_secs(1);
    let _lock = loop {
        match nix::fcntl::Flock::lock(lockf, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => break l,
            Err((f, _)) if Instant::now() < deadline => {
                lockf = f;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => {
                tracing::debug!(dir = %dir.display(), "another output keeper runs for this directory");
                return Ok(());
            }
        }
    };
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| setup("block signals for", dir)(e.into()))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| setup("create a signalfd for", dir)(e.into()))?;
    let sock_path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&sock_path);
    let listener = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| setup("create a socket for", &sock_path)(e.into()))?;
    let addr = SocketAddrUnix::new(&sock_path)
        .map_err(|e| setup("name the socket", &sock_path)(e.into()))?;
    rustix::net::bind(&listener, &addr).map_err(|e| setup("bind", &sock_path)(e.into()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))
        .map_err(setup("chmod", &sock_path))?;
    rustix::net::listen(&listener, 64).map_err(|e| setup("listen on", &sock_path)(e.into()))?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)
        .map_err(|e| setup("create an epoll set for", dir)(e.into()))?;
    let add = |fd: std::os::fd::BorrowedFd<'_>, token: u64| {
        epoll::add(
            &ep,
            fd,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::IN,
        )
    };
    add(listener.as_fd(), TOKEN_LISTENER).map_err(|e| setup("watch", &sock_path)(e.into()))?;
    add(signals.as_fd(), TOKEN_SIGNALS).map_err(|e| setup("watch signals for", dir)(e.into()))?;
    tracing::info!(dir = %dir.display(), pid = std::process::id(), "output keeper started");
    let mut k = Keeper {
        dir: dir.to_path_buf(),
        epoll: ep,
        listener,
        signals,
        limits: Limits::default(),
        tail_bytes: 16 * 1024,
        space: Space::new(dir),
        next: 2,
        conns: HashMap::new(),
        pipes: HashMap::new(),
        by_ino: HashMap::new(),
        files: HashMap::new(),
        captures: HashMap::new(),
        buf: vec![0u8; 64 * 1024],
        out: Vec::with_capacity(256 * 1024),
        idle_since: Some(Instant::now()),
        served: false,
        stop: false,
    };
    k.run_loop();
    // The socket goes with the keeper; the lock is released when the process ends.
    let _ = std::fs::remove_file(&sock_path);
    tracing::info!(dir = %dir.display(), "output keeper exiting");
    Ok(())
}

impl Keeper {
    fn token(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn run_loop(&mut self) {
        let mut events = Vec::with_capacity(256);
        loop {
            let waiting = self
                .pipes
                .values()
                .any(|p| p.splitter.waiting_since().is_some());
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: if waiting { 250_000_000 } else { 500_000_000 },
            };
            events.clear();
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&timeout),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "output keeper: epoll failed");
                    self.stop = true;
                }
            }
            for ev in events.drain(..) {
                let token = ev.data.u64();
                match token {
                    TOKEN_LISTENER => self.accept(),
                    TOKEN_SIGNALS => self.signal(),
                    t if self.conns.contains_key(&t) => self.serve(t),
                    t => {
                        self.read_pipe(t, READ_TURN);
                    }
                }
            }
            self.flush_waiting(false);
            if self.stop {
                self.flush_waiting(true);
                return;
            }
            if self.conns.is_empty() && self.pipes.is_empty() {
                let since = *self.idle_since.get_or_insert_with(Instant::now);
                if self.served || since.elapsed() >= LINGER {
                    return;
                }
            } else {
                self.idle_since = None;
            }
        }
    }

    fn signal(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let sig = info.ssi_signo as i32;
            if sig == Signal::SIGTERM as i32 || sig == Signal::SIGINT as i32 {
                tracing::info!(signal = sig, "output keeper stopping");
                self.stop = true;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let conn = match rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC) {
                Ok(c) => c,
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "output keeper: accept failed");
                    return;
                }
            };
            let me = rustix::process::geteuid().as_raw();
            match rustix::net::sockopt::socket_peercred(&conn) {
                Ok(c) if c.uid.as_raw() == me => {}
                Ok(c) => {
                    tracing::warn!(
                        uid = c.uid.as_raw(),
                        "output keeper: refused a peer that is not the agent's account"
                    );
                    continue;
                }
                Err(_) => continue,
            }
            // Replies may block briefly (a long output in several datagrams), never long.
            let _ = rustix::net::sockopt::set_socket_timeout(
                &conn,
                rustix::net::sockopt::Timeout::Send,
                Some(Duration::from_secs(5)),
            );
            let t = self.token();
            if epoll::add(
                &self.epoll,
                &conn,
                epoll::EventData::new_u64(t),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            )
            .is_ok()
            {
                self.conns.insert(t, conn);
                self.served = true;
            }
        }
    }

    fn drop_conn(&mut self, t: u64) {
        if let Some(c) = self.conns.remove(&t) {
            let _ = epoll::delete(&self.epoll, &c);
        }
        self.captures.retain(|_, c| c.conn != t);
    }

    /// Handle every request waiting on connection `t`.
    fn serve(&mut self, t: u64) {
        loop {
            let Some(fd) = self.conns.get(&t) else { return };
            let got = wire::recv::<Request>(fd.as_fd(), true);
            match got {
                Ok(Some(m)) => {
                    if !self.handle(t, m.header, m.fds) {
                        self.drop_conn(t);
                        return;
                    }
                }
                Ok(None) => {
                    self.drop_conn(t);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "output keeper: dropping a connection");
                    self.drop_conn(t);
                    return;
                }
            }
        }
    }

    fn reply(&self, t: u64, r: &Reply, payload: &[u8], fds: &[OwnedFd]) -> bool {
        let Some(fd) = self.conns.get(&t) else {
            return false;
        };
        wire::send(fd.as_fd(), r, payload, &wire::borrow_all(fds)).is_ok()
    }

    /// Returns false when the connection must be dropped.
    fn handle(&mut self, t: u64, req: Request, fds: Vec<OwnedFd>) -> bool {
        match req {
            Request::Hello {
                protocol: _,
                limits,
                tail_bytes,
            } => {
                self.limits = Limits {
                    file_bytes: limits.file_bytes.max(64 << 10),
                    files: limits.files.max(2),
                    min_free: limits.min_free,
                };
                self.tail_bytes = tail_bytes.clamp(256, 1 << 20);
                self.reply(
                    t,
                    &Reply::Hello {
                        protocol: PROTOCOL,
                        pid: std::process::id(),
                    },
                    &[],
                    &[],
                )
            }
            Request::Open { stem, header, tail } => match self.open(t, &stem, &header, tail) {
                Ok((id, pipes, fds)) => self.reply(t, &Reply::Opened { id, pipes }, &[], &fds),
                Err(message) => self.reply(t, &Reply::Error { message }, &[], &[]),
            },
            Request::Adopt { pipes } => {
                let n = pipes.len();
                self.adopt(pipes, fds);
                tracing::debug!(pipes = n, "output keeper: pipes handed over");
                true
            }
            Request::Held => self.send_held(t),
            Request::Collect { id } => self.collect(t, id),
            Request::Release { id } => {
                self.captures.remove(&id);
                true
            }
            Request::Status => {
                let r = Reply::Status {
                    pid: std::process::id(),
                    streams: self.pipes.len(),
                    files: self.files.len(),
                    captures: self.captures.len(),
                    connections: self.conns.len(),
                };
                self.reply(t, &r, &[], &[])
            }
        }
    }

    fn open(
        &mut self,
        conn: u64,
        stem: &str,
        header: &str,
        tail: bool,
    ) -> Result<(u64, [u64; 2], Vec<OwnedFd>), String> {
        if !valid_stem(stem) {
            return Err(format!("invalid output file stem {stem:?}"));
        }
        let pipe = || -> std::io::Result<(OwnedFd, OwnedFd, OwnedFd)> {
            let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            let held = rustix::io::fcntl_dupfd_cloexec(&r, 0)?;
            Ok((r, w, held))
        };
        let (ro, wo, ho) = pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
        let (re, we, he) = pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
        let stamp = record::stamp(SystemTime::now());
        file_of(&mut self.files, &self.dir, stem).rotor.write(
            &record::header_line(header),
            &self.limits,
            &mut self.space,
            &stamp,
        );
        let to = self
            .add_pipe(ro, stem, Stream::Out)
            .map_err(|e| format!("cannot watch a pipe: {e}"))?;
        let te = self
            .add_pipe(re, stem, Stream::Err)
            .map_err(|e| format!("cannot watch a pipe: {e}"))?;
        let inos = [to, te].map(|t| self.pipes.get(&t).map_or(0, |p| p.ino));
        let id = self.token();
        if tail {
            self.captures.insert(
                id,
                Capture {
                    conn,
                    tail: VecDeque::new(),
                    total: 0,
                    pipes: [to, te],
                },
            );
            for tok in [to, te] {
                if let Some(p) = self.pipes.get_mut(&tok) {
                    p.capture = Some(id);
                }
            }
        }
        Ok((id, inos, vec![wo, we, ho, he]))
    }

    /// Start reading a pipe read end; returns its token (the existing one when this pipe is
    /// read already).
    fn add_pipe(&mut self, fd: OwnedFd, stem: &str, stream: Stream) -> std::io::Result<u64> {
        let ino = rustix::fs::fstat(&fd)?.st_ino;
        if let Some(t) = self.by_ino.get(&ino) {
            return Ok(*t);
        }
        let fl = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, fl | rustix::fs::OFlags::NONBLOCK)?;
        let t = self.token();
        epoll::add(
            &self.epoll,
            &fd,
            epoll::EventData::new_u64(t),
            epoll::EventFlags::IN,
        )?;
        self.pipes.insert(
            t,
            Pipe {
                fd,
                ino,
                stem: stem.to_string(),
                splitter: Splitter::new(stream),
                capture: None,
            },
        );
        self.by_ino.insert(ino, t);
        file_of(&mut self.files, &self.dir, stem).pipes += 1;
        Ok(t)
    }

    /// Read pipes the agent held (handed over from a keeper that went away).
    fn adopt(&mut self, list: Vec<HeldPipe>, fds: Vec<OwnedFd>) {
        for (h, fd) in list.into_iter().zip(fds) {
            if !valid_stem(&h.stem) {
                continue;
            }
            if let Err(e) = self.add_pipe(fd, &h.stem, h.stream) {
                tracing::warn!(error = %e, stem = %h.stem, "output keeper: cannot read a handed-over pipe");
            }
        }
    }

    /// Duplicates of every pipe read end, for the agent to hold.
    fn send_held(&mut self, t: u64) -> bool {
        let mut all: Vec<(HeldPipe, OwnedFd)> = Vec::new();
        for p in self.pipes.values() {
            let Ok(fd) = rustix::io::fcntl_dupfd_cloexec(&p.fd, 0) else {
                continue;
            };
            let h = HeldPipe {
                pipe: p.ino,
                stem: p.stem.clone(),
                stream: p.splitter.stream(),
            };
            all.push((h, fd));
        }
        let mut batches: Vec<Vec<(HeldPipe, OwnedFd)>> = Vec::new();
        let mut it = all.into_iter().peekable();
        while it.peek().is_some() {
            batches.push(it.by_ref().take(MAX_FDS).collect());
        }
        if batches.is_empty() {
            batches.push(Vec::new());
        }
        let n = batches.len();
        for (i, b) in batches.into_iter().enumerate() {
            let (pipes, fds): (Vec<HeldPipe>, Vec<OwnedFd>) = b.into_iter().unzip();
            let r = Reply::Holding {
                pipes,
                more: i + 1 < n,
            };
            if !self.reply(t, &r, &[], &fds) {
                return false;
            }
        }
        true
    }

    fn collect(&mut self, t: u64, id: u64) -> bool {
        let Some(pipes) = self.captures.get(&id).map(|c| c.pipes) else {
            return self.reply(
                t,
                &Reply::Output {
                    id,
                    total: 0,
                    more: false,
                },
                &[],
                &[],
            );
        };
        for p in pipes {
            self.read_pipe(p, DRAIN_LIMIT);
        }
        let (total, tail) = match self.captures.get_mut(&id) {
            Some(c) => (c.total, c.tail.make_contiguous().to_vec()),
            None => (0, Vec::new()),
        };
        let mut parts: Vec<&[u8]> = tail.chunks(MAX_PAYLOAD).collect();
        if parts.is_empty() {
            parts.push(&[]);
        }
        let n = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let r = Reply::Output {
                id,
                total,
                more: i + 1 < n,
            };
            if !self.reply(t, &r, part, &[]) {
                return false;
            }
        }
        true
    }

    /// Read pipe `t` until it has nothing more (or `limit` bytes), capturing what it
    /// carries; at its end, close it.
    fn read_pipe(&mut self, t: u64, limit: usize) {
        let mut read = 0;
        let mut ended = false;
        while read < limit {
            let Some(p) = self.pipes.get(&t) else { return };
            match rustix::io::read(&p.fd, &mut self.buf[..]) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    read += n;
                    self.take(t, n);
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "output keeper: reading a pipe failed");
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            self.close_pipe(t);
        }
    }

    /// Capture the first `n` bytes of the read buffer, read from pipe `t`.
    fn take(&mut self, t: u64, n: usize) {
        let Keeper {
            pipes,
            files,
            captures,
            buf,
            out,
            limits,
            space,
            tail_bytes,
            ..
        } = self;
        let Some(p) = pipes.get_mut(&t) else { return };
        let data = &buf[..n];
        if let Some(c) = p.capture.and_then(|id| captures.get_mut(&id)) {
            c.total += n as u64;
            c.tail.extend(data);
            let excess = c.tail.len().saturating_sub(*tail_bytes);
            c.tail.drain(..excess);
        }
        let stamp = record::stamp(SystemTime::now());
        p.splitter.feed(data, &stamp, out);
        if let Some(f) = files.get_mut(&p.stem) {
            f.rotor.write(out, limits, space, &stamp);
        }
        out.clear();
    }

    fn close_pipe(&mut self, t: u64) {
        let Some(mut p) = self.pipes.remove(&t) else {
            return;
        };
        self.by_ino.remove(&p.ino);
        let _ = epoll::delete(&self.epoll, &p.fd);
        let stamp = record::stamp(SystemTime::now());
        p.splitter.flush(&stamp, &mut self.out);
        if let Some(f) = self.files.get_mut(&p.stem) {
            f.rotor
                .write(&self.out, &self.limits, &mut self.space, &stamp);
            f.pipes = f.pipes.saturating_sub(1);
            if f.pipes == 0 {
                f.rotor.close();
                if !f.rotor.has_dropped() {
                    self.files.remove(&p.stem);
                }
            }
        }
        self.out.clear();
    }

    /// Write unfinished lines that waited long enough (all of them with `all`).
    fn flush_waiting(&mut self, all: bool) {
        let due: Vec<u64> = self
            .pipes
            .iter()
            .filter(|(_, p)| {
                p.splitter
                    .waiting_since()
                    .is_some_and(|s| all || s.elapsed() >= record::PARTIAL_FLUSH)
            })
            .map(|(t, _)| *t)
            .collect();
        if due.is_empty() {
            return;
        }
        let stamp = record::stamp(SystemTime::now());
        for t in due {
            let Some(p) = self.pipes.get_mut(&t) else {
                continue;
            };
            p.splitter.flush(&stamp, &mut self.out);
            if let Some(f) = self.files.get_mut(&p.stem) {
                f.rotor
                    .write(&self.out, &self.limits, &mut self.space, &stamp);
            }
            self.out.clear();
        }
    }
}

/// The file of `stem`, opened on first use.
fn file_of<'a>(files: &'a mut HashMap<String, FileRef>, dir: &Path, stem: &str) -> &'a mut FileRef {
    files.entry(stem.to_string()).or_insert_with(|| FileRef {
        rotor: Rotor::new(dir, stem),
        pipes: 0,
    })
}

/// A file stem as the agent makes them ([`crate::util::safe_file_stem`]): safe characters,
/// not hidden, not too long.
pub fn valid_stem(stem: &str) -> bool {
    !stem.is_empty()
        && stem.len() <= 200
        && !stem.starts_with('.')
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_are_checked() {
        assert!(valid_stem(&crate::util::safe_file_stem("ns", "a/b c")));
        for bad in ["", ".hidden", "a/b", "../x", "a b"] {
            assert!(!valid_stem(bad), "{bad:?}");
        }
    }
}
