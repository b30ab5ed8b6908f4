"""The settings of each stage: one dataclass per stage, the single source of every default.

The pipeline reads them from YAML (`neuroshield.config.load_config`); the Python API functions
(`neurons.identify.identify`, `intervene.validate.validate`, `evaluate.evaluate.evaluate`) and the CLI commands
take their keyword and option defaults from them (`train.trainer.train` takes `TrainConfig` itself, with
`TrainOptions`), and `tests/test_settings.py` fails when one differs. This module imports nothing from the package, so every stage can import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the pipeline's stages in order (`neuroshield.pipeline`); `neuroshield run --stages` defaults to all of them
PIPELINE_STAGES: tuple[str, ...] = ("identify", "validate", "train", "evaluate", "budget", "report")

# the base model's answers to the benign training prompts, cached beside the recipes' run folders (shared by them)
BENIGN_CACHE = "benign_answers.jsonl"


def joined(values: Sequence[str]) -> str | None:
    """A list default as a CLI option's comma-separated text; None (the option's "not given") for an empty list."""
    return ",".join(values) or None


@dataclass
class IdentifyConfig:
    harmful: list[str] = field(default_factory=lambda: ["xsafety"])
    benign: list[str] = field(default_factory=lambda: ["mgsm", "parallel-benign"])
    per_language: int = 24  # held-in prompts per language and label
    methods: list[str] = field(default_factory=lambda: ["plnd", "precise-shield"])
    rho: float = 0.03
    sites: list[str] = field(default_factory=lambda: ["ffn"])
    positions: str = "prompt"
    batch_size: int = 8


@dataclass
class ValidateConfig:
    enabled: bool = True
    method: str = "plnd"  # which method's sets to validate
    languages: list[str] = field(default_factory=list)  # [] = every language of the run
    per_language: int = 10  # held-out harmful prompts per language
    controls: int = 2
    max_new_tokens: int = 32
    # zero | mean:benign (each unit set to its mean on the language's benign prompts, from the statistics)
    suppress_mode: str = "zero"
    reinforce_scale: float = 2.0
    benign_guard: int = 8  # benign prompts for the KL guard
    batch_size: int = 16


@dataclass
class TrainConfig:
    enabled: bool = True
    recipes: list[str] = field(default_factory=lambda: ["precise-shield", "random"])
    method: str = "plnd"
    # precise-shield trains the union of these languages' MS sets (empty: every configured language)
    set_languages: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=lambda: ["en"])  # supervision languages
    per_language: int = 24  # held-in harmful prompts per supervision language
    # harmful training sources ([] = identify's first; e.g. advbench, or contrast: the English harmful requests
    # paired with the contrast set's safe ones), held-in prompts only, per_language from each
    harmful: list[str] = field(default_factory=list)
    # retain sources (parallel-benign, contrast: safe requests that sound dangerous, alpaca-seed, ...)
    benign: list[str] = field(default_factory=lambda: ["alpaca-seed"])
    benign_languages: list[str] = field(default_factory=lambda: ["en"])  # those the benign source has
    benign_count: int = 24  # held-in benign prompts per benign source and language
    benign_fraction: float = 0.5  # share of benign examples in each batch
    benign_answers: str = "self"  # self: the base model's own answers (generated once, cached) | reference
    benign_max_new_tokens: int = 64
    steps: int = 30
    lr: float = 3e-4  # neuron recipes; lora and full use their recipe defaults (2e-4, 1e-5)
    warmup_steps: int = 0  # linear warm-up of the learning rate
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    budget: float = 0.0003  # fraction of all parameters (Precise Shield: 0.03 %)
    trim: str = "layer"  # how the budget trims the set: layer (each layer keeps its share) | score (best overall)
    neuron_parts: str = "all"  # all | output (FFN: only the down_proj columns; see train.sparse)
    # checkpoint selection: every `select_every` steps (0: off, the last step is the result) refusal is measured
    # on held-in harmful prompts not trained on (every language) and on the contrast set's train part (safe
    # requests that sound dangerous); the result is the step with the most harmful refusal whose contrast
    # refusal stays within `select_tolerance` of the base model's (beyond it, each point over costs two; ties go to
    # the step with less contrast refusal)
    select_every: int = 0
    monitor_per_language: int = 4  # harmful and contrast prompts per language for the selection
    select_tolerance: float = 0.05
    # which held-in harmful ids each training language gets: language (each language picks its own) | parallel (the
    # same ids in every one of `languages`, each prompt in that language with a refusal template in that language:
    # ss-expansion as published; ids a training language lacks are left out)
    refusals: str = "language"
    # the random control: for each recipe of `random_of`, a copy of its set's count per layer and site, trained with
    # that recipe's settings (its overrides, then random's own); one set per seed in `random_seeds`, named
    # random-s<seed> for the first recipe and random-<recipe>-s<seed> for the others ([]: one set with the run's seed,
    # named random / random-<recipe>)
    random_of: list[str] = field(default_factory=lambda: ["precise-shield"])
    random_seeds: list[int] = field(default_factory=list)
    # per-recipe settings over the ones above: recipe -> {train key: value}, e.g.
    # {ss-expansion: {languages: [en, zh], refusals: parallel}}
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TrainOptions:
    """How one training run executes beyond its `TrainConfig`: the Python API (`train.trainer.train`) and
    `neuroshield train` take these; the pipeline trains with these defaults (its config has no such keys)."""

    lr: float | None = None  # None: train.lr for the neuron recipes, the recipe's own for lora and full (2e-4, 1e-5)
    weight_decay: float = 0.0  # AdamW, on the trainable tensors only
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    use_references: bool = False  # harmful records with a reference refusal train on it
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=list)  # [] = every linear layer of the decoder
    delta_dtype: str = "float32"  # the neuron recipes' trainable deltas
    checkpoint_every: int = 20
    resume: bool = True  # from the newest checkpoint of the same setup in out_dir
    export: bool = True  # the merged model to out_dir/model
    verify_export: bool = True  # the exported folder loads in plain transformers as the trained model (no second copy)
    verify_export_reload: bool = False  # also reload it for real and compare logits (a second copy of the weights)
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # accelerate: no | bf16 | fp16
    benign_cache: str = ""  # the base model's benign answers ("" = out_dir/benign_answers.jsonl)
    progress: bool = True


@dataclass
class EvaluateConfig:
    enabled: bool = True
    harmful_per_language: int = 15
    benign: list[str] = field(default_factory=lambda: ["parallel-benign"])
    benign_per_language: int = 8
    # the contrast set's eval part (safe requests that sound dangerous): exaggerated-safety refusal
    contrast_per_language: int = 0
    mgsm_per_language: int = 0
    xcopa_per_language: int = 0
    xcopa_languages: list[str] = field(default_factory=lambda: ["zh", "it", "vi", "sw", "th", "tr", "id"])
    judge: str = "refusal-phrase"
    max_new_tokens: int = 48
    batch_size: int = 16


@dataclass
class BudgetConfig:
    """The budget curve (pipeline stage `budget`, after evaluate): each recipe of `recipes` trained with the run's
    train settings for it (`train.overrides` applied) at each share of all parameters in `fractions`, and LoRA at
    each rank in `lora_ranks` (alpha = 2 x rank, the scale of the default r 16 / alpha 32), every point measured with
    the fast refusal score on the evaluation's held-out harmful and contrast prompts (no generation)."""

    enabled: bool = False
    recipes: list[str] = field(default_factory=lambda: ["precise-shield"])  # precise-shield | random (its control)
    fractions: list[float] = field(default_factory=lambda: [0.0001, 0.0003, 0.001, 0.005])
    lora_ranks: list[int] = field(default_factory=lambda: [1, 4, 16])
    # step selection for each point (train.select_every); 0: every point keeps its last step (on 2 CPU cores the
    # selection's generated monitor answers cost more than the training itself)
    select_every: int = 0
    batch_size: int = 16  # prompts per forward pass of the refusal score


@dataclass
class PipelineConfig:
    name: str = "run"
    model: str = "default"
    # auto: bfloat16 where the hardware multiplies it natively (AMX / AVX-512 BF16 CPUs, recent GPUs), else float32
    dtype: str = "auto"
    device_map: str = ""  # "" = CPU / one device; "auto" spreads a large model over the GPUs (accelerate)
    out_dir: str = "runs"
    seed: int = 0
    languages: list[str] = field(default_factory=lambda: ["en", "zh", "ar", "ru", "es", "fr", "de", "ja", "bn", "hi"])
    high_resource: list[str] = field(default_factory=lambda: ["en"])
    # "image" adds FigStep-style typographic versions of the harmful prompts (needs a vision-language model)
    modalities: list[str] = field(default_factory=lambda: ["text"])
    held_out_fraction: float = 0.5
    # the transfer protocol: languages (of `languages`) that no recipe trains on (train.languages,
    # train.benign_languages, the step selection's monitor), fixed before any result is seen; the headline pools them
    # apart from the trained ones ([]: no split)
    never_trained: list[str] = field(default_factory=list)
    identify_never_trained: bool = True  # false: identify (and so train.set_languages) leaves them out too
    identify: IdentifyConfig = field(default_factory=IdentifyConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def trained_languages(self) -> list[str]:
        """`languages` less `never_trained`: those training may use."""
        return [lang for lang in self.languages if lang not in self.never_trained]

    @property
    def identify_languages(self) -> list[str]:
        """The languages identify finds neurons in: `languages`, less `never_trained` unless identify_never_trained."""
        return self.languages if self.identify_never_trained else self.trained_languages

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
