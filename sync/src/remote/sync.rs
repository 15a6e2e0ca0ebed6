//! Check-out, check-in and two-way sync of one layer with a remote.
//!
//! Every operation starts by fetching what the server has and this store
//! lacks (versions, then their manifests and chunks; see
//! [`Store::fetch_closure`]); the versions land with the move of the
//! tracking ref `remote/R/LAYER`, in one batch. Then, with `L` the local
//! head and `S` the server's:
//!
//! | case                     | pull              | push               | sync                      |
//! |--------------------------|-------------------|--------------------|---------------------------|
//! | `L == S`                 | up to date        | up to date         | up to date                |
//! | `L` behind `S`           | fast-forward `L`  | (nothing to send)  | fast-forward `L`          |
//! | `L` ahead of `S`         | (ahead)           | push               | push                      |
//! | diverged                 | merge locally     | refused: sync      | merge, push the merge     |
//!
//! A push sends only what the server lacks: the [`Delta`] of the new
//! versions over their parents is asked about (`missing`), data goes first
//! and manifest nodes after (children before parents), in durable batches;
//! then the versions and the head move by compare-and-swap on `S`. If the
//! server's head moved meanwhile (409), sync starts over from the fetch.
//!
//! A merge uses the server's conflict policy. `manual` conflicts are left
//! on the server (the client's versions uploaded, no head moved) and
//! reported as pending until an admin resolves them; the resolution then
//! reaches the client as an ordinary fast-forward.

use serde::Serialize;

use super::conn::{Connection, PushOutcome};
use super::tracking_ref;
use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::id::VersionId;
use crate::layer::Layer;
use crate::merge::{ConflictRecord, ConflictState, Mediation, Take};
use crate::policy::ConflictPolicy;
use crate::progress::Progress;
use crate::protocol::{ConflictSubmission, LayerInfo, NewLayer, PushBody};
use crate::store::Store;
use crate::transfer::{PushRequest, PushedVersion, TransferStats};
use crate::version::Version;

/// Rounds of fetch–merge–push before giving up on a busy layer.
const MAX_ROUNDS: usize = 5;

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Check out / update from the server; merge locally if diverged.
    Pull,
    /// Check in; refuse if the server moved.
    Push,
    /// Pull, merge, push.
    Sync,
}

/// Settings of an operation.
pub struct SyncOptions<'a> {
    /// This machine's name (in conflict copies and records).
    pub host: String,
    /// Author of merge versions.
    pub author: String,
    /// Progress sink.
    pub progress: &'a dyn Progress,
}

/// What happened to a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Nothing to do.
    UpToDate,
    /// The local layer was created from the server's.
    CheckedOut,
    /// The local head moved forward to the server's.
    FastForward,
    /// The server's head moved forward to ours.
    Pushed,
    /// Both had changed; a merge was made (and pushed, in a sync).
    Merged,
    /// Ahead of the server (pull only).
    Ahead,
    /// Conflicts wait for an admin on the server (policy `manual`).
    Pending,
}

impl Action {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::UpToDate => "up-to-date",
            Action::CheckedOut => "checked-out",
            Action::FastForward => "fast-forward",
            Action::Pushed => "pushed",
            Action::Merged => "merged",
            Action::Ahead => "ahead",
            Action::Pending => "pending",
        }
    }
}

/// The outcome for one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Layer.
    pub layer: String,
    /// What happened.
    pub action: Action,
    /// Local head afterwards.
    pub local: Option<VersionId>,
    /// The server's head afterwards, as known here.
    pub server: Option<VersionId>,
    /// Versions received.
    pub versions_received: u64,
    /// Versions sent.
    pub versions_sent: u64,
    /// Records received.
    pub received: TransferStats,
    /// Records sent.
    pub sent: TransferStats,
    /// The conflict met, if any.
    pub conflict: Option<ConflictRecord>,
}

impl Store {
    /// Pulls, pushes or syncs layer `name` with `conn` (see the module doc).
    ///
    /// # Errors
    /// Layers that are not copies of each other, a push onto a diverged
    /// server, transport failures, refused requests, store failures.
    pub fn sync_layer(
        &self,
        conn: &Connection,
        name: &str,
        mode: Mode,
        opts: &SyncOptions<'_>,
    ) -> Result<LayerReport> {
        self.require_write()?;
        let mut report = LayerReport {
            layer: name.to_owned(),
            action: Action::UpToDate,
            local: None,
            server: None,
            versions_received: 0,
            versions_sent: 0,
            received: TransferStats::default(),
            sent: TransferStats::default(),
            conflict: None,
        };
        for _ in 0..MAX_ROUNDS {
            let info = conn.layer(name)?;
            let local = self.find_layer(name)?;
            match (&info, &local) {
                (None, None) => {
                    return Err(Error::LayerNotFound {
                        name: name.to_owned(),
                    })
                }
                (None, Some(_)) if mode == Mode::Pull => {
                    return Err(Error::RemoteRefused {
                        remote: conn.name().to_owned(),
                        status: 404,
                        kind: "not-found".into(),
                        message: format!("no layer named `{name}` there"),
                    })
                }
                (Some(i), Some(l)) if i.id != l.id => {
                    return Err(Error::InvalidInput(format!(
                        "layer `{name}` here (id {}) and on remote {} (id {}) are different layers: one was not checked out from the other",
                        l.id,
                        conn.name(),
                        i.id
                    )))
                }
                _ => {}
            }
            let created = local.is_none();
            let (n, got) = self.fetch_versions(conn, name, info.as_ref(), opts.progress)?;
            report.versions_received += n;
            report.received.add(&got);
            let layer = self.layer(name)?;
            let server = info.as_ref().and_then(|i| i.head);
            let local_head = self.head(&layer)?;
            report.server = server;
            report.local = local_head;
            match (local_head, server) {
                (None, None) => return Ok(report),
                (Some(l), Some(s)) if l == s => {
                    self.settle_pending(conn, name)?;
                    return Ok(report);
                }
                (None, Some(s)) => {
                    self.move_local(&layer, None, s, conn.name())?;
                    report.local = Some(s);
                    report.action = if created {
                        Action::CheckedOut
                    } else {
                        Action::FastForward
                    };
                    return Ok(report);
                }
                (Some(l), Some(s)) if self.is_ancestor(l, s)? => {
                    self.move_local(&layer, Some(l), s, conn.name())?;
                    self.settle_pending(conn, name)?;
                    report.local = Some(s);
                    report.action = Action::FastForward;
                    return Ok(report);
                }
                (Some(l), s)
                    if match s {
                        None => true,
                        Some(s) => self.is_ancestor(s, l)?,
                    } =>
                {
                    if mode == Mode::Pull {
                        report.action = Action::Ahead;
                        return Ok(report);
                    }
                    match self.push_head(
                        conn,
                        &layer,
                        info.as_ref(),
                        s,
                        l,
                        Vec::new(),
                        Vec::new(),
                        "push",
                        opts,
                        &mut report,
                    )? {
                        PushOutcome::Moved(_) => {
                            report.action = Action::Pushed;
                            report.server = Some(l);
                            return Ok(report);
                        }
                        PushOutcome::Stale(_) => continue,
                    }
                }
                (Some(l), server_head) => {
                    // Both are set here: every other case returned above.
                    let Some(s) = server_head else { continue };
                    if mode == Mode::Push {
                        return Err(Error::RefConflict {
                            name: format!(
                                "{name} on remote {} (both sides changed: `lamina sync` merges them)",
                                conn.name()
                            ),
                            expected: l.short(),
                            found: s.short(),
                        });
                    }
                    let policy = info
                        .as_ref()
                        .map_or(ConflictPolicy::default_for(layer.kind), |i| i.policy);
                    let base = self.merge_base(l, s)?;
                    let now = now_ns();
                    let merged = self.mediate(
                        &Mediation {
                            base,
                            server: s,
                            client: l,
                            host: &opts.host,
                            now_ns: now,
                        },
                        &mut |_| Ok(Take::for_policy(policy)),
                    )?;
                    let mut record = (!merged.items.is_empty()).then(|| ConflictRecord {
                        id: ConflictRecord::new_id(),
                        layer: name.to_owned(),
                        host: opts.host.clone(),
                        user: String::new(),
                        created_ns: now,
                        policy,
                        base,
                        server: s,
                        client: l,
                        merged: None,
                        state: ConflictState::Settled,
                        items: merged.items.clone(),
                    });
                    let Some(root) = merged.root else {
                        // Manual: leave it on the server (sync) or say so.
                        let mut rec = record.take().ok_or_else(|| {
                            Error::InvalidInput("a pending merge without conflicts".into())
                        })?;
                        rec.state = ConflictState::Pending;
                        if mode == Mode::Sync {
                            rec = self.submit_pending(conn, &layer, s, rec, opts, &mut report)?;
                        }
                        report.action = Action::Pending;
                        report.conflict = Some(rec);
                        return Ok(report);
                    };
                    let version = Version {
                        layer: layer.id,
                        parents: vec![s, l],
                        time_ns: now,
                        author: opts.author.clone(),
                        message: match &record {
                            Some(r) => format!(
                                "merge of {}'s changes with {} ({} conflicts, {})",
                                opts.host,
                                conn.name(),
                                r.items.len(),
                                policy
                            ),
                            None => {
                                format!("merge of {}'s changes with {}", opts.host, conn.name())
                            }
                        },
                        root,
                    };
                    let mut batch = self.batch()?;
                    let m = batch.put_version(&version)?;
                    batch.move_head(&layer, Some(l), m, "merge")?;
                    let mut refs = Vec::new();
                    if let Some(r) = record.as_mut() {
                        r.merged = Some(m);
                        refs.push((r.kept_ref(), r.loser()));
                        batch.record_conflict(r, r.loser(), "merge")?;
                    }
                    self.commit(batch)?;
                    report.local = Some(m);
                    report.conflict = record.clone();
                    report.action = Action::Merged;
                    if mode == Mode::Pull {
                        return Ok(report);
                    }
                    let conflicts: Vec<ConflictRecord> = record.into_iter().collect();
                    match self.push_head(
                        conn,
                        &layer,
                        info.as_ref(),
                        Some(s),
                        m,
                        refs,
                        conflicts,
                        "merge",
                        opts,
                        &mut report,
                    )? {
                        PushOutcome::Moved(_) => {
                            report.server = Some(m);
                            return Ok(report);
                        }
                        PushOutcome::Stale(_) => continue,
                    }
                }
            }
        }
        Err(Error::RefConflict {
            name: format!("{name} on remote {}", conn.name()),
            expected: "a quiet moment".into(),
            found: format!("a head that moved {MAX_ROUNDS} times during this sync"),
        })
    }

    fn move_local(
        &self,
        layer: &Layer,
        from: Option<VersionId>,
        to: VersionId,
        remote: &str,
    ) -> Result<()> {
        let mut batch = self.batch()?;
        batch.move_head(layer, from, to, &format!("pull from {remote}"))?;
        self.commit(batch)
    }

    /// Uploads and pushes `new` onto the server's `expected` head.
    #[allow(clippy::too_many_arguments)]
    fn push_head(
        &self,
        conn: &Connection,
        layer: &Layer,
        info: Option<&LayerInfo>,
        expected: Option<VersionId>,
        new: VersionId,
        refs: Vec<(String, VersionId)>,
        conflicts: Vec<ConflictRecord>,
        action: &str,
        opts: &SyncOptions<'_>,
        report: &mut LayerReport,
    ) -> Result<PushOutcome> {
        let versions =
            self.upload_history(conn, &layer.name, expected, new, opts.progress, report)?;
        let body = PushBody {
            create: info.is_none().then_some(NewLayer {
                id: layer.id,
                kind: layer.kind,
                format: layer.format,
            }),
            push: PushRequest {
                expected,
                new,
                versions: versions.iter().map(|(_, v)| PushedVersion::of(v)).collect(),
                refs,
                action: format!("{action} from {}", opts.host),
            },
            conflicts,
        };
        let outcome = conn.push(&layer.name, &body)?;
        if let PushOutcome::Moved(head) = outcome {
            report.versions_sent += versions.len() as u64;
            let tref = tracking_ref(conn.name(), &layer.name);
            let mut batch = self.batch()?;
            let old = self.ref_target(&tref)?;
            if old != Some(head) {
                batch.move_ref(&tref, old, Some(head), "push")?;
            }
            self.track(&mut batch, conn.name(), &layer.name)?;
            self.commit(batch)?;
        }
        Ok(outcome)
    }

    /// Leaves a manual conflict on the server and records it here.
    fn submit_pending(
        &self,
        conn: &Connection,
        layer: &Layer,
        server: VersionId,
        record: ConflictRecord,
        opts: &SyncOptions<'_>,
        report: &mut LayerReport,
    ) -> Result<ConflictRecord> {
        // One pending conflict per layer here: reuse its id.
        let mut record = record;
        if let Some(old) = self
            .conflicts()?
            .into_iter()
            .find(|c| c.state == ConflictState::Pending && c.layer == layer.name)
        {
            record.id = old.id;
        }
        let versions = self.upload_history(
            conn,
            &layer.name,
            Some(server),
            record.client,
            opts.progress,
            report,
        )?;
        report.versions_sent += versions.len() as u64;
        let stored = conn.submit_conflict(
            &layer.name,
            &ConflictSubmission {
                record: record.clone(),
                versions: versions.iter().map(|(_, v)| PushedVersion::of(v)).collect(),
            },
        )?;
        let mut local = stored.clone();
        local.state = ConflictState::Pending;
        let mut batch = self.batch()?;
        batch.put_conflict(&local)?;
        self.commit(batch)?;
        Ok(stored)
    }

    /// Marks this store's pending conflicts of `name` resolved once the
    /// server no longer holds them as pending.
    fn settle_pending(&self, conn: &Connection, name: &str) -> Result<()> {
        for c in self.conflicts()? {
            if c.state != ConflictState::Pending || c.layer != name {
                continue;
            }
            let still = conn
                .conflict(&c.id)?
                .is_some_and(|s| s.state == ConflictState::Pending);
            if !still {
                let mut done = c.clone();
                done.state = ConflictState::Resolved;
                let mut batch = self.batch()?;
                batch.put_conflict(&done)?;
                self.commit(batch)?;
            }
        }
        Ok(())
    }
}
