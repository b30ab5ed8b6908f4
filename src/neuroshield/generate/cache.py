"""The one generation cache: an append-only JSONL file of answers (and per-prompt values), one key scheme.

Evaluation (`<eval out>/generations.jsonl`), validation (`<cache_dir>/generations.jsonl`; the pipeline shares
`<run>/generations/`) and training (the base model's benign answers, `benign_answers.jsonl`) all cache through
here:

* `model_key(loaded)`: the model's identity: config hash, weights fingerprint (`io.weights_fingerprint`) and dtype.
  Compute it once per model state, before a patch or an intervention is applied (those have their own
  `variant`).
* `cache_key(model, variant, settings, prompt)`: THE key. `variant` names what changes the model
  on the fly ("none", a patch's hash, an intervention's fingerprint), `settings` the decoding
  (`generation_settings(config)`: `GenerationConfig.key()` and the backend) or the computation of a value;
  the prompt contributes its id, language, modality and a hash of its text and image bytes.
* `GenerationCache(path)`: the store. Each `put` appends its entries, flushes and fsyncs; a torn last line (a
  run killed mid-write) is ignored when read and the next write starts on a fresh line.
* `cached_generate(loaded, prompts, config, cache, weights_key=...)`: the answers (`Generation`s) in input order,
  generating only the missing ones; each finished batch is written at once (through `generate`'s `on_batch`),
  so an interrupted run resumes where it stopped.
* `cached_values(...)`: the same for a per-prompt value computed in chunks (log-likelihoods, prompt-level
  judges).

Entries written by the earlier, separate caches (before this module) have other keys: they are ignored and
their prompts generated once more.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from neuroshield.data.records import PromptRecord
from neuroshield.generate import generation
from neuroshield.generate.generation import Generation, GenerationConfig
from neuroshield.io import fingerprint, image_digest, raise_output_errors, weights_fingerprint
from neuroshield.models.loaded import dtype_name

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 1: the three separate caches of evaluate, validate and train
CACHE_FILE = "generations.jsonl"

Prompt = str | PromptRecord
# (prompts, config, on_batch): answers `prompts`, calling on_batch(indices into prompts, generations) per batch
Generator = Callable[[list[Prompt], GenerationConfig, Callable[[list[int], list[Generation]], None]], None]


def model_key(loaded: Any, weights: str | None = None) -> str:
    """The model's identity in cache keys: config hash, weights fingerprint and dtype (same architecture with other
    weights, or the same weights in another dtype, never share answers). `weights`: the model's
    `weights_fingerprint`, when the caller has it already."""
    return fingerprint({"config_hash": loaded.config_hash, "weights": weights or weights_fingerprint(loaded.model),
                        "dtype": dtype_name(loaded.model)})


def generation_settings(config: GenerationConfig, backend: str = "hf") -> str:
    """The `settings` part of a generation's key: everything that changes the text (`GenerationConfig.key()`,
    not the batch size) and the backend. `:max<N>:` stays readable for scripts that pick an evaluation's
    answers by length."""
    return f"gen:max{config.max_new_tokens}:{fingerprint(config.key())}:{backend}"


def _prompt_fields(prompt: Prompt) -> tuple[str, str, str, str, str]:
    """(id, language, modality, text, image digest) of a record or a bare string."""
    if isinstance(prompt, str):
        return "", "", "text", prompt, ""
    return prompt.id, prompt.language, prompt.modality, prompt.text, image_digest(prompt.image)


def cache_key(model: str, variant: str, settings: str, prompt: Prompt) -> str:
    """The one cache key: (model identity, patch / intervention, settings, prompt id, language, modality, hash of
    the prompt's text and image bytes). Which stage asked (the entry's `task`) is not part of it: stages share
    answers."""
    pid, language, modality, text, image = _prompt_fields(prompt)
    text_hash = fingerprint([text, image], n=16, ascii=False)
    return fingerprint([CACHE_FORMAT, model, variant, settings, pid, language, modality, text_hash], n=32)


class GenerationCache:
    """Append-only JSONL store of entries `{"key": ..., ...}`; the last entry of a key wins.

    A line that cannot be read (a write cut short) is ignored and its prompt computed again. `hits` / `misses`
    count `get`s.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        if not self.path.is_file():
            return
        bad = 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                    self.entries[e["key"]] = e
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad += 1
        if bad:
            log.warning("%s: %d unreadable line(s) ignored (an interrupted write); they are recomputed", self.path, bad)

    def get(self, key: str) -> dict[str, Any] | None:
        e = self.entries.get(key)
        if e is None:
            self.misses += 1
        else:
            self.hits += 1
        return e

    def put(self, entries: Sequence[dict[str, Any]]) -> None:
        """Append `entries` (each with a "key"), flushed and fsynced before returning."""
        if not entries:
            return
        with raise_output_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                if f.tell() > 0:  # an interrupted write may have left a partial line: start on a fresh one
                    with open(self.path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            f.write("\n")
                for e in entries:
                    f.write(json.dumps(e, ensure_ascii=False) + "\n")
                    self.entries[e["key"]] = e
                f.flush()
                os.fsync(f.fileno())


def _entry(key: str, prompt: Prompt, task: str, model: str, variant: str, settings: str, **fields: Any) -> dict:
    pid, language, modality, _, _ = _prompt_fields(prompt)
    return {"key": key, "task": task, "id": pid, "language": language, "modality": modality, "model": model,
            "variant": variant, "settings": settings, **fields}


def _lookup(cache: GenerationCache, keys: list[str], field: str) -> tuple[list[Any], list[int]]:
    """(cached values or None, indices of the first prompt of each missing key)."""
    values: list[Any] = []
    todo: list[int] = []
    first: set[str] = set()
    for i, k in enumerate(keys):
        e = cache.get(k)
        values.append(None if e is None else e.get(field))
        if values[-1] is None and k not in first:
            first.add(k)
            todo.append(i)
    return values, todo


def _hf_generator(loaded: Any, progress: bool, desc: str) -> Generator:
    def gen(prompts: list[Prompt], config: GenerationConfig,
            on_batch: Callable[[list[int], list[Generation]], None]) -> None:
        # through the module, so that a stand-in for `generation.generate` (tests) is used
        generation.generate(loaded, prompts, config, progress=progress, desc=desc, on_batch=on_batch)

    return gen


def cached_generate(
    loaded: Any,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    cache: GenerationCache,
    *,
    weights_key: str,
    variant: str = "none",
    task: str = "generate",
    backend: str = "hf",
    context: Callable[[], Any] = nullcontext,
    generator: Generator | None = None,
    chunk: int | None = None,
    progress: bool = True,
    desc: str = "generate",
    advance: Callable[[int], None] | None = None,
) -> list[Generation]:
    """The answers to `prompts` in input order: cached ones read, the others generated under `context()` and
    appended to `cache` batch by batch.

    `weights_key`: `model_key(loaded)` of the model before any patch or intervention; `variant`: what is applied on top
    ("none", a patch hash, an intervention fingerprint). `generator` replaces the Hugging Face path (e.g. vLLM);
    `chunk` hands the missing prompts to it `chunk` at a time; `advance(n)` is told how many prompts are done
    (the cached ones first, then per batch). Prompts with the same key are generated once.
    """
    settings = generation_settings(config, backend)
    keys = [cache_key(weights_key, variant, settings, p) for p in prompts]
    texts, todo = _lookup(cache, keys, "response")
    found: dict[str, Generation] = {}
    for k, text in zip(keys, texts):
        if text is not None:
            e = cache.entries[k]
            found[k] = Generation(text, tuple(e.get("token_ids") or ()), bool(e.get("finished", True)))
    copies = Counter(keys)
    if advance is not None:
        advance(sum(k in found for k in keys))
    if todo:
        log.info("%s: generating %d of %d prompts (%d cached in %s)", desc, len(todo), len(keys),
                 len(keys) - len(todo), cache.path)
        gen = generator or _hf_generator(loaded, progress, desc)
        step = chunk or len(todo)
        with context():
            for s in range(0, len(todo), step):
                idx = todo[s: s + step]

                def on_batch(local: list[int], gens: list[Generation], idx: list[int] = idx) -> None:
                    entries = []
                    for j, g in zip(local, gens):
                        i = idx[j]
                        found[keys[i]] = g
                        entries.append(_entry(keys[i], prompts[i], task, weights_key, variant, settings,
                                              response=g.text, token_ids=list(g.token_ids), finished=g.finished))
                    cache.put(entries)  # written as soon as the batch is done: an interrupted run resumes here
                    if advance is not None:
                        advance(sum(copies[keys[idx[j]]] for j in local))

                gen([prompts[i] for i in idx], config, on_batch)
                missing = [i for i in idx if keys[i] not in found]
                if missing:
                    raise RuntimeError(f"the generator returned no answer for {len(missing)} prompt(s), e.g. "
                                       f"{_prompt_fields(prompts[missing[0]])[0] or prompts[missing[0]]!r}")
    return [found[k] for k in keys]


def cached_values(
    prompts: Sequence[Prompt],
    compute: Callable[[list[Prompt]], list[Any]],
    cache: GenerationCache,
    *,
    weights_key: str,
    variant: str = "none",
    settings: str,
    task: str,
    chunk: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[Any]:
    """`compute(prompts)` per prompt (JSON-able values), computed `chunk` prompts at a time where `cache` has none,
    each chunk appended as it is done; same key scheme as `cached_generate` with `settings` naming the
    computation."""
    keys = [cache_key(weights_key, variant, settings, p) for p in prompts]
    values, todo = _lookup(cache, keys, "value")
    copies = Counter(keys)
    if advance is not None:
        advance(len(keys) - sum(v is None for v in values))
    step = chunk or max(1, len(todo))
    for s in range(0, len(todo), step):
        idx = todo[s: s + step]
        got = compute([prompts[i] for i in idx])
        cache.put([_entry(keys[i], prompts[i], task, weights_key, variant, settings, value=v)
                   for i, v in zip(idx, got)])
        by_key = {keys[i]: v for i, v in zip(idx, got)}
        values = [by_key.get(k, v) if v is None else v for k, v in zip(keys, values)]
        if advance is not None:
            advance(sum(copies[keys[i]] for i in idx))
    return values


__all__ = ["GenerationCache", "cached_generate", "cached_values", "cache_key", "model_key", "generation_settings",
           "CACHE_FILE", "CACHE_FORMAT"]
