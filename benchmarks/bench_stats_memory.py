"""Peak RSS of the statistics collection pass at 100, 1,000 and 5,000 prompts (expect: flat).

Each prompt count runs in a fresh subprocess (`--child N`), which loads the model, builds the prompts,
records its RSS, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`; a sampling thread is
the fallback), runs `collect_statistics(loaded, records, sites=("ffn",), positions="prompt")` and
reports the peak RSS during collection minus the RSS before it (the "collection delta"), plus the
absolute peak and the size of the sums it keeps (`ActivationStats.state_numel`).

Model: SmolLM2-135M-Instruct (`load_model("smollm2")`, float32) with short prompts (first word of the
bundled parallel benign texts, <= 12 characters; ~37 tokens each with SmolLM2's chat template and its
system prompt). `--layers K` keeps only the first K decoder layers (default 2) so that 5,000 prompts
fit in minutes (13 min in all on the busy machine of RESULTS.md): the collection code path is the same (hooks on every
FFN site of the kept layers, early stop after the last one); what could grow with the number of
prompts (per-prompt encodings, anything kept per batch) does not depend on how many layers run.
`--layers 0` runs the whole model (~15x slower).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MARK = "@@RESULT@@ "


def child(args: argparse.Namespace) -> None:
    C.quiet()
    import torch

    torch.set_num_threads(args.threads)
    from neuroshield.models import load_model
    from neuroshield.neurons.stats import collect_statistics

    loaded = load_model(args.model)
    total_layers = int(loaded.model.config.num_hidden_layers)
    layers = loaded.adapter.layers(loaded.model)
    if args.layers and args.layers < len(layers):
        # keep the first K decoder layers (the ModuleList is sliced in place; config follows)
        del layers[args.layers:]
        loaded.model.config.num_hidden_layers = args.layers
    records = C.bench_records(args.child, short=True)
    # warm the model first (one plain forward of one prompt): weights that load lazily (memory-mapped
    # safetensors pages) become resident here, not inside the measured pass
    from neuroshield.models.chat import encode_chat

    warm = encode_chat(loaded.tokenizer, records[0].text)
    with torch.no_grad():
        loaded.model(input_ids=torch.tensor([warm.input_ids]), use_cache=False)
    rss_cold = C.rss_mb()
    longest = max(len(encode_chat(loaded.tokenizer, r.text).input_ids) for r in records)
    gc.collect()
    rss_before = C.rss_mb()
    hwm_process = C.hwm_mb()
    reset_ok = C.reset_peak_rss()
    load0 = C.loadavg()
    t0 = time.perf_counter()
    if reset_ok:
        stats = collect_statistics(loaded, records, sites=("ffn",), positions="prompt", batch_size=args.batch_size,
                                   progress=False)
        peak = C.hwm_mb()
    else:
        with C.PeakSampler() as sampler:
            stats = collect_statistics(loaded, records, sites=("ffn",), positions="prompt",
                                       batch_size=args.batch_size, progress=False)
        peak = sampler.peak
    seconds = time.perf_counter() - t0
    out = {
        "prompts": args.child,
        "groups": len(stats.groups()),
        "counted_tokens": int(stats.tensors["count"].sum().item()),
        "sites": len(stats.sites()),
        "layers_run": len(loaded.adapter.layers(loaded.model)),
        "layers_total": total_layers,
        "longest_prompt_tokens": longest,
        "state_numel": stats.state_numel(),
        "state_mb": stats.state_numel() * 8 / 2**20,
        "rss_before_mb": rss_before,
        "rss_loaded_mb": rss_cold,
        "peak_during_mb": peak,
        "delta_mb": peak - rss_before,
        "process_peak_before_mb": hwm_process,
        "rss_after_mb": C.rss_mb(),
        "peak_method": "clear_refs" if reset_ok else "sampler",
        "seconds": seconds,
        "prompts_per_s": args.child / seconds,
        "loadavg_before": load0,
        "loadavg": C.loadavg(),
        "model": loaded.model_id,
    }
    print(MARK + json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md-only", action="store_true", help="rebuild the RESULTS.md section from the last JSON")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--counts", default="100,1000,5000", help="comma-separated prompt counts")
    ap.add_argument("--layers", type=int, default=2, help="keep the first K decoder layers (0 = all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on an oversubscribed shared machine 2 OpenMP threads are slower)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args)
        return None
    if args.md_only:
        r = json.loads((C.RESULTS_DIR / "stats_memory.json").read_text())
        C.update_results_md("stats_memory", markdown(r))
        return r
    C.quiet()
    info = C.machine_info()
    info["torch_threads"] = args.threads
    counts = [int(x) for x in args.counts.split(",") if x.strip()]
    runs = []
    for n in counts:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--model", args.model,
               "--layers", str(args.layers), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"child for {n} prompts failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(lines[-1][len(MARK):])
        res["wall_s"] = time.perf_counter() - t0
        runs.append(res)
        print(f"{n:>6} prompts: collection delta {res['delta_mb']:.1f} MB, peak {res['peak_during_mb']:.0f} MB "
              f"(before {res['rss_before_mb']:.0f} MB), {res['seconds']:.1f} s, load {res['loadavg'][0]}", flush=True)
    deltas = [r["delta_mb"] for r in runs]
    result: dict[str, Any] = {
        "benchmark": "stats_memory",
        "command": C.command_line(),
        "date": C.now_utc(),
        "machine": info,
        "model": runs[0]["model"] if runs else args.model,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "runs": runs,
        "delta_growth_mb": (deltas[-1] - deltas[0]) if deltas else None,
        "delta_growth_ratio": (deltas[-1] / deltas[0]) if deltas and deltas[0] > 0 else None,
    }
    # "flat": the delta at the largest count within 10 % (or 20 MB) of the smallest count's
    result["flat"] = bool(deltas and (deltas[-1] - deltas[0]) <= max(20.0, 0.10 * deltas[0]))
    C.write_json("stats_memory", result)
    if not args.no_md:
        C.update_results_md("stats_memory", markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    runs = r["runs"]
    loads = [x["loadavg"] for x in runs]
    first = runs[0] if runs else {}
    layer_note = (f"the first {first.get('layers_run')} of its {first.get('layers_total')} decoder layers "
                  f"(`--layers {r['layers']}`; same code path, hooks on every FFN site of those layers)"
                  if r["layers"] else f"all {first.get('layers_total')} decoder layers")
    lines = [
        "## 2. Statistics collection memory (`bench_stats_memory.py`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], loads, r["date"]),
        f"- Model: {r['model']} (float32), {layer_note}; short prompts (first word of the bundled parallel "
        f"benign texts, <= 12 characters, ~37 tokens with the chat template), batch {r['batch_size']}, all FFN "
        "sites, positions=prompt; one fresh subprocess per count",
        "- Delta = peak RSS during `collect_statistics` (VmHWM reset just before it) minus RSS just before it "
        "(after one warm-up forward of one prompt, so lazily mapped weights are already resident)",
        "",
        "| prompts | groups | counted tokens | longest prompt (tokens) | collection delta MB | peak RSS MB | "
        "sums kept MB | seconds | prompts/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in runs:
        lines.append(f"| {x['prompts']} | {x['groups']} | {x['counted_tokens']} | {x['longest_prompt_tokens']} | "
                     f"{x['delta_mb']:.1f} | "
                     f"{x['peak_during_mb']:.0f} | {x['state_mb']:.2f} | {x['seconds']:.1f} | {x['prompts_per_s']:.1f} |")
    verdict = "flat" if r["flat"] else "not flat"
    lines += ["", f"Growth of the collection delta from {runs[0]['prompts']} to {runs[-1]['prompts']} prompts: "
              f"{r['delta_growth_mb']:+.1f} MB: **{verdict}** by this script's rule (growth <= max(20 MB, 10 %)); "
              "expected flat: the sums are O(sites x units x groups)."]
    if len(runs) >= 2:
        a, b = runs[-2], runs[-1]
        slope = (b["delta_mb"] - a["delta_mb"]) * 1024 / max(1, b["prompts"] - a["prompts"])
        lines.append(f"Between {a['prompts']} and {b['prompts']} prompts the peak grows by {slope:.1f} KB per prompt; "
                     f"RSS retained after the pass: {a['rss_after_mb']:.0f} vs {b['rss_after_mb']:.0f} MB.")
    if r.get("analysis"):
        lines += ["", r["analysis"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
