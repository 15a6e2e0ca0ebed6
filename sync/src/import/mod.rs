//! Importing a directory or a raw disk image as a new version of a layer.
//!
//! Order of durable effects, which is what makes a killed import harmless:
//! chunks and manifest nodes are written to packs (unreferenced, so at worst
//! garbage for gc); the packs are synced and indexed; then one synced
//! catalog batch writes the version, moves the ref by compare-and-swap,
//! journals the move and replaces the layer's import cache. Until that batch
//! the ref is untouched; a re-run finds the chunks already stored.
//!
//! The import cache remembers, per layer and path, the inode, size, mtime
//! and ctime of each file with the content it produced, so an unchanged file
//! is not read again (restic's parent-snapshot shortcut).

mod cache;
mod disk;
mod pipeline;
mod tree;
mod writer;

use std::path::Path;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::id::{ManifestId, VersionId};
use crate::layer::LayerFormat;
use crate::progress::{NoProgress, Progress};
use crate::store::Store;
use crate::version::Version;

pub(crate) use cache::{cache_entry_chunks, CacheEntry};
pub use disk::DiskSource;
pub use tree::read_meta;
pub(crate) use tree::OVERLAY_OPAQUE;
pub use writer::TreeWriter;

/// How to import.
pub struct ImportOptions<'a> {
    /// Version message; defaults to `import PATH`.
    pub message: Option<String>,
    /// Version author.
    pub author: String,
    /// Progress sink.
    pub progress: &'a dyn Progress,
    /// Storing worker threads (0: one per core).
    pub threads: usize,
}

impl Default for ImportOptions<'_> {
    fn default() -> Self {
        Self {
            message: None,
            author: "lamina".into(),
            progress: &NoProgress,
            threads: 0,
        }
    }
}

/// Figures of an import.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportStats {
    /// Regular files (tree) or 1 (disk).
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks, devices, fifos, sockets.
    pub others: u64,
    /// Logical bytes of file data (disk: virtual size).
    pub bytes: u64,
    /// Bytes skipped thanks to the import cache.
    pub bytes_cached: u64,
    /// Bytes of file data actually read from the source.
    pub bytes_read: u64,
    /// Data chunks seen.
    pub chunks: u64,
    /// Chunks the store lacked.
    pub chunks_new: u64,
    /// Plain bytes of the new chunks.
    pub bytes_new: u64,
    /// Stored (compressed) bytes of the new chunks.
    pub stored_new: u64,
}

/// Result of an import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// Layer name.
    pub layer: String,
    /// The new version, or the head if nothing changed.
    pub version: VersionId,
    /// The previous head.
    pub parent: Option<VersionId>,
    /// Root manifest.
    pub root: ManifestId,
    /// True when the content equals the head's: no version was created.
    pub unchanged: bool,
    /// Figures.
    pub stats: ImportStats,
}

/// Builds a version's root node (and the new import cache) for a job.
type BuildFn<'a> =
    dyn FnMut(&Job<'_>, &mut ImportStats) -> Result<(crate::manifest::Node, cache::Cache)> + 'a;

/// What both kinds of import work with.
struct Job<'a> {
    store: &'a Store,
    path: &'a Path,
    old_cache: &'a cache::Cache,
    threads: usize,
    counters: &'a pipeline::ChunkCounters,
    progress: &'a dyn Progress,
}

impl Store {
    /// Imports `path` as a new version of layer `name`: a directory for a
    /// tree layer, a raw image file for a disk layer.
    ///
    /// # Errors
    /// Unknown layer, a path of the wrong type for the layer's format,
    /// unreadable files, store failures, a concurrent head move.
    pub fn import(
        &self,
        name: &str,
        path: &Path,
        opts: &ImportOptions<'_>,
    ) -> Result<ImportReport> {
        self.require_write()?;
        let layer = self.layer(name)?;
        let meta = std::fs::metadata(path).ctx(path, "stat import source")?;
        let format_error = |reason: &str| Error::LayerFormat {
            name: name.to_owned(),
            format: layer.format.as_str(),
            reason: format!("{}: {reason}", path.display()),
        };
        match layer.format {
            LayerFormat::Tree if !meta.is_dir() => {
                return Err(format_error("a tree layer imports a directory"))
            }
            LayerFormat::Disk if meta.is_dir() => {
                return Err(format_error(
                    "a disk layer imports an image file, not a directory",
                ))
            }
            _ => {}
        }
        match layer.format {
            LayerFormat::Tree => self.import_with(&layer, path, opts, &mut |job, stats| {
                tree::import_tree(job, stats)
            }),
            LayerFormat::Disk => {
                let image = disk::RawImage::open(path)?;
                let stamp = Some(cache::Stamp::of(&meta));
                self.import_with(&layer, path, opts, &mut |job, stats| {
                    disk::import_disk(job, &image, stamp, stats)
                })
            }
        }
    }

    /// Imports a virtual disk read through `source` (a qcow2 chain, say) as
    /// a new version of disk layer `name`. `label` names the source in
    /// messages.
    ///
    /// # Errors
    /// Unknown layer, a tree layer, read failures, store failures.
    pub fn import_disk_source(
        &self,
        name: &str,
        source: &dyn DiskSource,
        label: &Path,
        opts: &ImportOptions<'_>,
    ) -> Result<ImportReport> {
        self.require_write()?;
        let layer = self.layer(name)?;
        if layer.format != LayerFormat::Disk {
            return Err(Error::LayerFormat {
                name: name.to_owned(),
                format: layer.format.as_str(),
                reason: format!("{}: a tree layer imports a directory", label.display()),
            });
        }
        self.import_with(&layer, label, opts, &mut |job, stats| {
            disk::import_disk(job, source, None, stats)
        })
    }

    fn import_with(
        &self,
        layer: &crate::Layer,
        path: &Path,
        opts: &ImportOptions<'_>,
        build: &mut BuildFn<'_>,
    ) -> Result<ImportReport> {
        let name = layer.name.as_str();
        // Keep gc of this process from sweeping chunks written below before
        // the version referencing them is committed.
        let _guard = self.import_guard()?;
        let head = self.head(layer)?;
        let old_cache = cache::load(self, layer)?;
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            opts.threads
        };
        let counters = pipeline::ChunkCounters::default();
        let mut stats = ImportStats::default();
        let job = Job {
            store: self,
            path,
            old_cache: &old_cache,
            threads,
            counters: &counters,
            progress: opts.progress,
        };
        let (root, new_cache) = build(&job, &mut stats)?;
        stats.chunks = counters.chunks.load(Ordering::Relaxed);
        stats.bytes_read = counters.bytes_read.load(Ordering::Relaxed);
        stats.chunks_new = counters.chunks_new.load(Ordering::Relaxed);
        stats.bytes_new = counters.bytes_new.load(Ordering::Relaxed);
        stats.stored_new = counters.stored_new.load(Ordering::Relaxed);
        let root_id = self.put_node(&root)?;
        opts.progress.phase("commit", None);
        self.backend.flush()?;
        crate::failpoint::hit("import-flushed");
        let unchanged = match head {
            Some(h) => self.version(h)?.root == root_id,
            None => false,
        };
        let version = if let (true, Some(h)) = (unchanged, head) {
            if new_cache != old_cache {
                let mut batch = self.batch()?;
                cache::store(self, layer, new_cache, &mut batch)?;
                self.commit(batch)?;
            }
            h
        } else {
            let v = Version {
                layer: layer.id,
                parents: head.into_iter().collect(),
                time_ns: crate::now_ns(),
                author: opts.author.clone(),
                message: opts
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("import {}", path.display())),
                root: root_id,
            };
            let mut new_cache = Some(new_cache);
            self.commit_version(layer, head, &v, "import", &mut |batch| {
                cache::store(self, layer, new_cache.take().unwrap_or_default(), batch)
            })?
        };
        Ok(ImportReport {
            layer: name.to_owned(),
            version,
            parent: head.filter(|h| *h != version),
            root: root_id,
            unchanged,
            stats,
        })
    }
}
