//! Pending changes: `lamina status` lists them per layer; `lamina commit`
//! turns each layer's upper into a new version of the layer.
//!
//! Commit merges an upper into the layer's current head, bottom slot
//! first: upper files replace lower ones (placeholders keep their lower
//! chunks, real files are chunked like an import), upper directories merge
//! with lower ones unless opaque, whiteouts delete. A whiteout or opaque
//! flag is kept in the new version only where a layer below in the
//! composition still has the path (otherwise it would hide nothing). All
//! new versions and head moves are one catalog batch. The uppers are
//! emptied afterwards; a crash in between leaves the old uppers over the
//! new heads, which shows the same tree, and the next commit then finds
//! nothing changed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use lamina_sync::manifest::{DirNode, Entry, EntryKind, Meta, Node, NodeSource, Root};
use lamina_sync::{now_ns, Layer, ManifestId, Progress, Store, TreeWriter, Version, VersionId};
use serde::Serialize;

use crate::compose::{self, Composition};
use crate::error::{Error, IoContext, Result};
use crate::mount::{clear_uppers, lock_unmounted};
use crate::upper::{self, UpperKind};

/// Pending changes of one layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotChanges {
    /// Kind of the slot.
    pub kind: String,
    /// Layer name.
    pub layer: String,
    /// Paths that are new.
    pub added: Vec<String>,
    /// Paths whose content or metadata changed.
    pub changed: Vec<String>,
    /// Paths deleted.
    pub deleted: Vec<String>,
}

/// One layer's result of a commit.
#[derive(Debug, Clone, Serialize)]
pub struct CommittedLayer {
    /// Kind of the slot.
    pub kind: String,
    /// Layer name.
    pub layer: String,
    /// The new version (`None`: nothing changed).
    pub version: Option<VersionId>,
    /// The head it was made on.
    pub parent: Option<VersionId>,
}

/// Result of a commit.
#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    /// Composition.
    pub composition: String,
    /// Per writable layer.
    pub layers: Vec<CommittedLayer>,
    /// Bytes of new file data read from the uppers.
    pub bytes_read: u64,
    /// Chunks the store lacked.
    pub chunks_new: u64,
}

/// Reads lower trees.
struct Trees<'a> {
    store: &'a Store,
    dirs: HashMap<ManifestId, Arc<DirNode>>,
}

impl Trees<'_> {
    fn dir(&mut self, id: ManifestId) -> Result<Arc<DirNode>> {
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
fn upper_meta(path: &Path, m: &fs::Metadata) -> Result<Meta> {
    let mut meta = lamina_sync::read_meta(path, m)?;
    meta.xattrs.retain(|x| !upper::is_private(&x.name));
    Ok(meta)
}

fn rel_join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    crate::view::join(rel, name)
}

fn sorted_entries(dir: &Path) -> Result<Vec<(Vec<u8>, fs::Metadata)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).ctx(dir, "list upper directory")? {
        let e = e.ctx(dir, "list upper directory")?;
        let m = fs::symlink_metadata(e.path()).ctx(e.path(), "stat")?;
        out.push((e.file_name().as_bytes().to_vec(), m));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

struct Merger<'s, 'w, 'x, 'y> {
    trees: Trees<'s>,
    w: &'w mut TreeWriter<'x, 'y>,
    /// Trees of the slots below, top first.
    below: Vec<ManifestId>,
    /// Upper files with several links in this upper: real inode → members.
    link_counts: HashMap<u64, u32>,
    /// First member met of each upper link group: real inode → its path.
    link_first: HashMap<u64, Vec<u8>>,
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

    fn merge(&mut self, dir: &Path, rel: &[u8], lower: Option<Arc<DirNode>>) -> Result<ManifestId> {
        let mut map: BTreeMap<Vec<u8>, Entry> = lower
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.name.clone(), e.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (name, m) in sorted_entries(dir)? {
            let p = dir.join(OsStr::from_bytes(&name));
            let crel = rel_join(rel, &name);
            let kind = match upper::classify(&p, &m) {
                UpperKind::Whiteout => {
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
                        let (size, content) =
                            match upper::read_origin(&p).ctx(&p, "read placeholder")? {
                                Some(o) => (o.size, o.content),
                                None => self.w.file(&p)?,
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
                        let t = fs::read_link(&p).ctx(&p, "read symlink")?;
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
            map.insert(name.clone(), Entry { name, meta, kind });
        }
        Ok(self.w.dir(DirNode {
            entries: map.into_values().collect(),
        })?)
    }
}

/// Counts, per real inode, the multiply-linked files inside `dir`.
fn count_links(dir: &Path, counts: &mut HashMap<u64, u32>) -> Result<()> {
    for (name, m) in sorted_entries(dir)? {
        if m.is_dir() {
            count_links(&dir.join(OsStr::from_bytes(&name)), counts)?;
        } else if m.is_file() && m.nlink() > 1 {
            *counts.entry(m.ino()).or_default() += 1;
        }
    }
    Ok(())
}

/// Whether an upper holds any change.
fn upper_dirty(upper_root: &Path) -> Result<bool> {
    let marked = matches!(xattr::get(upper_root, upper::ROOT_META), Ok(Some(_)));
    let mut rd = fs::read_dir(upper_root).ctx(upper_root, "list upper directory")?;
    Ok(marked || rd.next().is_some())
}

/// A tree version's root: its metadata and directory node.
type TreeRoot = (Meta, ManifestId);

/// A slot's layer, current head and its tree root.
fn slot_base(store: &Store, name: &str) -> Result<(Layer, Option<VersionId>, Option<TreeRoot>)> {
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

/// Commits every layer's pending changes as new versions in one catalog
/// write, then empties the uppers.
///
/// # Errors
/// [`Error::NotFound`], [`Error::Mounted`], a head that moved meanwhile
/// (`RefConflict`), unreadable uppers, store failures.
pub fn commit(
    store: &Store,
    name: &str,
    message: Option<&str>,
    author: &str,
    progress: &dyn Progress,
) -> Result<CommitReport> {
    let comp = compose::get(store, name)?;
    let root = store.root().to_owned();
    let _lock = lock_unmounted(&root, &comp, "unmount it before committing")?;
    let mut bases = Vec::with_capacity(comp.slots.len());
    for s in &comp.slots {
        match s.pin {
            Some(v) => {
                let layer = store.layer(&s.layer)?;
                let tree = match store.root_of(v)? {
                    Root::Tree { meta, dir } => Some((meta, dir)),
                    Root::Disk(_) => None,
                };
                bases.push((layer, Some(v), tree));
            }
            None => bases.push(slot_base(store, &s.layer)?),
        }
    }
    let dirty: Vec<bool> = (0..comp.slots.len())
        .map(|i| {
            if comp.slots[i].writable() {
                upper_dirty(&comp.upper_dir(&root, i))
            } else {
                Ok(false)
            }
        })
        .collect::<Result<_>>()?;
    let (new_roots, stats) = store.write_tree(progress, |w| {
        let mut roots: Vec<Option<ManifestId>> = Vec::with_capacity(bases.len());
        let mut out = Vec::with_capacity(bases.len());
        for (i, (_, _, base)) in bases.iter().enumerate() {
            let tree_dir = base.as_ref().map(|(_, d)| *d);
            if !dirty[i] {
                roots.push(tree_dir);
                out.push(None);
                continue;
            }
            let upper_root = comp.upper_dir(&root, i);
            let mut counts = HashMap::new();
            count_links(&upper_root, &mut counts).map_err(to_sync)?;
            let mut trees = Trees {
                store,
                dirs: HashMap::new(),
            };
            let lower_dir = match tree_dir {
                Some(d) => Some(trees.dir(d).map_err(to_sync)?),
                None => None,
            };
            let below: Vec<ManifestId> = roots.iter().rev().flatten().copied().collect();
            let mut m = Merger {
                trees,
                w,
                below,
                link_counts: counts,
                link_first: HashMap::new(),
            };
            let dir = m.merge(&upper_root, b"", lower_dir).map_err(to_sync)?;
            let marked = matches!(xattr::get(&upper_root, upper::ROOT_META), Ok(Some(_)));
            let meta = match (marked, base) {
                (false, Some((meta, _))) => meta.clone(),
                _ => {
                    let md =
                        fs::symlink_metadata(&upper_root).map_err(|e| lamina_sync::Error::Io {
                            path: upper_root.clone(),
                            op: "stat",
                            source: e,
                        })?;
                    upper_meta(&upper_root, &md).map_err(to_sync)?
                }
            };
            let new_root = w.root(meta, dir)?;
            roots.push(Some(dir));
            out.push(Some(new_root));
        }
        Ok(out)
    })?;
    let mut report = CommitReport {
        composition: comp.name.clone(),
        layers: Vec::new(),
        bytes_read: stats.bytes_read,
        chunks_new: stats.chunks_new,
    };
    let mut batch = store.batch()?;
    let message = message
        .map(str::to_owned)
        .unwrap_or_else(|| format!("commit of composition {}", comp.name));
    for (i, ((layer, head, _), new_root)) in bases.iter().zip(&new_roots).enumerate() {
        if !comp.slots[i].writable() {
            continue;
        }
        let old_root = match head {
            Some(h) => Some(store.version(*h)?.root),
            None => None,
        };
        let version = match new_root {
            Some(r) if Some(*r) != old_root => {
                let v = Version {
                    layer: layer.id,
                    parents: head.iter().copied().collect(),
                    time_ns: now_ns(),
                    author: author.to_owned(),
                    message: message.clone(),
                    root: *r,
                };
                let id = batch.put_version(&v)?;
                batch.move_head(layer, *head, id, "commit")?;
                Some(id)
            }
            _ => None,
        };
        report.layers.push(CommittedLayer {
            kind: comp.slots[i].kind.to_string(),
            layer: layer.name.clone(),
            version,
            parent: *head,
        });
    }
    store.commit(batch)?;
    clear_uppers(&root, &comp)?;
    Ok(report)
}

fn to_sync(e: Error) -> lamina_sync::Error {
    match e {
        Error::Store(s) => s,
        Error::Io { path, op, source } => lamina_sync::Error::Io { path, op, source },
        other => lamina_sync::Error::InvalidInput(other.to_string()),
    }
}

/// Lists each writable layer's pending changes.
///
/// # Errors
/// [`Error::NotFound`], unreadable uppers, store failures.
pub fn status(store: &Store, name: &str) -> Result<Vec<SlotChanges>> {
    let comp = compose::get(store, name)?;
    let root = store.root().to_owned();
    let mut out = Vec::new();
    for (i, s) in comp.slots.iter().enumerate() {
        if !s.writable() {
            continue;
        }
        let (_, _, base) = slot_base(store, &s.layer)?;
        let mut changes = SlotChanges {
            kind: s.kind.to_string(),
            layer: s.layer.clone(),
            ..SlotChanges::default()
        };
        let upper_root = comp.upper_dir(&root, i);
        if upper_root.exists() {
            let mut trees = Trees {
                store,
                dirs: HashMap::new(),
            };
            let lower = match &base {
                Some((_, d)) => Some(trees.dir(*d)?),
                None => None,
            };
            if matches!(xattr::get(&upper_root, upper::ROOT_META), Ok(Some(_))) {
                let md = fs::symlink_metadata(&upper_root).ctx(&upper_root, "stat")?;
                let meta = upper_meta(&upper_root, &md)?;
                // A layer's first version has a root anyway: not news.
                if base.as_ref().is_some_and(|(m, _)| !same_meta(m, &meta)) {
                    changes.changed.push("/".into());
                }
            }
            walk_status(&mut trees, &upper_root, b"", lower, &mut changes)?;
        }
        out.push(changes);
    }
    Ok(out)
}

/// Mode, owner and xattrs equal (times are not compared for directories).
fn same_meta(a: &Meta, b: &Meta) -> bool {
    a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.xattrs == b.xattrs
}

fn show(rel: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(rel))
}

fn walk_status(
    trees: &mut Trees<'_>,
    dir: &Path,
    rel: &[u8],
    lower: Option<Arc<DirNode>>,
    out: &mut SlotChanges,
) -> Result<()> {
    for (name, m) in sorted_entries(dir)? {
        let p = dir.join(OsStr::from_bytes(&name));
        let crel = rel_join(rel, &name);
        let old = lower
            .as_ref()
            .and_then(|d| d.get(&name))
            .filter(|e| e.kind != EntryKind::Whiteout);
        match upper::classify(&p, &m) {
            UpperKind::Whiteout => out.deleted.push(show(&crel)),
            UpperKind::Dir { opaque } => {
                let meta = upper_meta(&p, &m)?;
                let child_lower = match old.map(|e| (&e.kind, &e.meta)) {
                    Some((EntryKind::Dir { node, .. }, lmeta)) => {
                        if opaque {
                            out.changed.push(show(&crel));
                            None
                        } else {
                            if !same_meta(lmeta, &meta) {
                                out.changed.push(show(&crel));
                            }
                            Some(trees.dir(*node)?)
                        }
                    }
                    Some(_) => {
                        out.changed.push(show(&crel));
                        None
                    }
                    None => {
                        out.added.push(show(&crel));
                        None
                    }
                };
                walk_status(trees, &p, &crel, child_lower, out)?;
            }
            UpperKind::Other => match old {
                None => out.added.push(show(&crel)),
                Some(e) => {
                    let meta = upper_meta(&p, &m)?;
                    let same = match (&e.kind, upper::read_origin(&p).ctx(&p, "read placeholder")?)
                    {
                        (EntryKind::File { size, content, .. }, Some(o)) => {
                            o.size == *size
                                && o.content == *content
                                && same_meta(&e.meta, &meta)
                                && e.meta.mtime_sec == meta.mtime_sec
                                && e.meta.mtime_nsec == meta.mtime_nsec
                        }
                        _ => false,
                    };
                    if !same {
                        out.changed.push(show(&crel));
                    }
                }
            },
        }
    }
    Ok(())
}

/// The slots of a composition as `kind=layer[@version]`, for listings.
pub fn describe(comp: &Composition) -> Vec<String> {
    comp.slots
        .iter()
        .map(|s| match s.pin {
            Some(v) => format!("{}={}@{}", s.kind, s.layer, v.short()),
            None => format!("{}={}", s.kind, s.layer),
        })
        .collect()
}
