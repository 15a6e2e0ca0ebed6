//! Moving disks between the store and image files: importing any image
//! (qcow2 with its backing chain, or raw) into a disk layer, and exporting
//! a disk layer version as a standalone qcow2.

use std::path::Path;
use std::sync::Arc;

use lamina_sync::manifest::{DiskRoot, Root};
use lamina_sync::{DiskSource, Store, VersionId};

use crate::error::{Error, IoContext, Result};
use crate::qcow::{open_image, Backing, Qcow2};
use crate::source::{Alloc, ReadAt};

/// An image opened for import.
pub struct ImageSource(Arc<dyn ReadAt>);

impl ImageSource {
    /// Opens `path` read-only (qcow2 chain or raw).
    ///
    /// # Errors
    /// Unreadable, unsupported or corrupt images.
    pub fn open(path: &Path) -> Result<ImageSource> {
        Ok(ImageSource(open_image(path, false)?))
    }
}

impl DiskSource for ImageSource {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn next_data(&self, mut pos: u64) -> std::io::Result<Option<(u64, u64)>> {
        let size = self.0.size();
        while pos < size {
            let runs = self
                .0
                .status(pos, size - pos)
                .map_err(std::io::Error::other)?;
            if runs.is_empty() {
                return Ok(Some((pos, size)));
            }
            let mut at = pos;
            let mut start = None;
            for (len, a) in runs {
                match (a, start) {
                    (Alloc::Data, None) => start = Some(at),
                    (Alloc::Data, Some(_)) => {}
                    (_, Some(s)) => return Ok(Some((s, at))),
                    (_, None) => {}
                }
                at += len;
            }
            if let Some(s) = start {
                return Ok(Some((s, at)));
            }
            pos = at;
        }
        Ok(None)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf).map_err(std::io::Error::other)
    }
}

/// Writes version `version` (of a disk layer) to `dest` as a standalone
/// qcow2 image (no backing file). Built beside `dest` and renamed into
/// place; an existing `dest` is replaced only with `force`.
///
/// # Errors
/// A tree version, an existing destination, store or I/O failures.
pub fn export_qcow2(store: &Store, version: VersionId, dest: &Path, force: bool) -> Result<u64> {
    let root: DiskRoot = match store.root_of(version)? {
        Root::Disk(d) => d,
        Root::Tree { .. } => {
            return Err(Error::InvalidInput(format!(
                "version {} is a tree; a qcow2 file holds a disk",
                version.short()
            )))
        }
    };
    if dest.exists() && !force {
        return Err(Error::InvalidInput(format!(
            "{}: destination exists (pass --force to replace it)",
            dest.display()
        )));
    }
    let staging = dest.with_extension(format!("lamina-export-{}", std::process::id()));
    let written = (|| {
        Qcow2::create(&staging, root.size)?;
        let img = Qcow2::open(&staging, true, Backing::FromHeader)?;
        let cs = u64::from(root.cluster_size);
        root.for_each_cluster(store, |c, id| {
            let data = store.chunk(&id)?;
            img.write_at(c * cs, &data)
                .map_err(|e| lamina_sync::Error::InvalidInput(e.to_string()))
        })?;
        img.close()?;
        drop(img);
        std::fs::rename(&staging, dest).ctx(dest, "move export into place")
    })();
    if written.is_err() {
        // Nothing half-written stays behind; the error matters more.
        let _ = std::fs::remove_file(&staging);
    }
    written.map(|()| root.size)
}
