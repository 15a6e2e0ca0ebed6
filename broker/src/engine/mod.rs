//! The rule engine: a loop that keeps every pool within its rules.
//!
//! Each tick asks every host what runs (at once), then for each pool, under
//! the broker's lock, compares the pool's VMs with what the hosts said and
//! with the rules in force now ([`plan`], a pure function), records the
//! decisions with their reasons in the audit log, and starts the work on
//! the hosts outside the lock. Its actions are the VM lifecycle of the
//! seed: **create** (below `min_idle`, no stopped VM to start), **start**
//! (a stopped VM, below `min_idle`), **stop** (idle VMs above `min_idle`;
//! the VM of a reclaimed session in a pool that is not stateless),
//! **destroy** (above `max`; a crashed VM nobody owns) and **reset** (the
//! disk of a stateless VM whose session ended).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use lamina_sync::now_ns;

use crate::agent::CreateVm;
use crate::audit::AuditEntry;
use crate::broker::{Broker, HostStatus};
use crate::error::{Error, Result};
use crate::model::{self, new_id, Member, MemberState, Pool, Session, MEMBER, POOL, SESSION};
use crate::rules::{Limits, WeekTime};

/// Who the engine is in the audit log.
pub const ACTOR: &str = "rules";

/// Memory assumed for a VM when placing several in one tick.
const VM_ESTIMATE: u64 = 512 * 1024 * 1024;

/// What the engine does to one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Act {
    Create { host: String },
    Start,
    Stop,
    Destroy,
    Reset,
}

impl Act {
    fn name(&self) -> &'static str {
        match self {
            Act::Create { .. } => "create",
            Act::Start => "start",
            Act::Stop => "stop",
            Act::Destroy => "destroy",
            Act::Reset => "reset",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub member: Member,
    pub act: Act,
    pub reason: String,
}

/// The decisions of one tick for one pool, and the records they change.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub steps: Vec<Step>,
    pub members: Vec<(String, Option<Member>)>,
    pub sessions: Vec<(String, Option<Session>)>,
    pub audit: Vec<AuditEntry>,
}

impl Plan {
    fn note(&mut self, action: &str, target: &str, detail: String) {
        self.audit
            .push(AuditEntry::ok(ACTOR, action, target, detail));
    }
}

/// How long a session whose VM's record does not name it is left alone
/// before it counts as an orphan.
const UNLINKED_GRACE_NS: i64 = 30_000_000_000;

/// Members the hosts' reports cannot speak for.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    /// Work on them is under way: left alone, and not free.
    pub pending: HashSet<String>,
    /// Their work ended after the reports were taken (a VM just created is
    /// missing from them): left as recorded, and counted as such.
    pub unreported: HashSet<String>,
}

/// Decides what pool `pool` needs now. `members` and `sessions` are the
/// pool's; `busy` names members the hosts' reports cannot speak for.
pub(crate) fn plan(
    pool: &Pool,
    limits: Limits,
    members: Vec<Member>,
    sessions: Vec<Session>,
    hosts: &HashMap<String, HostStatus>,
    busy: &InFlight,
    now: i64,
) -> Plan {
    let pending = &busy.pending;
    let mut p = Plan::default();
    let mut live: Vec<Member> = Vec::new();
    let mut sessions: HashMap<String, Session> =
        sessions.into_iter().map(|s| (s.id.clone(), s)).collect();
    let target = |m: &Member| format!("{}/{}", m.pool, m.name);

    // 1. What the hosts say.
    for mut m in members {
        if pending.contains(&m.name) || busy.unreported.contains(&m.name) {
            live.push(m);
            continue;
        }
        let before = m.clone();
        if m.vnc.is_some() {
            // An external desktop: up as far as the broker knows (a
            // connection that fails says otherwise, to its user).
            m.state = MemberState::Running;
            if m != before {
                p.members.push((m.name.clone(), Some(m.clone())));
            }
            live.push(m);
            continue;
        }
        let report = match hosts.get(&m.host) {
            Some(HostStatus::Up { report }) => Some(report),
            Some(HostStatus::Late { .. }) => {
                // A busy host: nothing new known about its VMs.
                live.push(m);
                continue;
            }
            _ => None,
        };
        let Some(report) = report else {
            if m.state != MemberState::Unknown {
                p.note(
                    "unknown",
                    &target(&m),
                    format!("host {} does not answer: the VM's state is unknown", m.host),
                );
                m.state = MemberState::Unknown;
            }
            if m != before {
                p.members.push((m.name.clone(), Some(m.clone())));
            }
            live.push(m);
            continue;
        };
        match report.vms.iter().find(|v| v.name == m.name) {
            // `unknown`: QEMU is alive but its monitor did not answer in
            // time (a busy host): alive, not crashed.
            Some(v) if v.state == "running" || v.state == "unknown" => {
                if m.state == MemberState::Stopped || m.state == MemberState::Starting {
                    // Started by hand, or a start the broker did not see end.
                    tracing::info!(vm = %m.name, "running again");
                }
                m.state = MemberState::Running;
                m.cpu_percent = v.cpu_percent;
                m.rss_bytes = v.rss_bytes;
                m.profile.clone_from(&v.profile);
            }
            Some(_) => match m.state {
                MemberState::Running | MemberState::Unknown => {
                    let mut why = format!("the VM stopped by itself on host {}", m.host);
                    if let Some(sid) = m.session.take() {
                        if let Some(s) = sessions.remove(&sid) {
                            why = format!("{why} during the session of {}", s.user);
                            p.sessions.push((sid, None));
                        }
                    }
                    if m.owner.is_some() && !pool.rules.stateless {
                        m.state = MemberState::Stopped;
                        m.cpu_percent = None;
                        m.rss_bytes = None;
                        p.note("crashed", &target(&m), format!("{why}; kept for its owner"));
                    } else {
                        m.owner = None;
                        p.note("crashed", &target(&m), why.clone());
                        p.steps.push(Step {
                            member: m.clone(),
                            act: Act::Destroy,
                            reason: format!("{why}: replace it"),
                        });
                    }
                }
                MemberState::Starting => p.steps.push(Step {
                    member: m.clone(),
                    act: Act::Destroy,
                    reason: "its start did not finish".into(),
                }),
                MemberState::Stopped => {
                    m.cpu_percent = None;
                    m.rss_bytes = None;
                }
            },
            None => {
                // Gone from its host (removed by hand, or its creation was
                // cut off): forget it.
                if let Some(sid) = m.session.take() {
                    if sessions.remove(&sid).is_some() {
                        p.sessions.push((sid, None));
                    }
                }
                p.note(
                    "forget",
                    &target(&m),
                    format!("host {} no longer has this VM", m.host),
                );
                p.members.push((m.name.clone(), None));
                continue;
            }
        }
        // Figures alone are not worth a catalog write every tick.
        if !same_but_figures(&m, &before) {
            p.members.push((m.name.clone(), Some(m.clone())));
        }
        live.push(m);
    }

    // 2. Sessions unused for too long, and sessions without their VM.
    let timeout = pool.rules.idle_timeout().ok().flatten();
    let mut ended: Vec<(String, Session, &str)> = Vec::new();
    for (id, s) in &sessions {
        let vm = live
            .iter()
            .find(|m| m.name == s.vm && m.session.as_deref() == Some(id));
        if vm.is_none() {
            // Its VM is recorded but does not name it: a session this young
            // may be one whose allocation's records this tick's view does
            // not show together yet (seen once in CI: a cold start's new
            // session ended a second after it began). Older ones are
            // orphans.
            let young = now.saturating_sub(s.started_ns) < UNLINKED_GRACE_NS;
            if !(young && live.iter().any(|m| m.name == s.vm)) {
                ended.push((id.clone(), s.clone(), "its VM no longer serves it"));
            }
            continue;
        }
        if let Some(t) = timeout {
            let idle_ns = now.saturating_sub(s.last_seen_ns);
            if idle_ns > i64::try_from(t.as_nanos()).unwrap_or(i64::MAX) {
                ended.push((
                    id.clone(),
                    s.clone(),
                    "unused for longer than the idle timeout",
                ));
            }
        }
    }
    for (id, s, why) in ended {
        p.sessions.push((id.clone(), None));
        p.audit.push(AuditEntry::ok(
            ACTOR,
            "reclaim",
            &format!("{}/{}", s.pool, s.vm),
            format!("session {id} of {} {why}", s.user),
        ));
        if let Some(m) = live.iter_mut().find(|m| m.session.as_deref() == Some(&id)) {
            m.session = None;
            if m.vnc.is_some() {
                // Nothing to reset or stop on an external desktop.
                if pool.rules.stateless {
                    m.owner = None;
                }
            } else if pool.rules.stateless {
                m.owner = None;
                p.steps.push(Step {
                    member: m.clone(),
                    act: Act::Reset,
                    reason: format!("the session of {} ended: back to the base", s.user),
                });
            } else {
                p.steps.push(Step {
                    member: m.clone(),
                    act: Act::Stop,
                    reason: format!("the session of {} ended; the VM stays theirs", s.user),
                });
            }
            p.members.push((m.name.clone(), Some(m.clone())));
        }
    }

    // 3. The counts the rules ask for.
    let stepped: HashSet<String> = p.steps.iter().map(|s| s.member.name.clone()).collect();
    let destroying: HashSet<String> = p
        .steps
        .iter()
        .filter(|s| s.act == Act::Destroy)
        .map(|s| s.member.name.clone())
        .collect();
    // External desktops are the pool's too, but outside its counts: idle
    // ones still spare the engine a VM.
    let external_idle = live
        .iter()
        .filter(|m| m.vnc.is_some() && m.is_idle() && !pending.contains(&m.name))
        .count() as u32;
    let counted: Vec<&Member> = live
        .iter()
        .filter(|m| {
            m.vnc.is_none() && m.state != MemberState::Unknown && !destroying.contains(&m.name)
        })
        .collect();
    let mut total = counted.len() as u32;
    let free = |m: &&Member| {
        m.owner.is_none()
            && m.session.is_none()
            && !pending.contains(&m.name)
            && !stepped.contains(&m.name)
    };
    // VMs the engine is creating or starting for the pool count as idle
    // already (a placeholder of the allocator has its user as owner).
    let coming = counted
        .iter()
        .filter(|m| {
            pending.contains(&m.name)
                && m.state == MemberState::Starting
                && m.owner.is_none()
                && m.session.is_none()
        })
        .count() as u32;
    let idle =
        counted.iter().filter(|m| free(m) && m.is_idle()).count() as u32 + coming + external_idle;
    let mut spare: Vec<&Member> = counted.iter().copied().filter(free).collect();
    if total > limits.max {
        // Stopped ones first, then the newest.
        spare.sort_by_key(|m| {
            (
                m.state != MemberState::Stopped,
                std::cmp::Reverse(m.created_ns),
            )
        });
        for m in spare.iter().take((total - limits.max) as usize) {
            p.steps.push(Step {
                member: (*m).clone(),
                act: Act::Destroy,
                reason: format!("the pool has {total} VMs, more than {limits}"),
            });
        }
    } else if idle < limits.min_idle {
        let mut need = limits.min_idle - idle;
        for m in spare.iter().filter(|m| m.state == MemberState::Stopped) {
            if need == 0 {
                break;
            }
            p.steps.push(Step {
                member: (*m).clone(),
                act: Act::Start,
                reason: format!("{idle} idle, fewer than {limits}"),
            });
            need -= 1;
        }
        let mut placed: HashMap<String, u64> = HashMap::new();
        while need > 0 && total < limits.max {
            let Some(host) = place(hosts, &placed) else {
                tracing::warn!(pool = %pool.name, "no host is up to take a VM");
                break;
            };
            *placed.entry(host.clone()).or_default() += 1;
            let m = Member {
                name: format!("{}-{}", pool.name, new_id(6)),
                pool: pool.name.clone(),
                host: host.clone(),
                state: MemberState::Starting,
                owner: None,
                session: None,
                created_ns: now,
                cpu_percent: None,
                rss_bytes: None,
                profile: None,
                vnc: None,
            };
            p.members.push((m.name.clone(), Some(m.clone())));
            p.steps.push(Step {
                member: m,
                act: Act::Create { host },
                reason: format!("{idle} idle, fewer than {limits}"),
            });
            total += 1;
            need -= 1;
        }
    } else if idle > limits.min_idle {
        let mut running: Vec<&&Member> = spare.iter().filter(|m| m.is_idle()).collect();
        running.sort_by_key(|m| std::cmp::Reverse(m.created_ns));
        for m in running.iter().take((idle - limits.min_idle) as usize) {
            p.steps.push(Step {
                member: (**m).clone(),
                act: Act::Stop,
                reason: format!("{idle} idle, more than {limits}"),
            });
        }
    }
    for s in &p.steps {
        p.audit.push(AuditEntry::ok(
            ACTOR,
            s.act.name(),
            &format!("{}/{}", s.member.pool, s.member.name),
            match &s.act {
                Act::Create { host } => format!("on host {host}: {}", s.reason),
                _ => s.reason.clone(),
            },
        ));
    }
    p
}

fn same_but_figures(a: &Member, b: &Member) -> bool {
    let strip = |m: &Member| Member {
        cpu_percent: None,
        rss_bytes: None,
        ..m.clone()
    };
    strip(a) == strip(b)
}

/// The host for a new VM: most free memory (less what this tick already
/// placed there), then lowest load, then name.
pub(crate) fn place(
    hosts: &HashMap<String, HostStatus>,
    placed: &HashMap<String, u64>,
) -> Option<String> {
    hosts
        .iter()
        .filter_map(|(name, s)| match s {
            HostStatus::Up { report } => {
                let n = placed.get(name).copied().unwrap_or(0);
                let free = report.mem_free.saturating_sub(n * VM_ESTIMATE);
                Some((name, free, report.load1))
            }
            HostStatus::Late { .. } | HostStatus::Down { .. } => None,
        })
        .filter(|(_, free, _)| *free >= VM_ESTIMATE / 2)
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.total_cmp(&a.2)).then(b.0.cmp(a.0)))
        .map(|(n, _, _)| n.clone())
}

impl Broker {
    /// One round of the rule engine over every pool. Work on hosts is
    /// started in the background; returns once every decision is recorded.
    ///
    /// # Errors
    /// Catalog failures.
    pub async fn tick(self: &Arc<Self>) -> Result<()> {
        let polled = std::time::Instant::now();
        let hosts = self.poll_hosts().await?;
        let pools: Vec<Pool> = self.read(|s| model::all(s, POOL)).await?;
        let now = WeekTime::now();
        for pool in pools {
            let guard = self.lock.lock().await;
            let name = pool.name.clone();
            let (members, sessions) = self
                .read(move |s| {
                    let m: Vec<Member> = model::all(s, MEMBER)?;
                    let ss: Vec<Session> = model::all(s, SESSION)?;
                    Ok((
                        m.into_iter().filter(|m| m.pool == name).collect::<Vec<_>>(),
                        ss.into_iter()
                            .filter(|s| s.pool == name)
                            .collect::<Vec<_>>(),
                    ))
                })
                .await?;
            let busy = InFlight {
                pending: self.pending_set(),
                // Work that ended after the poll is not in its reports yet.
                unreported: self.settled_since(polled),
            };
            let limits = pool.rules.limits(now);
            let plan = plan(&pool, limits, members, sessions, &hosts, &busy, now_ns());
            for s in &plan.steps {
                self.set_pending(&s.member.name, true);
            }
            let steps = plan.steps.clone();
            if let Err(e) = self.save(plan.members, plan.sessions, plan.audit).await {
                for s in &steps {
                    self.set_pending(&s.member.name, false);
                }
                return Err(e);
            }
            drop(guard);
            for step in steps {
                let me = self.clone();
                let template = pool.template.clone();
                let base = pool.base.clone();
                tokio::spawn(async move {
                    me.execute(step, &template, &base).await;
                });
            }
        }
        Ok(())
    }

    /// Carries out one step on its host and records the outcome.
    async fn execute(self: Arc<Self>, step: Step, template: &str, base: &str) {
        let m = step.member.clone();
        let target = format!("{}/{}", m.pool, m.name);
        let result = async {
            let c = self.client(&m.host).await?;
            match &step.act {
                Act::Create { .. } => {
                    let r = c
                        .create(&CreateVm {
                            name: m.name.clone(),
                            template: template.to_owned(),
                            base: base.to_owned(),
                        })
                        .await?;
                    Ok(r.profile)
                }
                Act::Start => c.action(&m.name, "start").await.map(|()| None),
                Act::Stop => c.action(&m.name, "stop").await.map(|()| None),
                Act::Reset => c.action(&m.name, "reset").await.map(|()| None),
                Act::Destroy => c.destroy(&m.name).await.map(|()| None),
            }
        }
        .await;
        let _guard = self.lock.lock().await;
        let name = m.name.clone();
        let current: Option<Member> = self
            .read(move |s| model::get(s, MEMBER, &name))
            .await
            .unwrap_or(None);
        let (record, audit) = outcome(&step.act, result, current, &target);
        if let Err(e) = self
            .save(vec![(m.name.clone(), record)], Vec::new(), audit)
            .await
        {
            tracing::warn!(vm = %m.name, error = %e, "cannot record the outcome of {}", step.act.name());
        }
        self.set_pending(&m.name, false);
        self.wake.notify_one();
    }

    /// Runs the rule engine until `stop` resolves: a tick every `every`, and
    /// soon after an allocation or a release.
    pub async fn run(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "rule engine tick failed");
            }
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(every) => {}
                () = self.wake.notified() => {
                    // Let a burst of changes settle into one tick.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// What the outcome of one step does to its VM's record (`current`, `None`
/// if it has gone meanwhile) and what the audit log says of it.
fn outcome(
    act: &Act,
    result: Result<Option<String>>,
    current: Option<Member>,
    target: &str,
) -> (Option<Member>, Vec<AuditEntry>) {
    let mut audit = Vec::new();
    let record = match (act, result) {
        (Act::Destroy, Ok(_)) => None,
        (_, Ok(profile)) => current.map(|mut c| {
            c.state = match act {
                Act::Stop => MemberState::Stopped,
                _ => MemberState::Running,
            };
            if profile.is_some() {
                c.profile = profile;
            }
            c
        }),
        (Act::Create { .. }, Err(e @ Error::HostUnreachable { .. })) => {
            // Cut off: the host may have made the VM before it went away.
            // Unknown until it answers again, then kept or forgotten by
            // what it lists; never a VM on a host the broker lost track of.
            audit.push(AuditEntry::failed(ACTOR, "create", target, e.to_string()));
            current.map(|mut c| {
                c.state = MemberState::Unknown;
                c
            })
        }
        (Act::Create { .. }, Err(e)) => {
            audit.push(AuditEntry::failed(ACTOR, "create", target, e.to_string()));
            None
        }
        (act, Err(e)) => {
            audit.push(AuditEntry::failed(ACTOR, act.name(), target, e.to_string()));
            current.map(|mut c| {
                // Try again next tick, from what the host then says.
                if matches!(act, Act::Reset | Act::Start) {
                    c.state = MemberState::Stopped;
                }
                c
            })
        }
    };
    (record, audit)
}

#[cfg(test)]
mod tests;
