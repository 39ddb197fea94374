//! Resource figures, limits, /metrics and `procagent top`, end to end through the real daemon.
//!
//! Fixture programs are small python3 scripts started as self-daemonizing processes with a
//! pid file (`python3 NAME.py`, found by `proc_name = NAME.py`). The sampler runs every
//! 200 ms here; every wait has a deadline and nothing is asserted on wall-clock time.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const FAST: &str = "[metrics]\nsample_interval = \"200ms\"\nlimit_samples = 3\n";

fn mem_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal");
    kb * 1024
}

/// A GSE spec for `python3 NAME.py` (script body `body`), daemonized with a pid file.
fn py_spec(env: &TestEnv, name: &str, body: &str, resource: Value) -> Value {
    let script = env.path().join(format!("{name}.py"));
    std::fs::write(&script, body).expect("write script");
    let pidfile = env.p(&format!("{name}.pid"));
    json!({
        "identity": {"proc_name": format!("{name}.py"), "setup_path": env.path().display().to_string(), "pid_path": pidfile, "user": ""},
        "control": {
            "start_cmd": format!("setsid python3 {} </dev/null >/dev/null 2>&1 & echo $! > {pidfile}", script.display()),
            "stop_cmd": format!("kill $(cat {pidfile})"),
        },
        "resource": resource,
        "monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 10},
    })
}

fn start(d: &Daemon, ns: &str, name: &str) -> i64 {
    let r = d.op(ns, name, 0);
    assert_eq!(r["error_code"], json!(0), "start {ns}/{name}: {r}");
    let st = d.status(ns, name);
    assert_eq!(st["status"], json!(1), "{st}");
    st["pid"].as_i64().expect("pid")
}

/// Wait until the process's detail satisfies `f` (a fresh sample of the current pid).
fn wait_detail(d: &Daemon, ns: &str, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(60), || {
        let v = d.detail(ns, name);
        (v["sampled_at"].as_i64().unwrap_or(0) > 0 && f(&v)).then_some(v)
    })
}

#[test]
fn cpu_burner_reads_near_one_core() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    d.register(
        "m",
        "burn",
        py_spec(
            &env,
            "burn",
            "while True:\n    pass\n",
            json!({"cpu": 0, "mem": 0}),
        ),
    );
    start(&d, "m", "burn");
    // One busy thread is ~100 (percent of one core); the machine is shared, so allow a wide
    // band, but it must be a real figure from utime+stime deltas.
    let v = wait_detail(&d, "m", "burn", "cpu_usage > 50", |v| {
        v["cpu_usage"].as_f64().unwrap_or(0.0) > 50.0
    });
    assert!(v["cpu_usage"].as_f64().unwrap() <= 200.0 * 1.05, "{v}");
    // get_proc_status reports the same sample (it never reads /proc itself).
    let st = d.status("m", "burn");
    assert!(st["cpu_usage"].as_f64().unwrap() > 0.0, "{st}");
    assert_eq!(d.op("m", "burn", 1)["error_code"], json!(0));
    // A stopped process has no figures (no stale sample).
    let v = d.detail("m", "burn");
    assert_eq!(v["sampled_at"], json!(0), "{v}");
    assert_eq!(v["cpu_usage"], json!(0.0));
    assert_eq!(d.status("m", "burn")["cpu_usage"], json!(0.0));
}

#[test]
fn allocating_200_mb_shows_in_memory() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    let body = "import time\nb = b'\\x01' * (200 * 1024 * 1024)\nwhile True:\n    time.sleep(1)\n";
    d.register(
        "m",
        "alloc",
        py_spec(&env, "alloc", body, json!({"cpu": 0, "mem": 0})),
    );
    let pid = start(&d, "m", "alloc");
    let want = 200 * 1024 * 1024u64;
    let v = wait_detail(&d, "m", "alloc", "rss >= 200 MB", |v| {
        v["rss_bytes"].as_u64().unwrap_or(0) >= want
    });
    let rss = v["rss_bytes"].as_u64().unwrap();
    // mem_usage is RSS as percent of MemTotal.
    let expect = rss as f64 / mem_total_bytes() as f64 * 100.0;
    let got = v["mem_usage"].as_f64().unwrap();
    assert!(
        (got - expect).abs() < 0.02 + expect * 0.01,
        "mem_usage {got} vs {expect}: {v}"
    );
    let st = d.status("m", "alloc");
    assert!(
        st["mem_usage"].as_f64().unwrap()
            >= 200.0 * 1024.0 * 1024.0 / mem_total_bytes() as f64 * 100.0 * 0.99,
        "{st}"
    );
    // The op-2 status content carries the same figures GSE names usePhyMem / phyMemUsage.
    let r = d.op("m", "alloc", 2);
    let content: Value = serde_json::from_str(r["content"].as_str().unwrap()).unwrap();
    let inst = &content["process"][0]["instance"][0];
    assert_eq!(inst["pid"], json!(pid));
    assert!(inst["usePhyMem"].as_u64().unwrap() >= want, "{content}");
    assert_eq!(d.op("m", "alloc", 1)["error_code"], json!(0));
}

#[test]
fn fds_disk_sockets_and_a_hostile_comm() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    let none = json!({"cpu": 0, "mem": 0});
    // 50 open files.
    d.register(
        "m",
        "files",
        py_spec(&env, "files", "import time\nfs = [open('/dev/null') for _ in range(50)]\nwhile True:\n    time.sleep(1)\n", none.clone()),
    );
    // Writes 10 MB to a file on disk (fsync'ed) when the trigger file appears.
    let trigger = env.p("go");
    let data = env.p("written.bin");
    let writer = format!(
        "import os, time\nwhile not os.path.exists({trigger:?}):\n    time.sleep(0.05)\nwith open({data:?}, 'wb') as f:\n    for _ in range(10):\n        f.write(b'\\x07' * (1024 * 1024))\n    f.flush()\n    os.fsync(f.fileno())\nwhile True:\n    time.sleep(1)\n"
    );
    d.register(
        "m",
        "writer",
        py_spec(&env, "writer", &writer, none.clone()),
    );
    // 3 TCP sockets (listener, client, accepted) and 1 UDP socket.
    let net = "import socket, time\nl = socket.socket()\nl.bind(('127.0.0.1', 0))\nl.listen()\nc = socket.create_connection(l.getsockname())\na, _ = l.accept()\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.bind(('127.0.0.1', 0))\nwhile True:\n    time.sleep(1)\n";
    d.register("m", "net", py_spec(&env, "net", net, none.clone()));
    // A comm with spaces and parentheses (the kernel does not escape it in /proc/PID/stat).
    let odd = "import time\nopen('/proc/self/comm', 'w').write('x) (y z')\nfs = [open('/dev/null') for _ in range(20)]\nwhile True:\n    time.sleep(1)\n";
    d.register("m", "odd", py_spec(&env, "odd", odd, none));

    for n in ["files", "writer", "net", "odd"] {
        start(&d, "m", n);
    }

    let v = wait_detail(&d, "m", "files", "fd >= 50", |v| {
        v["fd"].as_i64().unwrap_or(0) >= 50
    });
    assert!(v["fd"].as_i64().unwrap() < 80, "{v}");
    assert!(d.status("m", "files")["fd"].as_i64().unwrap() >= 50);

    let before = wait_detail(&d, "m", "writer", "a first sample", |_| true)["disk"]
        .as_i64()
        .unwrap();
    std::fs::write(&trigger, "1").unwrap();
    let v = wait_detail(&d, "m", "writer", "disk grows by 10 MB", |v| {
        v["disk"].as_i64().unwrap_or(0) >= before + 10 * 1024 * 1024
    });
    assert!(
        d.status("m", "writer")["disk"].as_i64().unwrap() >= before + 10 * 1024 * 1024,
        "{v}"
    );

    let v = wait_detail(&d, "m", "net", "4 sockets", |v| {
        v["net_sockets"].as_u64() == Some(4)
    });
    // Nothing flows on them: no network I/O.
    assert_eq!(v["net"], json!(0), "{v}");
    assert_eq!(d.status("m", "net")["net"], json!(0), "{v}");
    // The other processes hold no sockets.
    assert_eq!(d.detail("m", "files")["net_sockets"], json!(0));

    let pid = d.status("m", "odd")["pid"].as_i64().unwrap();
    wait_for("the comm rename", Duration::from_secs(20), || {
        let c = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (c.trim_end() == "x) (y z").then_some(())
    });
    let v = wait_detail(&d, "m", "odd", "fd >= 20 with an odd comm", |v| {
        v["fd"].as_i64().unwrap_or(0) >= 20 && v["rss_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(v["pids"], json!([pid]), "{v}");
    for n in ["files", "writer", "net", "odd"] {
        assert_eq!(d.op("m", n, 1)["error_code"], json!(0), "stop {n}");
    }
}

/// A local TCP server for [`tcp_bytes_of_the_whole_tree`]: accepts connections, answers each
/// with `reply` bytes once it has read `first` bytes from it, then reads until EOF. Counts the
/// connections it accepted. Ends with the test (its listener and threads are dropped with the
/// process); every read has a timeout so no thread outlives a stuck peer for long.
fn byte_sink(first: usize, reply: usize) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                let mut buf = vec![0u8; 64 * 1024];
                let (mut got, mut answered) = (0usize, false);
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    got += n;
                    if !answered && got >= first {
                        answered = true;
                        if c.write_all(&vec![b'r'; reply]).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, accepted)
}

/// `net` is network I/O: the TCP bytes of the process's whole tree (a forked child here does
/// the talking), sent and received as cumulative counters that do not go back when a
/// connection closes, `net` their rate over the last sample, and the socket count on its own.
#[test]
fn tcp_bytes_of_the_whole_tree() {
    const N: usize = 3 * 1024 * 1024;
    const REPLY: usize = 5000;
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    let (port, accepted) = byte_sink(N, REPLY);
    let trigger = env.p("second");
    // The parent only waits (and takes its child along when it is stopped); its child
    // sends N bytes, reads the reply, keeps the connection until the trigger file appears,
    // then closes it and trickles 1 KiB every 20 ms over a second connection.
    let body = format!(
        "import os, signal, socket, time\n\
         kid = os.fork()\n\
         if kid == 0:\n\
         \x20   c = socket.create_connection(('127.0.0.1', {port}))\n\
         \x20   c.sendall(b'x' * {N})\n\
         \x20   got = 0\n\
         \x20   while got < {REPLY}:\n\
         \x20       got += len(c.recv(65536))\n\
         \x20   while not os.path.exists({trigger:?}):\n\
         \x20       time.sleep(0.05)\n\
         \x20   c.close()\n\
         \x20   d = socket.create_connection(('127.0.0.1', {port}))\n\
         \x20   while True:\n\
         \x20       d.sendall(b'y' * 1024)\n\
         \x20       time.sleep(0.02)\n\
         signal.signal(signal.SIGTERM, lambda *_: (os.kill(kid, 9), os._exit(0)))\n\
         while True:\n\
         \x20   time.sleep(1)\n"
    );
    d.register(
        "m",
        "talker",
        py_spec(&env, "talker", &body, json!({"cpu": 0, "mem": 0})),
    );
    start(&d, "m", "talker");
    let v = wait_detail(&d, "m", "talker", "N bytes sent, the reply received", |v| {
        v["net_sent_bytes"].as_u64().unwrap_or(0) >= N as u64
            && v["net_received_bytes"].as_u64().unwrap_or(0) >= REPLY as u64
    });
    assert_eq!(
        v["net_sockets"],
        json!(1),
        "one open connection in the tree: {v}"
    );
    assert!(
        v["net_sent_bytes"].as_u64().unwrap() < N as u64 + 64 * 1024,
        "the bytes of this connection, not the host's: {v}"
    );
    // Close the first connection; the counters never go back while the second one runs.
    std::fs::write(&trigger, "1").expect("trigger");
    let mut last = v["net_sent_bytes"].as_u64().unwrap();
    let v = wait_for(
        "a positive rate on the second connection",
        Duration::from_secs(60),
        || {
            let v = d.detail("m", "talker");
            let sent = v["net_sent_bytes"].as_u64().unwrap_or(0);
            assert!(sent >= last, "sent went back from {last} to {sent}: {v}");
            last = sent;
            let done = accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2
                && sent > N as u64
                && v["net"].as_i64().unwrap_or(0) > 0;
            done.then_some(v)
        },
    );
    assert!(
        v["net_received_bytes"].as_u64().unwrap() >= REPLY as u64,
        "{v}"
    );
    // The CLI's status --json and GSE's get_proc_status carry the same figures.
    let (code, out, err) = d.cli(&["--json", "status", "m/talker"]);
    assert_eq!(code, 0, "{err}");
    let cli: Value = serde_json::from_str(&out).expect("status --json");
    let row = &cli["list"][0];
    assert!(row["net_sent_bytes"].as_u64().unwrap() > N as u64, "{row}");
    assert!(
        row["net_received_bytes"].as_u64().unwrap() >= REPLY as u64,
        "{row}"
    );
    assert!(row["net_sockets"].as_u64().is_some(), "{row}");
    assert!(row["net"].as_i64().is_some(), "{row}");
    let st = d.status("m", "talker");
    assert!(st["net"].as_i64().is_some(), "{st}");
    // /metrics: the two counters and the socket gauge.
    let (status, body) = d.http("GET", "/metrics", b"").expect("metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    let fams = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let sent = family(&fams, "procagent_process_net_sent_bytes");
    assert_eq!(sent.kind, "counter");
    assert!(
        value_of(
            sent,
            "procagent_process_net_sent_bytes_total",
            "m",
            "talker"
        )
        .unwrap()
            > N as f64
    );
    let recv = family(&fams, "procagent_process_net_received_bytes");
    assert_eq!(recv.kind, "counter");
    assert!(
        value_of(
            recv,
            "procagent_process_net_received_bytes_total",
            "m",
            "talker"
        )
        .unwrap()
            >= REPLY as f64
    );
    assert_eq!(family(&fams, "procagent_process_net_sockets").kind, "gauge");
    assert_eq!(d.op("m", "talker", 1)["error_code"], json!(0));
}

fn events_of(d: &Daemon, key: &str, kind: &str) -> Vec<Value> {
    d.events(key)
        .into_iter()
        .filter(|e| e["kind"] == json!(kind))
        .collect()
}

#[test]
fn over_mem_limit_is_stopped_and_restarted_under_limit_is_left_alone() {
    let env = TestEnv::new();
    let d = Daemon::start(
        &env,
        &format!("{FAST}[supervisor]\nbackoff_initial = \"500ms\"\nbackoff_reset = \"10m\"\n"),
    );
    // mem_lmt is percent of MemTotal: about 100 MB on this host.
    let lmt = (100.0 * 1024.0 * 1024.0 / mem_total_bytes() as f64 * 100.0 * 1000.0).ceil() / 1000.0;
    let hog = "import time\nb = b'\\x01' * (300 * 1024 * 1024)\nwhile True:\n    time.sleep(1)\n";
    d.register(
        "lim",
        "hog",
        py_spec(&env, "hog", hog, json!({"cpu": 0, "mem": lmt})),
    );
    let small = "import time\nwhile True:\n    time.sleep(1)\n";
    d.register(
        "lim",
        "small",
        py_spec(&env, "small", small, json!({"cpu": 0, "mem": lmt})),
    );
    let hog_pid = start(&d, "lim", "hog");
    let small_pid = start(&d, "lim", "small");

    let ev = wait_for("a limit_exceeded event", Duration::from_secs(60), || {
        events_of(&d, "lim/hog", "limit_exceeded")
            .into_iter()
            .next()
    });
    let data = &ev["data"];
    assert_eq!(data["mem_over"], json!(true), "{ev}");
    assert!(data["mem_usage"].as_f64().unwrap() > lmt, "{ev}");
    assert_eq!(data["mem_lmt"].as_f64().unwrap(), lmt);
    assert_eq!(data["samples"], json!(3));
    assert_eq!(data["pids"], json!([hog_pid]));
    assert!(ev["message"].as_str().unwrap().contains("mem_lmt"), "{ev}");

    // Stopped with its stop_cmd, then restarted by supervision (a new pid), still managed.
    let st = wait_for("the hog restarted", Duration::from_secs(60), || {
        let st = d.status("lim", "hog");
        let restarted = d.detail("lim", "hog")["restarts"].as_u64().unwrap_or(0) >= 1;
        (restarted && st["status"] == json!(1) && st["pid"].as_i64() != Some(hog_pid)).then_some(st)
    });
    assert_eq!(st["isauto"], json!(true), "{st}");
    assert!(!alive(hog_pid as i32), "the first hog is gone");
    let v = d.detail("lim", "hog");
    assert!(v["restarts"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["limit_stops"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["last_limit"].as_str().unwrap().contains("mem_lmt"), "{v}");
    assert!(!events_of(&d, "lim/hog", "limit_stopped").is_empty());
    // "restarted" is recorded once the new process passed its start check.
    wait_for("a restarted event", Duration::from_secs(30), || {
        (!events_of(&d, "lim/hog", "restarted").is_empty()).then_some(())
    });

    // It keeps exceeding: the next stop backs off (a failure in a row: a delay > 0).
    let second = wait_for("a second limit stop", Duration::from_secs(90), || {
        events_of(&d, "lim/hog", "limit_stopped").into_iter().nth(1)
    });
    assert!(
        second["data"]["restart_in_secs"].as_f64().unwrap() > 0.0,
        "{second}"
    );
    assert!(
        second["data"]["failures"].as_u64().unwrap() >= 2,
        "{second}"
    );

    // The process under its limit was left alone all along.
    let st = d.status("lim", "small");
    assert_eq!(
        (st["status"].clone(), st["pid"].clone()),
        (json!(1), json!(small_pid)),
        "{st}"
    );
    assert!(events_of(&d, "lim/small", "limit_exceeded").is_empty());
    assert_eq!(d.detail("lim", "small")["limit_stops"], json!(0));

    // The hog may be between a limit stop and its restart: 829 (not running) is an answer
    // too, and both end supervision.
    let code = d.op("lim", "hog", 1)["error_code"].as_i64();
    assert!(matches!(code, Some(0) | Some(829)), "{code:?}");
    assert_eq!(d.detail("lim", "hog")["managed"], json!(false));
    assert_eq!(d.op("lim", "small", 1)["error_code"], json!(0));
}

#[test]
fn over_cpu_limit_counts_the_whole_machine() {
    let env = TestEnv::new();
    let d = Daemon::start(
        &env,
        &format!("{FAST}[supervisor]\nbackoff_initial = \"30s\"\n"),
    );
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    // One busy core is 100/cpus % of the machine; a limit of a fifth of that is exceeded
    // even on a shared machine.
    let lmt = (100.0 / cpus / 5.0 * 100.0).floor() / 100.0;
    d.register(
        "lim",
        "spin",
        py_spec(
            &env,
            "spin",
            "while True:\n    pass\n",
            json!({"cpu": lmt, "mem": 0}),
        ),
    );
    let pid = start(&d, "lim", "spin");
    let ev = wait_for(
        "a cpu limit_exceeded event",
        Duration::from_secs(60),
        || {
            events_of(&d, "lim/spin", "limit_exceeded")
                .into_iter()
                .next()
        },
    );
    let data = &ev["data"];
    assert_eq!(data["cpu_over"], json!(true), "{ev}");
    let usage = data["cpu_usage"].as_f64().unwrap();
    let machine = data["cpu_machine_percent"].as_f64().unwrap();
    assert!((machine - usage / cpus).abs() < 1e-6, "{ev}");
    assert!(machine > lmt, "{ev}");
    wait_for("the spinner stopped", Duration::from_secs(30), || {
        (!alive(pid as i32)).then_some(())
    });
    // Stop it for good (it would be restarted after the backoff).
    let _ = d.op("lim", "spin", 1);
}

// ---------------------------------------------------------------------------------------
// A strict parser of the OpenMetrics / Prometheus text exposition format, so the test checks
// the structure rather than matching strings.

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct Family {
    name: String,
    kind: String,
    help: Option<String>,
    unit: Option<String>,
    samples: Vec<Sample>,
}

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            Err(format!("bad number {s:?}"))
        }
        _ => s.parse::<f64>().map_err(|_| format!("bad number {s:?}")),
    }
}

/// Parse `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err("newline in label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected , or } after a label".into());
        }
    }
}

type LabelKey = Vec<(String, String)>;

fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        "gaugehistogram" => &["_gbucket", "_gcount", "_gsum"],
        "gauge" | "unknown" | "untyped" | "stateset" => &[""],
        _ => &[],
    }
}

fn parse_exposition(text: &str) -> Result<Vec<Family>, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("missing the final # EOF line")?;
    let mut fams: Vec<Family> = Vec::new();
    let mut seen_samples = std::collections::HashSet::new();
    for (no, line) in body.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", no + 1);
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (what, name, rest) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next(),
            );
            if !valid_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            let current = fams
                .last_mut()
                .filter(|f| f.name == name && f.samples.is_empty());
            let fam = match current {
                Some(f) => f,
                None => {
                    if fams.iter().any(|f| f.name == name) {
                        return Err(at(format!("family {name} is not contiguous")));
                    }
                    fams.push(Family {
                        name: name.into(),
                        kind: "unknown".into(),
                        help: None,
                        unit: None,
                        samples: vec![],
                    });
                    fams.last_mut().expect("just pushed")
                }
            };
            match (what, rest) {
                ("TYPE", Some(k)) => {
                    if suffixes(k).is_empty() {
                        return Err(at(format!("unknown type {k}")));
                    }
                    fam.kind = k.into();
                }
                ("HELP", Some(h)) => fam.help = Some(h.into()),
                ("UNIT", Some(u)) => {
                    if !name.ends_with(&format!("_{u}")) {
                        return Err(at(format!("name does not end with its unit {u}")));
                    }
                    fam.unit = Some(u.into())
                }
                _ => return Err(at("unknown metadata".into())),
            }
            continue;
        }
        if line.starts_with('#') {
            return Err(at("bad comment".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("expected a space before the value".into()))?;
        let mut vs = rest.split(' ');
        let value = parse_value(vs.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = vs.next() {
            parse_value(ts).map_err(at)?;
        }
        if vs.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let fam = fams
            .last_mut()
            .ok_or_else(|| at("sample before any family".into()))?;
        let ok = suffixes(&fam.kind)
            .iter()
            .any(|s| name.strip_suffix(s) == Some(fam.name.as_str()));
        if !ok {
            return Err(at(format!(
                "sample {name} does not belong to family {} ({})",
                fam.name, fam.kind
            )));
        }
        if fam.kind == "counter" && name.ends_with("_total") && (value.is_nan() || value < 0.0) {
            return Err(at("negative or NaN counter".into()));
        }
        if !seen_samples.insert((name.to_string(), labels.clone())) {
            return Err(at("duplicate sample".into()));
        }
        fam.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    for f in fams.iter().filter(|f| f.kind == "histogram") {
        let mut series: BTreeMap<LabelKey, Vec<(f64, f64)>> = BTreeMap::new();
        for s in f.samples.iter().filter(|s| s.name.ends_with("_bucket")) {
            let le = parse_value(
                s.labels
                    .get("le")
                    .ok_or(format!("{}: bucket without le", f.name))?,
            )?;
            let key: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in series {
            if !buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
            {
                return Err(format!("{}: buckets not increasing: {buckets:?}", f.name));
            }
            let (last_le, last) = *buckets.last().ok_or("no buckets")?;
            if last_le != f64::INFINITY {
                return Err(format!("{}: no +Inf bucket", f.name));
            }
            let count = f.samples.iter().find(|s| {
                s.name == format!("{}_count", f.name)
                    && s.labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<Vec<_>>()
                        == key
            });
            if count.map(|c| c.value) != Some(last) {
                return Err(format!("{}: _count differs from the +Inf bucket", f.name));
            }
        }
    }
    Ok(fams)
}

#[test]
fn the_exposition_parser_rejects_malformed_text() {
    let good =
        "# HELP a x\n# TYPE a counter\na_total{k=\"v\\\"q\"} 1\n# TYPE g gauge\ng 2.5\n# EOF\n";
    let f = parse_exposition(good).expect("valid");
    assert_eq!(f.len(), 2);
    assert_eq!(f[0].samples[0].labels["k"], "v\"q");
    let bad = [
        "# TYPE a counter\na_total 1\n",     // no EOF
        "# TYPE a counter\na 1\n# EOF\n",    // counter sample without _total
        "# TYPE g gauge\ng{k=v} 1\n# EOF\n", // unquoted label
        "# TYPE g gauge\ng 1x\n# EOF\n",     // bad number
        "# TYPE g gauge\ng 1\ng 2\n# EOF\n", // duplicate sample
        "# TYPE g gauge\ng 1\n# TYPE h gauge\nh 1\n# TYPE g gauge\n# EOF\n", // not contiguous
        "# TYPE a counter\na_total -1\n# EOF\n", // negative counter
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\nh_sum 0\n# EOF\n", // no +Inf
        "# TYPE g gauge\n# UNIT g bytes\ng 1\n# EOF\n", // unit not in the name
        "x 1\n# EOF\n",                                 // sample without a family
        "# TYPE g gauge\n\ng 1\n# EOF\n",               // empty line
    ];
    for b in bad {
        assert!(parse_exposition(b).is_err(), "accepted: {b:?}");
    }
}

fn family<'a>(f: &'a [Family], name: &str) -> &'a Family {
    f.iter().find(|x| x.name == name).unwrap_or_else(|| {
        panic!(
            "no family {name} in {:?}",
            f.iter().map(|x| &x.name).collect::<Vec<_>>()
        )
    })
}

fn value_of(f: &Family, sample: &str, ns: &str, name: &str) -> Option<f64> {
    f.samples
        .iter()
        .find(|s| {
            s.name == sample
                && s.labels.get("namespace").map(String::as_str) == Some(ns)
                && s.labels.get("name").map(String::as_str) == Some(name)
        })
        .map(|s| s.value)
}

fn tcp_get(addr: &str, path: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read the answer");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("http answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // Reassemble chunks.
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, r)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&r[..n]);
            rest = &r[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

#[test]
fn metrics_endpoint_parses_as_prometheus_text() {
    let env = TestEnv::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&env, &format!("{FAST}listen = \"{addr}\"\n"));
    d.register("prom", "up1", daemon_spec(&env, "up1", json!({})));
    d.register("prom", "down1", daemon_spec(&env, "down1", json!({})));
    assert_eq!(d.op("prom", "up1", 0)["error_code"], json!(0));
    let v = wait_detail(&d, "prom", "up1", "a sample", |v| {
        v["fd"].as_i64().unwrap_or(0) > 0
    });

    let (status, body) = d.http("GET", "/metrics", b"").unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    let fams = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    let up = family(&fams, "procagent_process_up");
    assert_eq!(up.kind, "gauge");
    assert_eq!(
        value_of(up, "procagent_process_up", "prom", "up1"),
        Some(1.0)
    );
    assert_eq!(
        value_of(up, "procagent_process_up", "prom", "down1"),
        Some(0.0)
    );
    let fds = family(&fams, "procagent_process_open_fds");
    let fd = value_of(fds, "procagent_process_open_fds", "prom", "up1").expect("fds of up1");
    assert!(fd >= 1.0, "{fd}");
    assert_eq!(
        value_of(fds, "procagent_process_open_fds", "prom", "down1"),
        None,
        "no figures for a stopped process"
    );
    let rss = family(&fams, "procagent_process_resident_memory_bytes");
    assert_eq!(rss.unit.as_deref(), Some("bytes"));
    assert!(
        value_of(
            rss,
            "procagent_process_resident_memory_bytes",
            "prom",
            "up1"
        )
        .unwrap()
            > 0.0
    );
    let _ = v;
    for (f, kind) in [
        ("procagent_process_cpu_usage_percent", "gauge"),
        ("procagent_process_memory_usage_percent", "gauge"),
        ("procagent_process_disk_io_bytes", "counter"),
        ("procagent_process_net_sockets", "gauge"),
        ("procagent_process_restarts", "counter"),
        ("procagent_process_managed", "gauge"),
        ("procagent_process_limit_stops", "counter"),
        ("procagent_managed_processes", "gauge"),
        ("procagent_running_processes", "gauge"),
        ("procagent_registered_processes", "gauge"),
        ("procagent_sample_duration_seconds", "histogram"),
        ("procagent_sample_last_duration_seconds", "gauge"),
        ("procagent_api_requests", "counter"),
        ("procagent_agent_cpu_seconds", "counter"),
        ("procagent_agent_resident_memory_bytes", "gauge"),
    ] {
        assert_eq!(family(&fams, f).kind, kind, "{f}");
    }
    let restarts = family(&fams, "procagent_process_restarts");
    assert_eq!(
        value_of(restarts, "procagent_process_restarts_total", "prom", "up1"),
        Some(0.0)
    );
    assert_eq!(
        family(&fams, "procagent_managed_processes").samples[0].value,
        1.0
    );
    assert_eq!(
        family(&fams, "procagent_registered_processes").samples[0].value,
        2.0
    );
    let hist = family(&fams, "procagent_sample_duration_seconds");
    let count = hist
        .samples
        .iter()
        .find(|s| s.name.ends_with("_count"))
        .unwrap()
        .value;
    assert!(count >= 1.0, "at least one sampling pass: {count}");

    // The loopback listener serves the same text, and nothing else.
    let (status, head, body) = tcp_get(&addr, "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let fams = parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let api = family(&fams, "procagent_api_requests");
    let scrapes = api
        .samples
        .iter()
        .find(|s| s.labels.get("api").map(String::as_str) == Some("metrics"))
        .map(|s| s.value)
        .unwrap_or(0.0);
    assert!(
        scrapes >= 2.0,
        "this scrape and the one on the socket are counted: {scrapes}"
    );
    let (status, _, _) = tcp_get(&addr, "/v1/healthz");
    assert_eq!(status, 404, "only /metrics on the TCP listener");
    let (status, _, _) = tcp_get(&addr, "/v1/procs");
    assert_eq!(status, 404);

    // /v1/metrics is the same on the socket.
    let (status, body) = d.http("GET", "/v1/metrics", b"").unwrap();
    assert_eq!(status, 200);
    parse_exposition(&String::from_utf8(body).unwrap()).expect("parses");
    assert_eq!(d.op("prom", "up1", 1)["error_code"], json!(0));
}

#[test]
fn top_shows_a_table_and_json() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    d.register("topns", "svc", daemon_spec(&env, "svc", json!({})));
    assert_eq!(d.op("topns", "svc", 0)["error_code"], json!(0));
    wait_detail(&d, "topns", "svc", "a sample", |_| true);

    let (code, out, err) = d.cli(&["top", "--once"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("procagent top"), "{out}");
    assert!(
        lines[0].contains("processes 1  running 1  managed 1"),
        "{out}"
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "PROCESS", "STATE", "PID", "CPU%", "MEM%", "RSS", "FD", "DISK", "DISK/S", "NET/S",
            "UPTIME", "RESTARTS", "LIMIT"
        ],
        "{out}"
    );
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(row[0], "topns/svc", "{out}");
    assert_eq!(row[1], "running");
    assert_eq!(row[2], d.status("topns", "svc")["pid"].to_string());
    assert!(row[6].parse::<i64>().unwrap() >= 1, "fd column: {out}");

    // Not a terminal: successive snapshots, one per refresh, the second with a disk rate.
    let (code, out, err) = d.cli(&["top", "-n", "2", "-d", "200ms"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("procagent top"))
            .count(),
        2,
        "{out}"
    );
    assert!(
        !out.contains('\x1b'),
        "no escape codes when not a terminal: {out:?}"
    );

    // --json: one snapshot.
    let (code, out, err) = d.cli(&["--json", "top"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["list"][0]["name"], json!("svc"));
    assert!(v["list"][0]["fd"].as_i64().unwrap() >= 1);

    let (code, _, err) = d.cli(&["top", "-n", "0"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(d.op("topns", "svc", 1)["error_code"], json!(0));
}
