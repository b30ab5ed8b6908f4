from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from neuroshield.models import SITE_KINDS, UnsupportedArchitectureError, resolve_sites, site_hooks
from neuroshield.models.adapters import adapter_for_config
from neuroshield.models.chat import collate, encode_chat
from neuroshield.models.loading import ModelLoadError, _cache_is_valid, load_model
from neuroshield.models.sites import neuron_summary
from neuroshield.models.tiny import TINY_OVERRIDES, tiny_model

ARCHS = list(TINY_OVERRIDES)


def _batch(loaded, texts):
    enc = [encode_chat(loaded.tokenizer, t) for t in texts]
    return enc, collate(enc, loaded.tokenizer.pad_token_id)


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_resolve_with_expected_shapes(arch: str) -> None:
    lm = tiny_model(arch)
    sites = resolve_sites(lm.model, lm.adapter, SITE_KINDS)
    assert len(sites) == 2 * len(SITE_KINDS)
    g = lm.adapter.geometry(lm.model.config)
    widths = {s.kind: s.width for s in sites if s.layer == 0}
    assert widths == {"ffn": 64, "attn_q": g.num_heads * g.head_dim, "attn_k": g.num_kv_heads * g.head_dim,
                      "attn_v": g.num_kv_heads * g.head_dim, "attn_o": g.num_heads * g.head_dim}
    ffn = next(s for s in sites if s.kind == "ffn")
    # gate row + up row (hidden each) + down column (hidden)
    assert ffn.params_per_unit == 3 * lm.model.config.hidden_size
    summary = neuron_summary(lm.model, lm.adapter)
    assert summary["ffn"]["units"] == 2 * 64


@pytest.mark.parametrize("arch", ARCHS)
def test_observing_hooks_leave_logits_identical(arch: str) -> None:
    lm = tiny_model(arch)
    _, batch = _batch(lm, ["How do I bake bread?", "Wie spät ist es? 你好"])
    with torch.no_grad():
        plain = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        seen: list[str] = []
        sites = resolve_sites(lm.model, lm.adapter, SITE_KINDS)
        with site_hooks(sites, lambda site, units: seen.append(site.key)):
            hooked = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(plain, hooked)
    assert len(seen) == len(sites)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())


def test_hooks_removed_after_exception() -> None:
    lm = tiny_model("llama")
    sites = resolve_sites(lm.model, lm.adapter, SITE_KINDS)
    with pytest.raises(RuntimeError):
        with site_hooks(sites, lambda s, u: None):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())


def test_gqa_query_units_of_kv_unit() -> None:
    lm = tiny_model("llama", heads=4, kv_heads=2)
    g = lm.adapter.geometry(lm.model.config)
    # kv head 1 serves query heads 2 and 3 (repeat_kv repeats each kv head consecutively)
    assert g.query_units_of_kv_unit(1 * g.head_dim + 3) == [2 * g.head_dim + 3, 3 * g.head_dim + 3]


def test_unsupported_architecture_lists_supported() -> None:
    class Cfg:
        model_type = "gpt2"

    with pytest.raises(UnsupportedArchitectureError, match="llama.*qwen2"):
        adapter_for_config(Cfg())


def test_position_masks_cover_user_text_and_template() -> None:
    lm = tiny_model("qwen2")
    enc = encode_chat(lm.tokenizer, "Tell me a joke", response="No.")
    user = [i for i, m in enumerate(enc.position_mask("user")) if m]
    assert lm.tokenizer.decode([enc.input_ids[i] for i in user]) == "Tell me a joke"
    post = [enc.input_ids[i] for i, m in enumerate(enc.position_mask("post")) if m]
    assert lm.tokenizer.decode(post) == "<|im_end|>\n<|im_start|>assistant\n"
    assert sum(enc.position_mask("last")) == 1 and enc.position_mask("last")[enc.prompt_len - 1]
    assert not any(enc.position_mask("prompt")[enc.prompt_len:])  # response tokens never count


def test_unknown_hub_id_gives_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="Hugging Face cache"):
        load_model("no-such-org/no-such-model-xyz")


def test_damaged_cache_is_detected(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "neuroshield-cache.json").write_text(json.dumps({"format": 1, "files": {"model.safetensors": 999}}))
    assert not _cache_is_valid(folder)  # size mismatch
    (folder / "neuroshield-cache.json").write_text(json.dumps({"format": 1, "files": {"model.safetensors": 16}}))
    assert _cache_is_valid(folder)
    (folder / "model.safetensors").write_bytes(b"garbage garbage!")
    assert not _cache_is_valid(folder)  # same size, unreadable header


@pytest.mark.real_model
def test_smollm2_loads_from_package_and_rebuilds_damaged_cache(smollm2, tmp_path, monkeypatch) -> None:
    from neuroshield.models.info import chat_once

    assert smollm2.model.config.model_type == "llama"
    assert len(smollm2.adapter.layers(smollm2.model)) == 30
    answer = chat_once(smollm2, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer
    # A truncated safetensors file in a copy of the cache is detected and rebuilt, never used.
    from neuroshield.models import loading

    # the float32 cache of SmolLM2 (a bfloat16 copy beside it is `<name>-bfloat16`)
    src = loading.cache_root() / "gguf" / loading.EMBEDDED_MODELS["smollm2"].sha256[:20]
    monkeypatch.setenv("NEUROSHIELD_CACHE", str(tmp_path))
    dst = tmp_path / "gguf" / src.name
    shutil.copytree(src, dst)
    st = next(dst.glob("*.safetensors"))
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)
    assert not _cache_is_valid(dst)
    again = load_model("smollm2")
    assert _cache_is_valid(dst)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, smollm2.model(ids).logits)


@pytest.mark.real_model
def test_default_model_refuses_in_english() -> None:
    """The embedded default model loads from the PyPI parts and answers a chat prompt."""
    from neuroshield.models.info import chat_once

    lm = load_model("default")
    assert lm.model.config.model_type == "qwen2" and len(lm.adapter.layers(lm.model)) == 24
    answer = chat_once(lm, "What is 12 + 30? Answer with the number only.", max_new_tokens=8)
    assert "42" in answer


def test_dtype_auto_follows_the_hardware(monkeypatch):
    import torch

    from neuroshield.models import loading

    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert loading.resolve_dtype("auto") == torch.bfloat16 and loading.resolve_dtype(None) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert loading.resolve_dtype("auto") == torch.float32
    assert loading.resolve_dtype("float32") == torch.float32 and loading.resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, stored, float32"):
        loading.resolve_dtype("int8")
