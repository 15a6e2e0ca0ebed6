//! Identities and grants: users, groups, bearer tokens and per-layer
//! grants, kept as records in the catalog so that every service over a
//! store (the sync API, the broker) authenticates and authorises against
//! the same data.
//!
//! * A **user** has a name, an admin flag and the groups it belongs to.
//! * A **token** is `lamina_<id>_<secret>`: 8 random bytes of id and 32 of
//!   secret, hex. Only the BLAKE3 hash of the secret is stored. Tokens are
//!   high-entropy random values, so a fast hash is enough (as for GitHub's or
//!   crates.io's tokens); a slow password hash (argon2) would cost tens of
//!   milliseconds on every request for no gain.
//! * A **grant** gives a user or a group (`@name`) read or write access to
//!   one layer. Write implies read.
//!
//! Rules ([`Store::permission`]): admins may do everything; a user may write
//! every layer under `user/<name>/` (its own namespace, so a laptop can check
//! in a new personal layer without an admin); otherwise the strongest grant
//! to the user or one of its groups decides.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::store::Store;

const USER: &str = "user";
const GROUP: &str = "group";
const TOKEN: &str = "token";
const GRANT: &str = "grant";

/// Prefix of every token.
pub const TOKEN_PREFIX: &str = "lamina_";
/// Hex digits of a token id.
const TOKEN_ID_HEX: usize = 16;
/// Hex digits of a token secret.
const TOKEN_SECRET_HEX: usize = 64;

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Name.
    pub name: String,
    /// May do everything.
    pub admin: bool,
    /// Groups the user belongs to.
    pub groups: Vec<String>,
    /// When added, ns since the epoch.
    pub created_ns: i64,
}

/// A group of users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Name.
    pub name: String,
    /// When added, ns since the epoch.
    pub created_ns: i64,
}

/// A token as listed: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Public id (the part after `lamina_`).
    pub id: String,
    /// Whose token it is.
    pub user: String,
    /// When created, ns since the epoch.
    pub created_ns: i64,
    /// When it stops working, if ever.
    pub expires_ns: Option<i64>,
    /// BLAKE3 of the secret, hex.
    #[serde(rename = "hash")]
    hash_hex: String,
}

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Pull (check out).
    Read,
    /// Pull and push (check in).
    Write,
}

impl Permission {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Permission {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "read" => Ok(Permission::Read),
            "write" => Ok(Permission::Write),
            _ => Err(Error::InvalidInput(format!(
                "unknown permission `{s}` (expected read or write)"
            ))),
        }
    }
}

/// Who a grant is for: a user (`alice`) or a group (`@staff`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Principal {
    /// One user.
    User(String),
    /// Every member of a group.
    Group(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User(u) => f.write_str(u),
            Principal::Group(g) => write!(f, "@{g}"),
        }
    }
}

impl FromStr for Principal {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.strip_prefix('@') {
            Some(g) => {
                check_name("group name", g)?;
                Ok(Principal::Group(g.to_owned()))
            }
            None => {
                check_name("user name", s)?;
                Ok(Principal::User(s.to_owned()))
            }
        }
    }
}

impl Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// Layer name.
    pub layer: String,
    /// Who.
    pub principal: Principal,
    /// What.
    pub permission: Permission,
    /// The end of the subscription, ns since the epoch (none: no end).
    pub until_ns: Option<i64>,
    /// How long past its end a client that could not sync keeps using
    /// the layer, seconds.
    pub grace_secs: u64,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    /// User name.
    pub user: String,
    /// Admin flag.
    pub admin: bool,
    /// Groups.
    pub groups: Vec<String>,
    /// The token used.
    pub token: String,
}

/// Why a token was not accepted. Deliberately vague towards the peer (all
/// map to 401); the details are for the server's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not of the form `lamina_<id>_<secret>`.
    #[error("malformed token")]
    Malformed,
    /// No such token, or the secret does not match.
    #[error("unknown or revoked token")]
    Unknown,
    /// Past its expiry.
    #[error("token {id} expired")]
    Expired {
        /// Token id.
        id: String,
    },
    /// Its user was removed.
    #[error("token {id} belongs to a removed user")]
    UserGone {
        /// Token id.
        id: String,
    },
}

/// Longest user or group name.
const NAME_MAX: usize = 64;

/// Checks a user or group name: 1–64 of `a-z A-Z 0-9 . _ -`, starting with a
/// letter or digit.
///
/// # Errors
/// [`Error::InvalidName`].
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |reason| Error::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(bad("must be 1 to 64 characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("must start with a letter or digit"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain data with string keys always serialises.
    #[allow(clippy::expect_used)]
    serde_json::to_vec(v).expect("record serialises")
}

fn from_json<T: serde::de::DeserializeOwned>(kind: &str, name: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::RecordCorrupt {
        what: format!("{kind} {name}"),
        reason: e.to_string(),
    })
}

fn grant_key(layer: &str, p: &Principal) -> String {
    format!("{layer}\0{p}")
}

impl Store {
    fn json_records<T: serde::de::DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>> {
        self.records(kind)?
            .into_iter()
            .map(|(name, v)| from_json(kind, &name, &v))
            .collect()
    }

    fn json_record<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<T>> {
        self.record(kind, name)?
            .map(|v| from_json(kind, name, &v))
            .transpose()
    }

    /// Adds a user, member of `groups` (which must exist).
    ///
    /// # Errors
    /// A bad or taken name, an unknown group, catalog failures.
    pub fn add_user(&self, name: &str, admin: bool, groups: &[String]) -> Result<User> {
        check_name("user name", name)?;
        let mut groups = groups.to_vec();
        groups.sort();
        groups.dedup();
        for g in &groups {
            if self.group(g)?.is_none() {
                return Err(Error::InvalidInput(format!(
                    "no group named `{g}` (add it with `lamina group add {g}`)"
                )));
            }
        }
        let mut batch = self.batch()?;
        if self.user(name)?.is_some() {
            return Err(Error::InvalidInput(format!("user `{name}` already exists")));
        }
        let user = User {
            name: name.to_owned(),
            admin,
            groups,
            created_ns: now_ns(),
        };
        batch.put_record(USER, name, &to_json(&user))?;
        self.commit(batch)?;
        Ok(user)
    }

    /// The user `name`, if any.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn user(&self, name: &str) -> Result<Option<User>> {
        self.json_record(USER, name)
    }

    /// Every user, by name.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn users(&self) -> Result<Vec<User>> {
        self.json_records(USER)
    }

    /// Removes a user, its tokens and its grants.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unknown user, catalog failures.
    pub fn remove_user(&self, name: &str) -> Result<()> {
        let tokens = self.tokens()?;
        let grants = self.grants(None)?;
        let mut batch = self.batch()?;
        if self.user(name)?.is_none() {
            return Err(Error::InvalidInput(format!("no user named `{name}`")));
        }
        batch.delete_record(USER, name)?;
        for t in tokens.iter().filter(|t| t.user == name) {
            batch.delete_record(TOKEN, &t.id)?;
        }
        let me = Principal::User(name.to_owned());
        for g in grants.iter().filter(|g| g.principal == me) {
            batch.delete_record(GRANT, &grant_key(&g.layer, &g.principal))?;
        }
        self.commit(batch)
    }

    /// Adds a group.
    ///
    /// # Errors
    /// A bad or taken name, catalog failures.
    pub fn add_group(&self, name: &str) -> Result<Group> {
        check_name("group name", name)?;
        let mut batch = self.batch()?;
        if self.group(name)?.is_some() {
            return Err(Error::InvalidInput(format!(
                "group `{name}` already exists"
            )));
        }
        let group = Group {
            name: name.to_owned(),
            created_ns: now_ns(),
        };
        batch.put_record(GROUP, name, &to_json(&group))?;
        self.commit(batch)?;
        Ok(group)
    }

    /// The group `name`, if any.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn group(&self, name: &str) -> Result<Option<Group>> {
        self.json_record(GROUP, name)
    }

    /// Every group, by name.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn groups(&self) -> Result<Vec<Group>> {
        self.json_records(GROUP)
    }

    /// Removes a group, its members' membership and its grants.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unknown group, catalog failures.
    pub fn remove_group(&self, name: &str) -> Result<()> {
        let users = self.users()?;
        let grants = self.grants(None)?;
        let mut batch = self.batch()?;
        if self.group(name)?.is_none() {
            return Err(Error::InvalidInput(format!("no group named `{name}`")));
        }
        batch.delete_record(GROUP, name)?;
        for mut u in users
            .into_iter()
            .filter(|u| u.groups.iter().any(|g| g == name))
        {
            u.groups.retain(|g| g != name);
            batch.put_record(USER, &u.name.clone(), &to_json(&u))?;
        }
        let it = Principal::Group(name.to_owned());
        for g in grants.iter().filter(|g| g.principal == it) {
            batch.delete_record(GRANT, &grant_key(&g.layer, &g.principal))?;
        }
        self.commit(batch)
    }

    /// Creates a token for `user`, valid for `lifetime_ns` if given. Returns
    /// the token (shown once: only its hash is kept) and its record.
    ///
    /// # Errors
    /// An unknown user, catalog failures.
    pub fn create_token(
        &self,
        user: &str,
        lifetime_ns: Option<i64>,
    ) -> Result<(String, TokenInfo)> {
        if self.user(user)?.is_none() {
            return Err(Error::InvalidInput(format!("no user named `{user}`")));
        }
        let id = hex::encode(rand::random::<[u8; TOKEN_ID_HEX / 2]>());
        let secret = hex::encode(rand::random::<[u8; TOKEN_SECRET_HEX / 2]>());
        let now = now_ns();
        let info = TokenInfo {
            id: id.clone(),
            user: user.to_owned(),
            created_ns: now,
            expires_ns: lifetime_ns.map(|l| now.saturating_add(l)),
            hash_hex: blake3::hash(secret.as_bytes()).to_hex().to_string(),
        };
        let mut batch = self.batch()?;
        batch.put_record(TOKEN, &id, &to_json(&info))?;
        self.commit(batch)?;
        Ok((format!("{TOKEN_PREFIX}{id}_{secret}"), info))
    }

    /// Every token (without secrets).
    ///
    /// # Errors
    /// Catalog failures.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>> {
        self.json_records(TOKEN)
    }

    /// Revokes token `id` (the id as listed, or a whole token).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unknown token, catalog failures.
    pub fn revoke_token(&self, id: &str) -> Result<TokenInfo> {
        let id = parse_token(id).map_or(id, |(id, _)| id);
        let mut batch = self.batch()?;
        let info: TokenInfo = self
            .json_record(TOKEN, id)?
            .ok_or_else(|| Error::InvalidInput(format!("no token with id `{id}`")))?;
        batch.delete_record(TOKEN, id)?;
        self.commit(batch)?;
        Ok(info)
    }

    /// Checks a bearer token.
    ///
    /// # Errors
    /// `Ok(Err(_))` when the token is not accepted; `Err` for catalog
    /// failures.
    pub fn authenticate(&self, token: &str) -> Result<std::result::Result<Caller, AuthError>> {
        let Some((id, secret)) = parse_token(token) else {
            return Ok(Err(AuthError::Malformed));
        };
        let Some(info) = self.json_record::<TokenInfo>(TOKEN, id)? else {
            return Ok(Err(AuthError::Unknown));
        };
        let want = blake3::Hash::from_hex(&info.hash_hex).map_err(|e| Error::RecordCorrupt {
            what: format!("token {id}"),
            reason: e.to_string(),
        })?;
        // blake3::Hash compares in constant time.
        if blake3::hash(secret.as_bytes()) != want {
            return Ok(Err(AuthError::Unknown));
        }
        if info.expires_ns.is_some_and(|e| e <= now_ns()) {
            return Ok(Err(AuthError::Expired { id: id.to_owned() }));
        }
        let Some(user) = self.user(&info.user)? else {
            return Ok(Err(AuthError::UserGone { id: id.to_owned() }));
        };
        Ok(Ok(Caller {
            user: user.name,
            admin: user.admin,
            groups: user.groups,
            token: info.id,
        }))
    }

    /// Grants `principal` `permission` on `layer` (replacing an earlier
    /// grant to the same principal).
    ///
    /// # Errors
    /// An unknown layer, user or group, catalog failures.
    pub fn grant(&self, layer: &str, principal: &Principal, permission: Permission) -> Result<()> {
        self.grant_until(layer, principal, permission, None, 0)
    }

    /// As [`Store::grant`], ending at `until_ns` (a subscription), with
    /// `grace_secs` for clients that cannot sync (see [`Grant`]).
    ///
    /// # Errors
    /// An unknown layer, user or group, catalog failures.
    pub fn grant_until(
        &self,
        layer: &str,
        principal: &Principal,
        permission: Permission,
        until_ns: Option<i64>,
        grace_secs: u64,
    ) -> Result<()> {
        self.layer(layer)?;
        match principal {
            Principal::User(u) if self.user(u)?.is_none() => {
                return Err(Error::InvalidInput(format!("no user named `{u}`")))
            }
            Principal::Group(g) if self.group(g)?.is_none() => {
                return Err(Error::InvalidInput(format!("no group named `{g}`")))
            }
            _ => {}
        }
        let mut value = permission.as_str().to_owned();
        if let Some(u) = until_ns {
            value.push_str(&format!(" until={u} grace={grace_secs}"));
        }
        let mut batch = self.batch()?;
        batch.put_record(GRANT, &grant_key(layer, principal), value.as_bytes())?;
        self.commit(batch)
    }

    /// Removes `principal`'s grant on `layer`; returns whether there was one.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn revoke_grant(&self, layer: &str, principal: &Principal) -> Result<bool> {
        let key = grant_key(layer, principal);
        let mut batch = self.batch()?;
        if self.record(GRANT, &key)?.is_none() {
            return Ok(false);
        }
        batch.delete_record(GRANT, &key)?;
        self.commit(batch)?;
        Ok(true)
    }

    /// Grants on `layer`, or on every layer.
    ///
    /// # Errors
    /// Catalog failures, a damaged grant record.
    pub fn grants(&self, layer: Option<&str>) -> Result<Vec<Grant>> {
        let mut out = Vec::new();
        for (key, value) in self.records(GRANT)? {
            let damaged = |reason: &str| Error::RecordCorrupt {
                what: format!("grant {key:?}"),
                reason: reason.to_owned(),
            };
            let (l, p) = key
                .split_once('\0')
                .ok_or_else(|| damaged("no principal"))?;
            if layer.is_some_and(|want| want != l) {
                continue;
            }
            let principal = p.parse().map_err(|_| damaged("bad principal"))?;
            let text = std::str::from_utf8(&value).map_err(|_| damaged("not text"))?;
            let mut words = text.split(' ');
            let permission = words
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| damaged("bad permission"))?;
            let (mut until_ns, mut grace_secs) = (None, 0);
            for w in words {
                match w.split_once('=') {
                    Some(("until", v)) => {
                        until_ns = Some(v.parse().map_err(|_| damaged("bad until"))?);
                    }
                    Some(("grace", v)) => {
                        grace_secs = v.parse().map_err(|_| damaged("bad grace"))?
                    }
                    _ => return Err(damaged("unknown field")),
                }
            }
            out.push(Grant {
                layer: l.to_owned(),
                principal,
                permission,
                until_ns,
                grace_secs,
            });
        }
        Ok(out)
    }

    /// What `caller` may do with layer `layer` (which need not exist yet):
    /// `None` for nothing.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn permission(&self, caller: &Caller, layer: &str) -> Result<Option<Permission>> {
        if caller.admin || in_own_namespace(&caller.user, layer) {
            return Ok(Some(Permission::Write));
        }
        let now = crate::catalog::now_ns();
        Ok(self
            .applying_grants(caller, layer)?
            .iter()
            .filter(|g| g.until_ns.is_none_or(|u| u > now))
            .map(|g| g.permission)
            .max())
    }

    fn applying_grants(&self, caller: &Caller, layer: &str) -> Result<Vec<Grant>> {
        Ok(self
            .grants(Some(layer))?
            .into_iter()
            .filter(|g| match &g.principal {
                Principal::User(u) => *u == caller.user,
                Principal::Group(name) => caller.groups.iter().any(|c| c == name),
            })
            .collect())
    }

    /// The subscription `caller` holds on `layer` now: `Some((until_ns,
    /// grace_secs))` when every grant giving its best permission ends
    /// (the latest end), `None` when one does not (or for admins and the
    /// caller's own namespace).
    ///
    /// # Errors
    /// Catalog failures.
    pub fn subscription(&self, caller: &Caller, layer: &str) -> Result<Option<(i64, u64)>> {
        if caller.admin || in_own_namespace(&caller.user, layer) {
            return Ok(None);
        }
        let now = crate::catalog::now_ns();
        let live: Vec<Grant> = self
            .applying_grants(caller, layer)?
            .into_iter()
            .filter(|g| g.until_ns.is_none_or(|u| u > now))
            .collect();
        let Some(best) = live.iter().map(|g| g.permission).max() else {
            return Ok(None);
        };
        let top = live.iter().filter(|g| g.permission == best);
        let mut end: Option<(i64, u64)> = None;
        for g in top {
            match g.until_ns {
                None => return Ok(None),
                Some(u) => {
                    if end.is_none_or(|(e, _)| u > e) {
                        end = Some((u, g.grace_secs));
                    }
                }
            }
        }
        Ok(end)
    }

    /// When `caller`'s subscription to `layer` ended, if every grant that
    /// applied has ended (for the server's refusal).
    ///
    /// # Errors
    /// Catalog failures.
    pub fn ended_subscription(&self, caller: &Caller, layer: &str) -> Result<Option<i64>> {
        let now = crate::catalog::now_ns();
        let grants = self.applying_grants(caller, layer)?;
        if grants.is_empty() || grants.iter().any(|g| g.until_ns.is_none_or(|u| u > now)) {
            return Ok(None);
        }
        Ok(grants.iter().filter_map(|g| g.until_ns).max())
    }

    /// Removes every grant on `layer` (when the layer goes).
    pub(crate) fn drop_grants(&self, batch: &mut crate::Batch<'_>, layer: &str) -> Result<()> {
        for g in self.grants(Some(layer))? {
            batch.delete_record(GRANT, &grant_key(&g.layer, &g.principal))?;
        }
        Ok(())
    }
}

/// Whether `layer` lies in `user`'s own namespace `user/<name>/`.
pub fn in_own_namespace(user: &str, layer: &str) -> bool {
    layer
        .strip_prefix("user/")
        .and_then(|rest| rest.strip_prefix(user))
        .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

/// Splits `lamina_<id>_<secret>` into id and secret.
fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.trim().strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, TOKEN_ID_HEX) && hex(secret, TOKEN_SECRET_HEX)).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Access, LayerFormat, LayerKind, OpenOptions};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        Store::init(&root).unwrap();
        let s = Store::open(&root, &OpenOptions::new(Access::Write)).unwrap();
        (dir, s)
    }

    #[test]
    fn tokens_authenticate_until_revoked_or_expired() {
        let (_d, s) = store();
        s.add_group("staff").unwrap();
        s.add_user("alice", false, &["staff".into()]).unwrap();
        let (tok, info) = s.create_token("alice", None).unwrap();
        let c = s.authenticate(&tok).unwrap().unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.groups, vec!["staff".to_string()]);
        // Same id, other secret.
        let forged = format!("{TOKEN_PREFIX}{}_{}", info.id, "0".repeat(64));
        assert_eq!(s.authenticate(&forged).unwrap(), Err(AuthError::Unknown));
        assert_eq!(s.authenticate("nope").unwrap(), Err(AuthError::Malformed));
        s.revoke_token(&info.id).unwrap();
        assert_eq!(s.authenticate(&tok).unwrap(), Err(AuthError::Unknown));
        let (expired, _) = s.create_token("alice", Some(-1)).unwrap();
        assert!(matches!(
            s.authenticate(&expired).unwrap(),
            Err(AuthError::Expired { .. })
        ));
        // The secret is not stored anywhere in the record.
        let secret = tok.rsplit('_').next().unwrap();
        for t in s.tokens().unwrap() {
            assert!(!serde_json::to_string(&t).unwrap().contains(secret));
        }
    }

    #[test]
    fn permissions_follow_grants_groups_admin_and_namespace() {
        let (_d, s) = store();
        s.create_layer("os/base", LayerKind::Os, LayerFormat::Tree)
            .unwrap();
        s.create_layer("user/bob/data", LayerKind::Data, LayerFormat::Tree)
            .unwrap();
        s.add_group("staff").unwrap();
        s.add_user("alice", false, &["staff".into()]).unwrap();
        s.add_user("bob", false, &[]).unwrap();
        s.add_user("root", true, &[]).unwrap();
        let caller = |name: &str| {
            let (t, _) = s.create_token(name, None).unwrap();
            s.authenticate(&t).unwrap().unwrap()
        };
        let (alice, bob, root) = (caller("alice"), caller("bob"), caller("root"));
        assert_eq!(s.permission(&alice, "os/base").unwrap(), None);
        s.grant("os/base", &"@staff".parse().unwrap(), Permission::Read)
            .unwrap();
        assert_eq!(
            s.permission(&alice, "os/base").unwrap(),
            Some(Permission::Read)
        );
        s.grant("os/base", &"alice".parse().unwrap(), Permission::Write)
            .unwrap();
        assert_eq!(
            s.permission(&alice, "os/base").unwrap(),
            Some(Permission::Write)
        );
        assert_eq!(s.permission(&bob, "os/base").unwrap(), None);
        assert_eq!(s.permission(&alice, "user/bob/data").unwrap(), None);
        assert_eq!(
            s.permission(&bob, "user/bob/data").unwrap(),
            Some(Permission::Write)
        );
        assert_eq!(s.permission(&bob, "user/bobby/data").unwrap(), None);
        assert_eq!(
            s.permission(&root, "anything").unwrap(),
            Some(Permission::Write)
        );
        assert!(s
            .revoke_grant("os/base", &"alice".parse().unwrap())
            .unwrap());
        assert_eq!(
            s.permission(&alice, "os/base").unwrap(),
            Some(Permission::Read)
        );
        s.remove_group("staff").unwrap();
        let alice = s
            .authenticate(&s.create_token("alice", None).unwrap().0)
            .unwrap()
            .unwrap();
        assert_eq!(s.permission(&alice, "os/base").unwrap(), None);
        assert!(s.grants(None).unwrap().is_empty());
    }

    #[test]
    fn bad_names_and_unknowns_are_refused() {
        let (_d, s) = store();
        assert!(s.add_user("", false, &[]).is_err());
        assert!(s.add_user("a/b", false, &[]).is_err());
        assert!(s.add_user("-x", false, &[]).is_err());
        assert!(s.add_user("alice", false, &["nogroup".into()]).is_err());
        s.add_user("alice", false, &[]).unwrap();
        assert!(s.add_user("alice", false, &[]).is_err());
        assert!(s.create_token("bob", None).is_err());
        assert!(s
            .grant("no/layer", &"alice".parse().unwrap(), Permission::Read)
            .is_err());
        assert!(s.revoke_token("0011223344556677").is_err());
    }
}
