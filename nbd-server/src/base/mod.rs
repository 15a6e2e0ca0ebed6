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
//!
//! A **streamed** base ([`LayerImage::open_streamed`]) has its manifest
//! nodes in `STORE/stream/` and its data on a remote: a read of a cluster
//! not cached yet fetches the chunks of the whole read (one request),
//! verifies them and caches them; the prefetcher (`crate::stream`) fills
//! the rest in the background.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use lamina_sync::manifest::{DiskNode, DiskRoot, Node, NodeSource, Root, RADIX_BITS};
use lamina_sync::remote::{RemoteChunks, StreamNodes, StreamedVersion};
use lamina_sync::{ChunkId, ManifestId, Store, VersionId};

use crate::error::{Error, IoContext, Result};
use crate::source::{check_range, Alloc, ReadAt, Runs};
use cache::{bit, set_bit, ClusterCache};

mod cache;

/// Where a base's nodes and chunks come from.
enum Src {
    /// The store holds the version.
    Local(Arc<Store>),
    /// The version streams from a remote.
    Remote(Box<Remote>),
}

struct Remote {
    meta: StreamedVersion,
    nodes: StreamNodes,
    chunks: RemoteChunks,
}

/// A disk layer version.
pub struct LayerImage {
    src: Src,
    version: VersionId,
    root: DiskRoot,
    cs: u64,
    nodes: Mutex<HashMap<ManifestId, Arc<DiskNode>>>,
    cache: Option<ClusterCache>,
    /// Demand reads of a streamed base waiting on the remote: the
    /// prefetcher stands back while there are any.
    waiting: std::sync::atomic::AtomicUsize,
    /// The boot profile being recorded (a streamed base's first session).
    recorder: Option<crate::stream::Recorder>,
    /// Set when the cluster cache's file system ran out of space: reads
    /// are served from what was fetched without keeping it.
    cache_full: std::sync::atomic::AtomicBool,
}

/// Counts a demand read waiting on the remote while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn disk_root(version: VersionId, root: Root) -> Result<DiskRoot> {
    match root {
        Root::Disk(d) => Ok(d),
        Root::Tree { .. } => Err(Error::InvalidInput(format!(
            "version {} is a tree, not a disk",
            version.short()
        ))),
    }
}

/// Clusters a demand read of a streamed base also fetches after the ones
/// it needs (boot reads run forward): 1 MiB of 64 KiB clusters.
const READAHEAD: u64 = 16;

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
        let root = disk_root(version, store.root_of(version)?)?;
        LayerImage::with(Src::Local(store), version, root, cache_dir)
    }

    /// Opens version `version` streamed from a remote (what `lamina disk
    /// create --stream` fetched into `STORE/stream/`), caching its clusters
    /// in `cache_dir`.
    ///
    /// # Errors
    /// A version that was not streamed, an unknown remote, I/O failures.
    pub fn open_streamed(
        store: &Store,
        version: VersionId,
        cache_dir: &Path,
    ) -> Result<LayerImage> {
        let (meta, nodes) = lamina_sync::remote::load_streamed(store.root(), version)?
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "version {} was not streamed into this store (STORE/stream/ has no record of it)",
                    version.short()
                ))
            })?;
        let root = disk_root(version, nodes.root(meta.root)?)?;
        let chunks = RemoteChunks::new(store, &meta.remote, &meta.layer)?;
        let clusters = root.clusters();
        let mut image = LayerImage::with(
            Src::Remote(Box::new(Remote {
                meta,
                nodes,
                chunks,
            })),
            version,
            root,
            Some(cache_dir),
        )?;
        image.recorder = crate::stream::Recorder::start(store.root(), version, clusters);
        Ok(image)
    }

    fn with(
        src: Src,
        version: VersionId,
        root: DiskRoot,
        cache_dir: Option<&Path>,
    ) -> Result<LayerImage> {
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
            src,
            version,
            root,
            cs,
            nodes: Mutex::new(HashMap::new()),
            cache,
            waiting: std::sync::atomic::AtomicUsize::new(0),
            cache_full: std::sync::atomic::AtomicBool::new(false),
            recorder: None,
        })
    }

    /// The remote a streamed base streams from, and what was streamed.
    pub fn streamed(&self) -> Option<&StreamedVersion> {
        match &self.src {
            Src::Local(_) => None,
            Src::Remote(r) => Some(&r.meta),
        }
    }

    /// What a streamed base fetched so far.
    pub fn fetch_counters(&self) -> Option<lamina_sync::remote::FetchCounters> {
        match &self.src {
            Src::Local(_) => None,
            Src::Remote(r) => Some(r.chunks.counters()),
        }
    }

    /// Demand reads waiting on the remote now.
    pub fn demand_waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the cluster cache ran out of space since the last
    /// [`LayerImage::clear_cache_full`].
    pub fn cache_full(&self) -> bool {
        self.cache_full.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lets the cache be tried again (space may have been freed).
    pub fn clear_cache_full(&self) {
        self.cache_full
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Clusters in the cache, and clusters holding data (not holes) of
    /// the version.
    pub fn cached_clusters(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| {
            c.bits()
                .present
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum()
        })
    }

    /// Whether cluster `c` is in the cache.
    pub fn is_cached(&self, c: u64) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|cache| bit(&cache.bits().present, c))
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
        let loaded = match &self.src {
            Src::Local(store) => self.with_refresh(store, || store.load(id))?,
            Src::Remote(r) => r.nodes.load(id)?,
        };
        let node = match loaded {
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
    fn with_refresh<T>(&self, store: &Store, f: impl Fn() -> lamina_sync::Result<T>) -> Result<T> {
        match f() {
            Ok(v) => Ok(v),
            Err(first) => {
                if store.refresh().is_err() {
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
        let data = match &self.src {
            Src::Local(store) => self.with_refresh(store, || store.chunk(&id))?,
            Src::Remote(_) => {
                let mut got = self.fetch(&[(c, id)], true)?;
                got.pop().map(|(_, d)| d).unwrap_or_default()
            }
        };
        if matches!(self.src, Src::Local(_)) {
            self.keep(c, id, &data)?;
        }
        let s = within as usize;
        buf.copy_from_slice(&data[s..s + buf.len()]);
        Ok(())
    }

    /// Checks `data` as cluster `c` (chunk `id`) and writes it into the
    /// cache, if any.
    fn keep(&self, c: u64, id: ChunkId, data: &[u8]) -> Result<()> {
        let len = self.root.cluster_len(c);
        if data.len() as u64 != len {
            return Err(Error::Store(lamina_sync::Error::ChunkCorrupt {
                id,
                reason: format!("{} bytes, cluster {c} needs {len}", data.len()),
            }));
        }
        if let Some(cache) = &self.cache {
            // A full file system costs the cache, never the read: the data
            // in hand answers it, and the cluster stays uncached (fetched
            // again if read again).
            let full = |e: &std::io::Error| {
                let full = [nix::errno::Errno::ENOSPC, nix::errno::Errno::EDQUOT]
                    .iter()
                    .any(|n| e.raw_os_error() == Some(*n as i32));
                if full
                    && !self
                        .cache_full
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(cache = %cache.data_path.display(), "the cluster cache is full: serving clusters without keeping them");
                }
                full
            };
            match cache.data.write_all_at(data, c * self.cs) {
                Ok(()) => {}
                Err(e) if full(&e) => return Ok(()),
                Err(e) => return Err(Error::io(&cache.data_path, "write cluster cache", e)),
            }
            let mut b = cache.bits();
            let wi = (c / 64) as usize;
            let Some(w) = b.present.get(wi).map(|w| w | (1 << (c % 64))) else {
                return Ok(());
            };
            // The bit is set only once it is on disk.
            match cache
                .present_file
                .write_all_at(&w.to_le_bytes(), wi as u64 * 8)
            {
                Ok(()) => {}
                Err(e) if full(&e) => return Ok(()),
                Err(e) => return Err(Error::io(&cache.data_path, "write cluster cache", e)),
            }
            set_bit(&mut b.present, c);
            set_bit(&mut b.verified, c);
        }
        Ok(())
    }

    /// Fetches clusters `want` (cluster, chunk) of a streamed base from its
    /// remote in one request, verified, and caches them; `demand` for a
    /// guest's read (the prefetcher stands back meanwhile). Returns the
    /// data in the order asked.
    ///
    /// # Errors
    /// The remote unreachable or refusing (the read fails with EIO; a
    /// later read tries again), a chunk that does not fit its cluster.
    pub(crate) fn fetch(
        &self,
        want: &[(u64, ChunkId)],
        demand: bool,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let Src::Remote(r) = &self.src else {
            return Err(Error::InvalidInput("not a streamed base".into()));
        };
        if want.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<ChunkId> = want.iter().map(|(_, id)| *id).collect();
        let _w = demand.then(|| Waiting::new(&self.waiting));
        let got = r.chunks.fetch(&ids)?;
        let mut out = Vec::with_capacity(want.len());
        for (c, id) in want {
            // Present: `fetch` answers every id asked for.
            let data = got.get(id).cloned().unwrap_or_default();
            self.keep(*c, *id, &data)?;
            out.push((*c, data));
        }
        Ok(out)
    }

    /// Fetches, in one request, the clusters of `first..=last` (chunks
    /// `ids`) a streamed base has not cached, and up to [`READAHEAD`]
    /// uncached clusters after them.
    fn fetch_missing(&self, first: u64, last: u64, ids: &[Option<ChunkId>]) -> Result<()> {
        let mut want: Vec<(u64, ChunkId)> = (first..=last)
            .zip(ids)
            .filter_map(|(c, id)| id.map(|id| (c, id)))
            .filter(|(c, _)| !self.is_cached(*c))
            .collect();
        if want.is_empty() {
            return Ok(());
        }
        let mut c = last + 1;
        let end = (last + 1 + READAHEAD).min(self.root.clusters());
        while c < end {
            if let Some(id) = self.chunk_of(c)? {
                if !self.is_cached(c) {
                    want.push((c, id));
                }
            }
            c += 1;
        }
        self.fetch(&want, true)?;
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
        if matches!(self.src, Src::Remote(_)) {
            if let Some(r) = &self.recorder {
                r.touch(first, last);
            }
            self.fetch_missing(first, last, &ids)?;
        }
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

    /// Local when every cluster of the range is in the cache and verified
    /// by this process (holes count as not local: finding them takes the
    /// manifest).
    fn is_local(&self, offset: u64, len: u64) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        if len == 0 || check_range(offset, len, self.root.size).is_err() {
            return false;
        }
        // Never waits: a thread filling the cache holds the bits briefly,
        // and the slow path is right then.
        let Ok(b) = cache.bits.try_lock() else {
            return false;
        };
        (offset / self.cs..=(offset + len - 1) / self.cs)
            .all(|c| bit(&b.present, c) && bit(&b.verified, c))
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
