//! `exportData`'s options, checked before any request is made: the plain
//! data part (everything but the callbacks and the `AbortSignal`), read from
//! its JSON text. Target-agnostic, so the checks are property-tested
//! natively; `src/browser/options.rs` adds the live objects.

use serde::Deserialize;
use serde_json::Value;

use crate::format::{ExportFormat, FormatOptions};
use crate::model::{is_valid_data_type_name, parse_timestamp, DateRange};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Raw {
    base_url: Option<String>,
    token: Option<String>,
    company_id: Option<String>,
    format: Option<String>,
    data_types: Option<Vec<Value>>,
    date_range: Option<RawDateRange>,
    metadata: Option<Value>,
    download: Option<bool>,
    filename: Option<String>,
    page_size: Option<u32>,
    retries: Option<u32>,
    retry_base_ms: Option<u32>,
    max_retry_after_seconds: Option<u32>,
    request_timeout_ms: Option<u32>,
    neutralize_formulas: Option<bool>,
    csv: Option<RawCsv>,
    storage: Option<String>,
    worker: Option<bool>,
    release_file_after_ms: Option<u32>,
    keep_copy: Option<bool>,
    copy_link_base: Option<String>,
    copy_part_bytes: Option<u32>,
}

/// `dateRange` as a caller gives it: strict, so that `{ from, to }` is an
/// error rather than an export of everything.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDateRange {
    start: Option<String>,
    end: Option<String>,
}

impl RawDateRange {
    /// The range, once both ends are ISO-8601 and in order, as given.
    pub(crate) fn check(self, name: &str) -> Result<DateRange, OptionsError> {
        for v in [&self.start, &self.end].into_iter().flatten() {
            if parse_timestamp(v).is_none() {
                return Err(refuse(
                    "DATE_RANGE_INVALID",
                    format!("{name}: {v:?} is not an ISO-8601 date-time"),
                ));
            }
        }
        let range = DateRange {
            start: self.start,
            end: self.end,
        };
        if !range.is_ordered() {
            return Err(refuse(
                "DATE_RANGE_INVALID",
                format!("{name}: start is after end"),
            ));
        }
        Ok(range)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCsv {
    bom: Option<bool>,
}

/// Where the finished file is built (`storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoragePref {
    /// The Origin Private File System in a worker, memory otherwise.
    Auto,
    /// Always `Blob` parts in memory.
    Memory,
    /// The Origin Private File System, or an error where there is none.
    Opfs,
}

/// The checked options of one export.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedOptions {
    /// Without a trailing slash; empty: the page's own origin.
    pub base_url: String,
    pub token: String,
    pub company_id: String,
    pub format: ExportFormat,
    /// Empty: every type the server offers.
    pub data_types: Vec<String>,
    pub date_range: Option<DateRange>,
    pub metadata: Option<Value>,
    pub download: bool,
    pub filename: Option<String>,
    pub page_size: u32,
    pub max_attempts: u32,
    pub retry_base_ms: u32,
    pub max_retry_after_secs: u32,
    pub request_timeout_ms: u32,
    pub format_options: FormatOptions,
    pub storage: StoragePref,
    /// `Some(base)`: keep an encrypted copy, its link on `base` (`None`
    /// inside: the calling page).
    pub keep_copy: Option<Option<String>>,
    /// Plaintext bytes per uploaded part of the copy.
    pub copy_part_bytes: u32,
}

/// Why options were refused: a stable code and a message naming the option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OptionsError {
    /// `INVALID_OPTIONS`, `INVALID_FORMAT`, `INVALID_DATA_TYPE` or `DATE_RANGE_INVALID`.
    pub code: &'static str,
    pub message: String,
}

fn invalid(msg: impl Into<String>) -> OptionsError {
    OptionsError {
        code: "INVALID_OPTIONS",
        message: msg.into(),
    }
}

fn refuse(code: &'static str, msg: impl Into<String>) -> OptionsError {
    OptionsError {
        code,
        message: msg.into(),
    }
}

/// Reads an options object. A value of the wrong type
/// is refused naming the option (`options.pageSize: invalid value: …`), with
/// the code of the option's own checks: `INVALID_FORMAT` for `format`,
/// `INVALID_DATA_TYPE` for `dataTypes`, `DATE_RANGE_INVALID` for
/// `dateRange`, `INVALID_OPTIONS` for the rest and for unknown names.
pub(crate) fn read_options<T: serde::de::DeserializeOwned>(
    value: Value,
    what: &str,
) -> Result<T, OptionsError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let option = match e.path().iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) => key.as_str(),
            _ => "",
        };
        let code = match option {
            "format" => "INVALID_FORMAT",
            "dataTypes" => "INVALID_DATA_TYPE",
            "dateRange" => "DATE_RANGE_INVALID",
            _ => "INVALID_OPTIONS",
        };
        let at = if option.is_empty() {
            String::new()
        } else {
            format!(".{}", e.path())
        };
        refuse(code, format!("{what}{at}: {}", e.inner()))
    })
}

fn required(v: Option<String>, name: &str) -> Result<String, OptionsError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(invalid(format!(
            "options.{name} is required (a non-empty string)"
        ))),
    }
}

/// The server's limits on `metadata`: its JSON text, and its keys (the
/// server checks a create against the same constants).
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_METADATA_KEYS: usize = 50;

/// `token` and `companyId` travel in request headers: printable ASCII only
/// (a line break or a non-Latin-1 character would make the browser refuse
/// the header, after the checks), and a token has no spaces.
fn header_safe(v: String, name: &str, spaces: bool) -> Result<String, OptionsError> {
    // Surrounding whitespace (a token read from a file, with its line
    // break) is what the browser and the server trim from a header anyway.
    let v = v.trim();
    if v.bytes()
        .all(|b| b.is_ascii_graphic() || (spaces && b == b' '))
    {
        Ok(v.to_string())
    } else {
        Err(invalid(format!(
            "options.{name} must be printable ASCII{} (it is sent in a header)",
            if spaces { "" } else { " without spaces" }
        )))
    }
}

fn is_http_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// Whether `url` names a user or password, read as the browser's URL
/// parser reads it: spaces and controls around it are ignored, tabs and
/// newlines inside dropped, the scheme in any case; after `http:` or
/// `https:` any run of `/` and `\` leads to the host, after another scheme
/// `//` does, and without a scheme two of them do.
fn has_credentials(url: &str) -> bool {
    let url: String = url
        .trim_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let scheme = url.split_once(':').map(|(s, _)| s).filter(|s| {
        s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let authority_from = match scheme {
        Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {
            Some(&url[s.len() + 1..])
        }
        Some(s) => url[s.len() + 1..].strip_prefix("//"),
        None => (url.len() - url.trim_start_matches(['/', '\\']).len() >= 2).then_some(&url[..]),
    };
    authority_from.is_some_and(|rest| {
        rest.trim_start_matches(['/', '\\'])
            .split(['/', '\\', '?', '#'])
            .next()
            .is_some_and(|authority| authority.contains('@'))
    })
}

/// Checks the options' JSON text (without `onProgress` and `signal`).
///
/// ```
/// use handover::options::parse_options;
/// let o = parse_options(r#"{"token": "hov_x", "companyId": "c1", "format": "csv", "pageSize": 500}"#).unwrap();
/// assert_eq!((o.page_size, o.format.as_str()), (500, "csv"));
/// let e = parse_options(r#"{"token": "hov_x", "companyId": "c1", "pageSiz": 5}"#).unwrap_err();
/// assert_eq!(e.code, "INVALID_OPTIONS");
/// ```
///
/// # Errors
///
/// An [`OptionsError`] naming the option: `INVALID_OPTIONS` (unknown
/// names, wrong types, out-of-range numbers), `INVALID_FORMAT`,
/// `INVALID_DATA_TYPE`, `DATE_RANGE_INVALID`.
pub fn parse_options(json: &str) -> Result<CheckedOptions, OptionsError> {
    let raw: Raw =
        match serde_json::from_str::<Value>(json) {
            Ok(v @ Value::Object(_)) => read_options(v, "options")?,
            _ => return Err(invalid(
                "exportData needs an options object: { baseUrl, token, companyId, dataTypes, … }",
            )),
        };
    let base_url = raw
        .base_url
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string();
    // fetch refuses a URL with a user name or password; say so first, and
    // without echoing the secret.
    if has_credentials(&base_url) {
        return Err(invalid(
            "options.baseUrl must not contain a user name or password: the token authenticates",
        ));
    }
    if !(base_url.is_empty() || is_http_url(&base_url) || base_url.starts_with('/')) {
        return Err(invalid(format!(
            "options.baseUrl {base_url:?} must be an http(s) URL"
        )));
    }
    let token = header_safe(required(raw.token, "token")?, "token", false)?;
    let company_id = header_safe(required(raw.company_id, "companyId")?, "companyId", true)?;
    let format: ExportFormat = raw
        .format
        .as_deref()
        .unwrap_or("json")
        .parse()
        .map_err(|e: crate::format::FormatError| refuse(e.code(), e.to_string()))?;
    // Absent: every data type the server offers (the GDPR default: all of
    // it), asked of the server when the export starts. Present: at least one.
    let types =
        match raw.data_types {
            None => Vec::new(),
            Some(t) if t.is_empty() => return Err(refuse(
                "INVALID_DATA_TYPE",
                "options.dataTypes must name at least one data type (leave it out for all of them)",
            )),
            Some(t) => t,
        };
    let mut data_types = Vec::with_capacity(types.len());
    for t in types {
        match t {
            Value::String(s) if is_valid_data_type_name(&s) && !data_types.contains(&s) => {
                data_types.push(s)
            }
            other => {
                return Err(refuse(
                    "INVALID_DATA_TYPE",
                    format!("options.dataTypes: {other} is not a valid, unique data type name"),
                ))
            }
        }
    }
    let date_range = raw
        .date_range
        .map(|r| r.check("options.dateRange"))
        .transpose()?;
    if let Some(m) = &raw.metadata {
        match m {
            Value::Object(keys)
                if keys.len() > MAX_METADATA_KEYS
                    || m.to_string().len() > MAX_METADATA_BYTES =>
            {
                return Err(invalid(format!(
                    "options.metadata must be at most {MAX_METADATA_BYTES} bytes of JSON and {MAX_METADATA_KEYS} keys"
                )))
            }
            Value::Object(_) => {}
            _ => return Err(invalid("options.metadata must be an object")),
        }
    }
    let page_size = raw.page_size.unwrap_or(1000);
    if !(1..=5000).contains(&page_size) {
        return Err(invalid("options.pageSize must be from 1 to 5000"));
    }
    let max_attempts = raw.retries.unwrap_or(6);
    if !(1..=20).contains(&max_attempts) {
        return Err(invalid("options.retries must be from 1 to 20"));
    }
    let request_timeout_ms = raw.request_timeout_ms.unwrap_or(60_000);
    if !(100..=600_000).contains(&request_timeout_ms) {
        return Err(invalid(
            "options.requestTimeoutMs must be from 100 to 600000",
        ));
    }
    let storage = match raw.storage.as_deref() {
        None | Some("auto") => StoragePref::Auto,
        Some("memory") => StoragePref::Memory,
        Some("opfs") => StoragePref::Opfs,
        Some(other) => {
            return Err(invalid(format!(
                "options.storage {other:?} must be \"auto\", \"opfs\" or \"memory\""
            )))
        }
    };
    // Read by the package's JavaScript (the worker and the file's
    // release); checked here so that a typo is caught either way.
    let _ = raw.worker;
    if raw.release_file_after_ms.is_some_and(|ms| ms > 86_400_000) {
        return Err(invalid(
            "options.releaseFileAfterMs must be at most a day (86400000)",
        ));
    }
    if let Some(f) = &raw.filename {
        if f.trim().is_empty() || f.contains(['/', '\\']) {
            return Err(invalid("options.filename must be a plain file name"));
        }
    }
    if let Some(base) = &raw.copy_link_base {
        if !is_http_url(base) {
            return Err(invalid(format!(
                "options.copyLinkBase {base:?} must be an http(s) URL"
            )));
        }
    }
    let copy_part_bytes = raw.copy_part_bytes.unwrap_or(4 << 20);
    if !(64 << 10..=8 << 20).contains(&copy_part_bytes) {
        return Err(invalid(
            "options.copyPartBytes must be from 65536 to 8388608",
        ));
    }
    let keep_copy = raw.keep_copy.unwrap_or(false).then_some(raw.copy_link_base);
    Ok(CheckedOptions {
        keep_copy,
        copy_part_bytes,
        base_url,
        token,
        company_id,
        format,
        data_types,
        date_range,
        metadata: raw.metadata,
        download: raw.download.unwrap_or(true),
        filename: raw.filename,
        page_size,
        max_attempts,
        retry_base_ms: raw.retry_base_ms.unwrap_or(250).min(60_000),
        max_retry_after_secs: raw.max_retry_after_seconds.unwrap_or(120),
        request_timeout_ms,
        format_options: FormatOptions {
            neutralize_formulas: raw.neutralize_formulas.unwrap_or(true),
            csv_bom: raw.csv.and_then(|c| c.bom).unwrap_or(false),
        },
        storage,
    })
}
