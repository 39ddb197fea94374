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

/// Poll a task as `user` with get_proc_operate_result until `key` (a v1 key) answers.
fn wait_task_as(cli: &str, d: &Daemon, user: &User, task: &str, key: &str) -> Value {
    wait_task_at_as(cli, d, user, "get_proc_operate_result", task, key)
}

/// Poll a task as `user` with get_proc_operate_result_v2 until `key` (a v2 key) answers.
fn wait_task_v2_as(cli: &str, d: &Daemon, user: &User, task: &str, key: &str) -> Value {
    wait_task_at_as(cli, d, user, "get_proc_operate_result_v2", task, key)
}

fn wait_task_at_as(cli: &str, d: &Daemon, user: &User, api: &str, task: &str, key: &str) -> Value {
    wait_for("task result", Duration::from_secs(60), || {
        let (_, v, _) = call_as(cli, d, user, api, &json!({ "task_id": task }));
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
    refusal(v, FORBIDDEN, what);
}

fn uid_of(pid: i32) -> u32 {
    proc_status_number(pid, "Uid:")
        .and_then(|u| u32::try_from(u).ok())
        .unwrap_or(u32::MAX)
}

#[test]
fn authorization_matrix_with_real_users() {
    let env = TestEnv::new();
    // Admin through a supplementary group; read-only through its primary group.
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let (admin, reader, other, cli) = (
        r.admin.clone(),
        r.reader.clone(),
        r.other.clone(),
        r.cli.clone(),
    );
    let (sock_g, adm_g) = (r.sock_g.clone(), r.adm_g.clone());
    let outsider = r.acc.user("x", None, &[]);
    // root's process, declared in the config (and so started at once), with a secret in its
    // environment.
    let d = r.daemon(
        &env,
        &config_process(
            &env,
            "rootsvc",
            &[("ROOT_TOKEN", "root-env-value-7731")],
            "",
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
    let adir = r.admin_dir(&env);
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
    // It is told so as a permission problem (exit 4) naming the socket's group and mode, not
    // "is procagentd running?" (69).
    let (code, _, err) = run_as(&outsider, &cli, &["--socket", &sock, "health"]);
    assert_eq!(code, 4, "{err}");
    // What stands in the way here is the socket's directory (group-only): it is named with
    // its group and mode.
    let dir = std::path::Path::new(&sock).parent().unwrap();
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o7777
    };
    assert!(
        err.to_lowercase().contains("permission denied")
            && err.contains(&dir.display().to_string())
            && err.contains(&format!("group {sock_g}"))
            && err.contains(&format!("mode {mode:04o}"))
            && !err.contains("is procagentd running"),
        "{err}"
    );
    // With the directory open to all, the socket itself is what refuses: its group and mode.
    {
        use std::os::unix::fs::PermissionsExt;
        let sock_mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o005)).unwrap();
        let (code, _, err) = run_as(&outsider, &cli, &["--socket", &sock, "health"]);
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
        if sock_mode & 0o006 == 0 {
            assert_eq!(code, 4, "{err}");
            assert!(
                err.contains(&format!(
                    "the socket is group {sock_g}, mode {sock_mode:04o}"
                )),
                "{err}"
            );
        }
    }

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
    drop(r);
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

/// Accounts and a CLI for the role tests: an admin (supplementary admin group) and a
/// read-only member (primary read-only group), both in the socket group. `None` (with the
/// reason printed) when the test cannot create accounts.
struct Roles {
    admin: User,
    reader: User,
    /// In the socket group, without a role.
    other: User,
    cli: String,
    /// The `[api]` table naming the groups.
    api: String,
    sock_g: String,
    adm_g: String,
    // Dropped last.
    acc: Accounts,
}

impl Roles {
    fn new(env: &TestEnv) -> Option<Roles> {
        if !common::sec::accounts_available() {
            return None;
        }
        let cast = Cast::new();
        let api = cast.api_config("");
        let Cast {
            acc,
            sock_g,
            adm_g,
            admin,
            reader,
            other,
            ..
        } = cast;
        Some(Roles {
            admin,
            reader,
            other,
            cli: cli_copy(env),
            api,
            sock_g,
            adm_g,
            acc,
        })
    }
}

impl Roles {
    /// A daemon whose `[api]` names the groups, plus `extra` config.
    fn daemon(&self, env: &TestEnv, extra: &str) -> Daemon {
        Daemon::start(env, &format!("{}{extra}", self.api))
    }

    /// A directory in the test's dir owned by the admin (for their pid files).
    fn admin_dir(&self, env: &TestEnv) -> std::path::PathBuf {
        let dir = env.path().join("home-a");
        std::fs::create_dir_all(&dir).expect("mkdir");
        nix::unistd::chown(
            &dir,
            Some(nix::unistd::Uid::from_raw(self.admin.uid)),
            Some(nix::unistd::Gid::from_raw(self.admin.gid)),
        )
        .expect("chown");
        dir
    }
}

/// operate_proc op 2 on `name` with an inline `spec`, as the read-only member: its result.
fn status_as(r: &Roles, d: &Daemon, name: &str, spec: &Value) -> Value {
    let (code, v, err) = call_as(
        &r.cli,
        d,
        &r.reader,
        "operate_proc",
        &json!({"meta": meta(name), "op_type": 2, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!((code, v["result"].clone()), (0, json!(true)), "{v} {err}");
    let task = v["data"]["task_id"].as_str().expect("task id").to_string();
    wait_task_as(&r.cli, d, &r.reader, &task, &Daemon::key(NS, name))
}

/// Watch `path` for `window`: true if it appeared.
fn appears_within(path: &str, window: Duration) -> bool {
    let end = std::time::Instant::now() + window;
    while std::time::Instant::now() < end {
        if std::path::Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::path::Path::new(path).exists()
}

#[test]
fn status_with_an_inline_spec_never_writes_a_definition_or_runs_a_command() {
    let env = TestEnv::new();
    let Some(r) = Roles::new(&env) else { return };
    let d = r.daemon(&env, "[supervisor]\nhealth_interval = \"200ms\"\n");
    // root's process, registered through the API and running.
    let spec = daemon_spec(&env, "victim", json!({}));
    d.register(NS, "victim", spec.clone());
    assert_eq!(d.op(NS, "victim", 0)["error_code"], json!(0));
    let pid = read_pid(&env.p("victim.pid")).unwrap();
    let before = d.detail(NS, "victim")["spec"].clone();

    // A read-only member's status query carries a spec whose health_cmd would run as root.
    let marker = env.p("pwned-by-status");
    let mut evil = spec.clone();
    evil["control"]["health_cmd"] = json!(format!("id > {marker}"));
    let res = status_as(&r, &d, "victim", &evil);
    assert_eq!(res["error_code"], json!(0), "the status is answered: {res}");
    let content: Value = serde_json::from_str(res["content"].as_str().unwrap()).unwrap();
    assert_eq!(content["process"][0]["instance"][0]["pid"], json!(pid));
    // Ten health intervals and more: the health_cmd never ran, the definition is root's.
    assert!(
        !appears_within(&marker, Duration::from_secs(4)),
        "a status query's inline health_cmd ran as root"
    );
    assert_eq!(
        d.detail(NS, "victim")["spec"],
        before,
        "definition replaced"
    );
    // The window is long enough: root's own update of the health_cmd runs within it.
    let control = env.p("health-ran");
    let mut mine = spec.clone();
    mine["control"]["health_cmd"] = json!(format!("id > {control}"));
    let rr = d.call(
        "update_proc_info",
        &json!({"meta": meta("victim"), "hosts": [Daemon::host()], "spec": mine}),
    );
    assert_eq!(rr["result"], json!(true), "{rr}");
    assert!(appears_within(&control, Duration::from_secs(4)));

    // A new key whose inline spec names /etc/shadow as its log: nothing is registered, so
    // the logs endpoint has nothing to read.
    let mut peek = daemon_spec(&env, "peek", json!({}));
    peek["identity"]["log_path"] = json!("/etc/shadow");
    let res = status_as(&r, &d, "peek", &peek);
    assert_eq!(res["error_code"], json!(851), "unregistered: {res}");
    let content: Value = serde_json::from_str(res["content"].as_str().unwrap()).unwrap();
    assert_eq!(content["process"][0]["instance"][0]["pid"], json!(-1));
    let list = d.call("procs", &json!({"namespace": NS, "name": "peek"}));
    assert_eq!(list["data"]["count"], json!(0), "registered: {list}");
    let sock = d.socket.display().to_string();
    let (code, out, err) = run_as(
        &r.reader,
        &r.cli,
        &["--socket", &sock, "logs", &format!("{NS}/peek")],
    );
    assert_ne!(code, 0, "logs of an unregistered key: {out}");
    assert!(
        err.contains("not registered") || err.contains("no registered process"),
        "{err}"
    );
    assert!(!out.contains("root:"), "shadow was read: {out}");
}

#[test]
fn multi_status_items_from_a_reader_register_nothing_and_writes_are_refused() {
    let env = TestEnv::new();
    let Some(r) = Roles::new(&env) else { return };
    let d = r.daemon(&env, "");
    let spec = daemon_spec(&env, "rsvc", json!({}));
    d.register(NS, "rsvc", spec.clone());
    let before = d.detail(NS, "rsvc")["spec"].clone();
    let mut changed = spec.clone();
    changed["control"]["stop_cmd"] = json!("true");
    let items = |op: i64| {
        json!({"proc_operate_req": [
            {"meta": meta("rsvc"), "op_type": op, "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}], "spec": changed},
            {"meta": meta("fresh1"), "op_type": op, "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}],
             "spec": daemon_spec(&env, "fresh1", json!({}))},
        ]})
    };
    let (code, v, err) = call_as(&r.cli, &d, &r.reader, "operate_proc_multi", &items(2));
    assert_eq!((code, v["result"].clone()), (0, json!(true)), "{v} {err}");
    let task = v["data"]["task_id"].as_str().unwrap().to_string();
    let a = wait_task_v2_as(
        &r.cli,
        &d,
        &r.reader,
        &task,
        &format!("0:127.0.0.1:{NS}:rsvc"),
    );
    let b = wait_task_v2_as(
        &r.cli,
        &d,
        &r.reader,
        &task,
        &format!("0:127.0.0.1:{NS}:fresh1"),
    );
    assert_eq!(a["error_code"], json!(0), "{a}");
    assert_eq!(b["error_code"], json!(851), "{b}");
    assert_eq!(d.detail(NS, "rsvc")["spec"], before, "definition replaced");
    let list = d.call("procs", &json!({"namespace": NS}));
    assert_eq!(list["data"]["count"], json!(1), "registered: {list}");
    // The same items as a start (a write) are refused whole.
    for op in [0, 3, 7] {
        let (_, v, _) = call_as(&r.cli, &d, &r.reader, "operate_proc_multi", &items(op));
        refused(&v, &format!("reader operate_proc_multi op {op} with specs"));
    }
    // An invalid inline spec does not turn a refusal into a recorded task.
    let (_, v, _) = call_as(
        &r.cli,
        &d,
        &r.reader,
        "operate_proc_multi",
        &json!({"proc_operate_req": [{"meta": meta("rsvc"), "op_type": 9,
                "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}], "spec": {"identity": {}}}]}),
    );
    refused(&v, "reader op 9 with an invalid spec");
    let list = d.call("procs", &json!({"namespace": NS}));
    assert_eq!(list["data"]["count"], json!(1), "registered: {list}");
    // operate_process (v2): a status query is answered and registers nothing; a start with
    // the same entry is refused.
    let info = json!({"setup_path": env.path().display().to_string(), "proc_name": "v2p",
                      "pid_path": env.p("v2p.pid"), "start_cmd": "true", "health_cmd": "true",
                      "ip_list": [{"ip": "127.0.0.1", "bk_cloud_id": 0}]});
    let (_, v, err) = call_as(
        &r.cli,
        &d,
        &r.reader,
        "operate_process",
        &json!({"bk_biz_id": 1, "op_type": 2, "process_infos": [info]}),
    );
    assert_eq!(v["result"], json!(true), "{v} {err}");
    let task = v["data"]["bk_gse_taskid"].as_str().unwrap().to_string();
    let k = "0:127.0.0.1:operate_process:v2p@".to_string() + &env.path().display().to_string();
    let res = wait_task_v2_as(&r.cli, &d, &r.reader, &task, &k);
    assert_eq!(res["error_code"], json!(851), "{res}");
    for op in [0, 4] {
        let (_, v, _) = call_as(
            &r.cli,
            &d,
            &r.reader,
            "operate_process",
            &json!({"bk_biz_id": 1, "op_type": op, "process_infos": [info]}),
        );
        refused(&v, &format!("reader operate_process op {op}"));
    }
    let list = d.call("procs", &json!({}));
    assert_eq!(list["data"]["count"], json!(1), "registered: {list}");
    // /metrics on the socket is a read: the reader gets it, a uid without a role does not.
    // (A python3 every account may run: not one under root's home.)
    let py = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| have(p));
    let sock = d.socket.display().to_string();
    let get = |u: &User| {
        let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(b'GET /metrics HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n')\nb=b''\nwhile True:\n    c=s.recv(65536)\n    if not c: break\n    b+=c\nsys.stdout.write(b.decode('utf-8','replace'))\n";
        let (_, out, err) = run_as(u, py.unwrap_or("python3"), &["-c", script, &sock]);
        format!("{out}{err}")
    };
    if py.is_some() {
        let ok = get(&r.reader);
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.contains("procagent_"),
            "{ok}"
        );
        let no = get(&r.other);
        assert!(
            no.contains("1000403") && !no.contains("procagent_process"),
            "{no}"
        );
    } else {
        eprintln!("no system python3: /metrics roles not checked here");
    }
    let tasks = d.call("tasks", &json!({"limit": 1000}))["data"]["list"].clone();
    let by_reader = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["peer_uid"] == json!(r.reader.uid) && t["op_type"] != json!(2))
        .count();
    assert_eq!(by_reader, 0, "a refused request was recorded: {tasks}");
}

#[test]
fn inline_specs_are_recorded_as_the_change_they_make() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let spec = daemon_spec(&env, "inl", json!({}));
    let op = |op: i64, spec: &Value| {
        let r = d.call(
            "operate_proc",
            &json!({"meta": meta("inl"), "op_type": op, "hosts": [Daemon::host()], "spec": spec}),
        );
        assert_eq!(r["result"], json!(true), "{r}");
        let task = r["data"]["task_id"].as_str().unwrap().to_string();
        let res = d.wait_task(&task, &Daemon::key(NS, "inl"));
        let t = d.call("tasks", &json!({"limit": 1000}))["data"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task_id"] == json!(task))
            .cloned()
            .unwrap();
        (res, t["items"][0]["definition"].clone())
    };
    let (res, change) = op(0, &spec);
    assert_eq!(res["error_code"], json!(0), "{res}");
    assert_eq!(change, json!("registered"));
    let mut changed = spec.clone();
    changed["control"]["stop_cmd"] = json!(format!("kill -TERM $(cat {})", env.p("inl.pid")));
    let (res, change) = op(1, &changed);
    assert_eq!(res["error_code"], json!(0), "{res}");
    assert_eq!(change, json!("updated: stop_cmd"));
    let (_, change) = op(1, &changed);
    assert_eq!(change, json!("unchanged"));
    // A status query records no definition change, whatever it carries.
    let mut other = changed.clone();
    other["control"]["stop_cmd"] = json!("true");
    let (_, change) = op(2, &other);
    assert_eq!(change, Value::Null);
    assert_eq!(
        d.detail(NS, "inl")["spec"]["stop_cmd"],
        changed["control"]["stop_cmd"]
    );
    // register/update/unregister say the same, and the CLI shows it.
    let r = d.call(
        "update_proc_info",
        &json!({"meta": meta("inl"), "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let t = d.call("tasks", &json!({"limit": 1}))["data"]["list"][0].clone();
    assert_eq!(t["api"], json!("update_proc_info"), "{t}");
    assert_eq!(
        t["items"][0]["definition"],
        json!("updated: stop_cmd"),
        "{t}"
    );
    let (code, out, err) = d.cli(&["tasks", "--limit", "10"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("registered") && out.contains("updated: stop_cmd"),
        "{out}"
    );
    // The change survives a restart of the agent (it is in the state database).
    let tid = t["task_id"].as_str().unwrap().to_string();
    let mut d = d;
    d.terminate();
    let d = Daemon::start_with(&env, &d.config.clone());
    let (code, out, err) = d.cli(&["task", &tid]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("updated: stop_cmd"), "{out}");
}

#[test]
fn reload_apply_needs_the_full_role_and_dry_run_hides_env_values() {
    let env = TestEnv::new();
    let Some(r) = Roles::new(&env) else { return };
    let text = |token: &str| {
        format!(
            "{}{}",
            r.api,
            config_process(&env, "cfgsvc", &[("CFG_TOKEN", token)], "")
        )
    };
    let mut d = Daemon::start(&env, &text("old-secret-4417"));
    let cfg = Daemon::config_text(&env, &text("new-secret-9902"));
    std::fs::write(&d.config, cfg).unwrap();
    let sock = d.socket.display().to_string();
    // An admin may not apply: applying writes definitions of any account and restarts them.
    let (code, out, err) = run_as(&r.admin, &r.cli, &["--socket", &sock, "reload"]);
    assert_eq!(code, 4, "admin reload: {out} {err}");
    assert!(err.contains("reload"), "{err}");
    assert_eq!(
        d.detail(NS, "cfgsvc")["spec"]["env"]["CFG_TOKEN"],
        json!("old-secret-4417"),
        "applied"
    );
    // A dry run shows what changes, with the values hidden from who may not change it.
    for who in [&r.reader, &r.admin] {
        let (code, v, err) = call_as(&r.cli, &d, who, "reload", &json!({"dry_run": true}));
        assert_eq!((code, v["result"].clone()), (0, json!(true)), "{v} {err}");
        let text = v.to_string();
        assert!(
            !text.contains("old-secret-4417") && !text.contains("new-secret-9902"),
            "env values shown: {text}"
        );
        let ch = &v["data"]["changed"][0];
        assert_eq!(ch["key"], json!(format!("{NS}/cfgsvc")), "{v}");
        let f = ch["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == json!("env"))
            .unwrap();
        assert_eq!(f["old"]["CFG_TOKEN"], json!("(hidden)"), "{f}");
        assert_eq!(f["new"]["CFG_TOKEN"], json!("(hidden)"), "{f}");
    }
    // root sees the values and may apply.
    let v = d.call("reload", &json!({"dry_run": true}));
    assert!(v.to_string().contains("new-secret-9902"), "{v}");
    let v = d.call("reload", &json!({}));
    assert_eq!(v["result"], json!(true), "{v}");
    assert_eq!(
        d.detail(NS, "cfgsvc")["spec"]["env"]["CFG_TOKEN"],
        json!("new-secret-9902")
    );
    d.terminate();
}

#[test]
fn status_of_a_process_started_outside_the_agent_runs_no_version_cmd() {
    let env = TestEnv::new();
    // A long sweep: the supervisor's own adoption (which may run version_cmd) stays out of
    // the window.
    let d = Daemon::start(&env, "[supervisor]\nsweep_interval = \"60s\"\n");
    let marker = env.p("version-ran");
    let spec = daemon_spec(
        &env,
        "outside",
        json!({"version_cmd": format!("echo 1.0; touch {marker}")}),
    );
    // The registration looks at the pid file in the background; it names this test (not an
    // `outside`), so that look ends with a `not_adopted` event, awaited before the process
    // is started outside the agent (else that look could come after and adopt it).
    let pidfile = env.p("outside.pid");
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    d.register(NS, "outside", spec);
    wait_for(
        "the registration's look at the pid file",
        Duration::from_secs(30),
        || {
            d.events(&format!("{NS}/outside"))
                .iter()
                .any(|e| e["kind"] == json!("not_adopted"))
                .then_some(())
        },
    );
    // Started by someone else: the pid file names a live `outside`.
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(env.daemon_start_cmd("outside", &pidfile))
        .current_dir(env.path())
        .status()
        .unwrap();
    assert!(st.success());
    let pid = wait_for("pid file", Duration::from_secs(10), || read_pid(&pidfile));
    assert!(alive(pid));
    let r = d.call(
        "operate_proc",
        &json!({"meta": meta("outside"), "op_type": 2, "hosts": [Daemon::host()]}),
    );
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    let res = d.wait_task(&task, &Daemon::key(NS, "outside"));
    assert_eq!(res["error_code"], json!(0), "{res}");
    let content: Value = serde_json::from_str(res["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        content["process"][0]["instance"][0]["pid"],
        json!(-1),
        "what the agent knows: not adopted yet"
    );
    let r = d.call(
        "operate_proc_multi",
        &json!({"proc_operate_req": [{"meta": meta("outside"), "op_type": 2, "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0}]}]}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    // The same process named the v2 way (setup_path + proc_name).
    let r = d.call(
        "operate_process",
        &json!({"bk_biz_id": 1, "op_type": 2, "process_infos": [{
            "setup_path": env.path().display().to_string(), "proc_name": "outside",
            "pid_path": pidfile, "ip_list": [{"ip": "127.0.0.1", "bk_cloud_id": 0}]}]}),
    );
    let task = r["data"]["bk_gse_taskid"].as_str().unwrap().to_string();
    let res = d.wait_task_v2(&task, &format!("0:127.0.0.1:{NS}:outside"));
    assert_eq!(res["error_code"], json!(0), "{res}");
    let _ = d.status(NS, "outside");
    assert!(
        !appears_within(&marker, Duration::from_secs(3)),
        "a status query ran version_cmd"
    );
    assert!(
        d.events(&format!("{NS}/outside"))
            .iter()
            .all(|e| e["kind"] != json!("adopted")),
        "a status query adopted the process"
    );
    // A start (a write) does adopt it, and that may run version_cmd.
    let r = d.op(NS, "outside", 0);
    assert_eq!(r["error_code"], json!(828), "{r}");
    assert!(appears_within(&marker, Duration::from_secs(10)));
}

#[test]
fn an_item_is_authorized_again_when_it_runs() {
    let env = TestEnv::new();
    let Some(r) = Roles::new(&env) else { return };
    // One operation at a time: the admin's items wait for root's start to finish.
    let d = r.daemon(&env, "[supervisor]\nmax_parallel_ops = 1\n");
    let adir = r.admin_dir(&env);
    let pidfile = adir.join("slow.pid").display().to_string();
    let spec = |user: &str| {
        json!({
            "identity": {"proc_name": "slow", "setup_path": env.path().display().to_string(),
                         "pid_path": pidfile, "user": user},
            "control": {"start_cmd": format!("sleep 3; {}", env.daemon_start_cmd("slow", &pidfile)),
                        "stop_cmd": format!("kill $(cat {pidfile})")},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 20},
        })
    };
    // The admin's own process; root starts it (slowly: the operation holds it for 3 s).
    d.register(NS, "slow", spec(&r.admin.name));
    let start = d.call(
        "operate_proc",
        &json!({"meta": meta("slow"), "op_type": 0, "hosts": [Daemon::host()]}),
    );
    let start_task = start["data"]["task_id"].as_str().unwrap().to_string();
    // Meanwhile the admin asks for a kill and for a stop with their own inline spec: both
    // accepted, since the definition is theirs now.
    let mut admin_tasks = Vec::new();
    for (op, inline) in [(9, None), (1, Some(spec(&r.admin.name)))] {
        let mut body = json!({"meta": meta("slow"), "op_type": op, "hosts": [Daemon::host()]});
        if let Some(s) = inline {
            body["spec"] = s;
        }
        let (_, v, err) = call_as(&r.cli, &d, &r.admin, "operate_proc", &body);
        assert_eq!(v["result"], json!(true), "{v} {err}");
        admin_tasks.push(v["data"]["task_id"].as_str().unwrap().to_string());
    }
    // ... and root makes the definition root's before those items run.
    let updated = d.call(
        "update_proc_info",
        &json!({"meta": meta("slow"), "hosts": [Daemon::host()], "spec": spec("")}),
    );
    assert_eq!(
        updated["data"][Daemon::key(NS, "slow")]["error_code"],
        json!(0),
        "{updated}"
    );
    assert_eq!(
        d.wait_task(&start_task, &Daemon::key(NS, "slow"))["error_code"],
        json!(0)
    );
    let pid = read_pid(&pidfile).unwrap();
    for t in &admin_tasks {
        let res = d.wait_task(t, &Daemon::key(NS, "slow"));
        assert_eq!(res["error_code"], json!(FORBIDDEN), "{res}");
        assert!(
            res["error_msg"].as_str().unwrap().contains(&r.admin.name),
            "{res}"
        );
    }
    assert!(
        alive(pid),
        "the admin's kill or stop ran on root's definition"
    );
    assert_eq!(d.detail(NS, "slow")["spec"]["account"], json!(""));
    assert_eq!(d.op(NS, "slow", 1)["error_code"], json!(0));
}

/// POST `body` to `path` on the daemon's socket as `user` (curl, since the CLI only speaks
/// /v1/): the envelope, or null.
fn post_as(d: &Daemon, user: &User, path: &str, body: &Value) -> Value {
    let sock = d.socket.display().to_string();
    let url = format!("http://agent{path}");
    let (_, out, err) = run_as(
        user,
        "/usr/bin/curl",
        &["-s", "--unix-socket", &sock, "-d", &body.to_string(), &url],
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{path}: {e}: {out} {err}"))
}

/// The ESB root paths (`/operate_proc_multi/`, ...) and the APIGW paths are authorized
/// exactly as /v1/ is: a reader may query and not operate, a uid without a role may do
/// nothing, an admin may operate its own processes.
#[test]
fn esb_root_paths_are_authorized_as_the_v1_routes() {
    let env = TestEnv::new();
    let Some(r) = Roles::new(&env) else {
        return;
    };
    if !have("/usr/bin/curl") {
        eprintln!("skipped: /usr/bin/curl is not installed");
        return;
    }
    let d = r.daemon(&env, "");
    let spec = daemon_spec(&env, "esbauth", json!({}));
    d.register(NS, "esbauth", spec.clone());
    let host = json!([{"ip": "127.0.0.1", "bk_cloud_id": 0}]);
    let multi = |op: i64| json!({"proc_operate_req": [{"meta": meta("esbauth"), "op_type": op, "hosts": host, "spec": spec}]});
    let status = json!({"meta": meta("esbauth"), "hosts": host});
    for prefix in ["/v1/", "/", "/api/v2/proc/"] {
        for slash in ["", "/"] {
            let at = |api: &str| format!("{prefix}{api}{slash}");
            let path = at("operate_proc_multi");
            // A reader may run status queries (an inline spec stores nothing) and no start.
            refused(&post_as(&d, &r.reader, &path, &multi(0)), &path);
            let v = post_as(&d, &r.reader, &path, &multi(2));
            assert_eq!(v["result"], json!(true), "{path}: {v}");
            let v = post_as(&d, &r.reader, &at("get_proc_status_v2"), &status);
            assert_eq!(v["result"], json!(true), "{path}: {v}");
            refused(
                &post_as(
                    &d,
                    &r.reader,
                    &at("register_proc_info"),
                    &json!({"meta": meta("esbauth"), "hosts": [Daemon::host()], "spec": spec}),
                ),
                &at("register_proc_info"),
            );
            // Without a role: nothing, not even a read.
            refused(&post_as(&d, &r.other, &path, &multi(2)), &path);
            refused(
                &post_as(&d, &r.other, &at("get_proc_status_v2"), &status),
                &at("get_proc_status_v2"),
            );
            // An admin may not operate root's process (its account is root's).
            refused(&post_as(&d, &r.admin, &path, &multi(0)), &path);
        }
    }
    assert_eq!(
        d.status(NS, "esbauth")["status"],
        json!(2),
        "nothing started"
    );
}

/// An admin's command runs as the admin from the moment its working directory is entered,
/// and the agent reads the admin's pid files as the admin: a `setup_path` under another
/// account's private (0700) directory is refused, never entered on root's behalf, and a pid
/// file in it says the same whether or not it exists (its existence is not disclosed).
#[test]
fn an_admins_paths_are_reached_with_the_admins_own_permissions() {
    let env = TestEnv::new();
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let (admin, cli) = (r.admin.clone(), r.cli.clone());
    let victim = r.acc.user("v", None, &[]);
    let d = r.daemon(&env, "");
    let adir = r.admin_dir(&env);
    // The victim's private directory, with a world-readable directory and files inside
    // (and a process of the victim's there, which this test does not need).
    let (public, _victims_process, _) = victim_with_a_process_inside(&env, &victim);
    let leak = adir.join("leak");
    let register = |name: &str, setup: &std::path::Path, pid_path: &str, cmd: &str| {
        let spec = json!({
            "identity": {"proc_name": name, "setup_path": setup.display().to_string(),
                         "pid_path": pid_path, "user": admin.name},
            "control": {"start_cmd": cmd},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
        });
        let (_, v, _) = call_as(
            &cli,
            &d,
            &admin,
            "register_proc_info",
            &json!({"meta": meta(name), "hosts": [Daemon::host()], "spec": spec}),
        );
        assert_eq!(
            v["data"][Daemon::key(NS, name)]["error_code"],
            json!(0),
            "{v}"
        );
    };
    // 1. setup_path inside the victim's 0700 directory: the start fails, nothing is read.
    register(
        "peek",
        &public,
        "",
        &format!("cat secret > {}; exec sleep 60", leak.display()),
    );
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "operate_proc",
        &json!({"meta": meta("peek"), "op_type": 0, "hosts": [Daemon::host()]}),
    );
    let res = wait_task_as(
        &cli,
        &d,
        &admin,
        v["data"]["task_id"].as_str().expect("task id"),
        &Daemon::key(NS, "peek"),
    );
    assert_ne!(res["error_code"], json!(0), "the start must fail: {res}");
    let msg = res["error_msg"].as_str().unwrap_or("");
    assert!(
        msg.contains("setup_path") && msg.contains("permission denied"),
        "{res}"
    );
    assert!(
        !leak.exists(),
        "the admin's command ran inside another account's private directory and read {:?}",
        std::fs::read_to_string(&leak).unwrap_or_default()
    );

    // 1b. setup_path *is* the victim's 0700 directory (its parent open to all): looked up
    // fine, but entered as the admin, so the command does not start there.
    let closed = env.path().join("victim-closed");
    std::fs::create_dir(&closed).unwrap();
    give_to(&victim, &[(&closed, 0o700)]);
    let inside = adir.join("inside");
    register(
        "enter",
        &closed,
        "",
        &format!("pwd > {}; exec sleep 60", inside.display()),
    );
    let (_, v, _) = call_as(
        &cli,
        &d,
        &admin,
        "operate_proc",
        &json!({"meta": meta("enter"), "op_type": 0, "hosts": [Daemon::host()]}),
    );
    let res = wait_task_as(
        &cli,
        &d,
        &admin,
        v["data"]["task_id"].as_str().expect("task id"),
        &Daemon::key(NS, "enter"),
    );
    assert_ne!(res["error_code"], json!(0), "the start must fail: {res}");
    assert!(
        !inside.exists(),
        "the admin's command started inside another account's 0700 directory: {:?}",
        std::fs::read_to_string(&inside).unwrap_or_default()
    );

    // 2. Pid files under the victim's directory: an existing one and a missing one read the
    // same to the admin.
    let mut seen = Vec::new();
    for (name, file) in [("pidreal", "real.pid"), ("pidnone", "none.pid")] {
        let pid_path = public.join(file).display().to_string();
        register(name, &adir, &pid_path, "exec sleep 60");
        let (_, v, _) = call_as(
            &cli,
            &d,
            &admin,
            "operate_proc",
            &json!({"meta": meta(name), "op_type": 2, "hosts": [Daemon::host()]}),
        );
        let res = wait_task_as(
            &cli,
            &d,
            &admin,
            v["data"]["task_id"].as_str().expect("task id"),
            &Daemon::key(NS, name),
        );
        let events: std::collections::BTreeSet<String> = d
            .events(&format!("{NS}/{name}"))
            .iter()
            .map(|e| format!("{} {}", e["kind"], e["message"]).replace(file, "FILE"))
            .collect();
        seen.push((
            res["error_msg"]
                .as_str()
                .unwrap_or("")
                .replace(file, "FILE"),
            events,
        ));
    }
    assert_eq!(
        seen[0], seen[1],
        "an existing and a missing pid file in another account's private directory read differently"
    );
}

/// Give `entries` (path, mode) to `user`: owner, group and mode.
fn give_to(user: &User, entries: &[(&std::path::Path, u32)]) {
    for (p, mode) in entries {
        nix::unistd::chown(
            *p,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .expect("chown");
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(*mode))
            .expect("chmod");
    }
}

/// Another account's private corner for the path tests: `env/victim` (0700, the victim's)
/// holding `pub` (0755) with `secret` and `real.pid` (0644), and a process of the victim's
/// (killed when the returned handle drops) whose working directory is `pub`: what the
/// victim's own managed processes look like (they run in their setup_path).
fn victim_with_a_process_inside(
    env: &TestEnv,
    victim: &User,
) -> (std::path::PathBuf, common::sec::AsUser, i32) {
    let private = env.path().join("victim");
    let public = private.join("pub");
    std::fs::create_dir_all(&public).expect("victim setup");
    std::fs::write(public.join("secret"), "victim-secret-5521\n").expect("victim setup");
    std::fs::write(public.join("real.pid"), format!("{}\n", std::process::id()))
        .expect("victim setup");
    give_to(
        victim,
        &[
            (&private, 0o700),
            (&public, 0o755),
            (&public.join("secret"), 0o644),
            (&public.join("real.pid"), 0o644),
        ],
    );
    let script = format!("cd '{}' && echo in && exec sleep 600", public.display());
    let mut sleeper = common::sec::AsUser::spawn(Some(victim), "sh", &["-c", &script]);
    assert_eq!(
        sleeper.line("the victim's process", Duration::from_secs(10)),
        "in"
    );
    let pid = sleeper.child.id() as i32;
    // The victim's process sits in `pub`; the admin alone cannot follow its cwd link.
    let cwd = format!("/proc/{pid}/cwd");
    wait_for("the victim's cwd", Duration::from_secs(10), || {
        (std::fs::read_link(&cwd).ok()? == public).then_some(())
    });
    (public, sleeper, pid)
}

/// In `dir`: `a -> D10` and `D10/b -> D11` (relative symlinks into directories nested 10 and
/// 11 deep, 200-byte names) and `D10/D11/p -> target`: `dir/a/b/p` is a short path whose
/// resolved form is longer than PATH_MAX, which the kernel follows without complaint.
fn long_way_to(dir: &std::path::Path, target: &str) {
    use rustix::fs::{Mode, OFlags};
    let name = "d".repeat(200);
    let chain = |k: usize| vec![name.as_str(); k].join("/");
    let open = |at: &std::os::fd::OwnedFd, p: &str| {
        rustix::fs::openat(at, p, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
            .expect("long path setup")
    };
    let mkdirs = |at: &std::os::fd::OwnedFd, k: usize| {
        let mut fd = open(at, ".");
        for _ in 0..k {
            let _ = rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755));
            fd = open(&fd, &name);
        }
        fd
    };
    let top = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
        .expect("long path setup");
    let d10 = mkdirs(&top, 10);
    let d11 = mkdirs(&d10, 11);
    rustix::fs::symlinkat(chain(10).as_str(), &top, "a").expect("long path setup");
    rustix::fs::symlinkat(chain(11).as_str(), &d10, "b").expect("long path setup");
    rustix::fs::symlinkat(target, &d11, "p").expect("long path setup");
}

/// Register `name` as the admin, running `cmd` once (auto_type 2) in `setup` with `pid_path`.
fn register_as_admin(r: &Roles, d: &Daemon, name: &str, setup: &str, pid_path: &str, cmd: &str) {
    let spec = json!({
        "identity": {"proc_name": name, "setup_path": setup, "pid_path": pid_path,
                     "user": r.admin.name},
        "control": {"start_cmd": cmd},
        "monitor_policy": {"auto_type": 2, "start_check_secs": 1, "op_timeout": 10},
    });
    let (_, v, _) = call_as(
        &r.cli,
        d,
        &r.admin,
        "register_proc_info",
        &json!({"meta": meta(name), "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(
        v["data"][Daemon::key(NS, name)]["error_code"],
        json!(0),
        "{v}"
    );
}

/// operate_proc `op` on `name` as the admin: its task result.
fn op_as_admin(r: &Roles, d: &Daemon, name: &str, op: i64) -> Value {
    let (_, v, _) = call_as(
        &r.cli,
        d,
        &r.admin,
        "operate_proc",
        &json!({"meta": meta(name), "op_type": op, "hosts": [Daemon::host()]}),
    );
    wait_task_as(
        &r.cli,
        d,
        &r.admin,
        v["data"]["task_id"].as_str().expect("task id"),
        &Daemon::key(NS, name),
    )
}

/// The pool thread that opens an admin's setup_path (and reads their pid files) has the
/// admin's fsuid but keeps root's other capabilities, CAP_SYS_PTRACE among them: it may
/// follow `/proc/PID/cwd` of any process, which the admin may not. The root-side walk that
/// refuses `/proc/PID/...` links gives up (lets the job go on) when a component cannot be
/// lstat'ed, so a path whose resolved form exceeds PATH_MAX hides the link from it. The
/// admin's command then starts inside a directory below another account's 0700 one and
/// reads it; a pid file there is read too (its number, the victim's uid and its existence
/// disclosed).
#[test]
fn an_admins_paths_do_not_reach_another_accounts_directory_through_a_process_cwd() {
    let env = TestEnv::new();
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let victim = r.acc.user("v", None, &[]);
    let d = r.daemon(&env, "");
    let adir = r.admin_dir(&env);
    let (_public, _sleeper, vpid) = victim_with_a_process_inside(&env, &victim);
    // What the admin may do alone: not follow the victim's cwd link.
    let (code, _, _) = run_as(&r.admin, "ls", &[&format!("/proc/{vpid}/cwd/")]);
    assert_ne!(
        code, 0,
        "the admin can follow the victim's cwd by themselves"
    );
    long_way_to(&adir, &format!("/proc/{vpid}/cwd"));
    let way = adir.join("a/b/p").display().to_string();
    // The direct link is refused by the walk; the long way is not.
    let leak = adir.join("leak");
    let cmd = format!(
        "pwd > {0}; cat secret >> {0}; exec sleep 60",
        leak.display()
    );
    register_as_admin(&r, &d, "deep", &way, "", &cmd);
    let res = op_as_admin(&r, &d, "deep", 0);
    std::thread::sleep(Duration::from_millis(500));
    let got = std::fs::read_to_string(&leak).unwrap_or_default();
    assert!(
        !got.contains("victim-secret"),
        "the admin's command started in another account's directory ({res}) and read: {got:?}"
    );
    // The same way to a pid file: an existing one and a missing one read the same.
    let mut seen = Vec::new();
    for (name, file) in [("pidreal", "real.pid"), ("pidnone", "none.pid")] {
        register_as_admin(
            &r,
            &d,
            name,
            &adir.display().to_string(),
            &format!("{way}/{file}"),
            "exec sleep 60",
        );
        let res = op_as_admin(&r, &d, name, 2);
        let events: std::collections::BTreeSet<String> = d
            .events(&format!("{NS}/{name}"))
            .iter()
            .map(|e| format!("{} {}", e["kind"], e["message"]).replace(file, "FILE"))
            .collect();
        seen.push((
            res["error_msg"]
                .as_str()
                .unwrap_or("")
                .replace(file, "FILE"),
            events,
        ));
    }
    assert_eq!(
        seen[0], seen[1],
        "a pid file reached through another process's cwd was read for the admin"
    );
}

/// The walk (as root) and the open (as the admin) look the path up twice: a symlink of the
/// admin's that points at a directory of their own while the walk looks, and at
/// `/proc/PID/cwd` of another account's process when the open follows it, takes the
/// admin's command into that process's directory (the open keeps CAP_SYS_PTRACE).
#[test]
fn an_admins_setup_path_swapped_after_the_walk_does_not_reach_another_process_cwd() {
    let env = TestEnv::new();
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let victim = r.acc.user("v", None, &[]);
    let d = r.daemon(&env, "");
    let adir = r.admin_dir(&env);
    let (_public, _sleeper, vpid) = victim_with_a_process_inside(&env, &victim);
    let own = adir.join("own");
    std::fs::create_dir_all(&own).unwrap();
    let link = adir.join("r");
    let tmp = adir.join("r.tmp");
    std::os::unix::fs::symlink(&own, &link).unwrap();
    // The admin flips the link as fast as they can (done here by the test, in their dir).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, own, link, tmp) = (stop.clone(), own.clone(), link.clone(), tmp.clone());
        let cwd = std::path::PathBuf::from(format!("/proc/{vpid}/cwd"));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for t in [&own, &cwd] {
                    let _ = std::fs::remove_file(&tmp);
                    let _ = std::os::unix::fs::symlink(t, &tmp);
                    let _ = std::fs::rename(&tmp, &link);
                }
            }
        })
    };
    let leak = adir.join("leak");
    let cmd = format!(
        "pwd >> {0}; cat secret >> {0} 2>/dev/null; true",
        leak.display()
    );
    register_as_admin(&r, &d, "flip", &link.display().to_string(), "", &cmd);
    let mut got = String::new();
    for _ in 0..30 {
        op_as_admin(&r, &d, "flip", 0);
        std::thread::sleep(Duration::from_millis(200));
        got = std::fs::read_to_string(&leak).unwrap_or_default();
        if got.contains("victim-secret") {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    assert!(
        !got.contains("victim-secret"),
        "the admin's command started in another account's directory and read: {got:?}"
    );
}

/// `GET /v1/logs` checks an admin's `log_path` as the admin, but resolves it as root first:
/// a file under another account's 0700 directory answers "not readable by the process's
/// account" when it exists and "No such file or directory" when it does not, so an admin
/// learns which files exist there (what the pid files no longer tell).
#[test]
fn an_admins_log_path_does_not_tell_whether_a_file_exists_in_another_accounts_directory() {
    let env = TestEnv::new();
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let victim = r.acc.user("v", None, &[]);
    let d = r.daemon(&env, "");
    let adir = r.admin_dir(&env);
    let private = env.path().join("victim");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::write(private.join("there.log"), "victim-log-7731\n").unwrap();
    for p in [&private, &private.join("there.log")] {
        nix::unistd::chown(
            p.as_path(),
            Some(nix::unistd::Uid::from_raw(victim.uid)),
            Some(nix::unistd::Gid::from_raw(victim.gid)),
        )
        .unwrap();
    }
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let sock = d.socket.display().to_string();
    let mut seen = Vec::new();
    for (name, file) in [("logthere", "there.log"), ("lognone", "none.log")] {
        let spec = json!({
            "identity": {"proc_name": name, "setup_path": adir.display().to_string(),
                         "pid_path": "", "user": r.admin.name,
                         "log_path": private.join(file).display().to_string()},
            "control": {"start_cmd": "exec sleep 60"},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
        });
        let (_, v, _) = call_as(
            &r.cli,
            &d,
            &r.admin,
            "register_proc_info",
            &json!({"meta": meta(name), "hosts": [Daemon::host()], "spec": spec}),
        );
        assert_eq!(
            v["data"][Daemon::key(NS, name)]["error_code"],
            json!(0),
            "{v}"
        );
        let (_, out, err) = run_as(
            &r.admin,
            &r.cli,
            &[
                "--socket",
                &sock,
                "--json",
                "logs",
                &format!("{NS}/{name}"),
                "--source",
                "log",
            ],
        );
        assert!(!out.contains("victim-log"), "the log was shown: {out}");
        seen.push(format!("{out}{err}").replace(file, "FILE"));
    }
    assert_eq!(
        seen[0], seen[1],
        "an existing and a missing file in another account's private directory read differently"
    );
}

/// The pool's walk before a job (which refuses `/proc/PID/...` links) looks the path up as
/// root, symlinks included: a symlink of the admin's to `PRIVATE/NAME/../../../proc/1/cwd`
/// answers "was not tried: it goes through /proc/1/cwd" when NAME exists under another
/// account's 0700 directory (root's lstat finds it and the walk goes on) and "permission
/// denied" when it does not (the walk stops, the admin's open fails): an existence oracle.
#[test]
fn the_pools_walk_does_not_tell_an_admin_whether_a_file_exists_in_another_accounts_directory() {
    let env = TestEnv::new();
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let victim = r.acc.user("v", None, &[]);
    let d = r.daemon(&env, "");
    let adir = r.admin_dir(&env);
    let private = env.path().join("victim");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::write(private.join("there"), "x").unwrap();
    nix::unistd::chown(
        private.as_path(),
        Some(nix::unistd::Uid::from_raw(victim.uid)),
        Some(nix::unistd::Gid::from_raw(victim.gid)),
    )
    .unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let ups = "../".repeat(private.components().count() + 1);
    let mut seen = Vec::new();
    for (name, file) in [("walkthere", "there"), ("walknone", "none")] {
        let link = adir.join(name);
        std::os::unix::fs::symlink(
            format!("{}/{file}/{ups}proc/1/cwd", private.display()),
            &link,
        )
        .unwrap();
        register_as_admin(
            &r,
            &d,
            name,
            &link.display().to_string(),
            "",
            "exec sleep 60",
        );
        let res = op_as_admin(&r, &d, name, 0);
        seen.push(
            res["error_msg"]
                .as_str()
                .unwrap_or("")
                .replace(name, "NAME"),
        );
    }
    assert_eq!(
        seen[0], seen[1],
        "an existing and a missing file in another account's private directory read differently"
    );
}

/// Discovery resolves `setup_path` as root (`std::fs::canonicalize`, for the ownership
/// rule's "runs from its setup_path"): `PRIVATE/NAME/../../../ADMIN/run` resolves to the
/// admin's own `run` directory when NAME is a directory inside another account's 0700
/// directory, and not at all when it is missing. The admin's own process running in `run`,
/// named by their own pid file, is then adopted (start answers 828) or not (the start fails
/// on setup_path): a directory-existence oracle in a directory the admin cannot search.
#[test]
fn an_admins_setup_path_is_not_resolved_as_root_for_the_ownership_rule() {
    let env = TestEnv::new();
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let victim = r.acc.user("v", None, &[]);
    let d = r.daemon(&env, "");
    let adir = r.admin_dir(&env);
    let private = env.path().join("victim");
    std::fs::create_dir_all(private.join("there")).unwrap();
    give_to(
        &victim,
        &[(&private, 0o700), (&private.join("there"), 0o700)],
    );
    // What the admin may do alone: not even look inside.
    let (code, _, _) = run_as(
        &r.admin,
        "ls",
        &[&private.join("there").display().to_string()],
    );
    assert_ne!(code, 0, "the admin can search the victim's directory");
    let run = adir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    nix::unistd::chown(
        run.as_path(),
        Some(nix::unistd::Uid::from_raw(r.admin.uid)),
        Some(nix::unistd::Gid::from_raw(r.admin.gid)),
    )
    .unwrap();
    let ups = "../".repeat(private.components().count());
    let rel = run
        .display()
        .to_string()
        .trim_start_matches('/')
        .to_string();
    let mut seen = Vec::new();
    let mut keep = Vec::new();
    for (name, guess) in [("realthere", "there"), ("realnone", "none")] {
        // The admin's own program, running in their own directory, named by their pid file.
        let prog = adir.join(name);
        std::fs::copy("/bin/sleep", &prog).unwrap();
        let pidfile = adir.join(format!("{name}.pid"));
        let script = format!(
            "cd '{}' && echo $$ > '{}' && echo in && exec '{}' 600",
            run.display(),
            pidfile.display(),
            prog.display()
        );
        let mut p = common::sec::AsUser::spawn(Some(&r.admin), "sh", &["-c", &script]);
        assert_eq!(p.line("the admin's process", Duration::from_secs(10)), "in");
        std::thread::sleep(Duration::from_millis(200));
        keep.push(p);
        let setup = format!("{}/{guess}/{ups}{rel}", private.display());
        register_as_admin(
            &r,
            &d,
            name,
            &setup,
            &pidfile.display().to_string(),
            "exec sleep 60",
        );
        let res = op_as_admin(&r, &d, name, 0);
        let events: std::collections::BTreeSet<String> = d
            .events(&format!("{NS}/{name}"))
            .iter()
            .map(|e| {
                format!("{} {}", e["kind"], e["message"])
                    .replace(name, "NAME")
                    .replace(guess, "GUESS")
            })
            .filter(|l| !l.contains("pid "))
            .collect();
        seen.push((
            res["error_code"].clone(),
            res["error_msg"]
                .as_str()
                .unwrap_or("")
                .replace(name, "NAME")
                .replace(guess, "GUESS"),
            events,
        ));
    }
    drop(keep);
    assert_eq!(
        seen[0], seen[1],
        "a directory's existence inside another account's 0700 directory changed the answer"
    );
}

/// A followed `log_path` is checked for rotation with root's `stat` of the path (symlinks
/// followed): once the admin swaps their own log file for a symlink into another account's
/// 0700 directory, the stream says "file replaced (rotated)" (and then cannot open it) when
/// the target exists there, and nothing at all when it does not: an existence oracle for
/// any file the admin cannot reach.
#[test]
fn a_followed_log_path_swapped_for_a_symlink_does_not_tell_whether_a_file_exists() {
    let env = TestEnv::new();
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let victim = r.acc.user("v", None, &[]);
    let d = r.daemon(&env, "");
    let adir = r.admin_dir(&env);
    let private = env.path().join("victim");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::write(private.join("there"), "victim-log-7731\n").unwrap();
    for p in [&private, &private.join("there")] {
        nix::unistd::chown(
            p.as_path(),
            Some(nix::unistd::Uid::from_raw(victim.uid)),
            Some(nix::unistd::Gid::from_raw(victim.gid)),
        )
        .unwrap();
    }
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let sock = d.socket.display().to_string();
    let mut seen = Vec::new();
    for (name, guess) in [("followthere", "there"), ("follownone", "none")] {
        let log = adir.join(format!("{name}.log"));
        std::fs::write(&log, "first line\n").unwrap();
        nix::unistd::chown(
            log.as_path(),
            Some(nix::unistd::Uid::from_raw(r.admin.uid)),
            Some(nix::unistd::Gid::from_raw(r.admin.gid)),
        )
        .unwrap();
        let spec = json!({
            "identity": {"proc_name": name, "setup_path": adir.display().to_string(),
                         "pid_path": "", "user": r.admin.name,
                         "log_path": log.display().to_string()},
            "control": {"start_cmd": "exec sleep 60"},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
        });
        let (_, v, _) = call_as(
            &r.cli,
            &d,
            &r.admin,
            "register_proc_info",
            &json!({"meta": meta(name), "hosts": [Daemon::host()], "spec": spec}),
        );
        assert_eq!(
            v["data"][Daemon::key(NS, name)]["error_code"],
            json!(0),
            "{v}"
        );
        let key = format!("{NS}/{name}");
        let mut f = common::sec::AsUser::spawn(
            Some(&r.admin),
            &r.cli,
            &[
                "--socket", &sock, "--json", "logs", &key, "--source", "log", "--follow",
            ],
        );
        let first = f.line("the followed log", Duration::from_secs(10));
        assert!(first.contains("first line"), "{first}");
        // The admin swaps their own log file for a symlink into the victim's directory.
        let tmp = adir.join(format!("{name}.tmp"));
        std::os::unix::fs::symlink(private.join(guess), &tmp).unwrap();
        std::fs::rename(&tmp, &log).unwrap();
        let mut got = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(4);
        while let Some(l) = f.try_line(end.saturating_duration_since(std::time::Instant::now())) {
            if !l.trim().is_empty() {
                got.push(l.replace(name, "NAME").replace(guess, "GUESS"));
            }
        }
        drop(f);
        assert!(
            !got.iter().any(|l| l.contains("victim-log")),
            "the victim's file was shown: {got:?}"
        );
        seen.push(got);
    }
    assert_eq!(
        seen[0], seen[1],
        "an existing and a missing file in another account's private directory read differently"
    );
}

/// A log directory's files are shown without following symlinks (module docs of
/// `api/logs.rs`), but a listed file that is replaced is reopened by its path, resolved
/// with `canonicalize`: the account that writes the log directory of a root definition (the
/// service account its daemon drops to) swaps its log file for a symlink to a root-only
/// file, and every follower (a read-only member included) is shown that file, read as root.
#[test]
fn a_followed_log_directory_file_swapped_for_a_symlink_is_not_read_through_it() {
    let env = TestEnv::new();
    let Some(mut r) = Roles::new(&env) else {
        return;
    };
    let svc = r.acc.user("s", None, &[]);
    let d = r.daemon(&env, "");
    let logs = common::sec::owned_dir(&env, "svc-logs", &svc);
    let log = logs.join("a.log");
    std::fs::write(&log, "first line\n").unwrap();
    nix::unistd::chown(
        log.as_path(),
        Some(nix::unistd::Uid::from_raw(svc.uid)),
        Some(nix::unistd::Gid::from_raw(svc.gid)),
    )
    .unwrap();
    let secret = env.path().join("root-only");
    std::fs::write(&secret, "root-secret-4417\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Root's definition (its own account), its log directory written by the service account.
    let mut spec = daemon_spec(&env, "svcdir", json!({}));
    spec["identity"]["log_path"] = json!(logs.display().to_string());
    d.register(NS, "svcdir", spec);
    let sock = d.socket.display().to_string();
    let mut f = common::sec::AsUser::spawn(
        Some(&r.reader),
        &r.cli,
        &[
            "--socket",
            &sock,
            "logs",
            &format!("{NS}/svcdir"),
            "--source",
            "log",
            "--follow",
        ],
    );
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while let Some(l) = f.try_line(end.saturating_duration_since(std::time::Instant::now())) {
        if l.contains("first line") {
            break;
        }
    }
    // The service account swaps its log file for a symlink (in its own directory).
    let (code, _, err) = run_as(
        &svc,
        "sh",
        &[
            "-c",
            &format!(
                "ln -s '{}' '{}/tmp' && mv -T '{}/tmp' '{}'",
                secret.display(),
                logs.display(),
                logs.display(),
                log.display()
            ),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mut got = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(4);
    while let Some(l) = f.try_line(end.saturating_duration_since(std::time::Instant::now())) {
        got.push(l);
    }
    drop(f);
    assert!(
        !got.iter().any(|l| l.contains("root-secret")),
        "a root-only file was shown through a symlink swapped into the log directory: {got:?}"
    );
}
