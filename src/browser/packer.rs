//! The packing worker: where an export in a worker has a second worker,
//! the file is assembled, checksummed and stored there (`FilePacker`),
//! while the first worker fetches, decodes and writes the rows. For XLSX
//! the first worker sends zip instructions ([`ExportWriter::defer_zip`]),
//! so deflating the sheets, their CRC and the file's SHA-256 run beside
//! the writing instead of after it. CSV and JSON go across as they are.
//!
//! [`ExportWriter::defer_zip`]: crate::format::ExportWriter::defer_zip

use js_sys::{Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use super::error::export_error;
use super::export::now;
use super::output::{FileDone, FileOut, Storage};
use crate::format::ZipAssembler;

/// The file side of an export, in the packing worker (driven by
/// `worker.js`).
#[wasm_bindgen(skip_typescript)]
pub struct FilePacker {
    file: FileOut,
    zip: Option<ZipAssembler>,
    /// The assembled bytes of the last instructions, reused.
    buf: Vec<u8>,
    pack_ms: f64,
}

impl std::fmt::Debug for FilePacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilePacker")
            .field("bytes", &self.file.bytes())
            .field("zip", &self.zip.is_some())
            .finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl FilePacker {
    /// Opens the file `name` (`storage`: `auto`, `memory` or `opfs`); with
    /// `zip`, what arrives are zip instructions.
    ///
    /// # Errors
    ///
    /// `STORAGE_ERROR` as for an export's own file.
    pub async fn open(
        storage: String,
        name: String,
        mime: String,
        zip: bool,
    ) -> Result<FilePacker, JsValue> {
        Ok(Self {
            file: FileOut::open(Storage::from_name(&storage), &name, &mime).await?,
            zip: zip.then(ZipAssembler::new),
            buf: Vec::new(),
            pack_ms: 0.0,
        })
    }

    /// Adds the next output of the writer; returns the file's bytes so far.
    ///
    /// # Errors
    ///
    /// The `ExportError` of a malformed package or of the storage.
    pub fn write(&mut self, data: &[u8]) -> Result<f64, JsValue> {
        match self.zip.as_mut() {
            Some(zip) => {
                let t = now();
                self.buf.clear();
                zip.feed(data, &mut self.buf)?;
                self.pack_ms += now() - t;
                self.file.push(&self.buf)?;
            }
            None => self.file.push(data)?,
        }
        Ok(self.file.bytes() as f64)
    }

    /// Completes the file: `{blob, opfsName, byteSize, sha256, hashMs,
    /// storeMs, packMs, wasmMemoryBytes}`.
    ///
    /// # Errors
    ///
    /// `XLSX_ERROR` when the package did not end, `STORAGE_ERROR` as for
    /// an export's own file.
    pub async fn finish(self) -> Result<JsValue, JsValue> {
        if self.zip.as_ref().is_some_and(|z| !z.is_finished()) {
            self.file.discard().await;
            return Err(export_error(
                "XLSX_ERROR",
                "the workbook's package was not completed",
            ));
        }
        let mut done = self.file.finish().await?;
        done.pack_ms = self.pack_ms;
        Ok(done.to_js())
    }

    /// Drops the file (a failed or cancelled export).
    pub async fn discard(self) {
        self.file.discard().await;
    }
}

#[wasm_bindgen]
extern "C" {
    /// The first worker's handle on the packing worker (`worker.js`).
    pub(crate) type RemotePacker;

    #[wasm_bindgen(method, catch)]
    fn open(
        this: &RemotePacker,
        storage: &str,
        name: &str,
        mime: &str,
        zip: bool,
    ) -> Result<Promise, JsValue>;

    /// A view of `len` bytes on a buffer the packing worker gave back (or
    /// a new one): chunks reuse a few buffers instead of leaving one
    /// behind each, which the collector would free only now and then.
    #[wasm_bindgen(method, catch)]
    fn buffer(this: &RemotePacker, len: u32) -> Result<Uint8Array, JsValue>;

    /// Sends a chunk (its buffer is transferred); a promise when the
    /// packer is behind and the writer should wait.
    #[wasm_bindgen(method, catch)]
    fn write(this: &RemotePacker, chunk: Uint8Array) -> Result<JsValue, JsValue>;

    #[wasm_bindgen(method, catch)]
    fn finish(this: &RemotePacker) -> Result<Promise, JsValue>;

    #[wasm_bindgen(method, catch)]
    fn discard(this: &RemotePacker) -> Result<Promise, JsValue>;

    #[wasm_bindgen(method, getter, js_name = bytesWritten)]
    fn bytes_written(this: &RemotePacker) -> f64;
}

impl RemotePacker {
    /// Opens the file in the packing worker.
    ///
    /// # Errors
    ///
    /// The packing worker's `ExportError`.
    pub(crate) async fn open_file(
        &self,
        storage: Storage,
        name: &str,
        mime: &str,
        zip: bool,
    ) -> Result<(), JsValue> {
        JsFuture::from(self.open(storage.name(), name, mime, zip)?).await?;
        Ok(())
    }

    /// Sends the next output of the writer, waiting while the packer is
    /// more than a few chunks behind (so they do not pile up in memory).
    ///
    /// # Errors
    ///
    /// The packing worker's `ExportError`, from this chunk or an earlier one.
    pub(crate) async fn send(&self, chunk: &[u8]) -> Result<(), JsValue> {
        let len = u32::try_from(chunk.len())
            .map_err(|_| export_error("XLSX_ERROR", "a chunk of the file passed 4 GiB"))?;
        let view = self.buffer(len)?;
        view.copy_from(chunk);
        let waiting = self.write(view)?;
        if let Some(p) = waiting.dyn_ref::<Promise>() {
            JsFuture::from(p.clone()).await?;
        }
        Ok(())
    }

    /// The file's bytes the packing worker has stored so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes_written() as u64
    }

    /// Completes the file in the packing worker.
    ///
    /// # Errors
    ///
    /// The packing worker's `ExportError`.
    pub(crate) async fn finish_file(&self) -> Result<FileDone, JsValue> {
        FileDone::from_js(&JsFuture::from(self.finish()?).await?)
    }

    /// Drops the file in the packing worker.
    pub(crate) async fn discard_file(&self) {
        if let Ok(p) = self.discard() {
            let _ = JsFuture::from(p).await;
        }
    }
}
