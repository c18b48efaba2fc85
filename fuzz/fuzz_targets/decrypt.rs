//! The decryptor of export files and encrypted copies. The input is
//! encrypted, then one byte of the result may be changed: the unchanged
//! file decrypts to the input, whole and fed in two pieces; a changed one
//! is refused (never a panic, never wrong plaintext).
#![no_main]

use handover::crypto::{decrypt_all, DataKey, Decryptor, Encryptor, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = DataKey::from_bytes([9; 32]);
    let (control, plain) = data.split_at(data.len().min(3));
    let enc = Encryptor::new(&key).unwrap();
    let mut file = enc.header().to_vec();
    file.extend(enc.finish(plain).unwrap());
    // control: [flip?, position (2 bytes)]
    if control.len() == 3 && control[0] & 1 == 1 {
        let at = usize::from(u16::from_le_bytes([control[1], control[2]])) % file.len();
        file[at] ^= control[0] | 1;
        assert!(decrypt_all(&key, &file).is_err(), "a changed byte at {at} was accepted");
        return;
    }
    assert_eq!(decrypt_all(&key, &file).unwrap(), plain);
    let split = HEADER_SIZE + (file.len() - HEADER_SIZE) / 2;
    let mut d = Decryptor::new(&key, &file[..HEADER_SIZE]).unwrap();
    let mut out = d.push(&file[HEADER_SIZE..split]).unwrap();
    out.extend(d.push(&file[split..]).unwrap());
    out.extend(d.finish().unwrap());
    assert_eq!(out, plain);
});
