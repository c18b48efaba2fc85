//! The decryptor of export files and encrypted copies, on any bytes, fed
//! whole and in two pieces: an error or the plaintext, never a panic; and
//! the two ways agree.
#![no_main]

use handover::crypto::{decrypt_all, DataKey, Decryptor, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = DataKey::from_bytes([9; 32]);
    let whole = decrypt_all(&key, data);
    if data.len() < HEADER_SIZE {
        assert!(whole.is_err());
        return;
    }
    let split = HEADER_SIZE + (data.len() - HEADER_SIZE) / 2;
    let pieces = Decryptor::new(&key, &data[..HEADER_SIZE]).and_then(|mut d| {
        let mut out = d.push(&data[HEADER_SIZE..split])?;
        out.extend(d.push(&data[split..])?);
        out.extend(d.finish()?);
        Ok(out)
    });
    assert_eq!(whole.is_ok(), pieces.is_ok());
    if let (Ok(a), Ok(b)) = (whole, pieces) {
        assert_eq!(a, b);
    }
});
