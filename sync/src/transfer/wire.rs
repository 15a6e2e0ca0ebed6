//! Bytes on the wire between stores: chunk records, id lists and bit sets.
//!
//! A **record stream** is a concatenation of chunk and frame records in the
//! pack-file encoding (see `backend::pack`): a record travels exactly as it
//! is stored, already compressed, and the receiver parses it with the same
//! bounded parsers a pack reader uses. Nothing in a record is trusted until
//! [`open`] has checked every member against its id.
//!
//! An **id list** is `n × 32` bytes; a **bit set** answers an id list with
//! one bit per id (bit `i % 8` of byte `i / 8`).

use crate::backend::pack::{
    FrameHeader, RecordHeader, FRAME_HEADER_LEN, FRAME_MAGIC, RECORD_HEADER_LEN, RECORD_MAGIC,
};
use crate::chunk::{unseal, unseal_frame, Compression, Sealed, SealedChunk, SealedFrame};
use crate::error::{Error, Result};
use crate::id::{ChunkId, HASH_LEN};

/// Media type of a record stream.
pub const RECORDS_TYPE: &str = "application/vnd.lamina.records";
/// Media type of an id list or bit set.
pub const IDS_TYPE: &str = "application/vnd.lamina.ids";

/// Most ids in one id list (2 MiB of ids).
pub const MAX_IDS: usize = 64 * 1024;

/// Appends the wire form of `sealed` to `out`.
pub fn encode_record(sealed: &Sealed, out: &mut Vec<u8>) {
    match sealed {
        Sealed::Chunk(c) => {
            let h = RecordHeader {
                id: c.id,
                compression: c.compression,
                plain_len: c.plain_len,
                stored_len: c.data.len() as u32,
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(&c.data);
        }
        Sealed::Frame(f) => {
            let h = FrameHeader {
                members: f.members.clone(),
                plain_len: f.plain_len,
                stored_len: f.data.len() as u32,
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(&f.data);
        }
    }
}

/// Bytes `sealed` takes on the wire.
pub fn record_len(sealed: &Sealed) -> usize {
    match sealed {
        Sealed::Chunk(c) => RECORD_HEADER_LEN + c.data.len(),
        Sealed::Frame(f) => FRAME_HEADER_LEN + f.members.len() * 36 + f.data.len(),
    }
}

/// The chunk ids a record holds.
pub fn members(sealed: &Sealed) -> Vec<ChunkId> {
    match sealed {
        Sealed::Chunk(c) => vec![c.id],
        Sealed::Frame(f) => f.members.iter().map(|(id, _)| *id).collect(),
    }
}

/// Splits a record stream into records, checking every header and length
/// (not the contents: see [`open`]).
///
/// # Errors
/// [`Error::InvalidInput`] naming the offset of the first malformed record.
pub fn decode_records(mut bytes: &[u8]) -> Result<Vec<Sealed>> {
    let total = bytes.len();
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let at = total - bytes.len();
        let bad = |why: String| Error::InvalidInput(format!("record at byte {at}: {why}"));
        let magic = bytes.get(..4).ok_or_else(|| bad("cut short".into()))?;
        if magic == RECORD_MAGIC {
            let h = RecordHeader::parse(bytes).map_err(bad)?;
            let end = RECORD_HEADER_LEN + h.stored_len as usize;
            let data = bytes
                .get(RECORD_HEADER_LEN..end)
                .ok_or_else(|| bad(format!("data cut short ({} bytes expected)", h.stored_len)))?;
            out.push(Sealed::Chunk(SealedChunk {
                id: h.id,
                plain_len: h.plain_len,
                compression: h.compression,
                data: data.to_vec(),
            }));
            bytes = &bytes[end..];
        } else if magic == FRAME_MAGIC {
            let h = FrameHeader::parse(bytes).map_err(bad)?;
            let start = h.table_end();
            let end = start + h.stored_len as usize;
            let data = bytes
                .get(start..end)
                .ok_or_else(|| bad(format!("data cut short ({} bytes expected)", h.stored_len)))?;
            out.push(Sealed::Frame(SealedFrame {
                members: h.members,
                plain_len: h.plain_len,
                data: data.to_vec(),
            }));
            bytes = &bytes[end..];
        } else {
            return Err(bad("not a chunk or frame record".into()));
        }
    }
    Ok(out)
}

/// Decompresses a record and checks every member against its id; returns
/// the members' plain bytes.
///
/// # Errors
/// [`Error::ChunkCorrupt`] naming the first member that does not match.
pub fn open(sealed: &Sealed) -> Result<Vec<(ChunkId, Vec<u8>)>> {
    match sealed {
        Sealed::Chunk(c) => {
            let plain = unseal(c.id, c.plain_len, c.compression, c.data.clone())?;
            Ok(vec![(c.id, plain)])
        }
        Sealed::Frame(f) => {
            let first = f.members.first().map_or(ChunkId([0; HASH_LEN]), |m| m.0);
            let plain =
                unseal_frame(f.plain_len, &f.data).map_err(|reason| Error::ChunkCorrupt {
                    id: first,
                    reason: format!("frame: {reason}"),
                })?;
            let mut out = Vec::with_capacity(f.members.len());
            let mut at = 0usize;
            for &(id, len) in &f.members {
                let end = at + len as usize;
                let part = plain.get(at..end).ok_or_else(|| Error::ChunkCorrupt {
                    id,
                    reason: "member past the end of its frame".into(),
                })?;
                let plain = unseal(id, len, Compression::None, part.to_vec())?;
                out.push((id, plain));
                at = end;
            }
            Ok(out)
        }
    }
}

/// Encodes an id list.
pub fn encode_ids(ids: &[ChunkId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * HASH_LEN);
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
    out
}

/// Decodes an id list of at most [`MAX_IDS`] ids.
///
/// # Errors
/// [`Error::InvalidInput`] for a length that is not a multiple of 32 or a
/// list that is too long.
pub fn decode_ids(bytes: &[u8]) -> Result<Vec<ChunkId>> {
    if !bytes.len().is_multiple_of(HASH_LEN) {
        return Err(Error::InvalidInput(format!(
            "id list of {} bytes is not a multiple of {HASH_LEN}",
            bytes.len()
        )));
    }
    let n = bytes.len() / HASH_LEN;
    if n > MAX_IDS {
        return Err(Error::InvalidInput(format!(
            "id list of {n} ids exceeds the limit of {MAX_IDS}"
        )));
    }
    Ok(bytes
        .chunks_exact(HASH_LEN)
        .filter_map(ChunkId::from_slice)
        .collect())
}

/// Encodes one bit per flag.
pub fn encode_bits(flags: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; flags.len().div_ceil(8)];
    for (i, &f) in flags.iter().enumerate() {
        if f {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// Decodes `n` flags.
///
/// # Errors
/// [`Error::InvalidInput`] when the length does not fit `n`.
pub fn decode_bits(bytes: &[u8], n: usize) -> Result<Vec<bool>> {
    if bytes.len() != n.div_ceil(8) {
        return Err(Error::InvalidInput(format!(
            "bit set of {} bytes for {n} ids",
            bytes.len()
        )));
    }
    Ok((0..n).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Sealer;
    use proptest::prelude::*;

    fn samples() -> Vec<Sealed> {
        let mut s = Sealer::new();
        let text = b"lamina wire ".repeat(500);
        let random: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut out = vec![
            Sealed::Chunk(s.seal(ChunkId::of(&text), &text)),
            Sealed::Chunk(s.seal(ChunkId::of(&random), &random)),
        ];
        let members: Vec<(ChunkId, Vec<u8>)> = (0..3)
            .map(|i| {
                let d = format!("member {i} ").repeat(300).into_bytes();
                (ChunkId::of(&d), d)
            })
            .collect();
        out.extend(s.seal_many(&members));
        out
    }

    #[test]
    fn records_round_trip_and_open() {
        let recs = samples();
        let mut wire = Vec::new();
        for r in &recs {
            encode_record(r, &mut wire);
        }
        assert_eq!(wire.len(), recs.iter().map(record_len).sum::<usize>());
        let back = decode_records(&wire).unwrap();
        assert_eq!(back.len(), recs.len());
        for (a, b) in recs.iter().zip(&back) {
            assert_eq!(members(a), members(b));
            let plain = open(b).unwrap();
            for (id, p) in plain {
                assert_eq!(ChunkId::of(&p), id);
            }
        }
    }

    #[test]
    fn a_flipped_byte_is_caught() {
        for r in samples() {
            let mut wire = Vec::new();
            encode_record(&r, &mut wire);
            let last = wire.len() - 1;
            wire[last] ^= 0x55;
            let err =
                decode_records(&wire).and_then(|v| v.iter().try_for_each(|r| open(r).map(drop)));
            assert!(err.is_err(), "a corrupt record was accepted");
        }
    }

    #[test]
    fn truncated_and_garbage_streams_are_refused() {
        let mut wire = Vec::new();
        encode_record(&samples()[0], &mut wire);
        for cut in [1, 4, 47, 48, wire.len() - 1] {
            assert!(decode_records(&wire[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_records(b"GARBAGE!").is_err());
        assert!(decode_ids(&[0; 33]).is_err());
        assert!(decode_bits(&[0; 2], 20).is_err());
    }

    proptest! {
        #[test]
        fn bits_round_trip(flags in proptest::collection::vec(any::<bool>(), 0..300)) {
            prop_assert_eq!(decode_bits(&encode_bits(&flags), flags.len()).unwrap(), flags);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_records(&bytes);
            let _ = decode_ids(&bytes);
        }
    }
}
