//! A disk layer version from the store, readable as a block device.
//!
//! Clusters map to chunks through the version's radix (nodes are cached).
//! A random 4 KiB read of a base cluster would otherwise fetch, decompress
//! and hash a whole 64 KiB chunk every time, so clusters are copied into a
//! local cache file the first time they are read (DESIGN §5's "local chunk
//! cache"): `STORE/cache/<version>.raw` (sparse, the disk's size) with a
//! presence bitmap beside it. Cached clusters are verified against their
//! chunk id the first time this process reads them, so a cache damaged by a
//! crash or by hand is refetched, never served. The cache is shared by every
//! disk on the same base version.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use lamina_sync::manifest::{DiskNode, DiskRoot, Node, NodeSource, RADIX_BITS};
use lamina_sync::{ChunkId, ManifestId, Store, VersionId};

use crate::error::{Error, IoContext, Result};
use crate::source::{check_range, Alloc, ReadAt, Runs};

/// A disk layer version.
pub struct LayerImage {
    store: Arc<Store>,
    version: VersionId,
    root: DiskRoot,
    cs: u64,
    nodes: Mutex<HashMap<ManifestId, Arc<DiskNode>>>,
    cache: Option<ClusterCache>,
}

struct ClusterCache {
    data: File,
    data_path: PathBuf,
    present_file: File,
    bits: Mutex<CacheBits>,
}

struct CacheBits {
    present: Vec<u64>,
    verified: Vec<u64>,
}

fn bit(v: &[u64], c: u64) -> bool {
    v.get((c / 64) as usize)
        .is_some_and(|w| w & (1 << (c % 64)) != 0)
}

fn set_bit(v: &mut [u64], c: u64) {
    if let Some(w) = v.get_mut((c / 64) as usize) {
        *w |= 1 << (c % 64);
    }
}

impl ClusterCache {
    fn open(dir: &Path, version: VersionId, size: u64, clusters: u64) -> Result<ClusterCache> {
        std::fs::create_dir_all(dir).ctx(dir, "create cache directory")?;
        let data_path = dir.join(format!("{version}.raw"));
        let present_path = dir.join(format!("{version}.present"));
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .ctx(&data_path, "open cluster cache")?;
        if data.metadata().ctx(&data_path, "stat cluster cache")?.len() != size {
            data.set_len(size).ctx(&data_path, "size cluster cache")?;
        }
        let present_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&present_path)
            .ctx(&present_path, "open cluster cache")?;
        let words = clusters.div_ceil(64) as usize;
        let mut raw = vec![0u8; words * 8];
        let have = present_file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        if have > 0 {
            let n = have.min(raw.len());
            present_file
                .read_exact_at(&mut raw[..n], 0)
                .ctx(&present_path, "read cluster cache")?;
        }
        let present = raw
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        Ok(ClusterCache {
            data,
            data_path,
            present_file,
            bits: Mutex::new(CacheBits {
                present,
                verified: vec![0; words],
            }),
        })
    }

    fn bits(&self) -> MutexGuard<'_, CacheBits> {
        // Bits only ever get set; a poisoned lock holds nothing half-done.
        self.bits.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LayerImage {
    /// Opens version `version` (of a disk layer) of `store`. With `cache_dir`
    /// clusters are cached there.
    ///
    /// # Errors
    /// A version that is not a disk version, store failures.
    pub fn open(
        store: Arc<Store>,
        version: VersionId,
        cache_dir: Option<&Path>,
    ) -> Result<LayerImage> {
        let root = match store.root_of(version)? {
            lamina_sync::manifest::Root::Disk(d) => d,
            lamina_sync::manifest::Root::Tree { .. } => {
                return Err(Error::InvalidInput(format!(
                    "version {} is a tree, not a disk",
                    version.short()
                )))
            }
        };
        let cs = u64::from(root.cluster_size);
        let cache = match cache_dir {
            Some(dir) => Some(ClusterCache::open(
                dir,
                version,
                root.size,
                root.clusters(),
            )?),
            None => None,
        };
        Ok(LayerImage {
            store,
            version,
            root,
            cs,
            nodes: Mutex::new(HashMap::new()),
            cache,
        })
    }

    /// The version.
    pub fn version(&self) -> VersionId {
        self.version
    }

    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// The version's manifest root.
    pub fn root(&self) -> &DiskRoot {
        &self.root
    }

    fn node(&self, id: ManifestId) -> Result<Arc<DiskNode>> {
        if let Some(n) = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(n.clone());
        }
        let node = match self.with_refresh(|| self.store.load(id))? {
            Node::Disk(d) => Arc::new(d),
            _ => {
                return Err(Error::Store(lamina_sync::Error::ManifestCorrupt {
                    id,
                    reason: "expected a disk radix node".into(),
                }))
            }
        };
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, node.clone());
        Ok(node)
    }

    /// Runs a store read, and once more after catching up with the catalog
    /// if it failed (gc may have moved the chunk since this reader opened).
    fn with_refresh<T>(&self, f: impl Fn() -> lamina_sync::Result<T>) -> Result<T> {
        match f() {
            Ok(v) => Ok(v),
            Err(first) => {
                if self.store.refresh().is_err() {
                    return Err(first.into());
                }
                f().map_err(Into::into)
            }
        }
    }

    /// The chunk holding cluster `c`, if any.
    pub fn chunk_of(&self, c: u64) -> Result<Option<ChunkId>> {
        let Some(top) = self.root.top else {
            return Ok(None);
        };
        if c >= self.root.clusters() {
            return Ok(None);
        }
        let mut id = top;
        for level in (0..self.root.levels).rev() {
            let node = self.node(id)?;
            let idx = ((c >> (RADIX_BITS * u32::from(level))) & ((1 << RADIX_BITS) - 1)) as u16;
            let Ok(i) = node.slots.binary_search_by_key(&idx, |s| s.index) else {
                return Ok(None);
            };
            let slot = node.slots[i].id;
            if level == 0 {
                return Ok(Some(ChunkId(slot)));
            }
            id = ManifestId(slot);
        }
        Ok(None)
    }

    /// The bytes of cluster `c` that hold chunk `id`, from the cache or the
    /// store (then cached).
    fn cluster(&self, c: u64, id: ChunkId, within: u64, buf: &mut [u8]) -> Result<()> {
        let len = self.root.cluster_len(c);
        if let Some(cache) = &self.cache {
            let (present, verified) = {
                let b = cache.bits();
                (bit(&b.present, c), bit(&b.verified, c))
            };
            if present && verified {
                return cache
                    .data
                    .read_exact_at(buf, c * self.cs + within)
                    .ctx(&cache.data_path, "read cluster cache");
            }
            if present {
                let mut whole = vec![0u8; len as usize];
                cache
                    .data
                    .read_exact_at(&mut whole, c * self.cs)
                    .ctx(&cache.data_path, "read cluster cache")?;
                if ChunkId::of(&whole) == id {
                    set_bit(&mut cache.bits().verified, c);
                    let s = within as usize;
                    buf.copy_from_slice(&whole[s..s + buf.len()]);
                    return Ok(());
                }
                tracing::warn!(cluster = c, chunk = %id, "cached cluster does not match its chunk; refetching");
            }
        }
        let data = self.with_refresh(|| self.store.chunk(&id))?;
        if data.len() as u64 != len {
            return Err(Error::Store(lamina_sync::Error::ChunkCorrupt {
                id,
                reason: format!("{} bytes, cluster {c} needs {len}", data.len()),
            }));
        }
        if let Some(cache) = &self.cache {
            cache
                .data
                .write_all_at(&data, c * self.cs)
                .ctx(&cache.data_path, "write cluster cache")?;
            let mut b = cache.bits();
            set_bit(&mut b.present, c);
            set_bit(&mut b.verified, c);
            let wi = (c / 64) as usize;
            if let Some(w) = b.present.get(wi) {
                cache
                    .present_file
                    .write_all_at(&w.to_le_bytes(), wi as u64 * 8)
                    .ctx(&cache.data_path, "write cluster cache")?;
            }
        }
        let s = within as usize;
        buf.copy_from_slice(&data[s..s + buf.len()]);
        Ok(())
    }

    /// Loads clusters of the range into the cache (NBD `CACHE`).
    ///
    /// # Errors
    /// Store failures.
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        if self.cache.is_none() || len == 0 {
            return Ok(());
        }
        let end = (offset + len).min(self.root.size);
        let mut one = [0u8; 1];
        let mut c = offset / self.cs;
        while c * self.cs < end {
            if let Some(id) = self.chunk_of(c)? {
                self.cluster(c, id, 0, &mut one)?;
            }
            c += 1;
        }
        Ok(())
    }
}

impl ReadAt for LayerImage {
    fn size(&self) -> u64 {
        self.root.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.root.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / self.cs;
        let last = (offset + buf.len() as u64 - 1) / self.cs;
        let ids: Vec<Option<ChunkId>> = (first..=last)
            .map(|c| self.chunk_of(c))
            .collect::<Result<_>>()?;
        // Clusters this process has already verified in the cache are read
        // straight from it, a whole run per pread.
        let ready: Vec<bool> = match &self.cache {
            Some(cache) => {
                let b = cache.bits();
                (first..=last)
                    .map(|c| bit(&b.present, c) && bit(&b.verified, c))
                    .collect()
            }
            None => vec![false; ids.len()],
        };
        let end = offset + buf.len() as u64;
        let mut i = 0usize;
        while i < ids.len() {
            let c = first + i as u64;
            let kind = (ids[i].is_some(), ready[i]);
            let mut run = 1usize;
            if kind != (true, false) {
                while i + run < ids.len() && (ids[i + run].is_some(), ready[i + run]) == kind {
                    run += 1;
                }
            }
            let from = offset.max(c * self.cs);
            let to = end.min((c + run as u64) * self.cs);
            let span = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match (ids[i], kind.1) {
                (None, _) => span.fill(0),
                (Some(_), true) => {
                    if let Some(cache) = &self.cache {
                        cache
                            .data
                            .read_exact_at(span, from)
                            .ctx(&cache.data_path, "read cluster cache")?;
                    }
                }
                (Some(id), false) => self.cluster(c, id, from - c * self.cs, span)?,
            }
            i += run;
        }
        Ok(())
    }

    fn status(&self, offset: u64, len: u64) -> Result<Runs> {
        check_range(offset, len, self.root.size)?;
        let end = offset + len;
        let mut runs: Runs = Vec::new();
        let mut pos = offset;
        // At most 4096 clusters (one radix leaf's worth) per call.
        let limit = (offset / self.cs + 4096) * self.cs;
        while pos < end.min(limit) {
            let c = pos / self.cs;
            let n = ((c + 1) * self.cs).min(end) - pos;
            let a = if self.chunk_of(c)?.is_some() {
                Alloc::Data
            } else {
                Alloc::Hole
            };
            match runs.last_mut() {
                Some(last) if last.1 == a => last.0 += n,
                _ => runs.push((n, a)),
            }
            pos += n;
        }
        Ok(runs)
    }
}
