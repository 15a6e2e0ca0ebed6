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
use crate::error::Result;
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

/// Decides what pool `pool` needs now. `members` and `sessions` are the
/// pool's; `pending` names members with work in flight (left alone).
pub(crate) fn plan(
    pool: &Pool,
    limits: Limits,
    members: Vec<Member>,
    sessions: Vec<Session>,
    hosts: &HashMap<String, HostStatus>,
    pending: &HashSet<String>,
    now: i64,
) -> Plan {
    let mut p = Plan::default();
    let mut live: Vec<Member> = Vec::new();
    let mut sessions: HashMap<String, Session> =
        sessions.into_iter().map(|s| (s.id.clone(), s)).collect();
    let target = |m: &Member| format!("{}/{}", m.pool, m.name);

    // 1. What the hosts say.
    for mut m in members {
        if pending.contains(&m.name) {
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
    let mut ended: Vec<(String, Session)> = Vec::new();
    for (id, s) in &sessions {
        let vm = live
            .iter()
            .find(|m| m.name == s.vm && m.session.as_deref() == Some(id));
        if vm.is_none() {
            ended.push((id.clone(), s.clone()));
            continue;
        }
        if let Some(t) = timeout {
            let idle_ns = now.saturating_sub(s.last_seen_ns);
            if idle_ns > i64::try_from(t.as_nanos()).unwrap_or(i64::MAX) {
                ended.push((id.clone(), s.clone()));
            }
        }
    }
    for (id, s) in ended {
        p.sessions.push((id.clone(), None));
        p.audit.push(AuditEntry::ok(
            ACTOR,
            "reclaim",
            &format!("{}/{}", s.pool, s.vm),
            format!(
                "session {id} of {} unused for longer than the idle timeout",
                s.user
            ),
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
            HostStatus::Down { .. } => None,
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
            let pending = self.pending_set();
            let limits = pool.rules.limits(now);
            let plan = plan(&pool, limits, members, sessions, &hosts, &pending, now_ns());
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

    fn pending_set(&self) -> HashSet<String> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        let mut audit = Vec::new();
        let record = match (&step.act, result) {
            (Act::Destroy, Ok(_)) => None,
            (_, Ok(profile)) => current.map(|mut c| {
                c.state = match step.act {
                    Act::Stop => MemberState::Stopped,
                    _ => MemberState::Running,
                };
                if profile.is_some() {
                    c.profile = profile;
                }
                c
            }),
            (Act::Create { .. }, Err(e)) => {
                audit.push(AuditEntry::failed(ACTOR, "create", &target, e.to_string()));
                None
            }
            (act, Err(e)) => {
                audit.push(AuditEntry::failed(
                    ACTOR,
                    act.name(),
                    &target,
                    e.to_string(),
                ));
                current.map(|mut c| {
                    // Try again next tick, from what the host then says.
                    if matches!(act, Act::Reset | Act::Start) {
                        c.state = MemberState::Stopped;
                    }
                    c
                })
            }
        };
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::agent::{HostReport, VmReport};
    use crate::rules::Rules;

    fn pool(min_idle: u32, max: u32, stateless: bool) -> Pool {
        Pool {
            name: "p".into(),
            template: "t".into(),
            base: "os/b".into(),
            rules: Rules {
                min_idle,
                max,
                per_user: 1,
                stateless,
                idle_timeout: Some("10m".into()),
                windows: Vec::new(),
            },
            created_ns: 0,
        }
    }

    fn limits(p: &Pool) -> Limits {
        Limits {
            min_idle: p.rules.min_idle,
            max: p.rules.max,
            window: None,
        }
    }

    fn host(free_mib: u64, load: f64, vms: &[(&str, &str)]) -> HostStatus {
        HostStatus::Up {
            report: HostReport {
                cpus: 2,
                load1: load,
                mem_total: 8 << 30,
                mem_available: free_mib << 20,
                mem_capacity: 8 << 30,
                mem_committed: 0,
                mem_free: free_mib << 20,
                vms: vms
                    .iter()
                    .map(|(n, s)| VmReport {
                        name: (*n).into(),
                        state: (*s).into(),
                        profile: Some("pc".into()),
                        template: "t".into(),
                        cpu_percent: Some(1.0),
                        rss_bytes: Some(1 << 20),
                    })
                    .collect(),
            },
        }
    }

    fn member(name: &str, host: &str, state: MemberState, created: i64) -> Member {
        Member {
            name: name.into(),
            pool: "p".into(),
            host: host.into(),
            state,
            owner: None,
            session: None,
            created_ns: created,
            cpu_percent: None,
            rss_bytes: None,
            profile: None,
            vnc: None,
        }
    }

    fn acts(p: &Plan) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = p
            .steps
            .iter()
            .map(|s| {
                let what = match &s.act {
                    Act::Create { host } => format!("create@{host}"),
                    a => a.name().to_owned(),
                };
                (
                    what,
                    if matches!(s.act, Act::Create { .. }) {
                        String::new()
                    } else {
                        s.member.name.clone()
                    },
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_empty_pool_is_filled_on_the_hosts_with_most_free_memory() {
        let p = pool(3, 5, true);
        let hosts = HashMap::from([
            ("a".to_owned(), host(4096, 0.5, &[])),
            ("b".to_owned(), host(3500, 0.1, &[])),
        ]);
        let plan = plan(&p, limits(&p), vec![], vec![], &hosts, &HashSet::new(), 1);
        // a (4096) → a (3584 > 3500) → b (3500 > 3072): spread by what this tick placed.
        let mut on: Vec<String> = plan
            .steps
            .iter()
            .map(|s| match &s.act {
                Act::Create { host } => host.clone(),
                a => panic!("{a:?}"),
            })
            .collect();
        on.sort();
        assert_eq!(on, ["a", "a", "b"]);
        assert_eq!(plan.members.len(), 3, "placeholders recorded");
        assert!(plan
            .audit
            .iter()
            .all(|e| e.detail.contains("fewer than min_idle 3 max 5")));
    }

    #[test]
    fn external_desktops_count_as_idle_and_are_never_touched() {
        let p = pool(1, 1, true);
        let hosts = HashMap::from([("a".to_owned(), host(4096, 0.1, &[("p-1", "running")]))]);
        let mut ext = member("vdi1", "external", MemberState::Unknown, 5);
        ext.vnc = Some("10.0.0.7:5901".into());
        let vm = member("p-1", "a", MemberState::Running, 1);
        // One idle external desktop meets min_idle 1 (no host knows it; it is
        // not unknown) and is outside max: the idle VM beyond min_idle stops.
        let first = plan(
            &p,
            limits(&p),
            vec![ext.clone(), vm],
            vec![],
            &hosts,
            &HashSet::new(),
            9,
        );
        assert_eq!(acts(&first), [("stop".to_owned(), "p-1".to_owned())]);
        let saved: Vec<&Member> = first
            .members
            .iter()
            .filter_map(|(_, m)| m.as_ref())
            .collect();
        assert!(saved
            .iter()
            .any(|m| m.name == "vdi1" && m.state == MemberState::Running));
        // Its session reclaimed: no reset or stop of it, only freed.
        let mut used = ext.clone();
        used.state = MemberState::Running;
        used.owner = Some("alice".into());
        used.session = Some("s1".into());
        let s = Session {
            id: "s1".into(),
            user: "alice".into(),
            pool: "p".into(),
            vm: "vdi1".into(),
            host: "external".into(),
            started_ns: 0,
            last_seen_ns: 0,
        };
        let mut p2 = pool(0, 1, true);
        p2.rules.idle_timeout = Some("1s".into());
        let second = plan(
            &p2,
            limits(&p2),
            vec![used],
            vec![s],
            &hosts,
            &HashSet::new(),
            10_000_000_000,
        );
        assert!(second.steps.is_empty(), "{:?}", acts(&second));
        let freed = second.members.iter().find_map(|(_, m)| m.clone()).unwrap();
        assert_eq!((freed.owner, freed.session), (None, None));
    }

    #[test]
    fn a_vm_whose_monitor_is_slow_keeps_its_session() {
        let p = pool(0, 1, false);
        let hosts = HashMap::from([("a".to_owned(), host(4096, 3.0, &[("p-1", "unknown")]))]);
        let mut m = member("p-1", "a", MemberState::Running, 1);
        m.owner = Some("alice".into());
        m.session = Some("s1".into());
        let s = Session {
            id: "s1".into(),
            user: "alice".into(),
            pool: "p".into(),
            vm: "p-1".into(),
            host: "a".into(),
            started_ns: 0,
            last_seen_ns: 0,
        };
        let out = plan(&p, limits(&p), vec![m], vec![s], &hosts, &HashSet::new(), 5);
        assert!(
            out.sessions.is_empty(),
            "the session stays: {:?}",
            out.sessions
        );
        assert!(out.steps.is_empty(), "{:?}", acts(&out));
        assert!(!out.audit.iter().any(|e| e.action == "crashed"));
    }

    #[test]
    fn equal_memory_goes_to_the_lower_load() {
        let hosts = HashMap::from([
            ("a".to_owned(), host(4096, 0.9, &[])),
            ("b".to_owned(), host(4096, 0.2, &[])),
            (
                "c".to_owned(),
                HostStatus::Down {
                    reason: "gone".into(),
                },
            ),
        ]);
        assert_eq!(place(&hosts, &HashMap::new()).as_deref(), Some("b"));
        let none = HashMap::from([("c".to_owned(), HostStatus::Down { reason: "x".into() })]);
        assert_eq!(place(&none, &HashMap::new()), None);
    }

    #[test]
    fn never_above_max_and_only_free_vms_go_when_max_drops() {
        let p = pool(0, 2, true);
        let mut busy = member("p-busy", "a", MemberState::Running, 1);
        busy.session = Some("s1".into());
        let sessions = vec![Session {
            id: "s1".into(),
            user: "alice".into(),
            pool: "p".into(),
            vm: "p-busy".into(),
            host: "a".into(),
            started_ns: 1,
            last_seen_ns: 1,
        }];
        let members = vec![
            busy,
            member("p-old", "a", MemberState::Running, 2),
            member("p-new", "a", MemberState::Running, 3),
            member("p-off", "a", MemberState::Stopped, 4),
        ];
        let hosts = HashMap::from([(
            "a".to_owned(),
            host(
                4096,
                0.1,
                &[
                    ("p-busy", "running"),
                    ("p-old", "running"),
                    ("p-new", "running"),
                    ("p-off", "powered-off"),
                ],
            ),
        )]);
        let plan = plan(
            &p,
            limits(&p),
            members,
            sessions,
            &hosts,
            &HashSet::new(),
            2,
        );
        assert_eq!(
            acts(&plan),
            [
                ("destroy".to_owned(), "p-new".to_owned()),
                ("destroy".to_owned(), "p-off".to_owned())
            ]
        );
    }

    #[test]
    fn a_stopped_vm_is_started_before_a_new_one_is_made_and_extras_stop() {
        let p = pool(2, 4, true);
        let members = vec![
            member("p-1", "a", MemberState::Running, 1),
            member("p-2", "a", MemberState::Stopped, 2),
        ];
        let hosts = HashMap::from([(
            "a".to_owned(),
            host(4096, 0.1, &[("p-1", "running"), ("p-2", "powered-off")]),
        )]);
        let plan1 = plan(
            &p,
            limits(&p),
            members.clone(),
            vec![],
            &hosts,
            &HashSet::new(),
            3,
        );
        assert_eq!(acts(&plan1), [("start".to_owned(), "p-2".to_owned())]);
        let p0 = pool(0, 4, true);
        let plan2 = plan(
            &p0,
            limits(&p0),
            members,
            vec![],
            &hosts,
            &HashSet::new(),
            3,
        );
        assert_eq!(acts(&plan2), [("stop".to_owned(), "p-1".to_owned())]);
    }

    #[test]
    fn a_crash_ends_the_session_and_replaces_the_vm() {
        let p = pool(1, 3, true);
        let mut m = member("p-1", "a", MemberState::Running, 1);
        m.session = Some("s1".into());
        let s = Session {
            id: "s1".into(),
            user: "bob".into(),
            pool: "p".into(),
            vm: "p-1".into(),
            host: "a".into(),
            started_ns: 1,
            last_seen_ns: 1,
        };
        let hosts = HashMap::from([("a".to_owned(), host(4096, 0.1, &[("p-1", "powered-off")]))]);
        let plan = plan(&p, limits(&p), vec![m], vec![s], &hosts, &HashSet::new(), 2);
        assert_eq!(plan.sessions, vec![("s1".to_owned(), None)]);
        assert_eq!(
            acts(&plan),
            [
                ("create@a".to_owned(), String::new()),
                ("destroy".to_owned(), "p-1".to_owned())
            ]
        );
        assert!(plan
            .audit
            .iter()
            .any(|e| e.action == "crashed" && e.detail.contains("during the session of bob")));
    }

    #[test]
    fn an_unreachable_host_makes_its_vms_unknown_and_the_pool_refills_elsewhere() {
        let p = pool(1, 2, true);
        let members = vec![member("p-1", "a", MemberState::Running, 1)];
        let hosts = HashMap::from([
            (
                "a".to_owned(),
                HostStatus::Down {
                    reason: "refused".into(),
                },
            ),
            ("b".to_owned(), host(4096, 0.1, &[])),
        ]);
        let plan = plan(&p, limits(&p), members, vec![], &hosts, &HashSet::new(), 2);
        assert_eq!(
            plan.members[0].1.as_ref().unwrap().state,
            MemberState::Unknown
        );
        assert_eq!(acts(&plan), [("create@b".to_owned(), String::new())]);
    }

    #[test]
    fn idle_sessions_are_reclaimed_by_the_pools_kind() {
        let ten_min = 10 * 60 * 1_000_000_000i64;
        for stateless in [true, false] {
            let p = pool(0, 2, stateless);
            let mut m = member("p-1", "a", MemberState::Running, 1);
            m.session = Some("s1".into());
            if !stateless {
                m.owner = Some("carol".into());
            }
            let s = Session {
                id: "s1".into(),
                user: "carol".into(),
                pool: "p".into(),
                vm: "p-1".into(),
                host: "a".into(),
                started_ns: 0,
                last_seen_ns: 0,
            };
            let hosts = HashMap::from([("a".to_owned(), host(4096, 0.1, &[("p-1", "running")]))]);
            let fresh = plan(
                &p,
                limits(&p),
                vec![m.clone()],
                vec![s.clone()],
                &hosts,
                &HashSet::new(),
                ten_min - 1,
            );
            assert!(fresh.steps.is_empty(), "{stateless}: {:?}", fresh.steps);
            let old = plan(
                &p,
                limits(&p),
                vec![m],
                vec![s],
                &hosts,
                &HashSet::new(),
                ten_min + 1,
            );
            let want = if stateless { "reset" } else { "stop" };
            assert_eq!(acts(&old), [(want.to_owned(), "p-1".to_owned())]);
            let rec = old.members.last().unwrap().1.clone().unwrap();
            assert_eq!(rec.owner.is_some(), !stateless);
        }
    }

    #[test]
    fn vms_being_created_count_as_idle() {
        let p = pool(2, 3, true);
        let members = vec![
            member("p-1", "a", MemberState::Running, 1),
            member("p-2", "a", MemberState::Starting, 2),
        ];
        let hosts = HashMap::from([("a".to_owned(), host(4096, 0.1, &[("p-1", "running")]))]);
        let busy = HashSet::from(["p-2".to_owned()]);
        let plan = plan(&p, limits(&p), members, vec![], &hosts, &busy, 3);
        assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    }

    #[test]
    fn pending_vms_are_left_alone() {
        let p = pool(1, 1, true);
        let members = vec![member("p-1", "a", MemberState::Starting, 1)];
        let hosts = HashMap::from([("a".to_owned(), host(4096, 0.1, &[]))]);
        let busy = HashSet::from(["p-1".to_owned()]);
        let plan = plan(&p, limits(&p), members, vec![], &hosts, &busy, 2);
        assert!(plan.steps.is_empty() && plan.members.is_empty());
    }
}
