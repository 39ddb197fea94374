//! Captured output (issue "Trust boundaries", item 8): a flooding daemon stays within its
//! documented bound at every moment, rotation loses no line, a daemon's stdout survives agent
//! restarts (SIGTERM, kill -9, a new binary), and command results still carry their output
//! without ever waiting for a daemon that holds the pipe.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const NS: &str = "out";
const FAST: &str = "[supervisor]\nsweep_interval = \"100ms\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\n";
/// The longest line a file holds: a record's text is cut at 16 KiB, plus its prefix.
const ONE_LINE: u64 = 16 * 1024 + 64;

/// The captured output files of `ns/name` (current and rotated), oldest first.
fn output_files(state: &Path, ns: &str, name: &str) -> Vec<PathBuf> {
    let tag = format!("{ns}__{name}.");
    let mut v: Vec<(u32, PathBuf)> = std::fs::read_dir(state.join("output"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with(&tag) {
                return None;
            }
            let (_, rest) = n.split_once(".log")?;
            let idx = match rest.strip_prefix('.') {
                None if rest.is_empty() => 0,
                Some(k) => k.parse().ok()?,
                None => return None,
            };
            Some((idx, e.path()))
        })
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v.into_iter().map(|(_, p)| p).collect()
}

/// Every line of the output files, oldest first.
fn output_lines(state: &Path, ns: &str, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for f in output_files(state, ns, name) {
        let b = std::fs::read(&f).unwrap_or_default();
        out.extend(
            String::from_utf8_lossy(&b)
                .lines()
                .map(|l| l.to_string())
                .collect::<Vec<_>>(),
        );
    }
    out
}

/// A record line `TIME STREAM TEXT` split into (stream, text); None for other lines.
fn record(line: &str) -> Option<(&str, &str)> {
    let (ts, rest) = line.split_once(' ')?;
    if ts.len() != 24 || !ts.ends_with('Z') || ts.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    let (stream, text) = rest.split_once(' ').unwrap_or((rest, ""));
    matches!(stream, "out" | "err").then_some((stream, text))
}

fn copy_program(env: &TestEnv, from: &[&str], name: &str) -> String {
    let src = from
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("program to copy");
    let dst = env.path().join(name);
    std::fs::copy(src, &dst).expect("copy");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dst.display().to_string()
}

/// A daemon script that prints a numbered tick line every 20 ms to its stdout, forever.
fn ticker(env: &TestEnv) -> String {
    env.script(
        "ticker",
        "#!/bin/sh\ni=0\nwhile :; do echo \"tick $i\"; i=$((i+1)); sleep 0.02; done\n",
    )
}

fn spec_with_start(env: &TestEnv, name: &str, start: &str, proc_name: &str) -> Value {
    let mut spec = daemon_spec(env, name, json!({}));
    spec["control"]["start_cmd"] = json!(start);
    spec["identity"]["proc_name"] = json!(proc_name);
    spec
}

#[test]
fn a_flooding_daemon_stays_within_its_output_bound_at_every_moment() {
    let env = TestEnv::new();
    let (file_bytes, files) = (1u64 << 20, 3u64);
    let d = Daemon::start(
        &env,
        &format!("[store]\noutput_file_bytes = {file_bytes}\noutput_files = {files}\n{FAST}"),
    );
    // `yes` writes to its inherited stdout as fast as it can.
    let flood = copy_program(&env, &["/usr/bin/yes", "/bin/yes"], "floodd");
    let pidfile = env.p("floodd.pid");
    let start = format!(
        "setsid {flood} FLOOD-0123456789abcdefghijklmnopqrstuvwxyz </dev/null & echo $! > {pidfile}"
    );
    d.register(
        NS,
        "floodd",
        spec_with_start(&env, "floodd", &start, "floodd"),
    );
    d.register(NS, "calm", daemon_spec(&env, "calm", json!({})));
    assert_eq!(d.op(NS, "calm", 0)["error_code"], json!(0));
    let calm1 = read_pid(&env.p("calm.pid")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let state = d.state.clone();
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut samples, mut max_total, mut max_file, mut max_count) = (0u64, 0u64, 0u64, 0);
            while !stop.load(Ordering::Relaxed) {
                let fs = output_files(&state, NS, "floodd");
                let sizes: Vec<u64> = fs
                    .iter()
                    .filter_map(|f| std::fs::metadata(f).ok().map(|m| m.len()))
                    .collect();
                max_total = max_total.max(sizes.iter().sum());
                max_file = max_file.max(sizes.iter().copied().max().unwrap_or(0));
                max_count = max_count.max(sizes.len());
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (samples, max_total, max_file, max_count)
        })
    };
    assert_eq!(d.op(NS, "floodd", 0)["error_code"], json!(0));
    let flood_pid = read_pid(&pidfile).unwrap();
    // While it floods for several seconds, the agent answers and supervises.
    let t0 = Instant::now();
    kill9(calm1);
    wait_for("calm restarted", Duration::from_secs(30), || {
        let p = d.status(NS, "calm")["pid"].as_i64().unwrap_or(-1) as i32;
        (p > 0 && p != calm1 && alive(p)).then_some(())
    });
    while t0.elapsed() < Duration::from_secs(6) {
        let h = d.get("/v1/healthz");
        assert_eq!(
            h["result"],
            json!(true),
            "health answers during the flood: {h}"
        );
        assert_eq!(d.status(NS, "floodd")["status"], json!(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let (samples, max_total, max_file, max_count) = sampler.join().unwrap();
    let bound = file_bytes * files + ONE_LINE;
    assert!(samples > 100, "sampled {samples} times");
    assert!(
        max_total <= bound,
        "captured output reached {max_total} bytes, bound {bound}"
    );
    assert!(
        max_file <= file_bytes + ONE_LINE,
        "one file reached {max_file} bytes"
    );
    assert!(max_count as u64 <= files, "{max_count} files");
    // It really was captured and rotated, as records of its stdout.
    let fs = output_files(&d.state, NS, "floodd");
    assert!(fs.len() >= 2, "rotated: {fs:?}");
    // (The current file may have been rotated an instant ago and hold no whole record yet:
    // look at every file.)
    let records = fs.iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .filter_map(record)
            .any(|(s, t)| s == "out" && t == "FLOOD-0123456789abcdefghijklmnopqrstuvwxyz")
    });
    assert!(records, "records of the flood");
    assert!(alive(flood_pid), "the flooding daemon still runs");
    assert_eq!(d.op(NS, "floodd", 9)["error_code"], json!(0));
    assert!(!alive(flood_pid));
}

#[test]
fn rotation_loses_no_line_and_marks_stderr() {
    let env = TestEnv::new();
    // Small files, and enough of them to keep everything this test writes.
    let d = Daemon::start(
        &env,
        "[store]\noutput_file_bytes = 65536\noutput_files = 500\n",
    );
    let mut spec = daemon_spec(&env, "counter", json!({}));
    // seq writes 4 KiB blocks, so lines are split across writes; stdout and stderr at once.
    spec["control"]["reload_cmd"] =
        json!("seq 1 60000 & seq 60001 120000 >&2; wait; echo done-counting");
    d.register(NS, "counter", spec);
    let r = d.op(NS, "counter", 8);
    assert_eq!(r["error_code"], json!(0), "{r}");
    let files = output_files(&d.state, NS, "counter");
    assert!(files.len() >= 4, "several rotations: {files:?}");
    let mut seen = vec![0u8; 120_001];
    let mut other = Vec::new();
    for l in output_lines(&d.state, NS, "counter") {
        if l.starts_with("--- ") {
            continue;
        }
        let Some((stream, text)) = record(&l) else {
            other.push(l);
            continue;
        };
        match text.parse::<usize>() {
            Ok(n) if (1..=120_000).contains(&n) => {
                seen[n] += 1;
                let want = if n <= 60_000 { "out" } else { "err" };
                assert_eq!(stream, want, "line {n} marked {stream}");
            }
            _ => assert_eq!(text, "done-counting", "{l}"),
        }
    }
    assert!(
        other.is_empty(),
        "lines that are not records: {:?}",
        &other[..other.len().min(5)]
    );
    let missing: Vec<usize> = (1..=120_000).filter(|n| seen[*n] == 0).collect();
    let twice: Vec<usize> = (1..=120_000).filter(|n| seen[*n] > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "missing {} (first {:?}), twice {} (first {:?})",
        missing.len(),
        missing.first(),
        twice.len(),
        twice.first()
    );
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= 65536, "{} is {len} bytes", f.display());
    }
}

/// Register and start `NS/ticker`, a daemon whose stdout and stderr are the ones its start
/// command got from the agent; returns its pid.
fn start_ticker(env: &TestEnv, d: &Daemon) -> i32 {
    let t = ticker(env);
    let pidfile = env.p("ticker.pid");
    let start = format!("setsid {t} </dev/null & echo $! > {pidfile}");
    d.register(
        NS,
        "ticker",
        spec_with_start(env, "ticker", &start, "ticker"),
    );
    assert_eq!(d.op(NS, "ticker", 0)["error_code"], json!(0));
    read_pid(&pidfile).expect("the ticker's pid")
}

fn ticks(state: &Path) -> Vec<u64> {
    output_lines(state, NS, "ticker")
        .iter()
        .filter_map(|l| record(l))
        .filter_map(|(_, t)| t.strip_prefix("tick ")?.parse().ok())
        .collect()
}

fn wait_more_ticks(state: &Path, than: u64, what: &str) -> u64 {
    wait_for(what, Duration::from_secs(30), || {
        let t = ticks(state);
        let last = *t.last()?;
        (last > than + 10).then_some(last)
    })
}

#[test]
fn a_daemon_keeps_writing_across_agent_restarts() {
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, FAST);
    let pid = start_ticker(&env, &d);
    let state = d.state.clone();
    let config = d.config.clone();
    let mut last = wait_more_ticks(&state, 0, "ticks captured");

    // SIGTERM: the agent exits; the daemon keeps writing and its lines are still captured.
    assert!(d.terminate().is_some_and(|s| s.success()));
    assert!(alive(pid), "the daemon survives the agent's SIGTERM");
    last = wait_more_ticks(&state, last, "ticks captured while no agent runs");
    let mut d = Daemon::start_with(&env, &config);
    assert_eq!(d.status(NS, "ticker")["pid"], json!(pid), "adopted");
    last = wait_more_ticks(&state, last, "ticks captured after the restart");

    // kill -9: the same.
    d.kill9();
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid), "the daemon survives the agent's kill -9");
    last = wait_more_ticks(&state, last, "ticks captured after kill -9");
    let mut d = Daemon::start_with(&env, &config);
    last = wait_more_ticks(&state, last, "ticks captured after the second restart");

    // An upgrade: the agent comes back from another executable.
    assert!(d.terminate().is_some_and(|s| s.success()));
    let copy = copy_program(&env, &[DAEMON], "procagentd-upgraded");
    let d = Daemon::start_program(&env, &copy, &config);
    assert_eq!(d.status(NS, "ticker")["pid"], json!(pid), "adopted");
    last = wait_more_ticks(&state, last, "ticks captured after the upgrade");
    assert!(alive(pid), "no SIGPIPE: the daemon still runs");

    // Not one line lost on the way.
    let all = ticks(&state);
    let first = all[0];
    let gaps: Vec<(u64, u64)> = all
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(gaps.is_empty(), "ticks {first}..{last} with gaps {gaps:?}");
    assert_eq!(d.op(NS, "ticker", 9)["error_code"], json!(0));
}

/// The output keeper of a state directory (its pid), once there is one.
fn keeper_pid(state: &Path) -> Option<i32> {
    let want = format!("--output-keeper\0{}", state.join("output").display());
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (String::from_utf8_lossy(&cmd).contains(&want) && alive(pid)).then_some(pid)
    })
}

#[test]
fn a_daemon_keeps_writing_when_the_output_keeper_dies_or_stops() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    let pid = start_ticker(&env, &d);
    let mut last = wait_more_ticks(&d.state, 0, "ticks captured");
    // kill -9: the agent holds the pipes' read ends too, so the daemon's writes do not
    // break; it starts another keeper and hands them over.
    let k1 = keeper_pid(&d.state).expect("a keeper");
    kill9(k1);
    let k2 = wait_for("another keeper", Duration::from_secs(10), || {
        keeper_pid(&d.state).filter(|p| *p != k1)
    });
    last = wait_more_ticks(&d.state, last, "ticks captured by the new keeper");
    assert!(alive(pid), "no SIGPIPE: the daemon still runs");
    // SIGTERM (how an operator makes the keeper pick up a new binary): the same, and
    // nothing is lost on the way.
    let before_term = last;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(k2),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("a third keeper", Duration::from_secs(10), || {
        keeper_pid(&d.state).filter(|p| *p != k2)
    });
    last = wait_more_ticks(&d.state, last, "ticks captured by the third keeper");
    assert!(alive(pid));
    assert_eq!(d.status(NS, "ticker")["pid"], json!(pid), "never restarted");
    let all = ticks(&d.state);
    let missing =
        |from: u64, to: u64| -> Vec<u64> { (from..=to).filter(|n| !all.contains(n)).collect() };
    // A kill -9 can lose what the keeper had read and not yet written (a line or two).
    let lost_at_kill = missing(all[0], before_term);
    assert!(lost_at_kill.len() <= 2, "lost at kill -9: {lost_at_kill:?}");
    let lost_at_term = missing(before_term, last);
    assert!(lost_at_term.is_empty(), "lost at SIGTERM: {lost_at_term:?}");
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), all.len(), "no line twice");
    assert_eq!(d.op(NS, "ticker", 9)["error_code"], json!(0));
}

#[test]
fn command_results_carry_their_output_without_waiting_for_daemons() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    // A failed start command: its result carries what it wrote on stdout and stderr.
    let bad = spec_with_start(
        &env,
        "bad",
        "echo said-on-stdout; echo said-on-stderr >&2; exit 7",
        "bad",
    );
    d.register(NS, "bad", bad);
    let r = d.op(NS, "bad", 0);
    assert_eq!(r["error_code"], json!(65535), "{r}");
    let msg = r["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("said-on-stdout")
            && msg.contains("said-on-stderr")
            && msg.contains("exit code 7"),
        "{msg}"
    );
    // A start command whose daemon keeps the command's stdout open: the result comes back
    // (the agent never reads the pipe to its end), with what the command said.
    let t = ticker(&env);
    let pidfile = env.p("holder.pid");
    let mut spec = spec_with_start(
        &env,
        "holder",
        &format!("echo before-daemon; setsid {t} & echo $! > {pidfile}; echo after-daemon; exit 0"),
        "ticker",
    );
    spec["monitor_policy"]["op_timeout"] = json!(60);
    spec["control"]["reload_cmd"] = json!("echo reload-said; sleep 300 & exit 3");
    d.register(NS, "holder", spec);
    let r = d.op(NS, "holder", 0);
    assert_eq!(r["error_code"], json!(0), "{r}");
    // A failing command that leaves a child holding its output: answered at its shell's exit.
    let r = d.op(NS, "holder", 8);
    assert_eq!(r["error_code"], json!(65535), "{r}");
    let msg = r["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("reload-said") && msg.contains("exit code 3"),
        "{msg}"
    );
    // The headers of each command are in the file, and the daemon's lines follow.
    let lines = output_lines(&d.state, NS, "holder");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("--- ") && l.contains("start_cmd as")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("--- ") && l.contains("reload_cmd as"))
    );
    assert!(
        lines
            .iter()
            .filter_map(|l| record(l))
            .any(|(_, t)| t == "after-daemon")
    );
    wait_for("the daemon's ticks", Duration::from_secs(10), || {
        output_lines(&d.state, NS, "holder")
            .iter()
            .filter_map(|l| record(l))
            .any(|(_, t)| t.starts_with("tick "))
            .then_some(())
    });
    assert_eq!(d.op(NS, "holder", 9)["error_code"], json!(0));
}

/// The output file of a process is named after its exact key: a key chosen to look like
/// another one (same readable characters, same 32-bit hash the names used to carry) gets its
/// own file, so whoever may register it cannot write into the other process's output
/// (issue "Trust boundaries": an admin's key landing in root's `bk_ops/gse_agent` output).
#[test]
fn a_key_chosen_to_collide_gets_its_own_output_file() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    let talker = |word: &str| {
        env.script(
            &format!("talk-{word}"),
            &format!("#!/bin/sh\nwhile :; do echo \"{word}\"; sleep 0.05; done\n"),
        )
    };
    let (owner, intruder) = (talker("owner"), talker("intruder"));
    let spec = |name: &str, prog: &str| {
        let mut s = daemon_spec(&env, name, json!({}));
        s["control"]["start_cmd"] = json!(format!("exec {prog}"));
        s["identity"]["proc_name"] = json!(prog.rsplit('/').next().unwrap_or(prog));
        s["identity"]["pid_path"] = json!("");
        s
    };
    let forged_ns = "bk\u{e373}ops";
    let forged_name = "gse\u{3bd4}agent";
    d.register("bk_ops", "gse_agent", spec("gse_agent", &owner));
    d.register(forged_ns, forged_name, spec("forged", &intruder));
    for (ns, name) in [("bk_ops", "gse_agent"), (forged_ns, forged_name)] {
        let r = d.op(ns, name, 0);
        assert_eq!(r["error_code"], json!(0), "start {ns}/{name}: {r}");
    }
    let words = |key: &str| -> String {
        let q = key.replace('/', "%2F");
        let v = d.get(&format!("/v1/logs?key={q}&source=output&lines=1000"));
        v["data"].to_string()
    };
    let owner_log = wait_for("owner output", Duration::from_secs(20), || {
        let t = words("bk_ops/gse_agent");
        t.contains("owner").then_some(t)
    });
    let forged_key = format!("{forged_ns}/{forged_name}");
    let forged_log = wait_for("forged output", Duration::from_secs(20), || {
        let t = words(&utf8_percent(&forged_key));
        t.contains("intruder").then_some(t)
    });
    let owner_log = format!("{owner_log}{}", words("bk_ops/gse_agent"));
    assert!(
        !owner_log.contains("intruder"),
        "root's output holds the other key's lines: {}",
        &owner_log[..owner_log.len().min(2000)]
    );
    assert!(
        !forged_log.contains("owner"),
        "{}",
        &forged_log[..forged_log.len().min(2000)]
    );
    for (ns, name) in [("bk_ops", "gse_agent"), (forged_ns, forged_name)] {
        d.op(ns, name, 1);
    }
}

/// Percent-encode the non-ASCII bytes of `s` (for a query string).
fn utf8_percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The agent holds a duplicate of every captured pipe (so no writer breaks while the keeper
/// is replaced) and lets each go once its writers are gone: after processes end, the agent's
/// descriptors come back to where they were.
#[test]
fn pipe_duplicates_are_released_when_their_writers_end() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, FAST);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    let sleeper = env.program("holder");
    let names: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
    for n in &names {
        let spec = json!({
            "identity": {"proc_name": "holder", "setup_path": env.path().display().to_string(), "pid_path": ""},
            "control": {"start_cmd": format!("exec {sleeper} 1000")},
            "monitor_policy": {"auto_type": 1, "start_check_secs": 0, "op_timeout": 10},
        });
        d.register(NS, n, spec);
    }
    // One start and stop first, so lazily opened descriptors (store readers, the keeper's
    // connection) count in the baseline.
    assert_eq!(d.op(NS, &names[0], 0)["error_code"], json!(0));
    assert_eq!(d.op(NS, &names[0], 1)["error_code"], json!(0));
    let base = wait_for("the first pipes released", Duration::from_secs(10), || {
        let n = fds();
        std::thread::sleep(Duration::from_millis(300));
        (fds() == n).then_some(n)
    });
    for n in &names {
        assert_eq!(d.op(NS, n, 0)["error_code"], json!(0));
    }
    let running = fds();
    assert!(
        running >= base + 20,
        "two held read ends per running process: {base} -> {running}"
    );
    for n in &names {
        assert_eq!(d.op(NS, n, 1)["error_code"], json!(0));
    }
    wait_for(
        "the held read ends released",
        Duration::from_secs(10),
        || (fds() <= base).then_some(()),
    );
}
