//! Helpers of the security and fault tests: real accounts created for one test and removed
//! after it, running the CLI (or a socket client, `peer.py`) as one of them, commands with a
//! deadline, and filesystems mounted for one test.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

/// The usual cast of the socket tests, created for one test and removed after it: groups
/// for the socket, for admins and for readers; an admin (through a supplementary group), a
/// reader (read-only through its primary group) and another uid that is in the socket group
/// but has no role. More accounts can be added through `acc`.
pub struct Cast {
    pub acc: Accounts,
    pub sock_g: String,
    pub adm_g: String,
    pub ro_g: String,
    pub admin: User,
    pub reader: User,
    pub other: User,
}

impl Cast {
    pub fn new() -> Cast {
        let mut acc = Accounts::new();
        let sock_g = acc.group("sock");
        let adm_g = acc.group("adm");
        let ro_g = acc.group("ro");
        let admin = acc.user("a", None, &[&adm_g, &sock_g]);
        let reader = acc.user("r", Some(&ro_g), &[&sock_g]);
        let other = acc.user("o", None, &[&sock_g]);
        Cast {
            acc,
            sock_g,
            adm_g,
            ro_g,
            admin,
            reader,
            other,
        }
    }

    /// The `[api]` table that gives the cast's groups their roles, followed by `extra`.
    pub fn api_config(&self, extra: &str) -> String {
        format!(
            "[api]\nadmin_group = \"{}\"\nreadonly_group = \"{}\"\nsocket_group = \"{}\"\n{extra}",
            self.adm_g, self.ro_g, self.sock_g
        )
    }
}

/// A directory `name` in the test's temp dir, owned by `u` (where that account may write its
/// own pid files, symlinks, ...).
pub fn owned_dir(env: &super::TestEnv, name: &str, u: &User) -> PathBuf {
    let dir = env.path().join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    nix::unistd::chown(
        &dir,
        Some(nix::unistd::Uid::from_raw(u.uid)),
        Some(nix::unistd::Gid::from_raw(u.gid)),
    )
    .expect("chown");
    dir
}

/// The CLI, copied where every account can execute it.
pub fn cli_copy(env: &super::TestEnv) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = env.path().join("procagent-cli");
    std::fs::copy(super::CLI, &p).expect("copy cli");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p.display().to_string()
}

/// `setpriv ... -- prog`: a command that runs `prog` as `user` (its uid, primary gid and
/// supplementary groups), in `/`, without colours.
pub fn as_user(user: &User, prog: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(prog)
        .env("NO_COLOR", "1")
        .current_dir("/");
    c
}

/// Run `prog args` as `user` (its uid, primary gid and supplementary groups) through
/// setpriv; returns (exit code, stdout, stderr).
pub fn run_as(user: &User, prog: &str, args: &[&str]) -> (i32, String, String) {
    let out = as_user(user, prog).args(args).output().expect("setpriv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The socket clients of `peer.py` (see its docstring), run as other accounts.
pub const PEER_PY: &str = include_str!("peer.py");

/// A python3 that every account may run (a pyenv shim under /root is not one), if any.
pub fn system_python() -> Option<String> {
    ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .map(str::to_string)
}

/// `prog args` as `user` through setpriv (or as this process when `user` is None), stdin and
/// stdout piped, stdout read line by line; killed when dropped.
pub struct AsUser {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl AsUser {
    pub fn spawn(user: Option<&User>, prog: &str, args: &[&str]) -> AsUser {
        let mut cmd = match user {
            Some(u) => as_user(u, prog),
            None => Command::new(prog),
        };
        let mut child = cmd
            .args(args)
            .env_remove("PROCAGENT_SOCKET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        AsUser { child, lines }
    }

    /// The next line it prints, or panic after `timeout`.
    pub fn line(&mut self, what: &str, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no output from {what} within {timeout:?}: {e}"))
    }

    /// The next line it prints within `timeout`, if any.
    pub fn try_line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Write a line to its stdin.
    pub fn say(&mut self, text: &str) {
        if let Some(i) = self.child.stdin.as_mut() {
            let _ = writeln!(i, "{text}");
        }
    }

    /// Close its stdin (the peer.py modes that hold connections end then).
    pub fn close_stdin(&mut self) {
        self.child.stdin.take();
    }

    /// Wait for it to exit within `timeout`; kill it after.
    pub fn finish(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `cmd` to its end within `timeout`: Some((exit code, stdout, stderr)), or None (after
/// killing it) when it did not finish in time.
pub fn run_within(cmd: &mut Command, timeout: Duration) -> Option<(i32, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .map(|r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    })
    .collect();
    let end = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let texts: Vec<String> = readers
        .into_iter()
        .map(|t| t.join().unwrap_or_default())
        .collect();
    status.map(|st| (st.code().unwrap_or(-1), texts[0].clone(), texts[1].clone()))
}

/// `prog args` as `user` through setpriv, within `timeout` (see [`run_within`]).
pub fn run_as_within(
    user: &User,
    prog: &str,
    args: &[&str],
    timeout: Duration,
) -> Option<(i32, String, String)> {
    run_within(as_user(user, prog).args(args), timeout)
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

/// A FUSE filesystem whose server never answers: every lookup under it blocks in the kernel,
/// the realistic hung mount (an NFS server gone away behaves alike). The server's end of
/// `/dev/fuse` is held by a `sleep` of the test (in `owner_dir`, so a test's clean-up finds
/// it); dropping this kills it, which aborts the connection (blocked calls fail with
/// ENOTCONN), then unmounts.
pub struct HungFuse {
    pub path: PathBuf,
    holder: Option<std::process::Child>,
}

impl HungFuse {
    pub fn mount(path: &Path, owner_dir: &Path) -> Result<HungFuse, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("mounting needs root".into());
        }
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse does not exist".into());
        }
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let script = format!(
            "exec 3<>/dev/fuse || exit 1; mount -i -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0,allow_other hung '{}' || exit 2; echo mounted; exec sleep 100000",
            path.display()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(owner_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        if line.trim() != "mounted" {
            let _ = child.kill();
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "cannot mount a FUSE filesystem: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(HungFuse {
            path: path.to_path_buf(),
            holder: Some(child),
        })
    }
}

impl Drop for HungFuse {
    fn drop(&mut self) {
        if let Some(mut c) = self.holder.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = run("umount", &["-l", &self.path.display().to_string()]);
    }
}

/// Can this test create accounts and switch to them (root, and the tools exist)? Prints why
/// not.
pub fn accounts_available() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: creating accounts and switching to them needs root");
        return false;
    }
    for tool in ["useradd", "groupadd", "userdel", "groupdel", "setpriv"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed");
            return false;
        }
    }
    true
}

/// `procagent --socket SOCKET call API BODY` as `user`: (exit code, envelope or null, stderr).
pub fn call_as(
    cli: &str,
    socket: &Path,
    user: &User,
    api: &str,
    body: &serde_json::Value,
) -> (i32, serde_json::Value, String) {
    let sock = socket.display().to_string();
    let (code, out, err) = run_as(
        user,
        cli,
        &["--socket", &sock, "call", api, &body.to_string()],
    );
    let v = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
    (code, v, err)
}
