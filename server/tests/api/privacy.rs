//! `POST /api/privacy/export` (the one-call export) and `Idempotency-Key`
//! on create.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

async fn privacy_export(app: &TestApp, body: Option<&str>) -> Reply {
    app.raw(
        Method::POST,
        "/api/privacy/export",
        Some(&app.token),
        Some("company_123"),
        body,
    )
    .await
}

#[tokio::test]
async fn one_call_streams_every_data_type_as_a_json_attachment_and_audits_it() {
    let app = spawn_app().await;
    let r = privacy_export(&app, None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    assert!(r.header("content-type").starts_with("application/json"));
    assert_eq!(r.header("cache-control"), "no-store");
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    let id = r.header("x-export-id");
    assert!(id.starts_with("export_"), "{id}");
    assert_eq!(
        r.header("content-disposition"),
        format!("attachment; filename=\"{id}.json\""),
        "named as the export's download is"
    );
    let file: Value = serde_json::from_slice(&r.bytes).expect("the attachment is JSON");
    let all: Vec<String> = app.state.registry.all().map(|t| t.name.clone()).collect();
    assert_eq!(file["export"]["data_types"], json!(all));
    let payments = file["export"]["data"]["payment_history"]
        .as_array()
        .unwrap();
    let in_db = app
        .count("SELECT COUNT(*) FROM demo_payments WHERE user_id = 'user_456' AND company_id = 'company_123'")
        .await;
    assert!(in_db > 0);
    assert_eq!(payments.len() as i64, in_db);
    assert!(payments.iter().all(|p| p["user_id"] == "user_456"));

    // The export it was is recorded: completed, with the checksum of exactly
    // the bytes sent, no file kept, and its lifecycle in the audit log.
    let id = r.header("x-export-id").to_string();
    assert!(id.starts_with("export_"), "{id}");
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.status, 200);
    assert_eq!(d.body["data"]["status"], "completed");
    assert_eq!(d.body["data"]["delivery"], "direct");
    let sha: String = sqlx::query_scalar("SELECT sha256 FROM export_requests WHERE id = $1")
        .bind(&id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(sha, sha256_hex(&r.bytes));
    let dl = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!((dl.status.as_u16(), dl.code()), (409, "EXPORT_NOT_READY"));
    for action in ["export.created", "export.started", "export.completed"] {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM audit_log WHERE action = $1 AND resource = $2",
        )
        .bind(action)
        .bind(&id)
        .fetch_one(app.pool())
        .await
        .unwrap();
        assert_eq!(n, 1, "{action}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM export_files").await, 0);
}

#[tokio::test]
async fn one_call_narrows_by_format_and_types_and_refuses_bad_bodies() {
    let app = spawn_app().await;
    let r = privacy_export(
        &app,
        Some(r#"{"format":"csv","data_types":["user_profile"]}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").starts_with("text/csv"));
    assert!(r.header("content-disposition").ends_with(".csv\""));
    let text = String::from_utf8(r.bytes.clone()).unwrap();
    assert!(
        text.lines().skip(1).all(|l| l.starts_with("user_profile,")),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2, "{text}");

    for (body, status, code, field) in [
        (r#"{"format":"pdf"}"#, 422, "INVALID_FORMAT", "format"),
        (
            r#"{"data_types":["nope"]}"#,
            422,
            "INVALID_DATA_TYPE",
            "data_types[0]",
        ),
        (
            r#"{"data_types":[]}"#,
            422,
            "INVALID_DATA_TYPE",
            "data_types",
        ),
        (
            r#"{"export_format":"json"}"#,
            422,
            "UNKNOWN_FIELD",
            "export_format",
        ),
    ] {
        let r = privacy_export(&app, Some(body)).await;
        assert_eq!(
            (
                r.status.as_u16(),
                r.detail_code(),
                r.body["error"]["field"].as_str()
            ),
            (status, code, Some(field)),
            "{body}: {}",
            r.body
        );
    }
    let r = privacy_export(&app, Some("[1,2]")).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "INVALID_REQUEST"));
    let r = app
        .client
        .post(format!("{}/api/privacy/export", app.base))
        .bearer_auth(&app.token)
        .header("x-company-id", "company_123")
        .header("content-type", "text/plain")
        .body("format=csv")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UNSUPPORTED_MEDIA_TYPE");
    let r = app
        .raw(
            Method::POST,
            "/api/privacy/export",
            None,
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let reader = app
        .token_for("user_456", &["company_123"], &["audit:read"])
        .await;
    let r = app
        .raw(
            Method::POST,
            "/api/privacy/export",
            Some(&reader),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    // Refusals took no create slot: five creates still go through, the
    // sixth (of either kind) is limited.
    for _ in 0..4 {
        app.create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
    }
    let r = privacy_export(&app, None).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (429, "RATE_LIMIT_EXCEEDED"),
        "{}",
        r.body
    );
    assert!(!r.header("retry-after").is_empty());
}

#[tokio::test]
async fn one_call_works_with_another_data_type_config() {
    let app = spawn_with(
        Opts {
            config: Some(pomodoro_config()),
            ..Opts::default()
        },
        None,
    )
    .await;
    let r = privacy_export(&app, None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let file: Value = serde_json::from_slice(&r.bytes).unwrap();
    let names: Vec<String> = app.state.registry.all().map(|t| t.name.clone()).collect();
    assert!(!names.contains(&"payment_history".to_string()));
    assert_eq!(file["export"]["data_types"], json!(names));
    let total: usize = names
        .iter()
        .map(|n| file["export"]["data"][n].as_array().map_or(0, Vec::len))
        .sum();
    assert!(total > 0, "{file}");
}

async fn create_with_key(app: &TestApp, key: &str, body: &str) -> Reply {
    let r = app
        .client
        .post(format!("{}/api/data/export", app.base))
        .bearer_auth(&app.token)
        .header("x-company-id", "company_123")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap().to_vec();
    Reply {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        bytes,
    }
}

#[tokio::test]
async fn the_same_idempotency_key_gives_back_the_same_export_without_a_slot() {
    let app = spawn_app().await;
    let body = r#"{"export_format":"csv","data_types":["user_profile","payment_history"],"delivery":"client"}"#;
    let first = create_with_key(&app, "key-1", body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.header("idempotent-replayed"), "");
    let id = first.body["data"]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Retried (key order and spacing do not matter): the same export, its
    // manifest, and no new row or slot.
    let same = r#"{ "delivery": "client", "data_types": ["user_profile", "payment_history"], "export_format": "csv" }"#;
    for _ in 0..6 {
        let again = create_with_key(&app, "key-1", same).await;
        assert_eq!(again.status, 201, "{}", again.body);
        assert_eq!(again.header("idempotent-replayed"), "true");
        assert_eq!(again.body["data"]["request_id"], id.as_str());
        assert_eq!(
            again.body["data"]["manifest"],
            first.body["data"]["manifest"]
        );
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM export_requests").await, 1);
    let created: i64 = app
        .count("SELECT COUNT(*) FROM audit_log WHERE action = 'export.created'")
        .await;
    assert_eq!(created, 1);
    // A different body under the same key is refused, and says why.
    let other = create_with_key(
        &app,
        "key-1",
        r#"{"export_format":"json","data_types":["user_profile"]}"#,
    )
    .await;
    assert_eq!(
        (other.status.as_u16(), other.detail_code()),
        (422, "IDEMPOTENCY_KEY_REUSED"),
        "{}",
        other.body
    );
    // Four more creates fit in the hour: the replays took no slot.
    for i in 0..4 {
        let r = create_with_key(&app, &format!("k{i}"), body).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = create_with_key(&app, "k-last", body).await;
    assert_eq!(r.code(), "RATE_LIMIT_EXCEEDED");
    // A malformed key is a clear 400.
    let bad = create_with_key(&app, "", body).await;
    assert_eq!((bad.status.as_u16(), bad.code()), (400, "INVALID_REQUEST"));
    let long = "x".repeat(256);
    let bad = create_with_key(&app, &long, body).await;
    assert_eq!((bad.status.as_u16(), bad.code()), (400, "INVALID_REQUEST"));
    // The key belongs to its user: another user's create with it is theirs.
    assert_eq!(
        app.count("SELECT COUNT(*) FROM idempotency_keys WHERE user_id = 'user_456'")
            .await,
        5
    );
}

#[tokio::test]
async fn racing_creates_with_one_key_store_one_export() {
    let app = spawn_app().await;
    let body = r#"{"export_format":"json","data_types":["user_profile"]}"#;
    let replies =
        futures_util::future::join_all((0..8).map(|_| create_with_key(&app, "race", body))).await;
    let ids: std::collections::HashSet<String> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["data"]["request_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM export_requests").await, 1);
    let slots = app
        .count("SELECT COUNT(*) FROM rate_events WHERE bucket LIKE 'data_export:%'")
        .await;
    assert_eq!(slots, 1);
}

#[tokio::test]
async fn refused_creates_take_no_slot() {
    let app = spawn_with(
        Opts {
            max_export_bytes: Some(10),
            ..Opts::default()
        },
        None,
    )
    .await;
    for _ in 0..7 {
        let r = app
            .create(json!({"export_format": "json", "data_types": ["payment_history"]}))
            .await;
        assert_eq!(r.detail_code(), "FILE_TOO_LARGE", "{}", r.body);
    }
    assert_eq!(
        app.count("SELECT COUNT(*) FROM rate_events WHERE bucket LIKE 'data_export:%'")
            .await,
        0
    );
}

#[tokio::test]
async fn the_one_call_export_streams_compressed_to_the_end() {
    use std::io::Read as _;
    let app = spawn_app().await;
    for format in ["json", "csv", "xlsx"] {
        let r = app
            .client
            .post(format!("{}/api/privacy/export", app.base))
            .bearer_auth(&app.token)
            .header("x-company-id", "company_123")
            .header("accept-encoding", "gzip")
            .header("content-type", "application/json")
            .body(format!(r#"{{"format":"{format}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let gz = r
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = r.bytes().await.expect("the whole body arrives").to_vec();
        let plain = if gz.as_deref() == Some("gzip") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut out)
                .unwrap();
            out
        } else {
            bytes
        };
        match format {
            "json" => {
                serde_json::from_slice::<Value>(&plain).unwrap();
            }
            "csv" => assert!(plain.starts_with(b"data_type,")),
            _ => assert!(plain.starts_with(b"PK")),
        }
    }
}
