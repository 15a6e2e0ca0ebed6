//! Choosing where a write lands and copying entries up to it.
//!
//! New entries and copies of lower entries go to the slot the rules route
//! their path to, moved up past any plane that would hide them (a write must
//! land at or above the entry it changes). An entry already in a writable
//! upper is changed in place. Copy-ups build the new entry in the work
//! directory and rename it into place, so a crash never leaves a half-made
//! entry under its name.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use lamina_sync::manifest::{Entry, EntryKind, Meta};
use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
use nix::sys::stat::{mknod, Mode, SFlag};

use super::{errno, Ctx, Kind, OpResult, Part, Src, ROOT};
use crate::upper::{self, Origin};

/// Renames `from` to `to` with `flags`.
pub(crate) fn rename2(from: &Path, to: &Path, flags: RenameFlags) -> OpResult<()> {
    renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)
}

impl Ctx<'_> {
    /// The writable slot for a new entry or copy-up at `rel` whose upper
    /// plane must be at or above `bound`: the routed slot, or the nearest
    /// writable one above it that is high enough.
    pub fn pick_slot(&self, rel: &[u8], bound: u32) -> OpResult<usize> {
        let route = self.v.route(rel).ok_or(Errno::EROFS)?;
        (route..self.v.slots.len())
            .find(|&s| self.v.writable(s) && self.v.up(s) <= bound)
            .ok_or(Errno::EROFS)
    }

    /// The slot where changes to existing inode `ino` land: where it is if
    /// that is an upper, else where it would be copied up to.
    pub fn target_slot(&self, ino: u64) -> OpResult<usize> {
        let i = self.inode(ino)?;
        let rel = self.path(ino)?;
        match &i.src {
            Src::Upper { slot, .. } => Ok(*slot),
            Src::Lower { slot, .. } => self.pick_slot(&rel, self.v.up(*slot) + 1),
            Src::Dir(d) => match d.stack.first() {
                Some(Part::Upper(s)) => Ok(*s),
                Some(p) => self.pick_slot(&rel, self.v.plane(p)),
                None => self.pick_slot(&rel, u32::MAX),
            },
        }
    }

    /// Makes sure directory `ino` has a copy in `slot`'s upper, copying its
    /// metadata (and its parents') up as needed.
    pub fn ensure_upper_dir(&mut self, ino: u64, slot: usize) -> OpResult<()> {
        let info = self.dir_info(ino)?;
        if info
            .stack
            .iter()
            .any(|p| matches!(p, Part::Upper(s) if *s == slot))
        {
            return Ok(());
        }
        if self.v.up(slot) > info.floor {
            tracing::error!(
                ino,
                slot,
                "upper copy would fall outside its directory's merge"
            );
            return Err(Errno::EIO);
        }
        let meta = self.visible_meta(ino)?;
        if ino != ROOT {
            let parent = self.inode(ino)?.parent;
            self.ensure_upper_dir(parent, slot)?;
        }
        // After the parent: a long path is reached through its parent.
        let dest = self.v.upper_path(slot, &self.path(ino)?);
        if ino == ROOT {
            // The upper root exists; mark it as carrying the root's metadata.
            upper::apply_meta(&dest, &meta, false).map_err(|e| errno(&e))?;
            xattr::set(&dest, upper::ROOT_META, b"y").map_err(|e| errno(&e))?;
        } else {
            let tmp = self.tmp_path();
            fs::create_dir(&tmp).map_err(|e| errno(&e))?;
            let made = upper::apply_meta(&tmp, &meta, false)
                .map_err(|e| errno(&e))
                .and_then(|()| {
                    keeping_parent_times(&dest, || {
                        rename2(&tmp, &dest, RenameFlags::RENAME_NOREPLACE)
                    })
                });
            if let Err(e) = made {
                let _ = fs::remove_dir(&tmp);
                tracing::error!(dest = %dest.display(), error = %e, "cannot copy a directory up");
                return Err(e);
            }
        }
        let plane = self.v.up(slot);
        let v = self.v;
        if let Some(d) = self.inode_mut(ino)?.dir_mut() {
            let at = d
                .stack
                .iter()
                .position(|p| v.plane(p) > plane)
                .unwrap_or(d.stack.len());
            d.stack.insert(at, Part::Upper(slot));
        }
        Ok(())
    }

    /// Metadata as the view shows it (for copy-ups).
    pub fn visible_meta(&mut self, ino: u64) -> OpResult<Meta> {
        let a = self.attr(ino)?;
        let xattrs = match self.meta_source(ino)? {
            super::MetaSource::Lower(m) => m.xattrs.clone(),
            super::MetaSource::Upper(p) => {
                let mut out = Vec::new();
                for name in xattr::list(&p).map_err(|e| errno(&e))? {
                    if let Some(value) = xattr::get(&p, &name).map_err(|e| errno(&e))? {
                        out.push(lamina_sync::manifest::Xattr {
                            name: name.as_bytes().to_vec(),
                            value,
                        });
                    }
                }
                out
            }
        };
        let (sec, nsec) = match a.mtime.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                (sec, nsec)
            }
        };
        Ok(Meta {
            mode: u32::from(a.perm),
            uid: a.uid,
            gid: a.gid,
            mtime_sec: sec,
            mtime_nsec: nsec,
            xattrs: xattrs
                .into_iter()
                .filter(|x| !upper::is_private(&x.name))
                .collect(),
        })
    }

    /// Makes an existing inode writable in its target slot: directories get
    /// an upper copy on top; other entries are copied up (metadata only —
    /// see [`Ctx::fill`] for data).
    pub fn make_upper(&mut self, ino: u64) -> OpResult<usize> {
        let slot = self.target_slot(ino)?;
        match self.inode(ino)?.src {
            Src::Dir(_) => self.ensure_upper_dir(ino, slot)?,
            Src::Lower { .. } => self.copy_up(ino, slot)?,
            Src::Upper { .. } => {}
        }
        Ok(slot)
    }

    /// Copies a lower non-directory up into `slot` (a file becomes a
    /// metacopy placeholder), together with the other visible members of
    /// its hard-link group.
    pub fn copy_up(&mut self, ino: u64, slot: usize) -> OpResult<()> {
        let Src::Lower { slot: lslot, entry } = self.inode(ino)?.src.clone() else {
            return Ok(());
        };
        let mut members = vec![self.path(ino)?];
        if let EntryKind::File {
            link: Some(group), ..
        } = &entry.kind
        {
            if let Some((_, root)) = &self.v.slots[lslot].root {
                let links = self.v.lower.links(*root)?;
                for m in links.get(group).into_iter().flatten() {
                    if *m != members[0] && self.resolve(m)? == Some(ino) {
                        members.push(m.clone());
                    }
                }
            }
        }
        let origin = match &entry.kind {
            EntryKind::File { size, content, .. } if *size > 0 => Some(Arc::new(Origin {
                size: *size,
                content: content.clone(),
            })),
            _ => None,
        };
        let mut first: Option<crate::hostpath::HostPath> = None;
        for (n, m) in members.iter().enumerate() {
            let (parent, _) = split(m);
            let parent_ino = match parent {
                None => ROOT,
                Some(p) => match self.resolve(p)? {
                    Some(i) => i,
                    None => continue,
                },
            };
            if self.v.up(slot) > self.dir_info(parent_ino)?.floor {
                tracing::warn!(path = %String::from_utf8_lossy(m), "hard link not copied up with its group: a higher layer hides its directory");
                continue;
            }
            self.ensure_upper_dir(parent_ino, slot)?;
            let dest = self.v.upper_path(slot, m);
            match &first {
                Some(f) => {
                    keeping_parent_times(&dest, || fs::hard_link(f, &dest).map_err(|e| errno(&e)))?
                }
                None => {
                    let tmp = self.tmp_path();
                    let made = make_entry(&tmp, &entry, origin.as_deref()).and_then(|()| {
                        keeping_parent_times(&dest, || {
                            rename2(&tmp, &dest, RenameFlags::RENAME_NOREPLACE)
                        })
                    });
                    if let Err(e) = made {
                        let _ = upper::remove_all(&tmp);
                        tracing::error!(dest = %dest.display(), error = %e, "cannot copy an entry up");
                        return Err(e);
                    }
                    first = Some(dest);
                }
            }
            if n > 0 {
                tracing::debug!(path = %String::from_utf8_lossy(m), "hard link copied up with its group");
            }
        }
        if members.len() > 1 {
            if let Some(f) = &first {
                let real = std::os::unix::fs::MetadataExt::ino(
                    &fs::symlink_metadata(f).map_err(|e| errno(&e))?,
                );
                self.st.upper_links.insert(real, ino);
            }
        }
        let i = self.inode_mut(ino)?;
        i.src = Src::Upper { slot, origin };
        Ok(())
    }

    /// Fills a placeholder's data in from its lower content (the first
    /// `upto` bytes suffice when the file is about to be cut there), syncs
    /// it, and drops the origin: the file is then an ordinary upper file.
    pub fn fill(&mut self, ino: u64, upto: u64) -> OpResult<()> {
        let Src::Upper {
            origin: Some(_), ..
        } = self.inode(ino)?.src
        else {
            return Ok(());
        };
        let path = self.upper_file(ino)?.ok_or(Errno::EIO)?;
        let data = self.file_data(ino)?.ok_or(Errno::EIO)?;
        if upto > 0 {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| errno(&e))?;
            for (off, chunk, len) in data.data_extents() {
                if off >= upto {
                    break;
                }
                let bytes = self.v.lower.chunk(chunk, len)?;
                f.write_all_at(&bytes, off).map_err(|e| errno(&e))?;
            }
            f.sync_data().map_err(|e| errno(&e))?;
        }
        xattr::remove(&path, upper::ORIGIN).map_err(|e| errno(&e))?;
        let i = self.inode_mut(ino)?;
        if let Src::Upper { origin, .. } = &mut i.src {
            *origin = None;
        }
        i.data = None;
        Ok(())
    }

    /// Makes a regular file writable with its data: copied up and filled
    /// (only up to `upto` bytes when it is about to be truncated there).
    pub fn make_writable_file(&mut self, ino: u64, upto: u64) -> OpResult<()> {
        if self.inode(ino)?.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        self.make_upper(ino)?;
        self.fill(ino, upto)
    }

    /// After entries of directory `dir` changed in `slot`'s upper, makes the
    /// copy the view shows carry the new mtime and ctime (the kernel updated
    /// only the upper directory it wrote in).
    pub fn touch_dir(&mut self, dir: u64, slot: usize) -> OpResult<()> {
        let top = match self.dir_info(dir)?.stack.first() {
            Some(Part::Upper(s)) if *s == slot => return Ok(()),
            Some(Part::Upper(s)) => *s,
            Some(Part::Lower { slot: s, .. }) if self.v.writable(*s) => {
                let s = *s;
                self.ensure_upper_dir(dir, s)?;
                s
            }
            _ => return Ok(()),
        };
        let p = self.v.upper_path(top, &self.path(dir)?);
        let now = filetime::FileTime::now();
        filetime::set_file_times(&p, now, now).map_err(|e| errno(&e))
    }

    /// The inode at `rel` (relative path), if visible.
    pub fn resolve(&mut self, rel: &[u8]) -> OpResult<Option<u64>> {
        let mut cur = ROOT;
        for part in rel.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            if self.inode(cur)?.kind != Kind::Dir {
                return Ok(None);
            }
            match self.child(cur, part)? {
                Some(i) => cur = i,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }
}

/// Runs `f`, which adds `path` to its upper directory as a copy-up, and
/// puts the directory's times back: a copy-up changes nothing the view
/// shows (as in overlayfs, which restores the parent's times likewise).
fn keeping_parent_times<T>(path: &Path, f: impl FnOnce() -> OpResult<T>) -> OpResult<T> {
    let parent = path
        .parent()
        .and_then(|p| fs::symlink_metadata(p).ok().map(|m| (p, m)));
    let out = f()?;
    if let Some((p, m)) = parent {
        let at = filetime::FileTime::from_last_access_time(&m);
        let mt = filetime::FileTime::from_last_modification_time(&m);
        if let Err(e) = filetime::set_file_times(p, at, mt) {
            tracing::warn!(dir = %p.display(), error = %e, "cannot restore times after a copy-up");
        }
    }
    Ok(out)
}

/// Splits `a/b/c` into (`Some(a/b)`, `c`).
pub(crate) fn split(rel: &[u8]) -> (Option<&[u8]>, &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (Some(&rel[..i]), &rel[i + 1..]),
        None => (None, rel),
    }
}

/// Creates a copy of lower entry `e` at `path` (a placeholder for a file).
pub(crate) fn make_entry(path: &Path, e: &Entry, origin: Option<&Origin>) -> OpResult<()> {
    let symlink = matches!(e.kind, EntryKind::Symlink { .. });
    match &e.kind {
        EntryKind::File { size, .. } => {
            let f = File::create(path).map_err(|e| errno(&e))?;
            f.set_len(*size).map_err(|e| errno(&e))?;
            if let Some(o) = origin {
                xattr::set(path, upper::ORIGIN, &o.encode()).map_err(|e| errno(&e))?;
            }
        }
        EntryKind::Symlink { target } => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path).map_err(|e| errno(&e))?
        }
        EntryKind::CharDevice { rdev } => mknod(path, SFlag::S_IFCHR, Mode::empty(), *rdev)?,
        EntryKind::BlockDevice { rdev } => mknod(path, SFlag::S_IFBLK, Mode::empty(), *rdev)?,
        EntryKind::Fifo => mknod(path, SFlag::S_IFIFO, Mode::empty(), 0)?,
        EntryKind::Socket => mknod(path, SFlag::S_IFSOCK, Mode::empty(), 0)?,
        EntryKind::Dir { .. } | EntryKind::Whiteout => return Err(Errno::EINVAL),
    }
    upper::apply_meta(path, &e.meta, symlink).map_err(|e| errno(&e))
}
