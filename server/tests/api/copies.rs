//! End-to-end encrypted copies of browser-built exports: the resumable
//! upload, the size bound, the checksum, the download of the ciphertext,
//! delete and expiry, and `handover-server decrypt`.

use handover::crypto::{decrypt_all, DataKey, Encryptor, CHUNK_SIZE, HEADER_SIZE, TAG_SIZE};
use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

const MARKER: &[u8] = b"PLAINTEXT-MARKER-do-not-store-me";

/// A completed client export of user_profile, reported with a file of
/// `plaintext`'s size and checksum (the server cannot see the file).
async fn completed_client_export(app: &TestApp, plaintext: &[u8]) -> String {
    let id = app
        .create_id(
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"}),
        )
        .await;
    let all = fetch_all(app, &id, &["user_profile"], 100).await;
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/complete"),
            Some(
                json!({"record_count": all[0].1.len(), "byte_size": plaintext.len(),
                        "sha256": sha256_hex(plaintext)}),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    id
}

fn plaintext(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

fn encrypt(key: &DataKey, plain: &[u8]) -> Vec<u8> {
    let enc = Encryptor::new(key).unwrap();
    let mut out = enc.header().to_vec();
    out.extend(enc.finish(plain).unwrap());
    out
}

async fn patch(app: &TestApp, id: &str, offset: Option<u64>, ct: &str, body: Vec<u8>) -> Reply {
    let mut r = app
        .client
        .patch(format!("{}/api/data/export/{id}/copy", app.base))
        .bearer_auth(&app.token)
        .header("x-company-id", "company_123")
        .header("content-type", ct)
        .body(body);
    if let Some(o) = offset {
        r = r.header("upload-offset", o.to_string());
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap().to_vec();
    Reply {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or_default(),
        bytes,
    }
}

async fn upload(app: &TestApp, id: &str, offset: u64, part: &[u8]) -> Reply {
    patch(
        app,
        id,
        Some(offset),
        "application/octet-stream",
        part.to_vec(),
    )
    .await
}

/// Every byte the server keeps: files under the test's directory (the
/// SQLite database and its journal, export files, the audit head) and,
/// on PostgreSQL, stored chunks and export rows.
async fn everything_stored(app: &TestApp) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut dirs = vec![app.db.dir.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push(bytes);
            }
        }
    }
    out.extend(app.stored_files().await);
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT CAST(id AS TEXT) || metadata || manifest || COALESCE(copy_sha256, '') FROM export_requests",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    out.extend(rows.into_iter().map(|(r,)| r.into_bytes()));
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn an_encrypted_copy_uploads_in_parts_resumes_and_downloads_as_ciphertext() {
    let app = spawn_app().await;
    let plain = plaintext(3 * CHUNK_SIZE + 1000);
    let id = completed_client_export(&app, &plain).await;
    let key = DataKey::generate().unwrap();
    let ct = encrypt(&key, &plain);

    let none = app
        .call(Method::GET, &format!("/api/data/export/{id}/copy"), None)
        .await;
    assert_eq!(none.body["data"]["state"], "none");
    assert_eq!(
        none.body["data"]["byte_size"],
        ct.len(),
        "the exact size is known in advance"
    );
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (409, "EXPORT_NOT_READY"));
    assert!(r.body["error"]["error"]
        .as_str()
        .unwrap()
        .contains("no encrypted copy"));

    // Malformed parts.
    let r = patch(
        &app,
        &id,
        None,
        "application/octet-stream",
        ct[..10].to_vec(),
    )
    .await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "INVALID_REQUEST"));
    let r = patch(&app, &id, Some(0), "text/plain", ct[..10].to_vec()).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (415, "UNSUPPORTED_MEDIA_TYPE")
    );
    let r = upload(&app, &id, 5, &ct[..10]).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "UPLOAD_OFFSET_MISMATCH")
    );
    let r = upload(&app, &id, 0, &[]).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "INVALID_REQUEST"));

    // The first part; then its retry (a response lost on the way) is refused
    // and the state says where to go on.
    let cut = 100_000;
    let r = upload(&app, &id, 0, &ct[..cut]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["received"], cut);
    assert_eq!(r.header("upload-offset"), cut.to_string());
    let r = upload(&app, &id, 0, &ct[..cut]).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "UPLOAD_OFFSET_MISMATCH")
    );
    let state = app
        .call(Method::GET, &format!("/api/data/export/{id}/copy"), None)
        .await;
    assert_eq!(state.body["data"]["state"], "uploading");
    assert_eq!(state.body["data"]["received"], cut);
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(r.code(), "EXPORT_NOT_READY");
    let early = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/copy/complete"),
            Some(json!({"sha256": sha256_hex(&ct)})),
        )
        .await;
    assert_eq!(early.detail_code(), "COPY_INCOMPLETE");

    // One byte more than the copy's size is refused; the exact rest is taken.
    let mut longer = ct[cut..].to_vec();
    longer.push(0);
    let r = upload(&app, &id, cut as u64, &longer).await;
    assert_eq!(
        (r.status.as_u16(), r.detail_code()),
        (422, "FILE_TOO_LARGE")
    );
    let r = upload(&app, &id, cut as u64, &ct[cut..]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["received"], ct.len());

    let kept = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/copy/complete"),
            Some(json!({"sha256": sha256_hex(&ct)})),
        )
        .await;
    assert_eq!(kept.status, 200, "{}", kept.body);
    assert_eq!(kept.body["data"]["state"], "kept");
    let again = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/copy/complete"),
            Some(json!({"sha256": sha256_hex(&ct)})),
        )
        .await;
    assert_eq!(again.status, 200, "completing twice is idempotent");
    let r = upload(&app, &id, ct.len() as u64, &[1, 2, 3]).await;
    assert_eq!(r.code(), "COPY_ALREADY_KEPT");

    let d = app
        .call(Method::GET, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(d.body["data"]["encrypted_copy"]["state"], "kept");
    assert_eq!(
        d.body["data"]["download_url"],
        format!("/api/data/export/{id}/download")
    );
    let list = app.call(Method::GET, "/api/data/export", None).await;
    let item = list.body["data"]["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["request_id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(item["encrypted_copy"]["state"], "kept");

    // The download is the ciphertext, byte for byte; only the key opens it.
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes, ct);
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert_eq!(r.header("x-content-sha256"), sha256_hex(&ct));
    assert!(r
        .header("content-disposition")
        .contains(&format!("{id}.json.hov")));
    assert_eq!(decrypt_all(&key, &r.bytes).unwrap(), plain);
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download?format=csv"),
            None,
        )
        .await;
    assert_eq!(r.detail_code(), "INVALID_FORMAT");

    // No plaintext anywhere the server keeps things.
    for blob in everything_stored(&app).await {
        assert!(
            !contains(&blob, MARKER),
            "plaintext found in what the server stores"
        );
    }
    let audit = app
        .count("SELECT COUNT(*) FROM audit_log WHERE action = 'export.copy_kept'")
        .await;
    assert_eq!(audit, 1);

    // Deleting the export removes the copy: no key row, no bytes.
    let r = app
        .call(Method::DELETE, &format!("/api/data/export/{id}"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(app.count("SELECT COUNT(*) FROM export_files").await, 0);
    assert!(
        app.stored_files().await.is_empty(),
        "the copy's bytes are gone"
    );
}

#[tokio::test]
async fn a_copy_expires_with_its_export() {
    let app = spawn_app().await;
    let plain = plaintext(5000);
    let id = completed_client_export(&app, &plain).await;
    let ct = encrypt(&DataKey::generate().unwrap(), &plain);
    assert_eq!(upload(&app, &id, 0, &ct).await.status, 200);
    app.exec(
        "UPDATE export_requests SET expires_at = '2020-01-01T00:00:00.000Z' WHERE id = $1",
        &id,
    )
    .await;
    handover_server::jobs::sweep(&app.state).await.unwrap();
    assert_eq!(app.count("SELECT COUNT(*) FROM export_files").await, 0);
    assert!(app.stored_files().await.is_empty());
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(r.code(), "EXPORT_NOT_READY");
}

#[tokio::test]
async fn a_copy_that_fails_its_checksum_is_dropped_and_uploaded_again() {
    let app = spawn_app().await;
    let plain = plaintext(70_000);
    let id = completed_client_export(&app, &plain).await;
    let key = DataKey::generate().unwrap();
    let ct = encrypt(&key, &plain);
    let mut altered = ct.clone();
    altered[HEADER_SIZE + 5] ^= 1;
    assert_eq!(upload(&app, &id, 0, &altered).await.status, 200);
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/copy/complete"),
            Some(json!({"sha256": sha256_hex(&ct)})),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.detail_code()),
        (422, "CHECKSUM_MISMATCH")
    );
    assert!(
        app.stored_files().await.is_empty(),
        "the bad parts are dropped"
    );
    let state = app
        .call(Method::GET, &format!("/api/data/export/{id}/copy"), None)
        .await;
    assert_eq!(state.body["data"]["received"], 0);
    for part in ct.chunks(CHUNK_SIZE + TAG_SIZE).scan(0u64, |at, p| {
        let o = *at;
        *at += p.len() as u64;
        Some((o, p))
    }) {
        assert_eq!(upload(&app, &id, part.0, part.1).await.status, 200);
    }
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/copy/complete"),
            Some(json!({"sha256": sha256_hex(&ct)})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .call(
            Method::GET,
            &format!("/api/data/export/{id}/download"),
            None,
        )
        .await;
    assert_eq!(decrypt_all(&key, &r.bytes).unwrap(), plain);
}

#[tokio::test]
async fn copies_are_bounded_and_only_for_the_owners_browser_exports() {
    let app = spawn_with(
        Opts {
            max_export_bytes: Some(64 * 1024),
            ..Opts::default()
        },
        None,
    )
    .await;
    // Reported larger than the size limit: no byte of its copy is taken.
    let big = plaintext(200_000);
    let id = completed_client_export(&app, &big).await;
    let r = upload(&app, &id, 0, &[0u8; 100]).await;
    assert_eq!(
        (r.status.as_u16(), r.detail_code()),
        (422, "FILE_TOO_LARGE")
    );
    assert!(app.stored_files().await.is_empty());

    // Open (not completed) exports, server builds and other users' exports.
    let open = app
        .create_id(
            json!({"export_format": "json", "data_types": ["user_profile"], "delivery": "client"}),
        )
        .await;
    let r = upload(&app, &open, 0, &[0u8; 100]).await;
    assert_eq!((r.status.as_u16(), r.code()), (409, "EXPORT_NOT_READY"));
    let server = app
        .create_id(json!({"export_format": "json", "data_types": ["user_profile"]}))
        .await;
    handover_server::jobs::drain(&app.state).await.unwrap();
    let r = upload(&app, &server, 0, &[0u8; 100]).await;
    assert_eq!((r.status.as_u16(), r.code()), (409, "COPY_NOT_ALLOWED"));
    let other = app
        .token_for("user_999", &["company_123"], &["data:export"])
        .await;
    let r = app
        .client
        .patch(format!("{}/api/data/export/{id}/copy", app.base))
        .bearer_auth(other)
        .header("x-company-id", "company_123")
        .header("content-type", "application/octet-stream")
        .header("upload-offset", "0")
        .body(vec![0u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

async fn decrypt_cli(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handover-server"))
        .arg("decrypt")
        .args(args)
        .env_remove("HANDOVER_COPY_KEY")
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn the_cli_decrypts_a_saved_copy_and_rejects_wrong_keys_and_altered_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = DataKey::generate().unwrap();
    let plain = plaintext(2 * CHUNK_SIZE + 77);
    let ct = encrypt(&key, &plain);
    let saved = dir.path().join("export_1.json.hov");
    std::fs::write(&saved, &ct).unwrap();
    let link = format!("http://127.0.0.1:8080/#copy=export_1&key={}", key.to_text());

    let out = dir.path().join("plain.json");
    let (ok, err) = decrypt_cli(&[
        "--key",
        &link,
        "--out",
        out.to_str().unwrap(),
        saved.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), plain);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // A key whose text starts with `-` (base64url of 0xF8…) is a key, not
    // an option.
    let hyphen_key = DataKey::from_bytes([0xF8; 32]).to_text();
    assert!(hyphen_key.starts_with('-'));
    let cases: Vec<(&str, Vec<u8>, String, &str)> = vec![
        (
            "wrong key",
            ct.clone(),
            DataKey::generate().unwrap().to_text(),
            "wrong key",
        ),
        (
            "wrong key, starting with -",
            ct.clone(),
            hyphen_key,
            "wrong key",
        ),
        (
            "altered",
            {
                let mut c = ct.clone();
                c[HEADER_SIZE + CHUNK_SIZE + 40] ^= 4;
                c
            },
            key.to_text(),
            "chunk 1 failed",
        ),
        (
            "truncated",
            ct[..HEADER_SIZE + 2 * (CHUNK_SIZE + TAG_SIZE)].to_vec(),
            key.to_text(),
            "truncated",
        ),
        (
            "reordered",
            {
                let s = CHUNK_SIZE + TAG_SIZE;
                let mut c = ct.clone();
                c[HEADER_SIZE..HEADER_SIZE + s]
                    .copy_from_slice(&ct[HEADER_SIZE + s..HEADER_SIZE + 2 * s]);
                c[HEADER_SIZE + s..HEADER_SIZE + 2 * s]
                    .copy_from_slice(&ct[HEADER_SIZE..HEADER_SIZE + s]);
                c
            },
            key.to_text(),
            "wrong key",
        ),
        ("not a key", ct.clone(), "abc".to_string(), "--key"),
        (
            "not a copy",
            b"hello, plain text".to_vec(),
            key.to_text(),
            "not an encrypted copy",
        ),
    ];
    for (what, bytes, k, says) in cases {
        let input = dir.path().join(format!("{what}.hov"));
        std::fs::write(&input, &bytes).unwrap();
        let out = dir.path().join(format!("{what}.out"));
        let (ok, err) = decrypt_cli(&[
            "--key",
            &k,
            "--out",
            out.to_str().unwrap(),
            input.to_str().unwrap(),
        ])
        .await;
        assert!(!ok, "{what}: accepted");
        assert!(err.contains(says), "{what}: {err}");
        assert!(!out.exists(), "{what}: partial plaintext left behind");
    }
}

#[tokio::test]
async fn racing_parts_store_one_and_a_refused_first_part_leaves_no_upload() {
    let app = spawn_app().await;
    let plain = plaintext(200_000);
    let id = completed_client_export(&app, &plain).await;
    let ct = encrypt(&DataKey::generate().unwrap(), &plain);

    // A first part past the copy's end is refused, and no upload is left open.
    let mut too_long = ct.clone();
    too_long.push(1);
    let r = upload(&app, &id, 0, &too_long).await;
    assert_eq!(r.detail_code(), "FILE_TOO_LARGE");
    let state = app
        .call(Method::GET, &format!("/api/data/export/{id}/copy"), None)
        .await;
    assert_eq!(state.body["data"]["state"], "none");

    // Two parts for the same offset at once: one is stored, the other is
    // refused and its bytes discarded.
    let (a, b) = tokio::join!(
        upload(&app, &id, 0, &ct[..70_000]),
        upload(&app, &id, 0, &ct[..90_000])
    );
    let statuses = [a.status.as_u16(), b.status.as_u16()];
    assert!(
        statuses.contains(&200) && statuses.contains(&409),
        "{statuses:?}"
    );
    let won = if a.status == 200 { 70_000 } else { 90_000 };
    let state = app
        .call(Method::GET, &format!("/api/data/export/{id}/copy"), None)
        .await;
    assert_eq!(state.body["data"]["received"], won);
    assert_eq!(state.body["data"]["parts"], 1);
    assert_eq!(
        app.stored_files().await.len(),
        1,
        "the loser's bytes are gone"
    );
    assert_eq!(upload(&app, &id, won as u64, &ct[won..]).await.status, 200);
    let r = app
        .call(
            Method::POST,
            &format!("/api/data/export/{id}/copy/complete"),
            Some(json!({"sha256": sha256_hex(&ct)})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn a_part_over_16_mib_is_refused_and_the_sweeper_spares_an_upload_in_progress() {
    let app = spawn_app().await;
    let plain = vec![7u8; 20 << 20];
    let id = completed_client_export(&app, &plain).await;
    let r = upload(&app, &id, 0, &vec![0u8; (16 << 20) + 1]).await;
    assert_eq!((r.status.as_u16(), r.code()), (413, "PAYLOAD_TOO_LARGE"));

    // Bytes of a part being written (no file row yet) survive a sweep
    // while the copy uploads, and go once it is no longer uploading.
    assert_eq!(upload(&app, &id, 0, &[1u8; 1000]).await.status, 200);
    sqlx::query(
        "INSERT INTO export_file_chunks (request_id, file, seq, data) VALUES ($1, 'in-flight.enc', 0, $2)",
    )
    .bind(&id)
    .bind(vec![5u8; 64])
    .execute(app.pool())
    .await
    .unwrap();
    let in_flight = "SELECT COUNT(*) FROM export_file_chunks WHERE file = 'in-flight.enc'";
    handover_server::jobs::sweep(&app.state).await.unwrap();
    assert_eq!(app.count(in_flight).await, 1, "spared while uploading");
    app.exec(
        "UPDATE export_requests SET copy_state = NULL WHERE id = $1",
        &id,
    )
    .await;
    handover_server::jobs::sweep(&app.state).await.unwrap();
    assert_eq!(app.count(in_flight).await, 0, "collected afterwards");
}

#[tokio::test]
async fn racing_checks_never_lose_a_copy_that_was_kept() {
    let app = spawn_app().await;
    let plain = plaintext(300_000);
    let id = completed_client_export(&app, &plain).await;
    let key = DataKey::generate().unwrap();
    let ct = encrypt(&key, &plain);
    assert_eq!(upload(&app, &id, 0, &ct).await.status, 200);
    let path = format!("/api/data/export/{id}/copy/complete");
    let (right, wrong) = tokio::join!(
        app.call(
            Method::POST,
            &path,
            Some(json!({"sha256": sha256_hex(&ct)}))
        ),
        app.call(Method::POST, &path, Some(json!({"sha256": "0".repeat(64)})))
    );
    assert_ne!(wrong.status, 200);
    let state = app
        .call(Method::GET, &format!("/api/data/export/{id}/copy"), None)
        .await;
    if right.status == 200 {
        assert_eq!(state.body["data"]["state"], "kept");
        let r = app
            .call(
                Method::GET,
                &format!("/api/data/export/{id}/download"),
                None,
            )
            .await;
        assert_eq!(decrypt_all(&key, &r.bytes).unwrap(), plain);
    } else {
        // The wrong checksum was checked first and dropped the parts: the
        // right one is told the copy changed (or is now empty), and the
        // upload starts again.
        assert!(
            right.code() == "UPLOAD_OFFSET_MISMATCH" || right.detail_code() == "COPY_INCOMPLETE",
            "{}",
            right.body
        );
        assert_eq!(state.body["data"]["state"], "none");
    }
}
