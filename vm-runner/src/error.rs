//! The crate's error type.

use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the VM runner. Each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A definition (template, disk, network policy) is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The QEMU binary for an architecture is not installed.
    #[error("{binary} not found on PATH (install it: apt-get install {package})")]
    QemuMissing {
        /// The binary looked for.
        binary: String,
        /// The Debian package that has it.
        package: String,
    },
    /// QEMU did not come up.
    #[error("VM {name}: QEMU did not start: {reason}")]
    StartFailed {
        /// The VM.
        name: String,
        /// What QEMU or the monitor said.
        reason: String,
    },
    /// The VM is not in a state that allows the operation.
    #[error("VM {name} is {state}: {hint}")]
    State {
        /// The VM.
        name: String,
        /// Its current state.
        state: String,
        /// What to do instead.
        hint: String,
    },
    /// QMP failed or answered with an error.
    #[error("QMP {sock}: {reason}")]
    Qmp {
        /// The QMP socket.
        sock: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An operation did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the error is the caller's input (exit code 2 at the command line).
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::Invalid(_) | Error::QemuMissing { .. })
    }
}

/// Attaches a path to I/O errors.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
