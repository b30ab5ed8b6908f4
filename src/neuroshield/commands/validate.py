"""`neuroshield validate`: causal validation of a neuron set against random controls (thin; see intervene.validate)."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroshield.commands.common import IMAGES_HELP, split_list, user_errors, with_images
from neuroshield.settings import PipelineConfig, ValidateConfig, joined

# the option defaults are the pipeline's settings (tests/test_settings.py fails when one differs)
VC, RUN = ValidateConfig(), PipelineConfig()


def register(app: typer.Typer) -> None:
    @app.command("validate")
    def validate_cmd(
        model: str = typer.Option(RUN.model, "--model", "-m", help="default | smollm2 | .gguf | folder | Hub id"),
        set_path: Path = typer.Option(..., "--set", help="Neuron set (.safetensors/.json pair, or its base path)."),
        mode: str = typer.Option("zero", help="zero | scale:<alpha> (e.g. scale:2.0) | mean:<lang>/<modality>/<label>"),
        stats: Path | None = typer.Option(None, help="Statistics folder (ActivationStats) for mean:<group> modes."),
        prompts: str = typer.Option("xsafety", help="Harmful prompt set: registered name, name:option, or file."),
        label: str = typer.Option("harmful", help="Keep prompts with this label (harmful | benign)."),
        languages: str | None = typer.Option(joined(VC.languages), help="Languages, comma-separated (ISO 639-1); "
                                             "default: all."),
        limit: int = typer.Option(VC.per_language, help="Prompts per language (hash-sampled across categories; "
                                  "validate.per_language)."),
        split: str = typer.Option("held-out", help="held-out (default) | held-in | all: prompt-id split."),
        held_out_fraction: float = typer.Option(RUN.held_out_fraction, help="Share of ids held out (as for "
                                                "identification)."),
        split_seed: int = typer.Option(RUN.seed, help="Seed of the id split (as for identification)."),
        controls: int = typer.Option(VC.controls, help="Random control sets (same count per layer and site)."),
        seed: int = typer.Option(RUN.seed, help="Seed of the first control set (control k uses seed + k)."),
        benign: str = typer.Option("mgsm", help="Benign prompts for the KL / perplexity guard; '' for none."),
        benign_limit: int = typer.Option(VC.benign_guard, help="Benign prompts per language for the guard "
                                         "(validate.benign_guard)."),
        benign_generate: bool = typer.Option(False, help="Also answer benign prompts under every condition "
                                                         "(over-refusal)."),
        judge: str = typer.Option("refusal-phrase", help="refusal-phrase | path to a classifier / guard folder."),
        max_new_tokens: int = typer.Option(VC.max_new_tokens, help="Tokens generated per prompt."),
        batch_size: int = typer.Option(VC.batch_size, help="Prompts per batch."),
        dtype: str | None = typer.Option(None, help="auto (default: bfloat16 where the CPU/GPU has native bf16 matmul) | float32 | bfloat16 | float16"),
        images: Path | None = typer.Option(None, "--images", help=IMAGES_HELP),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (validation.json/.csv/.png, generations)."),
        cache_dir: Path | None = typer.Option(None, help="Generation cache shared between runs (default: OUT/cache)."),
    ) -> None:
        """Refusal rate per language with no intervention, with the set, and with random controls."""
        import time

        from neuroshield.intervene.interventions import parse_mode
        from neuroshield.intervene.validate import validate
        from neuroshield.models import load_model
        from neuroshield.neurons.neuronset import NeuronSet
        from neuroshield.neurons.splits import pick_prompts

        with user_errors():
            start = time.perf_counter()
            parsed = parse_mode(mode, argument="--mode")
            langs = split_list(languages)
            records = pick_prompts(prompts, label, langs, split, limit, held_out_fraction=held_out_fraction,
                                   seed=split_seed)
            if not records:
                raise ValueError(f"--prompts {prompts}: no prompts left after --languages/--split/--limit")
            records = with_images(records, images)
            guard = None
            if benign:
                guard = pick_prompts(benign, None, langs or sorted({r.language for r in records}), split, benign_limit,
                                     held_out_fraction=held_out_fraction, seed=split_seed) or None
            loaded = load_model(model, dtype=dtype)
            neuron_set = NeuronSet.load(set_path, loaded)
            act_stats = None
            if parsed.kind == "mean":
                if stats is None:
                    raise ValueError(f"--mode {mode} needs --stats (the statistics folder of the identification run)")
                from neuroshield.neurons.stats import ActivationStats

                act_stats = ActivationStats.load(stats)
            from neuroshield.judges.registry import get_judge

            result = validate(loaded, neuron_set, records, mode=parsed, controls=controls, seed=seed,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, judge=get_judge(judge),
                              benign_guard=guard, benign_generate=benign_generate, out_dir=out, stats=act_stats,
                              cache_dir=cache_dir)
        typer.echo(f"set {neuron_set.name} ({len(neuron_set)} neurons)  mode {parsed}  {controls} controls  "
                   f"{len(records)} prompts  wall time {time.perf_counter() - start:.0f} s")
        typer.echo(f"{'group':22s} {'n':>4s} {'none':>6s} {'set':>6s} {'control':>14s}   invalid none/set")
        for r in result.rows:
            ctrl = "" if r["refusal_control_mean"] is None else \
                f"{r['refusal_control_mean']:.2f}±{r['refusal_control_sd']:.2f}"
            typer.echo(f"{r['language'] + '/' + r['modality'] + '/' + r['label']:22s} {r['n']:4d} "
                       f"{r['refusal_none']:6.2f} {r['refusal_set']:6.2f} {ctrl:>14s}   "
                       f"{r['invalid_none']:.2f}/{r['invalid_set']:.2f}")
        if result.guard:
            g = result.guard
            cm = g.get("control_mean", {})
            typer.echo(f"benign guard (n={g['n']}): KL/token set {g['set']['kl_per_token']:.4f}"
                       + (f", controls {cm['kl_per_token']:.4f}" if cm else "")
                       + f"; perplexity base {g['ppl_base']:.2f}, set {g['set']['ppl']:.2f}"
                       + (f", controls {cm['ppl']:.2f}" if cm else ""))
        typer.echo(f"written: {Path(out) / 'validation.json'}")
