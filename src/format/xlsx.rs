//! Excel workbook: a Summary sheet, then one sheet per data type with a bold
//! frozen header, autofilter, bounded-cost column widths, typed cells and
//! UTC date-times. Sheets roll over at Excel's row limit; values longer than
//! a cell can hold are carried whole in a "Long values" sheet.

use std::collections::HashSet;

use rust_xlsxwriter::{DocProperties, ExcelDateTime, Format, Workbook, Worksheet};
use serde_json::Value;
use time::OffsetDateTime;

use super::{neutralize, Backend, Cell, FormatError, FormatOptions, TypeLayout};
use crate::model::{parse_timestamp, ColumnKind, ExportInfo, Record, EXPORT_VERSION};

/// Rows per sheet, header included (Excel's hard limit).
pub(crate) const EXCEL_MAX_ROWS: u32 = 1_048_576;
/// Characters (UTF-16 units) a cell can hold.
pub(crate) const EXCEL_MAX_CELL_CHARS: usize = 32_767;
/// Chunk size for long values in the "Long values" sheet.
const LONG_VALUE_CHUNK: usize = 32_000;
/// Column widths are measured over this many rows per sheet, so their cost
/// stays bounded on million-row sheets.
const WIDTH_SAMPLE_ROWS: u32 = 1_000;
/// Integers beyond ±2^53 lose digits as Excel numbers; they are written as text.
const MAX_EXACT_INTEGER: i128 = 1 << 53;

const SUMMARY_SHEET: &str = "Summary";
const LONG_VALUES_SHEET: &str = "Long values";

struct LongValue {
    sheet: String,
    cell: String,
    text: String,
}

pub(crate) struct XlsxBackend {
    workbook: Workbook,
    info: ExportInfo,
    options: FormatOptions,
    bold: Format,
    datetime: Format,
    /// Names used so far (lower-cased: Excel compares case-insensitively).
    used_names: HashSet<String>,
    /// Sheet names of each data type (more than one after a rollover).
    type_sheets: Vec<Vec<String>>,
    /// State of the data sheet being written.
    sheet: usize,
    row: u32,
    widths: Vec<usize>,
    long_values: Vec<LongValue>,
    /// Data sheets go through rust_xlsxwriter's constant-memory mode, and
    /// the workbook is assembled in this file (native only).
    #[cfg(not(target_arch = "wasm32"))]
    assembled: Option<Assembled>,
}

/// A workbook saved to a temporary file, handed out in pieces.
#[cfg(not(target_arch = "wasm32"))]
struct Assembled {
    constant_memory: bool,
    file: Option<std::io::BufReader<std::fs::File>>,
    tempdir: std::path::PathBuf,
}

/// Pieces of an assembled workbook handed out per call.
#[cfg(not(target_arch = "wasm32"))]
const TAIL_PIECE: usize = 1 << 20;

impl XlsxBackend {
    pub(crate) fn new(info: &ExportInfo, options: &FormatOptions) -> Result<Self, FormatError> {
        let mut workbook = Workbook::new();
        let created = excel_datetime(info.generated_at)?;
        workbook.set_properties(
            &DocProperties::new()
                .set_title("Data export")
                .set_comment(format!("handover export {}", info.request_id))
                .set_creation_datetime(&created),
        );
        let mut used_names = HashSet::new();
        used_names.insert(SUMMARY_SHEET.to_lowercase());
        used_names.insert(LONG_VALUES_SHEET.to_lowercase());
        used_names.insert("history".to_string()); // reserved by Excel
        Ok(Self {
            workbook,
            info: info.clone(),
            options: options.clone(),
            bold: Format::new().set_bold(),
            datetime: Format::new().set_num_format("yyyy-mm-dd hh:mm:ss"),
            used_names,
            type_sheets: Vec::new(),
            sheet: 0,
            row: 0,
            widths: Vec::new(),
            long_values: Vec::new(),
            #[cfg(not(target_arch = "wasm32"))]
            assembled: None,
        })
    }

    /// A writer whose data sheets use rust_xlsxwriter's constant-memory
    /// mode, with temporary files in `tempdir`.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn constant_memory(
        info: &ExportInfo,
        options: &FormatOptions,
        tempdir: &std::path::Path,
    ) -> Result<Self, FormatError> {
        let mut this = Self::new(info, options)?;
        this.workbook.set_tempdir(tempdir)?;
        // Deflate at level 6 took a third of a million-row build; level 1
        // makes the file about a fifth larger for less than half the time.
        this.workbook.set_zip_compression_level(3);
        this.assembled = Some(Assembled {
            constant_memory: true,
            file: None,
            tempdir: tempdir.to_path_buf(),
        });
        Ok(this)
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn uses_constant_memory(&self) -> bool {
        self.assembled.as_ref().is_some_and(|a| a.constant_memory)
    }

    fn new_data_worksheet(&mut self) -> Result<&mut Worksheet, FormatError> {
        #[cfg(not(target_arch = "wasm32"))]
        if self.uses_constant_memory() {
            return Ok(self.workbook.add_worksheet_with_constant_memory()?);
        }
        Ok(self.workbook.add_worksheet())
    }

    /// A valid, unique sheet name from `base` plus an optional suffix.
    fn sheet_name(&mut self, base: &str, suffix: &str) -> String {
        let clean: String = base
            .chars()
            .map(|c| {
                if matches!(c, '[' | ']' | ':' | '*' | '?' | '/' | '\\') {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let clean = clean.trim_matches('\'');
        let clean = if clean.is_empty() { "Sheet" } else { clean };
        for n in 1.. {
            let extra = if n == 1 {
                suffix.to_string()
            } else {
                format!("{suffix}~{n}")
            };
            let room = 31 - extra.chars().count();
            let name: String = clean.chars().take(room).collect::<String>() + &extra;
            if self.used_names.insert(name.to_lowercase()) {
                return name;
            }
        }
        unreachable!("an unbounded loop always finds a free name")
    }

    fn add_data_sheet(&mut self, t: usize, layout: &TypeLayout) -> Result<(), FormatError> {
        let part = self.type_sheets[t].len() + 1;
        let suffix = if part == 1 {
            String::new()
        } else {
            format!(" ({part})")
        };
        let name = self.sheet_name(&layout.data_type, &suffix);
        self.type_sheets[t].push(name.clone());
        let bold = self.bold.clone();
        let neutralise = self.options.neutralize_formulas;
        let ws = self.new_data_worksheet()?;
        ws.set_name(&name)?;
        for (c, col) in layout.columns.iter().enumerate() {
            // Header cells are neutralised like data cells (a column name
            // comes from the operator's config or the app's records).
            let header = match neutralise.then(|| neutralize(&col.name)).flatten() {
                Some(n) => n,
                None => col.name.clone(),
            };
            ws.write_string_with_format(0, col_num(c)?, &header, &bold)?;
        }
        ws.set_freeze_panes(1, 0)?;
        self.sheet = self.workbook.worksheets().len() - 1;
        self.row = 0;
        self.widths = layout
            .columns
            .iter()
            .map(|c| match c.kind {
                ColumnKind::Datetime => c.name.chars().count().max(19),
                _ => c.name.chars().count(),
            })
            .collect();
        Ok(())
    }

    fn close_data_sheet(&mut self, layout: &TypeLayout) -> Result<(), FormatError> {
        let ws = self.workbook.worksheet_from_index(self.sheet)?;
        let last_col = col_num(layout.columns.len().max(1) - 1)?;
        ws.autofilter(0, 0, self.row, last_col)?;
        for (c, w) in self.widths.iter().enumerate() {
            ws.set_column_width(col_num(c)?, (*w as f64 + 2.0).clamp(8.0, 60.0))?;
        }
        Ok(())
    }

    fn write_summary(&mut self, layouts: &[TypeLayout], counts: &[u64]) -> Result<(), FormatError> {
        let bold = self.bold.clone();
        let datetime = self.datetime.clone();
        let generated = excel_datetime(self.info.generated_at)?;
        let ws = self.workbook.worksheet_from_index(0)?;
        ws.write_string_with_format(0, 0, "Data export", &bold)?;
        let mut r = 2;
        let pair = |ws: &mut Worksheet, r: &mut u32, k: &str, v: &str| -> Result<(), FormatError> {
            ws.write_string_with_format(*r, 0, k, &bold)?;
            ws.write_string(*r, 1, v)?;
            *r += 1;
            Ok(())
        };
        pair(ws, &mut r, "Request ID", &self.info.request_id)?;
        ws.write_string_with_format(r, 0, "Generated at (UTC)", &bold)?;
        ws.write_datetime_with_format(r, 1, &generated, &datetime)?;
        r += 1;
        if let Some(user) = &self.info.user_id {
            pair(ws, &mut r, "User", user)?;
        }
        let range = self.info.date_range.clone().unwrap_or_default();
        pair(
            ws,
            &mut r,
            "Date range start",
            range.start.as_deref().unwrap_or("(all)"),
        )?;
        pair(
            ws,
            &mut r,
            "Date range end",
            range.end.as_deref().unwrap_or("(all)"),
        )?;
        pair(ws, &mut r, "Export version", EXPORT_VERSION)?;
        r += 1;
        ws.write_string_with_format(r, 0, "Data type", &bold)?;
        ws.write_string_with_format(r, 1, "Records", &bold)?;
        ws.write_string_with_format(r, 2, "Sheets", &bold)?;
        r += 1;
        for (t, layout) in layouts.iter().enumerate() {
            ws.write_string(r, 0, &layout.data_type)?;
            ws.write_number(r, 1, counts[t] as f64)?;
            ws.write_string(r, 2, self.type_sheets[t].join(", "))?;
            r += 1;
        }
        ws.write_string_with_format(r, 0, "Total", &bold)?;
        ws.write_number_with_format(r, 1, counts.iter().sum::<u64>() as f64, &bold)?;
        r += 1;
        if let Some(a15) = &self.info.article_15 {
            r += 1;
            ws.write_string_with_format(r, 0, "About this data (GDPR Art. 15)", &bold)?;
            r += 1;
            for (k, v) in a15 {
                pair(ws, &mut r, k, v)?;
            }
        }
        if !self.long_values.is_empty() {
            r += 1;
            pair(
                ws,
                &mut r,
                "Note",
                "Values longer than an Excel cell holds are kept whole in the sheet \"Long values\".",
            )?;
        }
        ws.set_column_width(0, 30)?;
        ws.set_column_width(1, 40)?;
        ws.set_column_width(2, 30)?;
        Ok(())
    }

    fn write_long_values(&mut self) -> Result<(), FormatError> {
        if self.long_values.is_empty() {
            return Ok(());
        }
        let bold = self.bold.clone();
        let ws = self.workbook.add_worksheet();
        ws.set_name(LONG_VALUES_SHEET)?;
        for (c, h) in ["Sheet", "Cell", "Part", "Text"].iter().enumerate() {
            ws.write_string_with_format(0, c as u16, *h, &bold)?;
        }
        ws.set_freeze_panes(1, 0)?;
        let mut r = 1;
        for lv in &self.long_values {
            for (part, chunk) in chunks(&lv.text, LONG_VALUE_CHUNK).into_iter().enumerate() {
                ws.write_string(r, 0, &lv.sheet)?;
                ws.write_string(r, 1, &lv.cell)?;
                ws.write_number(r, 2, (part + 1) as f64)?;
                ws.write_string(r, 3, chunk)?;
                r += 1;
            }
        }
        ws.set_column_width(0, 20)?;
        ws.set_column_width(3, 100)?;
        Ok(())
    }

    /// Writes text, neutralised, or a pointer to the Long values sheet when
    /// the text does not fit a cell.
    fn write_text(
        &mut self,
        row: u32,
        col: u16,
        text: &str,
        neutralise: bool,
    ) -> Result<usize, FormatError> {
        let owned;
        let text = match neutralise.then(|| neutralize(text)).flatten() {
            Some(n) => {
                owned = n;
                owned.as_str()
            }
            None => text,
        };
        let ws = self.workbook.worksheet_from_index(self.sheet)?;
        if text.len() > EXCEL_MAX_CELL_CHARS && text.encode_utf16().count() > EXCEL_MAX_CELL_CHARS {
            let sheet = ws.name();
            let cell = format!("{}{}", col_letters(col), row + 1);
            let pointer = format!(
                "[{} characters: the full value is in sheet \"{LONG_VALUES_SHEET}\" under {sheet}!{cell}]",
                text.chars().count()
            );
            ws.write_string(row, col, &pointer)?;
            self.long_values.push(LongValue {
                sheet,
                cell,
                text: text.to_string(),
            });
            return Ok(40);
        }
        ws.write_string(row, col, text)?;
        Ok(if row <= WIDTH_SAMPLE_ROWS {
            text.chars().count()
        } else {
            0
        })
    }
}

impl XlsxBackend {
    /// Writes one cell; returns the width it needs (0 past the sampled rows).
    fn write_cell(
        &mut self,
        row: u32,
        col: u16,
        cell: &Cell<'_>,
        datetime: bool,
    ) -> Result<usize, FormatError> {
        let neutralise = self.options.neutralize_formulas;
        Ok(match cell {
            Cell::Null => 0,
            Cell::Float(f) if !f.is_finite() => 0,
            Cell::Bool(b) => {
                self.workbook
                    .worksheet_from_index(self.sheet)?
                    .write_boolean(row, col, *b)?;
                5
            }
            Cell::Int(i) if i128::from(*i).abs() > MAX_EXACT_INTEGER => {
                self.write_text(row, col, itoa::Buffer::new().format(*i), false)?
            }
            Cell::UInt(u) => self.write_text(row, col, itoa::Buffer::new().format(*u), false)?,
            Cell::Int(i) => {
                self.workbook
                    .worksheet_from_index(self.sheet)?
                    .write_number(row, col, *i as f64)?;
                itoa::Buffer::new().format(*i).len()
            }
            Cell::Float(f) => {
                self.workbook
                    .worksheet_from_index(self.sheet)?
                    .write_number(row, col, *f)?;
                let mut text = Vec::new();
                super::push_float(&mut text, *f);
                text.len()
            }
            Cell::Text(s) if datetime => {
                // The writer has checked that this parses.
                match parse_timestamp(s).map(excel_datetime) {
                    Some(Ok(dt)) => {
                        let fmt = self.datetime.clone();
                        self.workbook
                            .worksheet_from_index(self.sheet)?
                            .write_datetime_with_format(row, col, &dt, &fmt)?;
                        19
                    }
                    // Outside Excel's 1900–9999 range: keep the text.
                    _ => self.write_text(row, col, s, neutralise)?,
                }
            }
            Cell::Text(s) => self.write_text(row, col, s, neutralise)?,
            Cell::Json(raw) => self.write_text(row, col, raw, false)?,
            Cell::Value(v @ (Value::Array(_) | Value::Object(_))) => {
                self.write_text(row, col, &v.to_string(), false)?
            }
            Cell::Value(scalar) => {
                let c = Cell::from_value(scalar);
                self.write_cell(row, col, &c, datetime)?
            }
        })
    }
}

impl Backend for XlsxBackend {
    fn begin(&mut self, layouts: &[TypeLayout], _out: &mut Vec<u8>) -> Result<(), FormatError> {
        self.workbook.add_worksheet().set_name(SUMMARY_SHEET)?;
        self.type_sheets = vec![Vec::new(); layouts.len()];
        Ok(())
    }

    fn open_type(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        self.add_data_sheet(t, layout)
    }

    fn row(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        cells: &[Cell<'_>],
        _record: Option<&Record>,
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if self.row + 1 >= EXCEL_MAX_ROWS {
            self.close_data_sheet(layout)?;
            self.add_data_sheet(t, layout)?;
        }
        self.row += 1;
        let row = self.row;
        for (c, cell) in cells.iter().enumerate() {
            let col = col_num(c)?;
            let datetime = layout.columns[c].kind == ColumnKind::Datetime;
            let width = self.write_cell(row, col, cell, datetime)?;
            if row <= WIDTH_SAMPLE_ROWS && width > self.widths[c] {
                self.widths[c] = width;
            }
        }
        Ok(())
    }

    fn close_type(
        &mut self,
        _t: usize,
        layout: &TypeLayout,
        _count: u64,
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        self.close_data_sheet(layout)
    }

    fn finish(
        &mut self,
        layouts: &[TypeLayout],
        counts: &[u64],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        self.write_summary(layouts, counts)?;
        self.write_long_values()?;
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(assembled) = &mut self.assembled {
            // Saved to a temporary file and handed out by `tail`, so the
            // workbook never sits in memory whole.
            let file = tempfile::tempfile_in(&assembled.tempdir)
                .map_err(|e| FormatError::Xlsx(format!("temporary file: {e}")))?;
            let mut writer = std::io::BufWriter::new(file);
            self.workbook.save_to_writer(&mut writer)?;
            let mut file = writer
                .into_inner()
                .map_err(|e| FormatError::Xlsx(format!("temporary file: {e}")))?;
            std::io::Seek::rewind(&mut file)
                .map_err(|e| FormatError::Xlsx(format!("temporary file: {e}")))?;
            assembled.file = Some(std::io::BufReader::new(file));
            return Ok(());
        }
        out.extend(self.workbook.save_to_buffer()?);
        Ok(())
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn tail(&mut self) -> Result<Option<Vec<u8>>, FormatError> {
        use std::io::Read as _;
        let Some(file) = self.assembled.as_mut().and_then(|a| a.file.as_mut()) else {
            return Ok(None);
        };
        let mut piece = Vec::with_capacity(TAIL_PIECE);
        file.by_ref()
            .take(TAIL_PIECE as u64)
            .read_to_end(&mut piece)
            .map_err(|e| FormatError::Xlsx(format!("reading the assembled workbook: {e}")))?;
        if piece.is_empty() {
            if let Some(a) = self.assembled.as_mut() {
                a.file = None;
            }
            return Ok(None);
        }
        Ok(Some(piece))
    }
}

fn col_num(c: usize) -> Result<u16, FormatError> {
    u16::try_from(c)
        .ok()
        .filter(|&c| c < 16_384)
        .ok_or(FormatError::Xlsx(format!(
            "too many columns ({c}) for one Excel sheet"
        )))
}

fn col_letters(mut col: u16) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'A' + (col % 26) as u8);
        if col < 26 {
            break;
        }
        col = col / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// An Excel date-time for `t` in UTC (Excel has no time zones; the sheet
/// shows what the export states: UTC).
fn excel_datetime(t: OffsetDateTime) -> Result<ExcelDateTime, FormatError> {
    let t = t.to_offset(time::UtcOffset::UTC);
    let year = u16::try_from(t.year())
        .map_err(|_| FormatError::Xlsx(format!("year {} outside Excel's range", t.year())))?;
    let seconds = f64::from(t.second()) + f64::from(t.millisecond()) / 1000.0;
    Ok(
        ExcelDateTime::from_ymd(year, u8::from(t.month()), t.day())?.and_hms(
            u16::from(t.hour()),
            t.minute(),
            seconds,
        )?,
    )
}

/// Splits `s` into pieces of at most `n` UTF-16 units, on char boundaries.
fn chunks(s: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut units = 0;
    for (i, c) in s.char_indices() {
        if units + c.len_utf16() > n {
            out.push(&s[start..i]);
            start = i;
            units = 0;
        }
        units += c.len_utf16();
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_letters() {
        assert_eq!(col_letters(0), "A");
        assert_eq!(col_letters(25), "Z");
        assert_eq!(col_letters(26), "AA");
        assert_eq!(col_letters(701), "ZZ");
        assert_eq!(col_letters(702), "AAA");
    }

    #[test]
    fn chunks_respect_utf16_units_and_char_boundaries() {
        let s = "ab😀cd";
        assert_eq!(chunks(s, 3), ["ab", "😀c", "d"]);
        assert_eq!(chunks("", 3), [""]);
    }
}
