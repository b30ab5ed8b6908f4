"""The sections of the stages before evaluation: identify (neuron sets), validate (causal checks), train (recipes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroshield.report.blocks import Details, Figure, Section, Table
from neuroshield.report.cells import dict_rows_table, fields_table, fmt, is_num, pct, pct_cell, scalar_facts, share
from neuroshield.report.charts import layer_chart
from neuroshield.report.read import experiment_order, neuron_set_files, read_json, stage_figures

def not_run(key: str, title: str, what: str) -> Section:
    return Section(key, title, status="not run", note=f"No {what} in this run folder: this stage was not run.")


# identify/summary.json keys shown elsewhere (model and data) or as tables / figures rather than as facts
IDENTIFY_BULK = ("groups", "sets", "layer_distribution", "model_id", "model_spec", "config_hash")


IDENTIFY_LABELS = {"rho": "ρ (selection ratio)", "top_k": "top k", "high_resource": "high-resource languages",
                   "units_in_sites": "units in the sites", "total_parameters": "model parameters",
                   "wall_seconds": "wall time (s)", "peak_rss_mb": "peak RSS (MB)", "max_length": "max length (tokens)",
                   "qk_impact": "QK impact"}


def identify_section(run: Path, fig_dir: Path) -> Section:
    folder = run / "identify"
    sec = Section("identify", "Safety neurons (stage 1–3: identify)")
    if not folder.is_dir():
        return not_run("identify", sec.title, "`identify/` folder")
    summary, err = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else (None, None)
    if err:
        sec.status, sec.note = "unreadable", err
    summary = summary if isinstance(summary, dict) else {}
    if summary:
        sec.data["summary"] = summary
        visible = {k: v for k, v in summary.items() if k not in IDENTIFY_BULK}
        sec.facts = [(IDENTIFY_LABELS.get(k, k.replace("_", " ")), v) for k, v in scalar_facts(visible)
                     if not k.startswith("statistics.")]
        stats = summary.get("statistics")
        if isinstance(stats, dict):  # the group lists repeat the prompt-group table: counts say enough
            sec.facts.append(("activation statistics", f"prompt groups collected: {len(stats.get('collected_groups') or [])}"
                              f", reused from an earlier run: {len(stats.get('reused_groups') or [])}"
                              + (f"; {fmt(stats['seconds'])} s" if is_num(stats.get("seconds")) else "")))
    languages = [str(x) for x in summary.get("languages", [])]
    hr = "+".join(str(x) for x in summary.get("high_resource", [])) or "en"
    # neuron-set files (NeuronSet metadata JSON: neurons, by_kind, by_layer)
    sets = neuron_set_files(folder)
    if sets:
        sec.add(neuron_set_table(folder, sets, languages, hr))
        sec.data["neuron_sets"] = [{"name": str(m.get("name") or p.stem), "method": method_of(folder, p, m),
                                    "file": str(p.relative_to(run)), "neurons": m["neurons"],
                                    "owned_parameters": m.get("owned_parameters"), "by_kind": m.get("by_kind"),
                                    "by_layer": m.get("by_layer")} for p, m in sets]
    groups = summary.get("groups")
    if isinstance(groups, dict) and groups:
        rows = [[str(g), fmt(v.get("prompts")), fmt(v.get("tokens")), str(v.get("data_hash", "—"))]
                for g, v in groups.items() if isinstance(v, dict)]
        sec.add(Details(f"Prompt groups ({len(rows)}): prompts, tokens and data hash per language × modality × label",
                        [Table(["group", "prompts", "tokens", "data hash (sha256)"], rows,
                               "The prompts whose activations scored the neurons; the hash identifies the exact texts.",
                               [False, True, True, False], title="Prompt groups")]))
    figures = stage_figures(folder, run, hr)
    # the stage's per-language layer heatmaps say more than a line chart of the same counts
    if sets and not any("layers" in f.path.stem for f in figures):
        sec.add(layer_chart(sets, fig_dir / "neurons_by_layer.png", run))
    sec.add(*figures)
    if not sec.facts and not sets and not figures and sec.status == "ok":
        sec.status, sec.note = "not run", "The `identify/` folder holds no summary, neuron sets or figures."
    return sec


def method_of(folder: Path, path: Path, meta: dict[str, Any]) -> str:
    return str(meta.get("method") or (path.parent.name if path.parent != folder else "—"))


def neuron_set_table(folder: Path, sets: list[tuple[Path, dict[str, Any]]], languages: list[str], hr: str) -> Table:
    """One row per set name, one column group per scoring method (the same sets come from every method)."""
    methods: list[str] = []
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for p, m in sets:
        method = method_of(folder, p, m)
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
            row.append(fmt(int(m["neurons"])))
            row += [fmt(int((m.get("by_kind") or {}).get(k, 0))) for k in kinds]
            owned, total = m.get("owned_parameters"), m.get("total_parameters")
            row.append("—" if not is_num(owned) else fmt(owned) + (f" ({share(owned / total)})" if is_num(total) and total
                                                                     else ""))
        rows.append(row)
    rhos = {method: sorted({fmt(m.get("rho")) for p, m in sets if method_of(folder, p, m) == method})
            for method in methods}
    rho_txt = "; ".join(f"{method} ρ = {', '.join(r)}" for method, r in rhos.items())
    return Table(cols, rows, f"Neurons selected per set and scoring method ({rho_txt}), and the parameters they own "
                 f"(what neuron-only training may change; in brackets the share of all model parameters). "
                 f"MS(lang): monolingual safety neurons of a language; SS(lang) = MS({hr}) ∩ MS(lang), the safety "
                 "neurons a language shares with the high-resource language.",
                 [False] + [True] * (len(cols) - 1), title="Neuron sets")


VALIDATION_COLUMNS = ("language", "modality", "label", "n", "refusal_none", "refusal_set", "refusal_control_mean",
                      "refusal_control_sd", "effect_vs_control", "set_outside_controls", "flips_set_refusal_to_answer",
                      "flips_set_answer_to_refusal")


def intervention(mode: str) -> str:
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


def reading(mode: str, row: dict[str, Any], controls: int) -> str:
    """One line saying what the numbers of a validation row show, derived from them only."""
    none, st, ctrl, n = row.get("refusal_none"), row.get("refusal_set"), row.get("refusal_control_mean"), row.get("n")
    if not (is_num(none) and is_num(st)):
        return "—"
    what = intervention(mode)
    if not is_num(ctrl):
        return f"{what} changed refusal by {100 * (st - none):+.1f} points (no random control)"
    eff = st - ctrl
    count = f"; {round(abs(eff) * n)} of {n} prompts" if controls == 1 and is_num(n) else ""
    if abs(eff) < 1e-9:
        text = f"{what}: no difference from the random control ({pct(st)} % refusal with either)"
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


def validate_section(run: Path) -> Section:
    folder = run / "validate"
    sec = Section("validate", "Causal validation (stage 4)")
    if not folder.is_dir():
        return not_run("validate", sec.title, "`validate/` folder")
    errors = []
    sec.data["validations"] = {}
    summary_rows: list[list[str]] = []
    readings: list[list[str]] = []  # a sentence per row, beside the table: as a column it would not fit
    empty: set[Path] = set()  # experiments whose every refusal rate is 0: their chart shows no bar
    details: list[Details] = []
    order = experiment_order(folder)
    for path in sorted(folder.rglob("validation.json"), key=lambda p: order(p.parent)):
        where = str(path.parent.relative_to(run))
        name = str(path.parent.relative_to(folder)) if path.parent != folder else "validate"
        data, err = read_json(path)
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
        kl = f"{kl_set:.3f} vs {kl_ctrl:.3f}" if is_num(kl_set) and is_num(kl_ctrl) else \
            f"{kl_set:.3f} (no control)" if is_num(kl_set) else "—"
        for r in rows:
            lang = str(r.get("language", "—")) + (f"/{r['modality']}" if r.get("modality", "text") != "text" else "") \
                + (f" ({r['label']})" if r.get("label", "harmful") != "harmful" else "")
            ctrl = r.get("refusal_control_mean")
            sd = r.get("refusal_control_sd")
            ctrl_txt = pct_cell(ctrl) + (f" ± {pct(sd)}" if is_num(ctrl) and controls > 1 and is_num(sd) else "")
            eff = r.get("effect_vs_control")
            invalid = " / ".join(pct_cell(r.get(f"invalid_{k}")) for k in ("none", "set", "control_mean"))
            summary_rows.append([name, str(cfg.get("set", "—")), fmt(cfg.get("set_neurons")), mode, lang,
                                 fmt(r.get("n")), pct_cell(r.get("refusal_none")), pct_cell(r.get("refusal_set")),
                                 ctrl_txt, f"{100 * eff:+.1f}" if is_num(eff) else "—", invalid, kl])
            readings.append([name, lang, reading(mode, r, controls)])
        settings = {"config": {k: v for k, v in cfg.items() if k not in ("set_meta", "set_by_layer")},
                    "guard": {k: v for k, v in guard.items() if k not in ("by_language", "controls", "method")},
                    "timings": data.get("timings")}
        blocks: list[Table | Figure] = [fields_table(settings, f"Settings of {where}/validation.json (per-language "
                                                      "guard numbers are in the file).", title=f"{name}: settings")]
        if rows:
            blocks.append(dict_rows_table(rows, f"Every row of {where}/validation.json: refusal without intervention "
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
    figures = sorted(stage_figures(folder, run), key=lambda f: order(f.path.parent))
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


def train_row(name: str, s: dict[str, Any]) -> list[str]:
    params, total = s.get("parameters_updated"), s.get("total_parameters")
    frac = s.get("fraction_updated")
    frac = frac if is_num(frac) else params / total if is_num(params) and is_num(total) and total else None
    steps = f"{fmt(s.get('steps_done'))} of {fmt(s.get('steps'))}" if is_num(s.get("steps_done")) and is_num(s.get("steps")) \
        else fmt(s.get("steps"))
    # CUDA peak where the run had a GPU, else the process's peak resident memory
    mem = f"{fmt(s['peak_cuda_mb'])} (CUDA)" if is_num(s.get("peak_cuda_mb")) else \
        f"{fmt(s['peak_rss_mb'])} (RSS)" if is_num(s.get("peak_rss_mb")) else "—"
    return [name, fmt(s.get("neurons")), fmt(params), share(frac) if frac is not None else "—",
            steps, fmt(s.get("wall_seconds")), mem, fmt(s.get("final_loss"))]


def train_section(run: Path) -> Section:
    folder = run / "train"
    sec = Section("train", "Neuron-targeted training (stage 5)")
    if not folder.is_dir():
        return not_run("train", sec.title, "`train/` folder")
    recipes = [d for d in sorted(folder.iterdir()) if d.is_dir()]
    if not recipes:
        sec.status, sec.note = "not run", "The `train/` folder holds no recipe folders."
        return sec
    rows = []
    sec.data["recipes"] = {}
    figures: list[Figure] = []
    details: list[Details] = []
    for d in recipes:
        summary, err = read_json(d / "summary.json") if (d / "summary.json").is_file() else (None, None)
        if isinstance(summary, dict):
            sec.data["recipes"][d.name] = summary
            rows.append(train_row(d.name, summary))
            details.append(Details(f"{d.name}: every field of summary.json",
                                   [fields_table(summary, f"Scalar fields of train/{d.name}/summary.json (the loss "
                                                  "per step is in loss.json).", title=f"{d.name}: summary.json")]))
        else:
            rows.append([d.name, "unreadable summary.json" if err else "no summary.json"] + ["—"] * 6)
        figures += stage_figures(d, run)
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
