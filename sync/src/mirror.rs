//! Mirrors: a second, complete copy of a store in another backend (a
//! directory — a mounted NFS share or any file system — or a RADOS pool),
//! kept up to date pass by pass.
//!
//! What remains to copy is the difference between the two catalogs: the
//! versions the mirror lacks, and the refs, layers, records and reflog that
//! differ. That difference is the replication queue. It is persistent by
//! construction (nothing is lost when either side stops) and a pass
//! resumes where the last one stopped: chunks are stored in durable
//! batches and a later pass skips what arrived. A pass copies in an order
//! that keeps the mirror consistent at every moment: data chunks, then
//! manifest nodes (children before parents), then version records, then
//! layers and records, and the refs last, so a ref never names a version
//! whose data is not there.

use std::collections::HashSet;

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::chunk::Sealed;
use crate::error::Result;
use crate::id::{ChunkId, ManifestId, VersionId};
use crate::progress::Progress;
use crate::reach::{roots, Reach, Visitor, Where};
use crate::store::table::{Change, Table};
use crate::store::Store;
use crate::transfer::RecordSource;
use crate::version::Version;

/// Record kind of mirror definitions (`lamina mirror add`); a mirror pass
/// does not copy these.
pub const MIRROR_RECORD: &str = "mirror";

/// What a pass copied.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorReport {
    /// Version records copied.
    pub versions: u64,
    /// Chunks (data and manifest nodes) the mirror did not have.
    pub chunks: u64,
    /// Bytes of the records copied (as stored).
    pub bytes: u64,
    /// Catalog entries (refs, layers, records, reflog) written or removed.
    pub entries: u64,
}

/// How far a mirror is behind its source.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MirrorLag {
    /// Versions the mirror lacks.
    pub versions: u64,
    /// Refs that differ (missing, elsewhere, or gone from the source).
    pub refs: u64,
    /// Chunks the mirror lacks.
    pub chunks: u64,
    /// Their plain bytes.
    pub bytes: u64,
}

impl MirrorLag {
    /// Whether the mirror holds everything.
    pub fn is_zero(&self) -> bool {
        *self == MirrorLag::default()
    }
}

/// A walk that only counts.
struct Quiet;

impl Visitor for Quiet {
    fn broken(&mut self, at: &Where<'_>, error: crate::Error) {
        tracing::debug!(%at, %error, "unreadable while measuring a mirror's lag");
    }
}

/// Reads records from a store, for a closure fetch into another.
struct StoreSource<'a> {
    store: &'a Store,
}

impl RecordSource for StoreSource<'_> {
    fn fetch(&mut self, ids: &[ChunkId]) -> Result<Vec<Sealed>> {
        let mut out = Vec::new();
        let mut covered: HashSet<ChunkId> = HashSet::new();
        for id in ids {
            if covered.contains(id) {
                continue;
            }
            let sealed = self.store.backend.get_sealed(id)?;
            match &sealed {
                Sealed::Chunk(c) => {
                    covered.insert(c.id);
                }
                Sealed::Frame(f) => covered.extend(f.members.iter().map(|m| m.0)),
            }
            out.push(sealed);
        }
        Ok(out)
    }
}

fn version_ids(store: &Store) -> Result<Vec<(VersionId, Vec<u8>)>> {
    let mut out = Vec::new();
    store.tables.scan(Table::Versions, &[], &mut |k, v| {
        if let Some(id) = VersionId::from_slice(k) {
            out.push((id, v.to_vec()));
        }
        Ok(true)
    })?;
    Ok(out)
}

fn table(store: &Store, t: Table) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    store.tables.scan(t, &[], &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        Ok(true)
    })?;
    Ok(out)
}

impl Store {
    /// One mirror pass: copies into `mirror` what it lacks (see the module
    /// doc). Interrupted, it leaves the mirror consistent and behind.
    ///
    /// # Errors
    /// Read failures here, write failures in the mirror (a full or vanished
    /// target).
    pub fn mirror_into(&self, mirror: &Store, progress: &dyn Progress) -> Result<MirrorReport> {
        mirror.require_write()?;
        let mut report = MirrorReport::default();
        let mut missing: Vec<(VersionId, Version, Vec<u8>)> = Vec::new();
        for (id, bytes) in version_ids(self)? {
            if !mirror.has_version(id)? {
                missing.push((id, Version::decode(id, &bytes)?, bytes));
            }
        }
        let roots: Vec<ManifestId> = missing.iter().map(|(_, v, _)| v.root).collect();
        let stats = mirror.fetch_closure(&roots, &mut StoreSource { store: self }, progress)?;
        report.chunks = stats.chunks_new;
        report.bytes = stats.bytes;
        // Version records only once everything under them is durable.
        let mut change = Change::default();
        for (id, _, bytes) in missing {
            change.put((Table::Versions, id.as_bytes().to_vec(), bytes));
            report.versions += 1;
            if change.ops.len() >= 1024 {
                mirror.apply_change(&change, WriteBatch::default())?;
                change = Change::default();
            }
        }
        mirror.apply_change(&change, WriteBatch::default())?;
        // A mirror's own definitions stay out of it: a copy that becomes
        // a store in service must not start mirroring over its siblings.
        let mut definitions = MIRROR_RECORD.as_bytes().to_vec();
        definitions.push(0);
        for t in [Table::Layers, Table::Records, Table::Reflog, Table::Refs] {
            let skip = (t == Table::Records).then_some(definitions.as_slice());
            report.entries += self.copy_table(mirror, t, true, skip)?;
        }
        Ok(report)
    }

    /// How far `mirror` is behind this store.
    ///
    /// # Errors
    /// Read failures on either side.
    pub fn mirror_lag(&self, mirror: &Store) -> Result<MirrorLag> {
        let mut lag = MirrorLag::default();
        for (id, _) in version_ids(self)? {
            if !mirror.has_version(id)? {
                lag.versions += 1;
            }
        }
        let mine = table(self, Table::Refs)?;
        let theirs = table(mirror, Table::Refs)?;
        let theirs_set: HashSet<_> = theirs.iter().collect();
        let mine_keys: HashSet<_> = mine.iter().map(|(k, _)| k).collect();
        lag.refs = mine.iter().filter(|e| !theirs_set.contains(e)).count() as u64
            + theirs
                .iter()
                .filter(|(k, _)| !mine_keys.contains(k))
                .count() as u64;
        // Only what a kept version reaches: garbage awaiting gc here is
        // never copied.
        let reach = Reach::walk(self, &roots(self)?, &mut Quiet);
        let mut ids = Vec::new();
        let mut lens = Vec::new();
        self.backend.list(&mut |id, len| {
            if reach.chunks.contains(&id) {
                ids.push(id);
                lens.push(len);
            }
            Ok(())
        })?;
        for (batch, lens) in ids.chunks(4096).zip(lens.chunks(4096)) {
            for (have, len) in mirror.backend.has_many(batch)?.into_iter().zip(lens) {
                if !have {
                    lag.chunks += 1;
                    lag.bytes += len;
                }
            }
        }
        Ok(lag)
    }
}
