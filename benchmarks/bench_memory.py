"""Peak resident memory of training, identify and evaluate against 1.5x (weights + trainable state + activations).

Each (model, dtype, stage) runs in a fresh subprocess, twice:

* the **memory run**: the stage through the project's public API (`train.recipes.train`, `neurons.identify.identify`,
  `evaluate.evaluate.evaluate`) at small but realistic sizes. The peak is `VmHWM` of `/proc/self/status`, reset
  (`/proc/self/clear_refs`) at every phase boundary, so each phase gets its own exact peak; phases are marked by
  wrapping the functions the stage calls (load, benign answers, base digests, loop, patch + merge, export save,
  export digests, export load check, ...). The measure is (peak RSS - RSS right after `import torch`).
* the **activation run**: the same stage with `torch.profiler(profile_memory=True)` active over its main phase only
  (the training loop, the statistics pass, the generation); the activations are the highest running total of
  tensor bytes allocated in that window ("Total Allocated" of the profiler's memory events), less the optimizer
  state and gradients created there (training). Tensor bytes, not RSS: no allocator slack.

The bound is 1.5 x (weights + trainable state + activations): weights = bytes of the model's parameters and
buffers (tied tensors once); trainable state = the neuron deltas in float32 with their gradients and two AdamW
moments (16 bytes per value) plus the original slices `merge()` keeps, or the statistics' float64 running sums for
identify; nothing for evaluate.

Sizes (defaults): training: precise-shield on a seeded random FFN neuron set at the 0.03 % parameter budget
(spread over the layers), 16 English XSafety prompts + 8 alpaca-seed prompts answered by the base model (64 new
tokens), 8 steps of batch 4, export with its checks; identify: 3 languages x 8 harmful (XSafety) + 8 benign
(parallel benign) held-in prompts, plnd and precise-shield; evaluate: 4 held-out XSafety prompts in each of 10
languages + 2 parallel-benign prompts per language, batch 24, 48 new tokens, refusal-phrase judge.

`--malloc-thresholds 0,1048576` runs every stage once per glibc allocator setting (`NEUROSHIELD_MALLOC_THRESHOLD`
in the worker's environment, set by `load_model` through `memory.return_freed_memory`; 0 = glibc's own dynamic
threshold), alternating, `--repeats` times: memory and the main phase's seconds side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

STAGES = ("train", "identify", "evaluate")
LANGS = ["en", "zh", "ar", "ru", "es", "fr", "de", "ja", "bn", "hi"]
# the phase whose tensor allocations are the stage's activations (profiled in the activation run)
MAIN_PHASE = {"train": "loop", "identify": "statistics", "evaluate": "generation"}


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0])
    return out


def _mb(kb: int) -> float:
    return round(kb / 1024.0, 1)


class Phases:
    """Phase marks: each phase's exact peak RSS (VmHWM, reset at every boundary) and its RSS at start and end; a
    thread sampling /proc/self/status every 10 ms records the anonymous / file-backed split at the phase's highest
    sampled RSS (file-backed: pages of memory-mapped files, e.g. safetensors being read)."""

    def __init__(self, profile_phase: str | None = None) -> None:
        import threading

        self.rows: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self._top: dict[str, int] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()
        self.profile_phase = profile_phase
        self._prof: Any = None
        self.profiled: dict[str, Any] = {}
        self.extra_state_bytes = 0  # optimizer state / gradients created inside the profiled window (training)

    def _sample(self) -> None:
        while True:
            st = _status()
            with self._lock:
                if st["VmRSS"] > self._top.get("VmRSS", 0):
                    self._top = st
            time.sleep(0.01)

    def mark(self, name: str) -> None:
        st = _status()
        if self.current is not None:
            if self.current["phase"] == self.profile_phase:
                self._stop_profile()
            with self._lock:
                top = self._top
            self.current.update(peak_mb=_mb(st["VmHWM"]), rss_end_mb=_mb(st["VmRSS"]),
                                anon_end_mb=_mb(st.get("RssAnon", 0)), file_end_mb=_mb(st.get("RssFile", 0)),
                                sampled_peak_mb=_mb(top.get("VmRSS", 0)), anon_at_peak_mb=_mb(top.get("RssAnon", 0)),
                                file_at_peak_mb=_mb(top.get("RssFile", 0)),
                                seconds=round(time.perf_counter() - self.current.pop("_t"), 2))
            self.rows.append(self.current)
        if name == "end":
            self.current = None
            return
        C.reset_peak_rss()
        st = _status()
        with self._lock:
            self._top = st
        self.current = {"phase": name, "rss_start_mb": _mb(st["VmRSS"]), "_t": time.perf_counter()}
        if name == self.profile_phase and self._prof is None:
            self._start_profile()

    def _start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def _stop_profile(self) -> None:
        if self._prof is None:
            return
        self._prof.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "trace.json"
            self._prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text())["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        del events
        # the phase may run several times (statistics per language, generation per role): the highest window counts
        old = self.profiled
        self.profiled = {"phase": self.profile_phase, "windows": old.get("windows", 0) + 1,
                         "memory_events": old.get("memory_events", 0) + len(totals),
                         "peak_allocated_mb": max(old.get("peak_allocated_mb", 0.0),
                                                  round(max(totals, default=0) / 2**20, 1))}
        self._prof = None


def wrap(module: Any, attr: str, phases: Phases, before: str, after: str | None = None, once: bool = False,
         first_call: bool = False) -> None:
    """Mark phase `before` when `module.attr` is called (and `after` when it returns); `once`: `before` at the
    first call only; `first_call`: later calls mark nothing (they belong to the phase they run in)."""
    fn = getattr(module, attr)
    seen = {"n": 0}

    def wrapped(*a: Any, **k: Any) -> Any:
        if first_call and seen["n"]:
            return fn(*a, **k)
        if not (once and seen["n"]):
            phases.mark(before)
        seen["n"] += 1
        out = fn(*a, **k)
        if after is not None:
            phases.mark(after)
        return out

    setattr(module, attr, wrapped)


def prompts(source: str, label: str, languages: list[str], split: str, limit: int) -> list[Any]:
    """The pipeline's pick (`Pipeline.prompts`): `source` in `languages`, `split` by id, `limit` per language."""
    from neuroshield.data.loaders import DATASETS, load_prompts
    from neuroshield.neurons.splits import limit_per_group, select_split

    name = source.split(":", 1)[0]
    have = set(DATASETS[name].languages) if name in DATASETS else None
    langs = [lang for lang in languages if have is None or lang in have]
    recs = [r for r in load_prompts(source, languages=langs, label=label) if r.label == label]
    return limit_per_group(select_split(recs, split, 0.5, 0), limit, 0)


def weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def budget_set(loaded: Any, budget: float, seed: int) -> Any:
    """A seeded random FFN neuron set owning about `budget` x all parameters, the same count in every layer."""
    import torch

    from neuroshield.models.sites import count_parameters, resolve_sites
    from neuroshield.neurons.neuronset import NeuronSet

    sites = resolve_sites(loaded.model, loaded.adapter, ("ffn",))
    k = max(1, round(budget * count_parameters(loaded.model) / sites[0].params_per_unit / len(sites)))
    g = torch.Generator().manual_seed(seed)
    units = {s.key: torch.randperm(s.width, generator=g)[:k].sort().values for s in sites}
    return NeuronSet(units=units, meta={"name": f"random-budget-{budget}", "method": "random"})


# --------------------------------------------------------------------------------------------------
# Worker: one stage in this process
# --------------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> dict[str, Any]:
    st0 = _status()
    import torch

    st_torch = _status()
    torch.set_num_threads(args.threads)
    C.quiet()
    profile_phase = MAIN_PHASE[args.stage] if args.activations else None
    ph = Phases(profile_phase)
    ph.mark("imports")
    from neuroshield.memory import allocator_threshold
    from neuroshield.models import load_model
    from neuroshield.models.loading import dtype_name

    ph.mark("load")
    loaded = load_model(args.model, dtype=args.dtype)
    ph.mark("data")
    out: dict[str, Any] = {"stage": args.stage, "model": loaded.model_id, "spec": args.model,
                           "dtype": dtype_name(loaded.model), "requested_dtype": args.dtype,
                           "rss_start_mb": _mb(st0["VmRSS"]), "rss_after_torch_mb": _mb(st_torch["VmRSS"]),
                           "malloc_threshold": allocator_threshold(),
                           "weight_bytes": weight_bytes(loaded.model),
                           "parameters": sum(p.numel() for p in loaded.model.parameters())}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if args.stage == "train":
            out.update(run_train(args, loaded, ph, Path(tmp)))
        elif args.stage == "identify":
            out.update(run_identify(args, loaded, ph, Path(tmp)))
        else:
            out.update(run_evaluate(args, loaded, ph, Path(tmp)))
        ph.mark("end")
    out["phases"] = ph.rows
    out["peak_mb"] = max(r["peak_mb"] for r in ph.rows)
    out["peak_delta_mb"] = round(out["peak_mb"] - out["rss_after_torch_mb"], 1)
    out["profiled"] = ph.profiled
    if ph.profiled:
        act = ph.profiled["peak_allocated_mb"] - ph.extra_state_bytes / 2**20
        out["activations_mb"] = round(max(0.0, act), 1)
    return out


def run_train(args: argparse.Namespace, loaded: Any, ph: Phases, tmp: Path) -> dict[str, Any]:
    import torch

    from neuroshield.settings import TrainConfig, TrainOptions
    from neuroshield.train import export, loop, patch, recipes, trainer

    harmful = prompts("xsafety", "harmful", ["en"], "held-in", args.train_harmful)
    benign = prompts("alpaca-seed", "benign", ["en"], "held-in", args.train_benign)
    ns = budget_set(loaded, recipes.DEFAULT_BUDGET, 0)
    wrap(recipes, "prepare_examples", ph, "benign answers", after="encode + setup")
    # the base digests; the export's load check digests the trained model again, inside its own phase
    wrap(export, "param_digests", ph, "base digests", after="deltas + optimizer", first_call=True)
    wrap(loop, "training_batch", ph, "loop", once=True)
    wrap(patch, "patch_from_deltas", ph, "patch + merge")
    wrap(export, "save_merged", ph, "export: save_pretrained")
    wrap(export, "saved_digests", ph, "export: saved digests")
    wrap(export, "verify_structure", ph, "export: load check", after="summary")
    trainable = {}

    def on_step(step: int, rec: dict[str, Any]) -> None:
        trainable["step"] = step

    res = trainer.train(loaded, "precise-shield", TrainConfig(languages=["en"], steps=args.steps,
                                                              batch_size=args.batch_size),
                        neuron_set=ns, harmful=harmful, benign=benign, out_dir=tmp / "run",
                        options=TrainOptions(resume=False, progress=False), on_step=on_step)
    n = int(res.trainable_parameters)
    # float32 deltas + their gradient + two AdamW moments, and merge()'s original slices in the weights' dtype
    elem = next(loaded.model.parameters()).element_size()
    ph.extra_state_bytes = 12 * n  # gradient + moments appear inside the loop
    return {"trainable_parameters": n, "neurons": len(ns), "state_bytes": 16 * n + elem * n,
            "sizes": {"harmful": len(harmful), "benign": len(benign), "steps": args.steps,
                      "batch_size": args.batch_size, "max_length": recipes.TrainConfig().max_length,
                      "benign_max_new_tokens": recipes.TrainConfig().benign_max_new_tokens},
            "train_summary": {k: getattr(res, k) for k in ("rss_before_mb", "peak_rss_train_mb", "peak_rss_mb",
                                                          "seconds_per_step")}}


def run_identify(args: argparse.Namespace, loaded: Any, ph: Phases, tmp: Path) -> dict[str, Any]:
    from neuroshield.neurons import identify as ident

    langs = LANGS[: args.identify_languages]
    harmful = prompts("xsafety", "harmful", langs, "held-in", args.identify_per_language)
    benign = prompts("parallel-benign", "benign", langs, "held-in", args.identify_per_language)
    wrap(ident, "collect_statistics", ph, "statistics", after="scores + sets")
    res = ident.identify(loaded, harmful, benign, languages=langs, out_dir=tmp / "identify", progress=False)
    state = sum(t.numel() * t.element_size() for t in res.stats.tensors.values())
    return {"state_bytes": state, "sizes": {"languages": langs, "harmful": len(harmful), "benign": len(benign),
                                            "methods": res.summary["methods"], "batch_size": 8}}


def run_evaluate(args: argparse.Namespace, loaded: Any, ph: Phases, tmp: Path) -> dict[str, Any]:
    from neuroshield.evaluate import evaluate as ev
    from neuroshield.generate import generation

    suite = ev.EvalSuite(harmful=prompts("xsafety", "harmful", LANGS, "held-out", args.eval_harmful),
                         benign=prompts("parallel-benign", "benign", LANGS, "held-out", args.eval_benign))
    wrap(ev, "weights_fingerprint", ph, "weights fingerprint", after="cache + judge setup")
    wrap(generation, "generate", ph, "generation", after="judge + write")
    res = ev.evaluate(loaded, suite, out_dir=tmp / "eval", batch_size=args.eval_batch_size,
                      max_new_tokens=args.eval_new_tokens, progress=False)
    return {"state_bytes": 0, "sizes": {"harmful": len(suite.harmful), "benign": len(suite.benign),
                                        "batch_size": args.eval_batch_size, "max_new_tokens": args.eval_new_tokens},
            "timings": res.timings}


# --------------------------------------------------------------------------------------------------
# Parent: every (model, dtype, stage) in fresh subprocesses
# --------------------------------------------------------------------------------------------------

WORKER_FLAGS = ("threads", "steps", "batch_size", "train_harmful", "train_benign", "identify_languages",
                "identify_per_language", "eval_harmful", "eval_benign", "eval_batch_size", "eval_new_tokens")


def spawn(args: argparse.Namespace, model: str, dtype: str, stage: str, activations: bool,
          malloc_threshold: int | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--dtype", dtype,
           "--stage", stage, "--json", path]
    for flag in WORKER_FLAGS:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if activations:
        cmd.append("--activations")
    env = dict(os.environ)
    if malloc_threshold is not None:
        from neuroshield.memory import ALLOCATOR_ENV

        env[ALLOCATOR_ENV] = str(malloc_threshold)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        os.unlink(path)
        raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    res = json.loads(Path(path).read_text())
    os.unlink(path)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md-only", action="store_true", help="rebuild the RESULTS.md section from the last JSON")
    ap.add_argument("--models", default="default,smollm2")
    ap.add_argument("--dtypes", default="auto,float32")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--no-activations", action="store_true", help="skip the profiled activation runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--malloc-thresholds", default="",
                    help="comma list of NEUROSHIELD_MALLOC_THRESHOLD values (bytes; 0 = glibc's dynamic threshold) "
                         "to run every stage with, alternating; default: the environment's setting")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every (stage, malloc threshold), alternating")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-harmful", type=int, default=16)
    ap.add_argument("--train-benign", type=int, default=8)
    ap.add_argument("--identify-languages", type=int, default=3)
    ap.add_argument("--identify-per-language", type=int, default=8)
    ap.add_argument("--eval-harmful", type=int, default=4)
    ap.add_argument("--eval-benign", type=int, default=2)
    ap.add_argument("--eval-batch-size", type=int, default=24)
    ap.add_argument("--eval-new-tokens", type=int, default=48)
    ap.add_argument("--out-name", default="memory", help="results/<name>.json (and the RESULTS.md section 'memory')")
    ap.add_argument("--no-md", action="store_true")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine the runs of these results files (e.g. one per model, run side by side) into "
                         "results/<out-name>.json and its RESULTS.md section")
    ap.add_argument("--after", nargs="+", default=None, metavar="JSON",
                    help="with --merge: results files measured after a change (e.g. with --no-activations), shown "
                         "as a second table; their activations are taken from the merged runs of the same model, "
                         "dtype and stage (the change must not touch the stage's main phase)")
    ap.add_argument("--after-label", default="after the change")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--stage", default="train", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    ap.add_argument("--activations", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(args)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        return res
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        res = {**parts[0], "command": " ; ".join(p["command"] for p in parts),
               "runs": [row for p in parts for row in p["runs"]],
               "loadavg_before": parts[0]["loadavg_before"], "loadavg_after": parts[-1]["loadavg_after"],
               "merged_from": [p["command"] for p in parts]}
        for row in res["runs"]:
            summarise(row)
        if args.after:
            acts = {(row["model_spec"], row["memory"]["dtype"], row["stage"]): row.get("activations")
                    for row in res["runs"]}
            after = [row for p in args.after for row in json.loads(Path(p).read_text())["runs"]]
            for row in after:
                row["activations"] = acts.get((row["model_spec"], row["memory"]["dtype"], row["stage"]))
                summarise(row)
            res["after_runs"], res["after_label"] = after, args.after_label
            res["after_commands"] = [json.loads(Path(p).read_text())["command"] for p in args.after]
        C.write_json(args.out_name, res)
        args.md_only = True
    if args.md_only:
        res = json.loads((C.RESULTS_DIR / f"{args.out_name}.json").read_text())
        if not args.no_md:
            C.update_results_md("memory", markdown(res))
        print(markdown(res))
        return res
    C.quiet()
    import torch

    torch.set_num_threads(args.threads)
    from neuroshield.models.loading import auto_dtype

    info = C.machine_info()
    info["cpu_bf16_flags"] = cpu_flags()
    info["auto_dtype"] = str(auto_dtype()).replace("torch.", "")
    load_before = C.loadavg()
    thresholds: list[int | None] = [int(x) for x in args.malloc_thresholds.split(",") if x.strip()] or [None]
    runs: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for stage in args.stages.split(","):
                activations = None
                if not args.no_activations:  # tensor bytes: the allocator setting does not change them
                    act = spawn(args, model, dtype, stage, activations=True)
                    activations = {k: act.get(k) for k in ("activations_mb", "profiled", "wall_s")}
                for _ in range(args.repeats):
                    for threshold in thresholds:
                        mem = spawn(args, model, dtype, stage, activations=False, malloc_threshold=threshold)
                        row = {"model_spec": model, "dtype_requested": dtype, "stage": stage, "memory": mem,
                               "loadavg": C.loadavg(), "activations": activations}
                        summarise(row)
                        runs.append(row)
                        print(line(row), flush=True)
                        result = {"benchmark": "memory", "command": C.command_line(), "date": C.now_utc(),
                                  "machine": info, "loadavg_before": load_before, "loadavg_after": C.loadavg(),
                                  "runs": runs, "sizes": {k: getattr(args, k) for k in WORKER_FLAGS}}
                        C.write_json(args.out_name, result)  # after every row: an interrupted run keeps its rows
    if not args.no_md:
        C.update_results_md("memory", markdown(result))
    print(markdown(result))
    return result


def summarise(row: dict[str, Any]) -> None:
    m = row["memory"]
    w = m["weight_bytes"] / 2**20
    s = m.get("state_bytes", 0) / 2**20
    a = (row.get("activations") or {}).get("activations_mb")
    row["weights_mb"] = round(w, 1)
    row["state_mb"] = round(s, 1)
    row["activations_mb"] = a
    row["bound_mb"] = round(1.5 * (w + s + a), 1) if a is not None else None
    row["peak_delta_mb"] = m["peak_delta_mb"]
    row["ratio"] = round(m["peak_delta_mb"] / (w + s + a), 2) if a is not None else None
    top = max(m["phases"], key=lambda r: r["peak_mb"])
    row["peak_phase"] = top["phase"]
    row["main_phase_s"] = round(sum(p["seconds"] for p in m["phases"] if p["phase"] == MAIN_PHASE[row["stage"]]), 1)


def threshold_name(row: dict[str, Any]) -> str:
    """The glibc allocator setting of a run: its fixed mmap threshold, or glibc's dynamic one (runs before it)."""
    t = row["memory"].get("malloc_threshold")
    return "dynamic" if not t else (f"{t // 2**20} MiB" if t % 2**20 == 0 else f"{t // 1024} KiB")


def line(row: dict[str, Any]) -> str:
    return (f"{row['model_spec']} {row['memory']['dtype']} {row['stage']}: peak delta {row['peak_delta_mb']} MB "
            f"(in '{row['peak_phase']}'), weights {row['weights_mb']} MB, state {row['state_mb']} MB, activations "
            f"{row['activations_mb']} MB, ratio {row['ratio']} (bound 1.5), malloc threshold {threshold_name(row)}, "
            f"{MAIN_PHASE[row['stage']]} {row['main_phase_s']} s")


def cpu_flags() -> list[str]:
    try:
        for line_ in Path("/proc/cpuinfo").read_text().splitlines():
            if line_.startswith("flags"):
                return sorted(f for f in line_.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    return []


HEADER = ("| model | dtype | stage | malloc threshold | peak - RSS after import torch MB | weights MB | state MB | "
          "activations MB | ratio (target <= 1.5) | peak phase | main phase s |")
RULE = "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|"


def row_md(row: dict[str, Any]) -> str:
    ratio = row["ratio"]
    verdict = "" if ratio is None else (" ok" if ratio <= 1.5 else " **over**")
    main = f"{MAIN_PHASE[row['stage']]} {row['main_phase_s']:.1f}" if "main_phase_s" in row else "n/a"
    return (f"| {row['memory']['spec']} | {row['memory']['dtype']} | {row['stage']} | {threshold_name(row)} | "
            f"{row['peak_delta_mb']:.0f} | {row['weights_mb']:.0f} | {row['state_mb']:.1f} | "
            f"{C.fmt(row['activations_mb'] or float('nan'), 0)} | "
            f"{C.fmt(ratio if ratio is not None else float('nan'))}{verdict} | {row['peak_phase']} | {main} |")


def markdown(r: dict[str, Any]) -> str:
    flags = ", ".join(r["machine"].get("cpu_bf16_flags", [])) or "none"
    lines = [
        "## 8. Memory: peak RSS against 1.5x (weights + trainable state + activations) (`bench_memory.py`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], [r["loadavg_before"], r["loadavg_after"]], r["date"]),
        f"- CPU bfloat16 flags: {flags}; `dtype: auto` picks **{r['machine'].get('auto_dtype')}** here",
        "- Each row: a fresh subprocess; peak = VmHWM (reset at every phase boundary), measured from the RSS right "
        "after `import torch`; activations from a second, profiled subprocess (tensor bytes allocated in the main "
        "phase); bound = 1.5 x (weights + state + activations)",
        "",
        HEADER,
        RULE,
    ]
    lines += [row_md(row) for row in r["runs"]]
    if r.get("after_runs"):
        lines += ["", f"After the fixes ({r['after_label']}; commands: "
                  + "; ".join(f"`{c}`" for c in r["after_commands"]) + "; activations from the rows above):", "",
                  HEADER, RULE]
        lines += [row_md(row) for row in r["after_runs"]]
    lines += ["", "Breakdown per phase: RSS at the phase's start -> its peak, both minus the RSS after `import torch`, "
                  "and the file-backed RSS (mapped files) at the phase's highest sample, MB:", ""]
    for row in r["runs"] + [dict(x, _after=True) for x in r.get("after_runs", [])]:
        m = row["memory"]
        base = m["rss_after_torch_mb"]
        parts = "; ".join(f"{p['phase']} {p['rss_start_mb'] - base:.0f} -> **{p['peak_mb'] - base:.0f}** "
                          f"(file-backed {p.get('file_at_peak_mb', 0):.0f})"
                          for p in m["phases"])
        lines.append(f"- {m['spec']} {m['dtype']} {row['stage']}, malloc threshold {threshold_name(row)}"
                     f"{' (after the fixes)' if row.get('_after') else ''}: {parts}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
