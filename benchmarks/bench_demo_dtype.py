"""The starting commit's demo config, end to end, in float32 and in `auto`, back to back on one machine (issue 15).

`benchmarks/configs/quick-start.yaml` is `configs/quick.yaml` as it was at commit dbddd0e (before the dtype
policy): 4 harmful prompts per language, 24 training steps. It runs with today's code, once with
`--set dtype=float32` and once with `--set dtype=auto` (bfloat16 on a CPU with AMX / AVX-512 BF16), each in a
fresh run folder and a fresh process, and records the wall time of every stage (from the stage markers), the
total, the peak RSS of the process and the load average before and after. The dequantized model cache must exist
already (it is a first-run cost, not part of either side).

    .venv/bin/python benchmarks/bench_demo_dtype.py            # float32 first, then auto
    .venv/bin/python benchmarks/bench_demo_dtype.py --order auto,float32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CONFIG = C.BENCH_DIR / "configs" / "quick-start.yaml"
STAGES = ("identify", "overlap", "validate", "train", "evaluate", "report")


def run_once(dtype: str, out_dir: Path) -> dict[str, Any]:
    name = f"bench-demo-{dtype}"
    run_dir = out_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("neuroshield")), "run", str(CONFIG), "--set", f"name={name}",
           "--out-dir", str(out_dir), "--set", f"dtype={dtype}"]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=C.REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest child so far
    stages = {}
    for s in STAGES:
        marker = run_dir / s / "stage.json"
        if marker.is_file():
            stages[s] = json.loads(marker.read_text()).get("seconds")
    marker = run_dir / "identify" / "stage.json"  # the stage markers record the dtype the model ran in
    resolved = _find_key(json.loads(marker.read_text()), "dtype") if marker.is_file() else None
    headline = run_dir / "evaluate" / "headline.json"
    return {"dtype": dtype, "resolved": resolved, "wall_s": round(wall, 1), "stages_s": stages,
            "peak_rss_children_mb": round(peak_mb), "load_before": load0, "load_after": os.getloadavg(),
            "headline": json.loads(headline.read_text()) if headline.is_file() else None,
            "command": " ".join(cmd)}


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj and not isinstance(obj[key], (dict, list)):
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--order", default="float32,auto", help="the dtypes, in the order they run")
    ap.add_argument("--out-dir", type=Path, default=C.REPO / "runs" / "bench")
    ap.add_argument("--from-json", action="store_true", help="render RESULTS.md from results/demo_dtype.json")
    args = ap.parse_args(argv)
    from bench_dtype import cpu_flags

    if args.from_json:  # render RESULTS.md again from the saved runs (no rerun)
        saved = json.loads((C.RESULTS_DIR / "demo_dtype.json").read_text())
        info, date, runs = saved["machine"], saved["date"], saved["runs"]
    else:
        info = C.machine_info()
        info["cpu_bf16_flags"] = cpu_flags()
        date = C.now_utc()
        runs = [run_once(d, args.out_dir) for d in args.order.split(",")]
    by = {r["dtype"]: r for r in runs}
    result = {"machine": info, "date": date, "config": str(CONFIG.relative_to(C.REPO)), "runs": runs}
    if {"float32", "auto"} <= by.keys():
        result["speedup_total"] = round(by["float32"]["wall_s"] / by["auto"]["wall_s"], 2)
    C.write_json("demo_dtype", result)
    lines = ["## 10. The starting commit's demo config in float32 and auto, back to back (`bench_demo_dtype.py`)", "",
             C.machine_md(info, [r["load_before"] for r in runs] + [r["load_after"] for r in runs], result["date"]),
             f"- CPU bfloat16 flags: {', '.join(info['cpu_bf16_flags']) or 'none'}",
             f"- Config: `{result['config']}` (configs/quick.yaml at dbddd0e), order {args.order}; "
             f"command: `.venv/bin/python benchmarks/bench_demo_dtype.py --order {args.order}`", "",
             "| stage | " + " | ".join(f"{r['dtype']} (s)" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for s in STAGES:
        if any(s in r["stages_s"] for r in runs):
            lines.append(f"| {s} | " + " | ".join(C.fmt(r["stages_s"].get(s) or 0, 1) for r in runs) + " |")
    lines.append("| **whole run (wall, incl. model loads)** | " + " | ".join(f"**{r['wall_s']:.1f}**" for r in runs)
                 + " |")
    lines += ["", "The evaluation of each run (ASR and invalid share in %, 95 % intervals; 4 harmful prompts per language):", "",
              "| model | group | " + " | ".join(f"ASR, {r['dtype']}" for r in runs) + " | "
              + " | ".join(f"invalid, {r['dtype']}" for r in runs) + " |",
              "|---|---|" + "---|" * (2 * len(runs))]
    first = runs[0]["headline"] or {}
    for model, groups in first.get("models", {}).items():
        for group in groups:
            cells = []
            for key in ("asr", "invalid"):
                for r in runs:
                    m = ((r["headline"] or {}).get("models", {}).get(model, {}).get(group, {}).get(key))
                    cells.append(f"{100 * m['value']:.1f} [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}]" if m else "—")
            name = first.get("group_names", {}).get(group, group)
            lines.append(f"| {model} | {name} (n={groups[group]['asr']['n']}) | " + " | ".join(cells) + " |")
    if "speedup_total" in result:
        lines += ["", f"float32 / auto wall time: **{result['speedup_total']}x** (auto resolved to "
                      f"{by['auto']['resolved']})."]
    C.update_results_md("demo_dtype", "\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
