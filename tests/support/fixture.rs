//! The shared fixture of the format tests, used natively and in the browser.
#![allow(dead_code)]

/// The seed's example records plus the hard cases.
pub const FIXTURE_JSON: &str = include_str!("../fixtures/records.json");
pub const REQUEST_ID: &str = "export_123456789";
pub const GENERATED_AT: &str = "2025-10-25T19:50:00.000Z";
pub const GOLDEN_JSON: &[u8] = include_bytes!("../golden/fixture.json");
pub const GOLDEN_CSV: &[u8] = include_bytes!("../golden/fixture.csv");
pub const GOLDEN_XLSX: &[u8] = include_bytes!("../golden/fixture.xlsx");
