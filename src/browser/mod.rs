//! The JavaScript surface of the package (wasm32 only): one file per
//! JS-facing concept. Everything here is a thin binding over the
//! target-agnostic core.

mod alloc;
mod copy;
mod download;
mod error;
mod export;
mod format_records;
mod http;
mod options;
mod output;
mod packer;

pub use copy::decrypt_export;
pub use error::ExportError;
pub use export::{check_export_options, export_data, wasm_memory_bytes};
pub use format_records::format_records;
pub use packer::FilePacker;
