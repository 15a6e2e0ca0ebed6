//! Differences between two manifests.
//!
//! Both walks compare node ids first and only load nodes whose ids differ, so
//! the cost follows the size of the difference, not of the layer. Where a
//! whole subtree was added or removed, it is walked to list every path (or
//! cluster) in it: the output is exact.

use serde::Serialize;

use super::disk::{load_disk, RADIX_BITS};
use super::{Content, DirNode, DiskRoot, Entry, EntryKind, Meta, Node, NodeSource};
use crate::error::{Error, Result};
use crate::id::{ManifestId, HASH_LEN};

/// How a path or cluster range changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// Present only in the newer version.
    Added,
    /// Present only in the older version.
    Removed,
    /// Present in both, different.
    Modified,
}

/// One changed path of a tree layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathChange {
    /// Absolute path within the layer (`/` for the root).
    pub path: String,
    /// How it changed.
    pub change: Change,
    /// Entry kind (of the newer side when present).
    pub kind: &'static str,
    /// For modifications: which aspects differ (`content`, `mode`, `owner`,
    /// `mtime`, `xattrs`, `type`, `target`, `device`, `link`, `opaque`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<&'static str>,
}

/// A run of changed clusters of a disk layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterRange {
    /// First cluster.
    pub start: u64,
    /// One past the last cluster.
    pub end: u64,
    /// How the clusters changed.
    pub change: Change,
}

/// Lists changed paths between two tree roots, in depth-first name order.
///
/// # Errors
/// Loading a node fails.
pub fn diff_trees(
    src: &dyn NodeSource,
    a: (&Meta, ManifestId),
    b: (&Meta, ManifestId),
) -> Result<Vec<PathChange>> {
    let mut out = Vec::new();
    let what = meta_changes(a.0, b.0);
    if !what.is_empty() {
        out.push(PathChange {
            path: "/".into(),
            change: Change::Modified,
            kind: "dir",
            what,
        });
    }
    diff_dirs(src, "", Some(a.1), Some(b.1), &mut out)?;
    Ok(out)
}

fn load_dir(src: &dyn NodeSource, id: Option<ManifestId>) -> Result<DirNode> {
    match id {
        None => Ok(DirNode::default()),
        Some(id) => match src.load(id)? {
            Node::Dir(d) => Ok(d),
            other => Err(Error::ManifestCorrupt {
                id,
                reason: format!(
                    "expected a directory, found {}",
                    super::disk::node_name(&other)
                ),
            }),
        },
    }
}

fn dir_node(e: &Entry) -> Option<ManifestId> {
    match e.kind {
        EntryKind::Dir { node, .. } => Some(node),
        _ => None,
    }
}

fn diff_dirs(
    src: &dyn NodeSource,
    prefix: &str,
    a: Option<ManifestId>,
    b: Option<ManifestId>,
    out: &mut Vec<PathChange>,
) -> Result<()> {
    if a == b {
        return Ok(());
    }
    let (da, db) = (load_dir(src, a)?, load_dir(src, b)?);
    let (mut ia, mut ib) = (da.entries.iter().peekable(), db.entries.iter().peekable());
    loop {
        let order = match (ia.peek(), ib.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => x.name.cmp(&y.name),
        };
        match order {
            std::cmp::Ordering::Less => {
                if let Some(ea) = ia.next() {
                    let path = join(prefix, &ea.name);
                    push(out, &path, Change::Removed, ea.kind.name(), Vec::new());
                    diff_dirs(src, &path, dir_node(ea), None, out)?;
                }
            }
            std::cmp::Ordering::Greater => {
                if let Some(eb) = ib.next() {
                    let path = join(prefix, &eb.name);
                    push(out, &path, Change::Added, eb.kind.name(), Vec::new());
                    diff_dirs(src, &path, None, dir_node(eb), out)?;
                }
            }
            std::cmp::Ordering::Equal => {
                if let (Some(ea), Some(eb)) = (ia.next(), ib.next()) {
                    let path = join(prefix, &eb.name);
                    let what = entry_changes(ea, eb);
                    if !what.is_empty() {
                        push(out, &path, Change::Modified, eb.kind.name(), what);
                    }
                    diff_dirs(src, &path, dir_node(ea), dir_node(eb), out)?;
                }
            }
        }
    }
    Ok(())
}

fn join(prefix: &str, name: &[u8]) -> String {
    format!("{prefix}/{}", String::from_utf8_lossy(name))
}

fn push(
    out: &mut Vec<PathChange>,
    path: &str,
    change: Change,
    kind: &'static str,
    what: Vec<&'static str>,
) {
    out.push(PathChange {
        path: path.to_owned(),
        change,
        kind,
        what,
    });
}

fn meta_changes(a: &Meta, b: &Meta) -> Vec<&'static str> {
    let mut what = Vec::new();
    if a.mode != b.mode {
        what.push("mode");
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        what.push("owner");
    }
    if (a.mtime_sec, a.mtime_nsec) != (b.mtime_sec, b.mtime_nsec) {
        what.push("mtime");
    }
    if a.xattrs != b.xattrs {
        what.push("xattrs");
    }
    what
}

fn entry_changes(a: &Entry, b: &Entry) -> Vec<&'static str> {
    let mut what = Vec::new();
    match (&a.kind, &b.kind) {
        (
            EntryKind::File {
                size: sa,
                content: ca,
                link: la,
            },
            EntryKind::File {
                size: sb,
                content: cb,
                link: lb,
            },
        ) => {
            if sa != sb || !same_content(ca, cb) {
                what.push("content");
            }
            if la != lb {
                what.push("link");
            }
        }
        (EntryKind::Dir { opaque: oa, .. }, EntryKind::Dir { opaque: ob, .. }) => {
            if oa != ob {
                what.push("opaque");
            }
        }
        (EntryKind::Symlink { target: ta }, EntryKind::Symlink { target: tb }) => {
            if ta != tb {
                what.push("target");
            }
        }
        (EntryKind::CharDevice { rdev: ra }, EntryKind::CharDevice { rdev: rb })
        | (EntryKind::BlockDevice { rdev: ra }, EntryKind::BlockDevice { rdev: rb }) => {
            if ra != rb {
                what.push("device");
            }
        }
        (ka, kb) if std::mem::discriminant(ka) == std::mem::discriminant(kb) => {}
        _ => what.push("type"),
    }
    what.extend(meta_changes(&a.meta, &b.meta));
    what
}

fn same_content(a: &Content, b: &Content) -> bool {
    a == b
}

/// Lists changed cluster ranges between two disk roots, in cluster order.
///
/// # Errors
/// The cluster sizes differ, or loading a node fails.
pub fn diff_disks(src: &dyn NodeSource, a: &DiskRoot, b: &DiskRoot) -> Result<Vec<ClusterRange>> {
    if a.cluster_size != b.cluster_size {
        return Err(Error::InvalidInput(format!(
            "cannot compare disks with cluster sizes {} and {}",
            a.cluster_size, b.cluster_size
        )));
    }
    let levels = a.levels.max(b.levels);
    let mut ranges = Vec::new();
    let side = |r: &DiskRoot| r.top.map(|t| (t, r.levels - 1));
    diff_radix(src, side(a), side(b), levels - 1, 0, &mut ranges)?;
    Ok(ranges)
}

/// A radix subtree: node id and the level it really sits at. A shallower
/// disk's top is "lifted" through the deeper disk's extra levels as slot 0.
type Side = Option<(ManifestId, u8)>;

fn slots(src: &dyn NodeSource, side: Side, level: u8) -> Result<Vec<(u16, [u8; HASH_LEN])>> {
    match side {
        None => Ok(Vec::new()),
        Some((id, real)) if real < level => Ok(vec![(0, id.0)]),
        Some((id, real)) => Ok(load_disk(src, id, real)?
            .slots
            .into_iter()
            .map(|s| (s.index, s.id))
            .collect()),
    }
}

fn diff_radix(
    src: &dyn NodeSource,
    a: Side,
    b: Side,
    level: u8,
    base: u64,
    out: &mut Vec<ClusterRange>,
) -> Result<()> {
    if a == b {
        return Ok(());
    }
    let child = |side: Side, id: [u8; HASH_LEN]| -> Side {
        side.map(|(sid, real)| {
            if real < level {
                (sid, real)
            } else {
                (ManifestId(id), level.saturating_sub(1))
            }
        })
    };
    let (sa, sb) = (slots(src, a, level)?, slots(src, b, level)?);
    let (mut ia, mut ib) = (sa.into_iter().peekable(), sb.into_iter().peekable());
    loop {
        let (idx, ya, yb) = match (ia.peek().copied(), ib.peek().copied()) {
            (None, None) => break,
            (Some(x), None) => {
                ia.next();
                (x.0, Some(x.1), None)
            }
            (None, Some(y)) => {
                ib.next();
                (y.0, None, Some(y.1))
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                ia.next();
                (x.0, Some(x.1), None)
            }
            (Some(x), Some(y)) if y.0 < x.0 => {
                ib.next();
                (y.0, None, Some(y.1))
            }
            (Some(x), Some(y)) => {
                ia.next();
                ib.next();
                (x.0, Some(x.1), Some(y.1))
            }
        };
        let index = (base << RADIX_BITS) | u64::from(idx);
        if level == 0 {
            let change = match (ya, yb) {
                (Some(x), Some(y)) if x == y => continue,
                (Some(_), Some(_)) => Change::Modified,
                (Some(_), None) => Change::Removed,
                _ => Change::Added,
            };
            record(out, index, change);
        } else {
            let ca = ya.and_then(|id| child(a, id));
            let cb = yb.and_then(|id| child(b, id));
            diff_radix(src, ca, cb, level - 1, index, out)?;
        }
    }
    Ok(())
}

fn record(out: &mut Vec<ClusterRange>, index: u64, change: Change) {
    if let Some(last) = out.last_mut() {
        if last.end == index && last.change == change {
            last.end += 1;
            return;
        }
    }
    out.push(ClusterRange {
        start: index,
        end: index + 1,
        change,
    });
}
