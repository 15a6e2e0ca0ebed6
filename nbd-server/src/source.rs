//! Read-only block sources: what lies under a qcow2 image (its backing file,
//! or a disk's base layer), and raw image files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::{Error, IoContext, Result};

/// How a range of a device is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    /// Holds data (or might).
    Data,
    /// Reads as zeros, with storage allocated.
    Zero,
    /// Reads as zeros, nothing allocated.
    Hole,
}

/// Consecutive runs of allocation status: (length, status).
pub type Runs = Vec<(u64, Alloc)>;

/// A device that can be read at any offset.
pub trait ReadAt: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`. Reads past the end are an error.
    ///
    /// # Errors
    /// I/O or corruption.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Allocation of `[offset, offset + len)`, as consecutive runs that
    /// cover at least one byte (possibly less than `len`).
    ///
    /// # Errors
    /// I/O or corruption.
    fn status(&self, offset: u64, len: u64) -> Result<Runs>;

    /// Whether reading `[offset, offset + len)` is plain local file I/O
    /// (no store, no decompression, no remote): cheap enough for a server's
    /// async thread. May answer `false` when unsure.
    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

/// Checks a request against a device size.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// A raw image file.
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawFile {
    /// Opens a raw image.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path, writable: bool) -> Result<RawFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .ctx(path, "open image")?;
        let size = file.metadata().ctx(path, "stat image")?.len();
        Ok(RawFile {
            file,
            path: path.to_owned(),
            size,
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ReadAt for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .ctx(&self.path, "read image")
    }

    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        true
    }

    fn status(&self, offset: u64, len: u64) -> Result<Runs> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let at = i64::try_from(offset).unwrap_or(i64::MAX);
        let data = match lseek(&self.file, at, Whence::SeekData) {
            Ok(d) => (d as u64).min(end),
            Err(Errno::ENXIO) => return Ok(vec![(len, Alloc::Hole)]),
            Err(_) => return Ok(vec![(len, Alloc::Data)]),
        };
        if data > offset {
            return Ok(vec![(data - offset, Alloc::Hole)]);
        }
        let hole = match lseek(&self.file, at, Whence::SeekHole) {
            Ok(h) => (h as u64).min(end),
            Err(_) => end,
        };
        Ok(vec![((hole - offset).max(1).min(len), Alloc::Data)])
    }
}
