//! The wire model shared by the browser module and `handover-server`.
//!
//! These types are what travels between the two sides (the manifest of a
//! `client` export; the pages of records are [`crate::wire`] frames) and
//! what the format writers consume, so the server and the browser cannot
//! drift apart.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The five data types of the Data Export API reference, in their documented
/// order. Operators may configure further types; these are the defaults.
pub const STANDARD_DATA_TYPES: [&str; 5] = [
    "user_profile",
    "payment_history",
    "membership_data",
    "recovery_cases",
    "consent_data",
];

/// Version written into every export's metadata.
pub const EXPORT_VERSION: &str = "1.0";

/// One record: an ordered map from field name to JSON value.
///
/// Field order is preserved (`serde_json` is built with `preserve_order`), so
/// the order a record was written in is the order it is exported in.
pub type Record = serde_json::Map<String, serde_json::Value>;

/// Whether `name` is acceptable as a data type name: 1–64 characters of
/// ASCII letters, digits, `_` and `-`, starting with a letter.
///
/// The restriction keeps data type names safe as JSON keys, CSV cells, URL
/// path segments and (after truncation) Excel sheet names.
///
/// ```
/// assert!(handover::model::is_valid_data_type_name("payment_history"));
/// assert!(!handover::model::is_valid_data_type_name("../etc"));
/// ```
pub fn is_valid_data_type_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The kind of a column: how a format writer should present its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnKind {
    /// Text.
    String,
    /// Whole numbers (exact up to 64 bits).
    Integer,
    /// Floating-point numbers.
    Number,
    /// `true` / `false`.
    Boolean,
    /// ISO-8601 / RFC 3339 timestamps; XLSX shows them as UTC date-times.
    Datetime,
    /// Arrays or objects, written as JSON text in flat formats.
    Json,
}

/// A column of a data type: its (possibly dotted, for nested objects) name
/// and its kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// Field name; `a.b` addresses field `b` of the object in field `a`.
    pub name: String,
    /// How values are presented.
    pub kind: ColumnKind,
}

impl Column {
    /// A column named `name` of kind `kind`.
    ///
    /// ```
    /// use handover::model::{Column, ColumnKind};
    /// let c = Column::new("amount_cents", ColumnKind::Integer);
    /// assert_eq!(c.name, "amount_cents");
    /// ```
    pub fn new(name: impl Into<String>, kind: ColumnKind) -> Self {
        Self {
            name: name.into(),
            kind,
        }
    }
}

/// What the manifest says about one data type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeManifest {
    /// Number of records the export of this type will contain.
    pub records: u64,
    /// The columns, in output order.
    pub columns: Vec<Column>,
    /// URL of the first page of records (client delivery only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_url: Option<String>,
}

/// The manifest of an export: for each requested data type, in export order,
/// its record count and columns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Manifest {
    /// Data type name → what is exported of it.
    pub types: IndexMap<String, TypeManifest>,
}

impl Manifest {
    /// Total number of records over all data types.
    ///
    /// ```
    /// let m = handover::model::Manifest::default();
    /// assert_eq!(m.total_records(), 0);
    /// ```
    pub fn total_records(&self) -> u64 {
        self.types.values().map(|t| t.records).sum()
    }
}

/// The date range an export is restricted to (either end may be open).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateRange {
    /// Inclusive start (RFC 3339).
    pub start: Option<String>,
    /// Inclusive end (RFC 3339).
    pub end: Option<String>,
}

impl DateRange {
    /// The bounds as UTC instants, written as the API writes timestamps
    /// (what a file states); a bound that does not parse stays as it is.
    /// A plain date as the end covers that whole day, as people mean it
    /// ("January 1 to January 31"): to its last microsecond.
    ///
    /// ```
    /// use handover::model::DateRange;
    /// let r = DateRange { start: Some("2025-01-01".into()), end: Some("2025-01-31".into()) };
    /// let c = r.canonical();
    /// assert_eq!(c.start.as_deref(), Some("2025-01-01T00:00:00.000Z"));
    /// assert_eq!(c.end.as_deref(), Some("2025-01-31T23:59:59.999999Z"));
    /// ```
    pub fn canonical(&self) -> DateRange {
        let start = self
            .start
            .as_ref()
            .map(|s| canonical_timestamp(s).unwrap_or_else(|| s.clone()));
        let end = self.end.as_ref().map(|s| {
            // Microseconds, as PostgreSQL keeps them (SQLite reads the first
            // three digits): nothing of the day's last millisecond is left out.
            let last_of_day = plain_date(s).map(|d| {
                format!(
                    "{:04}-{:02}-{:02}T23:59:59.999999Z",
                    d.year(),
                    u8::from(d.month()),
                    d.day()
                )
            });
            last_of_day
                .or_else(|| canonical_timestamp(s))
                .unwrap_or_else(|| s.clone())
        });
        DateRange { start, end }
    }

    /// Whether the start is not after the end, as the queries compare them
    /// ([`DateRange::canonical`]): `2025-01-02T10:00Z` to `2025-01-02` is a
    /// range (the end covers that day). An open end is always in order.
    ///
    /// ```
    /// use handover::model::DateRange;
    /// let r = |s: &str, e: &str| DateRange { start: Some(s.into()), end: Some(e.into()) };
    /// assert!(r("2025-01-02T10:00Z", "2025-01-02").is_ordered());
    /// assert!(!r("2025-01-03", "2025-01-02T23:00Z").is_ordered());
    /// ```
    pub fn is_ordered(&self) -> bool {
        match self.canonical() {
            DateRange {
                start: Some(s),
                end: Some(e),
            } => parse_timestamp(&s) <= parse_timestamp(&e),
            _ => true,
        }
    }
}

/// What a format writer needs to know about the export besides the records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// The export request's id, e.g. `export_123456789`.
    pub request_id: String,
    /// When the file was generated; also the XLSX creation time, so the same
    /// input gives the same bytes.
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
    /// The date range applied, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_range: Option<DateRange>,
    /// The data subject, if the writer should name them (XLSX summary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// What GDPR Article 15 asks beside the data (purposes, recipients,
    /// retention, source), as configured by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub article_15: Option<IndexMap<String, String>>,
    /// Data types that were asked for but could not be read, and why: the
    /// file holds the others (a partial export), and says so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_data_types: Vec<FailedDataType>,
}

/// A data type left out of an export because it could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedDataType {
    pub data_type: String,
    /// Why, in words fit for the data subject (no internal detail).
    pub reason: String,
}

impl ExportInfo {
    /// Export info with just a request id and generation time.
    ///
    /// ```
    /// let info = handover::model::ExportInfo::new("export_1", time::OffsetDateTime::UNIX_EPOCH);
    /// assert_eq!(info.generated_at_string(), "1970-01-01T00:00:00.000Z");
    /// ```
    pub fn new(request_id: impl Into<String>, generated_at: OffsetDateTime) -> Self {
        Self {
            request_id: request_id.into(),
            generated_at,
            date_range: None,
            user_id: None,
            article_15: None,
            failed_data_types: Vec::new(),
        }
    }

    /// `generated_at` in the API's timestamp style (`2025-10-25T19:50:00.000Z`).
    pub fn generated_at_string(&self) -> String {
        format_timestamp(self.generated_at)
    }
}

/// A date-time or date in any form [`parse_timestamp`] reads, written the
/// way the API writes timestamps; `None` when it does not parse.
///
/// ```
/// use handover::model::canonical_timestamp;
/// assert_eq!(canonical_timestamp("2025-01-01").as_deref(), Some("2025-01-01T00:00:00.000Z"));
/// assert_eq!(canonical_timestamp("2025-01-31T23:00:00+01:00").as_deref(), Some("2025-01-31T22:00:00.000Z"));
/// assert_eq!(canonical_timestamp("soon"), None);
/// ```
pub fn canonical_timestamp(s: &str) -> Option<String> {
    parse_timestamp(s).map(format_timestamp)
}

/// Formats a timestamp the way the API does: UTC, milliseconds, `Z`.
///
/// ```
/// let t = time::macros::datetime!(2025-10-25 19:50:00.5 +02:00);
/// assert_eq!(handover::model::format_timestamp(t), "2025-10-25T17:50:00.500Z");
/// ```
pub fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Parses a timestamp as accepted in datetime columns and API parameters:
/// RFC 3339 (`2025-10-24T19:50:00Z`, `…+02:00`), the same without seconds
/// (`2025-10-24T19:50Z`, as ISO 8601 allows), a date alone (`2025-10-24`,
/// midnight UTC), or a date and time without offset (UTC).
///
/// # Errors
///
/// Returns `None` when `s` is none of these.
///
/// ```
/// use handover::model::parse_timestamp;
/// let t = parse_timestamp("2025-10-24T21:50:00+02:00").unwrap();
/// assert_eq!(parse_timestamp("2025-10-24T19:50:00.5Z"), Some(time::macros::datetime!(2025-10-24 19:50:00.5 UTC)));
/// assert_eq!(handover::model::format_timestamp(t), "2025-10-24T19:50:00.000Z");
/// assert_eq!(parse_timestamp("2025-10-24T21:50+02:00"), Some(t));
/// assert_eq!(parse_timestamp("2025-10-24T19:50Z"), Some(t));
/// assert!(parse_timestamp("yesterday").is_none());
/// assert!(parse_timestamp("2025-10-24T19:5Z").is_none());
/// ```
pub fn parse_timestamp(s: &str) -> Option<OffsetDateTime> {
    if let Some(t) = parse_utc_fast(s.as_bytes()) {
        return Some(t);
    }
    if let Some(with_seconds) = add_seconds(s) {
        return parse_timestamp(&with_seconds);
    }
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    if let Some(d) = plain_date(s) {
        return Some(d.midnight().assume_utc());
    }
    let naive = time::macros::format_description!(
        "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    time::PrimitiveDateTime::parse(s, &naive)
        .ok()
        .map(|p| p.assume_utc())
}

/// `YYYY-MM-DD` alone.
fn plain_date(s: &str) -> Option<time::Date> {
    let date_fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &date_fmt).ok()
}

/// `YYYY-MM-DDTHH:MM` with no seconds, then an offset or nothing: the same
/// with `:00` seconds (which the parsers below then read).
fn add_seconds(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let shape = b.len() >= 16
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[11..13].iter().chain(&b[14..16]).all(u8::is_ascii_digit)
        && matches!(b.get(16), None | Some(b'Z' | b'z' | b'+' | b'-'));
    shape.then(|| format!("{}:00{}", &s[..16], &s[16..]))
}

/// The common shape `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, parsed without the
/// general parser (datetime cells are checked and converted per row);
/// `None` sends anything else to the general parser.
fn parse_utc_fast(b: &[u8]) -> Option<OffsetDateTime> {
    fn num(b: &[u8]) -> Option<u32> {
        b.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    }
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let (hour, minute, second) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    let nanos = match (b[19], b.last()) {
        (b'Z', _) if b.len() == 20 => 0,
        (b'.', Some(b'Z')) if (22..=30).contains(&b.len()) => {
            let frac = &b[20..b.len() - 1];
            num(frac)? * 10u32.pow(9 - frac.len() as u32)
        }
        _ => return None,
    };
    if second > 59 {
        return None;
    }
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(i32::try_from(year).ok()?, month, u8::try_from(day).ok()?)
            .ok()?;
    let t = time::Time::from_hms_nano(
        u8::try_from(hour).ok()?,
        u8::try_from(minute).ok()?,
        second as u8,
        nanos,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, t).assume_utc())
}

/// Whether `s` is a strict RFC 3339 timestamp (used when inferring columns:
/// only unambiguous timestamps make a column a datetime column):
/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)` with a real date, hours below
/// 24, minutes and seconds below 60. The npm package's JavaScript applies
/// the same rule (`js/format.js`), so records an app holds infer alike on
/// either side.
pub(crate) fn is_rfc3339(s: &str) -> bool {
    fn num(b: &[u8]) -> Option<u32> {
        b.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    }
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return false;
    }
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec)) = (
        num(&b[0..4]),
        num(&b[5..7]),
        num(&b[8..10]),
        num(&b[11..13]),
        num(&b[14..16]),
        num(&b[17..19]),
    ) else {
        return false;
    };
    let mut rest = &b[19..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&digits) {
            return false;
        }
        rest = &frac[digits..];
    }
    let zone_ok = match rest {
        b"Z" => true,
        [b'+' | b'-', hh @ .., b':', m1, m2] if hh.len() == 2 => {
            matches!((num(hh), num(&[*m1, *m2])), (Some(oh), Some(om)) if oh < 24 && om < 60)
        }
        _ => false,
    };
    let Ok(month) = time::Month::try_from(mo as u8) else {
        return false;
    };
    zone_ok
        && h < 24
        && mi < 60
        && sec < 60
        && mo <= 12
        && time::Date::from_calendar_date(y as i32, month, d.min(255) as u8).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_rfc3339_timestamps_all_parse() {
        for s in [
            "2025-10-24T19:50:00Z",
            "2025-10-24T19:50:00.1Z",
            "2025-10-24T19:50:00.123456789+02:00",
            "2024-02-29T23:59:59-23:59",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
        ] {
            assert!(is_rfc3339(s), "{s}");
            assert!(parse_timestamp(s).is_some(), "{s}");
            assert_eq!(
                OffsetDateTime::parse(s, &Rfc3339).ok(),
                parse_timestamp(s),
                "{s}"
            );
        }
        for s in [
            "2023-02-29T00:00:00Z",
            "2025-10-24T24:00:00Z",
            "2025-10-24T19:50:60Z",
            "2025-10-24 19:50:00Z",
            "2025-10-24t19:50:00Z",
            "2025-10-24T19:50:00z",
            "2025-10-24T19:50:00.Z",
            "2025-10-24T19:50:00.1234567890Z",
            "2025-10-24T19:50:00+24:00",
            "2025-10-24T19:50:00+0200",
            "2025-10-24",
            "2025-13-24T19:50:00Z",
        ] {
            assert!(!is_rfc3339(s), "{s}");
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_rfc3339_parser() {
        for s in [
            "2025-10-24T19:50:00Z",
            "2025-10-24T19:50:00.000Z",
            "2025-10-24T19:50:00.1Z",
            "2025-10-24T19:50:00.123456789Z",
            "2024-02-29T23:59:59.999Z",
            "2023-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-10-24T24:00:00Z",
            "2025-10-24T19:60:00Z",
            "2025-10-24T19:50:60Z",
            "2025-10-24T19:50:00.Z",
            "2025-10-24T19:50:00.1234567890Z",
            "2025-10-24t19:50:00Z",
            "2025-1a-24T19:50:00Z",
        ] {
            let fast = parse_utc_fast(s.as_bytes());
            if let Some(t) = fast {
                assert_eq!(Some(t), OffsetDateTime::parse(s, &Rfc3339).ok(), "{s}");
            } else {
                // Whatever the fast path leaves, the general parser decides.
                let _ = parse_timestamp(s);
            }
        }
        assert!(parse_timestamp("2023-02-29T00:00:00Z").is_none());
        assert!(parse_timestamp("2025-10-24T19:50:00.123Z").is_some());
    }
}
