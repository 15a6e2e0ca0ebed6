//! Chunks: cutting data into chunks, and sealing a chunk for storage.
//!
//! File data is cut by FastCDC (2020 variant) so that an insert in the middle
//! of a file only moves nearby cut points; disk images are cut at fixed
//! [`CLUSTER_SIZE`] boundaries so that a chunk lines up with a qcow2 cluster.
//! A chunk's id is always the BLAKE3 of its plain bytes; it is stored
//! zstd-compressed only when that is smaller.

use std::io::{self, Read};

use crate::error::{Error, Result};
use crate::id::ChunkId;

/// FastCDC minimum chunk size (bytes).
pub const CDC_MIN: usize = 16 * 1024;
/// FastCDC average chunk size (bytes).
pub const CDC_AVG: usize = 64 * 1024;
/// FastCDC maximum chunk size (bytes).
pub const CDC_MAX: usize = 256 * 1024;
/// Disk cluster size: the qcow2 default, so clusters and chunks line up.
pub const CLUSTER_SIZE: u32 = 64 * 1024;

/// Largest chunk the store accepts. Data chunks are at most [`CDC_MAX`]; the
/// limit exists for manifest nodes (a directory with ~500k entries) and
/// bounds what a corrupt record can make a reader allocate.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024 * 1024;

/// zstd level used for new chunks. Level 3 is zstd's default and what
/// restic's "auto" mode uses; it keeps two cores ahead of disk throughput.
pub const ZSTD_LEVEL: i32 = 3;

/// Read buffer of the CDC chunker. Must be at least [`CDC_MAX`]; larger means
/// fewer compactions of the leftover tail.
const CDC_BUFFER: usize = 4 * 1024 * 1024;

/// Cuts a byte stream into content-defined chunks.
///
/// Produces the same cut points as running FastCDC over the whole stream in
/// memory, while holding at most [`CDC_BUFFER`] bytes. It lends each chunk
/// out of its buffer, so a chunk that is already stored is never copied.
pub struct CdcChunker<R> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    mask_s: u64,
    mask_l: u64,
    offset: u64,
}

impl<R: Read> CdcChunker<R> {
    /// A chunker over `reader`.
    pub fn new(reader: R) -> Self {
        Self::with_buffer(reader, Vec::new())
    }

    /// A chunker over `reader` reusing `buf` (see [`CdcChunker::into_buffer`]),
    /// so chunking many small files does not allocate and clear a buffer
    /// for each.
    pub fn with_buffer(reader: R, mut buf: Vec<u8>) -> Self {
        if buf.len() < CDC_BUFFER {
            buf.resize(CDC_BUFFER, 0);
        }
        let (mask_s, mask_l) =
            fastcdc::v2020::select_masks(CDC_AVG, fastcdc::v2020::Normalization::Level1);
        Self {
            reader,
            buf,
            start: 0,
            end: 0,
            eof: false,
            mask_s,
            mask_l,
            offset: 0,
        }
    }

    /// Gives the buffer back for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// The next chunk and its offset in the stream, or `None` at the end.
    ///
    /// # Errors
    /// Read errors of the underlying reader.
    pub fn next_chunk(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        if self.end - self.start < CDC_MAX && !self.eof {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < self.buf.len() {
                match self.reader.read(&mut self.buf[self.end..]) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => self.end += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if self.start == self.end {
            return Ok(None);
        }
        let window = &self.buf[self.start..self.end];
        let (_, len) = fastcdc::v2020::cut(
            window,
            CDC_MIN,
            CDC_AVG,
            CDC_MAX,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        // `cut` returns a length in 1..=window.len() for a non-empty window.
        let len = len.clamp(1, window.len());
        let chunk_start = self.start;
        self.start += len;
        let offset = self.offset;
        self.offset += len as u64;
        Ok(Some((offset, &self.buf[chunk_start..chunk_start + len])))
    }
}

/// Whether every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-fold per block: the fold vectorises, the block loop exits early on
    // the first non-zero block (most data clusters fail in the first block).
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// How a stored chunk's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None,
    /// zstd frame.
    Zstd,
}

/// A chunk ready to be stored: its id, plain length and stored bytes.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    /// BLAKE3 of the plain bytes.
    pub id: ChunkId,
    /// Length of the plain bytes.
    pub plain_len: u32,
    /// Encoding of `data`.
    pub compression: Compression,
    /// Stored bytes.
    pub data: Vec<u8>,
}

/// Several consecutive chunks compressed together as one zstd frame.
#[derive(Debug, Clone)]
pub struct SealedFrame {
    /// Members in order: id and plain length.
    pub members: Vec<(ChunkId, u32)>,
    /// Plain bytes of all members.
    pub plain_len: u32,
    /// The zstd frame.
    pub data: Vec<u8>,
}

/// What a backend is given to store.
#[derive(Debug, Clone)]
pub enum Sealed {
    /// One chunk.
    Chunk(SealedChunk),
    /// Several chunks in one compressed frame.
    Frame(SealedFrame),
}

/// A frame is kept only if it is at most this fraction (in 1/100) of its
/// plain size; otherwise its members are sealed one by one. Frames cost a
/// larger decompression per random read, so they must pay for themselves.
const FRAME_KEEP_PERCENT: usize = 95;

/// Seals chunks; keeps a zstd context to reuse across calls (one per thread).
pub struct Sealer {
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Default for Sealer {
    fn default() -> Self {
        Self::new()
    }
}

impl Sealer {
    /// A sealer with a fresh zstd context.
    pub fn new() -> Self {
        // A context that fails to allocate just means chunks go uncompressed.
        Self {
            zstd: zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
        }
    }

    /// Seals `plain`, whose id the caller has computed already.
    pub fn seal(&mut self, id: ChunkId, plain: &[u8]) -> SealedChunk {
        let plain_len = plain.len() as u32;
        if let Some(z) = self.zstd.as_mut() {
            // Room for one byte less than the input: if zstd can't fit in it,
            // compression doesn't pay and the chunk is stored plain.
            let mut out = Vec::with_capacity(plain.len().saturating_sub(1));
            if let Ok(n) = z.compress_to_buffer(plain, &mut out) {
                if n < plain.len() {
                    return SealedChunk {
                        id,
                        plain_len,
                        compression: Compression::Zstd,
                        data: out,
                    };
                }
            }
        }
        SealedChunk {
            id,
            plain_len,
            compression: Compression::None,
            data: plain.to_vec(),
        }
    }
}

impl Sealer {
    /// Seals consecutive chunks: together as one frame when that saves at
    /// least 5 %, else each on its own.
    ///
    /// A frame that does not shrink below [`FRAME_SKIP_PERCENT`] of its
    /// plain size is incompressible as a whole (media, archives); its
    /// members are stored plain without compressing each of them again,
    /// which would cost a second zstd pass over the same bytes for at most
    /// 1 % of them saved.
    pub fn seal_many(&mut self, members: &[(ChunkId, Vec<u8>)]) -> Vec<Sealed> {
        if let [(id, data)] = members {
            return vec![Sealed::Chunk(self.seal(*id, data))];
        }
        let total: usize = members.iter().map(|(_, d)| d.len()).sum();
        let mut plain = Vec::with_capacity(total);
        for (_, d) in members {
            plain.extend_from_slice(d);
        }
        let Some(z) = self.zstd.as_mut() else {
            return members.iter().map(|(id, d)| plain_chunk(*id, d)).collect();
        };
        // Room for the plain size: a frame that does not fit did not shrink.
        let mut out = Vec::with_capacity(plain.len());
        let stored = z.compress_to_buffer(&plain, &mut out).ok();
        match stored {
            Some(n) if n * 100 <= plain.len() * FRAME_KEEP_PERCENT => {
                vec![Sealed::Frame(SealedFrame {
                    members: members
                        .iter()
                        .map(|(id, d)| (*id, d.len() as u32))
                        .collect(),
                    plain_len: plain.len() as u32,
                    data: out,
                })]
            }
            Some(n) if n * 100 < plain.len() * FRAME_SKIP_PERCENT => members
                .iter()
                .map(|(id, d)| Sealed::Chunk(self.seal(*id, d)))
                .collect(),
            _ => members.iter().map(|(id, d)| plain_chunk(*id, d)).collect(),
        }
    }
}

/// A frame at or above this fraction (in 1/100) of its plain size is
/// incompressible as a whole: its members are stored plain.
const FRAME_SKIP_PERCENT: usize = 99;

fn plain_chunk(id: ChunkId, data: &[u8]) -> Sealed {
    Sealed::Chunk(SealedChunk {
        id,
        plain_len: data.len() as u32,
        compression: Compression::None,
        data: data.to_vec(),
    })
}

/// Decompresses a frame's data to its `plain_len` bytes.
///
/// # Errors
/// A description of what is wrong (the caller knows which record it is).
pub fn unseal_frame(plain_len: u32, data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if plain_len as usize > MAX_CHUNK_BYTES {
        return Err(format!("frame plain length {plain_len} exceeds the limit"));
    }
    let mut out = Vec::with_capacity(plain_len as usize);
    zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress_to_buffer(data, &mut out))
        .map_err(|e| format!("zstd: {e}"))?;
    if out.len() != plain_len as usize {
        return Err(format!(
            "frame decompresses to {} bytes, expected {plain_len}",
            out.len()
        ));
    }
    Ok(out)
}

/// Seals `plain` with a one-off context (for small, rare chunks).
pub fn seal(plain: &[u8]) -> SealedChunk {
    Sealer::new().seal(ChunkId::of(plain), plain)
}

/// Decodes stored bytes back to plain bytes and checks them against `id`.
///
/// # Errors
/// [`Error::ChunkCorrupt`] when the bytes fail to decompress, have the wrong
/// length, or hash to another id.
pub fn unseal(
    id: ChunkId,
    plain_len: u32,
    compression: Compression,
    stored: Vec<u8>,
) -> Result<Vec<u8>> {
    let corrupt = |reason: String| Error::ChunkCorrupt { id, reason };
    if plain_len as usize > MAX_CHUNK_BYTES {
        return Err(corrupt(format!(
            "plain length {plain_len} exceeds the limit"
        )));
    }
    let plain = match compression {
        Compression::None => stored,
        Compression::Zstd => {
            let mut out = Vec::with_capacity(plain_len as usize);
            zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(&stored, &mut out))
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            out
        }
    };
    if plain.len() != plain_len as usize {
        return Err(corrupt(format!(
            "plain length is {} bytes, expected {plain_len}",
            plain.len()
        )));
    }
    let actual = ChunkId::of(&plain);
    if actual != id {
        return Err(corrupt(format!("content hashes to {actual}")));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn cut_all(data: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut c = CdcChunker::new(data);
        let mut out = Vec::new();
        while let Some((off, chunk)) = c.next_chunk().unwrap() {
            out.push((off, chunk.to_vec()));
        }
        out
    }

    #[test]
    fn same_cuts_as_in_memory_fastcdc() {
        let data = pseudo_random(9 * 1024 * 1024 + 123, 7);
        let ours: Vec<(u64, usize)> = cut_all(&data)
            .into_iter()
            .map(|(o, c)| (o, c.len()))
            .collect();
        let theirs: Vec<(u64, usize)> =
            fastcdc::v2020::FastCDC::new(&data, CDC_MIN, CDC_AVG, CDC_MAX)
                .map(|c| (c.offset as u64, c.length))
                .collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn insert_moves_only_nearby_chunks() {
        let data = pseudo_random(8 * 1024 * 1024, 3);
        let mut edited = data.clone();
        edited.splice(4_000_000..4_000_000, b"inserted bytes".iter().copied());
        let a: std::collections::HashSet<Vec<u8>> =
            cut_all(&data).into_iter().map(|(_, c)| c).collect();
        let b: Vec<Vec<u8>> = cut_all(&edited).into_iter().map(|(_, c)| c).collect();
        let new: usize = b.iter().filter(|c| !a.contains(*c)).map(|c| c.len()).sum();
        assert!(new <= 2 * CDC_MAX, "{new} bytes of new chunks");
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 65536]));
        assert!(is_zero(&[]));
        let mut v = vec![0u8; 65536];
        v[65535] = 1;
        assert!(!is_zero(&v));
        v[65535] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn seal_compresses_only_when_smaller() {
        let text = b"lamina ".repeat(10_000);
        let s = seal(&text);
        assert_eq!(s.compression, Compression::Zstd);
        assert!(s.data.len() < text.len());
        let random = pseudo_random(65536, 9);
        let s2 = seal(&random);
        assert_eq!(s2.compression, Compression::None);
        assert_eq!(s2.data, random);
    }

    #[test]
    fn unseal_detects_corruption() {
        let text = b"lamina ".repeat(1000);
        let s = seal(&text);
        let ok = unseal(s.id, s.plain_len, s.compression, s.data.clone()).unwrap();
        assert_eq!(ok, text);
        let mut bad = s.data.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        let err = unseal(s.id, s.plain_len, s.compression, bad).unwrap_err();
        assert!(err.to_string().contains(&s.id.to_hex()), "{err}");
    }

    #[test]
    fn frames_only_when_they_pay() {
        let mut s = Sealer::new();
        let text: Vec<(ChunkId, Vec<u8>)> = (0..4)
            .map(|i| {
                let d = format!("chunk {i} lamina text ").repeat(2000).into_bytes();
                (ChunkId::of(&d), d)
            })
            .collect();
        match s.seal_many(&text).as_slice() {
            [Sealed::Frame(f)] => {
                assert_eq!(f.members.len(), 4);
                let plain = unseal_frame(f.plain_len, &f.data).unwrap();
                let joined: Vec<u8> = text.iter().flat_map(|(_, d)| d.clone()).collect();
                assert_eq!(plain, joined);
            }
            other => panic!("expected one frame, got {other:?}"),
        }
        let random: Vec<(ChunkId, Vec<u8>)> = (0..3)
            .map(|i| {
                let d = pseudo_random(70_000, 100 * i + 1);
                (ChunkId::of(&d), d)
            })
            .collect();
        let sealed = s.seal_many(&random);
        assert_eq!(sealed.len(), 3);
        assert!(sealed
            .iter()
            .all(|x| matches!(x, Sealed::Chunk(c) if c.compression == Compression::None)));
    }

    #[test]
    fn mixed_frames_keep_their_compressible_members() {
        let mut s = Sealer::new();
        // Mostly random with one 2 % text member: the frame saves too
        // little to keep (above 95 %) but is not incompressible (below
        // 99 %), so members are sealed one by one and the text shrinks.
        let text = b"lamina text ".repeat(1333);
        let mut members: Vec<(ChunkId, Vec<u8>)> = (0..12)
            .map(|i| {
                let d = pseudo_random(65_536, 7 * i + 3);
                (ChunkId::of(&d), d)
            })
            .collect();
        members.push((ChunkId::of(&text), text.clone()));
        let sealed = s.seal_many(&members);
        assert_eq!(sealed.len(), members.len());
        for (x, (id, plain)) in sealed.iter().zip(&members) {
            let Sealed::Chunk(c) = x else {
                panic!("expected chunk records, got {x:?}")
            };
            assert_eq!(c.id, *id);
            let expect = if *plain == text {
                Compression::Zstd
            } else {
                Compression::None
            };
            assert_eq!(c.compression, expect);
            let back = unseal(c.id, c.plain_len, c.compression, c.data.clone()).unwrap();
            assert_eq!(&back, plain);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn chunks_concatenate_to_input(len in 0usize..1_500_000, seed in any::<u64>()) {
            let data = pseudo_random(len, seed);
            let chunks = cut_all(&data);
            let mut joined = Vec::with_capacity(len);
            let mut expect_off = 0u64;
            for (off, c) in &chunks {
                prop_assert_eq!(*off, expect_off);
                prop_assert!(c.len() <= CDC_MAX);
                expect_off += c.len() as u64;
                joined.extend_from_slice(c);
            }
            prop_assert_eq!(joined, data);
        }

        #[test]
        fn seal_round_trips(data in proptest::collection::vec(0u8..4, 0..100_000)) {
            let s = seal(&data);
            let back = unseal(s.id, s.plain_len, s.compression, s.data).unwrap();
            prop_assert_eq!(back, data);
        }
    }
}
