"""One settings object per stage (`neuroshield.settings`): the CLI options and the Python API keywords of identify,
validate, train and evaluate take their defaults from it.

For every field of a stage's dataclass this fails when the same-meaning CLI option (same name, or a rename listed
below) is missing or has another default, and when an API keyword of the same meaning has another default. A field
without a CLI option is listed in CONFIG_ONLY with the reason; a CLI option or API keyword that shares a field's name
but means something else is listed in NOT_THE_FIELD.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import typer.main

from neuroshield.settings import (
    BENIGN_CACHE,
    EvaluateConfig,
    IdentifyConfig,
    PipelineConfig,
    TrainConfig,
    TrainOptions,
    ValidateConfig,
)


def _api() -> dict[str, list[Callable[..., Any]]]:
    from neuroshield.evaluate.evaluate import evaluate
    from neuroshield.intervene.validate import validate
    from neuroshield.neurons.identify import identify
    from neuroshield.train.recipes import prepare_examples, recipe_neuron_set
    from neuroshield.train.trainer import train

    # train() takes TrainConfig itself (and TrainOptions): the options' own keywords are compared too
    return {"identify": [identify], "validate": [validate],
            "train": [train, recipe_neuron_set, prepare_examples, TrainOptions], "evaluate": [evaluate]}


STAGES: dict[str, type] = {"identify": IdentifyConfig, "validate": ValidateConfig, "train": TrainConfig,
                           "evaluate": EvaluateConfig}

# field -> the CLI option (python name) that sets it under another name
CLI_RENAMES: dict[str, dict[str, str]] = {
    "identify": {"methods": "method", "per_language": "limit"},
    "validate": {"per_language": "limit", "benign_guard": "benign_limit"},
    "train": {"per_language": "harmful_limit", "benign_count": "benign_limit", "neuron_parts": "parts"},
    "evaluate": {"harmful_per_language": "limit", "benign_per_language": "benign_limit"},
}
# field -> the API keyword that sets it under another name
API_RENAMES: dict[str, dict[str, str]] = {"identify": {"methods": "method"}}

# fields no CLI option sets, each with the reason
CONFIG_ONLY: dict[str, dict[str, str]] = {
    "validate": {
        "enabled": "switches the pipeline's stage on or off; running the command is the switch",
        "method": "picks the pipeline's set folder identify/<method>/; the command takes the set itself (--set)",
        "suppress_mode": "a rule per language (zero | mean:benign -> mean:<lang>/text/benign); --mode takes one "
                         "resolved mode (default zero, the same)",
        "reinforce_scale": "the pipeline's reinforce experiment; the command says it as --mode scale:<alpha>",
    },
    "train": {
        "enabled": "switches the pipeline's stage on or off; running the command is the switch",
        "recipes": "the pipeline trains each of a list; the command trains one --recipe (required)",
        "method": "picks the pipeline's set folder identify/<method>/; the command takes the sets itself (--set)",
        "select_every": "step selection needs the pipeline's monitor prompts (held-in ids no stage trains on and "
                        "the contrast set's train part): pipeline only",
        "monitor_per_language": "step selection (see select_every): pipeline only",
        "select_tolerance": "step selection (see select_every): pipeline only",
        "random_seeds": "the pipeline trains one random control per seed; the command trains one set (--seed)",
        "overrides": "per-recipe settings of the pipeline's recipe list; the command trains one recipe with its own "
                     "options",
    },
    "evaluate": {
        "enabled": "switches the pipeline's stage on or off; running the command is the switch",
    },
}

# fields whose CLI option says the same default another way: field -> (option, the default it must have)
EC = EvaluateConfig()
CLI_EQUIVALENT: dict[str, dict[str, tuple[str, Any]]] = {
    "train": {
        # [] = identify's first harmful source; the command has no identify run to ask
        "harmful": ("harmful", IdentifyConfig().harmful[0]),
        # None = the recipe's learning rate, which for the neuron recipes is train.lr (checked below)
        "lr": ("lr", None),
        # the pipeline trains controls of each recipe of a list; the command trains one, of the list's first
        "random_of": ("like", TrainConfig().random_of[0]),
    },
    "evaluate": {
        # 0 turns the part off: the contrast set / the task is then not among the command's sets by default
        "contrast_per_language": ("contrast", "contrast:eval" if EC.contrast_per_language else ""),
        "mgsm_per_language": ("mgsm_limit", EC.mgsm_per_language or None),
        "xcopa_per_language": ("xcopa_limit", EC.xcopa_per_language or None),
    },
}

# CLI options / API keywords named like a field that mean something else: stage -> {name: reason}
NOT_THE_FIELD: dict[str, dict[str, str]] = {
    "identify": {"api:harmful": "the prompt records, not their sources", "api:benign": "the prompt records"},
    "validate": {"api:benign_guard": "the guard's prompt records, not their count per language"},
    "train": {"api:harmful": "the prompt records, not their sources", "api:benign": "the prompt records",
              "api:languages": "prepare_examples: a filter on the given records (None: keep all); train() passes "
                               "settings.languages"},
}

# run-wide settings (PipelineConfig) that the commands and the API also take: name -> the run field
RUN_KEYS = {"model": "model", "held_out_fraction": "held_out_fraction", "high_resource": "high_resource",
            "seed": "seed", "split_seed": "seed"}


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(
        getattr(cls(), f.name))}


def _as_cli(value: Any) -> Any:
    """A settings value as its CLI option's default: a list is comma-separated text (None when empty)."""
    if isinstance(value, (list, tuple)):
        return ",".join(value) or None
    return value


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return norm(a) == norm(b) or (norm(a) in ("", None) and norm(b) in ("", None, []))


def _cli_params(stage: str) -> dict[str, Any]:
    from neuroshield.cli import app

    return {p.name: p for p in typer.main.get_command(app).commands[stage].params}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_field_has_a_cli_option_with_the_same_default(stage: str) -> None:
    params = _cli_params(stage)
    renames, only = CLI_RENAMES.get(stage, {}), CONFIG_ONLY.get(stage, {})
    equivalent = CLI_EQUIVALENT.get(stage, {})
    wrong = []
    for key, value in _defaults(STAGES[stage]).items():
        if key in only:
            assert key not in params, f"{stage}.{key} is listed as config-only but the command has --{key}"
            continue
        if key in equivalent:
            option, expected = equivalent[key]
        else:
            option, expected = renames.get(key, key), _as_cli(value)
        if option not in params:
            wrong.append(f"{stage}.{key}: no CLI option {option!r} (add one with the config's default, or list the "
                         "key in CONFIG_ONLY with the reason)")
        elif not _same(params[option].default, expected):
            wrong.append(f"{stage}.{key} = {value!r}: `neuroshield {stage} --{option.replace('_', '-')}` defaults "
                         f"to {params[option].default!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_allow_lists_name_real_keys_and_options(stage: str) -> None:
    fields = set(_defaults(STAGES[stage]))
    params = _cli_params(stage)
    for table in (CLI_RENAMES, API_RENAMES, CONFIG_ONLY, CLI_EQUIVALENT):
        assert set(table.get(stage, {})) <= fields, f"{stage}: stale key(s) {set(table.get(stage, {})) - fields}"
    for key, option in CLI_RENAMES.get(stage, {}).items():
        assert option in params, f"{stage}.{key}: the command has no option {option!r}"
    for key, reason in CONFIG_ONLY.get(stage, {}).items():
        assert reason.strip(), f"{stage}.{key}: give the reason"


@pytest.mark.parametrize("stage", list(STAGES))
def test_api_keywords_default_to_the_settings(stage: str) -> None:
    defaults = _defaults(STAGES[stage])
    by_keyword = {API_RENAMES.get(stage, {}).get(k, k): k for k in defaults}
    skip = {name.removeprefix("api:") for name in NOT_THE_FIELD.get(stage, {}) if name.startswith("api:")}
    wrong, checked = [], 0
    for fn in _api()[stage]:
        for name, param in inspect.signature(fn).parameters.items():
            if name in skip or name not in by_keyword:
                continue
            key = by_keyword[name]
            if stage == "train" and key == "lr":  # None: DEFAULT_LR[recipe], checked below
                assert param.default is None
                continue
            checked += 1
            if param.default is inspect.Parameter.empty:
                wrong.append(f"{fn.__name__}({name}=...) has no default; {stage}.{key} = {defaults[key]!r}")
            elif not _same(param.default, defaults[key]):
                wrong.append(f"{fn.__module__}.{fn.__name__}({name}={param.default!r}): {stage}.{key} = "
                             f"{defaults[key]!r}")
    assert checked, f"{stage}: no API keyword compared"
    assert not wrong, "\n".join(wrong)


def test_one_random_control_copies_the_first_recipe_of_random_of_by_default() -> None:
    from neuroshield.train.recipes import recipe_neuron_set

    assert inspect.signature(recipe_neuron_set).parameters["like"].default == TrainConfig().random_of[0]


def test_run_wide_defaults_agree() -> None:
    run = PipelineConfig()
    wrong = []
    for stage in STAGES:
        params = _cli_params(stage)
        for name, key in RUN_KEYS.items():
            value = getattr(run, key)
            if name in params and not _same(params[name].default, _as_cli(value)) and not (
                    name == "high_resource" and params[name].default == value[0]):  # train takes one language
                wrong.append(f"`neuroshield {stage} --{name.replace('_', '-')}` = {params[name].default!r}, run "
                             f"{key} = {value!r}")
        for fn in _api()[stage]:
            for name, param in inspect.signature(fn).parameters.items():
                key = RUN_KEYS.get(name)
                if key is None or param.default is inspect.Parameter.empty:
                    continue
                value = getattr(run, key)
                if not (_same(param.default, value) or name == "high_resource" and param.default == value[0]):
                    wrong.append(f"{fn.__name__}({name}={param.default!r}): run {key} = {value!r}")
    assert not wrong, "\n".join(wrong)


# TrainOptions fields that `neuroshield train` has no option for, each with the reason
OPTIONS_NOT_IN_CLI = {
    "lora_targets": "the command trains LoRA on every linear layer of the decoder (the API may narrow it)",
    "delta_dtype": "float32 deltas always (16-bit deltas lose Adam's small steps); API only",
    "verify_export": "the command always checks that the exported model loads as the trained one",
    "verify_export_reload": "the full reload with logits is an API opt-in (a second copy of the weights)",
    "progress": "the command always shows progress",
}


def test_train_options_defaults_are_the_cli_defaults() -> None:
    """`neuroshield train` options that set a TrainOptions field default to that field (benign_cache: None is
    the field's "" = the default place)."""
    params = _cli_params("train")
    wrong = []
    for f in dataclasses.fields(TrainOptions):
        value = getattr(TrainOptions(), f.name)
        if f.name in OPTIONS_NOT_IN_CLI:
            assert f.name not in params, f"TrainOptions.{f.name} is listed as API-only but the command has it"
            continue
        if f.name not in params:
            wrong.append(f"TrainOptions.{f.name}: no option of `neuroshield train` (add one or list it)")
        elif not _same(params[f.name].default, _as_cli(value)):
            wrong.append(f"TrainOptions.{f.name} = {value!r}: `neuroshield train --{f.name.replace('_', '-')}` "
                         f"defaults to {params[f.name].default!r}")
    assert not wrong, "\n".join(wrong)


def test_train_takes_the_settings_object() -> None:
    """train() has no keyword per setting: it takes TrainConfig (default: the config's defaults) and TrainOptions."""
    from neuroshield.train.trainer import train

    params = inspect.signature(train).parameters
    assert params["settings"].default is None and params["options"].default is None
    records = {"harmful", "benign"}  # the prompt records (NOT_THE_FIELD), not the settings' sources
    assert not set(params) & ({f.name for f in dataclasses.fields(TrainConfig)} - records)
    assert len(params) <= 12


def test_the_neuron_recipes_learning_rate_is_train_lr() -> None:
    from neuroshield.train.recipes import DEFAULT_BUDGET, DEFAULT_LR, NEURON_RECIPES

    assert {DEFAULT_LR[r] for r in NEURON_RECIPES} == {TrainConfig().lr}
    assert DEFAULT_BUDGET == TrainConfig().budget


def test_one_name_for_the_benign_answer_cache() -> None:
    """The pipeline, the API and the CLI cache the base model's benign answers under one name."""
    from pathlib import Path

    import neuroshield

    root = Path(neuroshield.__file__).parent
    assert BENIGN_CACHE == "benign_answers.jsonl"
    hits = [str(p.relative_to(root)) for p in root.rglob("*.py") if "benign-answers.jsonl" in p.read_text("utf-8")]
    assert not hits, f"the old cache name benign-answers.jsonl is still used in {hits}"
    assert BENIGN_CACHE in _cli_params("train")["benign_cache"].help


def test_the_check_finds_a_default_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison is not vacuous: a CLI option whose default differs from the field's is reported."""
    params = _cli_params("validate")
    monkeypatch.setattr(params["controls"], "default", ValidateConfig().controls + 1)
    monkeypatch.setitem(globals(), "_cli_params", lambda stage: params)
    with pytest.raises(AssertionError, match="validate.controls"):
        test_every_field_has_a_cli_option_with_the_same_default("validate")
