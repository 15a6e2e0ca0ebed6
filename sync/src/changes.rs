//! Comparing two versions.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::{ManifestId, VersionId};
use crate::manifest::diff::{diff_disks, diff_trees, ClusterRange, PathChange};
use crate::manifest::{Node, NodeSource, Root};
use crate::store::Store;

/// Differences between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum Diff {
    /// Tree layers: changed paths in depth-first name order.
    Tree {
        /// The changes.
        changes: Vec<PathChange>,
    },
    /// Disk layers: changed cluster ranges in order.
    Disk {
        /// Cluster size in bytes.
        cluster_size: u32,
        /// Virtual size of the older version.
        size_from: u64,
        /// Virtual size of the newer version.
        size_to: u64,
        /// The changes.
        ranges: Vec<ClusterRange>,
    },
}

impl Store {
    /// The root manifest of a version.
    ///
    /// # Errors
    /// Missing or corrupt version or root node.
    pub fn root_of(&self, version: VersionId) -> Result<Root> {
        let v = self.version(version)?;
        self.load_root(v.root)
    }

    fn load_root(&self, id: ManifestId) -> Result<Root> {
        match self.load(id)? {
            Node::Root(r) => Ok(r),
            other => Err(Error::ManifestCorrupt {
                id,
                reason: format!(
                    "expected a root, found {}",
                    crate::manifest::disk::node_name(&other)
                ),
            }),
        }
    }

    /// What changed from version `a` to version `b`.
    ///
    /// # Errors
    /// Versions of different formats, missing or corrupt manifests.
    pub fn diff(&self, a: VersionId, b: VersionId) -> Result<Diff> {
        match (self.root_of(a)?, self.root_of(b)?) {
            (Root::Tree { meta: ma, dir: da }, Root::Tree { meta: mb, dir: db }) => {
                Ok(Diff::Tree {
                    changes: diff_trees(self, (&ma, da), (&mb, db))?,
                })
            }
            (Root::Disk(ra), Root::Disk(rb)) => Ok(Diff::Disk {
                cluster_size: rb.cluster_size,
                size_from: ra.size,
                size_to: rb.size,
                ranges: diff_disks(self, &ra, &rb)?,
            }),
            _ => Err(Error::InvalidInput(format!(
                "cannot compare a tree version with a disk version ({} and {})",
                a.short(),
                b.short()
            ))),
        }
    }
}
