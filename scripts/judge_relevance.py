"""Tried and not kept: a model-based "does not address the request" signal beside the phrase judge (docs/judge.md).

For each labelled response, the default model (bfloat16) scores the response tokens teacher-forced
(`response_token_logprobs`) given the chat-formatted prompt (`cond`) and given an empty chat prompt (`empty`).
Features, over all response tokens or the first k: the mean log-probability given the prompt (`c`), given the
empty prompt (`u`) and their difference, the pointwise mutual information of response and prompt (`pmi`).
A rule turns the phrase judge's `compliance` into `invalid` when one feature passes one threshold; the feature,
k and threshold are chosen on the dev part only, by the criterion fixed before: the smallest total shortfall
below the bounds (as `scripts/train_judge.py`), then the dev accuracy. `--test` prints the chosen rule's
test table (look at it once).

    .venv/bin/python scripts/judge_relevance.py --cache /tmp/judge_lp.pt          # dev (~10 min to score, cached)
    .venv/bin/python scripts/judge_relevance.py --cache /tmp/judge_lp.pt --test   # and the test table
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "judge_labelled.jsonl"
PREFIXES = (None, 8, 16)  # all response tokens, or the first k


def score(rows: list[dict], batch_size: int) -> dict[str, list[torch.Tensor]]:
    from neuroshield.generate.generation import response_token_logprobs
    from neuroshield.models import load_model

    loaded = load_model("default", dtype="bfloat16")
    responses = [r["response"] for r in rows]
    return {"cond": response_token_logprobs(loaded, [r["prompt"] for r in rows], responses, batch_size),
            "empty": response_token_logprobs(loaded, [""] * len(rows), responses, batch_size)}


def features(lp: dict[str, list[torch.Tensor]], i: int, k: int | None) -> dict[str, float] | None:
    c, u = lp["cond"][i][:k], lp["empty"][i][:k]
    if len(c) == 0:
        return None
    return {"c": float(c.mean()), "u": float(u.mean()), "pmi": float((c - u).mean())}


def auroc(scores: list[float], positive: list[bool]) -> float:
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default=str(FIXTURE))
    ap.add_argument("--cache", help="a .pt file for the token log-probs (written when missing)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--test", action="store_true", help="also print the chosen rule's test table")
    args = ap.parse_args(argv)

    from neuroshield.judges.labelled import BOUNDED_GROUPS, BOUNDS, agreement, format_table, judge_rows, load_labelled
    from neuroshield.judges.registry import get_judge

    rows = load_labelled(args.fixture)
    if args.cache and Path(args.cache).is_file():
        lp = torch.load(args.cache)
    else:
        lp = score(rows, args.batch_size)
        if args.cache:
            torch.save(lp, args.cache)
    if len(lp["cond"]) != len(rows):
        raise SystemExit(f"{args.cache}: {len(lp['cond'])} rows, the fixture has {len(rows)}")
    phrase = judge_rows(get_judge("refusal-phrase"), rows)
    dev = [i for i, r in enumerate(rows) if r["split"] == "dev"]

    # How well each feature tells invalid from compliance where the phrase judge says compliance (dev).
    pop = [i for i in dev if phrase[i] == "compliance" and rows[i]["label"] in ("compliance", "invalid")
           and len(lp["cond"][i])]
    positive = [rows[i]["label"] == "invalid" for i in pop]
    print(f"dev rows the phrase judge calls compliance: {len(pop)} ({sum(positive)} labelled invalid)")
    print("| tokens | feature | AUROC (invalid against compliance) |\n|---|---|---:|")
    for k in PREFIXES:
        for key, sign, side in (("c", -1, "low"), ("u", -1, "low"), ("pmi", -1, "low"), ("pmi", 1, "high")):
            value = auroc([sign * features(lp, i, k)[key] for i in pop], positive)  # type: ignore[index]
            print(f"| {k or 'all'} | {key} {side} | {value:.3f} |")

    def apply(key: str, k: int | None, test: Callable[[float], bool]) -> list[str]:
        out = list(phrase)
        for i in range(len(rows)):
            f = features(lp, i, k) if phrase[i] == "compliance" else None
            if f is not None and test(f[key]):
                out[i] = "invalid"
        return out

    def criterion(verdicts: list[str]) -> tuple[float, float]:
        table = agreement(rows, verdicts, "dev")
        short = sum(max(0.0, bound - v) for a in table if a.group in BOUNDED_GROUPS
                    for name, bound in BOUNDS.items() if (v := a.figures()[name]) is not None)
        return short, next(a for a in table if a.group == "all").accuracy or 0.0

    grid = []
    for k in PREFIXES:
        grid += [(f"c < {t}", apply("c", k, lambda x, t=t: x < t), k) for t in [x / 20 for x in range(-50, -10)]]
        grid += [(f"u < {t}", apply("u", k, lambda x, t=t: x < t), k) for t in [x / 10 for x in range(-60, -15, 2)]]
        grid += [(f"pmi < {t}", apply("pmi", k, lambda x, t=t: x < t), k) for t in [x / 10 for x in range(-10, 15)]]
        grid += [(f"pmi > {t}", apply("pmi", k, lambda x, t=t: x > t), k) for t in [x / 10 for x in range(20, 90, 2)]]
    ranked = sorted(((criterion(v), name, k, v) for name, v, k in grid), key=lambda x: (x[0][0], -x[0][1]))
    short, acc = criterion(phrase)
    print(f"\nphrase judge alone on dev: shortfall {short:.3f}, accuracy {acc:.3f}; the top of {len(grid)} rules:")
    print(f"  ({sum(r[0][0] == 0 for r in ranked)} of them with no dev shortfall)")
    for (short, acc), name, k, _ in ranked[:8]:
        print(f"  tokens {k or 'all'}: {name}: shortfall {short:.3f}, accuracy {acc:.3f}")
    (_, _), name, k, chosen = ranked[0]
    moved = [rows[i]["label"] for i in dev if chosen[i] != phrase[i]]
    print(f"\nchosen: tokens {k or 'all'}, {name}; on dev it moves {len(moved)} compliance verdicts to invalid "
          f"({moved.count('invalid')} labelled invalid, {moved.count('compliance')} compliance)\n")
    print(format_table(agreement(rows, chosen, "dev"), "dev (tuned on it)"))
    if args.test:
        table = agreement(rows, chosen, "test")
        print()
        print(format_table(table, "test (never tuned on)"))
        failing = [m for a in table if a.group in BOUNDED_GROUPS for m in a.below_bounds()]
        print("\nbounds on test: " + ("met" if not failing else "NOT MET: " + "; ".join(failing)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
