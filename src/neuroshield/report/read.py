"""Reading a run folder's files: JSON that may be missing or broken, the figures the stages drew, and the
evaluations (`eval.json` with their per-prompt verdicts in `items.jsonl`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroshield.report.blocks import Figure

def read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{path.name}: {err.__class__.__name__}: {err}"


def read_dict(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is missing or not an object (optional inputs)."""
    d, _ = read_json(path) if path.is_file() else (None, None)
    return d if isinstance(d, dict) else {}


# file stem (without an `image` word) -> (title, caption); {owner}: the folder (method, experiment, recipe),
# {hr}: the high-resource language(s) the shared sets are built from, {mod}: " for image prompts" or "".
FIGURE_TEXT: dict[str, tuple[str, str]] = {
    "ms_overlap": ("{owner}: overlap of the MS neurons between languages{mod}",
                   "Overlap of the monolingual safety-neuron sets MS(lang) between languages{mod}: overlap "
                   "coefficient |A∩B| / min(|A|, |B|) (left) and Jaccard |A∩B| / |A∪B| (right); in brackets the "
                   "overlap expected by chance for random sets of the same sizes per layer."),
    "ss_overlap": ("{owner}: overlap of the SS neurons between languages{mod}",
                   "Overlap of the shared safety-neuron sets SS(lang) = MS({hr}) ∩ MS(lang) between "
                   "languages{mod} (overlap coefficient and Jaccard; in brackets the overlap expected by chance "
                   "for sets of the same sizes per layer)."),
    "ms_layers": ("{owner}: where the MS neurons sit{mod}",
                  "Where each language's monolingual safety neurons MS(lang) sit{mod}, per layer: cell = "
                  "neurons of the set in the layer, colour = share of the set; bars on top = share of all sets' "
                  "neurons in each layer."),
    "ss_layers": ("{owner}: where the SS neurons sit{mod}",
                  "Where the shared neurons SS(lang) = MS({hr}) ∩ MS(lang) sit{mod}, per layer: cell = "
                  "neurons of the set in the layer, colour = share of the set; bars on top = share of all sets' "
                  "neurons in each layer."),
    "validation": ("{owner}: refusal per condition",
                   "Refusal rate on the harmful prompts without intervention (none), with the neuron set "
                   "intervened (set) and with random sets of the same size per layer (control: mean ± sd, dots = "
                   "single controls)."),
    "loss": ("{owner}: training loss",
             "Cross-entropy on the response tokens per training step, overall and on the harmful "
             "(refusal-target) and benign examples of each batch."),
}
FIGURE_TEXT["selection"] = (
    "{owner}: step selection",
    "Held-in monitor of the training run (never the evaluation prompts): refusal of held-in harmful prompts of every "
    "language that training does not use (y) against refusal of the contrast set's train part, safe requests that "
    "sound dangerous and that the retain set does not answer in any language (x), at every monitored step; the grey "
    "point is the base model, the ringed point the step whose weights are the result (most harmful refusal with "
    "contrast refusal within the tolerance of the base's; on ties, the fewer safe refusals).")


SMALL_FIGURES = {"validation", "loss", "selection"}  # drawn small by their stage: shown two per row


def stage_figure(path: Path, run: Path, hr: str) -> Figure:
    words = path.stem.split("_")
    key = "_".join(w for w in words if w != "image")
    mod = " for image prompts" if "image" in words else ""
    source = path.relative_to(run).as_posix()
    if key in FIGURE_TEXT:
        title, caption = (t.format(owner=path.parent.name, hr=hr, mod=mod) for t in FIGURE_TEXT[key])
        return Figure(path, title, caption, source, half=key in SMALL_FIGURES)
    words = re.sub(r"[_\-]+", " ", path.stem).strip()
    return Figure(path, f"{path.parent.name}: {words}", "", source)


def stage_figures(folder: Path, run: Path, hr: str = "en") -> list[Figure]:
    """Every PNG under `folder`, per subfolder in the order overlap, layers, others."""
    if not folder.is_dir():
        return []
    order = list(FIGURE_TEXT)

    def rank(p: Path) -> tuple[str, int, str]:
        key = "_".join(w for w in p.stem.split("_") if w != "image")
        return str(p.parent), order.index(key) if key in order else len(order), p.name

    return [stage_figure(p, run, hr) for p in sorted(folder.rglob("*.png"), key=rank)]


def neuron_set_files(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The neuron-set files under `identify/` (NeuronSet metadata JSON: neurons, by_kind, by_layer) with their
    contents, by path."""
    sets = []
    for p in sorted(folder.rglob("*.json")):
        if p.name == "summary.json":
            continue
        meta, _ = read_json(p)
        if isinstance(meta, dict) and "neurons" in meta and isinstance(meta.get("by_layer"), dict):
            sets.append((p, meta))
    return sets


def experiment_order(folder: Path) -> Callable[[Path], tuple[int, str]]:
    """Sort key of the experiment folders under `validate/`: in the order the pipeline ran them (its
    `stage.json`), others after them by name."""
    planned = list(((read_dict(folder / "stage.json").get("outputs") or {}).get("experiments") or {}))

    def order(experiment: Path) -> tuple[int, str]:
        name = experiment.relative_to(folder).as_posix()
        return planned.index(name) if name in planned else len(planned), name

    return order


def complied(item: dict[str, Any]) -> float:
    """1.0 when an items.jsonl row's verdict is compliance (an attack success); rows written before the three
    verdicts have only `refused`, and a non-refusal counted as a success then."""
    if "verdict" in item:
        return float(item["verdict"] == "compliance")
    return 0.0 if item.get("refused") else 1.0


def load_items(folder: Path) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    p = folder / "items.jsonl"
    out: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("section") == "safety":
            out[(row["role"], row["id"], row["language"], row["modality"])] = row
    return out


@dataclass
class Evals:
    """The run's evaluations, base first, with their per-prompt verdicts (for paired changes against the base)."""

    entries: list[tuple[Path, Any]] = field(default_factory=list)  # (eval.json path, EvalResult)
    bad: list[str] = field(default_factory=list)  # unreadable eval.json files, with the reason
    _items: dict[int, dict[tuple[str, str, str, str], dict[str, Any]]] = field(default_factory=dict)

    @property
    def results(self) -> list[Any]:
        return [e for _, e in self.entries]

    @property
    def base(self) -> Any:
        return next((e for e in self.results if e.tag == "base"), None)

    def items(self, i: int) -> dict[tuple[str, str, str, str], dict[str, Any]]:
        if i not in self._items:
            self._items[i] = load_items(self.entries[i][0].parent)
        return self._items[i]

    def keys(self, role: str) -> list[tuple[str, str]]:
        """(language, modality) cells of a role over all evaluations; per modality, `all` last."""
        keys = {(c.language, c.modality) for e in self.results for c in e.safety if c.role == role}
        return sorted(keys, key=lambda k: (k[1], k[0] == "all", k[0]))

    def delta(self, i: int, language: str, modality: str) -> Any:
        """Paired change in ASR of evaluation `i` against the base on the same prompts (a Rate of after − before);
        without per-prompt verdicts on both sides, the difference of the two rates without an interval."""
        from neuroshield.evaluate.metrics import Rate, paired_difference

        base = self.base
        after = self.entries[i][1]
        b, a = (base.asr(language, modality), after.asr(language, modality)) if base is not None else (None, None)
        if a is None or b is None or a.n == 0 or b.n == 0:
            return None
        bi = self.items(next(j for j, (_, e) in enumerate(self.entries) if e is base))
        ai = self.items(i)
        keys = [k for k in bi if k[0] == "harmful" and (language == "all" or k[2] == language) and k[3] == modality
                and k in ai]
        if not keys:
            return Rate(a.value - b.value, math.nan, math.nan, 0, 0)
        return paired_difference([complied(bi[k]) for k in keys], [complied(ai[k]) for k in keys],
                                 n_resamples=int(base.settings.get("n_resamples", 1000)),
                                 seed=int(base.settings.get("seed", 0)), key=f"delta/{language}/{modality}")


def load_evals(run: Path, fig_dir: Path) -> Evals:
    from neuroshield.evaluate.evaluate import EvalResult

    ev = Evals()
    for p in sorted(p for p in run.rglob("eval.json") if fig_dir not in p.parents):
        raw, err = read_json(p)
        if err or not isinstance(raw, dict) or not ({"safety", "capability"} & set(raw)):
            ev.bad.append(f"{p.relative_to(run)}: {err or 'not an evaluation result (no safety or capability numbers)'}")
            continue
        try:
            ev.entries.append((p, EvalResult.from_dict(raw)))
        except (ValueError, KeyError, TypeError) as e:
            ev.bad.append(f"{p.relative_to(run)}: {e.__class__.__name__}: {e}")
    # base first, then the others by tag; disambiguate duplicate tags by folder
    ev.entries.sort(key=lambda x: (x[1].tag != "base", x[1].tag, str(x[0])))
    tags = [e.tag for _, e in ev.entries]
    for p, e in ev.entries:
        if tags.count(e.tag) > 1:
            e.tag = f"{e.tag} ({p.parent.relative_to(run)})"
    return ev
