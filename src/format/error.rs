use thiserror::Error;

/// Everything that can go wrong turning records into a file.
///
/// Each variant has a stable machine-readable [`code`](FormatError::code);
/// the browser module turns it into an `ExportError` with that code.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum FormatError {
    /// The format name is not `json`, `csv` or `xlsx`.
    #[error("unsupported export format {0:?}: use json, csv or xlsx")]
    InvalidFormat(String),
    /// A data type name is malformed or not part of the manifest.
    #[error("invalid data type {0:?}")]
    InvalidDataType(String),
    /// Records of a data type arrived after a later type had started.
    #[error("records of data type {0:?} arrived out of manifest order")]
    OutOfOrder(String),
    /// A record is not a JSON object, or the records are not an array.
    #[error("{data_type} record {index}: {reason}")]
    InvalidRecord {
        /// The data type.
        data_type: String,
        /// Zero-based index of the record within its data type.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A record has a field that the manifest has no column for; writing it
    /// anyway would drop it from flat formats, so it is refused.
    #[error("{data_type} record {index}: field {field:?} is not one of the data type's columns")]
    UnknownField {
        /// The data type.
        data_type: String,
        /// Zero-based index of the record within its data type.
        index: u64,
        /// The (dotted) field name.
        field: String,
    },
    /// A value in a datetime column is not a timestamp.
    #[error("{data_type} record {index}: field {field:?} is not a valid date-time: {value:?}")]
    InvalidDate {
        /// The data type.
        data_type: String,
        /// Zero-based index of the record within its data type.
        index: u64,
        /// The field name.
        field: String,
        /// The offending value (shortened).
        value: String,
    },
    /// A data type's columns are not usable (e.g. a name declared twice).
    #[error("data type {data_type}: {reason}")]
    InvalidColumns {
        /// The data type.
        data_type: String,
        /// What is wrong with its columns.
        reason: String,
    },
    /// The writer was used in the wrong order (e.g. records after finish).
    #[error("format writer misuse: {0}")]
    State(&'static str),
    /// The XLSX library refused something.
    #[error("xlsx: {0}")]
    Xlsx(String),
}

impl FormatError {
    /// The stable machine-readable code of this error.
    ///
    /// ```
    /// let e = handover::format::FormatError::InvalidFormat("pdf".into());
    /// assert_eq!(e.code(), "INVALID_FORMAT");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidFormat(_) => "INVALID_FORMAT",
            Self::InvalidDataType(_) | Self::OutOfOrder(_) => "INVALID_DATA_TYPE",
            Self::InvalidRecord { .. } => "INVALID_RECORD",
            Self::UnknownField { .. } => "UNKNOWN_FIELD",
            Self::InvalidDate { .. } => "INVALID_DATE",
            Self::InvalidColumns { .. } => "INVALID_COLUMNS",
            Self::State(_) => "INTERNAL_ERROR",
            Self::Xlsx(_) => "XLSX_ERROR",
        }
    }
}

impl From<rust_xlsxwriter::XlsxError> for FormatError {
    fn from(e: rust_xlsxwriter::XlsxError) -> Self {
        Self::Xlsx(e.to_string())
    }
}
