"""GPU training step: neuron-only vs LoRA vs full on a random-init model of the Llama-3.1-8B architecture.

Model: `AutoConfig.for_model("llama", ...)` with the Llama-3.1-8B dimensions (32 layers, hidden 4096,
FFN 14336, 32 heads / 8 kv heads, vocab 128256, llama3 RoPE scaling), random init directly on the GPU,
bfloat16. No download, no weights: only the shapes matter for time and memory.

Methods (each in a fresh subprocess so that `torch.cuda.max_memory_allocated` is per method):

* `neuron`: the project's `SparseDeltas` on 64 rows of `up_proj` per layer (float32 deltas, as
  `train.recipes.train` uses by default), base weights frozen.
* `lora`: peft LoRA r=16, alpha=32 on every linear layer of the decoder (q, k, v, o, gate, up, down).
* `full`: every parameter.

Step: forward of a batch of 8 x 512 random tokens, cross-entropy on the next token (logits upcast to
float32), backward, AdamW step, zero_grad. `--warmup` untimed steps, then `--steps` timed steps
(CUDA-synchronised); reported: median step time, tokens/s, `torch.cuda.max_memory_allocated` (peak, and
peak minus the memory held right after the model was built). A method that runs out of memory is
reported as OOM (full fine-tuning in bf16 with AdamW needs ~64 GB for weights, gradients and moments
before activations; `--grad-checkpointing` lowers the activation part).

`--tiny` runs the same code on a tiny Llama config (CPU when there is no GPU): a smoke test of the
script, its numbers mean nothing. Results: `benchmarks/results/train_gpu.json` (GPU) or
`train_gpu_tiny.json` (tiny), and the `train_gpu` section of RESULTS.md.

Expected device time for the default run on one H100/H200: ~1 min per method plus start-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MARK = "@@RESULT@@ "
METHODS = ("neuron", "lora", "full")

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    bos_token_id=128000, eos_token_id=128001,
)
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
    hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
)


def build_model(tiny: bool, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **(TINY if tiny else LLAMA_31_8B))
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # older transformers
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.to(device=device, dtype=dtype)


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.nn import functional as F

    from neuroshield.train.sparse import SliceSpec, SparseDeltas, freeze

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    out: dict[str, Any] = {"method": args.child, "device": str(device)}
    t0 = time.perf_counter()
    model = build_model(args.tiny, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    out["build_s"] = time.perf_counter() - t0
    out["parameters"] = n_params
    cfg = model.config
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    freeze(model)
    if args.child == "neuron":
        g = torch.Generator().manual_seed(0)
        rows = min(args.rows, cfg.intermediate_size)
        slices = [SliceSpec(f"model.layers.{l}.mlp.up_proj.weight", 0,
                            torch.randperm(cfg.intermediate_size, generator=g)[:rows].sort().values)
                  for l in range(cfg.num_hidden_layers)]
        deltas = SparseDeltas(model, slices, dtype=torch.float32)
        deltas.to(device)
        trainable = list(deltas.parameters())
        net = model
    elif args.child == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, bias="none",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          task_type="CAUSAL_LM")
        net = get_peft_model(model, lcfg)
        trainable = [p for p in net.parameters() if p.requires_grad]
    elif args.child == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        net = model
        trainable = list(model.parameters())
    else:
        raise ValueError(args.child)
    out["trainable_parameters"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device,
                          generator=torch.Generator(device=device).manual_seed(1))
    if cuda:
        torch.cuda.synchronize()
        out["allocated_after_build_mb"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        out["allocated_after_build_mb"] = None

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        s = time.perf_counter()
        logits = net(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - s

    try:
        for _ in range(args.warmup):
            step()
        times = [step() for _ in range(args.steps)]
        out["step_s"] = times
        out["step_s_median"] = statistics.median(times)
        out["tokens_per_s"] = args.batch * args.seq / out["step_s_median"]
        out["status"] = "ok"
    except torch.cuda.OutOfMemoryError as err:  # type: ignore[attr-defined]
        out["status"] = "OOM"
        out["error"] = str(err).splitlines()[0][:300]
    if cuda:
        out["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["max_memory_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        out["peak_over_build_mb"] = out["max_memory_allocated_mb"] - out["allocated_after_build_mb"]
    else:
        out["peak_rss_mb"] = C.hwm_mb()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md-only", action="store_true", help="rebuild the RESULTS.md section from the last JSON")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama config (smoke test; CPU without a GPU)")
    ap.add_argument("--cpu", action="store_true", help="force CPU")
    ap.add_argument("--methods", default="neuron,lora,full")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (tiny: 2)")
    ap.add_argument("--seq", type=int, default=None, help="default 512 (tiny: 32)")
    ap.add_argument("--rows", type=int, default=64, help="up_proj rows per layer for neuron-only")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs only)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per method subprocess")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args(argv)
    if args.batch is None:
        args.batch = 2 if args.tiny else 8
    if args.seq is None:
        args.seq = 32 if args.tiny else 512
    C.quiet()
    if args.md_only:
        real_json = C.RESULTS_DIR / "train_gpu.json"
        res = json.loads((real_json if real_json.exists() else C.RESULTS_DIR / "train_gpu_tiny.json").read_text())
        real = res["gpu"] and not res["tiny"]
        C.update_results_md("train_gpu", markdown(res) if real else markdown_not_measured(res))
        return res
    if args.child:
        print(MARK + json.dumps(child(args)), flush=True)
        return None
    import torch

    info = C.machine_info()
    gpu = torch.cuda.is_available() and not args.cpu
    runs = []
    for m in [x for x in args.methods.split(",") if x]:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", m, "--batch", str(args.batch), "--seq",
               str(args.seq), "--rows", str(args.rows), "--lora-r", str(args.lora_r), "--warmup", str(args.warmup),
               "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
        cmd += [f for f, on in (("--tiny", args.tiny), ("--cpu", args.cpu),
                                ("--grad-checkpointing", args.grad_checkpointing)) if on]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            runs.append({"method": m, "status": f"timeout after {args.timeout}s"})
            continue
        lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
        if not lines:
            err = proc.stderr.strip().splitlines()
            status = "OOM" if "OutOfMemory" in proc.stderr else f"failed (exit {proc.returncode})"
            runs.append({"method": m, "status": status, "error": "\n".join(err[-5:])})
        else:
            runs.append(json.loads(lines[-1][len(MARK):]))
        r = runs[-1]
        print(f"{m}: {r.get('status')} step {r.get('step_s_median', float('nan')):.3f}s "
              f"peak {r.get('max_memory_allocated_mb', r.get('peak_rss_mb', float('nan'))):.0f} MB", flush=True)
    result = {
        "benchmark": "train_gpu",
        "command": C.command_line(),
        "date": C.now_utc(),
        "machine": info,
        "tiny": args.tiny,
        "gpu": gpu,
        "architecture": "tiny llama" if args.tiny else "Llama-3.1-8B (random init)",
        "dtype": "bfloat16",
        "batch": args.batch,
        "seq": args.seq,
        "rows_per_layer": args.rows,
        "lora_r": args.lora_r,
        "grad_checkpointing": args.grad_checkpointing,
        "warmup": args.warmup,
        "steps": args.steps,
        "runs": runs,
        "loadavg": C.loadavg(),
    }
    real = gpu and not args.tiny
    C.write_json("train_gpu" if real else "train_gpu_tiny", result)
    if not args.no_md:
        C.update_results_md("train_gpu", markdown(result) if real else markdown_not_measured(result))
    return result


def _row(r: dict[str, Any], lora: dict[str, Any] | None) -> str:
    if r.get("status") != "ok":
        return f"| {r['method']} | {r.get('trainable_parameters', 0) / 1e6:.1f} M | {r.get('status')} | | | |"
    ratio = (r["step_s_median"] / lora["step_s_median"]) if lora and lora.get("status") == "ok" else float("nan")
    return (f"| {r['method']} | {r['trainable_parameters'] / 1e6:.1f} M | {r['step_s_median']:.3f} | {C.fmt(ratio, 3)} | "
            f"{r['tokens_per_s']:.0f} | {r['max_memory_allocated_mb'] / 1024:.1f} GiB "
            f"(+{r['peak_over_build_mb'] / 1024:.1f}) |")


def markdown(r: dict[str, Any]) -> str:
    lora = next((x for x in r["runs"] if x["method"] == "lora"), None)
    lines = [
        "## 6. GPU training step, Llama-3.1-8B architecture (`bench_train_gpu.py`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], None, r["date"]),
        f"- Random-init {r['architecture']}, {r['dtype']}, batch {r['batch']} x {r['seq']}, AdamW, "
        f"{r['warmup']} warm-up + {r['steps']} timed steps per method, one subprocess per method"
        + (", gradient checkpointing" if r["grad_checkpointing"] else ""),
        "",
        "| method | trainable | step s (median) | / LoRA | tokens/s | max_memory_allocated (over model) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(x, lora) for x in r["runs"]]
    return "\n".join(lines)


def markdown_not_measured(r: dict[str, Any]) -> str:
    ok = [x["method"] for x in r["runs"] if x.get("status") == "ok"]
    return "\n".join([
        "## 6. GPU training step, Llama-3.1-8B architecture (`bench_train_gpu.py`)",
        "",
        "**The GPU figures were not measured in this session** (no GPU was available). The script is ready: "
        "run `python benchmarks/bench_train_gpu.py` on a machine with one CUDA GPU (~1 min of device time per "
        "method plus start-up); it fills this section with the step time, tokens/s and "
        "`torch.cuda.max_memory_allocated` of neuron-only (64 `up_proj` rows per layer, `SparseDeltas`), "
        "LoRA r=16 on every linear layer, and full fine-tuning (bf16, batch 8 x 512, AdamW). Full fine-tuning "
        "is expected not to fit in 80 GB without `--grad-checkpointing` (weights + gradients + AdamW moments "
        "alone are ~64 GB in bf16); the script reports OOM rather than failing.",
        "",
        f"- Smoke test on CPU: `{r['command']}` on {r['machine'].get('cpu_model')} ({r['date']}): "
        f"methods that ran: {', '.join(ok) or 'none'} (tiny config, numbers meaningless; "
        "`benchmarks/results/train_gpu_tiny.json`).",
    ])


if __name__ == "__main__":
    main()
