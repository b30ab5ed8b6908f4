"""Training checkpoints: write, find, check and restore them, and resume a run from the newest good one.

A checkpoint (`checkpoint-<step>/`) holds the trainable tensors, the optimizer state, the RNG state, the step and
the loss history, with the digests of its files in `state.json` (written last). It is built under a temporary name
and renamed; the two newest complete checkpoints stay, so a damaged newest one falls back to the one before it. A
checkpoint written by another training setup (its fingerprint differs) is refused. `selected.safetensors` holds
the trainable tensors of the best-scoring step when training selects one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroshield.io import ArtifactError, atomic_dir, atomic_path, check_manifest, digest_entries, read_json, write_json

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors")
SELECTED = "selected.safetensors"


class CheckpointError(ArtifactError):
    """A checkpoint that cannot be trusted (truncated, damaged): training falls back to the one before it."""


def trainable_named(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def checkpoint_step(d: Path) -> int:
    return int(d.name.rsplit("-", 1)[-1])


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints of `out_dir` (their state.json, written last, is there), newest first."""
    found = [d for d in Path(out_dir).glob("checkpoint-*")
             if d.is_dir() and d.name.rsplit("-", 1)[-1].isdigit() and (d / "state.json").is_file()]
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[0] if found else None


def save_checkpoint(out_dir: Path, step: int, module: nn.Module, optimizer: Any, history: list[dict[str, float]],
                    fingerprint: dict[str, Any], keep: int = 2) -> Path:
    """Trainable tensors, optimizer state, RNG state and step, into `checkpoint-<step>`: built under a temporary
    name, with the digests of its files in state.json (written last), then renamed. The `keep` newest complete
    checkpoints stay (older ones are removed only once this one is in place), so a damaged newest checkpoint
    falls back to the one before it."""
    from safetensors.torch import save_file

    final = out_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        tensors = {n: p.detach().cpu().contiguous() for n, p in trainable_named(module)}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {"step": step, "history": history, "fingerprint": fingerprint,
                                        "files": digest_entries(tmp, CHECKPOINT_FILES)})
    olds = [d for d in Path(out_dir).glob("checkpoint-*") if d.name.rsplit("-", 1)[-1].isdigit() and d != final]
    complete = set(checkpoints(out_dir)) - {final}
    newest_kept = sorted(complete, key=checkpoint_step, reverse=True)[: max(0, keep - 1)]
    for d in olds:
        if d not in newest_kept:
            shutil.rmtree(d, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, module: nn.Module, optimizer: Any, fingerprint: dict[str, Any]
                    ) -> tuple[int, list[dict[str, float]]]:
    """Restore a checkpoint into `module` and `optimizer`; returns (step, loss history). Every file is checked
    (digests, then read whole) before anything is restored: a damaged one raises CheckpointError and leaves the
    module and optimizer as they were. A checkpoint of another training setup raises ValueError."""
    from safetensors.torch import load_file

    try:
        state = read_json(ckpt / "state.json", "checkpoint state")
    except ArtifactError as err:
        raise CheckpointError(str(err)) from None
    old = state.get("fingerprint", {})
    diffs = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {old.get(k)!r} vs now {fingerprint.get(k)!r}" for k in diffs[:6])
        raise ValueError(f"{ckpt}: this checkpoint was written by a different training setup ({detail}). "
                         "Use another --out folder, or --no-resume to start over.")
    problems = check_manifest(ckpt, "state.json") if "files" in state else []  # older checkpoints: no digests
    if problems:
        raise CheckpointError(f"{ckpt}: {problems[0]}")
    try:
        tensors = load_file(str(ckpt / "trainable.safetensors"))
        optimizer_state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = load_file(str(ckpt / "rng.safetensors"))
    except Exception as err:  # truncated or damaged files of a checkpoint written before digests
        raise CheckpointError(f"{ckpt}: cannot be read ({err.__class__.__name__}: {err})") from None
    named = dict(trainable_named(module))
    if set(tensors) != set(named):
        raise ValueError(f"{ckpt}: trainable tensors do not match this model (use --no-resume or another --out)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[n].to(p.device, p.dtype))
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return int(state["step"]), list(state.get("history", []))


def resume_training(out: Path, steps: int, resume: bool, module: nn.Module, optimizer: Any,
                    fingerprint: dict[str, Any], is_main: bool, recipe: str
                    ) -> tuple[int, list[dict[str, Any]], int | None]:
    """(start step, loss history, resumed-from step or None): the newest readable checkpoint of `out` restored into
    `module` and `optimizer` when `resume`, else a fresh start (the main process then removes old checkpoints). A
    checkpoint past `steps` (a longer earlier run) is not resumed: its later weights would be exported as this
    run's result."""
    found = checkpoints(out) if resume else []
    if found and checkpoint_step(found[0]) > steps:
        log.warning("%s is past steps=%d: starting %s again", found[0], steps, recipe)
        found, resume = [], False
    start, history, resumed_from = 0, [], None
    for ckpt in found:  # newest first; a damaged one falls back to the one before it
        try:
            start, history = load_checkpoint(ckpt, module, optimizer, fingerprint)
        except CheckpointError as err:
            log.warning("%s; trying the checkpoint before it", err)
            continue
        history = [h for h in history if h["step"] <= start]
        resumed_from = start
        log.info("resuming %s from %s (step %d)", recipe, ckpt, start)
        break
    else:
        if found:
            log.warning("no readable checkpoint in %s: training %s from the start", out, recipe)
    if resumed_from is None and not resume and is_main:
        for d in out.glob("checkpoint-*"):
            shutil.rmtree(d, ignore_errors=True)
    return start, history, resumed_from


def save_selected(out_dir: Path, module: nn.Module, step: int) -> None:
    """The trainable tensors of the best step so far (atomic), so that a resumed run can still return them."""
    from safetensors.torch import save_file

    with atomic_path(out_dir / SELECTED) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable_named(module)}, str(tmp),
                  metadata={"step": str(step)})


def load_selected(out_dir: Path, module: nn.Module, step: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = out_dir / SELECTED
    with safe_open(str(path), framework="pt") as f:
        saved = int((f.metadata() or {}).get("step", -1))
    if saved != step:
        raise RuntimeError(f"{path} holds step {saved}, expected the selected step {step}; train again with --no-resume")
    tensors = load_file(str(path))
    with torch.no_grad():
        for n, p in trainable_named(module):
            p.copy_(tensors[n].to(p.device, p.dtype))


__all__ = ["CHECKPOINT_FILES", "SELECTED", "CheckpointError", "checkpoints", "latest_checkpoint", "save_checkpoint",
           "load_checkpoint", "resume_training", "save_selected", "load_selected", "trainable_named"]
