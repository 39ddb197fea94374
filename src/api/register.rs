//! register_proc_info, update_proc_info and unregister_proc_info: definition writes, per host,
//! with the account rule, recorded in the task log.

use std::sync::Arc;

use serde_json::Value;

use super::ApiError;
use super::auth::Access;
use super::submit::record;
use crate::proto::{HostWire, KeyResult, RegisterReq, codes};
use crate::spec::{FieldError, ProcKey, ProcSpec};
use crate::store::TaskItemRecord;
use crate::supervisor::Engine;
use crate::supervisor::defs::PutMode;

use super::handlers::*;

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

/// One key of a synchronous request's answer (register, update, unregister).
pub(crate) struct Keyed {
    result_key: String,
    key: ProcKey,
    result: KeyResult,
    /// What it did to the definition, as the task log says it.
    definition: Option<String>,
}

/// Record a synchronous mutating request (register, update, unregister) in the task
/// history, each key with the change it made (committed after the change, without the
/// answer waiting for it while the store commits: [`crate::tasks::TaskBook::record_finished`]).
pub(crate) async fn audit(
    engine: &Engine,
    api: &str,
    results: &[Keyed],
    access: &Access,
    user: String,
) {
    let items = results
        .iter()
        .map(|k| TaskItemRecord {
            result_key: k.result_key.clone(),
            key: Some(k.key.clone()),
            op_type: -1,
            result: Some(k.result.clone()),
            definition: k.definition.clone(),
            target: None,
        })
        .collect();
    let rec = record(engine.tasks.next_id(), api, -1, access, user, items, true);
    if let Err(e) = engine.tasks.record_finished(rec).await {
        tracing::error!(error = %e, api, "cannot record the request in the task history");
    }
}

/// The key style of a synchronous request: v1 (with the supplier) when a host names one.
pub(crate) fn sync_style(agent_ids: &[String], hosts: &[HostWire]) -> KeyStyle {
    if agent_ids.is_empty() && hosts.iter().any(|h| h.bk_supplier_id.is_some()) {
        KeyStyle::V1
    } else {
        KeyStyle::V2
    }
}

/// Answer each distinct key of a synchronous request: `local` runs once, for the first key
/// that names this host (the others naming it answer 0); other hosts get 117.
pub(crate) async fn each_key<F, Fut>(
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

pub(crate) async fn register(
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
    let w = writer(access, None);
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

pub(crate) fn keyed(results: Vec<Keyed>) -> Value {
    let mut m = serde_json::Map::new();
    for k in results {
        m.insert(
            k.result_key,
            serde_json::to_value(k.result).unwrap_or(Value::Null),
        );
    }
    Value::Object(m)
}

pub(crate) async fn unregister(
    engine: &Arc<Engine>,
    body: &[u8],
    access: &Access,
) -> Result<Value, ApiError> {
    if !access.can_write() {
        return Err(ApiError::new(
            codes::FORBIDDEN,
            "read-only group members may not unregister processes",
        ));
    }
    let (req, key, tg) = super::status::decode_meta_hosts(body)?;
    if let Some(existing) = engine.spec_of(&key).map(|s| s.account) {
        access.may_use_account(&existing)?;
    }
    let style = sync_style(&req.agent_id_list, &req.hosts);
    let w = writer(access, None);
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
