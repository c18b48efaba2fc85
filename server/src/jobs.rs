//! Background work: the worker that builds server-delivered exports
//! (retried once on failure), and the sweeper that fails abandoned client
//! exports and expires old ones.

use std::time::Duration;

use anyhow::Context as _;
use handover::format::{Cell, ExportFormat, ExportWriter, FormatOptions};
use handover::model::{parse_timestamp, ExportInfo, FailedDataType};
use handover::wire::FrameEncoder;

use crate::source::{PageRequest, RowSink};
use crate::store::exports::{Completion, ExportRow, Retried};
use crate::store::files::FileRef;
use crate::AppState;

/// Records per database page while building a file.
const BUILD_PAGE: u32 = 5000;

/// What a format writer states about `row` besides the data.
///
/// # Errors
///
/// A stored timestamp that does not parse.
pub fn export_info(state: &AppState, row: &ExportRow) -> anyhow::Result<ExportInfo> {
    // The request's creation time, so the browser (which learns it from the
    // create response) and the server state the same generation time.
    let generated = parse_timestamp(&row.created_at).context("export has no valid timestamp")?;
    let mut info = ExportInfo::new(&row.id, generated);
    info.user_id = Some(row.user_id.clone());
    if row.date_start.is_some() || row.date_end.is_some() {
        info.date_range = Some(row.range());
    }
    info.article_15 = state.registry.article_15.clone();
    info.failed_data_types = row.failed_types.clone();
    Ok(info)
}

/// Where a server-side build puts the file's bytes.
pub trait ChunkSink {
    /// Appends the next chunk of the file.
    fn write_chunk(
        &mut self,
        chunk: &[u8],
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

impl ChunkSink for crate::files::FileWriter {
    async fn write_chunk(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        self.write(chunk).await
    }
}

/// A plain file on disk with its running size and SHA-256 (the DPO's CLI export).
#[derive(Debug)]
pub struct PlainFile {
    pub file: tokio::fs::File,
    pub sha: handover::Sha256Stream,
    pub size: u64,
}

impl ChunkSink for PlainFile {
    async fn write_chunk(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.sha.update(chunk);
        self.size += chunk.len() as u64;
        self.file.write_all(chunk).await?;
        Ok(())
    }
}

/// Where the rows of a build go as they are read: the file's writer and,
/// for server builds, the frames kept beside the file for conversions.
struct BuildSink {
    writer: ExportWriter,
    t: usize,
    frames: Option<(Vec<u8>, Option<FrameEncoder>)>,
}

impl RowSink for BuildSink {
    fn row(&mut self, cells: &[Cell<'_>]) -> anyhow::Result<()> {
        self.writer.write_row(self.t, cells)?;
        if let Some((buf, Some(enc))) = &mut self.frames {
            enc.row(buf, cells);
        }
        Ok(())
    }
}

/// The output of one page of a build, handed from the reading thread to
/// the writing task.
struct Piece {
    main: Vec<u8>,
    frames: Vec<u8>,
    records: u64,
}

/// A data type whose records could not be read during a build.
#[derive(Debug, thiserror::Error)]
#[error("reading {data_type} failed: {detail}")]
pub struct TypeFailed {
    pub data_type: String,
    /// The internal error (logged, never sent to clients).
    pub detail: String,
}

/// What the data subject is told about a data type left out.
const TYPE_FAILED_REASON: &str = "its records could not be read when the file was built";

/// What a build produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Built {
    pub records: u64,
}

/// Streams every record of `row` through `format`'s writer into `sink`, in
/// one pass over the data: rows go from the database to the writer as
/// typed cells. With `frames`, the same rows are also kept as frames (the
/// wire format), from which downloads in another format are converted.
/// XLSX uses rust_xlsxwriter's constant-memory mode with temporary files in
/// `tempdir`, so memory stays flat whatever the size. Reading and
/// formatting run on one thread while another writes (and encrypts).
///
/// # Errors
///
/// Database, format or sink errors.
pub async fn build<S, F>(
    state: &AppState,
    row: &ExportRow,
    format: ExportFormat,
    tempdir: &std::path::Path,
    sink: &mut S,
    mut frames: Option<&mut F>,
) -> anyhow::Result<Built>
where
    S: ChunkSink + Send,
    F: ChunkSink + Send,
{
    let info = export_info(state, row)?;
    let options = FormatOptions::default();
    let writer = match format {
        ExportFormat::Xlsx => {
            ExportWriter::xlsx_constant_memory(&row.manifest, &info, &options, tempdir)?
        }
        f => ExportWriter::new(f, &row.manifest, &info, &options)?,
    };
    let mut b = BuildSink {
        writer,
        t: 0,
        frames: frames.is_some().then(|| (Vec::new(), None)),
    };
    sink.write_chunk(&b.writer.begin()?).await?;
    let owner = crate::auth::Scope {
        user_id: row.user_id.clone(),
        company_id: row.company_id.clone(),
    };
    for name in &row.data_types {
        b.t = b
            .writer
            .type_index(name)
            .with_context(|| format!("data type {name} is not in the manifest"))?;
        let columns = b.writer.columns(b.t).to_vec();
        if let Some((buf, enc)) = &mut b.frames {
            *enc = Some(FrameEncoder::begin(buf, name, 0, Some(&columns)));
        }
        let req = PageRequest {
            data_type: name.clone(),
            owner: owner.clone(),
            range: row.range(),
            after: None,
            limit: BUILD_PAGE,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(4);
        let type_name = name.clone();
        let mut offset = 0;
        let reader = state.source.read_all(req, b, move |b, end| {
            let mut frames = Vec::new();
            if let Some((buf, enc)) = &mut b.frames {
                if let Some(enc) = enc.take() {
                    enc.end(buf, end.next.is_some().then_some("more"));
                    buf.push(b'\n');
                }
                frames = std::mem::take(buf);
                offset += end.rows;
                if end.next.is_some() {
                    *enc = Some(FrameEncoder::begin(buf, &type_name, offset, None));
                }
            }
            let piece = Piece {
                main: b.writer.take_output(),
                frames,
                records: b.writer.records_written(),
            };
            tx.blocking_send(piece)
                .map_err(|_| anyhow::anyhow!("the build was abandoned"))?;
            Ok(true)
        });
        let writing = async {
            while let Some(piece) = rx.recv().await {
                if !piece.main.is_empty() {
                    sink.write_chunk(&piece.main).await?;
                }
                if let Some(out) = frames.as_deref_mut() {
                    out.write_chunk(&piece.frames).await?;
                }
                if !state.store.build_progress(row, piece.records, name).await? {
                    anyhow::bail!("the export was deleted or taken over while it was being built");
                }
            }
            anyhow::Ok(())
        };
        // A data type that cannot be read is told apart from a broken sink:
        // the build can go on without it (a partial export).
        let data_type = name.clone();
        let reader = async move {
            reader.await.map_err(|e| {
                anyhow::Error::new(TypeFailed {
                    data_type,
                    detail: format!("{e:#}"),
                })
            })
        };
        let (back, ()) = tokio::try_join!(reader, writing)?;
        b = back;
    }
    let mut chunk = b.writer.finish()?;
    loop {
        if !chunk.is_empty() {
            sink.write_chunk(&chunk).await?;
        }
        match b.writer.next_output()? {
            Some(next) => chunk = next,
            None => break,
        }
    }
    Ok(Built {
        records: b.writer.records_written(),
    })
}

/// Builds the file of a claimed server export, with its frames for
/// conversions, in one pass; returns the records, the files (not yet
/// owned: their key rows are written when the export completes) and the
/// data types left out. A data type that cannot be read does not sink the
/// others: the file is built again without it, and says so (a partial
/// export). The names of files written are pushed to `written` as they are
/// created, so that they can be removed whatever happens.
async fn run_one(
    state: &AppState,
    row: &ExportRow,
    written: &mut Vec<String>,
) -> anyhow::Result<(u64, Vec<FileRef>, Vec<FailedDataType>)> {
    let format: ExportFormat = row.export_format.parse()?;
    let mut failed: Vec<FailedDataType> = Vec::new();
    loop {
        let mut attempt = row.clone();
        attempt
            .data_types
            .retain(|t| !failed.iter().any(|f| &f.data_type == t));
        attempt
            .manifest
            .types
            .retain(|t, _| !failed.iter().any(|f| &f.data_type == t));
        attempt.failed_types = failed.clone();
        anyhow::ensure!(
            !attempt.data_types.is_empty(),
            "no data type of the export could be read"
        );
        let mut file = state.files.create(&row.id, format.as_str()).await?;
        written.push(file.name().to_string());
        let mut frames = state.files.create(&row.id, crate::files::FRAMES).await?;
        written.push(frames.name().to_string());
        let built = build(
            state,
            &attempt,
            format,
            &state.files.tempdir(),
            &mut file,
            Some(&mut frames),
        )
        .await;
        let built = match built {
            Ok(b) => b,
            Err(e) => match e.downcast::<TypeFailed>() {
                Ok(tf) => {
                    tracing::error!(export = %row.id, data_type = %tf.data_type, error = %tf.detail, "a data type could not be read; building the export without it");
                    drop((file, frames));
                    let names = std::mem::take(written);
                    state.files.discard(&row.id, &names).await?;
                    failed.push(FailedDataType {
                        data_type: tf.data_type,
                        reason: TYPE_FAILED_REASON.into(),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let frames = frames.finish().await?;
        let file = file.finish().await?;
        if state.settings.hold_builds {
            // Tests only: keep the claim alive, never complete.
            let last = row.data_types.last().map_or("", String::as_str);
            while state.store.build_progress(row, built.records, last).await? {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            anyhow::bail!("the held build was taken over");
        }
        if let Some(gate) = &state.settings.build_gate {
            gate.reached(&row.id).await;
        }
        return Ok((built.records, vec![file, frames], failed));
    }
}

/// Builds one claimed export to the end: completed with its files, or
/// requeued once, or failed. Whatever the outcome, no bytes survive that
/// no key row owns (a delete during the build wins).
async fn run_claimed(state: &AppState, row: &ExportRow) -> anyhow::Result<()> {
    let mut written = Vec::new();
    match run_one(state, row, &mut written).await {
        Ok((records, files, failed_types)) => {
            let main = &files[0];
            let done = Completion {
                records,
                byte_size: main.byte_size,
                sha256: main.sha256.clone(),
                details: Default::default(),
                failed_types,
            };
            if state
                .store
                .complete_export(row, &done, &files, None)
                .await?
            {
                crate::exports::count_completed(state, row, &done);
            } else {
                tracing::info!(export = %row.id, "the export was deleted or taken over during its build; its bytes are removed");
                state.files.discard(&row.id, &written).await?;
            }
        }
        Err(e) => {
            tracing::error!(export = %row.id, attempt = row.attempts, error = %format!("{e:#}"), "building export failed");
            state.files.discard(&row.id, &written).await?;
            match state.store.retry_build(row, "generation failed").await? {
                Retried::Requeued => state.jobs.notify_one(),
                Retried::Failed => state.metrics.export_failed(),
                Retried::Gone => {}
            }
        }
    }
    Ok(())
}

/// Claims and builds pending server exports until none is left. Several
/// instances may drain at once: each build is claimed by one.
pub async fn drain(state: &AppState) -> anyhow::Result<()> {
    while let Some(row) = state.store.claim_build().await? {
        run_claimed(state, &row).await?;
    }
    Ok(())
}

/// Writes the counts of refused requests of finished minutes, fails client
/// exports idle for longer than the stale limit, requeues (or fails) server
/// builds whose instance stopped, expires exports past their retention, and
/// removes bytes no export owns. Safe on every instance at
/// once: each change is conditional on the state it leaves.
pub async fn sweep(state: &AppState) -> anyhow::Result<()> {
    // First, and whatever the rest does: counts of refused requests wait
    // in memory until written (and go back there if writing fails).
    if let Err(e) = crate::context::write_tallies(state, state.guard.take_finished()).await {
        tracing::error!(error = %format!("{e:#}"), "writing refusal counts failed");
    }
    let cutoff = handover::model::format_timestamp(
        time::OffsetDateTime::now_utc() - state.settings.stale_after,
    );
    for row in state.store.idle_client_exports(&cutoff).await? {
        if state
            .store
            .fail_export(&row, "abandoned: no activity from the browser", None)
            .await?
        {
            state.metrics.export_failed();
        }
    }
    // A server build whose instance stopped gives no more signs of life: it
    // is queued again once, then failed; it never stays `processing`.
    for row in state.store.stalled_builds(&cutoff).await? {
        match state
            .store
            .retry_build(&row, "generation was interrupted")
            .await?
        {
            Retried::Requeued => state.jobs.notify_one(),
            Retried::Failed => state.metrics.export_failed(),
            Retried::Gone => {}
        }
    }
    let now = crate::store::now();
    for id in state.store.due_for_expiry(&now).await? {
        if let Some(files) = state.store.expire_export(&id).await? {
            state.files.remove(&files).await;
        }
    }
    let removed = state.files.collect_garbage().await?;
    if removed > 0 {
        tracing::info!(removed, "removed export bytes that no export owns");
    }
    Ok(())
}

/// Runs the worker and the sweeper until the process ends.
pub fn spawn(state: AppState) {
    let worker = state.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = drain(&worker).await {
                tracing::error!(error = %format!("{e:#}"), "export worker error");
            }
            tokio::select! {
                () = worker.jobs.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
    let notifier = state.clone();
    tokio::spawn(async move {
        loop {
            match crate::webhooks::deliver_due(&notifier).await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::error!(error = %format!("{e:#}"), "webhook delivery error"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    if state.store.engine() == crate::store::Engine::Sqlite {
        let checkpointer = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = checkpointer.store.checkpoint().await {
                    tracing::warn!(error = %format!("{e:#}"), "checkpoint failed");
                }
            }
        });
    }
    tokio::spawn(async move {
        loop {
            if let Err(e) = sweep(&state).await {
                tracing::error!(error = %format!("{e:#}"), "sweeper error");
            }
            tokio::time::sleep(state.settings.sweep_every).await;
        }
    });
}
