"""XSafety: 200 line-parallel prompts per category in 10 languages, with the upstream files' irregularities
(folder and file names per language, misspelt categories, Bengali .xlsx files, wrapped cells)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from neuroshield.data.files import DataFormatError, DataWarning, cell_text, read_csv_rows, select_languages, warn_empty
from neuroshield.data.paths import DataNotFoundError, find_data_root
from neuroshield.data.records import PromptRecord

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
            values = [cell_text(v).strip() for v in row if v is not None and cell_text(v).strip()]
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
    langs = select_languages(languages, XSAFETY_LANGUAGES, "xsafety")
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
                        warn_empty(path, line)
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
