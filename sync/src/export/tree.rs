//! Exporting a tree version to a directory.
//!
//! Entries are created depth-first; a directory's own metadata (mode,
//! owner, xattrs, mtime) is applied after its children, so restrictive modes
//! don't block the export and child creation doesn't disturb its mtime.

use std::collections::HashMap;
use std::fs::{self, File, Permissions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;
use nix::sys::stat::{mknod, Mode, SFlag};

use super::ExportReport;
use crate::error::{Error, IoContext, Result};
use crate::id::ManifestId;
use crate::manifest::{for_each_extent, Content, Entry, EntryKind, Extent, Meta, Node, NodeSource};
use crate::progress::Progress;
use crate::store::Store;

struct Writer<'a> {
    store: &'a Store,
    progress: &'a dyn Progress,
    root: bool,
    /// Link group → path of the member already written.
    links: HashMap<Vec<u8>, PathBuf>,
}

/// Writes one entry (a file, or a directory and what it holds) at
/// `staging`, for exports of a path inside a version.
pub(super) fn export_entry(
    store: &Store,
    entry: &Entry,
    staging: &Path,
    progress: &dyn Progress,
    report: &mut ExportReport,
) -> Result<()> {
    let mut w = Writer::new(store, progress, report);
    w.write_entry(entry, staging, report)?;
    let parent = staging.parent().unwrap_or(Path::new("."));
    let dir = File::open(parent).ctx(parent, "open directory")?;
    nix::unistd::syncfs(&dir).map_err(|e| Error::io(staging, "sync file system", e.into()))
}

pub(super) fn export_tree(
    store: &Store,
    meta: &Meta,
    dir: ManifestId,
    staging: &Path,
    progress: &dyn Progress,
    report: &mut ExportReport,
) -> Result<()> {
    fs::create_dir(staging).ctx(staging, "create directory")?;
    let mut w = Writer::new(store, progress, report);
    w.write_dir(dir, staging, report)?;
    w.apply_meta(staging, meta, false, report)?;
    // One syncfs for the whole tree instead of an fsync per file: the export
    // only becomes visible (renamed into place) after this returns.
    let dir = File::open(staging).ctx(staging, "open directory")?;
    nix::unistd::syncfs(&dir).map_err(|e| Error::io(staging, "sync file system", e.into()))
}

impl<'a> Writer<'a> {
    fn new(store: &'a Store, progress: &'a dyn Progress, report: &mut ExportReport) -> Self {
        progress.phase("export", None);
        let root = nix::unistd::geteuid().is_root();
        report.ownership_restored = root;
        Writer {
            store,
            progress,
            root,
            links: HashMap::new(),
        }
    }

    fn write_dir(&mut self, id: ManifestId, path: &Path, report: &mut ExportReport) -> Result<()> {
        let node = match self.store.load(id)? {
            Node::Dir(d) => d,
            other => {
                return Err(Error::ManifestCorrupt {
                    id,
                    reason: format!(
                        "expected a directory, found {}",
                        crate::manifest::disk::node_name(&other)
                    ),
                })
            }
        };
        for e in node.entries {
            let p = path.join(std::ffi::OsStr::from_bytes(&e.name));
            self.write_entry(&e, &p, report)?;
        }
        Ok(())
    }

    /// Writes entry `e` at `p` (a directory with everything below it).
    fn write_entry(&mut self, e: &Entry, p: &Path, report: &mut ExportReport) -> Result<()> {
        let p = p.to_owned();
        {
            match &e.kind {
                EntryKind::Dir { node, .. } => {
                    report.dirs += 1;
                    fs::create_dir(&p).ctx(&p, "create directory")?;
                    self.write_dir(*node, &p, report)?;
                }
                EntryKind::File {
                    size,
                    content,
                    link,
                } => {
                    report.files += 1;
                    report.bytes += size;
                    if let Some(first) = link.as_ref().and_then(|g| self.links.get(g)) {
                        fs::hard_link(first, &p).ctx(&p, "create hard link")?;
                        self.progress.advance(*size);
                        return Ok(());
                    }
                    self.write_file(&p, content, *size)?;
                    if let Some(g) = link {
                        self.links.insert(g.clone(), p.clone());
                    }
                }
                EntryKind::Symlink { target } => {
                    report.others += 1;
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &p)
                        .ctx(&p, "create symlink")?;
                }
                EntryKind::CharDevice { rdev } => {
                    report.others += 1;
                    self.node(&p, SFlag::S_IFCHR, e.meta.mode, *rdev)?;
                }
                EntryKind::BlockDevice { rdev } => {
                    report.others += 1;
                    self.node(&p, SFlag::S_IFBLK, e.meta.mode, *rdev)?;
                }
                EntryKind::Fifo => {
                    report.others += 1;
                    self.node(&p, SFlag::S_IFIFO, e.meta.mode, 0)?;
                }
                EntryKind::Socket => {
                    report.others += 1;
                    self.node(&p, SFlag::S_IFSOCK, e.meta.mode, 0)?;
                }
                EntryKind::Whiteout => {
                    // The overlayfs convention: a 0/0 character device.
                    report.others += 1;
                    self.node(&p, SFlag::S_IFCHR, 0, 0)?;
                }
            }
            let is_link = matches!(e.kind, EntryKind::Symlink { .. });
            self.apply_meta(&p, &e.meta, is_link, report)?;
            if let EntryKind::Dir { opaque: true, .. } = e.kind {
                self.mark_opaque(&p, report)?;
            }
        }
        Ok(())
    }

    /// Marks an opaque directory the way overlayfs does, so the exported
    /// layers of a composition can be stacked by a kernel overlay mount.
    fn mark_opaque(&self, path: &Path, report: &mut ExportReport) -> Result<()> {
        let name = std::ffi::OsStr::from_bytes(crate::import::OVERLAY_OPAQUE);
        match xattr::set(path, name, b"y") {
            Ok(()) => Ok(()),
            Err(e) if !self.root => {
                report.warnings.push(format!(
                    "{}: opaque marker not written: {e}",
                    path.display()
                ));
                Ok(())
            }
            Err(e) => Err(Error::io(path, "mark directory opaque", e)),
        }
    }

    fn node(&self, path: &Path, kind: SFlag, mode: u32, rdev: u64) -> Result<()> {
        mknod(path, kind, Mode::from_bits_truncate(mode), rdev)
            .map_err(|e| Error::io(path, "create special file", e.into()))
    }

    fn write_file(&self, path: &Path, content: &Content, size: u64) -> Result<()> {
        let file = File::create(path).ctx(path, "create file")?;
        for_each_extent(self.store, content, size, |offset, extent| {
            if let Extent::Data { chunk, len } = extent {
                let data = self.store.chunk(chunk)?;
                if data.len() != *len as usize {
                    return Err(Error::ChunkCorrupt {
                        id: *chunk,
                        reason: format!("{} bytes, the manifest expects {len}", data.len()),
                    });
                }
                file.write_all_at(&data, offset).ctx(path, "write")?;
            }
            self.progress.advance(extent.len());
            Ok(())
        })?;
        file.set_len(size).ctx(path, "set file length")
    }

    fn apply_meta(
        &self,
        path: &Path,
        meta: &Meta,
        is_symlink: bool,
        report: &mut ExportReport,
    ) -> Result<()> {
        if self.root {
            std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))
                .ctx(path, "set owner")?;
        }
        if !is_symlink {
            fs::set_permissions(path, Permissions::from_mode(meta.mode)).ctx(path, "set mode")?;
        }
        for x in &meta.xattrs {
            let name = std::ffi::OsStr::from_bytes(&x.name);
            if let Err(e) = xattr::set(path, name, &x.value) {
                let privileged =
                    x.name.starts_with(b"trusted.") || x.name.starts_with(b"security.");
                if self.root || !privileged {
                    return Err(Error::io(path, "set extended attribute", e));
                }
                report.warnings.push(format!(
                    "{}: extended attribute {} not restored: {e}",
                    path.display(),
                    String::from_utf8_lossy(&x.name)
                ));
            }
        }
        let t = FileTime::from_unix_time(meta.mtime_sec, meta.mtime_nsec);
        filetime::set_symlink_file_times(path, t, t).ctx(path, "set times")
    }
}
