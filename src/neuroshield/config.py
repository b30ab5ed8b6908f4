"""Pipeline configuration: one dataclass per stage, read from YAML with errors that name the key."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


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
    # refusal stays within `select_tolerance` of the base model's (beyond it, each point over costs two)
    select_every: int = 0
    monitor_per_language: int = 4  # harmful and contrast prompts per language for the selection
    select_tolerance: float = 0.05


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
    identify: IdentifyConfig = field(default_factory=IdentifyConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}.{name}")
        elif isinstance(default, list):
            if isinstance(value, str):
                # "en,zh" is a list; "xsafety:A,B" is one source whose option holds commas (use [..] for several)
                value = [value] if ":" in value else [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{name}: expected a list, got {value!r}")
            kwargs[name] = [str(v) for v in value]
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{name}: expected true/false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, (int, float)):
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{name}: expected a number, got {value!r}")
            if isinstance(default, int) and float(value) != int(value):
                raise ConfigError(f"{where}.{name}: expected a whole number, got {value!r}")
            kwargs[name] = type(default)(value)
        else:
            kwargs[name] = str(value)
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`key.sub=value` overrides (value read as YAML: `train.steps=60`, `train.recipes=[lora,full]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=60 or name=compare")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a pipeline YAML; `overrides` (`key.sub=value`) replace single keys, checked like the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (name, model, identify, ...)")
    config = _build(PipelineConfig, apply_overrides(data, overrides), str(path))
    from neuroshield.models.loading import DTYPES

    if config.dtype not in DTYPES:
        raise ConfigError(f"{path}: dtype {config.dtype!r}: give {', '.join(DTYPES)}")
    if not 0 < config.held_out_fraction < 1:
        raise ConfigError(f"{path}: held_out_fraction must be between 0 and 1")
    if config.validate.suppress_mode not in ("zero", "mean:benign"):
        raise ConfigError(f"{path}: validate.suppress_mode {config.validate.suppress_mode!r}: give zero or mean:benign")
    from neuroshield.train.sparse import NEURON_PARTS

    if config.train.neuron_parts not in NEURON_PARTS:
        raise ConfigError(f"{path}: train.neuron_parts {config.train.neuron_parts!r}: give {' or '.join(NEURON_PARTS)}")
    from neuroshield.neurons.selection import TRIM_SPREADS

    if config.train.trim not in TRIM_SPREADS:
        raise ConfigError(f"{path}: train.trim {config.train.trim!r}: give {' or '.join(TRIM_SPREADS)}")
    unknown = [lang for lang in config.train.set_languages if lang not in config.languages]
    if unknown:
        raise ConfigError(f"{path}: train.set_languages {unknown} are not in languages {config.languages} (identify "
                          "finds sets only for those)")
    from neuroshield.data.loaders import DATASETS

    for key in ("harmful", "benign"):
        for source in getattr(config.train, key):
            name = source.split(":", 1)[0]
            if name not in DATASETS and not Path(source).expanduser().is_file():
                raise ConfigError(f"{path}: train.{key} {source!r}: not a known data set ({', '.join(DATASETS)}) "
                                  "nor a file" + ("; [] uses identify's first harmful source" if key == "harmful" else ""))
    if not 0 <= config.train.benign_fraction <= 1:
        raise ConfigError(f"{path}: train.benign_fraction must be between 0 and 1")
    bad = [m for m in config.modalities if m not in ("text", "image")]
    if bad or "text" not in config.modalities:
        raise ConfigError(f"{path}: modalities {config.modalities}: give text, or text and image")
    check_values(config, str(path))
    return config


# (section, key) -> (low, high, low_open): the range a number must lie in; None = unbounded on that side
RANGES: dict[tuple[str, str], tuple[float | None, float | None, bool]] = {
    ("", "seed"): (0, None, False),
    ("identify", "per_language"): (1, None, False),
    ("identify", "rho"): (0, 1, True),  # 0 would give empty sets
    ("identify", "batch_size"): (1, None, False),
    ("validate", "per_language"): (1, None, False),
    ("validate", "controls"): (0, None, False),
    ("validate", "max_new_tokens"): (1, None, False),
    ("validate", "reinforce_scale"): (0, None, True),
    ("validate", "benign_guard"): (0, None, False),
    ("validate", "batch_size"): (1, None, False),
    ("train", "per_language"): (1, None, False),
    ("train", "benign_count"): (0, None, False),
    ("train", "benign_max_new_tokens"): (1, None, False),
    ("train", "steps"): (1, None, False),  # 0 steps would export the base model as a trained one
    ("train", "lr"): (0, None, True),
    ("train", "warmup_steps"): (0, None, False),
    ("train", "batch_size"): (1, None, False),
    ("train", "grad_accum"): (1, None, False),
    ("train", "max_length"): (32, None, False),  # the prompt keeps max_length - 16 tokens
    ("train", "budget"): (0, 1, True),
    ("train", "select_every"): (0, None, False),
    ("train", "monitor_per_language"): (1, None, False),
    ("train", "select_tolerance"): (0, 1, False),
    ("evaluate", "harmful_per_language"): (1, None, False),
    ("evaluate", "benign_per_language"): (0, None, False),
    ("evaluate", "mgsm_per_language"): (0, None, False),
    ("evaluate", "xcopa_per_language"): (0, None, False),
    ("evaluate", "max_new_tokens"): (1, None, False),
    ("evaluate", "batch_size"): (1, None, False),
}


def _in_range(value: float, low: float | None, high: float | None, low_open: bool) -> bool:
    if value != value or value in (float("inf"), float("-inf")):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or value <= high


def _range_text(low: float | None, high: float | None, low_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}]"


def check_values(config: PipelineConfig, where: str = "config") -> None:
    """Every value that `load_config` reads, checked before any model or data is loaded: ranges, names of
    recipes, methods, sites, positions and judges, languages, and a run name that stays inside out_dir.
    Raises ConfigError naming the key."""
    for (section, key), (low, high, low_open) in RANGES.items():
        node = getattr(config, section) if section else config
        if not hasattr(node, key):
            continue
        value = getattr(node, key)
        if not _in_range(float(value), low, high, low_open):
            name = f"{section}.{key}" if section else key
            raise ConfigError(f"{where}: {name} = {value!r}: must be {_range_text(low, high, low_open)}")
    name = config.name
    if not name or name in (".", "..") or any(ch in name for ch in "/\\:") or name != name.strip():
        raise ConfigError(f"{where}: name {name!r}: give a plain folder name (no path separators, no '..'); "
                          f"the run is written to out_dir/name ({config.out_dir}/...)")
    if not config.model:
        raise ConfigError(f"{where}: model: give default, smollm2, a .gguf file, a model folder or a Hub id")
    if not config.languages:
        raise ConfigError(f"{where}: languages: give at least one language")
    extra = [lang for lang in config.high_resource if lang not in config.languages]
    if not config.high_resource or extra:
        raise ConfigError(f"{where}: high_resource {config.high_resource}: give languages among languages "
                          f"{config.languages}")
    from neuroshield.models.chat import POSITIONS
    from neuroshield.models.sites import SITE_KINDS
    from neuroshield.neurons.scores import METHOD_KINDS

    ic = config.identify
    for key, values, allowed in (("methods", ic.methods, tuple(METHOD_KINDS)), ("sites", ic.sites, SITE_KINDS)):
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise ConfigError(f"{where}: identify.{key} {values}: give one or more of {', '.join(allowed)}")
    if ic.positions not in POSITIONS:
        raise ConfigError(f"{where}: identify.positions {ic.positions!r}: give {', '.join(POSITIONS)}")
    for key in ("harmful", "benign"):
        if not getattr(ic, key):
            raise ConfigError(f"{where}: identify.{key}: give at least one data source")
    vc = config.validate
    if vc.enabled and vc.method not in ic.methods:
        raise ConfigError(f"{where}: validate.method {vc.method!r} is not among identify.methods {ic.methods}")
    extra = [lang for lang in vc.languages if lang not in config.languages]
    if extra:
        raise ConfigError(f"{where}: validate.languages {extra} are not in languages {config.languages}")
    tc = config.train
    from neuroshield.train.recipes import NEURON_RECIPES, RECIPES

    bad = [r for r in tc.recipes if r not in RECIPES]
    if bad or (tc.enabled and not tc.recipes):
        raise ConfigError(f"{where}: train.recipes {tc.recipes}: unknown recipe(s) {bad}; give one or more of "
                          f"{', '.join(RECIPES)}")
    if tc.enabled and tc.method not in ic.methods and any(r in NEURON_RECIPES for r in tc.recipes):
        raise ConfigError(f"{where}: train.method {tc.method!r} is not among identify.methods {ic.methods} (the "
                          "neuron recipes train identify's sets of that method)")
    if not tc.languages:
        raise ConfigError(f"{where}: train.languages: give at least one language")
    if tc.benign_answers not in ("self", "reference"):
        raise ConfigError(f"{where}: train.benign_answers {tc.benign_answers!r}: give self or reference")
    from neuroshield.judges.registry import JUDGE_NAMES

    judge = config.evaluate.judge
    if judge not in JUDGE_NAMES and not Path(judge).expanduser().exists():
        raise ConfigError(f"{where}: evaluate.judge {judge!r}: give {' or '.join(JUDGE_NAMES)}, or a classifier folder")
