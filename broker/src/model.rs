//! The broker's records in the store's catalog (JSON values, one record
//! kind each): hosts, pools, subscriptions, the pools' VMs ("members") and
//! sessions. The catalog is the truth; a restarted broker reads it back and
//! asks the hosts what runs.

use lamina_sync::{now_ns, Batch, Principal, Store};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rules::Rules;

pub(crate) const HOST: &str = "broker-host";
pub(crate) const POOL: &str = "broker-pool";
pub(crate) const SUBSCRIPTION: &str = "broker-sub";
pub(crate) const MEMBER: &str = "broker-vm";
pub(crate) const SESSION: &str = "broker-session";
pub(crate) const VNC_SECRET: &str = "broker-vnc-secret";

/// A host that runs VMs: its agent's address and the token to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Name.
    pub name: String,
    /// Agent URL (`https://host:port`).
    pub url: String,
    /// Bearer token of an admin of the host's store.
    pub token: String,
    /// PEM of the CA to trust for the agent's certificate.
    pub ca_pem: Option<String>,
    /// When added, ns since the epoch.
    pub added_ns: i64,
}

/// A host as listed: everything but its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSummary {
    /// Name.
    pub name: String,
    /// Agent URL.
    pub url: String,
    /// Whether a CA of its own is pinned.
    pub ca: bool,
}

/// A pool of VMs made from one template over one base layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Name.
    pub name: String,
    /// VM template (defined on every host).
    pub template: String,
    /// Disk layer (or `LAYER@VERSION`) each VM's disk starts from (on
    /// every host).
    pub base: String,
    /// The rules.
    pub rules: Rules,
    /// When created, ns since the epoch.
    pub created_ns: i64,
}

/// Where a pool's VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Being created or started on its host.
    Starting,
    /// Running.
    Running,
    /// Stopped; its disk is kept.
    Stopped,
    /// Its host does not answer.
    Unknown,
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberState::Starting => "starting",
            MemberState::Running => "running",
            MemberState::Stopped => "stopped",
            MemberState::Unknown => "unknown",
        })
    }
}

/// One VM of a pool (named the same on its host, where its disk has that
/// name too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// VM name (`POOL-xxxxxx`).
    pub name: String,
    /// Pool.
    pub pool: String,
    /// Host it runs on.
    pub host: String,
    /// Last known state.
    pub state: MemberState,
    /// The user it belongs to: in a session, or for good in a pool that is
    /// not stateless.
    pub owner: Option<String>,
    /// The session using it.
    pub session: Option<String>,
    /// When created, ns since the epoch.
    pub created_ns: i64,
    /// Last figures from its host.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// Resident memory of its QEMU.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Display profile (`pc`, `phone`).
    #[serde(default)]
    pub profile: Option<String>,
    /// An external desktop (`lamina desktop add`): its VNC server's
    /// `HOST:PORT`. Such a member has no host agent; the rule engine never
    /// starts, stops or removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<String>,
}

impl Member {
    /// Started and free for anyone.
    pub fn is_idle(&self) -> bool {
        self.state == MemberState::Running && self.owner.is_none() && self.session.is_none()
    }
}

/// A user's use of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Id.
    pub id: String,
    /// User.
    pub user: String,
    /// Pool.
    pub pool: String,
    /// VM.
    pub vm: String,
    /// Its host.
    pub host: String,
    /// When it began, ns since the epoch.
    pub started_ns: i64,
    /// Last sign of use, ns since the epoch.
    pub last_seen_ns: i64,
}

/// Who may ask a pool for desktops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Pool.
    pub pool: String,
    /// `alice` or `@group`.
    pub principal: String,
    /// When added, ns since the epoch.
    pub added_ns: i64,
}

fn decode<T: DeserializeOwned>(kind: &'static str, name: &str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| Error::Corrupt {
        kind,
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

/// One record.
pub(crate) fn get<T: DeserializeOwned>(
    store: &Store,
    kind: &'static str,
    name: &str,
) -> Result<Option<T>> {
    store
        .record(kind, name)?
        .map(|v| decode(kind, name, &v))
        .transpose()
}

/// Every record of a kind.
pub(crate) fn all<T: DeserializeOwned>(store: &Store, kind: &'static str) -> Result<Vec<T>> {
    store
        .records(kind)?
        .iter()
        .map(|(name, v)| decode(kind, name, v))
        .collect()
}

/// Puts a record into a batch.
pub(crate) fn put<T: Serialize>(
    batch: &mut Batch<'_>,
    kind: &str,
    name: &str,
    value: &T,
) -> Result<()> {
    // Plain data: serialising it cannot fail.
    let v = serde_json::to_vec(value).unwrap_or_default();
    batch.put_record(kind, name, &v)?;
    Ok(())
}

/// A new random id of `n` hex digits.
pub(crate) fn new_id(n: usize) -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)[..n.min(32)].to_owned()
}

fn sub_key(pool: &str, principal: &Principal) -> String {
    format!("{pool}\u{0}{principal}")
}

/// Hosts, pools and subscriptions: what an admin defines, on the store
/// directly (the CLI) or through the API.
pub trait BrokerCatalog {
    /// Registers a host.
    ///
    /// # Errors
    /// A bad name or URL, a host of that name exists, catalog failures.
    fn add_host(&self, name: &str, url: &str, token: &str, ca_pem: Option<String>) -> Result<Host>;
    /// Hosts, by name (tokens not included).
    ///
    /// # Errors
    /// Catalog failures.
    fn hosts(&self) -> Result<Vec<HostSummary>>;
    /// Removes a host, refused while pool VMs are recorded on it.
    ///
    /// # Errors
    /// Not found, still in use, catalog failures.
    fn remove_host(&self, name: &str) -> Result<()>;
    /// Creates a pool.
    ///
    /// # Errors
    /// Bad name or rules, the pool exists, catalog failures.
    fn create_pool(&self, name: &str, template: &str, base: &str, rules: Rules) -> Result<Pool>;
    /// A pool.
    ///
    /// # Errors
    /// Not found, catalog failures.
    fn pool(&self, name: &str) -> Result<Pool>;
    /// Every pool.
    ///
    /// # Errors
    /// Catalog failures.
    fn pools(&self) -> Result<Vec<Pool>>;
    /// Replaces a pool's rules.
    ///
    /// # Errors
    /// Not found, rules that cannot hold, catalog failures.
    fn set_rules(&self, pool: &str, rules: Rules) -> Result<Pool>;
    /// Deletes a pool, refused while it has VMs (set `max` to 0… or remove
    /// them first).
    ///
    /// # Errors
    /// Not found, VMs left, catalog failures.
    fn remove_pool(&self, name: &str) -> Result<()>;
    /// Lets a user or group ask the pool for desktops.
    ///
    /// # Errors
    /// No such pool, user or group; catalog failures.
    fn subscribe(&self, pool: &str, who: &Principal) -> Result<Subscription>;
    /// Withdraws a subscription; whether there was one.
    ///
    /// # Errors
    /// Catalog failures.
    fn unsubscribe(&self, pool: &str, who: &Principal) -> Result<bool>;
    /// Subscriptions, of one pool or all.
    ///
    /// # Errors
    /// Catalog failures.
    fn subscriptions(&self, pool: Option<&str>) -> Result<Vec<Subscription>>;
    /// The pools' VMs.
    ///
    /// # Errors
    /// Catalog failures.
    fn members(&self) -> Result<Vec<Member>>;
    /// Open sessions.
    ///
    /// # Errors
    /// Catalog failures.
    fn sessions(&self) -> Result<Vec<Session>>;
}

pub(crate) fn check_url(url: &str) -> Result<()> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(Error::InvalidInput(format!(
            "host URL {url:?} must start with https:// (or http:// for an --insecure agent on loopback)"
        )));
    }
    Ok(())
}

impl BrokerCatalog for Store {
    fn add_host(&self, name: &str, url: &str, token: &str, ca_pem: Option<String>) -> Result<Host> {
        lamina_sync::check_name("host name", name)?;
        check_url(url)?;
        if token.trim().is_empty() {
            return Err(Error::InvalidInput("the host's token file is empty".into()));
        }
        let mut batch = self.batch()?;
        if self.record(HOST, name)?.is_some() {
            return Err(Error::Exists(format!("host {name} already exists")));
        }
        let host = Host {
            name: name.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            ca_pem,
            added_ns: now_ns(),
        };
        put(&mut batch, HOST, name, &host)?;
        self.commit(batch)?;
        Ok(host)
    }

    fn hosts(&self) -> Result<Vec<HostSummary>> {
        Ok(all::<Host>(self, HOST)?
            .into_iter()
            .map(|h| HostSummary {
                name: h.name,
                url: h.url,
                ca: h.ca_pem.is_some(),
            })
            .collect())
    }

    fn remove_host(&self, name: &str) -> Result<()> {
        let mut batch = self.batch()?;
        if self.record(HOST, name)?.is_none() {
            return Err(Error::NotFound(format!("no host named {name:?}")));
        }
        let on: Vec<String> = all::<Member>(self, MEMBER)?
            .into_iter()
            .filter(|m| m.host == name)
            .map(|m| m.name)
            .collect();
        if !on.is_empty() {
            return Err(Error::InvalidInput(format!(
                "host {name} still has pool VMs ({}): lower the pools' max or remove the pools first",
                on.join(", ")
            )));
        }
        batch.delete_record(HOST, name)?;
        self.commit(batch)?;
        Ok(())
    }

    fn create_pool(&self, name: &str, template: &str, base: &str, rules: Rules) -> Result<Pool> {
        lamina_sync::check_name("pool name", name)?;
        lamina_vm::check_name("template name", template)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        lamina_sync::check_layer_name(lamina_sync::split_layer_spec(base).0)?;
        rules.check()?;
        let mut batch = self.batch()?;
        if self.record(POOL, name)?.is_some() {
            return Err(Error::Exists(format!("pool {name} already exists")));
        }
        let pool = Pool {
            name: name.to_owned(),
            template: template.to_owned(),
            base: base.to_owned(),
            rules,
            created_ns: now_ns(),
        };
        put(&mut batch, POOL, name, &pool)?;
        self.commit(batch)?;
        Ok(pool)
    }

    fn pool(&self, name: &str) -> Result<Pool> {
        get(self, POOL, name)?.ok_or_else(|| Error::NotFound(format!("no pool named {name:?}")))
    }

    fn pools(&self) -> Result<Vec<Pool>> {
        all(self, POOL)
    }

    fn set_rules(&self, pool: &str, rules: Rules) -> Result<Pool> {
        rules.check()?;
        let mut batch = self.batch()?;
        let mut p = self.pool(pool)?;
        p.rules = rules;
        put(&mut batch, POOL, pool, &p)?;
        self.commit(batch)?;
        Ok(p)
    }

    fn remove_pool(&self, name: &str) -> Result<()> {
        let mut batch = self.batch()?;
        self.pool(name)?;
        let left: Vec<String> = all::<Member>(self, MEMBER)?
            .into_iter()
            .filter(|m| m.pool == name)
            .map(|m| m.name)
            .collect();
        if !left.is_empty() {
            return Err(Error::InvalidInput(format!(
                "pool {name} still has VMs ({}): set its max to 0 (`lamina pool rules`) and let the rule engine remove them first",
                left.join(", ")
            )));
        }
        batch.delete_record(POOL, name)?;
        for s in all::<Subscription>(self, SUBSCRIPTION)? {
            if s.pool == name {
                batch.delete_record(SUBSCRIPTION, &format!("{}\u{0}{}", s.pool, s.principal))?;
            }
        }
        self.commit(batch)?;
        Ok(())
    }

    fn subscribe(&self, pool: &str, who: &Principal) -> Result<Subscription> {
        self.pool(pool)?;
        match who {
            Principal::User(u) if self.user(u)?.is_none() => {
                return Err(Error::NotFound(format!("no user named {u:?}")))
            }
            Principal::Group(g) if self.group(g)?.is_none() => {
                return Err(Error::NotFound(format!("no group named {g:?}")))
            }
            _ => {}
        }
        let sub = Subscription {
            pool: pool.to_owned(),
            principal: who.to_string(),
            added_ns: now_ns(),
        };
        let mut batch = self.batch()?;
        put(&mut batch, SUBSCRIPTION, &sub_key(pool, who), &sub)?;
        self.commit(batch)?;
        Ok(sub)
    }

    fn unsubscribe(&self, pool: &str, who: &Principal) -> Result<bool> {
        let key = sub_key(pool, who);
        let mut batch = self.batch()?;
        if self.record(SUBSCRIPTION, &key)?.is_none() {
            return Ok(false);
        }
        batch.delete_record(SUBSCRIPTION, &key)?;
        self.commit(batch)?;
        Ok(true)
    }

    fn subscriptions(&self, pool: Option<&str>) -> Result<Vec<Subscription>> {
        Ok(all::<Subscription>(self, SUBSCRIPTION)?
            .into_iter()
            .filter(|s| pool.is_none_or(|p| s.pool == p))
            .collect())
    }

    fn members(&self) -> Result<Vec<Member>> {
        all(self, MEMBER)
    }

    fn sessions(&self) -> Result<Vec<Session>> {
        all(self, SESSION)
    }
}

/// Whether `user` (in `groups`) is subscribed to `pool`.
pub(crate) fn subscribed(subs: &[Subscription], pool: &str, user: &str, groups: &[String]) -> bool {
    subs.iter()
        .filter(|s| s.pool == pool)
        .any(|s| match s.principal.strip_prefix('@') {
            Some(g) => groups.iter().any(|m| m == g),
            None => s.principal == user,
        })
}
