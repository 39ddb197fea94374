//! The README's quick start, as an operator runs it: the agent and the CLI with
//! `--config examples/quickstart.toml`, from the repository root and from any other directory
//! (relative paths are the config file's), `procagentd --check`, and what the CLI says when
//! its config cannot be read.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `examples/` copied into `root` (so that `.procagent` is written there, not in the
/// repository).
fn copy_examples(root: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let st = Command::new("cp")
        .arg("-r")
        .arg(&src)
        .arg(root)
        .status()
        .expect("cp");
    assert!(st.success());
}

/// Run `program` with `args` in `cwd`: (exit code, stdout, stderr).
fn run_in(cwd: &Path, program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("PROCAGENT_SOCKET")
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The ticker's pid, from the pid file the quick start gives it.
fn ticker_pid(root: &Path) -> Option<i32> {
    read_pid(&root.join(".procagent/ticker.pid").display().to_string())
}

#[test]
fn the_quick_start_works_from_the_repository_root_and_from_any_directory() {
    let env = TestEnv::new();
    let root = env.path().join("repo");
    let elsewhere = env.path().join("elsewhere");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    copy_examples(&root);
    let config = root.join("examples/quickstart.toml");
    let config_s = config.display().to_string();

    // --check from another directory: ok, and it says how relative paths resolve.
    let (code, out, err) = run_in(&elsewhere, DAEMON, &["--check", "--config", &config_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok (1 processes declared)"), "{out}");
    let demo = root.join("examples/demo").display().to_string();
    assert!(
        out.contains("note:") && out.contains(&format!("resolves to {demo}")),
        "{out}"
    );

    // The agent started in another directory writes under the repository's .procagent.
    let socket = root.join(".procagent/run/procagent.sock");
    let d = Daemon::start_in(&env, DAEMON, &config, &elsewhere, &socket);
    let pid = wait_for("the ticker runs", Duration::from_secs(30), || {
        ticker_pid(&root).filter(|p| alive(*p))
    });
    assert!(!elsewhere.join(".procagent").exists());

    // The README's CLI line, from the repository root; then the same config from elsewhere.
    for (cwd, cfg) in [
        (&root, "examples/quickstart.toml"),
        (&elsewhere, config_s.as_str()),
    ] {
        let (code, out, err) = wait_for("status shows the ticker", Duration::from_secs(30), || {
            let r = run_in(cwd, CLI, &["--config", cfg, "status"]);
            (r.0 == 0 && r.1.contains("demo/ticker") && r.1.contains("running")).then_some(r)
        });
        assert_eq!(code, 0, "{out}{err}");
        for args in [
            vec!["--config", cfg, "logs", "demo/ticker", "-n", "5"],
            vec!["--config", cfg, "events", "demo/ticker"],
        ] {
            let (code, out, err) = run_in(cwd, CLI, &args);
            assert_eq!(code, 0, "{args:?}: {out}{err}");
            assert!(out.contains("ticker"), "{args:?}: {out}");
        }
    }

    // A config the CLI cannot read: how to name the socket instead.
    let (code, _, err) = run_in(&elsewhere, CLI, &["--config", "missing.toml", "status"]);
    assert_eq!(code, 2, "a usage error: {err}");
    assert!(
        err.contains("--socket") && err.contains("PROCAGENT_SOCKET"),
        "{err}"
    );

    let (code, out, err) = d.cli(&["stop", "demo/ticker"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for("the ticker stopped", Duration::from_secs(15), || {
        (!alive(pid)).then_some(())
    });
    drop(d);
}
