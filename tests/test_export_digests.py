"""The export check's digests of saved files equal the digests of the tensors in memory (read without a copy)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from neuroshield.train.export import file_tensor_digests, saved_digests, tensor_digest


def test_file_digests_equal_the_in_memory_digests(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(5, generator=g),
        "w.f16": torch.randn(4, 4, generator=g).half(),
        "w.f64": torch.randn(3, generator=g).double(),
        "ids": torch.arange(10),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.0),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    want = {name: tensor_digest(t) for name, t in tensors.items()}
    # a chunk smaller than a tensor: the digest is built from several reads
    assert file_tensor_digests(tmp_path / "model.safetensors", chunk=16) == want
    assert saved_digests(tmp_path) == want
    # one changed value changes its tensor's digest only
    tensors["w.bf16"][5, 3] += 1
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = saved_digests(tmp_path)
    assert got["w.bf16"] != want["w.bf16"]
    assert {k: v for k, v in got.items() if k != "w.bf16"} == {k: v for k, v in want.items() if k != "w.bf16"}
