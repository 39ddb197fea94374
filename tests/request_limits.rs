//! Bounded, linear work per request: the host, agent id, item, process_infos and result-key
//! limits (docs/api.md "Request limits"), refused with 1000400 before any per-host work,
//! duplicate hosts answered once, and the daemon's memory staying proportional to the
//! answer. No wall-clock assertions: "fast enough" is shown by supervision going on.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const NS: &str = "limits";
const BAD_REQUEST: i64 = 1_000_400;

fn distinct_hosts(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"ip": format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)}))
        .collect()
}

fn same_hosts(n: usize) -> Vec<Value> {
    vec![json!({"ip": "127.0.0.1"}); n]
}

fn refused_naming(v: &Value, what: &str, field: &str, limit: &str) {
    let m = refusal(v, BAD_REQUEST, what);
    assert!(
        m.contains(field) && m.contains(limit),
        "{what}: the message names {field} and the limit {limit}: {m}"
    );
}

/// A task's results once no key is pending.
fn finished(d: &Daemon, task: &str) -> serde_json::Map<String, Value> {
    wait_for("every result", Duration::from_secs(120), || {
        let r = d.call("get_proc_operate_result_v2", &json!({ "task_id": task }));
        let m = r["data"].as_object().cloned().unwrap_or_default();
        m.values()
            .all(|x| x["error_code"] != json!(115))
            .then_some(m)
    })
}

/// The daemon's resident memory in KiB.
fn vm_rss_kib(pid: i32) -> u64 {
    proc_status_number(pid, "VmRSS:").unwrap_or(0)
}

#[test]
fn too_many_hosts_are_refused_and_supervision_goes_on() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "keep", daemon_spec(&env, "keep", json!({})));
    assert_eq!(d.op(NS, "keep", 0)["error_code"], json!(0));
    let pidfile = env.p("keep.pid");
    let pid = read_pid(&pidfile).unwrap();

    let status_body = json!({"meta": {"namespace": NS, "name": "keep"}, "op_type": 2,
                             "hosts": distinct_hosts(100_000)})
    .to_string();
    let agents_body = json!({"meta": {"namespace": NS, "name": "keep"}, "op_type": 2,
                             "agent_id_list": (0..100_000).map(|i| format!("a{i}")).collect::<Vec<_>>()})
    .to_string();
    // Two such requests at once, while the managed process dies.
    let sock = d.socket.clone();
    let senders: Vec<_> = [status_body.clone(), agents_body]
        .into_iter()
        .map(|body| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let (_, b) = http(&sock, "POST", "/v1/operate_proc", body.as_bytes()).unwrap();
                serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null)
            })
        })
        .collect();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let answers: Vec<Value> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    refused_naming(&answers[0], "100k hosts", "hosts", "2000");
    refused_naming(&answers[1], "100k agent ids", "agent_id_list", "2000");
    let new = wait_for(
        "the killed process restarted",
        Duration::from_secs(30),
        || read_pid(&pidfile).filter(|p| *p != pid && alive(*p)),
    );
    assert!(alive(new));
    // The status APIs and per-item limits of operate_proc_multi say the same.
    let v = d.call_raw("/v1/get_proc_status", status_body.as_bytes());
    refused_naming(&v, "get_proc_status of 100k hosts", "hosts", "2000");
    let v = d.call(
        "operate_proc_multi",
        &json!({"proc_operate_req": [{"meta": {"namespace": NS, "name": "keep"}, "op_type": 2,
                "hosts": distinct_hosts(2001)}]}),
    );
    refused_naming(
        &v,
        "a multi item of 2001 hosts",
        "proc_operate_req[0].hosts",
        "2000",
    );
    // 2000 distinct hosts are fine: one result key each.
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "keep"}, "op_type": 2, "hosts": distinct_hosts(2000)}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let res = d.call("get_proc_operate_result", &json!({ "task_id": task }));
    assert_eq!(res["data"].as_object().unwrap().len(), 2000);
}

#[test]
fn duplicate_hosts_are_answered_once_and_memory_stays_small() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "dup", daemon_spec(&env, "dup", json!({})));
    let rss0 = vm_rss_kib(d.pid());
    assert!(rss0 > 0);
    let meta = json!({"namespace": NS, "name": "dup"});
    let v = d.call(
        "get_proc_status",
        &json!({"meta": meta, "hosts": same_hosts(110_000)}),
    );
    refused_naming(&v, "get_proc_status of 110k hosts", "hosts", "2000");
    for _ in 0..3 {
        let v = d.call(
            "get_proc_status",
            &json!({"meta": meta, "hosts": same_hosts(2000)}),
        );
        assert_eq!(v["result"], json!(true), "{v}");
        let infos = v["data"]["proc_infos"].as_array().unwrap();
        assert_eq!(infos.len(), 1, "one entry per distinct host");
        let v = d.call(
            "get_proc_status_v2",
            &json!({"meta": meta, "agent_id_list": vec!["agent-under-test"; 2000]}),
        );
        assert_eq!(v["data"]["proc_infos"].as_array().unwrap().len(), 1, "{v}");
    }
    let r = d.call(
        "operate_proc",
        &json!({"meta": meta, "op_type": 2, "hosts": same_hosts(2000)}),
    );
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let res = d.call("get_proc_operate_result", &json!({ "task_id": task }));
    assert_eq!(res["data"].as_object().unwrap().len(), 1, "{res}");
    let rss1 = vm_rss_kib(d.pid());
    assert!(
        rss1 < rss0 + 64 * 1024,
        "VmRSS grew from {rss0} KiB to {rss1} KiB"
    );
}

#[test]
fn operate_proc_multi_takes_at_most_1000_items_and_20000_result_keys() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let items = |n: usize, hosts: usize| {
        json!({"proc_operate_req": (0..n).map(|i| json!({
            "meta": {"namespace": NS, "name": format!("m{i}")}, "op_type": 2,
            "hosts": distinct_hosts(hosts)})).collect::<Vec<_>>()})
    };
    let v = d.call("operate_proc_multi", &items(1001, 1));
    refused_naming(&v, "1001 items", "proc_operate_req", "1000");
    let v = d.call("operate_proc_multi", &items(1000, 21));
    refused_naming(&v, "21000 result keys", "proc_operate_req", "20000");
    let v = d.call("operate_proc_multi", &items(1000, 1));
    assert_eq!(v["result"], json!(true), "{v}");
    let task = v["data"]["task_id"].as_str().unwrap().to_string();
    let res = finished(&d, &task);
    // 10.0.0.0 is not this host: each item answers 117 on its own key.
    assert_eq!(res.len(), 1000);
    assert!(res.contains_key(&format!("0:10.0.0.0:{NS}:m999")));
    assert!(res.values().all(|x| x["error_code"] == json!(117)));
}

fn v2_info(env: &TestEnv, i: usize, hosts: Vec<Value>) -> Value {
    json!({
        "setup_path": env.path().display().to_string(),
        "proc_name": format!("p{i}"),
        "pid_path": env.p(&format!("p{i}.pid")),
        "value_key": format!("vk{i}"),
        "start_cmd": "true",
        "ip_list": hosts,
    })
}

#[test]
fn operate_process_takes_at_most_5000_process_infos() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let me = || vec![json!({"ip": "127.0.0.1", "bk_cloud_id": 0})];
    let body = |n: usize| {
        json!({"bk_biz_id": 3, "op_type": 2,
               "process_infos": (0..n).map(|i| v2_info(&env, i, me())).collect::<Vec<_>>()})
    };
    let v = d.call("operate_process", &body(5001));
    refused_naming(&v, "5001 process_infos", "process_infos", "5000");
    let v = d.call(
        "operate_process",
        &json!({"bk_biz_id": 3, "op_type": 2, "process_infos": [v2_info(&env, 0, distinct_hosts(2001))]}),
    );
    refused_naming(&v, "2001 ip_list hosts", "process_infos[0].ip_list", "2000");
    let v = d.call("operate_process", &body(5000));
    assert_eq!(v["result"], json!(true), "{v}");
    let task = v["data"]["bk_gse_taskid"].as_str().unwrap().to_string();
    let res = finished(&d, &task);
    assert_eq!(res.len(), 5000);
    for i in [0, 2500, 4999] {
        let k = format!("0:127.0.0.1:operate_process:vk{i}");
        assert_eq!(res[&k]["error_code"], json!(851), "{k}: {:?}", res.get(&k));
    }
    // A status query registered nothing.
    let list = d.call("procs", &json!({"namespace": "operate_process"}));
    assert_eq!(list["data"]["count"], json!(0), "{list}");
}

/// GSEKit's process_status: its host and search lists are bounded (a list as long as the body
/// allows used to be matched against every row on the async workers, stalling health for
/// seconds), every id list is matched through a set, and supervision goes on meanwhile.
#[test]
fn process_status_lists_are_bounded() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for i in 0..20 {
        d.register(
            NS,
            &format!("p{i}"),
            daemon_spec(&env, &format!("p{i}"), json!({})),
        );
    }
    let base = json!({"bk_biz_id": "*", "page": 1, "pagesize": 1000});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let ips: Vec<String> = (0..100_000)
        .map(|i| format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255))
        .collect();
    let v = d.call("process_status", &with("bk_host_innerips", json!(ips)));
    refused_naming(&v, "100k innerips", "bk_host_innerips", "2000");
    let searches: Vec<String> = (0..200_000).map(|i| format!("x{i}")).collect();
    let v = d.call("process_status", &with("searches", json!(searches)));
    refused_naming(&v, "200k searches", "searches", "100");
    let many_ids: Vec<i64> = (0..100_000).collect();
    let v = d.call(
        "process_status",
        &with("scope", json!({"bk_process_ids": many_ids})),
    );
    refused_naming(&v, "100k process ids", "scope.bk_process_ids", "20000");
    // At the limits the query answers, and matches what it should.
    let mut ips2000: Vec<String> = ips[..1999].to_vec();
    ips2000.push(
        Daemon::host()["ip"]
            .as_str()
            .unwrap_or("127.0.0.1")
            .to_string(),
    );
    let r = d.call("process_status", &with("bk_host_innerips", json!(ips2000)));
    assert_eq!(r["result"], json!(true), "{r}");
    assert_eq!(r["data"]["count"], json!(20), "{r}");
    let mut s100: Vec<String> = (0..99).map(|i| format!("x{i}")).collect();
    s100.insert(0, String::new());
    let r = d.call("process_status", &with("searches", json!(s100)));
    assert_eq!(r["result"], json!(true), "{r}");
    assert_eq!(r["data"]["count"], json!(0), "{r}");
    let ids20k: Vec<i64> = (0..20_000).collect();
    let r = d.call(
        "process_status",
        &with("scope", json!({"bk_process_ids": ids20k})),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    assert!(d.get("/v1/healthz")["result"] == json!(true));
}

/// A GET query whose percent-decoded bytes are not UTF-8 is refused as a body would be,
/// never read with replacement characters.
#[test]
fn a_query_that_is_not_utf8_is_refused() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for path in ["/v1/logs?key=%FF%FE/x", "/v1/events?key=ns/%C3%28"] {
        let v = d.get(path);
        let m = refusal(&v, BAD_REQUEST, path);
        assert!(m.contains("UTF-8"), "{path}: {m}");
    }
}

/// An expression_scope that takes GSEKit's literal-expansion fallback (a word-list element
/// with an unclosed `[`) in four fields: an 862-byte request (from any role that may read)
/// used to raise the agent's peak memory by ~180 MiB (every expanded character a glob token),
/// and would have cost tokens × name length × rows to match. The fallback is bounded like the
/// plain path, and a request whose matching work (pattern tokens × rows) is over the budget
/// is refused with 1000400.
#[test]
fn a_small_expression_cannot_make_process_status_allocate_or_spin() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for i in 0..5 {
        d.register(
            NS,
            &format!("e{i}"),
            daemon_spec(&env, &format!("e{i}"), json!({})),
        );
    }
    let g10 = "[a,b,c,d,e,f,g,h,i,j]";
    let field = format!("[[x,y]{g10}{g10}{g10}[a,b,c,d,e]{}", "?".repeat(90));
    let body = json!({
        "bk_biz_id": "*", "page": 1, "pagesize": 1,
        "expression_scope": {
            "bk_set_env": "*",
            "bk_set_name": field, "bk_module_name": field, "service_instance_name": field,
            "bk_process_name": field, "bk_process_id": "*",
        },
    });
    assert!(body.to_string().len() < 2048);
    let before = proc_status_number(d.pid(), "VmHWM:").expect("VmHWM");
    let r = d.call("process_status", &body);
    let after = proc_status_number(d.pid(), "VmHWM:").expect("VmHWM");
    let grew_mib = after.saturating_sub(before) / 1024;
    assert!(
        grew_mib < 32,
        "a small process_status took the agent's peak RSS up by {grew_mib} MiB: {r}"
    );
    let m = refusal(&r, BAD_REQUEST, "an expression too large to match");
    assert!(m.contains("expression_scope"), "{m}");
    // An ordinary expression still answers.
    let ok = d.call(
        "process_status",
        &json!({"bk_biz_id": "*", "page": 1, "pagesize": 10,
                "expression_scope": {"bk_set_env": "*", "bk_set_name": "*", "bk_module_name": "[a,b]*",
                "service_instance_name": "*", "bk_process_name": "e[0-9]", "bk_process_id": "*"}}),
    );
    assert_eq!(ok["result"], json!(true), "{ok}");
}
