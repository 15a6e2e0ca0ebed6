//! qcow2 metadata in memory: the L1 table, a cache of L2 tables, refcounts
//! and the free-cluster set. Lookups and allocation only; no guest data I/O.
//!
//! Every change is written through to the file at once (no fsync), in an
//! order that keeps the image consistent for a reader at any moment: a new
//! cluster's refcount is set before anything points at it, its contents are
//! written before the L2 entry that maps it, and a cluster is unmapped
//! before its refcount drops. A `kill -9` therefore loses nothing that was
//! written; power loss before a flush may leave refcounts inconsistent,
//! which the dirty bit (set while open for writing) makes the next writable
//! open repair.
//!
//! All of this runs under the image's metadata mutex.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::error::{Error, IoContext, Result};

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not in this image: read the backing device (or zeros).
    Unallocated,
    /// Reads as zeros; `prealloc` is a host cluster kept for it.
    Zero { prealloc: Option<u64> },
    /// At this host offset; `copied` when its refcount is exactly one.
    Data { host: u64, copied: bool },
    /// Compressed: `len` bytes from host `offset` inflate to the cluster.
    Compressed { offset: u64, len: u64 },
}

/// Bytes of L2 tables cached: 16 MiB maps 128 GiB of a 64 KiB-cluster
/// image, and keeps a server's memory small for the usual disk sizes.
const L2_CACHE_BYTES: u64 = 16 * 1024 * 1024;

pub(crate) struct Meta {
    pub path: std::path::PathBuf,
    pub cluster_bits: u32,
    pub cs: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    pub version: u32,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    l2: HashMap<u64, Vec<u64>>,
    l2_order: VecDeque<u64>,
    l2_capacity: usize,
    /// Refcount table (loaded when writable).
    pub rt: Vec<u64>,
    pub rt_offset: u64,
    /// Refcount blocks by table index (all loaded when writable).
    pub rb: HashMap<usize, Vec<u16>>,
    /// Free host clusters below `end`.
    pub free: BTreeSet<u64>,
    /// One past the highest host cluster in use.
    pub end: u64,
    /// Length of the file, for bounds checks on offsets read from it.
    pub file_len: u64,
    /// Guest clusters whose new host cluster is being written (not yet
    /// mapped); other writers of these clusters wait.
    pub in_flight: std::collections::HashSet<u64>,
}

impl Meta {
    pub fn new(
        path: &Path,
        cluster_bits: u32,
        version: u32,
        l1: Vec<u64>,
        l1_offset: u64,
        file_len: u64,
    ) -> Meta {
        let cs = 1u64 << cluster_bits;
        Meta {
            path: path.to_owned(),
            cluster_bits,
            cs,
            l2_entries: cs / 8,
            version,
            l1,
            l1_offset,
            l2: HashMap::new(),
            l2_order: VecDeque::new(),
            l2_capacity: (L2_CACHE_BYTES / cs).max(4) as usize,
            rt: Vec::new(),
            rt_offset: 0,
            rb: HashMap::new(),
            free: BTreeSet::new(),
            end: file_len.div_ceil(cs),
            file_len,
            in_flight: std::collections::HashSet::new(),
        }
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    /// Entries per refcount block (16-bit refcounts).
    pub fn rb_entries(&self) -> u64 {
        self.cs / 2
    }

    fn check_host(&self, offset: u64, what: &str) -> Result<()> {
        if !offset.is_multiple_of(self.cs) {
            return Err(self.corrupt(format!("{what} offset {offset:#x} is not cluster aligned")));
        }
        if offset + self.cs > self.file_len {
            return Err(self.corrupt(format!(
                "{what} at {offset:#x} lies past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        Ok(())
    }

    /// The L2 table `l1_index` points at, loaded if needed; `None` if the L1
    /// entry is empty.
    fn l2_table(&mut self, f: &File, l1_index: usize) -> Result<Option<u64>> {
        let entry = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| self.corrupt(format!("L1 index {l1_index} out of range")))?;
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if !self.l2.contains_key(&offset) {
            self.check_host(offset, "L2 table")?;
            let mut raw = vec![0u8; self.cs as usize];
            f.read_exact_at(&mut raw, offset)
                .ctx(&self.path, "read L2 table")?;
            let table: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            if self.l2.len() >= self.l2_capacity {
                if let Some(old) = self.l2_order.pop_front() {
                    self.l2.remove(&old);
                }
            }
            self.l2.insert(offset, table);
            self.l2_order.push_back(offset);
        }
        Ok(Some(offset))
    }

    fn split(&self, guest_cluster: u64) -> (usize, usize) {
        (
            (guest_cluster / self.l2_entries) as usize,
            (guest_cluster % self.l2_entries) as usize,
        )
    }

    /// Where guest cluster `c` is.
    pub fn lookup(&mut self, f: &File, c: u64) -> Result<Mapping> {
        let (l1i, l2i) = self.split(c);
        let Some(table) = self.l2_table(f, l1i)? else {
            return Ok(Mapping::Unallocated);
        };
        let entry = self
            .l2
            .get(&table)
            .and_then(|t| t.get(l2i))
            .copied()
            .unwrap_or(0);
        self.decode(entry)
    }

    fn decode(&self, entry: u64) -> Result<Mapping> {
        if entry & COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let offset = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (offset & 511);
            if offset >= self.file_len {
                return Err(self.corrupt(format!("compressed cluster at {offset:#x} past the end")));
            }
            return Ok(Mapping::Compressed {
                offset,
                len: len.min(self.file_len - offset),
            });
        }
        let host = entry & OFFSET_MASK;
        if self.version >= 3 && entry & ZERO != 0 {
            return Ok(Mapping::Zero {
                prealloc: (host != 0).then_some(host),
            });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        self.check_host(host, "data cluster")?;
        Ok(Mapping::Data {
            host,
            copied: entry & COPIED != 0,
        })
    }

    /// Sets the L2 entry of guest cluster `c`, allocating its L2 table if
    /// needed. Written through.
    pub fn set_l2(&mut self, f: &File, c: u64, entry: u64) -> Result<()> {
        let (l1i, l2i) = self.split(c);
        let table = match self.l2_table(f, l1i)? {
            Some(t) => t,
            None => {
                // A new, zeroed L2 table: refcount, contents, then the L1
                // entry that makes it reachable.
                let t = self.alloc(f)?;
                f.write_all_at(&vec![0u8; self.cs as usize], t)
                    .ctx(&self.path, "write L2 table")?;
                let l1e = t | COPIED;
                f.write_all_at(&l1e.to_be_bytes(), self.l1_offset + 8 * l1i as u64)
                    .ctx(&self.path, "write L1 entry")?;
                self.l1[l1i] = l1e;
                self.l2.insert(t, vec![0; self.l2_entries as usize]);
                self.l2_order.push_back(t);
                t
            }
        };
        f.write_all_at(&entry.to_be_bytes(), table + 8 * l2i as u64)
            .ctx(&self.path, "write L2 entry")?;
        if let Some(slot) = self.l2.get_mut(&table).and_then(|t| t.get_mut(l2i)) {
            *slot = entry;
        }
        Ok(())
    }

    /// Refcount of host cluster `c`.
    pub fn refcount(&self, c: u64) -> u16 {
        let rbe = self.rb_entries();
        self.rb
            .get(&((c / rbe) as usize))
            .and_then(|b| b.get((c % rbe) as usize))
            .copied()
            .unwrap_or(0)
    }

    /// Sets the refcount of host cluster `c`, creating its refcount block
    /// if needed. Written through; keeps the free set in step.
    pub fn set_refcount(&mut self, f: &File, c: u64, value: u16) -> Result<()> {
        let rbe = self.rb_entries();
        let ti = (c / rbe) as usize;
        self.ensure_block(f, ti)?;
        let block_offset = self.rt[ti] & OFFSET_MASK;
        let bi = (c % rbe) as usize;
        f.write_all_at(&value.to_be_bytes(), block_offset + 2 * bi as u64)
            .ctx(&self.path, "write refcount")?;
        if let Some(slot) = self.rb.get_mut(&ti).and_then(|b| b.get_mut(bi)) {
            *slot = value;
        }
        if value == 0 && c < self.end {
            self.free.insert(c);
        } else {
            self.free.remove(&c);
            if c >= self.end {
                self.end = c + 1;
            }
        }
        Ok(())
    }

    /// Makes sure refcount block `ti` exists (growing the refcount table if
    /// it is too short).
    fn ensure_block(&mut self, f: &File, ti: usize) -> Result<()> {
        if ti >= self.rt.len() {
            self.grow_table(f, ti + 1)?;
        }
        if self.rt[ti] & OFFSET_MASK != 0 {
            return Ok(());
        }
        // The new block goes at the end of the file. If it falls inside the
        // range it covers, it counts itself; otherwise its own block is
        // ensured (and counts it) afterwards.
        let at = self.end;
        self.end += 1;
        self.grow_file(f, at)?;
        let mut block = vec![0u16; self.rb_entries() as usize];
        let self_covering = (at / self.rb_entries()) as usize == ti;
        if self_covering {
            block[(at % self.rb_entries()) as usize] = 1;
        }
        let raw: Vec<u8> = block.iter().flat_map(|v| v.to_be_bytes()).collect();
        f.write_all_at(&raw, at * self.cs)
            .ctx(&self.path, "write refcount block")?;
        let entry = at * self.cs;
        f.write_all_at(&entry.to_be_bytes(), self.rt_offset + 8 * ti as u64)
            .ctx(&self.path, "write refcount table entry")?;
        self.rt[ti] = entry;
        self.rb.insert(ti, block);
        if !self_covering {
            self.set_refcount(f, at, 1)?;
        }
        Ok(())
    }

    /// Moves the refcount table to a larger copy at the end of the file.
    fn grow_table(&mut self, f: &File, min_entries: usize) -> Result<()> {
        let per_cluster = (self.cs / 8) as usize;
        let entries = min_entries.max(self.rt.len() * 2).div_ceil(per_cluster) * per_cluster;
        let clusters = (entries / per_cluster) as u64;
        let start = self.end;
        self.end += clusters;
        self.grow_file(f, self.end - 1)?;
        let old_offset = self.rt_offset;
        let old_clusters = (self.rt.len() / per_cluster) as u64;
        self.rt.resize(entries, 0);
        let raw: Vec<u8> = self.rt.iter().flat_map(|v| v.to_be_bytes()).collect();
        f.write_all_at(&raw, start * self.cs)
            .ctx(&self.path, "write refcount table")?;
        // Switch the header to the new table (offset at byte 48, clusters
        // at 56), then account for its clusters and free the old ones.
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&(start * self.cs).to_be_bytes());
        h[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        f.write_all_at(&h, 48).ctx(&self.path, "write header")?;
        self.rt_offset = start * self.cs;
        for c in start..start + clusters {
            self.set_refcount(f, c, 1)?;
        }
        let old_start = old_offset / self.cs;
        for c in old_start..old_start + old_clusters {
            self.set_refcount(f, c, 0)?;
        }
        Ok(())
    }

    /// Extends the file so that host cluster `c` exists.
    fn grow_file(&mut self, f: &File, c: u64) -> Result<()> {
        let need = (c + 1) * self.cs;
        if need > self.file_len {
            f.set_len(need).ctx(&self.path, "extend image")?;
            self.file_len = need;
        }
        Ok(())
    }

    /// A free host cluster with refcount 1 (contents undefined).
    pub fn alloc(&mut self, f: &File) -> Result<u64> {
        let c = match self.free.pop_first() {
            Some(c) => c,
            None => {
                let c = self.end;
                self.end += 1;
                c
            }
        };
        self.grow_file(f, c)?;
        self.set_refcount(f, c, 1)?;
        Ok(c * self.cs)
    }

    /// Drops one reference to host cluster `c`.
    pub fn release(&mut self, f: &File, c: u64) -> Result<()> {
        let rc = self.refcount(c);
        if rc == 0 {
            return Err(self.corrupt(format!(
                "cluster {:#x} released with refcount 0",
                c * self.cs
            )));
        }
        self.set_refcount(f, c, rc - 1)
    }

    /// Drops the references a mapping holds (after it was unmapped).
    pub fn release_mapping(&mut self, f: &File, m: Mapping) -> Result<()> {
        match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                prealloc: Some(host),
            } => self.release(f, host / self.cs),
            Mapping::Compressed { offset, len } => {
                let first = offset / self.cs;
                let last = (offset + len.max(1) - 1) / self.cs;
                for c in first..=last {
                    self.release(f, c)?;
                }
                Ok(())
            }
            Mapping::Unallocated | Mapping::Zero { prealloc: None } => Ok(()),
        }
    }

    /// Loads the refcount table and blocks and derives the free set.
    pub fn load_refcounts(&mut self, f: &File, rt_offset: u64, rt_clusters: u32) -> Result<()> {
        let bytes = u64::from(rt_clusters) * self.cs;
        if rt_offset + bytes > self.file_len {
            return Err(self.corrupt("refcount table lies past the end of the file".into()));
        }
        let mut raw = vec![0u8; bytes as usize];
        f.read_exact_at(&mut raw, rt_offset)
            .ctx(&self.path, "read refcount table")?;
        self.rt_offset = rt_offset;
        self.rt = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut last_used = 0u64;
        for ti in 0..self.rt.len() {
            let offset = self.rt[ti] & OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            self.check_host(offset, "refcount block")?;
            let mut raw = vec![0u8; self.cs as usize];
            f.read_exact_at(&mut raw, offset)
                .ctx(&self.path, "read refcount block")?;
            let block: Vec<u16> = raw
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            for (i, &rc) in block.iter().enumerate() {
                if rc != 0 {
                    last_used = last_used.max(ti as u64 * self.rb_entries() + i as u64 + 1);
                }
            }
            self.rb.insert(ti, block);
        }
        self.end = last_used.max(self.file_len.div_ceil(self.cs));
        self.free = (0..self.end).filter(|&c| self.refcount(c) == 0).collect();
        Ok(())
    }

    /// Every L2 table offset referenced by L1.
    pub fn l2_tables(&self) -> Vec<(usize, u64)> {
        self.l1
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let o = e & OFFSET_MASK;
                (o != 0).then_some((i, o))
            })
            .collect()
    }

    /// Reads one L2 table without caching it (for full scans).
    pub fn read_l2(&self, f: &File, offset: u64) -> Result<Vec<u64>> {
        self.check_host(offset, "L2 table")?;
        let mut raw = vec![0u8; self.cs as usize];
        f.read_exact_at(&mut raw, offset)
            .ctx(&self.path, "read L2 table")?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    /// Decodes an L2 entry (for scans).
    pub fn decode_entry(&self, entry: u64) -> Result<Mapping> {
        self.decode(entry)
    }
}
