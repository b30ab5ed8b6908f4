"""The judge registry: `get_judge(name, loaded)` and the helpers that record and call a judge.

Names: `refusal-phrase` (the default rule judge), `logprob` (needs `loaded`, the evaluated model), `learned` (a
logistic head on the default model's reading of prompt and response; it loads its own unpatched copy of the
default model, whatever `loaded` is), or a path to a local classifier / guard-model folder. Every judge has `name`, `version` and `describe()`;
evaluation writes `describe()` beside the numbers.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuroshield.judges.classifier import ClassifierJudge
from neuroshield.judges.learned import LearnedJudge
from neuroshield.judges.logprob import LogprobRefusalJudge
from neuroshield.judges.phrase import RefusalPhraseJudge
from neuroshield.judges.result import settings_hash

# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

JUDGE_NAMES = ("refusal-phrase", "logprob", "learned")


def get_judge(name_or_path: str | Any, loaded: Any = None, **kw: Any) -> Any:
    """A judge by name (`refusal-phrase`, `logprob`, `learned`) or a local classifier folder path.

    A judge object (anything with `judge_batch` or `judge_prompts`) is returned as is. `logprob`
    needs `loaded` (the evaluated model); `learned` never uses it (the evaluated model may be patched or
    another model: it reads with its own copy of the default model, loaded on first use, or `reader=`).
    Extra keyword arguments go to the judge's constructor.
    """
    if not isinstance(name_or_path, (str, Path)):
        if hasattr(name_or_path, "judge_batch") or hasattr(name_or_path, "judge_prompts"):
            return name_or_path
        raise TypeError(f"not a judge: {name_or_path!r}")
    name = str(name_or_path)
    if name == "refusal-phrase":
        return RefusalPhraseJudge(**kw)
    if name == "logprob":
        return LogprobRefusalJudge(loaded, **kw)
    if name == "learned":
        return LearnedJudge(**kw)
    p = Path(name).expanduser()
    if p.exists():
        return ClassifierJudge.from_path(p, **kw)
    raise ValueError(f"unknown judge {name!r}: use {' or '.join(JUDGE_NAMES)}, or a path to a local classifier "
                     "or guard-model folder")


def judge_info(judge: Any) -> dict[str, Any]:
    """name, version (and whatever else the judge tells about itself) for recording with results."""
    if hasattr(judge, "describe"):
        try:
            d = dict(judge.describe())
            d.setdefault("name", getattr(judge, "name", type(judge).__name__))
            d.setdefault("version", str(getattr(judge, "version", "unversioned")))
            return d
        except Exception:  # a judge's describe() must never break an evaluation
            pass
    return {"name": str(getattr(judge, "name", type(judge).__name__)), "version": _implicit_version(judge),
            "kind": type(judge).__name__}


def _implicit_version(judge: Any) -> str:
    """A judge's `version`, or else a hash of its settings and of its module's phrase table (PHRASES)
    when it has one, with the source of that module (its rules) and of the invalid rules (`judges.invalid`) it
    applies, so that a change of the phrase lists or of any rule changes the recorded version."""
    v = getattr(judge, "version", None)
    if v:
        return str(v)
    import inspect
    import sys

    settings = {k: val for k, val in vars(judge).items()
                if not k.startswith("_") and isinstance(val, (str, int, float, bool, type(None), tuple))}
    table = getattr(sys.modules.get(type(judge).__module__), "PHRASES", None)
    if table is None:
        return "h" + settings_hash([settings, None])
    from neuroshield.judges import invalid

    module = sys.modules[type(judge).__module__]
    return "h" + settings_hash([settings, repr(dict(table)), inspect.getsource(module), inspect.getsource(invalid)])


def judge_label(judge: Any) -> str:
    info = judge_info(judge)
    return f"{info['name']}@{info['version']}"


def result_verdict(result: Any) -> str:
    """A judge result's verdict: its `verdict` (refusal, compliance or invalid), else from `refused`."""
    verdict = getattr(result, "verdict", "")
    if verdict:
        return str(verdict)
    return "refusal" if result.refused else "compliance"


def judge_responses(judge: Any, responses: Sequence[str], languages: Sequence[str],
                    prompts: Sequence[str] | None = None) -> list[Any]:
    """Call a response judge's `judge_batch`, passing the prompts when the judge accepts them."""
    fn = judge.judge_batch
    try:
        accepts_prompts = "prompts" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        accepts_prompts = False
    if accepts_prompts and prompts is not None:
        return list(fn(list(responses), list(languages), prompts=list(prompts)))
    return list(fn(list(responses), list(languages)))
