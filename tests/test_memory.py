"""neuroshield.memory: the allocator setting (`return_freed_memory`) and its environment variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuroshield import memory

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A fresh process: one 512 KiB block freed (glibc then raises its mmap threshold past 512 KiB), 96 more allocated and
# touched, each followed by a small block that stays, the 96 freed; prints how much of the 48 MiB is still resident.
_RETAINED = r"""
import ctypes, json, sys
from neuroshield import memory
applied = memory.return_freed_memory(int(sys.argv[1])) if sys.argv[1] != "none" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return memory.current_rss_mb()
size = 512 * 1024
libc.free(libc.malloc(size))
before = rss()
blocks, keep = [], []
for _ in range(96):
    blocks.append(libc.malloc(size))
    ctypes.memset(blocks[-1], 1, size)
    keep.append(libc.malloc(4096))
touched = rss()
for b in blocks:
    libc.free(b)
print(json.dumps({"applied": applied, "touched": touched - before, "retained": rss() - before}))
"""


def _retained(threshold: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", _RETAINED, threshold], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout)


glibc_only = pytest.mark.skipif(memory._glibc() is None, reason="the allocator setting is for glibc only")


@glibc_only
def test_return_freed_memory_releases_freed_blocks() -> None:
    default = _retained("none")
    fixed = _retained(str(512 * 1024))  # the blocks' size
    assert default["touched"] > 40 and fixed["touched"] > 40  # the 48 MiB were resident in both
    assert default["retained"] > 40  # glibc's dynamic threshold: the freed blocks stay in the process
    assert fixed["applied"] is True
    assert fixed["retained"] < 8  # a fixed threshold: each block was its own mapping, unmapped when freed


@glibc_only
def test_return_freed_memory_zero_changes_nothing() -> None:
    res = _retained("0")
    assert res["applied"] is False and res["retained"] > 40


def test_allocator_threshold_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(memory.ALLOCATOR_ENV, raising=False)
    assert memory.allocator_threshold() == memory.DEFAULT_ALLOCATOR_THRESHOLD
    monkeypatch.setenv(memory.ALLOCATOR_ENV, "131072")
    assert memory.allocator_threshold() == 131072
    monkeypatch.setenv(memory.ALLOCATOR_ENV, "0")
    assert memory.allocator_threshold() == 0
    assert memory.return_freed_memory() is False
    for bad in ("1M", "-5"):
        monkeypatch.setenv(memory.ALLOCATOR_ENV, bad)
        with pytest.raises(ValueError, match=memory.ALLOCATOR_ENV):
            memory.allocator_threshold()


def test_load_model_sets_the_allocator(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroshield.models import loading

    calls: list[int | None] = []
    monkeypatch.setattr(loading, "return_freed_memory", lambda threshold=None: calls.append(threshold) or True)
    loaded = loading.load_model(str(tiny_folder), dtype="float32")
    assert calls == [None] and loaded.model is not None
