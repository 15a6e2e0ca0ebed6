//! What a version adds over another: the manifest nodes and data chunks of
//! `new` that `base` does not share, found by walking both manifests side
//! by side and descending only where ids differ (so the cost follows the
//! size of the change, not of the layer).
//!
//! The sender of a check-in uses it to list candidates to ask the receiver
//! about; the receiver uses the same walk over what it was sent to prove
//! that every node and chunk a pushed version needs is present before its
//! ref moves.
//!
//! Pairing: the roots pair; directories pair their entries by name, a file's
//! inline extents subtract the base file's chunks (so an insert in the
//! middle of a file sends only the chunks it changed), disk radix nodes
//! pair their slots by index. A long file's index and extent leaves are not
//! paired: their chunks are all candidates, which the receiver's answer
//! prunes.

use std::collections::HashSet;

use crate::error::Result;
use crate::id::{ChunkId, ManifestId};
use crate::manifest::{Content, DirNode, EntryKind, Extent, Node, NodeSource, Root};

/// Nodes and chunks of one or more versions that their bases lack.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    /// Manifest nodes, children before parents.
    pub nodes: Vec<ManifestId>,
    /// Data chunks, in the order met.
    pub chunks: Vec<ChunkId>,
    seen_nodes: HashSet<ManifestId>,
    seen_chunks: HashSet<ChunkId>,
}

impl Delta {
    /// An empty delta.
    pub fn new() -> Delta {
        Delta::default()
    }

    /// Adds what the manifest rooted at `new` has beyond the one rooted at
    /// `base`. Nodes already added by an earlier call are not walked again,
    /// so a chain of versions costs the sum of its changes.
    ///
    /// # Errors
    /// A node of `new` (or `base`) that cannot be loaded.
    pub fn add(
        &mut self,
        src: &dyn NodeSource,
        new: ManifestId,
        base: Option<ManifestId>,
    ) -> Result<()> {
        self.node(src, new, base)
    }

    fn chunk(&mut self, id: ChunkId) {
        if self.seen_chunks.insert(id) {
            self.chunks.push(id);
        }
    }

    fn node(
        &mut self,
        src: &dyn NodeSource,
        new: ManifestId,
        base: Option<ManifestId>,
    ) -> Result<()> {
        if Some(new) == base || self.seen_nodes.contains(&new) {
            return Ok(());
        }
        self.seen_nodes.insert(new);
        let node = src.load(new)?;
        let base_node = match base {
            Some(b) => Some(src.load(b)?),
            None => None,
        };
        match (&node, &base_node) {
            (Node::Root(Root::Tree { dir, .. }), Some(Node::Root(Root::Tree { dir: bd, .. }))) => {
                self.node(src, *dir, Some(*bd))?
            }
            (Node::Root(Root::Disk(d)), Some(Node::Root(Root::Disk(bd)))) => {
                if let Some(top) = d.top {
                    let paired = if bd.levels == d.levels { bd.top } else { None };
                    self.node(src, top, paired)?;
                }
            }
            (Node::Dir(d), Some(Node::Dir(bd))) => self.dir(src, d, Some(bd))?,
            (Node::Dir(d), _) => self.dir(src, d, None)?,
            (Node::Disk(d), Some(Node::Disk(bd))) if d.level == bd.level => {
                let mut theirs = bd.slots.iter().peekable();
                for s in &d.slots {
                    while theirs.peek().is_some_and(|t| t.index < s.index) {
                        theirs.next();
                    }
                    let paired = theirs.peek().filter(|t| t.index == s.index).map(|t| t.id);
                    if paired == Some(s.id) {
                        continue;
                    }
                    if d.level == 0 {
                        self.chunk(ChunkId(s.id));
                    } else {
                        self.node(src, ManifestId(s.id), paired.map(ManifestId))?;
                    }
                }
            }
            _ => {
                // Unpaired: everything below is a candidate.
                for (id, is_node) in node.children() {
                    if is_node {
                        self.node(src, ManifestId(id.0), None)?;
                    } else {
                        self.chunk(id);
                    }
                }
            }
        }
        self.nodes.push(new);
        Ok(())
    }

    fn dir(&mut self, src: &dyn NodeSource, d: &DirNode, base: Option<&DirNode>) -> Result<()> {
        for e in &d.entries {
            let b = base.and_then(|b| b.get(&e.name));
            if b == Some(e) {
                continue;
            }
            match &e.kind {
                EntryKind::Dir { node, .. } => {
                    let paired = match b.map(|b| &b.kind) {
                        Some(EntryKind::Dir { node: bn, .. }) => Some(*bn),
                        _ => None,
                    };
                    self.node(src, *node, paired)?;
                }
                EntryKind::File { content, .. } => match content {
                    Content::Inline(extents) => {
                        let known: HashSet<ChunkId> = match b.map(|b| &b.kind) {
                            Some(EntryKind::File {
                                content: Content::Inline(be),
                                ..
                            }) => data_chunks(be).collect(),
                            _ => HashSet::new(),
                        };
                        for c in data_chunks(extents) {
                            if !known.contains(&c) {
                                self.chunk(c);
                            }
                        }
                    }
                    Content::Indexed(id) => {
                        let paired = match b.map(|b| &b.kind) {
                            Some(EntryKind::File {
                                content: Content::Indexed(bi),
                                ..
                            }) => Some(*bi),
                            _ => None,
                        };
                        self.node(src, *id, paired)?;
                    }
                },
                _ => {}
            }
        }
        Ok(())
    }
}

fn data_chunks(extents: &[Extent]) -> impl Iterator<Item = ChunkId> + '_ {
    extents.iter().filter_map(|e| match e {
        Extent::Data { chunk, .. } => Some(*chunk),
        Extent::Hole { .. } => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{DiskNode, DiskRoot, DiskSlot, Entry, Meta};
    use std::collections::HashMap;

    #[derive(Default)]
    struct Map(HashMap<ManifestId, Node>);

    impl Map {
        fn put(&mut self, n: Node) -> ManifestId {
            let (id, _) = n.encode();
            self.0.insert(id, n);
            id
        }
    }

    impl NodeSource for Map {
        fn load(&self, id: ManifestId) -> Result<Node> {
            self.0
                .get(&id)
                .cloned()
                .ok_or(crate::Error::ManifestCorrupt {
                    id,
                    reason: "missing".into(),
                })
        }
    }

    fn meta() -> Meta {
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 1,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }

    fn file(name: &str, chunks: &[u8]) -> Entry {
        let extents: Vec<Extent> = chunks
            .iter()
            .map(|c| Extent::Data {
                chunk: ChunkId([*c; 32]),
                len: 10,
            })
            .collect();
        Entry {
            name: name.as_bytes().to_vec(),
            meta: meta(),
            kind: EntryKind::File {
                size: 10 * chunks.len() as u64,
                content: Content::Inline(extents),
                link: None,
            },
        }
    }

    fn tree(m: &mut Map, sub: Vec<Entry>, top: Vec<Entry>) -> ManifestId {
        let sub = m.put(Node::Dir(DirNode { entries: sub }));
        let mut entries = top;
        entries.push(Entry {
            name: b"sub".to_vec(),
            meta: meta(),
            kind: EntryKind::Dir {
                node: sub,
                opaque: false,
            },
        });
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let dir = m.put(Node::Dir(DirNode { entries }));
        m.put(Node::Root(Root::Tree { meta: meta(), dir }))
    }

    #[test]
    fn only_changed_subtrees_and_chunks() {
        let mut m = Map::default();
        let base = tree(
            &mut m,
            vec![file("a", &[1, 2, 3]), file("b", &[4])],
            vec![file("top", &[9])],
        );
        let new = tree(
            &mut m,
            vec![file("a", &[1, 7, 3]), file("b", &[4])],
            vec![file("top", &[9])],
        );
        let mut d = Delta::new();
        d.add(&m, new, Some(base)).unwrap();
        assert_eq!(d.chunks, vec![ChunkId([7; 32])]);
        // root, top dir, sub dir — children first.
        assert_eq!(d.nodes.len(), 3);
        assert_eq!(*d.nodes.last().unwrap(), new);
        let mut same = Delta::new();
        same.add(&m, base, Some(base)).unwrap();
        assert!(same.nodes.is_empty() && same.chunks.is_empty());
        let mut all = Delta::new();
        all.add(&m, new, None).unwrap();
        assert_eq!(all.chunks.len(), 5);
    }

    #[test]
    fn disks_pair_slots() {
        let mut m = Map::default();
        let mut disk = |slots: &[(u16, u8)]| {
            let slots = slots
                .iter()
                .map(|(i, c)| DiskSlot {
                    index: *i,
                    id: [*c; 32],
                })
                .collect();
            let top = m.put(Node::Disk(DiskNode { level: 0, slots }));
            m.put(Node::Root(Root::Disk(DiskRoot {
                size: 1 << 20,
                cluster_size: 65536,
                levels: 1,
                top: Some(top),
            })))
        };
        let base = disk(&[(0, 1), (3, 2), (7, 3)]);
        let new = disk(&[(0, 1), (3, 5), (7, 3), (9, 6)]);
        let mut d = Delta::new();
        d.add(&m, new, Some(base)).unwrap();
        assert_eq!(d.chunks, vec![ChunkId([5; 32]), ChunkId([6; 32])]);
        assert_eq!(d.nodes.len(), 2);
    }
}
