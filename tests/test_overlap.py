"""Overlap numbers on hand-made sets, chance levels, layer histograms, plots, SS-vs-ASR correlation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from neuroshield.neurons.neuronset import NeuronSet
from neuroshield.neurons.overlap import overlap_matrices, plot_layers, plot_overlap, ss_asr_correlation


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models are all per-op overhead: one intra-op thread is several times faster, much more so
    on a busy machine. Scoped to this module and restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ns(units: dict[str, list[int]], name: str) -> NeuronSet:
    return NeuronSet({k: torch.tensor(v) for k, v in units.items()}, {},
                     {"name": name, "site_widths": {"ffn": 10, "attn_o": 4}, "layers": 3})


@pytest.fixture
def sets():
    return {
        "a": ns({"0.ffn": [0, 1, 2, 3]}, "a"),
        "b": ns({"0.ffn": [2, 3, 4, 5, 6, 7]}, "b"),
        "c": ns({"0.ffn": [9], "2.ffn": [0, 1], "2.attn_o": [3]}, "c"),
    }


def test_overlap_and_jaccard_by_hand(sets):
    r = overlap_matrices(sets)
    assert r.names == ["a", "b", "c"] and r.sizes == [4, 6, 4]
    i, j = 0, 1
    assert r.intersection[i, j] == 2
    assert r.overlap[i, j] == pytest.approx(2 / 4)  # |A∩B| / min
    assert r.jaccard[i, j] == pytest.approx(2 / 8)  # |A∩B| / |A∪B|
    # chance: hypergeometric mean per site, |A_s||B_s| / W_s = 4 * 6 / 10
    assert r.chance_intersection[i, j] == pytest.approx(2.4)
    assert r.chance_overlap[i, j] == pytest.approx(2.4 / 4)
    assert r.chance_jaccard[i, j] == pytest.approx(2.4 / (4 + 6 - 2.4))
    assert r.enrichment[i, j] == pytest.approx(2 / 2.4)
    # a vs c: only site 0.ffn is shared, 4 * 1 / 10; the other sites of c add nothing
    assert r.intersection[0, 2] == 0 and r.chance_intersection[0, 2] == pytest.approx(0.4)
    assert r.chance_overlap[0, 2] == pytest.approx(0.4 / 4)
    # symmetric, diagonal = own size / 1.0, chance undefined on the diagonal
    assert np.allclose(r.overlap, r.overlap.T) and np.allclose(r.chance_intersection[~np.eye(3, dtype=bool)],
                                                               r.chance_intersection.T[~np.eye(3, dtype=bool)])
    assert r.overlap[1, 1] == 1.0 and r.jaccard[2, 2] == 1.0 and math.isnan(r.chance_overlap[0, 0])
    # layer histograms (3 layers from the sets' meta), and per kind
    assert r.n_layers == 3
    assert r.layer_counts == {"a": [4, 0, 0], "b": [6, 0, 0], "c": [1, 0, 3]}
    assert r.layer_counts_by_kind["c"] == {"ffn": [1, 0, 2], "attn_o": [0, 0, 1]}


def test_chance_matches_a_simulation():
    gen = torch.Generator().manual_seed(0)
    width, na, nb = 50, 12, 20
    hits = []
    for _ in range(3000):
        a = set(torch.randperm(width, generator=gen)[:na].tolist())
        b = set(torch.randperm(width, generator=gen)[:nb].tolist())
        hits.append(len(a & b))
    r = overlap_matrices({"a": NeuronSet({"0.ffn": torch.arange(na)}), "b": NeuronSet({"0.ffn": torch.arange(nb)})},
                         widths={"ffn": width})
    assert r.chance_intersection[0, 1] == pytest.approx(np.mean(hits), rel=0.03)


def test_widths_are_required():
    with pytest.raises(ValueError, match="width of site"):
        overlap_matrices({"a": NeuronSet({"0.ffn": torch.tensor([1])}), "b": NeuronSet({"0.ffn": torch.tensor([1])})})
    r = overlap_matrices({"a": NeuronSet({"0.ffn": torch.tensor([1])}), "b": NeuronSet({"0.ffn": torch.tensor([1])})},
                         widths={"0.ffn": 8})
    assert r.chance_intersection[0, 1] == pytest.approx(1 / 8)


def test_empty_sets_give_nan_not_errors():
    r = overlap_matrices({"a": NeuronSet({}), "b": NeuronSet({"0.ffn": torch.tensor([1])})}, widths={"ffn": 4})
    assert math.isnan(r.overlap[0, 1]) and r.jaccard[0, 1] == 0.0


def test_plots_and_dumps_are_written(sets, tmp_path):
    r = overlap_matrices(sets)
    for path in (plot_overlap(r, tmp_path / "o.png", title="t"), plot_layers(r, tmp_path / "l.png")):
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    r.save_json(tmp_path / "o.json")
    r.save_csv(tmp_path / "o.csv")
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["overlap"][0][1] == 0.5 and data["chance_intersection"][0][1] == 2.4
    assert data["chance_overlap"][0][0] is None
    lines = (tmp_path / "o.csv").read_text().splitlines()
    assert len(lines) == 1 + 9 and lines[0].startswith("a,b,size_a")
    assert not list(tmp_path.glob("*.tmp*"))


def test_overlap_report_of_a_run(tmp_path):
    from neuroshield.data.records import PromptRecord
    from neuroshield.models.tiny import tiny_model
    from neuroshield.neurons.identify import identify, overlap_report

    lm = tiny_model("llama")
    recs = [PromptRecord(id=f"{lab}/{i}", text=f"[{lang}] {lab} prompt number {i}", language=lang, label=lab)
            for lang in ("en", "zh", "ar") for lab in ("harmful", "benign") for i in range(3)]
    identify(lm, [r for r in recs if r.label == "harmful"], [r for r in recs if r.label == "benign"],
             languages=["en", "zh", "ar"], method="plnd", rho=0.2, out_dir=tmp_path, progress=False)
    folder = overlap_report(tmp_path)
    index = json.loads((folder / "overlap.json").read_text())
    assert set(index["methods"]) == {"plnd"}
    for m in ("plnd",):
        for f in ("ms_overlap.png", "ms_layers.png", "ss_layers.png", "ms_overlap.json", "ms_overlap.csv"):
            assert (folder / m / f).is_file(), f
        vs = index["methods"][m]["high_resource_vs"]["en"]
        assert set(vs) == {"zh", "ar"} and 0 <= vs["zh"]["chance_overlap"] <= 1
        data = json.loads((folder / m / "ms_overlap.json").read_text())
        assert data["names"] == ["en", "zh", "ar"]  # the run's language order
        ss = json.loads((folder / m / "ss_overlap.json").read_text())
        assert ss["names"] == ["zh", "ar"]
        assert ss["sizes"][0] == data["intersection"][0][1]  # |SS(zh)| = |MS(en) ∩ MS(zh)|


def test_ss_asr_correlation():
    ss = {"zh": 10, "ar": 3, "bn": 1, "de": 7, "en": 100}
    asr = {"zh": 0.05, "ar": 0.2, "bn": 0.4, "de": 0.1}
    r = ss_asr_correlation(ss, asr)
    assert r["languages"] == ["ar", "bn", "de", "zh"] and r["n"] == 4
    assert r["spearman"] == pytest.approx(-1.0)
    assert r["pairs"]["ar"] == (3.0, 0.2)
    assert math.isnan(ss_asr_correlation({"zh": 1, "ar": 2}, {"zh": 0.1, "ar": 0.2})["spearman"])
    assert math.isnan(ss_asr_correlation({"a": 1, "b": 1, "c": 1}, {"a": 0.1, "b": 0.2, "c": 0.3})["spearman"])
