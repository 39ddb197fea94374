//! The request pipeline's shared part: dispatch by API name ([`call_authorized`], to one file
//! per API family: [`super::operate`], [`super::status`], [`super::register`],
//! [`super::listing`], [`super::gsekit`]), strict body decoding, hosts and result keys, and the
//! authorization-by-effect checks every family uses.
//!
//! Request decoding names the failing field (`meta.name: missing field`); the body is parsed
//! once into the request type, validated (the sizes of [`super::limits`] included),
//! authorized, and only then acted upon. Bad input never changes anything stored.
//!
//! Authorization is by effect: a status query (op_type 2) is a read whatever it carries (an
//! inline spec is ignored: it never registers, replaces or runs anything); anything that
//! writes a definition or acts on a process needs the write role and the account rule for
//! both the registered definition and the inline one, checked before the task is recorded
//! and again under the process's operation lock when the item runs.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::ApiError;
use super::auth::Access;
use super::limits::{self, MAX_HOSTS};
use crate::host::HostIdentity;
use crate::proto::{HostWire, ItemHost, KeyResult, OpType, codes};
use crate::spec::{FieldError, ProcKey, ProcSpec, validate_key};
use crate::supervisor::Engine;
use crate::supervisor::defs::{self, PutMode};

/// An answer's `data` built from its [`crate::proto`] type (the type the CLI reads it as).
pub fn to_data<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// Decode a JSON body into `T`, naming the failing field. Only a whole, valid UTF-8 JSON
/// document is accepted: invalid UTF-8 anywhere (also inside a string the request type
/// ignores, which serde would skip unchecked) and anything after the document are refused.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if let Err(e) = std::str::from_utf8(body) {
        let at = e.valid_up_to();
        let line = body[..at].iter().filter(|b| **b == b'\n').count() + 1;
        let column = at
            - body[..at]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        let what = match e.error_len() {
            Some(_) => format!("invalid byte 0x{:02x}", body.get(at).copied().unwrap_or(0)),
            None => "a truncated character".to_string(),
        };
        return Err(ApiError::bad(format!(
            "the request body is not valid UTF-8: {what} at offset {at} (line {line}, column {column})"
        )));
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad(
            "the request body is empty; a JSON object is required",
        ));
    }
    // Every API takes an object; say so instead of naming a Rust type ("expected struct ...").
    if let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace())
        && *first != b'{'
    {
        let what = match *first {
            b'[' => "an array",
            b'"' => "a string",
            b't' | b'f' => "a boolean",
            b'n' => "null",
            b'-' | b'0'..=b'9' => "a number",
            _ => "not JSON",
        };
        let msg = if what == "not JSON" {
            "malformed JSON: the request body must be a JSON object".to_string()
        } else {
            format!("the request body must be a JSON object, got {what}")
        };
        return Err(ApiError::bad(msg));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        Ok(v) => match de.end() {
            Ok(()) => Ok(v),
            Err(e) => Err(ApiError::bad(format!(
                "malformed JSON: {e} after the request object"
            ))),
        },
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = if inner.is_syntax() || inner.is_eof() {
                format!("malformed JSON: {inner}")
            } else if path == "." || path.is_empty() {
                format!("invalid request: {inner}")
            } else {
                format!("invalid request: {path}: {inner}")
            };
            Err(ApiError::bad(msg))
        }
    }
}

/// `bk_username` of the ESB common args, for the audit trail (`bk_app_secret` and
/// `bk_token` are accepted and never stored or logged).
pub fn username(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Common {
        #[serde(default, deserialize_with = "crate::proto::de_str")]
        bk_username: String,
    }
    serde_json::from_slice::<Common>(body)
        .map(|c| c.bk_username.chars().take(128).collect())
        .unwrap_or_default()
}

/// What a handler answers: the envelope's `data`, or (for the largest answer, `procs`) the
/// whole envelope already encoded.
pub enum Answer {
    Data(Value),
    Encoded(Vec<u8>),
}

/// Dispatch an API call by name for a caller already authorized (see [`auth::authorize`]).
pub async fn call_authorized(
    engine: &Arc<Engine>,
    api: &str,
    body: &[u8],
    access: &Access,
) -> Result<Answer, ApiError> {
    let data = match api {
        "operate_proc" | "operate_proc_v2" => {
            super::operate::operate_proc(engine, body, access, api, KeyStyle::V1).await
        }
        "operate_proc_multi" => super::operate::operate_proc_multi(engine, body, access).await,
        "get_proc_operate_result" => super::operate::get_result(engine, body, KeyStyle::V1).await,
        "get_proc_operate_result_v2" => {
            super::operate::get_result(engine, body, KeyStyle::V2).await
        }
        "get_proc_status" => super::status::get_proc_status(engine, body, KeyStyle::V1),
        "get_proc_status_v2" => super::status::get_proc_status(engine, body, KeyStyle::V2),
        // Encoded in one go off the async workers, as `procs` is.
        "sync_proc_status" => {
            let (e, b) = (Arc::clone(engine), body.to_vec());
            return tokio::task::spawn_blocking(move || {
                super::status::sync_proc_status_encoded(&e, &b)
            })
            .await
            .map_err(|e| ApiError::new(codes::INTERNAL, format!("sync_proc_status: {e}")))?
            .map(Answer::Encoded);
        }
        "register_proc_info" => {
            super::register::register(engine, body, access, PutMode::Register, api).await
        }
        "update_proc_info" => {
            super::register::register(engine, body, access, PutMode::Upsert, api).await
        }
        "unregister_proc_info" => super::register::unregister(engine, body, access).await,
        // Encoded in one go off the async workers (see `listing::procs_encoded`).
        "procs" => {
            return procs_blocking(engine, body, access)
                .await
                .map(Answer::Encoded);
        }
        "tasks" => super::listing::tasks(engine, body).await,
        "operate_process" => super::gsekit::operate_process(engine, body, access).await,
        "process_status" => {
            // Selection and ordering are linear in the rows but not trivial at thousands of
            // them: off the async workers, so health and other callers never wait on it.
            let (e, b) = (Arc::clone(engine), body.to_vec());
            tokio::task::spawn_blocking(move || super::gsekit::process_status(&e, &b))
                .await
                .map_err(|e| ApiError::new(codes::INTERNAL, format!("process_status: {e}")))?
        }
        other => Err(ApiError {
            http: axum::http::StatusCode::NOT_FOUND,
            code: codes::NOT_FOUND,
            message: format!("unknown API {other:?}"),
        }),
    };
    data.map(Answer::Data)
}

/// `procs` on a blocking thread: the whole answer, encoded.
async fn procs_blocking(
    engine: &Arc<Engine>,
    body: &[u8],
    access: &Access,
) -> Result<Vec<u8>, ApiError> {
    let (e, b, a) = (Arc::clone(engine), body.to_vec(), access.clone());
    tokio::task::spawn_blocking(move || super::listing::procs_encoded(&e, &b, &a))
        .await
        .map_err(|e| ApiError::new(codes::INTERNAL, format!("procs: {e}")))?
}

/// How per-host result keys are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// `cloud:supplier:ip:ns:name` (v1 documents: get_proc_operate_result, and the
    /// synchronous answers of requests whose hosts carry a supplier).
    V1,
    /// `cloud:ip:ns:name`, or `agent_id:ns:name` for agent ids (v2 documents:
    /// get_proc_operate_result_v2).
    V2,
}

/// A host named by a request.
#[derive(Debug, Clone)]
pub enum Target {
    Host(HostWire),
    Agent(String),
}

/// The hosts of a request: `agent_id_list` when given (then `hosts` is ignored), else `hosts`;
/// at most [`MAX_HOSTS`] of them (duplicates count), checked before anything is built.
pub fn targets(hosts: &[HostWire], agent_ids: &[String]) -> Result<Vec<Target>, ApiError> {
    if agent_ids.is_empty() {
        limits::check_len(
            "hosts",
            hosts.len(),
            MAX_HOSTS,
            "hosts per request (or item)",
        )?;
    } else {
        limits::check_len(
            "agent_id_list",
            agent_ids.len(),
            MAX_HOSTS,
            "agent ids per request (or item)",
        )?;
    }
    let t: Vec<Target> = if !agent_ids.is_empty() {
        agent_ids.iter().map(|a| Target::Agent(a.clone())).collect()
    } else {
        hosts.iter().cloned().map(Target::Host).collect()
    };
    if t.is_empty() {
        return Err(ApiError::bad(
            "hosts: at least one host (or an agent_id_list) is required",
        ));
    }
    for (i, x) in t.iter().enumerate() {
        match x {
            Target::Host(h) if h.ip.trim().is_empty() => {
                return Err(ApiError::bad(format!("hosts[{i}].ip: is required")));
            }
            Target::Agent(a) if a.trim().is_empty() => {
                return Err(ApiError::bad(format!(
                    "agent_id_list[{i}]: must not be empty"
                )));
            }
            _ => {}
        }
    }
    Ok(t)
}

impl Target {
    /// The host as a task item stores it (the ip and agent id trimmed, an absent cloud id 0).
    pub fn item_host(&self) -> ItemHost {
        match self {
            Target::Host(h) => ItemHost::Host {
                ip: h.ip.trim().to_string(),
                bk_cloud_id: h.bk_cloud_id.unwrap_or(0),
                bk_supplier_id: h.bk_supplier_id,
            },
            Target::Agent(a) => ItemHost::Agent(a.trim().to_string()),
        }
    }
}

/// The `(bk_cloud_id, ip)` an agent id names when it is in the fallback form
/// `"{bk_cloud_id}:{ip}"` that callers use for a host without an agent id.
pub fn fallback_agent_host(id: &str) -> Option<(i64, &str)> {
    let (cloud, ip) = id.trim().split_once(':')?;
    let cloud = cloud.parse::<i64>().ok()?;
    let ip = ip.trim();
    (!ip.is_empty()).then_some((cloud, ip))
}

/// The key of a task item as a result endpoint answers it: `style` is the endpoint's
/// (get_proc_operate_result [`KeyStyle::V1`], get_proc_operate_result_v2
/// [`KeyStyle::V2`]), whatever API submitted the task.
///
/// * v2: `cloud:ip:ns:name` for a host, `agent_id:ns:name` for an agent id.
/// * v1: `cloud:supplier:ip:ns:name` for a host (an absent supplier is 0); for an agent id,
///   the host it names: this agent's cloud, supplier and ip when it is this agent's id (or
///   its fallback form), `cloud:0:ip` for another agent's fallback form `cloud:ip`, and the
///   agent-id form `agent_id:ns:name` for another agent's id, whose host is unknown here.
pub fn polled_key(h: &ItemHost, style: KeyStyle, key: &ProcKey, me: &HostIdentity) -> String {
    let (ns, name) = (&key.namespace, &key.name);
    match (h, style) {
        (
            ItemHost::Host {
                ip, bk_cloud_id, ..
            },
            KeyStyle::V2,
        ) => format!("{bk_cloud_id}:{ip}:{ns}:{name}"),
        (
            ItemHost::Host {
                ip,
                bk_cloud_id,
                bk_supplier_id,
            },
            KeyStyle::V1,
        ) => format!(
            "{bk_cloud_id}:{}:{ip}:{ns}:{name}",
            bk_supplier_id.unwrap_or(0)
        ),
        (ItemHost::Agent(a), KeyStyle::V2) => format!("{a}:{ns}:{name}"),
        (ItemHost::Agent(a), KeyStyle::V1) => {
            if me.is_my_agent_id(a) {
                format!(
                    "{}:{}:{}:{ns}:{name}",
                    me.bk_cloud_id, me.bk_supplier_id, me.ip
                )
            } else if let Some((cloud, ip)) = fallback_agent_host(a) {
                format!("{cloud}:0:{ip}:{ns}:{name}")
            } else {
                format!("{a}:{ns}:{name}")
            }
        }
    }
}

/// The result key of a target and process as one request writes it (what the request
/// deduplicates on; result endpoints write theirs with [`polled_key`]).
pub fn result_key(t: &Target, style: KeyStyle, key: &ProcKey) -> String {
    match (t, style) {
        (Target::Agent(a), _) => format!("{}:{}:{}", a.trim(), key.namespace, key.name),
        (Target::Host(h), KeyStyle::V1) => format!(
            "{}:{}:{}:{}:{}",
            h.bk_cloud_id.unwrap_or(0),
            h.bk_supplier_id.unwrap_or(0),
            h.ip.trim(),
            key.namespace,
            key.name
        ),
        (Target::Host(h), KeyStyle::V2) => {
            format!(
                "{}:{}:{}:{}",
                h.bk_cloud_id.unwrap_or(0),
                h.ip.trim(),
                key.namespace,
                key.name
            )
        }
    }
}

/// The distinct targets of a request by the result key each gets, the first of each kept,
/// in order; linear.
pub fn distinct_targets<'a>(
    tg: &'a [Target],
    style: KeyStyle,
    key: &ProcKey,
) -> Vec<(String, &'a Target)> {
    limits::first_of_each(
        tg.iter().map(|t| (result_key(t, style, key), t)),
        |(k, _)| k.clone(),
    )
}

/// Does the target name this agent?
pub fn is_me(engine: &Engine, t: &Target) -> bool {
    match t {
        Target::Host(h) => engine.host.is_me(h),
        Target::Agent(a) => engine.host.is_my_agent_id(a),
    }
}

/// The per-key error for a target that is not this agent.
pub fn not_me(engine: &Engine, t: &Target) -> KeyResult {
    let what = match t {
        Target::Host(h) => format!(
            "host {} (bk_cloud_id {}{})",
            h.ip.trim(),
            h.bk_cloud_id.unwrap_or(0),
            h.bk_supplier_id
                .map(|s| format!(", bk_supplier_id {s}"))
                .unwrap_or_default()
        ),
        Target::Agent(a) => format!("agent {a:?}"),
    };
    KeyResult::err(
        codes::AGENT_NOT_FOUND,
        format!(
            "{what} is not served by this agent (this agent is {} bk_cloud_id {} bk_supplier_id {}, agent id {})",
            engine.host.ip,
            engine.host.bk_cloud_id,
            engine.host.bk_supplier_id,
            engine.host.agent_id_or_fallback()
        ),
    )
}

/// The `host` of a status entry. An agent id's entry says which agent it is for
/// (`bk_agent_id`) and the host that agent id names: this agent's ip and cloud id for one of
/// its own ids, the `cloud:ip` of another agent's fallback-form id, and no address at all
/// for another agent's id (its host is unknown here; never this agent's address).
pub(crate) fn host_json(engine: &Engine, t: &Target, style: KeyStyle) -> Value {
    match (t, style) {
        (Target::Agent(a), _) => {
            let a = a.trim();
            if engine.host.is_my_agent_id(a) {
                json!({"ip": engine.host.ip, "bk_cloud_id": engine.host.bk_cloud_id, "bk_agent_id": a})
            } else if let Some((cloud, ip)) = fallback_agent_host(a) {
                json!({"ip": ip, "bk_cloud_id": cloud, "bk_agent_id": a})
            } else {
                json!({ "bk_agent_id": a })
            }
        }
        (Target::Host(h), KeyStyle::V1) => json!({
            "ip": h.ip.trim(), "bk_cloud_id": h.bk_cloud_id.unwrap_or(0), "bk_supplier_id": h.bk_supplier_id.unwrap_or(0)
        }),
        (Target::Host(h), KeyStyle::V2) => {
            json!({"ip": h.ip.trim(), "bk_cloud_id": h.bk_cloud_id.unwrap_or(0)})
        }
    }
}

pub(crate) fn check_key(key: &ProcKey) -> Result<(), ApiError> {
    let errs = validate_key(key);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad(FieldError::joined(&errs)))
    }
}

/// The only account the caller may act on (`None`: any).
pub fn only_account(access: &Access) -> Option<String> {
    match &access.role {
        super::auth::Role::Admin { account } => Some(account.clone()),
        _ => None,
    }
}

/// The caller's account rule, for checks made when an item runs.
pub fn account_rule(access: &Access) -> defs::AccountRule {
    let a = access.clone();
    Arc::new(move |account: &str| a.may_use_account(account).map_err(|e| e.message))
}

/// The caller as the writer of definitions, for the task item `item` (if any).
pub fn writer(access: &Access, item: Option<(String, usize)>) -> defs::Writer {
    defs::Writer {
        may_use: account_rule(access),
        only: only_account(access),
        item,
    }
}

/// Check the caller may run `op` on `key`: a status query is a read (its inline spec is never
/// used); any other operation needs the write role and the account rule for the registered
/// definition (the process acted on) and for the inline spec (which replaces it). `inline`
/// is `None` also when the inline spec is invalid: the role and the registered definition
/// are still checked, so a refusal is never turned into a recorded task.
pub fn check_op_access(
    engine: &Engine,
    access: &Access,
    op: OpType,
    key: &ProcKey,
    inline: Option<&ProcSpec>,
) -> Result<(), ApiError> {
    if !op.mutating() {
        return Ok(());
    }
    if !access.can_write() {
        return Err(ApiError::new(
            codes::FORBIDDEN,
            "read-only group members may not operate processes",
        ));
    }
    // Both the registered definition (the process acted on) and an inline spec (which
    // replaces that definition before the operation runs) must be the caller's to use.
    if let Some(a) = engine.spec_of(key).map(|s| s.account) {
        access.may_use_account(&a)?;
    }
    match inline {
        Some(s) => access.may_use_account(&s.account),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::limits::MAX_MULTI_ITEMS;
    use crate::api::operate::decode_multi;

    fn host(ip: &str, cloud: Option<i64>, supplier: Option<i64>) -> HostWire {
        HostWire {
            ip: ip.into(),
            bk_cloud_id: cloud,
            bk_supplier_id: supplier,
        }
    }

    #[test]
    fn distinct_targets_answer_each_key_once_in_order() {
        let key = ProcKey::new("ns", "p");
        let tg = targets(
            &[
                host("10.0.0.2", Some(0), None),
                host(" 10.0.0.1", None, None),
                host("10.0.0.2", None, Some(3)),
                host("10.0.0.1", Some(0), Some(0)),
                host("10.0.0.1", Some(1), None),
            ],
            &[],
        )
        .unwrap();
        let keys = |style| -> Vec<String> {
            distinct_targets(&tg, style, &key)
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        // v2 keys ignore the supplier; an absent cloud id is 0; the ip is trimmed.
        assert_eq!(
            keys(KeyStyle::V2),
            vec!["0:10.0.0.2:ns:p", "0:10.0.0.1:ns:p", "1:10.0.0.1:ns:p"]
        );
        assert_eq!(
            keys(KeyStyle::V1),
            vec![
                "0:0:10.0.0.2:ns:p",
                "0:0:10.0.0.1:ns:p",
                "0:3:10.0.0.2:ns:p",
                "1:0:10.0.0.1:ns:p"
            ]
        );
        // 2000 copies of one host: one key.
        let same = vec![host("10.0.0.9", Some(0), None); MAX_HOSTS];
        let tg = targets(&same, &[]).unwrap();
        assert_eq!(distinct_targets(&tg, KeyStyle::V2, &key).len(), 1);
    }

    fn me() -> HostIdentity {
        HostIdentity {
            ip: "10.0.0.1".into(),
            bk_cloud_id: 2,
            bk_supplier_id: 5,
            agent_id: "aid-me".into(),
        }
    }

    #[test]
    fn each_result_endpoint_writes_its_own_key_form() {
        let key = ProcKey::new("ns", "p");
        let ih = |ip: &str, cloud, supplier| ItemHost::Host {
            ip: ip.into(),
            bk_cloud_id: cloud,
            bk_supplier_id: supplier,
        };
        let agent = |a: &str| ItemHost::Agent(a.into());
        let cases: Vec<(ItemHost, &str, &str)> = vec![
            (
                ih("10.0.0.1", 2, None),
                "2:0:10.0.0.1:ns:p",
                "2:10.0.0.1:ns:p",
            ),
            (
                ih("10.0.0.1", 2, Some(5)),
                "2:5:10.0.0.1:ns:p",
                "2:10.0.0.1:ns:p",
            ),
            (
                ih("10.9.9.9", 0, Some(3)),
                "0:3:10.9.9.9:ns:p",
                "0:10.9.9.9:ns:p",
            ),
            (ih("fe80::1", 0, None), "0:0:fe80::1:ns:p", "0:fe80::1:ns:p"),
            // This agent by its id and by its fallback form: its own cloud, supplier, ip.
            (agent("aid-me"), "2:5:10.0.0.1:ns:p", "aid-me:ns:p"),
            (agent("2:10.0.0.1"), "2:5:10.0.0.1:ns:p", "2:10.0.0.1:ns:p"),
            // Another agent's fallback form names its host; an opaque id does not.
            (agent("3:10.9.9.9"), "3:0:10.9.9.9:ns:p", "3:10.9.9.9:ns:p"),
            (agent("0:fe80::2"), "0:0:fe80::2:ns:p", "0:fe80::2:ns:p"),
            (agent("0200abc"), "0200abc:ns:p", "0200abc:ns:p"),
            (agent("x:10.0.0.1"), "x:10.0.0.1:ns:p", "x:10.0.0.1:ns:p"),
        ];
        for (h, v1, v2) in cases {
            assert_eq!(polled_key(&h, KeyStyle::V1, &key, &me()), v1, "{h:?}");
            assert_eq!(polled_key(&h, KeyStyle::V2, &key, &me()), v2, "{h:?}");
        }
        // A target stores what the request said, trimmed, the cloud id defaulted.
        let t = Target::Host(host(" 10.0.0.1 ", None, Some(5)));
        assert_eq!(t.item_host(), ih("10.0.0.1", 0, Some(5)));
        assert_eq!(Target::Agent(" a ".into()).item_host(), agent("a"));
        assert_eq!(fallback_agent_host("0:"), None);
        assert_eq!(fallback_agent_host(":1.2.3.4"), None);
        assert_eq!(fallback_agent_host("7:1.2.3.4"), Some((7, "1.2.3.4")));
    }

    #[test]
    fn a_key_two_items_share_answers_once_for_this_agent() {
        use crate::api::operate::task_results;
        use crate::store::TaskItemRecord;
        let key = ProcKey::new("ns", "p");
        let item = |h: ItemHost, r: Option<KeyResult>| TaskItemRecord {
            result_key: "as-written".into(),
            key: Some(key.clone()),
            op_type: 0,
            result: r,
            definition: None,
            target: Some(h),
        };
        let mine = || ItemHost::Agent("aid-me".into());
        let fallback = || ItemHost::Agent("2:10.0.0.1".into());
        let other_supplier = || ItemHost::Host {
            ip: "10.0.0.1".into(),
            bk_cloud_id: 2,
            bk_supplier_id: Some(9),
        };
        let ok = KeyResult::ok("");
        let started = KeyResult::err(codes::PROC_RUNNING, "already running");
        let away = KeyResult::err(codes::AGENT_NOT_FOUND, "not served");
        // This agent named twice: one v1 key, 115 while either runs, then the first.
        let items = vec![item(mine(), Some(ok.clone())), item(fallback(), None)];
        let v1 = task_results(items.clone(), KeyStyle::V1, &me());
        assert_eq!(v1.len(), 1, "{v1:?}");
        assert_eq!(v1["2:5:10.0.0.1:ns:p"].error_code, codes::RUNNING);
        let v2 = task_results(items, KeyStyle::V2, &me());
        assert_eq!(v2.len(), 2, "{v2:?}");
        let items = vec![
            item(mine(), Some(started.clone())),
            item(fallback(), Some(ok.clone())),
        ];
        assert_eq!(
            task_results(items, KeyStyle::V1, &me())["2:5:10.0.0.1:ns:p"],
            started
        );
        // Two suppliers of one cloud:ip (one is not this agent): v2 answers for this agent.
        let items = vec![
            item(other_supplier(), Some(away.clone())),
            item(mine(), Some(ok.clone())),
        ];
        let v2 = task_results(items.clone(), KeyStyle::V2, &me());
        assert_eq!(v2.len(), 2);
        let items = vec![
            item(other_supplier(), Some(away.clone())),
            item(fallback(), Some(ok.clone())),
        ];
        let v2 = task_results(items, KeyStyle::V2, &me());
        assert_eq!(v2.len(), 1, "{v2:?}");
        assert_eq!(v2["2:10.0.0.1:ns:p"], ok);
        // An item without a host answers the key it was written with.
        let mut old = item(mine(), Some(ok.clone()));
        old.target = None;
        assert_eq!(
            task_results(vec![old], KeyStyle::V2, &me())
                .keys()
                .collect::<Vec<_>>(),
            vec!["as-written"]
        );
    }

    #[test]
    fn targets_refuse_more_than_the_limit_before_building_anything() {
        let many = vec![host("10.0.0.9", None, None); MAX_HOSTS + 1];
        let e = targets(&many, &[]).unwrap_err();
        assert_eq!(e.code, codes::BAD_REQUEST);
        assert!(
            e.message.starts_with("hosts: at most 2000 "),
            "{}",
            e.message
        );
        let ids = vec!["a".to_string(); MAX_HOSTS + 1];
        let e = targets(&[], &ids).unwrap_err();
        assert!(
            e.message.starts_with("agent_id_list: at most 2000 "),
            "{}",
            e.message
        );
        // agent_id_list wins over hosts, and is what is counted.
        assert_eq!(targets(&many, &["a".to_string()]).unwrap().len(), 1);
    }

    #[test]
    fn multi_refuses_too_many_items_and_result_keys() {
        let item = |hosts: usize| {
            json!({"meta": {"namespace": "n", "name": "p"}, "op_type": 2,
                   "hosts": vec![json!({"ip": "10.0.0.1"}); hosts]})
        };
        let body = |items: Vec<Value>| json!({ "proc_operate_req": items }).to_string();
        let e = decode_multi(body(vec![item(1); MAX_MULTI_ITEMS + 1]).as_bytes()).unwrap_err();
        assert!(
            e.message
                .starts_with("proc_operate_req: at most 1000 items"),
            "{}",
            e.message
        );
        assert_eq!(
            decode_multi(body(vec![item(1); MAX_MULTI_ITEMS]).as_bytes())
                .unwrap()
                .len(),
            MAX_MULTI_ITEMS
        );
        // 11 items of 2000 hosts: each within its own limit, 22000 keys in all.
        let e = decode_multi(body(vec![item(MAX_HOSTS); 11]).as_bytes()).unwrap_err();
        assert!(
            e.message
                .starts_with("proc_operate_req: at most 20000 result keys"),
            "{}",
            e.message
        );
        let e = decode_multi(body(vec![item(1), item(MAX_HOSTS + 1)]).as_bytes()).unwrap_err();
        assert!(
            e.message
                .starts_with("proc_operate_req[1].hosts: at most 2000"),
            "{}",
            e.message
        );
    }
}
