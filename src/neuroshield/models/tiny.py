"""Tiny random-init models of each supported architecture, for fast tests and examples.

No downloads: the tokenizer is a byte-level tokenizer built in memory (every language encodes) with
a ChatML chat template, so chat formatting goes through `apply_chat_template` like a real model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from neuroshield.models.adapters import adapter_for_config
from neuroshield.models.loading import LoadedModel

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "mistral": {"sliding_window": None},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8},
}


def tiny_model(
    model_type: str = "llama", *, layers: int = 2, hidden: int = 32, intermediate: int = 64, heads: int = 4,
    kv_heads: int = 2, seed: int = 0, tie_word_embeddings: bool = False,
) -> LoadedModel:
    """A random-init model of `model_type` with GQA (heads/kv_heads), float32, eval mode."""
    if model_type not in TINY_OVERRIDES:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(TINY_OVERRIDES)}")
    tokenizer = byte_tokenizer()
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    kwargs.update(TINY_OVERRIDES[model_type])
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(
        model=model, tokenizer=tokenizer, adapter=adapter_for_config(config), spec=f"tiny-{model_type}",
        model_id=f"tiny-random-{model_type}-seed{seed}",
    )
