"""The evaluation section (ASR, over-refusal and exaggerated-safety refusal per language, capability, wall time) and
the budget curve's section."""

from __future__ import annotations

from pathlib import Path

from neuroshield.report.blocks import Figure, Section, Table
from neuroshield.report.cells import delta_text, drop_empty_columns, fmt, rate_cell, short_time
from neuroshield.report.charts import capability_chart, rate_chart
from neuroshield.report.read import Evals, read_json
from neuroshield.report.stages import not_run

def judges_text(ev: Evals) -> str:
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


def rate_table(ev: Evals, role: str, with_delta: bool, title: str) -> Table | None:
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
            row += [rate_cell(r), rate_cell(c.invalid if c else None)]
        row += [delta_text(ev.delta(i, lang, mod)) for i in after] if with_delta else []
        body.append(row)
    what = SAFETY_METRICS[role][4] + INVALID_NOTE
    s = results[0].settings
    caption = (f"{what} Point estimate in %, 95 % percentile-bootstrap interval in brackets "
               f"({s.get('n_resamples', 1000)} resamples over prompts). Verdicts by the judge {judges_text(ev)}; greedy "
               f"responses of at most {s.get('max_new_tokens', '?')} new tokens. `all` pools the languages.")
    if degenerate:
        caption += (" An interval of zero width (e.g. [0.0–0.0]) means all n answers agreed: with small n it does not "
                    "show certainty.")
    if with_delta:
        caption += " Δ = after − before on the same prompts, in points, with a paired-bootstrap 95 % interval."
    return Table(cols, body, caption, [False] * (2 if multi_mod else 1) + [True] * (len(cols) - (2 if multi_mod else 1)),
                 title=title)


def _md_rows(markdown: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a Markdown table as `evaluate.headline` prints it."""
    lines = [line.strip().strip("|").split(" | ") for line in markdown.splitlines()]
    return [c.strip() for c in lines[0]], [[c.strip() for c in r] for r in lines[2:]]


def headline_tables(run: Path) -> list[Table]:
    """evaluate/headline.json (`evaluate.headline`) as tables: English against the pooled other languages (and the
    pooled trained against the pooled never-trained languages, when the run fixed the split); with several random
    sets, each recipe against each set."""
    path = run / "evaluate" / "headline.json"
    data, err = read_json(path) if path.is_file() else (None, None)
    if not isinstance(data, dict) or not data.get("models"):
        return []
    from neuroshield.evaluate.headline import format_headline, format_random_sets

    header, rows = _md_rows(format_headline(data))
    split = (" The trained and never-trained rows pool the languages some recipe trained on and those that no recipe "
             "trained on (never_trained, fixed in the config before the run).") if data.get("never_trained") else ""
    tables = [Table(header, rows, "Per model, English against every other language pooled: shares in % with bootstrap "
                    "95 % intervals; Δ are paired differences over the same prompts, in points, against the base model "
                    "and against the random control (the mean of the random sets). ASR counts compliance only; invalid "
                    "answers (empty, looping, copies of the prompt) are shown apart. Exaggerated refusal: the contrast "
                    "set's eval part (safe requests that sound dangerous). XCOPA: log-likelihood of the two choices."
                    + split, [False, False] + [True] * (len(header) - 2), title="Headline")]
    sets = format_random_sets(data)
    if sets:
        header, rows = _md_rows(sets)
        tables.append(Table(header, rows, "The random control set by set (same count per layer as the set it "
                            "controls, different seeds): their ASR as mean ± standard deviation and range, and each "
                            "model's paired ASR difference against each set, in points, with a paired-bootstrap 95 % "
                            "interval and the discordant prompts (fewer / more answered than the set).",
                            [False, False] + [True] * (len(header) - 2), title="Against each random set"))
    return tables


def evaluate_section(run: Path, fig_dir: Path, ev: Evals) -> Section:
    sec = Section("evaluate", "Evaluation (stage 6)")
    if not ev.entries and not ev.bad:
        return not_run("evaluate", sec.title, "`eval.json`")
    if ev.bad:
        sec.note = "Unreadable: " + "; ".join(ev.bad)
    if not ev.entries:
        sec.status = "unreadable"
        return sec
    results = ev.results
    judge_txt = judges_text(ev)
    # what was evaluated (the model column only where the evaluations differ in model)
    models = {e.model.get("model_id", "—") for e in results}
    rows = []
    for p, e in ev.entries:
        rows.append([e.tag, str(p.parent.relative_to(run)) or "."] + ([e.model.get("model_id", "—")] if len(models) > 1 else [])
                    + [(e.patch or {}).get("path", "none (base model)"),
                       f"{e.judge.get('name', '?')}@{e.judge.get('version', '?')}", fmt(e.timings.get("total_s")),
                       short_time(e.created)])
    cols = ["evaluation", "folder"] + (["model"] if len(models) > 1 else []) + ["patch", "judge", "wall time (s)", "created"]
    sec.add(Table(cols, rows, "Evaluations found in this run. The base model (no patch) is the \"before\"; patched "
                  "models are \"after\".", [c == "wall time (s)" for c in cols], title="Evaluations"))

    for table in headline_tables(run):
        sec.add(table)

    # ---- safety ----------------------------------------------------------------------------------
    for role, (metric, label, title, stem, _) in SAFETY_METRICS.items():
        table = rate_table(ev, role, with_delta=role == "harmful", title=title)
        if table:
            sec.add(table, rate_chart(results, role, metric, label[0].upper() + label[1:], judge_txt,
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
            row = [lang, str(n)] + [rate_cell(c.accuracy if c else None) for c in cells]
            if extra_norm:
                row += [rate_cell(c.extra.get("acc_norm") if c else None) for c in cells]
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
        sec.add(capability_chart(results, tasks, fig_dir / "capability.png", run))
    # timings
    trow = []
    for e in results:
        t = e.timings
        trow.append([e.tag] + [fmt(t.get(k)) for k in ("safety_s", "mgsm_s", "xcopa_s", "total_s")]
                    + [fmt(t.get("cache_hits")), fmt(t.get("cache_misses"))])
    sec.add(drop_empty_columns(Table(["evaluation", "safety (s)", "MGSM (s)", "XCOPA (s)", "total (s)", "cached items",
                                       "computed items"], trow,
                                      "Wall time per part of the evaluation; cached items were read from "
                                      "generations.jsonl (a resumed or repeated run).", [False] + [True] * 6,
                                      title="Wall time")))
    skipped = sum(len(e.skipped) for e in results)
    if skipped:
        sec.facts.append(("records skipped", f"{skipped} (e.g. image prompts on a text-only model; see eval.json)"))
    sec.data["evals"] = [{"path": str(p.relative_to(run)), **e.to_dict()} for p, e in ev.entries]
    return sec


def budget_section(run: Path) -> Section | None:
    """budget/budget.json (`Pipeline.budget`): the budget curve's plot and its points as a table; None when the run
    has no budget folder (the stage is off by default)."""
    from neuroshield.evaluate.budget import format_budget

    sec = Section("budget", "Budget curve: safety against parameters trained")
    path = run / "budget" / "budget.json"
    if not (run / "budget").is_dir():
        return None
    if not path.is_file():
        return not_run("budget", sec.title, "`budget/budget.json`")
    curve, err = read_json(path)
    if not isinstance(curve, dict) or "points" not in curve:
        sec.status, sec.note = "unreadable", f"budget/budget.json: {err or 'no points'}"
        return sec
    sec.data["budget"] = {k: v for k, v in curve.items() if k != "base"}
    what = ("Each point is one training run from the base weights with the run's train settings: a neuron recipe "
            "trimmed to a share of all parameters (precise-shield's union of sets; random: its control at that "
            "budget) or LoRA at a rank (alpha = 2 x rank), keeping its last step unless budget.select_every is set. Measured without generation by the fast refusal score "
            "(log-odds of refusal against compliance openers at the first answer token; > 0 counts as a refusal) on "
            "the evaluation's held-out harmful prompts and the contrast set's eval part, with bootstrap 95 % "
            "intervals; Δ vs random: a neuron point against the random set at its budget, paired on the same "
            "prompts, in points. A screen of single runs, not the headline: the headline's numbers judge generated "
            "answers.")
    png = run / "budget" / "budget.png"
    if png.is_file():
        sec.add(Figure(png, "ASR and exaggerated refusal by score against parameters trained", what,
                       png.relative_to(run).as_posix()))
    cols, rows = format_budget(curve)
    sec.add(Table(cols, rows, what, [False, False, True, True, True, False, True, True, True, True, True, True],
                      title="Budget points"))
    return sec
