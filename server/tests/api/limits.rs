//! Rate limits: boundaries, headers, the rolling window, restarts, concurrency.

use std::sync::Arc;

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn rate_limits_hold_at_their_boundaries_with_headers() {
    let app = spawn_app().await;
    for i in 1..=5 {
        let r = app
            .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
        assert_eq!(r.status, 201);
        assert_eq!(r.header("ratelimit-limit"), "5");
        assert_eq!(r.header("ratelimit-remaining"), (5 - i).to_string());
    }
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((3590..=3600).contains(&retry), "retry-after {retry}");
    assert_eq!(
        (
            r.header("ratelimit-limit"),
            r.header("ratelimit-remaining"),
            r.header("ratelimit-reset")
        ),
        ("5", "0", retry.to_string().as_str()),
        "a 429 carries the RateLimit-* headers too"
    );
    // Another company has its own budget; other endpoints theirs.
    let body = json!({"export_format": "json", "data_types": ["user_profile"]}).to_string();
    let r = app
        .raw(
            Method::POST,
            "/api/data/export",
            Some(&app.token),
            Some("company_456"),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, 201);

    for (path, method, limit) in [
        ("/api/data/export", Method::GET, 60),
        ("/api/data/export/export_0/download", Method::GET, 10),
        ("/api/data/export/export_0", Method::DELETE, 20),
    ] {
        for i in 0..limit {
            let r = app.call(method.clone(), path, None).await;
            assert_ne!(r.status, 429, "{path} request {i}");
            assert_eq!(r.header("ratelimit-limit"), limit.to_string());
        }
        let r = app.call(method.clone(), path, None).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (429, "RATE_LIMIT_EXCEEDED"),
            "{path}"
        );
        let retry: u64 = r.header("retry-after").parse().unwrap();
        assert!((1..=60).contains(&retry));
    }
}

#[tokio::test]
async fn the_create_window_rolls_over_the_hour() {
    let app = spawn_app().await;
    let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    // Four creates 59 minutes ago and one 61 minutes ago: one more fits.
    for age_min in [59, 59, 59, 59, 61] {
        sqlx::query("INSERT INTO rate_events (bucket, at_ms) VALUES ('data_export:user_456:company_123', $1)")
            .bind(now - age_min * 60_000)
            .execute(app.pool())
            .await
            .unwrap();
    }
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(
        r.status, 201,
        "the 61-minute-old create is outside the window"
    );
    let r = app
        .create(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!(
        (55..=61).contains(&retry),
        "the oldest in the window falls out in about a minute, got {retry}"
    );
}

#[tokio::test]
async fn rate_limits_survive_a_restart() {
    let app = spawn_app().await;
    for _ in 0..5 {
        app.create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
            .await;
    }
    let token = app.token.clone();
    let dir = app.stop().await;
    let app = spawn_with(Opts::default(), Some(dir)).await;
    let body = json!({"export_format": "json", "data_types": ["user_profile"]}).to_string();
    let r = app
        .raw(
            Method::POST,
            "/api/data/export",
            Some(&token),
            Some("company_123"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (429, "RATE_LIMIT_EXCEEDED"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn twenty_concurrent_creates_admit_exactly_five() {
    let app = Arc::new(spawn_app().await);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.create(json!({"export_format": "json", "data_types": ["user_profile"]}))
                .await
                .status
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        15,
        "{statuses:?}"
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM export_requests").await, 5);
}

#[tokio::test]
async fn re_reading_an_open_exports_pages_counts_against_the_daily_quota() {
    let app = spawn_with(
        Opts {
            daily_record_quota: Some(100),
            ..Opts::default()
        },
        None,
    )
    .await;
    let payments = app
        .count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'")
        .await;
    assert!(payments > 50 && payments < 100);
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"], "delivery": "client"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["data"]["request_id"].as_str().unwrap();
    let page = format!("/api/data/export/{id}/records/payment_history?limit=5000");
    // The first read is what the quota already holds; reading it all again
    // goes past 100 records a day, and the read after that is refused.
    let first = app.call(Method::GET, &page, None).await;
    assert_eq!(first.status, 200);
    let again = app.call(Method::GET, &page, None).await;
    assert_eq!(
        again.status, 200,
        "the second read still started inside the quota"
    );
    let third = app.call(Method::GET, &page, None).await;
    assert_eq!(
        (third.status.as_u16(), third.code()),
        (429, "QUOTA_EXCEEDED"),
        "{}",
        third.body
    );
    // Its headers state the quota, not the page rate limit that admitted
    // the request before the quota refused it.
    assert_eq!(third.header("ratelimit-remaining"), "0");
    assert_eq!(third.header("ratelimit-reset"), third.header("retry-after"));
    assert_eq!(third.header("ratelimit-limit"), "100");
}

/// The rows of each frame of a stream answer, and its error line if any.
fn stream_frames(bytes: &[u8]) -> (Vec<u64>, Option<serde_json::Value>) {
    let mut rows = Vec::new();
    let mut error = None;
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        match v["rows"].as_array() {
            Some(r) => rows.push(r.len() as u64),
            None => error = Some(v["error"].clone()),
        }
    }
    (rows, error)
}

#[tokio::test]
async fn a_stream_read_again_stops_at_the_daily_quota_even_several_at_once() {
    let app = spawn_with(
        Opts {
            daily_record_quota: Some(100),
            ..Opts::default()
        },
        None,
    )
    .await;
    let payments = app
        .count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'")
        .await as u64;
    assert!(payments > 50 && payments < 90, "{payments}");
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"], "delivery": "client"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["data"]["request_id"].as_str().unwrap();
    let stream = format!("/api/data/export/{id}/records/payment_history/stream?limit=5");
    // The first read is the one the quota already holds: all of it.
    let first = app.call(Method::GET, &stream, None).await;
    assert_eq!(first.status, 200);
    let (rows, error) = stream_frames(&first.bytes);
    assert_eq!((rows.iter().sum::<u64>(), error), (payments, None));
    // Three streams reading it all again at once: each stops, with a
    // QUOTA_EXCEEDED line, within a frame of the quota, never at the end.
    let again =
        futures_util::future::join_all((0..3).map(|_| app.call(Method::GET, &stream, None))).await;
    let mut reread = 0;
    for r in &again {
        if r.status == 429 {
            assert_eq!(r.code(), "QUOTA_EXCEEDED");
            continue;
        }
        assert_eq!(r.status, 200);
        let (rows, error) = stream_frames(&r.bytes);
        let served: u64 = rows.iter().sum();
        assert!(
            served < payments,
            "a re-read stream was cut at the quota: {served} of {payments}"
        );
        assert_eq!(error.unwrap()["code"], "QUOTA_EXCEEDED");
        reread += served;
    }
    // At most one frame of 5 past the quota for each stream at once.
    assert!(
        payments + reread <= 100 + 3 * 5,
        "{} records read",
        payments + reread
    );
    assert!(
        payments + reread > 100,
        "re-reads ran up to the quota: {reread}"
    );
    let after = app.call(Method::GET, &stream, None).await;
    assert_eq!(
        (after.status.as_u16(), after.code()),
        (429, "QUOTA_EXCEEDED")
    );
}

#[tokio::test]
async fn a_stream_resumed_after_a_drop_completes_at_a_quota_the_export_fills() {
    let (app, payments, id) = export_filling_the_quota().await;
    let stream = format!("/api/data/export/{id}/records/payment_history/stream?limit=20");
    // The server hands every frame to the connection, and counts it, but
    // the connection drops with all but the first still in flight: the
    // client has only the first frame's cursor.
    let sent = app.call(Method::GET, &stream, None).await;
    assert_eq!(sent.status, 200);
    let (rows, error) = stream_frames(&sent.bytes);
    assert_eq!((rows.iter().sum::<u64>(), error), (payments, None));
    assert!(rows.len() >= 3, "{rows:?}");
    let first: serde_json::Value =
        serde_json::from_slice(sent.bytes.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let cursor = first["next_cursor"].as_str().unwrap();
    // The resume reads the lost frames again and reaches the end, though
    // the quota has no room for records read twice.
    let resumed = app
        .call(
            Method::GET,
            &format!("{stream}&cursor={}", urlencode(cursor)),
            None,
        )
        .await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    let (rows, error) = stream_frames(&resumed.bytes);
    assert_eq!(error, None, "the resume was cut at the quota");
    assert_eq!(rows.iter().sum::<u64>(), payments - 20);
    let last = resumed
        .bytes
        .split(|&b| b == b'\n')
        .rfind(|l| !l.is_empty())
        .unwrap();
    let last: serde_json::Value = serde_json::from_slice(last).unwrap();
    assert!(last["next_cursor"].is_null(), "{last}");
    // The allowance is for resumes: reading it all again from the start
    // is refused, the quota being spent.
    let again = app.call(Method::GET, &stream, None).await;
    assert_eq!(
        (again.status.as_u16(), again.code()),
        (429, "QUOTA_EXCEEDED")
    );
}

#[tokio::test]
async fn pages_read_again_from_a_cursor_get_no_resume_allowance() {
    let (app, _, id) = export_filling_the_quota().await;
    let page = format!("/api/data/export/{id}/records/payment_history?limit=20");
    // Every page once, keeping the first page's cursor.
    let first = app.call(Method::GET, &page, None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let cursor = first.body["data"]["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    let mut next = Some(cursor.clone());
    for _ in 0..100 {
        let Some(c) = next.take() else { break };
        let p = app
            .call(
                Method::GET,
                &format!("{page}&cursor={}", urlencode(&c)),
                None,
            )
            .await;
        assert_eq!(p.status, 200, "{}", p.body);
        next = p.body["data"]["next_cursor"].as_str().map(str::to_string);
    }
    assert!(next.is_none(), "the pages reached the end");
    // A page is counted as it is answered: one read again fits (the
    // quota was not yet passed), the next does not.
    let again = format!("{page}&cursor={}", urlencode(&cursor));
    assert_eq!(app.call(Method::GET, &again, None).await.status, 200);
    let refused = app.call(Method::GET, &again, None).await;
    assert_eq!(
        (refused.status.as_u16(), refused.code()),
        (429, "QUOTA_EXCEEDED"),
        "{}",
        refused.body
    );
}

/// An app whose daily quota is exactly the demo user's payments, and a
/// client export of them: the quota has nothing to spare for re-reads.
async fn export_filling_the_quota() -> (TestApp, u64, String) {
    let probe = spawn_app().await;
    let payments = probe
        .count("SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'")
        .await as u64;
    drop(probe);
    assert!(payments > 40 && payments < 100, "{payments}");
    let app = spawn_with(
        Opts {
            daily_record_quota: Some(payments),
            ..Opts::default()
        },
        None,
    )
    .await;
    let r = app
        .create(json!({"export_format": "json", "data_types": ["payment_history"], "delivery": "client"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["data"]["request_id"].as_str().unwrap().to_string();
    (app, payments, id)
}
