"""Checks an exported file record by record against the database.

usage: check_export.py FILE FORMAT DATABASE USER COMPANY [CONFIG]   (FORMAT "none": counts only)

The expected records come from the data type config's own SQL queries run
on the SQLite database (the operator's definition of "the user's data");
the file is read with a real parser: json, csv, or openpyxl for XLSX.
Prints {"types": {name: count}} and exits 0 when every record matches.
"""
import csv
import datetime as dt
import io
import json
import sqlite3
import sys
import tomllib

FORMULA = ("=", "+", "-", "@", "\t", "\r", "\0")


def expected(db, user, company, config):
    conf = tomllib.load(open(config, "rb"))
    con = sqlite3.connect(db)
    out = {}
    for t in conf["data_type"]:
        sql = t["query"].replace(":user_id", "?1").replace(":company_id", "?2")
        sql = f"SELECT * FROM ({sql}) ORDER BY {t['sort_key']}"
        cur = con.execute(sql, (user, company))
        names = [d[0] for d in cur.description]
        kinds = {c["name"]: c["kind"] for c in t["columns"]}
        rows = []
        for row in cur:
            rec = {}
            for name, value in zip(names, row):
                kind = kinds.get(name)
                nested = kind is None and any(k.startswith(name + ".") for k in kinds)
                if (kind == "json" or nested) and isinstance(value, str):
                    value = json.loads(value)
                elif kind == "boolean" and value is not None:
                    value = bool(value)
                rec[name] = value
            rows.append(rec)
        out[t["name"]] = (t["columns"], rows)
    return out


def text(value):
    """A value as the flat formats write it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, str):
        return "'" + value if value.startswith(FORMULA) else value
    return str(value)


def parse_ts(s):
    s = s.replace("Z", "+00:00")
    t = dt.datetime.fromisoformat(s)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).replace(tzinfo=None)


def flat(rec, names, prefix=""):
    """A record as the flat formats lay it out: nested objects as dotted
    columns (a column of its own, e.g. of kind json, stays whole)."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in names:
            out.update(flat(v, names, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def check_json(data, want):
    doc = json.loads(data)
    for name, (_, rows) in want.items():
        got = doc["export"]["data"].get(name)
        if got != rows:
            fail(f"{name}: {len(got or [])} records in the file, {len(rows)} in the database; first difference: "
                 + next((f"{a} != {b}" for a, b in zip(got or [], rows) if a != b), "(lengths)"))
    total = sum(len(r) for _, r in want.values())
    if doc["metadata"]["total_records"] != total:
        fail(f"metadata.total_records {doc['metadata']['total_records']} != {total}")


def check_csv(data, want):
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    for name, (cols, recs) in want.items():
        got = [r for r in rows if r["data_type"] == name]
        if len(got) != len(recs):
            fail(f"{name}: {len(got)} CSV rows, {len(recs)} records in the database")
        names = {c["name"] for c in cols}
        for g, r in zip(got, (flat(r, names) for r in recs)):
            for c in cols:
                if g[c["name"]] != text(r.get(c["name"])):
                    fail(f"{name} {r.get(cols[0]['name'])}.{c['name']}: CSV {g[c['name']]!r} != database {text(r.get(c['name']))!r}")


def check_xlsx(data, want):
    import openpyxl
    wb = openpyxl.load_workbook(io.BytesIO(data), read_only=True)
    if wb.sheetnames[0] != "Summary":
        fail(f"first sheet is {wb.sheetnames[0]}")
    for name, (cols, recs) in want.items():
        ws = wb[name]
        rows = list(ws.iter_rows(values_only=True))
        header, body = rows[0], rows[1:]
        if list(header) != [c["name"] for c in cols]:
            fail(f"{name}: header {header}")
        if len(body) != len(recs):
            fail(f"{name}: {len(body)} rows, {len(recs)} records in the database")
        names = {c["name"] for c in cols}
        for g, r in zip(body, (flat(r, names) for r in recs)):
            for i, c in enumerate(cols):
                v, e = g[i], r.get(c["name"])
                if c["kind"] == "datetime" and e is not None:
                    if not isinstance(v, dt.datetime) or abs((v - parse_ts(e)).total_seconds()) > 0.001:
                        fail(f"{name}.{c['name']}: {v!r} is not the date-time {e}")
                elif c["kind"] in ("integer", "number") and e is not None:
                    if not isinstance(v, (int, float)) or v != e:
                        fail(f"{name}.{c['name']}: {v!r} != {e!r} (numeric cell expected)")
                elif c["kind"] == "boolean" and e is not None:
                    if v is not e:
                        fail(f"{name}.{c['name']}: {v!r} != {e!r}")
                elif (v if v is not None else "") != text(e):
                    fail(f"{name}.{c['name']}: {v!r} != {text(e)!r}")


def main():
    path, fmt, db, user, company = sys.argv[1:6]
    config = sys.argv[6] if len(sys.argv) > 6 else "server/config/datatypes.toml"
    want = expected(db, user, company, config)
    if fmt != "none":
        data = open(path, "rb").read()
        {"json": check_json, "csv": check_csv, "xlsx": check_xlsx}[fmt](data, want)
    print(json.dumps({"types": {k: len(v[1]) for k, v in want.items()}}))


main()
