//! The sync API: a store served over HTTPS (HTTP/2) to laptops and other
//! stores. See [`crate::protocol`] for the routes and messages.
//!
//! * [`router`] lists every route in one place; other crates (the broker)
//!   merge their own routers beside it on the same listener and reuse the
//!   [`Authed`] extractor and the [`ApiState`].
//! * [`serve`] runs a router on a TCP listener, TLS (rustls, ring) by
//!   default, with HTTP/1.1 and HTTP/2, request logs, and graceful
//!   shutdown.
//! * Every handler authenticates ([`Authed`]: 401 before the handler runs),
//!   then authorises against the layer it touches (`ApiState::require`:
//!   403 naming the layer), then does its store work on the blocking pool
//!   ([`gate::blocking`]).
//!
//! # Threads
//!
//! Tokio owns the sockets. Store work runs on tokio's blocking pool; the
//! gate's reaper is one more thread. Record streams of `fetch` are produced
//! on a blocking thread and sent through a channel of two batches, so a
//! slow reader holds at most that much memory.

mod caller;
mod chunks;
mod error;
pub mod gate;
mod layers;
mod push;
mod serve;

use std::path::Path;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;

pub use caller::Authed;
pub use error::{ApiError, ApiResult, Body};
pub use gate::Gate;
pub use serve::{serve, tls_config, Listening, Peer, ServeError};

use crate::chunk::MAX_CHUNK_BYTES;
use crate::error::Result;

/// Largest JSON body (a push naming many versions).
pub const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;
/// Largest upload: one batch of records (the biggest manifest node fits).
pub const MAX_UPLOAD_BYTES: usize = MAX_CHUNK_BYTES + 1024 * 1024;
/// Uploads verified at once (each holds its body in memory).
pub const UPLOADS_AT_ONCE: usize = 4;

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    /// The store.
    pub gate: Arc<Gate>,
    uploads: Arc<Semaphore>,
}

impl ApiState {
    /// State over the store at `root`.
    ///
    /// # Errors
    /// The store cannot be opened.
    pub fn open(root: &Path) -> Result<ApiState> {
        Ok(ApiState {
            gate: Gate::open(root)?,
            uploads: Arc::new(Semaphore::new(UPLOADS_AT_ONCE)),
        })
    }
}

/// Every route of the sync API.
pub fn router(state: ApiState) -> Router {
    let json = DefaultBodyLimit::max(MAX_JSON_BYTES);
    let ids = DefaultBodyLimit::max(crate::transfer::wire::MAX_IDS * 32);
    let upload = DefaultBodyLimit::max(MAX_UPLOAD_BYTES);
    Router::new()
        .route("/api/v1/whoami", get(layers::whoami))
        .route("/api/v1/keys", get(layers::keys))
        .route("/api/v1/layers", get(layers::list))
        .route("/api/v1/layers/{*layer}", get(layers::show))
        .route(
            "/api/v1/versions/{*layer}",
            post(layers::versions).layer(json),
        )
        .route("/api/v1/fetch/{*layer}", post(chunks::fetch).layer(ids))
        .route("/api/v1/missing/{*layer}", post(chunks::missing).layer(ids))
        .route(
            "/api/v1/upload/{*layer}",
            post(chunks::upload).layer(upload),
        )
        .route("/api/v1/push/{*layer}", post(push::push).layer(json))
        .route(
            "/api/v1/conflicts/{*layer}",
            post(push::submit_conflict).layer(json),
        )
        .route("/api/v1/conflicts", get(push::list_conflicts))
        .route("/api/v1/conflict/{id}", get(push::show_conflict))
        .with_state(state)
}
