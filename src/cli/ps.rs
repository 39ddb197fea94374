//! `procagent ps`: GSEKit's process status list (the `process_status` API) as a table.

use clap::Args;
use serde_json::Value;

use super::{CliError, exit, render};
use crate::api::client::{Client, decode_data};
use crate::api::gsekit::{ExprScopeWire, MAX_PAGESIZE, StatusReq, Text, split_expression};
use crate::proto::{
    FLAG_RUNNING, FLAG_STOPPED, FLAG_UNREGISTERED, ProcessStatusList, ProcessStatusRow,
};

/// Filters of `procagent ps`. Expressions follow GSEKit's grammar (`*`, `[a, b]`, `[1-9]`).
#[derive(Debug, Clone, Args)]
pub struct PsArgs {
    /// Business id, or * for every process whatever its business.
    #[arg(long, default_value = "*")]
    pub biz: String,
    /// Set environment: 1 testing, 2 experience, 3 formal, * any.
    #[arg(long)]
    pub env: Option<String>,
    /// Set name expression.
    #[arg(long)]
    pub set: Option<String>,
    /// Module name expression.
    #[arg(long)]
    pub module: Option<String>,
    /// Service instance name expression.
    #[arg(long)]
    pub service: Option<String>,
    /// Process name (alias) expression.
    #[arg(long)]
    pub process: Option<String>,
    /// Process id expression, or a slice such as [0:10].
    #[arg(long)]
    pub id: Option<String>,
    /// All five fields at once: SET<-GSEKIT->MODULE<-GSEKIT->SERVICE<-GSEKIT->PROCESS<-GSEKIT->ID
    /// (or dot-separated, the service name in the middle may hold dots).
    #[arg(long, conflicts_with_all = ["set", "module", "service", "process", "id"])]
    pub expr: Option<String>,
    /// Only processes in this state: running, stopped (or 1, 2).
    #[arg(long)]
    pub status: Option<String>,
    /// Only managed (true) or unmanaged (false) processes.
    #[arg(long)]
    pub auto: Option<bool>,
    /// Fuzzy search on the inner IP and cloud area name (repeatable; all must match).
    #[arg(long = "search")]
    pub searches: Vec<String>,
    /// Show only this page (1-based) instead of every page.
    #[arg(long)]
    pub page: Option<u64>,
    /// Rows per request (1 to 1000).
    #[arg(long, default_value_t = MAX_PAGESIZE as u64)]
    pub pagesize: u64,
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::new(exit::USAGE, msg)
}

/// The process_status request for these filters (without page/pagesize).
pub fn request_body(a: &PsArgs) -> Result<StatusReq, CliError> {
    let biz = if a.biz.trim() == "*" {
        Value::from("*")
    } else {
        Value::from(
            a.biz
                .trim()
                .parse::<i64>()
                .map_err(|_| usage(format!("--biz {:?}: expected a business id or *", a.biz)))?,
        )
    };
    let mut body = StatusReq {
        bk_biz_id: Some(biz),
        ..StatusReq::default()
    };
    let fields: [Option<String>; 5] = match &a.expr {
        Some(e) => split_expression(e)
            .map_err(|m| usage(format!("--expr: {m}")))?
            .map(Some),
        None => [
            a.set.clone(),
            a.module.clone(),
            a.service.clone(),
            a.process.clone(),
            a.id.clone(),
        ],
    };
    if a.env.is_some() || fields.iter().any(Option::is_some) {
        let [set, module, service, process, id] =
            fields.map(|f| Some(f.unwrap_or_else(|| "*".into())));
        body.expression_scope = Some(ExprScopeWire {
            bk_set_env: Some(Value::from(a.env.clone().unwrap_or_else(|| "*".into()))),
            bk_set_name: set,
            bk_module_name: module,
            service_instance_name: service,
            bk_process_name: process,
            bk_process_id: id,
        });
    }
    if let Some(s) = &a.status {
        let code = match s.trim().to_ascii_lowercase().as_str() {
            "running" | "1" => FLAG_RUNNING,
            "stopped" | "terminated" | "2" => FLAG_STOPPED,
            "unregistered" | "0" => FLAG_UNREGISTERED,
            other => {
                return Err(usage(format!(
                    "--status {other:?}: expected running, stopped or unregistered"
                )));
            }
        };
        body.process_status = Some(code);
    }
    body.is_auto = a.auto;
    if !a.searches.is_empty() {
        body.searches = Some(a.searches.iter().cloned().map(Text).collect());
    }
    Ok(body)
}

/// Run `procagent ps`.
pub async fn ps(client: &Client, json_out: bool, a: &PsArgs) -> Result<u8, CliError> {
    if !(1..=MAX_PAGESIZE as u64).contains(&a.pagesize) {
        return Err(usage(format!(
            "--pagesize must be between 1 and {MAX_PAGESIZE}"
        )));
    }
    let mut body = request_body(a)?;
    body.pagesize = Some(a.pagesize as i64);
    // Rows as the agent wrote them (printed by --json), each also read as its type.
    let mut list: Vec<Value> = Vec::new();
    let count;
    match a.page {
        Some(p) => {
            body.page = Some(p as i64);
            let d: ProcessStatusList<Value> = client.call_typed("process_status", &body).await?;
            count = d.count;
            list.extend(d.list);
        }
        None => {
            let mut page = 1i64;
            loop {
                body.page = Some(page);
                let d: ProcessStatusList<Value> =
                    client.call_typed("process_status", &body).await?;
                let total = d.count;
                let empty = d.list.is_empty();
                list.extend(d.list);
                if empty || list.len() >= total {
                    count = total;
                    break;
                }
                page += 1;
            }
        }
    }
    if json_out {
        let out = ProcessStatusList { count, list };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(&out).unwrap_or_default())
                .unwrap_or_default()
        );
    } else {
        let rows: Vec<ProcessStatusRow> = list
            .into_iter()
            .map(|v| decode_data("process_status", v))
            .collect::<Result<_, _>>()?;
        print!("{}", table(&rows));
        if a.page.is_some() && rows.len() < count {
            println!("({} of {count} processes on this page)", rows.len());
        }
    }
    Ok(exit::OK)
}

fn status_name(status: i64) -> &'static str {
    match status {
        FLAG_RUNNING => "running",
        FLAG_STOPPED => "stopped",
        _ => "unregistered",
    }
}

/// The status table.
pub fn table(list: &[ProcessStatusRow]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let insts = &p.proc_inst_infos;
            let running = insts
                .iter()
                .filter(|i| i.process_status == FLAG_RUNNING)
                .count();
            let keys: Vec<String> = insts
                .iter()
                .map(|i| format!("{}/{}", i.namespace, i.name))
                .collect();
            vec![
                p.bk_process_id.to_string(),
                p.bk_set_name.clone(),
                p.bk_module_name.clone(),
                p.bk_service_name.clone(),
                p.bk_process_name.clone(),
                p.bk_set_env.clone(),
                status_name(p.process_status).to_string(),
                if p.is_auto {
                    "yes".to_string()
                } else {
                    "no".to_string()
                },
                format!("{running}/{}", insts.len()),
                keys.join(","),
            ]
        })
        .collect();
    let paint = |col: usize, cell: &str| -> Option<&'static str> {
        match (col, cell) {
            (6, "running") => Some("32"),
            (6, _) => Some("31"),
            _ => None,
        }
    };
    render::table(
        &[
            "ID", "SET", "MODULE", "SERVICE", "PROCESS", "ENV", "STATUS", "MANAGED", "INST", "KEYS",
        ],
        &rows,
        if render::color_enabled() {
            Some(&paint)
        } else {
            None
        },
    )
}
