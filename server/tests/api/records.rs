//! Record pages and streams: every record, resumable, compressed.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use handover_server::store::Engine;

/// The lines of a stream answer.
async fn stream_lines(app: &TestApp, path: &str) -> (Reply, Vec<Value>) {
    let r = app.call(Method::GET, path, None).await;
    let lines = r
        .bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    (r, lines)
}

/// A CSV file built from frames, the way the browser builds it.
fn csv_of(manifest: &handover::model::Manifest, frames: &[Value]) -> Vec<u8> {
    use handover::format::{Cell, ExportFormat, ExportWriter, FormatOptions};
    use handover::wire::{decode_frame, WireCell};
    let info = handover::model::ExportInfo::new("export_x", time::OffsetDateTime::UNIX_EPOCH);
    let mut w = ExportWriter::new(
        ExportFormat::Csv,
        manifest,
        &info,
        &FormatOptions::default(),
    )
    .unwrap();
    let mut out = w.begin().unwrap();
    for f in frames {
        let t = w.type_index(f["data_type"].as_str().unwrap()).unwrap();
        let columns = &manifest.types[t].columns;
        let bytes = serde_json::to_vec(f).unwrap();
        let frame = decode_frame(&bytes, columns).unwrap();
        for row in frame.rows() {
            let cells: Vec<Cell<'_>> = row.iter().map(WireCell::as_cell).collect();
            w.write_row(t, &cells).unwrap();
        }
        out.extend(w.take_output());
    }
    out.extend(w.finish().unwrap());
    out
}

/// A client export of the demo user's payments: its id and manifest.
async fn payments_export(app: &TestApp, format: &str) -> (String, handover::model::Manifest) {
    let r = app
        .create(json!({"export_format": format, "data_types": ["payment_history"], "delivery": "client"}))
        .await;
    let id = r.body["data"]["request_id"].as_str().unwrap().to_string();
    let manifest = serde_json::from_value(r.body["data"]["manifest"].clone()).unwrap();
    (id, manifest)
}

/// The demo user's GET of `path` with `Accept-Encoding: encoding`, its
/// body unread.
async fn get_encoded(app: &TestApp, path: &str, encoding: &str) -> reqwest::Response {
    app.client
        .get(format!("{}{path}", app.base))
        .bearer_auth(&app.token)
        .header("x-company-id", "company_123")
        .header("accept-encoding", encoding)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn streams_carry_every_record_and_resume_byte_identically() {
    let app = spawn_app().await;
    let (id, manifest) = payments_export(&app, "csv").await;
    let total = manifest.types["payment_history"].records;
    assert!(total > 20, "enough records for several frames: {total}");
    let base = format!("/api/data/export/{id}/records/payment_history/stream");

    let (whole, frames) = stream_lines(&app, &format!("{base}?limit=7")).await;
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.bytes)
    );
    assert_eq!(whole.header("content-type"), "application/x-ndjson");
    assert_eq!(frames.len() as u64, total.div_ceil(7));
    let mut offset = 0;
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f["data_type"], "payment_history");
        assert_eq!(f["offset"], offset, "frames are contiguous");
        assert_eq!(
            f["columns"].is_array(),
            i == 0,
            "columns in the first frame only"
        );
        offset += f["rows"].as_array().unwrap().len() as u64;
        assert_eq!(f["next_cursor"].is_null(), i + 1 == frames.len());
    }
    assert_eq!(offset, total);
    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["progress"]["records_processed"], total);

    // The connection drops after the first frame; the client resumes from
    // that frame's cursor and gets exactly the rows that followed.
    let resp = app
        .client
        .get(format!("{}{base}?limit=7", app.base))
        .bearer_auth(&app.token)
        .header("x-company-id", "company_123")
        .send()
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunks = resp.bytes_stream();
    use futures_util::StreamExt as _;
    // Bounded: the first line of a few hundred bytes.
    for _ in 0..10_000 {
        match chunks.next().await {
            Some(c) => got.extend_from_slice(&c.unwrap()),
            None => break,
        }
        if got.contains(&b'\n') {
            break;
        }
    }
    drop(chunks);
    let first_line = got.split(|&b| b == b'\n').next().unwrap();
    let first: Value = serde_json::from_slice(first_line).unwrap();
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let cursor = cursor.as_str();
    let (resumed, rest) = stream_lines(
        &app,
        &format!("{base}?limit=7&cursor={}", urlencode(cursor)),
    )
    .await;
    assert_eq!(resumed.status, 200);
    assert_eq!(rest[0]["offset"], 7);
    let mut cut = vec![first];
    cut.extend(rest);
    assert_eq!(
        csv_of(&manifest, &cut),
        csv_of(&manifest, &frames),
        "a resumed stream gives the same file"
    );

    // Cursors are the server's own: altered, padded, or another type's are refused.
    let mut forged = cursor.to_string();
    forged.insert(2, 'x');
    for bad in [
        forged,
        format!(" {cursor}"),
        format!("{cursor}="),
        "eyJhIjoxfQ".to_string(),
    ] {
        let r = app
            .call(
                Method::GET,
                &format!("{base}?cursor={}", urlencode(&bad)),
                None,
            )
            .await;
        assert_eq!(
            (r.status.as_u16(), r.detail_code()),
            (422, "INVALID_CURSOR"),
            "{bad:?}"
        );
    }
    // A cursor the server signed but never handed out: past the end.
    let past = app.state.cursor_key.encode(
        &id,
        "payment_history",
        &handover_server::cursor::Cursor {
            after: handover_server::source::SortKey::Text("payment_zzzz".into()),
            offset: 1_000_000,
        },
    );
    let r = app
        .call(
            Method::GET,
            &format!("{base}?cursor={}", urlencode(&past)),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.detail_code()),
        (422, "INVALID_CURSOR"),
        "a cursor past the end"
    );
    let (other, _) = payments_export(&app, "csv").await;
    let r = app
        .call(
            Method::GET,
            &format!(
                "/api/data/export/{other}/records/payment_history?cursor={}",
                urlencode(cursor)
            ),
            None,
        )
        .await;
    assert_eq!(
        r.detail_code(),
        "INVALID_CURSOR",
        "a cursor belongs to one export"
    );
}

#[tokio::test]
async fn compressed_and_uncompressed_pages_carry_the_same_records() {
    use std::io::Read as _;
    let app = spawn_app().await;
    let (id, _) = payments_export(&app, "json").await;
    let mut decoded = Vec::new();
    for enc in ["identity", "gzip", "br", "zstd", "gzip;q=0.5, zstd"] {
        let r = get_encoded(
            &app,
            &format!("/api/data/export/{id}/records/payment_history?limit=50"),
            enc,
        )
        .await;
        assert_eq!(r.status(), 200);
        let ce = r
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        let wire = r.bytes().await.unwrap().to_vec();
        let mut plain = Vec::new();
        match ce.as_deref() {
            None => plain = wire.clone(),
            Some("gzip") => {
                flate2::read::GzDecoder::new(&wire[..])
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Some("br") => {
                brotli::Decompressor::new(&wire[..], 4096)
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Some("zstd") => {
                zstd::stream::read::Decoder::new(&wire[..])
                    .unwrap()
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Some(other) => panic!("unexpected encoding {other}"),
        }
        let expected = match enc {
            "identity" => None,
            "gzip;q=0.5, zstd" => Some("zstd"),
            e => Some(e),
        };
        assert_eq!(ce.as_deref(), expected, "negotiated from {enc:?}");
        if expected.is_some() {
            assert!(
                wire.len() * 2 < plain.len(),
                "{enc}: {} → {}",
                plain.len(),
                wire.len()
            );
        }
        let v: Value = serde_json::from_slice(&plain).unwrap();
        decoded.push(v["data"].clone());
    }
    assert!(decoded[0]["rows"].as_array().unwrap().len() > 10);
    for d in &decoded[1..] {
        assert_eq!(d, &decoded[0]);
    }
}

#[tokio::test]
async fn the_demo_types_find_their_nested_rows_by_index() {
    // A nested column is a correlated subquery run once per record: on
    // PostgreSQL, a join between columns of different collations cannot
    // use the index on its column and scans the whole table for every
    // record (700 ms a page of memberships, against 3 ms, with 60 users'
    // demo data). On SQLite every column compares bytes, so there this
    // checks only that the indexes are there and used.
    let app = spawn_app().await;
    let registry = handover_server::datatypes::Registry::parse(default_config()).unwrap();
    let mut tx = app.pool().begin().await.unwrap();
    let explain = match engine() {
        Engine::Sqlite => "EXPLAIN QUERY PLAN",
        Engine::Postgres => {
            // A table this small is cheaper to scan; the index must still
            // be usable (for this transaction only).
            sqlx::query("SET LOCAL enable_seqscan = off")
                .execute(&mut *tx)
                .await
                .unwrap();
            "EXPLAIN"
        }
    };
    for (name, index, column) in [
        (
            "membership_data",
            "demo_recovery_cases_membership",
            "membership_id",
        ),
        ("recovery_cases", "demo_recovery_actions_case", "case_id"),
        ("consent_data", "demo_consents_owner", "user_id"),
    ] {
        let query = registry
            .get(name)
            .unwrap()
            .query
            .replace(":user_id", "'user_456'")
            .replace(":company_id", "'company_123'");
        let rows = sqlx::query(&format!("{explain} {query}"))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let plan: Vec<String> = rows
            .iter()
            .map(|r| {
                use sqlx::Row as _;
                // SQLite: (id, parent, notused, detail); PostgreSQL: one line.
                r.try_get::<String, _>(r.len() - 1).unwrap()
            })
            .collect();
        // The index is searched by the joined column: SQLite says so on
        // the index's line ("(user_id=? AND …)"), PostgreSQL on the next
        // ("Index Cond: ((user_id = u.id) AND …)"); an index used for
        // another of its columns only does not count.
        let searched = plan.iter().enumerate().any(|(i, line)| {
            line.contains(index)
                && plan[i..(i + 2).min(plan.len())].iter().any(|l| {
                    l.contains(&format!("{column}=")) || l.contains(&format!("{column} ="))
                })
        });
        assert!(
            searched,
            "{name} does not search {index} by {column}:\n{}",
            plan.join("\n")
        );
    }
}

#[tokio::test]
async fn the_last_frame_of_a_stream_leaves_only_once_it_is_recorded() {
    use futures_util::StreamExt as _;
    let app = spawn_app().await;
    let (id, manifest) = payments_export(&app, "json").await;
    let total = manifest.types["payment_history"].records;
    assert!(total <= 5000, "one frame: the last");
    let done_sql =
        format!("SELECT COUNT(*) FROM export_progress WHERE export_id = '{id}' AND done = 1");
    let done = || app.count(&done_sql);
    // A client that has the last frame may call `complete` at once, which
    // checks that the type was served to its end. On PostgreSQL the
    // progress can be held back alone (a lock on its table; the audit log
    // and the records go on), so that a frame sent before it is recorded
    // shows.
    let mut lock = None;
    if engine() == Engine::Postgres {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
        sqlx::raw_sql("BEGIN; LOCK TABLE export_progress IN EXCLUSIVE MODE")
            .execute(&mut c)
            .await
            .unwrap();
        lock = Some(c);
    }
    let resp = get_encoded(
        &app,
        &format!("/api/data/export/{id}/records/payment_history/stream?limit=5000"),
        "identity",
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut chunks = resp.bytes_stream();
    if let Some(mut c) = lock {
        let early = tokio::time::timeout(std::time::Duration::from_secs(1), chunks.next()).await;
        assert!(
            early.is_err(),
            "the last frame arrived before its progress was recorded"
        );
        assert_eq!(done().await, 0);
        sqlx::raw_sql("COMMIT").execute(&mut c).await.unwrap();
    }
    let mut got = Vec::new();
    // Bounded: one frame of at most 5000 rows.
    for _ in 0..100_000 {
        match chunks.next().await {
            Some(c) => got.extend_from_slice(&c.unwrap()),
            None => break,
        }
        if got.ends_with(b"\n") {
            break;
        }
    }
    let frame: Value = serde_json::from_slice(got.trim_ascii_end()).unwrap();
    assert!(frame["next_cursor"].is_null(), "the last frame");
    assert_eq!(frame["rows"].as_array().unwrap().len() as u64, total);
    assert_eq!(done().await, 1, "recorded before it left");
}
