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

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

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
    if let Err(e) = transmission(stream, negotiated, shutdown).await {
        tracing::debug!(%e, "connection ended");
    }
}

/// Largest WRITE payload read and discarded when the request is refused;
/// anything larger cannot be skipped cheaply and ends the connection.
const MAX_DISCARD: u32 = 64 * 1024 * 1024;

async fn transmission(
    stream: Box<dyn Stream>,
    n: Negotiated,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT * 2);
    let writer = tokio::spawn(async move {
        while let Some(buf) = rx.recv().await {
            if wr.write_all(&buf).await.is_err() {
                break;
            }
            // Write batches without waiting for each flush.
            if rx.is_empty() && wr.flush().await.is_err() {
                break;
            }
        }
        // The peer may be gone already.
        let _ = wr.shutdown().await;
    });
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
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut header = [0u8; REQUEST_LEN];
    loop {
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
        let mut payload = Vec::new();
        if raw.kind == CMD_WRITE {
            if raw.len > MAX_DISCARD {
                break;
            }
            payload = vec![0u8; raw.len as usize];
            if rd.read_exact(&mut payload).await.is_err() {
                break;
            }
        }
        if checked == Ok(Command::Disc) {
            break;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let cookie = raw.cookie;
            let reply = match checked {
                Err(e) => shared.error_reply(cookie, raw.kind, e, "invalid request"),
                Ok(cmd) => {
                    let s = shared.clone();
                    match tokio::task::spawn_blocking(move || s.execute(cookie, cmd, payload)).await
                    {
                        Ok(r) => r,
                        Err(e) => shared.error_reply(cookie, raw.kind, errno::EIO, &e.to_string()),
                    }
                }
            };
            // A closed channel means the client is gone; the work is done.
            let _ = tx.send(reply).await;
            drop(permit);
        });
    }
    // Let in-flight requests finish and be answered, then close.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(tx);
    let _ = writer.await;
    Ok(())
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

    fn execute(&self, cookie: u64, cmd: Command, payload: Vec<u8>) -> Vec<u8> {
        let e = &self.export;
        let done = |r: crate::Result<()>, kind: u16| match r {
            Ok(()) => self.ok(cookie),
            Err(err) => self.fail(cookie, kind, &err),
        };
        match cmd {
            Command::Read { offset, len, df } => self.read(cookie, offset, len, df),
            Command::Write { offset, fua, .. } => done(e.write(offset, &payload, fua), CMD_WRITE),
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

    fn read(&self, cookie: u64, offset: u64, len: u32, df: bool) -> Vec<u8> {
        if !self.structured {
            let mut out = vec![0u8; 16 + len as usize];
            return match self.export.read(offset, &mut out[16..]) {
                Ok(()) => {
                    out[..16].copy_from_slice(&simple_header(cookie, 0));
                    out
                }
                Err(e) => self.fail(cookie, CMD_READ, &e),
            };
        }
        // Structured: holes as hole chunks (unless DF), data as data chunks.
        let runs = if df || len < 4096 {
            vec![(u64::from(len), Alloc::Data)]
        } else {
            match self.allocation_runs(offset, u64::from(len)) {
                Ok(r) => r,
                Err(e) => return self.fail(cookie, CMD_READ, &e),
            }
        };
        let mut out = Vec::with_capacity(len as usize + 64);
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
