//! The GSE wire shapes of what the supervisor shows and answers, built from its snapshots
//! ([`ProcView`]): the per-key result of an operation (the one place typed outcomes become
//! GSE codes), the `content` JSON of status and control answers, `proc_infos` entries, and
//! the agent's own detailed view.

use serde_json::json;

use crate::host::HostIdentity;
use crate::proto::{KeyResult, Meta, OpType, ProcDetail, ProcInfo, codes};
use crate::spec::{Labels, ProcKey, Source};
use crate::supervisor::defs::DefError;
use crate::supervisor::handle::Operated;
use crate::supervisor::lifecycle::Outcome;
use crate::supervisor::view::ProcView;

fn join_pids(p: &[i32]) -> String {
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A refused definition write, as a per-key result.
pub fn def_error(e: &DefError) -> KeyResult {
    let code = match e {
        DefError::AlreadyRegistered(_) => codes::ALREADY_REGISTERED,
        DefError::DeclaredInConfig(_) | DefError::Conflict(_) | DefError::Invalid(_) => {
            codes::SPEC_INVALID
        }
        DefError::Forbidden(_) => codes::FORBIDDEN,
        DefError::Store(_) => codes::OP_FAILED,
        DefError::NotRegistered(_) => codes::PROC_NOT_RUNNING,
    };
    KeyResult::err(code, e.to_string())
}

/// The GSE code and message of an outcome.
pub fn outcome_code(key: &ProcKey, o: &Outcome) -> (i64, String) {
    match o {
        Outcome::Done(note) if note.is_empty() => (codes::SUCCESS, "success".into()),
        Outcome::Done(note) => (codes::SUCCESS, format!("success: {note}")),
        Outcome::AlreadyRunning(pids) => (
            codes::PROC_RUNNING,
            format!(
                "process is already running (pid {}); no need to start",
                join_pids(pids)
            ),
        ),
        Outcome::NotRunning => (
            codes::PROC_NOT_RUNNING,
            "process is not running; no need to stop".into(),
        ),
        Outcome::StartCheckFailed(m) | Outcome::StopFailed(m) => {
            (codes::POST_CHECK_ERROR, m.clone())
        }
        Outcome::CommandFailed(m) => (codes::OP_FAILED, m.clone()),
        Outcome::MissingCommand(field) => (
            codes::SPEC_INVALID,
            format!("{field} is empty: this process has no command for that operation"),
        ),
        Outcome::Invalid(m) => (codes::SPEC_INVALID, m.clone()),
        Outcome::Unavailable(m) => (codes::UNAVAILABLE, m.clone()),
        Outcome::NotRegistered => (
            codes::NOT_REGISTERED,
            format!("process {key} is not registered; register it or send its spec inline"),
        ),
        Outcome::Busy(m) => (codes::UNAVAILABLE, m.clone()),
        Outcome::Forbidden(m) => (codes::FORBIDDEN, m.clone()),
    }
}

/// The per-key result of an operation: code and message from its outcome, and the GSE
/// `content` (status for op 2, control otherwise).
pub fn key_result(key: &ProcKey, op: OpType, r: &Operated, host: &HostIdentity) -> KeyResult {
    let outcome = match &r.result {
        Ok(o) => o,
        Err(e) => return def_error(e),
    };
    if op == OpType::Status {
        return match outcome {
            Outcome::NotRegistered => KeyResult {
                error_code: codes::NOT_REGISTERED,
                error_msg: format!("process {key} is not registered"),
                content: status_content(key, None, host),
            },
            _ => KeyResult::ok(status_content(key, r.view.as_ref(), host)),
        };
    }
    let (code, mut msg) = outcome_code(key, outcome);
    if let Some(why) = &r.not_durable {
        msg = format!(
            "{msg}; not durable: the state directory could not record this yet ({why}); an agent killed before it does would not know of it"
        );
    }
    let content = match (code, &r.view) {
        (codes::SUCCESS, Some(v)) => control_content(v, host),
        _ => String::new(),
    };
    KeyResult {
        error_code: code,
        error_msg: msg,
        content,
    }
}

/// `content` of a status query: GSE's `{"process":[{"procname", "instance":[{...}]}]}` with
/// `pid` -1 when not running.
pub fn status_content(key: &ProcKey, view: Option<&ProcView>, host: &HostIdentity) -> String {
    let agent = host.agent_id_or_fallback();
    let utctime = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let v = match view {
        None => json!({
            "process": [{"procname": key.name, "instance": [{"pid": -1, "isAuto": false, "processName": key.name}]}],
            "bk_agent_id": agent, "utctime": utctime, "timezone": 0
        }),
        Some(v) => {
            let s = v.sample.clone().unwrap_or_default();
            let pids: Vec<i64> = if v.instances.is_empty() {
                vec![-1]
            } else {
                v.pids().into_iter().map(i64::from).collect()
            };
            let spec = &v.def.spec;
            let instances: Vec<serde_json::Value> = pids
                .iter()
                .map(|pid| {
                    json!({
                        "pid": pid,
                        "isAuto": v.managed,
                        "processName": spec.proc_name,
                        "setupPath": spec.setup_path,
                        "version": v.version,
                        "cpuUsage": s.cpu_usage,
                        "phyMemUsage": s.mem_usage,
                        "usePhyMem": s.rss_bytes,
                        "diskSize": s.disk,
                        "fd": s.fd,
                        "health": v.health.clone().unwrap_or_default(),
                        "startTime": v.last_start_time,
                        "register_time": v.def.register_time,
                        "last_start_time": v.last_start_time,
                        "report_time": crate::util::unix_now(),
                        "stat": if *pid > 0 { "running" } else { "stopped" },
                    })
                })
                .collect();
            json!({
                "process": [{"procname": spec.proc_name, "instance": instances}],
                "bk_agent_id": agent, "utctime": utctime, "timezone": 0
            })
        }
    };
    v.to_string()
}

/// `content` of a control operation: `{"value":[{"procName", "setupPath", "result", "isAuto", ...}]}`.
pub fn control_content(v: &ProcView, host: &HostIdentity) -> String {
    let spec = &v.def.spec;
    json!({
        "value": [{
            "procName": spec.proc_name,
            "setupPath": spec.setup_path,
            "funcID": spec.func_id,
            "instanceID": spec.instance_id,
            "result": "success",
            "isAuto": v.managed,
            "pid": v.main_pid(),
            "bk_agent_id": host.agent_id_or_fallback(),
        }]
    })
    .to_string()
}

/// A `proc_infos` entry of a registered process (`view`) or of one this agent does not
/// know (`None`: flag and status 0).
pub fn proc_info(
    key: &ProcKey,
    view: Option<&ProcView>,
    labels_in: &Labels,
    host: serde_json::Value,
    agent_id: Option<String>,
) -> ProcInfo {
    let now = crate::util::unix_now();
    match view {
        None => ProcInfo {
            meta: Meta {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                labels: labels_in.clone(),
            },
            host,
            bk_agent_id: agent_id,
            flag: 0,
            status: 0,
            isauto: false,
            message: "not registered".into(),
            pid: -1,
            version: String::new(),
            register_time: 0,
            last_start_time: 0,
            report_time: now,
            cpu_usage: 0.0,
            mem_usage: 0.0,
            fd: 0,
            disk: 0,
            net: 0,
        },
        Some(v) => {
            let s = v.sample.clone().unwrap_or_default();
            ProcInfo {
                meta: Meta {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    labels: v.def.labels.clone(),
                },
                host,
                bk_agent_id: agent_id,
                flag: v.flag,
                status: v.status,
                isauto: v.managed,
                message: v.message.clone(),
                pid: i64::from(v.main_pid()),
                version: v.version.clone(),
                register_time: v.def.register_time,
                last_start_time: v.last_start_time,
                report_time: if s.at > 0 { s.at } else { now },
                cpu_usage: s.cpu_usage,
                mem_usage: s.mem_usage,
                fd: s.fd,
                disk: s.disk,
                net: s.net,
            }
        }
    }
}

/// The agent's detailed view of one process (`POST /v1/procs`, the CLI's status), with its
/// definition when `with_spec`.
pub fn detail(v: &ProcView, with_spec: bool) -> ProcDetail {
    let s = v.sample.clone().unwrap_or_default();
    ProcDetail {
        namespace: v.def.key.namespace.clone(),
        name: v.def.key.name.clone(),
        labels: v.def.labels.clone(),
        source: match &v.def.source {
            Source::Api => "api".into(),
            Source::Config { file } => format!("config:{file}"),
        },
        auto_type: v.def.spec.auto_type.code(),
        flag: v.flag,
        status: v.status,
        managed: v.managed,
        state: v.state.to_string(),
        pids: v.pids().into_iter().map(i64::from).collect(),
        instance_num: v.def.spec.instance_num,
        restarts: v.restarts,
        consecutive_failures: v.failures,
        next_restart_in: v.next_restart_in.filter(|_| v.flag == 1 && v.managed),
        next_restart_at: v
            .next_restart_in
            .filter(|_| v.flag == 1 && v.managed)
            .map(|s| (crate::util::unix_millis() + (s * 1000.0).ceil() as i64) / 1000),
        next_run_in: v.next_run_in,
        next_run_at: v
            .next_run_in
            .map(|s| (crate::util::unix_millis() + (s * 1000.0).ceil() as i64) / 1000),
        restart_delay_secs: v.restart_delay,
        last_exit: v.last_exit.as_ref().map(|x| {
            format!(
                "pid {} {}{}{}",
                x.pid,
                x.exit,
                if x.oom {
                    " (killed by the OOM killer)"
                } else {
                    ""
                },
                if x.by_operator {
                    " (by an operation)"
                } else {
                    ""
                }
            )
        }),
        last_exit_brief: v.last_exit.as_ref().map(|x| {
            let how = match x.exit {
                crate::sys::ExitInfo::Code(c) => format!("exit {c}"),
                crate::sys::ExitInfo::Signal(s) => crate::sys::signal_name(s).to_string(),
                crate::sys::ExitInfo::Unknown => "unknown".to_string(),
            };
            if x.oom { format!("{how} OOM") } else { how }
        }),
        last_exit_time: v.last_exit.as_ref().map(|x| x.at).unwrap_or(0),
        message: v.message.clone(),
        version: v.version.clone(),
        register_time: v.def.register_time,
        last_start_time: v.last_start_time,
        uptime_secs: v.instances.first().map(|(_, start)| {
            // From the kernel's start time, so an adopted process shows its real age.
            let now_ticks = crate::procinfo::now_ticks_floor() + 1;
            (now_ticks.saturating_sub(*start) / crate::procinfo::ticks_per_second()) as i64
        }),
        cpu_usage: s.cpu_usage,
        mem_usage: s.mem_usage,
        rss_bytes: s.rss_bytes,
        fd: s.fd,
        disk: s.disk,
        net: s.net,
        net_sent_bytes: s.net_sent_bytes,
        net_received_bytes: s.net_received_bytes,
        net_sockets: s.net_sockets,
        sampled_at: s.at,
        processes: s.pids,
        figures_from: if v.sample.is_none() {
            String::new()
        } else if s.from_cgroup {
            "cgroup".into()
        } else {
            "proc".into()
        },
        psi_cpu: s.psi_cpu,
        psi_memory: s.psi_memory,
        psi_io: s.psi_io,
        limit_stops: v.limit_stops,
        last_limit: v
            .last_limit
            .as_ref()
            .map(|l| format!("{}: {}", l.at, l.cause)),
        // Filled by the caller, which knows the containment (`Engine::enforcement`).
        mem_limit_by: String::new(),
        cpu_limit_by: String::new(),
        health: v.health.clone(),
        busy: v.busy.map(str::to_string),
        spec: with_spec.then(|| v.def.spec.clone()),
    }
}
