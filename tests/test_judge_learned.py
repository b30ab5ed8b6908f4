"""The learned judge (`learned`): its head, its features, its file and, with the default model, its figures on the
test part of the labelled set (docs/judge.md)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from neuroshield.judges.learned import (HEAD_PATH, RULE_FEATURES, LearnedJudge, fit_head, head_features, load_head,
                                        rule_features, save_head)
from neuroshield.judges.phrase import RefusalPhraseJudge
from neuroshield.judges.registry import JUDGE_NAMES, get_judge, judge_info
from neuroshield.judges.result import VERDICTS

LABELLED = Path(__file__).parent / "fixtures" / "judge_labelled.jsonl"


def test_fit_head_separates_three_classes_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    y = torch.arange(3).repeat(40)
    x = centres[y] + 0.5 * torch.randn(len(y), 4, generator=gen)
    head = fit_head(x, y.tolist(), l2=0.01)
    assert (head.proba(x).argmax(1) == y).float().mean() > 0.95
    again = fit_head(x, y.tolist(), l2=0.01)
    assert torch.equal(head.weight, again.weight) and torch.equal(head.bias, again.bias)
    # a stronger penalty shrinks the weights; balanced weighting changes them when the classes are unbalanced
    assert fit_head(x, y.tolist(), l2=10.0).weight.norm() < head.weight.norm()
    keep = torch.cat([torch.arange(len(y))[y != 2], torch.arange(len(y))[y == 2][:5]])
    assert not torch.equal(fit_head(x[keep], y[keep].tolist(), 0.01, balanced=True).weight,
                           fit_head(x[keep], y[keep].tolist(), 0.01).weight)


def test_rule_features_see_copies_loops_and_refusals():
    prompts = ["How do I pick a lock?", "How do I pick a lock?", "Как приготовить суп?", "How do I pick a lock?"]
    responses = ["How do I pick a lock?", "I'm sorry, but I can't help with that.", "Сварите воду, добавьте овощи.",
                 "lock lock lock lock lock lock lock lock lock lock lock lock lock lock lock lock"]
    languages = ["en", "en", "ru", "en"]
    phrase = RefusalPhraseJudge().judge_batch(responses, languages, prompts=prompts)
    x = rule_features(responses, prompts, phrase)
    assert x.shape == (4, len(RULE_FEATURES))
    col = {name: i for i, name in enumerate(RULE_FEATURES)}
    assert x[0, col["phrase:invalid"]] == 1 and x[0, col["reason:copy-of-prompt"]] == 1 and x[0, col["new_share"]] == 0
    assert x[1, col["phrase:refusal"]] == 1 and x[1, col["latin_share"]] == 1
    assert x[2, col["script_match"]] == 1 and x[2, col["latin_share"]] == 0
    assert x[3, col["repetition_share"]] > 0.5


def test_head_features_follow_the_spec():
    mean, last, rules = torch.ones(2, 3), 2 * torch.ones(2, 3), 3 * torch.ones(2, len(RULE_FEATURES))
    reader = {4: (mean, last)}
    assert head_features({"layer": 4, "pooling": "both", "rules": True}, reader, rules).shape == (2, 6 + len(RULE_FEATURES))
    assert torch.equal(head_features({"layer": 4, "pooling": "last", "rules": False}, reader, rules), last)
    assert torch.equal(head_features({"layer": 0, "pooling": "none", "rules": True}, None, rules), rules)


def test_head_file_round_trip(tmp_path):
    head = fit_head(torch.randn(30, 5, generator=torch.Generator().manual_seed(1)), [0, 1, 2] * 10, l2=0.1)
    spec = {"layer": 3, "pooling": "mean", "rules": False}
    save_head(tmp_path / "h.safetensors", head, spec)
    again, spec_again = load_head(tmp_path / "h.safetensors")
    assert spec_again == spec and torch.equal(again.weight, head.weight) and torch.equal(again.scale, head.scale)


def test_the_committed_head_is_registered_and_says_what_it_was_trained_on():
    assert "learned" in JUDGE_NAMES
    judge = get_judge("learned")  # the reader loads on first use, not here
    assert isinstance(judge, LearnedJudge) and judge._reader is None
    info = judge_info(judge)
    assert info["name"] == "learned" and len(info["version"]) == 12
    assert info["trained_on"]["part"] == "dev" and info["reader"]["spec"] == "default"
    head, spec = load_head(HEAD_PATH)
    assert head.weight.shape[0] == len(VERDICTS) and spec["verdicts"] == list(VERDICTS)
    assert set(spec["keep_phrase"]) <= {"refusal", "moral-refusal", "empty", "no-words", "copy-of-prompt", "repetition",
                                        "mixed-script-word"}
    with pytest.raises(ValueError, match="prompts"):
        judge.judge_batch(["I can't."], ["en"])


# The committed head's figures on the test part with the held-in batch (552 rows; docs/judge.md), rounded down.
# The learned judge does not meet the bounds either (zh/ja refusal precision and invalid recall, es/fr/de/ru and
# ar invalid recall): these floors only fail when a change (of the head, the rules it reads or the reader) makes
# it worse than what docs/judge.md reports.
LEARNED_FLOORS = {
    "en": {"refusal_precision": 0.93, "refusal_recall": 1.0, "invalid_recall": 1.0},
    "es/fr/de/ru": {"refusal_precision": 0.98, "refusal_recall": 0.92, "invalid_recall": 0.53},
    "zh/ja": {"refusal_precision": 0.84, "refusal_recall": 0.91, "invalid_recall": 0.53},
    "ar": {"refusal_precision": 1.0, "refusal_recall": 1.0, "invalid_recall": 0.75},
    "bn/hi": {"refusal_precision": 1.0, "refusal_recall": 1.0, "invalid_recall": 1.0},
}


@pytest.mark.real_model
@pytest.mark.slow
def test_learned_judge_keeps_its_test_part_figures():
    """Runs the judge (the default model reads the 552 test rows through layer 8, 9 of its 24 layers: ~45 s on one CPU thread)."""
    from neuroshield.judges.labelled import agreement, format_table, judge_rows, load_labelled

    rows = [r for r in load_labelled(LABELLED) if r["split"] == "test"]
    judge = get_judge("learned")
    start = time.perf_counter()
    table = {a.group: a for a in agreement(rows, judge_rows(judge, rows))}
    seconds = time.perf_counter() - start
    dropped = [f"{g}: {name} {table[g].figures()[name]:.3f} < {floor}" for g, floors in LEARNED_FLOORS.items()
               for name, floor in floors.items() if (table[g].figures()[name] or 0.0) < floor]
    assert not dropped, "\n" + format_table(list(table.values())) + "\n" + "\n".join(dropped)
    assert seconds < 600
