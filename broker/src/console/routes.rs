//! The console's handlers.

use std::collections::HashMap;
use std::path::{Component, Path as FsPath};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use lamina_sync::api::{Authed, Body, Peer};
use lamina_sync::Caller;

use super::login::{self, Login};
use super::pages::{self, Frame};
use super::proxy::{self, MAX_MESSAGE, TICKET_TTL};
use super::{admin, device, ConsoleState};
use crate::api::view;
use crate::audit::{self, AuditEntry};
use crate::error::{Error, Result};
use crate::model::{self, BrokerCatalog};
use crate::password;

pub(super) type FormMap = Form<HashMap<String, String>>;

/// Every route of the console.
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(home))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/pools/{pool}/connect", post(connect))
        .route("/console/sessions/{id}/end", post(end))
        .route("/console/screen/{id}", get(screen))
        .route("/console/ws", get(ws))
        .route("/console/novnc/{*path}", get(novnc))
        .route("/console/admin", get(admin::page))
        .route("/console/admin/audit", get(admin::audit_page))
        .route(
            "/console/admin/pools/{pool}/rules",
            get(admin::rules_form).post(admin::rules_save),
        )
        .route(
            "/console/admin/pools/{pool}/{change}",
            post(admin::subscription),
        )
        .route("/console/admin/devices", post(admin::devices))
        .route("/api/v1/sessions/{id}/ticket", post(api_ticket))
        .route(
            "/api/v1/users/{name}/password",
            axum::routing::put(set_password),
        )
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// A logged-in browser.
pub(super) struct Me {
    pub(super) login: Login,
    pub(super) secret: String,
    pub(super) caller: Caller,
}

fn nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// An HTML response with the console's security headers.
pub(super) fn html(
    status: StatusCode,
    title: &str,
    me: Option<&Me>,
    class: &str,
    body: impl FnOnce(&str) -> String,
) -> Response {
    let n = nonce();
    let frame = Frame {
        title,
        user: me.map(|m| (m.caller.user.as_str(), m.caller.admin)),
        csrf: me.map_or("", |m| m.login.csrf.as_str()),
        nonce: &n,
        class,
    };
    let text = pages::page(&frame, &body(&n));
    let mut r = (status, text).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    let csp = format!(
        "default-src 'self'; script-src 'self' 'nonce-{n}'; style-src 'self' 'nonce-{n}'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// An error as a page.
pub(super) fn fail(e: &Error, me: Option<&Me>) -> Response {
    let (status, _) = e.status();
    let message = e.to_string();
    html(status, "Error", me, "", |_| pages::error(&message))
}

pub(super) fn forbidden(why: &str, me: Option<&Me>) -> Response {
    fail(&Error::Forbidden(why.into()), me)
}

/// The logged-in user of a request, if any.
async fn who(st: &ConsoleState, headers: &HeaderMap) -> Option<Me> {
    let secret = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(login::cookie_value)?
        .to_owned();
    let l = st.logins.get(&secret)?;
    let name = l.user.clone();
    // Removed users, or demoted admins, lose it at once.
    let user =
        st.b.broker
            .read(move |s| Ok(s.user(&name)?))
            .await
            .ok()
            .flatten()?;
    Some(Me {
        caller: Caller {
            user: user.name,
            admin: user.admin,
            groups: user.groups,
            token: String::new(),
        },
        login: l,
        secret,
    })
}

/// The console's own origin, as a browser names it.
fn own_origin(st: &ConsoleState, headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()))?;
    Some(format!(
        "{}://{host}",
        if st.secure { "https" } else { "http" }
    ))
}

/// Whether the request's `Origin` is the console's own.
fn same_origin(st: &ConsoleState, headers: &HeaderMap, uri: &Uri) -> bool {
    // (A `Referrer-Policy: no-referrer` page would make Chromium send
    // `Origin: null` with its forms: the pages use `same-origin`.)
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    let ok = matches!((origin, own_origin(st, headers, uri)), (Some(o), Some(own)) if o == own);
    if !ok {
        tracing::info!(origin = origin.unwrap_or("none"), own = ?own_origin(st, headers, uri), "origin refused");
    }
    ok
}

/// A state-changing form: logged in, same origin, the login's CSRF token.
pub(super) async fn posted(
    st: &ConsoleState,
    headers: &HeaderMap,
    uri: &Uri,
    form: &HashMap<String, String>,
) -> std::result::Result<Me, Response> {
    if !same_origin(st, headers, uri) {
        return Err(forbidden(
            "cross-origin request refused (Origin is not the console's)",
            None,
        ));
    }
    let Some(me) = who(st, headers).await else {
        return Err(Redirect::to("/console/login").into_response());
    };
    let ok = form
        .get("csrf")
        .is_some_and(|c| login::same(c, &me.login.csrf));
    if !ok {
        return Err(forbidden(
            "missing or wrong CSRF token: reload the page",
            Some(&me),
        ));
    }
    Ok(me)
}

/// A state-changing form of an admin.
pub(super) async fn posted_admin(
    st: &ConsoleState,
    headers: &HeaderMap,
    uri: &Uri,
    form: &HashMap<String, String>,
) -> std::result::Result<Me, Response> {
    let me = posted(st, headers, uri, form).await?;
    if me.caller.admin {
        Ok(me)
    } else {
        Err(forbidden(
            &format!("{} is not an admin", me.caller.user),
            Some(&me),
        ))
    }
}

pub(super) async fn admin_me(
    st: &ConsoleState,
    headers: &HeaderMap,
) -> std::result::Result<Me, Response> {
    match who(st, headers).await {
        None => Err(Redirect::to("/console/login").into_response()),
        Some(me) if !me.caller.admin => Err(forbidden(
            &format!("{} is not an admin", me.caller.user),
            Some(&me),
        )),
        Some(me) => Ok(me),
    }
}

async fn login_form(State(st): State<ConsoleState>, headers: HeaderMap) -> Response {
    if who(&st, &headers).await.is_some() {
        return Redirect::to("/console").into_response();
    }
    html(StatusCode::OK, "Log in", None, "", |_| pages::login(None))
}

async fn login(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    peer: Option<axum::Extension<Peer>>,
    Form(f): FormMap,
) -> Response {
    if !same_origin(&st, &headers, &uri) {
        return forbidden(
            "cross-origin login refused (Origin is not the console's)",
            None,
        );
    }
    let user = f
        .get("user")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let pw = f.get("password").cloned().unwrap_or_default();
    let ip = peer.map(|p| p.0 .0.ip());
    if user.is_empty() || pw.is_empty() || user.len() > 256 || pw.len() > 1024 {
        return html(StatusCode::BAD_REQUEST, "Log in", None, "", |_| {
            pages::login(Some("give a user name and a password"))
        });
    }
    if let Err(wait) = st.logins.check(&user, ip) {
        let mut r = html(StatusCode::TOO_MANY_REQUESTS, "Log in", None, "", |_| {
            pages::login(Some(&format!(
                "too many failed logins: try again in {} s",
                wait.as_secs().max(1)
            )))
        });
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        st.b.broker
            .audit_entry(AuditEntry::failed(
                &user,
                "login",
                "console",
                format!("rate-limited (from {})", show_ip(ip)),
            ))
            .await;
        return r;
    }
    let (u, p) = (user.clone(), pw);
    let ok = st.b.broker.read(move |s| password::verify(s, &u, &p)).await;
    match ok {
        Ok(true) => {
            st.logins.succeeded(&user);
            let secret = st.logins.create(&user);
            st.b.broker
                .audit_entry(AuditEntry::ok(
                    &user,
                    "login",
                    "console",
                    format!("from {}", show_ip(ip)),
                ))
                .await;
            let mut r = Redirect::to("/console").into_response();
            if let Ok(v) = HeaderValue::from_str(&login::set_cookie(Some(&secret))) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Ok(false) => {
            st.logins.failed(&user, ip);
            st.b.broker
                .audit_entry(AuditEntry::failed(
                    &user,
                    "login",
                    "console",
                    format!("wrong user or password (from {})", show_ip(ip)),
                ))
                .await;
            html(StatusCode::UNAUTHORIZED, "Log in", None, "", |_| {
                pages::login(Some("wrong user or password"))
            })
        }
        Err(e) => fail(&e, None),
    }
}

fn show_ip(ip: Option<std::net::IpAddr>) -> String {
    ip.map_or_else(|| "unknown address".into(), |i| i.to_string())
}

async fn logout(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): FormMap,
) -> Response {
    let me = match posted(&st, &headers, &uri, &f).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    st.logins.end(&me.secret);
    st.b.broker
        .audit_entry(AuditEntry::ok(&me.caller.user, "logout", "console", ""))
        .await;
    let mut r = Redirect::to("/console/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&login::set_cookie(None)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn user_agent(headers: &HeaderMap) -> String {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn classify(st: &ConsoleState, headers: &HeaderMap, vw: Option<u32>) -> device::Device {
    let table = st.b.broker.read(device::load).await.unwrap_or_default();
    table.classify(&user_agent(headers), vw)
}

#[derive(serde::Deserialize)]
struct Viewport {
    vw: Option<u32>,
}

async fn home(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Query(q): Query<Viewport>,
) -> Response {
    let Some(me) = who(&st, &headers).await else {
        return Redirect::to("/console/login").into_response();
    };
    let c = me.caller.clone();
    let listed =
        st.b.broker
            .read(move |s| {
                let members = s.members()?;
                let subs = s.subscriptions(None)?;
                let pools: Vec<_> = s
                    .pools()?
                    .into_iter()
                    .filter(|p| model::subscribed(&subs, &p.name, &c.user, &c.groups))
                    .map(|p| {
                        let v = view(p, &members, true);
                        let profile = pages::pool_profile(&v);
                        (v, profile)
                    })
                    .collect();
                let sessions: Vec<_> = s
                    .sessions()?
                    .into_iter()
                    .filter(|x| x.user == c.user)
                    .collect();
                Ok((pools, sessions))
            })
            .await;
    let (mut pools, sessions) = match listed {
        Ok(x) => x,
        Err(e) => return fail(&e, Some(&me)),
    };
    let dev = classify(&st, &headers, q.vw).await;
    // Pools whose screens fit the device first.
    pools.sort_by_key(|(p, prof)| {
        (
            prof.as_deref() != Some(dev.profile.as_str()),
            p.pool.name.clone(),
        )
    });
    html(StatusCode::OK, "Desktops", Some(&me), "", |n| {
        pages::home(&me.login.csrf, &dev, &pools, &sessions, n)
    })
}

async fn connect(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    Path(pool): Path<String>,
    Form(f): FormMap,
) -> Response {
    let me = match posted(&st, &headers, &uri, &f).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    match st.b.broker.allocate(&me.caller, &pool, false).await {
        Ok(d) => {
            let vw = f.get("vw").and_then(|v| v.parse::<u32>().ok());
            let q = vw.map(|w| format!("?vw={w}")).unwrap_or_default();
            Redirect::to(&format!("/console/screen/{}{q}", d.session.id)).into_response()
        }
        Err(e) => fail(&e, Some(&me)),
    }
}

async fn end(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    Form(f): FormMap,
) -> Response {
    let me = match posted(&st, &headers, &uri, &f).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    match st.b.broker.release(&me.caller, &id).await {
        Ok(s) if s.user != me.caller.user => Redirect::to("/console/admin").into_response(),
        Ok(_) => Redirect::to("/console").into_response(),
        // Ended already (a form sent twice, a browser's retry of a POST
        // whose answer was lost, an admin's force disconnect): the user
        // is disconnected either way.
        Err(crate::Error::NotFound(_)) => Redirect::to("/console").into_response(),
        Err(e) => fail(&e, Some(&me)),
    }
}

async fn screen(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<Viewport>,
) -> Response {
    let Some(me) = who(&st, &headers).await else {
        return Redirect::to("/console/login").into_response();
    };
    let (ticket, session) =
        match proxy::ticket_for(&st.b.broker, &st.tickets, &me.caller, &id).await {
            Ok(x) => x,
            Err(e) => return fail(&e, Some(&me)),
        };
    let vm = session.vm.clone();
    let profile =
        st.b.broker
            .read(move |s| {
                Ok(model::get::<model::Member>(s, model::MEMBER, &vm)?.and_then(|m| m.profile))
            })
            .await
            .ok()
            .flatten();
    let (w, h) = crate::alloc::geometry(profile.as_deref());
    let dev = classify(&st, &headers, q.vw).await;
    html(StatusCode::OK, &session.vm, Some(&me), "screen", |n| {
        pages::screen(&session, &ticket, &dev, w, h, &me.login.csrf, n)
    })
}

#[derive(serde::Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

async fn ws(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<TicketQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !same_origin(&st, &headers, &uri) {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .unwrap_or("none");
        tracing::warn!(%origin, "screen WebSocket from a foreign origin refused");
        return Error::Forbidden(format!("WebSocket from origin {origin} refused: only the console's own origin may open screens")).into_response();
    }
    let Some(t) = q.ticket else {
        return Error::Forbidden("no ticket (?ticket=…)".into()).into_response();
    };
    let ticket = match st.tickets.take(&t) {
        Ok(t) => t,
        Err(e) => {
            st.b.broker
                .audit_entry(AuditEntry::failed("?", "connect", "screen", e.to_string()))
                .await;
            return e.into_response();
        }
    };
    let broker = st.b.broker.clone();
    upgrade
        .protocols(["binary"])
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| proxy::serve(broker, socket, ticket))
}

async fn novnc(State(st): State<ConsoleState>, Path(path): Path<String>) -> Response {
    let rel = FsPath::new(&path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Error::NotFound(format!("no file {path:?}")).into_response();
    }
    let file = st.novnc.join(rel);
    let kind = match file.extension().and_then(|e| e.to_str()) {
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("html") => "text/html; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    match tokio::fs::read(&file).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, kind),
                (header::CACHE_CONTROL, "public, max-age=3600"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes,
        )
            .into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Error::NotFound(format!("no noVNC file {path:?} in {}", st.novnc.display()))
                .into_response()
        }
        Err(e) => Error::io(format!("cannot read {}", file.display()), e).into_response(),
    }
}

/// A screen ticket for the JSON API's clients.
#[derive(serde::Serialize)]
struct TicketView {
    ticket: String,
    expires_in_s: u64,
    websocket: String,
    session: String,
    vm: String,
}

async fn api_ticket(
    Authed(c): Authed,
    State(st): State<ConsoleState>,
    Path(id): Path<String>,
) -> Result<Json<TicketView>> {
    let (ticket, s) = proxy::ticket_for(&st.b.broker, &st.tickets, &c, &id).await?;
    Ok(Json(TicketView {
        websocket: format!("/console/ws?ticket={ticket}"),
        ticket,
        expires_in_s: TICKET_TTL.as_secs(),
        session: s.id,
        vm: s.vm,
    }))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    password: String,
}

async fn set_password(
    Authed(c): Authed,
    State(st): State<ConsoleState>,
    Path(name): Path<String>,
    Body(b): Body<PasswordBody>,
) -> Result<Json<serde_json::Value>> {
    if !c.admin && c.user != name {
        return Err(Error::Forbidden(format!(
            "{} may not set the password of {name}",
            c.user
        )));
    }
    let actor = c.user.clone();
    let n = name.clone();
    st.b.broker
        .write(move |store| {
            crate::password::set(store, &n, &b.password)?;
            audit::record(
                store,
                &[AuditEntry::ok(
                    &actor,
                    "password",
                    &n,
                    "console password set",
                )],
            )
        })
        .await?;
    // A new password ends the user's console logins.
    st.logins.end_user(&name);
    Ok(Json(serde_json::json!({"user": name, "password": "set"})))
}
