//! Writable disks: a base disk layer version, a qcow2 overlay and a block
//! map, defined by a record in the store's catalog.
//!
//! ```text
//! STORE/disks/<id>/overlay.qcow2   the disk's changes since its last commit
//! STORE/disks/<id>/blockmap        which clusters and sectors they touch
//! STORE/disks/<id>/lock            held by whoever has the disk open
//! STORE/cache/<version>.raw        cached clusters of base versions
//! ```
//!
//! A disk's base version is pinned by the ref `disk/<name>`, so gc keeps it.
//! Commits (see `commit`) turn the changed clusters into versions; a disk
//! being served is committed by its server, which keeps the overlay and
//! records the version holding the disk's content in a `disk-live` record.
//!
//! ```text
//! STORE/disks/<id>/blockmap.committing   changes a commit in progress took
//! STORE/disks/<id>/control.sock          the serving process, for commits
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lamina_sync::chunk::CLUSTER_SIZE;
use lamina_sync::manifest::Root;
use lamina_sync::{check_layer_name, now_ns, Layer, LayerFormat, Store, VersionId};
use serde::{Deserialize, Serialize};

use crate::base::LayerImage;
use crate::blockmap::{BlockMap, Summary};
use crate::error::{Error, IoContext, Result};
use crate::export::DiskExport;
use crate::qcow::{Backing, Qcow2};

/// Catalog record kind of disks.
pub const RECORD_KIND: &str = "disk";

/// A disk's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Name (also the NBD export name).
    pub name: String,
    /// Directory name under `STORE/disks`.
    pub id: String,
    /// Virtual size.
    pub size: u64,
    /// Base layer version, if any.
    pub base: Option<DiskBase>,
    /// Creation time, ns since the epoch.
    pub created_ns: i64,
}

/// What a disk starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBase {
    /// Layer name.
    pub layer: String,
    /// Version.
    pub version: VersionId,
    /// The remote the version streams from, when it was not pulled
    /// (`disk create --stream`): its data is fetched as it is read.
    pub stream: Option<String>,
}

impl DiskBase {
    /// Whether the base streams from a remote (this store does not hold
    /// the version).
    ///
    /// # Errors
    /// Store failures.
    pub fn is_streaming(&self, store: &Store) -> Result<bool> {
        Ok(self.stream.is_some() && !store.has_version(self.version)?)
    }
}

/// Ref pinning a disk's base version.
pub fn disk_ref(name: &str) -> String {
    format!("disk/{name}")
}

fn disks_dir(store: &Store) -> PathBuf {
    store.root().join("disks")
}

/// Directory of cached base clusters.
pub fn cache_dir(store: &Store) -> PathBuf {
    store.root().join("cache")
}

impl DiskRecord {
    /// The disk's directory.
    pub fn dir(&self, store: &Store) -> PathBuf {
        disks_dir(store).join(&self.id)
    }
    /// Its overlay.
    pub fn overlay(&self, store: &Store) -> PathBuf {
        self.dir(store).join("overlay.qcow2")
    }
    /// Its block map.
    pub fn blockmap(&self, store: &Store) -> PathBuf {
        self.dir(store).join("blockmap")
    }
    /// Where a commit in progress keeps the changes it took.
    pub fn committing(&self, store: &Store) -> PathBuf {
        self.dir(store).join("blockmap.committing")
    }
    /// The serving process's control socket.
    pub fn control_socket(&self, store: &Store) -> PathBuf {
        self.dir(store).join("control.sock")
    }

    fn decode(bytes: &[u8]) -> Result<DiskRecord> {
        match postcard::from_bytes(bytes) {
            Ok(r) => Ok(r),
            // Written before bases could stream: no `stream` field.
            Err(e) => match postcard::from_bytes::<legacy::DiskRecord>(bytes) {
                Ok(old) => Ok(old.into()),
                Err(_) => Err(Error::Store(lamina_sync::Error::RecordCorrupt {
                    what: "disk record".into(),
                    reason: e.to_string(),
                })),
            },
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        #[allow(clippy::expect_used)]
        postcard::to_allocvec(self).expect("postcard serialises into a Vec")
    }
}

/// Disk records as written before bases could stream.
mod legacy {
    use lamina_sync::VersionId;
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub(super) struct DiskRecord {
        name: String,
        id: String,
        size: u64,
        base: Option<DiskBase>,
        created_ns: i64,
    }

    #[derive(Deserialize)]
    struct DiskBase {
        layer: String,
        version: VersionId,
    }

    impl From<DiskRecord> for super::DiskRecord {
        fn from(o: DiskRecord) -> Self {
            super::DiskRecord {
                name: o.name,
                id: o.id,
                size: o.size,
                base: o.base.map(|b| super::DiskBase {
                    layer: b.layer,
                    version: b.version,
                    stream: None,
                }),
                created_ns: o.created_ns,
            }
        }
    }
}

/// Every disk, by name.
///
/// # Errors
/// Store failures.
pub fn list(store: &Store) -> Result<Vec<DiskRecord>> {
    store
        .records(RECORD_KIND)?
        .iter()
        .map(|(_, v)| DiskRecord::decode(v))
        .collect()
}

/// The disk `name`.
///
/// # Errors
/// [`Error::DiskNotFound`], store failures.
pub fn get(store: &Store, name: &str) -> Result<DiskRecord> {
    match store.record(RECORD_KIND, name)? {
        Some(v) => DiskRecord::decode(&v),
        None => Err(Error::DiskNotFound(name.to_owned())),
    }
}

/// Holds a disk's lock until dropped.
pub struct DiskLock(#[allow(dead_code)] File);

/// Takes a disk's lock (never waits: a disk in use belongs to its user).
///
/// # Errors
/// [`Error::DiskBusy`] naming the holder.
pub fn lock(store: &Store, rec: &DiskRecord, holder: &str) -> Result<DiskLock> {
    let path = rec.dir(store).join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .ctx(&path, "open disk lock")?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut s = String::new();
            // The note is informative only.
            let _ = f.read_to_string(&mut s);
            return Err(Error::DiskBusy {
                name: rec.name.clone(),
                holder: if s.trim().is_empty() {
                    "another process".into()
                } else {
                    s.trim().to_owned()
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, "lock disk", e)),
    }
    f.set_len(0)
        .and_then(|()| f.rewind())
        .and_then(|()| writeln!(f, "pid {} ({holder})", std::process::id()))
        .ctx(&path, "write disk lock holder")?;
    Ok(DiskLock(f))
}

/// Creates a disk over `base` (a disk layer version), `size` bytes (at
/// least the base's size; default the base's size).
///
/// # Errors
/// A bad name, an existing disk, a base that is not a disk layer, a size
/// smaller than the base, store or I/O failures.
pub fn create(
    store: &Store,
    name: &str,
    base: Option<(&Layer, VersionId)>,
    size: Option<u64>,
) -> Result<DiskRecord> {
    let (base, base_size) = match base {
        Some((layer, version)) => {
            if layer.format != LayerFormat::Disk {
                return Err(Error::InvalidInput(format!(
                    "layer `{}` is a tree layer; a disk needs a disk layer",
                    layer.name
                )));
            }
            // A golden layer from a signing remote must carry its signature.
            store.check_usable(layer, version)?;
            let size = match store.root_of(version)? {
                Root::Disk(d) => d.size,
                Root::Tree { .. } => {
                    return Err(Error::InvalidInput(format!(
                        "version {} is not a disk",
                        version.short()
                    )))
                }
            };
            (
                Some(DiskBase {
                    layer: layer.name.clone(),
                    version,
                    stream: None,
                }),
                Some(size),
            )
        }
        None => (None, None),
    };
    make(store, name, base, base_size, size)
}

/// Creates a disk over a version streamed from a remote (see
/// [`lamina_sync::remote::StreamedVersion`]): nothing of its data is
/// local yet.
///
/// # Errors
/// As [`create`]; a streamed version that is not a disk.
pub fn create_streamed(
    store: &Store,
    name: &str,
    streamed: &lamina_sync::remote::StreamedVersion,
    root: &Root,
    size: Option<u64>,
) -> Result<DiskRecord> {
    let Root::Disk(d) = root else {
        return Err(Error::InvalidInput(format!(
            "version {} is not a disk",
            streamed.version.short()
        )));
    };
    let base = DiskBase {
        layer: streamed.layer.clone(),
        version: streamed.version,
        stream: Some(streamed.remote.clone()),
    };
    make(store, name, Some(base), Some(d.size), size)
}

fn make(
    store: &Store,
    name: &str,
    base: Option<DiskBase>,
    base_size: Option<u64>,
    size: Option<u64>,
) -> Result<DiskRecord> {
    check_layer_name(name)
        .map_err(|e| Error::InvalidInput(e.to_string().replace("layer name", "disk name")))?;
    let size = match (size, base_size) {
        (Some(s), Some(b)) if s < b => {
            return Err(Error::InvalidInput(format!(
                "--size {s} is smaller than the base's {b} bytes"
            )))
        }
        (Some(s), _) => s,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(Error::InvalidInput("a disk needs --base or --size".into()));
        }
    };
    if size == 0 || size % 512 != 0 {
        return Err(Error::InvalidInput(format!(
            "disk size {size} must be a positive multiple of 512"
        )));
    }
    if store.record(RECORD_KIND, name)?.is_some() {
        return Err(Error::DiskExists(name.to_owned()));
    }
    let rec = DiskRecord {
        name: name.to_owned(),
        id: hex::encode(rand::random::<[u8; 8]>()),
        size,
        base,
        created_ns: now_ns(),
    };
    let dir = rec.dir(store);
    fs::create_dir_all(&dir).ctx(&dir, "create disk directory")?;
    let made = (|| {
        Qcow2::create(&rec.overlay(store), size)?;
        BlockMap::create(&rec.blockmap(store), size, u64::from(CLUSTER_SIZE))?;
        let mut batch = store.batch()?;
        if store.record(RECORD_KIND, name)?.is_some() {
            return Err(Error::DiskExists(name.to_owned()));
        }
        batch.put_record(RECORD_KIND, name, &rec.encode())?;
        // A streamed version is not in the store: nothing to pin (yet).
        if let Some(b) = rec.base.as_ref().filter(|b| b.stream.is_none()) {
            batch.move_ref(&disk_ref(name), None, Some(b.version), "disk create")?;
        }
        store.commit(batch)?;
        Ok(())
    })();
    if let Err(e) = made {
        // Nothing refers to the directory yet.
        let _ = fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(rec)
}

/// Opens a disk for serving (takes its lock).
///
/// # Errors
/// [`Error::DiskBusy`], I/O and store failures.
pub fn open(
    store: &Arc<Store>,
    rec: &DiskRecord,
    base: Option<Arc<LayerImage>>,
    writable: bool,
    holder: &str,
) -> Result<(DiskExport, DiskLock)> {
    let lock = lock(store, rec, holder)?;
    recover_blockmap(store, rec)?;
    let backing = match &base {
        Some(b) => Backing::Device(b.clone()),
        None => Backing::FromHeader,
    };
    let overlay = Arc::new(Qcow2::open(&rec.overlay(store), writable, backing)?);
    let blockmap = BlockMap::open(&rec.blockmap(store))?;
    Ok((
        DiskExport::new(&rec.name, overlay, base, blockmap, writable),
        lock,
    ))
}

/// Refuses a local base whose layer's subscription ended or whose golden
/// version lacks a trusted signature (see [`Store::check_usable`]). A base
/// whose layer was removed since has nothing left to check.
///
/// # Errors
/// [`lamina_sync::Error::Unsigned`], [`lamina_sync::Error::SubscriptionEnded`],
/// store failures.
pub fn check_base(store: &Store, b: &DiskBase) -> Result<()> {
    match store.layer(&b.layer) {
        Ok(l) => Ok(store.check_usable(&l, b.version)?),
        Err(lamina_sync::Error::LayerNotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Opens the base of `rec` (with its cluster cache).
///
/// # Errors
/// Store failures.
pub fn open_base(store: &Arc<Store>, rec: &DiskRecord) -> Result<Option<Arc<LayerImage>>> {
    match &rec.base {
        None => Ok(None),
        Some(b) if b.is_streaming(store)? => Ok(Some(Arc::new(LayerImage::open_streamed(
            store,
            b.version,
            &cache_dir(store),
        )?))),
        Some(b) => {
            check_base(store, b)?;
            Ok(Some(Arc::new(LayerImage::open(
                store.clone(),
                b.version,
                Some(&cache_dir(store)),
            )?)))
        }
    }
}

/// Changes since the last commit.
///
/// # Errors
/// [`Error::DiskNotFound`], I/O failures.
pub fn status(store: &Store, name: &str) -> Result<Summary> {
    let rec = get(store, name)?;
    let map = BlockMap::open(&rec.blockmap(store))?;
    let committing = rec.committing(store);
    if !committing.exists() {
        return Ok(map.summary());
    }
    // A commit in progress (or cut short): its changes count until it ends.
    let mut all: std::collections::BTreeMap<u64, u128> = map.dirty().into_iter().collect();
    for (c, bits) in BlockMap::open(&committing)?.dirty() {
        *all.entry(c).or_default() |= bits;
    }
    Ok(Summary::of(&all, map.cluster_size()))
}

/// Gives the changes a cut-short commit had set aside back to the block
/// map (see `commit`). Needs the disk's lock.
///
/// # Errors
/// I/O failures.
pub(crate) fn recover_blockmap(store: &Store, rec: &DiskRecord) -> Result<()> {
    let committing = rec.committing(store);
    if !committing.exists() {
        return Ok(());
    }
    BlockMap::open(&rec.blockmap(store))?.absorb(&committing)?;
    fs::remove_file(&committing).ctx(&committing, "remove the set-aside block map")
}

/// Record kind of the version holding a served disk's content as of its
/// last commit.
pub(crate) const LIVE_KIND: &str = "disk-live";

/// The version a served disk's last commit made (its content then), if the
/// overlay was kept since.
///
/// # Errors
/// Store failures, a damaged record.
pub fn live_version(store: &Store, name: &str) -> Result<Option<VersionId>> {
    match store.record(LIVE_KIND, name)? {
        None => Ok(None),
        Some(v) => VersionId::from_slice(&v).map(Some).ok_or_else(|| {
            Error::Store(lamina_sync::Error::RecordCorrupt {
                what: format!("{LIVE_KIND} {name}"),
                reason: "not a version id".into(),
            })
        }),
    }
}

pub(crate) fn empty_overlay(store: &Store, rec: &DiskRecord) -> Result<()> {
    Qcow2::create(&rec.overlay(store), rec.size)?;
    BlockMap::create(&rec.blockmap(store), rec.size, u64::from(CLUSTER_SIZE))
}

/// Drops a disk's changes since its last commit.
///
/// # Errors
/// [`Error::DiskNotFound`], [`Error::DiskBusy`], I/O failures.
pub fn reset(store: &Store, name: &str) -> Result<()> {
    let rec = get(store, name)?;
    let _lock = lock(store, &rec, "lamina disk reset")?;
    if live_version(store, name)?.is_some() {
        return Err(Error::InvalidInput(format!(
            "disk `{name}` was committed while served; commit it (or remove it) instead of a reset, which would drop committed changes from the disk"
        )));
    }
    // A reset drops every change, set aside or not; it may not exist.
    let _ = fs::remove_file(rec.committing(store));
    empty_overlay(store, &rec)
}

/// Removes a disk (its base stays restorable through the reflog).
///
/// # Errors
/// [`Error::DiskNotFound`], [`Error::DiskBusy`], store or I/O failures.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    let rec = get(store, name)?;
    let lock = lock(store, &rec, "lamina disk rm")?;
    let mut batch = store.batch()?;
    batch.delete_record(RECORD_KIND, name)?;
    batch.delete_record(LIVE_KIND, name)?;
    // A streamed base has no ref (unless it became local and was
    // committed over since).
    if let Some(old) = store.ref_target(&disk_ref(name))? {
        batch.move_ref(&disk_ref(name), Some(old), None, "disk rm")?;
    }
    store.commit(batch)?;
    drop(lock);
    let dir = rec.dir(store);
    fs::remove_dir_all(&dir).ctx(&dir, "remove disk directory")?;
    prune_cache(store)
}

/// Deletes cached clusters of versions no disk is based on.
///
/// # Errors
/// Store or I/O failures.
pub fn prune_cache(store: &Store) -> Result<()> {
    let keep: Vec<String> = list(store)?
        .into_iter()
        .filter_map(|r| r.base.map(|b| b.version.to_hex()))
        .collect();
    // Cluster caches, and the manifests of streamed versions.
    for dir in [
        cache_dir(store),
        lamina_sync::remote::stream_dir(store.root()),
    ] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.split('.').next().unwrap_or_default().to_owned();
            // Only files named by a version id are ours; the cache
            // directory is shared (the file view keeps `files/` there).
            let ours = version.len() == 64
                && version.bytes().all(|b| b.is_ascii_hexdigit())
                && e.file_type().is_ok_and(|t| t.is_file());
            if ours && !keep.contains(&version) {
                let p = e.path();
                fs::remove_file(&p).ctx(&p, "remove cached clusters")?;
            }
        }
    }
    Ok(())
}

/// Whether a file exists at `p` (for `disk show`).
pub fn file_size(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn records_written_before_streaming_still_decode() {
        #[derive(serde::Serialize)]
        struct OldBase {
            layer: String,
            version: lamina_sync::VersionId,
        }
        #[derive(serde::Serialize)]
        struct OldRecord {
            name: String,
            id: String,
            size: u64,
            base: Option<OldBase>,
            created_ns: i64,
        }
        let v = lamina_sync::VersionId([3; 32]);
        let old = postcard::to_allocvec(&OldRecord {
            name: "vm".into(),
            id: "ab".into(),
            size: 4096,
            base: Some(OldBase {
                layer: "os/x".into(),
                version: v,
            }),
            created_ns: 7,
        })
        .unwrap();
        let r = super::DiskRecord::decode(&old).unwrap();
        let b = r.base.clone().unwrap();
        assert_eq!((b.layer.as_str(), b.version, b.stream), ("os/x", v, None));
        assert_eq!(r.created_ns, 7);
        let mut now = r.clone();
        now.base.as_mut().unwrap().stream = Some("origin".into());
        assert_eq!(super::DiskRecord::decode(&now.encode()).unwrap(), now);
        assert_eq!(super::DiskRecord::decode(&r.encode()).unwrap(), r);
        assert!(super::DiskRecord::decode(b"\x01").is_err());
    }
}
