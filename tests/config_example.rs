//! The config's documentation cannot drift: `agent.toml.example` loads with the strict
//! loader, its settings are the loader's defaults, and every key the loader reads is
//! documented in it; agent.toml(5) (`man/agent.toml.5`) has an entry for every key the loader
//! reads and for no other, and each default and range it states is the loader's.

use std::path::Path;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/agent.toml.example");
const LOADER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/config.rs");
const PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/man/agent.toml.5");

#[test]
fn example_loads_and_states_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let ex = procagent::config::load_with_base(Path::new(EXAMPLE), dir.path())
        .unwrap_or_else(|e| panic!("agent.toml.example does not load:\n{e}"));
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let def = procagent::config::load_with_base(&empty, dir.path()).unwrap();
    assert_eq!(ex.socket, def.socket);
    assert_eq!(ex.state_dir, def.state_dir);
    assert_eq!(ex.log_level, def.log_level);
    assert_eq!(ex.log_format, def.log_format);
    assert_eq!(ex.log_target, def.log_target);
    assert_eq!(ex.conf_dir, def.conf_dir);
    assert_eq!(ex.watch_conf_dir, def.watch_conf_dir);
    assert_eq!(ex.host, def.host);
    assert_eq!(ex.supervisor, def.supervisor);
    assert_eq!(ex.api, def.api);
    assert_eq!(ex.metrics, def.metrics);
    assert_eq!(ex.store, def.store);
    // The example process: what it marks as defaults are the defaults.
    assert_eq!(ex.processes.len(), 1);
    let p = &ex.processes[0];
    let s = &p.definition.spec;
    let d = procagent::spec::ProcSpec::default();
    assert_eq!(s.op_timeout, d.op_timeout);
    assert_eq!(s.start_check_secs, d.start_check_secs);
    assert_eq!(s.stop_check_secs, d.stop_check_secs);
    assert_eq!(s.instance_num, d.instance_num);
    assert_eq!(s.auto_type, d.auto_type);
    assert_eq!(s.start_retries, d.start_retries);
    assert_eq!(s.start_interval, d.start_interval);
    assert_eq!(s.max_restarts, d.max_restarts);
    assert!(p.autostart);
}

/// The key names the loader reads: the string argument of each Section accessor call (on
/// the call's line or, as rustfmt breaks long calls, the next).
fn loader_keys() -> Vec<String> {
    let src = std::fs::read_to_string(LOADER).expect("read src/config.rs");
    let mut keys = Vec::new();
    for acc in [
        ".string(",
        ".opt_string(",
        ".int(",
        ".opt_integer(",
        ".opt_number(",
        ".float(",
        ".boolean(",
        ".duration(",
        ".table(",
        ".get(",
        // `path_field(&mut s, "...")` reads path keys.
        "path_field(&mut s, ",
    ] {
        let mut rest = src.as_str();
        while let Some(i) = rest.find(acc) {
            rest = &rest[i + acc.len()..];
            if let Some(arg) = rest.trim_start().strip_prefix('"')
                && let Some(end) = arg.find('"')
            {
                keys.push(arg[..end].to_string());
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

#[test]
fn every_key_is_documented() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let keys = loader_keys();
    assert!(keys.len() > 50, "the key scan found too little: {keys:?}");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            !(text.contains(&format!("\n{k} ="))
                || text.contains(&format!("# {k} ="))
                || text.contains(&format!("`{k}`"))
                || text.contains(&format!("[{k}]"))
                || text.contains(&format!("[[{k}]]")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "keys the loader reads but agent.toml.example does not document: {missing:?}"
    );
}

/// What an agent.toml(5) entry says a key defaults to.
#[derive(Debug, Clone, PartialEq)]
enum Stated {
    /// `\fBkey\fR = \fIVALUE\fR`: VALUE in TOML syntax.
    Value(String),
    /// `\fBkey\fR (required)`.
    Required,
    /// `\fBkey\fR (unset)`.
    Unset,
}

/// One key's entry in agent.toml(5).
#[derive(Debug)]
struct Entry {
    /// `agent`, `host`, ..., `process`.
    section: String,
    key: String,
    stated: Stated,
    /// `Range: MIN to MAX.`, the literals as written.
    range: Option<(String, String)>,
}

fn unescape(roff: &str) -> String {
    roff.replace("\\-", "-")
        .replace("\\(dq", "\"")
        .replace("\\e", "\\")
}

/// The page's sections (`.SH "[agent]"`, `.SH "[[process]]"`) and the key entries in them.
fn page_entries() -> (Vec<String>, Vec<Entry>) {
    let text = std::fs::read_to_string(PAGE).expect("read man/agent.toml.5");
    let lines: Vec<&str> = text.lines().collect();
    let mut sections = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut section: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(h) = l.strip_prefix(".SH ") {
            let h = h.trim_matches('"');
            section = h
                .strip_prefix("[[")
                .and_then(|r| r.strip_suffix("]]"))
                .or_else(|| h.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
                .map(str::to_string);
            if let Some(s) = &section {
                sections.push(s.clone());
            }
        } else if l == ".TP"
            && let Some(sec) = &section
            && let Some(tag) = lines.get(i + 1).and_then(|t| t.strip_prefix("\\fB"))
        {
            let (key, rest) = tag.split_once("\\fR").expect("\\fBkey\\fR");
            let stated = match rest.trim() {
                "(required)" => Stated::Required,
                "(unset)" => Stated::Unset,
                r => {
                    let v = r
                        .strip_prefix("= \\fI")
                        .and_then(|v| v.strip_suffix("\\fR"))
                        .unwrap_or_else(|| panic!("entry {key}: cannot read {r:?}"));
                    Stated::Value(unescape(v))
                }
            };
            let mut range = None;
            let mut j = i + 2;
            while j < lines.len() && lines[j] != ".TP" && !lines[j].starts_with(".SH") {
                if let Some(r) = lines[j].strip_prefix("Range: ") {
                    let r = r.strip_suffix('.').unwrap_or(r);
                    let (lo, hi) = r.split_once(" to ").expect("Range: MIN to MAX.");
                    range = Some((unescape(lo), unescape(hi)));
                }
                j += 1;
            }
            entries.push(Entry {
                section: sec.clone(),
                key: key.to_string(),
                stated,
                range,
            });
            i = j;
            continue;
        }
        i += 1;
    }
    (sections, entries)
}

/// A process table with the required keys and `extra` lines.
fn process_text(extra: &str) -> String {
    format!(
        "[[process]]\nnamespace = \"n\"\nname = \"x\"\nsetup_path = \"/tmp\"\nproc_name = \"x\"\n{extra}\n"
    )
}

/// The config text that sets `key = value` in `entry`'s section, with `context` (more lines
/// of that section).
fn config_text(entry: &Entry, value: &str, context: &str) -> String {
    let line = format!("{} = {value}", entry.key);
    if entry.section == "process" {
        return process_text(&format!("{context}{line}"));
    }
    format!("[{}]\n{context}{line}\n", entry.section)
}

/// What a key's whole range needs of the other keys: backoff_max may not be below
/// backoff_initial.
fn range_context(entry: &Entry) -> &'static str {
    match (entry.section.as_str(), entry.key.as_str()) {
        ("supervisor", "backoff_max") => "backoff_initial = \"10ms\"\n",
        ("supervisor", "backoff_initial") => "backoff_max = \"1d\"\n",
        _ => "",
    }
}

fn load_text(dir: &Path, text: &str) -> Result<procagent::config::Config, String> {
    let f = dir.join("agent.toml");
    std::fs::write(&f, text).expect("write the config");
    procagent::config::load_with_base(&f, dir).map_err(|e| e.to_string())
}

#[test]
fn agent_toml_5_documents_every_key_the_loader_reads_and_no_other() {
    let (sections, entries) = page_entries();
    let keys = loader_keys();
    assert!(
        entries.len() > 80,
        "the page scan found too little: {entries:?}"
    );
    for s in [
        "agent",
        "host",
        "supervisor",
        "api",
        "metrics",
        "store",
        "process",
    ] {
        assert!(
            sections.contains(&s.to_string()),
            "no section [{s}] in {sections:?}"
        );
    }
    let documented: Vec<&str> = entries
        .iter()
        .map(|e| e.key.as_str())
        .chain(sections.iter().map(String::as_str))
        .collect();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !documented.contains(&k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "keys the loader reads that agent.toml(5) does not document: {missing:?}"
    );
    let unknown: Vec<&str> = documented
        .iter()
        .copied()
        .filter(|k| !keys.iter().any(|l| l == k))
        .collect();
    assert!(
        unknown.is_empty(),
        "agent.toml(5) documents keys the loader does not read: {unknown:?}"
    );
    let mut seen = std::collections::HashSet::new();
    for e in &entries {
        assert!(
            seen.insert((e.section.as_str(), e.key.as_str())),
            "{}.{} documented twice",
            e.section,
            e.key
        );
    }
}

#[test]
fn agent_toml_5_states_the_loaders_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (_, entries) = page_entries();
    let default = load_text(dir.path(), "").unwrap();
    let base = load_text(dir.path(), &process_text("")).unwrap();
    let base = &base.processes[0];
    let mut checked = 0;
    for e in &entries {
        let Stated::Value(v) = &e.stated else {
            continue;
        };
        let c = load_text(dir.path(), &config_text(e, v, "")).unwrap_or_else(|err| {
            panic!("{}.{} = {v} (its stated default): {err}", e.section, e.key)
        });
        if e.section == "process" {
            let p = &c.processes[0];
            assert_eq!(
                (&p.definition.spec, &p.definition.labels, p.autostart),
                (
                    &base.definition.spec,
                    &base.definition.labels,
                    base.autostart
                ),
                "process.{} = {v} is not the default",
                e.key
            );
        } else {
            assert_eq!(
                c, default,
                "{}.{} = {v} is not the default",
                e.section, e.key
            );
        }
        checked += 1;
    }
    assert!(checked > 70, "only {checked} defaults checked");
    // The keys stated required are: a process without one is refused, naming it.
    for e in entries.iter().filter(|e| e.stated == Stated::Required) {
        let text = process_text("").replace(&format!("\n{} = ", e.key), "\n# = ");
        let err = load_text(dir.path(), &text).expect_err(&e.key);
        assert!(
            err.contains(&format!(".{}: is required", e.key)),
            "{}: {err}",
            e.key
        );
    }
}

/// A value just outside a range's end: one less than `lo` or one more than `hi` (by the
/// type of the key's values: integers, numbers or durations).
fn beyond(e: &Entry, lit: &str, up: bool) -> Option<String> {
    let float_key = matches!(&e.stated, Stated::Value(v) if v.contains('.'));
    let parsed: Option<toml::Value> = toml::from_str::<toml::Table>(&format!("v = {lit}"))
        .ok()
        .and_then(|t| t.get("v").cloned());
    match parsed {
        Some(toml::Value::Integer(i)) if !float_key => {
            Some(if up { i + 1 } else { i - 1 }.to_string())
        }
        Some(toml::Value::Integer(_)) | Some(toml::Value::Float(_)) => {
            let f = match parsed {
                Some(toml::Value::Integer(i)) => i as f64,
                Some(toml::Value::Float(f)) => f,
                _ => unreachable!(),
            };
            let eps = f.abs().max(1.0) / 1000.0;
            Some(format!("{:?}", if up { f + eps } else { f - eps }))
        }
        _ => {
            let d = humantime::parse_duration(lit)
                .unwrap_or_else(|err| panic!("{}: range end {lit:?}: {err}", e.key));
            let ms = d.as_millis();
            match (up, ms) {
                (false, 0) => None,
                (false, ms) => Some(format!("\"{}ms\"", ms - 1)),
                (true, ms) => Some(format!("\"{}ms\"", ms + 1)),
            }
        }
    }
}

/// A range end as a config value: durations are strings.
fn as_value(lit: &str) -> String {
    if toml::from_str::<toml::Table>(&format!("v = {lit}")).is_ok() {
        lit.to_string()
    } else {
        format!("\"{lit}\"")
    }
}

#[test]
fn agent_toml_5_states_the_loaders_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (_, entries) = page_entries();
    let mut checked = 0;
    for e in entries.iter().filter(|e| e.range.is_some()) {
        let (lo, hi) = e.range.clone().unwrap();
        let name = format!("{}.{}", e.section, e.key);
        for end in [&lo, &hi] {
            let v = as_value(end);
            if let Err(err) = load_text(dir.path(), &config_text(e, &v, range_context(e))) {
                panic!("{name} = {v} is in its stated range {lo} to {hi}, yet: {err}");
            }
        }
        for (end, up) in [(&lo, false), (&hi, true)] {
            let Some(v) = beyond(e, end, up) else {
                continue;
            };
            let err = load_text(dir.path(), &config_text(e, &v, range_context(e)))
                .err()
                .unwrap_or_else(|| panic!("{name} = {v} is outside {lo} to {hi}, yet loads"));
            assert!(
                err.contains(&format!(".{}: ", e.key)) || err.contains(&format!("{}: ", name)),
                "{name} = {v}: the error does not name the key: {err}"
            );
        }
        checked += 1;
    }
    assert!(checked > 40, "only {checked} ranges checked");
}
