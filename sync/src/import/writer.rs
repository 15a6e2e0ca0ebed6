//! Building tree versions from something other than one directory walk —
//! the FUSE view's commit merges pending changes into a lower version. File
//! data goes through the same chunk pipeline as an import (deduplicated,
//! compressed on worker threads, framed); nodes are validated and stored.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::pipeline::{self, ChunkCounters, ChunkSink};
use super::tree::{make_content, read_file};
use super::ImportStats;
use crate::error::{Error, IoContext, Result};
use crate::id::ManifestId;
use crate::manifest::{Content, DirNode, Extent, Meta, Node, Root};
use crate::progress::Progress;
use crate::store::Store;

/// Stores the parts of new tree versions; see [`Store::write_tree`].
pub struct TreeWriter<'a, 'b> {
    store: &'a Store,
    sink: &'a mut ChunkSink<'b>,
    buf: Vec<u8>,
}

impl TreeWriter<'_, '_> {
    /// The store being written (to load existing nodes).
    pub fn store(&self) -> &Store {
        self.store
    }

    /// Chunks the regular file at `path` (holes stay holes) and returns its
    /// size and content.
    ///
    /// # Errors
    /// Unreadable file, store failures.
    pub fn file(&mut self, path: &Path) -> Result<(u64, Content)> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ctx(path, "stat")?;
        let dense = m.blocks().saturating_mul(512) >= m.len();
        let buf = std::mem::take(&mut self.buf);
        let (size, content, buf) = read_file(self.store, path, dense, buf, self.sink)?;
        self.buf = buf;
        Ok((size, content))
    }

    /// Packs extents that are already stored into a file's content.
    ///
    /// # Errors
    /// Store failures.
    pub fn content(&mut self, extents: Vec<Extent>) -> Result<Content> {
        make_content(self.store, extents)
    }

    /// Validates and stores a directory node.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a node that breaks an invariant (unsorted
    /// or duplicate names, sizes that don't add up), store failures.
    pub fn dir(&mut self, node: DirNode) -> Result<ManifestId> {
        let node = Node::Dir(node);
        node.validate()
            .map_err(|reason| Error::InvalidInput(format!("directory node: {reason}")))?;
        self.store.put_node(&node)
    }

    /// Stores the root of a tree version.
    ///
    /// # Errors
    /// Invalid metadata, store failures.
    pub fn root(&mut self, meta: Meta, dir: ManifestId) -> Result<ManifestId> {
        let node = Node::Root(Root::Tree { meta, dir });
        node.validate()
            .map_err(|reason| Error::InvalidInput(format!("root node: {reason}")))?;
        self.store.put_node(&node)
    }
}

impl Store {
    /// Runs `build` with a [`TreeWriter`] whose file data is stored by worker
    /// threads, then makes everything it stored durable (the packs synced
    /// and indexed). Versions naming the result are committed by the caller,
    /// e.g. with [`crate::Batch::put_version`].
    ///
    /// # Errors
    /// A store not opened for writing, and whatever `build` returns.
    pub fn write_tree<T>(
        &self,
        progress: &dyn Progress,
        build: impl FnOnce(&mut TreeWriter<'_, '_>) -> Result<T>,
    ) -> Result<(T, ImportStats)> {
        self.require_write()?;
        let _guard = self.import_guard()?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let counters = ChunkCounters::default();
        let value = pipeline::run(self.backend(), threads, true, &counters, progress, |sink| {
            let mut w = TreeWriter {
                store: self,
                sink,
                buf: Vec::new(),
            };
            build(&mut w)
        })?;
        self.backend.flush()?;
        let stats = ImportStats {
            chunks: counters.chunks.load(Ordering::Relaxed),
            bytes_read: counters.bytes_read.load(Ordering::Relaxed),
            chunks_new: counters.chunks_new.load(Ordering::Relaxed),
            bytes_new: counters.bytes_new.load(Ordering::Relaxed),
            stored_new: counters.stored_new.load(Ordering::Relaxed),
            ..ImportStats::default()
        };
        Ok((value, stats))
    }
}
