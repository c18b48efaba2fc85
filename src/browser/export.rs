//! `exportData(options)`: the whole client-delivered export in the browser.

use js_sys::{Object, Reflect};
use serde::Deserialize;
use serde_json::json;
use wasm_bindgen::prelude::*;

use super::error::export_error;
use super::http::{aborted_error, sleep, Client, Retry, StreamError};
use super::options::{self, ExportOptions};
use super::output::{FileDone, FileOut};
use super::packer::RemotePacker;
use crate::format::ExportWriter;
use crate::model::{ExportInfo, Manifest};
use crate::wire::{decode_frame, WireError};

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

/// Where the file goes: written here, or handed to the packing worker.
enum Target {
    Here(FileOut),
    Packer(RemotePacker),
}

/// The file as the writer produces it, and where the time went.
struct Output {
    target: Target,
    timing: Timing,
}

impl Output {
    async fn push(&mut self, chunk: Vec<u8>) -> Result<(), JsValue> {
        if chunk.is_empty() {
            return Ok(());
        }
        match &mut self.target {
            Target::Here(file) => file.push(&chunk),
            Target::Packer(packer) => {
                let t = now();
                let sent = packer.send(&chunk).await;
                self.timing.hand_over += now() - t;
                sent
            }
        }
    }

    /// The file's bytes so far (as far as the packing worker has got).
    fn bytes(&self) -> u64 {
        match &self.target {
            Target::Here(file) => file.bytes(),
            Target::Packer(packer) => packer.bytes(),
        }
    }

    async fn finish(self) -> Result<FileDone, JsValue> {
        match self.target {
            Target::Here(file) => file.finish().await,
            Target::Packer(packer) => packer.finish_file().await,
        }
    }

    async fn discard(self) {
        match self.target {
            Target::Here(file) => file.discard().await,
            Target::Packer(packer) => packer.discard_file().await,
        }
    }
}

/// Where an export's time went, in milliseconds (`result.stats.timing`):
/// waiting for the network, decoding frames, formatting rows, handing
/// chunks to the packing worker (and waiting for it when it is behind),
/// and, where the file is built: assembling the zip, hashing the file,
/// storing it.
#[derive(Debug, Default, Clone, Copy)]
struct Timing {
    wait: f64,
    decode: f64,
    write: f64,
    hand_over: f64,
    pack: f64,
    hash: f64,
    store: f64,
}

impl Timing {
    fn to_js(self) -> JsValue {
        let o = Object::new();
        for (k, v) in [
            ("waitMs", self.wait),
            ("decodeMs", self.decode),
            ("writeMs", self.write),
            ("handOverMs", self.hand_over),
            ("packMs", self.pack),
            ("hashMs", self.hash),
            ("storeMs", self.store),
        ] {
            let _ = Reflect::set(&o, &k.into(), &JsValue::from_f64(v.round()));
        }
        o.into()
    }
}

/// A monotonic clock in milliseconds (`performance.now()`, pages and workers).
pub(crate) fn now() -> f64 {
    Reflect::get(&js_sys::global(), &"performance".into())
        .ok()
        .and_then(|p| {
            let f: js_sys::Function = Reflect::get(&p, &"now".into()).ok()?.dyn_into().ok()?;
            f.call0(&p).ok()?.as_f64()
        })
        .unwrap_or_else(js_sys::Date::now)
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

/// Where the records of `name` are read: the manifest's `records_url`,
/// which must be on the server's own origin (the bearer token is sent there).
fn records_url(
    opts: &ExportOptions,
    id: &str,
    name: &str,
    given: Option<&str>,
) -> Result<String, JsValue> {
    let url = given.map_or_else(
        || format!("/api/data/export/{id}/records/{name}"),
        str::to_string,
    );
    // A path on our origin, spelled plainly: the URL parser reads `/\host`
    // or `/<tab>/host` as `//host`, another origin (the request itself is
    // checked again, as the parser resolves it, before it is sent).
    let plain = |c: char| c != '\\' && !c.is_ascii_whitespace() && !c.is_control();
    if url.starts_with('/') && !url.starts_with("//") && url.chars().all(plain) {
        return Ok(url);
    }
    let base = &opts.base_url;
    if !base.is_empty() && (url == *base || url.starts_with(&format!("{base}/"))) {
        return Ok(url);
    }
    Err(export_error(
        "INVALID_RESPONSE",
        &format!("the server named records of {name} on another origin ({url}); the token is not sent there"),
    ))
}

/// Largest frame (one line of a stream) accepted from the server.
const MAX_FRAME_BYTES: usize = 256 << 20;

/// How long reporting a failed or cancelled export to the server may take.
const FAIL_REPORT_TIMEOUT_MS: u32 = 5_000;

/// Reads every record of one data type from its stream into the writer,
/// resuming from the last frame's cursor when the stream breaks, so the
/// rows are exactly those of an unbroken read.
#[allow(clippy::too_many_arguments)]
async fn fetch_type(
    client: &Client,
    opts: &ExportOptions,
    url: &str,
    t: usize,
    columns: &[crate::model::Column],
    writer: &mut ExportWriter,
    out: &mut Output,
    progress: &mut Progress<'_>,
    name: &str,
    expected: u64,
) -> Result<(), JsValue> {
    let mut cursor: Option<String> = None;
    // Every cursor handed out so far: a server that leads back to one
    // (a → b → a) would otherwise be read forever.
    let mut seen = std::collections::HashSet::new();
    let mut offset: u64 = 0;
    let mut failures = 0;
    loop {
        if client
            .signal
            .as_ref()
            .is_some_and(web_sys::AbortSignal::aborted)
        {
            return Err(aborted_error());
        }
        let mut path = format!("{url}/stream?limit={}", opts.page_size);
        if let Some(c) = &cursor {
            path.push_str("&cursor=");
            path.push_str(&String::from(js_sys::encode_uri_component(c)));
        }
        let mut stream = client.open_stream(&path).await?;
        let mut pending: Vec<u8> = Vec::new();
        let broken = loop {
            let waited = now();
            let next = stream.next_chunk().await;
            out.timing.wait += now() - waited;
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break "the stream ended early".to_string(),
                Err(StreamError::Aborted) => return Err(aborted_error()),
                Err(StreamError::Network(msg)) => break msg,
            };
            pending.extend_from_slice(&chunk);
            let mut start = 0;
            let mut finished = false;
            let mut server_error = None;
            while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
                let line = &pending[start..start + nl];
                start += nl + 1;
                let decoding = now();
                let decoded = decode_frame(line, columns);
                out.timing.decode += now() - decoding;
                let frame = match decoded {
                    Ok(f) => f,
                    Err(WireError::Server { code, message }) => {
                        server_error = Some(format!("{code}: {message}"));
                        break;
                    }
                    Err(e) => return Err(export_error(e.code(), &e.to_string())),
                };
                if frame.offset != offset {
                    return Err(export_error(
                        "INVALID_RESPONSE",
                        &format!(
                            "records of {name} arrived at position {} where {offset} was expected",
                            frame.offset
                        ),
                    ));
                }
                if frame.row_count() == 0 && frame.next_cursor.is_some() {
                    return Err(export_error(
                        "INVALID_RESPONSE",
                        &format!("the server sent an empty page of {name} that does not end it"),
                    ));
                }
                // Fresh cursors without end would be read forever too: no
                // more records than the manifest announced are taken. An
                // honest server gets here when records were added during
                // the export; `complete` would refuse it with this code.
                if offset + frame.row_count() as u64 > expected {
                    return Err(export_error(
                        "RECORD_COUNT_MISMATCH",
                        &format!("the server has more records of {name} than the {expected} its manifest announced: the data changed during the export (or the server is faulty); start a new export"),
                    ));
                }
                let writing = now();
                let mut cells = Vec::with_capacity(columns.len());
                for row in frame.rows() {
                    cells.clear();
                    cells.extend(row.iter().map(crate::wire::WireCell::as_cell));
                    writer.write_row(t, &cells)?;
                }
                out.timing.write += now() - writing;
                out.push(writer.take_output()).await?;
                failures = 0;
                drop(cells);
                let rows = frame.row_count() as u64;
                match frame.next_cursor {
                    Some(next) if !seen.insert(next.to_string()) => {
                        return Err(export_error(
                            "INVALID_RESPONSE",
                            &format!("the server led the records of {name} back to an earlier cursor (a cycle)"),
                        ))
                    }
                    Some(next) => cursor = Some(next.into_owned()),
                    None => finished = true,
                }
                offset += rows;
                progress.processed += rows;
                progress.emit(Some(name), out.bytes(), false);
                if client
                    .signal
                    .as_ref()
                    .is_some_and(web_sys::AbortSignal::aborted)
                {
                    return Err(aborted_error());
                }
                if finished {
                    break;
                }
            }
            pending.drain(..start);
            if finished {
                return Ok(());
            }
            if let Some(e) = server_error {
                break e;
            }
            if pending.len() > MAX_FRAME_BYTES {
                return Err(export_error(
                    "INVALID_RESPONSE",
                    &format!("a page of {name} is larger than {MAX_FRAME_BYTES} bytes"),
                ));
            }
        };
        drop(stream);
        failures += 1;
        if failures >= client.max_attempts {
            return Err(export_error(
                "NETWORK_ERROR",
                &format!("could not read the records of {name}: {broken}"),
            ));
        }
        // Exponential backoff with jitter, then resume from the cursor.
        let base = f64::from(client.retry_base_ms) * 2f64.powi(failures as i32 - 1);
        let delay = (base * (0.5 + js_sys::Math::random() * 0.5)).min(30_000.0);
        sleep(delay, client.signal.as_ref()).await?;
    }
}

/// Every data type the server offers this user (`GET /api/data/summary`).
async fn all_data_types(client: &Client) -> Result<Vec<String>, JsValue> {
    #[derive(serde::Deserialize)]
    struct Summary {
        data_types: Vec<Offered>,
    }
    #[derive(serde::Deserialize)]
    struct Offered {
        data_type: String,
    }
    let summary: Summary = parse(
        &client
            .send("GET", "/api/data/summary", None, Retry::Idempotent)
            .await?,
        "summary",
    )?;
    let types: Vec<String> = summary
        .data_types
        .into_iter()
        .map(|t| t.data_type)
        .collect();
    if types.is_empty() {
        return Err(export_error(
            "INVALID_RESPONSE",
            "the server offers no data types to export",
        ));
    }
    Ok(types)
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
pub async fn export_data(options: JsValue) -> Result<JsValue, JsValue> {
    export_data_packed(options, JsValue::UNDEFINED).await
}

/// [`export_data`], as `worker.js` calls it: `packer` (a handle on a second
/// worker, or `undefined`) takes the file, which is then assembled,
/// checksummed and stored there.
///
/// # Errors
///
/// As [`export_data`]; and the packing worker's errors.
#[wasm_bindgen(js_name = exportDataHere, skip_typescript)]
pub async fn export_data_packed(options: JsValue, packer: JsValue) -> Result<JsValue, JsValue> {
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
        idempotency_key: super::http::new_idempotency_key(),
    };
    super::output::check_storage(opts.storage).await?;
    let range = opts.date_range.clone().unwrap_or_default();
    let data_types = if opts.data_types.is_empty() {
        all_data_types(&client).await?
    } else {
        opts.data_types.clone()
    };
    let body = json!({
        "export_format": opts.format.as_str(),
        "data_types": data_types,
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
    let packer = (!packer.is_undefined() && !packer.is_null()).then(|| packer.unchecked_into());
    match run(&client, &opts, &created, packer).await {
        // Complete and reported: a download the page refuses is not a
        // failed export (see save_result).
        Ok(result) if opts.download => super::download::save_result(&result).map(|()| result),
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
            // Bounded, so that a cancel or an error reaches the caller
            // promptly even when the server has stopped answering: the
            // report is bookkeeping (an open request expires anyway).
            let reporter = Client {
                signal: None,
                max_attempts: if code == "ABORTED" { 1 } else { 2 },
                max_retry_after_secs: 0,
                retry_base_ms: client.retry_base_ms.min(500),
                request_timeout_ms: client.request_timeout_ms.min(FAIL_REPORT_TIMEOUT_MS),
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

/// Checks `options` as `exportData` would, without making any request.
///
/// # Errors
///
/// The `ExportError` `exportData` would reject with.
#[wasm_bindgen(js_name = checkExportOptions, skip_typescript)]
pub fn check_export_options(options: JsValue) -> Result<(), JsValue> {
    options::parse(&options).map(|_| ())
}

fn in_worker() -> bool {
    js_sys::global()
        .dyn_ref::<web_sys::WorkerGlobalScope>()
        .is_some()
}

/// Bytes of this module's `WebAssembly.Memory` (it only ever grows, so
/// after an export it is that export's peak).
#[wasm_bindgen(js_name = wasmMemoryBytes, skip_typescript)]
pub fn wasm_memory_bytes() -> f64 {
    let memory: js_sys::WebAssembly::Memory = wasm_bindgen::memory().unchecked_into();
    js_sys::ArrayBuffer::from(memory.buffer()).byte_length() as f64
}

/// This instance's compiled `WebAssembly.Module`. The page hands it to the
/// export's workers, so that they neither download nor compile the module
/// again (1.6 MB, twice, on every export: through a slow link that was
/// most of the time before the first record).
#[wasm_bindgen(js_name = compiledWasmModule, skip_typescript)]
pub fn wasm_module() -> JsValue {
    wasm_bindgen::module()
}

async fn run(
    client: &Client,
    opts: &ExportOptions,
    created: &Created,
    packer: Option<RemotePacker>,
) -> Result<JsValue, JsValue> {
    let id = &created.request_id;
    let mut writer = ExportWriter::new(
        opts.format,
        &created.manifest,
        &created.export_info,
        &opts.format_options,
    )?;
    let mut progress = Progress {
        callback: opts.on_progress.as_ref(),
        total: created.manifest.total_records(),
        processed: 0,
        last_pct: 0,
    };
    let name = format!("{id}.{}", opts.format.extension());
    let mime = opts.format.content_type();
    let target = match packer {
        Some(packer) => {
            let zip = writer.defer_zip();
            packer.open_file(opts.storage, &name, mime, zip).await?;
            Target::Packer(packer)
        }
        None => Target::Here(FileOut::open(opts.storage, &name, mime).await?),
    };
    let mut out = Output {
        target,
        timing: Timing::default(),
    };
    match write_file(client, opts, created, &mut writer, &mut out, &mut progress).await {
        Ok(()) => finish(client, opts, id, &writer, out, &mut progress).await,
        Err(e) => {
            out.discard().await;
            Err(e)
        }
    }
}

/// Fetches every record into the writer and the output.
async fn write_file(
    client: &Client,
    opts: &ExportOptions,
    created: &Created,
    writer: &mut ExportWriter,
    out: &mut Output,
    progress: &mut Progress<'_>,
) -> Result<(), JsValue> {
    let id = &created.request_id;
    out.push(writer.begin()?).await?;
    progress.emit(
        created.manifest.types.keys().next().map(String::as_str),
        out.bytes(),
        false,
    );
    for (name, t) in &created.manifest.types {
        let url = records_url(opts, id, name, t.records_url.as_deref())?;
        let ti = writer.type_index(name).ok_or_else(|| {
            export_error(
                "INVALID_RESPONSE",
                &format!("{name} is not in the manifest"),
            )
        })?;
        fetch_type(
            client, opts, &url, ti, &t.columns, writer, out, progress, name, t.records,
        )
        .await?;
    }
    out.push(writer.finish()?).await
}

/// Reports the finished file to the server (what was handed over), then
/// hands it over: the result, and the download when asked for.
async fn finish(
    client: &Client,
    opts: &ExportOptions,
    id: &str,
    writer: &ExportWriter,
    out: Output,
    progress: &mut Progress<'_>,
) -> Result<JsValue, JsValue> {
    let packed = matches!(out.target, Target::Packer(_));
    let mut timing = out.timing;
    // The file is complete before the server hears of it.
    let file = out.finish().await?;
    let (sha256, bytes) = (file.sha256.clone(), file.bytes);
    timing.hash = file.hash_ms;
    timing.store = file.store_ms;
    timing.pack = file.pack_ms;
    let records = writer.records_written();
    let report =
        json!({ "record_count": records, "byte_size": bytes, "sha256": sha256 }).to_string();
    let storage = if file.opfs_name.is_some() {
        "opfs"
    } else {
        "memory"
    };
    let reported = client
        .send(
            "POST",
            &format!("/api/data/export/{id}/complete"),
            Some(&report),
            Retry::Idempotent,
        )
        .await;
    if let Err(e) = reported {
        if let Some(name) = &file.opfs_name {
            super::output::remove_opfs_file(name).await;
        }
        return Err(e);
    }
    let blob = file.blob;
    // The export is complete and reported: a copy that cannot be kept is
    // said in the result, and the file is still handed over.
    let copy = match &opts.keep_copy {
        Some(base) => Some(super::copy::keep(client, id, &blob, base, opts.copy_part_bytes).await),
        None => None,
    };
    progress.emit(None, bytes, true);
    let filename = opts
        .filename
        .clone()
        .unwrap_or_else(|| format!("{id}.{}", opts.format.extension()));
    let result = Object::new();
    let set = |k: &str, v: JsValue| Reflect::set(&result, &k.into(), &v);
    set("requestId", id.into())?;
    set("filename", filename.into())?;
    set("byteSize", JsValue::from_f64(bytes as f64))?;
    set("recordCount", JsValue::from_f64(records as f64))?;
    set("sha256", sha256.into())?;
    set("blob", blob.into())?;
    match copy {
        Some(Ok(c)) => set("copy", c)?,
        Some(Err(e)) => set("copyError", e)?,
        None => true,
    };
    let stats = Object::new();
    let _ = Reflect::set(&stats, &"storage".into(), &storage.into());
    let _ = Reflect::set(
        &stats,
        &"opfsName".into(),
        &file.opfs_name.clone().map_or(JsValue::NULL, JsValue::from),
    );
    let _ = Reflect::set(&stats, &"worker".into(), &in_worker().into());
    let _ = Reflect::set(&stats, &"packWorker".into(), &packed.into());
    if packed {
        let _ = Reflect::set(
            &stats,
            &"packWasmMemoryBytes".into(),
            &file.wasm_memory.into(),
        );
    }
    let _ = Reflect::set(&stats, &"timing".into(), &timing.to_js());
    let opfs_name = file.opfs_name;
    let release = Closure::<dyn FnMut() -> js_sys::Promise>::new(move || {
        let name = opfs_name.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            if let Some(name) = name {
                super::output::remove_opfs_file(&name).await;
            }
            Ok(JsValue::UNDEFINED)
        })
    });
    set("release", release.into_js_value())?;
    let _ = Reflect::set(
        &stats,
        &"wasmMemoryBytes".into(),
        &wasm_memory_bytes().into(),
    );
    set("stats", stats.into())?;
    Ok(result.into())
}
