"""Train the learned judge (`learned`, judges/learned.py) on the dev part of the labelled set; print CV and test.

    .venv/bin/python scripts/train_judge.py                 # features, CV on dev, fit, write the head, test figures
    .venv/bin/python scripts/train_judge.py --cv-only       # the CV on dev only (tuning: the test part is not read)
    .venv/bin/python scripts/train_judge.py --cache /tmp/judge_features.pt   # keep the features between runs

1. Features of every labelled row: the default model (bfloat16, unpatched) reads (prompt, response) as one chat;
   the residual stream after each layer of `LAYERS`, mean-pooled over the response and at the end-of-turn token;
   and the rule features (`RULE_FEATURES`). One forward pass per batch (~7 min for the 904 rows on 1 CPU thread).
2. Cross-validation on the dev part only, grouped by prompt id (`FOLDS` folds by sha256 of salt + id, `REPEATS`
   salts): every (layer, pooling, rules, l2, balanced) of the grid; every hybrid (`KEEP`: which phrase-judge
   verdicts are kept) scored on the same out-of-fold predictions. The setting with the smallest total shortfall
   below the bounds (`labelled.BOUNDS`, summed over the bounded groups and the repeats) wins; ties go to the
   higher accuracy, then to the simpler setting (grid order).
3. The winner is refitted on the whole dev part and written to `--out` (weights + spec + digests).
4. The test part is judged with the written head through `LearnedJudge` (the path `get_judge("learned")` takes):
   the table per group, and the phrase judge's beside it.

Deterministic: folds from hashes, L-BFGS from zero in float64; the features depend on the reader's numerics.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "judge_labelled.jsonl"

LAYERS = (5, 8, 11, 14, 17, 20, 23)  # 0-based decoder layers of the 24 of Qwen2.5-0.5B
POOLINGS = ("mean", "last", "both")
L2S = (0.01, 0.1, 1.0)
FOLDS = 5
REPEATS = 3
# Hybrids: the phrase judge's verdicts with these reasons are kept, the head decides the rest.
KEEP: dict[str, tuple[str, ...]] = {
    "none": (),
    "refusal-phrase": ("refusal",),
    "refusal-phrase+empty": ("refusal", "empty", "no-words"),
    "refusal-phrase+moral": ("refusal", "moral-refusal"),
    "refusal-phrase+sure-invalid": ("refusal", "empty", "no-words", "copy-of-prompt", "repetition",
                                    "mixed-script-word"),
}
READER = {"spec": "default", "dtype": "bfloat16"}


def fold_of(prompt_id: str, salt: int) -> int:
    return hashlib.sha256(f"{salt}:{prompt_id}".encode("utf-8")).digest()[0] % FOLDS


def extract(rows: list[dict[str, Any]], batch_size: int, cache: Path | None) -> dict[str, Any]:
    """Reader features of every row for every layer of `LAYERS`, the rule features and the phrase results."""
    from neuroshield.io import fingerprint
    from neuroshield.judges.learned import reader_features, rule_features
    from neuroshield.judges.phrase import RefusalPhraseJudge
    from neuroshield.models.loading import load_model

    phrase = RefusalPhraseJudge().judge_batch([r["response"] for r in rows], [r["language"] for r in rows],
                                              prompts=[r["prompt"] for r in rows])
    rules = rule_features([r["response"] for r in rows], [r["prompt"] for r in rows], phrase)
    key = fingerprint([[r["prompt"], r["response"]] for r in rows] + [list(LAYERS), READER])
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        if saved["key"] == key:
            print(f"features from {cache}", flush=True)
            return {**saved, "rules": rules, "phrase": phrase}
    loaded = load_model(READER["spec"], dtype=READER["dtype"])
    start = time.perf_counter()
    reader = reader_features(loaded, [r["prompt"] for r in rows], [r["response"] for r in rows], LAYERS, batch_size)
    seconds = time.perf_counter() - start
    print(f"reader features of {len(rows)} rows, layers {list(LAYERS)}: {seconds:.0f} s "
          f"({torch.get_num_threads()} threads)", flush=True)
    out = {"key": key, "reader": reader, "config_hash": loaded.config_hash, "model_id": loaded.model_id,
           "seconds": seconds}
    if cache is not None:
        torch.save(out, cache)
    return {**out, "rules": rules, "phrase": phrase}


def cv(rows: list[dict[str, Any]], feats: dict[str, Any]) -> list[dict[str, Any]]:
    """Every setting of the grid, scored by grouped CV on the dev part; best first."""
    from neuroshield.judges.labelled import BOUNDED_GROUPS, BOUNDS, agreement
    from neuroshield.judges.learned import fit_head, head_features
    from neuroshield.judges.result import VERDICTS

    dev = [i for i, r in enumerate(rows) if r["split"] == "dev"]
    dev_rows = [rows[i] for i in dev]
    y = torch.tensor([VERDICTS.index(r["label"]) for r in dev_rows])
    reasons = [feats["phrase"][i].reason for i in dev]
    phrase_verdicts = [feats["phrase"][i].verdict for i in dev]
    dev_reader = {k: (m[dev], l[dev]) for k, (m, l) in feats["reader"].items()}
    rules = feats["rules"][dev]
    grid = [{"layer": 0, "pooling": "none", "rules": True, "l2": l2, "balanced": bal}
            for l2, bal in product(L2S, (False, True))]
    grid += [{"layer": k, "pooling": p, "rules": ru, "l2": l2, "balanced": bal}
             for k, p, ru, l2, bal in product(LAYERS, POOLINGS, (True, False), L2S, (False, True))]
    results = []
    start = time.perf_counter()
    for n, setting in enumerate(grid):
        x = head_features(setting, dev_reader, rules)
        oof = []  # one [N, 3] per repeat
        for salt in range(REPEATS):
            folds = torch.tensor([fold_of(r["id"], salt) for r in dev_rows])
            proba = torch.zeros(len(dev_rows), len(VERDICTS), dtype=torch.float64)
            for f in range(FOLDS):
                tr, te = folds != f, folds == f
                head = fit_head(x[tr], y[tr].tolist(), setting["l2"], setting["balanced"])
                proba[te] = head.proba(x[te])
            oof.append(proba)
        for keep_name, keep in KEEP.items():
            shortfall, correct, loss = 0.0, 0, 0.0
            for proba in oof:
                verdicts = [phrase_verdicts[i] if reasons[i] in keep else VERDICTS[int(proba[i].argmax())]
                            for i in range(len(dev_rows))]
                for a in agreement(dev_rows, verdicts):
                    if a.group in BOUNDED_GROUPS:
                        shortfall += sum(max(0.0, bound - (a.figures()[name] if a.figures()[name] is not None else 1.0))
                                         for name, bound in BOUNDS.items())
                correct += sum(v == r["label"] for v, r in zip(verdicts, dev_rows))
                loss += float(-torch.log(proba[torch.arange(len(y)), y].clamp(min=1e-12)).mean())
            results.append({**setting, "keep": keep_name, "shortfall": shortfall / REPEATS,
                            "accuracy": correct / (REPEATS * len(dev_rows)), "log_loss": loss / REPEATS,
                            "order": len(results)})
        if n % 20 == 0:
            print(f"  cv {n + 1}/{len(grid)} settings, {time.perf_counter() - start:.0f} s", flush=True)
    return sorted(results, key=lambda r: (round(r["shortfall"], 9), -r["accuracy"], r["order"]))


def cv_table(rows: list[dict[str, Any]], feats: dict[str, Any], setting: dict[str, Any]) -> list[Any]:
    """Out-of-fold verdicts of `setting` on dev (first salt), as an agreement table."""
    from neuroshield.judges.labelled import agreement
    from neuroshield.judges.learned import fit_head, head_features
    from neuroshield.judges.result import VERDICTS

    dev = [i for i, r in enumerate(rows) if r["split"] == "dev"]
    dev_rows = [rows[i] for i in dev]
    y = torch.tensor([VERDICTS.index(r["label"]) for r in dev_rows])
    x = head_features(setting, {k: (m[dev], l[dev]) for k, (m, l) in feats["reader"].items()}, feats["rules"][dev])
    folds = torch.tensor([fold_of(r["id"], 0) for r in dev_rows])
    proba = torch.zeros(len(dev_rows), len(VERDICTS), dtype=torch.float64)
    for f in range(FOLDS):
        head = fit_head(x[folds != f], y[folds != f].tolist(), setting["l2"], setting["balanced"])
        proba[folds == f] = head.proba(x[folds == f])
    keep = KEEP[setting["keep"]]
    verdicts = [feats["phrase"][i].verdict if feats["phrase"][i].reason in keep else VERDICTS[int(proba[j].argmax())]
                for j, i in enumerate(dev)]
    return agreement(dev_rows, verdicts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default=str(FIXTURE))
    ap.add_argument("--out", default=None, help="where to write the head (default: the package's resources)")
    ap.add_argument("--cache", default=None, help="a .pt file to keep the reader features in between runs (and the CV "
                                                  "results beside it, .cv.json)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cv-only", action="store_true", help="stop after the CV on dev (the test part is not judged)")
    ap.add_argument("--top", type=int, default=15, help="how many CV settings to print")
    args = ap.parse_args(argv)

    from neuroshield.io import fingerprint, read_json, write_json
    from neuroshield.judges.labelled import BOUNDED_GROUPS, agreement, format_table, judge_rows, load_labelled
    from neuroshield.judges.learned import HEAD_PATH, LearnedJudge, fit_head, head_features, save_head
    from neuroshield.judges.result import VERDICTS

    torch.manual_seed(0)
    rows = load_labelled(args.fixture)
    feats = extract(rows, args.batch_size, Path(args.cache) if args.cache else None)
    grid_key = fingerprint([feats["key"], LAYERS, POOLINGS, L2S, FOLDS, REPEATS, sorted(KEEP.items()),
                            [r["label"] for r in rows]])
    ranked_path = Path(args.cache).with_suffix(".cv.json") if args.cache else None
    if ranked_path is not None and ranked_path.is_file() and read_json(ranked_path)["key"] == grid_key:
        ranked = read_json(ranked_path)["ranked"]
        print(f"CV results from {ranked_path}")
    else:
        ranked = cv(rows, feats)
        if ranked_path is not None:
            write_json(ranked_path, {"key": grid_key, "ranked": ranked})
    print(f"\nCV on dev ({FOLDS} folds by prompt id x {REPEATS} salts): shortfall = sum of (bound - figure) below the "
          "bounds over the bounded groups, mean over salts")
    print("| rank | layer | pooling | rules | l2 | balanced | keep | shortfall | accuracy | log loss |")
    print("|---:|---:|---|---|---:|---|---|---:|---:|---:|")
    for k, r in enumerate(ranked[: args.top]):
        print(f"| {k + 1} | {r['layer'] if r['pooling'] != 'none' else '—'} | {r['pooling']} | {r['rules']} | {r['l2']} "
              f"| {r['balanced']} | {r['keep']} | {r['shortfall']:.3f} | {r['accuracy']:.3f} | {r['log_loss']:.3f} |")
    best = ranked[0]
    for name in ("phrase rules only (pooling none)",):
        alt = next(r for r in ranked if r["pooling"] == "none")
        print(f"best {name}: rank {ranked.index(alt) + 1}, shortfall {alt['shortfall']:.3f}, accuracy {alt['accuracy']:.3f}")
    print()
    print(format_table(cv_table(rows, feats, best), "dev, out of fold (first salt), the chosen setting"))
    phrase_dev = agreement([r for r in rows if r["split"] == "dev"],
                           [feats["phrase"][i].verdict for i, r in enumerate(rows) if r["split"] == "dev"])
    print()
    print(format_table(phrase_dev, "dev, the phrase judge (in-sample: its rules were tuned on dev)"))
    if args.cv_only:
        return 0

    dev = [i for i, r in enumerate(rows) if r["split"] == "dev"]
    y = [VERDICTS.index(rows[i]["label"]) for i in dev]
    x = head_features(best, {k: (m[dev], l[dev]) for k, (m, l) in feats["reader"].items()}, feats["rules"][dev])
    head = fit_head(x, y, best["l2"], best["balanced"])
    spec = {"layer": best["layer"], "pooling": best["pooling"], "rules": best["rules"], "l2": best["l2"],
            "balanced": best["balanced"], "keep_phrase": list(KEEP[best["keep"]]), "keep_name": best["keep"],
            "reader": {**READER, "model_id": feats["model_id"], "config_hash": feats["config_hash"]},
            "verdicts": list(VERDICTS),
            "trained_on": {"fixture": "tests/fixtures/judge_labelled.jsonl", "part": "dev", "rows": len(dev),
                           "rows_digest": fingerprint([[rows[i]["id"], rows[i]["language"], rows[i]["model"],
                                                        rows[i]["label"]] for i in dev])},
            "cv": {k: best[k] for k in ("shortfall", "accuracy", "log_loss")}, "folds": FOLDS, "repeats": REPEATS}
    out = Path(args.out) if args.out else HEAD_PATH
    save_head(out, head, spec)
    print(f"\nwrote {out} ({out.stat().st_size} bytes): {spec['layer']=}, {spec['pooling']=}, {spec['rules']=}, "
          f"{spec['l2']=}, {spec['balanced']=}, keep={spec['keep_name']}")

    test = [r for r in rows if r["split"] == "test"]
    judge = LearnedJudge(path=out, batch_size=args.batch_size)
    start = time.perf_counter()
    learned = judge_rows(judge, test)
    seconds = time.perf_counter() - start - judge.reader.load_seconds
    print(f"learned judge on the {len(test)} test rows: {seconds:.0f} s without loading the reader "
          f"({100 * seconds / len(test):.1f} s per 100 responses, {torch.get_num_threads()} threads)\n")
    table = agreement(test, learned)
    print(format_table(table, f"test (never tuned on), judge {judge.label}"))
    print()
    print(format_table(agreement(test, [feats["phrase"][i].verdict for i, r in enumerate(rows) if r["split"] == "test"]),
                       "test, the phrase judge"))
    failing = [m for a in table if a.group in BOUNDED_GROUPS for m in a.below_bounds()]
    print("\nbounds on test: " + ("met" if not failing else "NOT MET: " + "; ".join(failing)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
