"""Which training settings lower harmful compliance without more over-refusal? A screen on held-in prompts.

Issue 5 asks that `precise-shield`, trained on English harmful prompts only, lowers the attack success
rate in every language while over-refusal of benign prompts rises by at most 5 points. The comparison
run met the first half and missed the second (over-refusal 15 -> 55 %): the trained model answered short
benign prompts in every language with the English refusal. This script trains one recipe per setting
(learning rate, steps, where the benign retain set comes from, its share of each batch) from the same
base weights and screens each result on **held-in** prompts that training did not use: harmful prompts
in every configured language, and parallel benign prompts in every language. Answers are short
(`--max-new-tokens`) and judged with the refusal-phrase judge (one verdict per answer: refusal, compliance or
invalid; the row keeps the refusal rate, the ASR = compliance share and the invalid share), and every prompt
also gets the fast refusal score (`neuroshield.judges.logprob.refusal_score`: log-odds of refusal vs
compliance openers, one forward pass, no generation; `mean_refusal_log_odds`), so that settings can be screened
without generating. The best setting is then confirmed on the held-out split with the pipeline
(`neuroshield run ... --set train.*=...`).

    python experiments/train_sweep.py --config configs/quick.yaml --set name=compare \\
        --settings "lr=0.005" "lr=0.005 steps=30 benign_answers=self" \\
        --out experiments/results/train_sweep.json

The neuron sets come from the run's `identify/` folder (run the pipeline's identify stage first). Each
setting is a space-separated list of `train.<key>=<value>` overrides of the config, `train.` left out
(`lr=0.002 steps=48 warmup_steps=6`, `benign=parallel-benign benign_languages=[en,zh]`); every setting
trains through the pipeline's own `train_recipe`, so it is exactly what `neuroshield run ... --set
train.<key>=<value>` would train. Results are appended to `--out` as each setting finishes (an
interrupted sweep keeps the settings it finished and skips them when run again).
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


def parse_setting(text: str) -> dict[str, Any]:
    """`lr=0.005 benign_languages=[en,zh]` -> {"lr": 0.005, "benign_languages": ["en", "zh"]} (values as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SystemExit(f"--settings {text!r}: {part!r} is not key=value (a train.<key> of the config)")
        out[key] = yaml.safe_load(value)
    return out


def _write_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _last_per_language(records: list[Any], langs: list[str], n: int, seed: int) -> list[Any]:
    """The `n` last-ranked records per language under `limit_per_group`'s ranking (training picks the first)."""
    from neuroshield.neurons.splits import limit_per_group

    out = []
    for lang in langs:
        group = [r for r in records if r.language == lang]
        # count ids, not records: with the image modality every id has a text and an image record
        first = {r.id for r in limit_per_group(group, max(0, len({r.id for r in group}) - n), seed)}
        out += [r for r in group if r.id not in first]
    return out


def _ref(r: Any) -> dict[str, str]:
    """What an example row records of its prompt."""
    return {"id": r.id, "language": r.language, "label": r.label, "modality": r.modality}


def _key(e: dict[str, Any]) -> str:
    # rows written before the modality was recorded are text
    return f"{e['label']}/{e['language']}/{e.get('modality', 'text')}/{e['id']}"


def _verdict(e: dict[str, Any]) -> str:
    """An example's verdict; examples recorded before the three verdicts have only `refused`."""
    return e.get("verdict") or ("refusal" if e["refused"] else "compliance")


def _rates(examples: list[dict[str, Any]], langs: list[str]) -> dict[str, Any]:
    """Per label (harmful, benign): refusal rate overall and per language, ASR (compliance share), invalid share
    and the mean fast refusal score (where recorded), of judged examples."""
    out: dict[str, Any] = {}
    nan = float("nan")
    for role in ("harmful", "benign"):
        rows = [e for e in examples if e["label"] == role]

        def share(verdict: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.fmean(_verdict(e) == verdict for e in rows) if rows else nan

        per = {lang: statistics.fmean(_verdict(e) == "refusal" for e in rows if e["language"] == lang) for lang in langs
               if any(e["language"] == lang for e in rows)}
        scores = [e["refusal_log_odds"] for e in rows if e.get("refusal_log_odds") is not None]
        out[role] = {"refusal_rate": share("refusal"), "asr": share("compliance"), "invalid_rate": share("invalid"),
                     "mean_refusal_log_odds": statistics.fmean(scores) if scores else None,
                     "n": len(rows), "per_language": per}
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """One line per row: setting, parameters, refusal (%) at each screened step and its change from the base
    model on the same prompts, training seconds."""
    lines = ["| setting (train.<key>=value) | parameters | harmful refusal, base -> by step (Δ at end) | "
             "benign refusal, base -> by step (Δ at end) | train s |", "|---|---|---|---|---|"]
    for row in result.get("rows", []):
        if "base" not in row:
            continue
        cells = []
        for role in ("harmful", "benign"):
            base = 100 * row["base"][role]["refusal_rate"]
            steps = row.get("trajectory") or [{"step": row["train"]["steps"], role: row[role]}]
            path = ", ".join(f"{t['step']}: {100 * t[role]['refusal_rate']:.1f}" for t in steps)
            cells.append(f"{base:.1f} -> {path} ({100 * row[role]['refusal_rate'] - base:+.1f})")
        setting = " ".join(f"{k}={json.dumps(v).replace(' ', '')}" for k, v in row["setting"].items())
        lines.append(f"| {setting} | {row['parameters_updated']:,} | {cells[0]} | {cells[1]} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="pipeline YAML whose run folder holds identify/ (required unless --table)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--settings", nargs="+", help="one training setting per argument (see above)")
    ap.add_argument("--table", action="store_true", help="print the rows of --out as a Markdown table and stop")
    ap.add_argument("--recipe", default="precise-shield")
    ap.add_argument("--screen-harmful", type=int, default=4, help="held-in harmful prompts per language to screen")
    ap.add_argument("--screen-benign", type=int, default=4, help="held-in benign prompts per language to screen")
    ap.add_argument("--screen-at", default="", help="also screen at these steps during training, e.g. 12,24 "
                    "(the row's `trajectory`; the final step is always screened)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--work", default="runs/train-sweep", help="training output folders (checkpoints, examples)")
    ap.add_argument("--out", default="experiments/results/train_sweep.json")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    if not args.settings or not args.config:
        ap.error("--config and --settings are required (or --table)")
    settings = [parse_setting(s) for s in args.settings]
    try:
        screen_at = sorted({int(x) for x in args.screen_at.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--screen-at {args.screen_at!r}: give step numbers separated by commas, e.g. 12,24") from None

    from neuroshield.config import load_config
    from neuroshield.generate.generation import generate_responses
    from neuroshield.judges.logprob import refusal_score
    from neuroshield.judges.registry import get_judge, judge_info, judge_responses, result_verdict
    from neuroshield.pipeline import Pipeline

    def pipeline(setting: dict[str, Any]) -> Pipeline:
        return Pipeline(load_config(args.config, [*args.overrides,
                                                  *(f"train.{k}={json.dumps(v)}" for k, v in setting.items())]))

    pipes = [pipeline(s) for s in settings]
    base_pipe = pipeline({})
    config = base_pipe.config
    if not (base_pipe.run_dir / "identify" / config.train.method).is_dir():
        raise SystemExit(f"{base_pipe.run_dir / 'identify'} has no {config.train.method} sets: run "
                         f"`neuroshield run {args.config} --stages identify` first")
    judge = get_judge("refusal-phrase")
    langs = list(config.languages)

    # screening prompts: held-in, the *last* ones of the split's ranking in every language, so that they are
    # the same whatever the settings (training takes the first ones); no id any setting trains on (XSafety and
    # the benign set are parallel, so not a translation of a trained prompt either)
    data = [p.train_data() for p in pipes]
    pool_h = base_pipe.harmful(langs, "held-in", None)
    pool_b = base_pipe.prompts("parallel-benign", "benign", langs, "held-in", None)
    screen_h = _last_per_language(pool_h, langs, args.screen_harmful, config.seed)
    screen_b = _last_per_language(pool_b, langs, args.screen_benign, config.seed)
    screened = {r.id for r in screen_h + screen_b}
    for setting, (h, bn) in zip(settings, data):
        clash = sorted({r.id for r in h + bn} & screened)
        if clash:
            raise SystemExit(f"setting {setting}: trains on {len(clash)} screened prompt(s) ({clash[0]}, ...): lower "
                             "per_language / benign_count or --screen-harmful / --screen-benign")

    def screen(loaded: Any, recs: list[Any] | None = None) -> dict[str, Any]:
        recs = screen_h + screen_b if recs is None else recs
        answers = generate_responses(loaded, recs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     progress=False)
        langs_ = [r.language for r in recs]
        verdicts = judge_responses(judge, answers, langs_, prompts=[r.text for r in recs])
        scores = refusal_score(loaded, recs, langs_, args.batch_size)
        examples = [{**_ref(r), "verdict": result_verdict(v), "refusal_log_odds": round(sc, 4), "answer": a}
                    for r, v, sc, a in zip(recs, verdicts, scores, answers)]
        return {**_rates(examples, langs), "examples": examples}

    out_path = Path(args.out)
    result: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update({"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                   "config": str(args.config), "overrides": args.overrides, "recipe": args.recipe,
                   "judge": judge_info(judge), "max_new_tokens": args.max_new_tokens,
                   "screen_harmful": len(screen_h), "screen_benign": len(screen_b)})
    rows: list[dict[str, Any]] = result.setdefault("rows", [])
    # the base model's answer to every prompt any row screened: each row is compared with the base model on its
    # own prompts (rows of earlier versions of this script screened other benign prompts)
    base_settings = {"model": config.model, "max_new_tokens": args.max_new_tokens, "judge": judge_info(judge)}
    if result.get("base_settings") != base_settings:  # answers of another model / length: not comparable
        result["base_answers"] = {}
        result["base_settings"] = base_settings
    base_answers: dict[str, Any] = result.setdefault("base_answers", {})
    pool = {_key(_ref(r)): r for r in pool_h + pool_b}
    wanted = [_key(_ref(r)) for r in screen_h + screen_b] + [_key(e) for row in rows for e in row["examples"]]
    missing = [pool[k] for k in dict.fromkeys(wanted) if k not in base_answers and k in pool]
    if missing:
        start = time.perf_counter()
        for e in screen(base_pipe.base_model(), missing)["examples"]:
            base_answers[_key(e)] = {"verdict": e["verdict"], "refusal_log_odds": e["refusal_log_odds"],
                                     "answer": e["answer"]}
        print(f"base answers to {len(missing)} prompts: {time.perf_counter() - start:.0f}s", flush=True)
    for row in rows:
        if all(_key(e) in base_answers for e in row["examples"]):
            row["base"] = _rates([{**e, **base_answers[_key(e)]} for e in row["examples"]], langs)
        else:  # screened prompts outside this config's pools (other languages, sources or split)
            row.pop("base", None)
            print(f"{row['setting']}: its prompts are not in this config's held-in pools; no base figure", flush=True)
    result["base"] = _rates([{**_ref(r), **base_answers[_key(_ref(r))]}
                             for r in screen_h + screen_b], langs)
    _write_atomic(out_path, result)
    b = result["base"]
    print(f"base: harmful refusal {b['harmful']['refusal_rate']:.3f}  benign refusal {b['benign']['refusal_rate']:.3f}",
          flush=True)
    done = {json.dumps(r["setting"], sort_keys=True) for r in rows}
    for setting, pipe, (harmful, benign) in zip(settings, pipes, data):
        if json.dumps(setting, sort_keys=True) in done:
            print(f"{setting}: done earlier, skipped", flush=True)
            continue
        name = "-".join(f"{k}{v}" for k, v in sorted(setting.items())).replace(" ", "") or "default"
        start = time.perf_counter()
        trajectory: list[dict[str, Any]] = []
        screened_s = 0.0
        steps = pipe.config.train.steps

        def on_step(step: int, rec: dict[str, float]) -> None:
            nonlocal screened_s
            if step in screen_at and step < steps:
                t0 = time.perf_counter()
                scr_mid = screen(loaded)
                trajectory.append({"step": step, "loss": rec["loss"], **{k: scr_mid[k] for k in ("harmful", "benign")}})
                screened_s += time.perf_counter() - t0
                print(f"  step {step}: harmful refusal {scr_mid['harmful']['refusal_rate']:.3f}  benign refusal "
                      f"{scr_mid['benign']['refusal_rate']:.3f}", flush=True)

        loaded = pipe.base_model()  # trained in place: on_step screens it as it is at that step
        loaded, res = pipe.train_recipe(args.recipe, Path(args.work) / name, resume=False, export=False,
                                        progress=False, loaded=loaded, on_step=on_step)
        train_s = time.perf_counter() - start - screened_s
        scr = screen(loaded)
        trajectory.append({"step": steps, "loss": res.final_loss, **{k: scr[k] for k in ("harmful", "benign")}})
        row = {"setting": setting, "train": pipe.config.train.__dict__, "train_harmful": len(harmful),
               "benign_prompts": len(benign), "parameters_updated": res.parameters_updated,
               "final_loss": res.final_loss, "train_seconds": round(train_s, 1),
               "screen_seconds": round(time.perf_counter() - start - train_s, 1), **scr,
               "trajectory": trajectory, "base": b}
        rows.append(row)
        _write_atomic(out_path, result)
        h, bn = scr["harmful"]["refusal_rate"], scr["benign"]["refusal_rate"]
        print(f"{setting}: harmful refusal {h:.3f} ({h - b['harmful']['refusal_rate']:+.3f}), ASR "
              f"{scr['harmful']['asr']:.3f}, invalid {scr['harmful']['invalid_rate']:.3f}  benign refusal {bn:.3f} "
              f"({bn - b['benign']['refusal_rate']:+.3f}), invalid {scr['benign']['invalid_rate']:.3f}  "
              f"train {train_s:.0f}s", flush=True)
    print(f"written {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
