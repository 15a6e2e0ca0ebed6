//! Building a layer's new tree from its upper: the lower trees it is
//! applied onto ([`Trees`]), the walk that merges an upper directory into
//! a lower one ([`Merger`]), and helpers shared with `status`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use lamina_sync::manifest::{Content, DirNode, Entry, EntryKind, Meta, Node, NodeSource, Root};
use lamina_sync::{Layer, ManifestId, Store, TreeWriter, VersionId};

use crate::error::{Error, IoContext, Result};
use crate::hostpath::HostPath;
use crate::marker::{SlotMark, Stamp};
use crate::upper::{self, UpperKind};

/// Reads lower trees.
pub(crate) struct Trees<'a> {
    pub(crate) store: &'a Store,
    pub(crate) dirs: HashMap<ManifestId, Arc<DirNode>>,
}

impl Trees<'_> {
    pub(crate) fn dir(&mut self, id: ManifestId) -> Result<Arc<DirNode>> {
        if let Some(d) = self.dirs.get(&id) {
            return Ok(d.clone());
        }
        match self.store.load(id)? {
            Node::Dir(d) => {
                let d = Arc::new(d);
                self.dirs.insert(id, d.clone());
                Ok(d)
            }
            _ => Err(Error::Store(lamina_sync::Error::ManifestCorrupt {
                id,
                reason: "expected a directory".into(),
            })),
        }
    }

    /// What the trees `roots` (top first) show at `rel`: `Some(true)` a
    /// directory, `Some(false)` something else, `None` nothing.
    fn shows(&mut self, roots: &[ManifestId], rel: &[u8]) -> Result<Option<bool>> {
        let parts: Vec<&[u8]> = rel
            .split(|&b| b == b'/')
            .filter(|p| !p.is_empty())
            .collect();
        for root in roots {
            let mut dir = self.dir(*root)?;
            let mut opaque = false;
            for (i, part) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                let kind = match dir.get(part) {
                    None => break,
                    Some(e) => e.kind.clone(),
                };
                match kind {
                    EntryKind::Whiteout => return Ok(None),
                    EntryKind::Dir { node, opaque: o } => {
                        if last {
                            return Ok(Some(true));
                        }
                        opaque |= o;
                        dir = self.dir(node)?;
                    }
                    _ if last => return Ok(Some(false)),
                    _ => return Ok(None),
                }
            }
            if opaque {
                return Ok(None);
            }
        }
        Ok(None)
    }
}

/// Metadata of an upper entry as a manifest stores it (private xattrs
/// dropped).
pub(crate) fn upper_meta(path: &Path, m: &fs::Metadata) -> Result<Meta> {
    let mut meta = lamina_sync::read_meta(path, m)?;
    meta.xattrs.retain(|x| !upper::is_private(&x.name));
    Ok(meta)
}

/// `/path` for messages.
pub(crate) fn show(rel: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(rel))
}

pub(crate) fn rel_join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    crate::view::join(rel, name)
}

pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<(Vec<u8>, fs::Metadata)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).ctx(dir, "list upper directory")? {
        let e = e.ctx(dir, "list upper directory")?;
        let m = fs::symlink_metadata(e.path()).ctx(e.path(), "stat")?;
        out.push((e.file_name().as_bytes().to_vec(), m));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub(super) struct Merger<'s, 'w, 'x, 'y> {
    pub(super) trees: Trees<'s>,
    pub(super) w: &'w mut TreeWriter<'x, 'y>,
    /// Trees of the slots below, top first.
    pub(super) below: Vec<ManifestId>,
    /// Upper files with several links in this upper: real inode → members.
    pub(super) link_counts: HashMap<u64, u32>,
    /// First member met of each upper link group: real inode → its path.
    pub(super) link_first: HashMap<u64, Vec<u8>>,
    /// The last commit of this upper: its stamps and its tree.
    pub(super) last: Option<(&'s SlotMark, ManifestId)>,
    /// Stamps of the entries committed now.
    pub(super) seen: BTreeMap<String, Stamp>,
    /// Files left out because they kept changing (live commits).
    pub(super) busy: Vec<String>,
    /// Read files twice-checked: the upper is in use.
    pub(super) live: bool,
}

impl Merger<'_, '_, '_, '_> {
    fn whiteout_meta() -> Meta {
        Meta {
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }

    /// The entry at `rel` in the last commit's tree.
    fn last_entry(&mut self, rel: &[u8]) -> Result<Option<Entry>> {
        let Some((_, tree)) = self.last else {
            return Ok(None);
        };
        let mut dir = self.trees.dir(tree)?;
        let parts: Vec<&[u8]> = rel
            .split(|&b| b == b'/')
            .filter(|p| !p.is_empty())
            .collect();
        for (i, part) in parts.iter().enumerate() {
            let Some(e) = dir.get(part).cloned() else {
                return Ok(None);
            };
            if i + 1 == parts.len() {
                return Ok(Some(e));
            }
            match e.kind {
                EntryKind::Dir { node, .. } => dir = self.trees.dir(node)?,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The content the last commit stored for an upper file that has not
    /// changed since.
    fn unchanged(&mut self, rel: &[u8], m: &fs::Metadata) -> Result<Option<(u64, Content)>> {
        if !self.last.is_some_and(|(mark, _)| mark.unchanged(rel, m)) {
            return Ok(None);
        }
        Ok(match self.last_entry(rel)?.map(|e| e.kind) {
            Some(EntryKind::File { size, content, .. }) if size == m.len() => Some((size, content)),
            _ => None,
        })
    }

    /// Chunks an upper file. In a live commit the file must look the same
    /// before and after (else it is retried, then given up: `None`).
    fn read(&mut self, p: &Path) -> Result<Option<(u64, Content)>> {
        if !self.live {
            return Ok(Some(self.w.file(p)?));
        }
        for _ in 0..3 {
            let before = Stamp::of(&fs::symlink_metadata(p).ctx(p, "stat")?);
            let got = self.w.file(p)?;
            if Stamp::of(&fs::symlink_metadata(p).ctx(p, "stat")?) == before {
                return Ok(Some(got));
            }
        }
        Ok(None)
    }

    pub(super) fn merge(
        &mut self,
        dir: &HostPath,
        rel: &[u8],
        lower: Option<Arc<DirNode>>,
    ) -> Result<ManifestId> {
        let mut map: BTreeMap<Vec<u8>, Entry> = lower
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.name.clone(), e.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (name, m) in sorted_entries(dir)? {
            let p = dir.child(&name);
            let crel = rel_join(rel, &name);
            let kind = match upper::classify(&p, &m) {
                UpperKind::Whiteout => {
                    self.seen.insert(hex::encode(&crel), Stamp::of(&m));
                    if self.trees.shows(&self.below, &crel)?.is_some() {
                        map.insert(
                            name.clone(),
                            Entry {
                                name,
                                meta: Self::whiteout_meta(),
                                kind: EntryKind::Whiteout,
                            },
                        );
                    } else {
                        map.remove(&name);
                    }
                    continue;
                }
                UpperKind::Dir { opaque } => {
                    let child_lower = match map.get(&name).map(|e| &e.kind) {
                        Some(EntryKind::Dir { node, .. }) if !opaque => {
                            Some(self.trees.dir(*node)?)
                        }
                        _ => None,
                    };
                    let node = self.merge(&p, &crel, child_lower)?;
                    let keep_opaque = opaque && self.trees.shows(&self.below, &crel)? == Some(true);
                    EntryKind::Dir {
                        node,
                        opaque: keep_opaque,
                    }
                }
                UpperKind::Other => {
                    let ft = m.file_type();
                    if ft.is_file() {
                        let read = match upper::read_origin(&p).ctx(&*p, "read placeholder")? {
                            Some(o) => Some((o.size, o.content)),
                            None => match self.unchanged(&crel, &m)? {
                                Some(x) => Some(x),
                                None => self.read(&p)?,
                            },
                        };
                        let Some((size, content)) = read else {
                            // Still being written: the last commit's entry
                            // (or the lower one) stays for now.
                            self.busy.push(show(&crel));
                            match self.last_entry(&crel)? {
                                Some(e) => {
                                    map.insert(name, e);
                                }
                                None => {
                                    map.remove(&name);
                                }
                            }
                            continue;
                        };
                        let link = if self.link_counts.get(&m.ino()).copied().unwrap_or(0) > 1 {
                            Some(
                                self.link_first
                                    .entry(m.ino())
                                    .or_insert_with(|| crel.clone())
                                    .clone(),
                            )
                        } else {
                            None
                        };
                        EntryKind::File {
                            size,
                            content,
                            link,
                        }
                    } else if ft.is_symlink() {
                        let t = fs::read_link(&p).ctx(&*p, "read symlink")?;
                        EntryKind::Symlink {
                            target: t.as_os_str().as_bytes().to_vec(),
                        }
                    } else if ft.is_char_device() {
                        EntryKind::CharDevice { rdev: m.rdev() }
                    } else if ft.is_block_device() {
                        EntryKind::BlockDevice { rdev: m.rdev() }
                    } else if ft.is_fifo() {
                        EntryKind::Fifo
                    } else {
                        EntryKind::Socket
                    }
                }
            };
            let meta = upper_meta(&p, &m)?;
            self.seen.insert(hex::encode(&crel), Stamp::of(&m));
            map.insert(name.clone(), Entry { name, meta, kind });
        }
        Ok(self.w.dir(DirNode {
            entries: map.into_values().collect(),
        })?)
    }
}

/// Counts, per real inode, the multiply-linked files inside `dir`.
pub(super) fn count_links(dir: &HostPath, counts: &mut HashMap<u64, u32>) -> Result<()> {
    for (name, m) in sorted_entries(dir)? {
        if m.is_dir() {
            count_links(&dir.child(&name), counts)?;
        } else if m.is_file() && m.nlink() > 1 {
            *counts.entry(m.ino()).or_default() += 1;
        }
    }
    Ok(())
}

/// Whether an upper holds any change.
pub(super) fn upper_dirty(upper_root: &Path) -> Result<bool> {
    let marked = matches!(xattr::get(upper_root, upper::ROOT_META), Ok(Some(_)));
    let mut rd = fs::read_dir(upper_root).ctx(upper_root, "list upper directory")?;
    Ok(marked || rd.next().is_some())
}

/// A tree version's root: its metadata and directory node.
pub(crate) type TreeRoot = (Meta, ManifestId);

/// A slot's layer, current head and its tree root.
pub(crate) fn slot_base(
    store: &Store,
    name: &str,
) -> Result<(Layer, Option<VersionId>, Option<TreeRoot>)> {
    let layer = store.layer(name)?;
    let head = store.head(&layer)?;
    let root = match head {
        Some(v) => match store.root_of(v)? {
            Root::Tree { meta, dir } => Some((meta, dir)),
            Root::Disk(_) => return Err(Error::Invalid(format!("layer {name} is a disk layer"))),
        },
        None => None,
    };
    Ok((layer, head, root))
}
