//! The console's screen proxy: single-use tickets and the WebSocket that
//! carries a VM's VNC display to the browser.
//!
//! A ticket is minted for one user's session (by the screen page, or
//! `POST /api/v1/sessions/{id}/ticket`), lives [`TICKET_TTL`] and is spent
//! by the first WebSocket that presents it. The WebSocket must come from
//! the console's own origin. Its bytes go to the VM's VNC socket through
//! the VM's host agent (an HTTP/1.1 upgrade), or for an external desktop
//! straight to its VNC server after the broker authenticated there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use lamina_sync::Caller;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::rfb;
use crate::audit::AuditEntry;
use crate::broker::Broker;
use crate::desktop;
use crate::error::{Error, Result};
use crate::model::{self, Member, Session, MEMBER, SESSION};

/// How long a ticket may wait for its WebSocket.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// Most tickets outstanding at once (older ones are dropped first).
const MAX_TICKETS: usize = 10_000;
/// Largest WebSocket message the browser may send (VNC client messages
/// are small; a clipboard paste is the largest).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most bytes read toward the browser at once (one WebSocket message).
const CHUNK: usize = 256 * 1024;
/// How often an open screen marks its session as in use.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// What a ticket opens.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Its user.
    pub user: String,
    /// The session.
    pub session: String,
    /// The session's VM.
    pub vm: String,
    expires: Instant,
}

/// Tickets not yet spent.
#[derive(Default)]
pub struct Tickets {
    map: Mutex<HashMap<String, Ticket>>,
}

impl Tickets {
    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ticket>> {
        // A plain map: a panic elsewhere leaves it usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new ticket for `session` of `user` on `vm`.
    pub fn mint(&self, user: &str, session: &str, vm: &str) -> String {
        let id = hex::encode(rand::random::<[u8; 24]>());
        let now = Instant::now();
        let mut map = self.locked();
        map.retain(|_, t| t.expires > now);
        if map.len() >= MAX_TICKETS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, t)| t.expires)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            id.clone(),
            Ticket {
                user: user.to_owned(),
                session: session.to_owned(),
                vm: vm.to_owned(),
                expires: now + TICKET_TTL,
            },
        );
        id
    }

    /// Spends a ticket.
    ///
    /// # Errors
    /// Unknown (or spent), expired.
    pub fn take(&self, id: &str) -> Result<Ticket> {
        let t = self
            .locked()
            .remove(id)
            .ok_or_else(|| Error::Forbidden("unknown or already used ticket".into()))?;
        if t.expires <= Instant::now() {
            return Err(Error::Forbidden("the ticket has expired".into()));
        }
        Ok(t)
    }
}

/// Mints a ticket for session `id`, which must be the caller's own: nobody
/// else, an admin neither, sees a user's screen.
///
/// # Errors
/// No such session of the caller.
pub async fn ticket_for(
    broker: &Broker,
    tickets: &Tickets,
    caller: &Caller,
    id: &str,
) -> Result<(String, Session)> {
    let sid = id.to_owned();
    let s: Option<Session> = broker.read(move |st| model::get(st, SESSION, &sid)).await?;
    let s = s
        .filter(|s| s.user == caller.user)
        .ok_or_else(|| Error::NotFound(format!("no session {id} of {}", caller.user)))?;
    Ok((tickets.mint(&s.user, &s.id, &s.vm), s))
}

/// A byte stream to a VNC display.
trait Vnc: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Vnc for T {}

/// Opens the display of the ticket's VM: checks the session is still the
/// ticket's, then reaches its host agent or external desktop.
async fn open(broker: &Arc<Broker>, t: &Ticket) -> Result<(Box<dyn Vnc>, bool)> {
    let (sid, vm) = (t.session.clone(), t.vm.clone());
    let (session, member, secret) = broker
        .read(move |st| {
            let s: Option<Session> = model::get(st, SESSION, &sid)?;
            let m: Option<Member> = model::get(st, MEMBER, &vm)?;
            let secret = desktop::password(st, &vm)?;
            Ok((s, m, secret))
        })
        .await?;
    let live = session.is_some_and(|s| s.user == t.user && s.vm == t.vm);
    let member = member
        .filter(|m| live && m.session.as_deref() == Some(t.session.as_str()))
        .ok_or_else(|| Error::NotFound(format!("session {} has ended", t.session)))?;
    match &member.vnc {
        Some(addr) => {
            let mut tcp = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await
            .map_err(|_| {
                Error::io(
                    format!("cannot reach desktop {} at {addr}", member.name),
                    std::io::ErrorKind::TimedOut.into(),
                )
            })?
            .map_err(|e| Error::io(format!("cannot reach desktop {} at {addr}", member.name), e))?;
            let _ = tcp.set_nodelay(true);
            rfb::client(&mut tcp, secret.as_deref())
                .await
                .map_err(|e| Error::io(format!("desktop {} at {addr}", member.name), e))?;
            Ok((Box::new(tcp), true))
        }
        None => {
            let client = broker.client(&member.host).await?;
            let up = client.vnc(&member.name).await?;
            Ok((Box::new(up), false))
        }
    }
}

/// Reads exactly `n` bytes of the browser's messages (handshake only).
async fn ws_read(ws: &mut WebSocket, pending: &mut Vec<u8>, n: usize) -> std::io::Result<Vec<u8>> {
    while pending.len() < n {
        match ws.recv().await {
            Some(Ok(Message::Binary(b))) => pending.extend_from_slice(&b),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_))) => {}
            Some(Ok(Message::Close(_))) | None => {
                return Err(std::io::ErrorKind::UnexpectedEof.into())
            }
            Some(Err(e)) => return Err(std::io::Error::other(e)),
        }
    }
    Ok(pending.drain(..n).collect())
}

/// The server half of the handshake toward the browser, for a desktop the
/// broker authenticated to; what the browser sent beyond it.
async fn greet_browser(ws: &mut WebSocket) -> std::io::Result<Vec<u8>> {
    let send = |b: &'static [u8]| Message::Binary(b.to_vec().into());
    let mut pending = Vec::new();
    ws.send(send(rfb::greeting()))
        .await
        .map_err(std::io::Error::other)?;
    let version = ws_read(ws, &mut pending, 12).await?;
    ws.send(send(rfb::after_version(&version)?))
        .await
        .map_err(std::io::Error::other)?;
    let choice = ws_read(ws, &mut pending, 1).await?;
    ws.send(send(rfb::browser_answer(choice[0])?))
        .await
        .map_err(std::io::Error::other)?;
    Ok(pending)
}

/// Serves one screen: opens the display, relays until either side closes.
pub(crate) async fn serve(broker: Arc<Broker>, ws: WebSocket, t: Ticket) {
    let target = format!("session {} on {}", t.session, t.vm);
    let (mut ws, display) = (ws, open(&broker, &t).await);
    let (vnc, external) = match display {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(vm = %t.vm, error = %e, "cannot open the screen");
            broker
                .audit_entry(AuditEntry::failed(
                    &t.user,
                    "connect",
                    &target,
                    e.to_string(),
                ))
                .await;
            let _ = ws
                .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                    code: 1011,
                    reason: short(&e.to_string()).into(),
                })))
                .await;
            return;
        }
    };
    broker
        .audit_entry(AuditEntry::ok(&t.user, "connect", &target, ""))
        .await;
    let started = Instant::now();
    let (mut vnc_rd, mut vnc_wr) = tokio::io::split(vnc);
    let first = if external {
        match greet_browser(&mut ws).await {
            Ok(rest) => rest,
            Err(e) => {
                tracing::info!(vm = %t.vm, error = %e, "browser handshake failed");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    let (mut tx, mut rx) = ws.split();
    let up = async {
        if !first.is_empty() {
            vnc_wr.write_all(&first).await?;
        }
        let mut n = first.len() as u64;
        while let Some(msg) = rx.next().await {
            match msg.map_err(std::io::Error::other)? {
                Message::Binary(b) => {
                    vnc_wr.write_all(&b).await?;
                    n += b.len() as u64;
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = vnc_wr.shutdown().await;
        Ok::<u64, std::io::Error>(n)
    };
    let down = async {
        // Each message is what one read got, handed over without a copy.
        let mut buf = bytes::BytesMut::with_capacity(CHUNK);
        let mut n = 0u64;
        loop {
            buf.reserve(CHUNK);
            let got = vnc_rd.read_buf(&mut buf).await?;
            if got == 0 {
                break;
            }
            n += got as u64;
            tx.send(Message::Binary(buf.split().freeze()))
                .await
                .map_err(std::io::Error::other)?;
        }
        let _ = tx.send(Message::Close(None)).await;
        Ok::<u64, std::io::Error>(n)
    };
    let touch = async {
        let mut every = tokio::time::interval(TOUCH_EVERY);
        loop {
            every.tick().await;
            broker.touch_session(&t.session).await;
        }
    };
    // Either direction ending ends the screen.
    let (bytes_up, bytes_down) = tokio::select! {
        r = up => (r.unwrap_or(0), 0),
        r = down => (0, r.unwrap_or(0)),
        () = touch => (0, 0),
    };
    broker.touch_session(&t.session).await;
    tracing::info!(vm = %t.vm, bytes_up, bytes_down, "screen closed");
    broker
        .audit_entry(AuditEntry::ok(
            &t.user,
            "disconnect",
            &target,
            format!("after {:.0} s", started.elapsed().as_secs_f64()),
        ))
        .await;
}

/// A close reason fits in 123 bytes.
fn short(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > 120 {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_single_use() {
        let t = Tickets::default();
        let id = t.mint("alice", "s1", "vm1");
        let got = t.take(&id).unwrap();
        assert_eq!((got.user.as_str(), got.vm.as_str()), ("alice", "vm1"));
        assert!(matches!(t.take(&id), Err(Error::Forbidden(_))));
        assert!(matches!(t.take("nope"), Err(Error::Forbidden(_))));
    }

    #[test]
    fn expired_tickets_are_refused() {
        let t = Tickets::default();
        let id = t.mint("alice", "s1", "vm1");
        t.locked().get_mut(&id).unwrap().expires = Instant::now();
        let e = t.take(&id).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
    }

    #[test]
    fn close_reasons_are_short() {
        assert!(short(&"é".repeat(200)).len() <= 120);
        assert_eq!(short("ok"), "ok");
    }
}
