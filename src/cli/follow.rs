//! `procagent logs` and `procagent events`: reading the agent's log and event streams for
//! operators, for one process or many (each line prefixed with its process), filtered
//! (`--since`, `--grep`), and followed (`-f`) across agent restarts: when the agent goes
//! away the CLI says so on stderr, reconnects once it answers again, and resumes where it
//! was (events after the last id seen; captured output after the last capture time seen;
//! a `log_path` file from its end, as lines written while the agent was away are in the file
//! itself).

use std::time::{Duration, SystemTime};

use clap::Args;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{CliError, exit, outln, parse_key, print_json, render, resolve_names, url_encode};
use crate::api::client::{Client, ClientError, decode_data};
use crate::proto::{Event, EventList, LogLine, LogLines, ProcDetail, ProcList, ProcsQuery};
use crate::spec::ProcKey;

/// `procagent logs`.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// The processes: NAMESPACE/NAME, several, globs (`demo/*`), or a unique bare NAME.
    #[arg(value_name = "PROCESS", required_unless_present = "all",
          add = clap_complete::engine::ArgValueCompleter::new(super::complete::process_names))]
    pub process: Vec<String>,
    /// Every registered process.
    #[arg(long, conflicts_with = "process")]
    pub all: bool,
    /// Keep following new lines (across agent restarts).
    #[arg(short, long)]
    pub follow: bool,
    /// Lines to show from the end of each file.
    #[arg(short = 'n', long, default_value_t = 50)]
    pub lines: usize,
    /// Which logs: all, output (captured command output) or log (log_path).
    #[arg(long, default_value = "all", value_parser = ["all", "output", "log"])]
    pub source: String,
    /// Only captured output from this long ago on (e.g. 10m, 2h); log_path lines carry no
    /// time and are left out.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Only lines containing this text.
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
}

/// How often a follower asks again for an agent that went away.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Captured lines asked for again after a reconnect, to find where the follower was.
const RESUME_LINES: usize = 1000;

/// Which lines are shown.
#[derive(Debug, Clone, Default)]
struct Filter {
    since: Option<SystemTime>,
    grep: Option<String>,
}

impl Filter {
    fn new(since: Option<&str>, grep: Option<&str>) -> Result<Filter, CliError> {
        let since = match since {
            None => None,
            Some(s) => Some(SystemTime::now() - parse_since(s)?),
        };
        Ok(Filter {
            since,
            grep: grep.map(str::to_string),
        })
    }

    /// Whether `l` (a line or a notice) is shown.
    fn keeps(&self, l: &LogLine) -> bool {
        if l.notice.is_some() {
            return true;
        }
        if let Some(cut) = self.since {
            match line_time(l) {
                Some(t) if t >= cut => {}
                _ => return false,
            }
        }
        match &self.grep {
            Some(g) => l.line.as_deref().is_some_and(|t| t.contains(g.as_str())),
            None => true,
        }
    }
}

fn parse_since(s: &str) -> Result<Duration, CliError> {
    humantime::parse_duration(s)
        .map_err(|e| CliError::new(exit::USAGE, format!("--since {s:?}: {e}")))
}

/// When a captured line was read by the agent (`None`: a log_path line, which has no time).
fn line_time(l: &LogLine) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(l.time.as_deref()?.trim_end_matches('Z')).ok()
}

/// The processes `logs` names: its names, or every registered one with `--all`.
async fn keys_of(client: &Client, a: &LogsArgs) -> Result<Vec<ProcKey>, CliError> {
    if !a.all {
        return resolve_names(client, &a.process).await;
    }
    let q = ProcsQuery {
        brief: true,
        ..ProcsQuery::default()
    };
    let list: ProcList<ProcDetail> = client.call_typed("procs", &q).await?;
    let keys: Vec<ProcKey> = list
        .list
        .into_iter()
        .map(|p| ProcKey::new(p.namespace, p.name))
        .collect();
    if keys.is_empty() {
        return Err(CliError::new(
            exit::NOT_REGISTERED,
            "no process is registered",
        ));
    }
    Ok(keys)
}

fn logs_path(key: &ProcKey, source: &str, lines: usize, follow: bool) -> String {
    format!(
        "/v1/logs?key={}&lines={lines}&source={source}{}",
        url_encode(&key.to_string()),
        if follow { "&follow=1" } else { "" }
    )
}

/// `procagent logs`.
pub async fn logs(client: &Client, json_out: bool, a: &LogsArgs) -> Result<u8, CliError> {
    for p in &a.process {
        if !p.contains(['*', '?', '[']) && p.contains('/') {
            parse_key(p)?;
        }
    }
    let keys = keys_of(client, a).await?;
    let filter = Filter::new(a.since.as_deref(), a.grep.as_deref())?;
    if filter.since.is_some() && a.source != "output" {
        eprintln!("procagent: --since shows captured output only (log_path lines carry no time)");
    }
    let labels: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    let mut printer = render::LogPrinter::new(json_out, (keys.len() > 1).then_some(&labels[..]));
    if !a.follow {
        for (i, key) in keys.iter().enumerate() {
            let path = logs_path(key, &a.source, a.lines, false);
            let d: LogLines<Value> = client.get_typed(&path).await?;
            for v in &d.lines {
                if let Ok(l) = serde_json::from_value::<LogLine>(v.clone())
                    && !filter.keeps(&l)
                {
                    continue;
                }
                if !printer.print(i, v) {
                    return Ok(exit::OK);
                }
            }
        }
        return Ok(exit::OK);
    }
    // Following: one stream per process and source, each reconnecting by itself; the
    // printer takes their lines in the order they come.
    // Unbounded: the agent bounds what one poll sends, and the printer is the only reader.
    let (tx, mut rx) = mpsc::unbounded_channel::<Followed>();
    let sources: &[&str] = match a.source.as_str() {
        "all" => &["output", "log"],
        "output" => &["output"],
        _ => &["log"],
    };
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        for src in sources {
            let f = Follow {
                client: client.clone(),
                key: key.clone(),
                idx: i,
                source: src,
                lines: a.lines,
                filter: filter.clone(),
                tx: tx.clone(),
            };
            tasks.push(tokio::spawn(f.run()));
        }
    }
    drop(tx);
    let mut code = exit::OK;
    let mut away = false;
    while let Some(m) = rx.recv().await {
        match m {
            Followed::Line(i, v) => {
                if away {
                    away = false;
                    eprintln!("procagent: the agent answers again; following");
                }
                if !printer.print(i, &v) {
                    break;
                }
            }
            Followed::Away => {
                if !away {
                    away = true;
                    eprintln!("procagent: the agent went away; following again once it answers");
                }
            }
            Followed::Failed(e) => {
                eprintln!("procagent: {}", e.message);
                code = e.code;
                break;
            }
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(code)
}

/// What a follower hands the printer.
enum Followed {
    /// A line object of process `idx`, as the agent wrote it.
    Line(usize, Value),
    /// The agent went away (the stream ended or could not be opened); reconnecting.
    Away,
    /// A follower that cannot go on (the process was unregistered, access refused).
    Failed(CliError),
}

/// One followed stream: a process's `output` or `log` source.
struct Follow {
    client: Client,
    key: ProcKey,
    idx: usize,
    source: &'static str,
    lines: usize,
    filter: Filter,
    tx: mpsc::UnboundedSender<Followed>,
}

/// Where a captured-output follower was: the capture time of the last line it passed on,
/// and the texts it passed on at exactly that time (lines captured in one millisecond).
#[derive(Debug, Default, Clone, PartialEq)]
struct Resume {
    time: Option<String>,
    at_time: Vec<String>,
}

impl Resume {
    /// Whether a line replayed after a reconnect was shown before; updates the mark for
    /// lines that are new.
    fn seen_before(&mut self, l: &LogLine) -> bool {
        let (Some(t), Some(text)) = (l.time.as_deref(), l.line.as_deref()) else {
            return false;
        };
        match self.time.as_deref() {
            Some(last) if t < last => true,
            Some(last) if t == last => {
                if self.at_time.iter().any(|s| s == text) {
                    true
                } else {
                    self.at_time.push(text.to_string());
                    false
                }
            }
            _ => {
                self.time = Some(t.to_string());
                self.at_time = vec![text.to_string()];
                false
            }
        }
    }
}

impl Follow {
    async fn run(self) {
        let mut resume = Resume::default();
        let mut first = true;
        loop {
            // After a reconnect: captured output from where it was (replayed lines up to
            // the mark are skipped); a log_path file from its end.
            let lines = match (first, self.source) {
                (true, _) => self.lines,
                (false, "output") => RESUME_LINES,
                (false, _) => 0,
            };
            let path = logs_path(&self.key, self.source, lines, true);
            let replaying = !first;
            let mut reader_open = true;
            let res = self
                .client
                .stream_lines(&path, |line| {
                    let Ok(v) = serde_json::from_slice::<Value>(line) else {
                        return true; // keep-alive
                    };
                    if let Ok(l) = serde_json::from_value::<LogLine>(v.clone())
                        && l.notice.is_none()
                    {
                        let old = resume.seen_before(&l);
                        if (replaying && old) || !self.filter.keeps(&l) {
                            return true;
                        }
                    }
                    reader_open = self.tx.send(Followed::Line(self.idx, v)).is_ok();
                    reader_open
                })
                .await;
            if !reader_open {
                return;
            }
            let fatal = match res {
                Err(ClientError::Refused(env)) => Some(super::api_error(&env)),
                Err(ClientError::Connect { path, source })
                    if first || source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    Some(ClientError::Connect { path, source }.into())
                }
                _ => None,
            };
            if let Some(e) = fatal {
                let _ = self.tx.send(Followed::Failed(e));
                return;
            }
            if self.tx.send(Followed::Away).is_err() {
                return;
            }
            first = false;
            tokio::time::sleep(RECONNECT_EVERY).await;
        }
    }
}

/// `procagent events`.
pub async fn events(
    client: &Client,
    json_out: bool,
    follow: bool,
    process: Option<&str>,
    since: Option<&str>,
    limit: usize,
) -> Result<u8, CliError> {
    let mut query = String::new();
    if let Some(p) = process {
        // NAMESPACE/NAME as given (the history of a process no longer, or not yet,
        // registered is still asked for); a bare NAME or a glob must name one registered.
        let exact = p.contains('/') && !p.contains(['*', '?', '[']);
        let key = if exact {
            parse_key(p)?
        } else {
            match resolve_names(client, &[p.to_string()]).await?.as_slice() {
                [k] => k.clone(),
                many => {
                    let names: Vec<String> = many.iter().map(|k| k.to_string()).collect();
                    return Err(CliError::new(
                        exit::USAGE,
                        format!(
                            "{p}: names several processes ({}); events follows one",
                            names.join(", ")
                        ),
                    ));
                }
            }
        };
        query.push_str(&format!("&key={}", url_encode(&key.to_string())));
    }
    if let Some(s) = since {
        let ms = crate::util::unix_millis() - parse_since(s)?.as_millis() as i64;
        query.push_str(&format!("&since_ms={ms}"));
    }
    if !follow {
        let path = format!("/v1/events?limit={limit}{query}");
        let raw = client.get_data(&path).await?;
        if json_out {
            print_json(&raw);
        } else {
            let d: EventList = decode_data("/v1/events", raw)?;
            let cols = render::EventColumns::fitting(&d.events);
            for ev in &d.events {
                if !outln(&render::event_line(ev, &cols)) {
                    break;
                }
            }
        }
        return Ok(exit::OK);
    }
    // Following: after a reconnect, the events after the last one shown.
    let cols = render::EventColumns::streaming(process);
    let mut last: Option<u64> = None;
    let mut first = true;
    let mut said_away = false;
    loop {
        let path = match last {
            Some(id) => format!("/v1/events?limit=100000&after={id}&follow=1{query}"),
            None => format!("/v1/events?limit={limit}&follow=1{query}"),
        };
        let mut open = true;
        let res = client
            .stream_lines(&path, |line| {
                let Ok(raw) = serde_json::from_slice::<Value>(line) else {
                    return true; // keep-alive
                };
                if said_away {
                    said_away = false;
                    eprintln!("procagent: the agent answers again; following");
                }
                let Ok(ev) = serde_json::from_value::<Event>(raw.clone()) else {
                    return true; // not an event (a newer agent's note): skipped
                };
                if last.is_some_and(|l| ev.id <= l) {
                    return true;
                }
                last = Some(ev.id);
                open = if json_out {
                    outln(&raw.to_string())
                } else {
                    outln(&render::event_line(&ev, &cols))
                };
                open
            })
            .await;
        if !open {
            return Ok(exit::OK);
        }
        match res {
            Err(e @ ClientError::Refused(_)) => return Err(e.into()),
            Err(ClientError::Connect { path, source })
                if first || source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                return Err(ClientError::Connect { path, source }.into());
            }
            _ => {}
        }
        if !said_away {
            said_away = true;
            eprintln!("procagent: the agent went away; following again once it answers");
        }
        first = false;
        tokio::time::sleep(RECONNECT_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(time: &str, text: &str) -> LogLine {
        LogLine {
            file: "f".into(),
            line: Some(text.into()),
            source: "output".into(),
            stream: Some("out".into()),
            time: Some(time.into()),
            notice: None,
        }
    }

    /// Lines replayed after a reconnect are skipped up to the last one shown, including
    /// those captured in the same millisecond; new ones pass and move the mark.
    #[test]
    fn a_resumed_follower_skips_what_it_showed() {
        let mut r = Resume::default();
        for l in [
            out("2026-12-03T10:00:00.001Z", "a"),
            out("2026-12-03T10:00:00.002Z", "b"),
            out("2026-12-03T10:00:00.002Z", "c"),
        ] {
            assert!(!r.seen_before(&l));
        }
        // The replay after a reconnect.
        assert!(r.seen_before(&out("2026-12-03T10:00:00.001Z", "a")));
        assert!(r.seen_before(&out("2026-12-03T10:00:00.002Z", "b")));
        assert!(r.seen_before(&out("2026-12-03T10:00:00.002Z", "c")));
        assert!(!r.seen_before(&out("2026-12-03T10:00:00.002Z", "d")));
        assert!(!r.seen_before(&out("2026-12-03T10:00:01.000Z", "e")));
        assert!(r.seen_before(&out("2026-12-03T10:00:00.500Z", "old")));
    }

    #[test]
    fn filters_by_capture_time_and_text() {
        let f = Filter {
            since: humantime::parse_rfc3339("2026-12-03T10:00:00Z").ok(),
            grep: Some("boom".into()),
        };
        assert!(f.keeps(&out("2026-12-03T10:00:01.000Z", "a boom here")));
        assert!(!f.keeps(&out("2026-12-03T10:00:01.000Z", "quiet")));
        assert!(!f.keeps(&out("2026-12-03T09:59:59.000Z", "boom")));
        let mut log = out("", "boom");
        log.time = None;
        assert!(!f.keeps(&log), "no time: left out under --since");
    }
}
