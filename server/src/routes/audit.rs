//! `GET /api/audit`: the audit log of the caller's company, for holders of
//! `audit:read`. Filters: `action`, `actor`, `outcome`, `resource`; paging
//! with `limit` (1–500, default 100) and `offset`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::QueryMap;
use crate::audit::AuditRow;
use crate::auth::PERM_AUDIT;
use crate::context::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::ratelimit;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/audit", get(list))
}

#[utoipa::path(get, path = "/api/audit", tag = "audit", params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("limit" = Option<u32>, Query), ("offset" = Option<u64>, Query), ("action" = Option<String>, Query), ("actor" = Option<String>, Query), ("outcome" = Option<String>, Query), ("resource" = Option<String>, Query)), responses((status = 200, description = "Audit rows of the company, newest first", body = crate::openapi::Envelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    q: QueryMap,
) -> ApiResult<Json<Value>> {
    ctx.set_action("audit.list", None);
    let scope = super::enter(&state, &ctx, &headers, PERM_AUDIT, ratelimit::OTHER_READ).await?;
    let limit = q.int("limit", 100, 1, 500, "INVALID_LIMIT")?;
    let offset = q.int("offset", 0, 0, i64::MAX as u64, "INVALID_OFFSET")?;
    if let Some(o) = q.get("outcome") {
        if !["allowed", "refused", "error", "event"].contains(&o) {
            return Err(ApiError::validation(
                "INVALID_OUTCOME",
                "outcome",
                "outcome must be allowed, refused, error or event",
            ));
        }
    }
    let filter = "FROM audit_log WHERE company_id = ?1 AND (?2 IS NULL OR action = ?2) AND (?3 IS NULL OR actor = ?3) \
                  AND (?4 IS NULL OR outcome = ?4) AND (?5 IS NULL OR resource = ?5)";
    let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {filter}"))
        .bind(&scope.company_id)
        .bind(q.get("action"))
        .bind(q.get("actor"))
        .bind(q.get("outcome"))
        .bind(q.get("resource"))
        .fetch_one(&state.db)
        .await?;
    let rows = sqlx::query(&format!(
        "SELECT * {filter} ORDER BY seq DESC LIMIT ?6 OFFSET ?7"
    ))
    .bind(&scope.company_id)
    .bind(q.get("action"))
    .bind(q.get("actor"))
    .bind(q.get("outcome"))
    .bind(q.get("resource"))
    .bind(limit as i64)
    .bind(offset as i64)
    .fetch_all(&state.db)
    .await?;
    let entries = rows
        .iter()
        .map(AuditRow::from_row)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ctx.ok(json!({
        "entries": entries,
        "total": total,
        "limit": limit,
        "offset": offset,
        "hasMore": offset + (entries.len() as u64) < total as u64,
    })))
}
