//! The agent's side of output capture: its connection to the output keeper
//! ([`super::keeper`]), started when none runs, owned by one thread (`procagent-output`) so
//! that no async worker ever waits on the socket. Async callers hand it a job and await the
//! answer with a deadline; when the keeper cannot be reached, [`OutputClient::open`] fails
//! and the command runs with its output discarded (supervision never waits on capture).
//!
//! The thread also holds a duplicate of every pipe read end the keeper reads (see
//! [`super::wire`]). Every second it checks its connection: a keeper that went away
//! (crashed, killed, told to stop for an upgrade) is replaced at once and given the read
//! ends, so the processes writing to them never see a broken pipe. On each connection it
//! hands over what it holds and takes duplicates of what it lacks (after an agent restart,
//! everything). Duplicates of pipes whose writers are all gone are dropped.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use tokio::sync::oneshot;

use super::keeper;
use super::record::Stream;
use super::rotate::Limits;
use super::wire::{self, HeldPipe, MAX_FDS, PROTOCOL, Reply, Request};

/// How long an async caller waits for the keeper's answer.
const ANSWER: Duration = Duration::from_secs(15);
/// How long a freshly started keeper has to listen.
const KEEPER_START: Duration = Duration::from_secs(5);
/// After a failed connection, no new attempt before this (callers get an error at once).
const RETRY: Duration = Duration::from_secs(1);
/// How often the connection and the held pipes are checked.
const CHECK: Duration = Duration::from_secs(1);

/// What the keeper is told, and how to start it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// Bytes of a command's output kept for its result.
    pub tail_bytes: usize,
    /// The program run as `PROGRAM --output-keeper DIR` (the agent's own binary).
    pub program: PathBuf,
}

/// Why output cannot be captured.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutputError {
    #[error("the output keeper is not available: {0}")]
    Unavailable(String),
    #[error("the output keeper refused: {0}")]
    Refused(String),
    #[error("the output keeper did not answer")]
    NoAnswer,
}

/// The write ends of a command's stdout and stderr pipes, and its capture.
pub struct Pipes {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub capture: Capture,
}

/// A command's captured output, kept by the keeper until this is dropped.
#[derive(Debug)]
pub struct Capture {
    id: u64,
    conn: u64,
    tx: mpsc::Sender<Job>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.tx.send(Job::Release {
            id: self.id,
            conn: self.conn,
        });
    }
}

/// A capture as the thread answers it: keeper id, connection number, stdout and stderr.
type Opened = (u64, u64, Vec<OwnedFd>);

enum Job {
    Open {
        stem: String,
        header: String,
        reply: oneshot::Sender<Result<Opened, OutputError>>,
    },
    Collect {
        id: u64,
        conn: u64,
        reply: oneshot::Sender<Option<(u64, Vec<u8>)>>,
    },
    Release {
        id: u64,
        conn: u64,
    },
}

/// Handle to the connection thread; cheap to clone.
///
/// Its channel needs no bound of its own: every job belongs to a command that runs (an
/// `Open` and a `Collect` from the task that spawned it and waits for the answer, a `Release`
/// when its capture is dropped), and commands are bounded by `supervisor.max_parallel_ops`
/// and the probes' budget. A `Release` must never be dropped (the keeper would hold the
/// pipes), which a full bounded channel would force.
#[derive(Clone)]
pub struct OutputClient {
    tx: mpsc::Sender<Job>,
}

impl OutputClient {
    /// Start the connection thread for the output directory `dir`; it connects (starting
    /// the keeper if needed) at once.
    pub fn start(dir: PathBuf, settings: Settings) -> OutputClient {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("procagent-output".into())
            .spawn(move || Worker::new(dir, settings).run(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the output thread; command output is not captured");
        }
        OutputClient { tx }
    }

    /// New pipes for a command whose header line is `header`, in the output file `stem`.
    pub async fn open(&self, stem: &str, header: String) -> Result<Pipes, OutputError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Open {
                stem: stem.to_string(),
                header,
                reply,
            })
            .map_err(|_| OutputError::Unavailable("the output thread is gone".into()))?;
        let (id, conn, fds) = tokio::time::timeout(ANSWER, rx)
            .await
            .map_err(|_| OutputError::NoAnswer)?
            .map_err(|_| OutputError::NoAnswer)??;
        let mut it = fds.into_iter();
        let (Some(stdout), Some(stderr)) = (it.next(), it.next()) else {
            return Err(OutputError::Refused("no pipes in the answer".into()));
        };
        Ok(Pipes {
            stdout,
            stderr,
            capture: Capture {
                id,
                conn,
                tx: self.tx.clone(),
            },
        })
    }

    /// What the command has written so far (its tail, at most `tail_bytes`, with a note
    /// of the bytes cut before it); never waits for more output.
    pub async fn collect(&self, cap: &Capture) -> String {
        let (reply, rx) = oneshot::channel();
        let job = Job::Collect {
            id: cap.id,
            conn: cap.conn,
            reply,
        };
        if self.tx.send(job).is_err() {
            return String::new();
        }
        match tokio::time::timeout(ANSWER, rx).await {
            Ok(Ok(Some((total, tail)))) => render(total, &tail),
            _ => String::new(),
        }
    }
}

/// The text of a command's output tail: `[... N bytes cut ...]` first when `total` is more
/// than what was kept; a character cut at the start is dropped.
pub fn render(total: u64, tail: &[u8]) -> String {
    let mut t = tail;
    let mut cut = total.saturating_sub(tail.len() as u64);
    if cut > 0 {
        while let Some((b, rest)) = t.split_first() {
            if b & 0xC0 != 0x80 {
                break;
            }
            t = rest;
            cut += 1;
        }
    }
    let text = String::from_utf8_lossy(t);
    if cut > 0 {
        format!("[... {cut} bytes cut ...]\n{text}")
    } else {
        text.into_owned()
    }
}

struct Worker {
    dir: PathBuf,
    settings: Settings,
    conn: Option<OwnedFd>,
    /// Counts connections, so that a capture made on an older one is never asked for.
    conn_no: u64,
    failed_at: Option<Instant>,
    /// Duplicates of the pipe read ends the keeper reads, by pipe inode.
    held: HashMap<u64, (HeldPipe, OwnedFd)>,
    /// An epoll set of the held read ends, asking for no event: it reports only those whose
    /// writers are all gone (HUP), so a check costs what ended, not what is held (polling
    /// two thousand pipes every second was a visible share of an idle agent's CPU). `None`
    /// when it could not be created: the check then polls every held pipe.
    hup: Option<OwnedFd>,
    checked: Instant,
}

impl Worker {
    fn new(dir: PathBuf, settings: Settings) -> Worker {
        Worker {
            dir,
            settings,
            conn: None,
            conn_no: 0,
            failed_at: None,
            held: HashMap::new(),
            hup: rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC).ok(),
            checked: Instant::now(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        if let Err(e) = self.ensure() {
            tracing::warn!(error = %e, "output keeper not reachable yet");
        }
        loop {
            let job = match rx.recv_timeout(CHECK) {
                Ok(j) => Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            if self.checked.elapsed() >= CHECK {
                self.checked = Instant::now();
                self.check();
            }
            let Some(job) = job else { continue };
            match job {
                Job::Open {
                    stem,
                    header,
                    reply,
                } => {
                    let r = self.open(&stem, &header);
                    let _ = reply.send(r);
                }
                Job::Collect { id, conn, reply } => {
                    let r = if conn == self.conn_no && self.conn.is_some() {
                        self.collect(id)
                    } else {
                        // The capture went with an older connection.
                        None
                    };
                    let _ = reply.send(r);
                }
                Job::Release { id, conn } => {
                    if conn == self.conn_no
                        && let Some(c) = &self.conn
                        && wire::send(c.as_fd(), &Request::Release { id }, &[], &[]).is_err()
                    {
                        self.lost("release");
                    }
                }
            }
        }
    }

    /// Drop duplicates of pipes nobody writes to any more, and replace a keeper that went
    /// away while pipes are held (their writers would block once the pipes fill).
    /// Hold a duplicate of a pipe read end, watched for its end.
    fn hold(&mut self, h: HeldPipe, fd: OwnedFd) {
        let ino = h.pipe;
        if let Some(ep) = &self.hup
            && rustix::event::epoll::add(
                ep,
                &fd,
                rustix::event::epoll::EventData::new_u64(ino),
                rustix::event::epoll::EventFlags::empty(),
            )
            .is_err()
        {
            // Cannot watch this one: fall back to polling them all.
            self.hup = None;
        }
        if let Some((_, old)) = self.held.insert(ino, (h, fd)) {
            self.unwatch(&old);
        }
    }

    /// Stop watching a held read end before it is dropped (the pipe lives on in the keeper,
    /// so closing ours would not take it out of the epoll set).
    fn unwatch(&self, fd: &OwnedFd) {
        if let Some(ep) = &self.hup {
            let _ = rustix::event::epoll::delete(ep, fd);
        }
    }

    /// The held pipes whose writers are all gone.
    fn ended_pipes(&self) -> Vec<u64> {
        use rustix::event::{PollFd, PollFlags};
        if let Some(ep) = &self.hup {
            let mut ended = Vec::new();
            let mut events: Vec<rustix::event::epoll::Event> = Vec::with_capacity(256);
            let zero = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            loop {
                events.clear();
                if rustix::event::epoll::wait(
                    ep,
                    rustix::buffer::spare_capacity(&mut events),
                    Some(&zero),
                )
                .is_err()
                {
                    break;
                }
                let n = events.len();
                ended.extend(events.iter().map(|e| e.data.u64()));
                if n < 256 || ended.len() >= self.held.len() {
                    break;
                }
                // More than a batch ended: the ones seen are removed before the next wait,
                // so it reports the others (level-triggered, the same ones would come back).
                for ino in &ended[ended.len() - n..] {
                    if let Some((_, fd)) = self.held.get(ino) {
                        self.unwatch(fd);
                    }
                }
            }
            return ended;
        }
        let inos: Vec<u64> = self.held.keys().copied().collect();
        let mut fds: Vec<PollFd<'_>> = inos
            .iter()
            .filter_map(|i| self.held.get(i))
            .map(|(_, fd)| PollFd::new(fd, PollFlags::IN))
            .collect();
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let _ = rustix::event::poll(&mut fds, Some(&zero));
        inos.iter()
            .zip(fds.iter())
            .filter(|(_, f)| f.revents().contains(PollFlags::HUP))
            .map(|(i, _)| *i)
            .collect()
    }

    fn check(&mut self) {
        use rustix::event::{PollFd, PollFlags};
        if !self.held.is_empty() {
            for i in self.ended_pipes() {
                if let Some((_, fd)) = self.held.remove(&i) {
                    self.unwatch(&fd);
                }
            }
        }
        if let Some(c) = &self.conn {
            let mut fds = [PollFd::new(c, PollFlags::IN | PollFlags::RDHUP)];
            let zero = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // Nothing is ever sent unasked: readable means closed (or broken).
            if rustix::event::poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0) {
                self.lost("check");
                self.failed_at = None;
            }
        }
        if self.conn.is_none() && !self.held.is_empty() {
            let _ = self.ensure();
        }
    }

    /// Hand the held read ends to the keeper (it ignores those it reads already), then take
    /// duplicates of those it reads that are not held here.
    fn sync(&mut self) -> std::io::Result<()> {
        let Some(c) = &self.conn else { return Ok(()) };
        let all: Vec<&(HeldPipe, OwnedFd)> = self.held.values().collect();
        for chunk in all.chunks(MAX_FDS) {
            let pipes: Vec<HeldPipe> = chunk.iter().map(|(h, _)| h.clone()).collect();
            let fds: Vec<std::os::fd::BorrowedFd<'_>> =
                chunk.iter().map(|(_, f)| f.as_fd()).collect();
            wire::send(c.as_fd(), &Request::Adopt { pipes }, &[], &fds)?;
        }
        let handed = self.held.len();
        wire::send(c.as_fd(), &Request::Held, &[], &[])?;
        let mut taken = 0;
        let mut new: HashMap<u64, (HeldPipe, OwnedFd)> = HashMap::new();
        loop {
            let m = wire::recv::<Reply>(c.as_fd(), false)?
                .ok_or_else(|| std::io::Error::other("the keeper closed the connection"))?;
            let Reply::Holding { pipes, more } = m.header else {
                return Err(std::io::Error::other("unexpected answer to held"));
            };
            for (h, fd) in pipes.into_iter().zip(m.fds) {
                if !self.held.contains_key(&h.pipe) && !new.contains_key(&h.pipe) {
                    taken += 1;
                    new.insert(h.pipe, (h, fd));
                }
            }
            if !more {
                break;
            }
        }
        for (_, (h, fd)) in new {
            self.hold(h, fd);
        }
        if handed > 0 || taken > 0 {
            tracing::info!(
                handed,
                taken,
                "pipe read ends synchronized with the output keeper"
            );
        }
        Ok(())
    }

    fn lost(&mut self, what: &str) {
        if self.conn.take().is_some() {
            tracing::warn!(
                during = what,
                "lost the connection to the output keeper; reconnecting at the next command"
            );
        }
    }

    /// Connected to a keeper, or an error (at most one attempt per [`RETRY`]).
    fn ensure(&mut self) -> Result<(), OutputError> {
        if self.conn.is_some() {
            return Ok(());
        }
        if self.failed_at.is_some_and(|t| t.elapsed() < RETRY) {
            return Err(OutputError::Unavailable("reconnecting".into()));
        }
        match connect(&self.dir, &self.settings) {
            Ok((fd, pid)) => {
                self.conn_no += 1;
                self.conn = Some(fd);
                self.failed_at = None;
                tracing::debug!(keeper_pid = pid, "connected to the output keeper");
                if let Err(e) = self.sync() {
                    self.lost("sync");
                    self.failed_at = Some(Instant::now());
                    return Err(OutputError::Unavailable(e.to_string()));
                }
                Ok(())
            }
            Err(e) => {
                self.failed_at = Some(Instant::now());
                tracing::error!(error = %e, "cannot reach the output keeper; command output is not captured");
                Err(OutputError::Unavailable(e.to_string()))
            }
        }
    }

    fn open(&mut self, stem: &str, header: &str) -> Result<Opened, OutputError> {
        let req = Request::Open {
            stem: stem.to_string(),
            header: header.to_string(),
            tail: true,
        };
        self.ensure()?;
        let mut answer = self.call(&req);
        if answer.is_err() {
            // The keeper went away since the last command (killed, or it crashed): start
            // or find the next one now rather than run this command uncaptured.
            self.lost("open");
            self.failed_at = None;
            self.ensure()?;
            answer = self.call(&req);
        }
        match answer {
            Ok(m) => match m.header {
                Reply::Opened { id, pipes } if m.fds.len() == 4 => {
                    let mut fds = m.fds;
                    let held = fds.split_off(2);
                    for ((ino, stream), fd) in
                        pipes.into_iter().zip([Stream::Out, Stream::Err]).zip(held)
                    {
                        let h = HeldPipe {
                            pipe: ino,
                            stem: stem.to_string(),
                            stream,
                        };
                        self.hold(h, fd);
                    }
                    Ok((id, self.conn_no, fds))
                }
                Reply::Error { message } => Err(OutputError::Refused(message)),
                other => {
                    self.lost("open");
                    Err(OutputError::Refused(format!("unexpected answer {other:?}")))
                }
            },
            Err(e) => {
                self.lost("open");
                Err(OutputError::Unavailable(e.to_string()))
            }
        }
    }

    fn collect(&mut self, id: u64) -> Option<(u64, Vec<u8>)> {
        let mut m = match self.call(&Request::Collect { id }) {
            Ok(m) => m,
            Err(_) => {
                self.lost("collect");
                return None;
            }
        };
        let mut tail = Vec::new();
        loop {
            let Reply::Output { total, more, .. } = m.header else {
                self.lost("collect");
                return None;
            };
            tail.extend_from_slice(&m.payload);
            if !more {
                return Some((total, tail));
            }
            m = match self
                .conn
                .as_ref()
                .map(|c| wire::recv::<Reply>(c.as_fd(), false))
            {
                Some(Ok(Some(m))) => m,
                _ => {
                    self.lost("collect");
                    return None;
                }
            };
        }
    }

    fn call(&mut self, req: &Request) -> std::io::Result<wire::Received<Reply>> {
        let Some(c) = &self.conn else {
            return Err(std::io::Error::other("not connected"));
        };
        wire::send(c.as_fd(), req, &[], &[])?;
        wire::recv::<Reply>(c.as_fd(), false)?
            .ok_or_else(|| std::io::Error::other("the keeper closed the connection"))
    }
}

fn try_connect(sock: &Path) -> std::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(sock)?;
    rustix::net::connect(&fd, &addr)?;
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    set_socket_timeout(&fd, Timeout::Recv, Some(Duration::from_secs(10)))?;
    set_socket_timeout(&fd, Timeout::Send, Some(Duration::from_secs(5)))?;
    Ok(fd)
}

fn hello(fd: &OwnedFd, s: &Settings) -> std::io::Result<u32> {
    let req = Request::Hello {
        protocol: PROTOCOL,
        limits: s.limits,
        tail_bytes: s.tail_bytes,
    };
    wire::send(fd.as_fd(), &req, &[], &[])?;
    match wire::recv::<Reply>(fd.as_fd(), false)? {
        Some(wire::Received {
            header: Reply::Hello { pid, .. },
            ..
        }) => Ok(pid),
        _ => Err(std::io::Error::other("no hello from the output keeper")),
    }
}

/// Connect to the keeper of `dir`, starting one when none listens. Returns the connection
/// and the keeper's pid.
fn connect(dir: &Path, s: &Settings) -> std::io::Result<(OwnedFd, u32)> {
    let sock = dir.join(keeper::SOCKET);
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + KEEPER_START;
    loop {
        let attempt = try_connect(&sock).and_then(|fd| {
            let pid = hello(&fd, s)?;
            Ok((fd, pid))
        });
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                let nobody = matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
                );
                // Started again when the last one did not come up (it may have found an
                // exiting keeper's lock and left).
                if nobody && started.is_none_or(|t| t.elapsed() >= Duration::from_millis(1500)) {
                    spawn_keeper(dir, s)?;
                    started = Some(Instant::now());
                }
                // A keeper that is starting (or exiting after its linger) is given time.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn spawn_keeper(dir: &Path, s: &Settings) -> std::io::Result<()> {
    let mut cmd = Command::new(&s.program);
    cmd.arg0(keeper::NAME)
        .arg("--output-keeper")
        .arg(dir)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    crate::sys::install_pre_exec(
        &mut cmd,
        crate::sys::SpawnIdentity {
            switch_to: None,
            umask: 0o027,
            nofile: None,
            cwd: None,
            cgroup_procs: None,
            cgroup_dir: None,
            reset_oom: false,
        },
    );
    let child = cmd.spawn()?;
    tracing::info!(pid = child.id(), dir = %dir.display(), "output keeper started");
    // Never waited on here: the agent's reaper collects it if it ends while the agent runs.
    drop(child);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tail_notes_the_cut() {
        assert_eq!(render(5, b"hello"), "hello");
        assert_eq!(render(8, b"llo"), "[... 5 bytes cut ...]\nllo");
        // A cut inside a character drops its continuation bytes.
        let e = "é".as_bytes();
        assert_eq!(render(10, &[e[1], b'x']), "[... 9 bytes cut ...]\nx");
    }
}
