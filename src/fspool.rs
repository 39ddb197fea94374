//! The bounded pool that runs blocking file-system work on paths callers or managed accounts
//! choose (pid files, log paths, setup paths).
//!
//! Such a path may sit on a hung NFS or FUSE mount, where a syscall never returns. The work
//! therefore never runs on the async workers or the supervisor loop but on this pool's own
//! threads, and:
//! * at most one job per path is in flight: a second request for a path waits (within its own
//!   deadline) until the first job returns, so a hung path holds one thread, not one per
//!   request;
//! * every request waits at most its deadline ([`FsError::Timeout`]); the job itself goes on
//!   until the kernel returns, and the path stays busy until then ([`FsError::Busy`] for the
//!   requests that queued behind it);
//! * the number of threads and of queued jobs is bounded ([`FsError::Saturated`] beyond);
//! * the threads are never joined: a thread stuck in the kernel cannot hold the agent's
//!   shutdown (the process exits around it).
//!
//! [`FsPool::stuck`] lists the paths whose job has been running for long, for the health
//! endpoint.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

/// Why a job gave no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FsError {
    #[error("{path} did not answer within {secs:.1}s (a hung mount?)")]
    Timeout { path: String, secs: f64 },
    #[error("{path} is still busy with an earlier request that has not returned (a hung mount?)")]
    Busy { path: String },
    #[error("the file-system pool is saturated ({0} jobs queued); try again")]
    Saturated(usize),
}

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Running {
    since: Instant,
    done: Arc<Notify>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
    in_flight: HashMap<PathBuf, Running>,
}

struct Inner {
    state: Mutex<State>,
    work: Condvar,
    max_threads: usize,
    max_queue: usize,
    idle_exit: Duration,
}

/// Frees a path when its job ends (returns or unwinds) and wakes the requests queued on it.
struct Release {
    pool: FsPool,
    key: PathBuf,
    done: Arc<Notify>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        st.in_flight.remove(&self.key);
        self.done.notify_waiters();
    }
}

/// Handle to the pool; cheap to clone.
#[derive(Clone)]
pub struct FsPool {
    inner: Arc<Inner>,
}

/// The deadline of a probe (pid file, setup_path, log path) unless the caller has a better one.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(2);

impl Default for FsPool {
    fn default() -> Self {
        FsPool::new(16, 4096)
    }
}

impl FsPool {
    /// A pool of at most `max_threads` threads (started on demand, leaving after 30 s idle)
    /// and at most `max_queue` queued jobs.
    pub fn new(max_threads: usize, max_queue: usize) -> FsPool {
        FsPool {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                max_threads: max_threads.max(1),
                max_queue: max_queue.max(1),
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
        let until = tokio::time::Instant::now() + deadline;
        let shown = || path.display().to_string();
        let done = loop {
            let wait = {
                let mut st = self.lock();
                match st.in_flight.get(path) {
                    Some(r) => r.done.clone(),
                    None => {
                        if st.queue.len() >= self.inner.max_queue {
                            return Err(FsError::Saturated(st.queue.len()));
                        }
                        let done = Arc::new(Notify::new());
                        st.in_flight.insert(
                            path.to_path_buf(),
                            Running {
                                since: Instant::now(),
                                done: done.clone(),
                            },
                        );
                        break done;
                    }
                }
            };
            // Another job on this path is in flight: wait for it to return (notified under
            // the lock by the worker, so registering before re-checking cannot miss it).
            let notified = wait.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.lock().in_flight.contains_key(path) {
                continue;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return Err(FsError::Busy { path: shown() });
            }
        };
        let (tx, rx) = oneshot::channel();
        let release = Release {
            pool: self.clone(),
            key: path.to_path_buf(),
            done,
        };
        self.submit(Box::new(move || {
            // The path is released when the job returns (before its answer is sent, so the
            // caller never sees it still busy), or when it unwinds.
            let v = f();
            drop(release);
            let _ = tx.send(v);
        }));
        match tokio::time::timeout_at(until, rx).await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(FsError::Timeout {
                path: shown(),
                secs: deadline.as_secs_f64(),
            }),
        }
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
        {
            let st = self.lock();
            if st.queue.len() >= self.inner.max_queue {
                return Err(FsError::Saturated(st.queue.len()));
            }
        }
        let (tx, rx) = oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }));
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(FsError::Timeout {
                path: what.to_string(),
                secs: deadline.as_secs_f64(),
            }),
        }
    }

    fn submit(&self, job: Job) {
        let mut st = self.lock();
        st.queue.push_back(job);
        if st.idle == 0 && st.threads < self.inner.max_threads {
            st.threads += 1;
            let pool = self.clone();
            let spawned = std::thread::Builder::new()
                .name("procagent-fs".into())
                .spawn(move || pool.worker());
            if let Err(e) = spawned {
                st.threads -= 1;
                tracing::error!(error = %e, "cannot start a file-system pool thread");
            }
        } else {
            self.inner.work.notify_one();
        }
    }

    fn worker(&self) {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                // A panicking job must not take the thread (and its count) with it.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    tracing::error!("a file-system pool job panicked");
                }
                st = self.lock();
                continue;
            }
            st.idle += 1;
            let (guard, timeout) = self
                .inner
                .work
                .wait_timeout(st, self.inner.idle_exit)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            st.idle -= 1;
            if timeout.timed_out() && st.queue.is_empty() {
                st.threads -= 1;
                return;
            }
        }
    }

    /// Paths whose job has run longer than `older_than`, with how long (longest first).
    pub fn stuck(&self, older_than: Duration) -> Vec<(PathBuf, Duration)> {
        let st = self.lock();
        let mut v: Vec<(PathBuf, Duration)> = st
            .in_flight
            .iter()
            .map(|(p, r)| (p.clone(), r.since.elapsed()))
            .filter(|(_, d)| *d >= older_than)
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        v
    }

    /// Threads running now (busy or idle).
    pub fn threads(&self) -> usize {
        self.lock().threads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn answers_and_releases_the_path() {
        let pool = FsPool::new(4, 16);
        let p = Path::new("/x/a");
        assert_eq!(pool.run(p, ms(500), || 7).await, Ok(7));
        assert_eq!(pool.run(p, ms(500), || 8).await, Ok(8));
        assert!(pool.stuck(Duration::ZERO).is_empty());
    }

    #[tokio::test]
    async fn a_hung_path_holds_one_thread_and_delays_only_itself() {
        let pool = FsPool::new(4, 16);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let hung = Path::new("/mnt/hung/pid");
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let first = pool.run(hung, ms(100), move || {
            s.fetch_add(1, Ordering::SeqCst);
            let _ = release_rx.recv();
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
        // Other paths are served meanwhile.
        assert_eq!(pool.run(Path::new("/ok"), ms(1000), || 3).await, Ok(3));
        assert_eq!(pool.stuck(ms(50)).len(), 1);
        // Once the stuck call returns, the path is usable again.
        release_tx.send(()).unwrap();
        let v = pool.run(hung, ms(2000), || 4).await;
        assert_eq!(v, Ok(4));
        assert!(pool.stuck(Duration::ZERO).is_empty());
    }

    #[tokio::test]
    async fn concurrent_requests_for_one_path_take_turns() {
        let pool = FsPool::new(4, 64);
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

    #[tokio::test]
    async fn bounded_queue() {
        let pool = FsPool::new(1, 2);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let block = |rx: Arc<Mutex<std::sync::mpsc::Receiver<()>>>| {
            move || {
                let _ = rx.lock().unwrap().recv();
            }
        };
        // One running, two queued: the next is refused.
        let _ = pool.run(Path::new("/a"), ms(50), block(rx.clone())).await;
        let _ = pool.run(Path::new("/b"), ms(50), block(rx.clone())).await;
        let _ = pool.run(Path::new("/c"), ms(50), block(rx.clone())).await;
        assert!(matches!(
            pool.run(Path::new("/d"), ms(50), || ()).await,
            Err(FsError::Saturated(_))
        ));
        for _ in 0..3 {
            tx.send(()).unwrap();
        }
    }
}
