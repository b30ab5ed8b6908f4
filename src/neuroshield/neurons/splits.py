"""Stable held-in / held-out splits of prompt sets, by prompt id.

Neurons are identified on the held-in half and validated / evaluated on the held-out half, so that no
stage is scored on the prompts its neurons were found with. The split is a function of the id (and a
seed) only: the same id lands on the same side in every language (parallel translations stay
together), in every run, for every stage, whatever else is in the list.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterable, Sequence

from neuroshield.data.records import PromptRecord

log = logging.getLogger(__name__)

SPLITS = ("held-in", "held-out", "all")


def held_out_score(record_id: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by (seed, id): sha256 of `"<seed>:<id>"`, first 8 bytes."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_held_out(record_id: str, held_out_fraction: float = 0.5, seed: int = 0) -> bool:
    return held_out_score(record_id, seed) < held_out_fraction


def split_by_id(
    records: Sequence[PromptRecord], held_out_fraction: float = 0.5, seed: int = 0
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(held_in, held_out): a record is held out when its id's stable hash is below the fraction, or, for a
    data set that fixes its own split (`record.meta["split"]`), where that says.

    The order of the input is kept on both sides. Expected share held out = `held_out_fraction`; the
    exact share varies with the ids (it is a hash, not a shuffle), which is what keeps it stable.
    """
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
    held_in: list[PromptRecord] = []
    held_out: list[PromptRecord] = []
    for r in records:
        fixed = r.meta.get("split")  # a data set with its own fixed split (the contrast set) keeps it
        out = fixed == "held-out" if fixed in ("held-in", "held-out") else is_held_out(r.id, held_out_fraction, seed)
        (held_out if out else held_in).append(r)
    return held_in, held_out


def select_split(
    records: Sequence[PromptRecord], split: str = "held-in", held_out_fraction: float = 0.5, seed: int = 0
) -> list[PromptRecord]:
    """`held-in`, `held-out` or `all` of `records` (see `split_by_id`)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    if split == "all":
        return list(records)
    held_in, held_out = split_by_id(records, held_out_fraction, seed)
    return held_in if split == "held-in" else held_out


def limit_per_group(records: Iterable[PromptRecord], limit: int | None, seed: int = 0) -> list[PromptRecord]:
    """Keep `limit` ids per (language, modality, label): the same ids in every language where possible.

    Ids present in every language of the same (modality, label) come first, then the rest; within
    each part ids are ranked by a stable hash of (seed, id), so the pick spreads over categories (a
    natural-order cut of XSafety would take its first category only) and parallel sets stay
    parallel. Deterministic; the input order is kept.
    """
    records = list(records)
    if limit is None:
        return records
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    ids: dict[tuple[str, str, str], set[str]] = {}
    for r in records:
        ids.setdefault(r.group, set()).add(r.id)
    common: dict[tuple[str, str], set[str]] = {}
    for (lang, modality, label), group_ids in ids.items():
        key = (modality, label)
        common[key] = set(group_ids) if key not in common else common[key] & group_ids
    keep: set[tuple[tuple[str, str, str], str]] = set()
    for group, group_ids in ids.items():
        shared = common[(group[1], group[2])]
        ranked = sorted(group_ids, key=lambda i: (i not in shared, held_out_score(i, seed + _LIMIT_SALT), i))
        keep.update((group, i) for i in ranked[:limit])
    return [r for r in records if (r.group, r.id) in keep]


_LIMIT_SALT = 104729  # decorrelates the pick from the held-in / held-out split (same hash otherwise)


# --------------------------------------------------------------------------------------------------
# The prompt picker: every stage, command and experiment picks its prompts here
# --------------------------------------------------------------------------------------------------


def pick_prompts(source: str, label: str | None, languages: Sequence[str] | None, split: str = "held-in",
                 limit: int | None = None, *, held_out_fraction: float = 0.5, seed: int = 0) -> list[PromptRecord]:
    """Prompts of `source` (a registered data set, `name:option`, or a file) with `label` (None: any), in those of
    `languages` the source has (None: all it has; a language it lacks is skipped), the `split` by prompt id
    (`select_split`), then `limit` ids per language (`limit_per_group`); `seed` drives both."""
    from neuroshield.data.loaders import DATASETS, load_prompts

    name = source.split(":", 1)[0]
    langs = None if languages is None else list(languages)
    if name in DATASETS:
        if langs is not None:
            have = set(DATASETS[name].languages)
            missing = [lang for lang in langs if lang not in have]
            if missing and len(missing) < len(langs):
                log.info("%s has no prompts in %s; skipped", source, ", ".join(missing))
            langs = [lang for lang in langs if lang in have]
            if not langs:
                log.warning("%s has none of the languages %s; skipped", source, ", ".join(languages or []))
                return []
        records = load_prompts(source, languages=langs, label=label)
    else:  # a file gives the languages it has
        records = load_prompts(source, label=label)
        if langs is not None:
            records = [r for r in records if r.language in set(langs)]
    if label is not None:
        records = [r for r in records if r.label == label]
    records = select_split(records, split, held_out_fraction, seed)
    return limit_per_group(records, limit, seed)


def parallel_pick(source: str, label: str | None, languages: Sequence[str], split: str = "held-in",
                  limit: int | None = None, *, held_out_fraction: float = 0.5, seed: int = 0) -> list[PromptRecord]:
    """Parallel prompts: `limit` ids that `source` has in every one of `languages` (the `split` by id), the same ids in
    each language, ranked as `limit_per_group` ranks them. Raises when the source lacks one of the languages; warns
    when fewer than `limit` ids are common to all of them."""
    records = pick_prompts(source, label, languages, split, None, held_out_fraction=held_out_fraction, seed=seed)
    ids: dict[str, set[str]] = {}
    for r in records:
        ids.setdefault(r.language, set()).add(r.id)
    missing = [lang for lang in languages if lang not in ids]
    if missing:
        raise ValueError(f"{source} has no {split} {label or ''} prompts in {', '.join(missing)}: parallel data needs "
                         "every training language")
    common = set.intersection(*(ids[lang] for lang in languages)) if languages else set()
    if limit is not None and len(common) < limit:
        log.warning("%s: only %d %s ids are in every one of %s (asked for %d)", source, len(common), split,
                    ", ".join(languages), limit)
    return limit_per_group([r for r in records if r.id in common], limit, seed)


def validation_pick(source: str, languages: Sequence[str] | None, limit: int | None, *,
                    held_out_fraction: float = 0.5, seed: int = 0) -> dict[str, list[PromptRecord]]:
    """The held-out harmful prompts validation intervenes on: `limit` per language (None: every language the
    source has), each language picked on its own (so each gets its own best-spread ids)."""
    if languages is None:
        languages = sorted({r.language for r in pick_prompts(source, "harmful", None, "held-out", None,
                                                             held_out_fraction=held_out_fraction, seed=seed)})
    return {lang: pick_prompts(source, "harmful", [lang], "held-out", limit, held_out_fraction=held_out_fraction,
                               seed=seed) for lang in languages}


def evaluation_pick(source: str, languages: Sequence[str] | None, limit: int | None, *, split: str = "held-out",
                    exclude_ids: Collection[str] = (), held_out_fraction: float = 0.5,
                    seed: int = 0) -> list[PromptRecord]:
    """Harmful prompts for evaluation: `limit` ids per language among the `split` (held-out) ids not in
    `exclude_ids` (validation's), so that no other stage uses them in any language."""
    pool = [r for r in pick_prompts(source, "harmful", languages, split, None,
                                    held_out_fraction=held_out_fraction, seed=seed) if r.id not in exclude_ids]
    return limit_per_group(pool, limit, seed)


__all__ = ["SPLITS", "held_out_score", "is_held_out", "split_by_id", "select_split", "limit_per_group",
           "pick_prompts", "parallel_pick", "validation_pick", "evaluation_pick"]
