//! The server's limits: body size, header size and time, request time, connections at once.
//! Slow or half-open clients must not block anyone else.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

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
