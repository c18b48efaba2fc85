//! The JavaScript surface of the package (wasm32 only): one file per
//! JS-facing concept. Everything here is a thin binding over the
//! target-agnostic core.

mod error;
mod format_records;

pub use error::ExportError;
pub use format_records::format_records;
