//! Disk manifests: a radix of nodes mapping cluster index → chunk id.
//!
//! Each [`DiskNode`] has up to [`RADIX_FANOUT`] slots; level-0 slots name data
//! chunks, higher levels name child nodes. With 64 KiB clusters a level-0
//! node covers 256 MiB, two levels cover 64 TiB. Absent slots are holes (or
//! zero clusters, which are never stored).

use serde::{Deserialize, Serialize};

use super::{Node, NodeSource};
use crate::error::Result;
use crate::id::{ChunkId, ManifestId, HASH_LEN};

/// Bits of the cluster index consumed per radix level.
pub const RADIX_BITS: u32 = 12;
/// Slots per radix node.
pub const RADIX_FANOUT: u64 = 1 << RADIX_BITS;
/// Deepest radix accepted: 4 levels × 12 bits covers any 64-bit size at 4 KiB
/// clusters and more.
const MAX_LEVELS: u8 = 6;

/// Root of a disk layer version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRoot {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes (a power of two).
    pub cluster_size: u32,
    /// Radix depth (≥ 1).
    pub levels: u8,
    /// Top radix node; `None` when the disk is all holes.
    pub top: Option<ManifestId>,
}

impl DiskRoot {
    pub(super) fn validate(&self) -> Result<(), String> {
        if !self.cluster_size.is_power_of_two() || self.cluster_size < 512 {
            return Err(format!("cluster size {} is invalid", self.cluster_size));
        }
        if self.levels == 0 || self.levels > MAX_LEVELS {
            return Err(format!("radix depth {} is invalid", self.levels));
        }
        if self.levels != levels_for(self.size, self.cluster_size) {
            return Err(format!(
                "radix depth {} does not fit size {}",
                self.levels, self.size
            ));
        }
        Ok(())
    }

    /// Number of clusters, the last one possibly partial.
    pub fn clusters(&self) -> u64 {
        self.size.div_ceil(u64::from(self.cluster_size))
    }

    /// Bytes of cluster `index` (the last cluster may be short).
    pub fn cluster_len(&self, index: u64) -> u64 {
        let cs = u64::from(self.cluster_size);
        self.size.saturating_sub(index * cs).min(cs)
    }

    /// Calls `f(cluster index, chunk)` for every stored cluster, in order.
    ///
    /// # Errors
    /// Loading nodes, or an error returned by `f`.
    pub fn for_each_cluster(
        &self,
        src: &dyn NodeSource,
        mut f: impl FnMut(u64, ChunkId) -> Result<()>,
    ) -> Result<()> {
        if let Some(top) = self.top {
            walk(src, top, self.levels - 1, 0, &mut f)?;
        }
        Ok(())
    }
}

fn walk(
    src: &dyn NodeSource,
    id: ManifestId,
    level: u8,
    base: u64,
    f: &mut dyn FnMut(u64, ChunkId) -> Result<()>,
) -> Result<()> {
    let node = load_disk(src, id, level)?;
    for slot in &node.slots {
        let index = (base << RADIX_BITS) | u64::from(slot.index);
        if level == 0 {
            f(index, ChunkId(slot.id))?;
        } else {
            walk(src, ManifestId(slot.id), level - 1, index, f)?;
        }
    }
    Ok(())
}

/// Loads a radix node and checks it sits at the expected level.
pub(crate) fn load_disk(src: &dyn NodeSource, id: ManifestId, level: u8) -> Result<DiskNode> {
    match src.load(id)? {
        Node::Disk(d) if d.level == level => Ok(d),
        other => Err(crate::Error::ManifestCorrupt {
            id,
            reason: format!(
                "expected a disk radix node at level {level}, found {}",
                node_name(&other)
            ),
        }),
    }
}

pub(crate) fn node_name(node: &Node) -> String {
    match node {
        Node::Root(_) => "a root".into(),
        Node::Dir(_) => "a directory".into(),
        Node::FileIndex(_) => "a file index".into(),
        Node::Extents(_) => "an extent leaf".into(),
        Node::Disk(d) => format!("a disk radix node at level {}", d.level),
    }
}

/// Radix depth needed for `size` bytes at `cluster_size`.
pub fn levels_for(size: u64, cluster_size: u32) -> u8 {
    let clusters = size.div_ceil(u64::from(cluster_size.max(1)));
    let mut levels = 1u8;
    let mut covered = RADIX_FANOUT;
    while covered < clusters && levels < MAX_LEVELS {
        levels += 1;
        covered = covered.saturating_mul(RADIX_FANOUT);
    }
    levels
}

/// One slot of a radix node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSlot {
    /// Index within the node (< [`RADIX_FANOUT`]).
    pub index: u16,
    /// Chunk id (level 0) or child node id.
    pub id: [u8; HASH_LEN],
}

/// A radix node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskNode {
    /// 0 for leaves.
    pub level: u8,
    /// Occupied slots sorted by index.
    pub slots: Vec<DiskSlot>,
}

impl DiskNode {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.level >= MAX_LEVELS {
            return Err(format!("radix level {} out of range", self.level));
        }
        if self.slots.is_empty() {
            return Err("empty radix node".into());
        }
        if self.slots.windows(2).any(|w| w[0].index >= w[1].index) {
            return Err("radix slots not sorted and unique".into());
        }
        if self
            .slots
            .iter()
            .any(|s| u64::from(s.index) >= RADIX_FANOUT)
        {
            return Err("radix slot index out of range".into());
        }
        Ok(())
    }
}

/// Builds a disk radix from clusters given in increasing index order.
///
/// Memory is one pending node per level; full nodes are handed to the `put`
/// callback (which stores them and returns their id) as soon as the input
/// moves past them.
pub struct DiskBuilder {
    levels: u8,
    clusters: u64,
    /// Per level: which node (index >> bits) the pending slots belong to.
    current: Vec<u64>,
    pending: Vec<Vec<DiskSlot>>,
    last: Option<u64>,
}

impl DiskBuilder {
    /// A builder for a disk of `size` bytes.
    pub fn new(size: u64, cluster_size: u32) -> Self {
        let levels = levels_for(size, cluster_size);
        Self {
            levels,
            clusters: size.div_ceil(u64::from(cluster_size.max(1))),
            current: vec![0; usize::from(levels)],
            pending: vec![Vec::new(); usize::from(levels)],
            last: None,
        }
    }

    /// Radix depth.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Adds cluster `index` holding `chunk`. Indices must increase.
    ///
    /// # Errors
    /// An index out of order, or an error from `put`.
    pub fn push(
        &mut self,
        index: u64,
        chunk: ChunkId,
        put: &mut dyn FnMut(Node) -> Result<ManifestId>,
    ) -> Result<()> {
        if self.last.is_some_and(|l| index <= l) || index >= self.clusters {
            return Err(crate::Error::InvalidInput(format!(
                "disk cluster {index} is out of order or past the end ({} clusters)",
                self.clusters
            )));
        }
        self.last = Some(index);
        self.insert(0, index, chunk.0, put)
    }

    fn insert(
        &mut self,
        level: u8,
        index: u64,
        id: [u8; HASH_LEN],
        put: &mut dyn FnMut(Node) -> Result<ManifestId>,
    ) -> Result<()> {
        let l = usize::from(level);
        let node_no = index >> RADIX_BITS;
        if node_no != self.current[l] && !self.pending[l].is_empty() {
            self.flush(level, put)?;
        }
        self.current[l] = node_no;
        self.pending[l].push(DiskSlot {
            index: (index & (RADIX_FANOUT - 1)) as u16,
            id,
        });
        Ok(())
    }

    /// Stores the pending node of `level` and links it into the level above.
    fn flush(&mut self, level: u8, put: &mut dyn FnMut(Node) -> Result<ManifestId>) -> Result<()> {
        let l = usize::from(level);
        let slots = std::mem::take(&mut self.pending[l]);
        let id = put(Node::Disk(DiskNode { level, slots }))?;
        if level + 1 < self.levels {
            self.insert(level + 1, self.current[l], id.0, put)?;
        } else {
            // The top level holds a single node; park its id as its only slot.
            self.pending[l] = vec![DiskSlot { index: 0, id: id.0 }];
        }
        Ok(())
    }

    /// Flushes every level and returns the top node, or `None` if no cluster
    /// was pushed.
    ///
    /// # Errors
    /// An error from `put`.
    pub fn finish(
        mut self,
        put: &mut dyn FnMut(Node) -> Result<ManifestId>,
    ) -> Result<Option<ManifestId>> {
        if self.last.is_none() {
            return Ok(None);
        }
        for level in 0..self.levels {
            if !self.pending[usize::from(level)].is_empty() {
                self.flush(level, put)?;
            }
        }
        let top = self.pending[usize::from(self.levels - 1)]
            .first()
            .map(|s| ManifestId(s.id));
        Ok(top)
    }
}
