//! The difference mediator: three-way merges of two versions of a layer
//! against their merge base, per path for trees and per cluster for disks.
//!
//! Changes to different paths or clusters merge by themselves and identical
//! changes are no conflict. A real conflict is settled by a [`Take`]: the
//! layer's [`ConflictPolicy`] gives one for every conflict
//! ([`Take::for_policy`]); an admin resolving a pending conflict gives one
//! per path. The merged manifest is stored; the caller makes the version
//! (two parents: server first, then client) and records the
//! [`ConflictRecord`].

mod conflict;
mod disk;
mod local;
mod resolve;
mod tree;

use crate::error::{Error, Result};
use crate::id::{ManifestId, VersionId};
use crate::manifest::{Content, Node, NodeSource, Root};
use crate::policy::ConflictPolicy;
use crate::store::Store;

pub use conflict::{ConflictItem, ConflictRecord, ConflictState, ItemKind};
pub use local::host_name;
pub use resolve::{Choice, ShownItem};
pub use tree::{conflict_name, TreeConflict};

/// How one conflict is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// The server's side.
    Server,
    /// The client's side.
    Client,
    /// Both: trees keep the client's side beside the server's under a
    /// conflict name; disks take the server's clusters (the client's
    /// version stays on a conflict ref).
    KeepBoth,
    /// Not settled: the merge waits (`manual`).
    Pending,
    /// Replace it with this file content (resolving with a file).
    File {
        /// Size.
        size: u64,
        /// Stored content.
        content: Content,
        /// Modification time (seconds, nanoseconds).
        mtime: (i64, u32),
    },
}

impl Take {
    /// What `policy` does with every conflict.
    pub fn for_policy(policy: ConflictPolicy) -> Take {
        match policy {
            ConflictPolicy::ServerWins => Take::Server,
            ConflictPolicy::ClientWins => Take::Client,
            ConflictPolicy::KeepBoth => Take::KeepBoth,
            ConflictPolicy::Manual => Take::Pending,
        }
    }
}

/// What to merge.
pub struct Mediation<'a> {
    /// The merge base (`None`: unrelated histories, merged against nothing).
    pub base: Option<VersionId>,
    /// The server's version.
    pub server: VersionId,
    /// The client's version.
    pub client: VersionId,
    /// The client's host name (for keep-both copies).
    pub host: &'a str,
    /// When, ns since the epoch (for keep-both copies).
    pub now_ns: i64,
}

/// Result of a merge.
#[derive(Debug, Clone)]
pub struct Merged {
    /// The merged root manifest (stored), `None` if something is pending.
    pub root: Option<ManifestId>,
    /// Every real conflict and how it was settled.
    pub items: Vec<ConflictItem>,
}

/// `-HOST-YYYYMMDD-HHMMSS` (UTC) for conflict copies.
pub fn conflict_suffix(host: &str, now_ns: i64) -> String {
    let secs = now_ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "-{host}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Store {
    fn root_node(&self, v: VersionId) -> Result<Root> {
        let root = self.version(v)?.root;
        match self.load(root)? {
            Node::Root(r) => Ok(r),
            _ => Err(Error::ManifestCorrupt {
                id: root,
                reason: "expected a root".into(),
            }),
        }
    }

    /// Merges `m.server` and `m.client` against `m.base`, settling each
    /// conflict with `decide` (trees: per path; disks: `decide` is asked
    /// once, with no path, and its answer applies to every cluster).
    ///
    /// # Errors
    /// Versions of different formats, manifest failures, errors of
    /// `decide`.
    pub fn mediate(
        &self,
        m: &Mediation<'_>,
        decide: &mut dyn FnMut(&TreeConflict<'_>) -> Result<Take>,
    ) -> Result<Merged> {
        self.require_write()?;
        let base = m.base.map(|b| self.root_node(b)).transpose()?;
        let server = self.root_node(m.server)?;
        let client = self.root_node(m.client)?;
        match (&server, &client) {
            (Root::Tree { meta: sm, dir: sd }, Root::Tree { meta: cm, dir: cd }) => {
                let (bmeta, bdir) = match &base {
                    Some(Root::Tree { meta, dir }) => (Some(meta), Some(*dir)),
                    Some(Root::Disk(_)) => {
                        return Err(Error::InvalidInput("the merge base is a disk".into()))
                    }
                    None => (None, None),
                };
                let mut tm = tree::TreeMerge {
                    store: self,
                    decide,
                    suffix: conflict_suffix(m.host, m.now_ns),
                    items: Vec::new(),
                    pending: false,
                };
                let dir = tm.dir("", bdir, Some(*sd), Some(*cd))?.ok_or_else(|| {
                    Error::InvalidInput("merged tree has no root directory".into())
                })?;
                let meta = if bmeta == Some(sm) {
                    cm.clone()
                } else {
                    sm.clone()
                };
                let root = if tm.pending {
                    None
                } else {
                    Some(self.put_node(&Node::Root(Root::Tree { meta, dir }))?)
                };
                Ok(Merged {
                    root,
                    items: tm.items,
                })
            }
            (Root::Disk(sd), Root::Disk(cd)) => {
                let bd = match &base {
                    Some(Root::Disk(d)) => Some(d),
                    Some(Root::Tree { .. }) => {
                        return Err(Error::InvalidInput("the merge base is a tree".into()))
                    }
                    None => None,
                };
                let take = decide(&TreeConflict {
                    path: "",
                    kind: ItemKind::BothChanged,
                    server: None,
                    client: None,
                })?;
                if matches!(take, Take::File { .. }) {
                    return Err(Error::InvalidInput(
                        "a disk conflict is resolved with server or client, not a file".into(),
                    ));
                }
                let mut dm = disk::DiskMerge {
                    store: self,
                    take: take.clone(),
                    clusters: Vec::new(),
                };
                let (root, size_conflict) = dm.root(bd, sd, cd)?;
                let mut items = dm.items();
                if size_conflict {
                    items.push(ConflictItem {
                        path: "size".into(),
                        kind: ItemKind::BothChanged,
                        resolution: items_resolution(&take).into(),
                    });
                }
                let pending = take == Take::Pending && !items.is_empty();
                let root = if pending {
                    None
                } else {
                    Some(self.put_node(&Node::Root(Root::Disk(root)))?)
                };
                Ok(Merged { root, items })
            }
            _ => Err(Error::InvalidInput(
                "cannot merge a tree version with a disk version".into(),
            )),
        }
    }
}

fn items_resolution(t: &Take) -> &'static str {
    match t {
        Take::Client => "client",
        Take::Pending => "pending",
        _ => "server",
    }
}

#[cfg(test)]
mod tests;
