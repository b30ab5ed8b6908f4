"""The headline of a run: per model, English against the pooled other languages (and, when the run fixes a transfer
split, the pooled trained against the pooled never-trained languages), with paired differences.

`headline(eval_dir)` reads every `<eval_dir>/<model>/items.jsonl` (one row per judged prompt or XCOPA item, as
`evaluate` writes them) and gives, per model and language group (the high-resource languages; every other
language pooled; with `never_trained`: the languages trained on pooled, the never-trained ones pooled):

* ASR (compliance share of the harmful prompts) and the invalid share of those answers,
* everyday over-refusal (benign prompts refused), exaggerated-safety refusal (contrast prompts refused),
* XCOPA accuracy,

each with its bootstrap 95 % interval, and the *paired* difference of each against `base` and against the
random control(s) on the same prompts (paired bootstrap over prompts; a random control of several sets is their
mean per prompt). With several random sets, each neuron recipe is also compared with each set on its own
(`<metric>_vs_sets`: the paired difference and the discordant prompts), and `random_sets` gives the sets' mean,
standard deviation and range per group. Numbers are shares in [0, 1]; `format_headline` and `format_random_sets`
print them in percent.
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


TRAINED, NEVER_TRAINED = "trained", "never-trained"  # the transfer split's pooled groups


def _in_group(language: str, group: str, high_resource: Sequence[str], never_trained: Sequence[str]) -> bool:
    if group == "other":
        return language not in high_resource
    if group == TRAINED:
        return language not in never_trained
    if group == NEVER_TRAINED:
        return language in never_trained
    return language == group


def headline(eval_dir: str | Path, *, high_resource: Sequence[str] = ("en",), never_trained: Sequence[str] = (),
             random_prefix: str = "random", n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """See the module docstring. Models are the sub-folders of `eval_dir` holding `items.jsonl`; `base` first.
    `never_trained`: the run's never-trained languages (`PipelineConfig.never_trained`; empty: no transfer groups)."""
    root = Path(eval_dir)
    folders = sorted((p for p in root.iterdir() if (p / "items.jsonl").is_file()),
                     key=lambda p: (p.name != "base", p.name))
    items = {p.name: read_items(p) for p in folders}
    groups = [*high_resource, "other"] + ([TRAINED, NEVER_TRAINED] if never_trained else [])
    seen = sorted({k[0] for model in items.values() for cells in model.values() for k in cells})
    names = {g: g for g in groups}
    names["other"] = "languages other than " + ", ".join(high_resource)
    names[TRAINED] = "trained languages (" + ", ".join(x for x in seen if x not in never_trained) + ")"
    names[NEVER_TRAINED] = "never-trained languages (" + ", ".join(x for x in seen if x in never_trained) + ")"
    randoms = [m for m in items if m.startswith(random_prefix)]
    out: dict[str, Any] = {"groups": groups, "group_names": {g: names[g] for g in groups},
                           "never_trained": list(never_trained), "models": {}, "random_controls": randoms,
                           "random_sets": {}}

    def cell(model: str, metric: str, group: str) -> dict[tuple[str, str, str], float]:
        return {k: v for k, v in items[model][metric].items()
                if _in_group(k[0], group, high_resource, never_trained)}

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
                if len(randoms) > 1 and model not in randoms and model != "base":
                    g[f"{metric}_vs_sets"] = {r: _paired(cell(r, metric, group), mine, n_resamples, seed,
                                                         f"{metric}/{group}/vs-{r}") for r in randoms}
            entry[group] = g
        out["models"][model] = entry
    for group in groups if len(randoms) > 1 else []:
        out["random_sets"][group] = {}
        for metric in METRICS:
            values = {r: out["models"][r][group][metric]["value"] for r in randoms
                      if metric in out["models"][r].get(group, {})}
            if len(values) == len(randoms):
                v = np.array(list(values.values()), dtype=np.float64)
                out["random_sets"][group][metric] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)),
                                                     "min": float(v.min()), "max": float(v.max()),
                                                     "sets": len(v), "values": values}
    return out


def _paired(ref: dict[tuple[str, str, str], float], mine: dict[tuple[str, str, str], float], n_resamples: int,
            seed: int, key: str) -> dict[str, Any]:
    """The paired difference mine - ref over their shared prompts, with the discordant prompts: `fewer` (ref 1, mine
    0) and `more` (ref 0, mine 1)."""
    keys = [k for k in mine if k in ref]
    if not keys:
        return {"n": 0, "value": None}
    d = paired_difference([ref[k] for k in keys], [mine[k] for k in keys], n_resamples=n_resamples, seed=seed,
                          key=key).to_dict()
    d["fewer"] = sum(1 for k in keys if ref[k] > mine[k])
    d["more"] = sum(1 for k in keys if ref[k] < mine[k])
    return d


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


def format_random_sets(h: dict[str, Any], metric: str = "asr") -> str:
    """A Markdown table of the random sets (`random_sets`, several sets only): per language group their `metric`
    (mean ± standard deviation, range), then each other model's paired difference against each set, in points, with
    the discordant prompts (fewer / more than the set). "" when the run has fewer than two random sets."""
    randoms = h.get("random_controls", [])
    if len(randoms) < 2 or not h.get("random_sets"):
        return ""
    label = LABELS[metric]
    cols = ["model", "languages", *[f"Δ {label} vs {r} (fewer/more)" for r in randoms]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for group in h["groups"]:
        rs = h["random_sets"].get(group, {}).get(metric)
        if rs:
            spread = (f"{label} {100 * rs['mean']:.1f} ± {100 * rs['sd']:.1f} "
                      f"(range {100 * rs['min']:.1f}–{100 * rs['max']:.1f})")
            lines.append("| " + " | ".join([f"random ({rs['sets']} sets)", h["group_names"][group],
                                            *([spread] + [""] * (len(randoms) - 1))]) + " |")
        for model, entry in h["models"].items():
            sets = entry.get(group, {}).get(f"{metric}_vs_sets")
            if not sets:
                continue
            cells = [_pct(sets.get(r), True) + (f" ({sets[r]['fewer']}/{sets[r]['more']})" if sets.get(r, {}).get("n")
                                                 else "") for r in randoms]
            lines.append("| " + " | ".join([model, h["group_names"][group], *cells]) + " |")
    return "\n".join(lines)


__all__ = ["headline", "format_headline", "format_random_sets", "read_items", "METRICS", "TRAINED", "NEVER_TRAINED"]
