//! Reading lower layers: directory nodes, file data and hard-link groups,
//! straight from the store's chunks, with small caches.
//!
//! Every failure is logged here with what failed (node or chunk id) and
//! answered as `EIO`, so a corrupt chunk fails the one file that needs it
//! and the mount stays up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use lamina_sync::manifest::{
    for_each_extent, Content, DirNode, EntryKind, Extent, Node, NodeSource,
};
use lamina_sync::{ChunkId, Store};
use nix::errno::Errno;

/// Decoded directory nodes kept.
const DIR_CACHE: usize = 16_384;
/// Bytes of chunk data kept.
const CHUNK_CACHE_BYTES: usize = 64 << 20;

/// A lower file's extents with their start offsets.
#[derive(Debug)]
pub(crate) struct FileData {
    /// File size.
    pub size: u64,
    starts: Vec<u64>,
    extents: Vec<Extent>,
}

impl FileData {
    /// Bytes held in data extents (what `st_blocks` counts).
    pub fn allocated(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| matches!(e, Extent::Data { .. }))
            .map(Extent::len)
            .sum()
    }

    /// Index of the extent holding `offset` (< size).
    fn index(&self, offset: u64) -> usize {
        self.starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1)
    }

    /// Start of the first data at or after `offset`, if any.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let i = self.index(offset);
        (i..self.extents.len())
            .find(|&j| matches!(self.extents[j], Extent::Data { .. }))
            .map(|j| self.starts[j].max(offset))
    }

    /// Start of the first hole at or after `offset` (the size counts as
    /// one).
    pub fn next_hole(&self, offset: u64) -> u64 {
        if offset >= self.size {
            return self.size;
        }
        let i = self.index(offset);
        (i..self.extents.len())
            .find(|&j| matches!(self.extents[j], Extent::Hole { .. }))
            .map_or(self.size, |j| self.starts[j].max(offset))
    }

    /// The data extents, with offsets.
    pub fn data_extents(&self) -> impl Iterator<Item = (u64, ChunkId, u32)> + '_ {
        self.starts
            .iter()
            .zip(&self.extents)
            .filter_map(|(&off, e)| match e {
                Extent::Data { chunk, len } => Some((off, *chunk, *len)),
                Extent::Hole { .. } => None,
            })
    }
}

/// Members of each hard-link group of one lower version: group key (the
/// first member's path) → every member's path.
pub(crate) type LinkMap = HashMap<Vec<u8>, Vec<Vec<u8>>>;

struct ChunkCache {
    map: HashMap<ChunkId, Arc<Vec<u8>>>,
    order: VecDeque<ChunkId>,
    bytes: usize,
}

/// Where chunks the store lacks come from: the remotes of the mount's
/// streamed slots (each chunk is verified against its id as it arrives).
pub(crate) type Remotes = Arc<Vec<lamina_sync::remote::RemoteChunks>>;

/// Access to the lower layers of a mount.
pub(crate) struct Lower {
    store: Arc<Store>,
    remotes: Remotes,
    dirs: Mutex<HashMap<lamina_sync::ManifestId, Arc<DirNode>>>,
    chunks: Mutex<ChunkCache>,
    links: Mutex<HashMap<lamina_sync::ManifestId, Arc<LinkMap>>>,
}

impl Lower {
    pub fn new(store: Arc<Store>, remotes: Remotes) -> Lower {
        Lower {
            store,
            remotes,
            dirs: Mutex::new(HashMap::new()),
            chunks: Mutex::new(ChunkCache {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
            links: Mutex::new(HashMap::new()),
        }
    }

    /// Runs a store read, once more after catching up with the catalog if
    /// it failed (gc may have moved the data since the mount opened).
    fn with_refresh<T>(
        &self,
        mut f: impl FnMut() -> lamina_sync::Result<T>,
    ) -> lamina_sync::Result<T> {
        match f() {
            Ok(v) => Ok(v),
            Err(first) => {
                if self.store.refresh().is_err() {
                    return Err(first);
                }
                f()
            }
        }
    }

    /// A directory node.
    pub fn dir(&self, id: lamina_sync::ManifestId) -> Result<Arc<DirNode>, Errno> {
        if let Some(d) = lock(&self.dirs).get(&id) {
            return Ok(d.clone());
        }
        let node = self.with_refresh(|| self.store.load(id)).map_err(|e| {
            tracing::error!(node = %id, error = %e, "cannot read a lower directory");
            Errno::EIO
        })?;
        let Node::Dir(d) = node else {
            tracing::error!(node = %id, "lower node is not a directory");
            return Err(Errno::EIO);
        };
        let d = Arc::new(d);
        let mut dirs = lock(&self.dirs);
        if dirs.len() >= DIR_CACHE {
            dirs.clear();
        }
        dirs.insert(id, d.clone());
        Ok(d)
    }

    /// The extents of a lower file.
    pub fn file_data(&self, content: &Content, size: u64) -> Result<Arc<FileData>, Errno> {
        let mut starts = Vec::new();
        let mut extents = Vec::new();
        self.with_refresh(|| {
            starts.clear();
            extents.clear();
            for_each_extent(&*self.store, content, size, |off, e| {
                starts.push(off);
                extents.push(*e);
                Ok(())
            })
        })
        .map_err(|e| {
            tracing::error!(size, error = %e, "cannot read a lower file's extents");
            Errno::EIO
        })?;
        Ok(Arc::new(FileData {
            size,
            starts,
            extents,
        }))
    }

    /// The verified bytes of chunk `id` (`len` long), read from the store
    /// without going through the chunk cache (for one-pass readers).
    pub fn fetch(&self, id: ChunkId, len: u32) -> Result<Vec<u8>, Errno> {
        let data = match self.with_refresh(|| self.store.chunk(&id)) {
            Ok(d) => d,
            Err(lamina_sync::Error::ChunkMissing { .. }) if !self.remotes.is_empty() => {
                self.fetch_remote(id)?
            }
            Err(e) => {
                tracing::error!(chunk = %id, error = %e, "cannot read a lower chunk");
                return Err(Errno::EIO);
            }
        };
        if data.len() != len as usize {
            tracing::error!(chunk = %id, len = data.len(), expected = len, "lower chunk has the wrong length");
            return Err(Errno::EIO);
        }
        Ok(data)
    }

    /// A chunk of a streamed slot, from the first remote that has it; a
    /// remote out of reach fails the read with EIO (within the fetcher's
    /// retries), never hangs it.
    fn fetch_remote(&self, id: ChunkId) -> Result<Vec<u8>, Errno> {
        let mut last = None;
        for r in self.remotes.iter() {
            match r.fetch(&[id]) {
                Ok(mut got) => {
                    if let Some(d) = got.remove(&id) {
                        return Ok(d);
                    }
                }
                Err(e) => last = Some(e),
            }
        }
        tracing::error!(chunk = %id, error = ?last, "cannot fetch a streamed chunk");
        Err(Errno::EIO)
    }

    /// The bytes of a data chunk, checked against the length the manifest
    /// gives.
    pub fn chunk(&self, id: ChunkId, len: u32) -> Result<Arc<Vec<u8>>, Errno> {
        if let Some(c) = lock(&self.chunks).map.get(&id) {
            return Ok(c.clone());
        }
        let data = Arc::new(self.fetch(id, len)?);
        let mut c = lock(&self.chunks);
        while c.bytes + data.len() > CHUNK_CACHE_BYTES {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(d) = c.map.remove(&old) {
                c.bytes -= d.len();
            }
        }
        c.bytes += data.len();
        c.order.push_back(id);
        c.map.insert(id, data.clone());
        Ok(data)
    }

    /// Reads up to `len` bytes at `offset` of a lower file.
    pub fn read(&self, f: &FileData, offset: u64, len: u32) -> Result<Vec<u8>, Errno> {
        if offset >= f.size {
            return Ok(Vec::new());
        }
        let end = f.size.min(offset + u64::from(len));
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut i = f.index(offset);
        let mut pos = offset;
        while pos < end && i < f.extents.len() {
            let start = f.starts[i];
            let e = f.extents[i];
            let stop = (start + e.len()).min(end);
            let from = (pos - start) as usize;
            let to = (stop - start) as usize;
            match e {
                Extent::Data { chunk, len } => {
                    let data = self.chunk(chunk, len)?;
                    out.extend_from_slice(&data[from..to]);
                }
                Extent::Hole { .. } => out.resize(out.len() + (to - from), 0),
            }
            pos = stop;
            i += 1;
        }
        Ok(out)
    }

    /// The hard-link groups of the tree under root directory `root`
    /// (walked once per version, on first need).
    pub fn links(&self, root: lamina_sync::ManifestId) -> Result<Arc<LinkMap>, Errno> {
        if let Some(m) = lock(&self.links).get(&root) {
            return Ok(m.clone());
        }
        let mut map = LinkMap::new();
        let mut stack = vec![(root, Vec::new())];
        while let Some((id, path)) = stack.pop() {
            let dir = self.dir(id)?;
            for e in &dir.entries {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                match &e.kind {
                    EntryKind::Dir { node, .. } => stack.push((*node, p)),
                    EntryKind::File {
                        link: Some(group), ..
                    } => map.entry(group.clone()).or_default().push(p),
                    _ => {}
                }
            }
        }
        let map = Arc::new(map);
        lock(&self.links).insert(root, map.clone());
        Ok(map)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
