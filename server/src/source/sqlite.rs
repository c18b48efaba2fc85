//! The operator's data in SQLite, read with rusqlite: each value is borrowed
//! from the statement as it steps, and becomes a [`Cell`] by its column's
//! kind. Connections are read-only and pooled; queries run on blocking
//! threads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use handover::format::Cell;
use handover::model::ColumnKind;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use super::{PageEnd, PageRequest, RowSink, SortKey};
use crate::auth::Scope;
use crate::datatypes::{DataTypeDef, Range, Registry};

/// Idle connections kept for reuse.
const IDLE_CONNECTIONS: usize = 8;

/// The SQL of one data type, in SQLite's dialect.
#[derive(Debug)]
struct TypeSql {
    def: DataTypeDef,
    /// The first page: no cursor condition, so SQLite can walk an index.
    first: String,
    /// Later pages: `sort_key > ?3`, a range seek on the same index.
    after: String,
    count: String,
}

/// Reads the data type queries from one SQLite file.
#[derive(Debug)]
pub struct SqliteSource {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    types: HashMap<String, TypeSql>,
}

/// The file of a `sqlite://…` URL.
pub(crate) fn path_of(url: &str) -> anyhow::Result<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .with_context(|| format!("DATABASE_URL {url:?} is not an SQLite URL"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        bail!("DATABASE_URL {url:?}: the data type queries need a database file, not memory");
    }
    Ok(PathBuf::from(path))
}

fn type_sql(def: &DataTypeDef) -> TypeSql {
    let inner = def
        .query
        .replace(":user_id", "?1")
        .replace(":company_id", "?2");
    let date_filter = match &def.timestamp {
        Some(ts) => format!(
            " AND (?4 IS NULL OR julianday(q.\"{ts}\") >= julianday(?4)) AND (?5 IS NULL OR julianday(q.\"{ts}\") <= julianday(?5))"
        ),
        // Unused, but keeps the parameter numbering the same for every type.
        None => " AND (?4 IS NULL OR 1) AND (?5 IS NULL OR 1)".to_string(),
    };
    let sk = &def.sort_key;
    TypeSql {
        first: format!(
            "SELECT * FROM ({inner}) AS q WHERE (?3 IS NULL){date_filter} ORDER BY q.\"{sk}\" LIMIT ?6"
        ),
        after: format!(
            "SELECT * FROM ({inner}) AS q WHERE q.\"{sk}\" > ?3{date_filter} ORDER BY q.\"{sk}\" LIMIT ?6"
        ),
        count: format!(
            "SELECT COUNT(*) FROM ({inner}) AS q WHERE (?3 IS NULL OR 1){date_filter} AND ?6 IS NULL"
        ),
        def: def.clone(),
    }
}

/// Where each cell of a row comes from.
enum CellSource {
    /// A column of the statement, read by the column's kind.
    Column { index: usize, kind: ColumnKind },
    /// A field inside a JSON object column (dotted column names).
    Field { group: usize, path: Vec<String> },
}

/// Something a row's cells borrow that had to be made first.
enum Made {
    Text(String),
    Value(Value),
}

impl SqliteSource {
    /// A source reading the file of `url` with the queries of `registry`.
    ///
    /// # Errors
    ///
    /// A URL that names no file.
    pub fn open(url: &str, registry: &Registry) -> anyhow::Result<Self> {
        let types = registry
            .all()
            .map(|t| (t.name.clone(), type_sql(t)))
            .collect();
        Ok(Self {
            path: path_of(url)?,
            idle: Mutex::new(Vec::new()),
            types,
        })
    }

    fn connection(&self) -> anyhow::Result<Connection> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {} to read the data types", self.path.display()))?;
        c.busy_timeout(Duration::from_secs(15))?;
        // The operator's queries only ever read.
        c.pragma_update(None, "query_only", true)?;
        Ok(c)
    }

    fn release(&self, c: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(c);
        }
    }

    fn sql(&self, data_type: &str) -> anyhow::Result<&TypeSql> {
        self.types
            .get(data_type)
            .with_context(|| format!("data type {data_type} is not configured"))
    }

    /// Counts the owner's records of `data_type` within `range` (blocking).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub fn count(&self, data_type: &str, owner: &Scope, range: &Range) -> anyhow::Result<u64> {
        let t = self.sql(data_type)?;
        let conn = self.connection()?;
        let n: i64 = conn
            .prepare_cached(&t.count)
            .and_then(|mut st| {
                st.query_row(
                    rusqlite::params![
                        owner.user_id,
                        owner.company_id,
                        Option::<String>::None,
                        range.start,
                        range.end,
                        Option::<i64>::None
                    ],
                    |r| r.get(0),
                )
            })
            .with_context(|| format!("counting {data_type}"))?;
        self.release(conn);
        Ok(n as u64)
    }

    /// Reads one page into `sink` (blocking).
    ///
    /// # Errors
    ///
    /// Database errors, values that do not fit their column kind (JSON
    /// columns that are not JSON, a NULL sort key), and the sink's errors.
    pub fn read_page<S: RowSink>(
        &self,
        req: &PageRequest,
        sink: &mut S,
    ) -> anyhow::Result<PageEnd> {
        let t = self.sql(&req.data_type)?;
        let conn = self.connection()?;
        let end =
            Self::read(&conn, t, req, sink).with_context(|| format!("reading {}", req.data_type));
        self.release(conn);
        end
    }

    fn read<S: RowSink>(
        conn: &Connection,
        t: &TypeSql,
        req: &PageRequest,
        sink: &mut S,
    ) -> anyhow::Result<PageEnd> {
        let mut st = conn.prepare_cached(if req.after.is_some() {
            &t.after
        } else {
            &t.first
        })?;
        let (sources, groups, sort_index) = plan(&st, &t.def)?;
        let after: rusqlite::types::Value = match &req.after {
            None => rusqlite::types::Value::Null,
            Some(SortKey::Int(i)) => rusqlite::types::Value::Integer(*i),
            Some(SortKey::Text(s)) => rusqlite::types::Value::Text(s.clone()),
        };
        let mut rows = st.query(rusqlite::params![
            req.owner.user_id,
            req.owner.company_id,
            after,
            req.range.start,
            req.range.end,
            i64::from(req.limit) + 1
        ])?;
        let mut n: u64 = 0;
        let mut last_key = None;
        // Reused between rows: emptied before each row borrows it anew.
        let mut spare: Vec<Cell<'static>> = Vec::with_capacity(sources.len());
        let mut made: Vec<Made> = Vec::new();
        while let Some(row) = rows.next()? {
            if n == u64::from(req.limit) {
                return Ok(PageEnd {
                    rows: n,
                    next: last_key,
                });
            }
            made.clear();
            let group_values = read_groups(row, &groups)?;
            // One read of each value; what cannot be borrowed is made first,
            // then the cells borrow from the row and from what was made.
            let mut prepared = Vec::with_capacity(sources.len());
            for (src, col) in sources.iter().zip(&t.def.columns) {
                prepared.push(match src {
                    CellSource::Column { index, kind } => {
                        prepare(row.get_ref(*index)?, *kind, &col.name, &mut made)?
                    }
                    CellSource::Field { .. } => Prepared::Field,
                });
            }
            let mut cells: Vec<Cell<'_>> = spare.into_iter().map(|_| Cell::Null).collect();
            for (src, p) in sources.iter().zip(prepared) {
                cells.push(match (src, p) {
                    (_, Prepared::Ready(c)) => c,
                    (_, Prepared::Made(i)) => match &made[i] {
                        Made::Text(s) => Cell::Text(s),
                        Made::Value(v) => Cell::from_value(v),
                    },
                    (CellSource::Field { group, path }, Prepared::Field) => {
                        let mut v = group_values[*group].as_ref();
                        for key in path {
                            v = v.and_then(|v| v.get(key));
                        }
                        v.map_or(Cell::Null, Cell::from_value)
                    }
                    (CellSource::Column { .. }, Prepared::Field) => Cell::Null,
                });
            }
            sink.row(&cells)?;
            cells.clear();
            spare = cells.into_iter().map(|_| Cell::Null).collect();
            n += 1;
            if n == u64::from(req.limit) {
                last_key = Some(sort_key(row.get_ref(sort_index)?, &t.def.sort_key)?);
            }
        }
        Ok(PageEnd {
            rows: n,
            next: None,
        })
    }
}

/// Maps the data type's columns onto the statement's columns.
#[allow(clippy::type_complexity)]
fn plan(
    st: &rusqlite::Statement<'_>,
    def: &DataTypeDef,
) -> anyhow::Result<(Vec<CellSource>, Vec<usize>, usize)> {
    let index_of = |name: &str| {
        st.column_index(name)
            .with_context(|| format!("the query of {} returns no column {name:?}", def.name))
    };
    let mut groups: Vec<(String, usize)> = Vec::new();
    let mut sources = Vec::with_capacity(def.columns.len());
    for col in &def.columns {
        match col.name.split_once('.') {
            None => sources.push(CellSource::Column {
                index: index_of(&col.name)?,
                kind: col.kind,
            }),
            Some((top, rest)) => {
                let group = match groups.iter().position(|(g, _)| g == top) {
                    Some(g) => g,
                    None => {
                        groups.push((top.to_string(), index_of(top)?));
                        groups.len() - 1
                    }
                };
                sources.push(CellSource::Field {
                    group,
                    path: rest.split('.').map(str::to_string).collect(),
                });
            }
        }
    }
    let sort_index = index_of(&def.sort_key)?;
    Ok((
        sources,
        groups.into_iter().map(|(_, i)| i).collect(),
        sort_index,
    ))
}

/// The JSON objects that dotted columns read from (`None`: NULL).
fn read_groups(row: &rusqlite::Row<'_>, groups: &[usize]) -> anyhow::Result<Vec<Option<Value>>> {
    groups
        .iter()
        .map(|&i| match row.get_ref(i)? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(t) => Ok(Some(
                serde_json::from_slice(t).context("a column holding sub-columns is not JSON")?,
            )),
            _ => bail!("a column holding sub-columns is not JSON text"),
        })
        .collect()
}

/// A value of the row on its way to becoming a cell.
enum Prepared<'r> {
    /// Borrowed straight from the statement.
    Ready(Cell<'r>),
    /// Made first (text that is not UTF-8, a blob as base64, a JSON scalar):
    /// its index in the row's made values.
    Made(usize),
    /// Read from a JSON object column (dotted column names).
    Field,
}

/// Reads one value by its column's kind.
fn prepare<'r>(
    v: ValueRef<'r>,
    kind: ColumnKind,
    name: &str,
    made: &mut Vec<Made>,
) -> anyhow::Result<Prepared<'r>> {
    let m = match (v, kind) {
        (ValueRef::Null, _) => return Ok(Prepared::Ready(Cell::Null)),
        (ValueRef::Integer(i), ColumnKind::Boolean) => {
            return Ok(Prepared::Ready(Cell::Bool(i != 0)))
        }
        (ValueRef::Integer(i), _) => return Ok(Prepared::Ready(Cell::Int(i))),
        (ValueRef::Real(f), _) => return Ok(Prepared::Ready(Cell::Float(f))),
        (ValueRef::Text(t), ColumnKind::Json) => {
            let text = std::str::from_utf8(t)
                .with_context(|| format!("column {name} is not UTF-8"))?
                .trim();
            if let Some(b'{' | b'[') = text.as_bytes().first() {
                serde_json::from_str::<serde::de::IgnoredAny>(text)
                    .with_context(|| format!("column {name} is not JSON"))?;
                return Ok(Prepared::Ready(Cell::Json(text)));
            }
            Made::Value(
                serde_json::from_str(text).with_context(|| format!("column {name} is not JSON"))?,
            )
        }
        (ValueRef::Text(t), _) => match std::str::from_utf8(t) {
            Ok(s) => return Ok(Prepared::Ready(Cell::Text(s))),
            // Text that is not UTF-8 is kept, with replacement characters.
            Err(_) => Made::Text(String::from_utf8_lossy(t).into_owned()),
        },
        (ValueRef::Blob(b), _) => Made::Text(base64::engine::general_purpose::STANDARD.encode(b)),
    };
    made.push(m);
    Ok(Prepared::Made(made.len() - 1))
}

fn sort_key(v: ValueRef<'_>, name: &str) -> anyhow::Result<SortKey> {
    Ok(match v {
        ValueRef::Integer(i) => SortKey::Int(i),
        ValueRef::Text(t) => SortKey::Text(
            std::str::from_utf8(t)
                .with_context(|| format!("sort key {name} is not UTF-8"))?
                .to_string(),
        ),
        ValueRef::Null => bail!(
            "sort key {name} is NULL in a row: keyset paging needs a unique, non-null sort_key (no rows are skipped silently)"
        ),
        _ => bail!("sort key {name} must be text or an integer"),
    })
}
