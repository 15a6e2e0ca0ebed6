//! The handshake: fixed newstyle negotiation and option haggling.
//!
//! Unknown options are answered `ERR_UNSUP` and malformed ones
//! `ERR_INVALID`; the connection is only dropped where the spec mandates it
//! (bad magic, unknown client flags, `EXPORT_NAME` for a missing export) or
//! for option data too large to be anything but an attack.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::consts::*;
use crate::export::Export;

/// Where exports come from (the store, or one file).
pub trait Exports: Send + Sync + 'static {
    /// The export called `name`, if there is one. Blocking.
    ///
    /// # Errors
    /// Store or I/O failures opening it (reported to the client).
    fn lookup(&self, name: &str) -> crate::Result<Option<Arc<dyn Export>>>;
    /// Every export: (name, description). Blocking.
    ///
    /// # Errors
    /// Store failures.
    fn list(&self) -> crate::Result<Vec<(String, String)>>;
}

/// A metadata context a client selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:lamina`.
    Dirty,
}

impl Context {
    /// Context id used in replies.
    pub fn id(self) -> u32 {
        match self {
            Context::Allocation => 1,
            Context::Dirty => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Context::Allocation => CONTEXT_ALLOCATION,
            Context::Dirty => CONTEXT_DIRTY,
        }
    }
}

/// What a successful negotiation agreed on.
pub struct Negotiated {
    /// The export.
    pub export: Arc<dyn Export>,
    /// Structured replies in use.
    pub structured: bool,
    /// Selected metadata contexts.
    pub contexts: Vec<Context>,
    /// Minimum block size advertised.
    pub min_block: u32,
}

/// How negotiation ended.
pub enum Outcome<S> {
    /// Enter transmission.
    Go(S, Negotiated),
    /// The client asked for TLS and was told yes: wrap the stream and call
    /// [`negotiate`] again with `tls_active`.
    StartTls(S),
    /// The client left (or must be dropped).
    Done,
}

/// Negotiation settings.
#[derive(Clone, Copy)]
pub struct TlsState {
    /// The server can do TLS (and then requires it).
    pub offered: bool,
    /// TLS is running on this stream.
    pub active: bool,
}

/// Transmission flags for an export.
pub fn transmission_flags(e: &dyn Export, structured: bool) -> u16 {
    let mut f =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
    if structured {
        f |= FLAG_SEND_DF;
    }
    if e.writable() {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    } else {
        f |= FLAG_READ_ONLY;
    }
    f
}

/// Minimum block size advertised for an export.
pub fn min_block(e: &dyn Export) -> u32 {
    if e.size().is_multiple_of(u64::from(MIN_BLOCK)) {
        MIN_BLOCK
    } else {
        1
    }
}

struct State {
    structured: bool,
    meta: Option<(String, Vec<Context>)>,
    no_zeroes: bool,
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await
}

async fn lookup(exports: &Arc<dyn Exports>, name: &str) -> Result<Option<Arc<dyn Export>>, String> {
    let ex = exports.clone();
    let n = name.to_owned();
    match tokio::task::spawn_blocking(move || ex.lookup(&n)).await {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("lookup failed: {e}")),
    }
}

/// Looks up an export for an option, answering `ERR_UNKNOWN` (with the
/// reason) when there is none; `None` then.
async fn find<S: AsyncWrite + Unpin>(
    s: &mut S,
    exports: &Arc<dyn Exports>,
    option: u32,
    name: &str,
) -> std::io::Result<Option<Arc<dyn Export>>> {
    let why = match lookup(exports, name).await {
        Ok(Some(e)) => return Ok(Some(e)),
        Ok(None) => format!("no export named `{name}`"),
        Err(e) => e,
    };
    reply(s, option, REP_ERR_UNKNOWN, why.as_bytes()).await?;
    Ok(None)
}

/// A cursor over option data with checked reads.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).ok()
    }
}

/// Runs the handshake on `s`. `greet`: send the initial greeting (false
/// after STARTTLS, which continues haggling on the new stream).
///
/// # Errors
/// I/O errors on the stream.
pub async fn negotiate<S>(
    mut s: S,
    exports: Arc<dyn Exports>,
    tls: TlsState,
) -> std::io::Result<Outcome<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut st = State {
        structured: false,
        meta: None,
        no_zeroes: false,
    };
    if !tls.active {
        let mut g = Vec::with_capacity(18);
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&g).await?;
        s.flush().await?;
        let client = s.read_u32().await?;
        if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Ok(Outcome::Done);
        }
        st.no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    }
    loop {
        let magic = match s.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Done),
            Err(e) => return Err(e),
        };
        if magic != IHAVEOPT {
            return Ok(Outcome::Done);
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_DATA {
            return Ok(Outcome::Done);
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        if tls.offered && !tls.active && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Ok(Outcome::Done);
            }
            reply(
                &mut s,
                option,
                REP_ERR_TLS_REQD,
                b"TLS is required: send NBD_OPT_STARTTLS first",
            )
            .await?;
            continue;
        }
        match option {
            OPT_ABORT => {
                // The client may already have closed; ignore write errors.
                let _ = reply(&mut s, option, REP_ACK, &[]).await;
                let _ = s.flush().await;
                return Ok(Outcome::Done);
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    reply(&mut s, option, REP_ERR_INVALID, b"STARTTLS takes no data").await?;
                } else if !tls.offered {
                    reply(
                        &mut s,
                        option,
                        REP_ERR_POLICY,
                        b"this server is not configured for TLS",
                    )
                    .await?;
                } else if tls.active {
                    reply(&mut s, option, REP_ERR_INVALID, b"TLS is already active").await?;
                } else {
                    reply(&mut s, option, REP_ACK, &[]).await?;
                    s.flush().await?;
                    return Ok(Outcome::StartTls(s));
                }
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(&mut s, option, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                let ex = exports.clone();
                let list = tokio::task::spawn_blocking(move || ex.list()).await;
                match list {
                    Ok(Ok(names)) => {
                        for (name, desc) in names {
                            let mut d = (name.len() as u32).to_be_bytes().to_vec();
                            d.extend_from_slice(name.as_bytes());
                            d.extend_from_slice(desc.as_bytes());
                            reply(&mut s, option, REP_SERVER, &d).await?;
                        }
                        reply(&mut s, option, REP_ACK, &[]).await?;
                    }
                    Ok(Err(e)) => {
                        reply(&mut s, option, REP_ERR_POLICY, e.to_string().as_bytes()).await?
                    }
                    Err(e) => {
                        reply(&mut s, option, REP_ERR_POLICY, e.to_string().as_bytes()).await?
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        &mut s,
                        option,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    st.structured = true;
                    reply(&mut s, option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    st.meta = None;
                }
                if !st.structured {
                    reply(
                        &mut s,
                        option,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let mut c = Cursor(&data);
                let parsed = (|| {
                    let name = c.string()?;
                    let n = c.u32()?;
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        queries.push(c.string()?);
                    }
                    if !c.0.is_empty() {
                        return None;
                    }
                    Some((name, queries))
                })();
                let Some((name, queries)) = parsed else {
                    reply(
                        &mut s,
                        option,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    )
                    .await?;
                    continue;
                };
                let Some(export) = find(&mut s, &exports, option, &name).await? else {
                    continue;
                };
                let has_dirty = export.dirty(0, 0).is_some();
                let mut found: Vec<Context> = Vec::new();
                let mut add = |c: Context| {
                    if !found.contains(&c) {
                        found.push(c);
                    }
                };
                if queries.is_empty() && !set {
                    add(Context::Allocation);
                    if has_dirty {
                        add(Context::Dirty);
                    }
                }
                for q in &queries {
                    match q.as_str() {
                        CONTEXT_ALLOCATION => add(Context::Allocation),
                        "base:" if !set => add(Context::Allocation),
                        CONTEXT_DIRTY if has_dirty => add(Context::Dirty),
                        "qemu:" | "qemu:dirty-bitmap:" if !set && has_dirty => add(Context::Dirty),
                        _ => {}
                    }
                }
                for ctx in &found {
                    let mut d = ctx.id().to_be_bytes().to_vec();
                    d.extend_from_slice(ctx.name().as_bytes());
                    reply(&mut s, option, REP_META_CONTEXT, &d).await?;
                }
                reply(&mut s, option, REP_ACK, &[]).await?;
                if set {
                    st.meta = Some((name, found));
                }
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Ok(Some(export)) = lookup(&exports, &name).await else {
                    return Ok(Outcome::Done);
                };
                let mut b = export.size().to_be_bytes().to_vec();
                b.extend_from_slice(&transmission_flags(&*export, false).to_be_bytes());
                if !st.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                s.flush().await?;
                return Ok(Outcome::Go(
                    s,
                    Negotiated {
                        export,
                        structured: false,
                        contexts: Vec::new(),
                        min_block: 1,
                    },
                ));
            }
            OPT_INFO | OPT_GO => {
                let mut c = Cursor(&data);
                let parsed = (|| {
                    let name = c.string()?;
                    let n = c.u16()?;
                    let mut infos = Vec::new();
                    for _ in 0..n {
                        infos.push(c.u16()?);
                    }
                    c.0.is_empty().then_some((name, infos))
                })();
                let Some((name, infos)) = parsed else {
                    reply(
                        &mut s,
                        option,
                        REP_ERR_INVALID,
                        b"malformed INFO/GO request",
                    )
                    .await?;
                    continue;
                };
                let Some(export) = find(&mut s, &exports, option, &name).await? else {
                    continue;
                };
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&export.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(&*export, st.structured).to_be_bytes());
                reply(&mut s, option, REP_INFO, &d).await?;
                if infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name().as_bytes());
                    reply(&mut s, option, REP_INFO, &d).await?;
                }
                if infos.contains(&INFO_DESCRIPTION) {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description().as_bytes());
                    reply(&mut s, option, REP_INFO, &d).await?;
                }
                let min_block = min_block(&*export);
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&min_block.to_be_bytes());
                d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                reply(&mut s, option, REP_INFO, &d).await?;
                reply(&mut s, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    s.flush().await?;
                    // Clients that did not ask for block sizes never agreed
                    // to them: accept any alignment from them.
                    let min_block = if infos.contains(&INFO_BLOCK_SIZE) {
                        min_block
                    } else {
                        1
                    };
                    let contexts = match &st.meta {
                        Some((n, c)) if *n == name => c.clone(),
                        _ => Vec::new(),
                    };
                    return Ok(Outcome::Go(
                        s,
                        Negotiated {
                            export,
                            structured: st.structured,
                            contexts,
                            min_block,
                        },
                    ));
                }
            }
            _ => {
                reply(
                    &mut s,
                    option,
                    REP_ERR_UNSUP,
                    format!("option {option} is not supported").as_bytes(),
                )
                .await?;
            }
        }
        s.flush().await?;
    }
}
