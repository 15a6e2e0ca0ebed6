//! Copying a whole store into another: `lamina store migrate` (an embedded
//! store onto Ceph) and each pass of a mirror.
//!
//! Order keeps the destination consistent at every moment: chunks first
//! (flushed), then version records, layers and records, and the refs and
//! their reflog last, so a ref is never copied before the version, the
//! manifests and the data it points to. Chunks go as stored (compressed,
//! frames whole), verified by the destination's `put` path on read back.
//! A pass is idempotent, so an interrupted one is resumed by running it
//! again: chunks already there are skipped, tables are made equal.

use std::collections::{BTreeMap, HashSet};

use rocksdb::WriteBatch;
use serde::Serialize;

use crate::chunk::Sealed;
use crate::error::Result;
use crate::id::ChunkId;
use crate::progress::Progress;
use crate::store::table::{Change, Table};
use crate::store::Store;

/// Chunks asked about per `has_many`.
const BATCH: usize = 1024;
/// Table writes per change.
const TABLE_BATCH: usize = 1024;

/// What a pass copied.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReplicateReport {
    /// Chunks in the source.
    pub chunks: u64,
    /// Chunks copied (the rest were there).
    pub chunks_copied: u64,
    /// Stored bytes of the records copied.
    pub bytes_copied: u64,
    /// Catalog entries written or removed.
    pub records_written: u64,
}

impl Store {
    /// Makes `dst` hold everything this store holds (see the module doc).
    /// With `prune`, entries of `dst`'s shared tables absent here are
    /// removed too (a mirror), so the tables end equal.
    ///
    /// # Errors
    /// Read failures here, write failures there.
    pub fn replicate_into(
        &self,
        dst: &Store,
        prune: bool,
        progress: &dyn Progress,
    ) -> Result<ReplicateReport> {
        dst.require_write()?;
        let _pin = dst.import_guard()?;
        let mut report = ReplicateReport::default();
        let mut ids = Vec::new();
        let mut lens = Vec::new();
        self.backend.list(&mut |id, len| {
            ids.push(id);
            lens.push(len);
            Ok(())
        })?;
        let plain = lens.iter().sum();
        report.chunks = ids.len() as u64;
        progress.phase("chunks", Some(plain));
        for (batch, lens) in ids.chunks(BATCH).zip(lens.chunks(BATCH)) {
            let have = dst.backend.has_many(batch)?;
            let mut done: HashSet<ChunkId> = HashSet::new();
            for (id, have) in batch.iter().zip(have) {
                if have || done.contains(id) {
                    continue;
                }
                let sealed = self.backend.get_sealed(id)?;
                let (members, stored): (Vec<ChunkId>, usize) = match &sealed {
                    Sealed::Chunk(c) => (vec![c.id], c.data.len()),
                    Sealed::Frame(f) => (f.members.iter().map(|m| m.0).collect(), f.data.len()),
                };
                done.extend(members);
                report.chunks_copied += u64::from(dst.backend.put(sealed)?);
                report.bytes_copied += stored as u64;
            }
            progress.advance(lens.iter().sum());
        }
        dst.backend.flush()?;
        progress.phase("catalog", None);
        // Refs last: everything a ref names is in place before it moves.
        for t in [
            Table::Versions,
            Table::Layers,
            Table::Records,
            Table::Reflog,
            Table::Refs,
        ] {
            report.records_written += self.copy_table(dst, t, prune, None)?;
        }
        Ok(report)
    }

    /// Copies table `t` into `dst` (with `prune`, removing what is not
    /// here), leaving alone keys starting with `skip`; returns the writes.
    pub(crate) fn copy_table(
        &self,
        dst: &Store,
        t: Table,
        prune: bool,
        skip: Option<&[u8]>,
    ) -> Result<u64> {
        let skipped = |k: &[u8]| skip.is_some_and(|p| k.starts_with(p));
        let mut want: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        self.tables.scan(t, &[], &mut |k, v| {
            if !skipped(k) {
                want.insert(k.to_vec(), v.to_vec());
            }
            Ok(true)
        })?;
        let mut change = Change::default();
        let mut n = 0u64;
        let flush = |change: &mut Change, force: bool| -> Result<()> {
            if change.ops.len() >= TABLE_BATCH || (force && !change.ops.is_empty()) {
                dst.apply_change(change, WriteBatch::default())?;
                *change = Change::default();
            }
            Ok(())
        };
        let mut extra = Vec::new();
        dst.tables.scan(t, &[], &mut |k, v| {
            match want.get(k) {
                Some(w) if w == v => {
                    want.remove(k);
                }
                Some(_) => {}
                None if prune && !skipped(k) => extra.push(k.to_vec()),
                None => {}
            }
            Ok(true)
        })?;
        for (k, v) in want {
            change.put((t, k, v));
            n += 1;
            flush(&mut change, false)?;
        }
        for k in extra {
            change.delete((t, k));
            n += 1;
            flush(&mut change, false)?;
        }
        flush(&mut change, true)?;
        Ok(n)
    }
}
