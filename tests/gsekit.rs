//! operate_process (v2) and GSEKit's process_status, end to end: the real daemon on a temp
//! dir, fixtures registered through register_proc_info with topology labels (GSEKit's own
//! `GSEKIT_BIZ_{biz}` / `{bk_process_name}_{local_inst_id}` naming) and through
//! operate_process itself, and the `procagent ps` CLI.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const BAD_REQUEST: i64 = 1_000_400;

// ---------------------------------------------------------------------------------------
// helpers

/// Merge `extra`'s keys into `base`.
fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Some(x)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in x {
            b.insert(k.clone(), v.clone());
        }
    }
    base
}

/// A process_status body for business 2, one page of 1000, plus `extra`.
fn q(extra: Value) -> Value {
    with(json!({"bk_biz_id": 2, "page": 1, "pagesize": 1000}), extra)
}

/// process_status data (asserting success).
fn ps(d: &Daemon, body: &Value) -> Value {
    let r = d.call("process_status", body);
    assert_eq!(r["result"], json!(true), "process_status {body}: {r}");
    r["data"].clone()
}

/// The bk_process_id of each listed row (0 for processes without one).
fn ids(data: &Value) -> Vec<i64> {
    data["list"]
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["bk_process_id"].as_i64().expect("bk_process_id"))
        .collect()
}

/// process_status rows' ids for `extra`, checking `count` agrees.
fn sel(d: &Daemon, extra: Value) -> Vec<i64> {
    let data = ps(d, &q(extra));
    let v = ids(&data);
    assert_eq!(data["count"], json!(v.len()), "{data}");
    v
}

/// A request error: (code, message).
fn refused(d: &Daemon, api: &str, body: &Value) -> (i64, String) {
    let r = d.call(api, body);
    assert_eq!(r["result"], json!(false), "{api} {body} should fail: {r}");
    (
        r["code"].as_i64().unwrap_or(0),
        r["message"].as_str().unwrap_or("").to_string(),
    )
}

fn expr_scope(env: &str, fields: [&str; 5]) -> Value {
    json!({"expression_scope": {
        "bk_set_env": env,
        "bk_set_name": fields[0],
        "bk_module_name": fields[1],
        "service_instance_name": fields[2],
        "bk_process_name": fields[3],
        "bk_process_id": fields[4],
    }})
}

/// Topology labels as GSEKit/CMDB name them.
fn topo(
    env_: &str,
    set: (i64, &str),
    module: (i64, &str),
    service: (i64, &str),
    process: (&str, i64),
) -> Value {
    json!({
        "bk_set_env": env_,
        "bk_set_id": set.0, "bk_set_name": set.1,
        "bk_module_id": module.0, "bk_module_name": module.1,
        "service_instance_id": service.0, "service_instance_name": service.1,
        "bk_process_name": process.0, "bk_process_id": process.1,
        "service_template_id": 26, "process_template_id": 26,
    })
}

/// Register `ns/name` with `labels`; a daemonizing fixture program named `name` when
/// `runnable`, else a spec nothing starts.
fn reg(d: &Daemon, env: &TestEnv, ns: &str, name: &str, labels: Value, runnable: bool) {
    let spec = if runnable {
        daemon_spec(env, name, json!({}))
    } else {
        json!({
            "identity": {"proc_name": name, "setup_path": env.path().display().to_string(),
                         "pid_path": env.p(&format!("{name}.pid")), "user": ""},
            "control": {"start_cmd": "true"},
            "resource": {"cpu": 0, "mem": 0},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
        })
    };
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": ns, "name": name, "labels": labels},
                "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(r["result"], json!(true), "register {ns}/{name}: {r}");
    assert_eq!(
        r["data"][Daemon::key(ns, name)]["error_code"],
        json!(0),
        "{r}"
    );
}

/// The GSEKit-like fixture: business 2 processes 46 (two instances) to 50, business 3
/// process 60, and one process without any topology.
///
/// | id | set (env) | module | service instance | process name |
/// |----|-----------|--------|------------------|--------------|
/// | 46 | 管控平台 (3) | gse_agent | gse_agent.127.0.0.1_gse_agent | gse_agent (instances 1, 2) |
/// | 47 | 管控平台 (3) | gse_proxy | gse_proxy.127.0.0.1 | gse_proxy |
/// | 48 | PaaS平台 (3) | paas | paas_api 127.0.0.1 | paas_api |
/// | 49 | PaaS平台 (3) | paas | paas_web | paas_web |
/// | 50 | 存储平台 (1) | redis cache | redis | redis |
/// | 60 (biz 3) | 管控平台 (3) | nginx | nginx | nginx |
/// | 0 (no biz) | nodeman/bkmonitorbeat, no labels |
fn fixture(d: &Daemon, env: &TestEnv, runnable: bool) {
    let b2 = "GSEKIT_BIZ_2";
    let mut agent = topo(
        "3",
        (5, "管控平台"),
        (21, "gse_agent"),
        (5, "gse_agent.127.0.0.1_gse_agent"),
        ("gse_agent", 46),
    );
    agent["config_templates"] = json!([
        {"config_template_id": 1, "template_name": "更新模板名称", "file_name": "更新文件名称"},
        {"config_template_id": 2, "template_name": "MySQL配置", "file_name": "mysql.ini"}
    ]);
    reg(d, env, b2, "gse_agent_1", agent.clone(), runnable);
    reg(d, env, b2, "gse_agent_2", agent, false);
    let rows = [
        (
            "gse_proxy_1",
            topo(
                "3",
                (5, "管控平台"),
                (22, "gse_proxy"),
                (6, "gse_proxy.127.0.0.1"),
                ("gse_proxy", 47),
            ),
            false,
        ),
        (
            "paas_api_1",
            topo(
                "3",
                (6, "PaaS平台"),
                (23, "paas"),
                (7, "paas_api 127.0.0.1"),
                ("paas_api", 48),
            ),
            runnable,
        ),
        (
            "paas_web_1",
            topo(
                "3",
                (6, "PaaS平台"),
                (23, "paas"),
                (8, "paas_web"),
                ("paas_web", 49),
            ),
            false,
        ),
        (
            "redis_1",
            topo(
                "1",
                (9, "存储平台"),
                (24, "redis cache"),
                (9, "redis"),
                ("redis", 50),
            ),
            false,
        ),
    ];
    for (name, labels, run) in rows {
        reg(d, env, b2, name, labels, run);
    }
    reg(
        d,
        env,
        "GSEKIT_BIZ_3",
        "nginx_1",
        topo(
            "3",
            (15, "管控平台"),
            (30, "nginx"),
            (20, "nginx"),
            ("nginx", 60),
        ),
        false,
    );
    reg(d, env, "nodeman", "bkmonitorbeat", json!({}), false);
    if runnable {
        for name in ["gse_agent_1", "paas_api_1"] {
            let r = d.op(b2, name, 0);
            assert_eq!(r["error_code"], json!(0), "start {name}: {r}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// process_status

#[test]
fn process_status_every_filter_alone_and_combined() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    fixture(&d, &env, true);

    // business
    assert_eq!(sel(&d, json!({})), vec![46, 47, 48, 49, 50]);
    assert_eq!(sel(&d, json!({"bk_biz_id": 3})), vec![60]);
    assert_eq!(sel(&d, json!({"bk_biz_id": "2"})), vec![46, 47, 48, 49, 50]);
    assert_eq!(sel(&d, json!({"bk_biz_id": 99})), Vec::<i64>::new());
    assert_eq!(
        sel(&d, json!({"bk_biz_id": "*"})),
        vec![0, 46, 47, 48, 49, 50, 60]
    );

    // scope: each field alone (bk_set_env defaults to "3", as in GSEKit)
    assert_eq!(sel(&d, json!({"scope": {}})), vec![46, 47, 48, 49]);
    assert_eq!(
        sel(&d, json!({"scope": {"bk_set_env": "3"}})),
        vec![46, 47, 48, 49]
    );
    assert_eq!(sel(&d, json!({"scope": {"bk_set_env": 1}})), vec![50]);
    assert_eq!(
        sel(&d, json!({"scope": {"bk_set_env": "2"}})),
        Vec::<i64>::new()
    );
    assert_eq!(
        sel(&d, json!({"scope": {"bk_set_env": "3", "bk_set_ids": [5]}})),
        vec![46, 47]
    );
    assert_eq!(
        sel(
            &d,
            json!({"scope": {"bk_set_env": "3", "bk_module_ids": ["23"]}})
        ),
        vec![48, 49]
    );
    assert_eq!(
        sel(
            &d,
            json!({"scope": {"bk_set_env": "3", "bk_service_ids": [7]}})
        ),
        vec![48]
    );
    assert_eq!(
        sel(
            &d,
            json!({"scope": {"bk_set_env": "3", "bk_process_names": ["paas_web"]}})
        ),
        vec![49]
    );
    assert_eq!(
        sel(
            &d,
            json!({"scope": {"bk_set_env": "3", "bk_process_ids": [46, 50]}})
        ),
        vec![46],
        "50 is in environment 1"
    );
    // empty lists mean "all"
    assert_eq!(
        sel(
            &d,
            json!({"scope": {"bk_set_env": "3", "bk_set_ids": [], "bk_module_ids": [], "bk_service_ids": [], "bk_process_names": [], "bk_process_ids": []}})
        ),
        vec![46, 47, 48, 49]
    );
    // scope fields combined
    assert_eq!(
        sel(
            &d,
            json!({"scope": {"bk_set_env": "3", "bk_set_ids": [5, 6], "bk_process_names": ["gse_agent", "paas_api"]}})
        ),
        vec![46, 48]
    );

    // expression_scope: each field alone
    assert_eq!(
        sel(&d, expr_scope("3", ["PaaS平台", "*", "*", "*", "*"])),
        vec![48, 49]
    );
    assert_eq!(
        sel(&d, expr_scope("3", ["*", "gse_*", "*", "*", "*"])),
        vec![46, 47]
    );
    assert_eq!(
        sel(
            &d,
            expr_scope("3", ["*", "*", "paas_api 127.0.0.1", "*", "*"])
        ),
        vec![48]
    );
    assert_eq!(
        sel(&d, expr_scope("3", ["*", "*", "*", "paas_[api, web]", "*"])),
        vec![48, 49]
    );
    assert_eq!(
        sel(&d, expr_scope("3", ["*", "*", "*", "*", "4[6, 8, 9]"])),
        vec![46, 48, 49]
    );
    // scope wins over expression_scope (which is then not even parsed)
    let both = json!({"scope": {"bk_set_env": "3", "bk_set_ids": [6]},
                      "expression_scope": {"bk_set_env": "3", "bk_set_name": "[管控平台"}});
    assert_eq!(sel(&d, both), vec![48, 49]);

    // bk_cloud_ids
    assert_eq!(
        sel(&d, json!({"bk_cloud_ids": [0]})),
        vec![46, 47, 48, 49, 50]
    );
    assert_eq!(sel(&d, json!({"bk_cloud_ids": [1, 2]})), Vec::<i64>::new());
    // process_status: a process is running only when every instance is (GSEKit's summary)
    assert_eq!(sel(&d, json!({"process_status": 1})), vec![48]);
    assert_eq!(
        sel(&d, json!({"process_status": "2"})),
        vec![46, 47, 49, 50]
    );
    assert_eq!(sel(&d, json!({"process_status": 0})), Vec::<i64>::new());
    // is_auto: managed only when every instance is
    assert_eq!(sel(&d, json!({"is_auto": true})), vec![48]);
    assert_eq!(sel(&d, json!({"is_auto": false})), vec![46, 47, 49, 50]);
    // bk_host_innerips
    assert_eq!(
        sel(&d, json!({"bk_host_innerips": ["127.0.0.1"]})),
        vec![46, 47, 48, 49, 50]
    );
    assert_eq!(
        sel(&d, json!({"bk_host_innerips": ["10.0.0.9"]})),
        Vec::<i64>::new()
    );
    // searches: fuzzy on inner IP or cloud area name; every term must match
    assert_eq!(sel(&d, json!({"searches": ["127.0"]})).len(), 5);
    assert_eq!(sel(&d, json!({"searches": ["default"]})).len(), 5);
    assert_eq!(sel(&d, json!({"searches": ["127.0", "area"]})).len(), 5);
    assert_eq!(
        sel(&d, json!({"searches": ["127.0", "zzz"]})),
        Vec::<i64>::new()
    );
    assert_eq!(sel(&d, json!({"searches": ["10.1"]})), Vec::<i64>::new());

    // everything combined
    assert_eq!(
        sel(
            &d,
            with(
                expr_scope("3", ["[管控平台, PaaS平台]", "*", "*", "*", "*"]),
                json!({"process_status": 2, "is_auto": false, "searches": ["127"],
                       "bk_cloud_ids": [0], "bk_host_innerips": ["127.0.0.1"]})
            )
        ),
        vec![46, 47, 49]
    );
    assert_eq!(
        sel(
            &d,
            json!({"scope": {"bk_set_env": "3", "bk_module_ids": [23]}, "process_status": 1, "is_auto": true})
        ),
        vec![48]
    );

    // a row: every field of the seed's example, instances from the two definitions
    let data = ps(&d, &q(json!({"scope": {"bk_process_ids": [46]}})));
    let p = &data["list"][0];
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
        assert!(p.get(f).is_some(), "row lacks {f}: {p}");
    }
    assert_eq!(p["id"], json!(46));
    assert_eq!(p["bk_biz_id"], json!(2));
    assert_eq!(
        p["expression"],
        json!(
            "管控平台<-GSEKIT->gse_agent<-GSEKIT->gse_agent.127.0.0.1_gse_agent<-GSEKIT->gse_agent<-GSEKIT->46"
        )
    );
    assert_eq!(p["bk_host_innerip"], json!("127.0.0.1"));
    assert_eq!(p["bk_cloud_id"], json!(0));
    assert_eq!(p["bk_set_env"], json!("3"));
    assert_eq!(
        (
            p["bk_set_id"].clone(),
            p["bk_module_id"].clone(),
            p["service_instance_id"].clone()
        ),
        (json!(5), json!(21), json!(5))
    );
    assert_eq!(
        (
            p["service_template_id"].clone(),
            p["process_template_id"].clone()
        ),
        (json!(26), json!(26))
    );
    assert_eq!(p["bk_service_name"], json!("gse_agent.127.0.0.1_gse_agent"));
    assert_eq!(p["bk_cloud_name"], json!("default area"));
    assert_eq!(p["config_templates"][1]["file_name"], json!("mysql.ini"));
    assert_eq!(
        (p["process_status"].clone(), p["is_auto"].clone()),
        (json!(2), json!(false))
    );
    let insts = p["proc_inst_infos"].as_array().unwrap();
    assert_eq!(insts.len(), 2, "{p}");
    assert_eq!(
        insts
            .iter()
            .map(|i| (
                i["bk_process_id"].clone(),
                i["local_inst_id"].clone(),
                i["inst_id"].clone(),
                i["process_status"].clone(),
                i["is_auto"].clone(),
                i["name"].clone()
            ))
            .collect::<Vec<_>>(),
        vec![
            (
                json!(46),
                json!(1),
                json!(1),
                json!(1),
                json!(true),
                json!("gse_agent_1")
            ),
            (
                json!(46),
                json!(2),
                json!(2),
                json!(2),
                json!(false),
                json!("gse_agent_2")
            ),
        ]
    );
    let pid = read_pid(&env.p("gse_agent_1.pid")).unwrap();
    assert_eq!(insts[0]["pid"], json!(pid));

    // an unlabelled process: topology defaults
    let data = ps(
        &d,
        &q(json!({"bk_biz_id": "*", "scope": {"bk_process_ids": [0]}})),
    );
    let p = &data["list"][0];
    assert_eq!(p["bk_process_name"], json!("bkmonitorbeat"), "proc_name");
    assert_eq!(p["bk_set_env"], json!("3"));
    assert_eq!(p["bk_biz_id"], json!(0));
    assert_eq!(p["config_templates"], json!([]));
    assert_eq!(p["proc_inst_infos"][0]["namespace"], json!("nodeman"));

    // the seed's own path
    let r = d.call_raw(
        "/v2/gsekit/api/process/process_status/",
        serde_json::to_string(&q(json!({"scope": {"bk_set_ids": [6]}})))
            .unwrap()
            .as_bytes(),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    assert_eq!(ids(&r["data"]), vec![48, 49]);
    assert!(r["request_id"].is_string());

    // bad filter values are request errors naming the field
    for (body, field) in [
        (
            json!({"bk_biz_id": 2, "page": 1, "pagesize": 10, "process_status": 3}),
            "process_status",
        ),
        (json!({"page": 1, "pagesize": 10}), "bk_biz_id"),
        (q(json!({"scope": {"bk_set_env": "9"}})), "scope.bk_set_env"),
        (
            q(json!({"scope": {"bk_set_ids": ["x"]}})),
            "scope.bk_set_ids",
        ),
        (q(json!({"is_auto": "maybe"})), "is_auto"),
        (
            q(json!({"expression_scope": {"bk_set_name": "*"}})),
            "expression_scope.bk_set_env",
        ),
        (q(json!({"ordering": "color"})), "ordering"),
    ] {
        let (code, msg) = refused(&d, "process_status", &body);
        assert_eq!(code, BAD_REQUEST, "{msg}");
        assert!(msg.contains(field), "{field} not named in {msg:?}");
    }

    // ordering (GSEKit's fields, - for descending)
    assert_eq!(
        sel(&d, json!({"ordering": "-bk_process_id"})),
        vec![50, 49, 48, 47, 46]
    );
    assert_eq!(
        sel(&d, json!({"ordering": "bk_set_id,-bk_process_id"})),
        vec![47, 46, 49, 48, 50]
    );

    // the CLI
    let cli_ids = |args: &[&str]| -> Vec<i64> {
        let mut a = vec!["--json", "ps"];
        a.extend_from_slice(args);
        let (code, out, err) = d.cli(&a);
        assert_eq!(code, 0, "ps {args:?}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        ids(&v)
    };
    assert_eq!(cli_ids(&[]), vec![0, 46, 47, 48, 49, 50, 60]);
    assert_eq!(
        cli_ids(&["--pagesize", "2"]),
        vec![0, 46, 47, 48, 49, 50, 60],
        "every page fetched"
    );
    assert_eq!(cli_ids(&["--page", "2", "--pagesize", "2"]), vec![47, 48]);
    assert_eq!(
        cli_ids(&["--biz", "2", "--set", "[管控平台, PaaS平台]"]),
        vec![46, 47, 48, 49]
    );
    assert_eq!(
        cli_ids(&["--module", "paas", "--process", "paas_[api, web]"]),
        vec![48, 49]
    );
    assert_eq!(
        cli_ids(&["--service", "gse_*", "--id", "4[6, 7]"]),
        vec![46, 47]
    );
    assert_eq!(cli_ids(&["--env", "1"]), vec![50]);
    assert_eq!(cli_ids(&["--status", "running"]), vec![48]);
    assert_eq!(cli_ids(&["--auto", "false", "--biz", "3"]), vec![60]);
    assert_eq!(cli_ids(&["--search", "127.0", "--biz", "3"]), vec![60]);
    assert_eq!(
        cli_ids(&[
            "--expr",
            "管控平台<-GSEKIT->*<-GSEKIT->*<-GSEKIT->*<-GSEKIT->4[6-9]"
        ]),
        vec![46, 47]
    );
    assert_eq!(
        cli_ids(&[
            "--expr",
            "管控平台.gse_agent.gse_agent.127.0.0.1_gse_agent.gse_agent.46"
        ]),
        vec![46],
        "the older dot-joined form, dots inside the service name"
    );
    let (code, out, err) = d.cli(&["ps", "--biz", "2", "--status", "running"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("STATUS") && out.contains("paas_api"), "{out}");
    assert!(out.contains("GSEKIT_BIZ_2/paas_api_1"), "{out}");
    assert!(!out.contains("gse_proxy"), "{out}");
    let (code, _, err) = d.cli(&["ps", "--set", "[管控平台"]);
    assert_eq!(code, 2, "a bad expression is a usage error");
    assert!(err.contains("bk_set_name"), "{err}");
    let (code, _, err) = d.cli(&["ps", "--expr", "a.b", "--set", "x"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--expr") || err.contains("cannot be used"),
        "{err}"
    );
}

#[test]
fn process_status_expressions_follow_gsekit() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    fixture(&d, &env, false);
    let x = |fields: [&str; 5]| sel(&d, expr_scope("*", fields));
    let none = Vec::<i64>::new();

    // the seed's examples
    assert_eq!(
        x(["[管控平台, PaaS平台]", "*", "*", "*", "*"]),
        vec![46, 47, 48, 49]
    );
    assert_eq!(x(["*", "*", "*", "*", "4[6, 8, 9]"]), vec![46, 48, 49]);
    assert_eq!(
        sel(
            &d,
            expr_scope("3", ["[管控平台, PaaS平台]", "*", "*", "*", "4[6, 8, 9]"])
        ),
        vec![46, 48, 49],
        "the seed's whole request"
    );
    // `*` and blanks match everything
    assert_eq!(x(["*", "*", "*", "*", "*"]), vec![46, 47, 48, 49, 50]);
    assert_eq!(x(["", " ", "*", "**", ""]), vec![46, 47, 48, 49, 50]);
    // literals match exactly, whole names only
    assert_eq!(x(["管控", "*", "*", "*", "*"]), none);
    assert_eq!(x(["*", "*", "*", "*", "4"]), none);
    assert_eq!(x(["*", "*", "*", "gse_agent", "*"]), vec![46]);
    // brackets embedded in text, several groups (a cartesian product)
    assert_eq!(x(["*", "gse_[agent, proxy]", "*", "*", "*"]), vec![46, 47]);
    assert_eq!(
        x(["*", "*", "*", "[gse, paas]_[agent, web]", "*"]),
        vec![46, 49]
    );
    assert_eq!(x(["*", "*", "*", "p[a]as_[api]", "*"]), vec![48]);
    // Chinese names, with globs and brackets
    assert_eq!(
        x(["[管控, 存储]平台", "*", "*", "*", "*"]),
        vec![46, 47, 50]
    );
    assert_eq!(x(["*平台", "*", "*", "*", "*"]), vec![46, 47, 48, 49, 50]);
    assert_eq!(x(["PaaS*", "*", "*", "*", "*"]), vec![48, 49]);
    assert_eq!(x(["?控平台", "*", "*", "*", "*"]), vec![46, 47]);
    // spaces: kept inside names, trimmed around list items and around the field
    assert_eq!(x(["*", "redis cache", "*", "*", "*"]), vec![50]);
    assert_eq!(x(["*", "  redis cache ", "*", "*", "*"]), vec![50]);
    assert_eq!(
        x(["*", "[redis cache ,  paas]", "*", "*", "*"]),
        vec![48, 49, 50]
    );
    assert_eq!(x(["*", "*", "paas_api 127.0.0.1", "*", "*"]), vec![48]);
    // dots in names are ordinary characters
    assert_eq!(
        x(["*", "*", "gse_agent.127.0.0.1_gse_agent", "*", "*"]),
        vec![46]
    );
    assert_eq!(x(["*", "*", "*.127.0.0.1*", "*", "*"]), vec![46, 47]);
    assert_eq!(x(["*", "*", "* 127.0.0.1", "*", "*"]), vec![48]);
    // ranges and negated classes
    assert_eq!(x(["*", "*", "*", "*", "[46-48]"]), vec![46, 47, 48]);
    assert_eq!(x(["*", "*", "*", "*", "[47-100]"]), vec![47, 48, 49, 50]);
    assert_eq!(x(["*", "*", "*", "*", "[!4]*"]), vec![50]);
    assert_eq!(x(["*", "*", "*", "*", "4[6-7, 9]"]), vec![46, 47, 49]);
    // numbers may come as JSON numbers
    let r = sel(
        &d,
        json!({"expression_scope": {"bk_set_env": 3, "bk_process_id": 46}}),
    );
    assert_eq!(r, vec![46]);

    // slices of the matched list (GSEKit's bk_process_id [begin:end])
    assert_eq!(x(["*", "*", "*", "*", "[0:2]"]), vec![46, 47]);
    assert_eq!(x(["*", "*", "*", "*", "[-2:]"]), vec![49, 50]);
    assert_eq!(x(["*", "*", "*", "*", "[:]"]), vec![46, 47, 48, 49, 50]);
    assert_eq!(x(["PaaS平台", "*", "*", "*", "[1:]"]), vec![49]);
    assert_eq!(x(["*", "*", "*", "*", "[3 : 100]"]), vec![49, 50]);
    assert_eq!(x(["*", "*", "*", "*", "[4:1]"]), none);
    // the slice cuts the expression's list before the other filters, as in GSEKit
    assert_eq!(
        sel(
            &d,
            with(
                expr_scope("*", ["*", "*", "*", "*", "[0:2]"]),
                json!({"scope": null, "process_status": 2, "searches": ["127"]})
            )
        ),
        vec![46, 47]
    );

    // invalid expressions: a clear error naming the field
    for (fields, field, what) in [
        (
            ["[管控平台", "*", "*", "*", "*"],
            "expression_scope.bk_set_name",
            "no closing",
        ),
        (
            ["*", "*", "*", "[!z-a]", "*"],
            "expression_scope.bk_process_name",
            "reversed",
        ),
        (
            ["*", "*", "*", "*", "[0:2]x"],
            "expression_scope.bk_process_id",
            "slice",
        ),
        (
            ["*", "*", "*", "*", "[0:1][2:3]"],
            "expression_scope.bk_process_id",
            "slice",
        ),
    ] {
        let (code, msg) = refused(&d, "process_status", &q(expr_scope("*", fields)));
        assert_eq!(code, BAD_REQUEST, "{msg}");
        assert!(
            msg.contains(field) && msg.contains(what),
            "{fields:?}: {msg:?} should name {field} and say {what}"
        );
    }
}

#[test]
fn process_status_paging_boundaries() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for i in 101..=125 {
        reg(
            &d,
            &env,
            "GSEKIT_BIZ_2",
            &format!("p{i}_1"),
            topo(
                "3",
                (1, "set"),
                (2, "module"),
                (i, "svc"),
                (&format!("p{i}"), i),
            ),
            false,
        );
    }
    let page = |page: i64, pagesize: i64| {
        let data = ps(
            &d,
            &json!({"bk_biz_id": 2, "page": page, "pagesize": pagesize}),
        );
        assert_eq!(data["count"], json!(25), "count is the total: {data}");
        ids(&data)
    };
    assert_eq!(page(1, 10), (101..=110).collect::<Vec<_>>());
    assert_eq!(page(2, 10), (111..=120).collect::<Vec<_>>());
    assert_eq!(
        page(3, 10),
        (121..=125).collect::<Vec<_>>(),
        "last partial page"
    );
    assert_eq!(page(4, 10), Vec::<i64>::new(), "past the end: empty");
    assert_eq!(page(1000, 10), Vec::<i64>::new());
    assert_eq!(page(1, 25), (101..=125).collect::<Vec<_>>());
    assert_eq!(page(2, 25), Vec::<i64>::new());
    assert_eq!(page(25, 1), vec![125]);
    assert_eq!(page(26, 1), Vec::<i64>::new());
    assert_eq!(page(1, 1000), (101..=125).collect::<Vec<_>>());
    assert_eq!(
        ids(&ps(
            &d,
            &json!({"bk_biz_id": 2, "page": "1", "pagesize": "1000"})
        ))
        .len(),
        25,
        "numbers as strings"
    );
    // an empty selection pages to nothing
    let data = ps(&d, &json!({"bk_biz_id": 7, "page": 1, "pagesize": 10}));
    assert_eq!(
        (data["count"].clone(), data["list"].clone()),
        (json!(0), json!([]))
    );

    for (body, field) in [
        (
            json!({"bk_biz_id": 2, "page": 1, "pagesize": 1001}),
            "pagesize",
        ),
        (
            json!({"bk_biz_id": 2, "page": 1, "pagesize": 0}),
            "pagesize",
        ),
        (json!({"bk_biz_id": 2, "page": 1}), "pagesize"),
        (json!({"bk_biz_id": 2, "page": 0, "pagesize": 10}), "page"),
        (json!({"bk_biz_id": 2, "page": -1, "pagesize": 10}), "page"),
        (json!({"bk_biz_id": 2, "pagesize": 10}), "page"),
    ] {
        let (code, msg) = refused(&d, "process_status", &body);
        assert_eq!(code, BAD_REQUEST, "{body}: {msg}");
        assert!(
            msg.starts_with(field),
            "{body}: {msg:?} should name {field}"
        );
    }
    let (_, msg) = refused(
        &d,
        "process_status",
        &json!({"bk_biz_id": 2, "page": 1, "pagesize": 1001}),
    );
    assert!(msg.contains("1000") && msg.contains("1001"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// operate_process

/// A full inline v2 spec of a daemonizing fixture program `prog` on this host.
fn v2_info(env: &TestEnv, prog: &str, extra: Value) -> Value {
    let pidfile = env.p(&format!("{prog}.pid"));
    with(
        json!({
            "setup_path": env.path().display().to_string(),
            "proc_name": prog,
            "pid_path": pidfile,
            "cfg_path": env.p("etc"),
            "log_path": env.p("log"),
            "contact": "ops",
            "start_cmd": env.daemon_start_cmd(prog, &pidfile),
            "stop_cmd": format!("kill $(cat {pidfile})"),
            "restart_cmd": "",
            "reload_cmd": "",
            "kill_cmd": format!("kill -9 $(cat {pidfile})"),
            "func_id": "f-1",
            "instance_id": "i-1",
            "value_key": "",
            "type": 1,
            "cycle_time": 0,
            "instance_num": 1,
            "start_check_begin_time": 1,
            "start_check_end_time": 1,
            "op_timeout": 20,
            "account": if is_root() { "root" } else { "" },
            "cpu_lmt": 0,
            "mem_lmt": 0,
            "ip_list": [{"bk_cloud_id": 0, "ip": "127.0.0.1"}],
        }),
        extra,
    )
}

/// operate_process; returns the task id (asserting success).
fn v2(d: &Daemon, op: i64, infos: Value) -> String {
    let r = d.call(
        "operate_process",
        &json!({"bk_app_code": "esb_test", "bk_app_secret": "x", "bk_username": "admin",
                "bk_biz_id": 5, "op_type": op, "process_infos": infos}),
    );
    assert_eq!(r["result"], json!(true), "operate_process: {r}");
    assert!(r["request_id"].is_string(), "{r}");
    let task = r["data"]["bk_gse_taskid"]
        .as_str()
        .unwrap_or_else(|| panic!("no bk_gse_taskid: {r}"))
        .to_string();
    assert!(task.starts_with("GSETASK:"), "{task}");
    task
}

/// The v2 result key of `ns/name` on `ip` in cloud `cloud`.
fn v2_key(cloud: i64, ip: &str, ns: &str, name: &str) -> String {
    format!("{cloud}:{ip}:{ns}:{name}")
}

fn keys_in(d: &Daemon, ns: &str) -> Vec<String> {
    let r = d.call("procs", &json!({ "namespace": ns }));
    r["data"]["list"]
        .as_array()
        .expect("procs list")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn operate_process_start_stop_round_trip_defined_only_inline() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let prog = "v2svc";
    let pidfile = env.p("v2svc.pid");
    let name = format!("{prog}@{}", env.path().display());
    let key = v2_key(0, "127.0.0.1", "operate_process", &name);
    let info = v2_info(&env, prog, json!({}));

    // start
    let task = v2(&d, 0, json!([info.clone()]));
    let first = d.call("get_proc_operate_result_v2", &json!({ "task_id": task }));
    assert_eq!(first["result"], json!(true), "{first}");
    assert!(
        first["data"][&key].is_object(),
        "key {key} present from the first poll: {first}"
    );
    let r = d.wait_task_v2(&task, &key);
    assert_eq!(r["error_code"], json!(0), "start: {r}");
    let pid = read_pid(&pidfile).expect("pid file");
    assert!(alive(pid));

    // the definition: one, keyed by the identity, carrying the inline spec
    assert_eq!(keys_in(&d, "operate_process"), vec![name.clone()]);
    let det = d.detail("operate_process", &name);
    assert_eq!(det["spec"]["contact"], json!("ops"), "{det}");
    assert_eq!(det["spec"]["func_id"], json!("f-1"));
    assert_eq!(det["spec"]["config_path"], json!(env.p("etc")));
    assert_eq!(det["labels"]["bk_biz_id"], json!(5));
    let st = d.status("operate_process", &name);
    assert_eq!(
        (
            st["status"].clone(),
            st["isauto"].clone(),
            st["pid"].clone()
        ),
        (json!(1), json!(true), json!(pid))
    );
    // and in the status view
    let data = ps(&d, &json!({"bk_biz_id": 5, "page": 1, "pagesize": 10}));
    assert_eq!(data["count"], json!(1), "{data}");
    let row = &data["list"][0];
    assert_eq!(row["bk_process_name"], json!(prog));
    assert_eq!(
        (row["process_status"].clone(), row["is_auto"].clone()),
        (json!(1), json!(true))
    );
    assert_eq!(row["proc_inst_infos"][0]["name"], json!(name));

    // start again: 828, nothing duplicated
    let task = v2(&d, 0, json!([info.clone()]));
    assert_eq!(d.wait_task_v2(&task, &key)["error_code"], json!(828));
    assert_eq!(keys_in(&d, "operate_process").len(), 1);

    // status query (op 2): GSE content with the pid
    let task = v2(&d, 2, json!([info.clone()]));
    let r = d.wait_task_v2(&task, &key);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let content: Value = serde_json::from_str(r["content"].as_str().unwrap()).unwrap();
    assert_eq!(content["process"][0]["instance"][0]["pid"], json!(pid));

    // stop
    let task = v2(&d, 1, json!([info.clone()]));
    let r = d.wait_task_v2(&task, &key);
    assert_eq!(r["error_code"], json!(0), "stop: {r}");
    wait_for("process gone", Duration::from_secs(10), || {
        (!alive(pid)).then_some(())
    });
    let st = d.status("operate_process", &name);
    assert_eq!(
        (st["status"].clone(), st["isauto"].clone()),
        (json!(2), json!(false))
    );
    let task = v2(&d, 1, json!([info]));
    assert_eq!(d.wait_task_v2(&task, &key)["error_code"], json!(829));
    assert_eq!(keys_in(&d, "operate_process").len(), 1);

    // the task is in the audit trail under its API name
    let r = d.call("tasks", &json!({"limit": 10}));
    assert!(
        r["data"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["api"] == json!("operate_process")),
        "{r}"
    );
}

/// op_type 4 (unmanage) never registers a process: for one that is not registered its
/// answer says so (851), with GSEKit's identity of the process, and nothing is registered.
#[test]
fn operate_process_unmanage_of_an_unregistered_process_says_it_never_registers() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let prog = "v2never";
    let name = format!("{prog}@{}", env.path().display());
    let key = v2_key(0, "127.0.0.1", "operate_process", &name);
    let task = v2(&d, 4, json!([v2_info(&env, prog, json!({}))]));
    let r = d.wait_task_v2(&task, &key);
    assert_eq!(r["error_code"], json!(851), "{r}");
    let msg = r["error_msg"].as_str().unwrap_or_default();
    assert!(msg.contains("op_type 4 never registers a process"), "{r}");
    assert!(keys_in(&d, "operate_process").is_empty());
}

#[test]
fn operate_process_register_updates_and_shares_the_meta_registry() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");

    // op 3 with a spec creates the definition and manages it (supervision starts it)
    let info = v2_info(&env, "regsvc", json!({"value_key": "regsvc-key"}));
    let key = v2_key(0, "127.0.0.1", "operate_process", "regsvc-key");
    let task = v2(&d, 3, json!([info.clone()]));
    assert_eq!(d.wait_task_v2(&task, &key)["error_code"], json!(0));
    let pid = wait_for("started by supervision", Duration::from_secs(15), || {
        read_pid(&env.p("regsvc.pid")).filter(|p| alive(*p))
    });
    assert_eq!(
        keys_in(&d, "operate_process"),
        vec!["regsvc-key".to_string()]
    );
    // op 3 again with a changed field updates the same definition
    let changed = with(info.clone(), json!({"contact": "someone else"}));
    let task = v2(&d, 3, json!([changed]));
    assert_eq!(d.wait_task_v2(&task, &key)["error_code"], json!(0));
    assert_eq!(
        keys_in(&d, "operate_process"),
        vec!["regsvc-key".to_string()]
    );
    assert_eq!(
        d.detail("operate_process", "regsvc-key")["spec"]["contact"],
        json!("someone else")
    );
    // op 4 unmanages it, leaving it running
    let task = v2(&d, 4, json!([info.clone()]));
    assert_eq!(d.wait_task_v2(&task, &key)["error_code"], json!(0));
    assert!(alive(pid));
    assert_eq!(
        d.status("operate_process", "regsvc-key")["isauto"],
        json!(false)
    );
    let task = v2(&d, 1, json!([info]));
    assert_eq!(d.wait_task_v2(&task, &key)["error_code"], json!(0));

    // op 4 on a process nobody registered does not create one
    let ghost = v2_info(&env, "ghost", json!({}));
    let gkey = v2_key(
        0,
        "127.0.0.1",
        "operate_process",
        &format!("ghost@{}", env.path().display()),
    );
    let task = v2(&d, 4, json!([ghost.clone()]));
    let r = d.wait_task_v2(&task, &gkey);
    assert_eq!(r["error_code"], json!(851), "{r}");
    // nor does a status query
    let task = v2(&d, 2, json!([ghost]));
    assert_eq!(d.wait_task_v2(&task, &gkey)["error_code"], json!(851));
    assert_eq!(
        keys_in(&d, "operate_process"),
        vec!["regsvc-key".to_string()]
    );

    // a process registered through meta is found by setup_path + proc_name: its key is
    // used, its labels kept, nothing is duplicated
    d.register("core", "metasvc", daemon_spec(&env, "metasvc", json!({})));
    let info = v2_info(&env, "metasvc", json!({}));
    let key = v2_key(0, "127.0.0.1", "core", "metasvc");
    let task = v2(&d, 0, json!([info.clone()]));
    let r = d.wait_task_v2(&task, &key);
    assert_eq!(r["error_code"], json!(0), "{r}");
    assert_eq!(d.status("core", "metasvc")["status"], json!(1));
    assert_eq!(
        keys_in(&d, "operate_process"),
        vec!["regsvc-key".to_string()]
    );
    let det = d.detail("core", "metasvc");
    assert_eq!(det["labels"]["app"], json!("metasvc"), "{det}");
    assert_eq!(
        det["spec"]["func_id"],
        json!("f-1"),
        "the v2 fields were applied"
    );
    let data = ps(&d, &json!({"bk_biz_id": "*", "page": 1, "pagesize": 100}));
    assert_eq!(data["count"], json!(2), "{data}");
    let task = v2(&d, 1, json!([info]));
    assert_eq!(d.wait_task_v2(&task, &key)["error_code"], json!(0));
}

#[test]
fn operate_process_value_key_collisions() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let a = v2_info(&env, "twin", json!({}));
    let b = with(a.clone(), json!({"pid_path": env.p("twin-2.pid")}));

    // the same setup_path + proc_name twice, no value_key: refused for its key, saying why
    let twin_key = v2_key(
        0,
        "127.0.0.1",
        "operate_process",
        &format!("twin@{}", env.path().display()),
    );
    let task = v2(&d, 1, json!([a.clone(), b.clone()]));
    let r = d.wait_task_v2(&task, &twin_key);
    assert_eq!(r["error_code"], json!(830), "{r}");
    let msg = r["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("process_infos[0]")
            && msg.contains("process_infos[1]")
            && msg.contains("distinct value_keys"),
        "{msg}"
    );
    assert!(keys_in(&d, "operate_process").is_empty(), "nothing stored");
    // the same entry twice is not a collision
    let task = v2(&d, 1, json!([a.clone(), a.clone()]));
    let r = d.call("get_proc_operate_result_v2", &json!({ "task_id": task }));
    assert_eq!(r["data"].as_object().unwrap().len(), 1, "{r}");

    // distinct value_keys: two processes
    let a1 = with(a.clone(), json!({"value_key": "twin-1"}));
    let b2 = with(b.clone(), json!({"value_key": "twin-2"}));
    let task = v2(&d, 1, json!([a1.clone(), b2.clone()]));
    for vk in ["twin-1", "twin-2"] {
        let k = v2_key(0, "127.0.0.1", "operate_process", vk);
        assert_eq!(d.wait_task_v2(&task, &k)["error_code"], json!(829), "{vk}");
    }
    let mut names = keys_in(&d, "operate_process");
    names.sort();
    assert_eq!(
        names,
        vec![
            "twin-1".to_string(),
            "twin-2".to_string(),
            format!("twin@{}", env.path().display())
        ]
    );
    // one value_key with two different specs in one request: refused for its key
    let task = v2(
        &d,
        1,
        json!([
            a1.clone(),
            with(a1.clone(), json!({"pid_path": env.p("other.pid")}))
        ]),
    );
    let k1 = v2_key(0, "127.0.0.1", "operate_process", "twin-1");
    let r = d.wait_task_v2(&task, &k1);
    assert_eq!(r["error_code"], json!(830), "{r}");
    let msg = r["error_msg"].as_str().unwrap();
    assert!(msg.contains("value_key \"twin-1\""), "{msg}");
    // ... and for a status query, which stores no spec, they are one query
    let task = v2(
        &d,
        2,
        json!([
            a1.clone(),
            with(a1.clone(), json!({"pid_path": env.p("other.pid")}))
        ]),
    );
    assert_eq!(d.wait_task_v2(&task, &k1)["error_code"], json!(0));
    // a value_key names its process even when the paths change: an update
    let moved = with(a1.clone(), json!({"pid_path": env.p("moved.pid")}));
    let task = v2(&d, 1, json!([moved]));
    let k = v2_key(0, "127.0.0.1", "operate_process", "twin-1");
    assert_eq!(d.wait_task_v2(&task, &k)["error_code"], json!(829));
    assert_eq!(
        d.detail("operate_process", "twin-1")["spec"]["pid_path"],
        json!(env.p("moved.pid"))
    );
    assert_eq!(keys_in(&d, "operate_process").len(), 3);

    // registering another process (through meta) with a used value_key: a per-key error
    let mut spec = daemon_spec(&env, "twin", json!({}));
    spec["identity"]["value_key"] = json!("twin-2");
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": "core", "name": "intruder"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    let e = &r["data"][Daemon::key("core", "intruder")];
    assert_ne!(e["error_code"], json!(0), "{r}");
    let m = e["error_msg"].as_str().unwrap();
    assert!(
        m.contains("operate_process/twin-2") && m.contains("distinct value_keys"),
        "{m}"
    );

    // two meta definitions sharing setup_path + proc_name (GSEKit's instances of one
    // process): v2 cannot tell them apart without value_keys, and says so for the entry
    let mut s1 = daemon_spec(&env, "multi", json!({}));
    s1["identity"]["pid_path"] = json!(env.p("multi_1.pid"));
    let mut s2 = s1.clone();
    s2["identity"]["pid_path"] = json!(env.p("multi_2.pid"));
    d.register("GSEKIT_BIZ_5", "multi_1", s1);
    d.register("GSEKIT_BIZ_5", "multi_2", s2);
    let task = v2(&d, 2, json!([v2_info(&env, "multi", json!({}))]));
    let r = d.wait_task_v2(
        &task,
        &v2_key(
            0,
            "127.0.0.1",
            "operate_process",
            &format!("multi@{}", env.path().display()),
        ),
    );
    assert_eq!(r["error_code"], json!(830), "{r}");
    let msg = r["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("GSEKIT_BIZ_5/multi_1")
            && msg.contains("GSEKIT_BIZ_5/multi_2")
            && msg.contains("distinct value_keys"),
        "{msg}"
    );
}

/// Poll get_proc_operate_result_v2 until no key is pending; every key of `want` is there.
fn v2_results(d: &Daemon, task: &str, want: &[&String]) -> Value {
    wait_for(&format!("task {task}"), Duration::from_secs(60), || {
        let r = d.call("get_proc_operate_result_v2", &json!({ "task_id": task }));
        assert_eq!(r["result"], json!(true), "{r}");
        let data = r["data"].as_object().expect("data");
        for k in want {
            assert!(data.contains_key(k.as_str()), "{k} missing from {r}");
        }
        (!data.values().any(|v| v["error_code"] == json!(115))).then(|| r["data"].clone())
    })
}

/// An entry that names several registered processes, and two entries of one request that
/// name one key with different specs, are answered per entry (830 under their own result
/// key, saying why); the other entries of the request run.
#[test]
fn operate_process_ambiguous_entries_are_answered_per_entry() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    // GSEKit's instances of one process: two meta definitions with one setup_path +
    // proc_name, both running
    let mut s1 = daemon_spec(&env, "multi", json!({}));
    s1["identity"]["pid_path"] = json!(env.p("multi_1.pid"));
    s1["control"]["start_cmd"] = json!(env.daemon_start_cmd("multi", &env.p("multi_1.pid")));
    let mut s2 = s1.clone();
    s2["identity"]["pid_path"] = json!(env.p("multi_2.pid"));
    s2["control"]["start_cmd"] = json!(env.daemon_start_cmd("multi", &env.p("multi_2.pid")));
    d.register("GSEKIT_BIZ_5", "multi_1", s1);
    d.register("GSEKIT_BIZ_5", "multi_2", s2);
    for n in ["multi_1", "multi_2"] {
        assert_eq!(d.op("GSEKIT_BIZ_5", n, 0)["error_code"], json!(0), "{n}");
    }
    let m1 = read_pid(&env.p("multi_1.pid")).unwrap();
    let m2 = read_pid(&env.p("multi_2.pid")).unwrap();
    let solo = v2_info(&env, "solo", json!({}));
    let task = v2(&d, 0, json!([solo.clone()]));
    let solo_key = v2_key(
        0,
        "127.0.0.1",
        "operate_process",
        &format!("solo@{}", env.path().display()),
    );
    assert_eq!(
        v2_results(&d, &task, &[&solo_key])[&solo_key]["error_code"],
        json!(0)
    );
    let solo_pid = read_pid(&env.p("solo.pid")).unwrap();

    let dir = env.path().display().to_string();
    let multi = v2_info(&env, "multi", json!({}));
    let twin = v2_info(&env, "twin", json!({}));
    let twin_b = with(twin.clone(), json!({"pid_path": env.p("twin-2.pid")}));
    // one request: the ambiguous entry, a good one, two that disagree on one key
    let task = v2(&d, 1, json!([multi, solo, twin, twin_b]));
    let multi_key = v2_key(0, "127.0.0.1", "operate_process", &format!("multi@{dir}"));
    let twin_key = v2_key(0, "127.0.0.1", "operate_process", &format!("twin@{dir}"));
    let data = v2_results(&d, &task, &[&multi_key, &solo_key, &twin_key]);
    assert_eq!(data.as_object().unwrap().len(), 3, "{data}");

    let r = &data[&multi_key];
    assert_eq!(r["error_code"], json!(830), "{r}");
    let m = r["error_msg"].as_str().unwrap();
    assert!(
        m.starts_with("process_infos[0]: ")
            && m.contains("value_key")
            && m.contains("GSEKIT_BIZ_5/multi_1")
            && m.contains("GSEKIT_BIZ_5/multi_2"),
        "{m}"
    );
    assert!(alive(m1) && alive(m2), "neither instance was stopped");

    assert_eq!(data[&solo_key]["error_code"], json!(0), "{data}");
    wait_for("solo stopped", Duration::from_secs(10), || {
        (!alive(solo_pid)).then_some(())
    });

    let r = &data[&twin_key];
    assert_eq!(r["error_code"], json!(830), "{r}");
    let m = r["error_msg"].as_str().unwrap();
    assert!(
        m.contains("process_infos[2]") && m.contains("process_infos[3]") && m.contains("value_key"),
        "{m}"
    );
    assert_eq!(
        keys_in(&d, "operate_process"),
        vec![format!("solo@{dir}")],
        "nothing was stored for the twins"
    );
}

#[test]
fn operate_process_ip_list_naming_another_host() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let prog = "hostsvc";
    let name = format!("{prog}@{}", env.path().display());
    let info = v2_info(
        &env,
        prog,
        json!({"ip_list": [
            {"bk_cloud_id": 0, "ip": "127.0.0.1"},
            {"bk_cloud_id": 0, "ip": "10.255.0.9"},
            {"bk_cloud_id": 2, "ip": "127.0.0.1"},
        ]}),
    );
    let task = v2(&d, 0, json!([info]));
    let mine = v2_key(0, "127.0.0.1", "operate_process", &name);
    let others = [
        v2_key(0, "10.255.0.9", "operate_process", &name),
        v2_key(2, "127.0.0.1", "operate_process", &name),
    ];
    let first = d.call("get_proc_operate_result_v2", &json!({ "task_id": task }));
    let data = first["data"].as_object().expect("data");
    assert_eq!(
        data.len(),
        3,
        "every host × process from the first poll: {first}"
    );
    for k in &others {
        assert_eq!(data[k]["error_code"], json!(117), "{k}: {first}");
        assert!(
            data[k]["error_msg"]
                .as_str()
                .unwrap()
                .contains("not served by this agent"),
            "{first}"
        );
    }
    assert_eq!(d.wait_task_v2(&task, &mine)["error_code"], json!(0));
    let pid = read_pid(&env.p("hostsvc.pid")).unwrap();
    assert!(alive(pid));
    // only other hosts: per-host errors, nothing registered or started
    let away = v2_info(
        &env,
        "awaysvc",
        json!({"ip_list": [{"bk_cloud_id": 0, "ip": "10.255.0.9"}]}),
    );
    let task = v2(&d, 0, json!([away]));
    let k = v2_key(
        0,
        "10.255.0.9",
        "operate_process",
        &format!("awaysvc@{}", env.path().display()),
    );
    assert_eq!(d.wait_task_v2(&task, &k)["error_code"], json!(117));
    assert_eq!(keys_in(&d, "operate_process"), vec![name.clone()]);
    assert!(read_pid(&env.p("awaysvc.pid")).is_none());
    // clean stop
    let task = v2(&d, 1, json!([v2_info(&env, prog, json!({}))]));
    assert_eq!(d.wait_task_v2(&task, &mine)["error_code"], json!(0));
    assert!(!alive(pid));
}

#[test]
fn operate_process_bad_requests() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let info = v2_info(&env, "badsvc", json!({}));
    let body = |extra: Value| {
        with(
            json!({"bk_biz_id": 5, "op_type": 0, "process_infos": [info.clone()]}),
            extra,
        )
    };
    let (code, msg) = refused(&d, "operate_process", &body(json!({"op_type": 5})));
    assert_eq!(code, 832, "{msg}");
    assert!(msg.contains("op_type"));
    for (b, field) in [
        (body(json!({"bk_biz_id": null})), "bk_biz_id"),
        (body(json!({"op_type": null})), "op_type"),
        (body(json!({"process_infos": []})), "process_infos"),
        (
            body(json!({"process_infos": [with(info.clone(), json!({"pid_path": ""}))]})),
            "process_infos[0].pid_path",
        ),
        (
            body(json!({"process_infos": [with(info.clone(), json!({"setup_path": null}))]})),
            "process_infos[0].setup_path",
        ),
        (
            body(json!({"process_infos": [with(info.clone(), json!({"ip_list": []}))]})),
            "process_infos[0].ip_list",
        ),
        (
            body(
                json!({"process_infos": [with(info.clone(), json!({"ip_list": [{"bk_cloud_id": 0}]}))]}),
            ),
            "process_infos[0].ip_list[0].ip",
        ),
        (
            body(json!({"process_infos": [with(info.clone(), json!({"cpu_lmt": "lots"}))]})),
            "cpu_lmt",
        ),
    ] {
        let (code, msg) = refused(&d, "operate_process", &b);
        assert_eq!(code, BAD_REQUEST, "{msg}");
        assert!(msg.contains(field), "{field} not named in {msg:?}");
    }
    // an invalid spec fails its own keys
    let bad = with(
        info.clone(),
        json!({"type": 0, "cycle_time": 0, "value_key": "bad"}),
    );
    let task = v2(&d, 0, json!([bad]));
    let r = d.wait_task_v2(&task, &v2_key(0, "127.0.0.1", "operate_process", "bad"));
    assert_eq!(r["error_code"], json!(830), "{r}");
    assert!(
        r["error_msg"]
            .as_str()
            .unwrap()
            .contains("process_infos[0].cycle_time"),
        "{r}"
    );
    assert!(keys_in(&d, "operate_process").is_empty());
}
