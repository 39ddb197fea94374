//! This agent's identity on the GSE side: inner IP, cloud id, supplier id, agent id; and the
//! rules that decide whether a request's host (or agent id) names this agent.

use crate::config::HostConfig;
use crate::proto::HostWire;

/// Who this agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub ip: String,
    pub bk_cloud_id: i64,
    pub bk_supplier_id: i64,
    pub agent_id: String,
}

impl HostIdentity {
    /// Resolve the configured identity (`ip = "auto"` → the primary address).
    pub fn resolve(cfg: &HostConfig) -> HostIdentity {
        let ip = if cfg.ip == "auto" {
            primary_ip()
        } else {
            cfg.ip.clone()
        };
        HostIdentity {
            ip,
            bk_cloud_id: cfg.bk_cloud_id,
            bk_supplier_id: cfg.bk_supplier_id,
            agent_id: cfg.agent_id.clone(),
        }
    }

    /// Does `{ip, bk_cloud_id[, bk_supplier_id]}` name this agent? A missing cloud id is
    /// taken as 0; a missing supplier id matches any supplier.
    pub fn is_me(&self, h: &HostWire) -> bool {
        h.ip.trim() == self.ip
            && h.bk_cloud_id.unwrap_or(0) == self.bk_cloud_id
            && h.bk_supplier_id.is_none_or(|s| s == self.bk_supplier_id)
    }

    /// Does a GSE 2.0 agent id name this agent? Either the configured `agent_id` or the
    /// fallback form `"{bk_cloud_id}:{ip}"`.
    pub fn is_my_agent_id(&self, id: &str) -> bool {
        let id = id.trim();
        (!self.agent_id.is_empty() && id == self.agent_id)
            || id == format!("{}:{}", self.bk_cloud_id, self.ip)
    }

    /// The agent id reported for this host.
    pub fn agent_id_or_fallback(&self) -> String {
        if self.agent_id.is_empty() {
            format!("{}:{}", self.bk_cloud_id, self.ip)
        } else {
            self.agent_id.clone()
        }
    }
}

/// The source address the kernel would use for the default route (no packet is sent:
/// connecting a UDP socket only selects a route), else the first non-loopback IPv4 address,
/// else 127.0.0.1.
pub fn primary_ip() -> String {
    for target in ["10.255.255.255:1", "192.0.2.1:1", "[2001:db8::1]:1"] {
        let bind = if target.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        if let Ok(sock) = std::net::UdpSocket::bind(bind)
            && sock.connect(target).is_ok()
            && let Ok(addr) = sock.local_addr()
            && !addr.ip().is_unspecified()
            && !addr.ip().is_loopback()
        {
            return addr.ip().to_string();
        }
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                let ip = sin.ip();
                if !ip.is_loopback() {
                    return ip.to_string();
                }
            }
        }
    }
    "127.0.0.1".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> HostIdentity {
        HostIdentity {
            ip: "10.0.0.1".into(),
            bk_cloud_id: 1,
            bk_supplier_id: 2,
            agent_id: "020000000242010a".into(),
        }
    }

    fn h(ip: &str, c: Option<i64>, s: Option<i64>) -> HostWire {
        HostWire {
            ip: ip.into(),
            bk_cloud_id: c,
            bk_supplier_id: s,
        }
    }

    #[test]
    fn host_matching_table() {
        let cases = [
            (h("10.0.0.1", Some(1), Some(2)), true),
            (h("10.0.0.1", Some(1), None), true),
            (h(" 10.0.0.1 ", Some(1), None), true),
            (h("10.0.0.1", Some(0), Some(2)), false),
            (h("10.0.0.1", Some(1), Some(3)), false),
            (h("10.0.0.2", Some(1), Some(2)), false),
            (h("10.0.0.1", None, None), false),
        ];
        for (host, want) in cases {
            assert_eq!(me().is_me(&host), want, "{host:?}");
        }
    }

    #[test]
    fn agent_ids() {
        assert!(me().is_my_agent_id("020000000242010a"));
        assert!(me().is_my_agent_id("1:10.0.0.1"));
        assert!(!me().is_my_agent_id("0:10.0.0.1"));
        assert!(!me().is_my_agent_id("other"));
        let no_id = HostIdentity {
            agent_id: String::new(),
            ..me()
        };
        assert!(!no_id.is_my_agent_id(""));
        assert_eq!(no_id.agent_id_or_fallback(), "1:10.0.0.1");
    }

    #[test]
    fn primary_ip_is_an_address() {
        assert!(primary_ip().parse::<std::net::IpAddr>().is_ok());
    }
}
