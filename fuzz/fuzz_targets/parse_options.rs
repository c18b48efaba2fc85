//! exportData's options parser on any text: a result or a documented code.
#![no_main]

use handover::options::parse_options;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = parse_options(text) {
        assert!(["INVALID_OPTIONS", "INVALID_FORMAT", "INVALID_DATA_TYPE", "DATE_RANGE_INVALID"]
            .contains(&e.code));
    }
});
