//! Server builds: rust_xlsxwriter's constant-memory mode. Data sheets write
//! each row to a temporary file as it arrives, the workbook is assembled on
//! disk at the end and handed out in pieces, so memory stays flat whatever
//! the size (native only: it needs a filesystem).

use std::io::{BufReader, Read as _, Seek as _};
use std::path::{Path, PathBuf};

use rust_xlsxwriter::{Format, Workbook};

use super::{
    col_num, column_width, formats, header_text, initial_widths, long_value_pointer, new_workbook,
    sheet_cell, write_long_values, write_summary, LongValue, SheetCell, SheetNames, EXCEL_MAX_ROWS,
    SUMMARY_SHEET, WIDTH_SAMPLE_ROWS,
};
use crate::format::{Backend, Cell, FormatError, FormatOptions, TypeLayout};
use crate::model::{ColumnKind, ExportInfo, Record};

/// Pieces of the assembled workbook handed out per call.
const TAIL_PIECE: u64 = 1 << 20;

pub(crate) struct ConstantMemoryXlsx {
    workbook: Workbook,
    info: ExportInfo,
    options: FormatOptions,
    bold: Format,
    datetime: Format,
    names: SheetNames,
    /// Sheet names of each data type (more than one after a rollover).
    type_sheets: Vec<Vec<String>>,
    /// State of the data sheet being written.
    sheet: usize,
    sheet_name: String,
    row: u32,
    widths: Vec<usize>,
    long_values: Vec<LongValue>,
    tempdir: PathBuf,
    assembled: Option<BufReader<std::fs::File>>,
}

fn io(e: std::io::Error) -> FormatError {
    FormatError::Xlsx(format!("temporary file: {e}"))
}

impl ConstantMemoryXlsx {
    /// A writer whose data sheets use rust_xlsxwriter's constant-memory
    /// mode, with temporary files in `tempdir`.
    pub(crate) fn new(
        info: &ExportInfo,
        options: &FormatOptions,
        tempdir: &Path,
    ) -> Result<Self, FormatError> {
        let mut workbook = new_workbook(info)?;
        workbook.set_tempdir(tempdir)?;
        // Deflate at level 6 took a third of a million-row build; level 3
        // costs a tenth more space for much less time.
        workbook.set_zip_compression_level(3);
        let (bold, datetime) = formats();
        Ok(Self {
            workbook,
            info: info.clone(),
            options: options.clone(),
            bold,
            datetime,
            names: SheetNames::new(),
            type_sheets: Vec::new(),
            sheet: 0,
            sheet_name: String::new(),
            row: 0,
            widths: Vec::new(),
            long_values: Vec::new(),
            tempdir: tempdir.to_path_buf(),
            assembled: None,
        })
    }

    fn add_data_sheet(&mut self, t: usize, layout: &TypeLayout) -> Result<(), FormatError> {
        let name = self
            .names
            .data_sheet(&layout.data_type, self.type_sheets[t].len() + 1);
        self.type_sheets[t].push(name.clone());
        let neutralise = self.options.neutralize_formulas;
        let ws = self.workbook.add_worksheet_with_constant_memory()?;
        ws.set_name(&name)?;
        for (c, col) in layout.columns.iter().enumerate() {
            ws.write_string_with_format(
                0,
                col_num(c)?,
                header_text(&col.name, neutralise),
                &self.bold,
            )?;
        }
        ws.set_freeze_panes(1, 0)?;
        self.sheet = self.workbook.worksheets().len() - 1;
        self.sheet_name = name;
        self.row = 0;
        self.widths = initial_widths(layout);
        Ok(())
    }

    fn close_data_sheet(&mut self, layout: &TypeLayout) -> Result<(), FormatError> {
        let ws = self.workbook.worksheet_from_index(self.sheet)?;
        let last_col = col_num(layout.columns.len().max(1) - 1)?;
        ws.autofilter(0, 0, self.row, last_col)?;
        for (c, w) in self.widths.iter().enumerate() {
            ws.set_column_width(col_num(c)?, column_width(*w))?;
        }
        Ok(())
    }
}

impl Backend for ConstantMemoryXlsx {
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
        let neutralise = self.options.neutralize_formulas;
        for (c, cell) in cells.iter().enumerate() {
            let col = col_num(c)?;
            let datetime = layout.columns[c].kind == ColumnKind::Datetime;
            let (cell, mut width) =
                sheet_cell(cell, datetime, neutralise, row <= WIDTH_SAMPLE_ROWS);
            let ws = self.workbook.worksheet_from_index(self.sheet)?;
            match cell {
                SheetCell::Empty => {}
                SheetCell::Bool(b) => {
                    ws.write_boolean(row, col, b)?;
                }
                SheetCell::Number(n) => {
                    ws.write_number(row, col, n)?;
                }
                SheetCell::DateTime(dt) => {
                    ws.write_datetime_with_format(row, col, &dt, &self.datetime)?;
                }
                SheetCell::Text(text) => {
                    match long_value_pointer(
                        &text,
                        &self.sheet_name,
                        col,
                        row,
                        &mut self.long_values,
                    ) {
                        Some(pointer) => {
                            ws.write_string(row, col, &pointer)?;
                            width = 40;
                        }
                        None => {
                            ws.write_string(row, col, text.as_ref())?;
                        }
                    }
                }
            }
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
        _out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let ws = self.workbook.worksheet_from_index(0)?;
        write_summary(
            ws,
            &self.info,
            layouts,
            counts,
            &self.type_sheets,
            !self.long_values.is_empty(),
        )?;
        write_long_values(&mut self.workbook, &self.long_values)?;
        // Saved to a temporary file and handed out by `tail`, so the
        // workbook never sits in memory whole.
        let file = tempfile::tempfile_in(&self.tempdir).map_err(io)?;
        let mut writer = std::io::BufWriter::new(file);
        self.workbook.save_to_writer(&mut writer)?;
        let mut file = writer.into_inner().map_err(|e| io(e.into_error()))?;
        file.rewind().map_err(io)?;
        self.assembled = Some(BufReader::new(file));
        Ok(())
    }

    fn tail(&mut self) -> Result<Option<Vec<u8>>, FormatError> {
        let Some(file) = self.assembled.as_mut() else {
            return Ok(None);
        };
        let mut piece = Vec::with_capacity(TAIL_PIECE as usize);
        file.by_ref()
            .take(TAIL_PIECE)
            .read_to_end(&mut piece)
            .map_err(io)?;
        if piece.is_empty() {
            self.assembled = None;
            return Ok(None);
        }
        Ok(Some(piece))
    }
}
