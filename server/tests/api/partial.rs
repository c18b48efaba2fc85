//! Partial success (a data type that cannot be read does not sink the
//! others) and the manual retry of failed and partial exports.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

async fn drain(app: &TestApp) {
    handover_server::jobs::drain(&app.state).await.unwrap();
}

#[tokio::test]
async fn a_type_that_cannot_be_read_leaves_a_partial_export_that_can_be_retried() {
    let app = spawn_app().await;
    let id = app
        .create_id(
            json!({"export_format": "json", "data_types": ["user_profile", "payment_history"]}),
        )
        .await;
    // The operator's table goes away between the request and the build.
    app.exec_plain("ALTER TABLE demo_payments RENAME TO demo_payments_away")
        .await;
    drain(&app).await;

    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    let data = &d.body["data"];
    assert_eq!(data["status"], "completed", "{data}");
    assert_eq!(data["outcome"], "partial");
    assert_eq!(
        data["data_type_outcomes"]["user_profile"]["status"],
        "completed"
    );
    assert_eq!(
        data["data_type_outcomes"]["payment_history"]["status"],
        "failed"
    );
    let reason = data["data_type_outcomes"]["payment_history"]["reason"]
        .as_str()
        .unwrap();
    assert!(
        !reason.contains("demo_payments"),
        "no internal detail: {reason}"
    );
    let list = app.call(Method::GET, "/api/data/export", None).await;
    let item = &list.body["data"]["requests"][0];
    assert_eq!(item["outcome"], "partial");
    assert_eq!(item["failed_data_types"][0]["data_type"], "payment_history");

    // The file holds what could be read, and says what it lacks.
    let file = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(file.status, 200);
    let export = &file.body["export"];
    assert_eq!(export["data_types"], json!(["user_profile"]));
    assert_eq!(export["data"]["user_profile"].as_array().unwrap().len(), 1);
    assert!(export["data"].get("payment_history").is_none());
    assert_eq!(
        file.body["metadata"]["failed_data_types"][0]["data_type"],
        "payment_history"
    );
    let completed: String = sqlx::query_scalar(
        "SELECT details FROM audit_log WHERE action = 'export.completed' AND resource = $1",
    )
    .bind(&id)
    .fetch_one(app.pool())
    .await
    .unwrap();
    let completed: Value = serde_json::from_str(&completed).unwrap();
    assert_eq!(completed["outcome"], "partial");
    assert_eq!(
        completed["failed_data_types"][0]["data_type"],
        "payment_history"
    );

    // Only the owner retries, and only what failed.
    let other = app
        .token_for("user_789", &["company_123"], &["data:export"])
        .await;
    let r = app
        .raw(
            Method::POST,
            &format!("/api/data/export/{id}/retry"),
            Some(&other),
            Some("company_123"),
            None,
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (404, "EXPORT_NOT_FOUND"));

    app.exec_plain("ALTER TABLE demo_payments_away RENAME TO demo_payments")
        .await;
    let r = app
        .call(Method::POST, &format!("/api/data/export/{id}/retry"), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["data"]["status"], "pending");
    assert_eq!(r.header("ratelimit-limit"), "5");
    drain(&app).await;
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "completed");
    assert_eq!(d.body["data"]["outcome"], "complete");
    let file = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    let payments = file.body["export"]["data"]["payment_history"]
        .as_array()
        .unwrap();
    assert!(!payments.is_empty());
    assert!(file.body["metadata"].get("failed_data_types").is_none());
    let retried = app
        .count("SELECT COUNT(*) FROM audit_log WHERE action = 'export.retried'")
        .await;
    assert_eq!(retried, 1);
    // A complete export has nothing to retry.
    let r = app
        .call(Method::POST, &format!("/api/data/export/{id}/retry"), None)
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (409, "EXPORT_NOT_RETRYABLE"));
}

#[tokio::test]
async fn a_failed_export_is_retried_and_retries_count_as_creates() {
    let app = spawn_app().await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["payment_history"]}))
        .await;
    app.exec_plain("ALTER TABLE demo_payments RENAME TO demo_payments_away")
        .await;
    drain(&app).await;
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "failed", "{}", d.body);
    app.exec_plain("ALTER TABLE demo_payments_away RENAME TO demo_payments")
        .await;
    let r = app
        .call(Method::POST, &format!("/api/data/export/{id}/retry"), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    drain(&app).await;
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "completed");
    // One create and one retry so far: three more fit in the hour.
    for _ in 0..3 {
        app.create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
    }
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.code(), "RATE_LIMIT_EXCEEDED");
}
