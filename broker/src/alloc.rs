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
enum Choice {
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
        let target = format!("pool {pool}");
        let choice = {
            let _guard = self.lock.lock().await;
            let chosen = match self.snapshot(pool).await {
                Ok(snap) => self.choose(caller, snap, another).await,
                Err(e) => Err(e),
            };
            match chosen {
                Ok(c) => c,
                Err(e) => {
                    let entry = AuditEntry::failed(&user, "allocate", &target, e.to_string());
                    self.audit(entry).await;
                    return Err(e);
                }
            }
        };
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

    /// The decision, under the lock; records what it decides.
    async fn choose(&self, caller: &Caller, snap: Snapshot, another: bool) -> Result<Choice> {
        let Snapshot {
            pool,
            subs,
            members,
            sessions,
        } = snap;
        if !model::subscribed(&subs, &pool.name, &caller.user, &caller.groups) {
            return Err(Error::Forbidden(format!(
                "{} is not subscribed to pool {}",
                caller.user, pool.name
            )));
        }
        let mine: Vec<&Session> = sessions.iter().filter(|s| s.user == caller.user).collect();
        if !another {
            if let Some(s) = mine.first() {
                let mut s = (*s).clone();
                s.last_seen_ns = now_ns();
                let m = members.iter().find(|m| m.name == s.vm);
                let d = match m {
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
                self.save(Vec::new(), vec![(s.id.clone(), Some(s))], Vec::new())
                    .await?;
                return Ok(Choice::Ready(d));
            }
        }
        let held = members
            .iter()
            .filter(|m| {
                m.owner.as_deref() == Some(&caller.user) || mine.iter().any(|s| s.vm == m.name)
            })
            .count() as u32;
        if another && held >= pool.rules.per_user {
            return Err(Error::PerUserLimit {
                pool: pool.name.clone(),
                user: caller.user.clone(),
                per_user: pool.rules.per_user,
            });
        }
        // The VM the user owns, in a pool that keeps VMs.
        if !pool.rules.stateless {
            if let Some(m) = members.iter().find(|m| {
                m.owner.as_deref() == Some(&caller.user)
                    && m.session.is_none()
                    && !self.is_pending(&m.name)
            }) {
                return self.take(caller, &pool, m.clone()).await;
            }
            if held >= pool.rules.per_user {
                return Err(Error::PerUserLimit {
                    pool: pool.name.clone(),
                    user: caller.user.clone(),
                    per_user: pool.rules.per_user,
                });
            }
        }
        let mut idle: Vec<&Member> = members
            .iter()
            .filter(|m| m.is_idle() && !self.is_pending(&m.name))
            .collect();
        idle.sort_by_key(|m| m.created_ns);
        if let Some(m) = idle.first() {
            return self.take(caller, &pool, (*m).clone()).await;
        }
        let limits = pool.rules.limits(crate::rules::WeekTime::now());
        let total = members
            .iter()
            .filter(|m| m.state != MemberState::Unknown)
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
        self.reserve(&m).await?;
        Ok(Choice::Start {
            member: m,
            create: true,
        })
    }

    /// Marks `m` pending and records it, before its start outside the lock.
    async fn reserve(&self, m: &Member) -> Result<()> {
        self.set_pending(&m.name, true);
        let saved = self
            .save(
                vec![(m.name.clone(), Some(m.clone()))],
                Vec::new(),
                Vec::new(),
            )
            .await;
        if saved.is_err() {
            self.set_pending(&m.name, false);
        }
        saved
    }

    /// Gives `m` to the caller: a session at once if it runs, else a start.
    async fn take(&self, caller: &Caller, pool: &Pool, mut m: Member) -> Result<Choice> {
        if !pool.rules.stateless {
            m.owner = Some(caller.user.clone());
        }
        if m.state != MemberState::Running {
            m.state = MemberState::Starting;
            self.reserve(&m).await?;
            return Ok(Choice::Start {
                member: m,
                create: false,
            });
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
        let entry = AuditEntry::ok(
            &caller.user,
            "allocate",
            &format!("{}/{}", m.pool, m.name),
            format!("session {} on host {} (idle VM)", session.id, m.host),
        );
        self.save(
            vec![(m.name.clone(), Some(m.clone()))],
            vec![(session.id.clone(), Some(session.clone()))],
            vec![entry],
        )
        .await?;
        self.wake.notify_one();
        Ok(Choice::Ready(desktop(session, &m, false, false)))
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
