"""The charts the report draws itself (into `<run>/report/`): rates and accuracies per language, neurons per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroshield.report.blocks import Figure

def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titlesize": 11, "figure.dpi": 110})
    return plt


PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def bars(ax: Any, groups: list[str], series: list[tuple[str, list[Any]]], ylabel: str, chance: float | None = None) -> None:
    import numpy as np

    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, rates) in enumerate(series):
        vals = [100 * r.value if r is not None and r.n else np.nan for r in rates]
        lo = [100 * (r.value - r.lo) if r is not None and r.n else 0 for r in rates]
        hi = [100 * (r.hi - r.value) if r is not None and r.n else 0 for r in rates]
        ax.bar(x + (i - (n - 1) / 2) * width, vals, width * 0.92, yerr=[lo, hi], capsize=2.5, label=name,
               color=PALETTE[i % len(PALETTE)], error_kw={"elinewidth": 0.9, "ecolor": "#333333"})
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    if chance is not None:
        ax.axhline(chance, color="#999999", linestyle="--", linewidth=0.8)
    if n > 1:  # above the axes, so that it never covers a bar
        ax.legend(frameon=False, fontsize=9, ncol=min(n, 4), loc="lower right", bbox_to_anchor=(1.0, 1.0))


def save_figure(fig: Any, plt: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def rate_chart(results: list[Any], role: str, metric: str, label: str, judge: str, path: Path, run: Path) -> Figure | None:
    mods = sorted({c.modality for e in results for c in e.safety if c.role == role})
    if not mods:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(mods), 1, figsize=(10, 3.6 * len(mods)), squeeze=False)
    for ax, mod in zip(axes[:, 0], mods):
        langs = sorted({c.language for e in results for c in e.safety if c.role == role and c.modality == mod},
                       key=lambda lang: (lang == "all", lang))
        series = []
        for e in results:
            rates = []
            for lang in langs:
                c = next((c for c in e.safety if (c.language, c.modality, c.role) == (lang, mod, role)), None)
                rates.append(getattr(c, metric) if c else None)
            series.append((e.tag, rates))
        bars(ax, langs, series, f"{label} (%)")
        ax.set_title(f"{label} per language, {mod} prompts", loc="left")
    save_figure(fig, plt, path)
    what = {"harmful": "harmful prompts answered (verdict compliance)", "benign": "benign prompts refused",
            "contrast": "contrast prompts (safe, sounding dangerous) refused"}[role]
    rates = [getattr(c, metric) for e in results for c in e.safety if c.role == role]
    # an empty-looking chart is otherwise easily read as a drawing failure
    zero = " Every rate is 0 %, so no bar shows." if rates and all(r is not None and r.value == 0 for r in rates) else ""
    return Figure(path, f"{label} per language × modality",
                  f"{label}: share of {what}, per language; bars are point estimates, whiskers the 95 % bootstrap "
                  f"interval; one bar per evaluation. Judge: {judge}.{zero}", path.relative_to(run).as_posix())


def capability_chart(results: list[Any], tasks: list[str], path: Path, run: Path) -> Figure:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, 5 * len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        langs = sorted({c.language for e in results for c in e.capability if c.task == task},
                       key=lambda lang: (lang == "all", lang))
        series = [(e.tag, [next((c.accuracy for c in e.capability if (c.task, c.language) == (task, lang)), None)
                           for lang in langs]) for e in results]
        bars(ax, langs, series, "accuracy (%)", chance=50.0 if task == "xcopa" else None)
        ax.set_title(f"{task.upper()} accuracy per language", loc="left")
    save_figure(fig, plt, path)
    return Figure(path, "Capability per language",
                  "Accuracy per language with 95 % bootstrap intervals; MGSM by exact match of the last number, "
                  "XCOPA by log-likelihood (dashed line: chance, 50 %).", path.relative_to(run).as_posix())


def layer_chart(sets: list[tuple[Path, dict[str, Any]]], path: Path, run: Path) -> Figure | None:
    plt = pyplot()
    layers = sorted({int(k) for _, m in sets for k in m["by_layer"]})
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(10, 3.4))
    for i, (p, m) in enumerate(sets[:8]):
        counts = [int(m["by_layer"].get(str(layer), 0)) for layer in layers]
        ax.plot(layers, counts, marker="o", markersize=3, linewidth=1.4, color=PALETTE[i % len(PALETTE)],
                label=str(m.get("name") or p.stem))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.grid(color="#dddddd", linewidth=0.6)
    ax.legend(frameon=False, fontsize=8, ncol=2)
    ax.set_title("Neurons per layer")
    save_figure(fig, plt, path)
    extra = f" (first 8 of {len(sets)} sets)" if len(sets) > 8 else ""
    return Figure(path, "Layer distribution of the neuron sets",
                  f"Number of selected neurons in each decoder layer, one line per neuron set{extra}.",
                  path.relative_to(run).as_posix())
