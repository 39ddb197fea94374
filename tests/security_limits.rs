//! The server's limits: body size, header size and time, request time, connections at once,
//! per-uid caps of connections and follow streams, the root socket, refusals that every
//! client reads (the connection lingers instead of resetting), and bodies that are not valid
//! UTF-8 JSON. Slow or half-open clients must not block anyone else; nobody but root can
//! make root wait.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::sec::{
    AsUser, Cast, PEER_PY, User, cli_copy, have, run_as_within, run_within, system_python,
};
use common::*;
use serde_json::{Value, json};

/// Is the server done with this connection (EOF or reset)? What it sent is appended to
/// `got`.
fn done(s: &mut UnixStream, got: &mut Vec<u8>) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// As [`done`], for callers that only care whether the connection ended.
fn closed_by_server(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    done(s, &mut got).then_some(got)
}

/// Wait until the server has answered and closed the connection; returns the answer.
fn answer_and_close(s: &mut UnixStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    wait_for(what, Duration::from_secs(30), || {
        done(s, &mut got).then_some(())
    });
    got
}

fn envelope_of(raw: &[u8]) -> Value {
    let pos = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    serde_json::from_slice(&raw[pos + 4..]).unwrap_or(Value::Null)
}

fn status_of(raw: &[u8]) -> u16 {
    String::from_utf8_lossy(raw)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn healthy(d: &Daemon) -> bool {
    d.try_get("/v1/healthz")
        .is_ok_and(|v| v["result"] == json!(true))
}

#[test]
fn header_timeout_cuts_clients_that_never_finish_their_headers() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "[api]\nheader_timeout = \"1s\"\n");
    // Connected, said nothing.
    let mut silent = UnixStream::connect(&d.socket).unwrap();
    // Half a request line, then silence.
    let mut partial = UnixStream::connect(&d.socket).unwrap();
    partial
        .write_all(b"POST /v1/procs HTTP/1.1\r\nHost: a\r\nContent-Le")
        .unwrap();
    // A slow-loris: one header byte every 200 ms, forever.
    let mut loris = UnixStream::connect(&d.socket).unwrap();
    loris.write_all(b"GET /v1/healthz HTTP/1.1\r\n").unwrap();
    let mut loris_cut = false;
    let mut silent_cut = false;
    let mut partial_cut = false;
    wait_for(
        "every incomplete client cut at header_timeout",
        Duration::from_secs(30),
        || {
            if !loris_cut {
                if loris.write_all(b"X").is_err() {
                    loris_cut = true;
                } else {
                    loris_cut = closed_by_server(&mut loris).is_some();
                }
            }
            silent_cut = silent_cut || closed_by_server(&mut silent).is_some();
            partial_cut = partial_cut || closed_by_server(&mut partial).is_some();
            std::thread::sleep(Duration::from_millis(150));
            (loris_cut && silent_cut && partial_cut).then_some(())
        },
    );
    assert!(healthy(&d));
}

#[test]
fn a_slow_client_does_not_block_others() {
    let env = TestEnv::new();
    // A generous header timeout, so the slow client is still connected while others are
    // served.
    let d = Daemon::start(&env, "[api]\nheader_timeout = \"60s\"\n");
    let mut slow = Vec::new();
    for _ in 0..5 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.write_all(b"POST /v1/procs HTTP/1.1\r\nHost: a\r\n")
            .unwrap();
        slow.push(s);
    }
    // A body that never comes.
    let mut no_body = UnixStream::connect(&d.socket).unwrap();
    no_body
        .write_all(b"POST /v1/procs HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    for i in 0..20 {
        let r = d.call("procs", &json!({}));
        assert_eq!(r["result"], json!(true), "request {i}: {r}");
    }
    // The slow clients are still connected: the others were served while they waited.
    for s in &mut slow {
        assert!(closed_by_server(s).is_none(), "a slow client was cut early");
    }
    assert!(closed_by_server(&mut no_body).is_none());
}

#[test]
fn request_timeout_answers_408_for_a_body_that_stalls() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "[api]\nrequest_timeout = \"1s\"\n");
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"POST /v1/procs HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{\"na")
        .unwrap();
    // Answered, and the connection closed: the stalled body holds no slot.
    let raw = answer_and_close(&mut s, "a 408 answer and the connection closed");
    assert_eq!(status_of(&raw), 408, "{}", String::from_utf8_lossy(&raw));
    let v = envelope_of(&raw);
    assert_eq!(
        (v["result"].clone(), v["code"].clone()),
        (json!(false), json!(1_000_408)),
        "{v}"
    );
    assert!(healthy(&d));
}

#[test]
fn connections_beyond_the_limit_wait_and_are_then_served() {
    let env = TestEnv::new();
    let d = Daemon::start(
        &env,
        "[api]\nmax_connections = 2\nheader_timeout = \"2s\"\n",
    );
    // Two idle connections take both slots.
    let mut idle: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    // A third client is accepted by the kernel and waits; it is answered once a slot
    // frees (the idle ones are cut at header_timeout).
    let waiting = std::thread::spawn({
        let sock = d.socket.clone();
        move || {
            let (st, b) = http(&sock, "POST", "/v1/procs", b"{}").expect("served");
            (
                st,
                serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
            )
        }
    });
    let (st, v) = waiting.join().unwrap();
    assert_eq!((st, v["result"].clone()), (200, json!(true)), "{v}");
    for s in &mut idle {
        assert!(
            closed_by_server(s).is_some(),
            "the waiting client was served before an idle one was cut"
        );
    }
    // Many clients at once through two slots: every one is answered.
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let sock = d.socket.clone();
            std::thread::spawn(move || http(&sock, "POST", "/v1/tasks", b"{}").map(|(s, _)| s))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), 200);
    }
}

#[test]
fn oversized_bodies_and_headers_are_refused() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "[api]\nmax_body_bytes = 4096\n");
    // Content-Length over the limit.
    let (st, b) = d.http("POST", "/v1/procs", &vec![b' '; 5000]).unwrap();
    assert_eq!(st, 413);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (v["result"].clone(), v["code"].clone()),
        (json!(false), json!(1_000_413)),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("4096"), "{v}");
    // A chunked body that grows past the limit.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"POST /v1/procs HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for _ in 0..5 {
        if s.write_all(b"400\r\n").is_err() || s.write_all(&[b' '; 0x400]).is_err() {
            break;
        }
        let _ = s.write_all(b"\r\n");
    }
    let raw = answer_and_close(&mut s, "a 413 answer");
    assert_eq!(status_of(&raw), 413, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(envelope_of(&raw)["code"], json!(1_000_413));
    // A body under the limit still works.
    assert_eq!(d.call("procs", &json!({}))["result"], json!(true));
    // Headers beyond the 64 KiB buffer: refused, connection closed.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let _ = s.write_all(b"GET /v1/healthz HTTP/1.1\r\nHost: a\r\n");
    let big = format!("X-Big: {}\r\n", "a".repeat(1000));
    for _ in 0..100 {
        if s.write_all(big.as_bytes()).is_err() {
            break;
        }
    }
    let raw = answer_and_close(&mut s, "oversized headers refused");
    if !raw.is_empty() {
        assert_eq!(status_of(&raw), 431, "{}", String::from_utf8_lossy(&raw));
    }
    assert!(healthy(&d));
}

#[test]
fn a_request_answered_408_still_completes_its_change() {
    // The handler is not cancelled at request_timeout: a registration that waited behind a
    // long operation on the same process lands, even though its caller got a 408.
    let env = TestEnv::new();
    let d = Daemon::start(&env, "[api]\nrequest_timeout = \"1s\"\n");
    let mut spec = daemon_spec(&env, "slowop", json!({}));
    spec["control"]["reload_cmd"] = json!("sleep 3");
    d.register("lim", "slowop", spec.clone());
    let r = d.call(
        "operate_proc",
        &json!({"meta": {"namespace": "lim", "name": "slowop"}, "op_type": 8, "hosts": [Daemon::host()]}),
    );
    let task = r["data"]["task_id"].as_str().unwrap().to_string();
    wait_for("reload running", Duration::from_secs(10), || {
        (d.detail("lim", "slowop")["busy"] == json!("reload")).then_some(())
    });
    // update_proc_info waits for the operation lock, longer than request_timeout.
    spec["control"]["version_cmd"] = json!("echo 9.9");
    let r = d.call(
        "update_proc_info",
        &json!({"meta": {"namespace": "lim", "name": "slowop"}, "hosts": [Daemon::host()], "spec": spec}),
    );
    assert_eq!(r["code"], json!(1_000_408), "{r}");
    assert_eq!(
        d.wait_task(&task, &Daemon::key("lim", "slowop"))["error_code"],
        json!(0)
    );
    wait_for("the update landed", Duration::from_secs(10), || {
        (d.detail("lim", "slowop")["spec"]["version_cmd"] == json!("echo 9.9")).then_some(())
    });
}

const TOO_MANY: i64 = 1_000_429;

/// Why a root-only test with accounts and python3 cannot run here, if it cannot.
fn cannot_run_as_users() -> Option<String> {
    if !is_root() {
        return Some("creating accounts and switching to them needs root".into());
    }
    for tool in ["useradd", "groupadd", "userdel", "groupdel", "setpriv"] {
        if !have(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    if system_python().is_none() {
        return Some("no python3 that other accounts can run".into());
    }
    None
}

/// `peer.py`, written where every account can read it.
fn peer_py(env: &TestEnv) -> String {
    let p = env.path().join("peer.py");
    std::fs::write(&p, PEER_PY).expect("write peer.py");
    p.display().to_string()
}

/// Start `peer.py MODE SOCKET ARGS...` as `user`.
fn peer(env: &TestEnv, user: &User, mode: &str, socket: &std::path::Path, args: &[&str]) -> AsUser {
    let script = peer_py(env);
    let sock = socket.display().to_string();
    let mut a = vec!["-I", script.as_str(), mode, sock.as_str()];
    a.extend_from_slice(args);
    AsUser::spawn(Some(user), &system_python().expect("python3"), &a)
}

fn parsed(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("peer.py printed {line:?}: {e}"))
}

/// A daemon whose `[api]` gives the groups of a [`Cast`] their roles (plus `extra` keys), or
/// why that cannot run here. Dropped in order: the daemon, the accounts, the temp dir.
struct Setup {
    d: Daemon,
    cast: Cast,
    env: TestEnv,
}

fn with_accounts(extra: &str) -> Option<Setup> {
    if let Some(why) = cannot_run_as_users() {
        eprintln!("skipped: {why}");
        return None;
    }
    let env = TestEnv::new();
    let cast = Cast::new();
    let d = Daemon::start(&env, &cast.api_config(extra));
    Some(Setup { d, cast, env })
}

/// root's CLI as an operator runs it: no --socket, the agent's config.
fn root_cli(d: &Daemon, args: &[&str], timeout: Duration) -> Option<(i32, String, String)> {
    run_within(
        Command::new(CLI)
            .arg("--config")
            .arg(&d.config)
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("PROCAGENT_SOCKET"),
        timeout,
    )
}

#[test]
fn root_is_never_locked_out_by_streams_or_slow_clients_of_other_uids() {
    let Some(s) = with_accounts("") else {
        return;
    };
    let (d, r, env) = (&s.d, &s.cast, &s.env);
    d.register("lock", "p", daemon_spec(env, "lockp", json!({})));
    let cli = cli_copy(env);
    let generous = Duration::from_secs(30);
    // A read-only member asks for 300 follow streams, events and logs in turn.
    let mut reader = peer(
        env,
        &r.reader,
        "streams",
        &d.socket,
        &[
            "300",
            "/v1/events?follow=1",
            "/v1/logs?key=lock%2Fp&follow=1",
        ],
    );
    let streams = parsed(&reader.line("the reader's streams", Duration::from_secs(180)));
    // Meanwhile a uid without a role keeps 300 connections trickling header bytes.
    let mut loris = peer(env, &r.other, "slow", &d.socket, &["300"]);
    let opened = parsed(&loris.line("the slow connections", Duration::from_secs(120)));
    // root's CLI picks the root socket and is answered.
    let (code, out, err) =
        root_cli(d, &["health"], generous).expect("root's `procagent health` answered in time");
    assert_eq!(code, 0, "{out}{err}");
    let root_sock = d.socket.with_file_name("agent-root.sock");
    assert!(out.contains("socket: root"), "{out}");
    assert!(
        out.contains(&format!("sockets.root: {}", root_sock.display()))
            && out.contains(&format!("sockets.main: {}", d.socket.display())),
        "{out}"
    );
    let (code, out, err) =
        root_cli(d, &["status"], generous).expect("root's `procagent status` answered in time");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("lock/p") || out.contains("lockp"), "{out}");
    // An admin on the main socket is answered too: served, or the cap's envelope; never a hang.
    let sock = d.socket.display().to_string();
    let (code, out, err) = run_as_within(
        &r.admin,
        &cli,
        &["--socket", &sock, "--json", "health"],
        generous,
    )
    .expect("the admin's request answered in time");
    assert!(
        (code == 0 && out.contains("\"socket\": \"main\"")) || err.contains("1000429"),
        "{code} {out} {err}"
    );
    // Whatever the stream cap allows is held (8 by default), the rest refused with the code.
    assert_eq!(streams["held"], json!(8), "{streams}");
    assert_eq!(
        streams["refused"],
        json!({ TOO_MANY.to_string(): 292 }),
        "{streams}"
    );
    let msg = streams["messages"][TOO_MANY.to_string()]
        .as_str()
        .unwrap_or("");
    assert!(
        msg.contains(&format!("uid {}", r.reader.uid)) && msg.contains("api.max_streams_per_uid"),
        "{streams}"
    );
    // The slow connections were all opened, and the agent keeps cutting them.
    assert_eq!(opened["opened"], json!(300), "{opened}");
    wait_for("slow connections cut", generous, || {
        loris.say("report");
        let v = parsed(&loris.line("the slow connections' report", generous));
        (v["cut"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    // Clean up: every connection and both clients.
    loris.close_stdin();
    assert!(loris.finish(generous).is_some());
    reader.close_stdin();
    assert!(reader.finish(generous).is_some());
    assert!(healthy(d));
}

#[test]
fn connections_are_capped_per_uid_and_a_uid_without_a_role_gets_almost_none() {
    let Some(s) = with_accounts("header_timeout = \"30s\"\n") else {
        return;
    };
    let (d, r, env) = (&s.d, &s.cast, &s.env);
    let limit = Duration::from_secs(60);
    // A read-only member: 32 connections (the default) are served, one more is refused.
    let mut p = peer(env, &r.reader, "caps", &d.socket, &["32", "/v1/healthz"]);
    let got = parsed(&p.line("the reader's answers", limit));
    assert_eq!(
        got["answers"],
        json!({"0": 32, TOO_MANY.to_string(): 1}),
        "{got}"
    );
    let msg = got["messages"][TOO_MANY.to_string()].as_str().unwrap_or("");
    assert!(
        msg.contains(&format!("too many connections for uid {}", r.reader.uid))
            && msg.contains("limit 32, api.max_connections_per_uid"),
        "{got}"
    );
    // Its connections closed, the uid is served again.
    let after = parsed(&p.line("the reader's next answer", limit));
    assert_eq!(after["after"]["code"], json!(0), "{after}");
    assert!(p.finish(limit).is_some());
    // No role: two connections (the default), each refused with 1000403 at once; a third 1000429.
    let mut p = peer(env, &r.other, "caps", &d.socket, &["2", "/v1/healthz"]);
    let got = parsed(&p.line("the stranger's answers", limit));
    assert_eq!(
        got["answers"],
        json!({"1000403": 2, TOO_MANY.to_string(): 1}),
        "{got}"
    );
    assert!(
        got["messages"][TOO_MANY.to_string()]
            .as_str()
            .is_some_and(|m| m.contains("api.max_connections_without_role")),
        "{got}"
    );
    assert!(p.finish(limit).is_some());
    // root on the main socket is not counted: 40 connections at once, all served.
    let held: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let threads: Vec<_> = held
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                s.write_all(b"GET /v1/healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                envelope_of(&got)["code"].clone()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), json!(0));
    }
}

#[test]
fn the_root_socket_is_private_and_serves_root() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, "");
    let root_sock = d.socket.with_file_name("agent-root.sock");
    let m = std::fs::symlink_metadata(&root_sock).expect("the root socket exists");
    assert!(m.file_type().is_socket());
    assert_eq!(m.mode() & 0o777, 0o600);
    assert_eq!(m.uid(), nix::unistd::getuid().as_raw());
    let (st, b) = http(&root_sock, "GET", "/v1/healthz", b"").unwrap();
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!((st, v["result"].clone()), (200, json!(true)), "{v}");
    assert_eq!(v["data"]["socket"], json!("root"), "{v}");
    assert_eq!(
        v["data"]["sockets"],
        json!({"main": d.socket.display().to_string(), "root": root_sock.display().to_string()})
    );
    // The CLI as root (or the agent's uid) uses it by itself; --socket wins.
    let (code, out, err) = root_cli(&d, &["--json", "health"], Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"socket\": \"root\""), "{out}");
    let (_, out, _) = d.cli(&["--json", "health"]);
    assert!(out.contains("\"socket\": \"main\""), "{out}");
    // Another uid is refused on it even when the file mode is opened up by hand.
    if is_root() && have("setpriv") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root_sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(
            d.socket.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let nobody = nix::unistd::User::from_name("nobody").ok().flatten();
        if let Some(n) = nobody {
            let u = User {
                name: n.name.clone(),
                uid: n.uid.as_raw(),
                gid: n.gid.as_raw(),
            };
            let cli = cli_copy(&env);
            let sock = root_sock.display().to_string();
            let (code, _, err) = run_as_within(
                &u,
                &cli,
                &["--socket", &sock, "health"],
                Duration::from_secs(60),
            )
            .unwrap();
            assert_eq!(code, 4, "{err}");
            assert!(
                err.contains("1000403") && err.contains("root socket"),
                "{err}"
            );
        }
    }
    // Removed when the agent stops; a stale one is replaced at start.
    d.terminate();
    assert!(!root_sock.exists());
    std::fs::create_dir_all(root_sock.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&root_sock).unwrap());
    let d = Daemon::start_with(&env, &d.config.clone());
    let (st, _) = http(&root_sock, "GET", "/v1/healthz", b"").unwrap();
    assert_eq!(st, 200);
    drop(d);
}

/// Write `head`, wait for the agent's answer to arrive, pause, then write `body`: the body
/// must still go through (the agent lingers), and the answer be readable.
fn answer_then_body(socket: &std::path::Path, head: &[u8], body: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.write_all(head).expect("write the headers");
    // The answer is there before the body was sent.
    {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
        assert_eq!(
            poll(&mut fds, PollTimeout::from(30_000u16)).expect("poll"),
            1,
            "an answer before the body"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(body)
        .unwrap_or_else(|e| panic!("the rest of the body after the answer: {e}"));
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("reading the answer: {e}"));
    got
}

#[test]
fn a_413_is_read_by_a_client_that_sends_its_body_after_the_headers() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "[api]\nmax_body_bytes = 4096\n");
    // Larger than the socket buffers: the client cannot finish unless the agent reads.
    let body = vec![b' '; 600_000];
    let head = format!(
        "POST /v1/procs HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let raw = answer_then_body(&d.socket, head.as_bytes(), &body);
    assert_eq!(status_of(&raw), 413, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(envelope_of(&raw)["code"], json!(1_000_413));
    assert!(healthy(&d));
}

#[test]
fn a_408_is_read_by_a_client_whose_body_stalled() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "[api]\nrequest_timeout = \"1s\"\n");
    let body = vec![b' '; 300_000];
    let head = format!(
        "POST /v1/procs HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{{",
        body.len() + 1
    );
    let raw = answer_then_body(&d.socket, head.as_bytes(), &body);
    assert_eq!(status_of(&raw), 408, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(envelope_of(&raw)["code"], json!(1_000_408));
    assert!(healthy(&d));
}

#[test]
fn a_refused_uid_reads_its_1000403_whatever_its_client() {
    let Some(s) = with_accounts("") else {
        return;
    };
    let (d, r, env) = (&s.d, &s.cast, &s.env);
    let limit = Duration::from_secs(60);
    let refused = |v: &Value, what: &str| {
        assert_eq!(v["envelope"]["code"], json!(1_000_403), "{what}: {v}");
        assert!(
            v["envelope"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("uid {}", r.other.uid))),
            "{what}: {v}"
        );
    };
    // A raw client: headers, a pause (the refusal is there), then a 1 MiB body.
    let mut p = peer(env, &r.other, "split", &d.socket, &["/v1/procs", "1048576"]);
    let v = parsed(&p.line("the split client", limit));
    assert_eq!(v["send_error"], Value::Null, "the body write failed: {v}");
    refused(&v, "split client");
    // Python's http.client, as requests and most operator scripts use it.
    for api in ["/v1/procs", "/v1/register_proc_info", "/v1/reload"] {
        let mut p = peer(env, &r.other, "httpclient", &d.socket, &[api, "1048576"]);
        let v = parsed(&p.line("http.client", limit));
        assert_eq!(v["error"], Value::Null, "{api}: {v}");
        assert_eq!(v["status"], json!(200), "{api}: {v}");
        refused(&v, api);
    }
    assert!(healthy(d));
}

#[test]
fn a_body_that_is_not_valid_utf8_json_is_refused_on_every_endpoint() {
    let env = TestEnv::new();
    let d = Daemon::start(&env, "");
    d.register("utf", "p", daemon_spec(&env, "utfp", json!({})));
    let host = r#"{"ip": "127.0.0.1", "bk_cloud_id": 0, "bk_supplier_id": 0}"#;
    // "BAD" stands for a string with the byte 0xff in it: invalid UTF-8.
    let bad = |text: &str| -> Vec<u8> {
        text.replace("BAD", "a\u{1}b")
            .into_bytes()
            .into_iter()
            .map(|c| if c == 1 { 0xff } else { c })
            .collect()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // An invalid byte inside a field the agent ignores ...
        (
            "/v1/get_proc_status",
            format!(r#"{{"bk_username": "BAD", "meta": {{"namespace": "utf", "name": "p"}}, "hosts": [{host}]}}"#),
        ),
        (
            "/v1/get_proc_status",
            format!(r#"{{"meta": {{"namespace": "utf", "name": "p", "unknown": "BAD"}}, "hosts": [{host}]}}"#),
        ),
        ("/v1/procs", r#"{"whatever": ["BAD"]}"#.to_string()),
        ("/v1/reload", r#"{"dry_run": true, "note": "BAD"}"#.to_string()),
        (
            "/v2/gsekit/api/process/process_status",
            r#"{"bk_biz_id": 1, "bk_username": "BAD"}"#.to_string(),
        ),
        (
            "/v1/operate_process",
            r#"{"bk_biz_id": 1, "bk_app_secret": "BAD", "process_infos": []}"#.to_string(),
        ),
        // ... and inside one it reads.
        (
            "/v1/get_proc_status",
            format!(r#"{{"meta": {{"namespace": "utf", "name": "BAD"}}, "hosts": [{host}]}}"#),
        ),
        (
            "/v1/register_proc_info",
            format!(r#"{{"meta": {{"namespace": "utf", "name": "BAD"}}, "hosts": [{host}], "spec": {{}}}}"#),
        ),
    ]
    .into_iter()
    .map(|(p, t)| (p, bad(&t)))
    .collect();
    for (path, body) in &cases {
        let v = d.call_raw(path, body);
        assert_eq!(
            (v["result"].clone(), v["code"].clone()),
            (json!(false), json!(1_000_400)),
            "{path} {}: {v}",
            String::from_utf8_lossy(body)
        );
        let at = body.iter().position(|b| *b == 0xff).unwrap();
        let msg = v["message"].as_str().unwrap_or("");
        assert!(
            msg.contains("not valid UTF-8") && msg.contains(&format!("offset {at}")),
            "{path}: {v}"
        );
    }
    // Anything after the JSON object is not JSON either.
    let v = d.call_raw("/v1/procs", br#"{"namespace": "utf"} trailing"#);
    assert_eq!(v["code"], json!(1_000_400), "{v}");
    assert!(v["message"].as_str().unwrap().contains("trailing"), "{v}");
    // Nothing was registered or changed, and the daemon is up.
    let procs = d.call("procs", &json!({"namespace": "utf"}));
    assert_eq!(
        procs["data"]["list"].as_array().map(Vec::len),
        Some(1),
        "{procs}"
    );
    assert!(healthy(&d));
}
