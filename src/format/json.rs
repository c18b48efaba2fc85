//! The seed's JSON layout, written as a stream:
//! `{"export":{"request_id","generated_at","data_types","data":{type:[…]}},"metadata":{…}}`.

use super::{Backend, Cell, FormatError, TypeLayout};
use crate::model::{ExportInfo, Record, EXPORT_VERSION};

pub(crate) struct JsonBackend {
    info: ExportInfo,
    /// No record of the open type written yet (pages arrive in separate calls).
    first_in_type: bool,
}

impl JsonBackend {
    pub(crate) fn new(info: &ExportInfo) -> Self {
        Self {
            info: info.clone(),
            first_in_type: true,
        }
    }
}

fn push_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), FormatError> {
    // Serialising a JSON value or a string into a Vec cannot fail.
    serde_json::to_writer(out, v).map_err(|_| FormatError::State("JSON serialisation failed"))
}

impl Backend for JsonBackend {
    fn begin(&mut self, layouts: &[TypeLayout], out: &mut Vec<u8>) -> Result<(), FormatError> {
        out.extend_from_slice(b"{\"export\":{\"request_id\":");
        push_json(out, &self.info.request_id)?;
        out.extend_from_slice(b",\"generated_at\":");
        push_json(out, &self.info.generated_at_string())?;
        out.extend_from_slice(b",\"data_types\":");
        let names: Vec<&str> = layouts.iter().map(|l| l.data_type.as_str()).collect();
        push_json(out, &names)?;
        out.extend_from_slice(b",\"data\":{");
        Ok(())
    }

    fn open_type(
        &mut self,
        t: usize,
        layout: &TypeLayout,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if t > 0 {
            out.push(b',');
        }
        out.push(b'\n');
        push_json(out, &layout.data_type)?;
        out.extend_from_slice(b":[");
        self.first_in_type = true;
        Ok(())
    }

    fn row(
        &mut self,
        _t: usize,
        layout: &TypeLayout,
        cells: &[Cell<'_>],
        record: Option<&Record>,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if !self.first_in_type {
            out.push(b',');
        }
        self.first_in_type = false;
        out.push(b'\n');
        match record {
            // A record an app holds is written as it is (its own key order).
            Some(r) => push_json(out, r),
            None => {
                layout.push_json_row(cells, out);
                Ok(())
            }
        }
    }

    fn json_records(
        &mut self,
        json: &[u8],
        _count: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if !self.first_in_type {
            out.push(b',');
        }
        self.first_in_type = false;
        out.push(b'\n');
        out.extend_from_slice(json);
        Ok(())
    }

    fn close_type(
        &mut self,
        _t: usize,
        _layout: &TypeLayout,
        count: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if count > 0 {
            out.push(b'\n');
        }
        out.push(b']');
        Ok(())
    }

    fn finish(
        &mut self,
        _layouts: &[TypeLayout],
        counts: &[u64],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let total: u64 = counts.iter().sum();
        out.extend_from_slice(b"\n}},\"metadata\":{\"total_records\":");
        out.extend_from_slice(total.to_string().as_bytes());
        out.extend_from_slice(b",\"export_version\":");
        push_json(out, EXPORT_VERSION)?;
        // The seed's layout names the file's compression; the file itself is
        // plain JSON (HTTP may still compress it in transit).
        out.extend_from_slice(b",\"compression\":\"none\"");
        if let Some(range) = &self.info.date_range {
            out.extend_from_slice(b",\"date_range\":");
            push_json(out, range)?;
        }
        if let Some(a15) = &self.info.article_15 {
            out.extend_from_slice(b",\"article_15\":");
            push_json(out, a15)?;
        }
        if !self.info.failed_data_types.is_empty() {
            out.extend_from_slice(b",\"failed_data_types\":");
            push_json(out, &self.info.failed_data_types)?;
        }
        out.extend_from_slice(b"}}\n");
        Ok(())
    }
}
