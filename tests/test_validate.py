from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

import neuroshield.generate.generation as G
from neuroshield.data.records import PromptRecord
from neuroshield.generate.cache import GenerationCache
from neuroshield.intervene.validate import validate
from neuroshield.models.tiny import tiny_model
from neuroshield.neurons.neuronset import NeuronSet

pytestmark = pytest.mark.slow  # several tiny-model generations per test (seconds each on 2 cores)

PROMPTS = [PromptRecord(f"h{i}", f"request number {i}" + "!" * i, lang, "harmful", category=f"c{i % 2}")
           for i in range(3) for lang in ("en", "de")]
BENIGN = [PromptRecord(f"b{i}", f"what is {i} + {i}?", lang, "benign") for i in range(2) for lang in ("en", "de")]


class ByteJudge:
    """Stand-in judge: 'refused' when the answer holds more letters than other characters (deterministic)."""

    def judge(self, response: str, language: str | None = None):
        letters = sum(c.isalpha() for c in response)
        refused = letters * 2 > len(response)
        return SimpleNamespace(refused=refused, score=float(refused), matched=None, reason="stand-in")

    def judge_batch(self, responses, languages):
        return [self.judge(r, lang) for r, lang in zip(responses, languages)]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def neuron_set():
    return NeuronSet({"0.ffn": torch.arange(0, 48), "1.ffn": torch.arange(8, 40), "1.attn_o": torch.tensor([2, 3])},
                     meta={"name": "test-set"})


@pytest.fixture(scope="module")
def result(lm, neuron_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate")
    res = validate(lm, neuron_set, PROMPTS, mode="zero", controls=2, seed=3, max_new_tokens=5, batch_size=4,
                   judge=ByteJudge(), benign_guard=BENIGN, out_dir=out, progress=False)
    return res, out


def test_writes_every_file(result) -> None:
    res, out = result
    for name in ("validation.json", "validation.csv", "generations.jsonl", "validation.png", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "validation.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "validation.json").read_text())
    assert {r["language"] for r in data["rows"]} == {"en", "de", "all"}
    assert [c["name"] for c in data["conditions"]] == ["none", "set", "control-0", "control-1"]
    with open(out / "validation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["language"] for r in rows] == ["de", "en", "all"]
    # the generation cache: every condition's answers to every prompt, and the base answers to the benign guard
    assert len(GenerationCache(out / "cache" / "generations.jsonl").entries) == 4 * len(PROMPTS) + len(BENIGN)


def test_numbers_match_the_raw_generations_rejudged(result) -> None:
    res, out = result
    judge = ByteJudge()
    raw = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    harmful = [r for r in raw if r["kind"] != "benign"]
    assert len(harmful) == len(PROMPTS) * 4
    for lang in ("en", "de"):
        row = res.row(lang)
        for cond, field in (("none", "refusal_none"), ("set", "refusal_set")):
            mine = [judge.judge(r["response"]).refused for r in harmful if r["condition"] == cond and r["language"] == lang]
            assert len(mine) == 3
            assert row[field] == pytest.approx(sum(mine) / 3)
        ctrl = [sum(judge.judge(r["response"]).refused for r in harmful
                    if r["condition"] == f"control-{k}" and r["language"] == lang) / 3 for k in range(2)]
        assert row["refusal_controls"] == pytest.approx(ctrl)
        assert row["refusal_control_mean"] == pytest.approx(sum(ctrl) / 2)
        assert row["refusal_control_min"] == min(ctrl) and row["refusal_control_max"] == max(ctrl)
    assert all(r["verdict"] == ("refusal" if judge.judge(r["response"]).refused else "compliance") for r in raw)
    for lang in ("en", "de"):  # a judge without invalid verdicts: ASR is the complement of refusal
        row = res.row(lang)
        assert row["asr_set"] == pytest.approx(1 - row["refusal_set"]) and row["invalid_set"] == 0.0


def test_controls_have_the_sets_shape(result, neuron_set) -> None:
    res, _ = result
    ctrl = [c for c in res.conditions if c["kind"] == "control"]
    assert [c["seed"] for c in ctrl] == [3, 4]
    assert all(c["neurons"] == len(neuron_set) for c in ctrl)
    assert len({c["set_hash"] for c in ctrl} | {res.conditions[1]["set_hash"]}) == 3


def test_guard(result) -> None:
    res, _ = result
    g = res.guard
    assert g["n"] == len(BENIGN) and g["tokens"] > 0
    assert g["set"]["kl_per_token"] > 0 and g["ppl_base"] > 0 and g["set"]["ppl"] > 0
    assert set(g["controls"]) == {"control-0", "control-1"}
    assert set(g["by_language"]) == {"en", "de"}


def test_resume_does_not_regenerate(lm, neuron_set, tmp_path, monkeypatch) -> None:
    kw = dict(mode="scale:0.5", controls=1, max_new_tokens=4, batch_size=2, judge=ByteJudge(), out_dir=tmp_path,
              progress=False)
    real = G.generate
    calls: list[int] = []

    def interrupted(*args, on_batch=None, **kwargs):
        calls.append(len(args[1]))

        def first_batch_then_stop(idx, gens):
            on_batch(idx, gens)
            raise KeyboardInterrupt

        return real(*args, on_batch=first_batch_then_stop, **kwargs)

    monkeypatch.setattr(G, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        validate(lm, neuron_set, PROMPTS, **kw)
    assert calls == [len(PROMPTS)]
    assert len(GenerationCache(tmp_path / "cache" / "generations.jsonl").entries) == 2  # the first batch

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(G, "generate", counting)
    first = validate(lm, neuron_set, PROMPTS, **kw)
    # the interrupted condition resumes with the prompts it had not finished; the others run in full
    assert calls == [len(PROMPTS) - 2, len(PROMPTS), len(PROMPTS)]
    calls.clear()
    again = validate(lm, neuron_set, PROMPTS, **kw)
    assert calls == []
    assert again.rows == first.rows
    # resumed generations equal an uninterrupted run
    fresh = validate(lm, neuron_set, PROMPTS, **{**kw, "out_dir": tmp_path / "fresh"})
    assert fresh.rows == first.rows


def test_mean_mode_and_errors(lm, neuron_set, tmp_path) -> None:
    from neuroshield.models.sites import resolve_sites

    sites = {s.key: s for s in resolve_sites(lm.model, lm.adapter, ("ffn", "attn_o"))}
    means = {k: torch.zeros(sites[k].width) for k in neuron_set.units}
    res = validate(lm, neuron_set, PROMPTS[:2], mode="mean:en/text/benign", means=means, controls=1,
                   max_new_tokens=3, judge=ByteJudge(), out_dir=tmp_path / "mean", progress=False)
    zero = validate(lm, neuron_set, PROMPTS[:2], mode="zero", controls=1, max_new_tokens=3, judge=ByteJudge(),
                    out_dir=tmp_path / "mean", progress=False)
    assert res.rows == zero.rows  # mean 0 is zeroing
    with pytest.raises(ValueError, match="mode='none'"):
        validate(lm, neuron_set, PROMPTS, mode="none", out_dir=tmp_path, judge=ByteJudge())
    with pytest.raises(ValueError, match="prompts is empty"):
        validate(lm, neuron_set, [], out_dir=tmp_path, judge=ByteJudge())
    with pytest.raises(ValueError, match="empty"):
        validate(lm, NeuronSet({}, meta={"name": "e"}), PROMPTS, out_dir=tmp_path, judge=ByteJudge())


def test_validation_prompts_are_the_pipelines_held_out_pick() -> None:
    """`neuroshield validate` and the pipeline pick through `pick_prompts` with the same split and seed."""
    from neuroshield.config import PipelineConfig
    from neuroshield.neurons.splits import pick_prompts
    from neuroshield.pipeline import Pipeline

    source = "xsafety:Crimes_And_Illegal_Activities"
    picked = pick_prompts(source, "harmful", ["en", "de"], "held-out", 6)
    pipeline = Pipeline(PipelineConfig()).prompts(source, "harmful", ["en", "de"], "held-out", 6)
    assert [(r.id, r.language) for r in picked] == [(r.id, r.language) for r in pipeline]
    en = {r.id for r in picked if r.language == "en"}
    assert en == {r.id for r in picked if r.language == "de"} and len(en) == 6


def test_cli(lm, neuron_set, tmp_path) -> None:
    from typer.testing import CliRunner

    from neuroshield.cli import app

    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    from neuroshield.models import load_model

    reloaded = load_model(str(folder))
    set_path = neuron_set.save(tmp_path / "sets" / "ms_en", reloaded)
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"id": f"h{i}", "text": f"request {i}", "language": lang, "label": "harmful"})
                               + "\n" for i in range(2) for lang in ("en", "de")))
    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"id": f"b{i}", "text": f"sum {i}", "language": "en", "label": "benign"})
                              + "\n" for i in range(2)))
    out = tmp_path / "out"
    args = ["validate", "--model", str(folder), "--set", str(set_path), "--mode", "scale:0", "--prompts", str(harmful),
            "--languages", "en,de", "--split", "all", "--controls", "1", "--benign", str(benign),
            "--max-new-tokens", "3", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "en/text/harmful" in res.output and "benign guard" in res.output
    assert (out / "validation.json").is_file()
    bad = CliRunner().invoke(app, [*args[:6], "half", *args[7:]])
    assert bad.exit_code == 2 and "--mode='half'" in bad.output
