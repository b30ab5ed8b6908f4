"""Architecture adapters: where each architecture keeps its decoder layers, MLP and attention.

Registered explicitly, one per architecture, keyed by `config.model_type`; never guessed from the
model's name. Vision-language adapters register here too (see `neuroshield.models.vlm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names of the modules that hold neurons, relative to the loaded model object."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"  # dotted path from the top-level model to the ModuleList
    mlp: str = "mlp"
    gate_proj: str | None = "gate_proj"  # None for fc1/fc2 MLPs
    up_proj: str = "up_proj"  # fc1 in non-gated MLPs
    down_proj: str = "down_proj"  # fc2 in non-gated MLPs
    attn: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    text_config_attr: str | None = None  # e.g. "text_config" for vision-language models
    multimodal: bool = False

    def text_config(self, config: Any) -> Any:
        return getattr(config, self.text_config_attr) if self.text_config_attr else config

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj: Any = model
        for part in self.layers_path.split("."):
            if not hasattr(obj, part):
                raise UnsupportedArchitectureError(
                    f"adapter {self.name!r}: model {type(model).__name__} has no '{self.layers_path}' "
                    f"(missing '{part}'); the adapter does not match this transformers version or model"
                )
            obj = getattr(obj, part)
        if not isinstance(obj, nn.ModuleList):
            raise UnsupportedArchitectureError(f"adapter {self.name!r}: '{self.layers_path}' is not a ModuleList")
        return obj

    def geometry(self, config: Any) -> "AttentionGeometry":
        tc = self.text_config(config)
        heads = int(tc.num_attention_heads)
        kv_heads = int(getattr(tc, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
        return AttentionGeometry(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def query_units_of_kv_unit(self, kv_unit: int) -> list[int]:
        """q_proj output units that read key/value unit `kv_unit` = (h_kv, d).

        kv head h_kv serves query heads h_kv*rep .. h_kv*rep+rep-1 (transformers' repeat_kv).
        """
        h_kv, d = divmod(kv_unit, self.head_dim)
        rep = self.group_size
        return [(h_kv * rep + r) * self.head_dim + d for r in range(rep)]


_REGISTRY: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    for model_type in adapter.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] != adapter:
            raise ValueError(f"model_type {model_type!r} already has adapter {_REGISTRY[model_type].name!r}")
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for_config(config: Any) -> ArchitectureAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture model_type={model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())}. Add an ArchitectureAdapter with register_adapter()."
        )
    return _REGISTRY[model_type]


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    return adapter_for_config(model.config)


LLAMA = register_adapter(ArchitectureAdapter(name="llama", model_types=("llama",)))
QWEN2 = register_adapter(ArchitectureAdapter(name="qwen2", model_types=("qwen2",)))
QWEN3 = register_adapter(ArchitectureAdapter(name="qwen3", model_types=("qwen3",)))
MISTRAL = register_adapter(ArchitectureAdapter(name="mistral", model_types=("mistral",)))
GEMMA2 = register_adapter(ArchitectureAdapter(name="gemma2", model_types=("gemma2",)))
GEMMA3_TEXT = register_adapter(ArchitectureAdapter(name="gemma3_text", model_types=("gemma3_text",)))
