//! Background work: the worker that builds server-delivered exports
//! (retried once on failure), and the sweeper that fails abandoned client
//! exports and expires old ones.

use std::time::Duration;

use anyhow::Context as _;
use handover::format::{Cell, ExportFormat, ExportWriter, FormatOptions};
use handover::model::{parse_timestamp, DateRange, ExportInfo};
use handover::wire::FrameEncoder;
use serde_json::json;
use sqlx::Row;

use crate::exports::{self, ExportRow};
use crate::source::{PageRequest, RowSink};
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
        info.date_range = Some(DateRange {
            start: row.date_start.clone(),
            end: row.date_end.clone(),
        });
    }
    info.article_15 = state.registry.article_15.clone();
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
                sqlx::query("UPDATE export_requests SET records_served = ?, current_type = ?, last_activity_at = ? WHERE id = ?")
                    .bind(piece.records as i64)
                    .bind(name)
                    .bind(exports::now())
                    .bind(&row.id)
                    .execute(&state.db)
                    .await?;
            }
            anyhow::Ok(())
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

/// Builds and stores the file of a claimed server export, with its frames
/// for conversions, in one pass.
async fn run_one(state: &AppState, row: &ExportRow) -> anyhow::Result<(u64, u64, String)> {
    let format: ExportFormat = row.export_format.parse()?;
    let mut file = state.files.create(&row.id, format.as_str()).await?;
    let mut frames = state.files.create(&row.id, crate::files::FRAMES).await?;
    let built = build(
        state,
        row,
        format,
        &state.files.tempdir(),
        &mut file,
        Some(&mut frames),
    )
    .await?;
    frames
        .finish(&state.db, &row.id, crate::files::FRAMES)
        .await?;
    let (size, sha) = file.finish(&state.db, &row.id, format.as_str()).await?;
    Ok((built.records, size, sha))
}

/// Claims and builds pending server exports until none is left.
pub async fn drain(state: &AppState) -> anyhow::Result<()> {
    loop {
        let Some(id) = sqlx::query_scalar::<_, String>(
            "SELECT id FROM export_requests WHERE status = 'pending' AND delivery = 'server' AND deleted_at IS NULL ORDER BY created_at LIMIT 1",
        )
        .fetch_optional(&state.db)
        .await?
        else {
            return Ok(());
        };
        let now = exports::now();
        let claimed = sqlx::query(
            "UPDATE export_requests SET status = 'processing', started_at = ?, attempts = attempts + 1, last_activity_at = ? \
             WHERE id = ? AND status = 'pending'",
        )
        .bind(&now)
        .bind(&now)
        .bind(&id)
        .execute(&state.db)
        .await?
        .rows_affected()
            == 1;
        if !claimed {
            continue; // another worker took it
        }
        let Some(row) = exports::find_any(&state.db, &id).await? else {
            continue;
        };
        exports::event(
            state,
            &row,
            "export.started",
            None,
            json!({ "delivery": "server", "attempt": row.attempts }),
        )
        .await?;
        match run_one(state, &row).await {
            Ok((records, byte_size, sha256)) => {
                let done = exports::Completion {
                    records,
                    byte_size,
                    sha256,
                    details: Default::default(),
                };
                exports::mark_completed(state, &row, &done, None).await?;
            }
            Err(e) => {
                tracing::error!(export = %id, attempt = row.attempts, error = %format!("{e:#}"), "building export failed");
                state.files.destroy(&state.db, &id).await?;
                if row.attempts < 2 {
                    // Automatic retry: once.
                    sqlx::query("UPDATE export_requests SET status = 'pending' WHERE id = ? AND status = 'processing'")
                        .bind(&id)
                        .execute(&state.db)
                        .await?;
                } else {
                    exports::fail(state, &row, "generation failed", None).await?;
                }
            }
        }
    }
}

/// Fails client exports idle for longer than the stale limit, requeues (or
/// fails) interrupted server builds, and expires exports past their retention.
pub async fn sweep(state: &AppState) -> anyhow::Result<()> {
    let cutoff = handover::model::format_timestamp(
        time::OffsetDateTime::now_utc() - state.settings.stale_after,
    );
    let stale = sqlx::query(
        "SELECT id FROM export_requests WHERE status IN ('pending', 'processing') AND delivery = 'client' \
         AND deleted_at IS NULL AND last_activity_at < ?",
    )
    .bind(&cutoff)
    .fetch_all(&state.db)
    .await?;
    for r in stale {
        if let Some(row) = exports::find_any(&state.db, &r.try_get::<String, _>("id")?).await? {
            exports::fail(state, &row, "abandoned: no activity from the browser", None).await?;
        }
    }
    // A server build interrupted (e.g. by a restart) is queued again once,
    // then failed: it never stays `processing`.
    let stuck = sqlx::query(
        "SELECT id FROM export_requests WHERE status = 'processing' AND delivery = 'server' \
         AND deleted_at IS NULL AND last_activity_at < ?",
    )
    .bind(&cutoff)
    .fetch_all(&state.db)
    .await?;
    for r in stuck {
        let Some(row) = exports::find_any(&state.db, &r.try_get::<String, _>("id")?).await? else {
            continue;
        };
        state.files.destroy(&state.db, &row.id).await?;
        if row.attempts < 2 {
            sqlx::query("UPDATE export_requests SET status = 'pending' WHERE id = ? AND status = 'processing'")
                .bind(&row.id)
                .execute(&state.db)
                .await?;
            state.jobs.notify_one();
        } else {
            exports::fail(state, &row, "generation was interrupted twice", None).await?;
        }
    }
    let now = exports::now();
    let expired = sqlx::query("SELECT id FROM export_requests WHERE status = 'completed' AND deleted_at IS NULL AND expires_at < ?")
        .bind(&now)
        .fetch_all(&state.db)
        .await?;
    for r in expired {
        let id: String = r.try_get("id")?;
        let Some(row) = exports::find_any(&state.db, &id).await? else {
            continue;
        };
        state.files.destroy(&state.db, &id).await?;
        sqlx::query(
            "UPDATE export_requests SET status = 'expired' WHERE id = ? AND status = 'completed'",
        )
        .bind(&id)
        .execute(&state.db)
        .await?;
        exports::event(
            state,
            &row,
            "export.expired",
            None,
            json!({ "expires_at": row.expires_at }),
        )
        .await?;
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
    tokio::spawn(async move {
        loop {
            if let Err(e) = sweep(&state).await {
                tracing::error!(error = %format!("{e:#}"), "sweeper error");
            }
            tokio::time::sleep(state.settings.sweep_every).await;
        }
    });
}
