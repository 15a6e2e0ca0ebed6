//! Conflict policies: what the mediator does when both sides of a sync
//! changed the same path (trees) or cluster (disks) differently.
//!
//! A layer's policy is a catalog record set by `lamina layer set LAYER
//! --conflict POLICY`; without one, `os` and `group` layers (owned by the
//! admin) default to `server-wins` and user layers to `keep-both`. In a
//! sync the server's policy for the layer decides.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layer::{Layer, LayerKind};
use crate::store::Store;

const POLICY: &str = "layer-policy";
/// A layer's network policy as its admin set it here.
const NET: &str = "net-policy";
/// A layer's network policy as a remote said (key `REMOTE\0LAYER`).
const REMOTE_NET: &str = "remote-net-policy";

/// What to do with a real conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// The server's side wins; the client's change stays in its version
    /// (a parent of the merge) and on a conflict ref.
    ServerWins,
    /// The client's side wins; the server's change stays likewise.
    ClientWins,
    /// Trees keep the client's side beside the server's as
    /// `NAME.conflict-HOST-YYYYMMDD-HHMMSS.EXT`; disks keep the server's
    /// clusters and the client's version on a conflict ref.
    KeepBoth,
    /// Nothing merges: the conflict waits on the server for an admin.
    Manual,
}

impl ConflictPolicy {
    /// Every policy.
    pub const ALL: [ConflictPolicy; 4] = [
        ConflictPolicy::ServerWins,
        ConflictPolicy::ClientWins,
        ConflictPolicy::KeepBoth,
        ConflictPolicy::Manual,
    ];

    /// Name as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::ServerWins => "server-wins",
            ConflictPolicy::ClientWins => "client-wins",
            ConflictPolicy::KeepBoth => "keep-both",
            ConflictPolicy::Manual => "manual",
        }
    }

    /// The default for a layer of `kind`.
    pub fn default_for(kind: LayerKind) -> ConflictPolicy {
        match kind {
            LayerKind::Os | LayerKind::Group => ConflictPolicy::ServerWins,
            _ => ConflictPolicy::KeepBoth,
        }
    }
}

impl fmt::Display for ConflictPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConflictPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ConflictPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown conflict policy `{s}` (expected server-wins, client-wins, keep-both or manual)"
                ))
            })
    }
}

impl Store {
    /// The conflict policy of `layer`: its own, else its kind's default.
    ///
    /// # Errors
    /// Catalog failures, a damaged record.
    pub fn conflict_policy(&self, layer: &Layer) -> Result<ConflictPolicy> {
        match self.record(POLICY, &layer.name)? {
            None => Ok(ConflictPolicy::default_for(layer.kind)),
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::RecordCorrupt {
                    what: format!("{POLICY} {}", layer.name),
                    reason: "not a policy name".into(),
                }),
        }
    }

    /// Sets the conflict policy of layer `name`.
    ///
    /// # Errors
    /// An unknown layer, catalog failures.
    pub fn set_conflict_policy(&self, name: &str, policy: ConflictPolicy) -> Result<()> {
        self.layer(name)?;
        let mut batch = self.batch()?;
        batch.put_record(POLICY, name, policy.as_str().as_bytes())?;
        self.commit(batch)
    }

    /// Drops a layer's own policies (when the layer goes).
    pub(crate) fn drop_policy(&self, batch: &mut crate::Batch<'_>, layer: &str) -> Result<()> {
        batch.delete_record(POLICY, layer)?;
        batch.delete_record(NET, layer)
    }

    /// Sets (or with `None` clears) the network policy an admin gives the
    /// VMs started over layer `name` — the VM runner's `none`, `user` or
    /// `allow:HOST:PORT,...`, checked by the caller. Clients receive it
    /// with the layer and apply it offline too.
    ///
    /// # Errors
    /// An unknown layer, catalog failures.
    pub fn set_net_policy(&self, name: &str, policy: Option<&str>) -> Result<()> {
        self.layer(name)?;
        let mut batch = self.batch()?;
        match policy {
            Some(p) => batch.put_record(NET, name, p.as_bytes())?,
            None => batch.delete_record(NET, name)?,
        }
        self.commit(batch)
    }

    /// The network policy set here for layer `name`, if any.
    ///
    /// # Errors
    /// Catalog failures, a damaged record.
    pub fn net_policy(&self, name: &str) -> Result<Option<String>> {
        text(self.record(NET, name)?, NET, name)
    }

    /// Keeps what remote `remote` said of `layer`'s network policy.
    pub(crate) fn put_remote_net_policy(
        batch: &mut crate::Batch<'_>,
        remote: &str,
        layer: &str,
        policy: Option<&str>,
    ) -> Result<()> {
        let key = format!("{remote}\0{layer}");
        match policy {
            Some(p) => batch.put_record(REMOTE_NET, &key, p.as_bytes()),
            None => batch.delete_record(REMOTE_NET, &key),
        }
    }

    /// The network policy that applies to VMs over layer `name`: the one
    /// set here, else the one a remote it is tracked from sent. Returns
    /// (where it came from, policy).
    ///
    /// # Errors
    /// Catalog failures, a damaged record.
    pub fn effective_net_policy(&self, name: &str) -> Result<Option<(String, String)>> {
        if let Some(p) = self.net_policy(name)? {
            return Ok(Some(("this store".into(), p)));
        }
        for r in self.remote_configs()? {
            let key = format!("{}\0{name}", r.name);
            if let Some(p) = text(self.record(REMOTE_NET, &key)?, REMOTE_NET, name)? {
                return Ok(Some((format!("remote {}", r.name), p)));
            }
        }
        Ok(None)
    }
}

fn text(v: Option<Vec<u8>>, kind: &str, name: &str) -> Result<Option<String>> {
    v.map(|b| {
        String::from_utf8(b).map_err(|_| Error::RecordCorrupt {
            what: format!("{kind} {name}"),
            reason: "not UTF-8".into(),
        })
    })
    .transpose()
}
