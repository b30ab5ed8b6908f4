"""Reading prompt files: UTF-8 text, CSV / TSV / JSON tables with line numbers, list literals; the errors that
name file and line; language and label codes. Every loader reads through these."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from neuroshield.data.paths import DataNotFoundError

class DataFormatError(ValueError):
    """A data file is malformed. The message names the file, the 1-based line and the fix."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None, hint: str = "") -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        msg = f"{where}: {problem}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class DataWarning(UserWarning):
    """Something in a data file was skipped or looks odd, but loading went on."""


# All ISO 639-1 codes (the two-letter ones). Every code used by the bundled data sets is in here.
ISO_639_1: frozenset[str] = frozenset(
    """
    aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de
    dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia
    id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo
    lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl
    ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk
    tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu
    """.split()
)


LABELS: tuple[str, ...] = ("harmful", "benign")


def normalise_language(code: str) -> str:
    """Return the lower-case ISO 639-1 code for `code`; raise ValueError if it is not one.

    A region or script subtag is dropped (`zh-CN`, `pt_BR` -> `zh`, `pt`) because records carry the
    language only.
    """
    raw = str(code).strip()
    primary = raw.lower().replace("_", "-").split("-", 1)[0]
    if primary in ISO_639_1:
        return primary
    raise ValueError(
        f"unknown language code {raw!r}: use a two-letter ISO 639-1 code such as 'en', 'zh', 'es', 'bn'"
    )


def normalise_label(value: str) -> str:
    """Map a label cell to `harmful`/`benign`. `unsafe`/`safe` (XSTest's spelling) are accepted."""
    v = str(value).strip().lower()
    if v in ("harmful", "unsafe"):
        return "harmful"
    if v in ("benign", "safe"):
        return "benign"
    raise ValueError(f"unknown label {value!r}: use 'harmful' or 'benign' (or 'unsafe'/'safe')")


def language_at(code: str, path: Path, line: int | None) -> str:
    try:
        return normalise_language(code)
    except ValueError as err:
        raise DataFormatError(path, str(err), line) from None


def label_at(value: str, path: Path, line: int | None) -> str:
    try:
        return normalise_label(value)
    except ValueError as err:
        raise DataFormatError(path, str(err), line) from None


def select_languages(requested: Sequence[str] | None, available: Sequence[str], dataset: str) -> list[str]:
    """Validate the requested languages against those a data set has; keep the data set's order."""
    if requested is None:
        return list(available)
    wanted = [normalise_language(c) for c in requested]
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(
            f"{dataset} has no prompts in {', '.join(missing)}; available languages: {', '.join(available)}"
        )
    return [c for c in available if c in wanted]


def warn_empty(path: Path, line: int) -> None:
    warnings.warn(f"{path}, line {line}: empty text, row skipped", DataWarning, stacklevel=3)


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file (BOM accepted). Missing, undecodable or empty files raise clear errors."""
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"{p}: no such file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataFormatError(
            p,
            f"not valid UTF-8 at byte offset {err.start} ({err.reason})",
            line,
            "Re-save the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8`)",
        ) from None
    if not text.strip():
        raise DataFormatError(p, "file is empty", 1, "Give a file with a header row and at least one data row")
    return text


def read_csv_rows(path: str | Path, delimiter: str = ",") -> list[tuple[int, list[str]]]:
    """All records of a CSV/TSV file as (1-based line where the record starts, fields).

    Quoted fields may span lines (XSafety has some); blank lines come back as empty lists.
    """
    p = Path(path)
    text = read_text(p)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataFormatError(p, f"malformed CSV ({err})", start, "Check the quoting on that line") from None
        rows.append((start, row))
    return rows


def read_table(
    path: str | Path, required: Iterable[str] = ()
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV, TSV, JSONL or JSON (list of objects) table into (columns, [(line, row dict)]).

    Values are strings ('' for missing/null). `required` columns must all be present, in the header
    (CSV/TSV) or in every row (JSON).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    required = list(required)
    if suffix in (".csv", ".tsv"):
        records = read_csv_rows(p, "\t" if suffix == ".tsv" else ",")
        records = [(n, r) for n, r in records if any(f.strip() for f in r)]
        if not records:
            raise DataFormatError(p, "file is empty", 1)
        header_line, header = records[0]
        columns = [h.strip() for h in header]
        require_columns(p, columns, required, header_line)
        rows: list[tuple[int, dict[str, str]]] = []
        for n, fields in records[1:]:
            if len(fields) != len(columns):
                raise DataFormatError(
                    p,
                    f"row has {len(fields)} fields but the header has {len(columns)}",
                    n,
                    "Quote fields that contain the delimiter",
                )
            rows.append((n, dict(zip(columns, fields))))
        if not rows:
            raise DataFormatError(p, "no data rows after the header", header_line)
        return columns, rows
    if suffix in (".jsonl", ".ndjson", ".json"):
        objects = _read_json_objects(p)
        columns: list[str] = []
        for _, obj in objects:
            columns.extend(k for k in obj if k not in columns)
        rows = []
        for n, obj in objects:
            require_columns(p, list(obj), required, n)
            rows.append((n, {k: cell_text(v) for k, v in obj.items()}))
        return columns, rows
    raise DataFormatError(p, f"unsupported file type {suffix!r}", None, "Use .csv, .tsv, .jsonl or .json")


def cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _read_json_objects(p: Path) -> list[tuple[int, dict[str, object]]]:
    text = read_text(p)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(p, f"invalid JSON ({err.msg})", err.lineno) from None
        if not isinstance(data, list) or not all(isinstance(o, dict) for o in data):
            raise DataFormatError(p, "expected a JSON list of objects", 1, "Or use JSONL: one object per line")
        # Line numbers are unknown inside one JSON document: report the 1-based item number instead.
        return [(i + 1, o) for i, o in enumerate(data)]
    out: list[tuple[int, dict[str, object]]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(p, f"invalid JSON ({err.msg})", n, "Each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataFormatError(p, "expected a JSON object", n, "Each line must be one JSON object")
        out.append((n, obj))
    if not out:
        raise DataFormatError(p, "file is empty", 1)
    return out


def require_columns(path: Path, columns: Sequence[str], required: Sequence[str], line: int) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataFormatError(
            path,
            f"missing column {', '.join(repr(m) for m in missing)} (found: {', '.join(columns) or 'none'})",
            line,
            "Rename the column or pass the column name that holds it",
        )


def parse_list_literal(value: str) -> list[str]:
    """Parse a Python list-of-strings literal such as `['Violence & incitement']` without eval.

    A value without brackets is taken as one item; `''` and `[]` give an empty list. Anything other
    than quoted strings separated by commas raises ValueError.
    """
    s = value.strip()
    if not s:
        return []
    if not s.startswith("["):
        return [s]
    if not s.endswith("]"):
        raise ValueError(f"unterminated list {value!r}")
    items: list[str] = []
    escapes = {"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}
    i, end = 1, len(s) - 1
    expect_item = True
    while i < end:
        c = s[i]
        if c.isspace():
            i += 1
        elif c in "'\"" and expect_item:
            quote, buf = c, []
            i += 1
            while i < end and s[i] != quote:
                if s[i] == "\\" and i + 1 < end:
                    buf.append(escapes.get(s[i + 1], "\\" + s[i + 1]))
                    i += 2
                else:
                    buf.append(s[i])
                    i += 1
            if i >= end:
                raise ValueError(f"unterminated string in {value!r}")
            items.append("".join(buf))
            i += 1
            expect_item = False
        elif c == "," and not expect_item:
            expect_item = True
            i += 1
        else:
            raise ValueError(f"not a list of quoted strings: {value!r}")
    return items
