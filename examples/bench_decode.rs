//! The browser's per-record work, natively: decode a stream of frames (as
//! saved from `…/records/{type}/stream`), write the file, hash it.
//!
//! `bench_decode CREATED_JSON FRAMES_NDJSON FORMAT` prints seconds per stage.

use std::time::Instant;

use handover::format::{Cell, ExportFormat, ExportWriter, FormatOptions};
use handover::model::{ExportInfo, Manifest};
use handover::wire::{decode_frame, WireCell};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let created: serde_json::Value = serde_json::from_slice(&std::fs::read(&args[0])?)?;
    let manifest: Manifest = serde_json::from_value(created["manifest"].clone())?;
    let info: ExportInfo = serde_json::from_value(created["export_info"].clone())?;
    let frames = std::fs::read(&args[1])?;
    let format: ExportFormat = args[2].parse()?;
    let columns = &manifest.types["payment_history"].columns;

    let t = Instant::now();
    let mut rows = 0;
    for line in frames.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        rows += decode_frame(line, columns)?.row_count();
    }
    let decode = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut w = ExportWriter::new(format, &manifest, &info, &FormatOptions::default())?;
    let mut out = w.begin()?.len();
    let mut sha = handover::Sha256Stream::default();
    let mut hash_s = 0.0;
    for line in frames.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let f = decode_frame(line, columns)?;
        let mut cells = Vec::with_capacity(columns.len());
        for row in f.rows() {
            cells.clear();
            cells.extend(row.iter().map(WireCell::as_cell));
            w.write_row(0, &cells)?;
        }
        let chunk = w.take_output();
        let h = Instant::now();
        sha.update(&chunk);
        hash_s += h.elapsed().as_secs_f64();
        out += chunk.len();
    }
    out += w.finish()?.len();
    let total = t.elapsed().as_secs_f64();
    let _: &[Cell] = &[];
    println!("{rows} rows, {out} bytes: decode {decode:.2} s; decode+write+hash {total:.2} s (hash {hash_s:.2} s)");
    Ok(())
}
