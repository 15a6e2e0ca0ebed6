//! Progress reporting hooks.
//!
//! Long operations (import, export, fsck) report through [`Progress`]; the
//! library never draws anything itself. The command line implements it with
//! a progress bar when stderr is a terminal.

/// Receives progress of a long operation. All methods default to doing
/// nothing; implementations must be cheap (they are called per chunk).
pub trait Progress: Send + Sync {
    /// A new phase starts; `total` is its size in bytes when known.
    fn phase(&self, _name: &str, _total: Option<u64>) {}
    /// `bytes` more bytes of the current phase are done.
    fn advance(&self, _bytes: u64) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
