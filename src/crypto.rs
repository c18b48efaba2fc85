//! Chunked AES-256-GCM encryption: export files at rest on the server, and
//! the end-to-end encrypted copies the browser keeps there (the key of those
//! never leaves the user's side: it travels in a link's URL fragment).
//!
//! Layout: `HOV1` ‖ 7-byte random nonce prefix ‖ chunks. Each chunk is at
//! most [`CHUNK_SIZE`] plaintext bytes sealed with nonce = prefix ‖ 32-bit
//! big-endian counter ‖ last-flag, and the header as associated data. A
//! reordered chunk fails (counter), a truncated file fails (no chunk with
//! the last flag), an appended chunk fails (data after the last chunk).
//!
//! ```
//! use handover::crypto::{decrypt_all, DataKey, Encryptor};
//! let key = DataKey::generate().unwrap();
//! let mut enc = Encryptor::new(&key).unwrap();
//! let mut file = enc.header().to_vec();
//! file.extend(enc.push(b"hello ").unwrap());
//! file.extend(enc.finish(b"world").unwrap());
//! assert_eq!(decrypt_all(&key, &file).unwrap(), b"hello world");
//! ```

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine as _;

/// Plaintext bytes per chunk.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// AES-GCM tag size.
pub const TAG_SIZE: usize = 16;
const MAGIC: &[u8; 4] = b"HOV1";
/// Header length: magic and nonce prefix.
pub const HEADER_SIZE: usize = 11;

/// What can go wrong encrypting or decrypting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("no randomness available")]
    Random,
    #[error("not a handover encrypted file")]
    BadHeader,
    #[error("chunk {0} failed authentication (wrong key, altered or reordered data)")]
    Chunk(u32),
    #[error("the file is truncated")]
    Truncated,
    #[error("data follows the last chunk")]
    TrailingData,
    #[error("wrapped key is malformed or does not match the master key")]
    BadWrappedKey,
    #[error("too many chunks for one file")]
    TooLong,
    #[error("the key must be 43 characters of base64url (32 bytes)")]
    BadKey,
    #[error("sealed value is malformed, was sealed for something else, or under another key")]
    BadSealed,
}

/// The size of the encrypted file of `plain` plaintext bytes: the header,
/// and a tag per chunk (an empty file still has its one, last chunk).
///
/// ```
/// use handover::crypto::{ciphertext_len, DataKey, Encryptor, HEADER_SIZE};
/// let key = DataKey::generate().unwrap();
/// let sealed = Encryptor::new(&key).unwrap().finish(&[1; 100_000]).unwrap();
/// assert_eq!(ciphertext_len(100_000), (HEADER_SIZE + sealed.len()) as u64);
/// ```
pub fn ciphertext_len(plain: u64) -> u64 {
    let chunks = plain.div_ceil(CHUNK_SIZE as u64).max(1);
    HEADER_SIZE as u64 + plain + chunks * TAG_SIZE as u64
}

/// A 256-bit key.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(…)")
    }
}

impl DataKey {
    /// A fresh random key.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Random`] when the platform has no randomness.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = [0; 32];
        getrandom::fill(&mut k).map_err(|_| CryptoError::Random)?;
        Ok(Self(k))
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as text for a link's URL fragment: base64url, no padding.
    ///
    /// ```
    /// use handover::crypto::DataKey;
    /// let key = DataKey::generate().unwrap();
    /// let text = key.to_text();
    /// assert_eq!(text.len(), 43);
    /// assert_eq!(DataKey::from_text(&text).unwrap().as_bytes(), key.as_bytes());
    /// ```
    pub fn to_text(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0)
    }

    /// A key from a link made by the browser (`…#copy=ID&key=KEY`) or from
    /// the key's text alone.
    ///
    /// ```
    /// use handover::crypto::DataKey;
    /// let key = DataKey::generate().unwrap();
    /// let link = format!("https://app.example/export#copy=export_1&key={}", key.to_text());
    /// assert_eq!(DataKey::from_link(&link).unwrap().as_bytes(), key.as_bytes());
    /// ```
    ///
    /// # Errors
    ///
    /// [`CryptoError::BadKey`].
    pub fn from_link(link: &str) -> Result<Self, CryptoError> {
        let fragment = link.rsplit_once('#').map_or(link, |(_, f)| f);
        let key = fragment
            .split('&')
            .find_map(|p| p.strip_prefix("key="))
            .unwrap_or(fragment);
        Self::from_text(key)
    }

    /// A key from [`DataKey::to_text`] (surrounding whitespace ignored).
    ///
    /// # Errors
    ///
    /// [`CryptoError::BadKey`] for anything but 32 bytes of base64url.
    pub fn from_text(text: &str) -> Result<Self, CryptoError> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| CryptoError::BadKey)?;
        let k: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadKey)?;
        Ok(Self(k))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }

    /// Wraps `key` under this (master) key: 12-byte nonce ‖ ciphertext ‖ tag.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Random`].
    pub fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, CryptoError> {
        self.seal(&key.0, WRAP_CONTEXT)
    }

    /// Seals a small secret under this key, bound to `context` (what it
    /// belongs to, so that a sealed value copied elsewhere does not open):
    /// 12-byte nonce ‖ ciphertext ‖ tag.
    ///
    /// ```
    /// use handover::crypto::DataKey;
    /// let key = DataKey::generate().unwrap();
    /// let sealed = key.seal(b"whsec_abc", b"webhook company_123").unwrap();
    /// assert_eq!(key.open(&sealed, b"webhook company_123").unwrap(), b"whsec_abc");
    /// assert!(key.open(&sealed, b"webhook company_456").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`CryptoError::Random`].
    pub fn seal(&self, plain: &[u8], context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let ct = self
            .cipher()
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .map_err(|_| CryptoError::BadSealed)?;
        Ok([&nonce[..], &ct].concat())
    }

    /// Opens what [`DataKey::seal`] sealed with the same `context`.
    ///
    /// # Errors
    ///
    /// [`CryptoError::BadSealed`] for another key or context, or altered bytes.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < 12 + TAG_SIZE {
            return Err(CryptoError::BadSealed);
        }
        let (nonce, ct) = sealed.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| CryptoError::BadSealed)?;
        self.cipher()
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: ct,
                    aad: context,
                },
            )
            .map_err(|_| CryptoError::BadSealed)
    }

    /// Unwraps a key made by [`DataKey::wrap`].
    ///
    /// # Errors
    ///
    /// [`CryptoError::BadWrappedKey`] for another master key or altered bytes.
    pub fn unwrap_key(&self, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        if wrapped.len() != 12 + 32 + TAG_SIZE {
            return Err(CryptoError::BadWrappedKey);
        }
        let pt = self
            .open(wrapped, WRAP_CONTEXT)
            .map_err(|_| CryptoError::BadWrappedKey)?;
        let k: [u8; 32] = pt.try_into().map_err(|_| CryptoError::BadWrappedKey)?;
        Ok(DataKey(k))
    }
}

/// What a wrapped data key is bound to.
const WRAP_CONTEXT: &[u8] = b"handover key wrap";

fn nonce(prefix: &[u8; 7], counter: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n
}

/// Encrypts a stream of plaintext pieces into sealed chunks.
pub struct Encryptor {
    cipher: Aes256Gcm,
    header: [u8; HEADER_SIZE],
    prefix: [u8; 7],
    counter: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Encryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryptor")
            .field("counter", &self.counter)
            .finish()
    }
}

impl Encryptor {
    /// An encryptor with a fresh random nonce prefix.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Random`].
    pub fn new(key: &DataKey) -> Result<Self, CryptoError> {
        let mut prefix = [0u8; 7];
        getrandom::fill(&mut prefix).map_err(|_| CryptoError::Random)?;
        let mut header = [0u8; HEADER_SIZE];
        header[..4].copy_from_slice(MAGIC);
        header[4..].copy_from_slice(&prefix);
        Ok(Self {
            cipher: key.cipher(),
            header,
            prefix,
            counter: 0,
            buf: Vec::with_capacity(CHUNK_SIZE),
        })
    }

    /// The file header; write it first.
    pub fn header(&self) -> &[u8; HEADER_SIZE] {
        &self.header
    }

    fn seal(&mut self, plain: &[u8], last: bool) -> Result<Vec<u8>, CryptoError> {
        let n = nonce(&self.prefix, self.counter, last);
        self.counter = self.counter.checked_add(1).ok_or(CryptoError::TooLong)?;
        self.cipher
            .encrypt(
                &n.into(),
                Payload {
                    msg: plain,
                    aad: &self.header,
                },
            )
            .map_err(|_| CryptoError::TooLong)
    }

    /// Adds plaintext; returns the sealed chunks that became full.
    ///
    /// # Errors
    ///
    /// [`CryptoError::TooLong`] past 2^32 chunks.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let take = (CHUNK_SIZE - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            // Keep a full buffer until more data proves it is not the last chunk.
            if self.buf.len() == CHUNK_SIZE && !data.is_empty() {
                let chunk = std::mem::take(&mut self.buf);
                out.extend(self.seal(&chunk, false)?);
                self.buf = chunk;
                self.buf.clear();
            }
        }
        Ok(out)
    }

    /// Adds the final plaintext and seals the last chunk.
    ///
    /// # Errors
    ///
    /// As [`Encryptor::push`].
    pub fn finish(mut self, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::new();
        if !data.is_empty() {
            // Seal full chunks, holding back the last piece.
            out = self.push(data)?;
        }
        let last = std::mem::take(&mut self.buf);
        out.extend(self.seal(&last, true)?);
        Ok(out)
    }
}

/// Decrypts a stream of ciphertext pieces.
pub struct Decryptor {
    cipher: Aes256Gcm,
    header: Vec<u8>,
    prefix: [u8; 7],
    counter: u32,
    buf: Vec<u8>,
    done: bool,
}

impl std::fmt::Debug for Decryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decryptor")
            .field("counter", &self.counter)
            .finish()
    }
}

impl Decryptor {
    /// A decryptor for a file whose first [`HEADER_SIZE`] bytes are `header`.
    ///
    /// # Errors
    ///
    /// [`CryptoError::BadHeader`].
    pub fn new(key: &DataKey, header: &[u8]) -> Result<Self, CryptoError> {
        if header.len() != HEADER_SIZE || &header[..4] != MAGIC {
            return Err(CryptoError::BadHeader);
        }
        let prefix: [u8; 7] = header[4..].try_into().map_err(|_| CryptoError::BadHeader)?;
        Ok(Self {
            cipher: key.cipher(),
            header: header.to_vec(),
            prefix,
            counter: 0,
            buf: Vec::new(),
            done: false,
        })
    }

    fn open(&mut self, sealed: &[u8], last: bool) -> Result<Vec<u8>, CryptoError> {
        let n = nonce(&self.prefix, self.counter, last);
        let pt = self
            .cipher
            .decrypt(
                &n.into(),
                Payload {
                    msg: sealed,
                    aad: &self.header,
                },
            )
            .map_err(|_| CryptoError::Chunk(self.counter))?;
        self.counter = self.counter.checked_add(1).ok_or(CryptoError::TooLong)?;
        Ok(pt)
    }

    /// Adds ciphertext; returns the plaintext of every chunk known not to be last.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Chunk`] for a chunk that fails authentication,
    /// [`CryptoError::TrailingData`] after the last chunk.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if self.done && !data.is_empty() {
            return Err(CryptoError::TrailingData);
        }
        self.buf.extend_from_slice(data);
        let sealed = CHUNK_SIZE + TAG_SIZE;
        let mut out = Vec::new();
        // A full chunk followed by more bytes cannot be the last one.
        while self.buf.len() > sealed {
            let rest = self.buf.split_off(sealed);
            let chunk = std::mem::replace(&mut self.buf, rest);
            out.extend(self.open(&chunk, false)?);
        }
        Ok(out)
    }

    /// Opens the last chunk.
    ///
    /// # Errors
    ///
    /// [`CryptoError::Truncated`] when the remaining bytes are not a valid
    /// last chunk.
    pub fn finish(mut self) -> Result<Vec<u8>, CryptoError> {
        if self.buf.len() < TAG_SIZE {
            return Err(CryptoError::Truncated);
        }
        let chunk = std::mem::take(&mut self.buf);
        let counter = self.counter;
        self.open(&chunk, true).map_err(|_| {
            // A non-last chunk where the last should be means data was cut off.
            if chunk.len() == CHUNK_SIZE + TAG_SIZE {
                CryptoError::Truncated
            } else {
                CryptoError::Chunk(counter)
            }
        })
    }
}

/// Decrypts a whole file held in memory.
///
/// # Errors
///
/// Any [`CryptoError`].
pub fn decrypt_all(key: &DataKey, file: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if file.len() < HEADER_SIZE {
        return Err(CryptoError::BadHeader);
    }
    let mut d = Decryptor::new(key, &file[..HEADER_SIZE])?;
    let mut out = d.push(&file[HEADER_SIZE..])?;
    out.extend(d.finish()?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encrypt(key: &DataKey, data: &[u8], piece: usize) -> Vec<u8> {
        let mut e = Encryptor::new(key).unwrap();
        let mut out = e.header().to_vec();
        let pieces: Vec<&[u8]> = data.chunks(piece.max(1)).collect();
        for p in &pieces {
            out.extend(e.push(p).unwrap());
        }
        out.extend(e.finish(&[]).unwrap());
        out
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        let key = DataKey::generate().unwrap();
        for len in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE,
            3 * CHUNK_SIZE + 17,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            for piece in [1000, CHUNK_SIZE, len.max(1)] {
                assert_eq!(
                    decrypt_all(&key, &encrypt(&key, &data, piece)).unwrap(),
                    data,
                    "len {len} piece {piece}"
                );
            }
        }
    }

    #[test]
    fn detects_truncation_reordering_alteration_and_wrong_keys() {
        let key = DataKey::generate().unwrap();
        let data = vec![42u8; 3 * CHUNK_SIZE + 5];
        let file = encrypt(&key, &data, 4096);
        let sealed = CHUNK_SIZE + TAG_SIZE;
        // Truncated to a chunk boundary.
        assert_eq!(
            decrypt_all(&key, &file[..HEADER_SIZE + 2 * sealed]),
            Err(CryptoError::Truncated)
        );
        // Truncated inside a chunk.
        assert!(decrypt_all(&key, &file[..file.len() - 3]).is_err());
        // Two chunks swapped.
        let mut swapped = file.clone();
        let (a, b) = (HEADER_SIZE, HEADER_SIZE + sealed);
        let first = file[a..b].to_vec();
        swapped[a..b].copy_from_slice(&file[b..b + sealed]);
        swapped[b..b + sealed].copy_from_slice(&first);
        assert_eq!(decrypt_all(&key, &swapped), Err(CryptoError::Chunk(0)));
        // One bit flipped.
        let mut flipped = file.clone();
        flipped[HEADER_SIZE + 10] ^= 1;
        assert_eq!(decrypt_all(&key, &flipped), Err(CryptoError::Chunk(0)));
        // Data appended.
        let mut longer = file.clone();
        longer.extend([0u8; 40]);
        assert!(decrypt_all(&key, &longer).is_err());
        // Another key.
        assert!(decrypt_all(&DataKey::generate().unwrap(), &file).is_err());
    }

    #[test]
    fn ciphertext_len_matches_the_encryptor() {
        let key = DataKey::generate().unwrap();
        for len in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            5 * CHUNK_SIZE,
        ] {
            let data = vec![1u8; len];
            assert_eq!(
                encrypt(&key, &data, 777).len() as u64,
                ciphertext_len(len as u64),
                "len {len}"
            );
        }
    }

    #[test]
    fn key_text_rejects_what_is_not_a_key() {
        for bad in ["", "abc", &"A".repeat(44), &"+".repeat(43), &"A".repeat(42)] {
            assert_eq!(
                DataKey::from_text(bad).unwrap_err(),
                CryptoError::BadKey,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn key_wrapping_round_trips_and_rejects_other_master_keys() {
        let master = DataKey::generate().unwrap();
        let key = DataKey::generate().unwrap();
        let wrapped = master.wrap(&key).unwrap();
        assert_eq!(
            master.unwrap_key(&wrapped).unwrap().as_bytes(),
            key.as_bytes()
        );
        assert_eq!(
            DataKey::generate()
                .unwrap()
                .unwrap_key(&wrapped)
                .unwrap_err(),
            CryptoError::BadWrappedKey
        );
    }
}
