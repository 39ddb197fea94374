//! The operator CLI, `procagent`: status tables, operations that wait for their task (on one
//! process or a selection), task results, events, logs, config reload, shell completions
//! and the man pages. It speaks the same socket API as every other caller; it never reads
//! the agent's files itself, so it works for a non-root operator in the admin or read-only
//! group. Run as root (or as the agent's uid) without `--socket`, it talks to the agent's
//! root socket when that exists, which no other uid can fill.
//!
//! Exit codes follow LSB init-script conventions: 0 success; 1 generic failure (an operation
//! failed); 2 invalid arguments; 3 (status) not running; 4 insufficient privilege; 5 not
//! registered (nothing matches); 6 the config has errors (reload); 69 the agent is
//! unreachable.
//!
//! Output: tables aligned (wide characters count two columns), cut to the terminal's width
//! and coloured only when stdout is a terminal (never with `NO_COLOR`); `--json` prints the
//! API's data instead, on every command that reads, as one JSON document (or one JSON
//! object per line for streams: `events -f`, `logs`).

pub mod complete;
pub mod define;
pub mod follow;
pub mod man;
pub mod ps;
pub mod render;
pub mod top;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::api::client::{Answer, Client, ClientError, decode_data, decode_text};
use crate::api::reload::ReloadReport;
use crate::expr::Expression;
use crate::proto::{
    Envelope, FLAG_RUNNING, Health, HostWire, OpType, OperateMultiReq, OperateProcReq, ProcDetail,
    ProcList, ProcsQuery, ReloadErrors, ReloadReq, TaskIdResp, TaskList, TaskQuery, TaskResults,
    TasksQuery, codes,
};
use crate::spec::ProcKey;

/// Exit codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_RUNNING: u8 = 3;
    pub const FORBIDDEN: u8 = 4;
    pub const NOT_REGISTERED: u8 = 5;
    pub const NOT_CONFIGURED: u8 = 6;
    pub const UNAVAILABLE: u8 = 69;
}

/// procagent: operate and inspect the processes procagentd supervises.
#[derive(Debug, Parser)]
#[command(
    name = "procagent",
    version,
    about,
    long_about = None,
    after_help = "Exit status: 0 ok, 1 an operation failed, 2 bad arguments, 3 not running (status), \
4 not allowed, 5 not registered / nothing matches, 6 the config has errors (reload), 69 agent unreachable."
)]
pub struct Cli {
    /// The agent's socket, used as given (default: $PROCAGENT_SOCKET; else, from the
    /// config's agent.socket and api.root_socket or their defaults
    /// /run/procagent/procagent.sock and procagent-root.sock next to it: the root socket
    /// when running as root or as the agent's uid and it exists, the main socket otherwise).
    #[arg(long, global = true, env = "PROCAGENT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Read the socket path from this agent config file.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Show every column and every message whole, whatever the terminal's width (tables
    /// are otherwise fitted to a terminal: columns dropped, messages shortened).
    #[arg(long, global = true)]
    pub wide: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Which processes an operation acts on: one by name, or a selection.
#[derive(Debug, Clone, Default, Args)]
pub struct Selector {
    /// The processes: NAMESPACE/NAME, several of them, globs (`*`, `?`) in either part
    /// (`demo/*`, `*/web`), or a bare NAME when one namespace alone has it.
    #[arg(value_name = "PROCESS", conflicts_with_all = ["labels", "expr", "all"],
          add = clap_complete::engine::ArgValueCompleter::new(complete::process_names))]
    pub process: Vec<String>,
    /// Every process with this label (KEY=VALUE); repeatable, all must match.
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Every process whose NAMESPACE/NAME matches: a GSEKit expression for each part
    /// (`*`, `?`, `[a,b]`, `[1-3]`), e.g. `demo/web-[1-3]`; without a `/` it matches the
    /// name in every namespace. Combines with --label.
    #[arg(long, value_name = "EXPR")]
    pub expr: Option<String>,
    /// Every registered process.
    #[arg(long, conflicts_with_all = ["labels", "expr"])]
    pub all: bool,
}

impl Selector {
    fn is_batch(&self) -> bool {
        !self.labels.is_empty() || self.expr.is_some() || self.all
    }
    fn is_empty(&self) -> bool {
        self.process.is_empty() && !self.is_batch()
    }
}

/// Options of operations that wait.
#[derive(Debug, Clone, Args)]
pub struct OpArgs {
    #[command(flatten)]
    pub select: Selector,
    /// Return the task id at once instead of waiting for the result.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// `procagent config ...`: the agent's own configuration (its `[[process]]` definitions and
/// settings), read again by the agent from its config file and `conf_dir`.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigAction {
    /// Read the config as the agent would and report its errors; change nothing.
    Check,
    /// Show what applying the config would add, change, remove and restart; change nothing.
    Diff,
    /// Apply the config: add, change and remove definitions, restart what changed.
    Apply {
        /// Return at once instead of waiting for the restarts.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting for the restarts after this many seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
}

/// How a config reload is asked for and shown.
struct ConfigRun {
    dry_run: bool,
    /// Only whether it is valid (and how much would change), not the whole diff.
    check: bool,
    no_wait: bool,
    timeout: u64,
}

/// `reload`: with a process selection, run their reload_cmd; without, reload the config.
#[derive(Debug, Clone, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub op: OpArgs,
    /// (config reload) Show what would change, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show processes (all, or one NAMESPACE/NAME, or a selection).
    Status {
        #[arg(add = clap_complete::engine::ArgValueCompleter::new(complete::process_names))]
        process: Option<String>,
        /// Only processes with this label (KEY=VALUE), repeatable.
        #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Only processes whose NAMESPACE/NAME matches this expression (see `start --help`).
        #[arg(long, value_name = "EXPR")]
        expr: Option<String>,
    },
    /// Start processes (and manage them).
    Start(OpArgs),
    /// Stop processes (and stop managing them).
    Stop(OpArgs),
    /// Restart processes: their restart_cmd, or a stop then a start when they have none.
    Restart(OpArgs),
    /// Run the reload_cmd of processes. (Without a process it still reloads the agent's
    /// config, as `procagent config apply` does; `--dry-run` is `config diff`.)
    Reload(ReloadArgs),
    /// The agent's config: `check` it, `diff` it against what runs, `apply` it.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Register a process: from flags, or `-f FILE` with the keys of a `[[process]]` table
    /// (as in the config file); `--start` starts it too. Keys declared in the agent's config
    /// files are refused (change them there).
    Add(Box<define::AddArgs>),
    /// Unregister processes, leaving them running (no longer watched) unless `--stop`.
    Remove(define::RemoveArgs),
    /// Kill processes (kill_cmd, else SIGKILL to the process group).
    Kill(OpArgs),
    /// Manage (托管) processes: keep them running.
    Manage(OpArgs),
    /// Stop managing processes, leaving them as they are.
    Unmanage(OpArgs),
    /// Show a task's results.
    Task { task_id: String },
    /// Show recent tasks (the audit trail).
    Tasks {
        #[arg(long, default_value_t = 20)]
        limit: u64,
    },
    /// Show the agent's health.
    Health,
    /// GSEKit's process status list: processes with their topology (set, module, service
    /// instance, process), filtered by GSEKit expressions.
    Ps(Box<ps::PsArgs>),
    /// Live table of processes with cpu, memory, fds, disk and sockets, refreshed in place.
    Top(top::TopArgs),
    /// Show the supervision event history.
    Events {
        /// Only this process (NAMESPACE/NAME), as for status and logs.
        #[arg(value_name = "PROCESS", conflicts_with = "process",
              add = clap_complete::engine::ArgValueCompleter::new(complete::process_names))]
        key: Option<String>,
        /// Keep following new events.
        #[arg(short, long)]
        follow: bool,
        /// Only this process (NAMESPACE/NAME); the same as the positional PROCESS.
        #[arg(long)]
        process: Option<String>,
        /// Only events newer than this (e.g. 10m, 2h).
        #[arg(long)]
        since: Option<String>,
        #[arg(short = 'n', long, default_value_t = 100)]
        limit: usize,
    },
    /// Show processes' logs: the captured output of their commands and their log_path
    /// (several processes: each line prefixed with its process).
    Logs(follow::LogsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell): it completes
    /// subcommands, flags and registered process names by calling back into `procagent`.
    Completions { shell: clap_complete::Shell },
    /// Print a man page (roff): procagent(1), a subcommand's page, procagentd(8) (`man
    /// procagentd`) or agent.toml(5) (`man agent.toml`); with --dir, write procagent(1) and
    /// every subcommand's page (procagent.1, procagent-logs.1, ...) into a directory.
    Man {
        /// A subcommand whose page to print (e.g. logs), or procagentd, or agent.toml.
        subcommand: Option<String>,
        /// Write all pages into this directory instead.
        #[arg(long, conflicts_with = "subcommand")]
        dir: Option<PathBuf>,
    },
    /// Send one raw API request (POST /v1/API with BODY, JSON text; `-` reads it from
    /// stdin) and print the answer's envelope as JSON.
    Call {
        api: String,
        #[arg(default_value = "{}")]
        body: String,
    },
}

/// An error with its exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }
}

/// A socket this account may not open: a permission problem, said with the socket's group
/// and mode (the agent may well be running).
fn socket_denied(path: &str, source: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let group = group_name(m.gid());
            format!(
                "cannot connect to the agent at {path}: {source}: the socket is group {group}, mode {:04o}; only members of group {group} (and root) may connect (ask for membership, or run as root)",
                m.mode() & 0o7777
            )
        }
        Err(e) => {
            // The socket cannot even be looked at: name the directory in the way.
            let barrier = std::path::Path::new(path).ancestors().skip(1).find(|d| {
                d.parent().is_some_and(|up| {
                    nix::unistd::access(up, nix::unistd::AccessFlags::X_OK).is_ok()
                }) && nix::unistd::access(*d, nix::unistd::AccessFlags::X_OK).is_err()
            });
            match barrier.and_then(|d| std::fs::metadata(d).ok().map(|m| (d, m))) {
                Some((d, m)) => format!(
                    "cannot connect to the agent at {path}: {source}: its directory {} is group {}, mode {:04o}, and this account may not enter it; only members of that group (and root) may connect",
                    d.display(),
                    group_name(m.gid()),
                    m.mode() & 0o7777
                ),
                None => format!("cannot connect to the agent at {path}: {source} ({e})"),
            }
        }
    }
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        match e {
            ClientError::Refused(env) => api_error(&env),
            ClientError::Connect { path, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                CliError::new(exit::FORBIDDEN, socket_denied(&path, &source))
            }
            ClientError::Connect { .. } => CliError::new(exit::UNAVAILABLE, e.to_string()),
            _ => CliError::new(exit::FAILED, e.to_string()),
        }
    }
}

/// Resolve the socket path from the flags, environment and config: `--socket` (or
/// `$PROCAGENT_SOCKET`) exactly as given; otherwise the config's (or the default) sockets,
/// the root socket first when this process may use it (see [`prefer_root_socket`]).
pub fn socket_path(cli: &Cli) -> Result<PathBuf, CliError> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    let (main, root) = configured_sockets(cli.config.as_deref())?;
    Ok(if prefer_root_socket(&root) {
        root
    } else {
        main
    })
}

/// The main and root sockets a config names (the defaults without a config). Only
/// `agent.socket` and `api.root_socket` are read, so a config with errors elsewhere still
/// names its sockets (and `reload --dry-run` can list those errors).
fn configured_sockets(config: Option<&std::path::Path>) -> Result<(PathBuf, PathBuf), CliError> {
    let default = PathBuf::from("/run/procagent/procagent.sock");
    let Some(c) = config else {
        let root = crate::config::root_socket_for(&default);
        return Ok((default, root));
    };
    let instead = "name the agent's socket instead with --socket PATH or PROCAGENT_SOCKET=PATH";
    let text = std::fs::read_to_string(c).map_err(|e| {
        CliError::new(
            exit::USAGE,
            format!("cannot read {}: {e}; {instead}", c.display()),
        )
    })?;
    let t: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        CliError::new(
            exit::USAGE,
            format!("{}: {}; {instead}", c.display(), e.to_string().trim()),
        )
    })?;
    // Relative paths are the config file's, as the agent reads them.
    let cwd = std::env::current_dir().map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let dir = cwd.join(c);
    let dir = dir.parent().unwrap_or(&cwd);
    let get = |table: &str, key: &str| {
        t.get(table)
            .and_then(|a| a.get(key))
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .map(|s| dir.join(s))
    };
    let main = get("agent", "socket").unwrap_or(default);
    let root = get("api", "root_socket").unwrap_or_else(|| crate::config::root_socket_for(&main));
    Ok((main, root))
}

/// Use the root socket? When it exists and this process may open it: it runs as root, or
/// as the socket's owner (the agent's own uid, for an unprivileged agent).
pub fn prefer_root_socket(root: &std::path::Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(m) = std::fs::symlink_metadata(root) else {
        return false;
    };
    let me = nix::unistd::geteuid().as_raw();
    m.file_type().is_socket() && (me == 0 || me == m.uid())
}

fn api_error(env: &Envelope<Value>) -> CliError {
    let code = match env.code {
        codes::FORBIDDEN => exit::FORBIDDEN,
        codes::NOT_FOUND => exit::NOT_REGISTERED,
        codes::BAD_REQUEST | codes::UNKNOWN_OP_TYPE => exit::USAGE,
        _ => exit::FAILED,
    };
    CliError::new(code, format!("error {}: {}", env.code, env.message))
}

fn parse_key(s: &str) -> Result<ProcKey, CliError> {
    s.parse::<ProcKey>()
        .map_err(|e| CliError::new(exit::USAGE, e))
}

/// Write to stdout; false when stdout is gone (a closed pipe), so streams stop quietly.
fn out(text: &str) -> bool {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes()).and_then(|_| o.flush()).is_ok()
}

fn outln(text: &str) -> bool {
    out(&format!("{text}\n"))
}

/// Print a JSON document, pretty. Typed values go through a JSON value first, so their
/// keys come out in the same (sorted) order as the agent's own objects.
fn print_json<T: Serialize + ?Sized>(v: &T) {
    let v = serde_json::to_value(v).unwrap_or_default();
    outln(&serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// `v`, which may hold the agent's own text of entries ([`RawValue`]), as indented JSON text,
/// streamed through (no `Value` tree of it); empty if it cannot be serialized.
fn pretty_raw<T: Serialize + ?Sized>(v: &T) -> String {
    let Ok(compact) = serde_json::to_vec(v) else {
        return String::new();
    };
    let mut pretty = Vec::with_capacity(compact.len() * 2);
    let mut de = serde_json::Deserializer::from_slice(&compact);
    let mut ser = serde_json::Serializer::pretty(&mut pretty);
    match serde_transcode::transcode(&mut de, &mut ser) {
        Ok(()) => String::from_utf8(pretty).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Print a JSON document on one line (see [`print_json`]).
fn print_json_line<T: Serialize + ?Sized>(v: &T) -> bool {
    outln(&serde_json::to_value(v).unwrap_or_default().to_string())
}

/// Run the CLI; returns the exit code.
pub async fn run(cli: Cli) -> u8 {
    match run_inner(&cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("procagent: {}", e.message);
            e.code
        }
    }
}

async fn run_inner(cli: &Cli) -> Result<u8, CliError> {
    render::set_wide(cli.wide);
    match &cli.command {
        Command::Completions { shell } => {
            let script = complete::registration(*shell)
                .map_err(|e| CliError::new(exit::FAILED, e.to_string()))?;
            out(&script);
            return Ok(exit::OK);
        }
        Command::Man { subcommand, dir } => {
            return man::man(subcommand.as_deref(), dir.as_deref());
        }
        _ => {}
    }
    let client = Client::new(socket_path(cli)?);
    let json_out = cli.json;
    match &cli.command {
        Command::Status {
            process,
            labels,
            expr,
        } => {
            status(
                &client,
                json_out,
                process.as_deref(),
                labels,
                expr.as_deref(),
            )
            .await
        }
        Command::Add(a) => define::add(&client, json_out, a).await,
        Command::Remove(a) => define::remove(&client, json_out, a).await,
        Command::Start(a) => operate(&client, json_out, a, OpType::Start).await,
        Command::Stop(a) => operate(&client, json_out, a, OpType::Stop).await,
        Command::Manage(a) => operate(&client, json_out, a, OpType::Delegate).await,
        Command::Unmanage(a) => operate(&client, json_out, a, OpType::Undelegate).await,
        Command::Restart(a) => operate(&client, json_out, a, OpType::Restart).await,
        Command::Reload(r) => {
            if r.op.select.is_empty() {
                eprintln!(
                    "note: `procagent reload` without a process reloads the agent's config; that is now `procagent config {}` (`reload NAME` runs reload_cmd)",
                    if r.dry_run { "diff" } else { "apply" }
                );
                let run = ConfigRun {
                    dry_run: r.dry_run,
                    check: false,
                    no_wait: r.op.no_wait,
                    timeout: r.op.timeout,
                };
                reload_config(&client, json_out, &run).await
            } else if r.dry_run {
                Err(CliError::new(
                    exit::USAGE,
                    "--dry-run previews a config reload; it does not go with a process selection",
                ))
            } else {
                operate(&client, json_out, &r.op, OpType::Reload).await
            }
        }
        Command::Kill(a) => operate(&client, json_out, a, OpType::Kill).await,
        Command::Config { action } => {
            let run = match action {
                ConfigAction::Check => ConfigRun {
                    dry_run: true,
                    check: true,
                    no_wait: true,
                    timeout: 0,
                },
                ConfigAction::Diff => ConfigRun {
                    dry_run: true,
                    check: false,
                    no_wait: true,
                    timeout: 0,
                },
                ConfigAction::Apply { no_wait, timeout } => ConfigRun {
                    dry_run: false,
                    check: false,
                    no_wait: *no_wait,
                    timeout: *timeout,
                },
            };
            reload_config(&client, json_out, &run).await
        }
        Command::Task { task_id } => {
            let api = "get_proc_operate_result";
            let raw = client
                .call_data(
                    api,
                    &TaskQuery {
                        task_id: task_id.clone(),
                    },
                )
                .await?;
            let d: TaskResults = decode_data(api, raw.clone())?;
            if json_out {
                print_json(&raw);
            } else {
                // What each item did to its definition (an older agent does not say).
                let q = TasksQuery {
                    task_id: Some(task_id.clone()),
                    limit: None,
                };
                let record = client
                    .call_typed::<_, TaskList>("tasks", &q)
                    .await
                    .ok()
                    .and_then(|l| l.list.into_iter().next());
                let width = render::term_width();
                out(&render::fit(
                    &render::task_table(&d, record.as_ref(), width),
                    width,
                ));
            }
            Ok(task_exit(&d, None))
        }
        Command::Tasks { limit } => {
            let q = TasksQuery {
                limit: Some(i64::try_from(*limit).unwrap_or(i64::MAX)),
                task_id: None,
            };
            let raw = client.call_data("tasks", &q).await?;
            if json_out {
                print_json(&raw);
            } else {
                let d: TaskList = decode_data("tasks", raw)?;
                let width = render::term_width();
                out(&render::fit(&render::tasks_table(&d, width), width));
            }
            Ok(exit::OK)
        }
        Command::Ps(a) => ps::ps(&client, cli.json, a).await,
        Command::Health => {
            let raw = client.get_data("/v1/healthz").await?;
            if json_out {
                print_json(&raw);
            } else {
                let h: Health = decode_data("/v1/healthz", raw)?;
                out(&render::health_kv(&h));
            }
            Ok(exit::OK)
        }
        Command::Top(a) => top::run(&client, cli.json, a).await,
        Command::Events {
            key,
            follow,
            process,
            since,
            limit,
        } => {
            follow::events(
                &client,
                json_out,
                *follow,
                key.as_deref().or(process.as_deref()),
                since.as_deref(),
                *limit,
            )
            .await
        }
        Command::Logs(a) => follow::logs(&client, json_out, a).await,
        Command::Completions { .. } | Command::Man { .. } => Ok(exit::OK),
        Command::Call { api, body } => call_raw(&client, api, body).await,
    }
}

async fn call_raw(client: &Client, api: &str, body: &str) -> Result<u8, CliError> {
    let text = if body == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::new(exit::USAGE, format!("cannot read stdin: {e}")))?;
        s
    } else {
        body.to_string()
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| CliError::new(exit::USAGE, format!("BODY is not JSON: {e}")))?;
    let env = client.call(api, &v).await?;
    outln(&serde_json::to_string(&env).unwrap_or_default());
    Ok(if env.result {
        exit::OK
    } else {
        api_error(&env).code
    })
}

/// A parsed `--expr`: GSEKit expressions for the namespace and the name.
#[derive(Debug)]
pub struct KeyExpr {
    pub namespace: Option<Expression>,
    pub name: Expression,
}

impl KeyExpr {
    /// `NS_EXPR/NAME_EXPR` (split at the first `/` outside brackets), or `NAME_EXPR` alone
    /// for every namespace.
    pub fn parse(text: &str) -> Result<KeyExpr, String> {
        let mut depth = 0usize;
        let mut split = None;
        for (i, c) in text.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                '/' if depth == 0 => {
                    split = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let e = |t: &str| Expression::parse(t).map_err(|e| format!("--expr {text:?}: {e}"));
        Ok(match split {
            Some(i) => KeyExpr {
                namespace: Some(e(&text[..i])?),
                name: e(&text[i + 1..])?,
            },
            None => KeyExpr {
                namespace: None,
                name: e(text)?,
            },
        })
    }

    pub fn matches(&self, namespace: &str, name: &str) -> bool {
        crate::expr::field_matches(self.namespace.as_ref(), namespace) && self.name.matches(name)
    }
}

/// What the CLI reads of a `procs` entry beyond printing it: whom it names (for `--expr`)
/// and its state (for `status`'s exit code). The rest of the entry is skipped unread.
#[derive(Debug, Deserialize)]
struct EntryState {
    namespace: String,
    name: String,
    status: i64,
    state: String,
}

/// `data` of a `procs` answer, its entries left as the agent's text.
#[derive(Deserialize)]
struct RawProcList<'a> {
    #[serde(borrow)]
    list: Vec<&'a RawValue>,
}

/// The entries of a `procs` answer, as the agent's text (borrowed from the answer), that
/// `ex` (if any) matches.
fn listed<'a>(answer: &'a Answer, ex: Option<&KeyExpr>) -> Result<Vec<&'a RawValue>, CliError> {
    let list = answer.data::<RawProcList<'a>>()?.list;
    let Some(ex) = ex else {
        return Ok(list);
    };
    let mut kept = Vec::with_capacity(list.len());
    for raw in list {
        let e = entry_state(raw)?;
        if ex.matches(&e.namespace, &e.name) {
            kept.push(raw);
        }
    }
    Ok(kept)
}

fn entry_state(raw: &RawValue) -> Result<EntryState, CliError> {
    Ok(decode_text("procs", raw.get())?)
}

/// An entry printed indented at its place in the document, transcoded from the agent's
/// text as it is written out (no copy of it, no tree of it).
struct Indented<'a>(&'a RawValue);

impl Serialize for Indented<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut de = serde_json::Deserializer::from_str(self.0.get());
        serde_transcode::transcode(&mut de, s)
    }
}

/// `status --json`'s document, `{"count": .., "list": [..]}` indented, written to `w`.
fn write_listed(w: &mut impl Write, list: &[&RawValue]) -> std::io::Result<()> {
    let doc = ProcList {
        count: list.len(),
        list: list.iter().map(|raw| Indented(raw)).collect(),
    };
    serde_json::to_writer_pretty(&mut *w, &doc)?;
    w.write_all(b"\n")?;
    w.flush()
}

/// `--label` selectors, checked to be KEY=VALUE.
fn check_labels(labels: &[String]) -> Result<Vec<String>, CliError> {
    for l in labels {
        if l.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(CliError::new(
                exit::USAGE,
                format!("--label {l:?}: expected KEY=VALUE"),
            ));
        }
    }
    Ok(labels.to_vec())
}

/// `--expr`, parsed.
fn parse_expr(expr: Option<&str>) -> Result<Option<KeyExpr>, CliError> {
    expr.map(KeyExpr::parse)
        .transpose()
        .map_err(|e| CliError::new(exit::USAGE, e))
}

/// The keys of the registered processes that match labels and an expression.
async fn select(
    client: &Client,
    labels: &[String],
    expr: Option<&str>,
) -> Result<Vec<ProcKey>, CliError> {
    let q = ProcsQuery {
        labels: check_labels(labels)?,
        brief: true,
        ..ProcsQuery::default()
    };
    let ex = parse_expr(expr)?;
    let answer = client.call_answer("procs", &q).await?;
    listed(&answer, ex.as_ref())?
        .into_iter()
        .map(|raw| entry_state(raw).map(|e| ProcKey::new(e.namespace, e.name)))
        .collect()
}

async fn status(
    client: &Client,
    json_out: bool,
    process: Option<&str>,
    labels: &[String],
    expr: Option<&str>,
) -> Result<u8, CliError> {
    // The table needs no definitions: brief entries, decoded straight into their type;
    // `--json` prints whole entries as the agent wrote them.
    let mut q = ProcsQuery {
        labels: check_labels(labels)?,
        brief: !json_out,
        ..ProcsQuery::default()
    };
    let mut ex = None;
    match process {
        Some(p) => {
            let k = parse_key(p)?;
            (q.namespace, q.name) = (k.namespace, k.name);
        }
        None => ex = parse_expr(expr)?,
    }
    let states: Vec<(i64, String)> = if json_out {
        let answer = client.call_answer("procs", &q).await?;
        let list = listed(&answer, ex.as_ref())?;
        let mut w = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        // A closed stdout (`| head`) ends the listing quietly, as `out` does.
        let _ = write_listed(&mut w, &list);
        // Only one process's states decide the exit code.
        match process {
            Some(_) => list
                .into_iter()
                .map(|raw| entry_state(raw).map(|e| (e.status, e.state)))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        }
    } else {
        // Only what the table shows is read, its strings borrowed from the answer.
        let answer = client.call_answer("procs", &q).await?;
        let mut list = answer.data::<ProcList<crate::proto::StatusRow<'_>>>()?.list;
        if let Some(ex) = &ex {
            list.retain(|p| ex.matches(&p.namespace, &p.name));
        }
        let width = render::term_width();
        out(&render::fit(
            &render::status_table(&list, render::color_enabled(), width),
            width,
        ));
        list.into_iter()
            .map(|p| (p.status, p.state.into_owned()))
            .collect()
    };
    if let Some(p) = process {
        if states.is_empty() {
            return Err(CliError::new(
                exit::NOT_REGISTERED,
                format!("{p} is not registered"),
            ));
        }
        // A periodic job between runs is where it should be (waiting), not down.
        if states
            .iter()
            .all(|(status, state)| *status != FLAG_RUNNING && state != "waiting")
        {
            return Ok(exit::NOT_RUNNING);
        }
    }
    Ok(exit::OK)
}

/// The agent's identity, for the `hosts` of operation requests.
async fn my_host(client: &Client) -> Result<HostWire, CliError> {
    let h: Health = client.get_typed("/v1/healthz").await?;
    Ok(HostWire {
        ip: h.host.ip,
        bk_cloud_id: Some(h.host.bk_cloud_id),
        bk_supplier_id: Some(h.host.bk_supplier_id),
    })
}

async fn operate(client: &Client, json_out: bool, a: &OpArgs, op: OpType) -> Result<u8, CliError> {
    if a.select.is_batch() {
        let keys = select(client, &a.select.labels, a.select.expr.as_deref()).await?;
        return operate_many(client, json_out, a, op, keys).await;
    }
    if a.select.process.is_empty() {
        return Err(CliError::new(
            exit::USAGE,
            "name a process (NAMESPACE/NAME), or select processes with --label, --expr or --all",
        ));
    }
    let keys = resolve_names(client, &a.select.process).await?;
    let single = a.select.process.len() == 1 && !a.select.process[0].contains(['*', '?', '[']);
    let key = match keys.as_slice() {
        [k] if single => k.clone(),
        _ => return operate_many(client, json_out, a, op, keys).await,
    };
    operate_one(client, json_out, &key, op, a.no_wait, a.timeout).await
}

/// One operation on one process: its task, waited for (unless `no_wait`) and summed up.
async fn operate_one(
    client: &Client,
    json_out: bool,
    key: &ProcKey,
    op: OpType,
    no_wait: bool,
    timeout: u64,
) -> Result<u8, CliError> {
    let host = my_host(client).await?;
    let TaskIdResp { task_id } = client
        .call_typed("operate_proc", &OperateProcReq::new(key, op, vec![host]))
        .await?;
    if no_wait {
        if json_out {
            print_json_line(&TaskIdResp {
                task_id: task_id.clone(),
            });
        } else {
            outln(&task_id);
        }
        return Ok(exit::OK);
    }
    let d = wait_task(client, &task_id, Duration::from_secs(timeout)).await?;
    if json_out {
        #[derive(Serialize)]
        struct Done<'a> {
            task_id: &'a str,
            result: &'a TaskResults,
        }
        print_json(&Done {
            task_id: &task_id,
            result: &d,
        });
    } else {
        out(&render::op_summary(key, op, &task_id, &d));
    }
    Ok(task_exit(&d, Some(op)))
}

/// The processes the names of an operation stand for, in the order named, each once: each
/// name is NAMESPACE/NAME or a bare NAME, either part a glob (see [`KeyExpr`]). A bare name
/// without a glob must be unique across namespaces. A name that matches nothing fails the
/// whole command before anything is asked of the agent (exit 5), with the closest names.
async fn resolve_names(client: &Client, names: &[String]) -> Result<Vec<ProcKey>, CliError> {
    // Exact NAMESPACE/NAMEs (the usual case) are each asked for alone: on a host of
    // thousands of processes that is a small answer, not the whole list. The whole list is
    // fetched only for globs, bare names, and a name that is not registered (its closest).
    let exact: Option<Vec<ProcKey>> = names
        .iter()
        .map(|n| {
            let (ns, name) = n.split_once('/')?;
            let plain = !n.contains(['*', '?', '[']) && !ns.is_empty() && !name.is_empty();
            plain.then(|| ProcKey::new(ns, name))
        })
        .collect();
    if let Some(keys) = exact {
        let mut found = Vec::new();
        for k in &keys {
            let q = ProcsQuery {
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                brief: true,
                ..ProcsQuery::default()
            };
            let hit = client
                .call_typed::<_, ProcList<ProcDetail>>("procs", &q)
                .await?
                .list
                .iter()
                .any(|p| p.namespace == k.namespace && p.name == k.name);
            if !hit {
                found.clear();
                break;
            }
            if !found.contains(k) {
                found.push(k.clone());
            }
        }
        if found.len() == keys.iter().collect::<std::collections::HashSet<_>>().len() {
            return Ok(found);
        }
    }
    let q = ProcsQuery {
        brief: true,
        ..ProcsQuery::default()
    };
    let all: Vec<ProcKey> = client
        .call_typed::<_, ProcList<ProcDetail>>("procs", &q)
        .await?
        .list
        .into_iter()
        .map(|p| ProcKey::new(p.namespace, p.name))
        .collect();
    let mut out: Vec<ProcKey> = Vec::new();
    for n in names {
        let ex = KeyExpr::parse(n)
            .map_err(|e| CliError::new(exit::USAGE, e.replacen("--expr", "process name", 1)))?;
        let hits: Vec<&ProcKey> = all
            .iter()
            .filter(|k| ex.matches(&k.namespace, &k.name))
            .collect();
        if hits.is_empty() {
            let near = closest(n, &all);
            let hint = if near.is_empty() {
                String::new()
            } else {
                format!("; did you mean {}?", near.join(" or "))
            };
            return Err(CliError::new(
                exit::NOT_REGISTERED,
                format!("{n}: no registered process has this name{hint}"),
            ));
        }
        let glob = n.contains(['*', '?', '[']);
        if !glob && !n.contains('/') && hits.len() > 1 {
            let which: Vec<String> = hits.iter().map(|k| k.to_string()).collect();
            return Err(CliError::new(
                exit::USAGE,
                format!(
                    "{n}: several namespaces have a process of this name ({}); name one as NAMESPACE/NAME",
                    which.join(", ")
                ),
            ));
        }
        for k in hits {
            if !out.contains(k) {
                out.push(k.clone());
            }
        }
    }
    Ok(out)
}

/// Up to three registered names closest to `name` (edit distance, within a third of its
/// length and at least 2), nearest first.
fn closest(name: &str, all: &[ProcKey]) -> Vec<String> {
    let bare = !name.contains('/');
    let mut scored: Vec<(usize, String)> = all
        .iter()
        .map(|k| {
            let full = k.to_string();
            let d = if bare {
                crate::util::edit_distance(name, &k.name)
            } else {
                crate::util::edit_distance(name, &full)
            };
            (d, full)
        })
        .filter(|(d, _)| *d <= (name.chars().count() / 3).max(2))
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, k)| k).collect()
}

/// Most items in one operate_proc_multi call (the API's limit).
const MULTI_CHUNK: usize = crate::api::limits::MAX_MULTI_ITEMS;

/// One operation on every selected process: one operate_proc_multi task per
/// [`MULTI_CHUNK`] processes, a progress bar on stderr while waiting (when stderr is a terminal), then a
/// summary table.
async fn operate_many(
    client: &Client,
    json_out: bool,
    a: &OpArgs,
    op: OpType,
    keys: Vec<ProcKey>,
) -> Result<u8, CliError> {
    if keys.is_empty() {
        return Err(CliError::new(
            exit::NOT_REGISTERED,
            "no registered process matches the selection",
        ));
    }
    let host = my_host(client).await?;
    let mut tasks = Vec::new();
    for chunk in keys.chunks(MULTI_CHUNK) {
        let req = OperateMultiReq {
            proc_operate_req: chunk
                .iter()
                .map(|k| OperateProcReq::new(k, op, vec![host.clone()]))
                .collect(),
        };
        let d: TaskIdResp = client.call_typed("operate_proc_multi", &req).await?;
        tasks.push(d.task_id);
    }
    if a.no_wait {
        if json_out {
            #[derive(Serialize)]
            struct Submitted<'a> {
                task_ids: &'a [String],
                count: usize,
            }
            print_json_line(&Submitted {
                task_ids: &tasks,
                count: keys.len(),
            });
        } else {
            for t in &tasks {
                outln(t);
            }
        }
        return Ok(exit::OK);
    }
    let results = wait_tasks(client, &tasks, Duration::from_secs(a.timeout), Some(op)).await?;
    report_batch(json_out, op, &keys, &tasks, &results)
}

/// A batch's summary as `--json` prints it.
#[derive(Debug, Serialize)]
struct BatchReport<'a> {
    op: &'static str,
    task_ids: &'a [String],
    ok: usize,
    failed: usize,
    results: &'a [BatchRow],
}

/// Print a batch's summary (table or JSON) and return its exit code.
fn report_batch(
    json_out: bool,
    op: OpType,
    keys: &[ProcKey],
    tasks: &[String],
    results: &TaskResults,
) -> Result<u8, CliError> {
    let rows = batch_rows(keys, results, op);
    let (ok_n, failed_n) = (
        rows.iter().filter(|r| r.ok).count(),
        rows.iter().filter(|r| !r.ok).count(),
    );
    let name = op.name();
    if json_out {
        print_json(&BatchReport {
            op: name,
            task_ids: tasks,
            ok: ok_n,
            failed: failed_n,
            results: &rows,
        });
    } else {
        out(&render::fit(
            &render::batch_table(&rows, render::color_enabled()),
            render::term_width(),
        ));
        outln(&format!(
            "{name}: {} processes, {ok_n} ok, {failed_n} failed (task{} {})",
            rows.len(),
            if tasks.len() == 1 { "" } else { "s" },
            tasks.join(", ")
        ));
    }
    Ok(task_exit(results, Some(op)))
}

/// A process's line in a batch summary (and its object in `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchRow {
    pub process: String,
    pub ok: bool,
    pub code: i64,
    pub message: String,
    /// "already running (pid N)" / "not running" for the answers that are not failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub said: Option<String>,
}

/// Match a task's results (keyed `cloud:ip:ns:name`) back to the processes asked for.
pub fn batch_rows(keys: &[ProcKey], results: &TaskResults, op: OpType) -> Vec<BatchRow> {
    keys.iter()
        .map(|k| {
            let suffix = format!(":{}:{}", k.namespace, k.name);
            let r = results
                .iter()
                .find(|(rk, _)| rk.ends_with(&suffix))
                .map(|(_, v)| v);
            let code = r.map(|r| r.error_code).unwrap_or(-1);
            let message = r
                .map(|r| r.error_msg.clone())
                .unwrap_or_else(|| "no result".to_string());
            BatchRow {
                process: k.to_string(),
                ok: code_ok(code, Some(op)),
                code,
                said: render::already(code, Some(op), &message),
                message,
            }
        })
        .collect()
}

/// Poll one task until no key is 115 (or the timeout).
pub async fn wait_task(
    client: &Client,
    task_id: &str,
    timeout: Duration,
) -> Result<TaskResults, CliError> {
    wait_tasks(client, &[task_id.to_string()], timeout, None).await
}

/// Poll tasks until no key is 115 (or the timeout), drawing a progress bar on stderr when
/// it is a terminal and there is more than one key. Returns every key's result. `op` is
/// the operation asked for, when known (for which codes count as failures).
pub async fn wait_tasks(
    client: &Client,
    task_ids: &[String],
    timeout: Duration,
    op: Option<OpType>,
) -> Result<TaskResults, CliError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(50);
    let tty = std::io::stderr().is_terminal();
    let mut drawn = false;
    loop {
        let mut all = TaskResults::new();
        for t in task_ids {
            let d: TaskResults = client
                .call_typed("get_proc_operate_result", &TaskQuery { task_id: t.clone() })
                .await?;
            all.extend(d);
        }
        let total = all.len();
        let pending = all
            .values()
            .filter(|v| v.error_code == codes::RUNNING)
            .count();
        let failed = all
            .values()
            .filter(|v| v.error_code != codes::RUNNING && !code_ok(v.error_code, op))
            .count();
        if tty && total > 1 {
            let width = render::term_width_of(&std::io::stderr()).unwrap_or(80);
            eprint!(
                "\r{}",
                render::progress_line(total - pending, failed, total, width)
            );
            drawn = true;
        }
        if pending == 0 {
            if drawn {
                eprintln!();
            }
            return Ok(all);
        }
        if start.elapsed() >= timeout {
            if drawn {
                eprintln!();
            }
            return Err(CliError::new(
                exit::FAILED,
                format!(
                    "{pending} of {total} still running after {}s; check later with `procagent task {}`",
                    timeout.as_secs(),
                    task_ids.join("` / `procagent task ")
                ),
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Is a per-key code a success for this operation? 828 for start and 829 for stop, kill
/// and unmanage count as success, as in LSB ("already in the state asked for").
pub fn code_ok(c: i64, op: Option<OpType>) -> bool {
    c == codes::SUCCESS
        || (c == codes::PROC_RUNNING && op == Some(OpType::Start))
        || (c == codes::PROC_NOT_RUNNING
            && matches!(
                op,
                Some(OpType::Stop) | Some(OpType::Kill) | Some(OpType::Undelegate)
            ))
}

/// Exit code of a finished task: 0 when every key succeeded ([`code_ok`]).
pub fn task_exit(d: &TaskResults, op: Option<OpType>) -> u8 {
    let mut code = exit::OK;
    for v in d.values() {
        let c = v.error_code;
        if !code_ok(c, op) {
            code = match c {
                codes::NOT_REGISTERED => exit::NOT_REGISTERED,
                codes::FORBIDDEN => exit::FORBIDDEN,
                _ => exit::FAILED,
            };
        }
    }
    code
}

/// `procagent reload [--dry-run]` without a process: the config reload.
async fn reload_config(client: &Client, json_out: bool, r: &ConfigRun) -> Result<u8, CliError> {
    let req = ReloadReq { dry_run: r.dry_run };
    let raw = match client.call_data("reload", &req).await {
        Ok(d) => d,
        Err(ClientError::Refused(env)) => {
            let errors = env
                .data
                .clone()
                .and_then(|d| serde_json::from_value::<ReloadErrors>(d).ok())
                .map(|e| e.errors)
                .unwrap_or_default();
            if errors.is_empty() {
                return Err(api_error(&env));
            }
            if json_out {
                #[derive(Serialize)]
                struct Refused<'a> {
                    result: bool,
                    code: i64,
                    message: &'a str,
                    errors: &'a [String],
                }
                print_json(&Refused {
                    result: false,
                    code: env.code,
                    message: &env.message,
                    errors: &errors,
                });
            }
            let mut msg = format!(
                "the config has {} error(s); nothing changed, the running config stays:",
                errors.len()
            );
            for e in &errors {
                msg.push_str("\n  ");
                msg.push_str(e);
            }
            return Err(CliError::new(exit::NOT_CONFIGURED, msg));
        }
        Err(e) => return Err(e.into()),
    };
    let report: ReloadReport = decode_data("reload", raw.clone())?;
    if r.check && !json_out {
        let d = &report.diff;
        let pending = d.added.len() + d.changed.len() + d.removed.len();
        outln(&format!(
            "{}: ok; {pending} definition change(s) pending{}",
            report.file,
            if pending > 0 {
                " (see `procagent config diff`)"
            } else {
                ""
            }
        ));
    } else if !json_out {
        out(&render::reload_report(&report, render::color_enabled()));
    }
    let Some(task_id) = report.task_id.clone().filter(|_| !r.no_wait) else {
        if json_out {
            print_json(&raw);
        }
        return Ok(exit::OK);
    };
    // The restarts the reload started: wait for them like any batch.
    let results = wait_tasks(
        client,
        std::slice::from_ref(&task_id),
        Duration::from_secs(r.timeout),
        Some(OpType::Restart),
    )
    .await?;
    let keys: Vec<ProcKey> = report
        .diff
        .restart
        .iter()
        .filter_map(|k| k.parse().ok())
        .collect();
    if json_out {
        let rows = batch_rows(&keys, &results, OpType::Restart);
        let mut d = raw;
        if let Some(m) = d.as_object_mut() {
            m.insert(
                "restart_results".into(),
                serde_json::to_value(&rows).unwrap_or_default(),
            );
        }
        print_json(&d);
        return Ok(task_exit(&results, Some(OpType::Restart)));
    }
    report_batch(false, OpType::Restart, &keys, &[task_id], &results)
}

/// Percent-encode a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances_and_closest_names() {
        for (a, b, d) in [
            ("", "", 0),
            ("web", "web", 0),
            ("wbe", "web", 2),
            ("web-1", "web-2", 1),
            ("api", "", 3),
            ("ops/wbe-1", "ops/web-1", 2),
        ] {
            assert_eq!(crate::util::edit_distance(a, b), d, "{a} {b}");
        }
        let all = vec![
            ProcKey::new("ops", "web-1"),
            ProcKey::new("ops", "api"),
            ProcKey::new("x", "database"),
        ];
        assert_eq!(closest("ops/wbe-1", &all), ["ops/web-1"]);
        assert_eq!(
            closest("databse", &all),
            ["x/database"],
            "a bare name is compared by name"
        );
        assert!(closest("zzzzzz", &all).is_empty());
    }

    #[test]
    fn key_expressions() {
        let e = KeyExpr::parse("demo/web-[1-3]").unwrap();
        assert!(e.matches("demo", "web-2"));
        assert!(!e.matches("demo", "web-4"));
        assert!(!e.matches("other", "web-2"));
        let e = KeyExpr::parse("web-*").unwrap();
        assert!(e.matches("any", "web-x"));
        // A `/` inside brackets does not split.
        let e = KeyExpr::parse("[a/b,c]").unwrap();
        assert!(e.namespace.is_none());
        let e = KeyExpr::parse("*/[x, y]").unwrap();
        assert!(e.matches("n", "x") && e.matches("m", "y") && !e.matches("n", "z"));
        assert!(KeyExpr::parse("demo/[oops").is_err());
    }

    #[test]
    fn batch_rows_match_results_back() {
        let keys = vec![ProcKey::new("d", "a"), ProcKey::new("d", "b")];
        let mut m = TaskResults::new();
        m.insert("0:127.0.0.1:d:a".into(), crate::proto::KeyResult::ok(""));
        m.insert(
            "0:127.0.0.1:d:b".into(),
            crate::proto::KeyResult::err(836, "not running"),
        );
        let rows = batch_rows(&keys, &m, OpType::Start);
        assert!(rows[0].ok && !rows[1].ok);
        assert_eq!(rows[1].code, 836);
        assert_eq!(task_exit(&m, Some(OpType::Start)), exit::FAILED);
    }

    #[test]
    fn lsb_success_codes() {
        use OpType::*;
        assert!(code_ok(828, Some(Start)));
        assert!(!code_ok(828, Some(Restart)));
        assert!(
            code_ok(829, Some(Stop)) && code_ok(829, Some(Kill)) && code_ok(829, Some(Undelegate))
        );
        assert!(!code_ok(829, Some(Start)));
    }

    /// A `procs` answer of three entries, as the agent writes it (compact, nested values).
    fn procs_answer() -> Answer {
        let entry = |ns: &str, name: &str, status: i64| {
            serde_json::json!({"namespace": ns, "name": name, "status": status,
                "state": if status == 1 { "running" } else { "stopped" },
                "labels": {"tier": "web", "n": [1, 2.5, null]}, "spec": {"env": {"A": "b\"c"}},
                "pids": [], "message": "ünïcode \u{1F600}"})
        };
        let body = serde_json::json!({"result": true, "code": 0, "message": "success",
            "data": {"count": 3, "list": [entry("web", "a", 1), entry("web", "b", 2),
                entry("db", "a", 2)]}, "request_id": "r"});
        Answer::new("procs", 200, serde_json::to_vec(&body).unwrap().into())
    }

    #[test]
    fn status_json_prints_the_agents_entries_indented_as_a_json_tree_would() {
        let answer = procs_answer();
        let data: Value = answer.data().unwrap();
        let written = |ex: Option<&KeyExpr>| {
            let mut w = Vec::new();
            write_listed(&mut w, &listed(&answer, ex).unwrap()).unwrap();
            String::from_utf8(w).unwrap()
        };
        // Everything: the document a JSON tree of `data` prints, keys in the agent's order.
        assert_eq!(
            written(None),
            format!("{}\n", serde_json::to_string_pretty(&data).unwrap())
        );
        // A selection: the count and the list are of what was kept.
        let ex = KeyExpr::parse("web/*").unwrap();
        let mut kept = data.clone();
        kept["count"] = 2.into();
        kept["list"].as_array_mut().unwrap().truncate(2);
        assert_eq!(
            written(Some(&ex)),
            format!("{}\n", serde_json::to_string_pretty(&kept).unwrap())
        );
        // What the exit code reads of an entry.
        let e = entry_state(listed(&answer, None).unwrap()[1]).unwrap();
        assert_eq!(
            (
                e.namespace.as_str(),
                e.name.as_str(),
                e.status,
                e.state.as_str()
            ),
            ("web", "b", 2, "stopped")
        );
    }

    #[test]
    fn a_refused_procs_answer_is_an_error_not_an_empty_list() {
        let body = br#"{"result":false,"code":1000403,"message":"not allowed","data":null}"#;
        let answer = Answer::new("procs", 403, body.to_vec().into());
        assert!(matches!(
            listed(&answer, None),
            Err(e) if e.message.contains("not allowed")
        ));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
