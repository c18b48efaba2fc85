//! Data types as configured by the operator: each maps to one SQL query
//! over their own tables, bound to the requesting user and company, with a
//! stable sort key for keyset pagination and an optional timestamp column
//! for the date range.

use std::path::Path;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use handover::model::{Column, ColumnKind, Record};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool, TypeInfo, ValueRef};

/// The default config: the seed's five types over the demo tables.
pub const DEFAULT_CONFIG: &str = include_str!("../config/datatypes.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    article_15: Option<IndexMap<String, String>>,
    data_type: Vec<DataTypeDef>,
    #[serde(default)]
    demo: Option<DemoDef>,
}

/// One configured data type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataTypeDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub query: String,
    pub sort_key: String,
    #[serde(default)]
    pub timestamp: Option<String>,
    pub columns: Vec<Column>,
    #[serde(skip)]
    page_sql: String,
    #[serde(skip)]
    count_sql: String,
}

/// How `demo-data` fills the demo tables of a config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoDef {
    /// SQL creating the demo tables.
    pub schema: String,
    /// `seed-004` (the built-in generator for the seed's five types) or `sql`.
    pub generator: String,
    /// For `sql`: statements inserting the demo rows.
    #[serde(default)]
    pub seed: Option<String>,
}

/// A date range with canonical UTC bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    pub start: Option<String>,
    pub end: Option<String>,
}

/// The configured data types.
#[derive(Debug, Clone)]
pub struct Registry {
    types: IndexMap<String, DataTypeDef>,
    pub article_15: Option<IndexMap<String, String>>,
    pub demo: Option<DemoDef>,
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Registry {
    /// Loads the config at `path`, or the default config.
    ///
    /// # Errors
    ///
    /// Unreadable file, bad TOML, or a data type that is not safe to run
    /// (a query that does not use both `:user_id` and `:company_id`, a sort
    /// key or timestamp that is not a plain column name, …).
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("reading data type config {}", p.display()))?,
            None => DEFAULT_CONFIG.to_string(),
        };
        Self::parse(&text).with_context(|| match path {
            Some(p) => format!("data type config {}", p.display()),
            None => "built-in data type config".into(),
        })
    }

    /// Parses a config from TOML text.
    ///
    /// # Errors
    ///
    /// As [`Registry::load`].
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: ConfigFile = toml::from_str(text)?;
        let mut types = IndexMap::new();
        for mut t in file.data_type {
            if !handover::model::is_valid_data_type_name(&t.name) {
                bail!("data type name {:?} is not valid", t.name);
            }
            if !t.query.contains(":user_id") || !t.query.contains(":company_id") {
                bail!(
                    "data type {}: the query must filter by both :user_id and :company_id",
                    t.name
                );
            }
            let names: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
            if !is_identifier(&t.sort_key) || !names.contains(&t.sort_key.as_str()) {
                bail!(
                    "data type {}: sort_key {:?} must be one of its columns",
                    t.name,
                    t.sort_key
                );
            }
            if let Some(ts) = &t.timestamp {
                if !is_identifier(ts) || !names.contains(&ts.as_str()) {
                    bail!(
                        "data type {}: timestamp {:?} must be one of its columns",
                        t.name,
                        ts
                    );
                }
            }
            for c in &t.columns {
                if !c.name.split('.').all(is_identifier) {
                    bail!(
                        "data type {}: column name {:?} is not valid",
                        t.name,
                        c.name
                    );
                }
            }
            let inner = t
                .query
                .replace(":user_id", "?1")
                .replace(":company_id", "?2");
            let date_filter = match &t.timestamp {
                Some(ts) => format!(
                    " AND (?4 IS NULL OR julianday(q.\"{ts}\") >= julianday(?4)) AND (?5 IS NULL OR julianday(q.\"{ts}\") <= julianday(?5))"
                ),
                // Unused, but keeps the parameter numbering the same for every type.
                None => " AND (?4 IS NULL OR 1) AND (?5 IS NULL OR 1)".to_string(),
            };
            let sk = &t.sort_key;
            t.page_sql = format!(
                "SELECT * FROM ({inner}) AS q WHERE (?3 IS NULL OR q.\"{sk}\" > ?3){date_filter} ORDER BY q.\"{sk}\" LIMIT ?6"
            );
            t.count_sql = format!("SELECT COUNT(*) FROM ({inner}) AS q WHERE (?3 IS NULL OR 1){date_filter} AND ?6 IS NULL");
            if types.insert(t.name.clone(), t.clone()).is_some() {
                bail!("data type {} is declared twice", t.name);
            }
        }
        if types.is_empty() {
            bail!("no data types configured");
        }
        Ok(Self {
            types,
            article_15: file.article_15,
            demo: file.demo,
        })
    }

    /// The data type named `name`.
    pub fn get(&self, name: &str) -> Option<&DataTypeDef> {
        self.types.get(name)
    }

    /// All data types, in config order.
    pub fn all(&self) -> impl Iterator<Item = &DataTypeDef> {
        self.types.values()
    }

    /// How many records of `t` the user has in the company within `range`.
    ///
    /// # Errors
    ///
    /// Database errors (including a query that does not fit the operator's tables).
    pub async fn count(
        &self,
        db: &SqlitePool,
        t: &DataTypeDef,
        user: &str,
        company: &str,
        range: &Range,
    ) -> anyhow::Result<u64> {
        let n: i64 = sqlx::query_scalar(&t.count_sql)
            .bind(user)
            .bind(company)
            .bind(Option::<String>::None)
            .bind(&range.start)
            .bind(&range.end)
            .bind(Option::<i64>::None)
            .fetch_one(db)
            .await
            .with_context(|| format!("counting {}", t.name))?;
        Ok(n as u64)
    }

    /// One page of `t` after the cursor; returns the records and the cursor
    /// of the next page (`None` when this page is the last).
    ///
    /// # Errors
    ///
    /// A cursor that was not made by this function, or database errors.
    pub async fn page(
        &self,
        db: &SqlitePool,
        t: &DataTypeDef,
        owner: &crate::auth::Scope,
        range: &Range,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Record>, Option<String>), PageError> {
        let after = cursor.map(decode_cursor).transpose()?;
        let q = sqlx::query(&t.page_sql)
            .bind(&owner.user_id)
            .bind(&owner.company_id);
        let q = match &after {
            None => q.bind(Option::<String>::None),
            Some(Value::Number(n)) => q.bind(n.as_i64()),
            Some(Value::String(s)) => q.bind(s.clone()),
            Some(_) => return Err(PageError::BadCursor),
        };
        // One extra row tells whether another page follows.
        let rows = q
            .bind(&range.start)
            .bind(&range.end)
            .bind(i64::from(limit) + 1)
            .fetch_all(db)
            .await
            .map_err(|e| {
                PageError::Db(anyhow::Error::new(e).context(format!("reading {}", t.name)))
            })?;
        let more = rows.len() > limit as usize;
        let mut records = Vec::with_capacity(rows.len().min(limit as usize));
        for row in rows.iter().take(limit as usize) {
            records.push(to_record(t, row).map_err(PageError::Db)?);
        }
        let next = if more {
            records
                .last()
                .and_then(|r| r.get(&t.sort_key))
                .map(encode_cursor)
        } else {
            None
        };
        Ok((records, next))
    }
}

/// Why a page could not be served.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("the cursor is not valid")]
    BadCursor,
    #[error(transparent)]
    Db(anyhow::Error),
}

fn encode_cursor(key: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.to_string())
}

fn decode_cursor(c: &str) -> Result<Value, PageError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| PageError::BadCursor)?;
    match serde_json::from_slice(&bytes) {
        Ok(v @ (Value::String(_) | Value::Number(_))) => Ok(v),
        _ => Err(PageError::BadCursor),
    }
}

/// The value of column `name` whatever SQLite stored there.
fn raw_value(row: &SqliteRow, name: &str) -> anyhow::Result<Value> {
    let raw = row
        .try_get_raw(name)
        .with_context(|| format!("column {name}"))?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let ty = raw.type_info().name().to_string();
    Ok(match ty.as_str() {
        "INTEGER" | "BOOLEAN" => Value::from(row.try_get::<i64, _>(name)?),
        "REAL" => serde_json::Number::from_f64(row.try_get::<f64, _>(name)?)
            .map_or(Value::Null, Value::Number),
        "BLOB" => Value::from(
            base64::engine::general_purpose::STANDARD.encode(row.try_get::<Vec<u8>, _>(name)?),
        ),
        _ => Value::from(row.try_get::<String, _>(name)?),
    })
}

fn to_record(t: &DataTypeDef, row: &SqliteRow) -> anyhow::Result<Record> {
    let mut record = Record::new();
    for col in &t.columns {
        if let Some((top, _)) = col.name.split_once('.') {
            // Dotted columns come from one JSON object column in the query.
            if !record.contains_key(top) {
                let v = match raw_value(row, top)? {
                    Value::String(s) => serde_json::from_str(&s)
                        .with_context(|| format!("column {top} is not JSON"))?,
                    other => other,
                };
                record.insert(top.to_string(), v);
            }
            continue;
        }
        let v = raw_value(row, &col.name)?;
        let v = match (col.kind, v) {
            (ColumnKind::Boolean, Value::Number(n)) => Value::Bool(n.as_i64() != Some(0)),
            (ColumnKind::Json, Value::String(s)) => serde_json::from_str(&s)
                .with_context(|| format!("column {} is not JSON", col.name))?,
            (_, v) => v,
        };
        record.insert(col.name.clone(), v);
    }
    Ok(record)
}
