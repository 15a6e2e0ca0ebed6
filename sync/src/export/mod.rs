//! Writing a version back out: a directory for tree layers, a raw image for
//! disk layers.
//!
//! Output is built in a staging path beside the destination and renamed into
//! place once complete and synced, so the destination either does not
//! change or holds the whole version; a failed export removes its staging.

mod disk;
mod tree;

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::id::VersionId;
use crate::manifest::{Node, NodeSource, Root};
use crate::progress::{NoProgress, Progress};
use crate::store::Store;

/// How to export.
pub struct ExportOptions<'a> {
    /// Progress sink.
    pub progress: &'a dyn Progress,
    /// Replace an existing destination file (disk layers only).
    pub force: bool,
}

impl Default for ExportOptions<'_> {
    fn default() -> Self {
        Self {
            progress: &NoProgress,
            force: false,
        }
    }
}

/// Result of an export.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportReport {
    /// Layer name.
    pub layer: String,
    /// Version written.
    pub version: Option<VersionId>,
    /// Destination.
    pub dest: PathBuf,
    /// Regular files written (disk: 1).
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks, devices, fifos, sockets.
    pub others: u64,
    /// Logical bytes (disk: virtual size).
    pub bytes: u64,
    /// Whether file ownership was restored (needs root).
    pub ownership_restored: bool,
    /// Things that could not be restored exactly (e.g. `trusted.` xattrs
    /// without privilege).
    pub warnings: Vec<String>,
}

/// A staging path beside `dest`.
fn staging_for(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{} has no file name", dest.display())))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(
        ".{}.lamina-export-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn remove_staging(path: &Path) {
    let r = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    if let Err(e) = r {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), %e, "could not remove export staging");
        }
    }
}

fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .ctx(parent, "sync directory")
}

impl Store {
    /// Exports what lies at `path` (a file, or a directory and everything
    /// below it) in tree version `version` to `dest`, which must not exist.
    /// Returns `None` when the version has nothing at `path`.
    ///
    /// # Errors
    /// A disk version, an existing destination, a path through a
    /// non-directory, missing or corrupt chunks, I/O failures. On error
    /// nothing is left at `dest`.
    pub fn export_path(
        &self,
        version: VersionId,
        path: &str,
        dest: &Path,
        opts: &ExportOptions<'_>,
    ) -> Result<Option<ExportReport>> {
        let v = self.version(version)?;
        let Node::Root(Root::Tree { meta, dir }) = self.load(v.root)? else {
            return Err(Error::InvalidInput(format!(
                "version {} is not a tree",
                version.short()
            )));
        };
        if fs::symlink_metadata(dest).is_ok() {
            return Err(Error::DestinationExists {
                path: dest.to_owned(),
                is_dir: dest.is_dir(),
            });
        }
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut report = ExportReport {
            layer: String::new(),
            version: Some(version),
            dest: dest.to_owned(),
            ..ExportReport::default()
        };
        let staging = staging_for(dest)?;
        remove_staging(&staging);
        let Some((last, within)) = parts.split_last() else {
            let written = tree::export_tree(self, &meta, dir, &staging, opts.progress, &mut report);
            return self.place(written, &staging, dest).map(|()| Some(report));
        };
        let mut at = dir;
        for p in within {
            let Node::Dir(d) = self.load(at)? else {
                return Ok(None);
            };
            match d.get(p.as_bytes()).map(|e| &e.kind) {
                Some(crate::manifest::EntryKind::Dir { node, .. }) => at = *node,
                Some(_) => {
                    return Err(Error::InvalidInput(format!(
                        "{path}: {p} is not a directory in version {}",
                        version.short()
                    )))
                }
                None => return Ok(None),
            }
        }
        let Node::Dir(d) = self.load(at)? else {
            return Ok(None);
        };
        let Some(entry) = d.get(last.as_bytes()) else {
            return Ok(None);
        };
        let written = tree::export_entry(self, entry, &staging, opts.progress, &mut report);
        self.place(written, &staging, dest).map(|()| Some(report))
    }

    fn place(&self, written: Result<()>, staging: &Path, dest: &Path) -> Result<()> {
        let placed = written.and_then(|()| {
            fs::rename(staging, dest)
                .ctx(dest, "move export into place")
                .and_then(|()| sync_parent(dest))
        });
        if placed.is_err() {
            remove_staging(staging);
        }
        placed
    }

    /// Exports version `version` of layer `name` to `dest`.
    ///
    /// # Errors
    /// Unknown layer or version, an unusable destination, missing or corrupt
    /// chunks, I/O failures. On error nothing is left at `dest`.
    pub fn export(
        &self,
        name: &str,
        version: VersionId,
        dest: &Path,
        opts: &ExportOptions<'_>,
    ) -> Result<ExportReport> {
        let layer = self.layer(name)?;
        let v = self.version(version)?;
        let root = match self.load(v.root)? {
            Node::Root(r) => r,
            other => {
                return Err(Error::ManifestCorrupt {
                    id: v.root,
                    reason: format!(
                        "expected a root, found {}",
                        crate::manifest::disk::node_name(&other)
                    ),
                })
            }
        };
        match fs::symlink_metadata(dest) {
            Ok(m) if m.is_dir() => {
                let empty = fs::read_dir(dest)
                    .ctx(dest, "read directory")?
                    .next()
                    .is_none();
                if !empty || matches!(root, Root::Disk(_)) {
                    return Err(Error::DestinationExists {
                        path: dest.to_owned(),
                        is_dir: true,
                    });
                }
            }
            Ok(_) if matches!(root, Root::Disk(_)) && opts.force => {}
            Ok(_) => {
                return Err(Error::DestinationExists {
                    path: dest.to_owned(),
                    is_dir: false,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(dest, "stat destination", e)),
        }
        let staging = staging_for(dest)?;
        remove_staging(&staging);
        let mut report = ExportReport {
            layer: layer.name.clone(),
            version: Some(version),
            dest: dest.to_owned(),
            ..ExportReport::default()
        };
        let written = match &root {
            Root::Tree { meta, dir } => {
                tree::export_tree(self, meta, *dir, &staging, opts.progress, &mut report)
            }
            Root::Disk(d) => disk::export_disk(self, d, &staging, opts.progress, &mut report),
        };
        self.place(written, &staging, dest)?;
        Ok(report)
    }
}
