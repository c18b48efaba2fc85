//! Property tests of what reads untrusted input: the decryptor of export
//! files, the record-page decoder, and `exportData`'s options parser.
//! Whatever they are given, they answer with a value or an error, never a
//! panic; and what they accept is exactly what was written.
#![cfg(not(target_arch = "wasm32"))]

use handover::crypto::{decrypt_all, DataKey, Encryptor, CHUNK_SIZE};
use handover::model::{Column, ColumnKind};
use handover::options::parse_options;
use handover::wire::decode_frame;
use proptest::prelude::*;
use serde_json::{json, Value};

fn encrypt(key: &DataKey, plain: &[u8], split: usize) -> Vec<u8> {
    let mut enc = Encryptor::new(key).unwrap();
    let mut file = enc.header().to_vec();
    let (a, b) = plain.split_at(split.min(plain.len()));
    file.extend(enc.push(a).unwrap());
    file.extend(enc.finish(b).unwrap());
    file
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn whatever_is_encrypted_decrypts_to_itself(plain in proptest::collection::vec(any::<u8>(), 0..3 * CHUNK_SIZE), split in 0usize..3 * CHUNK_SIZE) {
        let key = DataKey::from_bytes([3; 32]);
        let file = encrypt(&key, &plain, split);
        prop_assert_eq!(decrypt_all(&key, &file).unwrap(), plain);
    }

    #[test]
    fn any_changed_truncated_or_extended_file_is_refused(
        plain in proptest::collection::vec(any::<u8>(), 1..2 * CHUNK_SIZE + 10),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let key = DataKey::from_bytes([5; 32]);
        let file = encrypt(&key, &plain, plain.len() / 2);
        let mut flipped = file.clone();
        let i = at.index(flipped.len());
        flipped[i] ^= 1 << bit;
        prop_assert!(decrypt_all(&key, &flipped).is_err());
        let short = &file[..cut.index(file.len())];
        prop_assert!(decrypt_all(&key, short).is_err());
        let mut long = file.clone();
        long.extend(extra);
        prop_assert!(decrypt_all(&key, &long).is_err());
        prop_assert!(decrypt_all(&DataKey::from_bytes([6; 32]), &file).is_err(), "a wrong key is an error");
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decryptor(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decrypt_all(&DataKey::from_bytes([1; 32]), &bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_page_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let columns = vec![
            Column { name: "id".into(), kind: ColumnKind::String },
            Column { name: "n".into(), kind: ColumnKind::Integer },
        ];
        let _ = decode_frame(&bytes, &columns);
    }

    #[test]
    fn json_shaped_pages_never_panic_the_page_decoder(
        rows in proptest::collection::vec((".{0,12}", any::<i64>(), any::<bool>()), 0..20),
        offset in any::<u64>(),
        next in proptest::option::of("[A-Za-z0-9._-]{0,40}"),
    ) {
        let columns = vec![
            Column { name: "id".into(), kind: ColumnKind::String },
            Column { name: "n".into(), kind: ColumnKind::Integer },
        ];
        let body = serde_json::json!({
            "data_type": "t", "offset": offset,
            "rows": rows.iter().map(|(s, n, b)| if *b { serde_json::json!([s, n]) } else { serde_json::json!([n, s, b]) }).collect::<Vec<_>>(),
            "next_cursor": next,
        });
        let _ = decode_frame(body.to_string().as_bytes(), &columns);
    }
}

/// Any JSON value, a few levels deep, with the option names mixed in.
fn any_json() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        Just("baseUrl".to_string()),
        Just("token".to_string()),
        Just("companyId".to_string()),
        Just("format".to_string()),
        Just("dataTypes".to_string()),
        Just("dateRange".to_string()),
        Just("pageSize".to_string()),
        Just("retries".to_string()),
        Just("storage".to_string()),
        Just("keepCopy".to_string()),
        Just("copyLinkBase".to_string()),
        Just("csv".to_string()),
        Just("start".to_string()),
        Just("end".to_string()),
        "[a-zA-Z]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
        Just(json!("2024-01-01T00:00:00Z")),
        Just(json!("user_profile")),
        Just(json!("https://a.example")),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(name.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const OPTION_CODES: [&str; 4] = [
    "INVALID_OPTIONS",
    "INVALID_FORMAT",
    "INVALID_DATA_TYPE",
    "DATE_RANGE_INVALID",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_options_get_a_result_or_a_documented_code(v in any_json()) {
        match parse_options(&v.to_string()) {
            Ok(o) => {
                prop_assert!(!o.token.trim().is_empty() && !o.company_id.trim().is_empty());
                prop_assert!((1..=5000).contains(&o.page_size));
                prop_assert!((1..=20).contains(&o.max_attempts));
            }
            Err(e) => {
                prop_assert!(OPTION_CODES.contains(&e.code), "{}", e.code);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn valid_options_are_taken_as_given(
        page in 1u32..=5000,
        retries in 1u32..=20,
        format in prop_oneof![Just("json"), Just("csv"), Just("xlsx")],
        types in proptest::collection::btree_set("[a-z][a-z_]{0,20}", 1..5),
        keep in any::<bool>(),
    ) {
        let types: Vec<String> = types.into_iter().collect();
        let text = json!({"baseUrl": "https://api.example/", "token": "hov_t", "companyId": "c",
            "format": format, "dataTypes": types, "pageSize": page, "retries": retries,
            "keepCopy": keep}).to_string();
        let o = parse_options(&text).unwrap();
        prop_assert_eq!(o.base_url, "https://api.example");
        prop_assert_eq!(o.format.as_str(), format);
        prop_assert_eq!(o.data_types, types);
        prop_assert_eq!((o.page_size, o.max_attempts), (page, retries));
        prop_assert_eq!(o.keep_copy, keep.then_some(None));
    }

    #[test]
    fn a_base_url_with_credentials_is_refused_without_echoing_them(
        user in "[a-z]{1,8}", password in "[a-z0-9]{6,12}",
        base in prop_oneof![Just("https://"), Just("http://"), Just("//"), Just("HTTPS://"),
            Just(" https://"), Just("https:///"), Just("https://\\"), Just("/\\"), Just("ftp://")],
    ) {
        let url = format!("{base}{user}:{password}@api.example/v1");
        let e = parse_options(&json!({"baseUrl": url, "token": "t", "companyId": "c"}).to_string()).unwrap_err();
        prop_assert_eq!(e.code, "INVALID_OPTIONS");
        prop_assert!(e.message.contains("baseUrl"), "{}", e.message);
        prop_assert!(!e.message.contains(&password), "{}", e.message);
        // An @ in the path is not a credential.
        let fine = format!("https://api.example/users/@{user}?by=@{user}#@x");
        let ok = parse_options(&json!({"baseUrl": fine, "token": "t", "companyId": "c"}).to_string());
        prop_assert!(ok.is_ok());
    }

    #[test]
    fn out_of_range_numbers_are_refused(page in prop_oneof![Just(0u64), 5001u64..1_000_000]) {
        let e = parse_options(&json!({"token": "t", "companyId": "c", "pageSize": page}).to_string()).unwrap_err();
        prop_assert_eq!(e.code, "INVALID_OPTIONS");
        prop_assert!(e.message.contains("pageSize"));
    }
}

#[test]
fn a_plain_date_end_follows_a_time_of_the_same_day() {
    let range = |start: &str, end: &str| {
        parse_options(
            &json!({"token": "t", "companyId": "c", "dateRange": {"start": start, "end": end}})
                .to_string(),
        )
    };
    assert!(range("2025-01-02T10:00Z", "2025-01-02").is_ok());
    let e = range("2025-01-03", "2025-01-02T23:00Z").unwrap_err();
    assert_eq!(e.code, "DATE_RANGE_INVALID");
}

#[test]
fn options_of_the_wrong_type_are_refused_naming_them() {
    for (options, code, name) in [
        (
            json!({"pageSize": -1}),
            "INVALID_OPTIONS",
            "options.pageSize",
        ),
        (json!({"format": 5}), "INVALID_FORMAT", "options.format"),
        (
            json!({"dataTypes": "user_profile"}),
            "INVALID_DATA_TYPE",
            "options.dataTypes",
        ),
        (
            json!({"dateRange": {"start": 123}}),
            "DATE_RANGE_INVALID",
            "options.dateRange.start",
        ),
        (
            json!({"dateRange": {"from": "2025-01-01"}}),
            "DATE_RANGE_INVALID",
            "options.dateRange.from",
        ),
    ] {
        let mut o = json!({"token": "hov_t", "companyId": "c"});
        o.as_object_mut()
            .unwrap()
            .extend(options.as_object().unwrap().clone());
        let e = parse_options(&o.to_string()).unwrap_err();
        assert_eq!(e.code, code, "{o}: {}", e.message);
        assert!(
            e.message.starts_with(&format!("{name}: ")),
            "{o}: {}",
            e.message
        );
    }
}

proptest! {
    #[test]
    fn values_a_header_cannot_carry_are_refused_before_any_request(
        field in prop_oneof![Just("token"), Just("companyId")],
        bad in "[a-z]{1,4}[\r\n\u{0}\u{7f}\u{e9}\u{2603}][a-z]{1,4}",
    ) {
        let mut o = json!({"token": "hov_t", "companyId": "c"});
        o[field] = json!(bad);
        let e = parse_options(&o.to_string()).unwrap_err();
        prop_assert_eq!(e.code, "INVALID_OPTIONS");
        prop_assert!(e.message.contains(field), "{}", e.message);
    }
}

#[test]
fn surrounding_whitespace_is_trimmed_as_headers_are() {
    let o = parse_options(&json!({"token": "hov_t\n", "companyId": " company_123 "}).to_string())
        .unwrap();
    assert_eq!(
        (o.token.as_str(), o.company_id.as_str()),
        ("hov_t", "company_123")
    );
}

#[test]
fn a_date_range_with_other_keys_is_refused_not_ignored() {
    let e = parse_options(
        &json!({"token": "t", "companyId": "c", "dateRange": {"from": "2024-01-01T00:00:00Z"}})
            .to_string(),
    )
    .unwrap_err();
    assert_eq!(e.code, "DATE_RANGE_INVALID");
    assert!(e.message.contains("from"), "{}", e.message);
    let o = parse_options(
        &json!({"token": "t", "companyId": "c", "dateRange": {"start": "2024-01-01T00:00:00Z"}})
            .to_string(),
    )
    .unwrap();
    assert_eq!(
        o.date_range.and_then(|r| r.start).as_deref(),
        Some("2024-01-01T00:00:00Z")
    );
}

#[test]
fn metadata_over_the_servers_limits_is_refused_before_any_request() {
    let big = json!({"note": "x".repeat(4096)});
    let many: serde_json::Map<String, Value> =
        (0..51).map(|i| (format!("k{i}"), json!(i))).collect();
    for metadata in [big, Value::Object(many)] {
        let e = parse_options(
            &json!({"token": "t", "companyId": "c", "metadata": metadata}).to_string(),
        )
        .unwrap_err();
        assert_eq!(e.code, "INVALID_OPTIONS");
        assert!(e.message.contains("metadata"), "{}", e.message);
    }
    let fits: serde_json::Map<String, Value> =
        (0..50).map(|i| (format!("k{i}"), json!(i))).collect();
    assert!(
        parse_options(&json!({"token": "t", "companyId": "c", "metadata": fits}).to_string())
            .is_ok()
    );
}
