//! Every documented error code, health, metrics and the OpenAPI document.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn health_metrics_and_openapi_match_the_server() {
    let app = spawn_app().await;
    let h = app.raw(Method::GET, "/healthz", None, None, None).await;
    assert_eq!(
        (h.status.as_u16(), h.body["status"].as_str()),
        (200, Some("ok"))
    );
    assert!(!h.header("x-request-id").is_empty());
    app.create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    handover_server::jobs::drain(&app.state).await.unwrap();
    let m = app.raw(Method::GET, "/metrics", None, None, None).await;
    let text = String::from_utf8(m.bytes).unwrap();
    assert!(text.contains("handover_exports_created_total 1"), "{text}");
    assert!(text.contains("handover_exports_completed_total 1"));
    assert!(text.contains("handover_http_requests_total{class=\"2xx\"}"));

    let doc = app
        .raw(Method::GET, "/api/openapi.json", None, None, None)
        .await;
    assert_eq!(doc.status, 200);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc.body["paths"].as_object().unwrap();
    let mut documented = HashSet::new();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected: HashSet<String> = [
        "POST /api/data/export",
        "POST /api/privacy/export",
        "GET /api/data/export",
        "GET /api/data/export/{id}",
        "DELETE /api/data/export/{id}",
        "GET /api/data/export/{id}/download",
        "POST /api/data/export/{id}/retry",
        "POST /api/data/export/{id}/complete",
        "POST /api/data/export/{id}/fail",
        "GET /api/data/export/{id}/copy",
        "PATCH /api/data/export/{id}/copy",
        "POST /api/data/export/{id}/copy/complete",
        "GET /api/data/export/{id}/records/{data_type}",
        "GET /api/data/export/{id}/records/{data_type}/stream",
        "GET /api/data/summary",
        "GET /api/audit",
        "GET /healthz",
        "GET /metrics",
        "GET /api/openapi.json",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, expected);
    // Every documented operation is really served (not the 404/405 fallbacks).
    for op in &documented {
        let (method, path) = op.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "export_0")
            .replace("{data_type}", "user_profile");
        let r = app
            .raw(method.parse().unwrap(), &path, None, None, Some("{}"))
            .await;
        assert!(
            !["NOT_FOUND", "METHOD_NOT_ALLOWED"].contains(&r.code()),
            "{op} is documented but not routed"
        );
    }
}

#[tokio::test]
async fn every_documented_error_code_is_reachable() {
    let app = spawn_app().await;
    let t = app.token.clone();
    let post = |body: &'static str| {
        app.raw(
            Method::POST,
            "/api/data/export",
            Some(&t),
            Some("company_123"),
            Some(body),
        )
    };
    for body in ["{bad json", "", "[1,2]", "\"text\""] {
        let r = post(body).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (400, "INVALID_REQUEST"),
            "{body:?}"
        );
        assert_eq!(r.body["success"], false);
        assert_eq!(r.body["error"]["category"], "validation");
        assert!(r.body["error"]["severity"].is_string());
        assert!(r.body["error"]["error"].is_string());
    }
    let cases = [
        (
            json!({"data_types": ["user_profile"]}),
            "INVALID_FORMAT",
            "export_format",
        ),
        (
            json!({"export_format": "pdf", "data_types": ["user_profile"]}),
            "INVALID_FORMAT",
            "export_format",
        ),
        (
            json!({"export_format": 5, "data_types": ["user_profile"]}),
            "INVALID_FORMAT",
            "export_format",
        ),
        (
            json!({"export_format": "json"}),
            "INVALID_DATA_TYPE",
            "data_types",
        ),
        (
            json!({"export_format": "json", "data_types": []}),
            "INVALID_DATA_TYPE",
            "data_types",
        ),
        (
            json!({"export_format": "json", "data_types": "user_profile"}),
            "INVALID_DATA_TYPE",
            "data_types",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile", "secrets"]}),
            "INVALID_DATA_TYPE",
            "data_types[1]",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile", "user_profile"]}),
            "INVALID_DATA_TYPE",
            "data_types[1]",
        ),
        (
            json!({"export_format": "json", "data_types": [3]}),
            "INVALID_DATA_TYPE",
            "data_types[0]",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "date_range_start": "yesterday"}),
            "DATE_RANGE_INVALID",
            "date_range_start",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "date_range_end": 20250101}),
            "DATE_RANGE_INVALID",
            "date_range_end",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "date_range_start": "2025-02-01T00:00:00Z", "date_range_end": "2025-01-01T00:00:00Z"}),
            "DATE_RANGE_INVALID",
            "date_range_start",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "metadata": "x"}),
            "INVALID_METADATA",
            "metadata",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "metadata": {"a": "x".repeat(5000)}}),
            "INVALID_METADATA",
            "metadata",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "pigeon"}),
            "INVALID_DELIVERY",
            "delivery",
        ),
        (
            json!({"export_format": "json", "data_types": ["user_profile"], "colour": "red"}),
            "UNKNOWN_FIELD",
            "colour",
        ),
    ];
    for (body, code, field) in cases {
        let r = app.create(body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {}", r.body);
        assert_eq!(r.code(), "VALIDATION_ERROR");
        assert_eq!(
            (r.detail_code(), r.body["error"]["field"].as_str().unwrap()),
            (code, field),
            "{body}"
        );
    }
    // Auth and scope.
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            None,
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (401, "UNAUTHORIZED"));
    assert!(r.header("www-authenticate").starts_with("Bearer"));
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some("hov_nope_nope"),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some("not.a.jwt"),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let auditor = app
        .token_for("user_456", &["company_123"], &["audit:read"])
        .await;
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some(&auditor),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "INSUFFICIENT_PERMISSIONS")
    );
    let r = app
        .raw(Method::GET, "/api/data/export", Some(&t), None, None)
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "MISSING_COMPANY_ID"));
    let r = app
        .raw(
            Method::GET,
            "/api/data/export",
            Some(&t),
            Some("company_789"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "COMPANY_ACCESS_DENIED")
    );
    // Not found, routes, methods, sizes.
    for path in [
        "/api/data/export/export_ffffffffffffffffffffffff",
        "/api/data/export/../../etc",
        "/api/data/export/%00",
        "/api/data/export/DROP%20TABLE",
    ] {
        let r = app.call(Method::GET, path, None).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(
            ["EXPORT_NOT_FOUND", "NOT_FOUND"].contains(&r.code()),
            "{path}: {}",
            r.body
        );
    }
    let r = app.call(Method::GET, "/api/nothing/here", None).await;
    assert_eq!((r.status.as_u16(), r.code()), (404, "NOT_FOUND"));
    let r = app.call(Method::PUT, "/api/data/export", None).await;
    assert_eq!((r.status.as_u16(), r.code()), (405, "METHOD_NOT_ALLOWED"));
    let big = format!("{{\"export_format\":\"json\",\"data_types\":[\"user_profile\"],\"metadata\":{{\"a\":\"{}\"}}}}", "x".repeat(100_000));
    let r = app
        .raw(
            Method::POST,
            "/api/data/export",
            Some(&t),
            Some("company_123"),
            Some(&big),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (413, "PAYLOAD_TOO_LARGE"));
    // A body declared as something other than JSON.
    let r = app
        .client
        .post(format!("{}/api/data/export", app.base))
        .bearer_auth(&t)
        .header("x-company-id", "company_123")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("export_format=json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UNSUPPORTED_MEDIA_TYPE");
    assert_eq!(body["success"], false);
    // Rate limit.
    for _ in 0..5 {
        app.create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
    }
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (429, "RATE_LIMIT_EXCEEDED"));
    assert_eq!(r.body["error"]["category"], "rate_limit");
}

#[tokio::test]
async fn creation_failed_when_the_operators_query_breaks() {
    let config = default_config().replace("FROM demo_payments WHERE", "FROM no_such_table WHERE");
    let app = spawn_with(
        Opts {
            config: Some(config),
            ..Opts::default()
        },
        None,
    )
    .await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (500, "CREATION_FAILED"));
    assert_eq!(
        r.body["error"]["error"], "failed to create export",
        "internal text is not sent"
    );
    assert!(!r.body.to_string().contains("no_such_table"));
}

#[tokio::test]
async fn file_too_large_and_quota_exceeded_are_reachable() {
    let app = spawn_with(
        Opts {
            max_export_bytes: Some(4096),
            ..Opts::default()
        },
        None,
    )
    .await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.status, 201, "a small export fits");
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code(), r.detail_code()),
        (422, "VALIDATION_ERROR", "FILE_TOO_LARGE"),
        "{}",
        r.body
    );
    assert!(r.body["error"]["error"]
        .as_str()
        .unwrap()
        .contains("reduce the date range"));

    let app = spawn_with(
        Opts {
            daily_record_quota: Some(100),
            ..Opts::default()
        },
        None,
    )
    .await;
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert!(payments > 50 && payments < 100);
    app.create_id(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"]}))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (429, "QUOTA_EXCEEDED"),
        "{}",
        r.body
    );
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!(
        (86_000..=86_400).contains(&retry),
        "space frees up in a day: {retry}"
    );
    // Like every 429: the limit it hit, none left, and when it resets.
    assert!(r.header("ratelimit-limit").parse::<u64>().unwrap() > 0);
    assert_eq!(r.header("ratelimit-remaining"), "0");
    assert_eq!(r.header("ratelimit-reset"), retry.to_string());
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.status, 201, "what still fits the quota is allowed");
}

#[tokio::test]
async fn an_unauthenticated_body_is_never_waited_for() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // A body of 60,000 bytes is announced; only 10 are sent, and never the rest.
    s.write_all(
        b"POST /api/data/export HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Company-ID: company_123\r\nContent-Length: 60000\r\n\r\n{\"export_f",
    )
    .await
    .unwrap();
    // The answer comes without the body: authentication came first.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("the server answered without waiting for the body")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
}

#[tokio::test]
async fn a_cors_preflight_is_answered_with_a_request_id_too() {
    let app = spawn_with(
        Opts {
            cors_origins: vec!["http://app.example".into()],
            ..Opts::default()
        },
        None,
    )
    .await;
    let r = app
        .client
        .request(Method::OPTIONS, format!("{}/api/data/export", app.base))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,x-company-id,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let id = r.headers()["x-request-id"].to_str().unwrap();
    assert!(id.starts_with("req_"), "{id}");
    // An ordinary answer keeps the id the middleware gave it (the envelope's).
    let r = app.call(Method::GET, "/api/data/summary", None).await;
    assert_eq!(r.header("x-request-id"), r.body["meta"]["requestId"]);
}
