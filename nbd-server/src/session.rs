//! One client connection: handshake (with an optional TLS upgrade), then
//! the transmission loop.
//!
//! The reader task parses requests and starts each on tokio's blocking pool
//! (export I/O is blocking), at most `MAX_IN_FLIGHT` at once; replies go
//! through a channel to a single writer task as they complete, so they can
//! be out of order. On `DISC`, end of stream or server shutdown the reader
//! stops, in-flight requests finish and are answered, and the connection
//! closes. A client that vanishes mid-request leaves the export consistent:
//! every request runs to completion whether or not its reply can be sent.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, WriteHalf};
use tokio::sync::{watch, Semaphore};

use crate::error::{errno, Error};
use crate::export::Export;
use crate::proto::consts::*;
use crate::proto::handshake::{negotiate, Context, Exports, Negotiated, Outcome, TlsState};
use crate::proto::wire::*;
use crate::source::Alloc;

/// A stream the session can run on (TCP, Unix, or TLS over either).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Runs one connection to its end.
pub async fn run(
    stream: Box<dyn Stream>,
    exports: Arc<dyn Exports>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
    memory: Arc<Memory>,
) {
    let state = TlsState {
        offered: tls.is_some(),
        active: false,
    };
    let outcome = match negotiate(stream, exports.clone(), state).await {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(%e, "handshake ended");
            return;
        }
    };
    let (stream, negotiated) = match outcome {
        Outcome::Done => return,
        Outcome::Go(s, n) => (s, n),
        Outcome::StartTls(s) => {
            let Some(acceptor) = tls else { return };
            let tls_stream = match acceptor.accept(s).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::info!(%e, "TLS handshake failed");
                    return;
                }
            };
            let state = TlsState {
                offered: true,
                active: true,
            };
            let boxed: Box<dyn Stream> = Box::new(tls_stream);
            match negotiate(boxed, exports, state).await {
                Ok(Outcome::Go(s, n)) => (s, n),
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(%e, "handshake ended");
                    return;
                }
            }
        }
    };
    if let Err(e) = transmission(stream, negotiated, shutdown, memory).await {
        tracing::debug!(%e, "connection ended");
    }
}

/// Largest payload of a refused WRITE that is read and discarded (through
/// a small scratch buffer, taking no budget) so the connection goes on;
/// a larger one ends the connection: the spec lets a server treat payloads
/// that large as a denial of service ("Block size constraints").
const MAX_DISCARD: u32 = 2 * MAX_PAYLOAD;

/// Reads and drops `len` payload bytes of a refused write.
async fn discard(rd: &mut (impl AsyncRead + Unpin), len: u32) -> std::io::Result<()> {
    if len > MAX_DISCARD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("refused write of {len} bytes is too large to skip"),
        ));
    }
    let mut scratch = vec![0u8; 64 * 1024];
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(scratch.len());
        rd.read_exact(&mut scratch[..n]).await?;
        left -= n;
    }
    Ok(())
}

async fn transmission(
    stream: Box<dyn Stream>,
    n: Negotiated,
    mut shutdown: watch::Receiver<bool>,
    memory: Arc<Memory>,
) -> std::io::Result<()> {
    let (rd, wr) = tokio::io::split(stream);
    // Buffered: a client keeping many requests in flight sends them back
    // to back, and one read takes in a batch of headers (and small write
    // payloads); large payloads bypass the buffer.
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    // Requests served on the blocking pool write their own replies; the
    // mutex keeps replies from interleaving.
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let limits = Limits {
        size: n.export.size(),
        min_block: n.min_block,
        writable: n.export.writable(),
        structured: n.structured,
        contexts: !n.contexts.is_empty(),
    };
    let shared = Arc::new(Shared {
        export: n.export,
        structured: n.structured,
        contexts: n.contexts,
    });
    // Requests in flight are bounded by count and by payload bytes, so a
    // connection's memory stays small whatever the client queues.
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = memory.budget.clone();
    let pool = memory.clone();
    let mut header = [0u8; REQUEST_LEN];
    // Replies of the requests served inline, sent in one write once no
    // further request is buffered (or the batch is large): one read and
    // one write system call per batch of requests. (Sending sooner, after
    // each reply or after 20 µs, to let the client refill the pipeline
    // earlier, measured no better for 4 KiB requests at queue depth 32.)
    let mut batch: Vec<u8> = Vec::new();
    // The payload of a small write, served inline.
    let mut small = vec![0u8; INLINE_IO_BYTES as usize];
    loop {
        let more = rd.buffer().len() >= REQUEST_LEN && batch.len() < BATCH_BYTES;
        if !more && send(&wr, &mut batch).await.is_err() {
            break;
        }
        tokio::select! {
            r = rd.read_exact(&mut header) => {
                if r.is_err() {
                    break;
                }
            }
            _ = shutdown.changed() => break,
        }
        let Some(raw) = parse_header(&header) else {
            break;
        };
        let checked = check(&raw, &limits);
        if checked == Ok(Command::Disc) {
            break;
        }
        // Small reads and writes the export can serve with plain local file
        // I/O run right here: no task, no hop to the blocking pool, no
        // buffer of their own.
        let mut read_ahead = None;
        match checked {
            // (`read_inline` answers unless it needs the blocking pool.)
            Ok(Command::Read { offset, len, .. })
                if len <= INLINE_IO_BYTES
                    && shared.read_inline(raw.cookie, offset, len, &mut batch) =>
            {
                continue
            }
            Ok(Command::Write {
                offset,
                len,
                fua: false,
            }) if len <= INLINE_IO_BYTES => {
                let data = &mut small[..len as usize];
                if rd.buffer().len() < data.len() && send(&wr, &mut batch).await.is_err() {
                    break;
                }
                if rd.read_exact(data).await.is_err() {
                    break;
                }
                match shared.export.write_cheap(offset, data) {
                    Ok(true) => {
                        batch.extend_from_slice(&simple_header(raw.cookie, 0));
                        continue;
                    }
                    Ok(false) => read_ahead = Some(&small[..len as usize]),
                    Err(e) => {
                        batch.extend(shared.fail(raw.cookie, CMD_WRITE, &e));
                        continue;
                    }
                }
            }
            _ => {}
        }
        // What was served inline goes out before this request may wait.
        if send(&wr, &mut batch).await.is_err() {
            break;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        // Reads and writes carry payloads; reserve their bytes first (a
        // refused write's payload is skipped, never held).
        let payload_bytes = match checked {
            Ok(Command::Read { len, .. } | Command::Write { len, .. }) => len,
            _ => 0,
        };
        let units = payload_bytes.div_ceil(BUDGET_UNIT).min(BUDGET_UNITS as u32);
        let Ok(reserved) = budget.clone().acquire_many_owned(units).await else {
            break;
        };
        let mut payload = Vec::new();
        if let Some(data) = read_ahead {
            payload = pool.take(data.len());
            payload.copy_from_slice(data);
        } else if raw.kind == CMD_WRITE {
            if checked.is_ok() {
                payload = pool.take(raw.len as usize);
                if rd.read_exact(&mut payload).await.is_err() {
                    break;
                }
            } else if let Err(e) = discard(&mut rd, raw.len).await {
                tracing::debug!(%e, "refused write not skipped");
                break;
            }
        }
        let shared = shared.clone();
        let wr = wr.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let cookie = raw.cookie;
            let reply = match checked {
                Err(e) => shared.error_reply(cookie, raw.kind, e, "invalid request"),
                Ok(cmd) => {
                    let s = shared.clone();
                    let p = pool.clone();
                    match tokio::task::spawn_blocking(move || {
                        let reply = s.execute(cookie, cmd, &payload, &p);
                        p.give(payload);
                        reply
                    })
                    .await
                    {
                        Ok(r) => r,
                        Err(e) => shared.error_reply(cookie, raw.kind, errno::EIO, &e.to_string()),
                    }
                }
            };
            // A failed write means the client is gone; the work is done.
            let _ = wr.lock().await.write_all(&reply).await;
            pool.give(reply);
            drop(reserved);
            drop(slot);
        });
    }
    // Answer what was served inline (the client may be gone: nothing to
    // do then), let in-flight requests finish and be answered, then close.
    let _ = send(&wr, &mut batch).await;
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    let _ = wr.lock().await.shutdown().await;
    Ok(())
}

/// Writes the batched replies and empties the batch.
async fn send(
    wr: &tokio::sync::Mutex<WriteHalf<Box<dyn Stream>>>,
    batch: &mut Vec<u8>,
) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let r = wr.lock().await.write_all(batch).await;
    batch.clear();
    r
}

/// Read buffer of a connection: 32 small requests with their payloads fit.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Batched inline replies sent once they reach this size, even with more
/// requests buffered (keeps the batch, and the client's wait, bounded).
const BATCH_BYTES: usize = 256 * 1024;

/// Largest read or write served on the async thread when the export can
/// do it with local file I/O (a page-cache `pread`/`pwrite` takes
/// microseconds; the hop to the blocking pool and back cost more: 4 KiB
/// reads at queue depth 1 went from ~17k to ~32k IOPS over 4 connections,
/// measured). Reads this small are also sent as one data chunk without
/// looking for holes: the lookup costs more than the zeros it saves.
const INLINE_IO_BYTES: u32 = 64 * 1024;

/// Payload bytes the whole server holds at once; requests beyond it wait,
/// unread, in their sockets. One connection can keep 16 requests of 1 MiB
/// in flight (what QEMU's server allows), and many connections together
/// still cannot push the server's memory up. A request larger than the
/// budget (up to `MAX_PAYLOAD`) takes the whole budget, so it runs alone:
/// payload memory stays under `max(BUDGET_BYTES, MAX_PAYLOAD)` plus the
/// pool's idle buffers (at most `BUDGET_BYTES`), whatever the clients do.
const BUDGET_BYTES: u32 = 16 * 1024 * 1024;
/// Granularity of the byte budget.
const BUDGET_UNIT: u32 = 64 * 1024;
const BUDGET_UNITS: usize = (BUDGET_BYTES / BUDGET_UNIT) as usize;

/// The server's memory for request payloads: a byte budget shared by all
/// connections, and a pool of buffers reused across requests (large
/// payloads would otherwise churn the allocator, which keeps freed buffers
/// resident). The pool holds at most the budget.
pub struct Memory {
    budget: Arc<Semaphore>,
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            budget: Arc::new(Semaphore::new(BUDGET_UNITS)),
            free: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl Memory {
    /// A buffer of `len` bytes (contents unspecified).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = match free.iter().position(|b| b.capacity() >= len) {
            Some(i) => free.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        drop(free);
        v.resize(len, 0);
        v
    }

    /// Returns a buffer for reuse.
    fn give(&self, mut v: Vec<u8>) {
        if v.capacity() < 4096 {
            return;
        }
        v.clear();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = free.iter().map(Vec::capacity).sum();
        if held + v.capacity() <= BUDGET_BYTES as usize {
            free.push(v);
        }
    }
}

struct Shared {
    export: Arc<dyn Export>,
    structured: bool,
    contexts: Vec<Context>,
}

fn to_u32_runs(runs: impl IntoIterator<Item = (u64, u32)>, cap: u64) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut total = 0u64;
    for (mut len, flags) in runs {
        while len > 0 && out.len() < MAX_EXTENTS && total < cap {
            // Keep extents 512-aligned when splitting long ones.
            let piece = len.min(u64::from(u32::MAX) & !511);
            out.push((piece as u32, flags));
            len -= piece;
            total += piece;
        }
    }
    out
}

impl Shared {
    /// An error reply: structured (with the message) when negotiated, which
    /// `CMD_READ` requires and every other command allows.
    fn error_reply(&self, cookie: u64, _kind: u16, error: u32, msg: &str) -> Vec<u8> {
        if self.structured {
            error_chunk(cookie, error, msg)
        } else {
            simple_header(cookie, error).to_vec()
        }
    }

    fn fail(&self, cookie: u64, kind: u16, e: &Error) -> Vec<u8> {
        tracing::debug!(%e, kind, "request failed");
        self.error_reply(cookie, kind, e.nbd_errno(), &e.to_string())
    }

    fn ok(&self, cookie: u64) -> Vec<u8> {
        simple_header(cookie, 0).to_vec()
    }

    fn execute(&self, cookie: u64, cmd: Command, payload: &[u8], pool: &Memory) -> Vec<u8> {
        let e = &self.export;
        let done = |r: crate::Result<()>, kind: u16| match r {
            Ok(()) => self.ok(cookie),
            Err(err) => self.fail(cookie, kind, &err),
        };
        match cmd {
            Command::Read { offset, len, df } => self.read(cookie, offset, len, df, pool),
            Command::Write { offset, fua, .. } => done(e.write(offset, payload, fua), CMD_WRITE),
            Command::Flush => done(e.flush(), CMD_FLUSH),
            Command::Trim { offset, len, fua } => {
                done(e.trim(offset, u64::from(len), fua), CMD_TRIM)
            }
            Command::Cache { offset, len } => done(e.cache(offset, u64::from(len)), CMD_CACHE),
            Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole,
                fast,
            } => done(
                e.write_zeroes(offset, u64::from(len), no_hole, fast, fua),
                CMD_WRITE_ZEROES,
            ),
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => self.block_status(cookie, offset, len, req_one),
            Command::Disc => Vec::new(),
        }
    }

    /// Serves a small read right away if the export can do it cheaply,
    /// appending the reply (one data chunk, or the simple reply) to `out`;
    /// `false`, with nothing appended, if it needs the blocking pool.
    fn read_inline(&self, cookie: u64, offset: u64, len: u32, out: &mut Vec<u8>) -> bool {
        let at = out.len();
        let head = if self.structured { 28 } else { 16 };
        out.resize(at + head + len as usize, 0);
        match self.export.read_cheap(offset, &mut out[at + head..]) {
            Ok(true) if self.structured => {
                out[at..at + 20].copy_from_slice(&chunk_header(
                    cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + len,
                ));
                out[at + 20..at + 28].copy_from_slice(&offset.to_be_bytes());
                true
            }
            Ok(true) => {
                out[at..at + 16].copy_from_slice(&simple_header(cookie, 0));
                true
            }
            Ok(false) => {
                out.truncate(at);
                false
            }
            Err(e) => {
                out.truncate(at);
                out.extend(self.fail(cookie, CMD_READ, &e));
                true
            }
        }
    }

    fn read(&self, cookie: u64, offset: u64, len: u32, df: bool, pool: &Memory) -> Vec<u8> {
        if !self.structured {
            let mut out = pool.take(16 + len as usize);
            return match self.export.read(offset, &mut out[16..]) {
                Ok(()) => {
                    out[..16].copy_from_slice(&simple_header(cookie, 0));
                    out
                }
                Err(e) => self.fail(cookie, CMD_READ, &e),
            };
        }
        // Structured: holes as hole chunks (unless DF), data as data chunks.
        let runs = if df || len <= INLINE_IO_BYTES {
            vec![(u64::from(len), Alloc::Data)]
        } else {
            match self.allocation_runs(offset, u64::from(len)) {
                Ok(r) => r,
                Err(e) => return self.fail(cookie, CMD_READ, &e),
            }
        };
        let mut out = pool.take(len as usize + 64);
        out.clear();
        let mut pos = offset;
        let count = runs.len();
        for (i, (rlen, a)) in runs.into_iter().enumerate() {
            let last = i + 1 == count;
            if a == Alloc::Data {
                let at = out.len();
                out.resize(at + 28 + rlen as usize, 0);
                if let Err(e) = self.export.read(pos, &mut out[at + 28..]) {
                    out.truncate(at);
                    out.extend(self.fail(cookie, CMD_READ, &e));
                    return out;
                }
                let flags = if last { REPLY_FLAG_DONE } else { 0 };
                out[at..at + 20].copy_from_slice(&chunk_header(
                    cookie,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + rlen as u32,
                ));
                out[at + 20..at + 28].copy_from_slice(&pos.to_be_bytes());
            } else {
                out.extend(hole_chunk(cookie, pos, rlen as u32, last));
            }
            pos += rlen;
        }
        out
    }

    /// Allocation runs covering exactly `[offset, offset + len)`, with
    /// small pieces of zeros folded into data (a hole chunk per 512 bytes
    /// would cost more than the zeros).
    fn allocation_runs(&self, offset: u64, len: u64) -> crate::Result<Vec<(u64, Alloc)>> {
        let mut runs: Vec<(u64, Alloc)> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let got = self.export.allocation(pos, end - pos)?;
            let mut covered = 0;
            for (l, a) in got {
                let l = l.min(end - pos - covered);
                if l == 0 {
                    break;
                }
                let a = if a == Alloc::Data || l < 4096 {
                    Alloc::Data
                } else {
                    Alloc::Hole
                };
                match runs.last_mut() {
                    Some(last) if last.1 == a => last.0 += l,
                    _ => runs.push((l, a)),
                }
                covered += l;
            }
            if covered == 0 {
                // Nothing reported: treat the rest as data.
                runs.push((end - pos, Alloc::Data));
                break;
            }
            pos += covered;
        }
        Ok(runs)
    }

    fn block_status(&self, cookie: u64, offset: u64, len: u32, req_one: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let count = self.contexts.len();
        for (i, ctx) in self.contexts.iter().enumerate() {
            let last = i + 1 == count;
            let runs: Vec<(u64, u32)> = match ctx {
                Context::Allocation => match self.export.allocation(offset, u64::from(len)) {
                    Ok(r) => r
                        .into_iter()
                        .map(|(l, a)| {
                            let flags = match a {
                                Alloc::Data => 0,
                                Alloc::Zero => STATE_ZERO,
                                Alloc::Hole => STATE_HOLE | STATE_ZERO,
                            };
                            (l, flags)
                        })
                        .collect(),
                    Err(e) => return self.fail(cookie, CMD_BLOCK_STATUS, &e),
                },
                Context::Dirty => self
                    .export
                    .dirty(offset, u64::from(len))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(l, d)| (l, if d { STATE_DIRTY } else { 0 }))
                    .collect(),
            };
            let mut extents = to_u32_runs(runs, u64::from(len));
            if extents.is_empty() {
                extents.push((len, 0));
            }
            if req_one {
                extents.truncate(1);
                if let Some(first) = extents.first_mut() {
                    first.0 = first.0.min(len);
                }
            }
            out.extend(block_status_chunk(cookie, ctx.id(), &extents, last));
        }
        if out.is_empty() {
            return none_chunk(cookie);
        }
        out
    }
}
