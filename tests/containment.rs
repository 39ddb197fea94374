//! Containment (issue "Containment"): with `supervisor.cgroup_root` pointing at a cgroup v2
//! subtree the test creates for itself, each instance runs in its own cgroup, so whatever
//! it forks or daemonizes (new sessions included) is stopped with it and never leaks across
//! restarts. Needs root and a writable cgroup v2 hierarchy (here: /sys/fs/cgroup/unified,
//! with no controllers); skips with the reason otherwise. Never touches a cgroup outside the
//! test's own subtree, which it removes at the end.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cgroup::{FAST, Subtree};
use common::*;
use serde_json::{Value, json};

const NS: &str = "box";

fn setup(env: &TestEnv) -> Option<(Subtree, Daemon)> {
    let sub = Subtree::or_skip(env)?;
    let d = Daemon::start(env, &sub.config());
    let h = d.get("/v1/healthz");
    let mode = h["data"]["containment"].as_str().unwrap_or("").to_string();
    assert!(mode.starts_with("on at "), "containment is on: {h}");
    Some((sub, d))
}

/// Live processes whose executable is `exe`.
fn running(env: &TestEnv, exe: &str) -> Vec<i32> {
    env.processes()
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .map(|x| x.display().to_string() == exe)
                .unwrap_or(false)
                && proc_state(*p) != Some('Z')
        })
        .collect()
}

fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

fn spec(env: &TestEnv, start: String, pid_path: &str, proc_name: &str) -> Value {
    json!({
        "identity": {"proc_name": proc_name, "setup_path": env.path().display().to_string(), "pid_path": pid_path, "user": ""},
        "control": {"start_cmd": start, "stop_cmd": ""},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 5},
    })
}

/// A master that starts three workers, each in a session of its own (setsid), then execs:
/// over ten crashes of the master and an operator stop, no worker is left behind.
#[test]
fn a_master_with_setsid_workers_leaks_nothing_over_crashes_and_a_stop() {
    let env = TestEnv::new();
    let Some((sub, d)) = setup(&env) else { return };
    let worker = program_at(&env.path().join("bin"), "worker");
    let master = program_at(&env.path().join("bin"), "master");
    let script = env.script(
        "master.sh",
        &format!(
            "#!/bin/sh\nfor i in 1 2 3; do setsid {worker} 100000 </dev/null >/dev/null 2>&1 & done\nexec {master} 100000\n"
        ),
    );
    d.register(
        NS,
        "m",
        spec(&env, format!("exec sh {script}"), "", "master"),
    );
    let r = d.op(NS, "m", 0);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let mut pid = d.status(NS, "m")["pid"].as_i64().unwrap_or(-1) as i32;
    wait_for("three workers", Duration::from_secs(10), || {
        (running(&env, &worker).len() == 3).then_some(())
    });
    for round in 0..10 {
        kill9(pid);
        pid = wait_for(
            &format!("the master restarted (round {round})"),
            Duration::from_secs(20),
            || {
                let p = d.status(NS, "m")["pid"].as_i64()? as i32;
                (p > 0 && p != pid && alive(p) && running(&env, &master) == vec![p]).then_some(p)
            },
        );
        wait_for(
            &format!("exactly three workers (round {round})"),
            Duration::from_secs(20),
            || {
                let w = running(&env, &worker);
                assert!(w.len() <= 6, "workers pile up: {w:?}");
                (w.len() == 3).then_some(())
            },
        );
    }
    let r = d.op(NS, "m", 1);
    assert_eq!(r["error_code"], json!(0), "{r}");
    wait_for("nothing left", Duration::from_secs(20), || {
        (running(&env, &worker).is_empty() && running(&env, &master).is_empty()).then_some(())
    });
    assert!(
        sub.pids().is_empty(),
        "the subtree still holds {:?}",
        sub.pids()
    );
}

/// A daemon that double-forks into a session of its own, with children of its own: stop
/// ends all of them, though none is in the start command's session or process group.
#[test]
fn a_double_forking_daemon_and_its_children_are_all_stopped() {
    let env = TestEnv::new();
    let Some((sub, d)) = setup(&env) else { return };
    let child = program_at(&env.path().join("bin"), "child");
    let daemon = program_at(&env.path().join("bin"), "dmn");
    let pidfile = env.p("dmn.pid");
    let inner = env.script(
        "inner.sh",
        &format!(
            "#!/bin/sh\n{child} 100000 &\nsetsid {child} 100000 &\necho $$ > {pidfile}\nexec {daemon} 100000\n"
        ),
    );
    let start = format!("setsid sh {inner} </dev/null >/dev/null 2>&1 &");
    d.register(NS, "dmn", spec(&env, start, &pidfile, "dmn"));
    let r = d.op(NS, "dmn", 0);
    assert_eq!(r["error_code"], json!(0), "{r}");
    wait_for("daemon and two children", Duration::from_secs(10), || {
        (running(&env, &daemon).len() == 1 && running(&env, &child).len() == 2).then_some(())
    });
    let r = d.op(NS, "dmn", 1);
    assert_eq!(r["error_code"], json!(0), "{r}");
    wait_for("all stopped", Duration::from_secs(20), || {
        (running(&env, &daemon).is_empty() && running(&env, &child).is_empty()).then_some(())
    });
    assert!(sub.pids().is_empty(), "{:?}", sub.pids());
}

/// kill -9 of the agent while a slow restart_cmd runs (it has already ended the old daemon
/// and is about to start the new one): the next agent leaves exactly one copy running, never
/// a second start beside what the dead agent's restart_cmd started.
#[test]
fn a_restart_cmd_outliving_the_agent_is_never_followed_by_a_second_copy() {
    let env = TestEnv::new();
    let Some((sub, mut d)) = setup(&env) else {
        return;
    };
    let prog = program_at(&env.path().join("bin"), "svc");
    let pidfile = env.p("svc.pid");
    let mut s = spec(
        &env,
        format!("setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"),
        &pidfile,
        "svc",
    );
    s["control"]["restart_cmd"] = json!(format!(
        "kill $(cat {pidfile}); sleep 2; setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"
    ));
    s["monitor_policy"]["op_timeout"] = json!(10);
    d.register(NS, "svc", s);
    let r = d.op(NS, "svc", 0);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let old = d.status(NS, "svc")["pid"].as_i64().unwrap_or(-1) as i32;
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "svc"}, "op_type": 7, "hosts": [Daemon::host()]}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    wait_for(
        "the old copy ended by restart_cmd",
        Duration::from_secs(10),
        || (!alive(old)).then_some(()),
    );
    d.kill9();
    // The orphaned restart_cmd starts its copy meanwhile.
    wait_for("restart_cmd's copy", Duration::from_secs(10), || {
        (running(&env, &prog).len() == 1).then_some(())
    });
    let d = Daemon::start(&env, &sub.config());
    wait_for("one copy, managed", Duration::from_secs(30), || {
        let runs = running(&env, &prog);
        assert!(runs.len() <= 1, "two copies: {runs:?}");
        let st = d.status(NS, "svc");
        (runs.len() == 1 && st["pid"] == json!(runs[0])).then_some(())
    });
    // And it stays one.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(running(&env, &prog).len(), 1);
    d.op(NS, "svc", 1);
}

/// Unregistering removes a process's cgroups once they are empty; at start, the empty
/// cgroups of keys the agent no longer knows are removed, and one that still holds a process
/// is left alone.
#[test]
fn cgroups_of_unknown_keys_are_removed_once_empty_and_only_then() {
    let env = TestEnv::new();
    let Some(sub) = Subtree::or_skip(&env) else {
        return;
    };
    let stale = sub.root.join("procs/gone/old");
    std::fs::create_dir_all(stale.join("0")).unwrap();
    let busy = sub.root.join("procs/gone/busy/0");
    std::fs::create_dir_all(&busy).unwrap();
    let sleeper = program_at(&env.path().join("bin"), "held");
    let mut child = std::process::Command::new(&sleeper)
        .arg("100000")
        .spawn()
        .unwrap();
    std::fs::write(busy.join("cgroup.procs"), child.id().to_string()).unwrap();
    let d = Daemon::start(&env, &sub.config());
    wait_for("the stale cgroup removed", Duration::from_secs(10), || {
        (!stale.exists()).then_some(())
    });
    assert!(busy.exists(), "a cgroup holding a process was removed");
    let _ = child.kill();
    let _ = child.wait();
    // A registered process's cgroups go with its unregistration, once empty.
    d.register(
        NS,
        "u",
        spec(&env, format!("exec {sleeper} 100000"), "", "held"),
    );
    assert_eq!(d.op(NS, "u", 0)["error_code"], json!(0));
    let dir = sub.root.join(format!("procs/{NS}/u"));
    assert!(dir.join("0").exists());
    assert_eq!(d.op(NS, "u", 1)["error_code"], json!(0));
    let r = d.call(
        "unregister_proc_info",
        &json!({"meta": {"namespace": NS, "name": "u"}, "hosts": [Daemon::host()]}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    wait_for("its cgroups removed", Duration::from_secs(10), || {
        (!dir.exists()).then_some(())
    });
}

/// The figures of a contained process cover its whole cgroup: cpu burnt by a child (the main
/// process only sleeps) counts for the process, as do its processes; pressure stall figures
/// are reported where the kernel has PSI.
#[test]
fn cpu_done_by_a_child_counts_for_its_process() {
    let env = TestEnv::new();
    let Some(sub) = Subtree::or_skip(&env) else {
        return;
    };
    let config = format!("{}\n[metrics]\nsample_interval = \"200ms\"\n", sub.config());
    let d = Daemon::start(&env, &config);
    let main = program_at(&env.path().join("bin"), "idle");
    let script = env.script(
        "burn.sh",
        &format!("#!/bin/sh\n(while :; do :; done) &\nexec {main} 100000\n"),
    );
    d.register(
        NS,
        "burn",
        spec(&env, format!("exec sh {script}"), "", "idle"),
    );
    assert_eq!(d.op(NS, "burn", 0)["error_code"], json!(0));
    let detail = wait_for("the child's cpu counted", Duration::from_secs(20), || {
        let v = d.detail(NS, "burn");
        (v["figures_from"] == json!("cgroup") && v["cpu_usage"].as_f64()? > 30.0).then_some(v)
    });
    assert!(detail["processes"].as_u64().unwrap_or(0) >= 2, "{detail}");
    if Path::new("/proc/pressure/cpu").exists() {
        assert!(detail["psi_cpu"].is_number(), "{detail}");
    }
    let (_, body) = d.http("GET", "/metrics", b"").expect("metrics");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("procagent_process_processes{") && l.contains("name=\"burn\"")),
        "{text}"
    );
    d.op(NS, "burn", 1);
}

/// Processes an agent started with containment off are adopted, not started again, when an
/// agent with containment on takes over, and are moved into their instance's cgroup.
#[test]
fn processes_of_an_agent_without_containment_are_adopted_and_moved_in() {
    let env = TestEnv::new();
    let Some(sub) = Subtree::or_skip(&env) else {
        return;
    };
    let prog = program_at(&env.path().join("bin"), "old");
    let pidfile = env.p("old.pid");
    let mut d = Daemon::start(&env, &format!("[supervisor]\ncgroup_root = \"\"\n{FAST}"));
    d.register(
        NS,
        "old",
        spec(
            &env,
            format!("setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"),
            &pidfile,
            "old",
        ),
    );
    assert_eq!(d.op(NS, "old", 0)["error_code"], json!(0));
    let pid = d.status(NS, "old")["pid"].as_i64().unwrap_or(-1) as i32;
    d.terminate();
    let d = Daemon::start(&env, &sub.config());
    wait_for("adopted", Duration::from_secs(20), || {
        (d.status(NS, "old")["pid"] == json!(pid)).then_some(())
    });
    let want = sub.root.join(format!("procs/{NS}/old/0"));
    wait_for("moved into its cgroup", Duration::from_secs(10), || {
        procagent::cgroup::procs(&want).contains(&pid).then_some(())
    });
    assert_eq!(
        running(&env, &prog),
        vec![pid],
        "started again instead of adopted"
    );
    d.op(NS, "old", 1);
}

/// Point 5 of the ownership rule: a pid file naming a process in another definition's cgroup
/// (the same program from the same setup_path, a worker that definition does not track as
/// its main process) is not adopted, and stopping the definition leaves it alone.
#[test]
fn a_process_in_another_definitions_cgroup_is_never_adopted() {
    let env = TestEnv::new();
    let Some((_sub, d)) = setup(&env) else { return };
    let prog = program_at(&env.path().join("bin"), "twin");
    let (pa, pb, pw) = (env.p("a.pid"), env.p("b.pid"), env.p("worker.pid"));
    let a_start = format!(
        "setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pw}; setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pa}"
    );
    let b_start = format!("setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pb}");
    d.register(NS, "a", spec(&env, a_start, &pa, "twin"));
    d.register(NS, "b", spec(&env, b_start, &pb, "twin"));
    assert_eq!(d.op(NS, "a", 0)["error_code"], json!(0));
    let a = d.status(NS, "a")["pid"].as_i64().unwrap_or(-1) as i32;
    let worker = read_pid(&pw).expect("a's worker");
    assert_ne!(worker, a);
    std::fs::write(&pb, format!("{worker}\n")).unwrap();
    let v = d.op(NS, "b", 0);
    assert_eq!(
        v["error_code"],
        json!(0),
        "b's start is not 828 for a's worker: {v}"
    );
    let b = d.status(NS, "b")["pid"].as_i64().unwrap_or(-1) as i32;
    assert_ne!(b, worker);
    assert_eq!(d.op(NS, "b", 1)["error_code"], json!(0));
    wait_for("b stopped", Duration::from_secs(10), || {
        (!alive(b)).then_some(())
    });
    assert!(alive(worker), "stopping b ended a's worker");
    assert!(alive(a));
    d.op(NS, "a", 1);
}

/// A stop hears that a cgroup emptied from `cgroup.events` (inotify), without polling it.
#[test]
fn cgroup_events_tell_when_a_cgroup_empties() {
    let env = TestEnv::new();
    let Some(sub) = Subtree::or_skip(&env) else {
        return;
    };
    let dir = sub.root.join("w");
    std::fs::create_dir(&dir).unwrap();
    let prog = program_at(&env.path().join("bin"), "brief");
    let mut child = std::process::Command::new(&prog)
        .arg("100000")
        .spawn()
        .unwrap();
    std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
    assert_eq!(procagent::cgroup::populated(&dir), Some(true));
    let fd = procagent::cgroup::events_watch(&dir).expect("inotify watch");
    let _ = child.kill();
    let _ = child.wait();
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&fd),
        nix::poll::PollFlags::POLLIN,
    )];
    let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap_or(0);
    assert_eq!(n, 1, "no event within 5 s");
    assert_eq!(procagent::cgroup::populated(&dir), Some(false));
}

/// With containment the command is created inside its cgroup (`clone3` with
/// `CLONE_INTO_CGROUP`), and starts as any command does: no signal blocked, SIGPIPE not
/// ignored (the agent ignores it; what it runs must not), its environment, its cwd.
#[test]
fn a_contained_command_starts_clean_inside_its_cgroup() {
    let env = TestEnv::new();
    let Some((sub, d)) = setup(&env) else { return };
    let prog = program_at(&env.path().join("bin"), "clean");
    d.register(
        NS,
        "clean",
        spec(&env, format!("exec {prog} 100000"), "", "clean"),
    );
    assert_eq!(d.op(NS, "clean", 0)["error_code"], json!(0));
    let pid = d.status(NS, "clean")["pid"].as_i64().unwrap_or(-1) as i32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .expect(field)
    };
    assert_eq!(mask("SigBlk:"), 0, "no signal blocked");
    assert_eq!(
        mask("SigIgn:") & (1 << (13 - 1)),
        0,
        "SIGPIPE is not ignored"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    assert!(
        vars.contains(&&b"PROCAGENT_NAME=clean"[..]),
        "its environment"
    );
    assert!(
        vars.iter().any(|v| v.starts_with(b"PROCAGENT_SPAWN=")),
        "its lineage token"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        env.path()
    );
    let cg = sub.root.join(format!("procs/{NS}/clean/0"));
    assert!(procagent::cgroup::procs(&cg).contains(&pid));
    assert!(
        !d.log_text().contains("clone3 into a cgroup unavailable"),
        "clone3 was not used"
    );
    d.op(NS, "clean", 1);
}

/// The controllers of the test's subtree (`cgroup.controllers`: what its parent gives it).
fn controllers(sub: &Subtree) -> Vec<String> {
    std::fs::read_to_string(sub.root.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// [`setup`] where the subtree has controller `c`, else None with the reason printed (this
/// host keeps the controllers in its cgroup v1 hierarchies: the test stays for hosts with
/// them).
fn setup_with(env: &TestEnv, c: &str, extra: &str) -> Option<(Subtree, Daemon)> {
    let sub = Subtree::or_skip(env)?;
    if !controllers(&sub).iter().any(|x| x == c) {
        eprintln!(
            "skipped: the {c} controller is not available in {} (cgroup.controllers: {:?}; on this host the controllers are bound to cgroup v1)",
            sub.root.display(),
            controllers(&sub)
        );
        return None;
    }
    let d = Daemon::start(env, &format!("{}{extra}", sub.config()));
    let h = d.get("/v1/healthz");
    let mode = h["data"]["containment"].as_str().unwrap_or("").to_string();
    assert!(
        mode.starts_with("on at ") && mode.contains(c),
        "containment is on with {c} enabled: {h}"
    );
    Some((sub, d))
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .expect("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("MemTotal")
        * 1024
}

/// A python3 process that allocates `mb` MiB in 4 MiB steps, then idles.
fn allocator(env: &TestEnv, name: &str, mb: u64) -> String {
    let py = env.script(
        &format!("{name}.py"),
        &format!(
            "import time\nheld = []\nfor _ in range({}):\n    held.append(bytearray(4 << 20))\n    time.sleep(0.02)\ntime.sleep(100000)\n",
            mb / 4
        ),
    );
    format!("exec python3 {py}")
}

/// Without the controllers, limits are polled, and status says so for each limit; with
/// them, memory.high carries mem_lmt (and cpu stays polled under the default cpu_limit).
#[test]
fn each_process_says_how_its_limits_are_enforced() {
    let env = TestEnv::new();
    let Some((sub, d)) = setup(&env) else { return };
    let prog = program_at(&env.path().join("bin"), "lim");
    let mut s = spec(&env, format!("exec {prog} 100000"), "", "lim");
    s["resource"] = json!({"mem": 50, "cpu": 90});
    d.register(NS, "lim", s);
    let mut none = spec(&env, format!("exec {prog} 100000"), "", "lim");
    none["identity"]["proc_name"] = json!("free");
    d.register(NS, "free", none);
    let v = d.detail(NS, "lim");
    let memory = controllers(&sub).iter().any(|c| c == "memory");
    assert_eq!(
        v["mem_limit_by"],
        json!(if memory { "memory.high" } else { "polled" }),
        "{v}"
    );
    assert_eq!(v["cpu_limit_by"], json!("polled"), "{v}");
    let f = d.detail(NS, "free");
    assert_eq!(
        (&f["mem_limit_by"], &f["cpu_limit_by"]),
        (&json!("none"), &json!("none")),
        "{f}"
    );
    let h = d.get("/v1/healthz");
    let mode = h["data"]["containment"].as_str().unwrap_or("");
    if !memory {
        assert!(mode.contains("controllers: none"), "{h}");
    }
    // /metrics says the mode and the controllers.
    let (_, body) = d.http("GET", "/metrics", b"").expect("metrics");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.lines().any(|l| l.starts_with("procagent_containment{")
            && l.contains("mode=\"on\"")
            && l.contains(&format!("root=\"{}\"", sub.root.display()))),
        "{text}"
    );
    // The CLI's status --json carries the same fields.
    let (code, out, err) = d.cli(&["status", "--json", &format!("{NS}/lim")]);
    assert!(out.contains("\"mem_limit_by\""), "{code} {out} {err}");
}

/// With the memory controller, mem_lmt is the instance cgroup's memory.high, memory.max is
/// above it by the margin, and reaching memory.high runs the stop path at once (the polled
/// check, every 3 s and after two samples, would come later); the process is restarted.
#[test]
fn memory_high_runs_the_stop_path_at_once() {
    let env = TestEnv::new();
    let Some((sub, d)) = setup_with(
        &env,
        "memory",
        "memory_max_margin = 50\n[metrics]\nlimit_samples = 1000\n",
    ) else {
        return;
    };
    // 64 MiB as percent of MemTotal.
    let lmt = 64.0 * (1u64 << 20) as f64 / mem_total() as f64 * 100.0;
    let mut s = spec(&env, allocator(&env, "grow", 160), "", "python3");
    s["resource"] = json!({"mem": lmt});
    d.register(NS, "grow", s);
    assert_eq!(d.op(NS, "grow", 0)["error_code"], json!(0));
    let dir = sub.root.join(format!("procs/{NS}/grow/0"));
    let high: u64 = std::fs::read_to_string(dir.join("memory.high"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(high.abs_diff(64 << 20) < 1 << 20, "memory.high {high}");
    let max: u64 = std::fs::read_to_string(dir.join("memory.max"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(max, high * 3 / 2);
    let first = d.status(NS, "grow")["pid"].as_i64().unwrap_or(-1);
    let ev = wait_for("a memory.high breach", Duration::from_secs(60), || {
        d.events(&format!("{NS}/grow"))
            .into_iter()
            .find(|e| e["kind"] == json!("limit_exceeded"))
    });
    assert!(
        ev["message"].as_str().unwrap_or("").contains("memory.high"),
        "{ev}"
    );
    wait_for("restarted", Duration::from_secs(60), || {
        let p = d.status(NS, "grow")["pid"].as_i64()?;
        (p > 0 && p != first).then_some(())
    });
    assert!(d.detail(NS, "grow")["limit_stops"].as_u64().unwrap_or(0) >= 1);
    d.op(NS, "grow", 1);
}

/// memory.max is the backstop while stop_cmd runs: a process that goes on allocating past
/// it is killed by the OOM killer (its whole cgroup), and status and events say so.
#[test]
fn an_oom_kill_is_reported_as_one() {
    let env = TestEnv::new();
    let Some((_sub, d)) = setup_with(&env, "memory", "memory_max_margin = 10\n") else {
        return;
    };
    let lmt = 32.0 * (1u64 << 20) as f64 / mem_total() as f64 * 100.0;
    let mut s = spec(&env, allocator(&env, "hog", 400), "", "python3");
    s["resource"] = json!({"mem": lmt});
    // A stop that takes its time: the kernel's limit acts before it.
    s["control"]["stop_cmd"] = json!("sleep 30");
    s["monitor_policy"]["auto_type"] = json!(2);
    d.register(NS, "hog", s);
    d.op(NS, "hog", 0);
    let ev = wait_for("an oom_kill event", Duration::from_secs(90), || {
        d.events(&format!("{NS}/hog"))
            .into_iter()
            .find(|e| e["kind"] == json!("oom_kill"))
    });
    assert!(ev["message"].as_str().unwrap_or("").contains("OOM"), "{ev}");
    wait_for(
        "the exit told as an OOM kill",
        Duration::from_secs(60),
        || {
            let v = d.detail(NS, "hog");
            v["last_exit"]
                .as_str()?
                .contains("OOM killer")
                .then_some(())
        },
    );
}

/// With `cpu_limit = "throttle"` and the cpu controller, cpu_lmt is cpu.max and a process
/// over it keeps running (never stopped for cpu).
#[test]
fn cpu_throttle_sets_cpu_max_and_never_stops() {
    let env = TestEnv::new();
    let Some((sub, d)) = setup_with(
        &env,
        "cpu",
        "cpu_limit = \"throttle\"\n[metrics]\nsample_interval = \"200ms\"\nlimit_samples = 2\n",
    ) else {
        return;
    };
    let main = program_at(&env.path().join("bin"), "spin");
    let script = env.script(
        "spin.sh",
        &format!("#!/bin/sh\n(while :; do :; done) &\nexec {main} 100000\n"),
    );
    let mut s = spec(&env, format!("exec sh {script}"), "", "spin");
    s["resource"] = json!({"cpu": 10});
    d.register(NS, "spin", s);
    assert_eq!(d.op(NS, "spin", 0)["error_code"], json!(0));
    let pid = d.status(NS, "spin")["pid"].as_i64().unwrap_or(-1);
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let want = format!("{} 100000", 100_000 * cpus / 10);
    let got = std::fs::read_to_string(sub.root.join(format!("procs/{NS}/spin/0/cpu.max"))).unwrap();
    assert_eq!(got.trim(), want);
    assert_eq!(d.detail(NS, "spin")["cpu_limit_by"], json!("cpu.max"));
    // Ten samples later: the same process, no limit stop.
    let start = std::time::Instant::now();
    wait_for("ten samples", Duration::from_secs(20), || {
        (start.elapsed() > Duration::from_secs(2)).then_some(())
    });
    let v = d.detail(NS, "spin");
    assert_eq!(v["pids"][0].as_i64(), Some(pid), "{v}");
    assert_eq!(v["limit_stops"], json!(0), "{v}");
    d.op(NS, "spin", 1);
}

/// A process adopted from a cgroup that has a limit of its own (here pids.max) is left
/// there: moving it into the agent's cgroup would free it of that limit.
#[test]
fn an_adopted_process_is_not_moved_out_of_a_limited_cgroup() {
    let env = TestEnv::new();
    let Some(sub) = Subtree::or_skip(&env) else {
        return;
    };
    if !controllers(&sub).iter().any(|c| c == "pids") {
        eprintln!(
            "skipped: the pids controller is not available in {} (on this host the controllers are bound to cgroup v1)",
            sub.root.display()
        );
        return;
    }
    // The agent's tree and a limited cgroup beside it, both in the test's subtree.
    std::fs::write(sub.root.join("cgroup.subtree_control"), "+pids").unwrap();
    let outer = sub.root.join("outer");
    std::fs::create_dir(&outer).unwrap();
    std::fs::write(outer.join("pids.max"), "1000").unwrap();
    let agent_root = sub.root.join("agent");
    std::fs::create_dir(&agent_root).unwrap();
    let prog = program_at(&env.path().join("bin"), "kept");
    let pidfile = env.p("kept.pid");
    let mut child = std::process::Command::new(&prog)
        .arg("100000")
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    std::fs::write(outer.join("cgroup.procs"), pid.to_string()).unwrap();
    std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
    let d = Daemon::start(
        &env,
        &format!(
            "[supervisor]\ncgroup_root = \"{}\"\n{FAST}",
            agent_root.display()
        ),
    );
    d.register(
        NS,
        "kept",
        spec(&env, format!("exec {prog} 100000"), &pidfile, "kept"),
    );
    wait_for("adopted", Duration::from_secs(20), || {
        (d.status(NS, "kept")["pid"] == json!(pid)).then_some(())
    });
    let ev = wait_for("not_contained", Duration::from_secs(10), || {
        d.events(&format!("{NS}/kept"))
            .into_iter()
            .find(|e| e["kind"] == json!("not_contained"))
    });
    assert!(
        ev["message"].as_str().unwrap_or("").contains("pids.max"),
        "{ev}"
    );
    assert!(procagent::cgroup::procs(&outer).contains(&pid));
    let _ = child.kill();
    let _ = child.wait();
}

/// With containment the network figures cover every process of the instance's cgroup: a
/// child that daemonized itself away (reparented, no longer a descendant by parent links)
/// still counts for its process.
#[test]
fn tcp_bytes_of_a_daemonized_child_count_for_its_process() {
    use std::io::Read;
    const N: usize = 200_000;
    let env = TestEnv::new();
    let Some(sub) = Subtree::or_skip(&env) else {
        return;
    };
    let config = format!("{}\n[metrics]\nsample_interval = \"200ms\"\n", sub.config());
    let d = Daemon::start(&env, &config);
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return };
        let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
    });
    let main = program_at(&env.path().join("bin"), "idle");
    let talker = env.script(
        "talker.py",
        &format!(
            "import socket, time\nc = socket.create_connection(('127.0.0.1', {port}))\nc.sendall(b'x' * {N})\ntime.sleep(100000)\n"
        ),
    );
    // The subshell exits at once: the talker is reparented to the agent (the subreaper).
    let script = env.script(
        "net.sh",
        &format!("#!/bin/sh\n( setsid python3 {talker} </dev/null >/dev/null 2>&1 & )\nexec {main} 100000\n"),
    );
    d.register(
        NS,
        "net",
        spec(&env, format!("exec sh {script}"), "", "idle"),
    );
    assert_eq!(d.op(NS, "net", 0)["error_code"], json!(0));
    let v = wait_for(
        "the daemonized child's bytes",
        Duration::from_secs(30),
        || {
            let v = d.detail(NS, "net");
            (v["figures_from"] == json!("cgroup") && v["net_sent_bytes"].as_u64()? >= N as u64)
                .then_some(v)
        },
    );
    assert_eq!(v["net_sockets"], json!(1), "{v}");
    assert!(
        v["net_sent_bytes"].as_u64().unwrap_or(0) < N as u64 + 1024,
        "{v}"
    );
    d.op(NS, "net", 1);
}
