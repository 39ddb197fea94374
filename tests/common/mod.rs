//! Test harness: a real `procagentd` on a temp dir (own socket, state and pid folders), a
//! blocking client for its socket, polling helpers with deadlines, fixture daemons, and
//! cleanup of every process a test started, by pid.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod cgroup;
pub mod sec;

use serde_json::{Value, json};

pub const DAEMON: &str = env!("CARGO_BIN_EXE_procagentd");
pub const CLI: &str = env!("CARGO_BIN_EXE_procagent");

/// Poll `f` every 20 ms until it returns `Some`, or panic with `what` at the deadline.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Is `pid` alive (and not a zombie)?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Parent pid of `pid`.
pub fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Zombie children of `parent`.
pub fn zombies_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((_, rest)) = s.rsplit_once(')')
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.first() == Some(&"Z")
                && f.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(parent)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// A temp dir with fixture programs, and cleanup of every process that lives in it.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("pa")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        TestEnv { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    /// Write an executable script.
    pub fn script(&self, name: &str, body: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).expect("write script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p.display().to_string()
    }

    /// A copy of `sleep` named `name`: a program whose exe, comm and argv[0] all say `name`.
    pub fn program(&self, name: &str) -> String {
        program_at(self.dir.path(), name)
    }

    /// A start command that daemonizes `name` (a renamed sleep) and writes its pid file.
    pub fn daemon_start_cmd(&self, name: &str, pidfile: &str) -> String {
        let prog = self.program(name);
        format!("setsid {prog} 100000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}")
    }

    /// Every live process that belongs to this test: cwd, executable or argv under the temp dir.
    pub fn processes(&self) -> Vec<i32> {
        let root = self.dir.path().display().to_string();
        let me = std::process::id() as i32;
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me || !alive(pid) {
                continue;
            }
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cwd.starts_with(&root) || exe.starts_with(&root) || cmd.contains(&root) {
                out.push(pid);
            }
        }
        out
    }

    /// Kill every process of this test, by pid.
    pub fn kill_all(&self) {
        for _ in 0..3 {
            let ps = self.processes();
            if ps.is_empty() {
                return;
            }
            for pid in ps {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A copy of `sleep` named `name` in `dir` (created when missing).
pub fn program_at(dir: &Path, name: &str) -> String {
    std::fs::create_dir_all(dir).expect("mkdir");
    let p = dir.join(name);
    if !p.exists() {
        let sleep = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sleep");
        std::fs::copy(sleep, &p).expect("copy sleep");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    p.display().to_string()
}

/// A running daemon.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// The config text for a daemon in `env` (socket, state under the temp dir; host
    /// 127.0.0.1 cloud 0 supplier 0), plus `extra` TOML appended.
    pub fn config_text(env: &TestEnv, extra: &str) -> String {
        let (agent_extra, rest) = split_agent_extra(extra);
        format!(
            "[agent]\nsocket = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"debug\"\n{agent_extra}\n[host]\nip = \"127.0.0.1\"\nbk_cloud_id = 0\nbk_supplier_id = 0\nagent_id = \"agent-under-test\"\n{rest}\n",
            env.p("run/agent.sock"),
            env.p("state"),
        )
    }

    /// Start a daemon on `env` and wait until it answers.
    pub fn start(env: &TestEnv, extra: &str) -> Daemon {
        let config = env.path().join("agent.toml");
        std::fs::write(&config, Self::config_text(env, extra)).expect("write config");
        Self::start_with(env, &config)
    }

    /// Start a daemon with an existing config file.
    pub fn start_with(env: &TestEnv, config: &Path) -> Daemon {
        Self::start_program(env, DAEMON, config)
    }

    /// Start `program` (the daemon, or a copy of it: an upgrade) with an existing config file.
    pub fn start_program(env: &TestEnv, program: &str, config: &Path) -> Daemon {
        Self::start_in(
            env,
            program,
            config,
            env.path(),
            &env.path().join("run/agent.sock"),
        )
    }

    /// Start `program` with `config`, in the directory `cwd`, answering on `socket`.
    pub fn start_in(
        env: &TestEnv,
        program: &str,
        config: &Path,
        cwd: &Path,
        socket: &Path,
    ) -> Daemon {
        let log = env.path().join("daemon.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let child = Command::new(program)
            .arg("--config")
            .arg(config)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("spawn procagentd");
        let d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            config: config.to_path_buf(),
            state: env.path().join("state"),
            log,
        };
        let mut d = d;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(v) = d.try_get("/v1/healthz")
                && v["result"] == json!(true)
            {
                break;
            }
            if let Some(Ok(Some(st))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "procagentd exited with {st} during start:\n{}",
                    d.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!("procagentd did not answer within 30s:\n{}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send one HTTP request; returns (status, body).
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        http(&self.socket, method, path, body)
    }

    pub fn try_get(&self, path: &str) -> std::io::Result<Value> {
        let (_, b) = self.http("GET", path, b"")?;
        serde_json::from_slice(&b).map_err(|e| std::io::Error::other(e.to_string()))
    }

    pub fn get(&self, path: &str) -> Value {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log_text()))
    }

    /// POST /v1/<api> and return the envelope.
    pub fn call(&self, api: &str, body: &Value) -> Value {
        self.call_raw(
            &format!("/v1/{api}"),
            &serde_json::to_vec(body).expect("json"),
        )
    }

    pub fn call_raw(&self, path: &str, body: &[u8]) -> Value {
        let (status, b) = self
            .http("POST", path, body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.log_text()));
        serde_json::from_slice(&b).unwrap_or_else(|e| {
            panic!(
                "POST {path}: status {status}, body not JSON ({e}): {}",
                String::from_utf8_lossy(&b)
            )
        })
    }

    /// The host entry of this agent (v1 form).
    pub fn host() -> Value {
        json!({"ip": "127.0.0.1", "bk_cloud_id": 0, "bk_supplier_id": 0})
    }

    /// The v1 result key of a process on this agent.
    pub fn key(ns: &str, name: &str) -> String {
        format!("0:0:127.0.0.1:{ns}:{name}")
    }

    /// Register a process with a GSE spec.
    pub fn register(&self, ns: &str, name: &str, spec: Value) -> Value {
        let r = self.call(
            "register_proc_info",
            &json!({"meta": {"namespace": ns, "name": name, "labels": {"app": name}}, "hosts": [Self::host()], "spec": spec}),
        );
        assert_eq!(r["result"], json!(true), "register {ns}/{name}: {r}");
        r["data"][Self::key(ns, name)].clone()
    }

    /// Run operate_proc on this host and wait for the per-key result.
    pub fn op(&self, ns: &str, name: &str, op_type: i64) -> Value {
        let r = self.call(
            "operate_proc",
            &json!({"meta": {"namespace": ns, "name": name}, "op_type": op_type, "hosts": [Self::host()]}),
        );
        assert_eq!(r["result"], json!(true), "operate_proc: {r}");
        let task = r["data"]["task_id"].as_str().expect("task id").to_string();
        assert!(task.starts_with("GSETASK:"), "{task}");
        self.wait_task(&task, &Self::key(ns, name))
    }

    /// Poll a task with get_proc_operate_result until `key` (a v1 key,
    /// `cloud:supplier:ip:ns:name`) is no longer 115.
    pub fn wait_task(&self, task: &str, key: &str) -> Value {
        self.wait_task_at("get_proc_operate_result", task, key)
    }

    /// Poll a task with get_proc_operate_result_v2 until `key` (a v2 key,
    /// `cloud:ip:ns:name` or `agent_id:ns:name`) is no longer 115.
    pub fn wait_task_v2(&self, task: &str, key: &str) -> Value {
        self.wait_task_at("get_proc_operate_result_v2", task, key)
    }

    fn wait_task_at(&self, api: &str, task: &str, key: &str) -> Value {
        wait_for(
            &format!("task {task} key {key}"),
            Duration::from_secs(120),
            || {
                let r = self.call(api, &json!({ "task_id": task }));
                assert_eq!(r["result"], json!(true), "{api}: {r}");
                let v = r["data"][key].clone();
                assert!(v.is_object(), "key {key} missing from {r}");
                if v["error_code"] == json!(115) {
                    None
                } else {
                    Some(v)
                }
            },
        )
    }

    /// get_proc_status for one process on this host.
    pub fn status(&self, ns: &str, name: &str) -> Value {
        let r = self.call(
            "get_proc_status",
            &json!({"meta": {"namespace": ns, "name": name}, "hosts": [Self::host()]}),
        );
        assert_eq!(r["result"], json!(true), "get_proc_status: {r}");
        r["data"]["proc_infos"][0].clone()
    }

    /// The agent's detailed view of one process.
    pub fn detail(&self, ns: &str, name: &str) -> Value {
        let r = self.call("procs", &json!({"namespace": ns, "name": name}));
        assert_eq!(r["result"], json!(true), "procs: {r}");
        r["data"]["list"][0].clone()
    }

    /// Events of one process so far.
    pub fn events(&self, key: &str) -> Vec<Value> {
        let r = self.get(&format!(
            "/v1/events?limit=10000&key={}",
            key.replace('/', "%2F")
        ));
        r["data"]["events"].as_array().cloned().unwrap_or_default()
    }

    /// Run the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(CLI)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run procagent");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the daemon and wait for it to exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > end {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn split_agent_extra(extra: &str) -> (String, String) {
    // Lines before the first table header that start with "agent." go into [agent].
    let mut agent = String::new();
    let mut rest = String::new();
    for line in extra.lines() {
        if let Some(l) = line.strip_prefix("agent.") {
            agent.push_str(l);
            agent.push('\n');
        } else {
            rest.push_str(line);
            rest.push('\n');
        }
    }
    (agent, rest)
}

/// A minimal blocking HTTP/1.1 client over a unix socket (Connection: close).
pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    // A server may answer (413) and close before reading a large body: still read the answer.
    if let Err(e) = s.write_all(body)
        && e.kind() != std::io::ErrorKind::BrokenPipe
        && e.kind() != std::io::ErrorKind::ConnectionReset
    {
        return Err(e);
    }
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let pos = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&buf[..pos]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = buf[pos + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = nl + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// A GSE spec for a daemonizing fixture program in `env`.
pub fn daemon_spec(env: &TestEnv, prog: &str, extra_control: Value) -> Value {
    let pidfile = env.p(&format!("{prog}.pid"));
    let mut control = json!({
        "start_cmd": env.daemon_start_cmd(prog, &pidfile),
        "stop_cmd": format!("kill $(cat {pidfile})"),
    });
    if let (Some(c), Some(x)) = (control.as_object_mut(), extra_control.as_object()) {
        for (k, v) in x {
            c.insert(k.clone(), v.clone());
        }
    }
    json!({
        "identity": {"proc_name": prog, "setup_path": env.path().display().to_string(), "pid_path": pidfile, "user": ""},
        "control": control,
        "resource": {"cpu": 0, "mem": 0},
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
    })
}

/// Assert that an envelope refuses with `code` and a message; returns the message.
pub fn refusal<'a>(v: &'a Value, code: i64, what: &str) -> &'a str {
    assert_eq!(v["result"], json!(false), "{what} should be refused: {v}");
    assert_eq!(v["code"], json!(code), "{what}: {v}");
    let m = v["message"].as_str().unwrap_or("");
    assert!(!m.is_empty(), "{what}: a refusal without a message: {v}");
    m
}

/// The first number of a `/proc/PID/status` line (`VmRSS:`, `Uid:`).
pub fn proc_status_number(pid: i32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// SIGKILL `pid` (by pid; it may be gone already).
pub fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Read a pid file.
pub fn read_pid(path: &str) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
