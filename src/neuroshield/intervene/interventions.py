"""Interventions on neuron sets while the model runs: `zero`, `scale:α`, `mean:<group>`.

    with intervene(loaded, neuron_set, "zero"):
        answers = generate_responses(loaded, prompts)

The set's units are rewritten at every position of every forward pass inside the block: prompt
tokens, and each generated token with the KV cache on (what is cached was computed under the
intervention too). Site kinds act where their units live (`neuroshield.models.sites`): `ffn` and
`attn_o` on the input of `down_proj` / `o_proj`, `attn_q/k/v` on the output of `q/k/v_proj` (units are
output features; a k/v unit feeds every query head of its group under grouped-query attention).

Modes (`parse_mode`):
- `none`: no change (a baseline that goes through the same code path).
- `zero`: a = 0.
- `scale:α`: a = α·a (`scale:0` equals `zero`, `scale:1` changes nothing, α > 1 reinforces).
- `mean:<group>`: a = that group's mean activation, e.g. `mean:en/text/benign` (mean ablation). The
  means come from `stats` (an `ActivationStats` with `.mean(group)`) or `means` (site key -> vector, or
  group name -> {site key -> vector}).

Hooks go through `site_hooks` and are removed when the block exits, also on exceptions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from neuroshield.models.hooks import site_hooks
from neuroshield.models.loading import LoadedModel
from neuroshield.models.sites import Site, resolve_sites
from neuroshield.neurons.neuronset import NeuronSet

ModeKind = Literal["none", "zero", "scale", "mean"]
MODE_HELP = "none | zero | scale:<alpha> (e.g. scale:2.0, scale:0) | mean:<language>/<modality>/<label>"


@dataclass(frozen=True)
class InterventionMode:
    kind: ModeKind
    alpha: float = 1.0  # scale factor (kind "scale")
    group: tuple[str, str, str] | None = None  # (language, modality, label) (kind "mean")

    def __str__(self) -> str:
        if self.kind == "scale":
            return f"scale:{self.alpha:g}"
        if self.kind == "mean":
            assert self.group is not None
            return "mean:" + "/".join(self.group)
        return self.kind

    @property
    def group_name(self) -> str | None:
        return "/".join(self.group) if self.group else None


def parse_mode(mode: str | InterventionMode, *, argument: str = "mode") -> InterventionMode:
    """Parse `zero`, `none`, `scale:α`, `mean:<lang>/<modality>/<label>` (or `mean:<lang>/<label>`: text)."""
    if isinstance(mode, InterventionMode):
        return mode
    raw = str(mode).strip()
    head, sep, rest = raw.partition(":")
    head = head.strip().lower()
    if head in ("none", "zero") and not sep:
        return InterventionMode(head)  # type: ignore[arg-type]
    if head == "scale":
        try:
            alpha = float(rest)
        except ValueError:
            raise ValueError(f"{argument}={raw!r}: scale needs a number, e.g. scale:2.0 or scale:0 "
                             f"(choose: {MODE_HELP})") from None
        if not math.isfinite(alpha):
            raise ValueError(f"{argument}={raw!r}: the scale factor must be finite")
        return InterventionMode("scale", alpha=alpha)
    if head == "mean":
        parts = [p.strip() for p in rest.split("/") if p.strip()]
        if len(parts) == 2:
            parts = [parts[0], "text", parts[1]]
        if len(parts) != 3:
            raise ValueError(f"{argument}={raw!r}: mean needs a group <language>/<modality>/<label>, "
                             f"e.g. mean:en/text/benign (choose: {MODE_HELP})")
        lang, modality, label = parts[0].lower(), parts[1].lower(), parts[2].lower()
        if modality not in ("text", "image"):
            raise ValueError(f"{argument}={raw!r}: modality {modality!r} must be text or image")
        if label not in ("harmful", "benign"):
            raise ValueError(f"{argument}={raw!r}: label {label!r} must be harmful or benign")
        return InterventionMode("mean", group=(lang, modality, label))
    raise ValueError(f"{argument}={raw!r} is not an intervention mode; choose: {MODE_HELP}")


def _means_of(stats: Any, means: Any, mode: InterventionMode, keys: list[str]) -> dict[str, torch.Tensor]:
    """site key -> full-width mean vector of the mode's group, from `means` or `stats`."""
    group, name = mode.group, mode.group_name
    source: Any
    if means is not None:
        source = means[name] if isinstance(means, Mapping) and name in means else means
    elif stats is not None:
        if not hasattr(stats, "mean"):
            raise TypeError(f"stats={type(stats).__name__}: expected ActivationStats with .mean(group)")
        try:
            source = stats.mean(group)
        except (KeyError, ValueError) as err:
            raise ValueError(f"mode={mode}: the statistics have no group {name!r} ({err}); collect statistics "
                             "on that group or choose another mean:<group>") from None
    else:
        raise ValueError(f"mode={mode} needs mean activations: pass stats=ActivationStats or means={{site: vector}}")
    if not isinstance(source, Mapping):
        raise TypeError(f"means for {name!r}: expected a mapping site key -> vector, got {type(source).__name__}")
    out = {}
    for key in keys:
        if key not in source:
            raise ValueError(f"mode={mode}: no mean activation for site {key} in group {name!r}; "
                             "collect statistics for that site kind")
        out[key] = torch.as_tensor(source[key]).flatten()
    return out


@dataclass
class _SitePlan:
    index: torch.Tensor  # unit indices on the device
    values: torch.Tensor | None  # mean values for those units (mode "mean")


def _apply(mode: InterventionMode, plan: _SitePlan, units: torch.Tensor) -> torch.Tensor:
    idx = plan.index
    if idx.device != units.device:
        idx = plan.index = idx.to(units.device)
    if mode.kind == "zero":
        return units.index_fill(-1, idx, 0.0)
    if mode.kind == "scale":
        return units.index_copy(-1, idx, units.index_select(-1, idx) * mode.alpha)
    assert plan.values is not None
    vals = plan.values
    if vals.device != units.device or vals.dtype != units.dtype:
        vals = plan.values = vals.to(units.device, units.dtype)
    return units.index_copy(-1, idx, vals.expand(*units.shape[:-1], idx.numel()))


def plan_sites(loaded: LoadedModel, neuron_set: NeuronSet) -> list[tuple[Site, torch.Tensor]]:
    """(site, unit indices) for every site of the set that has units; checks the set against the model."""
    neuron_set.check_model(loaded)
    kinds = tuple(neuron_set.site_kinds())
    if not kinds:
        return []
    sites = {s.key: s for s in resolve_sites(loaded.model, loaded.adapter, kinds)}
    return [(sites[key], idx) for key, idx in neuron_set.units.items()]


@contextmanager
def intervene(
    loaded: LoadedModel,
    neuron_set: NeuronSet,
    mode: str | InterventionMode = "zero",
    *,
    stats: Any = None,
    means: Mapping[str, Any] | None = None,
) -> Iterator[InterventionMode]:
    """Rewrite the set's units while the block runs (see module docstring); yields the parsed mode."""
    parsed = parse_mode(mode)
    pairs = plan_sites(loaded, neuron_set)
    if parsed.kind == "none" or not pairs:
        yield parsed
        return
    mean_vecs = _means_of(stats, means, parsed, [s.key for s, _ in pairs]) if parsed.kind == "mean" else {}
    plans: dict[str, _SitePlan] = {}
    for site, idx in pairs:
        device = site.module.weight.device
        values = None
        if parsed.kind == "mean":
            vec = mean_vecs[site.key]
            if vec.numel() != site.width:
                raise ValueError(f"mean vector for {site.key} has {vec.numel()} values, the site has {site.width} units")
            values = vec[idx].to(device=device, dtype=site.module.weight.dtype)
        plans[site.key] = _SitePlan(idx.to(device), values)

    def fn(site: Site, units: torch.Tensor) -> torch.Tensor:
        return _apply(parsed, plans[site.key], units)

    with site_hooks([s for s, _ in pairs], fn):
        yield parsed


__all__ = ["InterventionMode", "parse_mode", "intervene", "plan_sites", "MODE_HELP"]
