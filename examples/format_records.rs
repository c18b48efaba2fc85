//! Formats the seed's example records as CSV on stdout: the same writer the
//! browser module and handover-server use.
//!
//! `cargo run -p handover --example format_records [json|csv|xlsx] > file`

use std::io::Write;

use handover::format::{write_all, ExportFormat, FormatOptions};
use handover::model::ExportInfo;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let format: ExportFormat = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("csv")
        .parse()?;
    let data = serde_json::from_str(
        r#"{
          "user_profile": [{"id": "user_456", "email": "user@example.com", "username": "username",
                            "created_at": "2025-01-01T00:00:00Z"}],
          "payment_history": [{"id": "payment_123", "amount_cents": 2999, "currency": "USD",
                               "status": "succeeded", "created_at": "2025-10-24T19:50:00.000Z"}]
        }"#,
    )?;
    let info = ExportInfo::new("export_123456789", time::OffsetDateTime::now_utc());
    let bytes = write_all(format, &data, None, &info, &FormatOptions::default())?;
    std::io::stdout().write_all(&bytes)?;
    Ok(())
}
