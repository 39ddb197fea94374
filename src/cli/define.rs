//! `procagent add` and `procagent remove`: registering a process from flags or from a file
//! holding the keys of one `[[process]]` table, and unregistering processes, without
//! hand-written JSON. The file and the flags are read by the config loader's own
//! `[[process]]` reader ([`crate::config::process_from_table`]), so keys, defaults, checks and
//! error messages are the config file's; what the API cannot carry (`env`, `autostart`, ...)
//! is refused, as are keys declared in the agent's config files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use super::{CliError, exit, my_host, operate_one, outln, parse_key, print_json};
use crate::api::client::Client;
use crate::proto::{
    KeyResult, Meta, MetaHostsReq, OpType, ProcDetail, ProcList, ProcsQuery, RegisterReq, SpecWire,
};
use crate::spec::ProcKey;

/// `procagent add`.
#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    /// The process, as NAMESPACE/NAME.
    #[arg(value_name = "PROCESS")]
    pub process: String,
    /// A TOML file with the keys of one `[[process]]` table (as in the config file; its
    /// relative paths are the file's). Flags given as well override its keys.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The command that starts it (start_cmd), run by `sh -c` in setup_path.
    #[arg(long, value_name = "CMD")]
    pub start_cmd: Option<String>,
    /// stop_cmd (without one, stop sends SIGTERM to the process group).
    #[arg(long, value_name = "CMD")]
    pub stop_cmd: Option<String>,
    /// restart_cmd (without one, restart is a stop then a start).
    #[arg(long, value_name = "CMD")]
    pub restart_cmd: Option<String>,
    /// reload_cmd.
    #[arg(long, value_name = "CMD")]
    pub reload_cmd: Option<String>,
    /// kill_cmd (without one, kill sends SIGKILL to the process group).
    #[arg(long, value_name = "CMD")]
    pub kill_cmd: Option<String>,
    /// health_cmd: exits 0 while the process is healthy.
    #[arg(long, value_name = "CMD")]
    pub health_cmd: Option<String>,
    /// version_cmd: prints the program's version.
    #[arg(long, value_name = "CMD")]
    pub version_cmd: Option<String>,
    /// The pid file the program writes (pid_path); without one, the process is the start
    /// command's own (it should `exec` the program).
    #[arg(long = "pid-file", value_name = "PATH")]
    pub pid_file: Option<String>,
    /// Working directory of its commands (setup_path; default: the current directory).
    #[arg(long, value_name = "DIR")]
    pub setup_path: Option<String>,
    /// The program's name, by which its process is recognised (proc_name; default: the
    /// file name of the program start_cmd runs, else NAME).
    #[arg(long, value_name = "NAME")]
    pub proc_name: Option<String>,
    /// The account its commands run as (default: the agent's own).
    #[arg(long, visible_alias = "user", value_name = "ACCOUNT")]
    pub account: Option<String>,
    /// resident (kept running), periodic (run every --cycle-time seconds) or single-run.
    #[arg(long = "type", value_name = "TYPE", value_parser = ["resident", "periodic", "single-run"])]
    pub kind: Option<String>,
    /// Seconds between the runs of a periodic process (cycle_time).
    #[arg(long, value_name = "SECS")]
    pub cycle_time: Option<i64>,
    /// Seconds a start is watched before it counts as a success (start_check_secs).
    #[arg(long, value_name = "SECS")]
    pub start_check_secs: Option<i64>,
    /// Seconds any one command may take (op_timeout).
    #[arg(long, value_name = "SECS")]
    pub op_timeout: Option<i64>,
    /// Failures in a row after which the agent gives up restarting it (max_restarts).
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<i64>,
    /// Its log file or directory (log_path), shown by `procagent logs`.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<String>,
    /// A label (KEY=VALUE); repeatable.
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Start it (and manage it) once registered.
    #[arg(long)]
    pub start: bool,
    /// With --start: give up waiting for the start after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// `procagent remove`.
#[derive(Debug, Clone, Args)]
pub struct RemoveArgs {
    /// The processes: NAMESPACE/NAME, several, globs, or a unique bare NAME.
    #[arg(value_name = "PROCESS", required = true,
          add = clap_complete::engine::ArgValueCompleter::new(super::complete::process_names))]
    pub process: Vec<String>,
    /// Stop each process first (else it is left running, no longer watched).
    #[arg(long)]
    pub stop: bool,
    /// With --stop: give up waiting for the stop after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// Keys of a `[[process]]` table that only a config file can set: the API has no field for
/// them (or, for `autostart`, the command line says it with `--start`).
const CONFIG_ONLY: [(&str, &str); 5] = [
    (
        "env",
        "only a config file can set it (the API does not carry environments)",
    ),
    (
        "autostart",
        "only a config file can set it; give --start to start it now",
    ),
    (
        "contact",
        "only a config file can set it (the API does not carry it)",
    ),
    (
        "func_id",
        "only a config file can set it (the API does not carry it)",
    ),
    (
        "instance_id",
        "only a config file can set it (the API does not carry it)",
    ),
];

/// The file name of the program `cmd` runs: its first word after `exec`, `env`, `nohup`
/// and `VAR=value` assignments (`exec ./bin/web --port 80` is `web`).
fn program_of(cmd: &str) -> Option<String> {
    cmd.split_whitespace()
        .find(|w| !matches!(*w, "exec" | "env" | "nohup") && !w.contains('='))
        .and_then(|w| Path::new(w).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n.chars().all(|c| !matches!(c, ';' | '&' | '|' | '$')))
}

/// The `[[process]]` table `add` registers: the file's keys, then the flags over them.
/// `cwd` resolves the flags' relative paths (the file's are the file's).
fn table_of(
    a: &AddArgs,
    key: &ProcKey,
    cwd: &Path,
) -> Result<(toml::Table, String, PathBuf), CliError> {
    let usage = |m: String| CliError::new(exit::USAGE, m);
    let (mut t, fname, base) = match &a.file {
        None => (
            toml::Table::new(),
            "procagent add".to_string(),
            cwd.to_path_buf(),
        ),
        Some(f) => {
            let path = cwd.join(f);
            let fname = path.display().to_string();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| usage(format!("{fname}: cannot read: {e}")))?;
            let mut t: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                usage(format!("{fname}: {}", e.to_string().trim()))
            })?;
            // A file holding one [[process]] table, as in a conf_dir, is taken as well.
            if let Some(toml::Value::Array(list)) = t.get("process")
                && t.len() == 1
            {
                match list.as_slice() {
                    [toml::Value::Table(one)] => t = one.clone(),
                    _ => {
                        return Err(usage(format!(
                            "{fname}: process: holds {} tables; add registers one",
                            list.len()
                        )));
                    }
                }
            }
            let base = path.parent().unwrap_or(cwd).to_path_buf();
            (t, fname, base)
        }
    };
    let mut errs = Vec::new();
    for (field, want) in [("namespace", &key.namespace), ("name", &key.name)] {
        match t.get(field).and_then(|v| v.as_str()) {
            Some(v) if v != want.as_str() => errs.push(format!(
                "{fname}: {field}: {v:?} is not the process named on the command line ({key})"
            )),
            _ => {}
        }
    }
    for (field, why) in CONFIG_ONLY {
        if t.contains_key(field) {
            errs.push(format!("{fname}: {field}: {why}"));
        }
    }
    if !errs.is_empty() {
        return Err(usage(format!(
            "invalid definition:\n  {}",
            errs.join("\n  ")
        )));
    }
    let s = |v: &str| toml::Value::String(v.to_string());
    t.insert("namespace".into(), s(&key.namespace));
    t.insert("name".into(), s(&key.name));
    let abs = |p: &str| cwd.join(p).display().to_string();
    let texts = [
        ("start_cmd", a.start_cmd.clone()),
        ("stop_cmd", a.stop_cmd.clone()),
        ("restart_cmd", a.restart_cmd.clone()),
        ("reload_cmd", a.reload_cmd.clone()),
        ("kill_cmd", a.kill_cmd.clone()),
        ("health_cmd", a.health_cmd.clone()),
        ("version_cmd", a.version_cmd.clone()),
        ("pid_path", a.pid_file.as_deref().map(abs)),
        ("setup_path", a.setup_path.as_deref().map(abs)),
        ("log_path", a.log_path.as_deref().map(abs)),
        ("proc_name", a.proc_name.clone()),
        ("account", a.account.clone()),
        ("auto_type", a.kind.clone()),
    ];
    for (field, v) in texts {
        if let Some(v) = v {
            if field == "account" {
                t.remove("user");
            }
            t.insert(field.into(), s(&v));
        }
    }
    let ints = [
        ("cycle_time", a.cycle_time),
        ("start_check_secs", a.start_check_secs),
        ("op_timeout", a.op_timeout),
        ("max_restarts", a.max_restarts),
    ];
    for (field, v) in ints {
        if let Some(v) = v {
            t.insert(field.into(), toml::Value::Integer(v));
        }
    }
    if !a.labels.is_empty() {
        let mut labels = match t.remove("labels") {
            Some(toml::Value::Table(l)) => l,
            _ => toml::Table::new(),
        };
        for l in &a.labels {
            let Some((k, v)) = l.split_once('=') else {
                return Err(usage(format!("--label {l:?}: expected KEY=VALUE")));
            };
            labels.insert(k.to_string(), s(v));
        }
        t.insert("labels".into(), toml::Value::Table(labels));
    }
    if !t.contains_key("setup_path") {
        t.insert("setup_path".into(), s(&cwd.display().to_string()));
    }
    if !t.contains_key("proc_name") {
        let cmd = t.get("start_cmd").and_then(|v| v.as_str()).unwrap_or("");
        let name = program_of(cmd).unwrap_or_else(|| key.name.clone());
        t.insert("proc_name".into(), s(&name));
    }
    Ok((t, fname, base))
}

/// The entry of `key` in the agent's registry, if any (its source says who declared it).
async fn registered(client: &Client, key: &ProcKey) -> Result<Option<ProcDetail>, CliError> {
    let q = ProcsQuery {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        brief: true,
        ..ProcsQuery::default()
    };
    let list: ProcList<ProcDetail> = client.call_typed("procs", &q).await?;
    Ok(list
        .list
        .into_iter()
        .find(|p| p.namespace == key.namespace && p.name == key.name))
}

/// A config file that declares a process, from its listed source (`config:FILE`).
fn config_file_of(p: &ProcDetail) -> Option<&str> {
    p.source.strip_prefix("config:")
}

/// The one result a keyed answer holds (one host asked).
fn only_result(data: BTreeMap<String, KeyResult>) -> Result<KeyResult, CliError> {
    data.into_values()
        .next()
        .ok_or_else(|| CliError::new(exit::FAILED, "the agent answered no result"))
}

/// `procagent add`: register the process, and start it with --start.
pub async fn add(client: &Client, json_out: bool, a: &AddArgs) -> Result<u8, CliError> {
    let key = parse_key(&a.process)?;
    if a.process.contains(['*', '?', '[']) {
        return Err(CliError::new(
            exit::USAGE,
            format!("{}: add names one process, without globs", a.process),
        ));
    }
    let cwd = std::env::current_dir().map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let (table, fname, base) = table_of(a, &key, &cwd)?;
    let read = crate::config::process_from_table(&fname, &table, &base);
    let mut errs = match &read {
        Ok(_) => Vec::new(),
        Err(e) => e.0.clone(),
    };
    if !table.contains_key("start_cmd") {
        errs.push(format!("{fname}: start_cmd: is required (--start-cmd CMD)"));
    }
    let p = match read {
        Ok(p) if errs.is_empty() => p,
        _ => {
            return Err(CliError::new(
                exit::USAGE,
                format!("invalid definition:\n  {}", errs.join("\n  ")),
            ));
        }
    };
    if let Some(old) = registered(client, &key).await? {
        let msg = match config_file_of(&old) {
            Some(file) => format!(
                "{key} is declared in the config file {file}; change it there and run `procagent config apply`"
            ),
            None => format!(
                "{key} is already registered; `procagent remove {key}` first to register it anew"
            ),
        };
        return Err(CliError::new(exit::FAILED, msg));
    }
    let def = p.definition;
    let req = RegisterReq {
        meta: Meta {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            labels: def.labels.clone(),
        },
        hosts: vec![my_host(client).await?],
        agent_id_list: Vec::new(),
        spec: SpecWire::from_spec(&def.spec),
    };
    let data: BTreeMap<String, KeyResult> = client.call_typed("register_proc_info", &req).await?;
    let r = only_result(data)?;
    if r.error_code != 0 {
        return Err(CliError::new(
            exit::FAILED,
            format!("{key}: not registered: {}", r.error_msg),
        ));
    }
    if json_out && !a.start {
        #[derive(Serialize)]
        struct Added<'a> {
            registered: String,
            spec: &'a crate::spec::ProcSpec,
        }
        print_json(&Added {
            registered: key.to_string(),
            spec: &def.spec,
        });
    } else if !json_out {
        outln(&format!("{key}: registered"));
    }
    if !a.start {
        return Ok(exit::OK);
    }
    operate_one(client, json_out, &key, OpType::Start, false, a.timeout).await
}

/// `procagent remove`: stop (with --stop) and unregister each process named.
pub async fn remove(client: &Client, json_out: bool, a: &RemoveArgs) -> Result<u8, CliError> {
    let keys = super::resolve_names(client, &a.process).await?;
    let mut failed = false;
    #[derive(Serialize)]
    struct Removed {
        process: String,
        removed: bool,
        message: String,
    }
    let mut report = Vec::new();
    for key in &keys {
        let Some(entry) = registered(client, key).await? else {
            continue;
        };
        if let Some(file) = config_file_of(&entry) {
            failed = true;
            report.push(Removed {
                process: key.to_string(),
                removed: false,
                message: format!(
                    "declared in the config file {file}; remove it there and run `procagent config apply`"
                ),
            });
            continue;
        }
        if a.stop {
            let code = operate_one(client, json_out, key, OpType::Stop, false, a.timeout).await?;
            if code != exit::OK {
                failed = true;
                report.push(Removed {
                    process: key.to_string(),
                    removed: false,
                    message: "not removed: it did not stop".into(),
                });
                continue;
            }
        }
        let running: Vec<String> = match registered(client, key).await? {
            Some(e) => e.pids.iter().map(|p| p.to_string()).collect(),
            None => Vec::new(),
        };
        let req = MetaHostsReq {
            meta: Meta {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                labels: Default::default(),
            },
            hosts: vec![my_host(client).await?],
            agent_id_list: Vec::new(),
        };
        let data: BTreeMap<String, KeyResult> =
            client.call_typed("unregister_proc_info", &req).await?;
        let r = only_result(data)?;
        let (removed, message) = if r.error_code != 0 {
            failed = true;
            (false, format!("not removed: {}", r.error_msg))
        } else if running.is_empty() {
            (true, "removed".to_string())
        } else {
            (
                true,
                format!(
                    "removed; its process (pid {}) is left running, no longer watched",
                    running.join(", ")
                ),
            )
        };
        report.push(Removed {
            process: key.to_string(),
            removed,
            message,
        });
    }
    if json_out {
        print_json(&report);
    } else {
        for r in &report {
            let line = format!("{}: {}", r.process, r.message);
            if r.removed {
                outln(&line);
            } else {
                eprintln!("procagent: {line}");
            }
        }
    }
    Ok(if failed { exit::FAILED } else { exit::OK })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_a_start_command_runs() {
        for (cmd, want) in [
            ("exec ./bin/web --port 80", Some("web")),
            ("PORT=80 exec /usr/bin/python3 app.py", Some("python3")),
            ("nohup ./worker &", Some("worker")),
            ("", None),
            ("$HOME/bin/run", Some("run")),
            ("$PROG --fast", None),
        ] {
            assert_eq!(program_of(cmd).as_deref(), want, "{cmd}");
        }
    }
}
