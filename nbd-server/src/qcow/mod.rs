//! qcow2 images: open and validate, read (with backing chains and
//! compressed clusters), write (copy-on-write into new clusters), zero,
//! discard, create.
//!
//! Split as the format is: [`header`] (layout and constants), `meta` (L1/L2
//! tables, refcounts, allocation; no guest data I/O), `repair` (refcount
//! recount after a crash), `create` (new images), and this module, the
//! engine, which does guest data I/O with the mappings `meta` returns.
//!
//! Locking: `meta` (a mutex) guards the tables; lookups take it briefly and
//! data I/O on mapped clusters runs without it. Writes that allocate hold it
//! through the copy-on-write so two writers never allocate the same guest
//! cluster. Host clusters are only freed under `layout` held exclusively,
//! which waits for every in-flight data I/O (they hold it shared), so no
//! read or write can land in a cluster after it was freed and reused.
//!
//! Why not the `qcow2-rs` crate: its types are not `Send`, it cannot create
//! images, has no discard or write-zeroes, ignores (and corrupts) internal
//! snapshots, panics on some inputs, and forces the `log` crate's maximum
//! level for the whole binary.

pub mod header;
mod local;
mod meta;
mod repair;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use header::{
    parse_extensions, Header, AUTOCLEAR_BITMAPS, COPIED, INCOMPAT_DIRTY, QCOW_MAGIC, V3_HEADER_LEN,
    ZERO,
};
use meta::{Mapping, Meta};

use crate::error::{Error, IoContext, Result};
use crate::source::{check_range, Alloc, RawFile, ReadAt, Runs};

pub use repair::RepairStats;

/// Deepest backing chain followed.
const MAX_CHAIN: usize = 16;
/// Cluster size of the images Lamina creates: the qcow2 default, equal to
/// the store's disk cluster, so an overlay cluster is one chunk.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// What lies under an image.
pub enum Backing {
    /// The backing file named in the header (if any).
    FromHeader,
    /// This device instead (a disk's base layer); the header names none.
    Device(Arc<dyn ReadAt>),
}

/// An open qcow2 image.
pub struct Qcow2 {
    path: PathBuf,
    file: File,
    writable: bool,
    size: u64,
    cluster_bits: u32,
    cs: u64,
    version: u32,
    header: Header,
    backing: Option<Arc<dyn ReadAt>>,
    backing_name: Option<String>,
    repaired: Option<RepairStats>,
    meta: Mutex<Meta>,
    /// Signalled when in-flight allocations are mapped.
    allocated: Condvar,
    layout: RwLock<()>,
    closed: AtomicBool,
}

/// Where one cluster of a write goes.
#[derive(Debug, Clone, Copy)]
enum Planned {
    /// Overwrite the cluster where it is.
    InPlace { host: u64 },
    /// Write a new host cluster (or a zero cluster's preallocated one,
    /// `reused`), then map it; `old` is what was mapped before.
    New {
        host: u64,
        old: Mapping,
        reused: bool,
    },
}

fn unsupported(path: &Path, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Whether `path` starts with the qcow2 magic.
///
/// # Errors
/// The file cannot be read.
pub fn is_qcow2(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).ctx(path, "open image")?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(u32::from_be_bytes(magic) == QCOW_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(path, "read image", e)),
    }
}

/// Opens any image read-only: qcow2 (with its backing chain) or raw.
///
/// # Errors
/// Unreadable, unsupported or corrupt images.
pub fn open_image(path: &Path, writable: bool) -> Result<Arc<dyn ReadAt>> {
    open_chain(path, writable, 0)
}

fn open_chain(path: &Path, writable: bool, depth: usize) -> Result<Arc<dyn ReadAt>> {
    if depth > MAX_CHAIN {
        return Err(unsupported(
            path,
            format!("backing chain deeper than {MAX_CHAIN}"),
        ));
    }
    if is_qcow2(path)? {
        Ok(Arc::new(Qcow2::open_at_depth(
            path,
            writable,
            Backing::FromHeader,
            depth,
        )?))
    } else {
        Ok(Arc::new(RawFile::open(path, writable)?))
    }
}

impl Qcow2 {
    /// Opens an image.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for features Lamina refuses (snapshots,
    /// encryption, extended L2, small clusters, zstd, external data),
    /// [`Error::Corrupt`] for malformed metadata, I/O failures.
    pub fn open(path: &Path, writable: bool, backing: Backing) -> Result<Qcow2> {
        Self::open_at_depth(path, writable, backing, 0)
    }

    fn open_at_depth(path: &Path, writable: bool, backing: Backing, depth: usize) -> Result<Qcow2> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .ctx(path, "open image")?;
        let file_len = file.metadata().ctx(path, "stat image")?.len();
        let mut first = vec![0u8; 4096.min(file_len) as usize];
        file.read_exact_at(&mut first, 0).ctx(path, "read header")?;
        let header = Header::parse(&first).map_err(|r| corrupt(path, r))?;
        header.check().map_err(|(unsup, r)| {
            if unsup {
                unsupported(path, r)
            } else {
                corrupt(path, r)
            }
        })?;
        let cs = header.cluster_size();
        let mut cluster0 = vec![0u8; cs.min(file_len) as usize];
        file.read_exact_at(&mut cluster0, 0)
            .ctx(path, "read header")?;
        let ext_end = if header.backing_file_offset != 0 && header.backing_file_offset < cs {
            header.backing_file_offset as usize
        } else {
            cluster0.len()
        };
        let ext_start = (header.header_length as usize).min(ext_end);
        let ext = parse_extensions(&cluster0[ext_start..ext_end]).map_err(|r| corrupt(path, r))?;
        let backing_name = if header.backing_file_offset != 0 {
            let start = header.backing_file_offset;
            let end = start + u64::from(header.backing_file_size);
            if end > file_len {
                return Err(corrupt(
                    path,
                    "backing file name lies past the end of the file",
                ));
            }
            let mut name = vec![0u8; header.backing_file_size as usize];
            file.read_exact_at(&mut name, start)
                .ctx(path, "read backing file name")?;
            Some(String::from_utf8_lossy(&name).into_owned())
        } else {
            None
        };
        let l1_bytes = u64::from(header.l1_size) * 8;
        if header.l1_table_offset + l1_bytes > file_len {
            return Err(corrupt(path, "L1 table lies past the end of the file"));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw, header.l1_table_offset)
            .ctx(path, "read L1 table")?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut meta = Meta::new(
            path,
            header.cluster_bits,
            header.version,
            l1,
            header.l1_table_offset,
            file_len,
        );
        let backing = match backing {
            Backing::Device(d) => Some(d),
            Backing::FromHeader => match &backing_name {
                None => None,
                Some(name) => Some(open_backing(
                    path,
                    name,
                    ext.backing_format.as_deref(),
                    depth,
                )?),
            },
        };
        let mut repaired = None;
        let mut header = header;
        if writable {
            if header.refcount_order != 4 {
                return Err(unsupported(
                    path,
                    format!(
                        "writing {}-bit refcounts (only 16-bit)",
                        1u32 << header.refcount_order
                    ),
                ));
            }
            if ext.bitmaps {
                return Err(unsupported(
                    path,
                    "writing an image with persistent bitmaps (remove them with `qemu-img bitmap --remove`, or serve read-only)",
                ));
            }
            meta.load_refcounts(
                &file,
                header.refcount_table_offset,
                header.refcount_table_clusters,
            )?;
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                let l1_clusters = l1_bytes.div_ceil(cs).max(1);
                let stats = repair::repair(
                    &mut meta,
                    &file,
                    l1_clusters,
                    u64::from(header.refcount_table_clusters),
                )?;
                tracing::warn!(image = %path.display(), fixed = stats.fixed, "repaired refcounts of an image not closed cleanly");
                repaired = Some(stats);
            }
            if header.version >= 3 {
                header.autoclear_features &= !AUTOCLEAR_BITMAPS;
                header.incompatible_features |= INCOMPAT_DIRTY;
                write_features(&file, path, &header)?;
                file.sync_data().ctx(path, "sync image")?;
            }
        }
        Ok(Qcow2 {
            path: path.to_owned(),
            file,
            writable,
            size: header.size,
            cluster_bits: header.cluster_bits,
            cs,
            version: header.version,
            header,
            backing,
            backing_name,
            repaired,
            meta: Mutex::new(meta),
            allocated: Condvar::new(),
            layout: RwLock::new(()),
            closed: AtomicBool::new(false),
        })
    }

    /// Creates an empty version 3 image of `size` bytes with 64 KiB
    /// clusters and no backing file. Written to a temporary name and
    /// renamed into place, so `path` never holds a partial image.
    ///
    /// # Errors
    /// I/O failures; an existing `path` is replaced.
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let bits = DEFAULT_CLUSTER_BITS;
        let cs = 1u64 << bits;
        let l2e = cs / 8;
        let l1_size = size.div_ceil(cs).div_ceil(l2e).max(1);
        if l1_size > header::MAX_L1_ENTRIES {
            return Err(Error::InvalidInput(format!(
                "a disk of {size} bytes is too large"
            )));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        // Cluster 0 header, 1 refcount table, 2 refcount block, 3.. L1.
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: bits,
            size,
            crypt_method: 0,
            l1_size: l1_size as u32,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression_type: 0,
        };
        let used = 3 + l1_clusters;
        let mut image = vec![0u8; ((3 + l1_clusters) * cs) as usize];
        let hb = h.encode();
        image[..hb.len()].copy_from_slice(&hb);
        // Refcount table entry 0 points at the refcount block in cluster 2.
        image[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
        for c in 0..used {
            let at = (2 * cs + 2 * c) as usize;
            image[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let written = (|| {
            let f = File::create(&tmp)?;
            f.write_all_at(&image, 0)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if written.is_err() {
            // Best effort: the error below is what matters.
            let _ = std::fs::remove_file(&tmp);
        }
        written.ctx(path, "create image")
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// The backing file name recorded in the header.
    pub fn backing_name(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// What the writable open repaired, if the image was dirty.
    pub fn repaired(&self) -> Option<RepairStats> {
        self.repaired
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        // Metadata is written through as it changes; a panic mid-update
        // leaves at worst a cluster with a refcount and no mapping.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly(self.path.display().to_string()))
        }
    }

    /// Fills `buf` (one cluster's worth or less, within cluster `c`, at
    /// `within`) from what `m` maps to.
    fn read_mapped(&self, c: u64, within: u64, m: Mapping, buf: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Data { host, .. } => self
                .file
                .read_exact_at(buf, host + within)
                .ctx(&self.path, "read image"),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_backing(c * self.cs + within, buf),
            Mapping::Compressed { offset, len } => {
                let plain = self.inflate(offset, len)?;
                let start = within as usize;
                buf.copy_from_slice(&plain[start..start + buf.len()]);
                Ok(())
            }
        }
    }

    fn read_backing(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(pos).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(pos, &mut buf[..avail])?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn inflate(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut compressed = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut compressed, offset)
            .ctx(&self.path, "read compressed cluster")?;
        let mut plain = vec![0u8; self.cs as usize];
        flate2::read::DeflateDecoder::new(&compressed[..])
            .read_exact(&mut plain)
            .map_err(|e| {
                corrupt(
                    &self.path,
                    format!("compressed cluster at {offset:#x}: {e}"),
                )
            })?;
        Ok(plain)
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// Out of range, I/O, corruption.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_with(offset, buf, false).map(|_| ())
    }

    fn read_with(&self, offset: u64, buf: &mut [u8], local_only: bool) -> Result<bool> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(true);
        }
        // The local-only read never waits for a lock (see `local`).
        let _io = if local_only {
            let Some(g) = self.try_layout() else {
                return Ok(false);
            };
            g
        } else {
            self.layout.read().unwrap_or_else(|p| p.into_inner())
        };
        let first = offset >> self.cluster_bits;
        let last = (offset + buf.len() as u64 - 1) >> self.cluster_bits;
        let maps: Vec<Mapping> = {
            let mut m = if local_only {
                let Some(m) = self.try_meta() else {
                    return Ok(false);
                };
                m
            } else {
                self.meta()
            };
            (first..=last)
                .map(|c| m.lookup(&self.file, c))
                .collect::<Result<_>>()?
        };
        if local_only && !self.maps_local(first, &maps) {
            return Ok(false);
        }
        let mut done = 0usize;
        let mut i = 0usize;
        while i < maps.len() {
            let c = first + i as u64;
            let pos = offset + done as u64;
            let within = pos & (self.cs - 1);
            // Merge a run of clusters read the same way: contiguous on the
            // host, or all zero, or all from the backing device.
            let mut run = 1usize;
            while let Some(next) = maps.get(i + run) {
                let same = match (maps[i], *next) {
                    (Mapping::Data { host, .. }, Mapping::Data { host: h, .. }) => {
                        h == host + run as u64 * self.cs
                    }
                    (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                    (Mapping::Unallocated, Mapping::Unallocated) => true,
                    _ => false,
                };
                if !same {
                    break;
                }
                run += 1;
            }
            let span_end = ((c + run as u64) * self.cs).min(offset + buf.len() as u64);
            let n = (span_end - pos) as usize;
            self.read_mapped(c, within, maps[i], &mut buf[done..done + n])?;
            done += n;
            i += run;
        }
        Ok(true)
    }

    /// Writes `data` at `offset`, allocating (copy-on-write) where needed.
    ///
    /// Three phases: under the metadata lock, plan every cluster (mapped in
    /// place, or a newly allocated host cluster, marked in flight so no
    /// other writer allocates it too); without the lock, write the data
    /// (copy-on-write fills included; newly allocated clusters are usually
    /// contiguous, so a large write is one `pwrite`); under the lock again,
    /// map the new clusters.
    ///
    /// # Errors
    /// Read-only image, out of range, I/O, corruption.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.require_writable()?;
        check_range(offset, data.len() as u64, self.size)?;
        if data.is_empty() {
            return Ok(());
        }
        let released = {
            let _io = self.layout.read().unwrap_or_else(|p| p.into_inner());
            let first = offset >> self.cluster_bits;
            let last = (offset + data.len() as u64 - 1) >> self.cluster_bits;
            let plan = self.plan_write(first, last)?;
            let written = self.write_planned(offset, data, first, &plan);
            let released = self.finish_write(first, &plan, written.is_ok())?;
            written?;
            released
        };
        self.release_later(released)
    }

    /// Phase 1 of a write: where each cluster of `first..=last` goes.
    fn plan_write(&self, first: u64, last: u64) -> Result<Vec<Planned>> {
        let mut m = self.meta();
        while (first..=last).any(|c| m.in_flight.contains(&c)) {
            m = self.allocated.wait(m).unwrap_or_else(|p| p.into_inner());
        }
        let mut plan = Vec::with_capacity((last - first + 1) as usize);
        for c in first..=last {
            let step = match m.lookup(&self.file, c) {
                Ok(Mapping::Data { host, copied: true }) => Ok(Planned::InPlace { host }),
                Ok(
                    old @ Mapping::Zero {
                        prealloc: Some(host),
                    },
                ) if m.refcount(host / self.cs) == 1 => Ok(Planned::New {
                    host,
                    old,
                    reused: true,
                }),
                Ok(old) => m.alloc(&self.file).map(|host| Planned::New {
                    host,
                    old,
                    reused: false,
                }),
                Err(e) => Err(e),
            };
            match step {
                Ok(p) => {
                    if matches!(p, Planned::New { .. }) {
                        m.in_flight.insert(c);
                    }
                    plan.push(p);
                }
                Err(e) => {
                    // Give back what this plan took so far.
                    drop(m);
                    self.finish_write(first, &plan, false)?;
                    return Err(e);
                }
            }
        }
        Ok(plan)
    }

    /// Phase 2 of a write: the data, without the metadata lock.
    fn write_planned(&self, offset: u64, data: &[u8], first: u64, plan: &[Planned]) -> Result<()> {
        let end = offset + data.len() as u64;
        let mut i = 0usize;
        while i < plan.len() {
            let c = first + i as u64;
            let cstart = c * self.cs;
            let from = offset.max(cstart);
            let to = end.min(cstart + self.cs);
            let span = &data[(from - offset) as usize..(to - offset) as usize];
            let within = from - cstart;
            match plan[i] {
                Planned::InPlace { host } => {
                    self.file
                        .write_all_at(span, host + within)
                        .ctx(&self.path, "write image")?;
                    i += 1;
                }
                Planned::New { host, old, .. } => {
                    let full = within == 0 && span.len() as u64 == self.cs;
                    if !full {
                        // Copy-on-write: the rest of the cluster keeps what
                        // was there (zeros for a zero cluster).
                        let mut cluster = vec![0u8; self.cs as usize];
                        if !matches!(old, Mapping::Zero { .. }) {
                            let len = (self.size - cstart).min(self.cs) as usize;
                            self.read_mapped(c, 0, old, &mut cluster[..len])?;
                        }
                        cluster[within as usize..within as usize + span.len()]
                            .copy_from_slice(span);
                        self.file
                            .write_all_at(&cluster, host)
                            .ctx(&self.path, "write image")?;
                        i += 1;
                        continue;
                    }
                    // A run of whole new clusters contiguous on the host: one
                    // write straight from the request's buffer.
                    let mut run = 1usize;
                    while let Some(Planned::New { host: h, .. }) = plan.get(i + run) {
                        let next_start = (c + run as u64) * self.cs;
                        if *h != host + run as u64 * self.cs || next_start + self.cs > end {
                            break;
                        }
                        run += 1;
                    }
                    let from = (cstart - offset) as usize;
                    let to = from + run * self.cs as usize;
                    self.file
                        .write_all_at(&data[from..to], host)
                        .ctx(&self.path, "write image")?;
                    i += run;
                }
            }
        }
        Ok(())
    }

    /// Phase 3 of a write: map the new clusters (or, after a failure, give
    /// them back). Returns the old mappings to release.
    fn finish_write(&self, first: u64, plan: &[Planned], ok: bool) -> Result<Vec<Mapping>> {
        let mut released = Vec::new();
        let mut m = self.meta();
        let mut result = Ok(());
        for (i, p) in plan.iter().enumerate() {
            let c = first + i as u64;
            if let Planned::New { host, old, reused } = *p {
                m.in_flight.remove(&c);
                if !ok {
                    if !reused {
                        result = result.and(m.set_refcount(&self.file, host / self.cs, 0));
                    }
                    continue;
                }
                result = result.and(m.set_l2(&self.file, c, host | COPIED));
                if !reused
                    && !matches!(old, Mapping::Unallocated | Mapping::Zero { prealloc: None })
                {
                    released.push(old);
                }
            }
        }
        drop(m);
        self.allocated.notify_all();
        result.map(|()| released)
    }

    /// Drops references of unmapped clusters once no I/O can be using them.
    fn release_later(&self, released: Vec<Mapping>) -> Result<()> {
        if released.is_empty() {
            return Ok(());
        }
        let _excl = self.layout.write().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta();
        for r in released {
            m.release_mapping(&self.file, r)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole clusters become
    /// zero clusters (metadata only): with `unmap` their storage is freed,
    /// without it (NBD `NO_HOLE`) they stay allocated. Partial clusters at
    /// the edges are written with zeros.
    ///
    /// # Errors
    /// Read-only image, out of range, I/O, corruption.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.require_writable()?;
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let first_full = offset.div_ceil(self.cs);
        // The last cluster of the image counts as full up to the image end.
        let last_full = if end == self.size {
            end.div_ceil(self.cs)
        } else {
            end / self.cs
        };
        if first_full >= last_full {
            return self.write_zero_bytes(offset, len);
        }
        self.write_zero_bytes(offset, first_full * self.cs - offset)?;
        let tail = (last_full * self.cs).min(end);
        self.write_zero_bytes(tail, end - tail)?;
        if self.version < 3 {
            if unmap && self.backing.is_none() {
                return self.unmap_clusters(first_full, last_full, 0);
            }
            return self.write_zero_bytes(first_full * self.cs, tail - first_full * self.cs);
        }
        let _excl = self.layout.write().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta();
        for c in first_full..last_full {
            let old = m.lookup(&self.file, c)?;
            let (entry, keep) = match (unmap, old) {
                (true, Mapping::Zero { prealloc: None }) => continue,
                (true, _) => (ZERO, None),
                (false, Mapping::Zero { prealloc: Some(_) }) => continue,
                (false, Mapping::Data { host, copied: true }) => (host | ZERO | COPIED, Some(host)),
                (false, _) => {
                    let host = m.alloc(&self.file)?;
                    (host | ZERO | COPIED, Some(host))
                }
            };
            m.set_l2(&self.file, c, entry)?;
            let holds = match old {
                Mapping::Data { host, .. }
                | Mapping::Zero {
                    prealloc: Some(host),
                } => Some(host),
                _ => None,
            };
            if holds.is_none() || holds != keep {
                m.release_mapping(&self.file, old)?;
            }
        }
        Ok(())
    }

    fn unmap_clusters(&self, from: u64, to: u64, entry: u64) -> Result<()> {
        let _excl = self.layout.write().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta();
        for c in from..to {
            let old = m.lookup(&self.file, c)?;
            if old == Mapping::Unallocated {
                continue;
            }
            m.set_l2(&self.file, c, entry)?;
            m.release_mapping(&self.file, old)?;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = STEP.min(len - done);
            self.write_at(offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Whether zeroing `[offset, offset + len)` is metadata-only (no data
    /// written), for NBD `FAST_ZERO`.
    pub fn zeroes_fast(&self, offset: u64, len: u64) -> bool {
        self.version >= 3
            && offset.is_multiple_of(self.cs)
            && ((offset + len).is_multiple_of(self.cs) || offset + len == self.size)
    }

    /// Discards whole clusters in `[offset, offset + len)` (they read as
    /// zeros afterwards); partial clusters are left as they are.
    ///
    /// # Errors
    /// Read-only image, out of range, I/O, corruption.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.require_writable()?;
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let from = offset.div_ceil(self.cs);
        let to = if end == self.size {
            end.div_ceil(self.cs)
        } else {
            end / self.cs
        };
        if from >= to {
            return Ok(());
        }
        if self.version >= 3 {
            return self.write_zeroes(
                from * self.cs,
                (to * self.cs).min(self.size) - from * self.cs,
                true,
            );
        }
        if self.backing.is_none() {
            return self.unmap_clusters(from, to, 0);
        }
        Ok(())
    }

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// I/O failures.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_data().ctx(&self.path, "sync image")
    }

    /// Allocation of the range, as runs (at most 1024 clusters per call).
    ///
    /// # Errors
    /// Out of range, I/O, corruption.
    pub fn status(&self, offset: u64, len: u64) -> Result<Runs> {
        check_range(offset, len, self.size)?;
        let mut runs: Runs = Vec::new();
        if len == 0 {
            return Ok(runs);
        }
        let first = offset >> self.cluster_bits;
        let last = ((offset + len - 1) >> self.cluster_bits).min(first + 1023);
        let maps: Vec<Mapping> = {
            let mut m = self.meta();
            (first..=last)
                .map(|c| m.lookup(&self.file, c))
                .collect::<Result<_>>()?
        };
        let mut pos = offset;
        let stop = ((last + 1) * self.cs).min(offset + len);
        for (i, map) in maps.into_iter().enumerate() {
            let c = first + i as u64;
            let span_end = ((c + 1) * self.cs).min(stop);
            let n = span_end - pos;
            match map {
                Mapping::Data { .. } | Mapping::Compressed { .. } => {
                    push(&mut runs, n, Alloc::Data)
                }
                Mapping::Zero { prealloc: Some(_) } => push(&mut runs, n, Alloc::Zero),
                Mapping::Zero { prealloc: None } => push(&mut runs, n, Alloc::Hole),
                Mapping::Unallocated => match &self.backing {
                    None => push(&mut runs, n, Alloc::Hole),
                    Some(b) => {
                        let mut at = pos;
                        while at < span_end {
                            if at >= b.size() {
                                push(&mut runs, span_end - at, Alloc::Hole);
                                break;
                            }
                            let want = span_end.min(b.size()) - at;
                            let sub = b.status(at, want)?;
                            let covered: u64 = sub.iter().map(|r| r.0).sum();
                            for (l, a) in sub {
                                push(&mut runs, l, a);
                            }
                            at += covered.max(1).min(want);
                        }
                    }
                },
            }
            pos = span_end;
        }
        Ok(runs)
    }

    /// Flushes and clears the dirty bit. Also done on drop; call it to see
    /// errors.
    ///
    /// # Errors
    /// I/O failures.
    pub fn close(&self) -> Result<()> {
        if !self.writable || self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.flush()?;
        if self.version >= 3 {
            let mut h = self.header.clone();
            h.incompatible_features &= !INCOMPAT_DIRTY;
            h.autoclear_features &= !AUTOCLEAR_BITMAPS;
            write_features(&self.file, &self.path, &h)?;
            self.flush()?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(image = %self.path.display(), %e, "closing image");
        }
    }
}

fn push(runs: &mut Runs, len: u64, a: Alloc) {
    if len == 0 {
        return;
    }
    if let Some(last) = runs.last_mut() {
        if last.1 == a {
            last.0 += len;
            return;
        }
    }
    runs.push((len, a));
}

/// Rewrites the feature fields (bytes 72–95) of a version 3 header.
fn write_features(f: &File, path: &Path, h: &Header) -> Result<()> {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&h.incompatible_features.to_be_bytes());
    b[8..16].copy_from_slice(&h.compatible_features.to_be_bytes());
    b[16..].copy_from_slice(&h.autoclear_features.to_be_bytes());
    f.write_all_at(&b, 72).ctx(path, "write header")
}

fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    depth: usize,
) -> Result<Arc<dyn ReadAt>> {
    if name.contains("://") || name.starts_with("json:") || name.starts_with("nbd:") {
        return Err(unsupported(
            image,
            format!("backing file `{name}` is not a local file"),
        ));
    }
    let path = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        image.parent().unwrap_or(Path::new(".")).join(name)
    };
    match format {
        Some("raw") => Ok(Arc::new(RawFile::open(&path, false)?)),
        Some("qcow2") | None => open_chain(&path, false, depth + 1),
        Some(other) => Err(unsupported(image, format!("backing file format `{other}`"))),
    }
}

impl ReadAt for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Qcow2::read_at(self, offset, buf)
    }

    fn is_local(&self, offset: u64, len: u64) -> bool {
        Qcow2::is_local(self, offset, len)
    }

    fn status(&self, offset: u64, len: u64) -> Result<Runs> {
        Qcow2::status(self, offset, len)
    }
}

#[cfg(test)]
mod tests;
