"""Files: atomic writes, JSON, content digests, fingerprints, and one clear error for a full or read-only disk.

Every artifact a later step trusts is written here:

* `atomic_write_text` / `atomic_write_bytes` / `write_json`: to a temporary name beside the target, then
  renamed, so a reader sees the old file or the new one, never half of one; `atomic_path` does the same
  for a writer that wants a path (safetensors, torch, matplotlib).
* `atomic_dir`: a folder built under a temporary name and renamed when complete; a failure removes it
  and keeps the previous folder.
* `read_json`: JSON with an error that names the file and what to do.
* `fingerprint` (settings, prompt lists), `records_fingerprint` and `weights_fingerprint`: the one fingerprint
  scheme.
* `file_digest` / `write_manifest` / `check_manifest`: content digests of a folder's files, written last
  and checked when the folder is read.
* `OutputError`: a write that failed because the disk is full or read-only, as one message that says
  which path and what to do.

This module imports nothing from neuroshield, so every package may use it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DIGEST = "sha256"  # SHA-NI makes it the fastest hashlib digest on x86 (about 0.9 GB/s on one busy core)
CHUNK = 1 << 23  # 8 MiB reads
MANIFEST = "neuroshield-manifest.json"

# errno values that mean "this output cannot be written here", and what to tell the user
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on device: free some space or choose another output folder",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another output folder",
    errno.EROFS: "the file system is read-only: choose an output folder you can write to",
    errno.EACCES: "permission denied: choose an output folder you can write to",
    errno.EPERM: "operation not permitted: choose an output folder you can write to",
}
_DISK_WORDS = {"No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
               "Disk quota exceeded": errno.EDQUOT, "Read-only file system": errno.EROFS,
               "os error 30": errno.EROFS, "Permission denied": errno.EACCES, "os error 13": errno.EACCES}


class OutputError(OSError):
    """An output could not be written (disk full, read-only, no permission); nothing half-written is left."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])


class ArtifactError(ValueError):
    """A file a later step trusts is missing, unreadable or does not match its recorded digest."""


def disk_errno(err: BaseException) -> int | None:
    """The errno of a full / read-only / forbidden write, also when a library wrapped it in its own error
    (safetensors reports Rust I/O errors as text); None for other errors."""
    code = getattr(err, "errno", None)
    if code in _DISK_ERRORS:
        return code
    text = str(err)
    for words, code in _DISK_WORDS.items():
        if words in text:
            return code
    return None


def output_error(err: BaseException, path: str | Path) -> OutputError | None:
    """`err` as an OutputError naming `path`, or None when it is not a disk-full / read-only error."""
    if isinstance(err, OutputError):
        return err
    code = disk_errno(err)
    if code is None:
        return None
    return OutputError(f"cannot write {path}: {_DISK_ERRORS[code]} (nothing was left half-written there)", code)


@contextmanager
def raise_output_errors(path: str | Path) -> Iterator[None]:
    """Turn a disk-full / read-only error inside the block into one OutputError naming `path`."""
    try:
        yield
    except Exception as err:
        clear = output_error(err, path)
        if clear is None or clear is err:
            raise
        raise clear from None


def _tmp_name(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends it is renamed to `path` (on an error it is
    removed and `path` keeps its old content). `suffix` keeps the extension a writer may need (".png")."""
    p = Path(path)
    with raise_output_errors(p):
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(p, suffix)
    try:
        yield tmp
        with raise_output_errors(p):
            os.replace(tmp, p)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        clear = output_error(err, p) if isinstance(err, Exception) else None
        if clear is not None and clear is not err:
            raise clear from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """`obj` as JSON (UTF-8, keys in their order, unknown types as str), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str))


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing or damaged file is an ArtifactError that names it and what to do."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{p}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{p}: cannot read the {what} ({err.__class__.__name__}: {err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{p}: the {what} is not valid JSON ({err.msg} at line {err.lineno}, column "
                            f"{err.colno}); it is damaged or was cut off: restore it or delete it and run the "
                            "step that writes it again") from None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends it replaces `path` (the old folder
    is removed only after the new one is in place). On an error the temporary folder is removed, `path`
    is untouched, and a full or read-only disk is reported as one OutputError."""
    p = Path(path)
    with raise_output_errors(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    try:
        yield tmp
        with raise_output_errors(p):
            replace_dir(tmp, p)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        clear = output_error(err, p) if isinstance(err, Exception) else None
        if clear is not None and clear is not err:
            raise clear from None
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Rename folder `src` to `dst`, replacing an existing `dst` (moved aside first, removed after)."""
    if dst.exists():
        old = _tmp_name(dst, ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """A matplotlib figure written atomically as PNG, then closed (also when writing fails)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Fingerprints (of settings and prompt lists) and content digests (of files)
# --------------------------------------------------------------------------------------------------

def fingerprint(obj: Any, n: int = 16, ascii: bool = True) -> str:
    """The fingerprint of settings, prompt lists and other JSON-able values: sha256 of the canonical JSON
    (sorted keys, unknown types as str), first `n` hex digits. `ascii=False` hashes non-ASCII text as UTF-8
    rather than as escapes (the keys of caches written that way keep their value)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, ensure_ascii=ascii).encode()).hexdigest()[:n]


def image_digest(path: str | os.PathLike | None) -> str:
    """sha256 of an image file's bytes ("" for none): image prompts share one instruction text per language,
    so their identity is the picture."""
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return f"missing:{path}"


def records_fingerprint(records: Iterable[Any]) -> str:
    """Fingerprint of a prompt list (PromptRecords): ids, languages, modalities, labels, texts, references and
    image bytes, order-free."""
    return fingerprint(sorted((r.id, r.language, r.modality, r.label, r.text, r.reference or "",
                               image_digest(r.image)) for r in records))


def weights_fingerprint(model: Any) -> str:
    """Fingerprint of a model's weights (`fingerprint` of, per parameter in order: name, shape, float64 sum, L2
    norm and first 8 values). Two checkpoints of one architecture with other weights (a base model and its
    fine-tuned merge) differ, so cached generations of one are never taken for the other's."""
    import torch

    rows = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            # float64 sums over chunks of 2^20 values: a float64 copy of a whole parameter is 8 bytes per value
            # (+1 GB for the default model's embedding, the evaluate stage's peak; benchmarks/RESULTS.md section 8)
            total, squares = 0.0, 0.0
            for chunk in flat.split(1 << 20):
                c = chunk.to(torch.float64)
                total += float(c.sum())
                squares += float(c.square().sum())
            rows.append([name, list(p.shape), total, math.sqrt(squares), flat[:8].double().tolist()])
    return fingerprint(rows)


def bytes_digest(data: bytes) -> str:
    return hashlib.new(DIGEST, data).hexdigest()


def file_digest(path: str | Path) -> str:
    """Content digest (sha256 hex) of one file, read in 8 MiB chunks: about 3 s for the default model's
    2.5 GB safetensors on one busy core."""
    h = hashlib.new(DIGEST)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stat_key(p: Path) -> list[int]:
    st = p.stat()
    # any write changes mtime and ctime; ctime cannot be set back by user tools, a copy gets a new inode
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def folder_files(folder: str | Path, skip: Iterable[str] = ()) -> list[str]:
    """Names of the plain files of `folder` (not hidden, not in `skip`), sorted."""
    d, skipped = Path(folder), set(skip)
    return sorted(p.name for p in d.iterdir() if p.is_file() and p.name not in skipped and not p.name.startswith("."))


def digest_entries(folder: str | Path, files: Iterable[str]) -> dict[str, dict[str, Any]]:
    """name -> {size, sha256, stat} for `files` of `folder` (what `check_manifest` compares)."""
    d = Path(folder)
    return {n: {"size": (d / n).stat().st_size, DIGEST: file_digest(d / n), "stat": _stat_key(d / n)}
            for n in sorted(files)}


def write_manifest(folder: str | Path, files: Iterable[str] | None = None, name: str = MANIFEST,
                   extra: dict[str, Any] | None = None, key: str = "files") -> dict[str, Any]:
    """Record size and digest of `files` (default: every file of `folder` but the manifest) in `folder/name`
    under `key`, with `extra` keys beside. Write it last: a folder without its manifest is incomplete."""
    names = list(files) if files is not None else folder_files(folder, skip=[name])
    manifest = {**(extra or {}), key: digest_entries(folder, names)}
    write_json(Path(folder) / name, manifest)
    return manifest


def check_manifest(folder: str | Path, name: str = MANIFEST, trust_stat: bool = True, key: str = "files"
                   ) -> list[str]:
    """Problems of `folder` against its manifest ([] = sound): a missing manifest or file, another size, another
    digest. `trust_stat`: a file whose size, mtime, ctime and inode are those recorded when it was last hashed
    is not hashed again (a write or a copy changes them; `NEUROSHIELD_VERIFY=full` hashes every file)."""
    d = Path(folder)
    try:
        manifest = read_json(d / name, "manifest")
        entries = manifest[key]
        if not isinstance(entries, dict) or not entries:
            raise KeyError(key)
    except (ArtifactError, KeyError, TypeError) as err:
        return [str(err) if isinstance(err, ArtifactError) else f"{d / name}: no {key!r} entries"]
    trust_stat = trust_stat and os.environ.get("NEUROSHIELD_VERIFY", "") != "full"
    problems, rehashed = [], False
    for n, entry in entries.items():
        f = d / n
        if not isinstance(entry, dict) or DIGEST not in entry:
            problems.append(f"{f}: no digest recorded")
        elif not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != entry.get("size"):
            problems.append(f"{f}: {f.stat().st_size} bytes, {entry.get('size')} recorded")
        elif trust_stat and entry.get("stat") == _stat_key(f):
            continue
        elif file_digest(f) != entry[DIGEST]:
            problems.append(f"{f}: content differs from its recorded digest (damaged or overwritten)")
        else:
            entry["stat"], rehashed = _stat_key(f), True
    if rehashed and not problems:
        try:  # remember the verified state (a copied folder is hashed once, not on every read)
            write_json(d / name, manifest)
        except OSError:
            pass
    return problems


__all__ = ["OutputError", "ArtifactError", "disk_errno", "output_error", "raise_output_errors", "atomic_path",
           "atomic_write_bytes", "atomic_write_text", "write_json", "read_json", "atomic_dir", "replace_dir",
           "save_figure", "fingerprint", "image_digest", "records_fingerprint", "weights_fingerprint", "bytes_digest", "file_digest", "folder_files",
           "digest_entries", "write_manifest", "check_manifest", "MANIFEST"]
