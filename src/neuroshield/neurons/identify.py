"""Stages 1-3 as one call: statistics -> scores -> MS / SS sets per language, and the overlap report.

`identify(...)` writes into `out_dir`:

    stats/stats.{safetensors,json}     the streaming statistics (reused on a rerun: every group whose
                                       data hash matches is kept; the others are collected again,
                                       one language at a time, saved after each language)
    <method>/ms_<lang>.{safetensors,json}   MS(lang): monolingual safety neurons
    <method>/ss_<lang>.{safetensors,json}   SS(lang) = MS(HR) ∩ MS(lang), for non-HR languages
    summary.json                       neurons per language and site, layer distribution, owned
                                       parameters, counts, data hashes, wall time, peak RSS

`overlap_report(run_dir)` reads the sets back (no model needed) and writes `overlap/<method>/`:
matrices with chance levels (JSON, CSV) and PNG plots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroshield.data.records import PromptRecord, group_name
from neuroshield.io import ArtifactError, read_json, write_json
from neuroshield.memory import peak_rss_mb
from neuroshield.models.loading import LoadedModel, dtype_name
from neuroshield.models.sites import count_parameters, parse_site_key, resolve_sites
from neuroshield.neurons.neuronset import SETS_MANIFEST, NeuronSet, run_set_names, write_sets_manifest
from neuroshield.neurons.overlap import overlap_matrices, plot_layers, plot_overlap
from neuroshield.neurons.scores import METHOD_KINDS, check_method
from neuroshield.neurons.selection import monolingual_sets, shared_sets
from neuroshield.neurons.stats import (
    IMPACT_KINDS,
    ActivationStats,
    collect_statistics,
    group_hashes,
)
from neuroshield.settings import IdentifyConfig, PipelineConfig

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass
class IdentifyResult:
    out_dir: Path
    stats: ActivationStats
    sets: dict[str, dict[str, NeuronSet]]  # method -> set name (ms_en, ss_zh, ...) -> set
    summary: dict[str, Any]
    files: dict[str, dict[str, Path]] = field(default_factory=dict)  # method -> set name -> .safetensors path

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_FILE


def _clear_old_sets(out: Path, methods: Sequence[str]) -> None:
    """Remove what an earlier identify run left in `out` that this run rewrites or does not make: the summary
    (written last, it says which methods and sets belong to the run) and the sets and set lists of the earlier
    run's methods and of this run's, so that no stale set is trained on or reported."""
    old = out / SUMMARY_FILE
    earlier: list[str] = []
    if old.is_file():
        try:
            earlier = [m for m in read_json(old, "identify summary").get("methods", []) if isinstance(m, str)]
        except (ArtifactError, AttributeError):
            earlier = []
        old.unlink()
    for m in dict.fromkeys([*earlier, *methods]):
        folder = out / m
        if not folder.is_dir() or Path(m).name != m:
            continue
        (folder / SETS_MANIFEST).unlink(missing_ok=True)
        for p in folder.iterdir():
            if p.is_file() and p.name.startswith(("ms_", "ss_")) and p.suffix in (".safetensors", ".json"):
                p.unlink()


def _as_list(value: str | Sequence[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _check_records(records: Sequence[PromptRecord], label: str, argument: str) -> None:
    wrong = [r for r in records if r.label != label]
    if wrong:
        raise ValueError(
            f"{argument}: {len(wrong)} prompts are labelled {wrong[0].label!r} (first: {wrong[0].id} in "
            f"{wrong[0].language}), expected {label!r}; load them with label={label!r}"
        )


def _stats_compatible(old: ActivationStats, loaded: LoadedModel, site_keys: list[str], positions: str,
                      max_length: int, impact: bool, qk_impact: str) -> str | None:
    """Why `old` cannot be reused (None if it can)."""
    checks = {
        "config_hash": (old.meta.get("config_hash"), loaded.config_hash),
        "sites": (old.meta.get("sites"), site_keys),
        "positions": (old.meta.get("positions"), positions),
        "max_length": (old.meta.get("max_length"), max_length),
        "impact": (bool(old.meta.get("impact")), impact),
        "dtype": (old.meta.get("dtype"), dtype_name(loaded.model)),
    }
    if impact:
        checks["qk_impact"] = (old.meta.get("qk_impact"), qk_impact)
    for name, (have, want) in checks.items():
        if have != want:
            return f"{name} differs ({have!r} there, {want!r} now)"
    return None


def load_or_collect_statistics(
    loaded: LoadedModel,
    records: Sequence[PromptRecord],
    stats_dir: str | Path,
    *,
    languages: Sequence[str],
    sites: Sequence[str] = ("ffn",),
    positions: str = "prompt",
    batch_size: int = 8,
    max_length: int = 512,
    qk_impact: str = "exact",
    progress: bool = True,
) -> tuple[ActivationStats, dict[str, Any]]:
    """Statistics for every group of `records`, reusing groups of `stats_dir` whose data hash matches.

    Missing groups are collected one language at a time and the folder is saved after each, so an
    interrupted run loses at most one language. Returns (stats restricted to the wanted groups, info).
    """
    stats_dir = Path(stats_dir)
    kinds = tuple(sites)
    site_keys = [s.key for s in resolve_sites(loaded.model, loaded.adapter, kinds)]
    impact = any(k in IMPACT_KINDS for k in kinds)
    want = group_hashes(records)
    existing: ActivationStats | None = None
    if (stats_dir / "stats.json").is_file():
        try:
            existing = ActivationStats.load(stats_dir)
        except (OSError, ValueError) as err:
            log.warning("%s cannot be read (%s); collecting statistics again", stats_dir, err)
        if existing is not None:
            why = _stats_compatible(existing, loaded, site_keys, positions, max_length, impact, qk_impact)
            if why:
                log.warning("statistics in %s do not fit this run (%s); collecting them again", stats_dir, why)
                existing = None
    reused = [g for g in want if existing is not None and g in existing.groups() and existing.data_hash(g) == want[g]]
    todo = [g for g in want if g not in reused]
    info: dict[str, Any] = {"reused_groups": reused, "collected_groups": todo, "seconds": 0.0}
    start = time.perf_counter()
    order = list(languages) + sorted({g.split("/")[0] for g in todo} - set(languages))
    for lang in order:
        lang_groups = [g for g in todo if g.split("/")[0] == lang]
        if not lang_groups:
            continue
        recs = [r for r in records if group_name(*r.group) in lang_groups]
        log.info("collecting statistics for %s (%d prompts)", ", ".join(lang_groups), len(recs))
        new = collect_statistics(loaded, recs, sites=kinds, positions=positions, batch_size=batch_size,
                                 max_length=max_length, progress=progress, impact=impact, qk_impact=qk_impact)
        if existing is None:
            existing = new
        else:
            keep = [g for g in existing.groups() if g not in new.groups()]
            existing = (existing.subset(keep).merge(new)) if keep else new
        existing.save(stats_dir)
    info["seconds"] = round(time.perf_counter() - start, 2)
    assert existing is not None
    return existing.subset(list(want)), info


def identify(
    loaded: LoadedModel,
    harmful: Sequence[PromptRecord],
    benign: Sequence[PromptRecord],
    *,
    languages: Sequence[str],
    method: str | Sequence[str] = tuple(IdentifyConfig().methods),
    rho: float | None = IdentifyConfig().rho,
    sites: Sequence[str] = tuple(IdentifyConfig().sites),
    positions: str = IdentifyConfig().positions,
    high_resource: Sequence[str] = tuple(PipelineConfig().high_resource),
    out_dir: str | Path,
    batch_size: int = IdentifyConfig().batch_size,
    top_k: int | None = None,
    seed: int = PipelineConfig().seed,
    max_length: int = 512,
    qk_impact: str = "exact",
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> IdentifyResult:
    """Find MS and SS neurons per language with one or more scoring methods (statistics shared).

    `harmful` / `benign`: labelled prompt records (text); every language in `languages` needs both.
    `method`: a name or a list (`plnd`, `precise-shield`, `mean-diff`, `t-stat`). `rho`: share of
    each site's units taken per group (or `top_k` units). `high_resource`: the languages whose MS
    sets (their union) define SS(lang) = MS(HR) ∩ MS(lang). `extra` is recorded in the summary.
    """
    wall = time.perf_counter()
    out = Path(out_dir)
    methods = [check_method(m) for m in _as_list(method)]
    if not methods:
        raise ValueError("method: give at least one scoring method")
    kinds = tuple(sites)
    for m in methods:
        if not set(METHOD_KINDS[m]) & set(kinds):
            raise ValueError(f"method {m!r} scores site kinds {', '.join(METHOD_KINDS[m])}; --sites gives "
                             f"{', '.join(kinds)}")
    languages = list(dict.fromkeys(languages))
    if not languages:
        raise ValueError("languages: give at least one language")
    hr = list(high_resource)
    if not set(hr) <= set(languages):
        raise ValueError(f"high-resource language(s) {', '.join(sorted(set(hr) - set(languages)))} must be among "
                         f"the languages ({', '.join(languages)})")
    _check_records(harmful, "harmful", "harmful prompts")
    _check_records(benign, "benign", "benign prompts")
    records = [r for r in list(harmful) + list(benign) if r.language in languages]
    have = {(r.language, r.label) for r in records}
    missing = [f"{lang} ({label})" for lang in languages for label in ("harmful", "benign")
               if (lang, label) not in have]
    if missing:
        raise ValueError(f"no prompts for {', '.join(missing)}: every language needs harmful and benign prompts "
                         "(benign: e.g. mgsm, parallel-benign, or a file)")
    if top_k is None and (rho is None or not 0 < rho <= 1):
        raise ValueError(f"rho={rho!r}: give a share of each site's units in (0, 1], or top_k")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k!r}: give at least 1 unit per site")
    _clear_old_sets(out, methods)
    stats, stats_info = load_or_collect_statistics(
        loaded, records, out / "stats", languages=languages, sites=kinds, positions=positions,
        batch_size=batch_size, max_length=max_length, qk_impact=qk_impact, progress=progress)

    total_params = count_parameters(loaded.model)
    all_sets: dict[str, dict[str, NeuronSet]] = {}
    files: dict[str, dict[str, Path]] = {}
    sets_summary: dict[str, Any] = {}
    # image groups (a VLM with typographic prompts): MS(lang, image) against the language's benign prompts,
    # and SS(lang, image) = MS(HR, text) ∩ MS(lang, image), the neurons an image attack shares with text
    image_langs = [lang for lang in languages if (lang, "image", "harmful") in
                   {(r.language, r.modality, r.label) for r in records}]
    for m in methods:
        ms = monolingual_sets(stats, loaded, m, languages=languages, rho=rho, top_k=top_k, seed=seed)
        ss = shared_sets(ms, hr, loaded) if len(languages) > 1 else {}
        named = {s.name: s for s in list(ms.values()) + list(ss.values())}
        if image_langs:
            ms_img = monolingual_sets(stats, loaded, m, languages=image_langs, modality="image", rho=rho,
                                      top_k=top_k, seed=seed)
            ss_img = shared_sets({**{h: ms[h] for h in hr}, **{f"{lang}_image": s for lang, s in ms_img.items()}},
                                 hr, loaded)
            named.update({s.name: s for s in list(ms_img.values()) + list(ss_img.values())})
        folder = out / m
        files[m] = {}
        for name, s in named.items():
            files[m][name] = s.save(folder / name, loaded)
        write_sets_manifest(folder, list(named), {"method": m, "languages": languages})  # last: the sets are there
        all_sets[m] = named
        sets_summary[m] = {
            name: {
                "language": s.meta.get("language", name.split("_", 2)[1]),
                "modality": s.meta.get("modality", "text"),
                "kind": s.meta.get("kind"),
                "neurons": len(s),
                "by_kind": s.count_by_kind(),
                "by_layer": {str(k): v for k, v in s.count_by_layer().items()},
                "owned_parameters": s.meta.get("owned_parameters"),
                "owned_fraction": (s.meta.get("owned_parameters") or 0) / total_params,
            }
            for name, s in named.items()
        }
    n_layers = len({parse_site_key(k)[0] for k in stats.sites()})
    units_total = sum(stats.width(k) for k in stats.sites())
    summary: dict[str, Any] = {
        "model_id": loaded.model_id,
        "model_spec": loaded.spec,
        "config_hash": loaded.config_hash,
        "methods": methods,
        "rho": None if top_k is not None else rho,
        "top_k": top_k,
        "seed": seed,
        "sites": list(kinds),
        "positions": positions,
        "max_length": max_length,
        "qk_impact": qk_impact if any(k in IMPACT_KINDS for k in kinds) else None,
        "languages": languages,
        "high_resource": hr,
        "layers": n_layers,
        "units_in_sites": units_total,
        "total_parameters": total_params,
        "groups": {g: {"prompts": stats.prompts(g), "tokens": stats.count(g), "data_hash": stats.data_hash(g)}
                   for g in stats.groups()},
        "statistics": stats_info,
        "sets": sets_summary,
        "layer_distribution": {m: {name: _layer_list(s, n_layers) for name, s in named.items()}
                               for m, named in all_sets.items()},
        "wall_seconds": round(time.perf_counter() - wall, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **({"extra": extra} if extra else {}),
    }
    write_json(out / SUMMARY_FILE, summary)
    return IdentifyResult(out, stats, all_sets, summary, files)


def _layer_list(ns: NeuronSet, n_layers: int) -> list[int]:
    counts = [0] * n_layers
    for layer, n in ns.count_by_layer().items():
        counts[layer] += n
    return counts


def _method_folders(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and (any(p.glob("ms_*.json"))
                                                                   or (p / SETS_MANIFEST).is_file()))


def _order(names: list[str], languages: list[str], prefix: str) -> list[str]:
    """Set names in the run's language order (then the rest, sorted)."""
    ranked = [f"{prefix}{lang}" for lang in languages if f"{prefix}{lang}" in names]
    return ranked + sorted(n for n in names if n not in ranked)


def overlap_report(run_dir: str | Path) -> Path:
    """Overlap matrices (with chance), layer histograms and plots for every method folder of a run.

    Writes `run_dir/overlap/<method>/{ms_overlap,ss_overlap}.{json,csv}`, `ms_overlap.png`,
    `ms_layers.png`, `ss_layers.png`, and `run_dir/overlap/overlap.json` (headline numbers: MS(HR)
    against every other MS set, observed vs chance). Returns the `overlap` folder.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder (run `neuroshield identify --out {run}` first)")
    folders = _method_folders(run)
    if not folders:
        raise FileNotFoundError(f"{run}: no method folders with ms_<lang> sets (run `neuroshield identify` first)")
    summary = read_json(run / SUMMARY_FILE, "identify summary") if (run / SUMMARY_FILE).is_file() else {}
    languages = list(summary.get("languages", []))
    hr = list(summary.get("high_resource", ["en"]))
    out = run / "overlap"
    index: dict[str, Any] = {"run": str(run), "methods": {}}
    for folder in folders:
        method = folder.name
        names = run_set_names(folder)  # the sets of the run that wrote the folder (None: an older folder)
        sets = {p.name[: -len(".json")]: NeuronSet.load(p.with_suffix("")) for p in sorted(folder.glob("*.json"))
                if p.name.startswith(("ms_", "ss_")) and (names is None or p.name[: -len(".json")] in names)}
        ms_names = _order([n for n in sets if n.startswith("ms_")], languages, "ms_")
        ss_names = _order([n for n in sets if n.startswith("ss_")], languages, "ss_")
        dest = out / method
        ms = {n[3:]: sets[n] for n in ms_names}
        res = overlap_matrices(ms)
        res.save_json(dest / "ms_overlap.json")
        res.save_csv(dest / "ms_overlap.csv")
        title = f"{method}: MS-neuron overlap across languages ({summary.get('model_id', '')})"
        plot_overlap(res, dest / "ms_overlap.png", title=title)
        plot_layers(res, dest / "ms_layers.png", title=f"{method}: where MS neurons sit (per language)")
        entry: dict[str, Any] = {"ms_sizes": dict(zip(res.names, res.sizes)), "files": {}}
        if ss_names:
            ss = {n[3:]: sets[n] for n in ss_names}
            ss_res = overlap_matrices(ss, n_layers=res.n_layers)
            ss_res.save_json(dest / "ss_overlap.json")
            ss_res.save_csv(dest / "ss_overlap.csv")
            plot_layers(ss_res, dest / "ss_layers.png",
                        title=f"{method}: where SS neurons (MS({'+'.join(hr)}) ∩ MS(lang)) sit")
            entry["ss_sizes"] = dict(zip(ss_res.names, ss_res.sizes))
        # headline: each HR language against the others
        vs: dict[str, Any] = {}
        for h in hr:
            if h not in res.names:
                continue
            vs[h] = {other: {k: round(v, 4) for k, v in res.cell(h, other).items()}
                     for other in res.names if other != h}
            for other in vs[h]:
                c = vs[h][other]
                c["enrichment"] = round(c["intersection"] / c["chance_intersection"], 3) \
                    if c["chance_intersection"] > 0 else None
        entry["high_resource_vs"] = vs
        # cross-modal: each language's text set against its image set (typographic prompts), when both exist
        cross = {lang: {k: round(v, 4) for k, v in res.cell(lang, f"{lang}_image").items()}
                 for lang in res.names if f"{lang}_image" in res.names}
        if cross:
            entry["text_vs_image"] = cross
        offdiag = [(res.overlap[i, j], res.chance_overlap[i, j]) for i in range(len(res.names))
                   for j in range(len(res.names)) if i != j]
        if offdiag:
            entry["mean_overlap"] = round(float(sum(o for o, _ in offdiag) / len(offdiag)), 4)
            entry["mean_chance_overlap"] = round(float(sum(c for _, c in offdiag) / len(offdiag)), 4)
        entry["files"] = {p.name: str(p) for p in sorted(dest.iterdir()) if p.is_file()}
        index["methods"][method] = entry
    write_json(out / "overlap.json", index)
    return out


__all__ = ["identify", "IdentifyResult", "overlap_report", "load_or_collect_statistics"]
