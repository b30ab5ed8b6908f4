"""Writing the report: HTML (jinja2 template, images embedded), Markdown (images linked) and JSON."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from neuroshield.report.blocks import Details, Figure, Headline, Section, Table

def safe_json(obj: Any) -> str:
    from neuroshield.evaluate.metrics import _clean_nan

    return json.dumps(_clean_nan(obj), indent=1, ensure_ascii=False, default=str)


def report_json(sections: list[Section], meta: dict[str, Any], headline: Headline, run: Path) -> dict[str, Any]:
    return {**meta, "headline": headline.to_dict(), "sections": [
        {"key": s.key, "title": s.title, "status": s.status, "note": s.note, "facts": dict(s.facts),
         "tables": [t.to_dict() for t in s.tables],
         "figures": [{"path": f.rel(run), "title": f.title, "caption": f.caption} for f in s.figures],
         "data": s.data} for s in sections]}


def atomic_write(path: Path, text: str) -> None:
    from neuroshield.io import atomic_write_text

    atomic_write_text(path, text)


def render_html(sections: list[Section], meta: dict[str, Any], headline: Headline) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("neuroshield.report", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    tpl = env.get_template("report.html.j2")
    return tpl.render(sections=sections, meta=meta, headline=headline)


def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(t: Table, heading: str = "###") -> list[str]:
    lines = [f"{heading} {t.title}", ""] if t.title else []
    align = ["---:" if (t.numeric[i] if i < len(t.numeric) else False) else "---" for i in range(len(t.columns))]
    lines += ["| " + " | ".join(md_escape(c) for c in t.columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in t.rows]
    return lines + (["", f"*{t.caption}*"] if t.caption else []) + [""]


def md_block(b: Table | Figure, run: Path) -> list[str]:
    if isinstance(b, Table):
        return md_table(b)
    source = f" `{b.source}`" if b.source else ""
    return [f"![{b.title}]({b.rel(run)})", "", f"*{b.title}.* {b.caption}{source}", ""]


def render_markdown(sections: list[Section], meta: dict[str, Any], headline: Headline, run: Path) -> str:
    lines = [f"# {meta['title']}", "", f"Run folder `{meta['run_dir']}`, report written {meta['created']}.", ""]
    # the cards as one table: a row per model, a column per fact
    models = [c for c in headline.cards if c.title != "run"]
    if models:
        labels = list(dict.fromkeys(k for c in models for k, _, _ in c.rows))
        lines += ["## At a glance", "", "| model | " + " | ".join(md_escape(k) for k in labels) + " |",
                  "|---|" + "---|" * len(labels)]
        lines += [f"| {md_escape(c.title)} ({md_escape(c.subtitle)}) | "
                  + " | ".join(md_escape(dict((k, v) for k, v, _ in c.rows).get(k, "—")) for k in labels) + " |"
                  for c in models]
        lines += [""] + [f"- **{md_escape(c.title)}**: {c.note}" for c in models if c.note] + [""]
    for c in headline.cards:
        if c.title == "run":
            lines += ["Run: " + "; ".join(f"{k} {v}" for k, v, _ in c.rows) + ".", ""]
    if headline.table:
        lines += md_table(headline.table)
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.status != "ok":
            lines += [f"**{s.status}.** {s.note}", ""]
            continue
        if s.note:
            lines += [s.note, ""]
        if s.facts:
            lines += ["| fact | value |", "|---|---|"] + [f"| {md_escape(k)} | {md_escape(v)} |" for k, v in s.facts] + [""]
        for b in s.blocks:
            if isinstance(b, Details):
                lines += ["<details>", f"<summary>{html.escape(b.summary)}</summary>", ""]
                for inner in b.blocks:
                    lines += md_block(inner, run)
                lines += ["</details>", ""]
            else:
                lines += md_block(b, run)
    return "\n".join(lines).rstrip() + "\n"
