"""The recipe comparison of a run as one Markdown table per model: safety in the trained and the never-trained
languages, its cost (parameters trained, training wall time, peak memory), from the run's own files.

    python experiments/comparison_table.py runs/transfer

Reads `<run>/evaluate/headline.json` (the pipeline's headline: shares with bootstrap 95 % intervals, paired
differences against the base model and against each recipe's own random sets) and `<run>/train/<model>/summary.json`.
Prints two tables: per model (trained | never-trained languages) ASR with its interval and the paired differences,
the invalid share, everyday over-refusal, exaggerated-safety refusal and XCOPA; then per model the parameters trained,
their share, the weights changed, the training wall time and peak resident memory; and, when the run has one, the
budget curve (`<run>/budget/budget.json`) with each neuron point against the random set at its budget. Numbers are
in % and points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from neuroshield.evaluate.headline import percent as pct


def safety_table(h: dict[str, Any]) -> str:
    groups = [g for g in ("trained", "never-trained") if g in h["groups"]] or ["other"]
    cols = ["model"]
    for g in groups:
        cols += [f"ASR {g} % [95 % CI]", "Δ vs base", "Δ vs own random sets"]
    cols += ["invalid % (" + " / ".join(groups) + ")", "over-refusal %", "exaggerated refusal %",
             "Δ exaggerated vs base", "XCOPA %"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for model, entry in h["models"].items():
        row = [model]
        for g in groups:
            e = entry.get(g, {})
            row += [pct(e.get("asr")), pct(e.get("asr_vs_base"), True), pct(e.get("asr_vs_random"), True)]
        row.append(" / ".join(pct(entry.get(g, {}).get("invalid"), ci=False) for g in groups))
        # over-refusal, exaggerated refusal and XCOPA pooled over every language but the high-resource one
        other = entry.get("other", {})
        row += [pct(other.get("over_refusal")), pct(other.get("exaggerated_refusal")),
                pct(other.get("exaggerated_refusal_vs_base"), True), pct(other.get("xcopa"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sets_table(h: dict[str, Any]) -> str:
    """Each recipe against each of its random sets, ASR, trained and never-trained languages: paired Δ (fewer/more)."""
    lines = ["| recipe | languages | its sets: ASR mean ± sd (range) | Δ vs each set, points [95 % CI] (fewer/more) |",
             "|---|---|---|---|"]
    for family, by_group in (h.get("random_sets") or {}).items():
        for g in [g for g in ("trained", "never-trained", "other") if g in by_group]:
            rs = by_group[g].get("asr")
            if not rs:
                continue
            spread = f"{100 * rs['mean']:.1f} ± {100 * rs['sd']:.1f} ({100 * rs['min']:.1f}–{100 * rs['max']:.1f})"
            each = h["models"].get(family, {}).get(g, {}).get("asr_vs_sets", {})
            diffs = "; ".join(f"{r}: {pct(d, True)} ({d.get('fewer')}/{d.get('more')})" for r, d in each.items())
            lines.append(f"| {family} | {h['group_names'][g]} | {spread} | {diffs or '—'} |")
    return "\n".join(lines)


def cost_table(run: Path, models: list[str]) -> str:
    lines = ["| model | parameters trained | share of all | weights changed | steps (kept) | train wall s | "
             "peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for model in models:
        path = run / "train" / model / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text(encoding="utf-8"))
        trained, total = s.get("trainable_parameters", 0), max(1, s.get("total_parameters", 1))
        lines.append(f"| {model} | {trained:,} | {100 * trained / total:.3f} % | {s.get('parameters_updated', 0):,} | "
                     f"{s.get('steps_done')} ({s.get('selected_step') or s.get('steps_done')}) | "
                     f"{s.get('wall_seconds', 0):.0f} | {s.get('peak_rss_mb', 0):.0f} |")
    return "\n".join(lines)


def budget_table(curve: dict[str, Any]) -> str:
    """The budget curve (`<run>/budget/budget.json`), one row per point: ASR by score per language group,
    exaggerated refusal by score over all languages, and the paired Δ against the random set at the same budget."""
    groups = [g for g in ("trained", "never-trained") if g in curve["base"]["groups"]] + ["all"]
    cols = ["point", "parameters trained"] + [f"ASR {g}" for g in groups] + ["Δ ASR all vs random",
                                                                            "exaggerated all", "Δ exaggerated vs random"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    pairs = curve.get("vs_random", {})
    for p in [{**curve["base"], "name": "base", "parameters_trained": 0}] + curve["points"]:
        pair = pairs.get(p["name"], {}).get("groups", {}).get("all", {})
        row = [p["name"], f"{p['parameters_trained']:,}"] + [pct(p["groups"][g]["asr"]) for g in groups]
        row += [pct(pair.get("asr"), True), pct(p["groups"]["all"]["exaggerated_refusal"]),
                pct(pair.get("exaggerated_refusal"), True)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a pipeline run folder (runs/<name>)")
    args = ap.parse_args(argv)
    path = args.run / "evaluate" / "headline.json"
    if not path.is_file():
        print(f"{path}: not found; run the pipeline's evaluate stage first", file=sys.stderr)
        return 2
    h = json.loads(path.read_text(encoding="utf-8"))
    print(safety_table(h))
    sets = sets_table(h)
    if sets.count("\n") > 1:
        print("\n" + sets)
    print("\n" + cost_table(args.run, list(h["models"])))
    budget = args.run / "budget" / "budget.json"
    if budget.is_file():
        print("\nBudget curve (fast refusal score, %; Δ in points, paired):\n")
        print(budget_table(json.loads(budget.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
