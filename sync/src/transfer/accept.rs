//! Accepting pushed versions: the last step of a check-in.
//!
//! By the time versions are pushed, their data and manifest nodes have been
//! uploaded. Before the layer's ref moves, every pushed version is decoded
//! (its id checked), must belong to the layer, must have its parents here
//! or among the pushed ones, and must be complete: the walk of [`Delta`]
//! from each version's parent proves every node it needs loads and every
//! data chunk is indexed. The new head must descend from the head the
//! pusher expected, and the ref moves by compare-and-swap on that head, in
//! the same synced batch as the versions and any extra refs: a push is
//! applied whole or not at all.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::dag::topological;
use super::Delta;
use crate::error::{Error, Result};
use crate::id::{ManifestId, VersionId};
use crate::layer::Layer;
use crate::merge::ConflictRecord;
use crate::store::keys::layer_ref;
use crate::store::Store;
use crate::version::Version;

/// One version as it travels: its id and canonical bytes (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedVersion {
    /// Version id.
    pub id: VersionId,
    /// Encoded version, hex.
    pub bytes: String,
}

impl PushedVersion {
    /// The wire form of a version.
    pub fn of(v: &Version) -> PushedVersion {
        let (id, bytes) = v.encode();
        PushedVersion {
            id,
            bytes: hex::encode(bytes),
        }
    }

    /// Decodes and checks the version against its id.
    ///
    /// # Errors
    /// [`Error::VersionCorrupt`], bad hex.
    pub fn decode(&self) -> Result<Version> {
        let bytes = hex::decode(&self.bytes).map_err(|_| Error::VersionCorrupt {
            id: self.id,
            reason: "not hex".into(),
        })?;
        Version::decode(self.id, &bytes)
    }
}

/// A check-in: move `layer`'s head from `expected` to `new`, adding
/// `versions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRequest {
    /// The head the pusher last saw here (`None`: the layer has none).
    pub expected: Option<VersionId>,
    /// The new head.
    pub new: VersionId,
    /// Versions this store lacks, any order.
    pub versions: Vec<PushedVersion>,
    /// Further refs to set in the same batch (conflict refs), each created
    /// or moved to the given version.
    #[serde(default)]
    pub refs: Vec<(String, VersionId)>,
    /// Reflog note of the head move.
    #[serde(default)]
    pub action: String,
}

/// Longest chain of versions accepted in one push.
pub const MAX_PUSHED_VERSIONS: usize = 100_000;

/// What a push (or a conflict submission) asks this store to apply.
pub struct Accept<'a> {
    /// The layer.
    pub layer: &'a Layer,
    /// The layer is new here: create it in the same batch.
    pub create: bool,
    /// Versions this store lacks.
    pub versions: &'a [PushedVersion],
    /// Move the head from the first to the second (compare-and-swap).
    pub head: Option<(Option<VersionId>, VersionId)>,
    /// Conflict refs to create or move.
    pub refs: &'a [(String, VersionId)],
    /// Conflict records to store.
    pub conflicts: &'a [ConflictRecord],
    /// Reflog note.
    pub action: &'a str,
}

impl Store {
    /// Checks and applies a push (see the module doc), in one batch.
    ///
    /// # Errors
    /// [`Error::RefConflict`] when the head is not where the pusher
    /// expected; [`Error::InvalidInput`] for versions of another layer,
    /// missing parents, a head that does not descend from the expected one,
    /// bad extra refs, missing content; catalog failures.
    pub fn accept(&self, a: &Accept<'_>) -> Result<()> {
        let layer = a.layer;
        if a.versions.len() > MAX_PUSHED_VERSIONS {
            return Err(Error::InvalidInput(format!(
                "{} versions in one push exceed the limit of {MAX_PUSHED_VERSIONS}",
                a.versions.len()
            )));
        }
        let mut pushed: HashMap<VersionId, Version> = HashMap::new();
        for pv in a.versions {
            let v = pv.decode()?;
            if v.layer != layer.id {
                return Err(Error::InvalidInput(format!(
                    "version {} belongs to another layer than `{}` (layer id {}, expected {})",
                    pv.id.short(),
                    layer.name,
                    v.layer,
                    layer.id
                )));
            }
            pushed.insert(pv.id, v);
        }
        let lookup = |id: VersionId| -> Result<Version> {
            match pushed.get(&id) {
                Some(v) => Ok(v.clone()),
                None => self.version(id).map_err(|_| {
                    Error::InvalidInput(format!(
                        "version {} is neither here nor in the push",
                        id.short()
                    ))
                }),
            }
        };
        if let Some((expected, new)) = a.head {
            lookup(new)?;
            if let Some(exp) = expected {
                if !descends(new, exp, &lookup)? {
                    return Err(Error::InvalidInput(format!(
                        "version {} does not descend from {}, the head it was pushed onto: pull and merge first",
                        new.short(),
                        exp.short()
                    )));
                }
            }
        }
        // Completeness, each version against a parent's manifest.
        let order = topological(pushed.clone());
        let mut delta = Delta::new();
        for (id, v) in &order {
            for p in &v.parents {
                lookup(*p)?;
            }
            let base: Option<ManifestId> = match v.parents.first() {
                Some(p) => Some(lookup(*p)?.root),
                None => None,
            };
            delta.add(self, v.root, base).map_err(|e| match e {
                Error::ManifestCorrupt { id: node, reason } => Error::InvalidInput(format!(
                    "version {}: manifest node {node} {reason}: upload it first",
                    id.short()
                )),
                other => other,
            })?;
        }
        if let Some(c) = self.lacking(delta.chunks.iter().copied())?.first() {
            return Err(Error::InvalidInput(format!(
                "chunk {c} of the pushed versions is missing here: upload it first"
            )));
        }
        for (name, v) in a.refs {
            if !name.starts_with("conflict/") {
                return Err(Error::InvalidInput(format!(
                    "a push may only set conflict refs, not `{name}`"
                )));
            }
            if lookup(*v)?.layer != layer.id {
                return Err(Error::InvalidInput(format!(
                    "conflict ref `{name}` names a version of another layer"
                )));
            }
        }
        let mut batch = self.batch()?;
        if a.create {
            batch.put_layer(layer)?;
        }
        for (_, v) in &order {
            batch.put_version(v)?;
        }
        let name = layer_ref(&layer.name);
        match a.head {
            Some((expected, new)) if expected == Some(new) => {
                // Nothing to move; still a compare: the head must be there.
                let head = self.ref_target(&name)?;
                if head != expected {
                    return Err(Error::RefConflict {
                        name,
                        expected: new.short(),
                        found: head.map_or_else(|| "nothing".into(), |h| h.short()),
                    });
                }
            }
            Some((expected, new)) if a.create => {
                batch.move_ref(&name, expected, Some(new), a.action)?;
            }
            Some((expected, new)) => batch.move_head(layer, expected, new, a.action)?,
            None => {}
        }
        for (r, v) in a.refs {
            let old = self.ref_target(r)?;
            batch.move_ref(r, old, Some(*v), a.action)?;
        }
        for c in a.conflicts {
            batch.put_conflict(c)?;
        }
        self.commit(batch)
    }
}

/// Whether `ancestor` is `from` or reachable from it through parents.
fn descends(
    from: VersionId,
    ancestor: VersionId,
    lookup: &dyn Fn(VersionId) -> Result<Version>,
) -> Result<bool> {
    let mut seen = HashSet::new();
    let mut stack = vec![from];
    while let Some(id) = stack.pop() {
        if id == ancestor {
            return Ok(true);
        }
        if seen.insert(id) {
            stack.extend(lookup(id)?.parents);
        }
    }
    Ok(false)
}
