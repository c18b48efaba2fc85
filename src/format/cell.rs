//! One value of a row, borrowed from wherever the row lives: a database row
//! on the server, a decoded page in the browser, or a record an app holds.
//! The writers present a cell by the kind of its column, so no generic value
//! tree is built per cell on the way from the database to the file.

use serde_json::Value;

/// One value of a row.
///
/// ```
/// use handover::format::Cell;
/// let v = serde_json::json!(2999);
/// assert_eq!(Cell::from_value(&v), Cell::Int(2999));
/// assert_eq!(Cell::from_value(&serde_json::Value::Null), Cell::Null);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    /// No value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A whole number that fits an `i64`.
    Int(i64),
    /// A whole number above `i64::MAX`.
    UInt(u64),
    /// A floating-point number; non-finite values are written as null.
    Float(f64),
    /// Text (also timestamps, checked and converted by the writers in
    /// datetime columns).
    Text(&'a str),
    /// Compact JSON text of an array or object (a `json` column).
    Json(&'a str),
    /// A nested JSON array or object held as a value (records an app holds).
    Value(&'a Value),
}

impl<'a> Cell<'a> {
    /// The cell for a JSON value: scalars become their own variants, arrays
    /// and objects stay [`Cell::Value`].
    pub fn from_value(v: &'a Value) -> Self {
        match v {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Self::Int(i)
                } else if let Some(u) = n.as_u64() {
                    Self::UInt(u)
                } else {
                    Self::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => Self::Text(s),
            Value::Array(_) | Value::Object(_) => Self::Value(v),
        }
    }

    /// Whether this is [`Cell::Null`] (or a non-finite float, written as null).
    pub fn is_null(&self) -> bool {
        match self {
            Self::Null => true,
            Self::Float(f) => !f.is_finite(),
            _ => false,
        }
    }

    /// A short description for error messages.
    pub(crate) fn describe(&self) -> String {
        let mut s = match self {
            Self::Null => "null".to_string(),
            Self::Bool(b) => b.to_string(),
            Self::Int(i) => i.to_string(),
            Self::UInt(u) => u.to_string(),
            Self::Float(f) => f.to_string(),
            Self::Text(t) | Self::Json(t) => (*t).to_string(),
            Self::Value(v) => v.to_string(),
        };
        if s.len() > 64 {
            let cut = (0..=64).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
            s.truncate(cut);
            s.push('…');
        }
        s
    }
}

/// Appends the JSON text of `cell` (numbers as JSON numbers, text escaped,
/// JSON cells as they are).
pub(crate) fn push_json_cell(out: &mut Vec<u8>, cell: &Cell<'_>) {
    match cell {
        Cell::Null => out.extend_from_slice(b"null"),
        Cell::Bool(true) => out.extend_from_slice(b"true"),
        Cell::Bool(false) => out.extend_from_slice(b"false"),
        Cell::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        Cell::UInt(u) => out.extend_from_slice(itoa::Buffer::new().format(*u).as_bytes()),
        Cell::Float(f) => push_float(out, *f),
        Cell::Text(s) => push_json_str(out, s),
        Cell::Json(raw) => out.extend_from_slice(raw.as_bytes()),
        Cell::Value(v) => {
            // Writing a value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, v);
        }
    }
}

/// A float exactly as `serde_json` writes it (`1.0`, `2.5e-7`); null when
/// not finite.
pub(crate) fn push_float(out: &mut Vec<u8>, f: f64) {
    // Writing a float into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &f);
}

/// Appends `s` as a JSON string, escaped exactly as `serde_json` does.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_like_serde_json() {
        for s in [
            "plain",
            "quote \" and \\ backslash",
            "line\nbreak\r\ttab",
            "\u{0}\u{1}\u{1f}\u{7f}",
            "é 😀 \u{2028}",
            "",
        ] {
            let mut out = Vec::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn numbers_are_written_like_serde_json() {
        for v in [
            serde_json::json!(0),
            serde_json::json!(-12),
            serde_json::json!(u64::MAX),
            serde_json::json!(1.0),
            serde_json::json!(2.5e-7),
            serde_json::json!(1e300),
        ] {
            let mut out = Vec::new();
            push_json_cell(&mut out, &Cell::from_value(&v));
            assert_eq!(out, serde_json::to_vec(&v).unwrap(), "{v}");
        }
        let mut out = Vec::new();
        push_json_cell(&mut out, &Cell::Float(f64::NAN));
        assert_eq!(out, b"null");
    }
}
