//! Faults the agent must survive: a full or read-only state directory, a corrupted database,
//! commands that hang, flood their output or fork a thousand children, SIGTERM, and pid
//! files that lie.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sec::{Mount, can_mount, have};
use common::*;
use serde_json::{Value, json};

const NS: &str = "faults";

/// Start a daemon whose state directory is `state`.
fn start_on(env: &TestEnv, state: &Path, extra: &str) -> Daemon {
    let cfg = env.path().join("agent.toml");
    std::fs::write(
        &cfg,
        Daemon::config_text(env, extra).replace(&env.p("state"), &state.display().to_string()),
    )
    .expect("write config");
    let mut d = Daemon::start_with(env, &cfg);
    d.state = state.to_path_buf();
    d
}

fn health(d: &Daemon) -> Value {
    d.get("/v1/healthz")["data"].clone()
}

/// Wait until the agent has restarted `name` after its pid `old` was killed; returns the
/// new pid.
fn restarted(d: &Daemon, env: &TestEnv, name: &str, old: i32) -> i32 {
    wait_for(
        &format!("{name} restarted by supervision"),
        Duration::from_secs(30),
        || {
            let st = d.status(NS, name);
            let p = st["pid"].as_i64().unwrap_or(-1) as i32;
            (p > 0 && p != old && alive(p) && read_pid(&env.p(&format!("{name}.pid"))) == Some(p))
                .then_some(p)
        },
    )
}

/// Live processes running the fixture program `name`.
fn running_program(env: &TestEnv, name: &str) -> Vec<i32> {
    let want = env.p(name);
    env.processes()
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .map(|x| x.display().to_string() == want)
                .unwrap_or(false)
        })
        .collect()
}

const FAST: &str = "[supervisor]\nsweep_interval = \"100ms\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\n";

/// Fill the file system of `dir` with a new file (`filler`, `filler1`, ...) until it is full.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = (0..)
        .map(|i| {
            dir.join(if i == 0 {
                "filler".to_string()
            } else {
                format!("filler{i}")
            })
        })
        .find(|p| !p.exists())
        .expect("a free name");
    let mut f = std::fs::File::create(&p).expect("create filler");
    let block = vec![0xa5u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.write_all(&block[..1]);
    let _ = f.sync_all();
    p
}

#[test]
fn full_state_dir_keeps_supervising_and_writes_land_when_space_returns() {
    let env = TestEnv::new();
    if let Err(why) = can_mount(env.path()) {
        eprintln!("skipped: {why}");
        return;
    }
    let mnt = Mount::tmpfs(&env.path().join("statefs"), "8m").unwrap();
    let state = mnt.path.join("state");
    let mut d = start_on(&env, &state, FAST);
    d.register(NS, "m1", daemon_spec(&env, "m1", json!({})));
    assert_eq!(d.op(NS, "m1", 0)["error_code"], json!(0));
    let pid1 = read_pid(&env.p("m1.pid")).unwrap();
    d.register(NS, "m2", daemon_spec(&env, "m2", json!({})));

    let filler = fill(&mnt.path);
    // A change that must be durable is refused, and nothing changes.
    let r = d.call(
        "register_proc_info",
        &json!({"meta": {"namespace": NS, "name": "m3"}, "hosts": [Daemon::host()], "spec": daemon_spec(&env, "m3", json!({}))}),
    );
    let k = &r["data"][Daemon::key(NS, "m3")];
    assert_ne!(k["error_code"], json!(0), "{r}");
    assert!(
        k["error_msg"].as_str().unwrap().contains("state store"),
        "{r}"
    );
    assert_eq!(d.status(NS, "m3")["status"], json!(0), "m3 not registered");
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "m2"}, "op_type": 0, "hosts": [Daemon::host()]}),
    );
    assert_eq!(r["result"], json!(false), "no task can be recorded: {r}");
    assert_eq!(r["code"], json!(1_000_503), "{r}");
    // Reported.
    let h = health(&d);
    assert_eq!(h["store_writable"], json!(false), "{h}");
    assert!(h["status"].as_str().unwrap().contains("degraded"), "{h}");
    // Still supervising: a managed process that dies is restarted.
    kill9(pid1);
    let pid2 = restarted(&d, &env, "m1", pid1);
    // Still serving reads.
    assert_eq!(d.status(NS, "m1")["status"], json!(1));
    assert_eq!(d.detail(NS, "m2")["name"], json!("m2"));
    assert!(!d.events(&format!("{NS}/m1")).is_empty());
    assert!(
        d.log_text().contains("queued"),
        "the log says writes are queued"
    );

    // Space returns: the queued writes land without a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_for("store writable again", Duration::from_secs(30), || {
        (health(&d)["store_writable"] == json!(true)).then_some(())
    });
    assert_eq!(health(&d)["status"], json!("ok"));
    // The restart is over once its start check passes (the "restarted" event).
    wait_for(
        "the restart's start check passed",
        Duration::from_secs(30),
        || {
            d.events(&format!("{NS}/m1"))
                .iter()
                .any(|e| e["data"]["pid"] == json!(pid2) && e["kind"] == json!("restarted"))
                .then_some(())
        },
    );
    // And they are on disk: after kill -9 the agent knows the restarted pid and the
    // restart event, and adopts the process instead of starting another.
    d.kill9();
    let d = start_on(&env, &state, FAST);
    let st = d.status(NS, "m1");
    assert_eq!(
        (st["status"].clone(), st["pid"].clone()),
        (json!(1), json!(pid2)),
        "{st}"
    );
    let evs = d.events(&format!("{NS}/m1"));
    assert!(
        evs.iter()
            .any(|e| e["data"]["pid"] == json!(pid2) && e["kind"] == json!("restarted")),
        "the restart during the outage was recorded: {evs:?}"
    );
    assert_eq!(running_program(&env, "m1"), vec![pid2]);
    drop(d);
    env.kill_all();
}

/// Stop, kill and unmanage still act on a full state directory: their intent is committed
/// through the reserve while it lasts; beyond it they act all the same, answer that the intent
/// is not durable, and it is committed once space returns.
#[test]
fn full_state_dir_stop_kill_and_unmanage_still_act() {
    let env = TestEnv::new();
    if let Err(why) = can_mount(env.path()) {
        eprintln!("skipped: {why}");
        return;
    }
    let mnt = Mount::tmpfs(&env.path().join("statefs"), "16m").unwrap();
    let state = mnt.path.join("state");
    let cfg = format!("{FAST}[store]\nreserve_bytes = 1048576\n");
    let mut d = start_on(&env, &state, &cfg);
    for n in ["s1", "s2", "s3", "s4"] {
        d.register(NS, n, daemon_spec(&env, n, json!({})));
        assert_eq!(d.op(NS, n, 0)["error_code"], json!(0));
    }
    let pid = |n: &str| read_pid(&env.p(&format!("{n}.pid"))).unwrap();
    let (p1, p2, p3, p4) = (pid("s1"), pid("s2"), pid("s3"), pid("s4"));
    assert!(state.join("reserve").exists(), "the reserve is in place");

    let filler = fill(&mnt.path);
    // A start is still refused (nothing may eat the reserve but what must act).
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "s1"}, "op_type": 7, "hosts": [Daemon::host()]}),
    );
    assert_eq!(r["code"], json!(1_000_503), "{r}");
    // A stop of a process that is not registered acts on nothing: refused like the start, so
    // such requests can neither fill the retry queue nor spend the reserve.
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "nobody"}, "op_type": 1, "hosts": [Daemon::host()]}),
    );
    assert_eq!(r["code"], json!(1_000_503), "{r}");
    // stop: acts, and its intent is durable (committed into the released reserve).
    let r = d.op(NS, "s1", 1);
    assert_eq!(r["error_code"], json!(0), "{r}");
    assert!(
        !r["error_msg"].as_str().unwrap().contains("not durable"),
        "{r}"
    );
    assert!(!alive(p1));
    // Proof: kill -9 and restart the agent on the still-full disk; s1 stays stopped.
    d.kill9();
    let mut d = start_on(&env, &state, &cfg);
    let st = d.status(NS, "s1");
    assert_eq!(
        (st["status"].clone(), st["isauto"].clone()),
        (json!(2), json!(false)),
        "{st}"
    );
    assert_eq!(d.status(NS, "s2")["pid"], json!(p2), "s2 adopted");

    // Whatever the commit left of the reserve is filled too: now nothing can be committed.
    let filler2 = fill(&mnt.path);
    let r = d.op(NS, "s2", 9);
    assert_eq!(r["error_code"], json!(0), "kill acts: {r}");
    let msg = r["error_msg"].as_str().unwrap();
    assert!(msg.contains("not durable"), "kill says so: {r}");
    assert!(!alive(p2));
    let r = d.op(NS, "s3", 4);
    assert_eq!(r["error_code"], json!(0), "unmanage acts: {r}");
    assert!(
        r["error_msg"].as_str().unwrap().contains("not durable"),
        "{r}"
    );
    assert_eq!(d.status(NS, "s3")["isauto"], json!(false));
    let r = d.op(NS, "s4", 1);
    assert_eq!(r["error_code"], json!(0), "stop acts: {r}");
    assert!(
        r["error_msg"].as_str().unwrap().contains("not durable"),
        "{r}"
    );
    assert!(!alive(p4));
    // Unmanaged: s3 killed by hand is not restarted; s2 and s4 stay stopped.
    kill9(p3);
    let h = health(&d);
    assert_eq!(h["store_writable"], json!(false), "{h}");

    // Space returns: the queued intents land, the reserve comes back, health is ok.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    wait_for("store writable again", Duration::from_secs(30), || {
        (health(&d)["status"] == json!("ok")).then_some(())
    });
    assert!(state.join("reserve").exists(), "the reserve is back");
    // And they are on disk: after kill -9, nothing the operator stopped comes back.
    d.kill9();
    let d = start_on(&env, &state, &cfg);
    std::thread::sleep(Duration::from_millis(1500));
    for n in ["s1", "s2", "s3", "s4"] {
        let st = d.status(NS, n);
        assert_eq!(
            (st["status"].clone(), st["isauto"].clone()),
            (json!(2), json!(false)),
            "{n}: {st}"
        );
        assert!(running_program(&env, n).is_empty(), "{n} not restarted");
    }
    drop(d);
    env.kill_all();
}

#[test]
fn state_dir_gone_read_only_keeps_supervising_and_serving() {
    let env = TestEnv::new();
    if let Err(why) = can_mount(env.path()) {
        eprintln!("skipped: {why}");
        return;
    }
    if !have("mkfs.ext4") {
        eprintln!("skipped: mkfs.ext4 is not installed");
        return;
    }
    let image = env.path().join("state.img");
    let mut mnt = match Mount::ext4(&image, 32, &env.path().join("statefs")) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: cannot loop-mount an ext4 image here: {e}");
            return;
        }
    };
    let state = mnt.path.join("state");
    let mut d = start_on(&env, &state, FAST);
    d.register(NS, "r1", daemon_spec(&env, "r1", json!({})));
    assert_eq!(d.op(NS, "r1", 0)["error_code"], json!(0));
    let pid1 = read_pid(&env.p("r1.pid")).unwrap();
    d.register(NS, "r2", daemon_spec(&env, "r2", json!({})));

    // The disk fails: the kernel remounts it read-only under the agent.
    if let Err(e) = mnt.trigger_fs_error() {
        eprintln!("skipped: this kernel cannot fail an ext4 mount on demand: {e}");
        return;
    }
    let r = d.call(
        "unregister_proc_info",
        &json!({"meta": {"namespace": NS, "name": "r2"}, "hosts": [Daemon::host()]}),
    );
    assert_ne!(
        r["data"][Daemon::key(NS, "r2")]["error_code"],
        json!(0),
        "{r}"
    );
    assert_eq!(
        d.detail(NS, "r2")["name"],
        json!("r2"),
        "r2 still registered"
    );
    let h = health(&d);
    assert_eq!(h["store_writable"], json!(false), "{h}");
    assert!(h["status"].as_str().unwrap().contains("degraded"), "{h}");
    kill9(pid1);
    let pid2 = restarted(&d, &env, "r1", pid1);
    assert_eq!(d.status(NS, "r1")["status"], json!(1));
    assert!(health(&d)["status"].as_str().unwrap().contains("degraded"));

    // SIGTERM still exits cleanly (the final flush fails and says so); the process runs on.
    let st = d.terminate().unwrap();
    assert!(st.success(), "exit status {st}: {}", d.log_text());
    assert!(alive(pid2));
    // The disk is repaired (unmount, fsck, mount): the agent finds what was committed
    // before the failure and adopts the running process through its pid file. The file
    // system is free once the output keeper, holding no pipe, has exited after the agent.
    wait_for(
        "the state file system released",
        Duration::from_secs(10),
        || mnt.unmount().ok(),
    );
    let _ = std::process::Command::new("e2fsck")
        .args(["-fy", &image.display().to_string()])
        .output();
    let mnt2 = Mount::ext4(&image, 32, &env.path().join("statefs")).unwrap();
    let d = start_on(&env, &mnt2.path.join("state"), FAST);
    let st = wait_for("r1 adopted", Duration::from_secs(30), || {
        let st = d.status(NS, "r1");
        (st["status"] == json!(1)).then_some(st)
    });
    assert_eq!(st["pid"], json!(pid2), "adopted, not restarted: {st}");
    assert_eq!(running_program(&env, "r1"), vec![pid2]);
    assert_eq!(d.detail(NS, "r2")["name"], json!("r2"));
    drop(d);
    env.kill_all();
}

#[test]
fn read_only_state_dir_at_start_is_refused_with_its_path() {
    let env = TestEnv::new();
    if let Err(why) = can_mount(env.path()) {
        eprintln!("skipped: {why}");
        return;
    }
    let state = env.path().join("rostate");
    std::fs::create_dir_all(&state).unwrap();
    let mut mnt = Mount::tmpfs(&state, "1m").unwrap();
    let out = std::process::Command::new("mount")
        .args(["-o", "remount,ro", &state.display().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let cfg = env.path().join("ro.toml");
    std::fs::write(
        &cfg,
        Daemon::config_text(&env, "").replace(&env.p("state"), &state.display().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new(DAEMON)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&state.display().to_string()) && err.contains("Read-only"),
        "{err}"
    );
    mnt.unmount().unwrap();
}

#[test]
fn corrupted_database_is_refused_with_its_path_and_left_alone() {
    let env = TestEnv::new();
    // A database written by the agent, then damaged in its middle pages.
    let mut d = Daemon::start(&env, "");
    for i in 0..40 {
        d.register(
            NS,
            &format!("c{i}"),
            daemon_spec(
                &env,
                &format!("c{i}"),
                json!({"version_cmd": "x".repeat(2000)}),
            ),
        );
    }
    d.terminate();
    let db = env.path().join("state/state.db");
    // Move everything into the main file, then damage it.
    {
        let c = rusqlite::Connection::open(&db).expect("open");
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    let _ = std::fs::remove_file(env.path().join("state/state.db-wal"));
    let _ = std::fs::remove_file(env.path().join("state/state.db-shm"));
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 4 * 4096, "{}", bytes.len());
    let end = bytes.len() - 4096;
    for b in &mut bytes[4096..end] {
        *b ^= 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let run = || {
        std::process::Command::new(DAEMON)
            .arg("--config")
            .arg(&d.config)
            .output()
            .unwrap()
    };
    for (what, content) in [
        ("damaged pages", bytes.clone()),
        ("not a database", b"this is not sqlite".repeat(500)),
    ] {
        std::fs::write(&db, &content).unwrap();
        let out = run();
        assert!(!out.status.success(), "{what}: started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&db.display().to_string()) && err.contains("corrupt"),
            "{what}: {err}"
        );
        assert_eq!(std::fs::read(&db).unwrap(), content, "{what}: file touched");
    }
}

#[test]
fn commands_that_hang_are_cut_at_op_timeout() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let hang = env.program("hangcmd");
    // A start command that never returns and never writes its pid file.
    let mut spec = daemon_spec(&env, "h1", json!({}));
    spec["control"]["start_cmd"] = json!(format!("{hang} 10000"));
    spec["identity"]["pid_path"] = json!(env.p("h1.pid"));
    spec["monitor_policy"]["op_timeout"] = json!(2);
    spec["monitor_policy"]["start_check_secs"] = json!(30);
    d.register(NS, "h1", spec);
    let r = d.op(NS, "h1", 0);
    assert_eq!(r["error_code"], json!(65535), "{r}");
    assert!(
        r["error_msg"].as_str().unwrap().contains("op_timeout"),
        "{r}"
    );
    // A stop command that hangs: cut at op_timeout, and the stop still happens by signal.
    let mut spec = daemon_spec(&env, "h2", json!({}));
    spec["control"]["stop_cmd"] = json!(format!("{hang} 10000"));
    spec["monitor_policy"]["op_timeout"] = json!(2);
    d.register(NS, "h2", spec);
    assert_eq!(d.op(NS, "h2", 0)["error_code"], json!(0));
    let pid = read_pid(&env.p("h2.pid")).unwrap();
    let r = d.op(NS, "h2", 1);
    assert_eq!(r["error_code"], json!(0), "{r}");
    assert!(!alive(pid));
    wait_for("hung commands gone", Duration::from_secs(15), || {
        running_program(&env, "hangcmd").is_empty().then_some(())
    });
    assert!(zombies_of(d.pid()).is_empty());
}

/// A command flooding its output: its result keeps the tail, bounded; the files stay within
/// `output_file_bytes` each, `output_files` in all. (A daemon flooding for seconds, sampled
/// all along: `tests/output_capture.rs`.)
#[test]
fn output_floods_are_bounded_in_results_and_files() {
    let env = TestEnv::new();
    let (file_bytes, files) = (1u64 << 20, 3usize);
    let d = Daemon::start(
        &env,
        &format!(
            "[store]\nmax_output_bytes = 4096\noutput_file_bytes = {file_bytes}\noutput_files = {files}\n[supervisor]\nsweep_interval = \"100ms\"\n"
        ),
    );
    // A finite flood (4x the files' bound), and one that never stops until op_timeout.
    let mut spec = daemon_spec(&env, "f1", json!({}));
    spec["monitor_policy"]["op_timeout"] = json!(3);
    let out = d.state.join("output");
    let outputs = || -> Vec<PathBuf> {
        std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("__f1."))
            .collect()
    };
    for (cmd, what) in [
        (
            "yes FLOODFLOODFLOOD | head -c 12582912; exit 3",
            "exit code 3",
        ),
        ("yes FLOODFLOODFLOOD", "timed out"),
    ] {
        spec["control"]["reload_cmd"] = json!(cmd);
        let r = d.call(
            "update_proc_info",
            &json!({"meta": {"namespace": NS, "name": "f1"}, "hosts": [Daemon::host()], "spec": spec}),
        );
        assert_eq!(r["result"], json!(true), "{r}");
        let r = d.op(NS, "f1", 8);
        assert_eq!(r["error_code"], json!(65535), "{r}");
        let msg = r["error_msg"].as_str().unwrap();
        assert!(
            msg.len() < 4096 + 512,
            "result bounded: {} bytes",
            msg.len()
        );
        assert!(
            msg.contains("FLOODFLOODFLOOD") && msg.contains("bytes cut"),
            "the tail of the output is kept"
        );
        assert!(msg.contains(what), "{}", &msg[..200.min(msg.len())]);
        let fs = outputs();
        assert!(fs.len() <= files, "{fs:?}");
        for f in fs {
            let len = std::fs::metadata(&f).unwrap().len();
            assert!(len <= file_bytes, "{} is {len} bytes", f.display());
        }
    }
}

#[test]
fn a_thousand_forked_children_are_all_reaped() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let kid = env.program("forkling");
    let mut spec = daemon_spec(&env, "fk", json!({}));
    // The shell leaves 1000 children behind (orphans: the agent, a subreaper, inherits
    // them) and exits.
    spec["control"]["reload_cmd"] = json!(format!(
        "i=0; while [ $i -lt 1000 ]; do {kid} 0.5 & i=$((i+1)); done; exit 0"
    ));
    spec["monitor_policy"]["op_timeout"] = json!(20);
    d.register(NS, "fk", spec.clone());
    assert_eq!(d.op(NS, "fk", 8)["error_code"], json!(0));
    wait_for(
        "every child exited and was reaped",
        Duration::from_secs(60),
        || {
            (running_program(&env, "forkling").is_empty() && zombies_of(d.pid()).is_empty())
                .then_some(())
        },
    );
    // ... or forks 1000 that never end and hangs until op_timeout kills its group.
    spec["control"]["reload_cmd"] = json!(format!(
        "i=0; while [ $i -lt 1000 ]; do {kid} 10000 & i=$((i+1)); done; wait"
    ));
    spec["monitor_policy"]["op_timeout"] = json!(8);
    let r = d.call(
        "update_proc_info",
        &json!({"meta": {"namespace": NS, "name": "fk"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let r = d.op(NS, "fk", 8);
    assert_eq!(r["error_code"], json!(65535), "{r}");
    assert!(
        r["error_msg"].as_str().unwrap().contains("timed out"),
        "{r}"
    );
    wait_for(
        "the hung group killed and reaped",
        Duration::from_secs(60),
        || {
            (running_program(&env, "forkling").is_empty() && zombies_of(d.pid()).is_empty())
                .then_some(())
        },
    );
    assert!(health(&d)["status"] == json!("ok"));
}

#[test]
fn sigterm_exits_cleanly_and_managed_processes_keep_running() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    d.register(NS, "s1", daemon_spec(&env, "s1", json!({})));
    d.register(NS, "s2", daemon_spec(&env, "s2", json!({})));
    d.register(NS, "s3", daemon_spec(&env, "s3", json!({})));
    for n in ["s1", "s2", "s3"] {
        assert_eq!(d.op(NS, n, 0)["error_code"], json!(0));
    }
    assert_eq!(d.op(NS, "s3", 4)["error_code"], json!(0), "s3 unmanaged");
    let pids: Vec<i32> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| read_pid(&env.p(&format!("{n}.pid"))).unwrap())
        .collect();
    let st = d.terminate().expect("exit status");
    assert!(st.success(), "clean exit: {st}\n{}", d.log_text());
    assert!(!d.socket.exists(), "socket removed");
    for p in &pids {
        assert!(alive(*p), "pid {p} was stopped with the agent");
    }
    assert!(d.log_text().contains("managed processes keep running"));
    let d = Daemon::start(&env, "");
    for (n, p) in ["s1", "s2", "s3"].iter().zip(&pids) {
        let st = d.status(NS, n);
        assert_eq!(
            (st["status"].clone(), st["pid"].clone()),
            (json!(1), json!(p)),
            "{n}: {st}"
        );
        assert_eq!(running_program(&env, n), vec![*p], "{n} runs exactly once");
    }
    assert_eq!(d.status(NS, "s1")["isauto"], json!(true));
    assert_eq!(d.status(NS, "s3")["isauto"], json!(false));
}

#[test]
fn hostile_pid_files_are_never_adopted_or_signalled() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    let by = env.program("bystander");
    let mut child = std::process::Command::new(&by)
        .arg("100000")
        .spawn()
        .unwrap();
    let bpid = child.id() as i32;
    let init_comm = std::fs::read_to_string("/proc/1/comm")
        .unwrap_or_default()
        .trim()
        .to_string();
    let real = env.p("real.pid");
    std::fs::write(&real, format!("{bpid}\n")).unwrap();
    enum Content {
        Text(String),
        Symlink(String),
        Fifo,
        Dir,
    }
    let cases: Vec<(&str, Content, String)> = vec![
        (
            "garbage",
            Content::Text("not a pid\n".into()),
            "bystander".into(),
        ),
        (
            "binary",
            Content::Text("\u{0}\u{1}\u{ff}12".into()),
            "bystander".into(),
        ),
        (
            "huge",
            Content::Text("99999999999999999999\n".into()),
            "bystander".into(),
        ),
        // Wraps to the bystander's pid if read into 32 bits.
        (
            "wrapping",
            Content::Text(format!("{}\n", (1u64 << 32) + bpid as u64)),
            "bystander".into(),
        ),
        (
            "negative",
            Content::Text(format!("-{bpid}\n")),
            "bystander".into(),
        ),
        (
            "trailing",
            Content::Text(format!("{bpid} 1\n")),
            "bystander".into(),
        ),
        (
            "long",
            Content::Text(format!("{bpid}\n{}", " ".repeat(100_000))),
            "bystander".into(),
        ),
        ("init", Content::Text("1\n".into()), init_comm.clone()),
        (
            "self",
            Content::Text(format!("{}\n", d.pid())),
            "procagentd".into(),
        ),
        (
            "symlink",
            Content::Symlink(real.clone()),
            "bystander".into(),
        ),
        ("fifo", Content::Fifo, "bystander".into()),
        ("dir", Content::Dir, "bystander".into()),
    ];
    for (name, content, proc_name) in &cases {
        let pidfile = env.p(&format!("hostile-{name}.pid"));
        match content {
            Content::Text(t) => std::fs::write(&pidfile, t).unwrap(),
            Content::Symlink(to) => std::os::unix::fs::symlink(to, &pidfile).unwrap(),
            Content::Fifo => nix::unistd::mkfifo(
                pidfile.as_str(),
                nix::sys::stat::Mode::from_bits_truncate(0o644),
            )
            .unwrap(),
            Content::Dir => std::fs::create_dir(&pidfile).unwrap(),
        }
        let spec = json!({
            "identity": {"proc_name": proc_name, "setup_path": env.path().display().to_string(), "pid_path": pidfile},
            "control": {"start_cmd": "true", "stop_cmd": format!("echo stop-ran > {}", env.p(&format!("{name}.stopped")))},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 5},
        });
        d.register(NS, name, spec);
    }
    // Give the housekeeping sweeps (every 100 ms) a few chances to adopt something.
    std::thread::sleep(Duration::from_millis(800));
    for (name, _, _) in &cases {
        let st = d.status(NS, name);
        assert_eq!(
            (st["status"].clone(), st["pid"].clone()),
            (json!(2), json!(-1)),
            "{name}: {st}"
        );
        for op in [1, 9] {
            let r = d.op(NS, name, op);
            assert_eq!(r["error_code"], json!(829), "{name} op {op}: {r}");
        }
        assert!(
            !Path::new(&env.p(&format!("{name}.stopped"))).exists(),
            "{name}: stop_cmd ran for a process that is not ours"
        );
        let evs = d.events(&format!("{NS}/{name}"));
        assert!(
            evs.iter().all(|e| e["kind"] != json!("adopted")),
            "{name}: {evs:?}"
        );
    }
    assert!(alive(bpid), "the bystander was signalled");
    assert!(
        health(&d)["pid"] == json!(d.pid()),
        "the agent is alive and serving"
    );
    let _ = child.kill();
    let _ = child.wait();
}
