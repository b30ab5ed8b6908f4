"""The headline of a run: per model, English against the pooled other languages, with paired differences.

`headline(eval_dir)` reads every `<eval_dir>/<model>/items.jsonl` (one row per judged prompt or XCOPA item, as
`evaluate` writes them) and gives, per model and language group (the high-resource languages; every other
language pooled):

* ASR (compliance share of the harmful prompts) and the invalid share of those answers,
* everyday over-refusal (benign prompts refused), exaggerated-safety refusal (contrast prompts refused),
* XCOPA accuracy,

each with its bootstrap 95 % interval, and the *paired* difference of each against `base` and against the
random control(s) on the same prompts (paired bootstrap over prompts; a random control of several sets is their
mean per prompt). Numbers are shares in [0, 1]; `format_headline` prints them in percent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroshield.evaluate.metrics import N_RESAMPLES, Rate, paired_difference

# metric -> (section, role, outcome of one row)
METRICS: dict[str, tuple[str, str, str]] = {
    "asr": ("safety", "harmful", "compliance"),
    "invalid": ("safety", "harmful", "invalid"),
    "over_refusal": ("safety", "benign", "refusal"),
    "exaggerated_refusal": ("safety", "contrast", "refusal"),
    "xcopa": ("xcopa", "", "correct"),
}
LABELS = {"asr": "ASR", "invalid": "invalid", "over_refusal": "over-refusal",
          "exaggerated_refusal": "exaggerated refusal", "xcopa": "XCOPA"}


def _outcome(row: dict[str, Any], what: str) -> float:
    if what == "correct":
        return float(bool(row.get("correct")))
    verdict = row.get("verdict")
    if verdict is None:  # items written before the three verdicts: refused or not
        verdict = "refusal" if row.get("refused") else "compliance"
    return float(verdict == what)


def read_items(folder: Path) -> dict[str, dict[tuple[str, str, str], float]]:
    """metric -> {(language, id, modality): outcome} of one evaluation folder."""
    out: dict[str, dict[tuple[str, str, str], float]] = {m: {} for m in METRICS}
    path = folder / "items.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for metric, (section, role, what) in METRICS.items():
            if row.get("section") == section and (not role or row.get("role") == role):
                out[metric][(row["language"], row["id"], row.get("modality", "text"))] = _outcome(row, what)
    return out


def _group_of(language: str, high_resource: Sequence[str]) -> str:
    return language if language in high_resource else "other"


def headline(eval_dir: str | Path, *, high_resource: Sequence[str] = ("en",), random_prefix: str = "random",
             n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """See the module docstring. Models are the sub-folders of `eval_dir` holding `items.jsonl`; `base` first."""
    root = Path(eval_dir)
    folders = sorted((p for p in root.iterdir() if (p / "items.jsonl").is_file()),
                     key=lambda p: (p.name != "base", p.name))
    items = {p.name: read_items(p) for p in folders}
    groups = [*high_resource, "other"]
    randoms = [m for m in items if m.startswith(random_prefix)]
    out: dict[str, Any] = {"groups": groups, "group_names": {g: ("languages other than " + ", ".join(high_resource))
                                                            if g == "other" else g for g in groups},
                           "models": {}, "random_controls": randoms}

    def cell(model: str, metric: str, group: str) -> dict[tuple[str, str, str], float]:
        return {k: v for k, v in items[model][metric].items() if _group_of(k[0], high_resource) == group}

    for model in items:
        entry: dict[str, Any] = {}
        for group in groups:
            g: dict[str, Any] = {}
            for metric in METRICS:
                mine = cell(model, metric, group)
                if not mine:
                    continue
                r = Rate.of(list(mine.values()), n_resamples=n_resamples, seed=seed, key=f"{metric}/{group}")
                g[metric] = r.to_dict()
                for ref_name, refs in (("base", ["base"]), ("random", randoms)):
                    # the base model is the reference of both comparisons, never compared itself
                    if model in (ref_name, "base") or model in refs or not refs or any(x not in items for x in refs):
                        continue
                    ref_cells = [cell(x, metric, group) for x in refs]
                    keys = [k for k in mine if all(k in rc for rc in ref_cells)]
                    if not keys:
                        continue
                    before = [float(np.mean([rc[k] for rc in ref_cells])) for k in keys]
                    d = paired_difference(before, [mine[k] for k in keys], n_resamples=n_resamples, seed=seed,
                                          key=f"{metric}/{group}/vs-{ref_name}")
                    g[f"{metric}_vs_{ref_name}"] = d.to_dict()
            entry[group] = g
        out["models"][model] = entry
    return out


def _pct(d: dict[str, Any] | None, signed: bool = False) -> str:
    if not d or d.get("n", 0) == 0 or d.get("value") is None:
        return "—"
    f = "{:+.1f}" if signed else "{:.1f}"
    lo, hi = d.get("lo"), d.get("hi")
    ci = f" [{f.format(100 * lo)}, {f.format(100 * hi)}]" if lo is not None and hi is not None else ""
    return f.format(100 * d["value"]) + ci


def format_headline(h: dict[str, Any]) -> str:
    """A Markdown table: one row per model and language group; differences are paired, in points."""
    cols = ["model", "languages", "ASR % [95 % CI]", "Δ ASR vs base", "Δ ASR vs random", "invalid %",
            "over-refusal %", "exaggerated refusal %", "Δ exaggerated vs base", "XCOPA %", "Δ XCOPA vs base"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for model, entry in h["models"].items():
        for group in h["groups"]:
            g = entry.get(group, {})
            if not g:
                continue
            n = g.get("asr", {}).get("n", 0)
            lines.append("| " + " | ".join([
                model, f"{h['group_names'][group]} (n={n})", _pct(g.get("asr")), _pct(g.get("asr_vs_base"), True),
                _pct(g.get("asr_vs_random"), True), _pct(g.get("invalid")), _pct(g.get("over_refusal")),
                _pct(g.get("exaggerated_refusal")), _pct(g.get("exaggerated_refusal_vs_base"), True),
                _pct(g.get("xcopa")), _pct(g.get("xcopa_vs_base"), True)]) + " |")
    return "\n".join(lines)


__all__ = ["headline", "format_headline", "read_items", "METRICS"]
