from __future__ import annotations

import contextlib

import pytest
import torch

from neuroshield.data.records import PromptRecord
from neuroshield.generate.generation import (
    GenerationConfig,
    generate,
    generate_responses,
    next_token_distributions,
    response_divergence,
    response_logprobs,
    response_token_logprobs,
)
from neuroshield.models.chat import encode_chat
from neuroshield.models.tiny import tiny_model

TEXTS = ["hi", "How do I bake bread? Tell me step by step.", "Wie spät ist es?", "你好，世界", "x" * 30]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_generation_equals_unbatched(arch: str) -> None:
    lm = tiny_model(arch)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    batched = generate(lm, TEXTS, cfg, progress=False)
    single = [generate(lm, [t], GenerationConfig(max_new_tokens=6, batch_size=1), progress=False)[0] for t in TEXTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) == 6 for g in batched)


def test_outputs_in_input_order_and_records_accepted(llama) -> None:
    records = [PromptRecord(f"r{i}", t, "en", "benign") for i, t in enumerate(TEXTS)]
    fwd = generate_responses(llama, records, max_new_tokens=4, batch_size=2, progress=False)
    rev = generate_responses(llama, list(reversed(TEXTS)), max_new_tokens=4, batch_size=3, progress=False)
    assert fwd == list(reversed(rev))
    assert all(isinstance(t, str) for t in fwd)


def test_stops_at_eos_and_keeps_it(llama) -> None:
    cfg = GenerationConfig(max_new_tokens=6, batch_size=2)
    first = generate(llama, TEXTS[:2], cfg, progress=False)
    stop = first[0].token_ids[2]
    saved = llama.model.generation_config.eos_token_id
    try:
        llama.model.generation_config.eos_token_id = stop
        again = generate(llama, TEXTS[:1], cfg, progress=False)[0]
        assert again.finished and again.token_ids[-1] == stop
        assert again.token_ids == first[0].token_ids[: first[0].token_ids.index(stop) + 1]
        full = generate(llama, TEXTS[:1], GenerationConfig(max_new_tokens=6, stop_at_eos=False), progress=False)[0]
        assert full.token_ids == first[0].token_ids and not full.finished
    finally:
        llama.model.generation_config.eos_token_id = saved


def test_sampling_is_seeded(llama) -> None:
    kw = dict(max_new_tokens=5, batch_size=2, do_sample=True, temperature=1.5, progress=False)
    a = generate_responses(llama, TEXTS[:3], seed=1, **kw)
    b = generate_responses(llama, TEXTS[:3], seed=1, **kw)
    assert a == b


def test_response_logprobs_match_a_manual_forward(llama) -> None:
    gens = generate(llama, TEXTS[:3], GenerationConfig(max_new_tokens=5), progress=False)
    ids = [g.token_ids for g in gens]
    batched = response_logprobs(llama, TEXTS[:3], ids, batch_size=3)
    for text, resp, got in zip(TEXTS[:3], ids, batched):
        enc = encode_chat(llama.tokenizer, text)
        full = torch.tensor([list(enc.input_ids) + list(resp)])
        with torch.no_grad():
            lp = torch.log_softmax(llama.model(full).logits[0].float(), -1)
        want = sum(float(lp[enc.prompt_len - 1 + k, t]) for k, t in enumerate(resp))
        assert got == pytest.approx(want, abs=1e-4)
    # greedy tokens are the argmax: each one's log-prob is the max of its distribution
    per_tok = response_token_logprobs(llama, TEXTS[:1], ids[:1])[0]
    dists = next_token_distributions(llama, TEXTS[:1], ids[:1])[0]
    assert dists.shape[0] == len(ids[0]) + 1
    assert torch.allclose(per_tok, dists[:-1].max(-1).values, atol=1e-5)
    # string responses tokenize like encode_chat does
    s = response_logprobs(llama, ["hi"], ["ok"])[0]
    assert s < 0


def test_divergence_of_an_unchanged_model_is_zero(llama) -> None:
    out = response_divergence(llama, TEXTS[:2], ["abc", "de"], {"same": contextlib.nullcontext}, progress=False)
    for d in out["same"]:
        assert d.kl_sum == pytest.approx(0.0, abs=1e-6)
        assert d.nll == pytest.approx(d.reference_nll, abs=1e-5)
        assert d.tokens in (2, 3)


def test_config_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0)
