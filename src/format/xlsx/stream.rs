//! The streaming XLSX writer: each data sheet is a zip entry deflated as its
//! rows arrive, so memory stays flat (one page, the first thousand rows of a
//! sheet while its column widths are measured, and values too long for a
//! cell). At the end rust_xlsxwriter writes the rest of the workbook (the
//! Summary sheet, styles, the sheet list with its filter names, the Long
//! values sheet, document properties) with empty stand-ins for the data
//! sheets; its parts are copied in, the stand-ins replaced by the streamed
//! sheets.

use super::sheet::{self, STYLE_BOLD};
use super::zip::{self, DeflatedEntry, ZipWriter};
use super::{
    col_letters, col_num, column_width, header_text, initial_widths, long_value_pointer,
    new_workbook, sheet_cell, write_long_values, write_summary, LongValue, SheetCell, SheetNames,
    EXCEL_MAX_ROWS, SUMMARY_SHEET, WIDTH_SAMPLE_ROWS,
};
use crate::format::{Backend, Cell, FormatError, FormatOptions, TypeLayout};
use crate::model::{ColumnKind, ExportInfo, Record};

/// Deflate level of the streamed sheets: the fastest; sheets of repeated
/// markup still shrink about sevenfold.
const LEVEL: u32 = 1;
/// A sheet whose XML would pass this many bytes continues on a new sheet,
/// so that no zip entry needs Zip64.
const MAX_SHEET_XML: u64 = 3 << 30;

/// The data sheet being written.
#[derive(Debug)]
struct OpenSheet {
    entry: DeflatedEntry,
    name: String,
    /// Rows written, header included.
    rows: u32,
    widths: Vec<usize>,
    /// The rows' XML until the column widths are known (the first
    /// thousand rows); then `None` and rows go straight into the entry.
    sample: Option<Vec<u8>>,
}

/// A finished data sheet, for the workbook frame.
#[derive(Debug)]
struct Written {
    name: String,
    last_row: u32,
    columns: usize,
    widths: Vec<usize>,
    /// The header, as written.
    header: Vec<String>,
}

pub(crate) struct StreamingXlsx {
    info: ExportInfo,
    options: FormatOptions,
    names: SheetNames,
    type_sheets: Vec<Vec<String>>,
    written: Vec<Written>,
    zip: ZipWriter,
    open: Option<OpenSheet>,
    /// Column letters of the current type's columns.
    letters: Vec<String>,
    long_values: Vec<LongValue>,
    xml: Vec<u8>,
    row_label: String,
}

impl StreamingXlsx {
    pub(crate) fn new(info: &ExportInfo, options: &FormatOptions) -> Result<Self, FormatError> {
        Ok(Self {
            info: info.clone(),
            options: options.clone(),
            names: SheetNames::new(),
            type_sheets: Vec::new(),
            written: Vec::new(),
            zip: ZipWriter::default(),
            open: None,
            letters: Vec::new(),
            long_values: Vec::new(),
            xml: Vec::with_capacity(64 * 1024),
            row_label: String::new(),
        })
    }

    /// Sheets come after the Summary (sheet1).
    fn next_sheet_file(&self) -> String {
        format!("xl/worksheets/sheet{}.xml", self.written.len() + 2)
    }

    fn add_data_sheet(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let name = self
            .names
            .data_sheet(&layout.data_type, self.type_sheets[t].len() + 1);
        self.type_sheets[t].push(name.clone());
        let file = self.next_sheet_file();
        let entry = self.zip.start_deflated(&file, LEVEL, out)?;
        let mut sample = Vec::with_capacity(64 * 1024);
        sheet::row_start(&mut sample, "1");
        for (c, col) in layout.columns.iter().enumerate() {
            let text = header_text(&col.name, self.options.neutralize_formulas);
            sheet::inline_string(&mut sample, &self.letters[c], "1", &text, Some(STYLE_BOLD));
        }
        sheet::row_end(&mut sample);
        self.open = Some(OpenSheet {
            entry,
            name,
            rows: 1,
            widths: initial_widths(layout),
            sample: Some(sample),
        });
        Ok(())
    }

    /// Writes `xml` into the open sheet's entry.
    fn emit(
        &mut self,
        xml_from_self: bool,
        extra: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let Some(open) = self.open.as_mut() else {
            return Err(FormatError::State("no sheet is open"));
        };
        let n = if xml_from_self {
            open.entry.write(&self.xml, out)?
        } else {
            open.entry.write(extra, out)?
        };
        self.zip.wrote(n)
    }

    /// Once the widths are known: the sheet's frame, then the sampled rows.
    fn flush_sample(&mut self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let Some(sample) = open.sample.take() else {
            return Ok(());
        };
        let mut head = Vec::with_capacity(1024);
        sheet::prefix(&mut head, &open.widths);
        self.emit(false, &head, out)?;
        self.emit(false, &sample, out)
    }

    fn close_data_sheet(
        &mut self,
        layout: &TypeLayout,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        self.flush_sample(out)?;
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let last_col = col_letters(col_num(layout.columns.len().max(1) - 1)?);
        let mut tail = Vec::with_capacity(256);
        sheet::suffix(&mut tail, open.rows - 1, &last_col);
        let mut entry = open.entry;
        let n = entry.write(&tail, out)?;
        self.zip.wrote(n)?;
        self.zip.finish_deflated(entry, out)?;
        self.written.push(Written {
            name: open.name,
            last_row: open.rows - 1,
            columns: layout.columns.len(),
            widths: open.widths,
            header: layout
                .columns
                .iter()
                .map(|c| header_text(&c.name, self.options.neutralize_formulas).into_owned())
                .collect(),
        });
        Ok(())
    }

    /// The workbook around the streamed sheets, written by rust_xlsxwriter.
    fn frame(&self, layouts: &[TypeLayout], counts: &[u64]) -> Result<Vec<u8>, FormatError> {
        let mut workbook = new_workbook(&self.info)?;
        let (bold, _) = super::formats();
        let ws = workbook.add_worksheet();
        ws.set_name(SUMMARY_SHEET)?;
        write_summary(
            ws,
            &self.info,
            layouts,
            counts,
            &self.type_sheets,
            !self.long_values.is_empty(),
        )?;
        for w in &self.written {
            // A stand-in with the real sheet's name, header, widths, pane and
            // filter range: the workbook's sheet list and filter names are
            // rust_xlsxwriter's; its sheet XML is replaced by the streamed one.
            let ws = workbook.add_worksheet();
            ws.set_name(&w.name)?;
            for (c, h) in w.header.iter().enumerate() {
                ws.write_string_with_format(0, col_num(c)?, h, &bold)?;
            }
            ws.set_freeze_panes(1, 0)?;
            ws.autofilter(0, 0, w.last_row, col_num(w.columns.max(1) - 1)?)?;
            for (c, width) in w.widths.iter().enumerate() {
                ws.set_column_width(col_num(c)?, column_width(*width))?;
            }
        }
        write_long_values(&mut workbook, &self.long_values)?;
        Ok(workbook.save_to_buffer()?)
    }
}

/// The frame's styles must give bold and date-time the indices the
/// streamed cells use.
fn check_styles(styles: &[u8]) -> Result<(), FormatError> {
    let s = String::from_utf8_lossy(styles);
    let xfs = s
        .split("<cellXfs")
        .nth(1)
        .and_then(|x| x.split("</cellXfs>").next())
        .unwrap_or_default();
    let xf: Vec<&str> = xfs.split("<xf ").skip(1).collect();
    let bold_ok = xf
        .get(sheet::STYLE_BOLD as usize)
        .is_some_and(|x| x.contains("fontId=\"1\"") && x.contains("numFmtId=\"0\""));
    let date_ok = xf
        .get(sheet::STYLE_DATETIME as usize)
        .is_some_and(|x| x.contains("numFmtId=\"164\"") && x.contains("fontId=\"0\""));
    let font_ok = s.contains("<fonts count=\"2\"><font><sz val=\"11\"/>")
        && s.split("</font>")
            .nth(1)
            .is_some_and(|f| f.starts_with("<font><b/>"));
    let fmt_ok = s.contains(&format!(
        "<numFmt numFmtId=\"164\" formatCode=\"{}\"/>",
        super::DATETIME_FORMAT
    ));
    if bold_ok && date_ok && font_ok && fmt_ok {
        Ok(())
    } else {
        Err(FormatError::Xlsx(
            "the workbook frame's styles are not the ones the streamed sheets use".into(),
        ))
    }
}

impl Backend for StreamingXlsx {
    fn defer_zip(&mut self) -> bool {
        self.zip = ZipWriter::deferred();
        true
    }

    fn begin(&mut self, layouts: &[TypeLayout], _out: &mut Vec<u8>) -> Result<(), FormatError> {
        self.type_sheets = vec![Vec::new(); layouts.len()];
        Ok(())
    }

    fn open_type(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        self.letters = (0..layout.columns.len())
            .map(|c| col_num(c).map(col_letters))
            .collect::<Result<_, _>>()?;
        self.add_data_sheet(t, layout, out)
    }

    fn row(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        cells: &[Cell<'_>],
        _record: Option<&Record>,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let full = self
            .open
            .as_ref()
            .is_some_and(|o| o.rows >= EXCEL_MAX_ROWS || o.entry.uncompressed() > MAX_SHEET_XML);
        if full {
            self.close_data_sheet(layout, out)?;
            self.add_data_sheet(t, layout, out)?;
        }
        let neutralise = self.options.neutralize_formulas;
        let Some(open) = self.open.as_mut() else {
            return Err(FormatError::State("no sheet is open"));
        };
        let row = open.rows;
        self.row_label.clear();
        self.row_label.push_str(itoa::Buffer::new().format(row + 1));
        self.xml.clear();
        sheet::row_start(&mut self.xml, &self.row_label);
        for (c, cell) in cells.iter().enumerate() {
            let datetime = layout.columns[c].kind == ColumnKind::Datetime;
            let (mut shown, mut width) =
                sheet_cell(cell, datetime, neutralise, row <= WIDTH_SAMPLE_ROWS);
            if let SheetCell::Text(text) = &shown {
                if let Some(pointer) =
                    long_value_pointer(text, &open.name, col_num(c)?, row, &mut self.long_values)
                {
                    shown = SheetCell::Text(pointer.into());
                    width = 40;
                }
            }
            sheet::cell(
                &mut self.xml,
                &self.letters[c],
                &self.row_label,
                &shown,
                None,
            );
            if row <= WIDTH_SAMPLE_ROWS && width > open.widths[c] {
                open.widths[c] = width;
            }
        }
        sheet::row_end(&mut self.xml);
        open.rows += 1;
        match open.sample.as_mut() {
            Some(sample) => {
                sample.extend_from_slice(&self.xml);
                if row >= WIDTH_SAMPLE_ROWS {
                    self.flush_sample(out)?;
                }
                Ok(())
            }
            None => self.emit(true, &[], out),
        }
    }

    fn close_type(
        &mut self,
        _t: usize,
        layout: &TypeLayout,
        _count: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        self.close_data_sheet(layout, out)
    }

    fn finish(
        &mut self,
        layouts: &[TypeLayout],
        counts: &[u64],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let frame = self.frame(layouts, counts)?;
        let entries = zip::read_entries(&frame)?;
        let streamed: std::collections::HashSet<String> = (0..self.written.len())
            .map(|i| format!("xl/worksheets/sheet{}.xml", i + 2))
            .collect();
        for e in &entries {
            if e.name == "xl/styles.xml" {
                check_styles(&zip::inflate(e)?)?;
            }
            if !streamed.contains(e.name) {
                self.zip.copy(e, out)?;
            }
        }
        let zip = std::mem::take(&mut self.zip);
        zip.finish(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame of a streamed sheet is what rust_xlsxwriter writes for the
    /// same sheet (but `<dimension>`, which streamed sheets leave out).
    #[test]
    fn the_sheet_frame_is_rust_xlsxwriters() {
        let widths = [2usize, 12, 12, 19, 40, 100, 5];
        let last_row = 1234u32;
        let mut wb = rust_xlsxwriter::Workbook::new();
        wb.add_worksheet().set_name("Summary").unwrap();
        let ws = wb.add_worksheet();
        ws.set_name("data").unwrap();
        let (bold, _) = super::super::formats();
        for c in 0..widths.len() {
            ws.write_string_with_format(0, c as u16, "h", &bold)
                .unwrap();
        }
        ws.set_freeze_panes(1, 0).unwrap();
        ws.autofilter(0, 0, last_row, widths.len() as u16 - 1)
            .unwrap();
        for (c, w) in widths.iter().enumerate() {
            ws.set_column_width(c as u16, column_width(*w)).unwrap();
        }
        let bytes = wb.save_to_buffer().unwrap();
        let entries = zip::read_entries(&bytes).unwrap();
        let sheet = entries
            .iter()
            .find(|e| e.name == "xl/worksheets/sheet2.xml")
            .unwrap();
        let xml = String::from_utf8(zip::inflate(sheet).unwrap()).unwrap();
        let dim_start = xml.find("<dimension").unwrap();
        let dim_end = dim_start + xml[dim_start..].find("/>").unwrap() + 2;
        let theirs_prefix = format!(
            "{}{}",
            &xml[..dim_start],
            &xml[dim_end..xml.find("<sheetData>").unwrap() + "<sheetData>".len()]
        );
        let theirs_suffix = &xml[xml.find("</sheetData>").unwrap()..];
        let mut prefix = Vec::new();
        sheet::prefix(&mut prefix, &widths);
        let mut suffix = Vec::new();
        sheet::suffix(&mut suffix, last_row, "G");
        assert_eq!(String::from_utf8(prefix).unwrap(), theirs_prefix);
        assert_eq!(String::from_utf8(suffix).unwrap(), theirs_suffix);
    }

    /// Streamed cells are what rust_xlsxwriter's constant-memory mode writes.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn streamed_rows_are_rust_xlsxwriters_constant_memory_rows() {
        use crate::format::{Cell, ExportFormat, ExportWriter};
        use crate::model::{Column, Manifest, TypeManifest};
        let columns = vec![
            Column::new("s", ColumnKind::String),
            Column::new("n", ColumnKind::Integer),
            Column::new("x", ColumnKind::Number),
            Column::new("b", ColumnKind::Boolean),
            Column::new("at", ColumnKind::Datetime),
        ];
        let mut manifest = Manifest::default();
        manifest.types.insert(
            "t".into(),
            TypeManifest {
                records: 1,
                columns: columns.clone(),
                records_url: None,
            },
        );
        let info = ExportInfo::new("export_1", time::OffsetDateTime::UNIX_EPOCH);
        let mut w = ExportWriter::new(
            ExportFormat::Xlsx,
            &manifest,
            &info,
            &FormatOptions::default(),
        )
        .unwrap();
        let mut file = w.begin().unwrap();
        let row = [
            Cell::Text(" a & b <c>\u{1}"),
            Cell::Int(-42),
            Cell::Float(0.1),
            Cell::Bool(true),
            Cell::Text("2025-10-24T19:50:00.000Z"),
        ];
        w.write_row(0, &row).unwrap();
        file.extend(w.finish().unwrap());
        let entries = zip::read_entries(&file).unwrap();
        let sheet = entries
            .iter()
            .find(|e| e.name == "xl/worksheets/sheet2.xml")
            .unwrap();
        let ours = String::from_utf8(zip::inflate(sheet).unwrap()).unwrap();
        let ours_row =
            &ours[ours.find("<row r=\"2\">").unwrap()..ours.find("</sheetData>").unwrap()];

        let dir = std::env::temp_dir();
        let mut wb = rust_xlsxwriter::Workbook::new();
        wb.set_tempdir(&dir).unwrap();
        let (bold, datetime) = super::super::formats();
        let ws = wb.add_worksheet_with_constant_memory().unwrap();
        ws.write_string_with_format(0, 0, "s", &bold).unwrap();
        ws.write_string(1, 0, " a & b <c>\u{1}").unwrap();
        ws.write_number(1, 1, -42).unwrap();
        ws.write_number(1, 2, 0.1).unwrap();
        ws.write_boolean(1, 3, true).unwrap();
        let dt = super::super::excel_datetime(
            crate::model::parse_timestamp("2025-10-24T19:50:00.000Z").unwrap(),
        )
        .unwrap();
        ws.write_datetime_with_format(1, 4, &dt, &datetime).unwrap();
        let bytes = wb.save_to_buffer().unwrap();
        let entries = zip::read_entries(&bytes).unwrap();
        let sheet = entries
            .iter()
            .find(|e| e.name == "xl/worksheets/sheet1.xml")
            .unwrap();
        let theirs = String::from_utf8(zip::inflate(sheet).unwrap()).unwrap();
        let theirs_row =
            &theirs[theirs.find("<row r=\"2\">").unwrap()..theirs.find("</sheetData>").unwrap()];
        assert_eq!(ours_row, theirs_row);
    }
}
