//! The broker's shared state: the store (through the sync API's gate), one
//! lock under which every decision over pool VMs and sessions is taken, the
//! clients of the host agents and their last reports.
//!
//! Decisions are quick (catalog reads and one batch); the slow work on a
//! host (creating, starting, resetting a VM) runs outside the lock, on a
//! member marked *pending*, which nobody else touches until it is done.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lamina_sync::api::Gate;
use lamina_sync::Store;
use serde::Serialize;

use crate::agent::{blocking, AgentClient, HostReport};
use crate::audit::{self, AuditEntry};
use crate::error::{Error, Result};
use crate::model::{self, Host, Member, Session, HOST, MEMBER, SESSION};

/// A host's last report, or why there is none.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum HostStatus {
    /// It answered.
    Up {
        /// What it said.
        report: HostReport,
    },
    /// It did not.
    Down {
        /// Why.
        reason: String,
    },
}

/// The broker.
pub struct Broker {
    pub(crate) gate: Arc<Gate>,
    pub(crate) lock: tokio::sync::Mutex<()>,
    clients: Mutex<HashMap<String, (Host, AgentClient)>>,
    pub(crate) status: Mutex<HashMap<String, (HostStatus, Instant)>>,
    /// Members with work in flight on their host.
    pub(crate) pending: Mutex<HashSet<String>>,
    /// Wakes the rule engine early.
    pub(crate) wake: tokio::sync::Notify,
    /// Requests for desktops waiting for the lock.
    pub(crate) asks: crate::alloc::Asks,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Broker {
    /// A broker over the store behind `gate`.
    pub fn new(gate: Arc<Gate>) -> Arc<Broker> {
        Arc::new(Broker {
            gate,
            lock: tokio::sync::Mutex::new(()),
            clients: Mutex::new(HashMap::new()),
            status: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashSet::new()),
            wake: tokio::sync::Notify::new(),
            asks: Default::default(),
        })
    }

    /// Reads the catalog on the blocking pool.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let gate = self.gate.clone();
        blocking(move || {
            let store = gate.read()?;
            f(&store)
        })
        .await
    }

    /// Writes the catalog on the blocking pool.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let gate = self.gate.clone();
        blocking(move || {
            let store = gate.write()?;
            f(&store)
        })
        .await
    }

    /// Stores members and sessions (`None`: delete) and audit entries in
    /// one batch.
    pub(crate) async fn save(
        &self,
        members: Vec<(String, Option<Member>)>,
        sessions: Vec<(String, Option<Session>)>,
        entries: Vec<AuditEntry>,
    ) -> Result<()> {
        self.write(move |store| {
            let mut batch = store.batch()?;
            for (name, m) in &members {
                match m {
                    Some(m) => model::put(&mut batch, MEMBER, name, m)?,
                    None => batch.delete_record(MEMBER, name)?,
                }
            }
            for (id, s) in &sessions {
                match s {
                    Some(s) => model::put(&mut batch, SESSION, id, s)?,
                    None => batch.delete_record(SESSION, id)?,
                }
            }
            audit::record_in(&mut batch, &entries)?;
            store.commit(batch)?;
            Ok(())
        })
        .await
    }

    /// The client of host `name` (made again when its record changed).
    pub(crate) async fn client(&self, name: &str) -> Result<AgentClient> {
        let n = name.to_owned();
        let host: Host = self
            .read(move |s| {
                model::get(s, HOST, &n)?
                    .ok_or_else(|| Error::NotFound(format!("no host named {n:?}")))
            })
            .await?;
        let mut clients = locked(&self.clients);
        if let Some((h, c)) = clients.get(name) {
            if *h == host {
                return Ok(c.clone());
            }
        }
        let c = AgentClient::new(&host)?;
        clients.insert(name.to_owned(), (host, c.clone()));
        Ok(c)
    }

    /// Asks every host for its report (at once), remembers and returns
    /// them.
    pub(crate) async fn poll_hosts(&self) -> Result<HashMap<String, HostStatus>> {
        let hosts: Vec<Host> = self.read(|s| model::all(s, HOST)).await?;
        let asks = hosts.iter().map(|h| async move {
            let status = match self.client(&h.name).await {
                Ok(c) => match c.report().await {
                    Ok(report) => HostStatus::Up { report },
                    Err(e) => HostStatus::Down {
                        reason: e.to_string(),
                    },
                },
                Err(e) => HostStatus::Down {
                    reason: e.to_string(),
                },
            };
            (h.name.clone(), status)
        });
        let got: HashMap<String, HostStatus> = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .collect();
        let mut status = locked(&self.status);
        status.retain(|name, _| got.contains_key(name));
        for (name, s) in &got {
            let changed = matches!(
                (status.get(name).map(|x| &x.0), s),
                (Some(HostStatus::Up { .. }), HostStatus::Down { .. })
                    | (Some(HostStatus::Down { .. }) | None, HostStatus::Up { .. })
            );
            if changed {
                match s {
                    HostStatus::Up { .. } => tracing::info!(host = %name, "host is up"),
                    HostStatus::Down { reason } => {
                        tracing::warn!(host = %name, %reason, "host is down")
                    }
                }
            }
            status.insert(name.clone(), (s.clone(), Instant::now()));
        }
        Ok(got)
    }

    /// The hosts' last known status.
    pub fn host_status(&self) -> HashMap<String, HostStatus> {
        locked(&self.status)
            .iter()
            .map(|(k, (s, _))| (k.clone(), s.clone()))
            .collect()
    }

    pub(crate) fn is_pending(&self, member: &str) -> bool {
        locked(&self.pending).contains(member)
    }

    pub(crate) fn set_pending(&self, member: &str, on: bool) {
        let mut p = locked(&self.pending);
        if on {
            p.insert(member.to_owned());
        } else {
            p.remove(member);
        }
    }
}
