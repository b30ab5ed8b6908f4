"""Loaders for the prompt data sets: one function per format, each returning `list[PromptRecord]`.

Conventions shared by every loader:

* ids are stable and, where the data set is a parallel translation, the same across languages
  (`xsafety/Insult/17` in `en` and in `de` are translations of each other);
* files are read as UTF-8 (a BOM is accepted); anything malformed raises `DataFormatError` whose
  message names the file, the 1-based line (or row) and what to do about it;
* a row whose text is empty is skipped with a `DataWarning` naming file and line (never an error:
  upstream sets have the odd blank cell, and one missing prompt should not block a run). Where a
  data set is parallel, the skipped row's id is simply absent in that language, so the remaining
  ids stay aligned;
* language codes are ISO 639-1, lower case, checked against `ISO_639_1`.

`load_prompts(source, ...)` is the single entry point the rest of the toolkit uses: `source` is a
registered name from `DATASETS` (optionally `name:option`, see `DatasetSpec.option_help`) or a path
to a file whose format is detected from its extension and header.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neuroshield.data.paths import DataNotFoundError, find_data_root
from neuroshield.data.records import PromptRecord

# --------------------------------------------------------------------------------------------------
# Errors, warnings, languages
# --------------------------------------------------------------------------------------------------


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


def _language_at(code: str, path: Path, line: int | None) -> str:
    try:
        return normalise_language(code)
    except ValueError as err:
        raise DataFormatError(path, str(err), line) from None


def _label_at(value: str, path: Path, line: int | None) -> str:
    try:
        return normalise_label(value)
    except ValueError as err:
        raise DataFormatError(path, str(err), line) from None


def _natural_key(text: str) -> tuple[object, ...]:
    """Sort key under which `x/2` comes before `x/10`."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def _select_languages(requested: Sequence[str] | None, available: Sequence[str], dataset: str) -> list[str]:
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


def _warn_empty(path: Path, line: int) -> None:
    warnings.warn(f"{path}, line {line}: empty text, row skipped", DataWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


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
        _require_columns(p, columns, required, header_line)
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
            _require_columns(p, list(obj), required, n)
            rows.append((n, {k: _cell(v) for k, v in obj.items()}))
        return columns, rows
    raise DataFormatError(p, f"unsupported file type {suffix!r}", None, "Use .csv, .tsv, .jsonl or .json")


def _cell(value: object) -> str:
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


def _require_columns(path: Path, columns: Sequence[str], required: Sequence[str], line: int) -> None:
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


# --------------------------------------------------------------------------------------------------
# XSafety
# --------------------------------------------------------------------------------------------------

XSAFETY_LANGUAGES: tuple[str, ...] = ("en", "zh", "ar", "ru", "hi", "es", "fr", "de", "ja", "bn")
XSAFETY_CATEGORIES: tuple[str, ...] = (
    "Crimes_And_Illegal_Activities",
    "Ethics_And_Morality",
    "Goal_Hijacking",
    "Inquiry_With_Unsafe_Opinion",
    "Insult",
    "Mental_Health",
    "Physical_Harm",
    "Privacy_And_Property",
    "Prompt_Leaking",
    "Reverse_Exposure",
    "Role_Play_Instruction",
    "Unfairness_And_Discrimination",
    "Unsafe_Instruction_Topic",
    "commonsense",
)
# commonsense holds multiple-choice safety-knowledge questions; Goal_Hijacking/Prompt_Leaking are
# injection attacks. None of them is a plain harmful request.
DEFAULT_XSAFETY_CATEGORIES: tuple[str, ...] = tuple(
    c for c in XSAFETY_CATEGORIES if c not in ("commonsense", "Goal_Hijacking", "Prompt_Leaking")
)
XSAFETY_ROWS = 200
# Directory per language where it is not the code itself.
_XSAFETY_DIRS = {"es": "sp"}
# Misspelt upstream file names -> canonical category (after the `_n`/`_en` suffix is removed).
_XSAFETY_ALIASES = {
    "crimes_and_illegal_activitie": "Crimes_And_Illegal_Activities",  # ru
    "commen_sense": "commonsense",  # hi, an older, shorter copy beside commonsense.csv
}
# Blank upstream cells checked by hand against the other nine languages: the translation is missing
# (alignment is intact), so the id is dropped silently instead of with a warning.
_XSAFETY_KNOWN_GAPS = frozenset({("ru", "Insult", 164)})


def _xsafety_category(name: str) -> str | None:
    """Canonical category for a file stem or user-given name, None if it is not one."""
    key = re.sub(r"_(n|en)$", "", name.strip(), flags=re.IGNORECASE).lower()
    key = _XSAFETY_ALIASES.get(key, key)
    for cat in XSAFETY_CATEGORIES:
        if cat.lower() == key.lower():
            return cat
    return None


def xsafety_files(root: Path, language: str) -> dict[str, Path]:
    """Map canonical category -> file for one language (file names differ per language)."""
    folder = root / "xsafety" / _XSAFETY_DIRS.get(language, language)
    if not folder.is_dir():
        raise DataNotFoundError(f"{folder}: XSafety folder for language {language!r} not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".csv", ".xlsx") or path.name.startswith("."):
            continue
        cat = _xsafety_category(path.stem)
        if cat is None:
            warnings.warn(f"{path}: not an XSafety category file, ignored", DataWarning, stacklevel=2)
            continue
        if cat in found:
            # Prefer the file spelt exactly like the category (hi has commonsense.csv and commen_sense.csv).
            exact = [q for q in (found[cat], path) if re.sub(r"_(n|en)$", "", q.stem) == cat]
            if len(exact) != 1:
                raise DataFormatError(path, f"two files for category {cat!r}: {found[cat].name} and {path.name}")
            found[cat] = exact[0]
        else:
            found[cat] = path
    return found


def _clean_xsafety(text: str) -> str:
    # Line breaks inside XSafety cells are wrapping artefacts (Bengali cells, a few multi-line quoted
    # fields): the English originals are single lines, so fold them into one space.
    text = re.sub(r"\s*\n\s*", " ", text.replace("\r", "\n")).strip()
    # A stray pair of wrapping quotes left by double quoting; inner quotes (quoted answers) stay.
    if len(text) >= 2 and text[0] == text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1].strip()
    return text


def _xsafety_cells(path: Path) -> list[tuple[int, str]]:
    """One (line, text) per prompt row, in file order; trailing blank rows dropped."""
    if path.suffix.lower() == ".xlsx":
        cells = _read_xlsx_column(path)
    else:
        cells = []
        for line, fields in read_csv_rows(path):
            # One prompt per record. Should a record have unquoted commas it splits into several
            # fields: join them back; drop the empty trailing fields some exports add (`"...",,`).
            while fields and not fields[-1].strip():
                fields = fields[:-1]
            cells.append((line, ",".join(fields)))
    cells = [(n, _clean_xsafety(t)) for n, t in cells]
    while cells and not cells[-1][1]:
        cells.pop()
    return cells


def _read_xlsx_column(path: Path) -> list[tuple[int, str]]:
    import openpyxl  # local import: only XSafety's Bengali files need it

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises several types for damaged files
        raise DataFormatError(path, f"cannot read as .xlsx ({err})", None, "Re-save it with a spreadsheet program") from None
    try:
        ws = wb.worksheets[0]
        out: list[tuple[int, str]] = []
        for n, row in enumerate(ws.iter_rows(values_only=True), start=1):
            values = [_cell(v).strip() for v in row if v is not None and _cell(v).strip()]
            if len(values) > 1:
                raise DataFormatError(path, f"expected one column, found {len(values)} filled cells", n)
            out.append((n, values[0] if values else ""))
        return out
    finally:
        wb.close()


def load_xsafety(
    languages: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
    root: str | Path | None = None,
) -> list[PromptRecord]:
    """XSafety: 200 line-parallel prompts per category in 10 languages; id `xsafety/{category}/{row}`.

    `categories` default to `DEFAULT_XSAFETY_CATEGORIES` (the 11 plain harmful-request categories);
    names are matched case-insensitively, misspelt upstream names are accepted too. Label: harmful,
    except `commonsense` (safety-knowledge questions a model should answer): benign.
    """
    base = Path(root) if root is not None else find_data_root()
    langs = _select_languages(languages, XSAFETY_LANGUAGES, "xsafety")
    if categories is None:
        cats = list(DEFAULT_XSAFETY_CATEGORIES)
    else:
        cats = []
        for name in categories:
            cat = _xsafety_category(name)
            if cat is None:
                raise ValueError(f"unknown XSafety category {name!r}; known: {', '.join(XSAFETY_CATEGORIES)}")
            if cat not in cats:
                cats.append(cat)
    records: list[PromptRecord] = []
    for lang in langs:
        files = xsafety_files(base, lang)
        for cat in cats:
            if cat not in files:
                raise DataNotFoundError(f"{base / 'xsafety'}: no {cat!r} file for language {lang!r}")
            path = files[cat]
            cells = _xsafety_cells(path)
            if len(cells) != XSAFETY_ROWS:
                warnings.warn(
                    f"{path}: {len(cells)} prompts, expected {XSAFETY_ROWS}; rows may not be parallel",
                    DataWarning,
                    stacklevel=2,
                )
            rel = path.relative_to(base).as_posix()
            for index, (line, text) in enumerate(cells):
                if not text:
                    if (lang, cat, index) not in _XSAFETY_KNOWN_GAPS:
                        _warn_empty(path, line)
                    continue
                records.append(
                    PromptRecord(
                        id=f"xsafety/{cat}/{index}",
                        text=text,
                        language=lang,
                        label="benign" if cat == "commonsense" else "harmful",
                        category=cat,
                        source="xsafety",
                        meta={"file": rel, "line": str(line)},
                    )
                )
    return records


# --------------------------------------------------------------------------------------------------
# English harmful-request sets
# --------------------------------------------------------------------------------------------------


def _shared_file(path: str | Path | None, root: str | Path | None, relative: str) -> Path:
    if path is not None:
        return Path(path)
    base = Path(root) if root is not None else find_data_root()
    return base / relative


def load_advbench(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """AdvBench `harmful_behaviors.csv` (`goal,target`); id `advbench/{row}` (0-based data row)."""
    p = _shared_file(path, root, "advbench/harmful_behaviors.csv")
    _, rows = read_table(p, ["goal", "target"])
    out: list[PromptRecord] = []
    for i, (n, row) in enumerate(rows):
        text = row["goal"].strip()
        if not text:
            _warn_empty(p, n)
            continue
        out.append(
            PromptRecord(
                id=f"advbench/{i}", text=text, language="en", label="harmful",
                source="advbench", meta={"target": row["target"].strip()},
            )
        )
    return out


def load_harmbench(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """HarmBench behaviours CSV (val here; the test split has the same columns); id `harmbench/{BehaviorID}`.

    Contextual behaviours are given as HarmBench prompts them: `{context}\\n\\n---\\n\\n{behavior}`.
    """
    p = _shared_file(path, root, "harmbench/harmbench_behaviors_text_val.csv")
    cols = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]
    _, rows = read_table(p, cols)
    out: list[PromptRecord] = []
    for n, row in rows:
        behavior, context = row["Behavior"].strip(), row["ContextString"].strip()
        if not behavior:
            _warn_empty(p, n)
            continue
        if not row["BehaviorID"].strip():
            raise DataFormatError(p, "empty BehaviorID", n)
        out.append(
            PromptRecord(
                id=f"harmbench/{row['BehaviorID'].strip()}",
                text=f"{context}\n\n---\n\n{behavior}" if context else behavior,
                language="en",
                label="harmful",
                category=row["SemanticCategory"].strip(),
                source="harmbench",
                meta={
                    "behavior": behavior,
                    "functional_category": row["FunctionalCategory"].strip(),
                    "tags": row["Tags"].strip(),
                    "context": context,
                },
            )
        )
    return out


def load_jailbreakbench(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """JBB-Behaviors, harmful half (`,Goal,Target,Behavior,Category,Source`); id `jailbreakbench/{row}`."""
    p = _shared_file(path, root, "jailbreakbench/jbb_harmful_behaviors.csv")
    _, rows = read_table(p, ["Goal", "Target", "Behavior", "Category", "Source"])
    out: list[PromptRecord] = []
    for i, (n, row) in enumerate(rows):
        text = row["Goal"].strip()
        if not text:
            _warn_empty(p, n)
            continue
        out.append(
            PromptRecord(
                id=f"jailbreakbench/{i}", text=text, language="en", label="harmful",
                category=row["Category"].strip(), source="jailbreakbench",
                meta={"behavior": row["Behavior"].strip(), "target": row["Target"].strip(),
                      "upstream_source": row["Source"].strip()},
            )
        )
    return out


def load_safe_responses(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """HarmBench adversarial-training refusals (`Behavior,Safe_Response`): harmful prompt, reference = refusal."""
    p = _shared_file(path, root, "safe-responses/adv_training_behaviors_safe_responses.csv")
    _, rows = read_table(p, ["Behavior", "Safe_Response"])
    out: list[PromptRecord] = []
    for i, (n, row) in enumerate(rows):
        text = row["Behavior"].strip()
        if not text:
            _warn_empty(p, n)
            continue
        out.append(
            PromptRecord(
                id=f"safe-responses/{i}", text=text, language="en", label="harmful",
                source="safe-responses", reference=row["Safe_Response"].strip() or None,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# Benign sets
# --------------------------------------------------------------------------------------------------


def load_alpaca_seed(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """Self-instruct seed tasks: text = instruction (+ blank line + input if any), reference = output.

    id `alpaca-seed/{id}` (e.g. `alpaca-seed/seed_task_0`); only the first instance of a task is used.
    """
    p = _shared_file(path, root, "alpaca-seed/seed_tasks.jsonl")
    _, rows = read_table(p, ["id", "instruction", "instances"])
    out: list[PromptRecord] = []
    for n, row in rows:
        try:
            instances = json.loads(row["instances"])
            first = instances[0]
            task_input = str(first.get("input", "") or "").strip()
            output = str(first.get("output", "") or "").strip()
        except (ValueError, IndexError, TypeError, AttributeError):
            raise DataFormatError(p, "'instances' must be a non-empty list of {input, output} objects", n) from None
        instruction = row["instruction"].strip()
        if not instruction:
            _warn_empty(p, n)
            continue
        out.append(
            PromptRecord(
                id=f"alpaca-seed/{row['id'].strip()}",
                text=f"{instruction}\n\n{task_input}" if task_input else instruction,
                language="en",
                label="benign",
                category=row.get("name", "").strip(),
                source="alpaca-seed",
                reference=output or None,
                meta={"is_classification": row.get("is_classification", "")},
            )
        )
    return out


MGSM_LANGUAGES: tuple[str, ...] = ("en", "bn", "de", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")


def load_mgsm(languages: Sequence[str] | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """MGSM: 250 parallel maths problems per language (`mgsm_{lang}.tsv`, `question<TAB>answer`, no header).

    id `mgsm/{row}`; reference = the numeric answer.
    """
    base = Path(root) if root is not None else find_data_root()
    out: list[PromptRecord] = []
    for lang in _select_languages(languages, MGSM_LANGUAGES, "mgsm"):
        p = base / "mgsm" / f"mgsm_{lang}.tsv"
        lines = read_text(p).splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        for i, line in enumerate(lines):
            # Split by hand: questions contain quote characters that a CSV reader would interpret.
            if line.count("\t") != 1:
                raise DataFormatError(
                    p, f"expected 'question<TAB>answer', found {line.count(chr(9))} tabs", i + 1,
                    "Keep exactly one tab per line",
                )
            question, answer = (s.strip() for s in line.split("\t"))
            if not question:
                _warn_empty(p, i + 1)
                continue
            out.append(
                PromptRecord(
                    id=f"mgsm/{i}", text=question, language=lang, label="benign", source="mgsm",
                    reference=answer, meta={"answer": answer},
                )
            )
    return out


XCOPA_LANGUAGES: tuple[str, ...] = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")


def load_xcopa(
    languages: Sequence[str] | None = None, split: str = "test", root: str | Path | None = None
) -> list[PromptRecord]:
    """XCOPA (`{lang}/{split}.{lang}.jsonl`): text = premise; premise, choices, question, label in meta.

    id `xcopa/{split}/{idx}`, parallel across languages. `split` is `test` (500) or `val` (100).
    """
    if split not in ("test", "val"):
        raise ValueError(f"unknown XCOPA split {split!r}: use 'test' or 'val'")
    base = Path(root) if root is not None else find_data_root()
    cols = ["premise", "choice1", "choice2", "question", "label", "idx"]
    out: list[PromptRecord] = []
    for lang in _select_languages(languages, XCOPA_LANGUAGES, "xcopa"):
        p = base / "xcopa" / lang / f"{split}.{lang}.jsonl"
        _, rows = read_table(p, cols)
        for n, row in rows:
            premise = row["premise"].strip()
            if not premise:
                _warn_empty(p, n)
                continue
            out.append(
                PromptRecord(
                    id=f"xcopa/{split}/{row['idx']}", text=premise, language=lang, label="benign",
                    category=row["question"], source="xcopa",
                    meta={k: row[k] for k in ("premise", "choice1", "choice2", "question", "label")} | {"split": split},
                )
            )
    return out


# --------------------------------------------------------------------------------------------------
# FigStep / SafeBench
# --------------------------------------------------------------------------------------------------

_FIGSTEP_FILES = {
    "tiny": "figstep/SafeBench-Tiny.csv",
    "full": "figstep/safebench.csv",
    "benign": "figstep/benign_sentences_without_harmful_phase.csv",
}


def load_figstep(subset: str = "tiny", root: str | Path | None = None) -> list[PromptRecord]:
    """FigStep's SafeBench (`full`, 500), SafeBench-Tiny (`tiny`, 50) or its benign sentences (`benign`, 50).

    SafeBench rows: text = `question`, harmful, category = `category_name`, id
    `figstep/{category_id}-{task_id}` (the Tiny ids are a subset of the full ids). `meta["instruction"]`
    holds the typographic statement FigStep renders into an image; `meta["image"]` the upstream
    reference image where one exists (Tiny only). Benign rows: text = `sentence`, id `figstep-benign/{row}`.
    """
    if subset not in _FIGSTEP_FILES:
        raise ValueError(f"unknown FigStep subset {subset!r}: use one of {', '.join(_FIGSTEP_FILES)}")
    base = Path(root) if root is not None else find_data_root()
    p = base / _FIGSTEP_FILES[subset]
    out: list[PromptRecord] = []
    if subset == "benign":
        records = [(n, r) for n, r in read_csv_rows(p) if any(f.strip() for f in r)]
        header = [h.strip() for h in records[0][1]] if records else []
        _require_columns(p, header, ["sentence"], records[0][0] if records else 1)
        if len(header) != 1:
            raise DataFormatError(p, f"expected the single column 'sentence', found {len(header)} columns", 1)
        for i, (n, fields) in enumerate(records[1:]):
            # One-column file with an unquoted comma on one line ("$50,000"): join the fields back.
            text = ",".join(fields).strip()
            if not text:
                _warn_empty(p, n)
                continue
            out.append(PromptRecord(id=f"figstep-benign/{i}", text=text, language="en", label="benign",
                                    source="figstep-benign"))
        return out
    _, rows = read_table(p, ["dataset", "category_id", "task_id", "category_name", "question", "instruction"])
    source = "figstep-tiny" if subset == "tiny" else "figstep"
    for n, row in rows:
        text = row["question"].strip()
        if not text:
            _warn_empty(p, n)
            continue
        cat_id, task_id = row["category_id"].strip(), row["task_id"].strip()
        meta = {
            "instruction": row["instruction"].strip(),
            "category_id": cat_id,
            "task_id": task_id,
            "dataset": row["dataset"].strip(),
        }
        image = base / "figstep" / "reference-images" / f"query_{row['dataset'].strip()}_{cat_id}_{task_id}_6.png"
        if image.is_file():
            meta["image"] = str(image)
        out.append(
            PromptRecord(
                id=f"figstep/{cat_id}-{task_id}", text=text, language="en", label="harmful",
                category=row["category_name"].strip(), source=source, meta=meta,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# Formats users bring (not in shared/data)
# --------------------------------------------------------------------------------------------------

_MULTIJAIL_FIXED = ("id", "source", "tags")


def load_multijail(path: str | Path) -> list[PromptRecord]:
    """MultiJail CSV (`id,source,tags,en,zh,...`): one record per row and language column, id `multijail/{id}`.

    Every column after id/source/tags is a language and must be an ISO 639-1 code. `tags` is a
    Python list literal, parsed without eval; the first tag becomes the category.
    """
    p = Path(path)
    columns, rows = read_table(p, list(_MULTIJAIL_FIXED))
    lang_cols = [c for c in columns if c not in _MULTIJAIL_FIXED]
    if not lang_cols:
        raise DataFormatError(p, "no language columns after id,source,tags", 1)
    langs = {c: _language_at(c, p, 1) for c in lang_cols}
    out: list[PromptRecord] = []
    seen: set[str] = set()
    for n, row in rows:
        rid = row["id"].strip()
        if not rid:
            raise DataFormatError(p, "empty id", n)
        if rid in seen:
            raise DataFormatError(p, f"duplicate id {rid!r}", n, "ids must be unique")
        seen.add(rid)
        try:
            tags = parse_list_literal(row["tags"])
        except ValueError as err:
            raise DataFormatError(p, f"bad tags value ({err})", n, "Write tags as ['tag one', 'tag two']") from None
        for col in lang_cols:
            text = row[col].strip()
            if not text:
                _warn_empty(p, n)
                continue
            out.append(
                PromptRecord(
                    id=f"multijail/{rid}", text=text, language=langs[col], label="harmful",
                    category=tags[0] if tags else "", source="multijail",
                    meta={"tags": "; ".join(tags), "upstream_source": row["source"].strip()},
                )
            )
    return out


def load_xstest(path: str | Path) -> list[PromptRecord]:
    """XSTest (`id,prompt,type,label,focus,note`): label safe -> benign, unsafe -> harmful; id `xstest/{id}`."""
    p = Path(path)
    _, rows = read_table(p, ["id", "prompt", "type", "label"])
    out: list[PromptRecord] = []
    for n, row in rows:
        text = row["prompt"].strip()
        if not text:
            _warn_empty(p, n)
            continue
        out.append(
            PromptRecord(
                id=f"xstest/{row['id'].strip()}", text=text, language="en",
                label=_label_at(row["label"], p, n),  # type: ignore[arg-type]
                category=row["type"].strip(), source="xstest",
                meta={"focus": row.get("focus", "").strip(), "note": row.get("note", "").strip()},
            )
        )
    return out


def load_strongreject(path: str | Path) -> list[PromptRecord]:
    """StrongREJECT (`category,source,forbidden_prompt`): harmful; id `strongreject/{row}`."""
    p = Path(path)
    _, rows = read_table(p, ["category", "source", "forbidden_prompt"])
    out: list[PromptRecord] = []
    for i, (n, row) in enumerate(rows):
        text = row["forbidden_prompt"].strip()
        if not text:
            _warn_empty(p, n)
            continue
        out.append(
            PromptRecord(
                id=f"strongreject/{i}", text=text, language="en", label="harmful",
                category=row["category"].strip(), source="strongreject",
                meta={"upstream_source": row["source"].strip()},
            )
        )
    return out


def load_table(
    path: str | Path,
    text_column: str,
    language: str = "en",
    label: str = "harmful",
    id_column: str | None = None,
    language_column: str | None = None,
    label_column: str | None = None,
    category_column: str | None = None,
    reference_column: str | None = None,
    source: str | None = None,
) -> list[PromptRecord]:
    """Generic CSV / TSV / JSONL / JSON table with a column mapping.

    `language` and `label` apply to every row unless `language_column` / `label_column` are given.
    ids are `{source}/{id_column value}` (default: the 0-based data row); `source` defaults to the
    file's stem. Duplicate (id, language) pairs are an error, since ids link translations.
    """
    p = Path(path)
    required = [c for c in (text_column, id_column, language_column, label_column, category_column,
                            reference_column) if c]
    _, rows = read_table(p, required)
    src = source or p.stem
    default_lang = normalise_language(language)
    default_label = normalise_label(label)
    out: list[PromptRecord] = []
    seen: dict[tuple[str, str], int] = {}
    for i, (n, row) in enumerate(rows):
        text = row[text_column].strip()
        if not text:
            _warn_empty(p, n)
            continue
        key = row[id_column].strip() if id_column else str(i)
        if not key:
            raise DataFormatError(p, f"empty value in id column {id_column!r}", n)
        lang = _language_at(row[language_column], p, n) if language_column else default_lang
        rid = f"{src}/{key}"
        if (rid, lang) in seen:
            raise DataFormatError(p, f"duplicate id {key!r} for language {lang!r} (first on line {seen[(rid, lang)]})", n)
        seen[(rid, lang)] = n
        out.append(
            PromptRecord(
                id=rid, text=text, language=lang,
                label=_label_at(row[label_column], p, n) if label_column else default_label,  # type: ignore[arg-type]
                category=row[category_column].strip() if category_column else "",
                source=src,
                reference=(row[reference_column].strip() or None) if reference_column else None,
            )
        )
    return out


# Column names `load_file` picks up in a generic table, first match wins.
_TEXT_COLUMNS = ("text", "prompt")
_OPTIONAL_COLUMNS = {
    "id": ("id",),
    "language": ("language", "lang"),
    "label": ("label",),
    "category": ("category",),
    "reference": ("reference",),
}


def detect_format(path: str | Path) -> str:
    """Name the format of a prompt file from its extension and header.

    One of `multijail`, `xstest`, `strongreject`, `harmbench`, `advbench`, `jailbreakbench`, `table`.
    """
    p = Path(path)
    if p.suffix.lower() not in (".csv", ".tsv"):
        return "table"
    rows = read_csv_rows(p, "\t" if p.suffix.lower() == ".tsv" else ",")
    header = next((r for _, r in rows if any(f.strip() for f in r)), [])
    cols = {h.strip() for h in header}
    if {"id", "source", "tags", "en"} <= cols:
        return "multijail"
    if {"id", "prompt", "type", "label"} <= cols:
        return "xstest"
    if "forbidden_prompt" in cols:
        return "strongreject"
    if {"Behavior", "BehaviorID", "ContextString"} <= cols:
        return "harmbench"
    if {"goal", "target"} <= cols:
        return "advbench"
    if {"Goal", "Target", "Behavior", "Category"} <= cols:
        return "jailbreakbench"
    return "table"


def load_file(path: str | Path, label: str | None = None) -> list[PromptRecord]:
    """Load a prompt file of any supported format (see `detect_format`).

    A generic table needs a `text` or `prompt` column; `id`, `language`/`lang`, `label`, `category`
    and `reference` columns are used when present. Without a label column every row gets `label`
    (default harmful).
    """
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"{p}: no such file")
    fmt = detect_format(p)
    loaders: dict[str, Callable[[Path], list[PromptRecord]]] = {
        "multijail": load_multijail,
        "xstest": load_xstest,
        "strongreject": load_strongreject,
        "harmbench": load_harmbench,
        "advbench": load_advbench,
        "jailbreakbench": load_jailbreakbench,
    }
    if fmt in loaders:
        return loaders[fmt](p)
    columns, _ = read_table(p)
    text_col = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if text_col is None:
        raise DataFormatError(
            p, f"no 'text' or 'prompt' column (found: {', '.join(columns)})", 1,
            "Name the prompt column 'text' or 'prompt', or call load_table() with text_column=",
        )
    opt = {k: next((c for c in names if c in columns), None) for k, names in _OPTIONAL_COLUMNS.items()}
    return load_table(
        p, text_col, label=label or "harmful", id_column=opt["id"], language_column=opt["language"],
        label_column=opt["label"], category_column=opt["category"], reference_column=opt["reference"],
    )


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

# (root, languages, option) -> records. The option is the part after `name:`.
Loader = Callable[[Path, Sequence[str] | None, str | None], list[PromptRecord]]


def _no_option(name: str, option: str | None) -> None:
    if option:
        raise ValueError(f"data set {name!r} takes no option (got {name}:{option})")


def _en_only(name: str, fn: Callable[..., list[PromptRecord]]) -> Loader:
    def load(root: Path, languages: Sequence[str] | None, option: str | None) -> list[PromptRecord]:
        _no_option(name, option)
        _select_languages(languages, ("en",), name)
        return fn(root=root)

    return load


def _load_xsafety_entry(root: Path, languages: Sequence[str] | None, option: str | None) -> list[PromptRecord]:
    cats: list[str] | None = None
    if option:
        cats = list(XSAFETY_CATEGORIES) if option == "all" else [c for c in option.split(",") if c.strip()]
    return load_xsafety(languages, cats, root=root)


def _load_mgsm_entry(root: Path, languages: Sequence[str] | None, option: str | None) -> list[PromptRecord]:
    _no_option("mgsm", option)
    return load_mgsm(languages, root=root)


def _load_xcopa_entry(root: Path, languages: Sequence[str] | None, option: str | None) -> list[PromptRecord]:
    return load_xcopa(languages, split=option or "test", root=root)


def _figstep_entry(name: str, subset: str) -> Loader:
    def load(root: Path, languages: Sequence[str] | None, option: str | None) -> list[PromptRecord]:
        _no_option(name, option)
        _select_languages(languages, ("en",), name)
        return load_figstep(subset, root=root)

    return load


def _load_parallel_benign_entry(root: Path, languages: Sequence[str] | None, option: str | None) -> list[PromptRecord]:
    from neuroshield.data.templates import load_parallel_benign

    _no_option("parallel-benign", option)
    return load_parallel_benign(languages)


def _load_contrast_entry(root: Path, languages: Sequence[str] | None, option: str | None) -> list[PromptRecord]:
    from neuroshield.data.templates import load_contrast_set

    split = option or None
    return load_contrast_set(languages, split, "benign") + load_contrast_set(languages, split, "harmful")


@dataclass(frozen=True)
class DatasetSpec:
    """A data set in the shared data root, or (`builtin`) one the project wrote, in `neuroshield/resources`."""

    name: str
    path: str  # folder or file, relative to the data root
    label: str  # harmful | benign | mixed
    languages: tuple[str, ...]
    description: str
    load: Loader = field(repr=False, compare=False)
    option_help: str = ""  # what `name:option` means, empty if the set takes no option
    builtin: bool = False  # `path` is a file of neuroshield/resources, not of the data root


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("xsafety", "xsafety", "harmful", XSAFETY_LANGUAGES,
                    "XSafety multilingual safety prompts, 200 per category, parallel", _load_xsafety_entry,
                    "comma-separated categories, or 'all' (default: the 11 plain harmful-request ones)"),
        DatasetSpec("advbench", "advbench/harmful_behaviors.csv", "harmful", ("en",),
                    "AdvBench harmful behaviours", _en_only("advbench", load_advbench)),
        DatasetSpec("harmbench", "harmbench/harmbench_behaviors_text_val.csv", "harmful", ("en",),
                    "HarmBench text behaviours (val split)", _en_only("harmbench", load_harmbench)),
        DatasetSpec("jailbreakbench", "jailbreakbench/jbb_harmful_behaviors.csv", "harmful", ("en",),
                    "JBB-Behaviors, harmful half", _en_only("jailbreakbench", load_jailbreakbench)),
        DatasetSpec("safe-responses", "safe-responses/adv_training_behaviors_safe_responses.csv", "harmful",
                    ("en",), "HarmBench harmful prompts with a safe reference response",
                    _en_only("safe-responses", load_safe_responses)),
        DatasetSpec("alpaca-seed", "alpaca-seed/seed_tasks.jsonl", "benign", ("en",),
                    "Self-instruct seed tasks with reference outputs", _en_only("alpaca-seed", load_alpaca_seed)),
        DatasetSpec("mgsm", "mgsm", "benign", MGSM_LANGUAGES,
                    "MGSM grade-school maths, 250 per language, parallel", _load_mgsm_entry),
        DatasetSpec("xcopa", "xcopa", "benign", XCOPA_LANGUAGES,
                    "XCOPA causal commonsense premises, parallel", _load_xcopa_entry,
                    "split: 'test' (500, default) or 'val' (100)"),
        DatasetSpec("figstep-tiny", "figstep/SafeBench-Tiny.csv", "harmful", ("en",),
                    "SafeBench-Tiny questions (FigStep), with reference images", _figstep_entry("figstep-tiny", "tiny")),
        DatasetSpec("figstep", "figstep/safebench.csv", "harmful", ("en",),
                    "SafeBench questions (FigStep)", _figstep_entry("figstep", "full")),
        DatasetSpec("figstep-benign", "figstep/benign_sentences_without_harmful_phase.csv", "benign", ("en",),
                    "FigStep benign typographic sentences", _figstep_entry("figstep-benign", "benign")),
        DatasetSpec("parallel-benign", "parallel_benign.jsonl", "benign",
                    ("en", "zh", "ar", "ru", "hi", "es", "fr", "de", "ja", "bn", "it", "vi", "ko", "th", "sw", "jv"),
                    "Everyday benign requests, parallel in 16 languages (written by the project)",
                    _load_parallel_benign_entry, builtin=True),
        DatasetSpec("contrast", "contrast_set.jsonl", "mixed", ("en", "zh", "ar", "ru", "es", "fr", "de", "ja", "bn", "hi"),
                    "Safe requests that sound dangerous, parallel in 10 languages, each paired with an English harmful "
                    "request on the same topic (written by the project)", _load_contrast_entry,
                    "the file's fixed split by topic pair: 'train' or 'eval' (default: both)", builtin=True),
    )
}


def dataset_path(spec: DatasetSpec, root: Path) -> Path:
    """Where a registered data set's file or folder lies."""
    if spec.builtin:
        from importlib import resources

        return Path(str(resources.files("neuroshield") / "resources" / spec.path))
    return root / spec.path


def _resolve_source(source: str) -> tuple[DatasetSpec | None, str | None, Path | None]:
    """(spec, option, None) for a registered name or `name:option`; (None, None, path) for a file."""
    if source in DATASETS:
        return DATASETS[source], None, None
    path = Path(source).expanduser()
    if path.is_file():
        return None, None, path
    name, sep, option = source.partition(":")
    if sep and name in DATASETS:
        if not DATASETS[name].option_help:
            raise ValueError(f"data set {name!r} takes no option (got {source!r})")
        return DATASETS[name], option.strip(), None
    if path.suffix or "/" in source or "\\" in source:
        raise DataNotFoundError(f"{source}: no such file")
    raise ValueError(f"unknown data set {source!r}; known: {', '.join(DATASETS)} (or give a file path)")


def _apply_limit(records: list[PromptRecord], limit: int) -> list[PromptRecord]:
    """Keep the first `limit` ids per language, ids present in every language first, in natural order.

    Ranking shared ids first keeps parallel sets parallel even where one language lacks an id.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    by_lang: dict[str, set[str]] = {}
    for r in records:
        by_lang.setdefault(r.language, set()).add(r.id)
    common = set.intersection(*by_lang.values()) if by_lang else set()
    keep: set[tuple[str, str]] = set()
    for lang, ids in by_lang.items():
        ranked = sorted(ids, key=lambda i: (i not in common, _natural_key(i)))
        keep.update((lang, i) for i in ranked[:limit])
    return [r for r in records if (r.language, r.id) in keep]


def load_prompts(
    source: str,
    languages: list[str] | None = None,
    label: str | None = None,
    limit: int | None = None,
    categories: Sequence[str] | None = None,
    root: str | Path | None = None,
) -> list[PromptRecord]:
    """Load prompts from a registered data set, `name:option`, or a file path.

    * `source`: a name in `DATASETS` (`xsafety`, `mgsm`, ...); `xsafety:Insult,Mental_Health` or
      `xsafety:all` picks XSafety categories, `xcopa:val` the XCOPA split; or a file path (format
      detected by `detect_format`).
    * `languages`: keep these ISO 639-1 codes (an error if a registered set lacks one).
    * `label`: keep only `harmful` or `benign` prompts; for a file without a label column it is also
      the label every row gets.
    * `limit`: the first N ids per language (natural sort, shared ids first): deterministic, and
      parallel sets stay parallel.
    * `categories`: keep these categories (for XSafety: which category files to read).
    """
    spec, option, path = _resolve_source(source)
    if label is not None:
        label = normalise_label(label)
    if spec is not None:
        base = Path(root) if root is not None else find_data_root()
        if spec.name == "xsafety" and categories is not None:
            if option:
                raise ValueError("give XSafety categories either as xsafety:CATS or as categories=, not both")
            option = ",".join(categories)
            categories = None
        records = spec.load(base, languages, option)
    else:
        assert path is not None
        records = load_file(path, label=label)
        if languages is not None:
            wanted = {normalise_language(c) for c in languages}
            present = {r.language for r in records}
            missing = sorted(wanted - present)
            if missing:
                raise ValueError(f"{path} has no prompts in {', '.join(missing)}; it has {', '.join(sorted(present))}")
            records = [r for r in records if r.language in wanted]
    if categories is not None:
        known = {r.category for r in records}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"{source}: unknown categories {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        records = [r for r in records if r.category in set(categories)]
    if label is not None:
        records = [r for r in records if r.label == label]
    if limit is not None:
        records = _apply_limit(records, limit)
    return records


@dataclass(frozen=True)
class DatasetInfo:
    """What `neuroshield data list` shows for one registered data set."""

    name: str
    path: Path
    label: str
    languages: dict[str, int]  # language -> prompts loaded by default
    licence: Path | None
    description: str
    option_help: str = ""
    error: str | None = None  # why it could not be loaded, if it could not


def _licence_file(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return None
    hits = sorted(q for q in folder.iterdir() if q.is_file() and q.name.upper().startswith(("LICENSE", "LICENCE")))
    return hits[0] if hits else None


def list_datasets(root: str | Path | None = None) -> list[DatasetInfo]:
    """Every registered data set with its prompt count per language (as `load_prompts(name)` gives)."""
    base = Path(root) if root is not None else find_data_root()
    out: list[DatasetInfo] = []
    for spec in DATASETS.values():
        path = dataset_path(spec, base)
        counts: dict[str, int] = {}
        error: str | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)
                records = spec.load(base, None, None)
            for r in records:
                counts[r.language] = counts.get(r.language, 0) + 1
        except (OSError, ValueError) as err:
            error = str(err)
        out.append(
            DatasetInfo(spec.name, path, spec.label, counts, _licence_file(path), spec.description,
                        spec.option_help, error)
        )
    return out
