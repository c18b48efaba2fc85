// formatRecords(data, options): records an app already holds → a JSON, CSV
// or XLSX file. Records given as objects are read here, in the engine, and
// handed to the wasm writer in packed chunks (a tag and a number per cell,
// the chunk's text as one string): no JSON text of the whole data, no value
// tree per record. Records given as JSON text go to the wasm directly.
import { RecordFormatter, formatRecordsText, inferColumns, ExportError } from "./handover.js";

// Kinds of value seen while inferring columns (handover::format::kind_bits).
const BOOLEAN = 1, INTEGER = 2, NUMBER = 4, DATETIME = 8, STRING = 16, JSON_KIND = 32;
// Cell tags of a packed chunk (src/browser/format_records.rs).
const T_NULL = 0, T_FALSE = 1, T_TRUE = 2, T_NUMBER = 3, T_TEXT = 4, T_JSON = 5;
/** Records per packed chunk. */
const CHUNK = 1024;
/** Output parts are folded into one Blob past this many bytes (output: "blob"). */
const FOLD = 1 << 20;
const SKIP = Symbol("skip");
const ENCODER = new TextEncoder();

const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?(?:Z|[+-](\d{2}):(\d{2}))$/;
const DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/** The strict RFC 3339 rule of handover::model::is_rfc3339. */
export function isRfc3339(s) {
  if (s.length < 20) return false;
  const m = RFC3339.exec(s);
  if (!m) return false;
  const [y, mo, d, h, mi, sec] = m.slice(1, 7).map(Number);
  if (m[7] !== undefined && (Number(m[7]) > 23 || Number(m[8]) > 59)) return false;
  if (mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || sec > 59) return false;
  const leap = (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0;
  return d <= (mo === 2 && leap ? 29 : DAYS[mo - 1]);
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

/** A value as JSON.stringify would see it (toJSON applied); SKIP for what it leaves out. */
function jsonValue(v, key) {
  if (v !== null && typeof v === "object" && typeof v.toJSON === "function") v = v.toJSON(key);
  if (v === undefined || typeof v === "function" || typeof v === "symbol") return SKIP;
  return v;
}

function invalid(code, message) {
  return new ExportError(code, message);
}

/** The kind bit of a value (0: null). */
function kindOf(v, datetimeStill) {
  switch (typeof v) {
    case "boolean": return BOOLEAN;
    case "number":
      if (!Number.isFinite(v)) return 0; // JSON.stringify writes null
      // As JSON text reads back what JSON.stringify writes: integers that
      // fit 64 bits stay integers.
      return Number.isInteger(v) && v >= -9223372036854775808 && v < 18446744073709551616 ? INTEGER : NUMBER;
    case "bigint": return INTEGER;
    case "string": return datetimeStill && isRfc3339(v) ? DATETIME : STRING;
    default: return v === null ? 0 : JSON_KIND;
  }
}

/** Names (dotted for nested objects) in order of first appearance, with the kinds seen. */
function observe(record, prefix, kinds, depth) {
  if (depth > 100) throw new RangeError("nested too deeply (a cycle?)");
  for (const key of Object.keys(record)) {
    const v = jsonValue(record[key], key);
    if (v === SKIP) continue;
    const name = prefix === "" ? key : `${prefix}.${key}`;
    if (isObject(v) && Object.keys(v).length > 0) {
      observe(v, name, kinds, depth + 1);
      continue;
    }
    const seen = kinds.get(name) ?? 0;
    // Once a column holds text that is not a timestamp, no more checks.
    kinds.set(name, seen | kindOf(v, (seen & STRING) === 0));
  }
}

function inferred(dataType, records) {
  const kinds = new Map();
  for (let i = 0; i < records.length; i++) {
    const r = records[i];
    if (!isObject(r)) {
      throw invalid("INVALID_RECORD", `${dataType} record ${i}: expected an object, got ${describe(r)}`);
    }
    try {
      observe(r, "", kinds, 0);
    } catch (e) {
      throw invalid("INVALID_RECORD", `${dataType} record ${i}: ${e?.message ?? e}`);
    }
  }
  return { columns: inferColumns([...kinds.keys()], [...kinds.values()]) };
}

function describe(v) {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return `a ${typeof v}`;
}

/** Packs records into chunks for the writer. */
class Packer {
  constructor(columns, dataType) {
    this.dataType = dataType;
    this.width = columns.length;
    this.index = new Map(columns.map((c, i) => [c.name, i]));
    this.prefixes = new Set();
    for (const c of columns) {
      for (let i = c.name.indexOf("."); i !== -1; i = c.name.indexOf(".", i + 1)) this.prefixes.add(c.name.slice(0, i));
    }
    this.tags = new Uint8Array(CHUNK * this.width);
    this.nums = new Float64Array(CHUNK * this.width);
    this.text = [];
    this.rows = 0;
  }

  /** Places the fields of `record` (record number `n`) into the chunk. */
  add(record, n) {
    if (!isObject(record)) {
      throw invalid("INVALID_RECORD", `${this.dataType} record ${n}: expected an object, got ${describe(record)}`);
    }
    const base = this.rows * this.width;
    this.tags.fill(T_NULL, base, base + this.width);
    this.pending = [];
    try {
      this.place(record, "", base, n, 0);
    } catch (e) {
      // A getter or toJSON of the caller's that throws.
      if (e instanceof ExportError) throw e;
      throw invalid("INVALID_RECORD", `${this.dataType} record ${n}: ${e?.message ?? e}`);
    }
    // Text goes in column order, as the writer reads it.
    this.pending.sort((a, b) => a[0] - b[0]);
    for (const [, s] of this.pending) this.text.push(s);
    this.rows += 1;
  }

  place(object, prefix, base, n, depth) {
    for (const key of Object.keys(object)) {
      const v = jsonValue(object[key], key);
      if (v === SKIP) continue;
      const name = prefix === "" ? key : `${prefix}.${key}`;
      const c = this.index.get(name);
      if (c === undefined) {
        if (isObject(v) && this.prefixes.has(name) && depth < 100) {
          this.place(v, name, base, n, depth + 1);
        } else if (!(v === null && this.prefixes.has(name))) {
          // A field the columns do not hold would be lost: refused.
          throw invalid("UNKNOWN_FIELD", `${this.dataType} record ${n}: field "${name}" is not one of the data type's columns`);
        }
        continue;
      }
      this.cell(base + c, c, v, n, name);
    }
  }

  cell(i, c, v, n, name) {
    switch (typeof v) {
      case "boolean":
        this.tags[i] = v ? T_TRUE : T_FALSE;
        return;
      case "number":
        if (Number.isFinite(v)) {
          this.tags[i] = T_NUMBER;
          this.nums[i] = v;
        }
        return;
      case "bigint":
        if (v >= -9007199254740991n && v <= 9007199254740991n) {
          this.tags[i] = T_NUMBER;
          this.nums[i] = Number(v);
        } else {
          this.text_(i, c, T_JSON, v.toString());
        }
        return;
      case "string":
        this.text_(i, c, T_TEXT, v);
        return;
      default: {
        if (v === null) return;
        let json;
        try {
          json = JSON.stringify(v);
        } catch (e) {
          throw invalid("INVALID_RECORD", `${this.dataType} record ${n}: field "${name}" cannot be written as JSON (${e?.message ?? e})`);
        }
        this.text_(i, c, T_JSON, json);
      }
    }
  }

  text_(i, c, tag, s) {
    this.tags[i] = tag;
    this.nums[i] = s.length;
    this.pending.push([c, s]);
  }

  /** Hands the chunk to the writer; returns the bytes produced. */
  flush(writer, t) {
    const out = writer.writeChunk(t, this.rows, this.tags.subarray(0, this.rows * this.width),
      this.nums.subarray(0, this.rows * this.width), this.text.join(""));
    this.rows = 0;
    this.text = [];
    return out;
  }
}

/** BigInt values as exact JSON numbers (where the engine has JSON.rawJSON). */
function bigintReplacer(_key, v) {
  if (typeof v !== "bigint") return v;
  return typeof JSON.rawJSON === "function" ? JSON.rawJSON(v.toString()) : v.toString();
}

/** Records as JSON.stringify writes them, joined by ",". */
function jsonOf(records, first, dataType) {
  for (let i = 0; i < records.length; i++) {
    if (!isObject(records[i])) {
      throw invalid("INVALID_RECORD", `${dataType} record ${first + i}: expected an object, got ${describe(records[i])}`);
    }
  }
  let json;
  try {
    json = JSON.stringify(records);
  } catch (e) {
    try {
      json = JSON.stringify(records, bigintReplacer);
    } catch {
      throw invalid("INVALID_RECORD", `${dataType}: a record cannot be written as JSON (${e?.message ?? e})`);
    }
  }
  return json.slice(1, -1);
}

/** Collects the output: Uint8Array parts, or Blobs folded as they grow. */
class Output {
  constructor(blob, type) {
    this.blob = blob;
    this.type = type;
    this.parts = [];
    this.size = 0;
    this.folded = null;
  }

  push(bytes) {
    if (bytes.length === 0) return;
    this.parts.push(bytes);
    this.size += bytes.length;
    if (this.blob && this.size >= FOLD) this.fold();
  }

  fold() {
    this.folded = new Blob(this.folded ? [this.folded, ...this.parts] : this.parts, { type: this.type });
    this.parts = [];
    this.size = 0;
  }

  result() {
    if (this.blob) {
      this.fold();
      return this.folded;
    }
    if (this.parts.length === 1) return this.parts[0];
    const all = new Uint8Array(this.parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of this.parts) {
      all.set(p, at);
      at += p.length;
    }
    return all;
  }
}

const TYPES = { json: "application/json", csv: "text/csv; charset=utf-8", xlsx: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" };

/** See the TypeScript declaration of formatRecords. */
export function formatRecords(data, options) {
  if (typeof data === "string") {
    const bytes = formatRecordsText(data, options);
    return options?.output === "blob" ? new Blob([bytes], { type: TYPES[options.format] }) : bytes;
  }
  if (options === null || typeof options !== "object") {
    throw invalid("INVALID_OPTIONS", "options must be an object with at least { format }");
  }
  if (!isObject(data)) {
    throw invalid("INVALID_RECORD", "data must be an object mapping each data type to an array of records");
  }
  const declared = options.columns ?? {};
  const manifest = {};
  // JSON of records whose columns were inferred from them needs no check:
  // each record is written as JSON.stringify writes it, as the app holds it.
  const asIs = new Set();
  for (const [dataType, records] of Object.entries(data)) {
    if (!Array.isArray(records)) {
      throw invalid("INVALID_RECORD", `data.${dataType} must be an array of records, got ${describe(records)}`);
    }
    let columns = [];
    if (options.format === "json" && !Object.hasOwn(declared, dataType)) {
      // Nothing to infer: the records are written as they are.
      asIs.add(dataType);
    } else if (!Object.hasOwn(declared, dataType)) {
      columns = inferred(dataType, records).columns;
    }
    manifest[dataType] = { records: records.length, columns };
  }
  // Checks the options and the data type names, and takes the declared columns.
  const writer = new RecordFormatter(manifest, options);
  try {
    const out = new Output(options.output === "blob", TYPES[options.format]);
    out.push(writer.begin());
    let t = 0;
    for (const [dataType, records] of Object.entries(data)) {
      if (asIs.has(dataType)) {
        for (let n = 0; n < records.length; n += CHUNK) {
          const chunk = records.slice(n, n + CHUNK);
          // The writer adds what goes between chunks; the records' bytes
          // need no trip through wasm memory.
          out.push(writer.writeJson(t, "", chunk.length));
          out.push(ENCODER.encode(jsonOf(chunk, n, dataType)));
        }
        t += 1;
        continue;
      }
      const packer = new Packer(writer.columns(t), dataType);
      for (let n = 0; n < records.length; n++) {
        packer.add(records[n], n);
        if (packer.rows === CHUNK) out.push(packer.flush(writer, t));
      }
      if (packer.rows > 0) out.push(packer.flush(writer, t));
      t += 1;
    }
    out.push(writer.finish());
    return out.result();
  } finally {
    writer.free();
  }
}
