//! Streaming export writers: begin with the manifest and export metadata,
//! take pages of records per data type in manifest order, finish. Every call
//! returns the bytes it produced, so JSON and CSV never hold the whole file.
//!
//! ```
//! use handover::format::{ExportFormat, ExportWriter, FormatOptions};
//! use handover::model::{Column, ColumnKind, ExportInfo, Manifest, TypeManifest};
//!
//! let mut manifest = Manifest::default();
//! manifest.types.insert("payment_history".into(), TypeManifest {
//!     records: 1,
//!     columns: vec![Column::new("id", ColumnKind::String), Column::new("amount_cents", ColumnKind::Integer)],
//!     records_url: None,
//! });
//! let info = ExportInfo::new("export_1", time::OffsetDateTime::UNIX_EPOCH);
//! let mut w = ExportWriter::new(ExportFormat::Csv, &manifest, &info, &FormatOptions::default()).unwrap();
//! let mut file = w.begin().unwrap();
//! let page: Vec<handover::model::Record> = serde_json::from_str(r#"[{"id":"p1","amount_cents":2999}]"#).unwrap();
//! file.extend(w.write_page("payment_history", &page).unwrap());
//! file.extend(w.finish().unwrap());
//! assert_eq!(String::from_utf8(file).unwrap(), "data_type,id,amount_cents\r\npayment_history,p1,2999\r\n");
//! ```

mod csv;
mod error;
mod json;
mod layout;
mod xlsx;

use std::fmt;
use std::str::FromStr;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use error::FormatError;
pub use layout::infer_manifest;
pub(crate) use layout::{json_type, neutralize, TypeLayout};

use crate::model::{ExportInfo, Manifest, Record};

/// The three file formats of the Data Export API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// The seed's JSON layout.
    Json,
    /// The seed's flattened CSV layout.
    Csv,
    /// An Excel workbook: summary sheet plus one sheet per data type.
    Xlsx,
}

impl ExportFormat {
    /// The format's name as used on the wire (`json`, `csv`, `xlsx`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Csv => "csv",
            Self::Xlsx => "xlsx",
        }
    }

    /// The file's MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        }
    }

    /// The file name extension (without dot).
    pub fn extension(self) -> &'static str {
        self.as_str()
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExportFormat {
    type Err = FormatError;

    /// Parses `json`, `csv` or `xlsx` (exactly, lower case).
    ///
    /// # Errors
    ///
    /// [`FormatError::InvalidFormat`] for anything else.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            "xlsx" => Ok(Self::Xlsx),
            other => Err(FormatError::InvalidFormat(other.to_string())),
        }
    }
}

/// Options of the writers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FormatOptions {
    /// Prefix text cells that start with `=`, `+`, `-`, `@`, tab, CR or NUL
    /// with an apostrophe in CSV and XLSX (OWASP CSV injection). Default on.
    pub neutralize_formulas: bool,
    /// Start the CSV with a UTF-8 byte order mark so Excel detects UTF-8.
    pub csv_bom: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self {
            neutralize_formulas: true,
            csv_bom: false,
        }
    }
}

/// What a format needs to implement; [`ExportWriter`] handles ordering,
/// validation and counting around it.
pub(crate) trait Backend {
    fn begin(&mut self, layouts: &[TypeLayout], out: &mut Vec<u8>) -> Result<(), FormatError>;
    fn open_type(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError>;
    fn record(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        cells: &[Option<&Value>],
        record: &Record,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError>;
    fn close_type(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        count: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError>;
    fn finish(
        &mut self,
        layouts: &[TypeLayout],
        counts: &[u64],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError>;
    /// Moves anything buffered into `out`; called at the end of every call.
    fn flush(&mut self, _out: &mut Vec<u8>) -> Result<(), FormatError> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    New,
    Begun,
    Finished,
}

/// A streaming export writer for one file.
///
/// Call [`begin`](Self::begin) once, [`write_page`](Self::write_page) for each
/// page of each data type (types in manifest order, a type's pages together;
/// types without records may be skipped), then [`finish`](Self::finish).
/// Concatenating the returned chunks gives the file.
pub struct ExportWriter {
    backend: Box<dyn Backend + Send>,
    layouts: Vec<TypeLayout>,
    counts: Vec<u64>,
    /// The type currently open, and the next type not yet opened.
    current: Option<usize>,
    next: usize,
    stage: Stage,
    bytes: u64,
}

impl fmt::Debug for ExportWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportWriter")
            .field("types", &self.layouts.len())
            .field("counts", &self.counts)
            .field("stage", &self.stage)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl ExportWriter {
    /// A writer of `format` for the data types of `manifest`.
    ///
    /// # Errors
    ///
    /// [`FormatError::InvalidDataType`] when a manifest type name is malformed.
    pub fn new(
        format: ExportFormat,
        manifest: &Manifest,
        info: &ExportInfo,
        options: &FormatOptions,
    ) -> Result<Self, FormatError> {
        let mut layouts = Vec::with_capacity(manifest.types.len());
        for (name, t) in &manifest.types {
            if !crate::model::is_valid_data_type_name(name) {
                return Err(FormatError::InvalidDataType(name.clone()));
            }
            layouts.push(TypeLayout::new(name, &t.columns));
        }
        let backend: Box<dyn Backend + Send> = match format {
            ExportFormat::Json => Box::new(json::JsonBackend::new(info)),
            ExportFormat::Csv => Box::new(csv::CsvBackend::new(options)),
            ExportFormat::Xlsx => Box::new(xlsx::XlsxBackend::new(info, options)?),
        };
        Ok(Self {
            backend,
            counts: vec![0; layouts.len()],
            layouts,
            current: None,
            next: 0,
            stage: Stage::New,
            bytes: 0,
        })
    }

    /// Starts the file.
    ///
    /// # Errors
    ///
    /// [`FormatError::State`] when called twice.
    pub fn begin(&mut self) -> Result<Vec<u8>, FormatError> {
        if self.stage != Stage::New {
            return Err(FormatError::State("begin called twice"));
        }
        self.stage = Stage::Begun;
        let mut out = Vec::new();
        self.backend.begin(&self.layouts, &mut out)?;
        self.emit(out)
    }

    /// Writes one page of records of `data_type`.
    ///
    /// # Errors
    ///
    /// [`FormatError::InvalidDataType`] for a type not in the manifest,
    /// [`FormatError::OutOfOrder`] for a type whose turn has passed,
    /// [`FormatError::UnknownField`] / [`FormatError::InvalidDate`] for a
    /// record that does not fit the type's columns. A failed page leaves the
    /// writer unusable for a consistent file: start again.
    pub fn write_page(
        &mut self,
        data_type: &str,
        records: &[Record],
    ) -> Result<Vec<u8>, FormatError> {
        if self.stage != Stage::Begun {
            return Err(FormatError::State("write_page outside begin/finish"));
        }
        let t = self
            .layouts
            .iter()
            .position(|l| l.data_type == data_type)
            .ok_or_else(|| FormatError::InvalidDataType(data_type.to_string()))?;
        let mut out = Vec::new();
        self.advance_to(t, &mut out)?;
        let layout = &self.layouts[t];
        for record in records {
            let cells = layout.cells(record, self.counts[t])?;
            self.backend.record(t, layout, &cells, record, &mut out)?;
            self.counts[t] += 1;
        }
        self.emit(out)
    }

    /// Ends the file.
    ///
    /// # Errors
    ///
    /// [`FormatError::State`] when not begun or already finished;
    /// [`FormatError::Xlsx`] when the workbook cannot be assembled.
    pub fn finish(&mut self) -> Result<Vec<u8>, FormatError> {
        if self.stage != Stage::Begun {
            return Err(FormatError::State("finish without begin, or twice"));
        }
        let mut out = Vec::new();
        self.advance_to(self.layouts.len(), &mut out)?;
        self.backend.finish(&self.layouts, &self.counts, &mut out)?;
        self.stage = Stage::Finished;
        self.emit(out)
    }

    /// Records written so far, over all data types.
    pub fn records_written(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Bytes returned so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Moves to type `t` (`t == len` means "past the last type"): closes the
    /// open type, and opens and closes every type in between so that types
    /// without records still appear in the file.
    fn advance_to(&mut self, t: usize, out: &mut Vec<u8>) -> Result<(), FormatError> {
        if let Some(c) = self.current {
            if t == c {
                return Ok(());
            }
            if t < c {
                return Err(FormatError::OutOfOrder(self.layouts[t].data_type.clone()));
            }
            self.backend
                .close_type(c, &self.layouts[c], self.counts[c], out)?;
            self.current = None;
        } else if t < self.next {
            return Err(FormatError::OutOfOrder(self.layouts[t].data_type.clone()));
        }
        while self.next < t {
            let n = self.next;
            self.backend.open_type(n, &self.layouts[n], out)?;
            self.backend
                .close_type(n, &self.layouts[n], self.counts[n], out)?;
            self.next += 1;
        }
        if t < self.layouts.len() {
            self.backend.open_type(t, &self.layouts[t], out)?;
            self.current = Some(t);
            self.next = t + 1;
        }
        Ok(())
    }

    fn emit(&mut self, mut out: Vec<u8>) -> Result<Vec<u8>, FormatError> {
        self.backend.flush(&mut out)?;
        self.bytes += out.len() as u64;
        Ok(out)
    }
}

/// Writes a whole export in one call: `data` maps each data type to its
/// records (the shape of the JSON format's `export.data`). Without a
/// manifest the columns are inferred with [`infer_manifest`].
///
/// # Errors
///
/// Any [`FormatError`] of inference or writing.
///
/// ```
/// use handover::format::{write_all, ExportFormat, FormatOptions};
/// use handover::model::ExportInfo;
/// let data = serde_json::from_str(r#"{"user_profile":[{"id":"user_456","email":"user@example.com"}]}"#).unwrap();
/// let info = ExportInfo::new("export_1", time::OffsetDateTime::UNIX_EPOCH);
/// let bytes = write_all(ExportFormat::Json, &data, None, &info, &FormatOptions::default()).unwrap();
/// let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
/// assert_eq!(v["metadata"]["total_records"], 1);
/// ```
pub fn write_all(
    format: ExportFormat,
    data: &IndexMap<String, Vec<Value>>,
    manifest: Option<&Manifest>,
    info: &ExportInfo,
    options: &FormatOptions,
) -> Result<Vec<u8>, FormatError> {
    let inferred;
    let manifest = match manifest {
        Some(m) => m,
        None => {
            inferred = infer_manifest(data)?;
            &inferred
        }
    };
    let mut w = ExportWriter::new(format, manifest, info, options)?;
    let mut file = w.begin()?;
    for (data_type, values) in data {
        let mut records = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            match v {
                Value::Object(m) => records.push(m.clone()),
                other => {
                    return Err(FormatError::InvalidRecord {
                        data_type: data_type.clone(),
                        index: i as u64,
                        reason: format!("expected an object, got {}", json_type(other)),
                    })
                }
            }
        }
        file.extend(w.write_page(data_type, &records)?);
    }
    file.extend(w.finish()?);
    Ok(file)
}
