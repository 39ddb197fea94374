//! The supervisor's registry: every definition with its lifecycle, its durable facts and the
//! runtime bookkeeping of the processes it tracks. Private to the supervisor: the API sees
//! [`super::view::ProcView`] snapshots.
//!
//! [`ProcState`] is what survives an agent restart, stored as JSON in SQLite (the format of
//! every earlier version, read unchanged): the intent (GSE `flag`, managed), the identity of
//! each running instance, restarts, the last exit, whether a single run completed, limit
//! stops.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::lifecycle::{Instance as Life, Intent, Process, State};
use super::ownership::Spawn;
use crate::probe::Sample;
use crate::proto::{FLAG_RUNNING, FLAG_STOPPED, FLAG_UNREGISTERED};
use crate::spec::{Definition, ProcKey};
use crate::sys::ExitInfo;

/// A running instance as recorded: pid + start time + boot id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub pid: i32,
    /// `/proc/PID/stat` start time, clock ticks since boot.
    pub starttime: u64,
    pub boot_id: String,
    /// Process group at attach time (for whole-tree stops).
    pub pgid: i32,
    /// Session at attach time.
    #[serde(default)]
    pub sid: i32,
    /// Unix seconds when the agent attached (started or adopted) it.
    pub since: i64,
    /// Whether a command of the agent started it (its process group is the command's).
    #[serde(default)]
    pub started_by_agent: bool,
}

/// The last exit of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    pub pid: i32,
    pub at: i64,
    pub exit: ExitInfo,
    /// Whether an operator's operation caused it.
    pub by_operator: bool,
    /// The OOM killer ended it (containment with the memory controller: its cgroup's
    /// `memory.events` counted an OOM kill).
    #[serde(default)]
    pub oom: bool,
}

/// A stop for exceeding a resource limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStop {
    /// Unix seconds.
    pub at: i64,
    /// Which limit, the figures and for how many samples.
    pub cause: String,
}

/// Durable per-process state (the stored JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcState {
    /// Expected state: 0 unset, 1 running, 2 stopped.
    pub flag: i64,
    /// Kept alive by the agent.
    pub managed: bool,
    pub instances: Vec<Instance>,
    pub last_start_time: i64,
    pub restarts: u64,
    pub last_exit: Option<LastExit>,
    /// A single-run process that already ran to completion under supervision.
    #[serde(default)]
    pub completed: bool,
    /// Given up after `max_restarts` failures in a row (an operator start leaves it).
    #[serde(default)]
    pub fatal: bool,
    /// Times the agent stopped it for staying over `cpu_lmt` / `mem_lmt`.
    #[serde(default)]
    pub limit_stops: u64,
    /// The latest of those stops.
    #[serde(default)]
    pub last_limit: Option<LimitStop>,
    /// What each instance's status says (its last failure, why it stopped), so that an
    /// agent restart does not blank it; a process that runs again clears it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
}

impl Default for ProcState {
    fn default() -> Self {
        ProcState {
            flag: FLAG_UNREGISTERED,
            managed: false,
            instances: Vec::new(),
            last_start_time: 0,
            restarts: 0,
            last_exit: None,
            completed: false,
            fatal: false,
            limit_stops: 0,
            last_limit: None,
            messages: Vec::new(),
        }
    }
}

/// A process the agent tracks: its recorded identity, its pidfd and exit watcher.
#[derive(Debug)]
pub struct Tracked {
    pub identity: Instance,
    pub fd: Option<Arc<OwnedFd>>,
    pub watcher: Option<tokio::task::AbortHandle>,
    pub attached_at: Instant,
}

/// A few values by pid, in pid order: a definition tracks one process per instance, most
/// often one. A `BTreeMap` allocates a node for eleven entries even for one (about 1 KiB
/// with a [`Tracked`], a MiB for a thousand definitions); this holds exactly its entries.
#[derive(Debug)]
pub struct PidMap<V> {
    entries: Vec<(i32, V)>,
}

impl<V> Default for PidMap<V> {
    fn default() -> Self {
        PidMap {
            entries: Vec::new(),
        }
    }
}

impl<V> PidMap<V> {
    fn find(&self, pid: i32) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&pid, |(p, _)| *p)
    }

    pub fn get(&self, pid: &i32) -> Option<&V> {
        self.find(*pid).ok().map(|i| &self.entries[i].1)
    }

    pub fn contains_key(&self, pid: &i32) -> bool {
        self.find(*pid).is_ok()
    }

    /// Insert or replace; returns the value it replaced.
    pub fn insert(&mut self, pid: i32, v: V) -> Option<V> {
        match self.find(pid) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, v)),
            Err(i) => {
                // Exactly one more (a Vec would make room for four at its first insert).
                self.entries.reserve_exact(1);
                self.entries.insert(i, (pid, v));
                None
            }
        }
    }

    pub fn remove(&mut self, pid: &i32) -> Option<V> {
        let i = self.find(*pid).ok()?;
        Some(self.entries.remove(i).1)
    }

    /// The pids, in order.
    pub fn keys(&self) -> impl Iterator<Item = &i32> {
        self.entries.iter().map(|(p, _)| p)
    }

    /// The values, in pid order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

/// A process's health checks.
#[derive(Debug, Default, Clone)]
pub struct Health {
    /// Failed checks in a row.
    pub failures: u32,
    /// The last result, as operators read it.
    pub text: Option<String>,
    pub last: Option<Instant>,
    /// A check runs now.
    pub running: bool,
}

/// Everything the supervisor holds about one definition.
#[derive(Debug)]
pub struct Entry {
    pub def: std::sync::Arc<Definition>,
    /// Why the stored definition cannot be acted on (it fails today's validation): reported,
    /// never started, adopted or signalled.
    pub invalid: Option<String>,
    /// The lifecycle: intent, instances, operations.
    pub life: Process,
    /// An intent being committed (what the store will hold once it lands).
    pub pending_intent: Option<Intent>,
    /// The tracked processes, by pid.
    pub tracked: PidMap<Tracked>,
    /// The identities recorded before this agent started, still to be re-adopted.
    pub to_readopt: Vec<Instance>,
    pub last_start_time: i64,
    pub last_exit: Option<LastExit>,
    pub limit_stops: u64,
    pub last_limit: Option<LimitStop>,
    /// Restarts counted before this agent started.
    pub restarts_before: u64,
    /// Commands the agent ran for it in this incarnation (newest first): ownership evidence.
    pub spawns: VecDeque<Spawn>,
    /// Identities recorded before this agent started, of this boot: ownership evidence.
    pub recorded: Vec<(i32, u64)>,
    /// A background pid-file discovery is in flight.
    pub discovering: bool,
    /// The last reason a process named by the pid file was not adopted (reported once).
    pub last_refusal: Option<String>,
    pub sample: Option<Sample>,
    /// Consecutive samples over a limit.
    pub over_limit: u32,
    pub version: String,
    pub health: Health,
}

/// How many spawn records a process keeps.
pub const MAX_SPAWNS: usize = 8;

impl Entry {
    /// An entry from its definition and stored state (instances start idle; re-adoption
    /// attaches the recorded ones).
    pub fn new(def: Definition, st: ProcState) -> Entry {
        let n = def.spec.instance_num.max(1) as usize;
        let idle = if st.fatal {
            State::Fatal
        } else if st.completed {
            State::Completed
        } else {
            State::Stopped
        };
        let mut life = Life::new(idle);
        if st.fatal {
            life.message = "given up after max_restarts failures in a row (before the agent restarted); start or manage it to try again".into();
        }
        let mut lives = vec![life; n];
        for (l, m) in lives.iter_mut().zip(&st.messages) {
            if !m.is_empty() {
                l.message = m.clone();
            }
        }
        let boot = crate::procinfo::boot_id();
        let recorded = st
            .instances
            .iter()
            .filter(|i| i.boot_id.is_empty() || i.boot_id == boot)
            .map(|i| (i.pid, i.starttime))
            .collect();
        let mut life = Process::new(
            Intent {
                expect_running: st.flag == FLAG_RUNNING,
                managed: st.managed,
            },
            lives,
        );
        life.account = def.spec.account.clone();
        Entry {
            invalid: None,
            life,
            pending_intent: None,
            tracked: PidMap::default(),
            to_readopt: st.instances.clone(),
            last_start_time: st.last_start_time,
            last_exit: st.last_exit,
            limit_stops: st.limit_stops,
            last_limit: st.last_limit,
            restarts_before: st.restarts,
            spawns: VecDeque::new(),
            recorded,
            discovering: false,
            last_refusal: None,
            sample: None,
            over_limit: 0,
            version: String::new(),
            health: Health::default(),
            def: std::sync::Arc::new(def),
        }
    }

    /// The intent as the store holds it (or will, once a pending commit lands).
    pub fn stored_intent(&self) -> Intent {
        self.pending_intent.unwrap_or(self.life.intent)
    }

    /// Restarts by the supervisor, all told.
    pub fn restarts(&self) -> u64 {
        self.restarts_before + self.life.instances.iter().map(|i| i.restarts).sum::<u64>()
    }

    /// The durable state, as stored.
    pub fn state(&self) -> ProcState {
        let intent = self.stored_intent();
        ProcState {
            flag: if intent.expect_running {
                FLAG_RUNNING
            } else {
                FLAG_STOPPED
            },
            managed: intent.managed,
            instances: self.tracked.values().map(|t| t.identity.clone()).collect(),
            last_start_time: self.last_start_time,
            restarts: self.restarts(),
            last_exit: self.last_exit.clone(),
            completed: self
                .life
                .instances
                .iter()
                .any(|i| i.state == State::Completed),
            fatal: self.life.instances.iter().any(|i| i.state == State::Fatal),
            limit_stops: self.limit_stops,
            last_limit: self.last_limit.clone(),
            messages: if self.life.instances.iter().all(|i| i.message.is_empty()) {
                Vec::new()
            } else {
                self.life
                    .instances
                    .iter()
                    .map(|i| i.message.clone())
                    .collect()
            },
        }
    }

    pub fn state_json(&self) -> String {
        serde_json::to_string(&self.state()).unwrap_or_else(|_| "{}".into())
    }

    /// Remember a command the agent ran for this process.
    pub fn note_spawn(&mut self, spawn: Spawn) {
        self.spawns.push_front(spawn);
        self.spawns.truncate(MAX_SPAWNS);
    }

    /// The pids of the instances that run now.
    pub fn running_pids(&self) -> Vec<i32> {
        self.life
            .instances
            .iter()
            .filter_map(|i| match i.state {
                State::Running { pid, .. } => Some(pid),
                _ => None,
            })
            .collect()
    }

    /// The running instances, main first: (pid, start time), each once.
    pub fn running_instances(&self) -> Vec<(i32, u64)> {
        let mut instances: Vec<(i32, u64)> = self
            .life
            .instances
            .iter()
            .filter_map(|i| i.state.pid())
            .filter_map(|pid| self.tracked.get(&pid).map(|t| (pid, t.identity.starttime)))
            .collect();
        instances.dedup();
        instances
    }

    /// Which instance a pid is the process of.
    pub fn instance_of(&self, pid: i32) -> Option<usize> {
        self.life
            .instances
            .iter()
            .position(|i| i.state.pid() == Some(pid))
    }

    /// An instance nothing runs in and nothing holds (for a process found running).
    pub fn idle_instance(&self) -> Option<usize> {
        self.life.instances.iter().position(|i| i.state.is_idle())
    }
}

/// Every entry, in key order (deterministic listings), and which key tracks which pid.
#[derive(Debug, Default)]
pub struct Registry {
    pub entries: BTreeMap<ProcKey, Entry>,
    pids: HashMap<i32, ProcKey>,
    /// The last key housekeeping's pid-file discovery started ([`round_robin`]'s cursor).
    pub discovered_last: Option<ProcKey>,
}

/// Up to `budget` keys of `map` whose value is `due`, in key order from just after `after`
/// round to it again (`after` itself last), so that successive calls with the last key
/// returned each time visit every due key in turn however many there are.
pub fn round_robin<V>(
    map: &BTreeMap<ProcKey, V>,
    after: Option<&ProcKey>,
    budget: usize,
    due: impl Fn(&V) -> bool,
) -> Vec<ProcKey> {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let ordered: Box<dyn Iterator<Item = (&ProcKey, &V)>> = match after {
        Some(k) => Box::new(
            map.range::<ProcKey, _>((Excluded(k), Unbounded))
                .chain(map.range::<ProcKey, _>((Unbounded, Included(k)))),
        ),
        None => Box::new(map.iter()),
    };
    ordered
        .filter(|(_, v)| due(v))
        .take(budget)
        .map(|(k, _)| k.clone())
        .collect()
}

impl Registry {
    pub fn get(&self, key: &ProcKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn get_mut(&mut self, key: &ProcKey) -> Option<&mut Entry> {
        self.entries.get_mut(key)
    }

    /// Which entry tracks this pid?
    pub fn key_of_pid(&self, pid: i32) -> Option<&ProcKey> {
        self.pids.get(&pid)
    }

    /// Start tracking `t` for `key`.
    pub fn track(&mut self, key: &ProcKey, t: Tracked) -> bool {
        let pid = t.identity.pid;
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        e.tracked.insert(pid, t);
        self.pids.insert(pid, key.clone());
        true
    }

    /// Stop tracking `pid` of `key` (its watcher is aborted, its pidfd closed).
    pub fn untrack(&mut self, key: &ProcKey, pid: i32) -> Option<Tracked> {
        let t = self.entries.get_mut(key)?.tracked.remove(&pid)?;
        if self.pids.get(&pid) == Some(key) {
            self.pids.remove(&pid);
        }
        Some(t)
    }

    /// Remove an entry and everything it tracks.
    pub fn remove(&mut self, key: &ProcKey) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        for pid in e.tracked.keys() {
            self.pids.remove(pid);
        }
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::{BTreeMap, PidMap, ProcKey, round_robin};

    /// round_robin takes due keys from just after its cursor, wraps round, ends at the
    /// cursor, and stops at its budget.
    #[test]
    fn round_robin_visits_every_due_key_in_turn() {
        let k = |n: &str| ProcKey {
            namespace: "ns".into(),
            name: n.into(),
        };
        // a..f; b and e not due.
        let map: BTreeMap<ProcKey, bool> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|n| (k(n), *n != "b" && *n != "e"))
            .collect();
        let names = |v: Vec<ProcKey>| v.into_iter().map(|k| k.name).collect::<Vec<_>>();
        let cases: &[(Option<&str>, usize, &[&str])] = &[
            (None, 2, &["a", "c"]),
            (Some("c"), 2, &["d", "f"]),
            (Some("f"), 2, &["a", "c"]),
            // The cursor itself comes last; a key no longer in the map still places it.
            (Some("d"), 10, &["f", "a", "c", "d"]),
            (Some("cc"), 3, &["d", "f", "a"]),
            (Some("z"), 1, &["a"]),
            (None, 0, &[]),
        ];
        for (after, budget, want) in cases {
            let got = round_robin(&map, after.map(k).as_ref(), *budget, |d| *d);
            assert_eq!(names(got), *want, "after {after:?}, budget {budget}");
        }
        // Successive calls from the last key returned visit all four due keys every two.
        let mut cursor: Option<ProcKey> = None;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let got = round_robin(&map, cursor.as_ref(), 2, |d| *d);
            cursor = got.last().cloned();
            seen.extend(names(got));
        }
        assert_eq!(seen, ["a", "c", "d", "f", "a", "c", "d", "f"]);
    }

    /// PidMap behaves as the ordered map it replaced: insert replaces and returns the old
    /// value, remove takes one, keys and values come in pid order.
    #[test]
    fn pid_map_is_an_ordered_map() {
        let mut m = PidMap::default();
        assert!(m.is_empty());
        for (pid, v) in [(30, "c"), (10, "a"), (20, "b")] {
            assert_eq!(m.insert(pid, v), None);
        }
        assert_eq!(m.insert(20, "B"), Some("b"));
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), vec![10, 20, 30]);
        assert_eq!(m.values().copied().collect::<Vec<_>>(), vec!["a", "B", "c"]);
        assert_eq!((m.get(&20), m.get(&25)), (Some(&"B"), None));
        assert!(m.contains_key(&30) && !m.contains_key(&31));
        assert_eq!((m.remove(&10), m.remove(&10)), (Some("a"), None));
        assert_eq!(m.len(), 2);
    }
}
