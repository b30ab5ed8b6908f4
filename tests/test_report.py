"""The run report: built from a synthetic run folder; embeds images; shows numbers; survives missing stages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from neuroshield.evaluate.evaluate import EvalResult
from neuroshield.evaluate.metrics import Verdict, accuracy_cells, safety_metrics
from neuroshield.report.report import build_report


def _png(path: Path, color: str = "#4C72B0") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.bar([0, 1], [1, 2], color=color)
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return path


def _eval(folder: Path, tag: str, refused_en: int, patch: str | None = None) -> EvalResult:
    """10 en + 10 zh harmful prompts, `refused_en` of the en ones refused, 3 zh ones refused and 1 invalid; 5 benign;
    4 contrast (1 refused, 1 invalid); MGSM and XCOPA."""
    verdicts, items = [], []
    for lang, k in (("en", refused_en), ("zh", 3)):
        for i in range(10):
            v = "refusal" if i < k else "invalid" if lang == "zh" and i == k else "compliance"
            verdicts.append(Verdict(lang, "text", "harmful", v))
            items.append({"section": "safety", "role": "harmful", "id": f"h/{i}", "language": lang,
                          "modality": "text", "verdict": v, "score": None, "matched": None})
    verdicts += [Verdict("en", "text", "benign", "refusal" if i == 0 else "compliance") for i in range(5)]
    verdicts += [Verdict("en", "text", "contrast", ("refusal", "invalid", "compliance", "compliance")[i]) for i in range(4)]
    cap = accuracy_cells("mgsm", [("en", i < 4) for i in range(10)], method="last-number exact match", n_resamples=100)
    xc = accuracy_cells("xcopa", [("it", i < 6) for i in range(10)], method="sum log-likelihood", n_resamples=100)
    for c in xc:
        c.extra["acc_norm"] = c.accuracy
    res = EvalResult(
        tag=tag, model={"model_id": "tiny/test-model", "spec": "tiny", "config_hash": "abc123"},
        patch={"path": patch, "sha256": "ffff"} if patch else None,
        judge={"name": "refusal-phrase", "version": "h1"},
        safety=safety_metrics(verdicts, judge="refusal-phrase@h1", n_resamples=100),
        capability=cap + xc,
        data={"harmful": {"n": 20, "by_language_modality": {"en/text": 10, "zh/text": 10}, "sha256": "0123456789abcdef",
                          "datasets": ["xsafety"]},
              "contrast": {"n": 4, "by_language_modality": {"en/text": 4}, "sha256": "fedcba9876543210",
                           "datasets": ["neuroshield-contrast"]}},
        settings={"max_new_tokens": 48, "mgsm_max_new_tokens": 256, "n_resamples": 100, "seed": 0},
        timings={"safety_s": 12.0, "total_s": 30.5}, created="2026-01-01T00:00:00+00:00",
    )
    folder.mkdir(parents=True, exist_ok=True)
    res.save(folder / "eval.json")
    (folder / "items.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return res


def _validation(folder: Path, set_name: str, mode: str, none: float, st: float, controls: list[float],
                guard: bool = True, invalid: tuple[float, float, float] | None = None) -> None:
    """A validation.json as `neuroshield validate` writes it (n = 6 harmful prompts, one language); `invalid`:
    the invalid shares (none, set, control mean), absent as in validations written before the three verdicts."""
    mean = sum(controls) / len(controls)
    sd = (sum((c - mean) ** 2 for c in controls) / (len(controls) - 1)) ** 0.5 if len(controls) > 1 else 0.0
    row = {"language": "en", "modality": "text", "label": "harmful", "n": 6, "refusal_none": none, "refusal_set": st,
           "refusal_control_mean": mean, "refusal_control_sd": sd, "refusal_controls": controls,
           "effect_vs_control": st - mean, "set_outside_controls": not min(controls) <= st <= max(controls),
           "flips_set_refusal_to_answer": 2, "flips_set_answer_to_refusal": 0}
    if invalid is not None:
        row.update(zip(("invalid_none", "invalid_set", "invalid_control_mean"), invalid))
    g = {"method": "teacher-forced ...", "n": 8, "tokens": 172, "ppl_base": 1.82,
         "set": {"kl_per_token": 0.0440, "ppl": 1.86}, "control_mean": {"kl_per_token": 0.0100, "ppl": 1.83}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "validation.json").write_text(json.dumps({
        "config": {"model_id": "tiny/test-model", "set": set_name, "set_neurons": 17, "mode": mode,
                   "controls": len(controls), "seed": 0, "prompts": 6, "prompts_hash": "2464d8c0c95b5b50",
                   "set_by_layer": {"0": 5, "1": 12}},
        "rows": [row], "guard": g if guard else None, "timings": {"total": 100.4}}))
    _png(folder / "validation.png", "#DD8452")


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    r = tmp_path / "run-a"
    (r / "identify" / "plnd").mkdir(parents=True)
    (r / "identify" / "summary.json").write_text(json.dumps(
        {"model_id": "tiny/test-model", "config_hash": "abc123", "methods": ["plnd"], "rho": 0.03,
         "languages": ["en", "zh"], "high_resource": ["en"], "layers": 2,
         "groups": {f"{lang}/text/{label}": {"prompts": 12, "tokens": 601, "data_hash": f"hash-{lang}-{label}"}
                    for lang in ("en", "zh") for label in ("benign", "harmful")},
         "statistics": {"reused_groups": [], "collected_groups": ["en/text/benign"], "seconds": 180.6}}))
    for name, lang, by_layer in (("ss_zh", "zh", {"0": 1, "1": 4}), ("ms_en", "en", {"0": 5, "1": 12})):
        (r / "identify" / "plnd" / f"{name}.json").write_text(json.dumps(
            {"name": name, "language": lang, "neurons": sum(by_layer.values()), "by_kind": {"ffn": sum(by_layer.values())},
             "by_layer": by_layer, "method": "plnd", "rho": 0.03, "owned_parameters": 1536 * sum(by_layer.values()),
             "total_parameters": 1_000_000}))
    _png(r / "identify" / "overlap" / "plnd" / "ms_overlap.png")
    _png(r / "identify" / "overlap" / "plnd" / "ms_layers.png")
    (r / "validate").mkdir()
    # the pipeline's order, not the alphabetical one
    (r / "validate" / "stage.json").write_text(json.dumps(
        {"outputs": {"experiments": {"suppress-ms-en": "x", "reinforce-ss-zh": "y"}}}))
    _validation(r / "validate" / "suppress-ms-en", "ms_en", "zero", 4 / 6, 2 / 6, [4 / 6], invalid=(0.0, 1 / 6, 0.0))
    _validation(r / "validate" / "reinforce-ss-zh", "ss_zh", "scale:2", 3 / 6, 3 / 6, [3 / 6, 2 / 6, 4 / 6], guard=False)
    (r / "train" / "precise-shield").mkdir(parents=True)
    (r / "train" / "precise-shield" / "summary.json").write_text(json.dumps(
        {"recipe": "precise-shield", "neuron_set": "union(ms_en,ms_zh)-budget", "neurons": 10,
         "steps": 30, "steps_done": 30, "parameters_updated": 15360, "total_parameters": 630_167_424,
         "fraction_updated": 15360 / 630_167_424, "wall_seconds": 42.5, "peak_rss_mb": 812.0, "peak_cuda_mb": None,
         "final_loss": 0.123, "losses": [{"step": 1, "loss": 2.0}], "config": {"benign_fraction": 0.5}}))
    _png(r / "train" / "precise-shield" / "loss.png", "#55A868")
    _eval(r / "evaluate" / "base", "base", refused_en=8)
    _eval(r / "evaluate" / "precise-shield", "precise-shield", refused_en=10, patch="train/precise-shield/patch.safetensors")
    (r / "config.json").write_text(json.dumps({"name": "quick", "model": "tiny", "seed": 0,
                                               "languages": ["en", "zh", "ar", "ru", "es", "fr", "de", "ja", "bn", "hi"],
                                               "train": {"recipes": ["precise-shield"], "lr": 0.001}}))
    (r / "pipeline.json").write_text(json.dumps({"wall_seconds": 1567.0, "version": "0.1.0",
                                                 "stage_seconds": {"identify": 219.6, "evaluate": 409.3}}))
    return r


def _section(rep: dict, key: str) -> dict:
    return next(s for s in rep["sections"] if s["key"] == key)


def _table(rep: dict, key: str, title: str) -> dict:
    return next(t for t in _section(rep, key)["tables"] if t["title"] == title)


def test_full_report(run: Path) -> None:
    html_path = build_report(run)
    assert html_path == run / "report.html"
    html = html_path.read_text()
    # self-contained: images embedded, nothing fetched from elsewhere
    uris = re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', html)
    # 5 stage PNGs (2 identify, 2 validate, 1 train) + ASR + over-refusal + exaggerated refusal + capability charts
    assert len(uris) == 9
    assert not re.search(r'(href|src)="(https?:)?//', html) and "<script" not in html and "<link" not in html
    # key numbers, their judge, and the stages
    assert "20.0 %" in html and "0.0 %" in html  # en ASR before / after
    assert "60.0 %" in html and "10.0 % [" in html  # zh ASR, zh invalid
    assert "Exaggerated-safety refusal on contrast prompts" in html
    assert "refusal-phrase@h1" in html
    assert "40.0 %" in html and "60.0 %" in html  # MGSM en, XCOPA it
    assert "15,360" in html and "42.5" in html and "812" in html  # training summary
    assert "ms_en" in html and "ss_zh" in html and "plnd" in html
    assert "Δ ASR" in html and "-20.0 [" in html  # paired change, en
    assert 'class="badge not-run"' not in html and 'class="badge unreadable"' not in html
    for key in ("identify", "validate", "train", "evaluate", "provenance"):
        assert f'id="{key}"' in html
    # wide tables scroll instead of being clipped
    assert ".table-wrap { overflow-x: auto" in html and html.count("<table") == html.count('<div class="table-wrap"><table')
    # Markdown: relative links that resolve
    md = (run / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 9 and all((run / link).is_file() for link in links)
    assert "| en | 10 |" in md
    # JSON
    rep = json.loads((run / "report.json").read_text())
    status = {s["key"]: s["status"] for s in rep["sections"]}
    assert status == {"provenance": "ok", "identify": "ok", "validate": "ok", "train": "ok", "evaluate": "ok"}
    assert [e["tag"] for e in _section(rep, "evaluate")["data"]["evals"]] == ["base", "precise-shield"]
    assert (run / "report" / "asr.png").is_file() and (run / "report" / "capability.png").is_file()
    # rebuilding is idempotent (the report's own charts are not picked up as stage figures)
    build_report(run)
    assert len(re.findall(r'src="data:image/png', (run / "report.html").read_text())) == 9


def test_headline(run: Path) -> None:
    html = build_report(run).read_text()
    rep = json.loads((run / "report.json").read_text())
    head = rep["headline"]
    cards = {c["title"]: c for c in head["cards"]}
    assert list(cards) == ["base", "precise-shield", "run"]
    # base: 11 of 20 harmful prompts refused, 1 invalid, 8 answered; 1 of 5 benign ones refused
    base = cards["base"]["facts"]
    assert base["ASR"].startswith("40.0 % [") and base["ASR"].endswith("· 8/20")
    assert base["invalid, harmful"].startswith("5.0 % [") and base["invalid, harmful"].endswith("· 1/20")
    assert base["over-refusal"].startswith("20.0 % [") and "Δ ASR vs base" not in base
    assert base["invalid, benign"].startswith("0.0 % [")
    assert base["exaggerated-safety refusal"].startswith("25.0 % [") and base["invalid, contrast"].endswith("· 1/4")
    after = cards["precise-shield"]["facts"]
    assert after["ASR"].startswith("30.0 % [") and after["Δ ASR vs base"].startswith("-10.0 [")
    assert after["neurons trained"] == "10" and after["parameters updated"] == "15,360 of 630,167,424 (0.00244 %)"
    assert "paired 95 % interval" in cards["precise-shield"]["note"]
    assert cards["run"]["facts"] == {"wall time": "1,567.0 s (26.1 min)", "identify": "219.6 s (3.7 min)",
                                     "evaluate": "409.3 s (6.8 min)"}
    models = {m["model"]: m for m in head["models"]}
    assert models["precise-shield"]["asr"]["value"] == pytest.approx(0.30)
    assert models["precise-shield"]["invalid_harmful"]["value"] == pytest.approx(0.05)
    assert models["precise-shield"]["delta_asr"]["value"] == pytest.approx(-0.10)
    assert models["precise-shield"]["parameters_updated"] == 15360 and head["wall_seconds"] == 1567.0
    # ASR per language: one column per model, with intervals, above the first section
    t = head["asr_per_language"]
    assert t["columns"] == ["language", "n", "ASR · base", "invalid · base", "ASR · precise-shield",
                            "invalid · precise-shield"]
    assert [r[0] for r in t["rows"]] == ["en", "zh", "all"] and t["rows"][0][2].startswith("20.0 % [")
    assert html.index("ASR per language") < html.index('id="provenance"')
    assert html.index('class="card"') < html.index("ASR per language")
    # the same strings in the Markdown
    md = (run / "report.md").read_text()
    assert f"| precise-shield (after: patched by recipe precise-shield) | {after['ASR']} |" in md
    assert "| all | 20 | " + t["rows"][-1][2] in md and "wall time 1,567.0 s" in md


def test_provenance_and_identify_fold_the_details(run: Path) -> None:
    html = build_report(run).read_text()
    rep = json.loads((run / "report.json").read_text())
    prov = _section(rep, "provenance")
    assert prov["facts"]["model"] == "tiny/test-model" and prov["facts"]["config hash"] == "abc123"
    assert prov["facts"]["stage times"] == "identify 219.6 s · evaluate 409.3 s"
    assert not any(k.startswith(("config.json", "train")) for k in prov["facts"])  # the config is folded
    assert "<details><summary>Run configuration</summary>" in html
    config = _table(rep, "provenance", "config.json")
    assert ["languages", "en, zh, ar, ru, es, fr, de, ja, bn, hi"] in config["rows"] and ["train.lr", "0.001"] in config["rows"]
    # one row per prompt set, listing the evaluations that used it
    prompts = _table(rep, "provenance", "Prompts")["rows"]
    assert prompts[0][-1] == "base, precise-shield"
    # one row per prompt set the evaluations used, the contrast set's included
    assert [r[:3] for r in prompts] == [["harmful", "xsafety", "20"], ["contrast", "neuroshield-contrast", "4"]]
    ident = _section(rep, "identify")
    assert ident["facts"]["methods"] == "plnd" and not any(k.startswith("groups") for k in ident["facts"])
    assert ident["facts"]["activation statistics"] == "prompt groups collected: 1, reused from an earlier run: 0; 180.6 s"
    groups = _table(rep, "identify", "Prompt groups")
    assert groups["columns"] == ["group", "prompts", "tokens", "data hash (sha256)"] and len(groups["rows"]) == 4
    assert "<details><summary>Prompt groups (4)" in html
    sets = _table(rep, "identify", "Neuron sets")
    assert sets["columns"] == ["set", "plnd: neurons", "plnd: owned parameters"]
    assert sets["rows"] == [["ms_en", "17", "26,112 (2.61 %)"], ["ss_zh", "5", "7,680 (0.768 %)"]]
    # real captions; the per-language layer heatmap replaces the report's line chart
    captions = {f["path"]: (f["title"], f["caption"]) for f in ident["figures"]}
    assert list(captions) == ["identify/overlap/plnd/ms_overlap.png", "identify/overlap/plnd/ms_layers.png"]
    title, caption = captions["identify/overlap/plnd/ms_overlap.png"]
    assert title.startswith("plnd: overlap") and "Jaccard" in caption and "expected by chance" in caption
    assert "where each language's monolingual safety neurons" in captions["identify/overlap/plnd/ms_layers.png"][1].lower()
    assert not (run / "report" / "neurons_by_layer.png").exists() and "written by the" not in html
    # without the heatmap the line chart is drawn; image-prompt variants say so
    (run / "identify" / "overlap" / "plnd" / "ms_layers.png").unlink()
    _png(run / "identify" / "overlap" / "plnd" / "ss_image_overlap.png")
    build_report(run)
    ident = _section(json.loads((run / "report.json").read_text()), "identify")
    titles = [f["title"] for f in ident["figures"]]
    assert "Layer distribution of the neuron sets" in titles
    assert "plnd: overlap of the SS neurons between languages for image prompts" in titles


def test_validation_summary(run: Path) -> None:
    html = build_report(run).read_text()
    rep = json.loads((run / "report.json").read_text())
    t = _table(rep, "validate", "Summary of the experiments")
    assert t["columns"][:6] == ["experiment", "set", "neurons", "mode", "language", "n"]
    assert t["rows"] == [
        ["suppress-ms-en", "ms_en", "17", "zero", "en", "6", "66.7 %", "33.3 %", "66.7 %", "-33.3",
         "0.0 % / 16.7 % / 0.0 %", "0.044 vs 0.010"],
        ["reinforce-ss-zh", "ss_zh", "17", "scale:2", "en", "6", "50.0 %", "50.0 %", "50.0 % ± 16.7", "+0.0",
         "— / — / —", "—"]]
    reading = _table(rep, "validate", "Reading")["rows"]
    assert reading[0] == ["suppress-ms-en", "en", "suppression lowered refusal more than the random control "
                                                  "(-33.3 points vs control; 2 of 6 prompts)"]
    assert reading[1][2] == ("reinforcement: no difference from the random control (50.0 % refusal with either); "
                             "within the range of the controls")
    # settings folded per experiment; figures in the pipeline's order with real captions
    assert "<details><summary>suppress-ms-en: settings and all columns</summary>" in html
    assert html.index("Summary of the experiments") < html.index("suppress-ms-en: refusal per condition")
    figs = _section(rep, "validate")["figures"]
    assert [f["path"] for f in figs] == ["validate/suppress-ms-en/validation.png", "validate/reinforce-ss-zh/validation.png"]
    assert "random sets of the same size" in figs[0]["caption"]
    md = (run / "report.md").read_text()
    assert ("| suppress-ms-en | ms_en | 17 | zero | en | 6 | 66.7 % | 33.3 % | 66.7 % | -33.3 | 0.0 % / 16.7 % / 0.0 % "
            "| 0.044 vs 0.010 |") in md
    assert "<details>\n<summary>suppress-ms-en: settings and all columns</summary>" in md


@pytest.mark.parametrize(("mode", "none", "st", "ctrl", "controls", "expected"), [
    ("zero", 0.0, 0.0, 0.0, 1, "suppression: no difference from the random control (0.0 % refusal with either); "
                               "refusal was already 0 % without intervention, so it cannot drop"),
    ("scale:2", 0.5, 2 / 3, 0.5, 1, "reinforcement raised refusal more than the random control "
                                    "(+16.7 points vs control; 1 of 6 prompts)"),
    ("zero", 0.5, 0.5, 2 / 3, 1, "refusal with the set is 16.7 points below the random control; 1 of 6 prompts, "
                                 "but unchanged against no intervention"),
    ("scale:0.5", 0.5, 1 / 6, 0.5, 3, "suppression lowered refusal more than the random control "
                                      "(-33.3 points vs control); outside the range of the controls"),
])
def test_validation_reading(mode: str, none: float, st: float, ctrl: float, controls: int, expected: str) -> None:
    from neuroshield.report.stages import reading

    row = {"n": 6, "refusal_none": none, "refusal_set": st, "refusal_control_mean": ctrl,
           "set_outside_controls": controls > 1}
    assert reading(mode, row, controls) == expected


def test_training_table_reads_the_summary_keys(run: Path) -> None:
    build_report(run)
    rep = json.loads((run / "report.json").read_text())
    t = _table(rep, "train", "Recipes")
    assert t["columns"] == ["recipe", "neurons", "parameters updated", "share of all parameters", "steps",
                            "wall time (s)", "peak memory (MB)", "final loss"]
    # config.benign_fraction (0.5) is not the share of parameters updated
    assert t["rows"] == [["precise-shield", "10", "15,360", "0.00244 %", "30 of 30", "42.5", "812 (RSS)", "0.123"]]
    assert "union(ms_en,ms_zh)-budget" in t["caption"]
    assert _section(rep, "train")["figures"][0]["title"] == "precise-shield: training loss"


def test_missing_stages(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    html = build_report(empty).read_text()
    assert html.count("not run") >= 5 and "data:image" not in html
    rep = json.loads((empty / "report.json").read_text())
    assert {s["status"] for s in rep["sections"]} == {"not run"}
    # only an evaluation
    only = tmp_path / "only-eval"
    _eval(only / "evaluate" / "base", "base", refused_en=5)
    build_report(only)
    rep = json.loads((only / "report.json").read_text())
    status = {s["key"]: s["status"] for s in rep["sections"]}
    assert status["evaluate"] == "ok" and status["identify"] == "not run" and status["train"] == "not run"
    assert "50.0 %" in (only / "report.html").read_text()


def test_damaged_artifacts_do_not_break_the_report(run: Path) -> None:
    for experiment in ("suppress-ms-en", "reinforce-ss-zh"):
        (run / "validate" / experiment / "validation.json").write_text("{not json")
    (run / "train" / "broken").mkdir()
    (run / "train" / "broken" / "summary.json").write_text("[1, 2")
    (run / "evaluate" / "bad").mkdir()
    (run / "evaluate" / "bad" / "eval.json").write_text("{}")  # readable but empty: no crash
    build_report(run)
    rep = json.loads((run / "report.json").read_text())
    status = {s["key"]: s["status"] for s in rep["sections"]}
    assert status["validate"] == "unreadable" and status["evaluate"] == "ok"
    ev = next(s for s in rep["sections"] if s["key"] == "evaluate")
    assert "evaluate/bad/eval.json" in ev["note"] and len(ev["data"]["evals"]) == 2
    assert "unreadable" in (run / "report.html").read_text()
    assert "validate/suppress-ms-en/validation.json" in _section(rep, "validate")["note"]
    assert [c["title"] for c in rep["headline"]["cards"]] == ["base", "precise-shield", "run"]


def test_missing_run_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run folder"):
        build_report(tmp_path / "nope")


def test_cli_report(run: Path) -> None:
    from typer.testing import CliRunner

    from neuroshield.cli import app

    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output and (run / "report.html").is_file()
    res = CliRunner().invoke(app, ["report", str(run / "missing")])
    assert res.exit_code == 2 and "run folder" in res.output
