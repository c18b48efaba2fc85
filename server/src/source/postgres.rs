//! The operator's data in PostgreSQL, read with sqlx's PostgreSQL driver:
//! each value arrives in PostgreSQL's binary format and becomes a [`Cell`]
//! by its SQL type and its column's kind, borrowed from the row where it
//! can be. Queries run on blocking threads (driving the async driver), so
//! a page's consumer can hand its output on without an async context, as
//! with SQLite.
//!
//! What an operator's query must do on PostgreSQL:
//! - `:user_id` and `:company_id` are text parameters (cast them, e.g.
//!   `:user_id::bigint`, when the columns are not text);
//! - the `sort_key` column is unique and not null; text keys page in the
//!   column's collation (declare it `COLLATE "C"` for byte order);
//! - the `timestamp` column is `timestamptz`, `timestamp`, `date` or ISO
//!   8601 text (it is compared as `timestamptz`);
//! - columns of the types below are read directly; cast anything else to
//!   text: booleans, integers, floats, `numeric`, text types, `json` and
//!   `jsonb`, `timestamptz`/`timestamp`/`date` (written as RFC 3339 UTC
//!   with milliseconds), `uuid`, `bytea` (base64).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures_util::TryStreamExt as _;
use handover::format::Cell;
use handover::model::ColumnKind;
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Column as _, Row as _, TypeInfo as _, ValueRef as _};

use super::{PageEnd, PageRequest, RowSink, SortKey};
use crate::auth::Scope;
use crate::datatypes::{DataTypeDef, Range, Registry};

/// The SQL of one data type, in PostgreSQL's dialect.
#[derive(Debug)]
struct TypeSql {
    def: DataTypeDef,
    /// The first page: no cursor condition.
    first: String,
    /// Later pages: `sort_key > $6`.
    after: String,
    count: String,
}

/// Reads the data type queries from a PostgreSQL database.
#[derive(Debug)]
pub struct PostgresSource {
    pool: PgPool,
    types: HashMap<String, TypeSql>,
    runtime: tokio::runtime::Handle,
}

fn type_sql(def: &DataTypeDef) -> TypeSql {
    let inner = def
        .query
        .replace(":user_id", "$1")
        .replace(":company_id", "$2");
    let date_filter = match &def.timestamp {
        Some(ts) => format!(
            " AND ($3::text IS NULL OR q.\"{ts}\"::timestamptz >= $3::timestamptz) \
             AND ($4::text IS NULL OR q.\"{ts}\"::timestamptz <= $4::timestamptz)"
        ),
        None => " AND ($3::text IS NULL OR TRUE) AND ($4::text IS NULL OR TRUE)".to_string(),
    };
    let sk = &def.sort_key;
    TypeSql {
        first: format!(
            "SELECT * FROM ({inner}) AS q WHERE TRUE{date_filter} ORDER BY q.\"{sk}\" LIMIT $5"
        ),
        after: format!(
            "SELECT * FROM ({inner}) AS q WHERE TRUE{date_filter} AND q.\"{sk}\" > $6 ORDER BY q.\"{sk}\" LIMIT $5"
        ),
        count: format!("SELECT COUNT(*) FROM ({inner}) AS q WHERE TRUE{date_filter}"),
        def: def.clone(),
    }
}

/// How a column's values are decoded (PostgreSQL's binary formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Text,
    Json,
    Jsonb,
    Timestamp,
    Date,
    Uuid,
    Bytea,
}

fn wire_of(type_name: &str, column: &str) -> anyhow::Result<Wire> {
    Ok(match type_name {
        "BOOL" => Wire::Bool,
        "INT2" => Wire::Int2,
        "INT4" => Wire::Int4,
        "INT8" => Wire::Int8,
        "FLOAT4" => Wire::Float4,
        "FLOAT8" => Wire::Float8,
        "NUMERIC" => Wire::Numeric,
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" | "CITEXT" => Wire::Text,
        "JSON" => Wire::Json,
        "JSONB" => Wire::Jsonb,
        "TIMESTAMPTZ" | "TIMESTAMP" => Wire::Timestamp,
        "DATE" => Wire::Date,
        "UUID" => Wire::Uuid,
        "BYTEA" => Wire::Bytea,
        other => bail!(
            "column {column:?} has the PostgreSQL type {other}, which handover does not read: cast it to text in the query"
        ),
    })
}

/// Where each cell of a row comes from.
enum CellSource {
    Column {
        index: usize,
        kind: ColumnKind,
        wire: Wire,
    },
    /// A field inside a JSON object column (dotted column names).
    Field { group: usize, path: Vec<String> },
}

struct Plan {
    sources: Vec<CellSource>,
    /// JSON columns dotted columns read from: (index, wire).
    groups: Vec<(usize, Wire)>,
    sort: (usize, Wire),
}

fn plan(row: &PgRow, def: &DataTypeDef) -> anyhow::Result<Plan> {
    let columns = row.columns();
    let find = |name: &str| -> anyhow::Result<(usize, Wire)> {
        let c = columns
            .iter()
            .find(|c| c.name() == name)
            .with_context(|| format!("the query of {} returns no column {name:?}", def.name))?;
        Ok((c.ordinal(), wire_of(c.type_info().name(), name)?))
    };
    let mut group_names: Vec<String> = Vec::new();
    let mut groups = Vec::new();
    let mut sources = Vec::with_capacity(def.columns.len());
    for col in &def.columns {
        match col.name.split_once('.') {
            None => {
                let (index, wire) = find(&col.name)?;
                sources.push(CellSource::Column {
                    index,
                    kind: col.kind,
                    wire,
                });
            }
            Some((top, rest)) => {
                let group = match group_names.iter().position(|g| g == top) {
                    Some(g) => g,
                    None => {
                        group_names.push(top.to_string());
                        groups.push(find(top)?);
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
    Ok(Plan {
        sources,
        groups,
        sort: find(&def.sort_key)?,
    })
}

/// Something a row's cells borrow that had to be made first.
enum Made {
    Text(String),
    Value(Value),
}

/// A value of the row on its way to becoming a cell.
enum Prepared<'r> {
    Ready(Cell<'r>),
    Made(usize),
    Field,
}

fn raw(row: &PgRow, index: usize) -> anyhow::Result<Option<&[u8]>> {
    let v = row.try_get_raw(index)?;
    if v.is_null() {
        return Ok(None);
    }
    Ok(Some(v.as_bytes().map_err(|e| anyhow::anyhow!("{e}"))?))
}

fn be<const N: usize>(b: &[u8], name: &str) -> anyhow::Result<[u8; N]> {
    b.try_into()
        .with_context(|| format!("column {name}: unexpected value length {}", b.len()))
}

/// 2000-01-01T00:00:00Z, PostgreSQL's epoch, in Unix seconds.
const PG_EPOCH: i64 = 946_684_800;

/// A `numeric` in PostgreSQL's binary format as decimal text.
fn numeric_text(b: &[u8], name: &str) -> anyhow::Result<String> {
    let head = |i: usize| -> anyhow::Result<u16> {
        Ok(u16::from_be_bytes(be::<2>(
            b.get(i..i + 2)
                .with_context(|| format!("column {name}: truncated numeric"))?,
            name,
        )?))
    };
    let (ndigits, weight, sign, dscale) = (head(0)? as usize, head(2)? as i16, head(4)?, head(6)?);
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    let digits = (0..ndigits)
        .map(|i| head(8 + 2 * i))
        .collect::<anyhow::Result<Vec<u16>>>()?;
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    // Integer part: groups 0..=weight.
    if weight < 0 {
        s.push('0');
    } else {
        for i in 0..=weight as usize {
            let d = digits.get(i).copied().unwrap_or(0);
            if i == 0 {
                s.push_str(&d.to_string());
            } else {
                s.push_str(&format!("{d:04}"));
            }
        }
    }
    if dscale > 0 {
        s.push('.');
        let mut frac = String::new();
        let mut i = i32::from(weight) + 1;
        while frac.len() < usize::from(dscale) {
            let d = if i < 0 {
                0
            } else {
                digits.get(i as usize).copied().unwrap_or(0)
            };
            frac.push_str(&format!("{d:04}"));
            i += 1;
        }
        frac.truncate(usize::from(dscale));
        s.push_str(&frac);
    }
    Ok(s)
}

fn timestamp_text(micros: i64) -> anyhow::Result<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(
        (i128::from(PG_EPOCH) * 1_000_000 + i128::from(micros)) * 1000,
    )
    .context("a timestamp out of range")?;
    Ok(handover::model::format_timestamp(t))
}

fn date_text(days: i32) -> anyhow::Result<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(PG_EPOCH + i64::from(days) * 86_400)
        .context("a date out of range")?;
    Ok(format!(
        "{:04}-{:02}-{:02}",
        t.year(),
        u8::from(t.month()),
        t.day()
    ))
}

/// JSON text of a `json` or `jsonb` value.
fn json_text<'b>(b: &'b [u8], wire: Wire, name: &str) -> anyhow::Result<&'b str> {
    let b = match wire {
        Wire::Jsonb => b
            .strip_prefix(&[1])
            .with_context(|| format!("column {name}: unknown jsonb version"))?,
        _ => b,
    };
    std::str::from_utf8(b).with_context(|| format!("column {name} is not UTF-8"))
}

/// Reads one value by its SQL type and its column's kind.
fn prepare<'r>(
    b: Option<&'r [u8]>,
    wire: Wire,
    kind: ColumnKind,
    name: &str,
    made: &mut Vec<Made>,
) -> anyhow::Result<Prepared<'r>> {
    let Some(b) = b else {
        return Ok(Prepared::Ready(Cell::Null));
    };
    let ready = |c| Ok(Prepared::Ready(c));
    let m = match wire {
        Wire::Bool => return ready(Cell::Bool(b.first().is_some_and(|&x| x != 0))),
        Wire::Int2 => return ready(Cell::Int(i16::from_be_bytes(be(b, name)?).into())),
        Wire::Int4 => return ready(Cell::Int(i32::from_be_bytes(be(b, name)?).into())),
        Wire::Int8 => return ready(Cell::Int(i64::from_be_bytes(be(b, name)?))),
        Wire::Float4 => return ready(Cell::Float(f32::from_be_bytes(be(b, name)?).into())),
        Wire::Float8 => return ready(Cell::Float(f64::from_be_bytes(be(b, name)?))),
        Wire::Numeric => {
            let text = numeric_text(b, name)?;
            match kind {
                ColumnKind::Integer => match text.parse::<i64>() {
                    Ok(i) => return ready(Cell::Int(i)),
                    Err(_) => Made::Text(text),
                },
                ColumnKind::Number => match text.parse::<f64>() {
                    Ok(f) => return ready(Cell::Float(f)),
                    Err(_) => Made::Text(text),
                },
                _ => Made::Text(text),
            }
        }
        Wire::Text => {
            let text = match std::str::from_utf8(b) {
                Ok(s) => s,
                Err(_) => {
                    made.push(Made::Text(String::from_utf8_lossy(b).into_owned()));
                    return Ok(Prepared::Made(made.len() - 1));
                }
            };
            if kind != ColumnKind::Json {
                return ready(Cell::Text(text));
            }
            json_cell(text, name)?
        }
        Wire::Json | Wire::Jsonb => {
            let text = json_text(b, wire, name)?;
            if kind == ColumnKind::Json
                || matches!(text.trim_start().as_bytes().first(), Some(b'{' | b'['))
            {
                json_cell(text, name)?
            } else {
                Made::Value(
                    serde_json::from_str(text)
                        .with_context(|| format!("column {name} is not JSON"))?,
                )
            }
        }
        Wire::Timestamp => Made::Text(timestamp_text(i64::from_be_bytes(be(b, name)?))?),
        Wire::Date => Made::Text(date_text(i32::from_be_bytes(be(b, name)?))?),
        Wire::Uuid => {
            let h = hex::encode(b);
            anyhow::ensure!(h.len() == 32, "column {name}: a uuid of {} bytes", b.len());
            Made::Text(format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            ))
        }
        Wire::Bytea => Made::Text(base64::engine::general_purpose::STANDARD.encode(b)),
    };
    made.push(m);
    Ok(Prepared::Made(made.len() - 1))
}

/// A `json` column's text: arrays and objects are passed through, scalars
/// are parsed.
fn json_cell(text: &str, name: &str) -> anyhow::Result<Made> {
    let t = text.trim();
    if let Some(b'{' | b'[') = t.as_bytes().first() {
        // Compact it: the wire and the flat formats carry JSON without spaces.
        let v: Value =
            serde_json::from_str(t).with_context(|| format!("column {name} is not JSON"))?;
        return Ok(Made::Text(serde_json::to_string(&v)?));
    }
    Ok(Made::Value(
        serde_json::from_str(t).with_context(|| format!("column {name} is not JSON"))?,
    ))
}

fn sort_key(row: &PgRow, (index, wire): (usize, Wire), name: &str) -> anyhow::Result<SortKey> {
    let b = raw(row, index)?.with_context(|| {
        format!("sort key {name} is NULL in a row: keyset paging needs a unique, non-null sort_key (no rows are skipped silently)")
    })?;
    Ok(match wire {
        Wire::Int2 => SortKey::Int(i16::from_be_bytes(be(b, name)?).into()),
        Wire::Int4 => SortKey::Int(i32::from_be_bytes(be(b, name)?).into()),
        Wire::Int8 => SortKey::Int(i64::from_be_bytes(be(b, name)?)),
        Wire::Text => SortKey::Text(
            std::str::from_utf8(b)
                .with_context(|| format!("sort key {name} is not UTF-8"))?
                .to_string(),
        ),
        _ => bail!("sort key {name} must be text or an integer"),
    })
}

impl PostgresSource {
    /// A source reading the database of `url` with the queries of
    /// `registry`. Connects lazily.
    ///
    /// # Errors
    ///
    /// A URL that does not parse, or no tokio runtime.
    pub fn open(url: &str, registry: &Registry) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy(url)
            .context("DATABASE_URL is not a valid PostgreSQL URL")?;
        Ok(Self {
            pool,
            types: registry
                .all()
                .map(|t| (t.name.clone(), type_sql(t)))
                .collect(),
            runtime: tokio::runtime::Handle::try_current()
                .context("the PostgreSQL source needs a tokio runtime")?,
        })
    }

    fn sql(&self, data_type: &str) -> anyhow::Result<&TypeSql> {
        self.types
            .get(data_type)
            .with_context(|| format!("data type {data_type} is not configured"))
    }

    /// Counts the owner's records of `data_type` within `range`.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn count(
        &self,
        data_type: &str,
        owner: &Scope,
        range: &Range,
    ) -> anyhow::Result<u64> {
        let t = self.sql(data_type)?;
        let n: i64 = sqlx::query_scalar(&t.count)
            .bind(&owner.user_id)
            .bind(&owner.company_id)
            .bind(&range.start)
            .bind(&range.end)
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("counting {data_type}"))?;
        Ok(n as u64)
    }

    /// Reads one page into `sink`; blocking (call from a blocking thread).
    ///
    /// # Errors
    ///
    /// Database errors, values that cannot be read, and the sink's errors.
    pub fn read_page<S: RowSink>(
        &self,
        req: &PageRequest,
        sink: &mut S,
    ) -> anyhow::Result<PageEnd> {
        let t = self.sql(&req.data_type)?;
        self.runtime
            .block_on(self.read(t, req, sink))
            .with_context(|| format!("reading {}", req.data_type))
    }

    async fn read<S: RowSink>(
        &self,
        t: &TypeSql,
        req: &PageRequest,
        sink: &mut S,
    ) -> anyhow::Result<PageEnd> {
        let sql = if req.after.is_some() {
            &t.after
        } else {
            &t.first
        };
        let mut q = sqlx::query(sql)
            .bind(&req.owner.user_id)
            .bind(&req.owner.company_id)
            .bind(&req.range.start)
            .bind(&req.range.end)
            .bind(i64::from(req.limit) + 1);
        q = match &req.after {
            None => q,
            Some(SortKey::Int(i)) => q.bind(*i),
            Some(SortKey::Text(s)) => q.bind(s.clone()),
        };
        let mut rows = q.fetch(&self.pool);
        let mut plan_: Option<Plan> = None;
        let mut n: u64 = 0;
        let mut last_key = None;
        let mut made: Vec<Made> = Vec::new();
        let mut spare: Vec<Cell<'static>> = Vec::new();
        while let Some(row) = rows.try_next().await? {
            if n == u64::from(req.limit) {
                return Ok(PageEnd {
                    rows: n,
                    next: last_key,
                });
            }
            if plan_.is_none() {
                plan_ = Some(plan(&row, &t.def)?);
            }
            let p = plan_.as_ref().expect("planned above");
            made.clear();
            let group_values = p
                .groups
                .iter()
                .map(|&(i, wire)| match raw(&row, i)? {
                    None => Ok(None),
                    Some(b) => {
                        let text = match wire {
                            Wire::Json | Wire::Jsonb => {
                                json_text(b, wire, "a column holding sub-columns")?
                            }
                            Wire::Text => std::str::from_utf8(b)?,
                            _ => bail!("a column holding sub-columns is not JSON"),
                        };
                        Ok(Some(
                            serde_json::from_str::<Value>(text)
                                .context("a column holding sub-columns is not JSON")?,
                        ))
                    }
                })
                .collect::<anyhow::Result<Vec<Option<Value>>>>()?;
            let mut prepared = Vec::with_capacity(p.sources.len());
            for (src, col) in p.sources.iter().zip(&t.def.columns) {
                prepared.push(match src {
                    CellSource::Column { index, kind, wire } => {
                        prepare(raw(&row, *index)?, *wire, *kind, &col.name, &mut made)?
                    }
                    CellSource::Field { .. } => Prepared::Field,
                });
            }
            let mut cells: Vec<Cell<'_>> = spare.into_iter().map(|_| Cell::Null).collect();
            for (src, pr) in p.sources.iter().zip(prepared) {
                cells.push(match (src, pr) {
                    (_, Prepared::Ready(c)) => c,
                    (_, Prepared::Made(i)) => match &made[i] {
                        Made::Text(s) => match src {
                            CellSource::Column {
                                kind: ColumnKind::Json,
                                ..
                            } => Cell::Json(s),
                            _ => Cell::Text(s),
                        },
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
                last_key = Some(sort_key(&row, p.sort, &t.def.sort_key)?);
            }
        }
        Ok(PageEnd {
            rows: n,
            next: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [ndigits, weight as u16, sign, dscale] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numerics_read_as_decimal_text() {
        // 12345.678 = [1, 2345, 6780], weight 1, dscale 3
        assert_eq!(
            numeric_text(&numeric(3, 1, 0, 3, &[1, 2345, 6780]), "n").unwrap(),
            "12345.678"
        );
        // -0.05 = [500], weight -1, dscale 2
        assert_eq!(
            numeric_text(&numeric(1, -1, 0x4000, 2, &[500]), "n").unwrap(),
            "-0.05"
        );
        // 100000000 = [1], weight 2
        assert_eq!(
            numeric_text(&numeric(1, 2, 0, 0, &[1]), "n").unwrap(),
            "100000000"
        );
        assert_eq!(numeric_text(&numeric(0, 0, 0, 0, &[]), "n").unwrap(), "0");
    }

    #[test]
    fn timestamps_and_dates_read_as_utc_text() {
        assert_eq!(timestamp_text(0).unwrap(), "2000-01-01T00:00:00.000Z");
        assert_eq!(
            timestamp_text(86_400_000_000 + 1_500).unwrap(),
            "2000-01-02T00:00:00.001Z"
        );
        assert_eq!(date_text(-1).unwrap(), "1999-12-31");
    }
}
