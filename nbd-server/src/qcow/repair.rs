//! Refcount repair: recount every reference from the metadata and correct
//! the stored refcounts. Run on a writable open of an image whose dirty bit
//! is set (a writer stopped without closing it cleanly).

use std::collections::HashMap;
use std::fs::File;

use super::header::OFFSET_MASK;
use super::meta::{Mapping, Meta};
use crate::error::Result;

/// What a repair changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RepairStats {
    /// Refcounts corrected.
    pub fixed: u64,
    /// Clusters that were referenced but counted too low.
    pub raised: u64,
}

/// Recounts references and rewrites refcounts that differ.
pub(crate) fn repair(
    meta: &mut Meta,
    f: &File,
    l1_clusters: u64,
    rt_clusters: u64,
) -> Result<RepairStats> {
    let cs = meta.cs;
    let mut counts: HashMap<u64, u16> = HashMap::new();
    let mut mark = |c: u64| {
        let e = counts.entry(c).or_insert(0);
        *e = e.saturating_add(1);
    };
    mark(0);
    let l1_start = meta.l1_offset / cs;
    for c in l1_start..l1_start + l1_clusters {
        mark(c);
    }
    let rt_start = meta.rt_offset / cs;
    for c in rt_start..rt_start + rt_clusters {
        mark(c);
    }
    for e in &meta.rt {
        let o = e & OFFSET_MASK;
        if o != 0 {
            mark(o / cs);
        }
    }
    for (_, table) in meta.l2_tables() {
        mark(table / cs);
        for entry in meta.read_l2(f, table)? {
            if entry == 0 {
                continue;
            }
            match meta.decode_entry(entry)? {
                Mapping::Data { host, .. }
                | Mapping::Zero {
                    prealloc: Some(host),
                } => mark(host / cs),
                Mapping::Compressed { offset, len } => {
                    for c in offset / cs..=(offset + len.max(1) - 1) / cs {
                        mark(c);
                    }
                }
                Mapping::Unallocated | Mapping::Zero { prealloc: None } => {}
            }
        }
    }
    let mut stats = RepairStats::default();
    let top = counts
        .keys()
        .copied()
        .max()
        .map_or(0, |m| m + 1)
        .max(meta.end);
    for c in 0..top {
        let want = counts.get(&c).copied().unwrap_or(0);
        let have = meta.refcount(c);
        if want != have {
            if want > have {
                stats.raised += 1;
            }
            stats.fixed += 1;
            meta.set_refcount(f, c, want)?;
        }
    }
    Ok(stats)
}
