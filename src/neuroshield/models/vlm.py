"""Vision-language models (VLLMs): prompts with images, and batching; the adapters, processors and loading are in
`neuroshield.models.vlm_loading` (re-exported here).

The neurons of a VLLM are those of its *language model* (METHOD.md); the adapters (`vlm_loading`) point
`layers_path` at the language model's decoder layers in transformers 5.x, so `resolve_sites`,
`site_hooks` and every later stage work on a VLLM exactly as on a text model.

One API for every stage (text models included)
-----------------------------------------------
::

    enc = [encode_record(loaded, r) for r in records]          # or encode_prompt(loaded, text, image)
    for idx in batches_by_length(enc, batch_size):
        batch, inputs = model_inputs(loaded, [enc[i] for i in idx])
        mask = batch.count_mask([enc[i] for i in idx], "prompt")   # [B, T]: image tokens excluded
        model(**inputs)                                          # statistics, training (add labels)
        model.generate(**inputs, max_new_tokens=..., do_sample=False)  # evaluation, interventions

`encode_prompt` returns a plain `EncodedPrompt` for a text model (it calls `encode_chat`) and a
`MultimodalPrompt` (a subclass: same `input_ids`, `prompt_len`, `user_span`, `image_mask`,
`position_mask`) for a VLLM, with or without an image. `model_inputs` returns the left-padded
`Batch` and the keyword arguments for `model(**inputs)` / `model.generate(**inputs)`, on the
model's device, floating tensors in the model's dtype.

Shape contract of `inputs` (B rows, T = padded length; N = images in the batch)
-------------------------------------------------------------------------------
- always: `input_ids` [B, T] long, `attention_mask` [B, T] long (left padding).
- `llava`, `gemma3`: `pixel_values` [N, 3, H, W], images of rows in row order (concatenated).
- `llava_next`: `pixel_values` [N, P, 3, H, W] (P = max crops, zero-padded), `image_sizes` [N, 2].
- `qwen2_vl`, `qwen2_5_vl`: `pixel_values` [sum of patches, C*t*p*p] (concatenated), `image_grid_thw`
  [N, 3], `mm_token_type_ids` [B, T] (needed for M-RoPE; 1 at image tokens, left-padded with 0).
- `idefics3`, `smolvlm`: `pixel_values` [B, M, 3, H, W] and `pixel_attention_mask` [B, M, H, W] per
  row (M = max tiles of a row; rows with fewer or no images are zero-padded; the model drops
  all-zero images).
- `gemma3`: `token_type_ids` [B, T] (1 at image tokens: bidirectional attention over the image).
Rows without an image are allowed in any batch (text-only prompts to a VLLM).

Image tokens
------------
`image_mask` is True exactly at the placeholder tokens that the model replaces with vision
features (`config.image_token_id`); the wrappers around them (`<|vision_start|>`,
`<fake_token_around_image>`, `<row_1_col_1>`, `<start_of_image>` ...) are template tokens and count as
"prompt" tokens. Positions: `prompt` (all prompt tokens but image tokens), `user` (the user's text),
`last`, `post` (template tokens after the user's text), `image` (image tokens only).

Pixel tensors are not kept per prompt by default (a Qwen2-VL image at its native resolution is
~14 MB of float32): `MultimodalPrompt` keeps the image source and the formatted prompt, and
`model_inputs` runs the image processor again for the rows of each batch (deterministic; the image
token count is checked against the encoded ids). Pass `keep_pixels=True` to cache them instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuroshield.models.chat import Batch, EncodedPrompt, collate, encode_chat
from neuroshield.models.loaded import LoadedModel
from neuroshield.models.vlm_loading import (
    PROCESSOR_CLASSES,
    VISION_LAYOUTS,
    VLM_MODEL_TYPES,
    VisionLayout,
    build_processor,
    load_processor,
    load_vlm,
    save_processor,
    vision_layout,
)

# --------------------------------------------------------------------------------------------------
# Encoding prompts with images
# --------------------------------------------------------------------------------------------------

ImageLike = Any  # PIL.Image.Image | str | os.PathLike


@dataclass(frozen=True)
class MultimodalPrompt(EncodedPrompt):
    """An `EncodedPrompt` for a VLLM: the ids (image placeholders expanded) and what the model needs besides.

    `token_types`: token-aligned extra inputs ((key, values) pairs, len == len(input_ids)).
    `rendered`: the chat-formatted prompt before placeholder expansion (re-processed with `images`).
    `images`: the image sources (paths or PIL images), in order. `vision`: cached pixel tensors or None.
    """

    token_types: tuple[tuple[str, tuple[int, ...]], ...] = ()
    rendered: str = ""
    images: tuple[Any, ...] = field(default=(), compare=False)
    vision: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def num_image_tokens(self) -> int:
        return sum(self.image_mask or ())


def load_image(image: ImageLike) -> Any:
    """A PIL RGB image from a PIL image or a path."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    path = Path(image).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path} (the record's `image` field)")
    with Image.open(path) as im:
        return im.convert("RGB")


def vlm_messages(text: str, *, image: bool, response: str | None = None, system: str | None = None
                 ) -> list[dict[str, Any]]:
    """Chat messages with content lists (what VLLM chat templates expect); the image precedes the text."""
    msgs: list[dict[str, Any]] = []
    if system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content: list[dict[str, Any]] = [{"type": "image"}] if image else []
    content.append({"type": "text", "text": text})
    msgs.append({"role": "user", "content": content})
    if response is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return msgs


def image_token_id(loaded: LoadedModel) -> int:
    """Id of the placeholder token the model replaces with vision features."""
    cfg = loaded.model.config
    tid = getattr(cfg, "image_token_id", None)
    if tid is None:
        tid = getattr(cfg, "image_token_index", None)
    if tid is None:
        raise ValueError(f"{type(loaded.model).__name__}: config has no image_token_id")
    return int(tid)


def _require_processor(loaded: LoadedModel) -> Any:
    if loaded.processor is None:
        raise ValueError(f"model {loaded.model_id!r} has no processor: it is not a vision-language model "
                         "(load it with load_model, or build a tiny one with neuroshield.models.tiny_vlm)")
    return loaded.processor


def _run_processor(loaded: LoadedModel, rendered: str, images: list[Any], return_tensors: str | None,
                   with_offsets: bool) -> Any:
    processor = _require_processor(loaded)
    tok = processor.tokenizer
    kwargs: dict[str, Any] = {}
    if tok.bos_token is not None and rendered.startswith(tok.bos_token):
        kwargs["add_special_tokens"] = False  # as ProcessorMixin.apply_chat_template does
    if with_offsets:
        kwargs.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
    return processor(text=[rendered], images=images or None, return_tensors=return_tensors, **kwargs)


def _vision_of(loaded: LoadedModel, out: Any) -> dict[str, torch.Tensor]:
    layout = vision_layout(loaded.model.config.model_type)
    vision = {}
    for key in layout.vision_keys:
        if key in out and out[key] is not None:
            value = out[key]
            vision[key] = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return vision


def encode_multimodal(
    loaded: LoadedModel, text: str, image: ImageLike | None = None, response: str | None = None, *,
    system: str | None = None, max_length: int | None = None, keep_pixels: bool = False,
) -> MultimodalPrompt:
    """Format `text` (after `image`, if any) with the processor's chat template and tokenize.

    Image placeholders are expanded by the processor exactly as the model expects; `image_mask` marks the
    image feature tokens; `user_span` is the span of `text`. `response` (if given) is appended as raw text
    plus EOS, as in `encode_chat`. `max_length` limits the *text* tokens (image tokens cannot be cut and come
    on top: 576 for LLaVA-1.5, ~729 for Qwen2-VL at 760x760): longer prompts lose the start of the user's text.
    """
    processor = _require_processor(loaded)
    tok = processor.tokenizer
    pil = load_image(image) if image is not None else None
    messages = vlm_messages(text, image=pil is not None, system=system)
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = _run_processor(loaded, rendered, [pil] if pil is not None else [], None, with_offsets=True)
    ids: list[int] = [int(i) for i in out["input_ids"][0]]
    offsets = [tuple(o) for o in out["offset_mapping"][0]]
    replaced = (out.get("text_replacement_offsets") or [[]])[0]

    # the user's text: find it in the rendered prompt, shift by the expansions before it, map to tokens
    start_char = rendered.rfind(text) if text else -1
    if start_char < 0:
        user_span = (0, len(ids))
    else:
        shift = sum(len(r["replacement"]) - (r["span"][1] - r["span"][0]) for r in replaced
                    if r["span"][1] <= start_char)
        s, e = start_char + shift, start_char + shift + len(text)
        inside = [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
        user_span = (inside[0], inside[-1] + 1) if inside else (0, len(ids))

    img_id = image_token_id(loaded)
    layout = vision_layout(loaded.model.config.model_type)
    token_types = {k: [int(v) for v in out[k][0]] for k in layout.tokens if k in out and out[k] is not None}
    prompt_len = len(ids)
    image_mask = [i == img_id for i in ids]
    if pil is not None and not any(image_mask):
        raise ValueError(f"{type(processor).__name__} produced no image token (id {img_id}); the chat template "
                         "does not place the image: check the processor's chat template")
    if response is not None:
        extra = tok(response, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            extra = [*extra, tok.eos_token_id]
        ids += extra
        image_mask += [False] * len(extra)
        for values in token_types.values():
            values += [0] * len(extra)
    n_image = sum(image_mask)
    if max_length is not None and len(ids) - n_image > max_length:
        cut = len(ids) - n_image - max_length
        s, e = user_span
        if cut >= e - s or any(image_mask[s:s + cut]):
            raise ValueError(f"max_length={max_length} (text tokens; the {n_image} image tokens come on top) "
                             "leaves no user tokens; raise it")

        def trim(seq: list[Any]) -> list[Any]:
            return seq[:s] + seq[s + cut:]

        ids, image_mask = trim(ids), trim(image_mask)
        token_types = {k: trim(v) for k, v in token_types.items()}
        user_span = (s, e - cut)
        prompt_len -= cut
    vision = _vision_of(loaded, _run_processor(loaded, rendered, [pil], "pt", False)) \
        if keep_pixels and pil is not None else None
    return MultimodalPrompt(
        input_ids=tuple(ids), prompt_len=prompt_len, user_span=user_span, image_mask=tuple(image_mask),
        token_types=tuple((k, tuple(v)) for k, v in token_types.items()), rendered=rendered,
        images=(image,) if image is not None else (), vision=vision,
    )


def encode_prompt(loaded: LoadedModel, text: str, image: ImageLike | None = None, response: str | None = None, *,
                  system: str | None = None, max_length: int | None = None, keep_pixels: bool = False
                  ) -> EncodedPrompt:
    """The one entry point: `encode_chat` for a text model, `encode_multimodal` for a VLLM."""
    if loaded.adapter.multimodal:
        return encode_multimodal(loaded, text, image, response, system=system, max_length=max_length,
                                 keep_pixels=keep_pixels)
    if image is not None:
        raise ValueError(f"model {loaded.model_id!r} is a text model and cannot take an image; use a "
                         "vision-language model for image records, or skip modality 'image'")
    return encode_chat(loaded.tokenizer, text, response, system=system, max_length=max_length)


def encode_record(loaded: LoadedModel, record: Any, response: str | None = None, **kwargs: Any) -> EncodedPrompt:
    """Encode a `PromptRecord` (its `text` and, for modality "image", its `image` path)."""
    image = getattr(record, "image", None)
    if getattr(record, "modality", "text") == "image" and image is None:
        raise ValueError(f"record {record.id!r} has modality 'image' but no image path; render it first "
                         "(neuroshield.data.typography.render_prompt_records)")
    return encode_prompt(loaded, record.text, image, response, **kwargs)


def vision_inputs(loaded: LoadedModel, prompt: EncodedPrompt) -> dict[str, torch.Tensor]:
    """The processor's image tensors of one prompt (cached, or recomputed from its image sources)."""
    if not isinstance(prompt, MultimodalPrompt) or not prompt.images:
        return {}
    if prompt.vision is not None:
        return prompt.vision
    out = _run_processor(loaded, prompt.rendered, [load_image(i) for i in prompt.images], "pt", False)
    found = int((out["input_ids"][0] == image_token_id(loaded)).sum())
    if found != prompt.num_image_tokens:
        raise RuntimeError(f"image re-processing gave {found} image tokens, the encoded prompt has "
                           f"{prompt.num_image_tokens}: the image source {prompt.images[0]!r} changed since encoding")
    return _vision_of(loaded, out)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def _pad_dim1(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[1] == size:
        return t
    pad = torch.zeros((t.shape[0], size - t.shape[1], *t.shape[2:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def collate_multimodal(encoded: Sequence[EncodedPrompt], pad_token_id: int, layout: VisionLayout,
                       vision: Sequence[dict[str, torch.Tensor]]) -> tuple[Batch, dict[str, torch.Tensor]]:
    """Left-pad ids (as `collate`), left-pad token-aligned inputs with 0, and combine image tensors per `layout`.

    `vision[i]` holds the processor tensors of row i ({} for a row without an image). Returns the `Batch` and
    the model's keyword arguments on the CPU.
    """
    batch = collate(list(encoded), pad_token_id)
    inputs: dict[str, torch.Tensor] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    for key in layout.tokens:
        rows = [dict(e.token_types).get(key) if isinstance(e, MultimodalPrompt) else None for e in encoded]
        if all(r is None for r in rows):
            continue
        t = torch.zeros(batch.input_ids.shape, dtype=torch.long)
        for row, (values, pad) in enumerate(zip(rows, batch.pad_left)):
            if values is not None:
                t[row, pad:] = torch.tensor(values, dtype=torch.long)
        inputs[key] = t
    for key in layout.cat:
        parts = [v[key] for v in vision if key in v]
        if parts:
            inputs[key] = torch.cat(parts, dim=0)
    for key in layout.cat_pad1:
        parts = [v[key] for v in vision if key in v]
        if parts:
            width = max(p.shape[1] for p in parts)
            inputs[key] = torch.cat([_pad_dim1(p, width) for p in parts], dim=0)
    for key in layout.rows:
        parts = [v.get(key) for v in vision]
        present = [p for p in parts if p is not None]
        if not present:
            continue
        width = max(p.shape[1] for p in present)
        like = present[0]
        rows_t = [_pad_dim1(p, width) if p is not None else torch.zeros((1, width, *like.shape[2:]), dtype=like.dtype)
                  for p in parts]
        inputs[key] = torch.cat(rows_t, dim=0)
    return batch, inputs


def model_inputs(loaded: LoadedModel, encoded: Sequence[EncodedPrompt], *, device: torch.device | str | None = None
                 ) -> tuple[Batch, dict[str, torch.Tensor]]:
    """(Batch, kwargs) for `loaded.model(**kwargs)` and `loaded.model.generate(**kwargs)`; any model.

    The `Batch` stays on the CPU (for `count_mask`); kwargs go to `device` (default: the model's), floating
    tensors in the model's dtype. Works for text models (`EncodedPrompt`s) and VLLMs (mixed image / text rows).
    """
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    layout = vision_layout(loaded.model.config.model_type) if loaded.adapter.multimodal else VisionLayout(cat=())
    vision = [vision_inputs(loaded, e) for e in encoded]
    batch, inputs = collate_multimodal(encoded, pad_id, layout, vision)
    target = torch.device(device) if device is not None else loaded.device
    dtype = next(loaded.model.parameters()).dtype
    moved = {}
    for key, t in inputs.items():
        moved[key] = t.to(target, dtype=dtype) if t.is_floating_point() else t.to(target)
    return batch, moved


def response_labels(batch: Batch, encoded: Sequence[EncodedPrompt]) -> torch.Tensor:
    """[B, T] labels for cross-entropy on response tokens only (-100 elsewhere), aligned with `batch`."""
    labels = torch.full(batch.input_ids.shape, -100, dtype=torch.long)
    for row, (e, pad) in enumerate(zip(encoded, batch.pad_left)):
        start = pad + e.prompt_len
        labels[row, start:] = batch.input_ids[row, start:]
    return labels


__all__ = [
    "VLM_MODEL_TYPES", "PROCESSOR_CLASSES", "VisionLayout", "VISION_LAYOUTS", "vision_layout", "build_processor",
    "load_processor", "save_processor", "load_vlm", "MultimodalPrompt", "load_image", "vlm_messages", "image_token_id",
    "encode_multimodal", "encode_prompt", "encode_record", "vision_inputs", "collate_multimodal", "model_inputs",
    "response_labels",
]
