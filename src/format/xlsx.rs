//! Excel workbooks: a Summary sheet, then one sheet per data type with a
//! bold frozen header, autofilter, bounded-cost column widths, typed cells
//! and UTC date-times. Sheets roll over at Excel's row limit; values longer
//! than a cell can hold are carried whole in a "Long values" sheet.
//!
//! Two writers share these rules. [`StreamingXlsx`] (every target, the
//! default) streams each data sheet's rows into the zip as they arrive,
//! deflating as it goes, and has rust_xlsxwriter author the rest of the
//! workbook (Summary, styles, Long values, the workbook's sheet list and
//! filter names, document properties) at the end: memory stays flat with no
//! filesystem, as in the browser. `ConstantMemoryXlsx` (native only, server
//! builds) is rust_xlsxwriter's own constant-memory mode.

mod sheet;
mod stream;
#[cfg(not(target_arch = "wasm32"))]
mod workbook;
mod zip;

use std::borrow::Cow;
use std::collections::HashSet;

use rust_xlsxwriter::{DocProperties, ExcelDateTime, Format, Workbook, Worksheet};
use serde_json::Value;
use time::OffsetDateTime;

pub(crate) use stream::StreamingXlsx;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use workbook::ConstantMemoryXlsx;
pub use zip::ZipAssembler;

use super::{needs_neutralizing, Cell, FormatError, TypeLayout};
use crate::model::{parse_timestamp, ColumnKind, ExportInfo, EXPORT_VERSION};

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
/// Number format of date-time cells.
const DATETIME_FORMAT: &str = "yyyy-mm-dd hh:mm:ss";

/// A value too long for a cell, kept whole in the "Long values" sheet.
#[derive(Debug)]
struct LongValue {
    sheet: String,
    cell: String,
    text: String,
}

/// Sheet names handed out so far (Excel compares them case-insensitively).
#[derive(Debug)]
struct SheetNames(HashSet<String>);

impl SheetNames {
    fn new() -> Self {
        let mut used = HashSet::new();
        used.insert(SUMMARY_SHEET.to_lowercase());
        used.insert(LONG_VALUES_SHEET.to_lowercase());
        used.insert("history".to_string()); // reserved by Excel
        Self(used)
    }

    /// A valid, unique sheet name from `base` plus an optional suffix.
    fn name(&mut self, base: &str, suffix: &str) -> String {
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
            if self.0.insert(name.to_lowercase()) {
                return name;
            }
        }
        unreachable!("an unbounded loop always finds a free name")
    }

    /// The name of part `part` (1-based) of a data type's sheets.
    fn data_sheet(&mut self, data_type: &str, part: usize) -> String {
        let suffix = if part == 1 {
            String::new()
        } else {
            format!(" ({part})")
        };
        self.name(data_type, &suffix)
    }
}

/// What a cell becomes in a sheet.
#[derive(Clone)]
enum SheetCell<'a> {
    Empty,
    Bool(bool),
    Number(f64),
    DateTime(ExcelDateTime),
    /// Text, already neutralised when it had to be.
    Text(Cow<'a, str>),
}

/// How `cell` is presented in a column (`datetime`: a datetime column), and
/// the width it needs in characters (measured only when `measure`: the
/// widths come from the first rows of a sheet).
fn sheet_cell<'a>(
    cell: &Cell<'a>,
    datetime: bool,
    neutralise: bool,
    measure: bool,
) -> (SheetCell<'a>, usize) {
    let text = |s: &'a str, neutralise: bool| -> (SheetCell<'a>, usize) {
        if s.is_empty() {
            // Excel ignores empty strings; so does rust_xlsxwriter.
            return (SheetCell::Empty, 0);
        }
        let t = if neutralise && needs_neutralizing(s) {
            Cow::Owned(format!("'{s}"))
        } else {
            Cow::Borrowed(s)
        };
        let width = if measure { t.chars().count() } else { 0 };
        (SheetCell::Text(t), width)
    };
    match cell {
        Cell::Null => (SheetCell::Empty, 0),
        Cell::Float(f) if !f.is_finite() => (SheetCell::Empty, 0),
        Cell::Bool(b) => (SheetCell::Bool(*b), 5),
        Cell::Int(i) if i128::from(*i).abs() > MAX_EXACT_INTEGER => {
            let s = itoa::Buffer::new().format(*i).to_string();
            let w = s.len();
            (SheetCell::Text(Cow::Owned(s)), w)
        }
        Cell::UInt(u) => {
            let s = itoa::Buffer::new().format(*u).to_string();
            let w = s.len();
            (SheetCell::Text(Cow::Owned(s)), w)
        }
        Cell::Int(i) => (
            SheetCell::Number(*i as f64),
            itoa::Buffer::new().format(*i).len(),
        ),
        Cell::Float(f) => {
            let mut s = Vec::new();
            super::push_float(&mut s, *f);
            (SheetCell::Number(*f), s.len())
        }
        Cell::Text(s) if datetime => match parse_timestamp(s).map(excel_datetime) {
            Some(Ok(dt)) => (SheetCell::DateTime(dt), 19),
            // Outside Excel's 1900–9999 range: keep the text.
            _ => text(s, neutralise),
        },
        Cell::Text(s) => text(s, neutralise),
        Cell::Json(raw) => text(raw, false),
        Cell::Value(v @ (Value::Array(_) | Value::Object(_))) => {
            let s = v.to_string();
            let w = if measure { s.chars().count() } else { 0 };
            (SheetCell::Text(Cow::Owned(s)), w)
        }
        Cell::Value(scalar) => {
            let (c, w) = sheet_cell(&Cell::from_value(scalar), datetime, neutralise, measure);
            (c.into_owned(), w)
        }
    }
}

impl SheetCell<'_> {
    fn into_owned(self) -> SheetCell<'static> {
        match self {
            Self::Empty => SheetCell::Empty,
            Self::Bool(b) => SheetCell::Bool(b),
            Self::Number(n) => SheetCell::Number(n),
            Self::DateTime(d) => SheetCell::DateTime(d),
            Self::Text(t) => SheetCell::Text(Cow::Owned(t.into_owned())),
        }
    }
}

/// A text that does not fit a cell becomes a pointer to the Long values
/// sheet, where it is kept whole; `None` when it fits.
fn long_value_pointer(
    text: &str,
    sheet: &str,
    col: u16,
    row: u32,
    long_values: &mut Vec<LongValue>,
) -> Option<String> {
    if text.len() <= EXCEL_MAX_CELL_CHARS || text.encode_utf16().count() <= EXCEL_MAX_CELL_CHARS {
        return None;
    }
    let cell = format!("{}{}", col_letters(col), row + 1);
    let pointer = format!(
        "[{} characters: the full value is in sheet \"{LONG_VALUES_SHEET}\" under {sheet}!{cell}]",
        text.chars().count()
    );
    long_values.push(LongValue {
        sheet: sheet.to_string(),
        cell,
        text: text.to_string(),
    });
    Some(pointer)
}

/// A header cell: neutralised like data cells (a column name comes from the
/// operator's config or the app's records).
fn header_text(name: &str, neutralise: bool) -> Cow<'_, str> {
    if neutralise && needs_neutralizing(name) {
        Cow::Owned(format!("'{name}"))
    } else {
        Cow::Borrowed(name)
    }
}

/// The widths (characters) each column starts from: its header.
fn initial_widths(layout: &TypeLayout) -> Vec<usize> {
    layout
        .columns
        .iter()
        .map(|c| match c.kind {
            ColumnKind::Datetime => c.name.chars().count().max(19),
            _ => c.name.chars().count(),
        })
        .collect()
}

/// The column width set for a measured content width.
fn column_width(content: usize) -> f64 {
    (content as f64 + 2.0).clamp(8.0, 60.0)
}

/// A workbook with the export's document properties (its creation time is
/// `generated_at`, so the same input gives the same bytes).
fn new_workbook(info: &ExportInfo) -> Result<Workbook, FormatError> {
    let mut workbook = Workbook::new();
    let created = excel_datetime(info.generated_at)?;
    workbook.set_properties(
        &DocProperties::new()
            .set_title("Data export")
            .set_comment(format!("handover export {}", info.request_id))
            .set_creation_datetime(&created),
    );
    Ok(workbook)
}

/// The formats every workbook uses, in the order they are first used (the
/// streamed sheets rely on it: bold is style 1, date-times style 2).
fn formats() -> (Format, Format) {
    (
        Format::new().set_bold(),
        Format::new().set_num_format(DATETIME_FORMAT),
    )
}

/// Fills the Summary sheet: the request, the data subject, the counts per
/// data type and their sheets, and what GDPR Art. 15 asks beside the data.
fn write_summary(
    ws: &mut Worksheet,
    info: &ExportInfo,
    layouts: &[TypeLayout],
    counts: &[u64],
    type_sheets: &[Vec<String>],
    has_long_values: bool,
) -> Result<(), FormatError> {
    let (bold, datetime) = formats();
    let generated = excel_datetime(info.generated_at)?;
    ws.write_string_with_format(0, 0, "Data export", &bold)?;
    let mut r = 2;
    let pair = |ws: &mut Worksheet, r: &mut u32, k: &str, v: &str| -> Result<(), FormatError> {
        ws.write_string_with_format(*r, 0, k, &bold)?;
        ws.write_string(*r, 1, v)?;
        *r += 1;
        Ok(())
    };
    pair(ws, &mut r, "Request ID", &info.request_id)?;
    ws.write_string_with_format(r, 0, "Generated at (UTC)", &bold)?;
    ws.write_datetime_with_format(r, 1, &generated, &datetime)?;
    r += 1;
    if let Some(user) = &info.user_id {
        pair(ws, &mut r, "User", user)?;
    }
    let range = info.date_range.clone().unwrap_or_default();
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
        ws.write_string(r, 2, type_sheets[t].join(", "))?;
        r += 1;
    }
    ws.write_string_with_format(r, 0, "Total", &bold)?;
    ws.write_number_with_format(r, 1, counts.iter().sum::<u64>() as f64, &bold)?;
    r += 1;
    if !info.failed_data_types.is_empty() {
        r += 1;
        ws.write_string_with_format(r, 0, "Not included (could not be read)", &bold)?;
        r += 1;
        for f in &info.failed_data_types {
            pair(ws, &mut r, &f.data_type, &f.reason)?;
        }
    }
    if let Some(a15) = &info.article_15 {
        r += 1;
        ws.write_string_with_format(r, 0, "About this data (GDPR Art. 15)", &bold)?;
        r += 1;
        for (k, v) in a15 {
            pair(ws, &mut r, k, v)?;
        }
    }
    if has_long_values {
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

/// Adds the "Long values" sheet, when there are any.
fn write_long_values(
    workbook: &mut Workbook,
    long_values: &[LongValue],
) -> Result<(), FormatError> {
    if long_values.is_empty() {
        return Ok(());
    }
    let (bold, _) = formats();
    let ws = workbook.add_worksheet();
    ws.set_name(LONG_VALUES_SHEET)?;
    for (c, h) in ["Sheet", "Cell", "Part", "Text"].iter().enumerate() {
        ws.write_string_with_format(0, c as u16, *h, &bold)?;
    }
    ws.set_freeze_panes(1, 0)?;
    let mut r = 1;
    for lv in long_values {
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

fn col_num(c: usize) -> Result<u16, FormatError> {
    u16::try_from(c)
        .ok()
        .filter(|&c| c < 16_384)
        .ok_or_else(|| FormatError::Xlsx(format!("too many columns ({c}) for one Excel sheet")))
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
