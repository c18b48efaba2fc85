//! What a create request asks for, checked, and what it will cost: the
//! manifest (records and columns per type), the size estimate, the size
//! limit and the daily record quota. Used by the API and the CLI.

use handover::format::ExportFormat;
use handover::model::{parse_timestamp, Manifest, TypeManifest};
use handover::options::{MAX_METADATA_BYTES, MAX_METADATA_KEYS};
use serde_json::{json, Map, Value};

use crate::auth::Scope;
use crate::datatypes::{Range, Registry};
use crate::error::{ApiError, ApiResult};
use crate::store::exports::Delivery;
use crate::AppState;

const CREATE_FIELDS: [&str; 6] = [
    "export_format",
    "data_types",
    "date_range_start",
    "date_range_end",
    "metadata",
    "delivery",
];

fn parse_date(body: &Map<String, Value>, field: &str) -> ApiResult<Option<String>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        // Kept as given (the API echoes it); `Range::canonical` is what the
        // queries take.
        Some(Value::String(s)) => parse_timestamp(s).map(|_| Some(s.clone())).ok_or_else(|| {
            ApiError::validation(
                "DATE_RANGE_INVALID",
                field,
                format!("{field} must be an ISO 8601 date-time, got {s:?}"),
            )
        }),
        Some(_) => Err(ApiError::validation(
            "DATE_RANGE_INVALID",
            field,
            format!("{field} must be a string"),
        )),
    }
}

/// A create request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub format: ExportFormat,
    pub data_types: Vec<String>,
    pub range: Range,
    pub metadata: Value,
    pub delivery: Delivery,
}

/// Checks a create request body against the configured data types.
///
/// # Errors
///
/// `VALIDATION_ERROR` naming the field and the specific code
/// (`UNKNOWN_FIELD`, `INVALID_FORMAT`, `INVALID_DATA_TYPE`,
/// `DATE_RANGE_INVALID`, `INVALID_METADATA`, `INVALID_DELIVERY`).
pub fn validate_create(registry: &Registry, body: &Map<String, Value>) -> ApiResult<CreateRequest> {
    if let Some(k) = body.keys().find(|k| !CREATE_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::validation(
            "UNKNOWN_FIELD",
            k.clone(),
            format!("unknown field {k:?}"),
        ));
    }
    let format = match body.get("export_format") {
        Some(Value::String(s)) => s.parse::<ExportFormat>().map_err(|_| {
            ApiError::validation(
                "INVALID_FORMAT",
                "export_format",
                format!("unsupported export format {s:?}: use json, csv or xlsx"),
            )
        })?,
        None => {
            return Err(ApiError::validation(
                "INVALID_FORMAT",
                "export_format",
                "export_format is required (json, csv or xlsx)",
            ))
        }
        Some(_) => {
            return Err(ApiError::validation(
                "INVALID_FORMAT",
                "export_format",
                "export_format must be a string",
            ))
        }
    };
    let types = match body.get("data_types") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                "data_types",
                "data_types must name at least one data type",
            ))
        }
        None => {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                "data_types",
                "data_types is required",
            ))
        }
        Some(_) => {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                "data_types",
                "data_types must be an array of strings",
            ))
        }
    };
    let mut data_types = Vec::with_capacity(types.len());
    for (i, t) in types.iter().enumerate() {
        let field = format!("data_types[{i}]");
        let Value::String(name) = t else {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                field,
                "data types are strings",
            ));
        };
        if registry.get(name).is_none() {
            let known: Vec<&str> = registry.all().map(|t| t.name.as_str()).collect();
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                field,
                format!(
                    "unknown data type {name:?}; available: {}",
                    known.join(", ")
                ),
            ));
        }
        if data_types.contains(name) {
            return Err(ApiError::validation(
                "INVALID_DATA_TYPE",
                field,
                format!("data type {name:?} is listed twice"),
            ));
        }
        data_types.push(name.clone());
    }
    let range = Range {
        start: parse_date(body, "date_range_start")?,
        end: parse_date(body, "date_range_end")?,
    };
    if !range.is_ordered() {
        return Err(ApiError::validation(
            "DATE_RANGE_INVALID",
            "date_range_start",
            "date_range_start is after date_range_end",
        ));
    }
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(m)) => {
            if v.to_string().len() > MAX_METADATA_BYTES || m.len() > MAX_METADATA_KEYS {
                return Err(ApiError::validation(
                    "INVALID_METADATA",
                    "metadata",
                    format!("metadata must be at most {MAX_METADATA_BYTES} bytes and {MAX_METADATA_KEYS} keys"),
                ));
            }
            v.clone()
        }
        Some(_) => {
            return Err(ApiError::validation(
                "INVALID_METADATA",
                "metadata",
                "metadata must be an object",
            ))
        }
    };
    let delivery = match body.get("delivery") {
        None | Some(Value::Null) => Delivery::Server,
        Some(Value::String(s)) if s == "client" => Delivery::Client,
        Some(Value::String(s)) if s == "server" => Delivery::Server,
        Some(_) => {
            return Err(ApiError::validation(
                "INVALID_DELIVERY",
                "delivery",
                "delivery must be \"client\" or \"server\"",
            ))
        }
    };
    Ok(CreateRequest {
        format,
        data_types,
        range,
        metadata,
        delivery,
    })
}

/// Builds the manifest (counts and columns per type) and a size estimate.
///
/// # Errors
///
/// Database errors (a data type query that fails).
pub async fn plan(
    state: &AppState,
    scope: &Scope,
    data_types: &[String],
    range: &Range,
    export_id: Option<&str>,
) -> anyhow::Result<(Manifest, u64)> {
    let mut manifest = Manifest::default();
    let mut bytes = 0u64;
    let counts = state.source.counts(data_types, scope, range).await?;
    for (name, records) in data_types.iter().zip(counts) {
        let t = state
            .registry
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("data type {name} vanished"))?;
        if records > 0 {
            // A small sample gives the average record size (its JSON
            // values plus the keys a JSON record repeats); a sample that
            // cannot be read only makes the estimate rougher.
            let keys: u64 = t.columns.iter().map(|c| c.name.len() as u64 + 4).sum();
            let req = crate::source::PageRequest {
                data_type: name.clone(),
                owner: scope.clone(),
                range: range.clone(),
                after: None,
                limit: 20,
            };
            let avg = match state
                .source
                .read_page(req, crate::source::SizeSample::default())
                .await
            {
                Ok((sample, _)) if sample.rows > 0 => sample.json_bytes / sample.rows + keys,
                Ok(_) => 256,
                Err(e) => {
                    tracing::warn!(data_type = %name, error = %format!("{e:#}"), "could not sample records for the size estimate");
                    256
                }
            };
            bytes += avg * records;
        }
        manifest.types.insert(
            name.clone(),
            TypeManifest {
                records,
                columns: t.columns.clone(),
                records_url: export_id.map(|id| format!("/api/data/export/{id}/records/{name}")),
            },
        );
    }
    Ok((manifest, bytes + 512))
}

/// `FILE_TOO_LARGE` beyond the size limit; `QUOTA_EXCEEDED` when the
/// records exported in the last 24 hours would pass the daily quota.
///
/// # Errors
///
/// Those two, and database errors.
pub async fn check_size_and_quota(
    state: &AppState,
    scope: &Scope,
    manifest: &Manifest,
    estimated_bytes: u64,
) -> ApiResult<()> {
    let limit = state.settings.max_export_bytes;
    if estimated_bytes > limit {
        return Err(ApiError::validation(
            "FILE_TOO_LARGE",
            "date_range_start",
            format!(
                "the export would be about {} MB, over the limit of {} MB: reduce the date range or the data types",
                estimated_bytes / 1_048_576 + 1,
                limit / 1_048_576
            ),
        ));
    }
    check_quota(state, scope, manifest.total_records()).await
}

/// The daily record quota: `more` records on top of what the user's
/// exports of the last 24 hours handed over (re-read pages included).
///
/// # Errors
///
/// `429 QUOTA_EXCEEDED` with the seconds until enough leaves the window.
pub async fn check_quota(state: &AppState, scope: &Scope, more: u64) -> ApiResult<()> {
    check_quota_within(state, scope, more, 0).await
}

/// [`check_quota`], letting the user's records pass the quota by `slack`
/// (records a dropped connection lost after they were counted).
///
/// # Errors
///
/// `429 QUOTA_EXCEEDED` with the seconds until enough leaves the window.
pub async fn check_quota_within(
    state: &AppState,
    scope: &Scope,
    more: u64,
    slack: u64,
) -> ApiResult<()> {
    let day_ago = handover::model::format_timestamp(
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
    );
    let rows = state.store.records_requested_since(scope, &day_ago).await?;
    let quota = state.settings.daily_record_quota;
    let used: u64 = rows.iter().map(|(n, _)| *n).sum();
    if used + more > quota.saturating_add(slack) {
        // Space frees up as the oldest exports leave the 24-hour window.
        let needed = (used + more).saturating_sub(quota);
        let mut freed = 0;
        let mut until = None;
        for (n, at) in &rows {
            freed += *n;
            until = parse_timestamp(at);
            if freed >= needed {
                break;
            }
        }
        let retry_after = until
            .map(|t| {
                (t + time::Duration::days(1) - time::OffsetDateTime::now_utc())
                    .whole_seconds()
                    .max(1) as u64
            })
            .unwrap_or(86_400);
        return Err(ApiError::QuotaExceeded { quota, retry_after });
    }
    Ok(())
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,16}".prop_map(Value::from),
            prop_oneof![
                Just("json"),
                Just("csv"),
                Just("xlsx"),
                Just("user_profile"),
                Just("2025-01-01T00:00:00Z")
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("export_format".to_string()),
            Just("data_types".to_string()),
            Just("date_range_start".to_string()),
            Just("date_range_end".to_string()),
            Just("metadata".to_string()),
            Just("delivery".to_string()),
            ".{0,10}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_create_body_is_accepted_or_refused_with_a_named_field(body in proptest::collection::btree_map(field(), json_value(), 0..7)) {
            let registry = Registry::load_for(None, crate::store::Engine::Sqlite).unwrap();
            let body: Map<String, Value> = body.into_iter().collect();
            match validate_create(&registry, &body) {
                Ok(req) => {
                    prop_assert!(!req.data_types.is_empty());
                    prop_assert!(req.data_types.iter().all(|t| registry.get(t).is_some()));
                }
                Err(ApiError::Validation { code, field, .. }) => {
                    prop_assert!(!code.is_empty());
                    // The field is named (an unknown key is named as sent, even "").
                    prop_assert!(!field.is_empty() || code == "UNKNOWN_FIELD");
                }
                Err(e) => prop_assert!(false, "unexpected error {e:?}"),
            }
        }
    }
}
