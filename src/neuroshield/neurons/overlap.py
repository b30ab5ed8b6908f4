"""How neuron sets overlap: overlap coefficient and Jaccard matrices, chance levels, layer histograms.

For sets A and B of neurons (pairs of site key and unit):

    overlap coefficient  |A ∩ B| / min(|A|, |B|)          Jaccard  |A ∩ B| / |A ∪ B|

Chance level: if, at each site s (layer, kind) of width W_s, A and B drew |A_s| and |B_s| units
uniformly and independently, |A_s ∩ B_s| would be hypergeometric with mean |A_s||B_s| / W_s, so

    E|A ∩ B| = Σ_s |A_s| |B_s| / W_s,

and the chance overlap coefficient is E|A ∩ B| / min(|A|, |B|); the chance Jaccard is the plug-in
E|A ∩ B| / (|A| + |B| − E|A ∩ B|). Selection is per site, so this is the right null: it keeps each
set's layer profile and asks only whether the same units were picked.

Also: the Spearman correlation between SS-neuron counts and baseline attack success rates over
languages (`ss_asr_correlation`), which the SS-Neuron paper reports.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuroshield.io import atomic_path, atomic_write_text
from neuroshield.models.sites import parse_site_key
from neuroshield.neurons.neuronset import NeuronSet


@dataclass
class OverlapResult:
    names: list[str]
    sizes: list[int]
    intersection: np.ndarray  # [n, n] |A ∩ B|
    overlap: np.ndarray  # overlap coefficient
    jaccard: np.ndarray
    chance_intersection: np.ndarray  # E|A ∩ B| under independent uniform draws per site
    chance_overlap: np.ndarray
    chance_jaccard: np.ndarray
    n_layers: int
    layer_counts: dict[str, list[int]]  # per set: neurons per layer (all kinds)
    layer_counts_by_kind: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def enrichment(self) -> np.ndarray:
        """Observed / chance intersection (NaN where chance is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.chance_intersection > 0, self.intersection / self.chance_intersection, np.nan)

    def cell(self, a: str, b: str) -> dict[str, float]:
        i, j = self.names.index(a), self.names.index(b)
        return {"intersection": float(self.intersection[i, j]), "overlap": float(self.overlap[i, j]),
                "jaccard": float(self.jaccard[i, j]), "chance_intersection": float(self.chance_intersection[i, j]),
                "chance_overlap": float(self.chance_overlap[i, j]), "chance_jaccard": float(self.chance_jaccard[i, j])}

    def to_dict(self) -> dict[str, Any]:
        def mat(m: np.ndarray) -> list[list[float | None]]:
            return [[None if not math.isfinite(float(x)) else round(float(x), 6) for x in row] for row in m]

        return {
            "names": self.names, "sizes": self.sizes, "n_layers": self.n_layers,
            "intersection": mat(self.intersection), "overlap": mat(self.overlap), "jaccard": mat(self.jaccard),
            "chance_intersection": mat(self.chance_intersection), "chance_overlap": mat(self.chance_overlap),
            "chance_jaccard": mat(self.chance_jaccard), "enrichment": mat(self.enrichment),
            "layer_counts": self.layer_counts, "layer_counts_by_kind": self.layer_counts_by_kind,
        }

    def save_json(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def save_csv(self, path: str | Path) -> Path:
        """One row per ordered pair: a, b, sizes, intersection, overlap, jaccard, their chance levels."""
        p = Path(path)
        with atomic_path(p) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["a", "b", "size_a", "size_b", "intersection", "overlap", "jaccard", "chance_intersection",
                        "chance_overlap", "chance_jaccard", "enrichment"])
            enr = self.enrichment
            for i, a in enumerate(self.names):
                for j, b in enumerate(self.names):
                    w.writerow([a, b, self.sizes[i], self.sizes[j], int(self.intersection[i, j]),
                                _fmt(self.overlap[i, j]), _fmt(self.jaccard[i, j]),
                                _fmt(self.chance_intersection[i, j]), _fmt(self.chance_overlap[i, j]),
                                _fmt(self.chance_jaccard[i, j]), _fmt(enr[i, j])])
        return p


def _fmt(x: float) -> str:
    return "" if not math.isfinite(float(x)) else f"{float(x):.6g}"


def _width_lookup(sets: Mapping[str, NeuronSet], widths: Mapping[str, int] | None) -> Any:
    table: dict[str, int] = {}
    if widths is None:
        for s in sets.values():
            for kind, w in (s.meta.get("site_widths") or {}).items():
                table.setdefault(kind, int(w))
    else:
        table = {k: int(v) for k, v in widths.items()}

    def width(key: str) -> int:
        if key in table:
            return table[key]
        kind = parse_site_key(key)[1]
        if kind in table:
            return table[kind]
        raise ValueError(
            f"width of site {key} unknown: pass widths= (site key or kind -> units), or use sets whose "
            "meta has site_widths (sets made by neuroshield.neurons.selection have them)"
        )

    return width


def overlap_matrices(
    sets: Mapping[str, NeuronSet], widths: Mapping[str, int] | None = None, n_layers: int | None = None
) -> OverlapResult:
    """Overlap and Jaccard matrices with their chance levels, and layer histograms, for named sets.

    `widths` maps site keys (`"12.ffn"`) or site kinds (`"ffn"`) to the number of units; by default it
    is read from the sets' `meta["site_widths"]`. The diagonal holds the sets' own sizes (chance: NaN).
    """
    names = list(sets)
    width = _width_lookup(sets, widths)
    tuples = {n: s.as_tuples() for n, s in sets.items()}
    per_site = {n: {k: int(v.numel()) for k, v in s.units.items()} for n, s in sets.items()}
    sizes = [len(tuples[n]) for n in names]
    k = len(names)
    inter = np.zeros((k, k))
    chance = np.zeros((k, k))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            inter[i, j] = len(tuples[a] & tuples[b])
            if i == j:
                chance[i, j] = np.nan
                continue
            chance[i, j] = sum(na * per_site[b].get(key, 0) / width(key) for key, na in per_site[a].items())
    size = np.array(sizes, dtype=float)
    small = np.minimum(size[:, None], size[None, :])
    union = size[:, None] + size[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        overlap = np.where(small > 0, inter / small, np.nan)
        jaccard = np.where(union > 0, inter / union, np.nan)
        chance_overlap = np.where(small > 0, chance / small, np.nan)
        chance_union = size[:, None] + size[None, :] - chance
        chance_jaccard = np.where(chance_union > 0, chance / chance_union, np.nan)
    layers_seen = [parse_site_key(key)[0] for s in sets.values() for key in s.units]
    if n_layers is None:
        metas = [s.meta.get("layers") for s in sets.values() if s.meta.get("layers")]
        n_layers = int(max(metas)) if metas else (max(layers_seen) + 1 if layers_seen else 0)
    layer_counts: dict[str, list[int]] = {}
    by_kind: dict[str, dict[str, list[int]]] = {}
    for n, s in sets.items():
        counts = [0] * n_layers
        kinds: dict[str, list[int]] = {}
        for key, idx in s.units.items():
            layer, kind = parse_site_key(key)
            counts[layer] += int(idx.numel())
            kinds.setdefault(kind, [0] * n_layers)[layer] += int(idx.numel())
        layer_counts[n] = counts
        by_kind[n] = kinds
    return OverlapResult(names, sizes, inter, overlap, jaccard, chance, chance_overlap, chance_jaccard, n_layers,
                         layer_counts, by_kind)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_overlap(result: OverlapResult, path: str | Path, title: str = "") -> Path:
    """Two heatmaps, overlap coefficient and Jaccard; each cell shows the value and (chance level)."""
    plt = _pyplot()
    k = len(result.names)
    labels = [f"{n}\n({s})" for n, s in zip(result.names, result.sizes)]
    cell = 0.62 if k > 6 else 0.9
    fig, axes = plt.subplots(1, 2, figsize=(2 * (cell * k + 1.8), cell * k + 1.9), squeeze=False)
    font = 7 if k > 8 else 8
    for ax, (mat, chance, label) in zip(axes[0], (
        (result.overlap, result.chance_overlap, "overlap coefficient |A∩B| / min(|A|,|B|)"),
        (result.jaccard, result.chance_jaccard, "Jaccard |A∩B| / |A∪B|"),
    )):
        shown = np.where(np.eye(k, dtype=bool), np.nan, mat)  # the diagonal (1.0) would swamp the colour scale
        vmax = np.nanmax(shown) if np.isfinite(shown).any() else 1.0
        im = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=max(float(vmax), 1e-9))
        for i in range(k):
            for j in range(k):
                if i == j:
                    ax.text(j, i, "—", ha="center", va="center", fontsize=font, color="0.4")
                    continue
                v, c = mat[i, j], chance[i, j]
                txt = f"{v:.2f}\n({_chance_fmt(c)})" if math.isfinite(v) else "n/a"
                bright = math.isfinite(v) and v > 0.6 * vmax
                ax.text(j, i, txt, ha="center", va="center", fontsize=font, color="black" if bright else "white")
        ax.set_xticks(range(k), labels if k <= 14 else list(result.names), fontsize=font, rotation=0 if k <= 14 else 90)
        ax.set_yticks(range(k), labels, fontsize=font)
        ax.set_title(f"{label}\ncell: observed (chance: same counts per layer, drawn at random)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_fig(fig, Path(path), plt)


def _chance_fmt(c: float) -> str:
    if not math.isfinite(c):
        return "n/a"
    return f"{c:.2f}" if c >= 0.095 else f"{c:.3f}" if c >= 0.001 else f"{c:.0e}"


def plot_layers(result: OverlapResult, path: str | Path, title: str = "") -> Path:
    """Where the neurons sit: share of each set's neurons per layer (heatmap, counts in the cells)
    and the share of all sets' neurons pooled (bars). The colour scale stops at the 98th percentile
    of the shares, so one tiny set cannot wash the others out."""
    plt = _pyplot()
    names = result.names
    counts = np.array([result.layer_counts[n] for n in names], dtype=float)
    if counts.size == 0:
        counts = np.zeros((len(names), max(result.n_layers, 1)))
    totals = counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(totals > 0, counts / totals, 0.0)
    n_layers = counts.shape[1]
    fig, (ax_line, ax_map) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.38 * n_layers + 2.5), 2.4 + 0.34 * len(names) + 0.6),
        gridspec_kw={"height_ratios": [1.0, max(1.0, 0.22 * len(names))]}, sharex=True)
    x = np.arange(n_layers)
    pooled = counts.sum(0) / counts.sum() if counts.sum() > 0 else np.zeros(n_layers)
    ax_line.bar(x, pooled, color="tab:blue", alpha=0.8)
    ax_line.set_ylabel("share, all sets", fontsize=8)
    ax_line.set_title(title or "neurons per layer", fontsize=10)
    ax_line.tick_params(labelsize=7)
    positive = share[share > 0]
    vmax = float(np.percentile(positive, 98)) if positive.size else 1.0
    im = ax_map.imshow(share, aspect="auto", cmap="magma_r", vmin=0.0, vmax=max(vmax, 1e-9))
    if n_layers * len(names) <= 1200:
        for i in range(len(names)):
            for j in range(n_layers):
                if counts[i, j] > 0:
                    ax_map.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=5.5,
                                color="white" if share[i, j] > 0.6 * vmax else "black")
    ax_map.set_yticks(range(len(names)), [f"{n} ({int(t)})" for n, t in zip(names, totals[:, 0])], fontsize=7)
    ax_map.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax_map.set_xlabel("layer (cell: neurons; colour: share of the set)", fontsize=8)
    fig.colorbar(im, ax=[ax_line, ax_map], fraction=0.03, pad=0.02, label="share")
    return _save_fig(fig, Path(path), plt)


def _save_fig(fig: Any, path: Path, plt: Any) -> Path:
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# SS counts vs attack success
# --------------------------------------------------------------------------------------------------


def ss_asr_correlation(ss_counts: Mapping[str, float], asr: Mapping[str, float],
                       languages: Sequence[str] | None = None) -> dict[str, Any]:
    """Spearman correlation over languages between SS-neuron counts and baseline ASR.

    Languages present in both mappings (or the given `languages`) are used; with fewer than 3 the
    correlation is undefined (NaN). Returns {"spearman", "p_value", "n", "languages", "pairs"}.
    """
    from scipy.stats import spearmanr

    langs = [l for l in (languages or sorted(set(ss_counts) & set(asr))) if l in ss_counts and l in asr]
    pairs = {l: (float(ss_counts[l]), float(asr[l])) for l in langs}
    if len(langs) < 3:
        return {"spearman": float("nan"), "p_value": float("nan"), "n": len(langs), "languages": langs,
                "pairs": pairs}
    xs = [pairs[l][0] for l in langs]
    ys = [pairs[l][1] for l in langs]
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        rho, p = float("nan"), float("nan")
    else:
        res = spearmanr(xs, ys)
        rho, p = float(res.statistic), float(res.pvalue)
    return {"spearman": rho, "p_value": p, "n": len(langs), "languages": langs, "pairs": pairs}


__all__ = ["OverlapResult", "overlap_matrices", "plot_overlap", "plot_layers", "ss_asr_correlation"]
