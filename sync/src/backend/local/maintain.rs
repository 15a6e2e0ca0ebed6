//! Maintenance of the local backend: reclaiming the space of deleted chunks
//! and checking every pack and index entry.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;

use rocksdb::{WriteBatch, WriteOptions};

use super::LocalBackend;
use crate::backend::pack::{
    parse_pack_header, reseal_record, IndexEntry, PACK_HEADER_LEN, PACK_TARGET_BYTES,
};
use crate::backend::{BackendProblem, ReclaimStats};
use crate::chunk::{Sealed, Sealer};
use crate::error::{IoContext, Result};
use crate::id::{ChunkId, PackId};
use crate::progress::Progress;
use crate::store::cf;
use crate::store::keys::CF_PACKS;

/// Live records of one pack: record offset → its live members.
type Records = BTreeMap<u64, Vec<(ChunkId, IndexEntry)>>;

impl LocalBackend {
    /// Removes a pack no index entry points at: first its `packs` entry (a
    /// synced write), then the file. A crash in between leaves a file the
    /// next writer treats as a crash leftover, never an entry for a missing
    /// file.
    fn forget_pack(&self, id: PackId, path: &std::path::Path) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf(&self.db, CF_PACKS)?, id.0.to_be_bytes());
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(super::db_err(&self.db_path, "forget pack"))?;
        crate::failpoint::hit("pack-forgotten");
        fs::remove_file(path).ctx(path, "remove pack")
    }

    fn live_records(&self) -> Result<HashMap<PackId, Records>> {
        let mut live = crate::backend::pack::LiveRecords::new();
        self.index_entries(&mut |id, e| {
            crate::backend::pack::note_live(&mut live, id, e);
            Ok(())
        })?;
        Ok(live)
    }

    /// Re-seals the live members of one record for a rewrite.
    fn reseal(
        &self,
        sealer: &mut Sealer,
        members: &[(ChunkId, IndexEntry)],
    ) -> Result<Vec<Sealed>> {
        let (id0, e0) = members[0];
        reseal_record(sealer, members, self.read_record(id0, &e0)?)
    }

    pub(super) fn reclaim_space(&self) -> Result<ReclaimStats> {
        let mut st = self.state();
        self.flush_locked(&mut st, true, true)?;
        let mut live = self.live_records()?;
        let mut stats = ReclaimStats::default();
        let mut rewrite = Vec::new();
        for (id, path, size) in self.pack_files()? {
            let records = live.remove(&id).unwrap_or_default();
            if records.is_empty() {
                self.forget_pack(id, &path)?;
                stats.packs_deleted += 1;
                stats.bytes_freed += size;
                continue;
            }
            let live_bytes: u64 = records.values().map(|m| u64::from(m[0].1.record_len)).sum();
            let mostly_dead = live_bytes * 2 < size;
            let small = size < PACK_TARGET_BYTES / 8;
            if mostly_dead || small {
                rewrite.push((id, path, size, records, mostly_dead));
            }
        }
        // A lone small pack is left alone: rewriting it gains nothing.
        if rewrite.len() == 1 && !rewrite[0].4 {
            rewrite.clear();
        }
        let mut sealer = Sealer::new();
        for (id, path, size, records, _) in rewrite {
            let mut sealed = Vec::new();
            let mut intact = true;
            for members in records.values() {
                match self.reseal(&mut sealer, members) {
                    Ok(s) => sealed.extend(s),
                    Err(err) => {
                        tracing::warn!(pack = %id, %err, "not rewriting a pack holding a bad chunk");
                        intact = false;
                        break;
                    }
                }
            }
            if !intact {
                continue;
            }
            let mut written = 0;
            for s in &sealed {
                self.append(&mut st, s, &|_| true)?;
                written += super::write::record_len(s);
            }
            self.flush_locked(&mut st, false, true)?;
            crate::failpoint::hit("pack-rewritten");
            self.forget_pack(id, &path)?;
            stats.packs_rewritten += 1;
            stats.bytes_freed += size.saturating_sub(written);
        }
        self.flush_locked(&mut st, true, true)?;
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        super::fsync_dir(&self.packs_dir)?;
        Ok(stats)
    }

    pub(super) fn check_all(
        &self,
        verify_data: bool,
        progress: &dyn Progress,
        report: &mut dyn FnMut(BackendProblem),
    ) -> Result<u64> {
        let files = self.pack_files()?;
        let committed = self.committed_lengths()?;
        let mut sizes = HashMap::new();
        for (id, path, size) in &files {
            sizes.insert(*id, *size);
            if !committed.contains_key(id) {
                // Created by a writer that stopped before its first flush:
                // nothing is indexed in it, and the next writer recovers or
                // removes it. Not damage.
                continue;
            }
            let mut h = [0u8; PACK_HEADER_LEN as usize];
            let header = File::open(path)
                .and_then(|f| f.read_exact_at(&mut h, 0))
                .map_err(|e| e.to_string())
                .and_then(|()| parse_pack_header(&h));
            let problem = match header {
                Ok(p) if p == *id => None,
                Ok(p) => Some(format!("header names pack {p}")),
                Err(e) => Some(format!("bad header: {e}")),
            };
            if let Some(message) = problem {
                report(BackendProblem {
                    object: format!("pack {id}"),
                    chunk: None,
                    message,
                });
            }
        }
        for (id, len) in committed {
            let message = match sizes.get(&id) {
                None => "pack file is missing".to_owned(),
                Some(&size) if size < len => format!("truncated: {size} bytes, {len} committed"),
                Some(_) => continue,
            };
            report(BackendProblem {
                object: format!("pack {id}"),
                chunk: None,
                message,
            });
        }
        // In pack order: sequential reads, and each frame is decompressed
        // once for all its members.
        let mut entries = Vec::new();
        self.index_entries(&mut |id, e| {
            entries.push((id, e));
            Ok(())
        })?;
        entries.sort_by_key(|(_, e)| (e.pack, e.offset));
        for (id, e) in &entries {
            let result = if verify_data {
                self.read_chunk(*id, e).map(|_| ())
            } else {
                self.read_record(*id, e).map(|_| ())
            };
            progress.advance(u64::from(e.plain_len));
            if let Err(err) = result {
                report(BackendProblem {
                    object: format!("chunk {id}"),
                    chunk: Some(*id),
                    message: err.to_string(),
                });
            }
        }
        Ok(entries.len() as u64)
    }
}
