//! Request and response types of the socket API, shared by the server, the CLI and the tests.
//!
//! The shapes follow GSE's API documents (`shared/seeds/*.md`) field for field, plus what the
//! real callers (GSEKit, bk-nodeman) send: unknown keys are ignored at every level, numbers
//! may arrive as strings, `null` means "absent", and hosts come as `{ip, bk_cloud_id,
//! bk_supplier_id}`, `{ip, bk_cloud_id}` or GSE 2.0 `agent_id_list` strings.
//!
//! Every response is the envelope `{result, code, message, data, request_id}`.

use serde::{Deserialize, Deserializer, Serialize};

use crate::spec::{FieldError, Labels, ProcKey, ProcSpec, SpecPatch};

/// GSE result codes (per key in `data`, or top-level `code`).
pub mod codes {
    pub const SUCCESS: i64 = 0;
    /// Per key: still running, poll again.
    pub const RUNNING: i64 = 115;
    /// Per key: the host named is not this agent.
    pub const AGENT_NOT_FOUND: i64 = 117;
    /// Per key: start asked but the right process is already running.
    pub const PROC_RUNNING: i64 = 828;
    /// Per key: stop asked but the process is not running; also unregister of an unknown key.
    pub const PROC_NOT_RUNNING: i64 = 829;
    /// procagent: the spec is invalid or lacks the command the operation needs.
    pub const SPEC_INVALID: i64 = 830;
    /// Request: op_type is not one of 0,1,2,3,4,7,8,9.
    pub const UNKNOWN_OP_TYPE: i64 = 832;
    /// Per key: the post-check failed (not running after start; "stop..." still running).
    pub const POST_CHECK_ERROR: i64 = 836;
    /// Per key: already registered.
    pub const ALREADY_REGISTERED: i64 = 850;
    /// procagent: the process is not registered and no spec was given inline.
    pub const NOT_REGISTERED: i64 = 851;
    /// Per key: a command failed; `error_msg` carries its bounded output.
    pub const OP_FAILED: i64 = 65535;
    /// Request: malformed JSON, wrong types, missing or invalid fields.
    pub const BAD_REQUEST: i64 = 1_000_400;
    /// Request: the peer may not do this.
    pub const FORBIDDEN: i64 = 1_000_403;
    /// Request: unknown endpoint or unknown task id.
    pub const NOT_FOUND: i64 = 1_000_404;
    /// Request: wrong HTTP method.
    pub const METHOD_NOT_ALLOWED: i64 = 1_000_405;
    /// Request: took too long.
    pub const TIMEOUT: i64 = 1_000_408;
    /// Request: body over the limit.
    pub const TOO_LARGE: i64 = 1_000_413;
    /// Request: the peer's uid is over one of its caps (connections or live streams at
    /// once); the message names the cap and its setting.
    pub const TOO_MANY: i64 = 1_000_429;
    /// Request: internal failure (the state store refused a write, ...).
    pub const INTERNAL: i64 = 1_000_500;
    /// Request: temporarily unable (store not writable, shutting down).
    pub const UNAVAILABLE: i64 = 1_000_503;
}

/// GSE flag / status values: unregistered, running, stopped.
pub const FLAG_UNREGISTERED: i64 = 0;
pub const FLAG_RUNNING: i64 = 1;
pub const FLAG_STOPPED: i64 = 2;

/// The response envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub result: bool,
    pub code: i64,
    pub message: String,
    pub data: Option<T>,
    #[serde(default)]
    pub request_id: String,
}

// ---------------------------------------------------------------------------------------
// Lenient scalar decoding

/// An integer that may arrive as a number, a numeric string, or null/absent.
pub fn de_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    match &v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15) {
                Ok(Some(f as i64))
            } else {
                Err(serde::de::Error::custom(format!(
                    "expected an integer, got {n}"
                )))
            }
        }
        serde_json::Value::String(s) if s.trim().is_empty() => Ok(None),
        serde_json::Value::String(s) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("expected an integer, got {s:?}"))),
        other => Err(serde::de::Error::custom(format!(
            "expected an integer, got {}",
            kind(other)
        ))),
    }
}

/// A number that may arrive as a number, a numeric string, or null/absent.
pub fn de_opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    match &v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => Ok(n.as_f64()),
        serde_json::Value::String(s) if s.trim().is_empty() => Ok(None),
        serde_json::Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("expected a number, got {s:?}"))),
        other => Err(serde::de::Error::custom(format!(
            "expected a number, got {}",
            kind(other)
        ))),
    }
}

/// A string that may be null/absent (→ empty). Numbers are accepted and rendered.
pub fn de_str<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    match v {
        serde_json::Value::Null => Ok(String::new()),
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string, got {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn de_labels<'de, D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    let v = Option::<Labels>::deserialize(d)?;
    Ok(v.unwrap_or_default())
}

fn de_vec<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------
// Request pieces

/// GSE `meta`: `namespace` + `name` identify the process; `labels` are free-form.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default, deserialize_with = "de_str")]
    pub namespace: String,
    #[serde(default, deserialize_with = "de_str")]
    pub name: String,
    #[serde(default, deserialize_with = "de_labels")]
    pub labels: Labels,
}

impl Meta {
    pub fn key(&self) -> ProcKey {
        ProcKey::new(self.namespace.clone(), self.name.clone())
    }
}

/// A host as callers send it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostWire {
    #[serde(default, deserialize_with = "de_str")]
    pub ip: String,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub bk_cloud_id: Option<i64>,
    #[serde(
        default,
        deserialize_with = "de_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub bk_supplier_id: Option<i64>,
}

/// Whom a task item answers for, as its request named the host: stored with the item, and
/// written into the key form of the result endpoint that is polled
/// (`crate::api::handlers::polled_key`), whichever API submitted the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemHost {
    /// `{ip, bk_cloud_id[, bk_supplier_id]}` (the ip trimmed, an absent cloud id 0).
    Host {
        ip: String,
        bk_cloud_id: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bk_supplier_id: Option<i64>,
    },
    /// An `agent_id_list` entry (trimmed).
    Agent(String),
}

/// GSE `spec.identity`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdentityWire {
    #[serde(default, deserialize_with = "de_str")]
    pub proc_name: String,
    #[serde(default, deserialize_with = "de_str")]
    pub setup_path: String,
    #[serde(default, deserialize_with = "de_str")]
    pub pid_path: String,
    #[serde(default, deserialize_with = "de_str", alias = "cfg_path")]
    pub config_path: String,
    #[serde(default, deserialize_with = "de_str")]
    pub log_path: String,
    #[serde(default, deserialize_with = "de_str", alias = "account")]
    pub user: String,
    #[serde(default, deserialize_with = "de_str")]
    pub value_key: String,
}

/// GSE `spec.control`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlWire {
    #[serde(default, deserialize_with = "de_str")]
    pub start_cmd: String,
    #[serde(default, deserialize_with = "de_str")]
    pub stop_cmd: String,
    #[serde(default, deserialize_with = "de_str")]
    pub restart_cmd: String,
    #[serde(default, deserialize_with = "de_str")]
    pub reload_cmd: String,
    #[serde(default, deserialize_with = "de_str")]
    pub kill_cmd: String,
    #[serde(default, deserialize_with = "de_str")]
    pub version_cmd: String,
    #[serde(default, deserialize_with = "de_str")]
    pub health_cmd: String,
    #[serde(default, deserialize_with = "de_str")]
    pub cmd_shell_ext: String,
}

/// GSE `spec.resource` (percentages; fd/disk/net are reserved and ignored).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResourceWire {
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub mem: Option<f64>,
}

/// GSE `spec.monitor_policy` / `spec.alive_monitor_policy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyWire {
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub auto_type: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub start_check_secs: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub stop_check_secs: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub start_retries: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub start_interval: Option<i64>,
    /// Failures in a row after which a managed process is given up (`fatal`); absent:
    /// never (procagent's own field).
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub max_restarts: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub op_timeout: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub cycle_time: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub instance_num: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub start_check_begin_time: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub start_check_end_time: Option<i64>,
    #[serde(default, deserialize_with = "de_str")]
    pub cmd_shell_ext: String,
}

/// GSE `spec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpecWire {
    #[serde(default)]
    pub identity: Option<IdentityWire>,
    #[serde(default)]
    pub control: Option<ControlWire>,
    #[serde(default)]
    pub resource: Option<ResourceWire>,
    #[serde(default)]
    pub monitor_policy: Option<PolicyWire>,
    #[serde(default)]
    pub alive_monitor_policy: Option<PolicyWire>,
    /// Shell for the commands (GSE 2.0); only "sh" is supported. Also accepted inside
    /// `control` and the monitor policy.
    #[serde(default, deserialize_with = "de_str")]
    pub cmd_shell_ext: String,
}

impl SpecWire {
    /// The wire spec that registers `s` (every field the API carries; `env`, `contact`,
    /// `func_id` and `instance_id` are config-file fields the API has no place for).
    pub fn from_spec(s: &ProcSpec) -> SpecWire {
        let int = |v: u64| Some(i64::try_from(v).unwrap_or(i64::MAX));
        let opt = |v: Option<u64>| v.and_then(int);
        SpecWire {
            identity: Some(IdentityWire {
                proc_name: s.proc_name.clone(),
                setup_path: s.setup_path.clone(),
                pid_path: s.pid_path.clone(),
                config_path: s.config_path.clone(),
                log_path: s.log_path.clone(),
                user: s.account.clone(),
                value_key: s.value_key.clone(),
            }),
            control: Some(ControlWire {
                start_cmd: s.start_cmd.clone(),
                stop_cmd: s.stop_cmd.clone(),
                restart_cmd: s.restart_cmd.clone(),
                reload_cmd: s.reload_cmd.clone(),
                kill_cmd: s.kill_cmd.clone(),
                version_cmd: s.version_cmd.clone(),
                health_cmd: s.health_cmd.clone(),
                cmd_shell_ext: String::new(),
            }),
            resource: Some(ResourceWire {
                cpu: Some(s.cpu_lmt),
                mem: Some(s.mem_lmt),
            }),
            monitor_policy: Some(PolicyWire {
                auto_type: Some(s.auto_type.code()),
                start_check_secs: int(s.start_check_secs),
                stop_check_secs: int(s.stop_check_secs),
                start_retries: s.start_retries.map(i64::from),
                start_interval: opt(s.start_interval),
                max_restarts: s.max_restarts.map(i64::from),
                op_timeout: int(s.op_timeout),
                cycle_time: int(s.cycle_time),
                instance_num: Some(i64::from(s.instance_num)),
                start_check_begin_time: opt(s.start_check_begin_time),
                start_check_end_time: opt(s.start_check_end_time),
                cmd_shell_ext: String::new(),
            }),
            alive_monitor_policy: None,
            cmd_shell_ext: s.cmd_shell_ext.clone(),
        }
    }

    /// The patch this wire spec stands for: only names are mapped here (`user` is
    /// `account`, `resource.cpu` is `cpu_lmt`, ...); every check and default is
    /// [`SpecPatch::apply`]'s. `monitor_policy` wins over `alive_monitor_policy`;
    /// `cmd_shell_ext` is the first one given of `spec`, `control` and the policy.
    pub fn to_patch(&self) -> SpecPatch {
        let id = self.identity.clone().unwrap_or_default();
        let ctl = self.control.clone().unwrap_or_default();
        let res = self.resource.clone().unwrap_or_default();
        let pol = self
            .monitor_policy
            .clone()
            .or_else(|| self.alive_monitor_policy.clone())
            .unwrap_or_default();
        let cmd_shell_ext = [&self.cmd_shell_ext, &ctl.cmd_shell_ext, &pol.cmd_shell_ext]
            .into_iter()
            .find(|s| !s.trim().is_empty())
            .map(|s| s.trim().to_string());
        SpecPatch {
            setup_path: Some(id.setup_path),
            proc_name: Some(id.proc_name),
            pid_path: Some(id.pid_path),
            config_path: Some(id.config_path),
            log_path: Some(id.log_path),
            account: Some(id.user),
            value_key: Some(id.value_key),
            start_cmd: Some(ctl.start_cmd),
            stop_cmd: Some(ctl.stop_cmd),
            restart_cmd: Some(ctl.restart_cmd),
            reload_cmd: Some(ctl.reload_cmd),
            kill_cmd: Some(ctl.kill_cmd),
            version_cmd: Some(ctl.version_cmd),
            health_cmd: Some(ctl.health_cmd),
            cmd_shell_ext,
            cpu_lmt: res.cpu,
            mem_lmt: res.mem,
            auto_type: pol.auto_type,
            start_check_secs: pol.start_check_secs,
            start_check_begin_time: pol.start_check_begin_time,
            start_check_end_time: pol.start_check_end_time,
            stop_check_secs: pol.stop_check_secs,
            op_timeout: pol.op_timeout,
            cycle_time: pol.cycle_time,
            instance_num: pol.instance_num,
            start_retries: pol.start_retries,
            start_interval: pol.start_interval,
            max_restarts: pol.max_restarts,
            ..SpecPatch::default()
        }
    }

    /// Turn a wire spec into a [`ProcSpec`] over the defaults. Field names in errors are
    /// the wire paths (`spec.identity.setup_path`).
    pub fn to_spec(&self) -> Result<ProcSpec, Vec<FieldError>> {
        self.to_patch().apply(&ProcSpec::default()).map_err(|errs| {
            errs.iter()
                .map(|e| e.renamed(wire_field(&e.field)))
                .collect()
        })
    }
}

/// The wire path of a [`ProcSpec`] field, for error messages.
pub fn wire_field(field: &str) -> String {
    let section = match field {
        "setup_path" | "proc_name" | "pid_path" | "config_path" | "log_path" | "value_key" => {
            "identity"
        }
        "account" => return "spec.identity.user".into(),
        "start_cmd" | "stop_cmd" | "restart_cmd" | "reload_cmd" | "kill_cmd" | "version_cmd"
        | "health_cmd" => "control",
        "cpu_lmt" => return "spec.resource.cpu".into(),
        "mem_lmt" => return "spec.resource.mem".into(),
        _ => "monitor_policy",
    };
    format!("spec.{section}.{field}")
}

/// `operate_proc` (v1 seed, plus an optional inline `spec` and GSE 2.0 `agent_id_list`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OperateProcReq {
    pub meta: Meta,
    #[serde(default, deserialize_with = "de_vec")]
    pub hosts: Vec<HostWire>,
    #[serde(default, deserialize_with = "de_vec")]
    pub agent_id_list: Vec<String>,
    #[serde(deserialize_with = "de_opt_i64")]
    pub op_type: Option<i64>,
    #[serde(default)]
    pub spec: Option<SpecWire>,
}

/// `register_proc_info` / `update_proc_info`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegisterReq {
    pub meta: Meta,
    #[serde(default, deserialize_with = "de_vec")]
    pub hosts: Vec<HostWire>,
    #[serde(default, deserialize_with = "de_vec")]
    pub agent_id_list: Vec<String>,
    pub spec: SpecWire,
}

/// `unregister_proc_info` and `get_proc_status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetaHostsReq {
    pub meta: Meta,
    #[serde(default, deserialize_with = "de_vec")]
    pub hosts: Vec<HostWire>,
    #[serde(default, deserialize_with = "de_vec")]
    pub agent_id_list: Vec<String>,
}

/// `sync_proc_status` paging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Page {
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub start: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub limit: Option<i64>,
    #[serde(default)]
    pub return_total: Option<bool>,
}

/// `sync_proc_status` meta: only the namespace.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NamespaceMeta {
    #[serde(default, deserialize_with = "de_str")]
    pub namespace: String,
}

/// `sync_proc_status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncProcStatusReq {
    pub meta: NamespaceMeta,
    pub page: Page,
}

/// `get_proc_operate_result`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskQuery {
    #[serde(deserialize_with = "de_str")]
    pub task_id: String,
}

impl OperateProcReq {
    /// One operation on one process of the given hosts (what the CLI sends).
    pub fn new(key: &ProcKey, op: OpType, hosts: Vec<HostWire>) -> OperateProcReq {
        OperateProcReq {
            meta: Meta {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                labels: Labels::default(),
            },
            hosts,
            op_type: Some(op.code()),
            ..OperateProcReq::default()
        }
    }
}

/// `operate_proc_multi`: its items are operate_proc requests. The server decodes the items
/// as JSON first (`T = serde_json::Value`) so an item's error names its index.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OperateMultiReq<T = OperateProcReq> {
    pub proc_operate_req: Vec<T>,
}

/// `tasks`: the `limit` most recent tasks, or the one task `task_id`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TasksQuery {
    #[serde(
        default,
        deserialize_with = "de_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

/// Body of `POST /v1/reload`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadReq {
    #[serde(default)]
    pub dry_run: bool,
}

// ---------------------------------------------------------------------------------------
// Responses

/// One entry of a keyed result map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyResult {
    pub error_code: i64,
    pub error_msg: String,
    pub content: String,
}

impl KeyResult {
    pub fn ok(content: impl Into<String>) -> KeyResult {
        KeyResult {
            error_code: codes::SUCCESS,
            error_msg: "success".into(),
            content: content.into(),
        }
    }
    pub fn err(code: i64, msg: impl Into<String>) -> KeyResult {
        KeyResult {
            error_code: code,
            error_msg: msg.into(),
            content: String::new(),
        }
    }
    pub fn running() -> KeyResult {
        KeyResult {
            error_code: codes::RUNNING,
            error_msg: "processing, query again later".into(),
            content: String::new(),
        }
    }
}

/// One entry of get_proc_status / sync_proc_status `proc_infos`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcInfo {
    pub meta: Meta,
    pub host: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_agent_id: Option<String>,
    /// Expected state: 0 unregistered, 1 running, 2 stopped.
    pub flag: i64,
    /// Real state: 0 unregistered, 1 running, 2 stopped. Always exactly one of those.
    pub status: i64,
    /// Whether the agent keeps it alive (托管).
    pub isauto: bool,
    pub message: String,
    pub pid: i64,
    pub version: String,
    pub register_time: i64,
    pub last_start_time: i64,
    pub report_time: i64,
    pub cpu_usage: f64,
    pub mem_usage: f64,
    pub fd: i64,
    pub disk: i64,
    pub net: i64,
}

impl PartialEq for Meta {
    fn eq(&self, other: &Self) -> bool {
        self.namespace == other.namespace && self.name == other.name && self.labels == other.labels
    }
}

/// `data` of operate_proc, operate_proc_multi (and a config reload's restart task).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskIdResp {
    pub task_id: String,
}

/// `data` of get_proc_operate_result: every item's result by its result key (115 while it
/// runs).
pub type TaskResults = std::collections::BTreeMap<String, KeyResult>;

/// One task as `tasks` lists it (the audit trail).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub task_id: String,
    /// Which API created it (operate_proc, operate_proc_multi, reload, ...).
    pub api: String,
    /// The GSE op_type code asked for (-1 when a task has none).
    pub op_type: i64,
    pub created_ms: i64,
    #[serde(default)]
    pub finished_ms: Option<i64>,
    #[serde(default)]
    pub peer_uid: Option<u32>,
    #[serde(default)]
    pub peer_pid: Option<i32>,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub items: Vec<TaskItemView>,
}

/// One (host, process) item of a listed task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskItemView {
    /// The result key as get_proc_operate_result answers it (`cloud:supplier:ip:ns:name`,
    /// ...), so that a task's listing and its results name items alike.
    pub key: String,
    pub result: KeyResult,
    /// What the item did to the process's definition; `None` when it wrote none (and from
    /// an older agent).
    #[serde(default)]
    pub definition: Option<String>,
}

/// `data` of `tasks`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskList {
    pub list: Vec<TaskView>,
}

/// `data` of `POST /v1/procs`. The CLI reads the list as JSON first (`T =
/// serde_json::Value`) so `--json` prints what the agent said.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcList<T = ProcDetail> {
    pub count: usize,
    pub list: Vec<T>,
}

/// `data` of `GET /v1/events` (without `follow`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventList<T = Event> {
    pub events: Vec<T>,
}

/// One object of `GET /v1/logs`: a line of a file, or a notice about it. Fields are in
/// alphabetical order, as the JSON objects are written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The file the line comes from.
    #[serde(default)]
    pub file: String,
    /// The line's text (absent in a notice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// Something about the file instead of a line (unreadable, rotated, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// "output" (captured command output) or "log" (log_path).
    #[serde(default)]
    pub source: String,
    /// A captured output record's stream: "out" or "err".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// A captured output record's time stamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// `data` of `GET /v1/logs` (without `follow`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogLines<T = LogLine> {
    pub lines: Vec<T>,
}

/// `data` of a config reload refused for the config's errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadErrors {
    #[serde(default)]
    pub errors: Vec<String>,
}

/// One row of `process_status` (GSEKit's process list).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessStatusRow {
    pub id: i64,
    pub bk_biz_id: i64,
    pub expression: String,
    pub bk_host_innerip: String,
    pub bk_cloud_id: i64,
    pub bk_set_env: String,
    pub bk_set_id: i64,
    pub bk_module_id: i64,
    pub service_template_id: i64,
    pub service_instance_id: i64,
    pub bk_process_name: String,
    pub bk_process_id: i64,
    pub process_template_id: i64,
    /// GSE status: 0 unregistered, 1 running, 2 stopped.
    pub process_status: i64,
    pub is_auto: bool,
    pub bk_set_name: String,
    pub bk_module_name: String,
    pub bk_service_name: String,
    pub bk_cloud_name: String,
    pub config_templates: serde_json::Value,
    pub proc_inst_infos: Vec<ProcInstInfo>,
}

/// One instance of a [`ProcessStatusRow`]: a registered process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcInstInfo {
    pub bk_process_id: i64,
    pub local_inst_id: i64,
    pub inst_id: i64,
    pub process_status: i64,
    pub is_auto: bool,
    pub namespace: String,
    pub name: String,
    pub pid: i64,
}

/// `data` of `process_status`. The CLI reads the rows as JSON first (`T =
/// serde_json::Value`) so `--json` prints what the agent said.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessStatusList<T = ProcessStatusRow> {
    pub count: usize,
    pub list: Vec<T>,
}

/// `data` of get_proc_status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcInfos {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    pub proc_infos: Vec<ProcInfo>,
}

/// What the `status` table shows of a [`ProcDetail`], read from its wire form: the same
/// field names, its strings borrowed from the answer's text where they need no unescaping,
/// every other field skipped unread into memory. (A listing of 1000 brief entries is 0.8 MB
/// of about 45 fields each; the table uses these.)
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StatusRow<'a> {
    #[serde(borrow)]
    pub namespace: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub name: std::borrow::Cow<'a, str>,
    pub status: i64,
    pub managed: bool,
    #[serde(borrow)]
    pub state: std::borrow::Cow<'a, str>,
    pub pids: Vec<i64>,
    pub restarts: u64,
    pub consecutive_failures: u32,
    pub next_restart_in: Option<f64>,
    pub next_run_in: Option<f64>,
    pub next_run_at: Option<i64>,
    #[serde(borrow)]
    pub last_exit: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    pub last_exit_brief: Option<std::borrow::Cow<'a, str>>,
    pub last_exit_time: i64,
    #[serde(borrow)]
    pub message: std::borrow::Cow<'a, str>,
    pub uptime_secs: Option<i64>,
    pub cpu_usage: f64,
    pub rss_bytes: u64,
}

/// The agent's own detailed view of one process (`POST /v1/procs`, the CLI's status).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcDetail {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub source: String,
    pub auto_type: i64,
    /// Expected state (GSE flag).
    pub flag: i64,
    /// Real state (GSE status).
    pub status: i64,
    pub managed: bool,
    /// Finer-grained state: running, stopped, starting, stopping, backoff, exited, ...
    pub state: String,
    pub pids: Vec<i64>,
    pub instance_num: u32,
    pub restarts: u64,
    pub consecutive_failures: u32,
    /// Seconds until the next restart attempt, when one is scheduled (in backoff).
    pub next_restart_in: Option<f64>,
    /// Unix seconds of that attempt.
    #[serde(default)]
    pub next_restart_at: Option<i64>,
    /// Seconds until a periodic job's next run, while it waits between runs (state
    /// `waiting`: status 2, pid -1, managed, flag 1).
    #[serde(default)]
    pub next_run_in: Option<f64>,
    /// Unix seconds of that run.
    #[serde(default)]
    pub next_run_at: Option<i64>,
    /// The delay the agent chose before the latest restart attempt, or before the scheduled
    /// one in backoff: 0 after a healthy run (restarted at once).
    #[serde(default)]
    pub restart_delay_secs: f64,
    pub last_exit: Option<String>,
    /// The last exit in a word or two: `exit 3`, `SIGKILL`, `unknown` (`OOM` appended when the
    /// OOM killer ended it); for tables.
    #[serde(default)]
    pub last_exit_brief: Option<String>,
    pub last_exit_time: i64,
    pub message: String,
    pub version: String,
    pub register_time: i64,
    pub last_start_time: i64,
    pub uptime_secs: Option<i64>,
    pub cpu_usage: f64,
    pub mem_usage: f64,
    pub rss_bytes: u64,
    pub fd: i64,
    pub disk: i64,
    /// Network I/O: TCP bytes sent + received per second over the last sample, by the
    /// instances' whole trees.
    pub net: i64,
    /// TCP bytes sent (acknowledged by the peers) by the trees since the instances started.
    #[serde(default)]
    pub net_sent_bytes: u64,
    /// TCP bytes received by the trees since the instances started.
    #[serde(default)]
    pub net_received_bytes: u64,
    /// TCP and UDP sockets the trees hold (listening ones included).
    #[serde(default)]
    pub net_sockets: u64,
    /// Unix seconds of the sample the figures come from (0: not sampled).
    #[serde(default)]
    pub sampled_at: i64,
    /// Processes the figures cover: the instances, or (containment) every process of their
    /// cgroups.
    #[serde(default)]
    pub processes: u64,
    /// Where cpu (and, with the memory controller, memory) was read: "proc" (the main
    /// processes) or "cgroup" (the whole tree of each instance).
    #[serde(default)]
    pub figures_from: String,
    /// Pressure stall `some avg10` of the instances' cgroups (containment, PSI): the share
    /// of the last 10 s in which some task of the process waited for cpu, memory or io.
    #[serde(default)]
    pub psi_cpu: Option<f64>,
    #[serde(default)]
    pub psi_memory: Option<f64>,
    #[serde(default)]
    pub psi_io: Option<f64>,
    /// Times the agent stopped it for staying over a resource limit.
    #[serde(default)]
    pub limit_stops: u64,
    /// The latest such stop: "UNIX_SECONDS: cause".
    #[serde(default)]
    pub last_limit: Option<String>,
    /// How `mem_lmt` is enforced: "none" (no limit), "polled" (samples, the stop path
    /// after `metrics.limit_samples` of them) or "memory.high" (containment with the memory
    /// controller: the cgroup's limit, answered at once).
    #[serde(default)]
    pub mem_limit_by: String,
    /// How `cpu_lmt` is enforced: "none", "polled" or "cpu.max" (throttled, with
    /// `supervisor.cpu_limit = "throttle"` and the cpu controller).
    #[serde(default)]
    pub cpu_limit_by: String,
    pub health: Option<String>,
    pub busy: Option<String>,
    /// The whole definition; absent when the query asked for `brief` entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ProcSpec>,
}

/// `POST /v1/procs` filter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcsQuery {
    #[serde(default, deserialize_with = "de_str")]
    pub namespace: String,
    #[serde(default, deserialize_with = "de_str")]
    pub name: String,
    /// `key=value` selectors, all must match.
    #[serde(default, deserialize_with = "de_vec")]
    pub labels: Vec<String>,
    /// Leave out each entry's `spec` (what a status table needs: half the bytes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub brief: bool,
}

/// `GET /v1/healthz` data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pid: i64,
    pub uptime_secs: i64,
    /// "pidfd" or "poll".
    pub exit_detection: String,
    pub subreaper: bool,
    pub store: String,
    pub store_writable: bool,
    pub processes: u64,
    pub managed: u64,
    pub running: u64,
    pub host: HostIdentityView,
    /// Caller-chosen paths (pid files, log paths, setup paths) whose file-system call has not
    /// returned for a while: "PATH (for Ns)", longest first. A hung mount shows here.
    #[serde(default)]
    pub blocked_paths: Vec<String>,
    /// Mounts that do not answer (`statfs` of the mount point has not returned): "MOUNT (for
    /// Ns)". New work on paths there fails at once, naming the mount, until it answers.
    #[serde(default)]
    pub hung_mounts: Vec<String>,
    /// Containment: "off (why)" or "on at PATH (controllers: ...)".
    #[serde(default)]
    pub containment: String,
    /// The socket this request came through: "main" or "root".
    #[serde(default)]
    pub socket: String,
    /// The sockets served, by kind ("main", "root") with their paths.
    #[serde(default)]
    pub sockets: std::collections::BTreeMap<String, String>,
}

/// This agent's identity as reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostIdentityView {
    pub ip: String,
    pub bk_cloud_id: i64,
    pub bk_supplier_id: i64,
    pub agent_id: String,
}

/// The operation types of operate_proc. On the wire an operation is its GSE integer code
/// ([`OpType::code`]): it serializes as that integer and deserializes from it (a number or
/// a numeric string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpType {
    Start,
    Stop,
    Status,
    Delegate,
    Undelegate,
    Restart,
    Reload,
    Kill,
}

impl OpType {
    pub fn from_code(c: i64) -> Option<OpType> {
        Some(match c {
            0 => OpType::Start,
            1 => OpType::Stop,
            2 => OpType::Status,
            3 => OpType::Delegate,
            4 => OpType::Undelegate,
            7 => OpType::Restart,
            8 => OpType::Reload,
            9 => OpType::Kill,
            _ => return None,
        })
    }
    pub fn code(self) -> i64 {
        match self {
            OpType::Start => 0,
            OpType::Stop => 1,
            OpType::Status => 2,
            OpType::Delegate => 3,
            OpType::Undelegate => 4,
            OpType::Restart => 7,
            OpType::Reload => 8,
            OpType::Kill => 9,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            OpType::Start => "start",
            OpType::Stop => "stop",
            OpType::Status => "status",
            OpType::Delegate => "manage",
            OpType::Undelegate => "unmanage",
            OpType::Restart => "restart",
            OpType::Reload => "reload",
            OpType::Kill => "kill",
        }
    }
    /// Does this operation change anything (as opposed to a status query)?
    pub fn mutating(self) -> bool {
        self != OpType::Status
    }
}

impl Serialize for OpType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.code())
    }
}

impl<'de> Deserialize<'de> for OpType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let c = de_opt_i64(d)?
            .ok_or_else(|| serde::de::Error::custom("expected an op_type, got null"))?;
        OpType::from_code(c)
            .ok_or_else(|| serde::de::Error::custom(format!("{c} is not a valid op_type")))
    }
}

/// An event of the supervision history (`GET /v1/events`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    #[serde(default)]
    pub id: u64,
    /// Unix milliseconds.
    #[serde(default)]
    pub ts_ms: i64,
    /// `namespace/name`, empty for agent-wide events (and for the stream's `lagged` note,
    /// which carries only `kind` and `message`).
    #[serde(default)]
    pub key: String,
    /// started, exited, restarting, backoff, adopted, stopped, limit_exceeded, operator, ...
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec sent through the wire comes back the same: every API field is carried.
    #[test]
    fn a_spec_round_trips_through_the_wire() {
        let spec = ProcSpec {
            setup_path: "/opt/app".into(),
            proc_name: "app".into(),
            pid_path: "/run/app.pid".into(),
            config_path: "/etc/app.conf".into(),
            log_path: "/var/log/app".into(),
            account: "svc".into(),
            value_key: "k".into(),
            start_cmd: "./app".into(),
            stop_cmd: "kill 1".into(),
            restart_cmd: "r".into(),
            reload_cmd: "l".into(),
            kill_cmd: "k".into(),
            version_cmd: "v".into(),
            health_cmd: "h".into(),
            cpu_lmt: 12.5,
            mem_lmt: 3.0,
            auto_type: crate::spec::AutoType::Periodic,
            start_check_secs: 4,
            start_check_begin_time: Some(1),
            start_check_end_time: Some(6),
            stop_check_secs: 7,
            op_timeout: 30,
            cycle_time: 60,
            instance_num: 2,
            start_retries: Some(5),
            start_interval: Some(9),
            max_restarts: Some(11),
            ..ProcSpec::default()
        };
        let wire: SpecWire =
            serde_json::from_value(serde_json::to_value(SpecWire::from_spec(&spec)).unwrap())
                .unwrap();
        assert_eq!(wire.to_spec().unwrap(), spec);
    }

    #[test]
    fn lenient_numbers_and_nulls() {
        let r: OperateProcReq = serde_json::from_str(
            r#"{"meta":{"namespace":"n","name":"x","labels":{"bk_process_id":46}},
                "op_type":"0","hosts":[{"ip":"1.2.3.4","bk_cloud_id":"0"}],
                "spec":{"alive_monitor_policy":{"auto_type":1,"op_timeout":null,"start_check_secs":null}},
                "no_request":true,"bk_app_secret":"s"}"#,
        )
        .unwrap();
        assert_eq!(r.op_type, Some(0));
        assert_eq!(r.hosts[0].bk_cloud_id, Some(0));
        assert_eq!(r.hosts[0].bk_supplier_id, None);
        assert_eq!(r.meta.labels["bk_process_id"], serde_json::json!(46));
        let spec = SpecWire {
            identity: Some(IdentityWire {
                proc_name: "p".into(),
                setup_path: "/opt".into(),
                ..Default::default()
            }),
            ..r.spec.unwrap()
        };
        let s = spec.to_spec().unwrap();
        assert_eq!(s.op_timeout, 60);
        assert_eq!(s.start_check_secs, 5);
    }

    #[test]
    fn spec_errors_use_wire_paths() {
        let w: SpecWire = serde_json::from_str(
            r#"{"identity":{"proc_name":"","setup_path":"rel"},"resource":{"cpu":300}}"#,
        )
        .unwrap();
        let errs = w.to_spec().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"spec.identity.proc_name"), "{fields:?}");
        assert!(fields.contains(&"spec.identity.setup_path"), "{fields:?}");
        assert!(fields.contains(&"spec.resource.cpu"), "{fields:?}");
    }

    #[test]
    fn op_types() {
        for c in [0, 1, 2, 3, 4, 7, 8, 9] {
            assert_eq!(OpType::from_code(c).unwrap().code(), c);
        }
        for c in [-1, 5, 6, 10] {
            assert!(OpType::from_code(c).is_none());
        }
    }

    #[test]
    fn op_types_are_their_codes_on_the_wire() {
        assert_eq!(
            serde_json::to_value(OpType::Restart).unwrap(),
            serde_json::json!(7)
        );
        assert_eq!(
            serde_json::to_value(OpType::Delegate).unwrap(),
            serde_json::json!(3)
        );
        let o: OpType = serde_json::from_str("\"9\"").unwrap();
        assert_eq!(o, OpType::Kill);
        assert!(serde_json::from_str::<OpType>("5").is_err());
        // The CLI's request: the op by name, the integer on the wire, and no field the
        // server does not read as absent.
        let r = OperateProcReq::new(&ProcKey::new("n", "x"), OpType::Stop, vec![]);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["op_type"], serde_json::json!(1));
        let back: OperateProcReq = serde_json::from_value(v).unwrap();
        assert_eq!(back.op_type, Some(1));
        assert!(back.spec.is_none() && back.agent_id_list.is_empty());
    }

    #[test]
    fn typed_answers_ignore_unknown_fields_and_take_defaults() {
        // A newer agent's extra fields, an older agent's missing optional ones.
        let t: TaskList = serde_json::from_str(
            r#"{"list":[{"task_id":"T","api":"operate_proc","op_type":0,"created_ms":1,
                "new_field":true,"items":[{"key":"k","result":{"error_code":0,
                "error_msg":"success","content":"","extra":1}}]}],"more":2}"#,
        )
        .unwrap();
        assert_eq!(t.list[0].items[0].definition, None);
        assert_eq!(t.list[0].peer_uid, None);
        let e: Event = serde_json::from_str(r#"{"kind":"lagged","message":"3 dropped"}"#).unwrap();
        assert_eq!((e.id, e.key.as_str(), e.kind.as_str()), (0, "", "lagged"));
        let l: LogLine =
            serde_json::from_str(r#"{"source":"log","file":"/f","line":"x"}"#).unwrap();
        assert_eq!(l.line.as_deref(), Some("x"));
        // Written in the order the JSON objects are: alphabetical.
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            serde_json::to_value(&l).unwrap().to_string()
        );
    }

    #[test]
    fn max_restarts_is_typed_in_the_monitor_policy() {
        let w: SpecWire = serde_json::from_str(
            r#"{"identity":{"proc_name":"p","setup_path":"/opt"},
                "monitor_policy":{"auto_type":1,"max_restarts":"4"}}"#,
        )
        .unwrap();
        assert_eq!(w.to_spec().unwrap().max_restarts, Some(4));
        let none: SpecWire =
            serde_json::from_str(r#"{"identity":{"proc_name":"p","setup_path":"/opt"}}"#).unwrap();
        assert_eq!(none.to_spec().unwrap().max_restarts, None, "unlimited");
        let bad: SpecWire = serde_json::from_str(
            r#"{"identity":{"proc_name":"p","setup_path":"/opt"},"monitor_policy":{"max_restarts":-2}}"#,
        )
        .unwrap();
        let msgs: Vec<String> = bad
            .to_spec()
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            msgs,
            ["spec.monitor_policy.max_restarts: must not be negative, got -2"]
        );
    }

    #[test]
    fn spec_errors_keep_the_wire_phrasing() {
        let w: SpecWire = serde_json::from_str(
            r#"{"identity":{"proc_name":"p","setup_path":"/opt","user":"a b"},
                "resource":{"mem":200},
                "monitor_policy":{"auto_type":5,"op_timeout":-1,"cmd_shell_ext":"bat"}}"#,
        )
        .unwrap();
        let msgs: Vec<String> = w
            .to_spec()
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        for want in [
            "spec.monitor_policy.auto_type: must be 0 (periodic), 1 (resident) or 2 (single-run), got 5",
            "spec.monitor_policy.op_timeout: must not be negative, got -1",
            "spec.identity.user: is not a valid account name",
            "spec.resource.mem: must be a percentage between 0 and 100",
            "spec.monitor_policy.cmd_shell_ext: \"bat\" is not supported; only \"sh\" (the default) is",
        ] {
            assert!(msgs.iter().any(|m| m == want), "{want:?} not in {msgs:?}");
        }
        let w: SpecWire = serde_json::from_str(
            r#"{"identity":{"proc_name":"p","setup_path":"/opt"},"control":{"cmd_shell_ext":" sh "},
                "alive_monitor_policy":{"instance_num":2,"start_retries":3}}"#,
        )
        .unwrap();
        let s = w.to_spec().unwrap();
        assert_eq!(s.cmd_shell_ext, "sh");
        assert_eq!((s.instance_num, s.start_retries), (2, Some(3)));
    }
}
