"""The one generation cache (`generate.cache`): one key, input order, only missing prompts generated, resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import neuroshield.generate.generation as G
from neuroshield.data.records import PromptRecord
from neuroshield.generate.cache import (
    GenerationCache,
    cache_key,
    cached_generate,
    cached_values,
    generation_settings,
    model_key,
)
from neuroshield.generate.generation import GenerationConfig, generate
from neuroshield.models.tiny import tiny_model

PROMPTS = [PromptRecord(f"p/{i}", text, lang, "benign") for i, (text, lang) in enumerate(
    [("Write a haiku.", "en"), ("Schreib ein Gedicht.", "de"), ("Name a color.", "en"), ("Nenne eine Farbe.", "de"),
     ("Count to three.", "en")])]
CFG = GenerationConfig(max_new_tokens=4, batch_size=2)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=2)


@pytest.fixture()
def counted(monkeypatch):
    """The prompts handed to `generation.generate`, per call."""
    calls: list[list[str]] = []
    real = G.generate

    def counting(loaded, prompts, config=None, **kw):
        calls.append([p.id for p in prompts])
        return real(loaded, prompts, config, **kw)

    monkeypatch.setattr(G, "generate", counting)
    return calls


def test_only_missing_prompts_are_generated_and_input_order_is_kept(lm, tmp_path, one_thread, counted) -> None:
    cache = GenerationCache(tmp_path / "g.jsonl")
    key = model_key(lm)
    first = cached_generate(lm, PROMPTS[:2], CFG, cache, weights_key=key, progress=False)
    assert counted == [["p/0", "p/1"]]
    shuffled = [PROMPTS[4], PROMPTS[1], PROMPTS[3], PROMPTS[0], PROMPTS[2]]
    got = cached_generate(lm, shuffled, CFG, GenerationCache(tmp_path / "g.jsonl"), weights_key=key, progress=False)
    assert counted[1] == ["p/4", "p/3", "p/2"]  # the two cached ones are not generated again
    assert got[1] == first[1] and got[3] == first[0]
    # the answers are those of plain generations of the same batches, in the order asked, token ids included
    plain = {p.id: g for part in (PROMPTS[:2], [PROMPTS[4], PROMPTS[3], PROMPTS[2]])
             for p, g in zip(part, generate(lm, part, CFG, progress=False))}
    assert got == [plain[p.id] for p in shuffled]
    counted.clear()
    again = cached_generate(lm, shuffled, CFG, GenerationCache(tmp_path / "g.jsonl"), weights_key=key, progress=False)
    assert counted == [] and again == got


def test_an_interrupted_run_resumes_after_a_torn_line(lm, tmp_path, one_thread, counted, monkeypatch) -> None:
    path = tmp_path / "g.jsonl"
    key = model_key(lm)
    real = G.generate

    def first_batch_then_stop(loaded, prompts, config=None, *, on_batch=None, **kw):
        def stop(idx, gens):
            on_batch(idx, gens)
            raise KeyboardInterrupt

        return real(loaded, prompts, config, on_batch=stop, **kw)

    monkeypatch.setattr(G, "generate", first_batch_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cached_generate(lm, PROMPTS, CFG, GenerationCache(path), weights_key=key, progress=False)
    assert len(GenerationCache(path).entries) == 2  # the first batch was written before the interruption
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "torn')  # a write killed half-way
    calls: list[int] = []

    def counting(loaded, prompts, config=None, **kw):
        calls.append(len(prompts))
        return real(loaded, prompts, config, **kw)

    monkeypatch.setattr(G, "generate", counting)
    cache = GenerationCache(path)
    assert len(cache.entries) == 2
    resumed = cached_generate(lm, PROMPTS, CFG, cache, weights_key=key, progress=False)
    assert calls == [len(PROMPTS) - 2]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[2] == '{"key": "torn' and all(json.loads(x) for x in lines[:2] + lines[3:])
    assert len(GenerationCache(path).entries) == len(PROMPTS)
    fresh = cached_generate(lm, PROMPTS, CFG, GenerationCache(tmp_path / "fresh.jsonl"), weights_key=key,
                            progress=False)
    assert [g.text for g in resumed] == [g.text for g in fresh]


def test_the_key_changes_with_each_of_its_parts(lm, tmp_path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"one picture")
    other = tmp_path / "b.png"
    other.write_bytes(b"another picture")
    r = PromptRecord("p/1", "Describe the image.", "en", "benign", modality="image", image=str(image))
    s = generation_settings(CFG)
    base = cache_key("m", "none", s, r)
    assert base == cache_key("m", "none", s, dataclasses.replace(r, label="harmful", source="x"))  # not key parts
    changed = [
        cache_key("m2", "none", s, r),
        cache_key("m", "patch:abc", s, r),
        cache_key("m", "none", generation_settings(CFG, backend="vllm"), r),
        cache_key("m", "none", s, dataclasses.replace(r, id="p/2")),
        cache_key("m", "none", s, dataclasses.replace(r, language="de")),
        cache_key("m", "none", s, dataclasses.replace(r, modality="text")),
        cache_key("m", "none", s, dataclasses.replace(r, text="Describe the picture.")),
        cache_key("m", "none", s, dataclasses.replace(r, image=str(other))),
    ]
    for change in (dict(max_new_tokens=5), dict(system="Be brief."), dict(stop_at_eos=False),
                   dict(do_sample=True), dict(do_sample=True, seed=1, temperature=0.7)):
        changed.append(cache_key("m", "none", generation_settings(dataclasses.replace(CFG, **change)), r))
    assert len(set(changed)) == len(changed) and base not in changed
    # the batch size does not change greedy answers: not a key part
    assert generation_settings(dataclasses.replace(CFG, batch_size=7)) == s
    # the model key: other weights of the same architecture, or another dtype, are another model
    same_arch = tiny_model("llama", seed=3)
    assert same_arch.config_hash == lm.config_hash and model_key(same_arch) != model_key(lm)
    assert model_key(tiny_model("llama", seed=2)) == model_key(lm)
    half = tiny_model("llama", seed=2)
    half.model.to(torch.bfloat16)
    assert model_key(half) != model_key(lm)


def test_cached_values_compute_only_what_is_missing(tmp_path) -> None:
    seen: list[str] = []

    def compute(prompts):
        seen.extend(p.id for p in prompts)
        return [len(p.text) for p in prompts]

    path = tmp_path / "g.jsonl"
    kw = dict(weights_key="m", settings="len:v1", task="length", chunk=2)
    assert cached_values(PROMPTS[:3], compute, GenerationCache(path), **kw) == [len(p.text) for p in PROMPTS[:3]]
    seen.clear()
    rev = PROMPTS[::-1]
    assert cached_values(rev, compute, GenerationCache(path), **kw) == [len(p.text) for p in rev]
    assert sorted(seen) == ["p/3", "p/4"]
