//! The local copy of a base version's clusters: `STORE/cache/<version>.raw`
//! (sparse, the disk's size) and a presence bitmap beside it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use lamina_sync::VersionId;

use crate::error::{IoContext, Result};

pub(super) struct ClusterCache {
    pub(super) data: File,
    pub(super) data_path: PathBuf,
    pub(super) present_file: File,
    pub(super) bits: Mutex<CacheBits>,
}

pub(super) struct CacheBits {
    pub(super) present: Vec<u64>,
    pub(super) verified: Vec<u64>,
}

pub(super) fn bit(v: &[u64], c: u64) -> bool {
    v.get((c / 64) as usize)
        .is_some_and(|w| w & (1 << (c % 64)) != 0)
}

pub(super) fn set_bit(v: &mut [u64], c: u64) {
    if let Some(w) = v.get_mut((c / 64) as usize) {
        *w |= 1 << (c % 64);
    }
}

impl ClusterCache {
    pub(super) fn open(
        dir: &Path,
        version: VersionId,
        size: u64,
        clusters: u64,
    ) -> Result<ClusterCache> {
        std::fs::create_dir_all(dir).ctx(dir, "create cache directory")?;
        let data_path = dir.join(format!("{version}.raw"));
        let present_path = dir.join(format!("{version}.present"));
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .ctx(&data_path, "open cluster cache")?;
        if data.metadata().ctx(&data_path, "stat cluster cache")?.len() != size {
            data.set_len(size).ctx(&data_path, "size cluster cache")?;
        }
        let present_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&present_path)
            .ctx(&present_path, "open cluster cache")?;
        let words = clusters.div_ceil(64) as usize;
        let mut raw = vec![0u8; words * 8];
        let have = present_file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        if have > 0 {
            let n = have.min(raw.len());
            present_file
                .read_exact_at(&mut raw[..n], 0)
                .ctx(&present_path, "read cluster cache")?;
        }
        let present = raw
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        Ok(ClusterCache {
            data,
            data_path,
            present_file,
            bits: Mutex::new(CacheBits {
                present,
                verified: vec![0; words],
            }),
        })
    }

    pub(super) fn bits(&self) -> MutexGuard<'_, CacheBits> {
        // Bits only ever get set; a poisoned lock holds nothing half-done.
        self.bits.lock().unwrap_or_else(|p| p.into_inner())
    }
}
