//! Server-built export files, encrypted at rest: AES-256-GCM in chunks
//! (handover::crypto) under a fresh data key per file; the data key is
//! wrapped by the master key and stored beside the file's row. Deleting or
//! expiring an export deletes the wrapped key and the file.

use std::path::PathBuf;

use anyhow::Context as _;
use axum::body::Bytes;
use futures_util::{Stream, StreamExt as _};
use handover::crypto::{DataKey, Decryptor, Encryptor, CHUNK_SIZE, HEADER_SIZE, TAG_SIZE};
use handover::format::{ExportFormat, ExportWriter, FormatOptions};
use sqlx::{Row, SqlitePool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The stored kind of a server build's rows as frames (the wire format),
/// from which downloads in another format are converted.
pub const FRAMES: &str = "frames";

use crate::exports::ExportRow;
use crate::AppState;

/// Where encrypted files live and the key that wraps their keys.
pub struct FileStore {
    pub dir: PathBuf,
    master: DataKey,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore").field("dir", &self.dir).finish()
    }
}

/// A file being written: plaintext in, ciphertext to disk.
#[derive(Debug)]
pub struct FileWriter {
    file: tokio::fs::File,
    path: PathBuf,
    enc: Option<Encryptor>,
    wrapped: Vec<u8>,
    hasher: handover::Sha256Stream,
    size: u64,
}

/// A stored file opened for download.
pub struct OpenFile {
    /// Size and checksum: known for stored files, not for conversions.
    pub byte_size: Option<u64>,
    pub sha256: Option<String>,
    /// The stored file this one was converted from, if any.
    pub converted_from: Option<String>,
    pub stream: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
}

impl std::fmt::Debug for OpenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFile")
            .field("byte_size", &self.byte_size)
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl FileStore {
    /// A store in `dir` (created if missing) with `master` wrapping the keys.
    ///
    /// # Errors
    ///
    /// The directory cannot be created.
    pub fn new(dir: PathBuf, master: DataKey) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = Self::tmp_of(&dir);
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self { dir, master })
    }

    /// Starts writing the `format` file of export `id`.
    ///
    /// # Errors
    ///
    /// I/O or randomness errors.
    pub async fn create(&self, id: &str, kind: &str) -> anyhow::Result<FileWriter> {
        let key = DataKey::generate()?;
        let wrapped = self.master.wrap(&key)?;
        let enc = Encryptor::new(&key)?;
        let path = self.dir.join(format!("{id}.{kind}.enc"));
        let mut file = tokio::fs::File::create(&path)
            .await
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(enc.header()).await?;
        Ok(FileWriter {
            file,
            path,
            enc: Some(enc),
            wrapped,
            hasher: handover::Sha256Stream::default(),
            size: 0,
        })
    }

    /// Where builds keep temporary files (XLSX sheets in constant-memory
    /// mode): beside the export files, on the same disk.
    pub fn tempdir(&self) -> PathBuf {
        Self::tmp_of(&self.dir)
    }

    fn tmp_of(dir: &std::path::Path) -> PathBuf {
        let name = dir
            .file_name()
            .map_or_else(|| "exports".into(), |n| n.to_string_lossy().into_owned());
        dir.with_file_name(format!("{name}-tmp"))
    }

    /// Opens the `format` file of `row` for download. A format other than
    /// the one built is converted from the stored frames as it is sent:
    /// memory stays flat whatever the size. `None`: no file.
    ///
    /// # Errors
    ///
    /// I/O errors, or a file that fails authentication.
    pub async fn open(
        &self,
        state: &AppState,
        row: &ExportRow,
        format: ExportFormat,
    ) -> anyhow::Result<Option<OpenFile>> {
        if let Some(f) = self
            .open_stored(&state.db, &row.id, format.as_str())
            .await?
        {
            return Ok(Some(f));
        }
        let Some(frames) = self.open_stored(&state.db, &row.id, FRAMES).await? else {
            return Ok(None);
        };
        let info = crate::jobs::export_info(state, row)?;
        let writer = ExportWriter::new(format, &row.manifest, &info, &FormatOptions::default())?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let manifest = row.manifest.clone();
        let id = row.id.clone();
        tokio::spawn(async move {
            if let Err(e) = convert(frames.stream, writer, &manifest, &tx).await {
                tracing::error!(export = %id, error = %format!("{e:#}"), "conversion failed");
                let _ = tx
                    .send(Err(std::io::Error::other("conversion failed")))
                    .await;
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .fuse();
        Ok(Some(OpenFile {
            byte_size: None,
            sha256: None,
            converted_from: Some(FRAMES.to_string()),
            stream: Box::pin(stream),
        }))
    }

    async fn key_and_path(
        &self,
        db: &SqlitePool,
        id: &str,
        kind: &str,
    ) -> anyhow::Result<Option<(DataKey, PathBuf, u64, String)>> {
        let Some(r) = sqlx::query("SELECT path, wrapped_key, byte_size, sha256 FROM export_files WHERE request_id = ? AND format = ?")
            .bind(id)
            .bind(kind)
            .fetch_optional(db)
            .await?
        else {
            return Ok(None);
        };
        let key = self
            .master
            .unwrap_key(&r.try_get::<Vec<u8>, _>("wrapped_key")?)?;
        let path = self.dir.join(r.try_get::<String, _>("path")?);
        Ok(Some((
            key,
            path,
            r.try_get::<i64, _>("byte_size")? as u64,
            r.try_get("sha256")?,
        )))
    }

    async fn open_stored(
        &self,
        db: &SqlitePool,
        id: &str,
        kind: &str,
    ) -> anyhow::Result<Option<OpenFile>> {
        let Some((key, path, byte_size, sha256)) = self.key_and_path(db, id, kind).await? else {
            return Ok(None);
        };
        let mut file = tokio::fs::File::open(&path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact(&mut header).await?;
        let dec = Decryptor::new(&key, &header)?;
        // One sealed chunk per read; `None` state = the last chunk was opened.
        let stream = futures_util::stream::try_unfold(Some((file, dec)), |state| async move {
            let Some((mut file, mut dec)) = state else {
                return Ok(None);
            };
            let mut buf = vec![0u8; CHUNK_SIZE + TAG_SIZE];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                let last = dec.finish().map_err(std::io::Error::other)?;
                return Ok(Some((Bytes::from(last), None)));
            }
            let out = dec.push(&buf[..n]).map_err(std::io::Error::other)?;
            Ok(Some((Bytes::from(out), Some((file, dec)))))
        });
        Ok(Some(OpenFile {
            byte_size: Some(byte_size),
            sha256: Some(sha256),
            converted_from: None,
            stream: Box::pin(stream),
        }))
    }

    /// The whole decrypted file (for conversions and tests).
    ///
    /// # Errors
    ///
    /// I/O or authentication errors.
    pub async fn read_all(
        &self,
        db: &SqlitePool,
        id: &str,
        kind: &str,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let Some((key, path, _, _)) = self.key_and_path(db, id, kind).await? else {
            return Ok(None);
        };
        let bytes = tokio::fs::read(&path).await?;
        Ok(Some(handover::crypto::decrypt_all(&key, &bytes)?))
    }

    /// Destroys every file of export `id` and its keys.
    ///
    /// # Errors
    ///
    /// Database errors (a missing file is fine).
    pub async fn destroy(&self, db: &SqlitePool, id: &str) -> anyhow::Result<()> {
        let rows = sqlx::query("SELECT path FROM export_files WHERE request_id = ?")
            .bind(id)
            .fetch_all(db)
            .await?;
        sqlx::query("DELETE FROM export_files WHERE request_id = ?")
            .bind(id)
            .execute(db)
            .await?;
        for r in rows {
            let path = self.dir.join(r.try_get::<String, _>("path")?);
            if let Err(e) = tokio::fs::remove_file(&path).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove export file (its key is destroyed)");
                }
            }
        }
        Ok(())
    }
}

impl FileWriter {
    /// Adds plaintext.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub async fn write(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        let enc = self
            .enc
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("file already finished"))?;
        let sealed = enc.push(chunk)?;
        self.file.write_all(&sealed).await?;
        Ok(())
    }

    /// Seals the file and records it for `id`; returns (plaintext size, SHA-256).
    ///
    /// # Errors
    ///
    /// I/O or database errors.
    pub async fn finish(
        mut self,
        db: &SqlitePool,
        id: &str,
        kind: &str,
    ) -> anyhow::Result<(u64, String)> {
        let enc = self
            .enc
            .take()
            .ok_or_else(|| anyhow::anyhow!("file already finished"))?;
        self.file.write_all(&enc.finish(&[])?).await?;
        self.file.sync_all().await?;
        let sha = self.hasher.clone().finish_hex();
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        sqlx::query("INSERT OR REPLACE INTO export_files (request_id, format, path, wrapped_key, byte_size, sha256) VALUES (?,?,?,?,?,?)")
            .bind(id)
            .bind(kind)
            .bind(name)
            .bind(&self.wrapped)
            .bind(self.size as i64)
            .bind(&sha)
            .execute(db)
            .await?;
        Ok((self.size, sha))
    }
}

/// Converts stored frames (one per line) into `writer`'s format, sending the
/// output as it is produced.
async fn convert(
    mut frames: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
    mut writer: ExportWriter,
    manifest: &handover::model::Manifest,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> anyhow::Result<()> {
    let send = |chunk: Vec<u8>| async move {
        if chunk.is_empty() {
            return Ok(());
        }
        tx.send(Ok(Bytes::from(chunk)))
            .await
            .map_err(|_| anyhow::anyhow!("the client went away"))
    };
    send(writer.begin()?).await?;
    let mut pending: Vec<u8> = Vec::new();
    let mut cells = Vec::new();
    let mut lines = 0u64;
    while let Some(chunk) = frames.next().await {
        pending.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + nl];
            start += nl + 1;
            lines += 1;
            write_frame(&mut writer, manifest, line, &mut cells)
                .with_context(|| format!("stored frame {lines}"))?;
            send(writer.take_output()).await?;
        }
        pending.drain(..start);
    }
    anyhow::ensure!(
        pending.is_empty(),
        "the stored frames end in the middle of a line"
    );
    send(writer.finish()?).await?;
    while let Some(piece) = writer.next_output()? {
        send(piece).await?;
    }
    Ok(())
}

/// Decodes one stored frame into `writer`.
fn write_frame(
    writer: &mut ExportWriter,
    manifest: &handover::model::Manifest,
    line: &[u8],
    spare: &mut Vec<handover::format::Cell<'static>>,
) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Head<'h> {
        #[serde(borrow)]
        data_type: std::borrow::Cow<'h, str>,
    }
    // Stored frames start with their data type (a plain identifier).
    let quick = line
        .strip_prefix(b"{\"data_type\":\"")
        .and_then(|rest| rest.iter().position(|&b| b == b'"').map(|end| &rest[..end]))
        .and_then(|name| std::str::from_utf8(name).ok());
    let name = match quick {
        Some(n) => std::borrow::Cow::Borrowed(n),
        None => serde_json::from_slice::<Head<'_>>(line)?.data_type,
    };
    let t = writer
        .type_index(&name)
        .with_context(|| format!("data type {name} is not in the manifest"))?;
    let columns = &manifest.types[t].columns;
    let frame = handover::wire::decode_frame(line, columns)?;
    let mut cells: Vec<handover::format::Cell<'_>> = std::mem::take(spare)
        .into_iter()
        .map(|_| handover::format::Cell::Null)
        .collect();
    for row in frame.rows() {
        cells.clear();
        cells.extend(row.iter().map(handover::wire::WireCell::as_cell));
        writer.write_row(t, &cells)?;
    }
    cells.clear();
    *spare = cells
        .into_iter()
        .map(|_| handover::format::Cell::Null)
        .collect();
    Ok(())
}
