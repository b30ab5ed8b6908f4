"""The activation statistics of stage 1 and their file: float64 running sums per (site, group) over the counted token
positions (see `EncodedPrompt.position_mask`):

    count      number of counted tokens (the same for every site, kept once per group)
    sum        Σ a          sum_abs  Σ |a|          sum_sq  Σ a²          n_pos  #(a > 0)

and, for the attention sites `attn_q`, `attn_k`, `attn_v`, an `impact` sum used by the `plnd` score
(`neuroshield.neurons.stats` says how they are collected). Saved as safetensors plus JSON; statistics of
disjoint groups merge, and each group carries the hash of its prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from neuroshield.data.records import PromptRecord, group_name
from neuroshield.io import atomic_path, file_digest, image_digest, read_json, write_json
from neuroshield.models.loading import LoadedModel

STATS_FORMAT = 1
IMPACT_KINDS = ("attn_q", "attn_k", "attn_v")
SUMS = ("sum", "sum_abs", "sum_sq", "n_pos")
QK_IMPACT_MODES = ("exact", "pair")
TENSOR_FILE = "stats.safetensors"
META_FILE = "stats.json"


class StatsMismatchError(ValueError):
    pass


def _norm_group(group: str | tuple[str, str, str]) -> str:
    if isinstance(group, tuple):
        return group_name(*group)
    return group


def data_hash(records: Iterable[PromptRecord]) -> str:
    """sha256 of the sorted (id, text) pairs of `records` (one line `id<TAB>text` each; image prompts add
    `<TAB>` and the digest of the image's bytes)."""
    h = hashlib.sha256()
    for rid, text, image in sorted((r.id, r.text, getattr(r, "image", None) or "") for r in records):
        h.update(rid.encode())
        h.update(b"\t")
        h.update(text.encode())
        if image:
            h.update(b"\t" + image_digest(image).encode())
        h.update(b"\n")
    return h.hexdigest()


def group_hashes(records: Iterable[PromptRecord]) -> dict[str, str]:
    """`data_hash` per group name (`en/text/harmful`, ...)."""
    by_group: dict[str, list[PromptRecord]] = {}
    for r in records:
        by_group.setdefault(group_name(*r.group), []).append(r)
    return {g: data_hash(rs) for g, rs in sorted(by_group.items())}


# --------------------------------------------------------------------------------------------------
# The statistics object
# --------------------------------------------------------------------------------------------------


@dataclass
class ActivationStats:
    """Running sums per (site, group). Tensors: `count` [G]; `<site key>/<sum name>` [G, width].

    `meta` holds: model_id, config_hash, sites (keys, ordered), widths, positions, groups (names,
    aligned with axis 0), prompts (per group), data_hashes (per group), max_length, impact (bool),
    attention (implementation used for the pass).
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    # --- identity -----------------------------------------------------------------------------
    def groups(self) -> list[str]:
        return list(self.meta["groups"])

    def sites(self) -> list[str]:
        return list(self.meta["sites"])

    def width(self, site: str) -> int:
        return int(self.meta["widths"][site])

    @property
    def has_impact(self) -> bool:
        return bool(self.meta.get("impact"))

    def _index(self, group: str | tuple[str, str, str]) -> int:
        name = _norm_group(group)
        groups = self.meta["groups"]
        if name not in groups:
            raise KeyError(f"group {name!r} is not in these statistics; groups: {', '.join(groups) or 'none'}")
        return groups.index(name)

    def _site(self, site: str) -> str:
        if site not in self.meta["widths"]:
            raise KeyError(f"site {site!r} is not in these statistics; sites: {', '.join(self.sites())}")
        return site

    # --- per-group statistics -------------------------------------------------------------------
    def count(self, group: str | tuple[str, str, str]) -> int:
        """Counted tokens of the group."""
        return int(self.tensors["count"][self._index(group)].item())

    def prompts(self, group: str | tuple[str, str, str]) -> int:
        return int(self.meta["prompts"][_norm_group(group)])

    def data_hash(self, group: str | tuple[str, str, str]) -> str:
        return str(self.meta["data_hashes"][_norm_group(group)])

    def _per_site(self, group: str | tuple[str, str, str], site: str | None, fn: Any) -> Any:
        g = self._index(group)
        n = self.tensors["count"][g]
        if site is not None:
            return fn(self._site(site), g, n)
        return {s: fn(s, g, n) for s in self.sites()}

    def sum(self, name: str, group: str | tuple[str, str, str], site: str) -> torch.Tensor:
        """A raw float64 sum (`sum`, `sum_abs`, `sum_sq`, `n_pos`, `impact`) of a site for a group."""
        key = f"{self._site(site)}/{name}"
        if key not in self.tensors:
            raise KeyError(f"no {name!r} sums for site {site}; collect with impact=True for attention impacts")
        return self.tensors[key][self._index(group)]

    def mean(self, group: str | tuple[str, str, str], site: str | None = None) -> Any:
        """Mean activation per unit (float64), per site key, or for one `site`."""
        return self._per_site(group, site, lambda s, g, n: self.tensors[f"{s}/sum"][g] / n.clamp(min=1))

    def mean_abs(self, group: str | tuple[str, str, str], site: str | None = None) -> Any:
        return self._per_site(group, site, lambda s, g, n: self.tensors[f"{s}/sum_abs"][g] / n.clamp(min=1))

    def var(self, group: str | tuple[str, str, str], site: str | None = None) -> Any:
        """Unbiased variance over counted tokens, (Σa² − n·mean²)/(n − 1), clamped at 0."""

        def fn(s: str, g: int, n: torch.Tensor) -> torch.Tensor:
            m = self.tensors[f"{s}/sum"][g] / n.clamp(min=1)
            return ((self.tensors[f"{s}/sum_sq"][g] - n * m * m) / (n - 1).clamp(min=1)).clamp(min=0)

        return self._per_site(group, site, fn)

    def frac_positive(self, group: str | tuple[str, str, str], site: str | None = None) -> Any:
        return self._per_site(group, site, lambda s, g, n: self.tensors[f"{s}/n_pos"][g] / n.clamp(min=1))

    def mean_impact(self, group: str | tuple[str, str, str], site: str | None = None) -> Any:
        """Mean of the per-token attention impact sums (attn_q/k/v sites only; see module docs)."""

        def fn(s: str, g: int, n: torch.Tensor) -> torch.Tensor:
            key = f"{s}/impact"
            if key not in self.tensors:
                raise KeyError(f"site {s} has no impact sums (only {', '.join(IMPACT_KINDS)} sites have them, "
                               "collected with impact=True)")
            return self.tensors[key][g] / n.clamp(min=1)

        if site is None:
            return {s: fn(s, self._index(group), self.tensors["count"][self._index(group)])
                    for s in self.sites() if f"{s}/impact" in self.tensors}
        return self._per_site(group, site, fn)

    def state_numel(self) -> int:
        """Total number of elements held (independent of the number of prompts)."""
        return sum(int(t.numel()) for t in self.tensors.values())

    # --- combining -------------------------------------------------------------------------------
    def subset(self, groups: Sequence[str]) -> ActivationStats:
        """These statistics restricted to `groups` (in the given order)."""
        idx = [self._index(g) for g in groups]
        index = torch.tensor(idx, dtype=torch.long)
        tensors = {k: v.index_select(0, index.to(v.device)).clone() for k, v in self.tensors.items()}
        names = [_norm_group(g) for g in groups]
        meta = dict(self.meta)
        meta["groups"] = names
        meta["prompts"] = {g: self.meta["prompts"][g] for g in names}
        meta["data_hashes"] = {g: self.meta["data_hashes"][g] for g in names}
        return ActivationStats(tensors, meta)

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Sums of both; groups in only one side are copied, groups in both are added.

        Both must come from the same model, sites, positions, max_length and impact setting. A group
        present on both sides is assumed to be made of different prompts (shards); its data hash becomes
        `merged:` + sha256 of the two hashes, sorted.
        """
        for key in ("config_hash", "sites", "positions", "max_length", "impact"):
            if self.meta.get(key) != other.meta.get(key):
                raise StatsMismatchError(
                    f"cannot merge statistics with different {key}: {self.meta.get(key)!r} vs {other.meta.get(key)!r}"
                )
        groups = self.groups() + [g for g in other.groups() if g not in self.meta["groups"]]
        tensors: dict[str, torch.Tensor] = {}
        for key, mine in self.tensors.items():
            theirs = other.tensors[key].to(mine.device)
            out = torch.zeros((len(groups), *mine.shape[1:]), dtype=torch.float64, device=mine.device)
            out[: mine.shape[0]] = mine
            for j, g in enumerate(other.groups()):
                out[groups.index(g)] += theirs[j]
            tensors[key] = out
        meta = dict(self.meta)
        meta["groups"] = groups
        prompts, hashes = dict(self.meta["prompts"]), dict(self.meta["data_hashes"])
        for g in other.groups():
            if g in prompts:
                prompts[g] += other.meta["prompts"][g]
                pair = sorted([hashes[g], other.meta["data_hashes"][g]])
                hashes[g] = "merged:" + hashlib.sha256("".join(pair).encode()).hexdigest()
            else:
                prompts[g] = other.meta["prompts"][g]
                hashes[g] = other.meta["data_hashes"][g]
        meta["prompts"], meta["data_hashes"] = prompts, hashes
        return ActivationStats(tensors, meta)

    # --- files -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write `stats.safetensors` + `stats.json` into `directory`, each via a temporary name, the JSON (with the
        tensor file's size and sha256) last."""
        d = Path(directory)
        st, js = d / TENSOR_FILE, d / META_FILE
        js.unlink(missing_ok=True)  # the folder is complete again only when the JSON is back
        with atomic_path(st) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}, str(tmp))
        meta = dict(self.meta, format=STATS_FORMAT, tensor_bytes=st.stat().st_size, tensor_sha256=file_digest(st))
        write_json(js, meta)
        self.meta = meta
        return d

    @classmethod
    def load(cls, directory: str | Path) -> ActivationStats:
        d = Path(directory)
        st, js = d / TENSOR_FILE, d / META_FILE
        for p in (st, js):
            if not p.is_file():
                raise FileNotFoundError(
                    f"statistics file missing: {p} (a stats folder holds {TENSOR_FILE} + {META_FILE})")
        meta = read_json(js, "statistics metadata")
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"{js}: statistics format {meta.get('format')!r}, expected {STATS_FORMAT}")
        if meta.get("tensor_bytes") is not None and st.stat().st_size != meta["tensor_bytes"]:
            raise ValueError(f"{st} does not match {js} (size differs): delete the folder and collect again")
        if meta.get("tensor_sha256") and file_digest(st) != meta["tensor_sha256"]:
            raise ValueError(f"{st} does not match {js} (content differs from its digest): delete the folder and "
                             "collect again")
        return cls(dict(load_file(str(st))), meta)

    def check_model(self, loaded: LoadedModel) -> None:
        if self.meta.get("config_hash") != loaded.config_hash:
            raise StatsMismatchError(
                f"statistics were collected on {self.meta.get('model_id')!r} (config hash "
                f"{self.meta.get('config_hash')}); the loaded model {loaded.model_id!r} has {loaded.config_hash}"
            )
