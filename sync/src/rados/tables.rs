//! The shared catalog tables in the omap of one RADOS object.
//!
//! Keys are a one-letter table tag followed by the hex of the table's key
//! (hex keeps byte order, and omap keys are C strings), so a prefix scan of
//! a table is an omap scan with a filter prefix. A [`Change`] is one write
//! op on the object: an omap comparison per expectation, then the sets and
//! removals. The OSD applies the op atomically, and only if every
//! comparison holds — the compare-and-swap that lets several servers move
//! refs in one pool without losing a push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rocksdb::{WriteBatch, WriteOptions, DB};

use super::ffi::OpError;
use super::{Pool, RadosTarget, WriteOp, CATALOG_OBJECT};
use crate::error::{Error, Result};
use crate::store::table::{ApplyError, Change, Table, Tables, Visit};

/// omap pairs fetched per page of a scan.
const PAGE: u64 = 1024;
/// Writes of an unconditional change sent per op (an OSD op has a size limit).
const OPS_PER_WRITE: usize = 2048;
/// Immutable version records kept in memory.
const VERSION_CACHE: usize = 65_536;

fn tag(t: Table) -> char {
    match t {
        Table::Layers => 'L',
        Table::Versions => 'V',
        Table::Refs => 'R',
        Table::Reflog => 'G',
        Table::Records => 'C',
    }
}

fn omap_key(t: Table, key: &[u8]) -> String {
    let mut s = String::with_capacity(1 + key.len() * 2);
    s.push(tag(t));
    s.push_str(&hex::encode(key));
    s
}

/// The catalog tables of a store on Ceph.
pub(crate) struct RadosTables {
    pool: Arc<Pool>,
    target: RadosTarget,
    /// The store's own RocksDB, for `local` writes.
    db: Arc<DB>,
    versions: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
}

impl RadosTables {
    pub(crate) fn new(pool: Arc<Pool>, target: RadosTarget, db: Arc<DB>) -> RadosTables {
        RadosTables {
            pool,
            target,
            db,
            versions: Mutex::new(HashMap::new()),
        }
    }

    fn decode_key(&self, t: Table, k: &str) -> Result<Vec<u8>> {
        hex::decode(&k[1..]).map_err(|_| Error::RecordCorrupt {
            what: format!("{}/{CATALOG_OBJECT} key {k}", self.target.pool),
            reason: format!("not a {t:?} key"),
        })
    }

    fn write(&self, op: &WriteOp) -> std::result::Result<(), ApplyError> {
        match self.pool.operate(CATALOG_OBJECT, op) {
            Ok(()) => Ok(()),
            Err(OpError::Compare(i)) => Err(ApplyError::Expect(i)),
            Err(OpError::Rados(e)) => Err(ApplyError::Fail((self.target.err())(e))),
        }
    }
}

impl Tables for RadosTables {
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if t == Table::Versions {
            let cache = self.versions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = cache.get(key) {
                return Ok(Some(v.clone()));
            }
        }
        let k = omap_key(t, key);
        let found = self
            .pool
            .omap_get(CATALOG_OBJECT, std::slice::from_ref(&k))
            .map_err(self.target.err())?
            .into_iter()
            .find(|(fk, _)| *fk == k)
            .map(|(_, v)| v);
        if let (Table::Versions, Some(v)) = (t, &found) {
            let mut cache = self.versions.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= VERSION_CACHE {
                cache.clear();
            }
            cache.insert(key.to_vec(), v.clone());
        }
        Ok(found)
    }

    fn scan(&self, t: Table, prefix: &[u8], f: &mut Visit<'_>) -> Result<()> {
        let filter = omap_key(t, prefix);
        let mut after = String::new();
        loop {
            let page = self
                .pool
                .omap_page(CATALOG_OBJECT, &after, &filter, PAGE)
                .map_err(self.target.err())?;
            for (k, v) in &page.pairs {
                if !f(&self.decode_key(t, k)?, v)? {
                    return Ok(());
                }
            }
            match page.pairs.last() {
                Some((k, _)) if page.more => after = k.clone(),
                _ => return Ok(()),
            }
        }
    }

    fn last_key(&self, t: Table, prefix: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut last = None;
        self.scan(t, prefix, &mut |k, _| {
            last = Some(k.to_vec());
            Ok(true)
        })?;
        Ok(last)
    }

    fn apply(&self, change: &Change, local: WriteBatch) -> std::result::Result<(), ApplyError> {
        let (prefixes, keys) = change.resolve();
        let mut op = WriteOp {
            compare: change
                .expect
                .iter()
                .map(|(t, k, v)| (omap_key(*t, k), v.clone().unwrap_or_default()))
                .collect(),
            ..WriteOp::default()
        };
        for (t, prefix) in &prefixes {
            self.scan(*t, prefix, &mut |k, _| {
                if !keys.contains_key(&(*t, k.to_vec())) {
                    op.remove.push(omap_key(*t, k));
                }
                Ok(true)
            })?;
        }
        for ((t, k), v) in &keys {
            match v {
                Some(v) => op.set.push((omap_key(*t, k), v.clone())),
                None => op.remove.push(omap_key(*t, k)),
            }
        }
        if op.compare.is_empty() && op.set.len() + op.remove.len() > OPS_PER_WRITE {
            // Nothing to compare: pieces applied one after the other are
            // as good as one (gc's removals of dead versions, expiry).
            for set in op.set.chunks(OPS_PER_WRITE) {
                self.write(&WriteOp {
                    set: set.to_vec(),
                    ..WriteOp::default()
                })?;
            }
            for remove in op.remove.chunks(OPS_PER_WRITE) {
                self.write(&WriteOp {
                    remove: remove.to_vec(),
                    ..WriteOp::default()
                })?;
            }
        } else if !op.is_empty() {
            self.write(&op)?;
        }
        {
            let mut cache = self.versions.lock().unwrap_or_else(|p| p.into_inner());
            for ((t, k), v) in &keys {
                if *t == Table::Versions && v.is_none() {
                    cache.remove(k);
                }
            }
        }
        if !local.is_empty() {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            self.db.write_opt(local, &wo).map_err(|source| {
                ApplyError::Fail(Error::Db {
                    path: self.db.path().to_owned(),
                    op: "write the local catalog".into(),
                    source,
                })
            })?;
        }
        Ok(())
    }
}
