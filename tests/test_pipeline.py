"""The whole pipeline on a tiny random model saved to a folder: every stage runs, writes its
artifacts, and a rerun skips finished stages."""

from __future__ import annotations

import dataclasses
import json
from types import MappingProxyType
from pathlib import Path

import pytest

from neuroshield.config import ConfigError, PipelineConfig, load_config
from neuroshield.pipeline import Pipeline


def _config(tmp_path: Path, model: Path) -> PipelineConfig:
    text = f"""
name: tiny
model: {model}
out_dir: {tmp_path / 'runs'}
languages: [en, zh]
identify: {{per_language: 4, methods: [plnd, precise-shield], rho: 0.1, batch_size: 4}}
validate: {{per_language: 2, controls: 1, max_new_tokens: 4, benign_guard: 2, batch_size: 4,
           suppress_mode: 'mean:benign'}}
train: {{recipes: [precise-shield, random], per_language: 4, benign_count: 2, steps: 2, batch_size: 2,
        max_length: 96, budget: 0.05}}
evaluate: {{harmful_per_language: 2, benign_per_language: 2, max_new_tokens: 4, batch_size: 4}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_resumes(tmp_path: Path, tiny_folder: Path, monkeypatch) -> None:
    config = _config(tmp_path, tiny_folder)
    report = Pipeline(config).run()
    run = config.run_dir
    assert report.is_file() and report.name == "report.html"
    for stage in ("identify", "validate", "train", "evaluate"):
        assert (run / stage / "stage.json").is_file(), stage
    assert (run / "identify" / "plnd" / "ms_en.safetensors").is_file()
    suppressed = json.loads((run / "validate" / "suppress-ms-en" / "validation.json").read_text())
    assert suppressed["config"]["mode"] == "mean:en/text/benign"
    assert (run / "train" / "precise-shield" / "safety_patch.safetensors").is_file()
    evals = json.loads((run / "evaluate" / "stage.json").read_text())["outputs"]["evaluations"]
    assert set(evals) == {"base", "precise-shield", "random"}
    html = report.read_text()
    assert "data:image/png;base64" in html

    again = Pipeline(config)
    again.run()
    assert again.timings == {}  # every stage was up to date

    # a changed stage input reruns that stage (and those after it), not the ones before
    config.evaluate.harmful_per_language = 1
    third = Pipeline(config)
    third.run()
    assert set(third.timings) == {"evaluate"}

    # a changed judge (its rules: here one more refusal phrase) judges the cached answers again
    from neuroshield.judges import phrase

    stage = json.loads((run / "evaluate" / "stage.json").read_text())
    en = phrase.PHRASES["en"]
    changed = {**phrase.PHRASES, "en": dataclasses.replace(en, refusals=(*en.refusals, "zzz never said"))}
    monkeypatch.setattr(phrase, "PHRASES", MappingProxyType(changed))
    fourth = Pipeline(config)
    fourth.run()
    assert set(fourth.timings) == {"evaluate"}
    assert json.loads((run / "evaluate" / "stage.json").read_text())["inputs"]["judge"] != stage["inputs"]["judge"]


@pytest.mark.parametrize("text, message", [
    ("train: {stepz: 3}", r"bad.yaml.train: unknown key\(s\) \['stepz'\]"),
    ("validate: {suppress_mode: mean}", "validate.suppress_mode 'mean': give zero or mean:benign"),
    ("train: {neuron_parts: rows}", "train.neuron_parts 'rows'"),
    ("train: {trim: depth}", "train.trim 'depth': give score or layer"),
    ("train: {set_languages: [en, xx]}", r"train.set_languages \['xx'\] are not in languages"),
    ("train: {harmful: advbnech}", "train.harmful 'advbnech': not a known data set"),
    ("identify: {rho: high}", "identify.rho: expected a number"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"quick.yaml", "full.yaml", "vlm-llava.yaml", "vlm-qwen2vl.yaml"} <= set(names)
    for name in names:
        assert load_config(root / name).languages


@pytest.mark.slow
def test_pipeline_with_image_modality_on_a_tiny_vlm(tmp_path: Path) -> None:
    """modalities: [text, image] renders the harmful prompts FigStep-style and carries image groups through
    identify (image sets), validate (image experiments), train (image examples) and evaluate (ASR per modality)."""
    from neuroshield.models.tiny_vlm import save_tiny_vlm, tiny_vlm

    folder = tmp_path / "tiny-llava"
    save_tiny_vlm(tiny_vlm("llava"), folder)
    path = tmp_path / "vlm.yaml"
    path.write_text(f"""
name: tiny-vlm
model: {folder}
out_dir: {tmp_path / 'runs'}
languages: [en, de]
modalities: [text, image]
identify: {{per_language: 3, methods: [plnd], rho: 0.1, batch_size: 4}}
validate: {{per_language: 2, controls: 1, max_new_tokens: 3, benign_guard: 2, batch_size: 4}}
train: {{recipes: [precise-shield], per_language: 3, benign_count: 2, steps: 2, batch_size: 2, max_length: 96,
        budget: 0.05}}
evaluate: {{harmful_per_language: 2, benign_per_language: 1, max_new_tokens: 3, batch_size: 4}}
""")
    config = load_config(path)
    report = Pipeline(config).run()
    run = config.run_dir
    assert (run / "identify" / "plnd" / "ss_de_image.safetensors").is_file()
    assert (run / "validate" / "suppress-ms-en_image" / "validation.json").is_file()
    examples = (run / "train" / "precise-shield" / "examples.jsonl").read_text()
    assert '"image": "' in examples
    rows = json.loads((run / "evaluate" / "precise-shield" / "eval.json").read_text())
    assert "image" in json.dumps(rows)
    assert report.is_file()


def test_image_modality_on_a_text_model_is_refused(tmp_path: Path, tiny_folder: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: x\nmodel: {tiny_folder}\nout_dir: {tmp_path}\nmodalities: [text, image]\n")
    with pytest.raises(ValueError, match="text model"):
        Pipeline(load_config(path)).run()
    path.write_text("modalities: [audio]\n")
    with pytest.raises(ConfigError, match="modalities"):
        load_config(path)


def test_overrides_replace_single_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ntrain: {steps: 3, recipes: [precise-shield]}\n")
    c = load_config(path, ["train.steps=60", "train.recipes=[lora, full]", "name=b", "evaluate.enabled=false"])
    assert (c.train.steps, c.train.recipes, c.name, c.evaluate.enabled) == (60, ["lora", "full"], "b", False)
    with pytest.raises(ConfigError, match=r"train: unknown key.*stepz"):
        load_config(path, ["train.stepz=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.steps"])


def test_override_values_are_read_like_yaml_numbers_and_sources(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: a\n")
    c = load_config(path, ["train.lr=5e-3", "identify.harmful=xsafety:Crimes_And_Illegal_Activities,Insult"])
    assert c.train.lr == 0.005
    assert c.identify.harmful == ["xsafety:Crimes_And_Illegal_Activities,Insult"]
    with pytest.raises(ConfigError, match="whole number"):
        load_config(path, ["train.steps=60.5"])


@pytest.mark.slow
def test_changed_training_settings_do_not_resume_stale_checkpoints(tmp_path: Path, tiny_folder: Path) -> None:
    config = _config(tmp_path, tiny_folder)
    config.validate.enabled = False
    config.evaluate.enabled = False
    config.train.recipes = ["precise-shield"]
    config.train.steps = 4
    Pipeline(config).run()
    config.train.steps = 2  # fewer steps: the 4-step checkpoint must not be exported as the result
    config.train.lr = 0.002
    Pipeline(config).run()
    summary = json.loads((config.run_dir / "train" / "precise-shield" / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["resumed_from"] is None


def test_a_neuron_only_change_does_not_train_lora_again(tmp_path: Path, tiny_folder: Path) -> None:
    config = _config(tmp_path, tiny_folder)
    config.validate.enabled = False
    config.evaluate.enabled = False
    config.train.recipes = ["precise-shield", "lora"]
    Pipeline(config).run()
    out = config.run_dir / "train"
    before = {r: (out / r / "summary.json").stat().st_mtime_ns for r in ("precise-shield", "lora")}
    config.train.lr = 0.02  # the neuron recipes' learning rate: LoRA is reused
    Pipeline(config).run()
    after = {r: (out / r / "summary.json").stat().st_mtime_ns for r in ("precise-shield", "lora")}
    assert after["lora"] == before["lora"] and after["precise-shield"] != before["precise-shield"]
    config.train.steps += 1  # a shared key: both train again
    Pipeline(config).run()
    again = {r: (out / r / "summary.json").stat().st_mtime_ns for r in ("precise-shield", "lora")}
    assert again["lora"] != after["lora"] and again["precise-shield"] != after["precise-shield"]
