//! The console's admin pages: hosts, pools and their VMs, sessions,
//! users, subscriptions, external desktops, the device table, rules and
//! the audit log.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use lamina_sync::Principal;

use super::pages;
use super::routes::{admin_me, fail, html, posted_admin, FormMap};
use super::{device, ConsoleState};
use crate::api::{admin_change, view};
use crate::audit;
use crate::desktop;
use crate::error::Error;
use crate::model::BrokerCatalog;
use crate::rules::Rules;

pub(super) async fn page(State(st): State<ConsoleState>, headers: HeaderMap) -> Response {
    let me = match admin_me(&st, &headers).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    let read =
        st.b.broker
            .read(|s| {
                let members = s.members()?;
                let pools: Vec<_> = s
                    .pools()?
                    .into_iter()
                    .map(|p| view(p, &members, true))
                    .collect();
                let mut users = Vec::new();
                for u in s.users()? {
                    let pw = crate::password::has(s, &u.name)?;
                    users.push((u.name, u.admin, u.groups, pw));
                }
                Ok((
                    s.hosts()?,
                    pools,
                    s.sessions()?,
                    users,
                    s.subscriptions(None)?,
                    desktop::list(s)?,
                    device::load(s)?.to_toml(),
                ))
            })
            .await;
    let (hosts, mut pools, sessions, users, subs, desktops, devices) = match read {
        Ok(x) => x,
        Err(e) => return fail(&e, Some(&me)),
    };
    let mut status = st.b.broker.host_status();
    // The VMs' figures as their hosts last reported them (the catalog
    // keeps states, not figures).
    let reports: Vec<&crate::agent::VmReport> = status
        .values()
        .filter_map(|s| match s {
            crate::HostStatus::Up { report } => Some(report),
            crate::HostStatus::Late { .. } | crate::HostStatus::Down { .. } => None,
        })
        .flat_map(|r| r.vms.iter())
        .collect();
    let figures: HashMap<String, (Option<f64>, Option<u64>)> = reports
        .iter()
        .map(|v| (v.name.clone(), (v.cpu_percent, v.rss_bytes)))
        .collect();
    // And their peripherals, one line each.
    let peripherals: HashMap<String, Vec<String>> = reports
        .iter()
        .filter(|v| !v.peripherals.is_empty())
        .map(|v| {
            let lines = v
                .peripherals
                .iter()
                .map(|p| {
                    format!(
                        "{}: {} {}, {}, {}",
                        p.name, p.kind, p.device, p.link, p.state
                    )
                })
                .collect();
            (v.name.clone(), lines)
        })
        .collect();
    drop(reports);
    for m in pools.iter_mut().flat_map(|p| p.vms.iter_mut().flatten()) {
        if let Some((cpu, rss)) = figures.get(&m.name) {
            m.cpu_percent = m.cpu_percent.or(*cpu);
            m.rss_bytes = m.rss_bytes.or(*rss);
        }
    }
    let hosts = hosts
        .into_iter()
        .map(|h| {
            let line = match status.remove(&h.name) {
                Some(crate::HostStatus::Up { report }) => format!(
                    "up · load {:.2} · {} MiB free of {} MiB · {} VMs",
                    report.load1,
                    report.mem_free / (1024 * 1024),
                    report.mem_total / (1024 * 1024),
                    report.vms.len()
                ),
                Some(crate::HostStatus::Late {
                    reason,
                    silent_secs,
                }) => format!("late: no report for {silent_secs} s ({reason})"),
                Some(crate::HostStatus::Down { reason }) => format!("down: {reason}"),
                None => "not polled yet".into(),
            };
            (h.name, h.url, line)
        })
        .collect();
    let v = pages::AdminView {
        hosts,
        pools: &pools,
        sessions: &sessions,
        users,
        subs: &subs,
        desktops: &desktops,
        devices,
        peripherals,
    };
    html(StatusCode::OK, "Admin", Some(&me), "", |_| {
        pages::admin(&v, &me.login.csrf)
    })
}

pub(super) async fn audit_page(State(st): State<ConsoleState>, headers: HeaderMap) -> Response {
    let me = match admin_me(&st, &headers).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    match st.b.broker.read(|s| audit::list(s, None)).await {
        Ok(entries) => html(StatusCode::OK, "Audit", Some(&me), "", |_| {
            pages::audit(&entries)
        }),
        Err(e) => fail(&e, Some(&me)),
    }
}

pub(super) async fn rules_form(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path(pool): Path<String>,
) -> Response {
    let me = match admin_me(&st, &headers).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    let p = pool.clone();
    match st.b.broker.read(move |s| s.pool(&p)).await {
        Ok(p) => html(StatusCode::OK, "Rules", Some(&me), "", |_| {
            pages::rules(&pool, &p.rules.to_toml(), &me.login.csrf, None)
        }),
        Err(e) => fail(&e, Some(&me)),
    }
}

pub(super) async fn rules_save(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    Path(pool): Path<String>,
    Form(f): FormMap,
) -> Response {
    let me = match posted_admin(&st, &headers, &uri, &f).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    let text = f.get("toml").cloned().unwrap_or_default();
    let parsed = Rules::from_toml(&text);
    let p = pool.clone();
    let saved = match parsed {
        Ok(rules) => {
            admin_change(
                &st.b,
                me.caller.clone(),
                "pool-rules",
                pool.clone(),
                move |s| {
                    let p = s.set_rules(&p, rules)?;
                    let detail = p.rules.to_toml().trim_end().replace('\n', "; ");
                    Ok(((), detail))
                },
            )
            .await
        }
        Err(e) => Err(e),
    };
    match saved {
        Ok(()) => Redirect::to(&format!("/console/admin/pools/{pool}/rules")).into_response(),
        Err(e) => {
            let msg = e.to_string();
            html(e.status().0, "Rules", Some(&me), "", |_| {
                pages::rules(&pool, &text, &me.login.csrf, Some(&msg))
            })
        }
    }
}

pub(super) async fn subscription(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    Path((pool, change)): Path<(String, String)>,
    Form(f): FormMap,
) -> Response {
    let me = match posted_admin(&st, &headers, &uri, &f).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    let who = f
        .get("principal")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let principal: Principal = match who.parse() {
        Ok(p) => p,
        Err(e) => return fail(&Error::from(e), Some(&me)),
    };
    let subscribe = match change.as_str() {
        "subscribe" => true,
        "unsubscribe" => false,
        other => {
            return fail(
                &Error::NotFound(format!("no pool change {other:?}")),
                Some(&me),
            )
        }
    };
    let (p, target) = (pool.clone(), format!("{pool} {who}"));
    let action = if subscribe {
        "subscribe"
    } else {
        "unsubscribe"
    };
    let r = admin_change(&st.b, me.caller.clone(), action, target, move |s| {
        if subscribe {
            s.subscribe(&p, &principal)?;
        } else {
            s.unsubscribe(&p, &principal)?;
        }
        Ok(((), String::new()))
    })
    .await;
    match r {
        Ok(()) => Redirect::to("/console/admin").into_response(),
        Err(e) => fail(&e, Some(&me)),
    }
}

pub(super) async fn devices(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): FormMap,
) -> Response {
    let me = match posted_admin(&st, &headers, &uri, &f).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    let text = f.get("toml").cloned().unwrap_or_default();
    let r = match device::DeviceTable::parse(&text) {
        Ok(t) => {
            admin_change(
                &st.b,
                me.caller.clone(),
                "devices",
                "device table".into(),
                move |s| {
                    device::save(s, &t)?;
                    Ok(((), format!("{} rows", t.device.len())))
                },
            )
            .await
        }
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Redirect::to("/console/admin").into_response(),
        Err(e) => fail(&e, Some(&me)),
    }
}
