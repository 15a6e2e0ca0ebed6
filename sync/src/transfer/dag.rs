//! The version DAG: ancestry, merge bases, and which versions one side
//! lacks.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::id::VersionId;
use crate::store::Store;
use crate::version::Version;

impl Store {
    /// Versions reachable from `from` (inclusive) without passing through
    /// a version in `stop`, parents before children. Used to list what a
    /// receiver lacks: `stop` holds what it has.
    ///
    /// # Errors
    /// A version missing or damaged in this store.
    pub fn versions_between(
        &self,
        from: &[VersionId],
        stop: &HashSet<VersionId>,
    ) -> Result<Vec<(VersionId, Version)>> {
        let mut seen: HashMap<VersionId, Version> = HashMap::new();
        let mut stack: Vec<VersionId> =
            from.iter().copied().filter(|v| !stop.contains(v)).collect();
        while let Some(id) = stack.pop() {
            if seen.contains_key(&id) {
                continue;
            }
            let v = self.version(id)?;
            stack.extend(v.parents.iter().filter(|p| !stop.contains(p)).copied());
            seen.insert(id, v);
        }
        Ok(topological(seen))
    }

    /// Whether `ancestor` is `of` or one of its ancestors.
    ///
    /// # Errors
    /// A version missing or damaged in this store.
    pub fn is_ancestor(&self, ancestor: VersionId, of: VersionId) -> Result<bool> {
        if ancestor == of {
            return Ok(true);
        }
        Ok(self.ancestry(of)?.contains_key(&ancestor))
    }

    /// The best common ancestor of `a` and `b`: among their common
    /// ancestors, one that is no ancestor of another (the newest when
    /// several qualify, as after criss-cross merges). `None` when the
    /// histories never met.
    ///
    /// # Errors
    /// A version missing or damaged in this store.
    pub fn merge_base(&self, a: VersionId, b: VersionId) -> Result<Option<VersionId>> {
        let ours = self.ancestry(a)?;
        let theirs = self.ancestry(b)?;
        let common: HashSet<VersionId> = ours
            .keys()
            .filter(|k| theirs.contains_key(k))
            .copied()
            .collect();
        if common.is_empty() {
            return Ok(None);
        }
        // Drop every common ancestor that is a parent (transitively) of
        // another common ancestor.
        let mut below = HashSet::new();
        for c in &common {
            let mut stack: Vec<VersionId> = ours[c].parents.clone();
            while let Some(p) = stack.pop() {
                if below.insert(p) {
                    if let Some(v) = ours.get(&p) {
                        stack.extend(v.parents.iter().copied());
                    }
                }
            }
        }
        Ok(common
            .iter()
            .filter(|c| !below.contains(c))
            .max_by_key(|c| (ours[*c].time_ns, **c))
            .copied())
    }

    fn ancestry(&self, from: VersionId) -> Result<HashMap<VersionId, Version>> {
        let mut seen = HashMap::new();
        let mut stack = vec![from];
        while let Some(id) = stack.pop() {
            if seen.contains_key(&id) {
                continue;
            }
            let v = self.version(id)?;
            stack.extend(v.parents.iter().copied());
            seen.insert(id, v);
        }
        Ok(seen)
    }
}

/// Orders versions so that each comes after every parent in the set.
pub(crate) fn topological(mut set: HashMap<VersionId, Version>) -> Vec<(VersionId, Version)> {
    let mut out = Vec::with_capacity(set.len());
    let ids: Vec<VersionId> = {
        let mut v: Vec<(i64, VersionId)> = set.iter().map(|(id, v)| (v.time_ns, *id)).collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    };
    let mut done = HashSet::new();
    for start in ids {
        // Depth-first, emitting a version once all its parents in the set
        // are out.
        let mut stack = vec![(start, false)];
        while let Some((id, expanded)) = stack.pop() {
            if done.contains(&id) || !set.contains_key(&id) {
                continue;
            }
            if expanded {
                done.insert(id);
                if let Some(v) = set.remove(&id) {
                    out.push((id, v));
                }
                continue;
            }
            stack.push((id, true));
            if let Some(v) = set.get(&id) {
                for p in &v.parents {
                    if !done.contains(p) && set.contains_key(p) {
                        stack.push((*p, false));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{LayerId, ManifestId};
    use crate::{Access, LayerFormat, LayerKind, OpenOptions};

    struct Dag {
        _dir: tempfile::TempDir,
        store: Store,
        layer: LayerId,
        t: i64,
    }

    impl Dag {
        fn new() -> Dag {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("s");
            Store::init(&root).unwrap();
            let store = Store::open(&root, &OpenOptions::new(Access::Write)).unwrap();
            let layer = store
                .create_layer("l", LayerKind::Data, LayerFormat::Tree)
                .unwrap()
                .id;
            Dag {
                _dir: dir,
                store,
                layer,
                t: 1000,
            }
        }

        fn v(&mut self, parents: &[VersionId]) -> VersionId {
            self.t += 1;
            let v = Version {
                layer: self.layer,
                parents: parents.to_vec(),
                time_ns: self.t,
                author: "t".into(),
                message: String::new(),
                root: ManifestId([0; 32]),
            };
            let mut b = self.store.batch().unwrap();
            let id = b.put_version(&v).unwrap();
            self.store.commit(b).unwrap();
            id
        }
    }

    #[test]
    fn ancestry_bases_and_missing_versions() {
        let mut d = Dag::new();
        let a = d.v(&[]);
        let b = d.v(&[a]);
        let c1 = d.v(&[b]);
        let c2 = d.v(&[b]);
        let m = d.v(&[c1, c2]);
        let s = &d.store;
        assert!(s.is_ancestor(a, m).unwrap());
        assert!(s.is_ancestor(c2, m).unwrap());
        assert!(!s.is_ancestor(m, c2).unwrap());
        assert!(!s.is_ancestor(c1, c2).unwrap());
        assert_eq!(s.merge_base(c1, c2).unwrap(), Some(b));
        assert_eq!(s.merge_base(m, c2).unwrap(), Some(c2));
        let stop: HashSet<_> = [b].into();
        let got: Vec<VersionId> = s
            .versions_between(&[m], &stop)
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got.last(), Some(&m));
        let pos = |x| got.iter().position(|g| *g == x).unwrap();
        assert!(pos(c1) < pos(m) && pos(c2) < pos(m));
        let lone = d.v(&[]);
        assert_eq!(d.store.merge_base(lone, m).unwrap(), None);
    }

    #[test]
    fn criss_cross_picks_a_best_base() {
        let mut d = Dag::new();
        let a = d.v(&[]);
        let x = d.v(&[a]);
        let y = d.v(&[a]);
        let m1 = d.v(&[x, y]);
        let m2 = d.v(&[y, x]);
        let base = d.store.merge_base(m1, m2).unwrap().unwrap();
        assert!(base == x || base == y);
    }
}
