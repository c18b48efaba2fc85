//! The XML of a streamed data sheet: the frame around the rows is what
//! rust_xlsxwriter writes for the same sheet (a test compares them), the
//! rows are what its constant-memory mode writes (inline strings). Streamed
//! sheets leave out `<dimension>`, which is optional and not known until the
//! last row.

use super::{column_width, SheetCell};

/// Style of header cells (bold) and of date-time cells: the workbook frame
/// that rust_xlsxwriter writes uses these indices (checked when it is built).
pub(crate) const STYLE_BOLD: u32 = 1;
pub(crate) const STYLE_DATETIME: u32 = 2;

const HEAD: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<worksheet xmlns=\"http://schemas.openxmlformats.org/spreadsheetml/2006/main\" xmlns:r=\"http://schemas.openxmlformats.org/officeDocument/2006/relationships\">";
const VIEWS: &str = "<sheetViews><sheetView workbookViewId=\"0\"><pane ySplit=\"1\" topLeftCell=\"A2\" activePane=\"bottomLeft\" state=\"frozen\"/><selection pane=\"bottomLeft\"/></sheetView></sheetViews><sheetFormatPr defaultRowHeight=\"15\"/>";
const MARGINS: &str = "<pageMargins left=\"0.7\" right=\"0.7\" top=\"0.75\" bottom=\"0.75\" header=\"0.3\" footer=\"0.3\"/></worksheet>";

/// Excel's pixel width of a column `chars` characters wide (Calibri 11).
fn pixels(chars: f64) -> u32 {
    if chars == 0.0 {
        0
    } else if chars < 1.0 {
        (chars * 12.0).round() as u32
    } else {
        (chars * 7.0).round() as u32 + 5
    }
}

/// Everything before the first row: the frozen header pane and the column
/// widths (from the measured content widths, in characters).
pub(crate) fn prefix(out: &mut Vec<u8>, content_widths: &[usize]) {
    out.extend_from_slice(HEAD.as_bytes());
    out.extend_from_slice(VIEWS.as_bytes());
    if !content_widths.is_empty() {
        out.extend_from_slice(b"<cols>");
        let px: Vec<u32> = content_widths
            .iter()
            .map(|w| pixels(column_width(*w)))
            .collect();
        let mut first = 0;
        while first < px.len() {
            // Neighbouring columns of the same width share one element.
            let mut last = first;
            while last + 1 < px.len() && px[last + 1] == px[first] {
                last += 1;
            }
            let width = f64::from(px[first] * 256 / 7) / 256.0;
            out.extend_from_slice(
                format!(
                    "<col min=\"{}\" max=\"{}\" width=\"{width}\"{}/>",
                    first + 1,
                    last + 1,
                    if px[first] == 64 {
                        ""
                    } else {
                        " customWidth=\"1\""
                    }
                )
                .as_bytes(),
            );
            first = last + 1;
        }
        out.extend_from_slice(b"</cols>");
    }
    out.extend_from_slice(b"<sheetData>");
}

/// Everything after the last row: the autofilter over the header and the
/// rows, and the page margins.
pub(crate) fn suffix(out: &mut Vec<u8>, last_row: u32, last_col: &str) {
    out.extend_from_slice(b"</sheetData>");
    out.extend_from_slice(
        format!("<autoFilter ref=\"A1:{last_col}{}\"/>", last_row + 1).as_bytes(),
    );
    out.extend_from_slice(MARGINS.as_bytes());
}

/// Starts row `row` (0-based).
pub(crate) fn row_start(out: &mut Vec<u8>, row_label: &str) {
    out.extend_from_slice(b"<row r=\"");
    out.extend_from_slice(row_label.as_bytes());
    out.extend_from_slice(b"\">");
}

pub(crate) fn row_end(out: &mut Vec<u8>) {
    out.extend_from_slice(b"</row>");
}

fn cell_ref(out: &mut Vec<u8>, col: &str, row_label: &str, style: Option<u32>) {
    out.extend_from_slice(b"<c r=\"");
    out.extend_from_slice(col.as_bytes());
    out.extend_from_slice(row_label.as_bytes());
    out.push(b'"');
    if let Some(s) = style {
        out.extend_from_slice(b" s=\"");
        out.extend_from_slice(itoa::Buffer::new().format(s).as_bytes());
        out.push(b'"');
    }
}

/// One cell. `text` cells have been shortened to fit already.
pub(crate) fn cell(
    out: &mut Vec<u8>,
    col: &str,
    row_label: &str,
    cell: &SheetCell<'_>,
    style: Option<u32>,
) {
    match cell {
        SheetCell::Empty => {}
        SheetCell::Bool(b) => {
            cell_ref(out, col, row_label, style);
            out.extend_from_slice(if *b {
                b" t=\"b\"><v>1</v></c>"
            } else {
                b" t=\"b\"><v>0</v></c>"
            });
        }
        SheetCell::Number(n) => {
            cell_ref(out, col, row_label, style);
            out.extend_from_slice(b"><v>");
            push_number(out, *n);
            out.extend_from_slice(b"</v></c>");
        }
        SheetCell::DateTime(dt) => {
            cell_ref(out, col, row_label, Some(STYLE_DATETIME));
            out.extend_from_slice(b"><v>");
            push_number(out, dt.to_excel());
            out.extend_from_slice(b"</v></c>");
        }
        SheetCell::Text(t) => inline_string(out, col, row_label, t, style),
    }
}

/// A number as rust_xlsxwriter writes it (`f64`'s `Display`): whole
/// numbers by `itoa`, fractions in the plain-decimal range by `zmij` (the
/// same shortest digits, much faster), the rest by `Display`.
fn push_number(out: &mut Vec<u8>, n: f64) {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        out.extend_from_slice(itoa::Buffer::new().format(n as i64).as_bytes());
        return;
    }
    if (1e-4..1e15).contains(&n.abs()) {
        let mut b = zmij::Buffer::new();
        let s = b.format_finite(n);
        if !s.contains('e') {
            out.extend_from_slice(s.as_bytes());
            return;
        }
    }
    use std::io::Write as _;
    let _ = write!(out, "{n}");
}

/// An inline string cell, escaped as rust_xlsxwriter escapes it.
pub(crate) fn inline_string(
    out: &mut Vec<u8>,
    col: &str,
    row_label: &str,
    text: &str,
    style: Option<u32>,
) {
    cell_ref(out, col, row_label, style);
    let preserve = text.starts_with(['\t', '\n', ' ']) || text.ends_with(['\t', '\n', ' ']);
    out.extend_from_slice(if preserve {
        b" t=\"inlineStr\"><is><t xml:space=\"preserve\">".as_slice()
    } else {
        b" t=\"inlineStr\"><is><t>".as_slice()
    });
    push_escaped(out, text);
    out.extend_from_slice(b"</t></is></c>");
}

/// Bytes that may need escaping in XML text (see [`push_escaped`]).
const NEEDS_CARE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8, b'&' | b'<' | b'>' | b'_' | 0x00..=0x08 | 0x0b..=0x1f | 0xef);
        b += 1;
    }
    t
};

/// XML text: `&`, `<`, `>` escaped; control characters and the non-characters
/// U+FFFE/U+FFFF as Excel's `_xHHHH_`, and a literal `_xHHHH_` protected as
/// `_x005F_xHHHH_` (rust_xlsxwriter's `escape_xml_escapes` and `escape_xml_data`).
///
/// Runs of bytes that need nothing are copied whole: most cells of real
/// data hold an underscore (`pay_…`, `user_…`) and no escape, and a
/// character-by-character copy of those was the sheet writer's largest cost.
fn push_escaped(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = text.as_bytes();
    let mut copied = 0;
    let mut at = 0;
    // A control character's `_x00HH_`, filled in below.
    let mut control = *b"_x0000_";
    while at < bytes.len() {
        let b = bytes[at];
        if !NEEDS_CARE[b as usize] {
            at += 1;
            continue;
        }
        // What replaces the bytes from `at`, and how many it replaces; an
        // underscore or a 0xEF lead byte that starts nothing to escape
        // stays in the run.
        let (with, len): (&[u8], usize) = match b {
            b'&' => (b"&amp;", 1),
            b'<' => (b"&lt;", 1),
            b'>' => (b"&gt;", 1),
            b'_' if is_escape_at(bytes, at) => (b"_x005F_", 1),
            // U+FFFE and U+FFFF.
            0xef if bytes.get(at + 1..at + 3) == Some(&[0xbf, 0xbe]) => (b"_xFFFE_", 3),
            0xef if bytes.get(at + 1..at + 3) == Some(&[0xbf, 0xbf]) => (b"_xFFFF_", 3),
            0x00..=0x08 | 0x0b..=0x1f => {
                control[4] = HEX[usize::from(b >> 4)];
                control[5] = HEX[usize::from(b & 0xf)];
                (&control, 1)
            }
            _ => {
                at += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[copied..at]);
        out.extend_from_slice(with);
        at += len;
        copied = at;
    }
    out.extend_from_slice(&bytes[copied..]);
}

/// Whether `_xHHHH_` starts at `at`.
fn is_escape_at(bytes: &[u8], at: usize) -> bool {
    bytes.len() >= at + 7
        && bytes[at + 1] == b'x'
        && bytes[at + 2..at + 6].iter().all(u8::is_ascii_hexdigit)
        && bytes[at + 6] == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_like_rust_xlsxwriter() {
        let mut out = Vec::new();
        push_escaped(
            &mut out,
            "a&b<c>d \u{1}\u{1f}\t\n\r x_x00A0_y _x12_ \u{fffe}",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a&amp;b&lt;c&gt;d _x0001__x001F_\t\n_x000D_ x_x005F_x00A0_y _x12_ _xFFFE_"
        );
    }

    /// The character-by-character escape this module had before copying
    /// runs whole: the reference the fast one must match.
    #[cfg(not(target_arch = "wasm32"))]
    fn escaped_by_char(text: &str) -> String {
        let mut out = String::new();
        for (at, ch) in text.char_indices() {
            match ch {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '\u{0}'..='\u{8}' | '\u{b}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => {
                    out.push_str(&format!("_x{:04X}_", ch as u32));
                }
                '_' if is_escape_at(text.as_bytes(), at) => out.push_str("_x005F_"),
                c => out.push(c),
            }
        }
        out
    }

    // proptest is a native dev-dependency only.
    #[cfg(not(target_arch = "wasm32"))]
    proptest::proptest! {
        #[test]
        fn copying_runs_escapes_like_the_character_loop(
            text in "([a-z_ 0-9A-Fx&<>\t\n\r\u{0}\u{1}\u{8}\u{b}\u{c}\u{1f}\u{fffe}\u{ffff}\u{feff}\u{fffd}\u{f000}\u{e9}\u{20ac}]|_x[0-9A-F]{4}_){0,24}"
        ) {
            let mut out = Vec::new();
            push_escaped(&mut out, &text);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), escaped_by_char(&text));
        }
    }

    #[test]
    fn numbers_are_written_like_f64_display() {
        for n in [
            0.0,
            -42.0,
            2999.0,
            0.1,
            52.52,
            45954.82638888889,
            1e20,
            -1e-7,
        ] {
            let mut out = Vec::new();
            push_number(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
    }
}
