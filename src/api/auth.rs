//! Who may do what on the socket, from the peer's credentials (SO_PEERCRED uid/gid, plus the
//! supplementary groups of the peer's account).
//!
//! * root, and the agent's own uid (an unprivileged agent's operator): everything.
//! * members of `api.admin_group`: every read and operation, but only on processes whose
//!   account is their own, and register/update only of definitions that run as their own
//!   account (anything else would be a privilege escalation: the agent runs commands as
//!   the account a definition names). Applying a config reload (definitions of every
//!   account) stays with the full role.
//! * members of `api.readonly_group`: reads only (status queries included).
//! * anyone else: refused, with a message naming the rule.

use super::{ApiError, Peer};
use crate::proto::codes;
use crate::supervisor::Engine;

/// What a peer may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// root or the agent's own uid.
    Full,
    /// admin group member: limited to their own account.
    Admin { account: String },
    /// read-only group member.
    ReadOnly,
}

/// An authorized caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub role: Role,
    pub peer: Option<Peer>,
}

impl Access {
    /// May this caller change anything?
    pub fn can_write(&self) -> bool {
        !matches!(self.role, Role::ReadOnly)
    }

    /// May this caller act on (or register) a process running as `account` (empty: the
    /// agent's own account)?
    pub fn may_use_account(&self, account: &str) -> Result<(), ApiError> {
        match &self.role {
            Role::Full => Ok(()),
            Role::ReadOnly => Err(forbidden("read-only group members may not change anything")),
            Role::Admin { account: own } => {
                if !account.is_empty() && account == own {
                    Ok(())
                } else {
                    let shown = if account.is_empty() {
                        "the agent's own account (root)"
                    } else {
                        account
                    };
                    Err(forbidden(format!(
                        "uid {} ({own}) may only manage processes that run as {own}, not as {shown}",
                        self.peer.map(|p| p.uid).unwrap_or(0)
                    )))
                }
            }
        }
    }
}

fn forbidden(msg: impl Into<String>) -> ApiError {
    ApiError::new(codes::FORBIDDEN, msg)
}

fn group_gid(name: &Option<String>) -> Option<u32> {
    let n = name.as_ref()?;
    nix::unistd::Group::from_name(n)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// The groups of a uid: its primary gid from the socket plus its account's supplementary
/// groups.
pub fn peer_groups(uid: u32, gid: u32) -> (Option<String>, Vec<u32>) {
    let mut groups = vec![gid];
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    let name = user.as_ref().map(|u| u.name.clone());
    if let Some(u) = user
        && let Ok(c) = std::ffi::CString::new(u.name.clone())
        && let Ok(gs) = nix::unistd::getgrouplist(&c, u.gid)
    {
        groups.extend(gs.into_iter().map(|g| g.as_raw()));
    }
    (name, groups)
}

/// Does this uid have full access whatever its groups: root, or the uid the agent runs as?
/// Such a uid is also outside every per-uid cap and may use the root socket.
pub fn full_access_uid(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::getuid().as_raw()
}

/// Most time a role lookup (NSS: the account database, maybe LDAP) may take.
pub const ROLE_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Decide the role of a peer off the async workers: root and the agent's own uid at once,
/// anyone else through [`authorize`] on a blocking thread, within [`ROLE_LOOKUP_TIMEOUT`]
/// (a lookup that does not answer refuses the request, naming why). Called once per request,
/// before its body is read; handlers take the result from the request ([`access_of`]).
pub async fn authorize_off_runtime(
    engine: &std::sync::Arc<Engine>,
    peer: Option<Peer>,
) -> Result<Access, ApiError> {
    if let Some(p) = peer
        && full_access_uid(p.uid)
    {
        return Ok(Access {
            role: Role::Full,
            peer,
        });
    }
    let Some(p) = peer else {
        return Err(forbidden("the peer's credentials are unknown; refused"));
    };
    let e = engine.clone();
    let lookup = LOOKUPS.get((p.uid, p.gid), move || authorize(&e, peer));
    match tokio::time::timeout(ROLE_LOOKUP_TIMEOUT, lookup).await {
        // The lookup may have been another connection's of the same peer: the role is
        // the same, the peer is this one.
        Ok(r) => r.map(|a| Access { role: a.role, peer }),
        Err(_) => Err(forbidden(format!(
            "the role of uid {} could not be looked up within {}s (the account database does not answer); refused",
            p.uid,
            ROLE_LOOKUP_TIMEOUT.as_secs()
        ))),
    }
}

/// Role lookups that may be in flight at once. A lookup that does not answer keeps its
/// blocking thread until the account database answers (a thread cannot be cancelled), so
/// this bounds what a hung NSS can hold.
pub const MAX_ROLE_LOOKUPS: usize = 8;

type Lookup = futures_util::future::Shared<
    futures_util::future::BoxFuture<'static, Result<Access, ApiError>>,
>;

/// The role lookups in flight or waiting for a place: one per (uid, gid), shared by every
/// connection of that peer that arrives meanwhile; at most [`MAX_ROLE_LOOKUPS`] of them run
/// at once, the others wait for a place in the order they came. Process-wide, as the
/// account database (NSS) it guards is.
///
/// Waiting, not refusing, is what keeps a slow (not hung) database from locking admins out:
/// peers without a role that ask again as soon as they are answered would otherwise hold
/// every place whenever a new peer arrives; in turn, that peer is answered after the
/// lookups ahead of it, one per peer. A hung database holds the places: each waiter is
/// refused at its caller's deadline ([`ROLE_LOOKUP_TIMEOUT`]).
pub struct Lookups {
    inflight: std::sync::Mutex<std::collections::HashMap<(u32, u32), Lookup>>,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
}

static LOOKUPS: std::sync::LazyLock<Lookups> =
    std::sync::LazyLock::new(|| Lookups::new(MAX_ROLE_LOOKUPS));

/// A lookup's place and its entry in the map, given back when its thread is done with it,
/// however it ended (a lookup that panics included: its peer is looked up again next time).
struct Place {
    lookups: &'static Lookups,
    key: (u32, u32),
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.lookups.forget(self.key);
    }
}

impl Lookups {
    pub fn new(max: usize) -> Lookups {
        Lookups {
            inflight: std::sync::Mutex::new(std::collections::HashMap::new()),
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
        }
    }

    fn forget(&self, key: (u32, u32)) {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// The lookup of `key`: the one in flight (or waiting), or `f`, run on a blocking thread
    /// once a place is free. The lookup is a task of its own, so it keeps its turn (and
    /// then runs and frees its place) whether or not its callers still wait.
    pub fn get<F>(&'static self, key: (u32, u32), f: F) -> Lookup
    where
        F: FnOnce() -> Result<Access, ApiError> + Send + 'static,
    {
        use futures_util::FutureExt;
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = inflight.get(&key) {
            return l.clone();
        }
        let permits = self.permits.clone();
        let task = tokio::spawn(async move {
            let Ok(permit) = permits.acquire_owned().await else {
                self.forget(key);
                return Err(forbidden("the role lookup failed: no place"));
            };
            let place = Place {
                lookups: self,
                key,
                _permit: permit,
            };
            tokio::task::spawn_blocking(move || {
                let _place = place;
                f()
            })
            .await
            .unwrap_or_else(|e| Err(forbidden(format!("the role lookup failed: {e}"))))
        });
        let l: Lookup = async move {
            task.await
                .unwrap_or_else(|e| Err(forbidden(format!("the role lookup failed: {e}"))))
        }
        .boxed()
        .shared();
        inflight.insert(key, l.clone());
        l
    }
}

/// The caller of a request, as authorized when it arrived (an extension set by the
/// connection layer); a request that did not come through it is refused.
pub fn access_of<B>(req: &axum::http::Request<B>) -> Result<Access, ApiError> {
    req.extensions()
        .get::<Access>()
        .cloned()
        .ok_or_else(|| forbidden("the request was not authorized; refused"))
}

/// Decide the role of a peer (blocking: NSS lookups for every uid but root and the agent's).
pub fn authorize(engine: &Engine, peer: Option<Peer>) -> Result<Access, ApiError> {
    let Some(p) = peer else {
        return Err(forbidden("the peer's credentials are unknown; refused"));
    };
    if full_access_uid(p.uid) {
        return Ok(Access {
            role: Role::Full,
            peer,
        });
    }
    let api = &engine.config.api;
    let (name, groups) = peer_groups(p.uid, p.gid);
    if let Some(g) = group_gid(&api.admin_group)
        && groups.contains(&g)
    {
        return Ok(Access {
            role: Role::Admin {
                account: name.unwrap_or_else(|| p.uid.to_string()),
            },
            peer,
        });
    }
    if let Some(g) = group_gid(&api.readonly_group)
        && groups.contains(&g)
    {
        return Ok(Access {
            role: Role::ReadOnly,
            peer,
        });
    }
    let mut rule = String::from("only root");
    if let Some(a) = &api.admin_group {
        rule.push_str(&format!(", members of the admin group {a:?}"));
    }
    if let Some(r) = &api.readonly_group {
        rule.push_str(&format!(
            ", members of the read-only group {r:?} (reads only)"
        ));
    }
    Err(forbidden(format!(
        "uid {} is not allowed to use this socket: {rule} may",
        p.uid
    )))
}

#[cfg(test)]
mod lookup_tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn ok() -> Result<Access, ApiError> {
        Ok(Access {
            role: Role::ReadOnly,
            peer: None,
        })
    }

    // A slow (not hung) account database, every place taken by peers without a role that
    // ask again as soon as they are answered: a further peer (an admin) waits its turn
    // and is answered within the caller's deadline, not refused at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_database_answers_a_further_peer_in_turn() {
        let lookups: &'static Lookups = Box::leak(Box::new(Lookups::new(2)));
        let slow = || {
            std::thread::sleep(Duration::from_millis(150));
            ok()
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut floods = Vec::new();
        for uid in [2000, 2001] {
            let stop = stop.clone();
            floods.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = lookups.get((uid, uid), slow).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..5 {
            // A further peer waits its turn; it is not refused at once.
            let l = lookups.get((1000, 1000), slow);
            let r = tokio::time::timeout(ROLE_LOOKUP_TIMEOUT, l).await;
            assert!(r.is_ok_and(|r| r.is_ok()), "answered within the deadline");
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for f in floods {
            let _ = f.await;
        }
    }

    // A lookup that panics (a broken NSS module) answers its waiters with an error and
    // frees its place: the peer's next request is looked up again.
    #[tokio::test]
    async fn a_lookup_that_panics_does_not_wedge_its_peer() {
        let lookups: &'static Lookups = Box::leak(Box::new(Lookups::new(2)));
        let l = lookups.get((1000, 1000), || -> Result<Access, ApiError> {
            panic!("a broken NSS module")
        });
        let r = tokio::time::timeout(Duration::from_secs(10), l)
            .await
            .expect("answered");
        assert!(r.is_err());
        let l = lookups.get((1000, 1000), ok);
        let r = tokio::time::timeout(Duration::from_secs(10), l)
            .await
            .expect("answered");
        assert!(
            r.is_ok(),
            "the panicked lookup's answer was kept for the peer"
        );
    }

    // A hung account database: lookups that never answer hold at most `max` threads, the
    // connections of one peer share one, and a lookup that answers frees its place.
    #[tokio::test]
    async fn hung_lookups_hold_a_bounded_number_of_threads() {
        let lookups: &'static Lookups = Box::leak(Box::new(Lookups::new(2)));
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = std::sync::Arc::new(std::sync::Mutex::new(release_rx));
        let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hung = |n: &std::sync::Arc<std::sync::atomic::AtomicUsize>| {
            let (rx, n) = (release_rx.clone(), n.clone());
            move || {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = rx.lock().unwrap().recv();
                ok()
            }
        };
        // Ten connections of uid 1000 share one lookup.
        let mut waits = Vec::new();
        for _ in 0..10 {
            waits.push(lookups.get((1000, 1000), hung(&started)));
        }
        let other = lookups.get((1001, 1001), hung(&started));
        // Both places taken: a third peer waits for one (its caller's deadline refuses it
        // while the database hangs), and nothing is started for it.
        let third = lookups.get((1002, 1002), hung(&started));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while started.load(std::sync::atomic::Ordering::SeqCst) < 2
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(50), third.clone())
                .await
                .is_err()
        );
        assert_eq!(
            started.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "one thread per peer, no more than the places"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), waits[0].clone())
                .await
                .is_err()
        );
        // The database answers: every waiter gets the answer, the third peer gets its turn.
        for _ in 0..3 {
            release_tx.send(()).unwrap();
        }
        for w in waits {
            assert!(
                tokio::time::timeout(Duration::from_secs(10), w)
                    .await
                    .unwrap()
                    .is_ok()
            );
        }
        assert!(
            tokio::time::timeout(Duration::from_secs(10), other)
                .await
                .unwrap()
                .is_ok()
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(10), third)
                .await
                .unwrap()
                .is_ok()
        );
        assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 3);
        // The places are free: a new lookup runs at once.
        let l = lookups.get((1003, 1003), ok);
        assert!(
            tokio::time::timeout(Duration::from_secs(10), l)
                .await
                .unwrap()
                .is_ok()
        );
    }
}
