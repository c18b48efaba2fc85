//! The records of a `client` export, in the compact frames of
//! [`handover::wire`], two ways:
//!
//! - `GET /api/data/export/{id}/records/{data_type}`: one page, as the
//!   envelope's `data`;
//! - `GET /api/data/export/{id}/records/{data_type}/stream`: every page from
//!   the cursor on, one frame per line (NDJSON), so the client never waits
//!   on a round trip between pages. A dropped stream resumes from the last
//!   frame's cursor; cursors are positions in the data type's sort order, so
//!   the rows after a resume are exactly the rows that would have followed.
//!
//! Both count what they served for the export's progress.

use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt as _;
use handover::format::Cell;
use handover::model::Column;
use handover::wire::{error_line, FrameEncoder, STREAM_CONTENT_TYPE};

use super::QueryMap;
use crate::auth::{Scope, PERM_EXPORT};
use crate::context::Ctx;
use crate::cursor::Cursor;
use crate::error::{ApiError, ApiResult};
use crate::source::{PageRequest, RowSink};
use crate::store::exports::{Delivery, ExportRow};
use crate::{ratelimit, AppState};

/// Rows per page (or per stream frame).
pub const MAX_PAGE: u64 = 5000;
pub const DEFAULT_PAGE: u64 = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/data/export/{id}/records/{data_type}", get(page))
        .route(
            "/api/data/export/{id}/records/{data_type}/stream",
            get(stream),
        )
}

/// A frame being written as rows arrive.
struct FrameSink {
    buf: Vec<u8>,
    enc: Option<FrameEncoder>,
}

impl FrameSink {
    fn new(data_type: &str, offset: u64, columns: Option<&[Column]>) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        let enc = FrameEncoder::begin(&mut buf, data_type, offset, columns);
        Self {
            buf,
            enc: Some(enc),
        }
    }

    fn finish(mut self, next_cursor: Option<&str>) -> Vec<u8> {
        if let Some(enc) = self.enc.take() {
            enc.end(&mut self.buf, next_cursor);
        }
        self.buf
    }
}

impl RowSink for FrameSink {
    fn row(&mut self, cells: &[Cell<'_>]) -> anyhow::Result<()> {
        if let Some(enc) = &mut self.enc {
            enc.row(&mut self.buf, cells);
        }
        Ok(())
    }
}

/// Pages of records a resumed stream may read again past a type's end
/// (and past the daily quota) before the quota is checked: what a dropped
/// connection typically had in flight (the two-frame channel, the
/// connection's write buffer and a frame being written).
const RESUME_SLACK_PAGES: u64 = 4;

/// What both forms check first.
struct Request {
    scope: Scope,
    row: ExportRow,
    data_type: String,
    columns: Vec<Column>,
    /// The data type's records in the manifest.
    records: u64,
    limit: u32,
    start: Option<Cursor>,
    /// Records a resume may read again past the type's end, and start past
    /// the daily quota: what the dropped connection lost after they were
    /// counted.
    slack: u64,
}

/// `slack_pages`: pages a resume may start past the quota (streams only:
/// a page is counted as it is answered, not ahead of the client).
async fn prologue(
    state: &AppState,
    ctx: &Ctx,
    headers: &HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    q: &QueryMap,
    slack_pages: u64,
) -> ApiResult<Request> {
    ctx.set_action("export.records", None);
    let scope = super::enter(state, ctx, headers, PERM_EXPORT, ratelimit::RECORDS).await?;
    let Ok(Path((id, data_type))) = path else {
        return Err(ApiError::ExportNotFound);
    };
    let row = state
        .store
        .find_export(&scope, &id)
        .await?
        .ok_or(ApiError::ExportNotFound)?;
    ctx.set_action("export.records", Some(&row.id));
    if row.delivery != Delivery::Client || !row.is_open() {
        return Err(ApiError::Conflict(
            "EXPORT_NOT_OPEN",
            format!(
                "records are served only while a client export is open; this one is {}",
                row.status
            ),
        ));
    }
    let Some((columns, records)) = row
        .manifest
        .types
        .get(&data_type)
        .map(|t| (t.columns.clone(), t.records))
    else {
        return Err(ApiError::validation(
            "INVALID_DATA_TYPE",
            "data_type",
            format!("{data_type:?} is not one of this export's data types"),
        ));
    };
    let limit = q.int("limit", DEFAULT_PAGE, 1, MAX_PAGE, "INVALID_LIMIT")? as u32;
    let invalid = || {
        ApiError::validation(
            "INVALID_CURSOR",
            "cursor",
            "cursor is not valid for this export and data type: use a next_cursor the server sent",
        )
    };
    let start = match q.get("cursor") {
        None | Some("") => None,
        Some(c) => {
            let c = state
                .cursor_key
                .decode(&row.id, &data_type, c)
                .map_err(|_| invalid())?;
            // A position past the manifest's end was never handed out.
            if c.offset > records {
                return Err(invalid());
            }
            Some(c)
        }
    };
    // Pages read again count against the daily quota like new ones: an
    // open export cannot be re-read past it. A resume may start up to its
    // slack past the quota: the frames it reads again were counted when a
    // dropped connection lost them.
    let slack = if start.is_some() {
        slack_pages * u64::from(limit)
    } else {
        0
    };
    crate::plan::check_quota_within(state, &scope, 0, slack).await?;
    ctx.detail("data_type", data_type.as_str());
    if let Some(c) = &start {
        ctx.detail("offset", c.offset);
    }
    Ok(Request {
        scope,
        row,
        data_type,
        columns,
        records,
        limit,
        start,
        slack,
    })
}

impl Request {
    fn page_request(&self, after: Option<crate::source::SortKey>) -> PageRequest {
        PageRequest {
            data_type: self.data_type.clone(),
            owner: self.scope.clone(),
            range: self.row.range(),
            after,
            limit: self.limit,
        }
    }
}

#[utoipa::path(get, path = "/api/data/export/{id}/records/{data_type}", tag = "client delivery",
    params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id"), ("data_type" = String, Path), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"), ("limit" = Option<u32>, Query, description = "Rows, 1–5000, default 1000")),
    responses((status = 200, description = "One frame as `data`: `{data_type, offset, columns:[{name,kind}], rows:[[…]] (values in column order), next_cursor}` (next_cursor null on the last page)", body = crate::openapi::PageEnvelope), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 409, description = "EXPORT_NOT_OPEN", body = crate::openapi::ErrorEnvelope), (status = 422, description = "INVALID_DATA_TYPE, INVALID_LIMIT, INVALID_CURSOR", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn page(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    q: QueryMap,
) -> ApiResult<Response> {
    let req = prologue(&state, &ctx, &headers, path, &q, 0).await?;
    if let Some(fault) = state.settings.fault.as_ref().and_then(|f| f.roll_page()) {
        return Ok(fault);
    }
    let offset = req.start.as_ref().map_or(0, |c| c.offset);
    let after = req.start.as_ref().map(|c| c.after.clone());
    let sink = FrameSink::new(&req.data_type, offset, Some(&req.columns));
    let (sink, end) = state
        .source
        .read_page(req.page_request(after), sink)
        .await
        .map_err(ApiError::Internal)?;
    let served = offset + end.rows;
    let next = end.next.map(|after| {
        state.cursor_key.encode(
            &req.row.id,
            &req.data_type,
            &Cursor {
                after,
                offset: served,
            },
        )
    });
    let frame = sink.finish(next.as_deref());
    state
        .store
        .mark_started(&req.row, Some(ctx.request_id()))
        .await?;
    let bookkeeping = Instant::now();
    state
        .store
        .record_progress(
            &req.row.id,
            &req.data_type,
            served,
            end.rows,
            next.is_none(),
        )
        .await?;
    state.metrics.observe_bookkeeping(bookkeeping.elapsed());
    Ok(ctx.ok_raw(frame))
}

#[utoipa::path(get, path = "/api/data/export/{id}/records/{data_type}/stream", tag = "client delivery",
    params(("X-Company-ID" = String, Header, description = "One of the caller's companies"), ("id" = String, Path, description = "Export request id"), ("data_type" = String, Path), ("cursor" = Option<String>, Query, description = "Resume after this next_cursor (absent: from the start)"), ("limit" = Option<u32>, Query, description = "Rows per frame, 1–5000, default 1000")),
    responses((status = 200, description = "application/x-ndjson: one frame per line, as the page's `data` (columns in the first); ends with the frame whose next_cursor is null. A stream that ends without it was cut short: resume from the last next_cursor. A line `{\"error\":{code,error}}` reports a failure after the stream began.", content_type = "application/x-ndjson"), (status = 404, description = "EXPORT_NOT_FOUND", body = crate::openapi::ErrorEnvelope), (status = 409, description = "EXPORT_NOT_OPEN", body = crate::openapi::ErrorEnvelope), (status = 422, description = "INVALID_DATA_TYPE, INVALID_LIMIT, INVALID_CURSOR", body = crate::openapi::ErrorEnvelope), (status = 401, description = "No valid token", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Missing permission or foreign company", body = crate::openapi::ErrorEnvelope), (status = 429, description = "Rate limited (Retry-After, RateLimit-*)", body = crate::openapi::ErrorEnvelope)))]
pub(crate) async fn stream(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    q: QueryMap,
) -> ApiResult<Response> {
    let req = prologue(&state, &ctx, &headers, path, &q, RESUME_SLACK_PAGES).await?;
    // A fault before the stream begins may be an error answer.
    let first_fault = match state.settings.fault.as_ref().and_then(|f| f.roll()) {
        Some(crate::Fault::Status(response)) => return Ok(response),
        other => other,
    };
    state
        .store
        .mark_started(&req.row, Some(ctx.request_id()))
        .await?;
    // Two frames in flight: the next page is read while one is sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let request_id = ctx.request_id().to_string();
    tokio::spawn(produce(state, req, tx, first_fault, request_id));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .fuse();
    let mut response = Response::new(Body::from_stream(body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(STREAM_CONTENT_TYPE),
    );
    Ok(response.into_response())
}

/// One frame, read and encoded, on its way from the reading thread.
struct FrameOut {
    line: Vec<u8>,
    served: u64,
    rows: u64,
    done: bool,
}

/// Reads page after page into frames on one blocking thread and sends them,
/// while another task hands them to the connection and records progress:
/// reading never waits on the network or the bookkeeping. Ends after the
/// last frame, an error, or the client going away.
async fn produce(
    state: AppState,
    req: Request,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    first_fault: Option<crate::Fault>,
    request_id: String,
) {
    let start = req.start.as_ref().map_or(0, |c| c.offset);
    let (frames_tx, frames_rx) = tokio::sync::mpsc::channel::<FrameOut>(2);
    let key = state.cursor_key.clone();
    let (id, data_type) = (req.row.id.clone(), req.data_type.clone());
    let mut offset = start;
    let sink = FrameSink::new(&req.data_type, start, Some(&req.columns));
    let reading = state.source.read_all(
        req.page_request(req.start.as_ref().map(|c| c.after.clone())),
        sink,
        move |sink, end| {
            let served = offset + end.rows;
            let next = end.next.clone().map(|after| {
                key.encode(
                    &id,
                    &data_type,
                    &Cursor {
                        after,
                        offset: served,
                    },
                )
            });
            let mut line = std::mem::replace(sink, FrameSink::new(&data_type, served, None))
                .finish(next.as_deref());
            line.push(b'\n');
            offset = served;
            let frame = FrameOut {
                line,
                served,
                rows: end.rows,
                done: next.is_none(),
            };
            // A closed channel: the client went away, stop reading.
            Ok(frames_tx.blocking_send(frame).is_ok())
        },
    );
    let sending = async {
        // Owned here: when sending stops, the reader's next send fails and
        // it stops too.
        let mut frames_rx = frames_rx;
        let mut fault = first_fault;
        let mut sent = 0u32;
        // Once this type has been read in full, every further frame is a
        // re-read and must fit the daily quota, as a page read again does:
        // the quota is checked before each such frame, so a stream (or
        // several at once) stops within a frame of it. A frame counts as
        // read once it is handed to the connection, before the client has
        // it, so a dropped connection loses frames that were counted: a
        // resume (a stream from a cursor) reads a few pages again before
        // the check starts.
        let reread_from = req.records + req.slack;
        let mut rereading = false;
        while let Some(FrameOut {
            line,
            served,
            rows,
            done,
        }) = frames_rx.recv().await
        {
            if sent > 0 {
                fault = state.settings.fault.as_ref().and_then(|f| f.roll());
            }
            match fault.take() {
                None => {}
                Some(crate::Fault::Stall) => {
                    // Hold the connection open without a byte more, until
                    // the client gives up.
                    tx.closed().await;
                    return;
                }
                Some(_) => {
                    let _ = tx
                        .send(Err(std::io::Error::other("injected dropped connection")))
                        .await;
                    return;
                }
            }
            if rereading {
                if let Err(e) = crate::plan::check_quota(&state, &req.scope, 0).await {
                    let (code, message) = match &e {
                        ApiError::QuotaExceeded { quota, .. } => (
                            "QUOTA_EXCEEDED",
                            format!("records read again count against the daily quota of {quota} records; it is used up"),
                        ),
                        _ => {
                            tracing::error!(request_id = %request_id, error = ?e, "checking the quota failed");
                            ("INTERNAL_ERROR", "checking the quota failed; resume from the last cursor".to_string())
                        }
                    };
                    let mut line = Vec::new();
                    error_line(&mut line, code, &message);
                    let _ = tx.send(Ok(line.into())).await;
                    return;
                }
            }
            let record = || async {
                let bookkeeping = Instant::now();
                let recorded = state
                    .store
                    .record_progress(&req.row.id, &req.data_type, served, rows, done)
                    .await;
                state.metrics.observe_bookkeeping(bookkeeping.elapsed());
                if let Err(e) = &recorded {
                    tracing::error!(request_id = %request_id, error = %format!("{e:#}"), "recording progress failed");
                }
                recorded
            };
            // The last frame is recorded before it leaves: a client that
            // has it may call `complete` at once, and `complete` checks
            // that every type was served to its end. Unrecorded, it is not
            // sent; the client resumes from its last cursor and reads it
            // again. Other frames go first and are recorded while the
            // client reads them.
            if done && record().await.is_err() {
                send_error(
                    &tx,
                    "recording the export's progress failed; resume from the last cursor",
                )
                .await;
                return;
            }
            if tx.send(Ok(line.into())).await.is_err() {
                return; // the client went away
            }
            sent += 1;
            if !done {
                if let Ok(reads) = record().await {
                    rereading = reads > reread_from;
                }
            }
        }
    };
    let (read, ()) = tokio::join!(reading, sending);
    if let Err(e) = read {
        tracing::error!(request_id = %request_id, error = %format!("{e:#}"), "record stream failed");
        send_error(
            &tx,
            "reading the records failed; resume from the last cursor",
        )
        .await;
    }
}

/// Ends a stream with an `INTERNAL_ERROR` line: the client resumes from
/// the last cursor it has.
async fn send_error(tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>, message: &str) {
    let mut line = Vec::new();
    error_line(&mut line, "INTERNAL_ERROR", message);
    let _ = tx.send(Ok(line.into())).await;
}
