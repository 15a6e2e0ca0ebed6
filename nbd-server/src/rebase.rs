//! Hotelling for disks: moving a disk onto another cached OS version
//! (`lamina hotel switch DISK OS-LAYER`).
//!
//! A disk's overlay holds block-level changes made against its base; they
//! mean nothing over another OS's blocks. So a disk is rebased only when
//! it has no changes since its last commit, or when the caller discards
//! them. The user's own data belongs on its own disk (or in a `data` tree
//! layer), which a switch leaves alone.

use lamina_sync::manifest::Root;
use lamina_sync::{LayerFormat, LayerKind, Store};

use crate::disk::{self, disk_ref, DiskBase, DiskRecord, LIVE_KIND, RECORD_KIND};
use crate::error::{Error, Result};

/// Rebases disk `name` onto the current version (pin, else head) of the
/// local `os` disk layer `layer`. The disk grows to the new base's size if
/// that is larger. With `discard`, changes since the last commit are
/// dropped; without, a disk with changes is refused.
///
/// # Errors
/// [`Error::DiskNotFound`], [`Error::DiskBusy`] (served), a layer that is
/// not cached or not an `os` disk layer, changes without `discard`, a
/// refused signature or subscription, store and I/O failures.
pub fn rebase(store: &Store, name: &str, layer: &str, discard: bool) -> Result<DiskRecord> {
    let rec = disk::get(store, name)?;
    let _lock = disk::lock(store, &rec, "lamina hotel switch")?;
    disk::recover_blockmap(store, &rec)?;
    let new = store.layer(layer).map_err(|e| match e {
        lamina_sync::Error::LayerNotFound { name } => Error::InvalidInput(format!(
            "layer {name} is not cached here (lamina hotel add REMOTE:{name} first)"
        )),
        other => other.into(),
    })?;
    if new.format != LayerFormat::Disk || new.kind != LayerKind::Os {
        return Err(Error::InvalidInput(format!(
            "layer {} is a {} {} layer; a disk switches onto an os disk layer",
            new.name, new.kind, new.format
        )));
    }
    let version = store
        .current(&new)?
        .ok_or_else(|| Error::InvalidInput(format!("layer {} has no version yet", new.name)))?;
    store.check_usable(&new, version)?;
    let Root::Disk(d) = store.root_of(version)? else {
        return Err(Error::InvalidInput(format!(
            "version {} is not a disk",
            version.short()
        )));
    };
    let changed = disk::status(store, name)?.clusters;
    let live = disk::live_version(store, name)?.is_some();
    if (changed > 0 || live) && !discard {
        return Err(Error::InvalidInput(format!(
            "disk `{name}` has {} since its last offline commit; block changes do not carry over to another OS: commit them (lamina disk commit {name}) or pass --discard-changes",
            if live && changed == 0 {
                "committed changes in its overlay".to_owned()
            } else {
                format!("{changed} changed clusters")
            }
        )));
    }
    let old_ref = store.ref_target(&disk_ref(name))?;
    let rebased = DiskRecord {
        size: rec.size.max(d.size),
        base: Some(DiskBase {
            layer: new.name.clone(),
            version,
            stream: None,
        }),
        ..rec.clone()
    };
    // Emptied first: a crash before the record moves leaves the old base
    // under an empty overlay, which is what was asked (no changes kept).
    disk::empty_overlay(store, &rebased)?;
    let mut batch = store.batch()?;
    batch.put_record(RECORD_KIND, name, &rebased.encode())?;
    batch.delete_record(LIVE_KIND, name)?;
    batch.move_ref(&disk_ref(name), old_ref, Some(version), "hotel switch")?;
    store.commit(batch)?;
    disk::prune_cache(store)?;
    Ok(rebased)
}
