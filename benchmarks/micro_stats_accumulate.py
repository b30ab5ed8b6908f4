"""Micro-benchmark behind the stats-overhead finding: the per-site accumulation of `ActivationCollector`.

Times the real `ActivationCollector._on_site` (neurons/stats.py) on one FFN site of the default model
with a synthetic [B, T, W] activation tensor and a realistic mask / group mix, against a prototype of
the suggested fix (defined here, NOT in the package):

    per row b:   s_b = Σ_t m[b,t] · f(x[b,t])   for f in (x, |x|, x², [x>0])  (float32 bmm over the batch,
                                                                                 no masked copy, no stack)
    per group:   block[g] += Σ_{b in g} s_b       (float64, a [G, B] one-hot matmul over B rows)

and compares it with a plain forward of one decoder layer on the same batch (what the hook's cost has to
be small against). Checks that both give the same sums (relative difference printed). CPU time, one
thread, interleaved (A, B, A, B ...), median of per-pair ratios.

    python benchmarks/micro_stats_accumulate.py [--groups 32] [--batch 8] [--tokens 60] [--reps 15]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def proposed_on_site(block: Any, x: Any, mask_f: Any, row_onehot: Any) -> None:
    """The suggested accumulation: row sums in float32 by bmm, then groups in float64."""
    import torch

    x = x.detach().float()
    m = mask_f[:, None, :]  # [B, 1, T]
    feats = torch.cat([
        torch.bmm(m, x),
        torch.bmm(m, x.abs()),
        torch.bmm(m, x * x),
        torch.bmm(m, (x > 0).float()),
    ], dim=1)  # [B, 4, W]
    block += (row_onehot @ feats.reshape(feats.shape[0], -1).double()).view(block.shape)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=60, help="padded width T of the batch")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    C.quiet()
    import torch

    torch.set_num_threads(args.threads)
    from neuroshield.models import load_model
    from neuroshield.models.sites import resolve_sites
    from neuroshield.neurons.stats import ActivationCollector, position_ids_for

    loaded = load_model(args.model)
    site = resolve_sites(loaded.model, loaded.adapter, ("ffn",))[0]
    w = site.width
    b, t, g = args.batch, args.tokens, args.groups
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, w, generator=gen) * 0.3
    # left padding: row r has t - pad_r real tokens, all counted (positions=prompt)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = torch.arange(t)[None, :] >= (t - lengths)[:, None]
    gids = torch.randint(0, g, (b,), generator=gen)
    coll = ActivationCollector(loaded, [site], g, impact=False)
    coll.set_batch(mask, gids)
    block_new = torch.zeros_like(coll._block[site.key])
    mask_f = mask.float()
    row_onehot = torch.nn.functional.one_hot(gids, g).T.to(torch.float64)  # [G, B]

    # one decoder layer forward on a batch of the same shape (the cost to compare with): capture layer 0's
    # real inputs from a model call on random tokens, then rerun only that layer
    layer = loaded.adapter.layers(loaded.model)[0]
    att = mask.long()
    captured: dict[str, Any] = {}

    class _Stop(Exception):
        pass

    def grab(mod: Any, a: Any, kw: Any) -> None:
        captured["args"], captured["kwargs"] = a, kw
        raise _Stop

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.randint(0, 1000, (b, t), generator=gen), attention_mask=att,
                         position_ids=position_ids_for(att), use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()

    def layer_fwd() -> None:
        with torch.no_grad():
            layer(*captured["args"], **captured["kwargs"])

    def current() -> None:
        with torch.no_grad():
            coll._on_site(site, x)

    def proposed() -> None:
        with torch.no_grad():
            proposed_on_site(block_new, x, mask_f, row_onehot)

    fns = {"current": current, "proposed": proposed, "layer": layer_fwd}
    for fn in fns.values():  # warm-up, then reset the sums
        fn()
    coll._block[site.key].zero_()
    block_new.zero_()
    rows = []
    for r in range(args.reps):
        row: dict[str, Any] = {}
        for name in (fns if r % 2 == 0 else reversed(list(fns))):
            c0 = time.process_time()
            fns[name]()
            row[name] = time.process_time() - c0
        rows.append(row)
    ref = coll._block[site.key]
    rel = float(((block_new - ref).abs().max() / ref.abs().max().clamp(min=1e-30)))
    res = {
        "shape": [b, t, w], "counted_tokens": int(mask.sum()), "groups": g, "reps": args.reps,
        "current_ms": C.med([r["current"] for r in rows]) * 1e3,
        "proposed_ms": C.med([r["proposed"] for r in rows]) * 1e3,
        "layer_ms": C.med([r["layer"] for r in rows]) * 1e3,
        "current_over_layer": C.med(C.pair_ratios(rows, "current", "layer")),
        "proposed_over_layer": C.med(C.pair_ratios(rows, "proposed", "layer")),
        "speedup": C.med(C.pair_ratios(rows, "current", "proposed")),
        "max_rel_diff_of_sums": rel,
        "loadavg": C.loadavg(),
        "command": C.command_line(),
        "date": C.now_utc(),
    }
    print(json.dumps(res, indent=1))
    C.write_json(f"micro_stats_accumulate_g{g}", res)
    return res


if __name__ == "__main__":
    main()
