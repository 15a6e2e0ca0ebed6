//! `lamina-sync`: Lamina's versioned, content-addressed layer store.
//!
//! # Model
//!
//! * A **chunk** is immutable bytes named by the BLAKE3 of those bytes
//!   ([`ChunkId`]). Files are cut by FastCDC, disk images at fixed 64 KiB
//!   clusters ([`chunk`]). Chunks are stored once, zstd-compressed when that
//!   is smaller, in a [`ChunkBackend`] (pack files by default).
//! * A **layer** ([`Layer`]) is a named, versioned unit with a kind (`os`…
//!   `data`) and a format (`tree` or `disk`).
//! * A **version** ([`Version`]) is an immutable snapshot of a layer: parents,
//!   time, author, message and a root **manifest** ([`manifest`]), a Merkle
//!   tree of nodes stored as chunks.
//! * A **ref** names a version and moves only by compare-and-swap; every move
//!   is journalled in the **reflog**.
//!
//! # Flow
//!
//! [`Store::import`] walks a directory or raw image, cuts and hashes its data
//! on the calling thread, compresses and stores new chunks on worker threads,
//! builds the manifest bottom-up, syncs the packs and then commits the
//! version and ref move in one synced catalog batch. [`Store::export`] writes
//! a version back out; [`Store::diff`] compares two versions; [`Store::fsck`]
//! verifies everything; [`Store::gc`] removes unreachable chunks.
//!
//! # Sync between stores
//!
//! * Identities and grants (users, groups, tokens, per-layer grants) are
//!   catalog records ([`Store::authenticate`], [`Store::permission`]);
//!   every layer has a [`ConflictPolicy`].
//! * [`transfer`] is the transport-free part of moving versions: the
//!   [`transfer::Delta`] of a version over its parent, verified receipt of
//!   records, fetching a closure from a [`transfer::RecordSource`], and
//!   accepting a push by compare-and-swap.
//! * [`merge`] is the mediator: three-way merges of trees (per path) and
//!   disks (per cluster), conflict records and their resolution.
//! * [`api`] serves a store over HTTPS (axum, rustls); [`protocol`] lists its
//!   routes and messages; [`remote`] is the client: remotes, pull, push,
//!   sync and the watch daemon's status.
//! * [`control`] lets a command reach a long-running process holding part
//!   of the store (a mount daemon, a disk server).
//!
//! # Threads
//!
//! The store is synchronous. An import uses the calling thread plus one
//! worker per core (scoped; none outlive the call). A [`Store`] is
//! `Send + Sync`; async callers must reach it through `spawn_blocking` or a
//! dedicated thread — [`api`] does so through one helper
//! ([`api::gate::blocking`]), and its [`api::Gate`] keeps a reaper thread
//! that closes an idle writer. A [`remote::Connection`] owns a one-worker
//! tokio runtime and blocks the calling thread on each request; its worker
//! keeps a long-lived connection alive between requests.
//!
//! # Example
//!
//! ```no_run
//! use lamina_sync::{Store, OpenOptions, Access, LayerKind, LayerFormat, ImportOptions};
//! # fn main() -> Result<(), lamina_sync::Error> {
//! let root = std::path::Path::new("/tmp/store");
//! Store::init(root)?;
//! let store = Store::open(root, &OpenOptions::new(Access::Write))?;
//! store.create_layer("os/base", LayerKind::Os, LayerFormat::Tree)?;
//! let report = store.import("os/base", "/srv/rootfs".as_ref(), &ImportOptions::default())?;
//! println!("new version {}", report.version);
//! # Ok(()) }
//! ```

pub mod api;
mod auth;
pub mod backend;
mod catalog;
mod changes;
pub mod chunk;
pub mod control;
mod error;
mod export;
mod failpoint;
mod fsck;
mod fsio;
mod gc;
pub mod hotel;
mod id;
mod import;
mod layer;
pub mod manifest;
pub mod merge;
mod mirror;
mod pin;
mod policy;
mod progress;
pub mod protocol;
pub mod rados;
mod reach;
pub mod remote;
mod replicate;
pub mod sign;
mod store;
pub mod transfer;
mod version;

pub use auth::{
    check_name, in_own_namespace, AuthError, Caller, Grant, Group, Permission, Principal,
    TokenInfo, User,
};
pub use backend::{BackendProblem, BackendStats, ChunkBackend, ReclaimStats};
pub use catalog::{now_ns, rfc3339, Batch, ReflogEntry};
pub use changes::Diff;
pub use error::{Error, ErrorKind, Result};
pub use export::{ExportOptions, ExportReport};
pub use fsck::{FsckReport, Problem};
pub use fsio::write_atomic;
pub use gc::{GcOptions, GcReport};
pub use id::{ChunkId, LayerId, ManifestId, PackId, ParseIdError, VersionId};
pub use import::{read_meta, DiskSource, ImportOptions, ImportReport, ImportStats, TreeWriter};
pub use layer::{check_layer_name, Layer, LayerFormat, LayerKind};
pub use mirror::{MirrorLag, MirrorReport, MIRROR_RECORD};
pub use policy::ConflictPolicy;
pub use progress::{NoProgress, Progress};
pub use replicate::ReplicateReport;
pub use store::{
    writer_waiting, Access, GcPin, LockWait, OpenOptions, Store, StoreBackend, WaitNotice,
};
pub use version::{split_layer_spec, SpecBase, Version, VersionSpec};
