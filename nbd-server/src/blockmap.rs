//! The block map: which parts of a writable disk changed since its last
//! commit. Two levels, as DESIGN §3 describes: a bitset of touched clusters,
//! and per touched cluster a 128-bit map of the 512-byte sectors written.
//!
//! File layout (little-endian):
//!
//! ```text
//! 0     header (4 KiB): "LMBMAP01" | cluster size u32 | reserved u32 | clusters u64
//! 4096  level 1: one bit per cluster, in u64 words, padded to 4 KiB
//! ...   level 2: 16 bytes per cluster (sector bits), sparse until written
//! ```
//!
//! Durability: a write's sectors are marked (both levels written to the
//! file, level 1 first) *before* the write itself, so after a crash the map
//! covers every write that may have reached the disk; a cluster may appear
//! dirty that was never written, never the reverse. A level-1 bit whose
//! level-2 word is still zero (a crash between the two writes) reads as the
//! whole cluster dirty. Bits already set are not written again, so only the
//! first write to a sector costs anything. `flush` syncs the file with the
//! data.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::error::{Error, IoContext, Result};

const MAGIC: &[u8; 8] = b"LMBMAP01";
const HEADER_BYTES: u64 = 4096;
/// Sector size tracked.
pub const SECTOR: u64 = 512;
/// All sectors of a 64 KiB cluster.
const ALL: u128 = u128::MAX;

/// A disk's changed-block map.
pub struct BlockMap {
    file: File,
    path: PathBuf,
    cs: u64,
    clusters: u64,
    l2_start: u64,
    state: Mutex<State>,
}

struct State {
    l1: Vec<u64>,
    l2: BTreeMap<u64, u128>,
}

/// A run of changed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClusterRun {
    /// First cluster.
    pub start: u64,
    /// One past the last.
    pub end: u64,
}

/// What changed, in summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Changed clusters.
    pub clusters: u64,
    /// Bytes of the changed clusters.
    pub cluster_bytes: u64,
    /// Bytes of the changed sectors.
    pub sector_bytes: u64,
    /// Runs of changed clusters.
    pub ranges: Vec<ClusterRun>,
}

fn l1_bytes(clusters: u64) -> u64 {
    (clusters.div_ceil(64) * 8).div_ceil(4096) * 4096
}

impl BlockMap {
    /// Creates an empty map for a disk of `size` bytes (replacing any file at
    /// `path`, atomically).
    ///
    /// # Errors
    /// I/O failures.
    pub fn create(path: &Path, size: u64, cluster_size: u64) -> Result<()> {
        let clusters = size.div_ceil(cluster_size);
        let mut header = vec![0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&(cluster_size as u32).to_le_bytes());
        header[16..24].copy_from_slice(&clusters.to_le_bytes());
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let r = (|| {
            let f = File::create(&tmp)?;
            f.write_all_at(&header, 0)?;
            f.set_len(HEADER_BYTES + l1_bytes(clusters) + clusters * 16)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if r.is_err() {
            // The rename did not happen; the error below matters.
            let _ = std::fs::remove_file(&tmp);
        }
        r.ctx(path, "create block map")
    }

    /// Opens a map.
    ///
    /// # Errors
    /// I/O failures, a file that is not a block map.
    pub fn open(path: &Path) -> Result<BlockMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(path, "open block map")?;
        let bad = |reason: &str| Error::Corrupt {
            path: path.to_owned(),
            reason: format!("block map: {reason}"),
        };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| bad("header cut short"))?;
        if &header[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let cs = u64::from(u32::from_le_bytes([
            header[8], header[9], header[10], header[11],
        ]));
        let mut c = [0u8; 8];
        c.copy_from_slice(&header[16..24]);
        let clusters = u64::from_le_bytes(c);
        if cs == 0 || cs / SECTOR > 128 || clusters > 1 << 40 {
            return Err(bad("implausible geometry"));
        }
        let l2_start = HEADER_BYTES + l1_bytes(clusters);
        let words = clusters.div_ceil(64) as usize;
        let mut raw = vec![0u8; words * 8];
        file.read_exact_at(&mut raw, HEADER_BYTES)
            .map_err(|_| bad("level 1 cut short"))?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        let mut l2 = BTreeMap::new();
        for (wi, &word) in l1.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let cluster = wi as u64 * 64 + b;
                let mut v = [0u8; 16];
                file.read_exact_at(&mut v, l2_start + cluster * 16)
                    .ctx(path, "read block map")?;
                let sectors = u128::from_le_bytes(v);
                // Level 1 written, level 2 not yet: assume all of it.
                l2.insert(cluster, if sectors == 0 { ALL } else { sectors });
            }
        }
        Ok(BlockMap {
            file,
            path: path.to_owned(),
            cs,
            clusters,
            l2_start,
            state: Mutex::new(State { l1, l2 }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // State changes are written through; the in-memory copy is rebuilt
        // from the file on open.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sector_mask(&self, from: u64, to: u64) -> u128 {
        // Sectors [from, to) within a cluster, in sector units.
        let n = to - from;
        let per = (self.cs / SECTOR) as u32;
        let bits = if n >= u64::from(per) {
            ALL >> (128 - per)
        } else {
            (1u128 << n) - 1
        };
        bits << from
    }

    /// Marks `[offset, offset + len)` changed, durably against a crash of
    /// this process (flushed with [`BlockMap::flush`]).
    ///
    /// # Errors
    /// I/O failures.
    pub fn mark(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let mut st = self.state();
        let mut c = offset / self.cs;
        while c * self.cs < end && c < self.clusters {
            let base = c * self.cs;
            let from = offset.max(base) - base;
            let to = end.min(base + self.cs) - base;
            let mask = self.sector_mask(from / SECTOR, to.div_ceil(SECTOR));
            self.set(&mut st, c, mask)?;
            c += 1;
        }
        Ok(())
    }

    /// Sets sector bits `mask` of cluster `c`, level 1 first.
    fn set(&self, st: &mut State, c: u64, mask: u128) -> Result<()> {
        let old = st.l2.get(&c).copied().unwrap_or(0);
        if old | mask != old {
            let wi = (c / 64) as usize;
            let bit = 1u64 << (c % 64);
            if st.l1[wi] & bit == 0 {
                st.l1[wi] |= bit;
                self.file
                    .write_all_at(&st.l1[wi].to_le_bytes(), HEADER_BYTES + wi as u64 * 8)
                    .ctx(&self.path, "write block map")?;
            }
            self.file
                .write_all_at(&(old | mask).to_le_bytes(), self.l2_start + c * 16)
                .ctx(&self.path, "write block map")?;
            st.l2.insert(c, old | mask);
        }
        Ok(())
    }

    /// Adds every change the map at `other` records to this one, durably
    /// (a commit that did not finish gives its changes back).
    ///
    /// # Errors
    /// I/O failures, maps of different geometry.
    pub fn absorb(&self, other: &Path) -> Result<()> {
        let o = BlockMap::open(other)?;
        if o.cs != self.cs || o.clusters != self.clusters {
            return Err(Error::Corrupt {
                path: other.to_owned(),
                reason: "block map of another geometry".into(),
            });
        }
        {
            let mut st = self.state();
            for (c, bits) in o.dirty() {
                self.set(&mut st, c, bits)?;
            }
        }
        self.flush()
    }

    /// Makes the map durable.
    ///
    /// # Errors
    /// I/O failures.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_data().ctx(&self.path, "sync block map")
    }

    /// Changed clusters and their sector bits, in order.
    pub fn dirty(&self) -> Vec<(u64, u128)> {
        self.state().l2.iter().map(|(&c, &s)| (c, s)).collect()
    }

    /// Whether cluster `c` changed.
    pub fn is_dirty(&self, c: u64) -> bool {
        self.state().l2.contains_key(&c)
    }

    /// Dirty status of `[offset, offset + len)` at sector granularity, as
    /// runs of (length, dirty), covering the whole range.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let st = self.state();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        let mut push = |n: u64, d: bool| match out.last_mut() {
            Some(last) if last.1 == d => last.0 += n,
            _ => out.push((n, d)),
        };
        while pos < end {
            let c = pos / self.cs;
            let base = c * self.cs;
            let cluster_end = (base + self.cs).min(end);
            match st.l2.get(&c) {
                None => {
                    // Skip to the next dirty cluster in one step.
                    let next = st
                        .l2
                        .range(c + 1..)
                        .next()
                        .map_or(end, |(&n, _)| (n * self.cs).min(end));
                    push(next - pos, false);
                    pos = next;
                }
                Some(&bits) => {
                    while pos < cluster_end {
                        let s = (pos - base) / SECTOR;
                        let dirty = bits & (1u128 << s) != 0;
                        let n = (base + (s + 1) * SECTOR).min(cluster_end) - pos;
                        push(n, dirty);
                        pos += n;
                    }
                }
            }
        }
        out
    }

    /// Counts and runs of changed clusters.
    pub fn summary(&self) -> Summary {
        Summary::of(&self.state().l2, self.cs)
    }

    /// Cluster size the map tracks.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }
}

impl Summary {
    /// The summary of changed clusters `l2` (cluster → sector bits).
    pub fn of(l2: &BTreeMap<u64, u128>, cluster_size: u64) -> Summary {
        let mut s = Summary::default();
        for (&c, &bits) in l2 {
            s.clusters += 1;
            s.sector_bytes += u64::from(bits.count_ones()) * SECTOR;
            match s.ranges.last_mut() {
                Some(r) if r.end == c => r.end += 1,
                _ => s.ranges.push(ClusterRun {
                    start: c,
                    end: c + 1,
                }),
            }
        }
        s.cluster_bytes = s.clusters * cluster_size;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marks_survive_reopen_and_report_sectors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bm");
        BlockMap::create(&p, 10 << 20, 65536).unwrap();
        {
            let m = BlockMap::open(&p).unwrap();
            m.mark(512, 1024).unwrap();
            m.mark(65536 * 5, 65536 * 2).unwrap();
            m.mark(65536 * 159 + 65000, 536).unwrap();
        }
        let m = BlockMap::open(&p).unwrap();
        let s = m.summary();
        assert_eq!(s.clusters, 4);
        assert_eq!(
            s.ranges,
            vec![
                ClusterRun { start: 0, end: 1 },
                ClusterRun { start: 5, end: 7 },
                ClusterRun {
                    start: 159,
                    end: 160
                }
            ]
        );
        assert_eq!(s.sector_bytes, 1024 + 2 * 65536 + 1024);
        assert_eq!(
            m.extents(0, 4096),
            vec![(512, false), (1024, true), (2560, false)]
        );
        let e = m.extents(0, 10 << 20);
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), 10 << 20);
    }

    #[test]
    fn a_level_one_bit_alone_means_the_whole_cluster() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bm");
        BlockMap::create(&p, 1 << 20, 65536).unwrap();
        // As if a crash hit between the two writes of a mark.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&(1u64 << 3).to_le_bytes(), HEADER_BYTES)
            .unwrap();
        let m = BlockMap::open(&p).unwrap();
        assert_eq!(m.dirty(), vec![(3, ALL)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn marks_match_a_model(writes in proptest::collection::vec((0u64..(4 << 20), 1u64..200_000), 1..30)) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("bm");
            let size = 4u64 << 20;
            BlockMap::create(&p, size, 65536).unwrap();
            let m = BlockMap::open(&p).unwrap();
            let mut model = vec![false; (size / SECTOR) as usize];
            for (off, len) in writes {
                let len = len.min(size - off);
                m.mark(off, len).unwrap();
                for s in off / SECTOR..(off + len).div_ceil(SECTOR) {
                    model[s as usize] = true;
                }
            }
            let m = BlockMap::open(&p).unwrap();
            let mut pos = 0u64;
            for (n, dirty) in m.extents(0, size) {
                for s in pos / SECTOR..(pos + n) / SECTOR {
                    prop_assert_eq!(model[s as usize], dirty, "sector {}", s);
                }
                pos += n;
            }
        }
    }
}
