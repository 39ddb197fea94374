//! operate_proc (v1 and v2) and operate_proc_multi: decoding, authorizing by effect and planning
//! the items of a task, submitting it; get_proc_operate_result (v1 and v2), which key every
//! task's items in their own form ([`task_results`]).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use super::ApiError;
use super::auth::Access;
use super::limits::{self, KeyBudget, MAX_MULTI_ITEMS};
use super::submit::{Plan, Work, submit};
use crate::host::HostIdentity;
use crate::proto::{
    KeyResult, OpType, OperateMultiReq, OperateProcReq, TaskIdResp, TaskQuery, TaskResults, codes,
};
use crate::spec::{FieldError, Labels, ProcKey, ProcSpec};
use crate::store::TaskItemRecord;
use crate::supervisor::Engine;

use super::handlers::*;

pub(crate) async fn operate_proc(
    engine: &Arc<Engine>,
    body: &[u8],
    access: &Access,
    api: &str,
    style: KeyStyle,
) -> Result<Value, ApiError> {
    let d = decode_operate(body)?;
    let (code, plans) = plan_request(engine, access, d, style)?;
    let task_id = submit(engine, api, code, plans, access, username(body)).await?;
    Ok(to_data(&TaskIdResp { task_id }))
}

/// A decoded and validated operate request (`operate_proc`, or one item of
/// `operate_proc_multi`).
#[derive(Debug)]
pub struct OperateDecoded {
    pub code: i64,
    pub op: OpType,
    pub key: ProcKey,
    pub targets: Vec<Target>,
    /// The request named hosts by `agent_id_list` (results use the v2 key style).
    pub agent_ids: bool,
    /// The inline spec: `Some(Err(message))` fails this request's keys only (per-key 830),
    /// so the rest of a batch still runs.
    pub spec: Option<Result<ProcSpec, String>>,
    pub labels: Labels,
}

/// Validate one operate request whose field paths start with `at` (no side effects).
/// Request-level problems (op_type, meta, hosts) are errors.
pub fn validate_operate(req: &OperateProcReq, at: &str) -> Result<OperateDecoded, ApiError> {
    let Some(code) = req.op_type else {
        return Err(ApiError::bad(format!("{at}op_type: is required")));
    };
    let op = OpType::from_code(code).ok_or_else(|| {
        ApiError::new(
            codes::UNKNOWN_OP_TYPE,
            format!("{at}op_type: {code} is not a valid operation (0 start, 1 stop, 2 status, 3 register managed, 4 unregister managed, 7 restart, 8 reload, 9 kill)"),
        )
    })?;
    let key = req.meta.key();
    check_key(&key).map_err(|e| ApiError::bad(format!("{at}{}", e.message)))?;
    let targets = targets(&req.hosts, &req.agent_id_list)
        .map_err(|e| ApiError::bad(format!("{at}{}", e.message)))?;
    Ok(OperateDecoded {
        code,
        op,
        key,
        targets,
        agent_ids: !req.agent_id_list.is_empty(),
        spec: req
            .spec
            .as_ref()
            .map(|w| w.to_spec().map_err(|e| FieldError::joined(&e))),
        labels: req.meta.labels.clone(),
    })
}

/// Decode and validate an `operate_proc` body (no side effects).
pub fn decode_operate(body: &[u8]) -> Result<OperateDecoded, ApiError> {
    let req: OperateProcReq = parse(body)?;
    validate_operate(&req, "")
}

/// Decode and validate an `operate_proc_multi` body (no side effects).
pub fn decode_multi(body: &[u8]) -> Result<Vec<OperateDecoded>, ApiError> {
    // Items as JSON first, so an item's error names its index.
    let req: OperateMultiReq<Value> = parse(body)?;
    if req.proc_operate_req.is_empty() {
        return Err(ApiError::bad(
            "proc_operate_req: at least one item is required",
        ));
    }
    limits::check_len(
        "proc_operate_req",
        req.proc_operate_req.len(),
        MAX_MULTI_ITEMS,
        "items per call",
    )?;
    let mut budget = KeyBudget::new("proc_operate_req");
    let mut out = Vec::with_capacity(req.proc_operate_req.len());
    for (i, item) in req.proc_operate_req.into_iter().enumerate() {
        let at = format!("proc_operate_req[{i}].");
        let r: OperateProcReq = serde_path_to_error::deserialize(item).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                ApiError::bad(format!("proc_operate_req[{i}]: {inner}"))
            } else {
                ApiError::bad(format!("{at}{path}: {inner}"))
            }
        })?;
        budget.take(if r.agent_id_list.is_empty() {
            r.hosts.len()
        } else {
            r.agent_id_list.len()
        })?;
        out.push(validate_operate(&r, &at)?);
    }
    Ok(out)
}

/// Check the caller's rights on a validated operate request and plan its items. An invalid
/// inline spec fails its own keys (per-key 830, message naming the field).
pub(crate) fn plan_request(
    engine: &Engine,
    access: &Access,
    d: OperateDecoded,
    style: KeyStyle,
) -> Result<(i64, Vec<Plan>), ApiError> {
    let style = if d.agent_ids { KeyStyle::V2 } else { style };
    let (key, op, tg) = (&d.key, d.op, &d.targets);
    // A status query never uses its inline spec (GSEKit's status sync sends the full spec):
    // it answers for the registered definition, or 851 for an unregistered key.
    let spec = if op.mutating() { d.spec } else { None };
    let plans = match spec {
        Some(Err(errs)) => {
            check_op_access(engine, access, op, key, None)?;
            distinct_targets(tg, style, key)
                .into_iter()
                .map(|(rk, t)| Plan {
                    result_key: rk,
                    target: t.item_host(),
                    key: Some(key.clone()),
                    op,
                    immediate: Some(if is_me(engine, t) {
                        KeyResult::err(codes::SPEC_INVALID, format!("invalid spec: {errs}"))
                    } else {
                        not_me(engine, t)
                    }),
                    work: Work::Operate(None),
                })
                .collect()
        }
        other => {
            let inline = other.and_then(|r| r.ok()).map(|s| (s, d.labels));
            check_op_access(engine, access, op, key, inline.as_ref().map(|(s, _)| s))?;
            plan_items(engine, tg, style, key, op, inline)
        }
    };
    Ok((d.code, plans))
}

/// Decode a `get_proc_operate_result` body: the task id.
pub fn decode_task_query(body: &[u8]) -> Result<String, ApiError> {
    let q: TaskQuery = parse(body)?;
    if q.task_id.trim().is_empty() {
        return Err(ApiError::bad("task_id: is required"));
    }
    Ok(q.task_id.trim().to_string())
}

/// Build the items of one (meta, hosts) pair, deduplicated by result key.
pub fn plan_items(
    engine: &Engine,
    tg: &[Target],
    style: KeyStyle,
    key: &ProcKey,
    op: OpType,
    inline: Option<(ProcSpec, Labels)>,
) -> Vec<Plan> {
    // A process that is not registered, with no spec sent to register it, is answered now
    // on this host (but for a status query, whose answer carries the time it was taken), as
    // another host's is: such an item acts on nothing (so, on a full disk, it cannot make
    // its task urgent: `tasks::acts_on_full_disk`).
    let unknown =
        (inline.is_none() && op != OpType::Status && !engine.is_registered(key)).then(|| {
            let answer = crate::supervisor::handle::Operated {
                result: Ok(crate::supervisor::lifecycle::Outcome::NotRegistered),
                not_durable: None,
                view: None,
            };
            super::wire::key_result(key, op, &answer, &engine.host)
        });
    distinct_targets(tg, style, key)
        .into_iter()
        .map(|(rk, t)| {
            let me = is_me(engine, t);
            let immediate = if me {
                unknown.clone()
            } else {
                Some(not_me(engine, t))
            };
            Plan {
                result_key: rk,
                target: t.item_host(),
                key: Some(key.clone()),
                op,
                work: Work::Operate(if me && immediate.is_none() {
                    inline.clone()
                } else {
                    None
                }),
                immediate,
            }
        })
        .collect()
}

pub(crate) async fn operate_proc_multi(
    engine: &Arc<Engine>,
    body: &[u8],
    access: &Access,
) -> Result<Value, ApiError> {
    let items = decode_multi(body)?;
    let mut plans: Vec<Plan> = Vec::new();
    let mut first_op = None;
    // Which item each result key came from: one task answers one result per key, so two
    // items that name the same key must ask the same thing (then they are one item); two
    // different asks on one key are refused, never silently dropped.
    let mut origin: Vec<usize> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, d) in items.into_iter().enumerate() {
        let (code, item_plans) = plan_request(engine, access, d, KeyStyle::V2)?;
        first_op.get_or_insert(code);
        for p in item_plans {
            match index.get(&p.result_key).copied() {
                None => {
                    index.insert(p.result_key.clone(), plans.len());
                    plans.push(p);
                    origin.push(i);
                }
                Some(j) => {
                    let q = &plans[j];
                    if q.op != p.op || q.work != p.work || q.immediate != p.immediate {
                        return Err(ApiError::bad(format!(
                            "proc_operate_req[{i}]: its key {} is already operated on by proc_operate_req[{}] ({} vs {}); one task answers one result per key: send them in separate calls",
                            p.result_key,
                            origin[j],
                            q.op.name(),
                            p.op.name()
                        )));
                    }
                }
            }
        }
    }
    let task_id = submit(
        engine,
        "operate_proc_multi",
        first_op.unwrap_or(-1),
        plans,
        access,
        username(body),
    )
    .await?;
    Ok(to_data(&TaskIdResp { task_id }))
}

/// get_proc_operate_result (`style` [`KeyStyle::V1`]) and get_proc_operate_result_v2
/// ([`KeyStyle::V2`]): every item of the task under the key this endpoint writes
/// ([`polled_key`]), whatever API submitted it.
pub(crate) async fn get_result(
    engine: &Engine,
    body: &[u8],
    style: KeyStyle,
) -> Result<Value, ApiError> {
    let task_id = decode_task_query(body)?;
    let Some(t) = engine.tasks.get(&task_id).await else {
        return Err(ApiError::new(
            codes::NOT_FOUND,
            format!("task {task_id:?} does not exist"),
        ));
    };
    Ok(to_data(&task_results(t.items, style, &engine.host)))
}

/// The results of a task's items by the key `style` writes. Items recorded without a host
/// (synchronous requests' entries, tasks of an older agent) keep the key they were written
/// with. Items of one request are distinct in the request's own key form, but two may share
/// the other form (this agent named by its agent id and by `cloud:ip`, or two suppliers of
/// one `cloud:ip`): such a key answers 115 while any of its items runs, then the first of
/// them (in request order) that names this agent, else the first.
pub fn task_results(items: Vec<TaskItemRecord>, style: KeyStyle, me: &HostIdentity) -> TaskResults {
    let mut groups: HashMap<String, Vec<KeyResult>> = HashMap::new();
    for it in items {
        let rk = match (&it.target, &it.key) {
            (Some(h), Some(k)) => polled_key(h, style, k, me),
            _ => it.result_key,
        };
        groups
            .entry(rk)
            .or_default()
            .push(it.result.unwrap_or_else(KeyResult::running));
    }
    groups
        .into_iter()
        .map(|(rk, rs)| {
            let pending = rs.iter().find(|r| r.error_code == codes::RUNNING);
            let mine = rs.iter().find(|r| r.error_code != codes::AGENT_NOT_FOUND);
            let r = pending.or(mine).or(rs.first()).cloned();
            (rk, r.unwrap_or_else(KeyResult::running))
        })
        .collect()
}
