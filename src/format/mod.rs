//! Streaming export writers: begin with the manifest and export metadata,
//! take rows (typed [`Cell`]s, or records an app holds) per data type in
//! manifest order, finish. The output is handed out as it is produced, so
//! no format holds the whole file.
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

mod cell;
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

pub use cell::Cell;
pub(crate) use cell::{push_float, push_json_cell, push_json_str};
pub use error::FormatError;
pub use layout::{columns_from_kinds, infer_manifest, kind_bits};
pub(crate) use layout::{json_type, needs_neutralizing, TypeLayout};
pub use xlsx::ZipAssembler;

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
/// validation and counting around it. Output goes into `out`.
pub(crate) trait Backend {
    /// Makes the output zip instructions for a [`ZipAssembler`] (before
    /// `begin`); `false` for a format that is not a zip.
    fn defer_zip(&mut self) -> bool {
        false
    }
    fn begin(&mut self, layouts: &[TypeLayout], out: &mut Vec<u8>) -> Result<(), FormatError>;
    fn open_type(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError>;
    /// One row, already checked against the columns. `record` is the record
    /// the cells came from, when there was one (JSON writes it as it is).
    fn row(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        cells: &[Cell<'_>],
        record: Option<&Record>,
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
    /// Records already written as JSON objects, one after another with
    /// `,\n` between them (JSON only).
    fn json_records(
        &mut self,
        _json: &[u8],
        _count: u64,
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        Err(FormatError::State(
            "records as JSON text are for the JSON format",
        ))
    }
    /// Output that follows `finish` without passing through memory at once
    /// (a file assembled on disk): the next piece, `None` when done.
    fn tail(&mut self) -> Result<Option<Vec<u8>>, FormatError> {
        Ok(None)
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
/// Call [`begin`](Self::begin) once, then [`write_row`](Self::write_row) or
/// [`write_page`](Self::write_page) for the rows of each data type (types in
/// manifest order, a type's rows together; types without records may be
/// skipped), then [`finish`](Self::finish). The bytes produced so far are
/// taken with [`take_output`](Self::take_output) (`begin`, `write_page` and
/// `finish` return them directly); after `finish`, [`next_output`](Self::next_output)
/// hands out any remainder. Concatenating everything gives the file.
pub struct ExportWriter {
    backend: Box<dyn Backend + Send>,
    layouts: Vec<TypeLayout>,
    counts: Vec<u64>,
    /// The type currently open, and the next type not yet opened.
    current: Option<usize>,
    next: usize,
    stage: Stage,
    bytes: u64,
    out: Vec<u8>,
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

fn layouts_of(manifest: &Manifest) -> Result<Vec<TypeLayout>, FormatError> {
    let mut layouts = Vec::with_capacity(manifest.types.len());
    for (name, t) in &manifest.types {
        if !crate::model::is_valid_data_type_name(name) {
            return Err(FormatError::InvalidDataType(name.clone()));
        }
        layouts.push(TypeLayout::new(name, &t.columns)?);
    }
    Ok(layouts)
}

impl ExportWriter {
    /// A writer of `format` for the data types of `manifest`.
    ///
    /// # Errors
    ///
    /// [`FormatError::InvalidDataType`] when a manifest type name is
    /// malformed, [`FormatError::InvalidColumns`] when a type declares a
    /// column twice.
    ///
    /// ```
    /// use handover::format::{ExportFormat, ExportWriter, FormatOptions};
    /// use handover::model::{ExportInfo, Manifest};
    /// let info = ExportInfo::new("export_1", time::OffsetDateTime::UNIX_EPOCH);
    /// let w = ExportWriter::new(ExportFormat::Json, &Manifest::default(), &info, &FormatOptions::default());
    /// assert!(w.is_ok());
    /// ```
    pub fn new(
        format: ExportFormat,
        manifest: &Manifest,
        info: &ExportInfo,
        options: &FormatOptions,
    ) -> Result<Self, FormatError> {
        let layouts = layouts_of(manifest)?;
        let backend: Box<dyn Backend + Send> = match format {
            ExportFormat::Json => Box::new(json::JsonBackend::new(info)),
            ExportFormat::Csv => Box::new(csv::CsvBackend::new(options)),
            ExportFormat::Xlsx => Box::new(xlsx::StreamingXlsx::new(info, options)?),
        };
        Ok(Self::with_backend(backend, layouts))
    }

    /// An XLSX writer whose data sheets are written through
    /// rust_xlsxwriter's constant-memory mode: rows go to temporary files in
    /// `tempdir` as they arrive, so memory stays flat however many rows
    /// there are. The workbook is assembled on disk by `finish`, and handed
    /// out piece by piece by [`next_output`](Self::next_output).
    ///
    /// # Errors
    ///
    /// As [`ExportWriter::new`].
    ///
    /// ```
    /// use handover::format::{ExportWriter, FormatOptions};
    /// use handover::model::{ExportInfo, Manifest};
    /// let info = ExportInfo::new("export_1", time::OffsetDateTime::UNIX_EPOCH);
    /// let dir = std::env::temp_dir();
    /// let mut w = ExportWriter::xlsx_constant_memory(&Manifest::default(), &info, &FormatOptions::default(), &dir).unwrap();
    /// let mut file = w.begin().unwrap();
    /// file.extend(w.finish().unwrap());
    /// while let Some(piece) = w.next_output().unwrap() {
    ///     file.extend(piece);
    /// }
    /// assert_eq!(&file[..2], b"PK");
    /// ```
    #[cfg(not(target_arch = "wasm32"))]
    pub fn xlsx_constant_memory(
        manifest: &Manifest,
        info: &ExportInfo,
        options: &FormatOptions,
        tempdir: &std::path::Path,
    ) -> Result<Self, FormatError> {
        let layouts = layouts_of(manifest)?;
        let backend = Box::new(xlsx::ConstantMemoryXlsx::new(info, options, tempdir)?);
        Ok(Self::with_backend(backend, layouts))
    }

    fn with_backend(backend: Box<dyn Backend + Send>, layouts: Vec<TypeLayout>) -> Self {
        Self {
            backend,
            counts: vec![0; layouts.len()],
            layouts,
            current: None,
            next: 0,
            stage: Stage::New,
            bytes: 0,
            out: Vec::new(),
        }
    }

    /// For an XLSX file: from now on the output is not the file's bytes but
    /// instructions to build it, which a [`ZipAssembler`] (in another
    /// thread) turns into exactly the bytes this writer would have given.
    /// The deflating and checksumming of the sheets then run there. Returns
    /// whether the output is instructions: `false` for CSV and JSON, whose
    /// output stays the file, and once [`begin`](Self::begin) was called.
    ///
    /// ```
    /// use handover::format::{ExportFormat, ExportWriter, FormatOptions};
    /// use handover::model::{ExportInfo, Manifest};
    /// let info = ExportInfo::new("export_1", time::OffsetDateTime::UNIX_EPOCH);
    /// let opts = FormatOptions::default();
    /// let mut csv = ExportWriter::new(ExportFormat::Csv, &Manifest::default(), &info, &opts).unwrap();
    /// assert!(!csv.defer_zip());
    /// let mut xlsx = ExportWriter::new(ExportFormat::Xlsx, &Manifest::default(), &info, &opts).unwrap();
    /// assert!(xlsx.defer_zip());
    /// ```
    pub fn defer_zip(&mut self) -> bool {
        self.stage == Stage::New && self.backend.defer_zip()
    }

    /// Starts the file; returns the bytes produced.
    ///
    /// # Errors
    ///
    /// [`FormatError::State`] when called twice.
    pub fn begin(&mut self) -> Result<Vec<u8>, FormatError> {
        if self.stage != Stage::New {
            return Err(FormatError::State("begin called twice"));
        }
        self.stage = Stage::Begun;
        self.backend.begin(&self.layouts, &mut self.out)?;
        Ok(self.take_output())
    }

    /// The position of `data_type` in the manifest, for [`write_row`](Self::write_row).
    pub fn type_index(&self, data_type: &str) -> Option<usize> {
        self.layouts.iter().position(|l| l.data_type == data_type)
    }

    /// The columns of the data type at `t`.
    pub fn columns(&self, t: usize) -> &[crate::model::Column] {
        self.layouts.get(t).map_or(&[], |l| l.columns.as_slice())
    }

    /// Writes one row of the data type at position `t`: one cell per column,
    /// in column order. The bytes produced wait in the writer until
    /// [`take_output`](Self::take_output).
    ///
    /// # Errors
    ///
    /// [`FormatError::InvalidDataType`] for a position outside the manifest,
    /// [`FormatError::OutOfOrder`] for a type whose turn has passed,
    /// [`FormatError::InvalidRecord`] for a row of the wrong width,
    /// [`FormatError::InvalidDate`] for a non-timestamp in a datetime column.
    /// A failed row leaves the writer unusable for a consistent file.
    pub fn write_row(&mut self, t: usize, cells: &[Cell<'_>]) -> Result<(), FormatError> {
        self.enter_type(t)?;
        let layout = &self.layouts[t];
        layout.check_row(cells, self.counts[t])?;
        self.backend.row(t, layout, cells, None, &mut self.out)?;
        self.counts[t] += 1;
        Ok(())
    }

    /// Writes one page of records of `data_type`; returns the bytes produced.
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
        let t = self
            .type_index(data_type)
            .ok_or_else(|| FormatError::InvalidDataType(data_type.to_string()))?;
        self.enter_type(t)?;
        let layout = &self.layouts[t];
        let mut cells = Vec::with_capacity(layout.columns.len());
        for record in records {
            layout.record_cells(record, self.counts[t], &mut cells)?;
            self.backend
                .row(t, layout, &cells, Some(record), &mut self.out)?;
            self.counts[t] += 1;
        }
        Ok(self.take_output())
    }

    /// Writes `count` records of the data type at `t` that are already JSON
    /// objects (`{…},\n{…}`, as `JSON.stringify` wrote them for the records
    /// an app holds), in the JSON format only. The records must fit the
    /// columns; nothing is checked.
    ///
    /// # Errors
    ///
    /// [`FormatError::State`] for another format, and as [`write_row`](Self::write_row).
    pub fn write_json_records(
        &mut self,
        t: usize,
        json: &[u8],
        count: u64,
    ) -> Result<(), FormatError> {
        if count == 0 {
            return Ok(());
        }
        self.enter_type(t)?;
        self.backend.json_records(json, count, &mut self.out)?;
        self.counts[t] += count;
        Ok(())
    }

    fn enter_type(&mut self, t: usize) -> Result<(), FormatError> {
        if self.stage != Stage::Begun {
            return Err(FormatError::State("rows written outside begin/finish"));
        }
        if t >= self.layouts.len() {
            return Err(FormatError::InvalidDataType(format!("#{t}")));
        }
        if self.current != Some(t) {
            let mut out = std::mem::take(&mut self.out);
            let r = self.advance_to(t, &mut out);
            self.out = out;
            r?;
        }
        Ok(())
    }

    /// The bytes produced since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        let out = std::mem::take(&mut self.out);
        self.bytes += out.len() as u64;
        out
    }

    /// Bytes produced and not yet taken.
    pub fn pending_output(&self) -> usize {
        self.out.len()
    }

    /// Ends the file; returns the bytes produced (for a file assembled on
    /// disk, the rest follows from [`next_output`](Self::next_output)).
    ///
    /// # Errors
    ///
    /// [`FormatError::State`] when not begun or already finished;
    /// [`FormatError::Xlsx`] when the workbook cannot be assembled.
    pub fn finish(&mut self) -> Result<Vec<u8>, FormatError> {
        if self.stage != Stage::Begun {
            return Err(FormatError::State("finish without begin, or twice"));
        }
        let mut out = std::mem::take(&mut self.out);
        self.advance_to(self.layouts.len(), &mut out)?;
        self.backend.finish(&self.layouts, &self.counts, &mut out)?;
        self.out = out;
        self.stage = Stage::Finished;
        Ok(self.take_output())
    }

    /// After [`finish`](Self::finish): the next piece of the file that was
    /// not returned yet, or `None` when the whole file has been handed out.
    ///
    /// # Errors
    ///
    /// [`FormatError::Xlsx`] when the assembled file cannot be read.
    pub fn next_output(&mut self) -> Result<Option<Vec<u8>>, FormatError> {
        if !self.out.is_empty() {
            return Ok(Some(self.take_output()));
        }
        if self.stage != Stage::Finished {
            return Ok(None);
        }
        let piece = self.backend.tail()?;
        if let Some(p) = &piece {
            self.bytes += p.len() as u64;
        }
        Ok(piece)
    }

    /// Records written so far, over all data types.
    pub fn records_written(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Records written so far of the data type at `t`.
    pub fn records_of(&self, t: usize) -> u64 {
        self.counts.get(t).copied().unwrap_or(0)
    }

    /// Bytes handed out so far.
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
    while let Some(piece) = w.next_output()? {
        file.extend(piece);
    }
    Ok(file)
}
