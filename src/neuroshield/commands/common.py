"""Helpers shared by CLI commands: turning library errors into clear one-line messages."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

# Errors whose message is already written for the user: print it, exit 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2) from None


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def split_list(value: str | None) -> list[str] | None:
    if value is None or value == "":
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


Command = Callable[..., Any]
