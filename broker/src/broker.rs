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
    /// Its last report failed, but it answered less than [`HOST_GRACE`]
    /// ago: a busy host, not yet a dead one. Its VMs are left as they were
    /// and it takes no new ones.
    Late {
        /// Why the last report failed.
        reason: String,
        /// Seconds since its last good report.
        silent_secs: u64,
    },
    /// It did not answer for longer than [`HOST_GRACE`] (or never did).
    Down {
        /// Why.
        reason: String,
    },
}

/// How long a host that answered before may fail its reports before its
/// VMs count as unknown (and the rule engine replaces them elsewhere). A
/// host busy starting VMs under TCG can miss a 5 s report; it is not dead.
pub const HOST_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// How long the end of a member's work is remembered (far longer than a
/// tick's host poll).
const SETTLED_KEPT: std::time::Duration = std::time::Duration::from_secs(300);

/// A host's status after a poll, from what it was (`prev`: the status
/// and the time of its last good report) and what the poll got. A failed
/// report within [`HOST_GRACE`] of a good one makes the host late, not
/// down.
fn settle(
    prev: Option<&(HostStatus, Instant)>,
    got: HostStatus,
    now: Instant,
) -> (HostStatus, Instant) {
    let last_up = match prev {
        Some((HostStatus::Up { .. } | HostStatus::Late { .. }, at)) => Some(*at),
        _ => None,
    };
    match (got, last_up) {
        (HostStatus::Down { reason }, Some(at)) if now.duration_since(at) < HOST_GRACE => (
            HostStatus::Late {
                reason,
                silent_secs: now.duration_since(at).as_secs(),
            },
            at,
        ),
        (got, _) => (got, now),
    }
}

/// The broker.
pub struct Broker {
    pub(crate) gate: Arc<Gate>,
    pub(crate) lock: tokio::sync::Mutex<()>,
    clients: Mutex<HashMap<String, (Host, AgentClient)>>,
    pub(crate) status: Mutex<HashMap<String, (HostStatus, Instant)>>,
    /// Members with work in flight on their host.
    pub(crate) pending: Mutex<HashSet<String>>,
    /// When work on a member last ended: a host report taken before that
    /// does not know the outcome yet.
    settled: Mutex<HashMap<String, Instant>>,
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
            settled: Mutex::new(HashMap::new()),
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
        let got: Vec<(String, HostStatus)> = futures_util::future::join_all(asks).await;
        let mut status = locked(&self.status);
        status.retain(|name, _| got.iter().any(|(n, _)| n == name));
        let mut out = HashMap::new();
        for (name, s) in got {
            let prev = status.get(&name);
            let was_up = matches!(
                prev.map(|x| &x.0),
                Some(HostStatus::Up { .. } | HostStatus::Late { .. })
            );
            let (s, at) = settle(prev, s, Instant::now());
            match &s {
                HostStatus::Up { .. } if !was_up => tracing::info!(host = %name, "host is up"),
                HostStatus::Late { reason, .. } => {
                    tracing::warn!(host = %name, %reason, "host is late with its report")
                }
                HostStatus::Down { reason } if was_up => {
                    tracing::warn!(host = %name, %reason, "host is down")
                }
                _ => {}
            }
            status.insert(name.clone(), (s.clone(), at));
            out.insert(name, s);
        }
        Ok(out)
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
            let mut settled = locked(&self.settled);
            settled.retain(|_, at| at.elapsed() < SETTLED_KEPT);
            settled.insert(member.to_owned(), Instant::now());
        }
    }

    /// Members with work in flight.
    pub(crate) fn pending_set(&self) -> HashSet<String> {
        locked(&self.pending).clone()
    }

    /// Members whose work ended at or after `polled`: a host report taken
    /// then does not know the outcome.
    pub(crate) fn settled_since(&self, polled: Instant) -> HashSet<String> {
        locked(&self.settled)
            .iter()
            .filter(|(_, at)| **at >= polled)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn up() -> HostStatus {
        HostStatus::Up {
            report: HostReport {
                cpus: 2,
                load1: 0.0,
                mem_total: 1,
                mem_available: 1,
                mem_capacity: 1,
                mem_committed: 0,
                mem_free: 1,
                vms: Vec::new(),
            },
        }
    }

    fn down() -> HostStatus {
        HostStatus::Down {
            reason: "timed out".into(),
        }
    }

    #[test]
    fn work_that_ends_after_a_poll_is_left_alone_by_that_tick() {
        // A VM whose creation ends between a tick's host poll and its plan
        // is missing from the poll's reports: the plan must not forget it.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        Store::init(&root).unwrap();
        let b = Broker::new(Gate::open(&root).unwrap());
        b.set_pending("p-1", true);
        let polled = Instant::now();
        assert!(b.pending_set().contains("p-1"), "in flight");
        b.set_pending("p-1", false);
        assert!(!b.pending_set().contains("p-1"));
        assert!(
            b.settled_since(polled).contains("p-1"),
            "ended after the poll"
        );
        std::thread::sleep(Duration::from_millis(2));
        let later = Instant::now();
        assert!(
            !b.settled_since(later).contains("p-1"),
            "known to a later poll"
        );
    }

    #[test]
    fn a_host_that_misses_reports_is_late_then_down() {
        let t0 = Instant::now();
        let (s, at) = settle(None, down(), t0);
        assert!(matches!(s, HostStatus::Down { .. }), "never answered: down");
        assert_eq!(at, t0);

        let good = settle(None, up(), t0);
        assert!(matches!(good.0, HostStatus::Up { .. }));
        let t1 = t0 + Duration::from_secs(7);
        let late = settle(Some(&good), down(), t1);
        match &late.0 {
            HostStatus::Late { silent_secs, .. } => assert_eq!(*silent_secs, 7),
            other => panic!("late expected, got {other:?}"),
        }
        assert_eq!(late.1, t0, "the time of the last good report stays");
        let still = settle(Some(&late), down(), t0 + Duration::from_secs(15));
        assert!(matches!(still.0, HostStatus::Late { .. }));
        let gone = settle(Some(&still), down(), t0 + HOST_GRACE);
        assert!(matches!(gone.0, HostStatus::Down { .. }), "{:?}", gone.0);
        let after = settle(
            Some(&gone),
            down(),
            t0 + HOST_GRACE + Duration::from_secs(1),
        );
        assert!(matches!(after.0, HostStatus::Down { .. }));
        let back = settle(Some(&after), up(), t0 + HOST_GRACE * 2);
        assert!(matches!(back.0, HostStatus::Up { .. }));
    }
}
