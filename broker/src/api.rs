//! The broker's JSON API, served by `lamina server` beside the sync API on
//! the same listener, with the same users, tokens and error envelope.
//!
//! | route | who | does |
//! |---|---|---|
//! | `GET /api/v1/pools` | anyone | the pools the caller may use (all for an admin) |
//! | `POST /api/v1/pools` | admin | create a pool |
//! | `GET /api/v1/pools/{pool}` | subscribed, admin | a pool, its counts (and VMs for an admin) |
//! | `DELETE /api/v1/pools/{pool}` | admin | remove an empty pool |
//! | `GET`, `PUT /api/v1/pools/{pool}/rules` | admin | the rules (PUT `{"toml": …}` or a rules object) |
//! | `POST /api/v1/pools/{pool}/subscriptions` | admin | `{"principal": "alice" \| "@group"}` |
//! | `DELETE /api/v1/pools/{pool}/subscriptions/{principal}` | admin | withdraw it |
//! | `POST /api/v1/pools/{pool}/desktop` | subscribed | a desktop (`{"another": true}` for one more) |
//! | `GET /api/v1/sessions` | anyone | the caller's sessions (all for an admin) |
//! | `DELETE /api/v1/sessions/{id}` | owner, admin | end a session |
//! | `POST /api/v1/sessions/{id}/touch` | owner, admin | mark it in use |
//! | `GET`, `POST /api/v1/hosts`, `DELETE /api/v1/hosts/{host}` | admin | hosts and their last report |
//! | `GET /api/v1/vms` | admin | every pool's VMs |
//! | `GET /api/v1/audit?since_ns=N` | admin | the audit log |
//! | `GET`, `POST /api/v1/desktops`, `DELETE /api/v1/desktops/{name}` | admin | external desktops (`{"name", "vnc": "HOST:PORT", "password"?, "pool"}`) |
//! | `GET /api/v1/devices` | anyone | the device table; `PUT` `{"toml": …}` admin |
//! | `PUT /api/v1/users/{name}/password` | the user, admin | `{"password": …}`: the console password (see `console`) |
//! | `POST /api/v1/sessions/{id}/ticket` | its user | a screen ticket (see `console`) |

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef, Path, Query, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use lamina_sync::api::{ApiState, Authed, Body};
use lamina_sync::{Caller, Principal, Store};
use serde::{Deserialize, Serialize};

use crate::alloc::Desktop;
use crate::audit::{self, AuditEntry};
use crate::broker::{Broker, HostStatus};
use crate::error::{Error, Result};
use crate::model::{self, BrokerCatalog, HostSummary, Member, MemberState, Pool, Session};
use crate::rules::{Limits, Rules, WeekTime};

/// Largest request body of the broker's routes.
pub const MAX_BODY: usize = 256 * 1024;

/// What the broker's handlers share.
#[derive(Clone)]
pub struct BrokerState {
    /// The sync API's state (the store, authentication).
    pub api: ApiState,
    /// The broker.
    pub broker: Arc<Broker>,
}

impl FromRef<BrokerState> for ApiState {
    fn from_ref(s: &BrokerState) -> ApiState {
        s.api.clone()
    }
}

/// Every route of the broker's API.
pub fn router(state: BrokerState) -> Router {
    Router::new()
        .route("/api/v1/pools", get(pools).post(create_pool))
        .route("/api/v1/pools/{pool}", get(pool).delete(remove_pool))
        .route("/api/v1/pools/{pool}/rules", get(rules).put(set_rules))
        .route("/api/v1/pools/{pool}/subscriptions", post(subscribe))
        .route(
            "/api/v1/pools/{pool}/subscriptions/{principal}",
            delete(unsubscribe),
        )
        .route("/api/v1/pools/{pool}/desktop", post(allocate))
        .route("/api/v1/sessions", get(sessions))
        .route("/api/v1/sessions/{id}", delete(release))
        .route("/api/v1/sessions/{id}/touch", post(touch))
        .route("/api/v1/hosts", get(hosts).post(add_host))
        .route("/api/v1/hosts/{host}", delete(remove_host))
        .route("/api/v1/vms", get(vms))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/desktops", get(desktops).post(add_desktop))
        .route("/api/v1/desktops/{name}", delete(remove_desktop))
        .route("/api/v1/devices", get(devices).put(set_devices))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn admin(c: &Caller) -> Result<()> {
    if c.admin {
        Ok(())
    } else {
        Err(Error::Forbidden(format!("{} is not an admin", c.user)))
    }
}

/// A pool as listed.
#[derive(Debug, Serialize)]
pub struct PoolView {
    /// The pool.
    #[serde(flatten)]
    pub pool: Pool,
    /// What its rules ask for now.
    pub limits: Limits,
    /// VMs in each state.
    pub counts: Counts,
    /// Its VMs (admins only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<Member>>,
}

/// VMs of a pool by state.
#[derive(Debug, Default, Serialize)]
pub struct Counts {
    /// All of them.
    pub total: u32,
    /// Running and free.
    pub idle: u32,
    /// In a session.
    pub in_use: u32,
    /// Being started.
    pub starting: u32,
    /// Stopped.
    pub stopped: u32,
    /// Host not answering.
    pub unknown: u32,
}

pub(crate) fn view(pool: Pool, members: &[Member], with_vms: bool) -> PoolView {
    let mine: Vec<Member> = members
        .iter()
        .filter(|m| m.pool == pool.name)
        .cloned()
        .collect();
    let mut c = Counts::default();
    for m in &mine {
        c.total += 1;
        match m.state {
            _ if m.session.is_some() => c.in_use += 1,
            MemberState::Running if m.is_idle() => c.idle += 1,
            MemberState::Running => {}
            MemberState::Starting => c.starting += 1,
            MemberState::Stopped => c.stopped += 1,
            MemberState::Unknown => c.unknown += 1,
        }
    }
    PoolView {
        limits: pool.rules.limits(WeekTime::now()),
        pool,
        counts: c,
        vms: with_vms.then_some(mine),
    }
}

async fn pools(Authed(c): Authed, State(s): State<BrokerState>) -> Result<Json<Vec<PoolView>>> {
    let out = s
        .broker
        .read(move |store| {
            let members = store.members()?;
            let subs = store.subscriptions(None)?;
            Ok(store
                .pools()?
                .into_iter()
                .filter(|p| c.admin || model::subscribed(&subs, &p.name, &c.user, &c.groups))
                .map(|p| view(p, &members, c.admin))
                .collect())
        })
        .await?;
    Ok(Json(out))
}

/// A new pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPool {
    /// Name.
    pub name: String,
    /// Template.
    pub template: String,
    /// Base layer.
    pub base: String,
    /// Rules.
    pub rules: Rules,
}

/// An admin's change to the catalog, with its audit entry (what `f`
/// returns beside its result) written in the same call; wakes the engine.
pub(crate) async fn admin_change<T, F>(
    s: &BrokerState,
    c: Caller,
    action: &'static str,
    target: String,
    f: F,
) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Store) -> Result<(T, String)> + Send + 'static,
{
    admin(&c)?;
    let out = s
        .broker
        .write(move |store| {
            let (out, detail) = f(store)?;
            audit::record(store, &[AuditEntry::ok(&c.user, action, &target, detail)])?;
            Ok(out)
        })
        .await?;
    s.broker.wake.notify_one();
    Ok(out)
}

async fn create_pool(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Body(p): Body<NewPool>,
) -> Result<Json<Pool>> {
    let target = p.name.clone();
    let pool = admin_change(&s, c, "pool-create", target, move |store| {
        let pool = store.create_pool(&p.name, &p.template, &p.base, p.rules)?;
        let detail = format!("template {} over {}", pool.template, pool.base);
        Ok((pool, detail))
    })
    .await?;
    Ok(Json(pool))
}

async fn pool(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(name): Path<String>,
) -> Result<Json<PoolView>> {
    let v = s
        .broker
        .read(move |store| {
            let subs = store.subscriptions(Some(&name))?;
            let p = store.pool(&name)?;
            if !c.admin && !model::subscribed(&subs, &name, &c.user, &c.groups) {
                return Err(Error::Forbidden(format!(
                    "{} is not subscribed to pool {name}",
                    c.user
                )));
            }
            Ok(view(p, &store.members()?, c.admin))
        })
        .await?;
    Ok(Json(v))
}

async fn remove_pool(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let n = name.clone();
    admin_change(&s, c, "pool-remove", name, move |store| {
        Ok((store.remove_pool(&n)?, String::new()))
    })
    .await?;
    Ok(Json(serde_json::json!({"removed": true})))
}

async fn rules(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>> {
    admin(&c)?;
    let p = s.broker.read(move |store| store.pool(&name)).await?;
    Ok(Json(
        serde_json::json!({"rules": p.rules, "toml": p.rules.to_toml()}),
    ))
}

/// New rules: TOML text, or the rules as JSON.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RulesBody {
    /// `{"toml": "min_idle = 2\n…"}`.
    Toml {
        /// The text.
        toml: String,
    },
    /// The rules object.
    Rules(Rules),
}

async fn set_rules(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(name): Path<String>,
    Body(b): Body<RulesBody>,
) -> Result<Json<Pool>> {
    admin(&c)?;
    let rules = match b {
        RulesBody::Toml { toml } => Rules::from_toml(&toml)?,
        RulesBody::Rules(r) => r,
    };
    let n = name.clone();
    let p = admin_change(&s, c, "pool-rules", name, move |store| {
        let p = store.set_rules(&n, rules)?;
        let detail = p.rules.to_toml().trim_end().replace('\n', "; ");
        Ok((p, detail))
    })
    .await?;
    Ok(Json(p))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscribe {
    principal: String,
}

async fn subscribe(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(name): Path<String>,
    Body(b): Body<Subscribe>,
) -> Result<Json<model::Subscription>> {
    let who: Principal = b.principal.parse()?;
    let n = name.clone();
    let sub = admin_change(&s, c, "subscribe", name, move |store| {
        Ok((store.subscribe(&n, &who)?, who.to_string()))
    })
    .await?;
    Ok(Json(sub))
}

async fn unsubscribe(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path((name, principal)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>> {
    let who: Principal = principal.parse()?;
    let n = name.clone();
    let removed = admin_change(&s, c, "unsubscribe", name, move |store| {
        Ok((store.unsubscribe(&n, &who)?, who.to_string()))
    })
    .await?;
    Ok(Json(serde_json::json!({"removed": removed})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    #[serde(default)]
    another: bool,
}

async fn allocate(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Desktop>> {
    let another = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        serde_json::from_slice::<Ask>(&body)
            .map_err(|e| Error::InvalidInput(format!("malformed JSON body: {e}")))?
            .another
    };
    Ok(Json(s.broker.allocate(&c, &name, another).await?))
}

async fn sessions(Authed(c): Authed, State(s): State<BrokerState>) -> Result<Json<Vec<Session>>> {
    let all = s.broker.read(|store| store.sessions()).await?;
    Ok(Json(
        all.into_iter()
            .filter(|x| c.admin || x.user == c.user)
            .collect(),
    ))
}

async fn release(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(id): Path<String>,
) -> Result<Json<Session>> {
    Ok(Json(s.broker.release(&c, &id).await?))
}

async fn touch(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(id): Path<String>,
) -> Result<Json<Session>> {
    Ok(Json(s.broker.touch(&c, &id).await?))
}

/// A host as listed.
#[derive(Debug, Serialize)]
pub struct HostView {
    /// The host.
    #[serde(flatten)]
    pub host: HostSummary,
    /// Its last report.
    pub status: Option<HostStatus>,
}

async fn hosts(Authed(c): Authed, State(s): State<BrokerState>) -> Result<Json<Vec<HostView>>> {
    admin(&c)?;
    let list = s.broker.read(|store| store.hosts()).await?;
    let mut status = s.broker.host_status();
    Ok(Json(
        list.into_iter()
            .map(|h| HostView {
                status: status.remove(&h.name),
                host: h,
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewHost {
    name: String,
    url: String,
    token: String,
    #[serde(default)]
    ca_pem: Option<String>,
}

async fn add_host(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Body(h): Body<NewHost>,
) -> Result<Json<HostSummary>> {
    let target = h.name.clone();
    let out = admin_change(&s, c, "host-add", target, move |store| {
        let host = store.add_host(&h.name, &h.url, &h.token, h.ca_pem)?;
        let detail = host.url.clone();
        let summary = HostSummary {
            ca: host.ca_pem.is_some(),
            name: host.name,
            url: host.url,
        };
        Ok((summary, detail))
    })
    .await?;
    Ok(Json(out))
}

async fn remove_host(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let n = name.clone();
    admin_change(&s, c, "host-remove", name, move |store| {
        Ok((store.remove_host(&n)?, String::new()))
    })
    .await?;
    Ok(Json(serde_json::json!({"removed": true})))
}

async fn vms(Authed(c): Authed, State(s): State<BrokerState>) -> Result<Json<Vec<Member>>> {
    admin(&c)?;
    Ok(Json(s.broker.read(|store| store.members()).await?))
}

#[derive(Debug, Deserialize)]
struct Since {
    since_ns: Option<i64>,
}

async fn audit_log(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Query(q): Query<Since>,
) -> Result<Json<Vec<AuditEntry>>> {
    admin(&c)?;
    Ok(Json(
        s.broker
            .read(move |store| audit::list(store, q.since_ns))
            .await?,
    ))
}

async fn desktops(
    Authed(c): Authed,
    State(s): State<BrokerState>,
) -> Result<Json<Vec<crate::desktop::ExternalDesktop>>> {
    admin(&c)?;
    Ok(Json(s.broker.read(crate::desktop::list).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDesktop {
    name: String,
    vnc: String,
    #[serde(default)]
    password: Option<String>,
    pool: String,
}

async fn add_desktop(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Body(d): Body<NewDesktop>,
) -> Result<Json<Member>> {
    let target = format!("{}/{}", d.pool, d.name);
    let m = admin_change(&s, c, "desktop-add", target, move |store| {
        let m = crate::desktop::add(store, &d.name, &d.vnc, d.password.as_deref(), &d.pool)?;
        Ok((m, format!("VNC {}", d.vnc)))
    })
    .await?;
    Ok(Json(m))
}

async fn remove_desktop(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Path(name): Path<String>,
) -> Result<Json<Member>> {
    let n = name.clone();
    let m = admin_change(&s, c, "desktop-rm", name, move |store| {
        Ok((crate::desktop::remove(store, &n)?, String::new()))
    })
    .await?;
    Ok(Json(m))
}

async fn devices(
    Authed(_c): Authed,
    State(s): State<BrokerState>,
) -> Result<Json<crate::console::DeviceTable>> {
    Ok(Json(s.broker.read(crate::console::devices).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesBody {
    toml: String,
}

async fn set_devices(
    Authed(c): Authed,
    State(s): State<BrokerState>,
    Body(b): Body<DevicesBody>,
) -> Result<Json<crate::console::DeviceTable>> {
    let t = crate::console::DeviceTable::parse(&b.toml)?;
    let out = admin_change(&s, c, "devices", "device table".into(), move |store| {
        crate::console::set_devices(store, &t)?;
        let n = t.device.len();
        Ok((t, format!("{n} rows")))
    })
    .await?;
    Ok(Json(out))
}
