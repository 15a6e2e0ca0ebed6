//! The host agent: one host's VM runner behind an authenticated HTTPS API
//! (`lamina host-agent`), and the broker's client of it.
//!
//! Routes (all for an admin of the host's store, bearer token):
//!
//! | route | does |
//! |---|---|
//! | `GET /agent/v1/host` | figures and VMs ([`HostReport`]) |
//! | `POST /agent/v1/vms` | create and start a VM over a base layer ([`CreateVm`]) |
//! | `POST /agent/v1/vms/{name}/start` · `stop` · `reset` | lifecycle |
//! | `DELETE /agent/v1/vms/{name}` | remove the VM and its disk |
//! | `GET /agent/v1/vms/{name}/vnc` | HTTP/1.1 upgrade to `lamina-vnc`: the VM's VNC socket, raw |

mod client;
mod ops;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use lamina_sync::api::{ApiState, Authed, Body};

pub use client::{AgentClient, VNC_UPGRADE};
pub use ops::{CreateVm, HostOps, HostReport, VmReport};

use crate::error::{Error, Result};

/// What the agent's handlers share.
#[derive(Clone)]
pub struct AgentState {
    /// The host's store, for authentication.
    pub api: ApiState,
    ops: Arc<HostOps>,
    /// One lifecycle change at a time per host: the commands share the
    /// store's writer lock anyway, and a reset must not cross a destroy.
    busy: Arc<tokio::sync::Mutex<()>>,
}

impl FromRef<AgentState> for ApiState {
    fn from_ref(s: &AgentState) -> ApiState {
        s.api.clone()
    }
}

impl AgentState {
    /// State over the host's store (`api`) doing `ops`.
    pub fn new(api: ApiState, ops: HostOps) -> AgentState {
        AgentState {
            api,
            ops: Arc::new(ops),
            busy: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// Every route of the agent.
pub fn router(state: AgentState) -> Router {
    Router::new()
        .route("/agent/v1/host", get(host))
        .route("/agent/v1/vms", post(create))
        .route("/agent/v1/vms/{name}/{action}", post(action))
        .route("/agent/v1/vms/{name}/vnc", get(vnc))
        .route("/agent/v1/vms/{name}", delete(destroy))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

fn admin(caller: &Authed) -> Result<()> {
    if caller.0.admin {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "{} is not an admin of this host",
            caller.0.user
        )))
    }
}

/// Runs blocking work on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| Error::Panicked(e.to_string()))?
}

async fn host(caller: Authed, State(s): State<AgentState>) -> Result<Json<HostReport>> {
    admin(&caller)?;
    let ops = s.ops.clone();
    Ok(Json(blocking(move || ops.report()).await?))
}

async fn create(
    caller: Authed,
    State(s): State<AgentState>,
    Body(req): Body<CreateVm>,
) -> Result<Json<VmReport>> {
    admin(&caller)?;
    let _busy = s.busy.lock().await;
    let ops = s.ops.clone();
    Ok(Json(blocking(move || ops.create(&req)).await?))
}

async fn action(
    caller: Authed,
    State(s): State<AgentState>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>> {
    admin(&caller)?;
    let _busy = s.busy.lock().await;
    let ops = s.ops.clone();
    let what = action.clone();
    let vm = name.clone();
    blocking(move || match what.as_str() {
        "start" => ops.start(&vm),
        "stop" => ops.stop(&vm),
        "reset" => ops.reset(&vm),
        other => Err(Error::NotFound(format!(
            "no VM action {other:?} (start, stop, reset)"
        ))),
    })
    .await?;
    Ok(Json(serde_json::json!({"vm": name, "done": action})))
}

async fn destroy(
    caller: Authed,
    State(s): State<AgentState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>> {
    admin(&caller)?;
    let _busy = s.busy.lock().await;
    let ops = s.ops.clone();
    let vm = name.clone();
    blocking(move || ops.destroy(&vm)).await?;
    Ok(Json(serde_json::json!({"vm": name, "done": "destroy"})))
}

/// Bridges an upgraded HTTP/1.1 connection to the VM's VNC socket: the
/// broker's console proxy frames it for the browser.
async fn vnc(
    caller: Authed,
    State(s): State<AgentState>,
    Path(name): Path<String>,
    mut req: Request,
) -> Result<Response> {
    admin(&caller)?;
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(VNC_UPGRADE));
    if !wants {
        return Err(Error::InvalidInput(format!(
            "the VNC route needs `Connection: upgrade` and `Upgrade: {VNC_UPGRADE}` over HTTP/1.1"
        )));
    }
    let ops = s.ops.clone();
    let vm = name.clone();
    let path = blocking(move || ops.vnc_socket(&vm)).await?;
    // Connect before answering 101, so a VM without a display gets an error.
    let vnc = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| Error::io(format!("cannot reach the VNC socket {}", path.display()), e))?;
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, "VNC upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(upgraded);
        let mut vnc = vnc;
        match tokio::io::copy_bidirectional(&mut client, &mut vnc).await {
            Ok((up, down)) => tracing::info!(vm = %name, up, down, "VNC connection closed"),
            Err(e) => tracing::info!(vm = %name, error = %e, "VNC connection ended"),
        }
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(VNC_UPGRADE));
    Ok(resp)
}
