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
    events: VecDeque<Event>,
    next_id: u64,
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
        let mut events: VecDeque<Event> = loaded.into();
        while events.len() > cap {
            events.pop_front();
        }
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
            r.events.push_back(ev.clone());
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
        let filt =
            |e: &Event| e.id > after_id && e.ts_ms >= since_ms && key.is_none_or(|k| e.key == k);
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
                        .filter(&filt),
                );
            }
        }
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        out.extend(r.events.iter().filter(|e| filt(e)).cloned());
        if out.len() > limit {
            let cut = out.len() - limit;
            out.drain(..cut);
        }
        out
    }

    /// A receiver of live events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
