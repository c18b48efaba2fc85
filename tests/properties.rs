//! Property tests of what reads untrusted bytes: the decryptor of export
//! files and the record-page decoder. Whatever they are given, they answer
//! with a value or an error, never a panic; and what they accept is exactly
//! what was written.
#![cfg(not(target_arch = "wasm32"))]

use handover::crypto::{decrypt_all, DataKey, Encryptor, CHUNK_SIZE};
use handover::model::{Column, ColumnKind};
use handover::wire::decode_frame;
use proptest::prelude::*;

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
