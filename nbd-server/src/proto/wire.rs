//! Transmission-phase messages: parsing requests into checked commands,
//! and encoding replies.

use super::consts::*;
use crate::error::errno;

/// A request header as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRequest {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// Decodes a request header; `None` if the magic is wrong (the stream is
/// out of sync and the connection must be dropped).
pub fn parse_header(b: &[u8; REQUEST_LEN]) -> Option<RawRequest> {
    let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let be64 = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_be_bytes(a)
    };
    if be32(0) != REQUEST_MAGIC {
        return None;
    }
    Some(RawRequest {
        flags: be16(4),
        kind: be16(6),
        cookie: be64(8),
        offset: be64(16),
        len: be32(24),
    })
}

/// A request that passed every check: ranges are within the export,
/// aligned, and allowed by what was negotiated. Fields are the request's
/// own: `offset` and `len` in bytes, and its command flags by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Command {
    /// Read `len` bytes; `df`: one content chunk.
    Read { offset: u64, len: u32, df: bool },
    /// Write the payload.
    Write { offset: u64, len: u32, fua: bool },
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim { offset: u64, len: u32, fua: bool },
    /// Prefetch a range.
    Cache { offset: u64, len: u32 },
    /// Zero a range.
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    /// Report metadata for a range.
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    /// End the session.
    Disc,
}

/// What the session negotiated, for checking requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size.
    pub size: u64,
    /// Advertised minimum block size.
    pub min_block: u32,
    /// Export accepts writes.
    pub writable: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Metadata contexts selected.
    pub contexts: bool,
}

/// Checks a request: the command, or the NBD error to answer with. The
/// caller reads a `CMD_WRITE` payload of `len` bytes either way.
pub fn check(r: &RawRequest, l: &Limits) -> Result<Command, u32> {
    let allowed = match r.kind {
        CMD_READ if l.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        _ => return Err(errno::EINVAL),
    };
    if r.flags & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (r.offset, r.len);
    let end = offset.checked_add(u64::from(len));
    let in_range = end.is_some_and(|e| e <= l.size);
    let aligned = offset % u64::from(l.min_block) == 0
        && (u64::from(len) % u64::from(l.min_block) == 0 || end == Some(l.size));
    let writes = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    match r.kind {
        CMD_DISC => return Ok(Command::Disc),
        CMD_FLUSH => {
            if offset != 0 || len != 0 {
                return Err(errno::EINVAL);
            }
            return Ok(Command::Flush);
        }
        _ => {}
    }
    if writes && !l.writable {
        return Err(errno::EPERM);
    }
    // Over the advertised maximum: a read may be refused with EOVERFLOW
    // ("NBD_CMD_READ"); anything else gets EINVAL ("Error values": EOVERFLOW
    // is for reads and payload-free commands only).
    if r.kind == CMD_READ && len > MAX_PAYLOAD {
        return Err(errno::EOVERFLOW);
    }
    if r.kind == CMD_WRITE && len > MAX_PAYLOAD {
        return Err(errno::EINVAL);
    }
    if !in_range {
        return Err(if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        });
    }
    if !aligned {
        return Err(errno::EINVAL);
    }
    Ok(match r.kind {
        CMD_READ => Command::Read {
            offset,
            len,
            df: r.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: r.flags & CMD_FLAG_NO_HOLE != 0,
            fast: r.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => {
            if !l.contexts {
                return Err(errno::EINVAL);
            }
            Command::BlockStatus {
                offset,
                len,
                req_one: r.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        _ => return Err(errno::EINVAL),
    })
}

/// Header of a simple reply.
pub fn simple_header(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Header of a structured reply chunk with `len` payload bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured error chunk (final).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut out = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    )
    .to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A hole chunk.
pub fn hole_chunk(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = chunk_header(cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12).to_vec();
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// The final empty chunk.
pub fn none_chunk(cookie: u64) -> Vec<u8> {
    chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).to_vec()
}

/// A block status chunk for one context.
pub fn block_status_chunk(
    cookie: u64,
    context: u32,
    extents: &[(u32, u32)],
    done: bool,
) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let len = 4 + 8 * extents.len() as u32;
    let mut out = chunk_header(cookie, flags, REPLY_TYPE_BLOCK_STATUS, len).to_vec();
    out.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            size: 1 << 20,
            min_block: 512,
            writable: true,
            structured: true,
            contexts: true,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RawRequest {
        RawRequest {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn requests_are_classified() {
        let l = limits();
        assert_eq!(
            check(&req(CMD_READ, CMD_FLAG_DF, 512, 4096), &l),
            Ok(Command::Read {
                offset: 512,
                len: 4096,
                df: true
            })
        );
        assert_eq!(
            check(&req(CMD_READ, 0, 1 << 20, 512), &l),
            Err(errno::EINVAL)
        );
        assert_eq!(
            check(&req(CMD_WRITE, 0, (1 << 20) - 512, 1024), &l),
            Err(errno::ENOSPC)
        );
        assert_eq!(check(&req(CMD_READ, 0, 100, 512), &l), Err(errno::EINVAL));
        assert_eq!(
            check(
                &req(CMD_READ, 0, 0, MAX_PAYLOAD + 512),
                &Limits {
                    size: u64::MAX,
                    ..l
                }
            ),
            Err(errno::EOVERFLOW)
        );
        let huge = Limits {
            size: u64::MAX,
            ..l
        };
        assert!(check(&req(CMD_READ, 0, 0, MAX_PAYLOAD), &huge).is_ok());
        assert!(check(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD), &huge).is_ok());
        assert_eq!(
            check(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 512), &huge),
            Err(errno::EINVAL)
        );
        assert_eq!(check(&req(99, 0, 0, 0), &l), Err(errno::EINVAL));
        assert_eq!(
            check(&req(CMD_WRITE, CMD_FLAG_DF, 0, 512), &l),
            Err(errno::EINVAL)
        );
        assert_eq!(check(&req(CMD_FLUSH, 0, 0, 1), &l), Err(errno::EINVAL));
        let ro = Limits {
            writable: false,
            ..l
        };
        assert_eq!(check(&req(CMD_TRIM, 0, 0, 512), &ro), Err(errno::EPERM));
        let plain = Limits {
            structured: false,
            contexts: false,
            ..l
        };
        assert_eq!(
            check(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &plain),
            Err(errno::EINVAL)
        );
        assert_eq!(
            check(&req(CMD_BLOCK_STATUS, 0, 0, 512), &plain),
            Err(errno::EINVAL)
        );
        // An export whose size is not a block multiple accepts the tail.
        let odd = Limits {
            size: 1000,
            min_block: 1,
            ..l
        };
        assert!(check(&req(CMD_READ, 0, 999, 1), &odd).is_ok());
    }

    proptest! {
        #[test]
        fn header_parse_and_check_never_panic(bytes in proptest::collection::vec(any::<u8>(), REQUEST_LEN)) {
            let b: [u8; REQUEST_LEN] = bytes.try_into().unwrap();
            if let Some(r) = parse_header(&b) {
                let _ = check(&r, &limits());
            }
        }
    }
}
