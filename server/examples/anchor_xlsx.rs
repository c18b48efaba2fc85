//! The XLSX anchor of `scripts/bench.sh`: rust_xlsxwriter on its own, in
//! constant-memory mode with its default settings, writing the same rows
//! the export writes (one user's payments). The rows are read into memory
//! first and only the write is timed.
//!
//! `anchor_xlsx DB_FILE USER COMPANY OUT` prints `seconds peak_rss_mb`.

use std::time::Instant;

use rust_xlsxwriter::{ExcelDateTime, Format, Workbook};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

enum V {
    Null,
    Int(i64),
    Text(String),
    Date(String),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (db, user, company, out) = (&args[0], &args[1], &args[2], &args[3]);
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let columns = [
        "id",
        "user_id",
        "membership_id",
        "amount_cents",
        "currency",
        "status",
        "payment_method",
        "failure_reason",
        "created_at",
    ];
    let mut st = conn.prepare(
        "SELECT id, user_id, membership_id, amount_cents, currency, status, payment_method, failure_reason, created_at \
         FROM demo_payments WHERE user_id = ?1 AND company_id = ?2 ORDER BY id",
    )?;
    let mut rows: Vec<Vec<V>> = Vec::new();
    let mut q = st.query([user, company])?;
    while let Some(r) = q.next()? {
        let mut row = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            row.push(match r.get_ref(i)? {
                rusqlite::types::ValueRef::Null => V::Null,
                rusqlite::types::ValueRef::Integer(n) => V::Int(n),
                rusqlite::types::ValueRef::Text(t) if i == 8 => {
                    V::Date(String::from_utf8_lossy(t).into_owned())
                }
                rusqlite::types::ValueRef::Text(t) => {
                    V::Text(String::from_utf8_lossy(t).into_owned())
                }
                _ => V::Null,
            });
        }
        rows.push(row);
    }

    let started = Instant::now();
    let mut workbook = Workbook::new();
    let bold = Format::new().set_bold();
    let datetime = Format::new().set_num_format("yyyy-mm-dd hh:mm:ss");
    let ws = workbook.add_worksheet_with_constant_memory()?;
    for (c, name) in columns.iter().enumerate() {
        ws.write_string_with_format(0, c as u16, *name, &bold)?;
    }
    for (r, row) in rows.iter().enumerate() {
        let r = r as u32 + 1;
        for (c, v) in row.iter().enumerate() {
            let c = c as u16;
            match v {
                V::Null => {}
                V::Int(n) => {
                    ws.write_number(r, c, *n as f64)?;
                }
                V::Text(t) => {
                    ws.write_string(r, c, t)?;
                }
                V::Date(t) => {
                    ws.write_datetime_with_format(
                        r,
                        c,
                        &ExcelDateTime::parse_from_str(t)?,
                        &datetime,
                    )?;
                }
            }
        }
    }
    ws.set_freeze_panes(1, 0)?;
    ws.autofilter(0, 0, rows.len() as u32, columns.len() as u16 - 1)?;
    workbook.save(out)?;
    println!(
        "{:.3} {:.1}",
        started.elapsed().as_secs_f64(),
        peak_rss_mb()
    );
    Ok(())
}
