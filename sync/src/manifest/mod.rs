//! Manifests: the Merkle-ised content of a version.
//!
//! A version's root manifest is a [`Node::Root`]; everything under it is a
//! tree of [`Node`]s, each stored as a chunk whose id is the BLAKE3 of the
//! node's canonical encoding. Equal content gives equal bytes and so equal
//! ids; comparing two versions therefore only descends into nodes whose ids
//! differ (see [`diff`]).
//!
//! * Tree layers: one [`DirNode`] per directory, entries sorted by name. A
//!   regular file lists its extents (chunks and holes) inline when short, or
//!   through a [`FileIndex`] of [`ExtentLeaf`] nodes when long.
//! * Disk layers: a [`DiskRoot`] (virtual size, cluster size) over a radix of
//!   [`DiskNode`]s mapping cluster index → chunk id; holes and zero clusters
//!   are absent.
//!
//! Encoding: the 4-byte magic [`NODE_MAGIC`] then the node in postcard (serde,
//! varints, enum tags by index). Decoding checks every invariant the rest of
//! the crate relies on (sorted unique names, lengths that add up, radix
//! indices in range), so code that holds a `Node` can trust it.

pub mod diff;
pub(crate) mod disk;
pub(crate) mod tree;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestId};

pub use disk::{DiskBuilder, DiskNode, DiskRoot, DiskSlot, RADIX_BITS, RADIX_FANOUT};
pub use tree::{
    for_each_extent, split_leaves, Content, DirNode, Entry, EntryKind, Extent, ExtentLeaf,
    FileIndex, LeafRef, Meta, Xattr, INLINE_EXTENTS, LEAF_EXTENTS, LEAF_SPLIT, NAME_MAX,
};

/// Magic prefix of every encoded node; the digit is the format version.
pub const NODE_MAGIC: [u8; 4] = *b"LMN1";

/// The root manifest of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Root {
    /// A file tree: the root directory's own metadata and its listing.
    Tree {
        /// Metadata of the root directory.
        meta: Meta,
        /// The root directory's [`DirNode`].
        dir: ManifestId,
    },
    /// A virtual block device.
    Disk(DiskRoot),
}

/// Any manifest node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    /// Root of a version.
    Root(Root),
    /// A directory listing.
    Dir(DirNode),
    /// The list of extent leaves of a long file.
    FileIndex(FileIndex),
    /// A run of a long file's extents.
    Extents(ExtentLeaf),
    /// A radix node of a disk.
    Disk(DiskNode),
}

impl Node {
    /// Canonical bytes of the node and their id.
    pub fn encode(&self) -> (ManifestId, Vec<u8>) {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&NODE_MAGIC);
        // Serialising plain data into a Vec cannot fail: postcard only errors
        // on a full fixed-size buffer or an unsupported serde type, and every
        // type here is supported.
        #[allow(clippy::expect_used)]
        let out = postcard::to_extend(self, out).expect("postcard serialises into a Vec");
        (ManifestId::of(&out), out)
    }

    /// Decodes and validates `bytes`, which were stored under `id`.
    ///
    /// # Errors
    /// [`Error::ManifestCorrupt`] naming `id` if the bytes hash to another
    /// id, fail to decode, or break an invariant.
    pub fn decode(id: ManifestId, bytes: &[u8]) -> Result<Node> {
        let corrupt = |reason: String| Error::ManifestCorrupt { id, reason };
        if ManifestId::of(bytes) != id {
            return Err(corrupt("content does not match its id".into()));
        }
        let body = bytes
            .strip_prefix(&NODE_MAGIC)
            .ok_or_else(|| corrupt("bad magic (not a manifest node)".into()))?;
        let (node, rest): (Node, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| corrupt(format!("decode: {e}")))?;
        if !rest.is_empty() {
            return Err(corrupt(format!("{} trailing bytes", rest.len())));
        }
        node.validate().map_err(corrupt)?;
        Ok(node)
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Node::Root(Root::Tree { meta, .. }) => meta.validate(),
            Node::Root(Root::Disk(d)) => d.validate(),
            Node::Dir(d) => d.validate(),
            Node::FileIndex(i) => i.validate(),
            Node::Extents(l) => l.validate(),
            Node::Disk(d) => d.validate(),
        }
    }

    /// Ids of the chunks and nodes this node refers to directly, each tagged
    /// with whether it is another manifest node (true) or data (false).
    pub fn children(&self) -> Vec<(ChunkId, bool)> {
        match self {
            Node::Root(Root::Tree { dir, .. }) => vec![(dir.chunk(), true)],
            Node::Root(Root::Disk(d)) => d.top.iter().map(|t| (t.chunk(), true)).collect(),
            Node::Dir(d) => d
                .entries
                .iter()
                .flat_map(|e| match &e.kind {
                    EntryKind::Dir { node, .. } => vec![(node.chunk(), true)],
                    EntryKind::File { content, .. } => content.children(),
                    _ => Vec::new(),
                })
                .collect(),
            Node::FileIndex(i) => i.leaves.iter().map(|l| (l.node.chunk(), true)).collect(),
            Node::Extents(l) => l
                .extents
                .iter()
                .filter_map(|e| match e {
                    Extent::Data { chunk, .. } => Some((*chunk, false)),
                    Extent::Hole { .. } => None,
                })
                .collect(),
            Node::Disk(d) => d
                .slots
                .iter()
                .map(|s| (ChunkId(s.id), d.level > 0))
                .collect(),
        }
    }
}

/// Something that can fetch manifest nodes by id (the store, or a test map).
pub trait NodeSource {
    /// Loads and decodes the node `id`.
    ///
    /// # Errors
    /// Missing or corrupt node.
    fn load(&self, id: ManifestId) -> Result<Node>;
}

#[cfg(test)]
mod tests;
