"""The main job: identify -> overlap -> validate -> train -> evaluate -> budget (off by default) -> report, in one
run folder.

Each stage writes into `<run>/<stage>/` and, when it finishes, a `stage.json` holding the fingerprint
of its inputs (its config section, the data it read, the model, and the fingerprints of the stages it
reads from). A rerun skips a stage whose `stage.json` matches; a stage that was interrupted has no
`stage.json` and is run again, and its own caches (statistics, generations, checkpoints) let it pick
up where it stopped. The marker is removed before a stage writes anything (with the markers of the
stages that read its results) and written last; the paths in it are relative to the run folder, so a
run folder can be copied or moved.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroshield import __version__
from neuroshield.io import ArtifactError, atomic_write_text, read_json
from neuroshield.io import fingerprint as _fingerprint
from neuroshield.io import raise_output_errors
from neuroshield.io import records_fingerprint as _records_fingerprint
from neuroshield.io import write_json as _write_json
from neuroshield.config import PipelineConfig, check_values
from neuroshield.models.loading import dtype_name
from neuroshield.data.records import PromptRecord
from neuroshield.settings import BENIGN_CACHE, PIPELINE_STAGES

log = logging.getLogger(__name__)

STAGES = PIPELINE_STAGES


# the stages whose inputs include this stage's results: when it runs again, their markers go too
DOWNSTREAM = {"identify": ("validate", "train", "budget"), "train": ("evaluate",)}

# keys of stage outputs (and recipe results) that hold paths: stored relative to the run folder, so that a run
# folder can be copied or moved; read back against the folder they are read from
_PATH_KEYS = {"summary", "patch", "model_dir"}
_PATH_MAPS = {"experiments", "evaluations"}  # name -> path


def _map_paths(obj: Any, convert: Callable[[str], str], key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: convert(v) if isinstance(v, str) and (k in _PATH_KEYS or key in _PATH_MAPS)
                else _map_paths(v, convert, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_paths(v, convert, key) for v in obj]
    return obj


def _marker_fingerprint(path: Path) -> str | None:
    try:
        return read_json(path, "marker").get("fingerprint")
    except (ArtifactError, AttributeError):
        return None


def _paths_in(obj: Any) -> list[str]:
    found: list[str] = []
    _map_paths(obj, lambda v: found.append(v) or v)  # type: ignore[func-returns-value]
    return found


# train.* keys that only the neuron recipes read (precise-shield, ss-expansion, random)
NEURON_ONLY_TRAIN_KEYS = {"method", "set_languages", "lr", "budget", "trim", "neuron_parts"}


class Pipeline:
    """Runs the stages of one config; every stage is also callable on its own."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self._loaded: Any = None
        self.timings: dict[str, float] = {}

    # --- shared inputs ----------------------------------------------------------------------------
    def base_model(self) -> Any:
        """A fresh copy of the base model (cached on disk, so reloading costs about a second)."""
        from neuroshield.models import load_model

        c = self.config
        return load_model(c.model, dtype=c.dtype or None, device_map=c.device_map or None)

    def model_identity(self) -> dict[str, Any]:
        if self._loaded is None:
            self._loaded = self.base_model()
        # the config hash leaves the dtype out on purpose (sets transfer across dtypes); results do not
        dtype = dtype_name(self._loaded.model)
        return {"model": self.config.model, "model_id": self._loaded.model_id,
                "config_hash": self._loaded.config_hash, "dtype": dtype, **self._loaded.info}

    def prompts(self, source: str, label: str, languages: list[str], split: str, limit: int | None) -> list[PromptRecord]:
        """Prompts of `source` in `languages` (those it has), `split` by prompt id, `limit` per language: the one
        picker (`neurons.splits.pick_prompts`) with the run's held-out fraction and seed."""
        from neuroshield.neurons.splits import pick_prompts

        c = self.config
        return pick_prompts(source, label, languages, split, limit, held_out_fraction=c.held_out_fraction, seed=c.seed)

    def harmful(self, languages: list[str], split: str, limit: int | None, source: str = "", *,
                parallel: bool = False) -> list[PromptRecord]:
        """Held-in / held-out harmful prompts of `source` (default: the first harmful source of identify), in
        every configured modality: image records are the same prompts rendered FigStep-style
        (`runs/<name>/images`), same ids, same split. `parallel`: the same ids in every one of `languages`
        (`neurons.splits.parallel_pick`)."""
        source = source or self.config.identify.harmful[0]
        if parallel:
            from neuroshield.neurons.splits import parallel_pick

            c = self.config
            text = parallel_pick(source, "harmful", languages, split, limit, held_out_fraction=c.held_out_fraction,
                                 seed=c.seed)
        else:
            text = self.prompts(source, "harmful", languages, split, limit)
        if "image" not in self.config.modalities:
            return text
        from neuroshield.data.typography import render_prompt_records

        return text + render_prompt_records(text, self.run_dir / "images")

    # --- stage runner -----------------------------------------------------------------------------
    def relative(self, obj: Any) -> Any:
        """Stage outputs with the paths inside the run folder made relative to it (others kept as given)."""
        root = self.run_dir.resolve()

        def convert(value: str) -> str:
            try:
                return Path(value).resolve().relative_to(root).as_posix()
            except ValueError:
                return value

        return _map_paths(obj, convert)

    def resolved(self, obj: Any) -> Any:
        """Stage outputs as read from a marker: relative paths joined to this run folder."""
        return _map_paths(obj, lambda v: v if Path(v).is_absolute() else str(self.run_dir / v))

    def _read_marker(self, marker: Path, fingerprint: str) -> dict[str, Any] | None:
        """The marker's record when it matches `fingerprint` and every file it names exists; else None."""
        try:
            done = read_json(marker, "stage marker")
        except ArtifactError as err:
            log.warning("%s; running the stage again", err)
            return None
        if not isinstance(done, dict) or done.get("fingerprint") != fingerprint:
            log.info("%s: inputs changed, running the stage again", marker)
            return None
        outputs = self.resolved(done.get("outputs") or done.get("result") or {})
        missing = [v for v in _paths_in(outputs) if not Path(v).exists()]
        if missing:
            log.warning("%s: %s is missing; running the stage again", marker, missing[0])
            return None
        return {**done, "outputs": outputs}

    def _stage(self, name: str, inputs: dict[str, Any], body: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        stage_dir = self.run_dir / name
        marker = stage_dir / "stage.json"
        fingerprint = _fingerprint({"inputs": inputs, "version": __version__})
        if marker.is_file():
            done = self._read_marker(marker, fingerprint)
            if done is not None:
                log.info("stage %s: up to date, skipped (%s)", name, marker)
                return done
        # the marker goes before the stage rewrites anything, and so do the markers of the stages that read its
        # results: an interrupted or failed run leaves none, and the next run does these stages again
        for stage in (name, *DOWNSTREAM.get(name, ())):
            (self.run_dir / stage / "stage.json").unlink(missing_ok=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        log.info("stage %s: running", name)
        outputs = body(stage_dir)
        seconds = round(time.perf_counter() - start, 1)
        record = {"stage": name, "fingerprint": fingerprint, "seconds": seconds, "outputs": self.relative(outputs),
                  "inputs": inputs}
        _write_json(marker, record)  # last: everything the stage wrote is in place
        self.timings[name] = seconds
        return {**record, "outputs": self.resolved(record["outputs"])}

    # --- stages -----------------------------------------------------------------------------------
    def identify_prompts(self) -> tuple[list[PromptRecord], list[PromptRecord]]:
        """(harmful, benign) held-in prompts identify contrasts, `identify.per_language` per language of
        `identify_languages` (never-trained languages are left out unless `identify_never_trained`)."""
        c, ic = self.config, self.config.identify
        langs = c.identify_languages
        harmful = [r for s in ic.harmful for r in self.prompts(s, "harmful", langs, "held-in", ic.per_language)]
        benign = [r for s in ic.benign for r in self.prompts(s, "benign", langs, "held-in", ic.per_language)]
        return harmful, benign

    def identify(self) -> dict[str, Any]:
        from neuroshield.neurons.identify import identify, overlap_report

        c, ic = self.config, self.config.identify
        langs = c.identify_languages
        harmful, benign = self.identify_prompts()
        if "image" in c.modalities:
            from neuroshield.data.typography import render_prompt_records

            harmful += render_prompt_records(harmful, self.run_dir / "images")
        inputs = {"config": ic.__dict__, "languages": langs, "high_resource": c.high_resource,
                  "model": self.model_identity(), "harmful": _records_fingerprint(harmful),
                  "benign": _records_fingerprint(benign)}

        def body(out: Path) -> dict[str, Any]:
            result = identify(self._loaded, harmful, benign, languages=langs, method=ic.methods, rho=ic.rho,
                              sites=ic.sites, positions=ic.positions, high_resource=c.high_resource, out_dir=out,
                              batch_size=ic.batch_size, seed=c.seed)
            overlap_report(out)
            return {"summary": str(result.summary_path)}

        return self._stage("identify", inputs, body)

    def validate(self, identified: dict[str, Any]) -> dict[str, Any]:
        from neuroshield.intervene.validate import validate
        from neuroshield.neurons.neuronset import NeuronSet

        c, vc = self.config, self.config.validate
        set_dir = self.run_dir / "identify" / vc.method
        # the languages identify found sets in
        langs = [lang for lang in c.identify_languages if not vc.languages or lang in vc.languages]
        harmful = self.validation_harmful()
        guard = [r for lang in c.languages[:2]
                 for r in self.prompts("parallel-benign", "benign", [lang], "held-out", vc.benign_guard)]
        inputs = {"config": vc.__dict__, "identify": identified["fingerprint"], "guard": _records_fingerprint(guard),
                  "harmful": {k: _records_fingerprint(v) for k, v in harmful.items()}}
        hr = c.high_resource[0]
        others = [lang for lang in langs if lang not in c.high_resource]

        def body(out: Path) -> dict[str, Any]:
            from neuroshield.neurons.stats import ActivationStats

            loaded = self._loaded
            experiments: dict[str, str] = {}
            stats = ActivationStats.load(self.run_dir / "identify" / "stats") if vc.suppress_mode != "zero" else None

            def suppress(lang: str) -> str:
                # mean:benign: the benign mean of the prompts' own language (text benign prompts, also for images)
                return "zero" if vc.suppress_mode == "zero" else f"mean:{lang}/text/benign"

            def run(name: str, set_name: str, mode: str, prompts: list[PromptRecord]) -> None:
                path = set_dir / f"{set_name}.safetensors"
                if not prompts or not path.is_file():
                    log.warning("validate %s: skipped (no prompts or no set %s)", name, path)
                    return
                ns = NeuronSet.load(path, loaded)
                if len(ns) == 0:
                    log.warning("validate %s: set %s is empty; skipped", name, set_name)
                    return
                validate(loaded, ns, prompts, mode=mode, controls=vc.controls, seed=c.seed,
                         max_new_tokens=vc.max_new_tokens, batch_size=vc.batch_size,
                         benign_guard=guard if name.startswith("suppress") else None, out_dir=out / name,
                         stats=stats, cache_dir=out / "generations")  # shared: no-intervention answers made once
                experiments[name] = str(out / name / "validation.json")

            for modality in c.modalities:
                sfx = "" if modality == "text" else f"_{modality}"
                by_lang = {lang: [r for r in recs if r.modality == modality] for lang, recs in harmful.items()}
                # (a) suppress the high-resource MS neurons on high-resource prompts
                run(f"suppress-ms-{hr}{sfx}", f"ms_{hr}{sfx}", suppress(hr), by_lang.get(hr, []))
                # (b) suppress SS(lang) on each other language; (c) reinforce SS(lang) there
                for lang in others:
                    run(f"suppress-ss-{lang}{sfx}", f"ss_{lang}{sfx}", suppress(lang), by_lang[lang])
                for lang in others:
                    run(f"reinforce-ss-{lang}{sfx}", f"ss_{lang}{sfx}", f"scale:{vc.reinforce_scale}", by_lang[lang])
            return {"experiments": experiments}

        return self._stage("validate", inputs, body)

    def recipe_run(self, name: str) -> Any:
        """The `train.recipe_runs` entry named `name` (a recipe, or random-s<seed>)."""
        from neuroshield.train.recipes import recipe_runs

        runs = {r.name: r for r in recipe_runs(self.config.train, self.config.seed)}
        if name not in runs:
            raise ValueError(f"no training run {name!r} in train.recipes {self.config.train.recipes} (runs: "
                             f"{', '.join(runs)})")
        return runs[name]

    def train_data(self, name: str = "", settings: Any = None) -> tuple[list[PromptRecord], list[PromptRecord]]:
        """(harmful, benign) held-in training prompts of the run `name` (its recipe's settings, overrides applied;
        "": `train` itself), or of the train `settings` given. `refusals: parallel` takes the same ids in every
        training language."""
        tc = settings if settings is not None else self.recipe_run(name).settings if name else self.config.train
        sources = tc.harmful or self.config.identify.harmful[:1]
        if tc.refusals == "parallel":
            harmful = [r for source in sources
                       for r in self.harmful(list(tc.languages), "held-in", tc.per_language, source, parallel=True)]
        else:
            harmful = [r for source in sources for lang in tc.languages
                       for r in self.harmful([lang], "held-in", tc.per_language, source)]
        if not harmful:
            raise ValueError(f"train.harmful {sources} has no held-in prompts in train.languages {tc.languages}: choose "
                             "a source that has these languages")
        benign = [r for source in tc.benign
                  for r in self.prompts(source, "benign", tc.benign_languages, "held-in", tc.benign_count)]
        return harmful, benign

    def train_recipe(self, name: str, out_dir: Path, *, resume: bool = True, export: bool = True,
                     progress: bool = True, loaded: Any = None,
                     on_step: Callable[[int, dict[str, Any]], float | None] | None = None,
                     run: Any = None, lora_r: int | None = None, benign_cache: Path | None = None,
                     neuron_set: Any = None) -> tuple[Any, Any]:
        """Train the run `name` (a recipe of `train.recipes`, or random-s<seed>) from fresh base weights with its
        recipe's settings (`train.recipes.recipe_settings`) on `train_data(name)`; needs identify's sets for the neuron
        recipes. Returns (the trained LoadedModel, its TrainResult). The base model's benign
        answers are cached beside `out_dir` (shared by the recipes). `loaded`: the base model to train in place
        (default: a fresh copy); `on_step(step, record)` runs after each optimizer step with the weights so far
        in effect on `loaded` (the training sweep screens intermediate steps with it). `run`: a `RecipeRun` that is
        not one of `train.recipes` (the budget curve's points); `lora_r`: LoRA's rank (alpha 2 x rank; default:
        `TrainOptions`' r 16, alpha 32); `benign_cache`: where the base model's benign answers are cached (default:
        beside `out_dir`); `neuron_set`: the set a neuron recipe trains, instead of the one its settings pick from
        identify's sets (`experiments/neuron_choice.py`: sets of another identify run, a flat random set)."""
        from neuroshield.settings import TrainOptions
        from neuroshield.train.recipes import NEURON_RECIPES, recipe_neuron_set
        from neuroshield.train.trainer import train

        c = self.config
        run = run if run is not None else self.recipe_run(name)
        recipe, tc = run.recipe, run.settings
        harmful, benign = self.train_data(settings=tc)
        loaded = loaded if loaded is not None else self.base_model()  # every recipe starts from the base weights
        if recipe in NEURON_RECIPES and neuron_set is None:
            # random: the control of `random_of`'s set, with that recipe's settings (recipe_settings) and its own seed
            neuron_set = recipe_neuron_set(recipe, loaded, self.run_dir / "identify" / tc.method,
                                           set_languages=tc.set_languages or c.identify_languages,
                                           modalities=c.modalities, high_resource=c.high_resource[0],
                                           budget=tc.budget, like=run.controls or tc.random_of[0],
                                           seed=c.seed if run.set_seed is None else run.set_seed, trim=tc.trim)
        if on_step is None and tc.select_every > 0:
            on_step = self.step_selector(loaded, harmful + benign, out_dir, tc)
        options = TrainOptions(resume=resume, export=export, progress=progress,
                               benign_cache=str(benign_cache or out_dir.parent / BENIGN_CACHE),
                               **({"lora_r": lora_r, "lora_alpha": 2 * lora_r} if lora_r else {}))
        result = train(loaded, recipe, tc, harmful=harmful, benign=benign, out_dir=out_dir, neuron_set=neuron_set,
                       seed=c.seed, options=options, on_step=on_step)
        if tc.select_every > 0 and result is not None and not getattr(result, "interrupted", False):
            plot_selection(out_dir, f"{name}: harmful vs exaggerated refusal during training")
        return loaded, result

    def monitor_prompts(self, trained: list[PromptRecord], settings: Any = None
                        ) -> tuple[list[PromptRecord], list[PromptRecord]]:
        """(harmful, contrast) prompts that select the training step: held-in harmful prompts of every language
        and prompts of the contrast set's train part, both of ids that training (`trained`: its harmful and retain
        prompts) does not use in any language; never evaluation prompts, never a never-trained language (the step
        chosen must not depend on them). `settings`: the recipe's train settings (default: `train`)."""
        c, tc = self.config, settings or self.config.train
        used = {r.id for r in trained}
        source = c.identify.harmful[0]
        langs = c.trained_languages
        pool = [r for r in self.prompts(source, "harmful", langs, "held-in", None) if r.id not in used]
        from neuroshield.neurons.splits import limit_per_group

        harmful = limit_per_group(pool, tc.monitor_per_language, c.seed)
        # contrast ids that the retain set does not answer in any language: a translation of a trained answer would
        # show what training memorised, not what it does to unseen safe requests
        scary = [r for r in self.prompts("contrast", "benign", langs, "held-in", None) if r.id not in used]
        contrast = limit_per_group(scary, tc.monitor_per_language, c.seed)
        return harmful, contrast

    def step_selector(self, loaded: Any, trained: list[PromptRecord], out_dir: Path, settings: Any = None
                      ) -> Callable[[int, dict[str, Any]], float | None]:
        """An `on_step` for `train`: every `select_every` steps, short greedy answers to `monitor_prompts`,
        judged; returns the selection score (harmful refusal, less twice the contrast refusal beyond the base
        model's plus `select_tolerance`) and records both rates in the step's loss record."""
        from neuroshield.generate.generation import generate_responses
        from neuroshield.judges.registry import get_judge, judge_responses, result_verdict

        tc = settings or self.config.train
        harmful, contrast = self.monitor_prompts(trained, tc)
        prompts = harmful + contrast
        judge = get_judge("refusal-phrase")

        def rates() -> tuple[float, float]:
            texts = generate_responses(loaded, prompts, max_new_tokens=16, batch_size=24, progress=False)
            res = judge_responses(judge, texts, [r.language for r in prompts], prompts=[r.text for r in prompts])
            refused = [result_verdict(x) == "refusal" for x in res]
            n = len(harmful)
            return sum(refused[:n]) / max(1, n), sum(refused[n:]) / max(1, len(contrast))

        # the base model's rates on these prompts: measured once, shared by the recipes (beside benign_answers.jsonl)
        base_file = out_dir.parent / "monitor_base.json"
        key = _fingerprint({"model": loaded.config_hash, "prompts": _records_fingerprint(prompts)})
        base = json.loads(base_file.read_text()) if base_file.is_file() else {}
        if base.get("key") != key:  # the untrained model's rates, measured once (before the first step)
            h0, c0 = rates()
            base = {"key": key, "harmful_refusal": h0, "contrast_refusal": c0, "harmful": len(harmful),
                    "contrast": len(contrast)}
            base_file.parent.mkdir(parents=True, exist_ok=True)
            _write_json(base_file, base)
        log.info("step selection: %d harmful + %d contrast monitor prompts; base refusal %.3f / %.3f",
                 len(harmful), len(contrast), base["harmful_refusal"], base["contrast_refusal"])

        def on_step(step: int, record: dict[str, Any]) -> float | None:
            if step % tc.select_every:
                return None
            h, cr = rates()
            record["monitor_harmful_refusal"], record["monitor_contrast_refusal"] = h, cr
            log.info("step %d: monitor harmful refusal %.3f, contrast refusal %.3f", step, h, cr)
            return selection_score(h, cr, base["contrast_refusal"], tc.select_tolerance)

        return on_step

    def train(self, identified: dict[str, Any]) -> dict[str, Any]:
        from neuroshield.train.recipes import NEURON_RECIPES, RECIPES, recipe_runs

        c, tc = self.config, self.config.train
        unknown = [r for r in tc.recipes if r not in RECIPES]
        if unknown:  # before any recipe trains (load_config says so too)
            raise ValueError(f"train.recipes: unknown recipe(s) {unknown}; recipes: {', '.join(RECIPES)}")
        runs = recipe_runs(tc, c.seed)
        data = {run.name: [_records_fingerprint(recs) for recs in self.train_data(run.name)] for run in runs}
        # the model (and its dtype) is an input of every recipe: LoRA and full fine-tuning do not read identify; the
        # config holds the per-recipe overrides, `data` each run's (harmful, benign) prompts
        inputs = {"config": tc.__dict__, "identify": identified["fingerprint"], "data": data, "seed": c.seed,
                  "model": self.model_identity()}

        def body(out: Path) -> dict[str, Any]:
            results: dict[str, Any] = {}
            for run in runs:
                name, recipe = run.name, run.recipe
                # a run finished with the same inputs is reused, so adding a recipe to the config trains only that
                # one; its inputs are its recipe's settings (overrides applied), its data and, for a random control,
                # its set's seed (LoRA and full fine-tuning ignore the neuron-only keys: changing the neurons'
                # learning rate or set does not train them again)
                ignored = ({"recipes", "overrides", "random_seeds"} | ({"random_of"} if recipe != "random" else set())
                           | (set() if recipe in NEURON_RECIPES else NEURON_ONLY_TRAIN_KEYS))
                settings = {k: v for k, v in run.settings.__dict__.items() if k not in ignored}
                if run.controls is not None:  # a random run's key names the one recipe whose set it copies
                    settings["random_of"] = run.controls
                recipe_key = _fingerprint({**inputs, "config": settings, "data": data[name],
                                           "identify": inputs["identify"] if recipe in NEURON_RECIPES else None,
                                           "recipe": recipe, "set_seed": run.set_seed, "version": __version__})
                marker = out / name / "pipeline-recipe.json"
                started = out / name / "pipeline-recipe-started.json"
                done = self._read_marker(marker, recipe_key) if marker.is_file() else None
                if done is not None:
                    results[name] = done["outputs"]
                    log.info("train %s: up to date, reused (%s)", name, marker)
                    continue
                marker.unlink(missing_ok=True)
                # resume only an interrupted run of these very inputs; other checkpoints are stale
                resume = started.is_file() and _marker_fingerprint(started) == recipe_key
                started.parent.mkdir(parents=True, exist_ok=True)
                _write_json(started, {"fingerprint": recipe_key})
                _, result = self.train_recipe(name, out / name, resume=resume)
                results[name] = {"patch": result.patch, "model_dir": result.model_dir,
                                 "parameters_updated": result.parameters_updated,
                                 "fraction_updated": result.fraction_updated, "summary": str(out / name / "summary.json")}
                if not result.interrupted:
                    _write_json(marker, {"fingerprint": recipe_key, "outputs": self.relative(results[name])})
            return {"recipes": results}

        return self._stage("train", inputs, body)

    def validation_harmful(self) -> dict[str, list[PromptRecord]]:
        """The held-out harmful prompts the validate stage intervenes on, per language."""
        c, vc = self.config, self.config.validate
        langs = [lang for lang in c.languages if not vc.languages or lang in vc.languages]
        return {lang: self.harmful([lang], "held-out", vc.per_language) for lang in langs}

    def evaluation_harmful(self) -> list[PromptRecord]:
        """Held-out harmful prompts for evaluation, `harmful_per_language` per language, whose ids no other stage
        uses in any language (identify and training take held-in ids; validation's held-out ids are left out)."""
        c, ec = self.config, self.config.evaluate
        from neuroshield.neurons.splits import evaluation_pick

        used = {r.id for recs in self.validation_harmful().values() for r in recs} if c.validate.enabled else set()
        text = evaluation_pick(c.identify.harmful[0], c.languages, ec.harmful_per_language, exclude_ids=used,
                               held_out_fraction=c.held_out_fraction, seed=c.seed)
        if "image" not in c.modalities:
            return text
        from neuroshield.data.typography import render_prompt_records

        return text + render_prompt_records(text, self.run_dir / "images")

    def evaluate(self, trained: dict[str, Any] | None) -> dict[str, Any]:
        from neuroshield.evaluate.evaluate import EvalSuite, evaluate
        from neuroshield.models import load_model

        c, ec = self.config, self.config.evaluate
        harmful = self.evaluation_harmful()
        benign = [r for s in ec.benign for r in self.prompts(s, "benign", c.languages, "held-out", ec.benign_per_language)]
        contrast = (self.prompts("contrast", "benign", c.languages, "held-out", ec.contrast_per_language)
                    if ec.contrast_per_language else [])
        mgsm = self.prompts("mgsm", "benign", c.languages, "held-out", ec.mgsm_per_language) if ec.mgsm_per_language else []
        xcopa = (self.prompts("xcopa", "benign", ec.xcopa_languages, "all", ec.xcopa_per_language)
                 if ec.xcopa_per_language else [])
        suite = EvalSuite(harmful=harmful, benign=benign, contrast=contrast, mgsm=mgsm, xcopa=xcopa,
                          sources={"harmful": c.identify.harmful[:1], "benign": ec.benign,
                                   "contrast": ["contrast:eval"] if contrast else [],
                                   "capability": (["mgsm"] if mgsm else []) + (["xcopa"] if xcopa else [])})
        recipes = (trained or {}).get("outputs", {}).get("recipes", {})
        from neuroshield.judges.registry import get_judge, judge_label

        # the judge's version (its rules and phrase lists): a changed judge judges the cached answers again
        judge = judge_label(get_judge(ec.judge, self._loaded))
        inputs = {"config": ec.__dict__, "model": self.model_identity(), "suite": suite.describe(),
                  "train": (trained or {}).get("fingerprint"), "judge": judge}

        def body(out: Path) -> dict[str, Any]:
            results = {}
            kw = dict(judge=ec.judge, batch_size=ec.batch_size, max_new_tokens=ec.max_new_tokens, seed=c.seed)
            evaluate(self._loaded, suite, out_dir=out / "base", tag="base", **kw)
            results["base"] = str(out / "base" / "eval.json")
            for recipe, info in recipes.items():
                if info.get("patch"):
                    evaluate(self._loaded, suite, patch=info["patch"], out_dir=out / recipe, tag=recipe, **kw)
                elif info.get("model_dir"):
                    from neuroshield.train.export import check_merged

                    check_merged(info["model_dir"])  # its digests, before the folder is trusted
                    merged = load_model(info["model_dir"], dtype=c.dtype or None, device_map=c.device_map or None)
                    evaluate(merged, suite, out_dir=out / recipe, tag=recipe, **kw)
                else:
                    continue
                results[recipe] = str(out / recipe / "eval.json")
            return {"evaluations": results}

        return self._stage("evaluate", inputs, body)

    def budget_runs(self) -> list[tuple[Any, int | None]]:
        """The budget curve's points: (RecipeRun, LoRA rank or None). A neuron recipe at a budget is named
        `<recipe>@<percent>%` and trains with the run's settings for it (`train.recipes.recipe_settings`) at that
        `budget`; LoRA at a rank `lora-r<rank>` with LoRA's settings; every point with `budget.select_every`."""
        import dataclasses

        from neuroshield.train.recipes import RecipeRun, recipe_settings

        c, bc, tc = self.config, self.config.budget, self.config.train
        runs: list[tuple[Any, int | None]] = []
        for recipe in bc.recipes:
            controls = tc.random_of[0] if recipe == "random" else None
            settings = dataclasses.replace(recipe_settings(tc, recipe, controls), select_every=bc.select_every)
            for fraction in bc.fractions:
                name = f"{recipe}@{100 * fraction:g}%"
                runs.append((RecipeRun(name, recipe, dataclasses.replace(settings, budget=fraction),
                                       c.seed if recipe == "random" else None, controls), None))
        lora = dataclasses.replace(recipe_settings(tc, "lora"), select_every=bc.select_every)
        runs += [(RecipeRun(f"lora-r{r}", "lora", lora), r) for r in bc.lora_ranks]
        return runs

    def budget(self, identified: dict[str, Any]) -> dict[str, Any]:
        """The budget curve (`evaluate.budget`): each point of `budget_runs` trained from the base weights, then
        scored with the fast refusal score on the evaluation's held-out harmful and contrast prompts; the base model
        scored once. Writes `budget/budget.json` and `budget/budget.png`; a point finished with the same inputs is
        reused (`budget/<point>/point.json`), so an interrupted stage goes on where it stopped."""
        from neuroshield.evaluate.budget import against_random, language_groups, plot_budget, score_point
        from neuroshield.train.recipes import NEURON_RECIPES

        c, bc, ec = self.config, self.config.budget, self.config.evaluate
        harmful = [r for r in self.evaluation_harmful() if r.modality == "text"]
        contrast = self.prompts("contrast", "benign", c.languages, "held-out", ec.contrast_per_language or None)
        groups = language_groups(c.languages, c.never_trained)
        runs = self.budget_runs()
        prompts = {"harmful": _records_fingerprint(harmful), "contrast": _records_fingerprint(contrast)}
        inputs = {"config": bc.__dict__, "identify": identified["fingerprint"], "model": self.model_identity(),
                  "prompts": prompts, "seed": c.seed, "groups": [g for g, _ in groups],
                  "runs": {run.name: {"settings": run.settings.__dict__, "rank": rank, "set_seed": run.set_seed,
                                      "data": [_records_fingerprint(x) for x in self.train_data(settings=run.settings)]}
                           for run, rank in runs}}

        def score(loaded: Any) -> dict[str, Any]:
            return score_point(loaded, harmful, contrast, groups, batch_size=bc.batch_size, seed=c.seed)

        def body(out: Path) -> dict[str, Any]:
            base_file = out / "base.json"
            base_key = _fingerprint({"model": inputs["model"], "prompts": prompts, "groups": inputs["groups"]})
            base = read_json(base_file, "budget base") if base_file.is_file() else {}
            if base.get("fingerprint") != base_key:
                base = {"fingerprint": base_key, **score(self._loaded)}
                _write_json(base_file, base)
            points = []
            for run, rank in runs:
                folder = out / run.name
                # the point's own inputs: adding a point or a budget does not train the others again
                key = _fingerprint({**{k: v for k, v in inputs.items() if k not in ("runs", "config")},
                                    "batch_size": bc.batch_size, "run": inputs["runs"][run.name],
                                    "identify": inputs["identify"] if run.recipe in NEURON_RECIPES else None,
                                    "version": __version__})
                marker = folder / "point.json"
                done = read_json(marker, "budget point") if marker.is_file() else {}
                if done.get("fingerprint") == key:
                    points.append(done)
                    log.info("budget %s: up to date, reused (%s)", run.name, marker)
                    continue
                marker.unlink(missing_ok=True)
                start = time.perf_counter()
                loaded, result = self.train_recipe(run.name, folder, run=run, lora_r=rank, resume=False, export=False,
                                                   benign_cache=self.run_dir / "train" / BENIGN_CACHE)
                train_seconds = time.perf_counter() - start
                point = {"fingerprint": key, "name": run.name, "recipe": run.recipe,
                         "label": f"r{rank}" if rank else f"{100 * run.settings.budget:g}%",
                         "budget": None if rank else run.settings.budget, "lora_rank": rank,
                         # trained: the neurons' deltas, LoRA's adapters; updated: the weights merging changes
                         "parameters_trained": result.trainable_parameters,
                         "fraction_trained": result.trainable_parameters / max(1, result.total_parameters),
                         "parameters_updated": result.parameters_updated, "fraction_updated": result.fraction_updated,
                         "selected_step": result.selected_step, "train_seconds": round(train_seconds, 1),
                         **score(loaded)}
                del loaded
                _write_json(marker, point)
                points.append(point)
            curve = {"base": base, "points": points, "vs_random": against_random(points, harmful, contrast, groups,
                                                                                  seed=c.seed), "group_names": {
                "all": "all languages", "trained": "trained languages", "never-trained": "never-trained languages"},
                "measure": "fast refusal score (judges.logprob.refusal_score) > 0 counts as a refusal"}
            _write_json(out / "budget.json", curve)
            plot_budget(curve, out / "budget.png")
            return {"summary": str(out / "budget.json")}

        return self._stage("budget", inputs, body)

    def report(self) -> Path:
        from neuroshield.report.report import build_report

        return build_report(self.run_dir, title=f"neuroshield report: {self.config.name} ({self.config.model})")

    # --- all --------------------------------------------------------------------------------------
    def write_headline(self) -> Path | None:
        """`<run>/evaluate/headline.json` and `.md`: per model, high-resource against the other languages (and trained
        against never-trained ones, when the config fixes the split), with paired differences against base and random,
        and the random sets one by one when there are several (`evaluate.headline`); None when nothing was
        evaluated."""
        from neuroshield.evaluate.headline import format_headline, format_random_sets, headline

        folder = self.run_dir / "evaluate"
        if not folder.is_dir():
            return None
        from neuroshield.train.recipes import random_controls

        tc = self.config.train
        h = headline(folder, high_resource=self.config.high_resource, never_trained=self.config.never_trained,
                     controls=random_controls(tc, self.config.seed) if "random" in tc.recipes else None,
                     languages=self.config.languages, seed=self.config.seed)
        if not h["models"]:
            return None
        _write_json(folder / "headline.json", h)
        md = folder / "headline.md"
        sets = format_random_sets(h)
        atomic_write_text(md, format_headline(h) + "\n" + (f"\nRandom sets, one by one:\n\n{sets}\n" if sets else ""))
        return md

    def run(self, stages: tuple[str, ...] = STAGES) -> Path:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
        check_values(self.config)  # a config built in Python gets the checks of load_config, before any model loads
        with raise_output_errors(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / "config.json", self.config.to_dict())
        start = time.perf_counter()
        self.model_identity()
        if "image" in self.config.modalities and not self._loaded.adapter.multimodal:
            raise ValueError(f"modalities include image, but {self.config.model!r} is a text model: use a "
                             "vision-language model (see docs/vlm.md), or set modalities: [text]")
        identified = self.identify() if "identify" in stages else None
        if identified is None:
            raise ValueError("the identify stage is needed by every later stage")
        if self.config.validate.enabled and "validate" in stages:
            self.validate(identified)
        trained = self.train(identified) if self.config.train.enabled and "train" in stages else None
        if self.config.evaluate.enabled and "evaluate" in stages:
            self.evaluate(trained)
            self.write_headline()
        if self.config.budget.enabled and "budget" in stages:
            self.budget(identified)
        _write_json(self.run_dir / "pipeline.json", {"wall_seconds": round(time.perf_counter() - start, 1),
                                                     "stage_seconds": self.timings, "version": __version__})
        return self.report()


def run_pipeline(config: PipelineConfig, stages: tuple[str, ...] = STAGES) -> Path:
    """Run the whole pipeline for `config`; returns the path of the HTML report."""
    return Pipeline(config).run(stages)


def selection_score(harmful_refusal: float, contrast_refusal: float, base_contrast: float, tolerance: float) -> float:
    """The step selection's score: harmful refusal, less twice the contrast refusal beyond the base model's plus
    `tolerance`, less a tenth of any rise at all, which breaks ties towards the step that refuses fewer safe
    prompts (within the tolerance it weighs less than one harmful prompt of a monitor of 20 or more)."""
    rise = max(0.0, contrast_refusal - base_contrast)
    return harmful_refusal - 2.0 * max(0.0, rise - tolerance) - 0.1 * rise


def chosen_point(points: list[tuple[int, float, float, float | None]]) -> tuple[int, float, float, float | None]:
    """Of monitored (step, contrast refusal, harmful refusal, selection score) points, the one training keeps: the
    highest score, the earliest step on ties (`train.loop` keeps a step only when its score is strictly higher)."""
    return max(points, key=lambda p: (p[3] if p[3] is not None else float("-inf"), -p[0]))


def plot_selection(recipe_dir: Path, title: str) -> Path | None:
    """`selection.png` in a recipe folder: the step selection's held-in trade-off (harmful refusal against contrast
    refusal at every monitored step, the base model, the chosen step), from loss.json and the train folder's
    monitor_base.json."""
    try:
        history = read_json(recipe_dir / "loss.json", "training history")
        base = read_json(recipe_dir.parent / "monitor_base.json", "step-selection base rates")
    except ArtifactError:
        return None
    pts = [(h["step"], h["monitor_contrast_refusal"], h["monitor_harmful_refusal"], h.get("select_score"))
           for h in history if h.get("monitor_harmful_refusal") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuroshield.io import save_figure

    best = chosen_point(pts)
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [100 * base["contrast_refusal"]] + [100 * p[1] for p in pts]
    ys = [100 * base["harmful_refusal"]] + [100 * p[2] for p in pts]
    ax.plot(xs, ys, color="#4C72B0", lw=1, alpha=0.6)
    ax.scatter(xs[1:], ys[1:], color="#4C72B0", zorder=3)
    ax.scatter([xs[0]], [ys[0]], color="grey", zorder=3, label="base")
    for (step, x, y, _) in pts:
        ax.annotate(str(step), (100 * x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([100 * best[1]], [100 * best[2]], s=160, facecolors="none", edgecolors="#C44E52", lw=2, zorder=4,
               label=f"chosen: step {best[0]}")
    ax.set_xlabel(f"contrast (safe) prompts refused, % (n={base['contrast']})")
    ax.set_ylabel(f"held-in harmful prompts refused, % (n={base['harmful']})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = recipe_dir / "selection.png"
    save_figure(fig, path)
    return path

