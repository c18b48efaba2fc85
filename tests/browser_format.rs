//! Browser tests of `formatRecords` (wasm-bindgen-test in headless Chromium):
//! the bytes built in the browser equal the native golden files.
#![cfg(target_arch = "wasm32")]

#[path = "support/fixture.rs"]
mod fixture;

use handover::browser::{format_records, ExportError};
use js_sys::{Object, Reflect, Uint8Array, JSON};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn options(format: &str) -> JsValue {
    let o = Object::new();
    let set = |k: &str, v: JsValue| Reflect::set(&o, &k.into(), &v).unwrap();
    set("format", format.into());
    set("requestId", fixture::REQUEST_ID.into());
    set("generatedAt", fixture::GENERATED_AT.into());
    let range =
        JSON::parse(r#"{"start":"1999-01-01T00:00:00Z","end":"2025-10-25T19:50:00Z"}"#).unwrap();
    set("dateRange", range);
    set("userId", "user_456".into());
    o.into()
}

fn bytes_of(v: Uint8Array) -> Vec<u8> {
    v.to_vec()
}

fn error_code(e: &JsValue) -> String {
    assert!(
        e.is_instance_of::<js_sys::Error>(),
        "a real Error, not a string: {e:?}"
    );
    assert!(
        e.dyn_ref::<ExportError>().is_some(),
        "instanceof ExportError"
    );
    let stack = Reflect::get(e, &"stack".into()).unwrap();
    assert!(
        stack.as_string().is_some_and(|s| !s.is_empty()),
        "has a stack"
    );
    Reflect::get(e, &"code".into())
        .unwrap()
        .as_string()
        .unwrap()
}

#[wasm_bindgen_test]
fn json_in_the_browser_equals_native_golden() {
    let out = format_records(fixture::FIXTURE_JSON.into(), options("json")).unwrap();
    assert_eq!(bytes_of(out), fixture::GOLDEN_JSON);
}

#[wasm_bindgen_test]
fn csv_in_the_browser_equals_native_golden() {
    let out = format_records(fixture::FIXTURE_JSON.into(), options("csv")).unwrap();
    assert_eq!(bytes_of(out), fixture::GOLDEN_CSV);
}

#[wasm_bindgen_test]
fn xlsx_in_the_browser_equals_native_golden() {
    let out = format_records(fixture::FIXTURE_JSON.into(), options("xlsx")).unwrap();
    let out = bytes_of(out);
    assert_eq!(out.len(), fixture::GOLDEN_XLSX.len());
    assert!(
        out == fixture::GOLDEN_XLSX,
        "XLSX bytes differ from the native build"
    );
}

#[wasm_bindgen_test]
fn js_objects_and_dates_are_accepted() {
    let data = JSON::parse(r#"{"payment_history":[{"id":"p1","amount_cents":2999,"paid":true}]}"#)
        .unwrap();
    let rows = Reflect::get(&data, &"payment_history".into()).unwrap();
    let row = Reflect::get(&rows, &0.into()).unwrap();
    let date = js_sys::Date::new(&"2025-10-24T19:50:00.000Z".into());
    Reflect::set(&row, &"created_at".into(), &date).unwrap();
    let out = format_records(data, options("json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes_of(out)).unwrap();
    assert_eq!(
        v["export"]["data"]["payment_history"][0],
        serde_json::json!({"id":"p1","amount_cents":2999,"paid":true,"created_at":"2025-10-24T19:50:00.000Z"})
    );
}

#[wasm_bindgen_test]
fn unknown_format_throws_invalid_format() {
    let e = format_records(fixture::FIXTURE_JSON.into(), options("pdf")).unwrap_err();
    assert_eq!(error_code(&e), "INVALID_FORMAT");
}

#[wasm_bindgen_test]
fn non_object_records_throw_invalid_record() {
    let e = format_records(JSON::parse(r#"{"a":[1,2]}"#).unwrap(), options("csv")).unwrap_err();
    assert_eq!(error_code(&e), "INVALID_RECORD");
    let e = format_records(JSON::parse(r#"[{"a":1}]"#).unwrap(), options("csv")).unwrap_err();
    assert_eq!(error_code(&e), "INVALID_RECORD");
    let e = format_records(JSON::parse(r#"{"a":{"x":1}}"#).unwrap(), options("csv")).unwrap_err();
    assert_eq!(error_code(&e), "INVALID_RECORD");
}

#[wasm_bindgen_test]
fn bad_dates_in_a_datetime_column_throw_invalid_date() {
    let opts = options("xlsx");
    let columns = JSON::parse(r#"{"a":[{"name":"at","kind":"datetime"}]}"#).unwrap();
    Reflect::set(&opts, &"columns".into(), &columns).unwrap();
    let e =
        format_records(JSON::parse(r#"{"a":[{"at":"not a date"}]}"#).unwrap(), opts).unwrap_err();
    assert_eq!(error_code(&e), "INVALID_DATE");
    let msg = Reflect::get(&e, &"message".into())
        .unwrap()
        .as_string()
        .unwrap();
    assert!(msg.contains("record 0") && msg.contains("\"at\""), "{msg}");
}

#[wasm_bindgen_test]
fn bad_options_throw_invalid_options() {
    let e = format_records(JSON::parse("{}").unwrap(), JsValue::UNDEFINED).unwrap_err();
    assert_eq!(error_code(&e), "INVALID_OPTIONS");
    let opts = options("csv");
    Reflect::set(&opts, &"fromat".into(), &"csv".into()).unwrap();
    let e = format_records(JSON::parse("{}").unwrap(), opts).unwrap_err();
    assert_eq!(
        error_code(&e),
        "INVALID_OPTIONS",
        "unknown option names are typos, not ignored"
    );
    let opts = options("csv");
    Reflect::set(&opts, &"generatedAt".into(), &"soon".into()).unwrap();
    let e = format_records(JSON::parse("{}").unwrap(), opts).unwrap_err();
    assert_eq!(error_code(&e), "INVALID_OPTIONS");
}

/// The module grows its memory in large steps: each growth costs the page a
/// full garbage collection in V8, and growing a page or two at a time made
/// `formatRecords` on JSON text quadratic (400 collections for 100,000
/// records).
#[wasm_bindgen_test]
fn memory_grows_in_large_steps() {
    use core::arch::wasm32::memory_size;
    let start = memory_size(0);
    let (mut size, mut grows) = (start, 0);
    let mut kept = Vec::new();
    for i in 0..2048 {
        kept.push(vec![i as u8; 16 * 1024]);
        let now = memory_size(0);
        if now != size {
            grows += 1;
            size = now;
        }
    }
    assert_eq!(kept.iter().map(Vec::len).sum::<usize>(), 32 << 20);
    assert!(
        (size - start) * 65536 >= 32 << 20,
        "grew {} pages",
        size - start
    );
    // Page by page this is about 500 growths; in steps of an eighth, about 20.
    assert!(grows <= 40, "the memory grew {grows} times for 32 MiB");
}
