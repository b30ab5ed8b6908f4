"""`plnd` scores for every FFN neuron from one statistics pass vs naive per-neuron ablation.

plnd (`neuroshield.neurons.scores.score(stats, loaded, "plnd", group)` on the statistics of
`collect_statistics(..., sites=("ffn",), positions="prompt")`): one forward pass over the prompts gives
the importance of all FFN neurons at once (mean |a_i| x ||W_down[:, i]||).

Naive ablation of neuron i of layer l: zero the unit with a hook (`site_hooks`, the project's one way to
hook), rerun the model on the same prompts, and take the mean over counted tokens (positions=prompt) of
||Δ layer output||₂ (the FFN output; the decoder layer output changes by the same Δ). Two variants:

* `rerun`: the model is rerun from the embeddings, stopped as soon as layer l's FFN output exists (this
  is generous to the naive method: the later layers are skipped). Cost grows with l, so the sample
  takes `--per-layer` neurons at `--layers-sampled` evenly spaced layers; the per-neuron time is fitted
  linearly in l and summed over every neuron of every layer to extrapolate to all neurons.
* `cached`: the strongest naive variant: the input of layer l's FFN is cached once, and only the FFN
  module is rerun per neuron (per-neuron cost independent of l). Extrapolated as n_neurons x time.

Rounds interleave plnd pass, rerun sample, cached sample (then reversed), and report the median of the
per-round speed-ups. Times are process CPU times (one torch thread: the work itself, without the waits
for a core on a shared machine; the plnd pass's wall time is recorded too).

Rank agreement: Spearman's rho (and the max relative difference) between the plnd score and the
measured ablation effect on the sampled neurons (the rerun sample of every round plus
`--rank-sample` extra neurons done with the cached variant). For FFN neurons the plnd formula is exact,
so agreement should be ~1 up to float32 rounding.

Default: the default model (float32), 8 prompts (one batch), 6 layers x 2 neurons per rerun sample,
2 timed rounds after a warm-up, 96 extra neurons for the rank sample, 1 torch thread (14 min on the busy shared
2-core machine of RESULTS.md, load ~10).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md-only", action="store_true", help="rebuild the RESULTS.md section from the last JSON")
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers-sampled", type=int, default=6)
    ap.add_argument("--per-layer", type=int, default=2)
    ap.add_argument("--rank-sample", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args(argv)
    if args.md_only:
        import json

        res = json.loads((C.RESULTS_DIR / "plnd_vs_ablation.json").read_text())
        C.update_results_md("plnd_vs_ablation", markdown(res))
        return res
    C.quiet()

    import torch
    from scipy.stats import spearmanr

    torch.set_num_threads(args.threads)
    from neuroshield.models import load_model
    from neuroshield.models.chat import batches_by_length, collate, encode_chat
    from neuroshield.models.hooks import site_hooks
    from neuroshield.models.sites import resolve_sites
    from neuroshield.neurons.scores import score
    from neuroshield.neurons.stats import collect_statistics, position_ids_for

    info = C.machine_info()
    loaded = load_model(args.model)
    model, tok, ad = loaded.model, loaded.tokenizer, loaded.adapter
    layers = ad.layers(model)
    n_layers = len(layers)
    sites = resolve_sites(model, ad, ("ffn",))
    width = sites[0].width
    n_neurons = sum(s.width for s in sites)
    # one group, so that the plnd score and the ablation average over the same tokens
    records = [dataclasses.replace(r, language="en", label="harmful") for r in C.bench_records(args.prompts)]
    group = "en/text/harmful"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = [encode_chat(tok, r.text, max_length=512) for r in records]
    batches = []
    for idx in batches_by_length(enc, args.batch_size):
        chunk = [enc[i] for i in idx]
        b = collate(chunk, pad_id)
        batches.append((b, b.count_mask(chunk, "prompt")))
    counted = int(sum(int(m.sum()) for _, m in batches))

    def fwd(b: Any) -> None:
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=position_ids_for(b.attention_mask),
              use_cache=False)

    # --- reference: FFN input and output of every layer, per batch (one plain forward) ---------------
    mlps = [getattr(layer, ad.mlp) for layer in layers]
    ref_in: list[list[torch.Tensor]] = []
    ref_out: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for b, _ in batches:
            ins: list[Any] = [None] * n_layers
            outs: list[Any] = [None] * n_layers
            def keep(mod: Any, a: Any, o: torch.Tensor, _l: int, _ins: list = ins, _outs: list = outs) -> None:
                _ins[_l], _outs[_l] = a[0].detach(), o.detach()

            hs = [m.register_forward_hook(lambda mod, a, o, _l=l, _k=keep: _k(mod, a, o, _l)) for l, m in enumerate(mlps)]
            try:
                fwd(b)
            finally:
                for h in hs:
                    h.remove()
            ref_in.append(ins)
            ref_out.append(outs)

    def effect(outs: list[torch.Tensor], layer: int) -> float:
        """mean over counted tokens of ||Δ FFN output||₂ (float64 accumulation)."""
        total = 0.0
        for bi, (_, mask) in enumerate(batches):
            d = (outs[bi] - ref_out[bi][layer])[mask].double()
            total += float(d.norm(dim=-1).sum())
        return total / counted

    def zero_fn(unit: int) -> Any:
        def fn(site: Any, units: torch.Tensor) -> torch.Tensor:
            x = units.clone()
            x[..., unit] = 0
            return x
        return fn

    def ablate_rerun(layer: int, unit: int) -> float:
        outs: list[torch.Tensor] = []

        def grab(mod: Any, a: Any, o: torch.Tensor) -> None:
            outs.append(o.detach())
            raise _Stop

        h = mlps[layer].register_forward_hook(grab)
        try:
            with torch.no_grad(), site_hooks([sites[layer]], zero_fn(unit)):
                for b, _ in batches:
                    try:
                        fwd(b)
                    except _Stop:
                        pass
        finally:
            h.remove()
        return effect(outs, layer)

    def ablate_cached(layer: int, unit: int) -> float:
        with torch.no_grad(), site_hooks([sites[layer]], zero_fn(unit)):
            outs = [mlps[layer](ref_in[bi][layer]) for bi in range(len(batches))]
        return effect(outs, layer)

    gen = torch.Generator().manual_seed(args.seed)
    sample_layers = sorted({round(i * (n_layers - 1) / max(1, args.layers_sampled - 1))
                            for i in range(args.layers_sampled)})

    def draw(k_per_layer: int) -> list[tuple[int, int]]:
        return [(l, int(u)) for l in sample_layers
                for u in torch.randperm(width, generator=gen)[:k_per_layer].tolist()]

    scores_holder: dict[str, Any] = {}

    def plnd_pass() -> None:
        stats = collect_statistics(loaded, records, sites=("ffn",), positions="prompt", batch_size=args.batch_size,
                                   progress=False)
        scores_holder["scores"] = score(stats, loaded, "plnd", group)

    measured: list[dict[str, Any]] = []

    def rerun_sample(picks: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        times: dict[tuple[int, int], float] = {}
        for l, u in picks:
            t0 = time.process_time()
            e = ablate_rerun(l, u)
            times[(l, u)] = time.process_time() - t0
            measured.append({"layer": l, "unit": u, "effect": e, "variant": "rerun", "seconds": times[(l, u)]})
        return times

    def cached_sample(picks: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        times: dict[tuple[int, int], float] = {}
        for l, u in picks:
            t0 = time.process_time()
            e = ablate_cached(l, u)
            times[(l, u)] = time.process_time() - t0
            measured.append({"layer": l, "unit": u, "effect": e, "variant": "cached", "seconds": times[(l, u)]})
        return times

    # --- interleaved rounds ---------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    for r in range(args.warmup + args.rounds):
        row: dict[str, Any] = {"round": r - args.warmup, "warmup": r < args.warmup, "loadavg_before": C.loadavg()}
        order = ["plnd", "rerun", "cached"] if r % 2 == 0 else ["cached", "rerun", "plnd"]
        picks = draw(args.per_layer)  # the same neurons for both ablation variants of this round
        for name in order:
            if name == "plnd":
                row["plnd_wall_s"], row["plnd_s"], _ = C.timed2(plnd_pass)
            elif name == "rerun":
                t = rerun_sample(picks)
                per_layer = {l: sum(v for (ll, _), v in t.items() if ll == l) / args.per_layer for l in sample_layers}
                row["rerun_per_layer_s"] = per_layer
                # least-squares line t(l) = a + b l over the sampled layers, summed over all neurons
                xs = torch.tensor(list(per_layer), dtype=torch.float64)
                ys = torch.tensor(list(per_layer.values()), dtype=torch.float64)
                A = torch.stack([torch.ones_like(xs), xs], 1)
                coef = torch.linalg.lstsq(A, ys[:, None]).solution.flatten()
                fitted = [max(float(coef[0] + coef[1] * l), 0.0) for l in range(n_layers)]
                row["rerun_fit"] = [float(coef[0]), float(coef[1])]
                row["rerun_all_s"] = width * sum(fitted)
            else:
                t = cached_sample(picks)
                row["cached_per_neuron_s"] = sum(t.values()) / len(t)
                row["cached_all_s"] = n_neurons * row["cached_per_neuron_s"]
        row["loadavg"] = C.loadavg()
        row["speedup_rerun"] = row["rerun_all_s"] / row["plnd_s"]
        row["speedup_cached"] = row["cached_all_s"] / row["plnd_s"]
        rows.append(row)
        print(f"round {row['round']}{' (warm-up)' if row['warmup'] else ''}: plnd {row['plnd_s']:.1f}s; rerun "
              f"per neuron {row['rerun_per_layer_s']} -> all {row['rerun_all_s'] / 3600:.1f} h; cached per neuron "
              f"{row['cached_per_neuron_s']:.3f}s -> all {row['cached_all_s'] / 3600:.2f} h; speed-ups "
              f"{row['speedup_rerun']:.0f}x / {row['speedup_cached']:.0f}x; load {row['loadavg'][0]}", flush=True)
    timed_rows = [r for r in rows if not r["warmup"]]

    # --- rank agreement --------------------------------------------------------------------------------
    extra_gen = torch.Generator().manual_seed(args.seed + 1)
    flat = torch.randperm(n_neurons, generator=extra_gen)[:args.rank_sample].tolist()
    for f in flat:
        l, u = divmod(int(f), width)
        measured.append({"layer": l, "unit": u, "effect": ablate_cached(l, u), "variant": "cached-rank"})
    sc = scores_holder["scores"]
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    for m in measured:
        m["plnd"] = float(sc[f"{m['layer']}.ffn"][m["unit"]])
        seen.setdefault((m["layer"], m["unit"]), m)
    uniq = list(seen.values())
    plnd_v = [m["plnd"] for m in uniq]
    abl_v = [m["effect"] for m in uniq]
    rho = float(spearmanr(plnd_v, abl_v).statistic)
    rel = [abs(p - a) / max(abs(a), 1e-30) for p, a in zip(plnd_v, abl_v)]
    # rerun and cached variants give the same effect for the same neuron
    both = {}
    for m in measured:
        if m["variant"] in ("rerun", "cached"):
            both.setdefault((m["layer"], m["unit"]), {})[m["variant"]] = m["effect"]
    consistency = [abs(v["rerun"] - v["cached"]) / max(abs(v["cached"]), 1e-30) for v in both.values() if len(v) == 2]

    result: dict[str, Any] = {
        "benchmark": "plnd_vs_ablation",
        "command": C.command_line(),
        "date": C.now_utc(),
        "machine": info,
        "model": loaded.model_id,
        "layers": n_layers,
        "ffn_width": width,
        "neurons": n_neurons,
        "prompts": args.prompts,
        "counted_tokens": counted,
        "sample_layers": sample_layers,
        "per_layer": args.per_layer,
        "rounds": rows,
        "plnd_s_median": C.med([r["plnd_s"] for r in timed_rows]),
        "rerun_all_s_median": C.med([r["rerun_all_s"] for r in timed_rows]),
        "cached_all_s_median": C.med([r["cached_all_s"] for r in timed_rows]),
        "speedup_rerun_median": C.med([r["speedup_rerun"] for r in timed_rows]),
        "speedup_cached_median": C.med([r["speedup_cached"] for r in timed_rows]),
        "rank_neurons": len(uniq),
        "spearman": rho,
        "max_rel_diff": max(rel),
        "median_rel_diff": C.med(rel),
        "rerun_vs_cached_max_rel_diff": max(consistency) if consistency else None,
        "measured": measured,
    }
    C.write_json("plnd_vs_ablation", result)
    if not args.no_md:
        C.update_results_md("plnd_vs_ablation", markdown(result))
    print(f"speed-up vs rerun {result['speedup_rerun_median']:.0f}x, vs cached {result['speedup_cached_median']:.0f}x; "
          f"spearman {rho:.4f} on {len(uniq)} neurons; max rel diff {max(rel):.2e}")
    return result


def _dur(s: float) -> str:
    if s >= 3600 * 24:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def markdown(r: dict[str, Any]) -> str:
    timed_rows = [x for x in r["rounds"] if not x["warmup"]]
    loads = [x["loadavg"] for x in r["rounds"]]
    lines = [
        "## 3. plnd in one pass vs naive per-neuron ablation (`bench_plnd_vs_ablation.py`)",
        "",
        f"- Command: `{r['command']}`",
        C.machine_md(r["machine"], loads, r["date"]),
        f"- Model: {r['model']}, {r['layers']} layers x {r['ffn_width']} FFN neurons = {r['neurons']} neurons; "
        f"{r['prompts']} prompts ({r['counted_tokens']} counted tokens, positions=prompt)",
        f"- Ablation sample per round: {r['per_layer']} random neurons at each of layers {r['sample_layers']} "
        "(the same neurons for both variants); "
        f"{len(timed_rows)} interleaved rounds after a warm-up round; medians over rounds",
        "",
        "| method | CPU time for all FFN neurons | speed-up of plnd |",
        "|---|---:|---:|",
        f"| plnd (`collect_statistics` + `score(..., 'plnd')`, one pass) | {_dur(r['plnd_s_median'])} (measured) | 1x |",
        f"| naive ablation, rerun up to the layer per neuron | {_dur(r['rerun_all_s_median'])} (extrapolated) | "
        f"**{r['speedup_rerun_median']:,.0f}x** |",
        f"| naive ablation, FFN rerun from a cached input per neuron | {_dur(r['cached_all_s_median'])} "
        f"(extrapolated) | **{r['speedup_cached_median']:,.0f}x** |",
        "",
        f"Rank agreement on {r['rank_neurons']} sampled neurons (all layers): Spearman rho = "
        f"**{r['spearman']:.6f}**; |plnd - ablation| / ablation: median {r['median_rel_diff']:.1e}, max "
        f"{r['max_rel_diff']:.1e} (the FFN plnd formula is exact; the residue is float32 rounding of the rerun). "
        f"Rerun and cached ablation of the same neuron agree to {r['rerun_vs_cached_max_rel_diff']:.1e} (max rel.).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
