"""Vision-language models (VLLMs): the adapters of their language models, their processors, and loading.

The neurons of a VLLM are those of its *language model* (METHOD.md); the adapters below point
`layers_path` at the language model's decoder layers in transformers 5.x, so `resolve_sites`,
`site_hooks` and every later stage work on a VLLM exactly as on a text model. Prompts with images and
batching: `neuroshield.models.vlm`.

Processors
----------
`load_vlm` uses `AutoProcessor` when it builds. Where it cannot (transformers 5.x needs torchvision
for the video processor of Qwen2-VL, Qwen2.5-VL and SmolVLM, and SmolVLM's processor needs
`num2words`), the same transformers processor class is built image-only: tokenizer plus the PIL
image processor, no video processor. The placeholder expansion is then still the processor's own
`replace_image_token`, so the token counts cannot drift from the model's. `LoadedModel.info`
records which route was taken ("processor_route").
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuroshield.models.adapters import ArchitectureAdapter, register_adapter
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
