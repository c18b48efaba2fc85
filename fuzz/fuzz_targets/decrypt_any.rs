//! The decryptor on arbitrary bytes (what a tampered download may hold):
//! an error, never a panic.
#![no_main]

use handover::crypto::{decrypt_all, DataKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decrypt_all(&DataKey::from_bytes([9; 32]), data);
});
