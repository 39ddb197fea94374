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
    let e = engine.clone();
    let lookup = tokio::task::spawn_blocking(move || authorize(&e, peer));
    match tokio::time::timeout(ROLE_LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(forbidden(format!("the role lookup failed: {e}"))),
        Err(_) => Err(forbidden(format!(
            "the role of uid {} could not be looked up within {}s (the account database does not answer); refused",
            peer.map(|p| p.uid).unwrap_or(0),
            ROLE_LOOKUP_TIMEOUT.as_secs()
        ))),
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
