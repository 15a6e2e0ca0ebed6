//! Metadata changes: chmod, chown, truncate, utimens, extended attributes.
//! Each copies the entry up first (metadata only, except that a truncate
//! keeps the data below the new size) and then applies the change to the
//! upper copy, so the upper file system keeps ctime right.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use fuser::{FileAttr, TimeOrNow};
use nix::errno::Errno;
use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::{errno, Ctx, Kind, OpResult, Src};
use crate::upper;

/// What a `setattr` changes.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(st)) => match st.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => TimeSpec::from_duration(d),
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = i64::from(d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                TimeSpec::new(sec, nsec)
            }
        },
    }
}

impl Ctx<'_> {
    /// Applies `sa` to `ino`; `fd` is an open descriptor of its upper file
    /// (needed once the file is unlinked).
    pub fn setattr(&mut self, ino: u64, sa: &SetAttr, fd: Option<Arc<File>>) -> OpResult<FileAttr> {
        let kind = self.inode(ino)?.kind;
        if self.inode(ino)?.unlinked {
            let f = fd.ok_or(Errno::ENOENT)?;
            return self.setattr_fd(ino, sa, &f);
        }
        if let Some(size) = sa.size {
            match kind {
                Kind::Dir => return Err(Errno::EISDIR),
                Kind::File => {}
                _ => return Err(Errno::EINVAL),
            }
            let old = self.attr(ino)?.size;
            self.make_writable_file(ino, size.min(old))?;
        } else {
            self.make_upper(ino)?;
        }
        let path = match &self.inode(ino)?.src {
            Src::Upper { slot, .. } => self.v.upper_path(*slot, &self.path(ino)?),
            Src::Dir(d) => match d.stack.first() {
                Some(super::Part::Upper(s)) => self.v.upper_path(*s, &self.path(ino)?),
                _ => return Err(Errno::EIO),
            },
            Src::Lower { .. } => return Err(Errno::EIO),
        };
        if sa.uid.is_some() || sa.gid.is_some() {
            std::os::unix::fs::lchown(&path, sa.uid, sa.gid).map_err(|e| errno(&e))?;
        }
        if let Some(mode) = sa.mode {
            if kind != Kind::Symlink {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| errno(&e))?;
            }
        }
        if let Some(size) = sa.size {
            match &fd {
                Some(f) => f.set_len(size).map_err(|e| errno(&e))?,
                None => nix::unistd::truncate(&*path, size as i64)?,
            }
        }
        if sa.atime.is_some() || sa.mtime.is_some() {
            utimensat(
                AT_FDCWD,
                &*path,
                &timespec(sa.atime),
                &timespec(sa.mtime),
                UtimensatFlags::NoFollowSymlink,
            )?;
        }
        self.attr(ino)
    }

    /// `setattr` of an unlinked open file, through its descriptor.
    fn setattr_fd(&mut self, ino: u64, sa: &SetAttr, f: &File) -> OpResult<FileAttr> {
        if sa.uid.is_some() || sa.gid.is_some() {
            std::os::unix::fs::fchown(f, sa.uid, sa.gid).map_err(|e| errno(&e))?;
        }
        if let Some(mode) = sa.mode {
            f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| errno(&e))?;
        }
        if let Some(size) = sa.size {
            f.set_len(size).map_err(|e| errno(&e))?;
        }
        if sa.atime.is_some() || sa.mtime.is_some() {
            nix::sys::stat::futimens(f, &timespec(sa.atime), &timespec(sa.mtime))?;
        }
        self.attr(ino)
    }

    /// The upper path carrying `ino`'s metadata, after copying it up.
    fn upper_meta_path(&mut self, ino: u64) -> OpResult<crate::hostpath::HostPath> {
        self.make_upper(ino)?;
        let rel = self.path(ino)?;
        match &self.inode(ino)?.src {
            Src::Upper { slot, .. } => Ok(self.v.upper_path(*slot, &rel)),
            Src::Dir(d) => match d.stack.first() {
                Some(super::Part::Upper(s)) => Ok(self.v.upper_path(*s, &rel)),
                _ => Err(Errno::EIO),
            },
            Src::Lower { .. } => Err(Errno::EIO),
        }
    }

    /// Sets an extended attribute (`flags`: `XATTR_CREATE`, `XATTR_REPLACE`).
    pub fn setxattr(&mut self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> OpResult<()> {
        if upper::is_private(name) {
            return Err(Errno::EPERM);
        }
        let exists = match self.getxattr(ino, name) {
            Ok(_) => true,
            Err(Errno::ENODATA) => false,
            Err(e) => return Err(e),
        };
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(Errno::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(Errno::ENODATA);
        }
        let path = self.upper_meta_path(ino)?;
        xattr::set(&path, OsStr::from_bytes(name), value).map_err(|e| errno(&e))
    }

    /// Removes an extended attribute.
    pub fn removexattr(&mut self, ino: u64, name: &[u8]) -> OpResult<()> {
        if upper::is_private(name) {
            return Err(Errno::ENODATA);
        }
        self.getxattr(ino, name)?;
        let path = self.upper_meta_path(ino)?;
        xattr::remove(&path, OsStr::from_bytes(name)).map_err(|e| errno(&e))
    }
}
