//! `lamina commit`: turns each layer's upper into a new version of the
//! layer, unmounted or — by the mount daemon — while mounted.
//!
//! A commit applies an upper onto the version its mount shows under it
//! (the *view base*, see [`crate::marker`]; the head when there is no
//! marker): upper files replace lower ones (placeholders keep their lower
//! chunks, unchanged files keep the chunks of the last commit, other files
//! are chunked like an import), upper directories merge with lower ones
//! unless opaque, whiteouts delete. A whiteout or opaque flag is kept in
//! the new version only where a layer below in the composition still has
//! the path (otherwise it would hide nothing).
//!
//! The new version descends from the last commit of the upper (or the view
//! base). If the layer's head is elsewhere — a sync merged changes from
//! another machine meanwhile — the new version is merged three ways with
//! the head through the mediator (the layer's conflict policy; `manual`
//! keeps both locally, there is no admin to wait for), so neither side's
//! changes are lost.
//!
//! An unmounted commit empties the uppers afterwards; a crash in between
//! leaves the old uppers over the new heads, which shows the same tree,
//! and the next commit then finds nothing changed. A live commit keeps the
//! uppers and records what it committed in the marker; a file still being
//! written while it is read is left for the next commit.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use lamina_sync::manifest::{Content, DirNode, Entry, EntryKind, Meta, Node, NodeSource, Root};
use lamina_sync::merge::{ConflictRecord, ConflictState, Mediation, Take};
use lamina_sync::{
    now_ns, ConflictPolicy, Layer, ManifestId, Progress, Store, TreeWriter, Version, VersionId,
};
use serde::{Deserialize, Serialize};

use crate::compose::{self, Composition};
use crate::error::{Error, IoContext, Result};
use crate::marker::{Marker, SlotMark, Stamp};
use crate::mount::{clear_uppers, lock_unmounted};
use crate::upper::{self, UpperKind};

/// One layer's result of a commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitReport {
    /// Composition.
    pub composition: String,
    /// Per writable layer.
    pub layers: Vec<CommittedLayer>,
    /// Bytes of new file data read from the uppers.
    pub bytes_read: u64,
    /// Chunks the store lacked.
    pub chunks_new: u64,
    /// Files left for the next commit because they changed while being
    /// read (live commits only).
    pub busy: Vec<String>,
    /// Conflicts met merging with heads that had moved.
    pub conflicts: Vec<ConflictRecord>,
}

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

struct Merger<'s, 'w, 'x, 'y> {
    trees: Trees<'s>,
    w: &'w mut TreeWriter<'x, 'y>,
    /// Trees of the slots below, top first.
    below: Vec<ManifestId>,
    /// Upper files with several links in this upper: real inode → members.
    link_counts: HashMap<u64, u32>,
    /// First member met of each upper link group: real inode → its path.
    link_first: HashMap<u64, Vec<u8>>,
    /// The last commit of this upper: its stamps and its tree.
    last: Option<(&'s SlotMark, ManifestId)>,
    /// Stamps of the entries committed now.
    seen: BTreeMap<String, Stamp>,
    /// Files left out because they kept changing (live commits).
    busy: Vec<String>,
    /// Read files twice-checked: the upper is in use.
    live: bool,
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
                        let read = match upper::read_origin(&p).ctx(&p, "read placeholder")? {
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
            self.seen.insert(hex::encode(&crel), Stamp::of(&m));
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

/// Commits every layer's pending changes as new versions, then empties the
/// uppers. A mounted composition is committed by its daemon instead: see
/// [`commit_mounted`].
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
    let _lock = lock_unmounted(&root, &comp, "commit it with commit_mounted")?;
    let report = commit_uppers(store, &comp, message, author, progress, false)?;
    clear_uppers(&root, &comp)?;
    Marker::remove(&comp.dir(&root))?;
    Ok(report)
}

/// Asks the daemon of composition `name`, if it is mounted, to commit its
/// pending changes while it stays mounted (it keeps the uppers; see the
/// module doc). Returns `None` when the composition is not mounted. The
/// daemon opens the store for writing itself, so the caller must not hold
/// it open for writing.
///
/// # Errors
/// [`Error::NotFound`], [`Error::Daemon`] when the daemon's commit failed,
/// a daemon that cannot be reached.
pub fn commit_mounted(
    store: &Store,
    name: &str,
    message: Option<&str>,
    author: &str,
) -> Result<Option<CommitReport>> {
    let comp = compose::get(store, name)?;
    let root = store.root();
    if crate::mount::mounted(root, &comp).is_none() {
        return Ok(None);
    }
    crate::control::request_commit(root, &comp, message, author).map(Some)
}

/// What a writable slot's commit starts from.
struct Plan {
    layer: Layer,
    /// The head now.
    head: Option<VersionId>,
    /// The version shown under the upper.
    view: Option<VersionId>,
    /// The version a new one descends from: the last commit of the upper,
    /// else the view.
    parent: Option<VersionId>,
    /// The view's tree.
    tree: Option<TreeRoot>,
}

/// `v` if it is a version of `layer` in the store.
fn of_layer(store: &Store, layer: &Layer, v: Option<VersionId>) -> Option<VersionId> {
    v.filter(|v| store.version(*v).is_ok_and(|x| x.layer == layer.id))
}

fn tree_of(store: &Store, v: Option<VersionId>) -> Result<Option<TreeRoot>> {
    Ok(match v {
        Some(v) => match store.root_of(v)? {
            Root::Tree { meta, dir } => Some((meta, dir)),
            Root::Disk(_) => None,
        },
        None => None,
    })
}

/// The commit itself (see the module doc); `live` leaves the uppers and
/// records the marker.
pub(crate) fn commit_uppers(
    store: &Store,
    comp: &Composition,
    message: Option<&str>,
    author: &str,
    progress: &dyn Progress,
    live: bool,
) -> Result<CommitReport> {
    let root = store.root().to_owned();
    let cdir = comp.dir(&root);
    let mut marker = Marker::load(&cdir)?;
    let mut plans = Vec::with_capacity(comp.slots.len());
    for (i, s) in comp.slots.iter().enumerate() {
        let layer = store.layer(&s.layer)?;
        let head = store.head(&layer)?;
        let (view, parent) = match s.pin {
            Some(v) => (Some(v), Some(v)),
            None => {
                // A marker says what the mount shows (possibly nothing: an
                // empty layer); without one, the upper is over the head.
                let view = match marker.slots.get(&i) {
                    Some(m) if m.view_base.is_none() => None,
                    Some(m) => of_layer(store, &layer, m.view_base).or(head),
                    None => head,
                };
                let last = of_layer(store, &layer, marker.slots.get(&i).and_then(|m| m.last));
                (view, last.or(view))
            }
        };
        let tree = tree_of(store, view)?;
        plans.push(Plan {
            layer,
            head,
            view,
            parent,
            tree,
        });
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
    let last_trees: Vec<Option<ManifestId>> = plans
        .iter()
        .map(|p| {
            if p.parent == p.view {
                Ok(None)
            } else {
                Ok(tree_of(store, p.parent)?.map(|(_, d)| d))
            }
        })
        .collect::<Result<_>>()?;
    let mut seen: Vec<BTreeMap<String, Stamp>> = vec![BTreeMap::new(); comp.slots.len()];
    let mut busy = Vec::new();
    let (new_roots, stats) = store.write_tree(progress, |w| {
        let mut roots: Vec<Option<ManifestId>> = Vec::with_capacity(plans.len());
        let mut out = Vec::with_capacity(plans.len());
        for (i, plan) in plans.iter().enumerate() {
            let tree_dir = plan.tree.as_ref().map(|(_, d)| *d);
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
            let last = match (marker.slots.get(&i), last_trees[i].or(tree_dir)) {
                (Some(mark), Some(t)) if plan.parent.is_some() => Some((mark, t)),
                _ => None,
            };
            let mut m = Merger {
                trees,
                w,
                below,
                link_counts: counts,
                link_first: HashMap::new(),
                last,
                seen: BTreeMap::new(),
                busy: Vec::new(),
                live,
            };
            let dir = m.merge(&upper_root, b"", lower_dir).map_err(to_sync)?;
            seen[i] = std::mem::take(&mut m.seen);
            busy.extend(
                m.busy
                    .drain(..)
                    .map(|p| format!("{}:{p}", comp.slots[i].layer)),
            );
            let marked = matches!(xattr::get(&upper_root, upper::ROOT_META), Ok(Some(_)));
            let meta = match (marked, &plan.tree) {
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
        busy,
        conflicts: Vec::new(),
    };
    let message = message
        .map(str::to_owned)
        .unwrap_or_else(|| format!("commit of composition {}", comp.name));
    // First the versions made from the uppers; heads that did not move go
    // with them.
    let mut batch = store.batch()?;
    let mut made: Vec<Option<VersionId>> = vec![None; plans.len()];
    let mut merges = Vec::new();
    for (i, (plan, new_root)) in plans.iter().zip(&new_roots).enumerate() {
        if !comp.slots[i].writable() {
            continue;
        }
        let parent_root = match plan.parent {
            Some(p) => Some(store.version(p)?.root),
            None => None,
        };
        let Some(r) = new_root.filter(|r| Some(*r) != parent_root) else {
            continue;
        };
        let v = Version {
            layer: plan.layer.id,
            parents: plan.parent.into_iter().collect(),
            time_ns: now_ns(),
            author: author.to_owned(),
            message: message.clone(),
            root: r,
        };
        let id = batch.put_version(&v)?;
        made[i] = Some(id);
        if plan.head == plan.parent {
            batch.move_head(&plan.layer, plan.head, id, "commit")?;
        } else {
            merges.push(i);
        }
    }
    store.commit(batch)?;
    // Then merges with heads that moved meanwhile.
    let mut heads: Vec<Option<VersionId>> =
        plans.iter().zip(&made).map(|(p, m)| m.or(p.head)).collect();
    for i in merges {
        let (plan, client) = (&plans[i], made[i]);
        let (Some(server), Some(client)) = (plan.head, client) else {
            continue;
        };
        heads[i] = Some(merge_into_head(
            store,
            plan,
            server,
            client,
            author,
            &mut report,
        )?);
    }
    for (i, plan) in plans.iter().enumerate() {
        if !comp.slots[i].writable() {
            continue;
        }
        report.layers.push(CommittedLayer {
            kind: comp.slots[i].kind.to_string(),
            layer: plan.layer.name.clone(),
            version: made[i].and(heads[i]),
            parent: plan.head,
        });
        if live {
            let mark = marker.slots.entry(i).or_default();
            mark.view_base = plan.view;
            if made[i].is_some() {
                mark.last = made[i];
            }
            if dirty[i] {
                mark.entries = std::mem::take(&mut seen[i]);
            }
        }
    }
    if live {
        marker.save(&cdir)?;
    }
    Ok(report)
}

/// Merges `client` (made from an upper) into the head `server` that moved
/// away from its parent, and moves the head to the merge.
fn merge_into_head(
    store: &Store,
    plan: &Plan,
    server: VersionId,
    client: VersionId,
    author: &str,
    report: &mut CommitReport,
) -> Result<VersionId> {
    let policy = match store.conflict_policy(&plan.layer)? {
        // There is nobody to wait for on this machine.
        ConflictPolicy::Manual => ConflictPolicy::KeepBoth,
        p => p,
    };
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|| "localhost".into());
    let host = std::env::var("LAMINA_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or(host);
    let now = now_ns();
    let base = store.merge_base(server, client)?;
    let merged = store.mediate(
        &Mediation {
            base,
            server,
            client,
            host: &host,
            now_ns: now,
        },
        &mut |_| Ok(Take::for_policy(policy)),
    )?;
    let root = merged
        .root
        .ok_or_else(|| Error::Invalid("a local merge left a conflict open".into()))?;
    let v = Version {
        layer: plan.layer.id,
        parents: vec![server, client],
        time_ns: now,
        author: author.to_owned(),
        message: format!(
            "merge of a commit with the head ({} conflicts)",
            merged.items.len()
        ),
        root,
    };
    let mut batch = store.batch()?;
    let id = batch.put_version(&v)?;
    batch.move_head(&plan.layer, Some(server), id, "commit merge")?;
    if !merged.items.is_empty() {
        let rec = ConflictRecord {
            id: ConflictRecord::new_id(),
            layer: plan.layer.name.clone(),
            host,
            user: String::new(),
            created_ns: now,
            policy,
            base,
            server,
            client,
            merged: Some(id),
            state: ConflictState::Settled,
            items: merged.items,
        };
        let loser = if policy == ConflictPolicy::ClientWins {
            server
        } else {
            client
        };
        let old = store.ref_target(&rec.kept_ref())?;
        batch.move_ref(&rec.kept_ref(), old, Some(loser), "commit merge")?;
        batch.put_conflict(&rec)?;
        report.conflicts.push(rec);
    }
    store.commit(batch)?;
    Ok(id)
}

fn to_sync(e: Error) -> lamina_sync::Error {
    match e {
        Error::Store(s) => s,
        Error::Io { path, op, source } => lamina_sync::Error::Io { path, op, source },
        other => lamina_sync::Error::InvalidInput(other.to_string()),
    }
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
