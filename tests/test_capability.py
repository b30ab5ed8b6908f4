"""Capability: MGSM answer extraction in several scripts, XCOPA log-likelihood scoring on a tiny model."""

from __future__ import annotations

import pytest
import torch

from neuroshield.data.records import PromptRecord
from neuroshield.evaluate.capability import (
    MGSM_INSTRUCTIONS,
    XCOPA_CONNECTORS,
    answers_match,
    continuation_logprobs,
    extract_answer,
    mgsm_accuracy,
    mgsm_prompt,
    normalise_digits,
    parse_number,
    score_mgsm,
    xcopa_accuracy,
    xcopa_texts,
)
from neuroshield.models.tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "text, language, expected",
    [
        ("So she makes 9 * 2 = $18 every day. The answer is 18.", "en", 18),
        ("He pays 1,000 + 250 = 1,250 dollars.", "en", 1250),
        ("Total: 114,200", "en", 114200),
        ("Insgesamt 1.000 Äpfel", "de", 1000),
        ("La respuesta es 2.500.", "es", 2500),
        ("Il faut 5 000 € au total.", "fr", 5000),
        ("Réponse : 3,5 heures", "fr", 3.5),
        ("Ответ: 12 500 рублей", "ru", 12500),
        ("মোট ডিম ১৬টি, তিনি ১৮ ডলার পান।", "bn", 18),
        ("उत्तर १,२३,४५६ है", "hi", 123456),
        ("答案是１２，３４５。", "zh", 12345),
        ("所以答案是18。", "zh", 18),
        ("คำตอบคือ ๔๒ บาท", "th", 42),
        ("答えは２０個です", "ja", 20),
        ("الجواب ٣٤٫٥", "ar", 34.5),
        ("Jibu ni 7.", "sw", 7),
        ("Cost: $1,234.50.", "en", 1234.5),
        ("She is 5-3 years", "en", 3),
        ("The temperature is -5", "en", -5),
        ("Step 1.2.3", "en", 3),
        ("1,00,000", "hi", 100000),
    ],
)
def test_extract_answer(text: str, language: str, expected: float) -> None:
    assert extract_answer(text, language) == pytest.approx(expected)


def test_extract_answer_none_and_matching() -> None:
    assert extract_answer("no digits at all", "en") is None
    assert extract_answer("", "zh") is None
    assert answers_match(1250.0, "1,250")
    assert answers_match(18.0, "18")
    assert not answers_match(18.0, "19")
    assert not answers_match(None, "18")
    assert normalise_digits("১২৩ १२३ ๑๒๓ １２３") == "123 123 123 123"


def test_parse_number_rules() -> None:
    assert parse_number("1.000", "en") == 1.0  # English: a point is a decimal mark
    assert parse_number("1.000", "de") == 1000.0
    assert parse_number("1,5", "de") == 1.5
    assert parse_number("1.234,5", "de") == 1234.5
    assert parse_number("1,234.5", "en") == 1234.5
    assert parse_number("12'345", "en") == 12345.0


def test_mgsm_prompt_and_scoring() -> None:
    recs = [
        PromptRecord("mgsm/0", "Janet has 3 ducks...", "en", "benign", reference="18"),
        PromptRecord("mgsm/0", "珍妮有3只鸭子……", "zh", "benign", reference="18"),
        PromptRecord("mgsm/1", "জেনেট...", "bn", "benign", reference="1,250"),
    ]
    p = mgsm_prompt(recs[1])
    assert p.text.startswith(recs[1].text) and p.text.endswith(MGSM_INSTRUCTIONS["zh"])
    items = score_mgsm(recs, ["The answer is 18.", "答案是17。", "উত্তর ১,২৫০"])
    assert [i.correct for i in items] == [True, False, True]
    assert items[1].predicted == "17" and items[2].predicted == "1250"
    with pytest.raises(ValueError):
        score_mgsm(recs, ["x"])


def test_mgsm_accuracy_with_stand_in_generator() -> None:
    recs = [PromptRecord(f"mgsm/{i}", f"q{i}", lang, "benign", reference=str(i))
            for i in range(4) for lang in ("en", "de")]
    seen = []

    def fake(prompts):
        seen.extend(prompts)
        return [f"... so the result is {p.id.split('/')[1] if p.language == 'en' else 99}" for p in prompts]

    cells, items = mgsm_accuracy(None, recs, generate=fake, n_resamples=100)
    by = {c.language: c for c in cells}
    assert by["en"].accuracy.value == 1.0 and by["de"].accuracy.value == 0.0  # "99" is never the reference
    assert by["all"].n == 8
    assert all(MGSM_INSTRUCTIONS[p.language] in p.text for p in seen)


def _xcopa(idx: int, lang: str, premise: str, c1: str, c2: str, question: str, label: int) -> PromptRecord:
    return PromptRecord(f"xcopa/test/{idx}", premise, lang, "benign", source="xcopa",
                        meta={"premise": premise, "choice1": c1, "choice2": c2, "question": question,
                              "label": str(label)})


def test_xcopa_texts_connectors() -> None:
    ctx, (a, b) = xcopa_texts(_xcopa(0, "it", "L'oggetto era avvolto.", "Era fragile.", "Era piccolo.", "cause", 0))
    assert ctx == "L'oggetto era avvolto perché" and a == " era fragile." and b == " era piccolo."
    ctx, (a, _) = xcopa_texts(_xcopa(0, "zh", "该物品用气泡包装纸包着。", "它很易碎。", "它很小。", "effect", 0))
    assert ctx == "该物品用气泡包装纸包着，所以" and a == "它很易碎。"
    assert set(XCOPA_CONNECTORS) >= {"et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh"}
    with pytest.raises(ValueError, match="connectors"):
        xcopa_texts(_xcopa(0, "xx", "p", "a", "b", "cause", 0))
    with pytest.raises(ValueError, match="meta"):
        xcopa_texts(PromptRecord("x", "p", "it", "benign"))


def _naive_logprob(lm, context: str, cont: str) -> float:
    c = lm.tokenizer(context, add_special_tokens=True)["input_ids"]
    x = lm.tokenizer(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([c + x])
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(ids).logits[0].double(), -1)
    return sum(float(lp[len(c) - 1 + k, t]) for k, t in enumerate(x))


def test_continuation_logprobs_match_unbatched() -> None:
    lm = tiny_model("llama", seed=1)
    ctx = ["The cat sat", "Il gatto", "猫坐在", "x"]
    cont = [" on the mat", " dorme molto bene", "垫子上", " yz"]
    got = continuation_logprobs(lm, ctx, cont, batch_size=3)
    for (s, n), c, x in zip(got, ctx, cont):
        assert s == pytest.approx(_naive_logprob(lm, c, x), abs=1e-4)
        assert n == len(lm.tokenizer(x, add_special_tokens=False)["input_ids"])
    # batch size does not change the numbers (padding is masked)
    again = continuation_logprobs(lm, ctx, cont, batch_size=1)
    assert [round(a[0], 4) for a in again] == [round(a[0], 4) for a in got]


def test_xcopa_picks_higher_loglik_deterministically() -> None:
    lm = tiny_model("qwen2", seed=2)
    premise = "Il pacco era avvolto nella plastica."
    ctx = "Il pacco era avvolto nella plastica perché"
    # construct a case: among candidate choices, find the one the tiny model likes most and least
    candidates = ["Era fragile.", "Era piccolo.", "Aveva fame.", "Pioveva forte.", "Costava poco."]
    naive = {c: _naive_logprob(lm, ctx, " " + c[0].lower() + c[1:]) for c in candidates}
    best = max(naive, key=naive.get)
    worst = min(naive, key=naive.get)
    recs = [
        _xcopa(0, "it", premise, best, worst, "cause", 0),  # the better choice is the label
        _xcopa(1, "it", premise, worst, best, "cause", 0),  # the better choice is not the label
    ]
    cells, items = xcopa_accuracy(lm, recs, batch_size=4, n_resamples=50)
    assert items[0].predicted == 0 and items[1].predicted == 1
    assert items[0].correct and not items[1].correct
    assert items[0].logprob[0] == pytest.approx(naive[best], abs=1e-4)
    assert items[0].logprob[1] == pytest.approx(naive[worst], abs=1e-4)
    by = {c.language: c for c in cells}
    assert by["it"].accuracy.value == pytest.approx(0.5)
    assert "acc_norm" in by["it"].extra
    cells2, items2 = xcopa_accuracy(lm, recs, batch_size=1, n_resamples=50)
    flat = [v for i in items for v in i.logprob]
    assert [v for i in items2 for v in i.logprob] == pytest.approx(flat, abs=1e-4)
    assert [c.to_dict() for c in cells2] == [c.to_dict() for c in cells]
