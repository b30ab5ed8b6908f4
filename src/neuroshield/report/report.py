"""One report per run folder: `report.html` (self-contained), `report.md` and `report.json`.

`build_report(run_dir)` reads whatever stage artifacts exist and never fails because one is missing
(a missing or unreadable stage is shown as "not run" / "unreadable"):

* `config.json`, `pipeline.json` (the pipeline's settings, wall time per stage);
* `identify/`: `summary.json`, neuron-set JSON files (NeuronSet metadata: neurons, by_kind, by_layer),
  and every PNG (overlap heatmaps, layer heatmaps);
* `validate/<experiment>/validation.json` and every PNG;
* `train/<recipe>/summary.json` (neurons, parameters updated, wall time, peak memory, ...) and every
  PNG (loss curves);
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
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

log = logging.getLogger(__name__)

STAGES = ("identify", "validate", "train", "evaluate")
REPORT_FORMAT = 2


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


# --------------------------------------------------------------------------------------------------
# Reading and formatting helpers
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{path.name}: {err.__class__.__name__}: {err}"


def _read_dict(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is missing or not an object (optional inputs)."""
    d, _ = _read_json(path) if path.is_file() else (None, None)
    return d if isinstance(d, dict) else {}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _fmt(v: Any) -> str:
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


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _pct_cell(v: Any) -> str:
    return f"{_pct(v)} %" if _num(v) else "—"


def _share(frac: float) -> str:
    """A small fraction as a percentage with 3 significant digits (0.000299 -> `0.0299 %`)."""
    return f"{100 * frac:.3g} %"


def _seconds(s: float) -> str:
    return f"{_fmt(float(s))} s" + (f" ({s / 60:.1f} min)" if s >= 120 else "")


def _flatten(d: Any, prefix: str = "", depth: int = 2, out: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Scalar facts of a JSON object (nested dicts joined with '.', lists of scalars joined, others summarised)."""
    out = [] if out is None else out
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                if depth > 0 and len(v) <= 24:
                    _flatten(v, key, depth - 1, out)
                else:
                    out.append((key, f"{{{len(v)} entries}}"))
            elif isinstance(v, list):
                if all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
                    joined = ", ".join(_fmt(x) for x in v) or "[]"
                    out.append((key, joined if len(joined) <= 200 else f"{joined[:180]}… ({len(v)} items)"))
                else:
                    out.append((key, f"[{len(v)} items]"))
            else:
                out.append((key, _fmt(v)))
    return out


def _scalar_facts(d: Any, depth: int = 2) -> list[tuple[str, str]]:
    """`_flatten` without the summaries of nested containers ("{N entries}", "[N items]")."""
    return [(k, v) for k, v in _flatten(d, depth=depth) if not re.fullmatch(r"\{\d+ entries\}|\[\d+ items\]", v)]


def _fields_table(d: dict[str, Any], caption: str, title: str = "", depth: int = 4) -> Table:
    return Table(["field", "value"], [[k, v] for k, v in _scalar_facts(d, depth=depth)], caption, [False, False],
                 title=title)


def _drop_empty_columns(t: Table) -> Table:
    """Columns where every row says "—" (e.g. MGSM time when MGSM was not run) say nothing: drop them."""
    keep = [i for i in range(len(t.columns)) if i == 0 or any(r[i] != "—" for r in t.rows)]
    return Table([t.columns[i] for i in keep], [[r[i] for i in keep] for r in t.rows], t.caption,
                 [t.numeric[i] for i in keep], t.title)


# --------------------------------------------------------------------------------------------------
# Figures written by the stages
# --------------------------------------------------------------------------------------------------

# file stem (without an `image` word) -> (title, caption); {owner}: the folder (method, experiment, recipe),
# {hr}: the high-resource language(s) the shared sets are built from, {mod}: " for image prompts" or "".
FIGURE_TEXT: dict[str, tuple[str, str]] = {
    "ms_overlap": ("{owner}: overlap of the MS neurons between languages{mod}",
                   "Overlap of the monolingual safety-neuron sets MS(lang) between languages{mod}: overlap "
                   "coefficient |A∩B| / min(|A|, |B|) (left) and Jaccard |A∩B| / |A∪B| (right); in brackets the "
                   "overlap expected by chance for random sets of the same sizes per layer."),
    "ss_overlap": ("{owner}: overlap of the SS neurons between languages{mod}",
                   "Overlap of the shared safety-neuron sets SS(lang) = MS({hr}) ∩ MS(lang) between "
                   "languages{mod} (overlap coefficient and Jaccard; in brackets the overlap expected by chance "
                   "for sets of the same sizes per layer)."),
    "ms_layers": ("{owner}: where the MS neurons sit{mod}",
                  "Where each language's monolingual safety neurons MS(lang) sit{mod}, per layer: cell = "
                  "neurons of the set in the layer, colour = share of the set; bars on top = share of all sets' "
                  "neurons in each layer."),
    "ss_layers": ("{owner}: where the SS neurons sit{mod}",
                  "Where the shared neurons SS(lang) = MS({hr}) ∩ MS(lang) sit{mod}, per layer: cell = "
                  "neurons of the set in the layer, colour = share of the set; bars on top = share of all sets' "
                  "neurons in each layer."),
    "validation": ("{owner}: refusal per condition",
                   "Refusal rate on the harmful prompts without intervention (none), with the neuron set "
                   "intervened (set) and with random sets of the same size per layer (control: mean ± sd, dots = "
                   "single controls)."),
    "loss": ("{owner}: training loss",
             "Cross-entropy on the response tokens per training step, overall and on the harmful "
             "(refusal-target) and benign examples of each batch."),
}
FIGURE_TEXT["selection"] = (
    "{owner}: step selection",
    "Held-in monitor of the training run (never the evaluation prompts): refusal of held-in harmful prompts of every "
    "language that training does not use (y) against refusal of the contrast set's train part, safe requests that "
    "sound dangerous (x), at every monitored step; the grey point is the base model, the ringed point the step "
    "whose weights are the result (most harmful refusal with contrast refusal within the tolerance of the base's).")
SMALL_FIGURES = {"validation", "loss", "selection"}  # drawn small by their stage: shown two per row


def _figure(path: Path, run: Path, hr: str) -> Figure:
    words = path.stem.split("_")
    key = "_".join(w for w in words if w != "image")
    mod = " for image prompts" if "image" in words else ""
    source = path.relative_to(run).as_posix()
    if key in FIGURE_TEXT:
        title, caption = (t.format(owner=path.parent.name, hr=hr, mod=mod) for t in FIGURE_TEXT[key])
        return Figure(path, title, caption, source, half=key in SMALL_FIGURES)
    words = re.sub(r"[_\-]+", " ", path.stem).strip()
    return Figure(path, f"{path.parent.name}: {words}", "", source)


def _pngs(folder: Path, run: Path, hr: str = "en") -> list[Figure]:
    """Every PNG under `folder`, per subfolder in the order overlap, layers, others."""
    if not folder.is_dir():
        return []
    order = list(FIGURE_TEXT)

    def rank(p: Path) -> tuple[str, int, str]:
        key = "_".join(w for w in p.stem.split("_") if w != "image")
        return str(p.parent), order.index(key) if key in order else len(order), p.name

    return [_figure(p, run, hr) for p in sorted(folder.rglob("*.png"), key=rank)]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def _not_run(key: str, title: str, what: str) -> Section:
    return Section(key, title, status="not run", note=f"No {what} in this run folder: this stage was not run.")


# identify/summary.json keys shown elsewhere (model and data) or as tables / figures rather than as facts
IDENTIFY_BULK = ("groups", "sets", "layer_distribution", "model_id", "model_spec", "config_hash")
IDENTIFY_LABELS = {"rho": "ρ (selection ratio)", "top_k": "top k", "high_resource": "high-resource languages",
                   "units_in_sites": "units in the sites", "total_parameters": "model parameters",
                   "wall_seconds": "wall time (s)", "peak_rss_mb": "peak RSS (MB)", "max_length": "max length (tokens)",
                   "qk_impact": "QK impact"}


def _identify(run: Path, fig_dir: Path) -> Section:
    folder = run / "identify"
    sec = Section("identify", "Safety neurons (stage 1–3: identify)")
    if not folder.is_dir():
        return _not_run("identify", sec.title, "`identify/` folder")
    summary, err = _read_json(folder / "summary.json") if (folder / "summary.json").is_file() else (None, None)
    if err:
        sec.status, sec.note = "unreadable", err
    summary = summary if isinstance(summary, dict) else {}
    if summary:
        sec.data["summary"] = summary
        visible = {k: v for k, v in summary.items() if k not in IDENTIFY_BULK}
        sec.facts = [(IDENTIFY_LABELS.get(k, k.replace("_", " ")), v) for k, v in _scalar_facts(visible)
                     if not k.startswith("statistics.")]
        stats = summary.get("statistics")
        if isinstance(stats, dict):  # the group lists repeat the prompt-group table: counts say enough
            sec.facts.append(("activation statistics", f"prompt groups collected: {len(stats.get('collected_groups') or [])}"
                              f", reused from an earlier run: {len(stats.get('reused_groups') or [])}"
                              + (f"; {_fmt(stats['seconds'])} s" if _num(stats.get("seconds")) else "")))
    languages = [str(x) for x in summary.get("languages", [])]
    hr = "+".join(str(x) for x in summary.get("high_resource", [])) or "en"
    # neuron-set files (NeuronSet metadata JSON: neurons, by_kind, by_layer)
    sets = []
    for p in sorted(folder.rglob("*.json")):
        if p.name == "summary.json":
            continue
        meta, _ = _read_json(p)
        if isinstance(meta, dict) and "neurons" in meta and isinstance(meta.get("by_layer"), dict):
            sets.append((p, meta))
    if sets:
        sec.add(_neuron_set_table(folder, sets, languages, hr))
        sec.data["neuron_sets"] = [{"name": str(m.get("name") or p.stem), "method": _method_of(folder, p, m),
                                    "file": str(p.relative_to(run)), "neurons": m["neurons"],
                                    "owned_parameters": m.get("owned_parameters"), "by_kind": m.get("by_kind"),
                                    "by_layer": m.get("by_layer")} for p, m in sets]
    groups = summary.get("groups")
    if isinstance(groups, dict) and groups:
        rows = [[str(g), _fmt(v.get("prompts")), _fmt(v.get("tokens")), str(v.get("data_hash", "—"))]
                for g, v in groups.items() if isinstance(v, dict)]
        sec.add(Details(f"Prompt groups ({len(rows)}): prompts, tokens and data hash per language × modality × label",
                        [Table(["group", "prompts", "tokens", "data hash (sha256)"], rows,
                               "The prompts whose activations scored the neurons; the hash identifies the exact texts.",
                               [False, True, True, False], title="Prompt groups")]))
    figures = _pngs(folder, run, hr)
    # the stage's per-language layer heatmaps say more than a line chart of the same counts
    if sets and not any("layers" in f.path.stem for f in figures):
        sec.add(_layer_chart(sets, fig_dir / "neurons_by_layer.png", run))
    sec.add(*figures)
    if not sec.facts and not sets and not figures and sec.status == "ok":
        sec.status, sec.note = "not run", "The `identify/` folder holds no summary, neuron sets or figures."
    return sec


def _method_of(folder: Path, path: Path, meta: dict[str, Any]) -> str:
    return str(meta.get("method") or (path.parent.name if path.parent != folder else "—"))


def _neuron_set_table(folder: Path, sets: list[tuple[Path, dict[str, Any]]], languages: list[str], hr: str) -> Table:
    """One row per set name, one column group per scoring method (the same sets come from every method)."""
    methods: list[str] = []
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for p, m in sets:
        method = _method_of(folder, p, m)
        methods += [method] if method not in methods else []
        by_name.setdefault(str(m.get("name") or p.stem), {})[method] = m
    kinds = sorted({k for _, m in sets for k in (m.get("by_kind") or {})})
    kinds = kinds if len(kinds) > 1 else []  # with one site kind its count is the neuron count

    def order(name: str) -> tuple[str, int, str]:
        lang = next((str(m.get("language")) for m in by_name[name].values() if m.get("language")), "")
        return name.split("_")[0], languages.index(lang) if lang in languages else len(languages), name

    cols = ["set"]
    for method in methods:
        cols += [f"{method}: neurons"] + [f"{method}: {k}" for k in kinds] + [f"{method}: owned parameters"]
    rows = []
    for name in sorted(by_name, key=order):
        row = [name]
        for method in methods:
            m = by_name[name].get(method)
            if m is None:
                row += ["—"] * (2 + len(kinds))
                continue
            row.append(_fmt(int(m["neurons"])))
            row += [_fmt(int((m.get("by_kind") or {}).get(k, 0))) for k in kinds]
            owned, total = m.get("owned_parameters"), m.get("total_parameters")
            row.append("—" if not _num(owned) else _fmt(owned) + (f" ({_share(owned / total)})" if _num(total) and total
                                                                     else ""))
        rows.append(row)
    rhos = {method: sorted({_fmt(m.get("rho")) for p, m in sets if _method_of(folder, p, m) == method})
            for method in methods}
    rho_txt = "; ".join(f"{method} ρ = {', '.join(r)}" for method, r in rhos.items())
    return Table(cols, rows, f"Neurons selected per set and scoring method ({rho_txt}), and the parameters they own "
                 f"(what neuron-only training may change; in brackets the share of all model parameters). "
                 f"MS(lang): monolingual safety neurons of a language; SS(lang) = MS({hr}) ∩ MS(lang), the safety "
                 "neurons a language shares with the high-resource language.",
                 [False] + [True] * (len(cols) - 1), title="Neuron sets")


# --------------------------------------------------------------------------------------------------
# Causal validation
# --------------------------------------------------------------------------------------------------

VALIDATION_COLUMNS = ("language", "modality", "label", "n", "refusal_none", "refusal_set", "refusal_control_mean",
                      "refusal_control_sd", "effect_vs_control", "set_outside_controls", "flips_set_refusal_to_answer",
                      "flips_set_answer_to_refusal")


def _intervention(mode: str) -> str:
    """What an intervention mode does to the neurons: `zero` / `scale:α<1` suppress, `scale:α>1` reinforce."""
    head, _, arg = mode.partition(":")
    if head == "zero":
        return "suppression"
    if head == "scale":
        try:
            alpha = float(arg)
        except ValueError:
            return f"intervention ({mode})"
        return "reinforcement" if alpha > 1 else "suppression" if alpha < 1 else "no-op scaling"
    return f"intervention ({mode})"


def _reading(mode: str, row: dict[str, Any], controls: int) -> str:
    """One line saying what the numbers of a validation row show, derived from them only."""
    none, st, ctrl, n = row.get("refusal_none"), row.get("refusal_set"), row.get("refusal_control_mean"), row.get("n")
    if not (_num(none) and _num(st)):
        return "—"
    what = _intervention(mode)
    if not _num(ctrl):
        return f"{what} changed refusal by {100 * (st - none):+.1f} points (no random control)"
    eff = st - ctrl
    count = f"; {round(abs(eff) * n)} of {n} prompts" if controls == 1 and _num(n) else ""
    if abs(eff) < 1e-9:
        text = f"{what}: no difference from the random control ({_pct(st)} % refusal with either)"
        if what == "suppression" and none == 0:
            text += "; refusal was already 0 % without intervention, so it cannot drop"
        elif what == "reinforcement" and none == 1:
            text += "; refusal was already 100 % without intervention, so it cannot rise"
    elif (st - none) * eff > 0:  # the set moved refusal away from `none` further than the control did
        text = f"{what} {'lowered' if eff < 0 else 'raised'} refusal more than the random control " \
               f"({100 * eff:+.1f} points vs control{count})"
    else:
        change = "unchanged" if abs(st - none) < 1e-9 else f"{100 * (st - none):+.1f} points"
        text = f"refusal with the set is {abs(100 * eff):.1f} points {'below' if eff < 0 else 'above'} the random " \
               f"control{count}, but {change} against no intervention"
    if controls > 1 and isinstance(row.get("set_outside_controls"), bool):
        text += "; outside the range of the controls" if row["set_outside_controls"] else "; within the range of the controls"
    return text


def _validate(run: Path) -> Section:
    folder = run / "validate"
    sec = Section("validate", "Causal validation (stage 4)")
    if not folder.is_dir():
        return _not_run("validate", sec.title, "`validate/` folder")
    errors = []
    sec.data["validations"] = {}
    summary_rows: list[list[str]] = []
    readings: list[list[str]] = []  # a sentence per row, beside the table: as a column it would not fit
    empty: set[Path] = set()  # experiments whose every refusal rate is 0: their chart shows no bar
    details: list[Details] = []
    # in the order the pipeline ran the experiments (stage.json), others after them by name
    planned = list(((_read_dict(folder / "stage.json").get("outputs") or {}).get("experiments") or {}))

    def order(experiment: Path) -> tuple[int, str]:
        name = experiment.relative_to(folder).as_posix()
        return planned.index(name) if name in planned else len(planned), name

    for path in sorted(folder.rglob("validation.json"), key=lambda p: order(p.parent)):
        where = str(path.parent.relative_to(run))
        name = str(path.parent.relative_to(folder)) if path.parent != folder else "validate"
        data, err = _read_json(path)
        if err:
            errors.append(f"{where}/{err}")
            continue
        sec.data["validations"][where] = data
        if not isinstance(data, dict):
            errors.append(f"{where}/validation.json: not a validation result")
            continue
        cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
        rows = [r for r in data.get("rows") or [] if isinstance(r, dict)]
        mode, controls = str(cfg.get("mode", "—")), int(cfg.get("controls") or 0)
        guard = data.get("guard") if isinstance(data.get("guard"), dict) else {}
        kl_set = (guard.get("set") or {}).get("kl_per_token")
        kl_ctrl = (guard.get("control_mean") or {}).get("kl_per_token")
        kl = f"{kl_set:.3f} vs {kl_ctrl:.3f}" if _num(kl_set) and _num(kl_ctrl) else \
            f"{kl_set:.3f} (no control)" if _num(kl_set) else "—"
        for r in rows:
            lang = str(r.get("language", "—")) + (f"/{r['modality']}" if r.get("modality", "text") != "text" else "") \
                + (f" ({r['label']})" if r.get("label", "harmful") != "harmful" else "")
            ctrl = r.get("refusal_control_mean")
            sd = r.get("refusal_control_sd")
            ctrl_txt = _pct_cell(ctrl) + (f" ± {_pct(sd)}" if _num(ctrl) and controls > 1 and _num(sd) else "")
            eff = r.get("effect_vs_control")
            invalid = " / ".join(_pct_cell(r.get(f"invalid_{k}")) for k in ("none", "set", "control_mean"))
            summary_rows.append([name, str(cfg.get("set", "—")), _fmt(cfg.get("set_neurons")), mode, lang,
                                 _fmt(r.get("n")), _pct_cell(r.get("refusal_none")), _pct_cell(r.get("refusal_set")),
                                 ctrl_txt, f"{100 * eff:+.1f}" if _num(eff) else "—", invalid, kl])
            readings.append([name, lang, _reading(mode, r, controls)])
        settings = {"config": {k: v for k, v in cfg.items() if k not in ("set_meta", "set_by_layer")},
                    "guard": {k: v for k, v in guard.items() if k not in ("by_language", "controls", "method")},
                    "timings": data.get("timings")}
        blocks: list[Table | Figure] = [_fields_table(settings, f"Settings of {where}/validation.json (per-language "
                                                      "guard numbers are in the file).", title=f"{name}: settings")]
        if rows:
            blocks.append(_dict_rows_table(rows, f"Every row of {where}/validation.json: refusal without intervention "
                                           "(none), with the set (set) and with the random controls; flips = prompts "
                                           "whose verdict the set changed against none.", title=f"{name}: every row",
                                           preferred=VALIDATION_COLUMNS))
        details.append(Details(f"{name}: settings and all columns", blocks))
        if rows and all(r.get(k) == 0 for r in rows for k in ("refusal_none", "refusal_set", "refusal_control_mean")):
            empty.add(path.parent)
    if summary_rows:
        sec.add(Table(["experiment", "set", "neurons", "mode", "language", "n", "refusal: none", "refusal: set",
                       "refusal: control", "effect vs control (points)", "invalid: none / set / control",
                       "benign KL: set vs control"],
                      summary_rows,
                      "Refusal rate on harmful prompts without intervention (none), with the set's neurons intervened "
                      "(set: `zero` suppresses them, `mean:<group>` sets them to their mean on that group, `scale:α` "
                      "multiplies their activations by α) and with random sets of the same size per layer (control: "
                      "mean, ± sd when there are several); effect = set − control. Invalid: share of answers that "
                      "are empty, degenerate, a copy of the prompt or off the request (— in validations written "
                      "before the three verdicts). "
                      "Benign KL: mean KL(base ‖ intervened) per answer token on the base model's answers to benign "
                      "prompts, set vs control mean (nats; large values mean the intervention also disturbs ordinary "
                      "answers).", [False, False, True, False, False, True, True, True, True, True, True, True],
                      title="Summary of the experiments"),
                Table(["experiment", "language", "reading"], readings,
                      "Derived from the numbers above only. One prompt moves a rate by 100/n points.",
                      [False, False, False], title="Reading"))
    figures = sorted(_pngs(folder, run), key=lambda f: order(f.path.parent))
    for f in figures:
        if f.path.parent in empty:
            f.caption += " Every refusal rate is 0 %, so no bar shows."
    sec.add(*figures)
    sec.add(*details)
    if errors:
        sec.note = "Unreadable: " + "; ".join(errors)
        if not sec.data["validations"]:
            sec.status = "unreadable"
    if not sec.blocks and sec.status == "ok":
        sec.status, sec.note = "not run", "The `validate/` folder holds no validation.json or figures."
    return sec


def _dict_rows_table(rows: list[dict[str, Any]], caption: str, limit: int = 60, title: str = "",
                     preferred: Sequence[str] = ()) -> Table:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list)):
                cols.append(k)
    chosen = [c for c in preferred if c in cols]
    cols = chosen if len(chosen) >= 3 else cols[:12]
    body = [[_fmt(r.get(c)) for c in cols] for r in rows[:limit]]
    numeric = [all(_num(r.get(c)) for r in rows[:limit] if r.get(c) is not None) for c in cols]
    if len(rows) > limit:
        caption += f" First {limit} of {len(rows)} shown."
    return Table([c.replace("_", " ") for c in cols], body, caption, numeric, title=title)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _train_row(name: str, s: dict[str, Any]) -> list[str]:
    params, total = s.get("parameters_updated"), s.get("total_parameters")
    frac = s.get("fraction_updated")
    frac = frac if _num(frac) else params / total if _num(params) and _num(total) and total else None
    steps = f"{_fmt(s.get('steps_done'))} of {_fmt(s.get('steps'))}" if _num(s.get("steps_done")) and _num(s.get("steps")) \
        else _fmt(s.get("steps"))
    # CUDA peak where the run had a GPU, else the process's peak resident memory
    mem = f"{_fmt(s['peak_cuda_mb'])} (CUDA)" if _num(s.get("peak_cuda_mb")) else \
        f"{_fmt(s['peak_rss_mb'])} (RSS)" if _num(s.get("peak_rss_mb")) else "—"
    return [name, _fmt(s.get("neurons")), _fmt(params), _share(frac) if frac is not None else "—",
            steps, _fmt(s.get("wall_seconds")), mem, _fmt(s.get("final_loss"))]


def _train(run: Path) -> Section:
    folder = run / "train"
    sec = Section("train", "Neuron-targeted training (stage 5)")
    if not folder.is_dir():
        return _not_run("train", sec.title, "`train/` folder")
    recipes = [d for d in sorted(folder.iterdir()) if d.is_dir()]
    if not recipes:
        sec.status, sec.note = "not run", "The `train/` folder holds no recipe folders."
        return sec
    rows = []
    sec.data["recipes"] = {}
    figures: list[Figure] = []
    details: list[Details] = []
    for d in recipes:
        summary, err = _read_json(d / "summary.json") if (d / "summary.json").is_file() else (None, None)
        if isinstance(summary, dict):
            sec.data["recipes"][d.name] = summary
            rows.append(_train_row(d.name, summary))
            details.append(Details(f"{d.name}: every field of summary.json",
                                   [_fields_table(summary, f"Scalar fields of train/{d.name}/summary.json (the loss "
                                                  "per step is in loss.json).", title=f"{d.name}: summary.json")]))
        else:
            rows.append([d.name, "unreadable summary.json" if err else "no summary.json"] + ["—"] * 6)
        figures += _pngs(d, run)
    # the set names are long (unions of sets): in the caption rather than a column too wide for the page
    names = "; ".join(f"{k}: {v['neuron_set']}" for k, v in sec.data["recipes"].items() if v.get("neuron_set"))
    sec.add(Table(["recipe", "neurons", "parameters updated", "share of all parameters", "steps", "wall time (s)",
                   "peak memory (MB)", "final loss"], rows,
                  "One row per recipe folder under train/, from its summary.json: the neurons trained, the parameters "
                  "the recipe changed and their share of all model parameters, optimiser steps, wall time, peak memory "
                  "(CUDA where a GPU was used, else the process's resident memory) and the loss of the last step."
                  + (f" Neuron sets: {names}." if names else ""), [False] + [True] * 7, title="Recipes"))
    sec.add(*figures)
    sec.add(*details)
    return sec


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _rate_cell(r: Any) -> str:
    if r is None or r.n == 0:
        return "—"
    return f"{_pct(r.value)} % [{_pct(r.lo)}–{_pct(r.hi)}]"


def _delta_text(d: Any) -> str:
    """A paired change in points: `-50.0 [-100.0, +0.0]`."""
    if d is None or d.n == 0:
        return "—"
    return f"{100 * d.value:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"


def _complied(item: dict[str, Any]) -> float:
    """1.0 when an items.jsonl row's verdict is compliance (an attack success); rows written before the three
    verdicts have only `refused`, and a non-refusal counted as a success then."""
    if "verdict" in item:
        return float(item["verdict"] == "compliance")
    return 0.0 if item.get("refused") else 1.0


def _load_items(folder: Path) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    p = folder / "items.jsonl"
    out: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("section") == "safety":
            out[(row["role"], row["id"], row["language"], row["modality"])] = row
    return out


@dataclass
class Evals:
    """The run's evaluations, base first, with their per-prompt verdicts (for paired changes against the base)."""

    entries: list[tuple[Path, Any]] = field(default_factory=list)  # (eval.json path, EvalResult)
    bad: list[str] = field(default_factory=list)  # unreadable eval.json files, with the reason
    _items: dict[int, dict[tuple[str, str, str, str], dict[str, Any]]] = field(default_factory=dict)

    @property
    def results(self) -> list[Any]:
        return [e for _, e in self.entries]

    @property
    def base(self) -> Any:
        return next((e for e in self.results if e.tag == "base"), None)

    def items(self, i: int) -> dict[tuple[str, str, str, str], dict[str, Any]]:
        if i not in self._items:
            self._items[i] = _load_items(self.entries[i][0].parent)
        return self._items[i]

    def keys(self, role: str) -> list[tuple[str, str]]:
        """(language, modality) cells of a role over all evaluations; per modality, `all` last."""
        keys = {(c.language, c.modality) for e in self.results for c in e.safety if c.role == role}
        return sorted(keys, key=lambda k: (k[1], k[0] == "all", k[0]))

    def delta(self, i: int, language: str, modality: str) -> Any:
        """Paired change in ASR of evaluation `i` against the base on the same prompts (a Rate of after − before);
        without per-prompt verdicts on both sides, the difference of the two rates without an interval."""
        from neuroshield.evaluate.metrics import Rate, paired_difference

        base = self.base
        after = self.entries[i][1]
        b, a = (base.asr(language, modality), after.asr(language, modality)) if base is not None else (None, None)
        if a is None or b is None or a.n == 0 or b.n == 0:
            return None
        bi = self.items(next(j for j, (_, e) in enumerate(self.entries) if e is base))
        ai = self.items(i)
        keys = [k for k in bi if k[0] == "harmful" and (language == "all" or k[2] == language) and k[3] == modality
                and k in ai]
        if not keys:
            return Rate(a.value - b.value, math.nan, math.nan, 0, 0)
        return paired_difference([_complied(bi[k]) for k in keys], [_complied(ai[k]) for k in keys],
                                 n_resamples=int(base.settings.get("n_resamples", 1000)),
                                 seed=int(base.settings.get("seed", 0)), key=f"delta/{language}/{modality}")


def _load_evals(run: Path, fig_dir: Path) -> Evals:
    from neuroshield.evaluate.evaluate import EvalResult

    ev = Evals()
    for p in sorted(p for p in run.rglob("eval.json") if fig_dir not in p.parents):
        raw, err = _read_json(p)
        if err or not isinstance(raw, dict) or not ({"safety", "capability"} & set(raw)):
            ev.bad.append(f"{p.relative_to(run)}: {err or 'not an evaluation result (no safety or capability numbers)'}")
            continue
        try:
            ev.entries.append((p, EvalResult.from_dict(raw)))
        except (ValueError, KeyError, TypeError) as e:
            ev.bad.append(f"{p.relative_to(run)}: {e.__class__.__name__}: {e}")
    # base first, then the others by tag; disambiguate duplicate tags by folder
    ev.entries.sort(key=lambda x: (x[1].tag != "base", x[1].tag, str(x[0])))
    tags = [e.tag for _, e in ev.entries]
    for p, e in ev.entries:
        if tags.count(e.tag) > 1:
            e.tag = f"{e.tag} ({p.parent.relative_to(run)})"
    return ev


def _judges(ev: Evals) -> str:
    return ", ".join(sorted({c.judge for e in ev.results for c in e.safety if c.judge})) or "—"


# role -> (SafetyCell attribute, label, section title, chart file stem, what the rate counts)
SAFETY_METRICS = {
    "harmful": ("asr", "ASR", "Attack success rate on harmful prompts", "asr",
                "ASR = share of harmful prompts the model answered (verdict compliance, an attempt at the request); "
                "lower is safer."),
    "benign": ("over_refusal", "over-refusal", "Over-refusal on benign prompts", "over_refusal",
               "Over-refusal = share of everyday benign prompts the model refused; lower is better."),
    "contrast": ("exaggerated_refusal", "exaggerated-safety refusal",
                 "Exaggerated-safety refusal on contrast prompts", "exaggerated_refusal",
                 "Exaggerated-safety refusal = share of contrast prompts (safe requests that sound dangerous) the model "
                 "refused; lower is better."),
}
INVALID_NOTE = (" Invalid = share of answers that are empty, degenerate repetition, a copy or continuation of the prompt "
                "or text that does not address it: neither a refusal nor an attempt.")


def _rate_table(ev: Evals, role: str, with_delta: bool, title: str) -> Table | None:
    """ASR (harmful), over-refusal (benign) or exaggerated-safety refusal (contrast) per language x modality, with
    the invalid share beside it: two columns per evaluation."""
    metric, label = SAFETY_METRICS[role][:2]
    keys = ev.keys(role)
    if not keys:
        return None
    results = ev.results
    multi_mod = len({m for _, m in keys}) > 1
    with_delta = with_delta and ev.base is not None and len(results) > 1
    after = [i for i, e in enumerate(results) if e is not ev.base]
    cols = ["language"] + (["modality"] if multi_mod else []) + ["n"]
    for e in results:
        cols += [f"{label} · {e.tag}", f"invalid · {e.tag}"]
    cols += [f"Δ ASR · {results[i].tag} − base" for i in after] if with_delta else []
    body, degenerate = [], False
    for lang, mod in keys:
        cells = [next((c for c in e.safety if (c.language, c.modality, c.role) == (lang, mod, role)), None) for e in results]
        rates = [getattr(c, metric) if c else None for c in cells]
        degenerate |= any(r is not None and r.n and r.lo == r.hi for r in rates)
        n = next((c.n for c in cells if c is not None), 0)
        row = [lang] + ([mod] if multi_mod else []) + [str(n)]
        for c, r in zip(cells, rates):
            row += [_rate_cell(r), _rate_cell(c.invalid if c else None)]
        row += [_delta_text(ev.delta(i, lang, mod)) for i in after] if with_delta else []
        body.append(row)
    what = SAFETY_METRICS[role][4] + INVALID_NOTE
    s = results[0].settings
    caption = (f"{what} Point estimate in %, 95 % percentile-bootstrap interval in brackets "
               f"({s.get('n_resamples', 1000)} resamples over prompts). Verdicts by the judge {_judges(ev)}; greedy "
               f"responses of at most {s.get('max_new_tokens', '?')} new tokens. `all` pools the languages.")
    if degenerate:
        caption += (" An interval of zero width (e.g. [0.0–0.0]) means all n answers agreed: with small n it does not "
                    "show certainty.")
    if with_delta:
        caption += " Δ = after − before on the same prompts, in points, with a paired-bootstrap 95 % interval."
    return Table(cols, body, caption, [False] * (2 if multi_mod else 1) + [True] * (len(cols) - (2 if multi_mod else 1)),
                 title=title)


def _headline_table(run: Path) -> Table | None:
    """evaluate/headline.json (`evaluate.headline`) as a table: English against the pooled other languages."""
    path = run / "evaluate" / "headline.json"
    data, err = _read_json(path) if path.is_file() else (None, None)
    if not isinstance(data, dict) or not data.get("models"):
        return None
    from neuroshield.evaluate.headline import format_headline

    lines = [line.strip("|").split(" | ") for line in format_headline(data).splitlines()]
    header, rows = [c.strip() for c in lines[0]], [[c.strip() for c in r] for r in lines[2:]]
    return Table(header, rows, "Per model, English against every other language pooled: shares in % with bootstrap 95 % "
                 "intervals; Δ are paired differences over the same prompts, in points, against the base model and "
                 "against the random control (the mean of the random sets). ASR counts compliance only; invalid "
                 "answers (empty, looping, copies of the prompt) are shown apart. Exaggerated refusal: the contrast "
                 "set's eval part (safe requests that sound dangerous). XCOPA: log-likelihood of the two choices.",
                 [False, False] + [True] * (len(header) - 2), title="Headline")


def _evaluate(run: Path, fig_dir: Path, ev: Evals) -> Section:
    sec = Section("evaluate", "Evaluation (stage 6)")
    if not ev.entries and not ev.bad:
        return _not_run("evaluate", sec.title, "`eval.json`")
    if ev.bad:
        sec.note = "Unreadable: " + "; ".join(ev.bad)
    if not ev.entries:
        sec.status = "unreadable"
        return sec
    results = ev.results
    judge_txt = _judges(ev)
    # what was evaluated (the model column only where the evaluations differ in model)
    models = {e.model.get("model_id", "—") for e in results}
    rows = []
    for p, e in ev.entries:
        rows.append([e.tag, str(p.parent.relative_to(run)) or "."] + ([e.model.get("model_id", "—")] if len(models) > 1 else [])
                    + [(e.patch or {}).get("path", "none (base model)"),
                       f"{e.judge.get('name', '?')}@{e.judge.get('version', '?')}", _fmt(e.timings.get("total_s")),
                       _short_time(e.created)])
    cols = ["evaluation", "folder"] + (["model"] if len(models) > 1 else []) + ["patch", "judge", "wall time (s)", "created"]
    sec.add(Table(cols, rows, "Evaluations found in this run. The base model (no patch) is the \"before\"; patched "
                  "models are \"after\".", [c == "wall time (s)" for c in cols], title="Evaluations"))

    headline = _headline_table(run)
    if headline is not None:
        sec.add(headline)

    # ---- safety ----------------------------------------------------------------------------------
    for role, (metric, label, title, stem, _) in SAFETY_METRICS.items():
        table = _rate_table(ev, role, with_delta=role == "harmful", title=title)
        if table:
            sec.add(table, _rate_chart(results, role, metric, label[0].upper() + label[1:], judge_txt,
                                       fig_dir / f"{stem}.png", run))

    # ---- capability -------------------------------------------------------------------------------
    tasks = list(dict.fromkeys(c.task for e in results for c in e.capability))
    for task in tasks:
        langs = sorted({c.language for e in results for c in e.capability if c.task == task},
                       key=lambda lang: (lang == "all", lang))
        cols = ["language", "n"] + [f"accuracy · {e.tag}" for e in results]
        extra_norm = task == "xcopa"
        if extra_norm:
            cols += [f"acc_norm · {e.tag}" for e in results]
        body = []
        for lang in langs:
            cells = [next((c for c in e.capability if (c.task, c.language) == (task, lang)), None) for e in results]
            n = next((c.n for c in cells if c is not None), 0)
            row = [lang, str(n)] + [_rate_cell(c.accuracy if c else None) for c in cells]
            if extra_norm:
                row += [_rate_cell(c.extra.get("acc_norm") if c else None) for c in cells]
            body.append(row)
        method = next((c.method for e in results for c in e.capability if c.task == task and c.method), "")
        if task == "mgsm":
            cap = ("MGSM accuracy: greedy answer to the question plus a per-language instruction to end with the "
                   f"answer (at most {results[0].settings.get('mgsm_max_new_tokens', '?')} new tokens); the last number "
                   "in the response (digits of any script normalised) must equal the reference exactly.")
        elif task == "xcopa":
            cap = ("XCOPA accuracy: the choice with the higher summed log-likelihood after premise + \"because\"/\"so\" "
                   "in the item's language (no generation); acc_norm uses the log-likelihood per UTF-8 byte. "
                   "Chance is 50 %.")
        else:
            cap = f"{task} accuracy ({method})."
        cap += " 95 % percentile-bootstrap intervals in brackets."
        sec.add(Table(cols, body, cap, [False, True] + [True] * (len(cols) - 2), title=f"{task.upper()} accuracy"))
    if tasks:
        sec.add(_capability_chart(results, tasks, fig_dir / "capability.png", run))
    # timings
    trow = []
    for e in results:
        t = e.timings
        trow.append([e.tag] + [_fmt(t.get(k)) for k in ("safety_s", "mgsm_s", "xcopa_s", "total_s")]
                    + [_fmt(t.get("cache_hits")), _fmt(t.get("cache_misses"))])
    sec.add(_drop_empty_columns(Table(["evaluation", "safety (s)", "MGSM (s)", "XCOPA (s)", "total (s)", "cached items",
                                       "computed items"], trow,
                                      "Wall time per part of the evaluation; cached items were read from "
                                      "generations.jsonl (a resumed or repeated run).", [False] + [True] * 6,
                                      title="Wall time")))
    skipped = sum(len(e.skipped) for e in results)
    if skipped:
        sec.facts.append(("records skipped", f"{skipped} (e.g. image prompts on a text-only model; see eval.json)"))
    sec.data["evals"] = [{"path": str(p.relative_to(run)), **e.to_dict()} for p, e in ev.entries]
    return sec


def _short_time(iso: str) -> str:
    """`2026-01-01T10:20:30+00:00` -> `2026-01-01 10:20 UTC` (unparsable strings unchanged)."""
    try:
        t = _dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return iso or "—"
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M") + (" UTC" if t.tzinfo is not None else "")


# --------------------------------------------------------------------------------------------------
# Headline
# --------------------------------------------------------------------------------------------------


def _rate_value(r: Any) -> str:
    """`77.5 % [62.5–87.6] · 31/40`."""
    k = int(r.k) if float(r.k).is_integer() else r.k
    return f"{_rate_cell(r)} · {k}/{r.n}"


def _invalid_row(card: Card, numbers: dict[str, Any], rate: Any, label: str, key: str) -> None:
    """The invalid share beside a card's rate (absent in results written before the three verdicts)."""
    if rate is not None and rate.n:
        card.rows.append((label, _rate_value(rate), ""))
        numbers[key] = rate.to_dict()


def _headline(run: Path, ev: Evals, recipes: dict[str, dict[str, Any]]) -> Headline:
    """Per evaluated model: pooled ASR, over-refusal and exaggerated-safety refusal with their invalid shares, the
    paired change in ASR against the base, and what a
    recipe updated; plus the run's wall time. Numbers only as measured: a missing one is left out."""
    head = Headline()
    mods = sorted({c.modality for e in ev.results for c in e.safety})
    models: list[dict[str, Any]] = []
    for i, e in enumerate(ev.results):
        is_base = e is ev.base
        patch = (e.patch or {}).get("path")
        card = Card(e.tag, "before: base model, no patch" if is_base else
                    f"after: {'patched by recipe ' + e.tag if e.tag in recipes else 'patch ' + str(patch or '—')}")
        numbers: dict[str, Any] = {"model": e.tag, "base": is_base}
        for mod in mods:
            suffix = f" ({mod})" if len(mods) > 1 else ""
            asr = e.asr("all", mod)
            if asr is not None and asr.n:
                card.rows.append((f"ASR{suffix}", _rate_value(asr), ""))
                numbers[f"asr{suffix}"] = asr.to_dict()
                _invalid_row(card, numbers, e.invalid("all", mod, "harmful"), f"invalid, harmful{suffix}",
                             f"invalid_harmful{suffix}")
            d = ev.delta(i, "all", mod) if not is_base else None
            if d is not None:
                # tone only where the paired interval excludes 0
                tone = "good" if d.n and d.hi < 0 else "bad" if d.n and d.lo > 0 else ""
                card.rows.append((f"Δ ASR vs base{suffix}", f"{_delta_text(d)} points" if d.n else
                                  f"{100 * d.value:+.1f} points (unpaired)", tone))
                numbers[f"delta_asr{suffix}"] = d.to_dict()
                if d.n:
                    card.note += ("" if not card.note else " ") + (
                        f"ASR{suffix} lower than the base: the paired 95 % interval is below 0." if tone == "good" else
                        f"ASR{suffix} higher than the base: the paired 95 % interval is above 0." if tone == "bad" else
                        f"ASR{suffix} not distinguishable from the base: the paired 95 % interval includes 0.")
            over = e.over_refusal("all", mod)
            if over is not None and over.n:
                card.rows.append((f"over-refusal{suffix}", _rate_value(over), ""))
                numbers[f"over_refusal{suffix}"] = over.to_dict()
                _invalid_row(card, numbers, e.invalid("all", mod, "benign"), f"invalid, benign{suffix}",
                             f"invalid_benign{suffix}")
            exag = e.exaggerated_refusal("all", mod)
            if exag is not None and exag.n:
                card.rows.append((f"exaggerated-safety refusal{suffix}", _rate_value(exag), ""))
                numbers[f"exaggerated_refusal{suffix}"] = exag.to_dict()
                _invalid_row(card, numbers, e.invalid("all", mod, "contrast"), f"invalid, contrast{suffix}",
                             f"invalid_contrast{suffix}")
        for c in e.capability:
            if c.language == "all":
                card.rows.append((f"{c.task.upper()} accuracy", _rate_value(c.accuracy), ""))
                numbers[f"{c.task}_accuracy"] = c.accuracy.to_dict()
        s = recipes.get(e.tag) if not is_base else None
        if s:
            params, total = s.get("parameters_updated"), s.get("total_parameters")
            if _num(s.get("neurons")):
                card.rows.append(("neurons trained", _fmt(s["neurons"]), ""))
            if _num(params):
                card.rows.append(("parameters updated", _fmt(params) + (f" of {_fmt(total)} ({_share(params / total)})"
                                                                        if _num(total) and total else ""), ""))
            numbers.update({k: s.get(k) for k in ("neurons", "parameters_updated", "total_parameters")})
        head.cards.append(card)
        models.append(numbers)
    pipeline = _read_dict(run / "pipeline.json")
    wall, stages = pipeline.get("wall_seconds"), pipeline.get("stage_seconds")
    if _num(wall):
        card = Card("run", "wall time of the whole pipeline", [("wall time", _seconds(wall), "")])
        if isinstance(stages, dict):
            card.rows += [(str(k), _seconds(v), "") for k, v in stages.items() if _num(v)]
        head.cards.append(card)
    head.data = {"models": models, "wall_seconds": wall if _num(wall) else None,
                 "stage_seconds": stages if isinstance(stages, dict) else None}
    if ev.entries:
        head.table = _rate_table(ev, "harmful", with_delta=False, title="ASR per language")
    return head


# --------------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titlesize": 11, "figure.dpi": 110})
    return plt


PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def _bars(ax: Any, groups: list[str], series: list[tuple[str, list[Any]]], ylabel: str, chance: float | None = None) -> None:
    import numpy as np

    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, rates) in enumerate(series):
        vals = [100 * r.value if r is not None and r.n else np.nan for r in rates]
        lo = [100 * (r.value - r.lo) if r is not None and r.n else 0 for r in rates]
        hi = [100 * (r.hi - r.value) if r is not None and r.n else 0 for r in rates]
        ax.bar(x + (i - (n - 1) / 2) * width, vals, width * 0.92, yerr=[lo, hi], capsize=2.5, label=name,
               color=PALETTE[i % len(PALETTE)], error_kw={"elinewidth": 0.9, "ecolor": "#333333"})
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    if chance is not None:
        ax.axhline(chance, color="#999999", linestyle="--", linewidth=0.8)
    if n > 1:  # above the axes, so that it never covers a bar
        ax.legend(frameon=False, fontsize=9, ncol=min(n, 4), loc="lower right", bbox_to_anchor=(1.0, 1.0))


def _save(fig: Any, plt: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _rate_chart(results: list[Any], role: str, metric: str, label: str, judge: str, path: Path, run: Path) -> Figure | None:
    mods = sorted({c.modality for e in results for c in e.safety if c.role == role})
    if not mods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(mods), 1, figsize=(10, 3.6 * len(mods)), squeeze=False)
    for ax, mod in zip(axes[:, 0], mods):
        langs = sorted({c.language for e in results for c in e.safety if c.role == role and c.modality == mod},
                       key=lambda lang: (lang == "all", lang))
        series = []
        for e in results:
            rates = []
            for lang in langs:
                c = next((c for c in e.safety if (c.language, c.modality, c.role) == (lang, mod, role)), None)
                rates.append(getattr(c, metric) if c else None)
            series.append((e.tag, rates))
        _bars(ax, langs, series, f"{label} (%)")
        ax.set_title(f"{label} per language, {mod} prompts", loc="left")
    _save(fig, plt, path)
    what = {"harmful": "harmful prompts answered (verdict compliance)", "benign": "benign prompts refused",
            "contrast": "contrast prompts (safe, sounding dangerous) refused"}[role]
    rates = [getattr(c, metric) for e in results for c in e.safety if c.role == role]
    # an empty-looking chart is otherwise easily read as a drawing failure
    zero = " Every rate is 0 %, so no bar shows." if rates and all(r is not None and r.value == 0 for r in rates) else ""
    return Figure(path, f"{label} per language × modality",
                  f"{label}: share of {what}, per language; bars are point estimates, whiskers the 95 % bootstrap "
                  f"interval; one bar per evaluation. Judge: {judge}.{zero}", path.relative_to(run).as_posix())


def _capability_chart(results: list[Any], tasks: list[str], path: Path, run: Path) -> Figure:
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, 5 * len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        langs = sorted({c.language for e in results for c in e.capability if c.task == task},
                       key=lambda lang: (lang == "all", lang))
        series = [(e.tag, [next((c.accuracy for c in e.capability if (c.task, c.language) == (task, lang)), None)
                           for lang in langs]) for e in results]
        _bars(ax, langs, series, "accuracy (%)", chance=50.0 if task == "xcopa" else None)
        ax.set_title(f"{task.upper()} accuracy per language", loc="left")
    _save(fig, plt, path)
    return Figure(path, "Capability per language",
                  "Accuracy per language with 95 % bootstrap intervals; MGSM by exact match of the last number, "
                  "XCOPA by log-likelihood (dashed line: chance, 50 %).", path.relative_to(run).as_posix())


def _layer_chart(sets: list[tuple[Path, dict[str, Any]]], path: Path, run: Path) -> Figure | None:
    plt = _plt()
    layers = sorted({int(k) for _, m in sets for k in m["by_layer"]})
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(10, 3.4))
    for i, (p, m) in enumerate(sets[:8]):
        counts = [int(m["by_layer"].get(str(layer), 0)) for layer in layers]
        ax.plot(layers, counts, marker="o", markersize=3, linewidth=1.4, color=PALETTE[i % len(PALETTE)],
                label=str(m.get("name") or p.stem))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.grid(color="#dddddd", linewidth=0.6)
    ax.legend(frameon=False, fontsize=8, ncol=2)
    ax.set_title("Neurons per layer")
    _save(fig, plt, path)
    extra = f" (first 8 of {len(sets)} sets)" if len(sets) > 8 else ""
    return Figure(path, "Layer distribution of the neuron sets",
                  f"Number of selected neurons in each decoder layer, one line per neuron set{extra}.",
                  path.relative_to(run).as_posix())


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------

MODEL_LABELS = {"model_id": "model", "spec": "spec", "config_hash": "config hash", "dtype": "dtype", "device": "device",
                "gguf_sha256": "GGUF sha256", "source": "weights from"}


def _provenance(run: Path, sections: dict[str, Section], results: list[Any]) -> Section:
    sec = Section("provenance", "Model and data")
    model: dict[str, Any] = {}
    for e in results:
        for k, v in e.model.items():
            model.setdefault(k, v)
    for key in ("identify", "validate"):
        s = sections[key].data
        d = s.get("summary") or next(iter((s.get("validations") or {}).values()), None)
        if isinstance(d, dict) and isinstance(d.get("config"), dict):
            d = {**d["config"], **d}
        if isinstance(d, dict):
            for k, k2 in (("model_id", "model_id"), ("config_hash", "config_hash"), ("spec", "spec"),
                          ("model_spec", "spec")):
                if k in d:
                    model.setdefault(k2, d[k])
    sec.facts = [(label, _fmt(model[k])) for k, label in MODEL_LABELS.items() if k in model]
    config = _read_dict(run / "config.json")
    pipeline = _read_dict(run / "pipeline.json")
    if config.get("name"):
        sec.facts.append(("run configuration", _fmt(config["name"])))
    if pipeline.get("version"):
        sec.facts.append(("neuroshield version", _fmt(pipeline["version"])))
    if _num(pipeline.get("wall_seconds")):
        sec.facts.append(("wall time", _seconds(pipeline["wall_seconds"])))
    if isinstance(pipeline.get("stage_seconds"), dict):
        sec.facts.append(("stage times", " · ".join(f"{k} {_fmt(v)} s" for k, v in pipeline["stage_seconds"].items())))
    if config:
        sec.add(Details("Run configuration",
                        [_fields_table(config, "Every setting of the pipeline configuration this run used.",
                                       title="config.json")]))
    # prompts: evaluations on the same prompts (same hash) share one row
    grouped: dict[tuple[str, ...], list[str]] = {}
    for e in results:
        for role in ("harmful", "benign", "mgsm", "xcopa"):
            d = e.data.get(role)
            if not isinstance(d, dict) or not d.get("n"):
                continue
            lm = d.get("by_language_modality", {})
            langs = " ".join(sorted({k.split("/")[0] for k in lm}))
            mods = ", ".join(sorted({k.split("/")[1] for k in lm if "/" in k}))
            key = (role, ", ".join(d.get("datasets", [])) or "—", _fmt(d["n"]), langs, mods, str(d.get("sha256", "—")))
            grouped.setdefault(key, []).append(e.tag)
    if grouped:
        sec.add(Table(["set", "data sets", "prompts", "languages", "modalities", "sha256 (ids+texts)", "evaluations"],
                      [list(k) + [", ".join(tags)] for k, tags in grouped.items()],
                      "Prompts used by the evaluations; the hash covers ids, languages and texts, so evaluations on the "
                      "same prompts share a row.", [False, False, True, False, False, False, False], title="Prompts"))
    if not sec.facts and not sec.blocks:
        sec.status, sec.note = "not run", "No stage recorded the model or data (no summaries found)."
    return sec


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def collect(run_dir: str | Path) -> tuple[list[Section], dict[str, Any], Headline]:
    """Read the run folder into report sections, meta data and the headline."""
    run = Path(run_dir)
    fig_dir = run / "report"
    sections: dict[str, Section] = {}
    for key, fn in (("identify", lambda: _identify(run, fig_dir)), ("validate", lambda: _validate(run)),
                    ("train", lambda: _train(run))):
        try:
            sections[key] = fn()
        except Exception as err:  # a broken artifact must not hide the rest of the report
            log.warning("report: %s stage unreadable: %s", key, err)
            sections[key] = Section(key, key, status="unreadable", note=f"{err.__class__.__name__}: {err}")
    ev = Evals()
    try:
        ev = _load_evals(run, fig_dir)
        sections["evaluate"] = _evaluate(run, fig_dir, ev)
    except Exception as err:
        log.warning("report: evaluation unreadable: %s", err)
        sections["evaluate"] = Section("evaluate", "Evaluation (stage 6)", status="unreadable",
                                       note=f"{err.__class__.__name__}: {err}")
    try:
        headline = _headline(run, ev, sections["train"].data.get("recipes") or {})
    except Exception as err:
        log.warning("report: headline unreadable: %s", err)
        headline = Headline()
    prov = _provenance(run, sections, ev.results)
    ordered = [prov] + [sections[k] for k in STAGES]
    meta = {"run_dir": str(run.resolve()), "run": run.resolve().name,
            "created": _short_time(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
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
    _atomic_write(html_path, render_html(sections, meta, headline))
    _atomic_write(run / "report.md", render_markdown(sections, meta, headline, run))
    _atomic_write(run / "report.json", _safe_json(_report_json(sections, meta, headline, run)))
    return html_path


def _safe_json(obj: Any) -> str:
    from neuroshield.evaluate.metrics import _clean_nan

    return json.dumps(_clean_nan(obj), indent=1, ensure_ascii=False, default=str)


def _report_json(sections: list[Section], meta: dict[str, Any], headline: Headline, run: Path) -> dict[str, Any]:
    return {**meta, "headline": headline.to_dict(), "sections": [
        {"key": s.key, "title": s.title, "status": s.status, "note": s.note, "facts": dict(s.facts),
         "tables": [t.to_dict() for t in s.tables],
         "figures": [{"path": f.rel(run), "title": f.title, "caption": f.caption} for f in s.figures],
         "data": s.data} for s in sections]}


def _atomic_write(path: Path, text: str) -> None:
    from neuroshield.io import atomic_write_text

    atomic_write_text(path, text)


def render_html(sections: list[Section], meta: dict[str, Any], headline: Headline) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("neuroshield.report", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    tpl = env.get_template("report.html.j2")
    return tpl.render(sections=sections, meta=meta, headline=headline)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table, heading: str = "###") -> list[str]:
    lines = [f"{heading} {t.title}", ""] if t.title else []
    align = ["---:" if (t.numeric[i] if i < len(t.numeric) else False) else "---" for i in range(len(t.columns))]
    lines += ["| " + " | ".join(_md_escape(c) for c in t.columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in t.rows]
    return lines + (["", f"*{t.caption}*"] if t.caption else []) + [""]


def _md_block(b: Table | Figure, run: Path) -> list[str]:
    if isinstance(b, Table):
        return _md_table(b)
    source = f" `{b.source}`" if b.source else ""
    return [f"![{b.title}]({b.rel(run)})", "", f"*{b.title}.* {b.caption}{source}", ""]


def render_markdown(sections: list[Section], meta: dict[str, Any], headline: Headline, run: Path) -> str:
    lines = [f"# {meta['title']}", "", f"Run folder `{meta['run_dir']}`, report written {meta['created']}.", ""]
    # the cards as one table: a row per model, a column per fact
    models = [c for c in headline.cards if c.title != "run"]
    if models:
        labels = list(dict.fromkeys(k for c in models for k, _, _ in c.rows))
        lines += ["## At a glance", "", "| model | " + " | ".join(_md_escape(k) for k in labels) + " |",
                  "|---|" + "---|" * len(labels)]
        lines += [f"| {_md_escape(c.title)} ({_md_escape(c.subtitle)}) | "
                  + " | ".join(_md_escape(dict((k, v) for k, v, _ in c.rows).get(k, "—")) for k in labels) + " |"
                  for c in models]
        lines += [""] + [f"- **{_md_escape(c.title)}**: {c.note}" for c in models if c.note] + [""]
    for c in headline.cards:
        if c.title == "run":
            lines += ["Run: " + "; ".join(f"{k} {v}" for k, v, _ in c.rows) + ".", ""]
    if headline.table:
        lines += _md_table(headline.table)
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.status != "ok":
            lines += [f"**{s.status}.** {s.note}", ""]
            continue
        if s.note:
            lines += [s.note, ""]
        if s.facts:
            lines += ["| fact | value |", "|---|---|"] + [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in s.facts] + [""]
        for b in s.blocks:
            if isinstance(b, Details):
                lines += ["<details>", f"<summary>{html.escape(b.summary)}</summary>", ""]
                for inner in b.blocks:
                    lines += _md_block(inner, run)
                lines += ["</details>", ""]
            else:
                lines += _md_block(b, run)
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["build_report", "collect", "render_html", "render_markdown", "Section", "Table", "Figure", "Details",
           "Card", "Headline"]
