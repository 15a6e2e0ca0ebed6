//! Moving versions between stores, independent of the transport.
//!
//! * [`Delta`] lists what a chunk of history adds over what the other side
//!   has: the sender asks the receiver which of those it lacks and sends
//!   only those.
//! * [`Store::receive`] verifies received records, all of them, before
//!   storing any, and makes them durable before it returns: a transfer cut
//!   at any point leaves whole batches stored and nothing else.
//! * [`Store::fetch_closure`] pulls every manifest node and data chunk under
//!   some roots that this store lacks from a [`RecordSource`], walking down
//!   from the roots and stopping at nodes already present. A node is stored
//!   only after everything below it, so a present node always means a
//!   complete subtree — the fact both walks rely on.
//! * [`Store::accept`] checks pushed versions (ids, layer,
//!   parents, and that every node and chunk they need is present) and moves
//!   the layer's ref by compare-and-swap, in one catalog batch.
//! * `dag` answers ancestry questions.

mod accept;
mod dag;
mod delta;
pub mod wire;

use std::collections::{HashMap, HashSet};

use crate::chunk::Sealed;
use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestId};
use crate::manifest::{Content, EntryKind, Extent, Node};
use crate::progress::Progress;
use crate::store::Store;

pub use accept::{Accept, PushRequest, PushedVersion, MAX_PUSHED_VERSIONS};
pub use delta::Delta;

/// Manifest nodes asked for in one request.
pub const NODE_BATCH: usize = 1024;
/// Plain bytes of data chunks asked for in one request.
pub const DATA_BATCH_BYTES: u64 = 16 * 1024 * 1024;
/// Most data chunks asked for in one request (small files make small
/// chunks: a batch of them is still one round trip).
pub const DATA_BATCH_IDS: usize = 8192;
/// Plain bytes a sender puts in one record batch.
pub const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Something that sends records on request (the other store).
pub trait RecordSource {
    /// The records holding `ids` (a frame may hold more than asked for).
    ///
    /// # Errors
    /// Transport failures.
    fn fetch(&mut self, ids: &[ChunkId]) -> Result<Vec<Sealed>>;
}

/// Counters of one transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransferStats {
    /// Records moved.
    pub records: u64,
    /// Their bytes on the wire (as stored: compressed).
    pub bytes: u64,
    /// Chunks the receiving store did not have before.
    pub chunks_new: u64,
    /// Manifest nodes among the records.
    pub nodes: u64,
}

impl TransferStats {
    /// Adds another transfer's counters.
    pub fn add(&mut self, o: &TransferStats) {
        self.records += o.records;
        self.bytes += o.bytes;
        self.chunks_new += o.chunks_new;
        self.nodes += o.nodes;
    }
}

impl Store {
    /// Verifies every member of every record against its id, then stores
    /// the records and makes them durable. Nothing is stored if any record
    /// is bad.
    ///
    /// # Errors
    /// [`Error::ChunkCorrupt`] naming the first bad member; store failures.
    pub fn receive(&self, records: &[Sealed]) -> Result<TransferStats> {
        self.require_write()?;
        for r in records {
            wire::open(r)?;
        }
        let _g = self.import_guard()?;
        let mut stats = TransferStats::default();
        for r in records {
            stats.records += 1;
            stats.bytes += wire::record_len(r) as u64;
            stats.chunks_new += u64::from(self.backend.put(r.clone())?);
        }
        self.backend.flush()?;
        Ok(stats)
    }

    /// Fetches from `src` every manifest node and data chunk under `roots`
    /// that this store lacks, verifies each, and stores them: data in
    /// durable batches as they arrive, nodes afterwards, children before
    /// parents.
    ///
    /// # Errors
    /// A record that fails verification, a node that is not a node, records
    /// the source does not send, transport and store failures.
    pub fn fetch_closure(
        &self,
        roots: &[ManifestId],
        src: &mut dyn RecordSource,
        progress: &dyn Progress,
    ) -> Result<TransferStats> {
        self.require_write()?;
        let mut stats = TransferStats::default();
        let mut fetched: HashMap<ManifestId, (Sealed, Node)> = HashMap::new();
        let mut candidates: Vec<ChunkId> = Vec::new();
        let mut sizes: HashMap<ChunkId, u64> = HashMap::new();
        let mut candidate_set: HashSet<ChunkId> = HashSet::new();
        let mut level: Vec<ManifestId> = self
            .lacking(roots.iter().map(|r| r.chunk()))?
            .into_iter()
            .map(|c| ManifestId(c.0))
            .collect();
        progress.phase("manifests", None);
        while !level.is_empty() {
            let mut next: Vec<ManifestId> = Vec::new();
            for batch in level.chunks(NODE_BATCH) {
                let ids: Vec<ChunkId> = batch.iter().map(ManifestId::chunk).collect();
                let records = src.fetch(&ids)?;
                let mut got: HashMap<ChunkId, (Sealed, Vec<u8>)> = HashMap::new();
                for r in records {
                    stats.records += 1;
                    stats.bytes += wire::record_len(&r) as u64;
                    progress.advance(wire::record_len(&r) as u64);
                    for (id, plain) in wire::open(&r)? {
                        got.insert(id, (r.clone(), plain));
                    }
                }
                for id in batch {
                    let (sealed, plain) = got.remove(&id.chunk()).ok_or_else(|| {
                        Error::InvalidInput(format!("the remote did not send manifest node {id}"))
                    })?;
                    let node = Node::decode(*id, &plain)?;
                    for (child, is_node) in node.children() {
                        if is_node {
                            next.push(ManifestId(child.0));
                        } else if candidate_set.insert(child) {
                            candidates.push(child);
                        }
                    }
                    data_sizes(&node, &mut sizes);
                    fetched.insert(*id, (sealed, node));
                }
            }
            next.sort();
            next.dedup();
            next.retain(|n| !fetched.contains_key(n));
            level = self
                .lacking(next.iter().map(ManifestId::chunk))?
                .into_iter()
                .map(|c| ManifestId(c.0))
                .collect();
        }
        stats.nodes = fetched.len() as u64;
        let missing = self.lacking(candidates.into_iter())?;
        progress.phase("data", None);
        let _g = self.import_guard()?;
        let mut done: HashSet<ChunkId> = HashSet::new();
        for batch in batches(&missing, &sizes) {
            let want: Vec<ChunkId> = batch
                .iter()
                .filter(|c| !done.contains(c))
                .copied()
                .collect();
            if want.is_empty() {
                continue;
            }
            let records = src.fetch(&want)?;
            let mut covered = HashSet::new();
            for r in &records {
                for (id, _) in wire::open(r)? {
                    covered.insert(id);
                }
            }
            if let Some(lost) = want.iter().find(|c| !covered.contains(c)) {
                return Err(Error::InvalidInput(format!(
                    "the remote did not send chunk {lost}"
                )));
            }
            for r in records {
                stats.records += 1;
                stats.bytes += wire::record_len(&r) as u64;
                progress.advance(wire::record_len(&r) as u64);
                done.extend(wire::members(&r));
                stats.chunks_new += u64::from(self.backend.put(r)?);
            }
            // Durable at every batch: a cut transfer resumes from here.
            self.backend.flush()?;
        }
        // Nodes last, each after everything below it.
        let mut order = Vec::with_capacity(fetched.len());
        let mut placed = HashSet::new();
        for root in roots {
            post_order(*root, &fetched, &mut placed, &mut order);
        }
        for id in order {
            if let Some((sealed, _)) = fetched.remove(&id) {
                stats.chunks_new += u64::from(self.backend.put(sealed)?);
            }
        }
        self.backend.flush()?;
        Ok(stats)
    }

    /// Which of `ids` this store lacks, in order, without repeats.
    pub(crate) fn lacking(&self, ids: impl Iterator<Item = ChunkId>) -> Result<Vec<ChunkId>> {
        let mut seen = HashSet::new();
        let ids: Vec<ChunkId> = ids.filter(|i| seen.insert(*i)).collect();
        let mut out = Vec::new();
        for batch in ids.chunks(4096) {
            let have = self.backend.has_many(batch)?;
            out.extend(
                batch
                    .iter()
                    .zip(have)
                    .filter(|(_, h)| !h)
                    .map(|(id, _)| *id),
            );
        }
        Ok(out)
    }
}

/// Notes the plain length of every data chunk `node` names.
fn data_sizes(node: &Node, sizes: &mut HashMap<ChunkId, u64>) {
    let mut extents = |e: &[Extent]| {
        for x in e {
            if let Extent::Data { chunk, len } = x {
                sizes.insert(*chunk, u64::from(*len));
            }
        }
    };
    match node {
        Node::Dir(d) => {
            for e in &d.entries {
                if let EntryKind::File {
                    content: Content::Inline(x),
                    ..
                } = &e.kind
                {
                    extents(x);
                }
            }
        }
        Node::Extents(l) => extents(&l.extents),
        _ => {}
    }
}

/// Splits `ids` into requests of about [`DATA_BATCH_BYTES`] (a chunk of
/// unknown size, a disk cluster, counts as 64 KiB).
fn batches<'a>(ids: &'a [ChunkId], sizes: &HashMap<ChunkId, u64>) -> Vec<&'a [ChunkId]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, id) in ids.iter().enumerate() {
        bytes += sizes.get(id).copied().unwrap_or(64 * 1024);
        if bytes >= DATA_BATCH_BYTES || i + 1 - start >= DATA_BATCH_IDS {
            out.push(&ids[start..=i]);
            start = i + 1;
            bytes = 0;
        }
    }
    if start < ids.len() {
        out.push(&ids[start..]);
    }
    out
}

/// Appends `id`'s subtree of fetched nodes to `out`, children first.
fn post_order(
    id: ManifestId,
    fetched: &HashMap<ManifestId, (Sealed, Node)>,
    placed: &mut HashSet<ManifestId>,
    out: &mut Vec<ManifestId>,
) {
    // Iterative: radix and directory depth are bounded, but a hostile
    // manifest must not be able to overflow the stack either.
    let mut stack = vec![(id, false)];
    while let Some((n, expanded)) = stack.pop() {
        if placed.contains(&n) {
            continue;
        }
        let Some((_, node)) = fetched.get(&n) else {
            continue;
        };
        if expanded {
            placed.insert(n);
            out.push(n);
            continue;
        }
        stack.push((n, true));
        for (child, is_node) in node.children() {
            let c = ManifestId(child.0);
            if is_node && !placed.contains(&c) {
                stack.push((c, false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_follow_bytes_and_count() {
        let ids: Vec<ChunkId> = (0..20_000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        // Small chunks: the count limit cuts.
        let small: HashMap<ChunkId, u64> = ids.iter().map(|i| (*i, 1000)).collect();
        let b = batches(&ids, &small);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].len(), DATA_BATCH_IDS);
        // Unknown sizes count as a cluster: 256 a batch.
        let b = batches(&ids[..1000], &HashMap::new());
        assert_eq!(b[0].len(), 256);
        assert_eq!(b.iter().map(|x| x.len()).sum::<usize>(), 1000);
        assert!(batches(&[], &HashMap::new()).is_empty());
    }
}
