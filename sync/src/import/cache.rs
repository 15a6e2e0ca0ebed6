//! The import cache: per layer and path, what a file looked like when it was
//! last imported and the content that produced.
//!
//! An entry is used only when inode, size, mtime and ctime all match, the
//! same test restic applies against its parent snapshot. Entries only ever
//! name content of committed versions (they are written in the version's
//! batch), and gc drops entries whose chunks it sweeps, so a hit never
//! refers to a missing chunk.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use rocksdb::{Direction, IteratorMode};
use serde::{Deserialize, Serialize};

use crate::catalog::Batch;
use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestId};
use crate::layer::Layer;
use crate::manifest::Content;
use crate::store::keys::{prefix_end, CF_FILECACHE};
use crate::store::{cf, Store};

/// Key suffix of a disk layer's single entry (tree paths never start with NUL).
pub(crate) const DISK_KEY: &[u8] = b"\0disk";

/// What identifies an unchanged file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stamp {
    pub fn of(m: &Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            size: m.len(),
            mtime_ns: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            ctime_ns: m
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.ctime_nsec()),
        }
    }
}

/// One cached import result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum CacheEntry {
    /// A regular file of a tree layer.
    File { stamp: Stamp, content: Content },
    /// The image of a disk layer.
    Disk { stamp: Stamp, root: ManifestId },
}

/// Cache of one layer, by path relative to the import root.
pub(crate) type Cache = HashMap<Vec<u8>, CacheEntry>;

/// Chunks (and nodes) an entry refers to directly.
pub(crate) fn cache_entry_chunks(e: &CacheEntry) -> Vec<ChunkId> {
    match e {
        CacheEntry::File { content, .. } => {
            content.children().into_iter().map(|(c, _)| c).collect()
        }
        CacheEntry::Disk { root, .. } => vec![root.chunk()],
    }
}

/// Loads the cache of `layer`. Undecodable entries are skipped: losing a
/// cache entry only costs a re-read.
pub(crate) fn load(store: &Store, layer: &Layer) -> Result<Cache> {
    let mut out = Cache::new();
    let prefix = layer.id.0;
    let fc = cf(&store.db, CF_FILECACHE)?;
    for item in store
        .db
        .iterator_cf(fc, IteratorMode::From(&prefix, Direction::Forward))
    {
        let (k, v) = item.map_err(|source| Error::Db {
            path: store.root().join("catalog"),
            op: "read import cache".into(),
            source,
        })?;
        let Some(path) = k.strip_prefix(prefix.as_slice()) else {
            break;
        };
        match postcard::from_bytes::<CacheEntry>(&v) {
            Ok(e) => {
                out.insert(path.to_vec(), e);
            }
            Err(e) => tracing::debug!(%e, "skipping an undecodable import cache entry"),
        }
    }
    Ok(out)
}

/// Replaces the cache of `layer` in `batch`.
pub(crate) fn store(
    store: &Store,
    layer: &Layer,
    cache: Cache,
    batch: &mut Batch<'_>,
) -> Result<()> {
    let fc = cf(&store.db, CF_FILECACHE)?;
    let b = &mut batch.inner;
    let prefix = layer.id.0.to_vec();
    if let Some(end) = prefix_end(&prefix) {
        b.delete_range_cf(fc, &prefix, &end);
    }
    for (path, entry) in cache {
        let mut key = prefix.clone();
        key.extend_from_slice(&path);
        // Serialising plain data into a Vec cannot fail (see `Node::encode`).
        #[allow(clippy::expect_used)]
        let value = postcard::to_allocvec(&entry).expect("postcard serialises into a Vec");
        b.put_cf(fc, key, value);
    }
    Ok(())
}
