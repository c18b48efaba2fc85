//! The API's one error enum, mapped to status, code, category and severity
//! in exactly one `match`. Internal error text is logged with the request
//! id by the request middleware, never sent to clients.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request (body is not JSON, bad header, …).
    #[error("{0}")]
    InvalidRequest(String),
    /// Well-formed but invalid: `code` is the specific reason
    /// (`INVALID_FORMAT`, `INVALID_DATA_TYPE`, `DATE_RANGE_INVALID`, …).
    #[error("{message}")]
    Validation {
        code: &'static str,
        field: String,
        message: String,
    },
    /// `X-Company-ID` is missing or empty.
    #[error("the X-Company-ID header is required")]
    MissingCompany,
    /// No valid credentials; the reason is logged, not sent.
    #[error("authentication required")]
    Unauthorized(String),
    /// Authenticated but not allowed (`code`: `INSUFFICIENT_PERMISSIONS`, `COMPANY_ACCESS_DENIED`).
    #[error("{1}")]
    Forbidden(&'static str, String),
    /// No such export for this user and company (also: someone else's).
    #[error("export not found")]
    ExportNotFound,
    /// No such route.
    #[error("no route for this path")]
    RouteNotFound,
    /// Route exists, method does not.
    #[error("method not allowed for this path")]
    MethodNotAllowed,
    /// The body did not arrive in time.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// A body declared as another type than the route takes (named here).
    #[error("the request body must be {0}")]
    UnsupportedMediaType(&'static str),
    /// Body over the limit.
    #[error("request body too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    /// Rate limit hit.
    #[error("rate limit exceeded: at most {limit} requests per {window_secs} s; retry in {retry_after} s")]
    RateLimited {
        limit: u32,
        window_secs: u64,
        retry_after: u64,
    },
    /// The user's daily export quota (records) is used up.
    #[error(
        "export quota exceeded: at most {quota} records per 24 hours; retry in {retry_after} s"
    )]
    QuotaExceeded { quota: u64, retry_after: u64 },
    /// The export is not in a state that allows this (`EXPORT_NOT_READY`, `EXPORT_NOT_OPEN`).
    #[error("{1}")]
    Conflict(&'static str, String),
    /// Creating the export failed for an internal reason.
    #[error("failed to create export")]
    CreationFailed(#[source] anyhow::Error),
    /// Anything else: logged, answered generically.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(e.into())
    }
}

/// Internal error text, for the request middleware to log with the request id.
#[derive(Debug, Clone)]
pub struct InternalErrorText(pub String);

/// The error code of a response, for the audit log and metrics.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl ApiError {
    /// A 422 for `field` with the specific `code`.
    pub fn validation(
        code: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Validation {
            code,
            field: field.into(),
            message: message.into(),
        }
    }

    /// (status, code, category, severity) of this error.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str, &'static str) {
        use StatusCode as S;
        match self {
            Self::InvalidRequest(_) => (S::BAD_REQUEST, "INVALID_REQUEST", "validation", "low"),
            Self::Validation { .. } => (
                S::UNPROCESSABLE_ENTITY,
                "VALIDATION_ERROR",
                "validation",
                "low",
            ),
            Self::MissingCompany => (S::BAD_REQUEST, "MISSING_COMPANY_ID", "validation", "low"),
            Self::Unauthorized(_) => (S::UNAUTHORIZED, "UNAUTHORIZED", "authentication", "medium"),
            Self::Forbidden(code, _) => (S::FORBIDDEN, code, "authorization", "medium"),
            Self::ExportNotFound => (S::NOT_FOUND, "EXPORT_NOT_FOUND", "not_found", "low"),
            Self::RouteNotFound => (S::NOT_FOUND, "NOT_FOUND", "not_found", "low"),
            Self::MethodNotAllowed => (
                S::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "validation",
                "low",
            ),
            Self::RequestTimeout => (S::REQUEST_TIMEOUT, "REQUEST_TIMEOUT", "validation", "low"),
            Self::UnsupportedMediaType(_) => (
                S::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "validation",
                "low",
            ),
            Self::PayloadTooLarge(_) => (
                S::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "validation",
                "low",
            ),
            Self::RateLimited { .. } => (
                S::TOO_MANY_REQUESTS,
                "RATE_LIMIT_EXCEEDED",
                "rate_limit",
                "medium",
            ),
            Self::QuotaExceeded { .. } => (
                S::TOO_MANY_REQUESTS,
                "QUOTA_EXCEEDED",
                "rate_limit",
                "medium",
            ),
            Self::Conflict(code, _) => (S::CONFLICT, code, "validation", "medium"),
            Self::CreationFailed(_) => (
                S::INTERNAL_SERVER_ERROR,
                "CREATION_FAILED",
                "server",
                "high",
            ),
            Self::Internal(_) => (S::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", "server", "high"),
        }
    }
}

/// The `RateLimit-*` headers: the limit, what is left of it, and the
/// seconds until it resets (every answer that passed a limit, and every 429).
pub(crate) fn rate_limit_headers(
    headers: &mut axum::http::HeaderMap,
    limit: u64,
    remaining: u64,
    reset_secs: u64,
) {
    headers.insert("ratelimit-limit", HeaderValue::from(limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(reset_secs));
}

/// `Retry-After` and the `RateLimit-*` headers of a 429.
fn limit_headers(headers: &mut axum::http::HeaderMap, limit: u64, retry_after: u64) {
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    rate_limit_headers(headers, limit, 0, retry_after);
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, category, severity) = self.parts();
        let mut error = json!({
            "error": self.to_string(),
            "code": code,
            "category": category,
            "severity": severity,
        });
        match &self {
            Self::Validation { code, field, .. } => {
                error["field"] = json!(field);
                error["details"] = json!({ "code": code, "field": field });
            }
            Self::RateLimited { retry_after, .. } | Self::QuotaExceeded { retry_after, .. } => {
                error["retry_after"] = json!(retry_after)
            }
            _ => {}
        }
        let mut response =
            (status, Json(json!({ "success": false, "error": error }))).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="handover", error="invalid_token""#),
                );
            }
            // Every 429 says when to come back, and the limit it hit (for
            // the quota: records a day).
            Self::RateLimited {
                retry_after, limit, ..
            } => limit_headers(headers, u64::from(*limit), *retry_after),
            Self::QuotaExceeded { retry_after, quota } => {
                limit_headers(headers, *quota, *retry_after);
            }
            _ => {}
        }
        let internal = match &self {
            Self::Internal(e) | Self::CreationFailed(e) => Some(format!("{e:#}")),
            Self::Unauthorized(reason) => Some(format!("unauthorized: {reason}")),
            _ => None,
        };
        if let Some(text) = internal {
            response.extensions_mut().insert(InternalErrorText(text));
        }
        response.extensions_mut().insert(ErrorCode(code));
        response
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
