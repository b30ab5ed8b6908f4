"""`neuroshield run CONFIG`: the whole pipeline, resumable."""

from __future__ import annotations

import time

import typer

from neuroshield.commands.common import split_list, user_errors
from neuroshield.settings import PIPELINE_STAGES as STAGES


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: str = typer.Argument(..., help="Pipeline YAML (see configs/quick.yaml, configs/full.yaml)."),
        stages: str = typer.Option(",".join(STAGES), help="Stages to run, comma-separated (a stage the config "
                                   "disables is skipped: validate.enabled, budget.enabled, ...)."),
        out_dir: str = typer.Option(None, help="Override the config's out_dir."),
        overrides: list[str] = typer.Option(None, "--set", help="Override a key: --set train.steps=60 "
                                                              "--set 'train.recipes=[lora,full]' (repeatable)."),
    ) -> None:
        """Run identify -> overlap -> validate -> train -> evaluate -> budget -> report; finished stages are
        skipped."""
        from neuroshield.config import load_config
        from neuroshield.pipeline import run_pipeline

        start = time.perf_counter()
        with user_errors():
            cfg = load_config(config, overrides or ())
            if out_dir:
                cfg.out_dir = out_dir
            report = run_pipeline(cfg, tuple(split_list(stages) or ()))
        headline = cfg.run_dir / "evaluate" / "headline.md"
        if headline.is_file():
            typer.echo("\nHeadline (held-out prompts; shares in %, 95 % intervals; differences are paired, in points):")
            typer.echo(headline.read_text(encoding="utf-8"))
        typer.echo(f"done in {time.perf_counter() - start:.0f} s")
        typer.echo(f"report: {report.resolve()}")
