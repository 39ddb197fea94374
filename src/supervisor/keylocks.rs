//! Per-key async locks whose table holds an entry only while someone holds or waits for the
//! lock: definition writes of one key take turns, and no caller can grow the table by naming
//! keys (an entry goes as soon as its last holder drops it).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

/// The table.
#[derive(Debug)]
pub struct KeyLocks<K> {
    t: Mutex<HashMap<K, Weak<tokio::sync::Mutex<()>>>>,
}

impl<K: Hash + Eq + Clone> Default for KeyLocks<K> {
    fn default() -> Self {
        KeyLocks {
            t: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyLocks<K> {
    /// The lock of `key` (the same one for everyone while any holds it). Entries nobody
    /// holds are pruned here, so the table is as large as the keys in use.
    pub fn get(&self, key: &K) -> Arc<tokio::sync::Mutex<()>> {
        let mut t = self.t.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = t.get(key).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        t.insert(key.clone(), Arc::downgrade(&l));
        l
    }

    /// How many keys have a lock now.
    pub fn len(&self) -> usize {
        let mut t = self.t.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|_, w| w.strong_count() > 0);
        t.len()
    }

    /// No key has a lock.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_per_key_while_held_and_nothing_kept_after() {
        let locks: KeyLocks<String> = KeyLocks::default();
        let a = locks.get(&"a".to_string());
        let a2 = locks.get(&"a".to_string());
        assert!(Arc::ptr_eq(&a, &a2));
        let b = locks.get(&"b".to_string());
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(locks.len(), 2);
        drop((a, a2, b));
        assert!(locks.is_empty());
        // A caller naming many keys, one after the other, never grows the table.
        for i in 0..10_000 {
            let l = locks.get(&format!("k{i}"));
            assert!(locks.len() <= 1);
            drop(l);
        }
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn holders_of_one_key_take_turns() {
        let locks: KeyLocks<&str> = KeyLocks::default();
        let l = locks.get(&"k");
        let g = l.lock().await;
        let other = locks.get(&"k");
        assert!(other.try_lock().is_err());
        drop(g);
        assert!(other.try_lock().is_ok());
    }
}
