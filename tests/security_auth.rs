//! Who may do what on the socket, with real accounts: root, a member of the admin group
//! (through a supplementary group), a member of the read-only group (through its primary
//! group), another uid that can reach the socket but has no role, and one that cannot even
//! open it. Plus the audit trail of mutating requests and the secrets that must never reach
//! the log, the state database or output files.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::sec::{Accounts, Cast, User, cli_copy, have, run_as};
use common::*;
use serde_json::{Value, json};

const NS: &str = "authz";
const FORBIDDEN: i64 = 1_000_403;

/// `procagent call API BODY` as `user`: (exit code, envelope or null, stderr).
fn call_as(cli: &str, d: &Daemon, user: &User, api: &str, body: &Value) -> (i32, Value, String) {
    let sock = d.socket.display().to_string();
    let (code, out, err) = run_as(
        user,
        cli,
        &["--socket", &sock, "call", api, &body.to_string()],
    );
    let v = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    (code, v, err)
}

fn wait_task_as(cli: &str, d: &Daemon, user: &User, task: &str, key: &str) -> Value {
    wait_for("task result", Duration::from_secs(60), || {
        let (_, v, _) = call_as(
            cli,
            d,
            user,
            "get_proc_operate_result",
            &json!({ "task_id": task }),
        );
        let r = v["data"][key].clone();
        (r.is_object() && r["error_code"] != json!(115)).then_some(r)
    })
}

/// A `[[process]]` table declaring a daemonizing fixture with `env`.
fn config_process(env: &TestEnv, name: &str, vars: &[(&str, &str)], start_prefix: &str) -> String {
    let pidfile = env.p(&format!("{name}.pid"));
    let mut t = format!(
        "[[process]]\nnamespace = \"{NS}\"\nname = \"{name}\"\nproc_name = \"{name}\"\nsetup_path = '{}'\npid_path = '{pidfile}'\nstart_cmd = '{start_prefix}{}'\nstop_cmd = 'kill $(cat {pidfile})'\nstart_check_secs = 1\nop_timeout = 10\n",
        env.path().display(),
        env.daemon_start_cmd(name, &pidfile),
    );
    t.push_str("[process.env]\n");
    for (k, v) in vars {
        t.push_str(&format!("{k} = \"{v}\"\n"));
    }
    t
}

fn meta(name: &str) -> Value {
    json!({"namespace": NS, "name": name})
}

fn refused(v: &Value, what: &str) {
    assert_eq!(v["result"], json!(false), "{what} should be refused: {v}");
    assert_eq!(v["code"], json!(FORBIDDEN), "{what}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
}

fn uid_of(pid: i32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

#[test]
fn authorization_matrix_with_real_users() {
    if !is_root() {
        eprintln!("skipped: creating accounts and switching to them needs root");
        return;
    }
    for tool in ["useradd", "groupadd", "userdel", "groupdel", "setpriv"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed");
            return;
        }
    }
    let env = TestEnv::new();
    // Admin through a supplementary group; read-only through its primary group.
    let mut cast = Cast::new();
    let (sock_g, adm_g, ro_g) = (cast.sock_g.clone(), cast.adm_g.clone(), cast.ro_g.clone());
    let (admin, reader, other) = (cast.admin.clone(), cast.reader.clone(), cast.other.clone());
    let outsider = cast.acc.user("x", None, &[]);
    let cli = cli_copy(&env);
    // root's process, declared in the config (and so started at once), with a secret in its
    // environment.
    let d = Daemon::start(
        &env,
        &format!(
            "[api]\nadmin_group = \"{adm_g}\"\nreadonly_group = \"{ro_g}\"\nsocket_group = \"{sock_g}\"\n{}",
            config_process(
                &env,
                "rootsvc",
                &[("ROOT_TOKEN", "root-env-value-7731")],
                ""
            )
        ),
    );
    // The socket and its directory belong to the socket group: 0660 in 0750.
    let sm = std::fs::metadata(&d.socket).unwrap();
    let dm = std::fs::metadata(d.socket.parent().unwrap()).unwrap();
    assert_eq!(
        (sm.mode() & 0o777, sm.gid()),
        (0o660, Accounts::gid(&sock_g))
    );
    assert_eq!(
        (dm.mode() & 0o777, dm.gid()),
        (0o750, Accounts::gid(&sock_g))
    );

    let root_pid = wait_for("root's process started", Duration::from_secs(30), || {
        read_pid(&env.p("rootsvc.pid"))
            .filter(|p| alive(*p) && d.status(NS, "rootsvc")["pid"] == json!(p))
    });
    // root sees the environment of every process.
    assert_eq!(
        d.detail(NS, "rootsvc")["spec"]["env"]["ROOT_TOKEN"],
        json!("root-env-value-7731")
    );
    let root_def = d.detail(NS, "rootsvc")["spec"].clone();

    // --- admin group member ---------------------------------------------------------
    let adir = env.path().join("home-a");
    std::fs::create_dir(&adir).unwrap();
    nix::unistd::chown(
        &adir,
        Some(nix::unistd::Uid::from_raw(admin.uid)),
        Some(nix::unistd::Gid::from_raw(admin.gid)),
    )
    .unwrap();
    let apid = adir.join("adminsvc.pid").display().to_string();
    let aspec = json!({
        "identity": {"proc_name": "adminsvc", "setup_path": env.path().display().to_string(),
                     "pid_path": apid, "user": admin.name},
        "control": {"start_cmd": env.daemon_start_cmd("adminsvc", &apid), "stop_cmd": format!("kill $(cat {apid})")},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
    });
    // Reads.
    let (code, v, err) = call_as(
        &cli,
        &d,
        &admin,
        "get_proc_status",
        &json!({"meta": meta("rootsvc"), "hosts": [Daemon::host()]}),
    );
    assert_eq!((code, v["result"].clone()), (0, json!(true)), "{v} {err}");
    assert_eq!(v["data"]["proc_infos"][0]["pid"], json!(root_pid));
    // The env of a process running as another account is hidden from the admin.
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "procs",
        &json!({"namespace": NS, "name": "rootsvc"}),
    );
    assert_eq!(
        v["data"]["list"][0]["spec"]["env"]["ROOT_TOKEN"],
        json!("(hidden)"),
        "{v}"
    );
    // Registering a process that runs as root (empty user) or as another account: refused.
    for user in ["", "root", "nobody"] {
        let mut s = aspec.clone();
        s["identity"]["user"] = json!(user);
        let (code, v, _) = call_as(
            &cli,
            &d,
            &admin,
            "register_proc_info",
            &json!({"meta": meta("sneaky"), "hosts": [Daemon::host()], "spec": s}),
        );
        refused(&v, &format!("admin registering as {user:?}"));
        assert_eq!(code, 4, "the CLI exits 4 on a refusal");
    }
    // Changing, operating or unregistering root's process: refused, and nothing changes.
    let mut s = aspec.clone();
    s["identity"]["user"] = json!(admin.name);
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "update_proc_info",
        &json!({"meta": meta("rootsvc"), "hosts": [Daemon::host()], "spec": s}),
    );
    refused(&v, "admin updating root's process to their own account");
    for op in [1, 9, 7, 8, 3, 4, 0] {
        let (_, v, _) = call_as(
            &cli,
            &d,
            &admin,
            "operate_proc",
            &json!({"meta": meta("rootsvc"), "op_type": op, "hosts": [Daemon::host()]}),
        );
        refused(&v, &format!("admin op {op} on root's process"));
    }
    // An inline spec of their own account does not make root's process theirs.
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "operate_proc",
        &json!({"meta": meta("rootsvc"), "op_type": 1, "hosts": [Daemon::host()], "spec": s}),
    );
    refused(&v, "admin op with an inline spec on root's process");
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "operate_proc_multi",
        &json!({"proc_operate_req": [{"meta": meta("rootsvc"), "op_type": 9, "hosts": [Daemon::host()]}]}),
    );
    refused(&v, "admin operate_proc_multi on root's process");
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "unregister_proc_info",
        &json!({"meta": meta("rootsvc"), "hosts": [Daemon::host()]}),
    );
    refused(&v, "admin unregistering root's process");
    assert!(alive(root_pid), "root's process was touched");
    assert_eq!(
        d.detail(NS, "rootsvc")["spec"],
        root_def,
        "definition changed"
    );
    assert_eq!(d.status(NS, "rootsvc")["pid"], json!(root_pid));

    // Their own account: register, start (runs as them), stop, unregister.
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "register_proc_info",
        &json!({"meta": meta("adminsvc"), "hosts": [Daemon::host()], "spec": aspec,
                "bk_username": "alice-admin", "bk_app_secret": "s", "bk_app_code": "c"}),
    );
    assert_eq!(v["result"], json!(true), "{v}");
    assert_eq!(
        v["data"][Daemon::key(NS, "adminsvc")]["error_code"],
        json!(0),
        "{v}"
    );
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "operate_proc",
        &json!({"meta": meta("adminsvc"), "op_type": 0, "hosts": [Daemon::host()], "bk_username": "alice-admin"}),
    );
    assert_eq!(v["result"], json!(true), "{v}");
    let start_task = v["data"]["task_id"].as_str().unwrap().to_string();
    let r = wait_task_as(&cli, &d, &admin, &start_task, &Daemon::key(NS, "adminsvc"));
    assert_eq!(r["error_code"], json!(0), "{r}");
    let apid_n = read_pid(&apid).unwrap();
    assert_eq!(
        uid_of(apid_n),
        admin.uid,
        "the admin's process runs as the admin"
    );
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "operate_proc",
        &json!({"meta": meta("adminsvc"), "op_type": 1, "hosts": [Daemon::host()]}),
    );
    let r = wait_task_as(
        &cli,
        &d,
        &admin,
        v["data"]["task_id"].as_str().unwrap(),
        &Daemon::key(NS, "adminsvc"),
    );
    assert_eq!(r["error_code"], json!(0), "{r}");
    assert!(!alive(apid_n));

    // --- read-only group member -----------------------------------------------------
    for (api, body) in [
        (
            "get_proc_status",
            json!({"meta": meta("rootsvc"), "hosts": [Daemon::host()]}),
        ),
        (
            "sync_proc_status",
            json!({"meta": {"namespace": NS}, "page": {"start": 0, "limit": 10}}),
        ),
        ("procs", json!({})),
        ("tasks", json!({"limit": 5})),
        ("get_proc_operate_result", json!({"task_id": start_task})),
    ] {
        let (code, v, err) = call_as(&cli, &d, &reader, api, &body);
        assert_eq!(
            (code, v["result"].clone()),
            (0, json!(true)),
            "reader {api}: {v} {err}"
        );
    }
    let sock = d.socket.display().to_string();
    let (code, out, err) = run_as(&reader, &cli, &["--socket", &sock, "health"]);
    assert_eq!(code, 0, "reader health: {out} {err}");
    let (code, _, err) = run_as(&reader, &cli, &["--socket", &sock, "events", "-n", "5"]);
    assert_eq!(code, 0, "reader events: {err}");
    let (_, v, _) = call_as(
        &cli,
        &d,
        &reader,
        "procs",
        &json!({"namespace": NS, "name": "rootsvc"}),
    );
    assert_eq!(
        v["data"]["list"][0]["spec"]["env"]["ROOT_TOKEN"],
        json!("(hidden)")
    );
    let mut rs = aspec.clone();
    rs["identity"]["user"] = json!(reader.name);
    for (api, body) in [
        (
            "register_proc_info",
            json!({"meta": meta("r1"), "hosts": [Daemon::host()], "spec": rs}),
        ),
        (
            "update_proc_info",
            json!({"meta": meta("adminsvc"), "hosts": [Daemon::host()], "spec": rs}),
        ),
        (
            "unregister_proc_info",
            json!({"meta": meta("adminsvc"), "hosts": [Daemon::host()]}),
        ),
        (
            "operate_proc",
            json!({"meta": meta("rootsvc"), "op_type": 1, "hosts": [Daemon::host()]}),
        ),
        (
            "operate_proc",
            json!({"meta": meta("adminsvc"), "op_type": 0, "hosts": [Daemon::host()]}),
        ),
        (
            "operate_proc_multi",
            json!({"proc_operate_req": [{"meta": meta("rootsvc"), "op_type": 3, "hosts": [Daemon::host()]}]}),
        ),
    ] {
        let (code, v, _) = call_as(&cli, &d, &reader, api, &body);
        refused(&v, &format!("reader {api}"));
        assert_eq!(code, 4);
    }
    // The CLI's own commands say so too.
    let (code, _, err) = run_as(
        &reader,
        &cli,
        &["--socket", &sock, "stop", &format!("{NS}/rootsvc")],
    );
    assert_eq!(code, 4, "{err}");
    assert!(alive(root_pid));

    // --- another uid that can open the socket but has no role ------------------------
    for (api, body) in [
        (
            "get_proc_status",
            json!({"meta": meta("rootsvc"), "hosts": [Daemon::host()]}),
        ),
        ("procs", json!({})),
        (
            "operate_proc",
            json!({"meta": meta("rootsvc"), "op_type": 9, "hosts": [Daemon::host()]}),
        ),
        (
            "register_proc_info",
            json!({"meta": meta("o1"), "hosts": [Daemon::host()], "spec": aspec}),
        ),
    ] {
        let (code, v, _) = call_as(&cli, &d, &other, api, &body);
        refused(&v, &format!("other uid {api}"));
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains(&other.uid.to_string()) && msg.contains(&adm_g),
            "the message names the uid and the rule: {msg}"
        );
        assert_eq!(code, 4);
    }
    let (code, _, err) = run_as(&other, &cli, &["--socket", &sock, "health"]);
    assert_eq!(code, 4, "health is refused too: {err}");
    assert!(err.contains("not allowed"), "{err}");
    let (code, _, _) = run_as(&other, &cli, &["--socket", &sock, "events"]);
    assert_eq!(code, 4);

    // --- a uid outside the socket group cannot even connect --------------------------
    let (code, _, err) = run_as(&outsider, &cli, &["--socket", &sock, "health"]);
    assert_eq!(code, 69, "{err}");
    assert!(
        err.to_lowercase().contains("permission denied"),
        "the refusal is the kernel's: {err}"
    );

    // --- the audit trail ------------------------------------------------------------
    d.register(NS, "rootapi", daemon_spec(&env, "rootapi", json!({})));
    let tasks = d.call("tasks", &json!({"limit": 1000}));
    let list = tasks["data"]["list"].as_array().unwrap().clone();
    let mine: Vec<&Value> = list
        .iter()
        .filter(|t| t["peer_uid"] == json!(admin.uid))
        .collect();
    let apis: Vec<&str> = mine.iter().filter_map(|t| t["api"].as_str()).collect();
    assert!(
        apis.contains(&"register_proc_info"),
        "admin register audited: {apis:?}"
    );
    assert!(
        apis.iter().filter(|a| **a == "operate_proc").count() >= 2,
        "admin start and stop audited: {apis:?}"
    );
    for t in &mine {
        assert!(
            t["peer_pid"].as_i64().is_some_and(|p| p > 1),
            "peer pid recorded: {t}"
        );
    }
    let reg = mine
        .iter()
        .find(|t| t["api"] == json!("register_proc_info"))
        .unwrap();
    assert_eq!(reg["username"], json!("alice-admin"), "{reg}");
    // Refused requests change nothing, so they are not tasks: nobody else appears.
    assert!(
        list.iter()
            .all(|t| t["peer_uid"] == json!(0) || t["peer_uid"] == json!(admin.uid)),
        "only root and the admin made changes: {list:?}"
    );
    // root's own requests are recorded with uid 0 and the test's pid.
    assert!(list.iter().any(|t| t["peer_uid"] == json!(0)
        && t["peer_pid"] == json!(std::process::id())
        && t["api"] == json!("register_proc_info")));
    drop(d);
    drop(cast);
}

#[test]
fn unregister_and_task_history_record_the_peer() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "t1", daemon_spec(&env, "t1", json!({})));
    let r = d.call(
        "operate_proc_multi",
        &json!({"proc_operate_req": [{"meta": meta("t1"), "op_type": 2, "hosts": [Daemon::host()]}], "bk_username": "bob"}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let r = d.call(
        "unregister_proc_info",
        &json!({"meta": meta("t1"), "hosts": [Daemon::host()], "bk_username": "carol"}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let list = d.call("tasks", &json!({}))["data"]["list"].clone();
    let me = std::process::id();
    let find = |api: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["api"] == json!(api))
            .cloned()
            .unwrap_or_else(|| panic!("{api} not in the task history: {list}"))
    };
    for (api, user) in [
        ("operate_proc_multi", "bob"),
        ("unregister_proc_info", "carol"),
    ] {
        let t = find(api);
        assert_eq!(
            (
                t["peer_uid"].clone(),
                t["peer_pid"].clone(),
                t["username"].clone()
            ),
            (
                json!(nix::unistd::getuid().as_raw()),
                json!(me),
                json!(user)
            ),
            "{t}"
        );
    }
}

#[test]
fn secrets_never_reach_the_log_the_database_or_output_files() {
    let env = TestEnv::new();
    const APP_SECRET: &str = "AppSecret-b7e1c0ffee";
    const TOKEN: &str = "BkToken-5a5a1d2d3d";
    const ENV_SECRET: &str = "EnvPassword-93f1aa";
    // The command uses the variable but never prints it.
    let mut d = Daemon::start(
        &env,
        &config_process(
            &env,
            "sec1",
            &[("DB_PASSWORD", ENV_SECRET)],
            "test -n \"$DB_PASSWORD\" && echo starting; ",
        ),
    );
    let common = json!({"bk_app_code": "gsekit", "bk_app_secret": APP_SECRET, "bk_token": TOKEN, "bk_username": "ops"});
    let with = |mut v: Value| {
        for (k, x) in common.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    wait_for(
        "sec1 started from the config",
        Duration::from_secs(30),
        || (d.status(NS, "sec1")["status"] == json!(1)).then_some(()),
    );
    assert_eq!(d.op(NS, "sec1", 1)["error_code"], json!(0));
    let spec = daemon_spec(&env, "sec2", json!({}));
    let r = d.call(
        "register_proc_info",
        &with(json!({"meta": meta("sec2"), "hosts": [Daemon::host()], "spec": spec})),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let r = d.call(
        "operate_proc",
        &with(json!({"meta": meta("sec1"), "op_type": 0, "hosts": [Daemon::host()]})),
    );
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    assert_eq!(
        d.wait_task(&task, &Daemon::key(NS, "sec1"))["error_code"],
        json!(0)
    );
    let r = d.call(
        "operate_proc_multi",
        &with(
            json!({"proc_operate_req": [{"meta": meta("sec1"), "op_type": 2, "hosts": [Daemon::host()]}]}),
        ),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let r = d.call(
        "get_proc_status",
        &with(json!({"meta": meta("sec1"), "hosts": [Daemon::host()]})),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    // Refused requests that carry the secrets (bad fields, unknown op) as well.
    for body in [
        with(json!({"meta": meta("sec1"), "op_type": 77, "hosts": [Daemon::host()]})),
        with(json!({"meta": meta("sec1"), "op_type": 0})),
        with(json!({"meta": {"namespace": NS}, "hosts": [Daemon::host()], "spec": spec})),
    ] {
        let r = d.call("operate_proc", &body);
        assert_eq!(r["result"], json!(false), "{r}");
    }
    assert_eq!(d.op(NS, "sec1", 1)["error_code"], json!(0));
    d.terminate();

    let mut files = vec![d.log.clone()];
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    walk(&d.state, &mut files);
    assert!(files.iter().any(|f| f.ends_with("state.db")), "{files:?}");
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains("output")),
        "{files:?}"
    );
    let log = d.log_text();
    assert!(log.contains("started"), "the log is not empty: {log}");
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for secret in [APP_SECRET, TOKEN] {
            assert!(!text.contains(secret), "{secret} found in {}", f.display());
        }
        // The env is part of the stored definition, and nowhere else.
        if !f.to_string_lossy().contains("state.db") {
            assert!(
                !text.contains(ENV_SECRET),
                "the command's environment leaked into {}",
                f.display()
            );
        }
    }
    let out: String = files
        .iter()
        .filter(|f| f.to_string_lossy().contains("sec1"))
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    assert!(
        out.contains("starting"),
        "the command saw its environment: {out}"
    );
}
