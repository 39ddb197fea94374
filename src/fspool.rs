//! The bounded pool that runs blocking work off the async workers: file-system work on paths
//! callers or managed accounts choose (pid files, log paths, setup paths; "keyed" by the
//! path), and other blocking work (account lookups, forks, signals, /proc reads; "unkeyed").
//!
//! Such a path may sit on a hung NFS or FUSE mount, where a syscall never returns. The work
//! therefore never runs on the async workers or the supervisor loop but on this pool's own
//! threads, and:
//! * at most one job per path is in flight: a second request for a path waits (within its own
//!   deadline) until the first job returns, so a hung path holds one thread, not one per
//!   request ([`FsError::Busy`]);
//! * every request waits at most its deadline. A job that started and did not return is
//!   [`FsError::Timeout`] (the path did not answer); the job goes on until the kernel returns,
//!   and its thread is then *stuck*: it no longer counts against the pool's normal size, and
//!   a new thread takes its place (up to a hard cap, four times the normal size). A job that
//!   never got a thread is taken out of the queue and never runs later ([`FsError::NoThread`]:
//!   the agent was busy, not the path) — a late signal or fork would be worse than none;
//! * unkeyed jobs never wait behind paths: a quarter of the threads (and of the hard cap) is
//!   theirs alone, and they are served first;
//! * mount-aware: each path belongs to its mount (the longest mount point that is a lexical
//!   prefix of it, from `/proc/self/mountinfo`, re-read in the background). When a job on a
//!   mount is stuck, the mount itself is asked (`statfs` of its mount point, on a thread of its
//!   own); while that question goes unanswered past [`PROBE_DEADLINE`], new jobs on the mount
//!   fail at once ([`FsError::MountHung`]) instead of taking another thread, and when it
//!   returns the mount is in use again. Before a job touches its path, the path is followed
//!   to where it really leads (`FsPool::walk`), each step placed on its mount first, so a
//!   symlink into a hung mount is charged to that mount, not to the one the link sits on;
//! * the number of threads and of queued jobs is bounded ([`FsError::Saturated`] beyond);
//! * the threads are never joined: a thread stuck in the kernel cannot hold the agent's
//!   shutdown (the process exits around it).
//!
//! [`FsPool::stuck`] lists the paths whose job has been running for long and
//! [`FsPool::hung_mounts`] the mounts that do not answer, for the health endpoint.

use std::collections::{HashMap, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

/// Why a job gave no answer. [`FsError::blames_path`] tells the path's fault from the agent's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FsError {
    #[error("{path} did not answer within {secs:.1}s (a hung mount?)")]
    Timeout { path: String, secs: f64 },
    #[error(
        "{path} is still busy with an earlier request that has not returned for {secs:.1}s (a hung mount?)"
    )]
    Busy { path: String, secs: f64 },
    #[error(
        "{path} was not tried: its mount {mount} is not answering (a check there has not returned for {secs:.0}s)"
    )]
    MountHung {
        path: String,
        mount: String,
        secs: f64,
    },
    #[error(
        "{path} was not tried: it goes through {link}, another process's view of the file system, which the agent does not follow"
    )]
    Opaque { path: String, link: String },
    #[error("{what} did not finish within {secs:.1}s")]
    Slow { what: String, secs: f64 },
    #[error(
        "no file-system pool thread was free within {secs:.1}s for {what}, so it was not tried (the agent is busy, not the path); try again"
    )]
    NoThread { what: String, secs: f64 },
    #[error("the file-system pool is saturated ({0} jobs queued); try again")]
    Saturated(usize),
    #[error("{what} failed inside the agent (the job panicked)")]
    Panicked { what: String },
    #[error("{path} was not tried: the agent could not take on the account's identity ({reason})")]
    Identity { path: String, reason: String },
}

impl FsError {
    /// Whether the path (or its mount) is to blame, rather than the agent's own capacity.
    pub fn blames_path(&self) -> bool {
        matches!(
            self,
            FsError::Timeout { .. }
                | FsError::Busy { .. }
                | FsError::MountHung { .. }
                | FsError::Opaque { .. }
        )
    }
}

/// Where paths are mounted, and whether a mount answers. [`SystemMounts`] in the agent; the
/// unit tests inject fake mounts.
pub trait Mounts: Send + Sync + 'static {
    /// The mount point `path` (absolute, lexically normal) lies on, without touching the
    /// file system.
    fn mount_of(&self, path: &Path) -> PathBuf;
    /// Ask the mount at `mount` to answer (blocking: it runs on a thread of its own).
    fn check(&self, mount: &Path);
}

/// The agent's own mount table (`/proc/self/mountinfo`, re-read every [`MOUNTS_EVERY`] on a
/// background thread; until its first read every path is on `/`).
pub struct SystemMounts;

/// How often [`SystemMounts`] re-reads the mount table.
pub const MOUNTS_EVERY: Duration = Duration::from_secs(2);

fn mount_table() -> &'static RwLock<Arc<Vec<PathBuf>>> {
    static TABLE: OnceLock<RwLock<Arc<Vec<PathBuf>>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("procagent-mounts".into())
            .spawn(|| {
                let mut last = String::new();
                loop {
                    if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo")
                        && text != last
                    {
                        let table = Arc::new(parse_mountinfo(&text));
                        *mount_table().write().unwrap_or_else(|e| e.into_inner()) = table;
                        last = text;
                    }
                    std::thread::sleep(MOUNTS_EVERY);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the mount table thread (every path counts as on /)");
        }
        RwLock::new(Arc::new(Vec::new()))
    })
}

/// The mount points listed in a mountinfo text (field 5, octal escapes undone).
fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(crate::procinfo::mountinfo_path)
        .collect()
}

/// The longest of `table` that is a (component-wise) prefix of `path`, else `/`.
fn longest_prefix(table: &[PathBuf], path: &Path) -> PathBuf {
    table
        .iter()
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
        .cloned()
        .unwrap_or_else(|| PathBuf::from("/"))
}

impl Mounts for SystemMounts {
    fn mount_of(&self, path: &Path) -> PathBuf {
        let table = mount_table()
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        longest_prefix(&table, path)
    }

    fn check(&self, mount: &Path) {
        let _ = nix::sys::statfs::statfs(mount);
    }
}

/// `path` made absolute and lexically normal (`.` dropped, `..` taken back), for finding its
/// mount only: a `..` after a symlink may really lead elsewhere, but then to a mount that the
/// lexical one does not hide (the lexical mount is the one the lookup crosses first).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// A job: runs the work and returns what delivers its answer (sent after the path is
/// released, so the caller never sees it still busy).
type Job = Box<dyn FnOnce() -> Reply + Send + 'static>;
type Reply = Box<dyn FnOnce() + Send + 'static>;

struct Queued {
    id: u64,
    key: Option<PathBuf>,
    mount: Option<PathBuf>,
    /// The account whose file-system identity the walk runs with (`None`: the agent's own).
    who: Option<crate::sys::FsIdentity>,
    job: Job,
}

struct Running {
    key: Option<PathBuf>,
    mount: Option<PathBuf>,
    /// Its caller gave up: the job is stuck and no longer counts against the normal size.
    abandoned: bool,
}

struct InFlight {
    /// When its job got a thread (`None` while queued).
    started: Option<Instant>,
    done: Arc<Notify>,
}

#[derive(Default)]
struct MountState {
    /// A check of the mount is in flight since then.
    checking: Option<Instant>,
    /// The last check answered then.
    answered: Option<Instant>,
}

#[derive(Default)]
struct State {
    keyed: VecDeque<Queued>,
    unkeyed: VecDeque<Queued>,
    threads: usize,
    next_id: u64,
    running: HashMap<u64, Running>,
    in_flight: HashMap<PathBuf, InFlight>,
    mounts: HashMap<PathBuf, MountState>,
    checks: usize,
    /// Threads waiting for work on the condition variable.
    waiting: usize,
    /// Times a waiting thread woke and found no job it could start (a measure of wasted
    /// wake-ups; see [`FsPool::kick`]).
    idle_wakes: u64,
    /// Jobs that were not run because the walk to their path met a hung mount: why.
    refused: HashMap<u64, FsError>,
}

impl State {
    fn queued(&self) -> usize {
        self.keyed.len() + self.unkeyed.len()
    }
}

struct Inner {
    state: Mutex<State>,
    work: Condvar,
    mounts: Arc<dyn Mounts>,
    /// Threads running jobs whose caller still waits (the normal size).
    max_threads: usize,
    /// Of those, kept for unkeyed jobs.
    reserve: usize,
    /// Threads in all, stuck ones included.
    hard_cap: usize,
    max_queue: usize,
    /// How long a mount check may go unanswered before the mount counts as hung, and how long
    /// an answered one vouches for its mount ([`PROBE_DEADLINE`]).
    check_deadline: Duration,
    idle_exit: Duration,
}

/// Handle to the pool; cheap to clone.
#[derive(Clone)]
pub struct FsPool {
    inner: Arc<Inner>,
}

/// The deadline of a probe (pid file, setup_path, log path) unless the caller has a better
/// one; also how long a mount check may go unanswered before the mount counts as hung, and
/// how long an answered check vouches for its mount.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(2);

impl Default for FsPool {
    fn default() -> Self {
        FsPool::new(16, 4096)
    }
}

/// What [`FsPool::admit`] did.
enum Admit<T> {
    Queued(u64, oneshot::Receiver<T>),
    /// The path is busy: wait for this.
    Wait(Arc<Notify>),
}

/// What became of a request that gave up.
enum GaveUp {
    /// Its job never got a thread and was taken out of the queue.
    Unqueued,
    /// Its job runs on (stuck).
    Running,
    /// Its job finished meanwhile.
    Finished,
}

/// Withdraws a request whose caller stops waiting (its deadline passed or its future was
/// dropped): a queued job is removed, a running one marked stuck.
struct Ticket {
    pool: FsPool,
    id: u64,
    armed: bool,
}

impl Ticket {
    fn give_up(&mut self) -> GaveUp {
        self.armed = false;
        self.pool.give_up(self.id)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            self.pool.give_up(self.id);
        }
    }
}

impl FsPool {
    /// A pool of `max_threads` threads for jobs whose callers wait (started on demand, leaving
    /// after 30 s idle; a quarter kept for unkeyed jobs), growing past that only to replace
    /// stuck threads, up to four times as many; at most `max_queue` queued jobs. Paths are
    /// placed on the agent's mounts ([`SystemMounts`]).
    pub fn new(max_threads: usize, max_queue: usize) -> FsPool {
        FsPool::with_mounts(max_threads, max_queue, Arc::new(SystemMounts))
    }

    /// [`FsPool::new`] with the mounts given (for tests).
    pub fn with_mounts(max_threads: usize, max_queue: usize, mounts: Arc<dyn Mounts>) -> FsPool {
        FsPool::build(max_threads, max_queue, mounts, PROBE_DEADLINE)
    }

    /// The pool, a mount counting as hung once its check has gone unanswered for `check`.
    fn build(
        max_threads: usize,
        max_queue: usize,
        mounts: Arc<dyn Mounts>,
        check: Duration,
    ) -> FsPool {
        let max_threads = max_threads.max(2);
        FsPool {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                mounts,
                max_threads,
                reserve: (max_threads / 4).max(1),
                hard_cap: max_threads * 4,
                max_queue: max_queue.max(1),
                check_deadline: check,
                idle_exit: Duration::from_secs(30),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f`, which works on `path`, on the pool and wait at most `deadline` for its answer
    /// (see the module docs).
    pub async fn run<T, F>(&self, path: &Path, deadline: Duration, f: F) -> Result<T, FsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.run_as(path, None, deadline, f).await
    }

    /// [`FsPool::run`] for a path the agent reaches on behalf of the account `who` (when
    /// `Some`): the walk that places the path on its mount runs with that account's fsuid,
    /// fsgid and groups ([`crate::sys::as_account_fs`]), so that it neither reaches nor tells
    /// of anything the account could not (a symlink inside another account's private
    /// directory is not even seen). `f` runs as the agent: it takes on the account itself
    /// for the file-system calls made on the account's behalf.
    pub async fn run_as<T, F>(
        &self,
        path: &Path,
        who: Option<crate::sys::FsIdentity>,
        deadline: Duration,
        f: F,
    ) -> Result<T, FsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let until = tokio::time::Instant::now() + deadline;
        let shown = || path.display().to_string();
        let mount = self.inner.mounts.mount_of(&lexical(path));
        let mut f = Some(f);
        let (id, rx) = loop {
            let wait = match self.admit(path, &mount, &who, &mut f)? {
                Admit::Queued(id, rx) => break (id, rx),
                Admit::Wait(wait) => wait,
            };
            // Another job on this path is in flight: wait for it to return (notified under
            // the lock by the worker, so registering before re-checking cannot miss it).
            let notified = wait.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let same = self
                .lock()
                .in_flight
                .get(path)
                .is_some_and(|r| Arc::ptr_eq(&r.done, &wait));
            if !same {
                continue;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                let started = self.lock().in_flight.get(path).and_then(|r| r.started);
                return Err(match started {
                    Some(t) => FsError::Busy {
                        path: shown(),
                        secs: t.elapsed().as_secs_f64(),
                    },
                    None => FsError::NoThread {
                        what: shown(),
                        secs: deadline.as_secs_f64(),
                    },
                });
            }
        };
        let ticket = Ticket {
            pool: self.clone(),
            id,
            armed: true,
        };
        self.answer(rx, ticket, until, shown(), deadline, || FsError::Timeout {
            path: shown(),
            secs: deadline.as_secs_f64(),
        })
        .await
    }

    /// Queue `f` on `path` unless its mount is hung or the path is busy.
    fn admit<T, F>(
        &self,
        path: &Path,
        mount: &Path,
        who: &Option<crate::sys::FsIdentity>,
        f: &mut Option<F>,
    ) -> Result<Admit<T>, FsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let mut st = self.lock();
        if let Some(since) = self.hung_since(&st, mount) {
            return Err(FsError::MountHung {
                path: path.display().to_string(),
                mount: mount.display().to_string(),
                secs: since.elapsed().as_secs_f64(),
            });
        }
        if st
            .running
            .values()
            .any(|r| r.abandoned && r.mount.as_deref() == Some(mount))
        {
            self.check_mount(&mut st, mount);
        }
        if let Some(r) = st.in_flight.get(path) {
            return Ok(Admit::Wait(r.done.clone()));
        }
        if st.queued() >= self.inner.max_queue {
            return Err(FsError::Saturated(st.queued()));
        }
        let Some(f) = f.take() else {
            return Err(FsError::Panicked {
                what: path.display().to_string(),
            });
        };
        let (tx, rx) = oneshot::channel();
        st.in_flight.insert(
            path.to_path_buf(),
            InFlight {
                started: None,
                done: Arc::new(Notify::new()),
            },
        );
        let id = self.push(
            &mut st,
            Some((path.to_path_buf(), mount.to_path_buf())),
            who.clone(),
            job(f, tx),
        );
        Ok(Admit::Queued(id, rx))
    }

    /// Run `f` on the pool without a path of its own (work that must not block an async
    /// worker, such as spawning a command), waiting at most `deadline`.
    pub async fn run_unkeyed<T, F>(
        &self,
        what: &str,
        deadline: Duration,
        f: F,
    ) -> Result<T, FsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let until = tokio::time::Instant::now() + deadline;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = self.lock();
            if st.queued() >= self.inner.max_queue {
                return Err(FsError::Saturated(st.queued()));
            }
            self.push(&mut st, None, None, job(f, tx))
        };
        let ticket = Ticket {
            pool: self.clone(),
            id,
            armed: true,
        };
        self.answer(rx, ticket, until, what.to_string(), deadline, || {
            FsError::Slow {
                what: what.to_string(),
                secs: deadline.as_secs_f64(),
            }
        })
        .await
    }

    /// Wait for a job's answer until `until`; at the deadline, withdraw it.
    async fn answer<T>(
        &self,
        mut rx: oneshot::Receiver<T>,
        mut ticket: Ticket,
        until: tokio::time::Instant,
        what: String,
        deadline: Duration,
        late: impl FnOnce() -> FsError,
    ) -> Result<T, FsError> {
        let r = tokio::time::timeout_at(until, &mut rx).await;
        let gave_up = match r {
            Ok(r) => {
                ticket.armed = false;
                let refused = self.lock().refused.remove(&ticket.id);
                return r.map_err(|_| refused.unwrap_or(FsError::Panicked { what }));
            }
            Err(_) => ticket.give_up(),
        };
        match gave_up {
            GaveUp::Unqueued => Err(FsError::NoThread {
                what,
                secs: deadline.as_secs_f64(),
            }),
            GaveUp::Running => Err(late()),
            GaveUp::Finished => rx.try_recv().map_err(|_| late()),
        }
    }

    /// Queue a job (keyed by its path and mount, or not) and see that a thread takes it.
    fn push(
        &self,
        st: &mut State,
        key: Option<(PathBuf, PathBuf)>,
        who: Option<crate::sys::FsIdentity>,
        job: Job,
    ) -> u64 {
        st.next_id += 1;
        let id = st.next_id;
        match key {
            Some((path, mount)) => st.keyed.push_back(Queued {
                id,
                key: Some(path),
                mount: Some(mount),
                who,
                job,
            }),
            None => st.unkeyed.push_back(Queued {
                id,
                key: None,
                mount: None,
                who,
                job,
            }),
        }
        self.kick(st);
        id
    }

    /// A caller stopped waiting for job `id`.
    fn give_up(&self, id: u64) -> GaveUp {
        let mut st = self.lock();
        let queued = match st.keyed.iter().position(|q| q.id == id) {
            Some(i) => st.keyed.remove(i),
            None => match st.unkeyed.iter().position(|q| q.id == id) {
                Some(i) => st.unkeyed.remove(i),
                None => None,
            },
        };
        if let Some(q) = queued {
            if let Some(k) = &q.key
                && let Some(f) = st.in_flight.remove(k)
            {
                f.done.notify_waiters();
            }
            drop(st);
            // Dropped unlocked: dropping what the job holds may take time.
            drop(q);
            return GaveUp::Unqueued;
        }
        let Some(r) = st.running.get_mut(&id) else {
            return GaveUp::Finished;
        };
        r.abandoned = true;
        if let Some(m) = r.mount.clone() {
            self.check_mount(&mut st, &m);
        }
        // Its thread no longer counts: another may take its place.
        self.kick(&mut st);
        GaveUp::Running
    }

    /// Since when the mount at `mount` has not answered a check, past [`PROBE_DEADLINE`].
    fn hung_since(&self, st: &State, mount: &Path) -> Option<Instant> {
        st.mounts
            .get(mount)
            .and_then(|m| m.checking)
            .filter(|t| t.elapsed() >= self.inner.check_deadline)
    }

    /// A job on `mount` is stuck: ask the mount itself, on a thread of its own, unless a
    /// question is in flight or one was answered lately.
    fn check_mount(&self, st: &mut State, mount: &Path) {
        if st.checks >= self.inner.hard_cap / 4 {
            return;
        }
        if st.mounts.len() >= 1024 {
            st.mounts.retain(|_, m| m.checking.is_some());
        }
        let m = st.mounts.entry(mount.to_path_buf()).or_default();
        if m.checking.is_some()
            || m.answered
                .is_some_and(|t| t.elapsed() < self.inner.check_deadline)
        {
            return;
        }
        m.checking = Some(Instant::now());
        st.checks += 1;
        let (pool, at) = (self.clone(), mount.to_path_buf());
        let spawned = std::thread::Builder::new()
            .name("procagent-mount-check".into())
            .spawn(move || {
                pool.inner.mounts.check(&at);
                let mut st = pool.lock();
                st.checks -= 1;
                if let Some(m) = st.mounts.get_mut(&at) {
                    m.checking = None;
                    m.answered = Some(Instant::now());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a mount check thread");
            st.checks -= 1;
            if let Some(m) = st.mounts.get_mut(mount) {
                m.checking = None;
            }
        }
    }

    /// How many queued jobs may start now: `(unkeyed, keyed)`.
    fn startable(&self, st: &State) -> (usize, usize) {
        let (mut active, mut active_keyed, mut keyed) = (0, 0, 0);
        for r in st.running.values() {
            let is_keyed = r.key.is_some();
            if !r.abandoned {
                active += 1;
                active_keyed += usize::from(is_keyed);
            }
            keyed += usize::from(is_keyed);
        }
        let i = &self.inner;
        let free = i.max_threads.saturating_sub(active);
        let unkeyed = st.unkeyed.len().min(free);
        let free_keyed = (i.max_threads - i.reserve)
            .saturating_sub(active_keyed)
            .min((i.hard_cap - i.reserve).saturating_sub(keyed));
        (unkeyed, st.keyed.len().min(free_keyed).min(free - unkeyed))
    }

    /// The next job a thread should take (unkeyed first), if any may start.
    fn pick(&self, st: &mut State) -> Option<Queued> {
        match self.startable(st) {
            (0, 0) => None,
            (0, _) => st.keyed.pop_front(),
            _ => st.unkeyed.pop_front(),
        }
    }

    /// Start threads for the jobs that may start and have no idle thread, and wake as many
    /// waiting threads as there are such jobs.
    fn kick(&self, st: &mut State) {
        let (u, k) = self.startable(st);
        let want = u + k;
        if want == 0 {
            return;
        }
        let idle = st.threads.saturating_sub(st.running.len());
        let room = self.inner.hard_cap.saturating_sub(st.threads);
        for _ in 0..want.saturating_sub(idle).min(room) {
            let pool = self.clone();
            let spawned = std::thread::Builder::new()
                .name("procagent-fs".into())
                .spawn(move || pool.worker());
            match spawned {
                Ok(_) => st.threads += 1,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a file-system pool thread");
                    break;
                }
            }
        }
        // One waiting thread per job that may start, never all of them: every thread woken
        // takes the lock, and sixteen of them waking for one job on a two-core host cost
        // milliseconds per job (every start and restart makes several). A thread that is
        // not waiting (busy, or just started) looks for work before it waits again.
        for _ in 0..want.min(st.waiting) {
            self.inner.work.notify_one();
        }
    }

    fn worker(&self) {
        let mut st = self.lock();
        loop {
            if let Some(q) = self.pick(&mut st) {
                let now = Instant::now();
                st.running.insert(
                    q.id,
                    Running {
                        key: q.key.clone(),
                        mount: q.mount,
                        abandoned: false,
                    },
                );
                if let Some(f) = q.key.as_ref().and_then(|k| st.in_flight.get_mut(k)) {
                    f.started = Some(now);
                }
                drop(st);
                // The path's real mount first: a symlink may lead to a mount that does not
                // answer, which the lexical path does not show. Walked as the account the job
                // is for, so that the walk reaches (and tells of) only what it could.
                // A panicking walk must not take the thread either (its slot and its path's
                // in-flight mark would never be released).
                let walk = |path: &Path| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.walk(q.id, path)))
                        .unwrap_or_else(|_| {
                            tracing::error!("a file-system pool walk panicked");
                            Err(FsError::Panicked {
                                what: path.display().to_string(),
                            })
                        })
                };
                let walked = match &q.key {
                    Some(path) => crate::sys::as_account_fs(q.who.as_ref(), || walk(path))
                        .unwrap_or_else(|e| {
                            Err(FsError::Identity {
                                path: path.display().to_string(),
                                reason: e.to_string(),
                            })
                        }),
                    None => Ok(()),
                };
                let job = match walked {
                    Ok(()) => Some(q.job),
                    Err(e) => {
                        self.lock().refused.insert(q.id, e);
                        drop(q.job);
                        None
                    }
                };
                // A panicking job must not take the thread (and its count) with it.
                let r = match job {
                    Some(job) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)),
                    None => Ok(Box::new(|| ()) as Reply),
                };
                if r.is_err() {
                    tracing::error!("a file-system pool job panicked");
                }
                st = self.lock();
                st.running.remove(&q.id);
                if let Some(f) = q.key.as_ref().and_then(|k| st.in_flight.remove(k)) {
                    f.done.notify_waiters();
                }
                drop(st);
                if let Ok(reply) = r {
                    reply();
                }
                st = self.lock();
                continue;
            }
            st.waiting += 1;
            let (guard, timeout) = self
                .inner
                .work
                .wait_timeout(st, self.inner.idle_exit)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            st.waiting -= 1;
            if self.startable(&st) == (0, 0) {
                if timeout.timed_out() {
                    st.threads -= 1;
                    return;
                }
                st.idle_wakes += 1;
            }
        }
    }

    /// Follow `path` to where it really leads, one component at a time (`lstat`, and
    /// `readlink` for a symlink, at most 40), before job `id` touches it: each step is first
    /// placed on its mount, and the job's mount set to it, so that a step that hangs leaves
    /// the job stuck on the mount that really hangs (whose check then fails new work there
    /// fast), and a step onto a mount already known to hang refuses the job at once, as does a
    /// step through a `/proc/PID/...` link (whose text does not say where it leads). A
    /// component that cannot be read ends the walk: the job itself reports what is wrong.
    fn walk(&self, id: u64, path: &Path) -> Result<(), FsError> {
        let mut todo: VecDeque<std::ffi::OsString> = lexical(path)
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
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
            let mount = self.inner.mounts.mount_of(&next);
            {
                let mut st = self.lock();
                if let Some(since) = self.hung_since(&st, &mount) {
                    return Err(FsError::MountHung {
                        path: path.display().to_string(),
                        mount: mount.display().to_string(),
                        secs: since.elapsed().as_secs_f64(),
                    });
                }
                if let Some(r) = st.running.get_mut(&id) {
                    r.mount = Some(mount);
                }
            }
            let Ok(meta) = std::fs::symlink_metadata(&next) else {
                return Ok(());
            };
            if !meta.file_type().is_symlink() {
                cur = next;
                continue;
            }
            // `/proc/PID/root`, `cwd`, `fd/N`, ...: their text says nothing of where they
            // lead (another mount namespace, a detached mount), so no mount could be charged.
            if next.starts_with("/proc") && next.components().count() > 3 {
                return Err(FsError::Opaque {
                    path: path.display().to_string(),
                    link: next.display().to_string(),
                });
            }
            links += 1;
            let Ok(target) = std::fs::read_link(&next) else {
                return Ok(());
            };
            if links > 40 {
                return Ok(());
            }
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
        Ok(())
    }

    /// Paths whose job has run longer than `older_than`, with how long (longest first).
    pub fn stuck(&self, older_than: Duration) -> Vec<(PathBuf, Duration)> {
        let st = self.lock();
        let mut v: Vec<(PathBuf, Duration)> = st
            .in_flight
            .iter()
            .filter_map(|(p, r)| Some((p.clone(), r.started?.elapsed())))
            .filter(|(_, d)| *d >= older_than)
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        v
    }

    /// Mounts that do not answer (new jobs on them fail at once), with for how long.
    pub fn hung_mounts(&self) -> Vec<(PathBuf, Duration)> {
        let st = self.lock();
        let mut v: Vec<(PathBuf, Duration)> = st
            .mounts
            .iter()
            .filter_map(|(m, s)| Some((m.clone(), s.checking?.elapsed())))
            .filter(|(_, d)| *d >= self.inner.check_deadline)
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        v
    }

    /// Threads of the pool now (busy, stuck or idle).
    pub fn threads(&self) -> usize {
        self.lock().threads
    }
}

/// The job running `f` and answering through `tx`; a job whose caller is gone by the time a
/// thread takes it does nothing.
fn job<T, F>(f: F, tx: oneshot::Sender<T>) -> Job
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    Box::new(move || -> Reply {
        if tx.is_closed() {
            return Box::new(|| ());
        }
        let v = f();
        Box::new(move || {
            let _ = tx.send(v);
        })
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A gate closures block on, as a call on a hung mount blocks, until the test opens it.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, Condvar)>);

    impl Gate {
        fn wait(&self) {
            let (open, cv) = &*self.0;
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
        }
        fn open(&self) {
            *self.0.0.lock().unwrap() = true;
            self.0.1.notify_all();
        }
    }

    /// Fake mounts: a path's mount is its first component; checking `/hung` blocks on the
    /// gate, checking anything else answers.
    struct Fake {
        gate: Gate,
        checks: AtomicUsize,
    }

    impl Mounts for Fake {
        fn mount_of(&self, path: &Path) -> PathBuf {
            // `/boom` itself (a step of the walk of `/boom/...`, never a job's own path)
            // panics: a walk that panics.
            assert!(path != Path::new("/boom"), "a panicking mount lookup");
            path.components().take(2).collect()
        }
        fn check(&self, mount: &Path) {
            self.checks.fetch_add(1, Ordering::SeqCst);
            if mount == Path::new("/hung") {
                self.gate.wait();
            }
        }
    }

    /// A pool of 4 threads (one kept for unkeyed jobs, 16 in all) on fake mounts whose checks
    /// count as hung after 100 ms; and the gate of `/hung`.
    fn pool() -> (FsPool, Gate, Arc<Fake>) {
        let gate = Gate::default();
        let fake = Arc::new(Fake {
            gate: gate.clone(),
            checks: AtomicUsize::new(0),
        });
        (FsPool::build(4, 64, fake.clone(), ms(100)), gate, fake)
    }

    /// Start a job on `path` that blocks on `gate`, and let its caller give up.
    async fn hang(pool: &FsPool, path: &str, gate: &Gate) -> Result<(), FsError> {
        let g = gate.clone();
        pool.run(Path::new(path), ms(50), move || g.wait()).await
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(ms(5)).await;
        }
    }

    #[test]
    fn mount_table_parsing_and_lookup() {
        let info = "22 1 0:21 / / rw - ext4 /dev/sda1 rw\n\
                    30 22 0:40 / /mnt/with\\040space rw - fuse hung rw\n\
                    31 22 0:41 / /mnt rw - nfs srv:/x rw\n\
                    32 31 0:42 / /mnt/a/b rw - nfs srv:/y rw\n";
        let table = parse_mountinfo(info);
        assert_eq!(
            table,
            ["/", "/mnt/with space", "/mnt", "/mnt/a/b"]
                .map(PathBuf::from)
                .to_vec()
        );
        for (path, mount) in [
            ("/etc/passwd", "/"),
            ("/mnt/x.pid", "/mnt"),
            ("/mnt/a/b/c.pid", "/mnt/a/b"),
            ("/mnt/a/bc.pid", "/mnt"),
            ("/mnt/with space/p", "/mnt/with space"),
            ("/mntx/p", "/"),
        ] {
            assert_eq!(
                longest_prefix(&table, Path::new(path)),
                PathBuf::from(mount),
                "{path}"
            );
        }
        assert_eq!(longest_prefix(&[], Path::new("/a")), PathBuf::from("/"));
        for (path, normal) in [
            ("/a/./b/../c", "/a/c"),
            ("/../a", "/a"),
            ("a/b", "/a/b"),
            ("/mnt/a/b/../../x", "/mnt/x"),
        ] {
            assert_eq!(lexical(Path::new(path)), PathBuf::from(normal), "{path}");
        }
    }

    #[test]
    fn which_errors_blame_the_path() {
        let s = || "p".to_string();
        for (e, blames) in [
            (
                FsError::Timeout {
                    path: s(),
                    secs: 1.0,
                },
                true,
            ),
            (
                FsError::Busy {
                    path: s(),
                    secs: 1.0,
                },
                true,
            ),
            (
                FsError::MountHung {
                    path: s(),
                    mount: s(),
                    secs: 1.0,
                },
                true,
            ),
            (
                FsError::Slow {
                    what: s(),
                    secs: 1.0,
                },
                false,
            ),
            (
                FsError::NoThread {
                    what: s(),
                    secs: 1.0,
                },
                false,
            ),
            (FsError::Saturated(1), false),
            (FsError::Panicked { what: s() }, false),
        ] {
            assert_eq!(e.blames_path(), blames, "{e}");
            if !blames {
                assert!(!e.to_string().contains("hung"), "{e}");
            }
        }
    }

    /// A walk that panics answers Panicked and gives back its thread and its path: the same
    /// path is tried again at once (not "still busy"), other work goes on.
    #[tokio::test]
    async fn a_panicking_walk_releases_its_thread_and_path() {
        let (pool, _, _) = pool();
        let p = Path::new("/boom/pid");
        for _ in 0..6 {
            assert!(matches!(
                pool.run(p, ms(2000), || 1).await,
                Err(FsError::Panicked { .. })
            ));
        }
        assert_eq!(pool.run(Path::new("/x/a"), ms(500), || 7).await, Ok(7));
        // (The caller hears of the refusal when its job is dropped, a moment before the
        // worker takes the path's mark off.)
        until("the path released", || {
            pool.stuck(Duration::ZERO).is_empty()
        })
        .await;
    }

    #[tokio::test]
    async fn answers_and_releases_the_path() {
        let (pool, _, _) = pool();
        let p = Path::new("/x/a");
        assert_eq!(pool.run(p, ms(500), || 7).await, Ok(7));
        assert_eq!(pool.run(p, ms(500), || 8).await, Ok(8));
        assert_eq!(pool.run_unkeyed("u", ms(500), || 9).await, Ok(9));
        assert!(pool.stuck(Duration::ZERO).is_empty());
    }

    #[tokio::test]
    async fn a_hung_path_holds_one_thread_and_delays_only_itself() {
        let (pool, gate, _) = pool();
        // A path that hangs behind a symlink: its mount (/ok) answers, so only it is stuck.
        let hung = Path::new("/ok/link/pid");
        let started = Arc::new(AtomicUsize::new(0));
        let (s, g) = (started.clone(), gate.clone());
        let first = pool.run(hung, ms(100), move || {
            s.fetch_add(1, Ordering::SeqCst);
            g.wait();
            1
        });
        assert!(matches!(first.await, Err(FsError::Timeout { .. })));
        // Later requests for the hung path queue behind it and give up at their deadline,
        // without running (one thread stuck, not one per request).
        let s = started.clone();
        let second = pool.run(hung, ms(100), move || {
            s.fetch_add(1, Ordering::SeqCst);
            2
        });
        assert!(matches!(second.await, Err(FsError::Busy { .. })));
        assert_eq!(started.load(Ordering::SeqCst), 1);
        // Other paths, on the same mount too, are served meanwhile.
        assert_eq!(
            pool.run(Path::new("/ok/other"), ms(1000), || 3).await,
            Ok(3)
        );
        assert_eq!(
            pool.run(Path::new("/elsewhere"), ms(1000), || 3).await,
            Ok(3)
        );
        assert_eq!(pool.stuck(ms(50)).len(), 1);
        assert!(pool.hung_mounts().is_empty());
        // Once the stuck call returns, the path is usable again.
        gate.open();
        let v = pool.run(hung, ms(2000), || 4).await;
        assert_eq!(v, Ok(4));
        assert!(pool.stuck(Duration::ZERO).is_empty());
    }

    #[tokio::test]
    async fn a_hung_mount_fails_fast_and_never_takes_the_pool() {
        let (pool, gate, fake) = pool();
        // Many distinct paths on one hung mount: the first ones hang; once the mount's own
        // check goes unanswered, the rest fail at once, naming the mount, without running.
        let ran = Arc::new(AtomicUsize::new(0));
        let mut answers = Vec::new();
        for i in 0..40 {
            let (r, g) = (ran.clone(), gate.clone());
            let path = format!("/hung/p{i}.pid");
            let a = pool
                .run(Path::new(&path), ms(50), move || {
                    r.fetch_add(1, Ordering::SeqCst);
                    g.wait();
                })
                .await;
            answers.push(a);
            if i == 0 {
                until("the mount counts as hung", || {
                    !pool.hung_mounts().is_empty()
                })
                .await;
            }
        }
        assert!(matches!(answers[0], Err(FsError::Timeout { .. })));
        for a in &answers[1..] {
            match a {
                Err(FsError::MountHung { mount, .. }) => assert_eq!(mount, "/hung"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            ran.load(Ordering::SeqCst),
            1,
            "one thread on the hung mount"
        );
        assert_eq!(fake.checks.load(Ordering::SeqCst), 1, "one check in flight");
        // Everything else goes on.
        assert_eq!(pool.run(Path::new("/ok/a"), ms(1000), || 1).await, Ok(1));
        assert_eq!(pool.run_unkeyed("u", ms(1000), || 2).await, Ok(2));
        // When the mount answers again, it is used again.
        gate.open();
        until("the mount answers", || pool.hung_mounts().is_empty()).await;
        assert_eq!(
            pool.run(Path::new("/hung/p1.pid"), ms(1000), || 3).await,
            Ok(3)
        );
    }

    #[tokio::test]
    async fn stuck_threads_are_replaced_up_to_a_cap_that_keeps_room_for_unkeyed_jobs() {
        let (pool, gate, _) = pool();
        // Paths that hang behind symlinks on a mount that answers: no fail-fast, each costs
        // a thread; the pool grows past its 4 threads to replace them, up to 16 in all, and
        // paths never take the last thread of the cap.
        let mut errors = Vec::new();
        for i in 0..40 {
            errors.push(hang(&pool, &format!("/ok/l{i}/pid"), &gate).await);
            assert_eq!(pool.run_unkeyed("u", ms(1000), move || i).await, Ok(i));
        }
        assert!(pool.threads() <= 16, "{} threads", pool.threads());
        assert_eq!(pool.stuck(Duration::ZERO).len(), 15, "the cap less one");
        let timeouts = errors
            .iter()
            .filter(|e| matches!(e, Err(FsError::Timeout { .. })))
            .count();
        assert_eq!(timeouts, 15, "{errors:?}");
        // The rest never got a thread, and say so without blaming their path.
        for e in errors
            .iter()
            .filter(|e| !matches!(e, Err(FsError::Timeout { .. })))
        {
            assert!(matches!(e, Err(FsError::NoThread { .. })), "{e:?}");
        }
        gate.open();
        until("the stuck jobs return", || {
            pool.stuck(Duration::ZERO).is_empty()
        })
        .await;
        assert_eq!(
            pool.run(Path::new("/ok/l0/pid"), ms(1000), || 1).await,
            Ok(1)
        );
    }

    #[tokio::test]
    async fn paths_never_starve_unkeyed_jobs() {
        let (pool, gate, _) = pool();
        // Three of the four threads busy with paths whose callers still wait (long
        // deadlines): a fourth path waits for a thread, an unkeyed job does not.
        let mut waiting = Vec::new();
        for i in 0..4 {
            let (p, g) = (pool.clone(), gate.clone());
            waiting.push(tokio::spawn(async move {
                p.run(
                    Path::new(&format!("/ok/w{i}")),
                    Duration::from_secs(30),
                    move || g.wait(),
                )
                .await
            }));
        }
        until("three paths run", || pool.stuck(Duration::ZERO).len() == 3).await;
        assert_eq!(pool.run_unkeyed("signal", ms(1000), || 5).await, Ok(5));
        assert_eq!(pool.stuck(Duration::ZERO).len(), 3);
        gate.open();
        for w in waiting {
            assert_eq!(w.await.unwrap(), Ok(()));
        }
    }

    #[tokio::test]
    async fn a_job_whose_caller_gave_up_never_runs_later() {
        let (pool, gate, _) = pool();
        // Every thread busy with unkeyed jobs whose callers still wait.
        let mut busy = Vec::new();
        for _ in 0..4 {
            let (p, g) = (pool.clone(), gate.clone());
            busy.push(tokio::spawn(async move {
                p.run_unkeyed("busy", Duration::from_secs(30), move || g.wait())
                    .await
            }));
        }
        until("four jobs run", || pool.threads() == 4).await;
        tokio::time::sleep(ms(20)).await;
        let sent = Arc::new(AtomicUsize::new(0));
        let s = sent.clone();
        let late = pool
            .run_unkeyed("signal", ms(50), move || {
                s.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        assert!(matches!(late, Err(FsError::NoThread { .. })), "{late:?}");
        // A dropped request is withdrawn too.
        let s = sent.clone();
        let dropped = pool.run_unkeyed("signal", Duration::from_secs(30), move || {
            s.fetch_add(1, Ordering::SeqCst);
        });
        let _ = tokio::time::timeout(ms(20), dropped).await;
        gate.open();
        for b in busy {
            assert_eq!(b.await.unwrap(), Ok(()));
        }
        assert_eq!(pool.run_unkeyed("after", ms(1000), || 1).await, Ok(1));
        assert_eq!(sent.load(Ordering::SeqCst), 0, "a late signal was sent");
    }

    #[tokio::test]
    async fn concurrent_requests_for_one_path_take_turns() {
        let (pool, _, _) = pool();
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let mut all = Vec::new();
        for _ in 0..20 {
            let (inside, max, pool) = (inside.clone(), max.clone(), pool.clone());
            all.push(tokio::spawn(async move {
                pool.run(Path::new("/same"), ms(5000), move || {
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(ms(2));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        for h in all {
            assert_eq!(h.await.unwrap(), Ok(()));
        }
        assert_eq!(max.load(Ordering::SeqCst), 1, "one job per path at a time");
    }

    /// A job wakes one idle thread, not all of them: with sixteen idle threads on two cores,
    /// waking every one for each job (they all wake, fight for the lock, find nothing and
    /// sleep again) cost milliseconds per job, on every start and restart.
    #[tokio::test]
    async fn a_job_wakes_one_idle_thread_not_all() {
        let (pool, gate, _) = {
            let gate = Gate::default();
            let fake = Arc::new(Fake {
                gate: gate.clone(),
                checks: AtomicUsize::new(0),
            });
            (FsPool::build(16, 64, fake, ms(100)), gate, ())
        };
        // Twelve threads, all busy at once, then all idle.
        let mut busy = Vec::new();
        for i in 0..12 {
            let (p, g) = (pool.clone(), gate.clone());
            busy.push(tokio::spawn(async move {
                p.run_unkeyed(&format!("j{i}"), Duration::from_secs(30), move || g.wait())
                    .await
            }));
        }
        until("twelve running", || pool.lock().running.len() == 12).await;
        gate.open();
        for b in busy {
            assert_eq!(b.await.unwrap(), Ok(()));
        }
        until("twelve waiting", || pool.lock().waiting == 12).await;
        let before = pool.lock().idle_wakes;
        let jobs = 50;
        for _ in 0..jobs {
            assert_eq!(
                pool.run_unkeyed("one", Duration::from_secs(30), || ())
                    .await,
                Ok(())
            );
        }
        let wakes = pool.lock().idle_wakes - before;
        assert!(
            wakes <= jobs + 5,
            "{jobs} jobs one after another woke idle threads {wakes} times"
        );
    }

    #[tokio::test]
    async fn bounded_queue() {
        let gate = Gate::default();
        let fake = Arc::new(Fake {
            gate: gate.clone(),
            checks: AtomicUsize::new(0),
        });
        let pool = FsPool::build(2, 2, fake, ms(100));
        // Both threads busy, two queued (their callers wait): the next is refused.
        let mut waiting = Vec::new();
        for i in 0..4 {
            let (p, g) = (pool.clone(), gate.clone());
            waiting.push(tokio::spawn(async move {
                p.run_unkeyed(&format!("j{i}"), Duration::from_secs(30), move || g.wait())
                    .await
            }));
            if i == 1 {
                until("two running", || pool.lock().running.len() == 2).await;
            }
        }
        until("two queued", || pool.lock().queued() == 2).await;
        assert!(matches!(
            pool.run(Path::new("/d"), ms(50), || ()).await,
            Err(FsError::Saturated(_))
        ));
        gate.open();
        for w in waiting {
            assert_eq!(w.await.unwrap(), Ok(()));
        }
    }
}
