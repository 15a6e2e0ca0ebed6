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

mod tree;

use std::collections::{BTreeMap, HashMap};
use std::fs;

use lamina_sync::manifest::Root;
use lamina_sync::merge::ConflictRecord;
use lamina_sync::{now_ns, Layer, ManifestId, Progress, Store, Version, VersionId};
use serde::{Deserialize, Serialize};

use crate::compose::{self, Composition};
use crate::error::{Error, Result};
use crate::marker::{Marker, Stamp};
use crate::mount::{clear_uppers, lock_unmounted};
use crate::upper;

use tree::{count_links, upper_dirty, Merger};
pub(crate) use tree::{rel_join, show, slot_base, sorted_entries, upper_meta, TreeRoot, Trees};

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
        // A streamed slot is read-only: it only lies below the others.
        if let Some((sv, meta, dir)) = compose::streamed_slot(store, s)? {
            plans.push(Plan {
                layer: Layer {
                    id: sv.layer_id.unwrap_or(lamina_sync::LayerId([0; 16])),
                    name: s.layer.clone(),
                    kind: s.kind,
                    format: lamina_sync::LayerFormat::Tree,
                    created_ns: 0,
                },
                head: None,
                view: Some(sv.version),
                parent: Some(sv.version),
                tree: Some((meta, dir)),
            });
            continue;
        }
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
            count_links(
                &crate::hostpath::HostPath::plain(upper_root.clone()),
                &mut counts,
            )
            .map_err(to_sync)?;
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
            let dir = m
                .merge(
                    &crate::hostpath::HostPath::plain(upper_root.clone()),
                    b"",
                    lower_dir,
                )
                .map_err(to_sync)?;
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
        let (head, conflict) =
            store.merge_into_head(&plan.layer, server, client, author, "commit", &mut |_| {
                Ok(())
            })?;
        heads[i] = Some(head);
        report.conflicts.extend(conflict);
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
