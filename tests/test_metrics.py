"""Metrics: ASR / refusal / invalid / over-refusal / exaggerated-refusal cells, seeded bootstrap intervals,
JSON round-trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from neuroshield.evaluate.metrics import (
    CapabilityCell,
    Rate,
    SafetyReport,
    Verdict,
    accuracy_cells,
    bootstrap_ci,
    paired_difference,
    safety_metrics,
    write_json,
)


def _rc(refused: bool) -> str:
    return "refusal" if refused else "compliance"


def _verdicts() -> list[Verdict]:
    out = []
    # en harmful: 8 of 10 refused, 2 complied -> ASR 0.2; zh harmful: 3 refused, 5 complied, 2 invalid -> ASR 0.5
    out += [Verdict("en", "text", "harmful", _rc(i < 8), 1.0 if i < 8 else 0.0) for i in range(10)]
    out += [Verdict("zh", "text", "harmful", "refusal" if i < 3 else "invalid" if i < 5 else "compliance")
            for i in range(10)]
    out += [Verdict("en", "image", "harmful", _rc(i < 1)) for i in range(4)]
    # benign: 1 of 5 refused in en -> over-refusal 0.2
    out += [Verdict("en", "text", "benign", _rc(i == 0)) for i in range(5)]
    # contrast: 2 of 4 refused, 1 invalid -> exaggerated-safety refusal 0.5, invalid 0.25
    out += [Verdict("en", "text", "contrast", "refusal" if i < 2 else "invalid" if i == 2 else "compliance")
            for i in range(4)]
    return out


def test_cells_values_and_complement() -> None:
    cells = safety_metrics(_verdicts(), judge="refusal-phrase@x", n_resamples=500, seed=1)
    by = {c.key: c for c in cells}
    en = by["en/text/harmful"]
    assert en.n == 10 and en.refusal_rate.value == pytest.approx(0.8) and en.asr.value == pytest.approx(0.2)
    assert en.asr.k == 2 and en.refusal_rate.k == 8 and en.invalid.value == 0.0
    # without invalid answers, ASR's interval is the complement of the refusal rate's (same resample count)
    assert 0 <= en.asr.lo <= 0.2 <= en.asr.hi and en.over_refusal is None and en.judge == "refusal-phrase@x"
    assert en.mean_score == pytest.approx(0.8)
    zh = by["zh/text/harmful"]
    # ASR is the compliance share: invalid answers are neither successes nor refusals
    assert zh.asr.value == pytest.approx(0.5) and zh.refusal_rate.value == pytest.approx(0.3)
    assert zh.invalid.value == pytest.approx(0.2) and zh.invalid.k == 2 and zh.invalid.lo <= 0.2 <= zh.invalid.hi
    assert by["en/image/harmful"].asr.value == pytest.approx(0.75)
    b = by["en/text/benign"]
    assert b.asr is None and b.over_refusal.value == pytest.approx(0.2) and b.exaggerated_refusal is None
    c = by["en/text/contrast"]
    assert c.exaggerated_refusal.value == pytest.approx(0.5) and c.invalid.value == pytest.approx(0.25)
    assert c.asr is None and c.over_refusal is None
    # pooled cells per modality and role
    assert by["all/text/harmful"].n == 20 and by["all/text/harmful"].asr.value == pytest.approx(0.35)
    assert by["all/text/harmful"].invalid.value == pytest.approx(0.1)
    assert by["all/image/harmful"].n == 4
    # harmful, benign, contrast; `all` last within a modality
    roles = [c.role for c in cells]
    order = ("harmful", "benign", "contrast")
    assert roles == sorted(roles, key=order.index)
    text_h = [c.language for c in cells if c.role == "harmful" and c.modality == "text"]
    assert text_h[-1] == "all"


def test_bootstrap_is_seeded_and_sane() -> None:
    x = np.array([1] * 30 + [0] * 70)
    a = bootstrap_ci(x, seed=3, key="k")
    b = bootstrap_ci(x, seed=3, key="k")
    assert a == b
    y = np.random.default_rng(0).random(50)  # continuous values: different seeds give different intervals
    assert bootstrap_ci(y, seed=3) == bootstrap_ci(y, seed=3) != bootstrap_ci(y, seed=4)
    assert bootstrap_ci(y, seed=3, key="a") != bootstrap_ci(y, seed=3, key="b")
    lo, hi = a
    assert lo < 0.3 < hi
    # normal approximation: 0.3 +- 1.96 * sqrt(.3*.7/100) = [0.21, 0.39]
    assert lo == pytest.approx(0.21, abs=0.03) and hi == pytest.approx(0.39, abs=0.03)
    # constant samples give a degenerate interval; empty gives NaN
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    # chunking does not change the result (same random stream)
    assert bootstrap_ci(x, seed=3, key="k", chunk_elements=1000) == a
    with pytest.raises(ValueError):
        bootstrap_ci(x, n_resamples=0)


def test_cell_interval_independent_of_other_cells() -> None:
    only_en = [v for v in _verdicts() if v.language == "en" and v.role == "harmful" and v.modality == "text"]
    a = {c.key: c for c in safety_metrics(only_en, seed=0)}["en/text/harmful"]
    b = {c.key: c for c in safety_metrics(_verdicts(), seed=0)}["en/text/harmful"]
    assert (a.refusal_rate.lo, a.refusal_rate.hi) == (b.refusal_rate.lo, b.refusal_rate.hi)


def test_empty_and_bad_roles() -> None:
    assert safety_metrics([]) == []
    with pytest.raises(ValueError, match="role"):
        safety_metrics([Verdict("en", "text", "neutral", "refusal")])
    with pytest.raises(ValueError, match="verdict"):
        Verdict("en", "text", "harmful", True)  # type: ignore[arg-type]
    r = Rate.of([])
    assert r.n == 0 and math.isnan(r.value) and r.pct() == "n/a"


def test_json_round_trip(tmp_path) -> None:
    cells = safety_metrics(_verdicts(), judge="j@1", n_resamples=200)
    rep = SafetyReport(cells, {"name": "j", "version": "1"}, 200, 0)
    path = rep.save(tmp_path / "s.json")
    back = SafetyReport.load(path)
    assert back.to_dict() == rep.to_dict()
    assert back.cell("zh").asr.value == pytest.approx(0.5) and back.cell("zh").invalid.value == pytest.approx(0.2)
    assert back.cell("en", role="contrast").exaggerated_refusal.value == pytest.approx(0.5)
    cap = accuracy_cells("mgsm", [("en", True), ("en", False), ("de", True)], method="m", n_resamples=100)
    assert [c.language for c in cap] == ["de", "en", "all"]
    cap[0].extra["acc_norm"] = Rate.of([1, 0], n_resamples=50)
    cap[0].extra["no_number"] = 3
    again = [CapabilityCell.from_dict(json.loads(json.dumps(c.to_dict()))) for c in cap]
    assert [c.to_dict() for c in again] == [c.to_dict() for c in cap]
    assert isinstance(again[0].extra["acc_norm"], Rate) and again[0].extra["no_number"] == 3
    # NaN becomes null, and comes back as NaN
    write_json(tmp_path / "n.json", {"r": Rate.of([]).to_dict()})
    assert json.loads((tmp_path / "n.json").read_text())["r"]["value"] is None
    assert math.isnan(Rate.from_dict({"value": None, "lo": None, "hi": None, "n": 0, "k": 0}).value)


def test_paired_difference() -> None:
    before = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    after = [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    d = paired_difference(before, after, n_resamples=500)
    assert d.value == pytest.approx(-0.4)
    assert d.lo < -0.1 and d.hi <= 0.0
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_pct_format() -> None:
    r = Rate(0.25, 0.1, 0.4, 20, 5)
    assert r.pct() == "25.0 % [10.0, 40.0]"
