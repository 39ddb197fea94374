//! get_proc_status (v1 and v2) and sync_proc_status: the status answers, built from the
//! supervisor's snapshots.

use serde_json::{Value, json};

use super::ApiError;
use crate::proto::{MetaHostsReq, ProcInfos, SyncProcStatusReq, codes};
use crate::spec::{Labels, ProcKey};
use crate::supervisor::Engine;

use super::handlers::*;

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

pub(crate) fn get_proc_status(
    engine: &Engine,
    body: &[u8],
    style: KeyStyle,
) -> Result<Value, ApiError> {
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
            pi.message = match t {
                // Another agent's entry names none of this agent's addresses.
                Target::Agent(a) => format!(
                    "agent {:?} is not this agent: its processes are not known here",
                    a.trim()
                ),
                Target::Host(_) => not_me(engine, t).error_msg,
            };
            infos.push(pi);
        }
    }
    serde_json::to_value(ProcInfos {
        count: None,
        proc_infos: infos,
    })
    .map_err(|e| ApiError::new(codes::INTERNAL, e.to_string()))
}

/// sync_proc_status: the whole answer, encoded straight from its entries (a page of a
/// thousand as a `Value` tree first was some 30 small allocations per entry, freed in an
/// order that left the allocator's pages fragmented: the daemon's RSS stayed several MiB
/// up after a page). Blocking for the page's moment: run it off the async workers.
pub(crate) fn sync_proc_status_encoded(engine: &Engine, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let (namespace, start, limit) = decode_sync(body)?;
    let views = engine.views_where(|d| d.key.namespace == namespace);
    let host = json!({"ip": engine.host.ip, "bk_cloud_id": engine.host.bk_cloud_id, "bk_supplier_id": engine.host.bk_supplier_id});
    let agent = if engine.host.agent_id.is_empty() {
        None
    } else {
        Some(engine.host.agent_id.clone())
    };
    let infos: Vec<_> = views
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
    // About what an entry takes (0.5 KB), so that the buffer is not grown and copied again
    // and again.
    let mut buf = Vec::with_capacity(256 + infos.len() * 600);
    let env = crate::proto::Envelope {
        result: true,
        code: codes::SUCCESS,
        message: "success".to_string(),
        data: Some(ProcInfos {
            count: Some(views.len() as u64),
            proc_infos: infos,
        }),
        request_id: crate::util::request_id(),
    };
    serde_json::to_writer(&mut buf, &env)
        .map_err(|e| ApiError::new(codes::INTERNAL, format!("sync_proc_status: {e}")))?;
    Ok(buf)
}
