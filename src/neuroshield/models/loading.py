"""Load a model from a Hub id, a local folder, a .gguf file, or a named embedded model.

GGUF files are dequantized by transformers (`gguf_file=`) once and cached as safetensors under
`NEUROSHIELD_CACHE` (default `~/.cache/neuroshield`), keyed by the GGUF's sha256. A cache folder is
built under a temporary name and renamed when complete, and carries a manifest with the size and
sha256 of every file (written last); one that fails the manifest check is rebuilt, never used. A file
is hashed again whenever its size, mtime, ctime or inode differ from those recorded when it was last
hashed (about 3 s for the default model's 2.5 GB of safetensors on one core), so a write into the
cache or a copy of it is always checked.
"""

from __future__ import annotations

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
from neuroshield.io import check_manifest, digest_entries, file_digest, write_json
from neuroshield.memory import return_freed_memory
from neuroshield.models.embedded import EMBEDDED_MODELS, EmbeddedModel, assemble_gguf
from neuroshield.models.loaded import LoadedModel, ModelLoadError, config_hash, dtype_name  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("NEUROSHIELD_CACHE", Path.home() / ".cache" / "neuroshield"))


def sha256_file(path: Path) -> str:
    return file_digest(path)  # sha256


DTYPES = ("auto", "stored", "float32", "bfloat16", "float16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (Intel AMX or AVX-512 BF16; Arm BF16).

    Without it PyTorch emulates bfloat16 matmuls and they run slower than float32, so `auto` keeps float32.
    """
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype `auto` picks: bfloat16 on a GPU that supports it or a CPU with native bf16 matmul, else float32.

    Numerics that need float32 keep it whatever the model's dtype: statistics accumulate in float32/float64,
    trained neuron deltas and their optimizer state are float32, losses and log-probabilities are float32.
    """
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" or dev is None and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype | str:
    """A dtype name (`auto`, `float32`, `bfloat16`, `float16`; None means auto) as a torch dtype; `stored` (the
    checkpoint's own dtype, for exports that must stay bit-exact) stays the string transformers reads ("auto")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return auto_dtype(device)
    if dtype == "stored":
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
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
    `dtype`: `auto` (None) picks bfloat16 where the hardware multiplies it natively, float32 elsewhere
    (`auto_dtype`); `stored` keeps the checkpoint's own dtype (GGUF caches: float32); or float32, bfloat16, float16.
    With `NEUROSHIELD_MALLOC_THRESHOLD=<bytes>` set, glibc's allocator returns freed blocks of that size or more to
    the system from here on (`memory.return_freed_memory`: less memory, slower generation and statistics).
    """
    return_freed_memory()
    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype, "cuda" if device_map and torch.cuda.is_available() else None)
    if spec in EMBEDDED_MODELS:
        emb = EMBEDDED_MODELS[spec]
        folder = _cached_gguf_folder(emb.sha256, lambda dst: assemble_gguf(emb, dst), emb.gguf_name)
        folder = _cached_dtype_folder(folder, torch_dtype)
        loaded = _from_folder(folder, torch_dtype, device_map, True, trust_remote_code, spec, emb.model_id)
        loaded.info.update({"gguf_sha256": emb.sha256, "source": emb.description})
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        digest = sha256_file(path)
        folder = _cached_gguf_folder(digest, lambda dst: shutil.copyfile(path, dst), path.name, source=str(path))
        folder = _cached_dtype_folder(folder, torch_dtype)
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
    if isinstance(source, Path):
        _check_model_folder(source)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline, trust_remote_code=trust_remote_code)
    except OSError as err:
        if isinstance(source, Path):
            raise ModelLoadError(f"{source}: cannot read the model's config ({err}); the folder is damaged or not a "
                                 "Hugging Face model folder: save or copy the model there again") from None
        raise ModelLoadError(
            f"model {spec!r} is neither a local folder nor in the Hugging Face cache (offline mode). "
            f"Download it where there is internet (`huggingface-cli download {spec}`) and copy the cache, "
            f"pass a local folder or a .gguf file, or use 'default'. ({err.__class__.__name__})"
        ) from None
    adapter = adapter_for_config(config)
    if adapter.multimodal:
        from neuroshield.models.vlm import load_vlm  # registered by the vision-language module

        return load_vlm(source, config, adapter, dtype, device_map, offline, trust_remote_code, spec, model_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=device_map, local_files_only=offline, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError) as err:
        if not isinstance(source, Path):
            raise
        raise ModelLoadError(f"{source}: cannot load the weights ({err.__class__.__name__}: {err}); a weight file is "
                             "missing, truncated or damaged: save or copy the model folder again") from None
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, spec=spec, model_id=model_id)


def _check_model_folder(folder: Path) -> None:
    """A local model folder's config.json must be there and be JSON: say which file and what to do."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder}: no config.json, so this is not a Hugging Face model folder; give the folder "
                             "that `save_pretrained` wrote (config.json, *.safetensors, tokenizer files)")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{cfg}: not a readable JSON model config ({err}); the file is damaged or was cut off: "
                             "copy or save the model folder again") from None


CACHE_MANIFEST = "neuroshield-cache.json"


def _write_cache_manifest(folder: Path, meta: dict[str, Any]) -> None:
    """The cache manifest: sizes under `files` (what caches of earlier versions check) and size, sha256 and the
    stat at hashing time under `digests`. Written last."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CACHE_MANIFEST)
    digests = digest_entries(folder, names)
    write_json(folder / CACHE_MANIFEST, {**meta, "format": CACHE_FORMAT,
                                         "files": {n: e["size"] for n, e in digests.items()}, "digests": digests})


def _cache_is_valid(folder: Path) -> bool:
    manifest = folder / CACHE_MANIFEST
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
        if "digests" not in meta:
            # written before content digests were recorded: sizes and headers are all it can be checked against;
            # record the digests now (once), so that later damage is found
            log.info("cache folder %s: recording content digests (once)", folder)
            _write_cache_manifest(folder, {k: v for k, v in meta.items() if k not in ("files", "digests")})
            return True
        problems = check_manifest(folder, CACHE_MANIFEST, key="digests")
        if problems:
            log.warning("cache folder %s: %s", folder, problems[0])
            return False
        return True
    except Exception:  # any damage means rebuild
        return False


def _cached_dtype_folder(folder: Path, dtype: torch.dtype | str) -> Path:
    """The GGUF cache `folder` (float32 safetensors) saved once more in `dtype` beside it (`<folder>-<dtype>`), for
    any dtype but float32 and `stored`; `folder` itself otherwise.

    Loading bfloat16 from the float32 file maps the whole float32 file and converts every tensor beside it (default
    model: 3.8 GB resident at the peak for 1.2 GB of weights); from a file of the model's own dtype transformers keeps
    the weights as views of the mapped file, so the load itself costs nothing and the weights are page cache shared
    by every process that loads them (written pages, e.g. merged deltas, become private copies). Same tensors
    bit for bit: the file holds exactly what the conversion on load produced."""
    if not isinstance(dtype, torch.dtype) or dtype == torch.float32:
        return folder
    name = str(dtype).replace("torch.", "")
    target = folder.with_name(f"{folder.name}-{name}")
    if _cache_is_valid(target):
        return target
    if target.exists():
        log.warning("cache folder %s is incomplete or damaged; rebuilding it", target)
        shutil.rmtree(target)
    log.info("saving %s in %s (one-time, cached)", folder.name, name)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".build-") as tmp:
        out = Path(tmp) / "model"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        model.save_pretrained(out)
        del model
        AutoTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(out)
        meta = json.loads((folder / CACHE_MANIFEST).read_text())
        _write_cache_manifest(out, {"gguf_sha256": meta.get("gguf_sha256"), "gguf_name": meta.get("gguf_name"),
                                    "dtype": name, "converted_from": folder.name})
        try:
            os.replace(out, target)  # atomic: the folder appears complete or not at all
        except OSError:
            if not _cache_is_valid(target):  # another process finished the same conversion first
                raise
    return target


def _cached_gguf_folder(sha256: str, materialize: Any, gguf_name: str, source: str = "") -> Path:
    """Folder with config, tokenizer and safetensors for the GGUF with this sha256; built if needed. `source`: the
    user's GGUF path (named in errors)."""
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
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_name)
        except Exception as err:  # a truncated file ends in numpy reshape errors deep in the GGUF reader
            raise ModelLoadError(
                f"{source or gguf_name}: cannot read this GGUF file ({err.__class__.__name__}: {err}). It is "
                f"truncated or damaged ({gguf_path.stat().st_size:,} bytes), or not a model GGUF that transformers "
                "can dequantize: download it again and check its sha256") from None
        out = tmp_path / "model"
        # The weights are dequantized float32 now; drop the GGUF quantizer so save_pretrained writes them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _write_cache_manifest(out, {"gguf_sha256": sha256, "gguf_name": gguf_name})
        try:
            os.replace(out, folder)  # atomic: the folder appears complete or not at all
        except OSError:
            # another process finished the same build first; use its copy if it is sound
            if not _cache_is_valid(folder):
                raise
    return folder
