"""What opens the report: the headline (a card per evaluated model, the run's wall time) and the model and data
section (provenance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroshield.report.blocks import Card, Details, Headline, Section, Table
from neuroshield.report.cells import delta_text, fields_table, fmt, is_num, rate_value, seconds_text, share
from neuroshield.report.evaluation import SAFETY_METRICS, rate_table
from neuroshield.report.read import Evals, read_dict

def pooled_rate(card: Card, numbers: dict[str, Any], e: Any, mod: str, suffix: str, role: str) -> None:
    """A card's pooled ASR, over-refusal or exaggerated-safety refusal (by the prompts' role) of one modality, with
    the invalid share beside it; nothing where the evaluation has no such prompts."""
    metric, label = SAFETY_METRICS[role][:2]
    rate = getattr(e, metric)("all", mod)
    if rate is not None and rate.n:
        card.rows.append((f"{label}{suffix}", rate_value(rate), ""))
        numbers[f"{metric}{suffix}"] = rate.to_dict()
        invalid_row(card, numbers, e.invalid("all", mod, role), f"invalid, {role}{suffix}", f"invalid_{role}{suffix}")


def invalid_row(card: Card, numbers: dict[str, Any], rate: Any, label: str, key: str) -> None:
    """The invalid share beside a card's rate (absent in results written before the three verdicts)."""
    if rate is not None and rate.n:
        card.rows.append((label, rate_value(rate), ""))
        numbers[key] = rate.to_dict()


def build_headline(run: Path, ev: Evals, recipes: dict[str, dict[str, Any]]) -> Headline:
    """Per evaluated model: pooled ASR, over-refusal and exaggerated-safety refusal with their invalid shares, the
    paired change in ASR against the base, and what a
    recipe updated; plus the run's wall time. Numbers only as measured: a missing one is left out."""
    head = Headline()
    mods = sorted({c.modality for e in ev.results for c in e.safety})
    models: list[dict[str, Any]] = []
    for i, e in enumerate(ev.results):
        is_base = e is ev.base
        patch = (e.patch or {}).get("path")
        card = Card(e.tag, "before: base model, no patch" if is_base else
                    f"after: {'patched by recipe ' + e.tag if e.tag in recipes else 'patch ' + str(patch or '—')}")
        numbers: dict[str, Any] = {"model": e.tag, "base": is_base}
        for mod in mods:
            suffix = f" ({mod})" if len(mods) > 1 else ""
            pooled_rate(card, numbers, e, mod, suffix, "harmful")
            d = ev.delta(i, "all", mod) if not is_base else None
            if d is not None:
                # tone only where the paired interval excludes 0
                tone = "good" if d.n and d.hi < 0 else "bad" if d.n and d.lo > 0 else ""
                card.rows.append((f"Δ ASR vs base{suffix}", f"{delta_text(d)} points" if d.n else
                                  f"{100 * d.value:+.1f} points (unpaired)", tone))
                numbers[f"delta_asr{suffix}"] = d.to_dict()
                if d.n:
                    card.note += ("" if not card.note else " ") + (
                        f"ASR{suffix} lower than the base: the paired 95 % interval is below 0." if tone == "good" else
                        f"ASR{suffix} higher than the base: the paired 95 % interval is above 0." if tone == "bad" else
                        f"ASR{suffix} not distinguishable from the base: the paired 95 % interval includes 0.")
            pooled_rate(card, numbers, e, mod, suffix, "benign")
            pooled_rate(card, numbers, e, mod, suffix, "contrast")
        for c in e.capability:
            if c.language == "all":
                card.rows.append((f"{c.task.upper()} accuracy", rate_value(c.accuracy), ""))
                numbers[f"{c.task}_accuracy"] = c.accuracy.to_dict()
        s = recipes.get(e.tag) if not is_base else None
        if s:
            params, total = s.get("parameters_updated"), s.get("total_parameters")
            if is_num(s.get("neurons")):
                card.rows.append(("neurons trained", fmt(s["neurons"]), ""))
            if is_num(params):
                card.rows.append(("parameters updated", fmt(params) + (f" of {fmt(total)} ({share(params / total)})"
                                                                        if is_num(total) and total else ""), ""))
            numbers.update({k: s.get(k) for k in ("neurons", "parameters_updated", "total_parameters")})
        head.cards.append(card)
        models.append(numbers)
    pipeline = read_dict(run / "pipeline.json")
    wall, stages = pipeline.get("wall_seconds"), pipeline.get("stage_seconds")
    if is_num(wall):
        card = Card("run", "wall time of the whole pipeline", [("wall time", seconds_text(wall), "")])
        if isinstance(stages, dict):
            card.rows += [(str(k), seconds_text(v), "") for k, v in stages.items() if is_num(v)]
        head.cards.append(card)
    head.data = {"models": models, "wall_seconds": wall if is_num(wall) else None,
                 "stage_seconds": stages if isinstance(stages, dict) else None}
    if ev.entries:
        head.table = rate_table(ev, "harmful", with_delta=False, title="ASR per language")
    return head


MODEL_LABELS = {"model_id": "model", "spec": "spec", "config_hash": "config hash", "dtype": "dtype", "device": "device",
                "gguf_sha256": "GGUF sha256", "source": "weights from"}


def provenance_section(run: Path, sections: dict[str, Section], results: list[Any]) -> Section:
    sec = Section("provenance", "Model and data")
    model: dict[str, Any] = {}
    for e in results:
        for k, v in e.model.items():
            model.setdefault(k, v)
    for key in ("identify", "validate"):
        s = sections[key].data
        d = s.get("summary") or next(iter((s.get("validations") or {}).values()), None)
        if isinstance(d, dict) and isinstance(d.get("config"), dict):
            d = {**d["config"], **d}
        if isinstance(d, dict):
            for k, k2 in (("model_id", "model_id"), ("config_hash", "config_hash"), ("spec", "spec"),
                          ("model_spec", "spec")):
                if k in d:
                    model.setdefault(k2, d[k])
    sec.facts = [(label, fmt(model[k])) for k, label in MODEL_LABELS.items() if k in model]
    config = read_dict(run / "config.json")
    pipeline = read_dict(run / "pipeline.json")
    if config.get("name"):
        sec.facts.append(("run configuration", fmt(config["name"])))
    if pipeline.get("version"):
        sec.facts.append(("neuroshield version", fmt(pipeline["version"])))
    if is_num(pipeline.get("wall_seconds")):
        sec.facts.append(("wall time", seconds_text(pipeline["wall_seconds"])))
    if isinstance(pipeline.get("stage_seconds"), dict):
        sec.facts.append(("stage times", " · ".join(f"{k} {fmt(v)} s" for k, v in pipeline["stage_seconds"].items())))
    if config:
        sec.add(Details("Run configuration",
                        [fields_table(config, "Every setting of the pipeline configuration this run used.",
                                       title="config.json")]))
    # prompts: evaluations on the same prompts (same hash) share one row
    grouped: dict[tuple[str, ...], list[str]] = {}
    for e in results:
        for role in ("harmful", "benign", "contrast", "mgsm", "xcopa"):
            d = e.data.get(role)
            if not isinstance(d, dict) or not d.get("n"):
                continue
            lm = d.get("by_language_modality", {})
            langs = " ".join(sorted({k.split("/")[0] for k in lm}))
            mods = ", ".join(sorted({k.split("/")[1] for k in lm if "/" in k}))
            key = (role, ", ".join(d.get("datasets", [])) or "—", fmt(d["n"]), langs, mods, str(d.get("sha256", "—")))
            grouped.setdefault(key, []).append(e.tag)
    if grouped:
        sec.add(Table(["set", "data sets", "prompts", "languages", "modalities", "sha256 (ids+texts)", "evaluations"],
                      [list(k) + [", ".join(tags)] for k, tags in grouped.items()],
                      "Prompts used by the evaluations: harmful (ASR), benign (over-refusal), contrast (exaggerated-safety "
                      "refusal: safe requests that sound dangerous), MGSM and XCOPA (capability); the hash covers ids, "
                      "languages and texts, so evaluations on the same prompts share a row.", [False, False, True, False, False, False, False], title="Prompts"))
    if not sec.facts and not sec.blocks:
        sec.status, sec.note = "not run", "No stage recorded the model or data (no summaries found)."
    return sec
