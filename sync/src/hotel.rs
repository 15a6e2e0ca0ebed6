//! Hotelling: OS layers a client keeps cached so that one machine can
//! switch between them without downloading anything (`lamina hotel`).
//!
//! Each cached layer has a `hotel` record (where it came from, when it was
//! added and last used). The cache may carry a byte limit: adding a layer
//! past it evicts the least recently used layers that nothing uses. A
//! layer's size is what its versions hold (history included, as gc keeps
//! it); the cache's size counts a chunk shared by two layers once.
//!
//! Forgetting a layer ([`Store::forget_layer`]) drops it, its pin, its
//! tracking refs and their history, so the next gc frees its chunks.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::layer::Layer;
use crate::reach::{Reach, Visitor, Where};
use crate::store::keys::layer_ref;
use crate::store::Store;

const KIND: &str = "hotel";
const CONFIG: &str = "hotel-config";

/// One cached layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotelEntry {
    /// Layer name.
    pub layer: String,
    /// Remote it was checked out of.
    pub remote: String,
    /// When added, ns since the epoch.
    pub added_ns: i64,
    /// When a mount, a disk or a switch last used it.
    pub last_used_ns: i64,
}

/// A cached layer with what it holds, for listings and eviction.
#[derive(Debug, Clone)]
pub struct Occupant {
    /// Its record.
    pub entry: HotelEntry,
    /// Plain bytes of the chunks its versions hold.
    pub bytes: u64,
    /// Those chunks with their plain sizes (a chunk shared with another
    /// layer counts once in the cache's total).
    chunks: HashMap<ChunkId, u64>,
}

struct Quiet(Option<String>);

impl Visitor for Quiet {
    fn broken(&mut self, at: &Where<'_>, error: Error) {
        self.0.get_or_insert_with(|| format!("{at}: {error}"));
    }
}

fn decode(name: &str, v: &[u8]) -> Result<HotelEntry> {
    postcard::from_bytes(v).map_err(|e| Error::RecordCorrupt {
        what: format!("{KIND} {name}"),
        reason: e.to_string(),
    })
}

fn encode(e: &HotelEntry) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    #[allow(clippy::expect_used)]
    postcard::to_allocvec(e).expect("postcard serialises into a Vec")
}

impl Store {
    /// Every cached layer, by name.
    ///
    /// # Errors
    /// Catalog failures, a damaged record.
    pub fn hotel_entries(&self) -> Result<Vec<HotelEntry>> {
        self.records(KIND)?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    /// The cached layer `layer`, if it is one.
    ///
    /// # Errors
    /// Catalog failures, a damaged record.
    pub fn hotel_entry(&self, layer: &str) -> Result<Option<HotelEntry>> {
        self.record(KIND, layer)?
            .map(|v| decode(layer, &v))
            .transpose()
    }

    /// Records `layer` (already in this store) as cached from `remote`.
    ///
    /// # Errors
    /// An unknown layer, catalog failures.
    pub fn hotel_add(&self, layer: &str, remote: &str) -> Result<HotelEntry> {
        self.layer(layer)?;
        let now = now_ns();
        let e = match self.hotel_entry(layer)? {
            Some(old) => HotelEntry {
                remote: remote.to_owned(),
                last_used_ns: now,
                ..old
            },
            None => HotelEntry {
                layer: layer.to_owned(),
                remote: remote.to_owned(),
                added_ns: now,
                last_used_ns: now,
            },
        };
        let mut batch = self.batch()?;
        batch.put_record(KIND, layer, &encode(&e))?;
        self.commit(batch)?;
        Ok(e)
    }

    /// Notes that `layer` was just used (nothing if it is not cached).
    ///
    /// # Errors
    /// Catalog failures.
    pub fn hotel_touch(&self, layer: &str) -> Result<()> {
        let Some(mut e) = self.hotel_entry(layer)? else {
            return Ok(());
        };
        e.last_used_ns = now_ns();
        let mut batch = self.batch()?;
        batch.put_record(KIND, layer, &encode(&e))?;
        self.commit(batch)
    }

    /// The cache's byte limit, if one is set.
    ///
    /// # Errors
    /// Catalog failures, a damaged record.
    pub fn hotel_limit(&self) -> Result<Option<u64>> {
        match self.record(CONFIG, "limit")? {
            None => Ok(None),
            Some(v) => v
                .try_into()
                .map(|b| Some(u64::from_le_bytes(b)))
                .map_err(|_| Error::RecordCorrupt {
                    what: format!("{CONFIG} limit"),
                    reason: "not 8 bytes".into(),
                }),
        }
    }

    /// Sets (or with `None` clears) the cache's byte limit.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn set_hotel_limit(&self, limit: Option<u64>) -> Result<()> {
        let mut batch = self.batch()?;
        match limit {
            Some(l) => batch.put_record(CONFIG, "limit", &l.to_le_bytes())?,
            None => batch.delete_record(CONFIG, "limit")?,
        }
        self.commit(batch)
    }

    /// Every cached layer with its size.
    ///
    /// # Errors
    /// A version or manifest that cannot be read, catalog or backend
    /// failures.
    pub fn hotel_occupants(&self) -> Result<Vec<Occupant>> {
        let mut sized: HashMap<ChunkId, u64> = HashMap::new();
        let mut out = Vec::new();
        for entry in self.hotel_entries()? {
            let roots: Vec<_> = self
                .layer_refs(&entry.layer)?
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            let mut quiet = Quiet(None);
            let reach = Reach::walk(self, &roots, &mut quiet);
            if let Some(why) = quiet.0 {
                return Err(Error::InvalidInput(format!(
                    "cached layer `{}` cannot be read: {why} (run `lamina fsck`)",
                    entry.layer
                )));
            }
            sized.extend(reach.chunks.iter().map(|c| (*c, 0)));
            out.push(Occupant {
                entry,
                bytes: 0,
                chunks: reach.chunks.into_iter().map(|c| (c, 0)).collect(),
            });
        }
        self.backend.list(&mut |id, plain| {
            if let Some(s) = sized.get_mut(&id) {
                *s = plain;
            }
            Ok(())
        })?;
        for o in &mut out {
            for (c, plain) in &mut o.chunks {
                *plain = sized.get(c).copied().unwrap_or(0);
            }
            o.bytes = o.chunks.values().sum();
        }
        Ok(out)
    }

    /// The refs that belong to `layer` itself: its head, its pin and the
    /// tracking refs of remotes it comes from.
    fn layer_refs(&self, layer: &str) -> Result<Vec<(String, crate::VersionId)>> {
        Ok(self
            .refs()?
            .into_iter()
            .filter(|(r, _)| owned_by(r, layer))
            .collect())
    }

    /// Removes `layer` with its pin, its tracking refs and their reflog
    /// entries, so that gc frees what only it held. Refused while another
    /// ref (a disk, a pinned composition slot) names one of its versions.
    ///
    /// # Errors
    /// [`Error::LayerNotFound`], [`Error::InvalidInput`] naming the ref that
    /// still uses it, catalog failures.
    pub fn forget_layer(&self, layer: &str) -> Result<()> {
        let l: Layer = self.layer(layer)?;
        for (r, v) in self.refs()? {
            if !owned_by(&r, layer) && self.version(v)?.layer == l.id {
                return Err(Error::InvalidInput(format!(
                    "layer `{layer}` is in use: ref {r} holds its version {}",
                    v.short()
                )));
            }
        }
        let owned = self.layer_refs(layer)?;
        let mut batch = self.batch()?;
        self.remove_layer_in(&mut batch, layer)?;
        for (r, v) in &owned {
            if *r != layer_ref(layer) {
                batch.move_ref(r, Some(*v), None, "hotel rm")?;
            }
        }
        for r in owned.iter().map(|(r, _)| r).chain([&layer_ref(layer)]) {
            self.drop_reflog_in(&mut batch, r)?;
        }
        for remote in self.remote_configs()? {
            self.untrack(&mut batch, &remote.name, layer)?;
        }
        batch.delete_record(KIND, layer)?;
        self.commit(batch)
    }
}

/// Whether ref `r` is `layer`'s own: `layer/L`, `pin/L`, `remote/R/L`.
fn owned_by(r: &str, layer: &str) -> bool {
    if let Some(l) = r.strip_prefix("layer/").or_else(|| r.strip_prefix("pin/")) {
        return l == layer;
    }
    r.strip_prefix("remote/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, l)| l == layer)
}

/// Which cached layers to evict so that the cache fits in `limit` bytes:
/// least recently used first, never one in `keep` (in use, or just added).
/// Returns their names; the cache may still exceed the limit if what is
/// left is all kept.
pub fn plan_eviction(occupants: &[Occupant], keep: &HashSet<String>, limit: u64) -> Vec<String> {
    let mut count: HashMap<ChunkId, u32> = HashMap::new();
    let mut plain: HashMap<ChunkId, u64> = HashMap::new();
    for o in occupants {
        for (c, p) in &o.chunks {
            *count.entry(*c).or_default() += 1;
            plain.entry(*c).or_insert(*p);
        }
    }
    let mut total: u64 = plain.values().sum();
    let mut order: Vec<&Occupant> = occupants
        .iter()
        .filter(|o| !keep.contains(&o.entry.layer))
        .collect();
    order.sort_by_key(|o| o.entry.last_used_ns);
    let mut out = Vec::new();
    for o in order {
        if total <= limit {
            break;
        }
        for c in o.chunks.keys() {
            if let Some(n) = count.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    total -= plain[c];
                }
            }
        }
        out.push(o.entry.layer.clone());
    }
    out
}

/// Plain bytes the cache holds: each chunk once.
pub fn cache_bytes(occupants: &[Occupant]) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    for o in occupants {
        for (c, p) in &o.chunks {
            if seen.insert(*c) {
                total += p;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn occ(name: &str, used: i64, chunks: &[u8]) -> Occupant {
        Occupant {
            entry: HotelEntry {
                layer: name.into(),
                remote: "r".into(),
                added_ns: 0,
                last_used_ns: used,
            },
            bytes: 100 * chunks.len() as u64,
            chunks: chunks.iter().map(|b| (ChunkId([*b; 32]), 100)).collect(),
        }
    }

    #[test]
    fn eviction_takes_the_least_recently_used_that_is_not_kept() {
        let o = vec![
            occ("a", 3, &[1, 2]),
            occ("b", 1, &[3]),
            occ("c", 2, &[4, 5]),
        ];
        assert_eq!(cache_bytes(&o), 500);
        let none = HashSet::new();
        assert!(plan_eviction(&o, &none, 500).is_empty());
        assert_eq!(plan_eviction(&o, &none, 450), ["b"]);
        assert_eq!(plan_eviction(&o, &none, 250), ["b", "c"]);
        let keep: HashSet<String> = ["b".to_string()].into();
        assert_eq!(plan_eviction(&o, &keep, 450), ["c"]);
        // Everything kept: nothing to evict, the limit stays exceeded.
        let all: HashSet<String> = ["a", "b", "c"].map(String::from).into();
        assert!(plan_eviction(&o, &all, 0).is_empty());
    }

    #[test]
    fn shared_chunks_count_once_and_free_nothing_until_the_last_goes() {
        let o = vec![occ("old", 1, &[1, 2, 3]), occ("new", 2, &[2, 3, 4])];
        assert_eq!(cache_bytes(&o), 400);
        // Evicting `old` frees only chunk 1.
        assert_eq!(plan_eviction(&o, &HashSet::new(), 300), ["old"]);
        assert_eq!(plan_eviction(&o, &HashSet::new(), 299), ["old", "new"]);
    }

    #[test]
    fn owned_refs() {
        assert!(owned_by("layer/os/a", "os/a"));
        assert!(owned_by("pin/os/a", "os/a"));
        assert!(owned_by("remote/origin/os/a", "os/a"));
        assert!(!owned_by("remote/origin/os/ab", "os/a"));
        assert!(!owned_by("disk/os/a", "os/a"));
        assert!(!owned_by("compose/x/0", "os/a"));
    }
}
