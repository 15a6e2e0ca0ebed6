//! Merging on one machine, with nobody to ask: a commit made from changes
//! whose layer head moved meanwhile (a sync brought another machine's
//! check-in while a composition was mounted or a disk served) is merged
//! into the head by the layer's policy — `manual` keeps both sides, as
//! there is no admin here to wait for.

use super::conflict::{ConflictRecord, ConflictState};
use super::{Mediation, Take};
use crate::catalog::{now_ns, Batch};
use crate::error::{Error, Result};
use crate::id::VersionId;
use crate::layer::Layer;
use crate::policy::ConflictPolicy;
use crate::store::Store;
use crate::version::Version;

/// This machine's name in conflict copies and records: `$LAMINA_HOST`,
/// else the host name.
pub fn host_name() -> String {
    std::env::var("LAMINA_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "localhost".into())
}

impl ConflictRecord {
    /// The side that lost, kept on [`ConflictRecord::kept_ref`]: the
    /// server's under `client-wins`, else the client's.
    pub fn loser(&self) -> VersionId {
        if self.policy == ConflictPolicy::ClientWins {
            self.server
        } else {
            self.client
        }
    }
}

impl Batch<'_> {
    /// Stores a conflict record and moves its conflict ref to the side it
    /// keeps.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn record_conflict(
        &mut self,
        rec: &ConflictRecord,
        keep: VersionId,
        action: &str,
    ) -> Result<()> {
        let name = rec.kept_ref();
        let old = self.target(&name)?;
        self.move_ref(&name, old, Some(keep), action)?;
        self.put_conflict(rec)
    }
}

impl Store {
    /// Merges `client` into `layer`'s head `server` and moves the head to
    /// the merge (a version with both as parents), with `extra` changes in
    /// the same batch. Returns the new head and the conflicts met.
    ///
    /// # Errors
    /// A head that moved meanwhile, mediator and catalog failures.
    pub fn merge_into_head(
        &self,
        layer: &Layer,
        server: VersionId,
        client: VersionId,
        author: &str,
        what: &str,
        extra: &mut dyn FnMut(&mut Batch<'_>) -> Result<()>,
    ) -> Result<(VersionId, Option<ConflictRecord>)> {
        let policy = match self.conflict_policy(layer)? {
            ConflictPolicy::Manual => ConflictPolicy::KeepBoth,
            p => p,
        };
        let host = host_name();
        let now = now_ns();
        let base = self.merge_base(server, client)?;
        let merged = self.mediate(
            &Mediation {
                base,
                server,
                client,
                host: &host,
                now_ns: now,
            },
            &mut |_| Ok(Take::for_policy(policy)),
        )?;
        let root = merged
            .root
            .ok_or_else(|| Error::InvalidInput("a local merge left a conflict open".into()))?;
        let v = Version {
            layer: layer.id,
            parents: vec![server, client],
            time_ns: now,
            author: author.to_owned(),
            message: format!(
                "merge of a {what} with the head ({} conflicts)",
                merged.items.len()
            ),
            root,
        };
        let mut batch = self.batch()?;
        let id = batch.put_version(&v)?;
        batch.move_head(layer, Some(server), id, &format!("{what} merge"))?;
        let conflict = (!merged.items.is_empty()).then(|| ConflictRecord {
            id: ConflictRecord::new_id(),
            layer: layer.name.clone(),
            host,
            user: String::new(),
            created_ns: now,
            policy,
            base,
            server,
            client,
            merged: Some(id),
            state: ConflictState::Settled,
            items: merged.items,
        });
        if let Some(rec) = &conflict {
            batch.record_conflict(rec, rec.loser(), &format!("{what} merge"))?;
        }
        extra(&mut batch)?;
        self.commit(batch)?;
        Ok((id, conflict))
    }
}
