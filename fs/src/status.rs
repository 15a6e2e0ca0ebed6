//! `lamina status`: a composition's pending changes per layer — what the
//! next commit would add over the version shown under each upper, leaving
//! out what a live commit already committed.

use std::collections::HashMap;
use std::fs;
use std::sync::Arc;

use lamina_sync::manifest::{DirNode, EntryKind, Meta};
use lamina_sync::Store;
use serde::Serialize;

use crate::commit::{rel_join, show, slot_base, sorted_entries, upper_meta, Trees};
use crate::compose;
use crate::error::{IoContext, Result};
use crate::hostpath::HostPath;
use crate::marker::{Marker, SlotMark};
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

/// Lists each writable layer's pending changes.
///
/// # Errors
/// [`Error::NotFound`], unreadable uppers, store failures.
pub fn status(store: &Store, name: &str) -> Result<Vec<SlotChanges>> {
    let comp = compose::get(store, name)?;
    let root = store.root().to_owned();
    let marker = Marker::load(&comp.dir(&root))?;
    let mut out = Vec::new();
    for (i, s) in comp.slots.iter().enumerate() {
        if !s.writable() {
            continue;
        }
        let (layer, _, head_tree) = slot_base(store, &s.layer)?;
        let mark = marker.slots.get(&i);
        // Against what the mount shows under the upper, when known.
        let view = mark
            .and_then(|m| m.view_base)
            .filter(|v| store.version(*v).is_ok_and(|x| x.layer == layer.id));
        let base = match view {
            Some(v) => match store.root_of(v)? {
                lamina_sync::manifest::Root::Tree { meta, dir } => Some((meta, dir)),
                lamina_sync::manifest::Root::Disk(_) => None,
            },
            None => head_tree,
        };
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
            let top = HostPath::plain(upper_root.clone());
            walk_status(&mut trees, &top, b"", lower, mark, &mut changes)?;
        }
        out.push(changes);
    }
    Ok(out)
}

/// Mode, owner and xattrs equal (times are not compared for directories).
fn same_meta(a: &Meta, b: &Meta) -> bool {
    a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.xattrs == b.xattrs
}

fn walk_status(
    trees: &mut Trees<'_>,
    dir: &HostPath,
    rel: &[u8],
    lower: Option<Arc<DirNode>>,
    mark: Option<&SlotMark>,
    out: &mut SlotChanges,
) -> Result<()> {
    for (name, m) in sorted_entries(dir)? {
        let p = dir.child(&name);
        let crel = rel_join(rel, &name);
        if !m.is_dir() && mark.is_some_and(|mk| mk.unchanged(&crel, &m)) {
            // Committed by a live commit and untouched since.
            continue;
        }
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
                walk_status(trees, &p, &crel, child_lower, mark, out)?;
            }
            UpperKind::Other => match old {
                None => out.added.push(show(&crel)),
                Some(e) => {
                    let meta = upper_meta(&p, &m)?;
                    let same = match (
                        &e.kind,
                        upper::read_origin(&p).ctx(&*p, "read placeholder")?,
                    ) {
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
