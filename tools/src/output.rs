//! How results and errors reach the user: text or one JSON document.

use std::io::{IsTerminal, Write};

use serde::Serialize;

/// A usage error found after parsing (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Something named on the command line does not exist (exit code 1, JSON
/// kind `not-found`).
#[derive(Debug)]
pub struct NotFound(pub String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotFound {}

/// Output settings of this run.
pub struct Out {
    /// JSON mode.
    pub json: bool,
    /// No progress or summaries.
    pub quiet: bool,
}

impl Out {
    pub fn new(json: bool, quiet: bool) -> Self {
        Self { json, quiet }
    }

    /// Whether progress bars may be drawn.
    pub fn progress_allowed(&self) -> bool {
        !self.json && !self.quiet && std::io::stderr().is_terminal()
    }

    /// Prints the command's result: `doc` as JSON, or `text` lines.
    pub fn result<T: Serialize>(
        &self,
        doc: &T,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        let r = if self.json {
            serde_json::to_writer(&mut stdout, doc)
                .map_err(std::io::Error::other)
                .and_then(|()| writeln!(stdout))
        } else {
            let t = text();
            if t.is_empty() {
                Ok(())
            } else if t.ends_with('\n') {
                write!(stdout, "{t}")
            } else {
                writeln!(stdout, "{t}")
            }
        };
        match r {
            // A closed pipe (`lamina layer ls | head`) is not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => Ok(other?),
        }
    }

    /// A diagnostic line on stderr (suppressed by --quiet and --json).
    pub fn note(&self, msg: &str) {
        if !self.quiet && !self.json {
            eprintln!("{msg}");
        }
    }

    /// A closing summary on stderr, only for a person at a terminal (like
    /// the progress bar it replaces).
    pub fn summary(&self, msg: &str) {
        if self.progress_allowed() {
            eprintln!("{msg}");
        }
    }

    /// Reports a failure: one line on stderr, and the JSON error document.
    pub fn error(&self, e: &anyhow::Error) {
        eprintln!("error: {e:#}");
        if self.json {
            let kind = error_kind(e);
            let doc = serde_json::json!({"error": {"kind": kind, "message": format!("{e:#}")}});
            println!("{doc}");
        }
    }
}

/// Stable kind of an error, for the JSON error document.
pub(crate) fn error_kind(e: &anyhow::Error) -> &'static str {
    if let Some(s) = e.downcast_ref::<lamina_sync::Error>() {
        return s.kind().as_str();
    }
    if let Some(n) = e.downcast_ref::<lamina_nbd::Error>() {
        return match n {
            lamina_nbd::Error::Store(s) => s.kind().as_str(),
            lamina_nbd::Error::DiskNotFound(_) => "not-found",
            lamina_nbd::Error::DiskExists(_) => "already-exists",
            lamina_nbd::Error::DiskBusy { .. } => "locked",
            lamina_nbd::Error::InvalidInput(_) | lamina_nbd::Error::OutOfRange { .. } => {
                "invalid-input"
            }
            lamina_nbd::Error::Unsupported { .. } => "unsupported",
            lamina_nbd::Error::Corrupt { .. } => "corrupt",
            _ => "io",
        };
    }
    if let Some(f) = e.downcast_ref::<lamina_fs::Error>() {
        return match f {
            lamina_fs::Error::Store(s) => s.kind().as_str(),
            lamina_fs::Error::NotFound { .. } | lamina_fs::Error::NotMounted { .. } => "not-found",
            lamina_fs::Error::Exists { .. } => "already-exists",
            lamina_fs::Error::Mounted { .. } => "locked",
            lamina_fs::Error::Invalid(_)
            | lamina_fs::Error::Rules { .. }
            | lamina_fs::Error::MountPoint { .. } => "invalid-input",
            _ => "io",
        };
    }
    if e.downcast_ref::<UsageError>().is_some() {
        "invalid-input"
    } else if e.downcast_ref::<NotFound>().is_some() {
        "not-found"
    } else {
        "error"
    }
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, UsageError> {
    let bad = || {
        UsageError(format!(
            "bad size `{s}`: expected bytes or a number with K, M, G or T"
        ))
    };
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// Bytes in a human unit.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// RFC 3339 UTC time of nanoseconds since the epoch.
pub fn time(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
