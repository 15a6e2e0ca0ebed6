//! The crate's error type.
//!
//! Policy: every public function returns [`Error`]. Each variant names what
//! failed and carries what an operator needs to act on it (path, layer,
//! version, chunk, pack, offset); the underlying cause sits under `#[source]`
//! and is not repeated in the message. Callers that must branch use
//! [`Error::kind`], which is small and stable; the CLI maps kinds to exit
//! codes and JSON.

use std::io;
use std::path::PathBuf;

use crate::id::{ChunkId, ManifestId, PackId, VersionId};

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Broad class of an [`Error`], for callers that must branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Something named does not exist (layer, version, path, store).
    NotFound,
    /// Something to be created already exists.
    AlreadyExists,
    /// The request itself is malformed (bad name, bad version spec).
    InvalidInput,
    /// Stored data failed verification.
    Corrupt,
    /// Another process holds the store.
    Locked,
    /// A compare-and-swap lost a race.
    Conflict,
    /// An operating-system or database failure.
    Io,
    /// The input is valid but uses something Lamina cannot store.
    Unsupported,
    /// A remote server could not be reached, or the connection broke.
    Unreachable,
    /// A remote server did not accept the credentials or the access.
    Denied,
}

impl ErrorKind {
    /// Stable lower-case name, used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InvalidInput => "invalid-input",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Locked => "locked",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Io => "io",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Denied => "denied",
        }
    }
}

/// Errors of the layer store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `lamina init` on a directory that already holds a store.
    #[error("{path}: already a Lamina store")]
    AlreadyStore {
        /// Store directory.
        path: PathBuf,
    },
    /// A chunk failed to decode or verify.
    #[error("chunk {id}: {reason}")]
    ChunkCorrupt {
        /// The chunk.
        id: ChunkId,
        /// What was wrong.
        reason: String,
    },
    /// A chunk referenced by a manifest is not in the store.
    #[error("chunk {id} is missing from the store")]
    ChunkMissing {
        /// The chunk.
        id: ChunkId,
    },
    /// A librados call failed (the cluster down or unreachable, a missing
    /// pool, a full cluster).
    #[error("RADOS pool {pool}")]
    Rados {
        /// The pool.
        pool: String,
        /// Cause.
        #[source]
        source: crate::rados::RadosError,
    },
    /// A RocksDB operation failed.
    #[error("catalog {path}: {op}")]
    Db {
        /// Catalog directory.
        path: PathBuf,
        /// What was being done.
        op: String,
        /// Cause.
        #[source]
        source: rocksdb::Error,
    },
    /// A catalog record failed to decode.
    #[error("catalog record {what} is corrupt: {reason}")]
    RecordCorrupt {
        /// Which record (column family and key).
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// Export destination exists and is not an empty directory.
    #[error("{path}: destination exists{}", if *.is_dir { " and is not empty" } else { "" })]
    DestinationExists {
        /// Destination.
        path: PathBuf,
        /// Whether it is a (non-empty) directory.
        is_dir: bool,
    },
    /// An I/O operation on a path failed.
    #[error("{path}: {op}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A name (layer, ref) is not acceptable.
    #[error("invalid {what} `{name}`: {reason}")]
    InvalidName {
        /// What kind of name.
        what: &'static str,
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A request argument is not acceptable.
    #[error("{0}")]
    InvalidInput(String),
    /// The layer exists already.
    #[error("layer `{name}` already exists")]
    LayerExists {
        /// Layer name.
        name: String,
    },
    /// Import/export given the wrong kind of path for the layer's format.
    #[error("layer `{name}` is a {format} layer: {reason}")]
    LayerFormat {
        /// Layer name.
        name: String,
        /// Layer's format.
        format: &'static str,
        /// What did not fit.
        reason: String,
    },
    /// No layer with that name.
    #[error("no layer named `{name}`")]
    LayerNotFound {
        /// Layer name.
        name: String,
    },
    /// The store is held by another process.
    #[error("store {path} is locked by {holder}")]
    Locked {
        /// Store directory.
        path: PathBuf,
        /// Who holds it (pid and command), as recorded in the lock file.
        holder: String,
    },
    /// A manifest node failed to decode or verify.
    #[error("manifest {id}: {reason}")]
    ManifestCorrupt {
        /// The node.
        id: ManifestId,
        /// What was wrong.
        reason: String,
    },
    /// The directory exists but is not a store.
    #[error("{path} is not a Lamina store (run `lamina init` first)")]
    NotAStore {
        /// Directory.
        path: PathBuf,
    },
    /// A pack file is malformed.
    #[error("pack {pack} at offset {offset}: {reason}")]
    PackCorrupt {
        /// The pack.
        pack: PackId,
        /// Byte offset in the pack.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// A pack file is shorter than its index says.
    #[error("pack {pack} is truncated: chunk {chunk} needs bytes {offset}..{end} but the file has {size}")]
    PackTruncated {
        /// The pack.
        pack: PackId,
        /// Chunk that cannot be read.
        chunk: ChunkId,
        /// Start of the record.
        offset: u64,
        /// End of the record.
        end: u64,
        /// Actual file size.
        size: u64,
    },
    /// A ref moved between read and compare-and-swap.
    #[error("ref `{name}` moved: expected {expected}, found {found}")]
    RefConflict {
        /// Ref name.
        name: String,
        /// Expected target.
        expected: String,
        /// Actual target.
        found: String,
    },
    /// A remote server refused or failed a request.
    #[error("remote {remote}: {message}")]
    RemoteRefused {
        /// Remote name (or URL).
        remote: String,
        /// HTTP status.
        status: u16,
        /// The server's error kind.
        kind: String,
        /// The server's message.
        message: String,
    },
    /// An `os` or `group` version without a valid signature from a key
    /// its remote is trusted for.
    #[error("layer `{layer}` (from remote {remote}): {reason}; refused")]
    Unsigned {
        /// Layer name.
        layer: String,
        /// The remote whose keys it was checked against.
        remote: String,
        /// What is wrong, naming the version and the key.
        reason: String,
    },
    /// A layer whose subscription ended (and its grace with it) since the
    /// last sync with its remote.
    #[error("the subscription to layer `{layer}` from remote {remote} ended on {until} (grace {grace_secs} s): sync with {remote} to renew it")]
    SubscriptionEnded {
        /// Layer name.
        layer: String,
        /// The remote.
        remote: String,
        /// When it ended, RFC 3339.
        until: String,
        /// The grace the admin gave, seconds.
        grace_secs: u64,
    },
    /// A remote server could not be reached, or the connection broke.
    #[error("remote {remote}: {reason}")]
    RemoteUnreachable {
        /// Remote name (or URL).
        remote: String,
        /// What went wrong, one line.
        reason: String,
    },
    /// A source path cannot be imported.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A version spec matches several versions.
    #[error("version `{spec}` of layer `{layer}` is ambiguous: {}", .candidates.join(", "))]
    VersionAmbiguous {
        /// Layer name.
        layer: String,
        /// The spec given.
        spec: String,
        /// Matching ids (short form).
        candidates: Vec<String>,
    },
    /// A version record failed to decode or verify.
    #[error("version {id}: {reason}")]
    VersionCorrupt {
        /// The version.
        id: VersionId,
        /// What was wrong.
        reason: String,
    },
    /// A version spec matches nothing.
    #[error("layer `{layer}` has no version `{spec}`")]
    VersionNotFound {
        /// Layer name.
        layer: String,
        /// The spec given.
        spec: String,
    },
}

impl Error {
    /// Broad class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::AlreadyStore { .. } | Error::LayerExists { .. } => ErrorKind::AlreadyExists,
            Error::DestinationExists { .. } => ErrorKind::AlreadyExists,
            Error::ChunkCorrupt { .. }
            | Error::ChunkMissing { .. }
            | Error::ManifestCorrupt { .. }
            | Error::PackCorrupt { .. }
            | Error::PackTruncated { .. }
            | Error::RecordCorrupt { .. }
            | Error::VersionCorrupt { .. } => ErrorKind::Corrupt,
            Error::Db { .. } | Error::Rados { .. } => ErrorKind::Io,
            Error::Io { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
                _ => ErrorKind::Io,
            },
            Error::InvalidName { .. } | Error::InvalidInput(_) | Error::LayerFormat { .. } => {
                ErrorKind::InvalidInput
            }
            Error::VersionAmbiguous { .. } => ErrorKind::InvalidInput,
            Error::LayerNotFound { .. } | Error::NotAStore { .. } => ErrorKind::NotFound,
            Error::VersionNotFound { .. } => ErrorKind::NotFound,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::RefConflict { .. } => ErrorKind::Conflict,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::RemoteUnreachable { .. } => ErrorKind::Unreachable,
            Error::Unsigned { .. } | Error::SubscriptionEnded { .. } => ErrorKind::Denied,
            Error::RemoteRefused { status, .. } => match status {
                401 | 403 => ErrorKind::Denied,
                404 => ErrorKind::NotFound,
                409 => ErrorKind::Conflict,
                400 | 413 | 422 => ErrorKind::InvalidInput,
                _ => ErrorKind::Io,
            },
        }
    }

    /// Shorthand for an [`Error::Io`] on `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// Adds a path and operation to an `io::Result`.
pub(crate) trait IoContext<T> {
    /// Wraps the error as [`Error::Io`].
    fn ctx(self, path: impl Into<PathBuf>, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: impl Into<PathBuf>, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::io(path, op, e))
    }
}
