"""Generated tokens/s of the batched generation helper vs unbatched (batch 1), same prompts, greedy.

A (`batched`): `neuroshield.generate.generation.generate(loaded, prompts, GenerationConfig(max_new_tokens=32,
   batch_size=B, stop_at_eos=False))`: batches sorted by length, left padding, KV cache.
B (`unbatched`): the same call with batch_size=1 (one `model.generate` per prompt).

`stop_at_eos=False` so that every prompt gets exactly 32 new tokens on both sides (equal work; with EOS
stopping a batch runs until its longest answer ends, which would blur a throughput comparison). Rounds
run A, B, then B, A, ...; the speed-up is the median of the per-round time ratios B/A. The texts of the
two sides are compared (greedy decoding; left padding can flip near-ties in float32, so the share of
identical answers is reported, not asserted).

`generate_responses` is the public helper (it returns only the texts); `generate` is the same code
path and also returns the token ids, which the benchmark uses to count tokens.

Default: the default model (float32), 8 prompts, batch 8, 32 new tokens, 1 warm-up + 2 timed rounds,
1 torch thread (20 min on the busy shared 2-core machine of RESULTS.md, load ~12).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md-only", action="store_true", help="rebuild the RESULTS.md section from the last JSON")
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args(argv)
    if args.md_only:
        import json

        res = json.loads((C.RESULTS_DIR / "generation.json").read_text())
        C.update_results_md("generation", markdown(res))
        return res
    C.quiet()

    import torch

    torch.set_num_threads(args.threads)
    from neuroshield.generate.generation import GenerationConfig, generate

    info = C.machine_info()
    from neuroshield.models import load_model

    loaded = load_model(args.model)
    # English prompts of the bundled parallel benign set (one language: similar lengths, realistic)
    records = [r for r in C.bench_records(768) if r.language == "en"][: args.prompts]
    prompts = [r.text for r in records]
    cfg_b = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=args.batch_size, stop_at_eos=False)
    cfg_1 = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=1, stop_at_eos=False)
    outputs: dict[str, Any] = {}

    def run(name: str, cfg: Any) -> Any:
        def fn() -> None:
            outputs[name] = generate(loaded, prompts, cfg, progress=False)
        return fn

    def show(r: int, row: dict[str, Any]) -> None:
        print(f"round {r}: batched {row['batched']:.1f}s ({row['batched_cpu']:.1f} cpu)  unbatched "
              f"{row['unbatched']:.1f}s ({row['unbatched_cpu']:.1f} cpu)  speed-up wall "
              f"{row['unbatched'] / row['batched']:.2f}x cpu {row['unbatched_cpu'] / row['batched_cpu']:.2f}x  "
              f"load {row['loadavg'][0]}", flush=True)

    rows = C.interleave({"batched": run("batched", cfg_b), "unbatched": run("unbatched", cfg_1)}, args.rounds,
                        warmup=args.warmup, on_round=show)
    new_tokens = {k: sum(len(g.token_ids) for g in v) for k, v in outputs.items()}
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs["batched"], outputs["unbatched"]))
    speedups = C.pair_ratios(rows, "unbatched", "batched")
    speedups_cpu = C.pair_ratios(rows, "unbatched_cpu", "batched_cpu")
    result: dict[str, Any] = {
        "benchmark": "generation",
        "command": C.command_line(),
        "date": C.now_utc(),
        "machine": info,
        "model": loaded.model_id,
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "new_tokens_per_prompt": args.new_tokens,
        "generated_tokens": new_tokens,
        "rounds": rows,
        "tokens_per_s_median": {k: C.med([new_tokens[k] / row[k] for row in rows]) for k in ("batched", "unbatched")},
        "tokens_per_cpu_s_median": {k: C.med([new_tokens[k] / row[k + "_cpu"] for row in rows])
                                    for k in ("batched", "unbatched")},
        "speedup_median": C.med(speedups),
        "speedup_range": C.spread(speedups),
        "speedup_cpu_median": C.med(speedups_cpu),
        "speedup_cpu_range": C.spread(speedups_cpu),
        "identical_answers": same,
    }
    C.write_json("generation", result)
    if not args.no_md:
        C.update_results_md("generation", markdown(result))
    print(f"batched {result['tokens_per_s_median']['batched']:.2f} tok/s, unbatched "
          f"{result['tokens_per_s_median']['unbatched']:.2f} tok/s, speed-up {result['speedup_median']:.2f}x wall, "
          f"{result['speedup_cpu_median']:.2f}x cpu; "
          f"identical answers {same}/{args.prompts}")
    return result


def markdown(r: dict[str, Any]) -> str:
    loads = [row["loadavg"] for row in r["rounds"]]
    t, tc = r["tokens_per_s_median"], r["tokens_per_cpu_s_median"]
    lo, hi = r["speedup_range"] if r["speedup_range"] else (float("nan"), float("nan"))
    clo, chi = r["speedup_cpu_range"] if r["speedup_cpu_range"] else (float("nan"), float("nan"))
    return "\n".join([
        "## 5. Batched generation vs batch 1 (`bench_generation.py`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], loads, r["date"]),
        f"- Model: {r['model']} (float32); {r['prompts']} English prompts of the bundled parallel benign set; "
        f"greedy, {r['new_tokens_per_prompt']} new tokens per prompt (`stop_at_eos=False`, equal work), KV cache; "
        f"`generate.generation.generate` (the code path of `generate_responses`) with batch_size={r['batch_size']} "
        "vs batch_size=1",
        f"- {len(r['rounds'])} interleaved rounds after a warm-up round; medians over rounds; CPU = process CPU "
        "time (one torch thread: the work itself, without the waits for a core on this shared machine)",
        "",
        "| mode | generated tokens/s (wall) | generated tokens per CPU second |",
        "|---|---:|---:|",
        f"| batched (batch {r['batch_size']}) | {t['batched']:.2f} | {tc['batched']:.2f} |",
        f"| unbatched (batch 1) | {t['unbatched']:.2f} | {tc['unbatched']:.2f} |",
        "",
        f"Speed-up of batching: **{r['speedup_median']:.2f}x wall** (median of per-round ratios; range {lo:.2f}x to "
        f"{hi:.2f}x), **{r['speedup_cpu_median']:.2f}x CPU** (range {clo:.2f}x to {chi:.2f}x). Identical greedy "
        f"answers in both modes: {r['identical_answers']}/{r['prompts']}.",
    ])


if __name__ == "__main__":
    main()
