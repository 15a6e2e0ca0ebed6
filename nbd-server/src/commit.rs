//! `lamina disk commit`: a disk's changed clusters become a new version of
//! a disk layer — offline, or by the process serving the disk while a VM
//! keeps running on it.
//!
//! The new version holds the disk's whole content: the clusters of the
//! version its content last became (the `disk-live` record of a served
//! commit, else its base) plus the changed clusters read from the overlay.
//! It descends from that version; if the layer's head moved meanwhile (a
//! sync merged another machine's check-in) it is merged three ways with
//! the head through the mediator, per cluster, with the layer's policy
//! (`manual` keeps the head's clusters and the disk's version on a
//! conflict ref: there is no admin to wait for here).
//!
//! **Offline** the disk's base moves to the result and the overlay and
//! block map are emptied, as before; a crash between leaves the old
//! overlay over the new base: the same content.
//!
//! **Served** the overlay stays (a running VM reads it). Writes are held
//! back for the moment it takes to flush and read the changed clusters; the
//! block map is then set aside (`blockmap.committing`) and a fresh one
//! records the writes that follow. Once the version is committed the
//! set-aside map is deleted; if the commit fails or the process dies first,
//! its changes are given back to the block map, so a later commit takes
//! them again — a cluster may be committed twice, never missed.

use std::fs;
use std::sync::Arc;

use lamina_sync::chunk::{is_zero, seal, Sealed, CLUSTER_SIZE};
use lamina_sync::manifest::{DiskBuilder, DiskRoot, Node, Root};
use lamina_sync::merge::ConflictRecord;
use lamina_sync::{now_ns, ChunkId, Layer, LayerFormat, Store, Version, VersionId};
use serde::{Deserialize, Serialize};

use crate::blockmap::BlockMap;
use crate::disk::{self, disk_ref, DiskBase, DiskRecord, LIVE_KIND, RECORD_KIND};
use crate::error::{Error, IoContext, Result};
use crate::export::DiskExport;
use crate::qcow::{Backing, Qcow2};

/// Result of a commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitReport {
    /// Disk.
    pub disk: String,
    /// Layer that received the version.
    pub layer: String,
    /// The layer's head afterwards (`None` if nothing changed).
    pub version: Option<VersionId>,
    /// Clusters written.
    pub clusters: u64,
    /// Of which new chunks.
    pub chunks_new: u64,
    /// Whether the disk stayed served (its overlay kept).
    #[serde(default)]
    pub live: bool,
    /// Conflicts met merging with a head that had moved.
    #[serde(default)]
    pub conflict: Option<ConflictRecord>,
}

/// Where a commit lands and what it builds on.
struct Target {
    layer: Layer,
    head: Option<VersionId>,
    /// The version holding the disk's content before its changes.
    content: Option<VersionId>,
    /// The parent of the new version.
    parent: Option<VersionId>,
}

fn target(store: &Store, rec: &DiskRecord, to: Option<&str>) -> Result<Target> {
    let name = match (to, &rec.base) {
        (Some(t), _) => t.to_owned(),
        (None, Some(b)) => b.layer.clone(),
        (None, None) => {
            return Err(Error::InvalidInput(format!(
                "disk `{}` has no base; say which layer receives the commit with --to",
                rec.name
            )))
        }
    };
    if let Some(b) = &rec.base {
        if b.is_streaming(store)? {
            return Err(Error::InvalidInput(format!(
                "disk `{}` streams its base {}@{} from remote {}: a commit needs the base in this store first (`lamina pull {} {}`)",
                rec.name,
                b.layer,
                b.version.short(),
                b.stream.as_deref().unwrap_or(""),
                b.stream.as_deref().unwrap_or(""),
                b.layer
            )));
        }
    }
    let layer = store.layer(&name)?;
    if layer.format != LayerFormat::Disk {
        return Err(Error::InvalidInput(format!(
            "layer `{name}` is not a disk layer"
        )));
    }
    let head = store.head(&layer)?;
    let content = match disk::live_version(store, &rec.name)? {
        Some(v) => Some(v),
        None => rec.base.as_ref().map(|b| b.version),
    };
    let own = rec.base.as_ref().is_some_and(|b| b.layer == name);
    Ok(Target {
        parent: if own { content } else { head },
        layer,
        head,
        content,
    })
}

/// Stores the changed clusters' chunks as they are read; zero clusters
/// become holes.
struct Changed<'a> {
    store: &'a Store,
    clusters: Vec<(u64, Option<ChunkId>)>,
    chunks_new: u64,
}

impl Changed<'_> {
    fn add(&mut self, c: u64, data: &[u8]) -> Result<()> {
        if is_zero(data) {
            self.clusters.push((c, None));
            return Ok(());
        }
        let sealed = seal(data);
        let id = sealed.id;
        if self.store.backend().put(Sealed::Chunk(sealed))? > 0 {
            self.chunks_new += 1;
        }
        self.clusters.push((c, Some(id)));
        Ok(())
    }
}

/// The root of `content`'s clusters with `changed` laid over them.
fn build_root(
    store: &Store,
    size: u64,
    content: Option<VersionId>,
    changed: &[(u64, Option<ChunkId>)],
) -> Result<lamina_sync::ManifestId> {
    let mut base = Vec::new();
    if let Some(v) = content {
        if let Root::Disk(d) = store.root_of(v)? {
            d.for_each_cluster(store, |c, id| {
                base.push((c, id));
                Ok(())
            })?;
        }
    }
    let cs = u64::from(CLUSTER_SIZE);
    let clusters = size.div_ceil(cs);
    let mut builder = DiskBuilder::new(size, CLUSTER_SIZE);
    let levels = builder.levels();
    let mut put = |node: Node| store.put_node(&node);
    let (mut bi, mut ci) = (0usize, 0usize);
    loop {
        let nb = base.get(bi).map(|x| x.0);
        let nc = changed.get(ci).map(|x| x.0);
        let c = match (nb, nc) {
            (None, None) => break,
            (Some(b), None) => b,
            (None, Some(d)) => d,
            (Some(b), Some(d)) => b.min(d),
        };
        let from_base = if nb == Some(c) {
            bi += 1;
            base.get(bi - 1).map(|x| x.1)
        } else {
            None
        };
        let id = if nc == Some(c) {
            ci += 1;
            changed[ci - 1].1
        } else {
            from_base
        };
        if let Some(id) = id.filter(|_| c < clusters) {
            builder.push(c, id, &mut put)?;
        }
    }
    let top = builder.finish(&mut put)?;
    Ok(store.put_node(&Node::Root(Root::Disk(DiskRoot {
        size,
        cluster_size: CLUSTER_SIZE,
        levels,
        top,
    })))?)
}

/// Makes the version and moves the head (merging with it if it moved);
/// `extra` adds to the final batch. Returns the head and any conflict.
fn check_in(
    store: &Store,
    t: &Target,
    root: lamina_sync::ManifestId,
    message: &str,
    author: &str,
    extra: &mut dyn FnMut(&mut lamina_sync::Batch<'_>, VersionId) -> Result<()>,
) -> Result<(VersionId, VersionId, Option<ConflictRecord>)> {
    let version = Version {
        layer: t.layer.id,
        parents: t.parent.into_iter().collect(),
        time_ns: now_ns(),
        author: author.to_owned(),
        message: message.to_owned(),
        root,
    };
    if t.head == t.parent {
        let mut batch = store.batch()?;
        let id = batch.put_version(&version)?;
        batch.move_head(&t.layer, t.head, id, "disk commit")?;
        extra(&mut batch, id)?;
        store.commit(batch)?;
        return Ok((id, id, None));
    }
    // The head moved: keep the version, then merge it with the head.
    let mut batch = store.batch()?;
    let client = batch.put_version(&version)?;
    store.commit(batch)?;
    let server = t
        .head
        .ok_or_else(|| Error::InvalidInput("the layer lost its head".into()))?;
    let (id, conflict) = store.merge_into_head(
        &t.layer,
        server,
        client,
        author,
        "disk commit",
        &mut |batch| {
            extra(batch, client).map_err(|e| match e {
                Error::Store(s) => s,
                other => lamina_sync::Error::InvalidInput(other.to_string()),
            })
        },
    )?;
    Ok((id, client, conflict))
}

/// Commits an unserved disk: a new version of its base's layer (or of
/// `to`), then the disk moves onto it with an empty overlay.
///
/// # Errors
/// [`Error::DiskBusy`] (served: use the serving process, see
/// [`request_commit`](crate::control::request_commit)), store or I/O
/// failures.
pub fn commit(
    store: &Arc<Store>,
    name: &str,
    to: Option<&str>,
    message: &str,
    author: &str,
) -> Result<CommitReport> {
    let rec = disk::get(store, name)?;
    let _lock = disk::lock(store, &rec, "lamina disk commit")?;
    disk::recover_blockmap(store, &rec)?;
    let t = target(store, &rec, to)?;
    let base = disk::open_base(store, &rec)?;
    let backing = match &base {
        Some(b) => Backing::Device(b.clone()),
        None => Backing::FromHeader,
    };
    let overlay = Qcow2::open(&rec.overlay(store), false, backing)?;
    let blockmap = BlockMap::open(&rec.blockmap(store))?;
    let dirty: Vec<u64> = blockmap.dirty().into_iter().map(|(c, _)| c).collect();
    let mut report = CommitReport {
        disk: name.to_owned(),
        layer: t.layer.name.clone(),
        version: None,
        clusters: dirty.len() as u64,
        chunks_new: 0,
        live: false,
        conflict: None,
    };
    let own = rec.base.as_ref().is_some_and(|b| b.layer == t.layer.name);
    let served_before = disk::live_version(store, name)?.is_some();
    if dirty.is_empty() && own && t.head == t.content && !served_before {
        return Ok(report);
    }
    let mut changed = Changed {
        store,
        clusters: Vec::with_capacity(dirty.len()),
        chunks_new: 0,
    };
    let cs = u64::from(CLUSTER_SIZE);
    let mut buf = vec![0u8; cs as usize];
    for &c in &dirty {
        let len = (rec.size - c * cs).min(cs) as usize;
        overlay.read_at(c * cs, &mut buf[..len])?;
        changed.add(c, &buf[..len])?;
    }
    let root = build_root(store, rec.size, t.content, &changed.clusters)?;
    store.backend().flush()?;
    report.chunks_new = changed.chunks_new;
    let same = t
        .parent
        .is_some_and(|p| store.version(p).is_ok_and(|v| v.root == root));
    // What the disk's ref holds (nothing for a base that was streamed).
    let old_base = store.ref_target(&disk_ref(name))?;
    let layer_name = t.layer.name.clone();
    // The disk moves onto the layer's new head, with an empty overlay.
    let rebase = |batch: &mut lamina_sync::Batch<'_>| -> Result<VersionId> {
        let new_head = batch_head(store, batch, &t.layer)?;
        let mut updated = rec.clone();
        updated.base = Some(DiskBase {
            layer: layer_name.clone(),
            version: new_head,
            stream: None,
        });
        batch.put_record(RECORD_KIND, name, &updated.encode())?;
        batch.delete_record(LIVE_KIND, name)?;
        if old_base != Some(new_head) {
            batch.move_ref(&disk_ref(name), old_base, Some(new_head), "disk commit")?;
        }
        Ok(new_head)
    };
    if same && t.head == t.parent {
        // Nothing new; the disk only settles onto the head it reached.
        let mut batch = store.batch()?;
        let h = rebase(&mut batch)?;
        store.commit(batch)?;
        report.version = (served_before && old_base != Some(h)).then_some(h);
    } else {
        let (head, _, conflict) = check_in(store, &t, root, message, author, &mut |batch, _| {
            rebase(batch).map(drop)
        })?;
        report.conflict = conflict;
        report.version = Some(head);
    }
    drop(overlay);
    disk::empty_overlay(store, &rec)?;
    disk::prune_cache(store)?;
    Ok(report)
}

/// The head a batch is about to give `layer`.
fn batch_head(store: &Store, batch: &lamina_sync::Batch<'_>, layer: &Layer) -> Result<VersionId> {
    batch
        .planned(&format!("layer/{}", layer.name))
        .or(store.head(layer)?)
        .ok_or_else(|| Error::InvalidInput(format!("layer `{}` has no head", layer.name)))
}

/// Commits a disk this process serves (`export`), keeping its overlay (see
/// the module doc). `store` must be open for writing.
///
/// # Errors
/// A commit to another layer than the disk's base, store or I/O failures.
pub fn commit_served(
    store: &Store,
    rec: &DiskRecord,
    export: &DiskExport,
    message: &str,
    author: &str,
) -> Result<CommitReport> {
    let t = target(store, rec, None)?;
    let mut changed = Changed {
        store,
        clusters: Vec::new(),
        chunks_new: 0,
    };
    let committing = rec.committing(store);
    let current = rec.blockmap(store);
    if committing.exists() {
        // An earlier commit of this process was cut short.
        export.blockmap().absorb(&committing)?;
        fs::remove_file(&committing).ctx(&committing, "remove the set-aside block map")?;
    }
    let dirty = export.snapshot(&mut |c, data| changed.add(c, data), &mut |_map| {
        fs::rename(&current, &committing).ctx(&current, "set the block map aside")?;
        BlockMap::create(&current, rec.size, u64::from(CLUSTER_SIZE))?;
        BlockMap::open(&current)
    })?;
    let mut report = CommitReport {
        disk: rec.name.clone(),
        layer: t.layer.name.clone(),
        version: None,
        clusters: dirty.len() as u64,
        chunks_new: 0,
        live: true,
        conflict: None,
    };
    let result = (|| {
        let root = build_root(store, rec.size, t.content, &changed.clusters)?;
        store.backend().flush()?;
        if t.content
            .is_some_and(|c| store.version(c).is_ok_and(|v| v.root == root))
            && t.head == t.parent
        {
            // Nothing changed since the last commit.
            return Ok(None);
        }
        let name = rec.name.clone();
        let (head, _, conflict) =
            check_in(store, &t, root, message, author, &mut |batch, content| {
                Ok(batch.put_record(LIVE_KIND, &name, content.as_bytes())?)
            })?;
        report.conflict = conflict;
        Ok(Some(head))
    })();
    match result {
        Ok(head) => {
            fs::remove_file(&committing).ctx(&committing, "remove the set-aside block map")?;
            report.version = head;
            report.chunks_new = changed.chunks_new;
            Ok(report)
        }
        Err(e) => {
            // Give the changes back so the next commit takes them.
            if let Err(back) = export.blockmap().absorb(&committing) {
                tracing::error!(error = %back, "could not give a failed commit's changes back");
            } else {
                // Absorbed: a leftover would only be absorbed again.
                let _ = fs::remove_file(&committing);
            }
            Err(e)
        }
    }
}
