//! Catalog operations: layers, versions, refs and the reflog.
//!
//! Refs move only by compare-and-swap: [`Store::commit_version`] reads the
//! ref, compares it with the expected old version and writes the new
//! version, the ref and a reflog entry in one synced change. The change
//! carries its expectations (the ref's old target, the layer record), which
//! the shared tables check atomically with the write: under the store's
//! commit lock and writer lock for the embedded catalog, by a RADOS
//! compare-and-swap for a store on Ceph, where other servers write too.

use std::collections::{BinaryHeap, HashMap};

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{LayerId, VersionId};
use crate::layer::{check_layer_name, Layer, LayerFormat, LayerKind};
use crate::store::keys::{layer_ref, prefix_end, reflog_key, reflog_prefix, CF_FILECACHE};
use crate::store::table::{ApplyError, Change, Table};
use crate::store::{cf, Store};
use crate::version::{SpecBase, Version, VersionSpec};

/// One journalled move of a ref.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflogEntry {
    /// Target before the move (`None`: the ref did not exist).
    pub old: Option<VersionId>,
    /// Target after the move (`None`: the ref was deleted).
    pub new: Option<VersionId>,
    /// When, nanoseconds since the epoch.
    pub time_ns: i64,
    /// What moved it, e.g. `import`.
    pub action: String,
}

/// Current time in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn corrupt(what: String) -> impl FnOnce(postcard::Error) -> Error {
    move |e| Error::RecordCorrupt {
        what,
        reason: e.to_string(),
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail (see `Node::encode`).
    #[allow(clippy::expect_used)]
    postcard::to_allocvec(v).expect("postcard serialises into a Vec")
}

impl Store {
    /// Applies a change with no expectations.
    pub(crate) fn apply_change(&self, change: &Change, local: WriteBatch) -> Result<()> {
        match self.tables.apply(change, local) {
            Ok(()) => Ok(()),
            Err(ApplyError::Fail(e)) => Err(e),
            Err(ApplyError::Expect(i)) => Err(Error::InvalidInput(format!(
                "catalog changed concurrently (expectation {i} of an unconditional change)"
            ))),
        }
    }

    /// Creates a layer.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::LayerExists`], catalog failures.
    pub fn create_layer(&self, name: &str, kind: LayerKind, format: LayerFormat) -> Result<Layer> {
        self.create_layer_as(name, LayerId::random(), kind, format)
    }

    /// Creates a layer with a given identity: the local copy of a layer
    /// checked out from another store keeps the identity its versions name.
    ///
    /// # Errors
    /// As [`Store::create_layer`].
    pub fn create_layer_as(
        &self,
        name: &str,
        id: LayerId,
        kind: LayerKind,
        format: LayerFormat,
    ) -> Result<Layer> {
        self.require_write()?;
        check_layer_name(name)?;
        let layer = Layer {
            id,
            name: name.into(),
            kind,
            format,
            created_ns: now_ns(),
        };
        let mut batch = self.batch()?;
        batch.put_layer(&layer)?;
        self.commit(batch)?;
        Ok(layer)
    }

    /// The layer named `name`.
    ///
    /// # Errors
    /// [`Error::LayerNotFound`], catalog failures.
    pub fn layer(&self, name: &str) -> Result<Layer> {
        let v = self
            .tables
            .get(Table::Layers, name.as_bytes())?
            .ok_or_else(|| Error::LayerNotFound { name: name.into() })?;
        postcard::from_bytes(&v).map_err(corrupt(format!("layers/{name}")))
    }

    /// Every layer, sorted by name.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn layers(&self) -> Result<Vec<Layer>> {
        let mut out = Vec::new();
        self.tables.scan(Table::Layers, &[], &mut |k, v| {
            out.push(
                postcard::from_bytes(v)
                    .map_err(corrupt(format!("layers/{}", String::from_utf8_lossy(k))))?,
            );
            Ok(true)
        })?;
        Ok(out)
    }

    /// Target of ref `name`.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn ref_target(&self, name: &str) -> Result<Option<VersionId>> {
        let v = self.tables.get(Table::Refs, name.as_bytes())?;
        v.map(|v| {
            VersionId::from_slice(&v).ok_or_else(|| Error::RecordCorrupt {
                what: format!("refs/{name}"),
                reason: format!("{} bytes, expected 32", v.len()),
            })
        })
        .transpose()
    }

    /// Every ref and its target.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn refs(&self) -> Result<Vec<(String, VersionId)>> {
        let mut out = Vec::new();
        self.tables.scan(Table::Refs, &[], &mut |k, v| {
            let name = String::from_utf8_lossy(k).into_owned();
            let id = VersionId::from_slice(v).ok_or_else(|| Error::RecordCorrupt {
                what: format!("refs/{name}"),
                reason: format!("{} bytes, expected 32", v.len()),
            })?;
            out.push((name, id));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The head version of `layer`, if it has any.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn head(&self, layer: &Layer) -> Result<Option<VersionId>> {
        self.ref_target(&layer_ref(&layer.name))
    }

    /// The version `id`.
    ///
    /// # Errors
    /// [`Error::VersionCorrupt`] if absent or damaged, catalog failures.
    pub fn version(&self, id: VersionId) -> Result<Version> {
        let v = self
            .tables
            .get(Table::Versions, id.as_bytes())?
            .ok_or_else(|| Error::VersionCorrupt {
                id,
                reason: "missing from the catalog".into(),
            })?;
        Version::decode(id, &v)
    }

    /// Whether version `id` is in the catalog.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn has_version(&self, id: VersionId) -> Result<bool> {
        Ok(self.tables.get(Table::Versions, id.as_bytes())?.is_some())
    }

    /// The layer named `name`, or `None`.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn find_layer(&self, name: &str) -> Result<Option<Layer>> {
        match self.layer(name) {
            Ok(l) => Ok(Some(l)),
            Err(Error::LayerNotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Resolves a version spec (`head`, `head~2`, an id prefix…) of `layer`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a malformed spec,
    /// [`Error::VersionNotFound`], [`Error::VersionAmbiguous`].
    pub fn resolve(&self, layer: &Layer, spec: &str) -> Result<VersionId> {
        let parsed = VersionSpec::parse(spec)?;
        let not_found = || Error::VersionNotFound {
            layer: layer.name.clone(),
            spec: spec.to_owned(),
        };
        let mut id = match &parsed.base {
            SpecBase::Head => self.head(layer)?.ok_or_else(not_found)?,
            SpecBase::Prefix(p) => self.find_prefix(layer, spec, p)?,
        };
        for _ in 0..parsed.back {
            id = *self.version(id)?.parents.first().ok_or_else(not_found)?;
        }
        Ok(id)
    }

    fn find_prefix(&self, layer: &Layer, spec: &str, prefix: &str) -> Result<VersionId> {
        let even = &prefix[..prefix.len() - prefix.len() % 2];
        let start =
            hex::decode(even).map_err(|_| Error::InvalidInput(format!("bad version `{spec}`")))?;
        let mut found = Vec::new();
        self.tables.scan(Table::Versions, &start, &mut |k, v| {
            let Some(id) = VersionId::from_slice(k) else {
                return Ok(true);
            };
            if id.to_hex().starts_with(prefix) && Version::decode(id, v)?.layer == layer.id {
                found.push(id);
            }
            Ok(true)
        })?;
        match found.len() {
            0 => Err(Error::VersionNotFound {
                layer: layer.name.clone(),
                spec: spec.to_owned(),
            }),
            1 => Ok(found[0]),
            _ => Err(Error::VersionAmbiguous {
                layer: layer.name.clone(),
                spec: spec.to_owned(),
                candidates: found.iter().map(|v| v.short()).collect(),
            }),
        }
    }

    /// Versions reachable from the head of `layer`, newest first.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn log(&self, layer: &Layer) -> Result<Vec<(VersionId, Version)>> {
        let mut out = Vec::new();
        let Some(head) = self.head(layer)? else {
            return Ok(out);
        };
        let mut found = HashMap::new();
        let mut heap = BinaryHeap::new();
        let v = self.version(head)?;
        heap.push((v.time_ns, head));
        found.insert(head, Some(v));
        while let Some((_, id)) = heap.pop() {
            let Some(v) = found.get_mut(&id).and_then(Option::take) else {
                continue;
            };
            for p in &v.parents {
                if !found.contains_key(p) {
                    let pv = self.version(*p)?;
                    heap.push((pv.time_ns, *p));
                    found.insert(*p, Some(pv));
                }
            }
            out.push((id, v));
        }
        Ok(out)
    }

    /// Starts a set of catalog changes that [`Store::commit`] applies in one
    /// synced write. The batch holds the store's commit lock until it is
    /// committed or dropped, so the compare-and-swap checks made while
    /// building it stay valid.
    ///
    /// # Errors
    /// A store not opened for writing.
    pub fn batch(&self) -> Result<Batch<'_>> {
        self.require_write()?;
        Ok(Batch {
            store: self,
            inner: WriteBatch::default(),
            change: Change::default(),
            expect_what: Vec::new(),
            refs: HashMap::new(),
            seqs: HashMap::new(),
            _guard: self.commit_lock.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }

    /// Applies a batch; durable when it returns.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn commit(&self, batch: Batch<'_>) -> Result<()> {
        let Batch {
            inner,
            change,
            expect_what,
            ..
        } = batch;
        match self.tables.apply(&change, inner) {
            Ok(()) => Ok(()),
            Err(ApplyError::Fail(e)) => Err(e),
            Err(ApplyError::Expect(i)) => Err(self.broken_expectation(expect_what.get(i))),
        }
    }

    /// The error for an expectation that another writer broke.
    fn broken_expectation(&self, what: Option<&Expected>) -> Error {
        let show = |v: Option<VersionId>| v.map_or_else(|| "nothing".into(), |v| v.short());
        match what {
            Some(Expected::Ref { name, target }) => Error::RefConflict {
                name: name.clone(),
                expected: show(*target),
                found: self
                    .ref_target(name)
                    .map_or_else(|e| format!("unreadable ({e})"), show),
            },
            Some(Expected::NoLayer(name)) => Error::LayerExists { name: name.clone() },
            Some(Expected::Layer(name)) => Error::LayerNotFound { name: name.clone() },
            None => Error::InvalidInput("the catalog changed concurrently".into()),
        }
    }

    /// Writes `version` and moves the head of `layer` to it, provided the
    /// head is still `expected`. `extra` may add changes to the same batch.
    /// Durable when it returns.
    ///
    /// # Errors
    /// [`Error::RefConflict`] if the head moved, catalog failures.
    pub fn commit_version(
        &self,
        layer: &Layer,
        expected: Option<VersionId>,
        version: &Version,
        action: &str,
        extra: &mut dyn FnMut(&mut Batch<'_>) -> Result<()>,
    ) -> Result<VersionId> {
        let mut batch = self.batch()?;
        let id = batch.put_version(version)?;
        batch.move_head(layer, expected, id, action)?;
        extra(&mut batch)?;
        self.commit(batch)?;
        Ok(id)
    }

    fn next_reflog_seq(&self, name: &str) -> Result<u64> {
        let prefix = reflog_prefix(name);
        let Some(k) = self.tables.last_key(Table::Reflog, &prefix)? else {
            return Ok(0);
        };
        let seq = k
            .strip_prefix(prefix.as_slice())
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .ok_or_else(|| Error::RecordCorrupt {
                what: format!("reflog of {name}"),
                reason: "bad sequence number".into(),
            })?;
        Ok(u64::from_be_bytes(seq) + 1)
    }

    /// A named record of `kind` (e.g. a disk definition), if present.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn record(&self, kind: &str, name: &str) -> Result<Option<Vec<u8>>> {
        self.tables.get(Table::Records, &record_key(kind, name))
    }

    /// Every record of `kind`, by name.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = record_key(kind, "");
        let mut out = Vec::new();
        self.tables.scan(Table::Records, &prefix, &mut |k, v| {
            let name = &k[prefix.len()..];
            out.push((String::from_utf8_lossy(name).into_owned(), v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The reflog of ref `name`, oldest first.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn reflog(&self, name: &str) -> Result<Vec<ReflogEntry>> {
        let prefix = reflog_prefix(name);
        let mut out = Vec::new();
        self.each_reflog(&prefix, &mut |_, e| {
            out.push(e);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f(key, entry)` for every reflog entry whose key starts with
    /// `prefix` (empty: all).
    pub(crate) fn each_reflog(
        &self,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], ReflogEntry) -> Result<()>,
    ) -> Result<()> {
        self.tables.scan(Table::Reflog, prefix, &mut |k, v| {
            let e = postcard::from_bytes(v)
                .map_err(corrupt(format!("reflog/{}", String::from_utf8_lossy(k))))?;
            f(k, e)?;
            Ok(true)
        })
    }

    /// Removes a layer and its head ref. The move is journalled, so its
    /// versions stay reachable (and restorable) until the reflog entry is
    /// expired by `gc`.
    ///
    /// # Errors
    /// [`Error::LayerNotFound`], catalog failures.
    pub fn remove_layer(&self, name: &str) -> Result<()> {
        let mut batch = self.batch()?;
        self.remove_layer_in(&mut batch, name)?;
        self.commit(batch)
    }

    /// [`Store::remove_layer`] as part of `batch`.
    pub(crate) fn remove_layer_in(&self, batch: &mut Batch<'_>, name: &str) -> Result<()> {
        let layer = self.layer(name)?;
        batch.expect(
            Table::Layers,
            name.as_bytes(),
            Some(encode(&layer)),
            Expected::Layer(name.to_owned()),
        );
        batch
            .change
            .delete((Table::Layers, name.as_bytes().to_vec()));
        let r = layer_ref(name);
        let head = self.ref_target(&r)?;
        if head.is_some() {
            batch.move_ref(&r, head, None, "layer rm")?;
        }
        let fc = cf(&self.db, CF_FILECACHE)?;
        let start = layer.id.0.to_vec();
        if let Some(end) = prefix_end(&start) {
            batch.inner.delete_range_cf(fc, start, end);
        }
        self.drop_grants(batch, name)?;
        self.drop_policy(batch, name)
    }

    /// Drops every reflog entry of ref `name` (in `batch`, after any move
    /// of it that the batch journals), so gc no longer keeps what they name.
    pub(crate) fn drop_reflog_in(&self, batch: &mut Batch<'_>, name: &str) -> Result<()> {
        batch
            .change
            .delete_prefix((Table::Reflog, reflog_prefix(name)));
        Ok(())
    }
}

/// Key of a record: kind, NUL, name.
fn record_key(kind: &str, name: &str) -> Vec<u8> {
    let mut k = kind.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// Catalog changes applied together by [`Store::commit`]: records, ref
/// moves (compare-and-swap, journalled) and, for the crate, raw writes.
pub struct Batch<'s> {
    store: &'s Store,
    /// Writes to the store's own RocksDB (the import cache).
    pub(crate) inner: WriteBatch,
    /// Writes to the shared tables, with their expectations.
    pub(crate) change: Change,
    /// What each expectation of `change` stands for, to name a conflict.
    expect_what: Vec<Expected>,
    /// Targets planned by this batch, so a second move of the same ref in
    /// it compares against the first.
    refs: HashMap<String, Option<VersionId>>,
    seqs: HashMap<String, u64>,
    _guard: std::sync::MutexGuard<'s, ()>,
}

/// What an expectation of a batch stands for.
#[derive(Debug, Clone)]
enum Expected {
    /// Ref `name` is at `target`.
    Ref {
        name: String,
        target: Option<VersionId>,
    },
    /// No layer is named so.
    NoLayer(String),
    /// The layer is still the one the batch was built for.
    Layer(String),
}

impl Batch<'_> {
    fn expect(&mut self, t: Table, key: &[u8], value: Option<Vec<u8>>, what: Expected) {
        self.change.expect.push((t, key.to_vec(), value));
        self.expect_what.push(what);
    }

    /// Where this batch moves ref `name`, if it moves it (`None` also when
    /// it deletes it).
    pub fn planned(&self, name: &str) -> Option<VersionId> {
        self.refs.get(name).copied().flatten()
    }

    /// Where ref `name` points once this batch is applied.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn target(&self, name: &str) -> Result<Option<VersionId>> {
        match self.refs.get(name) {
            Some(planned) => Ok(*planned),
            None => self.store.ref_target(name),
        }
    }

    /// Stores a record of `kind` under `name`.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn put_record(&mut self, kind: &str, name: &str, value: &[u8]) -> Result<()> {
        self.change
            .put((Table::Records, record_key(kind, name), value.to_vec()));
        Ok(())
    }

    /// Deletes a record.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn delete_record(&mut self, kind: &str, name: &str) -> Result<()> {
        self.change.delete((Table::Records, record_key(kind, name)));
        Ok(())
    }

    /// Stores a layer record (a layer arriving from another store).
    ///
    /// # Errors
    /// [`Error::LayerExists`] for a taken name, catalog failures.
    pub fn put_layer(&mut self, layer: &Layer) -> Result<()> {
        check_layer_name(&layer.name)?;
        let key = layer.name.as_bytes();
        if self.store.tables.get(Table::Layers, key)?.is_some() {
            return Err(Error::LayerExists {
                name: layer.name.clone(),
            });
        }
        self.expect(
            Table::Layers,
            key,
            None,
            Expected::NoLayer(layer.name.clone()),
        );
        self.change
            .put((Table::Layers, key.to_vec(), encode(layer)));
        Ok(())
    }

    /// Stores `version` as part of the batch and returns its id.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn put_version(&mut self, version: &Version) -> Result<VersionId> {
        let (id, bytes) = version.encode();
        self.change
            .put((Table::Versions, id.as_bytes().to_vec(), bytes));
        Ok(id)
    }

    /// Moves the head of `layer` from `expected` to `new`, journalled, after
    /// checking that the layer still exists (it may have been removed since
    /// the caller looked it up).
    ///
    /// # Errors
    /// [`Error::LayerNotFound`], [`Error::RefConflict`] if the head moved.
    pub fn move_head(
        &mut self,
        layer: &Layer,
        expected: Option<VersionId>,
        new: VersionId,
        action: &str,
    ) -> Result<()> {
        let current = self.store.layer(&layer.name)?;
        if current.id != layer.id {
            return Err(Error::LayerNotFound {
                name: layer.name.clone(),
            });
        }
        self.expect(
            Table::Layers,
            layer.name.as_bytes(),
            Some(encode(&current)),
            Expected::Layer(layer.name.clone()),
        );
        self.move_ref(&layer_ref(&layer.name), expected, Some(new), action)
    }

    /// Moves ref `name` from `expected` to `new` (`None`: absent / delete),
    /// journalling the move.
    ///
    /// # Errors
    /// [`Error::RefConflict`] if the ref is not at `expected`.
    pub fn move_ref(
        &mut self,
        name: &str,
        expected: Option<VersionId>,
        new: Option<VersionId>,
        action: &str,
    ) -> Result<()> {
        let current = match self.refs.get(name) {
            Some(planned) => *planned,
            None => self.store.ref_target(name)?,
        };
        if current != expected {
            let show = |v: Option<VersionId>| v.map_or_else(|| "nothing".into(), |v| v.short());
            return Err(Error::RefConflict {
                name: name.to_owned(),
                expected: show(expected),
                found: show(current),
            });
        }
        if !self.refs.contains_key(name) {
            // The first move of the ref in this batch: the shared tables
            // check, atomically with the write, that nobody moved it since.
            self.expect(
                Table::Refs,
                name.as_bytes(),
                current.map(|v| v.as_bytes().to_vec()),
                Expected::Ref {
                    name: name.to_owned(),
                    target: current,
                },
            );
        }
        let key = name.as_bytes().to_vec();
        match new {
            Some(v) => self.change.put((Table::Refs, key, v.as_bytes().to_vec())),
            None => self.change.delete((Table::Refs, key)),
        }
        let entry = ReflogEntry {
            old: current,
            new,
            time_ns: now_ns(),
            action: action.to_owned(),
        };
        let seq = match self.seqs.get(name) {
            Some(s) => *s,
            None => self.store.next_reflog_seq(name)?,
        };
        self.seqs.insert(name.to_owned(), seq + 1);
        self.refs.insert(name.to_owned(), new);
        self.change
            .put((Table::Reflog, reflog_key(name, seq), encode(&entry)));
        Ok(())
    }
}

/// RFC 3339 UTC time (seconds) of nanoseconds since the epoch.
pub fn rfc3339(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
