//! # handover
//!
//! GDPR "download my data" for web apps. This crate is the target-agnostic
//! core shared by the browser module (compiled to WebAssembly) and
//! `handover-server`: the wire [`model`], the streaming [`format`] writers
//! (JSON, CSV, XLSX) and file [`checksum`]s. The JavaScript bindings live in
//! `src/browser/` and exist only on `wasm32`.

pub mod crypto;
pub mod format;
pub mod model;
pub mod options;
pub mod wire;

mod checksum;
pub use checksum::Sha256Stream;

#[cfg(target_arch = "wasm32")]
pub mod browser;
