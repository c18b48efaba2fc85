//! `exportData(options)`: the whole client-delivered export in the browser.

use js_sys::{Array, Object, Reflect, Uint8Array};
use serde::Deserialize;
use serde_json::json;
use wasm_bindgen::prelude::*;
use web_sys::{Blob, BlobPropertyBag};

use super::error::export_error;
use super::http::{aborted_error, Client, Retry};
use super::options::{self, ExportOptions};
use crate::format::ExportWriter;
use crate::model::{ExportInfo, Manifest, Page};
use crate::Sha256Stream;

#[derive(Deserialize)]
struct Envelope<T> {
    data: T,
}

#[derive(Deserialize)]
struct Created {
    request_id: String,
    manifest: Manifest,
    export_info: ExportInfo,
}

/// The file as it grows: Blob parts (one `Uint8Array` per writer chunk, so
/// Rust never holds the whole file), its checksum and size.
struct Output {
    parts: Array,
    sha: Sha256Stream,
    bytes: u64,
}

impl Output {
    fn push(&mut self, chunk: Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        self.sha.update(&chunk);
        self.bytes += chunk.len() as u64;
        self.parts.push(&Uint8Array::from(chunk.as_slice()));
    }
}

struct Progress<'a> {
    callback: Option<&'a js_sys::Function>,
    total: u64,
    processed: u64,
    last_pct: u32,
}

impl Progress<'_> {
    fn emit(&mut self, current: Option<&str>, bytes: u64, done: bool) {
        // Monotonic, and 100 only at the very end.
        let total = if done {
            self.processed
        } else {
            self.total.max(self.processed)
        };
        let pct = if done {
            100
        } else {
            (self.processed * 100)
                .checked_div(total)
                .map_or(0, |p| (p as u32).min(99))
        };
        self.last_pct = self.last_pct.max(pct);
        let Some(cb) = self.callback else { return };
        let o = Object::new();
        let set = |k: &str, v: JsValue| {
            let _ = Reflect::set(&o, &k.into(), &v);
        };
        set("percentage", JsValue::from(self.last_pct));
        set("currentType", current.map_or(JsValue::NULL, JsValue::from));
        set("recordsProcessed", JsValue::from_f64(self.processed as f64));
        set("totalRecords", JsValue::from_f64(total as f64));
        set("bytesWritten", JsValue::from_f64(bytes as f64));
        // A throwing progress callback must not break the export.
        let _ = cb.call1(&JsValue::NULL, &o);
    }
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, JsValue> {
    serde_json::from_slice::<Envelope<T>>(bytes)
        .map(|e| e.data)
        .map_err(|e| {
            export_error(
                "INVALID_RESPONSE",
                &format!("unexpected {what} from the export server: {e}"),
            )
        })
}

/// Runs an export as described by `options` (see the TypeScript declaration).
///
/// # Errors
///
/// Rejects with an `ExportError`: `INVALID_OPTIONS` and friends before any
/// request, the server's code for refused requests (`RATE_LIMIT_EXCEEDED`
/// with `retryAfter`, `UNAUTHORIZED`, …), `NETWORK_ERROR` when retries are
/// exhausted, `ABORTED` on cancel.
#[wasm_bindgen(js_name = exportData, skip_typescript)]
pub async fn export_data(options: JsValue) -> Result<JsValue, JsValue> {
    let opts = options::parse(&options)?;
    if opts
        .signal
        .as_ref()
        .is_some_and(web_sys::AbortSignal::aborted)
    {
        return Err(aborted_error());
    }
    let client = Client {
        base: opts.base_url.clone(),
        token: opts.token.clone(),
        company: opts.company_id.clone(),
        signal: opts.signal.clone(),
        max_attempts: opts.max_attempts,
        retry_base_ms: opts.retry_base_ms,
        max_retry_after_secs: opts.max_retry_after_secs,
        request_timeout_ms: opts.request_timeout_ms,
    };
    let range = opts.date_range.clone().unwrap_or_default();
    let body = json!({
        "export_format": opts.format.as_str(),
        "data_types": opts.data_types,
        "date_range_start": range.start,
        "date_range_end": range.end,
        "metadata": opts.metadata,
        "delivery": "client",
    })
    .to_string();
    let created: Created = parse(
        &client
            .send("POST", "/api/data/export", Some(&body), Retry::Create)
            .await?,
        "create response",
    )?;
    match run(&client, &opts, &created).await {
        Ok(result) => Ok(result),
        Err(err) => {
            // Tell the server, so the request does not stay open; never with
            // the (possibly aborted) caller's signal.
            let code = Reflect::get(&err, &"code".into())
                .ok()
                .and_then(|c| c.as_string())
                .unwrap_or_default();
            let reason = if code == "ABORTED" {
                "cancelled".to_string()
            } else {
                format!("client error: {code}")
            };
            let reporter = Client {
                signal: None,
                max_attempts: 2,
                ..client
            };
            let path = format!("/api/data/export/{}/fail", created.request_id);
            let _ = reporter
                .send(
                    "POST",
                    &path,
                    Some(&json!({ "reason": reason }).to_string()),
                    Retry::Idempotent,
                )
                .await;
            Err(err)
        }
    }
}

async fn run(client: &Client, opts: &ExportOptions, created: &Created) -> Result<JsValue, JsValue> {
    let id = &created.request_id;
    let mut writer = ExportWriter::new(
        opts.format,
        &created.manifest,
        &created.export_info,
        &opts.format_options,
    )?;
    let mut out = Output {
        parts: Array::new(),
        sha: Sha256Stream::default(),
        bytes: 0,
    };
    let mut progress = Progress {
        callback: opts.on_progress.as_ref(),
        total: created.manifest.total_records(),
        processed: 0,
        last_pct: 0,
    };
    out.push(writer.begin()?);
    progress.emit(
        created.manifest.types.keys().next().map(String::as_str),
        out.bytes,
        false,
    );
    for (name, t) in &created.manifest.types {
        let url = t
            .records_url
            .clone()
            .unwrap_or_else(|| format!("/api/data/export/{id}/records/{name}"));
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("{url}?limit={}", opts.page_size);
            if let Some(c) = &cursor {
                path.push_str("&cursor=");
                path.push_str(&String::from(js_sys::encode_uri_component(c)));
            }
            let page: Page = parse(
                &client.send("GET", &path, None, Retry::Idempotent).await?,
                "page of records",
            )?;
            out.push(writer.write_page(name, &page.records)?);
            progress.processed += page.records.len() as u64;
            progress.emit(Some(name), out.bytes, false);
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                Some(_) => {
                    return Err(export_error(
                        "INVALID_RESPONSE",
                        "the server repeated a cursor",
                    ))
                }
                None => break,
            }
        }
    }
    out.push(writer.finish()?);
    let sha256 = std::mem::take(&mut out.sha).finish_hex();
    let records = writer.records_written();
    let report =
        json!({ "record_count": records, "byte_size": out.bytes, "sha256": sha256 }).to_string();
    client
        .send(
            "POST",
            &format!("/api/data/export/{id}/complete"),
            Some(&report),
            Retry::Idempotent,
        )
        .await?;
    progress.emit(None, out.bytes, true);

    let bag = BlobPropertyBag::new();
    bag.set_type(opts.format.content_type());
    let blob = Blob::new_with_u8_array_sequence_and_options(&out.parts, &bag)?;
    let filename = opts
        .filename
        .clone()
        .unwrap_or_else(|| format!("{id}.{}", opts.format.extension()));
    if opts.download {
        super::download::save(&blob, &filename)?;
    }
    let result = Object::new();
    let set = |k: &str, v: JsValue| Reflect::set(&result, &k.into(), &v);
    set("requestId", id.into())?;
    set("filename", filename.into())?;
    set("byteSize", JsValue::from_f64(out.bytes as f64))?;
    set("recordCount", JsValue::from_f64(records as f64))?;
    set("sha256", sha256.into())?;
    set("blob", blob.into())?;
    Ok(result.into())
}
