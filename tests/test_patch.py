"""Safety patches: apply -> revert is bit-exact; wrong or already-patched models are refused."""

from __future__ import annotations

import json

import pytest
import torch

from neuroshield.data.records import PromptRecord
from neuroshield.models.tiny import tiny_model
from neuroshield.neurons.neuronset import NeuronSet
from neuroshield.train.patch import PatchError, apply_patch, patch_info, read_patch, revert_patch
from neuroshield.settings import TrainConfig, TrainOptions
from neuroshield.train.trainer import train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


UNITS = {"0.ffn": [1, 5], "0.attn_v": [2, 9], "1.attn_q": [4], "1.attn_o": [0, 3]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny qwen2 trained with precise-shield for 2 steps; its patch and trained state dict."""
    out = tmp_path_factory.mktemp("patch-run")
    loaded = tiny_model("qwen2")
    ns = NeuronSet({k: torch.tensor(v) for k, v in UNITS.items()},
                   meta={"name": "t", "config_hash": loaded.config_hash, "model_id": loaded.model_id})
    harmful = [PromptRecord(f"h/{i}", f"harmful request {i}", "en", "harmful") for i in range(4)]
    benign = [PromptRecord(f"b/{i}", f"benign request {i}", "en", "benign", reference="Sure, here.") for i in range(4)]
    res = train(loaded, "precise-shield", TrainConfig(steps=2, batch_size=2, max_length=48, benign_answers="reference",
                                                      lr=1e-2), neuron_set=ns, harmful=harmful, benign=benign,
                out_dir=out, options=TrainOptions(export=False, progress=False))
    return res.patch, {k: v.clone() for k, v in loaded.model.state_dict().items()}, ns


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_then_revert_restores_base_bit_exactly(trained):
    patch, trained_state, _ = trained
    loaded = tiny_model("qwen2")
    base = _state(loaded.model)
    apply_patch(loaded, patch)
    patched = loaded.model.state_dict()
    assert all(torch.equal(patched[k], trained_state[k]) for k in base)  # the patch is the trained model
    assert any(not torch.equal(patched[k], base[k]) for k in base)
    revert_patch(loaded, patch)
    assert all(torch.equal(loaded.model.state_dict()[k], base[k]) for k in base)


def test_refuses_double_apply_unpatched_revert_other_model_and_edited_weights(trained):
    patch, _, _ = trained
    loaded = tiny_model("qwen2")
    with pytest.raises(PatchError, match="not patched"):
        revert_patch(loaded, patch)
    apply_patch(loaded, patch)
    snapshot = _state(loaded.model)
    with pytest.raises(PatchError, match="already patched"):
        apply_patch(loaded, patch)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in snapshot.items())
    with pytest.raises(PatchError, match="config hash"):
        apply_patch(tiny_model("qwen2", layers=3), patch)
    other = tiny_model("qwen2", seed=1)  # same architecture, other weights
    before = _state(other.model)
    with pytest.raises(PatchError, match="neither the base weights"):
        apply_patch(other, patch)
    assert all(torch.equal(other.model.state_dict()[k], v) for k, v in before.items())  # unchanged on refusal


def test_patch_info_and_metadata(trained, tmp_path):
    patch, _, ns = trained
    info = patch_info(patch)
    assert info["parameters_touched"] == ns.owned_parameters(tiny_model("qwen2"))
    assert info["size_bytes"] > 0 and info["recipe"] == "precise-shield" and info["neuron_set"] == "t"
    assert set(info["by_layer"]) == {"0", "1"} and sum(info["by_layer"].values()) == info["parameters_touched"]
    assert 0 < info["parameters_changed"] <= info["parameters_touched"]
    meta, entries = read_patch(patch)
    assert {(e.name.split(".")[-2], e.axis) for e in entries} >= {("down_proj", 1), ("v_proj", 0), ("o_proj", 1)}
    sidecar = json.loads(open(str(patch)[: -len(".safetensors")] + ".json").read())
    assert sidecar["parameters_touched"] == meta["parameters_touched"] == info["parameters_touched"]
    assert meta["config_hash"] == tiny_model("qwen2").config_hash
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a patch")
    with pytest.raises(PatchError, match="cannot read"):
        patch_info(bad)


def test_cli_patch_apply_revert_info(trained, tmp_path):
    from typer.testing import CliRunner

    from neuroshield.cli import app

    patch, trained_state, _ = trained
    loaded = tiny_model("qwen2")
    base_dir = tmp_path / "base"
    loaded.model.save_pretrained(base_dir)
    loaded.tokenizer.save_pretrained(base_dir)
    runner = CliRunner()
    r = runner.invoke(app, ["patch", "apply", "--model", str(base_dir), "--patch", patch, "--out",
                            str(tmp_path / "patched")])
    assert r.exit_code == 0, r.output
    from transformers import AutoModelForCausalLM

    patched = AutoModelForCausalLM.from_pretrained(tmp_path / "patched").state_dict()
    assert all(torch.equal(patched[k], trained_state[k]) for k in patched)
    r = runner.invoke(app, ["patch", "revert", "--model", str(tmp_path / "patched"), "--patch", patch, "--out",
                            str(tmp_path / "restored")])
    assert r.exit_code == 0, r.output
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "restored").state_dict()
    base = loaded.model.state_dict()
    assert all(torch.equal(restored[k], base[k]) for k in restored)
    r = runner.invoke(app, ["patch", "apply", "--model", str(tmp_path / "patched"), "--patch", patch, "--out",
                            str(tmp_path / "twice")])
    assert r.exit_code == 2 and "already patched" in r.output
    r = runner.invoke(app, ["patch", "info", patch, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["parameters_touched"] > 0
