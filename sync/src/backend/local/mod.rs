//! The local backend: chunk records in pack files, the index in RocksDB.
//!
//! Write path ([`write`]): `put` appends a record to the open pack's buffer
//! and notes its index entries as pending. `flush` (and sealing a full pack)
//! writes the buffer, `fdatasync`s the pack, and only then writes the pending
//! index entries, so an index entry never becomes durable before its bytes.
//! A crash can leave records past a pack's committed length; the next
//! writable open re-indexes them after verifying them ([`recover`]).
//!
//! Each process appends only to packs it created, so packs never have two
//! writers. Deleting chunks only removes index entries; reclaiming
//! ([`maintain`]) deletes packs with no live record and rewrites packs that
//! are mostly dead or small, updating the index (synced) before removing the
//! old file.
//!
//! Locks: `state` guards the open pack and pending entries (held for a
//! memcpy, or for a write and fdatasync when a pack fills); `readers` and
//! `frames` guard small caches and are never held during I/O.

mod maintain;
mod read;
mod recover;
mod write;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rocksdb::{WriteBatch, WriteOptions, DB};

use super::pack::{parse_pack_name, FrameCache, IndexEntry};
use super::{BackendProblem, BackendStats, ChunkBackend, ReclaimStats};
use crate::chunk::Sealed;
use crate::error::{Error, IoContext, Result};
use crate::id::{ChunkId, PackId};
use crate::store::cf;
use crate::store::keys::CF_CHUNKS;
use crate::Progress;

/// Pack-file chunk storage with a RocksDB index.
pub struct LocalBackend {
    db: Arc<DB>,
    db_path: PathBuf,
    packs_dir: PathBuf,
    writable: bool,
    state: Mutex<WriteState>,
    readers: Mutex<HashMap<PackId, Arc<File>>>,
    frames: Mutex<FrameCache>,
}

#[derive(Default)]
struct WriteState {
    open: Option<write::OpenPack>,
    pending: HashMap<ChunkId, IndexEntry>,
}

fn db_err(path: &Path, op: impl Into<String>) -> impl FnOnce(rocksdb::Error) -> Error + '_ {
    let op = op.into();
    move |source| Error::Db {
        path: path.to_owned(),
        op,
        source,
    }
}

fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .ctx(path, "sync directory")
}

impl LocalBackend {
    /// Opens the backend over `packs_dir` with the index in `db`. A writable
    /// backend first recovers any pack tails a crash left unindexed.
    ///
    /// # Errors
    /// I/O or catalog failures during recovery.
    pub(crate) fn open(
        db: Arc<DB>,
        db_path: PathBuf,
        packs_dir: PathBuf,
        writable: bool,
    ) -> Result<Self> {
        let backend = Self {
            db,
            db_path,
            packs_dir,
            writable,
            state: Mutex::new(WriteState::default()),
            readers: Mutex::new(HashMap::new()),
            frames: Mutex::new(FrameCache::with_capacity(super::pack::FRAME_CACHE)),
        };
        if writable {
            backend.recover()?;
        }
        Ok(backend)
    }

    fn state(&self) -> MutexGuard<'_, WriteState> {
        // A panic while holding the lock cannot leave the state torn in a way
        // that matters: pending entries are re-derived from pack bytes on the
        // next open. Keep going with the inner value.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_only_error(&self) -> Error {
        Error::InvalidInput(format!(
            "store {} is opened read-only",
            self.packs_dir.parent().unwrap_or(&self.packs_dir).display()
        ))
    }

    fn index_get(&self, id: &ChunkId) -> Result<Option<IndexEntry>> {
        let cf = cf(&self.db, CF_CHUNKS)?;
        let v = self.db.get_pinned_cf(cf, id.as_bytes()).map_err(db_err(
            &self.db_path,
            format!("read index entry of chunk {id}"),
        ))?;
        v.map(|v| {
            IndexEntry::decode(&v).map_err(|reason| Error::RecordCorrupt {
                what: format!("chunks/{id}"),
                reason,
            })
        })
        .transpose()
    }

    fn index_entries(&self, f: &mut dyn FnMut(ChunkId, IndexEntry) -> Result<()>) -> Result<()> {
        let cf = cf(&self.db, CF_CHUNKS)?;
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err(&self.db_path, "list chunk index"))?;
            let id = ChunkId::from_slice(&k).ok_or_else(|| Error::RecordCorrupt {
                what: "chunks key".into(),
                reason: format!("{} bytes, expected 32", k.len()),
            })?;
            let entry = IndexEntry::decode(&v).map_err(|reason| Error::RecordCorrupt {
                what: format!("chunks/{id}"),
                reason,
            })?;
            f(id, entry)?;
        }
        Ok(())
    }

    fn pack_files(&self) -> Result<Vec<(PackId, PathBuf, u64)>> {
        let mut out = Vec::new();
        let shards = match fs::read_dir(&self.packs_dir) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&self.packs_dir, "list packs", e)),
        };
        for shard in shards {
            let shard = shard.ctx(&self.packs_dir, "list packs")?;
            let dir = shard.path();
            if !dir.is_dir() {
                continue;
            }
            for f in fs::read_dir(&dir).ctx(&dir, "list packs")? {
                let f = f.ctx(&dir, "list packs")?;
                let Some(id) = f.file_name().to_str().and_then(parse_pack_name) else {
                    continue;
                };
                let len = f.metadata().ctx(f.path(), "stat pack")?.len();
                out.push((id, f.path(), len));
            }
        }
        out.sort();
        Ok(out)
    }
}

impl Drop for LocalBackend {
    /// Writes and indexes what is still buffered, so chunks of an operation
    /// that failed half-way are stored properly and a re-run reuses them.
    fn drop(&mut self) {
        if !self.writable {
            return;
        }
        let mut st = self.state();
        if st.open.is_some() || !st.pending.is_empty() {
            if let Err(e) = self.flush_locked(&mut st, true, false) {
                tracing::warn!(%e, "could not flush the open pack on close");
            }
        }
    }
}

impl ChunkBackend for LocalBackend {
    fn put(&self, sealed: Sealed) -> Result<u32> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        let ids: Vec<ChunkId> = match &sealed {
            Sealed::Chunk(c) => vec![c.id],
            Sealed::Frame(f) => f.members.iter().map(|(id, _)| *id).collect(),
        };
        let known = self.has_many(&ids)?;
        if known.iter().all(|&k| k) {
            return Ok(0);
        }
        let missing: HashSet<ChunkId> = ids
            .iter()
            .zip(&known)
            .filter(|(_, &k)| !k)
            .map(|(id, _)| *id)
            .collect();
        let mut st = self.state();
        let pending: HashSet<ChunkId> = missing
            .iter()
            .filter(|id| st.pending.contains_key(id))
            .copied()
            .collect();
        if pending.len() == missing.len() {
            return Ok(0);
        }
        self.append(&mut st, &sealed, &|id| {
            missing.contains(id) && !pending.contains(id)
        })
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if self.writable {
            let mut st = self.state();
            if st.pending.contains_key(id) {
                self.flush_locked(&mut st, false, false)?;
            }
        }
        let entry = self.index_get(id)?.ok_or(Error::ChunkMissing { id: *id })?;
        self.read_chunk(*id, &entry)
    }

    fn get_sealed(&self, id: &ChunkId) -> Result<Sealed> {
        if self.writable {
            let mut st = self.state();
            if st.pending.contains_key(id) {
                self.flush_locked(&mut st, false, false)?;
            }
        }
        let entry = self.index_get(id)?.ok_or(Error::ChunkMissing { id: *id })?;
        self.read_sealed(*id, &entry)
    }

    fn has_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let mut out = vec![false; ids.len()];
        let mut ask = Vec::new();
        {
            let st = self.state();
            for (i, id) in ids.iter().enumerate() {
                if st.pending.contains_key(id) {
                    out[i] = true;
                } else {
                    ask.push(i);
                }
            }
        }
        let cf = cf(&self.db, CF_CHUNKS)?;
        let keys: Vec<&[u8]> = ask.iter().map(|&i| ids[i].as_bytes().as_slice()).collect();
        let found = self.db.batched_multi_get_cf(cf, keys, false);
        for (&i, r) in ask.iter().zip(found) {
            let v = r.map_err(db_err(&self.db_path, "read chunk index"))?;
            out[i] = v.is_some();
        }
        Ok(out)
    }

    fn delete(&self, ids: &[ChunkId]) -> Result<()> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        let cf = cf(&self.db, CF_CHUNKS)?;
        let mut st = self.state();
        let mut batch = WriteBatch::default();
        for id in ids {
            st.pending.remove(id);
            batch.delete_cf(cf, id.as_bytes());
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(db_err(&self.db_path, "delete chunks"))
    }

    fn list(&self, f: &mut dyn FnMut(ChunkId, u64) -> Result<()>) -> Result<()> {
        self.index_entries(&mut |id, e| f(id, u64::from(e.plain_len)))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.state();
        self.flush_locked(&mut st, false, false)
    }

    fn reclaim(&self) -> Result<ReclaimStats> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        self.reclaim_space()
    }

    fn check(
        &self,
        verify_data: bool,
        progress: &dyn Progress,
        report: &mut dyn FnMut(BackendProblem),
    ) -> Result<u64> {
        self.check_all(verify_data, progress, report)
    }

    fn stats(&self) -> Result<BackendStats> {
        let mut s = BackendStats::default();
        let mut records = HashSet::new();
        self.index_entries(&mut |_, e| {
            crate::backend::pack::note_totals(&mut s, &mut records, &e);
            Ok(())
        })?;
        s.disk_bytes = self.pack_files()?.iter().map(|(_, _, len)| len).sum();
        Ok(s)
    }
}
