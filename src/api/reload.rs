//! Config reload: `POST /v1/reload`, SIGHUP, and (opt-in) changes seen in `conf_dir`.
//!
//! A reload re-reads the config file the daemon was started with (and its `conf_dir`) with
//! the same strict loader as at start. A config with any error is rejected whole: every
//! error is listed and nothing changes. A valid one is compared with the registry's
//! config-declared definitions ([`Engine::config_diff`]): definitions are added, changed (field by
//! field) or removed, and running processes whose change needs a restart (a change of
//! `start_cmd`, `env`, `account`, ...) are stopped and started again through the normal
//! operations, as one recorded task (its id is in the answer; its items are restarts,
//! op_type 7). Only `[[process]]` definitions are
//! reloaded; the other sections (`[agent]`, `[api]`, ...) are read at start only, and a
//! reload that finds them changed says so (`restart_required`).
//!
//! Reloads never run concurrently: a second one waits for the first.
//!
//! Applying writes definitions of any account and restarts processes, so through the API it
//! needs the full role (root or the agent's own uid); a dry run is a read for every role, and
//! shows `env` values only to callers who may change that process (others see
//! [`HIDDEN_ENV_VALUE`], as in `procs`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::{self, Access, Role};
use super::handlers::{KeyStyle, Target, result_key};
use super::listing::HIDDEN_ENV_VALUE;
use super::submit::{Plan, Work, submit};
use super::{ApiError, AppState, envelope, ok};
use crate::config::{Config, ConfigErrors};
use crate::proto::{HostWire, KeyResult, OpType, ReloadErrors, ReloadReq, codes};
use crate::spec::ProcKey;
use crate::supervisor::Engine;
use crate::supervisor::defs::ConfigDiff;

/// What a reload found and did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    /// True when nothing was applied (a preview).
    pub dry_run: bool,
    /// The config file read.
    pub file: String,
    #[serde(flatten)]
    pub diff: ConfigDiff,
    /// Settings outside `[[process]]` that differ from the running ones; they take effect
    /// only when the daemon restarts.
    pub restart_required: Vec<String>,
    /// The task restarting the processes listed in `restart` (when applied and not empty).
    pub task_id: Option<String>,
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config has errors; nothing changed.
    #[error("{} error(s) in the config; nothing changed:\n  {}", .0.0.len(), .0.0.join("\n  "))]
    Invalid(ConfigErrors),
    /// The store refused a change while applying.
    #[error("applying the config failed: {0}")]
    Apply(String),
}

static RELOAD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The settings outside `[[process]]` that differ between two configs, by name.
pub fn restart_required(running: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let agent: [(&str, bool); 7] = [
        ("agent.socket", running.socket != new.socket),
        ("agent.state_dir", running.state_dir != new.state_dir),
        ("agent.log_level", running.log_level != new.log_level),
        ("agent.log_format", running.log_format != new.log_format),
        ("agent.log_target", running.log_target != new.log_target),
        ("agent.conf_dir", running.conf_dir != new.conf_dir),
        (
            "agent.watch_conf_dir",
            running.watch_conf_dir != new.watch_conf_dir,
        ),
    ];
    out.extend(agent.iter().filter(|(_, d)| *d).map(|(n, _)| n.to_string()));
    let sections: [(&str, bool); 5] = [
        ("[host]", running.host != new.host),
        ("[supervisor]", running.supervisor != new.supervisor),
        ("[api]", running.api != new.api),
        ("[metrics]", running.metrics != new.metrics),
        ("[store]", running.store != new.store),
    ];
    out.extend(
        sections
            .iter()
            .filter(|(_, d)| *d)
            .map(|(n, _)| n.to_string()),
    );
    out
}

/// Re-read the config, compare it with the registry, and (unless `dry_run`) apply it and
/// restart the processes that need it. `origin` names the trigger in events and logs
/// (`api`, `SIGHUP`, `conf_dir`).
pub async fn reload(
    engine: &Arc<Engine>,
    dry_run: bool,
    origin: &str,
    access: &Access,
) -> Result<ReloadReport, ReloadError> {
    let _g = RELOAD_LOCK.lock().await;
    let file = engine.config.file.clone();
    let new = match crate::config::load(&file) {
        Ok(c) => c,
        Err(e) => {
            if !dry_run {
                engine.events.emit(
                    None,
                    "config_rejected",
                    format!(
                        "reload ({origin}) rejected: {} error(s) in the config; the running config stays",
                        e.0.len()
                    ),
                    json!({ "errors": e.0, "origin": origin }),
                );
            }
            return Err(ReloadError::Invalid(e));
        }
    };
    let restart_required = restart_required(&engine.config, &new);
    if dry_run {
        return Ok(ReloadReport {
            dry_run,
            file: file.display().to_string(),
            diff: engine.config_diff(&new.processes),
            restart_required,
            task_id: None,
        });
    }
    let diff = engine
        .apply_config(&new.processes)
        .await
        .map_err(|e| ReloadError::Apply(e.to_string()))?;
    let task_id = if diff.restart.is_empty() {
        None
    } else {
        Some(restart_task(engine, &diff.restart, access).await?)
    };
    let report = ReloadReport {
        dry_run,
        file: file.display().to_string(),
        diff,
        restart_required,
        task_id,
    };
    engine.events.emit(
        None,
        "config_reloaded",
        format!(
            "reload ({origin}): {} added, {} changed, {} removed, {} restarting{}",
            report.diff.added.len(),
            report.diff.changed.len(),
            report.diff.removed.len(),
            report.diff.restart.len(),
            if report.restart_required.is_empty() {
                String::new()
            } else {
                format!(
                    "; needs a daemon restart to take effect: {}",
                    report.restart_required.join(", ")
                )
            }
        ),
        json!({
            "origin": origin,
            "added": report.diff.added,
            "changed": report.diff.changed.iter().map(|c| &c.key).collect::<Vec<_>>(),
            "removed": report.diff.removed,
            "restart": report.diff.restart,
            "task_id": report.task_id,
            "restart_required": report.restart_required,
        }),
    );
    Ok(report)
}

/// Record one task (committed before its id is returned, like every operation task) whose
/// items replace the running processes `keys`: each is stopped and started again with its
/// new definition (stop_cmd, then the new start_cmd with its full start check), and left
/// unmanaged again if it was unmanaged. `restart_cmd` is not used: it is the program's own
/// restart and would not pick up a changed start_cmd, env or account.
async fn restart_task(
    engine: &Arc<Engine>,
    keys: &[String],
    access: &Access,
) -> Result<String, ReloadError> {
    let me = Target::Host(HostWire {
        ip: engine.host.ip.clone(),
        bk_cloud_id: Some(engine.host.bk_cloud_id),
        bk_supplier_id: None,
    });
    let plans = keys
        .iter()
        .filter_map(|k| k.parse::<ProcKey>().ok())
        .map(|k| Plan {
            result_key: result_key(&me, KeyStyle::V2, &k),
            target: me.item_host(),
            key: Some(k),
            op: OpType::Restart,
            immediate: None,
            work: Work::Replace,
        })
        .collect();
    submit(
        engine,
        "reload",
        OpType::Restart.code(),
        plans,
        access,
        String::new(),
    )
    .await
    .map_err(|e| ReloadError::Apply(format!("cannot record the restart task: {e}")))
}

/// Stop a process and start it with its current definition, keeping its intent: one
/// operation on its lifecycle, so nothing interleaves between the stop and the start, and a
/// failed start leaves the process as it was meant to be (a managed one retried under
/// backoff).
pub async fn replace_process(engine: &Arc<Engine>, key: ProcKey) -> KeyResult {
    let done = engine.replace(&key).await;
    let mut r = super::wire::key_result(&key, OpType::Restart, &done, &engine.host);
    if r.error_code == codes::SUCCESS {
        r.error_msg = "stopped and started again with the new definition".into();
    } else {
        r.error_msg = format!(
            "stopping and starting with the new definition failed: {}",
            r.error_msg
        );
    }
    r
}

/// The access of a reload the daemon triggers itself (SIGHUP, conf_dir).
pub fn internal_access() -> Access {
    Access {
        role: Role::Full,
        peer: None,
    }
}

/// Reload on a signal or a conf_dir change, logging the outcome (and telling systemd).
pub async fn reload_logged(engine: &Arc<Engine>, origin: &str) {
    match reload(engine, false, origin, &internal_access()).await {
        Ok(r) => {
            tracing::info!(
                origin,
                added = r.diff.added.len(),
                changed = r.diff.changed.len(),
                removed = r.diff.removed.len(),
                restarting = r.diff.restart.len(),
                task_id = r.task_id.as_deref().unwrap_or(""),
                "config reloaded"
            );
            if !r.restart_required.is_empty() {
                tracing::warn!(
                    origin,
                    settings = %r.restart_required.join(", "),
                    "these settings changed but take effect only when procagentd restarts"
                );
            }
            crate::daemon::sd_status("supervising (config reloaded)");
        }
        Err(e) => {
            tracing::error!(origin, "config reload failed: {e}");
            crate::daemon::sd_status("supervising (last config reload rejected; see the log)");
        }
    }
}

/// Hide the `env` values of the changes a caller may not make: a changed definition whose
/// registered account or new account is not the caller's to use shows its variables' names
/// with [`HIDDEN_ENV_VALUE`].
pub fn hide_env(engine: &Engine, access: &Access, report: &mut ReloadReport) {
    for c in &mut report.diff.changed {
        let Ok(key) = c.key.parse::<ProcKey>() else {
            continue;
        };
        let mut accounts: Vec<String> = engine
            .spec_of(&key)
            .map(|s| s.account)
            .into_iter()
            .collect();
        accounts.extend(
            c.fields
                .iter()
                .filter(|f| f.field == "account")
                .filter_map(|f| f.new.as_str().map(str::to_string)),
        );
        if accounts.iter().all(|a| access.may_use_account(a).is_ok()) {
            continue;
        }
        for f in c.fields.iter_mut().filter(|f| f.field == "env") {
            for v in [&mut f.old, &mut f.new] {
                if let Some(m) = v.as_object_mut() {
                    for x in m.values_mut() {
                        *x = Value::String(HIDDEN_ENV_VALUE.into());
                    }
                }
            }
        }
    }
}

/// `POST /v1/reload {"dry_run": bool}`. A dry run is a read (every role, `env` values
/// hidden as in `procs`); applying needs the full role (root or the agent's own uid).
pub async fn handler(State(st): State<AppState>, req: Request) -> Response {
    let engine = st.engine;
    engine.counters.api_request("reload");
    if req.method() != axum::http::Method::POST {
        return ApiError {
            http: axum::http::StatusCode::METHOD_NOT_ALLOWED,
            code: codes::METHOD_NOT_ALLOWED,
            message: "/v1/reload needs POST with a JSON body such as {\"dry_run\": true}".into(),
        }
        .into_response();
    }
    let access = match auth::access_of(&req) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let body = match super::read_body(req.into_body(), engine.config.api.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let r: ReloadReq = if body.iter().all(|b| b.is_ascii_whitespace()) {
        ReloadReq::default()
    } else {
        match super::handlers::parse(&body) {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        }
    };
    if !r.dry_run && access.role != Role::Full {
        return ApiError::new(
            codes::FORBIDDEN,
            format!(
                "applying a config reload writes the definitions of every account and restarts their processes: only root or the agent's own uid may; uid {} may preview it with dry_run",
                access.peer.map(|p| p.uid).unwrap_or(0)
            ),
        )
        .into_response();
    }
    match reload(&engine, r.dry_run, "api", &access).await {
        Ok(mut rep) => {
            hide_env(&engine, &access, &mut rep);
            ok(serde_json::to_value(rep).unwrap_or(Value::Null))
        }
        Err(ReloadError::Invalid(errs)) => envelope(
            false,
            codes::BAD_REQUEST,
            &format!(
                "the config has {} error(s); nothing changed: {}",
                errs.0.len(),
                errs.0.join("; ")
            ),
            Some(super::handlers::to_data(&ReloadErrors { errors: errs.0 })),
            axum::http::StatusCode::OK,
        ),
        Err(e @ ReloadError::Apply(_)) => {
            ApiError::new(codes::INTERNAL, e.to_string()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, text).unwrap();
        crate::config::load_with_base(&f, dir.path()).unwrap()
    }

    #[test]
    fn restart_required_names_changed_settings() {
        let a = cfg("[agent]\nstate_dir = '/s'\n");
        let mut b = a.clone();
        assert!(restart_required(&a, &b).is_empty());
        b.log_level = "debug".into();
        b.api.max_connections = 7;
        b.processes.clear();
        assert_eq!(restart_required(&a, &b), vec!["agent.log_level", "[api]"]);
    }
}
