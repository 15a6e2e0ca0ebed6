//! Pack file format and chunk index entries.
//!
//! A pack is an append-only file of chunk records:
//!
//! ```text
//! pack header  (32 bytes): "LAMPACK1" | pack id u64 LE | created secs u64 LE | reserved 8
//! record header (48 bytes): "LMCK" | flags u8 | reserved 3 | plain len u32 LE
//!                           | stored len u32 LE | chunk id 32
//! record data   (stored len bytes)
//! ```
//!
//! Records carry their own id and lengths, so a pack can be re-indexed from
//! its bytes alone (crash recovery does this for a pack's unindexed tail) and
//! fsck can check each index entry against the record it points at.

use std::path::{Path, PathBuf};

use crate::chunk::{Compression, MAX_CHUNK_BYTES};
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

/// Where a chunk lives: the value of the `chunks` column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Pack holding the record.
    pub pack: PackId,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Stored length of the data.
    pub stored_len: u32,
    /// Plain length of the data.
    pub plain_len: u32,
    /// Encoding of the data.
    pub compression: Compression,
}

/// Encoded size of an [`IndexEntry`].
pub const INDEX_ENTRY_LEN: usize = 25;

impl IndexEntry {
    /// Encodes the entry.
    pub fn encode(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut v = [0u8; INDEX_ENTRY_LEN];
        v[..8].copy_from_slice(&self.pack.0.to_be_bytes());
        v[8..16].copy_from_slice(&self.offset.to_be_bytes());
        v[16..20].copy_from_slice(&self.stored_len.to_be_bytes());
        v[20..24].copy_from_slice(&self.plain_len.to_be_bytes());
        v[24] = match self.compression {
            Compression::None => 0,
            Compression::Zstd => FLAG_ZSTD,
        };
        v
    }

    /// Decodes an entry.
    pub fn decode(v: &[u8]) -> Result<IndexEntry, String> {
        let v: &[u8; INDEX_ENTRY_LEN] = v
            .try_into()
            .map_err(|_| format!("index entry is {} bytes, expected 25", v.len()))?;
        let u64_at = |i: usize| {
            u64::from_be_bytes([
                v[i],
                v[i + 1],
                v[i + 2],
                v[i + 3],
                v[i + 4],
                v[i + 5],
                v[i + 6],
                v[i + 7],
            ])
        };
        let u32_at = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        let compression = match v[24] {
            0 => Compression::None,
            FLAG_ZSTD => Compression::Zstd,
            f => return Err(format!("unknown index flags {f:#x}")),
        };
        Ok(IndexEntry {
            pack: PackId(u64_at(0)),
            offset: u64_at(8),
            stored_len: u32_at(16),
            plain_len: u32_at(20),
            compression,
        })
    }

    /// The record header this entry expects at its offset.
    pub fn expected_header(&self, id: ChunkId) -> RecordHeader {
        RecordHeader {
            id,
            compression: self.compression,
            plain_len: self.plain_len,
            stored_len: self.stored_len,
        }
    }

    /// End offset of the record.
    pub fn end(&self) -> u64 {
        self.offset + RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn index_entry_round_trips(pack in any::<u64>(), offset in any::<u64>(),
                                   stored in any::<u32>(), plain in any::<u32>(), z in any::<bool>()) {
            let e = IndexEntry {
                pack: PackId(pack), offset, stored_len: stored, plain_len: plain,
                compression: if z { Compression::Zstd } else { Compression::None },
            };
            prop_assert_eq!(IndexEntry::decode(&e.encode()).unwrap(), e);
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
    fn pack_names_round_trip() {
        let id = PackId(0x0123_4567_89ab_cdef);
        let p = pack_path(Path::new("/s/packs"), id);
        assert_eq!(p, Path::new("/s/packs/01/0123456789abcdef.pack"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_pack_name(name), Some(id));
        assert_eq!(parse_pack_name("x.pack"), None);
    }
}
