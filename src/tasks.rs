//! Operation tasks: ids, per-item results, and their history.
//!
//! An operate request becomes one task with one item per (host, process) key. The task is
//! committed to the store, with every item pending, before its id is returned, so a caller
//! that got a task id can always query it, even after an agent crash. Items then finish one
//! by one; a pending item reads as 115 ("processing"). Items still pending when the agent
//! (re)starts are closed with an error saying the agent restarted during the operation.
//!
//! A task made only of stops, kills and unmanages must act even when the state directory is
//! full: its record is an urgent write (it may use the reserve, see [`crate::store`]), and
//! if even that cannot be committed the task is kept in memory, its record queued until the
//! disk accepts it, and the operation runs all the same (its result says its intent is not
//! durable).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::proto::{KeyResult, OpType, codes};
use crate::store::{Store, StoreError, TaskRecord};

struct Book {
    tasks: HashMap<String, TaskRecord>,
    order: VecDeque<String>,
    seq: u64,
}

/// In-memory index of recent tasks, backed by the store.
pub struct TaskBook {
    book: Mutex<Book>,
    cap: usize,
    store: Store,
}

/// The error given to items that were running when the agent stopped.
pub const INTERRUPTED: &str = "the agent restarted while this operation ran; its outcome is unknown, query the process status";

impl TaskBook {
    /// Build from the tasks loaded at start; pending items are closed as interrupted.
    pub fn new(store: Store, cap: usize, loaded: Vec<TaskRecord>) -> TaskBook {
        let mut tasks = HashMap::new();
        let mut order = VecDeque::new();
        let mut seq = 0;
        for mut t in loaded {
            let mut changed = false;
            for (i, it) in t.items.iter_mut().enumerate() {
                if it.result.is_none() {
                    let r = KeyResult::err(codes::OP_FAILED, INTERRUPTED);
                    store.finish_item(&t.task_id, i, r.clone());
                    it.result = Some(r);
                    changed = true;
                }
            }
            if changed || t.finished_ms.is_none() {
                let now = crate::util::unix_millis();
                store.finish_task(&t.task_id, now);
                t.finished_ms = Some(now);
            }
            if let Some(n) = t
                .task_id
                .rsplit(':')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
            {
                seq = seq.max(n);
            }
            order.push_back(t.task_id.clone());
            tasks.insert(t.task_id.clone(), t);
        }
        TaskBook {
            book: Mutex::new(Book { tasks, order, seq }),
            cap,
            store,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new task id: `GSETASK:YYYYMMDDHHMMSS:N`.
    pub fn next_id(&self) -> String {
        let n = {
            let mut b = self.lock();
            b.seq = b.seq.max(999) + 1;
            b.seq
        };
        let stamp: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .chars()
            .filter(|c| c.is_ascii_digit())
            .collect();
        format!("GSETASK:{stamp}:{n}")
    }

    /// Record a task durably, then index it. A task that must act on a full disk
    /// ([`acts_on_full_disk`]) is indexed even when its record is only queued.
    pub async fn create(&self, task: TaskRecord) -> Result<(), StoreError> {
        if acts_on_full_disk(&task) {
            match self.store.insert_task_urgent(task.clone()).await {
                Ok(()) => {}
                Err(e @ StoreError::Queued(_)) => {
                    tracing::warn!(task_id = %task.task_id, error = %e, "task recorded in memory only until the state store accepts it");
                }
                Err(e) => return Err(e),
            }
        } else {
            self.store.insert_task(task.clone()).await?;
        }
        self.remember(task);
        Ok(())
    }

    /// Record the finished task of a synchronous request (register, update, unregister),
    /// whose change is already committed: while the store commits, in memory at once and
    /// durably in the writer's next commit (a background write), so that the answer does
    /// not wait for a second commit after its definition's. While it refuses commits (a
    /// full disk), as [`TaskBook::create`] does, waited for: a refused record is not kept
    /// for the retry, so requests made meanwhile cannot grow the writer's retry queue,
    /// which keeps every background write but events.
    pub async fn record_finished(&self, task: TaskRecord) -> Result<(), StoreError> {
        if !self.store.writable() {
            return self.create(task).await;
        }
        self.store.insert_task_bg(task.clone());
        self.remember(task);
        Ok(())
    }

    /// Keep a task in the in-memory history (the most recent `cap`).
    fn remember(&self, task: TaskRecord) {
        let mut b = self.lock();
        b.order.push_back(task.task_id.clone());
        b.tasks.insert(task.task_id.clone(), task);
        while b.order.len() > self.cap {
            if let Some(old) = b.order.pop_front() {
                b.tasks.remove(&old);
            }
        }
    }

    /// Set an item's result, durably first: a poller never sees a result that a crash could
    /// take back. Finishes the task when it was the last item.
    pub async fn finish_item(&self, task_id: &str, idx: usize, result: KeyResult) {
        let urgent = self
            .lock()
            .tasks
            .get(task_id)
            .is_some_and(acts_on_full_disk);
        let committed = self
            .store
            .finish_item_wait(task_id, idx, result.clone(), urgent)
            .await;
        if let Err(e) = committed {
            tracing::warn!(task_id, error = %e, "task result not committed yet; queued for retry");
        }
        let mut b = self.lock();
        if let Some(t) = b.tasks.get_mut(task_id) {
            if let Some(it) = t.items.get_mut(idx) {
                it.result = Some(result);
            }
            if t.finished_ms.is_none() && t.items.iter().all(|i| i.result.is_some()) {
                let now = crate::util::unix_millis();
                t.finished_ms = Some(now);
                self.store.finish_task(task_id, now);
            }
        }
    }

    /// Record in memory what an item did to its definition (the store records it with the
    /// definition write itself: [`crate::store::ItemNote`]).
    pub fn note_definition(&self, task_id: &str, idx: usize, change: &str) {
        let mut b = self.lock();
        if let Some(it) = b.tasks.get_mut(task_id).and_then(|t| t.items.get_mut(idx)) {
            it.definition = Some(change.to_string());
        }
    }

    /// Look a task up (memory first, then the store, read on a blocking thread).
    pub async fn get(&self, task_id: &str) -> Option<TaskRecord> {
        let held = self.lock().tasks.get(task_id).cloned();
        if held.is_some() {
            return held;
        }
        let (store, id) = (self.store.clone(), task_id.to_string());
        tokio::task::spawn_blocking(move || store.read_task(&id))
            .await
            .ok()?
            .ok()
            .flatten()
    }

    /// The most recent tasks, newest first.
    pub fn recent(&self, limit: usize) -> Vec<TaskRecord> {
        let b = self.lock();
        b.order
            .iter()
            .rev()
            .take(limit)
            .filter_map(|id| b.tasks.get(id).cloned())
            .collect()
    }
}

/// Is `task` made only of operations that must act even on a full state directory (stop,
/// kill, unmanage)?
pub fn acts_on_full_disk(task: &TaskRecord) -> bool {
    !task.items.is_empty()
        && task.items.iter().all(|i| {
            matches!(
                OpType::from_code(i.op_type),
                Some(OpType::Stop | OpType::Kill | OpType::Undelegate)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TaskItemRecord;

    fn task(ops: &[i64]) -> TaskRecord {
        TaskRecord {
            task_id: "GSETASK:1".into(),
            created_ms: 0,
            finished_ms: None,
            api: "operate_proc".into(),
            op_type: ops.first().copied().unwrap_or(0),
            peer_uid: None,
            peer_pid: None,
            username: String::new(),
            items: ops
                .iter()
                .map(|o| TaskItemRecord {
                    result_key: "k".into(),
                    key: None,
                    op_type: *o,
                    result: None,
                    definition: None,
                    target: None,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_finished_request_is_listed_at_once_and_committed_with_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let (store, _) = Store::open(&db, 10, 10, 0).unwrap();
        let book = TaskBook::new(store.clone(), 10, Vec::new());
        let mut t = task(&[-1]);
        t.api = "register_proc_info".into();
        t.finished_ms = Some(5);
        t.items[0].result = Some(KeyResult::ok(""));
        t.items[0].definition = Some("registered".into());
        book.record_finished(t.clone()).await.unwrap();
        // Listed before anything is committed: the caller's answer may come first.
        assert_eq!(book.recent(10).len(), 1);
        // The next write the agent waits for commits it too (or before it).
        let k = crate::spec::ProcKey::new("ns", "a");
        store.put_definition(&k, "{}".into()).await.unwrap();
        let stored = store.read_task("GSETASK:1").unwrap().expect("committed");
        assert_eq!(stored.items[0].definition.as_deref(), Some("registered"));
        drop((book, store));
        // After a restart it is a finished task, not one an agent's end interrupted.
        let (_s, loaded) = Store::open(&db, 10, 10, 0).unwrap();
        assert_eq!(loaded.tasks.len(), 1);
        assert_eq!(loaded.tasks[0].finished_ms, Some(5));
        assert_eq!(loaded.tasks[0].items[0].result, Some(KeyResult::ok("")));
    }

    #[test]
    fn only_stop_kill_and_unmanage_act_on_a_full_disk() {
        assert!(acts_on_full_disk(&task(&[1])));
        assert!(acts_on_full_disk(&task(&[9, 4, 1])));
        for ops in [&[0][..], &[2], &[3], &[7], &[8], &[1, 0], &[], &[-1]] {
            assert!(!acts_on_full_disk(&task(ops)), "{ops:?}");
        }
    }
}
