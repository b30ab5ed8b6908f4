"""Which neuron sets move refusal when suppressed? A screen over scoring methods, ρ and modes.

Issue 4 asks what to try when suppressing the MS set does not beat a random control. Full answers for
every (method, ρ, mode) cost minutes each on a CPU, so this script screens with short answers
(`--max-new-tokens`, 12 by default: refusals show in the first words) and the refusal-phrase judge (one verdict
per answer: refusal, compliance or invalid), or with the fast refusal score (`--judge logprob`: the log-odds of
refusal vs compliance openers at the first answer position, `neuroshield.judges.logprob.refusal_score`; one
forward pass, no generation), on **held-in** prompts only (the split identify used; the held-out prompts stay
for `neuroshield validate`).
For each set it reports the mean judge score, the refusal rate and (phrase judge) the invalid share with no
intervention, with the set, and with `--controls` random sets of the same count per layer, plus the same
on benign prompts (a set that also makes benign prompts "refused", or invalid, is breaking the model, not
safety).

    python experiments/validation_search.py --stats runs/quick/identify/stats --language en \
        --out experiments/results/validation_search.json

The statistics folder is the `stats/` of an identify run (any model spec given with --model must match).
Answers go through the generation cache (`--cache`, default `runs/validation-search/generations.jsonl`, keyed by
the model, the set and mode in force and the prompt), so a rerun or a wider screen generates only what it lacks.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--stats", required=True, help="stats/ folder of an identify run")
    ap.add_argument("--language", default="en")
    ap.add_argument("--methods", default="plnd,precise-shield,mean-diff,t-stat")
    ap.add_argument("--rhos", default="0.03,0.1")
    ap.add_argument("--modes", default="zero,mean:benign",
                    help="zero | scale:a | mean:benign (the language's benign mean from the statistics)")
    ap.add_argument("--harmful", default="xsafety:Crimes_And_Illegal_Activities,Unsafe_Instruction_Topic",
                    help="harmful prompt source (the pipeline configs' plain-harmful XSafety categories)")
    ap.add_argument("--kind", choices=["ms", "ss"], default="ms",
                    help="ms: MS(language); ss: SS(language) = MS(--high-resource) ∩ MS(language)")
    ap.add_argument("--high-resource", default="en")
    ap.add_argument("--prompts", type=int, default=32, help="held-in harmful prompts")
    ap.add_argument("--benign", type=int, default=16, help="held-in benign prompts (parallel benign set)")
    ap.add_argument("--controls", type=int, default=1)
    ap.add_argument("--judge", choices=["phrase", "logprob"], default="phrase",
                    help="phrase: generate --max-new-tokens greedily and apply the refusal-phrase judge; logprob: the "
                         "fast refusal score (one forward pass per batch, no generation)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="experiments/results/validation_search.json")
    ap.add_argument("--cache", default="runs/validation-search/generations.jsonl",
                    help="generation cache (neuroshield.generate.cache): a rerun generates only what it lacks")
    args = ap.parse_args(argv)

    from neuroshield.data.loaders import load_prompts
    from neuroshield.data.templates import load_parallel_benign
    from neuroshield.generate.cache import GenerationCache, cached_generate, model_key
    from neuroshield.generate.generation import GenerationConfig
    from neuroshield.io import fingerprint
    from neuroshield.intervene.interventions import intervene
    from neuroshield.judges.registry import get_judge, judge_info, judge_responses, result_verdict
    from neuroshield.models import load_model
    from neuroshield.intervene.validate import set_fingerprint
    from neuroshield.neurons.neuronset import random_like
    from neuroshield.neurons.selection import language_set, shared_sets
    from neuroshield.neurons.splits import limit_per_group, select_split
    from neuroshield.neurons.stats import ActivationStats

    lang = args.language
    loaded = load_model(args.model)
    stats = ActivationStats.load(args.stats)
    harmful = limit_per_group(select_split(load_prompts(args.harmful, languages=[lang], label="harmful"), "held-in"),
                              args.prompts, args.seed)
    benign = limit_per_group(select_split([r for r in load_parallel_benign([lang]) if r.label == "benign"],
                                          "held-in"), args.benign, args.seed)
    if args.judge == "logprob":
        judge: Any = get_judge("logprob", loaded, batch_size=args.batch_size)
    else:
        judge = get_judge("refusal-phrase")

    cache = GenerationCache(args.cache)
    weights_key = model_key(loaded)
    gen_config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    def measure(records: list[Any], variant: str) -> dict[str, float]:
        langs = [r.language for r in records]
        if args.judge == "logprob":
            res = judge.judge_prompts([r.text for r in records], langs)
        else:
            answers = [g.text for g in cached_generate(loaded, records, gen_config, cache, weights_key=weights_key,
                                                       variant=variant, task="validation-search", progress=False)]
            res = judge_responses(judge, answers, langs, prompts=[r.text for r in records])
        verdicts = [result_verdict(r) for r in res]
        # mean_score: P(refusal) = sigmoid(refusal log-odds) for the logprob judge; 1 / 0.25 / 0 per answer for
        # the phrase judge
        return {"mean_score": statistics.fmean(r.score for r in res),
                "refusal_rate": verdicts.count("refusal") / len(res),
                "invalid_rate": verdicts.count("invalid") / len(res)}

    def both(variant: str = "none") -> dict[str, dict[str, float]]:
        """`variant`: the intervention in force (its set and mode), a part of the generation cache's key."""
        return {"harmful": measure(harmful, variant), "benign": measure(benign, variant)}

    def variant(ns: Any, spec: str) -> str:
        means = stats.meta.get("data_hashes") if spec.startswith("mean") else None  # what the means were taken from
        return fingerprint({"set": set_fingerprint(ns), "mode": spec, "means": means})

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    base = both()
    print(f"no intervention: {base}", flush=True)
    benign_group = f"{lang}/text/benign"
    for method in args.methods.split(","):
        for rho in (float(r) for r in args.rhos.split(",")):
            ns = language_set(stats, loaded, method, lang, rho=rho, seed=args.seed)
            if args.kind == "ss":
                hr = [h for h in args.high_resource.split(",")]
                ms = {h: language_set(stats, loaded, method, h, rho=rho, seed=args.seed) for h in hr}
                ns = shared_sets({**ms, lang: ns}, hr, loaded)[lang]
            controls = [random_like(ns, loaded, args.seed + 1 + k) for k in range(args.controls)]
            for mode in args.modes.split(","):
                spec = f"mean:{benign_group}" if mode == "mean:benign" else mode
                with intervene(loaded, ns, spec, stats=stats):
                    with_set = both(variant(ns, spec))
                ctrl = []
                for c in controls:
                    with intervene(loaded, c, spec, stats=stats):
                        ctrl.append(both(variant(c, spec)))
                metrics = ("mean_score", "refusal_rate", "invalid_rate")
                row = {"method": method, "rho": rho, "mode": mode, "neurons": len(ns), "set": with_set,
                       "controls": ctrl,
                       "control_mean": {k: {m: statistics.fmean(c[k][m] for c in ctrl) for m in metrics}
                                        for k in ("harmful", "benign")}}
                rows.append(row)
                h, cm = with_set["harmful"], row["control_mean"]["harmful"]
                print(f"{args.kind} {method:15s} rho={rho:<5g} {mode:12s} n={len(ns):5d}  "
                      f"harmful score set {h['mean_score']:.3f} control {cm['mean_score']:.3f} "
                      f"(none {base['harmful']['mean_score']:.3f});  benign set {with_set['benign']['mean_score']:.3f} "
                      f"control {row['control_mean']['benign']['mean_score']:.3f} "
                      f"(none {base['benign']['mean_score']:.3f})", flush=True)
    result = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "model": loaded.model_id,
              "language": lang, "kind": args.kind, "harmful_source": args.harmful, "stats": str(args.stats),
              "harmful_prompts": len(harmful), "benign_prompts": len(benign), "judge": judge_info(judge),
              "max_new_tokens": args.max_new_tokens if args.judge == "phrase" else None, "none": base, "rows": rows,
              "seconds": round(time.perf_counter() - start, 1),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
