"""Multilingual text resources: refusal templates, FigStep image instructions, parallel benign prompts.

All texts live in `neuroshield/resources/` and were written by the neuroshield authors (see the
`provenance` field of each file); they are not professional translations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from neuroshield.data.records import PromptRecord

# XSafety languages first, then the MultiJail-only ones (ISO 639-1).
SUPPORTED_LANGUAGES: tuple[str, ...] = (
    "en", "zh", "ar", "ru", "hi", "es", "fr", "de", "ja", "bn",
    "it", "vi", "ko", "th", "sw", "jv",
)  # fmt: skip

PARALLEL_BENIGN_SOURCE = "neuroshield-parallel-benign"
CONTRAST_SOURCE = "neuroshield-contrast"
CONTRAST_LANGUAGES: tuple[str, ...] = ("en", "zh", "ar", "ru", "es", "fr", "de", "ja", "bn", "hi")
# the contrast set's own split by topic pair, fixed in the file: train (identify, retain data, monitoring)
# and eval (evaluation only); PromptRecord.meta["split"] carries it as held-in / held-out
CONTRAST_SPLITS = {"train": "held-in", "eval": "held-out"}

_REFUSALS_FILE = "refusal_templates.json"
_INSTRUCTIONS_FILE = "image_instructions.json"
_BENIGN_FILE = "parallel_benign.jsonl"
_CONTRAST_FILE = "contrast_set.jsonl"


class UnsupportedLanguageError(KeyError):
    """A language code with no resources; the message lists the supported ones."""

    def __init__(self, language: str, what: str = "language") -> None:
        self.language = language
        self.message = (
            f"unsupported {what} {language!r}; supported languages: {', '.join(SUPPORTED_LANGUAGES)}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would show the repr of the message otherwise
        return self.message


def _read_text(name: str) -> str:
    return (resources.files("neuroshield") / "resources" / name).read_text(encoding="utf-8")


def _check_language(language: str) -> str:
    if language not in SUPPORTED_LANGUAGES:
        raise UnsupportedLanguageError(language)
    return language


# The resource files are small and never change at run time: parse once, keep immutable views.
@lru_cache(maxsize=None)
def _refusals() -> Mapping[str, tuple[str, ...]]:
    data = json.loads(_read_text(_REFUSALS_FILE))
    return MappingProxyType({lang: tuple(texts) for lang, texts in data["languages"].items()})


@lru_cache(maxsize=None)
def _instructions() -> Mapping[str, str]:
    data = json.loads(_read_text(_INSTRUCTIONS_FILE))
    return MappingProxyType(dict(data["languages"]))


@lru_cache(maxsize=None)
def _jsonl_items(name: str) -> tuple[Mapping[str, Any], ...]:
    items = []
    for line in _read_text(name).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("kind") == "header":  # first line: provenance and description
            continue
        items.append(MappingProxyType(row))
    return tuple(items)


def _benign_items() -> tuple[Mapping[str, Any], ...]:
    return _jsonl_items(_BENIGN_FILE)


def resource_provenance(name: str) -> str:
    """The `provenance` field of a resource file (`refusal_templates.json`, ... , `parallel_benign.jsonl`)."""
    text = _read_text(name)
    header = json.loads(text.splitlines()[0]) if name.endswith(".jsonl") else json.loads(text)
    return str(header["provenance"])


def refusal_templates(language: str) -> list[str]:
    """All refusal responses written for `language` (at least 6), in file order."""
    return list(_refusals()[_check_language(language)])


def stable_index(key: str, n: int) -> int:
    """A deterministic index in [0, n) for `key`: SHA-256 based, unlike `hash()` it is the same in every process."""
    if n <= 0:
        raise ValueError("n must be positive")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def refusal_for(prompt_id: str, language: str) -> str:
    """The refusal template for one prompt, chosen deterministically from its id.

    The choice depends on the id only, so parallel prompts (same id, other language) get the template
    with the same index in every language.
    """
    templates = _refusals()[_check_language(language)]
    return templates[stable_index(prompt_id, len(templates))]


def image_instruction(language: str) -> str:
    """The neutral FigStep-style instruction that goes with an image holding the (harmful) request."""
    return _instructions()[_check_language(language)]


def load_parallel_benign(languages: Iterable[str] | None = None) -> list[PromptRecord]:
    """The parallel benign set (48 prompts) as records, grouped by language, ids shared across languages.

    `languages=None` gives all of `SUPPORTED_LANGUAGES`; an unknown code raises `UnsupportedLanguageError`.
    """
    langs = list(SUPPORTED_LANGUAGES) if languages is None else [_check_language(x) for x in languages]
    records: list[PromptRecord] = []
    for lang in langs:
        for item in _benign_items():
            records.append(
                PromptRecord(
                    id=item["id"],
                    text=item["translations"][lang],
                    language=lang,
                    label="benign",
                    category=item["category"],
                    source=PARALLEL_BENIGN_SOURCE,
                )
            )
    return records


def load_contrast_set(languages: Iterable[str] | None = None, split: str | None = None,
                      label: str = "benign") -> list[PromptRecord]:
    """The contrast set: safe requests that sound dangerous ("How do I kill a frozen Python process?"),
    written by the project in `CONTRAST_LANGUAGES`, each paired with an English harmful request on the same
    topic. `label="benign"`: the safe requests (English records carry a short reference answer);
    `label="harmful"`: the English paired requests (id `<id>-harmful`). `split`: `train` or `eval` (the
    file's fixed split by topic pair; None: both). `meta["split"]` holds held-in (train) / held-out (eval).
    """
    if split not in (None, *CONTRAST_SPLITS):
        raise ValueError(f"contrast split {split!r}: give train or eval")
    if label not in ("benign", "harmful"):
        raise ValueError(f"contrast label {label!r}: give benign or harmful")
    langs = list(CONTRAST_LANGUAGES) if languages is None else list(languages)
    unknown = [lang for lang in langs if lang not in CONTRAST_LANGUAGES]
    if unknown:
        raise UnsupportedLanguageError(unknown[0], "contrast-set language")
    if label == "harmful":
        langs = [lang for lang in langs if lang == "en"]
    records: list[PromptRecord] = []
    for lang in langs:
        for item in _jsonl_items(_CONTRAST_FILE):
            if split is not None and item["split"] != split:
                continue
            meta = {"split": CONTRAST_SPLITS[item["split"]], "pair": item["id"]}
            if label == "harmful":
                records.append(PromptRecord(id=f"{item['id']}-harmful", text=item["harmful"], language=lang,
                                            label="harmful", category=item["category"], source=CONTRAST_SOURCE,
                                            meta=meta))
            else:
                records.append(PromptRecord(id=item["id"], text=item["translations"][lang], language=lang,
                                            label="benign", category=item["category"], source=CONTRAST_SOURCE,
                                            reference=item["reference"] if lang == "en" else None, meta=meta))
    return records

