//! The five endpoints of the Data Export API reference, plus the browser's
//! `complete` / `fail` reports.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use handover::format::ExportFormat;
use serde_json::{json, Map, Value};

use super::{QueryMap, UnreadBody};
use crate::auth::{self, Scope, PERM_EXPORT};
use crate::context::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::plan;
use crate::ratelimit::{self, Limit};
use crate::store::exports::{
    Completion, Created, Delivery, ExportRow, IdempotencyKey, IdempotentExport, NewExport, Status,
};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/data/export", post(create).get(list))
        .route("/api/data/export/{id}", get(details).delete(delete))
        .route("/api/data/export/{id}/download", get(download))
        .route("/api/data/export/{id}/retry", post(retry))
        .route("/api/data/export/{id}/complete", post(complete))
        .route("/api/data/export/{id}/fail", post(fail))
}

/// The prologue of the browser's reports (`complete`, `fail`): the caller,
/// their export named in the path, and the JSON body.
async fn report(
    state: &AppState,
    ctx: &Ctx,
    headers: &HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: UnreadBody,
    action: &'static str,
) -> ApiResult<(Scope, ExportRow, Map<String, Value>)> {
    let (scope, row) = owned_action(state, ctx, headers, id, action, ratelimit::REPORT).await?;
    let body = body.object().await?;
    Ok((scope, row, body))
}

/// The prologue of a handler acting on one of the caller's exports:
/// `action` in the audit row (with the export once it is found), the
/// caller admitted under `limit`, and their export named in the path.
pub(super) async fn owned_action(
    state: &AppState,
    ctx: &Ctx,
    headers: &HeaderMap,
    id: Result<Path<String>, PathRejection>,
    action: &'static str,
    limit: Limit,
) -> ApiResult<(Scope, ExportRow)> {
    ctx.set_action(action, None);
    let scope = enter(state, ctx, headers, limit).await?;
    let row = owned(state, &scope, id).await?;
    ctx.set_action(action, Some(&row.id));
    Ok((scope, row))
}

/// The `sha256` field of a report: 64 hex digits, lower-cased.
///
/// # Errors
///
/// 422 `INVALID_CHECKSUM` naming `what` was hashed.
pub(super) fn sha256_field(body: &Map<String, Value>, what: &str) -> ApiResult<String> {
    body.get("sha256")
        .and_then(Value::as_str)
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| {
            ApiError::validation(
                "INVALID_CHECKSUM",
                "sha256",
                format!("sha256 (of {what}) must be 64 hexadecimal digits"),
            )
        })
}

/// Authenticates for `data:export` and admits under `limit`.
pub(super) async fn enter(
    state: &AppState,
    ctx: &Ctx,
    headers: &HeaderMap,
    limit: Limit,
) -> ApiResult<Scope> {
    super::enter(state, ctx, headers, PERM_EXPORT, limit).await
}

/// The caller's export `id`, or 404 (also for other users' and companies' ids).
pub(super) async fn owned(
    state: &AppState,
    scope: &Scope,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<ExportRow> {
    let Ok(Path(id)) = id else {
        return Err(ApiError::ExportNotFound);
    };
    state
        .store
        .find_export(scope, &id)
        .await?
        .ok_or(ApiError::ExportNotFound)
}

#[utoipa::path(post, path = "/api/data/export", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("Idempotency-Key" = Option<String>, Header, description = "Optional, 1–255 visible ASCII characters: the same key with the same body within 24 hours gives back the same export (201, Idempotent-Replayed: true) without taking a create slot")), request_body = crate::openapi::CreateExport, responses((status = 201, description = "Created; with `manifest` for client delivery", body = crate::openapi::Envelope), (status = 400, description = "Malformed JSON or Idempotency-Key (INVALID_REQUEST), or no X-Company-ID", body = crate::openapi::ErrorEnvelope), (status = 409, description = "IDEMPOTENCY_KEY_REUSED: the export created with this key was deleted", body = crate::openapi::ErrorEnvelope), (status = 415, description = "UNSUPPORTED_MEDIA_TYPE", body = crate::openapi::ErrorEnvelope), (status = 422, description = "VALIDATION_ERROR: INVALID_FORMAT, INVALID_DATA_TYPE, DATE_RANGE_INVALID, INVALID_METADATA, FILE_TOO_LARGE, IDEMPOTENCY_KEY_REUSED (same key, different body)", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "RATE_LIMIT_EXCEEDED or QUOTA_EXCEEDED (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope), (status = 500, description = "CREATION_FAILED", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: UnreadBody,
) -> ApiResult<Response> {
    ctx.set_action("export.create", None);
    let scope = auth::scope(&state, &ctx, &headers, PERM_EXPORT).await?;
    let key = idempotency_key(&headers)?;
    let body = body.object().await?;
    let req = plan::validate_create(&state.registry, &body)?;
    let key = key.map(|key| IdempotencyKey {
        key,
        fingerprint: fingerprint(&body),
    });
    if let Some(k) = &key {
        if let Some(prev) = state
            .store
            .idempotent_export(&scope.user_id, &scope.company_id, &k.key)
            .await?
        {
            return replay(&state, &ctx, &scope, k, prev).await;
        }
    }
    let row = match admit_create(&state, &ctx, &scope, req, key.as_ref()).await? {
        Ok(row) => row,
        Err(prev) => {
            let k = key
                .as_ref()
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("replay without a key")))?;
            return replay(&state, &ctx, &scope, k, prev).await;
        }
    };
    if row.delivery == Delivery::Server {
        state.jobs.notify_one();
    }
    created_response(&state, &ctx, row, false)
}

/// Plans `req` for `scope`, checks its size and the daily quota, then
/// stores it under the create limit (with `key`, when sent). Planning and
/// the checks come before admission: a create that is refused, or fails,
/// stores nothing and takes no slot. `Err` is the export an earlier create
/// with the same key made.
///
/// # Errors
///
/// `FILE_TOO_LARGE`, `QUOTA_EXCEEDED`, `RATE_LIMIT_EXCEEDED`,
/// `CREATION_FAILED`.
pub(super) async fn admit_create(
    state: &AppState,
    ctx: &Ctx,
    scope: &Scope,
    req: plan::CreateRequest,
    key: Option<&IdempotencyKey>,
) -> ApiResult<Result<ExportRow, IdempotentExport>> {
    let (manifest, estimated_bytes) =
        plan::plan(state, scope, &req.data_types, &req.range.canonical(), None)
            .await
            .map_err(ApiError::CreationFailed)?;
    plan::check_size_and_quota(state, scope, &manifest, estimated_bytes).await?;
    let new = NewExport {
        user_id: scope.user_id.clone(),
        company_id: scope.company_id.clone(),
        delivery: req.delivery,
        export_format: req.format.as_str().to_string(),
        data_types: req.data_types,
        range: req.range,
        metadata: req.metadata,
        manifest,
        estimated_bytes,
    };
    let limit = ratelimit::admit_limit(ratelimit::CREATE, &scope.user_id, &scope.company_id);
    let created = state
        .store
        .create_admitted(new, Some(ctx.request_id()), &limit, key)
        .await
        .map_err(ApiError::CreationFailed)?;
    match created {
        Created::New(row, a) => {
            ctx.set_rate(ratelimit::decide(ratelimit::CREATE, a)?);
            state.metrics.export_created();
            Ok(Ok(*row))
        }
        Created::Limited(a) => Err(ratelimit::refusal(ratelimit::CREATE, a)),
        Created::Replay(prev) => Ok(Err(prev)),
    }
}

/// The `Idempotency-Key` header, when sent: 1–255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    // A structured-field string may arrive quoted; the key is its content.
    let raw = v.to_str().unwrap_or_default().trim();
    let key = raw
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .unwrap_or(raw);
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::InvalidRequest(
            "the Idempotency-Key header must be 1 to 255 visible ASCII characters".into(),
        ));
    }
    Ok(Some(key.to_string()))
}

/// The SHA-256 of a body with its object keys sorted: the same request
/// sent again, whatever its key order or spacing, has the same fingerprint.
fn fingerprint(body: &Map<String, Value>) -> String {
    fn canonical(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), canonical(&m[k])))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
            v => v.clone(),
        }
    }
    let text = canonical(&Value::Object(body.clone())).to_string();
    let mut sha = handover::Sha256Stream::default();
    sha.update(text.as_bytes());
    sha.finish_hex()
}

/// The answer to a create whose key was already used: the same export, or
/// a refusal when the body differs or the export is gone.
async fn replay(
    state: &AppState,
    ctx: &Ctx,
    scope: &Scope,
    key: &IdempotencyKey,
    prev: IdempotentExport,
) -> ApiResult<Response> {
    if prev.fingerprint != key.fingerprint {
        return Err(ApiError::validation(
            "IDEMPOTENCY_KEY_REUSED",
            "Idempotency-Key",
            "this Idempotency-Key was already used with a different request body: use a fresh key for a different export",
        ));
    }
    let Some(row) = state.store.find_export(scope, &prev.export_id).await? else {
        return Err(ApiError::Conflict(
            "IDEMPOTENCY_KEY_REUSED",
            "the export created with this Idempotency-Key was deleted: use a fresh key".into(),
        ));
    };
    ctx.set_action("export.create", Some(&row.id));
    created_response(state, ctx, row, true)
}

/// 201 with the created view (and, for client delivery, the manifest).
fn created_response(
    state: &AppState,
    ctx: &Ctx,
    mut row: ExportRow,
    replayed: bool,
) -> ApiResult<Response> {
    ctx.set_action("export.create", Some(&row.id));
    let mut data = row.created_view();
    if row.delivery == Delivery::Client {
        for (name, t) in row.manifest.types.iter_mut() {
            t.records_url = Some(format!("/api/data/export/{}/records/{name}", row.id));
        }
        data["manifest"] =
            serde_json::to_value(&row.manifest).map_err(|e| ApiError::Internal(e.into()))?;
        // What the browser's writer states besides the data: the same as a
        // server-built file of this request would.
        let info = crate::jobs::export_info(state, &row).map_err(ApiError::Internal)?;
        data["export_info"] =
            serde_json::to_value(&info).map_err(|e| ApiError::Internal(e.into()))?;
    }
    if replayed {
        // The export as it is now (it may have moved on since).
        data["status"] = json!(row.status);
    }
    let mut response = (axum::http::StatusCode::CREATED, ctx.ok(data)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/data/export/{}", row.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[utoipa::path(get, path = "/api/data/export", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("limit" = Option<u32>, Query, description = "1–100, default 50"), ("offset" = Option<u64>, Query), ("status" = Option<String>, Query, description = "pending, processing, completed, failed, expired")), responses((status = 200, description = "requests, total, page, limit, hasMore", body = crate::openapi::Envelope), (status = 422, description = "INVALID_LIMIT, INVALID_OFFSET, INVALID_STATUS", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    q: QueryMap,
) -> ApiResult<Json<Value>> {
    ctx.set_action("export.list", None);
    let scope = enter(&state, &ctx, &headers, ratelimit::READ).await?;
    let limit = q.int("limit", 50, 1, 100, "INVALID_LIMIT")? as u32;
    let offset = q.int("offset", 0, 0, i64::MAX as u64, "INVALID_OFFSET")?;
    let status = match q.get("status").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<Status>().map_err(|_| {
            let all: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::validation(
                "INVALID_STATUS",
                "status",
                format!("status must be one of {}", all.join(", ")),
            )
        })?),
    };
    let (rows, total) = state
        .store
        .list_exports(&scope, status, limit, offset)
        .await?;
    Ok(ctx.ok(json!({
        "requests": rows.iter().map(ExportRow::list_view).collect::<Vec<_>>(),
        "total": total,
        "page": offset / u64::from(limit) + 1,
        "limit": limit,
        "offset": offset,
        "hasMore": offset + (rows.len() as u64) < total,
    })))
}

#[utoipa::path(get, path = "/api/data/export/{id}", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id")), responses((status = 200, description = "Details with progress", body = crate::openapi::Envelope), (status = 404, description = "EXPORT_NOT_FOUND (also for other users' ids)", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn details(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    ctx.set_action("export.details", None);
    let scope = enter(&state, &ctx, &headers, ratelimit::READ).await?;
    let row = owned(&state, &scope, id).await?;
    ctx.set_action("export.details", Some(&row.id));
    Ok(ctx.ok(row.details_view()))
}

#[utoipa::path(delete, path = "/api/data/export/{id}", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id")), responses((status = 200, description = "Deleted; files and keys destroyed", body = crate::openapi::Envelope), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    ctx.set_action("export.delete", None);
    let scope = enter(&state, &ctx, &headers, ratelimit::DELETE).await?;
    let row = owned(&state, &scope, id).await?;
    ctx.set_action("export.delete", Some(&row.id));
    let (deleted_at, files) = state
        .store
        .delete_export(&row, Some(ctx.request_id()))
        .await?;
    state.files.remove(&files).await;
    Ok(ctx.ok(json!({ "request_id": row.id, "deleted": true, "deleted_at": deleted_at })))
}

#[utoipa::path(post, path = "/api/data/export/{id}/retry", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id")), responses((status = 202, description = "Queued again (status pending); poll the details", body = crate::openapi::Envelope), (status = 404, description = "EXPORT_NOT_FOUND (also for other users' ids)", body = crate::openapi::ErrorEnvelope), (status = 409, description = "EXPORT_NOT_RETRYABLE: only a failed or partial server export can be retried", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "RATE_LIMIT_EXCEEDED: retries count as creates", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    ctx.set_action("export.retry", None);
    let scope = auth::scope(&state, &ctx, &headers, PERM_EXPORT).await?;
    let row = owned(&state, &scope, id).await?;
    ctx.set_action("export.retry", Some(&row.id));
    let retryable = row.delivery == Delivery::Server
        && (row.status == Status::Failed
            || (row.status == Status::Completed && !row.failed_types.is_empty()));
    if !retryable {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_RETRYABLE",
            if row.delivery == Delivery::Server {
                format!("export is {} with every data type: only a failed or partial export can be retried", row.status)
            } else {
                "only server-built exports can be retried: start a new export instead".to_string()
            },
        ));
    }
    // A retry builds the whole export again: it costs a create.
    super::admit(&state, &ctx, &scope, ratelimit::CREATE).await?;
    let Some(files) = state
        .store
        .retry_export(&row, Some(ctx.request_id()))
        .await?
    else {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_RETRYABLE",
            "the export changed meanwhile and can no longer be retried".into(),
        ));
    };
    state.files.remove(&files).await;
    state.jobs.notify_one();
    let row = state
        .store
        .find_export(&scope, &row.id)
        .await?
        .ok_or(ApiError::ExportNotFound)?;
    Ok((axum::http::StatusCode::ACCEPTED, ctx.ok(row.details_view())).into_response())
}

#[utoipa::path(get, path = "/api/data/export/{id}/download", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id"), ("format" = Option<String>, Query, description = "original (default), json or csv")), responses((status = 200, description = "The file (Content-Disposition: attachment; X-Content-SHA256). For a browser export, its end-to-end encrypted copy: application/octet-stream, <id>.<format>.hov, X-Handover-Encryption", content(("application/json"), ("text/csv"), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"), ("application/octet-stream"))), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 409, description = "EXPORT_NOT_READY", body = crate::openapi::ErrorEnvelope), (status = 422, description = "INVALID_FORMAT", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn download(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    q: QueryMap,
) -> ApiResult<Response> {
    ctx.set_action("export.download", None);
    let scope = enter(&state, &ctx, &headers, ratelimit::DOWNLOAD).await?;
    let row = owned(&state, &scope, id).await?;
    ctx.set_action("export.download", Some(&row.id));
    // Past its expiry the file is gone, or about to be at the next sweep:
    // not served either way.
    if row.status == Status::Expired || (row.status == Status::Completed && row.is_past_expiry()) {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_READY",
            format!("Export expired at {}: request a new one", row.expires_at),
        ));
    }
    if row.delivery == Delivery::Client && row.status == Status::Completed {
        if !matches!(q.get("format"), None | Some("original" | "")) {
            return Err(ApiError::validation(
                "INVALID_FORMAT",
                "format",
                "a browser export's encrypted copy downloads as it was uploaded: use format=original",
            ));
        }
        return super::copies::download(&state, &ctx, &row).await;
    }
    let original: ExportFormat = row
        .export_format
        .parse()
        .map_err(|e: handover::format::FormatError| ApiError::Internal(e.into()))?;
    let format = match q.get("format").unwrap_or("original") {
        "original" | "" => original,
        "json" => ExportFormat::Json,
        "csv" => ExportFormat::Csv,
        "xlsx" if original == ExportFormat::Xlsx => ExportFormat::Xlsx,
        other => {
            return Err(ApiError::validation(
                "INVALID_FORMAT",
                "format",
                format!("download format {other:?} is not available: use original, json or csv"),
            ))
        }
    };
    if row.status != Status::Completed {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_READY",
            "Export not ready for download".into(),
        ));
    }
    let Some(file) = state.files.open(&state, &row, format).await? else {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_READY",
            "Export not ready for download: it was built in the browser and the server keeps no copy".into(),
        ));
    };
    state
        .store
        .export_event(
            &row,
            "export.downloaded",
            Some(ctx.request_id()),
            json!({ "format": format.as_str(), "byte_size": file.byte_size, "sha256": file.sha256,
                    "converted": file.converted_from.is_some() }),
        )
        .await?;
    let filename = format!("{}.{}", row.id, format.extension());
    let mut response = Response::new(Body::from_stream(file.stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Some(size) = file.byte_size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(Ok(v)) = file.sha256.as_deref().map(HeaderValue::from_str) {
        h.insert("x-content-sha256", v);
    }
    Ok(response)
}

#[utoipa::path(post, path = "/api/data/export/{id}/complete", tag = "client delivery", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id")), request_body = crate::openapi::CompleteExport, responses((status = 200, description = "Completed", body = crate::openapi::Envelope), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 409, description = "EXPORT_NOT_OPEN", body = crate::openapi::ErrorEnvelope), (status = 422, description = "RECORD_COUNT_MISMATCH, EXPORT_INCOMPLETE, INVALID_CHECKSUM, INVALID_BYTE_SIZE", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn complete(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: UnreadBody,
) -> ApiResult<Json<Value>> {
    let (scope, row, body) = report(&state, &ctx, &headers, id, body, "export.complete").await?;
    if row.delivery != Delivery::Client || !row.is_open() {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_OPEN",
            format!(
                "export is {} and cannot be completed by the browser",
                row.status
            ),
        ));
    }
    let count = body
        .get("record_count")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            ApiError::validation(
                "INVALID_RECORD_COUNT",
                "record_count",
                "record_count must be a non-negative integer",
            )
        })?;
    let byte_size = body
        .get("byte_size")
        .and_then(Value::as_u64)
        .filter(|&b| b > 0 && b < (1 << 53))
        .ok_or_else(|| {
            ApiError::validation(
                "INVALID_BYTE_SIZE",
                "byte_size",
                "byte_size must be a positive integer",
            )
        })?;
    let sha = sha256_field(&body, "the file")?;
    // What the browser reports must be what was served: every page of
    // every type, as many records as the manifest promised.
    let progress = state.store.progress(&row.id).await?;
    let mut served = 0;
    for (t, promised) in &row.manifest.types {
        let p = progress.iter().find(|p| &p.data_type == t);
        if !p.is_some_and(|p| p.done) {
            return Err(ApiError::validation(
                "EXPORT_INCOMPLETE",
                "record_count",
                format!("not every page was fetched: {t} is unfinished"),
            ));
        }
        let got = p.map_or(0, |p| p.served);
        if got != promised.records {
            return Err(ApiError::validation(
                "RECORD_COUNT_MISMATCH",
                "record_count",
                format!(
                    "{got} records of {t} were served, but the manifest promised {} (the data changed during the export: start a new one)",
                    promised.records
                ),
            ));
        }
        served += got;
    }
    if count != served {
        return Err(ApiError::validation(
            "RECORD_COUNT_MISMATCH",
            "record_count",
            format!("record_count {count} does not match the {served} records served"),
        ));
    }
    let done = Completion {
        records: count,
        byte_size,
        sha256: sha,
        details: Default::default(),
        failed_types: Vec::new(),
    };
    if !state
        .store
        .complete_export(&row, &done, &[], Some(ctx.request_id()))
        .await?
    {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_OPEN",
            "export is no longer open".into(),
        ));
    }
    crate::exports::count_completed(&state, &row, &done);
    let row = state
        .store
        .find_export(&scope, &row.id)
        .await?
        .ok_or(ApiError::ExportNotFound)?;
    Ok(ctx.ok(row.details_view()))
}

#[utoipa::path(post, path = "/api/data/export/{id}/fail", tag = "client delivery", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id")), request_body = crate::openapi::FailExport, responses((status = 200, description = "Failed", body = crate::openapi::Envelope), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 409, description = "EXPORT_NOT_OPEN", body = crate::openapi::ErrorEnvelope), (status = 422, description = "INVALID_REASON", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn fail(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: UnreadBody,
) -> ApiResult<Json<Value>> {
    let (scope, row, body) = report(&state, &ctx, &headers, id, body, "export.fail").await?;
    let reason = body
        .get("reason")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|r| !r.is_empty() && r.chars().count() <= 500)
        .ok_or_else(|| {
            ApiError::validation(
                "INVALID_REASON",
                "reason",
                "reason must be a non-empty string of at most 500 characters",
            )
        })?;
    if row.delivery != Delivery::Client
        || !state
            .store
            .fail_export(&row, reason, Some(ctx.request_id()))
            .await?
    {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_OPEN",
            format!(
                "export is {} and cannot be failed by the browser",
                row.status
            ),
        ));
    }
    state.metrics.export_failed();
    let row = state
        .store
        .find_export(&scope, &row.id)
        .await?
        .ok_or(ApiError::ExportNotFound)?;
    Ok(ctx.ok(row.details_view()))
}
