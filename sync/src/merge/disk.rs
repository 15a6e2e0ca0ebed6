//! Three-way merge of disk manifests, per cluster.
//!
//! When the three radixes have the same shape (same size, cluster size and
//! depth: the usual case) they merge node by node, taking whole subtrees
//! where one side left them as in the base. Otherwise (a side resized the
//! disk) the cluster maps merge flat and the radix is rebuilt. A cluster
//! both sides wrote differently is a conflict; the decider chooses one
//! answer for all of them (a disk has no per-cluster semantics an admin
//! could judge).

use std::collections::BTreeMap;

use super::conflict::{ConflictItem, ItemKind};
use super::Take;
use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestId, HASH_LEN};
use crate::manifest::{DiskBuilder, DiskNode, DiskRoot, DiskSlot, Node, NodeSource, RADIX_BITS};
use crate::store::Store;

pub(super) struct DiskMerge<'a> {
    pub store: &'a Store,
    /// What every conflicting cluster gets.
    pub take: Take,
    /// Conflicting cluster indices.
    pub clusters: Vec<u64>,
}

type Slot = Option<[u8; HASH_LEN]>;

fn load(store: &Store, id: Option<ManifestId>, level: u8) -> Result<Vec<DiskSlot>> {
    match id {
        None => Ok(Vec::new()),
        Some(id) => match store.load(id)? {
            Node::Disk(d) if d.level == level => Ok(d.slots),
            _ => Err(Error::ManifestCorrupt {
                id,
                reason: format!("expected a disk radix node at level {level}"),
            }),
        },
    }
}

impl DiskMerge<'_> {
    /// Chooses for one cluster (or subtree) the three sides disagree on.
    fn pick(&mut self, index: u64, b: Slot, s: Slot, c: Slot) -> Slot {
        if s == c || b == c {
            return s;
        }
        if b == s {
            return c;
        }
        self.clusters.push(index);
        match self.take {
            Take::Client => c,
            _ => s,
        }
    }

    /// Merges the radix nodes of one level; `base_index` is the index of
    /// the node's first cluster >> (RADIX_BITS × level).
    fn node(
        &mut self,
        level: u8,
        base_index: u64,
        b: Option<ManifestId>,
        s: Option<ManifestId>,
        c: Option<ManifestId>,
    ) -> Result<Option<ManifestId>> {
        if s == c || b == c {
            return Ok(s);
        }
        if b == s {
            return Ok(c);
        }
        let mut slots: BTreeMap<u16, (Slot, Slot, Slot)> = BTreeMap::new();
        for x in load(self.store, b, level)? {
            slots.entry(x.index).or_default().0 = Some(x.id);
        }
        for x in load(self.store, s, level)? {
            slots.entry(x.index).or_default().1 = Some(x.id);
        }
        for x in load(self.store, c, level)? {
            slots.entry(x.index).or_default().2 = Some(x.id);
        }
        let mut out = Vec::with_capacity(slots.len());
        for (i, (bs, ss, cs)) in slots {
            let index = (base_index << RADIX_BITS) | u64::from(i);
            let merged = if level == 0 {
                self.pick(index, bs, ss, cs)
            } else {
                self.node(
                    level - 1,
                    index,
                    bs.map(ManifestId),
                    ss.map(ManifestId),
                    cs.map(ManifestId),
                )?
                .map(|m| m.0)
            };
            if let Some(id) = merged {
                out.push(DiskSlot { index: i, id });
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            self.store
                .put_node(&Node::Disk(DiskNode { level, slots: out }))?,
        ))
    }

    /// Merges whole disks; returns the merged root.
    pub fn root(
        &mut self,
        b: Option<&DiskRoot>,
        s: &DiskRoot,
        c: &DiskRoot,
    ) -> Result<(DiskRoot, bool)> {
        let size_base = b.map(|b| b.size);
        let size = if s.size == c.size || size_base == Some(c.size) {
            s.size
        } else if size_base == Some(s.size) {
            c.size
        } else {
            match self.take {
                Take::Client => c.size,
                _ => s.size,
            }
        };
        let size_conflict =
            s.size != c.size && size_base != Some(s.size) && size_base != Some(c.size);
        let same_shape = |r: &DiskRoot| {
            r.levels == s.levels && r.cluster_size == s.cluster_size && r.size == size
        };
        if same_shape(s) && same_shape(c) && b.is_none_or(same_shape) {
            let top = self.node(s.levels - 1, 0, b.and_then(|b| b.top), s.top, c.top)?;
            return Ok((
                DiskRoot {
                    size,
                    cluster_size: s.cluster_size,
                    levels: s.levels,
                    top,
                },
                size_conflict,
            ));
        }
        if c.cluster_size != s.cluster_size || b.is_some_and(|b| b.cluster_size != s.cluster_size) {
            return Err(Error::InvalidInput(format!(
                "cannot merge disks of different cluster sizes ({} and {})",
                s.cluster_size, c.cluster_size
            )));
        }
        let map = |r: Option<&DiskRoot>| -> Result<BTreeMap<u64, [u8; HASH_LEN]>> {
            let mut m = BTreeMap::new();
            if let Some(r) = r {
                r.for_each_cluster(self.store, |i, id| {
                    m.insert(i, id.0);
                    Ok(())
                })?;
            }
            Ok(m)
        };
        let (bm, sm, cm) = (map(b)?, map(Some(s))?, map(Some(c))?);
        let mut indices: Vec<u64> = bm
            .keys()
            .chain(sm.keys())
            .chain(cm.keys())
            .copied()
            .collect();
        indices.sort_unstable();
        indices.dedup();
        let clusters = size.div_ceil(u64::from(s.cluster_size));
        let mut builder = DiskBuilder::new(size, s.cluster_size);
        let store = self.store;
        let mut put = |n: Node| store.put_node(&n);
        for i in indices.into_iter().filter(|i| *i < clusters) {
            let merged = self.pick(
                i,
                bm.get(&i).copied(),
                sm.get(&i).copied(),
                cm.get(&i).copied(),
            );
            if let Some(id) = merged {
                builder.push(i, ChunkId(id), &mut put)?;
            }
        }
        let levels = builder.levels();
        let top = builder.finish(&mut put)?;
        Ok((
            DiskRoot {
                size,
                cluster_size: s.cluster_size,
                levels,
                top,
            },
            size_conflict,
        ))
    }

    /// The conflicting clusters as items, one per run.
    pub fn items(&mut self) -> Vec<ConflictItem> {
        self.clusters.sort_unstable();
        self.clusters.dedup();
        let resolution = match self.take {
            Take::Client => "client",
            Take::Pending => "pending",
            _ => "server",
        };
        let mut out = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for &c in &self.clusters {
            run = match run {
                Some((a, e)) if e == c => Some((a, c + 1)),
                Some((a, e)) => {
                    out.push((a, e));
                    Some((c, c + 1))
                }
                None => Some((c, c + 1)),
            };
        }
        out.extend(run);
        out.into_iter()
            .map(|(a, e)| ConflictItem {
                path: format!("clusters {a}-{e}"),
                kind: ItemKind::BothChanged,
                resolution: resolution.to_owned(),
            })
            .collect()
    }
}
