"""Stage 3: neuron selection, shared sets, set combination and parameter budgets.

- `select_units`: per site (layer, kind), the top-k units under the harmful group's score minus the
  top-k under the benign group's score (importance methods), or the top-k by |contrast| (contrast
  methods), with k = `units_per_site(width, rho, top_k)`. Ties are broken by a permutation seeded by
  (seed, site key), so the result is a function of the scores and the seed only.
- `monolingual_sets`: MS(lang) = that selection for the (lang, modality) groups.
- `shared_sets`: SS(lang) = MS(HR) ∩ MS(lang). With several high-resource languages MS(HR) is the
  union of their MS sets (a neuron counts as "high-resource safety" if any HR language selects it);
  HR languages themselves get no SS set (it would be their MS set).
- `combine`: union / intersection of several sets.
- `trim_to_budget`: keep the highest-scoring neurons whose owned parameters fit in a fraction of all
  parameters (default 0.03 %, Precise Shield).

Every set carries its provenance in `meta` (model id, config hash, method, rho, sites, positions,
groups, data hashes, counts, owned parameters).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from neuroshield.data.records import group_name
from neuroshield.models.loading import LoadedModel
from neuroshield.models.sites import count_parameters, parse_site_key, resolve_sites
from neuroshield.neurons.neuronset import NeuronSet
from neuroshield.neurons.scores import CONTRAST_METHODS, check_method, score
from neuroshield.neurons.splits import split_by_id  # noqa: F401  (re-exported: the split every stage uses)
from neuroshield.neurons.stats import ActivationStats


def units_per_site(width: int, rho: float | None = 0.03, top_k: int | None = None) -> int:
    """k for one site: `top_k` if given (capped at the width), else max(1, round(rho · width))."""
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        return min(int(top_k), width)
    if rho is None or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if rho == 0:
        return 0
    return min(width, max(1, int(math.floor(rho * width + 0.5))))


def _site_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") & ((1 << 63) - 1)


def ranked_units(scores: torch.Tensor, key: str, seed: int = 0) -> torch.Tensor:
    """All unit indices of a site, best score first; ties in a seeded order; NaN counts as lowest."""
    s = torch.nan_to_num(scores.detach().to(torch.float64).cpu(), nan=-math.inf)
    gen = torch.Generator().manual_seed(_site_seed(seed, key))
    perm = torch.randperm(s.numel(), generator=gen)
    order = torch.argsort(s[perm], descending=True, stable=True)
    return perm[order]


def top_units(scores: torch.Tensor, k: int, key: str, seed: int = 0) -> torch.Tensor:
    """The k best units of a site (see `ranked_units`)."""
    return ranked_units(scores, key, seed)[:k]


def select_units(
    harmful: Mapping[str, torch.Tensor],
    benign: Mapping[str, torch.Tensor] | None = None,
    *,
    rho: float | None = 0.03,
    top_k: int | None = None,
    seed: int = 0,
    absolute: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(units, scores) per site key: top-k(harmful) minus top-k(benign), or top-k of |harmful| with
    `absolute` and no benign scores (contrast methods). Units sorted ascending; scores aligned."""
    units: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}
    for key in sorted(harmful, key=lambda k: parse_site_key(k)):
        s = harmful[key].detach().to(torch.float64).cpu()
        k = units_per_site(s.numel(), rho, top_k)
        chosen = top_units(s.abs() if absolute else s, k, key, seed)
        if benign is not None:
            if key not in benign:
                raise KeyError(f"benign scores lack site {key}")
            drop = top_units(benign[key], k, key, seed)
            keep = ~torch.isin(chosen, drop)
            chosen = chosen[keep]
        chosen = chosen.sort().values
        units[key] = chosen
        scores[key] = s[chosen].float()
    return units, scores


def _site_widths(stats: ActivationStats) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in stats.sites():
        out.setdefault(parse_site_key(key)[1], stats.width(key))
    return out


def _provenance(stats: ActivationStats, loaded: LoadedModel | None, groups: Sequence[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "model_id": loaded.model_id if loaded is not None else stats.meta.get("model_id"),
        "config_hash": loaded.config_hash if loaded is not None else stats.meta.get("config_hash"),
        "sites": list(stats.meta.get("site_kinds", [])),
        "site_widths": _site_widths(stats),
        "layers": len({parse_site_key(k)[0] for k in stats.sites()}),
        "positions": stats.meta.get("positions"),
        "max_length": stats.meta.get("max_length"),
        "data_hashes": {g: stats.data_hash(g) for g in groups},
        "counts": {g: {"prompts": stats.prompts(g), "tokens": stats.count(g)} for g in groups},
    }
    if stats.meta.get("qk_impact"):
        meta["qk_impact"] = stats.meta["qk_impact"]
    return meta


def _finish(ns: NeuronSet, loaded: LoadedModel | None) -> NeuronSet:
    if loaded is not None:
        ns.meta["owned_parameters"] = ns.owned_parameters(loaded)
        ns.meta["total_parameters"] = count_parameters(loaded.model)
    ns.meta["neurons"] = len(ns)
    return ns


def language_set(
    stats: ActivationStats,
    loaded: LoadedModel | None,
    method: str,
    language: str,
    *,
    modality: str = "text",
    rho: float | None = 0.03,
    top_k: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> NeuronSet:
    """The selection for one (language, modality): MS(lang) for text.

    Benign baseline: the (language, modality) benign group; for `image` without image benign prompts,
    the (language, text) benign group (recorded in `meta["groups"]`).
    """
    check_method(method)
    harm = group_name(language, modality, "harmful")
    benign = group_name(language, modality, "benign")
    groups = stats.groups()
    if harm not in groups:
        raise ValueError(
            f"no harmful prompts for {language}/{modality} in the statistics (groups: {', '.join(groups)})")
    if benign not in groups and modality != "text" and group_name(language, "text", "benign") in groups:
        benign = group_name(language, "text", "benign")
    if benign not in groups:
        raise ValueError(
            f"no benign prompts for {language}/{modality} in the statistics: the selection subtracts the benign "
            f"top-ρ; add benign prompts in {language} (groups: {', '.join(groups)})"
        )
    empty = [g for g in (harm, benign) if stats.count(g) == 0]
    if empty:
        raise ValueError(f"groups {', '.join(empty)} have no counted tokens "
                         f"(positions={stats.meta.get('positions')!r}); choose positions these prompts have")
    if method in CONTRAST_METHODS:
        units, scores = select_units(score(stats, loaded, method, harm, benign), None, rho=rho, top_k=top_k,
                                     seed=seed, absolute=True)
    else:
        units, scores = select_units(score(stats, loaded, method, harm), score(stats, loaded, method, benign),
                                     rho=rho, top_k=top_k, seed=seed)
    suffix = language if modality == "text" else f"{language}_{modality}"
    meta = {
        "name": name or f"ms_{suffix}",
        "kind": "monolingual",
        "language": language,
        "modality": modality,
        "method": method,
        "rho": None if top_k is not None else rho,
        "top_k": top_k,
        "seed": seed,
        "groups": {"harmful": harm, "benign": benign},
        **_provenance(stats, loaded, [harm, benign]),
    }
    return _finish(NeuronSet(units, scores, meta), loaded)


def monolingual_sets(
    stats: ActivationStats,
    loaded: LoadedModel | None,
    method: str = "plnd",
    *,
    languages: Sequence[str] | None = None,
    modality: str = "text",
    rho: float | None = 0.03,
    top_k: int | None = None,
    seed: int = 0,
) -> dict[str, NeuronSet]:
    """MS(lang) for each language (default: every language with harmful prompts of `modality`)."""
    if languages is None:
        languages = sorted({g.split("/")[0] for g in stats.groups() if g.endswith(f"/{modality}/harmful")})
    return {lang: language_set(stats, loaded, method, lang, modality=modality, rho=rho, top_k=top_k, seed=seed)
            for lang in languages}


def shared_sets(
    ms: Mapping[str, NeuronSet], high_resource: Sequence[str] = ("en",), loaded: LoadedModel | None = None
) -> dict[str, NeuronSet]:
    """SS(lang) = MS(HR) ∩ MS(lang) for every language not in `high_resource`.

    Several HR languages: MS(HR) = the union of their MS sets. Scores of a shared neuron: the larger
    of its two scores (`NeuronSet.intersection`).
    """
    missing = [h for h in high_resource if h not in ms]
    if missing:
        raise ValueError(
            f"high-resource language(s) {', '.join(missing)} have no MS set; languages: {', '.join(ms)}"
        )
    if not high_resource:
        raise ValueError("high_resource must name at least one language")
    hr = combine([ms[h] for h in high_resource], "union")
    out: dict[str, NeuronSet] = {}
    for lang, s in ms.items():
        if lang in high_resource:
            continue
        ss = hr.intersection(s)
        meta = {k: v for k, v in s.meta.items() if k not in ("name", "kind", "neurons", "owned_parameters", "by_kind",
                                                            "by_layer", "format", "total_parameters")}
        meta["data_hashes"] = {**_merged(ms, high_resource, "data_hashes"), **s.meta.get("data_hashes", {})}
        meta["counts"] = {**_merged(ms, high_resource, "counts"), **s.meta.get("counts", {})}
        suffix = s.meta.get("name", f"ms_{lang}")[3:] if str(s.meta.get("name", "")).startswith("ms_") else lang
        meta.update({"name": f"ss_{suffix}", "kind": "shared", "high_resource": list(high_resource),
                     "operands": [hr.name, s.name], "operation": "intersection", "neurons": len(ss)})
        ss.meta = meta
        out[lang] = _finish(ss, loaded)
    return out


def _merged(ms: Mapping[str, NeuronSet], langs: Sequence[str], field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lang in langs:
        out.update(ms[lang].meta.get(field, {}))
    return out


def combine(sets: Sequence[NeuronSet], how: str = "union", name: str | None = None) -> NeuronSet:
    """Union or intersection of `sets` (same model; checked). Meta keeps what all operands share."""
    if how not in ("union", "intersection"):
        raise ValueError(f"how={how!r}: choose union or intersection")
    if not sets:
        raise ValueError("combine() needs at least one set")
    out = NeuronSet(dict(sets[0].units), dict(sets[0].scores), dict(sets[0].meta))  # never alias an operand
    for s in sets[1:]:
        out = out.union(s) if how == "union" else out.intersection(s)
    shared = {k: v for k, v in sets[0].meta.items()
              if all(s.meta.get(k) == v for s in sets[1:])
              and k not in ("name", "neurons", "owned_parameters", "by_kind", "by_layer", "format")}
    data_hashes: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for s in sets:
        data_hashes.update(s.meta.get("data_hashes", {}))
        counts.update(s.meta.get("counts", {}))
    meta = {**shared, "name": name or f"{how}({','.join(s.name for s in sets)})", "operation": how,
            "operands": [s.name for s in sets], "data_hashes": data_hashes, "counts": counts, "neurons": len(out)}
    for field in ("model_id", "config_hash"):
        if field in out.meta:
            meta[field] = out.meta[field]
    out.meta = meta
    return out


TRIM_SPREADS = ("score", "layer")


def _layer_quota(ns: NeuronSet, sites: dict[str, Any], budget: int) -> dict[str, int]:
    """Units per site so that each site keeps its share of the set's parameters within `budget`."""
    cost = {k: sites[k].params_per_unit for k in ns.units}
    owned = {k: ns.units[k].numel() * cost[k] for k in ns.units}
    total = sum(owned.values())
    if total <= budget:
        return {k: ns.units[k].numel() for k in ns.units}
    exact = {k: budget * owned[k] / total / cost[k] for k in ns.units}
    quota = {k: int(math.floor(v)) for k, v in exact.items()}
    left = budget - sum(quota[k] * cost[k] for k in quota)
    grew = True
    while grew:  # hand out what is left, largest remainder first, until no site fits another unit
        grew = False
        for k in sorted(exact, key=lambda k: (quota[k] - exact[k], k)):
            if cost[k] <= left and quota[k] < ns.units[k].numel():
                quota[k] += 1
                left -= cost[k]
                grew = True
    return quota


def trim_to_budget(
    ns: NeuronSet,
    loaded: LoadedModel,
    fraction: float = 0.0003,
    *,
    max_parameters: int | None = None,
    seed: int = 0,
    name: str | None = None,
    spread: str = "score",
) -> NeuronSet:
    """The highest-scoring neurons of `ns` whose owned parameters total ≤ `fraction` × all parameters.

    `spread="score"`: neurons are taken greedily in score order over the whole set (|score| for contrast
    methods; ties seeded); one that does not fit is skipped, and cheaper ones after it may still be taken.
    Scores of different sites are compared as they are: plnd scores are norms of output changes, which
    grow with depth, so such a trim keeps mostly the last layers. `spread="layer"`: each site (layer and
    kind) keeps its share of the set's parameters, its best-scoring neurons first (largest remainders
    get the leftover units), so the trimmed set has the set's depth profile. `max_parameters` overrides
    the fraction. (The training recipes default to "layer", see `train.recipes.recipe_neuron_set`.)
    """
    if spread not in TRIM_SPREADS:
        raise ValueError(f"spread={spread!r}: give {' or '.join(TRIM_SPREADS)}")
    ns.check_model(loaded)
    if not ns.units:
        return NeuronSet({}, {}, {**ns.meta, "name": name or f"{ns.name}-budget"})
    missing = [k for k in ns.units if k not in ns.scores]
    if missing:
        raise ValueError(f"set {ns.name!r} has no scores at {', '.join(missing[:3])}: cannot rank for a budget")
    total = count_parameters(loaded.model)
    if max_parameters is None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        budget = int(math.floor(fraction * total))
    else:
        budget = int(max_parameters)
    sites = {s.key: s for s in resolve_sites(loaded.model, loaded.adapter, tuple(ns.site_kinds()))}
    contrast = ns.meta.get("method") in CONTRAST_METHODS
    entries: list[tuple[float, float, str, int, float]] = []
    for key, idx in ns.units.items():
        sc = ns.scores[key].to(torch.float64)
        gen = torch.Generator().manual_seed(_site_seed(seed, key))
        tie = torch.rand(idx.numel(), generator=gen, dtype=torch.float64)
        for u, s, t in zip(idx.tolist(), sc.tolist(), tie.tolist()):
            rank = abs(s) if contrast else s
            entries.append((-(rank if not math.isnan(rank) else -math.inf), t, key, u, s))
    entries.sort()
    quota = _layer_quota(ns, sites, budget) if spread == "layer" else None
    used = 0
    units: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
    for _, _, key, u, s in entries:
        cost = sites[key].params_per_unit
        if used + cost > budget or (quota is not None and len(units.get(key, ())) >= quota[key]):
            continue
        used += cost
        units.setdefault(key, []).append(u)
        scores.setdefault(key, []).append(s)
    meta = {k: v for k, v in ns.meta.items() if k not in ("by_kind", "by_layer", "format")}
    meta.update({"name": name or f"{ns.name}-budget", "trimmed_from": ns.name, "trim_spread": spread, "budget_fraction":
                 None if max_parameters is not None else fraction, "budget_parameters": budget,
                 "total_parameters": total})
    out = NeuronSet({k: torch.tensor(v, dtype=torch.long) for k, v in units.items()},
                    {k: torch.tensor(v) for k, v in scores.items()}, meta)
    out.meta["owned_parameters"] = out.owned_parameters(loaded)
    out.meta["neurons"] = len(out)
    return out


__all__ = ["units_per_site", "ranked_units", "top_units", "select_units", "language_set", "monolingual_sets",
           "shared_sets", "combine", "trim_to_budget", "TRIM_SPREADS", "split_by_id"]
