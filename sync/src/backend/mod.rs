//! Chunk backends: where chunk bytes live.
//!
//! Callers (import, export, fsck, gc) see only [`ChunkBackend`]; the local
//! pack-file backend is the embedded default and a Ceph backend can sit
//! behind the same trait. Every `get` verifies the bytes against the id, so
//! no caller ever sees unverified data.

mod local;
pub(crate) mod pack;

pub use local::LocalBackend;

use crate::chunk::Sealed;
use crate::error::Result;
use crate::id::ChunkId;

/// Totals of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Chunks indexed.
    pub chunks: u64,
    /// Plain bytes of the indexed chunks.
    pub plain_bytes: u64,
    /// Bytes of the records holding them, as stored (after compression).
    pub stored_bytes: u64,
    /// Bytes occupied on disk, including dead space awaiting gc.
    pub disk_bytes: u64,
}

/// A problem a backend's self-check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendProblem {
    /// What is broken: `chunk <id>` or `pack <id>`.
    pub object: String,
    /// The chunk affected, when one is.
    pub chunk: Option<ChunkId>,
    /// What is wrong.
    pub message: String,
}

/// What a backend's space reclamation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimStats {
    /// Pack files deleted (no live chunk left).
    pub packs_deleted: u64,
    /// Pack files rewritten to drop dead chunks.
    pub packs_rewritten: u64,
    /// Disk bytes released.
    pub bytes_freed: u64,
}

/// Storage for chunks, keyed by id.
pub trait ChunkBackend: Send + Sync {
    /// Stores a sealed chunk or frame. Returns how many chunks were new
    /// (members already stored are not indexed again). Not durable until
    /// [`ChunkBackend::flush`] returns.
    ///
    /// # Errors
    /// Write failures; read-only stores.
    fn put(&self, sealed: Sealed) -> Result<u32>;

    /// The plain bytes of a chunk, verified against its id.
    ///
    /// # Errors
    /// [`crate::Error::ChunkMissing`], [`crate::Error::ChunkCorrupt`], pack
    /// errors, I/O errors.
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>>;

    /// The record holding chunk `id` as stored: compressed or plain, alone
    /// or inside a frame with its neighbours, so it can be copied to
    /// another store without recompressing. Not verified here: whoever
    /// receives it verifies every member against its id.
    ///
    /// # Errors
    /// As [`ChunkBackend::get`].
    fn get_sealed(&self, id: &ChunkId) -> Result<Sealed>;

    /// For each id, whether it is stored.
    ///
    /// # Errors
    /// Index read failures.
    fn has_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>>;

    /// Whether `id` is stored.
    ///
    /// # Errors
    /// Index read failures.
    fn has(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.has_many(std::slice::from_ref(id))?.first() == Some(&true))
    }

    /// Removes chunks from the index. Their space is released by
    /// [`ChunkBackend::reclaim`].
    ///
    /// # Errors
    /// Write failures.
    fn delete(&self, ids: &[ChunkId]) -> Result<()>;

    /// Calls `f(id, plain length)` for every stored chunk.
    ///
    /// # Errors
    /// Index read failures, or an error returned by `f`.
    fn list(&self, f: &mut dyn FnMut(ChunkId, u64) -> Result<()>) -> Result<()>;

    /// Makes every `put` so far durable.
    ///
    /// # Errors
    /// Write or sync failures.
    fn flush(&self) -> Result<()>;

    /// Releases the space of deleted chunks.
    ///
    /// # Errors
    /// I/O failures (the store stays consistent).
    fn reclaim(&self) -> Result<ReclaimStats>;

    /// Checks the backend's own structures (and, with `verify_data`, every
    /// chunk's bytes), calling `report` for each problem.
    ///
    /// # Errors
    /// Failures that stop the check itself.
    fn check(
        &self,
        verify_data: bool,
        progress: &dyn crate::Progress,
        report: &mut dyn FnMut(BackendProblem),
    ) -> Result<u64>;

    /// Totals.
    ///
    /// # Errors
    /// Index read failures.
    fn stats(&self) -> Result<BackendStats>;
}
