//! Liveness, Prometheus metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", security(()), responses((status = 200, description = "Alive and the database answers")))]
pub(crate) async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.ping().await {
        true => (axum::http::StatusCode::OK, Json(json!({ "status": "ok" }))),
        false => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "database unavailable" })),
        ),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations", security(()), responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[utoipa::path(get, path = "/api/openapi.json", tag = "operations", security(()), responses((status = 200, description = "This document")))]
pub(crate) async fn openapi() -> impl IntoResponse {
    Json(crate::openapi::document())
}
