//! `agent.toml.example` cannot drift: it loads with the strict loader, its settings are the
//! loader's defaults, and every key the loader reads is documented in it.

use std::path::Path;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/agent.toml.example");
const LOADER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/config.rs");

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

/// The key names the loader reads: the string argument of each Section accessor call.
fn loader_keys() -> Vec<String> {
    let src = std::fs::read_to_string(LOADER).expect("read src/config.rs");
    let mut keys = Vec::new();
    for acc in [
        ".string(\"",
        ".opt_string(\"",
        ".int(\"",
        ".opt_int(\"",
        ".float(\"",
        ".boolean(\"",
        ".duration(\"",
        ".table(\"",
        ".get(\"",
    ] {
        let mut rest = src.as_str();
        while let Some(i) = rest.find(acc) {
            rest = &rest[i + acc.len()..];
            if let Some(end) = rest.find('"') {
                keys.push(rest[..end].to_string());
            }
        }
    }
    // `path_field(&mut s, "...")` reads path keys.
    let mut rest = src.as_str();
    while let Some(i) = rest.find("path_field(&mut s, \"") {
        rest = &rest[i + "path_field(&mut s, \"".len()..];
        if let Some(end) = rest.find('"') {
            keys.push(rest[..end].to_string());
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
