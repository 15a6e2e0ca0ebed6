//! Creating and removing names: create, mkdir, mknod, symlink, link,
//! unlink, rmdir.
//!
//! A new name goes to the slot its path routes to. If that slot's upper
//! holds a whiteout for the name, the new entry replaces it atomically
//! (built in the work directory, then renamed or exchanged over it). A
//! removed name that a lower plane would still show gets a whiteout, made
//! atomically with the removal where the kernel allows it
//! (`RENAME_WHITEOUT`).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

use nix::errno::Errno;
use nix::fcntl::RenameFlags;
use nix::sys::stat::{mknod, Mode, SFlag};

use super::copyup::rename2;
use super::{check_name, errno, join, Ctx, DirInfo, Inode, Kind, OpResult, Part, Probe, Src};
use crate::upper;

/// Who asks (from the FUSE request).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Where a new name will be made.
pub(crate) struct NewEntry {
    pub slot: usize,
    /// Its path in the slot's upper.
    pub dest: crate::hostpath::HostPath,
    /// The upper holds a whiteout there, to be replaced.
    pub over_whiteout: bool,
    /// A new directory must be opaque (a lower plane has the name).
    pub opaque: bool,
    /// Floor of a new directory.
    pub floor: u32,
}

/// Whether the caller belongs to group `gid` (primary or supplementary).
fn in_group(c: Caller, gid: u32) -> bool {
    if c.uid == 0 || c.gid == gid {
        return true;
    }
    let Ok(status) = fs::read_to_string(format!("/proc/{}/status", c.pid)) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

impl Ctx<'_> {
    /// Checks that `name` is free in `parent` and decides where it goes.
    pub fn new_entry(&mut self, parent: u64, name: &[u8]) -> OpResult<NewEntry> {
        check_name(name)?;
        if self.inode(parent)?.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if self.child(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let rel = join(&self.path(parent)?, name);
        let probes = self.probe(parent, name)?;
        let floor = self.dir_info(parent)?.floor;
        let bound = probes.first().map_or(floor, |(p, _)| (*p).min(floor));
        let slot = self.pick_slot(&rel, bound)?;
        self.ensure_upper_dir(parent, slot)?;
        let up = self.v.up(slot);
        let over_whiteout = probes
            .iter()
            .any(|(p, f)| *p == up && *f == Probe::Whiteout);
        let next_below = probes.iter().find(|(p, _)| *p > up);
        let opaque = over_whiteout && next_below.is_some_and(|(_, f)| *f != Probe::Whiteout);
        let floor = if opaque {
            up
        } else {
            match next_below {
                Some((p, _)) => floor.min(p.saturating_sub(1)),
                None => floor,
            }
        };
        Ok(NewEntry {
            slot,
            dest: self.v.upper_path(slot, &rel),
            over_whiteout,
            opaque,
            floor,
        })
    }

    /// Owner and mode of a new entry: set-group-ID directories pass on
    /// their group (and, to subdirectories, the bit itself).
    fn owner(&self, parent: u64, c: Caller, mut mode: u32, dir: bool) -> OpResult<(u32, u32, u32)> {
        let pa = match self.meta_source(parent)? {
            super::MetaSource::Upper(p) => {
                let m = fs::symlink_metadata(p).map_err(|e| errno(&e))?;
                (m.mode(), m.gid())
            }
            super::MetaSource::Lower(m) => (m.mode, m.gid),
        };
        let gid = if pa.0 & 0o2000 != 0 {
            if dir {
                mode |= 0o2000;
            }
            pa.1
        } else {
            c.gid
        };
        if !dir && mode & 0o2010 == 0o2010 && !in_group(c, gid) {
            mode &= !0o2000;
        }
        Ok((c.uid, gid, mode & 0o7777))
    }

    /// Moves a finished entry built at `tmp` to the new name.
    fn place(&mut self, tmp: &std::path::Path, ne: &NewEntry) -> OpResult<()> {
        let placed = if ne.over_whiteout {
            // Swap with the whiteout (works for a directory too), then drop
            // the whiteout now sitting at `tmp`.
            rename2(tmp, &ne.dest, RenameFlags::RENAME_EXCHANGE)
                .map(|()| upper::remove_all(tmp).unwrap_or(()))
        } else {
            rename2(tmp, &ne.dest, RenameFlags::RENAME_NOREPLACE)
        };
        if let Err(e) = placed {
            let _ = upper::remove_all(tmp);
            tracing::error!(dest = %ne.dest.display(), error = %e, "cannot place a new entry");
            return Err(e);
        }
        Ok(())
    }

    /// Registers a new entry's inode under `parent` and counts a kernel
    /// reference.
    fn adopt(&mut self, parent: u64, name: &[u8], kind: Kind, ne: &NewEntry) -> OpResult<u64> {
        let src = if kind == Kind::Dir {
            Src::Dir(Box::new(DirInfo {
                stack: vec![Part::Upper(ne.slot)],
                floor: ne.floor,
                children: Some(Default::default()),
                nlink: None,
            }))
        } else {
            Src::Upper {
                slot: ne.slot,
                origin: None,
            }
        };
        let mut inode = Inode::new(kind, parent, name.to_vec(), src);
        inode.nlookup = 1;
        let ino = self.alloc(inode);
        if let Some(d) = self.inode_mut(parent)?.dir_mut() {
            if let Some(c) = d.children.as_mut() {
                c.insert(name.to_vec(), ino);
            }
            if kind == Kind::Dir {
                d.nlink = None;
            }
        }
        self.touch_dir(parent, ne.slot)?;
        Ok(ino)
    }

    /// Creates and opens a regular file (O_CREAT).
    pub fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        c: Caller,
    ) -> OpResult<(u64, File)> {
        let ne = self.new_entry(parent, name)?;
        let (uid, gid, mode) = self.owner(parent, c, mode, false)?;
        let at = if ne.over_whiteout {
            crate::hostpath::HostPath::plain(self.tmp_path())
        } else {
            ne.dest.clone()
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&at)
            .map_err(|e| errno(&e))?;
        let owned = set_owner(&f, uid, gid, mode);
        if let Err(e) = owned {
            let _ = fs::remove_file(&at);
            return Err(e);
        }
        if ne.over_whiteout {
            self.place(&at, &ne)?;
        }
        let ino = self.adopt(parent, name, Kind::File, &ne)?;
        Ok((ino, f))
    }

    /// Makes a directory.
    pub fn mkdir(&mut self, parent: u64, name: &[u8], mode: u32, c: Caller) -> OpResult<u64> {
        let ne = self.new_entry(parent, name)?;
        let (uid, gid, mode) = self.owner(parent, c, mode, true)?;
        let tmp = self.tmp_path();
        fs::create_dir(&tmp).map_err(|e| errno(&e))?;
        let made = (|| -> OpResult<()> {
            std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid)).map_err(|e| errno(&e))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(|e| errno(&e))?;
            if ne.opaque {
                upper::set_opaque(&tmp).map_err(|e| errno(&e))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = fs::remove_dir(&tmp);
            return Err(e);
        }
        self.place(&tmp, &ne)?;
        self.adopt(parent, name, Kind::Dir, &ne)
    }

    /// Makes a device, fifo, socket or empty regular file.
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        c: Caller,
    ) -> OpResult<u64> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => SFlag::S_IFREG,
            libc::S_IFCHR => SFlag::S_IFCHR,
            libc::S_IFBLK => SFlag::S_IFBLK,
            libc::S_IFIFO => SFlag::S_IFIFO,
            libc::S_IFSOCK => SFlag::S_IFSOCK,
            _ => return Err(Errno::EINVAL),
        };
        if kind == SFlag::S_IFCHR && rdev == 0 {
            // 0/0 character devices mean "deleted" in upper directories.
            tracing::warn!("refusing to create a 0/0 character device (reserved for whiteouts)");
            return Err(Errno::EPERM);
        }
        let ne = self.new_entry(parent, name)?;
        let (uid, gid, perm) = self.owner(parent, c, mode & 0o7777, false)?;
        let tmp = self.tmp_path();
        mknod(&tmp, kind, Mode::empty(), rdev)?;
        let made = (|| -> OpResult<()> {
            std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid)).map_err(|e| errno(&e))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(perm)).map_err(|e| errno(&e))
        })();
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.place(&tmp, &ne)?;
        let k = match kind {
            SFlag::S_IFCHR => Kind::Char,
            SFlag::S_IFBLK => Kind::Block,
            SFlag::S_IFIFO => Kind::Fifo,
            SFlag::S_IFSOCK => Kind::Socket,
            _ => Kind::File,
        };
        self.adopt(parent, name, k, &ne)
    }

    /// Makes a symbolic link.
    pub fn symlink(&mut self, parent: u64, name: &[u8], target: &[u8], c: Caller) -> OpResult<u64> {
        if target.len() >= libc::PATH_MAX as usize {
            return Err(Errno::ENAMETOOLONG);
        }
        let ne = self.new_entry(parent, name)?;
        let (uid, gid, _) = self.owner(parent, c, 0o777, false)?;
        let tmp = self.tmp_path();
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &tmp).map_err(|e| errno(&e))?;
        if let Err(e) = std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid)) {
            let _ = fs::remove_file(&tmp);
            return Err(errno(&e));
        }
        self.place(&tmp, &ne)?;
        self.adopt(parent, name, Kind::Symlink, &ne)
    }

    /// Adds the name `newname` in `newparent` for file `ino`.
    pub fn link(&mut self, ino: u64, newparent: u64, newname: &[u8]) -> OpResult<()> {
        if self.inode(ino)?.kind == Kind::Dir {
            return Err(Errno::EPERM);
        }
        let mut slot = self.make_upper(ino)?;
        check_name(newname)?;
        if self.child(newparent, newname)?.is_some() {
            return Err(Errno::EEXIST);
        }
        // All names of a file live in one slot (one layer's version holds
        // the whole link group), so the new name joins the file's slot if
        // nothing above hides it there; otherwise the file's names all move
        // up to the slot the new name can be in.
        let probes = self.probe(newparent, newname)?;
        let floor = self.dir_info(newparent)?.floor;
        let bound = probes.first().map_or(floor, |(p, _)| (*p).min(floor));
        let rel = join(&self.path(newparent)?, newname);
        if self.v.up(slot) > bound {
            let w = self.pick_slot(&rel, bound)?;
            self.lift(ino, w)?;
            slot = w;
        }
        let src = self.upper_file(ino)?.ok_or(Errno::ENOENT)?;
        self.ensure_upper_dir(newparent, slot)?;
        let dest = self.v.upper_path(slot, &rel);
        let up = self.v.up(slot);
        let over_whiteout = probes
            .iter()
            .any(|(p, f)| *p == up && *f == Probe::Whiteout);
        if over_whiteout {
            let tmp = self.tmp_path();
            fs::hard_link(&src, &tmp).map_err(|e| errno(&e))?;
            rename2(&tmp, &dest, RenameFlags::empty())?;
        } else {
            fs::hard_link(&src, &dest).map_err(|e| errno(&e))?;
        }
        let real = fs::symlink_metadata(&dest).map_err(|e| errno(&e))?.ino();
        self.st.upper_links.insert(real, ino);
        let i = self.inode_mut(ino)?;
        i.aliases.push((newparent, newname.to_vec()));
        i.nlookup += 1;
        if let Some(d) = self.inode_mut(newparent)?.dir_mut() {
            if let Some(c) = d.children.as_mut() {
                c.insert(newname.to_vec(), ino);
            }
        }
        self.touch_dir(newparent, slot)
    }

    /// Removes the non-directory `name` from `parent`.
    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> OpResult<()> {
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        if self.inode(ino)?.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        // A lower hard-link group is copied up first, so its other names
        // keep the file and see the right link count.
        if let Src::Lower { .. } = self.inode(ino)?.src {
            if self.attr(ino)?.nlink > 1 {
                self.make_upper(ino)?;
            }
        }
        let rel = join(&self.path(parent)?, name);
        let slot = match self.inode(ino)?.src.clone() {
            Src::Upper { slot, .. } => {
                let at = self.v.upper_path(slot, &rel);
                if self.shows_below(parent, name, self.v.up(slot))? {
                    let tmp = self.tmp_path();
                    rename2(&at, &tmp, RenameFlags::RENAME_WHITEOUT)?;
                    fs::remove_file(&tmp).map_err(|e| errno(&e))?;
                } else {
                    fs::remove_file(&at).map_err(|e| errno(&e))?;
                }
                slot
            }
            Src::Lower { slot, .. } => {
                let s = self.pick_slot(&rel, self.v.up(slot) + 1)?;
                self.ensure_upper_dir(parent, s)?;
                upper::make_whiteout(&self.v.upper_path(s, &rel))?;
                s
            }
            Src::Dir(_) => return Err(Errno::EISDIR),
        };
        self.drop_child(parent, name, ino)?;
        self.touch_dir(parent, slot)
    }

    /// Forgets that `name` in `parent` is `ino`.
    pub fn drop_child(&mut self, parent: u64, name: &[u8], ino: u64) -> OpResult<()> {
        let is_dir = self.inode(ino)?.kind == Kind::Dir;
        if let Some(d) = self.inode_mut(parent)?.dir_mut() {
            if let Some(c) = d.children.as_mut() {
                c.remove(name);
            }
            if is_dir {
                d.nlink = None;
            }
        }
        let i = self.inode_mut(ino)?;
        if !i.drop_name(parent, name) {
            i.unlinked = true;
            if i.nlookup == 0 && i.opens == 0 {
                self.st.inodes.remove(&ino);
            }
        }
        Ok(())
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&mut self, parent: u64, name: &[u8]) -> OpResult<()> {
        check_name(name)?;
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        if self.inode(ino)?.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if !self.children(ino)?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        let rel = join(&self.path(parent)?, name);
        let stack = self.dir_info(ino)?.stack.clone();
        let slot = match stack.first() {
            Some(Part::Upper(s)) => *s,
            Some(p) => self.pick_slot(&rel, self.v.plane(p))?,
            None => return Err(Errno::EIO),
        };
        // Upper copies below the top hold nothing visible: drop them.
        for p in &stack[1..] {
            if let Part::Upper(s) = p {
                upper::remove_all(&self.v.upper_path(*s, &rel)).map_err(|e| errno(&e))?;
            }
        }
        let up = self.v.up(slot);
        let whiteout = self.shows_below(parent, name, up)?;
        if matches!(stack.first(), Some(Part::Upper(s)) if *s == slot) {
            let at = self.v.upper_path(slot, &rel);
            if whiteout {
                let tmp = self.tmp_path();
                rename2(&at, &tmp, RenameFlags::RENAME_WHITEOUT)?;
                upper::remove_all(&tmp).map_err(|e| errno(&e))?;
            } else {
                upper::remove_all(&at).map_err(|e| errno(&e))?;
            }
        } else {
            self.ensure_upper_dir(parent, slot)?;
            upper::make_whiteout(&self.v.upper_path(slot, &rel))?;
        }
        self.drop_child(parent, name, ino)?;
        self.touch_dir(parent, slot)
    }
}

/// Gives a new file its owner, then its mode again (a chown clears set-ID
/// bits).
fn set_owner(f: &File, uid: u32, gid: u32, mode: u32) -> OpResult<()> {
    let m = f.metadata().map_err(|e| errno(&e))?;
    if m.uid() != uid || m.gid() != gid {
        std::os::unix::fs::fchown(f, Some(uid), Some(gid)).map_err(|e| errno(&e))?;
        if mode & 0o6000 != 0 {
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| errno(&e))?;
        }
    }
    Ok(())
}
