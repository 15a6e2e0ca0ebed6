//! The crate's error type.
//!
//! Public functions (composition management, mount, commit, status) return
//! [`Error`], whose variants name what was wrong. Inside a running mount,
//! file system operations answer with an errno instead (see `view`).

use std::io;
use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the file view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No composition has this name.
    #[error("no composition named {name:?}")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// A composition with this name exists already.
    #[error("a composition named {name:?} exists already")]
    Exists {
        /// The name.
        name: String,
    },
    /// A composition definition is wrong (layers, kinds, names, mode).
    #[error("{0}")]
    Invalid(String),
    /// A rules file is wrong.
    #[error("rules file {file}, line {line}: {reason}")]
    Rules {
        /// The rules file as given.
        file: String,
        /// 1-based line of the offending rule or syntax error.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The composition is mounted, so the operation must wait for unmount.
    #[error("composition {name:?} is mounted at {dir} (pid {pid}); {hint}")]
    Mounted {
        /// Composition.
        name: String,
        /// Where.
        dir: PathBuf,
        /// Daemon process.
        pid: u32,
        /// What to do.
        hint: &'static str,
    },
    /// A mount point cannot be used.
    #[error("mount point {path}: {reason}")]
    MountPoint {
        /// The directory.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// Nothing Lamina mounted is at this directory.
    #[error("{path} is not a Lamina mount")]
    NotMounted {
        /// The directory.
        path: PathBuf,
    },
    /// An upper directory holds something this version cannot read.
    #[error("{path}: {reason}")]
    Upper {
        /// The entry.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An I/O operation failed.
    #[error("{path}: {op}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The mount daemon could not do what it was asked.
    #[error("{0}")]
    Daemon(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] lamina_sync::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// Adds a path and an operation to I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: impl Into<PathBuf>, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: impl Into<PathBuf>, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::io(path, op, e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, path: impl Into<PathBuf>, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::io(path, op, e.into()))
    }
}
