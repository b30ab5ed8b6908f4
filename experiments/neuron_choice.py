"""Why the chosen neurons do not beat random sets (issue 18): precise-shield's set against controls that each take
one property away, all at the same budget, trained with the same data and settings, scored on the same prompts.

    python experiments/neuron_choice.py --config configs/transfer.yaml

Variants (each trained from the base weights with precise-shield's settings of the config, all 36 steps, no step
selection, like the budget curve's points):

* `chosen`: precise-shield's set as the run trains it (the config's `train.method` scores, its identify groups,
  trimmed to `train.budget`);
* `random`: `random_like(chosen)`: the same count at every layer, units drawn at random (the main table's control);
* `random-flat`: `random_flat(chosen)`: the same count, spread evenly over the layers (the layer profile taken away);
* `method-<other>`: the set the other identify method's scores give (plnd <-> precise-shield), same trim and budget,
  and `random-method-<other>`, its own same-profile control;
* `benign-contrast`: identify run again with the contrast set's held-in part (safe requests that sound dangerous)
  as the benign group instead of the config's, then the same recipe; and `random-benign-contrast`, its control.

Set size is the budget curve's question (`budget.recipes: [precise-shield, random]`).

Measure: the fast refusal score (`evaluate.budget.score_point`, no generation) on HELD-IN prompts that no stage of
the run trains on or identifies with, in every language of the config (a diagnostic must not read the evaluation
split: a default it changes would then be tuned on it): `--harmful` harmful prompts and `--contrast` contrast prompts
per language. ASR by score and exaggerated refusal by score per language group with bootstrap 95 % intervals, and
each variant against `chosen` and against `random`, paired on the same prompts.

Each variant is cached in `<run>/neuron_choice/<variant>/point.json` under a fingerprint of everything that made it;
an interrupted run goes on where it stopped. Writes `--out` (JSON) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from neuroshield import __version__
from neuroshield.config import load_config
from neuroshield.data.records import PromptRecord
from neuroshield.evaluate.budget import language_groups, paired_scores, score_point
from neuroshield.evaluate.headline import percent as pct
from neuroshield.io import fingerprint, read_json, records_fingerprint, write_json
from neuroshield.neurons.neuronset import NeuronSet, random_flat, random_like
from neuroshield.neurons.splits import limit_per_group
from neuroshield.pipeline import Pipeline
from neuroshield.settings import BENIGN_CACHE
from neuroshield.train.recipes import RecipeRun, recipe_neuron_set, recipe_settings

RECIPE = "precise-shield"
OTHER_METHOD = {"plnd": "precise-shield", "precise-shield": "plnd"}


def variant_names(method: str) -> list[str]:
    other = OTHER_METHOD[method]
    return ["base", "chosen", "random", "random-flat", f"method-{other}", f"random-method-{other}", "benign-contrast",
            "random-benign-contrast"]


def diagnostic_prompts(pipe: Pipeline, harmful_per_language: int, contrast_per_language: int,
                       used: set[str]) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Held-in harmful and contrast prompts of every language of the run whose ids (in any language) no stage used."""
    c = pipe.config
    pool = [r for r in pipe.prompts(c.identify.harmful[0], "harmful", c.languages, "held-in", None) if r.id not in used]
    scary = [r for r in pipe.prompts("contrast", "benign", c.languages, "held-in", None) if r.id not in used]
    return limit_per_group(pool, harmful_per_language, c.seed), limit_per_group(scary, contrast_per_language, c.seed)


def identify_prompt_ids(pipe: Pipeline) -> set[str]:
    return {r.id for recs in pipe.identify_prompts() for r in recs}


def set_digest(ns: NeuronSet) -> str:
    h = hashlib.sha256()
    for key, idx in ns.units.items():
        h.update(key.encode() + idx.numpy().tobytes())
    return h.hexdigest()[:16]


def set_summary(ns: NeuronSet, chosen: NeuronSet | None) -> dict[str, Any]:
    out: dict[str, Any] = {"neurons": len(ns), "by_layer": {str(k): v for k, v in ns.count_by_layer().items()}}
    if chosen is not None:
        shared = sum(len(set(ns.units.get(k, []).tolist()) & set(idx.tolist())) for k, idx in chosen.units.items())
        out["shared_with_chosen"] = shared
    return out


def run(config: str, overrides: list[str], variants: list[str], harmful_per_language: int,
        contrast_per_language: int, out: Path) -> dict[str, Any]:
    cfg = load_config(config, overrides)
    pipe = Pipeline(cfg)
    c, tc = cfg, cfg.train
    method = tc.method
    known = variant_names(method)
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(known)}")
    settings = dataclasses.replace(recipe_settings(tc, RECIPE), select_every=0)
    identified = pipe.identify()  # reused when the run's identify stage is up to date

    # the second identify run: the contrast set's held-in part as the benign group, in its own run folder
    alt_cfg = dataclasses.replace(cfg, name=f"{cfg.name}-benign-contrast",
                                  identify=dataclasses.replace(cfg.identify, benign=["contrast"]))
    alt = Pipeline(alt_cfg)
    need_alt = any("benign-contrast" in v for v in variants)
    if need_alt:
        alt.identify()

    used = {r.id for recs in pipe.train_data(settings=settings) for r in recs} | identify_prompt_ids(pipe)
    used |= identify_prompt_ids(alt)
    harmful, contrast = diagnostic_prompts(pipe, harmful_per_language, contrast_per_language, used)
    groups = language_groups(c.languages, c.never_trained)
    prompts = {"harmful": records_fingerprint(harmful), "contrast": records_fingerprint(contrast)}

    base_loaded = pipe.base_model()

    def neuron_set(name: str) -> NeuronSet | None:
        folder = (alt if "benign-contrast" in name else pipe).run_dir / "identify"
        m = OTHER_METHOD[method] if "method-" in name else method
        chosen = recipe_neuron_set(RECIPE, base_loaded, folder / m, set_languages=tc.set_languages or c.identify_languages,
                                   modalities=c.modalities, high_resource=c.high_resource[0], budget=settings.budget,
                                   trim=settings.trim)
        if name == "random-flat":
            return random_flat(chosen, base_loaded, c.seed)
        if name.startswith("random"):
            return random_like(chosen, base_loaded, c.seed)
        return chosen

    reference = neuron_set("chosen")
    folder = pipe.run_dir / "neuron_choice"
    points: dict[str, Any] = {}
    for name in variants:
        ns = None if name == "base" else neuron_set(name)
        key = fingerprint({"variant": name, "settings": None if ns is None else settings.__dict__,
                           "set": None if ns is None else set_digest(ns), "prompts": prompts,
                           "model": pipe.model_identity(), "seed": c.seed, "version": __version__})
        marker = folder / name / "point.json"
        done = read_json(marker, "neuron-choice point") if marker.is_file() else {}
        if done.get("fingerprint") == key:
            points[name] = done
            print(f"{name}: up to date, reused ({marker})", file=sys.stderr)
            continue
        marker.unlink(missing_ok=True)
        start = time.perf_counter()
        if ns is None:
            loaded = base_loaded
        else:
            recipe = "random" if name.startswith("random") else RECIPE
            loaded, _ = pipe.train_recipe(name, folder / name, run=RecipeRun(name, recipe, settings), resume=False,
                                          export=False, loaded=pipe.base_model(), neuron_set=ns,
                                          benign_cache=pipe.run_dir / "train" / BENIGN_CACHE)
        train_seconds = time.perf_counter() - start
        point = {"fingerprint": key, "name": name, "train_seconds": round(train_seconds, 1),
                 "set": None if ns is None else set_summary(ns, reference),
                 **score_point(loaded, harmful, contrast, groups, batch_size=cfg.budget.batch_size, seed=c.seed)}
        write_json(marker, point)
        points[name] = point
        del loaded

    comparisons: dict[str, Any] = {}
    for ref in ("base", "chosen", "random"):
        if ref in points:
            comparisons[ref] = {v: paired_scores(points[ref], p, harmful, contrast, groups, seed=c.seed)
                                for v, p in points.items() if v != ref}
    # each chosen set against the random set that copies its count per layer (its own control)
    own = {v: ("random" if v == "chosen" else f"random-{v}") for v in points
           if v != "base" and not v.startswith("random")}
    comparisons["own control"] = {f"{v} vs {r}": paired_scores(points[r], points[v], harmful, contrast, groups,
                                                                seed=c.seed) for v, r in own.items() if r in points}
    result = {"command": "python experiments/neuron_choice.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "config": config, "overrides": overrides,
              "identify": identified.get("fingerprint"), "method": method, "budget": settings.budget,
              "prompts": {"harmful": len(harmful), "contrast": len(contrast), "split": "held-in, unused by any stage",
                          "per_language": [harmful_per_language, contrast_per_language]},
              "measure": "fast refusal score (judges.logprob.refusal_score) > 0 counts as a refusal",
              "points": {v: {k: x for k, x in p.items() if k != "scores"} for v, p in points.items()},
              "paired": comparisons}
    write_json(out, result)
    return result


def format_result(result: dict[str, Any]) -> str:
    groups = [g for g in ("trained", "never-trained", "all") if g in next(iter(result["points"].values()))["groups"]]
    cols = ["variant", "neurons", "shared with chosen"]
    for g in groups:
        cols += [f"ASR {g} %", f"exaggerated {g} %"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, p in result["points"].items():
        s = p.get("set") or {}
        row = [name, f"{s.get('neurons', '—')}", f"{s.get('shared_with_chosen', '—')}"]
        for g in groups:
            row += [pct(p["groups"][g]["asr"]), pct(p["groups"][g]["exaggerated_refusal"])]
        lines.append("| " + " | ".join(row) + " |")
    for ref, by_variant in result["paired"].items():
        lines += ["", f"Paired against {ref} (points, 95 % CI):" if ref != "own control" else
                  "Each chosen set against its own random set (same count per layer; points, 95 % CI):", "",
                  "| variant | " + " | ".join(f"Δ ASR {g} | Δ exaggerated {g}" for g in groups) + " |",
                  "|---|" + "---|---|" * len(groups)]
        for v, d in by_variant.items():
            lines.append(f"| {v} | " + " | ".join(f"{pct(d[g]['asr'], True)} | {pct(d[g]['exaggerated_refusal'], True)}"
                                                   for g in groups) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/transfer.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--variants", default="", help="comma-separated (default: all, in order)")
    ap.add_argument("--harmful", type=int, default=30, help="held-in harmful prompts per language")
    ap.add_argument("--contrast", type=int, default=12, help="held-in contrast prompts per language")
    ap.add_argument("--out", default="experiments/results/neuron_choice.json")
    args = ap.parse_args(argv)
    method = load_config(args.config, args.overrides).train.method
    variants = [v for v in args.variants.split(",") if v] or variant_names(method)
    result = run(args.config, args.overrides, variants, args.harmful, args.contrast, Path(args.out))
    print(format_result(result))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
