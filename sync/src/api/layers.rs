//! Who am I, which layers may I see, and the versions of one.

use std::collections::HashSet;

use axum::extract::{Path, State};
use axum::Json;

use super::caller::Authed;
use super::error::{ApiError, ApiResult, Body};
use super::gate::blocking;
use super::ApiState;
use crate::auth::Permission;
use crate::layer::Layer;
use crate::protocol::{LayerInfo, VersionsRequest, VersionsResponse, WhoAmI};
use crate::store::Store;
use crate::transfer::PushedVersion;

/// Most versions answered at once (a deeper history is fetched in turns).
const MAX_VERSIONS: usize = 50_000;

pub(super) fn info(
    store: &Store,
    caller: &crate::Caller,
    layer: &Layer,
    permission: Permission,
) -> crate::Result<LayerInfo> {
    let sub = store.subscription(caller, &layer.name)?;
    Ok(LayerInfo {
        until_ns: sub.map(|(u, _)| u),
        grace_secs: sub.map_or(0, |(_, g)| g),
        name: layer.name.clone(),
        id: layer.id,
        kind: layer.kind,
        format: layer.format,
        head: store.head(layer)?,
        policy: store.conflict_policy(layer)?,
        net: store.net_policy(&layer.name)?,
        permission,
    })
}

pub(super) async fn whoami(Authed(c): Authed) -> Json<WhoAmI> {
    Json(WhoAmI {
        user: c.user,
        admin: c.admin,
        groups: c.groups,
    })
}

pub(super) async fn list(
    State(st): State<ApiState>,
    Authed(c): Authed,
) -> ApiResult<Json<Vec<LayerInfo>>> {
    blocking(move || {
        let store = st.gate.read()?;
        let mut out = Vec::new();
        for l in store.layers()? {
            if let Some(p) = store.permission(&c, &l.name)? {
                out.push(info(&store, &c, &l, p)?);
            }
        }
        Ok(Json(out))
    })
    .await
}

pub(super) async fn show(
    State(st): State<ApiState>,
    Authed(c): Authed,
    Path(name): Path<String>,
) -> ApiResult<Json<LayerInfo>> {
    blocking(move || {
        let layer = st.require_layer(&c, &name, Permission::Read)?;
        let store = st.gate.read()?;
        let p = store.permission(&c, &name)?.unwrap_or(Permission::Read);
        Ok(Json(info(&store, &c, &layer, p)?))
    })
    .await
}

pub(super) async fn versions(
    State(st): State<ApiState>,
    Authed(c): Authed,
    Path(name): Path<String>,
    Body(req): Body<VersionsRequest>,
) -> ApiResult<Json<VersionsResponse>> {
    blocking(move || {
        let layer = st.require_layer(&c, &name, Permission::Read)?;
        let store = st.gate.read()?;
        for w in &req.want {
            let v = store.version(*w).map_err(|_| {
                ApiError::NotFound(format!("layer `{name}` has no version {}", w.short()))
            })?;
            if v.layer != layer.id {
                return Err(ApiError::NotFound(format!(
                    "layer `{name}` has no version {}",
                    w.short()
                )));
            }
        }
        let have: HashSet<_> = req.have.into_iter().collect();
        let found = store.versions_between(&req.want, &have)?;
        if found.len() > MAX_VERSIONS {
            return Err(ApiError::BadRequest(format!(
                "{} versions to send exceed the limit of {MAX_VERSIONS}; name versions you have",
                found.len()
            )));
        }
        let signatures = if crate::sign::signed_kind(layer.kind) {
            let ids: Vec<_> = found.iter().map(|(id, _)| *id).collect();
            store.sign_versions(&ids)?
        } else {
            Vec::new()
        };
        Ok(Json(VersionsResponse {
            versions: found.iter().map(|(_, v)| PushedVersion::of(v)).collect(),
            signatures,
        }))
    })
    .await
}

/// `GET /api/v1/keys`: the server's signing keys (public parts).
pub(super) async fn keys(
    State(st): State<ApiState>,
    Authed(_c): Authed,
) -> ApiResult<Json<Vec<crate::sign::PublicKey>>> {
    blocking(move || {
        let store = st.gate.read()?;
        Ok(Json(store.signing_keys()?))
    })
    .await
}
