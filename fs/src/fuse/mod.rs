//! The FUSE front: maps kernel requests onto the view, and moves file data.
//!
//! Files backed by a local file — upper files, and lower files once
//! materialised in the file cache — are opened with FUSE passthrough: the
//! kernel reads and writes the backing file itself. The kernel allows one
//! backing file per inode at a time and no mixing with page-cache opens, so
//! each inode remembers how it is open (`view::Io`). Other opens go through
//! the daemon: lower data from chunks (cached by the kernel, since lower
//! content never changes), upper data by `pread`/`pwrite`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use nix::errno::Errno;

use crate::cache::FileCache;
use crate::view::{errno, Caller, Io, Kind, SetAttr, View};

mod files;

use files::{pread, statvfs, Handle};

/// How long the kernel may cache attributes and names. The daemon is the
/// only writer of its uppers and the kernel sees every change it makes, so
/// this can be long.
const TTL: Duration = Duration::from_secs(10);
/// Largest read or write request.
const MAX_IO: u32 = 1 << 20;

fn err(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e as i32)
}

/// Answers a request that made or found an entry.
fn entry(reply: ReplyEntry, r: Result<fuser::FileAttr, Errno>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(err(e)),
    }
}

/// A directory listing as opened: (inode, kind, name) per entry.
type Listing = Vec<(u64, Kind, Vec<u8>)>;

/// The mounted file system.
pub(crate) struct LaminaFs {
    view: Arc<View>,
    cache: Arc<FileCache>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// Open directories: their listing, made at the first read (a kernel
    /// serving `readdir` from its cache never asks).
    dirs: Mutex<HashMap<u64, Option<Arc<Listing>>>>,
    /// Without opendir (see `init`): listings being read, by directory
    /// inode, from a read at offset 0 until a read past their end.
    reading: Mutex<HashMap<u64, Arc<Listing>>>,
    next_fh: AtomicU64,
    passthrough: AtomicBool,
    /// The kernel opens directories without asking (`FUSE_NO_OPENDIR_SUPPORT`).
    no_opendir: AtomicBool,
    statfs_path: PathBuf,
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn name_bytes(n: &OsStr) -> &[u8] {
    n.as_bytes()
}

impl Filesystem for LaminaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
            && nix::unistd::geteuid().is_root()
        {
            self.passthrough.store(true, Ordering::Relaxed);
            tracing::info!("FUSE passthrough enabled");
        } else {
            tracing::info!("FUSE passthrough unavailable; file data goes through the daemon");
        }
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Opening and closing a directory are two round trips per
        // directory of a walk; without them the kernel keeps listings
        // cached (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, its default then), as
        // `opendir` asked before. Every change comes through this mount, and
        // the kernel drops a directory's cached listing when it changes.
        if config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok()
        {
            self.no_opendir.store(true, Ordering::Relaxed);
        }
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.view.lock().lookup(parent.0, name_bytes(name)) {
            Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.view.lock().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.view.lock().attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let fd = fh.and_then(|h| self.handle(h)).and_then(|h| match &*h {
            Handle::Upper { file } => Some(file.clone()),
            _ => None,
        });
        let sa = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        let mut cx = self.view.lock();
        let fd = fd.or_else(|| cx.inode(ino.0).ok().and_then(|i| i.open_fd.clone()));
        match cx.setattr(ino.0, &sa, fd) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.view.lock().readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut cx = self.view.lock();
        let r = cx
            .mknod(
                parent.0,
                name_bytes(name),
                mode & !(umask & 0o777),
                u64::from(rdev),
                caller(req),
            )
            .and_then(|ino| cx.attr(ino));
        entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut cx = self.view.lock();
        let r = cx
            .mkdir(
                parent.0,
                name_bytes(name),
                mode & !umask & 0o7777,
                caller(req),
            )
            .and_then(|ino| cx.attr(ino));
        entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.view.lock().unlink(parent.0, name_bytes(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.view.lock().rmdir(parent.0, name_bytes(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut cx = self.view.lock();
        let r = cx
            .symlink(
                parent.0,
                name_bytes(link_name),
                target.as_os_str().as_bytes(),
                caller(req),
            )
            .and_then(|ino| cx.attr(ino));
        entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.view.lock().rename(
            parent.0,
            name_bytes(name),
            newparent.0,
            name_bytes(newname),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut cx = self.view.lock();
        let r = cx
            .link(ino.0, newparent.0, name_bytes(newname))
            .and_then(|()| cx.attr(ino.0));
        entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let trunc = flags.0 & libc::O_TRUNC != 0;
        let mut cx = self.view.lock();
        match self.open_file(&mut cx, ino.0, write, trunc, &|f| reply.open_backing(f)) {
            Ok((fh, fl, Some(b))) => reply.opened_passthrough(FileHandle(fh), fl, &b),
            Ok((fh, fl, None)) => reply.opened(FileHandle(fh), fl),
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(fuser::Errno::EBADF);
        };
        let r = match &*h {
            Handle::Upper { file } => pread(file, offset, size).map_err(|e| errno(&e)),
            Handle::Cached { file } => pread(file, offset, size).map_err(|e| errno(&e)),
            Handle::Lower { data, key } => {
                // Follow the cache's writer when it is at this file: one
                // pass over the chunks serves both.
                let followed = self
                    .cache
                    .filling(key)
                    .and_then(|f| f.read(offset, size))
                    .and_then(|r| r.ok());
                match followed {
                    Some(d) => Ok(d),
                    None => self.view.lower.read(data, offset, size),
                }
            }
        };
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(fuser::Errno::EBADF);
        };
        match &*h {
            Handle::Upper { file } => match file.write_all_at(data, offset) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(err(errno(&e))),
            },
            _ => reply.error(fuser::Errno::EBADF),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close (writes are not cached here, and locks are
        // the kernel's): ENOSYS makes the kernel stop sending FLUSH, one
        // round trip less for every close.
        reply.error(fuser::Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_file(ino.0, fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(fuser::Errno::EBADF);
        };
        let r = match &*h {
            Handle::Upper { file } if datasync => file.sync_data(),
            Handle::Upper { file } => file.sync_all(),
            _ => Ok(()),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(errno(&e))),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir.load(Ordering::Relaxed) {
            // From now on the kernel opens directories itself (fh 0).
            return reply.error(fuser::Errno::ENOSYS);
        }
        let is_dir = self.view.lock().inode(ino.0).map(|i| i.kind == Kind::Dir);
        match is_dir {
            Ok(true) => {
                let fh = self.fh();
                self.dirs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fh, None);
                // Every change to the tree comes through this mount, and the
                // kernel drops a cached listing when its directory changes:
                // keep listings cached across opens (a warm `find` then
                // never asks the daemon).
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                );
            }
            Ok(false) => reply.error(fuser::Errno::ENOTDIR),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.listing(fh.0, ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(err(e)),
        };
        let parent = self.view.lock().inode(ino.0).map(|i| i.parent).unwrap_or(1);
        let dots = [
            (ino.0, Kind::Dir, b".".to_vec()),
            (parent.max(1), Kind::Dir, b"..".to_vec()),
        ];
        let (mut full, mut added) = (false, 0);
        for (i, (child, kind, name)) in dots
            .iter()
            .chain(list.iter())
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(
                INodeNo(*child),
                i as u64 + 1,
                kind.file_type(),
                OsStr::from_bytes(name),
            ) {
                full = true;
                break;
            }
            added += 1;
        }
        if !full && added == 0 {
            self.listed(fh.0, ino.0);
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let list = match self.listing(fh.0, ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(err(e)),
        };
        let mut cx = self.view.lock();
        let parent = cx.inode(ino.0).map(|i| i.parent).unwrap_or(1).max(1);
        let dots = [(ino.0, b".".to_vec()), (parent, b"..".to_vec())];
        let entries = dots
            .iter()
            .map(|(i, n)| (*i, n, true))
            .chain(list.iter().map(|(i, _, n)| (*i, n, false)));
        let (mut full, mut added) = (false, 0);
        for (i, (child, name, dot)) in entries.enumerate() {
            let off = i as u64 + 1;
            if off <= offset {
                continue;
            }
            let Ok(attr) = cx.attr(child) else { continue };
            if reply.add(
                INodeNo(child),
                off,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                full = true;
                break;
            }
            added += 1;
            // The kernel takes a reference on every entry but the dots.
            if !dot {
                if let Ok(inode) = cx.inode_mut(child) {
                    inode.nlookup += 1;
                }
            }
        }
        drop(cx);
        if !full && added == 0 {
            self.listed(fh.0, ino.0);
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let dirs = self.view.lock().upper_dirs(ino.0);
        let r = dirs.and_then(|dirs| {
            for d in dirs {
                File::open(&d)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| errno(&e))?;
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match statvfs(&self.statfs_path) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                lamina_sync::manifest::NAME_MAX as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self
            .view
            .lock()
            .setxattr(ino.0, name_bytes(name), value, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.view.lock().getxattr(ino.0, name_bytes(name)) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.view.lock().listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.view.lock().removexattr(ino.0, name_bytes(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // `default_permissions`: the kernel checks access itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut cx = self.view.lock();
        let made = cx.create(
            parent.0,
            name_bytes(name),
            mode & !umask & 0o7777,
            caller(req),
        );
        let (ino, file) = match made {
            Ok(x) => x,
            Err(e) => return reply.error(err(e)),
        };
        let attr = match cx.attr(ino) {
            Ok(a) => a,
            Err(e) => return reply.error(err(e)),
        };
        let _ = flags;
        let file = Arc::new(file);
        let id = files::file_id(&file).ok();
        let inode = match cx.inode_mut(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(err(e)),
        };
        inode.opens = 1;
        inode.open_fd = Some(file.clone());
        let backing = match id {
            Some(p) if self.passthrough.load(Ordering::Relaxed) => match reply.open_backing(&*file)
            {
                Ok(b) => {
                    let b = Arc::new(b);
                    inode.io = Io::Passthrough {
                        backing: b.clone(),
                        target: p,
                        count: 1,
                    };
                    Some(b)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the kernel refused a passthrough backing file; writing through the daemon from now on");
                    self.passthrough.store(false, Ordering::Relaxed);
                    inode.io = Io::Cached(1);
                    None
                }
            },
            _ => {
                inode.io = Io::Cached(1);
                None
            }
        };
        drop(cx);
        let fh = self.put_handle(Handle::Upper { file });
        match backing {
            Some(b) => reply.created_passthrough(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
                &b,
            ),
            None => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(fuser::Errno::EBADF);
        };
        let Handle::Upper { file } = &*h else {
            return reply.error(fuser::Errno::EBADF);
        };
        let flags = nix::fcntl::FallocateFlags::from_bits_truncate(mode);
        match nix::fcntl::fallocate(&**file, flags, offset as i64, length as i64) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(fuser::Errno::EBADF);
        };
        let seek_file = |f: &File| {
            let w = match whence {
                libc::SEEK_DATA => nix::unistd::Whence::SeekData,
                libc::SEEK_HOLE => nix::unistd::Whence::SeekHole,
                libc::SEEK_END => nix::unistd::Whence::SeekEnd,
                libc::SEEK_CUR => nix::unistd::Whence::SeekCur,
                _ => nix::unistd::Whence::SeekSet,
            };
            nix::unistd::lseek(f, offset, w)
        };
        let r = match &*h {
            Handle::Upper { file } => seek_file(file),
            Handle::Cached { file } => seek_file(file),
            Handle::Lower { data, .. } => {
                let off = offset.max(0) as u64;
                match whence {
                    libc::SEEK_DATA => data.next_data(off).map(|o| o as i64).ok_or(Errno::ENXIO),
                    libc::SEEK_HOLE if off >= data.size => Err(Errno::ENXIO),
                    libc::SEEK_HOLE => Ok(data.next_hole(off) as i64),
                    libc::SEEK_END => Ok(data.size as i64 + offset),
                    _ => Ok(offset),
                }
            }
        };
        match r {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }
}
