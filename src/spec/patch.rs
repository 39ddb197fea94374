//! The one spec decoder: a [`SpecPatch`] (every field optional) laid over a base
//! [`ProcSpec`] by [`SpecPatch::apply`], which does every check and fills every default.
//!
//! The three readers (the GSE JSON spec in `proto.rs`, `operate_process` v2 entries in
//! `api/gsekit/operate.rs`, TOML `[[process]]` tables in `config.rs`) only map their own names into
//! a patch, and map the [`FieldError`]s back to their own names (and, for the TOML reader,
//! its own phrasing, from [`Rule`]). A field the patch leaves out keeps the base's value:
//! the defaults ([`ProcSpec::default`]) for a new definition, the registered spec for a v2
//! entry that names an existing process.

use std::collections::BTreeMap;
use std::fmt;

use super::{AutoType, ProcSpec};

/// One problem with one field of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The [`ProcSpec`] field (a reader maps it to its own name).
    pub field: String,
    pub message: String,
    /// The rule broken, for readers that phrase it their own way.
    pub rule: Rule,
}

/// Which rule a [`FieldError`] reports, with what a reader needs to phrase it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Rule {
    /// Anything else: the message says it.
    #[default]
    Other,
    /// A number outside its range (`got` as given, bounds inclusive).
    Range {
        got: String,
        min: String,
        max: String,
    },
    /// An `auto_type` code that is not 0, 1 or 2.
    AutoTypeCode(i64),
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_string(),
            message: message.into(),
            rule: Rule::Other,
        }
    }

    fn range(field: &str, message: &str, got: impl fmt::Display, min: i64, max: i64) -> Self {
        FieldError {
            field: field.to_string(),
            message: message.to_string(),
            rule: Rule::Range {
                got: got.to_string(),
                min: min.to_string(),
                max: max.to_string(),
            },
        }
    }

    /// Errors as one message: `field: message; field: message`.
    pub fn joined(errs: &[FieldError]) -> String {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// This error with its field renamed by a reader.
    pub fn renamed(&self, field: String) -> FieldError {
        FieldError {
            field,
            ..self.clone()
        }
    }
}

/// Longest accepted command or path, in bytes.
pub const MAX_TEXT: usize = 8192;

/// A spec as one reader gave it: `None` keeps the base's value. Numbers are as given
/// (signed: [`SpecPatch::apply`] refuses negative ones), `auto_type` is the GSE code.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecPatch {
    pub setup_path: Option<String>,
    pub proc_name: Option<String>,
    pub pid_path: Option<String>,
    pub config_path: Option<String>,
    pub log_path: Option<String>,
    pub account: Option<String>,
    pub contact: Option<String>,
    pub func_id: Option<String>,
    pub instance_id: Option<String>,
    pub value_key: Option<String>,
    pub start_cmd: Option<String>,
    pub stop_cmd: Option<String>,
    pub restart_cmd: Option<String>,
    pub reload_cmd: Option<String>,
    pub kill_cmd: Option<String>,
    pub version_cmd: Option<String>,
    pub health_cmd: Option<String>,
    pub cmd_shell_ext: Option<String>,
    pub cpu_lmt: Option<f64>,
    pub mem_lmt: Option<f64>,
    pub auto_type: Option<i64>,
    pub start_check_secs: Option<i64>,
    pub start_check_begin_time: Option<i64>,
    pub start_check_end_time: Option<i64>,
    pub stop_check_secs: Option<i64>,
    pub op_timeout: Option<i64>,
    pub cycle_time: Option<i64>,
    pub instance_num: Option<i64>,
    pub start_retries: Option<i64>,
    pub start_interval: Option<i64>,
    pub max_restarts: Option<i64>,
    pub env: Option<BTreeMap<String, String>>,
}

/// The range of a whole-number field and what its error says.
fn int_bounds(field: &str) -> (i64, i64, &'static str) {
    match field {
        "op_timeout" => (1, 86_400, "must be between 1 and 86400 seconds"),
        "instance_num" => (1, 256, "must be between 1 and 256"),
        "cycle_time" => (0, 31_536_000, "must be at most one year"),
        "start_retries" => (0, 100, "must be at most 100"),
        "max_restarts" => (0, 1_000_000, "must be at most 1000000"),
        // start_check_secs, start_check_begin_time, start_check_end_time, stop_check_secs,
        // start_interval
        _ => (0, 3_600, "must be at most 3600 seconds"),
    }
}

impl SpecPatch {
    /// Lay this patch over `base` and check the result: every problem is listed (field
    /// names are [`ProcSpec`]'s), and nothing is returned unless there are none.
    pub fn apply(&self, base: &ProcSpec) -> Result<ProcSpec, Vec<FieldError>> {
        let mut s = base.clone();
        let mut errs = Vec::new();
        let texts: [(&Option<String>, &mut String); 18] = [
            (&self.setup_path, &mut s.setup_path),
            (&self.proc_name, &mut s.proc_name),
            (&self.pid_path, &mut s.pid_path),
            (&self.config_path, &mut s.config_path),
            (&self.log_path, &mut s.log_path),
            (&self.account, &mut s.account),
            (&self.contact, &mut s.contact),
            (&self.func_id, &mut s.func_id),
            (&self.instance_id, &mut s.instance_id),
            (&self.value_key, &mut s.value_key),
            (&self.start_cmd, &mut s.start_cmd),
            (&self.stop_cmd, &mut s.stop_cmd),
            (&self.restart_cmd, &mut s.restart_cmd),
            (&self.reload_cmd, &mut s.reload_cmd),
            (&self.kill_cmd, &mut s.kill_cmd),
            (&self.version_cmd, &mut s.version_cmd),
            (&self.health_cmd, &mut s.health_cmd),
            (&self.cmd_shell_ext, &mut s.cmd_shell_ext),
        ];
        for (from, to) in texts {
            if let Some(v) = from {
                v.clone_into(to);
            }
        }
        if let Some(c) = self.auto_type {
            match AutoType::from_code(c) {
                Some(a) => s.auto_type = a,
                None => errs.push(FieldError {
                    field: "auto_type".into(),
                    message: format!(
                        "must be 0 (periodic), 1 (resident) or 2 (single-run), got {c}"
                    ),
                    rule: Rule::AutoTypeCode(c),
                }),
            }
        }
        let mut nonneg = |field: &str, v: Option<i64>| -> Option<u64> {
            match v {
                Some(i) if i < 0 => {
                    let (min, max, _) = int_bounds(field);
                    let msg = format!("must not be negative, got {i}");
                    errs.push(FieldError::range(field, &msg, i, min, max));
                    None
                }
                other => other.map(|i| i as u64),
            }
        };
        let small = |v: u64| v.min(u32::MAX as u64) as u32;
        if let Some(v) = nonneg("start_check_secs", self.start_check_secs) {
            s.start_check_secs = v;
        }
        if let Some(v) = nonneg("start_check_begin_time", self.start_check_begin_time) {
            s.start_check_begin_time = Some(v);
        }
        if let Some(v) = nonneg("start_check_end_time", self.start_check_end_time) {
            s.start_check_end_time = Some(v);
        }
        if let Some(v) = nonneg("stop_check_secs", self.stop_check_secs) {
            s.stop_check_secs = v;
        }
        if let Some(v) = nonneg("op_timeout", self.op_timeout) {
            s.op_timeout = v;
        }
        if let Some(v) = nonneg("cycle_time", self.cycle_time) {
            s.cycle_time = v;
        }
        if let Some(v) = nonneg("instance_num", self.instance_num) {
            s.instance_num = small(v);
        }
        if let Some(v) = nonneg("start_retries", self.start_retries) {
            s.start_retries = Some(small(v));
        }
        if let Some(v) = nonneg("start_interval", self.start_interval) {
            s.start_interval = Some(v);
        }
        if let Some(v) = nonneg("max_restarts", self.max_restarts) {
            s.max_restarts = Some(small(v));
        }
        if let Some(v) = self.cpu_lmt {
            s.cpu_lmt = v;
        }
        if let Some(v) = self.mem_lmt {
            s.mem_lmt = v;
        }
        if let Some(env) = &self.env {
            s.env = env.clone();
        }
        errs.extend(s.validate());
        if errs.is_empty() { Ok(s) } else { Err(errs) }
    }
}

impl ProcSpec {
    /// Every problem with this spec (empty when valid): what [`SpecPatch::apply`] checks,
    /// also run on definitions read back from the store.
    pub fn validate(&self) -> Vec<FieldError> {
        fn fe(field: &str, message: impl Into<String>) -> FieldError {
            FieldError::new(field, message)
        }
        let mut errs = Vec::new();
        let texts: [(&str, &str); 18] = [
            ("setup_path", &self.setup_path),
            ("proc_name", &self.proc_name),
            ("pid_path", &self.pid_path),
            ("config_path", &self.config_path),
            ("log_path", &self.log_path),
            ("account", &self.account),
            ("contact", &self.contact),
            ("func_id", &self.func_id),
            ("instance_id", &self.instance_id),
            ("value_key", &self.value_key),
            ("start_cmd", &self.start_cmd),
            ("stop_cmd", &self.stop_cmd),
            ("restart_cmd", &self.restart_cmd),
            ("reload_cmd", &self.reload_cmd),
            ("kill_cmd", &self.kill_cmd),
            ("version_cmd", &self.version_cmd),
            ("health_cmd", &self.health_cmd),
            ("cmd_shell_ext", &self.cmd_shell_ext),
        ];
        for (name, v) in texts {
            if v.contains('\0') {
                errs.push(fe(name, "must not contain NUL bytes"));
            }
            if v.len() > MAX_TEXT {
                errs.push(fe(name, format!("longer than {MAX_TEXT} bytes")));
            }
        }
        if self.setup_path.trim().is_empty() {
            errs.push(fe("setup_path", "is required"));
        } else if !self.setup_path.starts_with('/') {
            errs.push(fe("setup_path", "must be an absolute path"));
        }
        if self.proc_name.trim().is_empty() {
            errs.push(fe("proc_name", "is required"));
        } else if self.program_name().is_none() {
            errs.push(fe(
                "proc_name",
                format!(
                    "{:?} names no program: its last path component is empty (give the program's file name, like \"nginx\")",
                    self.proc_name
                ),
            ));
        }
        for (name, v) in [
            ("pid_path", &self.pid_path),
            ("config_path", &self.config_path),
            ("log_path", &self.log_path),
        ] {
            if !v.is_empty() && !v.starts_with('/') {
                errs.push(fe(name, "must be an absolute path"));
            }
        }
        if !self.account.is_empty()
            && !self
                .account
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
        {
            errs.push(fe("account", "is not a valid account name"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                errs.push(fe(&format!("env.{k}"), "invalid environment variable"));
            }
        }
        for (name, v) in [("cpu_lmt", self.cpu_lmt), ("mem_lmt", self.mem_lmt)] {
            if !(0.0..=100.0).contains(&v) || v.is_nan() {
                errs.push(FieldError::range(
                    name,
                    "must be a percentage between 0 and 100",
                    v,
                    0,
                    100,
                ));
            }
        }
        let ints: [(&str, Option<u64>); 10] = [
            ("op_timeout", Some(self.op_timeout)),
            ("start_check_secs", Some(self.start_check_secs)),
            ("stop_check_secs", Some(self.stop_check_secs)),
            ("start_check_begin_time", self.start_check_begin_time),
            ("start_check_end_time", self.start_check_end_time),
            ("instance_num", Some(u64::from(self.instance_num))),
            ("cycle_time", Some(self.cycle_time)),
            ("start_retries", self.start_retries.map(u64::from)),
            ("start_interval", self.start_interval),
            ("max_restarts", self.max_restarts.map(u64::from)),
        ];
        for (name, v) in ints {
            let (min, max, msg) = int_bounds(name);
            if let Some(v) = v
                && !(min as u64..=max as u64).contains(&v)
            {
                errs.push(FieldError::range(name, msg, v, min, max));
            }
        }
        if let (Some(b), Some(e)) = (self.start_check_begin_time, self.start_check_end_time)
            && e < b
        {
            errs.push(fe(
                "start_check_end_time",
                "must not be before start_check_begin_time",
            ));
        }
        if self.auto_type == AutoType::Periodic && self.cycle_time == 0 {
            errs.push(fe(
                "cycle_time",
                "is required (seconds, > 0) for a periodic process (auto_type 0)",
            ));
        }
        if !self.cmd_shell_ext.is_empty() && self.cmd_shell_ext != "sh" {
            errs.push(fe(
                "cmd_shell_ext",
                format!(
                    "{:?} is not supported; only \"sh\" (the default) is",
                    self.cmd_shell_ext
                ),
            ));
        }
        errs
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::{DEFAULT_OP_TIMEOUT, DEFAULT_START_CHECK_SECS, DEFAULT_STOP_CHECK_SECS};

    /// A valid spec (also used by `spec`'s own tests).
    pub(crate) fn valid() -> ProcSpec {
        ProcSpec {
            setup_path: "/opt/app".into(),
            proc_name: "app".into(),
            pid_path: "/opt/app/app.pid".into(),
            start_cmd: "./start.sh".into(),
            ..ProcSpec::default()
        }
    }

    /// A patch naming a valid process, over the defaults.
    fn minimal() -> SpecPatch {
        SpecPatch {
            setup_path: Some("/opt/app".into()),
            proc_name: Some("app".into()),
            ..SpecPatch::default()
        }
    }

    #[test]
    fn valid_spec_has_no_errors() {
        assert!(valid().validate().is_empty());
    }

    #[test]
    fn an_empty_patch_keeps_the_base_and_the_defaults_fill_the_rest() {
        assert_eq!(SpecPatch::default().apply(&valid()), Ok(valid()));
        let s = minimal().apply(&ProcSpec::default()).unwrap();
        assert_eq!(
            (s.op_timeout, s.start_check_secs, s.stop_check_secs),
            (
                DEFAULT_OP_TIMEOUT,
                DEFAULT_START_CHECK_SECS,
                DEFAULT_STOP_CHECK_SECS
            )
        );
        assert_eq!(
            (s.auto_type, s.instance_num, s.cycle_time),
            (AutoType::Resident, 1, 0)
        );
        assert_eq!((s.start_retries, s.start_interval), (None, None));
        assert_eq!((s.cpu_lmt, s.mem_lmt), (0.0, 0.0));
        assert!(s.env.is_empty() && s.value_key.is_empty());
    }

    #[test]
    fn a_patch_overrides_only_what_it_names() {
        let base = ProcSpec {
            health_cmd: "true".into(),
            stop_cmd: "./stop".into(),
            cpu_lmt: 10.0,
            op_timeout: 30,
            ..valid()
        };
        let p = SpecPatch {
            start_cmd: Some("./start".into()),
            stop_cmd: Some(String::new()),
            auto_type: Some(0),
            cycle_time: Some(60),
            instance_num: Some(3),
            start_retries: Some(2),
            env: Some([("A".to_string(), "1".to_string())].into()),
            ..SpecPatch::default()
        };
        let s = p.apply(&base).unwrap();
        assert_eq!(s.start_cmd, "./start");
        assert_eq!(s.stop_cmd, "", "an explicit empty string clears");
        assert_eq!(s.health_cmd, "true", "kept");
        assert_eq!((s.cpu_lmt, s.op_timeout), (10.0, 30), "kept");
        assert_eq!((s.auto_type, s.cycle_time), (AutoType::Periodic, 60));
        assert_eq!((s.instance_num, s.start_retries), (3, Some(2)));
        assert_eq!(s.env["A"], "1");
    }

    /// Every rule `apply` checks: (patch, field, message fragment, rule).
    #[test]
    fn every_check_names_its_field_and_rule() {
        let range = |got: &str, min: &str, max: &str| Rule::Range {
            got: got.into(),
            min: min.into(),
            max: max.into(),
        };
        let p = minimal;
        let cases: Vec<(SpecPatch, &str, &str, Rule)> = vec![
            (
                SpecPatch {
                    setup_path: None,
                    ..p()
                },
                "setup_path",
                "is required",
                Rule::Other,
            ),
            (
                SpecPatch {
                    setup_path: Some("rel".into()),
                    ..p()
                },
                "setup_path",
                "absolute",
                Rule::Other,
            ),
            (
                SpecPatch {
                    proc_name: Some(" ".into()),
                    ..p()
                },
                "proc_name",
                "is required",
                Rule::Other,
            ),
            (
                SpecPatch {
                    proc_name: Some("/opt/".into()),
                    ..p()
                },
                "proc_name",
                "names no program",
                Rule::Other,
            ),
            (
                SpecPatch {
                    pid_path: Some("x.pid".into()),
                    ..p()
                },
                "pid_path",
                "absolute",
                Rule::Other,
            ),
            (
                SpecPatch {
                    config_path: Some("x".into()),
                    ..p()
                },
                "config_path",
                "absolute",
                Rule::Other,
            ),
            (
                SpecPatch {
                    log_path: Some("x".into()),
                    ..p()
                },
                "log_path",
                "absolute",
                Rule::Other,
            ),
            (
                SpecPatch {
                    pid_path: Some("/a\0b".into()),
                    ..p()
                },
                "pid_path",
                "NUL",
                Rule::Other,
            ),
            (
                SpecPatch {
                    proc_name: Some("/".into()),
                    ..p()
                },
                "proc_name",
                "names no program",
                Rule::Other,
            ),
            (
                SpecPatch {
                    start_cmd: Some("a\0b".into()),
                    ..p()
                },
                "start_cmd",
                "NUL",
                Rule::Other,
            ),
            (
                SpecPatch {
                    kill_cmd: Some("x".repeat(MAX_TEXT + 1)),
                    ..p()
                },
                "kill_cmd",
                "longer than",
                Rule::Other,
            ),
            (
                SpecPatch {
                    account: Some("bad user".into()),
                    ..p()
                },
                "account",
                "account name",
                Rule::Other,
            ),
            (
                SpecPatch {
                    env: Some([("A=B".into(), "1".into())].into()),
                    ..p()
                },
                "env.A=B",
                "environment",
                Rule::Other,
            ),
            (
                SpecPatch {
                    cpu_lmt: Some(120.0),
                    ..p()
                },
                "cpu_lmt",
                "percentage",
                range("120", "0", "100"),
            ),
            (
                SpecPatch {
                    mem_lmt: Some(-1.5),
                    ..p()
                },
                "mem_lmt",
                "percentage",
                range("-1.5", "0", "100"),
            ),
            (
                SpecPatch {
                    mem_lmt: Some(f64::NAN),
                    ..p()
                },
                "mem_lmt",
                "percentage",
                range("NaN", "0", "100"),
            ),
            (
                SpecPatch {
                    auto_type: Some(7),
                    ..p()
                },
                "auto_type",
                "got 7",
                Rule::AutoTypeCode(7),
            ),
            (
                SpecPatch {
                    op_timeout: Some(0),
                    ..p()
                },
                "op_timeout",
                "between 1 and 86400",
                range("0", "1", "86400"),
            ),
            (
                SpecPatch {
                    op_timeout: Some(-5),
                    ..p()
                },
                "op_timeout",
                "must not be negative, got -5",
                range("-5", "1", "86400"),
            ),
            (
                SpecPatch {
                    op_timeout: Some(86_401),
                    ..p()
                },
                "op_timeout",
                "between 1 and 86400",
                range("86401", "1", "86400"),
            ),
            (
                SpecPatch {
                    start_check_secs: Some(3_601),
                    ..p()
                },
                "start_check_secs",
                "at most 3600",
                range("3601", "0", "3600"),
            ),
            (
                SpecPatch {
                    start_check_secs: Some(-1),
                    ..p()
                },
                "start_check_secs",
                "negative",
                range("-1", "0", "3600"),
            ),
            (
                SpecPatch {
                    stop_check_secs: Some(4_000),
                    ..p()
                },
                "stop_check_secs",
                "at most 3600",
                range("4000", "0", "3600"),
            ),
            (
                SpecPatch {
                    start_check_begin_time: Some(4_000),
                    ..p()
                },
                "start_check_begin_time",
                "at most 3600",
                range("4000", "0", "3600"),
            ),
            (
                SpecPatch {
                    start_check_end_time: Some(4_000),
                    ..p()
                },
                "start_check_end_time",
                "at most 3600",
                range("4000", "0", "3600"),
            ),
            (
                SpecPatch {
                    start_check_begin_time: Some(3),
                    start_check_end_time: Some(2),
                    ..p()
                },
                "start_check_end_time",
                "before start_check_begin_time",
                Rule::Other,
            ),
            (
                SpecPatch {
                    instance_num: Some(0),
                    ..p()
                },
                "instance_num",
                "between 1 and 256",
                range("0", "1", "256"),
            ),
            (
                SpecPatch {
                    instance_num: Some(257),
                    ..p()
                },
                "instance_num",
                "between 1 and 256",
                range("257", "1", "256"),
            ),
            (
                SpecPatch {
                    auto_type: Some(0),
                    ..p()
                },
                "cycle_time",
                "periodic",
                Rule::Other,
            ),
            (
                SpecPatch {
                    cycle_time: Some(31_536_001),
                    ..p()
                },
                "cycle_time",
                "one year",
                range("31536001", "0", "31536000"),
            ),
            (
                SpecPatch {
                    cycle_time: Some(-1),
                    ..p()
                },
                "cycle_time",
                "negative",
                range("-1", "0", "31536000"),
            ),
            (
                SpecPatch {
                    start_retries: Some(101),
                    ..p()
                },
                "start_retries",
                "at most 100",
                range("101", "0", "100"),
            ),
            (
                SpecPatch {
                    start_interval: Some(3_601),
                    ..p()
                },
                "start_interval",
                "at most 3600",
                range("3601", "0", "3600"),
            ),
            (
                SpecPatch {
                    cmd_shell_ext: Some("bat".into()),
                    ..p()
                },
                "cmd_shell_ext",
                "not supported",
                Rule::Other,
            ),
        ];
        for (patch, field, fragment, rule) in cases {
            let errs = patch.apply(&ProcSpec::default()).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.field == field && e.message.contains(fragment) && e.rule == rule),
                "expected {field} ({fragment}, {rule:?}), got {errs:?}"
            );
        }
    }

    #[test]
    fn a_negative_number_keeps_the_base_value_and_every_error_is_listed() {
        let p = SpecPatch {
            op_timeout: Some(-1),
            cpu_lmt: Some(300.0),
            setup_path: Some("rel".into()),
            ..minimal()
        };
        let errs = p.apply(&ProcSpec::default()).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["op_timeout", "setup_path", "cpu_lmt"]);
    }
}
