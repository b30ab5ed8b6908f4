"""`identify` on a real model (SmolLM2-135M): sets are written, non-empty and reload on the model."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.real_model


def test_identify_on_smollm2(tmp_path):
    from neuroshield.data.loaders import load_prompts
    from neuroshield.models import load_model
    from neuroshield.neurons.identify import identify
    from neuroshield.neurons.neuronset import NeuronSet
    from neuroshield.neurons.splits import limit_per_group, select_split

    try:
        loaded = load_model("smollm2")
    except Exception as err:  # noqa: BLE001  (the embedded model's package is an optional extra)
        pytest.skip(f"smollm2 not available: {err}")
    langs = ["en", "zh"]
    # 8 harmful + 8 benign prompts: 4 per language and label, held-in ids
    harmful = limit_per_group(select_split(load_prompts("xsafety", languages=langs, label="harmful"), "held-in"), 4)
    benign = limit_per_group(select_split(load_prompts("mgsm", languages=langs, label="benign"), "held-in"), 4)
    assert len(harmful) == 8 and len(benign) == 8
    res = identify(loaded, harmful, benign, languages=langs, method=["plnd", "precise-shield"], rho=0.03,
                   sites=("ffn",), out_dir=tmp_path, batch_size=8, progress=False)
    for method in ("plnd", "precise-shield"):
        for name in ("ms_en", "ms_zh", "ss_zh"):
            assert (tmp_path / method / f"{name}.safetensors").is_file()
        for name in ("ms_en", "ms_zh"):
            s = NeuronSet.load(tmp_path / method / name, loaded)
            assert len(s) > 0 and s.meta["owned_parameters"] > 0
            assert s.site_kinds() == ["ffn"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    layers = summary["layers"]
    assert len(summary["layer_distribution"]["plnd"]["ms_en"]) == layers
    # top-3 % per layer minus the benign top-3 %: at most 3 % of the units per layer
    assert summary["sets"]["plnd"]["ms_en"]["neurons"] <= 0.03 * summary["units_in_sites"] + layers
    assert res.summary["peak_rss_mb"] > 0 and res.summary["statistics"]["collected_groups"]
