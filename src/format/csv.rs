//! The seed's flattened CSV layout: `data_type` first, then the union of all
//! data types' columns in manifest order; RFC 4180 quoting (a field is quoted
//! when it holds a comma, a quote, CR or LF, exactly as `csv_core`, the
//! engine of the `csv` crate, decides) with CRLF line ends. Rows are written straight
//! into the output, cell by cell.

use serde_json::Value;

use super::{
    needs_neutralizing, push_float, Backend, Cell, FormatError, FormatOptions, TypeLayout,
};
use crate::model::Record;

pub(crate) struct CsvBackend {
    options: FormatOptions,
    /// For each data type: for each header column after `data_type`, the
    /// type's column that fills it (`None`: left empty).
    slots: Vec<Vec<Option<usize>>>,
    /// Each data type's name as a quoted-if-needed field.
    type_fields: Vec<Vec<u8>>,
    scratch: Vec<u8>,
}

impl CsvBackend {
    pub(crate) fn new(options: &FormatOptions) -> Self {
        Self {
            options: options.clone(),
            slots: Vec::new(),
            type_fields: Vec::new(),
            scratch: Vec::new(),
        }
    }
}

/// Bytes that make a field quoted: the `csv` crate's `QuoteStyle::Necessary`
/// with a CRLF terminator (checked against `csv_core` in the tests).
const SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b',' as usize] = true;
    t[b'"' as usize] = true;
    t[b'\r' as usize] = true;
    t[b'\n' as usize] = true;
    t
};

/// Appends `field`, quoted (quotes doubled) when it must be.
fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    if !field.iter().any(|&b| SPECIAL[b as usize]) {
        out.extend_from_slice(field);
        return;
    }
    out.reserve(field.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in field.iter().enumerate() {
        if b == b'"' {
            out.extend_from_slice(&field[start..=i]);
            out.push(b'"');
            start = i + 1;
        }
    }
    out.extend_from_slice(&field[start..]);
    out.push(b'"');
}

impl CsvBackend {
    fn push_cell(&mut self, out: &mut Vec<u8>, cell: &Cell<'_>) {
        match cell {
            Cell::Null => {}
            Cell::Bool(true) => out.extend_from_slice(b"true"),
            Cell::Bool(false) => out.extend_from_slice(b"false"),
            Cell::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
            Cell::UInt(u) => out.extend_from_slice(itoa::Buffer::new().format(*u).as_bytes()),
            Cell::Float(f) if f.is_finite() => push_float(out, *f),
            Cell::Float(_) => {}
            Cell::Text(s) => {
                if self.options.neutralize_formulas && needs_neutralizing(s) {
                    self.scratch.clear();
                    self.scratch.push(b'\'');
                    self.scratch.extend_from_slice(s.as_bytes());
                    push_field(out, &self.scratch);
                } else {
                    push_field(out, s.as_bytes());
                }
            }
            Cell::Json(raw) => push_field(out, raw.as_bytes()),
            Cell::Value(v) => match v {
                Value::Array(_) | Value::Object(_) => {
                    self.scratch.clear();
                    // Writing a value into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut self.scratch, v);
                    push_field(out, &self.scratch);
                }
                scalar => {
                    let c = Cell::from_value(scalar);
                    self.push_cell(out, &c);
                }
            },
        }
    }
}

impl Backend for CsvBackend {
    fn begin(&mut self, layouts: &[TypeLayout], out: &mut Vec<u8>) -> Result<(), FormatError> {
        let mut header: Vec<String> = Vec::new();
        let mut positions = Vec::with_capacity(layouts.len());
        for layout in layouts {
            let mut pos = Vec::with_capacity(layout.columns.len());
            for c in &layout.columns {
                let p = match header.iter().position(|h| *h == c.name) {
                    Some(p) => p,
                    None => {
                        header.push(c.name.clone());
                        header.len() - 1
                    }
                };
                pos.push(p);
            }
            positions.push(pos);
        }
        for (layout, pos) in layouts.iter().zip(&positions) {
            let mut slots = vec![None; header.len()];
            for (c, &p) in pos.iter().enumerate() {
                slots[p] = Some(c);
            }
            self.slots.push(slots);
            let mut field = Vec::new();
            push_field(&mut field, layout.data_type.as_bytes());
            self.type_fields.push(field);
        }
        if self.options.csv_bom {
            out.extend_from_slice("\u{feff}".as_bytes());
        }
        push_field(out, b"data_type");
        for h in &header {
            out.push(b',');
            // Header cells are neutralised like data cells: a column name
            // comes from the operator's config or the app's records.
            let cell = Cell::Text(h);
            self.push_cell(out, &cell);
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    fn open_type(
        &mut self,
        _t: usize,
        _layout: &TypeLayout,
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        Ok(())
    }

    fn row(
        &mut self,
        t: usize,
        _layout: &TypeLayout,
        cells: &[Cell<'_>],
        _record: Option<&Record>,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        out.extend_from_slice(&self.type_fields[t]);
        for s in 0..self.slots[t].len() {
            out.push(b',');
            if let Some(c) = self.slots[t][s] {
                self.push_cell(out, &cells[c]);
            }
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    fn close_type(
        &mut self,
        _t: usize,
        _layout: &TypeLayout,
        _count: u64,
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        Ok(())
    }

    fn finish(
        &mut self,
        _layouts: &[TypeLayout],
        _counts: &[u64],
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_bytes_are_csv_cores() {
        let core = csv_core::WriterBuilder::new()
            .terminator(csv_core::Terminator::CRLF)
            .quote_style(csv_core::QuoteStyle::Necessary)
            .build();
        for b in 0..=255u8 {
            assert_eq!(SPECIAL[b as usize], core.should_quote(&[b]), "byte {b}");
        }
    }

    #[test]
    fn quoting_matches_the_csv_crate() {
        let fields = [
            "",
            "plain",
            "a,b",
            "say \"hi\"",
            "line\nbreak",
            "cr\r",
            " spaced ",
            "#hash",
            "'quote",
            "é",
            "\"",
            ",",
        ];
        let mut ours = Vec::new();
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                ours.push(b',');
            }
            push_field(&mut ours, f.as_bytes());
        }
        ours.extend_from_slice(b"\r\n");
        let mut theirs = ::csv::WriterBuilder::new()
            .terminator(::csv::Terminator::CRLF)
            .quote_style(::csv::QuoteStyle::Necessary)
            .from_writer(Vec::new());
        theirs.write_record(fields).unwrap();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(theirs.into_inner().unwrap()).unwrap()
        );
    }
}
