"""One report per run folder: `report.html` (self-contained), `report.md` and `report.json`.

`build_report(run_dir)` reads whatever stage artifacts exist and never fails because one is missing
(a missing or unreadable stage is shown as "not run" / "unreadable"):

* `config.json`, `pipeline.json` (the pipeline's settings, wall time per stage);
* `identify/`: `summary.json`, neuron-set JSON files (NeuronSet metadata: neurons, by_kind, by_layer),
  and every PNG (overlap heatmaps, layer heatmaps);
* `validate/<experiment>/validation.json` and every PNG;
* `train/<recipe>/summary.json` (neurons, parameters updated, wall time, peak memory, ...) and every
  PNG (loss curves);
* `budget/budget.json` and `budget/budget.png` (the budget curve: points scored by the fast refusal score);
* any `eval.json` under the run folder (`neuroshield evaluate --out <run>/evaluate/<tag>`): ASR,
  over-refusal and exaggerated-safety refusal (contrast prompts) per language x modality with their 95 %
  intervals, each with the invalid share beside it, MGSM / XCOPA accuracy, the judge that
  produced each number. An evaluation tagged `base` (no patch) is the "before"; every other one is an
  "after", with the paired change in ASR against the base where both have `items.jsonl`.

The report opens with a headline: one card per evaluated model (pooled ASR, over-refusal and
exaggerated-safety refusal with their intervals and invalid shares, the paired change in ASR against the base, the neurons and parameters a recipe updated), the
run's wall time, and ASR per language with one column per model. Charts drawn by the report itself go to
`<run>/report/`; `report.html` embeds every image as a base64 data URI (no external CSS, JS or images),
`report.md` links them relatively and uses the same tables (folded parts as `<details>`, which GitHub
renders), `report.json` holds the same tables plus the numbers behind them.

The parts, one concern each: `read` (the run folder's files), `stages` / `evaluation` / `overview` (the sections'
tables, one module per part of the report), `charts` (the report's own charts), `cells` (number formats),
`blocks` (what a report is made of) and `render` (HTML, Markdown, JSON). A new stage adds a section function and
its line in `collect`; a new plot goes into `charts`.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

from neuroshield.report.blocks import Card, Details, Figure, Headline, Section, Table
from neuroshield.report.cells import short_time
from neuroshield.report.evaluation import budget_section, evaluate_section
from neuroshield.report.overview import build_headline, provenance_section
from neuroshield.report.read import Evals, load_evals
from neuroshield.report.render import atomic_write, render_html, render_markdown, report_json, safe_json
from neuroshield.report.stages import identify_section, train_section, validate_section

log = logging.getLogger(__name__)

STAGES = ("identify", "validate", "train", "evaluate", "budget")
REPORT_FORMAT = 2


def collect(run_dir: str | Path) -> tuple[list[Section], dict[str, Any], Headline]:
    """Read the run folder into report sections, meta data and the headline."""
    run = Path(run_dir)
    fig_dir = run / "report"
    sections: dict[str, Section] = {}
    for key, fn in (("identify", lambda: identify_section(run, fig_dir)), ("validate", lambda: validate_section(run)),
                    ("train", lambda: train_section(run)), ("budget", lambda: budget_section(run))):
        try:
            section = fn()
            if section is not None:  # budget: only where the stage ran
                sections[key] = section
        except Exception as err:  # a broken artifact must not hide the rest of the report
            log.warning("report: %s stage unreadable: %s", key, err)
            sections[key] = Section(key, key, status="unreadable", note=f"{err.__class__.__name__}: {err}")
    ev = Evals()
    try:
        ev = load_evals(run, fig_dir)
        sections["evaluate"] = evaluate_section(run, fig_dir, ev)
    except Exception as err:
        log.warning("report: evaluation unreadable: %s", err)
        sections["evaluate"] = Section("evaluate", "Evaluation (stage 6)", status="unreadable",
                                       note=f"{err.__class__.__name__}: {err}")
    try:
        headline = build_headline(run, ev, sections["train"].data.get("recipes") or {})
    except Exception as err:
        log.warning("report: headline unreadable: %s", err)
        headline = Headline()
    prov = provenance_section(run, sections, ev.results)
    ordered = [prov] + [sections[k] for k in STAGES if k in sections]
    meta = {"run_dir": str(run.resolve()), "run": run.resolve().name,
            "created": short_time(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
            "format": REPORT_FORMAT}
    return ordered, meta, headline


def build_report(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Write `report.html`, `report.md` and `report.json` into `run_dir`; returns the HTML path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist; pass the folder a pipeline stage wrote into")
    sections, meta, headline = collect(run)
    meta["title"] = title or f"neuroshield report: {meta['run']}"
    html_path = run / "report.html"
    atomic_write(html_path, render_html(sections, meta, headline))
    atomic_write(run / "report.md", render_markdown(sections, meta, headline, run))
    atomic_write(run / "report.json", safe_json(report_json(sections, meta, headline, run)))
    return html_path


__all__ = ["build_report", "collect", "render_html", "render_markdown", "Section", "Table", "Figure", "Details",
           "Card", "Headline"]
