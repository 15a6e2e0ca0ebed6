//! Tree manifest nodes: directories, entries, and file extents.

use serde::{Deserialize, Serialize};

use crate::id::{ChunkId, ManifestId};

/// Longest file name accepted (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// A file with at most this many extents keeps them inline in its directory
/// entry; longer files get a [`FileIndex`]. 64 extents ≈ 4 MiB of data at the
/// average chunk size, and keeps directory nodes small.
pub const INLINE_EXTENTS: usize = 64;

/// Most extents per [`ExtentLeaf`] (≈ 256 MiB of data, ~180 KB encoded).
pub const LEAF_EXTENTS: usize = 4096;

/// A leaf ends after a data extent whose chunk id's first two bytes are a
/// multiple of this (or at [`LEAF_EXTENTS`]): leaves average 1024 extents
/// (~64 MiB of data, ~45 KB encoded), and because the cut points depend on
/// content, not position, an edit that adds or drops a chunk rewrites one
/// leaf instead of every leaf after it.
pub const LEAF_SPLIT: u16 = 1024;

/// Splits a file's extents into leaves at content-defined points.
pub fn split_leaves(extents: &[Extent]) -> Vec<&[Extent]> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, e) in extents.iter().enumerate() {
        let boundary = match e {
            Extent::Data { chunk, .. } => {
                u16::from_le_bytes([chunk.0[0], chunk.0[1]]) % LEAF_SPLIT == 0
            }
            Extent::Hole { .. } => false,
        };
        if boundary || i + 1 - start == LEAF_EXTENTS {
            out.push(&extents[start..=i]);
            start = i + 1;
        }
    }
    if start < extents.len() {
        out.push(&extents[start..]);
    }
    out
}

/// An extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Xattr {
    /// Attribute name, e.g. `user.comment`.
    pub name: Vec<u8>,
    /// Attribute value.
    pub value: Vec<u8>,
}

/// Metadata every entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission and special bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds part (< 10^9).
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by name, names unique.
    pub xattrs: Vec<Xattr>,
}

impl Meta {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.mode & !0o7777 != 0 {
            return Err(format!("mode {:o} has bits outside 0o7777", self.mode));
        }
        if self.mtime_nsec >= 1_000_000_000 {
            return Err(format!(
                "mtime nanoseconds {} out of range",
                self.mtime_nsec
            ));
        }
        if self.xattrs.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err("xattrs not sorted and unique".into());
        }
        Ok(())
    }
}

/// A piece of a regular file: chunk data, or a hole that reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Extent {
    /// Bytes of one chunk.
    Data {
        /// The chunk.
        chunk: ChunkId,
        /// Its length.
        len: u32,
    },
    /// An unallocated range.
    Hole {
        /// Its length.
        len: u64,
    },
}

impl Extent {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { len, .. } => u64::from(*len),
            Extent::Hole { len } => *len,
        }
    }

    /// Whether the extent is empty (never true in a valid manifest).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn extents_len(extents: &[Extent]) -> Result<u64, String> {
    let mut total = 0u64;
    for e in extents {
        if e.is_empty() {
            return Err("empty extent".into());
        }
        total = total
            .checked_add(e.len())
            .ok_or_else(|| "extent lengths overflow".to_string())?;
    }
    Ok(total)
}

/// The data of a regular file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Up to [`INLINE_EXTENTS`] extents, in order.
    Inline(Vec<Extent>),
    /// A [`FileIndex`] node.
    Indexed(ManifestId),
}

impl Content {
    /// Direct references: data chunks (false) and index nodes (true).
    pub fn children(&self) -> Vec<(ChunkId, bool)> {
        match self {
            Content::Inline(extents) => extents
                .iter()
                .filter_map(|e| match e {
                    Extent::Data { chunk, .. } => Some((*chunk, false)),
                    Extent::Hole { .. } => None,
                })
                .collect(),
            Content::Indexed(id) => vec![(id.chunk(), true)],
        }
    }
}

/// A long file's list of extent leaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    /// Leaves in file order.
    pub leaves: Vec<LeafRef>,
}

impl FileIndex {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.leaves.iter().any(|l| l.len == 0) {
            return Err("empty extent leaf".into());
        }
        Ok(())
    }
}

/// One leaf of a [`FileIndex`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafRef {
    /// The [`ExtentLeaf`] node.
    pub node: ManifestId,
    /// Bytes it covers.
    pub len: u64,
}

/// A run of extents of a long file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentLeaf {
    /// Extents in order; at most [`LEAF_EXTENTS`].
    pub extents: Vec<Extent>,
}

impl ExtentLeaf {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.extents.is_empty() || self.extents.len() > LEAF_EXTENTS {
            return Err(format!("leaf holds {} extents", self.extents.len()));
        }
        extents_len(&self.extents).map(|_| ())
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.extents.iter().map(Extent::len).sum()
    }

    /// Whether the leaf covers nothing.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File {
        /// Length in bytes.
        size: u64,
        /// Data.
        content: Content,
        /// Hard-link group: entries with the same value are one inode. The
        /// value is the path (relative to the root, `/`-separated) of the
        /// group's first member in sorted depth-first order, so it is
        /// canonical and only changes when that member does.
        link: Option<Vec<u8>>,
    },
    /// A directory.
    Dir {
        /// Its [`DirNode`].
        node: ManifestId,
        /// Hides lower layers' entries of the same directory.
        opaque: bool,
    },
    /// A symbolic link; the target is stored verbatim and never followed.
    Symlink {
        /// Link target.
        target: Vec<u8>,
    },
    /// A character device.
    CharDevice {
        /// Device number.
        rdev: u64,
    },
    /// A block device.
    BlockDevice {
        /// Device number.
        rdev: u64,
    },
    /// A named pipe.
    Fifo,
    /// A Unix socket node.
    Socket,
    /// Marks a path deleted from lower layers.
    Whiteout,
}

impl EntryKind {
    /// Short name for listings and diffs.
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::File { .. } => "file",
            EntryKind::Dir { .. } => "dir",
            EntryKind::Symlink { .. } => "symlink",
            EntryKind::CharDevice { .. } => "char-device",
            EntryKind::BlockDevice { .. } => "block-device",
            EntryKind::Fifo => "fifo",
            EntryKind::Socket => "socket",
            EntryKind::Whiteout => "whiteout",
        }
    }
}

/// One name in a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File name (bytes, no `/`, not `.` or `..`).
    pub name: Vec<u8>,
    /// Metadata.
    pub meta: Meta,
    /// Kind and kind-specific data.
    pub kind: EntryKind,
}

/// A directory listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirNode {
    /// Entries sorted by name, names unique.
    pub entries: Vec<Entry>,
}

/// Checks a single path component.
pub(crate) fn check_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(format!("invalid name {:?}", String::from_utf8_lossy(name)));
    }
    if name.len() > NAME_MAX {
        return Err(format!("name of {} bytes exceeds {NAME_MAX}", name.len()));
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(format!(
            "name {:?} contains '/' or NUL",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(())
}

impl DirNode {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.entries.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err("entries not sorted and unique".into());
        }
        for e in &self.entries {
            check_name(&e.name)?;
            e.meta.validate()?;
            if let EntryKind::File {
                size,
                content: Content::Inline(extents),
                ..
            } = &e.kind
            {
                if extents.len() > INLINE_EXTENTS {
                    return Err(format!("{} inline extents", extents.len()));
                }
                let total = extents_len(extents)?;
                if total != *size {
                    return Err(format!(
                        "file {:?}: extents cover {total} bytes, size is {size}",
                        String::from_utf8_lossy(&e.name)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Finds an entry by name.
    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .and_then(|i| self.entries.get(i))
    }
}

/// Calls `f(offset, extent)` for every extent of a file's content, checking
/// that the extents cover exactly `size` bytes.
///
/// # Errors
/// A missing or corrupt index node, lengths that do not add up, or an error
/// returned by `f`.
pub fn for_each_extent(
    src: &dyn super::NodeSource,
    content: &Content,
    size: u64,
    mut f: impl FnMut(u64, &Extent) -> crate::Result<()>,
) -> crate::Result<()> {
    let mut offset = 0u64;
    let mut visit = |extents: &[Extent], offset: &mut u64| -> crate::Result<()> {
        for e in extents {
            f(*offset, e)?;
            *offset += e.len();
        }
        Ok(())
    };
    let mismatch =
        |id: ManifestId, what: String| crate::Error::ManifestCorrupt { id, reason: what };
    match content {
        Content::Inline(extents) => visit(extents, &mut offset)?,
        Content::Indexed(index_id) => {
            let index = match src.load(*index_id)? {
                super::Node::FileIndex(i) => i,
                other => {
                    return Err(mismatch(
                        *index_id,
                        format!(
                            "expected a file index, found {}",
                            super::disk::node_name(&other)
                        ),
                    ))
                }
            };
            for leaf_ref in &index.leaves {
                let leaf = match src.load(leaf_ref.node)? {
                    super::Node::Extents(l) => l,
                    other => {
                        return Err(mismatch(
                            leaf_ref.node,
                            format!(
                                "expected an extent leaf, found {}",
                                super::disk::node_name(&other)
                            ),
                        ))
                    }
                };
                if leaf.len() != leaf_ref.len {
                    return Err(mismatch(
                        leaf_ref.node,
                        format!(
                            "leaf covers {} bytes, index says {}",
                            leaf.len(),
                            leaf_ref.len
                        ),
                    ));
                }
                visit(&leaf.extents, &mut offset)?;
            }
            if offset != size {
                return Err(mismatch(
                    *index_id,
                    format!("file index covers {offset} bytes, file size is {size}"),
                ));
            }
        }
    }
    Ok(())
}
