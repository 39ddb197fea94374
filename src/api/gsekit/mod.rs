//! GSEKit's APIs: `operate_process` (the flat v2 operation API, [`operate`]) and the
//! `process_status` list ([`status`]); this file holds what both read (the lenient wire
//! pieces, the label keys, the constants).
//!
//! # operate_process: two identity schemes, one registry
//!
//! A v2 process has no `meta`: GSE names it by `value_key` when one is given, else by
//! `setup_path` + `proc_name` (compared exactly as written). Each `process_infos` entry is
//! mapped onto a registry [`ProcKey`]:
//!
//! 1. a definition with that identity already exists (registered through `meta` by
//!    register_proc_info / operate_proc_multi, or by an earlier v2 call): its key is used, so
//!    a process is never defined twice;
//! 2. otherwise a new definition is keyed `operate_process/{value_key}`, or
//!    `operate_process/{proc_name}@{setup_path}` without a value_key ([`V2_NAMESPACE`]), and
//!    labelled `bk_biz_id`.
//!
//! The identity of a definition ([`Identity::of`]) is its spec's `value_key` when not empty, else its
//! `setup_path` + `proc_name`. An entry that names no single process is refused for itself
//! ([`Refusal`], 830 under its own result keys, saying what collides) while the other
//! entries run: an identity that several registered definitions share, entries of one
//! request named by one key that differ (two identities, or one identity with two specs
//! for an operation that stores its spec: "two processes with the same setup_path and
//! proc_name need distinct value_keys"), a synthetic key already taken by another identity
//! or too long.
//!
//! Matching is linear: the registry's identities are indexed once per request
//! ([`IdentityIndex`]), and the entries of a request are grouped by key, each compared with
//! its key's first entry. The
//! sizes are bounded by [`super::limits`] (process_infos, hosts per `ip_list`, result keys)
//! before any entry is resolved.
//!
//! The request's fields overwrite those of an existing definition; fields the request leaves
//! out keep their registered values (a new definition gets the defaults). Every operation
//! but 2 (status) and 4 (unmanage) stores the resulting spec first (creating the definition
//! when it is new); 4 updates an existing definition but never creates one; 2 changes
//! nothing. There is a result key for every `ip_list` member × process, in the form of the
//! result endpoint polled (`{bk_cloud_id}:{ip}:{namespace}:{name}` from
//! get_proc_operate_result_v2, with the supplier from get_proc_operate_result), present from
//! the first poll (115 while pending); members that are not this host get a per-host 117.
//!
//! # process_status: topology from labels
//!
//! GSEKit lists "processes" (one CMDB process on one host) each with its instances. Here an
//! instance is a definition; definitions with the same `bk_process_id` label (and business)
//! are the instances of one process, as GSEKit registers each instance as its own `meta`
//! (`GSEKIT_BIZ_{bk_biz_id}` / `{bk_process_name}_{local_inst_id}`). A definition without a
//! `bk_process_id` label is a process of its own. The topology comes from the labels listed
//! in [`LABEL_KEYS`] (docs/api.md says what each defaults to).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use super::ApiError;
use super::auth::Access;
use super::handlers::{self, KeyStyle, Target};
use super::limits::{self, KeyBudget, MAX_HOSTS, MAX_PROCESS_INFOS};
use super::submit::{Plan, Work};
use crate::expr::Expression;
use crate::proto::{FLAG_RUNNING, FLAG_STOPPED};
use crate::proto::{HostWire, KeyResult, OpType, codes, de_opt_f64, de_opt_i64};
use crate::proto::{ProcInstInfo, ProcessStatusList, ProcessStatusRow};

/// The registered definitions by key: what operate_process resolves against.
pub type Registry = std::collections::BTreeMap<ProcKey, crate::spec::Definition>;
use crate::spec::{
    FieldError, Identity, Labels, ProcKey, ProcSpec, Rule, Source, SpecPatch, validate_key,
};
use crate::supervisor::Engine;

/// Namespace of definitions created by operate_process.
pub const V2_NAMESPACE: &str = "operate_process";
/// GSEKit's separator of the five expression fields (`constants.EXPRESSION_SPLITTER`).
pub const EXPRESSION_SPLITTER: &str = "<-GSEKIT->";
/// Largest `pagesize` of process_status.
pub const MAX_PAGESIZE: i64 = 1000;
/// The label keys process_status reads.
pub const LABEL_KEYS: &[&str] = &[
    "id",
    "bk_biz_id",
    "bk_set_env",
    "bk_set_id",
    "bk_set_name",
    "bk_module_id",
    "bk_module_name",
    "service_instance_id",
    "service_instance_name",
    "bk_service_name",
    "service_template_id",
    "process_template_id",
    "bk_process_name",
    "bk_process_id",
    "local_inst_id",
    "inst_id",
    "bk_cloud_name",
    "config_templates",
];

// ---------------------------------------------------------------------------------------
// Lenient wire pieces

/// A text that may be absent/null (None), a string or a number.
fn de_opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(serde::de::Error::custom(format!(
            "expected a string, got {}",
            json_kind(&other)
        ))),
    }
}

/// A boolean that may also arrive as `"true"`/`"false"`/`"1"`/`"0"` or 0/1.
fn de_opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let v = Value::deserialize(d)?;
    bool_of(&v).map_err(serde::de::Error::custom)
}

fn bool_of(v: &Value) -> Result<Option<bool>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        Value::Number(n) if n.as_i64() == Some(0) => Ok(Some(false)),
        Value::Number(n) if n.as_i64() == Some(1) => Ok(Some(true)),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "" => Ok(None),
            "true" | "1" => Ok(Some(true)),
            "false" | "0" => Ok(Some(false)),
            _ => Err(format!("expected true or false, got {s:?}")),
        },
        other => Err(format!("expected true or false, got {}", json_kind(other))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An integer list element (a number or a numeric string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Int(pub i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match de_opt_i64(d)? {
            Some(v) => Ok(Int(v)),
            None => Err(serde::de::Error::custom(
                "expected an integer, got null or an empty string",
            )),
        }
    }
}

/// A text list element (a string or a number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Text(de_opt_text(d)?.unwrap_or_default()))
    }
}

/// A boolean list element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Bool(pub bool);

impl<'de> Deserialize<'de> for Bool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match de_opt_bool(d)? {
            Some(b) => Ok(Bool(b)),
            None => Err(serde::de::Error::custom("expected true or false, got null")),
        }
    }
}

/// Most values in one id list of a process_status filter (`scope.bk_process_ids`, ...).
pub const MAX_ID_VALUES: usize = limits::MAX_RESULT_KEYS;
/// Most matching work one process_status request may take: for each row and field, the
/// pattern tokens of its expression_scope times the length of the value they are matched
/// against. Ordinary GSEKit expressions are a few dozen tokens against names of a few dozen
/// characters.
pub const MAX_MATCH_WORK: usize = 200_000_000;
/// Refuse a query whose expression_scope would take more than [`MAX_MATCH_WORK`] against
/// rows whose five expression fields are `lens` long: matching a field costs its pattern
/// tokens times the value's length (plus one), summed over the fields and the rows.
fn check_match_work(q: &Query, lens: impl IntoIterator<Item = [usize; 5]>) -> Result<(), ApiError> {
    let Selection::Expr(_, x) = &q.selection else {
        return Ok(());
    };
    let sizes: Vec<usize> = x.fields.iter().map(Expression::size).collect();
    let mut work: usize = 0;
    for row in lens {
        for (t, len) in sizes.iter().zip(row) {
            work = work.saturating_add(t.saturating_mul(len + 1));
        }
        if work > MAX_MATCH_WORK {
            let tokens: usize = sizes.iter().sum();
            return Err(ApiError::bad(format!(
                "expression_scope: its expressions compile to {tokens} pattern tokens; matched against the names of the registered processes that is more than the {MAX_MATCH_WORK} token-by-character tests one request may take"
            )));
        }
    }
    Ok(())
}

/// Most `searches` terms of one process_status request (GSEKit's search box sends a few);
/// each is a substring test against every row, so the count is what bounds the work.
pub const MAX_SEARCHES: usize = 100;

/// The distinct values of an id list, refusing more than [`MAX_ID_VALUES`] of them.
fn int_set(field: &str, v: &Option<Vec<Int>>) -> Result<HashSet<i64>, ApiError> {
    let v = v.as_deref().unwrap_or_default();
    limits::check_len(field, v.len(), MAX_ID_VALUES, "values")?;
    Ok(v.iter().map(|i| i.0).collect())
}

/// The distinct values of a text list kept by `keep` (which may normalize or drop one),
/// refusing more than `limit` entries (counted as sent).
fn text_set(
    field: &str,
    v: &Option<Vec<Text>>,
    limit: usize,
    keep: impl Fn(&str) -> Option<String>,
) -> Result<HashSet<String>, ApiError> {
    let v = v.as_deref().unwrap_or_default();
    limits::check_len(field, v.len(), limit, "values")?;
    Ok(v.iter().filter_map(|t| keep(&t.0)).collect())
}

mod operate;
mod status;
pub use operate::*;
pub use status::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_work_is_budgeted() {
        let q = |name: &str| {
            let body = serde_json::json!({"bk_biz_id": "*", "page": 1, "pagesize": 1,
                "expression_scope": {"bk_set_env": "*", "bk_set_name": name, "bk_module_name": "*",
                "service_instance_name": "*", "bk_process_name": "*", "bk_process_id": "*"}});
            parse_query(body.to_string().as_bytes()).unwrap()
        };
        let rows = |n: usize, set_name: usize| std::iter::repeat_n([set_name, 8, 8, 8, 4], n);
        let long = "a".repeat(60_000);
        // 60 000 tokens × 11 characters per row.
        assert!(check_match_work(&q(&long), rows(300, 10)).is_ok());
        let e = check_match_work(&q(&long), rows(400, 10)).unwrap_err();
        assert!(e.message.starts_with("expression_scope: "), "{}", e.message);
        assert!(check_match_work(&q("web[1-3]"), rows(100_000, 10)).is_ok());
        // A short expression against one very long name is refused as well.
        assert!(check_match_work(&q(&long), rows(1, 1_000_000)).is_err());
    }

    fn snap(ns: &str, name: &str, labels: Value, status: i64, managed: bool) -> Snapshot {
        Snapshot {
            key: ProcKey::new(ns, name),
            labels: labels.as_object().cloned().unwrap_or_default(),
            proc_name: format!("{name}-bin"),
            status,
            managed,
            pid: if status == 1 { 100 } else { -1 },
        }
    }

    fn host() -> HostView {
        HostView {
            ip: "10.0.0.1".into(),
            bk_cloud_id: 0,
        }
    }

    #[test]
    fn slice_parse_table() {
        let sl = |begin, end| Ok(Some(Slice { begin, end }));
        let cases: Vec<(&str, Result<Option<Slice>, ()>)> = vec![
            ("[0:2]", sl(Some(0), Some(2))),
            ("[:2]", sl(None, Some(2))),
            ("[1:]", sl(Some(1), None)),
            ("[:]", sl(None, None)),
            ("[-2:]", sl(Some(-2), None)),
            ("[+1 : -1]", sl(Some(1), Some(-1))),
            ("[1  :2]", Ok(None)),
            ("[a:b]", Ok(None)),
            ("46", Ok(None)),
            ("4[6, 8]", Ok(None)),
            ("[1-3]", Ok(None)),
            ("*", Ok(None)),
            ("[0:2]x", Err(())),
            ("[0:2][3:4]", Err(())),
        ];
        for (text, want) in cases {
            let got = Slice::parse(text).map_err(|_| ());
            assert_eq!(got, want, "{text}");
        }
        let big = Slice::parse("[-99999999999999999999999:99999999999999999999]")
            .unwrap()
            .unwrap();
        assert_eq!(big.begin, Some(i64::MIN));
        assert_eq!(big.end, Some(i64::MAX));
    }

    #[test]
    fn slice_apply_is_python_slicing() {
        let v: Vec<i32> = (0..5).collect();
        let cases: Vec<(Option<i64>, Option<i64>, Vec<i32>)> = vec![
            (Some(0), Some(2), vec![0, 1]),
            (None, Some(2), vec![0, 1]),
            (Some(3), None, vec![3, 4]),
            (Some(-2), None, vec![3, 4]),
            (None, Some(-1), vec![0, 1, 2, 3]),
            (Some(4), Some(2), vec![]),
            (Some(10), None, vec![]),
            (Some(-10), Some(1), vec![0]),
            (Some(i64::MIN), Some(i64::MAX), vec![0, 1, 2, 3, 4]),
            (None, None, vec![0, 1, 2, 3, 4]),
        ];
        for (b, e, want) in cases {
            assert_eq!(
                Slice { begin: b, end: e }.apply(v.clone()),
                want,
                "[{b:?}:{e:?}]"
            );
        }
    }

    #[test]
    fn paging() {
        let v: Vec<i32> = (1..=25).collect();
        assert_eq!(page_of(v.clone(), 1, 10), (1..=10).collect::<Vec<_>>());
        assert_eq!(page_of(v.clone(), 3, 10), (21..=25).collect::<Vec<_>>());
        assert!(page_of(v.clone(), 4, 10).is_empty());
        assert_eq!(page_of(v.clone(), 1, 1000).len(), 25);
        assert!(page_of(v, usize::MAX, 1000).is_empty());
    }

    #[test]
    fn rows_group_instances_by_process_id_and_summarise() {
        let snaps = vec![
            snap(
                "GSEKIT_BIZ_2",
                "gse_agent_2",
                json!({"bk_process_name": "gse_agent", "bk_process_id": 46}),
                2,
                true,
            ),
            snap(
                "GSEKIT_BIZ_2",
                "gse_agent_1",
                json!({"bk_process_name": "gse_agent", "bk_process_id": 46, "bk_set_name": "管控平台"}),
                1,
                true,
            ),
            snap("nodeman", "bkmonitorbeat", json!({}), 1, false),
        ];
        let rows = build_rows(snaps, &host());
        assert_eq!(rows.len(), 2);
        // Unlabelled first (bk_process_id 0), then process 46.
        let plain = &rows[0];
        assert_eq!(plain.bk_process_id, 0);
        assert_eq!(plain.bk_process_name, "bkmonitorbeat-bin");
        assert_eq!(plain.bk_biz_id, None);
        assert_eq!(plain.bk_set_env, "3");
        assert_eq!(plain.bk_cloud_name, "default area");
        assert_eq!(
            plain.id,
            stable_id(&ProcKey::new("nodeman", "bkmonitorbeat"))
        );
        let p = &rows[1];
        assert_eq!(p.bk_biz_id, Some(2), "from the GSEKIT_BIZ_2 namespace");
        assert_eq!(p.id, 46);
        assert_eq!(
            p.insts.iter().map(|i| i.local_inst_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(p.bk_set_name, "管控平台", "topology of the first instance");
        assert_eq!(p.process_status, 2, "terminated when any instance is");
        assert!(p.is_auto);
        assert_eq!(
            p.expression(),
            "管控平台<-GSEKIT-><-GSEKIT-><-GSEKIT->gse_agent<-GSEKIT->46"
        );
        let j = p.to_json();
        for f in [
            "id",
            "bk_biz_id",
            "expression",
            "bk_host_innerip",
            "bk_cloud_id",
            "bk_set_env",
            "bk_set_id",
            "bk_module_id",
            "service_template_id",
            "service_instance_id",
            "bk_process_name",
            "bk_process_id",
            "process_template_id",
            "process_status",
            "is_auto",
            "bk_set_name",
            "bk_module_name",
            "bk_service_name",
            "bk_cloud_name",
            "config_templates",
            "proc_inst_infos",
        ] {
            assert!(j.get(f).is_some(), "missing {f}");
        }
        for f in [
            "bk_process_id",
            "local_inst_id",
            "inst_id",
            "process_status",
            "is_auto",
        ] {
            assert!(j["proc_inst_infos"][0].get(f).is_some(), "missing {f}");
        }
    }

    #[test]
    fn labels_may_be_strings_or_numbers() {
        let rows = build_rows(
            vec![snap(
                "n",
                "x",
                json!({"bk_process_id": "7", "bk_set_env": 1, "bk_set_id": "5",
                       "config_templates": "[{\"config_template_id\": 1}]",
                       "local_inst_id": 3, "inst_id": "9", "id": "70"}),
                1,
                false,
            )],
            &host(),
        );
        let r = &rows[0];
        assert_eq!(
            (r.bk_process_id, r.bk_set_env.as_str(), r.bk_set_id, r.id),
            (7, "1", 5, 70)
        );
        assert_eq!(r.config_templates, json!([{"config_template_id": 1}]));
        assert_eq!((r.insts[0].local_inst_id, r.insts[0].inst_id), (3, 9));
    }

    #[test]
    fn split_expression_both_forms() {
        let want = |a: [&str; 5]| Ok(a.map(str::to_string));
        assert_eq!(
            split_expression("a<-GSEKIT->b<-GSEKIT->c.d<-GSEKIT->e<-GSEKIT->4[6, 8]"),
            want(["a", "b", "c.d", "e", "4[6, 8]"])
        );
        assert_eq!(
            split_expression("管控平台.gse_agent.127.0.0.1_gse_agent.gse_agent.46"),
            want([
                "管控平台",
                "gse_agent",
                "127.0.0.1_gse_agent",
                "gse_agent",
                "46"
            ])
        );
        assert_eq!(
            split_expression("[a.b, c].*.*.*.[1.5, 2]"),
            want(["[a.b, c]", "*", "*", "*", "[1.5, 2]"])
        );
        assert!(split_expression("a.b.c").is_err());
        assert!(split_expression("a<-GSEKIT->b").is_err());
    }

    #[test]
    fn merge_keeps_registered_fields_the_request_leaves_out() {
        let base = ProcSpec {
            setup_path: "/opt/a".into(),
            proc_name: "a".into(),
            pid_path: "/opt/a/a.pid".into(),
            health_cmd: "true".into(),
            stop_cmd: "./stop".into(),
            cpu_lmt: 10.0,
            ..ProcSpec::default()
        };
        let w = ProcessInfoWire {
            start_cmd: Some("./start".into()),
            stop_cmd: Some(String::new()),
            auto_type: Some(2),
            cfg_path: Some("/etc/a".into()),
            ..Default::default()
        };
        let s = merge_spec(base, &w, "process_infos[0]").unwrap();
        assert_eq!(s.start_cmd, "./start");
        assert_eq!(s.stop_cmd, "", "an explicit empty string clears");
        assert_eq!(s.health_cmd, "true", "kept");
        assert_eq!(s.cpu_lmt, 10.0, "kept");
        assert_eq!(s.config_path, "/etc/a");
        assert_eq!(s.auto_type, crate::spec::AutoType::SingleRun);
        let bad = ProcessInfoWire {
            auto_type: Some(0),
            cpu_lmt: Some(300.0),
            op_timeout: Some(-1),
            cfg_path: Some("rel".into()),
            ..Default::default()
        };
        let errs = merge_spec(ProcSpec::default(), &bad, "process_infos[3]").unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "process_infos[3].cycle_time",
            "process_infos[3].cpu_lmt",
            "process_infos[3].op_timeout",
            "process_infos[3].cfg_path",
            "process_infos[3].setup_path",
        ] {
            assert!(fields.contains(&f), "{f} not in {fields:?}");
        }
    }

    /// v2 entries are mapped into a patch over the registered spec; errors keep the v2
    /// names and phrasing.
    #[test]
    fn merge_errors_use_v2_names() {
        let w = ProcessInfoWire {
            setup_path: Some("/opt/a".into()),
            proc_name: Some("a".into()),
            auto_type: Some(9),
            cycle_time: Some(-1),
            cfg_path: Some("rel".into()),
            cpu_lmt: Some(300.0),
            ..Default::default()
        };
        let msgs: Vec<String> = merge_spec(ProcSpec::default(), &w, "process_infos[0]")
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        for want in [
            "process_infos[0].type: must be 0 (periodic), 1 (resident) or 2 (single run), got 9",
            "process_infos[0].cycle_time: must not be negative, got -1",
            "process_infos[0].cfg_path: must be an absolute path",
            "process_infos[0].cpu_lmt: must be a percentage between 0 and 100",
        ] {
            assert!(msgs.iter().any(|m| m == want), "{want:?} not in {msgs:?}");
        }
        let w = ProcessInfoWire {
            setup_path: Some("/opt/a".into()),
            proc_name: Some("a".into()),
            value_key: Some(" k ".into()),
            ..Default::default()
        };
        let s = merge_spec(ProcSpec::default(), &w, "process_infos[0]").unwrap();
        assert_eq!(s.value_key, "k", "trimmed, as its identity is");
        assert_eq!(Identity::of(&s), Identity::ValueKey("k".into()));
    }

    #[test]
    fn identities_and_their_keys() {
        let p = Identity::Path {
            setup_path: "/opt/a".into(),
            proc_name: "a".into(),
        };
        assert_eq!(synthetic_key(&p), ProcKey::new(V2_NAMESPACE, "a@/opt/a"));
        let v = Identity::ValueKey("k1".into());
        assert_eq!(synthetic_key(&v), ProcKey::new(V2_NAMESPACE, "k1"));
        let spec = ProcSpec {
            setup_path: "/opt/a".into(),
            proc_name: "a".into(),
            ..ProcSpec::default()
        };
        assert_eq!(Identity::of(&spec), p);
        let spec = ProcSpec {
            value_key: "k1".into(),
            ..spec
        };
        assert_eq!(Identity::of(&spec), v);
    }

    #[test]
    fn the_identity_index_finds_what_a_registry_scan_finds() {
        let reg = crate::fuzzing::fuzz_registry();
        let index = IdentityIndex::new(&reg);
        for d in reg.values() {
            let id = Identity::of(&d.spec);
            let scan: Vec<ProcKey> = reg
                .values()
                .filter(|x| Identity::of(&x.spec) == id)
                .map(|x| x.key.clone())
                .collect();
            assert_eq!(index.find(&id), scan.as_slice(), "{id:?}");
        }
        assert!(index.find(&Identity::ValueKey("never".into())).is_empty());
    }

    #[test]
    fn operate_process_limits_name_the_field() {
        let reg = Registry::default();
        let info = |hosts: usize, i: usize| {
            json!({"setup_path": "/opt", "proc_name": format!("p{i}"), "pid_path": "/run/p.pid",
                   "value_key": format!("v{i}"), "ip_list": vec![json!({"ip": "10.0.0.1"}); hosts]})
        };
        let body = |infos: Vec<Value>| {
            json!({"bk_biz_id": 1, "op_type": 2, "process_infos": infos}).to_string()
        };
        let e = decode_operate_process(
            &reg,
            body((0..=MAX_PROCESS_INFOS).map(|i| info(1, i)).collect()).as_bytes(),
        )
        .err()
        .unwrap();
        assert!(
            e.message.starts_with("process_infos: at most 5000"),
            "{}",
            e.message
        );
        let e = decode_operate_process(&reg, body(vec![info(MAX_HOSTS + 1, 0)]).as_bytes())
            .err()
            .unwrap();
        assert!(
            e.message
                .starts_with("process_infos[0].ip_list: at most 2000"),
            "{}",
            e.message
        );
        let e = decode_operate_process(
            &reg,
            body((0..11).map(|i| info(MAX_HOSTS, i)).collect()).as_bytes(),
        )
        .err()
        .unwrap();
        assert!(
            e.message
                .starts_with("process_infos: at most 20000 result keys"),
            "{}",
            e.message
        );
        let (_, _, _, r) = decode_operate_process(
            &reg,
            body((0..MAX_PROCESS_INFOS).map(|i| info(1, i)).collect()).as_bytes(),
        )
        .ok()
        .unwrap();
        assert_eq!(r.len(), MAX_PROCESS_INFOS);
    }

    /// Entries that do not name one process are refused one by one (every entry of a
    /// shared key with all its reasons); the others resolve as usual.
    #[test]
    fn entries_that_name_no_single_process_are_refused_per_entry() {
        let def = |ns: &str, name: &str, vk: &str| crate::spec::Definition {
            key: ProcKey::new(ns, name),
            labels: Labels::new(),
            spec: ProcSpec {
                setup_path: "/opt/m".into(),
                proc_name: "m".into(),
                pid_path: format!("/opt/m/{name}.pid"),
                value_key: vk.into(),
                ..ProcSpec::default()
            },
            source: Source::Api,
            register_time: 0,
            updated_time: 0,
        };
        let mut reg = Registry::default();
        for d in [
            def("G", "m_1", ""),
            def("G", "m_2", ""),
            def(V2_NAMESPACE, "taken", "other"),
        ] {
            reg.insert(d.key.clone(), d);
        }
        let info = |extra: Value| {
            let mut v = json!({"setup_path": "/opt/m", "proc_name": "m", "pid_path": "/opt/m/m.pid",
                               "ip_list": [{"ip": "10.0.0.1"}]});
            if let (Some(o), Some(x)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(x.clone());
            }
            v
        };
        let decode = |op: i64, infos: Vec<Value>| {
            let body = json!({"bk_biz_id": 1, "op_type": op, "process_infos": infos}).to_string();
            decode_operate_process(&reg, body.as_bytes())
                .ok()
                .unwrap()
                .3
        };
        let refusal = |r: &Resolved| r.refusal().map(|f| f.message.clone());
        let long = "v".repeat(300);
        let r = decode(
            1,
            vec![
                info(json!({})),                                       // 0: two registered
                info(json!({"value_key": "ok"})),                      // 1: fine
                info(json!({"value_key": "d", "cfg_path": "/etc/a"})), // 2 and 3 disagree
                info(json!({"value_key": "d", "cfg_path": "/etc/b"})),
                info(json!({"proc_name": "x", "setup_path": "/y"})), // 4 and 5: one key
                info(json!({"value_key": "x@/y"})),
                info(json!({"value_key": long})),    // 6: too long
                info(json!({"value_key": "taken"})), // 7: name in use
                info(json!({"value_key": "ok"})),    // 8: 1 again
            ],
        );
        let m = refusal(&r[0]).unwrap();
        assert!(
            m.starts_with("process_infos[0]: value_key is empty")
                && m.contains("G/m_1, G/m_2")
                && m.contains("2 registered processes"),
            "{m}"
        );
        assert_eq!(r[0].key(), &ProcKey::new(V2_NAMESPACE, "m@/opt/m"));
        assert_eq!(
            r[0].refusal().unwrap().matched,
            vec![ProcKey::new("G", "m_1"), ProcKey::new("G", "m_2")]
        );
        assert!(refusal(&r[1]).is_none() && refusal(&r[8]).is_none());
        let m = refusal(&r[2]).unwrap();
        assert!(
            m.contains("process_infos[2] and process_infos[3] give different specs"),
            "{m}"
        );
        assert_eq!(refusal(&r[3]), Some(m));
        let m = refusal(&r[4]).unwrap();
        assert!(
            m.contains("process_infos[4]")
                && m.contains("process_infos[5]")
                && m.contains("would both be named operate_process/x@/y"),
            "{m}"
        );
        assert_eq!(refusal(&r[5]), Some(m));
        assert!(refusal(&r[6]).unwrap().contains("not a valid name"));
        let m = refusal(&r[7]).unwrap();
        assert!(
            m.contains("belongs to the process with value_key \"other\""),
            "{m}"
        );
        // A status query stores no spec: two specs of one process are one query.
        let r = decode(
            2,
            vec![
                info(json!({"value_key": "d", "cfg_path": "/etc/a"})),
                info(json!({"value_key": "d", "cfg_path": "/etc/b"})),
            ],
        );
        assert!(r.iter().all(|r| r.refusal().is_none()));
        // Many entries disagreeing on one key: a bounded message, the rest counted.
        let r = decode(
            1,
            (0..100)
                .map(|i| info(json!({"value_key": "d", "cfg_path": format!("/etc/{i}")})))
                .collect(),
        );
        let m = refusal(&r[99]).unwrap();
        assert!(
            m.ends_with("; and 94 more entries name operate_process/d differently"),
            "{m}"
        );
        assert!(m.len() < 2000, "{m}");
        // An ambiguous entry twice: one reason, said once.
        let r = decode(1, vec![info(json!({})), info(json!({}))]);
        let m = refusal(&r[1]).unwrap();
        assert_eq!(m.matches("registered processes share").count(), 1, "{m}");
    }

    #[test]
    fn env_and_biz_values() {
        assert_eq!(
            parse_env(Some(&json!(3)), "f", None),
            Ok(EnvFilter::Is("3".into()))
        );
        assert_eq!(
            parse_env(Some(&json!("2")), "f", None),
            Ok(EnvFilter::Is("2".into()))
        );
        assert_eq!(
            parse_env(None, "f", Some("3")),
            Ok(EnvFilter::Is("3".into()))
        );
        assert_eq!(parse_env(Some(&json!("*")), "f", None), Ok(EnvFilter::Any));
        assert!(parse_env(None, "f", None).is_err());
        assert!(parse_env(Some(&json!("4")), "f", None).is_err());
        assert_eq!(parse_biz(Some(&json!("2"))), Ok(BizFilter::Id(2)));
        assert_eq!(parse_biz(Some(&json!("*"))), Ok(BizFilter::All));
        assert!(parse_biz(None).is_err());
        assert!(parse_biz(Some(&json!("two"))).is_err());
    }
}
