"""The loaders of every data set but XSafety, and of the formats users bring: each returns `list[PromptRecord]`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from neuroshield.data.files import (
    DataFormatError,
    label_at,
    language_at,
    normalise_label,
    normalise_language,
    parse_list_literal,
    read_csv_rows,
    read_table,
    read_text,
    require_columns,
    select_languages,
    warn_empty,
)
from neuroshield.data.paths import DataNotFoundError, find_data_root
from neuroshield.data.records import PromptRecord

# --------------------------------------------------------------------------------------------------
# English prompt tables (one format, many files)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSource:
    """A prompt table whose loader differs from the others only in its file, columns and labels: one row is one
    English prompt, id `{name}/{id column}` (or the 0-based data row, counting rows skipped for an empty text)."""

    name: str  # the records' `source` and id prefix; also the name `detect_format` gives the format
    file: str  # the file in the data root, relative to it ("" for the formats users bring)
    columns: tuple[str, ...]  # required columns
    text: str  # the prompt column
    id_column: str = ""  # "": the 0-based data row
    label: str = "harmful"  # every row's label, unless `label_column` gives it per row
    label_column: str = ""  # harmful / benign (or unsafe / safe) per row
    category: str = ""  # column of the category
    reference: str = ""  # column of a reference response (an empty cell: none)
    context: str = ""  # column put before the text as `{context}\n\n---\n\n{text}` where filled (HarmBench)
    meta: tuple[tuple[str, str], ...] = ()  # (meta key, column); a column the file lacks gives ""


ADVBENCH = TableSource("advbench", "advbench/harmful_behaviors.csv", ("goal", "target"), "goal",
                       meta=(("target", "target"),))
HARMBENCH = TableSource(
    "harmbench", "harmbench/harmbench_behaviors_text_val.csv",
    ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"), "Behavior",
    id_column="BehaviorID", category="SemanticCategory", context="ContextString",
    meta=(("behavior", "Behavior"), ("functional_category", "FunctionalCategory"), ("tags", "Tags"),
          ("context", "ContextString")))
JAILBREAKBENCH = TableSource("jailbreakbench", "jailbreakbench/jbb_harmful_behaviors.csv",
                             ("Goal", "Target", "Behavior", "Category", "Source"), "Goal", category="Category",
                             meta=(("behavior", "Behavior"), ("target", "Target"), ("upstream_source", "Source")))
SAFE_RESPONSES = TableSource("safe-responses", "safe-responses/adv_training_behaviors_safe_responses.csv",
                             ("Behavior", "Safe_Response"), "Behavior", reference="Safe_Response")
XSTEST = TableSource("xstest", "", ("id", "prompt", "type", "label"), "prompt", id_column="id", label_column="label",
                     category="type", meta=(("focus", "focus"), ("note", "note")))
STRONGREJECT = TableSource("strongreject", "", ("category", "source", "forbidden_prompt"), "forbidden_prompt",
                           category="category", meta=(("upstream_source", "source"),))
TABLE_SOURCES: dict[str, TableSource] = {
    s.name: s for s in (ADVBENCH, HARMBENCH, JAILBREAKBENCH, SAFE_RESPONSES, XSTEST, STRONGREJECT)
}


def load_table_source(source: TableSource, path: str | Path) -> list[PromptRecord]:
    """The records of one `TableSource` file."""
    p = Path(path)
    _, rows = read_table(p, source.columns)
    out: list[PromptRecord] = []
    for i, (n, row) in enumerate(rows):
        text = row[source.text].strip()
        if not text:
            warn_empty(p, n)
            continue
        key = row[source.id_column].strip() if source.id_column else str(i)
        if not key:
            raise DataFormatError(p, f"empty {source.id_column}", n)
        context = row[source.context].strip() if source.context else ""
        out.append(
            PromptRecord(
                id=f"{source.name}/{key}",
                text=f"{context}\n\n---\n\n{text}" if context else text,
                language="en",
                label=label_at(row[source.label_column], p, n) if source.label_column else source.label,  # type: ignore[arg-type]
                category=row[source.category].strip() if source.category else "",
                source=source.name,
                reference=(row[source.reference].strip() or None) if source.reference else None,
                meta={key_: row.get(column, "").strip() for key_, column in source.meta},
            )
        )
    return out


def _shared_file(path: str | Path | None, root: str | Path | None, relative: str) -> Path:
    if path is not None:
        return Path(path)
    base = Path(root) if root is not None else find_data_root()
    return base / relative


def load_advbench(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """AdvBench `harmful_behaviors.csv` (`goal,target`); id `advbench/{row}` (0-based data row)."""
    return load_table_source(ADVBENCH, _shared_file(path, root, ADVBENCH.file))


def load_harmbench(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """HarmBench behaviours CSV (val here; the test split has the same columns); id `harmbench/{BehaviorID}`.

    Contextual behaviours are given as HarmBench prompts them: `{context}\\n\\n---\\n\\n{behavior}`.
    """
    return load_table_source(HARMBENCH, _shared_file(path, root, HARMBENCH.file))


def load_jailbreakbench(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """JBB-Behaviors, harmful half (`,Goal,Target,Behavior,Category,Source`); id `jailbreakbench/{row}`."""
    return load_table_source(JAILBREAKBENCH, _shared_file(path, root, JAILBREAKBENCH.file))


def load_safe_responses(path: str | Path | None = None, root: str | Path | None = None) -> list[PromptRecord]:
    """HarmBench adversarial-training refusals (`Behavior,Safe_Response`): harmful prompt, reference = refusal."""
    return load_table_source(SAFE_RESPONSES, _shared_file(path, root, SAFE_RESPONSES.file))


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
            warn_empty(p, n)
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
    for lang in select_languages(languages, MGSM_LANGUAGES, "mgsm"):
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
                warn_empty(p, i + 1)
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
    for lang in select_languages(languages, XCOPA_LANGUAGES, "xcopa"):
        p = base / "xcopa" / lang / f"{split}.{lang}.jsonl"
        _, rows = read_table(p, cols)
        for n, row in rows:
            premise = row["premise"].strip()
            if not premise:
                warn_empty(p, n)
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
        require_columns(p, header, ["sentence"], records[0][0] if records else 1)
        if len(header) != 1:
            raise DataFormatError(p, f"expected the single column 'sentence', found {len(header)} columns", 1)
        for i, (n, fields) in enumerate(records[1:]):
            # One-column file with an unquoted comma on one line ("$50,000"): join the fields back.
            text = ",".join(fields).strip()
            if not text:
                warn_empty(p, n)
                continue
            out.append(PromptRecord(id=f"figstep-benign/{i}", text=text, language="en", label="benign",
                                    source="figstep-benign"))
        return out
    _, rows = read_table(p, ["dataset", "category_id", "task_id", "category_name", "question", "instruction"])
    source = "figstep-tiny" if subset == "tiny" else "figstep"
    for n, row in rows:
        text = row["question"].strip()
        if not text:
            warn_empty(p, n)
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
    langs = {c: language_at(c, p, 1) for c in lang_cols}
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
                warn_empty(p, n)
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
    return load_table_source(XSTEST, path)


def load_strongreject(path: str | Path) -> list[PromptRecord]:
    """StrongREJECT (`category,source,forbidden_prompt`): harmful; id `strongreject/{row}`."""
    return load_table_source(STRONGREJECT, path)


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
            warn_empty(p, n)
            continue
        key = row[id_column].strip() if id_column else str(i)
        if not key:
            raise DataFormatError(p, f"empty value in id column {id_column!r}", n)
        lang = language_at(row[language_column], p, n) if language_column else default_lang
        rid = f"{src}/{key}"
        if (rid, lang) in seen:
            raise DataFormatError(p, f"duplicate id {key!r} for language {lang!r} (first on line {seen[(rid, lang)]})", n)
        seen[(rid, lang)] = n
        out.append(
            PromptRecord(
                id=rid, text=text, language=lang,
                label=label_at(row[label_column], p, n) if label_column else default_label,  # type: ignore[arg-type]
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
    if fmt == "multijail":
        return load_multijail(p)
    if fmt in TABLE_SOURCES:
        return load_table_source(TABLE_SOURCES[fmt], p)
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
