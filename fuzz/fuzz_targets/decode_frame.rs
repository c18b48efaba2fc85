//! The record-page decoder on any bytes, against columns of every kind.
#![no_main]

use handover::model::{Column, ColumnKind};
use handover::wire::decode_frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let columns = vec![
        Column { name: "id".into(), kind: ColumnKind::String },
        Column { name: "n".into(), kind: ColumnKind::Integer },
        Column { name: "x".into(), kind: ColumnKind::Number },
        Column { name: "b".into(), kind: ColumnKind::Boolean },
        Column { name: "at".into(), kind: ColumnKind::Datetime },
        Column { name: "j".into(), kind: ColumnKind::Json },
    ];
    let _ = decode_frame(data, &columns[..(data.first().copied().unwrap_or(0) as usize % 6) + 1]);
});
