//! Completion notifications: signed (Standard Webhooks), retried, audited,
//! free of personal data; checked by a local receiver that verifies each
//! signature itself.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use hmac::Mac as _;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use handover_server::store::webhooks::Endpoint;

#[derive(Default)]
struct Received {
    /// (webhook-id, timestamp, signature, body)
    calls: Vec<(String, String, String, String)>,
    /// Answer 500 to this many calls first.
    fail_first: usize,
}

async fn receiver(state: Arc<Mutex<Received>>) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let state = state.clone();
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let mut s = state.lock().unwrap();
                s.calls.push((
                    h("webhook-id"),
                    h("webhook-timestamp"),
                    h("webhook-signature"),
                    body,
                ));
                if s.fail_first > 0 {
                    s.fail_first -= 1;
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook")
}

/// The receiver's own check, as the Standard Webhooks libraries do it.
fn verify(secret: &str, id: &str, ts: &str, sig: &str, body: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    sig.split(' ').any(|s| s == format!("v1,{expected}"))
}

/// An app whose failed deliveries are due again at once.
async fn spawn_without_backoff() -> TestApp {
    spawn_with(
        Opts {
            webhook_backoff: Some(std::time::Duration::ZERO),
            ..Opts::default()
        },
        None,
    )
    .await
}

async fn deliver(app: &TestApp) {
    // Deliveries due now, and the retries they schedule (backoff 0 here),
    // until nothing is due; bounded.
    for _ in 0..20 {
        if handover_server::webhooks::deliver_due(&app.state)
            .await
            .unwrap()
            == 0
        {
            return;
        }
    }
    panic!("deliveries kept coming");
}

#[tokio::test]
async fn completion_failure_and_expiry_are_notified_signed_and_retried() {
    let app = spawn_without_backoff().await;
    let got = Arc::new(Mutex::new(Received {
        fail_first: 1,
        ..Received::default()
    }));
    let url = receiver(got.clone()).await;
    let secret = handover_server::webhooks::new_secret();
    app.state
        .store
        .set_webhook(
            &Endpoint {
                company_id: "company_123".into(),
                url,
                secret: secret.clone(),
            },
            "tests",
        )
        .await
        .unwrap();

    let id = app
        .create_id(
            json!({"export_format": "csv", "data_types": ["user_profile", "payment_history"]}),
        )
        .await;
    handover_server::jobs::drain(&app.state).await.unwrap();
    deliver(&app).await;
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    let calls = got.lock().unwrap().calls.clone();
    assert_eq!(calls.len(), 2, "refused once, then delivered");
    assert_eq!(calls[0].0, calls[1].0, "a retry keeps its webhook-id");
    for (wid, ts, sig, body) in &calls {
        assert!(wid.starts_with("msg_"));
        assert!(verify(&secret, wid, ts, sig, body), "signature of {body}");
        assert!(!verify(
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            wid,
            ts,
            sig,
            body
        ));
    }
    let body: Value = serde_json::from_str(&calls[1].3).unwrap();
    assert_eq!(body["type"], "export.completed");
    assert_eq!(body["data"]["request_id"], id.as_str());
    assert_eq!(body["data"]["status"], "completed");
    assert_eq!(body["data"]["sha256"], d.body["data"]["sha256"]);
    assert_eq!(body["data"]["record_count"], d.body["data"]["record_count"]);
    // No personal data: no user id, no e-mail, no record values.
    let text = &calls[1].3;
    for personal in ["user_456", "@", "amount_cents"] {
        assert!(!text.contains(personal), "{personal} in {text}");
    }
    let attempts: Vec<String> = sqlx::query_scalar(
        "SELECT details FROM audit_log WHERE action = 'webhook.attempted' ORDER BY seq",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(
        attempts[0].contains("\"http_status\":500")
            && attempts[0].contains("\"outcome\":\"pending\""),
        "{}",
        attempts[0]
    );
    assert!(
        attempts[1].contains("\"outcome\":\"delivered\""),
        "{}",
        attempts[1]
    );

    // A failed export, and an expired one.
    let c = app
        .create(
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"}),
        )
        .await;
    let client_id = c.body["data"]["request_id"].as_str().unwrap().to_string();
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{client_id}/fail"),
            Some(json!({"reason": "cancelled"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.exec(
        "UPDATE export_requests SET expires_at = '2020-01-01T00:00:00.000Z' WHERE id = $1",
        &id,
    )
    .await;
    handover_server::jobs::sweep(&app.state).await.unwrap();
    deliver(&app).await;
    let calls = got.lock().unwrap().calls.clone();
    let types: Vec<(String, String)> = calls[2..]
        .iter()
        .map(|c| {
            let b: Value = serde_json::from_str(&c.3).unwrap();
            (
                b["type"].as_str().unwrap().to_string(),
                b["data"]["request_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        types,
        vec![
            ("export.failed".to_string(), client_id.clone()),
            ("export.expired".to_string(), id.clone())
        ]
    );
    assert!(calls[2..]
        .iter()
        .all(|(w, t, s, b)| verify(&secret, w, t, s, b)));
}

#[tokio::test]
async fn companies_without_a_webhook_get_none_and_a_dead_endpoint_is_given_up() {
    let app = spawn_without_backoff().await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["user_profile"]}))
        .await;
    handover_server::jobs::drain(&app.state).await.unwrap();
    assert_eq!(
        app.count("SELECT COUNT(*) FROM webhook_deliveries").await,
        0
    );
    // An endpoint that never answers 2xx: tried MAX_ATTEMPTS times, then failed.
    let got = Arc::new(Mutex::new(Received {
        fail_first: usize::MAX,
        ..Received::default()
    }));
    let url = receiver(got.clone()).await;
    app.state
        .store
        .set_webhook(
            &Endpoint {
                company_id: "company_123".into(),
                url,
                secret: handover_server::webhooks::new_secret(),
            },
            "tests",
        )
        .await
        .unwrap();
    app.exec(
        "UPDATE export_requests SET expires_at = '2020-01-01T00:00:00.000Z' WHERE id = $1",
        &id,
    )
    .await;
    handover_server::jobs::sweep(&app.state).await.unwrap();
    deliver(&app).await;
    assert_eq!(
        got.lock().unwrap().calls.len() as i64,
        handover_server::webhooks::MAX_ATTEMPTS
    );
    let status: String = sqlx::query_scalar("SELECT status FROM webhook_deliveries")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(status, "failed");
}

#[tokio::test]
async fn signing_secrets_are_stored_sealed_and_old_clear_ones_are_sealed_at_start() {
    let app = spawn_app().await;
    let secret = handover_server::webhooks::new_secret();
    let endpoint = |company: &str, secret: &str| Endpoint {
        company_id: company.into(),
        url: "https://hooks.example/handover".into(),
        secret: secret.into(),
    };
    app.state
        .store
        .set_webhook(&endpoint("company_123", &secret), "tests")
        .await
        .unwrap();
    let stored = |company: &'static str| {
        let pool = app.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT secret FROM webhooks WHERE company_id = $1")
                .bind(company)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let sealed = stored("company_123").await;
    assert!(sealed.starts_with("sealed:v1:"), "{sealed}");
    assert!(!sealed.contains(secret.trim_start_matches("whsec_")));
    let read = app
        .state
        .store
        .webhook("company_123")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.secret, secret, "the deliverer reads it back");

    // A secret an older version kept in clear is sealed when the server
    // starts, and reads back the same.
    let old = handover_server::webhooks::new_secret();
    sqlx::query(
        "INSERT INTO webhooks (company_id, url, secret, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind("company_456")
    .bind("https://hooks.example/old")
    .bind(&old)
    .bind("2025-01-01T00:00:00.000Z")
    .execute(app.pool())
    .await
    .unwrap();
    assert_eq!(
        app.state.store.seal_clear_webhook_secrets().await.unwrap(),
        1
    );
    assert!(stored("company_456").await.starts_with("sealed:v1:"));
    let read = app
        .state
        .store
        .webhook("company_456")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.secret, old);

    // Sealed for one company, it does not open for another.
    sqlx::query("UPDATE webhooks SET secret = $1 WHERE company_id = 'company_456'")
        .bind(&sealed)
        .execute(app.pool())
        .await
        .unwrap();
    assert!(app.state.store.webhook("company_456").await.is_err());
}

#[tokio::test]
async fn a_secret_that_does_not_open_fails_its_own_deliveries_not_the_others() {
    let app = spawn_without_backoff().await;
    let got = Arc::new(Mutex::new(Received::default()));
    let url = receiver(got.clone()).await;
    for company in ["company_123", "company_456"] {
        app.state
            .store
            .set_webhook(
                &Endpoint {
                    company_id: company.into(),
                    url: url.clone(),
                    secret: handover_server::webhooks::new_secret(),
                },
                "tests",
            )
            .await
            .unwrap();
    }
    // company_456's stored secret is company_123's sealed one: it does not
    // open for company_456 (as after a master key change).
    sqlx::query(
        "UPDATE webhooks SET secret = (SELECT secret FROM webhooks WHERE company_id = 'company_123') \
         WHERE company_id = 'company_456'",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let at = "2020-01-01T00:00:00.000Z";
    for (id, company) in [("msg_bad", "company_456"), ("msg_good", "company_123")] {
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, company_id, event_type, payload, status, attempts, next_attempt_at, created_at) \
             VALUES ($1, $2, 'export.completed', '{}', 'pending', 0, $3, $3)",
        )
        .bind(id)
        .bind(company)
        .bind(at)
        .execute(app.pool())
        .await
        .unwrap();
    }
    deliver(&app).await;
    let calls = got.lock().unwrap().calls.clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "msg_good");
    let (status, attempts): (String, i64) =
        sqlx::query_as("SELECT status, attempts FROM webhook_deliveries WHERE id = 'msg_bad'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), attempts),
        ("failed", handover_server::webhooks::MAX_ATTEMPTS)
    );
}
