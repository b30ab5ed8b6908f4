"""Neuron sites: the module tensors whose units are neurons, and the parameters each unit owns.

Site kinds (one name each, used everywhere):
- `ffn`: input of `down_proj` = act(gate(x)) * up(x); unit i owns gate/up row i and down column i.
- `attn_q`, `attn_k`, `attn_v`: output units of q/k/v_proj; unit j owns row j (and bias j).
- `attn_o`: input units of `o_proj`; unit j owns column j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from neuroshield.models.adapters import ArchitectureAdapter, AttentionGeometry

SiteKind = Literal["ffn", "attn_q", "attn_k", "attn_v", "attn_o"]
SITE_KINDS: tuple[SiteKind, ...] = get_args(SiteKind)
HookPoint = Literal["input", "output"]


@dataclass(frozen=True)
class OwnedSlice:
    """Part of one parameter that a unit owns: `param[index]` along `axis` (0 = row, 1 = column)."""

    name: str  # parameter name in model.named_parameters()
    param: nn.Parameter
    axis: int


@dataclass(frozen=True)
class Site:
    layer: int
    kind: SiteKind
    module: nn.Module  # the nn.Linear whose input or output holds the units
    module_name: str
    hook: HookPoint  # "input": forward-pre-hook on module's input; "output": forward hook on its output
    width: int  # number of units
    owned: tuple[OwnedSlice, ...]

    @property
    def key(self) -> str:
        return site_key(self.layer, self.kind)

    @property
    def params_per_unit(self) -> int:
        total = 0
        for s in self.owned:
            shape = s.param.shape
            total += 1 if s.param.dim() == 1 else int(shape[1 - s.axis])
        return total


def site_key(layer: int, kind: str) -> str:
    return f"{layer}.{kind}"


def parse_site_key(key: str) -> tuple[int, str]:
    layer, kind = key.split(".", 1)
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown site kind {kind!r} in {key!r}; known: {', '.join(SITE_KINDS)}")
    return int(layer), kind


def _linear(parent: nn.Module, attr: str, where: str) -> nn.Linear:
    mod = getattr(parent, attr, None)
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"{where}.{attr} is {type(mod).__name__}, expected nn.Linear")
    return mod


def resolve_sites(
    model: nn.Module, adapter: ArchitectureAdapter, kinds: tuple[str, ...] | list[str] = ("ffn",)
) -> list[Site]:
    """All sites of the requested kinds, ordered by (layer, kind order in SITE_KINDS)."""
    unknown = [k for k in kinds if k not in SITE_KINDS]
    if unknown:
        raise ValueError(f"unknown site kinds {unknown}; choose from {', '.join(SITE_KINDS)}")
    names = {id(m): n for n, m in model.named_modules()}
    pnames = {id(p): n for n, p in model.named_parameters()}
    sites: list[Site] = []

    def owned(mod: nn.Linear, axis: int) -> list[OwnedSlice]:
        out = [OwnedSlice(pnames[id(mod.weight)], mod.weight, axis)]
        if axis == 0 and mod.bias is not None:
            out.append(OwnedSlice(pnames[id(mod.bias)], mod.bias, 0))
        return out

    for layer_idx, layer in enumerate(adapter.layers(model)):
        where = f"{adapter.layers_path}.{layer_idx}"
        mlp = getattr(layer, adapter.mlp)
        attn = getattr(layer, adapter.attn)
        for kind in SITE_KINDS:
            if kind not in kinds:
                continue
            if kind == "ffn":
                down = _linear(mlp, adapter.down_proj, f"{where}.{adapter.mlp}")
                up = _linear(mlp, adapter.up_proj, f"{where}.{adapter.mlp}")
                sl = owned(up, 0)
                if adapter.gate_proj:
                    sl = owned(_linear(mlp, adapter.gate_proj, f"{where}.{adapter.mlp}"), 0) + sl
                sl += owned(down, 1)
                sites.append(Site(layer_idx, kind, down, names[id(down)], "input", down.in_features, tuple(sl)))
            elif kind == "attn_o":
                o = _linear(attn, adapter.o_proj, f"{where}.{adapter.attn}")
                sites.append(Site(layer_idx, kind, o, names[id(o)], "input", o.in_features, tuple(owned(o, 1))))
            else:
                attr = {"attn_q": adapter.q_proj, "attn_k": adapter.k_proj, "attn_v": adapter.v_proj}[kind]
                lin = _linear(attn, attr, f"{where}.{adapter.attn}")
                sites.append(
                    Site(layer_idx, kind, lin, names[id(lin)], "output", lin.out_features, tuple(owned(lin, 0)))
                )
    return sites


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once even when tied (embeddings and lm_head)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def neuron_summary(model: nn.Module, adapter: ArchitectureAdapter) -> dict[str, dict[str, int]]:
    """Per site kind: units per layer, number of layers, total units, parameters owned per unit."""
    out: dict[str, dict[str, int]] = {}
    for kind in SITE_KINDS:
        sites = resolve_sites(model, adapter, (kind,))
        out[kind] = {
            "layers": len(sites),
            "units_per_layer": sites[0].width if sites else 0,
            "units": sum(s.width for s in sites),
            "params_per_unit": sites[0].params_per_unit if sites else 0,
        }
    return out


def geometry_of(model: nn.Module, adapter: ArchitectureAdapter) -> AttentionGeometry:
    return adapter.geometry(model.config)


def unit_activation(site: Site, args: tuple, output: torch.Tensor | None) -> torch.Tensor:
    """The [batch, seq, width] tensor of units at a site, from a hook's args/output."""
    return args[0] if site.hook == "input" else output  # type: ignore[return-value]
