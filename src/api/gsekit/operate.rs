//! `operate_process`: process_infos resolved to registry keys (one identity scheme for
//! both callers), planned and submitted as one task (module docs of [`super`]).

use super::*;

// ---------------------------------------------------------------------------------------
// operate_process

/// `operate_process` request.
#[derive(Debug, Deserialize)]
pub(super) struct OperateProcessReq {
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
pub(super) fn v2_field(field: &str) -> &str {
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

pub(super) fn required_text(
    v: &Option<String>,
    prefix: &str,
    field: &str,
) -> Result<String, ApiError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(ApiError::bad(format!("{prefix}.{field}: is required"))),
    }
}

/// One process_infos entry, resolved against the registry.
pub struct Resolved {
    index: usize,
    identity: Identity,
    /// The registry key its results are keyed by: the definition it names, else the key a
    /// new definition would get.
    key: ProcKey,
    /// The registered definition's spec, source and account, when there is one.
    existing: Option<(ProcSpec, Source)>,
    spec: Result<ProcSpec, Vec<FieldError>>,
    hosts: Vec<HostWire>,
    /// Why the entry does not name one process (nothing runs for it; its keys answer this).
    refused: Option<Refusal>,
}

/// An entry that names no single process: several registered definitions share its
/// identity, another entry of the request names its key differently, or its key is not
/// usable.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub message: String,
    /// The registered definitions it matched (the caller must be allowed to operate them to
    /// be told).
    pub matched: Vec<ProcKey>,
}

impl Resolved {
    /// Why this entry is answered with an error instead of run, if it is.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.refused.as_ref()
    }

    /// The registry key its results are keyed by.
    pub fn key(&self) -> &ProcKey {
        &self.key
    }
}

pub(super) fn resolve(
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
    let refuse = |key: ProcKey, message: String, matched: Vec<ProcKey>| Resolved {
        index: i,
        identity: identity.clone(),
        key,
        existing: None,
        spec: Ok(ProcSpec::default()),
        hosts: hosts.clone(),
        refused: Some(Refusal { message, matched }),
    };
    let (key, existing) = match found {
        [] => {
            let key = synthetic_key(&identity);
            let errs = validate_key(&key);
            if !errs.is_empty() {
                let message = format!(
                    "{prefix}: the process would be named {key}, which is not a valid name ({}); give it a shorter value_key",
                    errs.iter()
                        .map(|e| e.message.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                return Ok(refuse(key, message, Vec::new()));
            }
            if let Some(d) = reg.get(&key) {
                let message = format!(
                    "{prefix}: the process with {} would be named {key}, but that name belongs to the process with {}; give it a distinct value_key",
                    identity.describe(),
                    Identity::of(&d.spec).describe()
                );
                return Ok(refuse(key.clone(), message, vec![key]));
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
            // Only setup_path + proc_name can be shared: a value_key names one definition.
            let message = format!(
                "{prefix}: value_key is empty, so the process is named by its {}, which {} registered processes share ({}); two processes with the same setup_path and proc_name need distinct value_keys: give each its own value_key, or operate them by meta with operate_proc",
                identity.describe(),
                many.len(),
                many.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(refuse(synthetic_key(&identity), message, many.to_vec()));
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
        refused: None,
    })
}

/// Why two entries of one request that are named by the same key cannot both run: they are
/// different processes (two identities), or they give one process two specs (which only
/// matters to an operation that stores the spec). `None`: the same entry twice.
fn disagreement(a: &Resolved, b: &Resolved, mutating: bool) -> Option<String> {
    if a.identity != b.identity {
        return Some(format!(
            "process_infos[{}] ({}) and process_infos[{}] ({}) would both be named {}; give them distinct value_keys",
            a.index,
            a.identity.describe(),
            b.index,
            b.identity.describe(),
            a.key
        ));
    }
    if !mutating || a.spec == b.spec {
        return None;
    }
    Some(match &a.identity {
        Identity::Path { .. } => format!(
            "process_infos[{}] and process_infos[{}] are two different processes with the same {} and no value_key; two processes with the same setup_path and proc_name need distinct value_keys",
            a.index,
            b.index,
            a.identity.describe()
        ),
        Identity::ValueKey(_) => format!(
            "process_infos[{}] and process_infos[{}] give different specs for the same {}; a value_key names one process",
            a.index,
            b.index,
            a.identity.describe()
        ),
    })
}

/// Most reasons one refusal lists (the others are counted): a request of thousands of
/// entries naming one key must not make a message per entry of all of them.
const MAX_REASONS: usize = 5;

/// Refuse, per entry, every entry whose key another entry names differently: all the
/// entries named by such a key are refused with the reasons given for it (the entries' own,
/// once per identity, and each disagreement with the key's first entry), so whichever entry
/// answers for the key says it all. Linear: each entry is compared with its key's first.
fn refuse_disagreements(resolved: &mut [Resolved], mutating: bool) {
    let mut by_key: HashMap<ProcKey, Vec<usize>> = HashMap::new();
    for (j, r) in resolved.iter().enumerate() {
        by_key.entry(r.key.clone()).or_default().push(j);
    }
    let mut groups: Vec<Vec<usize>> = by_key.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    for g in groups {
        let first = g[0];
        let mut reasons: Vec<String> = Vec::new();
        let mut more = 0usize;
        let mut add = |why: String, reasons: &mut Vec<String>| {
            if reasons.len() < MAX_REASONS {
                reasons.push(why);
            } else {
                more += 1;
            }
        };
        let mut matched: Vec<ProcKey> = Vec::new();
        let mut identities: HashSet<&Identity> = HashSet::new();
        for &j in &g {
            let r = &resolved[j];
            if identities.insert(&r.identity)
                && let Some(f) = &r.refused
            {
                add(f.message.clone(), &mut reasons);
                matched.extend(f.matched.iter().cloned());
            }
            if j != first
                && let Some(why) = disagreement(&resolved[first], r, mutating)
            {
                add(why, &mut reasons);
            }
        }
        if reasons.is_empty() {
            continue;
        }
        if more > 0 {
            reasons.push(format!(
                "and {more} more entries name {} differently",
                resolved[first].key
            ));
        }
        matched.sort();
        matched.dedup();
        let f = Refusal {
            message: reasons.join("; "),
            matched,
        };
        for &j in &g {
            resolved[j].refused = Some(f.clone());
        }
    }
}

/// Decode and validate an `operate_process` body against the registry (which processes
/// the identities name), without changing anything: bk_biz_id, op_type, every
/// `process_infos` entry resolved to a registry key and a merged spec, or to a [`Refusal`]
/// when it names no single process.
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
    for (i, w) in infos.iter().enumerate() {
        resolved.push(resolve(reg, &index, i, w)?);
    }
    refuse_disagreements(&mut resolved, op.mutating());
    Ok((biz, code, op, resolved))
}

/// The plans of an entry refused as a whole: 830 with `message` for each distinct host of
/// `tg` that is this agent, the other hosts' own answer otherwise; nothing runs.
fn refused(engine: &Engine, tg: &[Target], key: &ProcKey, op: OpType, message: &str) -> Vec<Plan> {
    handlers::distinct_targets(tg, KeyStyle::V2, key)
        .into_iter()
        .map(|(rk, t)| Plan {
            result_key: rk,
            target: t.item_host(),
            key: Some(key.clone()),
            op,
            immediate: Some(if handlers::is_me(engine, t) {
                KeyResult::err(codes::SPEC_INVALID, message.to_string())
            } else {
                handlers::not_me(engine, t)
            }),
            work: Work::Operate(None),
        })
        .collect()
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
            .map(|v| (v.def.key.clone(), (*v.def).clone()))
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
        if let Some(f) = &r.refused {
            // Nothing runs for it; the caller must still be allowed to operate what it named.
            handlers::check_op_access(engine, access, op, &r.key, None)?;
            for k in &f.matched {
                handlers::check_op_access(engine, access, op, k, None)?;
            }
            for p in refused(engine, &tg, &r.key, op, &f.message) {
                push(p, &mut plans);
            }
            continue;
        }
        match &r.spec {
            // A status query uses no spec: it answers for what is registered (851 if
            // nothing is), whatever the request's fields say.
            Err(errs) if op.mutating() => {
                handlers::check_op_access(engine, access, op, &r.key, None)?;
                let msg = FieldError::joined(errs);
                for p in refused(engine, &tg, &r.key, op, &msg) {
                    push(p, &mut plans);
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
                    crate::api::operate::plan_items(engine, &tg, KeyStyle::V2, &r.key, op, inline)
                {
                    // This host's item (plan_items answers it as not registered): said
                    // in GSEKit's terms.
                    let here = p
                        .immediate
                        .as_ref()
                        .is_none_or(|i| i.error_code == codes::NOT_REGISTERED);
                    if never_registered && here {
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
    let task_id = crate::api::submit::submit(
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
