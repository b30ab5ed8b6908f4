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
    """10 en + 10 zh harmful prompts, `refused_en` of the en ones refused; 5 benign; MGSM and XCOPA."""
    verdicts, items = [], []
    for lang, k in (("en", refused_en), ("zh", 3)):
        for i in range(10):
            verdicts.append(Verdict(lang, "text", "harmful", i < k))
            items.append({"section": "safety", "role": "harmful", "id": f"h/{i}", "language": lang,
                          "modality": "text", "refused": i < k, "score": None, "matched": None})
    verdicts += [Verdict("en", "text", "benign", i == 0) for i in range(5)]
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
                          "datasets": ["xsafety"]}},
        settings={"max_new_tokens": 48, "mgsm_max_new_tokens": 256, "n_resamples": 100, "seed": 0},
        timings={"safety_s": 12.0, "total_s": 30.5}, created="2026-01-01T00:00:00+00:00",
    )
    folder.mkdir(parents=True, exist_ok=True)
    res.save(folder / "eval.json")
    (folder / "items.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return res


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    r = tmp_path / "run-a"
    (r / "identify").mkdir(parents=True)
    (r / "identify" / "summary.json").write_text(json.dumps(
        {"model_id": "tiny/test-model", "config_hash": "abc123", "method": "plnd", "rho": 0.03, "groups": 4}))
    for name, by_layer in (("ms_en", {"0": 5, "1": 12}), ("ss_zh", {"0": 1, "1": 4})):
        (r / "identify" / f"{name}.json").write_text(json.dumps(
            {"name": name, "neurons": sum(by_layer.values()), "by_kind": {"ffn": sum(by_layer.values())},
             "by_layer": by_layer, "method": "plnd", "rho": 0.03}))
    _png(r / "identify" / "overlap_heatmap.png")
    (r / "validate").mkdir()
    (r / "validate" / "validation.json").write_text(json.dumps(
        {"set": "ms_en", "rows": [{"language": "en", "condition": "zero", "refusal_rate": 0.35},
                                  {"language": "en", "condition": "random", "refusal_rate": 0.8}]}))
    _png(r / "validate" / "validation.png", "#DD8452")
    (r / "train" / "precise-shield").mkdir(parents=True)
    (r / "train" / "precise-shield" / "summary.json").write_text(json.dumps(
        {"recipe": "precise-shield", "params_updated": 15360, "wall_time_s": 42.5, "peak_memory_mb": 812.0,
         "final_loss": 0.123}))
    _png(r / "train" / "precise-shield" / "loss.png", "#55A868")
    _eval(r / "evaluate" / "base", "base", refused_en=8)
    _eval(r / "evaluate" / "precise-shield", "precise-shield", refused_en=10, patch="train/precise-shield/patch.safetensors")
    return r


def test_full_report(run: Path) -> None:
    html_path = build_report(run)
    assert html_path == run / "report.html"
    html = html_path.read_text()
    # self-contained: images embedded, nothing fetched from elsewhere
    uris = re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', html)
    # 3 stage PNGs + layer chart + ASR + over-refusal + capability charts
    assert len(uris) == 7
    assert not re.search(r'(href|src)="(https?:)?//', html) and "<script" not in html and "<link" not in html
    # key numbers, their judge, and the stages
    assert "20.0 %" in html and "0.0 %" in html  # en ASR before / after
    assert "70.0 %" in html  # zh ASR
    assert "refusal-phrase@h1" in html
    assert "40.0 %" in html and "60.0 %" in html  # MGSM en, XCOPA it
    assert "15,360" in html and "42.5" in html and "812" in html  # training summary
    assert "ms_en" in html and "ss_zh" in html and "plnd" in html
    assert "Δ ASR" in html and "-20.0 [" in html  # paired change, en
    assert 'class="badge not-run"' not in html and 'class="badge unreadable"' not in html
    for key in ("identify", "validate", "train", "evaluate", "provenance"):
        assert f'id="{key}"' in html
    # Markdown: relative links that resolve
    md = (run / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 7 and all((run / link).is_file() for link in links)
    assert "| en | text | 10 |" in md
    # JSON
    rep = json.loads((run / "report.json").read_text())
    status = {s["key"]: s["status"] for s in rep["sections"]}
    assert status == {"provenance": "ok", "identify": "ok", "validate": "ok", "train": "ok", "evaluate": "ok"}
    ev = next(s for s in rep["sections"] if s["key"] == "evaluate")
    assert [e["tag"] for e in ev["data"]["evals"]] == ["base", "precise-shield"]
    assert (run / "report" / "asr.png").is_file() and (run / "report" / "capability.png").is_file()
    # rebuilding is idempotent (the report's own charts are not picked up as stage figures)
    build_report(run)
    assert len(re.findall(r'src="data:image/png', (run / "report.html").read_text())) == 7


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
    (run / "validate" / "validation.json").write_text("{not json")
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
