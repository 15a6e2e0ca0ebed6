//! The rule engine's decisions ([`plan`]) on pools, hosts and sessions
//! made up for each case.

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
                    peripherals: Vec::new(),
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
    let plan = plan(
        &p,
        limits(&p),
        vec![],
        vec![],
        &hosts,
        &InFlight::default(),
        1,
    );
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
        &InFlight::default(),
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
        &InFlight::default(),
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
    let out = plan(
        &p,
        limits(&p),
        vec![m],
        vec![s],
        &hosts,
        &InFlight::default(),
        5,
    );
    assert!(
        out.sessions.is_empty(),
        "the session stays: {:?}",
        out.sessions
    );
    assert!(out.steps.is_empty(), "{:?}", acts(&out));
    assert!(!out.audit.iter().any(|e| e.action == "crashed"));
}

#[test]
fn a_late_host_keeps_its_vms_and_takes_no_new_ones() {
    // Two idle VMs, one on a host that missed its last report: nothing is
    // replaced, and a VM the rules still want goes to the host that answered.
    let p = pool(3, 4, true);
    let hosts = HashMap::from([
        (
            "a".to_owned(),
            HostStatus::Late {
                reason: "timed out".into(),
                silent_secs: 6,
            },
        ),
        ("b".to_owned(), host(1024, 0.5, &[("p-b", "running")])),
    ]);
    let members = vec![
        member("p-a", "a", MemberState::Running, 1),
        member("p-b", "b", MemberState::Running, 2),
    ];
    let out = plan(
        &p,
        limits(&p),
        members,
        Vec::new(),
        &hosts,
        &InFlight::default(),
        5,
    );
    assert!(
        !out.audit.iter().any(|e| e.action == "unknown"),
        "{:?}",
        out.audit
    );
    let steps = acts(&out);
    assert_eq!(steps.len(), 1, "one more for min_idle 3: {steps:?}");
    assert!(
        out.steps
            .iter()
            .all(|s| matches!(&s.act, Act::Create { host } if host == "b")),
        "{steps:?}"
    );
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
        &InFlight::default(),
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
        &InFlight::default(),
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
        &InFlight::default(),
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
    let plan = plan(
        &p,
        limits(&p),
        vec![m],
        vec![s],
        &hosts,
        &InFlight::default(),
        2,
    );
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
    let plan = plan(
        &p,
        limits(&p),
        members,
        vec![],
        &hosts,
        &InFlight::default(),
        2,
    );
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
            &InFlight::default(),
            ten_min - 1,
        );
        assert!(fresh.steps.is_empty(), "{stateless}: {:?}", fresh.steps);
        let old = plan(
            &p,
            limits(&p),
            vec![m],
            vec![s],
            &hosts,
            &InFlight::default(),
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
    let busy = InFlight {
        pending: HashSet::from(["p-2".to_owned()]),
        ..InFlight::default()
    };
    let plan = plan(&p, limits(&p), members, vec![], &hosts, &busy, 3);
    assert!(plan.steps.is_empty(), "{:?}", plan.steps);
}

#[test]
fn pending_vms_are_left_alone() {
    let p = pool(1, 1, true);
    let members = vec![member("p-1", "a", MemberState::Starting, 1)];
    let hosts = HashMap::from([("a".to_owned(), host(4096, 0.1, &[]))]);
    let busy = InFlight {
        pending: HashSet::from(["p-1".to_owned()]),
        ..InFlight::default()
    };
    let plan = plan(&p, limits(&p), members, vec![], &hosts, &busy, 2);
    assert!(plan.steps.is_empty() && plan.members.is_empty());
}

#[test]
fn a_vm_created_after_the_poll_is_kept_and_counted() {
    // p-2's creation ended after the hosts were polled: the report does not
    // list it yet. It must be neither forgotten nor replaced.
    let p = pool(2, 3, true);
    let members = vec![
        member("p-1", "a", MemberState::Running, 1),
        member("p-2", "a", MemberState::Running, 2),
    ];
    let hosts = HashMap::from([("a".to_owned(), host(4096, 0.1, &[("p-1", "running")]))]);
    let busy = InFlight {
        unreported: HashSet::from(["p-2".to_owned()]),
        ..InFlight::default()
    };
    let plan = plan(&p, limits(&p), members, vec![], &hosts, &busy, 3);
    assert!(plan.steps.is_empty(), "{:?}", acts(&plan));
    assert!(
        !plan.members.iter().any(|(n, _)| n == "p-2"),
        "{:?}",
        plan.members
    );
}

#[test]
fn a_young_session_its_vm_does_not_name_yet_is_kept_and_an_old_one_ended() {
    let p = pool(0, 1, false);
    let hosts = HashMap::from([("a".to_owned(), host(4096, 0.1, &[("p-1", "running")]))]);
    let m = member("p-1", "a", MemberState::Running, 1);
    let session = |started_ns| Session {
        id: "s1".into(),
        user: "alice".into(),
        pool: "p".into(),
        vm: "p-1".into(),
        host: "a".into(),
        started_ns,
        last_seen_ns: started_ns,
    };
    let now = 100_000_000_000;
    let young = plan(
        &p,
        limits(&p),
        vec![m.clone()],
        vec![session(now - 1_000_000_000)],
        &hosts,
        &InFlight::default(),
        now,
    );
    assert!(young.sessions.is_empty(), "{:?}", young.sessions);
    let old = plan(
        &p,
        limits(&p),
        vec![m],
        vec![session(now - 60_000_000_000)],
        &hosts,
        &InFlight::default(),
        now,
    );
    assert_eq!(old.sessions, vec![("s1".to_owned(), None)]);
    assert!(old
        .audit
        .iter()
        .any(|e| e.detail.contains("no longer serves it")));
}

#[test]
fn a_create_cut_off_by_its_host_leaves_the_vm_unknown_until_the_host_answers() {
    let create = Act::Create { host: "a".into() };
    let starting = member("p-1", "a", MemberState::Starting, 1);
    let cut = Error::HostUnreachable {
        host: "a".into(),
        reason: "peer closed connection".into(),
    };
    let (record, audit) = outcome(&create, Err(cut), Some(starting.clone()), "p/p-1");
    let record = record.expect("a VM the host may have made is not forgotten");
    assert_eq!(record.state, MemberState::Unknown);
    assert_eq!(audit.len(), 1);
    assert!(!audit[0].ok && audit[0].action == "create", "{audit:?}");

    // The host back without it: forgotten. Back with it: running.
    let p = pool(0, 2, true);
    let back = |vms: &[(&str, &str)]| HashMap::from([("a".to_owned(), host(4096, 0.1, vms))]);
    let without = plan(
        &p,
        limits(&p),
        vec![record.clone()],
        vec![],
        &back(&[]),
        &InFlight::default(),
        2,
    );
    assert_eq!(without.members, [("p-1".to_owned(), None)]);
    let with = plan(
        &p,
        limits(&p),
        vec![record],
        vec![],
        &back(&[("p-1", "running")]),
        &InFlight::default(),
        2,
    );
    assert_eq!(
        with.members[0].1.as_ref().map(|m| m.state),
        Some(MemberState::Running)
    );

    // Refused by the host (a bad template): nothing was made.
    let refused = Error::Agent {
        host: "a".into(),
        status: 400,
        message: "no template".into(),
    };
    let (record, _) = outcome(&create, Err(refused), Some(starting), "p/p-1");
    assert!(record.is_none());
}
