//! Prometheus metrics (the API reference's "Export Metrics": request
//! volume, processing time, file sizes, success rate), kept in atomics and
//! rendered in the text exposition format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Metrics {
    requests_2xx: AtomicU64,
    requests_4xx: AtomicU64,
    requests_5xx: AtomicU64,
    request_micros: AtomicU64,
    exports_created: AtomicU64,
    exports_completed: AtomicU64,
    exports_failed: AtomicU64,
    export_bytes: AtomicU64,
    export_records: AtomicU64,
    export_processing_ms: AtomicU64,
    bookkeeping_micros: AtomicU64,
    bookkeeping_count: AtomicU64,
}

impl Metrics {
    pub fn observe_request(&self, status: u16, elapsed: Duration) {
        match status {
            200..=399 => &self.requests_2xx,
            400..=499 => &self.requests_4xx,
            _ => &self.requests_5xx,
        }
        .fetch_add(1, Relaxed);
        self.request_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    pub fn export_created(&self) {
        self.exports_created.fetch_add(1, Relaxed);
    }

    pub fn export_completed(&self, bytes: u64, records: u64, processing: Duration) {
        self.exports_completed.fetch_add(1, Relaxed);
        self.export_bytes.fetch_add(bytes, Relaxed);
        self.export_records.fetch_add(records, Relaxed);
        self.export_processing_ms
            .fetch_add(processing.as_millis() as u64, Relaxed);
    }

    /// Time spent recording the progress of one record page or stream frame.
    pub fn observe_bookkeeping(&self, elapsed: Duration) {
        self.bookkeeping_count.fetch_add(1, Relaxed);
        self.bookkeeping_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    pub fn export_failed(&self) {
        self.exports_failed.fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let g = |a: &AtomicU64| a.load(Relaxed);
        let total = g(&self.requests_2xx) + g(&self.requests_4xx) + g(&self.requests_5xx);
        let _ = writeln!(
            s,
            "# HELP handover_http_requests_total HTTP requests answered, by status class."
        );
        let _ = writeln!(s, "# TYPE handover_http_requests_total counter");
        for (class, a) in [
            ("2xx", &self.requests_2xx),
            ("4xx", &self.requests_4xx),
            ("5xx", &self.requests_5xx),
        ] {
            let _ = writeln!(
                s,
                "handover_http_requests_total{{class=\"{class}\"}} {}",
                g(a)
            );
        }
        let _ = writeln!(
            s,
            "# HELP handover_http_request_duration_seconds Time spent answering requests."
        );
        let _ = writeln!(s, "# TYPE handover_http_request_duration_seconds summary");
        let _ = writeln!(
            s,
            "handover_http_request_duration_seconds_sum {}",
            g(&self.request_micros) as f64 / 1e6
        );
        let _ = writeln!(s, "handover_http_request_duration_seconds_count {total}");
        for (name, help, a) in [
            (
                "handover_exports_created_total",
                "Export requests created.",
                &self.exports_created,
            ),
            (
                "handover_exports_completed_total",
                "Exports completed.",
                &self.exports_completed,
            ),
            (
                "handover_exports_failed_total",
                "Exports failed.",
                &self.exports_failed,
            ),
            (
                "handover_export_bytes_total",
                "Bytes of completed export files.",
                &self.export_bytes,
            ),
            (
                "handover_export_records_total",
                "Records in completed exports.",
                &self.export_records,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                g(a)
            );
        }
        let _ = writeln!(s, "# HELP handover_export_processing_seconds Time from creation to completion of exports.");
        let _ = writeln!(s, "# TYPE handover_export_processing_seconds summary");
        let _ = writeln!(
            s,
            "handover_export_processing_seconds_sum {}",
            g(&self.export_processing_ms) as f64 / 1e3
        );
        let _ = writeln!(
            s,
            "handover_export_processing_seconds_count {}",
            g(&self.exports_completed)
        );
        let _ = writeln!(s, "# HELP handover_page_bookkeeping_seconds Time spent recording the progress of record pages and stream frames.");
        let _ = writeln!(s, "# TYPE handover_page_bookkeeping_seconds summary");
        let _ = writeln!(
            s,
            "handover_page_bookkeeping_seconds_sum {}",
            g(&self.bookkeeping_micros) as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "handover_page_bookkeeping_seconds_count {}",
            g(&self.bookkeeping_count)
        );
        s
    }
}
