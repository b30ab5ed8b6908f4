"""Judge an evaluation's saved responses again with the current judge, without generating anything.

Reads `<eval_dir>/<model>/generations.jsonl` (the responses `evaluate` cached) and `items.jsonl` (which prompts
were judged, with the verdicts of the judge of that time), loads the prompt texts again from the data sets named
in `eval.json`, judges every response with the current judge and writes `<out>/<model>/items.jsonl` with the
new verdicts (the old verdict kept as `old_verdict`). Prints the headline (ASR, invalid share, over-refusal and
exaggerated refusal, English against the pooled other languages, bootstrap 95 % intervals, paired differences)
of the old and the new verdicts, and how many verdicts changed, per model.

    python experiments/rejudge.py --eval runs/quick/evaluate --out /tmp/rejudge-quick

The run folders are only read.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def model_rows(folder: Path) -> list[dict[str, Any]]:
    """The judged safety rows of one model folder, each with its `prompt` and `response`.

    Responses come from the generation cache entries of this evaluation's settings (`eval.json`); prompts from
    its data sources, by (id, language, modality)."""
    from neuroshield.evaluate.evaluate import EvalSuite

    info = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    src = info["data"]["sources"]
    # every id of the sources (split="all"): the prompts are only looked up by the items' keys
    suite = EvalSuite.from_sources(harmful=src.get("harmful", []), benign=src.get("benign", []),
                                   contrast=src.get("contrast", []), split="all")
    prompts = {(r.id, r.language, r.modality): r.text for role in ("harmful", "benign", "contrast")
               for r in getattr(suite, role)}
    max_new = info["settings"]["max_new_tokens"]
    responses: dict[tuple[str, str, str], str] = {}
    for e in _jsonl(folder / "generations.jsonl"):
        if e.get("task") == "safety" and f":max{max_new}:" in e.get("settings", ""):
            key = (e["id"], e["language"], e.get("modality", "text"))
            if key in responses and responses[key] != e["response"]:
                raise ValueError(f"{folder}: two different cached responses for {key}")
            responses[key] = e["response"]
    out = []
    for row in _jsonl(folder / "items.jsonl"):
        if row.get("section") != "safety":
            continue
        key = (row["id"], row["language"], row.get("modality", "text"))
        if key not in responses or key not in prompts:
            raise KeyError(f"{folder}: no cached response or prompt for {key}")
        out.append({**row, "prompt": prompts[key], "response": responses[key]})
    return out


def rejudge(eval_dir: Path, out: Path, judge_name: str = "refusal-phrase") -> dict[str, Counter]:
    """Write `<out>/new/<model>/items.jsonl` (current judge) and `<out>/old/<model>/items.jsonl` (the verdicts as
    saved); returns, per model, a count of (old verdict, new verdict) pairs."""
    from neuroshield.judges.registry import get_judge, judge_responses, result_verdict

    judge = get_judge(judge_name)
    changes: dict[str, Counter] = {}
    for folder in sorted(p for p in eval_dir.iterdir() if (p / "items.jsonl").is_file()):
        rows = model_rows(folder)
        results = judge_responses(judge, [r["response"] for r in rows], [r["language"] for r in rows],
                                  prompts=[r["prompt"] for r in rows])
        new_rows, old_rows = [], []
        for r, x in zip(rows, results):
            base = {k: v for k, v in r.items() if k not in ("prompt", "response", "verdict", "score", "matched")}
            new_rows.append({**base, "verdict": result_verdict(x), "old_verdict": r["verdict"],
                             "reason": x.reason})
            old_rows.append({**base, "verdict": r["verdict"]})
        changes[folder.name] = Counter((r["old_verdict"], r["verdict"]) for r in new_rows)
        for kind, rs in (("new", new_rows), ("old", old_rows)):
            d = out / kind / folder.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "items.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs),
                                           encoding="utf-8")
    return changes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", required=True, help="an evaluation folder: <run>/evaluate (one sub-folder per model)")
    ap.add_argument("--out", required=True, help="where the rejudged items.jsonl go (never inside --eval)")
    ap.add_argument("--judge", default="refusal-phrase")
    args = ap.parse_args(argv)
    from neuroshield.evaluate.headline import format_headline, headline
    from neuroshield.judges.registry import get_judge, judge_label

    eval_dir, out = Path(args.eval).resolve(), Path(args.out).resolve()
    if out == eval_dir or eval_dir in out.parents:
        raise SystemExit("--out must not be inside --eval: the run folders are only read")
    changes = rejudge(eval_dir, out, args.judge)
    print(f"rejudged {eval_dir} with {judge_label(get_judge(args.judge))}\n")
    for model, c in changes.items():
        moved = {f"{a}->{b}": n for (a, b), n in sorted(c.items()) if a != b}
        print(f"{model}: {sum(c.values())} responses, {sum(moved.values())} verdicts changed {moved or ''}")
    for kind, title in (("old", "verdicts as saved (judge of the evaluation)"), ("new", "current judge")):
        print(f"\n**{title}**\n")
        print(format_headline(headline(out / kind)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
