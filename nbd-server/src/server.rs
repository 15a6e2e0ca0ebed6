//! Serving exports over TCP and Unix sockets.
//!
//! Threads: tokio's runtime owns the sockets (accept loops, handshakes,
//! request parsing, reply writing); every export call runs on tokio's
//! blocking pool. Export objects are shared by all connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use lamina_sync::{split_layer_spec, LayerFormat, Store, VersionId};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::base::LayerImage;
use crate::disk::{self, DiskLock};
use crate::error::{Error, IoContext, Result};
use crate::export::{DiskExport, Export, ImageExport, LayerExport};
use crate::proto::handshake::Exports;

/// Exports of a store: every disk (by name) and every disk layer version,
/// read-only (`LAYER@VERSION`, VERSION as `lamina layer` accepts it).
pub struct StoreExports {
    store: Arc<Store>,
    read_only: bool,
    holder: String,
    disks: Mutex<HashMap<String, (Arc<DiskExport>, DiskLock)>>,
    bases: Mutex<HashMap<VersionId, Weak<LayerImage>>>,
    prefetch: bool,
}

impl StoreExports {
    /// Exports of `store` (opened with serve access).
    pub fn new(store: Arc<Store>, read_only: bool) -> StoreExports {
        StoreExports {
            store,
            read_only,
            holder: "lamina serve".into(),
            disks: Mutex::new(HashMap::new()),
            bases: Mutex::new(HashMap::new()),
            prefetch: true,
        }
    }

    /// Whether streamed bases fill in the background (default) or only
    /// fetch what is read.
    #[must_use]
    pub fn prefetch(mut self, on: bool) -> StoreExports {
        self.prefetch = on;
        self
    }

    fn base(&self, version: VersionId, streaming: bool) -> Result<Arc<LayerImage>> {
        let mut bases = self.bases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = bases.get(&version).and_then(Weak::upgrade) {
            return Ok(b);
        }
        let cache = disk::cache_dir(&self.store);
        let b = if streaming {
            let b = Arc::new(LayerImage::open_streamed(&self.store, version, &cache)?);
            if self.prefetch {
                crate::stream::start(Arc::downgrade(&b), self.store.root().to_owned());
            }
            b
        } else {
            Arc::new(LayerImage::open(self.store.clone(), version, Some(&cache))?)
        };
        bases.insert(version, Arc::downgrade(&b));
        Ok(b)
    }

    fn layer_export(&self, name: &str, layer: &str, spec: &str) -> Result<Option<Arc<dyn Export>>> {
        let l = match self.store.layer(layer) {
            Ok(l) => l,
            Err(lamina_sync::Error::LayerNotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if l.format != LayerFormat::Disk {
            return Ok(None);
        }
        let version = match self.store.resolve(&l, spec) {
            Ok(v) => v,
            Err(lamina_sync::Error::VersionNotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(Arc::new(LayerExport::new(
            name,
            self.base(version, false)?,
        ))))
    }

    fn disk_export(&self, name: &str) -> Result<Option<Arc<dyn Export>>> {
        if let Some((d, _)) = self
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(Some(d.clone()));
        }
        let rec = match disk::get(&self.store, name) {
            Ok(r) => r,
            Err(Error::DiskNotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let base = match &rec.base {
            Some(b) => {
                let streaming = b.is_streaming(&self.store)?;
                if !streaming {
                    // A golden layer from a signing remote must carry its
                    // signature (a streamed one was checked when created).
                    disk::check_base(&self.store, b)?;
                }
                Some(self.base(b.version, streaming)?)
            }
            None => None,
        };
        let (export, lock) = disk::open(&self.store, &rec, base, !self.read_only, &self.holder)?;
        let export = Arc::new(export);
        let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        // Another connection may have opened it meanwhile; keep the first.
        if let Some((d, _)) = disks.get(name) {
            return Ok(Some(d.clone()));
        }
        if !self.read_only {
            // `lamina disk commit` reaches this process through it.
            crate::control::serve(
                self.store.root().to_owned(),
                rec.clone(),
                rec.control_socket(&self.store),
                Arc::downgrade(&export),
            )?;
        }
        disks.insert(name.to_owned(), (export.clone(), lock));
        Ok(Some(export))
    }

    fn find(&self, name: &str) -> Result<Option<Arc<dyn Export>>> {
        match split_layer_spec(name) {
            (layer, Some(spec)) => self.layer_export(name, layer, spec),
            (disk, None) => self.disk_export(disk),
        }
    }

    /// Flushes and cleanly closes every open disk.
    pub fn close_all(&self) {
        let disks = std::mem::take(&mut *self.disks.lock().unwrap_or_else(|p| p.into_inner()));
        for (name, (d, _lock)) in disks {
            if let Err(e) = d.close() {
                tracing::warn!(disk = %name, %e, "closing disk");
            }
            if let Ok(rec) = disk::get(&self.store, &name) {
                // Nobody answers on it any more.
                let _ = std::fs::remove_file(rec.control_socket(&self.store));
            }
        }
    }
}

impl Exports for StoreExports {
    fn lookup(&self, name: &str) -> Result<Option<Arc<dyn Export>>> {
        if let Some(e) = self.find(name)? {
            return Ok(Some(e));
        }
        // Created since this server opened the catalog? Look again.
        self.store.refresh()?;
        self.find(name)
    }

    fn list(&self) -> Result<Vec<(String, String)>> {
        self.store.refresh()?;
        let mut out = Vec::new();
        for d in disk::list(&self.store)? {
            let desc = match &d.base {
                Some(b) => format!("disk over {}@{}", b.layer, b.version.short()),
                None => "disk".into(),
            };
            out.push((d.name, desc));
        }
        for l in self.store.layers()? {
            if l.format != LayerFormat::Disk {
                continue;
            }
            for (id, v) in self.store.log(&l)? {
                out.push((
                    format!("{}@{}", l.name, id.short()),
                    format!("read-only: {}", v.message),
                ));
            }
        }
        Ok(out)
    }
}

/// A single image file as the only export.
pub struct FileExports {
    export: Arc<ImageExport>,
}

impl FileExports {
    /// Serves `path` under `name` (empty: the default export).
    ///
    /// # Errors
    /// Unreadable, unsupported or corrupt images.
    pub fn open(path: &Path, name: &str, writable: bool) -> Result<FileExports> {
        Ok(FileExports {
            export: Arc::new(ImageExport::open(path, name, writable)?),
        })
    }

    /// Flushes and closes the image.
    pub fn close_all(&self) {
        if let Err(e) = self.export.close() {
            tracing::warn!(%e, "closing image");
        }
    }
}

impl Exports for FileExports {
    fn lookup(&self, name: &str) -> Result<Option<Arc<dyn Export>>> {
        Ok((name == self.export.name()).then(|| self.export.clone() as Arc<dyn Export>))
    }

    fn list(&self) -> Result<Vec<(String, String)>> {
        Ok(vec![(
            self.export.name().to_owned(),
            self.export.description(),
        )])
    }
}

/// Where to listen.
#[derive(Debug, Clone, Default)]
pub struct Listen {
    /// TCP address (`HOST:PORT`; port 0 picks one).
    pub tcp: Option<String>,
    /// Unix socket path (replaced if it exists).
    pub unix: Option<PathBuf>,
}

/// Builds a TLS acceptor from PEM certificate chain and key files.
///
/// # Errors
/// [`Error::Tls`] naming the file.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).ctx(cert, "open certificate")?,
    ))
    .collect::<std::result::Result<_, _>>()
    .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no certificate found",
            cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).ctx(key, "open key")?,
    ))
    .map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?
    .ok_or_else(|| Error::Tls(format!("{}: no private key found", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Addresses actually bound.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Bound {
    /// TCP address.
    pub tcp: Option<SocketAddr>,
    /// Unix socket.
    pub unix: Option<PathBuf>,
}

/// Serves `exports` until `stop` resolves; then stops accepting, lets
/// connections finish their in-flight requests, and returns. `ready` is
/// called once the listeners are bound.
///
/// # Errors
/// Binding failures.
pub async fn serve(
    exports: Arc<dyn Exports>,
    listen: &Listen,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ready: impl FnOnce(&Bound),
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let tcp = match &listen.tcp {
        Some(a) => Some(TcpListener::bind(a).await.ctx(PathBuf::from(a), "listen")?),
        None => None,
    };
    let unix = match &listen.unix {
        Some(p) => {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(p, "remove old socket", e)),
            }
            Some(UnixListener::bind(p).ctx(p, "listen")?)
        }
        None => None,
    };
    let bound = Bound {
        tcp: tcp.as_ref().and_then(|l| l.local_addr().ok()),
        unix: listen.unix.clone(),
    };
    ready(&bound);
    let (stop_tx, stop_rx) = watch::channel(false);
    let memory = Arc::new(crate::session::Memory::default());
    let mut sessions = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(conn) = accept_tcp(&tcp) => {
                let (s, peer) = conn;
                tracing::debug!(%peer, "connection");
                // Small requests: don't wait to fill packets.
                let _ = s.set_nodelay(true);
                sessions.spawn(crate::session::run(Box::new(s), exports.clone(), tls.clone(), stop_rx.clone(), memory.clone()));
            }
            Some(s) = accept_unix(&unix) => {
                sessions.spawn(crate::session::run(Box::new(s), exports.clone(), tls.clone(), stop_rx.clone(), memory.clone()));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    // Stop reading new requests; answer the ones in flight.
    let _ = stop_tx.send(true);
    while sessions.join_next().await.is_some() {}
    if let Some(p) = &listen.unix {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

async fn accept_tcp(l: &Option<TcpListener>) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await.ok(),
        None => std::future::pending().await,
    }
}

async fn accept_unix(l: &Option<UnixListener>) -> Option<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.ok().map(|(s, _)| s),
        None => std::future::pending().await,
    }
}
