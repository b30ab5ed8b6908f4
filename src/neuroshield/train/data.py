"""Training examples for neuron-only training: (prompt, response) pairs, tokenized, batched.

* Harmful prompts -> refusal responses: `neuroshield.data.templates.refusal_for(id, language)`
  (deterministic per prompt id, parallel across languages), or the record's own reference refusal
  (e.g. HarmBench `safe-responses`) when `use_references=True`.
* Benign prompts -> the base model's own answers (generated once, greedy, cached in a generation cache,
  `generate.cache`, keyed by the model's weights, the generation settings and the prompt; every finished
  batch is appended, so an interrupted generation resumes where it stopped), or reference outputs.
* Tokenized with `encode_chat(tokenizer, prompt, response=...)`; labels are -100 everywhere except on
  response tokens (the loss is on the response only). Batches are right-padded (attention mask 0 on the
  padding; right padding keeps the position ids of real tokens 0..n-1 without passing position ids).
* On a vision-language model every example goes through the processor (`vlm.encode_prompt`, image or
  not) and batches through `vlm.model_inputs` (left padding, the image tensors beside the ids), so a
  mixed batch of image and text examples trains in one step (`training_batch`).
* `ExampleStream` is the deterministic training order: a pure function of (seed, step), so resuming
  from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuroshield.data.records import PromptRecord
from neuroshield.models.chat import EncodedPrompt, encode_chat
from neuroshield.io import atomic_path, image_digest

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainExample:
    """One supervised pair. `response_source`: refusal-template | reference | self."""

    id: str
    language: str
    label: str  # harmful | benign
    prompt: str
    response: str
    response_source: str
    image: str | None = None  # path of the image the prompt refers to (modality "image")

    @property
    def modality(self) -> str:
        return "image" if self.image else "text"


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX outside the response
    prompt_len: int
    id: str
    language: str
    label: str
    # a VLM's full encoding (ids, image mask, token types, image source), batched by `vlm.model_inputs`
    multimodal: EncodedPrompt | None = field(default=None, compare=False, repr=False)

    @property
    def response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------


def refusal_examples(
    records: Sequence[PromptRecord], *, use_references: bool = False,
    refusal_fn: Callable[[str, str], str] | None = None,
) -> list[TrainExample]:
    """Harmful prompts paired with refusals (the record's reference when asked and present)."""
    if refusal_fn is None:
        from neuroshield.data.templates import refusal_for as refusal_fn  # noqa: N813
    out = []
    for r in records:
        if use_references and r.reference:
            out.append(TrainExample(r.id, r.language, "harmful", r.text, r.reference, "reference", r.image))
        else:
            out.append(TrainExample(r.id, r.language, "harmful", r.text, refusal_fn(r.id, r.language),
                                    "refusal-template", r.image))
    return out


def reference_examples(records: Sequence[PromptRecord]) -> list[TrainExample]:
    """Benign prompts paired with their reference outputs (records without one are skipped)."""
    out = [TrainExample(r.id, r.language, "benign", r.text, r.reference, "reference", r.image)
           for r in records if r.reference]
    if len(out) < len(records):
        log.warning("%d benign records have no reference output and were skipped", len(records) - len(out))
    return out


def self_answer_examples(
    loaded: Any, records: Sequence[PromptRecord], cache_path: str | Path, *, max_new_tokens: int = 128,
    batch_size: int = 8, system: str | None = None, weights_key: str | None = None, progress: bool = True,
    max_prompt_tokens: int | None = None, helpful_only: bool = True,
) -> list[TrainExample]:
    """Benign prompts paired with the base model's own greedy answers, cached in `cache_path` (JSONL).

    `helpful_only`: an answer the judge does not count as compliance (a refusal, an empty or degenerate
    answer) is replaced by the record's `reference` when it has one and dropped otherwise: the base model
    refuses many safe requests that sound dangerous, and training on its refusals would teach them.

    Call this before any training touches the model. `cache_path` is a generation cache (`generate.cache`):
    answers already in it (same model weights and dtype, same settings, same prompt) are reused; the others are
    generated in batches, each batch appended to the file as soon as it is done. Empty answers are dropped with
    a warning. `weights_key` overrides the model identity used in the key (default: `model_key(loaded)`).
    Prompts longer than `max_prompt_tokens` chat tokens are skipped with a warning (training would cut
    them anyway, and one very long prompt makes its whole generation batch as long).
    """
    path = Path(cache_path)
    if max_prompt_tokens is not None:
        keep = [r for r in records if len(encode_chat(loaded.tokenizer, r.text).input_ids) <= max_prompt_tokens]
        if len(keep) < len(records):
            log.warning("%d benign prompts are longer than %d tokens and were skipped",
                        len(records) - len(keep), max_prompt_tokens)
        records = keep
    from neuroshield.generate.cache import GenerationCache, cached_generate, model_key
    from neuroshield.generate.generation import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
    gens = cached_generate(loaded, list(records), cfg, GenerationCache(path),
                           weights_key=weights_key or model_key(loaded), task="benign-answers", progress=progress,
                           desc="benign answers")
    texts = [g.text.strip() for g in gens]
    helpful = _helpful(records, texts) if helpful_only else [bool(t) for t in texts]
    out, replaced, dropped = [], 0, 0
    for r, text, ok in zip(records, texts, helpful):
        if ok:
            out.append(TrainExample(r.id, r.language, "benign", r.text, text, "self", r.image))
        elif r.reference:  # the base model refused (or babbled): the written reference answer instead
            out.append(TrainExample(r.id, r.language, "benign", r.text, r.reference, "reference", r.image))
            replaced += 1
        else:
            dropped += 1
    if replaced or dropped:
        log.warning("%d of %d benign answers of the base model were refusals, empty or invalid: %d replaced by the "
                    "prompt's reference answer, %d dropped (a retain answer that refuses teaches refusal)",
                    replaced + dropped, len(records), replaced, dropped)
    return out


def _helpful(records: Sequence[PromptRecord], texts: Sequence[str]) -> list[bool]:
    """Whether each answer attempts the request (the default judge's verdict is `compliance`)."""
    from neuroshield.judges.registry import get_judge, judge_responses, result_verdict

    results = judge_responses(get_judge("refusal-phrase"), list(texts), [r.language for r in records],
                              prompts=[r.text for r in records])
    return [bool(t) and result_verdict(x) == "compliance"
            for t, x in zip(texts, results)]


# --------------------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------------------


def encode_example(tokenizer: Any, ex: TrainExample, max_length: int, system: str | None = None,
                   min_response_tokens: int = 16) -> EncodedExample:
    """Chat-encode prompt + response; labels only on the response (and its EOS).

    When too long, the response is cut first (to no less than `min_response_tokens`), then the start of
    the user's text (the chat template's tokens around it are kept).
    """
    enc = encode_chat(tokenizer, ex.prompt, response=ex.response, system=system)
    ids, p = list(enc.input_ids), enc.prompt_len
    if len(ids) > max_length:
        resp_keep = max(max_length - p, min(min_response_tokens, len(ids) - p))
        ids = ids[: p + resp_keep]
        if len(ids) > max_length:
            cut = len(ids) - max_length
            s, e = enc.user_span
            if cut >= e - s:
                raise ValueError(f"example {ex.id!r}: max_length={max_length} leaves no room for the prompt; raise it")
            ids = ids[:s] + ids[s + cut:]
            p -= cut
    labels = [IGNORE_INDEX] * p + ids[p:]
    if len(labels) == p:
        raise ValueError(f"example {ex.id!r}: empty response")
    return EncodedExample(tuple(ids), tuple(labels), p, ex.id, ex.language, ex.label)


def encode_multimodal_example(loaded: Any, ex: TrainExample, max_length: int, system: str | None = None,
                              min_response_tokens: int = 16) -> EncodedExample:
    """As `encode_example`, through a VLM's processor. `max_length` counts text tokens (image tokens come on
    top and are never cut): the response is cut first, then the start of the user's text."""
    from neuroshield.models.vlm import encode_prompt

    full = encode_prompt(loaded, ex.prompt, ex.image, ex.response, system=system)
    p = full.prompt_len
    prompt_text = p - sum(full.image_mask or ())
    resp = len(full.input_ids) - p
    resp_keep = resp if prompt_text + resp <= max_length else min(resp, max(min_response_tokens, max_length - prompt_text))
    if prompt_text + resp_keep > max_length:
        # still too long: the processor cuts the start of the user's text (its max_length counts the whole
        # text, response included, so allow for the response tokens cut off below)
        full = encode_prompt(loaded, ex.prompt, ex.image, ex.response, system=system,
                             max_length=max_length + (resp - resp_keep))
        p = full.prompt_len
    keep = p + resp_keep
    enc = _cut_multimodal(full, keep)
    labels = [IGNORE_INDEX] * p + list(enc.input_ids[p:])
    if len(labels) == p:
        raise ValueError(f"example {ex.id!r}: empty response")
    return EncodedExample(enc.input_ids, tuple(labels), p, ex.id, ex.language, ex.label, multimodal=enc)


def _cut_multimodal(enc: EncodedPrompt, keep: int) -> EncodedPrompt:
    """The first `keep` tokens of a (multimodal) encoding; every token-aligned field is cut alike."""
    if keep >= len(enc.input_ids):
        return enc
    changes: dict[str, Any] = {"input_ids": enc.input_ids[:keep]}
    if enc.image_mask is not None:
        changes["image_mask"] = enc.image_mask[:keep]
    if hasattr(enc, "token_types"):
        changes["token_types"] = tuple((k, v[:keep]) for k, v in enc.token_types)  # type: ignore[attr-defined]
    return dataclasses.replace(enc, **changes)


def encode_examples(loaded: Any, examples: Sequence[TrainExample], max_length: int,
                    system: str | None = None) -> list[EncodedExample]:
    """Encode every example for `loaded` (a text model: `encode_example`; a VLM: `encode_multimodal_example`)."""
    if getattr(loaded.adapter, "multimodal", False):
        return [encode_multimodal_example(loaded, ex, max_length, system) for ex in examples]
    images = [ex for ex in examples if ex.image]
    if images:
        raise ValueError(f"{len(images)} training examples with images (first: {images[0].id} in "
                         f"{images[0].language}) for the text model {loaded.model_id!r}: use a vision-language "
                         "model, or leave image records out of the training data")
    return [encode_example(loaded.tokenizer, ex, max_length, system) for ex in examples]


def collate_examples(encoded: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: `input_ids`, `attention_mask`, `labels` (IGNORE_INDEX on padding)."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    att = torch.zeros((len(encoded), width), dtype=torch.long)
    lab = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        att[row, :n] = 1
        lab[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def training_batch(loaded: Any, encoded: Sequence[EncodedExample], device: torch.device | str | None = None
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model keyword arguments on `device`, labels [B, T] on the CPU) for one micro-batch.

    Text models: right-padded `collate_examples`. VLMs: `vlm.model_inputs` (left padding, image tensors) and
    labels on the response tokens of each row."""
    if encoded and encoded[0].multimodal is not None:
        from neuroshield.models.vlm import model_inputs, response_labels

        prompts = [e.multimodal for e in encoded]
        if any(p is None for p in prompts):
            raise ValueError("a batch mixes multimodal and text-only encodings; encode all with `encode_examples`")
        batch, inputs = model_inputs(loaded, prompts, device=device)  # type: ignore[arg-type]
        return inputs, response_labels(batch, prompts)  # type: ignore[arg-type]
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batch = collate_examples(encoded, pad_id)
    labels = batch.pop("labels")
    return {k: v.to(device) if device is not None else v for k, v in batch.items()}, labels


class ExampleStream:
    """Deterministic infinite order over harmful and benign examples, mixed at `benign_fraction`.

    Example j of the stream is benign iff floor((j+1)·f) > floor(j·f); each kind cycles through its own
    seeded permutations, one per epoch. `take(start, n)` is a pure function of its arguments.
    """

    def __init__(self, harmful: Sequence[Any], benign: Sequence[Any], benign_fraction: float = 0.5,
                 seed: int = 0) -> None:
        if not harmful and not benign:
            raise ValueError("no training examples: both the harmful and the benign lists are empty")
        if not 0.0 <= benign_fraction <= 1.0:
            raise ValueError(f"benign_fraction must be in [0, 1], got {benign_fraction}")
        if not benign:
            benign_fraction = 0.0
        if not harmful:
            benign_fraction = 1.0
        self.harmful, self.benign, self.fraction, self.seed = list(harmful), list(benign), benign_fraction, seed
        self._perms: dict[tuple[int, int], list[int]] = {}

    def _item(self, kind: int, k: int) -> Any:
        items = self.benign if kind else self.harmful
        epoch, pos = divmod(k, len(items))
        key = (kind, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + kind * 7919 + epoch)
            self._perms[key] = torch.randperm(len(items), generator=g).tolist()
            if len(self._perms) > 8:  # keep memory flat on long runs
                self._perms.pop(next(iter(self._perms)))
        return items[self._perms[key][pos]]

    def __getitem__(self, j: int) -> Any:
        f = self.fraction
        n_benign_before = math.floor(j * f + 1e-9)
        is_benign = math.floor((j + 1) * f + 1e-9) > n_benign_before
        return self._item(1, n_benign_before) if is_benign else self._item(0, j - n_benign_before)

    def take(self, start: int, n: int) -> list[Any]:
        return [self[j] for j in range(start, start + n)]


def data_fingerprint(harmful: Sequence[EncodedExample], benign: Sequence[EncodedExample]) -> str:
    h = hashlib.sha256()
    for e in list(harmful) + list(benign):
        images = list(getattr(e.multimodal, "images", ()) or ()) if e.multimodal is not None else []
        h.update(json.dumps([e.id, e.language, e.label, list(e.input_ids), e.prompt_len,
                             [image_digest(str(i)) if isinstance(i, (str, os.PathLike)) else "in-memory"
                              for i in images]]).encode())
    return h.hexdigest()[:16]


def example_summary(examples: Sequence[TrainExample]) -> dict[str, Any]:
    by: dict[str, int] = {}
    for ex in examples:
        k = f"{ex.language}/{ex.modality}/{ex.label}/{ex.response_source}"
        by[k] = by.get(k, 0) + 1
    return {"examples": len(examples), "by_language_label_source": dict(sorted(by.items()))}


def write_examples(path: str | Path, examples: Sequence[TrainExample]) -> None:
    """The training pairs as JSONL (written to a temporary name, then renamed)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")


__all__ = [
    "IGNORE_INDEX", "TrainExample", "EncodedExample", "refusal_examples", "reference_examples",
    "self_answer_examples", "encode_example", "encode_multimodal_example", "encode_examples",
    "collate_examples", "training_batch",
    "ExampleStream", "data_fingerprint", "example_summary", "write_examples",
]
