"""What a loaded model is: `LoadedModel` (model, tokenizer, adapter, identity), its config hash and dtype name.

`models.loading` builds these and `models.vlm` builds the vision-language ones; both import this module
and neither imports the other at module level (the loader hands VLM configs to `models.vlm` lazily).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from neuroshield.io import fingerprint
from neuroshield.models.adapters import ArchitectureAdapter


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    """A model, its tokenizer (and processor for VLMs), its adapter and its identity."""

    model: PreTrainedModel
    tokenizer: Any
    adapter: ArchitectureAdapter
    spec: str
    model_id: str  # human-readable identity recorded in every artifact
    processor: Any | None = None
    load_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return config_hash(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def dtype_name(model: Any) -> str:
    """The dtype of a model's parameters as a plain name ("float32", "bfloat16")."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


def config_hash(config: Any) -> str:
    """Hash of the architecture-defining config, stable across saves and dtypes."""
    volatile = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "_commit_hash",
                "_attn_implementation_autoset", "use_cache")

    def clean(d: Any) -> Any:
        # nested sub-configs (a VLM's text_config / vision_config) carry their own dtype keys
        return {k: clean(v) for k, v in d.items() if k not in volatile} if isinstance(d, dict) else d

    return fingerprint(clean(config.to_dict()))


__all__ = ["LoadedModel", "ModelLoadError", "config_hash", "dtype_name"]
