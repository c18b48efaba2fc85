//! `ExportOptions`: the live objects (`onProgress`, `signal`) taken out,
//! the rest checked by [`crate::options`] before any request is made.

use js_sys::{Function, Object, Reflect};
use wasm_bindgen::{JsCast, JsValue};
use web_sys::AbortSignal;

use super::error::export_error;
use super::output::Storage;
use crate::options::{parse_options, CheckedOptions, StoragePref};

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
  /** Where handover-server answers, e.g. "https://api.example.com"; default "" (this page's origin). */
  baseUrl?: string;
  /** Bearer token: an API token (hov_…) or a JWT from your identity provider. */
  token: string;
  /** Sent as X-Company-ID; must be one of the token's companies. */
  companyId: string;
  /** Default "json". */
  format?: ExportFormat;
  /** The data types to export, e.g. ["user_profile", "payment_history"]; leave out for every type the server offers. */
  dataTypes?: string[];
  /** ISO-8601 bounds, both optional. */
  dateRange?: { start?: string | null; end?: string | null };
  /** Stored with the request (at most 4 KiB of JSON and 50 keys). */
  metadata?: Record<string, unknown>;
  /** Called as the export starts, after every page of records and at the
   * end (100 %), in order. From a worker, the events of up to 50 ms reach
   * the page together, so that a fast export does not wake the page's
   * thread for every page; a cancel made in the callback then takes
   * effect up to that much later. No event follows a cancel. */
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
  /** A request whose answer is not complete in this many ms (a record stream: that long without new bytes) is aborted and retried. Default 60000. */
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
  /** Plaintext bytes per uploaded part of the copy, 65536–8388608. Default 4194304
   * (smaller parts lose less on a flaky link). */
  copyPartBytes?: number;
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
    /** Name of the file in the Origin Private File System directory `handover`, or null. */
    opfsName: string | null;
    /** Bytes of the WebAssembly memory of the module that fetched and wrote the rows. */
    wasmMemoryBytes: number;
    /** Whether the export ran in a worker. */
    worker: boolean;
    /** Whether a second worker assembled, hashed and stored the file (XLSX: deflated it). */
    packWorker: boolean;
    /** With packWorker: bytes of that worker's WebAssembly memory. */
    packWasmMemoryBytes?: number;
    /** Where the time went, in milliseconds. */
    timing: {
      waitMs: number;
      decodeMs: number;
      writeMs: number;
      /** Handing chunks to the packing worker, and waiting while it is behind. */
      handOverMs: number;
      /** Assembling the zip package (in the packing worker). */
      packMs: number;
      hashMs: number;
      storeMs: number;
    };
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

/// Checked options of one export, with its live objects.
#[derive(Debug)]
pub(crate) struct ExportOptions {
    pub checked: CheckedOptions,
    pub storage: Storage,
    pub on_progress: Option<Function>,
    pub signal: Option<AbortSignal>,
    /// Keep an end-to-end encrypted copy; links go back to this page.
    pub keep_copy: Option<String>,
}

impl std::ops::Deref for ExportOptions {
    type Target = CheckedOptions;
    fn deref(&self) -> &CheckedOptions {
        &self.checked
    }
}

fn invalid(msg: &str) -> JsValue {
    export_error("INVALID_OPTIONS", msg)
}

/// The plain part of the options as JSON text, refusing what JSON would
/// silently drop or change, so that it cannot pass unseen: a function (a
/// callback under a misspelt name such as `onprogress`), a symbol, or a
/// number that is not finite (`NaN` would become `null`, and `null` the
/// default), at any depth. The replacer sees every value as `JSON.stringify`
/// does (after `toJSON`), so nothing is walked twice.
fn options_json(copy: &Object) -> Result<String, JsValue> {
    let mut lost: Option<String> = None;
    let mut replacer = |key: js_sys::JsString, value: JsValue| {
        let what = if value.is_function() {
            Some("a function (only onProgress takes one)")
        } else if value.is_symbol() {
            Some("a symbol")
        } else if value.as_f64().is_some_and(|n| !n.is_finite()) {
            Some("not a finite number")
        } else {
            None
        };
        if let Some(what) = what {
            lost.get_or_insert_with(|| format!("options: {:?} is {what}", String::from(key)));
        }
        Ok(Some(value))
    };
    let text = js_sys::JSON::stringify_with_replacer_func(copy, &mut replacer, None);
    if let Some(msg) = lost {
        return Err(invalid(&msg));
    }
    text.ok()
        .and_then(|s| s.as_string())
        .ok_or_else(|| invalid("options cannot be read as JSON (BigInt or a cycle?)"))
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
    let text = options_json(&copy)?;
    let checked = parse_options(&text).map_err(|e| export_error(e.code, &e.message))?;
    let storage = match checked.storage {
        StoragePref::Auto => Storage::Auto,
        StoragePref::Memory => Storage::Memory,
        StoragePref::Opfs => Storage::Opfs,
    };
    let keep_copy = checked
        .keep_copy
        .clone()
        .map(|base| base.unwrap_or_else(super::copy::here));
    Ok(ExportOptions {
        checked,
        storage,
        on_progress,
        signal,
        keep_copy,
    })
}
