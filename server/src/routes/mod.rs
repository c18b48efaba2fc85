//! HTTP routes. Each module owns its `router()`, its request/response
//! handling and its private handlers; this module holds the extractors
//! they share.

pub mod audit;
pub mod copies;
pub mod exports;
pub mod meta;
pub mod privacy;
pub mod records;
pub mod summary;

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde_json::{Map, Value};

use axum::http::HeaderMap;

use crate::auth::{self, Scope};
use crate::context::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::ratelimit::{self, Limit};
use crate::AppState;

/// Admits the request under `limit` for the scope's user and company, and
/// hands the limit's state to the `RateLimit-*` headers.
///
/// # Errors
///
/// `429 RATE_LIMIT_EXCEEDED`.
pub(crate) async fn admit(
    state: &AppState,
    ctx: &Ctx,
    scope: &Scope,
    limit: Limit,
) -> ApiResult<()> {
    let rate = ratelimit::admit(&state.store, limit, &scope.user_id, &scope.company_id).await?;
    ctx.set_rate(rate);
    Ok(())
}

/// The prologue of every API handler: authenticate for `permission`, check
/// the company, admit under `limit`.
///
/// # Errors
///
/// 401, 403, 400 (no company) or 429.
pub(crate) async fn enter(
    state: &AppState,
    ctx: &Ctx,
    headers: &HeaderMap,
    permission: &str,
    limit: Limit,
) -> ApiResult<Scope> {
    let scope = auth::scope(state, ctx, headers, permission).await?;
    admit(state, ctx, &scope, limit).await?;
    Ok(scope)
}

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Whether a Content-Type names JSON (`application/json`, `…+json`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// How long a client may take to send a request body, by default
/// (`HANDOVER_BODY_TIMEOUT_SECS`).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The configured body timeout, put on each request by the request
/// middleware (extractors have no access to the state).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
        if !ct.to_str().is_ok_and(is_json) {
            return Err(ApiError::UnsupportedMediaType(
                "JSON (Content-Type: application/json)",
            ));
        }
    }
    let limit = req
        .extensions()
        .get::<BodyTimeout>()
        .map_or(BODY_TIMEOUT, |t| t.0);
    let read = tokio::time::timeout(limit, Bytes::from_request(req, &()))
        .await
        .map_err(|_| ApiError::RequestTimeout)?;
    read.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(MAX_BODY_BYTES)
        } else {
            ApiError::InvalidRequest("the request body could not be read".into())
        }
    })
}

/// A request body not read yet: handlers authenticate first, so an
/// unauthenticated client cannot make the server wait for (or hold) a body.
/// Read as a JSON object: declared as anything but JSON → 415; not JSON
/// (or not an object) → 400 `INVALID_REQUEST`; over [`MAX_BODY_BYTES`] →
/// 413; not in within the body timeout ([`BODY_TIMEOUT`] by default) → 408. Handlers validate fields
/// themselves so every 422 names its field and specific code.
#[derive(Debug)]
pub struct UnreadBody(Request);

impl<S: Send + Sync> FromRequest<S> for UnreadBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(req))
    }
}

impl UnreadBody {
    /// Reads a JSON object body.
    ///
    /// # Errors
    ///
    /// 415, 400, 413, or 408 when it does not arrive within the body timeout.
    pub async fn object(self) -> Result<Map<String, Value>, ApiError> {
        let bytes = read_body(self.0).await?;
        parse_object(&bytes)
    }

    /// Reads an optional JSON object body: absent (empty, without
    /// Content-Type) is `None`.
    ///
    /// # Errors
    ///
    /// As [`UnreadBody::object`].
    pub async fn optional_object(self) -> Result<Option<Map<String, Value>>, ApiError> {
        let declared = self
            .0
            .headers()
            .contains_key(axum::http::header::CONTENT_TYPE);
        let bytes = read_body(self.0).await?;
        if !declared && bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        parse_object(&bytes).map(Some)
    }
}

impl UnreadBody {
    /// The body as it arrives, for uploads of bytes.
    ///
    /// # Errors
    ///
    /// 415 unless declared as `application/octet-stream` (or the resumable
    /// uploads draft's `application/offset+octet-stream`).
    pub fn octets(self) -> Result<axum::body::Body, ApiError> {
        let declared = self
            .0
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        match declared.as_deref() {
            Some("application/octet-stream" | "application/offset+octet-stream") => {
                Ok(self.0.into_body())
            }
            _ => Err(ApiError::UnsupportedMediaType("application/octet-stream")),
        }
    }
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidRequest(
            "a JSON object body is required".into(),
        ));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidRequest(
            "the request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidRequest(format!(
            "malformed JSON body: {e}"
        ))),
    }
}

/// Query parameters (last value wins); never rejects.
#[derive(Debug, Default)]
pub struct QueryMap(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or_default();
        Ok(Self(
            form_urlencoded::parse(q.as_bytes()).into_owned().collect(),
        ))
    }
}

impl QueryMap {
    /// An integer parameter within `min..=max`, or `default` when absent.
    ///
    /// # Errors
    ///
    /// 422 with `code` naming the parameter.
    pub fn int(
        &self,
        name: &str,
        default: u64,
        min: u64,
        max: u64,
        code: &'static str,
    ) -> Result<u64, ApiError> {
        match self.0.get(name) {
            None => Ok(default),
            Some(s) => s
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::validation(
                        code,
                        name,
                        format!("{name} must be an integer from {min} to {max}"),
                    )
                }),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}
