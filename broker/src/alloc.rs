//! The allocator: hands a subscribed user a desktop of a pool.
//!
//! Under the broker's lock, in this order: the user's live session of the
//! pool (the same VM again); in a pool that is not stateless, the VM the
//! user owns (started if stopped); an idle VM; a new VM if the pool is
//! under `max`; else "pool full". The choice and the session are recorded
//! in one batch before the lock is released, so no VM is ever given to two
//! users; starting a VM happens outside the lock on a member marked
//! pending.

use std::sync::Arc;

use lamina_sync::{now_ns, Caller};
use serde::Serialize;

use crate::agent::CreateVm;
use crate::audit::AuditEntry;
use crate::broker::Broker;
use crate::engine;
use crate::error::{Error, Result};
use crate::model::{
    self, new_id, Member, MemberState, Pool, Session, Subscription, MEMBER, POOL, SESSION,
    SUBSCRIPTION,
};

/// What a user gets: a session on a VM.
#[derive(Debug, Clone, Serialize)]
pub struct Desktop {
    /// The session.
    pub session: Session,
    /// Its VM's display profile (`pc`, `phone`).
    pub profile: Option<String>,
    /// The screen's size for that profile.
    pub width: u32,
    /// The screen's height.
    pub height: u32,
    /// Whether the user's existing session was handed back.
    pub reused: bool,
    /// Whether a VM had to be started for it.
    pub started: bool,
}

/// What the allocator decided under the lock.
pub(crate) enum Choice {
    Ready(Desktop),
    /// A VM to create or start first.
    Start {
        member: Member,
        create: bool,
    },
}

pub(crate) fn geometry(profile: Option<&str>) -> (u32, u32) {
    match profile {
        Some("phone") => lamina_vm::Profile::Phone.geometry(),
        _ => lamina_vm::Profile::Pc.geometry(),
    }
}

fn desktop(session: Session, m: &Member, reused: bool, started: bool) -> Desktop {
    let (width, height) = geometry(m.profile.as_deref());
    Desktop {
        session,
        profile: m.profile.clone(),
        width,
        height,
        reused,
        started,
    }
}

/// A queued request for a desktop.
pub(crate) struct Ask {
    caller: Caller,
    another: bool,
    reply: tokio::sync::oneshot::Sender<Result<Choice>>,
}

/// Requests waiting for the lock, by pool.
pub(crate) type Asks = std::sync::Mutex<std::collections::HashMap<String, Vec<Ask>>>;

fn locked_asks(a: &Asks) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Vec<Ask>>> {
    // A plain map: a panic elsewhere leaves it usable.
    a.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records one round of decisions changes.
#[derive(Default)]
struct Records {
    members: Vec<(String, Option<Member>)>,
    sessions: Vec<(String, Option<Session>)>,
    audit: Vec<AuditEntry>,
}

struct Snapshot {
    pool: Pool,
    subs: Vec<Subscription>,
    members: Vec<Member>,
    sessions: Vec<Session>,
}

impl Broker {
    async fn snapshot(&self, pool: &str) -> Result<Snapshot> {
        let name = pool.to_owned();
        self.read(move |s| {
            let pool: Pool = model::get(s, POOL, &name)?
                .ok_or_else(|| Error::NotFound(format!("no pool named {name:?}")))?;
            let subs: Vec<Subscription> = model::all(s, SUBSCRIPTION)?;
            let members: Vec<Member> = model::all(s, MEMBER)?;
            let sessions: Vec<Session> = model::all(s, SESSION)?;
            Ok(Snapshot {
                members: members.into_iter().filter(|m| m.pool == name).collect(),
                sessions: sessions.into_iter().filter(|s| s.pool == name).collect(),
                subs,
                pool,
            })
        })
        .await
    }

    /// A desktop of `pool` for `caller`; `another`: a further one beside
    /// those the caller holds (up to the pool's `per_user`).
    ///
    /// Requests that arrive while the lock is held queue up; whoever takes
    /// the lock next decides all of them over one snapshot of the catalog
    /// and records them in one batch (a burst of users costs a few catalog
    /// commits, not one each).
    ///
    /// # Errors
    /// 403 when not subscribed, "pool full", the per-user limit, a VM that
    /// fails to start.
    pub async fn allocate(
        self: &Arc<Self>,
        caller: &Caller,
        pool: &str,
        another: bool,
    ) -> Result<Desktop> {
        let user = caller.user.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        locked_asks(&self.asks)
            .entry(pool.to_owned())
            .or_default()
            .push(Ask {
                caller: caller.clone(),
                another,
                reply: tx,
            });
        {
            let _guard = self.lock.lock().await;
            let asks = locked_asks(&self.asks).remove(pool).unwrap_or_default();
            if !asks.is_empty() {
                self.decide(pool, asks).await;
            }
        }
        // Decided by this call or by one that held the lock before it.
        let choice = rx
            .await
            .map_err(|_| Error::Panicked("an allocation was dropped undecided".into()))??;
        let (member, create) = match choice {
            Choice::Ready(d) => return Ok(d),
            Choice::Start { member, create } => (member, create),
        };
        // Recorded as pending by `choose`; start it outside the lock.
        let started = self.start_for(&member, create).await;
        let _guard = self.lock.lock().await;
        let result = match started {
            Ok(profile) => {
                let now = now_ns();
                let session = Session {
                    id: new_id(16),
                    user: user.clone(),
                    pool: member.pool.clone(),
                    vm: member.name.clone(),
                    host: member.host.clone(),
                    started_ns: now,
                    last_seen_ns: now,
                };
                let mut m = member.clone();
                m.state = MemberState::Running;
                m.session = Some(session.id.clone());
                if profile.is_some() {
                    m.profile = profile;
                }
                let entry = AuditEntry::ok(
                    &user,
                    "allocate",
                    &format!("{}/{}", m.pool, m.name),
                    format!(
                        "session {} on host {} (VM {})",
                        session.id,
                        m.host,
                        if create { "created" } else { "started" }
                    ),
                );
                self.save(
                    vec![(m.name.clone(), Some(m.clone()))],
                    vec![(session.id.clone(), Some(session.clone()))],
                    vec![entry],
                )
                .await
                .map(|()| desktop(session, &m, false, true))
            }
            Err(e) => {
                let entry = AuditEntry::failed(
                    &user,
                    "allocate",
                    &format!("{}/{}", member.pool, member.name),
                    e.to_string(),
                );
                let rec = if create {
                    None
                } else {
                    let mut m = member.clone();
                    m.state = MemberState::Stopped;
                    Some(m)
                };
                let _ = self
                    .save(vec![(member.name.clone(), rec)], Vec::new(), vec![entry])
                    .await;
                Err(e)
            }
        };
        self.set_pending(&member.name, false);
        self.wake.notify_one();
        result
    }

    /// Decides `asks` for `pool` in order over one snapshot, records all
    /// decisions in one batch, then answers each. Under the lock.
    async fn decide(&self, pool: &str, asks: Vec<Ask>) {
        let mut snap = match self.snapshot(pool).await {
            Ok(s) => s,
            Err(e) => {
                let entries: Vec<AuditEntry> = asks
                    .iter()
                    .map(|a| {
                        AuditEntry::failed(
                            &a.caller.user,
                            "allocate",
                            &format!("pool {pool}"),
                            e.to_string(),
                        )
                    })
                    .collect();
                let _ = self.save(Vec::new(), Vec::new(), entries).await;
                for a in asks {
                    let _ = a.reply.send(Err(e.duplicate()));
                }
                return;
            }
        };
        let mut recs = Records::default();
        let mut answers = Vec::with_capacity(asks.len());
        for a in asks {
            let c = self.choose(&a.caller, &mut snap, a.another, &mut recs);
            if let Err(e) = &c {
                recs.audit.push(AuditEntry::failed(
                    &a.caller.user,
                    "allocate",
                    &format!("pool {pool}"),
                    e.to_string(),
                ));
            }
            answers.push((a.reply, c));
        }
        let starting: Vec<String> = answers
            .iter()
            .filter_map(|(_, c)| match c {
                Ok(Choice::Start { member, .. }) => Some(member.name.clone()),
                _ => None,
            })
            .collect();
        let handed = answers
            .iter()
            .any(|(_, c)| matches!(c, Ok(Choice::Ready(d)) if !d.reused));
        if let Err(e) = self.save(recs.members, recs.sessions, recs.audit).await {
            for name in &starting {
                self.set_pending(name, false);
            }
            for (reply, _) in answers {
                let _ = reply.send(Err(e.duplicate()));
            }
            return;
        }
        if handed || !starting.is_empty() {
            self.wake.notify_one();
        }
        // A request whose caller went away meanwhile: a session it got
        // waits for the user's next ask; a VM it was to start is put back.
        let mut undo = Vec::new();
        for (reply, c) in answers {
            if let Err(Ok(Choice::Start { mut member, create })) = reply.send(c) {
                self.set_pending(&member.name, false);
                let rec = if create {
                    None
                } else {
                    member.state = MemberState::Stopped;
                    Some(member.clone())
                };
                undo.push((member.name.clone(), rec));
            }
        }
        if !undo.is_empty() {
            if let Err(e) = self.save(undo, Vec::new(), Vec::new()).await {
                tracing::warn!(error = %e, "cannot put back the VMs of abandoned requests");
            }
        }
    }

    /// One decision over the snapshot, which it updates; the records it
    /// changes go to `recs`.
    fn choose(
        &self,
        caller: &Caller,
        snap: &mut Snapshot,
        another: bool,
        recs: &mut Records,
    ) -> Result<Choice> {
        let pool = snap.pool.clone();
        if !model::subscribed(&snap.subs, &pool.name, &caller.user, &caller.groups) {
            return Err(Error::Forbidden(format!(
                "{} is not subscribed to pool {}",
                caller.user, pool.name
            )));
        }
        let mine: Vec<Session> = snap
            .sessions
            .iter()
            .filter(|s| s.user == caller.user)
            .cloned()
            .collect();
        if !another {
            if let Some(s) = mine.first() {
                let mut s = s.clone();
                s.last_seen_ns = now_ns();
                let d = match snap.members.iter().find(|m| m.name == s.vm) {
                    Some(m) => desktop(s.clone(), m, true, false),
                    None => {
                        let (width, height) = geometry(None);
                        Desktop {
                            session: s.clone(),
                            profile: None,
                            width,
                            height,
                            reused: true,
                            started: false,
                        }
                    }
                };
                recs.sessions.push((s.id.clone(), Some(s)));
                return Ok(Choice::Ready(d));
            }
        }
        let held = snap
            .members
            .iter()
            .filter(|m| {
                m.owner.as_deref() == Some(&caller.user) || mine.iter().any(|s| s.vm == m.name)
            })
            .count() as u32;
        let per_user = || Error::PerUserLimit {
            pool: pool.name.clone(),
            user: caller.user.clone(),
            per_user: pool.rules.per_user,
        };
        if another && held >= pool.rules.per_user {
            return Err(per_user());
        }
        // The VM the user owns, in a pool that keeps VMs.
        if !pool.rules.stateless {
            if let Some(i) = snap.members.iter().position(|m| {
                m.owner.as_deref() == Some(&caller.user)
                    && m.session.is_none()
                    && !self.is_pending(&m.name)
            }) {
                return Ok(self.take(caller, snap, i, recs));
            }
            if held >= pool.rules.per_user {
                return Err(per_user());
            }
        }
        let idle = snap
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_idle() && !self.is_pending(&m.name))
            .min_by_key(|(_, m)| m.created_ns)
            .map(|(i, _)| i);
        if let Some(i) = idle {
            return Ok(self.take(caller, snap, i, recs));
        }
        let limits = pool.rules.limits(crate::rules::WeekTime::now());
        let total = snap
            .members
            .iter()
            .filter(|m| m.state != MemberState::Unknown && m.vnc.is_none())
            .count() as u32;
        if total >= limits.max {
            return Err(Error::PoolFull {
                pool: pool.name.clone(),
                max: limits.max,
            });
        }
        let hosts = self.host_status();
        let host =
            engine::place(&hosts, &Default::default()).ok_or_else(|| Error::HostUnreachable {
                host: "(any)".into(),
                reason: format!("no host of pool {} is up to start a VM", pool.name),
            })?;
        let m = Member {
            name: format!("{}-{}", pool.name, new_id(6)),
            pool: pool.name.clone(),
            host,
            state: MemberState::Starting,
            // Reserved for the caller (also in a stateless pool, until the
            // session ends), so the engine does not count it as idle.
            owner: Some(caller.user.clone()),
            session: None,
            created_ns: now_ns(),
            cpu_percent: None,
            rss_bytes: None,
            profile: None,
            vnc: None,
        };
        self.set_pending(&m.name, true);
        recs.members.push((m.name.clone(), Some(m.clone())));
        snap.members.push(m.clone());
        Ok(Choice::Start {
            member: m,
            create: true,
        })
    }

    /// Gives member `i` of the snapshot to the caller: a session at once if
    /// it runs, else a start (the member marked pending).
    fn take(&self, caller: &Caller, snap: &mut Snapshot, i: usize, recs: &mut Records) -> Choice {
        let pool = &snap.pool;
        let m = &mut snap.members[i];
        if !pool.rules.stateless {
            m.owner = Some(caller.user.clone());
        }
        if m.state != MemberState::Running {
            m.state = MemberState::Starting;
            self.set_pending(&m.name, true);
            recs.members.push((m.name.clone(), Some(m.clone())));
            return Choice::Start {
                member: m.clone(),
                create: false,
            };
        }
        let now = now_ns();
        let session = Session {
            id: new_id(16),
            user: caller.user.clone(),
            pool: pool.name.clone(),
            vm: m.name.clone(),
            host: m.host.clone(),
            started_ns: now,
            last_seen_ns: now,
        };
        m.session = Some(session.id.clone());
        recs.audit.push(AuditEntry::ok(
            &caller.user,
            "allocate",
            &format!("{}/{}", m.pool, m.name),
            format!("session {} on host {} (idle VM)", session.id, m.host),
        ));
        recs.members.push((m.name.clone(), Some(m.clone())));
        recs.sessions
            .push((session.id.clone(), Some(session.clone())));
        let d = desktop(session.clone(), m, false, false);
        snap.sessions.push(session);
        Choice::Ready(d)
    }

    async fn start_for(&self, m: &Member, create: bool) -> Result<Option<String>> {
        let c = self.client(&m.host).await?;
        if create {
            let name = m.pool.clone();
            let pool: Pool = self
                .read(move |s| {
                    model::get(s, POOL, &name)?
                        .ok_or_else(|| Error::NotFound(format!("no pool named {name:?}")))
                })
                .await?;
            let r = c
                .create(&CreateVm {
                    name: m.name.clone(),
                    template: pool.template,
                    base: pool.base,
                })
                .await?;
            Ok(r.profile)
        } else {
            c.action(&m.name, "start").await?;
            Ok(None)
        }
    }

    /// Ends session `id` (the caller's own, or any for an admin). A
    /// stateless VM is reset; a kept VM stays its owner's, running.
    ///
    /// # Errors
    /// No such session, someone else's.
    pub async fn release(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<Session> {
        let _guard = self.lock.lock().await;
        let sid = id.to_owned();
        let (session, member, pool) = self
            .read(move |s| {
                let session: Option<Session> = model::get(s, SESSION, &sid)?;
                let member: Option<Member> = match &session {
                    Some(ss) => model::get(s, MEMBER, &ss.vm)?,
                    None => None,
                };
                let pool: Option<Pool> = match &session {
                    Some(ss) => model::get(s, POOL, &ss.pool)?,
                    None => None,
                };
                Ok((session, member, pool))
            })
            .await?;
        let session = match session {
            Some(s) if s.user == caller.user || caller.admin => s,
            // Someone else's session is not disclosed.
            _ => return Err(Error::NotFound(format!("no session {id}"))),
        };
        let stateless = pool.as_ref().is_none_or(|p| p.rules.stateless);
        let mut members = Vec::new();
        let mut reset = None;
        if let Some(mut m) = member.filter(|m| m.session.as_deref() == Some(id)) {
            m.session = None;
            if stateless && m.vnc.is_some() {
                m.owner = None;
            } else if stateless {
                m.owner = None;
                m.state = MemberState::Starting;
                self.set_pending(&m.name, true);
                reset = Some(m.clone());
            }
            members.push((m.name.clone(), Some(m)));
        }
        let by = if caller.user == session.user {
            String::new()
        } else {
            format!(" (ended by {})", caller.user)
        };
        let entry = AuditEntry::ok(
            &caller.user,
            "release",
            &format!("{}/{}", session.pool, session.vm),
            format!("session {id} of {}{by}", session.user),
        );
        if let Err(e) = self
            .save(members, vec![(id.to_owned(), None)], vec![entry])
            .await
        {
            if let Some(m) = &reset {
                self.set_pending(&m.name, false);
            }
            return Err(e);
        }
        if let Some(m) = reset {
            let me = self.clone();
            tokio::spawn(async move { me.reset_after(m).await });
        }
        Ok(session)
    }

    /// Resets a stateless VM whose session ended (in the background).
    async fn reset_after(self: Arc<Self>, m: Member) {
        let target = format!("{}/{}", m.pool, m.name);
        let r = match self.client(&m.host).await {
            Ok(c) => c.action(&m.name, "reset").await,
            Err(e) => Err(e),
        };
        let _guard = self.lock.lock().await;
        let (state, entry) = match r {
            Ok(()) => (
                MemberState::Running,
                AuditEntry::ok(
                    engine::ACTOR,
                    "reset",
                    &target,
                    "the session ended: back to the base",
                ),
            ),
            Err(e) => (
                MemberState::Stopped,
                AuditEntry::failed(engine::ACTOR, "reset", &target, e.to_string()),
            ),
        };
        let name = m.name.clone();
        let current: Option<Member> = self
            .read(move |s| model::get(s, MEMBER, &name))
            .await
            .unwrap_or(None);
        let rec = current.map(|mut c| {
            c.state = state;
            c
        });
        if let Err(e) = self
            .save(vec![(m.name.clone(), rec)], Vec::new(), vec![entry])
            .await
        {
            tracing::warn!(vm = %m.name, error = %e, "cannot record the reset");
        }
        self.set_pending(&m.name, false);
        self.wake.notify_one();
    }

    /// Marks session `id` as in use now.
    ///
    /// # Errors
    /// No such session of the caller.
    pub async fn touch(&self, caller: &Caller, id: &str) -> Result<Session> {
        let _guard = self.lock.lock().await;
        let sid = id.to_owned();
        let s: Option<Session> = self.read(move |s| model::get(s, SESSION, &sid)).await?;
        let mut s = match s {
            Some(s) if s.user == caller.user || caller.admin => s,
            _ => return Err(Error::NotFound(format!("no session {id}"))),
        };
        s.last_seen_ns = now_ns();
        self.save(
            Vec::new(),
            vec![(id.to_owned(), Some(s.clone()))],
            Vec::new(),
        )
        .await?;
        Ok(s)
    }

    /// Marks session `id` as in use now, whoever asks (the screen proxy);
    /// a session that ended meanwhile is left alone.
    pub(crate) async fn touch_session(&self, id: &str) {
        let _guard = self.lock.lock().await;
        let sid = id.to_owned();
        let s: Option<Session> = self
            .read(move |s| model::get(s, SESSION, &sid))
            .await
            .unwrap_or(None);
        if let Some(mut s) = s {
            s.last_seen_ns = now_ns();
            if let Err(e) = self
                .save(Vec::new(), vec![(id.to_owned(), Some(s))], Vec::new())
                .await
            {
                tracing::warn!(session = %id, error = %e, "cannot mark the session in use");
            }
        }
    }

    /// Appends to the audit log; a failure is logged, not returned.
    pub(crate) async fn audit_entry(&self, e: AuditEntry) {
        self.audit(e).await;
    }

    async fn audit(&self, e: AuditEntry) {
        if let Err(err) = self.write(move |s| crate::audit::record(s, &[e])).await {
            tracing::warn!(error = %err, "cannot write the audit log");
        }
    }
}
