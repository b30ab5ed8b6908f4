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

`--against plain` (results/generation_plain.json, RESULTS.md section `generation_plain`) compares instead:

A (`project`): `generate(loaded, prompts, GenerationConfig(max_new_tokens=32, batch_size=B))` as the pipeline calls
   it: batches sorted by prompt length, each batch stops when every answer in it has ended (EOS).
B (`plain`): plain transformers `model.generate` on the same prompts in their given order, B at a time, left-padded,
   greedy, with the same end-of-sequence ids (a batch stops when every row has ended, transformers' own rule).

on `--prompts` held-out XSafety harmful prompts, the same number per language in 10 languages (mixed lengths), in
the model's `--dtype` (default `auto`). Tokens counted on both sides: each answer's tokens up to and including its
first end-of-sequence token (what the caller gets); tokens/s = those tokens / wall (or CPU) seconds.
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
    ap.add_argument("--against", choices=("unbatched", "plain"), default="unbatched",
                    help="unbatched: batch 1 (default); plain: transformers `generate` on XSafety prompts (see above)")
    ap.add_argument("--dtype", default=None, help="--against plain: the model dtype (default: auto)")
    args = ap.parse_args(argv)
    if args.md_only:
        import json

        name = "generation_plain" if args.against == "plain" else "generation"
        res = json.loads((C.RESULTS_DIR / f"{name}.json").read_text())
        C.update_results_md(name, markdown_plain(res) if args.against == "plain" else markdown(res))
        return res
    C.quiet()
    if args.against == "plain":
        return against_plain(args)

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


LANGS = ["en", "zh", "ar", "ru", "es", "fr", "de", "ja", "bn", "hi"]


def against_plain(args: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from neuroshield.data.loaders import load_prompts
    from neuroshield.generate.generation import GenerationConfig, eos_token_ids, generate
    from neuroshield.models import load_model
    from neuroshield.models.chat import encode_chat
    from neuroshield.models.loading import dtype_name
    from neuroshield.neurons.splits import limit_per_group, select_split

    info = C.machine_info()
    loaded = load_model(args.model, dtype=args.dtype)
    per_lang = max(1, args.prompts // len(LANGS))
    records = limit_per_group(select_split(load_prompts("xsafety", languages=LANGS, label="harmful"), "held-out"),
                              per_lang)
    tok = loaded.tokenizer
    eos = eos_token_ids(loaded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    prompt_lengths = [len(encode_chat(tok, r.text).input_ids) for r in records]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=args.batch_size)
    answers: dict[str, list[tuple[int, ...]]] = {}

    def cut(row: list[int]) -> tuple[int, ...]:
        for j, t in enumerate(row):
            if t in eos:
                return tuple(row[: j + 1])
        return tuple(row)

    def project() -> None:
        answers["project"] = [g.token_ids for g in generate(loaded, records, cfg, progress=False)]

    def plain() -> None:
        out: list[tuple[int, ...]] = []
        for s in range(0, len(records), args.batch_size):
            enc = [encode_chat(tok, r.text).input_ids for r in records[s: s + args.batch_size]]
            width = max(map(len, enc))
            ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in enc])
            att = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            with torch.no_grad():
                gen = loaded.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.new_tokens,
                                            do_sample=False, pad_token_id=pad, eos_token_id=eos)
            out += [cut(row) for row in gen[:, width:].tolist()]
        answers["plain"] = out

    def show(r: int, row: dict[str, Any]) -> None:
        print(f"round {r}: project {row['project']:.1f}s ({row['project_cpu']:.1f} cpu)  plain {row['plain']:.1f}s "
              f"({row['plain_cpu']:.1f} cpu)  load {row['loadavg'][0]}", flush=True)

    rows = C.interleave({"project": project, "plain": plain}, args.rounds, warmup=args.warmup, on_round=show)
    tokens = {k: sum(len(a) for a in v) for k, v in answers.items()}
    same = sum(a == b for a, b in zip(answers["project"], answers["plain"]))
    speed = C.pair_ratios(rows, "plain", "project")
    speed_cpu = C.pair_ratios(rows, "plain_cpu", "project_cpu")
    result: dict[str, Any] = {
        "benchmark": "generation_plain", "command": C.command_line(), "date": C.now_utc(), "machine": info,
        "model": loaded.model_id, "dtype": dtype_name(loaded.model), "prompts": len(records),
        "languages": sorted({r.language for r in records}), "prompt_tokens": prompt_lengths,
        "batch_size": args.batch_size, "new_tokens_max": args.new_tokens, "answer_tokens": tokens,
        "rounds": rows,
        "tokens_per_s_median": {k: C.med([tokens[k] / row[k] for row in rows]) for k in ("project", "plain")},
        "tokens_per_cpu_s_median": {k: C.med([tokens[k] / row[k + "_cpu"] for row in rows]) for k in ("project", "plain")},
        "speedup_median": C.med(speed), "speedup_range": C.spread(speed),
        "speedup_cpu_median": C.med(speed_cpu), "speedup_cpu_range": C.spread(speed_cpu),
        "identical_answers": same,
    }
    C.write_json("generation_plain", result)
    if not args.no_md:
        C.update_results_md("generation_plain", markdown_plain(result))
    print(markdown_plain(result))
    return result


def markdown_plain(r: dict[str, Any]) -> str:
    loads = [row["loadavg"] for row in r["rounds"]]
    t, tc = r["tokens_per_s_median"], r["tokens_per_cpu_s_median"]
    lo, hi = r["speedup_range"] or (float("nan"), float("nan"))
    clo, chi = r["speedup_cpu_range"] or (float("nan"), float("nan"))
    pl = r["prompt_tokens"]
    return "\n".join([
        "## 9. The project's `generate` against plain transformers `generate` (`bench_generation.py --against plain`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], loads, r["date"]),
        f"- Model: {r['model']} in **{r['dtype']}**; {r['prompts']} held-out XSafety harmful prompts "
        f"({len(r['languages'])} languages, {min(pl)}-{max(pl)} prompt tokens with the chat template), greedy, at most "
        f"{r['new_tokens_max']} new tokens, batch {r['batch_size']} on both sides",
        "- project: `generate.generation.generate` (batches sorted by length, a batch stops when all its answers "
        "ended); plain: `model.generate` on the prompts in their given order, left-padded, same end-of-sequence "
        "ids; tokens = each answer up to and including its end-of-sequence token",
        f"- {len(r['rounds'])} interleaved rounds (project, plain / plain, project ...) after a warm-up; medians; "
        "CPU = process CPU time",
        "",
        "| side | answer tokens | tokens/s (wall) | tokens per CPU second |",
        "|---|---:|---:|---:|",
        f"| project `generate` | {r['answer_tokens']['project']} | {t['project']:.1f} | {tc['project']:.1f} |",
        f"| plain transformers `generate` | {r['answer_tokens']['plain']} | {t['plain']:.1f} | {tc['plain']:.1f} |",
        "",
        f"Speed-up of the project's `generate`: **{r['speedup_median']:.2f}x wall** (median of per-round time ratios, "
        f"range {lo:.2f}x to {hi:.2f}x), **{r['speedup_cpu_median']:.2f}x CPU** (range {clo:.2f}x to {chi:.2f}x). "
        f"Identical greedy answers: {r['identical_answers']}/{r['prompts']}.",
    ])


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
