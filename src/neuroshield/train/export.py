"""Export a trained model as a plain Hugging Face checkpoint, and prove it is the trained one; the end of a
training run (`finish_trained`: patch, merge, export) and its loss plot.

`save_merged` writes `save_pretrained` (safetensors) + tokenizer into a folder, then checks:

1. the saved tensors differ from the base model (the "checkpoint identical to base" bug of SN-Tune and
   its forks): digests of the saved tensors are compared with digests taken from the base model before
   training; when the trained parameters are known (`expect_changed`), exactly those must differ;
2. plain transformers loads it as the in-memory model (`verify=True`, `verify_structure`), proven without a
   second copy of the weights: the folder's config equals the model's and builds the same class; its tensor
   names (mapped as `from_pretrained` maps them), shapes and dtypes cover the model's state dict one to one
   (tied names aside); every saved tensor is bit-identical to the in-memory one (digests). With equal config,
   class and tensors the loaded model computes what the in-memory one does. Opt-in (`reload=True`,
   `verify_reload`): reload it for real with `from_pretrained` and compare logits (holds a second copy).

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


def _read_header(f: Any) -> tuple[dict[str, Any], int]:
    """The JSON header of an open safetensors file and the offset where its data starts."""
    import json
    import struct

    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), 8 + n


def saved_layout(folder: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every tensor in the folder's safetensors files, from the headers
    alone (no tensor data is read)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            header, _ = _read_header(f)
        out.update({name: (tuple(spec["shape"]), spec["dtype"]) for name, spec in header.items()
                    if name != "__metadata__"})
    return out


def file_tensor_digests(path: str | Path, chunk: int = 1 << 24) -> dict[str, str]:
    """`tensor_digest` of every tensor of a safetensors file, read from the file in chunks: no tensor is
    materialised and the file is not memory-mapped, so the memory used is one chunk (a mapped file's pages would
    count in the process's resident memory, as a second copy of the weights). Raw bytes are little-endian, as in
    memory on the CPUs torch runs on; dtypes not listed here fall back to reading the tensor."""
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        header, start = _read_header(f)
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


# config keys that name the writer or the load, not the model
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset",
                                   "_attn_implementation", "architectures", "dtype", "torch_dtype"})


def _config_diff(saved: Any, memory: Any, path: str = "") -> list[str]:
    """`key: saved != memory` for every config entry that differs (nested configs entry by entry)."""
    if isinstance(saved, dict) and isinstance(memory, dict):
        out = []
        for key in sorted(set(saved) | set(memory)):
            if key in _VOLATILE_CONFIG_KEYS:
                continue
            out += _config_diff(saved.get(key), memory.get(key), f"{path}{key}.")
        return out
    return [] if saved == memory else [f"{path[:-1]}: {saved!r} in the folder, {memory!r} in memory"]


def _loader_names(shell: nn.Module) -> Any:
    """The function transformers' `from_pretrained` uses to map a checkpoint's tensor names onto the model's
    (renamings such as LLaVA's `language_model.model.` -> `model.language_model.`, the base-model prefix); returns
    (name, whether a value conversion, e.g. experts fused into one tensor, applies)."""
    meta = shell.state_dict()
    prefix = getattr(shell, "base_model_prefix", None)
    try:  # transformers >= 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: regex renamings on the class
        import re

        mapping = getattr(shell, "_checkpoint_conversion_mapping", None) or {}

        def rename4(name: str) -> tuple[str, bool]:
            for pattern, repl in mapping.items():
                name, n = re.subn(pattern, repl, name)
                if n:
                    break
            return name, False
        return rename4
    transforms = get_model_conversion_mapping(shell)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename5(name: str) -> tuple[str, bool]:
        new, converter = rename_source_key(name, renamings, converters, prefix, meta)
        if new not in meta and name in meta:  # as from_pretrained: the name as it is, with the prefix fixed
            new, converter = rename_source_key(name, [], [], prefix, meta)
        return new, converter is not None
    return rename5


def _tied_targets(shell: nn.Module, memory: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names transformers fills by tying on load -> the name they are tied to."""
    ties = getattr(shell, "all_tied_weights_keys", None)  # transformers >= 5: {target: source}
    if ties is not None:
        return dict(ties)
    first: dict[tuple[int, tuple[int, ...]], str] = {}  # transformers 4: tensors sharing storage in memory
    out = {}
    for name, t in memory.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def verify_structure(folder: str | Path, model: nn.Module, saved: dict[str, str] | None = None) -> int:
    """Check, without loading the weights a second time, that plain transformers loads `folder` as `model`:

    * `AutoConfig.from_pretrained(folder)` equals `model.config` (volatile keys aside) and the auto class builds
      the same model class from it (on the meta device: no memory);
    * the safetensors files' tensor names, mapped as `from_pretrained` maps them, cover that model's state dict
      one to one: none unexpected, none missing except names transformers ties on load, same shape and dtype;
    * every saved tensor is bit-identical to the in-memory one (digests; `saved`: `saved_digests(folder)` when
      already computed), and every tied name equals its source in memory.

    Raises ExportError naming the folder and what differs; returns the number of tensors checked."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    diff = _config_diff(config.to_dict(), model.config.to_dict())
    if diff:
        raise ExportError(f"{folder}: config.json differs from the trained model's config ({len(diff)} entries; "
                          f"first: {'; '.join(diff[:3])})")
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        shell = auto.from_config(config)
    if type(shell) is not type(model):
        raise ExportError(f"{folder}: plain transformers builds {type(shell).__name__} from it, the trained model "
                          f"is {type(model).__name__}")
    memory = model.state_dict()
    if set(shell.state_dict()) != set(memory):
        raise ExportError(f"{folder}: the model transformers builds from it has other tensors than the trained model "
                          f"({sorted(set(shell.state_dict()) ^ set(memory))[:5]})")
    layout = saved_layout(folder)
    saved = saved_digests(folder) if saved is None else saved
    rename = _loader_names(shell)
    digests = param_digests(model)
    loaded: dict[str, str] = {}  # model name -> file name
    problems: list[str] = []
    for name, (shape, dtype) in sorted(layout.items()):
        target, converted = rename(name)
        if converted or target not in memory:
            problems.append(f"{name}: {'converted on load' if converted else 'not a tensor of the model'}")
            continue
        if target in loaded:
            problems.append(f"{name}: loads into {target} as {loaded[target]} does")
            continue
        loaded[target] = name
        t = memory[target]
        if shape != tuple(t.shape) or _SAFETENSORS_DTYPES.get(dtype) != t.dtype:
            problems.append(f"{name}: {dtype}{list(shape)} in the folder, {t.dtype}{list(t.shape)} in memory")
        elif saved.get(name) != digests[target]:
            problems.append(f"{name}: values differ from the trained model's {target}")
    ties = _tied_targets(shell, memory)
    for name in sorted(set(memory) - set(loaded)):
        source = ties.get(name)
        if source is None or source not in loaded:
            problems.append(f"{name}: missing (not in the folder, not tied on load)")
    for name, source in sorted(ties.items()):
        if name in digests and source in digests and digests[source] != digests[name]:
            problems.append(f"{name}: tied to {source} on load, but differs from it in the trained model")
    if problems:
        raise ExportError(f"{folder}: plain transformers would not load it as the trained model ({len(problems)} "
                          f"tensors; first: {'; '.join(problems[:3])})")
    return len(loaded)


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
    expect_changed: Iterable[str] | None = None, verify: bool = True, reload: bool = False, atol: float = 0.0,
    meta: dict[str, Any] | None = None,
) -> ExportResult:
    """`save_pretrained` the (already merged, hook-free) `loaded.model` + tokenizer into `folder`.

    `base_digests` (from `param_digests` before training) enables the "differs from base" check;
    `expect_changed` (parameter names) makes it exact: those and only those must differ. `verify`: the folder
    loads in plain transformers as the in-memory model (`verify_structure`: config, tensor names, shapes, dtypes,
    bit-identical values; no second copy of the weights). `reload`: also reload it for real and compare logits
    (`verify_reload`: a second copy of the weights in memory while it runs).
    """
    out = Path(folder)
    model = loaded.model
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise ExportError(f"{out}: not written: {len(bad)} weight tensors hold inf or NaN (first: {bad[0]}); training "
                          "diverged: train again with a lower learning rate")
    with atomic_dir(out) as tmp:
        result = _save_checked(loaded, out, tmp, base_digests, expect_changed, verify, reload, atol, meta)
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
                  expect_changed: Iterable[str] | None, verify: bool, reload: bool, atol: float,
                  meta: dict[str, Any] | None) -> ExportResult:
    model = loaded.model
    model.save_pretrained(str(tmp), safe_serialization=True)
    if getattr(loaded, "processor", None) is not None:  # a VLM: the processor (its tokenizer included)
        from neuroshield.models.vlm import save_processor

        save_processor(loaded.processor, tmp)
    elif getattr(loaded, "tokenizer", None) is not None:
        loaded.tokenizer.save_pretrained(str(tmp))
    if meta:
        write_json(tmp / "neuroshield-train.json", meta)
    on_disk = saved_digests(tmp)
    result = ExportResult(folder=str(out), tensors_saved=len(on_disk))
    if base_digests is not None:
        saved = _memory_names(on_disk, base_digests)
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
        verify_structure(tmp, model, on_disk)
    if reload:
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
                   base_digests: dict[str, str] | None, reload: bool = False) -> Finished:
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
                          verify=verify, reload=reload, meta={"recipe": recipe, "steps": step, "base_model": loaded.model_id,
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


__all__ = ["ExportError", "ExportResult", "param_digests", "saved_digests", "saved_layout", "save_merged",
           "verify_structure", "verify_reload",
           "tensor_digest", "probe_logits", "check_merged", "Finished", "finish_trained", "plot_losses"]
