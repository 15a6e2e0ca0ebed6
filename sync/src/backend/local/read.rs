//! Read path of the local backend: open pack handles, reading a record, and
//! a small cache of decompressed frames so reading a frame's members in
//! order (an export, a sequential file read) decompresses each frame once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::LocalBackend;
use crate::backend::pack::{
    cached_frame, chunk_of_record, frame_member, pack_path, sealed_of_record, IndexEntry,
    PlainFrame, RecordKind,
};
use crate::chunk::Sealed;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};

/// Open pack files kept for reading.
const READ_HANDLES: usize = 256;

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

    fn frame(&self, id: ChunkId, entry: &IndexEntry) -> Result<Arc<PlainFrame>> {
        cached_frame(&self.frames, id, entry, || self.read_record(id, entry))
    }

    /// The record of chunk `id` as stored (see `ChunkBackend::get_sealed`).
    pub(super) fn read_sealed(&self, id: ChunkId, entry: &IndexEntry) -> Result<Sealed> {
        sealed_of_record(id, entry, self.read_record(id, entry)?)
    }

    /// The plain bytes of chunk `id`, verified against the id.
    pub(super) fn read_chunk(&self, id: ChunkId, entry: &IndexEntry) -> Result<Vec<u8>> {
        match entry.kind {
            RecordKind::Chunk(_) => chunk_of_record(id, entry, self.read_record(id, entry)?),
            RecordKind::Frame { .. } => frame_member(id, entry, &*self.frame(id, entry)?),
        }
    }
}
