"""`neuroshield report RUN_DIR`: one self-contained HTML report (plus Markdown and JSON) of a run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroshield.commands.common import user_errors


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        run_dir: Path = typer.Argument(..., help="Run folder (holds identify/, validate/, train/, evaluate/ ...)."),
        title: str | None = typer.Option(None, help="Report title (default: the run folder's name)."),
    ) -> None:
        """Write RUN_DIR/report.html (images embedded), report.md and report.json from whatever stages ran."""
        from neuroshield.report.report import build_report

        with user_errors():
            path = build_report(run_dir, title=title)
        typer.echo(f"written: {path}")
        typer.echo(f"         {path.with_suffix('.md')}")
        typer.echo(f"         {path.with_suffix('.json')}")
