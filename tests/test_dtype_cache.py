"""A GGUF model loaded in bfloat16 comes from a bfloat16 copy of the float32 cache: the same tensors as converting on
load, without mapping the float32 file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from neuroshield.models import load_model, loading


@pytest.mark.real_model
def test_bfloat16_load_uses_a_bfloat16_copy_of_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    emb = loading.EMBEDDED_MODELS["smollm2"]
    src = loading.cache_root() / "gguf" / emb.sha256[:20]
    load_model("smollm2", dtype="float32")  # the float32 cache exists (built once if not)
    monkeypatch.setenv("NEUROSHIELD_CACHE", str(tmp_path))
    f32 = tmp_path / "gguf" / src.name
    shutil.copytree(src, f32)
    lm = load_model("smollm2", dtype="bfloat16")
    folder = tmp_path / "gguf" / f"{src.name}-bfloat16"
    assert Path(lm.model.config._name_or_path) == folder and loading._cache_is_valid(folder)
    assert json.loads((folder / loading.CACHE_MANIFEST).read_text())["dtype"] == "bfloat16"
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    converted = AutoModelForCausalLM.from_pretrained(f32, dtype=torch.bfloat16)  # what loading did before
    ours = dict(lm.model.named_parameters())
    assert ours.keys() == dict(converted.named_parameters()).keys()
    assert all(torch.equal(ours[n], p) for n, p in converted.named_parameters())
    # float32 still loads from the float32 folder; a damaged bfloat16 copy is rebuilt, never used
    assert Path(load_model("smollm2", dtype="float32").model.config._name_or_path) == f32
    st = next(folder.glob("*.safetensors"))
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)
    again = load_model("smollm2", dtype="bfloat16")
    assert loading._cache_is_valid(folder)
    assert all(torch.equal(dict(again.model.named_parameters())[n], p) for n, p in converted.named_parameters())
