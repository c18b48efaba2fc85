//! Server-built export files, encrypted at rest: AES-256-GCM in chunks
//! (handover::crypto) under a fresh data key per file; the data key is
//! wrapped by the master key and stored beside the file's row. Deleting or
//! expiring an export deletes the wrapped key and the file.

use std::path::PathBuf;

use anyhow::Context as _;
use axum::body::Bytes;
use futures_util::Stream;
use handover::crypto::{DataKey, Decryptor, Encryptor, CHUNK_SIZE, HEADER_SIZE, TAG_SIZE};
use handover::format::ExportFormat;
use sqlx::{Row, SqlitePool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    pub byte_size: u64,
    pub sha256: String,
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
        Ok(Self { dir, master })
    }

    /// Starts writing the `format` file of export `id`.
    ///
    /// # Errors
    ///
    /// I/O or randomness errors.
    pub async fn create(&self, id: &str, format: ExportFormat) -> anyhow::Result<FileWriter> {
        let key = DataKey::generate()?;
        let wrapped = self.master.wrap(&key)?;
        let enc = Encryptor::new(&key)?;
        let path = self.dir.join(format!("{id}.{}.enc", format.extension()));
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

    /// Opens the `format` file of `row` for download, converting the stored
    /// JSON when CSV is asked of a JSON or XLSX export. `None`: no file.
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
        if let Some(f) = self.open_stored(&state.db, &row.id, format).await? {
            return Ok(Some(f));
        }
        if format != ExportFormat::Csv {
            return Ok(None);
        }
        // Converted from the stored JSON with the same writers.
        let Some(json) = self
            .read_all(&state.db, &row.id, ExportFormat::Json)
            .await?
        else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_slice(&json)?;
        let data: indexmap::IndexMap<String, Vec<serde_json::Value>> =
            serde_json::from_value(v["export"]["data"].clone())?;
        let info = crate::jobs::export_info(state, row)?;
        let bytes = handover::format::write_all(
            ExportFormat::Csv,
            &data,
            Some(&row.manifest),
            &info,
            &handover::format::FormatOptions::default(),
        )?;
        let mut h = handover::Sha256Stream::default();
        h.update(&bytes);
        Ok(Some(OpenFile {
            byte_size: bytes.len() as u64,
            sha256: h.finish_hex(),
            stream: Box::pin(futures_util::stream::once(
                async move { Ok(Bytes::from(bytes)) },
            )),
        }))
    }

    async fn key_and_path(
        &self,
        db: &SqlitePool,
        id: &str,
        format: ExportFormat,
    ) -> anyhow::Result<Option<(DataKey, PathBuf, u64, String)>> {
        let Some(r) = sqlx::query("SELECT path, wrapped_key, byte_size, sha256 FROM export_files WHERE request_id = ? AND format = ?")
            .bind(id)
            .bind(format.as_str())
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
        format: ExportFormat,
    ) -> anyhow::Result<Option<OpenFile>> {
        let Some((key, path, byte_size, sha256)) = self.key_and_path(db, id, format).await? else {
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
            byte_size,
            sha256,
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
        format: ExportFormat,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let Some((key, path, _, _)) = self.key_and_path(db, id, format).await? else {
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
        format: ExportFormat,
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
            .bind(format.as_str())
            .bind(name)
            .bind(&self.wrapped)
            .bind(self.size as i64)
            .bind(&sha)
            .execute(db)
            .await?;
        Ok((self.size, sha))
    }
}
