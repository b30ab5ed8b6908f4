"""Numbers and JSON values as table cells and fact lines (one home for the report's number formats)."""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Sequence
from typing import Any

from neuroshield.report.blocks import Table

def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"
    if v is None or v == "":
        return "—"
    s = str(v)
    return s if len(s) <= 120 else s[:117] + "…"


def pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def pct_cell(v: Any) -> str:
    return f"{pct(v)} %" if is_num(v) else "—"


def share(frac: float) -> str:
    """A small fraction as a percentage with 3 significant digits (0.000299 -> `0.0299 %`)."""
    return f"{100 * frac:.3g} %"


def seconds_text(s: float) -> str:
    return f"{fmt(float(s))} s" + (f" ({s / 60:.1f} min)" if s >= 120 else "")


def flatten(d: Any, prefix: str = "", depth: int = 2, out: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Scalar facts of a JSON object (nested dicts joined with '.', lists of scalars joined, others summarised)."""
    out = [] if out is None else out
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                if depth > 0 and len(v) <= 24:
                    flatten(v, key, depth - 1, out)
                else:
                    out.append((key, f"{{{len(v)} entries}}"))
            elif isinstance(v, list):
                if all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
                    joined = ", ".join(fmt(x) for x in v) or "[]"
                    out.append((key, joined if len(joined) <= 200 else f"{joined[:180]}… ({len(v)} items)"))
                else:
                    out.append((key, f"[{len(v)} items]"))
            else:
                out.append((key, fmt(v)))
    return out


def scalar_facts(d: Any, depth: int = 2) -> list[tuple[str, str]]:
    """`flatten` without the summaries of nested containers ("{N entries}", "[N items]")."""
    return [(k, v) for k, v in flatten(d, depth=depth) if not re.fullmatch(r"\{\d+ entries\}|\[\d+ items\]", v)]


def fields_table(d: dict[str, Any], caption: str, title: str = "", depth: int = 4) -> Table:
    return Table(["field", "value"], [[k, v] for k, v in scalar_facts(d, depth=depth)], caption, [False, False],
                 title=title)


def drop_empty_columns(t: Table) -> Table:
    """Columns where every row says "—" (e.g. MGSM time when MGSM was not run) say nothing: drop them."""
    keep = [i for i in range(len(t.columns)) if i == 0 or any(r[i] != "—" for r in t.rows)]
    return Table([t.columns[i] for i in keep], [[r[i] for i in keep] for r in t.rows], t.caption,
                 [t.numeric[i] for i in keep], t.title)


def dict_rows_table(rows: list[dict[str, Any]], caption: str, limit: int = 60, title: str = "",
                     preferred: Sequence[str] = ()) -> Table:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list)):
                cols.append(k)
    chosen = [c for c in preferred if c in cols]
    cols = chosen if len(chosen) >= 3 else cols[:12]
    body = [[fmt(r.get(c)) for c in cols] for r in rows[:limit]]
    numeric = [all(is_num(r.get(c)) for r in rows[:limit] if r.get(c) is not None) for c in cols]
    if len(rows) > limit:
        caption += f" First {limit} of {len(rows)} shown."
    return Table([c.replace("_", " ") for c in cols], body, caption, numeric, title=title)


def rate_cell(r: Any) -> str:
    if r is None or r.n == 0:
        return "—"
    return f"{pct(r.value)} % [{pct(r.lo)}–{pct(r.hi)}]"


def delta_text(d: Any) -> str:
    """A paired change in points: `-50.0 [-100.0, +0.0]`."""
    if d is None or d.n == 0:
        return "—"
    return f"{100 * d.value:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"


def rate_value(r: Any) -> str:
    """`77.5 % [62.5–87.6] · 31/40`."""
    k = int(r.k) if float(r.k).is_integer() else r.k
    return f"{rate_cell(r)} · {k}/{r.n}"


def short_time(iso: str) -> str:
    """`2026-01-01T10:20:30+00:00` -> `2026-01-01 10:20 UTC` (unparsable strings unchanged)."""
    try:
        t = _dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return iso or "—"
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M") + (" UTC" if t.tzinfo is not None else "")
