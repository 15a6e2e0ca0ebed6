//! Crash recovery: re-indexing records a crash left past a pack's committed
//! length. Each record is verified (every member hashed) before it is
//! indexed; the first record that does not verify ends the scan and the
//! tail from there is truncated.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rocksdb::{WriteBatch, WriteOptions};

use super::{db_err, LocalBackend};
use crate::backend::pack::{
    parse_pack_header, FrameHeader, IndexEntry, RecordHeader, RecordKind, FRAME_ENTRY_LEN,
    FRAME_HEADER_LEN, FRAME_MAGIC, PACK_HEADER_LEN, RECORD_HEADER_LEN, RECORD_MAGIC,
};
use crate::chunk::{unseal, unseal_frame, Compression};
use crate::error::{IoContext, Result};
use crate::id::{ChunkId, PackId};
use crate::store::cf;
use crate::store::keys::{CF_CHUNKS, CF_PACKS};

/// Reads the record at `offset` and returns its verified members (id and
/// index entry) and its length, or `None` if it is torn or corrupt.
fn read_verified(
    file: &File,
    pack: PackId,
    offset: u64,
) -> Option<(Vec<(ChunkId, IndexEntry)>, u64)> {
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, offset).ok()?;
    if magic == RECORD_MAGIC {
        let mut h = [0u8; RECORD_HEADER_LEN];
        file.read_exact_at(&mut h, offset).ok()?;
        let header = RecordHeader::parse(&h).ok()?;
        let mut data = vec![0u8; header.stored_len as usize];
        file.read_exact_at(&mut data, offset + RECORD_HEADER_LEN as u64)
            .ok()?;
        unseal(header.id, header.plain_len, header.compression, data).ok()?;
        let entry = IndexEntry {
            pack,
            offset,
            record_len: header.record_len() as u32,
            plain_len: header.plain_len,
            kind: RecordKind::Chunk(header.compression),
        };
        Some((vec![(header.id, entry)], header.record_len()))
    } else if magic == FRAME_MAGIC {
        let mut h = [0u8; FRAME_HEADER_LEN];
        file.read_exact_at(&mut h, offset).ok()?;
        let count = FrameHeader::count(&h).ok()?;
        let mut head = vec![0u8; FRAME_HEADER_LEN + count * FRAME_ENTRY_LEN];
        file.read_exact_at(&mut head, offset).ok()?;
        let header = FrameHeader::parse(&head).ok()?;
        let mut data = vec![0u8; header.stored_len as usize];
        file.read_exact_at(&mut data, offset + header.table_end() as u64)
            .ok()?;
        let plain = unseal_frame(header.plain_len, &data).ok()?;
        let mut members = Vec::with_capacity(count);
        for (id, at, len) in header.offsets() {
            let bytes = plain.get(at as usize..(at + len) as usize)?;
            unseal(id, len, Compression::None, bytes.to_vec()).ok()?;
            members.push((
                id,
                IndexEntry {
                    pack,
                    offset,
                    record_len: header.record_len() as u32,
                    plain_len: len,
                    kind: RecordKind::Frame { member_offset: at },
                },
            ));
        }
        Some((members, header.record_len()))
    } else {
        None
    }
}

impl LocalBackend {
    pub(super) fn committed_lengths(&self) -> Result<HashMap<PackId, u64>> {
        let cf = cf(&self.db, CF_PACKS)?;
        let mut out = HashMap::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err(&self.db_path, "list packs"))?;
            let (Ok(k), Ok(v)) = (<[u8; 8]>::try_from(&*k), <[u8; 8]>::try_from(&*v)) else {
                return Err(crate::Error::RecordCorrupt {
                    what: "packs entry".into(),
                    reason: "wrong key or value length".into(),
                });
            };
            out.insert(PackId(u64::from_be_bytes(k)), u64::from_be_bytes(v));
        }
        Ok(out)
    }

    /// Re-indexes records a crash left past a pack's committed length.
    pub(super) fn recover(&self) -> Result<()> {
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
            let Some((members, record_len)) = read_verified(&file, id, offset) else {
                break;
            };
            for (cid, entry) in members {
                if self.index_get(&cid)?.is_none() {
                    batch.put_cf(chunks, cid.as_bytes(), entry.encode());
                    recovered += 1;
                }
            }
            offset += record_len;
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
}
