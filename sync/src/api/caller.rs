//! Authentication: the [`Authed`] extractor turns the bearer token of a
//! request into a [`Caller`], or answers 401 before any handler runs.
//! Authorisation is checked in each handler against the layer it touches
//! ([`ApiState::require`]).

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::error::ApiError;
use super::gate::blocking;
use super::ApiState;
use crate::auth::{Caller, Permission};
use crate::layer::Layer;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Authed(pub Caller);

impl<S> FromRequestParts<S> for Authed
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let state = ApiState::from_ref(state);
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthenticated("no token given (Authorization: Bearer …)".into())
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned())
            .ok_or_else(|| {
                ApiError::Unauthenticated("the Authorization header is not `Bearer <token>`".into())
            })?;
        let gate = state.gate.clone();
        let caller = blocking(move || {
            let store = gate.read()?;
            store.authenticate(&token).map_err(ApiError::from)
        })
        .await?
        .map_err(|e| {
            // The reason goes to the log only: the peer learns nothing about
            // which tokens exist.
            tracing::info!(reason = %e, "token refused");
            ApiError::Unauthenticated("invalid or expired token".into())
        })?;
        tracing::Span::current().record("user", caller.user.as_str());
        Ok(Authed(caller))
    }
}

impl ApiState {
    /// Checks that `caller` may `need` layer `name`; returns the layer
    /// (`None` if it does not exist yet and the caller could create it).
    ///
    /// # Errors
    /// 403 naming the layer, 404 for an absent layer the caller may not
    /// create either… (403 then too: existence is not disclosed).
    pub(crate) fn require(
        &self,
        caller: &Caller,
        name: &str,
        need: Permission,
    ) -> Result<Option<Layer>, ApiError> {
        crate::layer::check_layer_name(name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let store = self.gate.read()?;
        let have = store.permission(caller, name)?;
        if have.is_none_or(|h| h < need) {
            if let Some(end) = store.ended_subscription(caller, name)? {
                return Err(ApiError::Forbidden(format!(
                    "the subscription of user `{}` to layer `{name}` ended on {}",
                    caller.user,
                    crate::catalog::rfc3339(end)
                )));
            }
            return Err(ApiError::Forbidden(format!(
                "user `{}` may not {} layer `{name}`",
                caller.user,
                match need {
                    Permission::Read => "read",
                    Permission::Write => "write",
                }
            )));
        }
        match store.layer(name) {
            Ok(l) => Ok(Some(l)),
            Err(crate::Error::LayerNotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// As [`ApiState::require`], and the layer must exist.
    ///
    /// # Errors
    /// 403, 404.
    pub(crate) fn require_layer(
        &self,
        caller: &Caller,
        name: &str,
        need: Permission,
    ) -> Result<Layer, ApiError> {
        self.require(caller, name, need)?
            .ok_or_else(|| ApiError::NotFound(format!("no layer named `{name}`")))
    }
}
