//! The agent's TOML configuration: loading, defaults and validation.
//!
//! Every key is documented, with its default, in `agent.toml.example`. Loading is strict: an
//! unknown key or a bad value anywhere (main file or `conf.d/*.toml`) is an error, and every
//! error is collected and reported together as `FILE: section.key: message`, so an operator
//! fixes a config in one pass (a misspelled key is answered with the key meant). Relative
//! paths are the file's: the main file's resolve against its directory, a `conf_dir` file's
//! against the `conf_dir`; they are stored absolute.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::spec::{
    AutoType, Definition, FieldError, Labels, ProcKey, ProcSpec, Rule, Source, SpecPatch,
};

/// How exits of managed processes are noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectMode {
    /// pidfd when the kernel has it, polling otherwise.
    Auto,
    /// pidfd only (start fails when unavailable).
    Pidfd,
    /// Poll /proc every `poll_interval`.
    Poll,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the daemon's own log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// journald when stderr is connected to the journal (`$JOURNAL_STREAM`, as systemd sets
    /// it for a service) and the journal socket exists; stderr otherwise.
    Auto,
    /// journald (stderr when the journal socket is missing).
    Journald,
    /// stderr, in `log_format`.
    Stderr,
}

/// Host identity used to decide whether a request's `hosts` entry is this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// `auto` picks the address of the default route at start.
    pub ip: String,
    pub bk_cloud_id: i64,
    pub bk_supplier_id: i64,
    /// GSE 2.0 agent id (empty: only the `"{bk_cloud_id}:{ip}"` form names this host).
    pub agent_id: String,
}

/// Supervision tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorConfig {
    pub exit_detection: DetectMode,
    /// Poll period in `poll` mode (and the pid-file discovery sweep).
    pub poll_interval: Duration,
    /// Period of the reaper sweep and of the supervisor's housekeeping tick.
    pub sweep_interval: Duration,
    /// Delay after the first failure in a row (a failed start check, a limit or liveness
    /// stop); a restart after a healthy run never waits.
    pub backoff_initial: Duration,
    /// Cap of the restart backoff.
    pub backoff_max: Duration,
    /// A process that stayed up this long has its failure count reset (a healthy run's death
    /// resets it anyway; this matters for the stops the agent causes).
    pub backoff_reset: Duration,
    /// Random spread applied to each backoff delay, as a fraction (0.1 = ±10 %).
    pub backoff_jitter: f64,
    /// Operations run at once (API items and restarts).
    pub max_parallel_ops: usize,
    /// How often a `health_cmd` runs.
    pub health_interval: Duration,
    /// Failed health checks in a row that count as a liveness failure.
    pub health_failures: u32,
    /// Umask of spawned commands.
    pub umask: u32,
    /// Containment ([`crate::cgroup::detect`]): `"auto"`, a cgroup v2 directory, or `""`
    /// (off).
    pub cgroup_root: String,
    /// Containment with the memory controller: `memory.max` is this percent above
    /// `memory.high` (the definition's `mem_lmt`), the backstop while stop_cmd runs.
    pub memory_max_margin: f64,
    /// Containment with the cpu controller: what `cpu_lmt` does.
    pub cpu_limit: CpuLimit,
}

/// What a process over its `cpu_lmt` gets (`[supervisor] cpu_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuLimit {
    /// GSE's semantics (the default): stopped with its stop command and restarted if managed.
    Stop,
    /// Throttled by `cpu.max` at its limit and left running (needs the cpu controller;
    /// without it, `Stop`).
    Throttle,
}

/// Socket API limits and roles.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    /// Connections served at once on the main socket (more wait in the listen backlog).
    pub max_connections: usize,
    /// Connections one uid may hold at once on the main socket when it has a role (root
    /// and the agent's own uid are not counted); more are answered 1000429 and closed.
    pub max_connections_per_uid: usize,
    /// The same, for a uid without any role (its requests are refused with 1000403).
    pub max_connections_without_role: usize,
    /// Live follow streams (`events?follow=1`, `logs?follow=1`) one uid may hold at once
    /// (root and the agent's own uid are not counted); more are answered 1000429.
    pub max_streams_per_uid: usize,
    /// A second socket (0600, the agent's uid) that only root and the agent's own uid may
    /// use, so no other uid can fill the connections root needs. Default: next to
    /// `agent.socket`, see [`root_socket_for`].
    pub root_socket: PathBuf,
    /// Connections served at once on the root socket.
    pub root_max_connections: usize,
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    /// Members may do everything (register/update limited to their own account).
    pub admin_group: Option<String>,
    /// Members may only read.
    pub readonly_group: Option<String>,
    /// Group that owns the socket (so the admin/read-only groups can connect).
    pub socket_group: Option<String>,
}

/// Sampling and limit enforcement (`[metrics]`).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// `sample_interval` (default "3s", 100ms..1h): how often the sampler reads cpu, memory,
    /// fds, disk and sockets of every running instance. Status queries and `/metrics` report
    /// the latest sample; cpu_usage is averaged over this interval.
    pub sample_interval: Duration,
    /// `limit_samples` (default 3, 1..1000): consecutive samples over `cpu_lmt` / `mem_lmt`
    /// before the agent stops the process (so the reaction time is about
    /// `limit_samples × sample_interval`).
    pub limit_samples: u32,
    /// `listen` (default unset): a loopback TCP address ("127.0.0.1:9464") also serving
    /// `GET /metrics`, and nothing else, without authentication. Non-loopback is refused.
    pub listen: Option<SocketAddr>,
}

/// History retention.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub task_retention: Duration,
    pub max_tasks: u64,
    pub max_events: u64,
    /// Bytes of a command's output kept in a task result.
    pub max_output_bytes: usize,
    /// `output_file_bytes` (default 8 MiB, 64 KiB..1 GiB): the size at which a process's
    /// captured output file is rotated; no file is ever larger.
    pub output_file_bytes: u64,
    /// `output_files` (default 4, 2..1000): files kept per process, the current one
    /// included, so a process's captured output never takes more than
    /// `output_file_bytes × output_files` on disk.
    pub output_files: u32,
    /// `reserve_bytes` (default 1 MiB, 0 or 64 KiB..256 MiB; 0 disables it): space kept in
    /// `state_dir/reserve` so that stop, kill and unmanage can still commit their intent
    /// when the state directory is full. Output capture also stops while less than twice
    /// this is free.
    pub reserve_bytes: u64,
}

/// A process declared in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessConfig {
    pub definition: Definition,
    /// Start and manage it the first time the agent sees it (later, the operator's last
    /// intent, stored durably, wins).
    pub autostart: bool,
}

/// The whole resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub file: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub log_target: LogTarget,
    pub conf_dir: Option<PathBuf>,
    pub watch_conf_dir: bool,
    pub host: HostConfig,
    pub supervisor: SupervisorConfig,
    pub api: ApiConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
    /// The `[[process]]` tables. The daemon takes them out when it applies them at start
    /// (the registry holds them from then on): the engine's copy of the config has none.
    pub processes: Vec<ProcessConfig>,
    /// How relative paths of `[[process]]` tables were resolved, one line each (what
    /// `procagentd --check` prints beside "ok").
    pub notes: Vec<String>,
}

/// Every error found in a config, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

type Errs = RefCell<Vec<String>>;

/// A TOML table being read: tracks which keys were consumed so the rest are reported unknown.
struct Section<'a> {
    file: &'a str,
    prefix: String,
    table: &'a toml::Table,
    seen: HashSet<String>,
    errs: &'a Errs,
}

impl<'a> Section<'a> {
    fn new(file: &'a str, prefix: &str, table: &'a toml::Table, errs: &'a Errs) -> Section<'a> {
        Section {
            file,
            prefix: prefix.to_string(),
            table,
            seen: HashSet::new(),
            errs,
        }
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.prefix, key)
        }
    }

    fn err(&self, key: &str, msg: impl AsRef<str>) {
        self.errs.borrow_mut().push(format!(
            "{}: {}: {}",
            self.file,
            self.path(key),
            msg.as_ref()
        ));
    }

    fn get(&mut self, key: &str) -> Option<&'a toml::Value> {
        self.seen.insert(key.to_string());
        self.table.get(key)
    }

    fn string(&mut self, key: &str, default: &str) -> String {
        self.opt_string(key).unwrap_or_else(|| default.to_string())
    }

    fn opt_string(&mut self, key: &str) -> Option<String> {
        match self.get(key) {
            None => None,
            Some(toml::Value::String(s)) => {
                if s.contains('\0') {
                    self.err(key, "must not contain NUL bytes");
                    None
                } else {
                    Some(s.clone())
                }
            }
            Some(v) => {
                self.err(key, format!("expected a string, got {}", v.type_str()));
                None
            }
        }
    }

    fn int(&mut self, key: &str, default: i64, min: i64, max: i64) -> i64 {
        match self.opt_integer(key) {
            None => default,
            Some(i) if (min..=max).contains(&i) => i,
            Some(i) => {
                self.err(key, format!("{i} is out of range {min}..={max}"));
                default
            }
        }
    }

    /// An integer of any value (its range is checked by whoever uses it).
    fn opt_integer(&mut self, key: &str) -> Option<i64> {
        match self.get(key)? {
            toml::Value::Integer(i) => Some(*i),
            v => {
                self.err(key, format!("expected an integer, got {}", v.type_str()));
                None
            }
        }
    }

    /// A number (float or integer) of any value (its range is checked by whoever uses it).
    fn opt_number(&mut self, key: &str) -> Option<f64> {
        match self.get(key)? {
            toml::Value::Float(f) => Some(*f),
            toml::Value::Integer(i) => Some(*i as f64),
            v => {
                self.err(key, format!("expected a number, got {}", v.type_str()));
                None
            }
        }
    }

    fn float(&mut self, key: &str, default: f64, min: f64, max: f64) -> f64 {
        let Some(v) = self.opt_number(key) else {
            return default;
        };
        if v.is_nan() || v < min || v > max {
            self.err(key, format!("{v} is out of range {min}..={max}"));
            return default;
        }
        v
    }

    fn boolean(&mut self, key: &str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(toml::Value::Boolean(b)) => *b,
            Some(v) => {
                self.err(key, format!("expected true or false, got {}", v.type_str()));
                default
            }
        }
    }

    /// A duration: a string such as "500ms", "2s", "1m", or an integer number of seconds.
    fn duration(&mut self, key: &str, default: Duration, min: Duration, max: Duration) -> Duration {
        let d = match self.get(key) {
            None => return default,
            Some(toml::Value::Integer(i)) if *i >= 0 => Duration::from_secs(*i as u64),
            Some(toml::Value::String(s)) => match humantime::parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.err(
                        key,
                        format!(
                            "{s:?} is not a duration ({e}); use e.g. \"500ms\", \"5s\", \"1m\""
                        ),
                    );
                    return default;
                }
            },
            Some(v) => {
                self.err(
                    key,
                    format!(
                        "expected a duration string or seconds, got {}",
                        v.type_str()
                    ),
                );
                return default;
            }
        };
        if d < min || d > max {
            self.err(
                key,
                format!(
                    "{} is out of range {}..={}",
                    humantime::format_duration(d),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
            return default;
        }
        d
    }

    fn table(&mut self, key: &str) -> Option<&'a toml::Table> {
        match self.get(key) {
            None => None,
            Some(toml::Value::Table(t)) => Some(t),
            Some(v) => {
                self.err(key, format!("expected a table, got {}", v.type_str()));
                None
            }
        }
    }

    fn finish(self) {
        let mut unknown: Vec<&String> = self
            .table
            .keys()
            .filter(|k| !self.seen.contains(*k))
            .collect();
        unknown.sort();
        for k in unknown {
            match self.nearest_key(k) {
                Some(near) => self.err(k, format!("unknown key; did you mean {near}?")),
                None => self.err(k, "unknown key"),
            }
        }
    }

    /// The known key of this section closest to a misspelled one (within a third of its
    /// length, at least 2 edits), if any. Every known key was asked for before `finish`.
    fn nearest_key(&self, unknown: &str) -> Option<&str> {
        let limit = (unknown.chars().count() / 3).max(2);
        self.seen
            .iter()
            .filter(|k| !self.table.contains_key(k.as_str()))
            .map(|k| (crate::util::edit_distance(unknown, k), k.as_str()))
            .filter(|(d, _)| *d <= limit)
            .min()
            .map(|(_, k)| k)
    }
}

fn absolutize(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The default root socket of a main socket: `<dir>/<name>-root.sock` next to it
/// (`/run/procagent/procagent.sock` → `/run/procagent/procagent-root.sock`).
pub fn root_socket_for(socket: &Path) -> PathBuf {
    let name = socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".sock").unwrap_or(&name);
    socket.with_file_name(format!("{stem}-root.sock"))
}

fn secs(d: Duration) -> Duration {
    d
}

/// Load and validate a config file (and its `conf_dir`). Relative paths are the file's: those
/// in the main file resolve against its directory, those in a `conf_dir` file against the
/// `conf_dir`, whatever directory the agent or the CLI was started in.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let cwd = std::env::current_dir()
        .map_err(|e| ConfigErrors(vec![format!("cannot read the current directory: {e}")]))?;
    let file = absolutize(&cwd, &path.to_string_lossy());
    let base = file.parent().unwrap_or(Path::new("/")).to_path_buf();
    load_with_base(&file, &base)
}

/// Load a config with the main file's relative paths resolved against `base` (the file
/// itself, when relative, too).
pub fn load_with_base(path: &Path, base: &Path) -> Result<Config, ConfigErrors> {
    let file = absolutize(base, &path.to_string_lossy());
    let fname = file.display().to_string();
    let text = std::fs::read_to_string(&file)
        .map_err(|e| ConfigErrors(vec![format!("{fname}: cannot read: {e}")]))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigErrors(vec![format!("{fname}: {}", e.to_string().trim())])
    })?;
    let errs: Errs = RefCell::new(Vec::new());
    let mut root = Section::new(&fname, "", &table, &errs);

    let empty = toml::Table::new();
    let agent_t = root.table("agent").unwrap_or(&empty);
    let mut agent = Section::new(&fname, "agent", agent_t, &errs);
    let socket = absolutize(
        base,
        &agent.string("socket", "/run/procagent/procagent.sock"),
    );
    let state_dir = absolutize(base, &agent.string("state_dir", "/var/lib/procagent"));
    let log_level = agent.string("log_level", "info");
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        agent.err(
            "log_level",
            format!("{log_level:?} is not a level or filter (error, warn, info, debug, trace)"),
        );
    }
    let log_format = match agent.string("log_format", "text").as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            agent.err(
                "log_format",
                format!("{other:?} must be \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };
    let log_target = match agent.string("log_target", "auto").as_str() {
        "auto" => LogTarget::Auto,
        "journald" => LogTarget::Journald,
        "stderr" => LogTarget::Stderr,
        other => {
            agent.err(
                "log_target",
                format!("{other:?} must be \"auto\", \"journald\" or \"stderr\""),
            );
            LogTarget::Auto
        }
    };
    let conf_dir = agent
        .opt_string("conf_dir")
        .filter(|s| !s.is_empty())
        .map(|s| absolutize(base, &s));
    let watch_conf_dir = agent.boolean("watch_conf_dir", false);
    agent.finish();

    let host_t = root.table("host").unwrap_or(&empty);
    let mut h = Section::new(&fname, "host", host_t, &errs);
    let ip = h.string("ip", "auto");
    if ip != "auto" && ip.parse::<std::net::IpAddr>().is_err() {
        h.err(
            "ip",
            format!("{ip:?} is neither \"auto\" nor an IP address"),
        );
    }
    let host = HostConfig {
        ip,
        bk_cloud_id: h.int("bk_cloud_id", 0, 0, i64::from(i32::MAX)),
        bk_supplier_id: h.int("bk_supplier_id", 0, 0, i64::from(i32::MAX)),
        agent_id: h.string("agent_id", ""),
    };
    h.finish();

    let sup_t = root.table("supervisor").unwrap_or(&empty);
    let mut s = Section::new(&fname, "supervisor", sup_t, &errs);
    let exit_detection = match s.string("exit_detection", "auto").as_str() {
        "auto" => DetectMode::Auto,
        "pidfd" => DetectMode::Pidfd,
        "poll" => DetectMode::Poll,
        other => {
            s.err(
                "exit_detection",
                format!("{other:?} must be \"auto\", \"pidfd\" or \"poll\""),
            );
            DetectMode::Auto
        }
    };
    let ms = Duration::from_millis;
    let supervisor = SupervisorConfig {
        exit_detection,
        poll_interval: s.duration(
            "poll_interval",
            ms(200),
            ms(10),
            secs(Duration::from_secs(60)),
        ),
        sweep_interval: s.duration("sweep_interval", ms(1000), ms(50), Duration::from_secs(60)),
        backoff_initial: s.duration(
            "backoff_initial",
            Duration::from_secs(1),
            ms(10),
            Duration::from_secs(3600),
        ),
        backoff_max: s.duration(
            "backoff_max",
            Duration::from_secs(60),
            ms(10),
            Duration::from_secs(86_400),
        ),
        backoff_reset: s.duration(
            "backoff_reset",
            Duration::from_secs(30),
            ms(0),
            Duration::from_secs(86_400),
        ),
        backoff_jitter: s.float("backoff_jitter", 0.1, 0.0, 0.5),
        max_parallel_ops: s.int("max_parallel_ops", 64, 1, 4096) as usize,
        health_interval: s.duration(
            "health_interval",
            Duration::from_secs(10),
            ms(100),
            Duration::from_secs(86_400),
        ),
        health_failures: s.int("health_failures", 3, 1, 1000) as u32,
        umask: s.int("umask", 0o022, 0, 0o777) as u32,
        cgroup_root: s.string("cgroup_root", "auto"),
        memory_max_margin: s.float("memory_max_margin", 10.0, 0.0, 1000.0),
        cpu_limit: match s.string("cpu_limit", "stop").as_str() {
            "stop" => CpuLimit::Stop,
            "throttle" => CpuLimit::Throttle,
            other => {
                s.err(
                    "cpu_limit",
                    format!("{other:?} must be \"stop\" or \"throttle\""),
                );
                CpuLimit::Stop
            }
        },
    };
    if supervisor.backoff_max < supervisor.backoff_initial {
        s.err("backoff_max", "must not be smaller than backoff_initial");
    }
    s.finish();

    let api_t = root.table("api").unwrap_or(&empty);
    let mut a = Section::new(&fname, "api", api_t, &errs);
    let api = ApiConfig {
        max_body_bytes: a.int("max_body_bytes", 4 << 20, 1024, 256 << 20) as usize,
        max_connections: a.int("max_connections", 256, 1, 65_536) as usize,
        max_connections_per_uid: a.int("max_connections_per_uid", 32, 1, 65_536) as usize,
        max_connections_without_role: a.int("max_connections_without_role", 2, 1, 1024) as usize,
        max_streams_per_uid: a.int("max_streams_per_uid", 8, 1, 65_536) as usize,
        root_socket: match a.opt_string("root_socket").filter(|s| !s.is_empty()) {
            Some(p) => absolutize(base, &p),
            None => root_socket_for(&socket),
        },
        root_max_connections: a.int("root_max_connections", 64, 1, 65_536) as usize,
        request_timeout: a.duration(
            "request_timeout",
            Duration::from_secs(30),
            ms(100),
            Duration::from_secs(3600),
        ),
        header_timeout: a.duration(
            "header_timeout",
            Duration::from_secs(5),
            ms(100),
            Duration::from_secs(600),
        ),
        admin_group: a.opt_string("admin_group").filter(|s| !s.is_empty()),
        readonly_group: a.opt_string("readonly_group").filter(|s| !s.is_empty()),
        socket_group: a.opt_string("socket_group").filter(|s| !s.is_empty()),
    };
    if api.root_socket == socket {
        a.err("root_socket", "must not be the same path as agent.socket");
    }
    a.finish();

    let m_t = root.table("metrics").unwrap_or(&empty);
    let mut m = Section::new(&fname, "metrics", m_t, &errs);
    let listen = match m.opt_string("listen").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(_) => {
                m.err(
                    "listen",
                    format!("{s:?} is not a loopback address; /metrics is only served on loopback"),
                );
                None
            }
            Err(_) => {
                m.err(
                    "listen",
                    format!("{s:?} is not an address such as \"127.0.0.1:9464\""),
                );
                None
            }
        },
    };
    let metrics = MetricsConfig {
        sample_interval: m.duration(
            "sample_interval",
            Duration::from_secs(3),
            ms(100),
            Duration::from_secs(3600),
        ),
        limit_samples: m.int("limit_samples", 3, 1, 1000) as u32,
        listen,
    };
    m.finish();

    let st_t = root.table("store").unwrap_or(&empty);
    let mut st = Section::new(&fname, "store", st_t, &errs);
    let store = StoreConfig {
        task_retention: st.duration(
            "task_retention",
            Duration::from_secs(7 * 86_400),
            Duration::from_secs(60),
            Duration::from_secs(3650 * 86_400),
        ),
        max_tasks: st.int("max_tasks", 100_000, 10, 10_000_000) as u64,
        max_events: st.int("max_events", 50_000, 10, 10_000_000) as u64,
        max_output_bytes: st.int("max_output_bytes", 16 * 1024, 256, 1 << 20) as usize,
        output_file_bytes: st.int("output_file_bytes", 8 << 20, 64 << 10, 1 << 30) as u64,
        output_files: st.int("output_files", 4, 2, 1000) as u32,
        reserve_bytes: st.int("reserve_bytes", 1 << 20, 0, 256 << 20) as u64,
    };
    if (1..64 << 10).contains(&store.reserve_bytes) {
        st.err("reserve_bytes", "must be 0 (no reserve) or at least 65536");
    }
    st.finish();

    let mut found = Found::default();
    read_processes(&mut root, &fname, base, &errs, &mut found);
    root.finish();

    if let Some(dir) = &conf_dir {
        read_conf_dir(dir, &errs, &mut found);
    }
    check_duplicates(&found.declared, &errs);
    let Found {
        processes, notes, ..
    } = found;

    let errs = errs.into_inner();
    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    Ok(Config {
        file,
        socket,
        state_dir,
        log_level,
        log_format,
        log_target,
        conf_dir,
        watch_conf_dir,
        host,
        supervisor,
        api,
        metrics,
        store,
        processes,
        notes,
    })
}

/// The `*.toml` files of `conf_dir`, in name order; their relative paths resolve against
/// `conf_dir` itself.
fn read_conf_dir(dir: &Path, errs: &Errs, out: &mut Found) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            errs.borrow_mut()
                .push(format!("{}: cannot read directory: {e}", dir.display()));
            return;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    for f in files {
        let fname = f.display().to_string();
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                errs.borrow_mut().push(format!("{fname}: cannot read: {e}"));
                continue;
            }
        };
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let e: toml::de::Error = e;
                errs.borrow_mut()
                    .push(format!("{fname}: {}", e.to_string().trim()));
                continue;
            }
        };
        let mut root = Section::new(&fname, "", &table, errs);
        read_processes(&mut root, &fname, dir, errs, out);
        root.finish();
    }
}

fn check_duplicates(declared: &[(ProcKey, String)], errs: &Errs) {
    let mut seen: BTreeMap<&ProcKey, &str> = BTreeMap::new();
    for (key, file) in declared {
        if let Some(prev_file) = seen.insert(key, file) {
            errs.borrow_mut().push(format!(
                "{file}: process {key}: already declared in {prev_file}"
            ));
        }
    }
}

/// One `[[process]]` table read as the loader reads it (the same keys, checks and defaults;
/// errors as `FILE: key: message`), its relative paths resolved against `base`: what
/// `procagent add` sends.
pub fn process_from_table(
    fname: &str,
    table: &toml::Table,
    base: &Path,
) -> Result<ProcessConfig, ConfigErrors> {
    let errs: Errs = RefCell::new(Vec::new());
    let mut notes = Vec::new();
    let p = read_process(fname, "", table, base, &errs, &mut notes);
    let errs = errs.into_inner();
    match p {
        Some(p) if errs.is_empty() => Ok(p),
        _ => Err(ConfigErrors(errs)),
    }
}

/// What `procagentd --check` warns about without failing: a `setup_path` that is not a
/// directory on this host (yet; a deployment may create it later), each with its file.
/// Blocking (stats every `setup_path`): for the check, never on the agent's runtime.
pub fn path_warnings(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for p in &cfg.processes {
        let d = &p.definition;
        let file = match &d.source {
            Source::Config { file } => file.as_str(),
            Source::Api => "",
        };
        match std::fs::metadata(&d.spec.setup_path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => out.push(format!(
                "{file}: process {}: setup_path {} is not a directory",
                d.key, d.spec.setup_path
            )),
            Err(e) => out.push(format!(
                "{file}: process {}: setup_path {}: {e} (its commands cannot start until it exists)",
                d.key, d.spec.setup_path
            )),
        }
    }
    out
}

/// What the `[[process]]` tables of every file held.
#[derive(Default)]
struct Found {
    /// The valid ones.
    processes: Vec<ProcessConfig>,
    /// Every key declared, valid or not, with its file: a duplicate is reported in the same
    /// pass as the other errors of either table.
    declared: Vec<(ProcKey, String)>,
    /// How relative paths were resolved.
    notes: Vec<String>,
}

fn read_processes(root: &mut Section<'_>, fname: &str, base: &Path, errs: &Errs, out: &mut Found) {
    let list = match root.get("process") {
        None => return,
        Some(toml::Value::Array(a)) => a,
        Some(_) => {
            root.err("process", "expected [[process]] tables");
            return;
        }
    };
    for (i, v) in list.iter().enumerate() {
        let prefix = format!("process[{i}]");
        let Some(t) = v.as_table() else {
            errs.borrow_mut()
                .push(format!("{fname}: {prefix}: expected a table"));
            continue;
        };
        let text = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let (ns, name) = (text("namespace"), text("name"));
        if !name.is_empty() {
            out.declared
                .push((ProcKey::new(ns, name), fname.to_string()));
        }
        if let Some(p) = read_process(fname, &prefix, t, base, errs, &mut out.notes) {
            out.processes.push(p);
        }
    }
}

fn read_process(
    fname: &str,
    prefix: &str,
    t: &toml::Table,
    base: &Path,
    errs: &Errs,
    notes: &mut Vec<String>,
) -> Option<ProcessConfig> {
    let before = errs.borrow().len();
    let mut s = Section::new(fname, prefix, t, errs);
    let namespace = s.string("namespace", "");
    let name = s.string("name", "");
    let prefix_named = if name.is_empty() || prefix.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix} ({namespace}/{name})")
    };
    s.prefix = prefix_named;
    let key = ProcKey::new(namespace, name);
    for e in crate::spec::validate_key(&key) {
        s.err(e.field.trim_start_matches("meta."), e.message);
    }
    let labels: Labels = match s.table("labels") {
        None => Labels::new(),
        Some(lt) => {
            let mut m = Labels::new();
            for (k, v) in lt {
                match toml_to_json(v) {
                    Some(j) => {
                        m.insert(k.clone(), j);
                    }
                    None => s.err(
                        &format!("labels.{k}"),
                        "label values must be strings, numbers or booleans",
                    ),
                }
            }
            for e in crate::spec::validate_labels(&m) {
                s.err(e.field.trim_start_matches("meta."), e.message);
            }
            m
        }
    };
    let mut path_field = |s: &mut Section<'_>, key: &str| -> String {
        match s.opt_string(key) {
            Some(p) if !p.is_empty() => {
                let abs = absolutize(base, &p).display().to_string();
                if !Path::new(&p).is_absolute() {
                    notes.push(format!(
                        "{fname}: {}: {key} {p:?} is relative: it resolves to {abs}",
                        s.prefix
                    ));
                }
                abs
            }
            _ => String::new(),
        }
    };
    let setup_path = path_field(&mut s, "setup_path");
    let pid_path = path_field(&mut s, "pid_path");
    let config_path = path_field(&mut s, "config_path");
    let log_path = path_field(&mut s, "log_path");
    let account = match (s.opt_string("account"), s.opt_string("user")) {
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => String::new(),
        (Some(a), Some(_)) => {
            s.err("user", "give either account or user, not both");
            a
        }
    };
    let auto_type = match s.get("auto_type") {
        None => None,
        Some(toml::Value::Integer(i)) => Some(*i),
        Some(toml::Value::String(v)) => match v.as_str() {
            "periodic" => Some(AutoType::Periodic.code()),
            "resident" => Some(AutoType::Resident.code()),
            "single" | "single-run" | "oneshot" => Some(AutoType::SingleRun.code()),
            other => {
                s.err(
                    "auto_type",
                    format!("{other:?} must be \"resident\", \"periodic\" or \"single-run\""),
                );
                None
            }
        },
        Some(v) => {
            s.err(
                "auto_type",
                format!("expected an integer or a name, got {}", v.type_str()),
            );
            None
        }
    };
    let env = s.table("env").map(|et| {
        let mut m = BTreeMap::new();
        for (k, v) in et {
            match v.as_str() {
                Some(v) => {
                    m.insert(k.clone(), v.to_string());
                }
                None => s.err(&format!("env.{k}"), "environment values must be strings"),
            }
        }
        m
    });
    // Only names and TOML types are read here; every check and default is
    // `SpecPatch::apply`'s.
    let patch = SpecPatch {
        setup_path: Some(setup_path),
        proc_name: s.opt_string("proc_name"),
        pid_path: Some(pid_path),
        config_path: Some(config_path),
        log_path: Some(log_path),
        account: Some(account),
        contact: s.opt_string("contact"),
        func_id: s.opt_string("func_id"),
        instance_id: s.opt_string("instance_id"),
        value_key: s.opt_string("value_key"),
        start_cmd: s.opt_string("start_cmd"),
        stop_cmd: s.opt_string("stop_cmd"),
        restart_cmd: s.opt_string("restart_cmd"),
        reload_cmd: s.opt_string("reload_cmd"),
        kill_cmd: s.opt_string("kill_cmd"),
        version_cmd: s.opt_string("version_cmd"),
        health_cmd: s.opt_string("health_cmd"),
        cmd_shell_ext: s.opt_string("cmd_shell_ext"),
        cpu_lmt: s.opt_number("cpu_lmt"),
        mem_lmt: s.opt_number("mem_lmt"),
        auto_type,
        start_check_secs: s.opt_integer("start_check_secs"),
        start_check_begin_time: s.opt_integer("start_check_begin_time"),
        start_check_end_time: s.opt_integer("start_check_end_time"),
        stop_check_secs: s.opt_integer("stop_check_secs"),
        op_timeout: s.opt_integer("op_timeout"),
        cycle_time: s.opt_integer("cycle_time"),
        instance_num: s.opt_integer("instance_num"),
        start_retries: s.opt_integer("start_retries"),
        start_interval: s.opt_integer("start_interval"),
        max_restarts: s.opt_integer("max_restarts"),
        env,
    };
    let spec = match patch.apply(&ProcSpec::default()) {
        Ok(spec) => spec,
        Err(list) => {
            for e in list {
                s.err(&e.field, config_message(&e));
            }
            ProcSpec::default()
        }
    };
    let autostart = s.boolean("autostart", true);
    s.finish();
    if errs.borrow().len() > before {
        return None;
    }
    let now = crate::util::unix_now();
    Some(ProcessConfig {
        definition: Definition {
            key,
            labels,
            spec,
            source: Source::Config {
                file: fname.to_string(),
            },
            register_time: now,
            updated_time: now,
        },
        autostart,
    })
}

/// A spec error as the config loader phrases it (`0 is out of range 1..=86400`).
fn config_message(e: &FieldError) -> String {
    match &e.rule {
        Rule::Range { got, min, max } => format!("{got} is out of range {min}..={max}"),
        Rule::AutoTypeCode(i) => {
            format!("{i} must be 0 (periodic), 1 (resident) or 2 (single-run)")
        }
        Rule::Other => e.message.clone(),
    }
}

fn toml_to_json(v: &toml::Value) -> Option<serde_json::Value> {
    match v {
        toml::Value::String(s) => Some(serde_json::Value::String(s.clone())),
        toml::Value::Integer(i) => Some(serde_json::Value::from(*i)),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map(serde_json::Value::Number),
        toml::Value::Boolean(b) => Some(serde_json::Value::Bool(*b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, text).unwrap();
        load_with_base(&f, dir.path())
    }

    #[test]
    fn defaults() {
        let c = load_text("").unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/procagent/procagent.sock"));
        assert_eq!(c.host.ip, "auto");
        assert_eq!(c.supervisor.backoff_initial, Duration::from_secs(1));
        assert_eq!(c.supervisor.backoff_max, Duration::from_secs(60));
        assert_eq!(c.api.max_body_bytes, 4 << 20);
        assert_eq!(
            c.api.root_socket,
            PathBuf::from("/run/procagent/procagent-root.sock")
        );
        assert_eq!(
            (
                c.store.output_file_bytes,
                c.store.output_files,
                c.store.reserve_bytes
            ),
            (8 << 20, 4, 1 << 20)
        );
        assert!(c.processes.is_empty());
    }

    #[test]
    fn the_root_socket_sits_next_to_the_main_one_unless_set() {
        assert_eq!(
            root_socket_for(Path::new("/run/x/agent.sock")),
            PathBuf::from("/run/x/agent-root.sock")
        );
        assert_eq!(
            root_socket_for(Path::new("/run/x/agent")),
            PathBuf::from("/run/x/agent-root.sock")
        );
        let c = load_text("[agent]\nsocket = \"/run/a/main.sock\"\n").unwrap();
        assert_eq!(c.api.root_socket, PathBuf::from("/run/a/main-root.sock"));
        let c = load_text("[api]\nroot_socket = \"/run/b/r.sock\"\n").unwrap();
        assert_eq!(c.api.root_socket, PathBuf::from("/run/b/r.sock"));
        let err =
            load_text("[agent]\nsocket = \"/run/a.sock\"\n[api]\nroot_socket = \"/run/a.sock\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("api.root_socket"), "{err}");
    }

    #[test]
    fn output_rotation_and_reserve_are_checked() {
        let c =
            load_text("[store]\noutput_file_bytes = 65536\noutput_files = 2\nreserve_bytes = 0\n")
                .unwrap();
        assert_eq!(
            (
                c.store.output_file_bytes,
                c.store.output_files,
                c.store.reserve_bytes
            ),
            (65536, 2, 0)
        );
        let err =
            load_text("[store]\noutput_file_bytes = 100\noutput_files = 1\nreserve_bytes = 1000\n")
                .unwrap_err()
                .to_string();
        for key in [
            "store.output_file_bytes",
            "store.output_files",
            "store.reserve_bytes",
        ] {
            assert!(err.contains(key), "{key} in {err}");
        }
    }

    #[test]
    fn every_error_is_listed_with_file_and_key() {
        let err = load_text(
            r#"
[agent]
socket = 5
bogus = 1
log_format = "xml"
[host]
ip = "not-an-ip"
[supervisor]
backoff_initial = "soon"
[[process]]
namespace = "demo"
name = "a"
proc_name = "a"
setup_path = "/tmp"
op_timeout = 0
colour = "red"
"#,
        )
        .unwrap_err();
        let all = err.0.join("\n");
        for needle in [
            "agent.socket: expected a string",
            "agent.bogus: unknown key",
            "agent.log_format",
            "host.ip",
            "supervisor.backoff_initial",
            "op_timeout",
            "colour: unknown key",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(
            err.0.iter().all(|l| l.contains("agent.toml")),
            "file named: {all}"
        );
        assert!(err.0.len() >= 7);
    }

    #[test]
    fn process_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(
            &f,
            r#"
[agent]
state_dir = "state"
[[process]]
namespace = "demo"
name = "web"
labels = { app = "web", tier = 2 }
setup_path = "app"
proc_name = "web"
pid_path = "run/web.pid"
start_cmd = "./web"
auto_type = "resident"
max_restarts = 7
"#,
        )
        .unwrap();
        let c = load_with_base(&f, dir.path()).unwrap();
        assert_eq!(c.state_dir, dir.path().join("state"));
        let p = &c.processes[0];
        assert_eq!(p.definition.spec.max_restarts, Some(7));
        assert_eq!(p.definition.key, ProcKey::new("demo", "web"));
        assert_eq!(
            p.definition.spec.setup_path,
            dir.path().join("app").display().to_string()
        );
        assert_eq!(p.definition.labels["tier"], serde_json::json!(2));
        assert!(p.autostart);
    }

    #[test]
    fn conf_dir_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            dir.path().join("conf.d/a.toml"),
            "[[process]]\nnamespace='n'\nname='x'\nproc_name='x'\nsetup_path='/tmp'\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("conf.d/b.toml"),
            "[[process]]\nnamespace='n'\nname='x'\nproc_name='x'\nsetup_path='/tmp'\n",
        )
        .unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, "[agent]\nconf_dir = 'conf.d'\n").unwrap();
        let err = load_with_base(&f, dir.path()).unwrap_err();
        assert!(
            err.0.iter().any(|e| e.contains("already declared")),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("conf.d/b.toml")).unwrap();
        let c = load_with_base(&f, dir.path()).unwrap();
        assert_eq!(c.processes.len(), 1);
    }

    /// One pass finds every error: a duplicate of a process that has errors of its own, and
    /// a misspelled key is answered with the key meant.
    #[test]
    fn one_pass_finds_duplicates_of_invalid_processes_and_suggests_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            dir.path().join("conf.d/a.toml"),
            "[[process]]\nnamespace='n'\nname='x'\nproc_name='x'\nsetup_path='/tmp'\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("conf.d/b.toml"),
            "[[process]]\nnamespace='n'\nname='x'\nproc_name='x'\nsetup_path='/tmp'\nop_timeout=0\nstat_cmd='./run'\n",
        )
        .unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, "[agent]\nconf_dir = 'conf.d'\nsockt = 'x.sock'\n").unwrap();
        let err = load(&f).unwrap_err();
        let all = err.0.join("\n");
        for needle in [
            "b.toml: process n/x: already declared in",
            "op_timeout: 0 is out of range",
            "stat_cmd: unknown key; did you mean start_cmd?",
            "agent.sockt: unknown key; did you mean socket?",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    /// Relative paths are the config file's: the main file's against its directory, a
    /// conf_dir file's against the conf_dir, whatever the current directory is.
    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(etc.join("conf.d")).unwrap();
        std::fs::write(
            etc.join("conf.d/web.toml"),
            "[[process]]\nnamespace='n'\nname='web'\nproc_name='web'\nsetup_path='../app'\npid_path='web.pid'\n",
        )
        .unwrap();
        let f = etc.join("agent.toml");
        std::fs::write(
            &f,
            "[agent]\nstate_dir = 'state'\nsocket = 'run/a.sock'\nconf_dir = 'conf.d'\n[[process]]\nnamespace='n'\nname='db'\nproc_name='db'\nsetup_path='db'\n",
        )
        .unwrap();
        assert_ne!(std::env::current_dir().unwrap(), etc);
        let c = load(&f).unwrap();
        assert_eq!(c.state_dir, etc.join("state"));
        assert_eq!(c.socket, etc.join("run/a.sock"));
        assert_eq!(c.conf_dir.as_deref(), Some(etc.join("conf.d").as_path()));
        let spec = |name: &str| {
            c.processes
                .iter()
                .find(|p| p.definition.key.name == name)
                .unwrap()
                .definition
                .spec
                .clone()
        };
        assert_eq!(spec("db").setup_path, etc.join("db").display().to_string());
        assert_eq!(
            spec("web").setup_path,
            etc.join("conf.d/../app").display().to_string()
        );
        assert_eq!(
            spec("web").pid_path,
            etc.join("conf.d/web.pid").display().to_string()
        );
        // --check says how relative paths were resolved.
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("setup_path \"db\" is relative")
                    && n.contains(&etc.join("db").display().to_string())),
            "{:?}",
            c.notes
        );
    }

    /// The `[[process]]` reader maps config keys into a spec patch and phrases the patch's
    /// errors as the loader always did: (extra lines of one process table, the error).
    #[test]
    fn process_table_errors_keep_the_loader_phrasing() {
        let cases = [
            (
                "op_timeout = 0",
                "process[0] (n/x).op_timeout: 0 is out of range 1..=86400",
            ),
            (
                "op_timeout = -5",
                "process[0] (n/x).op_timeout: -5 is out of range 1..=86400",
            ),
            (
                "instance_num = 300",
                "process[0] (n/x).instance_num: 300 is out of range 1..=256",
            ),
            (
                "start_retries = 101",
                "process[0] (n/x).start_retries: 101 is out of range 0..=100",
            ),
            (
                "max_restarts = -1",
                "process[0] (n/x).max_restarts: -1 is out of range 0..=1000000",
            ),
            (
                "start_check_begin_time = 4000",
                "process[0] (n/x).start_check_begin_time: 4000 is out of range 0..=3600",
            ),
            (
                "cycle_time = -1",
                "process[0] (n/x).cycle_time: -1 is out of range 0..=31536000",
            ),
            (
                "cpu_lmt = 120",
                "process[0] (n/x).cpu_lmt: 120 is out of range 0..=100",
            ),
            (
                "mem_lmt = 100.5",
                "process[0] (n/x).mem_lmt: 100.5 is out of range 0..=100",
            ),
            (
                "op_timeout = 'x'",
                "process[0] (n/x).op_timeout: expected an integer, got string",
            ),
            (
                "cpu_lmt = true",
                "process[0] (n/x).cpu_lmt: expected a number, got boolean",
            ),
            (
                "auto_type = 7",
                "process[0] (n/x).auto_type: 7 must be 0 (periodic), 1 (resident) or 2 (single-run)",
            ),
            (
                "auto_type = 'daily'",
                "process[0] (n/x).auto_type: \"daily\" must be \"resident\", \"periodic\" or \"single-run\"",
            ),
            (
                "auto_type = 'periodic'",
                "process[0] (n/x).cycle_time: is required (seconds, > 0) for a periodic process (auto_type 0)",
            ),
            (
                "cmd_shell_ext = 'bat'",
                "process[0] (n/x).cmd_shell_ext: \"bat\" is not supported; only \"sh\" (the default) is",
            ),
            (
                "account = 'a b'",
                "process[0] (n/x).account: is not a valid account name",
            ),
            (
                "env = { A = 1 }",
                "process[0] (n/x).env.A: environment values must be strings",
            ),
            (
                "proc_name = '/'",
                "process[0] (n/x).proc_name: \"/\" names no program",
            ),
        ];
        for (line, want) in cases {
            let text = format!(
                "[[process]]\nnamespace='n'\nname='x'\nsetup_path='/tmp'\n{}{line}\n",
                if line.starts_with("proc_name") {
                    ""
                } else {
                    "proc_name='x'\n"
                }
            );
            let err = load_text(&text).unwrap_err();
            assert!(
                err.0.iter().any(|e| e.contains(want)),
                "{line}: want {want:?} in {err}"
            );
        }
        let c = load_text(
            "[[process]]\nnamespace='n'\nname='x'\nsetup_path='app'\nproc_name='x'\nuser='svc'\nauto_type='single'\nstart_check_begin_time=1\ncpu_lmt=5\nenv={A='1'}\n",
        )
        .unwrap();
        let s = &c.processes[0].definition.spec;
        assert!(s.setup_path.ends_with("/app") && s.setup_path.starts_with('/'));
        assert_eq!(
            (s.account.as_str(), s.auto_type),
            ("svc", AutoType::SingleRun)
        );
        assert_eq!((s.start_check_begin_time, s.cpu_lmt), (Some(1), 5.0));
        assert_eq!(
            (s.op_timeout, s.instance_num),
            (crate::spec::DEFAULT_OP_TIMEOUT, 1)
        );
        assert_eq!(s.env["A"], "1");
    }
}
