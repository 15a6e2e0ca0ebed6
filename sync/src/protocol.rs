//! The sync API's JSON messages, shared by the server ([`crate::api`]) and
//! the client ([`crate::remote`]).
//!
//! All routes live under `/api/v1` and need `Authorization: Bearer TOKEN`.
//! Layer names are the last part of a path (they contain `/`).
//!
//! | method | path                       | body → answer                                   | needs |
//! |--------|----------------------------|-------------------------------------------------|-------|
//! | GET    | `/whoami`                  | → [`WhoAmI`]                                    | token |
//! | GET    | `/layers`                  | → `[LayerInfo]`, only layers the caller may read | token |
//! | GET    | `/layers/LAYER`            | → [`LayerInfo`]                                 | read  |
//! | POST   | `/versions/LAYER`          | [`VersionsRequest`] → [`VersionsResponse`]      | read  |
//! | POST   | `/fetch/LAYER`             | id list → record stream                         | read  |
//! | POST   | `/missing/LAYER`           | id list → bit set (1 = the server lacks it)     | write |
//! | POST   | `/upload/LAYER`            | record stream → [`crate::transfer::TransferStats`] | write |
//! | POST   | `/push/LAYER`              | [`PushBody`] → [`PushResponse`] (409 if stale)  | write |
//! | POST   | `/conflicts/LAYER`         | [`crate::merge::ConflictRecord`] → its id (manual policy) | write |
//! | GET    | `/conflicts`               | → the caller's conflicts (an admin's: all)      | token |
//! | GET    | `/conflict/ID`             | → [`crate::merge::ConflictRecord`]              | token |
//!
//! Id lists, bit sets and record streams are binary (see
//! [`crate::transfer::wire`]). Errors are `{"error":{"kind","message"}}`
//! with 400, 401, 403, 404, 409 (with `head`), 413 or 5xx.

use serde::{Deserialize, Serialize};

use crate::auth::Permission;
use crate::id::{LayerId, VersionId};
use crate::layer::{LayerFormat, LayerKind};
use crate::merge::ConflictRecord;
use crate::policy::ConflictPolicy;
use crate::transfer::{PushRequest, PushedVersion};

/// Prefix of every route.
pub const API_PREFIX: &str = "/api/v1";

/// `GET /whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// User name.
    pub user: String,
    /// Admin flag.
    pub admin: bool,
    /// Groups.
    pub groups: Vec<String>,
}

/// A layer as the server shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Name.
    pub name: String,
    /// Identity (shared by every store holding a copy).
    pub id: LayerId,
    /// Kind.
    pub kind: LayerKind,
    /// Format.
    pub format: LayerFormat,
    /// Head version.
    pub head: Option<VersionId>,
    /// Conflict policy the server applies.
    pub policy: ConflictPolicy,
    /// What the caller may do.
    pub permission: Permission,
    /// When the caller's subscription to it ends (none: it does not).
    #[serde(default)]
    pub until_ns: Option<i64>,
    /// How long past that end a client that cannot sync may still use it.
    #[serde(default)]
    pub grace_secs: u64,
    /// The admin's network policy for VMs over this layer (`none`, `user`,
    /// `allow:HOST:PORT,...`).
    #[serde(default)]
    pub net: Option<String>,
}

/// `POST /versions/LAYER`: the versions reachable from `want` that are not
/// reachable from `have` (what the caller lacks), parents first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionsRequest {
    /// Versions to start from (usually the server's head).
    pub want: Vec<VersionId>,
    /// Versions the caller has.
    pub have: Vec<VersionId>,
}

/// Answer to [`VersionsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionsResponse {
    /// The versions, parents first.
    pub versions: Vec<PushedVersion>,
    /// The server's signatures over those of `os` and `group` layers.
    #[serde(default)]
    pub signatures: Vec<crate::sign::VersionSig>,
}

/// A layer to create on the server with its first push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewLayer {
    /// Identity (the client's copy's).
    pub id: LayerId,
    /// Kind.
    pub kind: LayerKind,
    /// Format.
    pub format: LayerFormat,
}

/// `POST /push/LAYER`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushBody {
    /// Create the layer first (it must not exist, or be this very layer).
    pub create: Option<NewLayer>,
    /// The versions and the ref move.
    pub push: PushRequest,
    /// Conflicts the client's mediator settled by policy in this merge,
    /// recorded on the server beside the versions.
    #[serde(default)]
    pub conflicts: Vec<ConflictRecord>,
}

/// Answer to [`PushBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// The layer's head now.
    pub head: VersionId,
}

/// Error envelope of every failed request.
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorInner,
}

/// Inside [`ErrorBody`].
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorInner {
    /// Stable kind, e.g. `forbidden`.
    pub kind: String,
    /// One line.
    pub message: String,
    /// On 409: the head now.
    #[serde(default)]
    pub head: Option<VersionId>,
}

/// `POST /conflicts/LAYER`: a conflict the client could not settle (policy
/// `manual`), with the client's versions, kept on the server until an
/// admin resolves it. No head moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictSubmission {
    /// The conflict (state `pending`).
    pub record: ConflictRecord,
    /// Versions of the client's side the server lacks.
    pub versions: Vec<PushedVersion>,
}
