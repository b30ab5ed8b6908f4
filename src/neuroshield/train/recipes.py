"""Training recipes and the training loop (stage 5).

Recipes (same data, same steps, same loop; only what is trainable differs):

* `precise-shield`: the union of safety-neuron sets over the chosen languages and modalities, trimmed to
  a parameter budget (default 0.03 % of all parameters); trained on the high-resource language only by
  default.
* `ss-expansion`: the high-resource language's MS-Neurons, trained on parallel refusal data in the
  chosen languages.
* `random`: a control with the same number of neurons at every (layer, site) as the set it is given
  (`random_like`, seeded).
* `lora`: peft LoRA (r=16, alpha=32 by default) on every linear layer of the decoder.
* `full`: every parameter.

`train()` runs on one CPU, one GPU or several GPUs (`accelerate launch`) through `accelerate`. It writes
into `out_dir`: `summary.json`, `loss.json`, `loss.png`, `examples.jsonl`, the neuron set used, a
checkpoint every `checkpoint_every` steps (trainable tensors + optimizer + RNG + step, written to a
temporary folder and renamed) from which an interrupted run resumes exactly, `safety_patch.safetensors`
(neuron recipes) and `model/` (merged checkpoint that plain transformers loads). Ctrl-C writes a
checkpoint before exiting.

Loss: cross-entropy on response tokens only, averaged over the response tokens of each optimizer step
(all micro-batches of the step together). Logits are computed only at the positions that predict a
response token (the hidden states are gathered before `lm_head`), which saves most of the lm_head cost
and memory on long prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from neuroshield.data.records import PromptRecord
from neuroshield.io import (
    ArtifactError,
    atomic_dir,
    atomic_path,
    check_manifest,
    digest_entries,
    read_json,
    write_json,
)
from neuroshield.models.sites import count_parameters
from neuroshield.neurons.neuronset import NeuronSet, random_like, run_set_names
from neuroshield.train.data import (
    IGNORE_INDEX,
    EncodedExample,
    ExampleStream,
    TrainExample,
    data_fingerprint,
    encode_examples,
    example_summary,
    reference_examples,
    refusal_examples,
    self_answer_examples,
    training_batch,
    write_examples,
)
from neuroshield.settings import BENIGN_CACHE, PipelineConfig, TrainConfig
from neuroshield.train.sparse import SparseDeltas, freeze, slices_from_neuron_set

log = logging.getLogger(__name__)

NEURON_RECIPES: tuple[str, ...] = ("precise-shield", "ss-expansion", "random")
RECIPES: tuple[str, ...] = NEURON_RECIPES + ("lora", "full")
_TC = TrainConfig()  # every default below that the pipeline also sets comes from its settings
DEFAULT_BUDGET = _TC.budget  # 0.03 % of all parameters (Precise Shield)
DEFAULT_HIGH_RESOURCE = PipelineConfig().high_resource[0]
# Learning rates that worked on Qwen2.5-0.5B in our runs (docs/training.md); override with lr=.
# neuron recipes: train.lr (3e-4 with the layer trim, configs/compare.yaml; 1e-3 and more rewrite a neuron within
# ~10 steps)
DEFAULT_LR: dict[str, float] = {"precise-shield": _TC.lr, "ss-expansion": _TC.lr, "random": _TC.lr, "lora": 2e-4,
                                "full": 1e-5}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------
# Neuron sets for the recipes
# --------------------------------------------------------------------------------------------------


def _set_file_candidates(folder: Path, language: str, modality: str) -> list[Path]:
    names = [f"ms_{language}"] if modality == "text" else [f"ms_{language}_{modality}", f"ms_{modality}_{language}"]
    return [folder / f"{n}.safetensors" for n in names]


def find_set_files(folder: str | Path, languages: Sequence[str] | None = None,
                   modalities: Sequence[str] = ("text",)) -> list[Path]:
    """The MS-neuron set files of `folder` (`ms_<lang>.safetensors`, `ms_<lang>_<modality>.safetensors`).

    `languages=None` means every language of the folder (text sets named `ms_<xx>`). Where identify listed its
    run's sets (`sets.json`), only those count: sets an earlier run left are never united.
    """
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"neuron set folder not found: {d}")
    names = run_set_names(d)  # the sets of the identify run that wrote the folder (None: no list there)
    if languages is None:
        stems = names if names is not None else [p.stem for p in d.glob("ms_*.safetensors")]
        languages = sorted({s[3:] for s in stems if s.startswith("ms_") and len(s) == 5})
        if not languages:
            raise FileNotFoundError(f"{d}: no ms_<lang>.safetensors sets; run `neuroshield identify` first")
    out: list[Path] = []
    for lang in languages:
        for mod in modalities:
            found = [p for p in _set_file_candidates(d, lang, mod) if p.is_file() and (names is None or p.stem in names)]
            if not found:
                have = ", ".join(sorted(p.name for p in d.glob("*.safetensors"))) or "none"
                raise FileNotFoundError(f"{d}: no set for language {lang!r}, modality {mod!r} "
                                        f"(looked for {_set_file_candidates(d, lang, mod)[0].name}; have: {have})")
            out.append(found[0])
    return out


def trim_set(ns: NeuronSet, loaded: Any, fraction: float, spread: str = "layer") -> NeuronSet:
    """Trim `ns` to `fraction` of all parameters (`neurons.selection.trim_to_budget`; `spread` score | layer)."""
    from neuroshield.neurons.selection import trim_to_budget

    return trim_to_budget(ns, loaded, fraction, spread=spread)


def recipe_neuron_set(
    recipe: str, loaded: Any, source: NeuronSet | str | Path | Sequence[str | Path], *,
    set_languages: Sequence[str] | None = None, modalities: Sequence[str] = ("text",),
    high_resource: str = DEFAULT_HIGH_RESOURCE, budget: float | None = DEFAULT_BUDGET, like: str = "precise-shield",
    seed: int = 0, trim: str = _TC.trim,
) -> NeuronSet:
    """The neuron set a recipe trains, from a set, a set file, several files, or a folder of MS sets.

    * `precise-shield`: union over `set_languages` x `modalities` (folder: every language found), trimmed
      to `budget` (fraction of all parameters; None = no trimming) by `trim` (score: the best scores over
      the whole set; layer: each layer keeps its share, see `neurons.selection.trim_to_budget`).
    * `ss-expansion`: the `high_resource` MS set (folder) or the given set, untrimmed unless `budget`.
    * `random`: `random_like` of the set that recipe `like` would train (same count per layer and site).
    """
    if recipe not in NEURON_RECIPES:
        raise ValueError(f"recipe {recipe!r} trains no neuron set; neuron recipes: {', '.join(NEURON_RECIPES)}")
    if recipe == "random":
        base = recipe_neuron_set(like, loaded, source, set_languages=set_languages, modalities=modalities,
                                 high_resource=high_resource, budget=budget if like == "precise-shield" else None,
                                 seed=seed, trim=trim)
        return random_like(base, loaded, seed)
    if isinstance(source, NeuronSet):
        sets = [source]
    else:
        paths: list[Path]
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            langs = set_languages if recipe == "precise-shield" else [high_resource]
            paths = find_set_files(source, langs, modalities if recipe == "precise-shield" else ("text",))
        elif isinstance(source, (str, Path)):
            paths = [Path(source)]
        else:
            paths = [Path(p) for p in source]
        sets = [NeuronSet.load(p, loaded) for p in paths]
    ns = sets[0]
    for other in sets[1:]:
        ns = ns.union(other)
    if len(sets) > 1:
        ns.meta["name"] = "union(" + ",".join(s.name for s in sets) + ")"
        ns.meta.setdefault("model_id", loaded.model_id)
        ns.meta.setdefault("config_hash", loaded.config_hash)
    ns.check_model(loaded)
    if budget is not None and (recipe == "precise-shield" or budget != DEFAULT_BUDGET):
        ns = trim_set(ns, loaded, budget, trim)
    ns.meta["recipe"] = recipe
    return ns


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def prepare_examples(
    loaded: Any, harmful: Sequence[PromptRecord | TrainExample], benign: Sequence[PromptRecord | TrainExample], *,
    languages: Sequence[str] | None = None, benign_answers: str = _TC.benign_answers,
    benign_cache: str | Path | None = None, benign_max_new_tokens: int = _TC.benign_max_new_tokens,
    generation_batch_size: int = 8, use_references: bool = False,
    max_prompt_tokens: int | None = None,
) -> tuple[list[TrainExample], list[TrainExample]]:
    """(harmful examples, benign examples). Harmful records are kept in `languages` (None: all) and get
    refusals; benign records get the base model's own answers (`self`, cached) or their `reference`.
    Call before the model is changed (the benign answers must be the base model's)."""
    hr = [r for r in harmful if isinstance(r, TrainExample)]
    recs = [r for r in harmful if not isinstance(r, TrainExample)]
    if languages is not None:
        wanted = set(languages)
        recs = [r for r in recs if r.language in wanted]
        hr = [r for r in hr if r.language in wanted]
        if harmful and not recs and not hr:
            raise ValueError(f"no harmful prompts in languages {', '.join(languages)}")
    hr += refusal_examples(recs, use_references=use_references)
    bn = [r for r in benign if isinstance(r, TrainExample)]
    brecs = [r for r in benign if not isinstance(r, TrainExample)]
    if brecs:
        if benign_answers == "self":
            if benign_cache is None:
                raise ValueError("benign_answers='self' needs benign_cache (a .jsonl path) to cache the answers")
            bn += self_answer_examples(loaded, brecs, benign_cache, max_new_tokens=benign_max_new_tokens,
                                       batch_size=generation_batch_size, max_prompt_tokens=max_prompt_tokens)
        elif benign_answers == "reference":
            bn += reference_examples(brecs)
        else:
            raise ValueError(f"benign_answers={benign_answers!r}: choose 'self' or 'reference'")
    return hr, bn


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


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
    peak_rss_mb: float  # whole process so far (includes export checks, which reload the model once)
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


# --------------------------------------------------------------------------------------------------
# Model wrapper, loss
# --------------------------------------------------------------------------------------------------


class _Forward(nn.Module):
    """What accelerate prepares: the network (+ the sparse deltas as a child, so DDP syncs them)."""

    def __init__(self, net: nn.Module, deltas: SparseDeltas | None = None) -> None:
        super().__init__()
        self.net = net
        self.deltas = deltas

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        # input_ids and attention_mask; a VLM's image tensors besides (see `training_batch`)
        return self.net(**inputs, use_cache=False).logits


class _GatherBeforeHead:
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


_VISION_PARTS = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "connector", "mm_projector")


def _is_vision_parameter(name: str) -> bool:
    return any(part in _VISION_PARTS for part in name.split("."))


def _targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat hidden positions that predict a response token, target ids, row of each target)."""
    b, t = labels.shape
    nxt = labels[:, 1:]
    mask = nxt != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)
    return rows * t + cols, nxt[mask], rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux
        return None


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _trainable_named(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors")


class CheckpointError(ArtifactError):
    """A checkpoint that cannot be trusted (truncated, damaged): training falls back to the one before it."""


def _checkpoint_step(d: Path) -> int:
    return int(d.name.rsplit("-", 1)[-1])


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints of `out_dir` (their state.json, written last, is there), newest first."""
    found = [d for d in Path(out_dir).glob("checkpoint-*")
             if d.is_dir() and d.name.rsplit("-", 1)[-1].isdigit() and (d / "state.json").is_file()]
    return sorted(found, key=_checkpoint_step, reverse=True)


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
        tensors = {n: p.detach().cpu().contiguous() for n, p in _trainable_named(module)}
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
    newest_kept = sorted(complete, key=_checkpoint_step, reverse=True)[: max(0, keep - 1)]
    for d in olds:
        if d not in newest_kept:
            shutil.rmtree(d, ignore_errors=True)
    return final


_SELECTED = "selected.safetensors"


def _save_selected(out_dir: Path, module: nn.Module, step: int) -> None:
    """The trainable tensors of the best step so far (atomic), so that a resumed run can still return them."""
    from safetensors.torch import save_file

    with atomic_path(out_dir / _SELECTED) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable_named(module)}, str(tmp),
                  metadata={"step": str(step)})


def _load_selected(out_dir: Path, module: nn.Module, step: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = out_dir / _SELECTED
    with safe_open(str(path), framework="pt") as f:
        saved = int((f.metadata() or {}).get("step", -1))
    if saved != step:
        raise RuntimeError(f"{path} holds step {saved}, expected the selected step {step}; train again with --no-resume")
    tensors = load_file(str(path))
    with torch.no_grad():
        for n, p in _trainable_named(module):
            p.copy_(tensors[n].to(p.device, p.dtype))


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
    named = dict(_trainable_named(module))
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
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _lora_model(loaded: Any, r: int, alpha: int, targets: Sequence[str] | None
                ) -> tuple[nn.Module, list[str], int]:
    """(peft model, names of the weights LoRA changes when merged, their parameter count)."""
    from peft import LoraConfig, get_peft_model

    ad = loaded.adapter
    names = {"q_proj": ad.q_proj, "k_proj": ad.k_proj, "v_proj": ad.v_proj, "o_proj": ad.o_proj,
             "gate_proj": ad.gate_proj, "up_proj": ad.up_proj, "down_proj": ad.down_proj}
    wanted = list(targets) if targets else list(LORA_MODULES)
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {', '.join(LORA_MODULES)}")
    attn = [names[t] for t in wanted if t in ("q_proj", "k_proj", "v_proj", "o_proj") and names[t]]
    mlp = [names[t] for t in wanted if t in ("gate_proj", "up_proj", "down_proj") and names[t]]
    parts = []
    lp = ad.layers_path.replace(".", r"\.")
    if attn:
        parts.append(rf"{lp}\.\d+\.{ad.attn}\.({'|'.join(attn)})")
    if mlp:
        parts.append(rf"{lp}\.\d+\.{ad.mlp}\.({'|'.join(mlp)})")
    regex = "|".join(f"(?:{p})" for p in parts)
    mods = [(n, m) for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]
    touched = [f"{n}.weight" for n, _ in mods]
    dense = sum(m.weight.numel() for _, m in mods)
    if not touched:
        raise ValueError(f"LoRA targets {wanted} match no linear layer of this model")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=regex,
                     task_type="CAUSAL_LM")
    freeze(loaded.model)
    return get_peft_model(loaded.model, cfg), touched, dense


def train(
    loaded: Any,
    recipe: str,
    *,
    neuron_set: NeuronSet | None = None,
    harmful: Sequence[PromptRecord | TrainExample],
    benign: Sequence[PromptRecord | TrainExample] = (),
    languages: Sequence[str] | None = None,
    steps: int = _TC.steps,
    lr: float | None = None,
    batch_size: int = _TC.batch_size,
    grad_accum: int = _TC.grad_accum,
    max_length: int = _TC.max_length,
    seed: int = PipelineConfig().seed,
    out_dir: str | Path,
    checkpoint_every: int = 20,
    resume: bool = True,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    warmup_steps: int = _TC.warmup_steps,
    benign_fraction: float = _TC.benign_fraction,
    benign_answers: str = _TC.benign_answers,
    benign_cache: str | Path | None = None,
    benign_max_new_tokens: int = _TC.benign_max_new_tokens,
    use_references: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_targets: Sequence[str] | None = None,
    delta_dtype: torch.dtype = torch.float32,
    neuron_parts: str = _TC.neuron_parts,
    gradient_checkpointing: bool = False,
    export: bool = True,
    verify_export: bool = True,
    accelerator: Any = None,
    mixed_precision: str = "no",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `loaded.model` with `recipe`; returns a TrainResult (also written to `out_dir/summary.json`).

    `neuron_set`: the set to train (precise-shield, ss-expansion; see `recipe_neuron_set`) or, for
    `random`, the set whose per-(layer, site) counts the random control copies. `harmful`/`benign`:
    PromptRecords (turned into examples by `prepare_examples`) or ready TrainExamples. Harmful records
    are kept in `languages` (None: all given). `steps` optimizer steps of `batch_size x grad_accum`
    examples per process, `benign_fraction` of them benign. Afterwards `loaded.model` holds the trained
    weights, merged, without hooks (for LoRA: `loaded.model` is replaced by the merged base model). The defaults
    are the pipeline's (`neuroshield.settings.TrainConfig`); the base model's benign answers are cached in
    `benign_cache` (default: `out_dir/benign_answers.jsonl`; the pipeline and the CLI share one beside the recipes).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if recipe in NEURON_RECIPES and neuron_set is None:
        raise ValueError(f"recipe {recipe!r} needs a neuron set (neuron_set=, CLI --set)")
    if steps < 1 or batch_size < 1 or grad_accum < 1 or checkpoint_every < 1:
        raise ValueError(f"steps, batch_size, grad_accum and checkpoint_every must be >= 1 (got {steps}, {batch_size}, "
                         f"{grad_accum}, {checkpoint_every}); 0 steps would export the base model as a trained one")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr={lr!r}: the learning rate must be > 0")
    from accelerate import Accelerator

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = accelerator or Accelerator(mixed_precision=mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise RuntimeError(
            f"launched with WORLD_SIZE={launched} but accelerate runs {acc.num_processes} process(es); on CPUs set "
            "ACCELERATE_USE_CPU=1 (see docs/training.md), on GPUs use `accelerate launch --multi_gpu`"
        )
    lr = float(lr if lr is not None else DEFAULT_LR[recipe])
    torch.manual_seed(seed)

    # --- data (the base model's benign answers come first, before the model changes) ---------------
    cache = benign_cache if benign_cache is not None else out / BENIGN_CACHE
    if acc.is_main_process:
        h_ex, b_ex = prepare_examples(loaded, harmful, benign, languages=languages, benign_answers=benign_answers,
                                      benign_cache=cache, benign_max_new_tokens=benign_max_new_tokens,
                                      use_references=use_references, max_prompt_tokens=max(1, max_length - 16))
    acc.wait_for_everyone()
    if not acc.is_main_process:
        h_ex, b_ex = prepare_examples(loaded, harmful, benign, languages=languages, benign_answers=benign_answers,
                                      benign_cache=cache, benign_max_new_tokens=benign_max_new_tokens,
                                      use_references=use_references, max_prompt_tokens=max(1, max_length - 16))
    if acc.is_main_process:
        write_examples(out / "examples.jsonl", h_ex + b_ex)
    h_enc = encode_examples(loaded, h_ex, max_length)
    b_enc = encode_examples(loaded, b_ex, max_length)
    stream = ExampleStream(h_enc, b_enc, benign_fraction, seed)
    data_info = {**example_summary(h_ex + b_ex), "fingerprint": data_fingerprint(h_enc, b_enc),
                 "benign_fraction": stream.fraction}

    # --- what is trainable ---------------------------------------------------------------------------
    total_params = count_parameters(loaded.model)
    deltas: SparseDeltas | None = None
    used_set: NeuronSet | None = None
    expect_changed: list[str] | None = None
    base_digests = None
    if export:
        from neuroshield.train.export import param_digests

        base_digests = param_digests(loaded.model)
    lm_head = loaded.model.get_output_embeddings()
    if recipe in NEURON_RECIPES:
        assert neuron_set is not None
        # `random`: the control of the given set, unless the given set already is a random control
        is_control = neuron_set.meta.get("method") == "random"
        used_set = random_like(neuron_set, loaded, seed) if recipe == "random" and not is_control else neuron_set
        used_set.check_model(loaded)
        if len(used_set) == 0:
            raise ValueError(f"neuron set {used_set.name!r} is empty: nothing to train")
        if acc.is_main_process:
            used_set.save(out / "neurons", loaded)
        deltas = SparseDeltas(loaded.model, slices_from_neuron_set(loaded, used_set, neuron_parts),
                              dtype=delta_dtype)
        net: nn.Module = loaded.model
        wrapper = _Forward(net, deltas)
        updated = deltas.num_trainable()
        expect_changed = sorted({name for name, _, _ in deltas.touched()})
    elif recipe == "lora":
        net, expect_changed, updated = _lora_model(loaded, lora_r, lora_alpha, lora_targets)
        wrapper = _Forward(net)
    else:
        net = loaded.model
        if net.dtype in (torch.bfloat16, torch.float16):
            # full fine-tuning updates every weight: Adam steps of ~lr (1e-5) vanish in a 16-bit weight, so the
            # weights themselves are the float32 master copies here (the neuron recipes keep float32 deltas)
            net.float()
        for name, p in net.named_parameters():
            # a VLM's vision tower and projector stay frozen (METHOD.md: out of scope); they would also get no
            # gradient from text-only batches, which multi-process DDP rejects
            p.requires_grad_(not (loaded.adapter.multimodal and _is_vision_parameter(name)))
        wrapper = _Forward(net)
        updated = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if gradient_checkpointing:
        target = loaded.model
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for _, p in _trainable_named(wrapper)]
    n_trainable = sum(p.numel() for p in trainable)
    if n_trainable == 0:
        raise ValueError(f"recipe {recipe!r}: no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    wrapper, optimizer = acc.prepare(wrapper, optimizer)
    world = acc.num_processes
    fingerprint = {
        "recipe": recipe, "config_hash": loaded.config_hash, "model_id": loaded.model_id,
        "neurons": None if used_set is None else hashlib.sha256(
            json.dumps({k: v.tolist() for k, v in used_set.units.items()}, sort_keys=True).encode()).hexdigest()[:16],
        "data": data_info["fingerprint"], "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
        "world_size": world, "max_length": max_length, "seed": seed, "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm, "warmup_steps": warmup_steps, "benign_fraction": stream.fraction,
        "lora": [lora_r, lora_alpha, list(lora_targets or LORA_MODULES)] if recipe == "lora" else None,
        "delta_dtype": str(delta_dtype) if deltas is not None else None,
        "neuron_parts": neuron_parts if deltas is not None else None,
    }
    config = {k: v for k, v in fingerprint.items() if k != "neurons"}
    config.update({"steps": steps, "checkpoint_every": checkpoint_every, "languages": list(languages or []),
                   "gradient_checkpointing": gradient_checkpointing, "mixed_precision": mixed_precision,
                   "benign_answers": benign_answers})

    # --- resume --------------------------------------------------------------------------------------
    unwrapped = acc.unwrap_model(wrapper)
    start, history, resumed_from = 0, [], None
    found = checkpoints(out) if resume else []
    if found and _checkpoint_step(found[0]) > steps:
        # a longer earlier run: resuming would export its later weights as this run's result
        log.warning("%s is past steps=%d: starting %s again", found[0], steps, recipe)
        found, resume = [], False
    for ckpt in found:  # newest first; a damaged one falls back to the one before it
        try:
            start, history = load_checkpoint(ckpt, unwrapped, optimizer, fingerprint)
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
    if resumed_from is None and not resume and acc.is_main_process:
        for d in out.glob("checkpoint-*"):
            shutil.rmtree(d, ignore_errors=True)

    # --- loop ----------------------------------------------------------------------------------------
    rss_before = current_rss_mb()
    gather = _GatherBeforeHead(lm_head)
    device = acc.device
    rank = acc.process_index
    global_batch = batch_size * grad_accum * world
    interrupted = False
    step = start
    last_saved = start
    # (score, step) of the best step so far when on_step returns selection scores (restored on resume)
    scored = [(float(h["select_score"]), int(h["step"])) for h in history if h.get("select_score") is not None]
    selected: tuple[float, int] | None = max(scored, key=lambda x: (x[0], -x[1])) if scored else None
    t_loop = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wrapper.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc=f"train {recipe}", unit="step",
               disable=not progress or not acc.is_main_process)
    try:
        while step < steps:
            t0 = time.perf_counter()
            cur_lr = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            micro: list[list[EncodedExample]] = [
                stream.take(step * global_batch + (a * world + rank) * batch_size, batch_size)
                for a in range(grad_accum)
            ]
            # mean over the response tokens of the whole step, all processes together (DDP averages the
            # gradients over processes, hence the factor `world`): equals one process with the global batch
            n_local = sum(e.response_tokens for mb in micro for e in mb)
            n_tokens = float(acc.reduce(torch.tensor(float(n_local), device=device), reduction="sum")) / world
            sums = {"harmful": 0.0, "benign": 0.0}
            counts = {"harmful": 0, "benign": 0}
            for a, mb in enumerate(micro):
                inputs, labels = training_batch(loaded, mb, device)
                flat, target, rows = _targets(labels)
                gather.positions = flat.to(device)
                sync = acc.no_sync(wrapper) if a < grad_accum - 1 else _nullcontext()
                with sync:
                    logits = wrapper(**inputs)
                    tok_loss = F.cross_entropy(logits[0].float(), target.to(device), reduction="none")
                    acc.backward(tok_loss.sum() / max(1, n_tokens))
                tl = tok_loss.detach().cpu()
                for row, ex in enumerate(mb):
                    sel = rows == row
                    sums[ex.label] += float(tl[sel].sum())
                    counts[ex.label] += int(sel.sum())
            gather.positions = None
            if max_grad_norm and max_grad_norm > 0:
                grad_norm = float(acc.clip_grad_norm_(trainable, max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stats = torch.tensor([sums["harmful"], counts["harmful"], sums["benign"], counts["benign"]],
                                 dtype=torch.float64, device=device)
            stats = acc.reduce(stats, reduction="sum").cpu().tolist()
            rec = {
                "step": step, "lr": cur_lr, "grad_norm": grad_norm, "seconds": time.perf_counter() - t0,
                "loss": (stats[0] + stats[2]) / max(1.0, stats[1] + stats[3]),
                "loss_harmful": stats[0] / stats[1] if stats[1] else None,
                "loss_benign": stats[2] / stats[3] if stats[3] else None,
                "tokens": stats[1] + stats[3],
            }
            history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            score = on_step(step, rec) if on_step is not None else None
            if score is not None:  # a selection score: the best-scoring step's weights are the result
                rec["select_score"] = float(score)
                if selected is None or float(score) > selected[0]:
                    selected = (float(score), step)
                    if acc.is_main_process:
                        _save_selected(out, unwrapped, step)
            if step % checkpoint_every == 0 and step < steps:
                if acc.is_main_process:
                    save_checkpoint(out, step, unwrapped, optimizer, history, fingerprint)
                acc.wait_for_everyone()
                last_saved = step
    except KeyboardInterrupt:
        interrupted = True
        optimizer.zero_grad(set_to_none=True)
        gather.positions = None
        if acc.is_main_process and step > last_saved:
            path = save_checkpoint(out, step, unwrapped, optimizer, history, fingerprint)
            log.warning("interrupted: checkpoint of step %d written to %s; run again to resume", step, path)
    finally:
        bar.close()
        gather.remove()
    train_seconds = time.perf_counter() - t_loop
    done_now = step - start
    mem = {"rss_before_mb": rss_before, "peak_rss_train_mb": peak_rss_mb()}

    if interrupted:
        result = _result(recipe, out, steps, step, n_trainable, updated, total_params, t_start, train_seconds,
                         done_now, history, used_set, None, None, None, resumed_from, True, acc, config, data_info,
                         mem)
        if acc.is_main_process:
            write_json(out / "summary.json", result.to_dict())
        raise KeyboardInterrupt

    if acc.is_main_process and (step > last_saved or latest_checkpoint(out) is None):
        save_checkpoint(out, step, unwrapped, optimizer, history, fingerprint)
    acc.wait_for_everyone()
    if selected is not None and selected[1] != step:
        _load_selected(out, unwrapped, selected[1])
        log.info("%s: the weights of step %d (best selection score %.4f) are the result", recipe, selected[1],
                 selected[0])

    # --- finish: merge, patch, export ----------------------------------------------------------------
    wrapper.eval()
    if gradient_checkpointing:
        loaded.model.gradient_checkpointing_disable()
    del optimizer
    acc.free_memory()
    patch_path = None
    if deltas is not None:
        from neuroshield.train.patch import patch_from_deltas

        assert used_set is not None
        if acc.is_main_process:
            patch_path = str(patch_from_deltas(out / "safety_patch.safetensors", deltas, loaded, meta={
                "recipe": recipe, "neuron_set": used_set.name, "neurons": len(used_set),
                "neuron_set_meta": {k: v for k, v in used_set.meta.items() if k in
                                    ("method", "rho", "languages", "modalities", "budget", "name", "control_of")},
                "steps": selected[1] if selected is not None else step, "lr": lr}))
        deltas.merge()
        deltas.detach()
    elif recipe == "lora":
        loaded.model = net.merge_and_unload()  # type: ignore[operator]
    freeze(loaded.model)
    loaded.model.eval()

    model_dir, export_info = None, None
    if export and acc.is_main_process:
        from neuroshield.train.export import save_merged

        if recipe == "full":
            expect_changed = None
        res = save_merged(loaded, out / "model", base_digests=base_digests, expect_changed=expect_changed,
                          verify=verify_export, meta={"recipe": recipe, "steps": step, "base_model": loaded.model_id,
                                                      "config_hash": loaded.config_hash, "lr": lr})
        model_dir, export_info = res.folder, res.to_dict()
        export_info.pop("changed_names", None)
    acc.wait_for_everyone()

    result = _result(recipe, out, steps, step, n_trainable, updated, total_params, t_start, train_seconds, done_now,
                     history, used_set, patch_path, model_dir, export_info, resumed_from, False, acc, config, data_info,
                     mem)
    result.selected_step = selected[1] if selected is not None else None
    if acc.is_main_process:
        write_json(out / "loss.json", history)
        plot_losses(history, out / "loss.png", f"{recipe} on {loaded.model_id}")
        write_json(out / "summary.json", result.to_dict())
    return result


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _result(recipe: str, out: Path, steps: int, step: int, n_trainable: int, updated: int, total: int,
            t_start: float, train_seconds: float, done_now: int, history: list[dict[str, float]],
            used_set: NeuronSet | None, patch_path: str | None, model_dir: str | None,
            export_info: dict[str, Any] | None, resumed_from: int | None, interrupted: bool, acc: Any,
            config: dict[str, Any], data_info: dict[str, Any], mem: dict[str, float | None]) -> TrainResult:
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return TrainResult(
        recipe=recipe, out_dir=str(out), steps=steps, steps_done=step, trainable_parameters=n_trainable,
        parameters_updated=updated, total_parameters=total, wall_seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds, seconds_per_step=train_seconds / done_now if done_now else math.nan,
        peak_rss_mb=peak_rss_mb(), peak_cuda_mb=cuda, final_loss=history[-1]["loss"] if history else None,
        losses=history, neuron_set=None if used_set is None else used_set.name,
        neurons=None if used_set is None else len(used_set), patch=patch_path, model_dir=model_dir,
        export=export_info, resumed_from=resumed_from, interrupted=interrupted, device=str(acc.device),
        world_size=acc.num_processes, config=config, data=data_info, **mem,
    )


__all__ = ["RECIPES", "NEURON_RECIPES", "DEFAULT_BUDGET", "DEFAULT_LR", "TrainResult", "train",
           "recipe_neuron_set", "find_set_files", "trim_set", "prepare_examples",
           "latest_checkpoint", "checkpoints", "CheckpointError", "save_checkpoint", "load_checkpoint", "plot_losses",
           "peak_rss_mb"]
