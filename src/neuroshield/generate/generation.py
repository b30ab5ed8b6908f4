"""Batched generation and teacher-forced scoring: the one way every stage runs a model on prompts.

* `generate_responses(loaded, prompts)` answers chat prompts (strings or `PromptRecord`s) in batches:
  chat template (`encode_chat`, or the VLLM processor for image records), left padding (`collate`),
  batches sorted by length (`batches_by_length`), KV cache on, outputs in input order. Decoding is
  plain: greedy by default, and the model's own generation defaults (repetition penalty, top-k/top-p)
  are NOT inherited, so numbers are comparable across models and runs.
* `generate(...)` does the same and returns `Generation`s (text plus the generated token ids), with an
  `on_batch` callback so that a caller can write finished work as it goes (resumable runs).
* `response_logprobs(loaded, prompts, responses)`: summed log-probability of each response given its
  prompt (teacher forcing). Responses may be strings (tokenized without special tokens, as
  `encode_chat` appends them) or token-id sequences (e.g. `Generation.token_ids`, exactly as generated).
* `response_divergence(loaded, prompts, responses, conditions)`: per prompt, KL(reference || condition)
  of the next-token distribution summed over the response positions, and the response's NLL under the
  reference and under each condition, with the reference forward computed once per batch. A condition
  is a zero-argument callable returning a context manager (e.g. `lambda: intervene(loaded, s, "zero")`).
* `next_token_distributions(...)`: log-probabilities of the next token at the last prompt position (or
  at every response position); memory is positions x vocabulary, so use it on a few prompts only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig

from neuroshield.data.records import PromptRecord
from neuroshield.models.chat import EncodedPrompt, batches_by_length, collate, encode_chat
from neuroshield.models.loading import LoadedModel

@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; `key()` is what a generation cache must be keyed on."""

    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    system: str | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 when sampling (do_sample=True)")

    def key(self) -> dict[str, Any]:
        """Settings that change the generated text (batch size does not, for greedy decoding)."""
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        if not self.do_sample:
            d.pop("temperature")
            d.pop("seed")
        return d


@dataclass(frozen=True)
class Generation:
    """One answer: decoded text (special tokens removed) and the generated ids.

    `token_ids` stop after the first end-of-sequence token (included) when `finished`; otherwise they
    are the `max_new_tokens` generated ids.
    """

    text: str
    token_ids: tuple[int, ...]
    finished: bool


# --------------------------------------------------------------------------------------------------
# Encoding (text models through encode_chat; VLLMs and image records through models.vlm when present)
# --------------------------------------------------------------------------------------------------


def _vlm() -> Any:
    try:
        from neuroshield.models import vlm
    except ImportError:  # vision-language support not installed in this build
        return None
    return vlm


def encode_item(loaded: LoadedModel, item: str | PromptRecord, system: str | None = None) -> EncodedPrompt:
    """Chat-encode a string or a `PromptRecord` (image records need a vision-language model)."""
    vlm = _vlm()
    if isinstance(item, str):
        if vlm is not None:
            return vlm.encode_prompt(loaded, item, system=system)
        return encode_chat(loaded.tokenizer, item, system=system)
    if not hasattr(item, "text"):
        raise TypeError(f"prompts must be strings or PromptRecords, got {type(item).__name__}")
    if vlm is not None:
        return vlm.encode_record(loaded, item, system=system)
    if getattr(item, "modality", "text") == "image":
        raise ValueError(f"record {item.id!r} has modality 'image': this build cannot feed images to a model")
    return encode_chat(loaded.tokenizer, item.text, system=system)


def _pad_id(loaded: LoadedModel) -> int:
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer of {loaded.model_id!r} has neither a pad nor an EOS token; set one")
    return int(pad)


def model_inputs(loaded: LoadedModel, encoded: Sequence[EncodedPrompt]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Left-padded (Batch, model kwargs on the model's device)."""
    vlm = _vlm()
    if vlm is not None:
        return vlm.model_inputs(loaded, list(encoded))
    batch = collate(list(encoded), _pad_id(loaded))
    dev = loaded.device
    return batch, {"input_ids": batch.input_ids.to(dev), "attention_mask": batch.attention_mask.to(dev)}


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """End-of-sequence ids: the model's generation config's plus the tokenizer's (end of turn)."""
    ids: list[int] = []
    gc = getattr(loaded.model, "generation_config", None)
    cfg_eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    for value in ([cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos or [])) + [loaded.tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def _hf_config(loaded: LoadedModel, cfg: GenerationConfig) -> HFGenerationConfig:
    eos = eos_token_ids(loaded)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, num_beams=1, use_cache=True,
        pad_token_id=_pad_id(loaded), repetition_penalty=1.0,
    )
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_k=0, top_p=1.0)
    if cfg.stop_at_eos:
        kwargs["eos_token_id"] = eos
    else:
        kwargs["eos_token_id"] = None
    return HFGenerationConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_default_eos(model: Any, active: bool) -> Iterator[None]:
    """generate() fills an unset eos_token_id from the model's generation config; hide it while active."""
    gc = getattr(model, "generation_config", None)
    if not active or gc is None:
        yield
        return
    saved = gc.eos_token_id
    gc.eos_token_id = None
    try:
        yield
    finally:
        gc.eos_token_id = saved


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[str | PromptRecord],
    config: GenerationConfig | None = None,
    *,
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[list[int], list[Generation]], None] | None = None,
) -> list[Generation]:
    """Answer every prompt; results in input order. `on_batch(indices, generations)` after each batch."""
    cfg = config or GenerationConfig()
    if not prompts:
        return []
    encoded = [encode_item(loaded, p, cfg.system) for p in prompts]
    hf_cfg = _hf_config(loaded, cfg)
    eos = set(eos_token_ids(loaded)) if cfg.stop_at_eos else set()
    tok = loaded.tokenizer
    results: list[Generation | None] = [None] * len(prompts)
    model = loaded.model
    was_training = model.training
    model.eval()
    contiguous = _contiguous_head_input(model)
    try:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
            for b, idx in enumerate(batches_by_length(encoded, cfg.batch_size)):
                batch, inputs = model_inputs(loaded, [encoded[i] for i in idx])
                width = inputs["input_ids"].shape[1]
                rng = torch.random.fork_rng(devices=[loaded.device] if loaded.device.type == "cuda" else [])
                with rng, _no_default_eos(model, not cfg.stop_at_eos):
                    if cfg.do_sample:
                        torch.manual_seed(cfg.seed * 1_000_003 + b)
                    out = model.generate(**inputs, generation_config=hf_cfg)
                new = out[:, width:].tolist()
                done: list[Generation] = []
                for row in new:
                    cut, finished = len(row), False
                    for j, t in enumerate(row):
                        if t in eos:
                            cut, finished = j + 1, True
                            break
                    ids = tuple(int(t) for t in row[:cut])
                    text = tok.decode(list(ids), skip_special_tokens=True)
                    done.append(Generation(text=text, token_ids=ids, finished=finished))
                for i, g in zip(idx, done):
                    results[i] = g
                if on_batch is not None:
                    on_batch(list(idx), done)
                bar.update(len(idx))
    finally:
        model.train(was_training)
        if contiguous is not None:
            contiguous.remove()
    return [r for r in results if r is not None]


def _contiguous_head_input(model: Any) -> Any:
    """A pre-hook that hands the output head a contiguous input (removed by the caller).

    At the prefill step transformers gives the head the last position of every row, a strided view; with frozen
    weights (requires_grad=False: every trained or patched model) PyTorch's CPU matmul then expands the head's
    weight to the batch (a [B, hidden, vocab] copy, 2.2 GB for a batch of 8 here) instead of one matrix product:
    measured 10x slower generation in bfloat16 on the default model. A contiguous input takes the fast path.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def generate_responses(
    loaded: LoadedModel,
    records_or_texts: Sequence[str | PromptRecord],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    system: str | None = None,
    progress: bool = True,
    stop_at_eos: bool = True,
) -> list[str]:
    """Answer chat prompts in batches (greedy by default); the answers' text, in input order."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
                           temperature=temperature, seed=seed, system=system, stop_at_eos=stop_at_eos)
    return [g.text for g in generate(loaded, records_or_texts, cfg, progress=progress)]


# --------------------------------------------------------------------------------------------------
# Teacher forcing
# --------------------------------------------------------------------------------------------------

def _response_ids(loaded: LoadedModel, response: str | Sequence[int], include_eos: bool) -> tuple[int, ...]:
    if isinstance(response, str):
        ids = list(loaded.tokenizer(response, add_special_tokens=False)["input_ids"])
        if include_eos and loaded.tokenizer.eos_token_id is not None:
            ids.append(int(loaded.tokenizer.eos_token_id))
        return tuple(ids)
    return tuple(int(t) for t in response)


def append_response(encoded: EncodedPrompt, ids: Sequence[int]) -> EncodedPrompt:
    """`encoded` followed by response token ids (token-aligned extras of VLLM prompts padded with 0)."""
    if len(encoded.input_ids) != encoded.prompt_len:
        raise ValueError("append_response expects a prompt without a response")
    extra = len(ids)
    changes: dict[str, Any] = {"input_ids": tuple(encoded.input_ids) + tuple(int(i) for i in ids)}
    if encoded.image_mask is not None:
        changes["image_mask"] = tuple(encoded.image_mask) + (False,) * extra
    token_types = getattr(encoded, "token_types", None)
    if token_types:
        changes["token_types"] = tuple((k, tuple(v) + (0,) * extra) for k, v in token_types)
    return dataclasses.replace(encoded, **changes)


@dataclass
class _ScoredBatch:
    indices: list[int]
    inputs: dict[str, torch.Tensor]
    positions: torch.Tensor  # [N, 2] (row, t): the logits at t predict response token t+1
    targets: torch.Tensor  # [N] the response tokens
    counts: list[int]  # response tokens per row (in `indices` order)


def _scored_batches(
    loaded: LoadedModel, prompts: Sequence[str | PromptRecord], responses: Sequence[str | Sequence[int]],
    batch_size: int, system: str | None, include_eos: bool,
) -> Iterator[_ScoredBatch]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: give one response per prompt")
    encoded = [append_response(encode_item(loaded, p, system), _response_ids(loaded, r, include_eos))
               for p, r in zip(prompts, responses)]
    for idx in batches_by_length(encoded, batch_size):
        rows = [encoded[i] for i in idx]
        batch, inputs = model_inputs(loaded, rows)
        pos, tgt, counts = [], [], []
        for r, (e, pad) in enumerate(zip(rows, batch.pad_left)):
            n = len(e.input_ids) - e.prompt_len
            counts.append(n)
            for k in range(n):
                pos.append((r, pad + e.prompt_len - 1 + k))
                tgt.append(e.input_ids[e.prompt_len + k])
        dev = loaded.device
        yield _ScoredBatch(list(idx), inputs, torch.tensor(pos, dtype=torch.long, device=dev).reshape(-1, 2),
                           torch.tensor(tgt, dtype=torch.long, device=dev), counts)


def _logprobs_at(loaded: LoadedModel, sb: _ScoredBatch) -> torch.Tensor:
    """[N, V] float32 log-probabilities at the scored positions."""
    width = sb.inputs["input_ids"].shape[1]
    if sb.positions.numel() == 0:
        return torch.empty((0, 0))
    first = int(sb.positions[:, 1].min())
    logits = _forward_logits(loaded, sb.inputs, width - first)
    picked = logits[sb.positions[:, 0], sb.positions[:, 1] - (width - logits.shape[1])]
    return torch.log_softmax(picked.float(), dim=-1)


def _forward_logits(loaded: LoadedModel, inputs: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions (left padding puts every response there): the LM head runs only
    on those (`logits_to_keep`), which matters with large vocabularies; all positions if unsupported."""
    try:
        return loaded.model(**inputs, use_cache=False, logits_to_keep=keep).logits
    except TypeError:
        return loaded.model(**inputs, use_cache=False).logits


def _split_sum(values: torch.Tensor, counts: list[int]) -> list[float]:
    out, start = [], 0
    for n in counts:
        out.append(float(values[start:start + n].double().sum()) if n else 0.0)
        start += n
    return out


@torch.no_grad()
def response_token_logprobs(
    loaded: LoadedModel, prompts: Sequence[str | PromptRecord], responses: Sequence[str | Sequence[int]],
    batch_size: int = 8, *, system: str | None = None, include_eos: bool = False, progress: bool = False,
) -> list[torch.Tensor]:
    """Per prompt, the log-probability of each response token given the prompt and earlier tokens."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="score", unit="prompt", disable=not progress, leave=False) as bar:
        for sb in _scored_batches(loaded, prompts, responses, batch_size, system, include_eos):
            lp = _logprobs_at(loaded, sb).gather(1, sb.targets[:, None])[:, 0].cpu()
            start = 0
            for i, n in zip(sb.indices, sb.counts):
                out[i] = lp[start:start + n]
                start += n
            bar.update(len(sb.indices))
    return [t if t is not None else torch.empty(0) for t in out]


def response_logprobs(
    loaded: LoadedModel, prompts: Sequence[str | PromptRecord], responses: Sequence[str | Sequence[int]],
    batch_size: int = 8, *, system: str | None = None, include_eos: bool = False, progress: bool = False,
) -> list[float]:
    """Summed log-probability of each response given its prompt (teacher forcing, chat-formatted).

    String responses are tokenized without special tokens (an EOS is appended when `include_eos`);
    id sequences are scored as given. An empty response scores 0.
    """
    per_token = response_token_logprobs(loaded, prompts, responses, batch_size, system=system,
                                        include_eos=include_eos, progress=progress)
    return [float(t.double().sum()) for t in per_token]


@dataclass
class Divergence:
    """Teacher-forced comparison of one prompt's response under a condition and under the reference."""

    tokens: int  # response tokens scored
    kl_sum: float  # sum over response positions of KL(reference || condition), nats
    kl_first: float  # KL at the first response position (the first token's distribution)
    nll: float  # -log p(response) under the condition
    reference_nll: float  # -log p(response) under the reference

    @property
    def kl_mean(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else 0.0


ContextFactory = Callable[[], ContextManager[Any]]


@torch.no_grad()
def response_divergence(
    loaded: LoadedModel,
    prompts: Sequence[str | PromptRecord],
    responses: Sequence[str | Sequence[int]],
    conditions: Mapping[str, ContextFactory],
    *,
    reference: ContextFactory | None = None,
    batch_size: int = 8,
    system: str | None = None,
    include_eos: bool = False,
    progress: bool = True,
) -> dict[str, list[Divergence]]:
    """For each condition, per prompt: KL(reference || condition) over the response positions and NLLs.

    The reference (default: the model as is) runs once per batch; each condition runs inside its context.
    """
    results: dict[str, list[Divergence | None]] = {name: [None] * len(prompts) for name in conditions}
    ref_ctx = reference or contextlib.nullcontext
    with tqdm(total=len(prompts), desc="divergence", unit="prompt", disable=not progress, leave=False) as bar:
        for sb in _scored_batches(loaded, prompts, responses, batch_size, system, include_eos):
            with ref_ctx():
                ref = _logprobs_at(loaded, sb)
            ref_nll = _split_sum(-ref.gather(1, sb.targets[:, None])[:, 0], sb.counts)
            firsts = _first_positions(sb.counts)
            for name, factory in conditions.items():
                with factory():
                    cur = _logprobs_at(loaded, sb)
                kl = (ref.exp() * (ref - cur)).sum(-1).clamp_min(0.0)
                kl_sums = _split_sum(kl, sb.counts)
                nll = _split_sum(-cur.gather(1, sb.targets[:, None])[:, 0], sb.counts)
                for r, i in enumerate(sb.indices):
                    first = float(kl[firsts[r]]) if sb.counts[r] else 0.0
                    results[name][i] = Divergence(sb.counts[r], kl_sums[r], first, nll[r], ref_nll[r])
            bar.update(len(sb.indices))
    return {name: [d for d in ds if d is not None] for name, ds in results.items()}


def _first_positions(counts: list[int]) -> list[int]:
    out, start = [], 0
    for n in counts:
        out.append(start)
        start += n
    return out


@torch.no_grad()
def next_token_distributions(
    loaded: LoadedModel, prompts: Sequence[str | PromptRecord], responses: Sequence[str | Sequence[int]] | None = None,
    batch_size: int = 8, *, system: str | None = None,
) -> list[torch.Tensor]:
    """Next-token log-probabilities: [1, V] at the end of each prompt, or [n+1, V] over a response of n tokens
    (the distributions that predict each response token, then the one after the last). CPU float32."""
    resp = responses if responses is not None else [()] * len(prompts)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for sb in _scored_batches(loaded, prompts, resp, batch_size, system, include_eos=False):
        logits = _forward_logits(loaded, sb.inputs, max(sb.counts) + 1)
        width = logits.shape[1]
        for r, i in enumerate(sb.indices):
            n = sb.counts[r]
            out[i] = torch.log_softmax(logits[r, width - n - 1:].float(), dim=-1).cpu()
    return [t for t in out if t is not None]


__all__ = [
    "GenerationConfig", "Generation", "generate", "generate_responses", "response_logprobs",
    "response_token_logprobs", "response_divergence", "Divergence", "next_token_distributions", "encode_item",
    "append_response", "eos_token_ids", "model_inputs",
]
