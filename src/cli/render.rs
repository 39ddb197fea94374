//! Rendering for the CLI: aligned tables (wide characters counted as two columns), colour
//! only on a terminal (and never with NO_COLOR), one-line events.

use std::io::IsTerminal;

use serde_json::Value;

use crate::spec::ProcKey;

/// Colour when stdout is a terminal and NO_COLOR is unset.
pub fn color_enabled() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Columns a string takes on a terminal: East Asian wide characters count two.
pub fn display_width(s: &str) -> usize {
    s.chars()
        .map(|c| {
            let u = c as u32;
            if c.is_control() {
                0
            } else if (0x1100..=0x115F).contains(&u)
                || (0x2E80..=0xA4CF).contains(&u)
                || (0xAC00..=0xD7A3).contains(&u)
                || (0xF900..=0xFAFF).contains(&u)
                || (0xFE30..=0xFE4F).contains(&u)
                || (0xFF00..=0xFF60).contains(&u)
                || (0xFFE0..=0xFFE6).contains(&u)
                || (0x1F300..=0x1FAFF).contains(&u)
                || (0x20000..=0x3FFFD).contains(&u)
            {
                2
            } else {
                1
            }
        })
        .sum()
}

/// Chooses an ANSI colour code for a (column, cell).
pub type Painter<'a> = &'a dyn Fn(usize, &str) -> Option<&'static str>;

/// An aligned table. `paint` maps (column, cell) to an ANSI colour code when colour is on.
pub fn table(headers: &[&str], rows: &[Vec<String>], paint: Option<Painter<'_>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| display_width(h)).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(display_width(c));
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<(String, Option<&'static str>)>, out: &mut String| {
        let n = cells.len();
        for (i, (c, color)) in cells.into_iter().enumerate() {
            let pad = widths[i].saturating_sub(display_width(&c));
            match color {
                Some(code) => out.push_str(&format!("\x1b[{code}m{c}\x1b[0m")),
                None => out.push_str(&c),
            }
            if i + 1 < n {
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    };
    line(
        headers
            .iter()
            .map(|h| (h.to_string(), paint.map(|_| "1")))
            .collect(),
        &mut out,
    );
    for r in rows {
        line(
            r.iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), paint.and_then(|p| p(i, c))))
                .collect(),
            &mut out,
        );
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn dur(secs: i64) -> String {
    if secs < 0 {
        return String::new();
    }
    let (d, h, m, sec) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    }
}

/// The `status` table.
pub fn status_table(list: &[Value], color: bool) -> String {
    let headers = [
        "PROCESS", "STATE", "PID", "MANAGED", "RESTARTS", "UPTIME", "CPU%", "MEM%", "MESSAGE",
    ];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let pids: Vec<String> = p["pids"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            vec![
                format!("{}/{}", s(&p["namespace"]), s(&p["name"])),
                s(&p["state"]),
                if pids.is_empty() {
                    "-".into()
                } else {
                    pids.join(",")
                },
                if p["managed"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                s(&p["restarts"]),
                p["uptime_secs"]
                    .as_i64()
                    .map(dur)
                    .unwrap_or_else(|| "-".into()),
                format!("{:.1}", p["cpu_usage"].as_f64().unwrap_or(0.0)),
                format!("{:.1}", p["mem_usage"].as_f64().unwrap_or(0.0)),
                {
                    let m = s(&p["message"]);
                    if m == s(&p["state"]) {
                        String::new()
                    } else {
                        m.chars().take(80).collect()
                    }
                },
            ]
        })
        .collect();
    let paint = |col: usize, cell: &str| -> Option<&'static str> {
        if col != 1 {
            return None;
        }
        match cell {
            "running" => Some("32"),
            "backoff" | "exited" => Some("31"),
            "starting" | "stopping" => Some("33"),
            _ => None,
        }
    };
    if color {
        table(&headers, &rows, Some(&paint))
    } else {
        table(&headers, &rows, None)
    }
}

/// A task's keyed results.
pub fn task_table(d: &Value) -> String {
    let rows: Vec<Vec<String>> = d
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    vec![
                        k.clone(),
                        s(&v["error_code"]),
                        s(&v["error_msg"]).chars().take(200).collect(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["KEY", "CODE", "MESSAGE"], &rows, None)
}

/// Recent tasks.
pub fn tasks_table(d: &Value) -> String {
    let rows: Vec<Vec<String>> = d["list"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    let items = t["items"].as_array().cloned().unwrap_or_default();
                    let codes: Vec<String> = items
                        .iter()
                        .map(|i| s(&i["result"]["error_code"]))
                        .collect();
                    vec![
                        s(&t["task_id"]),
                        s(&t["api"]),
                        s(&t["op_type"]),
                        s(&t["peer_uid"]),
                        s(&t["username"]),
                        items.len().to_string(),
                        codes.join(","),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["TASK", "API", "OP", "UID", "USER", "ITEMS", "CODES"],
        &rows,
        None,
    )
}

/// A JSON object as `key: value` lines.
pub fn kv(d: &Value) -> String {
    let mut out = String::new();
    if let Some(m) = d.as_object() {
        for (k, v) in m {
            match v {
                Value::Object(inner) => {
                    for (k2, v2) in inner {
                        out.push_str(&format!("{k}.{k2}: {}\n", s(v2)));
                    }
                }
                _ => out.push_str(&format!("{k}: {}\n", s(v))),
            }
        }
    }
    out
}

/// What an operation did, for humans.
pub fn op_summary(key: &ProcKey, op_type: i64, task_id: &str, d: &Value) -> String {
    let name = crate::proto::OpType::from_code(op_type)
        .map(|o| o.name())
        .unwrap_or("operation");
    let mut out = String::new();
    if let Some(m) = d.as_object() {
        for v in m.values() {
            let code = v["error_code"].as_i64().unwrap_or(-1);
            let msg = s(&v["error_msg"]);
            if code == 0 {
                out.push_str(&format!("{key}: {name} ok ({msg})\n"));
            } else {
                out.push_str(&format!("{key}: {name} failed with {code}: {msg}\n"));
            }
        }
    }
    out.push_str(&format!("task {task_id}\n"));
    out
}

/// One event as a line.
pub fn event_line(ev: &Value) -> String {
    let ms = ev["ts_ms"].as_i64().unwrap_or(0);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    let key = s(&ev["key"]);
    format!(
        "{} {:<14} {} {}",
        humantime::format_rfc3339_millis(t),
        s(&ev["kind"]),
        if key.is_empty() { "-".into() } else { key },
        s(&ev["message"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths() {
        assert_eq!(display_width("abc"), 3);
        assert_eq!(display_width("管控平台"), 8);
        let t = table(
            &["A", "B"],
            &[
                vec!["管控".into(), "x".into()],
                vec!["ab".into(), "y".into()],
            ],
            None,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            display_width(lines[1].split('x').next().unwrap()),
            display_width(lines[2].split('y').next().unwrap())
        );
    }
}
