"""The contrast set (safe requests that sound dangerous) written by the project: shape, split and loading."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from neuroshield.data.loaders import load_prompts
from neuroshield.data.templates import CONTRAST_LANGUAGES, load_contrast_set, resource_provenance
from neuroshield.neurons.splits import select_split


def _items():
    lines = (resources.files("neuroshield") / "resources" / "contrast_set.jsonl").read_text("utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:] if x.strip()]


def test_shape_and_provenance():
    header, items = _items()
    assert "written by the neuroshield authors" in resource_provenance("contrast_set.jsonl")
    assert header["items"] == len(items) >= 200
    assert len({x["id"] for x in items}) == len(items)
    assert len({x["translations"]["en"].casefold() for x in items}) == len(items)
    for x in items:
        assert set(x["translations"]) == set(CONTRAST_LANGUAGES), x["id"]
        assert all(t.strip() for t in x["translations"].values()), x["id"]
        assert x["harmful"].strip() and x["reference"].strip() and x["split"] in ("train", "eval")
    # split by topic pair, stratified: every category has both parts, neither part is small
    cats = {x["category"] for x in items}
    for cat in cats:
        assert {x["split"] for x in items if x["category"] == cat} == {"train", "eval"}
    n_eval = sum(x["split"] == "eval" for x in items)
    assert 0.4 * len(items) <= n_eval <= 0.6 * len(items)


def test_loader_keeps_the_fixed_split_whatever_the_seed():
    recs = load_prompts("contrast", languages=["en", "bn"], label="benign")
    ev = {r.id for r in load_contrast_set(["en"], "eval")}
    for seed in (0, 1, 7):
        for fraction in (0.2, 0.5, 0.8):
            held_out = {r.id for r in select_split(recs, "held-out", fraction, seed)}
            assert held_out == ev
    # translations stay with their pair; harmful pairs are English only and never share an id with a safe prompt
    harm = load_prompts("contrast:train", label="harmful")
    assert {r.language for r in harm} == {"en"} and all(r.id.endswith("-harmful") for r in harm)
    assert {r.meta["pair"] for r in harm} == {r.id for r in load_contrast_set(["en"], "train")}
    en = load_contrast_set(["en"], "eval")
    assert all(r.reference for r in en)
    assert all(r.reference is None for r in load_contrast_set(["ja"], "eval"))
    with pytest.raises(ValueError, match="train or eval"):
        load_contrast_set(["en"], "test")
