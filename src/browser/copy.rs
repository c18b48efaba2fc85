//! End-to-end encrypted copies: `exportData({ keepCopy: true })` encrypts
//! the finished file here under a fresh key and uploads only ciphertext;
//! `decryptExport(blob, key)` opens a downloaded copy. The key never goes
//! to the server: it lives in the link's URL fragment, which browsers do
//! not send.

use js_sys::{Array, Object, Reflect, Uint8Array};
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Blob, BlobPropertyBag};

use super::error::{export_error, make_error};
use super::http::{Client, Retry};
use crate::crypto::{
    CryptoError, DataKey, Decryptor, Encryptor, CHUNK_SIZE, HEADER_SIZE, TAG_SIZE,
};
use crate::Sha256Stream;

/// Ciphertext read per step while decrypting (whole sealed chunks).
const DECRYPT_STEP: u64 = 16 * (CHUNK_SIZE + TAG_SIZE) as u64;

#[wasm_bindgen(typescript_custom_section)]
const TS_COPY: &'static str = r#"
/** The encrypted copy kept on the server (exportData with keepCopy: true). */
export interface KeptCopy {
  requestId: string;
  /** `<copyLinkBase>#copy=<requestId>&key=<key>`: the key is only in the fragment,
   * which browsers never send to a server. Whoever has the link (and access to the
   * export) can decrypt the copy; treat it like the file itself. */
  link: string;
  /** The AES-256 key, base64url (43 characters). */
  key: string;
  /** Bytes of ciphertext stored. */
  byteSize: number;
  /** SHA-256 of the ciphertext, as the server checked it. */
  sha256: string;
}

/**
 * Decrypts an encrypted copy (the body of GET /api/data/export/{id}/download for a browser
 * export kept with keepCopy) with its key, or with the whole link. Resolves to the original
 * file; rejects with an ExportError: INVALID_KEY, INVALID_COPY (not an encrypted copy) or
 * DECRYPTION_FAILED (wrong key, or the copy was altered, truncated or reordered).
 */
export function decryptExport(data: Blob | ArrayBuffer | Uint8Array, key: string, options?: { type?: string }): Promise<Blob>;
"#;

async fn read_slice(blob: &Blob, start: u64, end: u64) -> Result<Vec<u8>, JsValue> {
    let piece = blob.slice_with_f64_and_f64(start as f64, end as f64)?;
    let buffer = JsFuture::from(piece.array_buffer()).await.map_err(|e| {
        export_error(
            "FILE_UNREADABLE",
            &format!(
                "the file could not be read back: {}",
                e.as_string().unwrap_or_else(|| "read error".into())
            ),
        )
    })?;
    Ok(Uint8Array::new(&buffer).to_vec())
}

fn code_of(e: &JsValue) -> String {
    Reflect::get(e, &"code".into())
        .ok()
        .and_then(|c| c.as_string())
        .unwrap_or_default()
}

fn data_of(body: &[u8]) -> Value {
    serde_json::from_slice::<Value>(body)
        .map(|mut v| v["data"].take())
        .unwrap_or(Value::Null)
}

/// Sends `part` at `offset`. A part the server already has (an earlier
/// attempt landed but its answer was lost) counts as sent.
async fn put_part(client: &Client, path: &str, part: &[u8], offset: u64) -> Result<(), JsValue> {
    match client.send_part(path, part, offset).await {
        Ok(_) => return Ok(()),
        Err(e) if code_of(&e) == "UPLOAD_OFFSET_MISMATCH" => {}
        Err(e) => return Err(e),
    }
    let state = data_of(&client.send("GET", path, None, Retry::Idempotent).await?);
    let received = state["received"].as_u64().unwrap_or(0);
    if received == offset + part.len() as u64 {
        return Ok(());
    }
    Err(export_error(
        "COPY_FAILED",
        &format!(
            "the server has {received} bytes of the encrypted copy; this part was for {offset}"
        ),
    ))
}

/// Encrypts `blob` under a fresh key and uploads it to export `id`'s copy,
/// part by part; returns the `KeptCopy`.
///
/// # Errors
///
/// An `ExportError`: the server's refusal (`FILE_TOO_LARGE`, …),
/// `NETWORK_ERROR` after retries, `COPY_FAILED`, `ABORTED`.
pub(crate) async fn keep(
    client: &Client,
    id: &str,
    blob: &Blob,
    link_base: &str,
    part_bytes: u32,
) -> Result<JsValue, JsValue> {
    let key = DataKey::generate()
        .map_err(|_| export_error("CRYPTO_UNAVAILABLE", "no randomness for a key"))?;
    let mut enc = Some(
        Encryptor::new(&key)
            .map_err(|_| export_error("CRYPTO_UNAVAILABLE", "no randomness for a nonce"))?,
    );
    let path = format!("/api/data/export/{id}/copy");
    let size = blob.size() as u64;
    let (mut read, mut offset) = (0u64, 0u64);
    let mut sha = Sha256Stream::default();
    while let Some(e) = enc.as_mut() {
        let end = (read + u64::from(part_bytes)).min(size);
        let plain = read_slice(blob, read, end).await?;
        read = end;
        let mut part = if offset == 0 {
            e.header().to_vec()
        } else {
            Vec::new()
        };
        let sealed = if read == size {
            enc.take().map(|e| e.finish(&plain)).transpose()
        } else {
            e.push(&plain).map(Some)
        };
        part.extend(
            sealed
                .map_err(|err| export_error("COPY_FAILED", &err.to_string()))?
                .unwrap_or_default(),
        );
        if part.is_empty() {
            continue;
        }
        put_part(client, &path, &part, offset).await?;
        sha.update(&part);
        offset += part.len() as u64;
    }
    let sha256 = sha.finish_hex();
    client
        .send(
            "POST",
            &format!("{path}/complete"),
            Some(&json!({ "sha256": sha256 }).to_string()),
            Retry::Idempotent,
        )
        .await?;
    let text = key.to_text();
    let base = link_base.split('#').next().unwrap_or_default();
    let copy = Object::new();
    let set = |k: &str, v: JsValue| Reflect::set(&copy, &k.into(), &v);
    set("requestId", id.into())?;
    set("link", format!("{base}#copy={id}&key={text}").into())?;
    set("key", text.into())?;
    set("byteSize", JsValue::from_f64(offset as f64))?;
    set("sha256", sha256.into())?;
    Ok(copy.into())
}

/// The page's address, for links back to it (in a worker, its own script's:
/// the package passes the page's instead).
pub(crate) fn here() -> String {
    Reflect::get(&js_sys::global(), &"location".into())
        .ok()
        .and_then(|l| Reflect::get(&l, &"href".into()).ok())
        .and_then(|h| h.as_string())
        .unwrap_or_default()
}

fn decrypt_error(e: CryptoError) -> JsValue {
    let (reason, message) = match e {
        CryptoError::Chunk(0) => (
            "authentication",
            "the copy could not be decrypted: wrong key, or the copy was altered".to_string(),
        ),
        CryptoError::Chunk(n) => (
            "authentication",
            format!("the copy could not be decrypted: chunk {n} was altered or reordered"),
        ),
        CryptoError::Truncated => ("truncated", "the copy is truncated".to_string()),
        CryptoError::TrailingData => (
            "trailing_data",
            "the copy has data after its end".to_string(),
        ),
        other => ("other", other.to_string()),
    };
    let details = Object::new();
    let _ = Reflect::set(&details, &"reason".into(), &reason.into());
    make_error("DECRYPTION_FAILED", &message, None, None, details.into())
}

/// See the TypeScript declaration.
///
/// # Errors
///
/// `INVALID_KEY`, `INVALID_COPY`, `DECRYPTION_FAILED` (as `ExportError`).
#[wasm_bindgen(js_name = decryptExport, skip_typescript)]
pub async fn decrypt_export(
    data: JsValue,
    key: JsValue,
    options: JsValue,
) -> Result<Blob, JsValue> {
    let key = key
        .as_string()
        .ok_or(CryptoError::BadKey)
        .and_then(|k| DataKey::from_link(&k))
        .map_err(|e| export_error("INVALID_KEY", &e.to_string()))?;
    let blob: Blob = if data.is_instance_of::<Blob>() {
        data.unchecked_into()
    } else if data.is_instance_of::<js_sys::ArrayBuffer>() || js_sys::ArrayBuffer::is_view(&data) {
        Blob::new_with_buffer_source_sequence(&Array::of1(&data))?
    } else {
        return Err(export_error(
            "INVALID_COPY",
            "decryptExport takes a Blob, an ArrayBuffer or a Uint8Array",
        ));
    };
    let mime = Reflect::get(&options, &"type".into())
        .ok()
        .and_then(|t| t.as_string())
        .unwrap_or_else(|| "application/octet-stream".into());
    let size = blob.size() as u64;
    let not_a_copy = || export_error("INVALID_COPY", "this is not an encrypted copy of an export");
    if size < HEADER_SIZE as u64 {
        return Err(not_a_copy());
    }
    let header = read_slice(&blob, 0, HEADER_SIZE as u64).await?;
    let mut dec = Decryptor::new(&key, &header).map_err(|_| not_a_copy())?;
    let parts = Array::new();
    let mut at = HEADER_SIZE as u64;
    while at < size {
        let end = (at + DECRYPT_STEP).min(size);
        let plain = dec
            .push(&read_slice(&blob, at, end).await?)
            .map_err(decrypt_error)?;
        if !plain.is_empty() {
            parts.push(&Uint8Array::from(&plain[..]));
        }
        at = end;
    }
    let last = dec.finish().map_err(decrypt_error)?;
    parts.push(&Uint8Array::from(&last[..]));
    let bag = BlobPropertyBag::new();
    bag.set_type(&mime);
    Blob::new_with_u8_array_sequence_and_options(&parts, &bag)
}
