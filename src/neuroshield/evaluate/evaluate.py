"""Stage 6: evaluate a model (optionally with a safety patch applied) for safety and capability.

`evaluate(loaded, suite, out_dir=...)` measures, per language x modality:

* harmful sets: ASR (compliance share), refusal rate and invalid share (the judge's three verdicts on
  greedy responses: refusal, compliance, invalid);
* benign sets: over-refusal (share of everyday benign prompts refused), with the invalid share;
* contrast sets (safe requests that sound dangerous): exaggerated-safety refusal (share refused), with
  the invalid share;
* MGSM accuracy and XCOPA accuracy per language (see `capability.py`);

with bootstrap 95 % intervals (`metrics.py`), and writes into `out_dir`:

* `eval.json`: an `EvalResult` (model, patch, judge name@version, data provenance, settings, cells,
  timings, skipped records); `EvalResult.load(path)` reads it back;
* `eval.csv`: one row per number;
* `items.jsonl`: one row per judged prompt / capability item (ids, `verdict`, scores; no prompt text);
* `generations.jsonl`: the generation cache (`generate.cache`, the one every stage uses). Every generation
  (and every log-likelihood) is appended as soon as its batch is done, keyed by (model config hash,
  weights fingerprint and dtype, patch hash, generation settings, prompt id, language, modality, prompt
  text hash); a rerun with the same arguments reuses it, so an interrupted run resumes where it stopped
  and a finished one is not recomputed.

Image records are skipped with a warning when the model has no processor (text-only model).
`backend="vllm"` generates with vLLM when it is importable (checkpoints only, no patches).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroshield.data.records import PromptRecord
from neuroshield.evaluate.capability import (
    mgsm_cells,
    mgsm_prompt,
    score_mgsm,
    score_xcopa,
    xcopa_cells,
    xcopa_logprobs,
)
from neuroshield.evaluate.metrics import (
    N_RESAMPLES,
    CapabilityCell,
    Rate,
    SafetyCell,
    Verdict,
    safety_metrics,
    write_json,
)
from neuroshield.evaluate.metrics import ROLES as SAFETY_ROLES
from neuroshield.generate.cache import CACHE_FILE, Generator, GenerationCache, cached_generate, cached_values, model_key
from neuroshield.generate.generation import Generation, GenerationConfig
from neuroshield.judges.registry import get_judge, judge_info, judge_label, judge_responses, result_verdict
from neuroshield.io import atomic_path, atomic_write_text, fingerprint, weights_fingerprint
from neuroshield.models.loading import dtype_name
from neuroshield.settings import EvaluateConfig, PipelineConfig

log = logging.getLogger(__name__)

EVAL_FORMAT = 1


class EvaluationWarning(UserWarning):
    """Something was skipped during evaluation (e.g. image prompts on a text-only model)."""


# --------------------------------------------------------------------------------------------------
# Suite
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalSuite:
    """What to evaluate: records per role. `harmful` / `benign` / `contrast` give ASR, over-refusal and
    exaggerated-safety refusal (with the invalid share of each); `mgsm` and `xcopa` give capability.
    `sources` records which data sets each role came from."""

    harmful: list[PromptRecord] = field(default_factory=list)
    benign: list[PromptRecord] = field(default_factory=list)
    contrast: list[PromptRecord] = field(default_factory=list)
    mgsm: list[PromptRecord] = field(default_factory=list)
    xcopa: list[PromptRecord] = field(default_factory=list)
    sources: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role in SAFETY_ROLES:
            for r in getattr(self, role):
                if not isinstance(r, PromptRecord):
                    raise TypeError(f"EvalSuite.{role} must hold PromptRecord objects, got {type(r).__name__}")
        for r in self.mgsm:
            if r.reference is None and "answer" not in r.meta:
                raise ValueError(f"MGSM record {r.id} ({r.language}) has no reference answer")
        for r in self.xcopa:
            if not {"premise", "choice1", "choice2", "question", "label"} <= set(r.meta):
                raise ValueError(f"XCOPA record {r.id} ({r.language}) lacks premise/choices/question/label in meta")

    def __len__(self) -> int:
        return len(self.harmful) + len(self.benign) + len(self.contrast) + len(self.mgsm) + len(self.xcopa)

    @classmethod
    def from_sources(
        cls, *, harmful: Sequence[str] = (), benign: Sequence[str] = (), contrast: Sequence[str] = (),
        capability: Sequence[str] = (), languages: Sequence[str] | None = None, limit: int | None = None,
        benign_limit: int | None = None, mgsm_limit: int | None = None, xcopa_limit: int | None = None,
        mgsm_languages: Sequence[str] | None = None, xcopa_languages: Sequence[str] | None = None,
        split: str = "held-out", held_out_fraction: float = 0.5, seed: int = 0, exclude_ids: Collection[str] = (),
    ) -> EvalSuite:
        """Pick the named data sets' prompts (registered names, `name:option`, or file paths) as the pipeline's
        evaluation does (`neurons.splits.pick_prompts`): the `split` ids (held-out: never identified or trained
        on), `limit_per_group` per language; harmful ids in `exclude_ids` (validation's) are left out.

        `languages` applies to every set, intersected with the languages each set has (a set with none
        of them is skipped); `mgsm_languages` / `xcopa_languages` override it for capability. Limits are per
        language: `limit` for every set unless a specific one is given (`benign_limit` also limits the contrast
        sets). XCOPA items come from every id (no stage trains on them). Contrast sets keep their benign records
        only (the safe requests that sound dangerous).
        """
        from neuroshield.neurons.splits import evaluation_pick, pick_prompts

        def lim(x: int | None) -> int | None:
            return x if x is not None else limit

        def pick(source: str, label: str, langs: Sequence[str] | None, n: int | None, part: str = split) -> list:
            return pick_prompts(source, label, langs, part, n, held_out_fraction=held_out_fraction, seed=seed)

        h = [r for s in harmful for r in evaluation_pick(s, languages, limit, split=split, exclude_ids=exclude_ids,
                                                         held_out_fraction=held_out_fraction, seed=seed)]
        b = [r for s in benign for r in pick(s, "benign", languages, lim(benign_limit))]
        c = [r for s in contrast for r in pick(s, "benign", languages, lim(benign_limit))]
        mg: list[PromptRecord] = []
        xc: list[PromptRecord] = []
        for task in capability:
            t = task.strip().lower()
            if t.split(":")[0] == "mgsm":
                mg += pick(task, "benign", mgsm_languages if mgsm_languages is not None else languages, lim(mgsm_limit))
            elif t.split(":")[0] == "xcopa":
                xc += pick(task, "benign", xcopa_languages if xcopa_languages is not None else languages,
                           lim(xcopa_limit), "all")
            else:
                raise ValueError(f"unknown capability task {task!r}: use mgsm and/or xcopa")
        return cls(h, b, c, mg, xc, {"harmful": list(harmful), "benign": list(benign), "contrast": list(contrast),
                                     "capability": list(capability)})

    def describe(self) -> dict[str, Any]:
        """Counts per role and language x modality, and a hash of each role's (id, language, text)."""
        out: dict[str, Any] = {"sources": self.sources}
        for role in (*SAFETY_ROLES, "mgsm", "xcopa"):
            recs: list[PromptRecord] = getattr(self, role)
            counts: dict[str, int] = {}
            for r in recs:
                k = f"{r.language}/{r.modality}"
                counts[k] = counts.get(k, 0) + 1
            h = hashlib.sha256()
            for r in recs:
                h.update(f"{r.id}\t{r.language}\t{r.modality}\t{r.text}\n".encode())
            out[role] = {"n": len(recs), "by_language_modality": counts, "sha256": h.hexdigest()[:16],
                         "datasets": sorted({r.source for r in recs if r.source})}
        return out


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Everything one evaluation measured; `save`/`load` round-trip through JSON."""

    tag: str
    model: dict[str, Any]
    patch: dict[str, Any] | None
    judge: dict[str, Any]
    safety: list[SafetyCell]
    capability: list[CapabilityCell]
    data: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    created: str = ""
    format: int = EVAL_FORMAT

    def asr(self, language: str, modality: str = "text") -> Rate | None:
        c = next((c for c in self.safety if (c.language, c.modality, c.role) == (language, modality, "harmful")), None)
        return c.asr if c else None

    def over_refusal(self, language: str, modality: str = "text") -> Rate | None:
        c = self.safety_cell(language, modality, "benign")
        return c.over_refusal if c else None

    def exaggerated_refusal(self, language: str, modality: str = "text") -> Rate | None:
        c = self.safety_cell(language, modality, "contrast")
        return c.exaggerated_refusal if c else None

    def invalid(self, language: str, modality: str = "text", role: str = "harmful") -> Rate | None:
        c = self.safety_cell(language, modality, role)
        return c.invalid if c else None

    def safety_cell(self, language: str, modality: str = "text", role: str = "harmful") -> SafetyCell | None:
        return next((c for c in self.safety if (c.language, c.modality, c.role) == (language, modality, role)), None)

    def accuracy(self, task: str, language: str) -> Rate | None:
        c = next((c for c in self.capability if (c.task, c.language) == (task, language)), None)
        return c.accuracy if c else None

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "kind": "neuroshield.eval", "tag": self.tag, "created": self.created,
                "model": self.model, "patch": self.patch, "judge": self.judge, "data": self.data,
                "settings": self.settings, "timings": self.timings, "skipped": self.skipped,
                "safety": [c.to_dict() for c in self.safety], "capability": [c.to_dict() for c in self.capability]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        return cls(
            tag=d.get("tag", ""), model=d.get("model", {}), patch=d.get("patch"), judge=d.get("judge", {}),
            safety=[SafetyCell.from_dict(c) for c in d.get("safety", [])],
            capability=[CapabilityCell.from_dict(c) for c in d.get("capability", [])],
            data=d.get("data", {}), settings=d.get("settings", {}), timings=d.get("timings", {}),
            skipped=d.get("skipped", []), created=d.get("created", ""), format=int(d.get("format", EVAL_FORMAT)),
        )

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{p}: not a readable eval.json ({err}); rerun `neuroshield evaluate`") from None

    def csv_rows(self) -> list[dict[str, Any]]:
        rows = []
        for c in self.safety:
            metrics = [("refusal_rate", c.refusal_rate)]
            metrics += [("asr", c.asr)] if c.asr else []
            metrics += [("over_refusal", c.over_refusal)] if c.over_refusal else []
            metrics += [("exaggerated_refusal", c.exaggerated_refusal)] if c.exaggerated_refusal else []
            metrics += [("invalid", c.invalid)] if c.invalid else []
            for name, r in metrics:
                rows.append({"tag": self.tag, "section": "safety", "set": c.role, "metric": name, "language": c.language,
                             "modality": c.modality, "n": r.n, "value": r.value, "lo": r.lo, "hi": r.hi, "by": c.judge})
        for c in self.capability:
            rows.append({"tag": self.tag, "section": "capability", "set": c.task, "metric": "accuracy",
                         "language": c.language, "modality": "text", "n": c.n, "value": c.accuracy.value,
                         "lo": c.accuracy.lo, "hi": c.accuracy.hi, "by": c.method})
            for k, v in c.extra.items():
                if isinstance(v, Rate):
                    rows.append({"tag": self.tag, "section": "capability", "set": c.task, "metric": k,
                                 "language": c.language, "modality": "text", "n": v.n, "value": v.value, "lo": v.lo,
                                 "hi": v.hi, "by": c.method})
        return rows

    def save_csv(self, path: str | Path) -> Path:
        p = Path(path)
        buf = io.StringIO()
        cols = ["tag", "section", "set", "metric", "language", "modality", "n", "value", "lo", "hi", "by"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in self.csv_rows():
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        return atomic_write_text(p, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# vLLM backend (the Hugging Face one is the cache's default)
# --------------------------------------------------------------------------------------------------


def _vllm_generator(loaded: Any) -> Generator:  # pragma: no cover - vLLM is not installed here
    """Greedy generation with vLLM on the model's local folder (same chat template as HF)."""
    try:
        import vllm
    except ImportError:
        raise RuntimeError("backend='vllm' needs the vllm package (pip install vllm); use backend='hf'") from None
    from neuroshield.models.chat import chat_messages

    folder = getattr(loaded.model.config, "_name_or_path", "") or getattr(loaded.model, "name_or_path", "")
    if not folder or not Path(folder).is_dir():
        raise RuntimeError(f"backend='vllm' needs the model as a local folder; {loaded.spec!r} resolved to {folder!r}")
    llm = vllm.LLM(model=str(folder), tokenizer=str(folder), dtype="auto", seed=0)
    tok = loaded.tokenizer

    def gen(records: list[Any], config: GenerationConfig, on_batch: Callable[[list[int], list[Generation]], None]
            ) -> None:
        images = [r for r in records if getattr(r, "image", None)]
        if images:
            raise RuntimeError(f"backend='vllm' sends text only, and {len(images)} prompts have images (first: "
                               f"{images[0].id}); use backend='hf' for image prompts")
        texts = [tok.apply_chat_template(chat_messages(r.text, system=config.system), tokenize=False,
                                         add_generation_prompt=True) for r in records]
        params = vllm.SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens)
        outs = [o.outputs[0] for o in llm.generate(texts, params)]
        on_batch(list(range(len(records))), [Generation(o.text, tuple(o.token_ids), o.finish_reason == "stop")
                                             for o in outs])

    return gen


# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------


def file_hash(path: str | Path) -> str:
    """sha256 (16 hex) of a file, or of a folder's files (names and contents)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


@contextmanager
def patched(loaded: Any, patch: str | Path | None) -> Iterator[Any]:
    """Apply a safety patch to `loaded` (a LoadedModel) for the duration of the block; reverted afterwards
    (bit-exactly, by `revert_patch`), even on error."""
    if patch is None:
        yield None
        return
    p = Path(patch)
    if not p.exists():
        raise FileNotFoundError(f"patch {p} not found; train writes it under <run>/train/<recipe>/")
    from neuroshield.train.patch import apply_patch, revert_patch

    meta = apply_patch(loaded, p)
    try:
        yield meta
    finally:
        revert_patch(loaded, p)


def patch_tag(patch: str | Path | None) -> str:
    if patch is None:
        return "base"
    p = Path(patch)
    stem = p.name.split(".")[0]
    return p.parent.name if stem in ("patch", "safety_patch", "safety-patch", "") else stem


# --------------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------------


class _CachedWork:
    """The generations and per-item values of one evaluation, through the generation cache (written batch by batch,
    so an interrupted evaluation resumes), behind one progress bar."""

    def __init__(self, loaded: Any, cache: GenerationCache, *, weights_key: str, patch_hash: str, chunk: int,
                 batch_size: int, system: str | None, backend: str, progress: bool) -> None:
        self.loaded, self.cache, self.weights_key, self.patch_hash = loaded, cache, weights_key, patch_hash
        self.chunk, self.batch_size, self.system, self.backend = chunk, batch_size, system, backend
        self._vllm: Generator | None = None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc="evaluate", unit="item")

    def _start(self, n: int, task: str) -> Callable[[int], None] | None:
        if self.bar is None:
            return None
        self.bar.total += n
        self.bar.set_postfix_str(task)
        return self.bar.update

    def generate(self, records: list[PromptRecord], task: str, max_new: int) -> list[str]:
        """Greedy responses to `records`, generated where the cache has none."""
        if self.backend == "vllm" and self._vllm is None:
            self._vllm = _vllm_generator(self.loaded)
        config = GenerationConfig(max_new_tokens=max_new, batch_size=self.batch_size, system=self.system)
        gens = cached_generate(self.loaded, records, config, self.cache, weights_key=self.weights_key,
                               variant=self.patch_hash, task=task, backend=self.backend, generator=self._vllm,
                               chunk=self.chunk, progress=False, desc=task, advance=self._start(len(records), task))
        return [g.text for g in gens]

    def values(self, records: list[PromptRecord], task: str, settings: str,
               compute: Callable[[list[PromptRecord]], list[Any]]) -> list[Any]:
        """`compute(records)` per record, computed where the cache has none."""
        return cached_values(records, compute, self.cache, weights_key=self.weights_key,  # type: ignore[arg-type]
                             variant=self.patch_hash, settings=settings, task=task, chunk=self.chunk,
                             advance=self._start(len(records), task))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _usable(loaded: Any, records: Sequence[PromptRecord], role: str, skipped: list[dict[str, str]]
            ) -> list[PromptRecord]:
    """`records` without the image prompts a text-only model cannot take (those are listed in `skipped`)."""
    multimodal = getattr(loaded, "processor", None) is not None
    keep = []
    images = []
    for r in records:
        if r.modality == "image" and not multimodal:
            images.append(r)
            skipped.append({"id": r.id, "language": r.language, "modality": r.modality, "role": role,
                            "reason": "image prompt on a text-only model"})
        else:
            keep.append(r)
    if images:
        msg = (f"{len(images)} {role} image prompt(s) skipped: {loaded.model_id} is a text-only model "
               "(image evaluation needs a vision-language model)")
        warnings.warn(msg, EvaluationWarning, stacklevel=3)
        log.warning(msg)
    return keep


def _safety_role(work: _CachedWork, judge_obj: Any, records: list[PromptRecord], role: str, max_new_tokens: int
                 ) -> tuple[list[Verdict], list[dict[str, Any]]]:
    """Verdicts and item rows of one safety role: the judge on greedy responses, or (a prompt-level judge such
    as logprob) on the prompts themselves."""
    langs = [r.language for r in records]
    if getattr(judge_obj, "requires_generation", True) and hasattr(judge_obj, "judge_batch"):
        responses = work.generate(records, "safety", max_new_tokens)
        results = judge_responses(judge_obj, responses, langs, prompts=[r.text for r in records])
        scores = [getattr(x, "score", None) for x in results]
        verdict = [result_verdict(x) for x in results]
        matched = [getattr(x, "matched", None) for x in results]
    else:  # prompt-level judge (logprob): no generation
        jinfo = judge_info(judge_obj)
        settings = f"judge:{judge_label(judge_obj)}:{fingerprint(jinfo)}"

        def compute(recs: list[PromptRecord]) -> list[Any]:
            res = judge_obj.judge_prompts([r.text for r in recs], [r.language for r in recs])
            return [{"verdict": result_verdict(x), "score": float(x.score), "matched": x.matched} for x in res]

        vals = work.values(records, "logprob-judge", settings, compute)
        verdict = [v.get("verdict") or ("refusal" if v["refused"] else "compliance") for v in vals]
        scores = [v.get("score") for v in vals]
        matched = [v.get("matched") for v in vals]
    verdicts, rows = [], []
    for r, vd, sc, m in zip(records, verdict, scores, matched):
        verdicts.append(Verdict(r.language, r.modality, role, vd, None if sc is None else float(sc)))
        rows.append({"section": "safety", "role": role, "id": r.id, "language": r.language, "modality": r.modality,
                     "source": r.source, "category": r.category, "verdict": vd, "score": sc, "matched": m})
    return verdicts, rows


def _xcopa(work: _CachedWork, loaded: Any, xc: list[PromptRecord], batch_size: int, n_resamples: int, seed: int
           ) -> tuple[list[CapabilityCell], list[dict[str, Any]]]:
    def xcompute(recs: list[PromptRecord]) -> list[Any]:
        lps, toks = xcopa_logprobs(loaded, recs, batch_size=batch_size)
        return [[a, b, ta, tb] for (a, b), (ta, tb) in zip(lps, toks)]

    vals = work.values(xc, "xcopa", "loglik:v1", xcompute)
    xitems = score_xcopa(xc, [(v[0], v[1]) for v in vals], [(int(v[2]), int(v[3])) for v in vals])
    rows = [{"section": "xcopa", "id": i.id, "language": i.language, "label": i.label, "predicted": i.predicted,
             "predicted_norm": i.predicted_norm, "correct": i.correct, "logprob": list(i.logprob)} for i in xitems]
    return xcopa_cells(xitems, n_resamples=n_resamples, seed=seed), rows


def evaluate(
    loaded: Any,
    suite: EvalSuite,
    *,
    patch: str | Path | None = None,
    judge: Any = EvaluateConfig().judge,
    out_dir: str | Path,
    batch_size: int = EvaluateConfig().batch_size,
    max_new_tokens: int = EvaluateConfig().max_new_tokens,
    mgsm_max_new_tokens: int = 256,
    backend: str = "hf",
    system: str | None = None,
    tag: str | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = PipelineConfig().seed,
    chunk_size: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate `loaded` (with `patch` applied, if given) on `suite`; see the module docstring.

    `judge`: `refusal-phrase` (default), `logprob`, a local classifier folder, or a judge object.
    `chunk_size`: prompts handed to the generator at once (default 32 x batch_size); every finished batch is
    written to the cache immediately.
    """
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend={backend!r}: use 'hf' or 'vllm'")
    if backend == "vllm" and patch is not None:
        raise ValueError("backend='vllm' evaluates checkpoints only: evaluate the merged checkpoint that training "
                         "writes (--model <run>/train/<recipe>/merged) instead of --patch, or use backend='hf'")
    if patch is not None and not Path(patch).is_file():
        raise FileNotFoundError(f"patch {patch} not found; training writes it as <run>/train/<recipe>/*.safetensors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    judge_obj = get_judge(judge, loaded)
    jinfo = judge_info(judge_obj)
    jlabel = judge_label(judge_obj)
    patch_hash = file_hash(patch) if patch is not None else "none"
    model_hash = loaded.config_hash
    weights_fp = weights_fingerprint(loaded.model)  # before any patch: the patch has its own hash
    cache = GenerationCache(out / CACHE_FILE)
    skipped: list[dict[str, str]] = []
    work = _CachedWork(loaded, cache, weights_key=model_key(loaded, weights_fp), patch_hash=patch_hash,
                       chunk=chunk_size or max(1, 32 * batch_size), batch_size=batch_size, system=system,
                       backend=backend, progress=progress)
    items: list[dict[str, Any]] = []
    verdicts: list[Verdict] = []
    capability: list[CapabilityCell] = []
    try:
        with patched(loaded, patch):
            t = time.perf_counter()
            for role in SAFETY_ROLES:
                records = _usable(loaded, getattr(suite, role), role, skipped)
                if records:
                    v, rows = _safety_role(work, judge_obj, records, role, max_new_tokens)
                    verdicts += v
                    items += rows
            timings["safety_s"] = round(time.perf_counter() - t, 2)
            mg = _usable(loaded, suite.mgsm, "mgsm", skipped)
            if mg:
                t = time.perf_counter()
                responses = work.generate([mgsm_prompt(r) for r in mg], "mgsm", mgsm_max_new_tokens)
                mitems = score_mgsm(mg, responses)
                capability += mgsm_cells(mitems, n_resamples=n_resamples, seed=seed)
                items += [{"section": "mgsm", "id": i.id, "language": i.language, "reference": i.reference,
                           "predicted": i.predicted, "correct": i.correct} for i in mitems]
                timings["mgsm_s"] = round(time.perf_counter() - t, 2)
            xc = _usable(loaded, suite.xcopa, "xcopa", skipped)
            if xc:
                t = time.perf_counter()
                cells, rows = _xcopa(work, loaded, xc, batch_size, n_resamples, seed)
                capability += cells
                items += rows
                timings["xcopa_s"] = round(time.perf_counter() - t, 2)
    finally:
        work.close()

    safety = safety_metrics(verdicts, judge=jlabel, n_resamples=n_resamples, seed=seed)
    timings["total_s"] = round(time.perf_counter() - start, 2)
    result = EvalResult(
        tag=tag or patch_tag(patch),
        model={"model_id": loaded.model_id, "spec": getattr(loaded, "spec", ""), "config_hash": model_hash,
               "weights_fingerprint": weights_fp,
               "dtype": dtype_name(loaded.model),
               "device": str(getattr(loaded, "device", "")), **{k: v for k, v in getattr(loaded, "info", {}).items()
                                                                 if isinstance(v, (str, int, float))}},
        patch=None if patch is None else {"path": str(patch), "sha256": patch_hash},
        judge=jinfo, safety=safety, capability=capability, data=suite.describe(),
        settings={"max_new_tokens": max_new_tokens, "mgsm_max_new_tokens": mgsm_max_new_tokens,
                  "batch_size": batch_size, "backend": backend, "decoding": "greedy", "system": system,
                  "n_resamples": n_resamples, "seed": seed, "ci": "percentile bootstrap 95 %"},
        timings=timings, skipped=skipped,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    result.timings["cache_hits"] = cache.hits
    result.timings["cache_misses"] = cache.misses
    result.save(out / "eval.json")
    result.save_csv(out / "eval.csv")
    _write_jsonl(out / "items.jsonl", items)
    log.info("evaluation written to %s (%.1f s)", out / "eval.json", timings["total_s"])
    return result


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


__all__ = ["EvalSuite", "EvalResult", "evaluate", "patched", "patch_tag", "file_hash",
           "EvaluationWarning"]
