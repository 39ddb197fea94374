//! Helpers of the security and fault tests: real accounts created for one test and removed
//! after it, running the CLI as one of them, and filesystems mounted for one test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A unique short suffix for names created by one test run.
pub fn unique_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id() % 0xfff, t % 0xffff)
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Is `prog` on PATH (or an absolute path that exists)?
pub fn have(prog: &str) -> bool {
    if prog.starts_with('/') {
        return Path::new(prog).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).exists()))
        .unwrap_or(false)
}

/// A real account.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Users and groups created for one test, deleted when dropped.
pub struct Accounts {
    pub suffix: String,
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    pub fn new() -> Accounts {
        Accounts {
            suffix: unique_suffix(),
            users: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// Create group `pa<suffix><tag>`; returns its name.
    pub fn group(&mut self, tag: &str) -> String {
        let name = format!("pa{}{tag}", self.suffix);
        run("groupadd", &[&name]).expect("groupadd");
        self.groups.push(name.clone());
        name
    }

    /// Create user `pa<suffix><tag>` with `primary` as its primary group (else a group of
    /// its own) and `extra` as supplementary groups.
    pub fn user(&mut self, tag: &str, primary: Option<&str>, extra: &[&str]) -> User {
        let name = format!("pa{}{tag}", self.suffix);
        let mut args: Vec<String> = vec!["-M".into(), "-s".into(), "/bin/sh".into()];
        match primary {
            Some(g) => {
                args.push("-N".into());
                args.push("-g".into());
                args.push(g.into());
            }
            None => args.push("-U".into()),
        }
        if !extra.is_empty() {
            args.push("-G".into());
            args.push(extra.join(","));
        }
        args.push(name.clone());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run("useradd", &a).expect("useradd");
        self.users.push(name.clone());
        if primary.is_none() {
            self.groups.push(name.clone());
        }
        let u = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .expect("new user resolves");
        User {
            name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }
    }

    pub fn gid(name: &str) -> u32 {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .expect("group resolves")
            .gid
            .as_raw()
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = run("userdel", &["-f", u]);
        }
        for g in self.groups.iter().rev() {
            let _ = run("groupdel", &[g]);
        }
    }
}

/// Run `prog args` as `user` (its uid, primary gid and supplementary groups) through
/// setpriv; returns (exit code, stdout, stderr).
pub fn run_as(user: &User, prog: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(prog)
        .args(args)
        .env("NO_COLOR", "1")
        .current_dir("/")
        .output()
        .expect("setpriv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A filesystem mounted for one test; lazily unmounted when dropped.
pub struct Mount {
    pub path: PathBuf,
    pub loopdev: Option<String>,
}

impl Mount {
    /// A tmpfs of `size` (mount's syntax: 4m) at `path`.
    pub fn tmpfs(path: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
                &path.display().to_string(),
            ],
        )?;
        Ok(Mount {
            path: path.to_path_buf(),
            loopdev: None,
        })
    }

    /// An ext4 filesystem in `image` (created, `mb` MiB) on a loop device at `path`,
    /// mounted errors=remount-ro.
    pub fn ext4(image: &Path, mb: u64, path: &Path) -> Result<Mount, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        if !image.exists() {
            let f = std::fs::File::create(image).map_err(|e| e.to_string())?;
            f.set_len(mb << 20).map_err(|e| e.to_string())?;
            run("mkfs.ext4", &["-q", "-F", &image.display().to_string()])?;
        }
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                &image.display().to_string(),
                &path.display().to_string(),
            ],
        )?;
        let dev = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(&path.display().to_string()))
            .and_then(|l| l.split(" - ").nth(1))
            .and_then(|r| r.split_whitespace().nth(1))
            .map(str::to_string);
        Ok(Mount {
            path: path.to_path_buf(),
            loopdev: dev,
        })
    }

    /// Make an ext4 mount fail like a disk that went bad: the kernel remounts it
    /// read-only (errors=remount-ro) while files stay open.
    pub fn trigger_fs_error(&self) -> Result<(), String> {
        let dev = self.loopdev.as_ref().ok_or("not a loop mount")?;
        let name = dev.rsplit('/').next().unwrap_or(dev);
        std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "1")
            .map_err(|e| format!("trigger_fs_error on {name}: {e}"))
    }

    pub fn unmount(&mut self) -> Result<(), String> {
        run("umount", &[&self.path.display().to_string()])?;
        self.loopdev = None;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = run("umount", &["-l", &self.path.display().to_string()]);
        }
    }
}

/// Can this test mount filesystems (root, and the kernel lets us)?
pub fn can_mount(env_dir: &Path) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("mounting needs root".into());
    }
    let probe = env_dir.join("mount-probe");
    let mut m = Mount::tmpfs(&probe, "1m")?;
    m.unmount()
}
