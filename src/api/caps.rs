//! Per-uid caps of the socket API: how many connections (main socket) and live follow
//! streams one uid holds at once. A [`UidCaps`] counts; a [`Slot`] is one unit of a uid's
//! allowance and gives it back when dropped, however its connection or stream ends.
//! root and the agent's own uid are never counted (see [`super::auth::full_access_uid`]):
//! the caps exist so that no other account can crowd them out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Counts of one kind of resource (connections, streams) per uid.
#[derive(Debug, Default)]
pub struct UidCaps {
    held: Mutex<HashMap<u32, usize>>,
}

/// One unit of a uid's allowance; given back on drop.
#[derive(Debug)]
pub struct Slot {
    caps: Arc<UidCaps>,
    uid: u32,
}

impl UidCaps {
    pub fn new() -> Arc<UidCaps> {
        Arc::new(UidCaps::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take one unit for `uid` if it holds fewer than `limit`; None when it is at its cap.
    pub fn try_take(self: &Arc<Self>, uid: u32, limit: usize) -> Option<Slot> {
        let mut held = self.lock();
        let n = held.entry(uid).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            caps: self.clone(),
            uid,
        })
    }

    /// How many units `uid` holds now.
    pub fn held(&self, uid: u32) -> usize {
        self.lock().get(&uid).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.caps.lock();
        if let Some(n) = held.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_gets_its_limit_and_slots_come_back_on_drop() {
        let caps = UidCaps::new();
        let a: Vec<Slot> = (0..3).filter_map(|_| caps.try_take(1000, 3)).collect();
        assert_eq!(a.len(), 3);
        assert!(caps.try_take(1000, 3).is_none(), "over the cap");
        // Another uid has its own allowance.
        let b = caps.try_take(1001, 3);
        assert!(b.is_some());
        assert_eq!((caps.held(1000), caps.held(1001)), (3, 1));
        drop(a);
        assert_eq!(caps.held(1000), 0);
        assert!(caps.try_take(1000, 3).is_some());
        drop(b);
        assert!(
            caps.lock().get(&1001).is_none(),
            "no entry left for a uid with nothing"
        );
    }
}
