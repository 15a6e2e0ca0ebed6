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
//! Commit writes the changed clusters as a new version and moves the disk's
//! base to it in one catalog batch; the overlay and block map are emptied
//! afterwards. A crash between the two leaves the old overlay over the new
//! base: the same content, so nothing is lost or doubled.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lamina_sync::chunk::{is_zero, seal, Sealed, CLUSTER_SIZE};
use lamina_sync::manifest::{DiskBuilder, DiskRoot, Node, Root};
use lamina_sync::{check_layer_name, now_ns, Layer, LayerFormat, Store, Version, VersionId};
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

    fn decode(bytes: &[u8]) -> Result<DiskRecord> {
        postcard::from_bytes(bytes).map_err(|e| {
            Error::Store(lamina_sync::Error::RecordCorrupt {
                what: "disk record".into(),
                reason: e.to_string(),
            })
        })
    }

    fn encode(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        #[allow(clippy::expect_used)]
        postcard::to_allocvec(self).expect("postcard serialises into a Vec")
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
    check_layer_name(name)
        .map_err(|e| Error::InvalidInput(e.to_string().replace("layer name", "disk name")))?;
    let (base, base_size) = match base {
        Some((layer, version)) => {
            if layer.format != LayerFormat::Disk {
                return Err(Error::InvalidInput(format!(
                    "layer `{}` is a tree layer; a disk needs a disk layer",
                    layer.name
                )));
            }
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
                }),
                Some(size),
            )
        }
        None => (None, None),
    };
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
        if let Some(b) = &rec.base {
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

/// Opens the base of `rec` (with its cluster cache).
///
/// # Errors
/// Store failures.
pub fn open_base(store: &Arc<Store>, rec: &DiskRecord) -> Result<Option<Arc<LayerImage>>> {
    match &rec.base {
        None => Ok(None),
        Some(b) => Ok(Some(Arc::new(LayerImage::open(
            store.clone(),
            b.version,
            Some(&cache_dir(store)),
        )?))),
    }
}

/// Changes since the last commit.
///
/// # Errors
/// [`Error::DiskNotFound`], I/O failures.
pub fn status(store: &Store, name: &str) -> Result<Summary> {
    let rec = get(store, name)?;
    Ok(BlockMap::open(&rec.blockmap(store))?.summary())
}

fn empty_overlay(store: &Store, rec: &DiskRecord) -> Result<()> {
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
    if let Some(b) = &rec.base {
        batch.move_ref(&disk_ref(name), Some(b.version), None, "disk rm")?;
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
    let dir = cache_dir(store);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let version = name.split('.').next().unwrap_or_default().to_owned();
        // Only cluster caches (files named by a version id) are ours; the
        // directory is shared (the file view keeps `files/` here).
        let ours = version.len() == 64
            && version.bytes().all(|b| b.is_ascii_hexdigit())
            && e.file_type().is_ok_and(|t| t.is_file());
        if ours && !keep.contains(&version) {
            let p = e.path();
            fs::remove_file(&p).ctx(&p, "remove cached clusters")?;
        }
    }
    Ok(())
}

/// Result of a commit.
#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    /// Disk.
    pub disk: String,
    /// Layer that received the version.
    pub layer: String,
    /// New version (`None` if nothing changed).
    pub version: Option<VersionId>,
    /// Clusters written.
    pub clusters: u64,
    /// Of which new chunks.
    pub chunks_new: u64,
}

/// Turns a disk's changes into a new version of its base's layer (or of
/// `to`), and empties its overlay.
///
/// # Errors
/// [`Error::DiskBusy`] (served), a layer that moved since the disk was
/// based on it, store or I/O failures.
pub fn commit(
    store: &Arc<Store>,
    name: &str,
    to: Option<&str>,
    message: &str,
    author: &str,
) -> Result<CommitReport> {
    let rec = get(store, name)?;
    let _lock = lock(store, &rec, "lamina disk commit")?;
    let target_name = match (to, &rec.base) {
        (Some(t), _) => t.to_owned(),
        (None, Some(b)) => b.layer.clone(),
        (None, None) => {
            return Err(Error::InvalidInput(format!(
                "disk `{name}` has no base; say which layer receives the commit with --to"
            )))
        }
    };
    let target = store.layer(&target_name)?;
    if target.format != LayerFormat::Disk {
        return Err(Error::InvalidInput(format!(
            "layer `{target_name}` is not a disk layer"
        )));
    }
    let head = store.head(&target)?;
    if let Some(b) = rec.base.as_ref().filter(|b| b.layer == target_name) {
        if head != Some(b.version) {
            return Err(Error::InvalidInput(format!(
                "layer `{target_name}` moved to {} since disk `{name}` was based on {}; commit with --to another layer",
                head.map_or_else(|| "nothing".into(), |h| h.short()),
                b.version.short()
            )));
        }
    }
    let base = open_base(store, &rec)?;
    let backing = match &base {
        Some(b) => Backing::Device(b.clone()),
        None => Backing::FromHeader,
    };
    let overlay = Qcow2::open(&rec.overlay(store), false, backing)?;
    let blockmap = BlockMap::open(&rec.blockmap(store))?;
    let dirty: Vec<u64> = blockmap.dirty().into_iter().map(|(c, _)| c).collect();
    let mut report = CommitReport {
        disk: name.to_owned(),
        layer: target_name.clone(),
        version: None,
        clusters: dirty.len() as u64,
        chunks_new: 0,
    };
    if dirty.is_empty() && rec.base.as_ref().is_some_and(|b| b.layer == target_name) {
        return Ok(report);
    }
    // Merge the base's clusters with the changed ones, in cluster order.
    let mut base_clusters = Vec::new();
    if let Some(b) = &base {
        b.root().for_each_cluster(&**store, |c, id| {
            base_clusters.push((c, id));
            Ok(())
        })?;
    }
    let cs = u64::from(CLUSTER_SIZE);
    let mut builder = DiskBuilder::new(rec.size, CLUSTER_SIZE);
    let levels = builder.levels();
    let mut put = |node: Node| store.put_node(&node);
    let mut buf = vec![0u8; cs as usize];
    let (mut bi, mut di) = (0usize, 0usize);
    loop {
        let nb = base_clusters.get(bi).map(|x| x.0);
        let nd = dirty.get(di).copied();
        let c = match (nb, nd) {
            (None, None) => break,
            (Some(b), None) => b,
            (None, Some(d)) => d,
            (Some(b), Some(d)) => b.min(d),
        };
        if nb == Some(c) {
            bi += 1;
        }
        if nd == Some(c) {
            di += 1;
            let len = (rec.size - c * cs).min(cs) as usize;
            overlay.read_at(c * cs, &mut buf[..len])?;
            let data = &buf[..len];
            if is_zero(data) {
                continue;
            }
            let sealed = seal(data);
            let id = sealed.id;
            if store.backend().put(Sealed::Chunk(sealed))? > 0 {
                report.chunks_new += 1;
            }
            builder.push(c, id, &mut put)?;
        } else if let Some((_, id)) = base_clusters.get(bi - 1) {
            if c * cs < rec.size {
                builder.push(c, *id, &mut put)?;
            }
        }
    }
    let top = builder.finish(&mut put)?;
    let root = Node::Root(Root::Disk(DiskRoot {
        size: rec.size,
        cluster_size: CLUSTER_SIZE,
        levels,
        top,
    }));
    let root_id = store.put_node(&root)?;
    store.backend().flush()?;
    let version = Version {
        layer: target.id,
        parents: head.into_iter().collect(),
        time_ns: now_ns(),
        author: author.to_owned(),
        message: message.to_owned(),
        root: root_id,
    };
    let (new_id, _) = version.encode();
    let mut updated = rec.clone();
    updated.base = Some(DiskBase {
        layer: target_name.clone(),
        version: new_id,
    });
    let old = rec.base.as_ref().map(|b| b.version);
    let committed = store.commit_version(&target, head, &version, "disk commit", &mut |batch| {
        batch.put_record(RECORD_KIND, name, &updated.encode())?;
        batch.move_ref(&disk_ref(name), old, Some(new_id), "disk commit")
    })?;
    report.version = Some(committed);
    drop(overlay);
    empty_overlay(store, &rec)?;
    prune_cache(store)?;
    Ok(report)
}

/// Whether a file exists at `p` (for `disk show`).
pub fn file_size(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
