//! The operator CLI, `procagent`: status tables, operations that wait for their task, task
//! results, events. It speaks the same socket API as every other caller.
//!
//! Exit codes follow LSB init-script conventions: 0 success; 1 generic failure; 2 invalid
//! arguments; 3 (status) not running; 4 insufficient privilege; 5 not registered; 69 the
//! agent is unreachable.

pub mod render;
pub mod top;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::api::client::{Client, ClientError};
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
    pub const UNAVAILABLE: u8 = 69;
}

/// procagent: operate and inspect the processes procagentd supervises.
#[derive(Debug, Parser)]
#[command(name = "procagent", version, about, long_about = None)]
pub struct Cli {
    /// The agent's socket (default: $PROCAGENT_SOCKET, else the config's agent.socket,
    /// else /run/procagent/procagent.sock).
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

/// Options of operations that wait.
#[derive(Debug, Clone, Args)]
pub struct OpArgs {
    /// The process, as NAMESPACE/NAME.
    pub process: String,
    /// Return the task id at once instead of waiting for the result.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show processes (all, or one NAMESPACE/NAME).
    Status {
        process: Option<String>,
        /// Only processes with this label (KEY=VALUE), repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Start a process (and manage it).
    Start(OpArgs),
    /// Stop a process (and stop managing it).
    Stop(OpArgs),
    /// Restart a process with its restart_cmd.
    Restart(OpArgs),
    /// Run a process's reload_cmd.
    Reload(OpArgs),
    /// Kill a process (kill_cmd, else SIGKILL to its process group).
    Kill(OpArgs),
    /// Manage (托管) a process: keep it running.
    Manage(OpArgs),
    /// Stop managing a process, leaving it as it is.
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
        let code = match e {
            ClientError::Connect { .. } => exit::UNAVAILABLE,
            _ => exit::FAILED,
        };
        CliError::new(code, e.to_string())
    }
}

/// Resolve the socket path from the flags, environment and config.
pub fn socket_path(cli: &Cli) -> Result<PathBuf, CliError> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &cli.config {
        let cfg = crate::config::load(c).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
        return Ok(cfg.socket);
    }
    Ok(PathBuf::from("/run/procagent/procagent.sock"))
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
    let client = Client::new(socket_path(cli)?);
    match &cli.command {
        Command::Status { process, labels } => {
            status(&client, cli.json, process.as_deref(), labels).await
        }
        Command::Start(a) => operate(&client, cli.json, a, 0).await,
        Command::Stop(a) => operate(&client, cli.json, a, 1).await,
        Command::Manage(a) => operate(&client, cli.json, a, 3).await,
        Command::Unmanage(a) => operate(&client, cli.json, a, 4).await,
        Command::Restart(a) => operate(&client, cli.json, a, 7).await,
        Command::Reload(a) => operate(&client, cli.json, a, 8).await,
        Command::Kill(a) => operate(&client, cli.json, a, 9).await,
        Command::Task { task_id } => {
            let d = data(
                client
                    .call("get_proc_operate_result", &json!({ "task_id": task_id }))
                    .await?,
            )?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
            } else {
                print!("{}", render::task_table(&d));
            }
            Ok(task_exit(&d, None))
        }
        Command::Tasks { limit } => {
            let d = data(client.call("tasks", &json!({ "limit": limit })).await?)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
            } else {
                print!("{}", render::tasks_table(&d));
            }
            Ok(exit::OK)
        }
        Command::Health => {
            let d = data(client.get("/v1/healthz").await?)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
            } else {
                print!("{}", render::kv(&d));
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
                cli.json,
                *follow,
                process.as_deref(),
                since.as_deref(),
                *limit,
            )
            .await
        }
    }
}

async fn status(
    client: &Client,
    json_out: bool,
    process: Option<&str>,
    labels: &[String],
) -> Result<u8, CliError> {
    let mut q = json!({ "labels": labels });
    if let Some(p) = process {
        let k = parse_key(p)?;
        q["namespace"] = json!(k.namespace);
        q["name"] = json!(k.name);
    }
    let d = data(client.call("procs", &q).await?)?;
    let list = d["list"].as_array().cloned().unwrap_or_default();
    if json_out {
        println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
    } else {
        print!("{}", render::status_table(&list, render::color_enabled()));
    }
    if process.is_some() {
        if list.is_empty() {
            return Err(CliError::new(
                exit::NOT_REGISTERED,
                format!("{} is not registered", process.unwrap_or("")),
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
    let key = parse_key(&a.process)?;
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
            println!("{}", json!({ "task_id": task_id }));
        } else {
            println!("{task_id}");
        }
        return Ok(exit::OK);
    }
    let d = wait_task(client, &task_id, Duration::from_secs(a.timeout)).await?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"task_id": task_id, "result": d}))
                .unwrap_or_default()
        );
    } else {
        print!("{}", render::op_summary(&key, op_type, &task_id, &d));
    }
    Ok(task_exit(&d, Some(op_type)))
}

/// Poll a task until no key is 115 (or the timeout).
pub async fn wait_task(
    client: &Client,
    task_id: &str,
    timeout: Duration,
) -> Result<Value, CliError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        let d = data(
            client
                .call("get_proc_operate_result", &json!({ "task_id": task_id }))
                .await?,
        )?;
        let pending = d.as_object().is_some_and(|m| {
            m.values()
                .any(|v| v["error_code"].as_i64() == Some(codes::RUNNING))
        });
        if !pending {
            return Ok(d);
        }
        if start.elapsed() >= timeout {
            return Err(CliError::new(
                exit::FAILED,
                format!(
                    "task {task_id} still running after {}s; check it later with `procagent task {task_id}`",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Exit code of a finished task: 0 when every key succeeded (828 for start and 829 for stop
/// count as success, as in LSB).
pub fn task_exit(d: &Value, op_type: Option<i64>) -> u8 {
    let Some(m) = d.as_object() else {
        return exit::FAILED;
    };
    let mut code = exit::OK;
    for v in m.values() {
        let c = v["error_code"].as_i64().unwrap_or(-1);
        let ok = c == codes::SUCCESS
            || (c == codes::PROC_RUNNING && op_type == Some(0))
            || (c == codes::PROC_NOT_RUNNING && matches!(op_type, Some(1) | Some(9) | Some(4)));
        if !ok {
            code = match c {
                codes::NOT_REGISTERED => exit::NOT_REGISTERED,
                codes::FORBIDDEN => exit::FORBIDDEN,
                _ => exit::FAILED,
            };
        }
    }
    code
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
        client
            .stream_lines(&path, |line| {
                if let Ok(ev) = serde_json::from_slice::<Value>(line) {
                    if json_out {
                        println!("{ev}");
                    } else {
                        println!("{}", render::event_line(&ev));
                    }
                }
                true
            })
            .await?;
        return Ok(exit::OK);
    }
    let d = data(client.get(&path).await?)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
    } else {
        for ev in d["events"].as_array().cloned().unwrap_or_default() {
            println!("{}", render::event_line(&ev));
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
