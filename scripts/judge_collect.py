"""Collect the responses of the judge's labelled set (tests/fixtures/judge_labelled.jsonl, docs/judge.md).

Greedy answers of the default model (Qwen2.5-Coder-0.5B-Instruct, bfloat16) through the project's one
generation path (`neuroshield.generate.generation.generate`, 44 new tokens, batch 16), written as JSONL rows
(id, language, prompt, response, model, prompt_kind, category) for labelling by hand:

    .venv/bin/python scripts/judge_collect.py base --out /tmp/base.jsonl
    .venv/bin/python scripts/judge_collect.py intervened --out /tmp/mod.jsonl --set runs/<run>/identify/precise-shield/ms_en
    .venv/bin/python scripts/judge_collect.py contrast --out /tmp/contrast.jsonl
    .venv/bin/python scripts/judge_collect.py patched --out /tmp/ps.jsonl --patch runs/<run>/train/precise-shield/<patch>.safetensors
    .venv/bin/python scripts/judge_collect.py held-in --out /tmp/hi.jsonl --exclude tests/fixtures/judge_labelled.jsonl \
        --patch runs/<run>/train/precise-shield/safety_patch.safetensors

`base`: 28 harmful XSafety ids (14 per plain-harmful category Crimes_And_Illegal_Activities and
Unsafe_Instruction_Topic) in the 10 XSafety languages and 12 parallel-benign ids (16 languages for 4 of them).
`intervened`: other ids (2 per category, 2 benign), under `scale:4` on the set and under zero-ablation of a
random 800-neuron-per-layer FFN set (degenerate outputs: the invalid verdict). `contrast`: 14 contrast-set ids
(one per category, ranked by sha256 of the id) in its 10 languages. `patched`: a trained safety patch applied,
on other harmful (2 per category), benign (4) and contrast (3) ids; pass the earlier files with --exclude.
`held-in` (the third batch, issue 16): evaluation's settings (`generate_responses`, 24 new tokens, batch 24) on
held-in prompts only (`pick_prompts(..., "held-in")`: never an evaluation prompt), ids not in --exclude: for the
base model and then with --patch applied, each on its own ids: 8 XSafety harmful ids (all categories, as
evaluation draws them), 3 parallel-benign ids and 4 ids of the contrast set's train part, in the 10 languages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LANGS = ["en", "zh", "ar", "ru", "es", "fr", "de", "ja", "bn", "hi"]
HARMFUL = "xsafety:Crimes_And_Illegal_Activities,Unsafe_Instruction_Topic"
CONTRAST_FILE = Path(__file__).resolve().parents[1] / "src/neuroshield/resources/contrast_set.jsonl"


def _harmful(per_category: int, offset: int | None, step: int | None, exclude: set[str]) -> list:
    """`per_category` ids of each category (sorted ids, every `step`-th from `offset`; default: spread evenly)."""
    from neuroshield.data.loaders import load_prompts

    records = load_prompts(HARMFUL, languages=LANGS)
    by_cat: dict[str, list[str]] = {}
    for r in records:
        if r.id not in exclude:
            by_cat.setdefault(r.category, [])
            if r.id not in by_cat[r.category]:
                by_cat[r.category].append(r.id)
    pick: set[str] = set()
    for ids in by_cat.values():
        ids = sorted(ids)
        k = step or max(1, len(ids) // per_category)
        pick |= set(ids[(k // 2 if offset is None else offset)::k][:per_category])
    return [r for r in records if r.id in pick]


def _benign(ids_slice: slice, languages: Sequence[str]) -> list:
    from neuroshield.data.templates import load_parallel_benign

    records = load_parallel_benign(list(languages))
    ids = sorted({r.id for r in records})[ids_slice]
    return [r for r in records if r.id in set(ids)]


def _contrast(n: int, skip: int = 0) -> list:
    from neuroshield.data.records import PromptRecord

    items = [json.loads(x) for x in CONTRAST_FILE.read_text(encoding="utf-8").splitlines() if x.strip()]
    items = [i for i in items if i.get("kind") != "header"]
    by_cat: dict[str, list[dict]] = {}
    for it in sorted(items, key=lambda i: hashlib.sha256(i["id"].encode()).hexdigest()):
        by_cat.setdefault(it["category"], []).append(it)
    for c in by_cat:
        by_cat[c] = by_cat[c][skip:]
    pick: list[dict] = []
    while len(pick) < n and any(by_cat.values()):
        for c in sorted(by_cat):
            if by_cat[c] and len(pick) < n:
                pick.append(by_cat[c].pop(0))
    return [PromptRecord(it["id"], text, lang, "benign", category=it["category"], source="contrast")
            for it in pick for lang, text in it["translations"].items()]


def _run(loaded, records: list, kinds: list[str], model: str, out, context=None) -> None:
    from contextlib import nullcontext

    from neuroshield.generate.generation import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=44, batch_size=16)
    t = time.time()

    def on_batch(idx: list[int], gens: list) -> None:
        for i, g in zip(idx, gens):
            r = records[i]
            out.write(json.dumps({"id": r.id, "language": r.language, "prompt": r.text, "response": g.text,
                                  "model": model, "prompt_kind": kinds[i], "category": r.category},
                                 ensure_ascii=False) + "\n")
        out.flush()
        print(f"{time.time() - t:.0f}s {model}: {len(idx)} more", file=sys.stderr, flush=True)

    with context() if context is not None else nullcontext():
        generate(loaded, records, cfg, progress=False, on_batch=on_batch)


def _held_in(loaded, exclude: set[str], patch: str | None, out) -> None:
    """The held-in batch: for the base model and (with `patch`) the patched one, each on ids of its own."""
    from contextlib import nullcontext

    from neuroshield.evaluate.evaluate import patched
    from neuroshield.generate.generation import generate_responses
    from neuroshield.neurons.splits import pick_prompts

    def ids_of(source: str, label: str) -> list[str]:
        recs = pick_prompts(source, label, LANGS, "held-in", None)
        common = set.intersection(*({r.id for r in recs if r.language == lang} for lang in LANGS)) - exclude
        return sorted(common, key=lambda i: hashlib.sha256(f"judge3:{i}".encode()).hexdigest())

    def spread(source: str, label: str, k: int) -> list[str]:
        """`k` ids per model, round robin over the categories (ranked by hash within each)."""
        recs = {r.id: r.category for r in pick_prompts(source, label, LANGS, "held-in", None)}
        by_cat: dict[str, list[str]] = {}
        for i in ids_of(source, label):
            by_cat.setdefault(recs[i] or "", []).append(i)
        out_ids: list[str] = []
        while len(out_ids) < 2 * k and any(by_cat.values()):
            for c in sorted(by_cat):
                if by_cat[c] and len(out_ids) < 2 * k:
                    out_ids.append(by_cat[c].pop(0))
        return out_ids

    picks = {"harmful": ("xsafety", "harmful", spread("xsafety", "harmful", 8)),
             "benign": ("parallel-benign", "benign", ids_of("parallel-benign", "benign")[:6]),
             "contrast": ("contrast", "benign", ids_of("contrast", "benign")[:8])}
    models = [("base", None)] + ([(Path(patch).parent.name, patch)] if patch else [])
    for m, (name, p) in enumerate(models):
        recs, kinds = [], []
        for kind, (source, label, ids) in picks.items():
            mine = set(ids[m::2])
            got = [r for r in pick_prompts(source, label, LANGS, "held-in", None) if r.id in mine]
            recs += got
            kinds += [kind] * len(got)
        t = time.time()
        with patched(loaded, p) if p else nullcontext():
            texts = generate_responses(loaded, recs, max_new_tokens=24, batch_size=24, progress=False)
        for r, kind, text in zip(recs, kinds, texts):
            out.write(json.dumps({"id": r.id, "language": r.language, "prompt": r.text, "response": text,
                                  "model": f"{name} (held-in batch)", "prompt_kind": kind, "category": r.category},
                                 ensure_ascii=False) + "\n")
        out.flush()
        print(f"{time.time() - t:.0f}s {name}: {len(recs)} responses", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["base", "intervened", "contrast", "patched", "held-in"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", help="neuron set (intervened)")
    ap.add_argument("--patch", help="safety patch (patched)")
    ap.add_argument("--exclude", nargs="*", default=[], help="JSONL files whose ids to leave out (harmful)")
    args = ap.parse_args(argv)

    import torch

    from neuroshield.models.loading import load_model

    torch.set_num_threads(1)
    exclude = {json.loads(x).get("id") for p in args.exclude for x in Path(p).read_text().splitlines() if x.strip()}
    loaded = load_model("default", dtype="bfloat16")
    with open(args.out, "w", encoding="utf-8") as out:
        if args.what == "base":
            h = _harmful(14, None, None, exclude)
            b = _benign(slice(0, None, 4), LANGS + ["it", "vi", "ko", "th", "sw", "jv"])
            wide = {r.id for r in _benign(slice(0, None, 12), LANGS)}
            b = [r for r in b if r.language in LANGS or r.id in wide]
            _run(loaded, h + b, ["harmful"] * len(h) + ["benign"] * len(b), "base", out)
        elif args.what == "contrast":
            c = _contrast(14)
            _run(loaded, c, ["contrast"] * len(c), "base", out)
        elif args.what == "intervened":
            from neuroshield.intervene.interventions import intervene
            from neuroshield.models.sites import resolve_sites
            from neuroshield.neurons.neuronset import NeuronSet

            h = _harmful(2, 5, 37, exclude)
            b = _benign(slice(2, None, 24), LANGS)
            recs, kinds = h + b, ["harmful"] * len(h) + ["benign"] * len(b)
            ms = NeuronSet.load(args.set, loaded)
            sites = resolve_sites(loaded.model, loaded.adapter, ("ffn",))
            g = torch.Generator().manual_seed(3)
            big = NeuronSet(units={s.key: torch.randperm(s.width, generator=g)[:800].sort().values for s in sites},
                            meta={"name": "random-800-per-layer"})
            _run(loaded, recs, kinds, "base+ms_en x4", out, lambda: intervene(loaded, ms, "scale:4"))
            _run(loaded, recs, kinds, "base+random800 zero", out, lambda: intervene(loaded, big, "zero"))
        elif args.what == "held-in":
            _held_in(loaded, exclude, args.patch, out)
        else:
            from neuroshield.evaluate.evaluate import patched

            h = _harmful(2, 9, 29, exclude)
            b = _benign(slice(1, None, 12), LANGS)
            c = _contrast(3, skip=1)
            recs = h + b + c
            kinds = ["harmful"] * len(h) + ["benign"] * len(b) + ["contrast"] * len(c)
            name = Path(args.patch).parent.name  # the recipe: runs/<run>/train/<recipe>/safety_patch.safetensors
            _run(loaded, recs, kinds, name, out, lambda: patched(loaded, args.patch))


if __name__ == "__main__":
    main()
