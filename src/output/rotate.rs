//! One process's captured output file, kept within its bound by rotation (keeper side).
//!
//! `<stem>.log` is the current file. Before a write would take it past `file_bytes` it is
//! renamed to `<stem>.log.1` (`.1` to `.2`, and so on; the file that would become
//! `.log.<files>` is replaced, so at most `files` files exist) and a new `<stem>.log` is
//! started. Writes are whole record lines, each far smaller than the smallest `file_bytes`,
//! so a file never exceeds `file_bytes` and a process's output never takes more than
//! `file_bytes × files` on disk. Only the keeper writes these files, so a rename loses
//! nothing: a reader holding the old file reads it to its end, then opens the new one.
//!
//! Space: nothing is written while the file system has less than `min_free` bytes
//! available (the store's reserve, doubled, stays free for the agent's own commits), nor
//! when a write fails (a failed write is cut back to the last whole line). What could not be
//! written is counted and said in a note line once writing works again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Rotation and space settings, from the agent's `[store]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    pub file_bytes: u64,
    pub files: u32,
    pub min_free: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            file_bytes: 8 << 20,
            files: 4,
            min_free: 2 << 20,
        }
    }
}

/// How often the free space is measured while writing.
const SPACE_CHECK: Duration = Duration::from_millis(100);

/// Free space on the output directory's file system, measured at most every
/// [`SPACE_CHECK`] and counted down by what is written in between.
pub struct Space {
    dir: PathBuf,
    free: u64,
    checked: Option<Instant>,
}

impl Space {
    pub fn new(dir: &Path) -> Space {
        Space {
            dir: dir.to_path_buf(),
            free: 0,
            checked: None,
        }
    }

    /// May `n` more bytes be written, keeping `min_free` available?
    pub fn allow(&mut self, n: u64, min_free: u64) -> bool {
        if min_free == 0 {
            return true;
        }
        let stale = self.checked.is_none_or(|t| t.elapsed() >= SPACE_CHECK);
        if stale || self.free < n.saturating_add(min_free) {
            self.refresh();
        }
        if self.free >= n.saturating_add(min_free) {
            self.free -= n;
            true
        } else {
            false
        }
    }

    fn refresh(&mut self) {
        self.checked = Some(Instant::now());
        self.free = match rustix::fs::statvfs(&self.dir) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
            // Cannot tell: let the writes themselves fail if they must.
            Err(_) => u64::MAX,
        };
    }
}

/// One output file and its rotated predecessors.
pub struct Rotor {
    dir: PathBuf,
    stem: String,
    file: Option<File>,
    size: u64,
    dropped_bytes: u64,
    dropped_why: String,
}

impl Rotor {
    pub fn new(dir: &Path, stem: &str) -> Rotor {
        Rotor {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            file: None,
            size: 0,
            dropped_bytes: 0,
            dropped_why: String::new(),
        }
    }

    /// The path of file `idx` (0: the current one).
    pub fn path(&self, idx: u32) -> PathBuf {
        if idx == 0 {
            self.dir.join(format!("{}.log", self.stem))
        } else {
            self.dir.join(format!("{}.log.{idx}", self.stem))
        }
    }

    /// Has output been dropped that a note has not reported yet?
    pub fn has_dropped(&self) -> bool {
        self.dropped_bytes > 0
    }

    /// Close the current file (it is reopened, in append mode, at the next write).
    pub fn close(&mut self) {
        self.file = None;
    }

    fn open(&mut self, lim: &Limits) -> std::io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(self.path(0))?;
        let m = f.metadata()?;
        if !m.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        self.size = m.len();
        self.file = Some(f);
        if self.size > lim.file_bytes {
            // Written under a larger setting (or by an older agent): start a new file.
            self.rotate(lim)?;
        }
        Ok(())
    }

    fn rotate(&mut self, lim: &Limits) -> std::io::Result<()> {
        self.file = None;
        let last = lim.files.max(2) - 1;
        // A leftover of a larger `files` setting would otherwise stay forever.
        let _ = std::fs::remove_file(self.path(last + 1));
        for i in (1..last).rev() {
            ignore_missing(std::fs::rename(self.path(i), self.path(i + 1)))?;
        }
        ignore_missing(std::fs::rename(self.path(0), self.path(1)))?;
        self.size = 0;
        self.open(lim)
    }

    /// Write whole record lines (`buf` ends with a newline; each line is shorter than any
    /// `file_bytes`), rotating as needed. Never fails: what cannot be written is counted.
    pub fn write(&mut self, buf: &[u8], lim: &Limits, space: &mut Space, stamp: &str) {
        if buf.is_empty() {
            return;
        }
        if self.dropped_bytes > 0 {
            let note = super::record::header_line(&format!(
                "{stamp} note: {} bytes of output were not captured ({})",
                self.dropped_bytes, self.dropped_why
            ));
            let before = (self.dropped_bytes, std::mem::take(&mut self.dropped_why));
            if self.write_lines(&note, lim, space) {
                self.dropped_bytes = 0;
            } else {
                // Still failing: the count stays the output's, not the note's.
                (self.dropped_bytes, self.dropped_why) = before;
            }
        }
        self.write_lines(buf, lim, space);
    }

    /// Returns whether everything was written.
    fn write_lines(&mut self, buf: &[u8], lim: &Limits, space: &mut Space) -> bool {
        let mut rest = buf;
        while !rest.is_empty() {
            if let Err(e) = self.open(lim) {
                return self.drop_rest(rest.len(), format!("cannot open the file: {e}"));
            }
            let room = lim.file_bytes.saturating_sub(self.size) as usize;
            let take = if rest.len() <= room {
                rest.len()
            } else {
                rest[..room]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1)
            };
            if take == 0 {
                if self.size == 0 {
                    // A line longer than a whole file (cannot happen with the limits the
                    // config allows): drop it rather than break the bound.
                    let n = rest
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(rest.len(), |i| i + 1);
                    self.drop_rest(n, "a line longer than output_file_bytes".into());
                    rest = &rest[n..];
                    continue;
                }
                if let Err(e) = self.rotate(lim) {
                    return self.drop_rest(rest.len(), format!("cannot rotate: {e}"));
                }
                continue;
            }
            if !space.allow(take as u64, lim.min_free) {
                return self.drop_rest(
                    rest.len(),
                    "the state directory's file system is nearly full".into(),
                );
            }
            let chunk = &rest[..take];
            let Some(f) = self.file.as_mut() else {
                return self.drop_rest(rest.len(), "the file is not open".into());
            };
            match f.write_all(chunk) {
                Ok(()) => self.size += take as u64,
                Err(e) => {
                    // Cut a partly written chunk back to the last whole line.
                    let _ = f.set_len(self.size);
                    self.file = None;
                    return self.drop_rest(rest.len(), format!("write failed: {e}"));
                }
            }
            rest = &rest[take..];
        }
        true
    }

    fn drop_rest(&mut self, n: usize, why: String) -> bool {
        self.dropped_bytes += n as u64;
        self.dropped_why = why;
        false
    }
}

fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(file_bytes: u64, files: u32, min_free: u64) -> Limits {
        Limits {
            file_bytes,
            files,
            min_free,
        }
    }

    fn lines(n: usize, from: usize) -> Vec<u8> {
        (from..from + n)
            .flat_map(|i| format!("line {i:06}\n").into_bytes())
            .collect()
    }

    #[test]
    fn rotation_keeps_every_file_within_its_bound_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let lim = lim(1000, 100, 0);
        let mut space = Space::new(dir.path());
        let mut r = Rotor::new(dir.path(), "s");
        let mut next = 0;
        for chunk in [3, 200, 1, 77, 150] {
            r.write(&lines(chunk, next), &lim, &mut space, "t");
            next += chunk;
        }
        let mut all = Vec::new();
        for i in (0..lim.files).rev() {
            if let Ok(b) = std::fs::read(r.path(i)) {
                assert!(b.len() as u64 <= lim.file_bytes, "file {i}: {}", b.len());
                assert!(b.is_empty() || b.ends_with(b"\n"));
                all.extend(b);
            }
        }
        assert_eq!(all, lines(next, 0));
        assert!(!r.has_dropped());
    }

    #[test]
    fn at_most_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let lim = lim(1000, 3, 0);
        let mut space = Space::new(dir.path());
        let mut r = Rotor::new(dir.path(), "s");
        for i in 0..50 {
            r.write(&lines(20, i * 20), &lim, &mut space, "t");
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        // The newest lines are in the current file.
        let cur = std::fs::read_to_string(r.path(0)).unwrap();
        assert!(cur.ends_with("line 000999\n"), "{cur}");
        // A smaller setting later leaves no stray file behind the new last one.
        let lim2 = Limits { files: 2, ..lim };
        r.close();
        r.write(&lines(100, 1000), &lim2, &mut space, "t");
        assert!(!r.path(2).exists());
    }

    #[test]
    fn nothing_is_written_below_the_free_space_floor_and_the_gap_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        let mut space = Space::new(dir.path());
        let mut r = Rotor::new(dir.path(), "s");
        let full = lim(1 << 20, 2, u64::MAX / 2);
        r.write(b"lost\n", &full, &mut space, "t");
        assert!(r.has_dropped());
        let ok = Limits {
            min_free: 0,
            ..full
        };
        r.write(b"kept\n", &ok, &mut space, "T");
        let text = std::fs::read_to_string(r.path(0)).unwrap();
        assert_eq!(
            text,
            "--- T note: 5 bytes of output were not captured (the state directory's file system is nearly full)\nkept\n"
        );
    }

    #[test]
    fn an_oversized_file_from_before_is_rotated_first() {
        let dir = tempfile::tempdir().unwrap();
        let lim = lim(100, 2, 0);
        let mut r = Rotor::new(dir.path(), "s");
        std::fs::write(r.path(0), vec![b'o'; 500]).unwrap();
        r.write(b"new\n", &lim, &mut Space::new(dir.path()), "t");
        assert_eq!(std::fs::read(r.path(0)).unwrap(), b"new\n");
        assert_eq!(std::fs::read(r.path(1)).unwrap().len(), 500);
    }
}
