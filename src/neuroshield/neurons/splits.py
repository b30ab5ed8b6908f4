"""Stable held-in / held-out splits of prompt sets, by prompt id.

Neurons are identified on the held-in half and validated / evaluated on the held-out half, so that no
stage is scored on the prompts its neurons were found with. The split is a function of the id (and a
seed) only: the same id lands on the same side in every language (parallel translations stay
together), in every run, for every stage, whatever else is in the list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from neuroshield.data.records import PromptRecord

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

__all__ = ["SPLITS", "held_out_score", "is_held_out", "split_by_id", "select_split", "limit_per_group"]
