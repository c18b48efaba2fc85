//! End-to-end encrypted copies of browser-built exports. The browser
//! encrypts the finished file under a key only the user holds (it travels
//! in a link's URL fragment, never to the server) and uploads the
//! ciphertext here in parts; `GET …/download` then returns it.
//!
//! The upload is resumable: each part names the offset it starts at
//! (`Upload-Offset`), a part that is already stored is refused with
//! `UPLOAD_OFFSET_MISMATCH`, and `GET …/copy` says how many bytes arrived.
//! The copy's size is known in advance (the reported file size, sealed in
//! 64 KiB chunks), so it is bounded by the size limit before a byte is kept.

use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use handover::crypto::ciphertext_len;
use serde_json::{json, Value};

use super::exports::{owned_action, sha256_field};
use super::UnreadBody;
use crate::context::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::ratelimit;
use crate::store::copies::{part_kind, PartOutcome};
use crate::store::exports::{CopyStage, Delivery, ExportRow, Status};
use crate::AppState;

/// Largest part of an upload.
pub const MAX_PART_BYTES: u64 = 16 << 20;
/// How long a part may take to arrive.
const PART_TIMEOUT: Duration = Duration::from_secs(120);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/data/export/{id}/copy", get(status).patch(upload))
        .route("/api/data/export/{id}/copy/complete", post(complete))
}

impl ExportRow {
    /// The exact size of this export's encrypted copy.
    fn copy_size(&self) -> u64 {
        ciphertext_len(self.byte_size.unwrap_or(0).max(0) as u64)
    }

    /// What `GET …/copy` answers (and the export views embed).
    pub fn copy_view(&self) -> Value {
        json!({
            "state": self.copy.stage,
            "received": self.copy.received,
            "parts": self.copy.parts,
            "byte_size": self.copy_size(),
            "sha256": self.copy.sha256,
        })
    }
}

/// The checks every copy request makes of the export.
fn copyable(row: &ExportRow) -> ApiResult<()> {
    if row.delivery != Delivery::Client {
        return Err(ApiError::Conflict(
            "COPY_NOT_ALLOWED",
            "only exports built in the browser keep an encrypted copy; the server keeps this one's file".into(),
        ));
    }
    if row.status != Status::Completed {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_READY",
            format!(
                "the export is {}: report it complete before uploading its copy",
                row.status
            ),
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/data/export/{id}/copy", tag = "client delivery", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id")), responses((status = 200, description = "The copy's state (none, uploading, kept), bytes received and its exact size", body = crate::openapi::Envelope), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn status(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let (_, row) = owned_action(
        &state,
        &ctx,
        &headers,
        id,
        "export.copy.status",
        ratelimit::READ,
    )
    .await?;
    Ok(ctx.ok(row.copy_view()))
}

fn upload_offset(headers: &HeaderMap) -> ApiResult<u64> {
    headers
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "the Upload-Offset header (a non-negative integer: where this part starts) is required".into(),
            )
        })
}

#[utoipa::path(patch, path = "/api/data/export/{id}/copy", tag = "client delivery", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id"), ("Upload-Offset" = u64, Header, description = "Where this part starts: the bytes received so far")), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The next part of the ciphertext (at most 16 MiB)"), responses((status = 200, description = "Stored; `received` says how many bytes the copy has (also in Upload-Offset)", body = crate::openapi::Envelope), (status = 400, description = "INVALID_REQUEST: no Upload-Offset, or an empty part", body = crate::openapi::ErrorEnvelope), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 408, description = "REQUEST_TIMEOUT", body = crate::openapi::ErrorEnvelope), (status = 409, description = "UPLOAD_OFFSET_MISMATCH (ask GET …/copy where to go on), COPY_ALREADY_KEPT, COPY_NOT_ALLOWED (a server export), EXPORT_NOT_READY", body = crate::openapi::ErrorEnvelope), (status = 413, description = "PAYLOAD_TOO_LARGE: a part over 16 MiB", body = crate::openapi::ErrorEnvelope), (status = 415, description = "UNSUPPORTED_MEDIA_TYPE: not application/octet-stream", body = crate::openapi::ErrorEnvelope), (status = 422, description = "VALIDATION_ERROR: FILE_TOO_LARGE (over the size limit, or past the copy's exact size)", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn upload(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: UnreadBody,
) -> ApiResult<Response> {
    let (scope, row) = owned_action(
        &state,
        &ctx,
        &headers,
        id,
        "export.copy.upload",
        ratelimit::UPLOAD,
    )
    .await?;
    copyable(&row)?;
    let offset = upload_offset(&headers)?;
    if row.copy.stage == CopyStage::Kept {
        return Err(ApiError::Conflict(
            "COPY_ALREADY_KEPT",
            "the encrypted copy is complete; delete the export to drop it".into(),
        ));
    }
    let size = row.copy_size();
    if size > ciphertext_len(state.settings.max_export_bytes) {
        return Err(ApiError::validation(
            "FILE_TOO_LARGE",
            "byte_size",
            format!(
                "a copy of {size} bytes is over the size limit of {} bytes",
                state.settings.max_export_bytes
            ),
        ));
    }
    if offset != row.copy.received {
        return Err(offset_mismatch(row.copy.received));
    }
    let room = (size - offset).min(MAX_PART_BYTES);
    let body = body.octets()?;
    state.store.start_copy(&row).await?;
    let mut writer = state
        .files
        .create(&row.id, &part_kind(row.copy.parts))
        .await?;
    let name = writer.name().to_string();
    let limits = PartLimits { room, offset, size };
    let stored =
        match tokio::time::timeout(PART_TIMEOUT, read_part(body, &mut writer, limits)).await {
            Ok(Ok(())) => store_part(&state, &row, offset, writer).await,
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::RequestTimeout),
        };
    let received = match stored {
        Ok(PartOutcome::Stored { received }) => received,
        Ok(PartOutcome::Conflict) => {
            state.files.discard(&row.id, &[name]).await?;
            let now = state.store.find_export(&scope, &row.id).await?;
            return Err(offset_mismatch(now.map_or(0, |r| r.copy.received)));
        }
        Err(e) => {
            state.files.discard(&row.id, &[name]).await?;
            // A first part that was refused leaves no upload behind.
            if row.copy.parts == 0 {
                let fresh = state.store.find_export(&scope, &row.id).await?;
                if let Some(fresh) = fresh.filter(|r| r.copy.parts == 0) {
                    state.store.drop_copy(&fresh).await?;
                }
            }
            return Err(e);
        }
    };
    // Tests: the part is stored but its answer is lost (a 500, a 429 or a
    // dropped connection; always for the first part), so the browser must
    // find out where to go on.
    if let Some(fault) = &state.settings.fault {
        if offset == 0 {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "injected fault: answer lost"
            )));
        }
        if let Some(lost) = fault.roll_page() {
            return Ok(lost);
        }
    }
    let mut response = ctx
        .ok(json!({ "state": CopyStage::Uploading, "received": received, "byte_size": size }))
        .into_response();
    response
        .headers_mut()
        .insert("upload-offset", HeaderValue::from(received));
    Ok(response)
}

/// How much a part may hold.
#[derive(Debug, Clone, Copy)]
struct PartLimits {
    /// Bytes this part may have: up to the copy's end, at most a part.
    room: u64,
    offset: u64,
    /// The whole copy.
    size: u64,
}

/// Streams the request body into the part's file, within `limits`.
async fn read_part(
    body: axum::body::Body,
    writer: &mut crate::files::FileWriter,
    limits: PartLimits,
) -> ApiResult<()> {
    let mut stream = body.into_data_stream();
    let mut got = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece
            .map_err(|_| ApiError::InvalidRequest("the request body could not be read".into()))?;
        got += piece.len() as u64;
        if got > limits.room {
            return Err(if limits.offset + got <= limits.size {
                ApiError::PayloadTooLarge(MAX_PART_BYTES as usize)
            } else {
                ApiError::validation(
                    "FILE_TOO_LARGE",
                    "body",
                    format!(
                        "the copy is {} bytes; this part would run past its end",
                        limits.size
                    ),
                )
            });
        }
        writer.write(&piece).await?;
    }
    if got == 0 {
        return Err(ApiError::InvalidRequest("the part is empty".into()));
    }
    Ok(())
}

async fn store_part(
    state: &AppState,
    row: &ExportRow,
    offset: u64,
    writer: crate::files::FileWriter,
) -> ApiResult<PartOutcome> {
    let part = writer.finish().await?;
    Ok(state.store.add_copy_part(row, offset, &part).await?)
}

fn offset_mismatch(received: u64) -> ApiError {
    ApiError::Conflict(
        "UPLOAD_OFFSET_MISMATCH",
        format!("the copy has {received} bytes: send the part that starts there"),
    )
}

#[utoipa::path(post, path = "/api/data/export/{id}/copy/complete", tag = "client delivery", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id")), request_body = crate::openapi::CompleteCopy, responses((status = 200, description = "Kept: downloads now return the ciphertext", body = crate::openapi::Envelope), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 409, description = "COPY_ALREADY_KEPT (with another checksum), COPY_NOT_ALLOWED, EXPORT_NOT_READY", body = crate::openapi::ErrorEnvelope), (status = 422, description = "INVALID_CHECKSUM, COPY_INCOMPLETE, CHECKSUM_MISMATCH (the parts are dropped: upload again)", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn complete(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: UnreadBody,
) -> ApiResult<Json<Value>> {
    let (scope, row) = owned_action(
        &state,
        &ctx,
        &headers,
        id,
        "export.copy.complete",
        ratelimit::REPORT,
    )
    .await?;
    let body = body.object().await?;
    copyable(&row)?;
    let sha = sha256_field(&body, "the ciphertext")?;
    let size = row.copy_size();
    match row.copy.stage {
        CopyStage::Kept if row.copy.sha256.as_deref() == Some(sha.as_str()) => {
            return Ok(ctx.ok(row.copy_view()));
        }
        CopyStage::Kept => {
            return Err(ApiError::Conflict(
                "COPY_ALREADY_KEPT",
                "the encrypted copy is already kept, with another checksum".into(),
            ))
        }
        _ if row.copy.received != size => {
            return Err(ApiError::validation(
                "COPY_INCOMPLETE",
                "sha256",
                format!("{} of the copy's {size} bytes arrived", row.copy.received),
            ))
        }
        _ => {}
    }
    let mut stream = state.files.open_copy(&state, &row);
    let mut hasher = handover::Sha256Stream::default();
    let mut unreadable = false;
    while let Some(piece) = stream.next().await {
        match piece {
            Ok(p) => hasher.update(&p),
            Err(e) => {
                tracing::error!(export = %row.id, error = %e, "a part of the encrypted copy cannot be read back");
                unreadable = true;
                break;
            }
        }
    }
    if unreadable || hasher.finish_hex() != sha {
        if let Some(files) = state.store.drop_copy(&row).await? {
            state.files.remove(&files).await;
            return Err(ApiError::validation(
                "CHECKSUM_MISMATCH",
                "sha256",
                "the uploaded bytes do not have this checksum; they were dropped: upload the copy again",
            ));
        }
    } else {
        state
            .store
            .keep_copy(&row, size, &sha, Some(ctx.request_id()))
            .await?;
    }
    // Whatever this request did, say how the copy stands now: a retry of
    // a `complete` that overlapped the first one finds it kept.
    let row = state
        .store
        .find_export(&scope, &row.id)
        .await?
        .ok_or(ApiError::ExportNotFound)?;
    match row.copy.stage {
        CopyStage::Kept if row.copy.sha256.as_deref() == Some(sha.as_str()) => {
            Ok(ctx.ok(row.copy_view()))
        }
        CopyStage::Kept => Err(ApiError::Conflict(
            "COPY_ALREADY_KEPT",
            "the encrypted copy is already kept, with another checksum".into(),
        )),
        _ => Err(ApiError::Conflict(
            "UPLOAD_OFFSET_MISMATCH",
            format!(
                "the copy changed while it was checked: it has {} bytes",
                row.copy.received
            ),
        )),
    }
}

/// The download of a kept copy: the ciphertext as the browser uploaded it.
pub(super) async fn download(state: &AppState, ctx: &Ctx, row: &ExportRow) -> ApiResult<Response> {
    if row.copy.stage != CopyStage::Kept {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_READY",
            match row.copy.stage {
                CopyStage::Uploading => "the export's encrypted copy is still being uploaded",
                _ => "the export was built in the browser and no encrypted copy was kept (exportData keepCopy)",
            }
            .into(),
        ));
    }
    let size = row.copy.received;
    state
        .store
        .export_event(
            row,
            "export.downloaded",
            Some(ctx.request_id()),
            json!({ "encrypted_copy": true, "byte_size": size, "sha256": row.copy.sha256 }),
        )
        .await?;
    let ext = row
        .export_format
        .parse::<handover::format::ExportFormat>()
        .map_or("bin", |f| f.extension());
    let mut response = Response::new(axum::body::Body::from_stream(
        state.files.open_copy(state, row),
    ));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}.{ext}.hov\"", row.id))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(Ok(v)) = row.copy.sha256.as_deref().map(HeaderValue::from_str) {
        h.insert("x-content-sha256", v);
    }
    h.insert(
        "x-handover-encryption",
        HeaderValue::from_static("aes-256-gcm-chunked; key=user"),
    );
    Ok(response)
}
