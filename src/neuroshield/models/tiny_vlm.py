"""Tiny random-init vision-language models of each supported architecture, for fast tests.

No downloads: the tokenizer is `tiny.byte_tokenizer()` plus the image special tokens of the
architecture; the image processor is the transformers PIL-backend class of the architecture with a
small image size (28 px tiles, 7 px patches); the processor is the transformers processor class
(image-only where the stock class wants torchvision, see `vlm.build_processor`). The vision tower
and the language model have 2 layers, hidden size 32, 4 heads / 2 key-value heads.

The chat template is ChatML with content lists; an image entry renders as the architecture's own
placeholder (`<image>\\n` for LLaVA, `<|vision_start|><|image_pad|><|vision_end|>` for Qwen2-VL,
`<image>` for Idefics3 / SmolVLM, `<start_of_image>` for Gemma 3), which the processor expands.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedTokenizerFast

from neuroshield.models.adapters import adapter_for_config
from neuroshield.models.loading import LoadedModel
from neuroshield.models.tiny import byte_tokenizer
from neuroshield.models.vlm import VLM_MODEL_TYPES, build_processor, save_processor

TINY_VLM_TYPES: tuple[str, ...] = VLM_MODEL_TYPES

IMAGE = 28  # tile side in pixels
PATCH = 7  # vision patch side (Qwen2-VL: 14, its processor's own unit)

# named special tokens (tokenizer attributes such as tokenizer.image_token / image_token_id)
_NAMED: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "qwen2_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    "idefics3": {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                 "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
}
_NAMED["qwen2_5_vl"] = _NAMED["qwen2_vl"]
_NAMED["smolvlm"] = _NAMED["idefics3"]
_EXTRA: dict[str, list[str]] = {  # unnamed extra special tokens
    "idefics3": [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
}
_EXTRA["smolvlm"] = _EXTRA["idefics3"]

# what an {"type": "image"} content entry renders as (the processor's `image_token`)
IMAGE_PLACEHOLDER: dict[str, str] = {
    "llava": "<image>\n", "llava_next": "<image>\n",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>", "smolvlm": "<image>", "gemma3": "<start_of_image>",
}


def chat_template(placeholder: str) -> str:
    """ChatML that accepts string or list content; image entries render as `placeholder`."""
    ph = placeholder.replace("\n", "\\n")
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '" + ph + "' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def vlm_tokenizer(model_type: str) -> PreTrainedTokenizerFast:
    """`byte_tokenizer()` plus the image special tokens of `model_type` and a multimodal chat template."""
    if model_type not in _NAMED:
        raise ValueError(f"no tiny VLM for {model_type!r}; known: {', '.join(TINY_VLM_TYPES)}")
    backend = byte_tokenizer().backend_tokenizer  # a fresh tokenizers object each call
    named = _NAMED[model_type]
    backend.add_special_tokens([*named.values(), *_EXTRA.get(model_type, [])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None, unk_token=None,
        extra_special_tokens=dict(named),
    )
    tok.chat_template = chat_template(IMAGE_PLACEHOLDER[model_type])
    tok.padding_side = "left"
    return tok


def tiny_image_processor(model_type: str) -> Any:
    """The architecture's PIL-backend image processor at a tiny resolution (no torchvision needed)."""
    import transformers as tf

    if model_type == "llava":
        return tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    if model_type == "llava_next":
        return tf.LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                             image_grid_pinpoints=_PINPOINTS)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):  # 14 px patches, 2x2 merge: at most 8x8 patches = 16 tokens
        return tf.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                           temporal_patch_size=2)
    if model_type == "idefics3":  # 2x2 tiles of 28 px plus the global image
        return tf.Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE}, max_image_size={"longest_edge": IMAGE})
    if model_type == "smolvlm":
        return tf.SmolVLMImageProcessorPil(size={"longest_edge": 2 * IMAGE}, max_image_size={"longest_edge": IMAGE})
    if model_type == "gemma3":
        return tf.Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, do_pan_and_scan=False)
    raise ValueError(f"no tiny VLM for {model_type!r}; known: {', '.join(TINY_VLM_TYPES)}")


_PINPOINTS = [[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]


def _text_config(model_type: str, tok: Any, layers: int, hidden: int, intermediate: int, heads: int,
                 kv_heads: int) -> dict[str, Any]:
    base = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                tie_word_embeddings=False)
    head_dim = hidden // heads
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        # M-RoPE: temporal/height/width sections of the rotary half-dimension
        half = head_dim // 2
        section = [half // 4, half // 4, half - 2 * (half // 4)]
        return dict(base, model_type=f"{model_type}_text",
                    rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0})
    if model_type == "gemma3":
        return dict(base, model_type="gemma3_text", head_dim=head_dim, query_pre_attn_scalar=head_dim)
    return dict(base, model_type="llama")


def _config(model_type: str, tok: Any, text: dict[str, Any], hidden: int) -> Any:
    vis = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4)
    image_id = tok.convert_tokens_to_ids(_NAMED[model_type]["image_token"])
    if model_type in ("llava", "llava_next"):
        clip = dict(vis, model_type="clip_vision_model", image_size=IMAGE, patch_size=PATCH, projection_dim=hidden)
        extra = {"image_grid_pinpoints": _PINPOINTS} if model_type == "llava_next" else {}
        return AutoConfig.for_model(model_type, text_config=text, vision_config=clip, image_token_index=image_id,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    tie_word_embeddings=False, **extra)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        if model_type == "qwen2_vl":
            vision = dict(depth=2, embed_dim=hidden, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
        else:
            vision = dict(depth=2, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4,
                          out_hidden_size=hidden, fullatt_block_indexes=[1], window_size=56, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
        ids = {k: tok.convert_tokens_to_ids(_NAMED[model_type][f"{k}_token"])
               for k in ("video", "vision_start", "vision_end")}
        return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, image_token_id=image_id,
                                    video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
                                    vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)
    if model_type in ("idefics3", "smolvlm"):
        vision = dict(vis, image_size=IMAGE, patch_size=PATCH)
        return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, image_token_id=image_id,
                                    scale_factor=2, tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    if model_type == "gemma3":
        sig = dict(vis, model_type="siglip_vision_model", image_size=IMAGE, patch_size=PATCH)
        return AutoConfig.for_model(
            model_type, text_config=text, vision_config=sig, mm_tokens_per_image=4, image_token_index=image_id,
            boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"), tie_word_embeddings=False)
    raise ValueError(f"no tiny VLM for {model_type!r}; known: {', '.join(TINY_VLM_TYPES)}")


def _processor_kwargs(model_type: str) -> dict[str, Any]:
    if model_type in ("llava", "llava_next"):
        # CLIP keeps a CLS token (num_additional_image_tokens=1) that the "default" strategy drops
        return {"patch_size": PATCH, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    if model_type in ("idefics3", "smolvlm"):
        return {"image_seq_len": (IMAGE // PATCH) ** 2 // 4}  # 16 patches, 2x2 pixel shuffle
    if model_type == "gemma3":
        return {"image_seq_length": 4}
    return {}


def tiny_processor(model_type: str) -> tuple[Any, str]:
    """(processor, route) of a tiny VLM: tokenizer + tiny image processor, no downloads."""
    tok = vlm_tokenizer(model_type)
    return build_processor(model_type, tiny_image_processor(model_type), tok, chat_template=tok.chat_template,
                           **_processor_kwargs(model_type))


def tiny_vlm(
    model_type: str = "llava", *, layers: int = 2, hidden: int = 32, intermediate: int = 64, heads: int = 4,
    kv_heads: int = 2, seed: int = 0,
) -> LoadedModel:
    """A random-init VLM of `model_type` (one of TINY_VLM_TYPES), float32, eval mode, with its processor."""
    if model_type not in TINY_VLM_TYPES:
        raise ValueError(f"no tiny VLM for {model_type!r}; known: {', '.join(TINY_VLM_TYPES)}")
    processor, route = tiny_processor(model_type)
    tok = processor.tokenizer
    text = _text_config(model_type, tok, layers, hidden, intermediate, heads, kv_heads)
    config = _config(model_type, tok, text, hidden)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # zero-initialized matrices (Gemma 3's projector) would hide the image from the LM
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return LoadedModel(
        model=model, tokenizer=tok, adapter=adapter_for_config(config), spec=f"tiny-{model_type}",
        model_id=f"tiny-random-{model_type}-seed{seed}", processor=processor,
        info={"processor_route": route, "processor": type(processor).__name__},
    )


def save_tiny_vlm(loaded: LoadedModel, folder: Any) -> None:
    """Write model, tokenizer, image processor and processor settings so `load_model(folder)` loads it."""
    loaded.model.save_pretrained(folder)
    save_processor(loaded.processor, folder)
