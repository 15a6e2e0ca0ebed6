//! Exports: what an NBD client reads and writes.
//!
//! * [`ImageExport`]: one qcow2 or raw file (`lamina serve --file`).
//! * [`LayerExport`]: a disk layer version from the store, read-only.
//! * [`DiskExport`]: a writable disk: a qcow2 overlay over a base layer
//!   version, with a block map marked before every change.
//!
//! All methods are blocking; the server calls them from blocking threads.
//! One export object is shared by every connection to it, so a flush on any
//! connection covers writes acknowledged on all of them (`CAN_MULTI_CONN`).

use std::path::Path;
use std::sync::{Arc, RwLock};

use nix::fcntl::{fallocate, FallocateFlags};

use crate::base::LayerImage;
use crate::blockmap::BlockMap;
use crate::error::{Error, IoContext, Result};
use crate::qcow::{is_qcow2, Backing, Qcow2};
use crate::source::{check_range, RawFile, ReadAt, Runs};

/// An NBD export.
pub trait Export: Send + Sync {
    /// Export name.
    fn name(&self) -> &str;
    /// Human-readable description.
    fn description(&self) -> String;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are allowed.
    fn writable(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// Out of range, I/O, corruption.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at `offset`; durable on return when `fua`.
    ///
    /// # Errors
    /// Read-only, out of range, I/O.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Zeroes a range; `no_hole` keeps it allocated; `fast` fails with
    /// [`Error::NotFast`] unless zeroing is cheaper than writing.
    ///
    /// # Errors
    /// Read-only, out of range, not fast, I/O.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<()>;
    /// Discards a range (it may read as zeros afterwards).
    ///
    /// # Errors
    /// Read-only, out of range, I/O.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// Makes every completed write durable.
    ///
    /// # Errors
    /// I/O failures.
    fn flush(&self) -> Result<()>;
    /// Hint: the range will be read soon.
    ///
    /// # Errors
    /// Out of range, I/O.
    fn cache(&self, offset: u64, len: u64) -> Result<()>;
    /// Allocation of the range (`base:allocation`).
    ///
    /// # Errors
    /// Out of range, I/O.
    fn allocation(&self, offset: u64, len: u64) -> Result<Runs>;
    /// Changed-block status of the range, if the export tracks changes.
    fn dirty(&self, offset: u64, len: u64) -> Option<Vec<(u64, bool)>>;
    /// Reads like [`Export::read`] if that is plain local file I/O (page
    /// cache; no store, no decompression, no remote), cheap enough to run
    /// on the async thread that received the request instead of hopping to
    /// the blocking pool. Otherwise reads nothing and returns `false`: the
    /// caller then uses [`Export::read`] on a blocking thread.
    ///
    /// # Errors
    /// As [`Export::read`].
    fn read_cheap(&self, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        Ok(false)
    }
    /// Writes like [`Export::write`] (without FUA) if that is cheap in the
    /// same sense; otherwise writes nothing and returns `false`.
    ///
    /// # Errors
    /// As [`Export::write`].
    fn write_cheap(&self, _offset: u64, _data: &[u8]) -> Result<bool> {
        Ok(false)
    }
}

fn read_only(name: &str) -> Error {
    Error::ReadOnly(format!("export `{name}`"))
}

enum Image {
    Qcow(Arc<Qcow2>),
    Raw(RawFile),
}

/// One image file.
pub struct ImageExport {
    name: String,
    path: String,
    image: Image,
    writable: bool,
}

impl ImageExport {
    /// Opens `path` (qcow2 with its backing chain, or raw) as export `name`.
    ///
    /// # Errors
    /// Unreadable, unsupported or corrupt images.
    pub fn open(path: &Path, name: &str, writable: bool) -> Result<ImageExport> {
        let image = if is_qcow2(path)? {
            Image::Qcow(Arc::new(Qcow2::open(path, writable, Backing::FromHeader)?))
        } else {
            Image::Raw(RawFile::open(path, writable)?)
        };
        Ok(ImageExport {
            name: name.to_owned(),
            path: path.display().to_string(),
            image,
            writable,
        })
    }

    fn raw_zero(&self, f: &RawFile, offset: u64, len: u64, punch: bool) -> Result<()> {
        let flags = if punch {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        let (o, l) = (offset as i64, len as i64);
        if fallocate(f.file(), flags, o, l).is_ok() {
            return Ok(());
        }
        // File systems without the fallocate mode: write zeros.
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            std::os::unix::fs::FileExt::write_all_at(f.file(), &zeros[..n], offset + done)
                .ctx(f.path(), "write image")?;
            done += n as u64;
        }
        Ok(())
    }

    /// Flushes and closes.
    ///
    /// # Errors
    /// I/O failures.
    pub fn close(&self) -> Result<()> {
        match &self.image {
            Image::Qcow(q) => q.close(),
            Image::Raw(r) => r.file().sync_data().ctx(r.path(), "sync image"),
        }
    }
}

impl Export for ImageExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        format!("image {}", self.path)
    }

    fn size(&self) -> u64 {
        match &self.image {
            Image::Qcow(q) => q.size(),
            Image::Raw(r) => r.size(),
        }
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.image {
            Image::Qcow(q) => q.read_at(offset, buf),
            Image::Raw(r) => r.read_at(offset, buf),
        }
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        if !self.writable {
            return Err(read_only(&self.name));
        }
        match &self.image {
            Image::Qcow(q) => q.write_at(offset, data)?,
            Image::Raw(r) => {
                check_range(offset, data.len() as u64, r.size())?;
                std::os::unix::fs::FileExt::write_all_at(r.file(), data, offset)
                    .ctx(r.path(), "write image")?;
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<()> {
        if !self.writable {
            return Err(read_only(&self.name));
        }
        match &self.image {
            Image::Qcow(q) => {
                check_range(offset, len, q.size())?;
                if fast && !q.zeroes_fast(offset, len) {
                    return Err(Error::NotFast);
                }
                q.write_zeroes(offset, len, !no_hole)?;
            }
            Image::Raw(r) => {
                check_range(offset, len, r.size())?;
                self.raw_zero(r, offset, len, !no_hole)?;
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        if !self.writable {
            return Err(read_only(&self.name));
        }
        match &self.image {
            Image::Qcow(q) => q.discard(offset, len)?,
            Image::Raw(r) => {
                check_range(offset, len, r.size())?;
                self.raw_zero(r, offset, len, true)?;
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        match &self.image {
            Image::Qcow(q) => q.flush(),
            Image::Raw(r) => r.file().sync_data().ctx(r.path(), "sync image"),
        }
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Runs> {
        match &self.image {
            Image::Qcow(q) => q.status(offset, len),
            Image::Raw(r) => r.status(offset, len),
        }
    }

    fn dirty(&self, _offset: u64, _len: u64) -> Option<Vec<(u64, bool)>> {
        None
    }

    // An image file is local: small requests are page-cache I/O (a qcow2
    // allocation writes metadata through the page cache too).
    fn read_cheap(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.read(offset, buf).map(|()| true)
    }

    fn write_cheap(&self, offset: u64, data: &[u8]) -> Result<bool> {
        self.write(offset, data, false).map(|()| true)
    }
}

/// A disk layer version, read-only.
pub struct LayerExport {
    name: String,
    image: Arc<LayerImage>,
}

impl LayerExport {
    /// Exports `image` as `name`.
    pub fn new(name: &str, image: Arc<LayerImage>) -> LayerExport {
        LayerExport {
            name: name.to_owned(),
            image,
        }
    }
}

impl Export for LayerExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        format!("layer version {} (read-only)", self.image.version())
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    fn writable(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.image.read_at(offset, buf)
    }

    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<()> {
        Err(read_only(&self.name))
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool, _: bool) -> Result<()> {
        Err(read_only(&self.name))
    }

    fn trim(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Err(read_only(&self.name))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        self.image.prefetch(offset, len)
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Runs> {
        self.image.status(offset, len)
    }

    fn dirty(&self, _: u64, _: u64) -> Option<Vec<(u64, bool)>> {
        None
    }

    fn read_cheap(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        if !self.image.is_local(offset, buf.len() as u64) {
            return Ok(false);
        }
        self.image.read_at(offset, buf).map(|()| true)
    }
}

/// A writable disk: overlay over base, with a block map.
pub struct DiskExport {
    name: String,
    overlay: Arc<Qcow2>,
    base: Option<Arc<LayerImage>>,
    /// The changes since the last commit; replaced by a fresh map when a
    /// commit takes a snapshot.
    blockmap: RwLock<Arc<BlockMap>>,
    /// Writes hold it shared; a snapshot holds it exclusive, so it sees the
    /// disk between two writes.
    writes: RwLock<()>,
    writable: bool,
}

impl DiskExport {
    /// Assembles a disk from its parts.
    pub fn new(
        name: &str,
        overlay: Arc<Qcow2>,
        base: Option<Arc<LayerImage>>,
        blockmap: BlockMap,
        writable: bool,
    ) -> DiskExport {
        DiskExport {
            name: name.to_owned(),
            overlay,
            base,
            blockmap: RwLock::new(Arc::new(blockmap)),
            writes: RwLock::new(()),
            writable,
        }
    }

    /// The block map now.
    pub fn blockmap(&self) -> Arc<BlockMap> {
        self.blockmap
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.writes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a consistent snapshot of the changes since the last commit,
    /// with writes held back meanwhile: flushes, calls `each(cluster,
    /// data)` for every changed cluster, then has `rotate` set the map
    /// aside and give a fresh one, which records the writes from then on.
    /// Returns the changed clusters.
    ///
    /// # Errors
    /// I/O failures, and errors of `each` or `rotate` (the map stays as it
    /// was if `rotate` did not run).
    pub fn snapshot(
        &self,
        each: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
        rotate: &mut dyn FnMut(&BlockMap) -> Result<BlockMap>,
    ) -> Result<Vec<u64>> {
        let _paused = self.writes.write().unwrap_or_else(|p| p.into_inner());
        self.overlay.flush()?;
        let map = self.blockmap();
        map.flush()?;
        let dirty: Vec<u64> = map.dirty().into_iter().map(|(c, _)| c).collect();
        let cs = map.cluster_size();
        let size = self.overlay.size();
        let mut buf = vec![0u8; cs as usize];
        for &c in &dirty {
            let len = (size - c * cs).min(cs) as usize;
            self.overlay.read_at(c * cs, &mut buf[..len])?;
            each(c, &buf[..len])?;
        }
        let fresh = rotate(&map)?;
        *self.blockmap.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(dirty)
    }

    /// Flushes and closes the overlay cleanly.
    ///
    /// # Errors
    /// I/O failures.
    pub fn close(&self) -> Result<()> {
        self.blockmap().flush()?;
        self.overlay.close()
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(read_only(&self.name));
        }
        check_range(offset, len, self.overlay.size())
    }
}

impl Export for DiskExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        match &self.base {
            Some(b) => format!("disk over version {}", b.version()),
            None => "disk".into(),
        }
    }

    fn size(&self) -> u64 {
        self.overlay.size()
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.overlay.read_at(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_write(offset, data.len() as u64)?;
        let _w = self.writing();
        // Mark first: the map must cover every write that may have landed.
        self.blockmap().mark(offset, data.len() as u64)?;
        self.overlay.write_at(offset, data)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<()> {
        self.check_write(offset, len)?;
        if fast && !self.overlay.zeroes_fast(offset, len) {
            return Err(Error::NotFast);
        }
        let _w = self.writing();
        self.blockmap().mark(offset, len)?;
        self.overlay.write_zeroes(offset, len, !no_hole)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_write(offset, len)?;
        let _w = self.writing();
        self.blockmap().mark(offset, len)?;
        self.overlay.discard(offset, len)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.overlay.flush()?;
        self.blockmap().flush()
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        if let Some(b) = &self.base {
            let end = (offset + len).min(b.size());
            if offset < end {
                b.prefetch(offset, end - offset)?;
            }
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Runs> {
        self.overlay.status(offset, len)
    }

    fn dirty(&self, offset: u64, len: u64) -> Option<Vec<(u64, bool)>> {
        Some(self.blockmap().extents(offset, len))
    }

    // Overlay clusters, and base clusters verified in the cache.
    fn read_cheap(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.overlay.read_local(offset, buf)
    }

    // Clusters the overlay holds already: no copy-on-write from the base.
    fn write_cheap(&self, offset: u64, data: &[u8]) -> Result<bool> {
        self.check_write(offset, data.len() as u64)?;
        // Never waits (a commit's snapshot holds writes back).
        let Ok(_w) = self.writes.try_read() else {
            return Ok(false);
        };
        // Mark first, as in `write`.
        self.overlay.write_in_place(offset, data, || {
            self.blockmap().mark(offset, data.len() as u64)
        })
    }
}
