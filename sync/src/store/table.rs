//! The shared tables of the catalog and where they live.
//!
//! Layers, versions, refs, the reflog and records are the part of a store
//! that several servers on one Ceph pool must agree on. [`Tables`] hides
//! where they are kept: in the store's own RocksDB ([`RocksTables`], the
//! embedded default) or in the omap of one RADOS object
//! (`crate::rados::RadosTables`). A [`Change`] is applied atomically and
//! only if each of its expectations still holds, which is how a ref moves by
//! compare-and-swap on either.
//!
//! What stays local to one process's directory — the import cache and the
//! local backend's chunk index — is written in the same call (`local`), in
//! the same RocksDB batch for the embedded store and just after the shared
//! change for RADOS.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use crate::error::{Error, Result};
use crate::store::cf;
use crate::store::keys::{prefix_end, CF_LAYERS, CF_RECORDS, CF_REFLOG, CF_REFS, CF_VERSIONS};

/// A shared table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Table {
    Layers,
    Versions,
    Refs,
    Reflog,
    Records,
}

impl Table {
    /// Its column family in RocksDB.
    pub(crate) fn cf(self) -> &'static str {
        match self {
            Table::Layers => CF_LAYERS,
            Table::Versions => CF_VERSIONS,
            Table::Refs => CF_REFS,
            Table::Reflog => CF_REFLOG,
            Table::Records => CF_RECORDS,
        }
    }
}

/// One write of a [`Change`].
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Put(Table, Vec<u8>, Vec<u8>),
    Delete(Table, Vec<u8>),
    /// Every key starting with the prefix.
    DeletePrefix(Table, Vec<u8>),
}

/// Changes to the shared tables, applied together or not at all, with the
/// effect of applying their writes in order.
#[derive(Debug, Default, Clone)]
pub(crate) struct Change {
    /// (table, key, value it must have; `None`: absent). Stored values are
    /// never empty, so RADOS can compare an absent key as an empty value.
    pub expect: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>,
    pub ops: Vec<Op>,
}

/// The net effect of a change: prefixes to clear first, then each key's
/// final state (`None`: deleted).
pub(crate) type Resolved = (
    Vec<(Table, Vec<u8>)>,
    BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
);

impl Change {
    pub(crate) fn put(&mut self, (t, k, v): (Table, Vec<u8>, Vec<u8>)) {
        self.ops.push(Op::Put(t, k, v));
    }

    pub(crate) fn delete(&mut self, (t, k): (Table, Vec<u8>)) {
        self.ops.push(Op::Delete(t, k));
    }

    pub(crate) fn delete_prefix(&mut self, (t, p): (Table, Vec<u8>)) {
        self.ops.push(Op::DeletePrefix(t, p));
    }

    /// The net effect of the writes in order.
    pub(crate) fn resolve(&self) -> Resolved {
        let mut prefixes = Vec::new();
        let mut keys = BTreeMap::new();
        for op in &self.ops {
            match op {
                Op::Put(t, k, v) => {
                    keys.insert((*t, k.clone()), Some(v.clone()));
                }
                Op::Delete(t, k) => {
                    keys.insert((*t, k.clone()), None);
                }
                Op::DeletePrefix(t, p) => {
                    keys.retain(|(kt, k), _| !(kt == t && k.starts_with(p)));
                    prefixes.push((*t, p.clone()));
                }
            }
        }
        (prefixes, keys)
    }
}

/// Why a [`Change`] was not applied.
#[derive(Debug)]
pub(crate) enum ApplyError {
    /// Expectation number `i` did not hold; nothing was written.
    Expect(usize),
    /// Any other failure; nothing was written.
    Fail(Error),
}

impl From<Error> for ApplyError {
    fn from(e: Error) -> ApplyError {
        ApplyError::Fail(e)
    }
}

/// What [`Tables::scan`] calls for each pair; false stops the scan.
pub(crate) type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'a;

/// Where the shared tables live.
pub(crate) trait Tables: Send + Sync {
    /// The value of `key`.
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Calls `f(key, value)` for the keys starting with `prefix`, in byte
    /// order, until it returns false.
    fn scan(&self, t: Table, prefix: &[u8], f: &mut Visit<'_>) -> Result<()>;

    /// The greatest key starting with `prefix`.
    fn last_key(&self, t: Table, prefix: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Applies `change` and `local` (writes to the store's own RocksDB)
    /// if every expectation holds. Durable when it returns.
    fn apply(&self, change: &Change, local: WriteBatch) -> std::result::Result<(), ApplyError>;

    /// Catches up with what other processes committed (a RocksDB reader).
    fn refresh(&self) -> Result<()> {
        Ok(())
    }
}

/// The tables in the store's own RocksDB.
pub(crate) struct RocksTables {
    pub db: Arc<DB>,
    pub path: PathBuf,
}

impl RocksTables {
    fn err(&self, op: &str) -> impl FnOnce(rocksdb::Error) -> Error + '_ {
        let op = op.to_owned();
        move |source| Error::Db {
            path: self.path.clone(),
            op,
            source,
        }
    }
}

impl Tables for RocksTables {
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get_pinned_cf(cf(&self.db, t.cf())?, key)
            .map_err(self.err("read catalog"))?
            .map(|v| v.to_vec()))
    }

    fn scan(&self, t: Table, prefix: &[u8], f: &mut Visit<'_>) -> Result<()> {
        let handle = cf(&self.db, t.cf())?;
        let iter = self
            .db
            .iterator_cf(handle, IteratorMode::From(prefix, Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(self.err("read catalog"))?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn last_key(&self, t: Table, prefix: &[u8]) -> Result<Option<Vec<u8>>> {
        let handle = cf(&self.db, t.cf())?;
        let end = prefix_end(prefix);
        let mode = match &end {
            Some(end) => IteratorMode::From(end, Direction::Reverse),
            None => IteratorMode::End,
        };
        for item in self.db.iterator_cf(handle, mode) {
            let (k, _) = item.map_err(self.err("read catalog"))?;
            if k.starts_with(prefix) {
                return Ok(Some(k.to_vec()));
            }
            if k.as_ref() < prefix {
                break;
            }
        }
        Ok(None)
    }

    fn apply(&self, change: &Change, mut local: WriteBatch) -> std::result::Result<(), ApplyError> {
        // Callers hold the store's commit lock and the writer lock keeps
        // other processes out, so the check and the write cannot interleave
        // with another change.
        for (i, (t, key, want)) in change.expect.iter().enumerate() {
            if self.get(*t, key)? != *want {
                return Err(ApplyError::Expect(i));
            }
        }
        let (prefixes, keys) = change.resolve();
        for (t, prefix) in &prefixes {
            let handle = cf(&self.db, t.cf())?;
            match prefix_end(prefix) {
                Some(end) => local.delete_range_cf(handle, prefix.clone(), end),
                None => {
                    let mut doomed = Vec::new();
                    self.scan(*t, prefix, &mut |k, _| {
                        doomed.push(k.to_vec());
                        Ok(true)
                    })?;
                    for k in doomed {
                        local.delete_cf(handle, k);
                    }
                }
            }
        }
        for ((t, key), value) in keys {
            let handle = cf(&self.db, t.cf())?;
            match value {
                Some(v) => local.put_cf(handle, key, v),
                None => local.delete_cf(handle, key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(local, &wo)
            .map_err(self.err("commit catalog batch"))
            .map_err(ApplyError::Fail)
    }

    fn refresh(&self) -> Result<()> {
        self.db
            .try_catch_up_with_primary()
            .map_err(self.err("catch up with the catalog"))
    }
}
