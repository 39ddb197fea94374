//! Small helpers shared across modules: wall-clock time, random numbers, file-name-safe keys,
//! the edit distance behind every "did you mean".

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Unix time in milliseconds.
pub fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

static RNG: Mutex<u64> = Mutex::new(0);

fn seed() -> u64 {
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_ok()
    {
        let s = u64::from_le_bytes(buf);
        if s != 0 {
            return s;
        }
    }
    (unix_millis() as u64) ^ ((std::process::id() as u64) << 32) | 1
}

/// A pseudo-random u64 (xorshift64*, seeded from /dev/urandom). Not for secrets: used for
/// backoff jitter and request ids.
pub fn random_u64() -> u64 {
    let mut g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    if *g == 0 {
        *g = seed();
    }
    let mut x = *g;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *g = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// A uniform float in [0, 1).
pub fn random_unit() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

static REQ: AtomicU64 = AtomicU64::new(0);

/// The name of the environment variable that carries a command's lineage token.
pub const LINEAGE_VAR: &str = "PROCAGENT_SPAWN";

/// A fresh lineage token for one command the agent runs: 128 bits from the kernel's CSPRNG
/// (`getrandom`), so that no process can name a command's lineage it did not inherit.
pub fn lineage_token() -> std::io::Result<u128> {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        filled += rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(u128::from_le_bytes(b))
}

/// A request id: 32 hex digits, unique within the process and random across processes.
pub fn request_id() -> String {
    let n = REQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:016x}{:016x}",
        random_u64(),
        n ^ random_u64().rotate_left(17)
    )
}

/// A file-name-safe rendering of a `namespace/name` pair: safe characters kept (others
/// replaced, each part cut at 64), then 128 bits of SHA-256 over the exact key (`namespace`,
/// NUL, `name`; no key contains NUL). The readable part is for humans only: two keys share a
/// stem only if they share the digest, which no caller can arrange (a short checksum could
/// be inverted to land one account's output in another's file).
pub fn safe_file_stem(namespace: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect()
    };
    let mut h = Sha256::new();
    h.update(namespace.as_bytes());
    h.update([0u8]);
    h.update(name.as_bytes());
    let digest = h.finalize();
    let mut stem = format!("{}__{}.", clean(namespace), clean(name));
    for b in &digest[..16] {
        let _ = write!(stem, "{b:02x}");
    }
    stem
}

/// Keep at most `max` bytes of `text`, from its end, on a char boundary, marking the cut.
pub fn tail_bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {} bytes cut ...]\n{}", start, &text[start..])
}

/// Levenshtein distance, by characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stems_of_distinct_keys_differ_even_when_chosen_to_collide() {
        // Same readable part, and the same 32-bit FNV-1a the stems used to end with.
        let root = safe_file_stem("bk_ops", "gse_agent");
        let forged = safe_file_stem("bk\u{e373}ops", "gse\u{3bd4}agent");
        assert_ne!(root, forged);
        assert!(root.starts_with("bk_ops__gse_agent."), "{root}");
        // The separator is part of what is hashed: ("a_", "b") is not ("a", "_b").
        assert_ne!(safe_file_stem("a_", "b"), safe_file_stem("a", "_b"));
        assert_ne!(safe_file_stem("a/b", "c"), safe_file_stem("a", "b/c"));
        let long = "x".repeat(300);
        assert!(safe_file_stem(&long, &long).len() <= 200);
    }

    #[test]
    fn stems_are_distinct_and_safe() {
        let a = safe_file_stem("ns", "a/b");
        let b = safe_file_stem("ns", "a_b");
        assert_ne!(a, b);
        assert!(!a.contains('/'));
        assert!(safe_file_stem("命名", "x y").is_ascii());
    }

    #[test]
    fn tail_keeps_end() {
        assert_eq!(tail_bounded("hello", 10), "hello");
        let t = tail_bounded("abcdefghij", 3);
        assert!(t.ends_with("hij"));
        assert!(t.contains("7 bytes cut"));
        let u = tail_bounded("ééé", 3); // cut lands mid-char
        assert!(u.ends_with('é'));
    }

    #[test]
    fn random_spread() {
        let v: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(v.iter().any(|x| *x < 0.1) && v.iter().any(|x| *x > 0.9));
        assert_ne!(request_id(), request_id());
    }
}
