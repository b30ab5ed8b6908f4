"""Export a trained model as a plain Hugging Face checkpoint, and prove it is the trained one; the end of a
training run (`finish_trained`: patch, merge, export) and its loss plot.

`save_merged` writes `save_pretrained` (safetensors) + tokenizer into a folder, then checks:

1. the saved tensors differ from the base model (the "checkpoint identical to base" bug of SN-Tune and
   its forks): digests of the saved tensors are compared with digests taken from the base model before
   training; when the trained parameters are known (`expect_changed`), exactly those must differ;
2. plain `transformers.AutoModelForCausalLM.from_pretrained(folder)` reloads it with logits identical
   to the in-memory model (`verify_reload=True`).

The folder is built under a temporary name and renamed when complete (a full disk leaves nothing behind),
and carries `neuroshield-manifest.json` (written last: size and sha256 of every file), which
`check_merged` compares before the folder is used again. Weights that are not all finite are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from neuroshield.io import (
    MANIFEST,
    ArtifactError,
    atomic_dir,
    check_manifest,
    save_figure,
    write_json,
    write_manifest,
)

if TYPE_CHECKING:
    from neuroshield.train.recipes import Trainable


class ExportError(RuntimeError):
    pass


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes (no copy of them)
    return h.hexdigest()


def param_digests(model: nn.Module) -> dict[str, str]:
    """Digest of every tensor of the state dict (tied tensors appear under each of their names)."""
    return {name: tensor_digest(t) for name, t in model.state_dict().items()}


# safetensors dtype names -> torch dtypes (what `tensor_digest` hashes as the dtype)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def file_tensor_digests(path: str | Path, chunk: int = 1 << 24) -> dict[str, str]:
    """`tensor_digest` of every tensor of a safetensors file, read from the file in chunks: no tensor is
    materialised and the file is not memory-mapped, so the memory used is one chunk (a mapped file's pages would
    count in the process's resident memory, as a second copy of the weights). Raw bytes are little-endian, as in
    memory on the CPUs torch runs on; dtypes not listed here fall back to reading the tensor."""
    import json
    import struct

    out: dict[str, str] = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        start = 8 + n
        buf = bytearray(chunk)
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(spec["dtype"])
            if dtype is None:
                with safe_open(str(path), framework="pt") as st:
                    out[name] = tensor_digest(st.get_tensor(name))
                continue
            h = hashlib.blake2b(digest_size=16)
            h.update(str(dtype).encode())
            h.update(str(tuple(spec["shape"])).encode())
            begin, end = spec["data_offsets"]
            f.seek(start + begin)
            left = end - begin
            view = memoryview(buf)
            while left > 0:
                got = f.readinto(view[: min(chunk, left)])
                if not got:
                    raise ExportError(f"{path}: truncated in tensor {name}")
                h.update(view[:got])
                left -= got
            out[name] = h.hexdigest()
    return out


def saved_digests(folder: str | Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(file_tensor_digests(f))
    if not out:
        raise ExportError(f"{folder}: no safetensors files were written")
    return out


@dataclass
class ExportResult:
    folder: str
    tensors_saved: int
    tensors_changed: list[str] = field(default_factory=list)
    reload_max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "tensors_saved": self.tensors_saved,
                "tensors_changed": len(self.tensors_changed), "changed_names": self.tensors_changed,
                "reload_max_abs_diff": self.reload_max_abs_diff}


@torch.no_grad()
def probe_logits(model: nn.Module, tokenizer: Any, text: str = "Hello! How do I bake bread?") -> torch.Tensor:
    from neuroshield.models.chat import encode_chat

    enc = encode_chat(tokenizer, text)
    device = next(model.parameters()).device
    ids = torch.tensor([enc.input_ids], device=device)
    was = model.training
    model.eval()
    try:
        return model(input_ids=ids, use_cache=False).logits.float().cpu()
    finally:
        model.train(was)


def verify_reload(folder: str | Path, model: nn.Module, tokenizer: Any, atol: float = 0.0) -> float:
    """Reload `folder` with plain transformers; logits must equal `model`'s (max |diff| <= atol)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    ref = probe_logits(model, tokenizer)
    dtype = next(model.parameters()).dtype
    # a VLM reloads as what it is (AutoModelForCausalLM would drop the vision tower or refuse the config)
    auto = AutoModelForImageTextToText if hasattr(model.config, "vision_config") else AutoModelForCausalLM
    device = next(model.parameters()).device
    reloaded = auto.from_pretrained(str(folder), dtype=dtype, local_files_only=True).to(device)
    reloaded.eval()
    got = probe_logits(reloaded, tokenizer)
    del reloaded
    diff = float((ref - got).abs().max())
    if device.type != "cpu":  # GPU kernels need not be bitwise reproducible across two model instances
        atol = max(atol, 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3)
    if diff > atol:
        raise ExportError(f"{folder}: reloaded with plain transformers, the logits differ by {diff:g} "
                          f"(allowed {atol:g}); the export is not the trained model")
    return diff


def _name_key(name: str) -> tuple[str, ...]:
    return tuple(part for part in name.split(".") if part not in ("model", "language_model"))


def _memory_names(saved: dict[str, str], memory: dict[str, str]) -> dict[str, str]:
    """Saved tensor names -> the model's parameter names. transformers writes some architectures under their
    checkpoint layout (LLaVA: `language_model.model.layers...` on disk, `model.language_model.layers...` in
    memory); matching ignores the `model` / `language_model` path parts, and only when unambiguous."""
    by_key: dict[tuple[str, ...], list[str]] = {}
    for name in memory:
        by_key.setdefault(_name_key(name), []).append(name)
    out = {}
    for name, digest in saved.items():
        if name not in memory and len(by_key.get(_name_key(name), [])) == 1:
            name = by_key[_name_key(name)][0]
        out[name] = digest
    return out


def save_merged(
    loaded: Any, folder: str | Path, *, base_digests: dict[str, str] | None = None,
    expect_changed: Iterable[str] | None = None, verify: bool = True, atol: float = 0.0,
    meta: dict[str, Any] | None = None,
) -> ExportResult:
    """`save_pretrained` the (already merged, hook-free) `loaded.model` + tokenizer into `folder`.

    `base_digests` (from `param_digests` before training) enables the "differs from base" check;
    `expect_changed` (parameter names) makes it exact: those and only those must differ.
    """
    out = Path(folder)
    model = loaded.model
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise ExportError(f"{out}: not written: {len(bad)} weight tensors hold inf or NaN (first: {bad[0]}); training "
                          "diverged: train again with a lower learning rate")
    with atomic_dir(out) as tmp:
        result = _save_checked(loaded, out, tmp, base_digests, expect_changed, verify, atol, meta)
        write_manifest(tmp)  # last: the folder is complete
    return result


def check_merged(folder: str | Path) -> None:
    """Raise ArtifactError when an exported folder does not match its manifest (a folder exported before
    manifests were written passes)."""
    d = Path(folder)
    if not (d / MANIFEST).is_file():
        return
    problems = check_manifest(d)
    if problems:
        raise ArtifactError(f"{d}: the exported model is damaged ({problems[0]}): train the recipe again")


def _save_checked(loaded: Any, out: Path, tmp: Path, base_digests: dict[str, str] | None,
                  expect_changed: Iterable[str] | None, verify: bool, atol: float, meta: dict[str, Any] | None
                  ) -> ExportResult:
    model = loaded.model
    model.save_pretrained(str(tmp), safe_serialization=True)
    if getattr(loaded, "processor", None) is not None:  # a VLM: the processor (its tokenizer included)
        from neuroshield.models.vlm import save_processor

        save_processor(loaded.processor, tmp)
    elif getattr(loaded, "tokenizer", None) is not None:
        loaded.tokenizer.save_pretrained(str(tmp))
    if meta:
        write_json(tmp / "neuroshield-train.json", meta)
    saved = saved_digests(tmp)
    result = ExportResult(folder=str(out), tensors_saved=len(saved))
    if base_digests is not None:
        saved = _memory_names(saved, base_digests)
        changed = sorted(n for n, d in saved.items() if n in base_digests and base_digests[n] != d)
        unknown = sorted(n for n in saved if n not in base_digests)
        if unknown:
            raise ExportError(f"{out}: saved tensors not in the base model: {unknown[:5]}")
        if not changed:
            raise ExportError(
                f"{out}: the saved checkpoint is identical to the base model (training changed nothing, or the "
                "trained values were not merged into the weights before saving)"
            )
        if expect_changed is not None:
            want = set(expect_changed)
            missing = sorted(want - set(changed))
            extra = sorted(set(changed) - want)
            if missing or extra:
                raise ExportError(f"{out}: saved tensors that differ from the base do not match the trained ones "
                                  f"(unchanged but trained: {missing[:5]}; changed but not trained: {extra[:5]})")
        result.tensors_changed = changed
    if verify:
        result.reload_max_abs_diff = verify_reload(tmp, model, loaded.tokenizer, atol)
    return result


# the neuron-set meta a safety patch carries
_PATCH_SET_META = ("method", "rho", "languages", "modalities", "budget", "name", "control_of")


@dataclass
class Finished:
    patch: str | None = None  # the safety patch (neuron recipes)
    model_dir: str | None = None  # the merged model (export)
    export: dict[str, Any] | None = None  # what the export checked


def finish_trained(loaded: Any, part: Trainable, recipe: str, out: Path, acc: Any, *, step: int,
                   patch_step: int, lr: float, export: bool, verify: bool,
                   base_digests: dict[str, str] | None) -> Finished:
    """After the loop: the neuron recipes' safety patch (`out/safety_patch.safetensors`, `patch_step` being the
    step whose weights it holds) and their deltas merged; LoRA merged into `loaded.model`; the model frozen in
    eval mode; with `export`, the merged model saved to `out/model` and checked against `base_digests`
    (`save_merged`). Files are written by the main process."""
    done = Finished()
    if part.deltas is not None:
        from neuroshield.train.patch import patch_from_deltas

        ns = part.neuron_set
        assert ns is not None
        if acc.is_main_process:
            done.patch = str(patch_from_deltas(out / "safety_patch.safetensors", part.deltas, loaded, meta={
                "recipe": recipe, "neuron_set": ns.name, "neurons": len(ns),
                "neuron_set_meta": {k: v for k, v in ns.meta.items() if k in _PATCH_SET_META},
                "steps": patch_step, "lr": lr}))
        part.deltas.merge()
        part.deltas.detach()
    elif recipe == "lora":
        loaded.model = part.net.merge_and_unload()  # type: ignore[operator]
    from neuroshield.train.sparse import freeze

    freeze(loaded.model)
    loaded.model.eval()
    if export and acc.is_main_process:
        res = save_merged(loaded, out / "model", base_digests=base_digests, expect_changed=part.expect_changed,
                          verify=verify, meta={"recipe": recipe, "steps": step, "base_model": loaded.model_id,
                                               "config_hash": loaded.config_hash, "lr": lr})
        done.model_dir, done.export = res.folder, res.to_dict()
        done.export.pop("changed_names", None)
    acc.wait_for_everyone()
    return done


def plot_losses(history: list[dict[str, float]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="loss", color="black")
    for key, colour in (("loss_harmful", "tab:red"), ("loss_benign", "tab:blue")):
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key.replace("loss_", ""), color=colour, alpha=0.6, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (response tokens)")
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)  # long set names would run off the figure
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


__all__ = ["ExportError", "ExportResult", "param_digests", "saved_digests", "save_merged", "verify_reload",
           "tensor_digest", "probe_logits", "check_merged", "Finished", "finish_trained", "plot_losses"]
