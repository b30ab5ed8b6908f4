"""`train`: one training run of a recipe (stage 5), from its settings to its summary.

`train()` runs on one CPU, one GPU or several GPUs (`accelerate launch`) through `accelerate`. Its parts: the
recipe's neuron set, data and trainable parameters (`train.recipes`), the resumable loop (`train.loop`,
`train.checkpoints`), then the patch, merge and export (`train.export`). It writes into `out_dir`:
`summary.json`, `loss.json`, `loss.png`, `examples.jsonl`, the neuron set used, a checkpoint every
`checkpoint_every` steps (trainable tensors + optimizer + RNG + step, written to a temporary folder and renamed)
from which an interrupted run resumes exactly, `safety_patch.safetensors` (neuron recipes) and `model/` (merged
checkpoint that plain transformers loads). Ctrl-C writes a checkpoint before exiting.

The settings are the pipeline's (`neuroshield.settings.TrainConfig`, its defaults when none are given) and the
run options the pipeline config does not set (`TrainOptions`), so a notebook gets the config's behaviour:

    from neuroshield.settings import TrainConfig
    from neuroshield.train.trainer import train
    result = train(loaded, "precise-shield", TrainConfig(steps=10), harmful=records, out_dir="runs/t", neuron_set=ns)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuroshield.data.records import PromptRecord
from neuroshield.io import fingerprint, write_json
from neuroshield.memory import peak_rss_mb
from neuroshield.models.sites import count_parameters
from neuroshield.neurons.neuronset import NeuronSet
from neuroshield.settings import BENIGN_CACHE, PipelineConfig, TrainConfig, TrainOptions
from neuroshield.train.checkpoints import (
    latest_checkpoint,
    load_selected,
    resume_training,
    save_checkpoint,
    trainable_named,
)
from neuroshield.train.data import TrainExample
from neuroshield.train.export import Finished, finish_trained, plot_losses
from neuroshield.train.loop import LoopOutcome, OnStep, Session, run_loop
from neuroshield.train.recipes import (
    LORA_MODULES,
    NEURON_RECIPES,
    RECIPES,
    Trainable,
    TrainingData,
    recipe_lr,
    trainable_part,
    training_data,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    recipe: str
    out_dir: str
    steps: int
    steps_done: int
    trainable_parameters: int
    parameters_updated: int  # parameters of the model that training may change (after merging)
    total_parameters: int
    wall_seconds: float
    train_seconds: float
    seconds_per_step: float
    peak_rss_mb: float  # whole process so far (includes the export checks)
    peak_cuda_mb: float | None
    final_loss: float | None
    rss_before_mb: float | None = None  # resident memory with the model loaded, before training
    peak_rss_train_mb: float | None = None  # peak resident memory at the end of the training loop
    losses: list[dict[str, float]] = field(default_factory=list)
    neuron_set: str | None = None
    neurons: int | None = None
    patch: str | None = None
    model_dir: str | None = None
    export: dict[str, Any] | None = None
    resumed_from: int | None = None
    interrupted: bool = False
    selected_step: int | None = None  # the step whose weights are the result, when training selected one
    device: str = "cpu"
    world_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction_updated(self) -> float:
        return self.parameters_updated / max(1, self.total_parameters)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction_updated"] = self.fraction_updated
        return d


def _check_arguments(recipe: str, neuron_set: NeuronSet | None, settings: TrainConfig, options: TrainOptions) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if recipe in NEURON_RECIPES and neuron_set is None:
        raise ValueError(f"recipe {recipe!r} needs a neuron set (neuron_set=, CLI --set)")
    s = settings
    if s.steps < 1 or s.batch_size < 1 or s.grad_accum < 1 or options.checkpoint_every < 1:
        raise ValueError(f"steps, batch_size, grad_accum and checkpoint_every must be >= 1 (got {s.steps}, "
                         f"{s.batch_size}, {s.grad_accum}, {options.checkpoint_every}); 0 steps would export the base "
                         "model as a trained one")
    if options.lr is not None and not options.lr > 0:
        raise ValueError(f"lr={options.lr!r}: the learning rate must be > 0")


def _accelerator(accelerator: Any, mixed_precision: str) -> Any:
    from accelerate import Accelerator

    acc = accelerator or Accelerator(mixed_precision=mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise RuntimeError(
            f"launched with WORLD_SIZE={launched} but accelerate runs {acc.num_processes} process(es); on CPUs set "
            "ACCELERATE_USE_CPU=1 (see docs/training.md), on GPUs use `accelerate launch --multi_gpu`"
        )
    return acc


def _setup_fingerprint(recipe: str, loaded: Any, part: Trainable, data: TrainingData, settings: TrainConfig,
                       options: TrainOptions, lr: float, seed: int, world: int) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed (`load_checkpoint` compares it)."""
    s, o, ns = settings, options, part.neuron_set
    return {
        "recipe": recipe, "config_hash": loaded.config_hash, "model_id": loaded.model_id,
        "neurons": None if ns is None else fingerprint({k: v.tolist() for k, v in ns.units.items()}),
        "data": data.info["fingerprint"], "lr": lr, "batch_size": s.batch_size, "grad_accum": s.grad_accum,
        "world_size": world, "max_length": s.max_length, "seed": seed, "weight_decay": o.weight_decay,
        "max_grad_norm": o.max_grad_norm, "warmup_steps": s.warmup_steps, "benign_fraction": data.stream.fraction,
        "lora": [o.lora_r, o.lora_alpha, list(o.lora_targets or LORA_MODULES)] if recipe == "lora" else None,
        "delta_dtype": str(getattr(torch, o.delta_dtype)) if part.deltas is not None else None,
        "neuron_parts": s.neuron_parts if part.deltas is not None else None,
    }


def _result(recipe: str, out: Path, settings: TrainConfig, part: Trainable, loop: LoopOutcome, *, start: int,
            n_trainable: int, total: int, t_start: float, resumed_from: int | None, acc: Any,
            config: dict[str, Any], data: TrainingData, finished: Finished | None) -> TrainResult:
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    done_now = loop.step - start
    history = loop.history
    ns = part.neuron_set
    fin = finished or Finished()
    return TrainResult(
        recipe=recipe, out_dir=str(out), steps=settings.steps, steps_done=loop.step, trainable_parameters=n_trainable,
        parameters_updated=part.updated, total_parameters=total, wall_seconds=time.perf_counter() - t_start,
        train_seconds=loop.train_seconds, seconds_per_step=loop.train_seconds / done_now if done_now else math.nan,
        peak_rss_mb=peak_rss_mb(), peak_cuda_mb=cuda, final_loss=history[-1]["loss"] if history else None,
        losses=history, neuron_set=None if ns is None else ns.name, neurons=None if ns is None else len(ns),
        patch=fin.patch, model_dir=fin.model_dir, export=fin.export, resumed_from=resumed_from,
        interrupted=loop.interrupted, device=str(acc.device), world_size=acc.num_processes, config=config,
        data=data.info, **loop.memory,
    )


def train(
    loaded: Any,
    recipe: str,
    settings: TrainConfig | None = None,
    *,
    harmful: Sequence[PromptRecord | TrainExample],
    benign: Sequence[PromptRecord | TrainExample] = (),
    out_dir: str | Path,
    neuron_set: NeuronSet | None = None,
    seed: int = PipelineConfig().seed,
    options: TrainOptions | None = None,
    on_step: OnStep | None = None,
    accelerator: Any = None,
) -> TrainResult:
    """Train `loaded.model` with `recipe`; returns a TrainResult (also written to `out_dir/summary.json`).

    `settings`: the pipeline's train settings (default `TrainConfig()`): `steps` optimizer steps of `batch_size x
    grad_accum` examples per process, `benign_fraction` of them benign, harmful records kept in `languages` ([]:
    all given), ... `options`: what the config does not set (learning-rate override, LoRA shape, checkpoints,
    export; default `TrainOptions()`). `neuron_set`: the set to train (precise-shield, ss-expansion; see
    `recipe_neuron_set`) or, for `random`, the set whose random control is trained (`control_set`).
    `harmful`/`benign`: PromptRecords (turned into examples by `prepare_examples`) or ready TrainExamples.
    Afterwards `loaded.model` holds the trained weights, merged, without hooks (for LoRA: `loaded.model` is replaced
    by the merged base model). The base model's benign answers are cached in `options.benign_cache` (default:
    `out_dir/benign_answers.jsonl`; the pipeline and the CLI share one beside the recipes). `on_step(step, record)`
    runs after each optimizer step and may return a selection score (the best step's weights are the result).
    """
    settings = settings if settings is not None else TrainConfig()
    options = options if options is not None else TrainOptions()
    _check_arguments(recipe, neuron_set, settings, options)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = _accelerator(accelerator, options.mixed_precision)
    lr = recipe_lr(recipe, settings, options.lr)
    torch.manual_seed(seed)

    data = training_data(loaded, acc, harmful, benign, settings, out=out, use_references=options.use_references,
                         benign_cache=Path(options.benign_cache) if options.benign_cache else out / BENIGN_CACHE,
                         seed=seed)
    total_params = count_parameters(loaded.model)
    base_digests = None
    if options.export:
        from neuroshield.train.export import param_digests

        base_digests = param_digests(loaded.model)
    lm_head = loaded.model.get_output_embeddings()
    part = trainable_part(recipe, loaded, neuron_set, options, seed=seed, neuron_parts=settings.neuron_parts,
                          save_set_to=out / "neurons" if acc.is_main_process else None)
    if options.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for _, p in trainable_named(part.wrapper)]
    n_trainable = sum(p.numel() for p in trainable)
    if n_trainable == 0:
        raise ValueError(f"recipe {recipe!r}: no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=options.weight_decay)
    wrapper, optimizer = acc.prepare(part.wrapper, optimizer)
    setup = _setup_fingerprint(recipe, loaded, part, data, settings, options, lr, seed, acc.num_processes)
    config = {k: v for k, v in setup.items() if k != "neurons"}
    config.update({"steps": settings.steps, "checkpoint_every": options.checkpoint_every,
                   "languages": list(settings.languages), "gradient_checkpointing": options.gradient_checkpointing,
                   "mixed_precision": options.mixed_precision, "benign_answers": settings.benign_answers})
    session = Session(acc, wrapper, acc.unwrap_model(wrapper), optimizer, trainable, out, setup, recipe)
    start, history, resumed_from = resume_training(out, settings.steps, options.resume, session.unwrapped, optimizer,
                                                   setup, acc.is_main_process, recipe)
    loop = run_loop(session, loaded, data.stream, lm_head, settings, lr=lr, max_grad_norm=options.max_grad_norm,
                    checkpoint_every=options.checkpoint_every, start=start, history=history, on_step=on_step,
                    progress=options.progress)

    def result(finished: Finished | None) -> TrainResult:
        return _result(recipe, out, settings, part, loop, start=start, n_trainable=n_trainable, total=total_params,
                       t_start=t_start, resumed_from=resumed_from, acc=acc, config=config, data=data,
                       finished=finished)

    if loop.interrupted:
        if acc.is_main_process:
            write_json(out / "summary.json", result(None).to_dict())
        raise KeyboardInterrupt
    _keep_result_weights(session, loop)

    wrapper.eval()
    if options.gradient_checkpointing:
        loaded.model.gradient_checkpointing_disable()
    session.optimizer = optimizer = None
    acc.free_memory()
    selected = loop.selected
    finished = finish_trained(loaded, part, recipe, out, acc, step=loop.step, lr=lr, export=options.export,
                              patch_step=selected[1] if selected is not None else loop.step,
                              verify=options.verify_export, reload=options.verify_export_reload,
                              base_digests=base_digests)
    res = result(finished)
    res.selected_step = selected[1] if selected is not None else None
    if acc.is_main_process:
        write_json(out / "loss.json", loop.history)
        plot_losses(loop.history, out / "loss.png", f"{recipe} on {loaded.model_id}")
        write_json(out / "summary.json", res.to_dict())
    return res


def _keep_result_weights(s: Session, loop: LoopOutcome) -> None:
    """A final checkpoint of the last step (unless one is there), then the selected step's weights back in place
    when training selected an earlier step."""
    if s.acc.is_main_process and (loop.step > loop.last_saved or latest_checkpoint(s.out) is None):
        save_checkpoint(s.out, loop.step, s.unwrapped, s.optimizer, loop.history, s.fingerprint)
    s.acc.wait_for_everyone()
    if loop.selected is not None and loop.selected[1] != loop.step:
        load_selected(s.out, s.unwrapped, loop.selected[1])
        log.info("%s: the weights of step %d (best selection score %.4f) are the result", s.recipe, loop.selected[1],
                 loop.selected[0])


__all__ = ["TrainResult", "train"]
