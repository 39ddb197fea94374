//! Restart policy, end to end through the socket with real processes: a healthy run is
//! restarted at once however often it dies, a run that fails its start check backs off with
//! growing delays that status, events, the CLI and /metrics all show, and `max_restarts`
//! gives up into the `fatal` state, which an operator start leaves.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const NS: &str = "loop";

fn events_of(d: &Daemon, name: &str, kind: &str) -> Vec<Value> {
    d.events(&format!("{NS}/{name}"))
        .into_iter()
        .filter(|e| e["kind"] == json!(kind))
        .collect()
}

/// A process whose start script runs the fixture program for as many seconds as the file
/// `NAME.secs` says (so a test can make its runs short, then long), daemonized with a pid
/// file, start check 1 s.
fn timed_spec(env: &TestEnv, name: &str, secs: &str, policy: Value) -> Value {
    let prog = env.program(name);
    let pidfile = env.p(&format!("{name}.pid"));
    let secs_file = env.p(&format!("{name}.secs"));
    std::fs::write(&secs_file, secs).unwrap();
    let script = env.script(
        &format!("{name}.sh"),
        &format!(
            "#!/bin/sh\nsetsid {prog} $(cat {secs_file}) </dev/null >/dev/null 2>&1 &\necho $! > {pidfile}\n"
        ),
    );
    let mut monitor = json!({"auto_type": 1, "start_check_secs": 1, "op_timeout": 10});
    if let (Some(m), Some(p)) = (monitor.as_object_mut(), policy.as_object()) {
        for (k, v) in p {
            m.insert(k.clone(), v.clone());
        }
    }
    json!({
        "identity": {"proc_name": name, "setup_path": env.path().display().to_string(), "pid_path": pidfile, "user": ""},
        "control": {"start_cmd": script, "stop_cmd": format!("kill $(cat {pidfile})")},
        "monitor_policy": monitor,
    })
}

/// The value of one series of /metrics for `name`, if it is there.
fn metric(d: &Daemon, series: &str, name: &str) -> Option<f64> {
    let (status, body) = d.http("GET", "/metrics", b"").unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).into_owned();
    let labels = format!("{{namespace=\"{NS}\",name=\"{name}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series}{labels} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_healthy_process_killed_five_times_is_restarted_at_once_each_time() {
    let env = TestEnv::new();
    // Default restart settings: no backoff override.
    let d = Daemon::start(&env, "");
    d.register(NS, "healthy", daemon_spec(&env, "healthy", json!({})));
    assert_eq!(d.op(NS, "healthy", 0)["error_code"], json!(0));
    let pidfile = env.p("healthy.pid");
    let mut pid = read_pid(&pidfile).unwrap();
    let mut took = Vec::new();
    for round in 1..=5u64 {
        let t = Instant::now();
        kill9(pid);
        let new = wait_for("a new process", Duration::from_secs(10), || {
            read_pid(&pidfile).filter(|p| *p != pid && alive(*p))
        });
        took.push(t.elapsed());
        // The new run passes its start check (a healthy run) before the next kill.
        wait_for(
            "the restart passed its start check",
            Duration::from_secs(10),
            || (events_of(&d, "healthy", "restarted").len() as u64 == round).then_some(()),
        );
        let det = d.detail(NS, "healthy");
        assert_eq!(det["state"], json!("running"), "{det}");
        assert_eq!(det["pids"], json!([new]), "{det}");
        assert_eq!(
            det["consecutive_failures"],
            json!(0),
            "round {round}: {det}"
        );
        assert_eq!(
            det["restart_delay_secs"],
            json!(0.0),
            "round {round}: {det}"
        );
        pid = new;
    }
    eprintln!("kill to new pid: {took:?}");
    let restarting = events_of(&d, "healthy", "restarting");
    assert_eq!(restarting.len(), 5, "{restarting:?}");
    for e in &restarting {
        assert_eq!(
            e["data"]["delay_secs"],
            json!(0.0),
            "an immediate restart: {e}"
        );
    }
    let exited = events_of(&d, "healthy", "exited");
    assert_eq!(exited.len(), 5);
    assert!(
        exited.iter().all(|e| e["data"]["healthy"] == json!(true)),
        "{exited:?}"
    );
    assert!(
        events_of(&d, "healthy", "backoff").is_empty(),
        "no backoff after a healthy run"
    );
    let det = d.detail(NS, "healthy");
    assert_eq!(det["restarts"], json!(5), "{det}");
    assert_eq!(det["next_restart_in"], Value::Null, "{det}");
    assert_eq!(
        metric(&d, "procagent_process_consecutive_failures", "healthy"),
        Some(0.0)
    );
    assert_eq!(
        metric(&d, "procagent_process_last_exit_code", "healthy"),
        Some(137.0),
        "killed by SIGKILL"
    );
}

#[test]
fn a_start_check_failure_loop_backs_off_with_growing_delays_shown_everywhere() {
    let env = TestEnv::new();
    let d = Daemon::start(
        &env,
        "[supervisor]\nbackoff_initial = \"300ms\"\nbackoff_max = \"2400ms\"\nbackoff_jitter = 0.0\n",
    );
    // Each run dies 0.2 s after its start: within its 1 s start check.
    d.register(NS, "crashy", timed_spec(&env, "crashy", "0.2", json!({})));
    assert_eq!(d.op(NS, "crashy", 3)["error_code"], json!(0));
    // (failures, delay) as status shows them while in backoff, each distinct pair once.
    let mut seen: Vec<(u64, f64)> = Vec::new();
    let mut shown_next = false;
    wait_for(
        "four backoff steps in status",
        Duration::from_secs(30),
        || {
            let det = d.detail(NS, "crashy");
            if det["state"] == json!("backoff") {
                let n = det["consecutive_failures"].as_u64().unwrap();
                let delay = det["restart_delay_secs"].as_f64().unwrap();
                if seen.last().map(|s| s.0) != Some(n) {
                    seen.push((n, delay));
                }
                assert!(
                    det["last_exit"].is_string(),
                    "the last exit is shown: {det}"
                );
                assert!(
                    det["message"]
                        .as_str()
                        .unwrap()
                        .contains("start check failed"),
                    "{det}"
                );
                if let (Some(inn), Some(at)) = (
                    det["next_restart_in"].as_f64(),
                    det["next_restart_at"].as_i64(),
                ) {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs() as i64;
                    assert!(inn <= delay + 0.01, "{det}");
                    assert!((now - 2..=now + 3).contains(&at), "{det}");
                    shown_next = true;
                }
            }
            (seen.len() >= 4).then_some(())
        },
    );
    assert!(shown_next, "the next attempt was shown: {seen:?}");
    // Consecutive failures count up, and each delay is the n-th step of the doubling to the
    // cap (polling may miss a step on a loaded machine, never reorder them).
    let want = |n: u64| (0.3 * f64::from(1u32 << (n - 1).min(8))).min(2.4);
    for (n, delay) in &seen {
        assert!((delay - want(*n)).abs() < 1e-6, "failure {n}: {seen:?}");
    }
    assert!(seen.windows(2).all(|w| w[1].0 > w[0].0), "{seen:?}");
    assert!(
        seen.windows(2).any(|w| w[1].1 > w[0].1),
        "growing delays shown: {seen:?}"
    );
    // The events tell the same story.
    let backoffs = events_of(&d, "crashy", "backoff");
    let delays: Vec<f64> = backoffs
        .iter()
        .map(|e| e["data"]["delay_secs"].as_f64().unwrap())
        .collect();
    assert!(delays.len() >= 4, "{delays:?}");
    assert!(
        (delays[0] - 0.3).abs() < 1e-6 && (delays[1] - 0.6).abs() < 1e-6,
        "{delays:?}"
    );
    assert!(
        backoffs
            .iter()
            .all(|e| e["data"]["next_attempt_ms"].is_i64()),
        "{backoffs:?}"
    );
    // The CLI table and /metrics show the crash loop while it lasts.
    wait_for("the CLI shows the backoff", Duration::from_secs(10), || {
        let (_, out, _) = d.cli(&["status", &format!("{NS}/crashy")]);
        (out.contains("backoff") && out.contains("failure") && out.contains("next attempt"))
            .then_some(())
    });
    wait_for(
        "/metrics shows the backoff",
        Duration::from_secs(10),
        || {
            let n = metric(&d, "procagent_process_consecutive_failures", "crashy")?;
            let next = metric(
                &d,
                "procagent_process_next_restart_timestamp_seconds",
                "crashy",
            )?;
            (n >= 3.0 && next > 0.0).then_some(())
        },
    );
    // Never given up: without max_restarts it keeps trying.
    assert!(events_of(&d, "crashy", "fatal").is_empty());
}

#[test]
fn max_restarts_gives_up_into_fatal_and_an_operator_start_leaves_it() {
    let env = TestEnv::new();
    let d = Daemon::start(
        &env,
        "[supervisor]\nbackoff_initial = \"100ms\"\nbackoff_max = \"200ms\"\nbackoff_jitter = 0.0\n",
    );
    d.register(
        NS,
        "doomed",
        timed_spec(&env, "doomed", "0.2", json!({"max_restarts": 2})),
    );
    assert_eq!(d.op(NS, "doomed", 3)["error_code"], json!(0));
    let det = wait_for("given up", Duration::from_secs(30), || {
        let det = d.detail(NS, "doomed");
        (det["state"] == json!("fatal")).then_some(det)
    });
    assert_eq!(det["consecutive_failures"], json!(3), "{det}");
    assert_eq!(det["next_restart_in"], Value::Null, "{det}");
    assert!(
        det["message"].as_str().unwrap().contains("max_restarts 2"),
        "{det}"
    );
    assert_eq!(det["managed"], json!(true), "{det}");
    assert_eq!(events_of(&d, "doomed", "start_failed").len(), 3);
    assert_eq!(events_of(&d, "doomed", "fatal").len(), 1);
    assert_eq!(d.status(NS, "doomed")["status"], json!(2));
    let (code, out, _) = d.cli(&["status", &format!("{NS}/doomed")]);
    assert!(
        out.contains("fatal") && out.contains("max_restarts 2"),
        "{code} {out}"
    );
    assert_eq!(metric(&d, "procagent_process_fatal", "doomed"), Some(1.0));
    let (_, list, _) = d.cli(&["--json", "status", &format!("{NS}/doomed")]);
    assert!(list.contains("\"fatal\""), "{list}");
    // It stays given up across the agent's own restart (the state is stored): not started.
    let mut d = d;
    d.terminate().expect("the agent stopped");
    let d = Daemon::start_with(&env, &env.path().join("agent.toml"));
    let det = d.detail(NS, "doomed");
    assert_eq!(det["state"], json!("fatal"), "{det}");
    assert!(
        det["message"].as_str().unwrap().contains("max_restarts"),
        "{det}"
    );
    assert_eq!(events_of(&d, "doomed", "start_failed").len(), 3);
    // The operator fixes it and starts it: it leaves fatal and runs, its count reset.
    std::fs::write(env.p("doomed.secs"), "100000").unwrap();
    let r = d.op(NS, "doomed", 0);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let det = d.detail(NS, "doomed");
    assert_eq!(
        (det["state"].clone(), det["consecutive_failures"].clone()),
        (json!("running"), json!(0)),
        "{det}"
    );
    assert_eq!(metric(&d, "procagent_process_fatal", "doomed"), Some(0.0));
}
