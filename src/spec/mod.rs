//! Process definitions: the key that names a process and the GSE spec that says how to run it.
//!
//! A definition is keyed by `namespace` + `name` (GSE's `meta`). Its [`ProcSpec`] flattens
//! GSE's `spec.identity`, `spec.control`, `spec.resource` and `spec.monitor_policy` (or the
//! flat `operate_process` v2 fields) into one struct with defaults filled in, so the rest of
//! the agent never looks at wire shapes. Empty strings mean "absent" for every optional text
//! field (callers send `""` for commands they do not have).
//!
//! [`patch`] holds the one decoder (a patch laid over a base, every check made once) and
//! [`identity`] the one identity function.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod identity;
pub mod patch;

pub use identity::Identity;
pub use patch::{FieldError, MAX_TEXT, Rule, SpecPatch};

/// Labels as callers send them: string keys, values of any JSON type (GSEKit sends an int
/// `bk_process_id`), returned exactly as given.
pub type Labels = serde_json::Map<String, serde_json::Value>;

/// The identity of a definition: `namespace` + `name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProcKey {
    pub namespace: String,
    pub name: String,
}

impl ProcKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ProcKey {
        ProcKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ProcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ProcKey {
    type Err = String;
    /// `NS/NAME` as the CLI takes it (the name may itself contain `/`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok(ProcKey::new(ns, name)),
            _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
        }
    }
}

/// GSE's `auto_type` / v2 `type`: how the process is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoType {
    /// 0: `start_cmd` runs every `cycle_time` seconds; a cycle is skipped while the previous
    /// run is still alive.
    Periodic,
    /// 1: kept running; restarted when it dies.
    #[default]
    Resident,
    /// 2: runs once; never restarted.
    SingleRun,
}

impl AutoType {
    pub fn code(self) -> i64 {
        match self {
            AutoType::Periodic => 0,
            AutoType::Resident => 1,
            AutoType::SingleRun => 2,
        }
    }
    pub fn from_code(code: i64) -> Option<AutoType> {
        match code {
            0 => Some(AutoType::Periodic),
            1 => Some(AutoType::Resident),
            2 => Some(AutoType::SingleRun),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            AutoType::Periodic => "periodic",
            AutoType::Resident => "resident",
            AutoType::SingleRun => "single-run",
        }
    }
}

impl Serialize for AutoType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.code())
    }
}

impl<'de> Deserialize<'de> for AutoType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        AutoType::from_code(v).ok_or_else(|| {
            serde::de::Error::custom(format!("auto_type must be 0, 1 or 2, got {v}"))
        })
    }
}

/// Default seconds after a start before the liveness check (GSE `start_check_secs`).
pub const DEFAULT_START_CHECK_SECS: u64 = 5;
/// Default seconds an operation may take (GSE `op_timeout`).
pub const DEFAULT_OP_TIMEOUT: u64 = 60;
/// Default seconds to wait for a process to go away after `stop_cmd`.
pub const DEFAULT_STOP_CHECK_SECS: u64 = 5;

/// Everything the agent needs to run, check and stop one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcSpec {
    // identity
    /// Working directory of every command; relative commands (`./start.sh`) run here.
    pub setup_path: String,
    /// The program's name, used to recognise its process (exe, comm or argv file name).
    pub proc_name: String,
    /// Where the process writes its pid. Empty: the process is the agent's own child.
    pub pid_path: String,
    pub config_path: String,
    pub log_path: String,
    /// System account commands run as. Empty: the agent's own account (root as a service).
    pub account: String,
    pub contact: String,
    pub func_id: String,
    pub instance_id: String,
    /// operate_process v2 index key (empty: setup_path + proc_name).
    pub value_key: String,
    // control
    pub start_cmd: String,
    pub stop_cmd: String,
    pub restart_cmd: String,
    pub reload_cmd: String,
    pub kill_cmd: String,
    pub version_cmd: String,
    pub health_cmd: String,
    // resource: percent; 0 = no limit
    /// Percent of the whole machine (all cores together), as GSE documents `cpu_lmt`.
    pub cpu_lmt: f64,
    /// Percent of MemTotal.
    pub mem_lmt: f64,
    // monitor policy
    pub auto_type: AutoType,
    pub start_check_secs: u64,
    pub start_check_begin_time: Option<u64>,
    pub start_check_end_time: Option<u64>,
    pub stop_check_secs: u64,
    pub op_timeout: u64,
    pub cycle_time: u64,
    pub instance_num: u32,
    pub start_retries: Option<u32>,
    pub start_interval: Option<u64>,
    /// Failures in a row (failed start checks, liveness and limit stops) after which a
    /// managed process is given up (the `fatal` state). `None`: never given up.
    pub max_restarts: Option<u32>,
    pub cmd_shell_ext: String,
    /// Extra environment for every command (config files only).
    pub env: BTreeMap<String, String>,
}

impl Default for ProcSpec {
    fn default() -> Self {
        ProcSpec {
            setup_path: String::new(),
            proc_name: String::new(),
            pid_path: String::new(),
            config_path: String::new(),
            log_path: String::new(),
            account: String::new(),
            contact: String::new(),
            func_id: String::new(),
            instance_id: String::new(),
            value_key: String::new(),
            start_cmd: String::new(),
            stop_cmd: String::new(),
            restart_cmd: String::new(),
            reload_cmd: String::new(),
            kill_cmd: String::new(),
            version_cmd: String::new(),
            health_cmd: String::new(),
            cpu_lmt: 0.0,
            mem_lmt: 0.0,
            auto_type: AutoType::Resident,
            start_check_secs: DEFAULT_START_CHECK_SECS,
            start_check_begin_time: None,
            start_check_end_time: None,
            stop_check_secs: DEFAULT_STOP_CHECK_SECS,
            op_timeout: DEFAULT_OP_TIMEOUT,
            cycle_time: 0,
            instance_num: 1,
            start_retries: None,
            start_interval: None,
            max_restarts: None,
            cmd_shell_ext: String::new(),
            env: BTreeMap::new(),
        }
    }
}

impl ProcSpec {
    /// The start check window: seconds after the start command from which the process must
    /// be alive (`begin`) and until which it must stay alive (`end`).
    pub fn start_check_window(&self) -> (u64, u64) {
        let begin = self.start_check_begin_time.unwrap_or(self.start_check_secs);
        let end = self.start_check_end_time.unwrap_or(begin).max(begin);
        (begin, end)
    }

    /// The program `proc_name` stands for: its last path component (`/opt/app/bin/app` →
    /// `app`); `None` when that is empty (`/`, `.`, `dir/`), which would match every process.
    pub fn program_name(&self) -> Option<&str> {
        program_name(&self.proc_name)
    }

    /// The command for an operation, `None` when absent (empty or only spaces).
    pub fn command(&self, which: CommandKind) -> Option<&str> {
        let c = match which {
            CommandKind::Start => &self.start_cmd,
            CommandKind::Stop => &self.stop_cmd,
            CommandKind::Restart => &self.restart_cmd,
            CommandKind::Reload => &self.reload_cmd,
            CommandKind::Kill => &self.kill_cmd,
            CommandKind::Version => &self.version_cmd,
            CommandKind::Health => &self.health_cmd,
        };
        let t = c.trim();
        if t.is_empty() { None } else { Some(t) }
    }
}

/// The program a `proc_name` stands for: its last path component; `None` when that is
/// empty (`/`, `.`, `""`, `dir/`).
pub fn program_name(proc_name: &str) -> Option<&str> {
    let t = proc_name.trim();
    let b = t.rsplit('/').next().unwrap_or(t);
    if b.is_empty() || b == "." || b == ".." {
        None
    } else {
        Some(b)
    }
}

/// Which control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Start,
    Stop,
    Restart,
    Reload,
    Kill,
    Version,
    Health,
}

impl CommandKind {
    /// The spec field that holds this command (for error messages).
    pub fn field(self) -> &'static str {
        match self {
            CommandKind::Start => "start_cmd",
            CommandKind::Stop => "stop_cmd",
            CommandKind::Restart => "restart_cmd",
            CommandKind::Reload => "reload_cmd",
            CommandKind::Kill => "kill_cmd",
            CommandKind::Version => "version_cmd",
            CommandKind::Health => "health_cmd",
        }
    }
}

/// Where a definition came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Source {
    /// Registered through the API (register/update_proc_info or an inline spec).
    Api,
    /// Declared in a config file; the file wins over API updates at every (re)load.
    Config { file: String },
}

/// A registered process definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub key: ProcKey,
    #[serde(default)]
    pub labels: Labels,
    pub spec: ProcSpec,
    pub source: Source,
    /// Unix seconds of the first registration.
    pub register_time: i64,
    /// Unix seconds of the last change.
    pub updated_time: i64,
}

/// Validate a key (namespace and name).
pub fn validate_key(key: &ProcKey) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (field, v) in [("meta.namespace", &key.namespace), ("meta.name", &key.name)] {
        if v.trim().is_empty() {
            errs.push(FieldError::new(field, "is required"));
        } else if v.len() > 256 {
            errs.push(FieldError::new(field, "longer than 256 bytes"));
        } else if v.chars().any(|c| c.is_control()) {
            errs.push(FieldError::new(
                field,
                "must not contain control characters or NUL",
            ));
        }
    }
    errs
}

/// Labels one definition may carry.
pub const MAX_LABELS: usize = 64;
/// Bytes of a label's key.
pub const MAX_LABEL_KEY: usize = 128;
/// Bytes of a label's value (a string's bytes, else its JSON text): every selector and
/// expression matched against labels costs their length, so it is bounded where they are
/// written.
pub const MAX_LABEL_VALUE: usize = 1024;

/// Check a definition's labels: how many, and the length of each key and value.
pub fn validate_labels(labels: &Labels) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if labels.len() > MAX_LABELS {
        errs.push(FieldError::new(
            "meta.labels",
            format!("has {} labels; at most {MAX_LABELS}", labels.len()),
        ));
    }
    for (k, v) in labels {
        let field = format!("meta.labels.{}", k.chars().take(64).collect::<String>());
        if k.is_empty() || k.len() > MAX_LABEL_KEY || k.chars().any(|c| c.is_control()) {
            errs.push(FieldError::new(
                &field,
                format!(
                    "a label's name must be 1 to {MAX_LABEL_KEY} bytes without control characters"
                ),
            ));
        }
        let len = match v {
            serde_json::Value::String(s) => s.len(),
            other => other.to_string().len(),
        };
        if len > MAX_LABEL_VALUE {
            errs.push(FieldError::new(
                &field,
                format!("value of {len} bytes; at most {MAX_LABEL_VALUE}"),
            ));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::patch::tests::valid;
    use super::*;

    #[test]
    fn labels_are_bounded() {
        let mut l = Labels::new();
        l.insert("app".into(), serde_json::json!("web"));
        l.insert("n".into(), serde_json::json!(7));
        assert!(validate_labels(&l).is_empty());
        l.insert(
            "big".into(),
            serde_json::json!("x".repeat(MAX_LABEL_VALUE + 1)),
        );
        l.insert("k".repeat(MAX_LABEL_KEY + 1), serde_json::json!(1));
        l.insert("arr".into(), serde_json::json!(vec![1; 600]));
        let errs = validate_labels(&l);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().any(|e| e.field == "meta.labels.big"));
        let many: Labels = (0..MAX_LABELS + 1)
            .map(|i| (format!("l{i}"), serde_json::json!(i)))
            .collect();
        assert_eq!(validate_labels(&many).len(), 1);
    }

    #[test]
    fn key_parse_and_display() {
        let k: ProcKey = "gse/proc-test".parse().unwrap();
        assert_eq!(k, ProcKey::new("gse", "proc-test"));
        assert_eq!(k.to_string(), "gse/proc-test");
        assert!("noslash".parse::<ProcKey>().is_err());
        assert!("/x".parse::<ProcKey>().is_err());
    }

    #[test]
    fn empty_commands_are_absent() {
        let s = ProcSpec {
            stop_cmd: "   ".into(),
            ..valid()
        };
        assert_eq!(s.command(CommandKind::Stop), None);
        assert_eq!(s.command(CommandKind::Start), Some("./start.sh"));
    }

    #[test]
    fn start_check_window() {
        let s = valid();
        assert_eq!(s.start_check_window(), (5, 5));
        let s = ProcSpec {
            start_check_begin_time: Some(1),
            start_check_end_time: Some(4),
            ..valid()
        };
        assert_eq!(s.start_check_window(), (1, 4));
    }
}
