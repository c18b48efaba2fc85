//! Data types as configured by the operator: each maps to one SQL query
//! over their own tables, bound to the requesting user and company, with a
//! stable sort key for keyset pagination and an optional timestamp column
//! for the date range.

use std::path::Path;

use anyhow::{bail, Context as _};
use handover::model::Column;
use indexmap::IndexMap;
use serde::Deserialize;

/// The default config: the seed's five types over the demo tables.
pub const DEFAULT_CONFIG: &str = include_str!("../config/datatypes.toml");
/// The same types and demo tables in PostgreSQL's dialect.
pub const DEFAULT_POSTGRES_CONFIG: &str = include_str!("../config/datatypes.postgres.toml");

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

/// A date range: as the caller gave it (what the API echoes), or with
/// canonical UTC bounds ([`Range::canonical`]: what the queries compare as
/// text, and what the files state).
pub type Range = handover::model::DateRange;

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
        Self::load_for(path, crate::store::Engine::Sqlite)
    }

    /// Loads the config at `path`, or the built-in config for `engine`.
    ///
    /// # Errors
    ///
    /// As [`Registry::load`].
    pub fn load_for(path: Option<&Path>, engine: crate::store::Engine) -> anyhow::Result<Self> {
        let text = match (path, engine) {
            (Some(p), _) => std::fs::read_to_string(p)
                .with_context(|| format!("reading data type config {}", p.display()))?,
            (None, crate::store::Engine::Sqlite) => DEFAULT_CONFIG.to_string(),
            (None, crate::store::Engine::Postgres) => DEFAULT_POSTGRES_CONFIG.to_string(),
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
        for t in file.data_type {
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
            for (i, c) in t.columns.iter().enumerate() {
                if names[..i].contains(&c.name.as_str()) {
                    bail!(
                        "data type {}: column {:?} is declared twice",
                        t.name,
                        c.name
                    );
                }
                if let Some(parent) = names.iter().find(|n| c.name.starts_with(&format!("{n}."))) {
                    bail!(
                        "data type {}: column {:?} is also the object of column {:?}; declare one or the other",
                        t.name,
                        parent,
                        c.name
                    );
                }
                if !c.name.split('.').all(is_identifier) {
                    bail!(
                        "data type {}: column name {:?} is not valid",
                        t.name,
                        c.name
                    );
                }
            }
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
}
