//! `formatRecords(data, options)`: records the app already holds → file bytes.

use indexmap::IndexMap;
use js_sys::{Uint8Array, JSON};
use serde::Deserialize;
use serde_json::Value;
use wasm_bindgen::prelude::*;

use super::error::export_error;
use crate::format::{infer_manifest, write_all, ExportFormat, FormatOptions};
use crate::model::{parse_timestamp, Column, DateRange, ExportInfo};

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
}

/**
 * Formats records the app already holds as a JSON, CSV or XLSX file.
 * `data` is `{ [dataType]: ExportRecord[] }` (the shape of the JSON format's
 * `export.data`), or that object as JSON text (which keeps integers beyond
 * 2^53 exact). Throws an `ExportError` on invalid input.
 */
export function formatRecords(data: Record<string, ExportRecord[]> | string, options: FormatRecordsOptions): Uint8Array;
"#;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Options {
    format: String,
    request_id: Option<String>,
    generated_at: Option<String>,
    date_range: Option<DateRange>,
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

/// `formatRecords(data, options)` for JavaScript; see the TypeScript
/// declaration above for the options.
///
/// # Errors
///
/// An `ExportError` (as `JsValue`) with code `INVALID_OPTIONS`,
/// `INVALID_FORMAT`, `INVALID_RECORD`, `INVALID_DATA_TYPE`, `UNKNOWN_FIELD`,
/// `INVALID_DATE` or `DATE_RANGE_INVALID`.
#[wasm_bindgen(js_name = formatRecords, skip_typescript)]
pub fn format_records(data: JsValue, options: JsValue) -> Result<Uint8Array, JsValue> {
    if !options.is_object() {
        return Err(export_error(
            "INVALID_OPTIONS",
            "options must be an object with at least { format }",
        ));
    }
    let options: Options = to_json(&options, "options", "INVALID_OPTIONS")?;
    let format: ExportFormat = options.format.parse()?;
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
    for end in options
        .date_range
        .iter()
        .flat_map(|r| [&r.start, &r.end])
        .flatten()
    {
        if parse_timestamp(end).is_none() {
            return Err(export_error(
                "DATE_RANGE_INVALID",
                &format!("dateRange {end:?} is not an ISO-8601 timestamp"),
            ));
        }
    }
    let mut manifest = infer_manifest(&records)?;
    for (data_type, columns) in options.columns.unwrap_or_default() {
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
    let mut info = ExportInfo::new(
        options.request_id.unwrap_or_else(|| "local".into()),
        generated_at,
    );
    info.date_range = options.date_range;
    info.user_id = options.user_id;
    let format_options = FormatOptions {
        neutralize_formulas: options.neutralize_formulas.unwrap_or(true),
        csv_bom: options.csv.and_then(|c| c.bom).unwrap_or(false),
    };
    let bytes = write_all(format, &records, Some(&manifest), &info, &format_options)?;
    Ok(Uint8Array::from(bytes.as_slice()))
}
