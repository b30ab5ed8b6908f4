"""Can the contrast set's eval part see exaggerated safety? Evaluates the base model and the safety patches of a
trained run on the eval part (all 112 English prompts and 20 per other XSafety language), greedy 24 tokens,
the three-verdict judge, and prints the headline (exaggerated-safety refusal with paired differences).

    python experiments/contrast_check.py --run runs/judge-train --out runs/contrast-check

`runs/judge-train` was `neuroshield run configs/compare.yaml --set name=judge-train
--set 'train.recipes=[precise-shield,random]' --stages identify,train` (bfloat16 on an AMX CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/judge-train", help="a run whose train/<recipe>/safety_patch.safetensors exist")
    ap.add_argument("--recipes", default="precise-shield,random")
    ap.add_argument("--out", default="runs/contrast-check")
    ap.add_argument("--per-language", type=int, default=20, help="eval-part prompts per language other than English")
    args = ap.parse_args(argv)
    from neuroshield.data.templates import CONTRAST_LANGUAGES, load_contrast_set
    from neuroshield.evaluate.evaluate import EvalSuite, evaluate
    from neuroshield.evaluate.headline import format_headline, headline
    from neuroshield.models import load_model
    from neuroshield.neurons.splits import limit_per_group

    others = [lang for lang in CONTRAST_LANGUAGES if lang != "en"]
    recs = load_contrast_set(["en"], "eval") + limit_per_group(load_contrast_set(others, "eval"), args.per_language)
    suite = EvalSuite(contrast=recs, sources={"contrast": ["contrast:eval"]})
    loaded = load_model("default")
    out = Path(args.out)
    kw = dict(batch_size=24, max_new_tokens=24, progress=False)
    evaluate(loaded, suite, out_dir=out / "base", tag="base", **kw)
    for recipe in args.recipes.split(","):
        evaluate(loaded, suite, patch=Path(args.run) / "train" / recipe / "safety_patch.safetensors",
                 out_dir=out / recipe, tag=recipe, **kw)
    h = headline(out)
    (out / "headline.json").write_text(json.dumps(h, indent=1))
    print(format_headline(h))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
