//! The local-only paths of the qcow2 engine: reads and writes that are
//! plain `pread`/`pwrite` on local files, done only when nothing slower
//! (the store, decompression, allocation) is needed, so a server can run
//! them on its async threads instead of a blocking pool. They never wait
//! for a lock either: when another thread holds the metadata (allocating,
//! say), they give up and the caller takes the slow path.

use std::sync::{MutexGuard, RwLockReadGuard, TryLockError};

use super::meta::{Mapping, Meta};
use super::{Planned, Qcow2};
use crate::error::Result;
use crate::source::check_range;

impl Qcow2 {
    /// The metadata, unless another thread holds it.
    pub(super) fn try_meta(&self) -> Option<MutexGuard<'_, Meta>> {
        match self.meta.try_lock() {
            Ok(m) => Some(m),
            // As `meta`: nothing is half-done under a poisoned lock.
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The layout, shared, unless clusters are being released.
    pub(super) fn try_layout(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.layout.try_read() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Reads like [`Qcow2::read_at`] if every byte of the range is local
    /// file I/O: this image's data and zero clusters, and a backing device
    /// whose range [`ReadAt::is_local`]. Otherwise (compressed clusters, a
    /// base cluster not cached yet) reads nothing and returns `false`.
    ///
    /// # Errors
    /// As [`Qcow2::read_at`].
    pub fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.read_with(offset, buf, true)
    }

    /// Whether clusters `first..` mapped as `maps` read from local files.
    pub(super) fn maps_local(&self, first: u64, maps: &[Mapping]) -> bool {
        maps.iter().zip(first..).all(|(m, c)| match m {
            Mapping::Data { .. } | Mapping::Zero { .. } => true,
            Mapping::Compressed { .. } => false,
            Mapping::Unallocated => self.backing.as_ref().is_none_or(|b| {
                let pos = c * self.cs;
                let len = b.size().saturating_sub(pos).min(self.cs);
                len == 0 || b.is_local(pos, len)
            }),
        })
    }

    /// Writes `data` at `offset` if every cluster it touches is allocated
    /// in this image already (so the write is a plain `pwrite`: no
    /// allocation, no copy-on-write, no metadata update), calling `before`
    /// first, once that is known. Otherwise writes nothing, does not call
    /// `before`, and returns `false`.
    ///
    /// # Errors
    /// Read-only image, out of range, I/O, corruption, `before`'s errors.
    pub fn write_in_place(
        &self,
        offset: u64,
        data: &[u8],
        before: impl FnOnce() -> Result<()>,
    ) -> Result<bool> {
        self.require_writable()?;
        check_range(offset, data.len() as u64, self.size)?;
        let Some(_io) = self.try_layout() else {
            return Ok(false);
        };
        if data.is_empty() {
            return Ok(false);
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + data.len() as u64 - 1) >> self.cluster_bits;
        let plan = {
            let Some(mut m) = self.try_meta() else {
                return Ok(false);
            };
            let mut plan = Vec::with_capacity((last - first + 1) as usize);
            for c in first..=last {
                if m.in_flight.contains(&c) {
                    return Ok(false);
                }
                match m.lookup(&self.file, c)? {
                    Mapping::Data { host, copied: true } => plan.push(Planned::InPlace { host }),
                    _ => return Ok(false),
                }
            }
            plan
        };
        before()?;
        self.write_planned(offset, data, first, &plan)?;
        Ok(true)
    }

    /// Whether reading `[offset, offset + len)` is local file I/O (see
    /// [`Qcow2::read_local`]).
    pub(super) fn is_local(&self, offset: u64, len: u64) -> bool {
        if len == 0 || check_range(offset, len, self.size).is_err() {
            return false;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        let Some(mut m) = self.try_meta() else {
            return false;
        };
        let maps: Result<Vec<Mapping>> = (first..=last).map(|c| m.lookup(&self.file, c)).collect();
        drop(m);
        maps.is_ok_and(|maps| self.maps_local(first, &maps))
    }
}
