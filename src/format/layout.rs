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
        let mut kinds: IndexMap<String, u32> = IndexMap::new();
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
        let observed: Vec<(String, u32)> = kinds.into_iter().collect();
        manifest.types.insert(
            data_type.clone(),
            TypeManifest {
                records: records.len() as u64,
                columns: columns_from_kinds(&observed),
                records_url: None,
            },
        );
    }
    Ok(manifest)
}

/// The kinds of value seen in a column while inferring, as bits.
pub mod kind_bits {
    /// `true` / `false`.
    pub const BOOLEAN: u32 = 1;
    /// A whole number.
    pub const INTEGER: u32 = 2;
    /// Any other number.
    pub const NUMBER: u32 = 4;
    /// A strict RFC 3339 timestamp string.
    pub const DATETIME: u32 = 8;
    /// Any other string.
    pub const STRING: u32 = 16;
    /// An array, or an empty object.
    pub const JSON: u32 = 32;
}

/// The kind of a column from the kinds of value seen in it (`None`: only
/// nulls): JSON if any value was, a number column for whole and other
/// numbers, the one kind when there was one, text otherwise.
fn kind_of(mask: u32) -> Option<ColumnKind> {
    use kind_bits::*;
    Some(if mask == 0 {
        return None;
    } else if mask & JSON != 0 {
        ColumnKind::Json
    } else if mask & !(INTEGER | NUMBER) == 0 {
        if mask & NUMBER != 0 {
            ColumnKind::Number
        } else {
            ColumnKind::Integer
        }
    } else if mask.count_ones() == 1 {
        match mask {
            BOOLEAN => ColumnKind::Boolean,
            DATETIME => ColumnKind::Datetime,
            _ => ColumnKind::String,
        }
    } else {
        ColumnKind::String
    })
}

/// The columns for names in order of first appearance, each with the kinds
/// of value seen under it ([`kind_bits`]; 0 when only nulls were). A name
/// seen both as a value and as an object keeps the whole value as JSON in
/// one column rather than splitting it; a name seen only as null beside its
/// object form is just an absent object.
///
/// ```
/// use handover::format::{columns_from_kinds, kind_bits};
/// let cols = columns_from_kinds(&[("id".into(), kind_bits::STRING), ("n".into(), kind_bits::INTEGER | kind_bits::NUMBER)]);
/// assert_eq!(cols[1].kind, handover::model::ColumnKind::Number);
/// ```
pub fn columns_from_kinds(observed: &[(String, u32)]) -> Vec<Column> {
    let mut kinds: IndexMap<&str, u32> = observed.iter().map(|(n, m)| (n.as_str(), *m)).collect();
    let names: Vec<&str> = kinds.keys().copied().collect();
    let mut parents = HashSet::new();
    for n in &names {
        for (i, _) in n.match_indices('.') {
            match kinds.get(&n[..i]) {
                Some(&m) if m != 0 => {
                    parents.insert(n[..i].to_string());
                }
                Some(_) => {
                    kinds.shift_remove(&n[..i]);
                }
                None => {}
            }
        }
    }
    kinds
        .into_iter()
        .filter(|(n, _)| !n.match_indices('.').any(|(i, _)| parents.contains(&n[..i])))
        .map(|(name, mask)| {
            let kind = if parents.contains(name) {
                ColumnKind::Json
            } else {
                kind_of(mask).unwrap_or(ColumnKind::String)
            };
            Column {
                name: name.to_string(),
                kind,
            }
        })
        .collect()
}

fn collect(map: &Record, prefix: &str, kinds: &mut IndexMap<String, u32>) {
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
        let seen = kinds.entry(name).or_insert(0);
        *seen |= match value {
            Value::Null => 0,
            Value::Bool(_) => kind_bits::BOOLEAN,
            Value::Number(n) if n.is_f64() => kind_bits::NUMBER,
            Value::Number(_) => kind_bits::INTEGER,
            Value::String(s) if is_rfc3339(s) => kind_bits::DATETIME,
            Value::String(_) => kind_bits::STRING,
            Value::Array(_) | Value::Object(_) => kind_bits::JSON,
        };
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
