//! Network policies of VMs: none, QEMU user networking, or an allow-list.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One destination of an `allow:` network policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDest {
    /// Host name or address, as given.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Network policy of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode", content = "allow")]
pub enum Net {
    /// No network card.
    None,
    /// QEMU user networking: the guest reaches whatever the host reaches.
    User,
    /// Only these TCP destinations; everything else is refused. The guest
    /// reaches destination `i` (0-based) at `10.0.2.(100+i)`, same port.
    Allow(Vec<NetDest>),
}

/// Largest number of `allow:` destinations (guest addresses 10.0.2.100–.199).
pub const MAX_ALLOW: usize = 100;

impl Net {
    /// The guest-side address of the `i`-th allowed destination.
    pub fn guest_addr(i: usize) -> String {
        format!("10.0.2.{}", 100 + i)
    }
}

impl Net {
    /// This policy narrowed to what an admin's policy `admin` allows: `none`
    /// beats everything, `user` restricts nothing, and two allow-lists keep
    /// the destinations in both (none left: no network).
    pub fn within(&self, admin: &Net) -> Net {
        match (self, admin) {
            (Net::None, _) | (_, Net::None) => Net::None,
            (own, Net::User) => own.clone(),
            (Net::User, Net::Allow(a)) => Net::Allow(a.clone()),
            (Net::Allow(own), Net::Allow(a)) => {
                let both: Vec<NetDest> = own.iter().filter(|d| a.contains(d)).cloned().collect();
                if both.is_empty() {
                    Net::None
                } else {
                    Net::Allow(both)
                }
            }
        }
    }
}

impl FromStr for Net {
    type Err = Error;
    /// `none`, `user`, or `allow:HOST:PORT,HOST:PORT,...`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => return Ok(Net::None),
            "user" => return Ok(Net::User),
            _ => {}
        }
        let Some(list) = s.strip_prefix("allow:") else {
            return Err(Error::Invalid(format!(
                "unknown network policy {s:?} (expected none, user or allow:HOST:PORT,...)"
            )));
        };
        let mut dests = Vec::new();
        for item in list.split(',') {
            let bad =
                |why: &str| Error::Invalid(format!("network allow-list entry {item:?}: {why}"));
            let (host, port) = item
                .rsplit_once(':')
                .ok_or_else(|| bad("expected HOST:PORT"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty()
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
            {
                return Err(bad("bad host name"));
            }
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("port must be 1-65535"))?;
            dests.push(NetDest {
                host: host.to_string(),
                port,
            });
        }
        if dests.len() > MAX_ALLOW {
            return Err(Error::Invalid(format!(
                "network allow-list has {} entries; at most {MAX_ALLOW}",
                dests.len()
            )));
        }
        Ok(Net::Allow(dests))
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Net::None => f.write_str("none"),
            Net::User => f.write_str("user"),
            Net::Allow(d) => {
                let items: Vec<String> =
                    d.iter().map(|d| format!("{}:{}", d.host, d.port)).collect();
                write!(f, "allow:{}", items.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_policy_only_narrows() {
        let p = |s: &str| s.parse::<Net>().unwrap();
        let admin = p("allow:10.1.1.1:443,print:9100");
        assert_eq!(p("user").within(&admin), admin);
        assert_eq!(p("none").within(&admin), Net::None);
        assert_eq!(
            p("allow:print:9100,x:1").within(&admin),
            p("allow:print:9100")
        );
        assert_eq!(p("allow:x:1").within(&admin), Net::None);
        assert_eq!(p("user").within(&Net::None), Net::None);
        assert_eq!(p("allow:x:1").within(&Net::User), p("allow:x:1"));
    }

    #[test]
    fn parses_network_policies() {
        assert_eq!("none".parse::<Net>().unwrap(), Net::None);
        assert_eq!("user".parse::<Net>().unwrap(), Net::User);
        let n: Net = "allow:127.0.0.1:8080,example.org:443".parse().unwrap();
        assert_eq!(n.to_string(), "allow:127.0.0.1:8080,example.org:443");
        for bad in [
            "allow:",
            "allow:host",
            "allow:h:0",
            "allow:h:70000",
            "allow:a b:1",
            "wide",
        ] {
            let e = bad.parse::<Net>().unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains("allow") || e.contains("policy"), "{bad}: {e}");
        }
    }
}
