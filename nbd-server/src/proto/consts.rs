//! NBD protocol constants, named as in the specification:
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

// "Newstyle negotiation".
/// `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// "Handshake flags" and "Client flags".
/// Server supports fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client uses fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client wants no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// "Transmission flags".
/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `CMD_FLUSH` supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `CMD_FLAG_FUA` supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// `CMD_TRIM` supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `CMD_WRITE_ZEROES` and `CMD_FLAG_NO_HOLE` supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `CMD_FLAG_DF` supported.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flushes and FUA are visible across connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `CMD_CACHE` supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `CMD_FLAG_FAST_ZERO` supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// "Option types".
/// Select an export and end negotiation (no error reporting).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

// "Option reply types".
/// Success / end of a list.
pub const REP_ACK: u32 = 1;
/// One export of a list.
pub const REP_SERVER: u32 = 2;
/// One piece of export information.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// TLS first.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// "Information types" (`REP_INFO`).
/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical name.
pub const INFO_NAME: u16 = 1;
/// Description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// "Request message", "Simple reply message", "Structured reply chunk".
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

// "Command flags".
/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes without punching holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read in one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// One block status extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Fail write-zeroes unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// "Request types".
/// Read.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Cache.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

// "Structured reply flags" and "Structured reply types".
/// Last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Zeros at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// "`base:allocation` metadata context".
/// Extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// Extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// qemu dirty bitmap: extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Metadata context: allocation.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";
/// Metadata context: Lamina's block map, in qemu's dirty-bitmap namespace.
pub const CONTEXT_DIRTY: &str = "qemu:dirty-bitmap:lamina";

// Limits chosen by Lamina.
/// Minimum block size advertised (sector); exports whose size is not a
/// multiple of it advertise 1.
pub const MIN_BLOCK: u32 = 512;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest read or write payload accepted, and advertised as the maximum
/// block size (`INFO_BLOCK_SIZE`): 64 MiB, what nbdkit accepts and the most
/// libnbd sends in one request. The spec asks every server to take 2^25
/// (section "Block size constraints"); clients do send more, e.g.
/// nbd-tester-client's `integrityhuge` (up to 47.6 MiB). Payload memory is
/// bounded server-wide (see `session::Memory`), not by this cap: a request
/// larger than the byte budget waits until it can run alone.
pub const MAX_PAYLOAD: u32 = 64 * 1024 * 1024;
/// Option data accepted at most (names and queries are at most 4 KiB each;
/// anything larger is a denial of service, and the connection is dropped).
pub const MAX_OPTION_DATA: u32 = 1024 * 1024;
/// Extents per block status reply at most (the spec's suggested cap).
pub const MAX_EXTENTS: usize = 1 << 20;
/// Requests processed at once per connection (QEMU's own server allows 16).
pub const MAX_IN_FLIGHT: usize = 32;
