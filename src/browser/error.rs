//! `ExportError`: the one error class JavaScript callers see.

use wasm_bindgen::prelude::*;

use crate::format::FormatError;

#[wasm_bindgen(module = "/js/errors.js")]
extern "C" {
    /// The JS `ExportError` class (for `instanceof` checks from Rust).
    #[derive(Debug, Clone)]
    pub type ExportError;

    #[wasm_bindgen(js_name = makeExportError)]
    fn make_export_error(
        code: &str,
        message: &str,
        status: Option<u16>,
        retry_after: Option<f64>,
        details: JsValue,
    ) -> JsValue;
}

#[wasm_bindgen(typescript_custom_section)]
const TS_EXPORT_ERROR: &'static str = r#"
/** The error every entry point of this package rejects or throws with. */
export class ExportError extends Error {
  readonly name: "ExportError";
  /** Stable machine-readable code: the server's (`RATE_LIMIT_EXCEEDED`, `VALIDATION_ERROR`, …)
   * or the client's (`INVALID_OPTIONS`, `INVALID_FORMAT`, `INVALID_RECORD`, `INVALID_DATE`,
   * `UNKNOWN_FIELD`, `NETWORK_ERROR`, `ABORTED`, …). */
  readonly code: string;
  /** HTTP status of the response that caused it, or null. */
  readonly status: number | null;
  /** Seconds to wait before trying again (rate limits), or null. */
  readonly retryAfter: number | null;
  /** Extra machine-readable context, or null. */
  readonly details: unknown;
  constructor(code: string, message: string, options?: { status?: number; retryAfter?: number; details?: unknown; cause?: unknown });
}
"#;

/// A JS `ExportError` with `code` and `message`.
pub(crate) fn export_error(code: &str, message: &str) -> JsValue {
    make_export_error(code, message, None, None, JsValue::NULL)
}

/// A JS `ExportError` with every field.
pub(crate) fn make_error(
    code: &str,
    message: &str,
    status: Option<u16>,
    retry_after: Option<f64>,
    details: JsValue,
) -> JsValue {
    make_export_error(code, message, status, retry_after, details)
}

impl From<FormatError> for JsValue {
    fn from(e: FormatError) -> Self {
        export_error(e.code(), &e.to_string())
    }
}
