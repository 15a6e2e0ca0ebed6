//! Uploading what the server lacks of some versions: the [`Delta`] of each
//! over its parent, asked about in bulk, data first and manifest nodes
//! after (children first), in batches the server makes durable.

use std::collections::HashSet;

use super::conn::Connection;
use super::sync::LayerReport;
use crate::chunk::{Sealed, Sealer};
use crate::error::Result;
use crate::id::{ChunkId, VersionId};
use crate::progress::Progress;
use crate::store::Store;
use crate::transfer::{wire, Delta, TransferStats, BATCH_BYTES};
use crate::version::Version;

impl Store {
    /// Every version reachable from `head` (inclusive).
    pub(super) fn ancestry_set(&self, head: Option<VersionId>) -> Result<HashSet<VersionId>> {
        Ok(match head {
            None => HashSet::new(),
            Some(h) => self
                .versions_between(&[h], &HashSet::new())?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
        })
    }

    /// Uploads what the server lacks of the versions reachable from `new`
    /// but not from `server`; returns those versions.
    pub(super) fn upload_history(
        &self,
        conn: &Connection,
        name: &str,
        server: Option<VersionId>,
        new: VersionId,
        progress: &dyn Progress,
        report: &mut LayerReport,
    ) -> Result<Vec<(VersionId, Version)>> {
        let known = self.ancestry_set(server)?;
        let versions = self.versions_between(&[new], &known)?;
        let mut delta = Delta::new();
        for (_, v) in &versions {
            let base = match v.parents.first() {
                Some(p) => Some(self.version(*p)?.root),
                None => None,
            };
            delta.add(self, v.root, base)?;
        }
        let mut candidates: Vec<ChunkId> = delta.chunks.clone();
        candidates.extend(delta.nodes.iter().map(|n| n.chunk()));
        let lacks = conn.missing(name, &candidates)?;
        let missing: HashSet<ChunkId> = candidates
            .iter()
            .zip(lacks)
            .filter(|(_, l)| *l)
            .map(|(c, _)| *c)
            .collect();
        progress.phase("upload", None);
        let mut up = Uploader {
            conn,
            layer: name,
            buf: Vec::new(),
            sent: HashSet::new(),
            stats: TransferStats::default(),
            sealer: Sealer::new(),
            progress,
        };
        // Data first, then nodes children-first: whatever a cut transfer
        // leaves on the server is a set of complete subtrees.
        for c in delta.chunks.iter().filter(|c| missing.contains(c)) {
            up.add(self, *c, &missing)?;
        }
        for n in delta.nodes.iter().filter(|n| missing.contains(&n.chunk())) {
            up.add(self, n.chunk(), &missing)?;
        }
        up.flush()?;
        up.stats.nodes = delta
            .nodes
            .iter()
            .filter(|n| missing.contains(&n.chunk()))
            .count() as u64;
        report.sent.add(&up.stats);
        Ok(versions)
    }
}

/// Batches records for upload.
struct Uploader<'a> {
    conn: &'a Connection,
    layer: &'a str,
    buf: Vec<u8>,
    sent: HashSet<ChunkId>,
    stats: TransferStats,
    sealer: Sealer,
    progress: &'a dyn Progress,
}

impl Uploader<'_> {
    /// Queues the record of chunk `id`. A frame goes whole when at least
    /// half of its bytes are wanted; otherwise its wanted members go alone.
    fn add(&mut self, store: &Store, id: ChunkId, wanted: &HashSet<ChunkId>) -> Result<()> {
        if self.sent.contains(&id) {
            return Ok(());
        }
        match store.backend().get_sealed(&id)? {
            Sealed::Frame(f) => {
                let need: Vec<(ChunkId, u32)> = f
                    .members
                    .iter()
                    .filter(|(m, _)| wanted.contains(m) && !self.sent.contains(m))
                    .copied()
                    .collect();
                let need_bytes: u64 = need.iter().map(|(_, l)| u64::from(*l)).sum();
                if need_bytes * 2 >= u64::from(f.plain_len) {
                    self.put(Sealed::Frame(f))?;
                } else {
                    for (m, _) in need {
                        let plain = store.chunk(&m)?;
                        let sealed = Sealed::Chunk(self.sealer.seal(m, &plain));
                        self.put(sealed)?;
                    }
                }
            }
            chunk => self.put(chunk)?,
        }
        Ok(())
    }

    fn put(&mut self, sealed: Sealed) -> Result<()> {
        self.sent.extend(wire::members(&sealed));
        let len = wire::record_len(&sealed);
        wire::encode_record(&sealed, &mut self.buf);
        self.stats.records += 1;
        self.stats.bytes += len as u64;
        self.progress.advance(len as u64);
        if self.buf.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let body = std::mem::take(&mut self.buf);
        let got = self.conn.upload(self.layer, body)?;
        self.stats.chunks_new += got.chunks_new;
        Ok(())
    }
}
