"""Chat formatting, token positions and batching: the one way every stage turns prompts into tensors.

Prompts are formatted with the tokenizer's own `apply_chat_template` (never hand-written), then
tokenized with offsets so we know which tokens are the user's text and which are the template's
tokens after it (the "post-instruction" positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

Positions = Literal["prompt", "user", "last", "post", "image"]
POSITIONS: tuple[str, ...] = get_args(Positions)


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one chat-formatted prompt (optionally followed by a response)."""

    input_ids: tuple[int, ...]
    prompt_len: int  # tokens up to and including the generation prompt
    user_span: tuple[int, int]  # [start, end) token span of the user's text
    image_mask: tuple[bool, ...] | None = None  # True at image placeholder tokens (VLMs)

    def position_mask(self, positions: str) -> list[bool]:
        """Which tokens count for `positions` (see POSITIONS). Response tokens never count."""
        n, p = len(self.input_ids), self.prompt_len
        image = self.image_mask or (False,) * n
        if positions == "prompt":  # all prompt tokens, image tokens excluded
            return [i < p and not image[i] for i in range(n)]
        if positions == "user":
            s, e = self.user_span
            return [s <= i < e and not image[i] for i in range(n)]
        if positions == "last":
            return [i == p - 1 for i in range(n)]
        if positions == "post":
            return [self.user_span[1] <= i < p for i in range(n)]
        if positions == "image":
            return [i < p and image[i] for i in range(n)]
        raise ValueError(f"positions={positions!r}: choose one of {', '.join(POSITIONS)}")


def chat_messages(text: str, response: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": text})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def encode_chat(tokenizer: Any, text: str, response: str | None = None, system: str | None = None,
                max_length: int | None = None) -> EncodedPrompt:
    """Format with the chat template and tokenize; `response` (if given) follows the generation prompt.

    The response is appended as raw text plus EOS rather than re-rendered through the template, so that
    the prompt tokens are identical with and without a response (training sees what generation sees).
    """
    prompt_str = tokenizer.apply_chat_template(chat_messages(text, system=system), tokenize=False,
                                               add_generation_prompt=True)
    enc = tokenizer(prompt_str, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    start_char = prompt_str.rfind(text) if text else -1
    if start_char < 0:  # template changed the text (e.g. stripped it); fall back to the whole prompt
        user_span = (0, len(ids))
    else:
        end_char = start_char + len(text)
        inside = [i for i, (s, e) in enumerate(offsets) if s < end_char and e > start_char]
        user_span = (inside[0], inside[-1] + 1) if inside else (0, len(ids))
    prompt_len = len(ids)
    if response is not None:
        ids += tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if max_length is not None and len(ids) > max_length:
        # keep the end of the prompt (the template tokens matter most) by cutting the user text's start
        cut = len(ids) - max_length
        if cut >= user_span[1] - user_span[0]:
            raise ValueError(f"max_length={max_length} leaves no user tokens; raise it")
        ids = ids[: user_span[0]] + ids[user_span[0] + cut:]
        user_span = (user_span[0], user_span[1] - cut)
        prompt_len -= cut
    return EncodedPrompt(tuple(ids), prompt_len, user_span)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], left-padded
    attention_mask: torch.Tensor  # [B, T]
    pad_left: list[int]  # padding added on the left of each row

    def count_mask(self, encoded: list[EncodedPrompt], positions: str) -> torch.Tensor:
        """[B, T] bool mask of the positions that count; padding never counts."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for row, (enc, pad) in enumerate(zip(encoded, self.pad_left)):
            mask[row, pad:] = torch.tensor(enc.position_mask(positions), dtype=torch.bool)
        return mask


def collate(encoded: list[EncodedPrompt], pad_token_id: int) -> Batch:
    """Left-pad a list of encoded prompts (left so that generation continues every row at the end)."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    att = torch.zeros((len(encoded), width), dtype=torch.long)
    pads = []
    for row, e in enumerate(encoded):
        pad = width - len(e.input_ids)
        ids[row, pad:] = torch.tensor(e.input_ids, dtype=torch.long)
        att[row, pad:] = 1
        pads.append(pad)
    return Batch(ids, att, pads)


def batches_by_length(encoded: list[EncodedPrompt], batch_size: int) -> list[list[int]]:
    """Index batches sorted by length (less padding); each index appears once, order deterministic."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
