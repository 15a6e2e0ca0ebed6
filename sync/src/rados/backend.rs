//! The RADOS chunk backend: chunk records in pack objects, the index in
//! the omap of 16 shard objects.
//!
//! Layout chosen by measurement (`rados bench` on the one-node cluster of
//! `scripts/ceph.sh`, 16 ops in flight): 64 KiB objects — one object per
//! chunk — reached 263 MB/s and 4 MiB objects 807 MB/s. Packing records
//! into 4 MiB objects as the local backend does, with the index in omap,
//! costs a lookup before a read but writes three times faster and keeps
//! per-object overhead (an onode per object in BlueStore) away from
//! small chunks; frames of small files stay as they are.
//!
//! Write path: `put` appends to this process's open pack in memory; a full
//! pack goes to a writer thread, which writes the object (acknowledged =
//! durable on the OSD) and only then its index entries, so no index entry
//! ever names bytes that are not there. `flush` waits for every pack
//! queued. Several servers write their own packs; two copies of a chunk
//! are harmless (the index keeps one, reclaim drops the other).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::{Pool, RadosTarget, WriteOp};
use crate::backend::pack::{
    append_record, cached_frame, chunk_of_record, frame_member, note_live, pack_header,
    reseal_record, sealed_of_record, FrameCache, IndexEntry, LiveRecords, PlainFrame, RecordKind,
    PACK_HEADER_LEN,
};
use crate::backend::{BackendProblem, BackendStats, ChunkBackend, ReclaimStats};
use crate::chunk::{Sealed, Sealer};
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::Progress;

/// Bytes of a pack object before it is sent (see the module doc).
const PACK_TARGET: usize = 4 * 1024 * 1024;
/// Threads writing packs; each has one pack and its index writes in flight.
const WRITERS: usize = 4;
/// Packs queued to the writers at most (memory: about
/// `(WRITERS + QUEUE) × PACK_TARGET`).
const QUEUE: usize = 2;
/// Index shards.
const SHARDS: usize = 16;
/// Prefix of pack objects.
const PACK_PREFIX: &str = "lamina.pack.";

fn pack_object(id: PackId) -> String {
    format!("{PACK_PREFIX}{id}")
}

fn shard_object(shard: usize) -> String {
    format!("lamina.idx.{shard:x}")
}

fn shard_of(id: &ChunkId) -> usize {
    usize::from(id.as_bytes()[0] >> 4)
}

struct OpenPack {
    id: PackId,
    buf: Vec<u8>,
    entries: Vec<(ChunkId, IndexEntry)>,
}

impl OpenPack {
    fn new() -> OpenPack {
        let id = PackId::random();
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut buf = Vec::with_capacity(PACK_TARGET + (1 << 20));
        buf.extend_from_slice(&pack_header(id, secs));
        OpenPack {
            id,
            buf,
            entries: Vec::new(),
        }
    }
}

/// Packs in flight and the first failure of a writer.
#[derive(Default)]
struct Outstanding {
    packs: usize,
    failure: Option<Error>,
}

struct Shared {
    pool: Arc<Pool>,
    target: RadosTarget,
    /// Chunks in a pack buffered or in flight, not yet in the index.
    unindexed: Mutex<HashMap<ChunkId, IndexEntry>>,
    outstanding: Mutex<Outstanding>,
    done: Condvar,
}

/// Chunks in a RADOS pool.
pub struct RadosBackend {
    shared: Arc<Shared>,
    writable: bool,
    open: Mutex<Option<OpenPack>>,
    queue: Option<Sender<OpenPack>>,
    writers: Vec<JoinHandle<()>>,
    frames: Mutex<FrameCache>,
}

impl RadosBackend {
    pub(crate) fn new(pool: Arc<Pool>, target: RadosTarget, writable: bool) -> Result<Self> {
        let shared = Arc::new(Shared {
            pool,
            target,
            unindexed: Mutex::new(HashMap::new()),
            outstanding: Mutex::new(Outstanding::default()),
            done: Condvar::new(),
        });
        let (queue, writers) = if writable {
            let (tx, rx) = bounded::<OpenPack>(QUEUE);
            let mut writers = Vec::new();
            for i in 0..WRITERS {
                let (rx, shared) = (rx.clone(), shared.clone());
                let t = std::thread::Builder::new()
                    .name(format!("lamina-rados-{i}"))
                    .spawn(move || writer(&shared, &rx))
                    .map_err(|e| Error::io("lamina-rados", "spawn thread", e))?;
                writers.push(t);
            }
            (Some(tx), writers)
        } else {
            (None, Vec::new())
        };
        Ok(RadosBackend {
            shared,
            writable,
            open: Mutex::new(None),
            queue,
            writers,
            frames: Mutex::new(FrameCache::new()),
        })
    }

    fn err(&self) -> impl Fn(super::RadosError) -> Error + '_ {
        self.shared.target.err()
    }

    fn failure(&self) -> Result<()> {
        let mut o = self
            .shared
            .outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match o.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Hands a full (or flushed) pack to the writers.
    fn send(&self, pack: OpenPack) -> Result<()> {
        let Some(queue) = &self.queue else {
            return Err(read_only(&self.shared.target));
        };
        self.shared
            .outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .packs += 1;
        if queue.send(pack).is_err() {
            let mut o = self
                .shared
                .outstanding
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            o.packs -= 1;
            return Err(Error::InvalidInput("RADOS pack writers stopped".into()));
        }
        Ok(())
    }

    /// The index entries of `ids` (`None`: not stored).
    fn lookup(&self, ids: &[ChunkId]) -> Result<Vec<Option<IndexEntry>>> {
        let mut out = vec![None; ids.len()];
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); SHARDS];
        {
            let unindexed = self
                .shared
                .unindexed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (i, id) in ids.iter().enumerate() {
                match unindexed.get(id) {
                    Some(e) => out[i] = Some(*e),
                    None => by_shard[shard_of(id)].push(i),
                }
            }
        }
        let pool = &self.shared.pool;
        let mut pending = Vec::new();
        for (shard, idx) in by_shard.iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let keys: Vec<String> = idx.iter().map(|&i| ids[i].to_hex()).collect();
            pending.push(
                pool.aio_omap_get(&shard_object(shard), &keys)
                    .map_err(self.err())?,
            );
        }
        let mut found: HashMap<String, Vec<u8>> = HashMap::new();
        for p in pending {
            match p.wait() {
                Ok(super::ffi::Done::Omap(pairs)) => found.extend(pairs),
                Ok(_) => {}
                // A shard no chunk has reached yet.
                Err(super::ffi::OpError::Rados(e)) if e.errno == libc::ENOENT => {}
                Err(super::ffi::OpError::Rados(e)) => return Err((self.err())(e)),
                Err(super::ffi::OpError::Compare(_)) => {}
            }
        }
        for (i, id) in ids.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(v) = found.get(&id.to_hex()) {
                out[i] = Some(
                    IndexEntry::decode(v).map_err(|reason| Error::RecordCorrupt {
                        what: format!(
                            "{}/{} entry {id}",
                            self.shared.target.pool,
                            shard_object(shard_of(id))
                        ),
                        reason,
                    })?,
                );
            }
        }
        Ok(out)
    }

    fn entry(&self, id: &ChunkId) -> Result<IndexEntry> {
        let entry = self
            .lookup(std::slice::from_ref(id))?
            .pop()
            .flatten()
            .ok_or(Error::ChunkMissing { id: *id })?;
        let unindexed = self
            .shared
            .unindexed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id);
        if unindexed {
            // Its pack may still be in memory: write it out first.
            self.flush()?;
        }
        Ok(entry)
    }

    fn read_record(&self, id: ChunkId, entry: &IndexEntry) -> Result<Vec<u8>> {
        let oid = pack_object(entry.pack);
        let len = entry.record_len as usize;
        let record = self
            .shared
            .pool
            .read(&oid, entry.offset, len)
            .map_err(self.err())?
            .ok_or_else(|| Error::PackCorrupt {
                pack: entry.pack,
                offset: entry.offset,
                reason: format!("chunk {id}: pack object {oid} is missing"),
            })?;
        if record.len() < len {
            return Err(Error::PackTruncated {
                pack: entry.pack,
                chunk: id,
                offset: entry.offset,
                end: entry.end(),
                size: entry.offset + record.len() as u64,
            });
        }
        Ok(record)
    }

    fn frame(&self, id: ChunkId, entry: &IndexEntry) -> Result<Arc<PlainFrame>> {
        cached_frame(&self.frames, id, entry, || self.read_record(id, entry))
    }

    /// Calls `f` for every index entry, shard by shard.
    fn each_entry(&self, f: &mut dyn FnMut(ChunkId, IndexEntry) -> Result<()>) -> Result<()> {
        for shard in 0..SHARDS {
            let oid = shard_object(shard);
            let mut after = String::new();
            loop {
                let page = match self.shared.pool.omap_page(&oid, &after, "", 1024) {
                    Ok(p) => p,
                    Err(e) if e.errno == libc::ENOENT => break,
                    Err(e) => return Err((self.err())(e)),
                };
                for (k, v) in &page.pairs {
                    let corrupt = |reason: String| Error::RecordCorrupt {
                        what: format!("{}/{oid} key {k}", self.shared.target.pool),
                        reason,
                    };
                    let id: ChunkId = k
                        .parse()
                        .map_err(|e: crate::id::ParseIdError| corrupt(e.to_string()))?;
                    f(id, IndexEntry::decode(v).map_err(corrupt)?)?;
                }
                match page.pairs.last() {
                    Some((k, _)) if page.more => after = k.clone(),
                    _ => break,
                }
            }
        }
        Ok(())
    }

    fn whole_pack(&self, pack: PackId, size: u64) -> Result<Vec<u8>> {
        let oid = pack_object(pack);
        self.shared
            .pool
            .read(&oid, 0, usize::try_from(size).unwrap_or(usize::MAX))
            .map_err(self.err())?
            .ok_or_else(|| Error::PackCorrupt {
                pack,
                offset: 0,
                reason: format!("pack object {oid} vanished during reclaim"),
            })
    }

    /// Every pack object and its size.
    fn packs(&self) -> Result<HashMap<PackId, u64>> {
        let names: Vec<PackId> = self
            .shared
            .pool
            .list(PACK_PREFIX)
            .map_err(self.err())?
            .iter()
            .filter_map(|oid| u64::from_str_radix(&oid[PACK_PREFIX.len()..], 16).ok())
            .map(PackId)
            .collect();
        let mut out = HashMap::new();
        for id in names {
            if let Some((size, _)) = self
                .shared
                .pool
                .stat(&pack_object(id))
                .map_err(self.err())?
            {
                out.insert(id, size);
            }
        }
        Ok(out)
    }
}

fn read_only(target: &RadosTarget) -> Error {
    Error::InvalidInput(format!(
        "RADOS store on pool {} is opened read-only",
        target.pool
    ))
}

/// A writer thread: writes each pack, then its index entries.
fn writer(shared: &Shared, rx: &Receiver<OpenPack>) {
    for pack in rx {
        let result = write_pack(shared, &pack);
        let mut o = shared.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        o.packs -= 1;
        if let Err(e) = result {
            tracing::warn!(pack = %pack.id, %e, "writing a pack to RADOS failed");
            o.failure.get_or_insert(e);
        }
        drop(o);
        shared.done.notify_all();
    }
}

fn write_pack(shared: &Shared, pack: &OpenPack) -> Result<()> {
    let err = shared.target.err();
    let pool = &shared.pool;
    pool.write_full(&pack_object(pack.id), &pack.buf)
        .map_err(&err)?;
    let mut by_shard: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); SHARDS];
    for (id, entry) in &pack.entries {
        by_shard[shard_of(id)].push((id.to_hex(), entry.encode().to_vec()));
    }
    let mut pending = Vec::new();
    for (shard, set) in by_shard.into_iter().enumerate() {
        if set.is_empty() {
            continue;
        }
        let op = WriteOp {
            set,
            ..WriteOp::default()
        };
        pending.push(pool.aio_operate(&shard_object(shard), &op).map_err(&err)?);
    }
    for p in pending {
        p.wait().map_err(|e| match e {
            super::ffi::OpError::Rados(e) => err(e),
            super::ffi::OpError::Compare(_) => Error::InvalidInput("index write refused".into()),
        })?;
    }
    let mut unindexed = shared.unindexed.lock().unwrap_or_else(|p| p.into_inner());
    for (id, _) in &pack.entries {
        if unindexed.get(id).is_some_and(|e| e.pack == pack.id) {
            unindexed.remove(id);
        }
    }
    Ok(())
}

impl Drop for RadosBackend {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(%e, "could not flush chunks to RADOS on close");
        }
        drop(self.queue.take());
        for t in self.writers.drain(..) {
            let _ = t.join();
        }
    }
}

impl ChunkBackend for RadosBackend {
    fn put(&self, sealed: Sealed) -> Result<u32> {
        if !self.writable {
            return Err(read_only(&self.shared.target));
        }
        self.failure()?;
        let full = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let pack = open.get_or_insert_with(OpenPack::new);
            let offset = pack.buf.len() as u64;
            let (_, entries) = append_record(&mut pack.buf, pack.id, offset, &sealed);
            let mut unindexed = self
                .shared
                .unindexed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut new = 0;
            for (id, entry) in entries {
                if unindexed.insert(id, entry).is_none() {
                    new += 1;
                }
                pack.entries.push((id, entry));
            }
            drop(unindexed);
            if pack.buf.len() >= PACK_TARGET {
                open.take().map(|p| (p, new))
            } else {
                return Ok(new);
            }
        };
        match full {
            Some((pack, new)) => {
                self.send(pack)?;
                Ok(new)
            }
            None => Ok(0),
        }
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let entry = self.entry(id)?;
        match entry.kind {
            RecordKind::Chunk(_) => chunk_of_record(*id, &entry, self.read_record(*id, &entry)?),
            RecordKind::Frame { .. } => frame_member(*id, &entry, &*self.frame(*id, &entry)?),
        }
    }

    fn get_sealed(&self, id: &ChunkId) -> Result<Sealed> {
        let entry = self.entry(id)?;
        sealed_of_record(*id, &entry, self.read_record(*id, &entry)?)
    }

    fn has_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        Ok(self.lookup(ids)?.into_iter().map(|e| e.is_some()).collect())
    }

    fn delete(&self, ids: &[ChunkId]) -> Result<()> {
        if !self.writable {
            return Err(read_only(&self.shared.target));
        }
        let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); SHARDS];
        for id in ids {
            by_shard[shard_of(id)].push(id.to_hex());
        }
        let pool = &self.shared.pool;
        for (shard, keys) in by_shard.into_iter().enumerate() {
            for keys in keys.chunks(2048) {
                let op = WriteOp {
                    remove: keys.to_vec(),
                    ..WriteOp::default()
                };
                match pool.operate(&shard_object(shard), &op) {
                    Ok(()) => {}
                    Err(super::ffi::OpError::Rados(e)) if e.errno == libc::ENOENT => {}
                    Err(super::ffi::OpError::Rados(e)) => return Err((self.err())(e)),
                    Err(super::ffi::OpError::Compare(_)) => {}
                }
            }
        }
        Ok(())
    }

    fn list(&self, f: &mut dyn FnMut(ChunkId, u64) -> Result<()>) -> Result<()> {
        self.each_entry(&mut |id, e| f(id, u64::from(e.plain_len)))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(pack) = open {
            if !pack.entries.is_empty() {
                self.send(pack)?;
            }
        }
        let mut o = self
            .shared
            .outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while o.packs > 0 {
            o = self.shared.done.wait(o).unwrap_or_else(|p| p.into_inner());
        }
        match o.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn reclaim(&self) -> Result<ReclaimStats> {
        if !self.writable {
            return Err(read_only(&self.shared.target));
        }
        self.flush()?;
        let mut live = LiveRecords::new();
        self.each_entry(&mut |id, e| {
            note_live(&mut live, id, e);
            Ok(())
        })?;
        let mut stats = ReclaimStats::default();
        let mut rewrite = Vec::new();
        for (pack, size) in self.packs()? {
            let Some(records) = live.remove(&pack) else {
                if self
                    .shared
                    .pool
                    .remove(&pack_object(pack))
                    .map_err(self.err())?
                {
                    stats.packs_deleted += 1;
                    stats.bytes_freed += size;
                }
                continue;
            };
            let live_bytes: u64 = records.values().map(|m| u64::from(m[0].1.record_len)).sum();
            let mostly_dead = live_bytes * 2 < size;
            let small = (size as usize) < PACK_TARGET / 8;
            if mostly_dead || small {
                rewrite.push((pack, size, records, mostly_dead));
            }
        }
        // A lone small pack is left alone: rewriting it gains nothing.
        if rewrite.len() == 1 && !rewrite[0].3 {
            rewrite.clear();
        }
        let mut sealer = Sealer::new();
        let mut new = OpenPack::new();
        let mut old = Vec::new();
        for (pack, size, records, _) in rewrite {
            let data = self.whole_pack(pack, size)?;
            let mut sealed = Vec::new();
            let resealed = records.values().try_for_each(|members| {
                let e = members[0].1;
                let record = data
                    .get(e.offset as usize..e.end() as usize)
                    .ok_or_else(|| Error::PackTruncated {
                        pack,
                        chunk: members[0].0,
                        offset: e.offset,
                        end: e.end(),
                        size,
                    })?
                    .to_vec();
                sealed.extend(reseal_record(&mut sealer, members, record)?);
                Ok::<(), Error>(())
            });
            if let Err(err) = resealed {
                tracing::warn!(pack = %pack, %err, "not rewriting a pack holding a bad chunk");
                continue;
            }
            for s in &sealed {
                let offset = new.buf.len() as u64;
                let (_, entries) = append_record(&mut new.buf, new.id, offset, s);
                new.entries.extend(entries);
                if new.buf.len() >= PACK_TARGET {
                    let full = std::mem::replace(&mut new, OpenPack::new());
                    stats.bytes_freed = stats.bytes_freed.saturating_sub(full.buf.len() as u64);
                    write_pack(&self.shared, &full)?;
                }
            }
            old.push((pack, size));
        }
        if !new.entries.is_empty() {
            stats.bytes_freed = stats.bytes_freed.saturating_sub(new.buf.len() as u64);
            write_pack(&self.shared, &new)?;
        }
        // Only now that every moved chunk is indexed in its new pack.
        for (pack, size) in old {
            self.shared
                .pool
                .remove(&pack_object(pack))
                .map_err(self.err())?;
            stats.packs_rewritten += 1;
            stats.bytes_freed += size;
        }
        Ok(stats)
    }

    fn check(
        &self,
        verify_data: bool,
        progress: &dyn Progress,
        report: &mut dyn FnMut(BackendProblem),
    ) -> Result<u64> {
        self.flush()?;
        let packs = self.packs()?;
        let mut entries = Vec::new();
        self.each_entry(&mut |id, e| {
            entries.push((id, e));
            Ok(())
        })?;
        // The caller's phase counts plain bytes.
        let mut checked = 0;
        for (id, e) in entries {
            checked += 1;
            progress.advance(u64::from(e.plain_len));
            let problem = match packs.get(&e.pack) {
                None => Some(format!("pack object {} is missing", pack_object(e.pack))),
                Some(&size) if size < e.end() => Some(format!(
                    "pack object {} is {size} bytes; the record ends at {}",
                    pack_object(e.pack),
                    e.end()
                )),
                Some(_) if e.offset < PACK_HEADER_LEN => {
                    Some("record inside the pack header".into())
                }
                Some(_) if verify_data => self.get(&id).err().map(|err| err.to_string()),
                Some(_) => None,
            };
            if let Some(message) = problem {
                report(BackendProblem {
                    object: format!("chunk {id}"),
                    chunk: Some(id),
                    message,
                });
            }
        }
        Ok(checked)
    }

    fn stats(&self) -> Result<BackendStats> {
        let mut s = BackendStats::default();
        let mut records = HashSet::new();
        self.each_entry(&mut |_, e| {
            crate::backend::pack::note_totals(&mut s, &mut records, &e);
            Ok(())
        })?;
        s.disk_bytes = self.packs()?.values().sum();
        Ok(s)
    }
}
