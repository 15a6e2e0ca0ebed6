//! What `lamina sync --status` shows: the watch daemon's last round, kept
//! in `STORE/sync/REMOTE.json` (written whole and renamed into place), and
//! what is queued for the server, computed from the catalog.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::tracking_ref;
use crate::error::{Error, IoContext, Result};
use crate::store::Store;

/// Where the watch daemon stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncState {
    /// The last round reached the server.
    Online,
    /// The last round could not reach the server; working offline.
    Offline,
    /// The last round reached the server but failed.
    Failing,
}

/// The watch daemon's record of its rounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Remote.
    pub remote: String,
    /// State after the last round.
    pub state: SyncState,
    /// Pid of the daemon that wrote this.
    pub pid: u32,
    /// Last round that synced everything, ns since the epoch.
    pub last_success_ns: Option<i64>,
    /// Last round, ns since the epoch.
    pub last_attempt_ns: i64,
    /// Error of the last round, if it failed.
    pub last_error: Option<String>,
    /// Consecutive failed rounds.
    pub failures: u32,
    /// When the next round is due, ns since the epoch.
    pub next_ns: i64,
}

/// Local versions of a layer the server has not got yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueuedLayer {
    /// Layer.
    pub layer: String,
    /// Versions not on the server.
    pub versions: u64,
}

impl SyncStatus {
    fn path(store: &Store, remote: &str) -> PathBuf {
        store.root().join("sync").join(format!("{remote}.json"))
    }

    /// The last status written for `remote`, if any.
    ///
    /// # Errors
    /// An unreadable or damaged file.
    pub fn load(store: &Store, remote: &str) -> Result<Option<SyncStatus>> {
        let p = Self::path(store, remote);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::RecordCorrupt {
                    what: p.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(p, "read sync status", e)),
        }
    }

    /// Writes the status atomically.
    ///
    /// # Errors
    /// I/O failures.
    pub fn save(&self, store: &Store) -> Result<()> {
        let p = Self::path(store, &self.remote);
        let dir = p.parent().unwrap_or(store.root()).to_owned();
        fs::create_dir_all(&dir).ctx(&dir, "create sync directory")?;
        let tmp = dir.join(format!(".{}.{}.tmp", self.remote, std::process::id()));
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        let bytes = serde_json::to_vec_pretty(self).expect("status serialises");
        fs::write(&tmp, bytes).ctx(&tmp, "write sync status")?;
        fs::rename(&tmp, &p).ctx(&p, "write sync status")
    }
}

impl Store {
    /// For each layer tracked from `remote`, how many local versions the
    /// server has not got (as far as this store knows).
    ///
    /// # Errors
    /// Catalog failures.
    pub fn queued(&self, remote: &str) -> Result<Vec<QueuedLayer>> {
        let mut out = Vec::new();
        for name in self.tracked(remote)? {
            let Some(layer) = self.find_layer(&name)? else {
                continue;
            };
            let Some(head) = self.head(&layer)? else {
                continue;
            };
            let server: HashSet<_> = match self.ref_target(&tracking_ref(remote, &name))? {
                Some(s) => self
                    .versions_between(&[s], &HashSet::new())?
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect(),
                None => HashSet::new(),
            };
            let n = self.versions_between(&[head], &server)?.len() as u64;
            out.push(QueuedLayer {
                layer: name,
                versions: n,
            });
        }
        Ok(out)
    }
}
