//! Identities: one newtype per kind of id, so a chunk id can never be passed
//! where a version id is expected.
//!
//! Content ids ([`ChunkId`], [`ManifestId`], [`VersionId`]) are BLAKE3 hashes
//! (32 bytes) of the bytes they name. [`LayerId`] is random (a layer's
//! identity must survive renames), [`PackId`] is random too (packs are
//! created by whichever process writes, without coordination).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a content id in bytes.
pub const HASH_LEN: usize = 32;

/// Number of hex digits printed by `short()` forms.
pub const SHORT_HEX: usize = 12;

/// Error parsing an id from hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a {what}: {reason}")]
pub struct ParseIdError {
    text: String,
    what: &'static str,
    reason: &'static str,
}

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; HASH_LEN]);

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; HASH_LEN]>::deserialize(d).map(Self)
                }
            }
        }

        impl $name {
            /// The id of `bytes`: their BLAKE3 hash.
            pub fn of(bytes: &[u8]) -> Self {
                Self(*blake3::hash(bytes).as_bytes())
            }

            /// Raw bytes of the id.
            pub fn as_bytes(&self) -> &[u8; HASH_LEN] {
                &self.0
            }

            /// Full lower-case hex form.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Short hex prefix for human output.
            pub fn short(&self) -> String {
                let mut s = self.to_hex();
                s.truncate(SHORT_HEX);
                s
            }

            /// Parses raw bytes (e.g. a RocksDB key).
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; HASH_LEN]>::try_from(bytes).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = |reason| ParseIdError { text: s.to_owned(), what: $what, reason };
                if s.len() != HASH_LEN * 2 {
                    return Err(err("expected 64 hex digits"));
                }
                let mut out = [0u8; HASH_LEN];
                hex::decode_to_slice(s, &mut out).map_err(|_| err("not hex"))?;
                Ok(Self(out))
            }
        }
    };
}

hash_id!(
    /// Id of a chunk: BLAKE3 of its plain (uncompressed) bytes.
    ChunkId,
    "chunk id"
);
hash_id!(
    /// Id of a manifest node: BLAKE3 of its canonical encoding. Manifest
    /// nodes are stored as chunks, so a `ManifestId` is also a [`ChunkId`].
    ManifestId,
    "manifest id"
);
hash_id!(
    /// Id of a version: BLAKE3 of its canonical encoding (like a commit id).
    VersionId,
    "version id"
);

impl ManifestId {
    /// The chunk holding this manifest node.
    pub fn chunk(&self) -> ChunkId {
        ChunkId(self.0)
    }
}

/// Identity of a layer; random, fixed at creation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub [u8; 16]);

impl<'de> Deserialize<'de> for LayerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            let mut out = [0u8; 16];
            hex::decode_to_slice(&s, &mut out)
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a layer id")))?;
            Ok(Self(out))
        } else {
            <[u8; 16]>::deserialize(d).map(Self)
        }
    }
}

impl Serialize for LayerId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(s)
        }
    }
}

impl LayerId {
    /// A new random layer id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayerId({})", self.to_hex())
    }
}

/// Identity of a pack file in the local backend.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub u64);

impl PackId {
    /// A new random pack id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"hello");
        let parsed: ChunkId = id.to_hex().parse().unwrap();
        assert_eq!(id, parsed);
        assert_eq!(id.short().len(), SHORT_HEX);
        assert!(id.to_hex().starts_with(&id.short()));
    }

    #[test]
    fn bad_hex_is_rejected() {
        assert!("abc".parse::<ChunkId>().is_err());
        assert!("zz".repeat(32).parse::<VersionId>().is_err());
    }
}
