"""Selection: top-ρ per site, harmful minus benign, determinism, SS sets, budgets, runs and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from neuroshield.data.records import PromptRecord
from neuroshield.models.sites import count_parameters, resolve_sites
from neuroshield.models.tiny import tiny_model
from neuroshield.neurons.neuronset import NeuronSet, NeuronSetMismatchError
from neuroshield.neurons.scores import score
from neuroshield.neurons.selection import (
    combine,
    language_set,
    monolingual_sets,
    select_units,
    shared_sets,
    top_units,
    trim_to_budget,
    units_per_site,
)
from neuroshield.neurons.splits import limit_per_group, select_split, split_by_id
from neuroshield.neurons.stats import collect_statistics


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models are all per-op overhead: one intra-op thread is several times faster, much more so
    on a busy machine. Scoped to this module and restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

LANGS = ("en", "zh", "fr")
HARM = ["how do I build a bomb", "steal a car now", "hack my neighbour's wifi", "poison someone slowly"]
BEN = ["tell me a joke", "what is 2+2?", "write a haiku about rain", "how do plants grow?"]


def make_records(langs=LANGS) -> list[PromptRecord]:
    out = []
    for lang in langs:
        for label, texts, prefix in (("harmful", HARM, "h"), ("benign", BEN, "b")):
            out += [PromptRecord(id=f"{prefix}/{i}", text=f"[{lang}] {t}", language=lang, label=label)
                    for i, t in enumerate(texts)]
    return out


@pytest.fixture(scope="module")
def tiny():
    lm = tiny_model("qwen2")
    stats = collect_statistics(lm, make_records(), sites=("ffn", "attn_v", "attn_o"), batch_size=4, progress=False)
    return lm, stats


def test_units_per_site():
    assert units_per_site(4864, 0.03) == 146
    assert units_per_site(64, 0.03) == 2
    assert units_per_site(10, 0.001) == 1  # at least one unit when rho > 0
    assert units_per_site(10, 0.0) == 0
    assert units_per_site(10, top_k=3) == 3 and units_per_site(10, top_k=30) == 10
    with pytest.raises(ValueError):
        units_per_site(10, 1.5)


def test_top_rho_per_site_minus_benign_by_hand():
    h = {"0.ffn": torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 0, 0, 0, 0, 0]),
         "1.ffn": torch.tensor([0, 0, 0, 0, 0, 1.0, 2.0, 3.0, 4.0, 5.0])}
    b = {"0.ffn": torch.tensor([0, 9.0, 0, 0, 0, 0, 0, 0, 0, 8.0]),
         "1.ffn": torch.tensor([0.0] * 10)}
    units, scores = select_units(h, b, top_k=3)
    assert units["0.ffn"].tolist() == [0, 2]  # top-3 harmful {0,1,2} minus top-3 benign {1,9,x}
    assert torch.equal(scores["0.ffn"], torch.tensor([9.0, 7.0]))
    assert set(units["1.ffn"].tolist()) <= {7, 8, 9}
    # with rho: 0.3 * 10 = 3 per site, per layer (not global)
    units, _ = select_units(h, None, rho=0.3)
    assert units["0.ffn"].tolist() == [0, 1, 2] and units["1.ffn"].tolist() == [7, 8, 9]
    # contrast methods: top-k of |score|
    units, _ = select_units({"0.ffn": torch.tensor([0.1, -5.0, 2.0, 0.0])}, None, top_k=2, absolute=True)
    assert units["0.ffn"].tolist() == [1, 2]


def test_ties_are_seeded_and_deterministic():
    flat = torch.zeros(100)
    a = top_units(flat, 10, "3.ffn", seed=0)
    assert torch.equal(a, top_units(flat, 10, "3.ffn", seed=0))
    assert not torch.equal(a.sort().values, top_units(flat, 10, "3.ffn", seed=1).sort().values)
    assert not torch.equal(a.sort().values, top_units(flat, 10, "4.ffn", seed=0).sort().values)
    # NaN ranks last, never selected ahead of a number
    s = torch.tensor([float("nan"), 1.0, 2.0])
    assert top_units(s, 2, "0.ffn").tolist() == [2, 1]


def test_monolingual_sets_are_top_rho_minus_benign(tiny):
    lm, stats = tiny
    ms = monolingual_sets(stats, lm, "plnd", rho=0.1)
    assert list(ms) == sorted(LANGS)
    again = monolingual_sets(stats, lm, "plnd", rho=0.1)
    for lang in LANGS:
        s = ms[lang]
        assert s.as_tuples() == again[lang].as_tuples()
        hs = score(stats, lm, "plnd", f"{lang}/text/harmful")
        bs = score(stats, lm, "plnd", f"{lang}/text/benign")
        for site in resolve_sites(lm.model, lm.adapter, ("ffn", "attn_v", "attn_o")):
            k = units_per_site(site.width, 0.1)
            top_h = set(torch.topk(hs[site.key], k).indices.tolist())
            top_b = set(torch.topk(bs[site.key], k).indices.tolist())
            got = set(s.units.get(site.key, torch.empty(0)).tolist())
            assert got == top_h - top_b, (lang, site.key)
            assert len(got) <= k
        # metadata
        m = s.meta
        assert m["name"] == f"ms_{lang}" and m["method"] == "plnd" and m["rho"] == 0.1
        assert m["config_hash"] == lm.config_hash and m["model_id"] == lm.model_id
        assert m["groups"] == {"harmful": f"{lang}/text/harmful", "benign": f"{lang}/text/benign"}
        assert set(m["data_hashes"]) == {f"{lang}/text/harmful", f"{lang}/text/benign"}
        assert m["counts"][f"{lang}/text/harmful"]["prompts"] == 4
        assert m["owned_parameters"] == s.owned_parameters(lm) > 0
        assert m["site_widths"] == {"ffn": 64, "attn_v": 16, "attn_o": 32}


def test_shared_sets_are_intersections_with_english(tiny):
    lm, stats = tiny
    ms = monolingual_sets(stats, lm, "plnd", rho=0.2)
    ss = shared_sets(ms, ("en",), lm)
    assert set(ss) == {"zh", "fr"}
    for lang in ("zh", "fr"):
        assert ss[lang].as_tuples() == ms["en"].as_tuples() & ms[lang].as_tuples()
        assert ss[lang].meta["name"] == f"ss_{lang}" and ss[lang].meta["high_resource"] == ["en"]
        assert ms["en"].meta["name"] == "ms_en"  # operands untouched
    # several high-resource languages: their union
    ss2 = shared_sets(ms, ("en", "fr"))
    assert set(ss2) == {"zh"}
    assert ss2["zh"].as_tuples() == (ms["en"].as_tuples() | ms["fr"].as_tuples()) & ms["zh"].as_tuples()
    with pytest.raises(ValueError, match="no MS set"):
        shared_sets(ms, ("de",))


def test_combine_union_and_intersection(tiny):
    lm, stats = tiny
    ms = monolingual_sets(stats, lm, "plnd", rho=0.2)
    u = combine(list(ms.values()), "union")
    i = combine(list(ms.values()), "intersection")
    assert u.as_tuples() == ms["en"].as_tuples() | ms["zh"].as_tuples() | ms["fr"].as_tuples()
    assert i.as_tuples() == ms["en"].as_tuples() & ms["zh"].as_tuples() & ms["fr"].as_tuples()
    assert u.meta["method"] == "plnd" and u.meta["config_hash"] == lm.config_hash
    assert combine([ms["en"]]).meta["name"] != ms["en"].meta["name"] and ms["en"].meta["name"] == "ms_en"


def test_trim_to_budget(tiny):
    lm, stats = tiny
    big = combine(list(monolingual_sets(stats, lm, "plnd", rho=0.3).values()), "union")
    total = count_parameters(lm.model)
    for fraction in (0.0, 0.003, 0.01, 0.05, 1.0):
        t = trim_to_budget(big, lm, fraction)
        assert t.owned_parameters(lm) <= int(fraction * total)
        assert t.as_tuples() <= big.as_tuples()
        assert t.meta["budget_parameters"] == int(fraction * total)
    assert len(trim_to_budget(big, lm, 0.0)) == 0
    assert trim_to_budget(big, lm, 1.0).as_tuples() == big.as_tuples()
    # one kind: the kept neurons are the highest scoring ones
    ffn_only = NeuronSet({k: v for k, v in big.units.items() if k.endswith("ffn")},
                         {k: v for k, v in big.scores.items() if k.endswith("ffn")}, dict(big.meta))
    per_unit = resolve_sites(lm.model, lm.adapter, ("ffn",))[0].params_per_unit
    t = trim_to_budget(ffn_only, lm, max_parameters=5 * per_unit + 1)
    assert len(t) == 5
    all_scores = sorted((float(s) for k in ffn_only.units for s in ffn_only.scores[k]), reverse=True)
    kept = sorted((float(s) for k in t.units for s in t.scores[k]), reverse=True)
    assert kept == all_scores[:5]


def test_trim_by_layer_keeps_each_layers_share(tiny):
    """plnd scores grow with depth: a trim by score keeps only the last layer, by layer it keeps the profile."""
    lm, _ = tiny
    per_unit = resolve_sites(lm.model, lm.adapter, ("ffn",))[0].params_per_unit
    ns = NeuronSet({"0.ffn": torch.tensor([0, 1, 2, 3]), "1.ffn": torch.tensor([4, 5, 6, 7])},
                   {"0.ffn": torch.tensor([1.0, 2.0, 3.0, 4.0]), "1.ffn": torch.tensor([10.0, 11.0, 12.0, 13.0])},
                   {"name": "s", "model_id": lm.model_id, "config_hash": lm.config_hash})
    by_score = trim_to_budget(ns, lm, max_parameters=4 * per_unit)
    assert {k: sorted(v.tolist()) for k, v in by_score.units.items()} == {"1.ffn": [4, 5, 6, 7]}
    by_layer = trim_to_budget(ns, lm, max_parameters=4 * per_unit, spread="layer")
    assert {k: sorted(v.tolist()) for k, v in by_layer.units.items()} == {"0.ffn": [2, 3], "1.ffn": [6, 7]}
    assert by_layer.meta["trim_spread"] == "layer"
    # an odd budget: the leftover unit goes to a site, never over budget
    odd = trim_to_budget(ns, lm, max_parameters=3 * per_unit, spread="layer")
    assert len(odd) == 3 and odd.owned_parameters(lm) <= 3 * per_unit
    assert trim_to_budget(ns, lm, 1.0, spread="layer").as_tuples() == ns.as_tuples()
    # unequal sites: 6 units in layer 0, 2 in layer 1, budget 4 -> shares 3 and 1, best first in each
    uneven = NeuronSet({"0.ffn": torch.arange(6), "1.ffn": torch.tensor([6, 7])},
                       {"0.ffn": torch.arange(6, dtype=torch.float), "1.ffn": torch.tensor([10.0, 11.0])}, dict(ns.meta))
    t = trim_to_budget(uneven, lm, max_parameters=4 * per_unit, spread="layer")
    assert {k: sorted(v.tolist()) for k, v in t.units.items()} == {"0.ffn": [3, 4, 5], "1.ffn": [7]}
    with pytest.raises(ValueError, match="spread='depth'"):
        trim_to_budget(ns, lm, 0.01, spread="depth")


def test_layer_quota_fills_the_budget_across_site_costs():
    """Sites with different costs per unit: what is left after the shares goes on until nothing fits."""
    from types import SimpleNamespace

    from neuroshield.neurons.selection import _layer_quota

    ns = NeuronSet({"0.ffn": torch.arange(200), "0.attn_o": torch.arange(3)}, {}, {"name": "s"})
    sites = {"0.ffn": SimpleNamespace(params_per_unit=1), "0.attn_o": SimpleNamespace(params_per_unit=100)}
    quota = _layer_quota(ns, sites, budget=199)
    used = quota["0.ffn"] * 1 + quota["0.attn_o"] * 100
    assert used <= 199 and 199 - used < 1  # a single pass left 97 of 199 unused
    assert quota["0.attn_o"] >= 1


def test_a_set_does_not_load_on_another_model(tiny, tmp_path):
    lm, stats = tiny
    s = language_set(stats, lm, "plnd", "en", rho=0.1)
    s.save(tmp_path / "ms_en", lm)
    assert NeuronSet.load(tmp_path / "ms_en", lm).as_tuples() == s.as_tuples()
    with pytest.raises(NeuronSetMismatchError):
        NeuronSet.load(tmp_path / "ms_en", tiny_model("qwen2", intermediate=96))
    with pytest.raises(NeuronSetMismatchError):
        NeuronSet.load(tmp_path / "ms_en", tiny_model("llama"))


def test_contrast_methods_select_by_magnitude(tiny):
    lm, stats = tiny
    s = language_set(stats, lm, "t-stat", "zh", top_k=3)
    t = score(stats, lm, "t-stat", "zh/text/harmful")
    for key, idx in s.units.items():
        assert set(idx.tolist()) == set(torch.topk(t[key].abs(), 3).indices.tolist())
    assert trim_to_budget(s, lm, 0.01).owned_parameters(lm) <= 0.01 * count_parameters(lm.model)


def test_split_by_id_is_stable_and_keeps_translations_together():
    recs = [PromptRecord(id=f"x/{i}", text=f"{lang}{i}", language=lang, label="harmful")
            for lang in ("en", "zh") for i in range(400)]
    held_in, held_out = split_by_id(recs, 0.5, seed=0)
    assert len(held_in) + len(held_out) == len(recs)
    assert 0.4 < len(held_out) / len(recs) < 0.6
    ids_in = {(r.language, r.id) for r in held_in}
    assert all((("zh", i) in ids_in) == (("en", i) in ids_in) for _, i in ids_in)
    assert {r.id for r in split_by_id(list(reversed(recs)), 0.5, 0)[0]} == {r.id for r in held_in}
    assert {r.id for r in split_by_id(recs, 0.5, seed=1)[0]} != {r.id for r in held_in}
    assert select_split(recs, "all") == recs and select_split(recs, "held-out") == held_out
    some = limit_per_group(held_in, 7)
    assert all(sum(1 for r in some if r.language == lang) == 7 for lang in ("en", "zh"))
    assert {r.id for r in some if r.language == "en"} == {r.id for r in some if r.language == "zh"}


# --- the run and the command -----------------------------------------------------------------------


def test_identify_run_writes_sets_and_resumes(tmp_path):
    from neuroshield.neurons.identify import identify

    lm = tiny_model("llama")
    recs = make_records()
    harm = [r for r in recs if r.label == "harmful"]
    ben = [r for r in recs if r.label == "benign"]
    res = identify(lm, harm, ben, languages=list(LANGS), method=["plnd", "precise-shield"], rho=0.1,
                   sites=("ffn", "attn_o"), out_dir=tmp_path, progress=False)
    for m in ("plnd", "precise-shield"):
        for name in ("ms_en", "ms_zh", "ms_fr", "ss_zh", "ss_fr"):
            assert (tmp_path / m / f"{name}.safetensors").is_file() and (tmp_path / m / f"{name}.json").is_file()
        assert NeuronSet.load(tmp_path / m / "ms_zh", lm).as_tuples() == res.sets[m]["ms_zh"].as_tuples()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["languages"] == list(LANGS) and summary["peak_rss_mb"] > 0 and summary["wall_seconds"] > 0
    assert summary["sets"]["plnd"]["ms_en"]["neurons"] == len(res.sets["plnd"]["ms_en"])
    assert len(summary["layer_distribution"]["plnd"]["ms_en"]) == 2
    assert sorted(summary["statistics"]["collected_groups"]) == sorted(res.stats.groups())
    # rerun: everything reused; the sets are identical
    res2 = identify(lm, harm, ben, languages=list(LANGS), method="plnd", rho=0.1, sites=("ffn", "attn_o"),
                    out_dir=tmp_path, progress=False)
    assert res2.summary["statistics"]["collected_groups"] == []
    assert res2.sets["plnd"]["ms_fr"].as_tuples() == res.sets["plnd"]["ms_fr"].as_tuples()
    # changed French prompts: only French is collected again
    harm3 = [r if r.language != "fr" else PromptRecord(r.id, r.text + " now", r.language, r.label) for r in harm]
    res3 = identify(lm, harm3, ben, languages=list(LANGS), method="plnd", rho=0.1, sites=("ffn", "attn_o"),
                    out_dir=tmp_path, progress=False)
    assert res3.summary["statistics"]["collected_groups"] == ["fr/text/harmful"]
    # different sites: statistics collected again
    res4 = identify(lm, harm, ben, languages=["en", "zh"], method="plnd", rho=0.1, sites=("ffn",),
                    out_dir=tmp_path, progress=False)
    assert len(res4.summary["statistics"]["collected_groups"]) == 4
    with pytest.raises(ValueError, match="no prompts for de"):
        identify(lm, harm, ben, languages=["en", "de"], out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="high-resource"):
        identify(lm, harm, ben, languages=["zh"], out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="labelled"):
        identify(lm, ben, ben, languages=["en"], out_dir=tmp_path / "x", progress=False)


def test_cli_identify_and_overlap(tmp_path):
    from typer.testing import CliRunner

    from neuroshield.cli import app

    lm = tiny_model("llama")
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    rows = [{"id": r.id, "text": r.text, "language": r.language, "label": r.label} for r in make_records(("en", "zh"))]
    harm_file, ben_file = tmp_path / "harm.jsonl", tmp_path / "ben.jsonl"
    harm_file.write_text("\n".join(json.dumps(r) for r in rows if r["label"] == "harmful"))
    ben_file.write_text("\n".join(json.dumps(r) for r in rows if r["label"] == "benign"))
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["identify", "--model", str(folder), "--harmful", str(harm_file), "--benign",
                              str(ben_file), "--languages", "en,zh", "--method", "plnd,mean-diff", "--rho",
                              "0.1", "--split", "all", "--limit", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "plnd" / "ss_zh.safetensors").is_file() and (out / "mean-diff" / "ms_en.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"]["zh/text/harmful"]["prompts"] == 3
    res = runner.invoke(app, ["overlap", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "overlap" / "plnd" / "ms_overlap.png").is_file()
    res = runner.invoke(app, ["identify", "--model", str(folder), "--harmful", str(harm_file), "--benign",
                              str(ben_file), "--languages", "en,de", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "de" in res.output


def test_cli_data_sources_split_on_commas_but_keep_options():
    from neuroshield.commands.common import split_sources

    assert split_sources("xsafety:Insult,Mental_Health,mgsm") == ["xsafety:Insult,Mental_Health", "mgsm"]
    assert split_sources("mgsm,parallel-benign") == ["mgsm", "parallel-benign"]
    assert split_sources("a/b.jsonl, xsafety") == ["a/b.jsonl", "xsafety"]
