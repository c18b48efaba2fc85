//! `POST /api/privacy/export`: the one-call export of the product story.
//! All of the caller's configured data types (or the ones named) go out as
//! one attachment, streamed from the database as it is written; the server
//! keeps no copy. The request is an export like any other: rate-limited as
//! a create, counted against the daily record quota, listed, and audited
//! from `export.created` to `export.completed` with the file's checksum.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures_util::StreamExt as _;
use handover::format::ExportFormat;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::UnreadBody;
use crate::auth::{self, PERM_EXPORT};
use crate::context::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::jobs::{self, ChunkSink};
use crate::plan;
use crate::store::exports::{Completion, Delivery, ExportRow};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/privacy/export", post(export))
}

const FIELDS: [&str; 2] = ["format", "data_types"];

/// The body of this endpoint as a create request: `format` (default json)
/// and `data_types` (default: every configured type).
fn create_body(
    state: &AppState,
    body: Option<Map<String, Value>>,
) -> ApiResult<plan::CreateRequest> {
    let body = body.unwrap_or_default();
    if let Some(k) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::validation(
            "UNKNOWN_FIELD",
            k.clone(),
            format!("unknown field {k:?}: use format and data_types"),
        ));
    }
    let mut create = Map::new();
    create.insert(
        "export_format".into(),
        body.get("format").cloned().unwrap_or_else(|| json!("json")),
    );
    let all: Vec<Value> = state.registry.all().map(|t| json!(t.name)).collect();
    create.insert(
        "data_types".into(),
        match body.get("data_types") {
            None | Some(Value::Null) => Value::Array(all),
            Some(v) => v.clone(),
        },
    );
    plan::validate_create(&state.registry, &create).map_err(|e| match e {
        ApiError::Validation {
            code,
            field,
            message,
        } if field == "export_format" => {
            ApiError::validation(code, "format", message.replace("export_format", "format"))
        }
        e => e,
    })
}

/// The response body's end of the build: each chunk goes to the client as
/// it is written, with the running size and SHA-256 of what was sent.
struct Stream {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    sha: handover::Sha256Stream,
    size: u64,
}

impl ChunkSink for Stream {
    async fn write_chunk(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.sha.update(chunk);
        self.size += chunk.len() as u64;
        self.tx
            .send(Ok(Bytes::copy_from_slice(chunk)))
            .await
            .map_err(|_| anyhow::anyhow!("the client went away"))
    }
}

#[utoipa::path(post, path = "/api/privacy/export", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies")), request_body(content = Option<crate::openapi::PrivacyExport>, description = "Optional: narrows the export (default: every data type, as JSON)"), responses((status = 200, description = "The whole export as an attachment, streamed (X-Export-Id names its audited export request)", content(("application/json"), ("text/csv"), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"))), (status = 400, description = "Malformed JSON (INVALID_REQUEST) or no X-Company-ID", body = crate::openapi::ErrorEnvelope), (status = 415, description = "A body that is not JSON (UNSUPPORTED_MEDIA_TYPE)", body = crate::openapi::ErrorEnvelope), (status = 422, description = "VALIDATION_ERROR: UNKNOWN_FIELD, INVALID_FORMAT, INVALID_DATA_TYPE, FILE_TOO_LARGE", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "RATE_LIMIT_EXCEEDED (the create limit) or QUOTA_EXCEEDED", body = crate::openapi::ErrorEnvelope), (status = 500, description = "CREATION_FAILED", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn export(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: UnreadBody,
) -> ApiResult<Response> {
    ctx.set_action("privacy.export", None);
    let scope = auth::scope(&state, &ctx, &headers, PERM_EXPORT).await?;
    let body = body.optional_object().await?;
    let req = create_body(&state, body)?;
    let format = req.format;
    let req = plan::CreateRequest {
        delivery: Delivery::Direct,
        metadata: json!({ "endpoint": "/api/privacy/export" }),
        ..req
    };
    // Without a key there is nothing to replay.
    let Ok(row) = super::exports::admit_create(&state, &ctx, &scope, req, None).await? else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "a replay without a key"
        )));
    };
    ctx.set_action("privacy.export", Some(&row.id));
    state
        .store
        .mark_started(&row, Some(ctx.request_id()))
        .await?;

    let (tx, rx) = mpsc::channel(8);
    let request_id = ctx.request_id().to_string();
    let build = stream_export(state.clone(), row.clone(), format, tx, request_id);
    // The build outlives this handler: its events keep the request's origin.
    match crate::store::audit::REQUEST_ORIGIN.try_with(Clone::clone) {
        Ok(origin) => tokio::spawn(crate::store::audit::REQUEST_ORIGIN.scope(origin, build)),
        Err(_) => tokio::spawn(build),
    };

    // As its download would be named: `export_…` is already the id.
    let filename = format!("{}.{}", row.id, format.extension());
    // Fused: the body may be polled again after it ended.
    let body = futures_util::stream::unfold(rx, |mut rx: mpsc::Receiver<_>| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .fuse();
    let mut response = (StatusCode::OK, Body::from_stream(body)).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&row.id) {
        h.insert("x-export-id", v);
    }
    Ok(response)
}

/// Builds the file into the response and records the outcome: completed
/// with the checksum of exactly what was sent, or failed (and the response
/// is cut off with an error, so the client never takes a short file for a
/// whole one).
async fn stream_export(
    state: AppState,
    row: ExportRow,
    format: ExportFormat,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    request_id: String,
) {
    let mut sink = Stream {
        tx,
        sha: handover::Sha256Stream::default(),
        size: 0,
    };
    let built = jobs::build(
        &state,
        &row,
        format,
        &state.files.tempdir(),
        &mut sink,
        None::<&mut Stream>,
    )
    .await;
    let outcome = match built {
        Ok(b) => {
            let done = Completion {
                records: b.records,
                byte_size: sink.size,
                sha256: sink.sha.finish_hex(),
                details: Default::default(),
                failed_types: Vec::new(),
            };
            match state
                .store
                .complete_export(&row, &done, &[], Some(&request_id))
                .await
            {
                Ok(true) => {
                    crate::exports::count_completed(&state, &row, &done);
                    Ok(())
                }
                Ok(false) => Err(anyhow::anyhow!("the export was deleted while it was sent")),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        tracing::warn!(export = %row.id, error = %format!("{e:#}"), "direct export did not complete");
        let reason = if sink.tx.is_closed() {
            "the client disconnected"
        } else {
            "generation failed"
        };
        if matches!(
            state
                .store
                .fail_export(&row, reason, Some(&request_id))
                .await,
            Ok(true)
        ) {
            state.metrics.export_failed();
        }
        // Cut the response off: the client sees an error, not a short file.
        let _ = sink
            .tx
            .send(Err(std::io::Error::other(
                "the export failed while it was sent",
            )))
            .await;
    }
}
