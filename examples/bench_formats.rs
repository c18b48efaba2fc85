//! Throughput and peak memory of the format writers: one process per run,
//! so the peak resident memory (VmHWM) is that run's alone.
//!
//! `cargo run --release -p handover --example bench_formats -- FORMAT RECORDS`
//! prints one table row: format, records, MB out, seconds, records/s, MB/s, peak MB.

use std::time::Instant;

use handover::format::{ExportFormat, ExportWriter, FormatOptions};
use handover::model::{Column, ColumnKind, ExportInfo, Manifest, Record, TypeManifest};
use serde_json::json;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let format: ExportFormat = args.next().as_deref().unwrap_or("csv").parse()?;
    let n: u64 = args.next().as_deref().unwrap_or("100000").parse()?;
    let columns = vec![
        Column::new("id", ColumnKind::String),
        Column::new("user_id", ColumnKind::String),
        Column::new("amount_cents", ColumnKind::Integer),
        Column::new("currency", ColumnKind::String),
        Column::new("status", ColumnKind::String),
        Column::new("failure_reason", ColumnKind::String),
        Column::new("created_at", ColumnKind::Datetime),
    ];
    let mut manifest = Manifest::default();
    manifest.types.insert(
        "payment_history".into(),
        TypeManifest {
            records: n,
            columns,
            records_url: None,
        },
    );
    let info = ExportInfo::new("export_bench", time::OffsetDateTime::UNIX_EPOCH);
    let started = Instant::now();
    let mut w = ExportWriter::new(format, &manifest, &info, &FormatOptions::default())?;
    let mut bytes = w.begin()?.len() as u64;
    let mut page: Vec<Record> = Vec::with_capacity(5000);
    const CURRENCIES: [&str; 3] = ["USD", "EUR", "GBP"];
    for i in 0..n {
        let currency = CURRENCIES[(i % 3) as usize];
        let r = json!({
            "id": format!("pay_{i:09}"), "user_id": "user_456", "amount_cents": 499 + (i % 20_000),
            "currency": currency, "status": "succeeded",
            "failure_reason": null, "created_at": format!("2025-{:02}-{:02}T10:{:02}:00.000Z", 1 + i % 12, 1 + i % 28, i % 60),
        });
        if let serde_json::Value::Object(m) = r {
            page.push(m);
        }
        if page.len() == 5000 || i + 1 == n {
            bytes += w.write_page("payment_history", &page)?.len() as u64; // dropped: streamed out
            page.clear();
        }
    }
    bytes += w.finish()?.len() as u64;
    let secs = started.elapsed().as_secs_f64();
    let mb = bytes as f64 / 1_048_576.0;
    println!(
        "| {:<5} | {:>9} | {:>8.1} | {:>6.2} | {:>10.0} | {:>6.1} | {:>7.1} |",
        format.as_str(),
        n,
        mb,
        secs,
        n as f64 / secs,
        mb / secs,
        peak_rss_mb()
    );
    Ok(())
}
