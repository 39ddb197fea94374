//! Rendering for the CLI: aligned tables (wide characters counted as two columns), colour
//! only on a terminal (and never with NO_COLOR), one-line events.

use std::io::IsTerminal;

use serde_json::Value;

use crate::api::reload::ReloadReport;
use crate::proto::{Event, Health, LogLine, OpType, StatusRow, TaskList, TaskResults, TaskView};
use crate::spec::ProcKey;

/// Colour when stdout is a terminal and NO_COLOR is unset.
pub fn color_enabled() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The width of stdout when it is a terminal (None for pipes and files: scripts get whole
/// lines).
pub fn term_width() -> Option<usize> {
    if WIDE.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    term_width_of(&std::io::stdout())
}

/// `--wide`: nothing is fitted to the terminal (every column, every message whole).
static WIDE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set by `--wide`.
pub fn set_wide(wide: bool) {
    WIDE.store(wide, std::sync::atomic::Ordering::Relaxed);
}

/// `text` cut to `width` columns at a word boundary when one is near (else within the word),
/// marked with `…`; whole when it fits.
pub fn cut_words(text: &str, width: usize) -> String {
    if display_width(text) <= width {
        return text.to_string();
    }
    let mut used = 0;
    let mut end = 0;
    let mut last_space = None;
    for (i, c) in text.char_indices() {
        let w = display_width(c.encode_utf8(&mut [0; 4]));
        if used + w > width.saturating_sub(1) {
            break;
        }
        if c == ' ' {
            last_space = Some(i);
        }
        used += w;
        end = i + c.len_utf8();
    }
    let end = match last_space {
        Some(sp) if display_width(&text[..sp]) * 2 >= width => sp,
        _ => end,
    };
    format!("{}…", text[..end].trim_end())
}

/// Columns a shortened column keeps before other columns are dropped instead.
const MIN_SHRUNK: usize = 24;

/// Fit a table to `width` columns (`None`: leave it whole): while it would not fit even with
/// column `shrink` shortened to [`MIN_SHRUNK`], drop the columns of `drop_order` (indices
/// into `headers`, the least useful first); then shorten `shrink` (at word boundaries) to
/// the room left. Returns the original index of
/// every column kept, with the headers and rows kept.
pub fn fit_table(
    headers: &[&str],
    rows: &[Vec<String>],
    width: Option<usize>,
    drop_order: &[usize],
    shrink: usize,
) -> (Vec<usize>, Vec<String>, Vec<Vec<String>>) {
    // Measured as they will be shown (see `table`).
    let rows: Vec<Vec<std::borrow::Cow<'_, str>>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable_cow(c)).collect())
        .collect();
    let rows = &rows;
    let n = headers.len();
    let col_width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .map(|c| display_width(c))
            .chain(std::iter::once(display_width(headers[i])))
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..n).map(col_width).collect();
    let total = |kept: &[usize]| {
        kept.iter().map(|i| widths[*i]).sum::<usize>() + 2 * kept.len().saturating_sub(1)
    };
    let mut kept: Vec<usize> = (0..n).collect();
    let mut shrink_to = None;
    if let Some(w) = width {
        // What the shortened column can give up: all but MIN_SHRUNK columns of it.
        let slack = |kept: &[usize]| {
            if kept.contains(&shrink) {
                widths[shrink].saturating_sub(MIN_SHRUNK.max(display_width(headers[shrink])))
            } else {
                0
            }
        };
        for d in drop_order {
            if total(&kept).saturating_sub(slack(&kept)) <= w {
                break;
            }
            kept.retain(|i| i != d);
        }
        let over = total(&kept).saturating_sub(w);
        if over > 0 && kept.contains(&shrink) {
            shrink_to = Some(
                widths[shrink]
                    .saturating_sub(over)
                    .max(display_width(headers[shrink])),
            );
        }
    }
    let cell = |i: usize, c: &str| match shrink_to {
        Some(w) if i == shrink => cut_words(c, w),
        _ => c.to_string(),
    };
    let h = kept.iter().map(|i| headers[*i].to_string()).collect();
    let r = rows
        .iter()
        .map(|row| {
            kept.iter()
                .map(|i| cell(*i, row.get(*i).map_or("", |c| c.as_ref())))
                .collect()
        })
        .collect();
    (kept, h, r)
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
        let shown = if body.contains('\x1b') {
            display_width(&strip_ansi(body))
        } else {
            display_width(body)
        };
        if shown <= width {
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

/// Prints log line objects. For one process: the text of each line, a `==> file <==` header
/// when the file changes (as tail does for several files). For several: each line prefixed
/// with its process (`demo/web | `, coloured on a terminal), no headers. Captured output
/// lines start with the time the agent read them (`HH:MM:SS`, UTC) and stderr's are marked
/// `err`. Notices go to stderr. With `--json`, each object as the agent wrote it, one JSON
/// line each (with a `process` field when there are several).
pub struct LogPrinter {
    json: bool,
    /// The processes' names, when lines are prefixed with them.
    labels: Option<Vec<String>>,
    width: usize,
    colour: bool,
    last_file: Option<String>,
}

/// Colours of process prefixes, in turn.
const PREFIX_COLOURS: [&str; 6] = ["36", "33", "35", "32", "34", "96"];

impl LogPrinter {
    pub fn new(json: bool, labels: Option<&[String]>) -> LogPrinter {
        let width = labels
            .map(|l| l.iter().map(|s| display_width(s)).max().unwrap_or(0))
            .unwrap_or(0);
        LogPrinter {
            json,
            labels: labels.map(<[String]>::to_vec),
            width,
            colour: color_enabled(),
            last_file: None,
        }
    }

    /// Print one object of process `idx` as the agent wrote it (`raw`); false when stdout
    /// is gone. An object that is not a log line is skipped in the human form.
    pub fn print(&mut self, idx: usize, raw: &Value) -> bool {
        use std::io::Write;
        if self.json {
            let mut raw = raw.clone();
            if let (Some(labels), Some(o)) = (&self.labels, raw.as_object_mut()) {
                let name = labels.get(idx).cloned().unwrap_or_default();
                o.insert("process".into(), Value::String(name));
            }
            let mut o = std::io::stdout().lock();
            return writeln!(o, "{raw}").and_then(|_| o.flush()).is_ok();
        }
        match serde_json::from_value::<LogLine>(raw.clone()) {
            Ok(l) => self.print_line(idx, &l),
            Err(_) => true,
        }
    }

    /// Print one line (or its notice, on stderr) for humans; false when stdout is gone.
    pub fn print_line(&mut self, idx: usize, v: &LogLine) -> bool {
        use std::io::Write;
        let label = self.labels.as_ref().and_then(|l| l.get(idx)).cloned();
        if let Some(n) = &v.notice {
            match &label {
                Some(p) => eprintln!("procagent: {p}: {} ({}): {n}", v.file, v.source),
                None => eprintln!("procagent: {} ({}): {n}", v.file, v.source),
            }
            return true;
        }
        let mut text = String::new();
        match &label {
            Some(p) => {
                let pad = " ".repeat(self.width.saturating_sub(display_width(p)));
                if self.colour {
                    let c = PREFIX_COLOURS[idx % PREFIX_COLOURS.len()];
                    text.push_str(&format!("\x1b[{c}m{p}\x1b[0m{pad} | "));
                } else {
                    text.push_str(&format!("{p}{pad} | "));
                }
            }
            None => {
                if self.last_file.as_deref() != Some(v.file.as_str()) {
                    if self.last_file.is_some() {
                        text.push('\n');
                    }
                    text.push_str(&format!("==> {} <==\n", v.file));
                    self.last_file = Some(v.file.clone());
                }
            }
        }
        text.push_str(&self.stamp(v));
        text.push_str(v.line.as_deref().unwrap_or(""));
        text.push('\n');
        let mut o = std::io::stdout().lock();
        o.write_all(text.as_bytes()).and_then(|_| o.flush()).is_ok()
    }

    /// `HH:MM:SS ` (the capture time) and the stderr mark of a captured line; empty for a
    /// log_path line.
    fn stamp(&self, v: &LogLine) -> String {
        let Some(t) = v.time.as_deref() else {
            return String::new();
        };
        let hms = t.get(11..19).unwrap_or(t);
        match v.stream.as_deref() {
            Some("err") if self.colour => format!("{hms} \x1b[31merr\x1b[0m "),
            Some("err") => format!("{hms} err "),
            _ => format!("{hms}     "),
        }
    }
}

/// Columns a string takes on a terminal: East Asian wide characters count two.
pub fn display_width(s: &str) -> usize {
    // Printable ASCII (nearly every cell): one column a byte.
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return s.len();
    }
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

/// `s` with its control characters shown rather than obeyed: caret notation for the C0
/// controls and DEL (`^[` for ESC, `^M` for CR), `?` for the C1 controls. Messages, events
/// and caller names come from managed processes' output and callers' own fields: on an
/// operator's terminal an escape sequence among them would retitle the window, move the
/// cursor over other lines or write the clipboard.
pub fn printable(s: &str) -> String {
    printable_cow(s).into_owned()
}

/// [`printable`], borrowing `s` when it has nothing to show differently (the common case:
/// a table of a thousand rows then copies none of its cells).
pub fn printable_cow(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c as u32 {
            0..=0x1f | 0x7f => {
                out.push('^');
                out.push(char::from((c as u8) ^ 0x40));
            }
            0x80..=0x9f => out.push('?'),
            _ => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Chooses an ANSI colour code for a (column, cell).
pub type Painter<'a> = &'a dyn Fn(usize, &str) -> Option<&'static str>;

/// An aligned table. `paint` maps (column, cell) to an ANSI colour code when colour is on.
/// Cells are shown [`printable`].
pub fn table(headers: &[&str], rows: &[Vec<String>], paint: Option<Painter<'_>>) -> String {
    // Each cell as shown and its width, measured once.
    let rows: Vec<Vec<(std::borrow::Cow<'_, str>, usize)>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| {
                    let c = printable_cow(c);
                    let w = display_width(&c);
                    (c, w)
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| display_width(h)).collect();
    for r in &rows {
        for (i, (_, w)) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(*w);
            }
        }
    }
    let line_len = widths.iter().sum::<usize>() + 2 * widths.len() + 1;
    let mut out = String::with_capacity(line_len * (rows.len() + 1));
    // One cell of a line of `n`, then the padding to the next column.
    let cell = |out: &mut String, i: usize, n: usize, c: &str, w: usize, color: Option<&str>| {
        match color {
            Some(code) => {
                out.push_str("\x1b[");
                out.push_str(code);
                out.push('m');
                out.push_str(c);
                out.push_str("\x1b[0m");
            }
            None => out.push_str(c),
        }
        if i + 1 < n {
            let pad = widths.get(i).map_or(0, |wi| wi.saturating_sub(w)) + 2;
            out.extend(std::iter::repeat_n(' ', pad));
        }
    };
    for (i, h) in headers.iter().enumerate() {
        cell(
            &mut out,
            i,
            headers.len(),
            h,
            display_width(h),
            paint.map(|_| "1"),
        );
    }
    out.push('\n');
    for r in &rows {
        for (i, (c, w)) in r.iter().enumerate() {
            cell(&mut out, i, r.len(), c, *w, paint.and_then(|p| p(i, c)));
        }
        out.push('\n');
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
fn last_exit_cell(p: &StatusRow<'_>, now: i64) -> String {
    match &p.last_exit_brief {
        Some(how) if p.pids.is_empty() => {
            if p.last_exit_time > 0 {
                format!("{how}, {} ago", dur((now - p.last_exit_time).max(0)))
            } else {
                how.to_string()
            }
        }
        _ => "-".into(),
    }
}

/// The MESSAGE cell: a process in backoff says it is a crash loop (failures in a row, when the
/// next attempt comes, the last exit) before why.
fn status_message(p: &StatusRow<'_>) -> String {
    let why = if p.message == p.state {
        ""
    } else {
        &*p.message
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
        return m;
    }
    if p.state != "backoff" {
        return why.to_string();
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
    m
}

/// The `status` table, fitted to `width` columns (a terminal's; `None`: whole).
pub fn status_table(list: &[StatusRow<'_>], color: bool, width: Option<usize>) -> String {
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
                p.state.to_string(),
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
    // Narrow terminals: MANAGED, CPU%, RESTARTS, LAST EXIT, UPTIME, RSS, PID go first (in
    // that order), then MESSAGE is shortened; rows never wrap.
    // Without a width there is nothing to fit: every column, every cell as it is (no copy
    // of a thousand rows).
    let (kept, headers, rows) = match width {
        Some(_) => fit_table(&headers, &rows, width, &[3, 6, 4, 8, 5, 7, 2], 9),
        None => (
            (0..headers.len()).collect(),
            headers.iter().map(|h| h.to_string()).collect(),
            rows,
        ),
    };
    let h: Vec<&str> = headers.iter().map(String::as_str).collect();
    let paint = |col: usize, cell: &str| -> Option<&'static str> {
        if kept.get(col) != Some(&1) {
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
        table(&h, &rows, Some(&paint))
    } else {
        table(&h, &rows, None)
    }
}

/// NAMESPACE/NAME of a result key (`cloud:supplier:ip:ns:name`, `agent_id:ns:name`, ...: the
/// last two parts), or the key itself when it has no such parts.
pub fn key_process(key: &str) -> String {
    let mut parts = key.rsplitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some(_)) => format!("{ns}/{name}"),
        _ => key.to_string(),
    }
}

/// What a task did, in words: the operation's name (`restart`), or the API's for tasks that
/// are not operations (`register`, `config apply`).
pub fn task_op(api: &str, op_type: i64) -> String {
    match (api, OpType::from_code(op_type)) {
        (a, Some(op)) if a.starts_with("operate_proc") => op.name().to_string(),
        ("register_proc_info", _) => "register".into(),
        ("update_proc_info", _) => "update".into(),
        ("unregister_proc_info", _) => "unregister".into(),
        ("reload", _) => "config apply".into(),
        (a, _) => a.to_string(),
    }
}

/// Who asked for a task: the account of the connecting process (by name when it resolves),
/// and the caller's own user name (`bk_username`) when it sent one.
pub fn task_caller(t: &TaskView) -> String {
    let account = t.peer_uid.map(|uid| {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| format!("uid {uid}"))
    });
    let user = printable(&t.username);
    match (account, user.is_empty()) {
        (Some(a), true) => a,
        (Some(a), false) => format!("{a} ({user})"),
        (None, false) => user,
        (None, true) => "-".into(),
    }
}

/// One item's result in words: `ok`, `already running`, `running` (not finished), or
/// `failed (CODE)`.
fn item_result(code: i64, op: Option<OpType>, msg: &str) -> String {
    if code == crate::proto::codes::RUNNING {
        return "running".into();
    }
    if let Some(said) = already(code, op, msg) {
        return said;
    }
    if code == 0 {
        "ok".into()
    } else {
        format!("failed ({code})")
    }
}

/// A task's results, one row per process: what happened and the agent's message, whole
/// (never cut: `fit` shortens rows to a terminal's width, never a pipe's). `record` is the
/// task as `tasks` lists it (who asked, when, what it did to definitions), when the agent
/// gave it.
pub fn task_table(d: &TaskResults, record: Option<&TaskView>, width: Option<usize>) -> String {
    let op = record.and_then(|t| OpType::from_code(t.op_type));
    let changes: std::collections::HashMap<&str, &str> = record
        .into_iter()
        .flat_map(|t| t.items.iter())
        .filter_map(|i| Some((i.key.as_str(), i.definition.as_deref()?)))
        .collect();
    let mut out = String::new();
    if let Some(t) = record {
        out.push_str(&format!(
            "{}: {} by {} at {}\n",
            t.task_id,
            task_op(&t.api, t.op_type),
            task_caller(t),
            time_of(t.created_ms),
        ));
    }
    let rows: Vec<Vec<String>> = d
        .iter()
        .map(|(k, v)| {
            let mut msg = v.error_msg.clone();
            if let Some(c) = changes.get(k.as_str()) {
                msg = format!("{msg} [{c}]");
            }
            vec![
                key_process(k),
                item_result(v.error_code, op, &v.error_msg),
                msg,
            ]
        })
        .collect();
    let (_, h, rows) = fit_table(&["PROCESS", "RESULT", "MESSAGE"], &rows, width, &[], 2);
    let h: Vec<&str> = h.iter().map(String::as_str).collect();
    out.push_str(&table(&h, &rows, None));
    out
}

/// A time in milliseconds since the epoch, as RFC 3339 UTC seconds.
fn time_of(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Recent tasks: when, what, who asked, for which processes, and how it went; fitted to
/// `width` (TIME, then CALLER dropped; RESULT shortened).
pub fn tasks_table(d: &TaskList, width: Option<usize>) -> String {
    let rows: Vec<Vec<String>> = d
        .list
        .iter()
        .map(|t| {
            let op = OpType::from_code(t.op_type);
            let mut procs: Vec<String> = Vec::new();
            for i in &t.items {
                let p = key_process(&i.key);
                if !procs.contains(&p) {
                    procs.push(p);
                }
            }
            let shown = match procs.len() {
                0 => "-".to_string(),
                1 | 2 => procs.join(", "),
                n => format!("{}, {} +{} more", procs[0], procs[1], n - 2),
            };
            let (mut ok, mut failed, mut running) = (0, 0, 0);
            for i in &t.items {
                match item_result(i.result.error_code, op, &i.result.error_msg).as_str() {
                    "running" => running += 1,
                    r if r.starts_with("failed") => failed += 1,
                    _ => ok += 1,
                }
            }
            let result = match (ok, failed, running) {
                (_, 0, 0) => "ok".to_string(),
                (0, f, 0) => {
                    let codes: Vec<String> = t
                        .items
                        .iter()
                        .map(|i| i.result.error_code.to_string())
                        .collect();
                    if f == 1 {
                        format!("failed ({})", codes.join(","))
                    } else {
                        format!("{f} failed")
                    }
                }
                (o, f, 0) => format!("{o} ok, {f} failed"),
                (o, f, r) => format!("running ({o} ok, {f} failed, {r} to go)"),
            };
            // What the items did to definitions, each distinct change once.
            let mut changes: Vec<&str> = Vec::new();
            for c in t.items.iter().filter_map(|i| i.definition.as_deref()) {
                if !changes.contains(&c) {
                    changes.push(c);
                }
            }
            let result = if changes.is_empty() {
                result
            } else {
                format!("{result}; {}", changes.join("; "))
            };
            vec![
                t.task_id.clone(),
                time_of(t.created_ms),
                task_op(&t.api, t.op_type),
                task_caller(t),
                shown,
                result,
            ]
        })
        .collect();
    let (_, h, rows) = fit_table(
        &["TASK", "TIME", "OP", "CALLER", "PROCESSES", "RESULT"],
        &rows,
        width,
        &[1, 3],
        5,
    );
    let h: Vec<&str> = h.iter().map(String::as_str).collect();
    table(&h, &rows, None)
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
        let msg = &printable(&v.error_msg);
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

/// Column widths of event lines: the kind's and the process's.
#[derive(Debug, Clone, Copy)]
pub struct EventColumns {
    pub kind: usize,
    pub key: usize,
}

impl EventColumns {
    /// Widths for a stream whose events are not known ahead (`events -f`): room for every
    /// kind the agent emits but the rarest, and for `key` (when one process is followed) or
    /// a typical NAMESPACE/NAME.
    pub fn streaming(key: Option<&str>) -> EventColumns {
        EventColumns {
            kind: 19,
            key: key.map(display_width).unwrap_or(24),
        }
    }

    /// Widths that fit every event of `events`.
    pub fn fitting(events: &[Event]) -> EventColumns {
        let kind = events.iter().map(|e| e.kind.len()).max().unwrap_or(0);
        let key = events
            .iter()
            .map(|e| display_width(if e.key.is_empty() { "-" } else { &e.key }))
            .max()
            .unwrap_or(1);
        EventColumns { kind, key }
    }
}

/// One event as a line: time, kind, process (`-` for the agent's own), message, in aligned
/// columns.
pub fn event_line(ev: &Event, cols: &EventColumns) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ev.ts_ms.max(0) as u64);
    let key = printable(if ev.key.is_empty() { "-" } else { &ev.key });
    let pad = " ".repeat(cols.key.saturating_sub(display_width(&key)));
    format!(
        "{} {:<kw$} {key}{pad} {}",
        humantime::format_rfc3339_millis(t),
        printable(&ev.kind),
        printable(&ev.message),
        kw = cols.kind,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_at_words_and_tables_fitted_by_dropping_columns() {
        assert_eq!(
            cut_words("start check failed: exited", 40),
            "start check failed: exited"
        );
        assert_eq!(
            cut_words("start check failed: exited 3", 16),
            "start check…"
        );
        assert_eq!(cut_words("averyveryverylongword", 8), "averyve…");
        let headers = ["NAME", "A", "B", "MESSAGE"];
        let rows = vec![vec![
            "demo/web".to_string(),
            "aaaa".to_string(),
            "bbbb".to_string(),
            "the process exited with code 3".to_string(),
        ]];
        // Whole: nothing dropped.
        let (kept, h, r) = fit_table(&headers, &rows, None, &[2, 1], 3);
        assert_eq!(
            (kept, h.len(), r[0][3].as_str()),
            (vec![0, 1, 2, 3], 4, "the process exited with code 3")
        );
        // 40 columns: B goes, then the message is cut at a word.
        let (kept, _, r) = fit_table(&headers, &rows, Some(40), &[2, 1], 3);
        assert_eq!(kept, vec![0, 1, 3]);
        let line = table(&["NAME", "A", "MESSAGE"], &r, None);
        assert!(line.lines().all(|l| display_width(l) <= 40), "{line}");
        assert!(
            r[0][2].ends_with('…') && !r[0][2].ends_with(" …"),
            "{:?}",
            r[0][2]
        );
    }

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

    /// Security: a managed account's start/health output lands in a process's message and
    /// an event's message verbatim; `status` and `events` show its control characters
    /// (OSC title/clipboard writes, cursor moves, carriage returns that overwrite the line)
    /// instead of sending them to the operator's terminal.
    #[test]
    fn security_managed_output_reaches_the_terminal_without_its_control_characters() {
        let evil = "start check failed; output: \x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\rok";
        let p = crate::proto::ProcDetail {
            namespace: "a".into(),
            name: "esc".into(),
            state: "stopped".into(),
            message: evil.into(),
            ..crate::proto::ProcDetail::default()
        };
        // As the CLI reads it: the entry's wire form, its escapes decoded.
        let wire = serde_json::to_string(&p).unwrap();
        let row: StatusRow<'_> = serde_json::from_str(&wire).unwrap();
        assert_eq!(row.message, evil);
        let t = status_table(&[row], false, None);
        assert!(
            !t.chars().any(|c| c.is_control() && c != '\n'),
            "status table carries control characters: {t:?}"
        );
        let ev = Event {
            id: 1,
            ts_ms: 0,
            key: "a/esc".into(),
            kind: "start_failed".into(),
            message: evil.into(),
            data: serde_json::Value::Null,
        };
        let line = event_line(&ev, &EventColumns::streaming(None));
        assert!(
            !line.chars().any(|c| c.is_control()),
            "event line carries control characters: {line:?}"
        );
    }

    /// Security: `bk_username` is the caller's own text (any admin, 128 chars): `tasks` and
    /// `task` show it in CALLER without its control characters, so `\r\x1b[2K` cannot make
    /// an admin's task read as root's on the operator's terminal.
    #[test]
    fn security_a_callers_bk_username_reaches_the_terminal_without_control_characters() {
        let t = TaskView {
            peer_uid: Some(0),
            username: "\x1b]0;owned\x07\x1b[2K\rroot".into(),
            ..TaskView::default()
        };
        let c = task_caller(&t);
        assert!(!c.chars().any(|c| c.is_control()), "caller cell: {c:?}");
    }
}
