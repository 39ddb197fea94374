//! Memory events of contained instances: one inotify descriptor for the agent, a watch on
//! the `memory.events` of each instance cgroup that has a memory limit, and the counts last
//! read there, so that a rise of `high` (usage reached `memory.high`) or of `oom_kill` is
//! told as soon as the kernel counts it, not at the next sample (docs/architecture.md
//! "Containment", "Limits").
//!
//! The kernel notifies a modification of `memory.events` whenever one of its counts changes.
//! Everything here is blocking (inotify and small reads of the cgroup file system): callers
//! run it off the async workers. [`Watcher::fd`] is what an `AsyncFd` waits on before
//! [`Watcher::read`].

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::inotify;

use crate::cgroup::{MemoryEvents, memory_events};
use crate::spec::ProcKey;

/// A count that rose since it was last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rise {
    /// Usage reached `memory.high` this many more times.
    High { by: u64 },
    /// The OOM killer killed this many more processes of the cgroup.
    OomKill { by: u64 },
}

/// One instance's rises, as [`Watcher::read`] reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub key: ProcKey,
    pub instance: usize,
    pub rise: Rise,
}

struct Watched {
    key: ProcKey,
    instance: usize,
    dir: PathBuf,
    last: MemoryEvents,
    /// An OOM kill was counted since the instance's start ([`Watcher::take_oom`]).
    oom: bool,
}

#[derive(Default)]
struct Inner {
    by_wd: HashMap<i32, Watched>,
    by_instance: HashMap<(ProcKey, usize), i32>,
}

/// The agent's watches of `memory.events`.
pub struct Watcher {
    fd: OwnedFd,
    inner: Mutex<Inner>,
}

/// The differences of two readings that the agent acts on.
pub fn rises(before: &MemoryEvents, now: &MemoryEvents) -> Vec<Rise> {
    let mut out = Vec::new();
    // A count lower than before is a new cgroup of the same name: nothing rose.
    if now.high > before.high {
        out.push(Rise::High {
            by: now.high - before.high,
        });
    }
    if now.oom_kill > before.oom_kill {
        out.push(Rise::OomKill {
            by: now.oom_kill - before.oom_kill,
        });
    }
    out
}

impl Watcher {
    /// A watcher with no watch (a non-blocking inotify descriptor).
    pub fn new() -> io::Result<Watcher> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        Ok(Watcher {
            fd,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The descriptor that becomes readable when a watched file changed.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Watch instance `i` of `key` in cgroup `dir`, from its counts now (what an earlier run
    /// of the instance counted is not this run's). Called before each start; the watch of
    /// the instance's previous cgroup, if another, is dropped. Blocking.
    pub fn add(&self, key: &ProcKey, i: usize, dir: &Path) -> io::Result<()> {
        let last = memory_events(dir)
            .ok_or_else(|| io::Error::other(format!("{} has no memory.events", dir.display())))?;
        // The kernel answers the same descriptor for the same file.
        let wd = inotify::add_watch(
            &self.fd,
            dir.join("memory.events"),
            inotify::WatchFlags::MODIFY,
        )?;
        let mut inner = self.inner();
        if let Some(old) = inner.by_instance.insert((key.clone(), i), wd)
            && old != wd
            && inner.by_wd.remove(&old).is_some()
        {
            let _ = inotify::remove_watch(&self.fd, old);
        }
        inner.by_wd.insert(
            wd,
            Watched {
                key: key.clone(),
                instance: i,
                dir: dir.to_path_buf(),
                last,
                oom: false,
            },
        );
        Ok(())
    }

    /// How many cgroups are watched.
    pub fn len(&self) -> usize {
        self.inner().by_wd.len()
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read what the descriptor holds and, for each watched file it names, the counts now:
    /// the rises since the last reading. A removed cgroup's watch is dropped. Blocking.
    pub fn read(&self) -> Vec<Report> {
        let mut changed = Vec::new();
        let mut gone = Vec::new();
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        while let Ok(ev) = reader.next() {
            if ev.events().contains(inotify::ReadFlags::IGNORED) {
                gone.push(ev.wd());
            } else {
                changed.push(ev.wd());
            }
        }
        changed.sort_unstable();
        changed.dedup();
        let mut inner = self.inner();
        for wd in gone {
            if let Some(w) = inner.by_wd.remove(&wd) {
                inner.by_instance.remove(&(w.key, w.instance));
            }
        }
        let mut out = Vec::new();
        for wd in changed {
            let Some(w) = inner.by_wd.get_mut(&wd) else {
                continue;
            };
            let Some(now) = memory_events(&w.dir) else {
                continue;
            };
            for rise in rises(&w.last, &now) {
                if matches!(rise, Rise::OomKill { .. }) {
                    w.oom = true;
                }
                out.push(Report {
                    key: w.key.clone(),
                    instance: w.instance,
                    rise,
                });
            }
            w.last = now;
        }
        out
    }

    /// Was an OOM kill counted in instance `i`'s cgroup since its start? Reads the counts
    /// now, so an exit reported before the inotify event was read is still told right; the
    /// flag is cleared. Blocking (one small read of the cgroup file system).
    pub fn take_oom(&self, key: &ProcKey, i: usize) -> bool {
        let mut inner = self.inner();
        let Some(wd) = inner.by_instance.get(&(key.clone(), i)).copied() else {
            return false;
        };
        let Some(w) = inner.by_wd.get_mut(&wd) else {
            return false;
        };
        if let Some(now) = memory_events(&w.dir) {
            if now.oom_kill > w.last.oom_kill {
                w.oom = true;
            }
            // Only the OOM count is taken here: a rise of `high` is still for read().
            w.last.oom_kill = now.oom_kill;
            w.last.oom_group_kill = now.oom_group_kill;
        }
        std::mem::take(&mut w.oom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(dir: &Path, high: u64, oom_kill: u64) {
        std::fs::write(
            dir.join("memory.events"),
            format!("low 0\nhigh {high}\nmax 0\noom 0\noom_kill {oom_kill}\noom_group_kill 0\n"),
        )
        .unwrap();
    }

    #[test]
    fn rises_are_differences_and_a_reset_is_none() {
        let a = MemoryEvents {
            high: 3,
            oom_kill: 1,
            ..Default::default()
        };
        let b = MemoryEvents {
            high: 5,
            oom_kill: 1,
            ..Default::default()
        };
        assert_eq!(rises(&a, &b), vec![Rise::High { by: 2 }]);
        assert_eq!(rises(&b, &a), vec![]);
        let c = MemoryEvents {
            high: 5,
            oom_kill: 2,
            ..Default::default()
        };
        assert_eq!(rises(&b, &c), vec![Rise::OomKill { by: 1 }]);
    }

    // A regular file stands for memory.events: inotify tells its modification as the
    // kernel's notification of the cgroup file does.
    #[test]
    fn a_rise_is_told_once_from_the_count_at_the_start() {
        let d = tempfile::tempdir().unwrap();
        events(d.path(), 7, 0);
        let w = Watcher::new().unwrap();
        let k = ProcKey::new("ns", "web");
        w.add(&k, 0, d.path()).unwrap();
        // Nothing happened since the start: the earlier run's 7 are not this run's.
        assert_eq!(w.read(), vec![]);
        events(d.path(), 9, 0);
        assert_eq!(
            w.read(),
            vec![Report {
                key: k.clone(),
                instance: 0,
                rise: Rise::High { by: 2 }
            }]
        );
        // Read once.
        assert_eq!(w.read(), vec![]);
        events(d.path(), 9, 1);
        let r = w.read();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].rise, Rise::OomKill { by: 1 });
        assert!(w.take_oom(&k, 0));
        assert!(!w.take_oom(&k, 0), "taken once");
    }

    #[test]
    fn an_oom_kill_is_told_to_the_exit_before_the_event_is_read() {
        let d = tempfile::tempdir().unwrap();
        events(d.path(), 0, 2);
        let w = Watcher::new().unwrap();
        let k = ProcKey::new("ns", "web");
        w.add(&k, 1, d.path()).unwrap();
        assert!(!w.take_oom(&k, 1));
        events(d.path(), 0, 3);
        assert!(w.take_oom(&k, 1));
        // The inotify event read later reports no second kill.
        assert_eq!(w.read(), vec![]);
        assert!(!w.take_oom(&ProcKey::new("ns", "other"), 0));
    }

    #[test]
    fn a_new_start_replaces_the_watch_and_a_removed_cgroup_drops_it() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        events(a.path(), 0, 0);
        events(b.path(), 0, 0);
        let w = Watcher::new().unwrap();
        let k = ProcKey::new("ns", "web");
        w.add(&k, 0, a.path()).unwrap();
        w.add(&k, 0, a.path()).unwrap();
        assert_eq!(w.len(), 1);
        w.add(&k, 0, b.path()).unwrap();
        assert_eq!(w.len(), 1);
        events(a.path(), 5, 0);
        assert_eq!(w.read(), vec![], "the old cgroup is no longer watched");
        let path = b.path().to_path_buf();
        drop(b);
        assert!(!path.exists());
        assert_eq!(w.read(), vec![]);
        assert!(w.is_empty());
        assert!(w.add(&k, 0, &path).is_err());
    }
}
