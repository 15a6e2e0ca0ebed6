//! Versions: immutable snapshots of a layer, and how users name them.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{LayerId, ManifestId, VersionId};

/// Magic prefix of an encoded version.
const VERSION_MAGIC: [u8; 4] = *b"LMV1";

/// One immutable snapshot of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The layer it belongs to.
    pub layer: LayerId,
    /// Parent versions: none for the first, two for a merge.
    pub parents: Vec<VersionId>,
    /// Creation time, nanoseconds since the epoch.
    pub time_ns: i64,
    /// Who made it.
    pub author: String,
    /// Description.
    pub message: String,
    /// Root manifest node.
    pub root: ManifestId,
}

impl Version {
    /// Canonical bytes and the id they hash to.
    pub fn encode(&self) -> (VersionId, Vec<u8>) {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&VERSION_MAGIC);
        // Serialising into a Vec cannot fail (see `Node::encode`).
        #[allow(clippy::expect_used)]
        let out = postcard::to_extend(self, out).expect("postcard serialises into a Vec");
        (VersionId::of(&out), out)
    }

    /// Decodes a version stored under `id`, checking the id.
    ///
    /// # Errors
    /// [`Error::VersionCorrupt`].
    pub fn decode(id: VersionId, bytes: &[u8]) -> Result<Version> {
        let corrupt = |reason: String| Error::VersionCorrupt { id, reason };
        if VersionId::of(bytes) != id {
            return Err(corrupt("content does not match its id".into()));
        }
        let body = bytes
            .strip_prefix(&VERSION_MAGIC)
            .ok_or_else(|| corrupt("bad magic".into()))?;
        postcard::from_bytes(body).map_err(|e| corrupt(format!("decode: {e}")))
    }
}

/// How a user names a version of a layer: `head`, `head~N`, `head^`, or a
/// hex id prefix, each optionally followed by `~N` / `^`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionSpec {
    /// Where to start.
    pub base: SpecBase,
    /// How many first parents to walk back.
    pub back: u32,
}

/// Starting point of a [`VersionSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecBase {
    /// The layer's head.
    Head,
    /// A version whose hex id starts with this (lower-case) prefix.
    Prefix(String),
}

/// Shortest id prefix accepted.
pub const MIN_PREFIX: usize = 4;

impl VersionSpec {
    /// Parses a spec.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the spec.
    pub fn parse(spec: &str) -> Result<VersionSpec> {
        let bad = |why: &str| Error::InvalidInput(format!("bad version `{spec}`: {why}"));
        let cut = spec.find(['~', '^']).unwrap_or(spec.len());
        let (base, mut suffix) = spec.split_at(cut);
        let base = if base == "head" || base == "HEAD" {
            SpecBase::Head
        } else {
            let lower = base.to_ascii_lowercase();
            if lower.len() < MIN_PREFIX || lower.len() > 64 {
                return Err(bad("expected `head` or 4 to 64 hex digits of a version id"));
            }
            if !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("expected `head` or hex digits of a version id"));
            }
            SpecBase::Prefix(lower)
        };
        let mut back = 0u32;
        while !suffix.is_empty() {
            if let Some(rest) = suffix.strip_prefix('^') {
                back = back.checked_add(1).ok_or_else(|| bad("too far back"))?;
                suffix = rest;
            } else if let Some(rest) = suffix.strip_prefix('~') {
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                let n = if digits == 0 {
                    1
                } else {
                    rest[..digits]
                        .parse::<u32>()
                        .map_err(|_| bad("bad number"))?
                };
                back = back.checked_add(n).ok_or_else(|| bad("too far back"))?;
                suffix = &rest[digits..];
            } else {
                return Err(bad("expected `~N` or `^` after the base"));
            }
        }
        Ok(VersionSpec { base, back })
    }
}

/// Splits `NAME[@SPEC]` at the last `@` (layer names cannot contain `@`).
pub fn split_layer_spec(s: &str) -> (&str, Option<&str>) {
    match s.rsplit_once('@') {
        Some((name, spec)) => (name, Some(spec)),
        None => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let head = |back| VersionSpec {
            base: SpecBase::Head,
            back,
        };
        assert_eq!(VersionSpec::parse("head").unwrap(), head(0));
        assert_eq!(VersionSpec::parse("head~3").unwrap(), head(3));
        assert_eq!(VersionSpec::parse("head^^").unwrap(), head(2));
        assert_eq!(VersionSpec::parse("head~").unwrap(), head(1));
        assert_eq!(VersionSpec::parse("head~2^").unwrap(), head(3));
        let p = VersionSpec::parse("ABCDEF~1").unwrap();
        assert_eq!(p.base, SpecBase::Prefix("abcdef".into()));
        assert_eq!(p.back, 1);
        for bad in ["", "abc", "xyz1", "head~x", "head~99999999999", "head!"] {
            assert!(VersionSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layer_spec_split() {
        assert_eq!(split_layer_spec("os/a@head~1"), ("os/a", Some("head~1")));
        assert_eq!(split_layer_spec("os/a"), ("os/a", None));
    }

    #[test]
    fn version_round_trip_and_id_check() {
        let v = Version {
            layer: LayerId([1; 16]),
            parents: vec![VersionId([2; 32])],
            time_ns: 123,
            author: "a".into(),
            message: "m".into(),
            root: ManifestId([3; 32]),
        };
        let (id, bytes) = v.encode();
        assert_eq!(Version::decode(id, &bytes).unwrap(), v);
        assert!(Version::decode(VersionId([0; 32]), &bytes).is_err());
    }
}
