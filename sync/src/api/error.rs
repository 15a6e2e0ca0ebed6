//! How failures become HTTP answers: one place that picks the status code,
//! one JSON envelope `{"error":{"kind":…,"message":…}}` for every error.
//!
//! 4xx answers are logged at info (the caller's mistake), 5xx at warn with
//! the full cause (ours).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::error::{Error, ErrorKind};
use crate::id::VersionId;

/// A failed request.
#[derive(Debug)]
pub enum ApiError {
    /// No valid token (401).
    Unauthenticated(String),
    /// Valid token, no access (403).
    Forbidden(String),
    /// No such thing (404).
    NotFound(String),
    /// The request is malformed (400).
    BadRequest(String),
    /// The thing exists in a form that does not fit the request (409).
    Conflict(String),
    /// A compare-and-swap lost: the head moved (409, kind `stale`), with
    /// the head now.
    Stale {
        /// What happened.
        message: String,
        /// The current head.
        head: Option<VersionId>,
    },
    /// The body is larger than the route accepts (413).
    TooLarge(String),
    /// The store is busy beyond patience (503).
    Unavailable(String),
    /// Our fault (500).
    Internal(String),
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    kind: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    head: Option<VersionId>,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &str) {
        match self {
            ApiError::Unauthenticated(m) => (StatusCode::UNAUTHORIZED, "unauthenticated", m),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not-found", m),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "invalid-input", m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m),
            ApiError::Stale { message, .. } => (StatusCode::CONFLICT, "stale", message),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large", m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
        }
    }

    /// An error from a store operation whose input came from the caller:
    /// corrupt data is the caller's (400), not ours.
    pub fn from_input(e: Error) -> ApiError {
        match e.kind() {
            ErrorKind::Corrupt | ErrorKind::InvalidInput => ApiError::BadRequest(e.to_string()),
            _ => e.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        match e.kind() {
            ErrorKind::NotFound => ApiError::NotFound(e.to_string()),
            ErrorKind::InvalidInput | ErrorKind::AlreadyExists | ErrorKind::Unsupported => {
                ApiError::BadRequest(e.to_string())
            }
            ErrorKind::Conflict => ApiError::Stale {
                message: e.to_string(),
                head: None,
            },
            ErrorKind::Locked => ApiError::Unavailable(e.to_string()),
            _ => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                ApiError::Internal(msg)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, message) = self.parts();
        if status.is_server_error() {
            tracing::warn!(%status, %message, "request failed");
        } else {
            tracing::info!(%status, %message, "request refused");
        }
        let head = match &self {
            ApiError::Stale { head, .. } => *head,
            _ => None,
        };
        let body = Envelope {
            error: Inner {
                kind,
                message,
                head,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"lamina\""),
            );
        }
        resp
    }
}

/// Result of a handler.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// A request body: JSON (`T`) or raw bytes, read whole within the route's
/// limit. Rejections use the same envelope: 413 over the limit, 400 for
/// anything malformed.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let bytes = raw(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
    }
}

/// Reads a raw body within the route's limit.
pub async fn raw<S: Send + Sync>(
    req: axum::extract::Request,
    state: &S,
) -> Result<axum::body::Bytes, ApiError> {
    use axum::extract::FromRequest;
    axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(format!("request body too large: {}", r.body_text()))
            } else {
                ApiError::BadRequest(format!("unreadable request body: {}", r.body_text()))
            }
        })
}
