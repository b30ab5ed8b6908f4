"""Throughput of the statistics collection pass vs a plain forward pass of the same batches.

A (`collect`): `neuroshield.neurons.stats.collect_statistics(loaded, records, sites=("ffn",),
   positions="prompt", batch_size=B)`: the real code path, end to end (chat encoding, batching, hooks on
   every FFN site, the early stop after the last layer, the finiteness check, metadata).
B (`plain_trunc`): the same prompts encoded and batched the same way (`encode_chat`,
   `batches_by_length`, `collate`, the same position ids), a plain `model(...)` under no_grad, stopped
   after the same last decoder layer (no final norm, no lm_head): the fair comparison.
C (`plain_full`): the same, full forward (final norm + lm_head logits), what a user would otherwise run.

Rounds run A, B, C, then C, B, A, ... (`_common.interleave`); the overhead is the median over rounds of
A/B - 1. Tokens/s counts real (non-padding) tokens. Target: overhead <= 10 % on CPU.

`--profile` adds a torch.profiler table of one collection pass vs one truncated plain pass (top ops by
self CPU time) to the JSON and RESULTS.md, to find where any overhead goes.

Default: the default model (Qwen2.5-Coder-0.5B, float32), 16 prompts, batch 8, 1 warm-up + 4 timed rounds,
1 torch thread (10 min with --profile on the busy shared 2-core machine of RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md-only", action="store_true", help="rebuild the RESULTS.md section from the last JSON")
    ap.add_argument("--model", default="default", help="load_model spec (default: the default model)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on an oversubscribed shared machine 2 OpenMP threads are slower "
                         "and much noisier; use 2 on an idle 2-core machine)")
    ap.add_argument("--profile", action="store_true", help="also profile one pass of each (torch.profiler)")
    ap.add_argument("--no-md", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    if args.md_only:
        import json

        res = json.loads((C.RESULTS_DIR / "stats_overhead.json").read_text())
        C.update_results_md("stats_overhead", markdown(res))
        return res
    C.quiet()

    import torch

    torch.set_num_threads(args.threads)
    from neuroshield.models import load_model
    from neuroshield.models.chat import batches_by_length, collate, encode_chat
    from neuroshield.neurons.stats import collect_statistics, position_ids_for

    info = C.machine_info()
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    layers = loaded.adapter.layers(model)
    records = C.bench_records(args.prompts)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode_batches() -> list[Any]:
        # exactly what collect_statistics does before its forward passes (max_length=512 default)
        enc = [encode_chat(tok, r.text, max_length=512) for r in records]
        return [collate([enc[i] for i in idx], pad_id) for idx in batches_by_length(enc, args.batch_size)]

    ref_batches = encode_batches()
    real_tokens = int(sum(int(b.attention_mask.sum()) for b in ref_batches))
    padded_tokens = int(sum(b.input_ids.numel() for b in ref_batches))

    def stop_hook(module: Any, args_: Any, out: Any) -> None:
        raise _Stop

    def plain(truncate: bool) -> None:
        batches = encode_batches()
        handle = layers[len(layers) - 1].register_forward_hook(stop_hook) if truncate else None
        try:
            with torch.no_grad():
                for b in batches:
                    try:
                        model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                              position_ids=position_ids_for(b.attention_mask), use_cache=False)
                    except _Stop:
                        pass
        finally:
            if handle is not None:
                handle.remove()

    def collect() -> None:
        collect_statistics(loaded, records, sites=("ffn",), positions="prompt", batch_size=args.batch_size,
                           progress=False)

    fns = {"collect": collect, "plain_trunc": lambda: plain(True), "plain_full": lambda: plain(False)}

    def show(r: int, row: dict[str, Any]) -> None:
        print(f"round {r}: collect {row['collect']:.2f}s ({row['collect_cpu']:.2f} cpu)  plain_trunc "
              f"{row['plain_trunc']:.2f}s ({row['plain_trunc_cpu']:.2f} cpu)  plain_full {row['plain_full']:.2f}s "
              f"({row['plain_full_cpu']:.2f} cpu)  collect/trunc wall {row['collect'] / row['plain_trunc']:.3f} cpu "
              f"{row['collect_cpu'] / row['plain_trunc_cpu']:.3f}  load {row['loadavg'][0]}", flush=True)

    rows = C.interleave(fns, args.rounds, warmup=args.warmup, on_round=show)
    result: dict[str, Any] = {
        "benchmark": "stats_overhead",
        "command": C.command_line(),
        "date": C.now_utc(),
        "machine": info,
        "model": loaded.model_id,
        "dtype": str(next(model.parameters()).dtype),
        "layers": len(layers),
        "ffn_width": int(model.config.intermediate_size),
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "rounds": rows,
        "target_overhead": 0.10,
        # with one thread the CPU time is the work itself (see _common.timed2): the verdict uses it
        "verdict_clock": "cpu" if args.threads == 1 else "wall",
    }
    for clock, sfx in (("wall", ""), ("cpu", "_cpu")):
        r_trunc = C.pair_ratios(rows, "collect" + sfx, "plain_trunc" + sfx)
        r_full = C.pair_ratios(rows, "collect" + sfx, "plain_full" + sfx)
        r_tf = C.pair_ratios(rows, "plain_trunc" + sfx, "plain_full" + sfx)
        result[clock] = {
            "tokens_per_s_median": {k: C.med([real_tokens / row[k + sfx] for row in rows]) for k in fns},
            "overhead_vs_trunc_median": C.med(r_trunc) - 1,
            "overhead_vs_trunc_range": [x - 1 for x in C.spread(r_trunc)],
            "ratio_collect_over_full_median": C.med(r_full),
            "ratio_trunc_over_full_median": C.med(r_tf),
        }
    result["overhead_vs_trunc_median"] = result[result["verdict_clock"]]["overhead_vs_trunc_median"]
    result["target_met"] = bool(result["overhead_vs_trunc_median"] <= 0.10)

    if args.profile:
        result["profile"] = profile(loaded, collect, lambda: plain(True))

    C.write_json("stats_overhead", result)
    if not args.no_md:
        C.update_results_md("stats_overhead", markdown(result))
    print(f"overhead vs truncated plain forward: wall {result['wall']['overhead_vs_trunc_median'] * 100:+.1f} %, "
          f"cpu {result['cpu']['overhead_vs_trunc_median'] * 100:+.1f} % (medians of {len(rows)} pairs)")
    return result


def profile(loaded: Any, collect: Any, plain_trunc: Any) -> dict[str, Any]:
    """Top ops (self CPU) of one collection pass and of one truncated plain pass."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    out: dict[str, Any] = {}
    for name, fn in (("collect", collect), ("plain_trunc", plain_trunc)):
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        top = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
               for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]]
        out[name] = {"total_self_cpu_s": total, "top": top, "table": table}
        print(f"--- profile {name} ---\n{table}", flush=True)
    _ = torch
    return out


def markdown(r: dict[str, Any]) -> str:
    loads = [row["loadavg"] for row in r["rounds"]]
    w, c = r["wall"], r["cpu"]
    verdict = "**met**" if r["target_met"] else "**missed**"

    def rng(x: dict[str, Any]) -> str:
        lo, hi = x["overhead_vs_trunc_range"] or (float("nan"), float("nan"))
        return f"{lo * 100:+.1f} % to {hi * 100:+.1f} %"

    lines = [
        "## 1. Statistics collection overhead (`bench_stats_overhead.py`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], loads, r["date"]),
        f"- Model: {r['model']} ({r['dtype']}, {r['layers']} layers, FFN width {r['ffn_width']}); "
        f"{r['prompts']} prompts (bundled parallel benign set, grouped by language and label as in the pipeline), "
        f"batch {r['batch_size']}, "
        f"{r['real_tokens']} real tokens ({r['padded_tokens']} with padding) per pass; all FFN sites, positions=prompt",
        f"- {len(r['rounds'])} interleaved rounds (A, B, C / C, B, A ...) after warm-up; tokens/s and ratios are "
        "medians over rounds; wall = elapsed time, CPU = this process's CPU time (one torch thread: the work "
        "itself, without the waits for a core on this shared machine)",
        "",
        "| pass | tokens/s wall | tokens/s CPU | time / `plain_trunc` wall | time / `plain_trunc` CPU |",
        "|---|---:|---:|---:|---:|",
        f"| `collect_statistics` (all FFN sites) | {C.fmt(w['tokens_per_s_median']['collect'], 1)} | "
        f"{C.fmt(c['tokens_per_s_median']['collect'], 1)} | {C.fmt(w['overhead_vs_trunc_median'] + 1, 3)} | "
        f"{C.fmt(c['overhead_vs_trunc_median'] + 1, 3)} |",
        f"| plain forward, truncated like collection | {C.fmt(w['tokens_per_s_median']['plain_trunc'], 1)} | "
        f"{C.fmt(c['tokens_per_s_median']['plain_trunc'], 1)} | 1.000 | 1.000 |",
        f"| plain forward, full (norm + lm_head) | {C.fmt(w['tokens_per_s_median']['plain_full'], 1)} | "
        f"{C.fmt(c['tokens_per_s_median']['plain_full'], 1)} | {C.fmt(1 / w['ratio_trunc_over_full_median'], 3)} | "
        f"{C.fmt(1 / c['ratio_trunc_over_full_median'], 3)} |",
        "",
        f"Overhead of collection over the truncated plain forward: **{c['overhead_vs_trunc_median'] * 100:+.1f} % CPU** "
        f"(per-pair range {rng(c)}), {w['overhead_vs_trunc_median'] * 100:+.1f} % wall (range {rng(w)}). "
        f"Collection vs the full plain forward: time ratio {C.fmt(c['ratio_collect_over_full_median'], 3)} CPU, "
        f"{C.fmt(w['ratio_collect_over_full_median'], 3)} wall. Target <= 10 % overhead "
        f"({r['verdict_clock']} time): {verdict}.",
    ]
    if r.get("analysis"):
        lines += ["", r["analysis"]]
    if r.get("profile"):
        p = r["profile"]
        lines += ["", "Profile (torch.profiler self time per op, one pass each; per-op times are wall clock, so under "
                  f"load read the split, not the totals): collect "
                  f"{p['collect']['total_self_cpu_s']:.2f} s, plain_trunc {p['plain_trunc']['total_self_cpu_s']:.2f} s. "
                  "Top ops of the collection pass:", "",
                  "| op | self CPU s | calls |", "|---|---:|---:|"]
        for e in p["collect"]["top"][:10]:
            lines.append(f"| `{e['op']}` | {e['self_cpu_s']:.3f} | {e['calls']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
