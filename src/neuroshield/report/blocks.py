"""What a report is made of: sections of tables, figures and folded details, and the headline's cards.

The readers (`stages`, `evaluation`, `overview`) fill these; `render` writes them as HTML, Markdown and JSON.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

@dataclass
class Figure:
    path: Path  # absolute
    title: str
    caption: str = ""
    source: str = ""  # path relative to the run folder, printed under the figure so it can be found
    half: bool = False  # a small chart: two side by side in HTML

    def rel(self, root: Path) -> str:
        return os.path.relpath(self.path, root).replace(os.sep, "/")

    def data_uri(self) -> str:
        mime = "image/png" if self.path.suffix.lower() == ".png" else "image/svg+xml" if self.path.suffix.lower() == ".svg" \
            else "image/jpeg"
        return f"data:{mime};base64," + base64.b64encode(self.path.read_bytes()).decode("ascii")


@dataclass
class Table:
    """A table for HTML and Markdown. Cells are strings; `numeric` marks right-aligned columns."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric: list[bool] = field(default_factory=list)
    title: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "caption": self.caption}


@dataclass
class Details:
    """Blocks folded away by default (HTML and Markdown `<details>`): settings and dumps kept for reference."""

    summary: str
    blocks: list[Table | Figure] = field(default_factory=list)


Block = Union[Table, Figure, Details]


@dataclass
class Section:
    key: str
    title: str
    status: str = "ok"  # ok | not run | unreadable
    note: str = ""
    facts: list[tuple[str, str]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)  # in reading order
    data: dict[str, Any] = field(default_factory=dict)  # numbers for report.json

    def flat(self) -> Iterator[Table | Figure]:
        """Tables and figures, those inside `Details` included."""
        for b in self.blocks:
            yield from (b.blocks if isinstance(b, Details) else [b])

    @property
    def tables(self) -> list[Table]:
        return [b for b in self.flat() if isinstance(b, Table)]

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.flat() if isinstance(b, Figure)]

    def add(self, *blocks: Block | None) -> None:
        self.blocks += [b for b in blocks if b is not None]


@dataclass
class Card:
    """A headline card: one evaluated model (or the run itself) at a glance."""

    title: str
    subtitle: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # label, value, tone: good | bad | ""
    note: str = ""


@dataclass
class Headline:
    cards: list[Card] = field(default_factory=list)
    table: Table | None = None  # ASR per language, one column per model
    data: dict[str, Any] = field(default_factory=dict)  # the numbers behind the cards, for report.json

    def to_dict(self) -> dict[str, Any]:
        return {"cards": [{"title": c.title, "subtitle": c.subtitle, "facts": {k: v for k, v, _ in c.rows},
                           "note": c.note} for c in self.cards],
                "asr_per_language": self.table.to_dict() if self.table else None, **self.data}
