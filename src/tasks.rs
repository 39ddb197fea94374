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

use crate::proto::{ItemHost, KeyResult, OpType, codes};
use crate::store::{Store, StoreError, TaskItemRecord, TaskRecord};

struct Book {
    tasks: HashMap<String, TaskRecord>,
    order: VecDeque<String>,
    seq: u64,
    /// What the held records weigh, as [`record_bytes`] counts.
    bytes: usize,
}

/// In-memory index of recent tasks, backed by the store: the most recent `cap` of them,
/// fewer when they weigh more than [`BOOK_BYTES`] (a task of 2000 items with long agent ids
/// and status contents weighs megabytes). An older one is read from the store.
pub struct TaskBook {
    book: Mutex<Book>,
    cap: usize,
    cap_bytes: usize,
    store: Store,
}

/// The most the in-memory history holds, in [`record_bytes`].
pub const BOOK_BYTES: usize = 16 << 20;

/// Roughly what an item occupies on the heap (its strings and its slot).
fn item_bytes(i: &TaskItemRecord) -> usize {
    std::mem::size_of::<TaskItemRecord>()
        + i.result_key.len()
        + i.key
            .as_ref()
            .map_or(0, |k| k.namespace.len() + k.name.len())
        + i.result
            .as_ref()
            .map_or(0, |r| r.error_msg.len() + r.content.len())
        + i.definition.as_ref().map_or(0, String::len)
        + match &i.target {
            Some(ItemHost::Host { ip, .. }) => ip.len(),
            Some(ItemHost::Agent(a)) => a.len(),
            None => 0,
        }
}

/// Roughly what a held record occupies: its strings, its id twice (map key and order), its
/// items.
pub(crate) fn record_bytes(t: &TaskRecord) -> usize {
    std::mem::size_of::<TaskRecord>()
        + 2 * t.task_id.len()
        + t.api.len()
        + t.username.len()
        + t.items.iter().map(item_bytes).sum::<usize>()
}

/// The error given to items that were running when the agent stopped.
pub const INTERRUPTED: &str = "the agent restarted while this operation ran; its outcome is unknown, query the process status";

impl TaskBook {
    /// Build from the tasks loaded at start; pending items are closed as interrupted.
    pub fn new(store: Store, cap: usize, loaded: Vec<TaskRecord>) -> TaskBook {
        let mut tasks = HashMap::new();
        let mut order = VecDeque::new();
        let mut seq = 0;
        let mut bytes = 0;
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
            bytes += record_bytes(&t);
            order.push_back(t.task_id.clone());
            if let Some(old) = tasks.insert(t.task_id.clone(), t) {
                bytes -= record_bytes(&old);
            }
        }
        let book = TaskBook {
            book: Mutex::new(Book {
                tasks,
                order,
                seq,
                bytes,
            }),
            cap,
            cap_bytes: BOOK_BYTES,
            store,
        };
        book.trim(&mut book.lock());
        book
    }

    /// A held record changed from `before` to `after` bytes.
    fn resized(&self, b: &mut Book, before: usize, after: usize) {
        b.bytes = (b.bytes + after).saturating_sub(before);
        self.trim(b);
    }

    /// Drop the oldest finished records past the count or the byte bound (the newest is
    /// always kept). A running task is never dropped: its results and its end are written
    /// through its held record (and its urgency read from it), and running tasks are as few
    /// as the operations in flight.
    fn trim(&self, b: &mut Book) {
        let mut from = 0;
        while b.order.len() > self.cap || (b.bytes > self.cap_bytes && b.order.len() > 1) {
            // The oldest finished one (or one no longer held), past the running ones.
            let Some(at) = (from..b.order.len().saturating_sub(1)).find(|&i| {
                b.tasks
                    .get(&b.order[i])
                    .is_none_or(|t| t.finished_ms.is_some())
            }) else {
                break;
            };
            from = at;
            let Some(old) = b.order.remove(at) else {
                break;
            };
            if let Some(t) = b.tasks.remove(&old) {
                b.bytes -= record_bytes(&t);
            }
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
    /// full disk), or while [`crate::store::AUDIT_SLOTS`] records are already on their way
    /// (a commit that hangs), as [`TaskBook::create`] does, waited for: a refused record is
    /// not kept for the retry, so requests made meanwhile cannot grow the writer's channel
    /// or its retry queue, which keeps every background write but events.
    pub async fn record_finished(&self, task: TaskRecord) -> Result<(), StoreError> {
        if !self.store.writable() {
            return self.create(task).await;
        }
        match self.store.try_insert_audit(task.clone()) {
            None => {
                self.remember(task);
                Ok(())
            }
            Some(task) => self.create(task).await,
        }
    }

    /// Keep a task in the in-memory history (the most recent `cap`).
    fn remember(&self, task: TaskRecord) {
        let mut b = self.lock();
        b.bytes += record_bytes(&task);
        b.order.push_back(task.task_id.clone());
        if let Some(old) = b.tasks.insert(task.task_id.clone(), task) {
            // Task ids are unique; a twin would be counted once in `order` for two.
            b.bytes -= record_bytes(&old);
        }
        self.trim(&mut b);
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
        let mut resized = None;
        if let Some(t) = b.tasks.get_mut(task_id) {
            if let Some(it) = t.items.get_mut(idx) {
                let before = item_bytes(it);
                it.result = Some(result);
                resized = Some((before, item_bytes(it)));
            }
            if t.finished_ms.is_none() && t.items.iter().all(|i| i.result.is_some()) {
                let now = crate::util::unix_millis();
                t.finished_ms = Some(now);
                self.store.finish_task(task_id, now);
            }
        }
        if let Some((before, after)) = resized {
            self.resized(&mut b, before, after);
        }
    }

    /// Record in memory what an item did to its definition (the store records it with the
    /// definition write itself: [`crate::store::ItemNote`]).
    pub fn note_definition(&self, task_id: &str, idx: usize, change: &str) {
        let mut b = self.lock();
        let mut resized = None;
        if let Some(it) = b.tasks.get_mut(task_id).and_then(|t| t.items.get_mut(idx)) {
            let before = item_bytes(it);
            it.definition = Some(change.to_string());
            resized = Some((before, item_bytes(it)));
        }
        if let Some((before, after)) = resized {
            self.resized(&mut b, before, after);
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
/// kill, unmanage), and does one of them still have to act?
pub fn acts_on_full_disk(task: &TaskRecord) -> bool {
    // Items answered when the task was made (another host's, an unknown process) act on
    // nothing: a task of only those is an ordinary one, which a full disk refuses, so that
    // such requests cannot fill the retry queue or spend the reserve.
    task.items.iter().any(|i| i.result.is_none())
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

    /// A finished request's record, for the slot tests.
    fn finished(n: usize) -> TaskRecord {
        let mut t = task(&[-1]);
        t.task_id = format!("GSETASK:{n}");
        t.api = "update_proc_info".into();
        t.finished_ms = Some(5);
        t.items[0].result = Some(KeyResult::ok(""));
        t
    }

    /// [`finished`] with a result of 3000 bytes.
    fn large(n: usize) -> TaskRecord {
        let mut t = finished(n);
        t.items[0].result = Some(KeyResult::ok("x".repeat(3000)));
        t
    }

    #[tokio::test]
    async fn while_a_commit_hangs_requests_past_the_audit_slots_wait_for_their_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let (store, _) = Store::open(&db, 10, 10, 0).unwrap();
        let book = std::sync::Arc::new(TaskBook::new(store.clone(), 1000, Vec::new()));
        // Another connection holds the write lock: the writer's next commit hangs (for its
        // busy timeout, 5 s), as on a stalled disk.
        let other = rusqlite::Connection::open(&db).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let b = book.clone();
        let requests = tokio::spawn(async move {
            for n in 0..=crate::store::AUDIT_SLOTS {
                b.record_finished(finished(n)).await?;
            }
            Ok::<_, StoreError>(())
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while book.recent(2000).len() < crate::store::AUDIT_SLOTS {
            assert!(std::time::Instant::now() < deadline, "records not listed");
            tokio::task::yield_now().await;
        }
        // The slots are taken: the next request waits for its record's commit, which cannot
        // come while the lock is held, instead of queueing one more record.
        tokio::task::yield_now().await;
        assert_eq!(book.recent(2000).len(), crate::store::AUDIT_SLOTS);
        assert!(
            !requests.is_finished(),
            "a request past the slots did not wait"
        );
        other.execute_batch("COMMIT").unwrap();
        requests.await.unwrap().unwrap();
        assert_eq!(book.recent(2000).len(), crate::store::AUDIT_SLOTS + 1);
        for n in 0..=crate::store::AUDIT_SLOTS {
            let id = format!("GSETASK:{n}");
            assert!(
                store.read_task(&id).unwrap().is_some(),
                "{id} not committed"
            );
        }
    }

    #[test]
    fn only_stop_kill_and_unmanage_act_on_a_full_disk() {
        assert!(acts_on_full_disk(&task(&[1])));
        assert!(acts_on_full_disk(&task(&[9, 4, 1])));
        for ops in [&[0][..], &[2], &[3], &[7], &[8], &[1, 0], &[], &[-1]] {
            assert!(!acts_on_full_disk(&task(ops)), "{ops:?}");
        }
    }

    /// The book's own count of bytes, checked against its records.
    fn held_bytes(book: &TaskBook) -> usize {
        let b = book.lock();
        let sum: usize = b.tasks.values().map(record_bytes).sum();
        assert_eq!(b.bytes, sum, "the count drifted from the records");
        sum
    }

    #[tokio::test]
    async fn the_history_in_memory_is_bounded_by_bytes_and_older_tasks_are_read_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("state.db"), 10, 10, 0).unwrap();
        let mut book = TaskBook::new(store.clone(), 1000, Vec::new());
        book.cap_bytes = 10_000;
        for n in 0..10 {
            book.record_finished(large(n)).await.unwrap();
            assert!(held_bytes(&book) <= 10_000);
        }
        let held = book.recent(1000);
        assert!((1..10).contains(&held.len()), "{} held", held.len());
        assert_eq!(held[0].task_id, "GSETASK:9", "the newest is kept");
        store.flush().await.unwrap();
        let oldest = book.get("GSETASK:0").await.expect("read from the store");
        assert_eq!(oldest.items[0].result.as_ref().unwrap().content.len(), 3000);

        // Results that grow a held task count too.
        let mut t = task(&[1, 1, 1, 1]);
        t.task_id = "GSETASK:100".into();
        book.create(t).await.unwrap();
        for idx in 0..4 {
            book.finish_item("GSETASK:100", idx, KeyResult::ok("y".repeat(2000)))
                .await;
            assert!(held_bytes(&book) <= 10_000);
        }
        book.note_definition("GSETASK:100", 0, "updated: start_cmd");
        assert!(held_bytes(&book) <= 10_000);
        assert_eq!(book.recent(1000)[0].task_id, "GSETASK:100");
        assert_eq!(book.recent(1000).len(), 1, "older records made room");
    }

    /// The bounds drop finished tasks only: a running one stays held however large the
    /// newer ones are, so its results and its end reach the store (and its urgency stays).
    #[tokio::test]
    async fn a_running_task_is_never_dropped_from_memory_by_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("state.db"), 10, 10, 0).unwrap();
        let mut book = TaskBook::new(store.clone(), 5, Vec::new());
        book.cap_bytes = 10_000;
        let mut running = task(&[1, 1]);
        running.task_id = "GSETASK:100".into();
        book.create(running).await.unwrap();
        for n in 0..10 {
            book.record_finished(large(n)).await.unwrap();
        }
        let held: Vec<String> = book.recent(1000).into_iter().map(|t| t.task_id).collect();
        assert!(held.contains(&"GSETASK:100".to_string()), "{held:?}");
        assert!(held.len() <= 5, "{held:?}");
        for idx in 0..2 {
            book.finish_item("GSETASK:100", idx, KeyResult::ok("done"))
                .await;
        }
        store.flush().await.unwrap();
        let t = book.get("GSETASK:100").await.expect("the task");
        assert!(t.finished_ms.is_some(), "{t:?}");
        assert!(t.items.iter().all(|i| i.result.is_some()));
        // Finished now, it goes as the oldest once newer tasks need the room.
        for n in 20..30 {
            book.record_finished(finished(n)).await.unwrap();
        }
        let held: Vec<String> = book.recent(1000).into_iter().map(|t| t.task_id).collect();
        assert!(!held.contains(&"GSETASK:100".to_string()), "{held:?}");
    }

    #[test]
    fn a_stop_that_acts_on_nothing_here_is_not_urgent() {
        let mut t = task(&[1, 9]);
        t.items[0].result = Some(KeyResult::ok("not this host"));
        assert!(acts_on_full_disk(&t), "one item still acts");
        t.items[1].result = Some(KeyResult::ok("not this host"));
        assert!(!acts_on_full_disk(&t));
    }
}
