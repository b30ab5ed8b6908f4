"""The `neuroshield` command: a thin layer; every command calls the Python API.

Each stage registers its commands from `neuroshield.commands.<stage>` (a `register(app)` function).
"""

from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(
    help="neuroshield: find, share and train the safety neurons of LLMs and VLLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = ("models", "data", "identify", "validate", "train", "evaluate", "report", "pipeline")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"neuroshield.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"neuroshield.commands.{name}":
                continue  # stage not installed in this build
            raise
        module.register(app)


_register_all()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
