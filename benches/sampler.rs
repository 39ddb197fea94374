//! One sampling pass over N idle processes (default 1000), the daemon's own code path
//! (`procagent::probe::Sampler::pass`): prints min / median / p95 / max over many passes.
//! In the same run it times a reference pass with the `procfs` crate's own calls
//! (`Process::new` + `stat()` + `io()` + `fd_count()` per process), so the figure can be
//! compared on a machine whose load varies (ours is shared).
//!
//! `cargo bench --bench sampler` (release). Environment: `PROCAGENT_BENCH_N` (processes,
//! default 1000), `PROCAGENT_BENCH_PASSES` (default 200). Every process it starts is a child
//! `sleep`, killed and reaped by pid before it exits.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use procagent::probe::{HostFigures, Sampler, Target};
use procagent::spec::ProcKey;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let n = env_usize("PROCAGENT_BENCH_N", 1000);
    let passes = env_usize("PROCAGENT_BENCH_PASSES", 200).max(1);
    let mut kids = Children(Vec::with_capacity(n));
    for _ in 0..n {
        let c = Command::new("sleep")
            .arg("100000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        kids.0.push(c);
    }
    let mut targets = Vec::with_capacity(n);
    for (i, c) in kids.0.iter().enumerate() {
        let pid = c.id() as i32;
        let st = procagent::procinfo::read_stat(pid).expect("stat of a fresh child");
        targets.push(Target {
            key: ProcKey::new("bench", format!("p{i}")),
            instances: vec![(pid, st.starttime)],
            cgroups: Vec::new(),
            limited: false,
        });
    }
    let mut sampler = Sampler::new(HostFigures::read());
    // Warm up: the first pass has no previous cpu readings.
    let (_, read) = sampler.pass(&targets, Instant::now(), 0);
    assert_eq!(read, n, "every process must be readable");
    let mut times = Vec::with_capacity(passes);
    for _ in 0..passes {
        let t0 = Instant::now();
        let (samples, read) = sampler.pass(&targets, Instant::now(), 0);
        times.push(t0.elapsed());
        assert_eq!(read, n);
        std::hint::black_box(samples);
    }
    times.sort();
    println!(
        "sampler_pass processes={n} passes={passes} min_ms={:.3} median_ms={:.3} p95_ms={:.3} max_ms={:.3} per_process_us={:.2}",
        ms(times[0]),
        ms(pct(&times, 0.5)),
        ms(pct(&times, 0.95)),
        ms(times[times.len() - 1]),
        ms(pct(&times, 0.5)) * 1000.0 / n.max(1) as f64,
    );
    // Reference: the procfs crate, the same figures minus sockets, interleaved in time with
    // ours so both see the same load.
    let mut reference = Vec::with_capacity(passes);
    let mut ours = Vec::with_capacity(passes);
    for _ in 0..passes {
        let t0 = Instant::now();
        for t in &targets {
            let pid = t.instances[0].0;
            if let Ok(p) = procfs::process::Process::new(pid) {
                std::hint::black_box((p.stat().ok(), p.io().ok(), p.fd_count().ok()));
            }
        }
        reference.push(t0.elapsed());
        let t0 = Instant::now();
        std::hint::black_box(sampler.pass(&targets, Instant::now(), 0));
        ours.push(t0.elapsed());
    }
    reference.sort();
    ours.sort();
    println!(
        "interleaved processes={n} passes={passes} ours_median_ms={:.3} procfs_reference_median_ms={:.3} ratio={:.2}",
        ms(pct(&ours, 0.5)),
        ms(pct(&reference, 0.5)),
        ms(pct(&ours, 0.5)) / ms(pct(&reference, 0.5)).max(1e-9),
    );
}
