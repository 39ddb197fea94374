//! Rendering for the CLI: aligned tables (wide characters counted as two columns), colour
//! only on a terminal (and never with NO_COLOR), one-line events.

use std::io::IsTerminal;

use serde_json::Value;

use crate::api::reload::ReloadReport;
use crate::proto::{Event, Health, LogLine, OpType, ProcDetail, TaskList, TaskResults, TaskView};
use crate::spec::ProcKey;

/// Colour when stdout is a terminal and NO_COLOR is unset.
pub fn color_enabled() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The width of stdout when it is a terminal (None for pipes and files: scripts get whole
/// lines).
pub fn term_width() -> Option<usize> {
    term_width_of(&std::io::stdout())
}

/// The width of a terminal (None when `fd` is not one).
pub fn term_width_of(fd: &impl std::os::fd::AsFd) -> Option<usize> {
    if !rustix::termios::isatty(fd) {
        return None;
    }
    match rustix::termios::tcgetwinsize(fd) {
        Ok(w) if w.ws_col > 0 => Some(usize::from(w.ws_col)),
        _ => std::env::var("COLUMNS").ok()?.parse().ok(),
    }
}

/// Cut every line of `text` to `width` columns (ANSI colour sequences take none), marking
/// a cut with `…`. `None` leaves the text as it is.
pub fn fit(text: &str, width: Option<usize>) -> String {
    let Some(width) = width.filter(|w| *w > 1) else {
        return text.to_string();
    };
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        if display_width(&strip_ansi(body)) <= width {
            out.push_str(line);
            continue;
        }
        let mut used = 0;
        let mut in_esc = false;
        for c in body.chars() {
            if in_esc {
                out.push(c);
                in_esc = c != 'm';
                continue;
            }
            if c == '\x1b' {
                in_esc = true;
                out.push(c);
                continue;
            }
            let w = display_width(c.encode_utf8(&mut [0; 4]));
            if used + w > width - 1 {
                break;
            }
            used += w;
            out.push(c);
        }
        out.push('…');
        if body.contains('\x1b') {
            out.push_str("\x1b[0m");
        }
        out.push_str(nl);
    }
    out
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_esc = false;
    for c in s.chars() {
        if in_esc {
            in_esc = c != 'm';
        } else if c == '\x1b' {
            in_esc = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// A progress bar line: `[#####.....] 12/40 done, 2 failed`, fitted to `width`.
pub fn progress_line(done: usize, failed: usize, total: usize, width: usize) -> String {
    let text = format!(" {done}/{total} done, {failed} failed");
    let bar = width.saturating_sub(text.len() + 3).min(40);
    let filled = (bar * done).checked_div(total).unwrap_or(0);
    format!("[{}{}]{text}", "#".repeat(filled), ".".repeat(bar - filled))
}

/// The summary table of a batch operation.
pub fn batch_table(rows: &[super::BatchRow], color: bool) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.process.clone(),
                if r.ok { "ok".into() } else { "failed".into() },
                r.code.to_string(),
                r.said
                    .clone()
                    .unwrap_or_else(|| r.message.replace('\n', " ").chars().take(300).collect()),
            ]
        })
        .collect();
    let paint = |col: usize, cell: &str| -> Option<&'static str> {
        match (col, cell) {
            (1, "ok") => Some("32"),
            (1, "failed") => Some("31"),
            _ => None,
        }
    };
    let headers = ["PROCESS", "RESULT", "CODE", "MESSAGE"];
    if color {
        table(&headers, &cells, Some(&paint))
    } else {
        table(&headers, &cells, None)
    }
}

fn short_json(v: &Value) -> String {
    let t = match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    if t.chars().count() > 120 {
        let mut c: String = t.chars().take(117).collect();
        c.push_str("...");
        c
    } else {
        t
    }
}

/// A config reload's report for humans.
pub fn reload_report(d: &ReloadReport, color: bool) -> String {
    let c = |code: &str, t: String| {
        if color {
            format!("\x1b[{code}m{t}\x1b[0m")
        } else {
            t
        }
    };
    let diff = &d.diff;
    let dry = d.dry_run;
    let mut out = format!(
        "{}: {} to add, {} to change, {} to remove, {} to restart, {} unchanged{}\n",
        d.file,
        diff.added.len(),
        diff.changed.len(),
        diff.removed.len(),
        diff.restart.len(),
        diff.unchanged,
        if dry {
            " (dry run: nothing applied)"
        } else {
            " (applied)"
        }
    );
    for k in &diff.added {
        out.push_str(&c("32", format!("+ {k}")));
        out.push('\n');
    }
    for ch in &diff.changed {
        out.push_str(&c("33", format!("~ {}", ch.key)));
        out.push('\n');
        for f in &ch.fields {
            out.push_str(&format!(
                "    {}: {} -> {}\n",
                f.field,
                short_json(&f.old),
                short_json(&f.new)
            ));
        }
    }
    for k in &diff.removed {
        out.push_str(&c(
            "31",
            format!("- {k} (no longer declared; left as it is, unwatched)"),
        ));
        out.push('\n');
    }
    for k in &diff.restart {
        out.push_str(&format!(
            "restart {k} (running; a change needs a restart){}\n",
            if dry { "" } else { ": restarting" }
        ));
    }
    let rr = &d.restart_required;
    if !rr.is_empty() {
        out.push_str(&format!(
            "changed outside [[process]], takes effect only when procagentd restarts: {}\n",
            rr.join(", ")
        ));
    }
    out
}

/// Prints log line objects: the text of each line, a `==> file <==` header when the file
/// changes (as tail does for several files), notices on stderr; or (with `--json`) each
/// object as the agent wrote it, one JSON line each.
pub struct LogPrinter {
    json: bool,
    last_file: Option<String>,
}

impl LogPrinter {
    pub fn new(json: bool) -> LogPrinter {
        LogPrinter {
            json,
            last_file: None,
        }
    }

    /// Print one object as the agent wrote it (`raw`); false when stdout is gone. An
    /// object that is not a log line is skipped in the human form.
    pub fn print(&mut self, raw: &Value) -> bool {
        use std::io::Write;
        if self.json {
            let mut o = std::io::stdout().lock();
            return writeln!(o, "{raw}").and_then(|_| o.flush()).is_ok();
        }
        match serde_json::from_value::<LogLine>(raw.clone()) {
            Ok(l) => self.print_line(&l),
            Err(_) => true,
        }
    }

    /// Print one line (or its notice, on stderr) for humans; false when stdout is gone.
    pub fn print_line(&mut self, v: &LogLine) -> bool {
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        let file = v.file.clone();
        if let Some(n) = &v.notice {
            eprintln!("procagent: {} ({}): {n}", file, v.source);
            return true;
        }
        let mut text = String::new();
        if self.last_file.as_deref() != Some(file.as_str()) {
            if self.last_file.is_some() {
                text.push('\n');
            }
            text.push_str(&format!("==> {file} <==\n"));
            self.last_file = Some(file);
        }
        text.push_str(v.line.as_deref().unwrap_or(""));
        text.push('\n');
        o.write_all(text.as_bytes()).and_then(|_| o.flush()).is_ok()
    }
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

/// The LAST EXIT cell of a process that is not running: how it ended and how long ago
/// (`exit 3, 5m ago`, `SIGKILL, 2s ago`); `-` while it runs or before any exit.
fn last_exit_cell(p: &ProcDetail, now: i64) -> String {
    match &p.last_exit_brief {
        Some(how) if p.pids.is_empty() => {
            if p.last_exit_time > 0 {
                format!("{how}, {} ago", dur((now - p.last_exit_time).max(0)))
            } else {
                how.clone()
            }
        }
        _ => "-".into(),
    }
}

/// The MESSAGE cell: a process in backoff says it is a crash loop (failures in a row, when the
/// next attempt comes, the last exit) before why.
fn status_message(p: &ProcDetail) -> String {
    let why = if p.message == p.state {
        ""
    } else {
        p.message.as_str()
    };
    if p.state == "waiting" {
        // A periodic job between runs: when the next one comes, and how the last one ended.
        let mut m = String::from("waiting for its next run");
        if let Some(at) = p.next_run_at {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(at.max(0) as u64);
            m.push_str(&format!(" at {}", humantime::format_rfc3339_seconds(t)));
        }
        if let Some(s) = p.next_run_in {
            m.push_str(&format!(" (in {})", dur(s.ceil() as i64)));
        }
        if let Some(x) = &p.last_exit {
            m.push_str(&format!(", last run {x}"));
        }
        return m.chars().take(160).collect();
    }
    if p.state != "backoff" {
        return why.chars().take(80).collect();
    }
    let mut m = format!("failure {} in a row", p.consecutive_failures);
    if let Some(s) = p.next_restart_in {
        m.push_str(&format!(", next attempt in {s:.1}s"));
    }
    if let Some(x) = &p.last_exit {
        m.push_str(&format!(", last exit {x}"));
    }
    if !why.is_empty() {
        m.push_str("; ");
        m.push_str(why);
    }
    m.chars().take(160).collect()
}

/// The `status` table.
pub fn status_table(list: &[ProcDetail], color: bool) -> String {
    let headers = [
        "PROCESS",
        "STATE",
        "PID",
        "MANAGED",
        "RESTARTS",
        "UPTIME",
        "CPU%",
        "RSS",
        "LAST EXIT",
        "MESSAGE",
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let pids: Vec<String> = p.pids.iter().map(i64::to_string).collect();
            vec![
                format!("{}/{}", p.namespace, p.name),
                p.state.clone(),
                if pids.is_empty() {
                    "-".into()
                } else {
                    pids.join(",")
                },
                if p.managed { "yes".into() } else { "no".into() },
                p.restarts.to_string(),
                p.uptime_secs.map(dur).unwrap_or_else(|| "-".into()),
                format!("{:.1}", p.cpu_usage),
                if p.pids.is_empty() {
                    "-".into()
                } else {
                    super::top::human_bytes(p.rss_bytes as f64)
                },
                last_exit_cell(p, now),
                status_message(p),
            ]
        })
        .collect();
    let paint = |col: usize, cell: &str| -> Option<&'static str> {
        if col != 1 {
            return None;
        }
        match cell {
            "running" => Some("32"),
            "backoff" | "exited" | "fatal" => Some("31"),
            "starting" | "stopping" => Some("33"),
            "waiting" => Some("36"),
            _ => None,
        }
    };
    if color {
        table(&headers, &rows, Some(&paint))
    } else {
        table(&headers, &rows, None)
    }
}

/// A task's keyed results; `record` is the task as `tasks` lists it (for what each item
/// did to its definition), when the agent gave it.
pub fn task_table(d: &TaskResults, record: Option<&TaskView>) -> String {
    let changes: std::collections::HashMap<&str, &str> = record
        .into_iter()
        .flat_map(|t| t.items.iter())
        .filter_map(|i| Some((i.key.as_str(), i.definition.as_deref()?)))
        .collect();
    let rows: Vec<Vec<String>> = d
        .iter()
        .map(|(k, v)| {
            vec![
                k.clone(),
                v.error_code.to_string(),
                changes
                    .get(k.as_str())
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                v.error_msg.chars().take(200).collect(),
            ]
        })
        .collect();
    table(&["KEY", "CODE", "DEFINITION", "MESSAGE"], &rows, None)
}

/// Recent tasks.
pub fn tasks_table(d: &TaskList) -> String {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let rows: Vec<Vec<String>> = d
        .list
        .iter()
        .map(|t| {
            let codes: Vec<String> = t
                .items
                .iter()
                .map(|i| i.result.error_code.to_string())
                .collect();
            // What the items did to definitions, each distinct change once.
            let mut changes: Vec<&str> = Vec::new();
            for c in t.items.iter().filter_map(|i| i.definition.as_deref()) {
                if !changes.contains(&c) {
                    changes.push(c);
                }
            }
            vec![
                t.task_id.clone(),
                t.api.clone(),
                t.op_type.to_string(),
                opt(t.peer_uid.map(|u| u.to_string())),
                t.username.clone(),
                t.items.len().to_string(),
                codes.join(","),
                if changes.is_empty() {
                    "-".to_string()
                } else {
                    changes.join("; ")
                },
            ]
        })
        .collect();
    table(
        &[
            "TASK",
            "API",
            "OP",
            "UID",
            "USER",
            "ITEMS",
            "CODES",
            "DEFINITION",
        ],
        &rows,
        None,
    )
}

/// The agent's health as `key: value` lines (nested objects as `key.inner: value`), in
/// the order of its JSON object.
pub fn health_kv(h: &Health) -> String {
    kv(&serde_json::to_value(h).unwrap_or(Value::Null))
}

/// A JSON object as `key: value` lines.
fn kv(d: &Value) -> String {
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
pub fn op_summary(key: &ProcKey, op: OpType, task_id: &str, d: &TaskResults) -> String {
    let name = op.name();
    let mut out = String::new();
    for v in d.values() {
        let code = v.error_code;
        let msg = &v.error_msg;
        if let Some(said) = already(code, Some(op), msg) {
            out.push_str(&format!("{key}: {said}\n"));
        } else if code == 0 {
            out.push_str(&format!("{key}: {name} ok ({msg})\n"));
        } else {
            out.push_str(&format!("{key}: {name} failed with {code}: {msg}\n"));
        }
    }
    out.push_str(&format!("task {task_id}\n"));
    out
}

/// The words for "already in the state asked for" (828 to a start, 829 to a stop, kill or
/// unmanage): an answer, not a failure (see [`super::code_ok`]).
pub fn already(code: i64, op: Option<OpType>, msg: &str) -> Option<String> {
    if code == 0 || !super::code_ok(code, op) {
        return None;
    }
    if code == crate::proto::codes::PROC_RUNNING {
        // "process is already running (pid 12, 13); ...": keep the pids.
        let pids = msg
            .split_once("(pid ")
            .and_then(|(_, r)| r.split_once(')'))
            .map(|(p, _)| format!(" (pid {p})"))
            .unwrap_or_default();
        return Some(format!("already running{pids}"));
    }
    Some("not running".to_string())
}

/// One event as a line.
pub fn event_line(ev: &Event) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ev.ts_ms.max(0) as u64);
    format!(
        "{} {:<14} {} {}",
        humantime::format_rfc3339_millis(t),
        ev.kind,
        if ev.key.is_empty() { "-" } else { &ev.key },
        ev.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_cuts_to_the_width_ignoring_colour() {
        assert_eq!(fit("abcdef\nab\n", Some(4)), "abc…\nab\n");
        assert_eq!(fit("abcdef\n", None), "abcdef\n");
        assert_eq!(fit("管控平台\n", Some(5)), "管控…\n");
        let coloured = "\x1b[32mrunning\x1b[0m tail";
        assert_eq!(fit(coloured, Some(20)), coloured);
        let cut = fit(coloured, Some(5));
        assert_eq!(strip_ansi(&cut), "runn…");
        assert!(cut.ends_with("\x1b[0m"));
    }

    #[test]
    fn progress_bar() {
        let l = progress_line(5, 1, 10, 43);
        // One column is left free so the cursor never wraps.
        assert_eq!(l, "[##########..........] 5/10 done, 1 failed");
        assert_eq!(l.len(), 42);
        assert!(progress_line(0, 0, 0, 10).contains("0/0"));
    }

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
