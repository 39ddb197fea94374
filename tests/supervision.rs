//! Supervision: managed processes stay alive, exits are noticed at once, operator intent wins,
//! the agent's own restarts and crashes re-adopt instead of restarting, stops end whole trees.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const NS: &str = "sup";

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The agent reaps everything: no zombie child of it remains (polled: the reaper runs on
/// SIGCHLD and its periodic sweep).
fn no_zombies(d: &Daemon) {
    wait_for(
        "no zombie children of the agent",
        Duration::from_secs(5),
        || zombies_of(d.pid()).is_empty().then_some(()),
    );
}

fn event_kinds(d: &Daemon, key: &str) -> Vec<String> {
    d.events(key)
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A managed, running daemonizing process; returns its pid.
fn managed(d: &Daemon, env: &TestEnv, name: &str) -> i32 {
    d.register(NS, name, daemon_spec(env, name, json!({})));
    let r = d.op(NS, name, 0);
    assert_eq!(r["error_code"], json!(0), "start {name}: {r}");
    read_pid(&env.p(&format!("{name}.pid"))).expect("pid")
}

#[test]
fn a_killed_resident_process_is_restarted_at_once() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let pid = managed(&d, &env, "res1");
    assert_eq!(
        d.get("/v1/healthz")["data"]["exit_detection"],
        json!("pidfd")
    );
    let t = Instant::now();
    kill9(pid);
    let new = wait_for("a new process", Duration::from_secs(10), || {
        read_pid(&env.p("res1.pid")).filter(|p| *p != pid && alive(*p))
    });
    eprintln!("replacement running after {:?}", t.elapsed());
    wait_for("status shows the new pid", Duration::from_secs(10), || {
        let st = d.status(NS, "res1");
        (st["pid"] == json!(new) && st["status"] == json!(1)).then_some(())
    });
    wait_for(
        "restarted event (after the start check)",
        Duration::from_secs(10),
        || kinds_contains(&d, "sup/res1", "restarted").then_some(()),
    );
    let det = d.detail(NS, "res1");
    assert_eq!(det["restarts"], json!(1), "{det}");
    let kinds = event_kinds(&d, "sup/res1");
    assert!(
        kinds.contains(&"exited".to_string()) && kinds.contains(&"restarted".to_string()),
        "{kinds:?}"
    );
    let exited = d
        .events("sup/res1")
        .into_iter()
        .find(|e| e["kind"] == json!("exited"))
        .unwrap();
    assert_eq!(
        exited["data"]["exit"],
        json!({"kind": "signal", "value": 9}),
        "exit recorded: {exited}"
    );
    // Only one process runs.
    let progs: Vec<i32> = env
        .processes()
        .into_iter()
        .filter(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|x| x.ends_with("res1")))
        .collect();
    assert_eq!(progs, vec![new]);
    assert!(zombies_of(d.pid()).is_empty());
    no_zombies(&d);
}

#[test]
fn a_child_process_without_pid_file_is_restarted_with_its_exit_code() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let prog = env.program("fg1");
    let script = env.script("fg1.sh", &format!("#!/bin/sh\nexec {prog} 100000\n"));
    let spec = json!({
        "identity": {"proc_name": "fg1", "setup_path": env.path().display().to_string(), "pid_path": ""},
        "control": {"start_cmd": script},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
    });
    d.register(NS, "fg1", spec);
    assert_eq!(d.op(NS, "fg1", 0)["error_code"], json!(0));
    let pid = d.status(NS, "fg1")["pid"].as_i64().unwrap() as i32;
    assert_eq!(
        ppid(pid),
        Some(d.pid()),
        "a foreground process is the agent's child"
    );
    // exit code of a child is known
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("restarted", Duration::from_secs(10), || {
        let p = d.status(NS, "fg1")["pid"].as_i64().unwrap_or(-1) as i32;
        (p > 0 && p != pid).then_some(())
    });
    let exited = d
        .events("sup/fg1")
        .into_iter()
        .find(|e| e["kind"] == json!("exited"))
        .unwrap();
    assert_eq!(
        exited["data"]["exit"],
        json!({"kind": "signal", "value": 15}),
        "{exited}"
    );
    no_zombies(&d);
}

#[test]
fn a_crash_loop_backs_off_with_growing_bounded_delays() {
    let env = TestEnv::new();
    let d = Daemon::start(
        &env,
        "[supervisor]\nbackoff_initial = \"200ms\"\nbackoff_max = \"800ms\"\nbackoff_jitter = 0.0\nbackoff_reset = \"30s\"\n",
    );
    let prog = env.program("crashy");
    let pidfile = env.p("crashy.pid");
    let spec = json!({
        "identity": {"proc_name": "crashy", "setup_path": env.path().display().to_string(), "pid_path": pidfile},
        "control": {"start_cmd": format!("setsid {prog} 0.1 & echo $! > {pidfile}")},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 0, "op_timeout": 10},
    });
    d.register(NS, "crashy", spec);
    assert_eq!(d.op(NS, "crashy", 3)["error_code"], json!(0));
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Starts (job or restart attempts) in order, with their times.
    let starts: Vec<i64> = d
        .events("sup/crashy")
        .iter()
        .filter(|e| {
            matches!(
                e["kind"].as_str(),
                Some("started" | "restarted" | "start_failed")
            )
        })
        .map(|e| e["ts_ms"].as_i64().unwrap())
        .collect();
    assert!(starts.len() >= 5, "kept retrying: {starts:?}");
    assert!(
        starts.len() < 30,
        "no fork storm: {} starts in 6 s",
        starts.len()
    );
    let gaps: Vec<i64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // Gaps grow (allowing scheduling noise) and stay bounded by the cap (+ process run time).
    let late = &gaps[gaps.len().saturating_sub(3)..];
    assert!(
        late.iter().all(|g| *g >= 600),
        "delays grew to the cap: {gaps:?}"
    );
    assert!(
        gaps.iter().all(|g| *g <= 800 + 100 + 1500),
        "delays bounded: {gaps:?}"
    );
    assert!(gaps[0] < late[0], "delays grew: {gaps:?}");
    let det = d.detail(NS, "crashy");
    assert!(det["restarts"].as_u64().unwrap() >= 4, "{det}");
    assert!(det["consecutive_failures"].as_u64().unwrap() >= 3, "{det}");
    assert!(kinds_contains(&d, "sup/crashy", "backoff"));
    // The operator stops it: no more restarts, reported stopped (not crashed).
    d.op(NS, "crashy", 1);
    let n = d.events("sup/crashy").len();
    std::thread::sleep(Duration::from_millis(1500));
    let after: Vec<String> = d.events("sup/crashy")[n..]
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !after.iter().any(|k| k == "restarted" || k == "started"),
        "{after:?}"
    );
    let det = d.detail(NS, "crashy");
    assert_eq!(
        (det["managed"].clone(), det["state"].clone()),
        (json!(false), json!("stopped")),
        "{det}"
    );
    no_zombies(&d);
}

fn kinds_contains(d: &Daemon, key: &str, kind: &str) -> bool {
    event_kinds(d, key).iter().any(|k| k == kind)
}

#[test]
fn a_periodic_process_runs_every_cycle_and_never_overlaps() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let log = env.p("periodic.log");
    // Every other run takes longer than the cycle.
    let script = env.script(
        "job.sh",
        &format!(
            "#!/bin/sh\nn=$(cat {log} 2>/dev/null | wc -l)\necho \"start $(date +%s%N)\" >> {log}\nif [ $((n % 4)) -eq 0 ]; then sleep 1.5; else sleep 0.1; fi\necho \"end $(date +%s%N)\" >> {log}\n"
        ),
    );
    let spec = json!({
        "identity": {"proc_name": "job.sh", "setup_path": env.path().display().to_string(), "pid_path": ""},
        "control": {"start_cmd": script},
        "monitor_policy": {"auto_type": 0, "cycle_time": 1, "start_check_secs": 0, "op_timeout": 10},
    });
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "job"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(
        r["data"][Daemon::key(NS, "job")]["error_code"],
        json!(0),
        "{r}"
    );
    assert_eq!(d.op(NS, "job", 3)["error_code"], json!(0));
    std::thread::sleep(Duration::from_millis(6500));
    d.op(NS, "job", 4);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut last_end = 0u128;
    let mut starts = Vec::new();
    let mut open = false;
    for l in text.lines() {
        let (kind, t) = l.split_once(' ').unwrap();
        let t: u128 = t.parse().unwrap();
        match kind {
            "start" => {
                assert!(!open, "runs overlapped:\n{text}");
                assert!(t >= last_end, "runs overlapped:\n{text}");
                open = true;
                starts.push(t);
            }
            _ => {
                open = false;
                last_end = t;
            }
        }
    }
    assert!(
        starts.len() >= 4 && starts.len() <= 8,
        "about one run per second: {} in 6.5 s\n{text}",
        starts.len()
    );
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= 900),
        "never more often than cycle_time: {gaps:?}"
    );
    assert!(
        kinds_contains(&d, "sup/job", "cycle_skipped"),
        "{:?}",
        event_kinds(&d, "sup/job")
    );
    no_zombies(&d);
}

#[test]
fn a_single_run_process_is_not_restarted() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let log = env.p("once.log");
    let script = env.script(
        "once.sh",
        &format!("#!/bin/sh\necho ran >> {log}\nsleep 0.3\nexit 3\n"),
    );
    let spec = json!({
        "identity": {"proc_name": "once.sh", "setup_path": env.path().display().to_string(), "pid_path": ""},
        "control": {"start_cmd": script},
        "monitor_policy": {"auto_type": 2, "start_check_secs": 0, "op_timeout": 10},
    });
    d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "once"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(d.op(NS, "once", 3)["error_code"], json!(0));
    wait_for("it ran", Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("ran"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        1,
        "ran exactly once"
    );
    let det = d.detail(NS, "once");
    assert_eq!(det["state"], json!("completed"), "{det}");
    assert!(
        det["last_exit"].as_str().unwrap().contains("exit code 3"),
        "{det}"
    );
    no_zombies(&d);
}

#[test]
fn instance_num_keeps_that_many_running() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let prog = env.program("multi");
    let spec = json!({
        "identity": {"proc_name": "multi", "setup_path": env.path().display().to_string(), "pid_path": ""},
        "control": {"start_cmd": format!("exec {prog} 100000")},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 0, "op_timeout": 10, "instance_num": 3},
    });
    d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "multi"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(d.op(NS, "multi", 3)["error_code"], json!(0));
    let pids = wait_for("3 instances", Duration::from_secs(10), || {
        let det = d.detail(NS, "multi");
        let p: Vec<i64> = det["pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        (p.len() == 3).then_some(p)
    });
    assert_eq!(d.detail(NS, "multi")["instance_num"], json!(3));
    kill9(pids[1] as i32);
    wait_for("back to 3", Duration::from_secs(10), || {
        let det = d.detail(NS, "multi");
        let p: Vec<i64> = det["pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        (p.len() == 3 && !p.contains(&pids[1]) && p.iter().all(|x| alive(*x as i32))).then_some(())
    });
    assert_eq!(d.op(NS, "multi", 1)["error_code"], json!(0));
    assert!(pids.iter().all(|p| !alive(*p as i32)));
    no_zombies(&d);
}

#[test]
fn agent_kill_9_readopts_twenty_processes_without_restarting_them() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    let mut pids = Vec::new();
    for i in 0..20 {
        let name = format!("m{i}");
        d.register(NS, &name, daemon_spec(&env, &name, json!({})));
    }
    // Start them all in one go through tasks.
    let tasks: Vec<String> = (0..20)
        .map(|i| {
            let r = d.call(
                "operate_proc",
                &json!({"meta": {"namespace": NS, "name": format!("m{i}")}, "op_type": 0, "hosts": [Daemon::host()]}),
            );
            r["data"]["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(
            d.wait_task(t, &Daemon::key(NS, &format!("m{i}")))["error_code"],
            json!(0)
        );
        pids.push(read_pid(&env.p(&format!("m{i}.pid"))).unwrap());
    }
    d.kill9();
    let d = Daemon::start(&env, "");
    for (i, pid) in pids.iter().enumerate() {
        let name = format!("m{i}");
        let st = d.status(NS, &name);
        assert_eq!(
            (st["status"].clone(), st["pid"].clone()),
            (json!(1), json!(pid)),
            "{name}: {st}"
        );
        let det = d.detail(NS, &name);
        assert_eq!(det["restarts"], json!(0), "{det}");
        assert!(alive(*pid));
        assert_eq!(
            read_pid(&env.p(&format!("{name}.pid"))),
            Some(*pid),
            "not restarted"
        );
    }
    // None duplicated: exactly 20 fixture processes.
    std::thread::sleep(Duration::from_millis(500));
    let n = env
        .processes()
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|x| {
                x.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with('m'))
            })
        })
        .count();
    assert_eq!(n, 20);
    // And supervision still works for adopted processes.
    kill9(pids[3]);
    wait_for("adopted process restarted", Duration::from_secs(10), || {
        read_pid(&env.p("m3.pid")).filter(|p| *p != pids[3] && alive(*p))
    });
    no_zombies(&d);
}

#[test]
fn sigterm_and_binary_replacement_leave_processes_running_and_readopted() {
    let env = TestEnv::new();
    // Run the daemon from a copy of its binary, which we replace while it runs.
    let bin = env.path().join("procagentd-copy");
    std::fs::copy(DAEMON, &bin).unwrap();
    let mut d = Daemon::start(&env, "");
    let pid = managed(&d, &env, "keep");
    let st = d.terminate().expect("daemon exited");
    assert!(st.success(), "clean exit on SIGTERM: {st:?}");
    assert!(
        alive(pid),
        "SIGTERM to the agent must not kill managed processes"
    );
    // Restart (the binary on disk "replaced": a fresh copy at the same path).
    std::fs::remove_file(&bin).unwrap();
    std::fs::copy(DAEMON, &bin).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.path().join("daemon2.log"))
        .unwrap();
    let mut child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&d.config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for("daemon up", Duration::from_secs(20), || {
        d.try_get("/v1/healthz")
            .ok()
            .filter(|v| v["result"] == json!(true))
    });
    let st = d.status(NS, "keep");
    assert_eq!(
        (st["status"].clone(), st["pid"].clone()),
        (json!(1), json!(pid)),
        "{st}"
    );
    assert!(kinds_contains(&d, "sup/keep", "adopted"));
    let _ = child.kill();
    let _ = child.wait();
    no_zombies(&d);
}

#[test]
fn stop_ends_the_whole_tree_even_when_sigterm_is_ignored() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let pidfile = env.p("stubborn.pid");
    let childfile = env.p("stubborn.child");
    let prog = env.program("stubchild");
    let script = env.script(
        "stubborn.sh",
        &format!("#!/bin/sh\ntrap '' TERM\n{prog} 100000 &\necho $! > {childfile}\necho $$ > {pidfile}\nwhile :; do sleep 0.2; done\n"),
    );
    let spec = json!({
        "identity": {"proc_name": "stubborn.sh", "setup_path": env.path().display().to_string(), "pid_path": pidfile},
        "control": {"start_cmd": format!("setsid {script} >/dev/null 2>&1 &")},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 1},
    });
    d.register(NS, "stubborn", spec);
    assert_eq!(d.op(NS, "stubborn", 0)["error_code"], json!(0));
    let main = read_pid(&pidfile).unwrap();
    let child = read_pid(&childfile).unwrap();
    assert!(alive(main) && alive(child));
    let t = Instant::now();
    let r = d.op(NS, "stubborn", 1);
    assert_eq!(r["error_code"], json!(0), "{r}");
    assert!(
        r["error_msg"].as_str().unwrap().contains("SIGKILL"),
        "reports the step: {r}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "waited op_timeout before SIGKILL"
    );
    assert!(!alive(main) && !alive(child), "the child was killed too");
    assert_eq!(d.status(NS, "stubborn")["status"], json!(2));
    wait_for("no zombies", Duration::from_secs(5), || {
        zombies_of(d.pid()).is_empty().then_some(())
    });
    no_zombies(&d);
}

#[test]
fn a_managed_process_with_a_stale_pid_file_starts_fresh_without_touching_the_stranger() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    let pid = managed(&d, &env, "st1");
    // Agent down; the process dies; its pid file now names another program.
    d.kill9();
    kill9(pid);
    wait_for("dead", Duration::from_secs(5), || {
        (!alive(pid)).then_some(())
    });
    let stranger_prog = env.program("stranger");
    let mut stranger = std::process::Command::new(&stranger_prog)
        .arg("100000")
        .spawn()
        .unwrap();
    let spid = stranger.id() as i32;
    std::fs::write(env.p("st1.pid"), format!("{spid}\n")).unwrap();
    let d = Daemon::start(&env, "");
    let new = wait_for("fresh start", Duration::from_secs(10), || {
        read_pid(&env.p("st1.pid")).filter(|p| *p != spid && alive(*p))
    });
    assert_ne!(new, pid);
    assert!(alive(spid), "the unrelated process must not be signalled");
    wait_for("status shows it", Duration::from_secs(10), || {
        (d.status(NS, "st1")["pid"] == json!(new)).then_some(())
    });
    let _ = stranger.kill();
    let _ = stranger.wait();
    no_zombies(&d);
}

#[test]
fn poll_mode_detects_exits_and_reports_itself() {
    let env = TestEnv::new();
    let d = Daemon::start(
        &env,
        "[supervisor]\nexit_detection = \"poll\"\npoll_interval = \"50ms\"\n",
    );
    assert_eq!(
        d.get("/v1/healthz")["data"]["exit_detection"],
        json!("poll")
    );
    let pid = managed(&d, &env, "poll1");
    kill9(pid);
    wait_for("restarted in poll mode", Duration::from_secs(10), || {
        read_pid(&env.p("poll1.pid")).filter(|p| *p != pid && alive(*p))
    });
    no_zombies(&d);
}

#[test]
fn events_stream_as_ndjson() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "ev1", daemon_spec(&env, "ev1", json!({})));
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /v1/events?follow=1&key=sup%2Fev1 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        head.push_str(&l);
        if l == "\r\n" {
            break;
        }
    }
    assert!(head.contains("application/x-ndjson"), "{head}");
    d.op(NS, "ev1", 0);
    // chunked: size line, then the JSON line
    let mut kinds = Vec::new();
    let end = Instant::now() + Duration::from_secs(15);
    while !kinds.iter().any(|k: &String| k == "started") && Instant::now() < end {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap() == 0 {
            break;
        }
        if let Ok(v) = serde_json::from_str::<Value>(l.trim())
            .map_err(|_| ())
            .and_then(|v| if v.is_object() { Ok(v) } else { Err(()) })
        {
            assert_eq!(v["key"], json!("sup/ev1"));
            kinds.push(v["kind"].as_str().unwrap().to_string());
        }
    }
    assert!(kinds.contains(&"registered".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"started".to_string()), "{kinds:?}");
    d.op(NS, "ev1", 1);
    no_zombies(&d);
}

#[test]
fn a_config_process_already_running_is_adopted_not_duplicated() {
    let env = TestEnv::new();
    let pidfile = env.p("pre.pid");
    let start = env.daemon_start_cmd("pre", &pidfile);
    // Started by hand before the agent exists.
    std::process::Command::new("sh")
        .arg("-c")
        .arg(&start)
        .status()
        .unwrap();
    let pid = wait_for("pre-started", Duration::from_secs(5), || {
        read_pid(&pidfile).filter(|p| alive(*p))
    });
    let extra = format!(
        "[[process]]\nnamespace = \"{NS}\"\nname = \"pre\"\nsetup_path = \"{}\"\nproc_name = \"pre\"\npid_path = \"{pidfile}\"\nstart_cmd = \"{}\"\nstart_check_secs = 1\n",
        env.path().display(),
        start.replace('"', "\\\"")
    );
    let d = Daemon::start(&env, &extra);
    wait_for("adopted", Duration::from_secs(10), || {
        (d.status(NS, "pre")["pid"] == json!(pid)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.status(NS, "pre")["pid"], json!(pid));
    assert_eq!(
        d.status(NS, "pre")["isauto"],
        json!(true),
        "autostart manages it"
    );
    let n = env
        .processes()
        .into_iter()
        .filter(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|x| x.ends_with("pre")))
        .count();
    assert_eq!(n, 1, "no duplicate started");
    no_zombies(&d);
}

#[test]
fn a_wrong_proc_name_fails_the_start_without_leaving_copies() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let mut spec = daemon_spec(&env, "realprog", json!({}));
    spec["identity"]["proc_name"] = json!("othername");
    spec["monitor_policy"]["op_timeout"] = json!(2);
    d.register(NS, "wrong", spec);
    let r = d.op(NS, "wrong", 0);
    assert_eq!(r["error_code"], json!(836), "{r}");
    assert!(
        r["error_msg"].as_str().unwrap().contains("was killed"),
        "{r}"
    );
    let pid = read_pid(&env.p("realprog.pid")).unwrap();
    wait_for("the stray copy is gone", Duration::from_secs(5), || {
        (!alive(pid)).then_some(())
    });
    assert!(kinds_contains(&d, "sup/wrong", "stray_killed"));
    no_zombies(&d);
}

/// Pid-file opens in `dir` reported by `inotify` so far (events for `*.pid` names).
fn pid_file_opens(inotify: &std::os::fd::OwnedFd) -> usize {
    use rustix::fs::inotify;
    let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
    let mut reader = inotify::Reader::new(inotify, &mut buf);
    let mut n = 0;
    loop {
        match reader.next() {
            Ok(ev) => {
                if ev
                    .file_name()
                    .is_some_and(|f| f.to_bytes().ends_with(b".pid"))
                {
                    n += 1;
                }
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return n,
            Err(e) => panic!("reading inotify events: {e}"),
        }
    }
}

/// A registration looks at its own pid file, not at every earlier one's again: each new
/// definition started a pid-file discovery of every registered process that was not running
/// (N registrations, about N²/2 pid-file reads; 4 ms a registration at a thousand). Counted
/// with inotify's open events on the pid files' directory, housekeeping's own pass kept out
/// of the window (sweep_interval 60 s).
#[test]
fn a_registration_reads_its_own_pid_file_not_every_earlier_one() {
    use rustix::fs::inotify;
    let env = TestEnv::new();
    let d = Daemon::start(&env, "[supervisor]\nsweep_interval = \"60s\"\n");
    let dir = env.path().join("pids");
    std::fs::create_dir_all(&dir).unwrap();
    let n = 30;
    for i in 0..n {
        // Pid 1: never this definition's process, so never adopted; the file is read.
        std::fs::write(dir.join(format!("p{i}.pid")), "1\n").unwrap();
    }
    let ino =
        inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&ino, &dir, inotify::WatchFlags::OPEN).unwrap();
    for i in 0..n {
        let mut spec = daemon_spec(&env, "opens", json!({}));
        spec["identity"]["pid_path"] = json!(dir.join(format!("p{i}.pid")).display().to_string());
        d.register(NS, &format!("opens{i}"), spec);
    }
    // Every pid file read at least once, then no more reads for half a second.
    let mut opens = 0;
    let mut quiet_since = Instant::now();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let new = pid_file_opens(&ino);
        opens += new;
        if new > 0 {
            quiet_since = Instant::now();
        }
        if opens >= n && quiet_since.elapsed() > Duration::from_millis(500) {
            break;
        }
        assert!(
            Instant::now() < end,
            "pid files read {opens} times, still going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        opens <= 2 * n,
        "{n} registrations read pid files {opens} times (each one's own: {n})"
    );
}
