"""Neuron sets found from bfloat16 statistics against float32 statistics: overlap coefficient per set.

    python experiments/dtype_agreement.py runs/screen-fp32/identify runs/quick/identify

Both runs must use the same identify settings and prompts (here: configs/quick.yaml's identify section, run with
`--set dtype=float32` and with `dtype: auto` = bfloat16 on an AMX CPU). Overlap coefficient = |A ∩ B| / min(|A|, |B|)
over (site, unit) pairs; Jaccard beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open


def units(path: Path) -> set[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # one index tensor per site key ("12.ffn"); score tensors are named otherwise
            if "/" not in key and not key.startswith("score"):
                out.update((key, int(i)) for i in f.get_tensor(key).tolist())
    return out


def main(argv: list[str]) -> int:
    a_dir, b_dir = Path(argv[0]), Path(argv[1])
    rows = []
    for method_dir in sorted(p for p in a_dir.iterdir() if p.is_dir() and (p / "sets.json").is_file()):
        for f in sorted(method_dir.glob("*.safetensors")):
            other = b_dir / method_dir.name / f.name
            if not other.is_file():
                continue
            a, b = units(f), units(other)
            if not a or not b:
                continue
            inter = len(a & b)
            rows.append({"method": method_dir.name, "set": f.stem, "float32": len(a), "bfloat16": len(b),
                         "overlap": inter / min(len(a), len(b)), "jaccard": inter / len(a | b)})
    print("| method | set | neurons float32 | neurons bfloat16 | overlap coefficient | Jaccard |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['set']} | {r['float32']} | {r['bfloat16']} | {r['overlap']:.3f} | {r['jaccard']:.3f} |")
    ms = [r["overlap"] for r in rows if r["set"].startswith("ms_")]
    print(f"\nMS sets: overlap coefficient min {min(ms):.3f}, median {sorted(ms)[len(ms) // 2]:.3f} over {len(ms)} sets")
    json.dump(rows, sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
