"""The exaggerated-safety trade-off across settings, on held-in prompts only (issue 17).

Every run trained with step selection (`train.select_every`) records, at each monitored step, the refusal of
held-in harmful prompts and of held-in contrast-set prompts (safe requests that sound dangerous) that training
does not use. This script draws those curves for several runs on one plot (one line per run and recipe, the
base model as a grey point, the chosen step circled) and prints them as a Markdown table.

    python experiments/tradeoff.py --out docs/figures/tradeoff.png \
        "demo=runs/s17-S0" "multilingual retain=runs/s17-S1" ...

Each argument is `label=run folder`; every recipe folder under `<run>/train/` with a `loss.json` is drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neuroshield.io import atomic_path, read_json
from neuroshield.pipeline import chosen_point


def curves(run: Path) -> list[tuple[str, dict, list[tuple[int, float, float, float | None]]]]:
    """(recipe, base rates, [(step, contrast refusal, harmful refusal, selection score)]) for each recipe."""
    out = []
    for loss in sorted((run / "train").glob("*/loss.json")):
        # the base rates sit beside the recipes (runs before they were shared: in the recipe folder)
        own = loss.parent / "monitor_base.json"
        base = read_json(own if own.is_file() else run / "train" / "monitor_base.json", "step-selection base rates")
        history = read_json(loss, "training history")
        pts = [(h["step"], h["monitor_contrast_refusal"], h["monitor_harmful_refusal"], h.get("select_score"))
               for h in history if h.get("monitor_harmful_refusal") is not None]
        if pts:
            out.append((loss.parent.name, base, pts))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="label=run folder")
    ap.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rows = []
    base_drawn = False
    for spec in args.runs:
        label, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"argument {spec!r}: expected label=run folder")
        for recipe, base, pts in curves(Path(folder)):
            name = f"{label} ({recipe})"
            xs = [100 * base["contrast_refusal"]] + [100 * p[1] for p in pts]
            ys = [100 * base["harmful_refusal"]] + [100 * p[2] for p in pts]
            line, = ax.plot(xs, ys, marker="o", ms=3, lw=1, alpha=0.8, label=name)
            best = chosen_point(pts)
            ax.scatter([100 * best[1]], [100 * best[2]], s=120, facecolors="none", edgecolors=line.get_color(),
                       lw=2, zorder=4)
            if not base_drawn:
                ax.scatter([xs[0]], [ys[0]], color="grey", s=60, zorder=5, label="base model")
                base_drawn = True
            cells = " | ".join(f"{100 * p[2]:.1f}/{100 * p[1]:.1f}" for p in pts)
            rows.append(f"| {name} | {100 * base['harmful_refusal']:.1f}/{100 * base['contrast_refusal']:.1f} | "
                        f"{cells} | step {best[0]} |")
            n = (base["harmful"], base["contrast"])
    ax.set_xlabel(f"held-in contrast (safe) prompts refused, % (n={n[1]})")
    ax.set_ylabel(f"held-in harmful prompts refused, % (n={n[0]})")
    ax.set_title("harmful vs exaggerated refusal during training (circle: the chosen step)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    print("| setting | base | harmful/contrast refusal at each monitored step | chosen |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
