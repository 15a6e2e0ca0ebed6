//! Conflict records: every real conflict the mediator met, how it was
//! settled, and — for the `manual` policy — the ones waiting for an admin.
//!
//! A record lives in the catalog (kind `conflict`, by id) of the store
//! that settled or holds it; the losing side's version (or, for a pending
//! conflict, the client's) is kept alive on the ref `conflict/ID`, so its
//! move is journalled in the reflog and gc never takes it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::VersionId;
use crate::policy::ConflictPolicy;
use crate::store::Store;

const CONFLICT: &str = "conflict";

/// Where a conflict stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictState {
    /// Settled by the layer's policy when it was met.
    Settled,
    /// Waiting for `lamina conflicts resolve` (policy `manual`).
    Pending,
    /// Resolved by an admin.
    Resolved,
}

impl ConflictState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictState::Settled => "settled",
            ConflictState::Pending => "pending",
            ConflictState::Resolved => "resolved",
        }
    }
}

/// How the two sides differ at one path or cluster range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemKind {
    /// Both changed it differently.
    BothChanged,
    /// Both created it, differently.
    BothAdded,
    /// The server changed it, the client deleted it.
    ClientDeleted,
    /// The client changed it, the server deleted it.
    ServerDeleted,
}

/// One conflicting path (trees) or cluster range (disks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictItem {
    /// `/path/in/layer`, or `clusters A-B` (end exclusive).
    pub path: String,
    /// How the sides differ.
    pub kind: ItemKind,
    /// What was done: `server`, `client`, `kept NAME` (keep-both), or
    /// `pending`.
    pub resolution: String,
}

/// One conflict between a client's and the server's history of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// Short id.
    pub id: String,
    /// Layer.
    pub layer: String,
    /// The client's host name.
    pub host: String,
    /// Who pushed it (set by the server).
    #[serde(default)]
    pub user: String,
    /// When met, ns since the epoch.
    pub created_ns: i64,
    /// The policy applied.
    pub policy: ConflictPolicy,
    /// Where the histories last met.
    pub base: Option<VersionId>,
    /// The server's head.
    pub server: VersionId,
    /// The client's head.
    pub client: VersionId,
    /// The version made by the merge or the resolution.
    pub merged: Option<VersionId>,
    /// State.
    pub state: ConflictState,
    /// What conflicted.
    pub items: Vec<ConflictItem>,
}

impl ConflictRecord {
    /// The ref keeping this conflict's losing (or pending) side alive.
    pub fn kept_ref(&self) -> String {
        format!("conflict/{}", self.id)
    }

    /// A new random id.
    pub fn new_id() -> String {
        hex::encode(rand::random::<[u8; 4]>())
    }
}

impl Store {
    /// Every conflict record, newest first.
    ///
    /// # Errors
    /// Catalog failures, damaged records.
    pub fn conflicts(&self) -> Result<Vec<ConflictRecord>> {
        let mut out: Vec<ConflictRecord> = self
            .records(CONFLICT)?
            .into_iter()
            .map(|(name, v)| {
                serde_json::from_slice(&v).map_err(|e| Error::RecordCorrupt {
                    what: format!("{CONFLICT} {name}"),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| b.created_ns.cmp(&a.created_ns).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The conflict `id` (a unique prefix will do).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unknown or ambiguous id.
    pub fn conflict(&self, id: &str) -> Result<ConflictRecord> {
        let all = self.conflicts()?;
        let mut hits = all.into_iter().filter(|c| c.id.starts_with(id));
        match (hits.next(), hits.next()) {
            (Some(c), None) if !id.is_empty() => Ok(c),
            (Some(_), Some(_)) => Err(Error::InvalidInput(format!(
                "conflict id `{id}` is ambiguous"
            ))),
            _ => Err(Error::InvalidInput(format!("no conflict with id `{id}`"))),
        }
    }
}

impl crate::Batch<'_> {
    /// Stores (or replaces) a conflict record.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn put_conflict(&mut self, c: &ConflictRecord) -> Result<()> {
        // Plain data with string keys always serialises.
        #[allow(clippy::expect_used)]
        let bytes = serde_json::to_vec(c).expect("conflict record serialises");
        self.put_record(CONFLICT, &c.id, &bytes)
    }
}
