"""`neuroshield identify` and `neuroshield overlap` (thin; see neuroshield.neurons.identify)."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroshield.commands.common import IMAGES_HELP, print_json, split_list, split_sources, user_errors, with_images
from neuroshield.settings import IdentifyConfig, PipelineConfig, joined

# the option defaults are the pipeline's settings (tests/test_settings.py fails when one differs)
IC, RUN = IdentifyConfig(), PipelineConfig()


def register(app: typer.Typer) -> None:
    @app.command("identify")
    def identify_cmd(
        model: str = typer.Option(RUN.model, "--model", "-m", help="default | smollm2 | .gguf | folder | Hub id"),
        harmful: str = typer.Option(joined(IC.harmful), help="Harmful prompts: registered names / name:option / files, "
                                                    "comma-separated (e.g. xsafety, xsafety:Insult,Mental_Health)."),
        benign: str = typer.Option(joined(IC.benign),
                                   help="Benign prompts, comma-separated; each set gives the languages it has."),
        languages: str = typer.Option("en,zh", help="Languages, comma-separated (ISO 639-1)."),
        method: str = typer.Option(joined(IC.methods), help="plnd | precise-shield | mean-diff | t-stat, comma-separated."),
        rho: float = typer.Option(IC.rho, help="Share of each site's units taken per group (top-ρ)."),
        top_k: int | None = typer.Option(None, "--top-k", help="Units per site instead of --rho."),
        sites: str = typer.Option(joined(IC.sites), help="Site kinds: ffn, attn_q, attn_k, attn_v, attn_o, comma-separated."),
        positions: str = typer.Option(IC.positions, help="Counted tokens: prompt | user | last | post."),
        high_resource: str = typer.Option(joined(RUN.high_resource), help="High-resource language(s) for SS = MS(HR) ∩ MS(lang)."),
        limit: int = typer.Option(IC.per_language, help="Prompts per language and label of each source (after "
                                  "the split; identify.per_language)."),
        split: str = typer.Option("held-in", help="held-in (default) | held-out | all: the prompt-id split; "
                                                  "validation and evaluation use the held-out half."),
        held_out_fraction: float = typer.Option(RUN.held_out_fraction, help="Share of ids held out."),
        split_seed: int = typer.Option(RUN.seed, help="Seed of the id split."),
        seed: int = typer.Option(RUN.seed, help="Seed of tie-breaking in the selection."),
        batch_size: int = typer.Option(IC.batch_size, help="Prompts per forward pass."),
        max_length: int = typer.Option(512, help="Tokens per prompt (longer user texts lose their start)."),
        qk_impact: str = typer.Option("exact", help="q/k plnd statistics: exact | pair (cheaper bound)."),
        dtype: str | None = typer.Option(None, help="auto (default: bfloat16 where the CPU/GPU has native bf16 matmul) | float32 | bfloat16 | float16"),
        images: Path | None = typer.Option(None, "--images", help=IMAGES_HELP),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder (stats/, <method>/, summary.json)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Find monolingual (MS) and shared (SS) safety neurons per language."""
        from neuroshield.models import load_model
        from neuroshield.neurons.identify import identify
        from neuroshield.neurons.splits import pick_prompts

        with user_errors():
            langs = split_list(languages) or []

            def pick(sources: str, label: str) -> list:
                return [r for source in split_sources(sources)  # --limit per source, as the pipeline's per_language
                        for r in pick_prompts(source, label, langs, split, limit, held_out_fraction=held_out_fraction,
                                              seed=split_seed)]

            harm = with_images(pick(harmful, "harmful"), images)
            ben = pick(benign, "benign")
            typer.echo(f"prompts: {len(harm)} harmful + {len(ben)} benign ({split} split, --limit {limit} per "
                       "source and language)", err=True)
            loaded = load_model(model, dtype=dtype)
            res = identify(
                loaded, harm, ben, languages=langs, method=split_list(method) or IC.methods, rho=rho,
                sites=tuple(split_list(sites) or IC.sites), positions=positions,
                high_resource=tuple(split_list(high_resource) or RUN.high_resource), out_dir=out, batch_size=batch_size,
                top_k=top_k, seed=seed, max_length=max_length, qk_impact=qk_impact,
                extra={"harmful": harmful, "benign": benign, "split": split, "held_out_fraction": held_out_fraction,
                       "split_seed": split_seed, "limit": limit, "dtype": dtype},
            )
        if as_json:
            print_json(res.summary)
            return
        s = res.summary
        typer.echo(f"{s['model_id']}: {s['layers']} layers, sites {','.join(s['sites'])}, "
                   f"{s['wall_seconds']:.0f} s, peak RSS {s['peak_rss_mb']:.0f} MiB")
        for m, sets in s["sets"].items():
            typer.echo(f"[{m}]")
            for name, info in sets.items():
                typer.echo(f"  {name:12s} {info['neurons']:>6d} neurons  {info['owned_parameters']:>11,} params "
                           f"({100 * info['owned_fraction']:.3f} %)")
        typer.echo(f"written to {res.out_dir}")

    @app.command("overlap")
    def overlap_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder written by `neuroshield identify`."),
    ) -> None:
        """Overlap (with chance levels) and layer plots of the sets of an identify run."""
        import json

        from neuroshield.neurons.identify import overlap_report

        with user_errors():
            folder = overlap_report(run_dir)
        index = json.loads((folder / "overlap.json").read_text())
        for method, entry in index["methods"].items():
            typer.echo(f"[{method}] mean overlap {entry.get('mean_overlap')} "
                       f"(chance {entry.get('mean_chance_overlap')})")
            for h, row in entry.get("high_resource_vs", {}).items():
                cells = ", ".join(f"{o} {c['overlap']:.2f}/{c['chance_overlap']:.2f}" for o, c in row.items())
                typer.echo(f"  MS({h}) vs: {cells}  (observed/chance overlap coefficient)")
        typer.echo(f"written to {folder}")
