//! `ExportOptions`: parsed and checked before any request is made.

use js_sys::{Function, Object, Reflect};
use serde::Deserialize;
use serde_json::Value;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::AbortSignal;

use super::error::export_error;
use super::output::Storage;
use crate::format::{ExportFormat, FormatOptions};
use crate::model::{is_valid_data_type_name, parse_timestamp, DateRange};

#[wasm_bindgen::prelude::wasm_bindgen(typescript_custom_section)]
const TS_EXPORT_OPTIONS: &'static str = r#"
/** Progress of a running export, reported after every page. */
export interface ExportProgress {
  /** 0–100, never decreasing; exactly 100 once, at the end. */
  percentage: number;
  /** The data type being fetched (null once finished). */
  currentType: string | null;
  recordsProcessed: number;
  totalRecords: number;
  /** Bytes of the file written so far. */
  bytesWritten: number;
}

export interface ExportOptions {
  /** Where handover-server answers, e.g. "https://api.example.com" ("" = this page's origin). */
  baseUrl: string;
  /** Bearer token: an API token (hov_…) or a JWT from your identity provider. */
  token: string;
  /** Sent as X-Company-ID; must be one of the token's companies. */
  companyId: string;
  /** Default "json". */
  format?: ExportFormat;
  /** Data types to export, e.g. ["user_profile", "payment_history"]. */
  /** The data types to export; leave out for every type the server offers. */
  dataTypes?: string[];
  /** ISO-8601 bounds, both optional. */
  dateRange?: { start?: string | null; end?: string | null };
  /** Stored with the request (at most 4 KiB). */
  metadata?: Record<string, unknown>;
  onProgress?: (progress: ExportProgress) => void;
  /** Cancels the export: the in-flight request is aborted too; rejects with code "ABORTED". */
  signal?: AbortSignal;
  /** Start the browser download when done. Default true. */
  download?: boolean;
  /** Download file name. Default "<requestId>.<format>". */
  filename?: string;
  /** Records per page request, 1–5000. Default 1000. */
  pageSize?: number;
  /** Attempts per request on network errors and 5xx, 1–20. Default 6. */
  retries?: number;
  /** First backoff delay in ms (doubles per attempt, with jitter). Default 250. */
  retryBaseMs?: number;
  /** Longest Retry-After (s) waited for on a 429 while paging. Default 120. */
  maxRetryAfterSeconds?: number;
  /** A request that has not fully answered in this many ms is aborted and retried. Default 60000. */
  requestTimeoutMs?: number;
  /** Prefix cells starting with = + - @ tab CR NUL with ' (CSV, XLSX). Default true. */
  neutralizeFormulas?: boolean;
  csv?: { bom?: boolean };
  /** Run the fetch-and-format loop in a module worker (default true where the browser has
   * module workers; the page then only receives progress). false: on the calling thread. */
  worker?: boolean;
  /** Where the file is built: "auto" (default: a file in the Origin Private File System when
   * running in a worker, memory otherwise), "opfs" or "memory". */
  storage?: "auto" | "opfs" | "memory";
  /** Keep an end-to-end encrypted copy on the server, so the export can be downloaded
   * again (until it expires or is deleted): the file is encrypted here with AES-256-GCM under
   * a fresh key and only ciphertext is uploaded (resumably, in parts). The result's `copy`
   * holds the link with the key in its fragment; `decryptExport` opens the download.
   * If the copy cannot be kept, the export still resolves, with `copyError`. Default false. */
  keepCopy?: boolean;
  /** The page the copy's link points at (default: the calling page, without its fragment). */
  copyLinkBase?: string;
  /** With download: true, the OPFS file is removed this long after the download started.
   * Default 60000. With download: false, call result.release() when done with result.blob. */
  releaseFileAfterMs?: number;
}

/** What a finished export resolves to. */
export interface ExportResult {
  requestId: string;
  filename: string;
  byteSize: number;
  recordCount: number;
  /** Lower-case hex SHA-256 of the file, as reported to the server. */
  sha256: string;
  /** The file. Disk-backed when it was built in the Origin Private File System. */
  blob: Blob;
  /** With keepCopy: the encrypted copy kept on the server. */
  copy?: KeptCopy;
  /** With keepCopy: why no copy could be kept (the export itself succeeded). */
  copyError?: ExportError;
  /** Removes the file from the Origin Private File System (no-op otherwise). */
  release(): Promise<void>;
  stats: {
    storage: "opfs" | "memory";
    /** Bytes of the WebAssembly memory of the module that built the file. */
    wasmMemoryBytes: number;
    /** Whether the file was built in a worker. */
    worker: boolean;
  };
}

/**
 * Exports the user's data: creates a client-delivered export on handover-server, pulls every
 * record of every requested data type, writes the file in the browser (in a module worker where
 * there is one), reports its checksum and (unless `download: false`) starts the download.
 * Rejects with an `ExportError`.
 */
export function exportData(options: ExportOptions): Promise<ExportResult>;

/** exportData on the calling thread, without a worker (what the worker itself runs). */
export function exportDataHere(options: ExportOptions): Promise<ExportResult>;
/** Checks options as exportData would, without any request; throws an ExportError. */
export function checkExportOptions(options: ExportOptions): void;
/** Bytes of this module's WebAssembly memory. */
export function wasmMemoryBytes(): number;

/** `exportData` with `worker: true`: the export runs in a module worker (kept for existing callers). */
export function exportDataInWorker(options: ExportOptions): Promise<ExportResult>;
"#;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Raw {
    base_url: Option<String>,
    token: Option<String>,
    company_id: Option<String>,
    format: Option<String>,
    data_types: Option<Vec<Value>>,
    date_range: Option<DateRange>,
    metadata: Option<Value>,
    download: Option<bool>,
    filename: Option<String>,
    page_size: Option<u32>,
    retries: Option<u32>,
    retry_base_ms: Option<u32>,
    max_retry_after_seconds: Option<u32>,
    request_timeout_ms: Option<u32>,
    neutralize_formulas: Option<bool>,
    csv: Option<RawCsv>,
    storage: Option<String>,
    worker: Option<bool>,
    release_file_after_ms: Option<u32>,
    keep_copy: Option<bool>,
    copy_link_base: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCsv {
    bom: Option<bool>,
}

/// Checked options of one export.
#[derive(Debug)]
pub(crate) struct ExportOptions {
    pub base_url: String,
    pub token: String,
    pub company_id: String,
    pub format: ExportFormat,
    pub data_types: Vec<String>,
    pub date_range: Option<DateRange>,
    pub metadata: Option<Value>,
    pub download: bool,
    pub filename: Option<String>,
    pub page_size: u32,
    pub max_attempts: u32,
    pub retry_base_ms: u32,
    pub max_retry_after_secs: u32,
    pub request_timeout_ms: u32,
    pub format_options: FormatOptions,
    pub storage: Storage,
    pub on_progress: Option<Function>,
    pub signal: Option<AbortSignal>,
    /// Keep an end-to-end encrypted copy on the server; links go back to this page.
    pub keep_copy: Option<String>,
}

fn invalid(msg: impl AsRef<str>) -> JsValue {
    export_error("INVALID_OPTIONS", msg.as_ref())
}

fn required(v: Option<String>, name: &str) -> Result<String, JsValue> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(invalid(format!(
            "options.{name} is required (a non-empty string)"
        ))),
    }
}

/// Parses and checks `options`.
///
/// # Errors
///
/// An `ExportError` with code `INVALID_OPTIONS` (or `INVALID_FORMAT`,
/// `INVALID_DATA_TYPE`, `DATE_RANGE_INVALID`) naming the option.
pub(crate) fn parse(options: &JsValue) -> Result<ExportOptions, JsValue> {
    if !options.is_object() {
        return Err(invalid(
            "exportData needs an options object: { baseUrl, token, companyId, dataTypes, … }",
        ));
    }
    let get = |k: &str| Reflect::get(options, &k.into()).unwrap_or(JsValue::UNDEFINED);
    let on_progress = match get("onProgress") {
        v if v.is_undefined() || v.is_null() => None,
        v => Some(
            v.dyn_into::<Function>()
                .map_err(|_| invalid("options.onProgress must be a function"))?,
        ),
    };
    let signal = match get("signal") {
        v if v.is_undefined() || v.is_null() => None,
        v => Some(
            v.dyn_into::<AbortSignal>()
                .map_err(|_| invalid("options.signal must be an AbortSignal"))?,
        ),
    };
    // The rest is plain data: copy it without the two live objects and read it as JSON.
    let copy = Object::assign(&Object::new(), options.unchecked_ref());
    for k in ["onProgress", "signal"] {
        let _ = Reflect::delete_property(&copy, &k.into());
    }
    let text = js_sys::JSON::stringify(&copy)
        .ok()
        .and_then(|s| s.as_string())
        .ok_or_else(|| invalid("options cannot be read as JSON (BigInt or a cycle?)"))?;
    let raw: Raw = serde_json::from_str(&text).map_err(|e| invalid(format!("options: {e}")))?;

    let base_url = raw
        .base_url
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string();
    if !(base_url.is_empty()
        || base_url.starts_with("http://")
        || base_url.starts_with("https://")
        || base_url.starts_with('/'))
    {
        return Err(invalid(format!(
            "options.baseUrl {base_url:?} must be an http(s) URL"
        )));
    }
    let token = required(raw.token, "token")?;
    let company_id = required(raw.company_id, "companyId")?;
    let format: ExportFormat = raw.format.as_deref().unwrap_or("json").parse()?;
    // Absent: every data type the server offers (the GDPR default: all of
    // it), asked of the server when the export starts. Present: at least one.
    let types =
        match raw.data_types {
            None => Vec::new(),
            Some(t) if t.is_empty() => return Err(export_error(
                "INVALID_DATA_TYPE",
                "options.dataTypes must name at least one data type (leave it out for all of them)",
            )),
            Some(t) => t,
        };
    let mut data_types = Vec::with_capacity(types.len());
    for t in types {
        match t {
            Value::String(s) if is_valid_data_type_name(&s) && !data_types.contains(&s) => {
                data_types.push(s)
            }
            other => {
                return Err(export_error(
                    "INVALID_DATA_TYPE",
                    &format!("options.dataTypes: {other} is not a valid, unique data type name"),
                ))
            }
        }
    }
    if let Some(r) = &raw.date_range {
        for v in [&r.start, &r.end].into_iter().flatten() {
            if parse_timestamp(v).is_none() {
                return Err(export_error(
                    "DATE_RANGE_INVALID",
                    &format!("options.dateRange: {v:?} is not an ISO-8601 date-time"),
                ));
            }
        }
        if let (Some(s), Some(e)) = (&r.start, &r.end) {
            if parse_timestamp(s) > parse_timestamp(e) {
                return Err(export_error(
                    "DATE_RANGE_INVALID",
                    "options.dateRange: start is after end",
                ));
            }
        }
    }
    if let Some(m) = &raw.metadata {
        if !m.is_object() {
            return Err(invalid("options.metadata must be an object"));
        }
    }
    let page_size = raw.page_size.unwrap_or(1000);
    if !(1..=5000).contains(&page_size) {
        return Err(invalid("options.pageSize must be from 1 to 5000"));
    }
    let max_attempts = raw.retries.unwrap_or(6);
    if !(1..=20).contains(&max_attempts) {
        return Err(invalid("options.retries must be from 1 to 20"));
    }
    let request_timeout_ms = raw.request_timeout_ms.unwrap_or(60_000);
    if !(100..=600_000).contains(&request_timeout_ms) {
        return Err(invalid(
            "options.requestTimeoutMs must be from 100 to 600000",
        ));
    }
    let storage = match raw.storage.as_deref() {
        None | Some("auto") => Storage::Auto,
        Some("memory") => Storage::Memory,
        Some("opfs") => Storage::Opfs,
        Some(other) => {
            return Err(invalid(format!(
                "options.storage {other:?} must be \"auto\", \"opfs\" or \"memory\""
            )))
        }
    };
    // Read by the package's JavaScript (the worker and the file's
    // release); checked here so that a typo is caught either way.
    let _ = raw.worker;
    if raw.release_file_after_ms.is_some_and(|ms| ms > 86_400_000) {
        return Err(invalid(
            "options.releaseFileAfterMs must be at most a day (86400000)",
        ));
    }
    if let Some(f) = &raw.filename {
        if f.trim().is_empty() || f.contains(['/', '\\']) {
            return Err(invalid("options.filename must be a plain file name"));
        }
    }
    let keep_copy = match (raw.keep_copy.unwrap_or(false), raw.copy_link_base) {
        (false, _) => None,
        (true, Some(base)) if base.starts_with("http://") || base.starts_with("https://") => {
            Some(base)
        }
        (true, Some(base)) => {
            return Err(invalid(format!(
                "options.copyLinkBase {base:?} must be an http(s) URL"
            )))
        }
        (true, None) => Some(super::copy::here()),
    };
    Ok(ExportOptions {
        keep_copy,
        base_url,
        token,
        company_id,
        format,
        data_types,
        date_range: raw.date_range,
        metadata: raw.metadata,
        download: raw.download.unwrap_or(true),
        filename: raw.filename,
        page_size,
        max_attempts,
        retry_base_ms: raw.retry_base_ms.unwrap_or(250).min(60_000),
        max_retry_after_secs: raw.max_retry_after_seconds.unwrap_or(120),
        request_timeout_ms,
        format_options: FormatOptions {
            neutralize_formulas: raw.neutralize_formulas.unwrap_or(true),
            csv_bom: raw.csv.and_then(|c| c.bom).unwrap_or(false),
        },
        storage,
        on_progress,
        signal,
    })
}
