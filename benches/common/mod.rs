//! What the benches share: the wall clock their markers write, a cgroup v2 subtree of the
//! bench's own and its removal, and the clean-up of every process a bench left behind.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A cgroup v2 directory for the bench (root only), below the v2 mount.
pub fn contained_root(dir: &Path) -> Result<PathBuf, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root".into());
    }
    let mi = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mount = procagent::cgroup::v2_mount(&mi).ok_or("no cgroup v2 mount")?;
    let root = mount.join(format!(
        "procagent-bench-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::create_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    Ok(root)
}

/// Remove a cgroup tree, leaves first.
pub fn remove_tree(d: &Path) {
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(d);
}

/// Kill every process whose argv mentions the bench dir (the agent's keeper included).
pub fn cleanup(dir: &Path) {
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
