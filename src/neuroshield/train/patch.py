"""Safety patches: the sparse result of neuron-only training as one small safetensors file.

Per touched matrix (or bias) the file holds three tensors:

* `<param name>|index`: int64 row (axis 0) or column (axis 1) indices,
* `<param name>|new`:   the patched rows/columns (`W.index_select(axis, index)` after training),
* `<param name>|orig`:  the same slices of the base model, so that revert is bit-exact and a model
  that is already patched, or is not the base this patch was made for, is detected.

The header metadata key `neuroshield_patch` holds JSON: format, model id, config hash, recipe, neuron
set, parameters touched, and per entry the parameter name, axis, shape and dtype. A `.json` copy of the
metadata is written beside the file for people. Files are written to a temporary name and renamed.

The metadata also holds the sha256 of the tensors (`tensors_sha256`), checked when the patch is read, and
a patch whose values are not all finite is refused when it is written and when it is read: applied, it
would make the model produce nothing but NaN.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from neuroshield.io import atomic_path, write_json
from neuroshield.models.loaded import config_hash
from neuroshield.train.sparse import layer_of

PATCH_FORMAT = 1
META_KEY = "neuroshield_patch"


class PatchError(ValueError):
    pass


@dataclass(frozen=True)
class PatchEntry:
    name: str
    axis: int
    index: torch.Tensor
    orig: torch.Tensor
    new: torch.Tensor


def _model_of(obj: Any) -> nn.Module:
    return obj.model if hasattr(obj, "model") and isinstance(getattr(obj, "model"), nn.Module) else obj


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _non_finite(entries: Iterable[PatchEntry]) -> list[str]:
    """'name (n values)' for each entry whose new or orig slices hold inf or NaN."""
    bad = []
    for e in entries:
        n = sum(int((~torch.isfinite(t)).sum()) for t in (e.new, e.orig) if t.is_floating_point())
        if n:
            bad.append(f"{e.name} ({n} values)")
    return bad


def save_patch(path: str | Path, entries: Iterable[PatchEntry], meta: dict[str, Any]) -> Path:
    """Write a patch file (and its `.json` metadata copy); returns the .safetensors path."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(".safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    items = []
    touched = 0
    for e in entries:
        if e.orig.shape != e.new.shape:
            raise PatchError(f"{e.name}: orig and new slices differ in shape")
        tensors[f"{e.name}|index"] = e.index.detach().cpu().long().contiguous()
        tensors[f"{e.name}|orig"] = e.orig.detach().cpu().contiguous()
        tensors[f"{e.name}|new"] = e.new.detach().cpu().contiguous()
        items.append({"name": e.name, "axis": e.axis, "shape": list(e.new.shape), "dtype": str(e.new.dtype),
                      "units": int(e.index.numel()), "parameters": int(e.new.numel()),
                      "changed": int((e.new != e.orig).sum())})
        touched += int(e.new.numel())
    if not items:
        raise PatchError("a patch needs at least one entry")
    entries_by_name = [PatchEntry(it["name"], it["axis"], tensors[f"{it['name']}|index"], tensors[f"{it['name']}|orig"],
                                  tensors[f"{it['name']}|new"]) for it in items]
    bad = _non_finite(entries_by_name)
    if bad:
        raise PatchError(f"{p}: not written: the trained values are not all finite (inf or NaN in {', '.join(bad[:3])}); "
                         "training diverged: train again with a lower learning rate")
    full = {"format": PATCH_FORMAT, **meta, "parameters_touched": touched, "entries": items,
            "tensors_sha256": _tensors_digest(tensors)}
    with atomic_path(p) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(full, ensure_ascii=False, default=str)})
    write_json(p.with_suffix(".json"), full)
    return p


def patch_from_deltas(path: str | Path, deltas: Any, loaded: Any, meta: dict[str, Any] | None = None) -> Path:
    """Write the patch of a `SparseDeltas` (merged or not) for `loaded`."""
    entries = [PatchEntry(name, axis, idx, orig, new) for name, axis, idx, orig, new in deltas.merged_slices()]
    base_meta = {"model_id": loaded.model_id, "config_hash": loaded.config_hash}
    base_meta.update(meta or {})
    return save_patch(path, entries, base_meta)


def read_patch(path: str | Path) -> tuple[dict[str, Any], list[PatchEntry]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"patch file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            if META_KEY not in header:
                raise PatchError(f"{p}: not a neuroshield safety patch (no {META_KEY!r} metadata)")
            meta = json.loads(header[META_KEY])
            if meta.get("format") != PATCH_FORMAT:
                raise PatchError(f"{p}: patch format {meta.get('format')!r}, this version reads {PATCH_FORMAT}")
            entries = [
                PatchEntry(it["name"], int(it["axis"]), f.get_tensor(f"{it['name']}|index"),
                           f.get_tensor(f"{it['name']}|orig"), f.get_tensor(f"{it['name']}|new"))
                for it in meta["entries"]
            ]
    except PatchError:
        raise
    except Exception as err:  # a damaged or foreign file
        raise PatchError(f"{p}: cannot read the patch ({err.__class__.__name__}: {err})") from None
    want = meta.get("tensors_sha256")
    if want:
        tensors = {f"{e.name}|{part}": getattr(e, part) for e in entries for part in ("index", "orig", "new")}
        if _tensors_digest(tensors) != want:
            raise PatchError(f"{p}: the tensors differ from the digest recorded in the patch (the file is damaged): "
                             "use an intact copy or train again")
    bad = _non_finite(entries)
    if bad:
        raise PatchError(f"{p}: holds values that are not finite (inf or NaN in {', '.join(bad[:3])}); applied, it "
                         "would break the model: do not use it, train again with a lower learning rate")
    return meta, entries


def _check(model: nn.Module, path: Path, meta: dict[str, Any], entries: list[PatchEntry], direction: str
           ) -> dict[str, nn.Parameter]:
    want = meta.get("config_hash")
    have = config_hash(model.config)
    if want and want != have:
        raise PatchError(
            f"{path}: made for model {meta.get('model_id')!r} (config hash {want}); this model has config hash "
            f"{have}. Use the patch on the model it was trained on."
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    expect_from = "orig" if direction == "apply" else "new"
    n_from = n_to = 0
    for e in entries:
        if e.name not in params:
            raise PatchError(f"{path}: parameter {e.name!r} does not exist in this model")
        param = params[e.name]
        if int(e.index.max()) >= param.shape[e.axis]:
            raise PatchError(f"{path}: {e.name} index out of range")
        cur = param.detach().index_select(e.axis, e.index.to(param.device)).cpu()
        frm = getattr(e, expect_from).to(param.dtype)
        to = getattr(e, "new" if direction == "apply" else "orig").to(param.dtype)
        if cur.shape != frm.shape:
            raise PatchError(f"{path}: {e.name} has shape {tuple(param.shape)}, the patch expects other slices")
        if torch.equal(cur, frm):
            n_from += 1
        elif torch.equal(cur, to):
            n_to += 1
        else:
            raise PatchError(
                f"{path}: the weights of {e.name} are neither the base weights this patch was made for nor the "
                f"patched ones; the model was changed some other way. Load the base model {meta.get('model_id')!r}."
            )
    if n_to and direction == "apply":
        raise PatchError(f"{path}: the model is already patched ({n_to} of {len(entries)} matrices hold the "
                         "patched values); revert it first or load the base model")
    if n_to and direction == "revert":
        raise PatchError(f"{path}: the model is not patched ({n_to} of {len(entries)} matrices hold the base "
                         "values); nothing to revert")
    return params


@torch.no_grad()
def _write(params: dict[str, nn.Parameter], entries: list[PatchEntry], which: str) -> None:
    for e in entries:
        param = params[e.name]
        value = getattr(e, which).to(param.device, param.dtype)
        param.data.index_copy_(e.axis, e.index.to(param.device), value)


def _apply_or_revert(model: Any, path: str | Path, direction: str) -> dict[str, Any]:
    m = _model_of(model)
    p = Path(path)
    meta, entries = read_patch(p)
    params = _check(m, p, meta, entries, direction)
    _write(params, entries, "new" if direction == "apply" else "orig")
    return meta


def apply_patch(model: Any, path: str | Path) -> dict[str, Any]:
    """Write the patched rows/columns into `model` (an nn.Module or a LoadedModel); returns the metadata.

    Refuses (PatchError, model unchanged) when the config hash differs, when the model is already
    patched, or when its weights are not the base weights the patch was made for.
    """
    return _apply_or_revert(model, path, "apply")


def revert_patch(model: Any, path: str | Path) -> dict[str, Any]:
    """Restore the base rows/columns bit-exactly; refuses when the model does not hold the patch."""
    return _apply_or_revert(model, path, "revert")


def patch_info(path: str | Path) -> dict[str, Any]:
    """Size on disk, parameters touched, per-layer and per-matrix counts, and the metadata."""
    p = Path(path)
    meta, entries = read_patch(p)
    by_layer: dict[int, int] = {}
    by_matrix: dict[str, int] = {}
    for e in entries:
        layer = layer_of(e.name)
        by_layer[layer] = by_layer.get(layer, 0) + int(e.new.numel())
        kind = ".".join(e.name.split(".")[-2:])
        by_matrix[kind] = by_matrix.get(kind, 0) + int(e.new.numel())
    info = {k: v for k, v in meta.items() if k != "entries"}
    info.update({
        "path": str(p),
        "size_bytes": p.stat().st_size,
        "matrices": len(entries),
        "parameters_touched": sum(int(e.new.numel()) for e in entries),
        "parameters_changed": sum(int((e.new != e.orig).sum()) for e in entries),
        "by_layer": {str(k): v for k, v in sorted(by_layer.items())},
        "by_matrix": dict(sorted(by_matrix.items())),
    })
    return info


__all__ = ["PatchError", "PatchEntry", "save_patch", "patch_from_deltas", "read_patch", "apply_patch",
           "revert_patch", "patch_info"]
