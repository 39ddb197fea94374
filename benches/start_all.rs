//! Start-all: the time from just before procagentd is started with N processes declared in
//! its config (managed, `start_check_secs = 1`) until the last of them has run its first
//! instruction, with containment off and (as root, where cgroup v2 is writable) on, in one
//! run. The difference is what placing N processes in cgroups of their own costs at start.
//!
//! Run: `bash bench/start_all.sh` or `cargo bench --bench start_all` (env START_N, default
//! 1000; ROUNDS, default 3, alternating off and on).
//!
//! The measured program is this binary run as `marker OUT`: the first thing its `main` does
//! is write the wall-clock time to OUT.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{cleanup, contained_root, now_ns, remove_tree};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("marker") {
        let t = now_ns();
        let _ = std::fs::write(&args[2], format!("{t}\n"));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if args.iter().any(|a| a == "--list") {
        println!("start_all: bench");
        return;
    }
    let n: usize = env_num("START_N", 1000);
    let rounds: usize = env_num("ROUNDS", 3);
    let me = std::env::current_exe().expect("own path");
    let dir = std::env::temp_dir().join(format!("pa-startall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tempdir");
    let r = run(&me, &dir, n, rounds);
    cleanup(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = r {
        eprintln!("start_all failed: {e}");
        std::process::exit(1);
    }
}

fn env_num(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(d)
}

fn run(me: &Path, dir: &Path, n: usize, rounds: usize) -> Result<(), String> {
    println!("start-all of {n} config-declared processes (agent start -> last first instruction)");
    let mut modes: Vec<(&str, Option<PathBuf>)> = vec![("off", None)];
    match contained_root(dir) {
        Ok(root) => modes.push(("on", Some(root))),
        Err(why) => println!("containment: not measured ({why})"),
    }
    let mut results: Vec<(String, Vec<f64>)> = modes
        .iter()
        .map(|(m, _)| (m.to_string(), Vec::new()))
        .collect();
    for round in 0..rounds {
        for (i, (mode, root)) in modes.iter().enumerate() {
            let secs = once(me, &dir.join(format!("{mode}-{round}")), n, root.as_deref())?;
            println!("  round {round}, containment {mode}: {secs:.3} s");
            results[i].1.push(secs);
        }
    }
    println!("| containment | n | runs | min s | median s | max s |");
    println!("|---|---|---|---|---|---|");
    for (mode, mut v) in results {
        v.sort_by(f64::total_cmp);
        println!(
            "| {mode} | {n} | {} | {:.3} | {:.3} | {:.3} |",
            v.len(),
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
    for (_, root) in &modes {
        if let Some(r) = root {
            remove_tree(r);
        }
    }
    Ok(())
}

fn once(me: &Path, dir: &Path, n: usize, root: Option<&Path>) -> Result<f64, String> {
    let stamps = dir.join("stamps");
    std::fs::create_dir_all(&stamps).map_err(|e| e.to_string())?;
    let mut cfg = format!(
        "[agent]\nsocket = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"warn\"\n[host]\nip = \"127.0.0.1\"\n[supervisor]\ncgroup_root = \"{}\"\n",
        dir.join("agent.sock").display(),
        dir.join("state").display(),
        root.map(|r| r.display().to_string()).unwrap_or_default()
    );
    for i in 0..n {
        cfg.push_str(&format!(
            "[[process]]\nnamespace = \"bench\"\nname = \"p{i}\"\nsetup_path = \"/tmp\"\nproc_name = \"start_all\"\nstart_cmd = \"exec {} marker {}/p{i}\"\nstart_check_secs = 1\n",
            me.display(),
            stamps.display()
        ));
    }
    let cfg_path = dir.join("agent.toml");
    std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
    let t0 = now_ns();
    let agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_procagentd"))
            .arg("--config")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    let end = Instant::now() + Duration::from_secs(300);
    let last = loop {
        let mut seen = 0;
        let mut last = 0u128;
        for e in std::fs::read_dir(&stamps)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            if let Some(t) = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|s| s.trim().parse::<u128>().ok())
            {
                seen += 1;
                last = last.max(t);
            }
        }
        if seen >= n {
            break last;
        }
        if Instant::now() > end {
            return Err(format!("only {seen} of {n} started within 300 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(agent);
    cleanup(dir);
    if let Some(r) = root {
        // The next round starts from an empty subtree.
        let procs = r.join("procs");
        wait_empty(&procs);
        remove_tree(&procs);
    }
    Ok(last.saturating_sub(t0) as f64 / 1e9)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_empty(d: &Path) {
    let end = Instant::now() + Duration::from_secs(30);
    while procagent::cgroup::populated(d) == Some(true) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}
