//! The adapter: the network side of a VM's peripherals, run inside the
//! VM's monitor process for as long as QEMU runs.
//!
//! Each peripheral's link is one task on a small single-threaded runtime:
//!
//! - **connect**: connect to `HOST:PORT` (10 s limit, TLS handshake
//!   included), then to QEMU's chardev socket, and relay both ways until
//!   either side closes; then again, after a backoff of 1 s doubling to
//!   10 s while the peer stays down.
//! - **listen**: accept stations on `ADDR:PORT`, one at a time (a second
//!   one is refused while the first is connected); each is joined to the
//!   guest's device until it goes away.
//!
//! The guest's device is joined only while the network side is connected,
//! so a usbredir or serial session always starts from a fresh connection on
//! both sides. Every state change and byte count goes to `links.json`
//! (written whole, at most 4 times a second).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use super::tls::{self, Config};
use super::{Link, LinkState, Peripheral, PeripheralKind};
use crate::error::{Error, IoContext, Result};

use crate::fsutil::{read_json, write_json};
use crate::monitor::now_ns;
use crate::rundir::RunDir;

/// How long a connection (with its TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A peer silent this long is probed (TCP keepalive) ...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ... every this often, and given up after 3 unanswered probes; data
/// unacknowledged for [`USER_TIMEOUT`] ends the connection too.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// How often `links.json` may be rewritten.
const WRITE_EVERY: Duration = Duration::from_millis(250);

/// A byte stream of either side.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One link's shared state.
pub(super) struct Shared {
    state: Mutex<LinkState>,
    pub(super) to_guest: AtomicU64,
    pub(super) from_guest: AtomicU64,
}

impl Shared {
    pub(super) fn set(&self, state: &str, peer: Option<String>, error: Option<String>) {
        let mut s = self.lock();
        if s.state != state || s.peer != peer {
            s.since_ns = now_ns();
        }
        s.state = state.to_string();
        s.peer = peer;
        if error.is_some() {
            s.last_error = error;
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        // A poisoned lock only means a panicking writer: the state is
        // still a plain value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn snapshot(&self) -> LinkState {
        let mut s = self.lock().clone();
        s.to_guest = self.to_guest.load(Ordering::Relaxed);
        s.from_guest = self.from_guest.load(Ordering::Relaxed);
        s
    }
}

/// The running adapters of one VM (they end with the process).
pub struct Adapters {
    _thread: std::thread::JoinHandle<()>,
}

/// Starts the adapters of the VM whose run dir is `dir`, for the links in
/// its `peripherals.json` ([`write_wanted`]); the file is read again four
/// times a second, so links added to it start and links taken out of it
/// are cut within a second. A link whose TLS files no longer load shows
/// `error`; the VM runs without it.
pub fn start(dir: &RunDir) -> Result<Adapters> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .at(dir.path())?;
    let dir = dir.clone();
    let thread = std::thread::Builder::new()
        .name("peripherals".into())
        .spawn(move || rt.block_on(run_all(dir)))
        .map_err(|e| Error::Invalid(format!("cannot start the peripheral adapters: {e}")))?;
    Ok(Adapters { _thread: thread })
}

/// Sets the links the adapters of the VM in `dir` keep up.
pub fn write_wanted(dir: &RunDir, ps: &[Peripheral]) -> Result<()> {
    write_json(&dir.file(WANTED), &ps)
}

/// Adds `p` to the links of the VM in `dir` (replacing one of its name).
pub fn want(dir: &RunDir, p: &Peripheral) -> Result<()> {
    let mut live = wanted(dir);
    live.retain(|q| q.name != p.name);
    live.push(p.clone());
    write_wanted(dir, &live)
}

/// Takes the link `name` out of the links of the VM in `dir`.
pub fn unwant(dir: &RunDir, name: &str) -> Result<()> {
    let mut live = wanted(dir);
    live.retain(|q| q.name != name);
    write_wanted(dir, &live)
}

/// The links the adapters of the VM in `dir` keep up now.
pub fn wanted(dir: &RunDir) -> Vec<Peripheral> {
    read_json(&dir.file(WANTED)).unwrap_or_default()
}

/// The file of the links wanted now.
const WANTED: &str = "peripherals.json";

struct Running {
    def: Peripheral,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn launch(dir: &RunDir, p: &Peripheral) -> Running {
    let shared = Arc::new(Shared {
        state: Mutex::new(LinkState {
            name: p.name.clone(),
            state: "connecting".into(),
            peer: None,
            to_guest: 0,
            from_guest: 0,
            connections: 0,
            refused: 0,
            queued: 0,
            dropped: 0,
            last_error: None,
            since_ns: now_ns(),
        }),
        to_guest: AtomicU64::new(0),
        from_guest: AtomicU64::new(0),
    });
    let cfg = match p.tls.as_ref().map(|t| tls::config(&p.link, t)).transpose() {
        Ok(c) => c,
        Err(e) => {
            shared.set("error", None, Some(e.to_string()));
            return Running {
                def: p.clone(),
                shared,
                task: None,
            };
        }
    };
    let task = Task {
        shared: shared.clone(),
        guest: p.guest_socket(dir),
        cfg,
        endpoint: p.link.endpoint(),
    };
    let task = match p.link.clone() {
        // A printer's jobs are spooled: none is lost while its server is
        // down, and each goes in a connection of its own.
        Link::Connect { host, port } if p.kind == PeripheralKind::Printer => {
            tokio::spawn(task.printer(host, port))
        }
        Link::Connect { host, port } => tokio::spawn(task.connect(host, port)),
        Link::Listen { addr, port } => tokio::spawn(task.listen(addr, port)),
    };
    Running {
        def: p.clone(),
        shared,
        task: Some(task),
    }
}

async fn run_all(dir: RunDir) {
    let mut running: Vec<Running> = Vec::new();
    let path = dir.file("links.json");
    let mut last: Option<Vec<LinkState>> = None;
    loop {
        let wanted = wanted(&dir);
        // Cut what is no longer wanted (or changed), start what is new.
        running.retain(|r| wanted.contains(&r.def));
        for p in &wanted {
            if !running.iter().any(|r| &r.def == p) {
                tracing::info!(peripheral = %p.name, link = %p.link, "link up");
                running.push(launch(&dir, p));
            }
        }
        let now: Vec<LinkState> = running.iter().map(|l| l.shared.snapshot()).collect();
        if last.as_ref() != Some(&now) {
            if let Err(e) = write_json(&path, &now) {
                tracing::warn!("{e}");
            }
            last = Some(now);
        }
        tokio::time::sleep(WRITE_EVERY).await;
    }
}

pub(super) struct Task {
    pub(super) shared: Arc<Shared>,
    pub(super) guest: PathBuf,
    pub(super) cfg: Option<Config>,
    pub(super) endpoint: String,
}

impl Task {
    async fn connect(self, host: String, port: u16) {
        let mut backoff = Duration::from_secs(1);
        loop {
            self.shared.set("connecting", None, None);
            // Not before QEMU has made the device's socket: a peer is not
            // connected only to be let go again.
            while !self.guest.exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let net = match self.dial_within(&host, port).await {
                Ok(n) => n,
                Err(why) => {
                    self.retry(why, &mut backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            let why = self.session(net, self.endpoint.clone()).await;
            self.retry(why, &mut backoff).await;
        }
    }

    /// Records `why`, shows `retrying` and waits out the backoff.
    pub(super) async fn retry(&self, why: String, backoff: &mut Duration) {
        self.shared.set("retrying", None, Some(why));
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }

    /// [`Task::dial`] within [`CONNECT_TIMEOUT`]; the error says what
    /// went wrong, naming the endpoint.
    pub(super) async fn dial_within(&self, host: &str, port: u16) -> Result<Box<dyn Io>, String> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.dial(host, port)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(format!("{}: {e}", self.endpoint)),
            Err(_) => Err(format!(
                "{}: no answer in {} s",
                self.endpoint,
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    }

    async fn dial(&self, host: &str, port: u16) -> std::io::Result<Box<dyn Io>> {
        let tcp = TcpStream::connect((host, port)).await?;
        tune(&tcp);
        match &self.cfg {
            Some(Config::Client(c)) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| std::io::Error::other(format!("bad TLS server name: {e}")))?;
                let s = tokio_rustls::TlsConnector::from(c.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| std::io::Error::other(format!("TLS: {e}")))?;
                Ok(Box::new(s))
            }
            _ => Ok(Box::new(tcp)),
        }
    }

    /// Joins `net` (from `peer`) to the guest's device until either ends;
    /// says why it ended.
    async fn session(&self, net: Box<dyn Io>, peer: String) -> String {
        let guest = match UnixStream::connect(&self.guest).await {
            Ok(g) => g,
            Err(e) => return format!("the VM's device socket {}: {e}", self.guest.display()),
        };
        self.shared.lock().connections += 1;
        self.shared.set("connected", Some(peer.clone()), None);
        let (mut nr, mut nw) = tokio::io::split(net);
        let (mut gr, mut gw) = tokio::io::split(guest);
        let s = &self.shared;
        tokio::select! {
            r = pump(&mut nr, &mut gw, &s.to_guest) => match r {
                Ok(()) => format!("{peer} closed the connection"),
                Err(e) => format!("{peer}: {e}"),
            },
            r = pump(&mut gr, &mut nw, &s.from_guest) => match r {
                Ok(()) => "the VM closed its device".to_string(),
                Err(e) => format!("{peer}: {e}"),
            },
        }
    }

    async fn listen(self, addr: String, port: u16) {
        let listener = loop {
            match TcpListener::bind((addr.as_str(), port)).await {
                Ok(l) => break l,
                Err(e) => {
                    self.shared.set(
                        "error",
                        None,
                        Some(format!("cannot listen on {}: {e}", self.endpoint)),
                    );
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        self.shared.set("listening", None, None);
        let this = Arc::new(self);
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        loop {
            let (tcp, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    this.shared
                        .set("listening", None, Some(format!("accept: {e}")));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if busy.swap(true, Ordering::SeqCst) {
                let holder = this.shared.lock().peer.clone().unwrap_or_default();
                this.refuse(format!(
                    "refused {from}: the peripheral is in use by {holder}"
                ));
                continue;
            }
            let (this, busy) = (this.clone(), busy.clone());
            tokio::spawn(async move {
                tune(&tcp);
                let net: Box<dyn Io> = match &this.cfg {
                    Some(Config::Server(c)) => {
                        let acc = tokio_rustls::TlsAcceptor::from(c.clone());
                        match tokio::time::timeout(CONNECT_TIMEOUT, acc.accept(tcp)).await {
                            Ok(Ok(s)) => Box::new(s),
                            Ok(Err(e)) => {
                                this.refuse(format!("refused {from}: TLS: {e}"));
                                busy.store(false, Ordering::SeqCst);
                                return;
                            }
                            Err(_) => {
                                this.refuse(format!("refused {from}: no TLS handshake in time"));
                                busy.store(false, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                    _ => Box::new(tcp),
                };
                let why = this.session(net, from.to_string()).await;
                this.shared.set("listening", None, Some(why));
                busy.store(false, Ordering::SeqCst);
            });
        }
    }

    fn refuse(&self, why: String) {
        tracing::info!(link = %self.endpoint, "{why}");
        let mut s = self.shared.lock();
        s.refused += 1;
        s.last_error = Some(why);
    }
}

/// No delay for small writes (serial bytes), and a peer that vanishes
/// without closing (a cable pulled, a host gone) noticed within about a
/// minute instead of never: the link then reconnects.
pub(super) fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let s = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_EVERY)
        .with_retries(3);
    if let Err(e) = s
        .set_tcp_keepalive(&ka)
        .and_then(|()| s.set_tcp_user_timeout(Some(USER_TIMEOUT)))
    {
        tracing::warn!("TCP keepalive: {e}");
    }
}

/// Copies `r` to `w` until EOF, counting in `n`.
async fn pump(
    r: &mut (impl AsyncRead + Unpin),
    w: &mut (impl AsyncWrite + Unpin),
    n: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..k]).await?;
        w.flush().await?;
        n.fetch_add(k as u64, Ordering::Relaxed);
    }
}
