//! The store: a directory holding the catalog (RocksDB) and the chunk
//! backend's packs.
//!
//! ```text
//! STORE/
//!   lamina-store      marker: format version and store id
//!   catalog/          RocksDB (see keys.rs for the column families)
//!   packs/XX/*.pack   chunk records (local backend)
//!   lock, gc.lock     inter-process locks (see lock.rs)
//!   tmp/              scratch (reader secondaries, export staging)
//! ```
//!
//! A [`Store`] is `Send + Sync`; one logical change (a version plus its ref
//! move, a layer creation) is one RocksDB write batch, synced before the
//! call returns.

pub(crate) mod keys;
pub(crate) mod lock;
pub(crate) mod table;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::{BlockBasedOptions, DBCompressionType, LogLevel, Options, DB};

use crate::backend::{ChunkBackend, LocalBackend};
use crate::chunk::{Sealed, Sealer};
use crate::error::{Error, IoContext, Result};
use crate::id::{ChunkId, ManifestId};
use crate::manifest::{Node, NodeSource};

pub use lock::{writer_waiting, Access, GcPin, LockWait, WaitNotice};

/// Name of the marker file.
const MARKER: &str = "lamina-store";
/// Store format this code reads and writes.
const FORMAT: u32 = 1;
const CATALOG_DIR: &str = "catalog";
const PACKS_DIR: &str = "packs";
const TMP_DIR: &str = "tmp";

/// How to open a store.
pub struct OpenOptions<'a> {
    /// Read, write or gc access.
    pub access: Access,
    /// What to do if another process holds the store.
    pub wait: LockWait,
    /// Told who holds the store when a wait starts.
    pub notice: WaitNotice<'a>,
    /// Recorded in the lock file so other processes can say who holds it.
    pub command: String,
}

impl OpenOptions<'_> {
    /// Options for `access`, waiting for locks silently.
    pub fn new(access: Access) -> OpenOptions<'static> {
        OpenOptions {
            access,
            wait: LockWait::Wait(None),
            notice: &|_| {},
            command: "lamina".into(),
        }
    }
}

/// An open store.
pub struct Store {
    root: PathBuf,
    pub(crate) db: Arc<DB>,
    /// Layers, versions, refs, reflog and records: in `db` for the
    /// embedded store, in RADOS for a store on Ceph.
    pub(crate) tables: Arc<dyn table::Tables>,
    /// The store's id (shared by every directory of a store on Ceph).
    id: String,
    /// The pool of a store on Ceph (for its gc lock).
    rados: Option<(Arc<crate::rados::Pool>, crate::rados::RadosTarget)>,
    pub(crate) backend: Arc<dyn ChunkBackend>,
    access: Access,
    /// Serialises read-compare-write of refs within this process (other
    /// processes are kept out by the writer lock).
    pub(crate) commit_lock: Mutex<()>,
    /// Imports hold it shared, gc exclusive: gc never sweeps chunks an
    /// in-flight import of this process has written but not committed.
    pub(crate) gc_guard: RwLock<()>,
    node_sealer: Mutex<Sealer>,
    /// Manifest nodes of streamed versions this process reads through the
    /// store (see [`Store::attach_streamed`]); never in the backend.
    streamed: RwLock<Vec<Arc<crate::remote::StreamNodes>>>,
    _locks: lock::StoreLocks,
    /// Removes a reader's secondary directory after the DB is closed
    /// (declared last: fields drop in order).
    _secondary: SecondaryDir,
}

/// How long an import waits for a gc elsewhere on the pool (and a gc for
/// imports) before giving up.
const GC_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// A hold of the store's gc guard (shared or exclusive), plus the pool's
/// gc lock on Ceph. Released on drop.
pub(crate) struct ImportGuard<'a> {
    _rados: Option<crate::rados::GcLock>,
    _shared: Option<std::sync::RwLockReadGuard<'a, ()>>,
    _exclusive: Option<std::sync::RwLockWriteGuard<'a, ()>>,
}

/// Memtables larger than this are flushed when a writer closes the store, so
/// the next open (writer or reader) replays a short WAL instead of every
/// write since the last automatic flush.
const FLUSH_ON_CLOSE_BYTES: u64 = 256 * 1024;

impl Drop for Store {
    fn drop(&mut self) {
        if !self.access.writable() {
            return;
        }
        // Index what is still buffered first, so it lands before the flush.
        if let Err(e) = self.backend.flush() {
            tracing::warn!(%e, "could not flush chunks on close");
        }
        let _guard = match lock::CatalogGuard::acquire(&self.root, true) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(%e, "not flushing on close");
                return;
            }
        };
        for name in keys::ALL_CFS {
            let Ok(handle) = cf(&self.db, name) else {
                continue;
            };
            let size = self
                .db
                .property_int_value_cf(handle, "rocksdb.cur-size-all-mem-tables")
                .ok()
                .flatten()
                .unwrap_or(0);
            if size > FLUSH_ON_CLOSE_BYTES {
                // Only start-up time is at stake: the data is in the WAL.
                if let Err(e) = self.db.flush_cf(handle) {
                    tracing::debug!(cf = name, %e, "could not flush memtable on close");
                }
            }
        }
    }
}

struct SecondaryDir(Option<PathBuf>);

impl Drop for SecondaryDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            // Scratch space only; a leftover is cleaned by the next writer.
            if let Err(e) = fs::remove_dir_all(dir) {
                tracing::debug!(dir = %dir.display(), %e, "could not remove reader directory");
            }
        }
    }
}

/// What the catalog is opened for; sizes RocksDB's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DbRole {
    /// The one writer (creates, flushes, compacts).
    Write,
    /// A reader's secondary instance: never flushes or compacts.
    Read,
}

fn db_options(role: DbRole) -> Options {
    let mut o = Options::default();
    o.set_log_level(LogLevel::Warn);
    o.set_keep_log_file_num(2);
    o.set_max_log_file_size(1 << 20);
    o.set_compression_type(DBCompressionType::None);
    // An open loads every table file of every column family, by default on
    // 16 new threads per column family: 160 threads for the catalog's ten,
    // and as many again when a reader catches up (302 clone3 calls measured
    // for `lamina layer ls`). The catalog's tables are few and small, so
    // the opening thread loads them itself.
    o.set_max_file_opening_threads(1);
    // No periodic stats dump into the LOG (a timer waking a thread).
    o.set_stats_dump_period_sec(0);
    match role {
        DbRole::Write => o.set_max_background_jobs(2),
        DbRole::Read => {
            // A secondary never flushes or compacts: the fewest background
            // jobs RocksDB allows (it still keeps one thread per pool), and
            // no statistics gathered from table files at open (they only
            // steer compaction).
            o.set_max_background_jobs(1);
            o.set_skip_stats_update_on_db_open(true);
            // A secondary must keep every table file open: the primary may
            // delete files it has compacted away while we read.
            o.set_max_open_files(-1);
        }
    }
    o
}

fn cf_descriptors(role: DbRole) -> Vec<rocksdb::ColumnFamilyDescriptor> {
    keys::ALL_CFS
        .iter()
        .map(|name| {
            let mut o = db_options(role);
            if *name == keys::CF_CHUNKS {
                // Most lookups during an import are for chunks not yet stored;
                // a bloom filter answers those without reading a block.
                let mut t = BlockBasedOptions::default();
                t.set_bloom_filter(10.0, false);
                o.set_block_based_table_factory(&t);
            }
            rocksdb::ColumnFamilyDescriptor::new(*name, o)
        })
        .collect()
}

/// The handle of column family `name`.
pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| Error::RecordCorrupt {
        what: format!("column family {name}"),
        reason: "missing from the catalog".into(),
    })
}

fn fsync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .ctx(path, "sync directory")
}

/// Where a store keeps its chunks and shared catalog tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// Pack files and RocksDB in the store directory (the embedded default).
    Local,
    /// A Ceph pool; the directory keeps only this process's local state.
    Rados(crate::rados::RadosTarget),
}

fn read_marker(root: &Path) -> Result<(StoreBackend, String)> {
    let path = root.join(MARKER);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotAStore {
                path: root.to_owned(),
            })
        }
        Err(e) => return Err(Error::io(path, "read store marker", e)),
    };
    let format = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("lamina-store "))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .ok_or_else(|| Error::NotAStore {
            path: root.to_owned(),
        })?;
    if format != FORMAT {
        return Err(Error::InvalidInput(format!(
            "store {} has format {format}; this lamina reads format {FORMAT}",
            root.display()
        )));
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_owned)
    };
    let id = field("id").unwrap_or_default();
    let backend = match field("backend").as_deref() {
        None | Some("local") => StoreBackend::Local,
        Some("rados") => {
            let pool = field("pool").ok_or_else(|| {
                Error::InvalidInput(format!("{}: a RADOS store without a pool", path.display()))
            })?;
            let mut target =
                crate::rados::RadosTarget::new(&pool, field("conf").map(PathBuf::from));
            if let Some(user) = field("user") {
                target.user = user;
            }
            if let Some(t) = field("timeout").and_then(|t| t.parse().ok()) {
                target.timeout_secs = t;
            }
            StoreBackend::Rados(target)
        }
        Some(other) => {
            return Err(Error::InvalidInput(format!(
                "{}: unknown backend `{other}`",
                path.display()
            )))
        }
    };
    Ok((backend, id))
}

impl Store {
    /// Creates an empty store at `root`. The directory may exist if empty;
    /// missing parents are created. The store appears atomically: it is
    /// built in a sibling directory and renamed into place.
    ///
    /// # Errors
    /// [`Error::AlreadyStore`], a non-empty directory, I/O failures.
    pub fn init(root: &Path) -> Result<()> {
        Self::init_with(root, &StoreBackend::Local)
    }

    /// Creates an empty store at `root` with chunks and shared tables in
    /// `backend`. For a RADOS pool that already holds a store, the new
    /// directory joins it (another server on the same store).
    ///
    /// # Errors
    /// As [`Store::init`]; the cluster unreachable.
    pub fn init_with(root: &Path, backend: &StoreBackend) -> Result<()> {
        if root.join(MARKER).exists() {
            return Err(Error::AlreadyStore {
                path: root.to_owned(),
            });
        }
        if root.exists() {
            let mut entries = fs::read_dir(root).ctx(root, "read directory")?;
            if entries.next().is_some() {
                return Err(Error::InvalidInput(format!(
                    "{} is not empty and not a Lamina store",
                    root.display()
                )));
            }
        }
        let name = root
            .file_name()
            .ok_or_else(|| Error::InvalidInput(format!("{} has no name", root.display())))?;
        let parent = match root.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).ctx(&parent, "create directory")?;
        let staging = parent.join(format!(
            ".{}.lamina-init-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let built = match backend {
            StoreBackend::Local => Self::build(&staging, &[]),
            StoreBackend::Rados(target) => crate::rados::init_pool(target).and_then(|id| {
                let mut lines = vec![
                    format!("id {id}"),
                    "backend rados".to_owned(),
                    format!("pool {}", target.pool),
                    format!("user {}", target.user),
                    format!("timeout {}", target.timeout_secs),
                ];
                if let Some(conf) = &target.conf {
                    lines.push(format!("conf {}", conf.display()));
                }
                Self::build(&staging, &lines)
            }),
        };
        let placed = built.and_then(|()| {
            fs::rename(&staging, root)
                .ctx(root, "move new store into place")
                .and_then(|()| fsync_dir(&parent))
        });
        if placed.is_err() && staging.exists() {
            // Leave nothing half-built behind; the original error matters more.
            if let Err(e) = fs::remove_dir_all(&staging) {
                tracing::warn!(dir = %staging.display(), %e, "could not remove staging directory");
            }
        }
        placed
    }

    fn build(dir: &Path, fields: &[String]) -> Result<()> {
        fs::create_dir(dir).ctx(dir, "create directory")?;
        for sub in [PACKS_DIR, TMP_DIR] {
            let p = dir.join(sub);
            fs::create_dir(&p).ctx(&p, "create directory")?;
        }
        let catalog = dir.join(CATALOG_DIR);
        let mut opts = db_options(DbRole::Write);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf_descriptors(&opts, &catalog, cf_descriptors(DbRole::Write)).map_err(
            |source| Error::Db {
                path: catalog.clone(),
                op: "create catalog".into(),
                source,
            },
        )?;
        db.flush_wal(true).map_err(|source| Error::Db {
            path: catalog.clone(),
            op: "sync catalog".into(),
            source,
        })?;
        drop(db);
        let marker = dir.join(MARKER);
        let mut f = fs::File::create(&marker).ctx(&marker, "write store marker")?;
        let mut text = format!("lamina-store {FORMAT}\n");
        if fields.is_empty() {
            text.push_str(&format!("id {}\n", hex::encode(rand::random::<[u8; 16]>())));
        }
        for l in fields {
            text.push_str(l);
            text.push('\n');
        }
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .ctx(&marker, "write store marker")?;
        fsync_dir(dir)
    }

    /// Opens the store at `root`.
    ///
    /// # Errors
    /// [`Error::NotAStore`], [`Error::Locked`], catalog or I/O failures.
    pub fn open(root: &Path, opts: &OpenOptions<'_>) -> Result<Store> {
        let (kind, id) = read_marker(root)?;
        let locks =
            lock::StoreLocks::acquire(root, opts.access, opts.wait, opts.notice, &opts.command)?;
        let catalog = root.join(CATALOG_DIR);
        let db_err = |op: &str| {
            let path = catalog.clone();
            let op = op.to_owned();
            move |source| Error::Db { path, op, source }
        };
        let guard = lock::CatalogGuard::acquire(root, opts.access.writable())?;
        let (db, secondary) = if !opts.access.writable() {
            let dir = lock::secondary_dir(root);
            let o = db_options(DbRole::Read);
            let db = DB::open_cf_descriptors_as_secondary(
                &o,
                &catalog,
                &dir,
                cf_descriptors(DbRole::Read),
            )
            .map_err(db_err("open catalog for reading"))?;
            // Pick up anything a running writer flushed since the files were
            // listed (its background flushes don't take catalog.lock).
            db.try_catch_up_with_primary()
                .map_err(db_err("read catalog"))?;
            (db, Some(dir))
        } else {
            let db = DB::open_cf_descriptors(
                &db_options(DbRole::Write),
                &catalog,
                cf_descriptors(DbRole::Write),
            )
            .map_err(db_err("open catalog"))?;
            clean_tmp(&root.join(TMP_DIR));
            clean_secondaries();
            (db, None)
        };
        let db = Arc::new(db);
        let (backend, tables, rados): (Arc<dyn ChunkBackend>, Arc<dyn table::Tables>, _) =
            match &kind {
                StoreBackend::Local => (
                    Arc::new(LocalBackend::open(
                        db.clone(),
                        catalog,
                        root.join(PACKS_DIR),
                        opts.access.writable(),
                    )?),
                    Arc::new(table::RocksTables {
                        db: db.clone(),
                        path: root.join(CATALOG_DIR),
                    }),
                    None,
                ),
                StoreBackend::Rados(target) => {
                    let pool = crate::rados::open_pool(target)?;
                    (
                        Arc::new(crate::rados::RadosBackend::new(
                            pool.clone(),
                            target.clone(),
                            opts.access.writable(),
                        )?),
                        Arc::new(crate::rados::RadosTables::new(
                            pool.clone(),
                            target.clone(),
                            db.clone(),
                        )),
                        Some((pool, target.clone())),
                    )
                }
            };
        drop(guard);
        Ok(Store {
            root: root.to_owned(),
            db,
            tables,
            backend,
            rados,
            id,
            access: opts.access,
            commit_lock: Mutex::new(()),
            gc_guard: RwLock::new(()),
            streamed: RwLock::new(Vec::new()),
            node_sealer: Mutex::new(Sealer::new()),
            _locks: locks,
            _secondary: SecondaryDir(secondary),
        })
    }

    /// Brings a reader's view of the catalog up to date with what writers
    /// (and gc) committed since it opened. A no-op for writers.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn refresh(&self) -> Result<()> {
        if self.access.writable() {
            return Ok(());
        }
        let _guard = lock::CatalogGuard::acquire(&self.root, false)?;
        self.db
            .try_catch_up_with_primary()
            .map_err(|source| Error::Db {
                path: self.root.join(CATALOG_DIR),
                op: "catch up with the catalog".into(),
                source,
            })?;
        self.tables.refresh()
    }

    /// The store's id, from its marker.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the store keeps chunks and shared tables.
    pub fn store_backend(&self) -> StoreBackend {
        match &self.rados {
            None => StoreBackend::Local,
            Some((_, t)) => StoreBackend::Rados(t.clone()),
        }
    }

    /// Held by an import (or a transfer) from its first chunk to its
    /// commit: keeps this process's gc out and, on Ceph, every server's.
    pub(crate) fn import_guard(&self) -> Result<ImportGuard<'_>> {
        // The pool's lock first, as gc takes it: a gc of this process
        // holding it and waiting for the local guard must not wait for us.
        let rados = match &self.rados {
            Some((pool, target)) => Some(crate::rados::GcLock::acquire(
                pool,
                target,
                false,
                GC_LOCK_WAIT,
            )?),
            None => None,
        };
        let local = self.gc_guard.read().unwrap_or_else(|p| p.into_inner());
        Ok(ImportGuard {
            _rados: rados,
            _shared: Some(local),
            _exclusive: None,
        })
    }

    /// Held by gc: excludes this process's imports and, on Ceph, every
    /// server's imports and gcs.
    pub(crate) fn gc_exclusive(&self) -> Result<ImportGuard<'_>> {
        let rados = match &self.rados {
            Some((pool, target)) => Some(crate::rados::GcLock::acquire(
                pool,
                target,
                true,
                GC_LOCK_WAIT,
            )?),
            None => None,
        };
        let local = self.gc_guard.write().unwrap_or_else(|p| p.into_inner());
        Ok(ImportGuard {
            _rados: rados,
            _shared: None,
            _exclusive: Some(local),
        })
    }

    /// A [`GcPin`] for this store: the file lock and, on Ceph, a shared hold
    /// of the pool's gc lock.
    ///
    /// # Errors
    /// Lock failures.
    pub fn gc_pin(&self) -> Result<GcPin> {
        let mut pin = GcPin::acquire(&self.root)?;
        if let Some((pool, target)) = &self.rados {
            pin.rados = Some(crate::rados::GcLock::acquire(
                pool,
                target,
                false,
                GC_LOCK_WAIT,
            )?);
        }
        Ok(pin)
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How the store was opened.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The chunk backend.
    pub fn backend(&self) -> &dyn ChunkBackend {
        &*self.backend
    }

    /// Scratch directory inside the store (same file system as the store).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    pub(crate) fn require_write(&self) -> Result<()> {
        if !self.access.writable() {
            return Err(Error::InvalidInput(format!(
                "store {} is opened read-only",
                self.root.display()
            )));
        }
        Ok(())
    }

    /// Stores a manifest node (if new) and returns its id.
    ///
    /// # Errors
    /// Backend failures.
    pub fn put_node(&self, node: &Node) -> Result<ManifestId> {
        let (id, bytes) = node.encode();
        if !self.backend.has(&id.chunk())? {
            let sealed = self
                .node_sealer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .seal(id.chunk(), &bytes);
            self.backend.put(Sealed::Chunk(sealed))?;
        }
        Ok(id)
    }

    /// The plain bytes of a data chunk.
    ///
    /// # Errors
    /// Missing or corrupt chunk.
    pub fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.backend.get(id)
    }
}

impl Store {
    /// Lets [`NodeSource::load`] of this open store also find the manifest
    /// nodes of a streamed version (only in this process, never in the
    /// backend: a node there promises its whole subtree, and a streamed
    /// version's data is not here). For readers of streamed compositions.
    pub fn attach_streamed(&self, nodes: Arc<crate::remote::StreamNodes>) {
        self.streamed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(nodes);
    }
}

impl NodeSource for Store {
    fn load(&self, id: ManifestId) -> Result<Node> {
        let bytes = match self.backend.get(&id.chunk()) {
            Ok(b) => b,
            Err(Error::ChunkMissing { .. }) => {
                let streamed = self.streamed.read().unwrap_or_else(|p| p.into_inner());
                if let Some(n) = streamed.iter().find_map(|s| s.load(id).ok()) {
                    return Ok(n);
                }
                return Err(Error::ManifestCorrupt {
                    id,
                    reason: "missing from the store".into(),
                });
            }
            Err(Error::ChunkCorrupt { reason, .. }) => {
                return Err(Error::ManifestCorrupt { id, reason })
            }
            Err(other) => return Err(other),
        };
        Node::decode(id, &bytes)
    }
}

/// Removes readers' secondary directories of dead processes from the
/// system's temporary directory.
fn clean_secondaries() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(lock::SECONDARY_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(err) = fs::remove_dir_all(e.path()) {
            tracing::debug!(path = %e.path().display(), %err, "could not clean a reader directory");
        }
    }
}

/// Removes leftovers of dead processes from `tmp/`: reader secondaries and
/// export staging directories whose pid no longer runs.
fn clean_tmp(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(err) = removed {
            tracing::debug!(path = %path.display(), %err, "could not clean scratch entry");
        }
    }
}
