"""Pipeline configuration: the stages' dataclasses (`neuroshield.settings`), read from YAML with errors that name
the key."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from neuroshield.settings import (  # noqa: F401  (re-exported: the settings live there)
    BudgetConfig,
    EvaluateConfig,
    IdentifyConfig,
    PipelineConfig,
    TrainConfig,
    ValidateConfig,
)


class ConfigError(ValueError):
    pass


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
        elif isinstance(default, dict):  # train.overrides: name -> some keys of this very section
            kwargs[name] = _partial_sections(cls, value, f"{where}.{name}")
        elif isinstance(default, list):
            if isinstance(value, str):
                # "en,zh" is a list; "xsafety:A,B" is one source whose option holds commas (use [..] for several)
                value = [value] if ":" in value else [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and f.type in ("list[int]", "list[float]"):
                value = [value]
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{name}: expected a list, got {value!r}")
            if f.type == "list[int]":
                bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
                if bad:
                    raise ConfigError(f"{where}.{name}: expected whole numbers, got {bad}")
                kwargs[name] = [int(v) for v in value]
            elif f.type == "list[float]":
                kwargs[name] = [_number(v, f"{where}.{name}", "numbers") for v in value]
            else:
                kwargs[name] = [str(v) for v in value]
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{name}: expected true/false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, (int, float)):
            value = _number(value, f"{where}.{name}")
            if isinstance(default, int) and float(value) != int(value):
                raise ConfigError(f"{where}.{name}: expected a whole number, got {value!r}")
            kwargs[name] = type(default)(value)
        else:
            kwargs[name] = str(value)
    return cls(**kwargs)


def _number(value: Any, where: str, expected: str = "a number") -> float:
    """A number from YAML (YAML 1.1 reads 1e-3, without a dot, as text); ConfigError naming `where` otherwise."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    return float(value)


def _partial_sections(cls: type, data: Any, where: str) -> dict[str, dict[str, Any]]:
    """A mapping name -> {key: value} over keys of `cls` (train.overrides: recipe -> train keys), each value checked
    as the section's own key would be."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of recipe -> {{key: value}}, got {data!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, keys in data.items():
        keys = keys or {}
        built = _build(cls, keys, f"{where}.{name}")
        out[str(name)] = {k: getattr(built, k) for k in keys}
    return out


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
        if not hasattr(node, key) or section == "train":  # train: per recipe, in _check_train
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
    _check_transfer(config, where)
    tc = config.train
    from neuroshield.train.recipes import NEURON_RECIPES, RECIPES, RUN_WIDE_TRAIN_KEYS, recipe_settings

    bad = [r for r in tc.recipes if r not in RECIPES]
    if bad or (tc.enabled and not tc.recipes):
        raise ConfigError(f"{where}: train.recipes {tc.recipes}: unknown recipe(s) {bad}; give one or more of "
                          f"{', '.join(RECIPES)}")
    controlled = [r for r in NEURON_RECIPES if r != "random"]
    bad = [r for r in tc.random_of if r not in controlled]
    if not tc.random_of or bad or len(set(tc.random_of)) < len(tc.random_of):
        raise ConfigError(f"{where}: train.random_of {tc.random_of}: give one or more of {', '.join(controlled)}, each "
                          "once (the recipes whose sets the random control copies, layer by layer)")
    if any(s < 0 for s in tc.random_seeds) or len(set(tc.random_seeds)) < len(tc.random_seeds):
        raise ConfigError(f"{where}: train.random_seeds {tc.random_seeds}: give different seeds >= 0")
    for recipe, keys in tc.overrides.items():
        if recipe not in tc.recipes:
            raise ConfigError(f"{where}: train.overrides.{recipe}: {recipe!r} is not in train.recipes {tc.recipes}")
        fixed = sorted(set(keys) & set(RUN_WIDE_TRAIN_KEYS))
        if fixed:
            raise ConfigError(f"{where}: train.overrides.{recipe}: {fixed} hold for every recipe; set them in train")
    _check_train(config, tc, where, lambda key: f"train.{key}")
    for recipe in tc.recipes if tc.enabled else []:
        # the recipe's merged settings; a message names the override that set the key (random: its own or that of
        # the recipe it controls)
        for controlled in tc.random_of if recipe == "random" else [None]:
            sources = [recipe] + ([controlled] if controlled else [])

            def name(key: str, sources: list[str] = sources) -> str:
                owner = next((r for r in sources if key in tc.overrides.get(r, {})), None)
                return f"train.overrides.{owner}.{key}" if owner else f"train.{key}"

            settings = recipe_settings(tc, recipe, controlled)
            if any(tc.overrides.get(r) for r in sources):
                _check_train(config, settings, where, name)
            _check_never_trained(config, settings, where, name, recipe)
    _check_budget(config, where)
    from neuroshield.judges.registry import JUDGE_NAMES

    judge = config.evaluate.judge
    if judge not in JUDGE_NAMES and not Path(judge).expanduser().exists():
        raise ConfigError(f"{where}: evaluate.judge {judge!r}: give {' or '.join(JUDGE_NAMES)}, or a classifier folder")


def _check_budget(config: PipelineConfig, where: str) -> None:
    """budget: neuron recipes, shares of the parameters in (0, 1), LoRA ranks >= 1, something to train."""
    from neuroshield.evaluate.budget import BUDGET_RECIPES

    bc = config.budget
    bad = [r for r in bc.recipes if r not in BUDGET_RECIPES]
    if bad:
        raise ConfigError(f"{where}: budget.recipes {bc.recipes}: give {' or '.join(BUDGET_RECIPES)} (the recipes "
                          "that trim a set to a budget; LoRA points come from budget.lora_ranks)")
    wrong = [f for f in bc.fractions if not 0 < f < 1]
    if wrong:
        raise ConfigError(f"{where}: budget.fractions {wrong}: give shares of all parameters in (0, 1), e.g. 0.0003 "
                          "for 0.03 %")
    if any(r < 1 for r in bc.lora_ranks):
        raise ConfigError(f"{where}: budget.lora_ranks {bc.lora_ranks}: give ranks >= 1")
    if bc.batch_size < 1 or bc.select_every < 0:
        raise ConfigError(f"{where}: budget.batch_size must be >= 1 and budget.select_every >= 0")
    if bc.enabled and not ((bc.recipes and bc.fractions) or bc.lora_ranks):
        raise ConfigError(f"{where}: budget is enabled but has no point: give budget.recipes and budget.fractions, "
                          "or budget.lora_ranks")


def _check_transfer(config: PipelineConfig, where: str) -> None:
    """never_trained: languages of the run, none of them high-resource, some language left to train on."""
    nt = config.never_trained
    extra = [lang for lang in nt if lang not in config.languages]
    if extra:
        raise ConfigError(f"{where}: never_trained {extra} are not in languages {config.languages}")
    if set(nt) & set(config.high_resource):
        raise ConfigError(f"{where}: never_trained {nt} holds a high-resource language {config.high_resource}: the "
                          "high-resource language is trained on")



def _check_never_trained(config: PipelineConfig, tc: TrainConfig, where: str, name: Callable[[str], str],
                         recipe: str) -> None:
    """No never-trained language in what `recipe` (settings `tc`) trains on, nor in the sets it unites when identify
    leaves them out."""
    nt = set(config.never_trained)
    if not nt:
        return
    keys = ["languages", "benign_languages"] + ([] if config.identify_never_trained else ["set_languages"])
    for key in keys:
        found = [lang for lang in getattr(tc, key) if lang in nt]
        if found:
            raise ConfigError(f"{where}: {name(key)} has never-trained language(s) {found} (recipe {recipe}; "
                              f"never_trained: {config.never_trained}): the transfer test needs languages no recipe "
                              "trains on; remove them here or from never_trained")


def _check_train(config: PipelineConfig, tc: TrainConfig, where: str, name: Callable[[str], str]) -> None:
    """The train settings `tc` (train's own, or one recipe's merged with its overrides); `name(key)` is the key as the
    messages give it (train.<key> or train.overrides.<recipe>.<key>)."""
    for (section, key), (low, high, low_open) in RANGES.items():
        if section == "train" and not _in_range(float(getattr(tc, key)), low, high, low_open):
            raise ConfigError(f"{where}: {name(key)} = {getattr(tc, key)!r}: must be {_range_text(low, high, low_open)}")
    from neuroshield.train.sparse import NEURON_PARTS

    if tc.neuron_parts not in NEURON_PARTS:
        raise ConfigError(f"{where}: {name('neuron_parts')} {tc.neuron_parts!r}: give {' or '.join(NEURON_PARTS)}")
    from neuroshield.neurons.selection import TRIM_SPREADS

    if tc.trim not in TRIM_SPREADS:
        raise ConfigError(f"{where}: {name('trim')} {tc.trim!r}: give {' or '.join(TRIM_SPREADS)}")
    from neuroshield.train.recipes import NEURON_RECIPES, REFUSALS

    if tc.refusals not in REFUSALS:
        raise ConfigError(f"{where}: {name('refusals')} {tc.refusals!r}: give {' or '.join(REFUSALS)}")
    langs = config.identify_languages
    unknown = [lang for lang in tc.set_languages if lang not in langs]
    if unknown:
        raise ConfigError(f"{where}: {name('set_languages')} {unknown} are not in languages {langs} (identify "
                          "finds sets only for those)")
    from neuroshield.data.loaders import DATASETS

    for key in ("harmful", "benign"):
        for source in getattr(tc, key):
            source_name = source.split(":", 1)[0]
            if source_name not in DATASETS and not Path(source).expanduser().is_file():
                raise ConfigError(f"{where}: {name(key)} {source!r}: not a known data set ({', '.join(DATASETS)}) "
                                  "nor a file" + ("; [] uses identify's first harmful source" if key == "harmful" else ""))
    if not 0 <= tc.benign_fraction <= 1:
        raise ConfigError(f"{where}: {name('benign_fraction')} must be between 0 and 1")
    if tc.enabled and tc.method not in config.identify.methods and any(r in NEURON_RECIPES for r in tc.recipes):
        raise ConfigError(f"{where}: {name('method')} {tc.method!r} is not among identify.methods "
                          f"{config.identify.methods} (the neuron recipes train identify's sets of that method)")
    if not tc.languages:
        raise ConfigError(f"{where}: {name('languages')}: give at least one language")
    if tc.benign_answers not in ("self", "reference"):
        raise ConfigError(f"{where}: {name('benign_answers')} {tc.benign_answers!r}: give self or reference")
