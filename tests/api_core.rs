//! Agent core, end to end: the real daemon on a temp dir, driven through its socket and CLI.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const NS: &str = "core";

#[test]
fn register_start_stop_restart_reload_kill_a_daemonizing_process() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let marker = env.p("reloaded");
    let pidfile = env.p("svc1.pid");
    let spec = daemon_spec(
        &env,
        "svc1",
        json!({
            "restart_cmd": format!("kill $(cat {pidfile}); {}", env.daemon_start_cmd("svc1", &pidfile)),
            "reload_cmd": format!("echo reloaded >> {marker}"),
            "version_cmd": "echo 2.3.4",
        }),
    );
    let r = d.register(NS, "svc1", spec);
    assert_eq!(r["error_code"], json!(0), "{r}");

    // Registered, not started: flag 2 status 2.
    let st = d.status(NS, "svc1");
    assert_eq!(st["status"], json!(2), "{st}");
    assert_eq!(st["pid"], json!(-1));
    assert_eq!(st["meta"]["labels"]["app"], json!("svc1"));

    // start
    let r = d.op(NS, "svc1", 0);
    assert_eq!(r["error_code"], json!(0), "start: {r}");
    let pid = read_pid(&pidfile).expect("pid file written");
    assert!(alive(pid));
    let st = d.status(NS, "svc1");
    assert_eq!(st["status"], json!(1), "{st}");
    assert_eq!(st["flag"], json!(1));
    assert_eq!(st["pid"], json!(pid));
    assert_eq!(st["isauto"], json!(true), "start registers managed");
    assert!(st["register_time"].as_i64().unwrap() > 0);
    assert!(st["last_start_time"].as_i64().unwrap() > 0);
    wait_for("version from version_cmd", Duration::from_secs(10), || {
        (d.status(NS, "svc1")["version"] == json!("2.3.4")).then_some(())
    });

    // start again: 828, nothing changes
    let r = d.op(NS, "svc1", 0);
    assert_eq!(r["error_code"], json!(828), "{r}");
    assert_eq!(d.status(NS, "svc1")["pid"], json!(pid));

    // reload really runs reload_cmd
    let r = d.op(NS, "svc1", 8);
    assert_eq!(r["error_code"], json!(0), "reload: {r}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "reloaded");
    assert!(alive(pid));

    // restart: a new process
    let r = d.op(NS, "svc1", 7);
    assert_eq!(r["error_code"], json!(0), "restart: {r}");
    let pid2 = read_pid(&pidfile).unwrap();
    assert_ne!(pid, pid2);
    wait_for("old pid gone", Duration::from_secs(5), || {
        (!alive(pid)).then_some(())
    });
    assert_eq!(d.status(NS, "svc1")["pid"], json!(pid2));

    // stop: gone, flag 2, unmanaged
    let r = d.op(NS, "svc1", 1);
    assert_eq!(r["error_code"], json!(0), "stop: {r}");
    assert!(!alive(pid2));
    let st = d.status(NS, "svc1");
    assert_eq!(
        (
            st["status"].clone(),
            st["flag"].clone(),
            st["isauto"].clone()
        ),
        (json!(2), json!(2), json!(false))
    );
    // stop again: 829
    assert_eq!(d.op(NS, "svc1", 1)["error_code"], json!(829));

    // start, then kill (no kill_cmd: SIGKILL)
    assert_eq!(d.op(NS, "svc1", 0)["error_code"], json!(0));
    let pid3 = read_pid(&pidfile).unwrap();
    let r = d.op(NS, "svc1", 9);
    assert_eq!(r["error_code"], json!(0), "kill: {r}");
    assert!(!alive(pid3));
    let st = d.status(NS, "svc1");
    assert_eq!(
        (st["status"].clone(), st["isauto"].clone()),
        (json!(2), json!(false))
    );

    // op 2 status content is GSE's JSON text with pid -1 when stopped
    let r = d.op(NS, "svc1", 2);
    assert_eq!(r["error_code"], json!(0));
    let content: Value = serde_json::from_str(r["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        content["process"][0]["instance"][0]["pid"],
        json!(-1),
        "{content}"
    );
    assert!(zombies_of(d.pid()).is_empty(), "zombies left");
}

#[test]
fn manage_and_unmanage() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let pidfile = env.p("svc2.pid");
    d.register(NS, "svc2", daemon_spec(&env, "svc2", json!({})));
    // manage a stopped process: 0, and supervision starts it
    let r = d.op(NS, "svc2", 3);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let pid = wait_for("started by supervision", Duration::from_secs(10), || {
        read_pid(&pidfile).filter(|p| alive(*p) && d.status(NS, "svc2")["status"] == json!(1))
    });
    // manage a running one: still 0, never 828
    assert_eq!(d.op(NS, "svc2", 3)["error_code"], json!(0));
    // unmanage leaves it running
    assert_eq!(d.op(NS, "svc2", 4)["error_code"], json!(0));
    assert!(alive(pid));
    let st = d.status(NS, "svc2");
    assert_eq!(
        (st["status"].clone(), st["isauto"].clone()),
        (json!(1), json!(false))
    );
    // an unmanaged process that dies is not restarted
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("exit noticed", Duration::from_secs(5), || {
        (d.status(NS, "svc2")["status"] == json!(2)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.status(NS, "svc2")["status"], json!(2), "not restarted");
}

#[test]
fn runs_commands_as_another_account() {
    if !is_root() {
        eprintln!("skipped: switching accounts needs root");
        return;
    }
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let out = env.p("whoami.txt");
    let pidfile = env.p("svc3.pid");
    // nobody must be able to write the pid file and the output
    std::fs::write(&pidfile, "").unwrap();
    std::fs::set_permissions(&pidfile, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::write(&out, "").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut spec = daemon_spec(&env, "svc3", json!({}));
    spec["identity"]["user"] = json!("nobody");
    spec["control"]["start_cmd"] = json!(format!(
        "echo \"$(id -un) $HOME $USER $LOGNAME $(pwd)\" > {out}; {}",
        env.daemon_start_cmd("svc3", &pidfile)
    ));
    d.register(NS, "svc3", spec);
    let r = d.op(NS, "svc3", 0);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let pid = read_pid(&pidfile).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == nobody.uid.to_string()),
        "{uid_line}"
    );
    let gid_line = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
    assert!(
        gid_line
            .split_whitespace()
            .skip(1)
            .all(|g| g == nobody.gid.to_string()),
        "{gid_line}"
    );
    // The switch happened in the child only: every thread of the agent is still root (a
    // libc setuid in a clone3 child would broadcast to the agent's threads).
    for t in std::fs::read_dir(format!("/proc/{}/task", d.pid())).unwrap() {
        let st = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        for field in ["Uid:", "Gid:"] {
            let l = st.lines().find(|l| l.starts_with(field)).unwrap();
            assert!(
                l.split_whitespace().skip(1).all(|v| v == "0"),
                "agent thread: {l}"
            );
        }
    }
    let who = std::fs::read_to_string(&out).unwrap();
    let f: Vec<&str> = who.split_whitespace().collect();
    assert_eq!(f[0], "nobody", "{who}");
    assert_eq!(
        f[1],
        nobody.dir.display().to_string(),
        "HOME is the account's, not root's: {who}"
    );
    assert_eq!((f[2], f[3]), ("nobody", "nobody"), "{who}");
    assert_eq!(
        f[4],
        env.path().display().to_string(),
        "cwd is setup_path: {who}"
    );
    assert_eq!(d.op(NS, "svc3", 1)["error_code"], json!(0));
    assert!(!alive(pid));
}

#[test]
fn stale_pid_file_naming_an_unrelated_process_is_never_signalled() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    // An unrelated process (another program) whose pid sits in the pid file.
    let other = env.program("bystander");
    let mut bystander = std::process::Command::new(&other)
        .arg("100000")
        .spawn()
        .unwrap();
    let bpid = bystander.id() as i32;
    let pidfile = env.p("svc4.pid");
    std::fs::write(&pidfile, format!("{bpid}\n")).unwrap();
    d.register(
        NS,
        "svc4",
        daemon_spec(&env, "svc4", json!({"kill_cmd": ""})),
    );
    // not adopted
    let st = d.status(NS, "svc4");
    assert_eq!(
        st["status"],
        json!(2),
        "a stale pid file is not our process: {st}"
    );
    // stop and kill: 829, bystander untouched
    assert_eq!(d.op(NS, "svc4", 1)["error_code"], json!(829));
    assert_eq!(d.op(NS, "svc4", 9)["error_code"], json!(829));
    assert!(alive(bpid), "the unrelated process was signalled");
    // start starts the real one
    assert_eq!(d.op(NS, "svc4", 0)["error_code"], json!(0));
    let pid = read_pid(&pidfile).unwrap();
    assert_ne!(pid, bpid);
    assert_eq!(d.op(NS, "svc4", 1)["error_code"], json!(0));
    assert!(alive(bpid), "the unrelated process was signalled");
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn start_failures_are_reported() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    // start_cmd fails: 65535 with its output
    let mut spec = daemon_spec(&env, "bad1", json!({}));
    spec["control"]["start_cmd"] = json!("echo 'cannot bind port 80' >&2; exit 3");
    d.register(NS, "bad1", spec);
    let r = d.op(NS, "bad1", 0);
    assert_eq!(r["error_code"], json!(65535), "{r}");
    assert!(
        r["error_msg"]
            .as_str()
            .unwrap()
            .contains("cannot bind port 80"),
        "{r}"
    );
    // process dies during the start check: 836, not managed
    let mut spec = daemon_spec(&env, "bad2", json!({}));
    let prog = env.program("bad2");
    spec["control"]["start_cmd"] = json!(format!(
        "setsid {prog} 0.3 & echo $! > {}",
        env.p("bad2.pid")
    ));
    d.register(NS, "bad2", spec);
    let r = d.op(NS, "bad2", 0);
    assert_eq!(r["error_code"], json!(836), "{r}");
    let st = d.status(NS, "bad2");
    assert_eq!(
        st["isauto"],
        json!(false),
        "a failed start does not make it managed: {st}"
    );
    // a command that hangs: killed at op_timeout, whole group
    let mut spec = daemon_spec(&env, "bad3", json!({}));
    spec["control"]["reload_cmd"] = json!(format!(
        "{} 1000 & {} 1000",
        env.program("hang1"),
        env.program("hang2")
    ));
    spec["monitor_policy"]["op_timeout"] = json!(1);
    d.register(NS, "bad3", spec);
    let r = d.op(NS, "bad3", 8);
    assert_eq!(r["error_code"], json!(65535), "{r}");
    assert!(
        r["error_msg"].as_str().unwrap().contains("timed out"),
        "{r}"
    );
    wait_for("hung command group killed", Duration::from_secs(5), || {
        env.processes()
            .iter()
            .all(|p| {
                let exe = std::fs::read_link(format!("/proc/{p}/exe"))
                    .map(|x| x.display().to_string())
                    .unwrap_or_default();
                !exe.ends_with("hang1") && !exe.ends_with("hang2")
            })
            .then_some(())
    });
    // restart without restart_cmd: a stop (nothing runs), then a start
    let r = d.op(NS, "bad3", 7);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let pid = read_pid(&env.p("bad3.pid")).unwrap();
    assert!(alive(pid));
    assert_eq!(d.status(NS, "bad3")["pid"], json!(pid));
    // an op whose command is absent: per-key error naming it
    let mut spec = daemon_spec(&env, "bad4", json!({}));
    spec["control"]["restart_cmd"] = json!("");
    spec["control"]["start_cmd"] = json!("");
    d.register(NS, "bad4", spec);
    for (op, field) in [(0, "start_cmd"), (7, "start_cmd"), (8, "reload_cmd")] {
        let r = d.op(NS, "bad4", op);
        assert_eq!(r["error_code"], json!(830), "op {op}: {r}");
        assert!(
            r["error_msg"]
                .as_str()
                .unwrap()
                .contains(&format!("{field} is empty")),
            "op {op}: {r}"
        );
    }
}

#[test]
fn other_hosts_get_a_per_host_error() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "svc5", daemon_spec(&env, "svc5", json!({})));
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "svc5"}, "op_type": 2,
                "hosts": [Daemon::host(), {"ip": "10.9.9.9", "bk_cloud_id": 0, "bk_supplier_id": 0}]}),
    );
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let other = d.wait_task(&task, &format!("0:0:10.9.9.9:{NS}:svc5"));
    assert_eq!(other["error_code"], json!(117), "{other}");
    assert!(other["error_msg"].as_str().unwrap().contains("10.9.9.9"));
    let mine = d.wait_task(&task, &Daemon::key(NS, "svc5"));
    assert_eq!(mine["error_code"], json!(0));
    // register for another host: per-host error, and nothing registered for it
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "elsewhere"}, "hosts": [{"ip": "10.9.9.9", "bk_cloud_id": 0, "bk_supplier_id": 0}],
                "spec": daemon_spec(&env, "elsewhere", json!({}))}),
    );
    assert_eq!(
        r["data"][format!("0:0:10.9.9.9:{NS}:elsewhere")]["error_code"],
        json!(117),
        "{r}"
    );
    assert_eq!(d.status(NS, "elsewhere")["status"], json!(0));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "ok", daemon_spec(&env, "ok", json!({})));
    let count = || {
        d.call(
            "sync_proc_status",
            &json!({"meta": {"namespace": NS}, "page": {"start": 0, "limit": 10}}),
        )["data"]["count"]
            .clone()
    };
    assert_eq!(count(), json!(1));
    let good_meta = json!({"namespace": NS, "name": "x"});
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("operate_proc", b"{not json".to_vec(), "malformed"),
        ("get_proc_status", b"[]".to_vec(), "must be a JSON object"),
        ("operate_proc", b"".to_vec(), "empty"),
        ("operate_proc", serde_json::to_vec(&json!({"meta": good_meta, "op_type": "start", "hosts": [Daemon::host()]})).unwrap(), "op_type"),
        ("operate_proc", serde_json::to_vec(&json!({"meta": good_meta, "op_type": 5, "hosts": [Daemon::host()]})).unwrap(), "op_type"),
        ("operate_proc", serde_json::to_vec(&json!({"meta": good_meta, "hosts": [Daemon::host()]})).unwrap(), "op_type"),
        ("operate_proc", serde_json::to_vec(&json!({"op_type": 0, "hosts": [Daemon::host()]})).unwrap(), "meta"),
        ("operate_proc", serde_json::to_vec(&json!({"meta": {"namespace": NS}, "op_type": 0, "hosts": [Daemon::host()]})).unwrap(), "meta.name"),
        ("operate_proc", serde_json::to_vec(&json!({"meta": good_meta, "op_type": 0})).unwrap(), "hosts"),
        ("operate_proc", serde_json::to_vec(&json!({"meta": good_meta, "op_type": 0, "hosts": "all"})).unwrap(), "hosts"),
        ("register_proc_info", serde_json::to_vec(&json!({"meta": {"namespace": NS, "name": "n"}, "hosts": [Daemon::host()],
            "spec": {"identity": {"proc_name": "a", "setup_path": "/tmp", "pid_path": "/tmp/a\u{0}b.pid"}}})).unwrap(), "pid_path"),
        ("register_proc_info", serde_json::to_vec(&json!({"meta": {"namespace": NS, "name": "n"}, "hosts": [Daemon::host()],
            "spec": {"identity": {"proc_name": "a", "setup_path": "relative"}}})).unwrap(), "setup_path"),
        ("register_proc_info", serde_json::to_vec(&json!({"meta": {"namespace": NS, "name": "n"}, "hosts": [Daemon::host()]})).unwrap(), "spec"),
        ("register_proc_info", serde_json::to_vec(&json!({"meta": {"namespace": NS, "name": "n"}, "hosts": [Daemon::host()],
            "spec": {"identity": {"proc_name": "a", "setup_path": "/tmp"}, "resource": {"cpu": "lots"}}})).unwrap(), "spec.resource.cpu"),
        ("sync_proc_status", serde_json::to_vec(&json!({"meta": {"namespace": NS}, "page": {"start": 0, "limit": 1001}})).unwrap(), "page.limit"),
        ("sync_proc_status", serde_json::to_vec(&json!({"meta": {"namespace": NS}, "page": {"start": -1, "limit": 10}})).unwrap(), "page.start"),
        ("sync_proc_status", serde_json::to_vec(&json!({"meta": {}, "page": {"start": 0, "limit": 10}})).unwrap(), "meta.namespace"),
        ("get_proc_operate_result", serde_json::to_vec(&json!({"task_id": "GSETASK:nope"})).unwrap(), "does not exist"),
        ("get_proc_operate_result", serde_json::to_vec(&json!({})).unwrap(), "task_id"),
        ("get_proc_status", serde_json::to_vec(&json!({"meta": good_meta, "hosts": [{"bk_cloud_id": 0}]})).unwrap(), "ip"),
        ("no_such_api", b"{}".to_vec(), "unknown API"),
    ];
    for (api, body, needle) in cases {
        let r = d.call_raw(&format!("/v1/{api}"), &body);
        assert_eq!(
            r["result"],
            json!(false),
            "{api} {}: {r}",
            String::from_utf8_lossy(&body)
        );
        assert_ne!(r["code"], json!(0), "{r}");
        let msg = r["message"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.contains(needle),
            "{api}: message {msg:?} should name {needle:?}"
        );
        assert!(r["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    }
    // unknown op_type answers 832
    let r = d.call(
        "operate_proc",
        &json!({"meta": good_meta, "op_type": 6, "hosts": [Daemon::host()]}),
    );
    assert_eq!(r["code"], json!(832), "{r}");
    // oversized body: 413 with the envelope
    // (announced by Content-Length; the agent answers before reading any of it, so the
    // client need not race the server's close while still writing)
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "POST /v1/operate_proc HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", 5 << 20).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).to_string();
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        let r: Value = serde_json::from_str(body).unwrap();
        assert_eq!(r["result"], json!(false));
    }
    // wrong method
    let (status, _) = d.http("GET", "/v1/operate_proc", b"").unwrap();
    assert_eq!(status, 405);
    // unknown process: the request is accepted, the key answers an error
    let r = d.op(NS, "never-registered", 0);
    assert_eq!(r["error_code"], json!(851), "{r}");
    // get_proc_status of an unknown process: flag 0 status 0
    let st = d.status(NS, "never-registered");
    assert_eq!(
        (st["flag"].clone(), st["status"].clone()),
        (json!(0), json!(0))
    );
    // still serving, nothing changed
    assert_eq!(count(), json!(1));
    assert_eq!(d.get("/v1/healthz")["data"]["status"], json!("ok"));
}

#[test]
fn registry_and_task_history_survive_kill_9() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    d.register(NS, "keep1", daemon_spec(&env, "keep1", json!({})));
    d.register(NS, "keep2", daemon_spec(&env, "keep2", json!({})));
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "keep1"}, "op_type": 0, "hosts": [Daemon::host()]}),
    );
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let res = d.wait_task(&task, &Daemon::key(NS, "keep1"));
    assert_eq!(res["error_code"], json!(0));
    let pid = read_pid(&env.p("keep1.pid")).unwrap();
    d.kill9();
    let d = Daemon::start(&env, "");
    // definitions
    let r = d.call(
        "sync_proc_status",
        &json!({"meta": {"namespace": NS}, "page": {"start": 0, "limit": 100}}),
    );
    assert_eq!(r["data"]["count"], json!(2), "{r}");
    // task history
    let r = d.call("get_proc_operate_result", &json!({ "task_id": task }));
    assert_eq!(r["result"], json!(true), "{r}");
    assert_eq!(r["data"][Daemon::key(NS, "keep1")]["error_code"], json!(0));
    // the process was re-adopted, not restarted
    let st = d.status(NS, "keep1");
    assert_eq!(
        (
            st["status"].clone(),
            st["pid"].clone(),
            st["isauto"].clone()
        ),
        (json!(1), json!(pid), json!(true)),
        "{st}"
    );
}

#[test]
fn socket_permissions_stale_socket_and_single_instance() {
    let env = TestEnv::new();
    // A stale socket file left by a crashed agent.
    std::fs::create_dir_all(env.path().join("run")).unwrap();
    let stale = std::os::unix::net::UnixListener::bind(env.path().join("run/agent.sock")).unwrap();
    drop(stale);
    let d = Daemon::start(&env, "");
    let sock_mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(sock_mode, 0o660);
    // The socket dir the agent creates is 0750.
    let env2 = TestEnv::new();
    let d2 = Daemon::start(&env2, "");
    let dir_mode = std::fs::metadata(d2.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o750);
    // A second daemon on the same state dir refuses to start (same socket: in use).
    let out = std::process::Command::new(DAEMON)
        .arg("--config")
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") || err.contains("already running"),
        "{err}"
    );
    // ... and with another socket but the same state dir: the lock refuses.
    let cfg2 = env.path().join("other.toml");
    std::fs::write(
        &cfg2,
        Daemon::config_text(&env, "").replace("run/agent.sock", "run/other.sock"),
    )
    .unwrap();
    let out = std::process::Command::new(DAEMON)
        .arg("--config")
        .arg(&cfg2)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        d.get("/v1/healthz")["result"],
        json!(true),
        "the first daemon still serves"
    );
}

#[test]
fn config_errors_are_all_listed() {
    let env = TestEnv::new();
    let cfg = env.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[agent]\nsocket = 1\nnonsense = true\n[host]\nip = \"x\"\n[[process]]\nnamespace = \"a\"\nname = \"b\"\nsetup_path = \"/tmp\"\nproc_name = \"b\"\nop_timeout = -5\n",
    )
    .unwrap();
    let out = std::process::Command::new(DAEMON)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "agent.socket",
        "agent.nonsense",
        "host.ip",
        "op_timeout",
        "bad.toml",
    ] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }
}

#[test]
fn sync_proc_status_pages() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for i in 0..5 {
        d.register(
            "pages",
            &format!("p{i}"),
            daemon_spec(&env, &format!("p{i}"), json!({})),
        );
    }
    d.register("other", "x", daemon_spec(&env, "x", json!({})));
    let page = |start: i64, limit: i64| {
        let r = d.call(
            "sync_proc_status",
            &json!({"meta": {"namespace": "pages"}, "page": {"start": start, "limit": limit}}),
        );
        assert_eq!(r["result"], json!(true), "{r}");
        let names: Vec<String> = r["data"]["proc_infos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["meta"]["name"].as_str().unwrap().to_string())
            .collect();
        (r["data"]["count"].as_i64().unwrap(), names)
    };
    assert_eq!(page(0, 2), (5, vec!["p0".into(), "p1".into()]));
    assert_eq!(page(4, 2), (5, vec!["p4".into()]));
    assert_eq!(page(5, 2), (5, vec![]));
    assert_eq!(page(0, 1000).1.len(), 5);
    let r = d.call(
        "sync_proc_status",
        &json!({"meta": {"namespace": "pages"}, "page": {"start": 0, "limit": 1}}),
    );
    let e = &r["data"]["proc_infos"][0];
    for f in [
        "flag",
        "status",
        "isauto",
        "pid",
        "version",
        "register_time",
        "last_start_time",
        "report_time",
        "cpu_usage",
        "mem_usage",
        "fd",
        "disk",
        "net",
        "host",
        "message",
    ] {
        assert!(!e[f].is_null(), "field {f} missing in {e}");
    }
}

#[test]
fn cli_status_operations_and_json() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "cli1", daemon_spec(&env, "cli1", json!({})));
    let (code, out, err) = d.cli(&["start", "core/cli1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("start ok"), "{out}");
    let (code, out, _) = d.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("core/cli1") && out.contains("running"),
        "{out}"
    );
    let (code, out, _) = d.cli(&["--json", "status", "core/cli1"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("--json parses");
    assert_eq!(v["list"][0]["status"], json!(1));
    let (code, _, _) = d.cli(&["stop", "core/cli1"]);
    assert_eq!(code, 0);
    let (code, _, _) = d.cli(&["status", "core/cli1"]);
    assert_eq!(code, 3, "LSB: not running");
    let (code, _, err) = d.cli(&["start", "core/nope"]);
    assert_eq!(code, 5, "{err}");
    // A bare NAME is a process name in any namespace; this one matches none.
    let (code, _, err) = d.cli(&["start", "noslash"]);
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = d.cli(&["start", "cli2"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("did you mean core/cli1"), "{err}");
    let (code, out, _) = d.cli(&["start", "--no-wait", "core/cli1"]);
    assert_eq!(code, 0);
    let task = out.trim().to_string();
    assert!(task.starts_with("GSETASK:"), "{out}");
    let (code, out, _) = d.cli(&["--json", "task", &task]);
    let _ = code;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v[Daemon::key(NS, "cli1")].is_object(), "{v}");
    // unreachable agent
    let out = std::process::Command::new(CLI)
        .args(["--socket", "/nonexistent/x.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
}

#[test]
fn commands_inherit_neither_stray_descriptors_nor_the_agents_raised_fd_limit() {
    let env = TestEnv::new();
    let config = env.path().join("agent.toml");
    std::fs::write(&config, Daemon::config_text(&env, "")).unwrap();
    let hard = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Hn")
        .output()
        .unwrap();
    let hard: String = String::from_utf8_lossy(&hard.stdout).trim().to_string();
    // The agent's parent leaves fd 7 open (no close-on-exec) and a soft limit of 512.
    let log = std::fs::File::create(env.path().join("daemon.log")).unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 7</etc/hostname; ulimit -Sn 512; exec {DAEMON} --config {}",
            config.display()
        ))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon {
        child: None,
        socket: env.path().join("run/agent.sock"),
        config: config.clone(),
        state: env.path().join("state"),
        log: env.path().join("daemon.log"),
    };
    wait_for("daemon up", Duration::from_secs(30), || {
        d.try_get("/v1/healthz")
            .ok()
            .filter(|v| v["result"] == json!(true))
    });
    let out = env.p("fds.txt");
    let spec = json!({
        "identity": {"proc_name": "sh", "setup_path": env.path().display().to_string(), "pid_path": ""},
        "control": {"start_cmd": format!("ls /proc/$$/fd > {out}; ulimit -Sn >> {out}; exec sleep 100000")},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 0, "op_timeout": 10},
    });
    d.register(NS, "fds", spec);
    assert_eq!(d.op(NS, "fds", 0)["error_code"], json!(0));
    let text = wait_for("fd listing", Duration::from_secs(10), || {
        std::fs::read_to_string(&out)
            .ok()
            .filter(|t| t.lines().count() >= 4)
    });
    let lines: Vec<&str> = text.lines().collect();
    let limit = lines.last().unwrap().trim();
    assert_eq!(
        limit, "512",
        "the command gets the original soft limit: {text}"
    );
    let fds: Vec<i32> = lines[..lines.len() - 1]
        .iter()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(!fds.contains(&7), "fd 7 leaked into the command: {fds:?}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let soft: String = line.split_whitespace().nth(3).unwrap().to_string();
    if hard != "512" {
        assert_ne!(soft, "512", "the agent raised its own soft limit: {line}");
    }
    let _ = d.op(NS, "fds", 1);
    let _ = child.kill();
    let _ = child.wait();
}

/// The answers the CLI reads are the server's own shared types (proto.rs): each API's
/// `data` decodes as its type, and that type written again is the very JSON the agent sent
/// (same fields, same values), so a field renamed or added on one side only fails here.
#[test]
fn answers_the_cli_reads_are_their_shared_types() {
    use procagent::api::reload::ReloadReport;
    use procagent::proto::{
        EventList, Health, LogLines, ProcList, ProcessStatusList, TaskIdResp, TaskList, TaskResults,
    };
    fn same<T: serde::de::DeserializeOwned + serde::Serialize>(what: &str, data: &Value) -> T {
        let t: T = serde_json::from_value(data.clone())
            .unwrap_or_else(|e| panic!("{what}: {e}\n{data:#}"));
        assert_eq!(
            &serde_json::to_value(&t).unwrap(),
            data,
            "{what}: the typed answer differs from the JSON"
        );
        t
    }
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "typed", daemon_spec(&env, "typed", json!({})));
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "typed"}, "op_type": 0, "hosts": [Daemon::host()]}),
    );
    let TaskIdResp { task_id } = same("operate_proc", &r["data"]);
    d.wait_task(&task_id, &Daemon::key(NS, "typed"));

    let r = d.call("get_proc_operate_result", &json!({ "task_id": task_id }));
    let res: TaskResults = same("get_proc_operate_result", &r["data"]);
    assert_eq!(res[&Daemon::key(NS, "typed")].error_code, 0);
    let r = d.call("tasks", &json!({ "task_id": task_id }));
    let t: TaskList = same("tasks", &r["data"]);
    assert_eq!(t.list[0].task_id, task_id);
    let r = d.call("procs", &json!({"namespace": NS}));
    let p: ProcList = same("procs", &r["data"]);
    assert_eq!((p.count, p.list[0].name.as_str()), (1, "typed"));
    assert!(p.list[0].spec.is_some(), "procs carries each definition");
    // brief (the status table's query): the same entries without their definitions.
    let r = d.call("procs", &json!({"namespace": NS, "brief": true}));
    let b: ProcList = same("procs brief", &r["data"]);
    assert_eq!(
        (b.count, b.list[0].state.as_str()),
        (1, p.list[0].state.as_str())
    );
    assert!(
        b.list[0].spec.is_none() && r["data"]["list"][0].get("spec").is_none(),
        "{r}"
    );
    let r = d.call(
        "process_status",
        &json!({"bk_biz_id": "*", "page": 1, "pagesize": 10}),
    );
    let rows: ProcessStatusList = same("process_status", &r["data"]);
    assert_eq!(rows.list[0].proc_inst_infos[0].name, "typed");
    let e: EventList = same("events", &d.get("/v1/events?limit=50")["data"]);
    assert!(!e.events.is_empty());
    let h: Health = same("healthz", &d.get("/v1/healthz")["data"]);
    assert_eq!(h.status, "ok");
    let l: LogLines = same(
        "logs",
        &d.get(&format!("/v1/logs?key={NS}%2Ftyped&lines=5"))["data"],
    );
    assert!(
        l.lines
            .iter()
            .all(|x| x.line.is_some() || x.notice.is_some())
    );
    let r = d.call("reload", &json!({ "dry_run": true }));
    if r["result"] == json!(true) {
        let _: ReloadReport = same("reload", &r["data"]);
    }
}
