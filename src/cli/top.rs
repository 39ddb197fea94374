//! `procagent top`: a live table of the processes with their latest resource figures,
//! redrawn in place on a terminal (plain successive snapshots otherwise). Figures come from
//! the agent's latest sample (`procs` API): `top` never reads `/proc` itself. The disk rate
//! column is computed here, from the change of `disk` between two refreshes. On a terminal
//! the frame fits its width (columns dropped) and height (the rows that fit, then how many
//! more), and keys act at once: `q` quits; `c`, `m`, `r`, `u`, `n` sort by cpu, memory,
//! restarts, uptime, name.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::value::RawValue;

use super::{CliError, exit, parse_key, render};
use crate::api::client::{Client, decode_text};
use crate::proto::{FLAG_RUNNING, ProcDetail, ProcList, ProcsQuery};

/// Column to sort by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    Cpu,
    Mem,
    Fd,
    Disk,
    Net,
    Restarts,
    Uptime,
    Name,
}

impl SortKey {
    /// The key that picks this sort on a terminal, and its name.
    fn of_key(c: u8) -> Option<SortKey> {
        Some(match c {
            b'c' | b'C' => SortKey::Cpu,
            b'm' | b'M' => SortKey::Mem,
            b'r' | b'R' => SortKey::Restarts,
            b'u' | b'U' => SortKey::Uptime,
            b'n' | b'N' => SortKey::Name,
            b'f' | b'F' => SortKey::Fd,
            b'd' | b'D' => SortKey::Disk,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            SortKey::Cpu => "cpu",
            SortKey::Mem => "mem",
            SortKey::Fd => "fd",
            SortKey::Disk => "disk",
            SortKey::Net => "net",
            SortKey::Restarts => "restarts",
            SortKey::Uptime => "uptime",
            SortKey::Name => "name",
        }
    }
}

/// Options of `procagent top`.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// Time between refreshes (e.g. 2s, 500ms).
    #[arg(long, short = 'd', default_value = "2s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Exit after this many refreshes (default: until interrupted).
    #[arg(long, short = 'n')]
    pub iterations: Option<u64>,
    /// Print one snapshot and exit (same as --iterations 1).
    #[arg(long)]
    pub once: bool,
    /// Sort by this column (largest first; name alphabetically).
    #[arg(long, value_enum, default_value_t = SortKey::Cpu)]
    pub sort: SortKey,
    /// Only this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only this process (NAMESPACE/NAME).
    #[arg(add = clap_complete::engine::ArgValueCompleter::new(super::complete::process_names))]
    pub process: Option<String>,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("{s:?} is not a positive duration")),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?,
    };
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?} is shorter than 100ms"));
    }
    Ok(d)
}

/// Bytes for humans: 512B, 12.0K, 340.5M, 1.2G.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    if !n.is_finite() || n < 0.0 {
        return "-".into();
    }
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn key_of(p: &ProcDetail) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// The figure a sort key sorts by (largest first).
fn figure(p: &ProcDetail, sort: SortKey) -> f64 {
    match sort {
        SortKey::Cpu => p.cpu_usage,
        SortKey::Mem => p.rss_bytes as f64,
        SortKey::Fd => p.fd as f64,
        SortKey::Disk => p.disk as f64,
        SortKey::Net => p.net as f64,
        SortKey::Restarts => p.restarts as f64,
        SortKey::Uptime => p.uptime_secs.unwrap_or(-1) as f64,
        SortKey::Name => 0.0,
    }
}

/// The previous refresh: `disk` per process and when it was taken.
pub type Prev = (HashMap<String, i64>, Instant);

/// One frame: a header line and the table. `prev` gives the disk rate; `now` is the time of
/// this snapshot; `size` (a terminal's columns and rows) fits the frame to it: columns are
/// dropped (LIMIT, NET/S, DISK, DISK/S, FD, MEM%, PID, in that order) and only the rows that
/// fit are shown, with a last line saying how many more and which keys do what.
pub fn frame(
    list: &[ProcDetail],
    sort: SortKey,
    prev: Option<&Prev>,
    now: Instant,
    stamp: &str,
    size: Option<(usize, usize)>,
) -> String {
    let mut rows: Vec<&ProcDetail> = list.iter().collect();
    match sort {
        SortKey::Name => rows.sort_by_key(|p| key_of(p)),
        other => {
            rows.sort_by(|a, b| {
                figure(b, other)
                    .total_cmp(&figure(a, other))
                    .then_with(|| key_of(a).cmp(&key_of(b)))
            });
        }
    }
    let running = list.iter().filter(|p| p.status == FLAG_RUNNING).count();
    let managed = list.iter().filter(|p| p.managed).count();
    let cpu: f64 = list.iter().map(|p| p.cpu_usage).sum();
    let rss: f64 = list.iter().map(|p| p.rss_bytes as f64).sum();
    let mut out = format!(
        "procagent top  {stamp}  processes {}  running {running}  managed {managed}  cpu {cpu:.1}%  rss {}\n",
        list.len(),
        human_bytes(rss)
    );
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|p| {
            let running = p.status == FLAG_RUNNING;
            let pids: Vec<String> = p.pids.iter().map(i64::to_string).collect();
            let key = key_of(p);
            let disk = p.disk;
            let rate = prev
                .and_then(|(m, t)| {
                    let before = *m.get(&key)?;
                    let secs = now.saturating_duration_since(*t).as_secs_f64();
                    (secs > 0.0 && disk >= before).then(|| (disk - before) as f64 / secs)
                })
                .filter(|_| running);
            let fig = |s: String| if running { s } else { "-".to_string() };
            vec![
                key,
                p.state.clone(),
                if pids.is_empty() {
                    "-".into()
                } else {
                    pids.join(",")
                },
                fig(format!("{:.1}", p.cpu_usage)),
                fig(format!("{:.2}", p.mem_usage)),
                fig(human_bytes(p.rss_bytes as f64)),
                fig(p.fd.to_string()),
                fig(human_bytes(disk as f64)),
                rate.map(|r| format!("{}/s", human_bytes(r)))
                    .unwrap_or_else(|| "-".into()),
                fig(format!("{}/s", human_bytes(p.net.max(0) as f64))),
                p.uptime_secs
                    .filter(|_| running)
                    .map(uptime)
                    .unwrap_or_else(|| "-".into()),
                p.restarts.to_string(),
                p.limit_stops.to_string(),
            ]
        })
        .collect();
    let headers = [
        "PROCESS", "STATE", "PID", "CPU%", "MEM%", "RSS", "FD", "DISK", "DISK/S", "NET/S",
        "UPTIME", "RESTARTS", "LIMIT",
    ];
    let Some((cols, lines)) = size else {
        out.push_str(&render::table(&headers, &table_rows, None));
        return out;
    };
    // Two lines for the header and the table's, one for the footer.
    let room = lines.saturating_sub(3).max(1);
    let more = table_rows.len().saturating_sub(room);
    let shown = &table_rows[..table_rows.len().min(room)];
    let (_, h, rows) = render::fit_table(
        &headers,
        shown,
        Some(cols),
        &[12, 9, 7, 8, 6, 4, 2],
        usize::MAX,
    );
    let h: Vec<&str> = h.iter().map(String::as_str).collect();
    out.push_str(&render::table(&h, &rows, None));
    let more = if more > 0 {
        format!("… {more} more  ")
    } else {
        String::new()
    };
    out.push_str(&format!(
        "{more}sort: {}  q quit  c cpu  m mem  r restarts  u uptime  n name\n",
        sort.name()
    ));
    render::fit(&out, Some(cols))
}

/// An uptime for humans: 45s, 12m, 3h12m, 2d4h.
fn uptime(secs: i64) -> String {
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{}s", secs.max(0))
    }
}

/// A terminal's size (columns, rows), when stdout is one.
fn term_size() -> Option<(usize, usize)> {
    let out = std::io::stdout();
    if !rustix::termios::isatty(&out) {
        return None;
    }
    let w = rustix::termios::tcgetwinsize(&out).ok()?;
    (w.ws_col > 0 && w.ws_row > 0).then(|| (usize::from(w.ws_col), usize::from(w.ws_row)))
}

/// The terminal's input without line buffering or echo while `top` runs (so a key acts at
/// once); put back when dropped. `None` when stdin is not a terminal.
struct RawInput {
    saved: rustix::termios::Termios,
}

impl RawInput {
    fn start() -> Option<RawInput> {
        use rustix::termios::{LocalModes, OptionalActions, SpecialCodeIndex};
        let stdin = std::io::stdin();
        if !rustix::termios::isatty(&stdin) {
            return None;
        }
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.local_modes -= LocalModes::ICANON | LocalModes::ECHO;
        raw.special_codes[SpecialCodeIndex::VMIN] = 1;
        raw.special_codes[SpecialCodeIndex::VTIME] = 0;
        rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
        Some(RawInput { saved })
    }
}

impl Drop for RawInput {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// Keys pressed on the terminal, read by a thread of their own (a blocking read of stdin).
fn keys() -> tokio::sync::mpsc::UnboundedReceiver<u8> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut b = [0u8; 1];
        while let Ok(1) = std::io::stdin().read(&mut b) {
            if tx.send(b[0]).is_err() {
                break;
            }
        }
    });
    rx
}

/// A `top --json` snapshot: the time and the processes as the agent wrote them.
#[derive(Debug, serde::Serialize)]
struct Snapshot {
    time: i64,
    list: Vec<Box<RawValue>>,
}

/// Run `procagent top`.
pub async fn run(client: &Client, json_out: bool, a: &TopArgs) -> Result<u8, CliError> {
    let mut q = ProcsQuery::default();
    if let Some(ns) = &a.namespace {
        q.namespace = ns.clone();
    }
    if let Some(p) = &a.process {
        let k = parse_key(p)?;
        q.namespace = k.namespace;
        q.name = k.name;
    }
    let limit = if a.once || json_out {
        Some(1)
    } else {
        a.iterations
    };
    if limit == Some(0) {
        return Err(CliError::new(
            exit::USAGE,
            "--iterations must be at least 1",
        ));
    }
    let tty = std::io::stdout().is_terminal();
    let mut sort = a.sort;
    // Keys only while redrawing on a terminal (not for --once, --json or a pipe).
    let interactive = tty && !json_out && limit.is_none();
    let raw = interactive.then(RawInput::start).flatten();
    let mut keys = raw.as_ref().map(|_| keys());
    let mut prev: Option<Prev> = None;
    let mut shown = 0u64;
    loop {
        let d: ProcList<Box<RawValue>> = client.call_typed("procs", &q).await?;
        let now = Instant::now();
        let list: Vec<ProcDetail> = d
            .list
            .iter()
            .map(|v| decode_text("procs", v.get()))
            .collect::<Result<_, _>>()?;
        let mut out = std::io::stdout().lock();
        if json_out {
            let snap = Snapshot {
                time: crate::util::unix_now(),
                list: d.list,
            };
            let _ = writeln!(out, "{}", super::pretty_raw(&snap));
        } else {
            let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            let size = if tty && render::term_width().is_some() {
                term_size()
            } else {
                None
            };
            let text = frame(&list, sort, prev.as_ref(), now, &stamp.to_string(), size);
            if tty {
                // Home, each line cleared to its end, then the rest of the screen cleared:
                // redrawn in place without flicker.
                let mut s = String::from("\x1b[H");
                for line in text.lines() {
                    s.push_str(line);
                    s.push_str("\x1b[K\n");
                }
                s.push_str("\x1b[J");
                let _ = out.write_all(s.as_bytes());
            } else {
                let _ = writeln!(out, "{text}");
            }
        }
        let _ = out.flush();
        drop(out);
        shown += 1;
        if limit.is_some_and(|n| shown >= n) {
            return Ok(exit::OK);
        }
        prev = Some((list.iter().map(|p| (key_of(p), p.disk)).collect(), now));
        let next = tokio::time::Instant::now() + a.interval;
        loop {
            let key = async {
                match keys.as_mut() {
                    Some(k) => k.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                _ = tokio::signal::ctrl_c() => return Ok(exit::OK),
                k = key => match k {
                    Some(b'q' | b'Q') => return Ok(exit::OK),
                    Some(c) => {
                        // A new sort redraws at once.
                        if let Some(s) = SortKey::of_key(c) {
                            sort = s;
                            break;
                        }
                    }
                    None => keys = None,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, cpu: f64, disk: i64, status: i64) -> ProcDetail {
        ProcDetail {
            namespace: "ns".into(),
            name: name.into(),
            state: if status == 1 { "running" } else { "stopped" }.into(),
            status,
            managed: true,
            pids: if status == 1 { vec![10] } else { vec![] },
            cpu_usage: cpu,
            mem_usage: 1.5,
            rss_bytes: 2_097_152,
            fd: 7,
            disk,
            net: 2,
            restarts: 1,
            limit_stops: 0,
            ..ProcDetail::default()
        }
    }

    #[test]
    fn frame_sorts_and_computes_rates() {
        let t0 = Instant::now();
        let list = vec![
            p("low", 1.0, 0, 1),
            p("high", 99.0, 4096, 1),
            p("off", 0.0, 0, 2),
        ];
        let f = frame(&list, SortKey::Cpu, None, t0, "T", None);
        let lines: Vec<&str> = f.lines().collect();
        assert!(
            lines[0].contains("processes 3  running 2  managed 3"),
            "{f}"
        );
        assert!(lines[1].starts_with("PROCESS"), "{f}");
        assert!(lines[2].starts_with("ns/high"), "{f}");
        assert!(lines[3].starts_with("ns/low"), "{f}");
        assert!(lines[4].starts_with("ns/off"), "{f}");
        assert!(
            !lines[4].contains("2.0M"),
            "no figures for a stopped process: {f}"
        );
        let prev: Prev = (HashMap::from([("ns/high".to_string(), 0)]), t0);
        let f = frame(
            &list,
            SortKey::Name,
            Some(&prev),
            t0 + Duration::from_secs(2),
            "T",
            None,
        );
        let high = f.lines().find(|l| l.starts_with("ns/high")).unwrap();
        assert!(high.contains("2.0K/s"), "{high}");
        assert!(f.lines().nth(2).unwrap().starts_with("ns/high"), "{f}");
    }

    /// A small terminal: columns dropped, the rows that fit, how many more, the keys.
    #[test]
    fn a_frame_fits_the_terminal() {
        let list: Vec<ProcDetail> = (0..30)
            .map(|i| p(&format!("p{i:02}"), i as f64, 0, 1))
            .collect();
        let f = frame(
            &list,
            SortKey::Cpu,
            None,
            Instant::now(),
            "T",
            Some((60, 10)),
        );
        let lines: Vec<&str> = f.lines().collect();
        assert_eq!(lines.len(), 10, "{f}");
        assert!(lines.iter().all(|l| render::display_width(l) <= 60), "{f}");
        assert!(
            lines[1].starts_with("PROCESS") && !lines[1].contains("LIMIT"),
            "{f}"
        );
        assert!(
            lines[9].contains("23 more") && lines[9].contains("q quit"),
            "{f}"
        );
        assert!(lines[2].starts_with("ns/p29"), "sorted by cpu: {f}");
        let f = frame(
            &list,
            SortKey::Name,
            None,
            Instant::now(),
            "T",
            Some((200, 50)),
        );
        assert!(
            f.contains("UPTIME") && f.contains("LIMIT") && !f.contains("more"),
            "{f}"
        );
        assert_eq!(uptime(3700), "1h01m");
        assert_eq!(SortKey::of_key(b'r'), Some(SortKey::Restarts));
    }

    #[test]
    fn bytes_and_intervals() {
        assert_eq!(human_bytes(512.0), "512B");
        assert_eq!(human_bytes(2048.0), "2.0K");
        assert_eq!(human_bytes(200.0 * 1024.0 * 1024.0), "200.0M");
        assert_eq!(human_bytes(-1.0), "-");
        assert_eq!(parse_interval("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
