"""Training recipes: which neurons a recipe trains and on which data (stage 5).

Recipes (same data, same steps, same loop; only what is trainable differs):

* `precise-shield`: the union of safety-neuron sets over the chosen languages and modalities, trimmed to
  a parameter budget (default 0.03 % of all parameters); trained on the high-resource language only by
  default.
* `ss-expansion`: the high-resource language's MS-Neurons, trained on parallel refusal data in the
  chosen languages.
* `random`: a control with the same number of neurons at every (layer, site) as the set it is given
  (`random_like`, seeded); `control_set` is the one place that decides it.
* `lora`: peft LoRA (r=16, alpha=32 by default) on every linear layer of the decoder.
* `full`: every parameter.

This module decides the neuron set (`recipe_neuron_set`, `control_set`), the learning rate (`recipe_lr`), the
examples (`prepare_examples`, `training_data`) and what is trainable (`trainable_part`). The run itself is
`neuroshield.train.trainer.train`; the loop, checkpoints and export are `train.loop`, `train.checkpoints` and
`train.export`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroshield.data.records import PromptRecord
from neuroshield.neurons.neuronset import NeuronSet, random_like, run_set_names
from neuroshield.settings import PipelineConfig, TrainConfig, TrainOptions
from neuroshield.train.data import (
    ExampleStream,
    TrainExample,
    data_fingerprint,
    encode_examples,
    example_summary,
    reference_examples,
    refusal_examples,
    self_answer_examples,
    write_examples,
)
from neuroshield.train.loop import Forward
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
REFUSALS: tuple[str, ...] = ("language", "parallel")  # train.refusals
# train keys that say which recipes run, not how one trains: no recipe overrides them
RUN_WIDE_TRAIN_KEYS: tuple[str, ...] = ("enabled", "recipes", "random_of", "random_seeds", "overrides")


# --------------------------------------------------------------------------------------------------
# Per-recipe settings and the runs of a recipe list
# --------------------------------------------------------------------------------------------------


def recipe_settings(settings: TrainConfig, recipe: str, controls: str | None = None) -> TrainConfig:
    """The settings `recipe` trains with: `settings` with `settings.overrides[recipe]` applied (`random`: the overrides
    of the recipe it controls, `controls` or else `random_of`'s first, then its own), without overrides left in it.
    A random run's `random_of` is then the one recipe it controls."""
    merged: dict[str, Any] = {}
    controlled = (controls or settings.random_of[0]) if recipe == "random" else None
    for name in ([controlled] if controlled else []) + [recipe]:
        merged.update(settings.overrides.get(name, {}))
    if controlled:
        merged["random_of"] = [controlled]
    return dataclasses.replace(settings, overrides={}, **copy.deepcopy(merged))


@dataclass(frozen=True)
class RecipeRun:
    """One training run of the pipeline: its name (the run folder and the evaluation's name), its recipe, its merged
    settings, for a random control the seed of its set and the recipe whose set it copies (`controls`)."""

    name: str
    recipe: str
    settings: TrainConfig
    set_seed: int | None = None
    controls: str | None = None


def random_run_name(controls: str, first: bool, seed: int | None) -> str:
    """The name of a random control run: random-s<seed> (or random) for the controls of `random_of`'s first recipe,
    random-<recipe>-s<seed> (or random-<recipe>) for those of the others."""
    stem = "random" if first else f"random-{controls}"
    return stem if seed is None else f"{stem}-s{seed}"


def recipe_runs(settings: TrainConfig, seed: int) -> list[RecipeRun]:
    """The runs of `settings.recipes` in order: `random` is, for each recipe of `random_of`, one run per
    `random_seeds` entry (`random_run_name`), or one with the run's `seed` when the list is empty."""
    runs: list[RecipeRun] = []
    for recipe in settings.recipes:
        if recipe != "random":
            runs.append(RecipeRun(recipe, recipe, recipe_settings(settings, recipe)))
            continue
        for i, controlled in enumerate(settings.random_of):
            merged = recipe_settings(settings, recipe, controlled)
            seeds: list[int | None] = list(settings.random_seeds) or [None]
            runs += [RecipeRun(random_run_name(controlled, i == 0, s), recipe, merged, seed if s is None else s,
                               controlled) for s in seeds]
    return runs


def random_controls(settings: TrainConfig, seed: int) -> dict[str, list[str]]:
    """recipe -> the names of its random control runs (`recipe_runs`), for the recipes of `random_of` that are
    themselves in `recipes` (the headline compares each with its own controls)."""
    out: dict[str, list[str]] = {}
    for run in recipe_runs(settings, seed):
        if run.controls is not None and run.controls in settings.recipes:
            out.setdefault(run.controls, []).append(run.name)
    return out


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
    high_resource: str = DEFAULT_HIGH_RESOURCE, budget: float | None = DEFAULT_BUDGET, like: str = _TC.random_of[0],
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
        return control_set(base, loaded, seed)
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


def control_set(ns: NeuronSet, loaded: Any, seed: int) -> NeuronSet:
    """The random control of `ns`: `random_like` (the same count at every (layer, site), seeded), unless `ns`
    already is a random control (then `ns` itself). The one place that decides the `random` recipe's set."""
    return ns if ns.meta.get("method") == "random" else random_like(ns, loaded, seed)


def recipe_lr(recipe: str, settings: TrainConfig, lr: float | None = None) -> float:
    """The learning rate of `recipe`: `lr` when given, else `settings.lr` for the neuron recipes and the recipe's
    own default for lora and full (`DEFAULT_LR`)."""
    if lr is not None:
        return float(lr)
    return float(settings.lr if recipe in NEURON_RECIPES else DEFAULT_LR[recipe])


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




@dataclass
class TrainingData:
    stream: ExampleStream  # the encoded examples in training order
    info: dict[str, Any]  # counts, fingerprint and benign share (the run summary's `data`)


def training_data(loaded: Any, acc: Any, harmful: Sequence[PromptRecord | TrainExample],
                  benign: Sequence[PromptRecord | TrainExample], settings: TrainConfig, *, out: Path,
                  benign_cache: Path, use_references: bool, seed: int) -> TrainingData:
    """The examples of a run (`prepare_examples` with `settings`: the base model's benign answers come first,
    made by the main process and cached in `benign_cache`, before the model changes), written to
    `out/examples.jsonl`, encoded and streamed `settings.benign_fraction` benign."""
    def prepare() -> tuple[list[TrainExample], list[TrainExample]]:
        return prepare_examples(loaded, harmful, benign, languages=settings.languages or None,
                                benign_answers=settings.benign_answers, benign_cache=benign_cache,
                                benign_max_new_tokens=settings.benign_max_new_tokens, use_references=use_references,
                                max_prompt_tokens=max(1, settings.max_length - 16))

    if acc.is_main_process:
        h_ex, b_ex = prepare()
    acc.wait_for_everyone()
    if not acc.is_main_process:
        h_ex, b_ex = prepare()
    if acc.is_main_process:
        write_examples(out / "examples.jsonl", h_ex + b_ex)
    h_enc = encode_examples(loaded, h_ex, settings.max_length)
    b_enc = encode_examples(loaded, b_ex, settings.max_length)
    stream = ExampleStream(h_enc, b_enc, settings.benign_fraction, seed)
    return TrainingData(stream, {**example_summary(h_ex + b_ex), "fingerprint": data_fingerprint(h_enc, b_enc),
                                 "benign_fraction": stream.fraction})


# --------------------------------------------------------------------------------------------------
# What is trainable
# --------------------------------------------------------------------------------------------------


_VISION_PARTS = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "connector", "mm_projector")


def _is_vision_parameter(name: str) -> bool:
    return any(part in _VISION_PARTS for part in name.split("."))


@dataclass
class Trainable:
    """What a recipe trains: the module accelerate prepares, and what changes in the model when merged."""

    wrapper: nn.Module
    net: nn.Module  # the network (for LoRA: the peft model, merged after training)
    deltas: SparseDeltas | None  # the neuron recipes' sparse deltas
    neuron_set: NeuronSet | None  # the set the neuron recipes train
    updated: int  # parameters of the model that training may change (after merging)
    expect_changed: list[str] | None  # the weights export must find changed (None: not checked)


def lora_model(loaded: Any, r: int, alpha: int, targets: Sequence[str] | None
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


def trainable_part(recipe: str, loaded: Any, neuron_set: NeuronSet | None, options: TrainOptions, *, seed: int,
                   neuron_parts: str, save_set_to: Path | None = None) -> Trainable:
    """Make `recipe`'s parameters trainable on `loaded.model` and wrap it for accelerate.

    Neuron recipes: sparse deltas (`options.delta_dtype`) on the `neuron_parts` of `neuron_set` (for `random`: its
    `control_set`), which is saved to `save_set_to` (the main process's `out/neurons`). `lora`: a peft model of
    rank `options.lora_r` on `options.lora_targets`. `full`: every weight but a VLM's vision tower and projector,
    in float32."""
    if recipe in NEURON_RECIPES:
        assert neuron_set is not None
        used_set = control_set(neuron_set, loaded, seed) if recipe == "random" else neuron_set
        used_set.check_model(loaded)
        if len(used_set) == 0:
            raise ValueError(f"neuron set {used_set.name!r} is empty: nothing to train")
        if save_set_to is not None:
            used_set.save(save_set_to, loaded)
        deltas = SparseDeltas(loaded.model, slices_from_neuron_set(loaded, used_set, neuron_parts),
                              dtype=getattr(torch, options.delta_dtype))
        return Trainable(Forward(loaded.model, deltas), loaded.model, deltas, used_set, deltas.num_trainable(),
                         sorted({name for name, _, _ in deltas.touched()}))
    if recipe == "lora":
        net, expect_changed, updated = lora_model(loaded, options.lora_r, options.lora_alpha, options.lora_targets)
        return Trainable(Forward(net), net, None, None, updated, expect_changed)
    net = loaded.model
    if net.dtype in (torch.bfloat16, torch.float16):
        # full fine-tuning updates every weight: Adam steps of ~lr (1e-5) vanish in a 16-bit weight, so the
        # weights themselves are the float32 master copies here (the neuron recipes keep float32 deltas)
        net.float()
    for name, p in net.named_parameters():
        # a VLM's vision tower and projector stay frozen (METHOD.md: out of scope); they would also get no
        # gradient from text-only batches, which multi-process DDP rejects
        p.requires_grad_(not (loaded.adapter.multimodal and _is_vision_parameter(name)))
    # every weight changes: export does not check which (expect_changed None)
    return Trainable(Forward(net), net, None, None, sum(p.numel() for p in net.parameters() if p.requires_grad), None)


__all__ = ["RECIPES", "NEURON_RECIPES", "REFUSALS", "RUN_WIDE_TRAIN_KEYS", "recipe_settings", "RecipeRun", "recipe_runs",
           "random_run_name", "random_controls", "DEFAULT_BUDGET", "DEFAULT_LR", "LORA_MODULES", "recipe_neuron_set",
           "control_set", "recipe_lr", "find_set_files", "trim_set", "prepare_examples", "TrainingData",
           "training_data", "Trainable", "lora_model", "trainable_part"]
