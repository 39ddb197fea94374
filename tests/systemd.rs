//! The systemd unit and the daemon's side of the sd_notify protocol.
//!
//! * `systemd-analyze verify` accepts `systemd/procagentd.service` without a warning (and,
//!   as a control, rejects a copy with a broken line), and the unit has the settings the
//!   agent relies on.
//! * A real daemon started with `NOTIFY_SOCKET` sends READY=1 only once its API answers,
//!   pings the watchdog at least twice per `WATCHDOG_USEC`, and says STOPPING=1 on SIGTERM.
//! * The agent shielded from the OOM killer (the unit's `OOMScoreAdjust=`) does not pass the
//!   shield on to the processes it runs.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/procagentd.service");

/// `systemd-analyze`, installing Debian's systemd package when it is missing and we may.
fn systemd_analyze() -> Option<PathBuf> {
    let find = || {
        ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Some(p);
    }
    if !is_root() || !Path::new("/usr/bin/apt-get").exists() {
        eprintln!(
            "skip: systemd-analyze is missing and cannot be installed here (needs root and apt-get)"
        );
        return None;
    }
    eprintln!("installing the systemd package for systemd-analyze");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["install", "-y", "-qq", "systemd"]) {
        let _ = apt(&["update", "-qq"]);
        assert!(
            apt(&["install", "-y", "-qq", "systemd"]),
            "apt-get install systemd failed"
        );
    }
    Some(find().expect("systemd-analyze after installing systemd"))
}

/// The unit with the binary paths pointed at the binary under test.
/// The major version `systemd-analyze --version` prints ("systemd 252 (252.39-1~deb12u1)").
fn analyze_version(analyze: &Path) -> u32 {
    let out = Command::new(analyze)
        .arg("--version")
        .output()
        .expect("systemd-analyze --version");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn unit_copy(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("procagentd.service");
    std::fs::write(&p, text.replace("/usr/bin/procagentd", DAEMON)).expect("write the unit");
    p
}

fn verify(analyze: &Path, unit: &Path) -> (bool, String) {
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn unit_has_what_the_agent_relies_on() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    let settings: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |k: &str| {
        settings
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("Type"), Some("notify"));
    assert_eq!(get("NotifyAccess"), Some("main"));
    assert_eq!(
        get("KillMode"),
        Some("process"),
        "managed processes survive"
    );
    assert_eq!(get("Restart"), Some("on-failure"));
    assert_eq!(get("RuntimeDirectory"), Some("procagent"));
    assert_eq!(get("RuntimeDirectoryMode"), Some("0750"));
    assert_eq!(get("StateDirectory"), Some("procagent"));
    assert_eq!(get("ExecReload"), Some("/bin/kill -HUP $MAINPID"));
    assert!(
        get("ExecStart").is_some_and(|v| v.starts_with("/usr/bin/procagentd --config ")),
        "{text}"
    );
    let wd = humantime::parse_duration(get("WatchdogSec").expect("WatchdogSec")).unwrap();
    assert!(wd >= Duration::from_secs(4), "the loop ticks every second");
    let nofile: u64 = get("LimitNOFILE").unwrap().parse().unwrap();
    assert!(nofile >= 65536, "one pidfd per managed instance");
    // Containment: the agent's cgroup is delegated to it, its managed processes (which live
    // below it) are not capped by the unit's task limit, and the agent is the last thing the
    // OOM killer picks.
    assert_eq!(get("Delegate"), Some("yes"));
    // systemd 254+: the agent runs in the unit's `agent` subgroup, so the unit's cgroup holds
    // no process and can give controllers to the processes' cgroups.
    assert_eq!(get("DelegateSubgroup"), Some("agent"));
    assert_eq!(get("TasksMax"), Some("infinity"));
    let oom: i32 = get("OOMScoreAdjust")
        .expect("OOMScoreAdjust")
        .parse()
        .unwrap();
    assert!(oom < 0, "{oom}");
}

/// Started with a negative oom_score_adj (as the unit's OOMScoreAdjust= gives it), the agent
/// keeps it and its commands start at 0.
#[test]
fn the_agents_oom_shield_is_not_inherited_by_what_it_runs() {
    if !is_root() {
        eprintln!("skipped: needs root (lowering oom_score_adj)");
        return;
    }
    let set = |v: &str| std::fs::write("/proc/self/oom_score_adj", v);
    if let Err(e) = set("-500") {
        eprintln!("skipped: cannot lower oom_score_adj here ({e}; needs CAP_SYS_RESOURCE)");
        return;
    }
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    // The daemon inherited it; restore ours at once (raising needs no privilege).
    let _ = set("0");
    let adj = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    assert_eq!(adj(d.pid()), Some(-500));
    d.register("oom", "p", daemon_spec(&env, "p", serde_json::json!({})));
    let r = d.op("oom", "p", 0);
    assert_eq!(r["error_code"], serde_json::json!(0), "{r}");
    let pid = d.status("oom", "p")["pid"].as_i64().unwrap_or(-1) as i32;
    assert_eq!(
        adj(pid),
        Some(0),
        "the managed process inherited the agent's shield"
    );
    d.op("oom", "p", 1);
}

#[test]
fn systemd_analyze_verify_passes() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(UNIT).unwrap();
    let unit = unit_copy(dir.path(), &text);
    let (ok, out) = verify(&analyze, &unit);
    assert!(ok, "systemd-analyze verify failed:\n{out}");
    // Warnings (unknown keys, bad values) do not fail verify: none may mention our unit,
    // but for one: systemd before 254 does not know DelegateSubgroup= and says it ignores
    // it (the agent then runs in its unit's cgroup without controllers; docs/architecture.md).
    let version = analyze_version(&analyze);
    let complaints: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("procagentd.service"))
        .filter(|l| {
            !(version < 254
                && l.contains("Unknown key")
                && l.contains("DelegateSubgroup")
                && l.contains("ignoring"))
        })
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze complains:\n{out}");

    // Controls: verify does catch a broken line and a missing binary in this unit.
    let broken = unit_copy(
        dir.path(),
        &text.replace("KillMode=process", "KillMode=procesz"),
    );
    let (_, out) = verify(&analyze, &broken);
    assert!(
        out.contains("procagentd.service:") && out.contains("procesz"),
        "a bad value goes unnoticed:\n{out}"
    );
    let missing = dir.path().join("procagentd.service");
    std::fs::write(
        &missing,
        text.replace("/usr/bin/procagentd", "/nonexistent/procagentd"),
    )
    .unwrap();
    let (ok, out) = verify(&analyze, &missing);
    assert!(!ok, "a missing binary goes unnoticed:\n{out}");
}

/// Datagrams received on `sock` until `until` matches one or the deadline.
fn recv_until(sock: &UnixDatagram, got: &mut Vec<String>, until: impl Fn(&str) -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = until(&m);
            got.push(m);
            if done {
                return;
            }
        }
    }
    panic!("no matching sd_notify message within 30s; got {got:?}");
}

#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let env = TestEnv::new();
    let config = env.path().join("agent.toml");
    std::fs::write(&config, Daemon::config_text(&env, "")).unwrap();
    let notify = env.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(DAEMON)
        .arg("--config")
        .arg(&config)
        .current_dir(env.path())
        .env("NOTIFY_SOCKET", &notify)
        // 400 ms: the loop must tick (and ping) at least every 200 ms, not every second.
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = env.path().join("run/agent.sock");
    let mut got = Vec::new();
    recv_until(&sock, &mut got, |m| m.contains("READY=1"));
    // READY means serving: the API answers at once.
    let (status, body) = http(&socket, "GET", "/v1/healthz", b"").expect("API after READY");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Watchdog pings, several per second.
    let start = Instant::now();
    let mut pings = 0;
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1")
        {
            pings += 1;
        }
    }
    // About ten are due (every 200 ms); a loop ticking at its usual 1 s would send two.
    assert!(pings >= 4, "only {pings} watchdog pings in 2 s");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    recv_until(&sock, &mut got, |m| m.contains("STOPPING=1"));
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
}
