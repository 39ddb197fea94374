//! The agent's own listings: `procs` (definitions and state, env values shown only to those
//! who may change the process) and `tasks` (the task log).

use serde_json::Value;

use super::ApiError;
use super::auth::Access;
use crate::proto::{
    KeyResult, ProcList, ProcsQuery, TaskItemView, TaskList, TaskView, TasksQuery, codes,
};
use crate::spec::Labels;
use crate::supervisor::Engine;

use super::handlers::*;

/// Decode a `procs` body: the filter and its `key=value` label selectors.
pub fn decode_procs(body: &[u8]) -> Result<(ProcsQuery, Vec<(String, String)>), ApiError> {
    let q: ProcsQuery = if body.iter().all(|b| b.is_ascii_whitespace()) {
        ProcsQuery::default()
    } else {
        parse(body)?
    };
    let mut selectors = Vec::new();
    for s in &q.labels {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => selectors.push((k.to_string(), v.to_string())),
            _ => return Err(ApiError::bad(format!("labels: {s:?} must be KEY=VALUE"))),
        }
    }
    Ok((q, selectors))
}

/// Decode a `tasks` body: how many recent tasks to list, or the one task to show.
pub fn decode_tasks(body: &[u8]) -> Result<(usize, Option<String>), ApiError> {
    let q: TasksQuery = if body.iter().all(|b| b.is_ascii_whitespace()) {
        TasksQuery::default()
    } else {
        parse(body)?
    };
    let id = q
        .task_id
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    Ok((q.limit.unwrap_or(50).clamp(1, 1000) as usize, id))
}

/// What a process's `env` shows to a caller who may not change that process.
pub const HIDDEN_ENV_VALUE: &str = "(hidden)";

/// `procs`, answered as the whole envelope already encoded: the entries are serialized
/// straight from their types (building a `Value` of a thousand entries first cost most of
/// the time). Blocking work for large registries: run off the async workers.
pub(crate) fn procs_encoded(
    engine: &Engine,
    body: &[u8],
    access: &Access,
) -> Result<Vec<u8>, ApiError> {
    let (q, selectors) = decode_procs(body)?;
    let list: Vec<crate::proto::ProcDetail> = engine
        .views_where(|def| {
            (q.namespace.is_empty() || def.key.namespace == q.namespace)
                && (q.name.is_empty() || def.key.name == q.name)
                && selectors
                    .iter()
                    .all(|(k, v)| label_matches(&def.labels, k, v))
        })
        .iter()
        .map(|v| {
            let mut d = super::wire::detail(v, !q.brief);
            let (mem, cpu) = engine.enforcement(&v.def.spec);
            (d.mem_limit_by, d.cpu_limit_by) = (mem.to_string(), cpu.to_string());
            // Environment values often carry credentials: only a caller who may change
            // the process sees them; others see the names.
            if let Some(spec) = &mut d.spec
                && access.may_use_account(&spec.account).is_err()
            {
                for v in spec.env.values_mut() {
                    *v = HIDDEN_ENV_VALUE.to_string();
                }
            }
            d
        })
        .collect();
    // About what an entry takes (brief: 0.8 KB, with its spec: 1.6 KB), so that the buffer
    // is not grown and copied again and again (memmove was the largest share of the work).
    let mut buf = Vec::with_capacity(256 + list.len() * if q.brief { 900 } else { 1800 });
    let env = crate::proto::Envelope {
        result: true,
        code: codes::SUCCESS,
        message: "success".to_string(),
        data: Some(ProcList {
            count: list.len(),
            list,
        }),
        request_id: crate::util::request_id(),
    };
    serde_json::to_writer(&mut buf, &env)
        .map_err(|e| ApiError::new(codes::INTERNAL, format!("procs: {e}")))?;
    Ok(buf)
}

/// A label selector `k=v` matches a string value equal to `v`, or a non-string value whose
/// JSON text is `v`.
pub fn label_matches(labels: &Labels, k: &str, v: &str) -> bool {
    match labels.get(k) {
        Some(Value::String(s)) => s == v,
        Some(other) => *other == v,
        None => false,
    }
}

pub(crate) async fn tasks(engine: &Engine, body: &[u8]) -> Result<Value, ApiError> {
    let (limit, task_id) = decode_tasks(body)?;
    let found = match task_id {
        Some(id) => match engine.tasks.get(&id).await {
            Some(t) => vec![t],
            None => {
                return Err(ApiError::new(
                    codes::NOT_FOUND,
                    format!("task {id:?} does not exist"),
                ));
            }
        },
        None => engine.tasks.recent(limit),
    };
    let list: Vec<TaskView> = found
        .into_iter()
        .map(|t| TaskView {
            task_id: t.task_id,
            api: t.api,
            op_type: t.op_type,
            created_ms: t.created_ms,
            finished_ms: t.finished_ms,
            peer_uid: t.peer_uid,
            peer_pid: t.peer_pid,
            username: t.username,
            items: t
                .items
                .into_iter()
                .map(|i| TaskItemView {
                    key: match (&i.target, &i.key) {
                        (Some(h), Some(k)) => polled_key(h, KeyStyle::V1, k, &engine.host),
                        _ => i.result_key,
                    },
                    result: i.result.unwrap_or_else(KeyResult::running),
                    definition: i.definition,
                })
                .collect(),
        })
        .collect();
    Ok(to_data(&TaskList { list }))
}
