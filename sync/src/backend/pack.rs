//! Pack file format and chunk index entries.
//!
//! A pack is an append-only file of chunk records:
//!
//! ```text
//! pack header   (32 bytes): "LAMPACK1" | pack id u64 LE | created secs u64 LE | reserved 8
//!
//! chunk record  header (48 bytes): "LMCK" | flags u8 | reserved 3 | plain len u32 LE
//!                                  | stored len u32 LE | chunk id 32
//!               data (stored len bytes: plain, or one zstd frame)
//!
//! frame record  header (16 bytes): "LMFR" | flags u8 (zstd) | reserved 1 | count u16 LE
//!                                  | plain len u32 LE (all members) | stored len u32 LE
//!               table (count × 36 bytes): chunk id 32 | plain len u32 LE
//!               data (stored len bytes): one zstd frame of the members, concatenated
//! ```
//!
//! A frame record holds consecutive chunks of a tree import compressed
//! together: zstd compresses text-like data in 64 KiB pieces 15–20 % worse
//! than with ~1 MiB of context (measured on real source code). Disk clusters
//! stay in chunk records so a random read decompresses 64 KiB, not 1 MiB.
//!
//! Records carry their own ids and lengths, so a pack can be re-indexed from
//! its bytes alone (crash recovery does this for a pack's unindexed tail) and
//! fsck can check each index entry against the record it points at.

use std::path::{Path, PathBuf};

use crate::chunk::{
    unseal, unseal_frame, Compression, Sealed, SealedChunk, SealedFrame, Sealer, MAX_CHUNK_BYTES,
};
use crate::error::Error;
use crate::id::{ChunkId, PackId, HASH_LEN};

/// Magic of a pack header.
pub const PACK_MAGIC: [u8; 8] = *b"LAMPACK1";
/// Size of the pack header.
pub const PACK_HEADER_LEN: u64 = 32;
/// Magic of a record header.
pub const RECORD_MAGIC: [u8; 4] = *b"LMCK";
/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 48;
/// Record flag: data is a zstd frame.
const FLAG_ZSTD: u8 = 1;
/// Magic of a frame record header.
pub const FRAME_MAGIC: [u8; 4] = *b"LMFR";
/// Size of a frame record header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Size of one frame table entry.
pub const FRAME_ENTRY_LEN: usize = 36;
/// Most members a frame holds (bounds the table a reader parses).
pub const FRAME_MAX_MEMBERS: usize = 1024;
/// Most plain bytes a frame holds (bounds what a reader decompresses).
pub const FRAME_MAX_PLAIN: usize = 4 * 1024 * 1024;

/// A pack is sealed once it reaches this size. 32 MiB keeps the file count
/// low (32 files per GiB) while a gc rewrite of a mostly dead pack stays
/// cheap.
pub const PACK_TARGET_BYTES: u64 = 32 * 1024 * 1024;

/// Encodes a pack header.
pub fn pack_header(id: PackId, created_secs: u64) -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[..8].copy_from_slice(&PACK_MAGIC);
    h[8..16].copy_from_slice(&id.0.to_le_bytes());
    h[16..24].copy_from_slice(&created_secs.to_le_bytes());
    h
}

/// Checks a pack header; returns the pack id it names.
pub fn parse_pack_header(bytes: &[u8]) -> Result<PackId, String> {
    if bytes.len() < PACK_HEADER_LEN as usize {
        return Err(format!("header is {} bytes, expected 32", bytes.len()));
    }
    if bytes[..8] != PACK_MAGIC {
        return Err("bad pack magic".into());
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[8..16]);
    Ok(PackId(u64::from_le_bytes(id)))
}

/// Header of one chunk record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Chunk id.
    pub id: ChunkId,
    /// Encoding of the data.
    pub compression: Compression,
    /// Plain length.
    pub plain_len: u32,
    /// Stored length.
    pub stored_len: u32,
}

impl RecordHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[..4].copy_from_slice(&RECORD_MAGIC);
        h[4] = match self.compression {
            Compression::None => 0,
            Compression::Zstd => FLAG_ZSTD,
        };
        h[8..12].copy_from_slice(&self.plain_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        h[16..48].copy_from_slice(self.id.as_bytes());
        h
    }

    /// Decodes and checks a header.
    pub fn parse(bytes: &[u8]) -> Result<RecordHeader, String> {
        let h: &[u8; RECORD_HEADER_LEN] = bytes
            .get(..RECORD_HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| "record header cut short".to_string())?;
        if h[..4] != RECORD_MAGIC {
            return Err("bad record magic".into());
        }
        let compression = match h[4] {
            0 => Compression::None,
            FLAG_ZSTD => Compression::Zstd,
            f => return Err(format!("unknown record flags {f:#x}")),
        };
        let plain_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let stored_len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if plain_len as usize > MAX_CHUNK_BYTES || stored_len as usize > MAX_CHUNK_BYTES {
            return Err(format!(
                "record lengths {plain_len}/{stored_len} exceed the chunk limit"
            ));
        }
        if compression == Compression::None && plain_len != stored_len {
            return Err("uncompressed record with differing lengths".into());
        }
        let mut id = [0u8; HASH_LEN];
        id.copy_from_slice(&h[16..48]);
        Ok(RecordHeader {
            id: ChunkId(id),
            compression,
            plain_len,
            stored_len,
        })
    }

    /// Bytes the record occupies in the pack, header included.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Header and member table of a frame record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// Members in order: id and plain length.
    pub members: Vec<(ChunkId, u32)>,
    /// Plain bytes of all members.
    pub plain_len: u32,
    /// Length of the compressed data.
    pub stored_len: u32,
}

impl FrameHeader {
    /// Encodes header and table.
    pub fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(self.table_end());
        h.extend_from_slice(&FRAME_MAGIC);
        h.push(FLAG_ZSTD);
        h.push(0);
        h.extend_from_slice(&(self.members.len() as u16).to_le_bytes());
        h.extend_from_slice(&self.plain_len.to_le_bytes());
        h.extend_from_slice(&self.stored_len.to_le_bytes());
        for (id, len) in &self.members {
            h.extend_from_slice(id.as_bytes());
            h.extend_from_slice(&len.to_le_bytes());
        }
        h
    }

    /// Member count of a frame whose first bytes are `bytes`, checking the
    /// fixed header (so a reader knows how much table to read).
    pub fn count(bytes: &[u8]) -> Result<usize, String> {
        let h = bytes
            .get(..FRAME_HEADER_LEN)
            .ok_or_else(|| "frame header cut short".to_string())?;
        if h[..4] != FRAME_MAGIC {
            return Err("bad frame magic".into());
        }
        if h[4] != FLAG_ZSTD {
            return Err(format!("unknown frame flags {:#x}", h[4]));
        }
        let count = usize::from(u16::from_le_bytes([h[6], h[7]]));
        if count == 0 || count > FRAME_MAX_MEMBERS {
            return Err(format!("frame of {count} members"));
        }
        Ok(count)
    }

    /// Decodes and checks header and table.
    pub fn parse(bytes: &[u8]) -> Result<FrameHeader, String> {
        let count = Self::count(bytes)?;
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let plain_len = u32_at(8);
        let stored_len = u32_at(12);
        if plain_len as usize > FRAME_MAX_PLAIN || stored_len as usize > MAX_CHUNK_BYTES {
            return Err(format!(
                "frame lengths {plain_len}/{stored_len} exceed the limit"
            ));
        }
        let table = bytes
            .get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + count * FRAME_ENTRY_LEN)
            .ok_or_else(|| "frame table cut short".to_string())?;
        let mut members = Vec::with_capacity(count);
        let mut sum = 0u64;
        for e in table.chunks_exact(FRAME_ENTRY_LEN) {
            let mut id = [0u8; HASH_LEN];
            id.copy_from_slice(&e[..HASH_LEN]);
            let len = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
            if len == 0 {
                return Err("empty frame member".into());
            }
            sum += u64::from(len);
            members.push((ChunkId(id), len));
        }
        if sum != u64::from(plain_len) {
            return Err(format!(
                "members add up to {sum} bytes, header says {plain_len}"
            ));
        }
        Ok(FrameHeader {
            members,
            plain_len,
            stored_len,
        })
    }

    /// Offset of the compressed data within the record.
    pub fn table_end(&self) -> usize {
        FRAME_HEADER_LEN + self.members.len() * FRAME_ENTRY_LEN
    }

    /// Bytes the record occupies in the pack.
    pub fn record_len(&self) -> u64 {
        self.table_end() as u64 + u64::from(self.stored_len)
    }

    /// Plain offset of each member within the frame.
    pub fn offsets(&self) -> impl Iterator<Item = (ChunkId, u32, u32)> + '_ {
        let mut at = 0u32;
        self.members.iter().map(move |&(id, len)| {
            let here = at;
            at += len;
            (id, here, len)
        })
    }
}

/// Where a chunk lives: the value of the `chunks` column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Pack holding the record.
    pub pack: PackId,
    /// Offset of the record in the pack.
    pub offset: u64,
    /// Bytes of the whole record (header, table, data).
    pub record_len: u32,
    /// Plain length of the chunk.
    pub plain_len: u32,
    /// What the record is.
    pub kind: RecordKind,
}

/// The kind of record an index entry points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A chunk record with this encoding.
    Chunk(Compression),
    /// A frame record; the chunk starts this many plain bytes into it.
    Frame {
        /// Plain offset of the member.
        member_offset: u32,
    },
}

/// Encoded size of an [`IndexEntry`].
pub const INDEX_ENTRY_LEN: usize = 29;

const KIND_PLAIN: u8 = 0;
const KIND_ZSTD: u8 = 1;
const KIND_FRAME: u8 = 2;

impl IndexEntry {
    /// Encodes the entry.
    pub fn encode(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut v = [0u8; INDEX_ENTRY_LEN];
        v[..8].copy_from_slice(&self.pack.0.to_be_bytes());
        v[8..16].copy_from_slice(&self.offset.to_be_bytes());
        v[16..20].copy_from_slice(&self.record_len.to_be_bytes());
        v[20..24].copy_from_slice(&self.plain_len.to_be_bytes());
        let (kind, member) = match self.kind {
            RecordKind::Chunk(Compression::None) => (KIND_PLAIN, 0),
            RecordKind::Chunk(Compression::Zstd) => (KIND_ZSTD, 0),
            RecordKind::Frame { member_offset } => (KIND_FRAME, member_offset),
        };
        v[24..28].copy_from_slice(&member.to_be_bytes());
        v[28] = kind;
        v
    }

    /// Decodes an entry.
    pub fn decode(v: &[u8]) -> Result<IndexEntry, String> {
        let v: &[u8; INDEX_ENTRY_LEN] = v.try_into().map_err(|_| {
            format!(
                "index entry is {} bytes, expected {INDEX_ENTRY_LEN}",
                v.len()
            )
        })?;
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let u32_at = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        let kind = match v[28] {
            KIND_PLAIN => RecordKind::Chunk(Compression::None),
            KIND_ZSTD => RecordKind::Chunk(Compression::Zstd),
            KIND_FRAME => RecordKind::Frame {
                member_offset: u32_at(24),
            },
            k => return Err(format!("unknown record kind {k}")),
        };
        Ok(IndexEntry {
            pack: PackId(u64_at(0)),
            offset: u64_at(8),
            record_len: u32_at(16),
            plain_len: u32_at(20),
            kind,
        })
    }

    /// End offset of the record.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.record_len)
    }
}

/// Path of pack `id` under the packs directory: `XX/XXXXXXXXXXXXXXXX.pack`,
/// sharded by the first byte so no directory grows too large.
pub fn pack_path(packs_dir: &Path, id: PackId) -> PathBuf {
    let name = id.to_string();
    packs_dir.join(&name[..2]).join(format!("{name}.pack"))
}

/// Parses a pack file name back to its id.
pub fn parse_pack_name(name: &str) -> Option<PackId> {
    let hex = name.strip_suffix(".pack")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(PackId)
}

/// A decompressed frame: its table and plain bytes.
pub(crate) struct PlainFrame {
    pub header: FrameHeader,
    pub plain: Vec<u8>,
}

/// A record that does not match its index entry.
pub(crate) fn record_corrupt(
    entry: &IndexEntry,
    id: ChunkId,
    reason: impl std::fmt::Display,
) -> Error {
    Error::PackCorrupt {
        pack: entry.pack,
        offset: entry.offset,
        reason: format!("chunk {id}: {reason}"),
    }
}

/// Checks that a chunk record matches its index entry; returns the
/// header and stored bytes.
pub(crate) fn parse_chunk_record(
    id: ChunkId,
    entry: &IndexEntry,
    mut record: Vec<u8>,
) -> crate::error::Result<(RecordHeader, Vec<u8>)> {
    let header = RecordHeader::parse(&record).map_err(|r| record_corrupt(entry, id, r))?;
    let expected = RecordKind::Chunk(header.compression);
    if header.id != id
        || header.plain_len != entry.plain_len
        || header.record_len() != u64::from(entry.record_len)
        || entry.kind != expected
    {
        return Err(record_corrupt(
            entry,
            id,
            format!(
                "record header (chunk {}, {} bytes) does not match the index entry",
                header.id, header.stored_len
            ),
        ));
    }
    Ok((header, record.split_off(RECORD_HEADER_LEN)))
}

/// Parses and decompresses a frame record.
pub(crate) fn parse_frame_record(
    id: ChunkId,
    entry: &IndexEntry,
    record: &[u8],
) -> crate::error::Result<PlainFrame> {
    let header = FrameHeader::parse(record).map_err(|r| record_corrupt(entry, id, r))?;
    if header.record_len() != u64::from(entry.record_len) {
        return Err(record_corrupt(
            entry,
            id,
            "frame length does not match the index entry",
        ));
    }
    let plain = unseal_frame(header.plain_len, &record[header.table_end()..]).map_err(|r| {
        Error::ChunkCorrupt {
            id,
            reason: format!(
                "{r} (frame in pack {}, offset {})",
                entry.pack, entry.offset
            ),
        }
    })?;
    Ok(PlainFrame { header, plain })
}

/// The record of chunk `id` as stored (see `ChunkBackend::get_sealed`).
pub(crate) fn sealed_of_record(
    id: ChunkId,
    entry: &IndexEntry,
    record: Vec<u8>,
) -> crate::error::Result<Sealed> {
    match entry.kind {
        RecordKind::Chunk(_) => {
            let (header, data) = parse_chunk_record(id, entry, record)?;
            Ok(Sealed::Chunk(SealedChunk {
                id,
                plain_len: header.plain_len,
                compression: header.compression,
                data,
            }))
        }
        RecordKind::Frame { .. } => {
            let header = FrameHeader::parse(&record).map_err(|r| record_corrupt(entry, id, r))?;
            if header.record_len() != u64::from(entry.record_len)
                || !header.members.iter().any(|(m, _)| *m == id)
            {
                return Err(record_corrupt(
                    entry,
                    id,
                    "frame does not match the index entry",
                ));
            }
            let data = record[header.table_end()..].to_vec();
            Ok(Sealed::Frame(SealedFrame {
                members: header.members,
                plain_len: header.plain_len,
                data,
            }))
        }
    }
}

fn located(entry: &IndexEntry) -> impl FnOnce(Error) -> Error + '_ {
    move |e| match e {
        Error::ChunkCorrupt { id, reason } => Error::ChunkCorrupt {
            id,
            reason: format!("{reason} (pack {}, offset {})", entry.pack, entry.offset),
        },
        other => other,
    }
}

/// The plain bytes of chunk `id` from its (non-frame) record, verified.
pub(crate) fn chunk_of_record(
    id: ChunkId,
    entry: &IndexEntry,
    record: Vec<u8>,
) -> crate::error::Result<Vec<u8>> {
    let (header, stored) = parse_chunk_record(id, entry, record)?;
    unseal(id, header.plain_len, header.compression, stored).map_err(located(entry))
}

/// The plain bytes of member `id` of a decompressed frame, verified.
pub(crate) fn frame_member(
    id: ChunkId,
    entry: &IndexEntry,
    frame: &PlainFrame,
) -> crate::error::Result<Vec<u8>> {
    let RecordKind::Frame { member_offset } = entry.kind else {
        return Err(record_corrupt(entry, id, "not a frame member"));
    };
    let member = frame
        .header
        .offsets()
        .find(|&(mid, off, len)| mid == id && off == member_offset && len == entry.plain_len);
    if member.is_none() {
        return Err(record_corrupt(
            entry,
            id,
            "not a member of the frame its index entry names",
        ));
    }
    let start = member_offset as usize;
    let plain = frame
        .plain
        .get(start..start + entry.plain_len as usize)
        .ok_or_else(|| record_corrupt(entry, id, "member past the end of the frame"))?
        .to_vec();
    unseal(id, entry.plain_len, Compression::None, plain).map_err(located(entry))
}

/// Appends the record of `sealed` at pack offset `offset` to `buf` and
/// returns the record's length and its members' index entries.
pub(crate) fn append_record(
    buf: &mut Vec<u8>,
    pack: PackId,
    offset: u64,
    sealed: &Sealed,
) -> (u64, Vec<(ChunkId, IndexEntry)>) {
    match sealed {
        Sealed::Chunk(c) => {
            let header = RecordHeader {
                id: c.id,
                compression: c.compression,
                plain_len: c.plain_len,
                stored_len: c.data.len() as u32,
            };
            buf.extend_from_slice(&header.encode());
            buf.extend_from_slice(&c.data);
            let len = header.record_len();
            let entry = IndexEntry {
                pack,
                offset,
                record_len: len as u32,
                plain_len: c.plain_len,
                kind: RecordKind::Chunk(c.compression),
            };
            (len, vec![(c.id, entry)])
        }
        Sealed::Frame(f) => {
            let header = FrameHeader {
                members: f.members.clone(),
                plain_len: f.plain_len,
                stored_len: f.data.len() as u32,
            };
            buf.extend_from_slice(&header.encode());
            buf.extend_from_slice(&f.data);
            let len = header.record_len();
            let entries = header
                .offsets()
                .map(|(id, member_offset, plain_len)| {
                    let entry = IndexEntry {
                        pack,
                        offset,
                        record_len: len as u32,
                        plain_len,
                        kind: RecordKind::Frame { member_offset },
                    };
                    (id, entry)
                })
                .collect();
            (len, entries)
        }
    }
}

/// Re-seals the live members of one record for a rewrite.
pub(crate) fn reseal_record(
    sealer: &mut Sealer,
    members: &[(ChunkId, IndexEntry)],
    record: Vec<u8>,
) -> crate::error::Result<Vec<Sealed>> {
    let Some(&(id0, e0)) = members.first() else {
        return Ok(Vec::new());
    };
    match e0.kind {
        RecordKind::Chunk(_) => {
            let (header, stored) = parse_chunk_record(id0, &e0, record)?;
            unseal(id0, header.plain_len, header.compression, stored.clone())?;
            Ok(vec![Sealed::Chunk(SealedChunk {
                id: id0,
                plain_len: header.plain_len,
                compression: header.compression,
                data: stored,
            })])
        }
        RecordKind::Frame { .. } => {
            let frame = parse_frame_record(id0, &e0, &record)?;
            let mut live = Vec::with_capacity(members.len());
            for (id, e) in members {
                let RecordKind::Frame { member_offset } = e.kind else {
                    continue;
                };
                let start = member_offset as usize;
                let bytes = frame
                    .plain
                    .get(start..start + e.plain_len as usize)
                    .unwrap_or_default()
                    .to_vec();
                let plain = unseal(*id, e.plain_len, Compression::None, bytes)?;
                live.push((*id, plain));
            }
            if live.len() == frame.header.members.len() {
                // Every member is live: keep the compressed bytes as they are.
                return Ok(vec![Sealed::Frame(SealedFrame {
                    members: frame.header.members.clone(),
                    plain_len: frame.header.plain_len,
                    data: record[frame.header.table_end()..].to_vec(),
                })]);
            }
            Ok(sealer.seal_many(&live))
        }
    }
}

/// Recently decompressed frames, by (pack, record offset), oldest first.
pub(crate) type FrameCache =
    std::collections::VecDeque<((PackId, u64), std::sync::Arc<PlainFrame>)>;

/// Decompressed frames kept per backend (each at most `FRAME_MAX_PLAIN`).
pub(crate) const FRAME_CACHE: usize = 8;

/// The frame `entry` points at, from `cache` or read with `read` and
/// decompressed, so reading a frame's members in order (an export, a
/// sequential file read) decompresses it once.
pub(crate) fn cached_frame(
    cache: &std::sync::Mutex<FrameCache>,
    id: ChunkId,
    entry: &IndexEntry,
    read: impl FnOnce() -> crate::error::Result<Vec<u8>>,
) -> crate::error::Result<std::sync::Arc<PlainFrame>> {
    let key = (entry.pack, entry.offset);
    {
        let cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, f)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(f.clone());
        }
    }
    let record = read()?;
    let frame = std::sync::Arc::new(parse_frame_record(id, entry, &record)?);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= FRAME_CACHE {
        cache.pop_front();
    }
    cache.push_back((key, frame.clone()));
    Ok(frame)
}

/// Live records of packs: pack → record offset → its live members.
pub(crate) type LiveRecords =
    std::collections::HashMap<PackId, std::collections::BTreeMap<u64, Vec<(ChunkId, IndexEntry)>>>;

/// Files index entry `e` of chunk `id` under its pack and record.
pub(crate) fn note_live(live: &mut LiveRecords, id: ChunkId, e: IndexEntry) {
    live.entry(e.pack)
        .or_default()
        .entry(e.offset)
        .or_default()
        .push((id, e));
}

/// Adds index entry `e` to a backend's totals (a record shared by the
/// members of a frame is counted once; `records` remembers which).
pub(crate) fn note_totals(
    s: &mut super::BackendStats,
    records: &mut std::collections::HashSet<(PackId, u64)>,
    e: &IndexEntry,
) {
    s.chunks += 1;
    s.plain_bytes += u64::from(e.plain_len);
    if records.insert((e.pack, e.offset)) {
        s.stored_bytes += u64::from(e.record_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn index_entry_round_trips(pack in any::<u64>(), offset in any::<u64>(),
                                   len in any::<u32>(), plain in any::<u32>(), kind in 0u8..3, member in any::<u32>()) {
            let kind = match kind {
                0 => RecordKind::Chunk(Compression::None),
                1 => RecordKind::Chunk(Compression::Zstd),
                _ => RecordKind::Frame { member_offset: member },
            };
            let e = IndexEntry { pack: PackId(pack), offset, record_len: len, plain_len: plain, kind };
            prop_assert_eq!(IndexEntry::decode(&e.encode()).unwrap(), e);
        }

        #[test]
        fn frame_header_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = FrameHeader::parse(&bytes);
        }

        #[test]
        fn record_header_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RecordHeader::parse(&bytes);
        }
    }

    #[test]
    fn record_header_round_trips() {
        let h = RecordHeader {
            id: ChunkId::of(b"x"),
            compression: Compression::Zstd,
            plain_len: 1000,
            stored_len: 10,
        };
        assert_eq!(RecordHeader::parse(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(RecordHeader::parse(&bad).is_err());
    }

    #[test]
    fn frame_header_round_trips() {
        let f = FrameHeader {
            members: vec![(ChunkId::of(b"a"), 10), (ChunkId::of(b"b"), 20)],
            plain_len: 30,
            stored_len: 7,
        };
        let bytes = f.encode();
        assert_eq!(bytes.len(), f.table_end());
        assert_eq!(FrameHeader::parse(&bytes).unwrap(), f);
        let offsets: Vec<u32> = f.offsets().map(|(_, o, _)| o).collect();
        assert_eq!(offsets, vec![0, 10]);
        let mut bad = bytes.clone();
        bad[8] = 99; // plain length no longer matches the members
        assert!(FrameHeader::parse(&bad).is_err());
    }

    #[test]
    fn pack_names_round_trip() {
        let id = PackId(0x0123_4567_89ab_cdef);
        let p = pack_path(Path::new("/s/packs"), id);
        assert_eq!(p, Path::new("/s/packs/01/0123456789abcdef.pack"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_pack_name(name), Some(id));
        assert_eq!(parse_pack_name("x.pack"), None);
    }
}
