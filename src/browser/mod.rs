//! The JavaScript surface of the package (wasm32 only): one file per
//! JS-facing concept. Everything here is a thin binding over the
//! target-agnostic core.

mod download;
mod error;
mod export;
mod format_records;
mod http;
mod options;

pub use error::ExportError;
pub use export::export_data;
pub use format_records::format_records;
