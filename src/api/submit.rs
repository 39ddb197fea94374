//! The one task-submission path: planned items in, a task id out. `operate_proc`,
//! `operate_proc_multi`, `operate_process` (v2) and config reloads each plan their items
//! and hand them to [`submit`], which builds the task record (committed before the id is
//! returned) and runs the items that are not answered at once, each in the background.
//! [`record`] is the one place a [`TaskRecord`] is built, also for the synchronous
//! requests' history entries.

use std::sync::Arc;

use super::ApiError;
use super::auth::Access;
use super::handlers::writer;
use crate::proto::{ItemHost, KeyResult, OpType, codes};
use crate::spec::{Labels, ProcKey, ProcSpec};
use crate::store::{StoreError, TaskItemRecord, TaskRecord};
use crate::supervisor::Engine;

/// What an item does when it runs.
// A plan is short-lived and bounded per request (`api/limits.rs`); boxing the spec would only
// add an allocation per item.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// The operation `op`, after storing the inline spec (and labels) when there is one.
    Operate(Option<(ProcSpec, Labels)>),
    /// Stop the process and start it again with its current definition (a reload).
    Replace,
}

/// One item of an operate task.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The item's key as its request writes it: what one request deduplicates on, and what
    /// the task history shows. Result endpoints write their own form from `target`.
    pub result_key: String,
    /// The host the request named for this item.
    pub target: ItemHost,
    pub key: Option<ProcKey>,
    pub op: OpType,
    /// `None`: run the work; `Some`: answered at once.
    pub immediate: Option<KeyResult>,
    pub work: Work,
}

/// The task could not be recorded (nothing ran).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SubmitError(pub StoreError);

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        ApiError::new(
            codes::UNAVAILABLE,
            format!("cannot record the task: {}", e.0),
        )
    }
}

/// A task record: who asked (`access`, `user`), which API and op type, its items; created
/// now, and `finished` now too for a synchronous request's history entry.
pub fn record(
    task_id: String,
    api: &str,
    op_code: i64,
    access: &Access,
    user: String,
    items: Vec<TaskItemRecord>,
    finished: bool,
) -> TaskRecord {
    let now = crate::util::unix_millis();
    TaskRecord {
        task_id,
        created_ms: now,
        finished_ms: finished.then_some(now),
        api: api.to_string(),
        op_type: op_code,
        peer_uid: access.peer.map(|p| p.uid),
        peer_pid: access.peer.and_then(|p| p.pid),
        username: user,
        items,
    }
}

/// Record a task (committed before the id is returned) and run its items in the background.
pub async fn submit(
    engine: &Arc<Engine>,
    api: &str,
    op_code: i64,
    plans: Vec<Plan>,
    access: &Access,
    user: String,
) -> Result<String, SubmitError> {
    let task_id = engine.tasks.next_id();
    let items = plans
        .iter()
        .map(|p| TaskItemRecord {
            result_key: p.result_key.clone(),
            key: p.key.clone(),
            op_type: p.op.code(),
            result: p.immediate.clone(),
            definition: None,
            target: Some(p.target.clone()),
        })
        .collect();
    let rec = record(task_id.clone(), api, op_code, access, user, items, false);
    let all_done = rec.items.iter().all(|i| i.result.is_some());
    engine.tasks.create(rec).await.map_err(SubmitError)?;
    if all_done && let Some(first) = plans.first() {
        let r = first.immediate.clone().unwrap_or_else(KeyResult::running);
        engine.tasks.finish_item(&task_id, 0, r).await;
    }
    for (idx, p) in plans.into_iter().enumerate() {
        if p.immediate.is_some() {
            continue;
        }
        let Some(key) = p.key else { continue };
        let engine = engine.clone();
        let tid = task_id.clone();
        let w = writer(access, Some((tid.clone(), idx)));
        tokio::spawn(async move {
            let r = match p.work {
                Work::Operate(inline) => {
                    let done = engine.operate(&key, p.op, inline, &w).await;
                    super::wire::key_result(&key, p.op, &done, &engine.host)
                }
                Work::Replace => super::reload::replace_process(&engine, key).await,
            };
            engine.tasks.finish_item(&tid, idx, r).await;
        });
    }
    Ok(task_id)
}
