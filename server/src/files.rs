//! Server-built export files, encrypted at rest: AES-256-GCM in chunks
//! (handover::crypto) under a fresh data key per file; the data key is
//! wrapped by the master key and stored beside the file's row. The bytes
//! live in the export directory (one server, or a directory every instance
//! shares) or in the database (PostgreSQL: every instance reaches them).
//!
//! A file's key row is written only when its export completes, in the same
//! transaction; bytes written for an export that then cannot complete
//! (deleted, failed, stopped) are removed by the builder, and whatever a
//! crash leaves behind by the sweeper. So after a delete no key survives,
//! and no bytes either.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use axum::body::Bytes;
use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use handover::crypto::{DataKey, Decryptor, Encryptor, CHUNK_SIZE, HEADER_SIZE, TAG_SIZE};
use handover::format::{ExportFormat, ExportWriter, FormatOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::store::exports::ExportRow;
use crate::store::files::{FileRef, Storage};
use crate::store::Store;
use crate::AppState;

/// The stored kind of a server build's rows as frames (the wire format),
/// from which downloads in another format are converted.
pub const FRAMES: &str = "frames";

/// Ciphertext bytes per database row of a file kept in the database.
const DB_CHUNK: usize = 1 << 20;
/// Database rows read per query while downloading.
const DB_CHUNKS_PER_READ: u64 = 4;

/// Where encrypted files live and the key that wraps their keys.
pub struct FileStore {
    pub dir: PathBuf,
    master: DataKey,
    storage: Storage,
    store: Store,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.dir)
            .field("storage", &self.storage)
            .finish()
    }
}

enum Target {
    Disk { file: tokio::fs::File },
    Db { buf: Vec<u8>, seq: u64 },
}

/// A file being written: plaintext in, ciphertext to disk or the database.
pub struct FileWriter {
    id: String,
    kind: String,
    name: String,
    target: Target,
    store: Store,
    storage: Storage,
    enc: Option<Encryptor>,
    wrapped: Vec<u8>,
    hasher: handover::Sha256Stream,
    size: u64,
}

impl std::fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWriter")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("size", &self.size)
            .finish()
    }
}

type ByteStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// A stored file opened for download.
pub struct OpenFile {
    /// Size and checksum: known for stored files, not for conversions.
    pub byte_size: Option<u64>,
    pub sha256: Option<String>,
    /// The stored file this one was converted from, if any.
    pub converted_from: Option<String>,
    pub stream: ByteStream,
}

impl std::fmt::Debug for OpenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFile")
            .field("byte_size", &self.byte_size)
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// A new, unique name for the bytes of export `id`'s `kind` file: each
/// build attempt writes its own, so an attempt that was given up on (its
/// instance stalled and another took over) never touches the next one's.
fn new_file_name(id: &str, kind: &str) -> String {
    format!("{id}.{kind}.{}.enc", hex::encode(rand::random::<[u8; 6]>()))
}

impl FileStore {
    /// A store keeping bytes per `storage`, in `dir` (created if missing)
    /// for [`Storage::Dir`], with `master` wrapping the keys.
    ///
    /// # Errors
    ///
    /// The directory cannot be created.
    pub fn new(
        dir: PathBuf,
        master: DataKey,
        storage: Storage,
        store: Store,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = Self::tmp_of(&dir);
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            dir,
            master,
            storage,
            store,
        })
    }

    /// Where new files' bytes go.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// Starts writing the `kind` file of export `id`.
    ///
    /// # Errors
    ///
    /// I/O or randomness errors.
    pub async fn create(&self, id: &str, kind: &str) -> anyhow::Result<FileWriter> {
        let key = DataKey::generate()?;
        let wrapped = self.master.wrap(&key)?;
        let enc = Encryptor::new(&key)?;
        let name = new_file_name(id, kind);
        let target = match self.storage {
            Storage::Dir => {
                let path = self.dir.join(&name);
                let mut file = tokio::fs::File::create(&path)
                    .await
                    .with_context(|| format!("creating {}", path.display()))?;
                file.write_all(enc.header()).await?;
                Target::Disk { file }
            }
            Storage::Db => Target::Db {
                buf: enc.header().to_vec(),
                seq: 0,
            },
        };
        Ok(FileWriter {
            id: id.to_string(),
            kind: kind.to_string(),
            name,
            target,
            store: self.store.clone(),
            storage: self.storage,
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

    fn tmp_of(dir: &Path) -> PathBuf {
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
        if let Some(f) = self.open_stored(&row.id, format.as_str()).await? {
            return Ok(Some(f));
        }
        let Some(frames) = self.open_stored(&row.id, FRAMES).await? else {
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

    async fn open_stored(&self, id: &str, kind: &str) -> anyhow::Result<Option<OpenFile>> {
        let Some(f) = self.store.file(id, kind).await? else {
            return Ok(None);
        };
        let key = self.master.unwrap_key(&f.wrapped_key)?;
        let stream: ByteStream = match f.storage {
            Storage::Dir => {
                let path = self.dir.join(&f.path);
                let mut file = tokio::fs::File::open(&path)
                    .await
                    .with_context(|| format!("opening {}", path.display()))?;
                let mut header = [0u8; HEADER_SIZE];
                file.read_exact(&mut header).await?;
                let dec = Decryptor::new(&key, &header)?;
                // One sealed chunk per read; `None` state = the last chunk was opened.
                Box::pin(futures_util::stream::try_unfold(
                    Some((file, dec)),
                    |state| async move {
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
                    },
                ))
            }
            Storage::Db => {
                let first = self.store.chunks(id, &f.path, 0, 1).await?;
                let Some((0, head)) = first.into_iter().next() else {
                    anyhow::bail!("the stored bytes of {id}.{kind} are missing");
                };
                anyhow::ensure!(
                    head.len() >= HEADER_SIZE,
                    "the stored file {id}.{kind} is truncated"
                );
                let dec = Decryptor::new(&key, &head[..HEADER_SIZE])?;
                let mut dec = dec;
                let out =
                    push_sealed(&mut dec, &head[HEADER_SIZE..]).map_err(std::io::Error::other)?;
                let store = self.store.clone();
                let (id, kind) = (id.to_string(), f.path.clone());
                let first = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(out))]);
                let rest = futures_util::stream::try_unfold(Some((dec, 1u64)), move |state| {
                    let (store, id, kind) = (store.clone(), id.clone(), kind.clone());
                    async move {
                        let Some((mut dec, next)) = state else {
                            return Ok(None);
                        };
                        let rows = store
                            .chunks(&id, &kind, next, DB_CHUNKS_PER_READ)
                            .await
                            .map_err(std::io::Error::other)?;
                        if rows.is_empty() {
                            let last = dec.finish().map_err(std::io::Error::other)?;
                            return Ok(Some((Bytes::from(last), None)));
                        }
                        let mut out = Vec::new();
                        let mut expect = next;
                        for (seq, data) in &rows {
                            if *seq != expect {
                                return Err(std::io::Error::other(format!(
                                    "stored chunk {expect} of {id}.{kind} is missing"
                                )));
                            }
                            out.extend(push_sealed(&mut dec, data).map_err(std::io::Error::other)?);
                            expect += 1;
                        }
                        Ok(Some((Bytes::from(out), Some((dec, expect)))))
                    }
                });
                Box::pin(first.chain(rest))
            }
        };
        Ok(Some(OpenFile {
            byte_size: Some(f.byte_size),
            sha256: Some(f.sha256),
            converted_from: None,
            stream,
        }))
    }

    /// The browser's encrypted copy of `row`, its parts one after the
    /// other: the ciphertext exactly as uploaded. Parts are opened as the
    /// stream reaches them.
    pub fn open_copy(&self, state: &AppState, row: &ExportRow) -> ByteStream {
        let (state, id) = (state.clone(), row.id.clone());
        let parts = futures_util::stream::iter(0..row.copy.parts).then(move |n| {
            let (state, id) = (state.clone(), id.clone());
            async move {
                let kind = crate::store::copies::part_kind(n);
                match state.files.open_stored(&id, &kind).await {
                    Ok(Some(f)) => Ok(f.stream),
                    Ok(None) => Err(std::io::Error::other(format!("{kind} of {id} is missing"))),
                    Err(e) => Err(std::io::Error::other(format!("{e:#}"))),
                }
            }
        });
        Box::pin(parts.try_flatten())
    }

    /// The whole decrypted file (for tests).
    ///
    /// # Errors
    ///
    /// I/O or authentication errors.
    pub async fn read_all(&self, id: &str, kind: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(mut f) = self.open_stored(id, kind).await? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        while let Some(piece) = f.stream.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(Some(out))
    }

    /// Removes the bytes of `files` from the export directory (their keys
    /// and any bytes in the database are already gone).
    pub async fn remove(&self, files: &[FileRef]) {
        for f in files.iter().filter(|f| f.storage == Storage::Dir) {
            self.remove_path(&self.dir.join(&f.path)).await;
        }
    }

    async fn remove_path(&self, path: &Path) {
        if let Err(e) = tokio::fs::remove_file(path).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove export file bytes (its key is destroyed)");
            }
        }
    }

    /// Removes the bytes of files a build wrote (by name) that no key row
    /// owns: the build could not complete (its export was deleted, failed,
    /// or taken over). Files that did complete are untouched.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn discard(&self, id: &str, names: &[String]) -> anyhow::Result<()> {
        for name in names {
            if self.store.owns_file(id, name).await? {
                continue;
            }
            match self.storage {
                Storage::Db => self.store.drop_file_chunks(id, name).await?,
                Storage::Dir => self.remove_path(&self.dir.join(name)).await,
            }
        }
        Ok(())
    }

    /// The sweeper's garbage collection: bytes no key row owns, of exports
    /// not being built (a crash between writing and completing, or between
    /// a delete and removing the bytes). Returns how many went.
    ///
    /// # Errors
    ///
    /// Database or I/O errors.
    pub async fn collect_garbage(&self) -> anyhow::Result<u64> {
        let mut removed = self.store.drop_orphan_chunks().await?;
        let mut entries = tokio::fs::read_dir(&self.dir).await?;
        while let Some(e) = entries.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((id, _)) = name.split_once('.') else {
                continue;
            };
            if !name.ends_with(".enc") || !crate::store::exports::plausible_id(id) {
                continue;
            }
            // Listed first, checked second: a file created after its
            // export was claimed is always seen as being built.
            if !self.store.owns_file(id, &name).await? && !self.store.is_building(id).await? {
                self.remove_path(&e.path()).await;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Feeds ciphertext to `dec` a sealed chunk at a time (no large copies).
fn push_sealed(dec: &mut Decryptor, data: &[u8]) -> Result<Vec<u8>, handover::crypto::CryptoError> {
    let mut out = Vec::new();
    for piece in data.chunks(CHUNK_SIZE + TAG_SIZE) {
        out.extend(dec.push(piece)?);
    }
    Ok(out)
}

impl FileWriter {
    /// The unique name the bytes are written under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds plaintext.
    ///
    /// # Errors
    ///
    /// I/O or database errors.
    pub async fn write(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        let enc = self
            .enc
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("file already finished"))?;
        let sealed = enc.push(chunk)?;
        self.put(&sealed, false).await
    }

    async fn put(&mut self, sealed: &[u8], last: bool) -> anyhow::Result<()> {
        match &mut self.target {
            Target::Disk { file } => file.write_all(sealed).await?,
            Target::Db { buf, seq } => {
                buf.extend_from_slice(sealed);
                while buf.len() >= DB_CHUNK || (last && !buf.is_empty()) {
                    let take = buf.len().min(DB_CHUNK);
                    let rest = buf.split_off(take);
                    let row = std::mem::replace(buf, rest);
                    self.store
                        .put_chunk(&self.id, &self.name, *seq, &row)
                        .await?;
                    *seq += 1;
                }
            }
        }
        Ok(())
    }

    /// Seals the file; returns what its key row will say once the export
    /// completes (see [`Store::complete_export`]).
    ///
    /// # Errors
    ///
    /// I/O or database errors.
    pub async fn finish(mut self) -> anyhow::Result<FileRef> {
        let enc = self
            .enc
            .take()
            .ok_or_else(|| anyhow::anyhow!("file already finished"))?;
        let last = enc.finish(&[])?;
        self.put(&last, true).await?;
        if let Target::Disk { file } = &mut self.target {
            file.sync_all().await?;
        }
        Ok(FileRef {
            request_id: self.id,
            kind: self.kind,
            path: self.name,
            wrapped_key: self.wrapped,
            byte_size: self.size,
            sha256: self.hasher.finish_hex(),
            storage: self.storage,
        })
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
