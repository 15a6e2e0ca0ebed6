//! Open files and directories: handles, how an inode's data is reached
//! (upper file, materialised lower file, chunks; passthrough or not), and
//! directory listings.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{FileHandle, FopenFlags};
use nix::errno::Errno;

use super::{LaminaFs, Listing};
use crate::cache::FileCache;
use crate::lower::FileData;
use crate::upper::Origin;
use crate::view::{errno, Ctx, Io, Kind, Src, View};

impl LaminaFs {
    /// The listing of open directory `fh` (of `ino`), made on its first
    /// read and again when read from the start (`rewinddir`).
    pub(super) fn listing(&self, fh: u64, ino: u64, offset: u64) -> Result<Arc<Listing>, Errno> {
        if fh == 0 {
            // Opened by the kernel alone: one listing per directory, taken
            // at offset 0 (or when none is being read) and read by offset.
            let mut reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
            if offset > 0 {
                if let Some(l) = reading.get(&ino) {
                    return Ok(l.clone());
                }
            }
            let list = Arc::new(self.view.lock().list(ino)?);
            reading.insert(ino, list.clone());
            return Ok(list);
        }
        match self.dirs.lock().unwrap_or_else(|p| p.into_inner()).get(&fh) {
            None => return Err(Errno::EBADF),
            Some(Some(l)) if offset > 0 => return Ok(l.clone()),
            Some(_) => {}
        }
        let list = Arc::new(self.view.lock().list(ino)?);
        if let Some(slot) = self
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&fh)
        {
            *slot = Some(list.clone());
        }
        Ok(list)
    }
}

impl LaminaFs {
    /// A read of `ino`'s listing found nothing more.
    pub(super) fn listed(&self, fh: u64, ino: u64) {
        if fh == 0 {
            self.reading
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ino);
        }
    }
}

/// An open file.
pub(super) enum Handle {
    /// An upper file (also behind a passthrough open, for fsync).
    Upper { file: Arc<File> },
    /// A materialised lower file.
    Cached { file: File },
    /// Lower data read from chunks.
    Lower { data: Arc<FileData>, key: String },
}

impl LaminaFs {
    pub fn new(view: Arc<View>, cache: Arc<FileCache>, statfs_path: PathBuf) -> LaminaFs {
        LaminaFs {
            view,
            cache,
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            reading: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            no_opendir: AtomicBool::new(false),
            statfs_path,
        }
    }

    pub(super) fn fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn handle(&self, fh: FileHandle) -> Option<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned()
    }

    pub(super) fn put_handle(&self, h: Handle) -> u64 {
        let fh = self.fh();
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(h));
        fh
    }

    /// How to open `ino` for reading when it is not an ordinary upper file:
    /// a materialised copy, else its chunks (asking for a copy).
    fn lower_target(&self, cx: &mut Ctx<'_>, ino: u64) -> Result<LowerTarget, Errno> {
        let origin = match &cx.inode(ino)?.src {
            Src::Upper {
                origin: Some(o), ..
            } => (**o).clone(),
            Src::Lower { entry, .. } => match &entry.kind {
                lamina_sync::manifest::EntryKind::File { size, content, .. } => Origin {
                    size: *size,
                    content: content.clone(),
                },
                _ => return Err(Errno::EINVAL),
            },
            _ => return Err(Errno::EINVAL),
        };
        let key = origin.key();
        if let Some(p) = self.cache.get(&key) {
            return Ok(LowerTarget::Cached(p));
        }
        let data = cx.file_data(ino)?.ok_or(Errno::EIO)?;
        self.cache.request(&key, data.clone());
        Ok(LowerTarget::Chunks(data, key))
    }

    /// Opens `ino` (a regular file): returns the handle, the open flags and
    /// the backing to pass through, if any.
    pub(super) fn open_file(
        &self,
        cx: &mut Ctx<'_>,
        ino: u64,
        write: bool,
        trunc: bool,
        reply_backing: &dyn Fn(&File) -> std::io::Result<fuser::BackingId>,
    ) -> Result<(u64, FopenFlags, Option<Arc<fuser::BackingId>>), Errno> {
        if cx.inode(ino)?.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        if write || trunc {
            if trunc {
                cx.make_writable_file(ino, 0)?;
            } else {
                cx.make_writable_file(ino, u64::MAX)?;
            }
        }
        let upper_real = matches!(cx.inode(ino)?.src, Src::Upper { origin: None, .. });
        let (handle, target, keep_cache) = if upper_real {
            let path = cx.upper_file(ino)?.ok_or(Errno::ENOENT)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| errno(&e))?;
            if trunc {
                file.set_len(0).map_err(|e| errno(&e))?;
            }
            let file = Arc::new(file);
            cx.inode_mut(ino)?.open_fd = Some(file.clone());
            let id = file_id(&file)?;
            (Handle::Upper { file }, Some(id), false)
        } else {
            match self.lower_target(cx, ino)? {
                LowerTarget::Cached(p) => {
                    let file = File::open(&p).map_err(|e| errno(&e))?;
                    let id = file_id(&file)?;
                    (Handle::Cached { file }, Some(id), true)
                }
                LowerTarget::Chunks(data, key) => (Handle::Lower { data, key }, None, true),
            }
        };
        let mut flags = if keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        let inode = cx.inode_mut(ino)?;
        inode.opens += 1;
        let backing = match (&mut inode.io, target) {
            (
                Io::Passthrough {
                    backing,
                    target: t,
                    count,
                },
                target,
            ) => {
                if target != Some(*t) && write {
                    // The kernel allows one backing file per inode: a lower
                    // file open for reading cannot also be written.
                    tracing::warn!(ino, "file is open for reading from the lower layer; refusing to open it for writing until that is closed");
                    inode.opens -= 1;
                    return Err(Errno::ETXTBSY);
                }
                *count += 1;
                Some(backing.clone())
            }
            (Io::Cached(n), _) => {
                *n += 1;
                None
            }
            (io @ Io::Idle, Some(t)) if self.passthrough.load(Ordering::Relaxed) => {
                let file = match &handle {
                    Handle::Upper { file } => Some(&**file),
                    Handle::Cached { file } => Some(file),
                    Handle::Lower { .. } => None,
                };
                match file.map(reply_backing) {
                    Some(Ok(b)) => {
                        let b = Arc::new(b);
                        *io = Io::Passthrough {
                            backing: b.clone(),
                            target: t,
                            count: 1,
                        };
                        Some(b)
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the kernel refused a passthrough backing file; reading through the daemon from now on");
                        self.passthrough.store(false, Ordering::Relaxed);
                        *io = Io::Cached(1);
                        None
                    }
                    None => {
                        *io = Io::Cached(1);
                        None
                    }
                }
            }
            (io, _) => {
                *io = Io::Cached(1);
                None
            }
        };
        if backing.is_some() {
            flags.remove(FopenFlags::FOPEN_KEEP_CACHE);
        }
        let fh = self.put_handle(handle);
        Ok((fh, flags, backing))
    }

    pub(super) fn release_file(&self, ino: u64, fh: FileHandle) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        let mut cx = self.view.lock();
        if let Ok(i) = cx.inode_mut(ino) {
            i.opens = i.opens.saturating_sub(1);
            let idle = match &mut i.io {
                Io::Passthrough { count, .. } | Io::Cached(count) => {
                    *count = count.saturating_sub(1);
                    *count == 0
                }
                Io::Idle => true,
            };
            if idle {
                i.io = Io::Idle;
            }
            if i.opens == 0 {
                i.open_fd = None;
                if i.unlinked && i.nlookup == 0 {
                    cx.st.inodes.remove(&ino);
                }
            }
        }
    }
}

enum LowerTarget {
    Cached(PathBuf),
    Chunks(Arc<FileData>, String),
}

/// Device and inode number of an open file: which backing file it is.
pub(super) fn file_id(f: &File) -> Result<(u64, u64), Errno> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().map_err(|e| errno(&e))?;
    Ok((m.dev(), m.ino()))
}

/// Reads up to `len` bytes at `off` from `f`.
pub(super) fn pread(f: &File, off: u64, len: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

pub(super) fn statvfs(path: &Path) -> Result<nix::sys::statvfs::Statvfs, Errno> {
    nix::sys::statvfs::statvfs(path)
}
