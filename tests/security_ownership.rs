//! The ownership rule (decisions.md): the agent adopts, answers 828 for, signals or restarts
//! only processes that belong to a definition: the definition's account (or a root
//! definition), a non-empty program name, and an origin (started by the agent for it,
//! recorded before a restart, or running from its setup_path). A pid file alone is never
//! proof. Each test here reproduces a way a caller or a managed account could point the root
//! agent at a process that is not theirs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::sec::{Accounts, User, accounts_available, call_as, cli_copy, owned_dir, run_as};
use common::*;
use serde_json::{Value, json};

const NS: &str = "own";

/// Start `prog` (cwd `dir`) in a session of its own, outside the agent; returns its pid.
fn bystander(prog: &str, dir: &Path) -> i32 {
    let child = Command::new("setsid")
        .arg(prog)
        .arg("100000")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bystander");
    let pid = child.id() as i32;
    // Reaped by nobody until the test ends; `setsid` execs the program directly (we are not
    // a process group leader), so the pid is the program's.
    std::mem::forget(child);
    wait_for("bystander running", Duration::from_secs(10), || {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let want = Path::new(prog).file_name()?.to_string_lossy().to_string();
        (comm.trim() == want).then_some(())
    });
    pid
}

fn spec_for(setup: &Path, prog_name: &str, pidfile: &str) -> Value {
    let prog = program_at(setup, prog_name);
    json!({
        "identity": {"proc_name": prog_name, "setup_path": setup.display().to_string(), "pid_path": pidfile, "user": ""},
        "control": {
            "start_cmd": format!("setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"),
            "stop_cmd": "",
        },
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
    })
}

#[test]
fn empty_program_names_are_refused_where_definitions_are_written() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let setup = env.path().display().to_string();
    for name in ["/", ".", "/opt/app/", ""] {
        let spec = json!({"identity": {"proc_name": name, "setup_path": setup, "pid_path": env.p("x.pid")},
                          "control": {"start_cmd": "true"}});
        let r = d.call(
            "register_proc_info",
            &json!({"meta": {"namespace": NS, "name": "empty"}, "hosts": [Daemon::host()], "spec": spec}),
        );
        assert_eq!(r["result"], json!(false), "{name:?}: {r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap_or("")
                .contains("spec.identity.proc_name"),
            "{name:?}: the message names the field: {r}"
        );
        // An inline spec on an operation: the item fails, naming the field.
        let r = d.call(
            "operate_proc",
            &json!({"meta": {"namespace": NS, "name": "empty"}, "op_type": 0, "hosts": [Daemon::host()], "spec": spec}),
        );
        let task = r["data"]["task_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let v = d.wait_task(&task, &Daemon::key(NS, "empty"));
        assert_ne!(v["error_code"], json!(0), "{name:?}: {v}");
        assert!(
            v["error_msg"].as_str().unwrap_or("").contains("proc_name"),
            "{v}"
        );
    }
    // operate_process (v2): the entry is refused, naming its field.
    let r = d.call(
        "operate_process",
        &json!({"bk_biz_id": 1, "op_type": 0, "process_infos": [{
            "setup_path": setup, "proc_name": "/", "pid_path": env.p("y.pid"), "start_cmd": "true",
            "ip_list": [{"ip": "127.0.0.1", "bk_cloud_id": 0}]}]}),
    );
    let task = r["data"]["bk_gse_taskid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let res = wait_for("v2 result", Duration::from_secs(30), || {
        let v = d.call("get_proc_operate_result_v2", &json!({ "task_id": task }));
        let m = v["data"].as_object()?.clone();
        m.values()
            .all(|x| x["error_code"] != json!(115))
            .then_some(m)
    });
    assert!(
        !res.is_empty()
            && res.values().all(|x| x["error_code"] != json!(0)
                && x["error_msg"].as_str().unwrap_or("").contains("proc_name")),
        "{res:?}"
    );
    let listed = d.call("procs", &json!({}));
    assert_eq!(
        listed["data"]["count"],
        json!(0),
        "nothing registered: {listed}"
    );
    // A config file with such a name is refused whole, naming the key.
    let cfg = env.path().join("bad.toml");
    std::fs::write(
        &cfg,
        Daemon::config_text(
            &env,
            &format!(
                "[[process]]\nnamespace = \"{NS}\"\nname = \"c\"\nsetup_path = \"{setup}\"\nproc_name = \"/\"\nstart_cmd = \"true\"\n"
            ),
        ),
    )
    .unwrap();
    let out = Command::new(DAEMON)
        .args(["--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("proc_name"), "{err}");
}

#[test]
fn a_stored_definition_with_an_empty_name_is_reported_and_never_acted_on() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    let setup = env.path().join("app");
    let pidfile = env.p("victim.pid");
    d.register(NS, "victim", spec_for(&setup, "victim", &pidfile));
    d.terminate();
    // A bystander from the same tree, named in the pid file.
    let other = bystander(&program_at(&setup, "victim2"), &setup);
    std::fs::write(&pidfile, format!("{other}\n")).unwrap();
    // The definition as an older agent could have stored it: proc_name "/".
    {
        let conn = rusqlite::Connection::open(d.state.join("state.db")).unwrap();
        let def: String = conn
            .query_row(
                "SELECT def FROM definitions WHERE namespace = ?1 AND name = 'victim'",
                [NS],
                |r| r.get(0),
            )
            .unwrap();
        let mut v: Value = serde_json::from_str(&def).unwrap();
        v["spec"]["proc_name"] = json!("/");
        v["spec"]["auto_type"] = json!(1);
        conn.execute(
            "UPDATE definitions SET def = ?1 WHERE namespace = ?2 AND name = 'victim'",
            rusqlite::params![v.to_string(), NS],
        )
        .unwrap();
        conn.execute(
            "UPDATE proc_state SET state = json_set(state, '$.flag', 1, '$.managed', json('true')) WHERE namespace = ?1",
            [NS],
        )
        .unwrap();
    }
    let d = Daemon::start_with(&env, &d.config.clone());
    // Reported at start.
    let evs = wait_for(
        "invalid definition reported",
        Duration::from_secs(10),
        || {
            let evs = d.events(&format!("{NS}/victim"));
            evs.iter()
                .any(|e| e["kind"] == json!("invalid_definition"))
                .then_some(evs)
        },
    );
    assert!(
        evs.iter()
            .any(|e| e["message"].as_str().unwrap_or("").contains("proc_name")),
        "{evs:?}"
    );
    assert!(
        d.detail(NS, "victim")["message"]
            .as_str()
            .unwrap_or("")
            .contains("proc_name"),
        "{}",
        d.detail(NS, "victim")
    );
    // Never acted on: kill, stop, start and manage answer an error; the bystander lives.
    for op in [9, 1, 0, 3, 7] {
        let v = d.op(NS, "victim", op);
        assert_ne!(v["error_code"], json!(0), "op {op}: {v}");
        assert!(alive(other), "op {op} touched pid {other}");
    }
    assert_ne!(d.status(NS, "victim")["pid"], json!(other));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(other));
    assert!(
        !env.processes().iter().any(|p| *p != other
            && std::fs::read_to_string(format!("/proc/{p}/comm"))
                .unwrap_or_default()
                .trim()
                == "victim"),
        "nothing was started for it"
    );
}

#[test]
fn a_stale_pid_file_naming_an_unrelated_program_is_neither_828_nor_stopped() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let setup = env.path().join("app");
    let pidfile = env.p("lonely.pid");
    d.register(NS, "lonely", spec_for(&setup, "lonely", &pidfile));
    // An unrelated program with the same name, installed elsewhere, runs; the stale pid file
    // names it.
    let elsewhere = env.path().join("elsewhere");
    let other = bystander(&program_at(&elsewhere, "lonely"), &elsewhere);
    std::fs::write(&pidfile, format!("{other}\n")).unwrap();
    // Status does not report it as ours.
    assert_ne!(d.status(NS, "lonely")["pid"], json!(other));
    // start is not 828: our own copy is started.
    let v = d.op(NS, "lonely", 0);
    assert_eq!(v["error_code"], json!(0), "{v}");
    let ours = d.status(NS, "lonely")["pid"].as_i64().unwrap() as i32;
    assert_ne!(ours, other);
    // stop ends ours and leaves the unrelated one alone.
    let v = d.op(NS, "lonely", 1);
    assert_eq!(v["error_code"], json!(0), "{v}");
    wait_for("ours stopped", Duration::from_secs(10), || {
        (!alive(ours)).then_some(())
    });
    assert!(alive(other), "the unrelated program was stopped");
    // The pid file names it again: manage (op 3) does not adopt it, and kill finds nothing.
    std::fs::write(&pidfile, format!("{other}\n")).unwrap();
    let v = d.op(NS, "lonely", 9);
    assert_eq!(v["error_code"], json!(829), "{v}");
    assert!(alive(other));
}

fn op_as(cli: &str, d: &Daemon, user: &User, name: &str, op: i64) -> Value {
    let (_, r, _) = call_as(
        cli,
        &d.socket,
        user,
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": name}, "op_type": op, "hosts": [Daemon::host()]}),
    );
    let task = r["data"]["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!task.is_empty(), "{r}");
    d.wait_task(&task, &Daemon::key(NS, name))
}

#[test]
fn an_admin_cannot_signal_a_root_process_through_a_pid_file() {
    if !accounts_available() {
        return;
    }
    let env = TestEnv::new();
    let mut acc = Accounts::new();
    let adm_g = acc.group("adm");
    let admin = acc.user("a", None, &[&adm_g]);
    let cli = cli_copy(&env);
    let d = Daemon::start(
        &env,
        &format!("[api]\nadmin_group = \"{adm_g}\"\nsocket_group = \"{adm_g}\"\n"),
    );
    let home = owned_dir(&env, "home-a", &admin);
    // root's program, from the very tree the admin names as setup_path.
    let setup = env.path().join("tree");
    let root_proc = bystander(&program_at(&setup, "svc"), &setup);
    let pidfile = home.join("svc.pid").display().to_string();
    std::fs::write(&pidfile, format!("{root_proc}\n")).unwrap();
    nix::unistd::chown(
        Path::new(&pidfile),
        Some(nix::unistd::Uid::from_raw(admin.uid)),
        None,
    )
    .unwrap();
    // proc_name "/" (which matched everything) is refused outright.
    let mut spec = json!({
        "identity": {"proc_name": "/", "setup_path": setup.display().to_string(), "pid_path": pidfile, "user": admin.name},
        "control": {"start_cmd": "true", "kill_cmd": ""},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 5},
    });
    let (_, r, _) = call_as(
        &cli,
        &d.socket,
        &admin,
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "slash"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(r["result"], json!(false), "{r}");
    // The program's own name, as the admin's account: root's process is not theirs.
    spec["identity"]["proc_name"] = json!("svc");
    let (_, r, _) = call_as(
        &cli,
        &d.socket,
        &admin,
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "svc"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    for op in [9, 1] {
        let v = op_as(&cli, &d, &admin, "svc", op);
        assert_eq!(v["error_code"], json!(829), "op {op}: {v}");
        assert!(alive(root_proc), "op {op} signalled root's process");
    }
    let v = op_as(&cli, &d, &admin, "svc", 0);
    assert_ne!(v["error_code"], json!(828), "{v}");
    assert!(alive(root_proc));
    assert_ne!(d.status(NS, "svc")["pid"], json!(root_proc));
}

#[test]
fn a_managed_account_cannot_point_the_agent_at_a_root_process() {
    if !accounts_available() {
        return;
    }
    let env = TestEnv::new();
    let mut acc = Accounts::new();
    let user = acc.user("m", None, &[]);
    // Health checks every 200 ms, one failure is enough.
    let d = Daemon::start(
        &env,
        "[supervisor]\nhealth_interval = \"200ms\"\nhealth_failures = 1\nbackoff_initial = \"200ms\"\n",
    );
    let setup = env.path().join("svc");
    std::fs::create_dir_all(&setup).unwrap();
    let prog = program_at(&setup, "worker");
    let home = owned_dir(&env, "home-m", &user);
    let pidfile = home.join("worker.pid").display().to_string();
    // The account's health check fails once it has written the marker.
    let marker = home.join("fail").display().to_string();
    let spec = json!({
        "identity": {"proc_name": "worker", "setup_path": setup.display().to_string(), "pid_path": pidfile, "user": user.name},
        "control": {
            "start_cmd": format!("setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"),
            "health_cmd": format!("test ! -e {marker}"),
        },
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
    });
    d.register(NS, "worker", spec);
    assert_eq!(d.op(NS, "worker", 0)["error_code"], json!(0));
    let own = d.status(NS, "worker")["pid"].as_i64().unwrap() as i32;
    // root's process with the same name, in its own process group.
    let root_proc = bystander(&prog, &setup);
    // The account points its pid file at root's process, fails its health check and kills
    // its own daemon.
    let sh = format!("echo {root_proc} > {pidfile}; touch {marker}; kill -9 {own}");
    let (code, _, err) = run_as(&user, "/bin/sh", &["-c", &sh]);
    assert_eq!(code, 0, "{err}");
    wait_for("own daemon gone", Duration::from_secs(10), || {
        (!alive(own)).then_some(())
    });
    // Whatever the agent does next (restart, health checks, restarts in backoff), root's
    // process is never adopted and never signalled.
    for _ in 0..30 {
        assert!(alive(root_proc), "root's process was signalled");
        assert_ne!(
            d.status(NS, "worker")["pid"],
            json!(root_proc),
            "root's process was adopted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(&marker);
}

/// An orphan that another definition's command left behind (reparented to the agent, a
/// child subreaper, in a session of its own) is not "started by the agent" for every
/// definition: a stale pid file of a same-name definition naming it gives neither 828 nor a
/// kill (issue "Trust boundaries" review: root's `app` start answered 828 and `kill` SIGKILLed
/// the helper another definition had started).
#[test]
fn an_orphan_of_another_definition_is_not_owned_through_a_stale_pid_file() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let setup = env.path().join("app");
    let pidfile = env.p("app.pid");
    d.register(NS, "app", spec_for(&setup, "app", &pidfile));
    // The definition has run commands before: its spawn records are older than the orphan.
    assert_eq!(d.op(NS, "app", 0)["error_code"], json!(0));
    assert_eq!(d.op(NS, "app", 1)["error_code"], json!(0));
    // Another definition's start command leaves a same-name helper behind, orphaned.
    let maker_dir = env.path().join("maker");
    let helper_prog = program_at(&env.path().join("elsewhere"), "app");
    let maker_prog = program_at(&maker_dir, "maker");
    let helper_pidfile = env.p("helper.pid");
    d.register(
        NS,
        "maker",
        json!({
            "identity": {"proc_name": "maker", "setup_path": maker_dir.display().to_string(), "pid_path": "", "user": ""},
            "control": {
                "start_cmd": format!("(setsid {helper_prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {helper_pidfile}); exec {maker_prog} 100000"),
                "stop_cmd": "",
            },
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
        }),
    );
    assert_eq!(d.op(NS, "maker", 0)["error_code"], json!(0));
    let helper = wait_for("the orphaned helper", Duration::from_secs(10), || {
        read_pid(&helper_pidfile).filter(|p| ppid(*p) == Some(d.pid()))
    });
    // The first definition's pid file names the helper.
    std::fs::write(&pidfile, format!("{helper}\n")).unwrap();
    assert_ne!(d.status(NS, "app")["pid"], json!(helper));
    let v = d.op(NS, "app", 0);
    assert_eq!(
        v["error_code"],
        json!(0),
        "start is not 828 for another's orphan: {v}"
    );
    let ours = d.status(NS, "app")["pid"].as_i64().unwrap_or(-1) as i32;
    assert_ne!(ours, helper);
    assert_eq!(d.op(NS, "app", 1)["error_code"], json!(0));
    wait_for("ours stopped", Duration::from_secs(10), || {
        (!alive(ours)).then_some(())
    });
    assert!(alive(helper), "stop ended another definition's helper");
    std::fs::write(&pidfile, format!("{helper}\n")).unwrap();
    let v = d.op(NS, "app", 9);
    assert_eq!(
        v["error_code"],
        json!(829),
        "kill finds nothing of its own: {v}"
    );
    assert!(alive(helper), "kill ended another definition's helper");
    d.op(NS, "maker", 1);
}
