//! The operator CLI end to end, against a real daemon: logs (and -f), events -f, config
//! reload (dry run, apply, a rejected config, SIGHUP, conf_dir watching), batch operations
//! by label and expression, completions, the man page, and `--json` on every read command.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const NS: &str = "ops";

/// A CLI child whose stdout is read line by line in the background; killed on drop.
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    fn start(d: &Daemon, args: &[&str]) -> Follower {
        let mut child = Command::new(CLI)
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn procagent");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => l2.lock().expect("lines").push(l),
                    Err(_) => break,
                }
            }
        });
        Follower { child, lines }
    }

    fn snapshot(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Wait until a line satisfies `pred`; returns it.
    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        wait_for(what, Duration::from_secs(30), || {
            self.lines
                .lock()
                .expect("lines")
                .iter()
                .find(|l| pred(l))
                .cloned()
        })
    }

    /// Whether the CLI still runs.
    fn still_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `[[process]]` table for a daemonizing fixture program `name` started with `arg`.
fn proc_toml(env: &TestEnv, name: &str, arg: &str, labels: &str) -> String {
    let prog = env.program(name);
    let pidfile = env.p(&format!("{name}.pid"));
    format!(
        r#"
[[process]]
namespace = "{NS}"
name = "{name}"
labels = {{ {labels} }}
setup_path = "{dir}"
proc_name = "{name}"
pid_path = "{pidfile}"
start_cmd = "setsid {prog} {arg} </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"
stop_cmd = "kill $(cat {pidfile})"
start_check_secs = 1
op_timeout = 10
"#,
        dir = env.path().display(),
    )
}

fn running_pid(d: &Daemon, name: &str) -> Option<i64> {
    let v = d.detail(NS, name);
    if v["state"] == json!("running") {
        v["pids"][0].as_i64()
    } else {
        None
    }
}

fn wait_running(d: &Daemon, name: &str) -> i64 {
    wait_for(&format!("{name} running"), Duration::from_secs(30), || {
        running_pid(d, name)
    })
}

fn parse_json(out: &str, what: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{what}: not JSON ({e}):\n{out}"))
}

#[test]
fn logs_show_captured_output_and_follow_log_path() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let log = env.p("app.log");
    std::fs::write(&log, "boot line 1\nboot line 2\n").unwrap();
    let mut spec = daemon_spec(&env, "logger", json!({}));
    spec["identity"]["log_path"] = json!(log);
    // The start command says something: the agent captures it.
    let start = spec["control"]["start_cmd"].as_str().unwrap().to_string();
    spec["control"]["start_cmd"] = json!(format!("echo hello-from-start; {start}"));
    d.register(NS, "logger", spec);
    assert_eq!(d.op(NS, "logger", 0)["error_code"], json!(0));

    let (code, out, err) = d.cli(&["logs", "ops/logger"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("hello-from-start"), "captured output:\n{out}");
    assert!(out.contains("start_cmd as"), "header line:\n{out}");
    assert!(
        out.contains("boot line 2") && out.contains(&format!("==> {log} <==")),
        "log_path:\n{out}"
    );
    // -n bounds the lines per file; --source picks one.
    let (_, out, _) = d.cli(&["logs", "-n", "1", "--source", "log", "ops/logger"]);
    assert!(
        out.contains("boot line 2") && !out.contains("boot line 1"),
        "{out}"
    );
    assert!(!out.contains("hello-from-start"), "{out}");

    // JSON lines parse back.
    let (code, out, _) = d.cli(&["--json", "logs", "ops/logger"]);
    assert_eq!(code, 0);
    let objs: Vec<Value> = out.lines().map(|l| parse_json(l, "logs --json")).collect();
    assert!(
        objs.iter()
            .any(|o| o["source"] == json!("output") && o["line"] == json!("hello-from-start"))
    );
    assert!(
        objs.iter()
            .any(|o| o["source"] == json!("log") && o["file"] == json!(log))
    );

    // -f sees lines appended while following, in order.
    let mut f = Follower::start(&d, &["logs", "-f", "-n", "5", "ops/logger"]);
    f.wait_line("the initial lines", |l| l == "boot line 2");
    {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(w, "live line A").unwrap();
        writeln!(w, "live line B").unwrap();
    }
    f.wait_line("a followed line", |l| l == "live line B");
    let lines = f.snapshot();
    let a = lines.iter().position(|l| l == "live line A").unwrap();
    let b = lines.iter().position(|l| l == "live line B").unwrap();
    assert!(a < b, "{lines:?}");
    // A command run while following shows up too (the captured output is followed).
    assert_eq!(d.op(NS, "logger", 1)["error_code"], json!(0));
    f.wait_line("the stop command's header", |l| l.contains("stop_cmd as"));
    assert!(f.still_running(), "-f keeps following");

    // Unknown process: exit 5, with the closest names.
    let (code, _, err) = d.cli(&["logs", "ops/loggr"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("no registered process") && err.contains("did you mean ops/logger?"),
        "{err}"
    );
}

#[test]
fn logs_of_a_log_directory_and_what_an_account_may_not_read() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let dir = env.path().join("logs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.log"), "from a\n").unwrap();
    std::fs::write(dir.join("b.log"), "from b\n").unwrap();
    std::fs::write(dir.join("old.log.gz"), "zzz\n").unwrap();
    let mut spec = daemon_spec(&env, "dirlog", json!({}));
    spec["identity"]["log_path"] = json!(dir.display().to_string());
    d.register(NS, "dirlog", spec);
    let (code, out, err) = d.cli(&["logs", "--source", "log", "ops/dirlog"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("from a") && out.contains("from b"), "{out}");
    assert!(
        !out.contains("zzz"),
        "compressed archives are skipped: {out}"
    );

    // A new file in the directory joins while following.
    let f = Follower::start(&d, &["logs", "-f", "--source", "log", "ops/dirlog"]);
    f.wait_line("initial", |l| l == "from b");
    std::fs::write(dir.join("c.log"), "from c\n").unwrap();
    f.wait_line("the new file's line", |l| l == "from c");
    drop(f);

    if !is_root() {
        eprintln!("skip: the account check needs root to register a process as nobody");
        return;
    }
    // A process running as nobody must not become a way to read root's files.
    let secret = env.path().join("secret.log");
    std::fs::write(&secret, "root only\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut spec = daemon_spec(&env, "sneaky", json!({}));
    spec["identity"]["user"] = json!("nobody");
    spec["identity"]["log_path"] = json!(secret.display().to_string());
    d.register(NS, "sneaky", spec);
    let (code, out, err) = d.cli(&["logs", "--source", "log", "ops/sneaky"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("root only"), "{out}");
    assert!(
        err.contains("not readable by the process's account nobody"),
        "{err}"
    );
    // Its own captured output (the agent's file) is shown all the same.
    let (code, out, err) = d.cli(&["logs", "--source", "output", "ops/sneaky"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.is_empty() && err.is_empty(),
        "nothing ran yet: {out}{err}"
    );
    let _ = d.op(NS, "sneaky", 0);
    let (code, out, err) = d.cli(&["logs", "--source", "output", "ops/sneaky"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("start_cmd as nobody"), "{out}{err}");
    assert!(!err.contains("not readable"), "{err}");
    // Through a symlink it is the same file: still refused.
    let link = env.path().join("innocent.log");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let mut spec = daemon_spec(&env, "sneaky2", json!({}));
    spec["identity"]["user"] = json!("nobody");
    spec["identity"]["log_path"] = json!(link.display().to_string());
    d.register(NS, "sneaky2", spec);
    let (_, out, err) = d.cli(&["logs", "--source", "log", "ops/sneaky2"]);
    assert!(!out.contains("root only"), "{out}");
    assert!(err.contains("not readable"), "{err}");
}

#[test]
fn events_follow_human_and_json() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    let (code, out, _) = d.cli(&["events"]);
    assert_eq!(code, 0);
    assert!(out.contains("agent_started"), "{out}");
    let human = Follower::start(&d, &["events", "-f", "-n", "1"]);
    let js = Follower::start(&d, &["--json", "events", "-f", "--process", "ops/ev"]);
    human.wait_line("backlog", |l| l.contains("agent_started"));
    d.register(NS, "ev", daemon_spec(&env, "ev", json!({})));
    let l = human.wait_line("the live registered event", |l| {
        l.contains("registered") && l.contains("ops/ev")
    });
    assert!(l.contains("definition registered"), "{l}");
    let l = js.wait_line("the JSON event", |l| l.contains("registered"));
    let v = parse_json(&l, "events -f --json");
    assert_eq!(v["key"], json!("ops/ev"));
    assert_eq!(v["kind"], json!("registered"));
    // The filter holds: the agent's own events are not in the per-process stream.
    assert!(js.snapshot().iter().all(|l| !l.contains("agent_started")));
    // Non-follow --json parses.
    let (code, out, _) = d.cli(&["--json", "events", "--since", "1h"]);
    assert_eq!(code, 0);
    let v = parse_json(&out, "events --json");
    assert!(v["events"].as_array().is_some_and(|a| !a.is_empty()), "{v}");
    let (code, _, err) = d.cli(&["events", "--since", "soon"]);
    assert_eq!(code, 2, "{err}");
    // `events NS/NAME`, as for status and logs: only that process's events.
    let (code, out, err) = d.cli(&["events", "ops/ev"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ops/ev") && out.contains("registered"),
        "{out}"
    );
    assert!(!out.contains("agent_started"), "{out}");
    // The agent going away does not end a follow: it reconnects once the agent answers
    // again and resumes after the last event it showed (none twice).
    let mut human = human;
    d.terminate();
    let d = Daemon::start_with(&env, &d.config);
    d.register(NS, "ev2", daemon_spec(&env, "ev2", json!({})));
    human.wait_line("an event after the agent came back", |l| {
        l.contains("registered") && l.contains("ops/ev2")
    });
    assert!(human.still_running(), "-f keeps following");
    let lines = human.snapshot();
    let once = lines
        .iter()
        .filter(|l| l.contains("registered") && l.contains("ops/ev "))
        .count();
    assert_eq!(
        once, 1,
        "an event shown again after the reconnect: {lines:?}"
    );
}

fn write_config(env: &TestEnv, extra: &str) {
    std::fs::write(
        env.path().join("agent.toml"),
        Daemon::config_text(env, extra),
    )
    .expect("write the config");
}

#[test]
fn reload_dry_run_apply_and_rejected_config() {
    let env = TestEnv::new();
    let a = proc_toml(&env, "alpha", "100000", r#"app = "web""#);
    let b = proc_toml(&env, "beta", "100000", r#"app = "web""#);
    let d = Daemon::start(&env, &format!("{a}{b}"));
    let pid_a = wait_running(&d, "alpha");
    wait_running(&d, "beta");

    // Nothing changed yet.
    let (code, out, err) = d.cli(&["config", "diff"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 to add, 0 to change, 0 to remove"), "{out}");
    let (code, out, err) = d.cli(&["config", "check"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(": ok; 0 definition change(s) pending"),
        "{out}"
    );

    // alpha's start_cmd and labels change, beta goes, gamma comes, and [api] changes.
    let a2 = proc_toml(&env, "alpha", "200000", r#"app = "web", tier = "front""#);
    let g = proc_toml(&env, "gamma", "100000", r#"app = "db""#);
    write_config(&env, &format!("{a2}{g}\n[api]\nmax_connections = 100\n"));
    let (code, out, _) = d.cli(&["config", "check"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("3 definition change(s) pending (see `procagent config diff`)"),
        "{out}"
    );
    let (code, out, err) = d.cli(&["config", "diff"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dry run: nothing applied"), "{out}");
    assert!(out.contains("+ ops/gamma"), "{out}");
    assert!(out.contains("~ ops/alpha"), "{out}");
    assert!(
        out.contains("start_cmd:") && out.contains("100000") && out.contains("200000"),
        "field-by-field: {out}"
    );
    assert!(out.contains("labels:"), "{out}");
    assert!(out.contains("- ops/beta"), "{out}");
    assert!(out.contains("restart ops/alpha"), "{out}");
    assert!(out.contains("[api]"), "restart-required sections: {out}");
    // The dry run changed nothing.
    assert_eq!(running_pid(&d, "alpha"), Some(pid_a));
    assert_eq!(d.detail(NS, "gamma"), Value::Null);

    let (code, out, _) = d.cli(&["--json", "config", "diff"]);
    assert_eq!(code, 0);
    let v = parse_json(&out, "config diff --json");
    assert_eq!(v["dry_run"], json!(true));
    assert_eq!(v["added"], json!(["ops/gamma"]));
    assert_eq!(v["removed"], json!(["ops/beta"]));
    assert_eq!(v["restart"], json!(["ops/alpha"]));
    let fields: Vec<&str> = v["changed"][0]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"start_cmd") && fields.contains(&"labels"),
        "{v}"
    );
    assert_eq!(v["restart_required"], json!(["[api]"]));

    // A config with errors is rejected whole, every error listed; nothing changes.
    let good = std::fs::read_to_string(env.path().join("agent.toml")).unwrap();
    std::fs::write(
        env.path().join("agent.toml"),
        format!(
            "{good}\n[[process]]\nnamespace = \"{NS}\"\nname = \"broken\"\nbogus_key = 1\nop_timeout = 0\n"
        ),
    )
    .unwrap();
    let (code, out, err) = d.cli(&["config", "apply"]);
    assert_eq!(code, 6, "LSB 'not configured': {out}{err}");
    for needle in [
        "bogus_key: unknown key",
        "op_timeout",
        "setup_path",
        "proc_name",
    ] {
        assert!(err.contains(needle), "error {needle:?} not listed:\n{err}");
    }
    assert!(err.contains("nothing changed"), "{err}");
    assert_eq!(running_pid(&d, "alpha"), Some(pid_a), "alpha untouched");
    assert!(d.detail(NS, "beta").is_object(), "beta still declared");
    assert_eq!(d.detail(NS, "gamma"), Value::Null);
    let rejected = d.get("/v1/events?limit=100");
    assert!(
        rejected["data"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == json!("config_rejected")),
        "{rejected}"
    );
    let (code, out, _) = d.cli(&["--json", "reload", "--dry-run"]);
    assert_eq!(code, 6);
    let v = parse_json(&out, "rejected reload --json");
    assert!(v["errors"].as_array().unwrap().len() >= 4, "{v}");

    let (code, _, _) = d.cli(&["config", "check"]);
    assert_eq!(code, 6);
    // Apply the good one: alpha restarted with its new command, gamma started, beta gone.
    // `reload` without a process still does it, with a note pointing to the new command.
    std::fs::write(env.path().join("agent.toml"), &good).unwrap();
    let (code, out, err) = d.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("`procagent config apply`"), "{err}");
    assert!(out.contains("(applied)"), "{out}");
    assert!(
        out.contains("ops/alpha") && out.contains("ok"),
        "restart summary: {out}"
    );
    let new_a = wait_running(&d, "alpha");
    assert_ne!(new_a, pid_a, "alpha was restarted");
    let cmdline = std::fs::read(format!("/proc/{new_a}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("200000"),
        "new start_cmd in effect"
    );
    wait_running(&d, "gamma");
    assert_eq!(d.detail(NS, "beta"), Value::Null, "beta unregistered");
    assert_eq!(d.detail(NS, "alpha")["labels"]["tier"], json!("front"));
    // Applied once: a second reload finds nothing to do.
    let (_, out, _) = d.cli(&["config", "diff"]);
    assert!(out.contains("0 to add, 0 to change, 0 to remove"), "{out}");
    // --dry-run with a process is a usage error.
    let (code, _, _) = d.cli(&["reload", "--dry-run", "ops/alpha"]);
    assert_eq!(code, 2);
}

#[test]
fn sighup_and_conf_dir_changes_apply_the_config() {
    let env = TestEnv::new();
    let confd = env.path().join("conf.d");
    std::fs::create_dir(&confd).unwrap();
    let extra = format!(
        "agent.conf_dir = \"{}\"\nagent.watch_conf_dir = true\n",
        confd.display()
    );
    let d = Daemon::start(&env, &extra);

    // SIGHUP: the main file gains a process.
    let h = proc_toml(&env, "hup", "100000", r#"app = "hup""#);
    write_config(&env, &format!("{extra}{h}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_running(&d, "hup");
    assert!(d.log_text().contains("SIGHUP"), "logged");

    // conf.d: a new file is noticed, debounced, applied.
    let w = proc_toml(&env, "watched", "100000", r#"app = "w""#);
    std::fs::write(confd.join("watched.toml.tmp"), &w).unwrap();
    std::fs::rename(confd.join("watched.toml.tmp"), confd.join("watched.toml")).unwrap();
    wait_running(&d, "watched");
    // A broken file in conf.d is rejected; what runs stays.
    std::fs::write(confd.join("bad.toml"), "[[process]]\nname = 5\n").unwrap();
    wait_for("config_rejected", Duration::from_secs(20), || {
        let ev = d.get("/v1/events?limit=1000");
        ev["data"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == json!("config_rejected"))
            .then_some(())
    });
    assert!(running_pid(&d, "watched").is_some());
    assert!(d.detail(NS, "hup").is_object());
}

#[test]
fn batch_operations_by_label_and_expression() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for (name, app) in [("web-1", "web"), ("web-2", "web"), ("db-1", "db")] {
        let r = d.call(
            "register_proc_info",
            &json!({"meta": {"namespace": NS, "name": name, "labels": {"app": app}}, "hosts": [Daemon::host()], "spec": daemon_spec(&env, name, json!({}))}),
        );
        assert_eq!(r["result"], json!(true), "{r}");
    }
    let (code, out, err) = d.cli(&["start", "--label", "app=web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("PROCESS") && out.contains("RESULT"), "{out}");
    assert!(
        out.contains("ops/web-1") && out.contains("ops/web-2"),
        "{out}"
    );
    assert!(!out.contains("ops/db-1"), "{out}");
    assert!(out.contains("2 processes, 2 ok, 0 failed"), "{out}");
    assert!(running_pid(&d, "web-1").is_some() && running_pid(&d, "web-2").is_some());
    assert!(running_pid(&d, "db-1").is_none());

    // An expression: GSEKit syntax on NAMESPACE/NAME.
    let (code, out, _) = d.cli(&["--json", "stop", "--expr", "ops/web-[2-9]"]);
    assert_eq!(code, 0, "{out}");
    let v = parse_json(&out, "batch --json");
    assert_eq!(v["ok"], json!(1));
    assert_eq!(v["results"][0]["process"], json!("ops/web-2"));
    assert!(running_pid(&d, "web-1").is_some());

    // A failing member fails the batch: exit 1, shown as failed.
    let mut bad = daemon_spec(&env, "web-bad", json!({}));
    bad["control"]["start_cmd"] = json!("echo cannot start >&2; exit 3");
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "web-bad", "labels": {"app": "web"}}, "hosts": [Daemon::host()], "spec": bad}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let (code, out, _) = d.cli(&["start", "-l", "app=web"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed"), "{out}");
    assert!(out.contains("3 processes, 2 ok, 1 failed"), "{out}");
    // Nothing matches: exit 5. No selection at all: exit 2.
    let (code, _, err) = d.cli(&["restart", "--label", "app=none"]);
    assert_eq!(code, 5, "{err}");
    let (code, _, _) = d.cli(&["restart"]);
    assert_eq!(code, 2);
    let (code, _, _) = d.cli(&["restart", "--label", "novalue"]);
    assert_eq!(code, 2);

    // On a terminal, a progress bar on stderr (script(1) gives the CLI a pty).
    if Command::new("script").arg("--version").output().is_ok() {
        let cmd = format!(
            "{CLI} --socket {} restart --all --timeout 60",
            d.socket.display()
        );
        let out = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("done,") && text.contains("failed"), "{text}");
        assert!(text.contains("/4 done"), "progress counts: {text}");
    } else {
        eprintln!("skip: script(1) is missing; the progress bar is not checked");
    }
    // --no-wait prints the task ids.
    let (code, out, _) = d.cli(&["--json", "unmanage", "--all", "--no-wait"]);
    assert_eq!(code, 0);
    let v = parse_json(&out, "--no-wait --json");
    assert!(
        v["task_ids"][0]
            .as_str()
            .is_some_and(|t| t.starts_with("GSETASK:"))
    );
}

/// `restart --all` restarts processes that have no restart_cmd (stop, then start).
#[test]
fn restart_all_without_restart_cmd() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for name in ["rs-1", "rs-2", "rs-3"] {
        d.register(NS, name, daemon_spec(&env, name, json!({})));
    }
    let (code, out, err) = d.cli(&["start", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    let before: Vec<i64> = ["rs-1", "rs-2", "rs-3"]
        .iter()
        .map(|n| wait_running(&d, n))
        .collect();
    let (code, out, err) = d.cli(&["restart", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 processes, 3 ok, 0 failed"), "{out}");
    for (name, old) in ["rs-1", "rs-2", "rs-3"].iter().zip(before) {
        let new = wait_running(&d, name);
        assert_ne!(new, old, "{name} was restarted");
        assert!(alive(new as i32) && !alive(old as i32), "{name}");
    }
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(CLI)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        // The script calls back into procagent (which knows subcommands, flags and names).
        assert!(text.contains("COMPLETE"), "{shell}: {text}");
        assert!(text.contains("procagent"), "{shell}: {text}");
        // The script is valid in its shell (when that shell is here).
        let check = match shell {
            "bash" => Some(("bash", vec!["-n"])),
            "zsh" => Some(("zsh", vec!["-n"])),
            "fish" => Some(("fish", vec!["--no-execute"])),
            _ => None,
        };
        if let Some((sh, args)) = check {
            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), text.as_bytes()).unwrap();
            match Command::new(sh).args(&args).arg(f.path()).output() {
                Ok(o) => assert!(
                    o.status.success(),
                    "{shell} rejects its completion: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(_) => eprintln!("skip: {sh} is not installed; syntax not checked"),
            }
        }
    }
    let out = Command::new(CLI)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(CLI).arg("man").output().unwrap();
    assert!(out.status.success());
    let roff = String::from_utf8_lossy(&out.stdout);
    assert!(
        roff.starts_with(".ie") || roff.contains(".TH procagent"),
        "{roff}"
    );
    assert!(roff.contains(".TH procagent 1"), "{roff}");
    assert!(
        roff.contains(".SH SYNOPSIS") && roff.contains("reload"),
        "{roff}"
    );
    // A subcommand's page, and every page into a directory (the references resolve).
    let out = Command::new(CLI).args(["man", "logs"]).output().unwrap();
    assert!(out.status.success());
    let sub = String::from_utf8_lossy(&out.stdout);
    assert!(
        sub.contains(".TH procagent-logs 1") && sub.contains("follow"),
        "{sub}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(CLI)
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    for page in ["procagent.1", "procagent-logs.1", "procagent-reload.1"] {
        let p = dir.path().join(page);
        assert!(std::fs::metadata(&p).is_ok_and(|m| m.len() > 100), "{page}");
    }
    let out = Command::new(CLI).args(["man", "nosuch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // groff renders it without complaint, when groff is here.
    if let Ok(mut g) = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        g.stdin.take().unwrap().write_all(roff.as_bytes()).unwrap();
        let o = g.wait_with_output().unwrap();
        assert!(o.status.success(), "groff failed");
        let warn = String::from_utf8_lossy(&o.stderr);
        assert!(warn.trim().is_empty(), "groff warnings: {warn}");
    }
}

#[test]
fn json_output_of_every_read_command_parses() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "js", daemon_spec(&env, "js", json!({})));
    let (code, out, _) = d.cli(&["--json", "start", "ops/js"]);
    assert_eq!(code, 0, "{out}");
    let v = parse_json(&out, "start --json");
    let task = v["task_id"].as_str().unwrap().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--json", "status"],
        vec!["--json", "status", "ops/js"],
        vec!["--json", "status", "--label", "app=js"],
        vec!["--json", "status", "--expr", "ops/j*"],
        vec!["--json", "task", &task],
        vec!["--json", "tasks"],
        vec!["--json", "health"],
        vec!["--json", "events", "-n", "5"],
        vec!["--json", "reload", "--dry-run"],
    ];
    for args in &cases {
        let (code, out, err) = d.cli(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        parse_json(&out, &format!("{args:?}"));
    }
    let (_, out, _) = d.cli(&["--json", "status", "--expr", "ops/j*"]);
    let v = parse_json(&out, "status");
    assert_eq!(v["count"], json!(1));
    assert_eq!(v["list"][0]["name"], json!("js"));
    let (_, out, _) = d.cli(&["--json", "health"]);
    assert_eq!(parse_json(&out, "health")["status"], json!("ok"));
    // Line-oriented reads: one JSON object per line.
    let (code, out, _) = d.cli(&["--json", "logs", "ops/js"]);
    assert_eq!(code, 0);
    assert!(!out.trim().is_empty());
    for l in out.lines() {
        let v = parse_json(l, "logs line");
        assert!(v["line"].is_string() || v["notice"].is_string(), "{v}");
    }
    // Wrong methods on the GET endpoints still answer the envelope.
    for path in ["/v1/logs?key=ops%2Fjs", "/v1/events", "/v1/healthz"] {
        let (status, body) = d.http("POST", path, b"{}").unwrap();
        assert_eq!(status, 405, "{path}");
        let v = parse_json(&String::from_utf8_lossy(&body), path);
        assert_eq!(v["result"], json!(false));
        assert_eq!(v["code"], json!(1000405));
    }
    // Bad queries of the logs endpoint name the parameter.
    let v = d.get("/v1/logs?key=noslash");
    assert_eq!(v["code"], json!(1000400), "{v}");
    let v = d.get("/v1/logs?key=ops%2Fjs&source=bogus");
    assert!(v["message"].as_str().unwrap().contains("source"), "{v}");
    let v = d.get("/v1/logs?key=ops%2Fjs&lines=100000");
    assert!(v["message"].as_str().unwrap().contains("lines"), "{v}");
    // Human output is not JSON, and has no colour codes when not on a terminal.
    let (_, out, _) = d.cli(&["status"]);
    assert!(serde_json::from_str::<Value>(&out).is_err());
    assert!(!out.contains('\x1b'), "{out:?}");
}

/// 828 and 829 are answers, not failures: `start` of a running process says "already
/// running (pid N)", `stop` of a stopped one "not running", both exit 0, single and batch.
#[test]
fn already_in_the_state_asked_for_is_an_answer_not_a_failure() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for name in ["same-1", "same-2"] {
        let r = d.call(
            "register_proc_info",
            &json!({"meta": {"namespace": NS, "name": name, "labels": {"app": "same"}}, "hosts": [Daemon::host()], "spec": daemon_spec(&env, name, json!({}))}),
        );
        assert_eq!(r["result"], json!(true), "{r}");
    }
    let (code, out, err) = d.cli(&["start", "ops/same-1"]);
    assert_eq!(code, 0, "{out}{err}");
    let pid = wait_running(&d, "same-1");
    let (code, out, err) = d.cli(&["start", "ops/same-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("ops/same-1: already running (pid {pid})"))
            && !out.contains("failed"),
        "{out}"
    );
    let (code, out, err) = d.cli(&["stop", "ops/same-2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ops/same-2: not running") && !out.contains("failed"),
        "{out}"
    );
    // The batch form: one row each, none failed.
    let (code, out, err) = d.cli(&["start", "--label", "app=same"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("already running (pid"), "{out}");
    assert!(out.contains("2 processes, 2 ok, 0 failed"), "{out}");
    let (code, out, err) = d.cli(&["stop", "--label", "app=same"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = d.cli(&["stop", "--label", "app=same"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("not running"), "{out}");
    assert!(out.contains("2 processes, 2 ok, 0 failed"), "{out}");
}

/// Naming what an operation acts on: several names, globs in either part, a bare NAME when
/// it is unique, and a name that matches nothing answered with the closest names, exit 5,
/// no task recorded.
#[test]
fn several_names_globs_bare_names_and_did_you_mean() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    for (ns, name) in [
        (NS, "web-1"),
        (NS, "web-2"),
        (NS, "api"),
        ("extra", "api"),
        ("extra", "lonely"),
    ] {
        let r = d.call(
            "register_proc_info",
            &json!({"meta": {"namespace": ns, "name": name}, "hosts": [Daemon::host()], "spec": daemon_spec(&env, &format!("{ns}-{name}"), json!({}))}),
        );
        assert_eq!(r["result"], json!(true), "{r}");
    }
    let (code, out, err) = d.cli(&["start", "ops/web-1", "ops/api"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 processes, 2 ok, 0 failed"), "{out}");
    assert!(
        out.contains("ops/web-1") && out.contains("ops/api") && !out.contains("ops/web-2"),
        "{out}"
    );
    let (code, out, err) = d.cli(&["stop", "ops/web-*", "*/lonely"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 processes, 3 ok, 0 failed"), "{out}");
    let (code, out, err) = d.cli(&["start", "lonely"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("extra/lonely: start ok"),
        "a bare unique name: {out}"
    );
    let (code, out, err) = d.cli(&["start", "api"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("ops/api") && err.contains("extra/api"),
        "ambiguous: {err}"
    );
    let tasks = |d: &Daemon| {
        d.call("tasks", &json!({"limit": 1000}))["data"]["list"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = tasks(&d);
    let (code, out, err) = d.cli(&["stop", "ops/wbe-1"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("did you mean ops/web-1"), "{err}");
    let (code, _, err) = d.cli(&["stop", "ops/web-1", "nothing/here"]);
    assert_eq!(code, 5, "{err}");
    assert_eq!(
        tasks(&d),
        before,
        "nothing was recorded for a name that matches nothing"
    );
}

/// The status table at a glance: RSS in human units for what runs, and for what does not,
/// how it last ended and how long ago.
#[test]
fn status_shows_rss_and_the_last_exit() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register(NS, "up", daemon_spec(&env, "up", json!({})));
    let mut spec = daemon_spec(&env, "ends", json!({}));
    spec["control"]["start_cmd"] = json!("sleep 2; exit 3");
    spec["identity"]["pid_path"] = json!("");
    spec["monitor_policy"]["start_check_secs"] = json!(1);
    d.register(NS, "ends", spec);
    assert_eq!(d.op(NS, "up", 0)["error_code"], json!(0));
    assert_eq!(d.op(NS, "ends", 0)["error_code"], json!(0));
    d.op(NS, "ends", 4); // unmanaged: its exit is not followed by a restart
    let out = wait_for("the exit shows", Duration::from_secs(20), || {
        let (_, out, _) = d.cli(&["status"]);
        out.contains("exit 3, ").then_some(out)
    });
    let head = out.lines().next().unwrap();
    assert!(
        head.contains("RSS") && head.contains("LAST EXIT") && !head.contains("MEM%"),
        "{out}"
    );
    let up = out.lines().find(|l| l.starts_with("ops/up")).unwrap();
    assert!(
        up.contains('K') || up.contains('M'),
        "RSS in human units: {up}"
    );
    let ends = out.lines().find(|l| l.starts_with("ops/ends")).unwrap();
    assert!(ends.contains("exit 3, ") && ends.contains(" ago"), "{ends}");
}

/// `add` and `remove` without hand-written JSON: flags or a `[[process]]` file (the config
/// file's keys, errors and did-you-mean), `--start`, refusals of keys declared in the config
/// file or that the API cannot carry, `remove` leaving the process running unless `--stop`.
#[test]
fn add_and_remove_processes_from_flags_and_files() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, &proc_toml(&env, "cfgd", "", "app = \"cfg\""));
    let dir = env.path().display().to_string();
    // From flags, started at once.
    let (code, out, err) = d.cli(&[
        "add",
        "ops/web",
        "--start-cmd",
        "exec sleep 300",
        "--setup-path",
        &dir,
        "--label",
        "tier=front",
        "--start-check-secs",
        "1",
        "--start",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ops/web: registered"), "{out}");
    let pid = wait_running(&d, "web");
    let det = d.detail(NS, "web");
    assert_eq!(det["spec"]["proc_name"], json!("sleep"), "{det}");
    assert_eq!(det["labels"]["tier"], json!("front"), "{det}");
    // Again: already registered. A config-declared key: refused, naming the file.
    let (code, _, err) = d.cli(&["add", "ops/web", "--start-cmd", "exec sleep 300"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already registered"), "{err}");
    let (code, _, err) = d.cli(&["add", "ops/cfgd", "--start-cmd", "exec sleep 300"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("declared in the config file") && err.contains("agent.toml"),
        "{err}"
    );
    // Errors name the field as the config file does.
    let (code, _, err) = d.cli(&["add", "ops/bad", "--start-cmd", "x", "--op-timeout", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("procagent add: op_timeout: 0 is out of range 1..=86400"),
        "{err}"
    );
    let (code, _, err) = d.cli(&["add", "ops/bad"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("start_cmd: is required"), "{err}");

    // From a file: the keys of a [[process]] table, relative paths the file's.
    let file = env.path().join("filed.toml");
    std::fs::write(
        &file,
        "stat_cmd = 'exec sleep 300'\nenv = { A = '1' }\nlabels = { app = 'filed' }\n",
    )
    .unwrap();
    let fs = file.display().to_string();
    let (code, _, err) = d.cli(&["add", "ops/filed", "-f", &fs]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{fs}: env: only a config file can set it")),
        "{err}"
    );
    std::fs::write(
        &file,
        "stat_cmd = 'exec sleep 300'\nlabels = { app = 'filed' }\n",
    )
    .unwrap();
    let (code, _, err) = d.cli(&["add", "ops/filed", "-f", &fs]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "{fs}: stat_cmd: unknown key; did you mean start_cmd?"
        )),
        "{err}"
    );
    std::fs::write(
        &file,
        format!(
            "[[process]]\nname = 'filed'\nstart_cmd = 'exec sleep 300'\nlog_path = 'filed.log'\nsetup_path = '{dir}'\nstart_check_secs = 1\nlabels = {{ app = 'filed' }}\n"
        ),
    )
    .unwrap();
    let (code, out, err) = d.cli(&["add", "ops/filed", "-f", &fs]);
    assert_eq!(code, 0, "{out}{err}");
    let det = d.detail(NS, "filed");
    assert_eq!(det["spec"]["log_path"], json!(env.p("filed.log")), "{det}");
    assert_eq!(det["labels"]["app"], json!("filed"), "{det}");
    let (code, out, err) = d.cli(&["start", "ops/filed"]);
    assert_eq!(code, 0, "{out}{err}");
    let filed_pid = wait_running(&d, "filed");

    // remove: the process is left running, unwatched; with --stop it is stopped first.
    let (code, out, err) = d.cli(&["remove", "ops/web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "ops/web: removed; its process (pid {pid}) is left running"
        )),
        "{out}"
    );
    assert!(alive(pid as i32));
    let (code, _, _) = d.cli(&["status", "ops/web"]);
    assert_eq!(code, 5, "no longer registered");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let (code, out, err) = d.cli(&["remove", "ops/filed", "--stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ops/filed: removed"), "{out}");
    wait_for("filed stopped", Duration::from_secs(15), || {
        (!alive(filed_pid as i32)).then_some(())
    });
    let (code, _, err) = d.cli(&["remove", "ops/cfgd"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("declared in the config file"), "{err}");
}

/// `logs` for several processes: each line prefixed with its process, captured lines with
/// their capture time and stderr marked, `--all`, `--grep`, `--since`; `-f` follows them all
/// and goes on across an agent restart, without showing a line twice.
#[test]
fn logs_of_several_processes_filtered_and_followed_across_a_restart() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    for name in ["la", "lb"] {
        let mut spec = daemon_spec(&env, name, json!({}));
        let start = spec["control"]["start_cmd"].as_str().unwrap().to_string();
        spec["control"]["start_cmd"] = json!(format!(
            "echo {name}-says-hi; echo {name}-complains >&2; {start}"
        ));
        spec["control"]["reload_cmd"] = json!(format!("echo {name}-reloaded"));
        d.register(NS, name, spec);
        assert_eq!(d.op(NS, name, 0)["error_code"], json!(0));
    }
    let (code, out, err) = d.cli(&["logs", "ops/la", "ops/lb", "--source", "output"]);
    assert_eq!(code, 0, "{out}{err}");
    let line_of = |text: &str| {
        out.lines()
            .find(|l| l.ends_with(text))
            .unwrap_or_else(|| panic!("no {text:?} in:\n{out}"))
            .to_string()
    };
    let hi = line_of("la-says-hi");
    assert!(hi.starts_with("ops/la | "), "{hi}");
    // `ops/la | HH:MM:SS     text`, stderr's marked `err`.
    let stamp = &hi["ops/la | ".len()..];
    assert!(
        stamp.as_bytes()[2] == b':'
            && stamp.as_bytes()[5] == b':'
            && stamp[8..].starts_with("     "),
        "{hi}"
    );
    let complaint = line_of("lb-complains");
    assert!(
        complaint.starts_with("ops/lb | ") && complaint.contains(" err lb-complains"),
        "{complaint}"
    );
    assert!(
        !out.contains("==>"),
        "no file headers when lines carry their process:\n{out}"
    );
    // --all and --grep.
    let (code, out, err) = d.cli(&["logs", "--all", "--grep", "complains"]);
    assert_eq!(code, 0, "{out}{err}");
    // (The start commands' header lines hold the word too.)
    let kept: Vec<&str> = out.lines().collect();
    assert!(kept.iter().all(|l| l.contains("complains")), "{out}");
    assert_eq!(
        kept.iter()
            .filter(|l| l.ends_with(" err la-complains") || l.ends_with(" err lb-complains"))
            .count(),
        2,
        "{out}"
    );
    // --since: captured lines of the last hour are shown.
    let (code, out, err) = d.cli(&["logs", "ops/la", "--since", "1h", "--source", "output"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("la-says-hi"), "{out}");
    // JSON: each object names its process.
    let (code, out, _) = d.cli(&["--json", "logs", "ops/la", "ops/lb", "--source", "output"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .map(|l| parse_json(l, "logs --json"))
            .any(|o| o["process"] == json!("ops/lb") && o["line"] == json!("lb-says-hi")),
        "{out}"
    );

    // Following both, across an agent restart.
    let mut f = Follower::start(
        &d,
        &["logs", "-f", "ops/la", "ops/lb", "--source", "output"],
    );
    f.wait_line("the initial lines", |l| l.ends_with("lb-says-hi"));
    d.terminate();
    d = Daemon::start_with(&env, &d.config);
    assert_eq!(d.op(NS, "la", 8)["error_code"], json!(0), "reload");
    f.wait_line("a line captured after the restart", |l| {
        l.starts_with("ops/la | ") && l.ends_with("la-reloaded")
    });
    assert!(f.still_running(), "-f keeps following");
    let lines = f.snapshot();
    let hi = lines.iter().filter(|l| l.ends_with("la-says-hi")).count();
    assert_eq!(hi, 1, "a line shown again after the reconnect: {lines:?}");
    for name in ["la", "lb"] {
        assert_eq!(d.op(NS, name, 1)["error_code"], json!(0), "stop {name}");
    }
}

/// `tasks`, `task` and `events` read as words: op names, times, callers and processes
/// instead of op numbers and result keys; aligned event columns without the event's type
/// repeated in its message; a long message whole when piped; at 80 columns in a pty the
/// status table drops columns and no row is wider than the terminal; `--wide` keeps all.
#[test]
fn tasks_task_and_events_read_as_words_and_tables_fit_the_terminal() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let dir = env.path().display().to_string();
    let long: String = (1..=60).map(|i| format!("word{i} ")).collect();
    let (code, out, err) = d.cli(&[
        "add",
        "ops/tw",
        "--start-cmd",
        "exec sleep 300",
        "--setup-path",
        &dir,
        "--start-check-secs",
        "1",
        "--start",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = d.cli(&["restart", "ops/tw"]);
    assert_eq!(code, 0, "{out}{err}");
    let task = out
        .lines()
        .find_map(|l| l.strip_prefix("task "))
        .expect("task id")
        .to_string();
    let (code, out, err) = d.cli(&[
        "add",
        "ops/loud",
        "--start-cmd",
        &format!("echo {long}; exit 3"),
        "--setup-path",
        &dir,
        "--start-check-secs",
        "1",
        "--start",
    ]);
    assert_ne!(code, 0, "{out}{err}");

    let (code, out, err) = d.cli(&["tasks", "--limit", "5"]);
    assert_eq!(code, 0, "{err}");
    let header = out.lines().next().unwrap_or("");
    assert!(
        header.starts_with("TASK") && header.contains("TIME") && header.contains("CALLER"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with(&task))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains(" restart ")
            && row.contains(" root ")
            && row.contains("ops/tw")
            && row.contains(" ok"),
        "{row}"
    );
    assert!(
        !row.contains("operate_proc") && !row.contains("127.0.0.1:"),
        "{row}"
    );
    let (code, out, err) = d.cli(&["task", &task]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("{task}: restart by root at 20")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ops/tw ") && l.contains(" ok ")),
        "{out}"
    );
    // Piped: the failed start's message is whole.
    let loud = d.call("tasks", &json!({"limit": 1}))["data"]["list"][0]["task_id"]
        .as_str()
        .expect("task id")
        .to_string();
    let (_, out, _) = d.cli(&["task", &loud]);
    assert!(out.contains("word60"), "a message cut when piped:\n{out}");

    // Events: the process column starts at the same place on every line; a message does
    // not repeat the event's type.
    let (code, out, err) = d.cli(&["events"]);
    assert_eq!(code, 0, "{err}");
    let at: Vec<usize> = out
        .lines()
        .filter(|l| l.contains(" ops/tw "))
        .map(|l| l.find(" ops/tw ").unwrap_or(0))
        .collect();
    assert!(at.len() >= 3 && at.iter().all(|p| *p == at[0]), "{out}");
    let started = out
        .lines()
        .find(|l| l.contains(" started ") && l.contains("ops/tw"))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(started.matches("started").count(), 1, "{started}");

    let (code, out, err) = d.cli(&["stop", "ops/tw"]);
    assert_eq!(code, 0, "{out}{err}");

    // A pty at 80 columns: no row wider; columns dropped rather than rows cut mid-cell.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skip: script(1) is missing; the 80-column table is not checked");
        return;
    }
    let sock = d.socket.display().to_string();
    let run_pty = |cols: u32, extra: &str| {
        let out = Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "stty cols {cols} rows 40; {CLI} --socket {sock} status {extra}"
            ))
            .arg("/dev/null")
            .env("NO_COLOR", "1")
            .output()
            .expect("script");
        String::from_utf8_lossy(&out.stdout).replace('\r', "")
    };
    let narrow = run_pty(80, "");
    let lines: Vec<&str> = narrow.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.iter().any(|l| l.starts_with("PROCESS")), "{narrow}");
    for l in &lines {
        assert!(
            l.chars().count() <= 80,
            "a row wider than 80 columns: {l:?}\n{narrow}"
        );
    }
    let head = lines
        .iter()
        .find(|l| l.starts_with("PROCESS"))
        .unwrap_or(&"");
    assert!(
        !head.contains("MANAGED") && head.contains("MESSAGE"),
        "{narrow}"
    );
    let wide = run_pty(80, "--wide");
    assert!(
        wide.contains("MANAGED") && wide.contains("word60"),
        "{wide}"
    );
    let big = run_pty(200, "");
    assert!(big.contains("MANAGED"), "{big}");
}

/// What the status table says of a process (its failure, why it is stopped) is the same
/// after an agent restart: the message is stored with the process's state.
#[test]
fn status_messages_survive_an_agent_restart() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    let dir = env.path().display().to_string();
    let (code, out, err) = d.cli(&[
        "add",
        "ops/failing",
        "--start-cmd",
        "echo cannot bind port 8080 >&2; exit 3",
        "--setup-path",
        &dir,
        "--start-check-secs",
        "1",
        "--start",
    ]);
    assert_ne!(code, 0, "{out}{err}");
    // Unmanaged again, so that no retry changes the message meanwhile.
    let (code, out, err) = d.cli(&["unmanage", "ops/failing"]);
    assert_eq!(code, 0, "{out}{err}");
    let before = d.detail(NS, "failing")["message"].clone();
    assert!(
        before.as_str().is_some_and(|m| m.contains("exit code 3")),
        "{before}"
    );
    d.terminate();
    let d = Daemon::start_with(&env, &d.config);
    let after = d.detail(NS, "failing")["message"].clone();
    assert_eq!(after, before, "the message changed across the restart");
    let (code, out, err) = d.cli(&["status", "--wide"]);
    assert!(code == 0 || code == 3, "{out}{err}");
    assert!(out.contains("exit code 3"), "{out}");
}

/// `top` on a terminal (a pty through script(1)): it fits the terminal's width and height,
/// shows UPTIME, re-sorts at once on a key and quits on `q` with status 0.
#[test]
fn top_in_a_terminal_takes_keys_and_fits_it() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skip: script(1) is missing; top's keys are not checked");
        return;
    }
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let dir = env.path().display().to_string();
    for i in 0..12 {
        let name = format!("ops/t{i:02}");
        let (code, out, err) = d.cli(&[
            "add",
            &name,
            "--start-cmd",
            "exec sleep 300",
            "--setup-path",
            &dir,
            "--start-check-secs",
            "0",
            "--start",
        ]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let sock = d.socket.display().to_string();
    let mut child = Command::new("script")
        .args(["-qefc"])
        .arg(format!(
            "stty cols 70 rows 10; {CLI} --socket {sock} top -d 0.3"
        ))
        .arg("/dev/null")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let seen = Arc::new(Mutex::new(String::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock()
                .expect("seen")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let wait_text = |what: &str, needle: &str| {
        wait_for(what, Duration::from_secs(20), || {
            seen.lock().expect("seen").contains(needle).then_some(())
        })
    };
    wait_text("the first frame", "sort: cpu");
    {
        use std::io::Write;
        stdin.write_all(b"u").expect("key");
        stdin.flush().expect("flush");
    }
    wait_text("a frame sorted by uptime", "sort: uptime");
    {
        use std::io::Write;
        stdin.write_all(b"q").expect("key");
        stdin.flush().expect("flush");
    }
    let st = wait_for("top quits on q", Duration::from_secs(20), || {
        child.try_wait().ok().flatten()
    });
    assert_eq!(st.code(), Some(0));
    let text = seen.lock().expect("seen").clone();
    // Every line of every frame fits 70 columns; at most 10 lines a frame.
    let plain: String = {
        let mut out = String::new();
        let mut esc = false;
        for c in text.chars() {
            if esc {
                esc = !c.is_ascii_alphabetic();
            } else if c == '\x1b' {
                esc = true;
                out.push('\n');
            } else if c != '\r' {
                out.push(c);
            }
        }
        out
    };
    for l in plain.lines() {
        assert!(
            l.chars().count() <= 70,
            "a line wider than the terminal: {l:?}"
        );
    }
    assert!(
        text.contains("more"),
        "the rows that do not fit are counted: {plain}"
    );
    let _ = d.cli(&["stop", "ops/*"]);
}

/// Shell completion, as the scripts ask for it (`COMPLETE=SHELL procagent -- WORDS`):
/// subcommands and flags from the CLI, registered process names from the agent; and a TAB
/// that never waits long for an agent that is down or does not answer.
#[test]
fn completion_offers_registered_names_and_never_hangs() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let dir = env.path().display().to_string();
    for name in ["ops/web", "ops/api", "other/web2"] {
        let (code, out, err) = d.cli(&[
            "add",
            name,
            "--start-cmd",
            "exec sleep 300",
            "--setup-path",
            &dir,
        ]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let complete = |socket: &str, words: &[&str]| {
        let out = Command::new(CLI)
            .env("COMPLETE", "fish")
            .env("PROCAGENT_SOCKET", socket)
            .arg("--")
            .arg("procagent")
            .args(words)
            .output()
            .expect("procagent");
        assert!(out.status.success(), "{words:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').next().unwrap_or("").to_string())
            .collect::<Vec<String>>()
    };
    let sock = d.socket.display().to_string();
    assert!(complete(&sock, &["rel"]).contains(&"reload".to_string()));
    assert!(complete(&sock, &["start", "--la"]).contains(&"--label".to_string()));
    assert_eq!(
        complete(&sock, &["stop", "ops/"]),
        vec!["ops/api", "ops/web"]
    );
    assert_eq!(complete(&sock, &["logs", "-f", "oth"]), vec!["other/web2"]);
    assert_eq!(complete(&sock, &["status", "ops/w"]), vec!["ops/web"]);
    assert_eq!(complete(&sock, &["remove", "ops/a"]), vec!["ops/api"]);
    // The agent down (no socket), and an agent that never answers (a socket nobody
    // accepts on): no names, and the TAB returns (bounded by the completer's deadline).
    assert!(complete(&env.p("none.sock"), &["stop", "ops/"]).is_empty());
    let silent = env.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).expect("bind");
    let silent_s = silent.display().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = Command::new(CLI)
            .env("COMPLETE", "fish")
            .env("PROCAGENT_SOCKET", &silent_s)
            .args(["--", "procagent", "stop", "ops/"])
            .output();
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a completion waited on an agent that does not answer")
        .expect("procagent");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}
