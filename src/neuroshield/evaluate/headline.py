"""The headline of a run: per model, English against the pooled other languages (and, when the run fixes a transfer
split, the pooled trained against the pooled never-trained languages), with paired differences.

`headline(eval_dir)` reads every `<eval_dir>/<model>/items.jsonl` (one row per judged prompt or XCOPA item, as
`evaluate` writes them) and gives, per model and language group (the high-resource languages; every other
language pooled; with `never_trained`: the languages trained on pooled, the never-trained ones pooled):

* ASR (compliance share of the harmful prompts) and the invalid share of those answers,
* everyday over-refusal (benign prompts refused), exaggerated-safety refusal (contrast prompts refused),
* XCOPA accuracy,

each with its bootstrap 95 % interval, and the *paired* difference of each against `base` and against its random
control on the same prompts (paired bootstrap over prompts; a random control of several sets is their mean per
prompt). `controls` says which random models control which recipe (`train.recipes.random_controls`: precise-shield
by random-s<seed>, ss-expansion by random-ss-expansion-s<seed>); without it every model named random* controls every
other model. With several random sets, each controlled recipe is also compared with each of its sets on its own
(`<metric>_vs_sets`: the paired difference and the discordant prompts), and `random_sets[recipe]` gives the sets'
mean, standard deviation and range per group. Numbers are shares in [0, 1]; `format_headline` and
`format_random_sets` print them in percent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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


def _in_group(language: str, group: str, high_resource: Sequence[str], never_trained: Sequence[str],
              languages: Sequence[str] | None = None) -> bool:
    if group == "other":
        return language not in high_resource
    if group == TRAINED:  # the run's languages that training may use (not XCOPA's extra languages)
        return language not in never_trained and (languages is None or language in languages)
    if group == NEVER_TRAINED:
        return language in never_trained
    return language == group


def headline(eval_dir: str | Path, *, high_resource: Sequence[str] = ("en",), never_trained: Sequence[str] = (),
             controls: Mapping[str, Sequence[str]] | None = None, random_prefix: str = "random",
             languages: Sequence[str] | None = None, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """See the module docstring. Models are the sub-folders of `eval_dir` holding `items.jsonl`; `base` first.
    `never_trained`: the run's never-trained languages (`PipelineConfig.never_trained`; empty: no transfer groups);
    `languages`: the run's languages (`PipelineConfig.languages`): the trained group holds those not never-trained,
    not the capability tasks' other languages (XCOPA's it, vi, sw, ...), which no recipe trained on either.
    `controls`: recipe -> its random control models (None: every `random_prefix` model controls every other one)."""
    root = Path(eval_dir)
    folders = sorted((p for p in root.iterdir() if (p / "items.jsonl").is_file()),
                     key=lambda p: (p.name != "base", p.name))
    items = {p.name: read_items(p) for p in folders}
    groups = [*high_resource, "other"] + ([TRAINED, NEVER_TRAINED] if never_trained else [])
    seen = sorted({k[0] for model in items.values() for cells in model.values() for k in cells})
    names = {g: g for g in groups}
    names["other"] = "languages other than " + ", ".join(high_resource)
    names[TRAINED] = "trained languages (" + ", ".join(x for x in seen if _in_group(x, TRAINED, high_resource,
                                                                                  never_trained, languages)) + ")"
    names[NEVER_TRAINED] = "never-trained languages (" + ", ".join(x for x in seen if x in never_trained) + ")"
    randoms = [m for m in items if m.startswith(random_prefix)]
    if controls is None:  # one family: every random model controls every other trained model
        family_of = {m: "random" for m in items if m != "base" and m not in randoms} if randoms else {}
        families = {"random": randoms} if randoms else {}
    else:
        families = {m: [r for r in rs if r in items] for m, rs in controls.items() if m in items}
        families = {m: rs for m, rs in families.items() if rs and all(r in items for r in rs)}
        family_of = {m: m for m in families}
        randoms = [r for rs in families.values() for r in rs]
    out: dict[str, Any] = {"groups": groups, "group_names": {g: names[g] for g in groups},
                           "never_trained": list(never_trained), "models": {}, "random_controls": randoms,
                           "controls": {m: families[f] for m, f in family_of.items()}, "random_sets": {}}

    def cell(model: str, metric: str, group: str) -> dict[tuple[str, str, str], float]:
        return {k: v for k, v in items[model][metric].items()
                if _in_group(k[0], group, high_resource, never_trained, languages)}

    for model in items:
        entry: dict[str, Any] = {}
        mine_sets = families.get(family_of.get(model, ""), [])
        for group in groups:
            g: dict[str, Any] = {}
            for metric in METRICS:
                mine = cell(model, metric, group)
                if not mine:
                    continue
                r = Rate.of(list(mine.values()), n_resamples=n_resamples, seed=seed, key=f"{metric}/{group}")
                g[metric] = r.to_dict()
                # the base model is the reference of both comparisons, never compared itself
                refs_of = {"base": [] if model == "base" else ["base"], "random": mine_sets}
                for ref_name, refs in refs_of.items():
                    if not refs:
                        continue
                    ref_cells = [cell(x, metric, group) for x in refs]
                    keys = [k for k in mine if all(k in rc for rc in ref_cells)]
                    if not keys:
                        continue
                    before = [float(np.mean([rc[k] for rc in ref_cells])) for k in keys]
                    d = paired_difference(before, [mine[k] for k in keys], n_resamples=n_resamples, seed=seed,
                                          key=f"{metric}/{group}/vs-{ref_name}")
                    g[f"{metric}_vs_{ref_name}"] = d.to_dict()
                if len(mine_sets) > 1:
                    g[f"{metric}_vs_sets"] = {r: _paired(cell(r, metric, group), mine, n_resamples, seed,
                                                         f"{metric}/{group}/vs-{r}") for r in mine_sets}
            entry[group] = g
        out["models"][model] = entry
    for family, sets in families.items():
        if len(sets) < 2:
            continue
        out["random_sets"][family] = {}
        for group in groups:
            stats: dict[str, Any] = {}
            for metric in METRICS:
                values = {r: out["models"][r][group][metric]["value"] for r in sets
                          if metric in out["models"][r].get(group, {})}
                if len(values) == len(sets):
                    v = np.array(list(values.values()), dtype=np.float64)
                    stats[metric] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)), "min": float(v.min()),
                                     "max": float(v.max()), "sets": len(v), "values": values}
            out["random_sets"][family][group] = stats
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


def percent(d: dict[str, Any] | None, signed: bool = False, ci: bool = True) -> str:
    """A share or a paired difference (a `Rate` / `paired_difference` dict) in percent or points, with its
    interval unless `ci` is False; "—" for an empty cell."""
    if not d or d.get("n", 0) == 0 or d.get("value") is None:
        return "—"
    f = "{:+.1f}" if signed else "{:.1f}"
    lo, hi = d.get("lo"), d.get("hi")
    interval = f" [{f.format(100 * lo)}, {f.format(100 * hi)}]" if ci and lo is not None and hi is not None else ""
    return f.format(100 * d["value"]) + interval


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
                model, f"{h['group_names'][group]} (n={n})", percent(g.get("asr")), percent(g.get("asr_vs_base"), True),
                percent(g.get("asr_vs_random"), True), percent(g.get("invalid")), percent(g.get("over_refusal")),
                percent(g.get("exaggerated_refusal")), percent(g.get("exaggerated_refusal_vs_base"), True),
                percent(g.get("xcopa")), percent(g.get("xcopa_vs_base"), True)]) + " |")
    return "\n".join(lines)


def format_random_sets(h: dict[str, Any], metric: str = "asr") -> str:
    """A Markdown table of the random sets (`random_sets`, families of several sets only): per family and language
    group the sets' `metric` (mean ± standard deviation, range), then the paired difference of each model they
    control against each set, in points, with the discordant prompts (fewer / more than the set). "" when no recipe
    has two or more random sets."""
    families = h.get("random_sets") or {}
    if not families:
        return ""
    label = LABELS[metric]
    controls: dict[str, list[str]] = h.get("controls", {})
    width = max(len(sets) for sets in controls.values())
    cols = ["model", "languages", *[f"Δ {label} vs set {i + 1} (fewer/more)" for i in range(width)]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for family, by_group in families.items():
        sets = controls.get(family) or h.get("random_controls", [])  # family "random": every random model
        models = [m for m in h["models"] if controls.get(m) == sets]
        title = "random" if family == "random" else f"random sets of {family}"
        for group in h["groups"]:
            rs = by_group.get(group, {}).get(metric)
            if not rs:
                continue
            spread = (f"{label} {100 * rs['mean']:.1f} ± {100 * rs['sd']:.1f} "
                      f"(range {100 * rs['min']:.1f}–{100 * rs['max']:.1f})")
            lines.append("| " + " | ".join([f"{title} ({rs['sets']} sets: {', '.join(sets)})",
                                            h["group_names"][group], spread, *[""] * (width - 1)]) + " |")
            for model in models:
                each = h["models"][model].get(group, {}).get(f"{metric}_vs_sets")
                if not each:
                    continue
                cells = [percent(each.get(r), True) + (f" ({each[r]['fewer']}/{each[r]['more']})"
                                                     if each.get(r, {}).get("n") else "") for r in sets]
                lines.append("| " + " | ".join([model, h["group_names"][group], *cells,
                                                *[""] * (width - len(cells))]) + " |")
    return "\n".join(lines)


__all__ = ["headline", "percent", "format_headline", "format_random_sets", "read_items", "METRICS", "TRAINED",
           "NEVER_TRAINED"]
