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
use handover::model::{format_timestamp, parse_timestamp, Manifest, TypeManifest};
use serde_json::{json, Map, Value};

use super::{JsonObject, QueryMap};
use crate::auth::{self, Scope, PERM_EXPORT};
use crate::context::Ctx;
use crate::datatypes::Range;
use crate::error::{ApiError, ApiResult};
use crate::exports::{self, ExportRow, NewExport, STATUSES};
use crate::ratelimit::{self, Limit};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/data/export", post(create).get(list))
        .route("/api/data/export/{id}", get(details).delete(delete))
        .route("/api/data/export/{id}/download", get(download))
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
    body: Result<JsonObject, ApiError>,
    action: &'static str,
) -> ApiResult<(Scope, ExportRow, Map<String, Value>)> {
    ctx.set_action(action, None);
    let scope = enter(state, ctx, headers, ratelimit::REPORT).await?;
    let row = owned(state, &scope, id).await?;
    ctx.set_action(action, Some(&row.id));
    let JsonObject(body) = body?;
    Ok((scope, row, body))
}

/// Authenticates for `data:export` and admits under `limit`.
async fn enter(state: &AppState, ctx: &Ctx, headers: &HeaderMap, limit: Limit) -> ApiResult<Scope> {
    super::enter(state, ctx, headers, PERM_EXPORT, limit).await
}

/// The caller's export `id`, or 404 (also for other users' and companies' ids).
async fn owned(
    state: &AppState,
    scope: &Scope,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<ExportRow> {
    let Ok(Path(id)) = id else {
        return Err(ApiError::ExportNotFound);
    };
    exports::find(&state.db, scope, &id)
        .await?
        .ok_or(ApiError::ExportNotFound)
}

const CREATE_FIELDS: [&str; 6] = [
    "export_format",
    "data_types",
    "date_range_start",
    "date_range_end",
    "metadata",
    "delivery",
];
const MAX_METADATA_BYTES: usize = 4096;

fn parse_date(body: &Map<String, Value>, field: &str) -> ApiResult<Option<String>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_timestamp(s)
            .map(|t| Some(format_timestamp(t)))
            .ok_or_else(|| {
                ApiError::validation(
                    "DATE_RANGE_INVALID",
                    field,
                    format!("{field} must be an ISO 8601 date-time, got {s:?}"),
                )
            }),
        Some(_) => Err(ApiError::validation(
            "DATE_RANGE_INVALID",
            field,
            format!("{field} must be a string"),
        )),
    }
}

/// Checks a create request body; returns format, types, range, metadata, delivery.
fn validate_create(
    state: &AppState,
    body: &Map<String, Value>,
) -> ApiResult<(ExportFormat, Vec<String>, Range, Value, String)> {
    if let Some(k) = body.keys().find(|k| !CREATE_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::validation(
            "UNKNOWN_FIELD",
            k.clone(),
            format!("unknown field {k:?}"),
        ));
    }
    let format = match body.get("export_format") {
        Some(Value::String(s)) => s.parse::<ExportFormat>().map_err(|_| {
            ApiError::validation(
                "INVALID_FORMAT",
                "export_format",
                format!("unsupported export format {s:?}: use json, csv or xlsx"),
            )
        })?,
        None => {
            return Err(ApiError::validation(
                "INVALID_FORMAT",
                "export_format",
                "export_format is required (json, csv or xlsx)",
            ))
        }
        Some(_) => {
            return Err(ApiError::validation(
                "INVALID_FORMAT",
                "export_format",
                "export_format must be a string",
            ))
        }
    };
    let types = match body.get("data_types") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                "data_types",
                "data_types must name at least one data type",
            ))
        }
        None => {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                "data_types",
                "data_types is required",
            ))
        }
        Some(_) => {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                "data_types",
                "data_types must be an array of strings",
            ))
        }
    };
    let mut data_types = Vec::with_capacity(types.len());
    for (i, t) in types.iter().enumerate() {
        let field = format!("data_types[{i}]");
        let Value::String(name) = t else {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                field,
                "data types are strings",
            ));
        };
        if state.registry.get(name).is_none() {
            let known: Vec<&str> = state.registry.all().map(|t| t.name.as_str()).collect();
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                field,
                format!(
                    "unknown data type {name:?}; available: {}",
                    known.join(", ")
                ),
            ));
        }
        if data_types.contains(name) {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                field,
                format!("data type {name:?} is listed twice"),
            ));
        }
        data_types.push(name.clone());
    }
    let range = Range {
        start: parse_date(body, "date_range_start")?,
        end: parse_date(body, "date_range_end")?,
    };
    if let (Some(s), Some(e)) = (&range.start, &range.end) {
        if parse_timestamp(s) > parse_timestamp(e) {
            return Err(ApiError::validation(
                "DATE_RANGE_INVALID",
                "date_range_start",
                "date_range_start is after date_range_end",
            ));
        }
    }
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(m)) => {
            if v.to_string().len() > MAX_METADATA_BYTES || m.len() > 50 {
                return Err(ApiError::validation(
                    "INVALID_METADATA",
                    "metadata",
                    format!("metadata must be at most {MAX_METADATA_BYTES} bytes and 50 keys"),
                ));
            }
            v.clone()
        }
        Some(_) => {
            return Err(ApiError::validation(
                "INVALID_METADATA",
                "metadata",
                "metadata must be an object",
            ))
        }
    };
    let delivery = match body.get("delivery") {
        None | Some(Value::Null) => "server".to_string(),
        Some(Value::String(s)) if s == "client" || s == "server" => s.clone(),
        Some(_) => {
            return Err(ApiError::validation(
                "INVALID_DELIVERY",
                "delivery",
                "delivery must be \"client\" or \"server\"",
            ))
        }
    };
    Ok((format, data_types, range, metadata, delivery))
}

/// Builds the manifest (counts and columns per type) and a size estimate.
pub async fn plan(
    state: &AppState,
    scope: &Scope,
    data_types: &[String],
    range: &Range,
    export_id: Option<&str>,
) -> anyhow::Result<(Manifest, u64)> {
    let mut manifest = Manifest::default();
    let mut bytes = 0u64;
    for name in data_types {
        let t = state
            .registry
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("data type {name} vanished"))?;
        let records = state.source.count(name, scope, range).await?;
        if records > 0 {
            // A small sample gives the average record size (its JSON
            // values plus the keys a JSON record repeats); a sample that
            // cannot be read only makes the estimate rougher.
            let keys: u64 = t.columns.iter().map(|c| c.name.len() as u64 + 4).sum();
            let req = crate::source::PageRequest {
                data_type: name.clone(),
                owner: scope.clone(),
                range: range.clone(),
                after: None,
                limit: 20,
            };
            let avg = match state
                .source
                .read_page(req, crate::source::SizeSample::default())
                .await
            {
                Ok((sample, _)) if sample.rows > 0 => sample.json_bytes / sample.rows + keys,
                Ok(_) => 256,
                Err(e) => {
                    tracing::warn!(data_type = %name, error = %format!("{e:#}"), "could not sample records for the size estimate");
                    256
                }
            };
            bytes += avg * records;
        }
        manifest.types.insert(
            name.clone(),
            TypeManifest {
                records,
                columns: t.columns.clone(),
                records_url: export_id.map(|id| format!("/api/data/export/{id}/records/{name}")),
            },
        );
    }
    Ok((manifest, bytes + 512))
}

/// `FILE_TOO_LARGE` beyond the size limit; `QUOTA_EXCEEDED` when the
/// records exported in the last 24 hours would pass the daily quota.
async fn check_size_and_quota(
    state: &AppState,
    scope: &Scope,
    manifest: &Manifest,
    estimated_bytes: u64,
) -> ApiResult<()> {
    let limit = state.settings.max_export_bytes;
    if estimated_bytes > limit {
        return Err(ApiError::validation(
            "FILE_TOO_LARGE",
            "date_range_start",
            format!(
                "the export would be about {} MB, over the limit of {} MB: reduce the date range or the data types",
                estimated_bytes / 1_048_576 + 1,
                limit / 1_048_576
            ),
        ));
    }
    let day_ago = handover::model::format_timestamp(
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
    );
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT estimated_records, created_at FROM export_requests WHERE user_id = ? AND company_id = ? AND created_at > ? ORDER BY created_at",
    )
    .bind(&scope.user_id)
    .bind(&scope.company_id)
    .bind(&day_ago)
    .fetch_all(&state.db)
    .await?;
    let quota = state.settings.daily_record_quota;
    let used: u64 = rows.iter().map(|(n, _)| *n as u64).sum();
    if used + manifest.total_records() > quota {
        // Space frees up as the oldest exports leave the 24-hour window.
        let needed = (used + manifest.total_records()).saturating_sub(quota);
        let mut freed = 0;
        let mut until = None;
        for (n, at) in &rows {
            freed += *n as u64;
            until = parse_timestamp(at);
            if freed >= needed {
                break;
            }
        }
        let retry_after = until
            .map(|t| {
                (t + time::Duration::days(1) - time::OffsetDateTime::now_utc())
                    .whole_seconds()
                    .max(1) as u64
            })
            .unwrap_or(86_400);
        return Err(ApiError::QuotaExceeded { quota, retry_after });
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/data/export", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies")), request_body = crate::openapi::CreateExport, responses((status = 201, description = "Created; with `manifest` for client delivery", body = crate::openapi::Envelope), (status = 400, description = "Malformed JSON (INVALID_REQUEST) or no X-Company-ID", body = crate::openapi::ErrorEnvelope), (status = 422, description = "VALIDATION_ERROR: INVALID_FORMAT, INVALID_DATA_TYPE, DATE_RANGE_INVALID, INVALID_METADATA, FILE_TOO_LARGE", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "RATE_LIMIT_EXCEEDED or QUOTA_EXCEEDED (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope), (status = 500, description = "CREATION_FAILED", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<JsonObject, ApiError>,
) -> ApiResult<Response> {
    ctx.set_action("export.create", None);
    let scope = auth::scope(&state, &ctx, &headers, PERM_EXPORT).await?;
    let JsonObject(body) = body?;
    let (format, data_types, range, metadata, delivery) = validate_create(&state, &body)?;
    super::admit(&state, &ctx, &scope, ratelimit::CREATE).await?;
    let (manifest, estimated_bytes) = plan(&state, &scope, &data_types, &range, None)
        .await
        .map_err(ApiError::CreationFailed)?;
    check_size_and_quota(&state, &scope, &manifest, estimated_bytes).await?;
    let new = NewExport {
        user_id: scope.user_id.clone(),
        company_id: scope.company_id.clone(),
        delivery: delivery.clone(),
        export_format: format.as_str().to_string(),
        data_types,
        range,
        metadata,
        manifest,
        estimated_bytes,
    };
    let mut row = exports::insert(&state, new, Some(ctx.request_id()))
        .await
        .map_err(ApiError::CreationFailed)?;
    ctx.set_action("export.create", Some(&row.id));
    let mut data = row.created_view();
    if delivery == "client" {
        for (name, t) in row.manifest.types.iter_mut() {
            t.records_url = Some(format!("/api/data/export/{}/records/{name}", row.id));
        }
        data["manifest"] =
            serde_json::to_value(&row.manifest).map_err(|e| ApiError::Internal(e.into()))?;
        // What the browser's writer states besides the data: the same as a
        // server-built file of this request would.
        let info = crate::jobs::export_info(&state, &row).map_err(ApiError::Internal)?;
        data["export_info"] =
            serde_json::to_value(&info).map_err(|e| ApiError::Internal(e.into()))?;
    } else {
        state.jobs.notify_one();
    }
    let mut response = (axum::http::StatusCode::CREATED, ctx.ok(data)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/data/export/{}", row.id)) {
        response.headers_mut().insert(header::LOCATION, v);
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
    let status = q.get("status").filter(|s| !s.is_empty());
    if let Some(s) = status {
        if !STATUSES.contains(&s) {
            return Err(ApiError::validation(
                "INVALID_STATUS",
                "status",
                format!("status must be one of {}", STATUSES.join(", ")),
            ));
        }
    }
    let (rows, total) = exports::list(&state.db, &scope, status, limit, offset).await?;
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
    let deleted_at = exports::now();
    sqlx::query("UPDATE export_requests SET deleted_at = ? WHERE id = ?")
        .bind(&deleted_at)
        .bind(&row.id)
        .execute(&state.db)
        .await?;
    state.files.destroy(&state.db, &row.id).await?;
    exports::event(
        &state,
        &row,
        "export.deleted",
        Some(ctx.request_id()),
        json!({ "status_before": row.status }),
    )
    .await?;
    Ok(ctx.ok(json!({ "request_id": row.id, "deleted": true, "deleted_at": deleted_at })))
}

#[utoipa::path(get, path = "/api/data/export/{id}/download", tag = "exports", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id"), ("format" = Option<String>, Query, description = "original (default), json or csv")), responses((status = 200, description = "The file (Content-Disposition: attachment)", content_type = "application/octet-stream"), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 409, description = "EXPORT_NOT_READY", body = crate::openapi::ErrorEnvelope), (status = 422, description = "INVALID_FORMAT", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
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
    if row.status != "completed" {
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
    exports::event(
        &state,
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
    body: Result<JsonObject, ApiError>,
) -> ApiResult<Json<Value>> {
    let (scope, row, body) = report(&state, &ctx, &headers, id, body, "export.complete").await?;
    if row.delivery != "client" || !row.is_open() {
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
    let sha = body
        .get("sha256")
        .and_then(Value::as_str)
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| {
            ApiError::validation(
                "INVALID_CHECKSUM",
                "sha256",
                "sha256 must be 64 hexadecimal digits",
            )
        })?;
    // What the browser reports must be what was served: every page of
    // every type, as many records as the manifest promised.
    let progress = exports::progress(&state.db, &row.id).await?;
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
    let done = exports::Completion {
        records: count,
        byte_size,
        sha256: sha,
        details: Default::default(),
    };
    if !exports::mark_completed(&state, &row, &done, Some(ctx.request_id())).await? {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_OPEN",
            "export is no longer open".into(),
        ));
    }
    let row = exports::find(&state.db, &scope, &row.id)
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
    body: Result<JsonObject, ApiError>,
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
    if row.delivery != "client"
        || !exports::fail(&state, &row, reason, Some(ctx.request_id())).await?
    {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_OPEN",
            format!(
                "export is {} and cannot be failed by the browser",
                row.status
            ),
        ));
    }
    let row = exports::find(&state.db, &scope, &row.id)
        .await?
        .ok_or(ApiError::ExportNotFound)?;
    Ok(ctx.ok(row.details_view()))
}
