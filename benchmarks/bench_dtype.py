"""float32 against bfloat16 on the CPU: statistics, generation, a neuron-only training step, and agreement.

Both models (`load_model(model, dtype="float32")` and `dtype="bfloat16"`) are loaded in one process and every
measurement runs interleaved (f32, bf16, bf16, f32, ...), so load spikes hit both sides alike:

* `stats`: `collect_statistics` (all FFN sites, positions=prompt) over the same prompts, tokens/s;
* `generate`: `generate_responses` (batches sorted by length, stop when every answer of a batch has ended)
  against a plain transformers `model.generate` on the same prompts in one left-padded batch, tokens/s;
* `train_step`: forward + backward + AdamW step of float32 sparse deltas on 64 random FFN neurons per layer
  (the neuron recipes' code path), 4 examples of at most 96 tokens;
* agreement (not timed): greedy answers of both dtypes to multilingual harmful prompts (XSafety held-out half),
  their judge verdicts, and how many answers are identical.

`auto` (the project's default dtype) picks bfloat16 only where the CPU multiplies it natively
(`amx_bf16` / `avx512_bf16` in /proc/cpuinfo); the machine's flags are recorded with the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    return []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md-only", action="store_true", help="rebuild the RESULTS.md section from the last JSON")
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for statistics and generation")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--agreement", type=int, default=10, help="harmful prompts per language for the agreement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args(argv)
    if args.md_only:
        import json

        res = json.loads((C.RESULTS_DIR / "dtype.json").read_text())
        C.update_results_md("dtype", markdown(res))
        return res
    C.quiet()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from neuroshield.generate.generation import generate_responses
    from neuroshield.judges.registry import get_judge, judge_responses, result_verdict
    from neuroshield.models import load_model
    from neuroshield.models.chat import encode_chat
    from neuroshield.models.loading import auto_dtype
    from neuroshield.neurons.stats import collect_statistics

    info = C.machine_info()
    info["cpu_bf16_flags"] = cpu_flags()
    info["auto_dtype"] = str(auto_dtype()).replace("torch.", "")
    models = {"float32": load_model(args.model, dtype="float32"), "bfloat16": load_model(args.model, dtype="bfloat16")}
    records = [r for r in C.bench_records(768) if r.language == "en"][: args.prompts]
    texts = [r.text for r in records]
    tok = models["float32"].tokenizer
    prompt_tokens = sum(len(encode_chat(tok, t).input_ids) for t in texts)

    def stats_fn(name: str) -> Any:
        return lambda: collect_statistics(models[name], records, batch_size=8, progress=False)

    outs: dict[str, Any] = {}

    def gen_fn(name: str) -> Any:
        def fn() -> None:
            outs[name] = generate_responses(models[name], texts, max_new_tokens=args.new_tokens,
                                            batch_size=len(texts), progress=False)
        return fn

    def plain_fn(name: str) -> Any:
        loaded = models[name]

        def fn() -> None:
            enc = [encode_chat(loaded.tokenizer, t).input_ids for t in texts]
            width = max(map(len, enc))
            pad = loaded.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in enc])
            att = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            with torch.no_grad():
                out = loaded.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.new_tokens,
                                            do_sample=False, pad_token_id=pad)
            outs[f"plain_{name}"] = out[:, width:]
        return fn

    step_fns = {name: make_step(models[name], texts[:4]) for name in models}
    fns: dict[str, Any] = {}
    for name in models:
        fns[f"stats_{name}"] = stats_fn(name)
        fns[f"gen_{name}"] = gen_fn(name)
        fns[f"plaingen_{name}"] = plain_fn(name)
        fns[f"step_{name}"] = step_fns[name]
    rows = C.interleave(fns, args.rounds, warmup=1,
                        on_round=lambda r, row: print(f"round {r}: " + ", ".join(
                            f"{k} {v:.2f}s" for k, v in row.items() if isinstance(v, float) and not k.endswith("_cpu")),
                            flush=True))

    def gen_tokens(name: str) -> int:
        return sum(len(tok(t, add_special_tokens=False).input_ids) for t in outs[name])

    def plain_tokens(name: str) -> int:
        eos = {models[name].tokenizer.eos_token_id, models[name].tokenizer.pad_token_id}
        return int(sum(sum(1 for x in row.tolist() if x not in eos) for row in outs[f"plain_{name}"]))

    timing = {}
    for name in models:
        timing[name] = {
            "stats_tokens_per_s": C.med([prompt_tokens / row[f"stats_{name}"] for row in rows]),
            "gen_tokens_per_s": C.med([gen_tokens(name) / row[f"gen_{name}"] for row in rows]),
            "plain_generate_tokens_per_s": C.med([plain_tokens(name) / row[f"plaingen_{name}"] for row in rows]),
            "train_step_s": C.med([row[f"step_{name}"] for row in rows]),
        }
    speedup = {k: C.med(C.pair_ratios(rows, f"{k}_float32", f"{k}_bfloat16")) for k in ("stats", "gen", "step")}

    # --- agreement: greedy answers and verdicts of both dtypes on multilingual harmful prompts --------
    from neuroshield.data.loaders import load_prompts
    from neuroshield.neurons.splits import limit_per_group, select_split

    langs = ["en", "zh", "ar", "ru", "es", "fr", "de", "ja", "bn", "hi"]
    harm = load_prompts("xsafety:Crimes_And_Illegal_Activities,Unsafe_Instruction_Topic", languages=langs,
                        label="harmful")
    harm = limit_per_group(select_split(harm, "held-out"), args.agreement)
    judge = get_judge("refusal-phrase")
    answers, verdicts = {}, {}
    for name, loaded in models.items():
        answers[name] = generate_responses(loaded, harm, max_new_tokens=24, batch_size=24, progress=False)
        res = judge_responses(judge, answers[name], [r.language for r in harm], prompts=[r.text for r in harm])
        verdicts[name] = [result_verdict(x) for x in res]
    same_text = sum(a == b for a, b in zip(answers["float32"], answers["bfloat16"]))
    same_verdict = sum(a == b for a, b in zip(verdicts["float32"], verdicts["bfloat16"]))
    result: dict[str, Any] = {
        "benchmark": "dtype", "command": C.command_line(), "date": C.now_utc(), "machine": info,
        "model": models["float32"].model_id, "prompts": args.prompts, "prompt_tokens": prompt_tokens,
        "new_tokens": args.new_tokens, "rounds": rows, "timing": timing, "speedup_bf16": speedup,
        "agreement": {"prompts": len(harm), "identical_answers": same_text, "same_verdict": same_verdict,
                      "verdicts": verdicts},
    }
    C.write_json("dtype", result)
    if not args.no_md:
        C.update_results_md("dtype", markdown(result))
    print(markdown(result))
    return result


def make_step(loaded: Any, texts: list[str]) -> Any:
    """One optimizer step of float32 sparse deltas on 64 random FFN neurons per layer (fixed seed)."""
    import torch
    from torch.nn import functional as F

    from neuroshield.models.chat import encode_chat
    from neuroshield.neurons.neuronset import NeuronSet
    from neuroshield.train.sparse import SparseDeltas, slices_from_neuron_set

    g = torch.Generator().manual_seed(0)
    n_layers = loaded.model.config.num_hidden_layers
    width = loaded.model.config.intermediate_size
    units = {f"{layer}.ffn": torch.randperm(width, generator=g)[:64].sort().values for layer in range(n_layers)}
    ns = NeuronSet(units=units, meta={"name": "bench"})
    deltas = SparseDeltas(loaded.model, slices_from_neuron_set(loaded, ns), dtype=torch.float32)
    deltas.detach()  # hooks are attached per call below, so the other dtype's runs are unaffected
    opt = torch.optim.AdamW(deltas.parameters(), lr=1e-4)
    enc = [encode_chat(loaded.tokenizer, t, response="I can't help with that request.").input_ids[:96] for t in texts]
    width_t = max(map(len, enc))
    pad = loaded.tokenizer.pad_token_id
    ids = torch.tensor([list(e) + [pad] * (width_t - len(e)) for e in enc])
    att = torch.tensor([[1] * len(e) + [0] * (width_t - len(e)) for e in enc])

    def fn() -> None:
        deltas.attach()
        try:
            logits = loaded.model(input_ids=ids, attention_mask=att).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="none")
            (loss * att[:, 1:].reshape(-1)).sum().div(att.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            deltas.detach()

    return fn


def markdown(r: dict[str, Any]) -> str:
    loads = [row["loadavg"] for row in r["rounds"]]
    t, s, a = r["timing"], r["speedup_bf16"], r["agreement"]
    flags = ", ".join(r["machine"].get("cpu_bf16_flags", [])) or "none"
    return "\n".join([
        "## 7. float32 against bfloat16 (`bench_dtype.py`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], loads, r["date"]),
        f"- CPU bfloat16 flags: {flags}; `dtype: auto` picks **{r['machine'].get('auto_dtype')}** here",
        f"- Model: {r['model']}; {r['prompts']} English prompts ({r['prompt_tokens']} prompt tokens), greedy, "
        f"{r['new_tokens']} new tokens; {len(r['rounds'])} interleaved rounds after a warm-up; medians",
        "",
        "| measurement | float32 | bfloat16 | bfloat16 speed-up (median of per-round ratios) |",
        "|---|---:|---:|---:|",
        f"| statistics, prompt tokens/s | {t['float32']['stats_tokens_per_s']:.1f} | "
        f"{t['bfloat16']['stats_tokens_per_s']:.1f} | {s['stats']:.2f}x |",
        f"| generation (`generate_responses`), new tokens/s | {t['float32']['gen_tokens_per_s']:.1f} | "
        f"{t['bfloat16']['gen_tokens_per_s']:.1f} | {s['gen']:.2f}x |",
        f"| plain transformers `generate`, one batch, new tokens/s | "
        f"{t['float32']['plain_generate_tokens_per_s']:.1f} | {t['bfloat16']['plain_generate_tokens_per_s']:.1f} | |",
        f"| neuron-only training step (64 FFN neurons/layer, float32 deltas), s | {t['float32']['train_step_s']:.2f} | "
        f"{t['bfloat16']['train_step_s']:.2f} | {s['step']:.2f}x |",
        "",
        f"Agreement on {a['prompts']} held-out XSafety harmful prompts (10 languages, 24 greedy tokens): identical "
        f"answers {a['identical_answers']}/{a['prompts']}, same judge verdict {a['same_verdict']}/{a['prompts']} "
        f"({100 * a['same_verdict'] / max(1, a['prompts']):.1f} %).",
    ])


if __name__ == "__main__":
    main()
