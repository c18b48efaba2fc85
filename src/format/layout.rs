//! How a record maps onto a data type's columns: header-driven flattening
//! shared by every writer, and column inference for data without a manifest.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use serde_json::Value;

use super::{Cell, FormatError};
use crate::model::{
    is_rfc3339, parse_timestamp, Column, ColumnKind, Manifest, Record, TypeManifest,
};

/// The columns of one data type with a lookup table, used to place each
/// field of a record into its cell, and the plan for writing a row of cells
/// as a JSON object (dotted column names become nested objects).
#[derive(Debug)]
pub(crate) struct TypeLayout {
    pub(crate) data_type: String,
    pub(crate) columns: Vec<Column>,
    index: HashMap<String, usize>,
    /// Every proper prefix (`a`, `a.b`) of a dotted column name (`a.b.c`).
    prefixes: HashSet<String>,
    /// How a row of cells is written as a JSON object.
    json_plan: Vec<JsonStep>,
}

/// One step of writing a row as a JSON object: literal bytes (keys,
/// punctuation, nested-object openings) then the value of a column.
#[derive(Debug)]
struct JsonStep {
    before: Vec<u8>,
    column: usize,
}

/// A node of the JSON object a row becomes.
enum Node {
    Leaf(usize),
    Group(Vec<(String, Node)>),
}

fn insert_node(members: &mut Vec<(String, Node)>, path: &[&str], column: usize) {
    let (first, rest) = (path[0], &path[1..]);
    let existing = members.iter().position(|(k, _)| k == first);
    match (existing, rest.is_empty()) {
        (None, true) => members.push((first.to_string(), Node::Leaf(column))),
        (None, false) => {
            let mut inner = Vec::new();
            insert_node(&mut inner, rest, column);
            members.push((first.to_string(), Node::Group(inner)));
        }
        (Some(i), false) if matches!(members[i].1, Node::Group(_)) => {
            if let Node::Group(inner) = &mut members[i].1 {
                insert_node(inner, rest, column);
            }
        }
        // A name used both as a value and as an object, or twice: keep the
        // full dotted name as a key of its own so that no value is lost.
        _ => members.push((path.join("."), Node::Leaf(column))),
    }
}

fn plan_members(members: &[(String, Node)], pending: &mut Vec<u8>, steps: &mut Vec<JsonStep>) {
    pending.push(b'{');
    for (i, (key, node)) in members.iter().enumerate() {
        if i > 0 {
            pending.push(b',');
        }
        super::cell::push_json_str(pending, key);
        pending.push(b':');
        match node {
            Node::Leaf(c) => steps.push(JsonStep {
                before: std::mem::take(pending),
                column: *c,
            }),
            Node::Group(inner) => plan_members(inner, pending, steps),
        }
    }
    pending.push(b'}');
}

impl TypeLayout {
    pub(crate) fn new(data_type: &str, columns: &[Column]) -> Result<Self, FormatError> {
        let mut index = HashMap::with_capacity(columns.len());
        let mut prefixes = HashSet::new();
        let mut members = Vec::new();
        for (i, c) in columns.iter().enumerate() {
            if index.insert(c.name.clone(), i).is_some() {
                return Err(FormatError::InvalidColumns {
                    data_type: data_type.to_string(),
                    reason: format!("column {:?} is declared twice", c.name),
                });
            }
            let mut end = 0;
            while let Some(dot) = c.name[end..].find('.') {
                end += dot;
                prefixes.insert(c.name[..end].to_string());
                end += 1;
            }
            let path: Vec<&str> = c.name.split('.').collect();
            insert_node(&mut members, &path, i);
        }
        let mut json_plan = Vec::with_capacity(columns.len() + 1);
        let mut pending = Vec::new();
        plan_members(&members, &mut pending, &mut json_plan);
        // The closing braces after the last value.
        json_plan.push(JsonStep {
            before: pending,
            column: usize::MAX,
        });
        Ok(Self {
            data_type: data_type.to_string(),
            columns: columns.to_vec(),
            index,
            prefixes,
            json_plan,
        })
    }

    /// Writes a row of cells (one per column, in column order) as a JSON object.
    pub(crate) fn push_json_row(&self, cells: &[Cell<'_>], out: &mut Vec<u8>) {
        for step in &self.json_plan {
            out.extend_from_slice(&step.before);
            if let Some(cell) = cells.get(step.column) {
                super::cell::push_json_cell(out, cell);
            }
        }
    }

    /// Checks that a row of cells fits the columns: one cell per column,
    /// and timestamps (or nothing) in datetime columns.
    pub(crate) fn check_row(&self, cells: &[Cell<'_>], index: u64) -> Result<(), FormatError> {
        if cells.len() != self.columns.len() {
            return Err(FormatError::InvalidRecord {
                data_type: self.data_type.clone(),
                index,
                reason: format!(
                    "a row has {} values for {} columns",
                    cells.len(),
                    self.columns.len()
                ),
            });
        }
        for (cell, col) in cells.iter().zip(&self.columns) {
            if col.kind != ColumnKind::Datetime {
                continue;
            }
            match cell {
                Cell::Null => {}
                Cell::Text(s) if parse_timestamp(s).is_some() => {}
                other => {
                    return Err(FormatError::InvalidDate {
                        data_type: self.data_type.clone(),
                        index,
                        field: col.name.clone(),
                        value: other.describe(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Places the fields of `record` into one cell per column (`Null` where
    /// the record has no value), checking that no field would be lost and
    /// that datetime columns hold timestamps.
    pub(crate) fn record_cells<'r>(
        &self,
        record: &'r Record,
        index: u64,
        cells: &mut Vec<Cell<'r>>,
    ) -> Result<(), FormatError> {
        let mut slots: Vec<Option<&'r Value>> = vec![None; self.columns.len()];
        let mut name = String::new();
        self.place(record, &mut name, &mut slots, index)?;
        cells.clear();
        cells.extend(slots.iter().map(|v| v.map_or(Cell::Null, Cell::from_value)));
        self.check_row(cells, index)
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

/// OWASP CSV-injection defence: whether a text cell could be read as a
/// formula by a spreadsheet (and so gets a leading apostrophe).
pub(crate) fn needs_neutralizing(s: &str) -> bool {
    matches!(
        s.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r' | b'\0')
    )
}
