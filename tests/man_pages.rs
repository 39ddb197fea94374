//! The man pages beside procagent(1): procagentd(8), generated from the daemon's command
//! line with hand-written sections that stay true to what the daemon does, and agent.toml(5),
//! printed as written (its content is checked against the loader in tests/config_example.rs);
//! every page renders with groff without a warning.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn man(args: &[&str]) -> String {
    let out = Command::new(CLI)
        .arg("man")
        .args(args)
        .output()
        .expect("run procagent man");
    assert!(
        out.status.success(),
        "procagent man {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("a page is UTF-8")
}

#[test]
fn procagentd_8_has_every_option_of_the_daemon_and_the_hand_written_sections() {
    let page = man(&["procagentd"]);
    assert!(page.contains("\n.TH procagentd 8 "), "{page}");
    // Every option `procagentd --help` shows, and not the hidden one.
    let help = Command::new(DAEMON).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let opts: Vec<&str> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty())
        .collect();
    assert!(
        opts.contains(&"config") && opts.contains(&"check"),
        "{help}"
    );
    for o in &opts {
        let roff = format!("\\-\\-{}", o.replace('-', "\\-"));
        assert!(page.contains(&roff), "procagentd(8) lacks --{o}:\n{page}");
    }
    assert!(!page.contains("output\\-keeper"), "a hidden option shows");
    assert!(
        page.contains(procagent::daemon_cli::DEFAULT_CONFIG),
        "the default config path"
    );
    // The hand-written sections, in order, between OPTIONS and the generated VERSION.
    let at = |h: &str| {
        page.find(&format!("\n.SH {h}\n"))
            .unwrap_or_else(|| panic!("no section {h}:\n{page}"))
    };
    let order = [
        "OPTIONS",
        "OPERATION",
        "\"EXIT STATUS\"",
        "SIGNALS",
        "ENVIRONMENT",
        "FILES",
        "\"SEE ALSO\"",
        "VERSION",
    ];
    for w in order.windows(2) {
        assert!(at(w[0]) < at(w[1]), "{} before {}", w[0], w[1]);
    }
    let see_also = &page[at("\"SEE ALSO\"")..];
    for r in [".BR procagent (1)", ".BR agent.toml (5)"] {
        assert!(see_also.contains(r), "SEE ALSO lacks {r}");
    }
}

/// procagentd(8)'s EXIT STATUS: 0 for a valid config under --check, 2 for a config with
/// errors and for a bad command line.
#[test]
fn procagentd_8_states_the_daemons_exit_status() {
    let page = man(&["procagentd"]);
    let section = &page[page.find(".SH \"EXIT STATUS\"").unwrap()..];
    let section = &section[..section[1..].find("\n.SH ").unwrap()];
    for code in ["0", "1", "2"] {
        assert!(section.contains(&format!(".TP\n.B {code}\n")), "{section}");
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[agent]\nlog_level = \"warn\"\n").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[agent]\nlog_levle = \"warn\"\n").unwrap();
    let code = |args: &[&std::ffi::OsStr]| {
        Command::new(DAEMON)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .code()
    };
    let c = std::ffi::OsStr::new("--config");
    let check = std::ffi::OsStr::new("--check");
    assert_eq!(code(&[c, good.as_os_str(), check]), Some(0));
    assert_eq!(code(&[c, bad.as_os_str(), check]), Some(2));
    assert_eq!(code(&[std::ffi::OsStr::new("--no-such-flag")]), Some(2));
}

#[test]
fn agent_toml_5_is_printed_as_written_with_this_version() {
    let page = man(&["agent.toml"]);
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/agent.toml.5")).unwrap();
    assert_eq!(
        page,
        file.replace("@VERSION@", env!("CARGO_PKG_VERSION")),
        "procagent man agent.toml"
    );
    assert!(
        page.contains(&format!(
            "\n.TH agent.toml 5 \"\" \"procagent {}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{page}"
    );
    // Unknown names still exit 2, naming the pages there are.
    let out = Command::new(CLI).args(["man", "agent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("procagentd") && err.contains("agent.toml"),
        "{err}"
    );
}

/// groff renders `page` without a warning; false when groff is missing outside CI.
fn renders_cleanly(name: &str, page: &str) -> bool {
    let spawned = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut g = match spawned {
        Ok(g) => g,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skip: groff cannot run here ({e}); .ci/run installs groff-base");
            return false;
        }
        Err(e) => panic!("groff cannot run in CI: {e}"),
    };
    g.stdin
        .take()
        .expect("groff's stdin")
        .write_all(page.as_bytes())
        .expect("write to groff");
    let o = g.wait_with_output().expect("groff's output");
    assert!(o.status.success(), "groff fails on {name}");
    let warn = String::from_utf8_lossy(&o.stderr);
    assert!(warn.trim().is_empty(), "groff warns on {name}: {warn}");
    true
}

#[test]
fn every_page_renders_without_a_groff_warning() {
    for (name, args) in [
        ("procagent(1)", &[][..]),
        ("procagent-config(1)", &["config"][..]),
        ("procagentd(8)", &["procagentd"][..]),
        ("agent.toml(5)", &["agent.toml"][..]),
    ] {
        if !renders_cleanly(name, &man(args)) {
            return;
        }
    }
    // The check itself catches a roff error.
    let broken = man(&["agent.toml"]).replace(".TP\n", ".TP 3q\n");
    let mut g = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    g.stdin
        .take()
        .unwrap()
        .write_all(broken.as_bytes())
        .unwrap();
    let o = g.wait_with_output().unwrap();
    assert!(
        !o.stderr.is_empty(),
        "groff -ww says nothing about a bad .TP argument"
    );
}
