//! Reading the operator's data: each data type's query, page by page
//! (keyset pagination on its `sort_key`), as typed rows.
//!
//! An engine turns its database rows into [`Cell`]s by the column kinds of
//! the data type config and hands them to a [`RowSink`]; everything after
//! that (record pages and streams, server builds, conversions, the CLI
//! export) consumes cells and knows nothing of the engine. No generic value
//! tree is built per cell on the way.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use handover::format::Cell;
use serde::{Deserialize, Serialize};

use crate::auth::Scope;
use crate::datatypes::{Range, Registry};

/// Takes the rows of a page as they are read.
pub trait RowSink: Send + 'static {
    /// One row: a cell per column of the data type, in column order.
    ///
    /// # Errors
    ///
    /// Whatever stops the consumer (e.g. a record that does not fit a format).
    fn row(&mut self, cells: &[Cell<'_>]) -> anyhow::Result<()>;
}

/// The value of a data type's `sort_key` in one row: where a page ends and
/// the next begins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SortKey {
    /// An integer key.
    Int(i64),
    /// A text key.
    Text(String),
}

/// Which rows to read.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub data_type: String,
    pub owner: Scope,
    pub range: Range,
    /// Rows after this key; `None` for the first page.
    pub after: Option<SortKey>,
    pub limit: u32,
}

/// How a page ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageEnd {
    /// Rows handed to the sink.
    pub rows: u64,
    /// The key of the last row, when more rows follow.
    pub next: Option<SortKey>,
}

/// The engine the operator's data is read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An SQLite file, read with rusqlite on blocking threads (sqlx copies
    /// every value of every row, which costs several times the query).
    Sqlite(Arc<sqlite::SqliteSource>),
    /// PostgreSQL, read with sqlx's PostgreSQL driver on blocking threads
    /// (so page consumers behave the same on both engines).
    Postgres(Arc<postgres::PostgresSource>),
}

impl Source {
    /// The source for `database_url` with the queries of `registry`.
    ///
    /// # Errors
    ///
    /// A URL this build cannot read data from.
    pub fn open(database_url: &str, registry: &Registry) -> anyhow::Result<Self> {
        Ok(match crate::store::Engine::of(database_url)? {
            crate::store::Engine::Sqlite => Self::Sqlite(Arc::new(sqlite::SqliteSource::open(
                database_url,
                registry,
            )?)),
            crate::store::Engine::Postgres => Self::Postgres(Arc::new(
                postgres::PostgresSource::open(database_url, registry)?,
            )),
        })
    }

    /// Reads one page into `sink`; returns the sink and how the page ended.
    ///
    /// # Errors
    ///
    /// Database errors, rows that cannot be read by their column kinds, and
    /// the sink's own errors.
    pub async fn read_page<S: RowSink>(
        &self,
        req: PageRequest,
        sink: S,
    ) -> anyhow::Result<(S, PageEnd)> {
        match self {
            Self::Sqlite(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || {
                    let mut sink = sink;
                    let end = s.read_page(&req, &mut sink)?;
                    Ok((sink, end))
                })
                .await?
            }
            Self::Postgres(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || {
                    let mut sink = sink;
                    let end = s.read_page(&req, &mut sink)?;
                    Ok((sink, end))
                })
                .await?
            }
        }
    }

    /// Reads every page of a data type from `req.after` on, `req.limit` rows
    /// at a time, into `sink`; after each page, `each` is called with the
    /// sink and how the page ended (on the reading thread: it hands the
    /// page's output on, e.g. over a channel, so reading never waits on
    /// writing). Stops after the last page or when `each` says no.
    ///
    /// # Errors
    ///
    /// As [`read_page`](Self::read_page), and `each`'s errors.
    pub async fn read_all<S, F>(&self, req: PageRequest, sink: S, each: F) -> anyhow::Result<S>
    where
        S: RowSink,
        F: FnMut(&mut S, &PageEnd) -> anyhow::Result<bool> + Send + 'static,
    {
        let source = self.clone();
        tokio::task::spawn_blocking(move || {
            let (mut sink, mut each, mut req) = (sink, each, req);
            loop {
                let end = match &source {
                    Self::Sqlite(s) => s.read_page(&req, &mut sink)?,
                    Self::Postgres(s) => s.read_page(&req, &mut sink)?,
                };
                if !each(&mut sink, &end)? {
                    return Ok(sink);
                }
                match end.next {
                    Some(k) => req.after = Some(k),
                    None => return Ok(sink),
                }
            }
        })
        .await?
    }

    /// How many records of each of `data_types` the owner has within
    /// `range`, in their order: on SQLite in one blocking task, so that a
    /// request waits for one hand-over to that pool, not one per type.
    ///
    /// # Errors
    ///
    /// Database errors (including a query that does not fit the operator's tables).
    pub async fn counts(
        &self,
        data_types: &[String],
        owner: &Scope,
        range: &Range,
    ) -> anyhow::Result<Vec<u64>> {
        match self {
            Self::Sqlite(s) => {
                let (s, types, o, r) =
                    (s.clone(), data_types.to_vec(), owner.clone(), range.clone());
                tokio::task::spawn_blocking(move || {
                    types.iter().map(|t| s.count(t, &o, &r)).collect()
                })
                .await?
            }
            Self::Postgres(s) => {
                let mut counts = Vec::with_capacity(data_types.len());
                for t in data_types {
                    counts.push(s.count(t, owner, range).await?);
                }
                Ok(counts)
            }
        }
    }
}

/// Collects nothing: counts rows and remembers their JSON size, for the size
/// estimate of a new export.
#[derive(Debug, Default)]
pub struct SizeSample {
    pub rows: u64,
    pub json_bytes: u64,
    buf: Vec<u8>,
}

impl RowSink for SizeSample {
    fn row(&mut self, cells: &[Cell<'_>]) -> anyhow::Result<()> {
        self.buf.clear();
        let mut enc = handover::wire::FrameEncoder::begin(&mut self.buf, "", 0, None);
        enc.row(&mut self.buf, cells);
        self.rows += 1;
        self.json_bytes += self.buf.len() as u64;
        Ok(())
    }
}
