"""Run every CPU benchmark in turn (and the GPU one when a GPU is present, or its --tiny smoke test).

    python benchmarks/run_all.py                 # all, default sizes
    python benchmarks/run_all.py stats_overhead generation   # some
    python benchmarks/run_all.py --skip train_step

Each benchmark is a separate process (one at a time: running two at once would make both slower and
noisier), writes `benchmarks/results/<name>.json` and refreshes its section of `benchmarks/RESULTS.md`.
Extra arguments after `--` are passed to every script (e.g. `-- --threads 2`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "stats_overhead": "bench_stats_overhead.py",
    "stats_memory": "bench_stats_memory.py",
    "plnd_vs_ablation": "bench_plnd_vs_ablation.py",
    "train_step": "bench_train_step.py",
    "generation": "bench_generation.py",
    "memory": "bench_memory.py",
    "train_gpu": "bench_train_gpu.py",
}


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    ap.add_argument("--skip", action="append", default=[], help="benchmark to skip (repeatable)")
    args = ap.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names + args.skip if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in names:
        if name in args.skip:
            continue
        cmd = [sys.executable, str(HERE / BENCHMARKS[name]), *extra]
        if name == "train_gpu":
            try:
                import torch

                gpu = torch.cuda.is_available()
            except ImportError:
                gpu = False
            if not gpu:
                cmd.append("--tiny")  # no GPU: the smoke test; RESULTS.md says the GPU figures were not measured
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
