//! Fetching what the server has and this store lacks: versions first,
//! then their manifests and chunks, landed with the tracking ref.

use std::collections::HashSet;

use super::conn::{Connection, LayerSource};
use super::tracking_ref;
use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::id::VersionId;
use crate::layer::Layer;
use crate::progress::Progress;
use crate::protocol::LayerInfo;
use crate::store::Store;
use crate::transfer::TransferStats;

/// Versions named as "have" when asking the server for its history.
const MAX_HAVE: usize = 20_000;

impl Store {
    /// Checks the signatures over `versions` of `os`/`group` layer `name`
    /// against the keys trusted for `conn`'s remote (learning endorsed
    /// keys and revocations from the server first); returns those to keep.
    /// A remote with no trusted keys does not sign: nothing is checked.
    ///
    /// # Errors
    /// [`Error::Unsigned`] for the first version without a valid
    /// signature; transport and store failures.
    pub(super) fn check_pulled(
        &self,
        conn: &Connection,
        name: &str,
        versions: &[(VersionId, crate::version::Version)],
        sigs: Vec<crate::sign::VersionSig>,
    ) -> Result<Vec<crate::sign::VersionSig>> {
        let cfg = self.remote(conn.name())?;
        if cfg.keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut keep = Vec::new();
        for (id, _) in versions {
            let sig = sigs.iter().find(|s| s.version == *id);
            crate::sign::check(&cfg.keys, *id, sig).map_err(|why| Error::Unsigned {
                layer: name.to_owned(),
                remote: cfg.name.clone(),
                reason: why,
            })?;
            keep.extend(sig.cloned());
        }
        Ok(keep)
    }

    /// Learns the signing keys of `conn`'s remote endorsed by trusted ones,
    /// and revocations (nothing for a remote with no trusted keys).
    ///
    /// # Errors
    /// Transport and store failures.
    pub(super) fn refresh_keys(&self, conn: &Connection) -> Result<()> {
        let mut cfg = self.remote(conn.name())?;
        if cfg.keys.is_empty() {
            return Ok(());
        }
        let before = cfg.keys.clone();
        let added = crate::sign::learn(&mut cfg.keys, &conn.keys()?);
        for k in &added {
            tracing::info!(remote = %cfg.name, key = %k, "trusting a new signing key endorsed by a trusted one");
        }
        if cfg.keys != before {
            self.add_remote(&cfg)?;
        }
        Ok(())
    }

    /// Fetches the server's versions of `name` this store lacks and moves
    /// the tracking ref; creates the local layer if needed.
    pub(super) fn fetch_versions(
        &self,
        conn: &Connection,
        name: &str,
        info: Option<&LayerInfo>,
        progress: &dyn Progress,
    ) -> Result<(u64, TransferStats)> {
        let Some(info) = info else {
            return Ok((0, TransferStats::default()));
        };
        let tref = tracking_ref(conn.name(), name);
        let mut versions = Vec::new();
        let mut stats = TransferStats::default();
        let mut signatures = Vec::new();
        if crate::sign::signed_kind(info.kind) {
            self.refresh_keys(conn)?;
        }
        if let Some(h) = info.head {
            if !self.has_version(h)? {
                let mut starts = Vec::new();
                if let Some(l) = self.find_layer(name)? {
                    starts.extend(self.head(&l)?);
                }
                starts.extend(self.ref_target(&tref)?);
                let mut have: Vec<(i64, VersionId)> = self
                    .versions_between(&starts, &HashSet::new())?
                    .into_iter()
                    .map(|(id, v)| (v.time_ns, id))
                    .collect();
                have.sort_by(|a, b| b.cmp(a));
                have.truncate(MAX_HAVE);
                let have: Vec<VersionId> = have.into_iter().map(|(_, id)| id).collect();
                let (got, sigs) = conn.signed_versions(name, &[h], &have)?;
                versions = got;
                if crate::sign::signed_kind(info.kind) {
                    signatures = self.check_pulled(conn, name, &versions, sigs)?;
                }
                let ids: HashSet<VersionId> = versions.iter().map(|(id, _)| *id).collect();
                if !ids.contains(&h) {
                    return Err(Error::InvalidInput(format!(
                        "remote {} did not send version {} of `{name}`",
                        conn.name(),
                        h.short()
                    )));
                }
                for (id, v) in &versions {
                    if v.layer != info.id {
                        return Err(Error::InvalidInput(format!(
                            "remote {} sent version {} of another layer",
                            conn.name(),
                            id.short()
                        )));
                    }
                    for p in &v.parents {
                        if !ids.contains(p) && !self.has_version(*p)? {
                            return Err(Error::InvalidInput(format!(
                                "remote {} sent an incomplete history: parent {} of {} is missing",
                                conn.name(),
                                p.short(),
                                id.short()
                            )));
                        }
                    }
                }
                let roots: Vec<_> = versions.iter().map(|(_, v)| v.root).collect();
                stats =
                    self.fetch_closure(&roots, &mut LayerSource { conn, layer: name }, progress)?;
            }
        }
        let mut batch = self.batch()?;
        if self.find_layer(name)?.is_none() {
            batch.put_layer(&Layer {
                id: info.id,
                name: name.to_owned(),
                kind: info.kind,
                format: info.format,
                created_ns: now_ns(),
            })?;
        }
        for (_, v) in &versions {
            batch.put_version(v)?;
        }
        for sig in &signatures {
            Store::put_version_sig(&mut batch, sig)?;
        }
        let old = self.ref_target(&tref)?;
        if old != info.head {
            batch.move_ref(&tref, old, info.head, "fetch")?;
        }
        self.track(&mut batch, conn.name(), name)?;
        Store::put_subscription(
            &mut batch,
            conn.name(),
            name,
            &super::Subscription {
                until_ns: info.until_ns,
                grace_secs: info.grace_secs,
                checked_ns: now_ns(),
            },
        )?;
        Store::put_remote_net_policy(&mut batch, conn.name(), name, info.net.as_deref())?;
        self.commit(batch)?;
        Ok((versions.len() as u64, stats))
    }
}
