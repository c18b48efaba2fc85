//! `formatRecords(data, options)`: records the app already holds → file bytes.

use indexmap::IndexMap;
use js_sys::{Uint8Array, JSON};
use serde::Deserialize;
use serde_json::Value;
use wasm_bindgen::prelude::*;

use super::error::export_error;
use crate::format::{
    columns_from_kinds, infer_manifest, write_all, Cell, ExportFormat, ExportWriter, FormatOptions,
};
use crate::model::{parse_timestamp, Column, ExportInfo, Manifest};
use crate::options::RawDateRange;

#[wasm_bindgen(typescript_custom_section)]
const TS_FORMAT_RECORDS: &'static str = r#"
/** A record: field name → JSON value. Dates should be ISO-8601 strings (Date objects are converted). */
export type ExportRecord = Record<string, unknown>;
export type ExportFormat = "json" | "csv" | "xlsx";
export type ColumnKind = "string" | "integer" | "number" | "boolean" | "datetime" | "json";
export interface ColumnSpec { name: string; kind: ColumnKind; }

export interface FormatRecordsOptions {
  /** File format. */
  format: ExportFormat;
  /** Written into the file as `export.request_id` / the summary sheet. Default "local". */
  requestId?: string;
  /** ISO-8601 generation time (also the XLSX creation time). Default: now.
   * Pass a fixed value to get byte-identical files for the same input. */
  generatedAt?: string | Date;
  /** The date range the records cover, stated in the file. */
  dateRange?: { start?: string | null; end?: string | null };
  /** The data subject, named on the XLSX summary sheet. */
  userId?: string;
  /** Declared columns per data type; otherwise inferred from the records. */
  columns?: Record<string, ColumnSpec[]>;
  /** Prefix cells starting with = + - @ tab CR NUL with ' (CSV, XLSX). Default true. */
  neutralizeFormulas?: boolean;
  /** CSV only. */
  csv?: { /** Start with a UTF-8 byte order mark (helps Excel). Default false. */ bom?: boolean };
  /** "uint8array" (default) or "blob": a Blob built as the file is written, which the
   * browser keeps outside the page's memory (use it for big files). */
  output?: "uint8array" | "blob";
}

/**
 * Formats records the app already holds as a JSON, CSV or XLSX file.
 * `data` is `{ [dataType]: ExportRecord[] }` (the shape of the JSON format's
 * `export.data`), or that object as JSON text (which keeps integers beyond
 * 2^53 exact; so do BigInt values in objects). Values are read as
 * `JSON.stringify` would see them (Dates become ISO strings). Declaring
 * `columns` skips inferring them. Throws an `ExportError` on invalid input.
 */
export function formatRecords(data: Record<string, ExportRecord[]> | string, options: FormatRecordsOptions & { output?: "uint8array" }): Uint8Array;
export function formatRecords(data: Record<string, ExportRecord[]> | string, options: FormatRecordsOptions & { output: "blob" }): Blob;
"#;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Options {
    format: String,
    output: Option<String>,
    request_id: Option<String>,
    generated_at: Option<String>,
    date_range: Option<RawDateRange>,
    user_id: Option<String>,
    columns: Option<IndexMap<String, Vec<Column>>>,
    neutralize_formulas: Option<bool>,
    csv: Option<CsvOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CsvOptions {
    bom: Option<bool>,
}

/// Converts `value` to JSON text the way `JSON.stringify` does (Dates become
/// ISO strings, `undefined` fields vanish), then parses it in Rust.
fn to_json<T: serde::de::DeserializeOwned>(
    value: &JsValue,
    what: &str,
    code: &str,
) -> Result<T, JsValue> {
    let text = match value.as_string() {
        Some(s) => s,
        None => JSON::stringify(value)
            .map_err(|_| {
                export_error(
                    code,
                    &format!("{what} cannot be converted to JSON (BigInt or a cycle?)"),
                )
            })?
            .as_string()
            .ok_or_else(|| export_error(code, &format!("{what} is missing")))?,
    };
    serde_json::from_str(&text).map_err(|e| export_error(code, &format!("{what}: {e}")))
}

/// The checked options of one `formatRecords` call.
struct Checked {
    format: ExportFormat,
    info: ExportInfo,
    format_options: FormatOptions,
    columns: IndexMap<String, Vec<Column>>,
}

fn check_options(options: &JsValue) -> Result<Checked, JsValue> {
    if !options.is_object() {
        return Err(export_error(
            "INVALID_OPTIONS",
            "options must be an object with at least { format }",
        ));
    }
    let value = to_json::<Value>(options, "options", "INVALID_OPTIONS")?;
    let options: Options = crate::options::read_options(value, "options")
        .map_err(|e| export_error(e.code, &e.message))?;
    let format: ExportFormat = options.format.parse()?;
    if let Some(o) = options.output.as_deref() {
        if o != "uint8array" && o != "blob" {
            return Err(export_error(
                "INVALID_OPTIONS",
                &format!("output {o:?} must be \"uint8array\" or \"blob\""),
            ));
        }
    }
    let generated_at = match &options.generated_at {
        Some(s) => parse_timestamp(s).ok_or_else(|| {
            export_error(
                "INVALID_OPTIONS",
                &format!("generatedAt {s:?} is not an ISO-8601 timestamp"),
            )
        })?,
        None => {
            let now = js_sys::Date::new_0()
                .to_iso_string()
                .as_string()
                .unwrap_or_default();
            parse_timestamp(&now)
                .ok_or_else(|| export_error("INTERNAL_ERROR", "the clock gave no valid time"))?
        }
    };
    let date_range = options
        .date_range
        .map(|r| r.check("dateRange"))
        .transpose()
        .map_err(|e| export_error(e.code, &e.message))?;
    let mut info = ExportInfo::new(
        options.request_id.unwrap_or_else(|| "local".into()),
        generated_at,
    );
    // As the caller gave it: the file states the caller's own range (the
    // golden files hold it so), where a server export states the instants.
    info.date_range = date_range;
    info.user_id = options.user_id;
    Ok(Checked {
        format,
        info,
        format_options: FormatOptions {
            neutralize_formulas: options.neutralize_formulas.unwrap_or(true),
            csv_bom: options.csv.and_then(|c| c.bom).unwrap_or(false),
        },
        columns: options.columns.unwrap_or_default(),
    })
}

/// Declared columns replace the inferred ones of their data type.
fn declare(manifest: &mut Manifest, columns: IndexMap<String, Vec<Column>>) -> Result<(), JsValue> {
    for (data_type, columns) in columns {
        match manifest.types.get_mut(&data_type) {
            Some(t) => t.columns = columns,
            None => {
                return Err(export_error(
                    "INVALID_DATA_TYPE",
                    &format!("columns are declared for {data_type:?}, which is not in data"),
                ))
            }
        }
    }
    Ok(())
}

/// `formatRecords` through JSON text: `data` is JSON text, or objects that
/// are turned into JSON text first (the package's `formatRecords` takes
/// this path for text; for objects it packs them itself, see
/// [`RecordFormatter`]).
///
/// # Errors
///
/// An `ExportError` (as `JsValue`) with code `INVALID_OPTIONS`,
/// `INVALID_FORMAT`, `INVALID_RECORD`, `INVALID_DATA_TYPE`, `UNKNOWN_FIELD`,
/// `INVALID_DATE` or `DATE_RANGE_INVALID`.
#[wasm_bindgen(js_name = formatRecordsText, skip_typescript)]
pub fn format_records(data: JsValue, options: JsValue) -> Result<Uint8Array, JsValue> {
    let checked = check_options(&options)?;
    if !(data.is_object() || data.is_string()) || js_sys::Array::is_array(&data) {
        return Err(export_error(
            "INVALID_RECORD",
            "data must be an object mapping each data type to an array of records",
        ));
    }
    let data: IndexMap<String, Value> = to_json(&data, "data", "INVALID_RECORD")?;
    let mut records = IndexMap::with_capacity(data.len());
    for (data_type, value) in data {
        match value {
            Value::Array(items) => {
                records.insert(data_type, items);
            }
            other => {
                return Err(export_error(
                    "INVALID_RECORD",
                    &format!(
                        "data.{data_type} must be an array of records, got {}",
                        crate::format::json_type(&other)
                    ),
                ))
            }
        }
    }
    let mut manifest = infer_manifest(&records)?;
    declare(&mut manifest, checked.columns)?;
    let bytes = write_all(
        checked.format,
        &records,
        Some(&manifest),
        &checked.info,
        &checked.format_options,
    )?;
    Ok(Uint8Array::from(bytes.as_slice()))
}

/// The columns of a data type from the names seen in its records, in order,
/// and the kinds of value seen under each (`formatRecords` infers the kinds
/// in JavaScript; the rules are Rust's, as for JSON text).
///
/// # Errors
///
/// `INVALID_RECORD` when names and kinds do not pair up.
#[wasm_bindgen(js_name = inferColumns, skip_typescript)]
pub fn infer_columns(names: Vec<String>, kinds: Vec<u32>) -> Result<JsValue, JsValue> {
    if names.len() != kinds.len() {
        return Err(export_error(
            "INVALID_RECORD",
            "names and kinds do not pair up",
        ));
    }
    let observed: Vec<(String, u32)> = names.into_iter().zip(kinds).collect();
    let columns = columns_from_kinds(&observed);
    serde::Serialize::serialize(&columns, &serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| export_error("INTERNAL_ERROR", &e.to_string()))
}

/// Cell tags of the packed chunks `formatRecords` hands over (`js/format.js`).
mod tag {
    // 0 is no value (null or absent).
    pub const FALSE: u8 = 1;
    pub const TRUE: u8 = 2;
    /// A number, in `nums`.
    pub const NUMBER: u8 = 3;
    /// Text; its length in UTF-16 units is in `nums`, the text in `text`.
    pub const TEXT: u8 = 4;
    /// JSON text (arrays, objects, exact big integers), likewise.
    pub const JSON: u8 = 5;
}

/// The writer behind `formatRecords` for records given as objects: the
/// package's JavaScript reads the objects (fast, in the engine) and hands
/// rows over in packed chunks — a tag per cell, a number per cell, and all
/// the chunk's text as one string — which become cells here, without a
/// JSON detour or a value tree per record.
#[wasm_bindgen]
pub struct RecordFormatter {
    writer: ExportWriter,
}

impl std::fmt::Debug for RecordFormatter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordFormatter").finish()
    }
}

#[wasm_bindgen]
impl RecordFormatter {
    /// A writer for `manifest` (`{ [dataType]: { records, columns } }`,
    /// where declared columns in `options` win).
    ///
    /// # Errors
    ///
    /// As `formatRecords`.
    #[wasm_bindgen(constructor)]
    pub fn new(manifest: JsValue, options: JsValue) -> Result<RecordFormatter, JsValue> {
        let checked = check_options(&options)?;
        let mut manifest: Manifest = to_json(&manifest, "manifest", "INVALID_RECORD")?;
        declare(&mut manifest, checked.columns)?;
        let writer = ExportWriter::new(
            checked.format,
            &manifest,
            &checked.info,
            &checked.format_options,
        )?;
        Ok(Self { writer })
    }

    /// The columns the writer uses for the data type at `t`.
    pub fn columns(&self, t: u32) -> Result<JsValue, JsValue> {
        serde::Serialize::serialize(
            self.writer.columns(t as usize),
            &serde_wasm_bindgen::Serializer::json_compatible(),
        )
        .map_err(|e| export_error("INTERNAL_ERROR", &e.to_string()))
    }

    /// Starts the file; returns its first bytes.
    pub fn begin(&mut self) -> Result<Uint8Array, JsValue> {
        Ok(Uint8Array::from(self.writer.begin()?.as_slice()))
    }

    /// Writes `rows` rows of the data type at `t`, packed: for each cell (row
    /// by row, a cell per column) a tag and a number, and the text of the
    /// text cells one after another. Returns the bytes produced.
    #[wasm_bindgen(js_name = writeChunk)]
    pub fn write_chunk(
        &mut self,
        t: u32,
        rows: u32,
        tags: &[u8],
        nums: &[f64],
        text: &str,
    ) -> Result<Uint8Array, JsValue> {
        let t = t as usize;
        let width = self.writer.columns(t).len();
        let cells_total = rows as usize * width;
        if tags.len() < cells_total || nums.len() < cells_total {
            return Err(export_error(
                "INVALID_RECORD",
                "a chunk is shorter than its rows",
            ));
        }
        let ascii = text.is_ascii();
        let mut at = 0usize;
        let mut cells: Vec<Cell<'_>> = Vec::with_capacity(width);
        for r in 0..rows as usize {
            cells.clear();
            for i in r * width..(r + 1) * width {
                cells.push(match tags[i] {
                    tag::FALSE => Cell::Bool(false),
                    tag::TRUE => Cell::Bool(true),
                    tag::NUMBER => number(nums[i]),
                    tag::TEXT | tag::JSON => {
                        let units = nums[i] as usize;
                        let end = if ascii {
                            at + units
                        } else {
                            utf16_end(text, at, units)
                        };
                        let piece = text.get(at..end).ok_or_else(|| {
                            export_error(
                                "INVALID_RECORD",
                                "a chunk's text is shorter than its cells",
                            )
                        })?;
                        at = end;
                        // JSON cells hold arrays, objects, or the digits of
                        // a BigInt beyond 2^53 (written exactly, as text in
                        // XLSX like any integer that large).
                        if tags[i] == tag::TEXT {
                            Cell::Text(piece)
                        } else {
                            Cell::Json(piece)
                        }
                    }
                    _ => Cell::Null,
                });
            }
            self.writer.write_row(t, &cells)?;
        }
        Ok(Uint8Array::from(self.writer.take_output().as_slice()))
    }

    /// Writes `count` records of the data type at `t` that `JSON.stringify`
    /// wrote, joined by `,\n` (the JSON format, with inferred columns).
    #[wasm_bindgen(js_name = writeJson)]
    pub fn write_json(&mut self, t: u32, json: &str, count: u32) -> Result<Uint8Array, JsValue> {
        self.writer
            .write_json_records(t as usize, json.as_bytes(), u64::from(count))?;
        Ok(Uint8Array::from(self.writer.take_output().as_slice()))
    }

    /// Ends the file; returns its last bytes.
    pub fn finish(&mut self) -> Result<Uint8Array, JsValue> {
        let mut out = self.writer.finish()?;
        while let Some(piece) = self.writer.next_output()? {
            out.extend(piece);
        }
        Ok(Uint8Array::from(out.as_slice()))
    }

    /// Records written so far.
    #[wasm_bindgen(js_name = recordsWritten)]
    pub fn records_written(&self) -> f64 {
        self.writer.records_written() as f64
    }
}

/// A JavaScript number as it reads back from the text `JSON.stringify`
/// writes for it, so records as objects and as JSON text give the same
/// cells: integers up to 2^53 as they are; larger integers below 10^21 by
/// their shortest decimal digits, as an integer when those fit 64 bits;
/// anything else as a float.
fn number(v: f64) -> Cell<'static> {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if v.fract() != 0.0 || !v.is_finite() {
        return Cell::Float(v);
    }
    if v.abs() <= EXACT {
        return Cell::Int(v as i64);
    }
    if v.abs() < 1e21 {
        let digits = js_integer_digits(v);
        if let Ok(i) = digits.parse::<i64>() {
            return Cell::Int(i);
        }
        if let Ok(u) = digits.parse::<u64>() {
            return Cell::UInt(u);
        }
    }
    Cell::Float(v)
}

/// How JavaScript writes an integral number below 10^21: its shortest
/// round-trip digits, padded with zeros (`2**63` → `9223372036854776000`).
fn js_integer_digits(v: f64) -> String {
    let sci = format!("{:e}", v.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: usize = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let mut out = String::with_capacity(exp + 2);
    if v < 0.0 {
        out.push('-');
    }
    out.push_str(&digits);
    for _ in digits.len()..exp + 1 {
        out.push('0');
    }
    out
}

/// The byte offset `units` UTF-16 units after `at` in `text`.
fn utf16_end(text: &str, at: usize, units: usize) -> usize {
    let mut left = units;
    let mut end = at;
    for c in text[at.min(text.len())..].chars() {
        if left == 0 {
            break;
        }
        left = left.saturating_sub(c.len_utf16());
        end += c.len_utf8();
    }
    end
}
