//! The seed's flattened CSV layout: `data_type` first, then the union of all
//! data types' columns in manifest order; RFC 4180 quoting with CRLF.

use serde_json::Value;

use super::{neutralize, Backend, FormatError, FormatOptions, TypeLayout};
use crate::model::Record;

pub(crate) struct CsvBackend {
    options: FormatOptions,
    /// Rebuilt after every call so its bytes can be handed out page by page.
    writer: ::csv::Writer<Vec<u8>>,
    /// For each data type, the header position of each of its columns.
    positions: Vec<Vec<usize>>,
    row: Vec<String>,
}

impl CsvBackend {
    pub(crate) fn new(options: &FormatOptions) -> Self {
        Self {
            options: options.clone(),
            writer: new_writer(),
            positions: Vec::new(),
            row: Vec::new(),
        }
    }

    fn write_row(&mut self) -> Result<(), FormatError> {
        // Writing into memory only fails on a broken invariant.
        self.writer
            .write_record(&self.row)
            .map_err(|_| FormatError::State("CSV write to memory failed"))
    }
}

impl Backend for CsvBackend {
    fn begin(&mut self, layouts: &[TypeLayout], out: &mut Vec<u8>) -> Result<(), FormatError> {
        let mut header: Vec<String> = vec!["data_type".to_string()];
        for layout in layouts {
            let mut pos = Vec::with_capacity(layout.columns.len());
            for c in &layout.columns {
                let p = match header[1..].iter().position(|h| *h == c.name) {
                    Some(p) => p + 1,
                    None => {
                        header.push(c.name.clone());
                        header.len() - 1
                    }
                };
                pos.push(p);
            }
            self.positions.push(pos);
        }
        if self.options.csv_bom {
            out.extend_from_slice("\u{feff}".as_bytes());
        }
        self.row = header;
        self.write_row()
    }

    fn open_type(
        &mut self,
        _t: usize,
        _layout: &TypeLayout,
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        Ok(())
    }

    fn record(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        cells: &[Option<&Value>],
        _record: &Record,
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        for cell in self.row.iter_mut() {
            cell.clear();
        }
        self.row[0].push_str(&layout.data_type);
        for (cell, &p) in cells.iter().zip(&self.positions[t]) {
            let target = &mut self.row[p];
            match cell {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => {
                    match self
                        .options
                        .neutralize_formulas
                        .then(|| neutralize(s))
                        .flatten()
                    {
                        Some(n) => target.push_str(&n),
                        None => target.push_str(s),
                    }
                }
                Some(Value::Bool(b)) => target.push_str(if *b { "true" } else { "false" }),
                Some(Value::Number(n)) => target.push_str(&n.to_string()),
                Some(v @ (Value::Array(_) | Value::Object(_))) => target.push_str(&v.to_string()),
            }
        }
        self.write_row()
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

    fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let writer = std::mem::replace(&mut self.writer, new_writer());
        let bytes = writer
            .into_inner()
            .map_err(|_| FormatError::State("CSV flush to memory failed"))?;
        out.extend_from_slice(&bytes);
        Ok(())
    }
}

fn new_writer() -> ::csv::Writer<Vec<u8>> {
    ::csv::WriterBuilder::new()
        .terminator(::csv::Terminator::CRLF)
        .quote_style(::csv::QuoteStyle::Necessary)
        .from_writer(Vec::new())
}
