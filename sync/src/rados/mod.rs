//! Stores on Ceph: the chunk backend and the shared catalog tables in a
//! RADOS pool.
//!
//! Objects of a store in its pool:
//!
//! ```text
//! lamina.store        marker: format and store id
//! lamina.catalog      omap: layers, versions, refs, reflog, records
//!                     (one key space, so a change is one atomic write op
//!                     whose omap comparisons are the refs' compare-and-swap)
//! lamina.idx.X        omap: chunk index, 16 shards by the id's first hex digit
//! lamina.pack.ID      packs of chunk records (the local backend's format)
//! lamina.gc           advisory lock: imports shared, gc exclusive
//! ```
//!
//! librados is synchronous; callers are on plain threads (the sync API runs
//! store work in `spawn_blocking`), and concurrency inside one call comes
//! from librados' own asynchronous operations.

mod backend;
mod ffi;
mod lock;
mod tables;

use std::path::PathBuf;
use std::sync::Arc;

pub use backend::RadosBackend;
pub use ffi::RadosError;
pub(crate) use ffi::{Cluster, Pool, WriteOp};
pub(crate) use lock::GcLock;
pub(crate) use tables::RadosTables;

use crate::error::{Error, Result};

/// Marker object of a store in a pool.
pub(crate) const STORE_OBJECT: &str = "lamina.store";
/// The shared catalog tables.
pub(crate) const CATALOG_OBJECT: &str = "lamina.catalog";
/// The gc lock object.
pub(crate) const GC_OBJECT: &str = "lamina.gc";

/// Where a store on Ceph is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosTarget {
    /// The pool holding the store.
    pub pool: String,
    /// `ceph.conf` (librados' default search when `None`).
    pub conf: Option<PathBuf>,
    /// Ceph user without `client.` (e.g. `admin`).
    pub user: String,
    /// Seconds after which monitor and OSD operations give up.
    pub timeout_secs: u32,
}

impl RadosTarget {
    /// A target with the default user and timeout.
    pub fn new(pool: &str, conf: Option<PathBuf>) -> RadosTarget {
        RadosTarget {
            pool: pool.to_owned(),
            conf,
            user: "admin".into(),
            timeout_secs: 30,
        }
    }

    pub(crate) fn err(&self) -> impl Fn(RadosError) -> Error + '_ {
        move |source| Error::Rados {
            pool: self.pool.clone(),
            source,
        }
    }

    /// Connects and opens the pool, creating it if `create` and missing.
    ///
    /// # Errors
    /// [`Error::Rados`]: the library missing, the cluster unreachable within
    /// the timeout, no such pool.
    pub(crate) fn connect(&self, create: bool) -> Result<Arc<Pool>> {
        let conf = self.conf.as_ref().map(|p| p.to_string_lossy().into_owned());
        let cluster = Arc::new(
            Cluster::connect(conf.as_deref(), &self.user, self.timeout_secs).map_err(self.err())?,
        );
        if !cluster.pool_exists(&self.pool).map_err(self.err())? {
            if !create {
                return Err(Error::InvalidInput(format!(
                    "RADOS pool {} does not exist",
                    self.pool
                )));
            }
            cluster.pool_create(&self.pool).map_err(self.err())?;
        }
        Ok(Arc::new(cluster.pool(&self.pool).map_err(self.err())?))
    }
}

/// Prepares `target`'s pool for a store (creating the pool if missing) and
/// returns the store id; joins the store already there, if any.
///
/// # Errors
/// The cluster unreachable, a refused write.
pub(crate) fn init_pool(target: &RadosTarget) -> Result<String> {
    let pool = target.connect(true)?;
    let id = hex::encode(rand::random::<[u8; 16]>());
    let create = WriteOp {
        create_exclusive: true,
        set: vec![
            ("format".into(), b"1".to_vec()),
            ("id".into(), id.clone().into_bytes()),
        ],
        ..WriteOp::default()
    };
    let id = match pool.operate(STORE_OBJECT, &create) {
        Ok(()) => id,
        Err(ffi::OpError::Rados(e)) if e.errno == libc::EEXIST => store_id(&pool, target)?,
        Err(ffi::OpError::Rados(e)) => return Err((target.err())(e)),
        // No comparisons in the op: cannot happen.
        Err(ffi::OpError::Compare(_)) => id,
    };
    let catalog = WriteOp {
        create_exclusive: true,
        ..WriteOp::default()
    };
    match pool.operate(CATALOG_OBJECT, &catalog) {
        Ok(()) => {}
        Err(ffi::OpError::Rados(e)) if e.errno == libc::EEXIST => {}
        Err(ffi::OpError::Rados(e)) => return Err((target.err())(e)),
        Err(ffi::OpError::Compare(_)) => {}
    }
    Ok(id)
}

fn store_id(pool: &Pool, target: &RadosTarget) -> Result<String> {
    let not_store = || {
        Error::InvalidInput(format!(
            "RADOS pool {} holds no Lamina store (create one with `lamina init --backend rados --pool {}`)",
            target.pool, target.pool
        ))
    };
    let pairs = match pool.omap_get(STORE_OBJECT, &["id".to_owned()]) {
        Ok(p) => p,
        Err(e) if e.errno == libc::ENOENT => return Err(not_store()),
        Err(e) => return Err((target.err())(e)),
    };
    pairs
        .into_iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
        .ok_or_else(not_store)
}

/// Opens the pool of an existing store on Ceph.
///
/// # Errors
/// The cluster unreachable, no store in the pool.
pub(crate) fn open_pool(target: &RadosTarget) -> Result<Arc<Pool>> {
    let pool = target.connect(false)?;
    store_id(&pool, target)?;
    Ok(pool)
}
