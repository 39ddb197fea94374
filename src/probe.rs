//! Metrics: the agent's own counters (API requests by endpoint).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Counters the API and the supervisor bump.
#[derive(Debug, Default)]
pub struct Counters {
    api: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Count one API request (unknown endpoints are counted as "other" so a client cannot
    /// grow the map without bound).
    pub fn api_request(&self, api: &str) {
        let name = if api.len() <= 64 && api.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            api
        } else {
            "other"
        };
        let mut m = self.api.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < 256 || m.contains_key(name) {
            *m.entry(name.to_string()).or_default() += 1;
        } else {
            *m.entry("other".to_string()).or_default() += 1;
        }
    }

    /// A copy of the API request counts.
    pub fn api_requests(&self) -> BTreeMap<String, u64> {
        self.api.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

// ---------------------------------------------------------------------------------------
// Sampling

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::registry::Sample;
use crate::spec::ProcKey;
use crate::supervisor::Engine;

/// Host-wide figures the sampler needs (from sysinfo, read once at start: total memory and
/// the number of logical CPUs do not change while we run).
#[derive(Debug, Clone, Copy)]
pub struct HostFigures {
    pub mem_total_bytes: u64,
    pub cpus: usize,
}

impl HostFigures {
    pub fn read() -> HostFigures {
        let fallback_cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        match sysinfo::System::new() {
            Ok(mut sys) => {
                sys.refresh_memory();
                sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
                let cpus = if sys.cpus().is_empty() {
                    fallback_cpus
                } else {
                    sys.cpus().len()
                };
                HostFigures {
                    mem_total_bytes: sys.total_memory().max(1),
                    cpus,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "sysinfo unavailable; reading MemTotal from /proc/meminfo");
                let total = <procfs::Meminfo as procfs::Current>::current()
                    .map(|m| m.mem_total)
                    .unwrap_or(1);
                HostFigures {
                    mem_total_bytes: total.max(1),
                    cpus: fallback_cpus,
                }
            }
        }
    }
}

/// The raw counters of one process at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Raw {
    pub cpu_ticks: u64,
    pub rss_bytes: u64,
    pub fds: u64,
    pub io_bytes: u64,
}

/// Read the counters of `pid` if it still has start time `starttime`.
pub fn read_raw(pid: i32, starttime: u64) -> Option<Raw> {
    let p = procfs::process::Process::new(pid).ok()?;
    let st = p.stat().ok()?;
    if st.starttime != starttime {
        return None;
    }
    let fds = p.fd_count().map(|n| n as u64).unwrap_or(0);
    let io = p.io().map(|io| io.read_bytes + io.write_bytes).unwrap_or(0);
    Some(Raw {
        cpu_ticks: st.utime + st.stime,
        rss_bytes: st.rss * crate::procinfo::page_size(),
        fds,
        io_bytes: io,
    })
}

/// Percent of one core used between two readings `dt` apart.
pub fn cpu_percent(
    prev_ticks: u64,
    now_ticks: u64,
    dt: std::time::Duration,
    ticks_per_sec: u64,
    cpus: usize,
) -> f64 {
    let secs = dt.as_secs_f64();
    if secs <= 0.0 || now_ticks < prev_ticks {
        return 0.0;
    }
    let used = (now_ticks - prev_ticks) as f64 / ticks_per_sec.max(1) as f64;
    (used / secs * 100.0).clamp(0.0, 100.0 * cpus as f64)
}

/// Previous readings, keyed by (pid, start time) so a reused pid never mixes.
pub type Prev = HashMap<(i32, u64), (u64, Instant)>;

/// One sampling pass over every tracked instance; results go into each entry's runtime.
pub fn sample_once(engine: &Engine, prev: &mut Prev, host: HostFigures) -> usize {
    let targets: Vec<(ProcKey, Vec<(i32, u64)>)> = engine
        .reg()
        .entries
        .values()
        .filter(|e| !e.state.instances.is_empty())
        .map(|e| {
            (
                e.def.key.clone(),
                e.state
                    .instances
                    .iter()
                    .map(|i| (i.pid, i.starttime))
                    .collect(),
            )
        })
        .collect();
    let tck = crate::procinfo::ticks_per_second();
    let now = Instant::now();
    let now_unix = crate::util::unix_now();
    let mut seen: HashMap<(i32, u64), (u64, Instant)> = HashMap::with_capacity(prev.len());
    let mut results: Vec<(ProcKey, Sample)> = Vec::with_capacity(targets.len());
    let mut n = 0;
    for (key, insts) in targets {
        let mut s = Sample {
            at: now_unix,
            ..Sample::default()
        };
        for (pid, start) in insts {
            let Some(raw) = read_raw(pid, start) else {
                continue;
            };
            n += 1;
            if let Some((pt, pi)) = prev.get(&(pid, start)) {
                s.cpu_usage +=
                    cpu_percent(*pt, raw.cpu_ticks, now.duration_since(*pi), tck, host.cpus);
            }
            seen.insert((pid, start), (raw.cpu_ticks, now));
            s.rss_bytes += raw.rss_bytes;
            s.fd += raw.fds as i64;
            s.disk += raw.io_bytes as i64;
        }
        s.mem_usage = s.rss_bytes as f64 / host.mem_total_bytes as f64 * 100.0;
        s.cpu_usage = (s.cpu_usage * 100.0).round() / 100.0;
        s.mem_usage = (s.mem_usage * 100.0).round() / 100.0;
        results.push((key, s));
    }
    *prev = seen;
    let mut reg = engine.reg();
    for (key, s) in results {
        if let Some(e) = reg.get_mut(&key) {
            e.rt.sample = Some(s);
        }
    }
    n
}

/// The sampler task: one pass every `metrics.sample_interval` until shutdown.
pub async fn run_sampler(engine: Arc<Engine>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let host = HostFigures::read();
    let mut prev = Prev::new();
    let mut tick = tokio::time::interval(engine.config.metrics.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        let e = engine.clone();
        let p = std::mem::take(&mut prev);
        // /proc reads are blocking file I/O: keep them off the async workers.
        match tokio::task::spawn_blocking(move || {
            let mut p = p;
            sample_once(&e, &mut p, host);
            p
        })
        .await
        {
            Ok(p) => prev = p,
            Err(e) => tracing::error!(error = %e, "sampling pass failed"),
        }
    }
}
