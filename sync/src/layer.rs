//! Layers: named, versioned units of content with a kind and a format.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::LayerId;

/// Where a layer sits in a composition, bottom to top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LayerKind {
    /// Golden operating system.
    Os,
    /// Group or company applications.
    Group,
    /// A user's own applications.
    Personal,
    /// A user's redirected system data (profile, settings).
    System,
    /// A user's documents.
    Data,
}

impl LayerKind {
    /// Every kind, bottom to top.
    pub const ALL: [LayerKind; 5] = [
        LayerKind::Os,
        LayerKind::Group,
        LayerKind::Personal,
        LayerKind::System,
        LayerKind::Data,
    ];

    /// Lower-case name as used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Os => "os",
            LayerKind::Group => "group",
            LayerKind::Personal => "personal",
            LayerKind::System => "system",
            LayerKind::Data => "data",
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LayerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        LayerKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown layer kind `{s}` (expected os, group, personal, system or data)"
                ))
            })
    }
}

/// What a layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LayerFormat {
    /// A file tree.
    Tree,
    /// A virtual block device.
    Disk,
}

impl LayerFormat {
    /// Lower-case name as used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerFormat::Tree => "tree",
            LayerFormat::Disk => "disk",
        }
    }
}

impl fmt::Display for LayerFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LayerFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tree" => Ok(LayerFormat::Tree),
            "disk" => Ok(LayerFormat::Disk),
            _ => Err(Error::InvalidInput(format!(
                "unknown layer format `{s}` (expected tree or disk)"
            ))),
        }
    }
}

/// A layer as recorded in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Identity, fixed at creation.
    pub id: LayerId,
    /// Name, e.g. `os/debian12` or `user/alice/data`.
    pub name: String,
    /// Kind.
    pub kind: LayerKind,
    /// Format.
    pub format: LayerFormat,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: i64,
}

/// Longest layer name accepted.
pub const LAYER_NAME_MAX: usize = 200;

/// Checks a layer name: 1–200 characters of `A-Z a-z 0-9 . _ - /`, made of
/// `/`-separated parts that are neither empty nor `.`/`..`.
///
/// # Errors
/// [`Error::InvalidName`] saying what is wrong.
pub fn check_layer_name(name: &str) -> Result<()> {
    let bad = |reason| Error::InvalidName {
        what: "layer name",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > LAYER_NAME_MAX {
        return Err(bad("longer than 200 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return Err(bad(
            "only letters, digits, '.', '_', '-' and '/' are allowed",
        ));
    }
    if name
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(bad(
            "parts between '/' must be non-empty and not '.' or '..'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["os", "os/debian12", "user/alice/data", "a.b-c_d"] {
            check_layer_name(ok).unwrap();
        }
        for bad in [
            "", "/os", "os/", "a//b", "a/../b", "a@b", "a b", ".", "x/./y",
        ] {
            assert!(check_layer_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kinds_parse() {
        for k in LayerKind::ALL {
            assert_eq!(k.as_str().parse::<LayerKind>().unwrap(), k);
        }
        assert!("nope".parse::<LayerKind>().is_err());
        assert_eq!("disk".parse::<LayerFormat>().unwrap(), LayerFormat::Disk);
    }
}
