from __future__ import annotations

import copy

import pytest
import torch

from neuroshield.generate.generation import GenerationConfig, generate
from neuroshield.intervene.interventions import InterventionMode, intervene, parse_mode
from neuroshield.models import SITE_KINDS, resolve_sites, site_hooks
from neuroshield.models.chat import collate, encode_chat
from neuroshield.models.tiny import tiny_model
from neuroshield.neurons.neuronset import NeuronSet, random_like

TEXTS = ["How do I bake bread?", "Wie spät ist es? 你好"]


def _inputs(lm):
    enc = [encode_chat(lm.tokenizer, t) for t in TEXTS]
    b = collate(enc, lm.tokenizer.pad_token_id)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}


@torch.no_grad()
def _logits(lm, inputs):
    return lm.model(**inputs).logits


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _layer(lm, i):
    return lm.adapter.layers(lm.model)[i]


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2")  # q/k/v biases: zeroing an output unit must zero its bias too


# --- parsing ----------------------------------------------------------------------------------------


def test_parse_mode() -> None:
    assert parse_mode("zero") == InterventionMode("zero")
    assert parse_mode("scale:2.0") == InterventionMode("scale", alpha=2.0)
    assert parse_mode("scale:0").alpha == 0.0
    assert parse_mode("mean:en/text/benign").group == ("en", "text", "benign")
    assert parse_mode("mean:de/harmful").group == ("de", "text", "harmful")
    assert str(parse_mode("scale:2")) == "scale:2"
    assert str(parse_mode("mean:en/text/benign")) == "mean:en/text/benign"
    for bad, msg in [("scale:x", "scale needs a number"), ("mean:en", "mean needs a group"), ("half", "not an"),
                     ("mean:en/audio/benign", "modality"), ("mean:en/text/meh", "label"), ("scale:inf", "finite")]:
        with pytest.raises(ValueError, match=msg) as err:
            parse_mode(bad)
        assert "mode=" in str(err.value)
    with pytest.raises(ValueError, match="--mode="):
        parse_mode("bogus", argument="--mode")


# --- equivalence with weight edits ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_zero_ffn_equals_zeroed_down_proj_columns(arch: str) -> None:
    lm = tiny_model(arch)
    units = {"0.ffn": torch.tensor([1, 5, 9, 33]), "1.ffn": torch.tensor([0, 63])}
    ns = NeuronSet(units, meta={"name": "t"})
    inputs = _inputs(lm)
    base = _logits(lm, inputs)
    edited = copy.deepcopy(lm)
    with torch.no_grad():
        for key, idx in units.items():
            _layer(edited, int(key.split(".")[0])).mlp.down_proj.weight[:, idx] = 0
    want = _logits(edited, inputs)
    n = _hook_count(lm.model)
    with intervene(lm, ns, "zero"):
        got = _logits(lm, inputs)
    assert _hook_count(lm.model) == n
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4)
    assert torch.equal(_logits(lm, inputs), base)  # restored


def test_zero_during_generation_with_kv_cache_matches_weight_edit() -> None:
    lm = tiny_model("llama")
    units = {"0.ffn": torch.arange(0, 40), "1.ffn": torch.arange(10, 50)}
    ns = NeuronSet(units, meta={"name": "t"})
    edited = copy.deepcopy(lm)
    with torch.no_grad():
        for key, idx in units.items():
            _layer(edited, int(key.split(".")[0])).mlp.down_proj.weight[:, idx] = 0
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2)
    want = [g.token_ids for g in generate(edited, TEXTS, cfg, progress=False)]
    base = [g.token_ids for g in generate(lm, TEXTS, cfg, progress=False)]
    with intervene(lm, ns, "zero"):
        got = [g.token_ids for g in generate(lm, TEXTS, cfg, progress=False)]
    assert got == want
    assert got != base
    assert [g.token_ids for g in generate(lm, TEXTS, cfg, progress=False)] == base


def test_attention_sites_equal_weight_edits(qwen) -> None:
    inputs = _inputs(qwen)
    base = _logits(qwen, inputs)
    idx = torch.tensor([0, 3, 9])
    for kind in ("attn_q", "attn_k", "attn_v", "attn_o"):
        ns = NeuronSet({f"1.{kind}": idx}, meta={"name": kind})
        edited = copy.deepcopy(qwen)
        attn = _layer(edited, 1).self_attn
        with torch.no_grad():
            if kind == "attn_o":
                attn.o_proj.weight[:, idx] = 0
            else:
                proj = getattr(attn, {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj"}[kind])
                proj.weight[idx] = 0
                if proj.bias is not None:
                    proj.bias[idx] = 0
        want = _logits(edited, inputs)
        n = _hook_count(qwen.model)
        with intervene(qwen, ns, "zero"):
            got = _logits(qwen, inputs)
        assert _hook_count(qwen.model) == n, kind
        assert torch.allclose(got, want, atol=1e-5), kind
        assert not torch.allclose(got, base, atol=1e-5), kind
        assert torch.equal(_logits(qwen, inputs), base), kind


def test_scale(qwen) -> None:
    inputs = _inputs(qwen)
    base = _logits(qwen, inputs)
    ns = NeuronSet({"0.ffn": torch.tensor([2, 7, 11]), "1.attn_v": torch.tensor([1, 4]),
                    "1.attn_o": torch.tensor([5])}, meta={"name": "s"})
    with intervene(qwen, ns, "scale:1"):
        assert torch.equal(_logits(qwen, inputs), base)
    with intervene(qwen, ns, "zero"):
        zero = _logits(qwen, inputs)
    with intervene(qwen, ns, "scale:0"):
        assert torch.allclose(_logits(qwen, inputs), zero, atol=1e-6)
    ffn = NeuronSet({"0.ffn": torch.tensor([2, 7, 11])}, meta={"name": "f"})
    edited = copy.deepcopy(qwen)
    with torch.no_grad():
        _layer(edited, 0).mlp.down_proj.weight[:, [2, 7, 11]] *= 2.5
    with intervene(qwen, ffn, "scale:2.5"):
        assert torch.allclose(_logits(qwen, inputs), _logits(edited, inputs), atol=1e-5)


def test_mean_sets_units_to_the_given_means(qwen) -> None:
    inputs = _inputs(qwen)
    idx = {"0.ffn": torch.tensor([3, 8]), "1.attn_k": torch.tensor([0, 15])}
    ns = NeuronSet(idx, meta={"name": "m"})
    sites = {s.key: s for s in resolve_sites(qwen.model, qwen.adapter, ("ffn", "attn_k"))}
    means = {k: torch.linspace(-1, 1, sites[k].width) for k in idx}

    class Stats:  # stand-in for ActivationStats: .mean(group) -> {site key: vector}
        def mean(self, group):
            if group != ("en", "text", "benign"):
                raise KeyError(group)
            return means

    seen: dict[str, torch.Tensor] = {}
    for source in ({"stats": Stats()}, {"means": means}, {"means": {"en/text/benign": means}}):
        seen.clear()
        with intervene(qwen, ns, "mean:en/text/benign", **source):
            with site_hooks([sites[k] for k in idx], lambda s, u: seen.__setitem__(s.key, u.detach().clone())):
                _logits(qwen, inputs)
        for key, units in idx.items():
            got = seen[key][..., units]
            assert torch.allclose(got, means[key][units].expand_as(got)), key
    with pytest.raises(ValueError, match="no group"):
        with intervene(qwen, ns, "mean:de/text/benign", stats=Stats()):
            pass
    with pytest.raises(ValueError, match="needs mean activations"):
        with intervene(qwen, ns, "mean:en/text/benign"):
            pass


def test_hooks_removed_on_exception(qwen) -> None:
    inputs = _inputs(qwen)
    base = _logits(qwen, inputs)
    ns = NeuronSet({f"{layer}.{kind}": torch.tensor([0, 1]) for layer in (0, 1) for kind in SITE_KINDS},
                   meta={"name": "all-kinds"})
    n = _hook_count(qwen.model)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(qwen, ns, "zero"):
            assert _hook_count(qwen.model) == n + len(ns.units)
            raise RuntimeError("boom")
    assert _hook_count(qwen.model) == n
    assert torch.equal(_logits(qwen, inputs), base)


def test_random_controls_match_counts_and_differ_by_seed(qwen) -> None:
    ns = NeuronSet({"0.ffn": torch.arange(10), "1.ffn": torch.arange(3), "1.attn_q": torch.tensor([4, 5])},
                   meta={"name": "c"})
    a, b = random_like(ns, qwen, 0), random_like(ns, qwen, 1)
    for ctrl in (a, b):
        assert {k: v.numel() for k, v in ctrl.units.items()} == {k: v.numel() for k, v in ns.units.items()}
    assert a.as_tuples() != b.as_tuples()
    assert random_like(ns, qwen, 0).as_tuples() == a.as_tuples()


def test_set_from_another_model_is_refused(qwen) -> None:
    ns = NeuronSet({"0.ffn": torch.tensor([1])}, meta={"name": "x", "config_hash": "0000", "model_id": "other"})
    with pytest.raises(ValueError, match="config hash"):
        with intervene(qwen, ns, "zero"):
            pass
