//! Crash safety: random operations on a dozen processes while the agent is `kill -9`'d at
//! random moments and restarted. After every restart:
//! * every definition whose registration (or removal) was answered with success is there (or
//!   gone), and every task whose id was handed out can be queried;
//! * every process the agent says is managed and expected running runs exactly once (one live
//!   process of its program, the one the agent reports), and no process ever runs twice;
//! * a bystander process and an unmanaged running process keep their pids.
//!
//! Bounded for CI (`PROCAGENT_CRASH_ROUNDS`, default 15); the long form by hand:
//! `PROCAGENT_CRASH_ROUNDS=500 cargo test --test crash_safety -- --nocapture`.
//! `PROCAGENT_CRASH_SEED` replays a run (the seed is printed at the start and on failure).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const NS: &str = "crash";
const KEYS: usize = 10;

/// xorshift64*: small, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Register,
    Update,
    Unregister,
    Operate(i64),
}

/// What the test knows for sure about one process (None: unknown, learn it from the agent).
#[derive(Debug, Clone, Default)]
struct Known {
    registered: Option<bool>,
    /// (flag, managed) as committed.
    intent: Option<(i64, bool)>,
}

/// The outcome of one API call made while the agent may die.
#[derive(Debug)]
enum Outcome {
    /// The per-key result (register/update/unregister), or the final result of a task.
    Done(Value),
    /// A task id was handed out, the final result was not seen.
    Task(String),
    /// No answer (the agent died), or an answer that is not a result.
    Lost,
}

fn name(i: usize) -> String {
    format!("c{i}")
}

fn spec(env: &TestEnv, i: usize, variant: u64) -> Value {
    let n = name(i);
    let pidfile = env.p(&format!("{n}.pid"));
    json!({
        "identity": {"proc_name": n, "setup_path": env.path().display().to_string(), "pid_path": pidfile, "user": ""},
        "control": {
            "start_cmd": env.daemon_start_cmd(&n, &pidfile),
            "stop_cmd": format!("kill $(cat {pidfile})"),
            "version_cmd": format!("echo {variant}"),
        },
        "monitor_policy": {"auto_type": 1, "start_check_secs": 0, "op_timeout": 10},
    })
}

fn post(sock: &Path, api: &str, body: &Value) -> Result<Value, String> {
    let (st, b) = http(
        sock,
        "POST",
        &format!("/v1/{api}"),
        body.to_string().as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    serde_json::from_slice(&b).map_err(|e| format!("status {st}: {e}"))
}

fn perform(sock: PathBuf, env_spec: Value, key: String, op: Op) -> Outcome {
    let meta = json!({"namespace": NS, "name": key});
    let host = Daemon::host();
    let rk = Daemon::key(NS, &key);
    let r = match op {
        Op::Register => post(
            &sock,
            "register_proc_info",
            &json!({"meta": meta, "hosts": [host], "spec": env_spec}),
        ),
        Op::Update => post(
            &sock,
            "update_proc_info",
            &json!({"meta": meta, "hosts": [host], "spec": env_spec}),
        ),
        Op::Unregister => post(
            &sock,
            "unregister_proc_info",
            &json!({"meta": meta, "hosts": [host]}),
        ),
        Op::Operate(t) => post(
            &sock,
            "operate_proc",
            &json!({"meta": meta, "op_type": t, "hosts": [host]}),
        ),
    };
    let v = match r {
        Ok(v) => v,
        Err(_) => return Outcome::Lost,
    };
    if v["result"] != json!(true) {
        return Outcome::Lost;
    }
    if let Op::Operate(_) = op {
        let task = v["data"]["task_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        loop {
            match post(
                &sock,
                "get_proc_operate_result",
                &json!({ "task_id": task }),
            ) {
                Ok(r)
                    if r["data"][&rk]["error_code"] != json!(115) && r["data"][&rk].is_object() =>
                {
                    return Outcome::Done(r["data"][&rk].clone());
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => return Outcome::Task(task),
            }
        }
    }
    Outcome::Done(v["data"][&rk].clone())
}

/// Live processes running program `name` of the test.
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

fn agent_view(d: &Daemon) -> BTreeMap<String, Value> {
    let r = d.call("procs", &json!({"namespace": NS}));
    assert_eq!(r["result"], json!(true), "{r}");
    r["data"]["list"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| (p["name"].as_str().expect("a name").to_string(), p.clone()))
        .collect()
}

const CONFIG: &str = "[supervisor]\nsweep_interval = \"100ms\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\n";

#[test]
fn random_operations_under_random_kill_9() {
    let rounds: usize = std::env::var("PROCAGENT_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let seed: u64 = std::env::var("PROCAGENT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("crash safety: {rounds} rounds, PROCAGENT_CRASH_SEED={seed}");
    let ctx = |round: usize, what: &str| format!("[seed {seed} round {round}] {what}");
    let mut rng = Rng(seed);
    let env = TestEnv::new();
    let mut d = Daemon::start(&env, CONFIG);

    // A bystander nobody registered, and an unmanaged process that keeps running.
    let by = env.program("bystander");
    let mut bystander = std::process::Command::new(&by)
        .arg("100000")
        .spawn()
        .unwrap();
    let bpid = bystander.id() as i32;
    d.register(NS, "u0", daemon_spec(&env, "u0", json!({})));
    assert_eq!(d.op(NS, "u0", 0)["error_code"], json!(0));
    assert_eq!(d.op(NS, "u0", 4)["error_code"], json!(0));
    let upid = read_pid(&env.p("u0.pid")).unwrap();

    let mut known: Vec<Known> = vec![
        Known {
            registered: Some(false),
            intent: None,
        };
        KEYS
    ];
    let mut tasks: Vec<String> = Vec::new();
    let ops = [
        Op::Register,
        Op::Update,
        Op::Unregister,
        Op::Operate(0),
        Op::Operate(0),
        Op::Operate(1),
        Op::Operate(3),
        Op::Operate(3),
        Op::Operate(4),
        Op::Operate(9),
        Op::Operate(2),
    ];
    for round in 0..rounds {
        // A few operations on distinct processes, at once.
        let n = 1 + rng.below(4) as usize;
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < n {
            let i = rng.below(KEYS as u64) as usize;
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
        let mut threads = Vec::new();
        for &i in &chosen {
            let op = ops[rng.below(ops.len() as u64) as usize];
            let s = spec(&env, i, rng.below(3));
            let sock = d.socket.clone();
            let key = name(i);
            threads.push((i, op, std::thread::spawn(move || perform(sock, s, key, op))));
        }
        // kill -9 at a random moment: often mid-operation, sometimes after.
        std::thread::sleep(Duration::from_millis(rng.below(600)));
        d.kill9();
        let mut lost_keys = Vec::new();
        for (i, op, t) in threads {
            let out = t.join().unwrap();
            let k = &mut known[i];
            match (&out, op) {
                (Outcome::Done(r), Op::Register) => match r["error_code"].as_i64() {
                    Some(0) => {
                        k.registered = Some(true);
                        k.intent = Some((0, false));
                    }
                    Some(850) => k.registered = Some(true),
                    _ => *k = Known::default(),
                },
                (Outcome::Done(r), Op::Update) => match r["error_code"].as_i64() {
                    Some(0) => {
                        if k.registered != Some(true) {
                            k.intent = None;
                        }
                        k.registered = Some(true);
                    }
                    _ => *k = Known::default(),
                },
                (Outcome::Done(r), Op::Unregister) => match r["error_code"].as_i64() {
                    Some(0) | Some(829) => {
                        k.registered = Some(false);
                        k.intent = None;
                    }
                    _ => *k = Known::default(),
                },
                (Outcome::Done(r), Op::Operate(t)) => {
                    let code = r["error_code"].as_i64().unwrap_or(-1);
                    match (t, code) {
                        (_, 851) => k.registered = Some(false),
                        (0, 0) | (3, 0) => k.intent = Some((1, true)),
                        (0, 828) | (2, _) => {}
                        (1, 0) | (1, 829) | (9, 0) | (9, 829) => k.intent = Some((2, false)),
                        (4, 0) => k.intent = k.intent.map(|(f, _)| (f, false)),
                        _ => k.intent = None,
                    }
                }
                (Outcome::Task(id), _) => {
                    tasks.push(id.clone());
                    k.intent = None;
                    lost_keys.push(i);
                }
                (Outcome::Lost, _) => {
                    *k = Known::default();
                    lost_keys.push(i);
                }
            }
        }
        // Restart and check.
        d = Daemon::start(&env, CONFIG);
        let view = agent_view(&d);
        for (i, k) in known.iter_mut().enumerate() {
            let n = name(i);
            let present = view.contains_key(&n);
            if let Some(want) = k.registered {
                assert_eq!(
                    present,
                    want,
                    "{}",
                    ctx(round, &format!("{n} registered should be {want}: {view:?}"))
                );
            }
            k.registered = Some(present);
            if !present {
                k.intent = None;
                continue;
            }
            let p = &view[&n];
            let flag = p["flag"].as_i64().unwrap();
            let managed = p["managed"].as_bool().unwrap();
            if let Some((f, m)) = k.intent {
                // flag 0 (never set) reads as 2.
                let f = if f == 0 { 2 } else { f };
                assert_eq!(
                    (flag, managed),
                    (f, m),
                    "{}",
                    ctx(round, &format!("{n} committed intent lost: {p}"))
                );
            }
            k.intent = Some((flag, managed));
        }
        for t in &tasks {
            let r = d.call("get_proc_operate_result", &json!({ "task_id": t }));
            assert_eq!(
                r["result"],
                json!(true),
                "{}",
                ctx(round, &format!("task {t} lost: {r}"))
            );
        }
        // Exactly once: managed and expected running → one live process, the agent's.
        for (i, k) in known.iter().enumerate() {
            let n = name(i);
            let runs = running_program(&env, &n);
            assert!(
                runs.len() <= 1,
                "{}\nevents: {:#?}",
                ctx(round, &format!("{n} runs {} times: {runs:?}", runs.len())),
                d.events(&format!("{NS}/{n}"))
                    .iter()
                    .map(|e| format!("{} {} {}", e["kind"], e["message"], e["data"]))
                    .collect::<Vec<_>>()
            );
            if k.intent == Some((1, true)) {
                wait_for(
                    &ctx(round, &format!("{n} running exactly once")),
                    Duration::from_secs(30),
                    || {
                        let runs = running_program(&env, &n);
                        assert!(
                            runs.len() <= 1,
                            "{}",
                            ctx(round, &format!("{n} runs twice: {runs:?}"))
                        );
                        let st = d.status(NS, &n);
                        (runs.len() == 1 && st["pid"] == json!(runs[0])).then_some(())
                    },
                );
            }
        }
        // Nothing unmanaged was touched.
        assert!(alive(bpid), "{}", ctx(round, "the bystander was killed"));
        assert!(
            alive(upid),
            "{}",
            ctx(round, "the unmanaged process was killed")
        );
        let st = d.status(NS, "u0");
        assert_eq!(
            (st["pid"].clone(), st["isauto"].clone()),
            (json!(upid), json!(false)),
            "{}",
            ctx(round, &format!("u0: {st}"))
        );
        assert_eq!(running_program(&env, "u0"), vec![upid]);
        // A child that exited this instant is a zombie until the reaper's next pass: only
        // one that stays unreaped is a leak.
        let zombies_left = (0..100).all(|_| {
            let z = zombies_of(d.pid());
            if !z.is_empty() {
                std::thread::sleep(Duration::from_millis(50));
            }
            !z.is_empty()
        });
        assert!(
            !zombies_left,
            "{}",
            ctx(
                round,
                &format!("zombies under the agent for 5 s: {:?}", zombies_of(d.pid()))
            )
        );
        if round % 5 == 4 || round + 1 == rounds {
            eprintln!("crash safety: round {} ok", round + 1);
        }
    }
    // One more: let every operation finish, then a clean restart keeps everything.
    let before = agent_view(&d);
    d.kill9();
    let d = Daemon::start(&env, CONFIG);
    let after = agent_view(&d);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "[seed {seed}] definitions after a quiet kill -9"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}
