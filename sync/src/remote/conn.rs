//! One client connection to a remote: HTTP/2 over TLS (rustls, ring),
//! authenticated with the remote's token.
//!
//! The store's code is synchronous, so a [`Connection`] owns a small tokio
//! runtime (one worker thread) and blocks on each request. The worker also
//! keeps the connection alive between requests: `lamina sync --watch` holds
//! one connection for hours, answering the server's HTTP/2 pings and
//! sending its own.
//!
//! Transport failures (refused, reset, timed out, TLS) are
//! [`Error::RemoteUnreachable`] and are retried with backoff, up to
//! [`ConnectOptions::retries`] times; answers with an error status are
//! [`Error::RemoteRefused`] and are not retried.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::RemoteConfig;
use crate::chunk::Sealed;
use crate::error::{Error, Result};
use crate::id::{ChunkId, VersionId};
use crate::merge::ConflictRecord;
use crate::protocol::{
    ConflictSubmission, ErrorBody, LayerInfo, PushBody, PushResponse, VersionsRequest,
    VersionsResponse, WhoAmI,
};
use crate::transfer::wire::{self, IDS_TYPE, RECORDS_TYPE};
use crate::transfer::{RecordSource, TransferStats};
use crate::version::Version;

/// Largest response body read (a batch of records).
const MAX_RESPONSE_BYTES: usize = 768 * 1024 * 1024;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Retries of a request that failed in transport.
    pub retries: u32,
    /// Keep the connection open between requests, with HTTP/2 pings
    /// (the watch daemon).
    pub keep_alive: bool,
    /// Longest a single request may take.
    pub request_timeout: Duration,
    /// Longest one call may take with all its retries (none: retries are
    /// bounded by their count only). A call past it fails at once.
    pub deadline: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            retries: 3,
            keep_alive: false,
            request_timeout: Duration::from_secs(600),
            deadline: None,
        }
    }
}

/// Versions as a server sent them, with its signatures over them.
pub type SignedVersions = (Vec<(VersionId, Version)>, Vec<crate::sign::VersionSig>);

/// A connection to one remote.
pub struct Connection {
    name: String,
    base: String,
    token: String,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    opts: ConnectOptions,
    /// Bytes sent and received in request and response bodies.
    counters: std::sync::Mutex<(u64, u64)>,
}

/// The outcome of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// The head moved.
    Moved(VersionId),
    /// The server's head was not where expected; it is here now.
    Stale(Option<VersionId>),
}

/// One line out of an error chain, without repeats.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

impl Connection {
    /// A client for `cfg` (nothing is sent yet).
    ///
    /// # Errors
    /// A CA that is not PEM, a client that cannot be built.
    pub fn open(cfg: &RemoteConfig, opts: &ConnectOptions) -> Result<Connection> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lamina-remote")
            .enable_all()
            .build()
            .map_err(|e| Error::io("tokio runtime", "start the network runtime", e))?;
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(cfg.url.starts_with("https://"))
            .user_agent(concat!("lamina/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .timeout(opts.request_timeout)
            .tcp_nodelay(true)
            // As on the server: windows follow the bandwidth-delay product.
            .http2_adaptive_window(true);
        b = if opts.keep_alive {
            b.pool_idle_timeout(None)
                .http2_keep_alive_interval(Duration::from_secs(15))
                .http2_keep_alive_timeout(Duration::from_secs(10))
                .http2_keep_alive_while_idle(true)
        } else {
            b.pool_idle_timeout(Duration::from_secs(30))
        };
        match &cfg.ca_pem {
            Some(pem) => {
                let ca = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| {
                    Error::InvalidInput(format!("the CA of remote {} is not PEM: {e}", cfg.name))
                })?;
                b = b.tls_built_in_root_certs(false).add_root_certificate(ca);
            }
            None => b = b.tls_built_in_native_certs(true),
        }
        let http = b.build().map_err(|e| Error::RemoteUnreachable {
            remote: cfg.name.clone(),
            reason: chain(&e),
        })?;
        Ok(Connection {
            name: cfg.name.clone(),
            base: cfg.url.trim_end_matches('/').to_owned(),
            token: cfg.token.trim().to_owned(),
            http,
            rt,
            opts: opts.clone(),
            counters: std::sync::Mutex::new((0, 0)),
        })
    }

    /// The remote's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Body bytes sent and received so far.
    pub fn bytes(&self) -> (u64, u64) {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unreachable(&self, e: &reqwest::Error) -> Error {
        let line = chain(e);
        let reason = if line.contains("invalid peer certificate") || line.contains("UnknownIssuer")
        {
            format!(
                "the TLS certificate of {} is not trusted ({}): give the CA that signed it with `lamina remote add … --ca CERT`",
                self.base,
                line.rsplit(": ").next().unwrap_or(&line)
            )
        } else if line.contains("NotValidForName") || line.contains("not valid for name") {
            format!(
                "the TLS certificate of {} is for another host name: {line}",
                self.base
            )
        } else if e.is_connect() {
            format!("cannot connect to {}: {line}", self.base)
        } else if e.is_timeout() {
            format!("{} did not answer in time: {line}", self.base)
        } else {
            format!("connection to {} failed: {line}", self.base)
        };
        Error::RemoteUnreachable {
            remote: self.name.clone(),
            reason,
        }
    }

    /// Sends one request (retrying transport failures) and returns the
    /// answer's body.
    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Vec<u8>> {
        let url = format!("{}/api/v1/{path}", self.base);
        let mut attempt = 0u32;
        let started = std::time::Instant::now();
        let left = || {
            self.opts
                .deadline
                .map(|d| d.saturating_sub(started.elapsed()))
        };
        loop {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&self.token);
            if let Some(l) = left() {
                // Connecting and answering both fit in what is left.
                req = req.timeout(l.min(self.opts.request_timeout));
            }
            let sent = body.as_ref().map_or(0, |(_, b)| b.len() as u64);
            if let Some((ct, b)) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, *ct)
                    .body(b.clone());
            }
            let result = self.rt.block_on(async {
                let mut resp = req.send().await?;
                let status = resp.status();
                let mut out = Vec::new();
                while let Some(chunk) = resp.chunk().await? {
                    if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Ok((status, None));
                    }
                    out.extend_from_slice(&chunk);
                }
                Ok::<_, reqwest::Error>((status, Some(out)))
            });
            match result {
                Ok((status, Some(bytes))) => {
                    {
                        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
                        c.0 += sent;
                        c.1 += bytes.len() as u64;
                    }
                    if status.is_success() {
                        return Ok(bytes);
                    }
                    return Err(self.refused(status.as_u16(), &bytes));
                }
                Ok((_, None)) => {
                    return Err(Error::InvalidInput(format!(
                        "remote {}: an answer of more than {MAX_RESPONSE_BYTES} bytes",
                        self.name
                    )))
                }
                Err(e) => {
                    let err = self.unreachable(&e);
                    attempt += 1;
                    let wait = Duration::from_millis(500u64 << attempt.min(5));
                    let in_time = left().is_none_or(|l| l > wait + Duration::from_millis(100));
                    if attempt > self.opts.retries || !in_time {
                        return Err(err);
                    }
                    tracing::info!(error = %err, attempt, "retrying after {wait:?}");
                    std::thread::sleep(wait);
                }
            }
        }
    }

    fn refused(&self, status: u16, body: &[u8]) -> Error {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(b) => Error::RemoteRefused {
                remote: self.name.clone(),
                status,
                kind: b.error.kind,
                message: b.error.message,
            },
            Err(_) => Error::RemoteRefused {
                remote: self.name.clone(),
                status,
                kind: "http".into(),
                message: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(body)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                ),
            },
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let body = self.call(reqwest::Method::GET, path, None)?;
        self.decode(path, &body)
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        let bytes = serde_json::to_vec(body).expect("request serialises");
        let answer = self.call(
            reqwest::Method::POST,
            path,
            Some(("application/json", bytes)),
        )?;
        self.decode(path, &answer)
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T> {
        serde_json::from_slice(body).map_err(|e| {
            Error::InvalidInput(format!(
                "remote {}: unexpected answer to {path}: {e}",
                self.name
            ))
        })
    }

    /// Calls another API served beside the sync API (the broker's): `method`
    /// (`GET`, `POST`, `PUT`, `DELETE`) on `/api/v1/PATH`, JSON both ways.
    ///
    /// # Errors
    /// [`Error::RemoteRefused`] with the server's message, transport
    /// failures.
    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| Error::InvalidInput(format!("no HTTP method {method:?}")))?;
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        let answer = self.call(m, path, body)?;
        if answer.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        self.decode(path, &answer)
    }

    /// Who the token belongs to.
    ///
    /// # Errors
    /// Transport failures, a refused token.
    pub fn whoami(&self) -> Result<WhoAmI> {
        self.get("whoami")
    }

    /// Layers the caller may read.
    ///
    /// # Errors
    /// Transport failures.
    pub fn layers(&self) -> Result<Vec<LayerInfo>> {
        self.get("layers")
    }

    /// One layer, `None` if the server has no such layer.
    ///
    /// # Errors
    /// Transport failures, 403.
    pub fn layer(&self, name: &str) -> Result<Option<LayerInfo>> {
        match self.get(&format!("layers/{name}")) {
            Ok(l) => Ok(Some(l)),
            Err(Error::RemoteRefused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The versions reachable from `want` but not from `have`, decoded and
    /// checked against their ids, parents first.
    ///
    /// # Errors
    /// Transport failures, a version that does not match its id.
    pub fn versions(
        &self,
        layer: &str,
        want: &[VersionId],
        have: &[VersionId],
    ) -> Result<Vec<(VersionId, Version)>> {
        Ok(self.signed_versions(layer, want, have)?.0)
    }

    /// As [`Connection::versions`], with the server's signatures over them
    /// (unchecked here: see [`crate::sign::check`]).
    ///
    /// # Errors
    /// Transport failures, a version that does not match its id.
    pub fn signed_versions(
        &self,
        layer: &str,
        want: &[VersionId],
        have: &[VersionId],
    ) -> Result<SignedVersions> {
        let r: VersionsResponse = self.post(
            &format!("versions/{layer}"),
            &VersionsRequest {
                want: want.to_vec(),
                have: have.to_vec(),
            },
        )?;
        let versions = r
            .versions
            .iter()
            .map(|pv| Ok((pv.id, pv.decode()?)))
            .collect::<Result<_>>()?;
        Ok((versions, r.signatures))
    }

    /// The server's signing keys (none from a server that has none).
    ///
    /// # Errors
    /// Transport failures.
    pub fn keys(&self) -> Result<Vec<crate::sign::PublicKey>> {
        match self.get("keys") {
            Ok(k) => Ok(k),
            // A server from before signing.
            Err(Error::RemoteRefused { status: 404, .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Which of `ids` the server lacks.
    ///
    /// # Errors
    /// Transport failures.
    pub fn missing(&self, layer: &str, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(wire::MAX_IDS) {
            let bits = self.call(
                reqwest::Method::POST,
                &format!("missing/{layer}"),
                Some((IDS_TYPE, wire::encode_ids(batch))),
            )?;
            out.extend(wire::decode_bits(&bits, batch.len())?);
        }
        Ok(out)
    }

    /// The records holding `ids` (not verified yet: see [`wire::open`]).
    ///
    /// # Errors
    /// Transport failures, a malformed stream.
    pub fn fetch(&self, layer: &str, ids: &[ChunkId]) -> Result<Vec<Sealed>> {
        let mut out = Vec::new();
        for batch in ids.chunks(wire::MAX_IDS) {
            let body = self.call(
                reqwest::Method::POST,
                &format!("fetch/{layer}"),
                Some((IDS_TYPE, wire::encode_ids(batch))),
            )?;
            out.extend(
                wire::decode_records(&body)
                    .map_err(|e| Error::InvalidInput(format!("remote {}: {e}", self.name)))?,
            );
        }
        Ok(out)
    }

    /// Sends a record stream; durable on the server when this returns.
    ///
    /// # Errors
    /// Transport failures, records the server rejects.
    pub fn upload(&self, layer: &str, records: Vec<u8>) -> Result<TransferStats> {
        let answer = self.call(
            reqwest::Method::POST,
            &format!("upload/{layer}"),
            Some((RECORDS_TYPE, records)),
        )?;
        self.decode("upload", &answer)
    }

    /// Pushes versions and moves the head.
    ///
    /// # Errors
    /// Transport failures, a push the server refuses (other than stale).
    pub fn push(&self, layer: &str, body: &PushBody) -> Result<PushOutcome> {
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        let bytes = serde_json::to_vec(body).expect("request serialises");
        match self.call(
            reqwest::Method::POST,
            &format!("push/{layer}"),
            Some(("application/json", bytes)),
        ) {
            Ok(answer) => {
                let r: PushResponse = self.decode("push", &answer)?;
                Ok(PushOutcome::Moved(r.head))
            }
            Err(Error::RemoteRefused {
                status: 409, kind, ..
            }) if kind == "stale" => {
                Ok(PushOutcome::Stale(self.layer(layer)?.and_then(|l| l.head)))
            }
            Err(e) => Err(e),
        }
    }

    /// Leaves a conflict on the server for an admin.
    ///
    /// # Errors
    /// Transport failures, a refused submission.
    pub fn submit_conflict(&self, layer: &str, s: &ConflictSubmission) -> Result<ConflictRecord> {
        self.post(&format!("conflicts/{layer}"), s)
    }

    /// A conflict's record, `None` if the server does not know it.
    ///
    /// # Errors
    /// Transport failures.
    pub fn conflict(&self, id: &str) -> Result<Option<ConflictRecord>> {
        match self.get(&format!("conflict/{id}")) {
            Ok(c) => Ok(Some(c)),
            Err(Error::RemoteRefused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Conflicts the caller may see.
    ///
    /// # Errors
    /// Transport failures.
    pub fn conflicts(&self) -> Result<Vec<ConflictRecord>> {
        self.get("conflicts")
    }
}

/// Fetches the records of one layer from a connection.
pub(crate) struct LayerSource<'a> {
    pub conn: &'a Connection,
    pub layer: &'a str,
}

impl RecordSource for LayerSource<'_> {
    fn fetch(&mut self, ids: &[ChunkId]) -> Result<Vec<Sealed>> {
        self.conn.fetch(self.layer, ids)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A server that accepts connections and never answers: counts them.
    fn silent_server() -> (String, Arc<AtomicU32>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", l.local_addr().unwrap());
        let n = Arc::new(AtomicU32::new(0));
        let seen = n.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming().flatten() {
                seen.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        (url, n)
    }

    fn cfg(url: String) -> RemoteConfig {
        RemoteConfig {
            name: "silent".into(),
            url,
            token: "lamina_x_y".into(),
            ca_pem: None,
            user: None,
            added_ns: 0,
            keys: Vec::new(),
        }
    }

    /// Calls a silent server once with these options: the error, and how
    /// many connections the call made.
    fn attempts(retries: u32, timeout_ms: u64, deadline_ms: Option<u64>) -> (Error, u32) {
        let (url, accepted) = silent_server();
        let opts = ConnectOptions {
            retries,
            keep_alive: false,
            request_timeout: Duration::from_millis(timeout_ms),
            deadline: deadline_ms.map(Duration::from_millis),
        };
        let e = Connection::open(&cfg(url), &opts)
            .unwrap()
            .whoami()
            .unwrap_err();
        (e, accepted.load(Ordering::SeqCst))
    }

    #[test]
    fn a_deadline_bounds_a_call_with_its_retries() {
        let (e, n) = attempts(3, 700, Some(1000));
        assert!(matches!(e, Error::RemoteUnreachable { .. }), "{e}");
        // The first attempt took most of the deadline: no retry fits.
        assert_eq!(n, 1);
    }

    #[test]
    fn without_a_deadline_each_retry_is_tried() {
        let (e, n) = attempts(1, 300, None);
        assert!(matches!(e, Error::RemoteUnreachable { .. }), "{e}");
        assert_eq!(n, 2);
    }
}
