//! Check-in: moving a layer's head, and conflicts waiting for an admin.

use axum::extract::{Path, State};
use axum::Json;

use super::caller::Authed;
use super::error::{ApiError, ApiResult, Body};
use super::gate::blocking;
use super::ApiState;
use crate::auth::{Caller, Permission};
use crate::error::Error;
use crate::layer::Layer;
use crate::merge::{ConflictRecord, ConflictState};
use crate::protocol::{ConflictSubmission, NewLayer, PushBody, PushResponse};
use crate::store::Store;
use crate::transfer::Accept;

/// The layer a push names: existing, or created with it.
fn target(
    store: &Store,
    name: &str,
    existing: Option<Layer>,
    create: Option<NewLayer>,
) -> Result<(Layer, bool), ApiError> {
    // Read again through the writer: the reader may lag a moment.
    let existing = match existing {
        Some(_) => Some(store.layer(name)?),
        None => match store.layer(name) {
            Ok(l) => Some(l),
            Err(Error::LayerNotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        },
    };
    match (existing, create) {
        (Some(l), Some(n)) if l.id != n.id => Err(ApiError::Conflict(format!(
            "layer `{name}` on this server is another layer (id {}, yours is {}): it was not checked out from here",
            l.id, n.id
        ))),
        (Some(l), _) => Ok((l, false)),
        (None, Some(n)) => Ok((
            Layer {
                id: n.id,
                name: name.to_owned(),
                kind: n.kind,
                format: n.format,
                created_ns: crate::now_ns(),
            },
            true,
        )),
        (None, None) => Err(ApiError::NotFound(format!("no layer named `{name}`"))),
    }
}

/// Stamps and checks the conflict records a client sends.
fn own_conflicts(
    caller: &Caller,
    layer: &str,
    records: &[ConflictRecord],
    state: ConflictState,
) -> Result<Vec<ConflictRecord>, ApiError> {
    records
        .iter()
        .map(|r| {
            let ok_id =
                !r.id.is_empty() && r.id.len() <= 32 && r.id.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok_id || r.layer != layer || r.state != state {
                return Err(ApiError::BadRequest(format!(
                    "conflict record `{}` is not a {} conflict of layer `{layer}`",
                    r.id,
                    state.as_str()
                )));
            }
            let mut r = r.clone();
            r.user = caller.user.clone();
            Ok(r)
        })
        .collect()
}

fn stale(store: &Store, layer: &Layer, e: Error) -> ApiError {
    match e {
        Error::RefConflict { .. } => ApiError::Stale {
            message: format!("{e}: pull and merge, then push again"),
            head: store.head(layer).ok().flatten(),
        },
        other => ApiError::from_input(other),
    }
}

pub(super) async fn push(
    State(st): State<ApiState>,
    Authed(c): Authed,
    Path(name): Path<String>,
    Body(body): Body<PushBody>,
) -> ApiResult<Json<PushResponse>> {
    blocking(move || {
        let existing = st.require(&c, &name, Permission::Write)?;
        let conflicts = own_conflicts(&c, &name, &body.conflicts, ConflictState::Settled)?;
        let store = st.gate.write()?;
        let (layer, create) = target(&store, &name, existing, body.create)?;
        let action = if body.push.action.is_empty() {
            format!("push by {}", c.user)
        } else {
            format!("{} by {}", body.push.action, c.user)
        };
        store
            .accept(&Accept {
                layer: &layer,
                create,
                versions: &body.push.versions,
                head: Some((body.push.expected, body.push.new)),
                refs: &body.push.refs,
                conflicts: &conflicts,
                action: &action,
            })
            .map_err(|e| stale(&store, &layer, e))?;
        tracing::info!(layer = %name, head = %body.push.new.short(), versions = body.push.versions.len(), "head moved");
        Ok(Json(PushResponse {
            head: body.push.new,
        }))
    })
    .await
}

pub(super) async fn submit_conflict(
    State(st): State<ApiState>,
    Authed(c): Authed,
    Path(name): Path<String>,
    Body(body): Body<ConflictSubmission>,
) -> ApiResult<Json<ConflictRecord>> {
    blocking(move || {
        let existing = st.require_layer(&c, &name, Permission::Write)?;
        let mut records = own_conflicts(
            &c,
            &name,
            std::slice::from_ref(&body.record),
            ConflictState::Pending,
        )?;
        let store = st.gate.write()?;
        let (layer, _) = target(&store, &name, Some(existing), None)?;
        // One pending conflict per host and layer: a newer submission
        // replaces the older one.
        let mut record = records.remove(0);
        if let Some(old) = store
            .conflicts()?
            .into_iter()
            .find(|o| o.state == ConflictState::Pending && o.layer == name && o.host == record.host)
        {
            record.id = old.id;
        }
        let keep = vec![(record.kept_ref(), record.client)];
        store
            .accept(&Accept {
                layer: &layer,
                create: false,
                versions: &body.versions,
                head: None,
                refs: &keep,
                conflicts: std::slice::from_ref(&record),
                action: &format!("conflict from {} ({})", c.user, record.host),
            })
            .map_err(ApiError::from_input)?;
        tracing::info!(layer = %name, id = %record.id, "conflict waits for an admin");
        Ok(Json(record))
    })
    .await
}

fn visible(c: &Caller, r: &ConflictRecord) -> bool {
    c.admin || r.user == c.user
}

pub(super) async fn list_conflicts(
    State(st): State<ApiState>,
    Authed(c): Authed,
) -> ApiResult<Json<Vec<ConflictRecord>>> {
    blocking(move || {
        let store = st.gate.read()?;
        Ok(Json(
            store
                .conflicts()?
                .into_iter()
                .filter(|r| visible(&c, r))
                .collect(),
        ))
    })
    .await
}

pub(super) async fn show_conflict(
    State(st): State<ApiState>,
    Authed(c): Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<ConflictRecord>> {
    blocking(move || {
        let store = st.gate.read()?;
        match store.conflict(&id) {
            Ok(r) if visible(&c, &r) => Ok(Json(r)),
            _ => Err(ApiError::NotFound(format!("no conflict with id `{id}`"))),
        }
    })
    .await
}
