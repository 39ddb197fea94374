//! The supervision event history: a bounded in-memory ring (newest kept), a broadcast channel
//! for live followers (`GET /v1/events?follow=1`), a copy in the store, and a tracing line
//! for each event.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use crate::proto::Event;
use crate::spec::ProcKey;
use crate::store::Store;

struct Ring {
    events: VecDeque<Kept>,
    next_id: u64,
}

/// An event as the ring keeps it: exact-size strings, and `data` as its JSON text. A
/// `Value` object costs a B-tree node of about 600 bytes however few its fields (most
/// events carry one, a pid), so ten thousand events kept as [`Event`]s held about 9 MiB;
/// kept like this, about a quarter of it. Turned back into an [`Event`] when listed.
struct Kept {
    id: u64,
    ts_ms: i64,
    key: Box<str>,
    kind: Box<str>,
    message: Box<str>,
    /// `None` for `null`.
    data: Option<Box<str>>,
}

impl Kept {
    fn of(e: &Event) -> Kept {
        Kept {
            id: e.id,
            ts_ms: e.ts_ms,
            key: e.key.as_str().into(),
            kind: e.kind.as_str().into(),
            message: e.message.as_str().into(),
            data: (!e.data.is_null()).then(|| e.data.to_string().into_boxed_str()),
        }
    }

    fn event(&self) -> Event {
        Event {
            id: self.id,
            ts_ms: self.ts_ms,
            key: self.key.to_string(),
            kind: self.kind.to_string(),
            message: self.message.to_string(),
            // Text this ring wrote from a `Value`: it reads back as the same value.
            data: self
                .data
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default(),
        }
    }
}

/// The event log.
pub struct EventLog {
    ring: Mutex<Ring>,
    cap: usize,
    tx: broadcast::Sender<Event>,
    store: Store,
}

impl EventLog {
    /// A log holding at most `cap` events in memory, seeded with `loaded` (oldest first).
    pub fn new(store: Store, cap: usize, loaded: Vec<Event>) -> EventLog {
        let next_id = loaded.last().map(|e| e.id + 1).unwrap_or(1);
        let skip = loaded.len().saturating_sub(cap);
        let events: VecDeque<Kept> = loaded.iter().skip(skip).map(Kept::of).collect();
        let (tx, _) = broadcast::channel(4096);
        EventLog {
            ring: Mutex::new(Ring { events, next_id }),
            cap,
            tx,
            store,
        }
    }

    /// Record an event.
    pub fn emit(
        &self,
        key: Option<&ProcKey>,
        kind: &str,
        message: impl Into<String>,
        data: serde_json::Value,
    ) {
        let message = message.into();
        let key_s = key.map(|k| k.to_string()).unwrap_or_default();
        let ev = {
            let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            let ev = Event {
                id: r.next_id,
                ts_ms: crate::util::unix_millis(),
                key: key_s,
                kind: kind.to_string(),
                message,
                data,
            };
            r.next_id += 1;
            r.events.push_back(Kept::of(&ev));
            while r.events.len() > self.cap {
                r.events.pop_front();
            }
            ev
        };
        match kind {
            "exited" | "backoff" | "start_failed" | "limit_exceeded" | "health_failed"
            | "stop_failed" => {
                tracing::warn!(process = %ev.key, kind = %ev.kind, "{}", ev.message)
            }
            _ => tracing::info!(process = %ev.key, kind = %ev.kind, "{}", ev.message),
        }
        self.store.insert_event(ev.clone());
        let _ = self.tx.send(ev);
    }

    /// Events after `after_id` and at or after `since_ms`, optionally for one key, oldest
    /// first, at most `limit`. Served from memory; older history comes from the store.
    pub async fn list(
        &self,
        after_id: u64,
        since_ms: i64,
        key: Option<&str>,
        limit: usize,
    ) -> Vec<Event> {
        let mem_oldest = {
            let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            r.events.front().map(|e| e.id)
        };
        let filt = |id: u64, ts_ms: i64, k: &str| {
            id > after_id && ts_ms >= since_ms && key.is_none_or(|want| k == want)
        };
        let mut out: Vec<Event> = Vec::new();
        if mem_oldest.is_none_or(|oldest| oldest > after_id + 1) {
            // Part of the range is older than memory: read it from the store, on a blocking
            // thread (SQLite).
            let store = self.store.clone();
            let n = limit.saturating_mul(4).max(1000);
            let read =
                tokio::task::spawn_blocking(move || store.read_events(after_id, since_ms, n)).await;
            if let Ok(Ok(evs)) = read {
                out.extend(
                    evs.into_iter()
                        .filter(|e| mem_oldest.is_none_or(|o| e.id < o))
                        .filter(|e| filt(e.id, e.ts_ms, &e.key)),
                );
            }
        }
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        // Only the newest `limit` of what matches are turned back into events.
        let matching = r
            .events
            .iter()
            .filter(|e| filt(e.id, e.ts_ms, &e.key))
            .count();
        let from_memory = matching.min(limit);
        let older = out.len().min(limit - from_memory);
        out.drain(..out.len() - older);
        out.extend(
            r.events
                .iter()
                .filter(|e| filt(e.id, e.ts_ms, &e.key))
                .skip(matching - from_memory)
                .map(Kept::event),
        );
        out
    }

    /// A receiver of live events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: u64, key: &str, data: serde_json::Value) -> Event {
        Event {
            id,
            ts_ms: id as i64 * 10,
            key: key.into(),
            kind: "started".into(),
            message: format!("event {id}"),
            data,
        }
    }

    /// The ring keeps the newest `cap` events in its compact form and lists them as they
    /// were emitted: filtered by id, time and key, the newest `limit` of them, `data`
    /// (objects, numbers, strings, null) unchanged.
    #[tokio::test]
    async fn kept_events_list_as_they_were_emitted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("s.db"), 10, 10, 0).unwrap();
        let loaded: Vec<Event> = (1..=4)
            .map(|i| ev(i, "ns/old", serde_json::json!({"pid": i})))
            .collect();
        let log = EventLog::new(store, 5, loaded.clone());
        let k = ProcKey::new("ns", "a");
        let datas = [
            serde_json::json!({"pid": 12, "exit": {"code": -1, "signal": "SIGKILL"}}),
            serde_json::json!(1.5e300),
            serde_json::json!("text with \"quotes\" and \u{1}"),
            serde_json::Value::Null,
        ];
        for d in &datas {
            log.emit(Some(&k), "exited", "gone", d.clone());
        }
        // Memory holds the newest 5: the last loaded one and the 4 emitted.
        let all = log.list(0, 0, None, 100).await;
        let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![4, 5, 6, 7, 8]);
        assert_eq!(all[0], loaded[3]);
        for (e, d) in all[1..].iter().zip(&datas) {
            assert_eq!((e.key.as_str(), e.kind.as_str()), ("ns/a", "exited"));
            assert_eq!((e.message.as_str(), &e.data), ("gone", d));
        }
        // Filters, and the newest `limit` of what matches.
        let two = log.list(0, 0, Some("ns/a"), 2).await;
        assert_eq!(two.iter().map(|e| e.id).collect::<Vec<_>>(), vec![7, 8]);
        let after = log.list(6, 0, None, 100).await;
        assert_eq!(after.iter().map(|e| e.id).collect::<Vec<_>>(), vec![7, 8]);
        assert!(log.list(0, 0, Some("ns/none"), 100).await.is_empty());
    }
}
