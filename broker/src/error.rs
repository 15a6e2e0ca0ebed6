//! The broker's errors, and how they become HTTP answers (the same JSON
//! envelope as the sync API: `{"error":{"kind":…,"message":…}}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lamina_sync::api::ApiError;

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] lamina_sync::Error),
    /// A catalog record does not decode.
    #[error("corrupt {kind} record {name:?}: {reason}")]
    Corrupt {
        /// Record kind.
        kind: &'static str,
        /// Record name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The request or the command line names something wrong.
    #[error("{0}")]
    InvalidInput(String),
    /// No such pool, host, session…
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Already exists.
    #[error("{0}")]
    Exists(String),
    /// Every VM the pool may have is in use.
    #[error("pool {pool} is full: all {max} of its VMs are in use (try again later)")]
    PoolFull {
        /// Pool.
        pool: String,
        /// Its `max`.
        max: u32,
    },
    /// The user holds as many desktops of the pool as allowed.
    #[error(
        "{user} already holds {per_user} desktop(s) of pool {pool}, the most allowed per user"
    )]
    PerUserLimit {
        /// Pool.
        pool: String,
        /// User.
        user: String,
        /// The pool's `per-user`.
        per_user: u32,
    },
    /// A host agent cannot be reached.
    #[error("host {host} is unreachable: {reason}")]
    HostUnreachable {
        /// Host name.
        host: String,
        /// Why.
        reason: String,
    },
    /// A host agent answered with an error.
    #[error("host {host}: {message}")]
    Agent {
        /// Host name.
        host: String,
        /// HTTP status of the answer.
        status: u16,
        /// The agent's message.
        message: String,
    },
    /// Running a `lamina` command on the host failed.
    #[error("`lamina {command}` failed: {message}")]
    Command {
        /// The subcommand line.
        command: String,
        /// Its last error line.
        message: String,
    },
    /// Blocking work panicked (a bug).
    #[error("internal error: {0}")]
    Panicked(String),
    /// An I/O failure outside the store.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the request, not the broker, was at fault (a 4xx answer).
    pub fn is_caller_fault(&self) -> bool {
        match self {
            Error::Store(e) => matches!(
                e.kind(),
                lamina_sync::ErrorKind::InvalidInput | lamina_sync::ErrorKind::NotFound
            ),
            e => e.status().0.is_client_error(),
        }
    }
}

/// Result of the broker's operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The same error for another waiter (causes that cannot be copied
    /// are kept as text).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::InvalidInput(m) => Error::InvalidInput(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::Forbidden(m) => Error::Forbidden(m.clone()),
            Error::Exists(m) => Error::Exists(m.clone()),
            Error::PoolFull { pool, max } => Error::PoolFull {
                pool: pool.clone(),
                max: *max,
            },
            e => Error::Io {
                what: e.to_string(),
                source: std::io::Error::other("(the same failure, for another request)"),
            },
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The HTTP status and the envelope's kind.
    pub(crate) fn status(&self) -> (StatusCode, &'static str) {
        match self {
            Error::InvalidInput(_) => (StatusCode::BAD_REQUEST, "invalid-input"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::Exists(_) => (StatusCode::CONFLICT, "exists"),
            Error::PoolFull { .. } => (StatusCode::CONFLICT, "pool-full"),
            Error::PerUserLimit { .. } => (StatusCode::CONFLICT, "per-user-limit"),
            Error::HostUnreachable { .. } => (StatusCode::BAD_GATEWAY, "host-unreachable"),
            Error::Agent { status, .. } if *status < 500 => {
                (StatusCode::BAD_REQUEST, "host-refused")
            }
            Error::Agent { .. } | Error::Command { .. } => (StatusCode::BAD_GATEWAY, "host-failed"),
            Error::Store(_) | Error::Corrupt { .. } | Error::Io { .. } | Error::Panicked(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Store(e) = self {
            return ApiError::from(e).into_response();
        }
        let (status, kind) = self.status();
        let message = self.to_string();
        if status.is_server_error() {
            tracing::warn!(%status, %message, "request failed");
        } else {
            tracing::info!(%status, %message, "request refused");
        }
        let body = serde_json::json!({"error": {"kind": kind, "message": message}});
        (status, axum::Json(body)).into_response()
    }
}
