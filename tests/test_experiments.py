"""The experiment scripts run end to end on a tiny model (their real results are in experiments/results)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from neuroshield.data.loaders import load_prompts
from neuroshield.data.templates import load_parallel_benign
from neuroshield.models.tiny import tiny_model
from neuroshield.neurons.identify import identify

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_validation_search_screens_sets_against_controls(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    lm = tiny_model("qwen2", layers=2, hidden=32, intermediate=64)
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    harmful = load_prompts("xsafety:Crimes_And_Illegal_Activities", languages=["en"], label="harmful")[:6]
    benign = [r for r in load_parallel_benign(["en"]) if r.label == "benign"][:6]
    identify(lm, harmful, benign, languages=["en"], method="plnd", rho=0.1, out_dir=tmp_path / "id", progress=False)
    out = tmp_path / "search.json"
    rc = _script("validation_search").main(["--model", str(folder), "--stats", str(tmp_path / "id" / "stats"),
                                            "--methods", "plnd,mean-diff", "--rhos", "0.1", "--prompts", "3",
                                            "--benign", "2", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [(r["method"], r["mode"]) for r in result["rows"]] == [
        ("plnd", "zero"), ("plnd", "mean:benign"), ("mean-diff", "zero"), ("mean-diff", "mean:benign")]
    row = result["rows"][0]
    assert 0.0 <= row["set"]["harmful"]["p_refusal"] <= 1.0 and len(row["controls"]) == 1
    assert result["harmful_prompts"] == 3
