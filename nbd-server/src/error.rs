//! The crate's error type.
//!
//! Every public function returns [`Error`]. Variants name what failed (image
//! path and offset, export, disk). [`Error::nbd_errno`] maps an error to the
//! NBD error value sent to a client; that mapping is the only place where
//! errors turn into protocol answers.

use std::io;
use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the disk view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image uses a qcow2 feature Lamina does not handle safely.
    #[error("{path}: unsupported qcow2 image: {reason}")]
    Unsupported {
        /// Image file.
        path: PathBuf,
        /// Which feature.
        reason: String,
    },
    /// An image's metadata is malformed.
    #[error("{path}: corrupt qcow2 image: {reason}")]
    Corrupt {
        /// Image file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An I/O operation failed.
    #[error("{path}: {op}")]
    Io {
        /// File.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A request falls outside the device.
    #[error("request at offset {offset} for {len} bytes exceeds the size {size}")]
    OutOfRange {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A write to something read-only.
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// A fast zero request that would not be fast.
    #[error("zeroing this range would not be faster than writing zeros")]
    NotFast,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] lamina_sync::Error),
    /// A disk named on the command line or by a client does not exist.
    #[error("no disk named `{0}`")]
    DiskNotFound(String),
    /// A disk to be created exists.
    #[error("disk `{0}` already exists")]
    DiskExists(String),
    /// A disk is held by another process.
    #[error("disk `{name}` is in use by {holder}")]
    DiskBusy {
        /// Disk.
        name: String,
        /// Holder note.
        holder: String,
    },
    /// The process serving a disk could not commit it.
    #[error("the process serving disk `{name}` could not commit it: {reason}")]
    Served {
        /// Disk.
        name: String,
        /// Its answer.
        reason: String,
    },
    /// A request or argument is not acceptable.
    #[error("{0}")]
    InvalidInput(String),
    /// TLS configuration or handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
}

/// NBD error values (NetworkBlockDevice/nbd doc/proto.md, "Error values").
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    /// The NBD error value for this error.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Error::OutOfRange { .. } | Error::InvalidInput(_) => errno::EINVAL,
            Error::ReadOnly(_) => errno::EPERM,
            Error::NotFast => errno::ENOTSUP,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => errno::ENOSPC,
                Some(libc::ENOMEM) => errno::ENOMEM,
                _ => errno::EIO,
            },
            _ => errno::EIO,
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
