//! Network figures of one process tree from successive socket dumps: which of the dump's
//! sockets the tree holds (by inode, each socket once however many of its processes hold
//! it), cumulative TCP byte counters that never go back when a connection closes, and the
//! rate between two samples.
//!
//! The kernel keeps byte counters per TCP socket, not per process, and they vanish with the
//! socket. So a [`Tally`] remembers the last counters of every socket it has seen: a socket
//! that is gone (closed, or handed to a process outside the tree) keeps its last values in
//! the totals, and a socket seen again with smaller counters is a new socket that reuses the
//! inode number (its predecessor's last values are kept too).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::sockdiag::SockTable;

/// The sockets of one dump that a tree holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// TCP sockets (the ones with byte counters), each once.
    pub tcp: Vec<u64>,
    /// TCP and UDP sockets held (listening ones included).
    pub sockets: u64,
}

/// Of the socket inodes the tree's processes hold (from their descriptors, in any order,
/// with repeats when processes share a socket), the ones the dump lists. Unix sockets and
/// sockets of other network namespaces are in no dump and are not counted.
pub fn held<'a>(inodes: impl IntoIterator<Item = &'a u64>, table: &SockTable) -> Held {
    let mut seen = HashSet::new();
    let mut h = Held::default();
    for &ino in inodes {
        let Some(f) = table.get(&ino) else {
            continue;
        };
        if !seen.insert(ino) {
            continue;
        }
        h.sockets += 1;
        if f.tcp {
            h.tcp.push(ino);
        }
    }
    h
}

/// Cumulative bytes sent and received by a tree's TCP sockets, over every sample since the
/// tally started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// The last counters (sent, received) of the sockets held at the latest sample.
    live: HashMap<u64, (u64, u64)>,
    /// What sockets no longer held had reached.
    gone_sent: u64,
    gone_received: u64,
}

impl Tally {
    /// Take one sample: `tcp` are the sockets the tree holds now ([`Held::tcp`]), `table`
    /// the dump they are in.
    pub fn update(&mut self, tcp: &[u64], table: &SockTable) {
        let mut live = HashMap::with_capacity(tcp.len());
        for ino in tcp {
            let Some(f) = table.get(ino) else {
                continue;
            };
            let now = (f.sent, f.received);
            if let Some(prev) = self.live.remove(ino)
                && (now.0 < prev.0 || now.1 < prev.1)
            {
                // Smaller than before: another socket with a reused inode number.
                self.retire(prev);
            }
            live.insert(*ino, now);
        }
        for (_, prev) in std::mem::replace(&mut self.live, live) {
            self.retire(prev);
        }
    }

    fn retire(&mut self, (sent, received): (u64, u64)) {
        self.gone_sent = self.gone_sent.saturating_add(sent);
        self.gone_received = self.gone_received.saturating_add(received);
    }

    /// Bytes sent (acknowledged by the peers).
    pub fn sent(&self) -> u64 {
        self.live
            .values()
            .fold(self.gone_sent, |a, v| a.saturating_add(v.0))
    }

    /// Bytes received.
    pub fn received(&self) -> u64 {
        self.live
            .values()
            .fold(self.gone_received, |a, v| a.saturating_add(v.1))
    }

    /// Sent plus received.
    pub fn total(&self) -> u64 {
        self.sent().saturating_add(self.received())
    }
}

/// Bytes per second between two readings of a cumulative counter `dt` apart (0 when no
/// time passed).
pub fn rate(prev: u64, now: u64, dt: Duration) -> i64 {
    let secs = dt.as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    (now.saturating_sub(prev) as f64 / secs)
        .round()
        .min(i64::MAX as f64) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockdiag::SockFigures;

    fn table(rows: &[(u64, bool, u64, u64)]) -> SockTable {
        rows.iter()
            .map(|&(ino, tcp, sent, received)| {
                (
                    ino,
                    SockFigures {
                        tcp,
                        sent,
                        received,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn held_counts_a_shared_socket_once_and_skips_what_the_dump_lacks() {
        let t = table(&[(1, true, 10, 20), (2, true, 5, 5), (3, false, 0, 0)]);
        // Parent and child both hold 1 (inherited across fork); 9 is a unix socket.
        let h = held(&[1, 9, 1, 2, 3, 3], &t);
        assert_eq!(h.tcp, vec![1, 2]);
        assert_eq!(h.sockets, 3, "TCP and UDP, each once");
        assert_eq!(held(&[], &t), Held::default());
        assert_eq!(held(&[7, 8], &SockTable::new()).sockets, 0);
    }

    #[test]
    fn closed_sockets_keep_their_bytes() {
        let mut y = Tally::default();
        y.update(&[1, 2], &table(&[(1, true, 100, 10), (2, true, 50, 5)]));
        assert_eq!((y.sent(), y.received()), (150, 15));
        // 1 grows, 2 closes: its 50/5 stay counted.
        y.update(&[1], &table(&[(1, true, 300, 30)]));
        assert_eq!((y.sent(), y.received()), (350, 35));
        // A new socket 3; 1 closes too.
        y.update(&[3], &table(&[(3, true, 7, 1)]));
        assert_eq!((y.sent(), y.received()), (357, 36));
        // Nothing held: nothing lost.
        y.update(&[], &SockTable::new());
        assert_eq!(y.total(), 393);
    }

    #[test]
    fn a_reused_inode_is_a_new_socket() {
        let mut y = Tally::default();
        y.update(&[4], &table(&[(4, true, 1000, 1000)]));
        // Same inode, smaller counters: the old socket closed and a new one took the number.
        y.update(&[4], &table(&[(4, true, 10, 2000)]));
        assert_eq!((y.sent(), y.received()), (1010, 3000));
        y.update(&[4], &table(&[(4, true, 20, 2500)]));
        assert_eq!((y.sent(), y.received()), (1020, 3500));
    }

    #[test]
    fn a_socket_missing_from_the_table_is_retired() {
        let mut y = Tally::default();
        y.update(&[1], &table(&[(1, true, 10, 10)]));
        y.update(&[1], &SockTable::new());
        assert_eq!(y.total(), 20);
    }

    #[test]
    fn rates() {
        let s = Duration::from_secs;
        assert_eq!(rate(0, 3000, s(3)), 1000);
        assert_eq!(rate(100, 100, s(1)), 0);
        assert_eq!(rate(100, 50, s(1)), 0, "never negative");
        assert_eq!(rate(0, 1000, Duration::ZERO), 0);
        assert_eq!(rate(0, 1, Duration::from_millis(200)), 5);
        assert_eq!(rate(0, u64::MAX, Duration::from_nanos(1)), i64::MAX);
    }

    proptest::proptest! {
        /// Whatever sockets come and go and whatever their counters do, the totals never
        /// go back.
        #[test]
        fn totals_never_go_back(samples in proptest::collection::vec(
            proptest::collection::vec((0u64..6, 0u64..1000, 0u64..1000), 0..6), 1..30)) {
            let mut y = Tally::default();
            let (mut sent, mut received) = (0, 0);
            for rows in samples {
                let t: SockTable = rows.iter().map(|&(i, s, r)| (i, SockFigures { tcp: true, sent: s, received: r })).collect();
                let held: Vec<u64> = t.keys().copied().collect();
                y.update(&held, &t);
                proptest::prop_assert!(y.sent() >= sent && y.received() >= received);
                // And the totals cover every socket held now.
                proptest::prop_assert!(y.sent() >= t.values().map(|f| f.sent).sum::<u64>());
                sent = y.sent();
                received = y.received();
            }
        }
    }
}
