//! Read path of the local backend: open pack handles, reading a record, and
//! a small cache of decompressed frames so reading a frame's members in
//! order (an export, a sequential file read) decompresses each frame once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::LocalBackend;
use crate::backend::pack::{
    pack_path, FrameHeader, IndexEntry, RecordHeader, RecordKind, RECORD_HEADER_LEN,
};
use crate::chunk::{unseal, unseal_frame, Sealed, SealedChunk, SealedFrame};
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};

/// Open pack files kept for reading.
const READ_HANDLES: usize = 256;
/// Decompressed frames kept (each at most `FRAME_MAX_PLAIN`).
pub(super) const FRAME_CACHE: usize = 8;

/// A decompressed frame: its table and plain bytes.
pub(super) struct PlainFrame {
    pub header: FrameHeader,
    pub plain: Vec<u8>,
}

impl LocalBackend {
    pub(super) fn reader(&self, pack: PackId) -> Result<Arc<File>> {
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

    /// The bytes of the record `entry` points at (for chunk `id`).
    pub(super) fn read_record(&self, id: ChunkId, entry: &IndexEntry) -> Result<Vec<u8>> {
        let file = self.reader(entry.pack)?;
        let mut buf = vec![0u8; entry.record_len as usize];
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
        Ok(buf)
    }

    fn corrupt(entry: &IndexEntry, id: ChunkId, reason: impl std::fmt::Display) -> Error {
        Error::PackCorrupt {
            pack: entry.pack,
            offset: entry.offset,
            reason: format!("chunk {id}: {reason}"),
        }
    }

    /// Checks that a chunk record matches its index entry; returns the
    /// header and stored bytes.
    pub(super) fn parse_chunk_record(
        id: ChunkId,
        entry: &IndexEntry,
        mut record: Vec<u8>,
    ) -> Result<(RecordHeader, Vec<u8>)> {
        let header = RecordHeader::parse(&record).map_err(|r| Self::corrupt(entry, id, r))?;
        let expected = RecordKind::Chunk(header.compression);
        if header.id != id
            || header.plain_len != entry.plain_len
            || header.record_len() != u64::from(entry.record_len)
            || entry.kind != expected
        {
            return Err(Self::corrupt(
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
    pub(super) fn parse_frame_record(
        id: ChunkId,
        entry: &IndexEntry,
        record: &[u8],
    ) -> Result<PlainFrame> {
        let header = FrameHeader::parse(record).map_err(|r| Self::corrupt(entry, id, r))?;
        if header.record_len() != u64::from(entry.record_len) {
            return Err(Self::corrupt(
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

    fn frame(&self, id: ChunkId, entry: &IndexEntry) -> Result<Arc<PlainFrame>> {
        let key = (entry.pack, entry.offset);
        {
            let cache = self.frames.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, f)) = cache.iter().find(|(k, _)| *k == key) {
                return Ok(f.clone());
            }
        }
        let record = self.read_record(id, entry)?;
        let frame = Arc::new(Self::parse_frame_record(id, entry, &record)?);
        let mut cache = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= FRAME_CACHE {
            cache.pop_front();
        }
        cache.push_back((key, frame.clone()));
        Ok(frame)
    }

    /// The record of chunk `id` as stored (see `ChunkBackend::get_sealed`).
    pub(super) fn read_sealed(&self, id: ChunkId, entry: &IndexEntry) -> Result<Sealed> {
        let record = self.read_record(id, entry)?;
        match entry.kind {
            RecordKind::Chunk(_) => {
                let (header, data) = Self::parse_chunk_record(id, entry, record)?;
                Ok(Sealed::Chunk(SealedChunk {
                    id,
                    plain_len: header.plain_len,
                    compression: header.compression,
                    data,
                }))
            }
            RecordKind::Frame { .. } => {
                let header =
                    FrameHeader::parse(&record).map_err(|r| Self::corrupt(entry, id, r))?;
                if header.record_len() != u64::from(entry.record_len)
                    || !header.members.iter().any(|(m, _)| *m == id)
                {
                    return Err(Self::corrupt(
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

    /// The plain bytes of chunk `id`, verified against the id.
    pub(super) fn read_chunk(&self, id: ChunkId, entry: &IndexEntry) -> Result<Vec<u8>> {
        let located = |e: Error| match e {
            Error::ChunkCorrupt { id, reason } => Error::ChunkCorrupt {
                id,
                reason: format!("{reason} (pack {}, offset {})", entry.pack, entry.offset),
            },
            other => other,
        };
        match entry.kind {
            RecordKind::Chunk(_) => {
                let record = self.read_record(id, entry)?;
                let (header, stored) = Self::parse_chunk_record(id, entry, record)?;
                unseal(id, header.plain_len, header.compression, stored).map_err(located)
            }
            RecordKind::Frame { member_offset } => {
                let frame = self.frame(id, entry)?;
                let member = frame.header.offsets().find(|&(mid, off, len)| {
                    mid == id && off == member_offset && len == entry.plain_len
                });
                if member.is_none() {
                    return Err(Self::corrupt(
                        entry,
                        id,
                        "not a member of the frame its index entry names",
                    ));
                }
                let start = member_offset as usize;
                let plain = frame
                    .plain
                    .get(start..start + entry.plain_len as usize)
                    .ok_or_else(|| Self::corrupt(entry, id, "member past the end of the frame"))?
                    .to_vec();
                unseal(id, entry.plain_len, crate::chunk::Compression::None, plain).map_err(located)
            }
        }
    }
}
