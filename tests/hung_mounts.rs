//! One slow path never freezes the agent: file-system work on paths callers or managed
//! accounts choose (pid files, log paths, setup paths) runs on the agent's bounded pool, so a
//! pid file on a mount that never answers delays only its own process; and a pid file is never
//! opened unless it is a regular file (opening a FIFO or a device node has effects).
//!
//! The hung mount is a FUSE filesystem whose server never answers (tests/common/sec.rs
//! `HungFuse`), the realistic model of an NFS server gone away. Deadlines are generous
//! (seconds): nothing here measures speed.

mod common;

use std::time::{Duration, Instant};

use common::sec::{Cast, HungFuse, accounts_available, call_as, cli_copy, owned_dir};
use common::*;
use serde_json::{Value, json};

const NS: &str = "hung";

fn spec_with(
    env: &TestEnv,
    name: &str,
    f: impl FnOnce(&mut serde_json::Value),
) -> serde_json::Value {
    let mut s = daemon_spec(env, name, json!({}));
    f(&mut s);
    s
}

/// Run operate_proc and wait (at most `within`) for the per-key answer.
fn op_within(d: &Daemon, name: &str, op: i64, within: Duration) -> serde_json::Value {
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": name}, "op_type": op, "hosts": [Daemon::host()]}),
    );
    assert_eq!(r["result"], json!(true), "{r}");
    let task = r["data"]["task_id"].as_str().expect("task id").to_string();
    let key = Daemon::key(NS, name);
    wait_for(&format!("op {op} on {name} answered"), within, || {
        let v =
            d.call("get_proc_operate_result", &json!({ "task_id": task }))["data"][&key].clone();
        (v["error_code"] != json!(115)).then_some(v)
    })
}

/// A FUSE mount at `mnt` that never answers, or None (with the reason printed) where FUSE
/// cannot be mounted.
fn hung_fuse(mnt: &std::path::Path, env: &TestEnv) -> Option<HungFuse> {
    match HungFuse::mount(mnt, env.path()) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

#[test]
fn a_hung_mount_delays_only_the_processes_whose_paths_are_on_it() {
    let env = TestEnv::new();
    let mnt = env.path().join("hung");
    let Some(fuse) = hung_fuse(&mnt, &env) else {
        return;
    };
    let mut d = Daemon::start(&env, "");
    let healthy_pidfile = env.p("healthy.pid");
    d.register(NS, "healthy", daemon_spec(&env, "healthy", json!({})));
    assert_eq!(d.op(NS, "healthy", 0)["error_code"], json!(0));
    let healthy = read_pid(&healthy_pidfile).unwrap();
    // A process whose pid file is on the hung mount, one whose log_path is, one whose
    // setup_path is.
    let hung = mnt.display().to_string();
    d.register(
        NS,
        "stuck",
        spec_with(&env, "stuck", |s| {
            s["identity"]["pid_path"] = json!(format!("{hung}/stuck.pid"));
        }),
    );
    d.register(
        NS,
        "logged",
        spec_with(&env, "logged", |s| {
            s["identity"]["log_path"] = json!(format!("{hung}/logged.log"));
        }),
    );
    d.register(
        NS,
        "nowhere",
        spec_with(&env, "nowhere", |s| {
            s["identity"]["setup_path"] = json!(format!("{hung}/app"));
        }),
    );
    // Managing the stuck process answers (it cannot tell whether it runs) instead of hanging.
    let v = op_within(&d, "stuck", 3, Duration::from_secs(30));
    assert_ne!(v["error_code"], json!(115), "{v}");
    // The agent still answers, and says which path is stuck.
    let h = wait_for(
        "healthz names the blocked path",
        Duration::from_secs(15),
        || {
            let h = d.get("/v1/healthz");
            h["data"]["blocked_paths"]
                .as_array()
                .is_some_and(|a| {
                    a.iter()
                        .any(|p| p.as_str().unwrap_or("").contains("stuck.pid"))
                })
                .then_some(h)
        },
    );
    assert_eq!(h["result"], json!(true));
    // Another process's exit is still handled: killed, it is restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(healthy),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let again = wait_for("healthy restarted", Duration::from_secs(30), || {
        read_pid(&healthy_pidfile).filter(|p| *p != healthy && alive(*p))
    });
    // Status of the stuck one answers.
    let st = d.status(NS, "stuck");
    assert_eq!(st["status"], json!(2), "{st}");
    // A log on the hung mount: the logs request answers (an error or a notice), and the
    // healthy process's logs are served meanwhile.
    let r = d.get(&format!("/v1/logs?key={NS}%2Flogged&source=log"));
    assert!(r.is_object(), "{r}");
    let r = d.get(&format!("/v1/logs?key={NS}%2Fhealthy"));
    assert_eq!(r["result"], json!(true), "{r}");
    // A setup_path on the hung mount fails that start, naming setup_path.
    let v = op_within(&d, "nowhere", 0, Duration::from_secs(30));
    assert_ne!(v["error_code"], json!(0), "{v}");
    assert!(
        v["error_msg"].as_str().unwrap_or("").contains("setup_path"),
        "{v}"
    );
    // SIGTERM still stops the agent, threads stuck in the kernel notwithstanding.
    let t0 = Instant::now();
    let st = d.terminate().expect("exit status");
    assert!(
        st.success(),
        "the agent did not exit by itself on SIGTERM ({st:?} after {:?}):\n{}",
        t0.elapsed(),
        d.log_text()
    );
    // Start-up serves the API at once and re-adopts the healthy process, the stuck pid file
    // notwithstanding.
    let d = Daemon::start_with(&env, &d.config.clone());
    let st = d.status(NS, "healthy");
    assert_eq!(st["pid"], json!(again), "{st}");
    assert!(alive(again));
    drop(d);
    drop(fuse);
}

#[test]
fn a_fifo_or_device_as_pid_file_is_never_opened() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    let fifo = env.path().join("daemon.pid");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    // A writer waits for a reader: if the agent ever opens the FIFO, the writer's open returns.
    let (tx, rx) = std::sync::mpsc::channel();
    let f2 = fifo.clone();
    std::thread::spawn(move || {
        let r = std::fs::OpenOptions::new().write(true).open(&f2);
        let _ = tx.send(r.is_ok());
    });
    for (name, pid_path) in [
        ("fifo", fifo.display().to_string()),
        ("tty", "/dev/tty".to_string()),
        ("null", "/dev/null".to_string()),
    ] {
        d.register(
            NS,
            name,
            spec_with(&env, name, |s| {
                s["identity"]["pid_path"] = json!(pid_path);
                s["control"]["start_cmd"] = json!("true");
            }),
        );
        // Status, manage and a start all look at the pid file.
        let _ = d.status(NS, name);
        let _ = d.op(NS, name, 3);
        let _ = d.op(NS, name, 0);
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        rx.try_recv().is_err(),
        "the agent opened the FIFO named as a pid file"
    );
    // Release the writer.
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo);
    let _ = rx.recv_timeout(Duration::from_secs(5));
}

/// Issue 12 item 3: a pool thread per stuck path must not let one hung mount take every
/// thread. Twenty processes whose pid files are distinct files on one hung mount are probed
/// (registered, managed and started); a healthy process elsewhere can still be started,
/// stopped and restarted, healthz answers, the hung ones' answers name the mount's path, and
/// once the mount is known not to answer, new work there fails at once, naming the mount.
#[test]
fn many_pid_files_on_one_hung_mount_do_not_stop_the_agent_acting_elsewhere() {
    let env = TestEnv::new();
    let mnt = env.path().join("hung");
    let Some(fuse) = hung_fuse(&mnt, &env) else {
        return;
    };
    let d = Daemon::start(&env, "");
    let hung = mnt.display().to_string();
    const STUCK: usize = 24;
    let names: Vec<String> = (0..STUCK).map(|i| format!("stuck{i}")).collect();
    for name in &names {
        d.register(
            NS,
            name,
            spec_with(&env, name, |s| {
                s["identity"]["pid_path"] = json!(format!("{hung}/{name}.pid"));
                s["control"]["start_cmd"] = json!("true");
            }),
        );
    }
    // Every one of them is probed (manage and start look at the pid file): each probe is a
    // distinct path on the hung mount.
    let mut tasks = Vec::new();
    for name in &names {
        for op in [3, 0] {
            let r = d.call(
                "operate_proc",
                &json!({"meta": {"namespace": NS, "name": name}, "op_type": op, "hosts": [Daemon::host()]}),
            );
            assert_eq!(r["result"], json!(true), "{r}");
            tasks.push((
                name.clone(),
                r["data"]["task_id"].as_str().expect("task id").to_string(),
            ));
        }
    }
    // The hung ones answer, each with an error naming the hung mount's path.
    for (name, task) in &tasks {
        let key = Daemon::key(NS, name);
        let v = wait_for(
            &format!("the task on {name} answered"),
            Duration::from_secs(60),
            || {
                let v = d.call("get_proc_operate_result", &json!({ "task_id": task }))["data"]
                    [&key]
                    .clone();
                (v["error_code"] != json!(115)).then_some(v)
            },
        );
        assert_ne!(v["error_code"], json!(0), "{name}: {v}");
        assert!(
            v["error_msg"].as_str().unwrap_or("").contains(&hung),
            "{name}'s answer does not name the hung mount {hung}: {v}"
        );
    }
    // A healthy process elsewhere is started, stopped and restarted.
    let healthy_pidfile = env.p("healthy.pid");
    let restart = format!(
        "kill $(cat {healthy_pidfile}); {}",
        env.daemon_start_cmd("healthy", &healthy_pidfile)
    );
    d.register(
        NS,
        "healthy",
        daemon_spec(&env, "healthy", json!({ "restart_cmd": restart })),
    );
    for (op, what) in [
        (0, "start"),
        (1, "stop"),
        (0, "start again"),
        (7, "restart"),
    ] {
        let v = op_within(&d, "healthy", op, Duration::from_secs(60));
        assert_eq!(
            v["error_code"],
            json!(0),
            "{what} of the healthy process failed while {STUCK} pid files hang on one mount: {v}\n{}",
            d.get("/v1/healthz")
        );
    }
    let pid = read_pid(&healthy_pidfile).expect("the healthy pid file");
    assert!(alive(pid));
    // healthz answers, names paths on the hung mount, and the mount itself.
    let h = wait_for(
        "healthz names the hung mount",
        Duration::from_secs(30),
        || {
            let h = d.get("/v1/healthz");
            let names = |field: &str| {
                h["data"][field]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|p| p.as_str().unwrap_or("").contains(&hung)))
            };
            (names("blocked_paths") && names("hung_mounts")).then_some(h)
        },
    );
    assert_eq!(h["result"], json!(true), "{h}");
    // Once the mount is known not to answer, work on another path there fails at once,
    // naming the mount, instead of taking another thread.
    d.register(
        NS,
        "late",
        spec_with(&env, "late", |s| {
            s["identity"]["pid_path"] = json!(format!("{hung}/late.pid"));
            s["control"]["start_cmd"] = json!("true");
        }),
    );
    let v = op_within(&d, "late", 0, Duration::from_secs(60));
    let msg = v["error_msg"].as_str().unwrap_or("");
    assert!(
        msg.contains(&format!("its mount {hung} is not answering")),
        "{v}"
    );
    drop(d);
    drop(fuse);
}

/// With one hung mount on the host (a dead NFS server), an admin registers definitions of
/// their own account whose pid files reach it through symlinks in their own directory:
/// each distinct path is attributed to the answering mount of the directory, so it is never
/// failed fast, and each takes a pool thread that never comes back. 70 of them take all 60
/// path threads (cap 64, 4 kept for unkeyed work), and from then on no pid file anywhere
/// can be read: root's healthy process elsewhere could no longer be started. Each path is
/// now followed to its real mount before its job touches it (issue "Trust boundaries",
/// second review).
#[test]
fn symlinks_into_a_hung_mount_cannot_take_the_pool_from_other_paths() {
    if !accounts_available() {
        return;
    }
    let env = TestEnv::new();
    let mnt = env.path().join("hung");
    let fuse = match HungFuse::mount(&mnt, env.path()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let cast = Cast::new();
    let cli = cli_copy(&env);
    let d = Daemon::start(&env, &cast.api_config(""));
    let home = owned_dir(&env, "home-a", &cast.admin);
    const N: usize = 70;
    let mut items = Vec::new();
    for i in 0..N {
        let link = home.join(format!("l{i}"));
        std::os::unix::fs::symlink(mnt.join(format!("d{i}")), &link).expect("symlink");
        let _ = nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            Some(nix::unistd::Uid::from_raw(cast.admin.uid)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        items.push(json!({
            "meta": {"namespace": NS, "name": format!("s{i}")},
            "op_type": 0,
            "hosts": [Daemon::host()],
            "spec": {
                "identity": {"proc_name": "svc", "setup_path": home.display().to_string(),
                    "pid_path": link.join("svc.pid").display().to_string(), "user": cast.admin.name},
                "control": {"start_cmd": "true"},
                "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 5},
            },
        }));
    }
    let (_, r, err) = call_as(
        &cli,
        &d.socket,
        &cast.admin,
        "operate_proc_multi",
        &json!({ "proc_operate_req": items }),
    );
    assert_eq!(r["result"], json!(true), "{r} {err}");
    let task = r["data"]["task_id"].as_str().expect("task id").to_string();
    // Every item answers (with the pid file's timeout).
    wait_for(
        "the admin's items answered",
        Duration::from_secs(120),
        || {
            let v = d.call("get_proc_operate_result", &json!({ "task_id": task }));
            let data = v["data"].as_object()?;
            (data.len() >= N && data.values().all(|x| x["error_code"] != json!(115))).then_some(())
        },
    );
    // Root's healthy process elsewhere.
    d.register(NS, "healthy", daemon_spec(&env, "healthy", json!({})));
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": NS, "name": "healthy"}, "op_type": 0, "hosts": [Daemon::host()]}),
    );
    let task = r["data"]["task_id"].as_str().expect("task id").to_string();
    let key = Daemon::key(NS, "healthy");
    let v: Value = wait_for("root's start answered", Duration::from_secs(60), || {
        let v =
            d.call("get_proc_operate_result", &json!({ "task_id": task }))["data"][&key].clone();
        (v["error_code"] != json!(115)).then_some(v)
    });
    let healthz = d.get("/v1/healthz");
    drop(d);
    env.kill_all();
    drop(fuse);
    assert_eq!(
        v["error_code"],
        json!(0),
        "root's healthy process could not be started after an admin's {N} symlinked pid files into a hung mount: {v}\n{healthz}"
    );
}
