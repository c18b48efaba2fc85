//! How a record maps onto a data type's columns: header-driven flattening
//! shared by every writer, and column inference for data without a manifest.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use serde_json::Value;

use super::FormatError;
use crate::model::{
    is_rfc3339, parse_timestamp, Column, ColumnKind, Manifest, Record, TypeManifest,
};

/// The columns of one data type with a lookup table, used to place each
/// field of a record into its cell.
#[derive(Debug)]
pub(crate) struct TypeLayout {
    pub(crate) data_type: String,
    pub(crate) columns: Vec<Column>,
    index: HashMap<String, usize>,
    /// Every proper prefix (`a`, `a.b`) of a dotted column name (`a.b.c`).
    prefixes: HashSet<String>,
}

impl TypeLayout {
    pub(crate) fn new(data_type: &str, columns: &[Column]) -> Self {
        let mut index = HashMap::with_capacity(columns.len());
        let mut prefixes = HashSet::new();
        for (i, c) in columns.iter().enumerate() {
            index.entry(c.name.clone()).or_insert(i);
            let mut end = 0;
            while let Some(dot) = c.name[end..].find('.') {
                end += dot;
                prefixes.insert(c.name[..end].to_string());
                end += 1;
            }
        }
        Self {
            data_type: data_type.to_string(),
            columns: columns.to_vec(),
            index,
            prefixes,
        }
    }

    /// Places the fields of `record` into one cell per column (`None` where
    /// the record has no value), checking that no field would be lost and
    /// that datetime columns hold timestamps.
    pub(crate) fn cells<'r>(
        &self,
        record: &'r Record,
        index: u64,
    ) -> Result<Vec<Option<&'r Value>>, FormatError> {
        let mut cells = vec![None; self.columns.len()];
        let mut name = String::new();
        self.place(record, &mut name, &mut cells, index)?;
        for (i, col) in self.columns.iter().enumerate() {
            if col.kind != ColumnKind::Datetime {
                continue;
            }
            match cells[i] {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if parse_timestamp(s).is_some() => {}
                Some(other) => {
                    let mut value = match other {
                        Value::String(s) => s.clone(),
                        v => v.to_string(),
                    };
                    if value.len() > 64 {
                        let cut = (0..=64)
                            .rev()
                            .find(|&i| value.is_char_boundary(i))
                            .unwrap_or(0);
                        value.truncate(cut);
                        value.push('…');
                    }
                    return Err(FormatError::InvalidDate {
                        data_type: self.data_type.clone(),
                        index,
                        field: col.name.clone(),
                        value,
                    });
                }
            }
        }
        Ok(cells)
    }

    fn place<'r>(
        &self,
        object: &'r Record,
        name: &mut String,
        cells: &mut [Option<&'r Value>],
        index: u64,
    ) -> Result<(), FormatError> {
        let base = name.len();
        for (key, value) in object {
            name.truncate(base);
            if base > 0 {
                name.push('.');
            }
            name.push_str(key);
            if let Some(&i) = self.index.get(name.as_str()) {
                cells[i] = Some(value);
            } else if let (Value::Object(inner), true) =
                (value, self.prefixes.contains(name.as_str()))
            {
                self.place(inner, name, cells, index)?;
            } else if value.is_null() && self.prefixes.contains(name.as_str()) {
                // A null parent of declared sub-columns: every sub-cell stays empty.
            } else {
                return Err(FormatError::UnknownField {
                    data_type: self.data_type.clone(),
                    index,
                    field: name.clone(),
                });
            }
        }
        name.truncate(base);
        Ok(())
    }
}

/// Derives a manifest from records an app already holds: columns in order of
/// first appearance, nested objects flattened to dotted names, arrays as JSON
/// columns, and each column's kind from its values (a column is `datetime`
/// only when every value is an RFC 3339 timestamp).
///
/// # Errors
///
/// [`FormatError::InvalidDataType`] for a malformed data type name,
/// [`FormatError::InvalidRecord`] for a record that is not a JSON object.
///
/// ```
/// use serde_json::json;
/// let data: indexmap::IndexMap<String, Vec<serde_json::Value>> = serde_json::from_value(json!({
///     "payment_history": [{"id": "p1", "amount_cents": 2999, "card": {"brand": "visa"}}]
/// })).unwrap();
/// let m = handover::format::infer_manifest(&data).unwrap();
/// let cols: Vec<_> = m.types["payment_history"].columns.iter().map(|c| c.name.as_str()).collect();
/// assert_eq!(cols, ["id", "amount_cents", "card.brand"]);
/// ```
pub fn infer_manifest(data: &IndexMap<String, Vec<Value>>) -> Result<Manifest, FormatError> {
    let mut manifest = Manifest::default();
    for (data_type, records) in data {
        if !crate::model::is_valid_data_type_name(data_type) {
            return Err(FormatError::InvalidDataType(data_type.clone()));
        }
        let mut kinds: IndexMap<String, Option<ColumnKind>> = IndexMap::new();
        for (i, record) in records.iter().enumerate() {
            let Value::Object(map) = record else {
                return Err(FormatError::InvalidRecord {
                    data_type: data_type.clone(),
                    index: i as u64,
                    reason: format!("expected an object, got {}", json_type(record)),
                });
            };
            collect(map, "", &mut kinds);
        }
        // A name seen both as a value and as an object keeps the whole value
        // as JSON in one column rather than splitting it; a name seen only as
        // null beside its object form is just an absent object.
        let names: Vec<String> = kinds.keys().cloned().collect();
        let mut parents = HashSet::new();
        for n in &names {
            for (i, _) in n.match_indices('.') {
                match kinds.get(&n[..i]) {
                    Some(Some(_)) => {
                        parents.insert(n[..i].to_string());
                    }
                    Some(None) => {
                        kinds.shift_remove(&n[..i]);
                    }
                    None => {}
                }
            }
        }
        let columns = kinds
            .into_iter()
            .filter(|(n, _)| !n.match_indices('.').any(|(i, _)| parents.contains(&n[..i])))
            .map(|(name, kind)| {
                let kind = if parents.contains(&name) {
                    ColumnKind::Json
                } else {
                    kind.unwrap_or(ColumnKind::String)
                };
                Column { name, kind }
            })
            .collect();
        manifest.types.insert(
            data_type.clone(),
            TypeManifest {
                records: records.len() as u64,
                columns,
                records_url: None,
            },
        );
    }
    Ok(manifest)
}

fn collect(map: &Record, prefix: &str, kinds: &mut IndexMap<String, Option<ColumnKind>>) {
    for (key, value) in map {
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if let Value::Object(inner) = value {
            if !inner.is_empty() {
                collect(inner, &name, kinds);
                continue;
            }
        }
        let seen = kinds.entry(name).or_insert(None);
        let this = match value {
            Value::Null => continue,
            Value::Bool(_) => ColumnKind::Boolean,
            Value::Number(n) if n.is_f64() => ColumnKind::Number,
            Value::Number(_) => ColumnKind::Integer,
            Value::String(s) if is_rfc3339(s) => ColumnKind::Datetime,
            Value::String(_) => ColumnKind::String,
            Value::Array(_) | Value::Object(_) => ColumnKind::Json,
        };
        *seen = Some(match (*seen, this) {
            (None, k) => k,
            (Some(a), b) if a == b => a,
            (Some(ColumnKind::Integer), ColumnKind::Number)
            | (Some(ColumnKind::Number), ColumnKind::Integer) => ColumnKind::Number,
            (Some(ColumnKind::Json), _) | (_, ColumnKind::Json) => ColumnKind::Json,
            _ => ColumnKind::String,
        });
    }
}

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// OWASP CSV-injection defence: a text cell that a spreadsheet could read as
/// a formula gets a leading apostrophe.
pub(crate) fn neutralize(s: &str) -> Option<String> {
    match s.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r' | b'\0') => Some(format!("'{s}")),
        _ => None,
    }
}
