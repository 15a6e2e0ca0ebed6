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
                versions = conn.versions(name, &[h], &have)?;
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
        let old = self.ref_target(&tref)?;
        if old != info.head {
            batch.move_ref(&tref, old, info.head, "fetch")?;
        }
        self.track(&mut batch, conn.name(), name)?;
        self.commit(batch)?;
        Ok((versions.len() as u64, stats))
    }
}
