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


def test_trained_against_never_trained_and_each_random_set(tmp_path):
    """With a transfer split the headline pools the trained and the never-trained languages apart, and with several
    random sets it gives their spread and the recipe against each set (paired, with the discordant prompts)."""
    from neuroshield.evaluate.headline import format_random_sets

    ids = [f"x/{k}" for k in range(8)]
    langs = ["en", "zh", "hi"]  # hi is never trained
    base = {(lang, i): "compliance" for lang in langs for i in ids}
    _write(tmp_path / "base", _rows(base))
    # the recipe refuses everything in the trained languages, half of the prompts in hi
    ps = {(lang, i): ("refusal" if lang != "hi" or k % 2 else "compliance") for lang in langs
          for k, i in enumerate(ids)}
    _write(tmp_path / "ss-expansion", _rows(ps))
    # three random sets: refuse 0, 2 and 4 of the 8 hi prompts, comply elsewhere
    for s, refused in enumerate((0, 2, 4)):
        _write(tmp_path / f"random-s{s}", _rows({**base, **{("hi", i): "refusal" for i in ids[:refused]}}))
    h = headline(tmp_path, never_trained=["hi"], n_resamples=200)
    assert h["groups"] == ["en", "other", "trained", "never-trained"]
    assert h["group_names"]["never-trained"] == "never-trained languages (hi)"
    assert h["group_names"]["trained"] == "trained languages (en, zh)"
    trained, never = h["models"]["ss-expansion"]["trained"], h["models"]["ss-expansion"]["never-trained"]
    assert trained["asr"]["n"] == 16 and trained["asr"]["value"] == 0.0
    assert trained["asr_vs_base"]["value"] == pytest.approx(-1.0)
    assert never["asr"]["n"] == 8 and never["asr"]["value"] == pytest.approx(0.5)
    # the random sets' hi ASR: 1, 0.75, 0.5 -> mean 0.75, sd 0.25; their mean per prompt is the random reference
    rs = h["random_sets"]["random"]["never-trained"]["asr"]
    assert (rs["sets"], rs["mean"], rs["sd"], rs["min"], rs["max"]) == (3, pytest.approx(0.75), pytest.approx(0.25),
                                                                        0.5, 1.0)
    assert never["asr_vs_random"]["value"] == pytest.approx(-0.25)
    each = never["asr_vs_sets"]
    assert set(each) == {"random-s0", "random-s1", "random-s2"}
    # against random-s0 (complies on all 8): 4 prompts fewer answered; against random-s2 (the first 4 refused):
    # ss-expansion answers ids 0 and 2 (which s2 refuses) and refuses 5 and 7 (which s2 answers)
    assert (each["random-s0"]["value"], each["random-s0"]["fewer"], each["random-s0"]["more"]) == (-0.5, 4, 0)
    assert (each["random-s2"]["value"], each["random-s2"]["fewer"], each["random-s2"]["more"]) == (0.0, 2, 2)
    assert "asr_vs_sets" not in h["models"]["random-s0"]["never-trained"]
    table = format_headline(h)
    assert "| ss-expansion | never-trained languages (hi) (n=8) | 50.0" in table
    sets = format_random_sets(h)
    assert ("| random (3 sets: random-s0, random-s1, random-s2) | never-trained languages (hi) | ASR 75.0 ± 25.0 "
            "(range 50.0–100.0)") in sets
    assert "| ss-expansion | never-trained languages (hi) | -50.0" in sets and "(4/0)" in sets
    # without a split or with one random set: neither
    h1 = headline(tmp_path, n_resamples=50)
    assert h1["groups"] == ["en", "other"]
    (tmp_path / "random-s1" / "items.jsonl").unlink()
    (tmp_path / "random-s2" / "items.jsonl").unlink()
    assert format_random_sets(headline(tmp_path, never_trained=["hi"], n_resamples=50)) == ""


def test_the_report_shows_the_transfer_split_and_the_random_sets(tmp_path):
    from neuroshield.report.evaluation import headline_tables

    run = tmp_path / "run"
    ids = [f"x/{k}" for k in range(4)]
    rows = {(lang, i): "compliance" for lang in ("en", "hi") for i in ids}
    for model in ("base", "precise-shield", "random-s0", "random-s1"):
        _write(run / "evaluate" / model, _rows(rows))
    h = headline(run / "evaluate", never_trained=["hi"], n_resamples=50)
    (run / "evaluate" / "headline.json").write_text(json.dumps(h))
    tables = headline_tables(run)
    assert [t.title for t in tables] == ["Headline", "Against each random set"]
    assert any(r[1].startswith("never-trained languages (hi)") for r in tables[0].rows)
    assert all(len(r) == len(tables[1].columns) for r in tables[1].rows)
    assert tables[1].rows[0][0] == "random (2 sets: random-s0, random-s1)"


def test_each_recipe_is_compared_with_its_own_random_sets(tmp_path):
    """With `controls`, precise-shield is compared with random-s<seed> and ss-expansion with
    random-ss-expansion-s<seed>; lora has no random control; each family's spread is its own."""
    from neuroshield.evaluate.headline import format_random_sets

    ids = [f"x/{k}" for k in range(8)]
    base = {("de", i): "compliance" for i in ids}
    _write(tmp_path / "base", _rows(base))
    _write(tmp_path / "precise-shield", _rows({("de", i): "refusal" for i in ids}))
    _write(tmp_path / "ss-expansion", _rows(base))
    _write(tmp_path / "lora", _rows({("de", i): "refusal" for i in ids}))
    for s in range(2):  # precise-shield's sets refuse 2 and 4 prompts; ss-expansion's all of them
        _write(tmp_path / f"random-s{s}", _rows({**base, **{("de", i): "refusal" for i in ids[:2 + 2 * s]}}))
        _write(tmp_path / f"random-ss-expansion-s{s}", _rows({("de", i): "refusal" for i in ids}))
    controls = {"precise-shield": ["random-s0", "random-s1"],
                "ss-expansion": ["random-ss-expansion-s0", "random-ss-expansion-s1"]}
    h = headline(tmp_path, controls=controls, n_resamples=100)
    ps, ss, lora = (h["models"][m]["other"] for m in ("precise-shield", "ss-expansion", "lora"))
    # precise-shield (ASR 0) against the mean of its sets (ASR 6/8 and 4/8): -0.625; ss-expansion (ASR 1) against
    # its sets (ASR 0): +1
    assert ps["asr_vs_random"]["value"] == pytest.approx(-0.625)
    assert ss["asr_vs_random"]["value"] == pytest.approx(1.0)
    assert set(ps["asr_vs_sets"]) == {"random-s0", "random-s1"}
    assert set(ss["asr_vs_sets"]) == {"random-ss-expansion-s0", "random-ss-expansion-s1"}
    assert "asr_vs_random" not in lora and "asr_vs_sets" not in lora
    assert h["random_sets"]["precise-shield"]["other"]["asr"]["mean"] == pytest.approx(0.625)
    assert h["random_sets"]["ss-expansion"]["other"]["asr"]["mean"] == 0.0
    table = format_random_sets(h)
    assert "| random sets of ss-expansion (2 sets: random-ss-expansion-s0, random-ss-expansion-s1) |" in table
    assert "| ss-expansion | languages other than en | +100.0" in table
    assert "| lora |" not in table


def test_the_trained_group_holds_the_run_s_languages_not_xcopa_s_others(tmp_path):
    """XCOPA has languages the run never names (it, sw, ...): with `languages`, they are in neither transfer group,
    so the trained group's name and its XCOPA cell hold the trained run languages only (zh here)."""
    rows = {("en", "x/1"): "compliance", ("zh", "x/1"): "refusal", ("hi", "x/1"): "compliance"}
    xcopa = {("zh", "c/1"): True, ("sw", "c/1"): False, ("it", "c/1"): False}
    _write(tmp_path / "base", _rows(rows, xcopa=xcopa))
    h = headline(tmp_path, never_trained=["hi"], languages=["en", "zh", "hi"], n_resamples=20)
    assert h["group_names"]["trained"] == "trained languages (en, zh)"
    trained = h["models"]["base"]["trained"]
    assert trained["xcopa"]["n"] == 1 and trained["xcopa"]["value"] == 1.0
    assert "xcopa" not in h["models"]["base"]["never-trained"]
    # without `languages` (older callers) every language not never-trained counts as trained
    assert headline(tmp_path, never_trained=["hi"], n_resamples=20)["models"]["base"]["trained"]["xcopa"]["n"] == 3
