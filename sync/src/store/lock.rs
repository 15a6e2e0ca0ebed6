//! Inter-process locks on a store directory.
//!
//! RocksDB lets one process open the catalog for writing, so writers are
//! serialised by an exclusive `flock` on `lock` (its content names the holder
//! for error messages). Readers open the catalog as a RocksDB secondary and
//! never block writers. Garbage collection must not delete chunks that a
//! reader is reading or that an import has written but not yet committed, so
//! every reader and writer also holds `gc.lock` shared, and gc takes it
//! exclusive:
//!
//! | access | `lock`    | `gc.lock` |
//! |--------|-----------|-----------|
//! | read   | —         | shared    |
//! | serve  | —         | —         |
//! | write  | exclusive | shared    |
//! | gc     | exclusive | exclusive |
//!
//! `serve` is for long-running readers (the NBD server) that must not keep gc
//! out forever. They only read versions that refs keep alive (a disk's base
//! is pinned by a ref), and when gc has moved a chunk they catch up with the
//! catalog and read it again (see `Store::refresh`).
//!
//! A third lock, `catalog.lock`, covers only the moments when a writer
//! rewrites the catalog's file set (RocksDB recovery at open, memtable flush
//! at close): the writer holds it exclusive then, and a reader holds it
//! shared while it opens its secondary, so a reader never lists files that
//! are being replaced under it.
//!
//! `flock` locks vanish with the process, so a killed command never leaves
//! the store locked.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// What a process is going to do with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only (listings, export, fsck). Runs beside a writer.
    Read,
    /// Read only, long-running, beside writers and gc (servers).
    Serve,
    /// Add data (import, create). One writer at a time.
    Write,
    /// Delete data. Excludes writers and readers.
    Gc,
}

/// What to do when a lock is held by another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Fail at once with [`Error::Locked`].
    Fail,
    /// Wait, at most this long if given.
    Wait(Option<Duration>),
}

/// Called once with a description of the holder when a lock must be waited
/// for, so a command line can tell its user why it pauses.
pub type WaitNotice<'a> = &'a dyn Fn(&str);

pub(crate) const WRITER_LOCK: &str = "lock";
/// Held shared by every process waiting for [`WRITER_LOCK`], so a
/// long-running writer that takes the lock again and again (the sync
/// server) can see that someone waits and let go (see [`writer_waiting`]).
pub(crate) const WAIT_LOCK: &str = "lock.wait";
pub(crate) const GC_LOCK: &str = "gc.lock";
pub(crate) const CATALOG_LOCK: &str = "catalog.lock";

/// Holds `catalog.lock` (see the module doc) until dropped.
pub(crate) struct CatalogGuard(File);

impl CatalogGuard {
    /// Waits for the lock: exclusive for a writer, shared for a reader.
    /// Holders keep it for milliseconds, so this always waits.
    pub(crate) fn acquire(root: &Path, exclusive: bool) -> Result<CatalogGuard> {
        let path = root.join(CATALOG_LOCK);
        let f = open_lock_file(&path)?;
        if exclusive { f.lock() } else { f.lock_shared() }.ctx(&path, "lock")?;
        Ok(CatalogGuard(f))
    }
}

impl Drop for CatalogGuard {
    fn drop(&mut self) {
        // Closing the file releases the lock anyway; unlocking first just
        // makes the release immediate.
        if let Err(e) = self.0.unlock() {
            tracing::debug!(%e, "unlocking catalog.lock");
        }
    }
}

/// Locks held for the lifetime of an open store.
#[derive(Debug)]
pub(crate) struct StoreLocks {
    _writer: Option<File>,
    _gc: Option<File>,
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx(path, "open lock file")
}

fn holder_of(file: &mut File) -> String {
    let mut s = String::new();
    // The holder note is best effort: an unreadable note still leaves a
    // useful error ("another process").
    if file.rewind().is_ok() && file.read_to_string(&mut s).is_ok() && !s.trim().is_empty() {
        s.trim().to_owned()
    } else {
        "another process".to_owned()
    }
}

fn acquire(
    root: &Path,
    file: &mut File,
    path: &Path,
    exclusive: bool,
    wait: LockWait,
    notice: WaitNotice<'_>,
    describe: &dyn Fn(&mut File) -> String,
) -> Result<()> {
    let try_once = |f: &File| {
        if exclusive {
            f.try_lock()
        } else {
            f.try_lock_shared()
        }
    };
    match try_once(file) {
        Ok(()) => return Ok(()),
        Err(TryLockError::Error(e)) => return Err(Error::io(path, "lock", e)),
        Err(TryLockError::WouldBlock) => {}
    }
    let holder = describe(file);
    // Announce the wait while it lasts (writers only; see WAIT_LOCK).
    let _waiting = if exclusive && path.ends_with(WRITER_LOCK) {
        let w = open_lock_file(&root.join(WAIT_LOCK))?;
        w.lock_shared().ctx(root.join(WAIT_LOCK), "lock")?;
        Some(w)
    } else {
        None
    };
    let deadline = match wait {
        LockWait::Fail => {
            return Err(Error::Locked {
                path: root.to_owned(),
                holder,
            })
        }
        LockWait::Wait(limit) => limit.map(|d| Instant::now() + d),
    };
    notice(&holder);
    loop {
        match try_once(file) {
            Ok(()) => return Ok(()),
            Err(TryLockError::Error(e)) => return Err(Error::io(path, "lock", e)),
            Err(TryLockError::WouldBlock) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::Locked {
                path: root.to_owned(),
                holder: describe(file),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Access {
    /// Whether this access may change the store.
    pub fn writable(self) -> bool {
        matches!(self, Access::Write | Access::Gc)
    }
}

impl StoreLocks {
    /// Takes the locks `access` needs, recording `command` as the holder.
    pub(crate) fn acquire(
        root: &Path,
        access: Access,
        wait: LockWait,
        notice: WaitNotice<'_>,
        command: &str,
    ) -> Result<StoreLocks> {
        if access == Access::Serve {
            return Ok(StoreLocks {
                _writer: None,
                _gc: None,
            });
        }
        let writer = if access == Access::Read {
            None
        } else {
            let path = root.join(WRITER_LOCK);
            let mut f = open_lock_file(&path)?;
            acquire(root, &mut f, &path, true, wait, notice, &holder_of)?;
            let note = format!("pid {} ({command})\n", std::process::id());
            f.set_len(0)
                .and_then(|()| f.rewind())
                .and_then(|()| f.write_all(note.as_bytes()))
                .ctx(&path, "write lock holder")?;
            Some(f)
        };
        let gc_path = root.join(GC_LOCK);
        let mut gc = open_lock_file(&gc_path)?;
        let describe = |_: &mut File| -> String {
            if access == Access::Gc {
                "a reader (e.g. `lamina layer export` or `lamina fsck`)".to_owned()
            } else {
                "garbage collection (`lamina gc`)".to_owned()
            }
        };
        acquire(
            root,
            &mut gc,
            &gc_path,
            access == Access::Gc,
            wait,
            notice,
            &describe,
        )?;
        Ok(StoreLocks {
            _writer: writer,
            _gc: Some(gc),
        })
    }
}

/// Path of a reader's private RocksDB secondary directory.
pub(crate) fn secondary_dir(_root: &Path) -> PathBuf {
    // In the system's temporary directory, not the store's: a reader
    // writes nothing into the store, so a full or read-only one (a mirror
    // on a full share) can still be read.
    std::env::temp_dir().join(format!(
        "{SECONDARY_PREFIX}{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// Name prefix of readers' secondary directories in the temporary directory.
pub(crate) const SECONDARY_PREFIX: &str = "lamina-reader-";

/// Whether another process waits for the writer lock of the store at
/// `root`.
pub fn writer_waiting(root: &Path) -> bool {
    let Ok(f) = open_lock_file(&root.join(WAIT_LOCK)) else {
        return false;
    };
    match f.try_lock() {
        Ok(()) => {
            // Dropping the file releases the probe at once.
            false
        }
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}

/// Keeps garbage collection out of a store without opening it: held by a
/// server between the requests of a transfer, so chunks uploaded but not
/// yet referenced by a version are not swept meanwhile. Released on drop.
#[derive(Debug)]
pub struct GcPin {
    _file: File,
    /// On Ceph, a shared hold of the pool's gc lock.
    pub(crate) rados: Option<crate::rados::GcLock>,
}

impl GcPin {
    /// Takes `gc.lock` shared, waiting while a gc runs.
    ///
    /// # Errors
    /// I/O failures.
    pub fn acquire(root: &Path) -> Result<GcPin> {
        let path = root.join(GC_LOCK);
        let f = open_lock_file(&path)?;
        f.lock_shared().ctx(&path, "lock")?;
        Ok(GcPin {
            _file: f,
            rados: None,
        })
    }
}
