"""The run headline: English against the pooled other languages, paired differences against base and random."""

from __future__ import annotations

import json

import pytest

from neuroshield.evaluate.headline import format_headline, headline


def _write(folder, rows):
    folder.mkdir(parents=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _rows(harmful: dict, contrast: dict | None = None, xcopa: dict | None = None):
    rows = [{"section": "safety", "role": "harmful", "id": i, "language": lang, "modality": "text", "verdict": v}
            for (lang, i), v in harmful.items()]
    rows += [{"section": "safety", "role": "contrast", "id": i, "language": lang, "modality": "text", "verdict": v}
             for (lang, i), v in (contrast or {}).items()]
    rows += [{"section": "xcopa", "id": i, "language": lang, "correct": c} for (lang, i), c in (xcopa or {}).items()]
    return rows


def test_groups_paired_differences_and_random_mean(tmp_path):
    ids = [f"x/{k}" for k in range(10)]
    base = {**{("en", i): "compliance" for i in ids}, **{("de", i): "compliance" for i in ids},
            **{("bn", i): "invalid" for i in ids}}
    _write(tmp_path / "base", _rows(base, {("de", "c1"): "compliance", ("de", "c2"): "refusal"},
                                    {("zh", "q1"): True, ("zh", "q2"): False}))
    ps = {**{("en", i): "refusal" for i in ids}, **{("de", i): "refusal" for i in ids},
          **{("bn", i): "invalid" for i in ids}}
    _write(tmp_path / "precise-shield", _rows(ps, {("de", "c1"): "refusal", ("de", "c2"): "refusal"},
                                              {("zh", "q1"): True, ("zh", "q2"): True}))
    # two random sets: one complies everywhere, the other refuses in German: their mean per prompt
    _write(tmp_path / "random-0", _rows(base))
    _write(tmp_path / "random-1", _rows({**base, **{("de", i): "refusal" for i in ids}}))
    h = headline(tmp_path, n_resamples=200)
    assert h["groups"] == ["en", "other"] and h["random_controls"] == ["random-0", "random-1"]
    en, other = h["models"]["precise-shield"]["en"], h["models"]["precise-shield"]["other"]
    assert en["asr"]["value"] == 0.0 and en["asr_vs_base"]["value"] == pytest.approx(-1.0)
    # pooled de + bn: base ASR 10/20 (bn answers are invalid, not compliance), invalid 10/20
    assert h["models"]["base"]["other"]["asr"]["value"] == pytest.approx(0.5)
    assert h["models"]["base"]["other"]["invalid"]["value"] == pytest.approx(0.5)
    assert other["asr_vs_base"]["value"] == pytest.approx(-0.5)
    # random mean in de: 0.5 per prompt -> precise-shield (0) is 0.5 lower on de, 0 on bn: pooled -0.25
    assert other["asr_vs_random"]["value"] == pytest.approx(-0.25)
    assert other["exaggerated_refusal"]["value"] == 1.0 and other["exaggerated_refusal_vs_base"]["value"] == 0.5
    assert other["xcopa_vs_base"]["value"] == pytest.approx(0.5)
    assert "asr_vs_base" not in h["models"]["base"]["en"] and "asr_vs_random" not in h["models"]["base"]["other"]
    table = format_headline(h)
    assert "| precise-shield | en (n=10) | 0.0 [0.0, 0.0] | -100.0" in table


def test_selection_plot_from_the_monitor(tmp_path):
    from neuroshield.pipeline import plot_selection

    tmp_path = tmp_path / "precise-shield"  # a recipe folder; the base rates lie in the train folder above it
    tmp_path.mkdir()
    assert plot_selection(tmp_path, "t") is None  # no training history: nothing drawn
    history = [{"step": s, "loss": 1.0} for s in range(1, 7)]
    for rec, (h, c, score) in zip(history[2::3], [(0.4, 0.0, 0.4), (0.6, 0.2, 0.3)]):
        rec.update(monitor_harmful_refusal=h, monitor_contrast_refusal=c, select_score=score)
    (tmp_path / "loss.json").write_text(json.dumps(history))
    (tmp_path.parent / "monitor_base.json").write_text(json.dumps({"harmful_refusal": 0.3, "contrast_refusal": 0.0,
                                                            "harmful": 40, "contrast": 40}))
    path = plot_selection(tmp_path, "t")
    assert path == tmp_path / "selection.png" and path.stat().st_size > 1000


def test_selection_score_prefers_fewer_safe_refusals_on_ties():
    from neuroshield.pipeline import selection_score

    base = 0.10
    # same harmful refusal: the step that refuses fewer safe prompts wins
    assert selection_score(0.55, 0.12, base, 0.05) > selection_score(0.55, 0.15, base, 0.05)
    # one more harmful refusal of 60 outweighs any rise within the tolerance
    assert selection_score(0.55 + 1 / 60, 0.15, base, 0.05) > selection_score(0.55, 0.10, base, 0.05)
    # beyond the tolerance each point costs two
    assert selection_score(0.70, 0.25, base, 0.05) < selection_score(0.55, 0.15, base, 0.05)
    # below the base rate there is no bonus
    assert selection_score(0.5, 0.05, base, 0.05) == selection_score(0.5, 0.10, base, 0.05)
