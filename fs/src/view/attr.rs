//! What the view tells the kernel about an inode: attributes, link
//! targets and extended attributes.

use crate::hostpath::HostPath;
use std::ffi::OsStr;
use std::fs::{self, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use fuser::{FileAttr, FileType, INodeNo};
use lamina_sync::manifest::{Content, EntryKind, Meta};
use nix::errno::Errno;

use super::{errno, lstat, system_time, Ctx, DirInfo, Kind, OpResult, Part, Src};
use crate::lower::FileData;
use crate::upper;

impl Ctx<'_> {
    /// Extents of a lower file or placeholder.
    pub fn file_data(&mut self, ino: u64) -> OpResult<Option<Arc<FileData>>> {
        let i = self.inode(ino)?;
        if let Some(d) = &i.data {
            return Ok(Some(d.clone()));
        }
        let (content, size): (Content, u64) = match &i.src {
            Src::Upper {
                origin: Some(o), ..
            } => (o.content.clone(), o.size),
            Src::Lower { entry, .. } => match &entry.kind {
                EntryKind::File { content, size, .. } => (content.clone(), *size),
                _ => return Ok(None),
            },
            _ => return Ok(None),
        };
        let d = self.v.lower.file_data(&content, size)?;
        self.inode_mut(ino)?.data = Some(d.clone());
        Ok(Some(d))
    }

    /// Path of an upper-backed inode's file (its fd when unlinked is the
    /// caller's business).
    pub fn upper_file(&self, ino: u64) -> OpResult<Option<HostPath>> {
        let i = self.inode(ino)?;
        match i.src {
            Src::Upper { slot, .. } if !i.unlinked => {
                Ok(Some(self.v.upper_path(slot, &self.path(ino)?)))
            }
            _ => Ok(None),
        }
    }

    /// Attributes of an inode.
    pub fn attr(&mut self, ino: u64) -> OpResult<FileAttr> {
        let kind = self.inode(ino)?.kind;
        // A directory's listing can be large: don't copy it.
        let src = match &self.inode(ino)?.src {
            Src::Dir(info) => Src::Dir(Box::new(DirInfo {
                stack: info.stack.iter().take(1).cloned().collect(),
                floor: info.floor,
                children: None,
                nlink: None,
            })),
            other => other.clone(),
        };
        let mut a = match src {
            Src::Upper { slot, origin } => {
                let i = self.inode(ino)?;
                let m = match (&i.open_fd, i.unlinked) {
                    (Some(f), true) => f.metadata().map_err(|e| errno(&e))?,
                    _ => lstat(&self.v.upper_path(slot, &self.path(ino)?))?,
                };
                let mut a = stat_attr(&m);
                if origin.is_some() {
                    if let Some(d) = self.file_data(ino)? {
                        a.blocks = d.allocated().div_ceil(512);
                    }
                }
                a
            }
            Src::Lower { slot, entry } => {
                let mut a = meta_attr(&entry.meta, kind);
                match &entry.kind {
                    EntryKind::File { size, link, .. } => {
                        a.size = *size;
                        a.blocks = match self.file_data(ino)? {
                            Some(d) => d.allocated().div_ceil(512),
                            None => size.div_ceil(512),
                        };
                        if let Some(g) = link {
                            if let Some((_, root)) = &self.v.slots[slot].root {
                                let links = self.v.lower.links(*root)?;
                                a.nlink = links.get(g).map_or(1, |m| m.len() as u32);
                            }
                        }
                    }
                    EntryKind::Symlink { target } => a.size = target.len() as u64,
                    EntryKind::CharDevice { rdev } | EntryKind::BlockDevice { rdev } => {
                        a.rdev = *rdev as u32
                    }
                    _ => {}
                }
                a
            }
            Src::Dir(info) => {
                let mut a = match info.stack.first() {
                    Some(Part::Upper(s)) => {
                        stat_attr(&lstat(&self.v.upper_path(*s, &self.path(ino)?))?)
                    }
                    Some(Part::Lower { meta, .. }) => {
                        let mut a = meta_attr(meta, Kind::Dir);
                        a.size = 4096;
                        a.blocks = 8;
                        a
                    }
                    None => {
                        let mut a = meta_attr(&self.v.default_meta, Kind::Dir);
                        a.size = 4096;
                        a
                    }
                };
                a.nlink = self.dir_nlink(ino)?;
                a
            }
        };
        a.ino = INodeNo(ino);
        a.kind = kind.file_type();
        Ok(a)
    }

    /// `2 +` subdirectories, as on ext4; counted cheaply when one plane
    /// makes the directory.
    fn dir_nlink(&mut self, ino: u64) -> OpResult<u32> {
        let info = self.dir_info(ino)?;
        if let Some(n) = info.nlink {
            return Ok(n);
        }
        if let Some(children) = &info.children {
            let inodes = &self.st.inodes;
            let dirs = children
                .values()
                .filter(|k| inodes.get(k).is_some_and(|i| i.kind == Kind::Dir))
                .count();
            let n = 2 + dirs as u32;
            if let Some(d) = self.inode_mut(ino)?.dir_mut() {
                d.nlink = Some(n);
            }
            return Ok(n);
        }
        let stack: Vec<Part> = info.stack.iter().take(2).cloned().collect();
        match stack.as_slice() {
            [Part::Lower { node, .. }] => {
                let d = self.v.lower.dir(*node)?;
                let dirs = d
                    .entries
                    .iter()
                    .filter(|e| matches!(e.kind, EntryKind::Dir { .. }))
                    .count();
                Ok(2 + dirs as u32)
            }
            [Part::Upper(s)] => Ok(lstat(&self.v.upper_path(*s, &self.path(ino)?))?.nlink() as u32),
            [] => Ok(2),
            _ => {
                self.load_dir(ino)?;
                self.dir_nlink(ino)
            }
        }
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: u64) -> OpResult<Vec<u8>> {
        let i = self.inode(ino)?;
        if i.kind != Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        match &i.src {
            Src::Upper { slot, .. } => {
                let p = self.v.upper_path(*slot, &self.path(ino)?);
                fs::read_link(&p)
                    .map(|t| t.as_os_str().as_bytes().to_vec())
                    .map_err(|e| errno(&e))
            }
            Src::Lower { entry, .. } => match &entry.kind {
                EntryKind::Symlink { target } => Ok(target.clone()),
                _ => Err(Errno::EINVAL),
            },
            Src::Dir(_) => Err(Errno::EINVAL),
        }
    }

    /// Where an inode's metadata is read from: an upper path, or lower
    /// metadata.
    pub(super) fn meta_source(&self, ino: u64) -> OpResult<MetaSource> {
        let i = self.inode(ino)?;
        Ok(match &i.src {
            Src::Upper { slot, .. } => {
                MetaSource::Upper(self.v.upper_path(*slot, &self.path(ino)?))
            }
            Src::Lower { entry, .. } => MetaSource::Lower(Arc::new(entry.meta.clone())),
            Src::Dir(d) => match d.stack.first() {
                Some(Part::Upper(s)) => MetaSource::Upper(self.v.upper_path(*s, &self.path(ino)?)),
                Some(Part::Lower { meta, .. }) => MetaSource::Lower(meta.clone()),
                None => MetaSource::Lower(self.v.default_meta.clone()),
            },
        })
    }

    /// An extended attribute's value.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> OpResult<Vec<u8>> {
        if upper::is_private(name) {
            return Err(Errno::ENODATA);
        }
        match self.meta_source(ino)? {
            MetaSource::Upper(p) => match xattr::get(&p, OsStr::from_bytes(name)) {
                Ok(Some(v)) => Ok(v),
                Ok(None) => Err(Errno::ENODATA),
                Err(e) => Err(errno(&e)),
            },
            MetaSource::Lower(meta) => meta
                .xattrs
                .iter()
                .find(|x| x.name == name)
                .map(|x| x.value.clone())
                .ok_or(Errno::ENODATA),
        }
    }

    /// Names of the extended attributes, NUL-terminated and concatenated.
    pub fn listxattr(&self, ino: u64) -> OpResult<Vec<u8>> {
        let names: Vec<Vec<u8>> = match self.meta_source(ino)? {
            MetaSource::Upper(p) => xattr::list(&p)
                .map_err(|e| errno(&e))?
                .map(|n| n.as_bytes().to_vec())
                .collect(),
            MetaSource::Lower(meta) => meta.xattrs.iter().map(|x| x.name.clone()).collect(),
        };
        let mut out = Vec::new();
        for n in names.into_iter().filter(|n| !upper::is_private(n)) {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    /// The upper directories making directory `ino` (to sync them).
    pub fn upper_dirs(&self, ino: u64) -> OpResult<Vec<HostPath>> {
        let rel = self.path(ino)?;
        Ok(self
            .dir_info(ino)?
            .stack
            .iter()
            .filter_map(|p| match p {
                Part::Upper(s) => Some(self.v.upper_path(*s, &rel)),
                Part::Lower { .. } => None,
            })
            .collect())
    }
}

pub(super) enum MetaSource {
    Upper(HostPath),
    Lower(Arc<Meta>),
}

fn blank_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Attributes of a lower entry: times are its mtime (lower layers keep no
/// atime or ctime).
fn meta_attr(meta: &Meta, kind: Kind) -> FileAttr {
    let t = system_time(meta.mtime_sec, meta.mtime_nsec);
    FileAttr {
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: kind.file_type(),
        perm: (meta.mode & 0o7777) as u16,
        uid: meta.uid,
        gid: meta.gid,
        ..blank_attr()
    }
}

/// Attributes of an upper file from its `lstat`.
fn stat_attr(m: &Metadata) -> FileAttr {
    FileAttr {
        size: m.size(),
        blocks: m.blocks(),
        atime: system_time(m.atime(), m.atime_nsec() as u32),
        mtime: system_time(m.mtime(), m.mtime_nsec() as u32),
        ctime: system_time(m.ctime(), m.ctime_nsec() as u32),
        crtime: system_time(m.ctime(), m.ctime_nsec() as u32),
        kind: Kind::of_std(m.file_type()).file_type(),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        ..blank_attr()
    }
}
