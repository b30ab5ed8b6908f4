"""Evaluation prompts are ids that no other stage uses, in any language (XSafety is line-parallel)."""

from __future__ import annotations

from pathlib import Path

from neuroshield.config import load_config
from neuroshield.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]


def test_demo_evaluation_ids_are_used_by_no_other_stage():
    c = load_config(REPO / "configs" / "quick.yaml")
    p = Pipeline(c)
    ic = c.identify
    identify_ids = {r.id for s in ic.harmful + ic.benign
                    for label in ("harmful", "benign")
                    for r in p.prompts(s, label, c.languages, "held-in", ic.per_language)}
    harmful, benign = p.train_data()
    train_ids = {r.id for r in harmful + benign}
    monitor_h, monitor_c = p.monitor_prompts(harmful + benign)
    monitor_ids = {r.id for r in monitor_h + monitor_c}
    validation_ids = {r.id for recs in p.validation_harmful().values() for r in recs}
    evaluation = p.evaluation_harmful()
    assert len(evaluation) == c.evaluate.harmful_per_language * len(c.languages)
    eval_ids = {r.id for r in evaluation}
    for name, ids in [("identify", identify_ids), ("train", train_ids), ("monitor", monitor_ids),
                      ("validate", validation_ids)]:
        assert ids and not eval_ids & ids, name
    # the same ids in every language (parallel), and the contrast set's eval part is never trained on or monitored
    assert len({r.id for r in evaluation if r.language == "en"}) == c.evaluate.harmful_per_language
    contrast_eval = p.prompts("contrast", "benign", c.languages, "held-out", c.evaluate.contrast_per_language)
    assert contrast_eval and {r.meta["split"] for r in contrast_eval} == {"held-out"}
    contrast_train = {r.meta["pair"] for r in benign if r.source == "neuroshield-contrast"}
    assert contrast_train and not contrast_train & {r.id for r in contrast_eval}
    assert not {r.id for r in monitor_c} & {r.id for r in contrast_eval}
    # nor does the monitor see a translation of a retain answer
    assert monitor_c and not {r.id for r in monitor_c} & {r.id for r in benign}


def test_transfer_evaluation_ids_are_in_no_recipe_s_training_and_never_trained_languages_in_none() -> None:
    """configs/transfer.yaml (per-recipe overrides: ss-expansion on parallel data in five languages): the evaluation
    ids are used by no training run in any language, and no run trains on (or monitors) a never-trained language."""
    c = load_config(REPO / "configs" / "transfer.yaml")
    p = Pipeline(c)
    from neuroshield.train.recipes import recipe_runs

    runs = recipe_runs(c.train, c.seed)
    assert [r.name for r in runs] == ["precise-shield", "ss-expansion", "random-s0", "random-s1", "random-s2",
                                      "random-ss-expansion-s0", "random-ss-expansion-s1", "random-ss-expansion-s2",
                                      "lora", "full"]
    # the budget curve's points (precise-shield and its random control at four budgets, LoRA at three ranks) train
    # on the same data as the recipes they trim (and LoRA's)
    budget = [run for run, _ in p.budget_runs()]
    assert len(budget) == 4 + 4 + 3
    runs = runs + budget
    evaluation = p.evaluation_harmful()
    assert len(evaluation) == 40 * len(c.languages)
    eval_ids = {r.id for r in evaluation}
    never = set(c.never_trained)
    seen_languages = set()
    for run in runs:
        harmful, benign = p.train_data(settings=run.settings)
        monitor_h, monitor_c = p.monitor_prompts(harmful + benign, run.settings)
        used = harmful + benign + monitor_h + monitor_c
        assert not eval_ids & {r.id for r in used}, run.name
        assert not never & {r.language for r in used}, run.name
        seen_languages |= {r.language for r in harmful}
        if run.settings.refusals == "parallel":  # ss-expansion and its sets: the same 32 ids in five languages
            ids = {lang: {r.id for r in harmful if r.language == lang} for lang in run.settings.languages}
            assert len(ids["en"]) == 32 and all(v == ids["en"] for v in ids.values())
    assert seen_languages == {"en", "zh", "ar", "ru", "es"}
    contrast_eval = {r.id for r in p.prompts("contrast", "benign", c.languages, "held-out", c.evaluate.contrast_per_language)}
    assert contrast_eval and not contrast_eval & {r.meta.get("pair", "") for run in runs
                                                  for r in p.train_data(settings=run.settings)[1]}
