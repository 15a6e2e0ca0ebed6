//! Chunks in bulk: which ones the server lacks, sending records, receiving
//! records.
//!
//! Access is checked per layer before a body is read. Chunks are named by
//! their content, so a caller that may read a layer and knows a chunk id may
//! fetch that chunk: ids are capabilities, as in every content-addressed
//! store that deduplicates across users.

use std::collections::HashSet;

use axum::body::Body as HttpBody;
use axum::extract::{Path, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::caller::Authed;
use super::error::{raw, ApiError, ApiResult};
use super::gate::blocking;
use super::ApiState;
use crate::auth::Permission;
use crate::transfer::wire::{self, IDS_TYPE, RECORDS_TYPE};
use crate::transfer::TransferStats;

/// Checks that the caller may `need` layer `name` (which must exist to be
/// read), then reads the body: nothing is read for a caller who may not.
async fn checked_body(
    st: &ApiState,
    c: crate::auth::Caller,
    name: &str,
    need: Permission,
    req: Request,
) -> ApiResult<axum::body::Bytes> {
    let check = st.clone();
    let n = name.to_owned();
    blocking(move || match need {
        Permission::Read => check.require_layer(&c, &n, need).map(drop),
        Permission::Write => check.require(&c, &n, need).map(drop),
    })
    .await?;
    raw(req, &()).await
}

/// Bytes of records the producer hands the socket at a time.
const SEND_BATCH: usize = 1024 * 1024;

pub(super) async fn missing(
    State(st): State<ApiState>,
    Authed(c): Authed,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let body = checked_body(&st, c, &name, Permission::Write, req).await?;
    blocking(move || {
        let ids = wire::decode_ids(&body).map_err(ApiError::from_input)?;
        let store = st.gate.read()?;
        let mut lacks = Vec::with_capacity(ids.len());
        for batch in ids.chunks(4096) {
            lacks.extend(store.backend().has_many(batch)?.into_iter().map(|h| !h));
        }
        Ok(([(CONTENT_TYPE, IDS_TYPE)], wire::encode_bits(&lacks)).into_response())
    })
    .await
}

pub(super) async fn fetch(
    State(st): State<ApiState>,
    Authed(c): Authed,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let body = checked_body(&st, c, &name, Permission::Read, req).await?;
    let (ids, store) = blocking(move || {
        let ids = wire::decode_ids(&body).map_err(ApiError::from_input)?;
        let store = st.gate.read()?;
        for batch in ids.chunks(4096) {
            let have = store.backend().has_many(batch)?;
            if let Some((id, _)) = batch.iter().zip(have).find(|(_, h)| !h) {
                return Err(ApiError::NotFound(format!(
                    "chunk {id} is not on this server"
                )));
            }
        }
        Ok((ids, store))
    })
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _s = span.enter();
        let mut sent: HashSet<crate::id::ChunkId> = HashSet::new();
        let mut buf = Vec::with_capacity(SEND_BATCH + 256 * 1024);
        for id in ids {
            if sent.contains(&id) {
                continue;
            }
            match store.backend().get_sealed(&id) {
                Ok(sealed) => {
                    sent.extend(wire::members(&sealed));
                    wire::encode_record(&sealed, &mut buf);
                }
                Err(e) => {
                    tracing::warn!(chunk = %id, error = %e, "cannot send a chunk; cutting the stream");
                    // The client sees the stream cut; it may already be gone.
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            }
            if buf.len() >= SEND_BATCH {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(SEND_BATCH + 256 * 1024));
                if tx.blocking_send(Ok(full)).is_err() {
                    // The client went away.
                    return;
                }
            }
        }
        if !buf.is_empty() {
            // Nothing to do if the client has gone.
            let _ = tx.blocking_send(Ok(buf));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [(CONTENT_TYPE, RECORDS_TYPE)],
        HttpBody::from_stream(stream),
    )
        .into_response())
}

pub(super) async fn upload(
    State(st): State<ApiState>,
    Authed(c): Authed,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<Json<TransferStats>> {
    // Only so many bodies in memory at once.
    let _permit = st
        .uploads
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
    let body = checked_body(&st, c, &name, Permission::Write, req).await?;
    blocking(move || {
        let records = wire::decode_records(&body).map_err(ApiError::from_input)?;
        st.gate.pin_uploads()?;
        let store = st.gate.write()?;
        let stats = store.receive(&records).map_err(ApiError::from_input)?;
        tracing::debug!(
            records = stats.records,
            new = stats.chunks_new,
            "stored an upload"
        );
        Ok(Json(stats))
    })
    .await
}
