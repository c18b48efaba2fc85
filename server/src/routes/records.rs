//! `GET /api/data/export/{id}/records/{data_type}`: one keyset page of the
//! caller's records for a `client` export, counted for progress.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::QueryMap;
use crate::auth::PERM_EXPORT;
use crate::context::Ctx;
use crate::datatypes::PageError;
use crate::error::{ApiError, ApiResult};
use crate::exports::{self, TypeProgress};
use crate::ratelimit;
use crate::AppState;

/// Page size bounds.
pub const MAX_PAGE: u64 = 5000;
pub const DEFAULT_PAGE: u64 = 1000;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/data/export/{id}/records/{data_type}", get(page))
}

#[utoipa::path(get, path = "/api/data/export/{id}/records/{data_type}", tag = "client delivery", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id"), ("data_type" = String, Path), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"), ("limit" = Option<u32>, Query, description = "1–5000, default 1000")), responses((status = 200, description = "records and next_cursor (null on the last page)", body = crate::openapi::Envelope), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 409, description = "EXPORT_NOT_OPEN", body = crate::openapi::ErrorEnvelope), (status = 422, description = "INVALID_DATA_TYPE, INVALID_LIMIT, INVALID_CURSOR", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn page(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    q: QueryMap,
) -> ApiResult<Response> {
    ctx.set_action("export.records", None);
    let scope = super::enter(&state, &ctx, &headers, PERM_EXPORT, ratelimit::RECORDS).await?;
    let Ok(Path((id, data_type))) = path else {
        return Err(ApiError::ExportNotFound);
    };
    let row = exports::find(&state.db, &scope, &id)
        .await?
        .ok_or(ApiError::ExportNotFound)?;
    ctx.set_action("export.records", Some(&row.id));
    if row.delivery != "client" || !row.is_open() {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_OPEN",
            format!(
                "records are served only while a client export is open; this one is {}",
                row.status
            ),
        ));
    }
    if !row.data_types.contains(&data_type) {
        return Err(ApiError::validation(
            "INVALID_DATA_TYPE",
            "data_type",
            format!("{data_type:?} is not one of this export's data types"),
        ));
    }
    let limit = q.int("limit", DEFAULT_PAGE, 1, MAX_PAGE, "INVALID_LIMIT")? as u32;
    let cursor = q.get("cursor").filter(|c| !c.is_empty());
    ctx.detail("data_type", data_type.as_str());
    if let Some(fault) = state.settings.fault.as_ref().and_then(|f| f.roll()) {
        return Ok(fault);
    }
    let t = state.registry.get(&data_type).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "data type {data_type} no longer configured"
        ))
    })?;
    let (records, next_cursor) = state
        .registry
        .page(&state.db, t, &scope, &row.range(), cursor, limit)
        .await
        .map_err(|e| match e {
            PageError::BadCursor => ApiError::validation(
                "INVALID_CURSOR",
                "cursor",
                "cursor is not valid for this data type",
            ),
            PageError::Db(e) => ApiError::Internal(e),
        })?;

    // Progress: a repeated request for the last page (a client retry) is
    // counted once.
    let mut progress = row.progress.clone();
    let p = progress
        .entry(data_type.clone())
        .or_insert_with(TypeProgress::default);
    let key = cursor.unwrap_or_default().to_string();
    let n = records.len() as u64;
    if p.last_cursor.as_deref() == Some(key.as_str()) {
        p.served = p.served_before_last + n;
    } else {
        p.served_before_last = p.served;
        p.served += n;
        p.last_cursor = Some(key);
    }
    p.next_cursor = next_cursor.clone();
    p.done = next_cursor.is_none();
    let served: u64 = progress.values().map(|p| p.served).sum();
    let now = exports::now();
    sqlx::query(
        "UPDATE export_requests SET progress = ?, records_served = ?, current_type = ?, status = 'processing', \
         started_at = COALESCE(started_at, ?), last_activity_at = ? WHERE id = ? AND status IN ('pending', 'processing')",
    )
    .bind(serde_json::to_string(&progress).map_err(|e| ApiError::Internal(e.into()))?)
    .bind(served as i64)
    .bind(&data_type)
    .bind(&now)
    .bind(&now)
    .bind(&row.id)
    .execute(&state.db)
    .await?;
    if row.status == "pending" {
        exports::event(
            &state,
            &row,
            "export.started",
            Some(ctx.request_id()),
            json!({ "delivery": "client" }),
        )
        .await?;
    }
    Ok(ctx
        .ok(json!({ "records": records, "next_cursor": next_cursor }))
        .into_response())
}
