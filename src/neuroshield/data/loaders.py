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

Here: the registry (`DATASETS`, `load_prompts`, `list_datasets`). The loaders live in `xsafety` and `sources`,
the file reading, errors and language codes in `files`; their public names are importable from here too.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neuroshield.data.files import (
    ISO_639_1,
    LABELS,
    DataFormatError,
    DataWarning,
    normalise_label,
    normalise_language,
    parse_list_literal,
    read_csv_rows,
    read_table,
    read_text,
    select_languages,
)
from neuroshield.data.paths import DataNotFoundError, find_data_root
from neuroshield.data.records import PromptRecord
from neuroshield.data.sources import (
    ADVBENCH,
    HARMBENCH,
    JAILBREAKBENCH,
    SAFE_RESPONSES,
    TABLE_SOURCES,
    TableSource,
    MGSM_LANGUAGES,
    XCOPA_LANGUAGES,
    detect_format,
    load_advbench,
    load_alpaca_seed,
    load_figstep,
    load_file,
    load_harmbench,
    load_jailbreakbench,
    load_mgsm,
    load_multijail,
    load_safe_responses,
    load_strongreject,
    load_table,
    load_table_source,
    load_xcopa,
    load_xstest,
)
from neuroshield.data.xsafety import (
    DEFAULT_XSAFETY_CATEGORIES,
    XSAFETY_CATEGORIES,
    XSAFETY_LANGUAGES,
    load_xsafety,
    xsafety_files,
)


def _natural_key(text: str) -> tuple[object, ...]:
    """Sort key under which `x/2` comes before `x/10`."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))



# (root, languages, option) -> records. The option is the part after `name:`.
Loader = Callable[[Path, Sequence[str] | None, str | None], list[PromptRecord]]


def _no_option(name: str, option: str | None) -> None:
    if option:
        raise ValueError(f"data set {name!r} takes no option (got {name}:{option})")


def _en_only(name: str, fn: Callable[..., list[PromptRecord]]) -> Loader:
    def load(root: Path, languages: Sequence[str] | None, option: str | None) -> list[PromptRecord]:
        _no_option(name, option)
        select_languages(languages, ("en",), name)
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
        select_languages(languages, ("en",), name)
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
        DatasetSpec("advbench", ADVBENCH.file, "harmful", ("en",),
                    "AdvBench harmful behaviours", _en_only("advbench", load_advbench)),
        DatasetSpec("harmbench", HARMBENCH.file, "harmful", ("en",),
                    "HarmBench text behaviours (val split)", _en_only("harmbench", load_harmbench)),
        DatasetSpec("jailbreakbench", JAILBREAKBENCH.file, "harmful", ("en",),
                    "JBB-Behaviors, harmful half", _en_only("jailbreakbench", load_jailbreakbench)),
        DatasetSpec("safe-responses", SAFE_RESPONSES.file, "harmful",
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


__all__ = [
    "DATASETS", "DEFAULT_XSAFETY_CATEGORIES", "ISO_639_1", "LABELS", "MGSM_LANGUAGES", "XCOPA_LANGUAGES",
    "TABLE_SOURCES", "XSAFETY_CATEGORIES", "XSAFETY_LANGUAGES", "TableSource", "DataFormatError", "DataNotFoundError", "DataWarning", "DatasetInfo",
    "DatasetSpec", "Loader", "dataset_path", "detect_format", "list_datasets", "load_advbench", "load_alpaca_seed",
    "load_figstep", "load_file", "load_harmbench", "load_jailbreakbench", "load_mgsm", "load_multijail",
    "load_prompts", "load_safe_responses", "load_strongreject", "load_table", "load_table_source", "load_xcopa", "load_xsafety",
    "load_xstest", "normalise_label", "normalise_language", "parse_list_literal", "read_csv_rows", "read_table",
    "read_text", "xsafety_files",
]
