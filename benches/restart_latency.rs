//! Restart latency: from `kill -9` of a managed process to the first instruction of its
//! replacement, for a child process (no pid file) and for a self-daemonizing pid-file
//! process, over many kills; min / median / p95. If `supervisord` is on PATH (the bench script
//! `bench/restart_latency.sh` installs it with pip), the same measurement runs against it for
//! the child case (supervisord cannot supervise a daemon that forks away).
//!
//! Run: `cargo bench --bench restart_latency` (env KILLS=N, default 40).
//!
//! The measured program is this same binary run as `marker OUT`: the first thing its `main`
//! does is write the wall-clock time to OUT, so "first instruction" is main's entry (after
//! exec and the Rust runtime's few microseconds of setup).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{cleanup, contained_root, now_ns, remove_tree};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("marker") {
        let t = now_ns();
        let out = &args[2];
        let tmp = format!("{out}.tmp{}", std::process::id());
        if std::fs::write(&tmp, format!("{} {}\n", std::process::id(), t)).is_ok() {
            let _ = std::fs::rename(&tmp, out);
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if args.iter().any(|a| a == "--list") {
        println!("restart_latency: bench");
        return;
    }
    let kills: usize = std::env::var("KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let me = std::env::current_exe().expect("own path");
    let dir = tempdir();
    let result = run(&me, &dir, kills);
    cleanup(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        eprintln!("restart_latency failed: {e}");
        std::process::exit(1);
    }
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("pa-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tempdir");
    d
}

fn run(me: &Path, dir: &Path, kills: usize) -> Result<(), String> {
    println!(
        "restart latency, {kills} kills each (kill -9 -> first instruction of the replacement)"
    );
    let mut rows = Vec::new();
    // procagent with containment off, then (as root, where cgroup v2 is writable) on, in a
    // cgroup subtree of the bench's own, removed at the end.
    let subtree = contained_root(dir);
    let mut modes: Vec<(&str, String)> = vec![("", String::new())];
    match &subtree {
        Ok(root) => modes.push((" (contained)", root.display().to_string())),
        Err(why) => println!("containment: not measured ({why})"),
    }
    for (label, root) in &modes {
        measure_procagent(me, dir, kills, label, root, &mut rows)?;
    }
    if let Ok(root) = &subtree {
        let _ = std::fs::write(root.join("cgroup.kill"), b"1");
        std::thread::sleep(Duration::from_millis(200));
        remove_tree(root);
    }
    if which("supervisord").is_some() {
        match Supervisord::start(dir, me) {
            Ok(sv) => {
                let out = dir.join("sv.out");
                let lat = measure(kills, &out, || sv.pid());
                drop(sv);
                rows.push(("supervisord 4, child".into(), lat?));
            }
            Err(e) => println!("supervisord: not measured ({e})"),
        }
    } else {
        println!("supervisord: not on PATH, not measured (bench/restart_latency.sh installs it)");
    }
    println!();
    println!("| supervisor, process | n | min ms | median ms | p95 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (name, mut v) in rows {
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            v[0],
            q(0.5),
            q(0.95),
            v[v.len() - 1]
        );
    }
    Ok(())
}

/// One procagent run (its own state dir), `cgroup_root` as given, both process kinds.
fn measure_procagent(
    me: &Path,
    dir: &Path,
    kills: usize,
    label: &str,
    cgroup_root: &str,
    rows: &mut Vec<(String, Vec<f64>)>,
) -> Result<(), String> {
    let dir = &dir.join(if cgroup_root.is_empty() { "off" } else { "on" });
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let agent = Agent::start(dir, cgroup_root)?;
    let child_out = dir.join("child.out");
    let daemon_out = dir.join("daemon.out");
    let pidfile = dir.join("daemon.pid");
    agent.register(
        "child",
        &format!("exec {} marker {}", me.display(), child_out.display()),
        "",
    )?;
    agent.register(
        "daemon",
        &format!(
            "setsid {} marker {} </dev/null >/dev/null 2>&1 & echo $! > {}",
            me.display(),
            daemon_out.display(),
            pidfile.display()
        ),
        &pidfile.display().to_string(),
    )?;
    for name in ["child", "daemon"] {
        agent.manage(name)?;
    }
    for (name, out) in [("child", &child_out), ("daemon", &daemon_out)] {
        let lat = measure(kills, out, || agent.pid(name))?;
        rows.push((format!("procagent{label}, {name}"), lat));
    }
    drop(agent);
    cleanup(dir);
    Ok(())
}

/// Kill the current process `kills` times; each time, the latency until the replacement
/// wrote its start time into `out`.
fn measure(kills: usize, out: &Path, pid_of: impl Fn() -> Option<i32>) -> Result<Vec<f64>, String> {
    let mut lat = Vec::new();
    let read = || -> Option<(i32, u128)> {
        let s = std::fs::read_to_string(out).ok()?;
        let mut it = s.split_whitespace();
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    for i in 0..kills {
        // The supervisor must know the current process (its start finished, and for procagent
        // its start check passed: a healthy run, restarted at once) before the kill.
        let pid = wait(Duration::from_secs(30), || {
            let (p, _) = read()?;
            (pid_of() == Some(p) && alive(p)).then_some(p)
        })
        .ok_or_else(|| format!("kill {i}: supervisor never reported the running marker"))?;
        let t0 = now_ns();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let t1 = wait(Duration::from_secs(30), || {
            read().filter(|(p, _)| *p != pid).map(|(_, t)| t)
        })
        .ok_or_else(|| format!("kill {i}: no replacement within 30 s"))?;
        lat.push((t1.saturating_sub(t0)) as f64 / 1e6);
    }
    Ok(lat)
}

fn wait<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(dir: &Path, cgroup_root: &str) -> Result<Agent, String> {
        let cfg = dir.join("agent.toml");
        let socket = dir.join("agent.sock");
        std::fs::write(
            &cfg,
            format!(
                "[agent]\nsocket = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"warn\"\n[host]\nip = \"127.0.0.1\"\n[supervisor]\ncgroup_root = \"{}\"\n",
                socket.display(),
                dir.join("state").display(),
                cgroup_root
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new(env!("CARGO_BIN_EXE_procagentd"))
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| e.to_string())?;
        let a = Agent { child, socket };
        wait(Duration::from_secs(30), || {
            a.call("GET", "/v1/healthz", "").ok()
        })
        .ok_or("procagentd did not come up")?;
        Ok(a)
    }

    fn call(&self, method: &str, path: &str, body: &str) -> Result<serde_json::Value, String> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| e.to_string())?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))
    }

    fn register(&self, name: &str, start: &str, pid_path: &str) -> Result<(), String> {
        let body = serde_json::json!({
            "meta": {"namespace": "bench", "name": name},
            "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0, "bk_supplier_id": 0}],
            "spec": {
                "identity": {"proc_name": "restart_latency", "setup_path": "/tmp", "pid_path": pid_path},
                "control": {"start_cmd": start},
                "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10}
            }
        });
        let r = self.call("POST", "/v1/register_proc_info", &body.to_string())?;
        if r["result"] != serde_json::json!(true) {
            return Err(format!("register: {r}"));
        }
        Ok(())
    }

    fn manage(&self, name: &str) -> Result<(), String> {
        let body = serde_json::json!({
            "meta": {"namespace": "bench", "name": name}, "op_type": 3,
            "hosts": [{"ip": "127.0.0.1", "bk_cloud_id": 0, "bk_supplier_id": 0}]
        });
        let r = self.call("POST", "/v1/operate_proc", &body.to_string())?;
        if r["result"] != serde_json::json!(true) {
            return Err(format!("manage: {r}"));
        }
        Ok(())
    }

    fn pid(&self, name: &str) -> Option<i32> {
        let body = serde_json::json!({"namespace": "bench", "name": name});
        let r = self.call("POST", "/v1/procs", &body.to_string()).ok()?;
        let d = &r["data"]["list"][0];
        (d["state"] == serde_json::json!("running"))
            .then(|| d["pids"][0].as_i64())
            .flatten()
            .map(|p| p as i32)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Supervisord {
    child: Child,
    conf: PathBuf,
}

impl Supervisord {
    fn start(dir: &Path, me: &Path) -> Result<Supervisord, String> {
        let conf = dir.join("supervisord.conf");
        std::fs::write(
            &conf,
            format!(
                "[unix_http_server]\nfile={d}/sv.sock\n[supervisord]\nlogfile={d}/sv.log\npidfile={d}/sv.pid\nnodaemon=true\n\
                 [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\
                 [supervisorctl]\nserverurl=unix://{d}/sv.sock\n\
                 [program:marker]\ncommand={me} marker {d}/sv.out\nautorestart=true\nstartsecs=0\nstartretries=1000\n",
                d = dir.display(),
                me = me.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new("supervisord")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let sv = Supervisord { child, conf };
        wait(Duration::from_secs(30), || sv.pid())
            .ok_or("supervisord did not start the program")?;
        Ok(sv)
    }

    fn pid(&self) -> Option<i32> {
        let out = Command::new("supervisorctl")
            .arg("-c")
            .arg(&self.conf)
            .args(["pid", "marker"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
