//! The space reserve: a file of `store.reserve_bytes` in the state directory
//! (`STATE/reserve`), so that the intent of a stop, kill or unmanage can still be committed
//! when the state directory is full.
//!
//! The store's writer thread owns it. When a commit that must not fail meets a full disk,
//! the file is removed (its blocks return to the file system) and the commit is tried again
//! at once. From then on the reserve is *spent*: only such commits are attempted, everything
//! else waits (background writes) or is refused (other changes), so nothing else eats the
//! space it freed. Every second the writer tries to create the file again; once it exists
//! the queued writes are retried as usual. The file is written out in full (fallocate,
//! or zeros where the file system has no fallocate), so its blocks are really taken.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The file exists with its full size.
    Held,
    /// Released (or could not be created for lack of space): to be created again.
    Spent,
    /// No reserve (size 0, or it cannot be created for another reason).
    Off,
}

/// The reserve file and what is known of it.
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    bytes: u64,
    state: State,
}

impl Reserve {
    /// Take the reserve at `path` (creating it when missing or of another size). A disk too
    /// full for it leaves it spent; `bytes` 0 disables it.
    pub fn new(path: &Path, bytes: u64) -> Reserve {
        let mut r = Reserve {
            path: path.to_path_buf(),
            bytes,
            state: State::Off,
        };
        if bytes == 0 {
            let _ = std::fs::remove_file(path);
            return r;
        }
        let held = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() == bytes);
        r.state = if held {
            State::Held
        } else {
            let _ = std::fs::remove_file(path);
            match create(path, bytes) {
                Ok(()) => State::Held,
                Err(e) if is_no_space(&e) => {
                    tracing::warn!(path = %path.display(), "no room for the state directory's reserve; it is created once space returns");
                    State::Spent
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot create the state directory's reserve; running without it");
                    State::Off
                }
            }
        };
        r
    }

    /// Released and not yet restored: only commits that must not fail may use the disk.
    pub fn spent(&self) -> bool {
        self.state == State::Spent
    }

    /// Remove the file so that its space can be used now. True when space was freed.
    pub fn release(&mut self) -> bool {
        if self.state != State::Held {
            return false;
        }
        self.state = State::Spent;
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                tracing::warn!(path = %self.path.display(), bytes = self.bytes, "state directory full: its reserve is released for a stop, kill or unmanage");
                true
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot release the state directory's reserve");
                false
            }
        }
    }

    /// Try to create the file again; true when the reserve is held.
    pub fn restore(&mut self) -> bool {
        if self.state != State::Spent {
            return self.state == State::Held;
        }
        match create(&self.path, self.bytes) {
            Ok(()) => {
                self.state = State::Held;
                tracing::info!(path = %self.path.display(), "the state directory's reserve is back");
                true
            }
            Err(_) => false,
        }
    }

    /// Does the file system look full (less free than the reserve's size)? For commit
    /// errors that do not say "disk full" themselves.
    pub fn looks_full(&self) -> bool {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        rustix::fs::statvfs(dir)
            .is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) < self.bytes.max(64 << 10))
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Write the reserve file in full under a temporary name, then rename it into place.
fn create(path: &Path, bytes: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let res = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, bytes) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let block = vec![0u8; 64 << 10];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    f.write_all(&block[..n])?;
                    left -= n as u64;
                }
            }
            Err(e) => return Err(e.into()),
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_released_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("reserve");
        let mut r = Reserve::new(&p, 100_000);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 100_000);
        assert!(!r.spent());
        assert!(r.release());
        assert!(!p.exists() && r.spent());
        assert!(!r.release(), "released once");
        assert!(r.restore());
        assert!(!r.spent() && p.exists());
        // Another size is recreated; 0 removes it.
        let r2 = Reserve::new(&p, 70_000);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 70_000);
        assert!(!r2.spent());
        let mut off = Reserve::new(&p, 0);
        assert!(!p.exists());
        assert!(!off.release() && !off.spent() && !off.restore());
    }
}
