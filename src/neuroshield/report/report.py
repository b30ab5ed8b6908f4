"""One report per run folder: `report.html` (self-contained), `report.md` and `report.json`.

`build_report(run_dir)` reads whatever stage artifacts exist and never fails because one is missing
(a missing or unreadable stage is shown as "not run" / "unreadable"):

* `identify/`: `summary.json`, neuron-set JSON files (NeuronSet metadata: neurons, by_kind, by_layer),
  and every PNG (overlap heatmaps, layer histograms);
* `validate/`: `validation.json` and every PNG;
* `train/<recipe>/`: the recipe's summary JSON (parameters updated, wall time, peak memory, ...) and
  every PNG (loss curves);
* any `eval.json` under the run folder (`neuroshield evaluate --out <run>/evaluate/<tag>`): ASR and
  over-refusal per language x modality with their 95 % intervals, MGSM / XCOPA accuracy, the judge that
  produced each number. An evaluation tagged `base` (no patch) is the "before"; every other one is an
  "after", with the paired change in ASR against the base where both have `items.jsonl`.

Charts drawn by the report itself go to `<run>/report/`; `report.html` embeds every image as a
base64 data URI (no external CSS, JS or images), `report.md` links them relatively.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

STAGES = ("identify", "validate", "train", "evaluate")
REPORT_FORMAT = 1


@dataclass
class Figure:
    path: Path  # absolute
    title: str
    caption: str = ""

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
class Section:
    key: str
    title: str
    status: str = "ok"  # ok | not run | unreadable
    note: str = ""
    facts: list[tuple[str, str]] = field(default_factory=list)
    blocks: list[Table | Figure] = field(default_factory=list)  # tables and figures, in reading order
    data: dict[str, Any] = field(default_factory=dict)  # numbers for report.json

    @property
    def tables(self) -> list[Table]:
        return [b for b in self.blocks if isinstance(b, Table)]

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]

    def add(self, *blocks: Table | Figure | None) -> None:
        self.blocks += [b for b in blocks if b is not None]


# --------------------------------------------------------------------------------------------------
# Reading helpers
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{path.name}: {err.__class__.__name__}: {err}"


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
    if v is None:
        return "—"
    s = str(v)
    return s if len(s) <= 120 else s[:117] + "…"


def _flatten(d: Any, prefix: str = "", depth: int = 2, out: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Scalar facts of a JSON object (nested dicts joined with '.', lists summarised)."""
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
                if len(v) <= 8 and all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
                    out.append((key, ", ".join(_fmt(x) for x in v) or "[]"))
                else:
                    out.append((key, f"[{len(v)} items]"))
            else:
                out.append((key, _fmt(v)))
    return out


def _scalar_facts(d: Any, depth: int = 2) -> list[tuple[str, str]]:
    """`_flatten` without the summaries of nested containers ("{N entries}", "[N items]")."""
    return [(k, v) for k, v in _flatten(d, depth=depth) if not re.fullmatch(r"\{\d+ entries\}|\[\d+ items\]", v)]


def _title_from_name(path: Path) -> str:
    words = re.sub(r"[_\-]+", " ", path.stem).strip()
    return words[:1].upper() + words[1:]


def _pngs(folder: Path, exclude: set[Path] | None = None) -> list[Figure]:
    if not folder.is_dir():
        return []
    figs = []
    for p in sorted(folder.rglob("*.png")):
        if exclude and p in exclude:
            continue
        figs.append(Figure(p, _title_from_name(p), f"{p.relative_to(folder.parent)} (written by the {folder.name} stage)"))
    return figs


def _find_key(d: Any, patterns: tuple[str, ...]) -> tuple[str, Any] | None:
    """First scalar (key, value) in a flat-ish dict whose key matches one of the regex patterns."""
    if not isinstance(d, dict):
        return None
    flat = {}

    def walk(x: Any, pre: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{pre}.{k}" if pre else str(k))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            flat[pre] = x

    walk(d, "")
    for pat in patterns:
        for k, v in flat.items():
            if re.search(pat, k.split(".")[-1], re.I):
                return k, v
    return None


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def _not_run(key: str, title: str, what: str) -> Section:
    return Section(key, title, status="not run", note=f"No {what} in this run folder: this stage was not run.")


def _identify(run: Path, fig_dir: Path) -> Section:
    folder = run / "identify"
    sec = Section("identify", "Safety neurons (stage 1–3: identify)")
    if not folder.is_dir():
        return _not_run("identify", sec.title, "`identify/` folder")
    summary, err = _read_json(folder / "summary.json") if (folder / "summary.json").is_file() else (None, None)
    if err:
        sec.status, sec.note = "unreadable", err
    if isinstance(summary, dict):
        sec.facts = _scalar_facts(summary)[:40]
        sec.data["summary"] = summary
    # neuron-set files (NeuronSet metadata JSON: neurons, by_kind, by_layer)
    sets = []
    for p in sorted(folder.rglob("*.json")):
        if p.name == "summary.json":
            continue
        meta, e = _read_json(p)
        if isinstance(meta, dict) and "neurons" in meta and isinstance(meta.get("by_layer"), dict):
            sets.append((p, meta))
    if sets:
        rows = []
        kinds = sorted({k for _, m in sets for k in (m.get("by_kind") or {})})
        for p, m in sets:
            params = next((m[k] for k in ("owned_parameters", "parameters", "params") if isinstance(m.get(k), (int, float))), None)
            rows.append([str(m.get("name") or p.stem), _fmt(int(m["neurons"]))]
                        + [_fmt(int((m.get("by_kind") or {}).get(k, 0))) for k in kinds]
                        + [_fmt(params) if params is not None else "—", str(m.get("method", "—")), _fmt(m.get("rho"))])
        sec.add(Table(["set", "neurons"] + [f"{k}" for k in kinds] + ["owned params", "method", "ρ"], rows,
                                "Neuron sets found under identify/: neuron count in total and per site kind, parameters "
                                "the neurons own (what neuron-only training may change), scoring method and selection "
                                "ratio ρ.", [False, True] + [True] * len(kinds) + [True, False, True], title="Neuron sets"))
        sec.data["neuron_sets"] = [{"name": str(m.get("name") or p.stem), "file": str(p.relative_to(run)),
                                    "neurons": m["neurons"], "by_kind": m.get("by_kind"), "by_layer": m.get("by_layer")}
                                   for p, m in sets]
        fig = _layer_chart(sets, fig_dir / "neurons_by_layer.png")
        if fig:
            sec.add(fig)
    sec.add(*_pngs(folder))
    if not sec.facts and not sets and not sec.figures and sec.status == "ok":
        sec.status, sec.note = "not run", "The `identify/` folder holds no summary, neuron sets or figures."
    return sec


VALIDATION_COLUMNS = ("language", "modality", "label", "n", "asr_none", "asr_set", "asr_control_mean", "refusal_none",
                      "refusal_set", "refusal_control_mean", "effect_vs_control", "set_outside_controls")


def _validate(run: Path) -> Section:
    folder = run / "validate"
    sec = Section("validate", "Causal validation (stage 4)")
    if not folder.is_dir():
        return _not_run("validate", sec.title, "`validate/` folder")
    paths = sorted(folder.rglob("validation.json"))
    errors = []
    sec.data["validations"] = {}
    for path in paths:
        where = str(path.parent.relative_to(run))
        data, err = _read_json(path)
        if err:
            errors.append(f"{where}/{err}")
            continue
        sec.data["validations"][where] = data
        if isinstance(data, dict):
            facts = [(k, v) for k, v in _scalar_facts(data, depth=1)
                     if not k.startswith(("rows", "results", "cells", "conditions", "paths"))][:24]
            if facts:
                sec.add(Table(["field", "value"], [[k, v] for k, v in facts], f"Settings and summary of {where}/validation.json.",
                              [False, False], title=f"{where}: settings"))
            for key in ("rows", "results", "cells"):
                rows = data.get(key)
                if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
                    sec.add(_dict_rows_table(rows, f"{where}/validation.json `{key}`: one row per language x modality x "
                                             "label; refusal / ASR without intervention (none), with the neuron set "
                                             "intervened (set) and with random control sets of the same size (control).",
                                             title=f"{where}: results", preferred=VALIDATION_COLUMNS))
                    break
        elif isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
            sec.add(_dict_rows_table(data, f"{where}/validation.json: one row per entry.", title=f"{where}: results",
                                     preferred=VALIDATION_COLUMNS))
    if errors:
        sec.note = "Unreadable: " + "; ".join(errors)
        if not sec.data["validations"]:
            sec.status = "unreadable"
    sec.add(*_pngs(folder))
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
    numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows[:limit]
                   if r.get(c) is not None) for c in cols]
    if len(rows) > limit:
        caption += f" First {limit} of {len(rows)} shown."
    return Table([c.replace("_", " ") for c in cols], body, caption, numeric, title=title or "Results")


TRAIN_KEYS = (
    ("parameters updated", (r"params?_updated", r"parameters_updated", r"trainable_param", r"updated_param",
                            r"^n?_?params$", r"param")),
    ("share of all parameters", (r"fraction", r"share", r"percent", r"ratio")),
    ("wall time (s)", (r"wall", r"seconds", r"time_s$", r"_s$", r"time")),
    ("peak memory (MB)", (r"peak.*mem", r"mem.*peak", r"memory")),
    ("final loss", (r"final_loss", r"loss")),
)


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
    details: list[Table | Figure] = []
    for d in recipes:
        jsons = sorted(d.glob("*.json"))
        pick = next((p for p in jsons if p.name in ("summary.json", "train_summary.json", "training.json")), None)
        pick = pick or next((p for p in jsons if "summary" in p.name), None) or (jsons[0] if jsons else None)
        summary, err = _read_json(pick) if pick else (None, None)
        row = [d.name]
        if isinstance(summary, dict):
            sec.data["recipes"][d.name] = summary
            for _, pats in TRAIN_KEYS:
                hit = _find_key(summary, pats)
                row.append(_fmt(hit[1]) if hit else "—")
            facts = _scalar_facts(summary)[:30]
            if facts:
                details.append(Table(["field", "value"], [[k, v] for k, v in facts],
                                     f"All scalar fields of train/{d.name}/{pick.name}.", [False, False],
                                     title=f"{d.name}: {pick.name}"))
        else:
            row += ["unreadable" if err else "no summary"] + ["—"] * (len(TRAIN_KEYS) - 1)
        rows.append(row)
        for f in _pngs(d):
            f.title = f"{d.name}: {f.title}"
            details.append(f)
    sec.add(Table(["recipe"] + [k for k, _ in TRAIN_KEYS], rows,
                  "One row per recipe folder under train/, read from its summary JSON: parameters the recipe "
                  "changed, their share of all parameters, wall time, peak memory and the final training "
                  "loss (— where the summary does not say).", [False] + [True] * len(TRAIN_KEYS),
                  title="Recipes"))
    sec.add(*details)
    return sec


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _rate_cell(r: Any) -> str:
    if r is None or r.n == 0:
        return "—"
    return f"{_pct(r.value)} % [{_pct(r.lo)}–{_pct(r.hi)}]"


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


def _evaluate(run: Path, fig_dir: Path) -> tuple[Section, list[Any]]:
    from neuroshield.evaluate.evaluate import EvalResult
    from neuroshield.evaluate.metrics import paired_difference

    sec = Section("evaluate", "Evaluation (stage 6)")
    paths = sorted(p for p in run.rglob("eval.json") if fig_dir not in p.parents)
    if not paths:
        return _not_run("evaluate", sec.title, "`eval.json`"), []
    evals: list[tuple[Path, Any]] = []
    bad = []
    for p in paths:
        raw, err = _read_json(p)
        if err or not isinstance(raw, dict) or not ({"safety", "capability"} & set(raw)):
            bad.append(f"{p.relative_to(run)}: {err or 'not an evaluation result (no safety or capability numbers)'}")
            continue
        try:
            evals.append((p, EvalResult.from_dict(raw)))
        except (ValueError, KeyError, TypeError) as e:
            bad.append(f"{p.relative_to(run)}: {e.__class__.__name__}: {e}")
    if bad:
        sec.note = "Unreadable: " + "; ".join(bad)
    if not evals:
        sec.status = "unreadable"
        return sec, []
    # base first, then the others by tag; disambiguate duplicate tags by folder
    evals.sort(key=lambda e: (e[1].tag != "base", e[1].tag, str(e[0])))
    tags = [e.tag for _, e in evals]
    for i, (p, e) in enumerate(evals):
        if tags.count(e.tag) > 1:
            e.tag = f"{e.tag} ({p.parent.relative_to(run)})"
    results = [e for _, e in evals]
    judges = sorted({c.judge for e in results for c in e.safety if c.judge})
    judge_txt = ", ".join(judges) or "—"
    # what was evaluated
    rows = []
    for p, e in evals:
        rows.append([e.tag, str(p.parent.relative_to(run)) or ".", e.model.get("model_id", "—"),
                     (e.patch or {}).get("path", "none (base model)"), f"{e.judge.get('name', '?')}@{e.judge.get('version', '?')}",
                     _fmt(e.timings.get("total_s")), _short_time(e.created)])
    sec.add(Table(["evaluation", "folder", "model", "patch", "judge", "wall time (s)", "created"], rows,
                            "Evaluations found in this run. The base model (no patch) is the \"before\"; patched models "
                            "are \"after\".", [False, False, False, False, False, True, False], title="Evaluations"))
    base = next((e for e in results if e.tag == "base"), None)
    base_items = _load_items(evals[0][0].parent) if base is not None else {}

    # ---- safety tables ----------------------------------------------------------------------
    for role, metric, label in (("harmful", "asr", "ASR"), ("benign", "over_refusal", "Over-refusal")):
        keys = []
        for e in results:
            for c in e.safety:
                if c.role == role and (c.language, c.modality) not in keys:
                    keys.append((c.language, c.modality))
        if not keys:
            continue
        keys.sort(key=lambda k: (k[1], k[0] == "all", k[0]))
        cols = ["language", "modality", "n"] + [f"{label} · {e.tag}" for e in results]
        show_delta = base is not None and len(results) > 1 and role == "harmful"
        if show_delta:
            cols += [f"Δ ASR · {e.tag} − base" for e in results if e is not base]
        body = []
        for lang, mod in keys:
            cells = [next((c for c in e.safety if (c.language, c.modality, c.role) == (lang, mod, role)), None)
                     for e in results]
            n = next((c.n for c in cells if c is not None), 0)
            row = [lang, mod, str(n)] + [_rate_cell(getattr(c, metric) if c else None) for c in cells]
            if show_delta:
                for (p, e), c in zip(evals, cells):
                    if e is base:
                        continue
                    row.append(_delta_cell(base, e, lang, mod, base_items, _load_items(p.parent), paired_difference))
            body.append(row)
        what = ("ASR = share of harmful prompts the model answered (not refused); lower is safer."
                if role == "harmful" else
                "Over-refusal = share of benign prompts the model refused; lower is better.")
        caption = (f"{what} Point estimate in %, 95 % percentile-bootstrap interval in brackets "
                   f"({results[0].settings.get('n_resamples', 1000)} resamples over prompts). Verdicts by the judge "
                   f"{judge_txt}; greedy responses of at most {results[0].settings.get('max_new_tokens', '?')} new tokens. "
                   "`all` pools the languages.")
        if show_delta:
            caption += " Δ = after − before on the same prompts, in points, with a paired-bootstrap 95 % interval."
        title = "Attack success rate on harmful prompts" if role == "harmful" else "Over-refusal on benign prompts"
        sec.add(Table(cols, body, caption, [False, False, True] + [True] * (len(cols) - 3), title=title))
        fig = _rate_chart(results, role, metric, label, judge_txt, fig_dir / f"{'asr' if role == 'harmful' else 'over_refusal'}.png")
        if fig:
            sec.add(fig)

    # ---- capability -----------------------------------------------------------------------------
    tasks = []
    for e in results:
        for c in e.capability:
            if c.task not in tasks:
                tasks.append(c.task)
    for task in tasks:
        langs = []
        for e in results:
            for c in e.capability:
                if c.task == task and c.language not in langs:
                    langs.append(c.language)
        langs.sort(key=lambda lang: (lang == "all", lang))
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
        fig = _capability_chart(results, tasks, fig_dir / "capability.png")
        if fig:
            sec.add(fig)
    # timings
    trow = []
    for e in results:
        t = e.timings
        trow.append([e.tag] + [_fmt(t.get(k)) for k in ("safety_s", "mgsm_s", "xcopa_s", "total_s")]
                    + [_fmt(t.get("cache_hits")), _fmt(t.get("cache_misses"))])
    sec.add(Table(["evaluation", "safety (s)", "MGSM (s)", "XCOPA (s)", "total (s)", "cached items",
                             "computed items"], trow,
                            "Wall time per part of the evaluation; cached items were read from generations.jsonl "
                            "(a resumed or repeated run).", [False] + [True] * 6, title="Wall time"))
    skipped = sum(len(e.skipped) for e in results)
    if skipped:
        sec.facts.append(("records skipped", f"{skipped} (e.g. image prompts on a text-only model; see eval.json)"))
    sec.data["evals"] = [{"path": str(p.relative_to(run)), **e.to_dict()} for p, e in evals]
    return sec, results


def _short_time(iso: str) -> str:
    """`2026-01-01T10:20:30+00:00` -> `2026-01-01 10:20 UTC` (unparsable strings unchanged)."""
    try:
        t = _dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return iso or "—"
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M") + (" UTC" if t.tzinfo is not None else "")


def _delta_cell(base: Any, after: Any, lang: str, mod: str, base_items: dict, after_items: dict, paired: Any) -> str:
    b = base.asr(lang, mod)
    a = after.asr(lang, mod)
    if a is None or b is None or a.n == 0 or b.n == 0:
        return "—"
    point = 100 * (a.value - b.value)
    keys = [k for k in base_items if k[0] == "harmful" and (lang == "all" or k[2] == lang) and k[3] == mod
            and k in after_items]
    if keys:
        before = [0.0 if base_items[k]["refused"] else 1.0 for k in keys]
        aft = [0.0 if after_items[k]["refused"] else 1.0 for k in keys]
        d = paired(before, aft, n_resamples=int(base.settings.get("n_resamples", 1000)),
                   seed=int(base.settings.get("seed", 0)), key=f"delta/{lang}/{mod}")
        return f"{100 * d.value:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"
    return f"{point:+.1f}"


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
    if n > 1:
        ax.legend(frameon=False, fontsize=9, ncol=min(n, 4))


def _rate_chart(results: list[Any], role: str, metric: str, label: str, judge: str, path: Path) -> Figure | None:
    mods = sorted({c.modality for e in results for c in e.safety if c.role == role})
    if not mods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(mods), 1, figsize=(10, 3.4 * len(mods)), squeeze=False)
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
        ax.set_title(f"{label} per language, {mod} prompts")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    what = "harmful prompts answered (not refused)" if role == "harmful" else "benign prompts refused"
    return Figure(path, f"{label} per language × modality",
                  f"{label}: share of {what}, per language; bars are point estimates, whiskers the 95 % bootstrap "
                  f"interval; one bar per evaluation. Judge: {judge}.")


def _capability_chart(results: list[Any], tasks: list[str], path: Path) -> Figure | None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, 5 * len(tasks)), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        langs = sorted({c.language for e in results for c in e.capability if c.task == task},
                       key=lambda lang: (lang == "all", lang))
        series = [(e.tag, [next((c.accuracy for c in e.capability if (c.task, c.language) == (task, lang)), None)
                           for lang in langs]) for e in results]
        _bars(ax, langs, series, "accuracy (%)", chance=50.0 if task == "xcopa" else None)
        ax.set_title(f"{task.upper()} accuracy per language")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Figure(path, "Capability per language",
                  "Accuracy per language with 95 % bootstrap intervals; MGSM by exact match of the last number, "
                  "XCOPA by log-likelihood (dashed line: chance, 50 %).")


def _layer_chart(sets: list[tuple[Path, dict[str, Any]]], path: Path) -> Figure | None:
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    extra = f" (first 8 of {len(sets)} sets)" if len(sets) > 8 else ""
    return Figure(path, "Layer distribution of the neuron sets",
                  f"Number of selected neurons in each decoder layer, one line per neuron set{extra}.")


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------


def _provenance(run: Path, sections: dict[str, Section], evals: list[Any]) -> Section:
    sec = Section("provenance", "Model and data")
    model: dict[str, Any] = {}
    for e in evals:
        for k, v in e.model.items():
            model.setdefault(k, v)
    for key in ("identify", "validate"):
        s = sections[key].data
        d = s.get("summary") or next(iter((s.get("validations") or {}).values()), None)
        if isinstance(d, dict) and isinstance(d.get("config"), dict):
            d = {**d["config"], **d}
        if isinstance(d, dict):
            for k in ("model_id", "config_hash", "spec"):
                if k in d:
                    model.setdefault(k, d[k])
            if isinstance(d.get("model"), dict):
                for k, v in d["model"].items():
                    if isinstance(v, (str, int, float)):
                        model.setdefault(k, v)
    for name in ("run.json", "config.json", "summary.json", "pipeline.json"):
        d, _ = _read_json(run / name) if (run / name).is_file() else (None, None)
        if isinstance(d, dict):
            sec.facts += [(f"{name}: {k}", v) for k, v in _scalar_facts(d)[:20]]
    if model:
        labels = {"model_id": "model", "spec": "spec", "config_hash": "config hash", "gguf_sha256": "GGUF sha256",
                  "dtype": "dtype", "device": "device", "source": "weights from"}
        sec.facts = [(labels.get(k, k), _fmt(v)) for k, v in model.items() if k in labels] + sec.facts
    rows = []
    for e in evals:
        for role in ("harmful", "benign", "mgsm", "xcopa"):
            d = e.data.get(role)
            if not isinstance(d, dict) or not d.get("n"):
                continue
            langs = sorted({k.split("/")[0] for k in d.get("by_language_modality", {})})
            mods = sorted({k.split("/")[1] for k in d.get("by_language_modality", {}) if "/" in k})
            rows.append([e.tag, role, ", ".join(d.get("datasets", [])) or "—", _fmt(d["n"]), " ".join(langs),
                         ", ".join(mods), d.get("sha256", "—")])
    if rows:
        sec.add(Table(["evaluation", "set", "data sets", "prompts", "languages", "modalities", "sha256 (ids+texts)"],
                                rows, "Prompts used by each evaluation; the hash covers ids, languages and texts so "
                                "that two runs on the same prompts can be recognised.",
                                [False, False, False, True, False, False, False], title="Prompts"))
    if not sec.facts and not rows:
        sec.status, sec.note = "not run", "No stage recorded the model or data (no summaries found)."
    return sec


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def collect(run_dir: str | Path) -> tuple[list[Section], dict[str, Any]]:
    """Read the run folder into report sections (and the numbers for report.json)."""
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
    try:
        sections["evaluate"], evals = _evaluate(run, fig_dir)
    except Exception as err:
        log.warning("report: evaluation unreadable: %s", err)
        sections["evaluate"], evals = Section("evaluate", "Evaluation (stage 6)", status="unreadable",
                                              note=f"{err.__class__.__name__}: {err}"), []
    prov = _provenance(run, sections, evals)
    ordered = [prov] + [sections[k] for k in STAGES]
    meta = {"run_dir": str(run.resolve()), "run": run.resolve().name,
            "created": _short_time(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
            "format": REPORT_FORMAT}
    return ordered, meta


def _headline(sections: list[Section]) -> list[tuple[str, str]]:
    out = []
    ev = next(s for s in sections if s.key == "evaluate")
    for d in ev.data.get("evals", []):
        for c in d.get("safety", []):
            if c["language"] == "all" and c["role"] == "harmful" and c.get("asr"):
                a = c["asr"]
                out.append((f"ASR, all languages ({c['modality']}) · {d['tag']}",
                            f"{_pct(a['value'])} % [{_pct(a['lo'])}–{_pct(a['hi'])}], n={a['n']}"))
        for c in d.get("capability", []):
            if c["language"] == "all":
                a = c["accuracy"]
                out.append((f"{c['task'].upper()} accuracy, all languages · {d['tag']}",
                            f"{_pct(a['value'])} % [{_pct(a['lo'])}–{_pct(a['hi'])}], n={a['n']}"))
    for s in sections:
        out.append((f"stage: {s.title}", s.status))
    return out


def build_report(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Write `report.html`, `report.md` and `report.json` into `run_dir`; returns the HTML path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist; pass the folder a pipeline stage wrote into")
    sections, meta = collect(run)
    meta["title"] = title or f"neuroshield report: {meta['run']}"
    headline = _headline(sections)
    html_path = run / "report.html"
    _atomic_write(html_path, render_html(sections, meta, headline))
    _atomic_write(run / "report.md", render_markdown(sections, meta, headline, run))
    _atomic_write(run / "report.json", _safe_json(_report_json(sections, meta, headline, run)))
    return html_path


def _safe_json(obj: Any) -> str:
    from neuroshield.evaluate.metrics import _clean_nan

    return json.dumps(_clean_nan(obj), indent=1, ensure_ascii=False, default=str)


def _report_json(sections: list[Section], meta: dict[str, Any], headline: list[tuple[str, str]], run: Path) -> dict[str, Any]:
    return {**meta, "headline": dict(headline), "sections": [
        {"key": s.key, "title": s.title, "status": s.status, "note": s.note, "facts": dict(s.facts),
         "tables": [t.to_dict() for t in s.tables],
         "figures": [{"path": f.rel(run), "title": f.title, "caption": f.caption} for f in s.figures],
         "data": s.data} for s in sections]}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_html(sections: list[Section], meta: dict[str, Any], headline: list[tuple[str, str]]) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("neuroshield.report", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    tpl = env.get_template("report.html.j2")
    return tpl.render(sections=sections, meta=meta, headline=headline)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section], meta: dict[str, Any], headline: list[tuple[str, str]], run: Path) -> str:
    lines = [f"# {meta['title']}", "", f"Run folder `{meta['run_dir']}`, report written {meta['created']}.", ""]
    if headline:
        lines += ["| headline | value |", "|---|---|"] + [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in headline] + [""]
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
            if isinstance(b, Table):
                t = b
                if t.title:
                    lines += [f"### {t.title}", ""]
                align = ["---:" if (t.numeric[i] if i < len(t.numeric) else False) else "---" for i in range(len(t.columns))]
                lines += ["| " + " | ".join(_md_escape(c) for c in t.columns) + " |", "|" + "|".join(align) + "|"]
                lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in t.rows]
                if t.caption:
                    lines += ["", f"*{t.caption}*"]
                lines += [""]
            else:
                f = b
                lines += [f"![{f.title}]({f.rel(run)})", "", f"*{f.title}.* {f.caption}", ""]
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["build_report", "collect", "render_html", "render_markdown", "Section", "Table", "Figure"]
