//! Reachability: which versions, manifest nodes and chunks the refs and the
//! reflog keep alive. Shared by gc (mark) and fsck (verify).
//!
//! Roots are every ref target and every version named by a kept reflog
//! entry; from a version the walk follows its parents and its manifest.
//! Each node and chunk is visited once however many versions share it.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestId, VersionId};
use crate::manifest::disk::RADIX_BITS;
use crate::manifest::{Content, EntryKind, Node, NodeSource, Root};
use crate::store::Store;

/// What the walk reports besides the ids it marks.
pub(crate) trait Visitor {
    /// A version or node could not be read; the walk skips what is below it.
    fn broken(&mut self, at: &Where<'_>, error: Error);
    /// A data chunk was reached for the first time.
    fn data(&mut self, _at: &Where<'_>, _id: ChunkId) {}
    /// A version was read.
    fn version(&mut self, _id: VersionId) {}
}

/// Where in the store something was found, for messages.
pub(crate) struct Where<'a> {
    /// The version being walked.
    pub version: Option<VersionId>,
    /// Path (tree) or cluster (disk) within it.
    pub path: &'a str,
}

impl std::fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(v) if self.path.is_empty() => write!(f, "version {}", v.short()),
            Some(v) => write!(f, "version {} {}", v.short(), self.path),
            None => f.write_str(self.path),
        }
    }
}

/// The set of everything reachable.
#[derive(Default)]
pub(crate) struct Reach {
    /// Versions seen.
    pub versions: HashSet<VersionId>,
    /// Manifest nodes and data chunks seen (nodes are chunks too).
    pub chunks: HashSet<ChunkId>,
    /// Manifest nodes loaded.
    pub nodes: u64,
}

/// Every version the refs and the reflog name.
pub(crate) fn roots(store: &Store) -> Result<Vec<VersionId>> {
    let mut roots: Vec<VersionId> = store.refs()?.into_iter().map(|(_, v)| v).collect();
    store.each_reflog(&[], &mut |_, e| {
        roots.extend(e.old);
        roots.extend(e.new);
        Ok(())
    })?;
    roots.sort();
    roots.dedup();
    Ok(roots)
}

impl Reach {
    /// Walks from `roots`, marking everything reachable.
    pub fn walk(store: &Store, roots: &[VersionId], v: &mut dyn Visitor) -> Reach {
        let mut reach = Reach::default();
        let mut stack: Vec<VersionId> = roots.to_vec();
        while let Some(id) = stack.pop() {
            if !reach.versions.insert(id) {
                continue;
            }
            let at = Where {
                version: Some(id),
                path: "",
            };
            let version = match store.version(id) {
                Ok(ver) => ver,
                Err(e) => {
                    v.broken(&at, e);
                    continue;
                }
            };
            v.version(id);
            stack.extend(version.parents.iter().copied());
            reach.node(store, id, version.root, "", v);
        }
        reach
    }

    fn load(
        &mut self,
        store: &Store,
        version: VersionId,
        id: ManifestId,
        path: &str,
        v: &mut dyn Visitor,
    ) -> Option<Node> {
        if !self.chunks.insert(id.chunk()) {
            return None;
        }
        self.nodes += 1;
        match store.load(id) {
            Ok(n) => Some(n),
            Err(e) => {
                v.broken(
                    &Where {
                        version: Some(version),
                        path,
                    },
                    e,
                );
                None
            }
        }
    }

    fn node(
        &mut self,
        store: &Store,
        version: VersionId,
        id: ManifestId,
        path: &str,
        v: &mut dyn Visitor,
    ) {
        let Some(node) = self.load(store, version, id, path, v) else {
            return;
        };
        match node {
            Node::Root(Root::Tree { dir, .. }) => self.node(store, version, dir, "", v),
            Node::Root(Root::Disk(d)) => {
                if let Some(top) = d.top {
                    self.radix(store, version, top, 0, v);
                }
            }
            Node::Dir(dir) => {
                for e in dir.entries {
                    let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
                    match e.kind {
                        EntryKind::Dir { node, .. } => self.node(store, version, node, &p, v),
                        EntryKind::File { content, .. } => {
                            self.content(store, version, &content, &p, v)
                        }
                        _ => {}
                    }
                }
            }
            Node::FileIndex(index) => {
                for leaf in index.leaves {
                    self.node(store, version, leaf.node, path, v);
                }
            }
            Node::Extents(leaf) => {
                let content = Content::Inline(leaf.extents);
                self.content(store, version, &content, path, v);
            }
            Node::Disk(_) => {
                // Reached only through `radix`, which tracks the cluster base.
            }
        }
    }

    fn content(
        &mut self,
        store: &Store,
        version: VersionId,
        c: &Content,
        path: &str,
        v: &mut dyn Visitor,
    ) {
        match c {
            Content::Indexed(id) => self.node(store, version, *id, path, v),
            Content::Inline(_) => {
                for (id, _) in c.children() {
                    if self.chunks.insert(id) {
                        v.data(
                            &Where {
                                version: Some(version),
                                path,
                            },
                            id,
                        );
                    }
                }
            }
        }
    }

    fn radix(
        &mut self,
        store: &Store,
        version: VersionId,
        id: ManifestId,
        base: u64,
        v: &mut dyn Visitor,
    ) {
        let label = format!("radix node under cluster {}", base);
        let Some(node) = self.load(store, version, id, &label, v) else {
            return;
        };
        let Node::Disk(d) = node else {
            v.broken(
                &Where {
                    version: Some(version),
                    path: &label,
                },
                Error::ManifestCorrupt {
                    id,
                    reason: "expected a disk radix node".into(),
                },
            );
            return;
        };
        for slot in d.slots {
            let index = (base << RADIX_BITS) | u64::from(slot.index);
            if d.level == 0 {
                let id = ChunkId(slot.id);
                if self.chunks.insert(id) {
                    v.data(
                        &Where {
                            version: Some(version),
                            path: &format!("cluster {index}"),
                        },
                        id,
                    );
                }
            } else {
                self.radix(store, version, ManifestId(slot.id), index, v);
            }
        }
    }
}
