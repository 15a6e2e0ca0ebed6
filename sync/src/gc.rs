//! Garbage collection: mark everything reachable from the refs and the kept
//! reflog entries, then sweep the rest.
//!
//! Safety against writers: gc needs [`Access::Gc`], which excludes other
//! processes' imports and readers (see the store's lock table), and it holds
//! the store's gc guard exclusively, which excludes imports running in this
//! process. So every chunk written by an import is either committed
//! (reachable) before the mark starts, or written after the sweep ends.
//! If the mark cannot read some version or node, nothing is swept: what lies
//! beneath an unreadable node is unknown.

use std::collections::HashSet;
use std::time::Duration;

use rocksdb::{IteratorMode, WriteBatch};
use serde::Serialize;

use crate::backend::ReclaimStats;
use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::id::{ChunkId, VersionId};
use crate::import::{cache_entry_chunks, CacheEntry};
use crate::progress::Progress;
use crate::reach::{roots, Reach, Visitor, Where};
use crate::store::keys::CF_FILECACHE;
use crate::store::table::{Change, Table};
use crate::store::{cf, Access, Store};

/// How to collect.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Drop reflog entries older than this first (their versions become
    /// collectable unless still reachable otherwise). `None` keeps all.
    pub expire_reflog: Option<Duration>,
    /// Report what would be removed without removing it.
    pub dry_run: bool,
}

/// What a collection did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Reflog entries dropped.
    pub reflog_expired: u64,
    /// Versions reachable.
    pub versions_reachable: u64,
    /// Version records removed (no ref, reflog entry or descendant kept
    /// them): their manifests go too, so a later pull fetches them again.
    pub versions_removed: u64,
    /// Chunks (data and manifest nodes) in the store before.
    pub chunks_total: u64,
    /// Chunks reachable.
    pub chunks_reachable: u64,
    /// Chunks removed.
    pub chunks_removed: u64,
    /// Plain bytes of the removed chunks.
    pub bytes_removed: u64,
    /// Import cache entries dropped because their chunks went.
    pub cache_entries_dropped: u64,
    /// Pack files deleted.
    pub packs_deleted: u64,
    /// Pack files rewritten.
    pub packs_rewritten: u64,
    /// Disk bytes released.
    pub bytes_freed: u64,
    /// True when nothing was changed (`dry_run`).
    pub dry_run: bool,
}

struct Abort(Option<String>);

impl Visitor for Abort {
    fn broken(&mut self, at: &Where<'_>, error: Error) {
        self.0.get_or_insert_with(|| format!("{at}: {error}"));
    }
}

impl Store {
    /// Removes every chunk no kept version needs.
    ///
    /// # Errors
    /// A store not opened for gc, an unreadable version or manifest (nothing
    /// is removed then), catalog or I/O failures.
    pub fn gc(&self, opts: &GcOptions, progress: &dyn Progress) -> Result<GcReport> {
        if self.access() != Access::Gc {
            return Err(Error::InvalidInput(
                "garbage collection needs the store opened with gc access".into(),
            ));
        }
        let _guard = self.gc_exclusive()?;
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        if let Some(age) = opts.expire_reflog {
            report.reflog_expired = self.expire_reflog(age, opts.dry_run)?;
        }
        progress.phase("mark", None);
        let roots = roots(self)?;
        let mut abort = Abort(None);
        let reach = Reach::walk(self, &roots, &mut abort);
        if let Some(why) = abort.0 {
            return Err(Error::InvalidInput(format!(
                "gc stopped before removing anything: {why} (run `lamina fsck`)"
            )));
        }
        report.versions_reachable = reach.versions.len() as u64;
        report.chunks_reachable = reach.chunks.len() as u64;

        progress.phase("sweep", None);
        let mut dead = Vec::new();
        self.backend.list(&mut |id, plain| {
            report.chunks_total += 1;
            if !reach.chunks.contains(&id) {
                dead.push(id);
                report.bytes_removed += plain;
            }
            Ok(())
        })?;
        report.chunks_removed = dead.len() as u64;
        let mut dead_versions = Change::default();
        self.tables.scan(Table::Versions, &[], &mut |k, _| {
            let known = VersionId::from_slice(k).is_some_and(|v| reach.versions.contains(&v));
            if !known {
                dead_versions.delete((Table::Versions, k.to_vec()));
                report.versions_removed += 1;
            }
            Ok(true)
        })?;
        if opts.dry_run {
            return Ok(report);
        }
        // The records go before their manifests: a crash between leaves
        // unreachable chunks (the next gc takes them), never a version
        // whose manifest is gone.
        if report.versions_removed > 0 {
            self.apply_change(&dead_versions, WriteBatch::default())?;
        }
        report.cache_entries_dropped = self.prune_cache(&reach.chunks)?;
        for batch in dead.chunks(16 * 1024) {
            self.backend.delete(batch)?;
        }
        progress.phase("reclaim", None);
        let ReclaimStats {
            packs_deleted,
            packs_rewritten,
            bytes_freed,
        } = self.backend.reclaim()?;
        report.packs_deleted = packs_deleted;
        report.packs_rewritten = packs_rewritten;
        report.bytes_freed = bytes_freed;
        Ok(report)
    }

    fn expire_reflog(&self, age: Duration, dry_run: bool) -> Result<u64> {
        let cutoff = now_ns().saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX));
        let mut change = Change::default();
        let mut n = 0;
        self.each_reflog(&[], &mut |key, e| {
            if e.time_ns < cutoff {
                change.delete((Table::Reflog, key.to_vec()));
                n += 1;
            }
            Ok(())
        })?;
        if !dry_run && n > 0 {
            self.apply_change(&change, WriteBatch::default())?;
        }
        Ok(n)
    }

    /// Drops import cache entries naming chunks that are about to go, and
    /// entries of layers that no longer exist.
    fn prune_cache(&self, live: &HashSet<ChunkId>) -> Result<u64> {
        let layers: HashSet<[u8; 16]> = self.layers()?.into_iter().map(|l| l.id.0).collect();
        let fc = cf(&self.db, CF_FILECACHE)?;
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        for item in self.db.iterator_cf(fc, IteratorMode::Start) {
            let (k, v) = item.map_err(|source| Error::Db {
                path: self.root().join("catalog"),
                op: "read import cache".into(),
                source,
            })?;
            let layer_known = k
                .get(..16)
                .and_then(|p| <[u8; 16]>::try_from(p).ok())
                .is_some_and(|p| layers.contains(&p));
            let keep = layer_known
                && postcard::from_bytes::<CacheEntry>(&v)
                    .is_ok_and(|e| cache_entry_chunks(&e).iter().all(|c| live.contains(c)));
            if !keep {
                batch.delete_cf(fc, &k);
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.apply_change(&Change::default(), batch)?;
        }
        Ok(dropped)
    }
}
