//! Upgrade compatibility (issue 13 item 8): a state.db written by the agent at f37add0
//! (`tests/fixtures/state-f37add0.db`, made as `tests/fixtures/README.md` says, left as a
//! SIGKILL left it) opens under this code with nothing lost: every definition field for
//! field, every intent (managed, unmanaged, stopped, completed), every finished task and
//! event, as the old agent itself reported them just before it was killed
//! (`tests/fixtures/state-f37add0.json`). A process it recorded as running that still runs
//! (here: the pid-file daemon, started again by the test, since a fixture carries no live
//! process) is re-adopted, not started a second time.
//!
//! The fixture's definitions point under `/tmp/procagent-compat-fixture`, which this test
//! recreates (under a lock, so two runs cannot share it) and removes, with every process
//! under it.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Daemon, TestEnv, wait_for};
use serde_json::{Value, json};

const FIXTURE_DB: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/state-f37add0.db"
);
const FIXTURE_JSON: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/state-f37add0.json"
);
const ROOT: &str = "/tmp/procagent-compat-fixture";

/// The rest of the config the fixture was made with (its `[supervisor]` and its one
/// config-declared process, verbatim).
const CONFIG_EXTRA: &str = r#"
[supervisor]
backoff_initial = "1h"
backoff_max = "2h"
backoff_reset = "1h"

[[process]]
namespace = "compat"
name = "configured"
labels = { app = "configured", tier = 2, canary = true }
setup_path = "/tmp/procagent-compat-fixture/configured"
proc_name = "compat-cfg"
pid_path = ""
log_path = "/tmp/procagent-compat-fixture/configured/out.log"
start_cmd = "echo \"$COMPAT_MODE:$COMPAT_EMPTY:$COMPAT_SPACE\" > env.out; exec ./compat-cfg 100000"
cpu_lmt = 10.5
mem_lmt = 5.0
auto_type = "resident"
start_check_secs = 1
stop_check_secs = 2
op_timeout = 15
cmd_shell_ext = "sh"
env = { COMPAT_MODE = "fixture", COMPAT_EMPTY = "", COMPAT_SPACE = "a b" }
autostart = false
"#;

/// The fixture's directory tree, held under an exclusive lock; on drop every process under
/// it is killed (by pid) and the tree removed.
struct FixtureRoot {
    _lock: nix::fcntl::Flock<std::fs::File>,
    children: Vec<Child>,
}

impl FixtureRoot {
    fn new() -> FixtureRoot {
        let path = format!("{ROOT}.lock");
        // flock needs no write access: another account's lock file is opened read-only.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .or_else(|_| std::fs::File::open(&path))
            .expect("lock file");
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lock the fixture root");
        let root = FixtureRoot {
            _lock: lock,
            children: Vec::new(),
        };
        root.kill_all();
        let _ = std::fs::remove_dir_all(ROOT);
        for d in [
            "fg",
            "pidd",
            "stopped",
            "loose",
            "periodic",
            "backoff",
            "registered",
            "job",
            "configured",
        ] {
            std::fs::create_dir_all(Path::new(ROOT).join(d)).expect("mkdir");
        }
        // The programs the definitions run (renamed copies of sleep, as when it was made).
        for (dir, prog) in [
            ("fg", "compat-fg"),
            ("pidd", "compat-pidd"),
            ("stopped", "compat-stopped"),
            ("loose", "compat-loose"),
            ("backoff", "compat-crash"),
            ("configured", "compat-cfg"),
        ] {
            common::program_at(&Path::new(ROOT).join(dir), prog);
        }
        root
    }

    /// Every live process whose executable or working directory is under the root.
    fn processes() -> Vec<(i32, String)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if !common::alive(pid) {
                continue;
            }
            let link = |what: &str| {
                std::fs::read_link(format!("/proc/{pid}/{what}"))
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            };
            let (exe, cwd) = (link("exe"), link("cwd"));
            if exe.starts_with(ROOT) || cwd.starts_with(ROOT) {
                out.push((pid, exe));
            }
        }
        out
    }

    /// The live processes running `ROOT/dir/prog`.
    fn running(dir: &str, prog: &str) -> Vec<i32> {
        let exe = format!("{ROOT}/{dir}/{prog}");
        Self::processes()
            .into_iter()
            .filter(|(_, e)| *e == exe)
            .map(|(p, _)| p)
            .collect()
    }

    fn kill_all(&self) {
        for _ in 0..3 {
            let ps = Self::processes();
            if ps.is_empty() {
                return;
            }
            for (pid, _) in ps {
                common::kill9(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FixtureRoot {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_all();
        let _ = std::fs::remove_dir_all(ROOT);
    }
}

/// `want` (the old agent's answer) is contained in `got`: every field it has, equal; a
/// field the new agent adds is allowed.
fn contains(got: &Value, want: &Value, path: &str) -> Result<(), String> {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                let gv = g
                    .get(k)
                    .ok_or_else(|| format!("{path}.{k}: missing (was {wv})"))?;
                contains(gv, wv, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(g), Value::Array(w)) if g.len() == w.len() => {
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                contains(gv, wv, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ if got == want => Ok(()),
        _ => Err(format!("{path}: {got} (was {want})")),
    }
}

fn procs(d: &Daemon) -> Vec<Value> {
    let r = d.call("procs", &json!({}));
    assert_eq!(r["result"], json!(true), "procs: {r}");
    r["data"]["list"].as_array().cloned().unwrap_or_default()
}

fn find<'a>(list: &'a [Value], ns: &str, name: &str) -> Option<&'a Value> {
    list.iter()
        .find(|p| p["namespace"] == json!(ns) && p["name"] == json!(name))
}

#[test]
fn a_state_db_from_f37add0_opens_with_nothing_lost_and_readopts() {
    let old: Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE_JSON).expect("fixture json"))
            .expect("fixture json");
    let mut root = FixtureRoot::new();
    let env = TestEnv::new();
    std::fs::create_dir_all(env.path().join("state")).expect("mkdir state");
    std::fs::copy(FIXTURE_DB, env.path().join("state/state.db")).expect("copy fixture");

    // The pid-file daemon the fixture recorded as running, running again (a fixture carries
    // no live process): its program, in its setup_path, its pid in the definition's pid file.
    let pidd = Command::new(format!("{ROOT}/pidd/compat-pidd"))
        .arg("100000")
        .current_dir(format!("{ROOT}/pidd"))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the pid-file daemon");
    let pidd_pid = pidd.id() as i32;
    root.children.push(pidd);
    let pid_file = format!("{ROOT}/pidd/pidd.pid");
    std::fs::write(&pid_file, format!("{pidd_pid}\n")).expect("pid file");

    let d = Daemon::start(&env, CONFIG_EXTRA);
    let config_source = format!("config:{}", d.config.display());

    // Re-adoption: the pid-file daemon is running under the agent with the pid it had, and
    // no second copy was started.
    let pidd_now = wait_for("compat/pidd adopted", Duration::from_secs(30), || {
        let p = d.detail("compat", "pidd");
        (p["state"] == json!("running")).then_some(p)
    });
    assert_eq!(pidd_now["pids"], json!([pidd_pid]), "{pidd_now}");
    assert_eq!(pidd_now["managed"], json!(true), "{pidd_now}");
    let st = d.status("compat", "pidd");
    assert_eq!(st["pid"], json!(pidd_pid), "get_proc_status: {st}");

    // The managed processes whose recorded process is gone are started again: once.
    let fg = wait_for("compat/fg started again", Duration::from_secs(30), || {
        let p = d.detail("compat", "fg");
        (p["state"] == json!("running")).then_some(p)
    });
    let fg_pid = fg["pids"][0].as_i64().expect("fg pid") as i32;
    let cfg = wait_for(
        "compat/configured started again",
        Duration::from_secs(30),
        || {
            let p = d.detail("compat", "configured");
            (p["state"] == json!("running")).then_some(p)
        },
    );
    // ... with the config's environment.
    let env_out = wait_for("env.out", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("{ROOT}/configured/env.out")).ok()
    });
    assert_eq!(env_out, "fixture::a b\n");

    // Definitions: every one present, field for field; the unregistered one stays gone.
    let now = procs(&d);
    let old_procs = old["procs"].as_array().expect("procs");
    let mut names: Vec<String> = now
        .iter()
        .map(|p| format!("{}/{}", p["namespace"], p["name"]))
        .collect();
    let mut old_names: Vec<String> = old_procs
        .iter()
        .map(|p| format!("{}/{}", p["namespace"], p["name"]))
        .collect();
    names.sort();
    old_names.sort();
    assert_eq!(names, old_names, "the registered processes");
    let mut errors = Vec::new();
    for o in old_procs {
        let (ns, name) = (
            o["namespace"].as_str().unwrap_or(""),
            o["name"].as_str().unwrap_or(""),
        );
        let Some(p) = find(&now, ns, name) else {
            continue;
        };
        let mut want = json!({
            "spec": o["spec"],
            "labels": o["labels"],
            "register_time": o["register_time"],
            "auto_type": o["auto_type"],
            "instance_num": o["instance_num"],
            "managed": o["managed"],
            "source": o["source"],
        });
        if o["source"] == json!("config:CONFIG") {
            want["source"] = json!(config_source);
        }
        if let Err(e) = contains(p, &want, &format!("{ns}/{name}")) {
            errors.push(e);
        }
        // Restart counts are never lost.
        if p["restarts"].as_u64() < o["restarts"].as_u64() {
            errors.push(format!(
                "{ns}/{name}.restarts: {} (was {})",
                p["restarts"], o["restarts"]
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "lost in the upgrade:\n{}",
        errors.join("\n")
    );

    // Intents: stopped stays stopped with its last exit; unmanaged and never-started ones
    // are not started; the completed single-run job is not run again.
    let stopped = find(&now, "compat", "stopped").expect("stopped");
    let old_stopped = find(old_procs, "compat", "stopped").expect("stopped");
    assert_eq!(stopped["state"], json!("stopped"), "{stopped}");
    assert_eq!(stopped["flag"], json!(2), "{stopped}");
    assert_eq!(stopped["last_exit"], old_stopped["last_exit"], "{stopped}");
    for (ns, name) in [("compat", "loose"), ("compat", "registered")] {
        let p = find(&now, ns, name).expect("present");
        assert_eq!(p["managed"], json!(false), "{p}");
        assert_eq!(p["pids"], json!([]), "{p}");
    }
    let job = find(&now, "GSEKIT_BIZ_2", "compat_job_1").expect("job");
    assert_eq!(job["state"], json!("completed"), "{job}");
    for (ns, name) in [
        ("compat", "backoff"),
        ("compat", "periodic"),
        ("GSEKIT_BIZ_2", "compat_job_1"),
    ] {
        let p = find(&now, ns, name).expect("present");
        assert_eq!(p["managed"], json!(true), "{p}");
    }

    // Tasks: every finished task as the old agent answered it, through both APIs.
    let tasks = d.call("tasks", &json!({"limit": 1000}));
    assert_eq!(tasks["result"], json!(true), "tasks: {tasks}");
    let tasks = tasks["data"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for t in old["tasks"].as_array().expect("tasks") {
        let id = &t["task_id"];
        let got = tasks
            .iter()
            .find(|n| n["task_id"] == *id)
            .unwrap_or_else(|| panic!("task {id} lost"));
        if let Err(e) = contains(got, t, &format!("task {id}")) {
            panic!("{e}");
        }
        if t["api"] == json!("operate_proc") {
            let r = d.call("get_proc_operate_result", &json!({"task_id": id}));
            for item in t["items"].as_array().expect("items") {
                let key = item["key"].as_str().expect("key");
                assert_eq!(r["data"][key], item["result"], "task {id} key {key}: {r}");
            }
        }
    }

    // Events: every one, with its id.
    let events = d.get("/v1/events?limit=10000");
    let events = events["data"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for ev in old["events"].as_array().expect("events") {
        let got = events
            .iter()
            .find(|n| n["id"] == ev["id"])
            .unwrap_or_else(|| panic!("event {} lost", ev["id"]));
        assert_eq!(got, ev, "event {}", ev["id"]);
    }

    // Nothing started twice: one daemon copy (the adopted one, its pid file untouched), one
    // foreground copy each, and nothing for the unmanaged, stopped or completed ones.
    assert_eq!(FixtureRoot::running("pidd", "compat-pidd"), vec![pidd_pid]);
    assert_eq!(common::read_pid(&pid_file), Some(pidd_pid));
    assert_eq!(FixtureRoot::running("fg", "compat-fg"), vec![fg_pid]);
    assert_eq!(
        FixtureRoot::running("configured", "compat-cfg"),
        vec![cfg["pids"][0].as_i64().expect("cfg pid") as i32]
    );
    for (dir, prog) in [("loose", "compat-loose"), ("stopped", "compat-stopped")] {
        assert_eq!(FixtureRoot::running(dir, prog), Vec::<i32>::new(), "{dir}");
    }
    assert!(
        !Path::new(&format!("{ROOT}/job/done.txt")).exists(),
        "the completed job ran again"
    );
    let pidd_events = d.events("compat/pidd");
    let last_old = old["events"]
        .as_array()
        .and_then(|e| e.last())
        .and_then(|e| e["id"].as_i64())
        .unwrap_or(0);
    let new_events: Vec<&Value> = pidd_events
        .iter()
        .filter(|ev| ev["id"].as_i64().unwrap_or(0) > last_old)
        .collect();
    assert!(
        new_events
            .iter()
            .any(|ev| ev["kind"] == json!("adopted") && ev["data"]["pid"] == json!(pidd_pid)),
        "compat/pidd was not adopted: {new_events:?}"
    );
    assert!(
        !new_events.iter().any(|ev| ev["kind"] == json!("started")),
        "compat/pidd was started again: {new_events:?}"
    );
    if std::env::var_os("COMPAT_DUMP").is_some() {
        eprintln!(
            "COMPAT_DUMP {}",
            serde_json::to_string(&procs(&d)).unwrap_or_default()
        );
    }
    drop(d);
}
