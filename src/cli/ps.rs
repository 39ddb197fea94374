//! `procagent ps`: GSEKit's process status list (the `process_status` API) as a table.

use clap::Args;
use serde_json::{Value, json};

use super::{CliError, data, exit, render};
use crate::api::client::Client;
use crate::api::gsekit::{MAX_PAGESIZE, split_expression};

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

/// The process_status request body for these filters (without page/pagesize).
pub fn request_body(a: &PsArgs) -> Result<Value, CliError> {
    let biz = if a.biz.trim() == "*" {
        json!("*")
    } else {
        json!(
            a.biz
                .trim()
                .parse::<i64>()
                .map_err(|_| usage(format!("--biz {:?}: expected a business id or *", a.biz)))?
        )
    };
    let mut body = json!({ "bk_biz_id": biz });
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
        let names = [
            "bk_set_name",
            "bk_module_name",
            "service_instance_name",
            "bk_process_name",
            "bk_process_id",
        ];
        let mut scope = json!({ "bk_set_env": a.env.clone().unwrap_or_else(|| "*".into()) });
        for (n, f) in names.iter().zip(fields) {
            scope[*n] = json!(f.unwrap_or_else(|| "*".into()));
        }
        body["expression_scope"] = scope;
    }
    if let Some(s) = &a.status {
        let code = match s.trim().to_ascii_lowercase().as_str() {
            "running" | "1" => 1,
            "stopped" | "terminated" | "2" => 2,
            "unregistered" | "0" => 0,
            other => {
                return Err(usage(format!(
                    "--status {other:?}: expected running, stopped or unregistered"
                )));
            }
        };
        body["process_status"] = json!(code);
    }
    if let Some(b) = a.auto {
        body["is_auto"] = json!(b);
    }
    if !a.searches.is_empty() {
        body["searches"] = json!(a.searches);
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
    body["pagesize"] = json!(a.pagesize);
    let mut list: Vec<Value> = Vec::new();
    let count;
    match a.page {
        Some(p) => {
            body["page"] = json!(p);
            let d = data(client.call("process_status", &body).await?)?;
            count = d["count"].as_u64().unwrap_or(0);
            list.extend(d["list"].as_array().cloned().unwrap_or_default());
        }
        None => {
            let mut page = 1u64;
            loop {
                body["page"] = json!(page);
                let d = data(client.call("process_status", &body).await?)?;
                let got = d["list"].as_array().cloned().unwrap_or_default();
                let total = d["count"].as_u64().unwrap_or(0);
                let empty = got.is_empty();
                list.extend(got);
                if empty || list.len() as u64 >= total {
                    count = total;
                    break;
                }
                page += 1;
            }
        }
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "count": count, "list": list }))
                .unwrap_or_default()
        );
    } else {
        print!("{}", table(&list));
        if a.page.is_some() && (list.len() as u64) < count {
            println!("({} of {count} processes on this page)", list.len());
        }
    }
    Ok(exit::OK)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The status table.
pub fn table(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let insts = p["proc_inst_infos"].as_array().cloned().unwrap_or_default();
            let running = insts
                .iter()
                .filter(|i| i["process_status"].as_i64() == Some(1))
                .count();
            let keys: Vec<String> = insts
                .iter()
                .map(|i| format!("{}/{}", text(&i["namespace"]), text(&i["name"])))
                .collect();
            vec![
                text(&p["bk_process_id"]),
                text(&p["bk_set_name"]),
                text(&p["bk_module_name"]),
                text(&p["bk_service_name"]),
                text(&p["bk_process_name"]),
                text(&p["bk_set_env"]),
                match p["process_status"].as_i64() {
                    Some(1) => "running".to_string(),
                    Some(2) => "stopped".to_string(),
                    _ => "unregistered".to_string(),
                },
                if p["is_auto"].as_bool() == Some(true) {
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
