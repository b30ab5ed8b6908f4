"""Sparse neuron-only deltas: only owned rows/columns change, and the update equals dense gradient masking."""

from __future__ import annotations

import copy

import pytest
import torch

from neuroshield.models.sites import resolve_sites
from neuroshield.models.tiny import tiny_model
from neuroshield.neurons.neuronset import NeuronSet
from neuroshield.train.sparse import SparseDeltaError, SparseDeltas, SliceSpec, dense_masks, slices_from_neuron_set


def _set(loaded, units):
    return NeuronSet({k: torch.tensor(v) for k, v in units.items()},
                     meta={"name": "t", "config_hash": loaded.config_hash, "model_id": loaded.model_id})


# every site kind, including GQA k/v (2 kv heads of 4) and the qwen2 q/k/v biases
UNITS = {"0.ffn": [1, 5, 60], "0.attn_k": [0, 9], "0.attn_v": [3, 15], "1.attn_q": [2, 31], "1.attn_o": [4, 30],
         "1.ffn": [0, 63]}


def _batch(seed=0, b=3, t=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (b, t), generator=g)


def _loss(model, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.loss


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_only_owned_slices_change_after_training(model_type):
    loaded = tiny_model(model_type)
    model = loaded.model
    before = _snapshot(model)
    slices = slices_from_neuron_set(loaded, _set(loaded, UNITS))
    deltas = SparseDeltas(model, slices)
    opt = torch.optim.AdamW(deltas.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        _loss(model, _batch(step)).backward()
        torch.nn.utils.clip_grad_norm_(deltas.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    # the base model never gets a gradient, and nothing outside the deltas is trainable
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in deltas.parameters()}
    deltas.merge()
    deltas.detach()
    after = model.state_dict()
    masks = dense_masks(model, slices)
    assert set(before) == set(after)
    for name, old in before.items():
        new = after[name]
        if name not in masks:
            assert torch.equal(old, new), f"{name} changed but no selected neuron owns it"
        else:
            m = masks[name]
            assert torch.equal(old[~m], new[~m]), f"{name}: entries outside the owned slices changed"
            assert not torch.equal(old[m], new[m]), f"{name}: owned slices did not change"
    # every site kind of the set was touched (GQA k/v rows of a 16-row k_proj, q bias, o columns)
    touched = {name for name, _, _ in deltas.touched()}
    for part in ("k_proj.weight", "v_proj.weight", "q_proj.weight", "o_proj.weight", "down_proj.weight"):
        assert any(n.endswith(part) for n in touched)
    if model_type == "qwen2":
        assert any(n.endswith("k_proj.bias") for n in touched)


def test_trainable_count_equals_owned_parameters():
    loaded = tiny_model("qwen2")
    ns = _set(loaded, UNITS)
    deltas = SparseDeltas(loaded.model, slices_from_neuron_set(loaded, ns))
    assert deltas.num_trainable() == ns.owned_parameters(loaded)


def _dense_masked_sgd(model, masks, lr, steps, clip=None):
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    for step in range(steps):
        model.zero_grad()
        _loss(model, _batch(step)).backward()
        with torch.no_grad():
            for name, p in params.items():  # mask first ...
                if name in masks:
                    p.grad.mul_(masks[name].to(p.grad.dtype))
                else:
                    p.grad.zero_()
            if clip is not None:  # ... then clip (the order the DESIGN notes ask for)
                torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
            for p in params.values():
                p.sub_(lr * p.grad)


def _sparse_sgd(model, slices, lr, steps, clip=None):
    deltas = SparseDeltas(model, slices)
    opt = torch.optim.SGD(deltas.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        _loss(model, _batch(step)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(deltas.parameters(), clip)
        opt.step()
    deltas.merge()
    deltas.detach()


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_equivalent_to_dense_gradient_masking(clip):
    loaded = tiny_model("qwen2")
    slices = slices_from_neuron_set(loaded, _set(loaded, UNITS))
    masks = dense_masks(loaded.model, slices)
    base = _snapshot(loaded.model)
    dense = copy.deepcopy(loaded.model)
    _dense_masked_sgd(dense, masks, lr=0.5, steps=3, clip=clip)
    _sparse_sgd(loaded.model, slices, lr=0.5, steps=3, clip=clip)
    sd_dense, sd_sparse = dense.state_dict(), loaded.model.state_dict()
    moved = 0.0
    for name in sd_dense:
        torch.testing.assert_close(sd_sparse[name], sd_dense[name], rtol=1e-5, atol=1e-6)
        if name in masks:
            moved = max(moved, float((sd_sparse[name] - base[name]).abs().max()))
    assert moved > 1e-4  # the test can fail: the update is not negligible


def test_clipping_acts_on_masked_gradients_only():
    loaded = tiny_model("qwen2")
    slices = slices_from_neuron_set(loaded, _set(loaded, UNITS))
    masks = dense_masks(loaded.model, slices)
    dense = copy.deepcopy(loaded.model)
    for p in dense.parameters():
        p.requires_grad_(True)
    _loss(dense, _batch()).backward()
    full_norm = torch.norm(torch.stack([p.grad.norm() for p in dense.parameters()]))
    masked_norm = torch.norm(torch.stack([
        (p.grad * masks[n]).norm() if n in masks else torch.zeros(()) for n, p in dense.named_parameters()]))
    deltas = SparseDeltas(loaded.model, slices)
    _loss(loaded.model, _batch()).backward()
    sparse_norm = torch.nn.utils.clip_grad_norm_(deltas.parameters(), 1e9)
    torch.testing.assert_close(sparse_norm, masked_norm, rtol=1e-5, atol=1e-7)
    assert full_norm > 1.5 * masked_norm  # clipping before masking would have used this larger norm


def test_hooked_forward_equals_merged_weights_and_unmerge_is_exact():
    loaded = tiny_model("qwen2")
    model = loaded.model
    before = _snapshot(model)
    ids = _batch()
    base_logits = model(ids).logits
    deltas = SparseDeltas(model, slices_from_neuron_set(loaded, _set(loaded, UNITS)))
    with torch.no_grad():
        for p in deltas.parameters():
            p.normal_(std=0.1)
    hooked = model(ids).logits
    deltas.merge()
    merged = model(ids).logits  # hooks pass through when merged
    torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, base_logits)
    deltas.unmerge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    deltas.detach()
    assert torch.equal(model(ids).logits, base_logits)


def test_tied_embeddings_stay_untouched():
    loaded = tiny_model("llama", tie_word_embeddings=True)
    model = loaded.model
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight.detach().clone()
    deltas = SparseDeltas(model, slices_from_neuron_set(loaded, _set(loaded, {"1.ffn": [3, 4], "0.attn_v": [1]})))
    opt = torch.optim.AdamW(deltas.parameters(), lr=1e-2)
    _loss(model, _batch()).backward()
    opt.step()
    deltas.merge()
    deltas.detach()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, emb)


def test_embeddings_and_rows_plus_columns_are_refused():
    loaded = tiny_model("llama")
    with pytest.raises(SparseDeltaError, match="embeddings"):
        SparseDeltas(loaded.model, [SliceSpec("model.embed_tokens.weight", 0, torch.tensor([1]))])
    name = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(SparseDeltaError, match="rows and columns"):
        SparseDeltas(loaded.model, [SliceSpec(name, 0, torch.tensor([1])), SliceSpec(name, 1, torch.tensor([1]))])


def test_gqa_kv_delta_shapes():
    loaded = tiny_model("qwen2")  # 4 query heads, 2 kv heads, head_dim 8 -> k_proj has 16 rows
    sites = {s.key: s for s in resolve_sites(loaded.model, loaded.adapter, ("attn_k",))}
    assert sites["0.attn_k"].width == 16
    deltas = SparseDeltas(loaded.model, slices_from_neuron_set(loaded, _set(loaded, {"0.attn_k": [0, 15]})))
    shapes = {name: tuple(p.shape) for name, p in deltas.deltas.items()}
    assert sorted(shapes.values()) == [(2,), (2, 32)]  # bias entries and rows of the 32-wide input
