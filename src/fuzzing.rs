//! The fuzz harness: the entry points of the fuzz targets (`fuzz/`) and of their corpus
//! replay (`tests/fuzz_corpus.rs`), each checking what must hold for every input. Built only
//! with the `fuzzing` feature (which the tests and the fuzz workspace turn on) and in unit
//! tests, never in the agent's default build.

use crate::api::ApiError;
use crate::api::gsekit::{
    HostView, Registry, Snapshot, build_rows, decode_operate_process, page_of, parse_query, select,
};
use crate::api::handlers::{KeyStyle, Target, polled_key, result_key, username};
use crate::api::listing::{decode_procs, decode_tasks};
use crate::api::operate::{decode_multi, decode_operate, decode_task_query};
use crate::api::register::decode_register;
use crate::api::status::{decode_meta_hosts, decode_sync};
use crate::procinfo::{parse_lineage, parse_pid_text, parse_stat};
use crate::proto::codes;
use crate::spec::{Labels, ProcKey, ProcSpec, Source};
use serde_json::json;

// ---------------------------------------------------------------------------------------
// api_decode: the procagent/GSE API decoders

/// The API names the fuzz target chooses from (by the input's first byte).
pub const FUZZ_APIS: &[&str] = &[
    "operate_proc",
    "operate_proc_multi",
    "get_proc_operate_result",
    "get_proc_status",
    "get_proc_status_v2",
    "sync_proc_status",
    "register_proc_info",
    "update_proc_info",
    "unregister_proc_info",
    "procs",
    "tasks",
];

/// One fuzz input: the first byte picks the API from [`FUZZ_APIS`], the rest is the body.
/// Checks what must hold for every input: decoding never panics, and a refusal carries a
/// non-zero code and a message.
pub fn api_decode(data: &[u8]) {
    let Some((sel, body)) = data.split_first() else {
        return;
    };
    let api = FUZZ_APIS[*sel as usize % FUZZ_APIS.len()];
    if let Err(e) = fuzz_decode(api, body) {
        assert_ne!(e.code, codes::SUCCESS, "{api}: an error answered code 0");
        assert!(!e.message.is_empty(), "{api}: an error without a message");
    }
}

/// Decode and validate a request body exactly as the handlers do for `api`, without touching
/// any state: the entry point of the fuzz target and of its corpus replay test. Also derives
/// what the handlers derive from a valid request (result keys, the audit user name) and
/// renders the error envelope, so every decoder path a request can reach runs.
pub fn fuzz_decode(api: &str, body: &[u8]) -> Result<(), ApiError> {
    let _ = username(body);
    let keys = |tg: &[Target], key: &ProcKey| {
        let me = crate::host::HostIdentity {
            ip: "10.0.0.1".into(),
            bk_cloud_id: 0,
            bk_supplier_id: 0,
            agent_id: "fuzz-agent".into(),
        };
        for t in tg {
            let _ = result_key(t, KeyStyle::V1, key);
            let _ = result_key(t, KeyStyle::V2, key);
            let h = t.item_host();
            let _ = polled_key(&h, KeyStyle::V1, key, &me);
            let _ = polled_key(&h, KeyStyle::V2, key, &me);
        }
    };
    let r = match api {
        "operate_proc" | "operate_proc_v2" => {
            decode_operate(body).map(|d| keys(&d.targets, &d.key))
        }
        "operate_proc_multi" => decode_multi(body).map(|items| {
            for it in &items {
                keys(&it.targets, &it.key);
            }
        }),
        "get_proc_operate_result" | "get_proc_operate_result_v2" => {
            decode_task_query(body).map(|_| ())
        }
        "get_proc_status" | "get_proc_status_v2" | "unregister_proc_info" => {
            decode_meta_hosts(body).map(|(_, k, tg)| keys(&tg, &k))
        }
        "sync_proc_status" => decode_sync(body).map(|_| ()),
        "register_proc_info" | "update_proc_info" => {
            decode_register(body).map(|(_, k, tg, _)| keys(&tg, &k))
        }
        "procs" => decode_procs(body).map(|_| ()),
        "tasks" => decode_tasks(body).map(|_| ()),
        other => Err(ApiError {
            http: axum::http::StatusCode::NOT_FOUND,
            code: codes::NOT_FOUND,
            message: format!("unknown API {other:?}"),
        }),
    };
    if let Err(e) = &r {
        let _ = crate::api::envelope(false, e.code, &e.message, None, e.http);
    }
    r
}

// ---------------------------------------------------------------------------------------
// gsekit_decode: process_status and operate_process

/// One fuzz input for the GSEKit APIs: the first byte picks `process_status` (even) or
/// `operate_process` (odd), the rest is the body. `process_status` runs the whole pure path
/// (filters, expressions, slices, ordering, rows, page, JSON) over a fixed set of
/// processes; `operate_process` resolves against a small registry in which two definitions
/// share a setup path and program name. Checks that a refusal carries a code and a message.
pub fn gsekit_decode(data: &[u8]) {
    let Some((sel, body)) = data.split_first() else {
        return;
    };
    let r: Result<(), ApiError> = if sel % 2 == 0 {
        parse_query(body).map(|q| {
            let host = HostView {
                ip: "10.0.0.1".into(),
                bk_cloud_id: 0,
            };
            let rows = select(build_rows(fuzz_snapshots(), &host), &q);
            for r in page_of(rows, q.page, q.pagesize) {
                let _ = r.to_json();
            }
        })
    } else {
        decode_operate_process(&fuzz_registry(), body).map(|_| ())
    };
    if let Err(e) = r {
        assert_ne!(e.code, codes::SUCCESS, "an error answered code 0");
        assert!(!e.message.is_empty(), "an error without a message");
    }
}

fn fuzz_snapshots() -> Vec<Snapshot> {
    let labels = |set: &str, module: &str, pid: i64, inst: i64| -> Labels {
        let mut l = Labels::new();
        l.insert("bk_set_name".into(), json!(set));
        l.insert("bk_module_name".into(), json!(module));
        l.insert("bk_process_name".into(), json!("gse_agent"));
        l.insert("bk_process_id".into(), json!(pid));
        l.insert("local_inst_id".into(), json!(inst));
        l.insert("bk_set_env".into(), json!("3"));
        l
    };
    [
        ("管控平台", "gse", 46, 1),
        ("管控平台", "gse", 46, 2),
        ("PaaS平台", "web", 48, 1),
        ("x.y", "[m]", 49, 1),
    ]
    .iter()
    .enumerate()
    .map(|(i, (set, module, pid, inst))| Snapshot {
        key: ProcKey::new("GSEKIT_BIZ_2", format!("p{i}")),
        labels: labels(set, module, *pid, *inst),
        proc_name: "gse_agent".into(),
        status: 1 + (i as i64 % 2),
        managed: i % 2 == 0,
        pid: 100 + i as i64,
    })
    .collect()
}

pub(crate) fn fuzz_registry() -> Registry {
    let mut reg = Registry::default();
    for (name, vk) in [("a", "k1"), ("b", "k2")] {
        let key = ProcKey::new("operate_process", name);
        let def = crate::spec::Definition {
            key: key.clone(),
            labels: Labels::new(),
            spec: ProcSpec {
                setup_path: "/opt/x".into(),
                proc_name: "x".into(),
                pid_path: "/opt/x/x.pid".into(),
                value_key: vk.into(),
                ..ProcSpec::default()
            },
            source: Source::Api,
            register_time: 0,
            updated_time: 0,
        };
        reg.insert(key, def);
    }
    reg
}

// ---------------------------------------------------------------------------------------
// proc_parsers: /proc/PID/stat, environ and pid-file text

/// One fuzz input for the /proc and pid-file parsers: must never panic, and a pid the
/// pid-file parser accepts is always a decimal number in `2..=pid_max` that is not our own.
pub fn proc_parsers(data: &[u8]) {
    let _ = parse_stat(data);
    let _ = parse_lineage(data);
    let text = String::from_utf8_lossy(data);
    for (pid_max, own) in [(4_194_304, 4242), (32_768, 2), (i64::MAX, i32::MAX)] {
        if let Ok(pid) = parse_pid_text(&text, pid_max, own) {
            assert!(
                pid >= 2 && i64::from(pid) <= pid_max && pid != own,
                "{text:?} -> {pid}"
            );
            assert!(
                text.trim().bytes().all(|b| b.is_ascii_digit()),
                "{text:?} -> {pid}"
            );
        }
    }
}
