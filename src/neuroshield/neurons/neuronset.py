"""A set of neurons: unit indices per site, their scores, and where they came from.

File format: `<name>.safetensors` holds one int64 tensor of sorted unit indices per site key
(`"<layer>.<kind>"`, e.g. `"12.ffn"`) and, when known, a float32 `scores/<site key>` tensor aligned with
it; `<name>.json` holds the metadata (model id, config hash, method, rho, sites, groups, data hashes,
counts of neurons and owned parameters, and the sha256 of the .safetensors file, checked on load). Both
are written to temporary names and renamed, the .json last. `sets.json` in a folder of sets (written
last by identify) names the sets of the run that wrote it; `run_set_names` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from neuroshield.io import ArtifactError, atomic_path, file_digest, read_json, write_json
from neuroshield.models.loading import LoadedModel
from neuroshield.models.sites import Site, parse_site_key, resolve_sites, site_key

FORMAT_VERSION = 1
SETS_MANIFEST = "sets.json"


class NeuronSetMismatchError(ValueError):
    pass


@dataclass
class NeuronSet:
    units: dict[str, torch.Tensor]  # site key -> sorted unique int64 unit indices
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # site key -> float scores aligned with units
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean: dict[str, torch.Tensor] = {}
        for key in sorted(self.units, key=_key_order):
            parse_site_key(key)
            idx = torch.as_tensor(self.units[key], dtype=torch.long).flatten()
            if idx.numel() == 0:
                continue
            if key in self.scores:
                sc = torch.as_tensor(self.scores[key], dtype=torch.float32).flatten()
                order = torch.argsort(idx, stable=True)
                idx, sc = idx[order], sc[order]
                self.scores[key] = sc
            if idx.numel() > 1 and bool((idx[1:] <= idx[:-1]).any()):
                idx = torch.unique(idx, sorted=True)
                self.scores.pop(key, None)  # duplicates make aligned scores ambiguous
            clean[key] = idx
        self.units = clean
        self.scores = {k: v for k, v in self.scores.items() if k in clean}

    # --- sizes -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(int(v.numel()) for v in self.units.values())

    def count_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, idx in self.units.items():
            kind = parse_site_key(key)[1]
            out[kind] = out.get(kind, 0) + int(idx.numel())
        return out

    def count_by_layer(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for key, idx in self.units.items():
            layer = parse_site_key(key)[0]
            out[layer] = out.get(layer, 0) + int(idx.numel())
        return dict(sorted(out.items()))

    def site_kinds(self) -> list[str]:
        return sorted({parse_site_key(k)[1] for k in self.units})

    def owned_parameters(self, loaded: LoadedModel) -> int:
        """Parameters that belong to these neurons (what neuron-only training may change)."""
        sites = {s.key: s for s in resolve_sites(loaded.model, loaded.adapter, tuple(self.site_kinds()))}
        return sum(sites[k].params_per_unit * int(v.numel()) for k, v in self.units.items())

    def as_mask(self, site: Site) -> torch.Tensor:
        mask = torch.zeros(site.width, dtype=torch.bool)
        if site.key in self.units:
            mask[self.units[site.key]] = True
        return mask

    # --- algebra -----------------------------------------------------------------------------
    def _combine(self, other: NeuronSet, op: str) -> NeuronSet:
        keys = set(self.units) | set(other.units)
        units: dict[str, torch.Tensor] = {}
        scores: dict[str, torch.Tensor] = {}
        for key in keys:
            a = set(self.units.get(key, torch.empty(0, dtype=torch.long)).tolist())
            b = set(other.units.get(key, torch.empty(0, dtype=torch.long)).tolist())
            chosen = sorted(a | b if op == "union" else a & b if op == "intersection" else a - b)
            if not chosen:
                continue
            units[key] = torch.tensor(chosen, dtype=torch.long)
            # keep the larger known score of a unit (scores of either side, when both have them)
            sa = _score_map(self, key)
            sb = _score_map(other, key)
            if sa or sb:
                scores[key] = torch.tensor([max(sa.get(u, float("-inf")), sb.get(u, float("-inf"))) for u in chosen])
        meta = {"operation": op, "operands": [self.name, other.name], **_shared_identity(self, other)}
        return NeuronSet(units, scores, meta)

    def union(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, "union")

    def intersection(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, "intersection")

    def difference(self, other: NeuronSet) -> NeuronSet:
        return self._combine(other, "difference")

    def as_tuples(self) -> set[tuple[str, int]]:
        return {(k, int(u)) for k, v in self.units.items() for u in v.tolist()}

    @property
    def name(self) -> str:
        return str(self.meta.get("name", "unnamed"))

    # --- identity checks ---------------------------------------------------------------------
    def check_model(self, loaded: LoadedModel) -> None:
        want = self.meta.get("config_hash")
        if want and want != loaded.config_hash:
            raise NeuronSetMismatchError(
                f"neuron set {self.name!r} was made on model {self.meta.get('model_id')!r} "
                f"(config hash {want}); the loaded model {loaded.model_id!r} has config hash {loaded.config_hash}. "
                "Identify neurons on this model instead."
            )
        sites = {s.key: s for s in resolve_sites(loaded.model, loaded.adapter, tuple(self.site_kinds()))}
        for key, idx in self.units.items():
            if key not in sites:
                raise NeuronSetMismatchError(f"neuron set {self.name!r}: site {key} does not exist in this model")
            if int(idx.max()) >= sites[key].width:
                raise NeuronSetMismatchError(f"neuron set {self.name!r}: unit {int(idx.max())} out of range at {key}")

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, loaded: LoadedModel | None = None) -> Path:
        """Write `<path>.safetensors` and `<path>.json` atomically; returns the .safetensors path."""
        base = Path(path)
        if base.suffix in (".safetensors", ".json"):
            base = base.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.units.items()}
        tensors.update({f"scores/{k}": v.contiguous().float() for k, v in self.scores.items()})
        meta = dict(self.meta)
        meta.update({"format": FORMAT_VERSION, "neurons": len(self), "by_kind": self.count_by_kind(),
                     "by_layer": {str(k): v for k, v in self.count_by_layer().items()}})
        if loaded is not None:
            meta.setdefault("model_id", loaded.model_id)
            meta.setdefault("config_hash", loaded.config_hash)
            meta["owned_parameters"] = self.owned_parameters(loaded)
        st_path, js_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        js_path.unlink(missing_ok=True)  # the pair is complete again only when the .json (with the digest) is back
        with atomic_path(st_path) as tmp:
            save_file(tensors if tensors else {"_empty": torch.empty(0, dtype=torch.long)}, str(tmp))
        meta["safetensors_sha256"] = file_digest(st_path)
        write_json(js_path, meta)
        self.meta = meta
        return st_path

    @classmethod
    def load(cls, path: str | Path, loaded: LoadedModel | None = None) -> NeuronSet:
        base = Path(path)
        if base.suffix in (".safetensors", ".json"):
            base = base.with_suffix("")
        st_path, js_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        for p in (st_path, js_path):
            if not p.is_file():
                raise FileNotFoundError(f"neuron set file missing: {p} (a set is a .safetensors + .json pair)")
        meta = read_json(js_path, "neuron set metadata")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{js_path}: neuron set format {got!r}, expected {FORMAT_VERSION}")
        want = meta.get("safetensors_sha256")
        if want and file_digest(st_path) != want:
            raise ArtifactError(f"{st_path}: its content differs from the digest in {js_path.name} (damaged, or "
                                "replaced by another set): run `neuroshield identify` again")
        try:
            tensors = load_file(str(st_path))
        except Exception as err:
            raise ArtifactError(f"{st_path}: cannot read the neuron set ({err}); run `neuroshield identify` "
                                "again") from None
        units = {k: v for k, v in tensors.items() if not k.startswith("scores/") and k != "_empty"}
        scores = {k[len("scores/"):]: v for k, v in tensors.items() if k.startswith("scores/")}
        ns = cls(units, scores, meta)
        if loaded is not None:
            ns.check_model(loaded)
        return ns


def write_sets_manifest(folder: str | Path, names: list[str], extra: dict[str, Any] | None = None) -> Path:
    """`folder/sets.json`: which sets of `folder` belong to the run that wrote it (write it after the sets)."""
    return write_json(Path(folder) / SETS_MANIFEST, {**(extra or {}), "sets": sorted(names)})


def run_set_names(folder: str | Path) -> list[str] | None:
    """The set names `folder/sets.json` lists, or None when the folder has none (sets saved one by one)."""
    path = Path(folder) / SETS_MANIFEST
    if not path.is_file():
        return None
    data = read_json(path, "list of the run's neuron sets")
    names = data.get("sets") if isinstance(data, dict) else None
    if not isinstance(names, list):
        raise ArtifactError(f"{path}: no 'sets' list; run `neuroshield identify` again")
    return [str(n) for n in names]


def _key_order(key: str) -> tuple[int, str]:
    layer, kind = parse_site_key(key)
    return layer, kind


def _score_map(ns: NeuronSet, key: str) -> dict[int, float]:
    if key not in ns.scores:
        return {}
    return dict(zip(ns.units[key].tolist(), ns.scores[key].tolist()))


def _shared_identity(a: NeuronSet, b: NeuronSet) -> dict[str, Any]:
    out = {}
    for field_name in ("model_id", "config_hash"):
        if a.meta.get(field_name) and b.meta.get(field_name) and a.meta[field_name] != b.meta[field_name]:
            raise NeuronSetMismatchError(
                f"cannot combine sets from different models: {a.meta[field_name]} vs {b.meta[field_name]}"
            )
        if a.meta.get(field_name) or b.meta.get(field_name):
            out[field_name] = a.meta.get(field_name) or b.meta.get(field_name)
    return out


def random_like(ns: NeuronSet, loaded: LoadedModel, seed: int) -> NeuronSet:
    """A control set with the same number of units at every (layer, site), drawn uniformly, seeded."""
    sites = {s.key: s for s in resolve_sites(loaded.model, loaded.adapter, tuple(ns.site_kinds()))}
    gen = torch.Generator().manual_seed(seed)
    units = {}
    for key, idx in ns.units.items():
        units[key] = torch.randperm(sites[key].width, generator=gen)[: idx.numel()].sort().values
    meta = {"name": f"random-like-{ns.name}-seed{seed}", "method": "random", "seed": seed, "control_of": ns.name,
            "model_id": loaded.model_id, "config_hash": loaded.config_hash}
    return NeuronSet(units, {}, meta)


def random_flat(ns: NeuronSet, loaded: LoadedModel, seed: int) -> NeuronSet:
    """A control set with the same number of units of each site kind as `ns`, spread evenly over every layer (counts
    differ by at most one; the remainder goes to the first layers), drawn uniformly within a layer, seeded: `ns`'s
    size without its layer profile (`random_like` keeps both)."""
    gen = torch.Generator().manual_seed(seed)
    units: dict[str, torch.Tensor] = {}
    for kind, total in ns.count_by_kind().items():
        sites = resolve_sites(loaded.model, loaded.adapter, (kind,))
        share, extra = divmod(total, len(sites))
        for i, site in enumerate(sites):
            k = min(site.width, share + (1 if i < extra else 0))
            if k:
                units[site.key] = torch.randperm(site.width, generator=gen)[:k].sort().values
    meta = {"name": f"random-flat-{ns.name}-seed{seed}", "method": "random", "seed": seed, "control_of": ns.name,
            "profile": "flat", "model_id": loaded.model_id, "config_hash": loaded.config_hash}
    return NeuronSet(units, {}, meta)


def from_masks(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor] | None = None,
               meta: dict[str, Any] | None = None) -> NeuronSet:
    """Build a set from boolean masks per site key (and optional full-width score vectors)."""
    units, sc = {}, {}
    for key, mask in masks.items():
        idx = torch.nonzero(mask, as_tuple=False).flatten()
        units[key] = idx
        if scores is not None and key in scores:
            sc[key] = scores[key][idx].float()
    return NeuronSet(units, sc, dict(meta or {}))


__all__ = ["NeuronSet", "NeuronSetMismatchError", "random_like", "random_flat", "from_masks", "site_key",
           "SETS_MANIFEST", "write_sets_manifest", "run_set_names"]
