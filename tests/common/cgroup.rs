//! The test's own cgroup subtree for the containment tests (tests/containment.rs,
//! tests/security_review.rs): below the cgroup v2 mount, named after the test's temp dir,
//! emptied and removed when dropped. Never a cgroup outside it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{TestEnv, is_root};

/// Supervision settings short enough for the tests' restarts.
pub const FAST: &str =
    "backoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\nsweep_interval = \"200ms\"\n";

/// The test's own cgroup subtree: created below the cgroup v2 mount, emptied (cgroup.kill)
/// and removed when dropped.
pub struct Subtree {
    pub root: PathBuf,
}

impl Subtree {
    pub fn create(env: &TestEnv) -> Result<Subtree, String> {
        if !is_root() {
            return Err("needs root".into());
        }
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let mount = procagent::cgroup::v2_mount(&mountinfo).ok_or("no cgroup v2 mount")?;
        let tag = env
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "x".into());
        let root = mount.join(format!("procagent-test-{tag}"));
        std::fs::create_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        if !root.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&root);
            return Err("cgroup.kill is not supported (Linux 5.14+)".into());
        }
        Ok(Subtree { root })
    }

    /// [`Subtree::create`], or None with the reason printed (the test then skips).
    pub fn or_skip(env: &TestEnv) -> Option<Subtree> {
        Subtree::create(env)
            .map_err(|why| eprintln!("skipped: {why}"))
            .ok()
    }

    pub fn config(&self) -> String {
        format!(
            "[supervisor]\ncgroup_root = \"{}\"\n{FAST}",
            self.root.display()
        )
    }

    /// Every pid anywhere in the subtree.
    pub fn pids(&self) -> Vec<i32> {
        fn walk(d: &Path, out: &mut Vec<i32>) {
            out.extend(procagent::cgroup::procs(d));
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.root, &mut v);
        v
    }
}

impl Drop for Subtree {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.kill"), b"1");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while procagent::cgroup::populated(&self.root) == Some(true)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        procagent::cgroup::remove_empty(&self.root);
    }
}
