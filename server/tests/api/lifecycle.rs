//! The export lifecycle through the API: create, pages, complete, fail, list, delete, server builds.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn create_answers_with_the_seeds_fields_and_envelope() {
    let app = spawn_app().await;
    let r = app
        .create(json!({
            "export_format": "json",
            "data_types": ["user_profile", "payment_history", "membership_data"],
            "date_range_start": "2024-01-01T00:00:00Z",
            "date_range_end": "2025-10-25T19:50:00Z",
            "metadata": { "purpose": "gdpr_request", "contact_email": "user@example.com" }
        }))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["success"], true);
    let d = &r.body["data"];
    assert!(d["request_id"].as_str().unwrap().starts_with("export_"));
    assert_eq!(d["status"], "pending");
    assert_eq!(d["export_format"], "json");
    assert_eq!(
        d["data_types"],
        json!(["user_profile", "payment_history", "membership_data"])
    );
    // Echoed as sent, as the API reference shows; the queries below still
    // filter on the instants.
    assert_eq!(
        d["date_range"],
        json!({"start": "2024-01-01T00:00:00Z", "end": "2025-10-25T19:50:00Z"})
    );
    assert_eq!(
        d["metadata"],
        json!({ "purpose": "gdpr_request", "contact_email": "user@example.com" })
    );
    let in_range: i64 = app
        .count(&format!(
            "SELECT (SELECT COUNT(*) FROM demo_users WHERE id='user_456' AND company_id='company_123') \
             + (SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123' \
                AND {}) \
             + (SELECT COUNT(*) FROM demo_memberships WHERE user_id='user_456' AND company_id='company_123' \
                AND {})",
            between("created_at", "2024-01-01T00:00:00Z", "2025-10-25T19:50:00Z"),
            between("started_at", "2024-01-01T00:00:00Z", "2025-10-25T19:50:00Z"),
        ))
        .await;
    assert_eq!(d["estimated_records"], in_range);
    assert!(d["estimated_size_mb"].as_f64().unwrap() > 0.0);
    let created = handover::model::parse_timestamp(d["created_at"].as_str().unwrap()).unwrap();
    let expires = handover::model::parse_timestamp(d["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - created, time::Duration::days(30));
    let meta = &r.body["meta"];
    assert!(meta["requestId"].as_str().unwrap().starts_with("req_"));
    assert_eq!(meta["requestId"], r.header("x-request-id"));
    assert_eq!(meta["version"], "1.0.0");
    assert!(meta["processingTimeMs"].is_u64());
    assert!(handover::model::parse_timestamp(meta["timestamp"].as_str().unwrap()).is_some());
    assert!(
        d.get("manifest").is_none(),
        "server delivery has no manifest"
    );
}

#[tokio::test]
async fn a_plain_date_end_follows_a_time_of_the_same_day() {
    let app = spawn_app().await;
    let body = |start: &str, end: &str| {
        json!({"export_format": "json", "data_types": ["payment_history"],
               "date_range_start": start, "date_range_end": end})
    };
    let r = app.create(body("2025-01-02T10:00Z", "2025-01-02")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = app.create(body("2025-01-03", "2025-01-02T23:00Z")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["error"]["details"]["code"], "DATE_RANGE_INVALID");
}

#[tokio::test]
async fn a_date_range_is_echoed_as_sent_and_filters_on_its_instants() {
    let app = spawn_app().await;
    let body = |start: &str, end: &str| {
        json!({"export_format": "json", "data_types": ["payment_history"], "delivery": "client",
               "date_range_start": start, "date_range_end": end})
    };
    let given = app
        .create(body("2024-01-01", "2025-10-25T21:50:00+02:00"))
        .await;
    assert_eq!(given.status, 201, "{}", given.body);
    let d = &given.body["data"];
    assert_eq!(
        d["date_range"],
        json!({"start": "2024-01-01", "end": "2025-10-25T21:50:00+02:00"})
    );
    // The same instants written canonically select the same records, and
    // the file states them canonically either way.
    let canonical = app
        .create(body("2024-01-01T00:00:00.000Z", "2025-10-25T19:50:00.000Z"))
        .await;
    assert_eq!(canonical.status, 201, "{}", canonical.body);
    let c = &canonical.body["data"];
    assert_eq!(d["estimated_records"], c["estimated_records"]);
    // ISO 8601 without seconds, too.
    let minutes = app
        .create(body("2024-01-01T00:00Z", "2025-10-25T19:50Z"))
        .await;
    assert_eq!(minutes.status, 201, "{}", minutes.body);
    let m = &minutes.body["data"];
    assert_eq!(m["date_range"]["start"], "2024-01-01T00:00Z");
    assert_eq!(m["estimated_records"], c["estimated_records"]);
    let instants = json!({"start": "2024-01-01T00:00:00.000Z", "end": "2025-10-25T19:50:00.000Z"});
    assert_eq!(d["export_info"]["date_range"], instants);
    assert_eq!(c["export_info"]["date_range"], instants);
    // A plain date as the end covers that whole day.
    let days = app.create(body("2024-01-01", "2025-10-25")).await;
    assert_eq!(days.status, 201, "{}", days.body);
    let whole_day = app
        .create(body("2024-01-01", "2025-10-25T23:59:59.999Z"))
        .await;
    assert_eq!(whole_day.status, 201, "{}", whole_day.body);
    let (days, whole_day) = (&days.body["data"], &whole_day.body["data"]);
    assert_eq!(
        days["export_info"]["date_range"]["end"],
        "2025-10-25T23:59:59.999999Z"
    );
    assert_eq!(days["estimated_records"], whole_day["estimated_records"]);
    let id = d["request_id"].as_str().unwrap();
    let details = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(details.body["data"]["date_range"], d["date_range"]);
}

#[tokio::test]
async fn server_export_is_built_encrypted_and_downloadable() {
    let app = spawn_app().await;
    let id = app
        .create_id(
            json!({"export_format": "xlsx", "data_types": ["payment_history", "consent_data"]}),
        )
        .await;
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "EXPORT_NOT_READY"),
        "{}",
        r.body
    );
    assert_eq!(r.body["error"]["category"], "validation");
    assert_eq!(r.body["error"]["severity"], "medium");

    handover_server::jobs::drain(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "completed", "{}", d.body);
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert_eq!(d.body["data"]["record_count"], payments + 1);
    assert_eq!(d.body["data"]["progress"]["percentage"], 100);

    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition"),
        format!("attachment; filename=\"{id}.xlsx\"")
    );
    assert_eq!(
        r.header("content-type"),
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    );
    assert_eq!(
        sha256_hex(&r.bytes),
        d.body["data"]["sha256"].as_str().unwrap(),
        "checksum recorded = checksum served"
    );
    assert_eq!(
        r.bytes.len() as u64,
        d.body["data"]["byte_size"].as_u64().unwrap()
    );
    use calamine::Reader;
    let mut wb: calamine::Xlsx<_> =
        calamine::open_workbook_from_rs(std::io::Cursor::new(r.bytes.clone())).unwrap();
    assert_eq!(
        wb.sheet_names(),
        ["Summary", "payment_history", "consent_data"]
    );
    assert_eq!(
        wb.worksheet_range("payment_history").unwrap().height() as i64,
        payments + 1
    );

    // At rest the files are ciphertext.
    let mut plain_found = false;
    let stored = app.stored_files().await;
    assert_eq!(stored.len(), 2, "the file and its frames");
    for bytes in stored {
        assert!(bytes.starts_with(b"HOV1"));
        plain_found |= bytes.windows(11).any(|w| w == b"payment_123");
    }
    assert!(!plain_found, "no plaintext record in the stored files");

    // The same export as JSON and CSV.
    let j = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download?format=json"),
            None,
        )
        .await;
    assert_eq!(j.status, 200);
    assert_eq!(j.body["export"]["request_id"], id.as_str());
    assert_eq!(
        j.body["export"]["data"]["payment_history"]
            .as_array()
            .unwrap()
            .len() as i64,
        payments
    );
    assert!(
        j.body["metadata"]["article_15"]["purposes"].is_string(),
        "Art. 15 information is stated"
    );
    let c = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download?format=csv"),
            None,
        )
        .await;
    assert_eq!(c.status, 200);
    assert_eq!(
        c.header("content-disposition"),
        format!("attachment; filename=\"{id}.csv\"")
    );
    let text = String::from_utf8(c.bytes).unwrap();
    assert!(text.starts_with("data_type,id,user_id,"));
    assert_eq!(text.lines().count() as i64, 1 + payments + 1);
    let bad = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download?format=pdf"),
            None,
        )
        .await;
    assert_eq!(
        (bad.status.as_u16(), bad.detail_code()),
        (422, "INVALID_FORMAT")
    );

    let events: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE resource = $1 AND outcome = 'event' ORDER BY seq",
    )
    .bind(&id)
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        events[..3],
        ["export.created", "export.started", "export.completed"]
    );
    assert!(events.iter().filter(|e| *e == "export.downloaded").count() >= 3);
}

#[tokio::test]
async fn client_export_pages_complete_and_progress() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"export_format": "csv", "data_types": ["payment_history", "membership_data"], "delivery": "client"}))
        .await;
    assert_eq!(r.status, 201);
    let id = r.body["data"]["request_id"].as_str().unwrap().to_string();
    let m = &r.body["data"]["manifest"];
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert_eq!(m["payment_history"]["records"], payments);
    assert_eq!(
        m["payment_history"]["columns"][3],
        json!({"name": "amount_cents", "kind": "integer"})
    );
    assert_eq!(
        m["payment_history"]["records_url"],
        format!("/api/data/export/{id}/records/payment_history")
    );

    // One page in: details show real progress.
    let p = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/records/payment_history?limit=10"),
            None,
        )
        .await;
    assert_eq!(p.body["data"]["rows"].as_array().unwrap().len(), 10);
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "processing");
    assert_eq!(d.body["data"]["progress"]["records_processed"], 10);
    assert_eq!(
        d.body["data"]["progress"]["current_type"],
        "payment_history"
    );
    assert!(d.body["data"]["started_at"].is_string());
    // Retrying that page is not counted twice.
    app.call(
        Method::GET,
        &format!("/api/data/export/{id}/records/payment_history?limit=10"),
        None,
    )
    .await;
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["progress"]["records_processed"], 10);

    let early = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(json!({"record_count": 10, "byte_size": 5, "sha256": "a".repeat(64)})),
        )
        .await;
    assert_eq!(
        (early.status.as_u16(), early.detail_code()),
        (422, "EXPORT_INCOMPLETE")
    );

    let all = fetch_all(&app, &id, &["payment_history", "membership_data"], 7).await;
    let ids: Vec<&str> = all[0].1.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "stable keyset order, no duplicates");
    assert_eq!(ids.len() as i64, payments);
    assert!(
        all[1].1.iter().all(|m| m["recovery_cases"].is_array()),
        "nested arrays arrive as JSON"
    );
    let total = (all[0].1.len() + all[1].1.len()) as u64;

    let wrong = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(json!({"record_count": total + 1, "byte_size": 100, "sha256": "b".repeat(64)})),
        )
        .await;
    assert_eq!(
        (wrong.status.as_u16(), wrong.detail_code()),
        (422, "RECORD_COUNT_MISMATCH")
    );
    let bad_sum = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(json!({"record_count": total, "byte_size": 100, "sha256": "xyz"})),
        )
        .await;
    assert_eq!(bad_sum.detail_code(), "INVALID_CHECKSUM");
    let sha = "c".repeat(64);
    let ok = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(json!({"record_count": total, "byte_size": 4242, "sha256": sha})),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["data"]["status"], "completed");
    assert_eq!(ok.body["data"]["sha256"], sha.as_str());
    assert_eq!(ok.body["data"]["progress"]["percentage"], 100);
    let after = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/records/payment_history"),
            None,
        )
        .await;
    assert_eq!(
        (after.status.as_u16(), after.code()),
        (409, "EXPORT_NOT_OPEN")
    );
    let dl = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(
        dl.code(),
        "EXPORT_NOT_READY",
        "the browser built it; the server keeps no copy"
    );
    let details: String = sqlx::query_scalar(
        "SELECT details FROM audit_log WHERE resource = $1 AND action = 'export.completed'",
    )
    .bind(&id)
    .fetch_one(app.pool())
    .await
    .unwrap();
    let details: Value = serde_json::from_str(&details).unwrap();
    assert_eq!(details["sha256"], sha.as_str());
    assert_eq!(details["record_count"], total);
}

#[tokio::test]
async fn pages_apply_the_date_range_and_validate_their_parameters() {
    let app = spawn_app().await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"], "delivery": "client",
                       "date_range_start": "2024-01-02T00:00:00Z", "date_range_end": "2024-01-03T00:00:00+00:00"}))
        .await;
    let id = r.body["data"]["request_id"].as_str().unwrap().to_string();
    let all = fetch_all(&app, &id, &["payment_history"], 5000).await;
    assert_eq!(
        all[0].1.len() as u64,
        r.body["data"]["manifest"]["payment_history"]["records"]
            .as_u64()
            .unwrap()
    );
    for rec in &all[0].1 {
        let t = rec["created_at"].as_str().unwrap();
        assert!(
            ("2024-01-02".."2024-01-03T00:00:00.001").contains(&t),
            "{t}"
        );
    }
    for (q, code) in [
        ("limit=0", "INVALID_LIMIT"),
        ("limit=5001", "INVALID_LIMIT"),
        ("limit=x", "INVALID_LIMIT"),
        ("cursor=%%%", "INVALID_CURSOR"),
        ("cursor=bm9wZQ", "INVALID_CURSOR"),
    ] {
        let r = app
            .call(
                Method::GET,
                &format!("/api/data/export/{id}/records/payment_history?{q}"),
                None,
            )
            .await;
        assert_eq!(
            (r.status.as_u16(), r.detail_code()),
            (422, code),
            "{q}: {}",
            r.body
        );
    }
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/records/user_profile"),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.detail_code()),
        (422, "INVALID_DATA_TYPE"),
        "only the request's types"
    );
}

#[tokio::test]
async fn list_pages_filters_and_validates() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for f in ["json", "csv", "xlsx"] {
        ids.push(
            app.create_id(json!({"export_format": f, "data_types": ["user_profile"]}))
                .await,
        );
    }
    handover_server::jobs::drain(&app.state).await.unwrap();
    ids.push(
        app.create_id(
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"}),
        )
        .await,
    );
    let r = app
        .call(Method::GET, "/api/data/export?limit=2&offset=0", None)
        .await;
    assert_eq!(r.status, 200);
    let d = &r.body["data"];
    assert_eq!(
        (
            d["total"].as_u64(),
            d["page"].as_u64(),
            d["limit"].as_u64(),
            d["hasMore"].as_bool()
        ),
        (Some(4), Some(1), Some(2), Some(true))
    );
    assert_eq!(
        d["requests"][0]["request_id"],
        ids[3].as_str(),
        "newest first"
    );
    let r = app
        .call(Method::GET, "/api/data/export?limit=2&offset=2", None)
        .await;
    assert_eq!(
        (
            r.body["data"]["page"].as_u64(),
            r.body["data"]["hasMore"].as_bool()
        ),
        (Some(2), Some(false))
    );
    let r = app
        .call(Method::GET, "/api/data/export?status=completed", None)
        .await;
    let reqs = r.body["data"]["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 3);
    let item = &reqs[0];
    for field in [
        "request_id",
        "status",
        "export_format",
        "data_types",
        "created_at",
        "completed_at",
        "expires_at",
        "download_url",
        "file_size_mb",
        "record_count",
        "metadata",
    ] {
        assert!(item.get(field).is_some(), "list item has {field}");
    }
    let mb = item["file_size_mb"].as_f64().unwrap();
    assert!(
        mb > 0.0 && mb < 0.01,
        "a one-record file does not read as empty: {mb}"
    );
    assert_eq!(
        item["download_url"],
        format!(
            "/api/data/export/{}/download",
            item["request_id"].as_str().unwrap()
        )
    );
    assert_eq!(r.body["data"]["limit"], 50, "default limit");
    for (q, code) in [
        ("limit=0", "INVALID_LIMIT"),
        ("limit=101", "INVALID_LIMIT"),
        ("limit=ten", "INVALID_LIMIT"),
        ("offset=-1", "INVALID_OFFSET"),
        ("status=done", "INVALID_STATUS"),
    ] {
        let r = app
            .call(Method::GET, &format!("/api/data/export?{q}"), None)
            .await;
        assert_eq!((r.status.as_u16(), r.detail_code()), (422, code), "{q}");
        assert_eq!(r.code(), "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn delete_destroys_the_export_and_its_files() {
    let app = spawn_app().await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["payment_history"]}))
        .await;
    handover_server::jobs::drain(&app.state).await.unwrap();
    assert_eq!(
        app.stored_files().await.len(),
        2,
        "csv + the frames for conversions"
    );
    let r = app
        .call(Method::DELETE, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["request_id"], id.as_str());
    assert_eq!(r.body["data"]["deleted"], true);
    assert!(
        handover::model::parse_timestamp(r.body["data"]["deleted_at"].as_str().unwrap()).is_some()
    );
    assert_eq!(
        app.stored_files().await.len(),
        0,
        "no bytes survive the delete"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM export_files").await,
        0,
        "data keys destroyed"
    );
    for m in [Method::GET, Method::DELETE] {
        let r = app.call(m, &format!("/api/data/export/{id}"), None).await;
        assert_eq!((r.status.as_u16(), r.code()), (404, "EXPORT_NOT_FOUND"));
    }
}

#[tokio::test]
async fn fail_marks_an_open_client_export_failed() {
    let app = spawn_app().await;
    let id = app
        .create_id(
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"}),
        )
        .await;
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/fail"),
            Some(json!({"reason": ""})),
        )
        .await;
    assert_eq!(r.detail_code(), "INVALID_REASON");
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/fail"),
            Some(json!({"reason": "cancelled"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["status"], "failed");
    assert_eq!(r.body["data"]["failure_reason"], "cancelled");
    let again = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/fail"),
            Some(json!({"reason": "x"})),
        )
        .await;
    assert_eq!(
        (again.status.as_u16(), again.code()),
        (409, "EXPORT_NOT_OPEN")
    );
}

#[tokio::test]
async fn summary_counts_the_callers_records() {
    let app = spawn_app().await;
    let r = app.call(Method::GET, "/api/data/summary", None).await;
    assert_eq!(r.status, 200);
    let types = r.body["data"]["data_types"].as_array().unwrap();
    let names: Vec<&str> = types
        .iter()
        .map(|t| t["data_type"].as_str().unwrap())
        .collect();
    assert_eq!(names, handover::model::STANDARD_DATA_TYPES);
    let payments = app.count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'").await;
    assert_eq!(types[1]["records"], payments);
    assert_eq!(
        types[1]["description"],
        "All payment transactions and attempts"
    );
    assert_eq!(types[0]["records"], 1);
}

#[tokio::test]
async fn a_failing_server_build_is_retried_once_then_failed() {
    let config = broken_type_config();
    let app = spawn_with(
        Opts {
            config: Some(config),
            ..Opts::default()
        },
        None,
    )
    .await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["broken"]}))
        .await;
    // (With a type that can be read beside it, it would complete partially:
    // see partial.rs.)
    handover_server::jobs::drain(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "failed", "{}", d.body);
    let attempts: i64 = sqlx::query_scalar("SELECT attempts FROM export_requests WHERE id = $1")
        .bind(&id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(attempts, 2, "retried once");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM export_files").await,
        0,
        "no partial file left"
    );
}

#[tokio::test]
async fn an_interrupted_server_build_is_requeued_once_then_failed() {
    let app = spawn_app().await;
    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["user_profile"]}))
        .await;
    // As if a server died mid-build: processing, attempt 1, long idle.
    sqlx::query("UPDATE export_requests SET status = 'processing', attempts = 1, last_activity_at = '2020-01-01T00:00:00.000Z' WHERE id = $1")
        .bind(&id)
        .execute(app.pool())
        .await
        .unwrap();
    handover_server::jobs::sweep(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "pending", "queued again");
    handover_server::jobs::drain(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "completed");

    let id = app
        .create_id(json!({"export_format": "csv", "data_types": ["user_profile"]}))
        .await;
    sqlx::query("UPDATE export_requests SET status = 'processing', attempts = 2, last_activity_at = '2020-01-01T00:00:00.000Z' WHERE id = $1")
        .bind(&id)
        .execute(app.pool())
        .await
        .unwrap();
    handover_server::jobs::sweep(&app.state).await.unwrap();
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["status"], "failed");
}

#[tokio::test]
async fn server_builds_run_once_with_monotonic_progress() {
    let app = spawn_with(
        Opts {
            records: Some(4000),
            ..Opts::default()
        },
        None,
    )
    .await;
    for format in ["csv", "xlsx"] {
        let id = app
            .create_id(json!({"export_format": format, "data_types": ["payment_history", "recovery_cases"]}))
            .await;
        let state = app.state.clone();
        let worker = tokio::spawn(async move { handover_server::jobs::drain(&state).await });
        let mut seen = Vec::new();
        // Bounded: until the build reports completion. The stored progress is
        // read directly (the details endpoint is rate-limited to 60/min).
        for _ in 0..1_000_000 {
            let (served, status): (i64, String) =
                sqlx::query_as("SELECT records_served, status FROM export_requests WHERE id = $1")
                    .bind(&id)
                    .fetch_one(app.pool())
                    .await
                    .unwrap();
            seen.push(served as u64);
            if status == "completed" {
                break;
            }
            tokio::task::yield_now().await;
        }
        worker.await.unwrap().unwrap();
        let d = app
            .call(Method::GET, &format!("/api/data/export/{id}"), None)
            .await;
        let p = &d.body["data"]["progress"];
        assert_eq!(p["percentage"], 100);
        assert_eq!(p["records_processed"], p["total_records"]);
        assert_eq!(
            seen.last(),
            p["total_records"].as_u64().as_ref(),
            "{format}"
        );
        assert!(
            seen.len() > 2,
            "{format}: the build was observed while it ran: {seen:?}"
        );
        for w in seen.windows(2) {
            assert!(w[1] >= w[0], "{format}: progress went back: {seen:?}");
        }
        let started = app
            .count(&format!(
                "SELECT COUNT(*) FROM audit_log WHERE resource = '{id}' AND action = 'export.started'"
            ))
            .await;
        assert_eq!(started, 1, "{format}: built once");
        let kinds: Vec<String> = sqlx::query_scalar(
            "SELECT format FROM export_files WHERE request_id = $1 ORDER BY format",
        )
        .bind(&id)
        .fetch_all(app.pool())
        .await
        .unwrap();
        let mut expected = vec![format.to_string(), "frames".to_string()];
        expected.sort();
        assert_eq!(kinds, expected, "the file once, and its frames");
    }
}
