//! Golden-file tests of the three export formats, plus read-back checks with
//! real parsers (serde_json, csv, calamine) and the Excel row-limit rollover.
#![cfg(not(target_arch = "wasm32"))]

#[path = "support/fixture.rs"]
mod fixture;

use std::io::{Cursor, Read};
use std::path::Path;

use calamine::{open_workbook_from_rs, Data, DataType, Reader, Xlsx};
use handover::format::{
    infer_manifest, write_all, ExportFormat, ExportWriter, FormatError, FormatOptions, ZipAssembler,
};
use handover::model::{
    parse_timestamp, Column, ColumnKind, DateRange, ExportInfo, Manifest, Record, TypeManifest,
};
use indexmap::IndexMap;
use serde_json::{json, Value};

fn data() -> IndexMap<String, Vec<Value>> {
    serde_json::from_str(fixture::FIXTURE_JSON).unwrap()
}

fn info() -> ExportInfo {
    let mut info = ExportInfo::new(
        fixture::REQUEST_ID,
        parse_timestamp(fixture::GENERATED_AT).unwrap(),
    );
    info.date_range = Some(DateRange {
        start: Some("1999-01-01T00:00:00Z".into()),
        end: Some("2025-10-25T19:50:00Z".into()),
    });
    info.user_id = Some("user_456".into());
    info
}

fn export(format: ExportFormat) -> Vec<u8> {
    write_all(format, &data(), None, &info(), &FormatOptions::default()).unwrap()
}

/// Compares `actual` with the golden file, or rewrites it with UPDATE_GOLDEN=1.
fn assert_golden(name: &str, actual: &[u8]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    if expected != actual {
        let a = String::from_utf8_lossy(actual);
        let e = String::from_utf8_lossy(&expected);
        let line = a
            .lines()
            .zip(e.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        panic!(
            "{name} differs from the golden file at line {}:\n  got:      {:.300}\n  expected: {:.300}",
            line + 1,
            a.lines().nth(line).unwrap_or(""),
            e.lines().nth(line).unwrap_or("")
        );
    }
}

// ---------------------------------------------------------------- JSON

#[test]
fn json_matches_golden_file() {
    assert_golden("fixture.json", &export(ExportFormat::Json));
}

#[test]
fn json_has_the_seed_layout_and_every_record_exactly() {
    let v: Value = serde_json::from_slice(&export(ExportFormat::Json)).unwrap();
    assert_eq!(v["export"]["request_id"], "export_123456789");
    assert_eq!(v["export"]["generated_at"], "2025-10-25T19:50:00.000Z");
    assert_eq!(
        v["export"]["data_types"],
        json!([
            "user_profile",
            "payment_history",
            "membership_data",
            "recovery_cases",
            "consent_data",
            "edge_cases"
        ])
    );
    assert_eq!(v["metadata"]["total_records"], 8);
    assert_eq!(v["metadata"]["export_version"], "1.0");
    assert_eq!(v["metadata"]["compression"], "none");
    let original: Value = serde_json::from_str(fixture::FIXTURE_JSON).unwrap();
    assert_eq!(
        v["export"]["data"], original,
        "records must round-trip exactly (unicode, big integers, nesting)"
    );
    assert_eq!(
        v["export"]["data"]["edge_cases"][0]["max_u64"].as_u64(),
        Some(u64::MAX)
    );
    assert_eq!(
        v["export"]["data"]["edge_cases"][0]["big_int"].as_u64(),
        Some(9_007_199_254_740_993)
    );
}

#[test]
fn json_writes_empty_and_skipped_types_as_empty_arrays() {
    let manifest = manifest_of(&[("a", &["id"]), ("b", &["id"]), ("c", &["id"])]);
    let mut w = ExportWriter::new(
        ExportFormat::Json,
        &manifest,
        &info(),
        &FormatOptions::default(),
    )
    .unwrap();
    let mut out = w.begin().unwrap();
    out.extend(w.write_page("b", &records(json!([{"id": 1}]))).unwrap());
    out.extend(w.write_page("b", &records(json!([{"id": 2}]))).unwrap());
    out.extend(w.finish().unwrap());
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["export"]["data"],
        json!({"a": [], "b": [{"id": 1}, {"id": 2}], "c": []})
    );
    assert_eq!(v["metadata"]["total_records"], 2);
}

// ---------------------------------------------------------------- CSV

#[test]
fn csv_matches_golden_file() {
    assert_golden("fixture.csv", &export(ExportFormat::Csv));
}

fn csv_rows(bytes: &[u8]) -> (Vec<String>, Vec<IndexMap<String, String>>) {
    let mut r = csv::ReaderBuilder::new().from_reader(bytes);
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| {
            header
                .iter()
                .cloned()
                .zip(rec.unwrap().iter().map(String::from))
                .collect()
        })
        .collect();
    (header, rows)
}

#[test]
fn csv_is_flat_quoted_and_neutralised() {
    let bytes = export(ExportFormat::Csv);
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        text.starts_with("data_type,id,email,username,"),
        "data_type first, then the union of columns"
    );
    assert!(text.ends_with("\r\n"));
    let (header, rows) = csv_rows(&bytes);
    assert_eq!(rows.len(), 8);
    assert_eq!(
        header.iter().filter(|h| *h == "id").count(),
        1,
        "shared columns appear once"
    );
    assert!(
        header.contains(&"nested.geo.lat".to_string()),
        "nested objects flatten to dotted names"
    );
    let edge = &rows[6];
    assert_eq!(edge["data_type"], "edge_cases");
    assert_eq!(edge["quoted"], "She said \"hi\", then left");
    assert_eq!(edge["multiline"], "line one\r\nline two\nline three");
    assert_eq!(edge["formula_eq"], "'=1+2");
    assert_eq!(edge["formula_plus"], "'+SUM(A1:A2)");
    assert_eq!(edge["formula_minus"], "'-2+3");
    assert_eq!(edge["formula_at"], "'@cmd");
    assert_eq!(edge["tab_start"], "'\tindented");
    assert_eq!(edge["nullable"], "");
    assert_eq!(edge["flag"], "true");
    assert_eq!(edge["big_int"], "9007199254740993");
    assert_eq!(edge["max_u64"], "18446744073709551615");
    assert_eq!(edge["negative"], "-42", "numbers are not neutralised");
    assert_eq!(edge["nested.city"], "Berlin");
    assert_eq!(edge["nested.geo.lng"], "13.405");
    assert_eq!(
        edge["tags"], r#"["a","b,c","\"d\""]"#,
        "arrays as JSON text"
    );
    assert_eq!(edge["long_text"].chars().count(), 40_000, "nothing is cut");
    assert_eq!(
        rows[7]["nested.geo.lat"], "",
        "a null parent leaves its sub-columns empty"
    );
    assert_eq!(
        rows[0]["amount_cents"], "",
        "columns of other types stay empty"
    );
    assert_eq!(
        rows[3]["recovery_cases"],
        r#"[{"id":"case_123","status":"recovered","created_at":"2025-10-20T19:50:00.000Z"}]"#
    );
}

#[test]
fn csv_options_bom_and_no_neutralisation() {
    let opts = FormatOptions {
        neutralize_formulas: false,
        csv_bom: true,
    };
    let bytes = write_all(ExportFormat::Csv, &data(), None, &info(), &opts).unwrap();
    assert!(bytes.starts_with(b"\xEF\xBB\xBFdata_type,"));
    let (_, rows) = csv_rows(&bytes[3..]);
    assert_eq!(rows[6]["formula_eq"], "=1+2");
}

// ---------------------------------------------------------------- XLSX

/// Every part of the zip, sorted by name, with tags on their own lines and
/// the creation/modification times normalised.
fn xlsx_as_text(bytes: &[u8]) -> String {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    let mut names: Vec<String> = (0..zip.len())
        .map(|i| zip.by_index(i).unwrap().name().unwrap().to_string())
        .collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let mut s = String::new();
        zip.by_name(&name).unwrap().read_to_string(&mut s).unwrap();
        let s = normalise_times(&s);
        out.push_str(&format!("==== {name}\n{}\n", s.replace("><", ">\n<")));
    }
    out
}

fn normalise_times(s: &str) -> String {
    let mut s = s.to_string();
    for tag in ["dcterms:created", "dcterms:modified"] {
        if let (Some(a), Some(b)) = (s.find(&format!("<{tag} ")), s.find(&format!("</{tag}>"))) {
            let open_end = s[a..].find('>').unwrap() + a + 1;
            s.replace_range(open_end..b, "TIMESTAMP");
        }
    }
    s
}

#[test]
fn xlsx_matches_golden_xml_and_bytes() {
    let bytes = export(ExportFormat::Xlsx);
    // Cell for cell what rust_xlsxwriter alone wrote before sheets were
    // streamed (tests/golden/reference.xlsx, its in-memory workbook).
    assert_eq!(all_cells(&bytes), all_cells(REFERENCE_XLSX));
    assert_golden("fixture.xlsx.txt", xlsx_as_text(&bytes).as_bytes());
    // Deterministic: the same input and generated_at give the same bytes
    // (the browser test compares its output with this file too).
    assert_golden("fixture.xlsx", &bytes);
    assert!(xlsx_as_text(&bytes).contains("<dcterms:created xsi:type=\"dcterms:W3CDTF\">TIMESTAMP"));
    let raw = zip::ZipArchive::new(Cursor::new(&bytes[..]))
        .unwrap()
        .by_name("docProps/core.xml")
        .map(|mut f| {
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            s
        })
        .unwrap();
    assert!(
        raw.contains("2025-10-25T19:50:00Z"),
        "creation time comes from generated_at: {raw}"
    );
}

/// The workbook rust_xlsxwriter wrote for the fixture in memory, before data
/// sheets were streamed: streamed workbooks must have the same cells.
const REFERENCE_XLSX: &[u8] = include_bytes!("golden/reference.xlsx");

fn open_xlsx(bytes: &[u8]) -> Xlsx<Cursor<Vec<u8>>> {
    open_workbook_from_rs(Cursor::new(bytes.to_vec())).unwrap()
}

fn find_col(range: &calamine::Range<Data>, name: &str) -> usize {
    (0..range.width())
        .find(|&c| range.get((0, c)) == Some(&Data::String(name.into())))
        .unwrap_or_else(|| panic!("no column {name}"))
}

#[test]
fn xlsx_reads_back_with_typed_cells() {
    let bytes = export(ExportFormat::Xlsx);
    let mut wb = open_xlsx(&bytes);
    assert_eq!(
        wb.sheet_names(),
        [
            "Summary",
            "user_profile",
            "payment_history",
            "membership_data",
            "recovery_cases",
            "consent_data",
            "edge_cases",
            "Long values"
        ]
    );

    let pay = wb.worksheet_range("payment_history").unwrap();
    assert_eq!(pay.height(), 3);
    assert_eq!(pay.get((0, 0)), Some(&Data::String("id".into())));
    let amount = find_col(&pay, "amount_cents");
    assert_eq!(
        pay.get((1, amount)),
        Some(&Data::Float(2999.0)),
        "integers are numeric cells"
    );
    let created = find_col(&pay, "created_at");
    let dt = pay.get((2, created)).unwrap();
    assert!(
        dt.is_datetime(),
        "timestamps are real date-times, got {dt:?}"
    );
    assert_eq!(
        dt.as_datetime().unwrap().to_string(),
        "2025-10-24 19:50:00",
        "+02:00 shown in UTC, no time-zone shift by the reader"
    );
    let failure = find_col(&pay, "failure_reason");
    assert_eq!(
        pay.get((1, failure)),
        Some(&Data::Empty),
        "null is an empty cell"
    );
    assert_eq!(
        pay.get((2, failure)),
        Some(&Data::String(
            "'=HYPERLINK(\"http://evil.example\",\"click\")".into()
        ))
    );

    let edge = wb.worksheet_range("edge_cases").unwrap();
    let cell = |col: &str| edge.get((1, find_col(&edge, col))).cloned().unwrap();
    assert_eq!(cell("flag"), Data::Bool(true));
    assert_eq!(cell("ratio"), Data::Float(0.1));
    assert_eq!(cell("negative"), Data::Float(-42.0));
    assert_eq!(
        cell("big_int"),
        Data::String("9007199254740993".into()),
        "beyond 2^53 kept as text, not rounded"
    );
    assert_eq!(
        cell("text"),
        Data::String("Zoë Ångström — 日本語 — emoji 👩‍👩‍👧‍👦 🎉".into())
    );
    assert_eq!(cell("formula_eq"), Data::String("'=1+2".into()));
    assert_eq!(cell("nested.geo.lat"), Data::Float(52.52));
    assert_eq!(cell("tags"), Data::String(r#"["a","b,c","\"d\""]"#.into()));
    assert_eq!(
        cell("happened_at").as_datetime().unwrap().to_string(),
        "2025-03-30 06:30:00"
    );

    // The 40,000-character value is carried whole in the Long values sheet.
    let pointer = match cell("long_text") {
        Data::String(s) => s,
        other => panic!("{other:?}"),
    };
    assert!(
        pointer.contains("40000 characters") && pointer.contains("Long values"),
        "{pointer}"
    );
    let long = wb.worksheet_range("Long values").unwrap();
    let whole: String = (1..long.height())
        .map(|r| long.get((r, 3)).unwrap().to_string())
        .collect();
    let original = data()["edge_cases"][0]["long_text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole, original);
    assert_eq!(long.get((1, 0)), Some(&Data::String("edge_cases".into())));

    let summary = wb.worksheet_range("Summary").unwrap();
    let text: Vec<String> = summary
        .rows()
        .flat_map(|r| r.iter().map(|c| c.to_string()))
        .collect();
    assert!(text.contains(&"export_123456789".to_string()));
    assert!(text.contains(&"user_456".to_string()));
    let at = text.iter().position(|s| s == "payment_history").unwrap();
    assert_eq!(text[at + 1], "2", "record count per data type");
}

#[test]
fn xlsx_rolls_over_at_excels_real_row_limit() {
    // A full sheet of data rows and more: 1,100,000 rows.
    const ROWS: usize = 1_100_000;
    let manifest = manifest_of(&[("payment_history", &["n"])]);
    let mut w = ExportWriter::new(
        ExportFormat::Xlsx,
        &manifest,
        &info(),
        &FormatOptions::default(),
    )
    .unwrap();
    let mut out = w.begin().unwrap();
    let mut page = Vec::with_capacity(5000);
    for n in 0..ROWS {
        let mut r = Record::new();
        r.insert("n".into(), json!(n));
        page.push(r);
        if page.len() == 5000 || n + 1 == ROWS {
            out.extend(w.write_page("payment_history", &page).unwrap());
            page.clear();
        }
    }
    out.extend(w.finish().unwrap());
    assert_eq!(w.records_written(), ROWS as u64);
    let rest = ROWS - 1_048_575;
    let mut wb = open_xlsx(&out);
    assert_eq!(
        wb.sheet_names(),
        ["Summary", "payment_history", "payment_history (2)"]
    );
    let first = wb.worksheet_range("payment_history").unwrap();
    assert_eq!(first.height(), 1_048_576);
    assert_eq!(first.get((1_048_575, 0)), Some(&Data::Float(1_048_574.0)));
    let second = wb.worksheet_range("payment_history (2)").unwrap();
    assert_eq!(second.height(), rest + 1);
    assert_eq!(
        second.get((0, 0)),
        Some(&Data::String("n".into())),
        "header repeated"
    );
    assert_eq!(
        second.get((rest, 0)),
        Some(&Data::Float((ROWS - 1) as f64)),
        "no row lost"
    );

    // openpyxl reads the same workbook, every row of both sheets.
    let dir = tempfile_dir();
    let path = dir.join("rollover.xlsx");
    std::fs::write(&path, &out).unwrap();
    let script = r#"
import json, sys, openpyxl
wb = openpyxl.load_workbook(sys.argv[1], read_only=True)
out = {}
for ws in wb.worksheets:
    n, last = 0, None
    for row in ws.iter_rows(values_only=True):
        n += 1
        last = row[0]
    out[ws.title] = [n, last]
print(json.dumps(out))
"#;
    let run = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .output()
        .expect("python3 runs (scripts/setup.sh installs openpyxl)");
    assert!(
        run.status.success(),
        "openpyxl could not read the workbook: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let sheets: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(sheets["payment_history"], json!([1_048_576, 1_048_574]));
    assert_eq!(sheets["payment_history (2)"], json!([rest + 1, ROWS - 1]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn xlsx_sheet_names_follow_excels_rules() {
    let long = "a_very_long_data_type_name_that_exceeds_31_chars";
    let manifest = manifest_of(&[
        (long, &["id"]),
        (
            "a_very_long_data_type_name_that_exceeds_31_chars_too",
            &["id"],
        ),
        ("History", &["id"]),
    ]);
    let mut w = ExportWriter::new(
        ExportFormat::Xlsx,
        &manifest,
        &info(),
        &FormatOptions::default(),
    )
    .unwrap();
    let mut out = w.begin().unwrap();
    out.extend(w.finish().unwrap());
    let wb = open_xlsx(&out);
    let names = wb.sheet_names();
    assert_eq!(names.len(), 4);
    for n in &names {
        assert!(n.chars().count() <= 31, "{n}");
    }
    let lower: std::collections::HashSet<String> = names.iter().map(|n| n.to_lowercase()).collect();
    assert_eq!(lower.len(), 4, "unique names: {names:?}");
    assert!(!lower.contains("history"), "Excel reserves History");
}

// ---------------------------------------------------------------- errors

fn manifest_of(types: &[(&str, &[&str])]) -> Manifest {
    let mut m = Manifest::default();
    for (name, cols) in types {
        m.types.insert(
            name.to_string(),
            TypeManifest {
                records: 0,
                columns: cols
                    .iter()
                    .map(|c| Column::new(*c, ColumnKind::Integer))
                    .collect(),
                records_url: None,
            },
        );
    }
    m
}

fn records(v: Value) -> Vec<Record> {
    serde_json::from_value(v).unwrap()
}

#[test]
fn unknown_format_is_invalid_format() {
    let e = "pdf".parse::<ExportFormat>().unwrap_err();
    assert_eq!(e.code(), "INVALID_FORMAT");
}

#[test]
fn fields_without_a_column_are_refused_not_dropped() {
    for format in [ExportFormat::Json, ExportFormat::Csv, ExportFormat::Xlsx] {
        let manifest = manifest_of(&[("a", &["id"])]);
        let mut w =
            ExportWriter::new(format, &manifest, &info(), &FormatOptions::default()).unwrap();
        w.begin().unwrap();
        let e = w
            .write_page("a", &records(json!([{"id": 1}, {"id": 2, "secret": 3}])))
            .unwrap_err();
        assert_eq!(
            e,
            FormatError::UnknownField {
                data_type: "a".into(),
                index: 1,
                field: "secret".into()
            }
        );
        assert_eq!(e.code(), "UNKNOWN_FIELD");
    }
}

#[test]
fn bad_dates_in_datetime_columns_name_record_and_field() {
    let mut manifest = Manifest::default();
    manifest.types.insert(
        "a".into(),
        TypeManifest {
            records: 1,
            columns: vec![Column::new("at", ColumnKind::Datetime)],
            records_url: None,
        },
    );
    for format in [ExportFormat::Json, ExportFormat::Csv, ExportFormat::Xlsx] {
        let mut w =
            ExportWriter::new(format, &manifest, &info(), &FormatOptions::default()).unwrap();
        w.begin().unwrap();
        w.write_page("a", &records(json!([{"at": "2025-01-01"}, {"at": null}])))
            .unwrap();
        let e = w
            .write_page("a", &records(json!([{"at": "31/12/2025"}])))
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_DATE");
        assert!(
            e.to_string().contains("record 2") && e.to_string().contains("\"at\""),
            "{e}"
        );
    }
}

#[test]
fn types_must_come_in_manifest_order() {
    let manifest = manifest_of(&[("a", &["id"]), ("b", &["id"])]);
    let mut w = ExportWriter::new(
        ExportFormat::Json,
        &manifest,
        &info(),
        &FormatOptions::default(),
    )
    .unwrap();
    w.begin().unwrap();
    w.write_page("b", &[]).unwrap();
    assert_eq!(
        w.write_page("a", &[]).unwrap_err().code(),
        "INVALID_DATA_TYPE"
    );
    assert_eq!(
        w.write_page("zzz", &[]).unwrap_err().code(),
        "INVALID_DATA_TYPE"
    );
}

#[test]
fn non_object_records_and_bad_type_names_are_refused() {
    let data: IndexMap<String, Vec<Value>> =
        serde_json::from_value(json!({"a": [{"id": 1}, 5]})).unwrap();
    assert_eq!(infer_manifest(&data).unwrap_err().code(), "INVALID_RECORD");
    let data: IndexMap<String, Vec<Value>> = serde_json::from_value(json!({"../x": []})).unwrap();
    assert_eq!(
        infer_manifest(&data).unwrap_err().code(),
        "INVALID_DATA_TYPE"
    );
}

#[test]
fn inference_picks_kinds_from_values() {
    let m = infer_manifest(&data()).unwrap();
    let kind = |t: &str, c: &str| {
        m.types[t]
            .columns
            .iter()
            .find(|x| x.name == c)
            .unwrap()
            .kind
    };
    assert_eq!(kind("payment_history", "amount_cents"), ColumnKind::Integer);
    assert_eq!(kind("payment_history", "created_at"), ColumnKind::Datetime);
    assert_eq!(
        kind("payment_history", "failure_reason"),
        ColumnKind::String
    );
    assert_eq!(kind("edge_cases", "flag"), ColumnKind::Boolean);
    assert_eq!(kind("edge_cases", "ratio"), ColumnKind::Number);
    assert_eq!(kind("edge_cases", "tags"), ColumnKind::Json);
    assert_eq!(kind("consent_data", "consents"), ColumnKind::Json);
}

// ---------------------------------------------------------------- typed rows

/// The value of a dotted column in a record (`a.b` → `record.a.b`).
fn field<'v>(record: &'v Value, name: &str) -> Option<&'v Value> {
    name.split('.').try_fold(record, |v, k| v.get(k))
}

/// The fixture written through the typed row path: every record as cells
/// by the inferred columns, through a frame on the wire (encoded, then
/// decoded), into the writer; as the server and the browser do.
fn export_typed(format: ExportFormat) -> Vec<u8> {
    export_typed_to(format, &mut Assembly::Here)
}

/// Where a writer's outputs become the file: appended as they are, or
/// through a [`ZipAssembler`] (as the browser's second worker does).
enum Assembly {
    Here,
    Deferred(Box<ZipAssembler>),
}

impl Assembly {
    fn add(&mut self, file: &mut Vec<u8>, output: &[u8]) {
        match self {
            Assembly::Here => file.extend_from_slice(output),
            Assembly::Deferred(a) => a.feed(output, file).unwrap(),
        }
    }
}

fn export_typed_to(format: ExportFormat, assembly: &mut Assembly) -> Vec<u8> {
    use handover::format::Cell;
    use handover::wire::{decode_frame, FrameEncoder, WireCell};
    let data = data();
    let manifest = infer_manifest(&data).unwrap();
    let mut w = ExportWriter::new(format, &manifest, &info(), &FormatOptions::default()).unwrap();
    if let Assembly::Deferred(_) = assembly {
        assert!(w.defer_zip());
    }
    let mut file = Vec::new();
    assembly.add(&mut file, &w.begin().unwrap());
    for (t, (name, records)) in data.iter().enumerate() {
        let columns = &manifest.types[name].columns;
        let mut line = Vec::new();
        let mut enc = FrameEncoder::begin(&mut line, name, 0, Some(columns));
        for r in records {
            let cells: Vec<Cell<'_>> = columns
                .iter()
                .map(|c| field(r, &c.name).map_or(Cell::Null, Cell::from_value))
                .collect();
            enc.row(&mut line, &cells);
        }
        enc.end(&mut line, None);
        let frame = decode_frame(&line, columns).unwrap();
        for row in frame.rows() {
            let cells: Vec<Cell<'_>> = row.iter().map(WireCell::as_cell).collect();
            w.write_row(t, &cells).unwrap();
        }
        assembly.add(&mut file, &w.take_output());
    }
    assembly.add(&mut file, &w.finish().unwrap());
    while let Some(piece) = w.next_output().unwrap() {
        assembly.add(&mut file, &piece);
    }
    file
}

#[test]
fn typed_rows_give_the_golden_csv_byte_for_byte() {
    assert_golden("fixture.csv", &export_typed(ExportFormat::Csv));
}

#[test]
fn typed_rows_give_the_golden_json_records() {
    let typed: Value = serde_json::from_slice(&export_typed(ExportFormat::Json)).unwrap();
    let golden: Value = serde_json::from_slice(&export(ExportFormat::Json)).unwrap();
    let manifest = infer_manifest(&data()).unwrap();
    assert_eq!(typed["metadata"], golden["metadata"]);
    for (name, t) in &manifest.types {
        let a = typed["export"]["data"][name].as_array().unwrap();
        let b = golden["export"]["data"][name].as_array().unwrap();
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(b) {
            for c in &t.columns {
                // A field the record did not have is written as null.
                assert_eq!(
                    field(x, &c.name).unwrap_or(&Value::Null),
                    field(y, &c.name).unwrap_or(&Value::Null),
                    "{name}.{}",
                    c.name
                );
            }
        }
    }
}

/// Every sheet of a workbook, cell by cell as calamine reads it.
fn all_cells(bytes: &[u8]) -> Vec<(String, Vec<Vec<String>>)> {
    let mut wb = open_xlsx(bytes);
    wb.sheet_names()
        .into_iter()
        .map(|name| {
            let range = wb.worksheet_range(&name).unwrap();
            let rows = range
                .rows()
                .map(|r| r.iter().map(|c| format!("{c:?}")).collect())
                .collect();
            (name, rows)
        })
        .collect()
}

#[test]
fn typed_rows_give_the_golden_xlsx_bytes() {
    assert_golden("fixture.xlsx", &export_typed(ExportFormat::Xlsx));
}

#[test]
fn a_deferred_xlsx_assembled_elsewhere_has_the_golden_bytes() {
    let mut assembly = Assembly::Deferred(Box::new(ZipAssembler::new()));
    let file = export_typed_to(ExportFormat::Xlsx, &mut assembly);
    let Assembly::Deferred(a) = assembly else {
        unreachable!()
    };
    assert!(a.is_finished());
    assert_golden("fixture.xlsx", &file);
}

/// The instructions and the file of a deferred XLSX export of `rows` rows
/// (one text column, every 1000th value longer than a cell holds).
fn deferred_and_direct(rows: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let manifest = manifest_of(&[("notes", &["n", "text"])]);
    let opts = FormatOptions::default();
    let mut direct = ExportWriter::new(ExportFormat::Xlsx, &manifest, &info(), &opts).unwrap();
    let mut deferred = ExportWriter::new(ExportFormat::Xlsx, &manifest, &info(), &opts).unwrap();
    assert!(deferred.defer_zip());
    let mut file = direct.begin().unwrap();
    let mut ops = vec![deferred.begin().unwrap()];
    let long = "x".repeat(40_000);
    let mut page = Vec::new();
    for n in 0..rows {
        let mut r = Record::new();
        r.insert("n".into(), json!(n));
        let text = if n % 1000 == 999 {
            long.clone()
        } else {
            format!("row {n} of the notes")
        };
        r.insert("text".into(), json!(text));
        page.push(r);
        if page.len() == 5000 || n + 1 == rows {
            file.extend(direct.write_page("notes", &page).unwrap());
            ops.push(deferred.write_page("notes", &page).unwrap());
            page.clear();
        }
    }
    file.extend(direct.finish().unwrap());
    ops.push(deferred.finish().unwrap());
    (ops, file)
}

#[test]
fn a_deferred_xlsx_of_many_pages_assembles_to_the_same_bytes() {
    let (ops, direct) = deferred_and_direct(60_000);
    let mut a = ZipAssembler::new();
    let mut file = Vec::new();
    for o in &ops {
        a.feed(o, &mut file).unwrap();
    }
    assert!(a.is_finished());
    assert_eq!(file.len(), direct.len());
    assert!(
        file == direct,
        "the assembled package differs from the direct one"
    );
    let wb = open_xlsx(&file);
    assert_eq!(wb.sheet_names(), ["Summary", "notes", "Long values"]);
}

#[test]
fn malformed_package_instructions_are_refused_not_panicked_on() {
    let (ops, _) = deferred_and_direct(10);
    let all: Vec<u8> = ops.concat();
    // Cut short anywhere inside an instruction: an error, never a panic
    // or a package that looks complete.
    for cut in 1..all.len() {
        let mut a = ZipAssembler::new();
        let mut out = Vec::new();
        let fed = a.feed(&all[..cut], &mut out);
        assert!(
            fed.is_err() || !a.is_finished(),
            "cut at {cut} gave a finished package"
        );
    }
    let mut a = ZipAssembler::new();
    let mut out = Vec::new();
    a.feed(&all, &mut out).unwrap();
    let after = a.feed(&all[..1], &mut out).unwrap_err();
    assert!(after.to_string().contains("after the end"), "{after}");
    for bad in [
        &[9u8][..],
        &[2, 1, 0, 0, 0, b'x'],
        &[3],
        &[1, 1, 200, 0],
        &[1, 10, 1, 0, b'x'],
    ] {
        let mut a = ZipAssembler::new();
        let err = a.feed(bad, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, FormatError::Xlsx(_)), "{bad:?}: {err}");
        // Nothing is accepted after a failure, not even a whole package.
        assert!(a.feed(&all, &mut Vec::new()).is_err());
        assert!(!a.is_finished());
    }
}

#[test]
fn constant_memory_xlsx_has_the_golden_cells() {
    let dir = tempfile_dir();
    let data = data();
    let manifest = infer_manifest(&data).unwrap();
    let mut w =
        ExportWriter::xlsx_constant_memory(&manifest, &info(), &FormatOptions::default(), &dir)
            .unwrap();
    let mut file = w.begin().unwrap();
    for (name, records) in &data {
        let records: Vec<Record> = records
            .iter()
            .map(|r| r.as_object().unwrap().clone())
            .collect();
        file.extend(w.write_page(name, &records).unwrap());
    }
    file.extend(w.finish().unwrap());
    while let Some(piece) = w.next_output().unwrap() {
        file.extend(piece);
    }
    assert_eq!(all_cells(&file), all_cells(REFERENCE_XLSX));
    // The data sheets went through constant-memory mode (inline strings).
    let mut zip = zip::ZipArchive::new(Cursor::new(&file[..])).unwrap();
    let mut sheet = String::new();
    zip.by_name("xl/worksheets/sheet2.xml")
        .unwrap()
        .read_to_string(&mut sheet)
        .unwrap();
    assert!(sheet.contains("t=\"inlineStr\""), "{sheet:.500}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fresh directory for temporary files, removed by the test.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "handover-formats-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn header_cells_are_neutralised_like_data_cells() {
    let m = manifest_of(&[("t", &["=cmd", "ok"])]);
    let mut w =
        ExportWriter::new(ExportFormat::Csv, &m, &info(), &FormatOptions::default()).unwrap();
    let mut out = w.begin().unwrap();
    out.extend(w.finish().unwrap());
    assert_eq!(String::from_utf8(out).unwrap(), "data_type,'=cmd,ok\r\n");
    let mut w =
        ExportWriter::new(ExportFormat::Xlsx, &m, &info(), &FormatOptions::default()).unwrap();
    let mut out = w.begin().unwrap();
    out.extend(w.finish().unwrap());
    let sheet = open_xlsx(&out).worksheet_range("t").unwrap();
    assert_eq!(sheet.get((0, 0)), Some(&Data::String("'=cmd".into())));
}

#[test]
fn a_column_declared_twice_is_refused() {
    let mut m = Manifest::default();
    m.types.insert(
        "t".into(),
        TypeManifest {
            records: 0,
            columns: vec![
                Column::new("a", ColumnKind::String),
                Column::new("a", ColumnKind::Integer),
            ],
            records_url: None,
        },
    );
    let e =
        ExportWriter::new(ExportFormat::Csv, &m, &info(), &FormatOptions::default()).unwrap_err();
    assert_eq!(e.code(), "INVALID_COLUMNS");
}
