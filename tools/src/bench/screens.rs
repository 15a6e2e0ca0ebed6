//! The screen proxy half of `lamina bench broker`: the broker's WebSocket
//! proxy (browser ⇄ TLS WebSocket ⇄ broker ⇄ HTTP/1.1 upgrade ⇄ host agent ⇄
//! the VM's VNC Unix socket) beside websockify (Debian's) on the same Unix
//! socket, both over TLS with the same certificate, in the same run.
//!
//! The "VNC socket" is a stand-in display in this process: a connection's
//! first byte picks `T` (then a u64: send that many bytes, the screen
//! updates of a busy desktop) or `E` (echo, for round trips). A proxy
//! passes both through unchanged. Figures: throughput toward the browser,
//! round-trip time of a 32-byte message (a key press and its update) with
//! the direct socket's as the floor, and the broker's resident memory per
//! open screen.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::Proc;

/// Bytes per throughput run.
const BULK: u64 = 256 << 20;
/// Round trips per latency run.
const TRIPS: usize = 2000;
/// Screens held open for the memory figure.
const HELD: usize = 50;

/// One proxy's figures.
#[derive(Debug, Serialize)]
pub struct ProxyFigures {
    /// Toward the browser, MB/s (best of 3 runs of 256 MiB).
    pub throughput_mb_s: f64,
    /// Round trip of 32 bytes, µs.
    pub rtt_p50_us: f64,
    /// 99th percentile, µs.
    pub rtt_p99_us: f64,
}

/// What the screen half measured.
#[derive(Debug, Serialize)]
pub struct Screens {
    /// The broker's proxy.
    pub lamina: ProxyFigures,
    /// websockify on the same socket.
    pub websockify: Option<ProxyFigures>,
    /// Why websockify was not measured.
    pub websockify_error: Option<String>,
    /// Round trip on the Unix socket itself, µs (the floor).
    pub direct_rtt_p50_us: f64,
    /// The broker's RSS growth per open screen, KiB.
    pub broker_kib_per_screen: f64,
}

/// Serves the stand-in display on `sock` (in the background).
pub fn display(rt: &tokio::runtime::Runtime, sock: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(sock);
    let l = rt.block_on(async { tokio::net::UnixListener::bind(sock) })?;
    rt.spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                if mode[0] == b'T' {
                    let Ok(n) = s.read_u64().await else { return };
                    let buf = vec![0x5au8; 64 * 1024];
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(buf.len() as u64) as usize;
                        if s.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                        left -= k as u64;
                    }
                    let _ = s.read(&mut mode).await;
                } else {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    Ok(())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A TLS WebSocket to `url` (`wss://127.0.0.1:PORT/…`) trusting `ca`.
async fn connect(url: &str, origin: &str, ca: &Path) -> anyhow::Result<Ws> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let rest = url.strip_prefix("wss://").context("a wss:// URL")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let tcp = tokio::net::TcpStream::connect(hostport).await?;
    tcp.set_nodelay(true)?;
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    let mut req = url.into_client_request()?;
    req.headers_mut().insert("Origin", origin.parse()?);
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse()?);
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
    Ok(ws)
}

async fn bulk(ws: &mut Ws) -> anyhow::Result<f64> {
    let mut m = vec![b'T'];
    m.extend_from_slice(&BULK.to_be_bytes());
    let t = Instant::now();
    ws.send(Message::Binary(m.into())).await?;
    let mut got = 0u64;
    while got < BULK {
        match ws.next().await.context("the proxy closed")?? {
            Message::Binary(b) => got += b.len() as u64,
            Message::Close(_) => anyhow::bail!("closed after {got} bytes"),
            _ => {}
        }
    }
    Ok(BULK as f64 / t.elapsed().as_secs_f64() / 1e6)
}

async fn trips(ws: &mut Ws) -> anyhow::Result<Vec<f64>> {
    ws.send(Message::Binary(vec![b'E'].into())).await?;
    let msg = vec![7u8; 32];
    let mut out = Vec::with_capacity(TRIPS);
    for _ in 0..TRIPS {
        let t = Instant::now();
        ws.send(Message::Binary(msg.clone().into())).await?;
        let mut got = 0;
        while got < msg.len() {
            if let Message::Binary(b) = ws.next().await.context("the proxy closed")?? {
                got += b.len();
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn pct(v: &[f64], p: f64) -> f64 {
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Three bulk runs and one latency run through `open` (a fresh
/// connection each).
async fn measure<F, Fut>(open: F) -> anyhow::Result<ProxyFigures>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Ws>>,
{
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let mut ws = open().await?;
        best = best.max(bulk(&mut ws).await?);
        let _ = ws.close(None).await;
    }
    let mut ws = open().await?;
    let rtt = trips(&mut ws).await?;
    let _ = ws.close(None).await;
    Ok(ProxyFigures {
        throughput_mb_s: best,
        rtt_p50_us: pct(&rtt, 0.5),
        rtt_p99_us: pct(&rtt, 0.99),
    })
}

async fn direct_rtt(sock: &Path) -> anyhow::Result<f64> {
    let mut s = tokio::net::UnixStream::connect(sock).await?;
    s.write_all(b"E").await?;
    let mut v = Vec::with_capacity(TRIPS);
    let mut buf = [0u8; 32];
    for _ in 0..TRIPS {
        let t = Instant::now();
        s.write_all(&[7u8; 32]).await?;
        s.read_exact(&mut buf).await?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    Ok(pct(&v, 0.5))
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// What the screen half needs from the allocation half.
pub struct Target<'a> {
    /// The server's `https://` URL.
    pub url: &'a str,
    /// The server's pid.
    pub pid: u32,
    /// A user's token and their session.
    pub token: &'a str,
    /// That user's session.
    pub session: &'a str,
    /// The CA, certificate and key of the test's TLS.
    pub ca: &'a Path,
    /// Certificate for websockify.
    pub cert: &'a Path,
    /// Its key.
    pub key: &'a Path,
    /// The stand-in display's socket.
    pub display: &'a Path,
}

/// Measures both proxies.
///
/// # Errors
/// The broker's proxy fails.
pub fn run(
    rt: &tokio::runtime::Runtime,
    http: &reqwest::Client,
    t: &Target<'_>,
    note: &dyn Fn(&str),
) -> anyhow::Result<Screens> {
    let ticket_url = format!("{}/api/v1/sessions/{}/ticket", t.url, t.session);
    let wss = t.url.replacen("https://", "wss://", 1);
    let origin = t.url.to_owned();
    let open_lamina = || {
        let (http, ticket_url, wss, origin) = (
            http.clone(),
            ticket_url.clone(),
            wss.clone(),
            origin.clone(),
        );
        let tok = t.token.to_owned();
        let ca = t.ca.to_owned();
        async move {
            let body = http
                .post(&ticket_url)
                .bearer_auth(&tok)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let path = v["websocket"].as_str().context("a ticket")?;
            connect(&format!("{wss}{path}"), &origin, &ca).await
        }
    };
    note("screens: the broker's WebSocket proxy");
    let lamina = rt.block_on(measure(&open_lamina))?;
    let direct = rt.block_on(direct_rtt(t.display))?;

    note("screens: memory per open screen");
    let before = rss_kib(t.pid);
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..HELD {
            let mut ws = open_lamina().await?;
            ws.send(Message::Binary(vec![b'E'].into())).await?;
            held.push(ws);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        anyhow::Ok(held)
    })?;
    let after = rss_kib(t.pid);
    drop(held);
    let per = (after - before).max(0.0) / HELD as f64;

    note("screens: websockify on the same socket");
    let (websockify, websockify_error) = match websockify(rt, t) {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    Ok(Screens {
        lamina,
        websockify,
        websockify_error,
        direct_rtt_p50_us: direct,
        broker_kib_per_screen: per,
    })
}

fn websockify(rt: &tokio::runtime::Runtime, t: &Target<'_>) -> anyhow::Result<ProxyFigures> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("websockify")
        .arg(format!("--cert={}", t.cert.display()))
        .arg(format!("--key={}", t.key.display()))
        .arg("--ssl-only")
        .arg(format!("--unix-target={}", t.display.display()))
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("websockify (apt-get install websockify)")?;
    let _proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "websockify did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("wss://127.0.0.1:{port}/");
    let origin = format!("https://127.0.0.1:{port}");
    let ca: PathBuf = t.ca.to_owned();
    rt.block_on(measure(|| connect(&url, &origin, &ca)))
}

/// The screen figures as lines.
pub fn render(s: &Screens) -> String {
    let mut out = format!(
        "screens: broker WebSocket proxy (TLS) ⇄ host agent ⇄ VNC socket, beside websockify (TLS) on the same socket\n\
         lamina      {:>8.0} MB/s   rtt p50 {:>6.0} µs  p99 {:>6.0} µs\n",
        s.lamina.throughput_mb_s, s.lamina.rtt_p50_us, s.lamina.rtt_p99_us
    );
    match (&s.websockify, &s.websockify_error) {
        (Some(w), _) => {
            out += &format!(
                "websockify  {:>8.0} MB/s   rtt p50 {:>6.0} µs  p99 {:>6.0} µs\n\
                 ratio       {:>8.2}× throughput, {:.2}× rtt p50 (lamina ÷ websockify)\n",
                w.throughput_mb_s,
                w.rtt_p50_us,
                w.rtt_p99_us,
                s.lamina.throughput_mb_s / w.throughput_mb_s.max(1e-9),
                s.lamina.rtt_p50_us / w.rtt_p50_us.max(1e-9)
            );
        }
        (None, Some(e)) => out += &format!("websockify  not measured: {e}\n"),
        (None, None) => {}
    }
    out += &format!(
        "the socket itself: rtt p50 {:.0} µs (added by the broker's path: {:.0} µs)\n\
         broker memory per open screen: {:.0} KiB ({HELD} held)\n",
        s.direct_rtt_p50_us,
        s.lamina.rtt_p50_us - s.direct_rtt_p50_us,
        s.broker_kib_per_screen
    );
    out
}
