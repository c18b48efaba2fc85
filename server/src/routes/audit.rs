//! `GET /api/audit`: the audit log of the caller's company, for holders of
//! `audit:read`. Filters: `action`, `actor`, `outcome`, `resource`; paging
//! with `limit` (1–500, default 100) and `offset`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::QueryMap;
use crate::auth::PERM_AUDIT;
use crate::context::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::ratelimit;
use crate::store::audit::AuditFilter;
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
    let filter = AuditFilter {
        company_id: scope.company_id.clone(),
        action: q.get("action").map(str::to_string),
        actor: q.get("actor").map(str::to_string),
        outcome: q.get("outcome").map(str::to_string),
        resource: q.get("resource").map(str::to_string),
    };
    let (entries, total) = state.store.list_audit(&filter, limit, offset).await?;
    Ok(ctx.ok(json!({
        "entries": entries,
        "total": total,
        "limit": limit,
        "offset": offset,
        "hasMore": offset + (entries.len() as u64) < total,
    })))
}
