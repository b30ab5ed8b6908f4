"""Vision-language models (VLLMs): adapters, loading, prompts with images, and batching.

The neurons of a VLLM are those of its *language model* (METHOD.md); the adapters below point
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

Processors
----------
`load_vlm` uses `AutoProcessor` when it builds. Where it cannot (transformers 5.x needs torchvision
for the video processor of Qwen2-VL, Qwen2.5-VL and SmolVLM, and SmolVLM's processor needs
`num2words`), the same transformers processor class is built image-only: tokenizer plus the PIL
image processor, no video processor. The placeholder expansion is then still the processor's own
`replace_image_token`, so the token counts cannot drift from the model's. `LoadedModel.info`
records which route was taken ("processor_route").

Pixel tensors are not kept per prompt by default (a Qwen2-VL image at its native resolution is
~14 MB of float32): `MultimodalPrompt` keeps the image source and the formatted prompt, and
`model_inputs` runs the image processor again for the rows of each batch (deterministic; the image
token count is checked against the encoded ids). Pass `keep_pixels=True` to cache them instead.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuroshield.models.adapters import ArchitectureAdapter, register_adapter
from neuroshield.models.chat import Batch, EncodedPrompt, collate, encode_chat
from neuroshield.models.loaded import LoadedModel, ModelLoadError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Adapters: the language model's decoder layers (module tree of transformers 5.x)
# --------------------------------------------------------------------------------------------------


def _vlm_adapter(name: str, layers_path: str, model_types: tuple[str, ...] | None = None) -> ArchitectureAdapter:
    return register_adapter(ArchitectureAdapter(
        name=name, model_types=model_types or (name,), layers_path=layers_path, text_config_attr="text_config",
        multimodal=True,
    ))


LLAVA = _vlm_adapter("llava", "model.language_model.layers")  # LlavaForConditionalGeneration
LLAVA_NEXT = _vlm_adapter("llava_next", "model.language_model.layers")  # LlavaNextForConditionalGeneration
QWEN2_VL = _vlm_adapter("qwen2_vl", "model.language_model.layers")  # Qwen2VLForConditionalGeneration
QWEN2_5_VL = _vlm_adapter("qwen2_5_vl", "model.language_model.layers")  # Qwen2_5_VLForConditionalGeneration
IDEFICS3 = _vlm_adapter("idefics3", "model.text_model.layers")  # Idefics3ForConditionalGeneration
SMOLVLM = _vlm_adapter("smolvlm", "model.text_model.layers")  # SmolVLMForConditionalGeneration
GEMMA3 = _vlm_adapter("gemma3", "model.language_model.layers")  # Gemma3ForConditionalGeneration

VLM_MODEL_TYPES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3")

# transformers processor class of each architecture (looked up by name: the import is lazy)
PROCESSOR_CLASSES: dict[str, str] = {
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "idefics3": "Idefics3Processor",
    "smolvlm": "SmolVLMProcessor",
    "gemma3": "Gemma3Processor",
}


# --------------------------------------------------------------------------------------------------
# How each architecture's processor outputs are batched
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionLayout:
    """How the processor's tensors of single prompts combine into one batch.

    - `cat`: one entry (or block of patches) per image along dim 0; concatenated in row order.
    - `cat_pad1`: like `cat`, after zero-padding dim 1 to the batch maximum (LLaVA-NeXT crops).
    - `rows`: [1, M, ...] per prompt; dim 1 zero-padded to the maximum M, stacked over rows; rows
      without an image get zeros (Idefics3 / SmolVLM drop all-zero images).
    - `tokens`: [1, T] aligned with `input_ids`; left-padded with 0 like the ids; response tokens 0.
    Keys the processor returns that are not listed are not passed to the model.
    """

    cat: tuple[str, ...] = ("pixel_values",)
    cat_pad1: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()

    @property
    def vision_keys(self) -> tuple[str, ...]:
        return self.cat + self.cat_pad1 + self.rows


VISION_LAYOUTS: dict[str, VisionLayout] = {
    "llava": VisionLayout(cat=("pixel_values",)),
    "llava_next": VisionLayout(cat=("image_sizes",), cat_pad1=("pixel_values",)),
    "qwen2_vl": VisionLayout(cat=("pixel_values", "image_grid_thw"), tokens=("mm_token_type_ids",)),
    "qwen2_5_vl": VisionLayout(cat=("pixel_values", "image_grid_thw"), tokens=("mm_token_type_ids",)),
    "idefics3": VisionLayout(cat=(), rows=("pixel_values", "pixel_attention_mask")),
    "smolvlm": VisionLayout(cat=(), rows=("pixel_values", "pixel_attention_mask")),
    "gemma3": VisionLayout(cat=("pixel_values",), tokens=("token_type_ids",)),
}


def vision_layout(model_type: str) -> VisionLayout:
    return VISION_LAYOUTS.get(model_type, VisionLayout())


# --------------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------------


def _transformers_class(name: str) -> Any:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ModelLoadError(f"transformers {transformers.__version__} has no {name}; upgrade transformers")
    return cls


@functools.lru_cache(maxsize=None)
def _image_only_class(cls: type) -> type:
    """Subclass of a transformers processor class that accepts `video_processor=None`.

    transformers 5.x type-checks every sub-processor against `BaseVideoProcessor`, which does not exist
    without torchvision. Images never touch the video processor, so an image-only processor is the same
    processor for our purposes: `replace_image_token` (the placeholder expansion) is inherited unchanged.
    """
    from transformers.processing_utils import ProcessorMixin

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument is None and "video" in argument_name:
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    def apply_chat_template(self: Any, *args: Any, **kwargs: Any) -> Any:
        # overrides (SmolVLM's) only add video settings, reading the missing video processor
        return ProcessorMixin.apply_chat_template(self, *args, **kwargs)

    namespace: dict[str, Any] = {"check_argument_for_proper_class": check_argument_for_proper_class,
                                 "apply_chat_template": apply_chat_template, "__module__": __name__}
    if cls.__name__ == "SmolVLMProcessor":
        # SmolVLMProcessor.__init__ insists on `num2words`, used only for video prompts.
        def __init__(self: Any, image_processor: Any, tokenizer: Any, video_processor: Any = None,  # noqa: N807
                     image_seq_len: int = 169, chat_template: str | None = None, **kwargs: Any) -> None:
            self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(self, image_processor, tokenizer, video_processor, chat_template=chat_template,
                                    **kwargs)

        namespace["__init__"] = __init__
    return type(f"ImageOnly{cls.__name__}", (cls,), namespace)


def build_processor(model_type: str, image_processor: Any, tokenizer: Any, *, chat_template: str | None = None,
                    **kwargs: Any) -> tuple[Any, str]:
    """The transformers processor of `model_type` from a tokenizer and an image processor.

    Returns (processor, route): route "transformers" when the stock class builds, "image-only" when it
    needs a video processor (torchvision) or `num2words` that this environment lacks.
    """
    if model_type not in PROCESSOR_CLASSES:
        raise ModelLoadError(f"no processor known for model_type={model_type!r}; known: {', '.join(PROCESSOR_CLASSES)}")
    cls = _transformers_class(PROCESSOR_CLASSES[model_type])
    if "video_processor" not in cls.get_attributes():
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs), \
            "transformers"
    # the stock class wants a video processor (torchvision); images never use it
    sub = _image_only_class(cls)
    return sub(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
               chat_template=chat_template, **kwargs), "image-only"


def save_processor(processor: Any, folder: Path | str) -> None:
    """`processor.save_pretrained(folder)`, also for image-only processors (saved under the stock class name,
    so that `AutoProcessor` loads them where torchvision exists and `load_processor` assembles them elsewhere)."""
    folder = Path(folder)
    if not type(processor).__name__.startswith("ImageOnly"):
        processor.save_pretrained(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    settings = {k: v for k, v in processor.to_dict().items() if k not in type(processor).get_attributes()}
    settings.pop("chat_template", None)
    settings["processor_class"] = type(processor).__name__.removeprefix("ImageOnly")
    (folder / "processor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    if processor.chat_template:
        (folder / "chat_template.jinja").write_text(processor.chat_template)


def _hub_file(source: Path | str, name: str, offline: bool) -> Path | None:
    if isinstance(source, Path) or Path(str(source)).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(str(source), name, local_files_only=offline, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - a missing optional file
        return None
    return Path(found) if found else None


def load_processor(source: Path | str, config: Any, *, offline: bool = True, trust_remote_code: bool = False
                   ) -> tuple[Any, str]:
    """AutoProcessor when it builds; otherwise the image-only processor from tokenizer + PIL image processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=offline, trust_remote_code=trust_remote_code)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor, "auto"
    except Exception as err:  # noqa: BLE001 - any failure: assemble it ourselves
        log.info("AutoProcessor failed for %s (%s: %s); assembling an image-only processor", source,
                 type(err).__name__, str(err)[:200])
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline, backend="pil",
                                                             trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"{source}: cannot load the tokenizer / image processor of this VLM ({err})") from None
    kwargs: dict[str, Any] = {}
    pc = _hub_file(source, "processor_config.json", offline)
    if pc is not None:
        kwargs = {k: v for k, v in json.loads(pc.read_text()).items()
                  if k not in ("processor_class", "image_processor", "tokenizer", "video_processor", "auto_map")}
    chat_template = kwargs.pop("chat_template", None)
    if chat_template is None and (f := _hub_file(source, "chat_template.jinja", offline)) is not None:
        chat_template = f.read_text()
    if chat_template is None and (f := _hub_file(source, "chat_template.json", offline)) is not None:
        chat_template = json.loads(f.read_text()).get("chat_template")
    chat_template = chat_template or getattr(tokenizer, "chat_template", None)
    if config.model_type in PROCESSOR_CLASSES:  # keep the settings the class takes (ProcessorMixin rejects others)
        accepted = inspect.signature(_transformers_class(PROCESSOR_CLASSES[config.model_type]).__init__).parameters
        dropped = sorted(k for k in kwargs if k not in accepted)
        if dropped:
            log.info("processor settings not taken by the image-only processor: %s", ", ".join(dropped))
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    processor, route = build_processor(config.model_type, image_processor, tokenizer, chat_template=chat_template,
                                       **kwargs)
    return processor, f"assembled-{route}"


def load_vlm(source: Path | str, config: Any, adapter: ArchitectureAdapter, dtype: torch.dtype, device_map: Any,
             offline: bool, trust_remote_code: bool, spec: str, model_id: str) -> LoadedModel:
    """Load a VLLM with `AutoModelForImageTextToText` and its processor (see `load_processor`)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype, device_map=device_map, local_files_only=offline, trust_remote_code=trust_remote_code
    )
    model.eval()
    processor, route = load_processor(source, config, offline=offline, trust_remote_code=trust_remote_code)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    adapter.layers(model)  # fail now, with the adapter's message, if the module tree does not match
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, spec=spec, model_id=model_id,
                       processor=processor, info={"processor_route": route, "processor": type(processor).__name__})


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
