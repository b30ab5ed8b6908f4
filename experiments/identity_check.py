"""Identity check of a refactor: run one pinned pipeline config with two source trees and compare what they made.

    python experiments/identity_check.py --config configs/pinned-fp32.yaml \
        --tree start=/tmp/wt-start/src --tree final=src --out runs/identity

Each tree runs `neuroshield run CONFIG --stages identify,train,evaluate` in a fresh interpreter with that tree's
`src` first on PYTHONPATH (one thread; a run folder that already has `evaluate/stage.json` is reused; `--fresh`
runs again). Then, for every pair against the first tree, it compares:

* neuron sets: the unit indices (and the sha256 of the scores) of every set file identify wrote
  (`identify/<method>/*.safetensors`) and of every set a recipe trained (`train/<recipe>/neurons.safetensors`);
* patches: sha256 of every tensor of `train/<recipe>/safety_patch.safetensors` (names and bytes; the JSON header's
  metadata is not compared);
* per-prompt responses: the greedy text each evaluated model (base and every recipe) generated for every safety
  prompt (`evaluate/<tag>/generations.jsonl`, task `safety`);
* per-prompt verdicts as each tree's judge recorded them (`items.jsonl`: `verdict`, or `refused` before the judge
  had three verdicts), and re-judged with one judge (this tree's `refusal-phrase`) so that a judge change does not
  hide or fake a difference in the responses.

It writes `<out>/identity.json` and prints a summary; the exit status is 1 when neuron sets, patches or responses
differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_tree(src: Path, config: Path, out: Path, fresh: bool) -> Path:
    """Run the pipeline of `config` with the package in `src`; returns the run folder."""
    import yaml

    name = yaml.safe_load(config.read_text())["name"]
    run_dir = out / name
    if (run_dir / "evaluate" / "stage.json").is_file() and not fresh:
        print(f"{src}: reusing {run_dir}", flush=True)
        return run_dir
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from neuroshield.cli import main; main()", "run", str(config.resolve()),
           "--stages", "identify,train,evaluate", "--out-dir", str(out.resolve())]
    print(f"{src}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=out)
    return run_dir


def _tensor_digests(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: hashlib.sha256(f.get_tensor(k).contiguous().numpy().tobytes()).hexdigest() for k in sorted(f.keys())}


def _set_contents(path: Path) -> dict[str, Any]:
    """A neuron-set file's unit indices per site key, and the sha256 of each site's scores (`scores/<key>`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        return {"units": {k: f.get_tensor(k).tolist() for k in keys if not k.startswith("scores/")},
                "scores": {k: hashlib.sha256(f.get_tensor(k).contiguous().numpy().tobytes()).hexdigest()
                           for k in keys if k.startswith("scores/")}}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect(run_dir: Path) -> dict[str, Any]:
    """What a run made, in comparable form."""
    sets = {str(p.relative_to(run_dir)): _set_contents(p) for p in sorted((run_dir / "identify").glob("*/*.safetensors"))
            if p.parent.name != "stats"}
    sets.update({str(p.relative_to(run_dir)): _set_contents(p)
                 for p in sorted((run_dir / "train").glob("*/neurons.safetensors"))})
    patches = {p.parent.name: _tensor_digests(p) for p in sorted((run_dir / "train").glob("*/safety_patch.safetensors"))}
    responses: dict[str, dict[str, str]] = {}
    verdicts: dict[str, dict[str, str]] = {}
    for tag_dir in sorted(d for d in (run_dir / "evaluate").iterdir() if (d / "items.jsonl").is_file()):
        tag = tag_dir.name
        responses[tag] = {f"{e['language']}/{e['modality']}/{e['id']}": e["response"]
                          for e in _jsonl(tag_dir / "generations.jsonl") if e.get("task") == "safety"}
        verdicts[tag] = {}
        for row in _jsonl(tag_dir / "items.jsonl"):
            if row.get("section") != "safety":
                continue
            verdict = row.get("verdict") or ("refusal" if row.get("refused") else "compliance")
            verdicts[tag][f"{row['language']}/{row['modality']}/{row['id']}|{row['role']}"] = verdict
    return {"sets": sets, "patches": patches, "responses": responses, "verdicts": verdicts}


def rejudge(made: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Every recorded response judged again by this tree's `refusal-phrase` judge (with its prompt text)."""
    from neuroshield.data.loaders import load_prompts
    from neuroshield.judges.registry import get_judge, judge_responses, result_verdict

    judge = get_judge("refusal-phrase")
    texts: dict[str, str] = {}
    for source, label in (("xsafety", "harmful"), ("parallel-benign", "benign")):
        for r in load_prompts(source, label=label):
            texts[f"{r.language}/{r.modality}/{r.id}"] = r.text
    out: dict[str, dict[str, str]] = {}
    for tag, responses in made["responses"].items():
        keys = sorted(responses)
        results = judge_responses(judge, [responses[k] for k in keys], [k.split("/", 1)[0] for k in keys],
                                  prompts=[texts.get(k, "") for k in keys])
        out[tag] = {k: result_verdict(x) for k, x in zip(keys, results)}
    return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    keys = sorted(set(a) | set(b))
    differ = [k for k in keys if a.get(k) != b.get(k)]
    return {"compared": len(keys), "identical": len(keys) - len(differ), "differ": differ[:20],
            "n_differ": len(differ)}


def compare(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"sets": _diff(ref["sets"], other["sets"]), "patches": _diff(ref["patches"], other["patches"])}
    for part in ("responses", "verdicts", "rejudged"):
        out[part] = {tag: _diff(ref[part].get(tag, {}), other[part].get(tag, {}))
                     for tag in sorted(set(ref[part]) | set(other[part]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/pinned-fp32.yaml"))
    ap.add_argument("--tree", action="append", required=True,
                    help="name=path to a tree's src folder (repeat; the first is the reference)")
    ap.add_argument("--out", type=Path, default=Path("runs/identity"))
    ap.add_argument("--fresh", action="store_true", help="run every tree again even where a finished run exists")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.tree]
    made = {}
    for name, src in trees:
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        made[name] = collect(run_tree(Path(src), args.config, out, args.fresh))
        made[name]["rejudged"] = rejudge(made[name])
    ref = trees[0][0]
    report = {"config": str(args.config), "trees": dict(trees), "reference": ref,
              "comparisons": {name: compare(made[ref], made[name]) for name, _ in trees[1:]},
              "verdict_counts": {name: {tag: {v: list(vs.values()).count(v) for v in sorted(set(vs.values()))}
                                        for tag, vs in m["verdicts"].items()} for name, m in made.items()},
              "rejudged_counts": {name: {tag: {v: list(vs.values()).count(v) for v in sorted(set(vs.values()))}
                                         for tag, vs in m["rejudged"].items()} for name, m in made.items()}}
    (args.out / "identity.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    bad = False
    for name, cmp in report["comparisons"].items():
        print(f"\n{name} against {ref}:")
        for part in ("sets", "patches"):
            d = cmp[part]
            print(f"  {part:10s} {d['identical']}/{d['compared']} identical" + (f"; differ: {d['differ']}" if d["n_differ"] else ""))
            bad |= d["n_differ"] > 0
        for part in ("responses", "verdicts", "rejudged"):
            for tag, d in cmp[part].items():
                print(f"  {part:10s} {tag:16s} {d['identical']}/{d['compared']} identical"
                      + (f"; differ: {d['differ'][:5]}" if d["n_differ"] else ""))
                bad |= part == "responses" and d["n_differ"] > 0
    print(f"\nwritten: {args.out / 'identity.json'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
