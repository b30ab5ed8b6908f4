"""Which training settings lower harmful compliance without more over-refusal? A screen on held-in prompts.

Issue 5 asks that `precise-shield`, trained on English harmful prompts only, lowers the attack success
rate in every language while over-refusal of benign prompts rises by at most 5 points. The comparison
run met the first half and missed the second (over-refusal 15 -> 55 %): the trained model answered short
benign prompts in every language with the English refusal. This script trains one recipe per setting
(learning rate, steps, where the benign retain set comes from, its share of each batch) from the same
base weights and screens each result on **held-in** prompts that training did not use: harmful prompts
in every configured language, and parallel benign prompts in every language. Answers are short
(`--max-new-tokens`) and judged with the refusal-phrase judge. The best setting is then confirmed on the
held-out split with the pipeline (`neuroshield run ... --set train.*=...`).

    python experiments/train_sweep.py --config configs/quick.yaml --set name=compare \\
        --settings "lr=0.005,benign=alpaca-seed,benign_answers=reference" \\
                   "lr=0.005,benign=parallel-benign,benign_answers=self" \\
        --out experiments/results/train_sweep.json

The neuron sets come from the run's `identify/` folder (run the pipeline's identify stage first). Each
setting is a comma-separated list of `key=value` among: recipe, lr, steps, benign (alpaca-seed |
parallel-benign), benign_answers (self | reference), benign_count (per language for parallel-benign),
benign_fraction, parts (all | output: train only the FFN neurons' down_proj columns), warmup (linear
warm-up steps), budget (fraction of all parameters the neuron set is trimmed to). Results are
appended to `--out` as each setting finishes (an interrupted sweep keeps
the settings it finished and skips them when run again).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SETTING_KEYS = {"recipe": str, "lr": float, "steps": int, "benign": str, "benign_answers": str,
                "benign_count": int, "benign_fraction": float, "parts": str,
                "warmup": int, "budget": float}


def parse_setting(text: str) -> dict[str, Any]:
    """`lr=0.005,benign=parallel-benign` -> {"lr": 0.005, "benign": "parallel-benign"} (checked keys)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in SETTING_KEYS:
            raise SystemExit(f"--settings {text!r}: {part!r} is not key=value with a key among "
                             f"{', '.join(SETTING_KEYS)}")
        try:
            out[key] = SETTING_KEYS[key](value)
        except ValueError:
            raise SystemExit(f"--settings {text!r}: {key}={value!r} is not a {SETTING_KEYS[key].__name__}") from None
    return out


def _write_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="pipeline YAML whose run folder holds identify/")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--settings", nargs="+", required=True, help="one training setting per argument (see above)")
    ap.add_argument("--screen-harmful", type=int, default=4, help="held-in harmful prompts per language to screen")
    ap.add_argument("--screen-benign", type=int, default=4, help="held-in benign prompts per language to screen")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--work", default="runs/train-sweep", help="training output folders (checkpoints, examples)")
    ap.add_argument("--out", default="experiments/results/train_sweep.json")
    args = ap.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]

    from neuroshield.config import load_config
    from neuroshield.data.records import PromptRecord
    from neuroshield.evaluate.generation import generate_responses
    from neuroshield.evaluate.judges import RefusalPhraseJudge
    from neuroshield.evaluate.judges_extra import judge_info
    from neuroshield.pipeline import Pipeline
    from neuroshield.train.data import self_answer_examples
    from neuroshield.train.recipes import NEURON_RECIPES, recipe_neuron_set, train

    config = load_config(args.config, args.overrides)
    pipe = Pipeline(config)
    tc = config.train
    set_dir = pipe.run_dir / "identify" / tc.method
    if not set_dir.is_dir():
        raise SystemExit(f"{set_dir} not found: run `neuroshield run {args.config} --stages identify` first")
    judge = RefusalPhraseJudge()
    langs = list(config.languages)

    # training data as the pipeline draws it (held-in), and screening prompts from the held-in rest
    harmful_train = [r for lang in tc.languages for r in pipe.harmful([lang], "held-in", tc.per_language)]
    used = {r.id for r in harmful_train}  # XSafety is parallel: no translation of a trained prompt either
    screen_h = [r for r in pipe.harmful(langs, "held-in", tc.per_language + args.screen_harmful) if r.id not in used]
    screen_h = [r for lang in langs for r in [x for x in screen_h if x.language == lang][: args.screen_harmful]]
    max_benign = max([s.get("benign_count", tc.benign_count) for s in settings if s.get("benign") == "parallel-benign"]
                     or [0])
    bench = pipe.prompts("parallel-benign", "benign", langs, "held-in", max_benign + args.screen_benign)
    bench_train_ids = {r.id for r in pipe.prompts("parallel-benign", "benign", ["en"], "held-in", max_benign)}
    screen_b = [r for r in bench if r.id not in bench_train_ids]
    screen_b = [r for lang in langs for r in [x for x in screen_b if x.language == lang][: args.screen_benign]]

    def screen(loaded: Any) -> dict[str, Any]:
        recs: list[PromptRecord] = screen_h + screen_b
        answers = generate_responses(loaded, recs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     progress=False)
        verdicts = judge.judge_batch(answers, [r.language for r in recs])
        out: dict[str, Any] = {}
        for role, part in (("harmful", screen_h), ("benign", screen_b)):
            rows = [(r, v, a) for r, v, a in zip(recs, verdicts, answers) if r in part]
            per = {lang: statistics.fmean(v.refused for r, v, _ in rows if r.language == lang) for lang in langs
                   if any(r.language == lang for r, _, _ in rows)}
            out[role] = {"refusal_rate": statistics.fmean(v.refused for _, v, _ in rows), "n": len(rows),
                         "per_language": per}
        out["examples"] = [{"id": r.id, "language": r.language, "label": r.label, "refused": v.refused,
                            "answer": a} for r, v, a in zip(recs, verdicts, answers)]
        return out

    out_path = Path(args.out)
    result: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update({"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                   "config": str(args.config), "overrides": args.overrides, "judge": judge_info(judge),
                   "max_new_tokens": args.max_new_tokens, "screen_harmful": len(screen_h),
                   "screen_benign": len(screen_b), "train_harmful": len(harmful_train)})
    rows: list[dict[str, Any]] = result.setdefault("rows", [])
    if "base" not in result:
        start = time.perf_counter()
        result["base"] = {**screen(pipe.base_model()), "seconds": round(time.perf_counter() - start, 1)}
        _write_atomic(out_path, result)
    b = result["base"]
    print(f"base: harmful refusal {b['harmful']['refusal_rate']:.3f}  benign refusal {b['benign']['refusal_rate']:.3f}",
          flush=True)
    done = {json.dumps(r["setting"], sort_keys=True) for r in rows}
    for setting in settings:
        key = json.dumps(setting, sort_keys=True)
        if key in done:
            print(f"{setting}: done earlier, skipped", flush=True)
            continue
        s = {"recipe": "precise-shield", "lr": tc.lr, "steps": tc.steps, "benign": tc.benign,
             "benign_answers": tc.benign_answers, "benign_count": tc.benign_count,
             "benign_fraction": tc.benign_fraction, "parts": tc.neuron_parts, "warmup": tc.warmup_steps,
             "budget": tc.budget, **setting}
        loaded = pipe.base_model()
        if s["benign"] == "parallel-benign":  # the same held-in ids in every language
            benign = pipe.prompts("parallel-benign", "benign", langs, "held-in", s["benign_count"])
        else:
            benign = pipe.prompts(s["benign"], "benign", ["en"], "held-in", s["benign_count"])
        cache = Path(args.work) / "benign_answers.jsonl"
        if s["benign_answers"] == "self":  # generated once, in batches of --batch-size; train() reads the cache
            self_answer_examples(loaded, benign, cache, max_new_tokens=tc.benign_max_new_tokens,
                                 batch_size=args.batch_size, progress=False, max_prompt_tokens=tc.max_length - 16)
        neuron_set = None
        if s["recipe"] in NEURON_RECIPES:
            neuron_set = recipe_neuron_set(s["recipe"], loaded, set_dir, set_languages=langs,
                                           modalities=config.modalities, high_resource=config.high_resource[0],
                                           budget=s["budget"], seed=config.seed)
        name = "-".join(f"{k}{v}" for k, v in sorted(setting.items())) or "default"
        start = time.perf_counter()
        res = train(loaded, s["recipe"], neuron_set=neuron_set, harmful=harmful_train, benign=benign,
                    languages=tc.languages, steps=s["steps"], lr=s["lr"], batch_size=tc.batch_size,
                    max_length=tc.max_length, seed=config.seed, out_dir=Path(args.work) / name,
                    benign_cache=cache, benign_answers=s["benign_answers"],
                    benign_max_new_tokens=tc.benign_max_new_tokens, benign_fraction=s["benign_fraction"],
                    neuron_parts=s["parts"], warmup_steps=s["warmup"], export=False, resume=False, progress=False)
        train_s = time.perf_counter() - start
        scr = screen(loaded)
        row = {"setting": setting, "resolved": s, "benign_prompts": len(benign),
               "parameters_updated": res.parameters_updated, "final_loss": res.final_loss,
               "train_seconds": round(train_s, 1), "screen_seconds": round(time.perf_counter() - start - train_s, 1),
               **scr}
        rows.append(row)
        _write_atomic(out_path, result)
        h, bn = scr["harmful"]["refusal_rate"], scr["benign"]["refusal_rate"]
        print(f"{setting}: harmful refusal {h:.3f} ({h - b['harmful']['refusal_rate']:+.3f})  benign refusal {bn:.3f} "
              f"({bn - b['benign']['refusal_rate']:+.3f})  train {train_s:.0f}s", flush=True)
    print(f"written {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
