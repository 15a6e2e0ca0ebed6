//! Three-way merge of tree manifests, per path.
//!
//! At each directory the three sides' node ids are compared first: a side
//! equal to the base takes the other whole, so untouched subtrees cost
//! nothing. Where both changed a directory, its entries are merged by name:
//! an entry changed on one side only takes that side; identical changes
//! (mtime aside — the newer is kept) are no conflict; two changed
//! directories merge recursively; anything else is a real conflict, given
//! to the decider.

use std::collections::BTreeMap;

use super::conflict::{ConflictItem, ItemKind};
use super::Take;
use crate::error::{Error, Result};
use crate::id::ManifestId;
use crate::manifest::{Content, DirNode, Entry, EntryKind, Meta, Node, NodeSource, NAME_MAX};
use crate::store::Store;

/// One name's entries on the base, server and client sides.
type Three<'e> = (Option<&'e Entry>, Option<&'e Entry>, Option<&'e Entry>);

/// A conflict as the decider sees it.
pub struct TreeConflict<'a> {
    /// Path in the layer.
    pub path: &'a str,
    /// How the sides differ.
    pub kind: ItemKind,
    /// The server's entry (`None`: deleted there).
    pub server: Option<&'a Entry>,
    /// The client's entry.
    pub client: Option<&'a Entry>,
}

pub(super) struct TreeMerge<'a> {
    pub store: &'a Store,
    pub decide: &'a mut dyn FnMut(&TreeConflict<'_>) -> Result<Take>,
    /// `-HOST-YYYYMMDD-HHMMSS` of keep-both copies.
    pub suffix: String,
    pub items: Vec<ConflictItem>,
    pub pending: bool,
}

fn load_dir(store: &Store, id: Option<ManifestId>) -> Result<DirNode> {
    match id {
        None => Ok(DirNode::default()),
        Some(id) => match store.load(id)? {
            Node::Dir(d) => Ok(d),
            _ => Err(Error::ManifestCorrupt {
                id,
                reason: "expected a directory".into(),
            }),
        },
    }
}

fn dir_of(e: Option<&Entry>) -> Option<ManifestId> {
    match e.map(|e| &e.kind) {
        Some(EntryKind::Dir { node, .. }) => Some(*node),
        _ => None,
    }
}

/// Whether two entries differ only in their modification time.
fn same_but_mtime(a: &Entry, b: &Entry) -> bool {
    a.kind == b.kind
        && a.meta.mode == b.meta.mode
        && a.meta.uid == b.meta.uid
        && a.meta.gid == b.meta.gid
        && a.meta.xattrs == b.meta.xattrs
}

fn newer<'e>(a: &'e Entry, b: &'e Entry) -> &'e Entry {
    if (b.meta.mtime_sec, b.meta.mtime_nsec) > (a.meta.mtime_sec, a.meta.mtime_nsec) {
        b
    } else {
        a
    }
}

/// Three-way merge of one value: a side equal to the base takes the other;
/// otherwise the server's.
fn pick3<T: PartialEq + Clone>(base: Option<&T>, server: &T, client: &T) -> T {
    if base == Some(server) {
        client.clone()
    } else {
        server.clone()
    }
}

/// `NAME.conflict-HOST-STAMP.EXT`, within `NAME_MAX`.
pub fn conflict_name(name: &[u8], suffix: &str) -> Vec<u8> {
    let dot = name.iter().rposition(|&b| b == b'.').filter(|&i| i > 0);
    let (stem, ext) = match dot {
        Some(i) => (&name[..i], &name[i..]),
        None => (name, &b""[..]),
    };
    let tag = format!(".conflict{suffix}");
    let room = NAME_MAX.saturating_sub(tag.len() + ext.len());
    let mut out = stem[..stem.len().min(room)].to_vec();
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(ext);
    out
}

impl TreeMerge<'_> {
    /// Merges directory listings; returns the merged directory's id.
    pub fn dir(
        &mut self,
        path: &str,
        base: Option<ManifestId>,
        server: Option<ManifestId>,
        client: Option<ManifestId>,
    ) -> Result<Option<ManifestId>> {
        if server == client || base == client {
            return Ok(server);
        }
        if base == server {
            return Ok(client);
        }
        let (b, s, c) = (
            load_dir(self.store, base)?,
            load_dir(self.store, server)?,
            load_dir(self.store, client)?,
        );
        let mut names: BTreeMap<&[u8], Three<'_>> = BTreeMap::new();
        for e in &b.entries {
            names.entry(&e.name).or_default().0 = Some(e);
        }
        for e in &s.entries {
            names.entry(&e.name).or_default().1 = Some(e);
        }
        for e in &c.entries {
            names.entry(&e.name).or_default().2 = Some(e);
        }
        let mut out: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        let mut copies: Vec<Entry> = Vec::new();
        for (name, (be, se, ce)) in names {
            let child = format!("{path}/{}", String::from_utf8_lossy(name));
            let (keep, copy) = self.entry(&child, be, se, ce)?;
            if let Some(e) = keep {
                out.insert(e.name.clone(), e);
            }
            copies.extend(copy);
        }
        // Conflict copies take their names last, never over a real entry.
        for mut e in copies {
            let mut n = 2;
            let original = e.name.clone();
            while out.contains_key(&e.name) {
                let mut name = original.clone();
                name.extend_from_slice(format!("-{n}").as_bytes());
                e.name = name;
                n += 1;
            }
            out.insert(e.name.clone(), e);
        }
        let node = Node::Dir(DirNode {
            entries: out.into_values().collect(),
        });
        node.validate()
            .map_err(|r| Error::InvalidInput(format!("merged directory {path}/: {r}")))?;
        Ok(Some(self.store.put_node(&node)?))
    }

    /// Merges one name: the entry kept under it, and a conflict copy.
    fn entry(
        &mut self,
        path: &str,
        b: Option<&Entry>,
        s: Option<&Entry>,
        c: Option<&Entry>,
    ) -> Result<(Option<Entry>, Option<Entry>)> {
        // Modification times alone do not make a change worth a conflict:
        // a side that only touched an entry counts as unchanged.
        let same = |x: Option<&Entry>, y: Option<&Entry>| match (x, y) {
            (Some(x), Some(y)) => same_but_mtime(x, y),
            (None, None) => true,
            _ => false,
        };
        if same(s, c) {
            return Ok((
                match (s, c) {
                    (Some(se), Some(ce)) => Some(newer(se, ce).clone()),
                    _ => None,
                },
                None,
            ));
        }
        if same(b, c) {
            return Ok((s.cloned(), None));
        }
        if same(b, s) {
            return Ok((c.cloned(), None));
        }
        if let (Some(se), Some(ce)) = (s, c) {
            if let (
                EntryKind::Dir {
                    node: sn,
                    opaque: so,
                },
                EntryKind::Dir {
                    node: cn,
                    opaque: co,
                },
            ) = (&se.kind, &ce.kind)
            {
                let bd = dir_of(b);
                let node = self.dir(path, bd, Some(*sn), Some(*cn))?.ok_or_else(|| {
                    Error::InvalidInput(format!("merged directory {path} vanished"))
                })?;
                let bopaque = match b.map(|b| &b.kind) {
                    Some(EntryKind::Dir { opaque, .. }) => Some(*opaque),
                    _ => None,
                };
                let meta: Meta = pick3(b.map(|b| &b.meta), &se.meta, &ce.meta);
                let opaque = pick3(bopaque.as_ref(), so, co);
                return Ok((
                    Some(Entry {
                        name: se.name.clone(),
                        meta,
                        kind: EntryKind::Dir { node, opaque },
                    }),
                    None,
                ));
            }
        }
        let kind = match (b, s, c) {
            (None, _, _) => ItemKind::BothAdded,
            (_, None, _) => ItemKind::ServerDeleted,
            (_, _, None) => ItemKind::ClientDeleted,
            _ => ItemKind::BothChanged,
        };
        let take = (self.decide)(&TreeConflict {
            path,
            kind,
            server: s,
            client: c,
        })?;
        let (keep, copy, resolution) = match take {
            Take::Server => (s.cloned(), None, "server".to_owned()),
            Take::Client => (c.cloned(), None, "client".to_owned()),
            Take::Pending => {
                self.pending = true;
                (s.cloned(), None, "pending".to_owned())
            }
            Take::KeepBoth => match (s, c) {
                (Some(se), Some(ce)) => {
                    let mut copy = ce.clone();
                    copy.name = conflict_name(&ce.name, &self.suffix);
                    if let EntryKind::File { link, .. } = &mut copy.kind {
                        // A copy is a file of its own.
                        *link = None;
                    }
                    let note = format!("kept {}", String::from_utf8_lossy(&copy.name));
                    (Some(se.clone()), Some(copy), note)
                }
                // One side deleted it: keep the side that changed it.
                (Some(se), None) => (Some(se.clone()), None, "server".to_owned()),
                (None, Some(ce)) => (Some(ce.clone()), None, "client".to_owned()),
                (None, None) => (None, None, "server".to_owned()),
            },
            Take::File {
                size,
                ref content,
                mtime,
            } => {
                let like = s.or(c).ok_or_else(|| {
                    Error::InvalidInput(format!("{path}: nothing to replace with a file"))
                })?;
                let mut e = like.clone();
                e.meta.mtime_sec = mtime.0;
                e.meta.mtime_nsec = mtime.1;
                e.kind = EntryKind::File {
                    size,
                    content: content.clone(),
                    link: None,
                };
                (Some(e), None, "file".to_owned())
            }
        };
        self.items.push(ConflictItem {
            path: path.to_owned(),
            kind,
            resolution,
        });
        Ok((keep, copy))
    }
}

/// The entry at `path` (`/a/b`) of the tree under directory `dir`.
///
/// # Errors
/// Manifest failures.
pub(crate) fn lookup(store: &Store, dir: ManifestId, path: &str) -> Result<Option<Entry>> {
    let mut cur = load_dir(store, Some(dir))?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        let Some(e) = cur.get(part.as_bytes()).cloned() else {
            return Ok(None);
        };
        if i + 1 == parts.len() {
            return Ok(Some(e));
        }
        match e.kind {
            EntryKind::Dir { node, .. } => cur = load_dir(store, Some(node))?,
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// The bytes of a regular file's content, if at most `limit` bytes.
///
/// # Errors
/// Missing chunks or nodes.
pub(crate) fn file_bytes(
    store: &Store,
    size: u64,
    content: &Content,
    limit: u64,
) -> Result<Option<Vec<u8>>> {
    if size > limit {
        return Ok(None);
    }
    let mut out = vec![0u8; size as usize];
    crate::manifest::for_each_extent(store, content, size, |off, e| {
        if let crate::manifest::Extent::Data { chunk, .. } = e {
            let data = store.chunk(chunk)?;
            let start = off as usize;
            let end = start + data.len();
            if let Some(dst) = out.get_mut(start..end) {
                dst.copy_from_slice(&data);
            }
        }
        Ok(())
    })?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_keep_the_extension() {
        let s = "-laptop-20261202-101500";
        assert_eq!(
            conflict_name(b"report.txt", s),
            b"report.conflict-laptop-20261202-101500.txt".to_vec()
        );
        assert_eq!(
            conflict_name(b"Makefile", s),
            b"Makefile.conflict-laptop-20261202-101500".to_vec()
        );
        assert_eq!(
            conflict_name(b".bashrc", s),
            b".bashrc.conflict-laptop-20261202-101500".to_vec()
        );
        let long = vec![b'a'; 300];
        assert!(conflict_name(&long, s).len() <= NAME_MAX);
    }
}
