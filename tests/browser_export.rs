//! Browser tests of `exportData` (wasm-bindgen-test in headless Chromium)
//! against real handover-server processes started by
//! `tests/js/support/run-wasm-tests.mjs` (part of `scripts/test.sh`).
#![cfg(target_arch = "wasm32")]
// The server URLs and tokens are compiled in by the runner; clippy and a
// plain `cargo test` compile these tests without them, and running them so
// must fail loudly, at run time.
#![allow(clippy::option_env_unwrap)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use handover::browser::{export_data, ExportError};
use js_sys::{Function, Object, Reflect, Uint8Array, JSON};
use serde_json::Value;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn server() -> &'static str {
    option_env!("HANDOVER_TEST_SERVER")
        .expect("HANDOVER_TEST_SERVER unset: run these tests through scripts/test.sh")
}

fn faulty_server() -> &'static str {
    option_env!("HANDOVER_TEST_FAULTY_SERVER")
        .expect("HANDOVER_TEST_FAULTY_SERVER unset: run through scripts/test.sh")
}

/// (token, company) of a generated demo user; each test uses its own user
/// so the per-user rate limits do not interfere.
fn user(name: &str) -> (String, String) {
    let tokens: HashMap<String, Value> = serde_json::from_str(
        option_env!("HANDOVER_TEST_TOKENS")
            .expect("HANDOVER_TEST_TOKENS unset: run through scripts/test.sh"),
    )
    .unwrap();
    let u = &tokens[name];
    (
        u["token"].as_str().unwrap().into(),
        u["company"].as_str().unwrap().into(),
    )
}

fn set(o: &JsValue, k: &str, v: impl Into<JsValue>) {
    Reflect::set(o, &k.into(), &v.into()).unwrap();
}

fn get(o: &JsValue, k: &str) -> JsValue {
    Reflect::get(o, &k.into()).unwrap()
}

fn options(base: &str, who: &str, format: &str, types: &[&str]) -> JsValue {
    let (token, company) = user(who);
    let o: JsValue = Object::new().into();
    set(&o, "baseUrl", base);
    set(&o, "token", token);
    set(&o, "companyId", company);
    set(&o, "format", format);
    set(
        &o,
        "dataTypes",
        JSON::parse(&serde_json::to_string(types).unwrap()).unwrap(),
    );
    set(&o, "download", false);
    set(&o, "pageSize", 25);
    set(&o, "retryBaseMs", 5);
    o
}

async fn blob_bytes(result: &JsValue) -> Vec<u8> {
    let blob: web_sys::Blob = get(result, "blob").unchecked_into();
    let buf = JsFuture::from(blob.array_buffer()).await.unwrap();
    Uint8Array::new(&buf).to_vec()
}

fn code_of(e: &JsValue) -> String {
    assert!(e.is_instance_of::<js_sys::Error>(), "a real Error: {e:?}");
    assert!(
        e.dyn_ref::<ExportError>().is_some(),
        "instanceof ExportError: {e:?}"
    );
    get(e, "code").as_string().unwrap()
}

/// A plain API call from the test (not through the module).
async fn api(method: &str, url: &str, who: &str, body: Option<&str>) -> (u16, Vec<u8>) {
    let (token, company) = user(who);
    let init = web_sys::RequestInit::new();
    init.set_method(method);
    if let Some(b) = body {
        init.set_body(&JsValue::from_str(b));
    }
    let req = web_sys::Request::new_with_str_and_init(url, &init).unwrap();
    req.headers()
        .set("Authorization", &format!("Bearer {token}"))
        .unwrap();
    req.headers().set("X-Company-ID", &company).unwrap();
    req.headers()
        .set("Content-Type", "application/json")
        .unwrap();
    let window = web_sys::window().unwrap();
    let resp: web_sys::Response = JsFuture::from(window.fetch_with_request(&req))
        .await
        .unwrap()
        .unchecked_into();
    let buf = JsFuture::from(resp.array_buffer().unwrap()).await.unwrap();
    (resp.status(), Uint8Array::new(&buf).to_vec())
}

async fn pause(ms: i32) {
    let p = js_sys::Promise::new(&mut |resolve, _| {
        web_sys::window()
            .unwrap()
            .set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms)
            .unwrap();
    });
    JsFuture::from(p).await.unwrap();
}

/// The details of `who`'s most recent export, as the server sees it.
async fn latest_export(who: &str) -> Value {
    let (_, list) = api(
        "GET",
        &format!("{}/api/data/export?limit=1", server()),
        who,
        None,
    )
    .await;
    let list: Value = serde_json::from_slice(&list).unwrap();
    let id = list["data"]["requests"][0]["request_id"]
        .as_str()
        .expect("the user has an export");
    let (_, d) = api(
        "GET",
        &format!("{}/api/data/export/{id}", server()),
        who,
        None,
    )
    .await;
    serde_json::from_slice(&d).unwrap()
}

/// The same export built by the server (server delivery), downloaded.
async fn server_build(who: &str, format: &str, types: &[&str]) -> Vec<u8> {
    let body = serde_json::json!({ "export_format": format, "data_types": types }).to_string();
    let (status, created) = api(
        "POST",
        &format!("{}/api/data/export", server()),
        who,
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&created));
    let id = serde_json::from_slice::<Value>(&created).unwrap()["data"]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Wait for the server's worker: a bounded poll of the export's status.
    for _ in 0..200 {
        let (_, d) = api(
            "GET",
            &format!("{}/api/data/export/{id}", server()),
            who,
            None,
        )
        .await;
        let status = serde_json::from_slice::<Value>(&d).unwrap()["data"]["status"]
            .as_str()
            .unwrap()
            .to_string();
        if status == "completed" {
            let (s, file) = api(
                "GET",
                &format!("{}/api/data/export/{id}/download", server()),
                who,
                None,
            )
            .await;
            assert_eq!(s, 200);
            return file;
        }
        assert_ne!(status, "failed");
        pause(50).await;
    }
    panic!("the server build of {id} did not complete in 10 s");
}

fn normalise_json(bytes: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(bytes).unwrap();
    v["export"]["request_id"] = Value::Null;
    v["export"]["generated_at"] = Value::Null;
    v
}

/// The data sheets of a workbook, cell by cell as a reader sees them
/// (everything but the Summary sheet, whose request id and time differ
/// between two requests). Cells, not XML: the server writes its sheets in
/// rust_xlsxwriter's constant-memory mode (inline strings).
fn data_sheets(bytes: &[u8]) -> Vec<(String, Vec<Vec<String>>)> {
    use calamine::Reader as _;
    let mut wb: calamine::Xlsx<_> =
        calamine::open_workbook_from_rs(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let mut out = Vec::new();
    for name in wb.sheet_names() {
        if name == "Summary" {
            continue;
        }
        let range = wb.worksheet_range(&name).unwrap();
        let rows = range
            .rows()
            .map(|r| r.iter().map(|c| format!("{c:?}")).collect())
            .collect();
        out.push((name, rows));
    }
    assert!(!out.is_empty());
    out
}

const TYPES: [&str; 5] = [
    "user_profile",
    "payment_history",
    "membership_data",
    "recovery_cases",
    "consent_data",
];

#[wasm_bindgen_test]
async fn csv_built_in_the_browser_equals_the_server_build() {
    let result = export_data(options(server(), "user_0001", "csv", &TYPES))
        .await
        .unwrap();
    let bytes = blob_bytes(&result).await;
    assert_eq!(
        get(&result, "byteSize").as_f64().unwrap() as usize,
        bytes.len()
    );
    assert!(get(&result, "requestId")
        .as_string()
        .unwrap()
        .starts_with("export_"));
    assert_eq!(
        get(&result, "filename").as_string().unwrap(),
        format!("{}.csv", get(&result, "requestId").as_string().unwrap())
    );
    let sha = get(&result, "sha256").as_string().unwrap();
    assert_eq!(sha, handover_sha(&bytes));
    assert_eq!(
        bytes,
        server_build("user_0001", "csv", &TYPES).await,
        "byte-identical to the server's file"
    );
    // The server recorded what was handed over.
    let id = get(&result, "requestId").as_string().unwrap();
    let (_, d) = api(
        "GET",
        &format!("{}/api/data/export/{id}", server()),
        "user_0001",
        None,
    )
    .await;
    let d: Value = serde_json::from_slice(&d).unwrap();
    assert_eq!(d["data"]["status"], "completed");
    assert_eq!(d["data"]["sha256"], sha.as_str());
    assert_eq!(
        d["data"]["record_count"].as_f64(),
        get(&result, "recordCount").as_f64()
    );
}

fn handover_sha(bytes: &[u8]) -> String {
    let mut h = handover::Sha256Stream::default();
    h.update(bytes);
    h.finish_hex()
}

#[wasm_bindgen_test]
async fn json_built_in_the_browser_equals_the_server_build() {
    let result = export_data(options(server(), "user_0002", "json", &TYPES))
        .await
        .unwrap();
    let bytes = blob_bytes(&result).await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        v["metadata"]["total_records"].as_f64(),
        get(&result, "recordCount").as_f64()
    );
    assert_eq!(
        normalise_json(&bytes),
        normalise_json(&server_build("user_0002", "json", &TYPES).await)
    );
}

#[wasm_bindgen_test]
async fn xlsx_built_in_the_browser_equals_the_server_build() {
    let result = export_data(options(server(), "user_0003", "xlsx", &TYPES))
        .await
        .unwrap();
    let bytes = blob_bytes(&result).await;
    assert!(bytes.starts_with(b"PK"));
    assert_eq!(
        data_sheets(&bytes),
        data_sheets(&server_build("user_0003", "xlsx", &TYPES).await)
    );
}

#[wasm_bindgen_test]
async fn progress_is_reported_per_page_monotonic_and_ends_at_100() {
    let events: Rc<RefCell<Vec<Value>>> = Rc::default();
    let sink = events.clone();
    let cb = Closure::<dyn FnMut(JsValue)>::new(move |p: JsValue| {
        let text = JSON::stringify(&p).unwrap().as_string().unwrap();
        sink.borrow_mut().push(serde_json::from_str(&text).unwrap());
    });
    let o = options(
        server(),
        "user_0004",
        "csv",
        &["payment_history", "recovery_cases"],
    );
    set(
        &o,
        "onProgress",
        cb.as_ref().unchecked_ref::<Function>().clone(),
    );
    let result = export_data(o).await.unwrap();
    let events = events.borrow();
    let total = get(&result, "recordCount").as_f64().unwrap() as u64;
    let pages = total.div_ceil(25) as usize + 2;
    assert!(
        events.len() >= pages,
        "at least one event per page: {} events for ~{pages} pages",
        events.len()
    );
    let mut last_pct = 0;
    let mut last_records = 0;
    let mut last_bytes = 0;
    for e in events.iter() {
        let pct = e["percentage"].as_u64().unwrap();
        let rec = e["recordsProcessed"].as_u64().unwrap();
        let bytes = e["bytesWritten"].as_u64().unwrap();
        assert!(
            pct >= last_pct && rec >= last_records && bytes >= last_bytes,
            "monotonic: {e}"
        );
        assert!(e["totalRecords"].as_u64().unwrap() >= rec);
        (last_pct, last_records, last_bytes) = (pct, rec, bytes);
    }
    let end = events.last().unwrap();
    assert_eq!(end["percentage"], 100);
    assert_eq!(end["recordsProcessed"], end["totalRecords"]);
    assert_eq!(end["recordsProcessed"].as_u64().unwrap(), total);
    assert_eq!(
        end["bytesWritten"].as_f64(),
        get(&result, "byteSize").as_f64()
    );
    assert_eq!(
        events.iter().filter(|e| e["percentage"] == 100).count(),
        1,
        "100 only at the end"
    );
    assert!(events.iter().any(|e| e["currentType"] == "recovery_cases"));
}

/// Counts calls of URL.createObjectURL (a download needs one).
fn count_object_urls() -> Rc<RefCell<u32>> {
    let count: Rc<RefCell<u32>> = Rc::default();
    let c = count.clone();
    let url_ctor = get(&js_sys::global(), "URL");
    let original: Function = get(&url_ctor, "createObjectURL").unchecked_into();
    let wrapper = Closure::<dyn FnMut(JsValue) -> JsValue>::new(move |blob: JsValue| {
        *c.borrow_mut() += 1;
        original.call1(&JsValue::NULL, &blob).unwrap()
    });
    set(&url_ctor, "createObjectURL", wrapper.into_js_value());
    count
}

#[wasm_bindgen_test]
async fn abort_mid_export_rejects_aborted_tells_the_server_and_downloads_nothing() {
    let urls = count_object_urls();
    let controller = web_sys::AbortController::new().unwrap();
    let c = controller.clone();
    let pages = Rc::new(RefCell::new(0));
    let p = pages.clone();
    let cb = Closure::<dyn FnMut(JsValue)>::new(move |_| {
        *p.borrow_mut() += 1;
        if *p.borrow() == 3 {
            c.abort();
        }
    });
    let o = options(server(), "user_0005", "xlsx", &TYPES);
    set(
        &o,
        "onProgress",
        cb.as_ref().unchecked_ref::<Function>().clone(),
    );
    set(&o, "signal", controller.signal());
    set(&o, "download", true);
    let err = export_data(o).await.unwrap_err();
    assert_eq!(code_of(&err), "ABORTED");
    assert_eq!(*pages.borrow(), 3, "stopped within the current request");
    assert_eq!(*urls.borrow(), 0, "no download happened");
    let d = latest_export("user_0005").await;
    assert_eq!(d["data"]["status"], "failed");
    assert_eq!(d["data"]["failure_reason"], "cancelled");
    // An already-aborted signal makes no request at all.
    let o = options(server(), "user_0005", "csv", &TYPES);
    set(&o, "signal", controller.signal());
    assert_eq!(code_of(&export_data(o).await.unwrap_err()), "ABORTED");
}

#[wasm_bindgen_test]
async fn the_download_starts_with_the_file_name() {
    let urls = count_object_urls();
    let o = options(server(), "user_0011", "json", &["user_profile"]);
    set(&o, "download", true);
    set(&o, "filename", "my-data.json");
    let result = export_data(o).await.unwrap();
    assert_eq!(
        get(&result, "filename").as_string().unwrap(),
        "my-data.json"
    );
    assert_eq!(*urls.borrow(), 1, "one object URL for the anchor");
}

#[wasm_bindgen_test]
async fn a_rate_limited_create_rejects_with_retry_after() {
    for _ in 0..5 {
        export_data(options(server(), "user_0006", "json", &["user_profile"]))
            .await
            .unwrap();
    }
    let err = export_data(options(server(), "user_0006", "json", &["user_profile"]))
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "RATE_LIMIT_EXCEEDED");
    assert_eq!(get(&err, "status").as_f64(), Some(429.0));
    let retry = get(&err, "retryAfter").as_f64().unwrap();
    assert!(retry > 3000.0 && retry <= 3600.0, "{retry}");
}

#[wasm_bindgen_test]
async fn bad_options_are_rejected_before_any_request() {
    type Breaks = Box<dyn Fn(&JsValue)>;
    let cases: Vec<(Breaks, &str)> = vec![
        (Box::new(|o| set(o, "format", "pdf")), "INVALID_FORMAT"),
        (Box::new(|o| set(o, "token", "")), "INVALID_OPTIONS"),
        (
            Box::new(|o| set(o, "companyId", JsValue::NULL)),
            "INVALID_OPTIONS",
        ),
        (
            Box::new(|o| set(o, "baseUrl", "ftp://x")),
            "INVALID_OPTIONS",
        ),
        (
            Box::new(|o| set(o, "dataTypes", js_sys::Array::new())),
            "INVALID_DATA_TYPE",
        ),
        (
            Box::new(|o| set(o, "dataTypes", JSON::parse(r#"["a","a"]"#).unwrap())),
            "INVALID_DATA_TYPE",
        ),
        (
            Box::new(|o| set(o, "dateRange", JSON::parse(r#"{"start":"soon"}"#).unwrap())),
            "DATE_RANGE_INVALID",
        ),
        (Box::new(|o| set(o, "pageSize", 0)), "INVALID_OPTIONS"),
        (
            Box::new(|o| set(o, "onProgress", "not a function")),
            "INVALID_OPTIONS",
        ),
        (Box::new(|o| set(o, "signal", 5)), "INVALID_OPTIONS"),
        (Box::new(|o| set(o, "fromat", "csv")), "INVALID_OPTIONS"),
        // What JSON text would drop: a misspelt callback, a NaN.
        (
            Box::new(|o| set(o, "onprogress", js_sys::Function::new_no_args(""))),
            "INVALID_OPTIONS",
        ),
        (
            Box::new(|o| set(o, "pageSize", f64::NAN)),
            "INVALID_OPTIONS",
        ),
        (
            Box::new(|o| {
                set(
                    o,
                    "dateRange",
                    JSON::parse(r#"{"from":"2024-01-01T00:00:00Z"}"#).unwrap(),
                )
            }),
            "DATE_RANGE_INVALID",
        ),
        // What a header cannot carry.
        (Box::new(|o| set(o, "token", "hov_a\nb")), "INVALID_OPTIONS"),
        (
            Box::new(|o| set(o, "companyId", "compañía")),
            "INVALID_OPTIONS",
        ),
        (
            Box::new(|o| {
                let metadata = js_sys::Object::new();
                set(&metadata, "note", "x".repeat(5000));
                set(o, "metadata", metadata)
            }),
            "INVALID_OPTIONS",
        ),
        // This test runs on the page, which has no OPFS.
        (Box::new(|o| set(o, "storage", "opfs")), "STORAGE_ERROR"),
    ];
    for (break_it, code) in cases {
        let o = options(server(), "user_0007", "csv", &TYPES);
        break_it(&o);
        let err = export_data(o).await.unwrap_err();
        assert_eq!(code_of(&err), code, "{:?}", get(&err, "message"));
    }
    assert_eq!(
        code_of(&export_data(JsValue::UNDEFINED).await.unwrap_err()),
        "INVALID_OPTIONS"
    );
    let (_, list) = api(
        "GET",
        &format!("{}/api/data/export", server()),
        "user_0007",
        None,
    )
    .await;
    let list: Value = serde_json::from_slice(&list).unwrap();
    assert_eq!(list["data"]["total"], 0, "no request reached the server");
}

#[wasm_bindgen_test]
async fn server_codes_reach_the_caller() {
    let o = options(server(), "user_0007", "csv", &["user_profile"]);
    set(&o, "token", "hov_revoked_or_made_up");
    let err = export_data(o).await.unwrap_err();
    assert_eq!(code_of(&err), "UNAUTHORIZED");
    assert_eq!(get(&err, "status").as_f64(), Some(401.0));
    let o = options(server(), "user_0007", "csv", &["no_such_type"]);
    let err = export_data(o).await.unwrap_err();
    assert_eq!(code_of(&err), "VALIDATION_ERROR");
    assert!(get(&get(&err, "details"), "details").is_object());
}

#[wasm_bindgen_test]
async fn network_errors_fail_clearly_after_the_retries() {
    let o = options("http://127.0.0.1:9", "user_0007", "csv", &["user_profile"]);
    set(&o, "retries", 3);
    set(&o, "retryBaseMs", 1);
    let err = export_data(o).await.unwrap_err();
    assert_eq!(code_of(&err), "NETWORK_ERROR");
}

async fn survives_faults(who: &str, format: &str) -> (Vec<u8>, Vec<u8>) {
    let o = options(faulty_server(), who, format, &TYPES);
    set(&o, "pageSize", 10);
    set(&o, "retries", 12);
    let result = export_data(o)
        .await
        .expect("completes despite injected faults");
    // The faulty server really refused pages (500s and 429s; dropped
    // connections count as 200s there).
    let window = web_sys::window().unwrap();
    let resp: web_sys::Response =
        JsFuture::from(window.fetch_with_str(&format!("{}/metrics", faulty_server())))
            .await
            .unwrap()
            .unchecked_into();
    let text = JsFuture::from(resp.text().unwrap())
        .await
        .unwrap()
        .as_string()
        .unwrap();
    let count = |class: &str| -> u64 {
        let key = format!("handover_http_requests_total{{class=\"{class}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(
        count("5xx") + count("4xx") > 0,
        "faults were injected:\n{text}"
    );
    (
        blob_bytes(&result).await,
        server_build(who, format, &TYPES).await,
    )
}

#[wasm_bindgen_test]
async fn csv_survives_500s_429s_and_dropped_connections_byte_identical() {
    let (faulty, clean) = survives_faults("user_0008", "csv").await;
    assert_eq!(faulty, clean);
}

#[wasm_bindgen_test]
async fn xlsx_survives_faults_identical_data() {
    let (faulty, clean) = survives_faults("user_0009", "xlsx").await;
    assert_eq!(data_sheets(&faulty), data_sheets(&clean));
}

#[wasm_bindgen_test]
async fn json_survives_faults_identical_records() {
    let (faulty, clean) = survives_faults("user_0010", "json").await;
    assert_eq!(normalise_json(&faulty), normalise_json(&clean));
}

#[wasm_bindgen_test]
async fn exhausted_retries_fail_clearly_and_the_server_is_told() {
    let broken = option_env!("HANDOVER_TEST_BROKEN_SERVER")
        .expect("HANDOVER_TEST_BROKEN_SERVER unset: run through scripts/test.sh");
    let o = options(broken, "user_0012", "csv", &["payment_history"]);
    set(&o, "retries", 3);
    set(&o, "retryBaseMs", 1);
    set(&o, "maxRetryAfterSeconds", 0);
    let err = export_data(o).await.unwrap_err();
    let code = code_of(&err);
    assert!(
        ["INTERNAL_ERROR", "NETWORK_ERROR", "RATE_LIMIT_EXCEEDED"].contains(&code.as_str()),
        "{code}"
    );
    let message = get(&err, "message").as_string().unwrap();
    assert!(!message.is_empty());
    let d = latest_export("user_0012").await;
    assert_eq!(d["data"]["status"], "failed");
    assert_eq!(d["data"]["failure_reason"], format!("client error: {code}"));
}

#[wasm_bindgen_test]
async fn a_stalled_server_times_out_and_the_export_fails_clearly() {
    let stalled = option_env!("HANDOVER_TEST_STALLED_SERVER")
        .expect("HANDOVER_TEST_STALLED_SERVER unset: run through scripts/test.sh");
    let o = options(stalled, "user_0013", "json", &["payment_history"]);
    set(&o, "retries", 2);
    set(&o, "retryBaseMs", 1);
    set(&o, "requestTimeoutMs", 300);
    let err = export_data(o).await.unwrap_err();
    assert_eq!(code_of(&err), "NETWORK_ERROR");
    let message = get(&err, "message").as_string().unwrap();
    assert!(message.contains("no answer within 300 ms"), "{message}");
    let d = latest_export("user_0013").await;
    assert_eq!(d["data"]["status"], "failed", "the server was told");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn decrypt(data: &JsValue, key: &str) -> Result<Vec<u8>, JsValue> {
    let blob =
        handover::browser::decrypt_export(data.clone(), key.into(), JsValue::UNDEFINED).await?;
    let buf = JsFuture::from(blob.array_buffer()).await.unwrap();
    Ok(Uint8Array::new(&buf).to_vec())
}

fn bytes_js(b: &[u8]) -> JsValue {
    Uint8Array::from(b).into()
}

#[wasm_bindgen_test]
async fn a_kept_copy_is_ciphertext_on_the_server_survives_lost_answers_and_decrypts_to_the_file() {
    // The faulty server loses answers to stored parts (500s, 429s, dropped
    // connections): the upload must find where to go on, never store twice.
    let who = "user_0014";
    let o = options(faulty_server(), who, "json", &TYPES);
    set(&o, "pageSize", 50);
    set(&o, "retries", 12);
    set(&o, "keepCopy", true);
    // The smallest parts: the copy goes up in several, each of which may
    // lose its answer.
    set(&o, "copyPartBytes", 65536);
    set(&o, "copyLinkBase", "https://app.example/export?tab=1#stale");
    let result = export_data(o).await.expect("the export completes");
    assert!(
        get(&result, "copyError").is_undefined(),
        "the copy was kept: {:?}",
        get(&result, "copyError")
    );
    let file = blob_bytes(&result).await;
    let id = get(&result, "requestId").as_string().unwrap();
    let copy = get(&result, "copy");
    let key = get(&copy, "key").as_string().unwrap();
    let link = get(&copy, "link").as_string().unwrap();
    assert_eq!(key.len(), 43);
    assert_eq!(
        link,
        format!("https://app.example/export?tab=1#copy={id}&key={key}"),
        "the key is only in the fragment"
    );

    let (status, ct) = api(
        "GET",
        &format!("{}/api/data/export/{id}/download", faulty_server()),
        who,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ct.len() as f64, get(&copy, "byteSize").as_f64().unwrap());
    assert_eq!(
        ct.len() as u64,
        handover::crypto::ciphertext_len(file.len() as u64),
        "each byte stored once"
    );
    let (_, state) = api(
        "GET",
        &format!("{}/api/data/export/{id}/copy", faulty_server()),
        who,
        None,
    )
    .await;
    let state: Value = serde_json::from_slice(&state).unwrap();
    assert!(
        state["data"]["parts"].as_u64().unwrap() >= 2,
        "uploaded in several parts: {state} ({} bytes)",
        file.len()
    );
    let probe = &file[file.len() / 2..file.len() / 2 + 40];
    assert!(!contains(&ct, probe), "the download is ciphertext");

    assert_eq!(decrypt(&bytes_js(&ct), &key).await.unwrap(), file);
    let as_blob: JsValue =
        web_sys::Blob::new_with_u8_array_sequence(&js_sys::Array::of1(&bytes_js(&ct)))
            .unwrap()
            .into();
    assert_eq!(
        decrypt(&as_blob, &link).await.unwrap(),
        file,
        "the link opens it too"
    );

    let wrong = handover::crypto::DataKey::generate().unwrap().to_text();
    let e = decrypt(&bytes_js(&ct), &wrong).await.unwrap_err();
    assert_eq!(code_of(&e), "DECRYPTION_FAILED");
    assert!(get(&e, "message")
        .as_string()
        .unwrap()
        .contains("wrong key"));
    let mut altered = ct.clone();
    let at = altered.len() / 2;
    altered[at] ^= 0x20;
    assert_eq!(
        code_of(&decrypt(&bytes_js(&altered), &key).await.unwrap_err()),
        "DECRYPTION_FAILED"
    );
    let e = decrypt(&bytes_js(&ct[..ct.len() - 20]), &key)
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), "DECRYPTION_FAILED");
    assert_eq!(
        code_of(&decrypt(&bytes_js(&ct), "not-a-key").await.unwrap_err()),
        "INVALID_KEY"
    );
    assert_eq!(
        code_of(
            &decrypt(&bytes_js(b"plain text, not a copy"), &key)
                .await
                .unwrap_err()
        ),
        "INVALID_COPY"
    );
}

#[wasm_bindgen_test]
async fn decrypt_export_rejects_reordered_and_truncated_chunks() {
    use handover::crypto::{DataKey, Encryptor, CHUNK_SIZE, HEADER_SIZE, TAG_SIZE};
    let key = DataKey::generate().unwrap();
    let plain: Vec<u8> = (0..3 * CHUNK_SIZE + 99).map(|i| (i % 251) as u8).collect();
    let enc = Encryptor::new(&key).unwrap();
    let mut ct = enc.header().to_vec();
    ct.extend(enc.finish(&plain).unwrap());
    assert_eq!(
        decrypt(&bytes_js(&ct), &key.to_text()).await.unwrap(),
        plain
    );
    let s = CHUNK_SIZE + TAG_SIZE;
    let mut swapped = ct.clone();
    swapped[HEADER_SIZE..HEADER_SIZE + s]
        .copy_from_slice(&ct[HEADER_SIZE + s..HEADER_SIZE + 2 * s]);
    swapped[HEADER_SIZE + s..HEADER_SIZE + 2 * s]
        .copy_from_slice(&ct[HEADER_SIZE..HEADER_SIZE + s]);
    let e = decrypt(&bytes_js(&swapped), &key.to_text())
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), "DECRYPTION_FAILED");
    let e = decrypt(&bytes_js(&ct[..HEADER_SIZE + 2 * s]), &key.to_text())
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), "DECRYPTION_FAILED");
    assert_eq!(
        get(&get(&e, "details"), "reason").as_string().unwrap(),
        "truncated"
    );
}

/// Options for an export of the hostile server's one data type, `t`, in
/// the misbehaviour `token` picks.
fn hostile_options(hostile: &str, token: &str) -> JsValue {
    let o: JsValue = Object::new().into();
    set(&o, "baseUrl", hostile);
    set(&o, "token", token);
    set(&o, "companyId", "c");
    set(&o, "format", "csv");
    set(&o, "dataTypes", JSON::parse(r#"["t"]"#).unwrap());
    set(&o, "download", false);
    o
}

#[wasm_bindgen_test]
async fn a_hostile_server_cannot_loop_the_export_take_the_token_elsewhere_or_flood_memory() {
    let hostile = option_env!("HANDOVER_TEST_HOSTILE_SERVER")
        .expect("HANDOVER_TEST_HOSTILE_SERVER unset: run through scripts/test.sh");
    for (token, code, says) in [
        ("cycle", "INVALID_RESPONSE", "back to an earlier cursor"),
        (
            "more",
            "RECORD_COUNT_MISMATCH",
            "more records of t than the 3 its manifest announced",
        ),
        ("elsewhere", "INVALID_RESPONSE", "another origin"),
        ("backslash", "INVALID_RESPONSE", "another origin"),
        ("tab", "INVALID_RESPONSE", "another origin"),
        ("huge", "INVALID_RESPONSE", "too large"),
        ("endless", "INVALID_RESPONSE", "too large"),
    ] {
        let o = hostile_options(hostile, token);
        set(&o, "retries", 2);
        set(&o, "retryBaseMs", 1);
        let err = export_data(o).await.unwrap_err();
        assert_eq!(code_of(&err), code, "{token}");
        let message = get(&err, "message").as_string().unwrap();
        assert!(message.contains(says), "{token}: {message}");
    }
    // An answer that keeps coming, a byte at a time, is cut off when the
    // request timeout has passed since it began, not read on for as long
    // as the server pleases.
    let o = hostile_options(hostile, "trickle");
    set(&o, "retries", 1);
    set(&o, "requestTimeoutMs", 500);
    let err = export_data(o).await.unwrap_err();
    assert_eq!(code_of(&err), "NETWORK_ERROR");
    let message = get(&err, "message").as_string().unwrap();
    assert!(message.contains("no answer within 500 ms"), "{message}");
    let window = web_sys::window().unwrap();
    let resp: web_sys::Response =
        JsFuture::from(window.fetch_with_str(&format!("{hostile}/__seen")))
            .await
            .unwrap()
            .unchecked_into();
    let text = JsFuture::from(resp.text().unwrap())
        .await
        .unwrap()
        .as_string()
        .unwrap();
    let seen: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(
        seen.iter()
            .all(|r| !r["path"].as_str().unwrap().contains("steal")),
        "nothing was sent to the other origin: {text}"
    );
    // The answer without a length was dropped once past the cap, not read
    // to its end first.
    let endless = seen.iter().find(|r| r["path"] == "/__endless");
    assert!(
        endless.is_some_and(|r| r["finished"] == false),
        "the client hung up on the endless answer: {text}"
    );
    let trickle = seen.iter().find(|r| r["path"] == "/__trickle");
    assert!(
        trickle.is_some_and(|r| r["finished"] == false),
        "the client hung up on the trickling answer: {text}"
    );
    let streams = seen
        .iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("/stream"))
        .count();
    assert_eq!(
        streams, 2,
        "the cycle and the excess were refused at once, not retried: {text}"
    );
}
