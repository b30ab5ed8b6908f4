"""Neuron-only training: sparse row/column deltas on frozen weights, applied on the module outputs.

Only the parameter slices that the selected neurons own (`Site.owned`: rows of gate/up/q/k/v and their
bias entries, columns of down/o) are trainable. Each owned slice is a *delta*: an index tensor (which
rows or columns) plus a trainable values tensor of shape `[k, other_dim]` (`[k]` for a bias). The base
weights keep `requires_grad=False` and never receive a gradient; the optimizer sees only the deltas, so
its state, weight decay, gradient clipping and gradient accumulation act on the deltas alone. Setting
`requires_grad` on a slice of a weight does nothing in PyTorch; this is the working alternative.

The deltas are applied by a forward hook on each touched `nn.Linear`, without building a new weight:

* row-owned (`y = x Wᵀ + b`, rows `idx` changed by `Δ` [k, in], bias by `δ` [k]):
  `y[..., idx] += x Δᵀ + δ`
* column-owned (down_proj / o_proj, columns `idx` changed by `Δ` stored as [k, out]):
  `y += x[..., idx] Δ`

That costs O(tokens x k x dim) per module and no copy of W. The result equals training the dense
weight with a gradient mask (the gradient of a delta is the masked gradient of the weight); the tests
check that, and that every other tensor stays bit-identical.

`merge()` writes the deltas into the weights (for export; the original slices are kept so that
`unmerge()` restores them bit-exactly), `detach()` removes the hooks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from neuroshield.models.sites import resolve_sites


class SparseDeltaError(ValueError):
    pass


@dataclass(frozen=True)
class SliceSpec:
    """One owned slice: `param_name` (a Linear weight or bias), `axis` (0 rows, 1 columns), indices."""

    param_name: str
    axis: int
    index: torch.Tensor  # sorted unique int64


@dataclass
class _LinearDeltas:
    """Delta keys of one nn.Linear (rows and bias entries, or columns; never rows and columns at once)."""

    module_name: str
    module: nn.Linear
    row_key: str | None = None  # key in SparseDeltas.deltas of the [k, in] row delta
    bias_key: str | None = None  # key of the [k] bias delta
    col_key: str | None = None  # key of the [k, out] column delta (transposed columns)
    bias_with_rows: bool = False  # bias indices equal the row indices: one index_add for both


def _key(param_name: str, axis: int) -> str:
    # ParameterDict keys may not contain "."
    return f"{param_name.replace('.', '__')}__axis{axis}"


NEURON_PARTS = ("all", "output")


def slices_from_neuron_set(loaded: Any, neuron_set: Any, parts: str = "all") -> list[SliceSpec]:
    """The owned slices of every unit of `neuron_set` (a NeuronSet) in `loaded` (a LoadedModel).

    `parts="all"`: every slice a unit owns (FFN: gate and up rows, down column). `parts="output"`: only
    the slices of the module the unit is measured at (FFN: the down_proj column that writes the unit into
    the residual stream; attention sites own one slice each anyway): the unit then fires on the same
    inputs as before training, and only what it writes changes.
    """
    if parts not in NEURON_PARTS:
        raise ValueError(f"parts={parts!r}: choose from {', '.join(NEURON_PARTS)}")
    neuron_set.check_model(loaded)
    sites = {s.key: s for s in resolve_sites(loaded.model, loaded.adapter, tuple(neuron_set.site_kinds()))}
    out: list[SliceSpec] = []
    for key, idx in neuron_set.units.items():
        site = sites[key]
        for owned in site.owned:
            if parts == "output" and not owned.name.startswith(site.module_name + "."):
                continue
            out.append(SliceSpec(owned.name, owned.axis, idx.clone()))
    return out


def freeze(model: nn.Module) -> None:
    """`requires_grad=False` on every parameter (the base model never gets a gradient)."""
    for p in model.parameters():
        p.requires_grad_(False)


class SparseDeltas(nn.Module):
    """Trainable sparse deltas over the owned slices of a frozen model; hooks attached on creation.

    `SparseDeltas(model, slices)` freezes `model`, creates one zero-initialised delta per (parameter,
    axis) and registers one forward hook per touched Linear. `parameters()` are the deltas only.
    Slices given twice for the same (parameter, axis) are merged (union of indices).
    """

    def __init__(self, model: nn.Module, slices: Iterable[SliceSpec], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._model = [model]  # a list so that nn.Module does not register the base model as a child
        self.deltas = nn.ParameterDict()
        # indices are non-persistent buffers ("idx_<key>") so that .to(device) moves them with the deltas
        self.param_of_key: dict[str, tuple[str, int]] = {}  # delta key -> (param name, axis)
        self._linears: dict[str, _LinearDeltas] = {}
        self._handles: list[Any] = []
        self._merged_orig: dict[str, torch.Tensor] | None = None
        freeze(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        modules = dict(model.named_modules(remove_duplicate=False))
        grouped: dict[tuple[str, int], set[int]] = {}
        for s in slices:
            if s.axis not in (0, 1):
                raise SparseDeltaError(f"{s.param_name}: axis must be 0 (rows) or 1 (columns), got {s.axis}")
            grouped.setdefault((s.param_name, s.axis), set()).update(int(i) for i in s.index.flatten().tolist())
        for (pname, axis), idx_set in sorted(grouped.items()):
            if pname not in params:
                raise SparseDeltaError(f"parameter {pname!r} not found in the model")
            mod_name, _, attr = pname.rpartition(".")
            module = modules.get(mod_name)
            if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
                raise SparseDeltaError(
                    f"{pname}: only nn.Linear weights and biases can take sparse deltas "
                    f"(got {type(module).__name__}.{attr}); embeddings are never trainable here"
                )
            param = params[pname]
            if attr == "bias" and axis != 0:
                raise SparseDeltaError(f"{pname}: a bias has only axis 0")
            index = torch.tensor(sorted(idx_set), dtype=torch.long, device=param.device)
            size = param.shape[axis]
            if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= size):
                raise SparseDeltaError(f"{pname}: index out of range for axis {axis} of size {size}")
            if attr == "bias":
                shape: tuple[int, ...] = (index.numel(),)
            else:
                shape = (index.numel(), param.shape[1 - axis])
            key = _key(pname, axis)
            self.deltas[key] = nn.Parameter(torch.zeros(shape, dtype=dtype, device=param.device))
            self.register_buffer(f"idx_{key}", index, persistent=False)
            self.param_of_key[key] = (pname, axis)
            lin = self._linears.setdefault(mod_name, _LinearDeltas(mod_name, module))
            if attr == "bias":
                lin.bias_key = key
            elif axis == 0:
                lin.row_key = key
            else:
                lin.col_key = key
        for lin in self._linears.values():
            if lin.col_key is not None and (lin.row_key is not None or lin.bias_key is not None):
                raise SparseDeltaError(
                    f"{lin.module_name}: rows and columns of the same matrix at once are not supported "
                    "(no site kind owns both)"
                )
            lin.bias_with_rows = (lin.row_key is not None and lin.bias_key is not None
                                  and torch.equal(self.index(lin.row_key), self.index(lin.bias_key)))
        self.attach()

    # --- hooks -----------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for lin in self._linears.values():
            self._handles.append(lin.module.register_forward_hook(self._make_hook(lin)))

    def detach(self) -> None:
        """Remove the hooks. If not merged, the model is the base model again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def index(self, key: str) -> torch.Tensor:
        """The row/column indices of delta `key`."""
        return self.get_buffer(f"idx_{key}")

    @property
    def indices(self) -> dict[str, torch.Tensor]:
        return {key: self.index(key) for key in self.deltas}

    def _make_hook(self, lin: _LinearDeltas):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
            if self._merged_orig is not None:
                return None  # the weights already hold the deltas
            x = args[0]
            bias_done = False
            if lin.row_key is not None:
                contrib = F.linear(x, self.deltas[lin.row_key].to(x.dtype))
                if lin.bias_with_rows:
                    assert lin.bias_key is not None
                    contrib = contrib + self.deltas[lin.bias_key].to(x.dtype)
                    bias_done = True
                y = torch.index_add(y, -1, self.index(lin.row_key), contrib.to(y.dtype))
            if lin.bias_key is not None and not bias_done:
                b = self.deltas[lin.bias_key].to(y.dtype).expand(*y.shape[:-1], -1)
                y = torch.index_add(y, -1, self.index(lin.bias_key), b)
            if lin.col_key is not None:
                xs = x.index_select(-1, self.index(lin.col_key))
                y = y + (xs @ self.deltas[lin.col_key].to(x.dtype)).to(y.dtype)
            return y

        return hook

    # --- sizes -----------------------------------------------------------------------------------
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.deltas.values())

    def touched(self) -> list[tuple[str, int, torch.Tensor]]:
        """(parameter name, axis, index) of every delta."""
        return [(*self.param_of_key[k], self.index(k)) for k in self.deltas]

    def count_by_layer(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for key, p in self.deltas.items():
            layer = layer_of(self.param_of_key[key][0])
            out[layer] = out.get(layer, 0) + p.numel()
        return dict(sorted(out.items()))

    # --- merge / unmerge -------------------------------------------------------------------------
    def _param(self, key: str) -> nn.Parameter:
        name = self.param_of_key[key][0]
        return dict(self.model.named_parameters(remove_duplicate=False))[name]

    def merged_slices(self) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(param name, axis, index, original slice, merged slice) per delta, in the weight's layout/dtype.

        The merged slice is exactly what `merge()` writes (computed in float32, cast to the weight's dtype).
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for key, delta in self.deltas.items():
            name, axis = self.param_of_key[key]
            param, idx = params[name], self.index(key).to(params[name].device)
            if self._merged_orig is not None:
                orig = self._merged_orig[key]
            else:
                orig = param.detach().index_select(axis, idx).clone()
            yield name, axis, idx, orig, _merge_slice(orig, delta.detach(), axis)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the deltas into the weights (the hooks then pass through). Keeps the originals."""
        if self._merged_orig is not None:
            return
        params = dict(self.model.named_parameters(remove_duplicate=False))
        orig_store: dict[str, torch.Tensor] = {}
        for name, axis, idx, orig, new in list(self.merged_slices()):
            key = _key(name, axis)
            orig_store[key] = orig
            params[name].data.index_copy_(axis, idx, new)
        self._merged_orig = orig_store

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight slices bit-exactly (the deltas stay, applied by the hooks)."""
        if self._merged_orig is None:
            return
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for key, orig in self._merged_orig.items():
            name, axis = self.param_of_key[key]
            params[name].data.index_copy_(axis, self.index(key).to(orig.device), orig)
        self._merged_orig = None

    @property
    def merged(self) -> bool:
        return self._merged_orig is not None

    # --- state -----------------------------------------------------------------------------------
    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """Plain tensors for a checkpoint: `<key>` values and `<key>.index` indices."""
        out = {}
        for key, p in self.deltas.items():
            out[key] = p.detach().cpu().contiguous()
            out[f"{key}.index"] = self.index(key).cpu().contiguous()
        return out

    @torch.no_grad()
    def load_delta_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, p in self.deltas.items():
            if key not in tensors or not torch.equal(tensors[f"{key}.index"].cpu(), self.index(key).cpu()):
                raise SparseDeltaError(f"checkpoint does not match these deltas (missing or different {key})")
            p.copy_(tensors[key].to(p.device, p.dtype))


def _merge_slice(orig: torch.Tensor, delta: torch.Tensor, axis: int) -> torch.Tensor:
    d = delta.to(orig.device, torch.float32)
    if orig.dim() == 2 and axis == 1:
        d = d.t()  # deltas of columns are stored [k, out]; the slice is [out, k]
    return (orig.to(torch.float32) + d).to(orig.dtype)


def layer_of(param_name: str) -> int:
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def dense_masks(model: nn.Module, slices: Iterable[SliceSpec]) -> dict[str, torch.Tensor]:
    """Boolean masks over whole parameters that select the owned slices (for tests and checks)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    masks: dict[str, torch.Tensor] = {}
    for s in slices:
        p = params[s.param_name]
        m = masks.setdefault(s.param_name, torch.zeros(p.shape, dtype=torch.bool))
        m.index_fill_(s.axis, s.index.cpu(), True)
    return masks


__all__ = ["SliceSpec", "SparseDeltas", "SparseDeltaError", "slices_from_neuron_set", "freeze", "dense_masks"]
