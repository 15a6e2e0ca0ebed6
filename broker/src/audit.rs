//! The audit log: every login, allocation, connection, disconnection, admin
//! action and rule-engine action, appended to the catalog (record kind
//! `audit`, keyed by time so a listing is in order).

use lamina_sync::{now_ns, Batch, Store};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{all, new_id, put};

pub(crate) const AUDIT: &str = "audit";

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, ns since the epoch.
    pub at_ns: i64,
    /// Who acted: a user, `rules` (the rule engine) or `cli:USER` (an admin
    /// command on the server's store).
    pub actor: String,
    /// What was done: `login`, `allocate`, `release`, `create`, `destroy`…
    pub action: String,
    /// What it was done to (`pool/VM`, a user…).
    pub target: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// Why, or what came of it.
    pub detail: String,
}

impl AuditEntry {
    /// A successful action.
    pub fn ok(actor: &str, action: &str, target: &str, detail: impl Into<String>) -> AuditEntry {
        AuditEntry {
            at_ns: now_ns(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            ok: true,
            detail: detail.into(),
        }
    }

    /// A refused or failed action.
    pub fn failed(
        actor: &str,
        action: &str,
        target: &str,
        detail: impl Into<String>,
    ) -> AuditEntry {
        AuditEntry {
            ok: false,
            ..AuditEntry::ok(actor, action, target, detail)
        }
    }

    fn key(&self) -> String {
        // Fixed width: keys sort as times do; the suffix keeps two entries
        // of one nanosecond apart.
        format!("{:020}-{}", self.at_ns.max(0), new_id(8))
    }
}

/// Adds entries to a batch (committed with the change they describe).
///
/// # Errors
/// Catalog failures.
pub fn record_in(batch: &mut Batch<'_>, entries: &[AuditEntry]) -> Result<()> {
    for e in entries {
        tracing::info!(
            actor = %e.actor,
            action = %e.action,
            target = %e.target,
            ok = e.ok,
            detail = %e.detail,
            "audit"
        );
        put(batch, AUDIT, &e.key(), e)?;
    }
    Ok(())
}

/// Appends entries on their own.
///
/// # Errors
/// Catalog failures.
pub fn record(store: &Store, entries: &[AuditEntry]) -> Result<()> {
    let mut batch = store.batch()?;
    record_in(&mut batch, entries)?;
    store.commit(batch)?;
    Ok(())
}

/// Entries since `since_ns` (all when `None`), oldest first.
///
/// # Errors
/// Catalog failures.
pub fn list(store: &Store, since_ns: Option<i64>) -> Result<Vec<AuditEntry>> {
    Ok(all::<AuditEntry>(store, AUDIT)?
        .into_iter()
        .filter(|e| since_ns.is_none_or(|s| e.at_ns >= s))
        .collect())
}
