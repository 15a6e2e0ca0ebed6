//! Column families of the catalog and how their keys are laid out.
//!
//! | column family | key                              | value                      |
//! |---------------|----------------------------------|----------------------------|
//! | `layers`      | layer name (UTF-8)               | [`crate::Layer`] (postcard)|
//! | `versions`    | version id (32 bytes)            | encoded [`crate::Version`] |
//! | `refs`        | ref name (UTF-8)                 | version id (32 bytes)      |
//! | `reflog`      | ref name, 0x00, seq (u64 BE)     | reflog entry (postcard)    |
//! | `chunks`      | chunk id (32 bytes)              | index entry (fixed 25 B)   |
//! | `packs`       | pack id (u64 BE)                 | committed length (u64 BE)  |
//! | `filecache`   | layer id (16 bytes), path bytes  | import cache entry         |
//! | `records`     | kind, 0x00, name                 | other crates' records      |
//! | `meta`        | name (UTF-8)                     | value                      |

/// Layers by name.
pub const CF_LAYERS: &str = "layers";
/// Versions by id.
pub const CF_VERSIONS: &str = "versions";
/// Refs by name.
pub const CF_REFS: &str = "refs";
/// Ref update journal.
pub const CF_REFLOG: &str = "reflog";
/// Chunk index of the local backend.
pub const CF_CHUNKS: &str = "chunks";
/// Pack files of the local backend.
pub const CF_PACKS: &str = "packs";
/// Import cache: unchanged source files are not read again.
pub const CF_FILECACHE: &str = "filecache";
/// Named records other crates keep in the catalog (e.g. disks).
pub const CF_RECORDS: &str = "records";
/// Miscellaneous store-wide values.
pub const CF_META: &str = "meta";

/// Every column family, in creation order.
pub const ALL_CFS: &[&str] = &[
    CF_LAYERS,
    CF_VERSIONS,
    CF_REFS,
    CF_REFLOG,
    CF_CHUNKS,
    CF_PACKS,
    CF_FILECACHE,
    CF_RECORDS,
    CF_META,
];

/// Name of the ref holding a layer's head.
pub fn layer_ref(layer: &str) -> String {
    format!("layer/{layer}")
}

/// Reflog key of entry `seq` of `name`.
pub fn reflog_key(name: &str, seq: u64) -> Vec<u8> {
    let mut k = reflog_prefix(name);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Prefix of every reflog key of `name`.
pub fn reflog_prefix(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k
}

/// Smallest key greater than every key starting with `prefix`, or `None` if
/// there is none (prefix all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_orders_after_prefix() {
        assert_eq!(prefix_end(b"ab").unwrap(), b"ac");
        assert_eq!(prefix_end(&[1, 0xff]).unwrap(), vec![2]);
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        let k = reflog_key("layer/a", 7);
        assert!(k.as_slice() < prefix_end(&reflog_prefix("layer/a")).unwrap().as_slice());
    }
}
