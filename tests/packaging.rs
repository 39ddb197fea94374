//! The Debian package's definition agrees with itself and with what it packages, without
//! building it (packaging/check-deb.sh, run by .ci/run, builds and inspects the real .deb):
//! Cargo.toml's `[package.metadata.deb]`, the unit, the packaged config, the maintainer
//! scripts, the changelog and the pinned cargo-deb.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CLI: &str = env!("CARGO_BIN_EXE_procagent");

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn manifest() -> toml::Table {
    read("Cargo.toml").parse().expect("Cargo.toml parses")
}

fn deb() -> toml::Table {
    manifest()["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb]")
        .clone()
}

/// `[package.metadata.deb] assets` as (source, destination, mode).
fn assets() -> Vec<(String, String, String)> {
    deb()["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|a| {
            let a = a.as_array().expect("[source, dest, mode]");
            let s = |i: usize| a[i].as_str().expect("a string").to_string();
            (s(0), s(1), s(2))
        })
        .collect()
}

/// The unit's settings, `KEY=VALUE` lines outside comments.
fn unit_setting(key: &str) -> String {
    read("systemd/procagentd.service")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_string()
}

/// Where an asset installs `src`'s file: `dest`, or `dest` + the file's name for a directory.
fn installed_path(src: &str, dest: &str) -> String {
    if dest.ends_with('/') {
        let name = Path::new(src)
            .file_name()
            .expect("an asset source names a file")
            .to_string_lossy();
        format!("/{dest}{name}")
    } else {
        format!("/{dest}")
    }
}

#[test]
fn binaries_and_files_the_package_ships_exist_or_are_generated() {
    let assets = assets();
    // Every binary of the crate, executable, in /usr/bin.
    let m = manifest();
    let bins: Vec<&str> = m["bin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(bins.len(), 2, "{bins:?}");
    for b in bins {
        let src = format!("target/release/{b}");
        assert!(
            assets
                .iter()
                .any(|(s, d, mode)| *s == src && d == "usr/bin/" && mode == "755"),
            "{b} is not packaged to /usr/bin, 0755: {assets:?}"
        );
    }
    // What is not built (target/) is in the tree; nothing else is executable.
    for (src, dest, mode) in &assets {
        if !src.starts_with("target/") {
            assert!(
                Path::new(ROOT).join(src).is_file(),
                "{src} (for {dest}) is missing"
            );
        }
        if !src.starts_with("target/release/") {
            assert_eq!(mode, "644", "{src}");
        }
    }
    // The generated ones are what packaging/build-deb.sh writes into target/packaging/.
    let script = read("packaging/build-deb.sh");
    for (src, _, _) in assets
        .iter()
        .filter(|(s, _, _)| s.starts_with("target/packaging/"))
    {
        let rel = src.trim_start_matches("target/packaging/");
        let written = if rel == "man/*.1" {
            script.contains("man --dir \"$gen/man\"")
        } else {
            script.contains(&format!(">\"$gen/{rel}\""))
        };
        assert!(written, "packaging/build-deb.sh does not write {src}");
    }
}

#[test]
fn the_unit_names_the_pages_the_package_installs() {
    let assets = assets();
    let docs = unit_setting("Documentation");
    let refs: Vec<&str> = docs.split_whitespace().collect();
    assert_eq!(
        refs,
        ["man:procagentd(8)", "man:agent.toml(5)", "man:procagent(1)"],
        "Documentation= names the three pages"
    );
    for r in refs {
        let page = r.trim_start_matches("man:");
        let (name, section) = page.trim_end_matches(')').split_once('(').unwrap();
        let file = format!("{name}.{section}");
        // Packaged: an asset of that section whose file (or glob) is the page.
        assert!(
            assets.iter().any(|(s, d, _)| {
                d == &format!("usr/share/man/man{section}/")
                    && (s.ends_with(&format!("/{file}")) || s.ends_with(&format!("/*.{section}")))
            }),
            "{r} is not packaged: {assets:?}"
        );
        // And the CLI makes it, with the title the reference names.
        let args: Vec<&str> = if name == "procagent" {
            vec!["man"]
        } else {
            vec!["man", name]
        };
        let out = Command::new(CLI).args(&args).output().unwrap();
        assert!(out.status.success(), "procagent {args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("\n.TH {name} {section} ")),
            "procagent {args:?} is not {r}"
        );
    }
}

/// The group `postinst` creates.
fn postinst_group() -> String {
    let postinst = read("packaging/debian/postinst");
    let line = postinst
        .lines()
        .find(|l| l.trim_start().starts_with("addgroup --system"))
        .expect("postinst runs addgroup --system");
    line.split_whitespace()
        .last()
        .expect("addgroup's group")
        .to_string()
}

#[test]
fn the_packaged_config_is_where_the_unit_reads_it_and_agrees_with_the_package() {
    // The unit passes --config PATH; the package installs its config there, as a conffile
    // (cargo-deb makes every file under /etc one).
    let exec = unit_setting("ExecStart");
    let path = exec
        .split_once("--config ")
        .map(|(_, p)| p.split_whitespace().next().unwrap())
        .expect("ExecStart passes --config");
    assert_eq!(path, procagent::daemon_cli::DEFAULT_CONFIG);
    assert!(unit_setting("ExecStartPre").contains(&format!("--config {path} --check")));
    let (src, _, _) = assets()
        .into_iter()
        .find(|(s, d, _)| installed_path(s, d) == path)
        .unwrap_or_else(|| panic!("no asset installs {path}"));
    assert!(path.starts_with("/etc/"), "a conffile lives in /etc");
    // It loads with the strict loader.
    let dir = tempfile::tempdir().unwrap();
    let cfg = procagent::config::load_with_base(&Path::new(ROOT).join(&src), dir.path())
        .unwrap_or_else(|e| panic!("{src} does not load:\n{e}"));
    assert!(
        cfg.processes.is_empty(),
        "the packaged config starts nothing"
    );
    // Its socket and state directory are the ones the unit creates.
    let runtime = unit_setting("RuntimeDirectory");
    let state = unit_setting("StateDirectory");
    assert_eq!(
        cfg.socket.parent(),
        Some(Path::new(&format!("/run/{runtime}")))
    );
    assert_eq!(cfg.api.root_socket.parent(), cfg.socket.parent());
    assert_eq!(cfg.state_dir, Path::new(&format!("/var/lib/{state}")));
    // The socket's group is the one postinst creates, which is also the read-only group
    // (agent.toml(5) says so); conf_dir is the directory postinst makes.
    let group = postinst_group();
    assert_eq!(cfg.api.socket_group.as_deref(), Some(group.as_str()));
    assert_eq!(cfg.api.readonly_group.as_deref(), Some(group.as_str()));
    assert!(read("man/agent.toml.5").contains(&format!(
        "to \\(dq{group}\\(dq, the group its postinst creates"
    )));
    let conf_dir = cfg.conf_dir.expect("the packaged config has a conf_dir");
    assert!(
        read("packaging/debian/postinst")
            .contains(&format!("install -d -m 0755 {}", conf_dir.display())),
        "postinst does not create {}",
        conf_dir.display()
    );
    // The purge removes the state directory the unit uses.
    assert!(read("packaging/debian/postrm").contains(&format!("rm -rf /var/lib/{state}\n")));
}

#[test]
fn maintainer_scripts_changelog_description_and_pins_agree() {
    let deb = deb();
    // cargo-deb inserts its systemd part at the one #DEBHELPER# line of each script.
    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    for s in ["postinst", "postrm"] {
        let rel = format!("{scripts}/{s}");
        let text = read(&rel);
        assert!(text.starts_with("#!/bin/sh\n"), "{rel}");
        assert_eq!(text.matches("#DEBHELPER#").count(), 1, "{rel}");
        assert!(text.lines().any(|l| l == "#DEBHELPER#"), "{rel}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(Path::new(ROOT).join(&rel))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o111, 0o111, "{rel} is not executable");
    }
    // The unit cargo-deb finds: <unit-name>.service in unit-scripts.
    let units = deb["systemd-units"].as_table().unwrap();
    let unit = format!(
        "{}/{}.service",
        units["unit-scripts"].as_str().unwrap(),
        units["unit-name"].as_str().unwrap()
    );
    assert_eq!(unit, "systemd/procagentd.service");
    // Upgrades restart only the agent (KillMode=process): no stop before the new files.
    assert_eq!(units["restart-after-upgrade"].as_bool(), Some(true));
    assert_eq!(unit_setting("KillMode"), "process");
    // The changelog's newest entry is this version (revision 1, cargo-deb's default).
    let m = manifest();
    let version = m["package"]["version"].as_str().unwrap();
    let changelog = read(deb["changelog"].as_str().unwrap());
    let first = changelog.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("procagent ({version}-1) ")),
        "{first}"
    );
    // The description is the package's synopsis: one line, short enough not to be wrapped.
    let desc = m["package"]["description"].as_str().unwrap();
    assert!(desc.len() <= 79 && !desc.ends_with('.'), "{desc:?}");
    // One cargo-deb version, in the build script and in Cargo.toml's note.
    let script = read("packaging/build-deb.sh");
    let pinned = script
        .lines()
        .find_map(|l| l.strip_prefix("CARGO_DEB_VERSION="))
        .expect("build-deb.sh pins cargo-deb");
    assert!(
        read("Cargo.toml").contains(&format!(
            "cargo-deb {pinned}: `cargo install cargo-deb --version ={pinned} --locked`"
        )),
        "Cargo.toml's note names another cargo-deb than {pinned}"
    );
    // Each lintian override has its reason just above it.
    let overrides = read("packaging/debian/procagent.lintian-overrides");
    let lines: Vec<&str> = overrides.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if !l.is_empty() && !l.starts_with('#') {
            assert!(l.starts_with("procagent: "), "{l}");
            assert!(i > 0 && lines[i - 1].starts_with("# "), "no reason for {l}");
        }
    }
}
