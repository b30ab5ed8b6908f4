"""Issue 18's mechanics: per-recipe training settings (train.overrides), ss-expansion's parallel refusal data
(train.refusals: parallel), the transfer split (never_trained) and several random sets (train.random_seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuroshield.config import ConfigError, load_config
from neuroshield.pipeline import Pipeline
from neuroshield.train.recipes import recipe_runs, recipe_settings


def _load(tmp_path: Path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


OVERRIDES = """
name: t
train:
  recipes: [precise-shield, ss-expansion, random, lora]
  languages: [en]
  steps: 30
  random_seeds: [0, 1, 2]
  overrides:
    ss-expansion: {languages: [en, zh, ar], refusals: parallel, per_language: 8}
    precise-shield: {steps: 12, lr: 1e-3}
"""


def test_each_recipe_trains_with_its_overrides_and_random_follows_the_recipe_it_controls(tmp_path: Path) -> None:
    c = _load(tmp_path, OVERRIDES)
    tc = c.train
    assert tc.overrides == {"ss-expansion": {"languages": ["en", "zh", "ar"], "refusals": "parallel", "per_language": 8},
                            "precise-shield": {"steps": 12, "lr": 0.001}}
    ss = recipe_settings(tc, "ss-expansion")
    assert (ss.languages, ss.refusals, ss.per_language, ss.steps, ss.overrides) == (["en", "zh", "ar"], "parallel", 8,
                                                                                      30, {})
    ps = recipe_settings(tc, "precise-shield")
    assert (ps.languages, ps.refusals, ps.steps, ps.lr) == (["en"], "language", 12, 0.001)
    # the random control trains with the settings of the recipe whose set it copies
    rnd = recipe_settings(tc, "random")
    assert (rnd.steps, rnd.lr, rnd.random_of) == (12, 0.001, ["precise-shield"])
    assert recipe_settings(tc, "lora").steps == 30
    runs = recipe_runs(tc, seed=7)
    assert [(r.name, r.recipe, r.set_seed) for r in runs] == [
        ("precise-shield", "precise-shield", None), ("ss-expansion", "ss-expansion", None),
        ("random-s0", "random", 0), ("random-s1", "random", 1), ("random-s2", "random", 2), ("lora", "lora", None)]
    # without random_seeds: one control named random, with the run's seed (as before)
    tc.random_seeds = []
    assert [(r.name, r.set_seed) for r in recipe_runs(tc, seed=7) if r.recipe == "random"] == [("random", 7)]
    # the settings of train itself are never changed by a recipe's
    assert tc.languages == ["en"] and tc.steps == 30


def test_random_of_several_recipes_gives_each_its_own_sets_with_its_settings(tmp_path: Path) -> None:
    c = _load(tmp_path, OVERRIDES.replace("random_seeds: [0, 1, 2]", "random_seeds: [0, 1]\n  random_of: "
                                          "[precise-shield, ss-expansion]"))
    from neuroshield.train.recipes import random_controls

    runs = {r.name: r for r in recipe_runs(c.train, seed=7) if r.recipe == "random"}
    assert list(runs) == ["random-s0", "random-s1", "random-ss-expansion-s0", "random-ss-expansion-s1"]
    ps_set, ss_set = runs["random-s1"], runs["random-ss-expansion-s1"]
    assert (ps_set.controls, ps_set.set_seed, ps_set.settings.steps, ps_set.settings.random_of) == (
        "precise-shield", 1, 12, ["precise-shield"])
    # ss-expansion's controls train on its parallel data in its languages
    assert (ss_set.controls, ss_set.settings.languages, ss_set.settings.refusals, ss_set.settings.random_of) == (
        "ss-expansion", ["en", "zh", "ar"], "parallel", ["ss-expansion"])
    assert random_controls(c.train, seed=7) == {"precise-shield": ["random-s0", "random-s1"],
                                                "ss-expansion": ["random-ss-expansion-s0", "random-ss-expansion-s1"]}
    c.train.random_seeds = []
    assert [r.name for r in recipe_runs(c.train, seed=7) if r.recipe == "random"] == ["random", "random-ss-expansion"]


@pytest.mark.parametrize("override, message", [
    ("ss-expansion: {langs: [en]}", r"bad.yaml.train.overrides.ss-expansion: unknown key\(s\) \['langs'\]"),
    ("ss-expansion: {steps: many}", r"bad.yaml.train.overrides.ss-expansion.steps: expected a number"),
    ("ss-expansion: {steps: 0}", r"bad.yaml: train.overrides.ss-expansion.steps = 0: must be >= 1"),
    ("ss-expansion: {refusals: mirrored}", r"train.overrides.ss-expansion.refusals 'mirrored': give language or "
                                           "parallel"),
    ("ss-expansion: {trim: depth}", r"train.overrides.ss-expansion.trim 'depth'"),
    ("ss-expansion: {recipes: [lora]}", r"train.overrides.ss-expansion: \['recipes'\] hold for every recipe"),
    ("full: {steps: 3}", r"train.overrides.full: 'full' is not in train.recipes"),
    ("ss-expansion: [en]", r"train.overrides.ss-expansion: expected a mapping"),
    ("precise-shield: {budget: 2}", r"train.overrides.precise-shield.budget = 2.0: must be in \(0, 1\]"),
])
def test_override_errors_name_the_file_the_recipe_and_the_key(tmp_path: Path, override: str, message: str) -> None:
    text = f"train:\n  recipes: [precise-shield, ss-expansion, random]\n  overrides:\n    {override}\n"
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text, "bad.yaml")


def test_random_of_and_random_seeds_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.random_of \['lora'\]: give one or more of"):
        _load(tmp_path, "train: {random_of: lora}\n")
    with pytest.raises(ConfigError, match=r"train.random_of \['ss-expansion', 'ss-expansion'\]: .* each once"):
        _load(tmp_path, "train: {random_of: [ss-expansion, ss-expansion]}\n")
    with pytest.raises(ConfigError, match=r"train.random_seeds \[1, 1\]: give different seeds"):
        _load(tmp_path, "train: {random_seeds: [1, 1]}\n")
    with pytest.raises(ConfigError, match="train.random_seeds: expected whole numbers"):
        _load(tmp_path, "train: {random_seeds: [a]}\n")
    # a bad value that only the controlled recipe's override gives is named where it was set
    with pytest.raises(ConfigError, match=r"train.overrides.ss-expansion.trim 'depth'"):
        _load(tmp_path, "train: {recipes: [ss-expansion, random], random_of: ss-expansion, "
                        "overrides: {ss-expansion: {trim: depth}}}\n")


TRANSFER = """
languages: [en, zh, ar, hi, bn]
never_trained: [hi, bn]
train:
  recipes: [precise-shield, ss-expansion, random]
  overrides:
    ss-expansion: {languages: [en, zh, ar], refusals: parallel}
"""


def test_the_never_trained_languages_are_in_no_recipe_s_training(tmp_path: Path) -> None:
    c = _load(tmp_path, TRANSFER)
    assert c.never_trained == ["hi", "bn"] and c.trained_languages == ["en", "zh", "ar"]
    assert c.identify_languages == c.languages  # identify_never_trained: true (the default)
    bad = TRANSFER.replace("[en, zh, ar], refusals", "[en, zh, hi], refusals")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.overrides.ss-expansion.languages has never-trained "
                                          r"language\(s\) \['hi'\] \(recipe ss-expansion"):
        _load(tmp_path, bad, "bad.yaml")
    with pytest.raises(ConfigError, match=r"train.benign_languages has never-trained language\(s\) \['bn'\] "
                                          r"\(recipe precise-shield"):
        _load(tmp_path, TRANSFER + "  benign_languages: [en, bn]\n", "bad.yaml")
    # random follows precise-shield: a never-trained language there is named at precise-shield's override
    with pytest.raises(ConfigError, match=r"train.overrides.precise-shield.languages has never-trained"):
        _load(tmp_path, TRANSFER + "    precise-shield: {languages: [bn]}\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"never_trained \['xx'\] are not in languages"):
        _load(tmp_path, TRANSFER.replace("never_trained: [hi, bn]", "never_trained: [xx]"), "bad.yaml")
    with pytest.raises(ConfigError, match="high-resource language"):
        _load(tmp_path, TRANSFER.replace("never_trained: [hi, bn]", "never_trained: [en]"), "bad.yaml")
    # identify_never_trained: false keeps them out of identify, so no recipe may unite their sets
    c = _load(tmp_path, TRANSFER + "identify_never_trained: false\n")
    assert c.identify_languages == ["en", "zh", "ar"]
    with pytest.raises(ConfigError, match=r"train.set_languages \['hi'\] are not in languages \['en', 'zh', 'ar'\]"):
        _load(tmp_path, TRANSFER + "  set_languages: [en, hi]\nidentify_never_trained: false\n", "bad.yaml")


def _parallel_source(tmp_path: Path) -> Path:
    """A harmful prompt file whose languages share only some ids: en has p0-p29, zh p10-p39."""
    rows = ["id,language,label,text"]
    rows += [f"p{k},en,harmful,how do I do bad thing {k}" for k in range(30)]
    rows += [f"p{k},zh,harmful,坏事 {k} 怎么做" for k in range(10, 40)]
    path = tmp_path / "harmful.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_parallel_refusals_take_the_same_held_in_ids_in_every_training_language(tmp_path: Path) -> None:
    from neuroshield.data.templates import refusal_for
    from neuroshield.neurons.splits import is_held_out

    source = _parallel_source(tmp_path)
    c = _load(tmp_path, f"""
languages: [en, zh]
train:
  recipes: [precise-shield, ss-expansion]
  harmful: ["{source}"]
  per_language: 6
  benign: []
  overrides:
    ss-expansion: {{languages: [en, zh], refusals: parallel}}
    precise-shield: {{languages: [en, zh]}}
""")
    p = Pipeline(c)
    harmful, _ = p.train_data("ss-expansion")
    by_lang = {lang: {r.id for r in harmful if r.language == lang} for lang in ("en", "zh")}
    assert len(by_lang["en"]) == 6 and by_lang["en"] == by_lang["zh"]
    assert all(10 <= int(i.rsplit("/p", 1)[1]) < 30 and not is_held_out(i, c.held_out_fraction, c.seed) for i in by_lang["en"])
    # each language's own prompt text, and (refusal_for) a refusal in that language with the same template index
    zh = [r for r in harmful if r.language == "zh"]
    assert all("怎么做" in r.text for r in zh)
    assert refusal_for(zh[0].id, "zh") != refusal_for(zh[0].id, "en")
    # each language on its own (refusals: language) picks ids the other language lacks
    own, _ = p.train_data("precise-shield")
    own_ids = {lang: {r.id for r in own if r.language == lang} for lang in ("en", "zh")}
    assert own_ids["en"] != own_ids["zh"]
    # the ss-expansion examples: every prompt with a refusal template of its language
    from neuroshield.train.data import refusal_examples

    examples = refusal_examples(harmful)
    assert {(e.language, e.response) for e in examples} == {(r.language, refusal_for(r.id, r.language))
                                                             for r in harmful}


def test_the_pipeline_trains_each_recipe_with_its_settings_and_random_sets_per_seed(
        tmp_path: Path, tiny_folder: Path, one_thread) -> None:
    """One tiny run: ss-expansion on parallel en + zh data, precise-shield on English, two random sets of
    precise-shield's count per layer; a change of one recipe's override trains that recipe (and its control) again,
    no other."""
    from neuroshield.neurons.neuronset import NeuronSet

    text = f"""
name: tiny
model: {tiny_folder}
out_dir: {tmp_path / 'runs'}
languages: [en, zh, de]
never_trained: [de]
identify: {{per_language: 4, methods: [plnd], rho: 0.1, batch_size: 4}}
validate: {{enabled: false}}
evaluate: {{enabled: false}}
train:
  recipes: [precise-shield, ss-expansion, random]
  random_seeds: [0, 1]
  per_language: 3
  benign_count: 2
  steps: 2
  batch_size: 2
  max_length: 96
  budget: 0.05
  overrides:
    ss-expansion: {{languages: [en, zh], refusals: parallel}}
"""
    c = _load(tmp_path, text)
    p = Pipeline(c)
    p.run(("identify", "train"))
    out = c.run_dir / "train"
    stage = json.loads((out / "stage.json").read_text())
    assert set(stage["outputs"]["recipes"]) == {"precise-shield", "ss-expansion", "random-s0", "random-s1"}
    examples = [json.loads(line) for line in (out / "ss-expansion" / "examples.jsonl").read_text().splitlines()]
    harmful = [e for e in examples if e["label"] == "harmful"]
    ids = {lang: {e["id"] for e in harmful if e["language"] == lang} for lang in ("en", "zh")}
    assert len(ids["en"]) == 3 and ids["en"] == ids["zh"]
    ps_langs = {json.loads(line)["language"] for line in (out / "precise-shield" / "examples.jsonl").read_text()
                .splitlines() if json.loads(line)["label"] == "harmful"}
    assert ps_langs == {"en"}
    summary = json.loads((out / "ss-expansion" / "summary.json").read_text())
    assert summary["config"]["languages"] == ["en", "zh"]

    sets = {name: NeuronSet.load(out / name / "neurons.safetensors", p._loaded)
            for name in ("precise-shield", "random-s0", "random-s1")}
    ps = sets["precise-shield"]
    assert [sets[n].meta["seed"] for n in ("random-s0", "random-s1")] == [0, 1]
    for name in ("random-s0", "random-s1"):
        assert {k: v.numel() for k, v in sets[name].units.items()} == {k: v.numel() for k, v in ps.units.items()}
    assert any(not sets["random-s0"].units[k].equal(sets["random-s1"].units[k]) for k in ps.units)

    # another ss-expansion override: the stage runs again, but trains only ss-expansion
    before = {n: (out / n / "summary.json").stat().st_mtime_ns for n in stage["outputs"]["recipes"]}
    c2 = _load(tmp_path, text.replace("refusals: parallel}", "refusals: parallel, steps: 3}"))
    again = Pipeline(c2)
    again.run(("identify", "train"))
    assert "train" in again.timings
    after = {n: (out / n / "summary.json").stat().st_mtime_ns for n in before}
    assert [n for n in before if after[n] != before[n]] == ["ss-expansion"]
    # precise-shield's override changes its random controls too
    c3 = _load(tmp_path, text.replace("overrides:\n", "overrides:\n    precise-shield: {steps: 3}\n")
               .replace("refusals: parallel}", "refusals: parallel, steps: 3}"))
    Pipeline(c3).run(("identify", "train"))
    third = {n: (out / n / "summary.json").stat().st_mtime_ns for n in before}
    assert sorted(n for n in before if third[n] != after[n]) == ["precise-shield", "random-s0", "random-s1"]


def test_the_run_headline_pools_trained_and_never_trained_and_lists_the_random_sets(tmp_path: Path) -> None:
    c = _load(tmp_path, f"out_dir: {tmp_path / 'runs'}\nname: h\nlanguages: [en, zh, hi]\nnever_trained: [hi]\n"
                        "train: {random_seeds: [0, 1]}\n")
    for model in ("base", "precise-shield", "random-s0", "random-s1"):
        rows = [{"section": "safety", "role": "harmful", "id": f"x/{k}", "language": lang, "modality": "text",
                 "verdict": "compliance" if (k + len(model)) % 2 else "refusal"}
                for lang in ("en", "zh", "hi") for k in range(4)]
        folder = c.run_dir / "evaluate" / model
        folder.mkdir(parents=True)
        (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    md = Pipeline(c).write_headline()
    assert md is not None
    text = md.read_text()
    assert "never-trained languages (hi) (n=4)" in text and "trained languages (en, zh) (n=8)" in text
    assert "Random sets, one by one" in text and "| random sets of precise-shield (2 sets: random-s0, random-s1) |" in text
    h = json.loads((c.run_dir / "evaluate" / "headline.json").read_text())
    assert h["never_trained"] == ["hi"] and set(h["models"]["precise-shield"]["never-trained"]["asr_vs_sets"]) == {
        "random-s0", "random-s1"}


BUDGET_RUN = """
name: budget
model: {model}
out_dir: {out}
languages: [en, zh, de]
never_trained: [de]
identify: {{per_language: 4, methods: [plnd], rho: 0.2, batch_size: 4}}
validate: {{enabled: false}}
train: {{enabled: false, per_language: 3, benign_count: 2, steps: 2, batch_size: 2, max_length: 96}}
evaluate: {{enabled: false, harmful_per_language: 3, contrast_per_language: 2}}
budget:
  enabled: true
  recipes: [precise-shield, random]
  fractions: [0.01, 0.05]
  lora_ranks: {ranks}
"""


def test_the_budget_stage_trains_each_point_scores_it_and_reuses_finished_points(
        tmp_path: Path, tiny_folder: Path, one_thread) -> None:
    """precise-shield and its random control at two budgets and LoRA at two ranks, each trained from the base weights
    and scored with the refusal score on held-out prompts, per language group; a rerun reuses every point, a new rank
    trains only that point; the report shows the curve."""
    from neuroshield.report.report import build_report

    c = _load(tmp_path, BUDGET_RUN.format(model=tiny_folder, out=tmp_path / "runs", ranks="[1, 2]"))
    Pipeline(c).run(("identify", "budget"))
    curve = json.loads((c.run_dir / "budget" / "budget.json").read_text())
    points = {p["name"]: p for p in curve["points"]}
    assert list(points) == ["precise-shield@1%", "precise-shield@5%", "random@1%", "random@5%", "lora-r1", "lora-r2"]
    ps1, ps5 = points["precise-shield@1%"], points["precise-shield@5%"]
    # a larger budget trains more parameters, within it; the random control copies the set's count at each budget
    assert 0 < ps1["parameters_trained"] < ps5["parameters_trained"]
    assert ps1["fraction_trained"] <= 0.01 and ps5["fraction_trained"] <= 0.05
    assert points["random@1%"]["parameters_trained"] == ps1["parameters_trained"]
    # LoRA trains r x (in + out) per module and changes the whole weights once merged
    lora1, lora2 = points["lora-r1"], points["lora-r2"]
    assert lora2["parameters_trained"] == 2 * lora1["parameters_trained"] > 0
    assert lora1["parameters_updated"] == lora2["parameters_updated"] > lora2["parameters_trained"]
    # every point and the base: both rates in every group, on the same prompts (3 harmful per language, 3 languages)
    for p in [curve["base"], *curve["points"]]:
        assert set(p["groups"]) == {"all", "trained", "never-trained"}
        g = p["groups"]["all"]
        assert g["asr"]["n"] == 9 and 0 <= g["asr"]["value"] <= 1
        assert g["exaggerated_refusal"]["n"] == curve["base"]["groups"]["all"]["exaggerated_refusal"]["n"] > 0
        assert p["groups"]["never-trained"]["asr"]["n"] == 3
    # the trained weights differ from the base: the scores move
    assert points["lora-r2"]["scores"] != curve["base"]["scores"]
    # each precise-shield point against the random set at its budget, paired on the same prompts
    assert {k: v["control"] for k, v in curve["vs_random"].items()} == {"precise-shield@1%": "random@1%",
                                                                         "precise-shield@5%": "random@5%"}
    pair = curve["vs_random"]["precise-shield@5%"]["groups"]["trained"]["asr"]
    ps_asr, rnd_asr = (points[n]["groups"]["trained"]["asr"]["value"] for n in ("precise-shield@5%", "random@5%"))
    assert pair["n"] == 6 and abs(pair["value"] - (ps_asr - rnd_asr)) < 1e-9
    assert (c.run_dir / "budget" / "budget.png").stat().st_size > 0
    before = {n: (c.run_dir / "budget" / n / "point.json").stat().st_mtime_ns for n in points}
    # a rerun with one more rank: only that point trains
    c2 = _load(tmp_path, BUDGET_RUN.format(model=tiny_folder, out=tmp_path / "runs", ranks="[1, 2, 4]"), "c2.yaml")
    Pipeline(c2).run(("identify", "budget"))
    after = {n: (c2.run_dir / "budget" / n / "point.json").stat().st_mtime_ns for n in points}
    assert after == before and (c2.run_dir / "budget" / "lora-r4" / "point.json").is_file()
    html = build_report(c2.run_dir).read_text()
    assert 'id="budget"' in html and "lora-r4" in html and "precise-shield@5%" in html


@pytest.mark.parametrize("budget, message", [
    ("{recipes: [ss-expansion]}", r"budget.recipes \['ss-expansion'\]: give precise-shield or random"),
    ("{fractions: [0.0003, 3]}", r"budget.fractions \[3.0\]: give shares of all parameters in \(0, 1\)"),
    ("{fractions: [a]}", r"budget.fractions: expected numbers, got 'a'"),
    ("{lora_ranks: [0]}", r"budget.lora_ranks \[0\]: give ranks >= 1"),
    ("{enabled: true, recipes: [], lora_ranks: []}", r"budget is enabled but has no point"),
])
def test_budget_errors_name_the_key(tmp_path: Path, budget: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, f"budget: {budget}\n", "bad.yaml")
