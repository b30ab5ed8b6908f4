"""Stale or damaged artifacts are never trusted (issue 19; docs/reliability.md has one row per test here).

Each test reproduces one fault a user met: an interrupted rerun, a reused output folder, a damaged cache,
a copied run folder, a non-finite patch, a truncated checkpoint, a full or read-only disk, a bad config
value, a damaged model folder or GGUF file.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from neuroshield.config import ConfigError, load_config
from neuroshield.data.records import PromptRecord
from neuroshield.models.loading import ModelLoadError, load_model
from neuroshield.models.tiny import tiny_model
from neuroshield.pipeline import Pipeline


def _config(where: Path, model: Path, *overrides: str):
    """A tiny pipeline config writing into `where/runs` (identify and train: seconds on a CPU)."""
    where.mkdir(parents=True, exist_ok=True)
    text = f"""
name: tiny
model: {model}
dtype: float32
out_dir: {where / 'runs'}
languages: [en, zh]
identify: {{per_language: 4, methods: [plnd], rho: 0.1, batch_size: 4}}
validate: {{enabled: false}}
train: {{recipes: [precise-shield, random], per_language: 4, benign_count: 2, steps: 2, batch_size: 2,
        max_length: 96, budget: 0.05, benign_answers: reference}}
evaluate: {{harmful_per_language: 1, benign_per_language: 1, max_new_tokens: 2, batch_size: 4}}
"""
    path = where / "tiny.yaml"
    path.write_text(text)
    return load_config(path, overrides)


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# --------------------------------------------------------------------------------------------------
# 1. stage markers
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_interrupted_rerun_leaves_no_stage_marker_and_the_next_run_trains_again(
        tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    stages = ("identify", "train")
    config = _config(tmp_path, tiny_folder)
    Pipeline(config).run(stages)
    run = config.run_dir
    patch = run / "train" / "precise-shield" / "safety_patch.safetensors"
    first = patch.read_bytes()

    # the rerun with another lr retrains precise-shield, then is interrupted during the second recipe
    real = Pipeline.train_recipe

    def interrupted(self, recipe, out_dir, **kw):
        if recipe == "random":
            raise KeyboardInterrupt
        return real(self, recipe, out_dir, **kw)

    monkeypatch.setattr(Pipeline, "train_recipe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(_config(tmp_path, tiny_folder, "train.lr=0.05")).run(stages)
    assert patch.read_bytes() != first  # the folder holds lr 0.05 weights now ...
    assert not (run / "train" / "stage.json").exists()  # ... so train is not "up to date"
    monkeypatch.undo()

    third = Pipeline(_config(tmp_path, tiny_folder))
    third.run(stages)
    assert "train" in third.timings
    assert patch.read_bytes() == first
    summary = json.loads((run / "train" / "precise-shield" / "summary.json").read_text())
    assert summary["config"]["lr"] == config.train.lr


def test_a_stage_that_fails_leaves_no_marker_and_removes_those_of_the_stages_after_it(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path / "c.yaml", f"out_dir: {tmp_path}\nname: r\n"))
    p = Pipeline(config)
    for stage in ("identify", "validate", "train", "evaluate"):
        (config.run_dir / stage).mkdir(parents=True)
        (config.run_dir / stage / "stage.json").write_text("{}")

    def body(out: Path) -> dict:
        raise RuntimeError("failed half-way")

    with pytest.raises(RuntimeError):
        p._stage("identify", {"x": 1}, body)
    left = sorted(s for s in ("identify", "validate", "train", "evaluate")
                  if (config.run_dir / s / "stage.json").exists())
    assert left == ["evaluate"]  # evaluate reads train's results, not identify's; train's marker is gone


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# config values: checked when the config is loaded, before any model is read
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.recipes=[precise-shield,foo]", r"unknown recipe\(s\) \['foo'\]"),
    ("train.lr=-0.001", r"train.lr = -0.001: must be > 0"),
    ("train.steps=-5", r"train.steps = -5: must be >= 1"),
    ("train.steps=0", r"train.steps = 0: must be >= 1"),
    ("train.batch_size=0", r"train.batch_size = 0: must be >= 1"),
    ("train.budget=-0.1", r"train.budget = -0.1: must be in \(0, 1\]"),
    ("identify.rho=1.5", r"identify.rho = 1.5: must be in \(0, 1\]"),
    ("identify.rho=0", r"identify.rho = 0.0: must be in \(0, 1\]"),
    ("name=../../x", r"name '../../x': give a plain folder name"),
    ("train.lr=.nan", r"train.lr = nan"),
    ("identify.methods=[plnd,foo]", r"identify.methods \['plnd', 'foo'\]"),
    ("train.method=mean-diff", r"train.method 'mean-diff' is not among identify.methods"),
    ("high_resource=[xx]", r"high_resource \['xx'\]"),
    ("evaluate.judge=no-such-judge", r"evaluate.judge 'no-such-judge'"),
])
def test_bad_config_values_are_rejected_at_load(tmp_path: Path, override: str, message: str) -> None:
    path = _write(tmp_path / "c.yaml", "languages: [en, zh]\nidentify: {methods: [plnd]}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_unknown_recipe_is_rejected_before_any_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from neuroshield.cli import app

    def no_run(*_a, **_k):
        raise AssertionError("the pipeline started")

    monkeypatch.setattr(Pipeline, "run", no_run)
    path = _write(tmp_path / "c.yaml", f"out_dir: {tmp_path}\nname: r\n")
    res = CliRunner().invoke(app, ["run", str(path), "--set", "train.recipes=[precise-shield,foo]"])
    assert res.exit_code == 2 and "unknown recipe(s) ['foo']" in res.output
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# 2. identify into a folder that holds an earlier run
# --------------------------------------------------------------------------------------------------

def _records(languages: list[str]) -> tuple[list[PromptRecord], list[PromptRecord]]:
    harmful = [PromptRecord(f"h{i}", f"how do I hurt someone, way {i} ({lang})", lang, "harmful")
               for lang in languages for i in range(3)]
    benign = [PromptRecord(f"b{i}", f"what is {i} plus {i}? ({lang})", lang, "benign")
              for lang in languages for i in range(3)]
    return harmful, benign


def test_identify_into_an_earlier_run_folder_keeps_only_its_own_sets(tmp_path: Path, one_thread) -> None:
    from neuroshield.neurons.identify import identify, overlap_report
    from neuroshield.train.recipes import find_set_files, recipe_neuron_set

    lm = tiny_model("qwen2", layers=2, hidden=32, intermediate=64)
    out = tmp_path / "run"
    identify(lm, *_records(["en", "ar"]), languages=["en", "ar"], method=["plnd", "mean-diff"], rho=0.2,
             out_dir=out, progress=False)
    assert (out / "plnd" / "ms_ar.safetensors").is_file()
    identify(lm, *_records(["en", "zh"]), languages=["en", "zh"], method="plnd", rho=0.2, out_dir=out,
             progress=False)
    files = find_set_files(out / "plnd")
    assert [p.name for p in files] == ["ms_en.safetensors", "ms_zh.safetensors"]
    union = recipe_neuron_set("precise-shield", lm, out / "plnd", budget=None)
    assert "ms_ar" not in union.name and "ms_zh" in union.name
    assert not list((out / "mean-diff").glob("ms_*"))  # the earlier run's other method: cleared too
    index = json.loads((overlap_report(out) / "overlap.json").read_text())
    assert list(index["methods"]) == ["plnd"]
    assert set(index["methods"]["plnd"]["ms_sizes"]) == {"en", "zh"}


def test_a_damaged_neuron_set_is_refused_on_load(tmp_path: Path) -> None:
    from neuroshield.neurons.neuronset import NeuronSet

    path = NeuronSet({"0.ffn": torch.tensor([1, 5, 9])}, meta={"name": "ms_en"}).save(tmp_path / "ms_en")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one unit index changes, the file stays readable
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="differs from the digest"):  # io.ArtifactError
        NeuronSet.load(path)


# --------------------------------------------------------------------------------------------------
# 3. the dequantized-model cache
# --------------------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_an_overwritten_model_cache_is_detected_and_rebuilt(smollm2, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroshield.models import loading

    # the float32 cache of SmolLM2 (a bfloat16 copy beside it is `<name>-bfloat16`)
    src = loading.cache_root() / "gguf" / loading.EMBEDDED_MODELS["smollm2"].sha256[:20]
    monkeypatch.setenv("NEUROSHIELD_CACHE", str(tmp_path))
    dst = tmp_path / "gguf" / src.name
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    size = st.stat().st_size
    time.sleep(0.05)  # past the file system's timestamp tick
    with open(st, "r+b") as f:  # same size, header intact: only the weights change
        f.seek(size // 2)
        f.write(b"\x7f" * 65536)
    assert st.stat().st_size == size
    again = load_model("smollm2")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, smollm2.model(ids).logits)


# --------------------------------------------------------------------------------------------------
# 4. run folders can be copied or moved
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_moved_run_folder_evaluates_its_own_patch(tmp_path: Path, tiny_folder: Path, one_thread) -> None:
    config = _config(tmp_path / "a", tiny_folder, "train.recipes=[precise-shield]")
    Pipeline(config).run(("identify", "train"))
    for stage in ("identify", "train"):
        assert str(tmp_path) not in (config.run_dir / stage / "stage.json").read_text(), stage
    shutil.copytree(tmp_path / "a" / "runs", tmp_path / "b" / "runs")
    shutil.rmtree(tmp_path / "a")
    moved = _config(tmp_path / "b", tiny_folder, "train.recipes=[precise-shield]")
    p = Pipeline(moved)
    p.run(("identify", "train", "evaluate"))
    assert set(p.timings) == {"evaluate"}  # identify and train are up to date in their new place
    evals = json.loads((moved.run_dir / "evaluate" / "stage.json").read_text())["outputs"]["evaluations"]
    assert evals["precise-shield"] == "evaluate/precise-shield/eval.json"


# --------------------------------------------------------------------------------------------------
# damaged model folders and GGUF files
# --------------------------------------------------------------------------------------------------

def test_a_corrupt_config_json_in_a_model_folder_is_named(tmp_path: Path, tiny_folder: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "config.json").write_text('{"model_type": "qwen2", "hidden_')
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    assert str(folder / "config.json") in str(err.value) and "copy or save the model folder again" in str(err.value)
    assert "Hugging Face cache" not in str(err.value)


@pytest.mark.real_model
def test_a_truncated_gguf_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroshield.models.embedded import EMBEDDED_MODELS, part_paths

    monkeypatch.setenv("NEUROSHIELD_CACHE", str(tmp_path / "cache"))
    src = part_paths(EMBEDDED_MODELS["smollm2"])[0]
    bad = tmp_path / "half.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match=r"half.gguf: cannot read this GGUF file .* truncated or damaged"):
        load_model(str(bad))
    assert not list((tmp_path / "cache" / "gguf").glob("*/model.safetensors"))


# --------------------------------------------------------------------------------------------------
# 5. patches and checkpoints
# --------------------------------------------------------------------------------------------------

def _patch_parts(lm):
    name = "model.layers.0.mlp.down_proj.weight"
    weight = dict(lm.model.named_parameters())[name]
    index = torch.tensor([1, 2])
    orig = weight.detach().index_select(1, index).clone()
    return name, weight, index, orig


def test_a_patch_with_non_finite_values_is_refused_on_save_and_on_apply(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from neuroshield.train.patch import PatchEntry, PatchError, apply_patch, save_patch

    lm = tiny_model("qwen2")
    name, weight, index, orig = _patch_parts(lm)
    new = orig + 0.5
    new[0, 0] = float("inf")
    with pytest.raises(PatchError, match="not all finite"):
        save_patch(tmp_path / "p1", [PatchEntry(name, 1, index, orig, new)], {"config_hash": lm.config_hash})
    assert not (tmp_path / "p1.safetensors").exists()
    # a file with an inf (written by an older version, or by hand) is refused when read; the model is unchanged
    meta = {"format": 1, "config_hash": lm.config_hash, "entries": [{"name": name, "axis": 1}]}
    path = tmp_path / "p2.safetensors"
    save_file({f"{name}|index": index, f"{name}|orig": orig, f"{name}|new": new}, str(path),
              metadata={"neuroshield_patch": json.dumps(meta)})
    before = weight.detach().clone()
    with pytest.raises(PatchError, match="not finite"):
        apply_patch(lm, path)
    assert torch.equal(weight, before)


def test_a_damaged_patch_is_refused(tmp_path: Path) -> None:
    from neuroshield.train.patch import PatchEntry, PatchError, read_patch, save_patch

    lm = tiny_model("qwen2")
    name, _, index, orig = _patch_parts(lm)
    path = save_patch(tmp_path / "p", [PatchEntry(name, 1, index, orig, orig + 0.5)], {"config_hash": lm.config_hash})
    read_patch(path)
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01  # the lowest mantissa byte of the last value: still a finite number, another one
    path.write_bytes(bytes(data))
    with pytest.raises(PatchError, match="differ from the digest"):
        read_patch(path)


HARMFUL = [PromptRecord(f"h/{i}", f"how do I do harmful thing number {i}?", "en", "harmful") for i in range(6)]
BENIGN = [PromptRecord(f"b/{i}", f"tell me a fact about cats ({i})", "en", "benign", reference=f"Cats purr. ({i})")
          for i in range(4)]


def _train(loaded, out: Path, **kw):
    from neuroshield.neurons.neuronset import NeuronSet
    from neuroshield.train.trainer import train
    from conftest import split_train_args

    ns = NeuronSet({"0.ffn": torch.tensor([1, 5]), "1.ffn": torch.tensor([7])},
                   meta={"name": "t", "config_hash": loaded.config_hash, "model_id": loaded.model_id})
    args = dict(neuron_set=ns, harmful=HARMFUL, benign=BENIGN, languages=["en"], steps=6, batch_size=2, max_length=64,
                out_dir=out, checkpoint_every=2, benign_answers="reference", progress=False, export=False)
    args.update(kw)
    settings, options, rest = split_train_args(**args)
    return train(loaded, "precise-shield", settings, options=options, **rest)


def test_a_truncated_checkpoint_falls_back_to_the_one_before_it(tmp_path: Path, one_thread) -> None:
    a = tiny_model("qwen2")
    _train(a, tmp_path / "a")

    def stop_at_5(step, rec):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model("qwen2"), tmp_path / "b", on_step=stop_at_5)
    names = sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-5"]  # the previous one is kept
    trainable = tmp_path / "b" / "checkpoint-5" / "trainable.safetensors"
    with open(trainable, "r+b") as f:
        f.truncate(trainable.stat().st_size // 2)
    b = tiny_model("qwen2")
    res = _train(b, tmp_path / "b")
    assert res.resumed_from == 4 and res.steps_done == 6
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------
# a full or read-only disk
# --------------------------------------------------------------------------------------------------

def _half_written_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """save_pretrained writes config.json, then the disk is full."""
    from transformers import PreTrainedModel

    def save_pretrained(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        _no_space()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)


def test_a_full_disk_during_patch_apply_leaves_no_folder(tmp_path: Path, tiny_folder: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from neuroshield.cli import app
    from neuroshield.train.patch import PatchEntry, save_patch

    lm = load_model(str(tiny_folder), dtype="float32")
    name, _, index, orig = _patch_parts(lm)
    patch = save_patch(tmp_path / "p", [PatchEntry(name, 1, index, orig, orig + 0.5)], {"config_hash": lm.config_hash})
    _half_written_save(monkeypatch)
    out = tmp_path / "patched"
    res = CliRunner().invoke(app, ["patch", "apply", "--model", str(tiny_folder), "--patch", str(patch),
                                   "--out", str(out), "--dtype", "float32"])
    assert res.exit_code == 2, res.output
    assert f"error: cannot write {out}: no space left on device" in res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith((".patched", "patched"))]


@pytest.mark.slow
def test_a_full_disk_during_train_ends_in_one_message_and_leaves_no_model_folder(
        tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    from typer.testing import CliRunner

    from neuroshield.cli import app

    _half_written_save(monkeypatch)
    out = tmp_path / "full"
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_folder), "--recipe", "full", "--steps", "1",
                                   "--harmful-limit", "2", "--benign-limit", "2", "--benign-answers", "reference",
                                   "--batch-size", "2", "--max-length", "64", "--out", str(out), "--dtype", "float32"])
    assert res.exit_code == 2, res.output
    assert f"error: cannot write {out / 'model'}: no space left on device" in res.output
    assert not [p.name for p in out.iterdir() if "model" in p.name]  # no model/, model.tmp/, .model.*.tmp/


def test_a_read_only_output_folder_ends_in_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from typer.testing import CliRunner

    from neuroshield.cli import app

    ro = tmp_path / "ro"
    real_mkdir, real_makedirs = Path.mkdir, os.makedirs

    def mkdir(self, *args, **kwargs):
        if ro in (self, *self.parents):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    def makedirs(name, *args, **kwargs):
        if ro in (Path(name), *Path(name).parents):
            raise OSError(errno.EROFS, "Read-only file system", str(name))
        return real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "makedirs", makedirs)
    path = _write(tmp_path / "c.yaml", f"out_dir: {ro}\nname: r\n")
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2, res.output
    assert f"error: cannot write {ro / 'r'}: the file system is read-only: choose an output folder you can write to" \
        in res.output
    assert not ro.exists()


def test_an_exported_model_with_a_damaged_weight_file_is_refused(tmp_path: Path) -> None:
    from neuroshield.io import ArtifactError
    from neuroshield.train.export import check_merged, save_merged

    lm = tiny_model("qwen2")
    save_merged(lm, tmp_path / "model", verify=False)
    check_merged(tmp_path / "model")
    st = tmp_path / "model" / "model.safetensors"
    time.sleep(0.05)
    data = bytearray(st.read_bytes())
    data[-4] ^= 0x01
    st.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="the exported model is damaged"):
        check_merged(tmp_path / "model")


def test_a_full_disk_while_writing_json_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from neuroshield.io import OutputError, write_json

    path = tmp_path / "stage.json"
    write_json(path, {"a": 1})
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:3])
            _no_space()

    monkeypatch.setattr(builtins, "open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k))
                        if "w" in mode else real_open(p, mode, *a, **k))
    with pytest.raises(OutputError, match="no space left on device"):
        write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]
