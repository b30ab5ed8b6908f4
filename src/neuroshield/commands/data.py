"""`neuroshield data list|show`: what prompt sets there are, and a peek into one."""

from __future__ import annotations

from pathlib import Path

import typer

from neuroshield.commands.common import print_json, split_list, user_errors


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


def register(app: typer.Typer) -> None:
    data = typer.Typer(help="List and inspect the prompt data sets.", no_args_is_help=True)
    app.add_typer(data, name="data")

    @data.command("list")
    def list_cmd(
        root: Path | None = typer.Option(None, help="Data root (default: $NEUROSHIELD_DATA or ../shared/data)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Registered data sets: label, prompts per language, path, licence file."""
        from neuroshield.data.loaders import list_datasets

        with user_errors():
            infos = list_datasets(root)
        if as_json:
            print_json([
                {"name": i.name, "label": i.label, "languages": i.languages, "path": str(i.path),
                 "licence": str(i.licence) if i.licence else None, "option": i.option_help, "error": i.error}
                for i in infos
            ])
            return
        rows = [("dataset", "label", "languages (prompts)", "path")]
        for i in infos:
            langs = i.error or " ".join(f"{lang}:{n}" for lang, n in i.languages.items())
            rows.append((i.name, i.label, langs, str(i.path)))
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        for r in rows:
            typer.echo(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
        options = [i for i in infos if i.option_help]
        if options:
            typer.echo("")
            for i in options:
                typer.echo(f"{i.name}:OPTION  {i.option_help}")

    @data.command("show")
    def show(
        name: str = typer.Argument(..., help="Data set name, name:option, or a file path."),
        language: str | None = typer.Option(None, "--language", "-l", help="Language code(s), comma-separated."),
        limit: int = typer.Option(3, "--limit", "-n", help="Prompts per language."),
        label: str | None = typer.Option(None, help="harmful | benign"),
        category: str | None = typer.Option(None, help="Category (or categories, comma-separated)."),
        width: int = typer.Option(100, help="Truncate each prompt to this many characters."),
        root: Path | None = typer.Option(None, help="Data root (default: $NEUROSHIELD_DATA or ../shared/data)."),
    ) -> None:
        """Print a few prompts of a data set, one line each, truncated."""
        from neuroshield.data.loaders import load_prompts

        with user_errors():
            records = load_prompts(name, languages=split_list(language), label=label, limit=limit,
                                   categories=split_list(category), root=root)
        for r in records:
            tag = f"{r.language} {r.label}" + (f" {r.category}" if r.category else "")
            typer.echo(f"{r.id}  [{tag}]  {_one_line(r.text, width)}")
        typer.echo(f"({len(records)} prompts)")
