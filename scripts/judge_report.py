"""Agreement of the default judge with the labelled set, per language group (docs/judge.md).

    .venv/bin/python scripts/judge_report.py                 # dev and test tables, Markdown
    .venv/bin/python scripts/judge_report.py --misses dev    # and every disagreement on dev
    .venv/bin/python scripts/judge_report.py --auroc         # plus the AUROC of refusal_score (loads the model)

The test part is never tuned on; tests/test_judges.py fails when its figures drop below `BOUNDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "judge_labelled.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default=str(FIXTURE))
    ap.add_argument("--judge", default="refusal-phrase")
    ap.add_argument("--misses", choices=["dev", "test", "all"], help="list the disagreements of this part")
    ap.add_argument("--part", choices=["dev", "test", "both"], default="both",
                    help="which tables to print (tune with --part dev: the test part is never looked at while tuning)")
    ap.add_argument("--auroc", action="store_true", help="AUROC of refusal_score against the labels (loads the model)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patch", action="append", default=[],
                    help="with --auroc: a safety patch (runs/<run>/train/<recipe>/safety_patch.safetensors) to score "
                         "the rows of model <recipe> with (repeatable)")
    args = ap.parse_args(argv)

    from neuroshield.judges.labelled import BOUNDED_GROUPS, BOUNDS, agreement, format_table, load_labelled
    from neuroshield.judges.registry import get_judge, judge_label

    rows = load_labelled(args.fixture)
    judge = get_judge(args.judge)
    verdicts = [_verdict for _verdict in _judge(judge, rows)]
    counts = Counter((r["split"], r["label"]) for r in rows)
    print(f"labelled set: {len(rows)} responses ({counts[('dev', 'refusal')]} / {counts[('dev', 'compliance')]} / "
          f"{counts[('dev', 'invalid')]} refusal / compliance / invalid in dev, {counts[('test', 'refusal')]} / "
          f"{counts[('test', 'compliance')]} / {counts[('test', 'invalid')]} in test); judge {judge_label(judge)}\n")
    failing = []
    for split in ("test", "dev"):
        table = agreement(rows, verdicts, split)
        if split == "test":
            failing = [m for a in table if a.group in BOUNDED_GROUPS for m in a.below_bounds()]
        if args.part not in ("both", split):
            continue
        note = " (never tuned on)" if split == "test" else " (rules tuned on it: in-sample)"
        print(format_table(table, f"{split}{note}"))
        print()
    if args.part != "dev":
        print(f"bounds on test, per group {', '.join(BOUNDED_GROUPS)}: " + ", ".join(f"{k} >= {v}" for k, v in BOUNDS.items())
              + (": met" if not failing else ": NOT MET: " + "; ".join(failing)))
    if args.misses:
        print()
        for r, v in zip(rows, verdicts):
            if (args.misses == "all" or r["split"] == args.misses) and v != r["label"]:
                print(json.dumps({"label": r["label"], "verdict": v, "language": r["language"], "id": r["id"],
                                  "model": r["model"], "note": r["note"], "response": r["response"][:160]},
                                 ensure_ascii=False))
    if args.auroc:
        print()
        print(_auroc_table(rows, args.batch_size, args.patch))
    return 1 if failing else 0


def _judge(judge, rows):
    from neuroshield.judges.labelled import judge_rows

    return judge_rows(judge, rows)


def auroc(scores: list[float], positive: list[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count one half)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _auroc_table(rows: list[dict], batch_size: int, patches: list[str]) -> str:
    """AUROC of `refusal_score` (refusal vs not) on the rows of the base model, and of each patched model whose
    patch is given (scored with the patch applied), per group and part."""
    from neuroshield.evaluate.evaluate import patched
    from neuroshield.judges.labelled import group_of
    from neuroshield.judges.logprob import refusal_score
    from neuroshield.models.loading import load_model

    loaded = load_model("default", dtype="bfloat16")
    scored = [r for r in rows if r["model"] == "base"]
    scores = refusal_score(loaded, [r["prompt"] for r in scored], [r["language"] for r in scored], batch_size)
    for patch in patches:
        mine = [r for r in rows if r["model"] == Path(patch).parent.name]
        with patched(loaded, patch):
            scores += refusal_score(loaded, [r["prompt"] for r in mine], [r["language"] for r in mine], batch_size)
        scored += mine
    lines = ["| part | group | n | refusals | AUROC |", "|---|---|---:|---:|---:|"]
    for split in ("test", "dev", None):
        for group in ("en", "es/fr/de/ru", "zh/ja", "ar", "bn/hi", "all"):
            idx = [i for i, r in enumerate(scored) if (split is None or r["split"] == split)
                   and (group == "all" or group_of(r["language"]) == group)]
            pos = [scored[i]["label"] == "refusal" for i in idx]
            value = auroc([scores[i] for i in idx], pos)
            lines.append(f"| {split or 'dev+test'} | {group} | {len(idx)} | {sum(pos)} | "
                         f"{'—' if value != value else f'{value:.3f}'} |")
    return ("AUROC of refusal_score (one forward pass, log-odds of refusal vs compliance openers at the first answer "
            "position) against the labels (refusal vs compliance or invalid), rows of "
            + ", ".join(sorted({r["model"] for r in scored})) + ":\n\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
