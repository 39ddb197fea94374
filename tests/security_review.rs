//! Attacks on containment, the file-system pool's path walk and process_status, as an
//! unprivileged caller or managed account would try them (a third review): each test here
//! reproduces a hole that was found open and holds its fix. Root only: real accounts, a
//! cgroup v2 subtree of the test's own, FUSE mounts that never answer.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cgroup::Subtree;
use common::sec::{Cast, User, accounts_available, call_as, cli_copy, owned_dir};
use common::*;
use serde_json::{Value, json};

const NS: &str = "box";

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

/// Root's definition box/svc, started (its daemon in procs/box/svc/0), then unregistered:
/// its daemon keeps running in that cgroup, which prune cannot remove while it is
/// populated, and the name is free for anyone to register. Returns the daemon's pid and
/// the cgroup.
fn roots_leftover(env: &TestEnv, d: &Daemon, sub: &Subtree) -> (i32, PathBuf) {
    let setup = env.path().join("rootsvc");
    std::fs::create_dir_all(&setup).expect("mkdir");
    let prog = program_at(&setup, "rootd");
    let pidfile = env.p("rootd.pid");
    d.register(
        NS,
        "svc",
        json!({
            "identity": {"proc_name": "rootd", "setup_path": setup.display().to_string(), "pid_path": pidfile, "user": ""},
            "control": {"start_cmd": format!("setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"), "stop_cmd": ""},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 3},
        }),
    );
    let r = d.op(NS, "svc", 0);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let root_pid = read_pid(&pidfile).expect("root's pid");
    assert!(alive(root_pid));
    let cg = sub.root.join(format!("procs/{NS}/svc/0"));
    assert!(
        procagent::cgroup::procs(&cg).contains(&root_pid),
        "root's daemon runs in {}",
        cg.display()
    );
    let r = d.call(
        "unregister_proc_info",
        &json!({"meta": {"namespace": NS, "name": "svc"}, "hosts": [Daemon::host()]}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(root_pid), "unregistering leaves the process running");
    (root_pid, cg)
}

/// Root's definition box/svc is unregistered while its daemon runs ("the process is no
/// longer watched": it keeps running, in the cgroup procs/box/svc/0, which prune cannot
/// remove while it is populated). An admin then registers box/svc for their own account
/// and starts it: clear_leftovers SIGTERMs (then cgroup.kill's) everything in that cgroup,
/// with no account check, so root's daemon dies. The cgroup is keyed by the name alone,
/// and the name was free.
#[test]
fn an_admin_reusing_an_unregistered_root_key_never_kills_roots_leftover_in_its_cgroup() {
    if !accounts_available() {
        return;
    }
    let env = TestEnv::new();
    let Some(sub) = Subtree::or_skip(&env) else {
        return;
    };
    let cast = Cast::new();
    let cli = cli_copy(&env);
    let d = Daemon::start(&env, &cast.api_config(&sub.config()));
    let (root_pid, cg) = roots_leftover(&env, &d, &sub);

    // The admin takes the freed name, for their own account.
    let home = owned_dir(&env, "home-a", &cast.admin);
    let spec = json!({
        "identity": {"proc_name": "sleep", "setup_path": home.display().to_string(), "pid_path": "", "user": cast.admin.name},
        "control": {"start_cmd": "exec sleep 100000", "stop_cmd": ""},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 3},
    });
    let (_, r, _) = call_as(
        &cli,
        &d.socket,
        &cast.admin,
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "svc"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(r["result"], json!(true), "admin registers box/svc: {r}");
    let v = op_as(&cli, &d, &cast.admin, "svc", 0);
    eprintln!("admin's start: {v}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        alive(root_pid),
        "the admin's start of its own definition killed root's process {root_pid} (clear_leftovers of the reused cgroup {})",
        cg.display()
    );
    // Then a stop, for good measure (cgroup.kill of the instance cgroup).
    let v = op_as(&cli, &d, &cast.admin, "svc", 9);
    eprintln!("admin's kill: {v}");
    std::thread::sleep(Duration::from_secs(1));
    let ok = alive(root_pid);
    // Clean up root's daemon whatever happened.
    if ok {
        kill9(root_pid);
    }
    assert!(
        ok,
        "the admin's start/kill of its own definition killed root's process {root_pid} (left in the reused cgroup {})",
        cg.display()
    );
}

/// Attacker review, round four: containment's limits. The start of a reused key refuses to
/// run beside root's leftover, but an adoption did not: an admin who registers the freed
/// name box/svc with a pid file naming a process of their own (started outside the agent)
/// had it moved into procs/box/svc/0, beside root's daemon, and that cgroup prepared for
/// it: with the memory controller, the admin's mem_lmt written as its memory.high and
/// memory.max (memory.oom.group 1: an OOM kill takes the whole cgroup, root's daemon
/// with it). A cgroup holding another account's processes is never prepared: the process
/// stays where it is, tracked without containment.
#[test]
fn an_admin_adopting_into_a_reused_cgroup_never_joins_roots_leftover() {
    if !accounts_available() {
        return;
    }
    let env = TestEnv::new();
    let Some(sub) = Subtree::or_skip(&env) else {
        return;
    };
    let cast = Cast::new();
    let cli = cli_copy(&env);
    let d = Daemon::start(&env, &cast.api_config(&sub.config()));
    let (root_pid, cg) = roots_leftover(&env, &d, &sub);

    // The admin's own process, started by hand outside every cgroup of the agent.
    let home = owned_dir(&env, "home-a", &cast.admin);
    let prog = program_at(&home, "admind");
    let mut own = common::sec::as_user(&cast.admin, &prog)
        .arg("100000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the admin's process");
    let own_pid = own.id() as i32;
    let pidfile = home.join("admind.pid");
    std::fs::write(&pidfile, format!("{own_pid}\n")).unwrap();
    nix::unistd::chown(
        &pidfile,
        Some(nix::unistd::Uid::from_raw(cast.admin.uid)),
        Some(nix::unistd::Gid::from_raw(cast.admin.gid)),
    )
    .unwrap();
    let spec = json!({
        "identity": {"proc_name": "admind", "setup_path": home.display().to_string(), "pid_path": pidfile.display().to_string(), "user": cast.admin.name},
        "control": {"start_cmd": format!("exec {prog} 100000"), "stop_cmd": ""},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 3},
        "resource": {"mem": 0.001},
    });
    let (_, r, _) = call_as(
        &cli,
        &d.socket,
        &cast.admin,
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "svc"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(r["result"], json!(true), "admin registers box/svc: {r}");
    wait_for(
        "the admin's process adopted",
        Duration::from_secs(20),
        || (d.status(NS, "svc")["pid"] == json!(own_pid)).then_some(()),
    );
    // Moved in, or left out (and told so).
    let moved = wait_for("the move decided", Duration::from_secs(20), || {
        if procagent::cgroup::procs(&cg).contains(&own_pid) {
            return Some(true);
        }
        d.events(&format!("{NS}/svc"))
            .iter()
            .any(|e| e["kind"] == json!("not_contained"))
            .then_some(false)
    });
    let events = d.events(&format!("{NS}/svc"));
    let _ = own.kill();
    let _ = own.wait();
    let root_alive = alive(root_pid);
    if root_alive {
        kill9(root_pid);
    }
    assert!(root_alive, "root's leftover {root_pid} died");
    assert!(
        !moved,
        "the admin's process {own_pid} was moved into {}, which holds root's process {root_pid}, and that cgroup was given the admin's limits",
        cg.display()
    );
    let ev = events
        .iter()
        .find(|e| e["kind"] == json!("not_contained"))
        .expect("not_contained");
    let msg = ev["message"].as_str().unwrap_or("");
    assert!(msg.contains(&root_pid.to_string()), "{ev}");
}

/// A FUSE mount that never answers, mounted only in a private mount namespace: the agent's
/// mount table does not show it. The holder (the namespace's only process) keeps the server
/// end of /dev/fuse; killing it aborts the connection.
struct HiddenHungFuse {
    holder: std::process::Child,
}

impl HiddenHungFuse {
    fn mount(mnt: &Path) -> Result<HiddenHungFuse, String> {
        if !is_root() || !Path::new("/dev/fuse").exists() || !common::sec::have("unshare") {
            return Err("needs root, /dev/fuse and unshare".into());
        }
        std::fs::create_dir_all(mnt).map_err(|e| e.to_string())?;
        let script = format!(
            "exec 3<>/dev/fuse || exit 1; mount -i -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0,allow_other hung '{}' || exit 2; echo mounted; exec sleep 100000",
            mnt.display()
        );
        let mut child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        if line.trim() != "mounted" {
            let _ = child.kill();
            let _ = child.wait();
            return Err("cannot mount FUSE in a private namespace".into());
        }
        Ok(HiddenHungFuse { holder: child })
    }

    fn pid(&self) -> i32 {
        self.holder.id() as i32
    }
}

impl Drop for HiddenHungFuse {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Pid files reached through /proc/PID/root of a process in another mount namespace, where
/// a hung FUSE is mounted: fspool's walk resolves the /proc/PID/root symlink lexically (to
/// "/"), so it files each job under the host's "/" (which answers) and never learns of the
/// hung mount: each path takes a pool thread for good, and work on healthy paths of "/"
/// stalls behind them.
#[test]
fn pid_files_through_proc_pid_root_into_a_hidden_hung_mount_do_not_take_the_pool() {
    let env = TestEnv::new();
    let mnt = env.path().join("hidden");
    let fuse = match HiddenHungFuse::mount(&mnt) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    // The host sees an empty directory there.
    assert!(std::fs::read_dir(&mnt).is_ok());
    let via = format!("/proc/{}/root{}", fuse.pid(), mnt.display());
    let d = Daemon::start(&env, "");
    const STUCK: usize = 64;
    let names: Vec<String> = (0..STUCK).map(|i| format!("stuck{i}")).collect();
    for name in &names {
        let mut s = daemon_spec(&env, name, json!({}));
        s["identity"]["pid_path"] = json!(format!("{via}/{name}.pid"));
        s["control"]["start_cmd"] = json!("true");
        d.register("hid", name, s);
    }
    for name in &names {
        for op in [3, 0] {
            let r = d.call(
                "operate_proc",
                &json!({"meta": {"namespace": "hid", "name": name}, "op_type": op, "hosts": [Daemon::host()]}),
            );
            assert_eq!(r["result"], json!(true), "{r}");
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let h = d.get("/v1/healthz");
    eprintln!(
        "while stuck: {} blocked paths, hung_mounts {}",
        h["data"]["blocked_paths"].as_array().map_or(0, |a| a.len()),
        h["data"]["hung_mounts"]
    );
    // A healthy process elsewhere on "/" is started and stopped, in time.
    let healthy_pidfile = env.p("healthy.pid");
    d.register("hid", "healthy", daemon_spec(&env, "healthy", json!({})));
    for (op, what) in [(0, "start"), (1, "stop")] {
        let r = d.call(
            "operate_proc",
            &json!({"meta": {"namespace": "hid", "name": "healthy"}, "op_type": op, "hosts": [Daemon::host()]}),
        );
        let task = r["data"]["task_id"].as_str().expect("task id").to_string();
        let key = Daemon::key("hid", "healthy");
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        let v = loop {
            let v = d.call("get_proc_operate_result", &json!({ "task_id": task }))["data"][&key]
                .clone();
            if v["error_code"] != json!(115) || std::time::Instant::now() > deadline {
                break v;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let h = d.get("/v1/healthz");
        if v["error_code"] != json!(0) {
            let pid = read_pid(&healthy_pidfile);
            drop(fuse);
            if let Some(p) = pid {
                kill9(p);
            }
            panic!(
                "{what} of a healthy process failed while {STUCK} pid files hang behind /proc/PID/root: {v}\nhealthz: {h}"
            );
        }
    }
    drop(d);
    drop(fuse);
}

/// Control for the test above (holds today): the same load on a hung mount the agent can
/// see is flagged and later jobs on it fail at once, so healthy paths keep their threads.
#[test]
fn control_visible_hung_mount_with_as_many_pid_files_keeps_the_pool() {
    let env = TestEnv::new();
    let mnt = env.path().join("hidden");
    let fuse = match common::sec::HungFuse::mount(&mnt, env.path()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let via = mnt.display().to_string();
    let d = Daemon::start(&env, "");
    const STUCK: usize = 64;
    let names: Vec<String> = (0..STUCK).map(|i| format!("stuck{i}")).collect();
    for name in &names {
        let mut s = daemon_spec(&env, name, json!({}));
        s["identity"]["pid_path"] = json!(format!("{via}/{name}.pid"));
        s["control"]["start_cmd"] = json!("true");
        d.register("hid", name, s);
    }
    for name in &names {
        for op in [3, 0] {
            let r = d.call(
                "operate_proc",
                &json!({"meta": {"namespace": "hid", "name": name}, "op_type": op, "hosts": [Daemon::host()]}),
            );
            assert_eq!(r["result"], json!(true), "{r}");
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let h = d.get("/v1/healthz");
    eprintln!(
        "while stuck: {} blocked paths, hung_mounts {}",
        h["data"]["blocked_paths"].as_array().map_or(0, |a| a.len()),
        h["data"]["hung_mounts"]
    );
    // A healthy process elsewhere on "/" is started and stopped, in time.
    let healthy_pidfile = env.p("healthy.pid");
    d.register("hid", "healthy", daemon_spec(&env, "healthy", json!({})));
    for (op, what) in [(0, "start"), (1, "stop")] {
        let r = d.call(
            "operate_proc",
            &json!({"meta": {"namespace": "hid", "name": "healthy"}, "op_type": op, "hosts": [Daemon::host()]}),
        );
        let task = r["data"]["task_id"].as_str().expect("task id").to_string();
        let key = Daemon::key("hid", "healthy");
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        let v = loop {
            let v = d.call("get_proc_operate_result", &json!({ "task_id": task }))["data"][&key]
                .clone();
            if v["error_code"] != json!(115) || std::time::Instant::now() > deadline {
                break v;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let h = d.get("/v1/healthz");
        if v["error_code"] != json!(0) {
            let pid = read_pid(&healthy_pidfile);
            drop(fuse);
            if let Some(p) = pid {
                kill9(p);
            }
            panic!(
                "{what} of a healthy process failed while {STUCK} pid files hang behind /proc/PID/root: {v}\nhealthz: {h}"
            );
        }
    }
    drop(d);
    drop(fuse);
}

/// User+system CPU seconds of `pid` so far.
fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm.
    (t(11) + t(12)) / 100.0
}

/// process_status's work budget counts pattern tokens times rows, but each token test costs
/// the length of the value it is matched against, which nothing bounds: one row whose
/// bk_set_name label is 1,000,000 characters (any admin may label its own definitions so)
/// and a 65,001-token bk_set_name pattern (under the 65,536-character cap; work "65,001",
/// a three-hundredth of the budget) is 6.5e10 steps on a blocking thread, which keeps
/// burning a core long after the request timed out (408). A read-only caller can send it
/// again and again, one blocking thread each.
#[test]
fn a_reader_cannot_burn_cpu_with_an_expression_against_a_long_label() {
    if !accounts_available() {
        return;
    }
    let env = TestEnv::new();
    let cast = Cast::new();
    let cli = cli_copy(&env);
    let d = Daemon::start(&env, &cast.api_config("request_timeout = \"5s\"\n"));
    // The longest label value a definition may have now (a_label_value_is_bounded_at_registration).
    let long = "a".repeat(procagent::spec::MAX_LABEL_VALUE);
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": "long", "name": "p", "labels": {"bk_set_name": long, "bk_biz_id": "2"}},
                "hosts": [Daemon::host()], "spec": daemon_spec(&env, "p", json!({}))}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    assert_eq!(
        r["data"][Daemon::key("long", "p")]["error_code"],
        json!(0),
        "{r}"
    );
    let pattern = format!("*{}b", "a".repeat(65_000));
    let body = json!({"bk_biz_id": 2, "page": 1, "pagesize": 10,
        "expression_scope": {"bk_set_env": "*", "bk_set_name": pattern, "bk_module_name": "*",
        "service_instance_name": "*", "bk_process_name": "*", "bk_process_id": "*"}});
    // The reader may call process_status (a small query, through the socket)...
    let small = json!({"bk_biz_id": 2, "page": 1, "pagesize": 10});
    let (_, r, err) = call_as(&cli, &d.socket, &cast.reader, "process_status", &small);
    assert_eq!(r["result"], json!(true), "the reader may query: {r} {err}");
    // ...and the big one (too long for one argv string of the CLI, so sent here; the
    // reader's own client sends it the same way over the socket).
    let started = std::time::Instant::now();
    let r = d.http("POST", "/v1/process_status", body.to_string().as_bytes());
    let took = started.elapsed();
    eprintln!(
        "answer after {took:?}: {:?}",
        r.map(|(c, b)| (
            c,
            String::from_utf8_lossy(&b)
                .chars()
                .take(300)
                .collect::<String>()
        ))
    );
    let before = cpu_secs(d.pid());
    std::thread::sleep(Duration::from_secs(4));
    let burnt = cpu_secs(d.pid()) - before;
    assert!(
        burnt < 1.0,
        "after answering the reader's process_status (in {took:?}), the agent burnt {burnt:.1}s of CPU in 4s: matching goes on, unbounded by the work budget"
    );
}

/// Attacker review, round three: label values had no length limit, so any admin could make
/// every label match of every reader cost a megabyte. A definition's labels are bounded
/// where it is written: at most 64, names up to 128 bytes, values up to 1024.
#[test]
fn a_label_value_is_bounded_at_registration() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let long = "a".repeat(1_000_000);
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": "long", "name": "p", "labels": {"bk_set_name": long}},
                "hosts": [Daemon::host()], "spec": daemon_spec(&env, "p", json!({}))}),
    );
    let item = &r["data"][Daemon::key("long", "p")];
    assert_eq!(item["error_code"], json!(830), "{r}");
    let msg = item["error_msg"].as_str().unwrap_or("");
    assert!(
        msg.contains("meta.labels.bk_set_name") && msg.contains("1024"),
        "{msg}"
    );
    let r = d.call(
        "get_proc_status",
        &json!({"meta": {"namespace": "long", "name": "p"}, "hosts": [Daemon::host()]}),
    );
    assert!(
        !r.to_string().contains("aaaaaaaaaa"),
        "the refused definition was stored: {}",
        r.to_string().chars().take(300).collect::<String>()
    );
    // The bound as such: 1024 bytes is taken.
    let ok = "a".repeat(procagent::spec::MAX_LABEL_VALUE);
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": "long", "name": "q", "labels": {"bk_set_name": ok}},
                "hosts": [Daemon::host()], "spec": daemon_spec(&env, "q", json!({}))}),
    );
    assert_eq!(
        r["data"][Daemon::key("long", "q")]["error_code"],
        json!(0),
        "{r}"
    );
}
