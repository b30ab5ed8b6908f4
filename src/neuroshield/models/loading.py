"""Load a model from a Hub id, a local folder, a .gguf file, or a named embedded model.

GGUF files are dequantized by transformers (`gguf_file=`) once and cached as safetensors under
`NEUROSHIELD_CACHE` (default `~/.cache/neuroshield`), keyed by the GGUF's sha256. A cache folder is
built under a temporary name and renamed when complete, and carries a manifest; one that fails the
manifest check is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from neuroshield.models.adapters import adapter_for_config
from neuroshield.models.embedded import EMBEDDED_MODELS, EmbeddedModel, assemble_gguf
from neuroshield.models.loaded import LoadedModel, ModelLoadError, config_hash, dtype_name  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("NEUROSHIELD_CACHE", Path.home() / ".cache" / "neuroshield"))


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: choose one of float32, bfloat16, float16")
    return table[dtype]


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `spec`: `default`, `smollm2`, a path to a `.gguf` file, a local folder, or a Hub id.

    Hub ids load offline from the local Hugging Face cache unless `local_files_only=False` (or
    `HF_HUB_OFFLINE=0` is set). `device_map` is passed to accelerate (e.g. "auto" for several GPUs).
    """
    start = time.perf_counter()
    torch_dtype = _resolve_dtype(dtype)
    if spec in EMBEDDED_MODELS:
        emb = EMBEDDED_MODELS[spec]
        folder = _cached_gguf_folder(emb.sha256, lambda dst: assemble_gguf(emb, dst), emb.gguf_name)
        loaded = _from_folder(folder, torch_dtype, device_map, True, trust_remote_code, spec, emb.model_id)
        loaded.info.update({"gguf_sha256": emb.sha256, "source": emb.description})
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        digest = sha256_file(path)
        folder = _cached_gguf_folder(digest, lambda dst: shutil.copyfile(path, dst), path.name)
        loaded = _from_folder(folder, torch_dtype, device_map, True, trust_remote_code, spec, f"gguf:{path.name}")
        loaded.info.update({"gguf_sha256": digest})
    else:
        offline = local_files_only if local_files_only is not None else os.environ.get("HF_HUB_OFFLINE", "1") != "0"
        loaded = _from_folder(Path(spec) if Path(spec).is_dir() else spec, torch_dtype, device_map, offline,
                              trust_remote_code, spec, spec)
    loaded.load_seconds = time.perf_counter() - start
    return loaded


def _from_folder(
    source: Path | str, dtype: torch.dtype, device_map: Any, offline: bool, trust_remote_code: bool,
    spec: str, model_id: str,
) -> LoadedModel:
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(
            f"model {spec!r} is neither a local folder nor in the Hugging Face cache (offline mode). "
            f"Download it where there is internet (`huggingface-cli download {spec}`) and copy the cache, "
            f"pass a local folder or a .gguf file, or use 'default'. ({err.__class__.__name__})"
        ) from None
    adapter = adapter_for_config(config)
    if adapter.multimodal:
        from neuroshield.models.vlm import load_vlm  # registered by the vision-language module

        return load_vlm(source, config, adapter, dtype, device_map, offline, trust_remote_code, spec, model_id)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, device_map=device_map, local_files_only=offline, trust_remote_code=trust_remote_code
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, spec=spec, model_id=model_id)


def _cache_is_valid(folder: Path) -> bool:
    manifest = folder / "neuroshield-cache.json"
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("format") != CACHE_FORMAT:
            return False
        for name, size in meta["files"].items():
            f = folder / name
            if not f.is_file() or f.stat().st_size != size:
                return False
        from safetensors import safe_open

        for name in meta["files"]:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as st:  # header parse catches truncation
                    st.keys()
        return True
    except Exception:  # any damage means rebuild
        return False


def _cached_gguf_folder(sha256: str, materialize: Any, gguf_name: str) -> Path:
    """Folder with config, tokenizer and safetensors for the GGUF with this sha256; built if needed."""
    root = cache_root() / "gguf"
    folder = root / sha256[:20]
    if _cache_is_valid(folder):
        return folder
    if folder.exists():
        log.warning("cache folder %s is incomplete or damaged; rebuilding it", folder)
        shutil.rmtree(folder)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        tmp_path = Path(tmp)
        gguf_path = tmp_path / "src" / gguf_name
        gguf_path.parent.mkdir()
        materialize(gguf_path)
        digest = sha256_file(gguf_path)
        if digest != sha256:
            raise ModelLoadError(f"GGUF sha256 mismatch for {gguf_name}: expected {sha256}, got {digest}")
        log.info("dequantizing %s (one-time, cached as safetensors)", gguf_name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_name)
        out = tmp_path / "model"
        # The weights are dequantized float32 now; drop the GGUF quantizer so save_pretrained writes them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
        (out / "neuroshield-cache.json").write_text(
            json.dumps({"format": CACHE_FORMAT, "gguf_sha256": sha256, "gguf_name": gguf_name, "files": files}, indent=1)
        )
        try:
            os.replace(out, folder)  # atomic: the folder appears complete or not at all
        except OSError:
            # another process finished the same build first; use its copy if it is sound
            if not _cache_is_valid(folder):
                raise
    return folder
