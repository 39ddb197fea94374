//! `process_status`: the request (filters, scope, expressions, ordering, paging) and the
//! rows built from the supervisor's snapshots (module docs of [`super`]).

use super::*;

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

pub(super) fn parse_biz(v: Option<&Value>) -> Result<BizFilter, ApiError> {
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

pub(super) fn parse_env(
    v: Option<&Value>,
    field: &str,
    default: Option<&str>,
) -> Result<EnvFilter, ApiError> {
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

pub(super) fn parse_expr_scope(w: &ExprScopeWire) -> Result<(EnvFilter, ExprScope), ApiError> {
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

pub(super) fn parse_ordering(text: &str) -> Result<Vec<(OrderField, bool)>, ApiError> {
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

pub(super) fn label_str(l: &Labels, k: &str) -> Option<String> {
    match l.get(k)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn label_int(l: &Labels, k: &str) -> Option<i64> {
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
pub(super) fn config_templates(l: &Labels) -> Value {
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
pub(super) fn stable_id(key: &ProcKey) -> i64 {
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

pub(super) fn row_of(mut group: Vec<Snapshot>, host: &HostView) -> Option<Row> {
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
    check_match_work(
        &q,
        rows.iter().map(|r| r.expression_fields().map(|f| f.len())),
    )?;
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
