//! The client side of sync: remotes, and checking layers out and in.
//!
//! * A **remote** ([`RemoteConfig`]) is a server's URL, the token to use and
//!   optionally the CA that signed its certificate, kept in the catalog.
//! * A layer is **tracked** from a remote once it was pulled from or pushed
//!   to it; the ref `remote/REMOTE/LAYER` names the server's head as last
//!   seen, and keeps the fetched versions alive.
//! * [`Connection`] is one HTTP/2 client over TLS to a remote; `Store::sync_layer`
//!   has the operations built on it: pull (check-out), push (check-in) and
//!   sync (pull, merge through the mediator, push).

mod conn;
mod fetch;
mod status;
mod stream;
mod sync;
mod upload;

use serde::{Deserialize, Serialize};

use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::store::Store;

pub use conn::{ConnectOptions, Connection};
pub use status::{QueuedLayer, SyncState, SyncStatus};
pub use stream::{
    load_streamed, remove_streamed, stream_dir, streamed_meta, FetchCounters, RemoteChunks,
    StreamNodes, StreamedVersion,
};
pub use sync::{Action, LayerReport, Mode, SyncOptions};

const REMOTE: &str = "remote";
const TRACKING: &str = "tracking";
/// Catalog record kind of subscriptions as last seen (remote\0layer).
const SUBSCRIPTION: &str = "subscription";

/// A subscription as the server last told it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Its end, ns since the epoch (none: no end).
    pub until_ns: Option<i64>,
    /// Grace past the end, seconds.
    pub grace_secs: u64,
    /// When the server said so, ns since the epoch.
    pub checked_ns: i64,
}

/// A server this store syncs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteConfig {
    /// Local name.
    pub name: String,
    /// Base URL (`https://host:port`).
    pub url: String,
    /// Bearer token.
    pub token: String,
    /// PEM of the CA to trust instead of the system's roots.
    pub ca_pem: Option<String>,
    /// The user the token belongs to (as the server said when added).
    pub user: Option<String>,
    /// When added, ns since the epoch.
    pub added_ns: i64,
    /// The server's signing keys this store trusts (see [`crate::sign`]).
    #[serde(default)]
    pub keys: Vec<crate::sign::TrustedKey>,
}

/// A remote as listed: everything but the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteSummary {
    /// Local name.
    pub name: String,
    /// Base URL.
    pub url: String,
    /// Whether a CA of its own is pinned.
    pub ca: bool,
    /// User.
    pub user: Option<String>,
    /// Layers tracked from it.
    pub layers: Vec<String>,
}

/// Name of the ref holding the server's head of `layer` as last seen.
pub fn tracking_ref(remote: &str, layer: &str) -> String {
    format!("remote/{remote}/{layer}")
}

fn tracking_key(remote: &str, layer: &str) -> String {
    format!("{remote}\0{layer}")
}

/// Checks a URL given for a remote: `https://HOST[:PORT][/]`, or
/// `http://` only when `insecure` (and then only for loopback hosts).
///
/// # Errors
/// [`Error::InvalidInput`] saying what is wrong.
pub fn check_url(url: &str, insecure: bool) -> Result<String> {
    let trimmed = url.trim_end_matches('/');
    let rest = if let Some(r) = trimmed.strip_prefix("https://") {
        r
    } else if let Some(r) = trimmed.strip_prefix("http://") {
        if !insecure {
            return Err(Error::InvalidInput(format!(
                "plain-HTTP URL `{url}` refused: Lamina servers speak TLS, use https:// (or --insecure for a server started with --insecure on loopback)"
            )));
        }
        let host = r.rsplit_once(':').map_or(r, |(h, _)| h);
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            return Err(Error::InvalidInput(format!(
                "plain HTTP is only allowed to a loopback address, not `{host}`"
            )));
        }
        r
    } else {
        return Err(Error::InvalidInput(format!(
            "`{url}` is not an https:// URL"
        )));
    };
    if rest.is_empty() || rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(Error::InvalidInput(format!(
            "`{url}` must be just a scheme, host and port (https://HOST:PORT)"
        )));
    }
    Ok(trimmed.to_owned())
}

impl Store {
    /// Adds (or replaces) a remote.
    ///
    /// # Errors
    /// A bad name, catalog failures.
    pub fn add_remote(&self, cfg: &RemoteConfig) -> Result<()> {
        crate::auth::check_name("remote name", &cfg.name)?;
        let mut batch = self.batch()?;
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        let bytes = serde_json::to_vec(cfg).expect("remote record serialises");
        batch.put_record(REMOTE, &cfg.name, &bytes)?;
        self.commit(batch)
    }

    /// The remote `name`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unknown remote, catalog failures.
    pub fn remote(&self, name: &str) -> Result<RemoteConfig> {
        let bytes = self.record(REMOTE, name)?.ok_or_else(|| {
            Error::InvalidInput(format!(
                "no remote named `{name}` (add it with `lamina remote add`)"
            ))
        })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::RecordCorrupt {
            what: format!("{REMOTE} {name}"),
            reason: e.to_string(),
        })
    }

    /// Records what the server said of `layer`'s subscription (in `batch`).
    pub(crate) fn put_subscription(
        batch: &mut crate::catalog::Batch<'_>,
        remote: &str,
        layer: &str,
        sub: &Subscription,
    ) -> Result<()> {
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        let bytes = serde_json::to_vec(sub).expect("subscription serialises");
        batch.put_record(SUBSCRIPTION, &tracking_key(remote, layer), &bytes)
    }

    /// Refuses `layer` if a remote it is tracked from said its subscription
    /// ends, and that end and its grace have passed since.
    ///
    /// # Errors
    /// [`Error::SubscriptionEnded`]; catalog failures.
    pub fn check_subscription(&self, layer: &str) -> Result<()> {
        let now = now_ns();
        for r in self.remote_configs()? {
            let Some(b) = self.record(SUBSCRIPTION, &tracking_key(&r.name, layer))? else {
                continue;
            };
            let sub: Subscription =
                serde_json::from_slice(&b).map_err(|e| Error::RecordCorrupt {
                    what: format!("{SUBSCRIPTION} {layer}"),
                    reason: e.to_string(),
                })?;
            if let Some(u) = sub.until_ns {
                let grace = i64::try_from(sub.grace_secs).unwrap_or(i64::MAX / 2) * 1_000_000_000;
                if now > u.saturating_add(grace) {
                    return Err(Error::SubscriptionEnded {
                        layer: layer.to_owned(),
                        remote: r.name.clone(),
                        until: crate::catalog::rfc3339(u),
                        grace_secs: sub.grace_secs,
                    });
                }
            }
        }
        Ok(())
    }

    /// Every remote's configuration.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn remote_configs(&self) -> Result<Vec<RemoteConfig>> {
        self.records(REMOTE)?
            .iter()
            .map(|(name, _)| self.remote(name))
            .collect()
    }

    /// Every remote, as listed (no tokens).
    ///
    /// # Errors
    /// Catalog failures.
    pub fn remotes(&self) -> Result<Vec<RemoteSummary>> {
        let mut out = Vec::new();
        for (name, _) in self.records(REMOTE)? {
            let r = self.remote(&name)?;
            out.push(RemoteSummary {
                layers: self.tracked(&name)?,
                name: r.name,
                url: r.url,
                ca: r.ca_pem.is_some(),
                user: r.user,
            });
        }
        Ok(out)
    }

    /// Removes a remote, its tracking records and refs (journalled, so the
    /// versions they kept stay restorable until gc expires the reflog).
    ///
    /// # Errors
    /// An unknown remote, catalog failures.
    pub fn remove_remote(&self, name: &str) -> Result<()> {
        self.remote(name)?;
        let layers = self.tracked(name)?;
        let mut batch = self.batch()?;
        batch.delete_record(REMOTE, name)?;
        for l in layers {
            batch.delete_record(TRACKING, &tracking_key(name, &l))?;
            let r = tracking_ref(name, &l);
            if let Some(v) = self.ref_target(&r)? {
                batch.move_ref(&r, Some(v), None, "remote rm")?;
            }
        }
        self.commit(batch)
    }

    /// Layers tracked from `remote`.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn tracked(&self, remote: &str) -> Result<Vec<String>> {
        let prefix = format!("{remote}\0");
        Ok(self
            .records(TRACKING)?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_owned))
            .collect())
    }

    /// Records that `layer` is tracked from `remote` (in `batch`).
    pub(crate) fn track(
        &self,
        batch: &mut crate::Batch<'_>,
        remote: &str,
        layer: &str,
    ) -> Result<()> {
        batch.put_record(
            TRACKING,
            &tracking_key(remote, layer),
            now_ns().to_string().as_bytes(),
        )
    }

    /// Records that `layer` is no longer tracked from `remote` (in `batch`).
    pub(crate) fn untrack(
        &self,
        batch: &mut crate::Batch<'_>,
        remote: &str,
        layer: &str,
    ) -> Result<()> {
        batch.delete_record(TRACKING, &tracking_key(remote, layer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            check_url("https://h:9443/", false).unwrap(),
            "https://h:9443"
        );
        assert!(check_url("http://h:80", false)
            .unwrap_err()
            .to_string()
            .contains("plain-HTTP"));
        assert!(check_url("http://10.0.0.1:80", true).is_err());
        assert_eq!(
            check_url("http://127.0.0.1:8080", true).unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(check_url("ftp://x", false).is_err());
        assert!(check_url("https://h/path", false).is_err());
    }
}
