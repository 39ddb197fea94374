//! Per-request bounds: how many hosts, agent ids, items, process_infos and result keys one
//! request may name, checked on the decoded lengths before any per-host work, and the linear
//! de-duplication the handlers use (a hash set, never a scan of what was kept).
//!
//! Every limit is at least what the real callers send (docs/api.md "Request limits"):
//! bk-nodeman queries 2000 hosts per get_proc_status_v2, GSEKit's status sync sends 1000
//! items per operate_proc_multi, GSEKit's v2 operate_process up to 5000 process_infos. A
//! larger request is refused whole with 1000400 and a message naming the field and the
//! limit.

use std::collections::HashSet;
use std::hash::Hash;

use super::ApiError;

/// Most hosts (`hosts` or `agent_id_list`) one request, or one item of a batch, may name.
/// Duplicates count: the limit is on what was sent.
pub const MAX_HOSTS: usize = 2000;
/// Most items in one `operate_proc_multi`.
pub const MAX_MULTI_ITEMS: usize = 1000;
/// Most `process_infos` entries in one `operate_process`.
pub const MAX_PROCESS_INFOS: usize = 5000;
/// Most result keys one request may create, counted as the host entries it names summed
/// over its items (duplicates count, so the check needs no per-host work).
pub const MAX_RESULT_KEYS: usize = 20_000;

// The callers' sizes, checked when building: one host per item for each of them.
const _: () = assert!(MAX_HOSTS >= 2000 && MAX_MULTI_ITEMS >= 1000 && MAX_PROCESS_INFOS >= 5000);
const _: () = assert!(MAX_RESULT_KEYS >= MAX_PROCESS_INFOS && MAX_RESULT_KEYS >= MAX_HOSTS);

/// Refuse a list of `n` entries longer than `limit`, naming its `field` (`what` says what is
/// counted: "hosts per request").
pub fn check_len(field: &str, n: usize, limit: usize, what: &str) -> Result<(), ApiError> {
    if n > limit {
        return Err(ApiError::bad(format!(
            "{field}: at most {limit} {what}, got {n}"
        )));
    }
    Ok(())
}

/// The result keys a request has claimed so far, against [`MAX_RESULT_KEYS`].
#[derive(Debug)]
pub struct KeyBudget {
    field: &'static str,
    used: usize,
}

impl KeyBudget {
    /// A budget for the request whose list is `field` (`proc_operate_req`, `process_infos`).
    pub fn new(field: &'static str) -> KeyBudget {
        KeyBudget { field, used: 0 }
    }

    /// Claim `n` more keys, or refuse the request.
    pub fn take(&mut self, n: usize) -> Result<(), ApiError> {
        self.used = self.used.saturating_add(n);
        if self.used > MAX_RESULT_KEYS {
            return Err(ApiError::bad(format!(
                "{}: at most {MAX_RESULT_KEYS} result keys (hosts summed over the entries) per request, got more",
                self.field
            )));
        }
        Ok(())
    }
}

/// The first of each distinct `key(item)`, in the order given; linear.
pub fn first_of_each<T, K: Hash + Eq>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
) -> Vec<T> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|t| seen.insert(key(t))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codes;

    #[test]
    fn check_len_names_the_field_and_the_limit() {
        assert!(check_len("hosts", MAX_HOSTS, MAX_HOSTS, "hosts").is_ok());
        let e = check_len("hosts", MAX_HOSTS + 1, MAX_HOSTS, "hosts per request").unwrap_err();
        assert_eq!(e.code, codes::BAD_REQUEST);
        assert_eq!(e.message, "hosts: at most 2000 hosts per request, got 2001");
    }

    #[test]
    fn key_budget_refuses_past_the_cap() {
        let mut b = KeyBudget::new("proc_operate_req");
        b.take(MAX_RESULT_KEYS - 1).unwrap();
        b.take(1).unwrap();
        let e = b.take(1).unwrap_err();
        assert!(
            e.message
                .starts_with("proc_operate_req: at most 20000 result keys")
        );
        // Saturates instead of wrapping.
        let mut b = KeyBudget::new("x");
        assert!(b.take(usize::MAX).is_err());
        assert!(b.take(usize::MAX).is_err());
    }

    #[test]
    fn first_of_each_keeps_order_and_first_occurrences() {
        let v = vec![(1, 'a'), (2, 'b'), (1, 'c'), (3, 'd'), (2, 'e')];
        assert_eq!(
            first_of_each(v, |(k, _)| *k),
            vec![(1, 'a'), (2, 'b'), (3, 'd')]
        );
        let many: Vec<u32> = (0..100_000).map(|i| i % 7).collect();
        assert_eq!(first_of_each(many, |x| *x), (0..7).collect::<Vec<_>>());
        assert!(first_of_each(Vec::<u8>::new(), |x| *x).is_empty());
    }
}
