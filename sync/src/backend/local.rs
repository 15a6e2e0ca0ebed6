//! The local backend: chunk records in pack files, the index in RocksDB.
//!
//! Write path: `put` appends a record to the open pack's buffer and notes the
//! index entry as pending. `flush` (and sealing a full pack) writes the
//! buffer, `fdatasync`s the pack, and only then writes the pending index
//! entries, so an index entry never becomes durable before its bytes. A
//! crash can leave records past a pack's committed length; [`LocalBackend`]
//! re-indexes such tails on the next writable open (each record is verified
//! against its id first) and truncates whatever is torn.
//!
//! Each process appends only to packs it created, so packs never have two
//! writers. Deleting chunks only removes index entries; `reclaim` then
//! deletes packs with no live record and rewrites packs that are mostly dead
//! or small, updating the index (synced) before removing the old file.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rocksdb::{WriteBatch, WriteOptions, DB};

use super::pack::{
    pack_header, pack_path, parse_pack_header, parse_pack_name, IndexEntry, RecordHeader,
    PACK_HEADER_LEN, PACK_TARGET_BYTES, RECORD_HEADER_LEN,
};
use super::{BackendProblem, BackendStats, ChunkBackend, ReclaimStats};
use crate::chunk::{unseal, SealedChunk};
use crate::error::{Error, IoContext, Result};
use crate::id::{ChunkId, PackId};
use crate::store::cf;
use crate::store::keys::{CF_CHUNKS, CF_PACKS};
use crate::Progress;

/// Buffered bytes of the open pack before they are written to the file.
const WRITE_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Open pack files kept for reading.
const READ_HANDLES: usize = 256;

/// Pack-file chunk storage with a RocksDB index.
pub struct LocalBackend {
    db: Arc<DB>,
    db_path: PathBuf,
    packs_dir: PathBuf,
    writable: bool,
    state: Mutex<WriteState>,
    readers: Mutex<HashMap<PackId, Arc<File>>>,
}

#[derive(Default)]
struct WriteState {
    open: Option<OpenPack>,
    pending: HashMap<ChunkId, IndexEntry>,
}

struct OpenPack {
    id: PackId,
    file: File,
    path: PathBuf,
    len: u64,
    buf: Vec<u8>,
    dir_synced: bool,
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

    fn create_pack(&self) -> Result<OpenPack> {
        loop {
            let id = PackId::random();
            let path = pack_path(&self.packs_dir, id);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).ctx(parent, "create pack directory")?;
            }
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    return Ok(OpenPack {
                        id,
                        file,
                        path,
                        len: PACK_HEADER_LEN,
                        buf: pack_header(id, secs).to_vec(),
                        dir_synced: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(path, "create pack", e)),
            }
        }
    }

    /// Appends a record to the open pack (creating one if needed) and notes
    /// its index entry as pending. Does not check for duplicates.
    fn append(&self, st: &mut WriteState, chunk: &SealedChunk) -> Result<()> {
        if st.open.is_none() {
            st.open = Some(self.create_pack()?);
        }
        let Some(pack) = st.open.as_mut() else {
            return Ok(());
        };
        let header = RecordHeader {
            id: chunk.id,
            compression: chunk.compression,
            plain_len: chunk.plain_len,
            stored_len: chunk.data.len() as u32,
        };
        let entry = IndexEntry {
            pack: pack.id,
            offset: pack.len,
            stored_len: header.stored_len,
            plain_len: header.plain_len,
            compression: header.compression,
        };
        pack.buf.extend_from_slice(&header.encode());
        pack.buf.extend_from_slice(&chunk.data);
        pack.len += header.record_len();
        if pack.buf.len() >= WRITE_BUFFER_BYTES {
            pack.file
                .write_all(&pack.buf)
                .ctx(&pack.path, "write pack")?;
            pack.buf.clear();
        }
        let full = pack.len >= PACK_TARGET_BYTES;
        st.pending.insert(chunk.id, entry);
        if full {
            self.flush_locked(st, true, false)?;
        }
        Ok(())
    }

    /// Writes and syncs the open pack, then records pending index entries.
    fn flush_locked(&self, st: &mut WriteState, seal: bool, sync_index: bool) -> Result<()> {
        let mut batch = WriteBatch::default();
        if let Some(pack) = st.open.as_mut() {
            if !pack.buf.is_empty() {
                pack.file
                    .write_all(&pack.buf)
                    .ctx(&pack.path, "write pack")?;
                pack.buf.clear();
            }
            pack.file.sync_data().ctx(&pack.path, "sync pack")?;
            if !pack.dir_synced {
                if let Some(dir) = pack.path.parent() {
                    fsync_dir(dir)?;
                }
                fsync_dir(&self.packs_dir)?;
                pack.dir_synced = true;
            }
            batch.put_cf(
                cf(&self.db, CF_PACKS)?,
                pack.id.0.to_be_bytes(),
                pack.len.to_be_bytes(),
            );
        }
        let chunks = cf(&self.db, CF_CHUNKS)?;
        for (id, entry) in &st.pending {
            batch.put_cf(chunks, id.as_bytes(), entry.encode());
        }
        if !batch.is_empty() {
            let mut wo = WriteOptions::default();
            wo.set_sync(sync_index);
            self.db
                .write_opt(batch, &wo)
                .map_err(db_err(&self.db_path, "write chunk index"))?;
        }
        st.pending.clear();
        if seal {
            st.open = None;
        }
        Ok(())
    }

    fn reader(&self, pack: PackId) -> Result<Arc<File>> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = readers.get(&pack) {
            return Ok(f.clone());
        }
        let path = pack_path(&self.packs_dir, pack);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::PackCorrupt {
                    pack,
                    offset: 0,
                    reason: format!("pack file {} is missing", path.display()),
                }
            } else {
                Error::io(&path, "open pack", e)
            }
        })?;
        if readers.len() >= READ_HANDLES {
            readers.clear();
        }
        let file = Arc::new(file);
        readers.insert(pack, file.clone());
        Ok(file)
    }

    /// Reads a record's stored bytes (header checked against the entry).
    fn read_record(&self, id: ChunkId, entry: &IndexEntry) -> Result<Vec<u8>> {
        let file = self.reader(entry.pack)?;
        let mut buf = vec![0u8; RECORD_HEADER_LEN + entry.stored_len as usize];
        if let Err(e) = file.read_exact_at(&mut buf, entry.offset) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                return Err(Error::PackTruncated {
                    pack: entry.pack,
                    chunk: id,
                    offset: entry.offset,
                    end: entry.end(),
                    size,
                });
            }
            return Err(Error::io(
                pack_path(&self.packs_dir, entry.pack),
                "read pack",
                e,
            ));
        }
        let corrupt = |reason: String| Error::PackCorrupt {
            pack: entry.pack,
            offset: entry.offset,
            reason,
        };
        let header = RecordHeader::parse(&buf).map_err(|r| corrupt(format!("chunk {id}: {r}")))?;
        if header != entry.expected_header(id) {
            return Err(corrupt(format!(
                "record header (chunk {}, {} bytes) does not match the index entry of chunk {id}",
                header.id, header.stored_len
            )));
        }
        Ok(buf.split_off(RECORD_HEADER_LEN))
    }

    fn read_chunk(&self, id: ChunkId, entry: &IndexEntry) -> Result<Vec<u8>> {
        let stored = self.read_record(id, entry)?;
        unseal(id, entry.plain_len, entry.compression, stored).map_err(|e| match e {
            Error::ChunkCorrupt { id, reason } => Error::ChunkCorrupt {
                id,
                reason: format!("{reason} (pack {}, offset {})", entry.pack, entry.offset),
            },
            other => other,
        })
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

    fn committed_lengths(&self) -> Result<HashMap<PackId, u64>> {
        let cf = cf(&self.db, CF_PACKS)?;
        let mut out = HashMap::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err(&self.db_path, "list packs"))?;
            let (Ok(k), Ok(v)) = (<[u8; 8]>::try_from(&*k), <[u8; 8]>::try_from(&*v)) else {
                return Err(Error::RecordCorrupt {
                    what: "packs entry".into(),
                    reason: "wrong key or value length".into(),
                });
            };
            out.insert(PackId(u64::from_be_bytes(k)), u64::from_be_bytes(v));
        }
        Ok(out)
    }

    /// Re-indexes records a crash left past a pack's committed length.
    fn recover(&self) -> Result<()> {
        let committed = self.committed_lengths()?;
        for (id, path, len) in self.pack_files()? {
            let known = committed.get(&id).copied();
            if known.is_some_and(|c| len <= c) {
                continue;
            }
            self.recover_pack(id, &path, len, known)?;
        }
        Ok(())
    }

    fn recover_pack(&self, id: PackId, path: &Path, len: u64, known: Option<u64>) -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(path, "open pack for recovery")?;
        let start = match known {
            Some(c) => c.max(PACK_HEADER_LEN),
            None => {
                let mut h = [0u8; PACK_HEADER_LEN as usize];
                let header_ok = file.read_exact_at(&mut h, 0).is_ok()
                    && parse_pack_header(&h).is_ok_and(|p| p == id);
                if !header_ok {
                    // Never committed and torn before its header was written:
                    // it holds nothing anyone refers to.
                    tracing::warn!(pack = %id, "removing a pack torn at creation");
                    fs::remove_file(path).ctx(path, "remove torn pack")?;
                    return Ok(());
                }
                PACK_HEADER_LEN
            }
        };
        let mut offset = start;
        let mut batch = WriteBatch::default();
        let chunks = cf(&self.db, CF_CHUNKS)?;
        let mut recovered = 0u64;
        while offset < len {
            let mut h = [0u8; RECORD_HEADER_LEN];
            if file.read_exact_at(&mut h, offset).is_err() {
                break;
            }
            let Ok(header) = RecordHeader::parse(&h) else {
                break;
            };
            let mut data = vec![0u8; header.stored_len as usize];
            if file
                .read_exact_at(&mut data, offset + RECORD_HEADER_LEN as u64)
                .is_err()
            {
                break;
            }
            if unseal(header.id, header.plain_len, header.compression, data).is_err() {
                break;
            }
            if self.index_get(&header.id)?.is_none() {
                let entry = IndexEntry {
                    pack: id,
                    offset,
                    stored_len: header.stored_len,
                    plain_len: header.plain_len,
                    compression: header.compression,
                };
                batch.put_cf(chunks, header.id.as_bytes(), entry.encode());
                recovered += 1;
            }
            offset += header.record_len();
        }
        if offset < len {
            tracing::warn!(pack = %id, offset, len, "truncating a torn pack tail");
            file.set_len(offset).ctx(path, "truncate torn pack tail")?;
        }
        file.sync_all().ctx(path, "sync recovered pack")?;
        batch.put_cf(
            cf(&self.db, CF_PACKS)?,
            id.0.to_be_bytes(),
            offset.to_be_bytes(),
        );
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(db_err(&self.db_path, "record recovered chunks"))?;
        tracing::info!(pack = %id, recovered, "recovered pack tail");
        Ok(())
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
    fn put(&self, chunk: SealedChunk) -> Result<bool> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        if self.index_get(&chunk.id)?.is_some() {
            return Ok(false);
        }
        let mut st = self.state();
        if st.pending.contains_key(&chunk.id) {
            return Ok(false);
        }
        self.append(&mut st, &chunk)?;
        Ok(true)
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
        self.index_entries(&mut |id, e| f(id, u64::from(e.stored_len)))
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
        let mut st = self.state();
        self.flush_locked(&mut st, true, true)?;
        let mut live: HashMap<PackId, Vec<(ChunkId, IndexEntry)>> = HashMap::new();
        self.index_entries(&mut |id, e| {
            live.entry(e.pack).or_default().push((id, e));
            Ok(())
        })?;
        let mut stats = ReclaimStats::default();
        let packs_cf = cf(&self.db, CF_PACKS)?;
        let mut rewrite = Vec::new();
        for (id, path, size) in self.pack_files()? {
            let entries = live.remove(&id).unwrap_or_default();
            if entries.is_empty() {
                fs::remove_file(&path).ctx(&path, "remove dead pack")?;
                self.db
                    .delete_cf(packs_cf, id.0.to_be_bytes())
                    .map_err(db_err(&self.db_path, "forget dead pack"))?;
                stats.packs_deleted += 1;
                stats.bytes_freed += size;
                continue;
            }
            let live_bytes: u64 = entries.iter().map(|(_, e)| e.end() - e.offset).sum();
            let mostly_dead = live_bytes * 2 < size;
            let small = size < PACK_TARGET_BYTES / 8;
            if mostly_dead || small {
                rewrite.push((id, path, size, entries, mostly_dead));
            }
        }
        // A lone small pack is left alone: rewriting it gains nothing.
        if rewrite.len() == 1 && !rewrite[0].4 {
            rewrite.clear();
        }
        for (id, path, size, entries, _) in rewrite {
            let mut records = Vec::with_capacity(entries.len());
            let mut intact = true;
            for (cid, e) in &entries {
                match self.read_record(*cid, e).and_then(|stored| {
                    unseal(*cid, e.plain_len, e.compression, stored.clone()).map(|_| stored)
                }) {
                    Ok(stored) => records.push(SealedChunk {
                        id: *cid,
                        plain_len: e.plain_len,
                        compression: e.compression,
                        data: stored,
                    }),
                    Err(err) => {
                        tracing::warn!(pack = %id, chunk = %cid, %err, "not rewriting a pack holding a bad chunk");
                        intact = false;
                        break;
                    }
                }
            }
            if !intact {
                continue;
            }
            for r in &records {
                self.append(&mut st, r)?;
            }
            self.flush_locked(&mut st, false, true)?;
            let new_size: u64 = records
                .iter()
                .map(|r| RECORD_HEADER_LEN as u64 + r.data.len() as u64)
                .sum();
            fs::remove_file(&path).ctx(&path, "remove rewritten pack")?;
            self.db
                .delete_cf(packs_cf, id.0.to_be_bytes())
                .map_err(db_err(&self.db_path, "forget rewritten pack"))?;
            stats.packs_rewritten += 1;
            stats.bytes_freed += size.saturating_sub(new_size);
        }
        self.flush_locked(&mut st, true, true)?;
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        fsync_dir(&self.packs_dir)?;
        Ok(stats)
    }

    fn check(
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
            match header {
                Ok(p) if p == *id => {}
                Ok(p) => report(BackendProblem {
                    object: format!("pack {id}"),
                    chunk: None,
                    message: format!("header names pack {p}"),
                }),
                Err(e) => report(BackendProblem {
                    object: format!("pack {id}"),
                    chunk: None,
                    message: format!("bad header: {e}"),
                }),
            }
        }
        for (id, committed) in committed {
            match sizes.get(&id) {
                None => report(BackendProblem {
                    object: format!("pack {id}"),
                    chunk: None,
                    message: "pack file is missing".into(),
                }),
                Some(&size) if size < committed => report(BackendProblem {
                    object: format!("pack {id}"),
                    chunk: None,
                    message: format!("truncated: {size} bytes, {committed} committed"),
                }),
                Some(_) => {}
            }
        }
        let mut checked = 0u64;
        self.index_entries(&mut |id, e| {
            checked += 1;
            let result = if verify_data {
                self.read_chunk(id, &e).map(|_| ())
            } else {
                self.read_record(id, &e).map(|_| ())
            };
            progress.advance(u64::from(e.stored_len));
            if let Err(err) = result {
                report(BackendProblem {
                    object: format!("chunk {id}"),
                    chunk: Some(id),
                    message: err.to_string(),
                });
            }
            Ok(())
        })?;
        Ok(checked)
    }

    fn stats(&self) -> Result<BackendStats> {
        let mut s = BackendStats::default();
        self.index_entries(&mut |_, e| {
            s.chunks += 1;
            s.stored_bytes += u64::from(e.stored_len);
            Ok(())
        })?;
        s.disk_bytes = self.pack_files()?.iter().map(|(_, _, len)| len).sum();
        Ok(s)
    }
}
