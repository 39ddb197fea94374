//! Replays of what GSEKit and bk-nodeman really send (shared/notes/gse-callers.md), checked
//! the way those callers read the answers.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A start.sh in the style of a GSE plugin package: `./start.sh NAME` daemonizes NAME (a
/// renamed sleep) and writes `run/NAME.pid` under the setup path.
fn plugin_dir(env: &TestEnv) -> String {
    std::fs::create_dir_all(env.path().join("plugins/run")).unwrap();
    let dir = env.path().join("plugins");
    let prog = env.program("bkbeat");
    std::fs::copy(&prog, dir.join("bkbeat")).unwrap();
    std::fs::write(
        dir.join("start.sh"),
        "#!/bin/sh\nsetsid ./$1 100000 </dev/null >/dev/null 2>&1 &\necho $! > run/$1.pid\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("stop.sh"),
        "#!/bin/sh\n[ -f run/$1.pid ] && kill $(cat run/$1.pid)\nexit 0\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("restart.sh"),
        "#!/bin/sh\n./stop.sh $1; sleep 0.2; ./start.sh $1\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("reload.sh"),
        "#!/bin/sh\necho reload >> run/$1.reloads\n",
    )
    .unwrap();
    for f in ["start.sh", "stop.sh", "restart.sh", "reload.sh"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.display().to_string()
}

fn user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name
}

/// Poll get_proc_operate_result_v2 the way GSEKit does (raw envelope, code first).
fn poll_v2(d: &Daemon, task: &str, keys: &[String]) -> Value {
    let mut first = true;
    wait_for(&format!("task {task}"), Duration::from_secs(60), || {
        let r = d.call_raw(
            "/api/v2/proc/get_proc_operate_result_v2/",
            json!({"task_id": task, "bk_app_code": "x"})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(r["result"], json!(true), "{r}");
        assert_eq!(r["code"], json!(0));
        let data = r["data"].as_object().unwrap();
        assert_eq!(
            data.len(),
            keys.len(),
            "data holds exactly the task's keys: {r}"
        );
        for k in keys {
            assert!(
                data.contains_key(k),
                "key {k} present from the first poll: {r}"
            );
        }
        let pending = data.values().any(|v| v["error_code"] == json!(115));
        if first {
            first = false;
        }
        (!pending).then(|| r["data"].clone())
    })
}

#[test]
fn gsekit_operate_proc_multi_start_stop_status() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let pidfile = env.p("gse_agent.pid");
    let prog = env.program("gse_agent");
    let item = |op: i64| {
        json!({
            "meta": {"namespace": "GSEKIT_BIZ_2", "name": "gse_agent_1",
                     "labels": {"bk_process_name": "gse_agent", "bk_process_id": 46}},
            "op_type": op,
            "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}],
            "spec": {
                "identity": {"index_key": "", "proc_name": "gse_agent", "setup_path": env.path().display().to_string(),
                             "pid_path": pidfile, "user": user()},
                "control": {"start_cmd": format!("setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"),
                            "stop_cmd": format!("kill $(cat {pidfile})"), "restart_cmd": "", "reload_cmd": "", "kill_cmd": ""},
                "alive_monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 60}
            }
        })
    };
    let key = "0:127.0.0.1:GSEKIT_BIZ_2:gse_agent_1".to_string();
    let multi = |op: i64| {
        let body = json!({"proc_operate_req": [item(op)], "bk_app_code": "bk_gsekit", "bk_app_secret": "s3cr3t",
                          "bk_username": "admin", "no_request": true});
        let r = d.call_raw(
            "/api/v2/proc/operate_proc_multi/",
            body.to_string().as_bytes(),
        );
        assert_eq!(r["result"], json!(true), "{r}");
        let task = r["data"]["task_id"].as_str().unwrap().to_string();
        // First poll at once: the key is there, pending.
        let first = d.call("get_proc_operate_result_v2", &json!({ "task_id": task }));
        assert!(first["data"][&key].is_object(), "{first}");
        poll_v2(&d, &task, std::slice::from_ref(&key))[&key].clone()
    };
    // start → 0, a second start → 828
    assert_eq!(multi(0)["error_code"], json!(0));
    let pid = read_pid(&pidfile).unwrap();
    assert_eq!(multi(0)["error_code"], json!(828));
    // status content: process[0].instance[0].{pid,isAuto}
    let st = multi(2);
    let c: Value = serde_json::from_str(st["content"].as_str().unwrap()).unwrap();
    assert_eq!(c["process"][0]["instance"][0]["pid"], json!(pid), "{c}");
    assert_eq!(c["process"][0]["instance"][0]["isAuto"], json!(true));
    // labels returned as given (int bk_process_id)
    let s = d.call(
        "get_proc_status_v2",
        &json!({"meta": {"namespace": "GSEKIT_BIZ_2", "name": "gse_agent_1"}, "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}]}),
    );
    assert_eq!(
        s["data"]["proc_infos"][0]["meta"]["labels"]["bk_process_id"],
        json!(46),
        "{s}"
    );
    assert_eq!(
        s["data"]["proc_infos"][0]["host"],
        json!({"ip": "127.0.0.1", "bk_cloud_id": 0})
    );
    assert_eq!(s["data"]["proc_infos"][0]["isauto"], json!(true));
    // stop → 0 (control content), stop again → 829, status → pid -1
    let r = multi(1);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let c: Value = serde_json::from_str(r["content"].as_str().unwrap()).unwrap();
    assert_eq!(c["value"][0]["procName"], json!("gse_agent"));
    assert_eq!(multi(1)["error_code"], json!(829));
    let c: Value = serde_json::from_str(multi(2)["content"].as_str().unwrap()).unwrap();
    assert_eq!(c["process"][0]["instance"][0]["pid"], json!(-1));
    assert_eq!(c["process"][0]["instance"][0]["isAuto"], json!(false));
    assert!(!alive(pid));
    // The secret was never written to the log.
    assert!(!d.log_text().contains("s3cr3t"));
}

#[test]
fn nodeman_install_sequence_and_config_push() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let setup = plugin_dir(&env);
    let spec = |auto_type: i64| {
        json!({
            "identity": {"index_key": "", "proc_name": "bkbeat", "setup_path": setup, "pid_path": format!("{setup}/run/bkbeat.pid"), "user": user()},
            "control": {"start_cmd": "./start.sh bkbeat", "stop_cmd": "./stop.sh bkbeat", "restart_cmd": "./restart.sh bkbeat",
                        "reload_cmd": "./reload.sh bkbeat", "kill_cmd": "./stop.sh bkbeat", "version_cmd": "echo 7.1.0", "health_cmd": ""},
            "resource": {"cpu": 10, "mem": 10},
            "alive_monitor_policy": {"auto_type": auto_type, "start_check_secs": 1}
        })
    };
    let op = |name: &str, op: i64, auto_type: i64| -> Value {
        let body = json!({"proc_operate_req": [{
            "meta": {"namespace": "nodeman", "name": name},
            "op_type": op,
            "nodeman_spec": {"process_status_id": 1, "subscription_instance_id": 2},
            "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}],
            "spec": spec(auto_type)
        }], "no_request": true});
        let r = d.call("operate_proc_multi", &body);
        assert_eq!(r["result"], json!(true), "{r}");
        let task = r["data"]["task_id"].as_str().unwrap().to_string();
        let key = format!("0:127.0.0.1:nodeman:{name}");
        poll_v2(&d, &task, std::slice::from_ref(&key))[&key].clone()
    };
    // Install: RESTART on a key never seen, relative ./start.sh → registered and running.
    let r = op("bkbeat", 7, 1);
    assert_eq!(r["error_code"], json!(0), "op 7 on a never-seen key: {r}");
    let pid = read_pid(&format!("{setup}/run/bkbeat.pid")).unwrap();
    assert!(alive(pid));
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .unwrap()
            .display()
            .to_string(),
        setup,
        "cwd = setup_path"
    );
    // Config push: RELOAD then DELEGATE on a running process → both 0 (never 828).
    assert_eq!(op("bkbeat", 8, 1)["error_code"], json!(0));
    assert!(
        std::fs::read_to_string(format!("{setup}/run/bkbeat.reloads"))
            .unwrap()
            .contains("reload")
    );
    assert_eq!(op("bkbeat", 3, 1)["error_code"], json!(0));
    // status via get_proc_status_v2 as NM reads it: status, isauto, version, meta.name, host
    let s = d.call_raw(
        "/api/v2/proc/get_proc_status_v2",
        json!({"meta": {"namespace": "nodeman", "name": "bkbeat", "labels": {"proc_name": "bkbeat"}},
               "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}]})
        .to_string()
        .as_bytes(),
    );
    let e = &s["data"]["proc_infos"][0];
    assert_eq!(
        (
            e["status"].clone(),
            e["isauto"].clone(),
            e["meta"]["name"].clone()
        ),
        (json!(1), json!(true), json!("bkbeat")),
        "{s}"
    );
    wait_for("version", Duration::from_secs(10), || {
        let s = d.call("get_proc_status_v2", &json!({"meta": {"namespace": "nodeman", "name": "bkbeat"}, "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}]}));
        (s["data"]["proc_infos"][0]["version"] == json!("7.1.0")).then_some(())
    });
    // A one-shot plugin: RESTART then UNDELEGATE.
    let r = op("oneshot", 7, 2);
    assert!(
        r["error_code"] == json!(0) || r["error_code"] == json!(836),
        "{r}"
    );
    assert_eq!(op("oneshot", 4, 2)["error_code"], json!(0));
    // Uninstall: STOP
    assert_eq!(op("bkbeat", 1, 1)["error_code"], json!(0));
    assert!(!alive(pid));
    // unregister of an unknown key: 829
    let r = d.call(
        "unregister_proc_info",
        &json!({"meta": {"namespace": "nodeman", "name": "never"}, "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0, "bk_supplier_id": 0}]}),
    );
    assert_eq!(
        r["data"]["0:0:127.0.0.1:nodeman:never"]["error_code"],
        json!(829),
        "{r}"
    );
    // legacy NM: update_proc_info as an upsert, synchronous keyed answer
    let r = d.call_raw(
        "/v1/update_proc_info",
        json!({"meta": {"labels": {"proc_name": "legacy"}, "namespace": "nodeman", "name": "legacy"},
               "hosts": [{"ip": "127.0.0.1", "bk_supplier_id": 0, "bk_cloud_id": 0}],
               "spec": {"control": {"start_cmd": "./start.sh legacy"}, "monitor_policy": {"auto_type": 1},
                        "resource": {"mem": 10, "cpu": 10},
                        "identity": {"user": user(), "proc_name": "legacy", "setup_path": setup, "pid_path": format!("{setup}/run/legacy.pid")}}})
        .to_string()
        .as_bytes(),
    );
    assert_eq!(
        r["data"]["0:0:127.0.0.1:nodeman:legacy"],
        json!({"error_code": 0, "error_msg": "success", "content": ""}),
        "{r}"
    );
}

#[test]
fn gse2_agent_id_list_including_another_agent() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let spec = daemon_spec(&env, "aid", json!({}));
    let body = json!({"proc_operate_req": [{
        "meta": {"namespace": "GSEKIT_BIZ_3", "name": "aid_1"},
        "op_type": 0,
        "agent_id_list": ["agent-under-test", "0:127.0.0.1", "020000000242010a00002f17521298676503"],
        "spec": spec
    }]});
    let r = d.call("operate_proc_multi", &body);
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let keys: Vec<String> = [
        "agent-under-test",
        "0:127.0.0.1",
        "020000000242010a00002f17521298676503",
    ]
    .iter()
    .map(|a| format!("{a}:GSEKIT_BIZ_3:aid_1"))
    .collect();
    let data = poll_v2(&d, &task, &keys);
    assert_eq!(data[&keys[2]]["error_code"], json!(117), "{data}");
    let mine: Vec<i64> = keys[..2]
        .iter()
        .map(|k| data[k]["error_code"].as_i64().unwrap())
        .collect();
    assert!(mine.contains(&0), "{data}");
    assert!(mine.iter().all(|c| *c == 0 || *c == 828), "{data}");
    // status by agent id carries bk_agent_id
    let s = d.call(
        "get_proc_status_v2",
        &json!({"meta": {"namespace": "GSEKIT_BIZ_3", "name": "aid_1"}, "agent_id_list": ["agent-under-test"]}),
    );
    assert_eq!(
        s["data"]["proc_infos"][0]["bk_agent_id"],
        json!("agent-under-test"),
        "{s}"
    );
    assert_eq!(s["data"]["proc_infos"][0]["status"], json!(1));
}

#[test]
fn sync_proc_status_with_isauto_and_return_total() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register("GSEKIT_BIZ_2", "p_1", daemon_spec(&env, "p1", json!({})));
    d.register("GSEKIT_BIZ_2", "p_2", daemon_spec(&env, "p2", json!({})));
    assert_eq!(d.op("GSEKIT_BIZ_2", "p_1", 0)["error_code"], json!(0));
    let r = d.call(
        "sync_proc_status",
        &json!({"meta": {"namespace": "GSEKIT_BIZ_2"}, "page": {"start": 0, "limit": 500, "return_total": true}}),
    );
    assert_eq!(r["data"]["count"], json!(2));
    for e in r["data"]["proc_infos"].as_array().unwrap() {
        assert!(e["isauto"].is_boolean(), "{e}");
        assert!([0, 1, 2].contains(&e["status"].as_i64().unwrap()));
        let name = e["meta"]["name"].as_str().unwrap();
        let (proc, inst) = name.rsplit_once('_').unwrap();
        assert_eq!(proc, "p");
        let want = if inst == "1" { (1, true) } else { (2, false) };
        assert_eq!(
            (
                e["status"].as_i64().unwrap(),
                e["isauto"].as_bool().unwrap()
            ),
            want,
            "{e}"
        );
    }
}

#[test]
fn a_failing_health_cmd_restarts_the_process() {
    let env = TestEnv::new();
    let d = Daemon::start(
        &env,
        "[supervisor]\nhealth_interval = \"200ms\"\nhealth_failures = 2\n",
    );
    let flag = env.p("unhealthy");
    let spec = daemon_spec(
        &env,
        "hc",
        json!({"health_cmd": format!("test ! -e {flag}")}),
    );
    d.register("health", "hc", spec);
    assert_eq!(d.op("health", "hc", 0)["error_code"], json!(0));
    let pid = read_pid(&env.p("hc.pid")).unwrap();
    wait_for(
        "a passing health check shows",
        Duration::from_secs(10),
        || {
            d.detail("health", "hc")["health"]
                .as_str()
                .filter(|h| h.starts_with("ok"))
                .map(|_| ())
        },
    );
    std::fs::write(&flag, "").unwrap();
    let new = wait_for(
        "restarted after failing health checks",
        Duration::from_secs(20),
        || read_pid(&env.p("hc.pid")).filter(|p| *p != pid && alive(*p)),
    );
    std::fs::remove_file(&flag).unwrap();
    assert!(!alive(pid));
    let kinds: Vec<String> = d
        .events("health/hc")
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(
        kinds.contains(&"health_check_failed".to_string()),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"health_failed".to_string()), "{kinds:?}");
    wait_for("status shows the new pid", Duration::from_secs(10), || {
        (d.status("health", "hc")["pid"] == json!(new)).then_some(())
    });
    assert!(d.detail("health", "hc")["restarts"].as_u64().unwrap() >= 1);
}

#[test]
fn start_retries_exhausted_answers_836() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let prog = env.program("dies");
    let pidfile = env.p("dies.pid");
    let body = json!({"proc_operate_req": [{
        "meta": {"namespace": "retry", "name": "dies"},
        "op_type": 0,
        "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}],
        "spec": {
            "identity": {"proc_name": "dies", "setup_path": env.path().display().to_string(), "pid_path": pidfile},
            "control": {"start_cmd": format!("setsid {prog} 0.05 & echo $! > {pidfile}")},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "start_retries": 2, "start_interval": 1, "stop_check_secs": 2}
        }
    }]});
    let r = d.call("operate_proc_multi", &body);
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let key = "0:127.0.0.1:retry:dies".to_string();
    let res = poll_v2(&d, &task, std::slice::from_ref(&key))[&key].clone();
    assert_eq!(res["error_code"], json!(836), "{res}");
    assert!(
        res["error_msg"]
            .as_str()
            .unwrap()
            .contains("after 3 attempts"),
        "{res}"
    );
    let fails = d
        .events("retry/dies")
        .iter()
        .filter(|e| e["kind"] == json!("start_failed"))
        .count();
    assert_eq!(fails, 3);
}

#[test]
fn unknown_keys_null_policy_fields_and_bad_shell() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let mut spec = daemon_spec(&env, "nul", json!({"future_cmd": "x"}));
    spec["identity"]["index_key"] = json!("");
    spec["identity"]["whatever"] = json!({"deep": [1, 2]});
    spec["monitor_policy"] = json!({"auto_type": 1, "start_check_secs": null, "op_timeout": null, "crotab_rule": "", "unknown": 1});
    spec["warn_report_policy"] = json!({"report_id": 3});
    spec["configmap"] = json!([{"path": "/x", "md5": "y"}]);
    let body = json!({"proc_operate_req": [{
        "meta": {"namespace": "lenient", "name": "nul", "labels": {"n": 1, "b": true, "s": "x"}, "extra": 1},
        "op_type": 0, "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": "0", "bk_host_innerip": "10.1.1.1"}],
        "spec": spec, "nodeman_spec": {}
    }, {
        "meta": {"namespace": "lenient", "name": "badshell"},
        "op_type": 0, "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}],
        "spec": {"identity": {"proc_name": "x", "setup_path": "/tmp", "pid_path": "/tmp/x.pid"},
                 "control": {"start_cmd": "true", "cmd_shell_ext": "bat"}}
    }], "bk_app_secret": "x", "no_request": true, "some_future_field": [1]});
    let r = d.call("operate_proc_multi", &body);
    assert_eq!(r["result"], json!(true), "{r}");
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let keys = vec![
        "0:127.0.0.1:lenient:nul".to_string(),
        "0:127.0.0.1:lenient:badshell".to_string(),
    ];
    let data = poll_v2(&d, &task, &keys);
    assert_eq!(data[&keys[0]]["error_code"], json!(0), "{data}");
    assert_eq!(data[&keys[1]]["error_code"], json!(830), "{data}");
    assert!(
        data[&keys[1]]["error_msg"]
            .as_str()
            .unwrap()
            .contains("cmd_shell_ext"),
        "{data}"
    );
    // defaults applied: op_timeout 60, start_check_secs 5
    let det = d.detail("lenient", "nul");
    assert_eq!(
        (
            det["spec"]["op_timeout"].clone(),
            det["spec"]["start_check_secs"].clone()
        ),
        (json!(60), json!(5)),
        "{det}"
    );
    assert_eq!(det["labels"], json!({"n": 1, "b": true, "s": "x"}));
    // empty-string command → per-key error naming it
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": "lenient", "name": "nul"}, "op_type": 8, "hosts": [Daemon::host()]}),
    );
    let t = r["data"]["task_id"].as_str().unwrap().to_string();
    let res = d.wait_task(&t, &Daemon::key("lenient", "nul"));
    assert_eq!(res["error_code"], json!(830));
    assert!(res["error_msg"].as_str().unwrap().contains("reload_cmd"));
    // unknown task id: result false
    let r = d.call(
        "get_proc_operate_result_v2",
        &json!({"task_id": "GSETASK:20200101000000:1"}),
    );
    assert_eq!(r["result"], json!(false));
}

#[test]
fn two_different_asks_on_one_key_are_refused_never_dropped() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let spec = daemon_spec(&env, "dup", json!({}));
    let item = |op: i64, host: Value| {
        let mut v = json!({"meta": {"namespace": "dup", "name": "d1"}, "op_type": op, "spec": spec.clone()});
        if host.is_array() {
            v["agent_id_list"] = host;
        } else {
            v["hosts"] = json!([host]);
        }
        v
    };
    // hosts form and the fallback agent id name the same key "0:127.0.0.1:dup:d1"
    let r = d.call(
        "operate_proc_multi",
        &json!({"proc_operate_req": [item(0, json!({"ip": "127.0.0.1", "bk_cloud_id": 0})), item(2, json!(["0:127.0.0.1"]))]}),
    );
    assert_eq!(r["result"], json!(false), "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("already operated on by proc_operate_req[0]"),
        "{r}"
    );
    assert_eq!(d.status("dup", "d1")["status"], json!(0), "nothing ran");
    // the same ask twice is one item (a status query: its inline spec registers nothing,
    // so the key answers as unregistered)
    let r = d.call(
        "operate_proc_multi",
        &json!({"proc_operate_req": [item(2, json!({"ip": "127.0.0.1", "bk_cloud_id": 0})), item(2, json!(["0:127.0.0.1"]))]}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let key = "0:127.0.0.1:dup:d1".to_string();
    let res = poll_v2(&d, &task, std::slice::from_ref(&key));
    assert_eq!(res.as_object().map(|m| m.len()), Some(1), "{res}");
    assert_eq!(res[&key]["error_code"], json!(851));
}

/// A start command that never finishes is killed at op_timeout, and its answer carries what
/// it printed (65535, the output in error_msg), as any other failed start does.
#[test]
fn a_start_killed_at_op_timeout_answers_with_its_output() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let hang = env.program("hangs");
    let mut spec = daemon_spec(&env, "slow", json!({}));
    spec["control"]["start_cmd"] = json!(format!(
        "echo waiting for the database; echo no route to db.local >&2; {hang} 1000"
    ));
    spec["monitor_policy"]["op_timeout"] = json!(2);
    let body = json!({"proc_operate_req": [{
        "meta": {"namespace": "slow", "name": "slow_1"},
        "op_type": 0,
        "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}],
        "spec": spec
    }], "no_request": true});
    let r = d.call("operate_proc_multi", &body);
    assert_eq!(r["result"], json!(true), "{r}");
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let key = "0:127.0.0.1:slow:slow_1".to_string();
    let res = poll_v2(&d, &task, std::slice::from_ref(&key))[&key].clone();
    assert_eq!(res["error_code"], json!(65535), "{res}");
    let msg = res["error_msg"].as_str().unwrap();
    assert!(msg.contains("op_timeout 2s"), "{msg}");
    assert!(
        msg.contains("waiting for the database") && msg.contains("no route to db.local"),
        "the command's output is in the answer: {msg}"
    );
    wait_for(
        "the hung command is killed",
        Duration::from_secs(10),
        || {
            env.processes()
                .iter()
                .all(|p| {
                    std::fs::read_link(format!("/proc/{p}/exe"))
                        .map(|x| !x.ends_with("hangs"))
                        .unwrap_or(true)
                })
                .then_some(())
        },
    );

    // The other op_timeout of a start: the command returned, but the process its pid file
    // names never became the program. That answer carries the command's output too.
    let other = env.program("other");
    let pidfile = env.p("slow.pid");
    spec["control"]["start_cmd"] = json!(format!(
        "echo launching the wrong binary; setsid {other} 1000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"
    ));
    let mut body = body;
    body["proc_operate_req"][0]["spec"] = spec;
    let r = d.call("operate_proc_multi", &body);
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let res = poll_v2(&d, &task, std::slice::from_ref(&key))[&key].clone();
    assert_eq!(res["error_code"], json!(836), "{res}");
    let msg = res["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("within op_timeout 2s") && msg.contains("launching the wrong binary"),
        "{msg}"
    );
}

/// restart (op 7) of a process without restart_cmd stops it and starts it again (what the
/// agent's own restart of a managed process does), running or not; reload without
/// reload_cmd is a per-key error that says so.
#[test]
fn restart_without_restart_cmd_stops_then_starts() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let pidfile = env.p("plain.pid");
    let spec = daemon_spec(&env, "plain", json!({"restart_cmd": "", "reload_cmd": ""}));
    let op = |op: i64| -> Value {
        let body = json!({"proc_operate_req": [{
            "meta": {"namespace": "nodeman", "name": "plain"},
            "op_type": op,
            "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}],
            "spec": spec.clone()
        }], "no_request": true});
        let r = d.call("operate_proc_multi", &body);
        assert_eq!(r["result"], json!(true), "{r}");
        let task = r["data"]["task_id"].as_str().unwrap().to_string();
        let key = "0:127.0.0.1:nodeman:plain".to_string();
        poll_v2(&d, &task, std::slice::from_ref(&key))[&key].clone()
    };
    assert_eq!(op(0)["error_code"], json!(0));
    let first = read_pid(&pidfile).unwrap();
    // running: stopped (its stop_cmd), then started
    let r = op(7);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let second = read_pid(&pidfile).unwrap();
    assert_ne!(second, first, "a new process");
    assert!(alive(second));
    wait_for("the old process is gone", Duration::from_secs(10), || {
        (!alive(first)).then_some(())
    });
    let st = d.status("nodeman", "plain");
    assert_eq!(
        (
            st["status"].clone(),
            st["isauto"].clone(),
            st["pid"].clone()
        ),
        (json!(1), json!(true), json!(second)),
        "{st}"
    );
    // stopped: started
    assert_eq!(op(1)["error_code"], json!(0));
    assert!(!alive(second));
    let r = op(7);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let third = read_pid(&pidfile).unwrap();
    assert!(third != second && alive(third));
    // reload without reload_cmd: 830 naming it, the process untouched
    let r = op(8);
    assert_eq!(r["error_code"], json!(830), "{r}");
    assert!(
        r["error_msg"]
            .as_str()
            .unwrap()
            .contains("reload_cmd is empty"),
        "{r}"
    );
    assert!(alive(third));
    assert_eq!(d.status("nodeman", "plain")["pid"], json!(third));
}

/// The finished `data` of a task as one result endpoint (`get_proc_operate_result` or
/// `get_proc_operate_result_v2`) answers it, asked at `path` (`/v1/...`, the ESB root path,
/// or the APIGW path).
fn finished(d: &Daemon, path: &str, task: &str) -> serde_json::Map<String, Value> {
    wait_for(
        &format!("task {task} at {path}"),
        Duration::from_secs(60),
        || {
            let r = d.call_raw(path, json!({ "task_id": task }).to_string().as_bytes());
            assert_eq!(r["result"], json!(true), "{path}: {r}");
            let data = r["data"].as_object().unwrap().clone();
            (!data.values().any(|v| v["error_code"] == json!(115))).then_some(data)
        },
    )
}

/// The result keys of `data`, sorted.
fn keys_of(data: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut k: Vec<String> = data.keys().cloned().collect();
    k.sort();
    k
}

fn task_of(r: &Value) -> String {
    assert_eq!(r["result"], json!(true), "{r}");
    r["data"]["task_id"].as_str().unwrap().to_string()
}

/// BKDocs define the key per result endpoint: get_proc_operate_result answers
/// `cloud:supplier:ip:namespace:name`, get_proc_operate_result_v2 `cloud:ip:namespace:name`
/// (or `agent_id:namespace:name` for agent ids), whichever API submitted the task and
/// however its hosts were written.
#[test]
fn result_keys_follow_the_endpoint_that_is_polled() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let v1 = "/v1/get_proc_operate_result";
    let v2 = "/v1/get_proc_operate_result_v2";
    let host_v2 = json!([{"ip": "127.0.0.1", "bk_cloud_id": 0}]);

    // operate_proc_multi (GSE 1.0 hosts) starting a real process, polled both ways.
    let spec = daemon_spec(&env, "keyed", json!({}));
    let t = task_of(&d.call(
        "operate_proc_multi",
        &json!({"proc_operate_req": [{"meta": {"namespace": "keys", "name": "multi"}, "op_type": 0,
                "hosts": host_v2, "spec": spec}]}),
    ));
    let a = finished(&d, v2, &t);
    assert_eq!(keys_of(&a), vec!["0:127.0.0.1:keys:multi"], "{a:?}");
    assert_eq!(a["0:127.0.0.1:keys:multi"]["error_code"], json!(0), "{a:?}");
    let b = finished(&d, v1, &t);
    assert_eq!(keys_of(&b), vec!["0:0:127.0.0.1:keys:multi"], "{b:?}");
    assert_eq!(b["0:0:127.0.0.1:keys:multi"], a["0:127.0.0.1:keys:multi"]);
    let pid = read_pid(&env.p("keyed.pid")).unwrap();
    assert!(alive(pid));
    // The task log names its items as get_proc_operate_result does (`procagent task ID`
    // joins the two).
    let listed = d.call("tasks", &json!({ "task_id": t }));
    let item = &listed["data"]["list"][0]["items"][0];
    assert_eq!(item["key"], json!("0:0:127.0.0.1:keys:multi"), "{listed}");
    assert_eq!(item["definition"], json!("registered"), "{listed}");
    let (code, out, err) = d.cli(&["task", &t]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("keys/multi ") && l.contains("registered")),
        "{out}"
    );

    // operate_proc (v1 hosts, with the supplier) polled by v2: four parts.
    let t = task_of(&d.call(
        "operate_proc",
        &json!({"meta": {"namespace": "keys", "name": "multi"}, "op_type": 2,
                "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0, "bk_supplier_id": 0}]}),
    ));
    let a = finished(&d, v2, &t);
    assert_eq!(keys_of(&a), vec!["0:127.0.0.1:keys:multi"], "{a:?}");
    let c: Value =
        serde_json::from_str(a["0:127.0.0.1:keys:multi"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(c["process"][0]["instance"][0]["pid"], json!(pid), "{c}");
    assert_eq!(
        keys_of(&finished(&d, v1, &t)),
        vec!["0:0:127.0.0.1:keys:multi"]
    );

    // operate_proc and operate_proc_v2 with GSE 1.0 hosts `[{ip, bk_cloud_id}]`: the key
    // of each endpoint, not of the operate API.
    for api in ["operate_proc", "operate_proc_v2"] {
        let t = task_of(&d.call(
            api,
            &json!({"meta": {"namespace": "keys", "name": "multi"}, "op_type": 2, "hosts": host_v2}),
        ));
        assert_eq!(
            keys_of(&finished(&d, v1, &t)),
            vec!["0:0:127.0.0.1:keys:multi"],
            "{api} polled by v1"
        );
        assert_eq!(
            keys_of(&finished(&d, v2, &t)),
            vec!["0:127.0.0.1:keys:multi"],
            "{api} polled by v2"
        );
    }

    // Agent ids: v2 answers the agent-id form; v1 answers five parts where the id says
    // which host it is (this agent's id, or the `cloud:ip` fallback form), else the
    // agent-id form.
    let opaque = "020000000242010a00002f17521298676503";
    let t = task_of(&d.call(
        "operate_proc_multi",
        &json!({"proc_operate_req": [{"meta": {"namespace": "keys", "name": "multi"}, "op_type": 2,
                "agent_id_list": ["agent-under-test", "2:10.0.0.9", opaque]}]}),
    ));
    let a = finished(&d, v2, &t);
    let mut want = vec![
        format!("{opaque}:keys:multi"),
        "2:10.0.0.9:keys:multi".to_string(),
        "agent-under-test:keys:multi".to_string(),
    ];
    want.sort();
    assert_eq!(keys_of(&a), want, "{a:?}");
    assert_eq!(a["agent-under-test:keys:multi"]["error_code"], json!(0));
    assert_eq!(a["2:10.0.0.9:keys:multi"]["error_code"], json!(117));
    let b = finished(&d, v1, &t);
    let mut want = vec![
        "0:0:127.0.0.1:keys:multi".to_string(),
        format!("{opaque}:keys:multi"),
        "2:0:10.0.0.9:keys:multi".to_string(),
    ];
    want.sort();
    assert_eq!(keys_of(&b), want, "{b:?}");
    assert_eq!(
        b["0:0:127.0.0.1:keys:multi"],
        a["agent-under-test:keys:multi"]
    );

    // GSEKit's operate_process polled by v1: five parts as well.
    let t = d.call(
        "operate_process",
        &json!({"bk_biz_id": 1, "op_type": 2, "process_infos": [{
            "setup_path": env.path().display().to_string(), "proc_name": "keyed",
            "pid_path": env.p("keyed.pid"), "ip_list": [{"ip": "127.0.0.1", "bk_cloud_id": 0}]}]}),
    );
    let t = t["data"]["bk_gse_taskid"].as_str().unwrap().to_string();
    assert_eq!(
        keys_of(&finished(&d, v1, &t)),
        vec!["0:0:127.0.0.1:keys:multi"]
    );
    assert_eq!(
        keys_of(&finished(&d, v2, &t)),
        vec!["0:127.0.0.1:keys:multi"]
    );
}

/// The ESB forwards GSE APIs at the gateway root (`/operate_proc_multi/`,
/// `/get_proc_operate_result_v2/`, ...): every GSE API is served there, with and without
/// the trailing slash, as it is under /v1/.
#[test]
fn esb_root_paths_serve_every_gse_api() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let spec = daemon_spec(&env, "esb", json!({}));
    let meta = json!({"namespace": "esb", "name": "e1"});
    let host = json!([{"ip": "127.0.0.1", "bk_cloud_id": 0}]);
    let post = |path: &str, body: Value| -> Value {
        let r = d.call_raw(path, body.to_string().as_bytes());
        assert_eq!(r["result"], json!(true), "{path}: {r}");
        r
    };
    let r = post(
        "/register_proc_info/",
        json!({"meta": meta, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(
        r["data"][Daemon::key("esb", "e1")]["error_code"],
        json!(0),
        "{r}"
    );
    let r = post(
        "/update_proc_info",
        json!({"meta": meta, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(
        r["data"][Daemon::key("esb", "e1")]["error_code"],
        json!(0),
        "{r}"
    );
    let t = task_of(&post(
        "/operate_proc_multi/",
        json!({"proc_operate_req": [{"meta": meta, "op_type": 0, "hosts": host}],
               "bk_app_code": "bk_gsekit", "bk_app_secret": "s", "bk_username": "admin"}),
    ));
    let a = finished(&d, "/get_proc_operate_result_v2/", &t);
    assert_eq!(a["0:127.0.0.1:esb:e1"]["error_code"], json!(0), "{a:?}");
    let b = finished(&d, "/get_proc_operate_result", &t);
    assert_eq!(b["0:0:127.0.0.1:esb:e1"]["error_code"], json!(0), "{b:?}");
    for path in ["/get_proc_status_v2/", "/get_proc_status_v2"] {
        let s = post(path, json!({"meta": meta, "hosts": host}));
        assert_eq!(
            s["data"]["proc_infos"][0]["status"],
            json!(1),
            "{path}: {s}"
        );
    }
    let s = post(
        "/get_proc_status/",
        json!({"meta": meta, "hosts": [Daemon::host()]}),
    );
    assert_eq!(s["data"]["proc_infos"][0]["status"], json!(1), "{s}");
    let s = post(
        "/sync_proc_status/",
        json!({"meta": {"namespace": "esb"}, "page": {"start": 0, "limit": 10, "return_total": true}}),
    );
    assert_eq!(s["data"]["count"], json!(1), "{s}");
    for (path, op) in [("/operate_proc/", 2), ("/operate_proc_v2", 2)] {
        let t = task_of(&post(
            path,
            json!({"meta": meta, "op_type": op, "hosts": host}),
        ));
        let a = finished(&d, "/get_proc_operate_result_v2", &t);
        assert_eq!(
            a["0:127.0.0.1:esb:e1"]["error_code"],
            json!(0),
            "{path}: {a:?}"
        );
    }
    let t = task_of(&post(
        "/operate_proc_multi",
        json!({"proc_operate_req": [{"meta": meta, "op_type": 1, "hosts": host}]}),
    ));
    let a = finished(&d, "/get_proc_operate_result/", &t);
    assert_eq!(a["0:0:127.0.0.1:esb:e1"]["error_code"], json!(0), "{a:?}");
    let r = post(
        "/unregister_proc_info/",
        json!({"meta": meta, "hosts": [Daemon::host()]}),
    );
    assert_eq!(
        r["data"][Daemon::key("esb", "e1")]["error_code"],
        json!(0),
        "{r}"
    );
    // Only GSE's APIs are at the root: the agent's own stay under /v1/.
    let r = d.call_raw("/procs/", b"{}");
    assert_eq!(r["code"], json!(1_000_404), "{r}");
    // A GET is refused as on /v1/.
    let (status, _) = d.http("GET", "/operate_proc_multi/", b"").unwrap();
    assert_eq!(status, 405);
}

/// get_proc_status_v2 by agent id: an entry for an agent that is not this one carries that
/// agent id and none of this agent's addresses (bk-nodeman keys its entries by the host
/// or bk_agent_id it finds in them).
#[test]
fn status_entries_for_another_agent_carry_its_id_not_our_ip() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let spec = daemon_spec(&env, "other", json!({}));
    d.register("foreign", "f1", spec);
    let opaque = "020000000242010a00002f17521298676503";
    let s = d.call(
        "get_proc_status_v2",
        &json!({"meta": {"namespace": "foreign", "name": "f1"},
                "agent_id_list": ["agent-under-test", opaque, "3:10.0.0.7"]}),
    );
    assert_eq!(s["result"], json!(true), "{s}");
    let infos = s["data"]["proc_infos"].as_array().unwrap();
    assert_eq!(infos.len(), 3, "{s}");
    let mine = &infos[0];
    assert_eq!(mine["bk_agent_id"], json!("agent-under-test"));
    assert_eq!(mine["host"]["ip"], json!("127.0.0.1"), "{s}");
    let other = &infos[1];
    assert_eq!(other["bk_agent_id"], json!(opaque), "{s}");
    assert_eq!(other["host"]["bk_agent_id"], json!(opaque), "{s}");
    assert!(
        !other.to_string().contains("127.0.0.1"),
        "no address of this agent in another agent's entry: {other}"
    );
    assert_eq!(other["status"], json!(0));
    let fallback = &infos[2];
    assert_eq!(fallback["bk_agent_id"], json!("3:10.0.0.7"), "{s}");
    assert_eq!(
        (
            fallback["host"]["ip"].clone(),
            fallback["host"]["bk_cloud_id"].clone()
        ),
        (json!("10.0.0.7"), json!(3)),
        "the host the fallback id names: {fallback}"
    );
    assert!(!fallback.to_string().contains("127.0.0.1"), "{fallback}");
}

/// A nodeman plugin start (op 0) of a periodic job whose run is short, the normal case: the
/// first run is the start check, so the start answers 0 and the job then runs every
/// cycle_time; between runs every API says "waiting" the same way, and `procagent status`
/// exits 0 for it. A first run that fails answers 836 with its output, and nothing repeats.
#[test]
fn a_periodic_job_starts_on_its_first_run_and_then_runs_every_cycle() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let runs = env.p("runs.txt");
    let spec = |cmd: String| {
        json!({
            "identity": {"proc_name": "date", "setup_path": env.path().display().to_string(),
                         "pid_path": env.p("never-written.pid"), "user": user()},
            "control": {"start_cmd": cmd},
            "monitor_policy": {"auto_type": 0, "cycle_time": 3},
        })
    };
    let op0 = |name: &str, spec: Value| -> Value {
        let body = json!({"proc_operate_req": [{
            "meta": {"namespace": "nodeman", "name": name},
            "op_type": 0,
            "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}],
            "spec": spec
        }], "no_request": true});
        let task = task_of(&d.call("operate_proc_multi", &body));
        let key = format!("0:127.0.0.1:nodeman:{name}");
        poll_v2(&d, &task, std::slice::from_ref(&key))[&key].clone()
    };
    let r = op0("cron", spec(format!("date +%s%N >> {runs}")));
    assert_eq!(r["error_code"], json!(0), "the first run exited 0: {r}");
    let stamps = wait_for("three runs", Duration::from_secs(20), || {
        let t = std::fs::read_to_string(&runs).unwrap_or_default();
        let v: Vec<u128> = t.lines().filter_map(|l| l.parse().ok()).collect();
        (v.len() >= 3).then_some(v)
    });
    for w in stamps.windows(2) {
        let gap_ms = (w[1] - w[0]) / 1_000_000;
        assert!(
            (2_900..6_000).contains(&gap_ms),
            "one run per cycle_time: {stamps:?}"
        );
    }
    // Between runs: the same answer in every API.
    let det = wait_for("waiting between runs", Duration::from_secs(10), || {
        let det = d.detail("nodeman", "cron");
        (det["state"] == json!("waiting")).then_some(det)
    });
    assert_eq!(
        (
            det["status"].clone(),
            det["flag"].clone(),
            det["managed"].clone(),
            det["pids"].clone()
        ),
        (json!(2), json!(1), json!(true), json!([])),
        "{det}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = det["next_run_at"].as_i64().expect("next_run_at");
    assert!(at >= now - 1 && at <= now + 4, "{det}");
    assert!(
        det["message"]
            .as_str()
            .unwrap()
            .contains("waiting for its next run"),
        "{det}"
    );
    let st = wait_for(
        "get_proc_status between runs",
        Duration::from_secs(10),
        || {
            let st = d.status("nodeman", "cron");
            (st["pid"] == json!(-1)).then_some(st)
        },
    );
    assert_eq!(
        (
            st["status"].clone(),
            st["isauto"].clone(),
            st["flag"].clone()
        ),
        (json!(2), json!(true), json!(1)),
        "{st}"
    );
    let r = d.call(
        "sync_proc_status",
        &json!({"meta": {"namespace": "nodeman"}, "page": {"start": 0, "limit": 10}}),
    );
    let e = &r["data"]["proc_infos"][0];
    assert_eq!(e["isauto"], json!(true), "{r}");
    assert_eq!(e["flag"], json!(1), "{r}");
    let (code, out, err) = wait_for("the CLI shows it waiting", Duration::from_secs(10), || {
        let (code, out, err) = d.cli(&["status", "nodeman/cron"]);
        out.contains("waiting for its next run at")
            .then_some((code, out, err))
    });
    assert_eq!(code, 0, "a job between runs is not down: {out}{err}");
    assert!(out.contains("waiting"), "{out}");

    // A first run that fails: 836 with its output, not managed, never run again.
    let marks = env.p("bad-runs.txt");
    let r = op0(
        "broken",
        spec(format!(
            "echo run >> {marks}; echo missing config file; exit 1"
        )),
    );
    assert_eq!(r["error_code"], json!(836), "{r}");
    let msg = r["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("first run") && msg.contains("missing config file"),
        "{msg}"
    );
    let det = d.detail("nodeman", "broken");
    assert_eq!(
        (det["managed"].clone(), det["state"].clone()),
        (json!(false), json!("stopped")),
        "{det}"
    );
    std::thread::sleep(Duration::from_millis(3_500));
    let n = std::fs::read_to_string(&marks).unwrap().lines().count();
    assert_eq!(n, 1, "a failed start is not put on the schedule");
    d.op("nodeman", "cron", 1);
}
