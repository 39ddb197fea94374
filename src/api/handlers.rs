//! One function per API, behind [`call_authorized`].
//!
//! Request decoding names the failing field (`meta.name: missing field`); the body is parsed
//! once into the request type, validated (the sizes of [`super::limits`] included),
//! authorized, and only then acted upon. Bad input never changes anything stored.
//!
//! Authorization is by effect: a status query (op_type 2) is a read whatever it carries (an
//! inline spec is ignored: it never registers, replaces or runs anything); anything that
//! writes a definition or acts on a process needs the write role and the account rule for
//! both the registered definition and the inline one, checked before the task is recorded
//! and again under the process's operation lock when the item runs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::auth::{self, Access};
use super::limits::{self, KeyBudget, MAX_HOSTS, MAX_MULTI_ITEMS};
use super::submit::{Plan, Work, record, submit};
use super::{ApiError, AppState, ok};
use crate::proto::{
    EventList, HostWire, KeyResult, MetaHostsReq, OpType, OperateMultiReq, OperateProcReq,
    ProcInfos, ProcList, ProcsQuery, RegisterReq, SyncProcStatusReq, TaskIdResp, TaskItemView,
    TaskList, TaskQuery, TaskResults, TaskView, TasksQuery, codes,
};
use crate::spec::{FieldError, Labels, ProcKey, ProcSpec, validate_key};
use crate::store::TaskItemRecord;
use crate::supervisor::Engine;
use crate::supervisor::defs::{self, PutMode, Writer};

/// An answer's `data` built from its [`crate::proto`] type (the type the CLI reads it as).
pub fn to_data<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// Decode a JSON body into `T`, naming the failing field. Only a whole, valid UTF-8 JSON
/// document is accepted: invalid UTF-8 anywhere (also inside a string the request type
/// ignores, which serde would skip unchecked) and anything after the document are refused.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if let Err(e) = std::str::from_utf8(body) {
        let at = e.valid_up_to();
        let line = body[..at].iter().filter(|b| **b == b'\n').count() + 1;
        let column = at
            - body[..at]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        let what = match e.error_len() {
            Some(_) => format!("invalid byte 0x{:02x}", body.get(at).copied().unwrap_or(0)),
            None => "a truncated character".to_string(),
        };
        return Err(ApiError::bad(format!(
            "the request body is not valid UTF-8: {what} at offset {at} (line {line}, column {column})"
        )));
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad(
            "the request body is empty; a JSON object is required",
        ));
    }
    // Every API takes an object; say so instead of naming a Rust type ("expected struct ...").
    if let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace())
        && *first != b'{'
    {
        let what = match *first {
            b'[' => "an array",
            b'"' => "a string",
            b't' | b'f' => "a boolean",
            b'n' => "null",
            b'-' | b'0'..=b'9' => "a number",
            _ => "not JSON",
        };
        let msg = if what == "not JSON" {
            "malformed JSON: the request body must be a JSON object".to_string()
        } else {
            format!("the request body must be a JSON object, got {what}")
        };
        return Err(ApiError::bad(msg));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        Ok(v) => match de.end() {
            Ok(()) => Ok(v),
            Err(e) => Err(ApiError::bad(format!(
                "malformed JSON: {e} after the request object"
            ))),
        },
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = if inner.is_syntax() || inner.is_eof() {
                format!("malformed JSON: {inner}")
            } else if path == "." || path.is_empty() {
                format!("invalid request: {inner}")
            } else {
                format!("invalid request: {path}: {inner}")
            };
            Err(ApiError::bad(msg))
        }
    }
}

/// `bk_username` of the ESB common args, for the audit trail (`bk_app_secret` and
/// `bk_token` are accepted and never stored or logged).
pub fn username(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Common {
        #[serde(default, deserialize_with = "crate::proto::de_str")]
        bk_username: String,
    }
    serde_json::from_slice::<Common>(body)
        .map(|c| c.bk_username.chars().take(128).collect())
        .unwrap_or_default()
}

/// Dispatch an API call by name for a caller already authorized (see [`auth::authorize`]).
pub async fn call_authorized(
    engine: &Arc<Engine>,
    api: &str,
    body: &[u8],
    access: &Access,
) -> Result<Value, ApiError> {
    match api {
        "operate_proc" | "operate_proc_v2" => {
            operate_proc(engine, body, access, api, KeyStyle::V1).await
        }
        "operate_proc_multi" => operate_proc_multi(engine, body, access).await,
        "get_proc_operate_result" | "get_proc_operate_result_v2" => get_result(engine, body).await,
        "get_proc_status" => get_proc_status(engine, body, KeyStyle::V1),
        "get_proc_status_v2" => get_proc_status(engine, body, KeyStyle::V2),
        "sync_proc_status" => sync_proc_status(engine, body),
        "register_proc_info" => register(engine, body, access, PutMode::Register, api).await,
        "update_proc_info" => register(engine, body, access, PutMode::Upsert, api).await,
        "unregister_proc_info" => unregister(engine, body, access).await,
        "procs" => procs(engine, body, access),
        "tasks" => tasks(engine, body).await,
        "operate_process" => super::gsekit::operate_process(engine, body, access).await,
        "process_status" => {
            // Selection and ordering are linear in the rows but not trivial at thousands of
            // them: off the async workers, so health and other callers never wait on it.
            let (e, b) = (Arc::clone(engine), body.to_vec());
            tokio::task::spawn_blocking(move || super::gsekit::process_status(&e, &b))
                .await
                .map_err(|e| ApiError::new(codes::INTERNAL, format!("process_status: {e}")))?
        }
        other => Err(ApiError {
            http: axum::http::StatusCode::NOT_FOUND,
            code: codes::NOT_FOUND,
            message: format!("unknown API {other:?}"),
        }),
    }
}

/// How per-host result keys are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// `cloud:supplier:ip:ns:name` (v1 documents).
    V1,
    /// `cloud:ip:ns:name` (v2 and operate_proc_multi).
    V2,
}

/// A host named by a request.
#[derive(Debug, Clone)]
pub enum Target {
    Host(HostWire),
    Agent(String),
}

/// The hosts of a request: `agent_id_list` when given (then `hosts` is ignored), else `hosts`;
/// at most [`MAX_HOSTS`] of them (duplicates count), checked before anything is built.
pub fn targets(hosts: &[HostWire], agent_ids: &[String]) -> Result<Vec<Target>, ApiError> {
    if agent_ids.is_empty() {
        limits::check_len(
            "hosts",
            hosts.len(),
            MAX_HOSTS,
            "hosts per request (or item)",
        )?;
    } else {
        limits::check_len(
            "agent_id_list",
            agent_ids.len(),
            MAX_HOSTS,
            "agent ids per request (or item)",
        )?;
    }
    let t: Vec<Target> = if !agent_ids.is_empty() {
        agent_ids.iter().map(|a| Target::Agent(a.clone())).collect()
    } else {
        hosts.iter().cloned().map(Target::Host).collect()
    };
    if t.is_empty() {
        return Err(ApiError::bad(
            "hosts: at least one host (or an agent_id_list) is required",
        ));
    }
    for (i, x) in t.iter().enumerate() {
        match x {
            Target::Host(h) if h.ip.trim().is_empty() => {
                return Err(ApiError::bad(format!("hosts[{i}].ip: is required")));
            }
            Target::Agent(a) if a.trim().is_empty() => {
                return Err(ApiError::bad(format!(
                    "agent_id_list[{i}]: must not be empty"
                )));
            }
            _ => {}
        }
    }
    Ok(t)
}

/// The result key of a target and process.
pub fn result_key(t: &Target, style: KeyStyle, key: &ProcKey) -> String {
    match (t, style) {
        (Target::Agent(a), _) => format!("{}:{}:{}", a.trim(), key.namespace, key.name),
        (Target::Host(h), KeyStyle::V1) => format!(
            "{}:{}:{}:{}:{}",
            h.bk_cloud_id.unwrap_or(0),
            h.bk_supplier_id.unwrap_or(0),
            h.ip.trim(),
            key.namespace,
            key.name
        ),
        (Target::Host(h), KeyStyle::V2) => {
            format!(
                "{}:{}:{}:{}",
                h.bk_cloud_id.unwrap_or(0),
                h.ip.trim(),
                key.namespace,
                key.name
            )
        }
    }
}

/// The distinct targets of a request by the result key each gets, the first of each kept,
/// in order; linear.
pub fn distinct_targets<'a>(
    tg: &'a [Target],
    style: KeyStyle,
    key: &ProcKey,
) -> Vec<(String, &'a Target)> {
    limits::first_of_each(
        tg.iter().map(|t| (result_key(t, style, key), t)),
        |(k, _)| k.clone(),
    )
}

/// Does the target name this agent?
pub fn is_me(engine: &Engine, t: &Target) -> bool {
    match t {
        Target::Host(h) => engine.host.is_me(h),
        Target::Agent(a) => engine.host.is_my_agent_id(a),
    }
}

/// The per-key error for a target that is not this agent.
pub fn not_me(engine: &Engine, t: &Target) -> KeyResult {
    let what = match t {
        Target::Host(h) => format!(
            "host {} (bk_cloud_id {}{})",
            h.ip.trim(),
            h.bk_cloud_id.unwrap_or(0),
            h.bk_supplier_id
                .map(|s| format!(", bk_supplier_id {s}"))
                .unwrap_or_default()
        ),
        Target::Agent(a) => format!("agent {a:?}"),
    };
    KeyResult::err(
        codes::AGENT_NOT_FOUND,
        format!(
            "{what} is not served by this agent (this agent is {} bk_cloud_id {} bk_supplier_id {}, agent id {})",
            engine.host.ip,
            engine.host.bk_cloud_id,
            engine.host.bk_supplier_id,
            engine.host.agent_id_or_fallback()
        ),
    )
}

fn host_json(engine: &Engine, t: &Target, style: KeyStyle) -> Value {
    match (t, style) {
        (Target::Host(h), KeyStyle::V1) => json!({
            "ip": h.ip.trim(), "bk_cloud_id": h.bk_cloud_id.unwrap_or(0), "bk_supplier_id": h.bk_supplier_id.unwrap_or(0)
        }),
        (Target::Host(h), KeyStyle::V2) => {
            json!({"ip": h.ip.trim(), "bk_cloud_id": h.bk_cloud_id.unwrap_or(0)})
        }
        (Target::Agent(_), _) => {
            json!({"ip": engine.host.ip, "bk_cloud_id": engine.host.bk_cloud_id})
        }
    }
}

fn check_key(key: &ProcKey) -> Result<(), ApiError> {
    let errs = validate_key(key);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad(FieldError::joined(&errs)))
    }
}

/// The only account the caller may act on (`None`: any).
pub fn only_account(access: &Access) -> Option<String> {
    match &access.role {
        super::auth::Role::Admin { account } => Some(account.clone()),
        _ => None,
    }
}

/// The caller's account rule, for checks made when an item runs.
pub fn account_rule(access: &Access) -> defs::AccountRule {
    let a = access.clone();
    Arc::new(move |account: &str| a.may_use_account(account).map_err(|e| e.message))
}

/// Check the caller may run `op` on `key`: a status query is a read (its inline spec is never
/// used); any other operation needs the write role and the account rule for the registered
/// definition (the process acted on) and for the inline spec (which replaces it). `inline`
/// is `None` also when the inline spec is invalid: the role and the registered definition
/// are still checked, so a refusal is never turned into a recorded task.
pub fn check_op_access(
    engine: &Engine,
    access: &Access,
    op: OpType,
    key: &ProcKey,
    inline: Option<&ProcSpec>,
) -> Result<(), ApiError> {
    if !op.mutating() {
        return Ok(());
    }
    if !access.can_write() {
        return Err(ApiError::new(
            codes::FORBIDDEN,
            "read-only group members may not operate processes",
        ));
    }
    // Both the registered definition (the process acted on) and an inline spec (which
    // replaces that definition before the operation runs) must be the caller's to use.
    if let Some(a) = engine.spec_of(key).map(|s| s.account) {
        access.may_use_account(&a)?;
    }
    match inline {
        Some(s) => access.may_use_account(&s.account),
        None => Ok(()),
    }
}

async fn operate_proc(
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
fn plan_request(
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

/// Decode and validate a `register_proc_info` / `update_proc_info` body (no side effects).
pub fn decode_register(
    body: &[u8],
) -> Result<(RegisterReq, ProcKey, Vec<Target>, ProcSpec), ApiError> {
    let req: RegisterReq = parse(body)?;
    let key = req.meta.key();
    check_key(&key)?;
    let tg = targets(&req.hosts, &req.agent_id_list)?;
    let spec = req
        .spec
        .to_spec()
        .map_err(|e| ApiError::bad(FieldError::joined(&e)))?;
    Ok((req, key, tg, spec))
}

/// Decode and validate a body naming one process and hosts (`get_proc_status`,
/// `unregister_proc_info`; no side effects).
pub fn decode_meta_hosts(body: &[u8]) -> Result<(MetaHostsReq, ProcKey, Vec<Target>), ApiError> {
    let req: MetaHostsReq = parse(body)?;
    let key = req.meta.key();
    check_key(&key)?;
    let tg = targets(&req.hosts, &req.agent_id_list)?;
    Ok((req, key, tg))
}

/// Decode and validate a `sync_proc_status` body: (namespace, start, limit).
pub fn decode_sync(body: &[u8]) -> Result<(String, usize, usize), ApiError> {
    let req: SyncProcStatusReq = parse(body)?;
    if req.meta.namespace.trim().is_empty() {
        return Err(ApiError::bad("meta.namespace: is required"));
    }
    let start = req.page.start.unwrap_or(0);
    let Some(limit) = req.page.limit else {
        return Err(ApiError::bad("page.limit: is required (1..1000)"));
    };
    if start < 0 {
        return Err(ApiError::bad(format!(
            "page.start: must not be negative, got {start}"
        )));
    }
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad(format!(
            "page.limit: must be between 1 and 1000, got {limit}"
        )));
    }
    let start = usize::try_from(start).unwrap_or(usize::MAX);
    Ok((req.meta.namespace, start, limit as usize))
}

/// Decode a `get_proc_operate_result` body: the task id.
pub fn decode_task_query(body: &[u8]) -> Result<String, ApiError> {
    let q: TaskQuery = parse(body)?;
    if q.task_id.trim().is_empty() {
        return Err(ApiError::bad("task_id: is required"));
    }
    Ok(q.task_id.trim().to_string())
}

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

/// Build the items of one (meta, hosts) pair, deduplicated by result key.
pub fn plan_items(
    engine: &Engine,
    tg: &[Target],
    style: KeyStyle,
    key: &ProcKey,
    op: OpType,
    inline: Option<(ProcSpec, Labels)>,
) -> Vec<Plan> {
    distinct_targets(tg, style, key)
        .into_iter()
        .map(|(rk, t)| {
            let me = is_me(engine, t);
            Plan {
                result_key: rk,
                key: Some(key.clone()),
                op,
                immediate: if me { None } else { Some(not_me(engine, t)) },
                work: Work::Operate(if me { inline.clone() } else { None }),
            }
        })
        .collect()
}

async fn operate_proc_multi(
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

async fn get_result(engine: &Engine, body: &[u8]) -> Result<Value, ApiError> {
    let task_id = decode_task_query(body)?;
    let Some(t) = engine.tasks.get(&task_id).await else {
        return Err(ApiError::new(
            codes::NOT_FOUND,
            format!("task {task_id:?} does not exist"),
        ));
    };
    let m: TaskResults = t
        .items
        .into_iter()
        .map(|it| (it.result_key, it.result.unwrap_or_else(KeyResult::running)))
        .collect();
    Ok(to_data(&m))
}

fn get_proc_status(engine: &Engine, body: &[u8], style: KeyStyle) -> Result<Value, ApiError> {
    let (req, key, tg) = decode_meta_hosts(body)?;
    let view = engine.view(&key);
    let mut infos = Vec::new();
    // One entry per distinct host, in the order asked.
    for (_, t) in distinct_targets(&tg, style, &key) {
        let agent = match t {
            Target::Agent(a) => Some(a.trim().to_string()),
            _ => None,
        };
        let host = host_json(engine, t, style);
        if is_me(engine, t) {
            infos.push(super::wire::proc_info(
                &key,
                view.as_ref(),
                &req.meta.labels,
                host,
                agent,
            ));
        } else {
            let mut pi = super::wire::proc_info(&key, None, &req.meta.labels, host, agent);
            pi.meta.namespace = key.namespace.clone();
            pi.meta.name = key.name.clone();
            pi.message = not_me(engine, t).error_msg;
            infos.push(pi);
        }
    }
    serde_json::to_value(ProcInfos {
        count: None,
        proc_infos: infos,
    })
    .map_err(|e| ApiError::new(codes::INTERNAL, e.to_string()))
}

fn sync_proc_status(engine: &Engine, body: &[u8]) -> Result<Value, ApiError> {
    let (namespace, start, limit) = decode_sync(body)?;
    let views = engine.views_where(|d| d.key.namespace == namespace);
    let host = json!({"ip": engine.host.ip, "bk_cloud_id": engine.host.bk_cloud_id, "bk_supplier_id": engine.host.bk_supplier_id});
    let agent = if engine.host.agent_id.is_empty() {
        None
    } else {
        Some(engine.host.agent_id.clone())
    };
    let infos = views
        .iter()
        .skip(start)
        .take(limit)
        .map(|v| {
            super::wire::proc_info(
                &v.def.key,
                Some(v),
                &Labels::new(),
                host.clone(),
                agent.clone(),
            )
        })
        .collect();
    serde_json::to_value(ProcInfos {
        count: Some(views.len() as u64),
        proc_infos: infos,
    })
    .map_err(|e| ApiError::new(codes::INTERNAL, e.to_string()))
}

/// One key of a synchronous request's answer (register, update, unregister).
struct Keyed {
    result_key: String,
    key: ProcKey,
    result: KeyResult,
    /// What it did to the definition, as the task log says it.
    definition: Option<String>,
}

/// Record a synchronous mutating request (register, update, unregister) in the task
/// history, each key with the change it made.
async fn audit(engine: &Engine, api: &str, results: &[Keyed], access: &Access, user: String) {
    let items = results
        .iter()
        .map(|k| TaskItemRecord {
            result_key: k.result_key.clone(),
            key: Some(k.key.clone()),
            op_type: -1,
            result: Some(k.result.clone()),
            definition: k.definition.clone(),
        })
        .collect();
    let rec = record(engine.tasks.next_id(), api, -1, access, user, items, true);
    if let Err(e) = engine.tasks.create(rec).await {
        tracing::error!(error = %e, api, "cannot record the request in the task history");
    }
}

/// The key style of a synchronous request: v1 (with the supplier) when a host names one.
fn sync_style(agent_ids: &[String], hosts: &[HostWire]) -> KeyStyle {
    if agent_ids.is_empty() && hosts.iter().any(|h| h.bk_supplier_id.is_some()) {
        KeyStyle::V1
    } else {
        KeyStyle::V2
    }
}

/// Answer each distinct key of a synchronous request: `local` runs once, for the first key
/// that names this host (the others naming it answer 0); other hosts get 117.
async fn each_key<F, Fut>(
    engine: &Engine,
    tg: &[Target],
    style: KeyStyle,
    key: &ProcKey,
    local: F,
) -> Vec<Keyed>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (KeyResult, Option<String>)>,
{
    let mut local = Some(local);
    let mut out = Vec::new();
    for (rk, t) in distinct_targets(tg, style, key) {
        let (result, definition) = if !is_me(engine, t) {
            (not_me(engine, t), None)
        } else if let Some(f) = local.take() {
            f().await
        } else {
            (KeyResult::ok(""), None)
        };
        out.push(Keyed {
            result_key: rk,
            key: key.clone(),
            result,
            definition,
        });
    }
    out
}

async fn register(
    engine: &Arc<Engine>,
    body: &[u8],
    access: &Access,
    mode: PutMode,
    api: &str,
) -> Result<Value, ApiError> {
    if !access.can_write() {
        return Err(ApiError::new(
            codes::FORBIDDEN,
            "read-only group members may not register processes",
        ));
    }
    let (req, key, tg, spec) = decode_register(body)?;
    access.may_use_account(&spec.account)?;
    if let Some(existing) = engine.spec_of(&key).map(|s| s.account) {
        access.may_use_account(&existing)?;
    }
    let style = sync_style(&req.agent_id_list, &req.hosts);
    let w = Writer {
        may_use: account_rule(access),
        only: only_account(access),
        item: None,
    };
    let results = each_key(engine, &tg, style, &key, || async {
        match engine
            .put_definition(&key, req.meta.labels.clone(), spec, mode, &w)
            .await
        {
            Ok(change) => (KeyResult::ok(""), Some(change.describe())),
            Err(e) => (super::wire::def_error(&e), None),
        }
    })
    .await;
    audit(engine, api, &results, access, username(body)).await;
    Ok(keyed(results))
}

fn keyed(results: Vec<Keyed>) -> Value {
    let mut m = serde_json::Map::new();
    for k in results {
        m.insert(
            k.result_key,
            serde_json::to_value(k.result).unwrap_or(Value::Null),
        );
    }
    Value::Object(m)
}

async fn unregister(engine: &Arc<Engine>, body: &[u8], access: &Access) -> Result<Value, ApiError> {
    if !access.can_write() {
        return Err(ApiError::new(
            codes::FORBIDDEN,
            "read-only group members may not unregister processes",
        ));
    }
    let (req, key, tg) = decode_meta_hosts(body)?;
    if let Some(existing) = engine.spec_of(&key).map(|s| s.account) {
        access.may_use_account(&existing)?;
    }
    let style = sync_style(&req.agent_id_list, &req.hosts);
    let w = Writer {
        may_use: account_rule(access),
        only: only_account(access),
        item: None,
    };
    let results = each_key(engine, &tg, style, &key, || async {
        match engine.remove_definition(&key, &w).await {
            Ok(()) => (KeyResult::ok(""), Some("unregistered".to_string())),
            Err(e) => (super::wire::def_error(&e), None),
        }
    })
    .await;
    audit(
        engine,
        "unregister_proc_info",
        &results,
        access,
        username(body),
    )
    .await;
    Ok(keyed(results))
}

/// What a process's `env` shows to a caller who may not change that process.
pub const HIDDEN_ENV_VALUE: &str = "(hidden)";

fn procs(engine: &Engine, body: &[u8], access: &Access) -> Result<Value, ApiError> {
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
            let mut d = super::wire::detail(v);
            // Environment values often carry credentials: only a caller who may change
            // the process sees them; others see the names.
            if access.may_use_account(&d.spec.account).is_err() {
                for v in d.spec.env.values_mut() {
                    *v = HIDDEN_ENV_VALUE.to_string();
                }
            }
            d
        })
        .collect();
    Ok(to_data(&ProcList {
        count: list.len(),
        list,
    }))
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

async fn tasks(engine: &Engine, body: &[u8]) -> Result<Value, ApiError> {
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
                    key: i.result_key,
                    result: i.result.unwrap_or_else(KeyResult::running),
                    definition: i.definition,
                })
                .collect(),
        })
        .collect();
    Ok(to_data(&TaskList { list }))
}

/// `GET /v1/healthz`.
pub async fn healthz(State(st): State<AppState>, req: axum::extract::Request) -> Response {
    if let Err(e) = auth::access_of(&req) {
        return e.into_response();
    }
    let (socket, sockets) = super::listening(&req);
    let e = &st.engine;
    let c = e.counts();
    let (n, managed, running) = (c.processes, c.managed, c.running);
    let h = crate::proto::Health {
        status: if e.store.writable() {
            "ok".into()
        } else {
            "degraded: state store not writable".into()
        },
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id() as i64,
        uptime_secs: e.started.elapsed().as_secs() as i64,
        exit_detection: e.detection.name().into(),
        subreaper: e.subreaper,
        store: e.store.path().display().to_string(),
        store_writable: e.store.writable(),
        processes: n,
        managed,
        running,
        host: crate::proto::HostIdentityView {
            ip: e.host.ip.clone(),
            bk_cloud_id: e.host.bk_cloud_id,
            bk_supplier_id: e.host.bk_supplier_id,
            agent_id: e.host.agent_id_or_fallback(),
        },
        blocked_paths: e
            .fs
            .stuck(std::time::Duration::from_secs(1))
            .into_iter()
            .map(|(p, d)| format!("{} (for {}s)", p.display(), d.as_secs()))
            .collect(),
        hung_mounts: e
            .fs
            .hung_mounts()
            .into_iter()
            .map(|(p, d)| format!("{} (for {}s)", p.display(), d.as_secs()))
            .collect(),
        containment: e.cgroups.describe(),
        socket,
        sockets,
    };
    ok(serde_json::to_value(h).unwrap_or(Value::Null))
}

/// Query of `GET /v1/events`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct EventsQuery {
    /// Only events newer than this id.
    #[serde(default)]
    pub after: Option<u64>,
    /// Only events at or after this unix time in milliseconds.
    #[serde(default)]
    pub since_ms: Option<i64>,
    /// Only this process (`namespace/name`).
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
    /// Keep the response open and stream new events as NDJSON.
    #[serde(default)]
    pub follow: Option<String>,
}

/// `GET /v1/events`: the history as JSON, or with `follow=1` a newline-delimited JSON stream
/// (backlog first, then live events).
pub async fn events(State(st): State<AppState>, req: axum::extract::Request) -> Response {
    if let Err(e) = auth::access_of(&req) {
        return e.into_response();
    }
    let q: EventsQuery = match super::strict_query(req.uri()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
    let follow = q
        .follow
        .as_deref()
        .is_some_and(|f| f != "0" && f != "false");
    let key = q.key.clone().filter(|k| !k.is_empty());
    // Live events are subscribed to before the backlog is read, so none falls in between.
    let rx = follow.then(|| st.engine.events.subscribe());
    let backlog = st
        .engine
        .events
        .list(
            q.after.unwrap_or(0),
            q.since_ms.unwrap_or(i64::MIN),
            key.as_deref(),
            limit,
        )
        .await;
    let Some(rx) = rx else {
        return ok(to_data(&EventList { events: backlog }));
    };
    let last = backlog.last().map(|e| e.id).unwrap_or(q.after.unwrap_or(0));
    let lines: Vec<Result<Vec<u8>, std::convert::Infallible>> =
        backlog.into_iter().map(|e| Ok(line(&e))).collect();
    let head = futures_util::stream::iter(lines);
    let live = futures_util::stream::unfold((rx, last, key), |(mut rx, last, key)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if e.id > last && key.as_deref().is_none_or(|k| e.key == k) => {
                    let l = line(&e);
                    return Some((Ok(l), (rx, e.id, key)));
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let note = json!({"kind": "lagged", "message": format!("{n} events were dropped for this slow reader")});
                    let mut l = note.to_string().into_bytes();
                    l.push(b'\n');
                    return Some((Ok(l), (rx, last, key)));
                }
                Err(_) => return None,
            }
        }
    });
    use futures_util::StreamExt;
    let body = axum::body::Body::from_stream(head.chain(live));
    (
        [
            ("content-type", "application/x-ndjson"),
            ("cache-control", "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn line(e: &crate::proto::Event) -> Vec<u8> {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(ip: &str, cloud: Option<i64>, supplier: Option<i64>) -> HostWire {
        HostWire {
            ip: ip.into(),
            bk_cloud_id: cloud,
            bk_supplier_id: supplier,
        }
    }

    #[test]
    fn distinct_targets_answer_each_key_once_in_order() {
        let key = ProcKey::new("ns", "p");
        let tg = targets(
            &[
                host("10.0.0.2", Some(0), None),
                host(" 10.0.0.1", None, None),
                host("10.0.0.2", None, Some(3)),
                host("10.0.0.1", Some(0), Some(0)),
                host("10.0.0.1", Some(1), None),
            ],
            &[],
        )
        .unwrap();
        let keys = |style| -> Vec<String> {
            distinct_targets(&tg, style, &key)
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        // v2 keys ignore the supplier; an absent cloud id is 0; the ip is trimmed.
        assert_eq!(
            keys(KeyStyle::V2),
            vec!["0:10.0.0.2:ns:p", "0:10.0.0.1:ns:p", "1:10.0.0.1:ns:p"]
        );
        assert_eq!(
            keys(KeyStyle::V1),
            vec![
                "0:0:10.0.0.2:ns:p",
                "0:0:10.0.0.1:ns:p",
                "0:3:10.0.0.2:ns:p",
                "1:0:10.0.0.1:ns:p"
            ]
        );
        // 2000 copies of one host: one key.
        let same = vec![host("10.0.0.9", Some(0), None); MAX_HOSTS];
        let tg = targets(&same, &[]).unwrap();
        assert_eq!(distinct_targets(&tg, KeyStyle::V2, &key).len(), 1);
    }

    #[test]
    fn targets_refuse_more_than_the_limit_before_building_anything() {
        let many = vec![host("10.0.0.9", None, None); MAX_HOSTS + 1];
        let e = targets(&many, &[]).unwrap_err();
        assert_eq!(e.code, codes::BAD_REQUEST);
        assert!(
            e.message.starts_with("hosts: at most 2000 "),
            "{}",
            e.message
        );
        let ids = vec!["a".to_string(); MAX_HOSTS + 1];
        let e = targets(&[], &ids).unwrap_err();
        assert!(
            e.message.starts_with("agent_id_list: at most 2000 "),
            "{}",
            e.message
        );
        // agent_id_list wins over hosts, and is what is counted.
        assert_eq!(targets(&many, &["a".to_string()]).unwrap().len(), 1);
    }

    #[test]
    fn multi_refuses_too_many_items_and_result_keys() {
        let item = |hosts: usize| {
            json!({"meta": {"namespace": "n", "name": "p"}, "op_type": 2,
                   "hosts": vec![json!({"ip": "10.0.0.1"}); hosts]})
        };
        let body = |items: Vec<Value>| json!({ "proc_operate_req": items }).to_string();
        let e = decode_multi(body(vec![item(1); MAX_MULTI_ITEMS + 1]).as_bytes()).unwrap_err();
        assert!(
            e.message
                .starts_with("proc_operate_req: at most 1000 items"),
            "{}",
            e.message
        );
        assert_eq!(
            decode_multi(body(vec![item(1); MAX_MULTI_ITEMS]).as_bytes())
                .unwrap()
                .len(),
            MAX_MULTI_ITEMS
        );
        // 11 items of 2000 hosts: each within its own limit, 22000 keys in all.
        let e = decode_multi(body(vec![item(MAX_HOSTS); 11]).as_bytes()).unwrap_err();
        assert!(
            e.message
                .starts_with("proc_operate_req: at most 20000 result keys"),
            "{}",
            e.message
        );
        let e = decode_multi(body(vec![item(1), item(MAX_HOSTS + 1)]).as_bytes()).unwrap_err();
        assert!(
            e.message
                .starts_with("proc_operate_req[1].hosts: at most 2000"),
            "{}",
            e.message
        );
    }
}
