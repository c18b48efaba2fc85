//! The record pages of client delivery, as they travel from the server to
//! the browser: compact, column-ordered, and self-describing enough for any
//! client.
//!
//! A **frame** is one JSON object:
//!
//! ```json
//! {"data_type":"payment_history","offset":0,
//!  "columns":[{"name":"id","kind":"string"},{"name":"amount_cents","kind":"integer"}],
//!  "rows":[["payment_123",2999],["payment_124",-500]],
//!  "next_cursor":"WyJwYXltZW50XzEyNCIsMl0.3q2-7w"}
//! ```
//!
//! - `rows` holds one array per record, its values in the order of
//!   `columns` (the manifest's columns of the type): text and timestamps as
//!   strings, integers and numbers as numbers, booleans as booleans, `json`
//!   columns as nested JSON values, and `null` for no value.
//! - `offset` is the position of the first row within the data type.
//! - `next_cursor` continues after the last row; `null` on the last frame.
//! - `columns` is always in a single page, and in the first frame of a stream.
//!
//! A page answer carries one frame as the envelope's `data`; a stream is
//! newline-delimited JSON, one frame per line, ending with the frame whose
//! `next_cursor` is `null` (a stream that ends without it was cut short and
//! resumes from the last cursor received). A line `{"error":{…}}` reports a
//! failure after the stream began.
//!
//! ```
//! use handover::format::Cell;
//! use handover::model::{Column, ColumnKind};
//! use handover::wire::{decode_frame, FrameEncoder};
//!
//! let columns = [Column::new("id", ColumnKind::String), Column::new("amount_cents", ColumnKind::Integer)];
//! let mut line = Vec::new();
//! let mut enc = FrameEncoder::begin(&mut line, "payment_history", 0, Some(&columns));
//! enc.row(&mut line, &[Cell::Text("payment_123"), Cell::Int(2999)]);
//! enc.end(&mut line, None);
//! let frame = decode_frame(&line, &columns).unwrap();
//! assert_eq!(frame.row_count(), 1);
//! assert_eq!(frame.row(0)[1].as_cell(), Cell::Int(2999));
//! assert!(frame.next_cursor.is_none());
//! ```

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::format::{push_json_cell, push_json_str, Cell};
use crate::model::{Column, ColumnKind};

/// MIME type of a stream of frames.
pub const STREAM_CONTENT_TYPE: &str = "application/x-ndjson";

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a frame: malformed JSON or the wrong shape.
    #[error("malformed page of records: {0}")]
    Malformed(String),
    /// The frame describes other columns than expected.
    #[error("the page's columns do not match the export's manifest")]
    ColumnMismatch,
    /// The server reported a failure in the middle of a stream.
    #[error("the server reported {code}: {message}")]
    Server {
        /// The error code the server sent.
        code: String,
        /// Its message.
        message: String,
    },
}

impl WireError {
    /// The stable machine-readable code of this error.
    pub fn code(&self) -> &str {
        match self {
            Self::Malformed(_) | Self::ColumnMismatch => "INVALID_RESPONSE",
            Self::Server { code, .. } => code,
        }
    }
}

/// Writes one frame into a buffer: [`begin`](Self::begin), a
/// [`row`](Self::row) per record, then [`end`](Self::end).
#[derive(Debug)]
pub struct FrameEncoder {
    rows: u64,
}

impl FrameEncoder {
    /// Starts a frame of `data_type` whose first row is at `offset`;
    /// `columns` are included when given.
    pub fn begin(
        out: &mut Vec<u8>,
        data_type: &str,
        offset: u64,
        columns: Option<&[Column]>,
    ) -> Self {
        out.extend_from_slice(b"{\"data_type\":");
        push_json_str(out, data_type);
        out.extend_from_slice(b",\"offset\":");
        out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
        if let Some(columns) = columns {
            out.extend_from_slice(b",\"columns\":[");
            for (i, c) in columns.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"name\":");
                push_json_str(out, &c.name);
                out.extend_from_slice(b",\"kind\":\"");
                out.extend_from_slice(kind_name(c.kind).as_bytes());
                out.extend_from_slice(b"\"}");
            }
            out.push(b']');
        }
        out.extend_from_slice(b",\"rows\":[");
        Self { rows: 0 }
    }

    /// Appends one row: one cell per column, in column order.
    pub fn row(&mut self, out: &mut Vec<u8>, cells: &[Cell<'_>]) {
        if self.rows > 0 {
            out.push(b',');
        }
        out.push(b'[');
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_cell(out, c);
        }
        out.push(b']');
        self.rows += 1;
    }

    /// Rows appended so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Ends the frame with the cursor of what follows (`None`: nothing).
    pub fn end(self, out: &mut Vec<u8>, next_cursor: Option<&str>) {
        out.extend_from_slice(b"],\"next_cursor\":");
        match next_cursor {
            Some(c) => push_json_str(out, c),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }
}

/// Writes a stream line reporting a failure after the stream began.
pub fn error_line(out: &mut Vec<u8>, code: &str, message: &str) {
    out.extend_from_slice(b"{\"error\":{\"code\":");
    push_json_str(out, code);
    out.extend_from_slice(b",\"error\":");
    push_json_str(out, message);
    out.extend_from_slice(b"}}\n");
}

fn kind_name(kind: ColumnKind) -> &'static str {
    match kind {
        ColumnKind::String => "string",
        ColumnKind::Integer => "integer",
        ColumnKind::Number => "number",
        ColumnKind::Boolean => "boolean",
        ColumnKind::Datetime => "datetime",
        ColumnKind::Json => "json",
    }
}

/// One value of a decoded frame; borrows from the frame's bytes where it can.
#[derive(Debug, Clone, PartialEq)]
pub enum WireCell<'a> {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A whole number within `i64`.
    Int(i64),
    /// A whole number above `i64::MAX`.
    UInt(u64),
    /// Any other number.
    Float(f64),
    /// A string (owned only when it had escapes).
    Text(Cow<'a, str>),
    /// A nested array or object, as its JSON text.
    Json(&'a str),
}

impl WireCell<'_> {
    /// The cell for the format writers.
    pub fn as_cell(&self) -> Cell<'_> {
        match self {
            Self::Null => Cell::Null,
            Self::Bool(b) => Cell::Bool(*b),
            Self::Int(i) => Cell::Int(*i),
            Self::UInt(u) => Cell::UInt(*u),
            Self::Float(f) => Cell::Float(*f),
            Self::Text(t) => Cell::Text(t),
            Self::Json(raw) => Cell::Json(raw),
        }
    }
}

/// A decoded frame.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The data type, when the frame names it.
    pub data_type: Option<Cow<'a, str>>,
    /// Position of the first row within the data type.
    pub offset: u64,
    /// The cursor of what follows; `None` on the last frame.
    pub next_cursor: Option<Cow<'a, str>>,
    /// Whether the frame listed its columns (they matched the expected ones).
    pub had_columns: bool,
    cells: Vec<WireCell<'a>>,
    width: usize,
    row_total: usize,
}

impl<'a> Frame<'a> {
    /// Number of rows.
    pub fn row_count(&self) -> usize {
        self.row_total
    }

    /// The cells of row `i` (one per column).
    ///
    /// # Panics
    ///
    /// When `i` is not below [`row_count`](Self::row_count).
    pub fn row(&self, i: usize) -> &[WireCell<'a>] {
        &self.cells[i * self.width..(i + 1) * self.width]
    }

    /// The rows, in order.
    pub fn rows(&self) -> impl Iterator<Item = &[WireCell<'a>]> {
        let width = self.width;
        (0..self.row_total).map(move |i| &self.cells[i * width..(i + 1) * width])
    }
}

/// Decodes one frame (a page's `data`, or one line of a stream), typed by
/// `columns`: each row must have exactly one value per column.
///
/// # Errors
///
/// [`WireError::Malformed`] for anything that is not such a frame,
/// [`WireError::ColumnMismatch`] when the frame lists other columns,
/// [`WireError::Server`] for an error line.
pub fn decode_frame<'a>(bytes: &'a [u8], columns: &[Column]) -> Result<Frame<'a>, WireError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let frame = FrameSeed { columns }
        .deserialize(&mut de)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    de.end().map_err(|e| WireError::Malformed(e.to_string()))?;
    match frame {
        Decoded::Frame(f) => Ok(f),
        Decoded::Error { code, message } => Err(WireError::Server { code, message }),
        Decoded::Mismatch => Err(WireError::ColumnMismatch),
    }
}

enum Decoded<'a> {
    Frame(Frame<'a>),
    Error { code: String, message: String },
    Mismatch,
}

struct FrameSeed<'c> {
    columns: &'c [Column],
}

impl<'de> DeserializeSeed<'de> for FrameSeed<'_> {
    type Value = Decoded<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

#[derive(Deserialize)]
struct ColumnWire<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    kind: ColumnKind,
}

#[derive(Deserialize)]
struct ErrorWire {
    #[serde(default)]
    code: String,
    #[serde(default)]
    error: String,
}

impl<'de> Visitor<'de> for FrameSeed<'_> {
    type Value = Decoded<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a frame object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut frame = Frame {
            data_type: None,
            offset: 0,
            next_cursor: None,
            had_columns: false,
            cells: Vec::new(),
            width: self.columns.len(),
            row_total: 0,
        };
        let mut saw_rows = false;
        let mut saw_cursor = false;
        let mut mismatch = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "data_type" => frame.data_type = Some(map.next_value::<Cow<'de, str>>()?),
                "offset" => frame.offset = map.next_value()?,
                "next_cursor" => {
                    frame.next_cursor = map.next_value::<Option<Cow<'de, str>>>()?;
                    saw_cursor = true;
                }
                "columns" => {
                    let cols: Vec<ColumnWire<'de>> = map.next_value()?;
                    frame.had_columns = true;
                    mismatch |= cols.len() != self.columns.len()
                        || cols
                            .iter()
                            .zip(self.columns)
                            .any(|(a, b)| a.name != b.name || a.kind != b.kind);
                }
                "rows" => {
                    let (cells, rows) = map.next_value_seed(RowsSeed {
                        columns: self.columns,
                    })?;
                    frame.cells = cells;
                    frame.row_total = rows;
                    saw_rows = true;
                }
                "error" => {
                    let e: ErrorWire = map.next_value()?;
                    return Ok(Decoded::Error {
                        code: if e.code.is_empty() {
                            "SERVER_ERROR".into()
                        } else {
                            e.code
                        },
                        message: e.error,
                    });
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if mismatch {
            return Ok(Decoded::Mismatch);
        }
        if !saw_rows || !saw_cursor {
            return Err(de::Error::custom("a frame needs rows and next_cursor"));
        }
        Ok(Decoded::Frame(frame))
    }
}

struct RowsSeed<'c> {
    columns: &'c [Column],
}

impl<'de> DeserializeSeed<'de> for RowsSeed<'_> {
    type Value = (Vec<WireCell<'de>>, usize);

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowsSeed<'_> {
    type Value = (Vec<WireCell<'de>>, usize);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut cells = Vec::with_capacity(seq.size_hint().unwrap_or(0) * self.columns.len());
        let mut rows = 0;
        while seq
            .next_element_seed(RowSeed {
                columns: self.columns,
                cells: &mut cells,
            })?
            .is_some()
        {
            rows += 1;
        }
        Ok((cells, rows))
    }
}

struct RowSeed<'c, 'v, 'de> {
    columns: &'c [Column],
    cells: &'v mut Vec<WireCell<'de>>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a row of {} values", self.columns.len())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for (i, col) in self.columns.iter().enumerate() {
            let cell = if col.kind == ColumnKind::Json {
                match seq.next_element::<&'de RawValue>()? {
                    Some(raw) => Some(json_cell(raw).map_err(de::Error::custom)?),
                    None => None,
                }
            } else {
                seq.next_element_seed(ScalarSeed)?
            };
            let Some(cell) = cell else {
                return Err(de::Error::custom(format!(
                    "a row has {i} values for {} columns",
                    self.columns.len()
                )));
            };
            self.cells.push(cell);
        }
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(de::Error::custom(format!(
                "a row has more than {} values",
                self.columns.len()
            )));
        }
        Ok(())
    }
}

/// A `json` column's value: arrays and objects stay JSON text, scalars
/// become their own cells.
fn json_cell(raw: &RawValue) -> Result<WireCell<'_>, String> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'{' | b'[') => Ok(WireCell::Json(text)),
        _ => {
            let mut de = serde_json::Deserializer::from_str(text);
            ScalarSeed.deserialize(&mut de).map_err(|e| e.to_string())
        }
    }
}

struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = WireCell<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed {
    type Value = WireCell<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, number, boolean or null")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(WireCell::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(WireCell::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(WireCell::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(WireCell::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(WireCell::UInt(v), WireCell::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(WireCell::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(WireCell::Text(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(WireCell::Text(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(WireCell::Text(Cow::Owned(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> Vec<Column> {
        vec![
            Column::new("id", ColumnKind::String),
            Column::new("n", ColumnKind::Integer),
            Column::new("x", ColumnKind::Number),
            Column::new("ok", ColumnKind::Boolean),
            Column::new("at", ColumnKind::Datetime),
            Column::new("tags", ColumnKind::Json),
        ]
    }

    #[test]
    fn frames_round_trip_every_kind() {
        let cols = columns();
        let tags = r#"["a","b,c",{"d":1}]"#;
        let rows: Vec<Vec<Cell<'_>>> = vec![
            vec![
                Cell::Text("say \"hi\"\n"),
                Cell::Int(-5),
                Cell::Float(0.1),
                Cell::Bool(true),
                Cell::Text("2025-10-24T19:50:00.000Z"),
                Cell::Json(tags),
            ],
            vec![
                Cell::Null,
                Cell::UInt(u64::MAX),
                Cell::Float(1.0),
                Cell::Bool(false),
                Cell::Null,
                Cell::Text("a scalar in a json column"),
            ],
        ];
        let mut line = Vec::new();
        let mut enc = FrameEncoder::begin(&mut line, "t", 7, Some(&cols));
        for r in &rows {
            enc.row(&mut line, r);
        }
        enc.end(&mut line, Some("next"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["rows"][0][5], serde_json::json!(["a", "b,c", {"d": 1}]));
        let f = decode_frame(&line, &cols).unwrap();
        assert_eq!(f.offset, 7);
        assert_eq!(f.next_cursor.as_deref(), Some("next"));
        assert!(f.had_columns);
        assert_eq!(f.row_count(), 2);
        for (got, want) in f.rows().zip(&rows) {
            let got: Vec<Cell<'_>> = got.iter().map(WireCell::as_cell).collect();
            assert_eq!(&got, want);
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        let cols = columns();
        for bad in [
            "",
            "[]",
            r#"{"rows":[]}"#,
            r#"{"rows":[["a",1,1,true,null]],"next_cursor":null}"#,
            r#"{"rows":[["a",1,1,true,null,null,7]],"next_cursor":null}"#,
            r#"{"rows":[[{"a":1},1,1,true,null,null]],"next_cursor":null}"#,
            r#"{"rows":[],"next_cursor":null} trailing"#,
        ] {
            assert!(
                matches!(
                    decode_frame(bad.as_bytes(), &cols),
                    Err(WireError::Malformed(_))
                ),
                "{bad}"
            );
        }
        let other = r#"{"columns":[{"name":"id","kind":"integer"}],"rows":[],"next_cursor":null}"#;
        assert_eq!(
            decode_frame(other.as_bytes(), &cols).unwrap_err(),
            WireError::ColumnMismatch
        );
        let mut line = Vec::new();
        error_line(&mut line, "INTERNAL_ERROR", "boom");
        assert_eq!(
            decode_frame(line.trim_ascii_end(), &cols)
                .unwrap_err()
                .code(),
            "INTERNAL_ERROR"
        );
    }
}
