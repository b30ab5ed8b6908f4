"""`neuroshield models info|chat`."""

from __future__ import annotations

import typer

from neuroshield.commands.common import print_json, user_errors


def register(app: typer.Typer) -> None:
    models = typer.Typer(help="Load models and inspect their neurons.", no_args_is_help=True)
    app.add_typer(models, name="models")

    @models.command("info")
    def info(
        model: str = typer.Argument(..., help="default | smollm2 | path/to/model.gguf | local folder | Hub id"),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ) -> None:
        """Architecture, layers, neuron counts per site kind, parameter count."""
        from neuroshield.models.info import model_info

        with user_errors():
            data = model_info(model)
        if as_json:
            print_json(data)
            return
        typer.echo(f"model         {data['model_id']}  ({data['spec']})")
        typer.echo(f"architecture  {data['architecture']}  adapter={data['adapter']}  layers={data['layers']}")
        g = data["attention"]
        typer.echo(f"attention     heads={g['num_heads']} kv_heads={g['num_kv_heads']} head_dim={g['head_dim']}")
        typer.echo(f"parameters    {data['parameters']:,}  dtype={data['dtype']}  config_hash={data['config_hash']}")
        typer.echo(f"load time     {data['load_seconds']:.1f} s")
        typer.echo("site      units/layer   units    params/unit")
        for kind, s in data["sites"].items():
            typer.echo(f"{kind:8s} {s['units_per_layer']:>11,} {s['units']:>8,} {s['params_per_unit']:>13,}")

    @models.command("chat")
    def chat(
        model: str = typer.Argument(..., help="Model spec, as for `models info`."),
        prompt: str = typer.Argument(..., help="User message."),
        max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    ) -> None:
        """Answer one chat prompt (greedy)."""
        from neuroshield.models.info import chat_once

        with user_errors():
            typer.echo(chat_once(model, prompt, max_new_tokens=max_new_tokens))
