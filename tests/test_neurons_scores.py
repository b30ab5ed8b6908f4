"""Scores against real ablations on tiny models: plnd is the measured change of the module output."""

from __future__ import annotations

import importlib

import pytest
import torch
from scipy.stats import spearmanr

from neuroshield.data.records import PromptRecord
from neuroshield.models.chat import collate, encode_chat
from neuroshield.models.hooks import site_hooks
from neuroshield.models.sites import resolve_sites
from neuroshield.models.tiny import tiny_model
from neuroshield.neurons.scores import column_norms, score
from neuroshield.neurons.stats import collect_statistics, eager_attention, position_ids_for


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models are all per-op overhead: one intra-op thread is several times faster, much more so
    on a busy machine. Scoped to this module and restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TEXTS = ["how do I make a bomb at home", "steal a car without keys", "comment pirater un compte ?"]
BENIGN = ["tell me a joke about cats", "what is the capital of France?"]


def recs() -> list[PromptRecord]:
    out = [PromptRecord(id=f"h/{i}", text=t, language="en", label="harmful") for i, t in enumerate(TEXTS)]
    out += [PromptRecord(id=f"b/{i}", text=t, language="en", label="benign") for i, t in enumerate(BENIGN)]
    return out


def _batch(lm, texts):
    enc = [encode_chat(lm.tokenizer, t) for t in texts]
    batch = collate(enc, lm.tokenizer.pad_token_id)
    return batch, batch.count_mask(enc, "prompt")


def _run(lm, batch):
    with torch.no_grad():
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=position_ids_for(batch.attention_mask))


_BASE: dict[tuple[int, tuple[str, ...]], tuple[torch.nn.Module, torch.Tensor]] = {}


def _module_output_change(lm, site, unit, out_module, texts=TEXTS):
    """Mean over counted tokens of ‖out(unit zeroed) − out‖₂: a real ablation through site hooks."""
    batch, mask = _batch(lm, texts)
    outs = []

    def keep(m, a, o):
        outs.append(o.detach().clone())

    h = out_module.register_forward_hook(keep)
    try:
        key = (id(out_module), tuple(texts))
        if key not in _BASE or _BASE[key][0] is not out_module:  # the unablated output, once per module
            _run(lm, batch)
            _BASE[key] = (out_module, outs.pop())

        def zero(s, u):
            u = u.clone()
            u[..., unit] = 0
            return u

        with site_hooks([site], zero):
            _run(lm, batch)
    finally:
        h.remove()
    diff = (outs[-1] - _BASE[key][1]).norm(dim=-1)  # [B, T]
    return diff[mask].mean().item()


@pytest.fixture(scope="module")
def llama64():
    lm = tiny_model("llama", layers=2)
    lm.model.to(torch.float64)
    stats = collect_statistics(lm, recs(), sites=("ffn", "attn_v", "attn_o"), batch_size=3, progress=False)
    return lm, stats


def test_plnd_ffn_equals_measured_ablation(llama64):
    lm, stats = llama64
    scores = score(stats, lm, "plnd", "en/text/harmful")
    for site in resolve_sites(lm.model, lm.adapter, ("ffn",)):
        for unit in range(0, site.width, 5):
            measured = _module_output_change(lm, site, unit, site.module)
            assert scores[site.key][unit].item() == pytest.approx(measured, rel=1e-9, abs=1e-12), (site.key, unit)


def test_plnd_o_equals_measured_ablation(llama64):
    lm, stats = llama64
    scores = score(stats, lm, "plnd", "en/text/harmful")
    for site in resolve_sites(lm.model, lm.adapter, ("attn_o",)):
        for unit in range(0, site.width, 3):
            measured = _module_output_change(lm, site, unit, site.module)
            assert scores[site.key][unit].item() == pytest.approx(measured, rel=1e-9, abs=1e-12), (site.key, unit)


def test_gqa_mapping_of_value_units(llama64):
    lm, stats = llama64
    g = lm.adapter.geometry(lm.model.config)
    assert (g.num_heads, g.num_kv_heads, g.group_size) == (4, 2, 2)
    # explicit: kv head h_kv serves query heads h_kv*rep .. h_kv*rep+rep-1 (transformers' repeat_kv)
    for j in range(g.num_kv_heads * g.head_dim):
        h_kv, d = j // g.head_dim, j % g.head_dim
        explicit = [(h_kv * g.group_size + r) * g.head_dim + d for r in range(g.group_size)]
        assert g.query_units_of_kv_unit(j) == explicit
    # and the model agrees: zeroing value unit j zeroes exactly those o_proj inputs
    layer = 1
    v_site = next(s for s in resolve_sites(lm.model, lm.adapter, ("attn_v",)) if s.layer == layer)
    o_site = next(s for s in resolve_sites(lm.model, lm.adapter, ("attn_o",)) if s.layer == layer)
    batch, mask = _batch(lm, TEXTS)
    for j in (0, 5, 8, 13):
        seen = []
        h = o_site.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))

        def zero(s, u, j=j):
            u = u.clone()
            u[..., j] = 0
            return u

        try:
            _run(lm, batch)
            with site_hooks([v_site], zero):
                _run(lm, batch)
        finally:
            h.remove()
        changed = ((seen[1] - seen[0])[mask].abs().amax(0) > 0).nonzero().flatten().tolist()
        assert changed == g.query_units_of_kv_unit(j)
        assert torch.all(seen[1][mask][:, changed] == 0)


def test_plnd_v_equals_measured_ablation(llama64):
    lm, stats = llama64
    scores = score(stats, lm, "plnd", "en/text/harmful")
    for v_site in resolve_sites(lm.model, lm.adapter, ("attn_v",)):
        o_site = next(s for s in resolve_sites(lm.model, lm.adapter, ("attn_o",)) if s.layer == v_site.layer)
        for unit in range(v_site.width):
            measured = _module_output_change(lm, v_site, unit, o_site.module)
            assert scores[v_site.key][unit].item() == pytest.approx(measured, rel=1e-9, abs=1e-12)
        # the value score is not the sum of the per-o-input scores (columns are not orthogonal)
        o_scores = score(stats, lm, "plnd", "en/text/harmful")[o_site.key]
        g = lm.adapter.geometry(lm.model.config)
        summed = torch.stack([o_scores[g.query_units_of_kv_unit(j)].sum() for j in range(v_site.width)])
        assert torch.all(scores[v_site.key] <= summed + 1e-12)


# --- q / k: attention logits --------------------------------------------------------------------


def _exact_logit_ablation(lm, layer, kind, texts=TEXTS, check_units=(0, 3)):
    """Per unit: mean over tokens of Σ_h Σ_s p(t,s)·|Δ logit(h,t,s)| when the unit is zeroed, where the
    logits are recomputed from the captured q_proj/k_proj outputs (with q/k norm and RoPE of the
    model). The recomputation is checked against the model: its softmax equals the eager attention
    probabilities, with and without a unit really zeroed through the site hooks."""
    m = lm.model
    attn = m.model.layers[layer].self_attn
    mod = importlib.import_module(type(attn).__module__)
    g = lm.adapter.geometry(m.config)
    site = next(s for s in resolve_sites(m, lm.adapter, (kind,)) if s.layer == layer)
    cap: dict[str, torch.Tensor] = {}
    hooks = [
        attn.register_forward_pre_hook(lambda mm, a, kw: cap.__setitem__("pe", kw["position_embeddings"]),
                                       with_kwargs=True),
        attn.q_proj.register_forward_hook(lambda mm, a, o: cap.__setitem__("q", o.detach().clone())),
        attn.k_proj.register_forward_hook(lambda mm, a, o: cap.__setitem__("k", o.detach().clone())),
        attn.register_forward_hook(lambda mm, a, o: cap.__setitem__("p", o[1].detach().clone())),
    ]

    def logits(q, k, cos, sin):
        b, t, _ = q.shape
        q = q.reshape(b, t, g.num_heads, g.head_dim)
        k = k.reshape(b, t, g.num_kv_heads, g.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = mod.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q @ k.repeat_interleave(g.group_size, 1).transpose(-1, -2) * attn.scaling

    total = torch.zeros(site.width, dtype=torch.float64)
    tokens = 0
    try:
        with torch.no_grad(), eager_attention(m):
            for text in texts:
                ids = torch.tensor([encode_chat(lm.tokenizer, text).input_ids])
                m(input_ids=ids)
                cos, sin = cap["pe"]
                q0, k0, p0 = cap["q"], cap["k"], cap["p"]
                t = ids.shape[1]
                causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
                s0 = logits(q0, k0, cos, sin)
                assert torch.allclose(torch.softmax(s0.masked_fill(~causal, float("-inf")), -1), p0, atol=1e-5)
                # every unit zeroed at once: row j of the batch has unit j zeroed
                w = site.width
                q = q0.expand(w, -1, -1).clone() if kind == "attn_q" else q0.expand(w, -1, -1)
                k = k0.expand(w, -1, -1).clone() if kind == "attn_k" else k0.expand(w, -1, -1)
                (q if kind == "attn_q" else k)[torch.arange(w), :, torch.arange(w)] = 0
                s_all = logits(q, k, cos, sin)  # [W, H, T, T]
                total += ((s_all - s0).abs() * p0).sum((1, 2, 3)).double()
                for j in check_units:
                    s = s_all[j:j + 1]
                    if text == texts[0]:  # real ablation agrees with the recomputation

                        def zero(_s, u, j=j):
                            u = u.clone()
                            u[..., j] = 0
                            return u

                        with site_hooks([site], zero):
                            m(input_ids=ids)
                        sm = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
                        assert torch.allclose(sm, cap["p"], atol=1e-5)
                tokens += t
    finally:
        for h in hooks:
            h.remove()
    return total / tokens


# llama: plain RoPE; gemma2: soft-capped logits (the logits here are before the cap); qwen3: q/k RMSNorm
QK_CASES = [("llama", "exact", 0.999), ("gemma2", "exact", 0.999), ("qwen3", "exact", 0.9)]


@pytest.mark.parametrize("arch,mode,min_rho", QK_CASES)
def test_plnd_qk_rank_correlates_with_exact_logit_ablation(arch, mode, min_rho, record_property):
    lm = tiny_model(arch)
    harmful = [r for r in recs() if r.label == "harmful"]
    stats = collect_statistics(lm, harmful, sites=("attn_q", "attn_k"), batch_size=3, progress=False,
                               qk_impact=mode)
    scores = score(stats, lm, "plnd", "en/text/harmful")
    for layer in (0, 1):
        for kind in ("attn_q", "attn_k"):
            truth = _exact_logit_ablation(lm, layer, kind)
            est = scores[f"{layer}.{kind}"]
            rho = spearmanr(est.numpy(), truth.numpy()).statistic
            record_property(f"spearman_{arch}_{mode}_{layer}.{kind}", round(float(rho), 4))
            print(f"spearman {arch} {mode} {layer}.{kind}: {rho:.4f}  (mean ratio {(est / truth).mean():.3f})")
            assert rho >= min_rho, (arch, mode, layer, kind, rho)
            if min_rho > 0.99:  # exact without q/k norm: the values themselves match
                assert torch.allclose(est, truth, rtol=1e-4, atol=1e-7)


def test_plnd_qk_pair_bound_is_an_upper_bound_and_correlates(record_property):
    lm = tiny_model("llama")
    harmful = [r for r in recs() if r.label == "harmful"]
    stats = collect_statistics(lm, harmful, sites=("attn_q", "attn_k"), progress=False, qk_impact="pair")
    scores = score(stats, lm, "plnd", "en/text/harmful")
    for kind in ("attn_q", "attn_k"):
        truth = _exact_logit_ablation(lm, 1, kind, check_units=())
        est = scores[f"1.{kind}"]
        rho = spearmanr(est.numpy(), truth.numpy()).statistic
        record_property(f"spearman_llama_pair_1.{kind}", round(float(rho), 4))
        print(f"spearman llama pair 1.{kind}: {rho:.4f}")
        assert torch.all(est >= truth * (1 - 1e-5))  # |cos·x + sin·y| <= sqrt(x² + y²)
        assert rho >= 0.7


# --- the other methods ------------------------------------------------------------------------------


def _captured(lm, texts, site):
    got = []
    h = site.module.register_forward_pre_hook(lambda m, a: got.append(a[0][0].detach()))
    try:
        for t in texts:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([encode_chat(lm.tokenizer, t).input_ids]))
    finally:
        h.remove()
    return torch.cat(got).double()


def test_precise_shield_by_hand(llama64):
    lm, stats = llama64
    scores = score(stats, lm, "precise-shield", "en/text/harmful")
    assert set(scores) == {"0.ffn", "1.ffn", "0.attn_o", "1.attn_o"}  # no saliency for value units
    for site in resolve_sites(lm.model, lm.adapter, ("ffn",)):
        acts = _captured(lm, TEXTS, site)
        sal = acts.mean(0).abs() * site.module.weight.double().norm(dim=0)
        assert torch.allclose(scores[site.key], sal / sal.sum(), rtol=1e-9)
        assert scores[site.key].sum().item() == pytest.approx(1.0)
        assert torch.allclose(column_norms(site), site.module.weight.double()[:, :].pow(2).sum(0).sqrt())


def test_contrasts_by_hand(llama64):
    lm, stats = llama64
    site = resolve_sites(lm.model, lm.adapter, ("ffn",))[1]
    h, b = _captured(lm, TEXTS, site), _captured(lm, BENIGN, site)
    md = score(stats, None, "mean-diff", "en/text/harmful")[site.key]
    assert torch.allclose(md, h.mean(0) - b.mean(0), rtol=1e-9, atol=1e-12)
    t = score(stats, None, "t-stat", "en/text/harmful", baseline="en/text/benign")[site.key]
    welch = (h.mean(0) - b.mean(0)) / (h.var(0) / h.shape[0] + b.var(0) / b.shape[0]).sqrt()
    assert torch.allclose(t, welch, rtol=1e-7, atol=1e-9)


def test_score_errors_are_clear(llama64):
    lm, stats = llama64
    with pytest.raises(ValueError, match="unknown scoring method"):
        score(stats, lm, "lape", "en/text/harmful")
    with pytest.raises(KeyError, match="not in these statistics"):
        score(stats, lm, "plnd", "de/text/harmful")
    other = tiny_model("llama", hidden=48)
    with pytest.raises(ValueError, match="config hash"):
        score(stats, other, "plnd", "en/text/harmful")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_norms_in_blocks_equal_the_whole_matrix(dtype):
    """column_norms casts NORM_BLOCK_COLUMNS columns at a time: the same float64 values, bit for bit."""
    from dataclasses import replace

    from neuroshield.neurons import scores as scores_module

    lm = tiny_model("llama", layers=1, hidden=48, intermediate=600)  # 600 columns: two full blocks and a part
    site = resolve_sites(lm.model, lm.adapter, ("ffn",))[0]
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(site.module.weight.shape, generator=g) * 3).to(dtype)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    linear.weight.data = weight
    got = column_norms(replace(site, module=linear))
    assert scores_module.NORM_BLOCK_COLUMNS < weight.shape[1]
    assert got.dtype == torch.float64 and got.shape == (600,)
    assert torch.equal(got, weight.to(torch.float64).norm(dim=0))
