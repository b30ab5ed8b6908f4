"""General capability per language: MGSM accuracy (generation + answer extraction) and XCOPA accuracy
(log-likelihood of the two choices).

MGSM
    The question is sent through the chat template followed by a per-language instruction to reason
    briefly and end with the final answer as a number (`MGSM_INSTRUCTIONS`). Generation is greedy. The
    answer is the *last number* in the response (`extract_answer`), after normalising the digits:
    any Unicode decimal digit (Bengali ১২৩, Devanagari १२३, Thai ๑๒๓, Arabic-Indic ٣٤, full-width １２３,
    ...) becomes ASCII; thousand separators (`,` `.` `'`, no-break and thin spaces, Arabic ٬, Indian
    grouping 1,00,000) are removed and a decimal comma/point is kept. It is an exact numeric match with
    the reference. Numbers written in words (e.g. 二十, "twenty") are not parsed.

XCOPA
    Each item has a premise, two choices and a question (`cause` or `effect`). We score the raw
    language model (no chat template) on `premise + connector + choice`, with the connector "because"
    (cause) or "so" (effect) in the item's language (`XCOPA_CONNECTORS`, after lm-evaluation-harness's
    XCOPA prompts), the premise's final punctuation removed and the choice's first letter lower-cased.
    The prediction is the choice with the higher *sum* of continuation token log-probs (the primary
    accuracy, `acc`); `acc_norm`, the choice with the higher log-prob per UTF-8 byte of the choice, is
    reported beside it. Ties go to choice 1. Scoring is batched, right-padded, deterministic.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from neuroshield.data.records import PromptRecord
from neuroshield.evaluate.metrics import N_RESAMPLES, CapabilityCell, Rate, accuracy_cells

# --------------------------------------------------------------------------------------------------
# MGSM
# --------------------------------------------------------------------------------------------------

MGSM_INSTRUCTIONS: dict[str, str] = {
    "en": "Solve this problem step by step, briefly, and end your response with the final answer as a number.",
    "zh": "请简要地逐步解答这道题，并在回答的最后给出最终答案（一个数字）。",
    "es": "Resuelve este problema paso a paso, de forma breve, y termina tu respuesta con la respuesta final como un número.",
    "fr": "Résous ce problème étape par étape, brièvement, et termine ta réponse par la réponse finale sous forme de nombre.",
    "de": "Löse diese Aufgabe kurz Schritt für Schritt und beende deine Antwort mit dem Endergebnis als Zahl.",
    "ja": "この問題を簡潔に段階的に解き、回答の最後に最終的な答えを数字で書いてください。",
    "ru": "Кратко решите задачу шаг за шагом и закончите ответ итоговым ответом в виде числа.",
    "bn": "সংক্ষেপে ধাপে ধাপে এই সমস্যাটি সমাধান করুন এবং উত্তরের শেষে চূড়ান্ত উত্তরটি একটি সংখ্যা হিসেবে লিখুন।",
    "sw": "Tatua tatizo hili hatua kwa hatua kwa ufupi, kisha malizia jibu lako kwa jibu la mwisho kama namba.",
    "te": "ఈ సమస్యను సంక్షిప్తంగా దశలవారీగా పరిష్కరించి, చివరలో తుది సమాధానాన్ని ఒక సంఖ్యగా రాయండి.",
    "th": "แก้โจทย์นี้ทีละขั้นตอนอย่างกระชับ แล้วจบคำตอบด้วยคำตอบสุดท้ายเป็นตัวเลข",
}

# Languages that write a point as the thousands separator (1.000 = one thousand).
DOT_GROUP_LANGUAGES = frozenset({"de", "es", "it", "id", "tr", "vi", "pt", "nl", "da", "sw", "ro", "sl", "hr", "el"})
# Languages in which a plain space groups thousands (5 000).
SPACE_GROUP_LANGUAGES = frozenset({"fr", "ru", "uk", "pl", "cs", "sv", "no", "nb", "fi", "et"})

_SEPS = ".,'\u00a0\u202f\u2009\u066b\u066c"
_NUM_RE = {
    False: re.compile(rf"(?<![\w.,])[-\u2212]?\d+(?:[{_SEPS}]\d+)*|\d+(?:[{_SEPS}]\d+)*"),
    True: re.compile(rf"(?<![\w.,])[-\u2212]?\d+(?:[{_SEPS} ]\d+)*|\d+(?:[{_SEPS} ]\d+)*"),
}


def normalise_digits(text: str) -> str:
    """NFKC (full-width forms to ASCII) and every Unicode decimal digit to its ASCII digit.

    Arabic decimal and thousands separators (٫ ٬) become `.` and `,`.
    """
    text = unicodedata.normalize("NFKC", text)
    out = []
    for ch in text:
        if ch.isdigit() and not ch.isascii():
            d = unicodedata.decimal(ch, None)
            out.append(str(d) if d is not None else ch)
        elif ch == "\u066b":
            out.append(".")
        elif ch == "\u066c":
            out.append(",")
        else:
            out.append(ch)
    return "".join(out)


def parse_number(token: str, language: str = "en") -> float | None:
    """Parse one number token (ASCII digits and separators) under `language`'s conventions.

    Rules: space-like separators and `'` always group thousands. If both `,` and `.` occur, the last
    one is the decimal mark. One kind occurring several times groups thousands (groups of 3; Indian
    1,00,000 accepted). A single `,` or `.` followed by exactly 3 digits groups thousands (`.` only in
    `DOT_GROUP_LANGUAGES`); otherwise it is the decimal mark. An impossible grouping (`1.2.3`) gives
    the number after the last separator.
    """
    tok = token.strip().replace("\u2212", "-")
    neg = tok.startswith("-")
    tok = tok.lstrip("-")
    for sp in ("\u00a0", "\u202f", "\u2009", " ", "'"):
        if sp in tok:
            groups = tok.split(sp)
            lead = [len(re.match(r"\d*", g).group()) for g in groups]
            if 0 < lead[0] <= 3 and all(n == 3 for n in lead[1:]):
                tok = "".join(groups)
            else:
                tok = groups[-1]
    if not tok:
        return None
    parts = re.split(r"([.,])", tok)
    nums, seps = parts[0::2], parts[1::2]
    if not seps:
        value = float(nums[0])
    elif "," in seps and "." in seps:
        dec = seps[-1]
        if seps.count(dec) != 1:
            return _tail(nums, neg)
        whole, frac = tok.rsplit(dec, 1)
        whole_groups = re.split(r"[.,]", whole)
        if not _valid_groups(whole_groups):
            return _tail(nums, neg)
        value = float("".join(whole_groups) + "." + frac)
    elif len(seps) > 1:
        if not _valid_groups(nums):
            return _tail(nums, neg)
        value = float("".join(nums))
    else:
        sep = seps[0]
        if len(nums[1]) == 3 and (sep == "," or language in DOT_GROUP_LANGUAGES):
            value = float(nums[0] + nums[1])
        else:
            value = float(nums[0] + "." + nums[1])
    return -value if neg else value


def _valid_groups(groups: Sequence[str]) -> bool:
    if len(groups) < 2 or not groups[0] or len(groups[0]) > 3:
        return False
    rest = groups[1:]
    if all(len(g) == 3 for g in rest):
        return True
    # Indian grouping: 1,00,00,000 = two-digit groups then a final group of three
    return len(rest[-1]) == 3 and all(len(g) == 2 for g in rest[:-1])


def _tail(nums: Sequence[str], neg: bool) -> float | None:
    last = nums[-1]
    return float(last) if last else None


def extract_answer(text: str, language: str = "en") -> float | None:
    """The last number in `text` (see `parse_number`), or None if there is none."""
    norm = normalise_digits(text)
    matches = _NUM_RE[language in SPACE_GROUP_LANGUAGES].findall(norm)
    for m in reversed(matches):
        value = parse_number(m, language)
        if value is not None:
            return value
    return None


def answers_match(predicted: float | None, reference: str | float | None) -> bool:
    """Exact numeric match (up to float rounding) of a prediction with an MGSM reference."""
    if predicted is None or reference is None:
        return False
    ref = reference if isinstance(reference, (int, float)) else extract_answer(str(reference), "en")
    if ref is None:
        return False
    return math.isclose(float(predicted), float(ref), rel_tol=1e-9, abs_tol=1e-9)


def format_number(x: float | None) -> str | None:
    if x is None:
        return None
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def mgsm_prompt(record: PromptRecord) -> PromptRecord:
    """The record with the per-language instruction appended (English instruction where none is known)."""
    instr = MGSM_INSTRUCTIONS.get(record.language, MGSM_INSTRUCTIONS["en"])
    return replace(record, text=f"{record.text}\n\n{instr}")


@dataclass
class MgsmItem:
    id: str
    language: str
    reference: str | None
    predicted: str | None
    correct: bool


def score_mgsm(records: Sequence[PromptRecord], responses: Sequence[str]) -> list[MgsmItem]:
    """Extract each response's answer and compare it with the record's reference."""
    if len(records) != len(responses):
        raise ValueError(f"score_mgsm: {len(records)} records but {len(responses)} responses")
    items = []
    for rec, resp in zip(records, responses):
        ref = rec.reference if rec.reference is not None else rec.meta.get("answer")
        pred = extract_answer(resp, rec.language)
        items.append(MgsmItem(rec.id, rec.language, ref, format_number(pred), answers_match(pred, ref)))
    return items


GenerateFn = Callable[[Sequence[PromptRecord]], list[str]]


def mgsm_accuracy(
    loaded: Any, records: Sequence[PromptRecord], *, generate: GenerateFn | None = None, max_new_tokens: int = 256,
    batch_size: int = 8, n_resamples: int = N_RESAMPLES, seed: int = 0, progress: bool = True,
) -> tuple[list[CapabilityCell], list[MgsmItem]]:
    """MGSM accuracy per language (+ pooled `all`). `generate` maps instruction-augmented records to
    responses (default: greedy `generate_responses`); evaluation passes its cached generator here."""
    prompts = [mgsm_prompt(r) for r in records]
    if generate is None:
        from neuroshield.generate.generation import generate_responses

        def generate(recs: Sequence[PromptRecord]) -> list[str]:
            return generate_responses(loaded, list(recs), max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      do_sample=False, progress=progress)

    responses = generate(prompts)
    items = score_mgsm(records, responses)
    cells = mgsm_cells(items, n_resamples=n_resamples, seed=seed)
    return cells, items


def mgsm_cells(items: Sequence[MgsmItem], *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> list[CapabilityCell]:
    cells = accuracy_cells("mgsm", [(i.language, i.correct) for i in items], method="last-number exact match",
                           n_resamples=n_resamples, seed=seed)
    for c in cells:
        mine = [i for i in items if c.language in ("all", i.language)]
        c.extra["no_number"] = sum(i.predicted is None for i in mine)
    return cells


# --------------------------------------------------------------------------------------------------
# XCOPA
# --------------------------------------------------------------------------------------------------

# (cause connector, effect connector) per language: "because" / "so".
XCOPA_CONNECTORS: dict[str, tuple[str, str]] = {
    "en": ("because", "so"),
    "et": ("sest", "seetõttu"),
    "ht": ("poukisa", "donk sa"),
    "id": ("karena", "maka"),
    "it": ("perché", "quindi"),
    "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"),
    "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"),
    "vi": ("bởi vì", "vì vậy"),
    "zh": ("因为", "所以"),
}
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja"})
_END_PUNCT = ".。!?！？．"


def xcopa_texts(record: PromptRecord) -> tuple[str, tuple[str, str]]:
    """(context, (continuation 1, continuation 2)) for one XCOPA record (fields in `record.meta`)."""
    meta = record.meta
    try:
        premise, c1, c2, question = meta["premise"], meta["choice1"], meta["choice2"], meta["question"]
    except KeyError as err:
        raise ValueError(f"XCOPA record {record.id} ({record.language}) lacks meta[{err.args[0]!r}]; "
                         "load it with load_prompts('xcopa')") from None
    if question not in ("cause", "effect"):
        raise ValueError(f"XCOPA record {record.id}: question must be 'cause' or 'effect', got {question!r}")
    if record.language not in XCOPA_CONNECTORS:
        raise ValueError(f"no XCOPA connectors for language {record.language!r}; known: "
                         f"{', '.join(sorted(XCOPA_CONNECTORS))} (add them to XCOPA_CONNECTORS)")
    connector = XCOPA_CONNECTORS[record.language][0 if question == "cause" else 1]
    stem = premise.strip().rstrip(_END_PUNCT).strip()
    if record.language in _NO_SPACE_LANGUAGES:
        return f"{stem}，{connector}", (c1.strip(), c2.strip())

    def lower_first(s: str) -> str:
        s = s.strip()
        return s[:1].lower() + s[1:]

    return f"{stem} {connector}", (" " + lower_first(c1), " " + lower_first(c2))


@torch.no_grad()
def continuation_logprobs(
    loaded: Any, contexts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of each continuation given its context, raw LM (no chat template).

    The context is tokenized with the tokenizer's special tokens (BOS where the model uses one), the
    continuation without; their ids are concatenated (as lm-evaluation-harness does). Batches are
    sorted by length and right-padded; results come back in input order.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    seqs: list[tuple[list[int], int]] = []
    for ctx, cont in zip(contexts, continuations):
        c_ids = list(tok(ctx, add_special_tokens=True)["input_ids"])
        x_ids = list(tok(cont, add_special_tokens=False)["input_ids"])
        if not x_ids:
            raise ValueError(f"empty continuation for context {ctx[:40]!r}")
        if not c_ids:  # nothing to condition on: use EOS/BOS as a start token
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            c_ids = [start]
        seqs.append((c_ids + x_ids, len(x_ids)))
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i][0]), i))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    it: Any = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="log-likelihood", unit="batch")
    for batch in it:
        width = max(len(seqs[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            s = seqs[i][0]
            ids[r, : len(s)] = torch.tensor(s)
            att[r, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
        for r, i in enumerate(batch):
            s, n_cont = seqs[i]
            L = len(s)
            # continuation tokens are s[L-n_cont:L]; predicted at positions L-n_cont-1 .. L-2. Only those rows get the
            # float32 log-softmax (each position's is independent of the others: the same numbers as over the whole
            # batch, without a [batch, length, vocabulary] float32 copy)
            logp = torch.log_softmax(logits[r, L - n_cont - 1: L - 1].float(), dim=-1)
            tgt = ids[r, L - n_cont: L].to(device)
            tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double().cpu()
            out[i] = (float(tok_lp.sum()), n_cont)
    return out


@dataclass
class XcopaItem:
    id: str
    language: str
    label: int
    logprob: tuple[float, float]  # summed log-prob of choice 1, choice 2
    bytes: tuple[int, int]  # UTF-8 length of each continuation
    tokens: tuple[int, int]

    @property
    def predicted(self) -> int:
        return 0 if self.logprob[0] >= self.logprob[1] else 1

    @property
    def predicted_norm(self) -> int:
        a, b = (self.logprob[k] / max(1, self.bytes[k]) for k in (0, 1))
        return 0 if a >= b else 1

    @property
    def correct(self) -> bool:
        return self.predicted == self.label

    @property
    def correct_norm(self) -> bool:
        return self.predicted_norm == self.label


def score_xcopa(
    records: Sequence[PromptRecord], logprobs: Sequence[tuple[float, float]], tokens: Sequence[tuple[int, int]] | None = None,
) -> list[XcopaItem]:
    items = []
    for k, rec in enumerate(records):
        _, (c1, c2) = xcopa_texts(rec)
        label = int(rec.meta["label"])
        toks = tokens[k] if tokens is not None else (0, 0)
        items.append(XcopaItem(rec.id, rec.language, label, (float(logprobs[k][0]), float(logprobs[k][1])),
                               (len(c1.encode()), len(c2.encode())), toks))
    return items


def xcopa_logprobs(
    loaded: Any, records: Sequence[PromptRecord], *, batch_size: int = 8, progress: bool = False,
) -> tuple[list[tuple[float, float]], list[tuple[int, int]]]:
    """Summed log-probs (and token counts) of both choices for each record."""
    contexts, conts = [], []
    for rec in records:
        ctx, (c1, c2) = xcopa_texts(rec)
        contexts += [ctx, ctx]
        conts += [c1, c2]
    scores = continuation_logprobs(loaded, contexts, conts, batch_size=batch_size, progress=progress)
    lps = [(scores[2 * k][0], scores[2 * k + 1][0]) for k in range(len(records))]
    toks = [(scores[2 * k][1], scores[2 * k + 1][1]) for k in range(len(records))]
    return lps, toks


def xcopa_accuracy(
    loaded: Any, records: Sequence[PromptRecord], *, batch_size: int = 8, n_resamples: int = N_RESAMPLES,
    seed: int = 0, progress: bool = False,
) -> tuple[list[CapabilityCell], list[XcopaItem]]:
    """XCOPA accuracy per language (+ pooled `all`): `accuracy` = summed log-prob, `extra['acc_norm']`
    = per-byte log-prob (see the module docstring)."""
    lps, toks = xcopa_logprobs(loaded, records, batch_size=batch_size, progress=progress)
    items = score_xcopa(records, lps, toks)
    return xcopa_cells(items, n_resamples=n_resamples, seed=seed), items


def xcopa_cells(items: Sequence[XcopaItem], *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> list[CapabilityCell]:
    cells = accuracy_cells("xcopa", [(i.language, i.correct) for i in items], method="sum log-likelihood",
                           n_resamples=n_resamples, seed=seed)
    norm = {c.language: c for c in accuracy_cells("xcopa-norm", [(i.language, i.correct_norm) for i in items],
                                                  n_resamples=n_resamples, seed=seed)}
    for c in cells:
        c.extra["acc_norm"] = norm[c.language].accuracy
    return cells


__all__ = [
    "MGSM_INSTRUCTIONS", "XCOPA_CONNECTORS", "normalise_digits", "parse_number", "extract_answer", "answers_match",
    "mgsm_prompt", "score_mgsm", "mgsm_accuracy", "mgsm_cells", "MgsmItem", "xcopa_texts", "continuation_logprobs",
    "xcopa_logprobs", "score_xcopa", "xcopa_accuracy", "xcopa_cells", "XcopaItem", "Rate",
]
