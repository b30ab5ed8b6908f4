"""Training step time and peak memory: neuron-only (sparse deltas) vs dense gradient masking vs LoRA vs full.

Methods (same model, same batch, same loss, AdamW, grad-norm clipping at 1.0, as `train.recipes.train`):

* `neuron`: the project's neuron-only training: `SparseDeltas(model, slices_from_neuron_set(loaded, ns))`
  (frozen base weights; trainable [k, dim] deltas applied by forward hooks). `ns` = `--neurons-per-layer`
  random FFN neurons in every layer (each owns a gate row, an up row and a down column).
* `dense`: the same neurons by dense gradient masking: the gate/up/down weights of every layer are
  trainable, each gradient is multiplied by its 0/1 mask (`train.sparse.dense_masks`) in a tensor hook,
  and AdamW holds state for the whole matrices (what one gets without sparse deltas).
* `lora`: the project's LoRA recipe (`train.recipes.lora_model`: peft, r=16, alpha=32, every linear layer
  of the decoder: q, k, v, o, gate, up, down).
* `full`: every parameter.
* `floor`: a reference, not a method: neuron-only training of ONE neuron of layer 0. Its step is
  a full forward plus the activation-gradient backward through every layer (plus AdamW on ~2.7 k
  numbers): the least any method that trains something in layer 0 must do. Comparing `neuron` and
  `lora` to it shows how much of each step is method-specific work.

The step is the one of `train.trainer.train` (its `Forward` wrapper, `GatherBeforeHead` so the lm_head
only runs at response positions, `response_targets`, cross-entropy on response tokens / their count, backward,
`clip_grad_norm_`, `optimizer.step()`, `zero_grad(set_to_none=True)`), without accelerate (one CPU
process, where accelerate's `prepare` changes nothing). The batch: `--batch-size` harmful-style prompts
of the bundled parallel benign set paired with the project's refusal templates (`refusal_examples`,
`encode_examples`, `collate_examples`).

Measurement: every method runs in its own worker subprocess (its own model copy), so peak RSS is per
method: the worker warms the model (one no-grad forward, so lazily mapped weights are resident), records
its RSS, resets the kernel's peak counter (`/proc/self/clear_refs`), sets the method up and steps; the
"memory delta" is the peak RSS over setup + all steps minus that RSS (trainable copies, gradients,
optimizer state, activations). Step times are interleaved across workers: the coordinator asks worker
A for one step, then B, then A ... (only one worker computes at a time), after one untimed warm-up step
each (the first step allocates the optimizer state). Workers are run in pairs against LoRA (neuron+lora,
dense+lora, full+lora) to bound memory; ratios are medians of per-pair ratios of adjacent steps.

Targets: neuron-only step time <= 0.7x LoRA's, peak memory delta <= 0.75x LoRA's.

`--profile METHOD` runs one worker under torch.profiler for one step and prints the top ops.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

METHODS = ("neuron", "floor", "dense", "lora", "full")
MARK = "@@"


# --------------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, args: argparse.Namespace, method: str) -> None:
        import torch
        from torch import nn

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        from neuroshield.models import load_model
        from neuroshield.neurons.neuronset import NeuronSet
        from neuroshield.train.data import collate_examples, encode_examples, refusal_examples
        from neuroshield.train.loop import Forward, GatherBeforeHead, response_targets
        from neuroshield.train.recipes import lora_model
        from neuroshield.train.sparse import SparseDeltas, dense_masks, freeze, slices_from_neuron_set

        self.torch = torch
        self.method = method
        self.args = args
        loaded = load_model(args.model)
        self.loaded = loaded
        model = loaded.model
        tok = loaded.tokenizer
        # --- the batch -------------------------------------------------------------------------------
        recs = [dataclasses.replace(r, label="harmful") for r in C.bench_records(args.batch_size)]
        ex = refusal_examples(recs)
        enc = encode_examples(loaded, ex, args.max_length)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.batch = collate_examples(enc, pad)
        self.flat, self.target, _ = response_targets(self.batch["labels"])
        self.n_tokens = float(self.target.numel())
        # --- warm the model, then the baseline RSS -----------------------------------------------------
        with torch.no_grad():
            model(input_ids=self.batch["input_ids"][:1], attention_mask=self.batch["attention_mask"][:1],
                  use_cache=False)
        gc.collect()
        self.rss_base = C.rss_mb()
        self.reset_ok = C.reset_peak_rss()
        # --- the neuron set (seeded random FFN neurons, the same for neuron and dense) -----------------
        g = torch.Generator().manual_seed(args.seed)
        n_layers = len(loaded.adapter.layers(model))
        width = int(model.config.intermediate_size)
        units = {f"{l}.ffn": torch.randperm(width, generator=g)[: args.neurons_per_layer].sort().values
                 for l in range(n_layers)}
        ns = NeuronSet(units, meta={"name": "bench-random", "model_id": loaded.model_id,
                                    "config_hash": loaded.config_hash})
        self.info: dict[str, Any] = {"neurons": len(ns), "owned_parameters": ns.owned_parameters(loaded)}
        freeze(model)
        deltas = None
        if method == "floor":
            ns = NeuronSet({"0.ffn": torch.tensor([0])}, meta={"name": "floor", "model_id": loaded.model_id,
                                                             "config_hash": loaded.config_hash})
        if method in ("neuron", "floor"):
            deltas = SparseDeltas(model, slices_from_neuron_set(loaded, ns), dtype=torch.float32)
            net: nn.Module = model
            wrapper = Forward(net, deltas)
            trainable = list(deltas.parameters())
        elif method == "dense":
            slices = slices_from_neuron_set(loaded, ns)
            masks = dense_masks(model, slices)
            params = dict(model.named_parameters())
            trainable = []
            for name, m in masks.items():
                p = params[name]
                p.requires_grad_(True)
                mf = m.to(p.dtype)
                p.register_hook(lambda grad, _m=mf: grad * _m)
                trainable.append(p)
            net = model
            wrapper = Forward(net)
        elif method == "lora":
            net, _, _ = lora_model(loaded, args.lora_r, 2 * args.lora_r, None)
            wrapper = Forward(net)
            trainable = [p for p in wrapper.parameters() if p.requires_grad]
        elif method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            net = model
            wrapper = Forward(net)
            trainable = [p for p in wrapper.parameters() if p.requires_grad]
        else:
            raise ValueError(method)
        self.deltas = deltas
        self.wrapper = wrapper
        self.trainable = trainable
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
        self.gather = GatherBeforeHead(model.get_output_embeddings())
        wrapper.train()
        self.info.update({
            "method": method,
            "trainable_parameters": sum(p.numel() for p in trainable),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "batch_tokens": int(self.batch["attention_mask"].sum()),
            "batch_shape": list(self.batch["input_ids"].shape),
            "response_tokens": int(self.n_tokens),
            "rss_base_mb": self.rss_base,
            "rss_after_setup_mb": C.rss_mb(),
            "model": loaded.model_id,
            "threads": torch.get_num_threads(),
        })
        self.steps: list[dict[str, Any]] = []

    def step(self) -> dict[str, Any]:
        torch = self.torch
        from torch.nn import functional as F

        t0, c0 = time.perf_counter(), time.process_time()
        self.gather.positions = self.flat
        logits = self.wrapper(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"])
        loss = F.cross_entropy(logits[0].float(), self.target, reduction="sum") / max(1.0, self.n_tokens)
        loss.backward()
        self.gather.positions = None
        gn = float(torch.nn.utils.clip_grad_norm_(self.trainable, 1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        rec = {"seconds": dt, "cpu_seconds": dc, "loss": float(loss.detach()), "grad_norm": gn, "loadavg": C.loadavg(),
               "peak_mb": C.hwm_mb(), "rss_mb": C.rss_mb()}
        self.steps.append(rec)
        return rec

    def report(self) -> dict[str, Any]:
        peak = C.hwm_mb()
        return {**self.info, "peak_mb": peak, "delta_mb": peak - self.rss_base, "peak_method":
                "clear_refs" if self.reset_ok else "process-lifetime", "steps": self.steps}


def worker(args: argparse.Namespace) -> None:
    C.quiet()
    tr = Trainer(args, args.worker)
    print(MARK + json.dumps({"ready": tr.info}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            print(MARK + json.dumps(tr.step()), flush=True)
        elif cmd == "report":
            print(MARK + json.dumps(tr.report()), flush=True)
        elif cmd == "quit":
            break


class Worker:
    """Coordinator side of a worker subprocess (line protocol on stdin/stdout)."""

    def __init__(self, method: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--model", args.model,
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--neurons-per-layer", str(args.neurons_per_layer), "--lora-r", str(args.lora_r),
               "--threads", str(args.threads), "--seed", str(args.seed)]
        self.method = method
        import tempfile

        # the worker's stderr (tracebacks, warnings) goes to a temporary file, shown if the worker dies
        self.stderr = tempfile.NamedTemporaryFile("w", prefix=f"train_step_{method}_", suffix=".stderr", delete=False)
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                  bufsize=1)

    def read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.stderr.flush()
        err = Path(self.stderr.name).read_text()[-3000:]
        raise RuntimeError(f"worker {self.method} exited (code {self.p.wait()}):\n{err}")

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            if self.p.poll() is None and self.p.stdin is not None:
                self.p.stdin.write("quit\n")
                self.p.stdin.flush()
            self.p.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
        self.stderr.close()
        Path(self.stderr.name).unlink(missing_ok=True)


def run_pair(methods: tuple[str, ...], args: argparse.Namespace) -> dict[str, Any]:
    workers = [Worker(m, args) for m in methods]
    try:
        ready = {w.method: w.read()["ready"] for w in workers}
        for w in workers:  # warm-up step (allocates optimizer state); untimed
            w.ask("step")
        rows = []
        for r in range(args.steps):
            order = workers if r % 2 == 0 else list(reversed(workers))
            row: dict[str, Any] = {"round": r}
            for w in order:
                rec = w.ask("step")
                row[w.method] = rec["seconds"]
                row[f"{w.method}_cpu"] = rec["cpu_seconds"]
                row[f"{w.method}_loadavg"] = rec["loadavg"]
            rows.append(row)
            print("  " + "  ".join(f"{m} {row[m]:.2f}s ({row[m + '_cpu']:.2f} cpu)" for m in methods)
                  + f"  load {row[methods[0] + '_loadavg'][0]}", flush=True)
        reports = {w.method: w.ask("report") for w in workers}
    finally:
        for w in workers:
            w.close()
    return {"methods": list(methods), "ready": ready, "rounds": rows, "reports": reports}


def mem_available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def plan_phases(methods: list[str], args: argparse.Namespace) -> list[tuple[str, ...]]:
    """Worker groups that run together (steps interleaved): neuron + floor + lora, dense + lora, full + lora.

    Full fine-tuning needs ~5x the model's size (weights, gradients, two AdamW moments, temporaries); when
    the machine has too little memory available for it and a LoRA worker side by side (`--full-alone`,
    or automatically below 2 x 8 model sizes), full runs alone and its ratio to LoRA uses the LoRA steps
    of the other phases (not interleaved; said so in RESULTS.md)."""
    has_lora = "lora" in methods
    phases: list[tuple[str, ...]] = []
    first = tuple(m for m in ("neuron", "floor") if m in methods)
    if first:
        phases.append(first + (("lora",) if has_lora else ()))
    if "dense" in methods:
        phases.append(("dense", "lora") if has_lora else ("dense",))
    if "full" in methods:
        alone = args.full_alone or mem_available_gb() < args.full_pair_min_gb
        phases.append(("full",) if alone or not has_lora else ("full", "lora"))
    if not phases and has_lora:
        phases.append(("lora",))
    return phases


def profile_one(method: str, args: argparse.Namespace) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    tr = Trainer(args, method)
    tr.step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        tr.step()
    ka = prof.key_averages()
    table = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    top = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
           for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]]
    # matrix products split by shape: those with a dimension equal to the LoRA rank or to the number of
    # neurons per layer are the method's own work; the rest is the base model (forward + input gradients)
    small = {args.lora_r, args.neurons_per_layer}
    split = {"method_specific_s": 0.0, "base_s": 0.0, "method_specific_calls": 0, "base_calls": 0}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "aten::addmm", "aten::bmm"):
            continue
        dims = {d for shp in (e.input_shapes or []) for d in (shp or [])}
        kind = "method_specific" if dims & small else "base"
        split[f"{kind}_s"] += e.self_cpu_time_total / 1e6
        split[f"{kind}_calls"] += e.count
    print(f"{method}: matrix products: {split}")
    return {"method": method, "total_self_cpu_s": sum(e.self_cpu_time_total for e in ka) / 1e6, "top": top,
            "matmul_split": split, "table": table}


# --------------------------------------------------------------------------------------------------
# Coordinator
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md-only", action="store_true", help="rebuild the RESULTS.md section from the last JSON")
    ap.add_argument("--model", default="default")
    ap.add_argument("--methods", default="neuron,floor,dense,lora,full")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--neurons-per-layer", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per worker (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-alone", action="store_true", help="run full fine-tuning without a LoRA worker beside it")
    ap.add_argument("--full-pair-min-gb", type=float, default=20.0,
                    help="run full + LoRA side by side only when MemAvailable is at least this (GB)")
    ap.add_argument("--profile", default=None, help="profile one step of these methods (comma-separated)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args(argv)
    if args.md_only:
        import json

        res = json.loads((C.RESULTS_DIR / "train_step.json").read_text())
        C.update_results_md("train_step", markdown(res))
        return res
    if args.worker:
        worker(args)
        return None
    C.quiet()
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = C.machine_info()
    info["torch_threads"] = args.threads
    if args.profile:
        profs = {m: profile_one(m, args) for m in args.profile.split(",")}
        path = C.write_json("train_step_profile", {"command": C.command_line(), "date": C.now_utc(),
                                                   "machine": info, "profiles": profs})
        print(f"wrote {path}")
        return profs
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    phases_spec = plan_phases(methods, args)
    phases = []
    for pair in phases_spec:
        print(f"phase {' vs '.join(pair)}", flush=True)
        phases.append(run_pair(pair, args))
    # --- summary -----------------------------------------------------------------------------------------
    summary: dict[str, Any] = {}
    lora_reports = [ph["reports"]["lora"] for ph in phases if "lora" in ph["reports"]]
    lora_steps = [row["lora"] for ph in phases for row in ph["rounds"] if "lora" in row]
    lora_steps_cpu = [row["lora_cpu"] for ph in phases for row in ph["rounds"] if "lora" in row]
    lora_delta = C.med([r["delta_mb"] for r in lora_reports]) if lora_reports else float("nan")
    if lora_reports:
        summary["lora"] = {
            "step_s_median": C.med(lora_steps),
            "step_cpu_s_median": C.med(lora_steps_cpu),
            "delta_mb": lora_delta,
            "delta_mb_all": [r["delta_mb"] for r in lora_reports],
            "peak_mb": C.med([r["peak_mb"] for r in lora_reports]),
            "trainable_parameters": lora_reports[0]["trainable_parameters"],
            "time_ratio_vs_lora_median": 1.0,
            "cpu_ratio_vs_lora_median": 1.0,
            "mem_ratio_vs_lora": 1.0,
            "paired": True,
        }
    for ph in phases:
        for m, rep in ph["reports"].items():
            if m == "lora":
                continue
            s: dict[str, Any] = {
                "step_s_median": C.med([row[m] for row in ph["rounds"]]),
                "step_cpu_s_median": C.med([row[m + "_cpu"] for row in ph["rounds"]]),
                "delta_mb": rep["delta_mb"],
                "peak_mb": rep["peak_mb"],
                "trainable_parameters": rep["trainable_parameters"],
                "mem_ratio_vs_lora": rep["delta_mb"] / lora_delta if lora_reports else float("nan"),
            }
            if "lora" in ph["reports"]:
                ratios = [row[m] / row["lora"] for row in ph["rounds"]]
                s["time_ratio_vs_lora_median"] = C.med(ratios)
                s["time_ratio_vs_lora_range"] = C.spread(ratios)
                cratios = [row[m + "_cpu"] / row["lora_cpu"] for row in ph["rounds"]]
                s["cpu_ratio_vs_lora_median"] = C.med(cratios)
                s["cpu_ratio_vs_lora_range"] = C.spread(cratios)
                s["mem_ratio_vs_lora_same_phase"] = rep["delta_mb"] / ph["reports"]["lora"]["delta_mb"]
                s["lora_step_s_median_same_phase"] = C.med([row["lora"] for row in ph["rounds"]])
                s["paired"] = True
            elif lora_steps:
                # not interleaved with a LoRA worker (memory): against the LoRA steps of the other phases
                s["time_ratio_vs_lora_median"] = s["step_s_median"] / C.med(lora_steps)
                s["cpu_ratio_vs_lora_median"] = s["step_cpu_s_median"] / C.med(lora_steps_cpu)
                s["paired"] = False
            summary[m] = s
    first_report = next(iter(phases[0]["reports"].values()))
    result: dict[str, Any] = {
        "benchmark": "train_step",
        "command": C.command_line(),
        "date": C.now_utc(),
        "machine": info,
        "model": first_report["model"],
        "batch_shape": first_report["batch_shape"],
        "batch_tokens": first_report["batch_tokens"],
        "response_tokens": first_report["response_tokens"],
        "neurons": first_report["neurons"],
        "owned_parameters": first_report["owned_parameters"],
        "total_parameters": first_report["total_parameters"],
        "neurons_per_layer": args.neurons_per_layer,
        "lora_r": args.lora_r,
        "steps": args.steps,
        "phases": phases,
        "summary": summary,
        "targets": {"time_ratio_neuron_vs_lora": 0.7, "mem_ratio_neuron_vs_lora": 0.75},
    }
    result["verdict_clock"] = "cpu" if args.threads == 1 else "wall"
    if "neuron" in summary and "time_ratio_vs_lora_median" in summary["neuron"]:
        key = "cpu_ratio_vs_lora_median" if result["verdict_clock"] == "cpu" else "time_ratio_vs_lora_median"
        result["time_target_met"] = bool(summary["neuron"][key] <= 0.7)
        result["mem_target_met"] = bool(summary["neuron"]["mem_ratio_vs_lora"] <= 0.75)
    C.write_json("train_step", result)
    if not args.no_md:
        C.update_results_md("train_step", markdown(result))
    for m, s in summary.items():
        print(f"{m:>7}: step {s['step_s_median']:.2f}s  ratio vs lora {s.get('time_ratio_vs_lora_median', float('nan')):.3f}"
              f" (cpu {s.get('cpu_ratio_vs_lora_median', float('nan')):.3f})"
              f"  mem delta {s['delta_mb']:.0f} MB  ratio {s.get('mem_ratio_vs_lora', float('nan')):.3f}")
    return result


def markdown(r: dict[str, Any]) -> str:
    loads = [row[k] for ph in r["phases"] for row in ph["rounds"] for k in row if k.endswith("_loadavg")]
    s = r["summary"]
    names = {"floor": "floor: 1 neuron in layer 0 (reference)", "neuron": "neuron-only (sparse deltas)", "dense": "dense gradient masking", "lora":
             f"LoRA r={r['lora_r']}, all linear", "full": "full fine-tuning"}
    lines = [
        "## 4. Training step: neuron-only vs dense masking vs LoRA vs full (`bench_train_step.py`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], loads, r["date"]),
        f"- Model: {r['model']} (float32, {r['total_parameters'] / 1e6:.0f} M parameters); batch "
        f"{r['batch_shape'][0]} x {r['batch_shape'][1]} tokens ({r['batch_tokens']} real, {r['response_tokens']} "
        f"response tokens); AdamW, clip 1.0; neuron set: {r['neurons_per_layer']} random FFN neurons per layer "
        f"({r['neurons']} neurons, {r['owned_parameters'] / 1e6:.2f} M owned parameters)",
        f"- One worker subprocess per method; {r['steps']} timed steps per worker after one warm-up step, "
        "interleaved step by step with a LoRA worker; ratios are medians of per-pair ratios; CPU = the worker's "
        "CPU time per step (one torch thread: the work itself, without the waits for a core on this shared "
        "machine); memory delta = peak RSS (setup + all steps) minus RSS of the warm loaded model",
        "",
        "| method | trainable params | step s wall | step s CPU | step / LoRA wall | step / LoRA CPU | "
        "memory delta MB | memory / LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        if m not in s:
            continue
        x = s[m]
        star = "" if x.get("paired", True) else " (not interleaved*)"
        lines.append(f"| {names[m]} | {x['trainable_parameters'] / 1e6:.2f} M | {x['step_s_median']:.2f} | "
                     f"{x['step_cpu_s_median']:.2f} | {C.fmt(x.get('time_ratio_vs_lora_median', float('nan')), 3)}{star} | "
                     f"{C.fmt(x.get('cpu_ratio_vs_lora_median', float('nan')), 3)}{star} | {x['delta_mb']:.0f} | "
                     f"{C.fmt(x.get('mem_ratio_vs_lora', float('nan')), 3)} |")
    if any(not x.get("paired", True) for x in s.values()):
        lines += ["", "\\* run alone (too little free memory for full fine-tuning beside a LoRA worker on this shared "
                  "machine): its ratio divides its median step by the median LoRA step of the other phases."]
    if "time_target_met" in r:
        lines += ["", f"Targets: neuron-only step time <= 0.7x LoRA ({r['verdict_clock']} time): "
                  f"**{'met' if r['time_target_met'] else 'missed'}** ({s['neuron']['cpu_ratio_vs_lora_median']:.3f}x CPU, "
                  f"{s['neuron']['time_ratio_vs_lora_median']:.3f}x wall); neuron-only peak memory <= 0.75x LoRA: "
                  f"**{'met' if r['mem_target_met'] else 'missed'}** ({s['neuron']['mem_ratio_vs_lora']:.3f}x)."]
    if len(s.get("lora", {}).get("delta_mb_all", [])) > 1:
        lines.append(f"LoRA memory delta in its {len(s['lora']['delta_mb_all'])} workers: "
                     + ", ".join(f"{d:.0f}" for d in s["lora"]["delta_mb_all"]) + " MB (median used).")
    if r.get("analysis"):
        lines += ["", r["analysis"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
