//! TLS of peripheral links (rustls, ring): configurations from PEM files.

use std::fmt;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Link, LinkTls};
use crate::error::{Error, Result};

fn bad(path: &Path, why: impl fmt::Display) -> Error {
    Error::Invalid(format!("{}: {why}", path.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let f = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(f))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(path, e))?;
    if certs.is_empty() {
        return Err(bad(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let f = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .map_err(|e| bad(path, e))?
        .ok_or_else(|| bad(path, "no PEM private key in it"))
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| bad(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a link's adapter needs.
pub(crate) enum Config {
    Client(Arc<rustls::ClientConfig>),
    Server(Arc<rustls::ServerConfig>),
}

/// The configuration of `link` with `tls`; names the file that is wrong.
pub(crate) fn config(link: &Link, tls: &LinkTls) -> Result<Config> {
    let pair = match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    match link {
        Link::Connect { .. } => {
            let ca = tls
                .ca
                .as_deref()
                .ok_or_else(|| Error::Invalid("a TLS link that connects needs --tls-ca".into()))?;
            let b = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(ca, e))?
                .with_root_certificates(roots(ca)?);
            let c = match pair {
                Some((c, k)) => b
                    .with_client_auth_cert(certs(c)?, key(k)?)
                    .map_err(|e| bad(k, format!("certificate and key do not fit: {e}")))?,
                None => b.with_no_client_auth(),
            };
            Ok(Config::Client(Arc::new(c)))
        }
        Link::Listen { .. } => {
            let (c, k) = pair.ok_or_else(|| {
                Error::Invalid("a TLS link that listens needs --tls-cert and --tls-key".into())
            })?;
            let b = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(c, e))?;
            let b = match &tls.ca {
                Some(ca) => {
                    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        roots(ca)?,
                        provider(),
                    )
                    .build()
                    .map_err(|e| bad(ca, e))?;
                    b.with_client_cert_verifier(v)
                }
                None => b.with_no_client_auth(),
            };
            let s = b
                .with_single_cert(certs(c)?, key(k)?)
                .map_err(|e| bad(k, format!("certificate and key do not fit: {e}")))?;
            Ok(Config::Server(Arc::new(s)))
        }
    }
}

/// Checks that the files make a configuration.
pub(crate) fn check(link: &Link, tls: &LinkTls) -> Result<()> {
    config(link, tls).map(|_| ())
}
