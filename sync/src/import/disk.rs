//! Importing a raw disk image.
//!
//! The image is read in fixed clusters, skipping the holes the file system
//! reports (SEEK_DATA/SEEK_HOLE) without reading them. All-zero clusters are
//! dropped like holes: a disk layer never stores zeros.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::cache::{Cache, CacheEntry, Stamp, DISK_KEY};
use super::pipeline;
use super::tree::next_data;
use super::{ImportStats, Job};
use crate::chunk::{is_zero, CLUSTER_SIZE};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{DiskBuilder, DiskRoot, Node, Root};

/// Clusters read per `pread`.
const READ_CLUSTERS: u64 = 64;

/// A virtual disk to import: its size, where it may hold data, and its
/// bytes. Raw files implement it here; other formats (qcow2) elsewhere.
pub trait DiskSource: Sync {
    /// Virtual size.
    fn size(&self) -> u64;
    /// The next region at or after `pos` that may hold data, as
    /// `(start, end)`; `None` when only holes remain.
    ///
    /// # Errors
    /// Read failures.
    fn next_data(&self, pos: u64) -> std::io::Result<Option<(u64, u64)>>;
    /// Fills `buf` from `offset`.
    ///
    /// # Errors
    /// Read failures.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// A raw image file.
pub(crate) struct RawImage {
    file: File,
    path: std::path::PathBuf,
    size: u64,
}

impl RawImage {
    pub(crate) fn open(path: &std::path::Path) -> Result<RawImage> {
        let file = File::open(path).ctx(path, "open")?;
        let meta = file.metadata().ctx(path, "stat")?;
        if !meta.is_file() {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: "a disk layer imports a regular image file".into(),
            });
        }
        Ok(RawImage {
            file,
            path: path.to_owned(),
            size: meta.len(),
        })
    }
}

impl DiskSource for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn next_data(&self, pos: u64) -> std::io::Result<Option<(u64, u64)>> {
        next_data(&self.file, &self.path, pos, self.size).map_err(std::io::Error::other)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// Imports the disk `source` (labelled `job.path`); `stamp` identifies an
/// unchanged raw file for the import cache. Returns the root node and the
/// new cache.
pub(super) fn import_disk(
    job: &Job<'_>,
    source: &dyn DiskSource,
    stamp: Option<Stamp>,
    stats: &mut ImportStats,
) -> Result<(Node, Cache)> {
    let (store, path, progress) = (job.store, job.path, job.progress);
    let size = source.size();
    stats.files = 1;
    stats.bytes = size;
    let mut new_cache = Cache::new();
    if let (Some(stamp), Some(CacheEntry::Disk { stamp: s, root })) =
        (stamp, job.old_cache.get(DISK_KEY))
    {
        if *s == stamp {
            if let Ok(node @ Node::Root(Root::Disk(_))) =
                crate::manifest::NodeSource::load(store, *root)
            {
                stats.bytes_cached = size;
                new_cache.insert(DISK_KEY.to_vec(), CacheEntry::Disk { stamp, root: *root });
                return Ok((node, new_cache));
            }
        }
    }
    progress.phase("import", Some(size));
    let cs = u64::from(CLUSTER_SIZE);
    let mut builder = DiskBuilder::new(size, CLUSTER_SIZE);
    let levels = builder.levels();
    let top = pipeline::run(
        store.backend(),
        job.threads,
        false,
        job.counters,
        progress,
        |sink| {
            let mut put = |node: Node| store.put_node(&node);
            let mut buf = vec![0u8; (READ_CLUSTERS * cs) as usize];
            let mut next_cluster = 0u64;
            let mut pos = 0u64;
            while let Some((start, end)) = source.next_data(pos).ctx(path, "read")? {
                let first = (start / cs).max(next_cluster);
                let last = end.div_ceil(cs);
                sink.skip((first * cs).saturating_sub(next_cluster * cs));
                let mut c = first;
                while c < last {
                    let n = (last - c).min(READ_CLUSTERS);
                    let off = c * cs;
                    let len = (n * cs).min(size - off) as usize;
                    source.read_at(off, &mut buf[..len]).ctx(path, "read")?;
                    sink.read(len as u64);
                    for (i, data) in buf[..len].chunks(cs as usize).enumerate() {
                        if is_zero(data) {
                            sink.skip(data.len() as u64);
                            continue;
                        }
                        let id = sink.add(data)?;
                        builder.push(c + i as u64, id, &mut put)?;
                    }
                    c += n;
                }
                next_cluster = last;
                pos = end.max(last * cs).min(size);
            }
            builder.finish(&mut put)
        },
    )?;
    let root = Node::Root(Root::Disk(DiskRoot {
        size,
        cluster_size: CLUSTER_SIZE,
        levels,
        top,
    }));
    if let Some(stamp) = stamp {
        let (root_id, _) = root.encode();
        new_cache.insert(
            DISK_KEY.to_vec(),
            CacheEntry::Disk {
                stamp,
                root: root_id,
            },
        );
    }
    Ok((root, new_cache))
}
