"""Causal validation of a neuron set (METHOD.md, stage 4): intervene, generate, judge, compare to controls.

`validate(loaded, neuron_set, prompts, mode="zero", controls=3, out_dir=...)` answers every prompt under

* `none`: no intervention (the base model),
* `set`: the intervention on the set,
* `control-k` (k < controls): the same intervention on `random_like(set, loaded, seed + k)`, a random
  set with the same number of units at every (layer, site),

judges each answer (default: the multilingual `RefusalPhraseJudge`; one verdict per answer: refusal,
compliance or invalid) and reports the refusal rate per (language, modality, label) for each condition:
the set's rate beside the controls' mean, sample standard deviation (n-1), min and max; the ASR
(compliance share) and the invalid share of the base, the set and the controls' mean (an intervention
that breaks the model shows as invalid answers, not as refusals or successes); and, per prompt, how
many answers flipped between refusal and a non-refusal against `none`.

Benign-side guard (our choice, configurable by passing `benign_guard`): the base model answers the
benign prompts greedily; then, teacher-forced on those exact answer tokens, we measure for the set and
for each control (1) the mean KL(base || intervened) of the next-token distribution per answer token
(`kl_per_token`, nats), (2) the same at the first answer token only (`kl_first_token`), and (3) the
perplexity of the base answers under the intervened model (`ppl`, beside the base model's own
`ppl_base`). A set that only breaks the model shows a large KL / perplexity blow-up, and a control of
the same size tells what "large" is. With `benign_generate=True` the benign prompts are also answered
under every condition and judged (over-refusal, useful for reinforcement `scale:α>1`).

Outputs in `out_dir`: `validation.json` (everything), `validation.csv` (one row per group),
`generations.jsonl` (every prompt x condition with the judge's verdict, to audit the judge),
`validation.png` (per group: none / set / control mean with sd error bars and the controls as dots),
`summary.json`. Generations are cached in `out_dir/cache/generations.jsonl` (or a shared `cache_dir`), the
generation cache every stage uses (`generate.cache`), per prompt and (model weights, set units, mode and
means, decoding): each finished batch is appended, so an interrupted run resumes where it stopped and a
rerun regenerates nothing. The `none` condition does not depend on the set: validations of several sets
that share a `cache_dir` generate the base answers once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from neuroshield.data.records import PromptRecord, group_name
from neuroshield.generate.cache import CACHE_FILE, GenerationCache, cached_generate, model_key
from neuroshield.generate.generation import Generation, GenerationConfig, response_divergence
from neuroshield.intervene.interventions import InterventionMode, _means_of, intervene, parse_mode
from neuroshield.judges.registry import get_judge, judge_info, judge_responses, result_verdict
from neuroshield.io import atomic_write_text, fingerprint, records_fingerprint, save_figure
from neuroshield.models.loading import LoadedModel
from neuroshield.neurons.neuronset import NeuronSet, random_like
from neuroshield.settings import PipelineConfig, ValidateConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Conditions and fingerprints
# --------------------------------------------------------------------------------------------------


@dataclass
class Condition:
    name: str  # "none", "set", "control-0", ...
    kind: str  # "none" | "set" | "control"
    neuron_set: NeuronSet | None
    seed: int | None = None

    def describe(self) -> dict[str, Any]:
        ns = self.neuron_set
        return {"name": self.name, "kind": self.kind, "seed": self.seed,
                "set": None if ns is None else ns.name, "neurons": 0 if ns is None else len(ns),
                "set_hash": None if ns is None else set_fingerprint(ns)}


def set_fingerprint(ns: NeuronSet) -> str:
    """Hash of the units (not the name or scores): equal sets share cached generations."""
    h = hashlib.sha256()
    for key in sorted(ns.units):
        h.update(key.encode())
        h.update(ns.units[key].to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def prompt_key(r: PromptRecord) -> str:
    return f"{r.language}/{r.modality}/{r.id}"


def _tensor_fingerprint(d: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(d):
        h.update(k.encode())
        h.update(d[k].detach().to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class ValidationResult:
    rows: list[dict[str, Any]]  # one per (language, modality, label), then "all" rows
    guard: dict[str, Any] | None
    conditions: list[dict[str, Any]]
    config: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def row(self, language: str, modality: str = "text", label: str = "harmful") -> dict[str, Any]:
        for r in self.rows:
            if (r["language"], r["modality"], r["label"]) == (language, modality, label):
                return r
        raise KeyError(f"no row for {group_name(language, modality, label)}")

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "conditions": self.conditions, "rows": self.rows, "guard": self.guard,
                "paths": self.paths, "timings": self.timings}


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def _aggregate(prompts: Sequence[PromptRecord], verdicts: dict[str, list[str]], controls: list[str]
               ) -> list[dict[str, Any]]:
    """Rows per group from each condition's verdicts (refusal / compliance / invalid per prompt)."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, r in enumerate(prompts):
        groups.setdefault(r.group, []).append(i)
    for modality, label in sorted({(g[1], g[2]) for g in groups}):
        langs = [g for g in groups if g[1:] == (modality, label)]
        if len(langs) > 1:
            groups[("all", modality, label)] = [i for g in langs for i in groups[g]]
    rows = []
    for (lang, modality, label), idx in sorted(groups.items(), key=lambda kv: (kv[0][0] == "all", kv[0])):
        n = len(idx)

        def rate(cond: str, verdict: str = "refusal") -> float:
            return sum(verdicts[cond][i] == verdict for i in idx) / n

        def refused(cond: str, i: int) -> bool:
            return verdicts[cond][i] == "refusal"

        none, setr = rate("none"), rate("set")
        ctrl = [rate(c) for c in controls]
        cs = _stats(ctrl)
        row: dict[str, Any] = {
            "language": lang, "modality": modality, "label": label, "n": n,
            "refusal_none": none, "refusal_set": setr,
            "refusal_control_mean": cs["mean"], "refusal_control_sd": cs["sd"],
            "refusal_control_min": cs["min"], "refusal_control_max": cs["max"],
            "refusal_controls": ctrl,
            "delta_set": setr - none,
            "delta_control": None if cs["mean"] is None else cs["mean"] - none,
            "effect_vs_control": None if cs["mean"] is None else setr - cs["mean"],
            "set_outside_controls": None if not ctrl else (setr < cs["min"] or setr > cs["max"]),
            # paired flips against the base model (McNemar counts)
            "flips_set_refusal_to_answer": sum(refused("none", i) and not refused("set", i) for i in idx),
            "flips_set_answer_to_refusal": sum(not refused("none", i) and refused("set", i) for i in idx),
        }
        for verdict, name in (("compliance", "asr"), ("invalid", "invalid")):
            row[f"{name}_none"], row[f"{name}_set"] = rate("none", verdict), rate("set", verdict)
            row[f"{name}_control_mean"] = _stats([rate(c, verdict) for c in controls])["mean"]
        rows.append(row)
    return rows


CSV_COLUMNS = ["language", "modality", "label", "n", "refusal_none", "refusal_set", "refusal_control_mean",
               "refusal_control_sd", "refusal_control_min", "refusal_control_max", "delta_set", "delta_control",
               "effect_vs_control", "set_outside_controls", "flips_set_refusal_to_answer",
               "flips_set_answer_to_refusal", "asr_none", "asr_set", "asr_control_mean", "invalid_none", "invalid_set",
               "invalid_control_mean", "kl_per_token_set", "kl_per_token_control_mean", "ppl_base", "ppl_set",
               "ppl_control_mean"]


def _csv_text(rows: list[dict[str, Any]], guard: dict[str, Any] | None) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    by_lang = (guard or {}).get("by_language", {})
    for r in rows:
        out = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()}
        g = None
        if guard and r["label"] == "harmful":
            g = guard if r["language"] == "all" else by_lang.get(r["language"])
        if g:
            out.update({"kl_per_token_set": f"{g['set']['kl_per_token']:.5f}",
                        "kl_per_token_control_mean": _fmt(g.get("control_mean", {}).get("kl_per_token")),
                        "ppl_base": f"{g['ppl_base']:.3f}", "ppl_set": f"{g['set']['ppl']:.3f}",
                        "ppl_control_mean": _fmt(g.get("control_mean", {}).get("ppl"))})
        w.writerow(out)
    return buf.getvalue()


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.5f}"


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [(r["language"] if (r["modality"], r["label"]) == ("text", "harmful")
               else f"{r['language']}\n{r['modality']}/{r['label']}") + f"\nn={r['n']}" for r in rows]
    x = list(range(len(rows)))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.8))
    ax.bar([i - width for i in x], [r["refusal_none"] for r in rows], width, label="none", color="#9e9e9e")
    ax.bar(x, [r["refusal_set"] for r in rows], width, label="set", color="#d62728")
    has_ctrl = any(r["refusal_control_mean"] is not None for r in rows)
    if has_ctrl:
        means = [r["refusal_control_mean"] or 0.0 for r in rows]
        sds = [r["refusal_control_sd"] or 0.0 for r in rows]
        ax.bar([i + width for i in x], means, width, yerr=sds, capsize=3, label="control mean ± sd", color="#1f77b4")
        for i, r in enumerate(rows):
            ax.scatter([i + width] * len(r["refusal_controls"]), r["refusal_controls"], s=8, color="black", zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("refusal rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Guard
# --------------------------------------------------------------------------------------------------


def _guard_summary(divs: Sequence[Any], idx: Sequence[int]) -> dict[str, float]:
    tokens = sum(divs[i].tokens for i in idx)
    if tokens == 0:
        return {"tokens": 0, "kl_per_token": 0.0, "kl_first_token": 0.0, "ppl": float("nan"), "nll_per_token": 0.0}
    nll = sum(divs[i].nll for i in idx) / tokens
    return {"tokens": tokens, "kl_per_token": sum(divs[i].kl_sum for i in idx) / tokens,
            "kl_first_token": sum(divs[i].kl_first for i in idx) / len(idx), "nll_per_token": nll,
            "ppl": math.exp(min(nll, 700.0))}


def _guard(loaded: LoadedModel, benign: Sequence[PromptRecord], base_gens: list[Generation],
           conditions: list[Condition], ctx: Callable[[Condition], Callable[[], Any]], batch_size: int,
           system: str | None, progress: bool) -> dict[str, Any]:
    responses = [g.token_ids for g in base_gens]
    active = [c for c in conditions if c.kind != "none"]
    divs = response_divergence(loaded, benign, responses, {c.name: ctx(c) for c in active}, batch_size=batch_size,
                               system=system, progress=progress)
    any_div = next(iter(divs.values()))
    by_lang: dict[str, list[int]] = {}
    for i, r in enumerate(benign):
        by_lang.setdefault(r.language, []).append(i)
    groups = {**by_lang, "all": list(range(len(benign)))}
    controls = [c.name for c in active if c.kind == "control"]
    out: dict[str, Any] = {}
    for lang, idx in groups.items():
        tokens = sum(any_div[i].tokens for i in idx)
        ref_nll = sum(any_div[i].reference_nll for i in idx) / max(tokens, 1)
        entry: dict[str, Any] = {"n": len(idx), "tokens": tokens, "ppl_base": math.exp(min(ref_nll, 700.0))}
        entry["set"] = _guard_summary(divs["set"], idx)
        entry["controls"] = {c: _guard_summary(divs[c], idx) for c in controls}
        if controls:
            entry["control_mean"] = {m: _stats([entry["controls"][c][m] for c in controls])["mean"]
                                     for m in ("kl_per_token", "kl_first_token", "ppl", "nll_per_token")}
            entry["control_sd"] = {m: _stats([entry["controls"][c][m] for c in controls])["sd"]
                                   for m in ("kl_per_token", "kl_first_token", "ppl", "nll_per_token")}
        out[lang] = entry
    overall = out.pop("all")
    return {"method": "teacher-forced on the base model's greedy answers to the benign prompts: "
                      "KL(base || intervened) of the next-token distribution per answer token (and at the first "
                      "answer token); perplexity of the base answers under the intervened model",
            **overall, "by_language": out}


# --------------------------------------------------------------------------------------------------
# The validation
# --------------------------------------------------------------------------------------------------


def _judge_all(judge: Any, gens: list[Generation], prompts: Sequence[PromptRecord]) -> list[Any]:
    texts = [g.text for g in gens]
    langs = [r.language for r in prompts]
    if hasattr(judge, "judge_batch"):
        return judge_responses(judge, texts, langs, [r.text for r in prompts])
    return [judge.judge(t, lang) for t, lang in zip(texts, langs)]


def _verdict_fields(v: Any) -> dict[str, Any]:
    return {"verdict": result_verdict(v), "score": float(getattr(v, "score", float(v.refused))),
            "matched": getattr(v, "matched", None), "reason": getattr(v, "reason", None)}


def _check_unique(prompts: Sequence[PromptRecord]) -> None:
    keys = [prompt_key(r) for r in prompts]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise ValueError(f"prompts contain duplicate (language, modality, id): {', '.join(dup)}; deduplicate them")


def _checked_inputs(loaded: LoadedModel, neuron_set: NeuronSet, prompts: Sequence[PromptRecord],
                    parsed: InterventionMode, controls: int, judge: Any) -> Any:
    """Raise ValueError on inputs validation cannot use; returns the judge (default refusal-phrase)."""
    if parsed.kind == "none":
        raise ValueError("mode='none' validates nothing: choose zero, scale:<alpha> or mean:<group>")
    if controls < 0:
        raise ValueError(f"controls={controls}: must be >= 0")
    if not prompts:
        raise ValueError("prompts is empty: nothing to validate (check --languages, --split and --limit)")
    _check_unique(prompts)
    neuron_set.check_model(loaded)
    if len(neuron_set) == 0:
        raise ValueError(f"neuron set {neuron_set.name!r} is empty: nothing to intervene on")
    if judge is None:
        judge = get_judge("refusal-phrase")
    if getattr(judge, "requires_generation", True) is False or not (hasattr(judge, "judge_batch")
                                                                    or hasattr(judge, "judge")):
        raise ValueError(f"judge {type(judge).__name__} does not judge responses; validation judges the generated "
                         "answers: use a response judge (refusal-phrase or a classifier folder)")
    return judge


def _generation_lines(conds: Sequence[Condition], prompts: Sequence[PromptRecord], gens: Mapping[str, list[Generation]],
                      verdicts: Mapping[str, list[Any]], mode: str, benign: Sequence[PromptRecord],
                      benign_gens: Mapping[str, list[Generation]], benign_verdicts: Mapping[str, list[Any]]
                      ) -> list[str]:
    """The rows of generations.jsonl: every condition's responses and verdicts, then the benign guard's."""
    lines = []
    for c in conds:
        for r, g, v in zip(prompts, gens[c.name], verdicts[c.name]):
            lines.append(json.dumps({"condition": c.name, "kind": c.kind, "seed": c.seed, "mode": mode,
                                     "set": None if c.neuron_set is None else c.neuron_set.name, "id": r.id,
                                     "language": r.language, "modality": r.modality, "label": r.label,
                                     "category": r.category, "prompt": r.text, "response": g.text,
                                     "response_tokens": len(g.token_ids), "finished": g.finished,
                                     **_verdict_fields(v)}, ensure_ascii=False))
    for name, bg in benign_gens.items():
        for r, g, v in zip(benign, bg, benign_verdicts[name]):
            lines.append(json.dumps({"condition": f"benign-{name}", "kind": "benign", "id": r.id, "language": r.language,
                                     "modality": r.modality, "label": r.label, "prompt": r.text, "response": g.text,
                                     "response_tokens": len(g.token_ids), "finished": g.finished,
                                     **_verdict_fields(v)}, ensure_ascii=False))
    return lines


def validate(
    loaded: LoadedModel,
    neuron_set: NeuronSet,
    prompts: Sequence[PromptRecord],
    *,
    mode: str | InterventionMode = "zero",
    controls: int = ValidateConfig().controls,
    seed: int = PipelineConfig().seed,
    max_new_tokens: int = ValidateConfig().max_new_tokens,
    batch_size: int = ValidateConfig().batch_size,
    judge: Any = None,
    benign_guard: Sequence[PromptRecord] | None = None,
    benign_generate: bool = False,
    out_dir: str | Path,
    stats: Any = None,
    means: Mapping[str, Any] | None = None,
    system: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ValidationResult:
    """Refusal rates with no intervention, with the set and with `controls` random sets; see module doc."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
    parsed = parse_mode(mode)
    judge = _checked_inputs(loaded, neuron_set, prompts, parsed, controls, judge)
    mean_vecs: dict[str, torch.Tensor] | None = None
    if parsed.kind == "mean":  # resolve once: the controls use the same site keys
        mean_vecs = {k: v.detach().float().cpu() for k, v in
                     _means_of(stats, means, parsed, sorted(neuron_set.units)).items()}

    conds = [Condition("none", "none", None), Condition("set", "set", neuron_set)]
    conds += [Condition(f"control-{k}", "control", random_like(neuron_set, loaded, seed + k), seed + k)
              for k in range(controls)]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
    cache = GenerationCache(cache_dir / CACHE_FILE)
    weights_key = model_key(loaded)  # before any intervention: each condition has its own variant

    def ctx(c: Condition) -> Callable[[], Any]:
        if c.neuron_set is None:
            return nullcontext
        ns = c.neuron_set
        return lambda: intervene(loaded, ns, parsed, means=mean_vecs)

    def generate(c: Condition, records: Sequence[PromptRecord], label: str) -> list[Generation]:
        variant = "none"
        if c.neuron_set is not None:
            variant = fingerprint({"set": set_fingerprint(c.neuron_set), "mode": str(parsed),
                                   "means": None if mean_vecs is None else _tensor_fingerprint(mean_vecs)})
        return cached_generate(loaded, records, cfg, cache, weights_key=weights_key, variant=variant,
                               task=f"validate:{label}", context=ctx(c), progress=progress, desc=label)

    timings: dict[str, float] = {}
    gens: dict[str, list[Generation]] = {}
    for c in tqdm(conds, desc="conditions", unit="cond", disable=not progress):
        t0 = time.perf_counter()
        gens[c.name] = generate(c, prompts, c.name)
        timings[f"generate_{c.name}"] = time.perf_counter() - t0
    verdicts_full = {c.name: _judge_all(judge, gens[c.name], prompts) for c in conds}
    verdicts = {name: [result_verdict(v) for v in vs] for name, vs in verdicts_full.items()}
    control_names = [c.name for c in conds if c.kind == "control"]
    rows = _aggregate(prompts, verdicts, control_names)

    guard = None
    benign_rows = None
    benign_gens: dict[str, list[Generation]] = {}
    benign_verdicts: dict[str, list[Any]] = {}
    if benign_guard:
        _check_unique(benign_guard)
        t0 = time.perf_counter()
        base_b = generate(conds[0], benign_guard, "benign-none")
        benign_gens["none"] = base_b
        guard = _guard(loaded, benign_guard, base_b, conds, ctx, batch_size, system, progress)
        timings["guard"] = time.perf_counter() - t0
        if benign_generate:
            t0 = time.perf_counter()
            for c in conds[1:]:
                benign_gens[c.name] = generate(c, benign_guard, f"benign-{c.name}")
            timings["benign_generate"] = time.perf_counter() - t0
        benign_verdicts = {n: _judge_all(judge, g, benign_guard) for n, g in benign_gens.items()}
        if benign_generate:
            bverd = {n: [result_verdict(v) for v in vs] for n, vs in benign_verdicts.items()}
            benign_rows = _aggregate(benign_guard, bverd, control_names)
            guard["over_refusal"] = benign_rows
        else:
            base_verdicts = [result_verdict(v) for v in benign_verdicts["none"]]
            guard["over_refusal_none"] = base_verdicts.count("refusal") / len(base_verdicts)
            guard["invalid_none"] = base_verdicts.count("invalid") / len(base_verdicts)

    # --- files ----------------------------------------------------------------------------------
    paths = {name: str(out / name) for name in
             ("validation.json", "validation.csv", "generations.jsonl", "validation.png", "summary.json")}
    lines = _generation_lines(conds, prompts, gens, verdicts_full, str(parsed), benign_guard or [], benign_gens,
                              benign_verdicts)
    atomic_write_text(out / "generations.jsonl", "\n".join(lines) + "\n")
    config = {
        "model_id": loaded.model_id, "config_hash": loaded.config_hash, "set": neuron_set.name,
        "set_meta": {k: v for k, v in neuron_set.meta.items() if k not in ("sites",)},
        "set_neurons": len(neuron_set), "set_by_kind": neuron_set.count_by_kind(),
        "set_by_layer": {str(k): v for k, v in neuron_set.count_by_layer().items()},
        "mode": str(parsed), "controls": controls, "seed": seed, "generation": dataclass_dict(cfg),
        "judge": judge_info(judge), "prompts": len(prompts), "prompts_hash": records_fingerprint(prompts),
        "benign_prompts": len(benign_guard or []), "control_sd": "sample standard deviation (n-1)",
    }
    timings["total"] = time.perf_counter() - t_start
    result = ValidationResult(rows=rows, guard=guard, conditions=[c.describe() for c in conds], config=config,
                              paths=paths, timings=timings)
    atomic_write_text(out / "validation.csv", _csv_text(rows, guard))
    _plot(rows, out / "validation.png",
          f"{neuron_set.name} ({len(neuron_set)} neurons), mode {parsed}, {controls} random controls")
    atomic_write_text(out / "validation.json", json.dumps(result.to_dict(), indent=1, ensure_ascii=False, default=str))
    headline = {f"{r['language']}/{r['modality']}/{r['label']}": {
        "none": r["refusal_none"], "set": r["refusal_set"], "control_mean": r["refusal_control_mean"],
        "control_sd": r["refusal_control_sd"], "invalid_none": r["invalid_none"], "invalid_set": r["invalid_set"],
        "invalid_control_mean": r["invalid_control_mean"]} for r in rows}
    summary = {"stage": "validate", "model_id": loaded.model_id, "set": neuron_set.name, "mode": str(parsed),
               "refusal": headline, "guard": None if guard is None else {
                   "kl_per_token_set": guard["set"]["kl_per_token"],
                   "kl_per_token_control_mean": guard.get("control_mean", {}).get("kl_per_token"),
                   "ppl_base": guard["ppl_base"], "ppl_set": guard["set"]["ppl"]},
               "files": sorted(paths), "seconds": timings["total"]}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    return result


def dataclass_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------------------------------
# Prompt selection for validation
# --------------------------------------------------------------------------------------------------


__all__ = ["validate", "ValidationResult", "Condition", "set_fingerprint", "prompt_key"]

