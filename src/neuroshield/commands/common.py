"""Helpers shared by CLI commands: turning library errors into clear one-line messages."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

# Errors whose message is already written for the user: print it, exit 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError)


@contextmanager
def user_errors() -> Iterator[None]:
    from neuroshield.io import disk_errno

    try:
        yield
    except USER_ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2) from None
    except Exception as err:  # a full or read-only disk reported by a library in its own words
        if disk_errno(err) is None:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def split_list(value: str | None) -> list[str] | None:
    if value is None or value == "":
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def split_sources(value: str) -> list[str]:
    """Comma-separated data sources; `xsafety:Insult,Mental_Health` keeps its option's commas.

    A piece that is not a registered name, `name:option` or an existing file is taken as one more item of the
    previous source's option (when that source has one).
    """
    from neuroshield.data.loaders import DATASETS

    out: list[str] = []
    for piece in split_list(value) or []:
        is_source = (piece in DATASETS or ":" in piece or Path(piece).expanduser().exists()
                     or "/" in piece or piece.endswith((".csv", ".tsv", ".jsonl", ".json", ".txt", ".xlsx")))
        if not is_source and out and ":" in out[-1]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def with_images(records: list[Any], images: Path | None) -> list[Any]:
    """`records` plus FigStep-style typographic versions of their harmful text prompts, rendered into `images`
    (option `--images DIR`; same ids, so splits agree; needs a vision-language model downstream)."""
    if images is None:
        return records
    from neuroshield.data.typography import render_prompt_records

    text = [r for r in records if r.modality == "text" and r.label == "harmful"]
    if not text:
        raise ValueError("--images: no harmful text prompts to render")
    return records + render_prompt_records(text, images)


IMAGES_HELP = ("Also render the harmful prompts FigStep-style into this folder and use them as image prompts "
               "(vision-language models).")

Command = Callable[..., Any]
