//! `GET /v1/healthz` and `GET /v1/events` (the history, or a follow stream).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::{self};
use super::{AppState, ok};
use crate::proto::EventList;

use super::handlers::*;

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

pub(crate) fn line(e: &crate::proto::Event) -> Vec<u8> {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    v
}
