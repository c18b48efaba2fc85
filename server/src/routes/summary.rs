//! `GET /api/data/summary`: per data type, its description and the caller's
//! record count (the "127 Particles · 12 Projects" card).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::auth::PERM_EXPORT;
use crate::context::Ctx;
use crate::datatypes::Range;
use crate::error::ApiResult;
use crate::ratelimit;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/data/summary", get(summary))
}

#[utoipa::path(get, path = "/api/data/summary", tag = "data", params(("X-Company-ID" = String, Header, description = "One of the caller's companies")), responses((status = 200, description = "Per data type: description and the caller's record count", body = crate::openapi::Envelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn summary(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    ctx.set_action("data.summary", None);
    let scope = super::enter(&state, &ctx, &headers, PERM_EXPORT, ratelimit::OTHER_READ).await?;
    let defs: Vec<_> = state.registry.all().collect();
    let names: Vec<String> = defs.iter().map(|t| t.name.clone()).collect();
    let counts = state
        .source
        .counts(&names, &scope, &Range::default())
        .await?;
    let types: Vec<Value> = defs
        .iter()
        .zip(&counts)
        .map(|(t, n)| json!({ "data_type": t.name, "description": t.description, "records": n }))
        .collect();
    let total: u64 = counts.iter().sum();
    Ok(ctx.ok(json!({
        "user_id": scope.user_id,
        "company_id": scope.company_id,
        "data_types": types,
        "total_records": total,
        "formats": ["json", "csv", "xlsx"],
        "article_15": state.registry.article_15,
    })))
}
