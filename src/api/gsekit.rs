//! `operate_process` (the flat v2 operation API) and GSEKit's `process_status` list.
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
//! `setup_path` + `proc_name`. Collisions are request errors that say what collides: two
//! entries of one request with the same identity but different specs ("two processes with
//! the same setup_path and proc_name need distinct value_keys"), an identity that several
//! registered definitions share, and a synthetic key already taken by another identity.
//!
//! Matching is linear: the registry's identities are indexed once per request
//! ([`IdentityIndex`]), and the entries of a request are compared through hash maps. The
//! sizes are bounded by [`super::limits`] (process_infos, hosts per `ip_list`, result keys)
//! before any entry is resolved.
//!
//! The request's fields overwrite those of an existing definition; fields the request leaves
//! out keep their registered values (a new definition gets the defaults). Every operation
//! but 2 (status) and 4 (unmanage) stores the resulting spec first (creating the definition
//! when it is new); 4 updates an existing definition but never creates one; 2 changes
//! nothing. Result keys are `{bk_cloud_id}:{ip}:{namespace}:{name}` for every `ip_list`
//! member × process, present from the first poll of get_proc_operate_result (115 while
//! pending); members that are not this host get a per-host 117.
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
/// Most matching work one process_status request may take: the pattern tokens of its
/// expression_scope times the rows they are matched against (each test costs about the
/// name's length). Ordinary GSEKit expressions are a few dozen tokens.
pub const MAX_MATCH_WORK: usize = 20_000_000;
/// Refuse a query whose expression_scope would take more than [`MAX_MATCH_WORK`] against
/// `rows` rows.
fn check_match_work(q: &Query, rows: usize) -> Result<(), ApiError> {
    let Selection::Expr(_, x) = &q.selection else {
        return Ok(());
    };
    let tokens: usize = x.fields.iter().map(Expression::size).sum();
    let work = tokens.saturating_mul(rows);
    if work > MAX_MATCH_WORK {
        return Err(ApiError::bad(format!(
            "expression_scope: its expressions compile to {tokens} pattern tokens; matched against {rows} processes that is {work} token tests, more than the {MAX_MATCH_WORK} one request may take"
        )));
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

// ---------------------------------------------------------------------------------------
// operate_process

/// `operate_process` request.
#[derive(Debug, Deserialize)]
struct OperateProcessReq {
    #[serde(default, deserialize_with = "de_opt_i64")]
    bk_biz_id: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    op_type: Option<i64>,
    #[serde(default)]
    process_infos: Option<Vec<ProcessInfoWire>>,
}

/// One `process_infos` entry: the flat v2 spec plus its hosts.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct ProcessInfoWire {
    #[serde(default, deserialize_with = "de_opt_text")]
    pub setup_path: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub proc_name: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub pid_path: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub cfg_path: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub log_path: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub contact: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub start_cmd: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub stop_cmd: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub restart_cmd: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub reload_cmd: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub kill_cmd: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub func_id: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub instance_id: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub value_key: Option<String>,
    /// v2 `type`: 0 periodic, 1 resident, 2 single run.
    #[serde(default, rename = "type", deserialize_with = "de_opt_i64")]
    pub auto_type: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub cycle_time: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub instance_num: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub start_check_begin_time: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub start_check_end_time: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    pub op_timeout: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub account: Option<String>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub cpu_lmt: Option<f64>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub mem_lmt: Option<f64>,
    #[serde(default)]
    pub ip_list: Option<Vec<HostWire>>,
}

/// The key a new definition with this identity gets (`operate_process/{value_key}`, or
/// `operate_process/{proc_name}@{setup_path}`).
pub fn synthetic_key(id: &Identity) -> ProcKey {
    match id {
        Identity::ValueKey(v) => ProcKey::new(V2_NAMESPACE, v.clone()),
        Identity::Path {
            setup_path,
            proc_name,
        } => ProcKey::new(V2_NAMESPACE, format!("{proc_name}@{setup_path}")),
    }
}

/// The registered definitions by identity, built once per request (one pass over the
/// registry) so that resolving each entry is a lookup.
pub struct IdentityIndex(HashMap<Identity, Vec<ProcKey>>);

impl IdentityIndex {
    pub fn new(reg: &Registry) -> IdentityIndex {
        let mut m: HashMap<Identity, Vec<ProcKey>> = HashMap::new();
        for d in reg.values() {
            m.entry(Identity::of(&d.spec))
                .or_default()
                .push(d.key.clone());
        }
        for keys in m.values_mut() {
            keys.sort();
        }
        IdentityIndex(m)
    }

    /// Every registered definition with this identity, in key order.
    pub fn find(&self, id: &Identity) -> &[ProcKey] {
        self.0.get(id).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// A [`ProcSpec`] field's name in a v2 `process_infos` entry.
fn v2_field(field: &str) -> &str {
    match field {
        "config_path" => "cfg_path",
        "auto_type" => "type",
        "start_check_secs" => "start_check_begin_time",
        other => other,
    }
}

impl ProcessInfoWire {
    /// The patch this entry stands for: only names are mapped here (`cfg_path` is
    /// `config_path`, `type` is `auto_type`); the value_key is trimmed, as its identity is.
    pub fn to_patch(&self) -> SpecPatch {
        SpecPatch {
            setup_path: self.setup_path.clone(),
            proc_name: self.proc_name.clone(),
            pid_path: self.pid_path.clone(),
            config_path: self.cfg_path.clone(),
            log_path: self.log_path.clone(),
            contact: self.contact.clone(),
            start_cmd: self.start_cmd.clone(),
            stop_cmd: self.stop_cmd.clone(),
            restart_cmd: self.restart_cmd.clone(),
            reload_cmd: self.reload_cmd.clone(),
            kill_cmd: self.kill_cmd.clone(),
            func_id: self.func_id.clone(),
            instance_id: self.instance_id.clone(),
            value_key: self.value_key.as_deref().map(|v| v.trim().to_string()),
            account: self.account.clone(),
            auto_type: self.auto_type,
            cycle_time: self.cycle_time,
            instance_num: self.instance_num,
            start_check_begin_time: self.start_check_begin_time,
            start_check_end_time: self.start_check_end_time,
            op_timeout: self.op_timeout,
            cpu_lmt: self.cpu_lmt,
            mem_lmt: self.mem_lmt,
            ..SpecPatch::default()
        }
    }
}

/// Lay the request's fields over `base` (the registered spec, or the defaults) and
/// validate the result. Errors name the v2 fields (`process_infos[0].cpu_lmt`).
pub fn merge_spec(
    base: ProcSpec,
    w: &ProcessInfoWire,
    prefix: &str,
) -> Result<ProcSpec, Vec<FieldError>> {
    w.to_patch().apply(&base).map_err(|errs| {
        errs.iter()
            .map(|e| {
                let mut e = e.renamed(format!("{prefix}.{}", v2_field(&e.field)));
                if let Rule::AutoTypeCode(t) = e.rule {
                    e.message =
                        format!("must be 0 (periodic), 1 (resident) or 2 (single run), got {t}");
                }
                e
            })
            .collect()
    })
}

fn required_text(v: &Option<String>, prefix: &str, field: &str) -> Result<String, ApiError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(ApiError::bad(format!("{prefix}.{field}: is required"))),
    }
}

/// One process_infos entry, resolved against the registry.
pub struct Resolved {
    index: usize,
    identity: Identity,
    key: ProcKey,
    /// The registered definition's spec, source and account, when there is one.
    existing: Option<(ProcSpec, Source)>,
    spec: Result<ProcSpec, Vec<FieldError>>,
    hosts: Vec<HostWire>,
}

fn resolve(
    reg: &Registry,
    index: &IdentityIndex,
    i: usize,
    w: &ProcessInfoWire,
) -> Result<Resolved, ApiError> {
    let prefix = format!("process_infos[{i}]");
    let setup_path = required_text(&w.setup_path, &prefix, "setup_path")?;
    let proc_name = required_text(&w.proc_name, &prefix, "proc_name")?;
    required_text(&w.pid_path, &prefix, "pid_path")?;
    let hosts = w.ip_list.clone().unwrap_or_default();
    if hosts.is_empty() {
        return Err(ApiError::bad(format!(
            "{prefix}.ip_list: at least one host is required"
        )));
    }
    for (j, h) in hosts.iter().enumerate() {
        if h.ip.trim().is_empty() {
            return Err(ApiError::bad(format!(
                "{prefix}.ip_list[{j}].ip: is required"
            )));
        }
    }
    let identity = Identity::new(
        w.value_key.as_deref().unwrap_or("").trim(),
        &setup_path,
        &proc_name,
    );
    let found = index.find(&identity);
    let (key, existing) = match found {
        [] => {
            let key = synthetic_key(&identity);
            let errs = validate_key(&key);
            if !errs.is_empty() {
                return Err(ApiError::bad(format!(
                    "{prefix}: the process would be named {key}, which is not a valid name ({}); give it a shorter value_key",
                    errs.iter()
                        .map(|e| e.message.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
            if let Some(d) = reg.get(&key) {
                return Err(ApiError::bad(format!(
                    "{prefix}: the process with {} would be named {key}, but that name belongs to the process with {}; give it a distinct value_key",
                    identity.describe(),
                    Identity::of(&d.spec).describe()
                )));
            }
            (key, None)
        }
        [one] => {
            let d = reg
                .get(one)
                .ok_or_else(|| ApiError::new(codes::INTERNAL, format!("process {one} vanished")))?;
            (one.clone(), Some((d.spec.clone(), d.source.clone())))
        }
        many => {
            return Err(ApiError::bad(format!(
                "{prefix}: {} identifies {} registered processes ({}); two processes with the same setup_path and proc_name need distinct value_keys: give each its own value_key, or operate them by meta with operate_proc",
                identity.describe(),
                many.len(),
                many.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    };
    let base = existing
        .as_ref()
        .map(|(s, _)| s.clone())
        .unwrap_or_default();
    let spec = merge_spec(base, w, &prefix);
    Ok(Resolved {
        index: i,
        identity,
        key,
        existing,
        spec,
        hosts,
    })
}

/// Decode and validate an `operate_process` body against the registry (which processes
/// the identities name), without changing anything: bk_biz_id, op_type, every
/// `process_infos` entry resolved to a registry key and a merged spec, collisions refused.
/// The handler and the fuzz target both call it.
pub fn decode_operate_process(
    reg: &Registry,
    body: &[u8],
) -> Result<(i64, i64, OpType, Vec<Resolved>), ApiError> {
    let req: OperateProcessReq = handlers::parse(body)?;
    let Some(biz) = req.bk_biz_id else {
        return Err(ApiError::bad("bk_biz_id: is required"));
    };
    let Some(code) = req.op_type else {
        return Err(ApiError::bad("op_type: is required"));
    };
    let op = OpType::from_code(code).ok_or_else(|| {
        ApiError::new(
            codes::UNKNOWN_OP_TYPE,
            format!("op_type: {code} is not a valid operation (0 start, 1 stop, 2 status, 3 register managed, 4 unregister managed, 7 restart, 8 reload, 9 kill)"),
        )
    })?;
    let infos = req.process_infos.unwrap_or_default();
    if infos.is_empty() {
        return Err(ApiError::bad(
            "process_infos: at least one process is required",
        ));
    }
    limits::check_len(
        "process_infos",
        infos.len(),
        MAX_PROCESS_INFOS,
        "processes per call",
    )?;
    let mut budget = KeyBudget::new("process_infos");
    for (i, w) in infos.iter().enumerate() {
        let n = w.ip_list.as_ref().map_or(0, Vec::len);
        limits::check_len(
            &format!("process_infos[{i}].ip_list"),
            n,
            MAX_HOSTS,
            "hosts per process",
        )?;
        budget.take(n)?;
    }
    let index = IdentityIndex::new(reg);
    let mut resolved: Vec<Resolved> = Vec::with_capacity(infos.len());
    // Where each identity and each key was first seen in `resolved`.
    let mut by_identity: HashMap<Identity, usize> = HashMap::new();
    let mut by_key: HashMap<ProcKey, usize> = HashMap::new();
    for (i, w) in infos.iter().enumerate() {
        let r = resolve(reg, &index, i, w)?;
        if let Some(prev) = by_identity.get(&r.identity).map(|&j| &resolved[j]) {
            if prev.spec != r.spec {
                let why = match &r.identity {
                    Identity::Path { .. } => format!(
                        "process_infos[{}] and process_infos[{}] are two different processes with the same {}; two processes with the same setup_path and proc_name need distinct value_keys",
                        prev.index,
                        i,
                        r.identity.describe()
                    ),
                    Identity::ValueKey(_) => format!(
                        "process_infos[{}] and process_infos[{}] give different specs for the same {}; a value_key names one process",
                        prev.index,
                        i,
                        r.identity.describe()
                    ),
                };
                return Err(ApiError::bad(why));
            }
        } else if let Some(prev) = by_key.get(&r.key).map(|&j| &resolved[j]) {
            return Err(ApiError::bad(format!(
                "process_infos[{}] ({}) and process_infos[{}] ({}) would both be named {}; give them distinct value_keys",
                prev.index,
                prev.identity.describe(),
                i,
                r.identity.describe(),
                r.key
            )));
        } else {
            by_identity.insert(r.identity.clone(), resolved.len());
            by_key.insert(r.key.clone(), resolved.len());
        }
        resolved.push(r);
    }

    Ok((biz, code, op, resolved))
}

/// `POST /v1/operate_process`.
pub async fn operate_process(
    engine: &Arc<Engine>,
    body: &[u8],
    access: &Access,
) -> Result<Value, ApiError> {
    let (biz, code, op, resolved) = {
        let reg: Registry = engine
            .views()
            .into_iter()
            .map(|v| (v.def.key.clone(), v.def))
            .collect();
        decode_operate_process(&reg, body)?
    };
    let mut plans: Vec<Plan> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut push = |p: Plan, plans: &mut Vec<Plan>| {
        if seen.insert(p.result_key.clone()) {
            plans.push(p);
        }
    };
    for r in &resolved {
        let tg: Vec<Target> = r.hosts.iter().cloned().map(Target::Host).collect();
        match &r.spec {
            // A status query uses no spec: it answers for what is registered (851 if
            // nothing is), whatever the request's fields say.
            Err(errs) if op.mutating() => {
                handlers::check_op_access(engine, access, op, &r.key, None)?;
                let msg = FieldError::joined(errs);
                for (rk, t) in handlers::distinct_targets(&tg, KeyStyle::V2, &r.key) {
                    let immediate = if handlers::is_me(engine, t) {
                        KeyResult::err(codes::SPEC_INVALID, msg.clone())
                    } else {
                        handlers::not_me(engine, t)
                    };
                    push(
                        Plan {
                            result_key: rk,
                            key: Some(r.key.clone()),
                            op,
                            immediate: Some(immediate),
                            work: Work::Operate(None),
                        },
                        &mut plans,
                    );
                }
            }
            spec => {
                let spec = spec.as_ref().ok().filter(|_| op.mutating());
                // The registered definition and the merged spec (which replaces it).
                handlers::check_op_access(engine, access, op, &r.key, spec)?;
                let never_registered = op == OpType::Undelegate && r.existing.is_none();
                // Stored when the item runs; a spec equal to the registered one is recorded
                // as "unchanged" and writes nothing.
                let inline = match spec {
                    Some(spec) if !never_registered => {
                        let labels = if r.existing.is_some() {
                            Labels::new()
                        } else {
                            let mut l = Labels::new();
                            l.insert("bk_biz_id".into(), json!(biz));
                            l
                        };
                        Some((spec.clone(), labels))
                    }
                    _ => None,
                };
                for mut p in
                    super::operate::plan_items(engine, &tg, KeyStyle::V2, &r.key, op, inline)
                {
                    if never_registered && p.immediate.is_none() {
                        p.immediate = Some(KeyResult::err(
                            codes::NOT_REGISTERED,
                            format!(
                                "no process with {} is registered; nothing to unmanage (op_type 4 never registers a process)",
                                r.identity.describe()
                            ),
                        ));
                    }
                    push(p, &mut plans);
                }
            }
        }
    }
    let task_id = super::submit::submit(
        engine,
        "operate_process",
        code,
        plans,
        access,
        handlers::username(body),
    )
    .await?;
    Ok(json!({ "bk_gse_taskid": task_id }))
}

// ---------------------------------------------------------------------------------------
// process_status: request

/// A `process_status` request (what the CLI's `ps` sends; every field optional).
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct StatusReq {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_biz_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ScopeWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression_scope: Option<ExprScopeWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_cloud_ids: Option<Vec<Int>>,
    #[serde(
        default,
        deserialize_with = "de_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub process_status: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_status_list: Option<Vec<Int>>,
    #[serde(
        default,
        deserialize_with = "de_opt_bool",
        skip_serializing_if = "Option::is_none"
    )]
    pub is_auto: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_auto_list: Option<Vec<Bool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_host_innerips: Option<Vec<Text>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub searches: Option<Vec<Text>>,
    #[serde(
        default,
        deserialize_with = "de_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub page: Option<i64>,
    #[serde(
        default,
        deserialize_with = "de_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub pagesize: Option<i64>,
    #[serde(
        default,
        deserialize_with = "de_opt_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub ordering: Option<String>,
}

/// `process_status` `scope`: ids.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ScopeWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_set_env: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_set_ids: Option<Vec<Int>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_module_ids: Option<Vec<Int>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_service_ids: Option<Vec<Int>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_process_names: Option<Vec<Text>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_process_ids: Option<Vec<Int>>,
}

/// `process_status` `expression_scope`: GSEKit expressions.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ExprScopeWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bk_set_env: Option<Value>,
    #[serde(
        default,
        deserialize_with = "de_opt_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub bk_set_name: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_opt_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub bk_module_name: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_opt_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_instance_name: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_opt_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub bk_process_name: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_opt_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub bk_process_id: Option<String>,
}

/// Which businesses are listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BizFilter {
    /// `"*"`: every process, with or without a business.
    All,
    Id(i64),
}

/// Which set environments are listed (`"1"`, `"2"`, `"3"`, or `"*"` for any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvFilter {
    Any,
    Is(String),
}

impl EnvFilter {
    fn matches(&self, env: &str) -> bool {
        match self {
            EnvFilter::Any => true,
            EnvFilter::Is(e) => e == env,
        }
    }
}

/// `scope`: id lists; an empty list selects everything.
#[derive(Debug, Clone, Default)]
pub struct IdScope {
    pub set_ids: HashSet<i64>,
    pub module_ids: HashSet<i64>,
    pub service_ids: HashSet<i64>,
    pub process_names: HashSet<String>,
    pub process_ids: HashSet<i64>,
}

/// `expression_scope`, parsed: the five field expressions and an optional slice of
/// `bk_process_id`.
#[derive(Debug, Clone)]
pub struct ExprScope {
    /// bk_set_name, bk_module_name, service_instance_name, bk_process_name, bk_process_id.
    pub fields: [Expression; 5],
    pub slice: Option<Slice>,
}

/// The selection part of a process_status request.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Neither `scope` nor `expression_scope`: everything.
    All,
    Ids(EnvFilter, Box<IdScope>),
    Expr(EnvFilter, Box<ExprScope>),
}

/// One `ordering` term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderField {
    Id,
    SetId,
    ModuleId,
    ProcessName,
    ProcessId,
    HostInnerip,
}

/// A validated process_status request.
#[derive(Debug, Clone)]
pub struct Query {
    pub biz: BizFilter,
    pub selection: Selection,
    pub cloud_ids: HashSet<i64>,
    pub innerips: HashSet<String>,
    pub status: Option<i64>,
    pub status_list: HashSet<i64>,
    pub is_auto: Option<bool>,
    pub is_auto_list: HashSet<bool>,
    /// At most [`MAX_SEARCHES`], each matched as a substring of every row.
    pub searches: Vec<String>,
    pub ordering: Vec<(OrderField, bool)>,
    pub page: usize,
    pub pagesize: usize,
}

fn parse_biz(v: Option<&Value>) -> Result<BizFilter, ApiError> {
    let req = || {
        ApiError::bad(
            "bk_biz_id: is required (a business id, or \"*\" for every process whatever its business)",
        )
    };
    match v {
        None | Some(Value::Null) => Err(req()),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(BizFilter::Id)
            .ok_or_else(|| ApiError::bad(format!("bk_biz_id: expected an integer, got {n}"))),
        Some(Value::String(s)) if s.trim() == "*" => Ok(BizFilter::All),
        Some(Value::String(s)) if s.trim().is_empty() => Err(req()),
        Some(Value::String(s)) => s.trim().parse::<i64>().map(BizFilter::Id).map_err(|_| {
            ApiError::bad(format!(
                "bk_biz_id: expected an integer or \"*\", got {s:?}"
            ))
        }),
        Some(other) => Err(ApiError::bad(format!(
            "bk_biz_id: expected an integer, got {}",
            json_kind(other)
        ))),
    }
}

fn parse_env(v: Option<&Value>, field: &str, default: Option<&str>) -> Result<EnvFilter, ApiError> {
    let text = match v {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.trim().to_string()),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "{field}: expected \"1\", \"2\", \"3\" or \"*\", got {}",
                json_kind(other)
            )));
        }
    };
    let Some(text) = text.or_else(|| default.map(str::to_string)) else {
        return Err(ApiError::bad(format!(
            "{field}: is required (\"1\" testing, \"2\" experience, \"3\" formal, or \"*\" for any)"
        )));
    };
    match text.as_str() {
        "*" => Ok(EnvFilter::Any),
        "1" | "2" | "3" => Ok(EnvFilter::Is(text)),
        _ => Err(ApiError::bad(format!(
            "{field}: must be \"1\" (testing), \"2\" (experience), \"3\" (formal) or \"*\", got {text:?}"
        ))),
    }
}

/// A Python-style slice `[begin:end]` of the list of matched processes, GSEKit's
/// `bk_process_id` slice syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub begin: Option<i64>,
    pub end: Option<i64>,
}

impl Slice {
    /// Recognise a slice the way GSEKit does (`match.py` `SLICE_PATTERN`, anchored at the
    /// start): `[`, an optional signed integer, at most one whitespace, `:`, at most one
    /// whitespace, an optional signed integer, `]`. `Ok(None)`: the text does not start
    /// with a slice (it is an ordinary expression). A slice followed by more text is an
    /// error here (GSEKit would silently slice by the first one).
    pub fn parse(text: &str) -> Result<Option<Slice>, String> {
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        if chars.first() != Some(&'[') {
            return Ok(None);
        }
        i += 1;
        let num = |i: &mut usize| -> Option<i64> {
            let start = *i;
            if matches!(chars.get(*i), Some('+') | Some('-')) {
                *i += 1;
            }
            let digits_start = *i;
            while chars.get(*i).is_some_and(|c| c.is_ascii_digit()) {
                *i += 1;
            }
            if *i == digits_start {
                *i = start;
                return None;
            }
            let s: String = chars[start..*i].iter().collect();
            let neg = s.starts_with('-');
            Some(
                s.parse::<i64>()
                    .unwrap_or(if neg { i64::MIN } else { i64::MAX }),
            )
        };
        let begin = num(&mut i);
        if chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        if chars.get(i) != Some(&':') {
            return Ok(None);
        }
        i += 1;
        if chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        let end = num(&mut i);
        if chars.get(i) != Some(&']') {
            return Ok(None);
        }
        i += 1;
        if i != chars.len() {
            return Err(format!(
                "{text:?} starts with the slice {:?} but goes on; a slice must be the whole expression, like [0:10]",
                chars[..i].iter().collect::<String>()
            ));
        }
        Ok(Some(Slice { begin, end }))
    }

    /// Python's `list[begin:end]`.
    pub fn apply<T>(&self, v: Vec<T>) -> Vec<T> {
        let n = v.len() as i64;
        let norm = |x: Option<i64>, default: i64| match x {
            None => default,
            Some(x) if x < 0 => n.saturating_add(x).max(0),
            Some(x) => x.min(n),
        };
        let b = norm(self.begin, 0) as usize;
        let e = norm(self.end, n) as usize;
        if b >= e {
            return Vec::new();
        }
        v.into_iter().skip(b).take(e - b).collect()
    }
}

fn parse_expr_scope(w: &ExprScopeWire) -> Result<(EnvFilter, ExprScope), ApiError> {
    let env = parse_env(w.bk_set_env.as_ref(), "expression_scope.bk_set_env", None)?;
    let field = |name: &str, v: &Option<String>| -> Result<Expression, ApiError> {
        Expression::parse_scope_field(v.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::bad(format!("expression_scope.{name}: {e}")))
    };
    let pid_text = w.bk_process_id.as_deref().unwrap_or("").trim().to_string();
    let slice = Slice::parse(&pid_text)
        .map_err(|e| ApiError::bad(format!("expression_scope.bk_process_id: {e}")))?;
    let pid_expr = if slice.is_some() {
        field("bk_process_id", &None)?
    } else {
        field("bk_process_id", &w.bk_process_id)?
    };
    Ok((
        env,
        ExprScope {
            fields: [
                field("bk_set_name", &w.bk_set_name)?,
                field("bk_module_name", &w.bk_module_name)?,
                field("service_instance_name", &w.service_instance_name)?,
                field("bk_process_name", &w.bk_process_name)?,
                pid_expr,
            ],
            slice,
        },
    ))
}

fn parse_ordering(text: &str) -> Result<Vec<(OrderField, bool)>, ApiError> {
    let mut out = Vec::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (name, desc) = match term.strip_prefix('-') {
            Some(n) => (n, true),
            None => (term, false),
        };
        let f = match name {
            "id" => OrderField::Id,
            "bk_set_id" => OrderField::SetId,
            "bk_module_id" => OrderField::ModuleId,
            "bk_process_name" => OrderField::ProcessName,
            "bk_process_id" => OrderField::ProcessId,
            "bk_host_innerip" => OrderField::HostInnerip,
            other => {
                return Err(ApiError::bad(format!(
                    "ordering: cannot order by {other:?}; use id, bk_set_id, bk_module_id, bk_process_name, bk_process_id or bk_host_innerip, with - for descending"
                )));
            }
        };
        out.push((f, desc));
    }
    Ok(out)
}

pub(crate) fn parse_query(body: &[u8]) -> Result<Query, ApiError> {
    let req: StatusReq = handlers::parse(body)?;
    let biz = parse_biz(req.bk_biz_id.as_ref())?;
    let page = req
        .page
        .ok_or_else(|| ApiError::bad("page: is required (1 for the first page)"))?;
    if page < 1 {
        return Err(ApiError::bad(format!(
            "page: must be 1 or more (pages count from 1), got {page}"
        )));
    }
    let pagesize = req
        .pagesize
        .ok_or_else(|| ApiError::bad(format!("pagesize: is required (1 to {MAX_PAGESIZE})")))?;
    if !(1..=MAX_PAGESIZE).contains(&pagesize) {
        return Err(ApiError::bad(format!(
            "pagesize: must be between 1 and {MAX_PAGESIZE}, got {pagesize}"
        )));
    }
    // `scope` wins when both are given (the expression is then not even parsed).
    let selection = match (&req.scope, &req.expression_scope) {
        (Some(s), _) => Selection::Ids(
            parse_env(s.bk_set_env.as_ref(), "scope.bk_set_env", Some("3"))?,
            Box::new(IdScope {
                set_ids: int_set("scope.bk_set_ids", &s.bk_set_ids)?,
                module_ids: int_set("scope.bk_module_ids", &s.bk_module_ids)?,
                service_ids: int_set("scope.bk_service_ids", &s.bk_service_ids)?,
                process_names: text_set(
                    "scope.bk_process_names",
                    &s.bk_process_names,
                    MAX_ID_VALUES,
                    |t| Some(t.to_string()),
                )?,
                process_ids: int_set("scope.bk_process_ids", &s.bk_process_ids)?,
            }),
        ),
        (None, Some(e)) => {
            let (env, x) = parse_expr_scope(e)?;
            Selection::Expr(env, Box::new(x))
        }
        (None, None) => Selection::All,
    };
    let status_list = int_set("process_status_list", &req.process_status_list)?;
    for s in req.process_status.iter().chain(status_list.iter()) {
        if !(0..=2).contains(s) {
            return Err(ApiError::bad(format!(
                "process_status: must be 0 (unregistered), 1 (running) or 2 (terminated), got {s}"
            )));
        }
    }
    let trimmed = |t: &str| Some(t.trim().to_string()).filter(|t| !t.is_empty());
    let searches = req.searches.as_deref().unwrap_or_default();
    limits::check_len("searches", searches.len(), MAX_SEARCHES, "search terms")?;
    let is_auto_list = req.is_auto_list.as_deref().unwrap_or_default();
    limits::check_len("is_auto_list", is_auto_list.len(), MAX_ID_VALUES, "values")?;
    Ok(Query {
        biz,
        selection,
        cloud_ids: int_set("bk_cloud_ids", &req.bk_cloud_ids)?,
        innerips: text_set(
            "bk_host_innerips",
            &req.bk_host_innerips,
            MAX_HOSTS,
            trimmed,
        )?,
        status: req.process_status,
        status_list,
        is_auto: req.is_auto,
        is_auto_list: is_auto_list.iter().map(|b| b.0).collect(),
        searches: searches.iter().filter_map(|t| trimmed(&t.0)).collect(),
        ordering: parse_ordering(req.ordering.as_deref().unwrap_or(""))?,
        page: page as usize,
        pagesize: pagesize as usize,
    })
}

// ---------------------------------------------------------------------------------------
// process_status: the rows

/// What process_status needs of one definition.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub key: ProcKey,
    pub labels: Labels,
    pub proc_name: String,
    /// 1 running, 2 not running.
    pub status: i64,
    pub managed: bool,
    pub pid: i64,
}

/// One instance of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct InstRow {
    pub key: ProcKey,
    pub local_inst_id: i64,
    pub inst_id: i64,
    pub status: i64,
    pub is_auto: bool,
    pub pid: i64,
}

/// One process of the list.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: i64,
    pub bk_biz_id: Option<i64>,
    pub bk_host_innerip: String,
    pub bk_cloud_id: i64,
    pub bk_cloud_name: String,
    pub bk_set_env: String,
    pub bk_set_id: i64,
    pub bk_set_name: String,
    pub bk_module_id: i64,
    pub bk_module_name: String,
    pub service_template_id: i64,
    pub service_instance_id: i64,
    pub service_instance_name: String,
    pub process_template_id: i64,
    pub bk_process_name: String,
    pub bk_process_id: i64,
    pub config_templates: Value,
    pub process_status: i64,
    pub is_auto: bool,
    pub insts: Vec<InstRow>,
}

/// This host, as rows report it.
#[derive(Debug, Clone)]
pub struct HostView {
    pub ip: String,
    pub bk_cloud_id: i64,
}

fn label_str(l: &Labels, k: &str) -> Option<String> {
    match l.get(k)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn label_int(l: &Labels, k: &str) -> Option<i64> {
    match l.get(k)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The business of a definition: its `bk_biz_id` label, else the `N` of a
/// `GSEKIT_BIZ_N` namespace (GSEKit's own naming).
pub fn biz_of(key: &ProcKey, labels: &Labels) -> Option<i64> {
    label_int(labels, "bk_biz_id").or_else(|| {
        key.namespace
            .strip_prefix("GSEKIT_BIZ_")
            .and_then(|n| n.parse().ok())
    })
}

/// `config_templates` label: a JSON array, or a string holding one.
fn config_templates(l: &Labels) -> Value {
    match l.get("config_templates") {
        Some(Value::Array(a)) => Value::Array(a.clone()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(a)) => Value::Array(a),
            _ => json!([]),
        },
        _ => json!([]),
    }
}

/// FNV-1a of the key, cut to 53 bits (exact in JSON doubles), never 0.
fn stable_id(key: &ProcKey) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key
        .namespace
        .bytes()
        .chain(std::iter::once(0))
        .chain(key.name.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h & ((1 << 53) - 1)) as i64).max(1)
}

/// Group definitions into rows: definitions with the same business and non-zero
/// `bk_process_id` label are the instances of one process; others are one row each.
/// Rows come in GSEKit's order: by `bk_process_id`, then by key.
pub fn build_rows(snaps: Vec<Snapshot>, host: &HostView) -> Vec<Row> {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Group {
        Process(i64, Option<i64>),
        Single(ProcKey),
    }
    let mut groups: BTreeMap<Group, Vec<Snapshot>> = BTreeMap::new();
    for s in snaps {
        let g = match label_int(&s.labels, "bk_process_id") {
            Some(p) if p != 0 => Group::Process(p, biz_of(&s.key, &s.labels)),
            _ => Group::Single(s.key.clone()),
        };
        groups.entry(g).or_default().push(s);
    }
    let mut rows: Vec<Row> = groups
        .into_values()
        .filter_map(|g| row_of(g, host))
        .collect();
    rows.sort_by(|a, b| {
        a.bk_process_id.cmp(&b.bk_process_id).then_with(|| {
            a.insts
                .first()
                .map(|i| &i.key)
                .cmp(&b.insts.first().map(|i| &i.key))
        })
    });
    rows
}

fn row_of(mut group: Vec<Snapshot>, host: &HostView) -> Option<Row> {
    group.sort_by(|a, b| a.key.cmp(&b.key));
    let process_name_of = |s: &Snapshot| {
        label_str(&s.labels, "bk_process_name").unwrap_or_else(|| s.proc_name.clone())
    };
    // local_inst_id: label, else GSEKit's meta name `{bk_process_name}_{local_inst_id}`,
    // else the position in the group.
    let mut insts: Vec<(InstRow, Snapshot)> = group
        .into_iter()
        .enumerate()
        .map(|(pos, s)| {
            let from_name = s
                .key
                .name
                .strip_prefix(&format!("{}_", process_name_of(&s)))
                .and_then(|n| n.parse::<i64>().ok());
            let local = label_int(&s.labels, "local_inst_id")
                .or(from_name)
                .unwrap_or(pos as i64 + 1);
            let inst = InstRow {
                key: s.key.clone(),
                local_inst_id: local,
                inst_id: label_int(&s.labels, "inst_id").unwrap_or(local),
                status: s.status,
                is_auto: s.managed,
                pid: s.pid,
            };
            (inst, s)
        })
        .collect();
    insts.sort_by(|a, b| {
        a.0.local_inst_id
            .cmp(&b.0.local_inst_id)
            .then_with(|| a.0.key.cmp(&b.0.key))
    });
    let (_, first) = insts.first()?;
    let l = &first.labels;
    let bk_process_id = label_int(l, "bk_process_id").unwrap_or(0);
    let bk_cloud_name = label_str(l, "bk_cloud_name").unwrap_or_else(|| {
        if host.bk_cloud_id == 0 {
            "default area".to_string()
        } else {
            String::new()
        }
    });
    let id = label_int(l, "id")
        .or((bk_process_id != 0).then_some(bk_process_id))
        .unwrap_or_else(|| stable_id(&first.key));
    // GSEKit's summary: terminated when any instance is; managed when every instance is.
    let process_status = if insts.iter().all(|(i, _)| i.status == FLAG_RUNNING) {
        FLAG_RUNNING
    } else {
        FLAG_STOPPED
    };
    let is_auto = insts.iter().all(|(i, _)| i.is_auto);
    let row = Row {
        id,
        bk_biz_id: biz_of(&first.key, l),
        bk_host_innerip: host.ip.clone(),
        bk_cloud_id: host.bk_cloud_id,
        bk_cloud_name,
        bk_set_env: label_str(l, "bk_set_env").unwrap_or_else(|| "3".to_string()),
        bk_set_id: label_int(l, "bk_set_id").unwrap_or(0),
        bk_set_name: label_str(l, "bk_set_name").unwrap_or_default(),
        bk_module_id: label_int(l, "bk_module_id").unwrap_or(0),
        bk_module_name: label_str(l, "bk_module_name").unwrap_or_default(),
        service_template_id: label_int(l, "service_template_id").unwrap_or(0),
        service_instance_id: label_int(l, "service_instance_id").unwrap_or(0),
        service_instance_name: label_str(l, "service_instance_name")
            .or_else(|| label_str(l, "bk_service_name"))
            .unwrap_or_default(),
        process_template_id: label_int(l, "process_template_id").unwrap_or(0),
        bk_process_name: process_name_of(first),
        bk_process_id,
        config_templates: config_templates(l),
        process_status,
        is_auto,
        insts: insts.into_iter().map(|(i, _)| i).collect(),
    };
    Some(row)
}

impl Row {
    /// The five expression fields.
    pub fn expression_fields(&self) -> [String; 5] {
        [
            self.bk_set_name.clone(),
            self.bk_module_name.clone(),
            self.service_instance_name.clone(),
            self.bk_process_name.clone(),
            self.bk_process_id.to_string(),
        ]
    }

    /// GSEKit's `expression`: the five fields joined with [`EXPRESSION_SPLITTER`].
    pub fn expression(&self) -> String {
        self.expression_fields().join(EXPRESSION_SPLITTER)
    }

    /// The row as process_status answers it.
    pub fn to_wire(&self) -> ProcessStatusRow {
        ProcessStatusRow {
            id: self.id,
            bk_biz_id: self.bk_biz_id.unwrap_or(0),
            expression: self.expression(),
            bk_host_innerip: self.bk_host_innerip.clone(),
            bk_cloud_id: self.bk_cloud_id,
            bk_set_env: self.bk_set_env.clone(),
            bk_set_id: self.bk_set_id,
            bk_module_id: self.bk_module_id,
            service_template_id: self.service_template_id,
            service_instance_id: self.service_instance_id,
            bk_process_name: self.bk_process_name.clone(),
            bk_process_id: self.bk_process_id,
            process_template_id: self.process_template_id,
            process_status: self.process_status,
            is_auto: self.is_auto,
            bk_set_name: self.bk_set_name.clone(),
            bk_module_name: self.bk_module_name.clone(),
            bk_service_name: self.service_instance_name.clone(),
            bk_cloud_name: self.bk_cloud_name.clone(),
            config_templates: self.config_templates.clone(),
            proc_inst_infos: self
                .insts
                .iter()
                .map(|i| ProcInstInfo {
                    bk_process_id: self.bk_process_id,
                    local_inst_id: i.local_inst_id,
                    inst_id: i.inst_id,
                    process_status: i.status,
                    is_auto: i.is_auto,
                    namespace: i.key.namespace.clone(),
                    name: i.key.name.clone(),
                    pid: i.pid,
                })
                .collect(),
        }
    }

    /// The row as process_status answers it, as JSON.
    pub fn to_json(&self) -> Value {
        handlers::to_data(&self.to_wire())
    }
}

impl IdScope {
    fn matches(&self, r: &Row) -> bool {
        (self.set_ids.is_empty() || self.set_ids.contains(&r.bk_set_id))
            && (self.module_ids.is_empty() || self.module_ids.contains(&r.bk_module_id))
            && (self.service_ids.is_empty() || self.service_ids.contains(&r.service_instance_id))
            && (self.process_names.is_empty() || self.process_names.contains(&r.bk_process_name))
            && (self.process_ids.is_empty() || self.process_ids.contains(&r.bk_process_id))
    }
}

impl ExprScope {
    fn matches(&self, r: &Row) -> bool {
        let values = r.expression_fields();
        self.fields
            .iter()
            .zip(values.iter())
            .all(|(e, v)| e.matches(v))
    }
}

/// Apply the selection and filters of `q` to rows in GSEKit's order, then `q`'s ordering.
/// As in GSEKit, a `bk_process_id` slice cuts the list matched by the expressions, before
/// the other filters.
pub fn select(rows: Vec<Row>, q: &Query) -> Vec<Row> {
    let mut rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| match q.biz {
            BizFilter::All => true,
            BizFilter::Id(b) => r.bk_biz_id == Some(b),
        })
        .collect();
    match &q.selection {
        Selection::All => {}
        Selection::Ids(env, s) => rows.retain(|r| env.matches(&r.bk_set_env) && s.matches(r)),
        Selection::Expr(env, x) => {
            rows.retain(|r| env.matches(&r.bk_set_env) && x.matches(r));
            if let Some(sl) = x.slice {
                rows = sl.apply(rows);
            }
        }
    }
    rows.retain(|r| {
        (q.cloud_ids.is_empty() || q.cloud_ids.contains(&r.bk_cloud_id))
            && (q.innerips.is_empty() || q.innerips.contains(&r.bk_host_innerip))
            && q.status.is_none_or(|s| s == r.process_status)
            && (q.status_list.is_empty() || q.status_list.contains(&r.process_status))
            && q.is_auto.is_none_or(|a| a == r.is_auto)
            && (q.is_auto_list.is_empty() || q.is_auto_list.contains(&r.is_auto))
            && q.searches.iter().all(|s| {
                r.bk_host_innerip.contains(s.as_str()) || r.bk_cloud_name.contains(s.as_str())
            })
    });
    if !q.ordering.is_empty() {
        rows.sort_by(|a, b| {
            for (f, desc) in &q.ordering {
                let o = match f {
                    OrderField::Id => a.id.cmp(&b.id),
                    OrderField::SetId => a.bk_set_id.cmp(&b.bk_set_id),
                    OrderField::ModuleId => a.bk_module_id.cmp(&b.bk_module_id),
                    OrderField::ProcessName => a.bk_process_name.cmp(&b.bk_process_name),
                    OrderField::ProcessId => a.bk_process_id.cmp(&b.bk_process_id),
                    OrderField::HostInnerip => a.bk_host_innerip.cmp(&b.bk_host_innerip),
                };
                let o = if *desc { o.reverse() } else { o };
                if o != std::cmp::Ordering::Equal {
                    return o;
                }
            }
            std::cmp::Ordering::Equal
        });
    }
    rows
}

/// Page `page` (1-based) of `pagesize` rows; past the end: empty.
pub fn page_of<T>(v: Vec<T>, page: usize, pagesize: usize) -> Vec<T> {
    let start = page.saturating_sub(1).saturating_mul(pagesize);
    v.into_iter().skip(start).take(pagesize).collect()
}

/// `POST /v1/process_status` and `/v2/gsekit/api/process/process_status/`.
pub fn process_status(engine: &Engine, body: &[u8]) -> Result<Value, ApiError> {
    let q = parse_query(body)?;
    let snaps: Vec<Snapshot> = engine
        .views()
        .into_iter()
        .map(|v| Snapshot {
            key: v.def.key.clone(),
            labels: v.def.labels.clone(),
            proc_name: v.def.spec.proc_name.clone(),
            status: v.status,
            managed: v.managed,
            pid: i64::from(v.main_pid()),
        })
        .collect();
    let host = HostView {
        ip: engine.host.ip.clone(),
        bk_cloud_id: engine.host.bk_cloud_id,
    };
    let rows = build_rows(snaps, &host);
    check_match_work(&q, rows.len())?;
    let rows = select(rows, &q);
    let count = rows.len();
    let list: Vec<ProcessStatusRow> = page_of(rows, q.page, q.pagesize)
        .iter()
        .map(Row::to_wire)
        .collect();
    Ok(handlers::to_data(&ProcessStatusList { count, list }))
}

/// Split a whole five-field expression (for the CLI's `--expr`): on
/// [`EXPRESSION_SPLITTER`] when it holds one, else on the dots outside `[...]` groups the way
/// GSEKit's older `.`-joined expressions were read (first two fields, last two fields, the
/// service instance name in between, so service names may contain dots).
pub fn split_expression(text: &str) -> Result<[String; 5], String> {
    let parts: Vec<String> = if text.contains(EXPRESSION_SPLITTER) {
        let p: Vec<String> = text
            .split(EXPRESSION_SPLITTER)
            .map(str::to_string)
            .collect();
        if p.len() != 5 {
            return Err(format!(
                "{text:?} has {} fields separated by {EXPRESSION_SPLITTER}; 5 are needed (set, module, service instance, process name, process id)",
                p.len()
            ));
        }
        p
    } else {
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut in_group = false;
        for c in text.chars() {
            match c {
                '[' if !in_group => {
                    in_group = true;
                    cur.push(c);
                }
                ']' if in_group => {
                    in_group = false;
                    cur.push(c);
                }
                '.' if !in_group => fields.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() < 5 {
            return Err(format!(
                "{text:?} has {} dot-separated fields; 5 are needed (set.module.service_instance.process_name.process_id)",
                fields.len()
            ));
        }
        let n = fields.len();
        vec![
            fields[0].clone(),
            fields[1].clone(),
            fields[2..n - 2].join("."),
            fields[n - 2].clone(),
            fields[n - 1].clone(),
        ]
    };
    let mut out: [String; 5] = Default::default();
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p;
    }
    Ok(out)
}

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
        let long = "a".repeat(60_000);
        assert!(check_match_work(&q(&long), 300).is_ok());
        let e = check_match_work(&q(&long), 400).unwrap_err();
        assert!(e.message.starts_with("expression_scope: "), "{}", e.message);
        assert!(check_match_work(&q("web[1-3]"), 100_000).is_ok());
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
