"""The training loop: optimizer steps over the example stream, with checkpoints, step selection and Ctrl-C.

Loss: cross-entropy on response tokens only, averaged over the response tokens of each optimizer step (all
micro-batches of the step, all processes together). Logits are computed only at the positions that predict a
response token (the hidden states are gathered before `lm_head`), which saves most of the lm_head cost and memory
on long prompts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from neuroshield.memory import current_rss_mb, peak_rss_mb
from neuroshield.settings import TrainConfig
from neuroshield.train.checkpoints import save_checkpoint, save_selected
from neuroshield.train.data import IGNORE_INDEX, EncodedExample, ExampleStream, training_batch

log = logging.getLogger(__name__)

# on_step(step, loss record) -> a selection score (the best-scoring step's weights are the result) or None
OnStep = Callable[[int, dict[str, Any]], "float | None"]


class Forward(nn.Module):
    """What accelerate prepares: the network (+ the sparse deltas as a child, so DDP syncs them)."""

    def __init__(self, net: nn.Module, deltas: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        self.deltas = deltas

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        # input_ids and attention_mask; a VLM's image tensors besides (see `training_batch`)
        return self.net(**inputs, use_cache=False).logits


class GatherBeforeHead:
    """Pre-hook on lm_head: keep only the hidden states at `positions` (flat [B*T] indices) -> [1, N, H]."""

    def __init__(self, lm_head: nn.Module) -> None:
        self.positions: torch.Tensor | None = None
        self.handle = lm_head.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.positions is None:
            return None
        h = args[0]
        # positions live on the accelerator's device; with device_map="auto" lm_head may sit elsewhere
        return (h.reshape(-1, h.shape[-1]).index_select(0, self.positions.to(h.device)).unsqueeze(0), *args[1:])

    def remove(self) -> None:
        self.handle.remove()


def response_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat hidden positions that predict a response token, target ids, row of each target)."""
    b, t = labels.shape
    nxt = labels[:, 1:]
    mask = nxt != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)
    return rows * t + cols, nxt[mask], rows


@dataclass
class Session:
    """A prepared training run: the accelerator, the prepared module and optimizer, what checkpoints save."""

    acc: Any
    wrapper: nn.Module  # prepared by accelerate
    unwrapped: nn.Module
    optimizer: Any
    trainable: list[nn.Parameter]
    out: Path
    fingerprint: dict[str, Any]  # of the training setup: a checkpoint of another setup is refused
    recipe: str


@dataclass
class LoopOutcome:
    step: int  # the last step done
    history: list[dict[str, Any]]
    selected: tuple[float, int] | None  # (score, step) of the best-scoring step, when on_step returned scores
    last_saved: int  # the step of the newest checkpoint
    interrupted: bool
    train_seconds: float
    memory: dict[str, float | None] = field(default_factory=dict)


def _micro_batches(stream: ExampleStream, step: int, settings: TrainConfig, world: int, rank: int
                   ) -> list[list[EncodedExample]]:
    global_batch = settings.batch_size * settings.grad_accum * world
    return [stream.take(step * global_batch + (a * world + rank) * settings.batch_size, settings.batch_size)
            for a in range(settings.grad_accum)]


def _forward_backward(s: Session, loaded: Any, micro: Sequence[Sequence[EncodedExample]], gather: GatherBeforeHead
                      ) -> list[float]:
    """Gradients of one optimizer step; returns [harmful loss sum, harmful tokens, benign loss sum, benign tokens]
    of this process."""
    acc, world, device = s.acc, s.acc.num_processes, s.acc.device
    # mean over the response tokens of the whole step, all processes together (DDP averages the
    # gradients over processes, hence the factor `world`): equals one process with the global batch
    n_local = sum(e.response_tokens for mb in micro for e in mb)
    n_tokens = float(acc.reduce(torch.tensor(float(n_local), device=device), reduction="sum")) / world
    sums = {"harmful": 0.0, "benign": 0.0}
    counts = {"harmful": 0, "benign": 0}
    for a, mb in enumerate(micro):
        inputs, labels = training_batch(loaded, mb, device)
        flat, target, rows = response_targets(labels)
        gather.positions = flat.to(device)
        sync = acc.no_sync(s.wrapper) if a < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            logits = s.wrapper(**inputs)
            tok_loss = F.cross_entropy(logits[0].float(), target.to(device), reduction="none")
            acc.backward(tok_loss.sum() / max(1, n_tokens))
        tl = tok_loss.detach().cpu()
        for row, ex in enumerate(mb):
            sel = rows == row
            sums[ex.label] += float(tl[sel].sum())
            counts[ex.label] += int(sel.sum())
    gather.positions = None
    return [sums["harmful"], counts["harmful"], sums["benign"], counts["benign"]]


def _optimizer_step(s: Session, max_grad_norm: float) -> float:
    """Clip, step, zero the gradients; returns the gradient norm before clipping."""
    if max_grad_norm and max_grad_norm > 0:
        grad_norm = float(s.acc.clip_grad_norm_(s.trainable, max_grad_norm))
    else:
        grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in s.trainable if p.grad is not None])))
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _loss_record(s: Session, step: int, lr: float, grad_norm: float, seconds: float, local: list[float]
                 ) -> dict[str, Any]:
    stats = torch.tensor(local, dtype=torch.float64, device=s.acc.device)
    stats = s.acc.reduce(stats, reduction="sum").cpu().tolist()
    return {
        "step": step, "lr": lr, "grad_norm": grad_norm, "seconds": seconds,
        "loss": (stats[0] + stats[2]) / max(1.0, stats[1] + stats[3]),
        "loss_harmful": stats[0] / stats[1] if stats[1] else None,
        "loss_benign": stats[2] / stats[3] if stats[3] else None,
        "tokens": stats[1] + stats[3],
    }


def run_loop(s: Session, loaded: Any, stream: ExampleStream, lm_head: nn.Module, settings: TrainConfig, *, lr: float,
             max_grad_norm: float, checkpoint_every: int, start: int, history: list[dict[str, Any]],
             on_step: OnStep | None = None, progress: bool = True) -> LoopOutcome:
    """Optimizer steps `start` .. `settings.steps` (linear warm-up of `lr` over `settings.warmup_steps`), a
    checkpoint every `checkpoint_every` steps. `on_step(step, record)` may return a selection score: the best
    step's trainable tensors are then kept in `selected.safetensors`. Ctrl-C writes a checkpoint of the last step
    done and returns with `interrupted`."""
    acc = s.acc
    steps = settings.steps
    rss_before = current_rss_mb()
    gather = GatherBeforeHead(lm_head)
    step, last_saved, interrupted = start, start, False
    # (score, step) of the best step so far when on_step returns selection scores (restored on resume)
    scored = [(float(h["select_score"]), int(h["step"])) for h in history if h.get("select_score") is not None]
    selected: tuple[float, int] | None = max(scored, key=lambda x: (x[0], -x[1])) if scored else None
    t_loop = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    s.wrapper.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc=f"train {s.recipe}", unit="step",
               disable=not progress or not acc.is_main_process)
    try:
        while step < steps:
            t0 = time.perf_counter()
            cur_lr = lr * min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps > 0 else lr
            for g in s.optimizer.param_groups:
                g["lr"] = cur_lr
            micro = _micro_batches(stream, step, settings, acc.num_processes, acc.process_index)
            local = _forward_backward(s, loaded, micro, gather)
            grad_norm = _optimizer_step(s, max_grad_norm)
            step += 1
            rec = _loss_record(s, step, cur_lr, grad_norm, time.perf_counter() - t0, local)
            history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            score = on_step(step, rec) if on_step is not None else None
            if score is not None:  # a selection score: the best-scoring step's weights are the result
                rec["select_score"] = float(score)
                if selected is None or float(score) > selected[0]:
                    selected = (float(score), step)
                    if acc.is_main_process:
                        save_selected(s.out, s.unwrapped, step)
            if step % checkpoint_every == 0 and step < steps:
                if acc.is_main_process:
                    save_checkpoint(s.out, step, s.unwrapped, s.optimizer, history, s.fingerprint)
                acc.wait_for_everyone()
                last_saved = step
    except KeyboardInterrupt:
        interrupted = True
        s.optimizer.zero_grad(set_to_none=True)
        gather.positions = None
        if acc.is_main_process and step > last_saved:
            path = save_checkpoint(s.out, step, s.unwrapped, s.optimizer, history, s.fingerprint)
            log.warning("interrupted: checkpoint of step %d written to %s; run again to resume", step, path)
    finally:
        bar.close()
        gather.remove()
    return LoopOutcome(step=step, history=history, selected=selected, last_saved=last_saved, interrupted=interrupted,
                       train_seconds=time.perf_counter() - t_loop,
                       memory={"rss_before_mb": rss_before, "peak_rss_train_mb": peak_rss_mb()})


__all__ = ["Forward", "GatherBeforeHead", "response_targets", "Session", "LoopOutcome", "run_loop", "OnStep"]
