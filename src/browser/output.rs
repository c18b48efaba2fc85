//! Where the file goes while `exportData` writes it. Nothing of the file
//! stays in wasm memory: each chunk leaves it as it is produced.
//!
//! - **OPFS** (in a worker, where the browser offers the Origin Private
//!   File System): chunks are written synchronously to a file on disk; the
//!   result's Blob is that file. Memory stays flat for files of any size.
//! - **Memory** (everywhere else): Blob parts, folded into one Blob every
//!   few megabytes so the browser can keep them outside the page's heap.
//!
//! Files are named `<request id>.<ext>` in the OPFS directory `handover`.
//! A failed or cancelled export removes its file at once; the package
//! removes a downloaded one a little after the download started, and files
//! left over from closed pages are removed by the next export after an hour.

use js_sys::{Array, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    Blob, BlobPropertyBag, FileSystemDirectoryHandle, FileSystemFileHandle,
    FileSystemGetDirectoryOptions, FileSystemGetFileOptions, FileSystemReadWriteOptions,
    FileSystemSyncAccessHandle,
};

use super::error::export_error;
use super::export::now;
use crate::Sha256Stream;

/// The OPFS directory of export files.
pub(crate) const OPFS_DIR: &str = "handover";
/// Files older than this are left over from a page that went away.
const STALE_MS: f64 = 60.0 * 60.0 * 1000.0;
/// Blob parts are folded into one Blob past this many bytes.
const FOLD_BYTES: usize = 16 << 20;

/// Where the user asked the file to go (`storage` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    /// OPFS where available (in a worker), memory otherwise.
    Auto,
    /// Always Blob parts in memory.
    Memory,
    /// OPFS, or an error where it is not available.
    Opfs,
}

pub(crate) enum Sink {
    Memory {
        blob: Option<Blob>,
        parts: Array,
        parts_bytes: usize,
        mime: String,
    },
    Opfs {
        dir: FileSystemDirectoryHandle,
        file: FileSystemFileHandle,
        handle: FileSystemSyncAccessHandle,
        name: String,
        at: f64,
        /// The file's size: grown ahead of the writes, in big steps (each
        /// growth asks the browser for quota), cut to `at` at the end.
        reserved: f64,
    },
}

/// The file grows ahead of the writes by this much at a time.
const GROW_BYTES: f64 = 64.0 * 1024.0 * 1024.0;

/// The finished file.
pub(crate) struct Finished {
    pub blob: Blob,
    /// The OPFS file's name, when the file is one.
    pub opfs_name: Option<String>,
}

async fn wait(p: Promise) -> Result<JsValue, JsValue> {
    JsFuture::from(p).await
}

/// `storage: "opfs"` where there is none.
fn no_opfs() -> JsValue {
    export_error(
        "STORAGE_ERROR",
        "the Origin Private File System is not available here (it needs a worker)",
    )
}

/// Refuses `storage: "opfs"` where there is no OPFS, before the export is
/// created: afterwards it would have cost the caller one of their creates.
///
/// # Errors
///
/// `STORAGE_ERROR`.
pub(crate) async fn check_storage(storage: Storage) -> Result<(), JsValue> {
    if storage == Storage::Opfs && opfs_dir().await.is_none() {
        return Err(no_opfs());
    }
    Ok(())
}

/// The OPFS directory of export files, when this context has the OPFS and
/// synchronous file access (workers).
async fn opfs_dir() -> Option<FileSystemDirectoryHandle> {
    let global = js_sys::global();
    global.dyn_ref::<web_sys::WorkerGlobalScope>()?;
    let navigator = Reflect::get(&global, &"navigator".into()).ok()?;
    let storage = Reflect::get(&navigator, &"storage".into()).ok()?;
    let storage: web_sys::StorageManager = storage.dyn_into().ok()?;
    let root: FileSystemDirectoryHandle =
        wait(storage.get_directory()).await.ok()?.dyn_into().ok()?;
    let opts = FileSystemGetDirectoryOptions::new();
    opts.set_create(true);
    let dir: FileSystemDirectoryHandle =
        wait(root.get_directory_handle_with_options(OPFS_DIR, &opts))
            .await
            .ok()?
            .dyn_into()
            .ok()?;
    // Synchronous access handles exist only in dedicated workers.
    let proto = Reflect::get(&global, &"FileSystemSyncAccessHandle".into()).ok()?;
    (!proto.is_undefined()).then_some(dir)
}

/// Removes files left over from pages that went away (best effort: a file
/// another export is writing is locked and stays).
async fn sweep(dir: &FileSystemDirectoryHandle) {
    let now = js_sys::Date::now();
    let values = dir.values();
    // Bounded: at most a thousand files are looked at.
    for _ in 0..1000 {
        let Ok(next) = values.next() else { return };
        let Ok(step) = wait(next).await else { return };
        if Reflect::get(&step, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            != Some(false)
        {
            return;
        }
        let Ok(handle) = Reflect::get(&step, &"value".into()) else {
            return;
        };
        let Ok(handle) = handle.dyn_into::<FileSystemFileHandle>() else {
            continue;
        };
        let Ok(file) = wait(handle.get_file()).await else {
            continue;
        };
        let Ok(file) = file.dyn_into::<web_sys::File>() else {
            continue;
        };
        if now - file.last_modified() > STALE_MS {
            let _ = wait(dir.remove_entry(&handle.name())).await;
        }
    }
}

fn fail(what: &str, e: &JsValue) -> JsValue {
    let msg = Reflect::get(e, &"message".into())
        .ok()
        .and_then(|m| m.as_string())
        .unwrap_or_else(|| format!("{e:?}"));
    export_error("STORAGE_ERROR", &format!("{what}: {msg}"))
}

impl Sink {
    /// Opens the sink for the file `name` of type `mime`.
    ///
    /// # Errors
    ///
    /// `STORAGE_ERROR` when OPFS was asked for and cannot be used.
    pub(crate) async fn open(storage: Storage, name: &str, mime: &str) -> Result<Self, JsValue> {
        if storage != Storage::Memory {
            match opfs_dir().await {
                Some(dir) => {
                    sweep(&dir).await;
                    return Self::open_opfs(dir, name).await;
                }
                None if storage == Storage::Opfs => return Err(no_opfs()),
                None => {}
            }
        }
        Ok(Self::Memory {
            blob: None,
            parts: Array::new(),
            parts_bytes: 0,
            mime: mime.to_string(),
        })
    }

    async fn open_opfs(dir: FileSystemDirectoryHandle, name: &str) -> Result<Self, JsValue> {
        let opts = FileSystemGetFileOptions::new();
        opts.set_create(true);
        let file: FileSystemFileHandle = wait(dir.get_file_handle_with_options(name, &opts))
            .await
            .map_err(|e| fail("creating the export file", &e))?
            .dyn_into()?;
        let handle: FileSystemSyncAccessHandle = wait(file.create_sync_access_handle())
            .await
            .map_err(|e| fail("opening the export file", &e))?
            .dyn_into()?;
        handle
            .truncate_with_u32(0)
            .map_err(|e| fail("emptying the export file", &e))?;
        Ok(Self::Opfs {
            dir,
            file,
            handle,
            name: name.to_string(),
            at: 0.0,
            reserved: 0.0,
        })
    }

    /// Appends a chunk.
    ///
    /// # Errors
    ///
    /// `STORAGE_ERROR` when the disk refuses it (e.g. the quota is used up).
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), JsValue> {
        match self {
            Self::Memory {
                blob,
                parts,
                parts_bytes,
                mime,
            } => {
                parts.push(&Uint8Array::from(chunk));
                *parts_bytes += chunk.len();
                if *parts_bytes >= FOLD_BYTES {
                    // The browser keeps a Blob's bytes outside the page's
                    // heap (and pages big ones to disk).
                    let all = Array::new();
                    if let Some(b) = blob.take() {
                        all.push(&b);
                    }
                    for p in parts.iter() {
                        all.push(&p);
                    }
                    *blob = Some(make_blob(&all, mime)?);
                    parts.set_length(0);
                    *parts_bytes = 0;
                }
                Ok(())
            }
            Self::Opfs {
                handle,
                at,
                reserved,
                ..
            } => {
                let end = *at + chunk.len() as f64;
                if end > *reserved {
                    let size = end + GROW_BYTES;
                    handle
                        .truncate_with_f64(size)
                        .map_err(|e| fail("growing the export file (is the disk full?)", &e))?;
                    *reserved = size;
                }
                let opts = FileSystemReadWriteOptions::new();
                opts.set_at(*at);
                // `write_with_u8_array…` reads straight from wasm memory.
                let written = handle
                    .write_with_u8_array_and_options(chunk, &opts)
                    .map_err(|e| fail("writing the export file", &e))?;
                if written as usize != chunk.len() {
                    return Err(export_error(
                        "STORAGE_ERROR",
                        "the disk took only part of the export (is it full?)",
                    ));
                }
                *at += written;
                Ok(())
            }
        }
    }

    /// Closes the file; returns it as a Blob.
    ///
    /// # Errors
    ///
    /// `STORAGE_ERROR` when the file cannot be completed.
    pub(crate) async fn finish(self) -> Result<Finished, JsValue> {
        match self {
            Self::Memory {
                blob, parts, mime, ..
            } => {
                let all = Array::new();
                if let Some(b) = blob {
                    all.push(&b);
                }
                for p in parts.iter() {
                    all.push(&p);
                }
                Ok(Finished {
                    blob: make_blob(&all, &mime)?,
                    opfs_name: None,
                })
            }
            Self::Opfs {
                dir,
                file,
                handle,
                name,
                at,
                ..
            } => {
                // The file was grown ahead of the writes: cut it to what was
                // written, or the download would end in zeros.
                let done = handle
                    .truncate_with_f64(at)
                    .and_then(|()| handle.flush())
                    .map_err(|e| fail("saving the export file", &e));
                handle.close();
                if let Err(e) = done {
                    let _ = wait(dir.remove_entry(&name)).await;
                    return Err(e);
                }
                let blob: Blob = wait(file.get_file())
                    .await
                    .map_err(|e| fail("reading the export file", &e))?
                    .dyn_into()?;
                Ok(Finished {
                    blob,
                    opfs_name: Some(name),
                })
            }
        }
    }

    /// Drops whatever was written (a failed or cancelled export).
    pub(crate) async fn discard(self) {
        if let Self::Opfs {
            dir, handle, name, ..
        } = self
        {
            handle.close();
            let _ = wait(dir.remove_entry(&name)).await;
        }
    }
}

/// The file as it grows: each chunk goes to the sink at once (Rust never
/// holds the file), with its checksum and size.
pub(crate) struct FileOut {
    sink: Sink,
    sha: Sha256Stream,
    bytes: u64,
    hash_ms: f64,
    store_ms: f64,
}

/// The finished file, with what the server is told of it.
pub(crate) struct FileDone {
    pub blob: Blob,
    pub opfs_name: Option<String>,
    pub bytes: u64,
    pub sha256: String,
    pub hash_ms: f64,
    pub store_ms: f64,
    /// Time spent assembling the zip package, where another worker did.
    pub pack_ms: f64,
    /// Bytes of the `WebAssembly.Memory` of the instance that built the file.
    pub wasm_memory: f64,
}

impl FileOut {
    /// Opens the file `name` of type `mime` in `storage`.
    ///
    /// # Errors
    ///
    /// As [`Sink::open`].
    pub(crate) async fn open(storage: Storage, name: &str, mime: &str) -> Result<Self, JsValue> {
        Ok(Self {
            sink: Sink::open(storage, name, mime).await?,
            sha: Sha256Stream::default(),
            bytes: 0,
            hash_ms: 0.0,
            store_ms: 0.0,
        })
    }

    /// Appends a chunk of the file.
    ///
    /// # Errors
    ///
    /// As [`Sink::write`].
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), JsValue> {
        if chunk.is_empty() {
            return Ok(());
        }
        let t = now();
        self.sha.update(chunk);
        let h = now();
        self.bytes += chunk.len() as u64;
        self.sink.write(chunk)?;
        self.hash_ms += h - t;
        self.store_ms += now() - h;
        Ok(())
    }

    /// Bytes of the file so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Completes the file.
    ///
    /// # Errors
    ///
    /// As [`Sink::finish`].
    pub(crate) async fn finish(self) -> Result<FileDone, JsValue> {
        let sha256 = self.sha.finish_hex();
        let file = self.sink.finish().await?;
        Ok(FileDone {
            blob: file.blob,
            opfs_name: file.opfs_name,
            bytes: self.bytes,
            sha256,
            hash_ms: self.hash_ms,
            store_ms: self.store_ms,
            pack_ms: 0.0,
            wasm_memory: super::export::wasm_memory_bytes(),
        })
    }

    /// Drops the file (a failed or cancelled export).
    pub(crate) async fn discard(self) {
        self.sink.discard().await;
    }
}

impl FileDone {
    /// As a plain object, to cross from the packing worker.
    pub(crate) fn to_js(&self) -> JsValue {
        let o = js_sys::Object::new();
        let set = |k: &str, v: JsValue| {
            let _ = Reflect::set(&o, &k.into(), &v);
        };
        set("blob", self.blob.clone().into());
        set(
            "opfsName",
            self.opfs_name.clone().map_or(JsValue::NULL, JsValue::from),
        );
        set("byteSize", JsValue::from_f64(self.bytes as f64));
        set("sha256", self.sha256.clone().into());
        set("hashMs", self.hash_ms.into());
        set("storeMs", self.store_ms.into());
        set("packMs", self.pack_ms.into());
        set("wasmMemoryBytes", self.wasm_memory.into());
        o.into()
    }

    /// Back from [`to_js`](Self::to_js).
    ///
    /// # Errors
    ///
    /// `WORKER_ERROR` when the object is not one.
    pub(crate) fn from_js(v: &JsValue) -> Result<Self, JsValue> {
        let get = |k: &str| Reflect::get(v, &k.into()).unwrap_or(JsValue::UNDEFINED);
        let bad = || export_error("WORKER_ERROR", "the packing worker gave no file");
        let num = |k: &str| get(k).as_f64().unwrap_or(0.0);
        Ok(Self {
            blob: get("blob").dyn_into().map_err(|_| bad())?,
            opfs_name: get("opfsName").as_string(),
            bytes: get("byteSize").as_f64().ok_or_else(bad)? as u64,
            sha256: get("sha256").as_string().ok_or_else(bad)?,
            hash_ms: num("hashMs"),
            store_ms: num("storeMs"),
            pack_ms: num("packMs"),
            wasm_memory: num("wasmMemoryBytes"),
        })
    }
}

impl Storage {
    /// The option's name (`auto`, `memory`, `opfs`), to cross to the
    /// packing worker.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Memory => "memory",
            Self::Opfs => "opfs",
        }
    }

    /// Back from [`name`](Self::name); anything else is `Auto`.
    pub(crate) fn from_name(name: &str) -> Self {
        match name {
            "memory" => Self::Memory,
            "opfs" => Self::Opfs,
            _ => Self::Auto,
        }
    }
}

/// Removes the OPFS file `name` (a finished export that was not handed
/// over, or one released after its download).
pub(crate) async fn remove_opfs_file(name: &str) {
    if let Some(dir) = opfs_dir().await {
        let _ = wait(dir.remove_entry(name)).await;
    }
}

fn make_blob(parts: &Array, mime: &str) -> Result<Blob, JsValue> {
    let bag = BlobPropertyBag::new();
    bag.set_type(mime);
    Blob::new_with_blob_sequence_and_options(parts, &bag)
}
