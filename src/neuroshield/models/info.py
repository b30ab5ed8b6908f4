"""Model summaries for `neuroshield models info`, and a one-shot chat for smoke checks."""

from __future__ import annotations

from typing import Any

import torch

from neuroshield.models.chat import encode_chat
from neuroshield.models.loading import LoadedModel, dtype_name, load_model
from neuroshield.models.sites import count_parameters, neuron_summary


def describe(loaded: LoadedModel) -> dict[str, Any]:
    model = loaded.model
    geometry = loaded.adapter.geometry(model.config)
    return {
        "spec": loaded.spec,
        "model_id": loaded.model_id,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "adapter": loaded.adapter.name,
        "layers": len(loaded.adapter.layers(model)),
        "attention": {"num_heads": geometry.num_heads, "num_kv_heads": geometry.num_kv_heads,
                      "head_dim": geometry.head_dim},
        "parameters": count_parameters(model),
        "dtype": dtype_name(model),
        "config_hash": loaded.config_hash,
        "sites": neuron_summary(model, loaded.adapter),
        "load_seconds": loaded.load_seconds,
        **loaded.info,
    }


def model_info(spec: str) -> dict[str, Any]:
    return describe(load_model(spec))


@torch.no_grad()
def chat_once(spec_or_model: str | LoadedModel, prompt: str, max_new_tokens: int = 64) -> str:
    loaded = load_model(spec_or_model) if isinstance(spec_or_model, str) else spec_or_model
    enc = encode_chat(loaded.tokenizer, prompt)
    ids = torch.tensor([enc.input_ids], device=loaded.device)
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
