//! Durable state in SQLite: definitions, per-process state, task history and events.
//!
//! One writer thread owns the write connection (WAL, `synchronous=FULL`): callers send data
//! operations over a channel; the writer drains everything queued, applies it in one
//! transaction and commits (group commit), then answers each caller that waits. A change is
//! acknowledged only after its commit, so `kill -9` at any moment loses nothing that was
//! acknowledged.
//!
//! When a commit fails (disk full, read-only state dir, I/O error), callers that wait get the
//! error (the API answers with it and applies nothing), while background operations (process
//! state, task results, events) are kept and retried every second until the disk accepts
//! them again; [`Store::writable`] reports the condition for the health endpoint.
//!
//! Urgent writes (the intent of a stop, kill or unmanage, and their task) must not be lost to
//! a full disk: when one fails for lack of space, the writer releases the state directory's
//! reserve ([`crate::reserve`]) and commits it at once, together with every older write
//! except events (so no older state can later overwrite it). While the reserve is spent,
//! only urgent writes are attempted; other changes are refused and background writes wait
//! until the reserve could be created again. Audit records (the finished tasks of synchronous
//! requests, [`Store::try_insert_audit`]) never come along: at most [`AUDIT_SLOTS`] of them are
//! on their way without their request waiting, and none may spend the reserve. An urgent write that still fails is kept and
//! retried like a background one, and its caller learns that it is not durable yet
//! ([`StoreError::Queued`]).
//!
//! Background process-state writes are not queued one by one: they go into a dirty set (the
//! latest state per key), and one marker on the channel wakes the writer, which takes the set
//! with every message sent before it and commits the states after them. So the channel holds
//! at most one state write per key in flight whatever the rate of changes (a crash-looping
//! process, a hung disk), and an ordered write of a state (`put_state_queued`/`_urgent`, which
//! supersedes the key's pending one) is never overtaken by an older one.
//!
//! A database that is not a valid SQLite file, or fails `PRAGMA quick_check`, refuses to open
//! with its path in the error: the agent never silently resets its registry.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::oneshot;

use crate::proto::{Event, ItemHost, KeyResult};
use crate::reserve::Reserve;
use crate::spec::ProcKey;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state database {path} is corrupted ({detail}); refusing to start. Restore it from a backup or move it away to start with an empty registry"
    )]
    Corrupt { path: String, detail: String },
    #[error("state database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database write failed: {0}")]
    Write(String),
    #[error(
        "state database write failed ({0}); the change is kept and committed when the disk accepts it"
    )]
    Queued(String),
    #[error("state store is shut down")]
    Closed,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub task_id: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// Which API created it (operate_proc, operate_proc_multi, ...).
    pub api: String,
    pub op_type: i64,
    pub peer_uid: Option<u32>,
    pub peer_pid: Option<i32>,
    pub username: String,
    pub items: Vec<TaskItemRecord>,
}

/// One (host, process) item of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskItemRecord {
    pub result_key: String,
    pub key: Option<ProcKey>,
    pub op_type: i64,
    /// `None` while the item runs.
    pub result: Option<KeyResult>,
    /// What the item did to the process's definition (`registered`, `updated: field, ...`,
    /// `unchanged`); `None` when it wrote none.
    pub definition: Option<String>,
    /// The host the request named for this item, from which each result endpoint writes its
    /// own key; `None` for the entries of synchronous requests and for items recorded before
    /// schema v3, which answer `result_key` as it was written.
    pub target: Option<ItemHost>,
}

/// The task item on whose behalf a definition is written: its change is recorded in the
/// same transaction as the definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemNote {
    pub task_id: String,
    pub idx: usize,
    /// The change, as [`TaskItemRecord::definition`] says it.
    pub change: String,
}

/// Data operations the writer applies.
#[derive(Debug, Clone)]
enum Op {
    PutDefinition(ProcKey, String, Option<ItemNote>),
    DeleteDefinition(ProcKey),
    PutState(ProcKey, String),
    InsertTask(TaskRecord),
    /// The finished record of a synchronous request (applied as [`Op::InsertTask`]): an audit
    /// entry, which never takes the reserve's space (see [`may_use_reserve`]).
    InsertAudit(TaskRecord),
    FinishItem {
        task_id: String,
        idx: usize,
        result: KeyResult,
    },
    FinishTask {
        task_id: String,
        finished_ms: i64,
    },
    InsertEvent(Event),
    NoteItem(ItemNote),
    /// Wakes the writer to take the dirty set of states (applies nothing itself).
    FlushStates,
    Prune {
        before_ms: i64,
        max_tasks: u64,
        max_events: u64,
    },
}

/// How a write is treated when the disk refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Kept and retried; nobody waits.
    Background,
    /// Its caller waits and, on failure, applies nothing.
    Wait,
    /// Its caller waits; it may use the reserve, and on failure it is kept and retried.
    Urgent,
}

struct Msg {
    op: Op,
    reply: Option<oneshot::Sender<Result<(), StoreError>>>,
    class: Class,
    /// For an audit record sent without waiting: one of [`AUDIT_SLOTS`], given back when the
    /// writer is done with the message (committed, or moved to its retry queue).
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Audit records that may be on their way to the writer at once without their request
/// waiting ([`Store::try_insert_audit`]). Past it, requests wait for their record's commit:
/// while a commit hangs (a stalled disk), requests that write nothing else cannot pile up
/// records on the channel, and so in the retry queue when that commit fails.
pub const AUDIT_SLOTS: usize = 64;

/// Everything loaded at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// JSON of each stored definition.
    pub definitions: Vec<String>,
    /// JSON of each stored process state.
    pub states: Vec<(ProcKey, String)>,
    /// The most recent tasks, newest last.
    pub tasks: Vec<TaskRecord>,
    /// The most recent events, oldest first.
    pub events: Vec<Event>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Msg>,
    /// Background state writes waiting for the writer: the latest per key.
    dirty: Arc<Mutex<Dirty>>,
    reader: Arc<Mutex<Connection>>,
    writable: Arc<AtomicBool>,
    audit_slots: Arc<tokio::sync::Semaphore>,
    path: PathBuf,
}

/// The dirty set of process states.
#[derive(Default)]
struct Dirty {
    states: std::collections::HashMap<ProcKey, String>,
    /// A [`Op::FlushStates`] marker is on the channel, not yet taken.
    marker: bool,
}

const SCHEMA_VERSION: i64 = 3;

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", CACHE_KIB)?;
    Ok(())
}

/// The page cache of each connection, KiB (as a negative `cache_size`). SQLite's default,
/// 2000, was a tenth of the agent's heap at a thousand processes (heaptrack); the whole
/// database of such a host is a few MiB and every read is by key.
const CACHE_KIB: i64 = -512;

/// Schema v1 (f37add0 and before).
const SCHEMA_V1: &str = "BEGIN;
     CREATE TABLE IF NOT EXISTS definitions (
         namespace TEXT NOT NULL, name TEXT NOT NULL, def TEXT NOT NULL,
         PRIMARY KEY (namespace, name));
     CREATE TABLE IF NOT EXISTS proc_state (
         namespace TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
         PRIMARY KEY (namespace, name));
     CREATE TABLE IF NOT EXISTS tasks (
         task_id TEXT PRIMARY KEY, created_ms INTEGER NOT NULL, finished_ms INTEGER,
         api TEXT NOT NULL, op_type INTEGER NOT NULL, peer_uid INTEGER, peer_pid INTEGER,
         username TEXT NOT NULL DEFAULT '');
     CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_ms);
     CREATE TABLE IF NOT EXISTS task_items (
         task_id TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
         idx INTEGER NOT NULL, result_key TEXT NOT NULL, namespace TEXT, name TEXT,
         op_type INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0,
         error_code INTEGER, error_msg TEXT, content TEXT,
         PRIMARY KEY (task_id, idx));
     CREATE TABLE IF NOT EXISTS events (
         id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, key TEXT NOT NULL,
         kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL);
     PRAGMA user_version = 1;
     COMMIT;";

/// v1 -> v2: what each task item did to its definition (NULL for older rows, and for items
/// that wrote none).
const SCHEMA_V2: &str = "BEGIN;
     ALTER TABLE task_items ADD COLUMN definition TEXT;
     PRAGMA user_version = 2;
     COMMIT;";

/// v2 -> v3: the host each task item names (JSON of [`ItemHost`]; NULL for older rows,
/// which keep answering the key they were written with).
const SCHEMA_V3: &str = "BEGIN;
     ALTER TABLE task_items ADD COLUMN target TEXT;
     PRAGMA user_version = 3;
     COMMIT;";

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if v < 1 {
        conn.execute_batch(SCHEMA_V1)?;
    }
    if v < 2 {
        conn.execute_batch(SCHEMA_V2)?;
    }
    if v < 3 {
        conn.execute_batch(SCHEMA_V3)?;
    }
    Ok(())
}

impl Store {
    /// Open (creating if needed) the database at `path`, check it, migrate it, load what the
    /// agent needs at start, and start the writer thread. `reserve_bytes` (0: none) of
    /// space are kept in `reserve` beside the database for urgent writes.
    pub fn open(
        path: &Path,
        recent_tasks: usize,
        recent_events: usize,
        reserve_bytes: u64,
    ) -> Result<(Store, Loaded), StoreError> {
        let pstr = path.display().to_string();
        let open_err = |e: rusqlite::Error| classify_open_error(&pstr, e);
        let conn = Connection::open(path).map_err(open_err)?;
        configure(&conn).map_err(open_err)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(open_err)?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path: pstr,
                detail: check,
            });
        }
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::Corrupt {
                path: pstr,
                detail: format!(
                    "schema version {v} is newer than this agent understands ({SCHEMA_VERSION})"
                ),
            });
        }
        migrate(&conn).map_err(open_err)?;
        let loaded = load_all(&conn, recent_tasks, recent_events).map_err(open_err)?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        reader
            .pragma_update(None, "cache_size", CACHE_KIB)
            .map_err(open_err)?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let writable = Arc::new(AtomicBool::new(true));
        let w = writable.clone();
        let reserve = Reserve::new(&path.with_file_name("reserve"), reserve_bytes);
        let dirty = Arc::new(Mutex::new(Dirty::default()));
        let d = dirty.clone();
        std::thread::Builder::new()
            .name("procagent-store".into())
            .spawn(move || writer_loop(conn, rx, d, w, reserve))
            .map_err(|e| StoreError::Write(format!("cannot start the store thread: {e}")))?;
        Ok((
            Store {
                tx,
                dirty,
                reader: Arc::new(Mutex::new(reader)),
                writable,
                audit_slots: Arc::new(tokio::sync::Semaphore::new(AUDIT_SLOTS)),
                path: path.to_path_buf(),
            },
            loaded,
        ))
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False while commits are failing (disk full, read-only); background writes are queued.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    async fn send_wait(&self, op: Op) -> Result<(), StoreError> {
        self.send_class(op, Class::Wait).await
    }

    fn send_class(
        &self,
        op: Op,
        class: Class,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(Msg {
                op,
                reply: Some(tx),
                class,
                _slot: None,
            })
            .is_ok();
        async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            rx.await.map_err(|_| StoreError::Closed)?
        }
    }

    fn send_bg(&self, op: Op) {
        let msg = Msg {
            op,
            reply: None,
            class: Class::Background,
            _slot: None,
        };
        if self.tx.send(msg).is_err() {
            tracing::error!("state store is closed; a background write was dropped");
        }
    }

    /// Store a definition (JSON) and wait for the commit.
    pub async fn put_definition(&self, key: &ProcKey, json: String) -> Result<(), StoreError> {
        self.send_wait(Op::PutDefinition(key.clone(), json, None))
            .await
    }

    /// Store a definition and, in the same transaction, record on `note`'s task item what
    /// that write changed; wait for the commit.
    pub async fn put_definition_noted(
        &self,
        key: &ProcKey,
        json: String,
        note: Option<ItemNote>,
    ) -> Result<(), StoreError> {
        self.send_wait(Op::PutDefinition(key.clone(), json, note))
            .await
    }

    /// Record what a task item did to its definition when nothing was written (background).
    pub fn note_item(&self, note: ItemNote) {
        self.send_bg(Op::NoteItem(note));
    }

    /// Delete a definition and its state, and wait for the commit.
    pub async fn delete_definition(&self, key: &ProcKey) -> Result<(), StoreError> {
        self.send_wait(Op::DeleteDefinition(key.clone())).await
    }

    /// Store a process state (JSON) and wait for the commit.
    pub async fn put_state(&self, key: &ProcKey, json: String) -> Result<(), StoreError> {
        self.send_state(key, json, Class::Wait).await
    }

    /// Queue a process state now and return a future that resolves at its commit: the order
    /// of writes is fixed when this returns, so a caller can take the snapshot and queue it
    /// under the lock that guards the state.
    pub fn put_state_queued(
        &self,
        key: &ProcKey,
        json: String,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        self.send_state(key, json, Class::Wait)
    }

    /// As [`Self::put_state_queued`], for an intent that must not be lost to a full disk
    /// (stop, kill, unmanage): it may use the reserve, and when even that fails it is kept
    /// and retried, the error being [`StoreError::Queued`].
    pub fn put_state_urgent(
        &self,
        key: &ProcKey,
        json: String,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        self.send_state(key, json, Class::Urgent)
    }

    /// An ordered state write: it supersedes the key's pending background one, and is sent
    /// under the dirty set's lock, so the writer either finds it with the set or after it.
    fn send_state(
        &self,
        key: &ProcKey,
        json: String,
        class: Class,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        d.states.remove(key);
        let fut = self.send_class(Op::PutState(key.clone(), json), class);
        drop(d);
        fut
    }

    /// Store a process state in the background (retried while the disk refuses): into the
    /// dirty set, replacing the key's pending state (see the module docs).
    pub fn put_state_bg(&self, key: &ProcKey, json: String) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        d.states.insert(key.clone(), json);
        if !d.marker {
            d.marker = true;
            self.send_bg(Op::FlushStates);
        }
    }

    /// Record a new task (all items pending) and wait for the commit.
    pub async fn insert_task(&self, task: TaskRecord) -> Result<(), StoreError> {
        self.send_wait(Op::InsertTask(task)).await
    }

    /// Record a finished task (an audit record) without waiting: it is committed with the
    /// writer's next batch (background: kept and retried while the disk refuses it, never
    /// with the reserve's space). Gives the task back (`Some`) when [`AUDIT_SLOTS`] records
    /// are already on their way: the caller then waits for its commit ([`Self::insert_task`]).
    #[must_use = "a task given back was not recorded"]
    pub fn try_insert_audit(&self, task: TaskRecord) -> Option<TaskRecord> {
        let Ok(slot) = self.audit_slots.clone().try_acquire_owned() else {
            return Some(task);
        };
        let msg = Msg {
            op: Op::InsertAudit(task),
            reply: None,
            class: Class::Background,
            _slot: Some(slot),
        };
        if self.tx.send(msg).is_err() {
            tracing::error!("state store is closed; an audit record was dropped");
        }
        None
    }

    /// Record the task of an operation that must act on a full disk (urgent, as
    /// [`Self::put_state_urgent`]).
    pub async fn insert_task_urgent(&self, task: TaskRecord) -> Result<(), StoreError> {
        self.send_class(Op::InsertTask(task), Class::Urgent).await
    }

    /// Record one item's result (background).
    pub fn finish_item(&self, task_id: &str, idx: usize, result: KeyResult) {
        self.send_bg(Op::FinishItem {
            task_id: task_id.to_string(),
            idx,
            result,
        });
    }

    /// Record one item's result and wait for the commit. When the disk refuses, the write
    /// stays queued (retried until it lands) and the error is returned. `urgent` for an item
    /// of a task that must act on a full disk (see [`Self::put_state_urgent`]).
    pub async fn finish_item_wait(
        &self,
        task_id: &str,
        idx: usize,
        result: KeyResult,
        urgent: bool,
    ) -> Result<(), StoreError> {
        let op = Op::FinishItem {
            task_id: task_id.to_string(),
            idx,
            result,
        };
        if urgent {
            // Kept by the writer for the retry when it fails.
            return self.send_class(op, Class::Urgent).await;
        }
        match self.send_wait(op.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.send_bg(op);
                Err(e)
            }
        }
    }

    /// Mark a task finished (background).
    pub fn finish_task(&self, task_id: &str, finished_ms: i64) {
        self.send_bg(Op::FinishTask {
            task_id: task_id.to_string(),
            finished_ms,
        });
    }

    /// Append an event (background).
    pub fn insert_event(&self, ev: Event) {
        self.send_bg(Op::InsertEvent(ev));
    }

    /// Drop tasks older than `before_ms` and keep at most the given numbers of rows.
    pub fn prune(&self, before_ms: i64, max_tasks: u64, max_events: u64) {
        self.send_bg(Op::Prune {
            before_ms,
            max_tasks,
            max_events,
        });
    }

    /// Wait until everything sent so far is committed (or failed).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.send_wait(Op::Prune {
            before_ms: i64::MIN,
            max_tasks: u64::MAX,
            max_events: u64::MAX,
        })
        .await
    }

    /// Look a task up in the database (for tasks no longer held in memory).
    pub fn read_task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        read_task(&conn, task_id).map_err(|e| StoreError::Write(e.to_string()))
    }

    /// Events with id greater than `after_id` (at most `limit`), oldest first.
    pub fn read_events(
        &self,
        after_id: u64,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        read_events(&conn, after_id, since_ms, limit).map_err(|e| StoreError::Write(e.to_string()))
    }
}

fn classify_open_error(path: &str, e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, ref msg) = e
        && matches!(
            f.code,
            rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
        )
    {
        return StoreError::Corrupt {
            path: path.to_string(),
            detail: msg.clone().unwrap_or_else(|| f.to_string()),
        };
    }
    StoreError::Open {
        path: path.to_string(),
        source: e,
    }
}

fn apply(conn: &Connection, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::PutDefinition(k, json, note) => {
            conn.execute(
                "INSERT INTO definitions (namespace, name, def) VALUES (?1, ?2, ?3)
                 ON CONFLICT (namespace, name) DO UPDATE SET def = excluded.def",
                params![k.namespace, k.name, json],
            )?;
            if let Some(n) = note {
                note_item(conn, n)?;
            }
        }
        Op::NoteItem(n) => note_item(conn, n)?,
        Op::FlushStates => {}
        Op::DeleteDefinition(k) => {
            conn.execute(
                "DELETE FROM definitions WHERE namespace = ?1 AND name = ?2",
                params![k.namespace, k.name],
            )?;
            conn.execute(
                "DELETE FROM proc_state WHERE namespace = ?1 AND name = ?2",
                params![k.namespace, k.name],
            )?;
        }
        Op::PutState(k, json) => {
            // Only for a defined process: a state write queued just before the definition's
            // removal must not bring back a row that a later registration of the same key
            // would inherit (managed, expected running) after a restart.
            conn.execute(
                "INSERT INTO proc_state (namespace, name, state)
                 SELECT ?1, ?2, ?3 WHERE EXISTS
                     (SELECT 1 FROM definitions WHERE namespace = ?1 AND name = ?2)
                 ON CONFLICT (namespace, name) DO UPDATE SET state = excluded.state",
                params![k.namespace, k.name, json],
            )?;
        }
        Op::InsertTask(t) | Op::InsertAudit(t) => {
            conn.execute(
                "INSERT OR REPLACE INTO tasks (task_id, created_ms, finished_ms, api, op_type, peer_uid, peer_pid, username)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![t.task_id, t.created_ms, t.finished_ms, t.api, t.op_type, t.peer_uid, t.peer_pid, t.username],
            )?;
            let mut stmt = conn.prepare_cached(
                "INSERT OR REPLACE INTO task_items (task_id, idx, result_key, namespace, name, op_type, done, error_code, error_msg, content, definition, target)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for (i, it) in t.items.iter().enumerate() {
                let (done, code, msg, content) = match &it.result {
                    Some(r) => (
                        1,
                        Some(r.error_code),
                        Some(r.error_msg.as_str()),
                        Some(r.content.as_str()),
                    ),
                    None => (0, None, None, None),
                };
                stmt.execute(params![
                    t.task_id,
                    i as i64,
                    it.result_key,
                    it.key.as_ref().map(|k| k.namespace.as_str()),
                    it.key.as_ref().map(|k| k.name.as_str()),
                    it.op_type,
                    done,
                    code,
                    msg,
                    content,
                    it.definition,
                    it.target
                        .as_ref()
                        .and_then(|h| serde_json::to_string(h).ok())
                ])?;
            }
        }
        Op::FinishItem {
            task_id,
            idx,
            result,
        } => {
            conn.execute(
                "UPDATE task_items SET done = 1, error_code = ?3, error_msg = ?4, content = ?5
                 WHERE task_id = ?1 AND idx = ?2",
                params![
                    task_id,
                    *idx as i64,
                    result.error_code,
                    result.error_msg,
                    result.content
                ],
            )?;
        }
        Op::FinishTask {
            task_id,
            finished_ms,
        } => {
            conn.execute(
                "UPDATE tasks SET finished_ms = ?2 WHERE task_id = ?1",
                params![task_id, finished_ms],
            )?;
        }
        Op::InsertEvent(ev) => {
            conn.execute(
                "INSERT OR REPLACE INTO events (id, ts_ms, key, kind, message, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![ev.id as i64, ev.ts_ms, ev.key, ev.kind, ev.message, ev.data.to_string()],
            )?;
        }
        Op::Prune {
            before_ms,
            max_tasks,
            max_events,
        } => {
            if *before_ms != i64::MIN {
                conn.execute(
                    "DELETE FROM tasks WHERE created_ms < ?1",
                    params![before_ms],
                )?;
            }
            if *max_tasks != u64::MAX {
                conn.execute(
                    "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks ORDER BY created_ms DESC LIMIT -1 OFFSET ?1)",
                    params![*max_tasks as i64],
                )?;
            }
            if *max_events != u64::MAX {
                conn.execute(
                    "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?1",
                    params![*max_events as i64],
                )?;
            }
        }
    }
    Ok(())
}

fn note_item(conn: &Connection, n: &ItemNote) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE task_items SET definition = ?3 WHERE task_id = ?1 AND idx = ?2",
        params![n.task_id, n.idx as i64, n.change],
    )?;
    Ok(())
}

fn commit_batch(conn: &mut Connection, ops: &[&Op]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for op in ops {
        apply(&tx, op)?;
    }
    tx.commit()
}

fn disk_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// The outcome of a failed commit for each message of the batch: waiters learn it, urgent
/// and background operations are kept for the retry.
fn fail_batch(batch: Vec<Msg>, msg: &str, retry: &mut Vec<Op>) {
    for m in batch {
        match m.class {
            Class::Wait => {
                if let Some(r) = m.reply {
                    let _ = r.send(Err(StoreError::Write(msg.to_string())));
                }
            }
            Class::Urgent => {
                retry.push(m.op);
                if let Some(r) = m.reply {
                    let _ = r.send(Err(StoreError::Queued(msg.to_string())));
                }
            }
            Class::Background => retry.push(m.op),
        }
    }
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Msg>,
    dirty: Arc<Mutex<Dirty>>,
    writable: Arc<AtomicBool>,
    mut reserve: Reserve,
) {
    // Background (and urgent) operations that could not be committed yet, oldest first.
    let mut retry: Vec<Op> = Vec::new();
    let mut restore_at = std::time::Instant::now();
    loop {
        let first = if retry.is_empty() && !reserve.spent() {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Last chance for what is pending.
                    let ops: Vec<&Op> = retry.iter().collect();
                    if let Err(e) = commit_batch(&mut conn, &ops) {
                        tracing::error!(error = %e, pending = retry.len(), "state store closing with uncommitted background writes");
                    }
                    break;
                }
            }
        };
        let mut batch: Vec<Msg> = first.into_iter().collect();
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if batch.iter().any(|m| matches!(m.op, Op::FlushStates)) {
            take_dirty(&rx, &dirty, &mut batch);
        }
        // The reserve comes back first: nothing else may take the space it needs.
        if reserve.spent() && restore_at.elapsed() >= Duration::from_secs(1) {
            restore_at = std::time::Instant::now();
            reserve.restore();
        }
        let urgent = batch.iter().any(|m| m.class == Class::Urgent);
        if !reserve.spent() {
            // Retry queue first (it is older), then the new batch.
            let mut ops: Vec<&Op> = retry.iter().collect();
            ops.extend(batch.iter().map(|m| &m.op));
            match commit_batch(&mut conn, &ops) {
                Ok(()) => {
                    if !writable.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            flushed = retry.len(),
                            "state store writable again; queued writes committed"
                        );
                    }
                    retry.clear();
                    for m in batch {
                        if let Some(r) = m.reply {
                            let _ = r.send(Ok(()));
                        }
                    }
                    continue;
                }
                Err(e) => {
                    unwritable(&writable, &e.to_string());
                    let full = disk_full(&e) || reserve.looks_full();
                    if !(urgent && full && reserve.release()) {
                        fail_batch(batch, &e.to_string(), &mut retry);
                        bound_retry(&mut retry);
                        continue;
                    }
                }
            }
        }
        // The reserve is spent (or was just released).
        unwritable(
            &writable,
            "the state directory is full and its reserve is in use",
        );
        if !urgent {
            // Nothing but an urgent write may use the disk.
            fail_batch(
                batch,
                "the state directory is full; its remaining space is kept for stop, kill and unmanage",
                &mut retry,
            );
            bound_retry(&mut retry);
            continue;
        }
        // An urgent write with the reserve's space: everything older comes along (so that no
        // older state lands after it); events, audit records and refusable changes do not.
        let kept: Vec<Op> = retry
            .iter()
            .filter(|op| !may_use_reserve(op))
            .cloned()
            .collect();
        let mut ops: Vec<&Op> = retry.iter().filter(|op| may_use_reserve(op)).collect();
        ops.extend(
            batch
                .iter()
                .filter(|m| m.class != Class::Wait && may_use_reserve(&m.op))
                .map(|m| &m.op),
        );
        match commit_batch(&mut conn, &ops) {
            Ok(()) => {
                tracing::warn!(
                    committed = ops.len(),
                    "urgent writes committed into the state directory's reserve"
                );
                retry = kept;
                for m in batch {
                    match m.class {
                        Class::Wait => {
                            if let Some(r) = m.reply {
                                let _ = r.send(Err(StoreError::Write(
                                    "the state directory is full; its remaining space is kept for stop, kill and unmanage".into(),
                                )));
                            }
                        }
                        _ if !may_use_reserve(&m.op) => retry.push(m.op),
                        _ => {
                            if let Some(r) = m.reply {
                                let _ = r.send(Ok(()));
                            }
                        }
                    }
                }
            }
            Err(e) => {
                fail_batch(batch, &e.to_string(), &mut retry);
                bound_retry(&mut retry);
            }
        }
    }
}

/// May `op` be committed with the reserve's space, beside an urgent write? Everything a later
/// write could depend on, so that no older state lands after it; not events nor audit records
/// (finished tasks, which nothing later updates): they wait for the disk, and an admin's
/// requests that write nothing else cannot spend the reserve through them.
fn may_use_reserve(op: &Op) -> bool {
    !matches!(op, Op::InsertEvent(_) | Op::InsertAudit(_))
}

/// Record that commits fail (health says degraded until the next full commit).
fn unwritable(writable: &AtomicBool, why: &str) {
    if writable.swap(false, Ordering::Relaxed) {
        tracing::error!(error = %why, "state store write failed; background writes are queued and retried every second");
    }
}

/// The dirty set of states, after every message sent before it: under the set's lock, what
/// is left on the channel is read first (ordered state writes are sent under that lock, so
/// each is either read here, before the set's newer states, or sent after them), then the
/// states are added last, as background writes.
fn take_dirty(rx: &mpsc::Receiver<Msg>, dirty: &Mutex<Dirty>, batch: &mut Vec<Msg>) {
    let mut d = dirty.lock().unwrap_or_else(|e| e.into_inner());
    while let Ok(m) = rx.try_recv() {
        batch.push(m);
    }
    d.marker = false;
    let states = std::mem::take(&mut d.states);
    drop(d);
    batch.extend(states.into_iter().map(|(k, json)| Msg {
        op: Op::PutState(k, json),
        reply: None,
        class: Class::Background,
        _slot: None,
    }));
}

/// Bound the retry queue: events are the least important, drop the oldest first.
fn bound_retry(retry: &mut Vec<Op>) {
    // Only the latest state of a key matters (and it is the last one queued for it).
    let mut last: std::collections::HashMap<&ProcKey, usize> = std::collections::HashMap::new();
    for (i, op) in retry.iter().enumerate() {
        if let Op::PutState(k, _) = op {
            last.insert(k, i);
        }
    }
    if last.len()
        < retry
            .iter()
            .filter(|o| matches!(o, Op::PutState(..)))
            .count()
    {
        let keep: std::collections::HashSet<usize> = last.into_values().collect();
        let mut i = 0;
        retry.retain(|op| {
            let k = !matches!(op, Op::PutState(..) | Op::FlushStates) || keep.contains(&i);
            i += 1;
            k
        });
    }
    if retry.len() > 100_000 {
        let excess = retry.len() - 100_000;
        let mut dropped = 0;
        retry.retain(|op| {
            if dropped < excess && matches!(op, Op::InsertEvent(_)) {
                dropped += 1;
                false
            } else {
                true
            }
        });
    }
}

fn load_all(
    conn: &Connection,
    recent_tasks: usize,
    recent_events: usize,
) -> rusqlite::Result<Loaded> {
    let mut out = Loaded::default();
    let mut stmt = conn.prepare("SELECT def FROM definitions ORDER BY namespace, name")?;
    out.definitions = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare("SELECT namespace, name, state FROM proc_state")?;
    out.states = stmt
        .query_map([], |r| {
            Ok((
                ProcKey::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt =
        conn.prepare("SELECT task_id FROM tasks ORDER BY created_ms DESC, task_id DESC LIMIT ?1")?;
    let ids: Vec<String> = stmt
        .query_map(params![recent_tasks as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    // Newest first, until the history's byte bound (the book would drop the rest at once;
    // reading them all first could take far more memory than the bound, at every start).
    let mut bytes = 0;
    for id in &ids {
        let Some(t) = read_task(conn, id)? else {
            continue;
        };
        bytes += crate::tasks::record_bytes(&t);
        if bytes > crate::tasks::BOOK_BYTES && !out.tasks.is_empty() {
            break;
        }
        out.tasks.push(t);
    }
    // And every task still running when the agent stopped, however old: the book closes
    // each as interrupted (as few as the operations that were in flight, each closed once).
    let mut stmt = conn.prepare(
        "SELECT task_id FROM tasks WHERE finished_ms IS NULL ORDER BY created_ms DESC, task_id DESC",
    )?;
    let running: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in running {
        if out.tasks.iter().any(|t| t.task_id == id) {
            continue;
        }
        if let Some(t) = read_task(conn, &id)? {
            out.tasks.push(t);
        }
    }
    // Oldest first, as the book keeps them.
    out.tasks
        .sort_by(|a, b| (a.created_ms, &a.task_id).cmp(&(b.created_ms, &b.task_id)));
    let mut evs = read_events_desc(conn, recent_events)?;
    evs.reverse();
    out.events = evs;
    Ok(out)
}

fn read_task(conn: &Connection, task_id: &str) -> rusqlite::Result<Option<TaskRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT task_id, created_ms, finished_ms, api, op_type, peer_uid, peer_pid, username FROM tasks WHERE task_id = ?1",
    )?;
    let mut rows = stmt.query(params![task_id])?;
    let Some(r) = rows.next()? else {
        return Ok(None);
    };
    let mut t = TaskRecord {
        task_id: r.get(0)?,
        created_ms: r.get(1)?,
        finished_ms: r.get(2)?,
        api: r.get(3)?,
        op_type: r.get(4)?,
        peer_uid: r.get(5)?,
        peer_pid: r.get(6)?,
        username: r.get(7)?,
        items: Vec::new(),
    };
    let mut stmt = conn.prepare_cached(
        "SELECT result_key, namespace, name, op_type, done, error_code, error_msg, content, definition, target
         FROM task_items WHERE task_id = ?1 ORDER BY idx",
    )?;
    t.items = stmt
        .query_map(params![task_id], |r| {
            let ns: Option<String> = r.get(1)?;
            let name: Option<String> = r.get(2)?;
            let done: i64 = r.get(4)?;
            Ok(TaskItemRecord {
                result_key: r.get(0)?,
                key: match (ns, name) {
                    (Some(a), Some(b)) => Some(ProcKey::new(a, b)),
                    _ => None,
                },
                op_type: r.get(3)?,
                result: if done != 0 {
                    Some(KeyResult {
                        error_code: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                        error_msg: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                        content: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                    })
                } else {
                    None
                },
                definition: r.get(8)?,
                // A target this agent cannot read answers the key it was written with.
                target: r
                    .get::<_, Option<String>>(9)?
                    .and_then(|j| serde_json::from_str(&j).ok()),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(t))
}

fn row_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let data: String = r.get(5)?;
    Ok(Event {
        id: r.get::<_, i64>(0)? as u64,
        ts_ms: r.get(1)?,
        key: r.get(2)?,
        kind: r.get(3)?,
        message: r.get(4)?,
        data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
    })
}

fn read_events_desc(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<Event>> {
    let mut stmt = conn.prepare(
        "SELECT id, ts_ms, key, kind, message, data FROM events ORDER BY id DESC LIMIT ?1",
    )?;
    stmt.query_map(params![limit as i64], row_event)?.collect()
}

fn read_events(
    conn: &Connection,
    after_id: u64,
    since_ms: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Event>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, ts_ms, key, kind, message, data FROM events WHERE id > ?1 AND ts_ms >= ?2 ORDER BY id LIMIT ?3",
    )?;
    stmt.query_map(params![after_id as i64, since_ms, limit as i64], row_event)?
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> TaskRecord {
        TaskRecord {
            task_id: id.into(),
            created_ms: 1000,
            finished_ms: None,
            api: "operate_proc".into(),
            op_type: 0,
            peer_uid: Some(0),
            peer_pid: Some(42),
            username: "admin".into(),
            items: vec![TaskItemRecord {
                result_key: "0:0:1.2.3.4:ns:a".into(),
                key: Some(ProcKey::new("ns", "a")),
                op_type: 0,
                result: None,
                definition: None,
                target: None,
            }],
        }
    }

    #[tokio::test]
    async fn round_trip_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        {
            let (s, loaded) = Store::open(&db, 100, 100, 0).unwrap();
            assert!(loaded.definitions.is_empty());
            let k = ProcKey::new("ns", "a");
            s.put_definition(&k, "{\"x\":1}".into()).await.unwrap();
            s.put_state(&k, "{\"flag\":1}".into()).await.unwrap();
            s.insert_task(task("GSETASK:1")).await.unwrap();
            s.finish_item("GSETASK:1", 0, KeyResult::ok("done"));
            s.insert_event(Event {
                id: 7,
                ts_ms: 5,
                key: "ns/a".into(),
                kind: "started".into(),
                message: "m".into(),
                data: serde_json::json!({"pid": 3}),
            });
            s.flush().await.unwrap();
        }
        let (s, loaded) = Store::open(&db, 100, 100, 0).unwrap();
        assert_eq!(loaded.definitions, vec!["{\"x\":1}".to_string()]);
        assert_eq!(loaded.states.len(), 1);
        assert_eq!(loaded.tasks.len(), 1);
        assert_eq!(loaded.tasks[0].items[0].result, Some(KeyResult::ok("done")));
        assert_eq!(loaded.events[0].id, 7);
        assert!(s.read_task("GSETASK:1").unwrap().is_some());
        assert!(s.read_task("nope").unwrap().is_none());
        s.delete_definition(&ProcKey::new("ns", "a")).await.unwrap();
        drop(s);
        let (_s, loaded) = Store::open(&db, 100, 100, 0).unwrap();
        assert!(loaded.definitions.is_empty());
        assert!(loaded.states.is_empty());
    }

    #[tokio::test]
    async fn background_states_coalesce_and_never_overtake_ordered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let (a, b) = (ProcKey::new("ns", "a"), ProcKey::new("ns", "b"));
        {
            let (s, _) = Store::open(&db, 10, 10, 0).unwrap();
            s.put_definition(&a, "{}".into()).await.unwrap();
            s.put_definition(&b, "{}".into()).await.unwrap();
            // Thousands of background writes of one key: one pending state, one marker.
            for i in 0..5000 {
                s.put_state_bg(&a, format!("{{\"n\":{i}}}"));
            }
            {
                let d = s.dirty.lock().unwrap();
                assert!(d.states.len() <= 1);
            }
            // An ordered write supersedes the pending one; a later background one wins after.
            s.put_state_bg(&b, "{\"v\":1}".into());
            let ordered = s.put_state_queued(&b, "{\"v\":2}".into());
            s.put_state_bg(&b, "{\"v\":3}".into());
            ordered.await.unwrap();
            s.flush().await.unwrap();
        }
        let (_s, loaded) = Store::open(&db, 10, 10, 0).unwrap();
        let mut st = loaded.states;
        st.sort();
        assert_eq!(
            st,
            vec![
                (a, "{\"n\":4999}".to_string()),
                (b, "{\"v\":3}".to_string())
            ]
        );
    }

    /// At start the task history is read newest first only up to the in-memory history's
    /// byte bound, not all of it and then trimmed.
    #[tokio::test]
    async fn a_start_reads_the_newest_tasks_up_to_the_history_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let big = crate::tasks::BOOK_BYTES / 3;
        {
            let (s, _) = Store::open(&db, 100, 100, 0).unwrap();
            for n in 0..5 {
                let mut t = task(&format!("GSETASK:{n}"));
                t.created_ms = 1000 + n;
                t.finished_ms = Some(2000);
                t.items[0].result = Some(KeyResult::ok("x".repeat(big)));
                s.insert_task(t).await.unwrap();
            }
            s.flush().await.unwrap();
        }
        let (_, loaded) = Store::open(&db, 100, 100, 0).unwrap();
        let ids: Vec<&str> = loaded.tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["GSETASK:3", "GSETASK:4"], "the newest, oldest first");
    }

    /// A task still running when the agent stopped is read at start however old it is
    /// (past the byte bound, past the count), so that the book closes it as interrupted:
    /// none stays "processing" for ever.
    #[tokio::test]
    async fn a_start_reads_every_unfinished_task_however_old() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let big = crate::tasks::BOOK_BYTES / 3;
        {
            let (s, _) = Store::open(&db, 100, 100, 0).unwrap();
            s.insert_task(task("GSETASK:0")).await.unwrap();
            for n in 1..6 {
                let mut t = task(&format!("GSETASK:{n}"));
                t.created_ms = 1000 + n;
                t.finished_ms = Some(2000);
                t.items[0].result = Some(KeyResult::ok("x".repeat(big)));
                s.insert_task(t).await.unwrap();
            }
            s.flush().await.unwrap();
        }
        for recent in [100, 2] {
            let (_, loaded) = Store::open(&db, recent, 100, 0).unwrap();
            let ids: Vec<&str> = loaded.tasks.iter().map(|t| t.task_id.as_str()).collect();
            assert_eq!(
                ids,
                ["GSETASK:0", "GSETASK:4", "GSETASK:5"],
                "recent {recent}"
            );
        }
    }

    #[test]
    fn only_what_a_later_write_may_depend_on_takes_the_reserve() {
        let k = ProcKey::new("ns", "a");
        for op in [
            Op::PutState(k.clone(), "{}".into()),
            Op::PutDefinition(k.clone(), "{}".into(), None),
            Op::DeleteDefinition(k.clone()),
            Op::InsertTask(task("GSETASK:1")),
            Op::FinishItem {
                task_id: "GSETASK:1".into(),
                idx: 0,
                result: KeyResult::ok(""),
            },
        ] {
            assert!(may_use_reserve(&op), "{op:?}");
        }
        let ev = Event {
            id: 1,
            ts_ms: 1,
            key: "ns/a".into(),
            kind: "started".into(),
            message: String::new(),
            data: serde_json::Value::Null,
        };
        for op in [Op::InsertAudit(task("GSETASK:2")), Op::InsertEvent(ev)] {
            assert!(!may_use_reserve(&op), "{op:?}");
        }
    }

    #[test]
    fn the_retry_queue_keeps_one_state_per_key() {
        let k = ProcKey::new("ns", "k");
        let mut retry: Vec<Op> = (0..10)
            .map(|i| Op::PutState(k.clone(), i.to_string()))
            .chain([Op::FlushStates])
            .collect();
        bound_retry(&mut retry);
        assert_eq!(retry.len(), 1);
        assert!(matches!(&retry[0], Op::PutState(_, j) if j == "9"));
    }

    #[tokio::test]
    async fn state_without_a_definition_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let k = ProcKey::new("ns", "gone");
        {
            let (s, _) = Store::open(&db, 10, 10, 0).unwrap();
            s.put_definition(&k, "{}".into()).await.unwrap();
            s.delete_definition(&k).await.unwrap();
            // A late background write for the removed process.
            s.put_state_bg(&k, "{\"managed\":true}".into());
            s.flush().await.unwrap();
        }
        let (_s, loaded) = Store::open(&db, 10, 10, 0).unwrap();
        assert!(loaded.states.is_empty(), "{:?}", loaded.states);
    }

    #[tokio::test]
    async fn a_v1_database_is_migrated_and_keeps_its_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        {
            // As the agent at f37add0 left it.
            let c = Connection::open(&db).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute_batch(
                "INSERT INTO tasks VALUES ('GSETASK:1', 1000, 1001, 'operate_proc', 0, 0, 7, 'u');
                 INSERT INTO task_items (task_id, idx, result_key, namespace, name, op_type, done, error_code, error_msg, content)
                 VALUES ('GSETASK:1', 0, 'k', 'ns', 'a', 0, 1, 0, 'success', '');",
            )
            .unwrap();
        }
        let (s, loaded) = Store::open(&db, 10, 10, 0).unwrap();
        assert_eq!(loaded.tasks.len(), 1);
        assert_eq!(loaded.tasks[0].items[0].definition, None);
        assert_eq!(loaded.tasks[0].items[0].result, Some(KeyResult::ok("")));
        // The new column takes notes, with the definition write and on its own.
        s.insert_task(task("GSETASK:2")).await.unwrap();
        let k = ProcKey::new("ns", "a");
        let note = |change: &str| ItemNote {
            task_id: "GSETASK:2".into(),
            idx: 0,
            change: change.into(),
        };
        s.put_definition_noted(&k, "{}".into(), Some(note("registered")))
            .await
            .unwrap();
        let got = s.read_task("GSETASK:2").unwrap().unwrap();
        assert_eq!(got.items[0].definition.as_deref(), Some("registered"));
        s.note_item(note("unchanged"));
        s.flush().await.unwrap();
        drop(s);
        let c = Connection::open(&db).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        drop(c);
        let (s, _) = Store::open(&db, 10, 10, 0).unwrap();
        let got = s.read_task("GSETASK:2").unwrap().unwrap();
        assert_eq!(got.items[0].definition.as_deref(), Some("unchanged"));
    }

    #[tokio::test]
    async fn a_v2_database_gains_item_targets_and_its_items_keep_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        {
            // As the agent of schema v2 left it.
            let c = Connection::open(&db).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute_batch(SCHEMA_V2).unwrap();
            c.execute_batch(
                "INSERT INTO tasks VALUES ('GSETASK:1', 1000, 1001, 'operate_proc', 0, 0, 7, 'u');
                 INSERT INTO task_items (task_id, idx, result_key, namespace, name, op_type, done, error_code, error_msg, content)
                 VALUES ('GSETASK:1', 0, '0:0:1.2.3.4:ns:a', 'ns', 'a', 0, 1, 0, 'success', '');",
            )
            .unwrap();
        }
        let (s, loaded) = Store::open(&db, 10, 10, 0).unwrap();
        let old = &loaded.tasks[0].items[0];
        assert_eq!(
            (old.result_key.as_str(), &old.target),
            ("0:0:1.2.3.4:ns:a", &None)
        );
        let mut t = task("GSETASK:2");
        let hosts = [
            ItemHost::Host {
                ip: "1.2.3.4".into(),
                bk_cloud_id: 2,
                bk_supplier_id: Some(3),
            },
            ItemHost::Host {
                ip: "fe80::1".into(),
                bk_cloud_id: 0,
                bk_supplier_id: None,
            },
            ItemHost::Agent("0:1.2.3.4".into()),
        ];
        t.items = hosts
            .iter()
            .map(|h| TaskItemRecord {
                target: Some(h.clone()),
                ..t.items[0].clone()
            })
            .collect();
        s.insert_task(t).await.unwrap();
        let got = s.read_task("GSETASK:2").unwrap().unwrap();
        let targets: Vec<Option<ItemHost>> = got.items.iter().map(|i| i.target.clone()).collect();
        assert_eq!(targets, hosts.map(Some).to_vec());
        // A target this agent cannot read falls back to the written key.
        s.flush().await.unwrap();
        drop(s);
        let c = Connection::open(&db).unwrap();
        c.execute("UPDATE task_items SET target = '{\"moon\": 1}' WHERE task_id = 'GSETASK:2' AND idx = 0", [])
            .unwrap();
        drop(c);
        let (s, _) = Store::open(&db, 10, 10, 0).unwrap();
        assert_eq!(
            s.read_task("GSETASK:2").unwrap().unwrap().items[0].target,
            None
        );
    }

    #[test]
    fn corrupt_file_is_refused_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        std::fs::write(&db, vec![0x42u8; 8192]).unwrap();
        match Store::open(&db, 10, 10, 0) {
            Err(StoreError::Corrupt { path, .. }) => assert!(path.contains("state.db")),
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("opened a corrupt database"),
        }
        // Untouched: never reset.
        assert_eq!(std::fs::read(&db).unwrap(), vec![0x42u8; 8192]);
    }

    #[tokio::test]
    async fn prune_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&dir.path().join("s.db"), 10, 10, 0).unwrap();
        for i in 0..20 {
            let mut t = task(&format!("T{i}"));
            t.created_ms = i;
            s.insert_task(t).await.unwrap();
        }
        s.prune(5, 10, 10);
        s.flush().await.unwrap();
        assert!(s.read_task("T4").unwrap().is_none());
        assert!(s.read_task("T19").unwrap().is_some());
        assert!(s.read_task("T9").unwrap().is_none());
        assert!(s.read_task("T10").unwrap().is_some());
    }
}
