//! The qcow2 header: on-disk layout, constants and encode/decode.
//!
//! Spec: QEMU `docs/interop/qcow2.txt` ("Header", "Header extensions",
//! "Cluster mapping"). All numbers are big-endian.

/// "QFI\xfb".
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Length of the version 3 header we write: the 104 mandatory bytes, the
/// compression type byte and padding to a multiple of 8.
pub const V3_HEADER_LEN: usize = 112;

/// Incompatible feature bit 0: refcounts may be inconsistent.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: non-zlib compression.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;

/// L1/L2/refcount table entry: bits 9–55 hold a cluster-aligned offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry bit 63: refcount is exactly one ("copied").
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 standard descriptor bit 0: reads as zeros (version 3).
pub const ZERO: u64 = 1;
/// L2 standard descriptor: reserved bits 1–8 and 56–61.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Smallest cluster size accepted: 4 KiB. Smaller clusters make the tables
/// huge and are never produced by today's tools.
pub const MIN_CLUSTER_BITS: u32 = 12;
/// Largest cluster size accepted: 2 MiB (QEMU's own limit).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table accepted: 32 MiB (QEMU's limit), 4M entries.
pub const MAX_L1_ENTRIES: u64 = 4 * 1024 * 1024;
/// Largest refcount table accepted: 8 MiB (QEMU's limit).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;

/// A decoded qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes.
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Decodes a header from the image's first bytes (at least 112 or the
    /// whole file if shorter). Checks only what decoding needs; feature and
    /// range checks are in [`Header::check`].
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < V2_HEADER_LEN {
            return Err(format!(
                "file is {} bytes, shorter than a qcow2 header",
                b.len()
            ));
        }
        if be32(b, 0) != QCOW_MAGIC {
            return Err("not a qcow2 image (bad magic)".into());
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(format!("qcow2 version {version} (only 2 and 3 exist)"));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
        };
        if version == 3 {
            if b.len() < 104 {
                return Err("version 3 header cut short".into());
            }
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(format!("header length {} is invalid", h.header_length));
            }
            if h.header_length > 104 && b.len() > 104 {
                h.compression_type = b[104];
            }
        }
        Ok(h)
    }

    /// Refuses what Lamina cannot handle safely, with the reason.
    pub fn check(&self) -> Result<(), (bool, String)> {
        // (true, why): unsupported; (false, why): corrupt.
        let unsupported = |s: String| Err((true, s));
        let corrupt = |s: String| Err((false, s));
        if self.cluster_bits < MIN_CLUSTER_BITS {
            return unsupported(format!(
                "clusters of {} bytes (at least 4096 are supported)",
                1u64 << self.cluster_bits.min(63)
            ));
        }
        if self.cluster_bits > MAX_CLUSTER_BITS {
            return unsupported(format!("cluster bits {} (at most 21)", self.cluster_bits));
        }
        if self.crypt_method != 0 {
            return unsupported("encrypted image".into());
        }
        if self.nb_snapshots != 0 {
            return unsupported(format!("{} internal snapshots", self.nb_snapshots));
        }
        let f = self.incompatible_features;
        if f & INCOMPAT_CORRUPT != 0 {
            return corrupt("the image is marked corrupt".into());
        }
        if f & INCOMPAT_DATA_FILE != 0 {
            return unsupported("external data file".into());
        }
        if f & INCOMPAT_COMPRESSION != 0 || self.compression_type != 0 {
            return unsupported(format!(
                "compression type {} (only zlib is supported)",
                self.compression_type
            ));
        }
        if f & INCOMPAT_EXTL2 != 0 {
            return unsupported("extended L2 entries (subclusters)".into());
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if f & !known != 0 {
            return unsupported(format!("unknown incompatible features {:#x}", f & !known));
        }
        if self.refcount_order > 6 {
            return corrupt(format!("refcount order {}", self.refcount_order));
        }
        let cs = self.cluster_size();
        if !self.l1_table_offset.is_multiple_of(cs)
            || !self.refcount_table_offset.is_multiple_of(cs)
        {
            return corrupt("a table is not cluster aligned".into());
        }
        if u64::from(self.l1_size) > MAX_L1_ENTRIES {
            return corrupt(format!("L1 table of {} entries", self.l1_size));
        }
        let needed = self.size.div_ceil(cs).div_ceil(cs / 8);
        if u64::from(self.l1_size) < needed {
            return corrupt(format!(
                "L1 table of {} entries cannot map {} bytes",
                self.l1_size, self.size
            ));
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFCOUNT_TABLE_BYTES {
            return corrupt(format!(
                "refcount table of {} clusters",
                self.refcount_table_clusters
            ));
        }
        if self.backing_file_offset != 0 && self.backing_file_size > 1023 {
            return corrupt(format!(
                "backing file name of {} bytes",
                self.backing_file_size
            ));
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Encodes a version 3 header ([`V3_HEADER_LEN`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(V3_HEADER_LEN);
        b.extend_from_slice(&QCOW_MAGIC.to_be_bytes());
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        b.extend_from_slice(&self.incompatible_features.to_be_bytes());
        b.extend_from_slice(&self.compatible_features.to_be_bytes());
        b.extend_from_slice(&self.autoclear_features.to_be_bytes());
        b.extend_from_slice(&self.refcount_order.to_be_bytes());
        b.extend_from_slice(&(V3_HEADER_LEN as u32).to_be_bytes());
        b.push(self.compression_type);
        b.resize(V3_HEADER_LEN, 0);
        b
    }
}

/// Header extensions found after the header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format name ("raw", "qcow2"...).
    pub backing_format: Option<String>,
    /// Whether a bitmaps extension is present.
    pub bitmaps: bool,
}

/// Parses header extensions from `b` (the bytes after the header, up to the
/// end of the first cluster).
pub fn parse_extensions(b: &[u8]) -> Result<Extensions, String> {
    let mut ext = Extensions::default();
    let mut at = 0usize;
    while at + 8 <= b.len() {
        let kind = be32(b, at);
        let len = be32(b, at + 4) as usize;
        if kind == EXT_END {
            return Ok(ext);
        }
        let data = b
            .get(at + 8..at + 8 + len)
            .ok_or_else(|| format!("header extension {kind:#x} runs past the first cluster"))?;
        match kind {
            EXT_BACKING_FORMAT => {
                ext.backing_format = Some(String::from_utf8_lossy(data).into_owned())
            }
            EXT_BITMAPS => ext.bitmaps = true,
            _ => {}
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(ext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 10 << 30,
            crypt_method: 0,
            l1_size: 20,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression_type: 0,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        let b = h.encode();
        assert_eq!(b.len(), V3_HEADER_LEN);
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert!(h.check().is_ok());
    }

    #[test]
    fn unsafe_images_are_refused() {
        let mut h = sample();
        h.nb_snapshots = 1;
        assert!(h.check().unwrap_err().1.contains("snapshots"));
        let mut h = sample();
        h.incompatible_features = INCOMPAT_EXTL2;
        assert!(h.check().unwrap_err().1.contains("extended L2"));
        let mut h = sample();
        h.cluster_bits = 11;
        assert!(h.check().unwrap_err().1.contains("4096"));
        let mut h = sample();
        h.crypt_method = 2;
        assert!(h.check().unwrap_err().1.contains("encrypted"));
        let mut h = sample();
        h.compression_type = 1;
        h.incompatible_features = INCOMPAT_COMPRESSION;
        assert!(h.check().unwrap_err().1.contains("zlib"));
        let mut h = sample();
        h.l1_size = 1;
        assert!(!h.check().unwrap_err().0, "a short L1 table is corruption");
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(h) = Header::parse(&bytes) {
                let _ = h.check();
            }
            let _ = parse_extensions(&bytes);
        }
    }
}
