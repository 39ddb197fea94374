//! The operator CLI, `procagent`: status tables, operations that wait for their task (on one
//! process or a selection), task results, events, logs, config reload, shell completions
//! and the man page. It speaks the same socket API as every other caller; it never reads
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

pub mod ps;
pub mod render;
pub mod top;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};

use crate::api::client::{Client, ClientError};
use crate::expr::Expression;
use crate::proto::{Envelope, codes};
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
    #[command(subcommand)]
    pub command: Command,
}

/// Which processes an operation acts on: one by name, or a selection.
#[derive(Debug, Clone, Default, Args)]
pub struct Selector {
    /// The process, as NAMESPACE/NAME.
    #[arg(conflicts_with_all = ["labels", "expr", "all"])]
    pub process: Option<String>,
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
        self.process.is_none() && !self.is_batch()
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
    /// Restart processes with their restart_cmd.
    Restart(OpArgs),
    /// Without a process: reload the agent's config (its [[process]] definitions); with a
    /// process or a selection: run their reload_cmd.
    Reload(ReloadArgs),
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
        /// Keep following new events.
        #[arg(short, long)]
        follow: bool,
        /// Only this process (NAMESPACE/NAME).
        #[arg(long)]
        process: Option<String>,
        /// Only events newer than this (e.g. 10m, 2h).
        #[arg(long)]
        since: Option<String>,
        #[arg(short = 'n', long, default_value_t = 100)]
        limit: usize,
    },
    /// Show a process's logs: the captured output of its commands and its log_path.
    Logs {
        /// The process, as NAMESPACE/NAME.
        process: String,
        /// Keep following new lines.
        #[arg(short, long)]
        follow: bool,
        /// Lines to show from the end of each file.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
        /// Which logs: all, output (captured command output) or log (log_path).
        #[arg(long, default_value = "all", value_parser = ["all", "output", "log"])]
        source: String,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): procagent(1), or a subcommand's page; with --dir, write
    /// every page (procagent.1, procagent-logs.1, ...) into a directory.
    Man {
        /// A subcommand whose page to print (e.g. logs).
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

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        match e {
            ClientError::Refused(env) => api_error(&env),
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
    let text = std::fs::read_to_string(c)
        .map_err(|e| CliError::new(exit::USAGE, format!("cannot read {}: {e}", c.display())))?;
    let t: toml::Table = text
        .parse()
        .map_err(|e| CliError::new(exit::USAGE, format!("{}: {e}", c.display())))?;
    let cwd = std::env::current_dir().map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let get = |table: &str, key: &str| {
        t.get(table)
            .and_then(|a| a.get(key))
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .map(|s| cwd.join(s))
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

fn data(env: Envelope<Value>) -> Result<Value, CliError> {
    if env.result {
        Ok(env.data.unwrap_or(Value::Null))
    } else {
        Err(api_error(&env))
    }
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

fn print_json(v: &Value) {
    outln(&serde_json::to_string_pretty(v).unwrap_or_default());
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
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "procagent", &mut buf);
            out(&String::from_utf8_lossy(&buf));
            return Ok(exit::OK);
        }
        Command::Man { subcommand, dir } => return man(subcommand.as_deref(), dir.as_deref()),
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
        Command::Start(a) => operate(&client, json_out, a, 0).await,
        Command::Stop(a) => operate(&client, json_out, a, 1).await,
        Command::Manage(a) => operate(&client, json_out, a, 3).await,
        Command::Unmanage(a) => operate(&client, json_out, a, 4).await,
        Command::Restart(a) => operate(&client, json_out, a, 7).await,
        Command::Reload(r) => {
            if r.op.select.is_empty() {
                reload_config(&client, json_out, r).await
            } else if r.dry_run {
                Err(CliError::new(
                    exit::USAGE,
                    "--dry-run previews a config reload; it does not go with a process selection",
                ))
            } else {
                operate(&client, json_out, &r.op, 8).await
            }
        }
        Command::Kill(a) => operate(&client, json_out, a, 9).await,
        Command::Task { task_id } => {
            let d = data(
                client
                    .call("get_proc_operate_result", &json!({ "task_id": task_id }))
                    .await?,
            )?;
            if json_out {
                print_json(&d);
            } else {
                // What each item did to its definition (an older agent does not say).
                let record = client
                    .call("tasks", &json!({ "task_id": task_id }))
                    .await
                    .ok()
                    .and_then(|e| data(e).ok())
                    .map(|d| d["list"][0].clone());
                out(&render::fit(
                    &render::task_table(&d, record.as_ref()),
                    render::term_width(),
                ));
            }
            Ok(task_exit(&d, None))
        }
        Command::Tasks { limit } => {
            let d = data(client.call("tasks", &json!({ "limit": limit })).await?)?;
            if json_out {
                print_json(&d);
            } else {
                out(&render::fit(&render::tasks_table(&d), render::term_width()));
            }
            Ok(exit::OK)
        }
        Command::Ps(a) => ps::ps(&client, cli.json, a).await,
        Command::Health => {
            let d = data(client.get("/v1/healthz").await?)?;
            if json_out {
                print_json(&d);
            } else {
                out(&render::kv(&d));
            }
            Ok(exit::OK)
        }
        Command::Top(a) => top::run(&client, cli.json, a).await,
        Command::Events {
            follow,
            process,
            since,
            limit,
        } => {
            events(
                &client,
                json_out,
                *follow,
                process.as_deref(),
                since.as_deref(),
                *limit,
            )
            .await
        }
        Command::Logs {
            process,
            follow,
            lines,
            source,
        } => logs(&client, json_out, process, *follow, *lines, source).await,
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

/// `procagent man`.
fn man(subcommand: Option<&str>, dir: Option<&std::path::Path>) -> Result<u8, CliError> {
    let fail = |e: std::io::Error| CliError::new(exit::FAILED, e.to_string());
    if let Some(dir) = dir {
        clap_mangen::generate_to(Cli::command(), dir).map_err(fail)?;
        outln(&format!("man pages written to {}", dir.display()));
        return Ok(exit::OK);
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let page = match subcommand {
        None => cmd,
        Some(name) => cmd
            .find_subcommand(name)
            .cloned()
            .ok_or_else(|| CliError::new(exit::USAGE, format!("no subcommand {name:?}")))?,
    };
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf).map_err(fail)?;
    out(&String::from_utf8_lossy(&buf));
    Ok(exit::OK)
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

/// The registered processes (their `procs` entries) that match labels and an expression.
async fn select(
    client: &Client,
    labels: &[String],
    expr: Option<&str>,
) -> Result<Vec<Value>, CliError> {
    for l in labels {
        if l.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(CliError::new(
                exit::USAGE,
                format!("--label {l:?}: expected KEY=VALUE"),
            ));
        }
    }
    let ex = expr
        .map(KeyExpr::parse)
        .transpose()
        .map_err(|e| CliError::new(exit::USAGE, e))?;
    let d = data(client.call("procs", &json!({ "labels": labels })).await?)?;
    let mut list = d["list"].as_array().cloned().unwrap_or_default();
    if let Some(ex) = ex {
        list.retain(|p| {
            ex.matches(
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or(""),
            )
        });
    }
    Ok(list)
}

async fn status(
    client: &Client,
    json_out: bool,
    process: Option<&str>,
    labels: &[String],
    expr: Option<&str>,
) -> Result<u8, CliError> {
    let list = if let Some(p) = process {
        let k = parse_key(p)?;
        let mut q = json!({ "labels": labels });
        q["namespace"] = json!(k.namespace);
        q["name"] = json!(k.name);
        let d = data(client.call("procs", &q).await?)?;
        d["list"].as_array().cloned().unwrap_or_default()
    } else {
        select(client, labels, expr).await?
    };
    if json_out {
        print_json(&json!({ "count": list.len(), "list": list }));
    } else {
        out(&render::fit(
            &render::status_table(&list, render::color_enabled()),
            render::term_width(),
        ));
    }
    if let Some(p) = process {
        if list.is_empty() {
            return Err(CliError::new(
                exit::NOT_REGISTERED,
                format!("{p} is not registered"),
            ));
        }
        if list.iter().all(|p| p["status"].as_i64() != Some(1)) {
            return Ok(exit::NOT_RUNNING);
        }
    }
    Ok(exit::OK)
}

/// The agent's identity, for the `hosts` of operation requests.
async fn my_host(client: &Client) -> Result<Value, CliError> {
    let h = data(client.get("/v1/healthz").await?)?;
    Ok(json!({
        "ip": h["host"]["ip"], "bk_cloud_id": h["host"]["bk_cloud_id"], "bk_supplier_id": h["host"]["bk_supplier_id"]
    }))
}

async fn operate(
    client: &Client,
    json_out: bool,
    a: &OpArgs,
    op_type: i64,
) -> Result<u8, CliError> {
    if a.select.is_batch() {
        return operate_many(client, json_out, a, op_type).await;
    }
    let Some(process) = &a.select.process else {
        return Err(CliError::new(
            exit::USAGE,
            "name a process (NAMESPACE/NAME), or select processes with --label, --expr or --all",
        ));
    };
    let key = parse_key(process)?;
    let host = my_host(client).await?;
    let d = data(
        client
            .call(
                "operate_proc",
                &json!({"meta": {"namespace": key.namespace, "name": key.name}, "op_type": op_type, "hosts": [host]}),
            )
            .await?,
    )?;
    let task_id = d["task_id"].as_str().unwrap_or_default().to_string();
    if a.no_wait {
        if json_out {
            outln(&json!({ "task_id": task_id }).to_string());
        } else {
            outln(&task_id);
        }
        return Ok(exit::OK);
    }
    let d = wait_task(client, &task_id, Duration::from_secs(a.timeout)).await?;
    if json_out {
        print_json(&json!({"task_id": task_id, "result": d}));
    } else {
        out(&render::op_summary(&key, op_type, &task_id, &d));
    }
    Ok(task_exit(&d, Some(op_type)))
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
    op_type: i64,
) -> Result<u8, CliError> {
    let list = select(client, &a.select.labels, a.select.expr.as_deref()).await?;
    if list.is_empty() {
        return Err(CliError::new(
            exit::NOT_REGISTERED,
            "no registered process matches the selection",
        ));
    }
    let host = my_host(client).await?;
    let keys: Vec<ProcKey> = list
        .iter()
        .map(|p| {
            ProcKey::new(
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for chunk in keys.chunks(MULTI_CHUNK) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|k| json!({"meta": {"namespace": k.namespace, "name": k.name}, "op_type": op_type, "hosts": [host.clone()]}))
            .collect();
        let d = data(
            client
                .call("operate_proc_multi", &json!({ "proc_operate_req": items }))
                .await?,
        )?;
        tasks.push(d["task_id"].as_str().unwrap_or_default().to_string());
    }
    if a.no_wait {
        if json_out {
            outln(&json!({ "task_ids": tasks, "count": keys.len() }).to_string());
        } else {
            for t in &tasks {
                outln(t);
            }
        }
        return Ok(exit::OK);
    }
    let results = wait_tasks(client, &tasks, Duration::from_secs(a.timeout), op_type).await?;
    report_batch(json_out, op_type, &keys, &tasks, &results)
}

/// Print a batch's summary (table or JSON) and return its exit code.
fn report_batch(
    json_out: bool,
    op_type: i64,
    keys: &[ProcKey],
    tasks: &[String],
    results: &serde_json::Map<String, Value>,
) -> Result<u8, CliError> {
    let rows = batch_rows(keys, results, op_type);
    let (ok_n, failed_n) = (
        rows.iter().filter(|r| r.ok).count(),
        rows.iter().filter(|r| !r.ok).count(),
    );
    let name = crate::proto::OpType::from_code(op_type)
        .map(|o| o.name())
        .unwrap_or("operation");
    if json_out {
        print_json(&json!({
            "op": name,
            "task_ids": tasks,
            "ok": ok_n,
            "failed": failed_n,
            "results": rows.iter().map(|r| json!({
                "process": r.process, "ok": r.ok, "code": r.code, "message": r.message,
            })).collect::<Vec<_>>(),
        }));
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
    Ok(task_exit(&Value::Object(results.clone()), Some(op_type)))
}

/// A process's line in a batch summary.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    pub process: String,
    pub ok: bool,
    pub code: i64,
    pub message: String,
}

/// Match a task's results (keyed `cloud:ip:ns:name`) back to the processes asked for.
pub fn batch_rows(
    keys: &[ProcKey],
    results: &serde_json::Map<String, Value>,
    op_type: i64,
) -> Vec<BatchRow> {
    keys.iter()
        .map(|k| {
            let suffix = format!(":{}:{}", k.namespace, k.name);
            let r = results
                .iter()
                .find(|(rk, _)| rk.ends_with(&suffix))
                .map(|(_, v)| v.clone())
                .unwrap_or(Value::Null);
            let code = r["error_code"].as_i64().unwrap_or(-1);
            BatchRow {
                process: k.to_string(),
                ok: code_ok(code, Some(op_type)),
                code,
                message: r["error_msg"].as_str().unwrap_or("no result").to_string(),
            }
        })
        .collect()
}

/// Poll one task until no key is 115 (or the timeout).
pub async fn wait_task(
    client: &Client,
    task_id: &str,
    timeout: Duration,
) -> Result<Value, CliError> {
    let m = wait_tasks(client, &[task_id.to_string()], timeout, -1).await?;
    Ok(Value::Object(m))
}

/// Poll tasks until no key is 115 (or the timeout), drawing a progress bar on stderr when
/// it is a terminal and there is more than one key. Returns every key's result.
pub async fn wait_tasks(
    client: &Client,
    task_ids: &[String],
    timeout: Duration,
    op_type: i64,
) -> Result<serde_json::Map<String, Value>, CliError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(50);
    let tty = std::io::stderr().is_terminal();
    let mut drawn = false;
    loop {
        let mut all = serde_json::Map::new();
        for t in task_ids {
            let d = data(
                client
                    .call("get_proc_operate_result", &json!({ "task_id": t }))
                    .await?,
            )?;
            if let Value::Object(m) = d {
                all.extend(m);
            }
        }
        let total = all.len();
        let pending = all
            .values()
            .filter(|v| v["error_code"].as_i64() == Some(codes::RUNNING))
            .count();
        let failed = all
            .values()
            .filter(|v| {
                let c = v["error_code"].as_i64().unwrap_or(-1);
                c != codes::RUNNING && !code_ok(c, Some(op_type))
            })
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
pub fn code_ok(c: i64, op_type: Option<i64>) -> bool {
    c == codes::SUCCESS
        || (c == codes::PROC_RUNNING && op_type == Some(0))
        || (c == codes::PROC_NOT_RUNNING && matches!(op_type, Some(1) | Some(9) | Some(4)))
}

/// Exit code of a finished task: 0 when every key succeeded ([`code_ok`]).
pub fn task_exit(d: &Value, op_type: Option<i64>) -> u8 {
    let Some(m) = d.as_object() else {
        return exit::FAILED;
    };
    let mut code = exit::OK;
    for v in m.values() {
        let c = v["error_code"].as_i64().unwrap_or(-1);
        if !code_ok(c, op_type) {
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
async fn reload_config(client: &Client, json_out: bool, r: &ReloadArgs) -> Result<u8, CliError> {
    let env = client
        .call("reload", &json!({ "dry_run": r.dry_run }))
        .await?;
    if !env.result {
        let errors: Vec<String> = env
            .data
            .as_ref()
            .and_then(|d| d["errors"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if errors.is_empty() {
            return Err(api_error(&env));
        }
        if json_out {
            print_json(
                &json!({"result": false, "code": env.code, "message": env.message, "errors": errors}),
            );
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
    let d = env.data.unwrap_or(Value::Null);
    let task_id = d["task_id"].as_str().map(String::from);
    if !json_out {
        out(&render::reload_report(&d, render::color_enabled()));
    }
    let Some(task_id) = task_id.filter(|_| !r.op.no_wait) else {
        if json_out {
            print_json(&d);
        }
        return Ok(exit::OK);
    };
    // The restarts the reload started: wait for them like any batch.
    let results = wait_tasks(
        client,
        std::slice::from_ref(&task_id),
        Duration::from_secs(r.op.timeout),
        7,
    )
    .await?;
    let keys: Vec<ProcKey> = d["restart"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().and_then(|k| k.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    if json_out {
        let rows = batch_rows(&keys, &results, 7);
        let mut d = d;
        d["restart_results"] = json!(
            rows.iter()
                .map(|r| json!({
                    "process": r.process, "ok": r.ok, "code": r.code, "message": r.message,
                }))
                .collect::<Vec<_>>()
        );
        print_json(&d);
        return Ok(task_exit(&Value::Object(results), Some(7)));
    }
    report_batch(false, 7, &keys, &[task_id], &results)
}

async fn events(
    client: &Client,
    json_out: bool,
    follow: bool,
    process: Option<&str>,
    since: Option<&str>,
    limit: usize,
) -> Result<u8, CliError> {
    let mut path = format!("/v1/events?limit={limit}");
    if let Some(p) = process {
        parse_key(p)?;
        path.push_str(&format!("&key={}", url_encode(p)));
    }
    if let Some(s) = since {
        let d = humantime::parse_duration(s)
            .map_err(|e| CliError::new(exit::USAGE, format!("--since {s:?}: {e}")))?;
        let ms = crate::util::unix_millis() - d.as_millis() as i64;
        path.push_str(&format!("&since_ms={ms}"));
    }
    if follow {
        path.push_str("&follow=1");
        let mut open = true;
        let res = client
            .stream_lines(&path, |line| {
                let Ok(ev) = serde_json::from_slice::<Value>(line) else {
                    return true; // keep-alive
                };
                open = if json_out {
                    outln(&ev.to_string())
                } else {
                    outln(&render::event_line(&ev))
                };
                open
            })
            .await;
        return stream_end(res, open);
    }
    let d = data(client.get(&path).await?)?;
    if json_out {
        print_json(&d);
    } else {
        for ev in d["events"].as_array().cloned().unwrap_or_default() {
            if !outln(&render::event_line(&ev)) {
                break;
            }
        }
    }
    Ok(exit::OK)
}

/// Exit code when a followed stream ends: the reader left (0), or the agent closed it or
/// went away (69, said on stderr). Errors before the stream started keep their own code.
fn stream_end(res: Result<(), ClientError>, reader_open: bool) -> Result<u8, CliError> {
    match res {
        Ok(()) if !reader_open => Ok(exit::OK),
        Ok(()) => Err(CliError::new(
            exit::UNAVAILABLE,
            "the agent closed the stream",
        )),
        Err(ClientError::Http(e)) => Err(CliError::new(
            exit::UNAVAILABLE,
            format!("the agent closed the stream ({e})"),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn logs(
    client: &Client,
    json_out: bool,
    process: &str,
    follow: bool,
    lines: usize,
    source: &str,
) -> Result<u8, CliError> {
    parse_key(process)?;
    let path = format!(
        "/v1/logs?key={}&lines={lines}&source={source}{}",
        url_encode(process),
        if follow { "&follow=1" } else { "" }
    );
    let mut printer = render::LogPrinter::new(json_out);
    if follow {
        let mut open = true;
        let res = client
            .stream_lines(&path, |line| {
                let Ok(v) = serde_json::from_slice::<Value>(line) else {
                    return true; // keep-alive
                };
                open = printer.print(&v);
                open
            })
            .await;
        return stream_end(res, open);
    }
    let d = data(client.get(&path).await?)?;
    for v in d["lines"].as_array().cloned().unwrap_or_default() {
        if !printer.print(&v) {
            break;
        }
    }
    Ok(exit::OK)
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
        let mut m = serde_json::Map::new();
        m.insert(
            "0:127.0.0.1:d:a".into(),
            json!({"error_code": 0, "error_msg": "success"}),
        );
        m.insert(
            "0:127.0.0.1:d:b".into(),
            json!({"error_code": 836, "error_msg": "not running"}),
        );
        let rows = batch_rows(&keys, &m, 0);
        assert!(rows[0].ok && !rows[1].ok);
        assert_eq!(rows[1].code, 836);
        assert_eq!(task_exit(&Value::Object(m), Some(0)), exit::FAILED);
    }

    #[test]
    fn lsb_success_codes() {
        assert!(code_ok(828, Some(0)));
        assert!(!code_ok(828, Some(7)));
        assert!(code_ok(829, Some(1)) && code_ok(829, Some(9)) && code_ok(829, Some(4)));
        assert!(!code_ok(829, Some(0)));
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
