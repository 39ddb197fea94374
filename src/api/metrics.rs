//! `GET /metrics`: the latest samples and the agent's own figures as OpenMetrics text (which
//! Prometheus scrapes natively), encoded by `prometheus-client`.
//!
//! Served on the API socket (authorized like every read) and, when `[metrics] listen` is
//! set, on that loopback TCP address, where only `/metrics` exists and anyone on the host
//! may read it (loopback only, enforced by the config loader).
//!
//! Every scrape encodes a fresh registry from the registry's latest samples (a process that
//! was unregistered disappears at once); nothing here reads `/proc` of managed processes.
//! Per-process series carry the labels `namespace` and `name`:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `procagent_process_up` | gauge | 1 when at least one instance runs |
//! | `procagent_process_managed` | gauge | 1 when the agent keeps it running (托管) |
//! | `procagent_process_restarts_total` | counter | restarts by supervision |
//! | `procagent_process_limit_stops_total` | counter | stops for exceeding cpu_lmt/mem_lmt |
//! | `procagent_process_consecutive_failures` | gauge | failures in a row (0 after a healthy run) |
//! | `procagent_process_backoff` | gauge | 1 while waiting to restart after a failure |
//! | `procagent_process_fatal` | gauge | 1 when given up after `max_restarts` failures |
//! | `procagent_process_restart_delay_seconds` | gauge | delay before the latest or scheduled restart |
//! | `procagent_process_next_restart_timestamp_seconds` | gauge | when the next attempt comes (in backoff only) |
//! | `procagent_process_next_run_timestamp_seconds` | gauge | a periodic job's next run (while waiting between runs) |
//! | `procagent_process_last_exit_timestamp_seconds` | gauge | when it last exited (once known) |
//! | `procagent_process_last_exit_code` | gauge | its code, or 128 + the signal; -1 unknown |
//! | `procagent_process_cpu_usage_percent` | gauge | percent of one core (sum over instances) |
//! | `procagent_process_memory_usage_percent` | gauge | RSS as percent of MemTotal |
//! | `procagent_process_resident_memory_bytes` | gauge | RSS |
//! | `procagent_process_open_fds` | gauge | open descriptors |
//! | `procagent_process_disk_io_bytes_total` | counter | read_bytes + write_bytes since start |
//! | `procagent_process_net_sent_bytes_total` | counter | TCP bytes sent by the trees |
//! | `procagent_process_net_received_bytes_total` | counter | TCP bytes received by the trees |
//! | `procagent_process_net_sockets` | gauge | TCP + UDP sockets the trees hold |
//!
//! The resource series exist only for processes with a current sample (running ones).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

use super::{AppState, auth};
use crate::supervisor::Engine;

/// The media type of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type FGauge = Family<Labels, Gauge<f64, AtomicU64>>;
type FCounter = Family<Labels, Counter<u64>>;

fn unit(s: &str) -> Unit {
    Unit::Other(s.to_string())
}

/// The restart series of every process: a crash loop shows as one.
fn register_restarts(reg: &mut Registry, views: &[crate::supervisor::view::ProcView]) {
    let failures = FGauge::default();
    let backoff = FGauge::default();
    let fatal = FGauge::default();
    let delay = FGauge::default();
    let next = FGauge::default();
    let next_run = FGauge::default();
    let last_exit = FGauge::default();
    let last_code = FGauge::default();
    let now_ms = crate::util::unix_millis() as f64;
    for v in views {
        let l: Labels = vec![
            ("namespace".into(), v.def.key.namespace.clone()),
            ("name".into(), v.def.key.name.clone()),
        ];
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        failures.get_or_create(&l).set(f64::from(v.failures));
        backoff.get_or_create(&l).set(flag(v.state == "backoff"));
        fatal.get_or_create(&l).set(flag(v.state == "fatal"));
        delay.get_or_create(&l).set(v.restart_delay);
        if let Some(s) = v.next_restart_in.filter(|_| v.managed) {
            next.get_or_create(&l).set((now_ms + s * 1000.0) / 1000.0);
        }
        if let Some(s) = v.next_run_in.filter(|_| v.managed) {
            next_run
                .get_or_create(&l)
                .set((now_ms + s * 1000.0) / 1000.0);
        }
        if let Some(x) = &v.last_exit {
            last_exit.get_or_create(&l).set(x.at as f64);
            // As a shell reports it: the code, or 128 + the signal; unknown is -1.
            let code = match x.exit {
                crate::sys::ExitInfo::Code(c) => c,
                crate::sys::ExitInfo::Signal(s) => 128 + s,
                crate::sys::ExitInfo::Unknown => -1,
            };
            last_code.get_or_create(&l).set(f64::from(code));
        }
    }
    reg.register(
        "process_consecutive_failures",
        "Failures in a row (failed start checks, liveness and limit stops); 0 after a healthy run",
        failures,
    );
    reg.register(
        "process_backoff",
        "1 while the process waits to be restarted after a failure",
        backoff,
    );
    reg.register(
        "process_fatal",
        "1 when the process was given up after max_restarts failures in a row",
        fatal,
    );
    reg.register_with_unit(
        "process_restart_delay",
        "Delay before the latest restart attempt, or the scheduled one in backoff; 0 after a healthy run",
        Unit::Seconds,
        delay,
    );
    reg.register_with_unit(
        "process_next_restart_timestamp",
        "Unix time of the next restart attempt, while in backoff",
        Unit::Seconds,
        next,
    );
    reg.register_with_unit(
        "process_next_run_timestamp",
        "Unix time of a periodic job's next run, while it waits between runs",
        Unit::Seconds,
        next_run,
    );
    reg.register_with_unit(
        "process_last_exit_timestamp",
        "Unix time of the process's last exit",
        Unit::Seconds,
        last_exit,
    );
    reg.register(
        "process_last_exit_code",
        "The last exit: its code, or 128 + the signal that killed it; -1 when unknown",
        last_code,
    );
}

/// Encode the current figures.
pub fn render(engine: &Engine) -> String {
    let mut reg = Registry::with_prefix("procagent");

    let up = FGauge::default();
    let managed = FGauge::default();
    let restarts = FCounter::default();
    let limit_stops = FCounter::default();
    let cpu = FGauge::default();
    let mem = FGauge::default();
    let rss = FGauge::default();
    let fds = FGauge::default();
    let disk = FCounter::default();
    let net_sent = FCounter::default();
    let net_received = FCounter::default();
    let net_sockets = FGauge::default();
    let procs = FGauge::default();
    let pressure = FGauge::default();
    let (mut n_reg, mut n_managed, mut n_running) = (0i64, 0i64, 0i64);
    let views = engine.views();
    {
        for v in &views {
            let l: Labels = vec![
                ("namespace".into(), v.def.key.namespace.clone()),
                ("name".into(), v.def.key.name.clone()),
            ];
            let running = !v.instances.is_empty();
            n_reg += 1;
            n_managed += i64::from(v.managed);
            n_running += i64::from(running);
            up.get_or_create(&l).set(if running { 1.0 } else { 0.0 });
            managed
                .get_or_create(&l)
                .set(if v.managed { 1.0 } else { 0.0 });
            restarts.get_or_create(&l).inc_by(v.restarts);
            limit_stops.get_or_create(&l).inc_by(v.limit_stops);
            if let Some(s) = &v.sample {
                cpu.get_or_create(&l).set(s.cpu_usage);
                mem.get_or_create(&l).set(s.mem_usage);
                rss.get_or_create(&l).set(s.rss_bytes as f64);
                fds.get_or_create(&l).set(s.fd as f64);
                disk.get_or_create(&l).inc_by(s.disk.max(0) as u64);
                net_sent.get_or_create(&l).inc_by(s.net_sent_bytes);
                net_received.get_or_create(&l).inc_by(s.net_received_bytes);
                net_sockets.get_or_create(&l).set(s.net_sockets as f64);
                procs.get_or_create(&l).set(s.pids as f64);
                for (resource, v) in [
                    ("cpu", s.psi_cpu),
                    ("memory", s.psi_memory),
                    ("io", s.psi_io),
                ] {
                    if let Some(v) = v {
                        let mut lr = l.clone();
                        lr.push(("resource".into(), resource.into()));
                        pressure.get_or_create(&lr).set(v);
                    }
                }
            }
        }
    }
    reg.register(
        "process_up",
        "1 when at least one instance of the process is running",
        up,
    );
    reg.register(
        "process_managed",
        "1 when the agent keeps the process running (managed)",
        managed,
    );
    reg.register(
        "process_restarts",
        "Restarts of the process by supervision",
        restarts,
    );
    reg.register(
        "process_limit_stops",
        "Stops of the process for staying over cpu_lmt or mem_lmt",
        limit_stops,
    );
    reg.register_with_unit(
        "process_cpu_usage",
        "CPU used, percent of one core, summed over instances",
        unit("percent"),
        cpu,
    );
    reg.register_with_unit(
        "process_memory_usage",
        "Resident memory, percent of MemTotal, summed over instances",
        unit("percent"),
        mem,
    );
    reg.register_with_unit(
        "process_resident_memory",
        "Resident memory (RSS), summed over instances",
        Unit::Bytes,
        rss,
    );
    reg.register(
        "process_processes",
        "Processes the figures cover: the instances, or with containment every process of their cgroups",
        procs,
    );
    reg.register(
        "process_pressure_some_avg10",
        "Pressure stall (PSI) of the instances' cgroups: percent of the last 10 s some task waited for the resource",
        pressure,
    );
    reg.register(
        "process_open_fds",
        "Open file descriptors, summed over instances",
        fds,
    );
    reg.register_with_unit(
        "process_disk_io",
        "Bytes read from and written to storage since the instances started (/proc/PID/io read_bytes + write_bytes)",
        Unit::Bytes,
        disk,
    );
    reg.register_with_unit(
        "process_net_sent",
        "TCP bytes sent (acknowledged by the peers) by the instances' process trees since they started (sock_diag tcp_info bytes_acked)",
        Unit::Bytes,
        net_sent,
    );
    reg.register_with_unit(
        "process_net_received",
        "TCP bytes received by the instances' process trees since they started (sock_diag tcp_info bytes_received)",
        Unit::Bytes,
        net_received,
    );
    reg.register(
        "process_net_sockets",
        "TCP and UDP sockets (IPv4 and IPv6, listening ones included) the instances' process trees hold",
        net_sockets,
    );

    register_restarts(&mut reg, &views);

    let g = |v: f64| {
        let x = Gauge::<f64, AtomicU64>::default();
        x.set(v);
        x
    };
    reg.register(
        "registered_processes",
        "Process definitions the agent holds",
        g(n_reg as f64),
    );
    reg.register(
        "managed_processes",
        "Processes the agent keeps running (managed)",
        g(n_managed as f64),
    );
    reg.register(
        "running_processes",
        "Processes with at least one running instance",
        g(n_running as f64),
    );
    // Containment as labels of a constant 1 (the "info" idiom): mode, subtree, controllers.
    let containment = FGauge::default();
    let (mode, root, controllers) = match &engine.cgroups {
        crate::cgroup::Mode::Off { .. } => ("off", String::new(), String::new()),
        crate::cgroup::Mode::On(t) => ("on", t.root.display().to_string(), t.enabled.join(" ")),
    };
    containment
        .get_or_create(&vec![
            ("mode".into(), mode.into()),
            ("root".into(), root),
            ("controllers".into(), controllers),
        ])
        .set(1.0);
    reg.register(
        "containment",
        "Containment (cgroups): mode on or off, the agent's cgroup subtree and the controllers enabled for its processes; always 1",
        containment,
    );
    reg.register_with_unit(
        "sample_duration",
        "Duration of each sampling pass over all tracked instances",
        Unit::Seconds,
        engine.counters.sample_seconds.clone(),
    );
    let pass = engine.counters.pass_stats();
    reg.register_with_unit(
        "sample_last_duration",
        "Duration of the latest sampling pass",
        Unit::Seconds,
        g(pass.last_duration.as_secs_f64()),
    );
    reg.register(
        "sampled_instances",
        "Instances read by the latest sampling pass",
        g(pass.last_processes as f64),
    );
    let api = Family::<Labels, Counter<u64>>::default();
    for (name, n) in engine.counters.api_requests() {
        api.get_or_create(&vec![("api".to_string(), name)])
            .inc_by(n);
    }
    reg.register("api_requests", "API requests by endpoint", api);

    // The agent's own process: one stat read and one fstat, not a /proc scan.
    let me = std::process::id() as i32;
    if let Some(st) = crate::procinfo::read_stat(me) {
        let tck = crate::procinfo::ticks_per_second() as f64;
        let c = Counter::<f64, AtomicU64>::default();
        c.inc_by(st.utime.saturating_add(st.stime) as f64 / tck);
        reg.register_with_unit(
            "agent_cpu",
            "CPU time used by procagentd (user + system)",
            Unit::Seconds,
            c,
        );
        reg.register_with_unit(
            "agent_resident_memory",
            "Resident memory of procagentd",
            Unit::Bytes,
            g((st.rss_pages.saturating_mul(crate::procinfo::page_size())) as f64),
        );
    }
    if let Ok(n) = procfs::process::Process::myself().and_then(|p| p.fd_count()) {
        reg.register(
            "agent_open_fds",
            "Open descriptors of procagentd",
            g(n as f64),
        );
    }
    reg.register_with_unit(
        "agent_uptime",
        "Time since procagentd started",
        Unit::Seconds,
        g(engine.started.elapsed().as_secs_f64()),
    );

    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

fn answer(engine: &Engine) -> Response {
    engine.counters.api_request("metrics");
    ([("content-type", CONTENT_TYPE)], render(engine)).into_response()
}

/// `GET /metrics` (and `/v1/metrics`) on the socket: a read, authorized like the others.
pub async fn on_socket(State(st): State<AppState>, req: Request) -> Response {
    if let Err(e) = auth::access_of(&req) {
        return e.into_response();
    }
    answer(&st.engine)
}

async fn on_tcp(State(st): State<AppState>) -> Response {
    answer(&st.engine)
}

/// Serve `GET /metrics` alone on a loopback TCP listener until shutdown.
pub async fn serve_tcp(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(on_tcp))
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                "only /metrics is served here\n",
            )
        })
        .with_state(AppState { engine });
    let sd = async move {
        let _ = shutdown.changed().await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(sd).await {
        tracing::error!(error = %e, "metrics listener failed");
    }
}
