"""Writing systems for the typographic images: which script a text is in, the clusters a line never breaks
inside, and where a line may break (spaces; between characters in Chinese and Japanese; Thai words from
libthai's dictionary)."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import re
import unicodedata
from typing import Literal

Direction = Literal["ltr", "rtl"]


# (first, last, script) code point ranges; anything else is "common" (digits, punctuation,
# spaces, symbols) or "inherited" (combining marks), which take the font of their neighbours.
_SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = tuple(
    sorted(
        [
            (0x0041, 0x005A, "latin"),
            (0x0061, 0x007A, "latin"),
            (0x00AA, 0x00AA, "latin"),
            (0x00BA, 0x00BA, "latin"),
            (0x00C0, 0x00D6, "latin"),
            (0x00D8, 0x00F6, "latin"),
            (0x00F8, 0x024F, "latin"),
            (0x0250, 0x02AF, "latin"),
            (0x1E00, 0x1EFF, "latin"),
            (0x2C60, 0x2C7F, "latin"),
            (0xA720, 0xA7FF, "latin"),
            (0xAB30, 0xAB6F, "latin"),
            (0x0370, 0x03FF, "greek"),
            (0x1F00, 0x1FFF, "greek"),
            (0x0400, 0x052F, "cyrillic"),
            (0x1C80, 0x1C8F, "cyrillic"),
            (0x2DE0, 0x2DFF, "cyrillic"),
            (0xA640, 0xA69F, "cyrillic"),
            (0x0530, 0x058F, "armenian"),
            (0x0590, 0x05FF, "hebrew"),
            (0xFB1D, 0xFB4F, "hebrew"),
            (0x0600, 0x06FF, "arabic"),
            (0x0750, 0x077F, "arabic"),
            (0x0870, 0x08FF, "arabic"),
            (0xFB50, 0xFDFF, "arabic"),
            (0xFE70, 0xFEFF, "arabic"),
            (0x0700, 0x074F, "syriac"),
            (0x0780, 0x07BF, "thaana"),
            (0x0900, 0x0963, "devanagari"),
            (0x0966, 0x097F, "devanagari"),  # U+0964/5 (danda) are shared by all Indic scripts
            (0xA8E0, 0xA8FF, "devanagari"),
            (0x0980, 0x09FF, "bengali"),
            (0x0A00, 0x0A7F, "gurmukhi"),
            (0x0A80, 0x0AFF, "gujarati"),
            (0x0B00, 0x0B7F, "oriya"),
            (0x0B80, 0x0BFF, "tamil"),
            (0x0C00, 0x0C7F, "telugu"),
            (0x0C80, 0x0CFF, "kannada"),
            (0x0D00, 0x0D7F, "malayalam"),
            (0x0D80, 0x0DFF, "sinhala"),
            (0x0E00, 0x0E7F, "thai"),
            (0x0E80, 0x0EFF, "lao"),
            (0x0F00, 0x0FFF, "tibetan"),
            (0x1000, 0x109F, "myanmar"),
            (0x10A0, 0x10FF, "georgian"),
            (0x1C90, 0x1CBF, "georgian"),
            (0x1100, 0x11FF, "hangul"),
            (0x3130, 0x318F, "hangul"),
            (0xA960, 0xA97F, "hangul"),
            (0xAC00, 0xD7FF, "hangul"),
            (0x1200, 0x139F, "ethiopic"),
            (0x1780, 0x17FF, "khmer"),
            (0x19E0, 0x19FF, "khmer"),
            (0x2E80, 0x2FDF, "han"),
            (0x3005, 0x3007, "han"),
            (0x3021, 0x3029, "han"),
            (0x3100, 0x312F, "han"),  # bopomofo: same fonts
            (0x3400, 0x4DBF, "han"),
            (0x4E00, 0x9FFF, "han"),
            (0xF900, 0xFAFF, "han"),
            (0x20000, 0x3134F, "han"),
            (0x3040, 0x309F, "kana"),
            (0x30A0, 0x30FF, "kana"),
            (0x31F0, 0x31FF, "kana"),
            (0xFF66, 0xFF9F, "kana"),
        ]
    )
)


_RANGE_STARTS = tuple(r[0] for r in _SCRIPT_RANGES)


RTL_SCRIPTS = frozenset({"arabic", "hebrew", "syriac", "thaana"})


CJK_SCRIPTS = frozenset({"han", "kana", "hangul"})


# Scripts written without spaces between words: a line may break between any two clusters.
_UNSPACED_SCRIPTS = frozenset({"han", "kana", "thai", "lao", "khmer", "myanmar", "tibetan"})


# Script of a language, used only when the text itself has no letters (e.g. "1.").
_LANGUAGE_SCRIPT: dict[str, str] = {
    "ar": "arabic", "fa": "arabic", "ur": "arabic", "ps": "arabic", "he": "hebrew", "yi": "hebrew",
    "hi": "devanagari", "mr": "devanagari", "ne": "devanagari", "sa": "devanagari",
    "bn": "bengali", "as": "bengali", "pa": "gurmukhi", "gu": "gujarati", "or": "oriya",
    "ta": "tamil", "te": "telugu", "kn": "kannada", "ml": "malayalam", "si": "sinhala",
    "th": "thai", "lo": "lao", "bo": "tibetan", "my": "myanmar", "km": "khmer", "ka": "georgian",
    "hy": "armenian", "am": "ethiopic", "ti": "ethiopic", "zh": "han", "ja": "kana", "ko": "hangul",
    "ru": "cyrillic", "uk": "cyrillic", "bg": "cyrillic", "sr": "cyrillic", "mk": "cyrillic",
    "be": "cyrillic", "kk": "cyrillic", "el": "greek",
}  # fmt: skip


# Characters that never start a new cluster after these: viramas (they join consonants into
# conjuncts) and the zero-width joiners.
_JOINING = frozenset(
    "\u094d\u09cd\u0a4d\u0acd\u0b4d\u0bcd\u0c4d\u0ccd\u0d4d\u0dca\u1039\u17d2\u200c\u200d"
)


# Thai/Lao vowels written before the consonant they follow in speech: glue them to the next one.
_LEADING_VOWELS = frozenset("\u0e40\u0e41\u0e42\u0e43\u0e44\u0ec0\u0ec1\u0ec2\u0ec3\u0ec4")


# Spacing Thai/Lao vowel signs (category Lo) that belong to the preceding consonant.
_TRAILING_VOWELS = frozenset("\u0e30\u0e32\u0e33\u0e45\u0eb0\u0eb2\u0eb3")


# Thai marks of short vowels that need a final consonant: keep that consonant on the line.
_NEEDS_FINAL = frozenset("\u0e31\u0e47")


# Japanese/Chinese line-breaking rules (kinsoku): no line starts/ends with these (plus Thai ๆ).
_NO_BREAK_BEFORE = frozenset(
    "ๆ、。，．,.!?！？：；:;)）]］}｝」』】〉》〕〙〗〛ゝゞーぁぃぅぇぉっゃゅょゎァィゥェォッャュョヮヵヶ・…‥%％"
)


_NO_BREAK_AFTER = frozenset("(（[［{｛「『【〈《〔〘〖〚")


@functools.lru_cache(maxsize=8192)
def char_script(ch: str) -> str:
    """Script of one character: a name from _SCRIPT_RANGES, "inherited" (marks) or "common"."""
    cp = ord(ch)
    i = bisect.bisect_right(_RANGE_STARTS, cp) - 1
    if i >= 0 and _SCRIPT_RANGES[i][0] <= cp <= _SCRIPT_RANGES[i][1]:
        return _SCRIPT_RANGES[i][2]
    if unicodedata.category(ch).startswith("M"):
        return "inherited"
    return "common"


def _language_base(language: str) -> str:
    return language.strip().replace("_", "-").lower().split("-")[0]


def detect_script(text: str, language: str = "") -> str:
    """The dominant script of `text` ("latin", "arabic", "han", "kana", "hangul", "thai", ...).

    Counts letters per script; ties go to the script seen first. "kana" wins over "han" as soon as
    there is any kana (Japanese mixes both). Text without letters falls back to the language's
    script, then to "latin".
    """
    counts: dict[str, int] = {}
    for ch in text:
        script = char_script(ch)
        if script not in ("common", "inherited"):
            counts[script] = counts.get(script, 0) + 1
    if not counts:
        return _LANGUAGE_SCRIPT.get(_language_base(language), "latin")
    if "kana" in counts and "han" in counts:
        counts["kana"] += counts.pop("han")
    return max(counts, key=lambda s: counts[s])  # max keeps the first of equal counts


def cjk_face_for(language: str, text: str) -> str:
    """Which face of the Noto CJK collection to use: SC, TC, HK, JP or KR."""
    scripts = {char_script(ch) for ch in text}
    if "kana" in scripts:
        return "JP"
    if "hangul" in scripts:
        return "KR"
    tag = language.strip().replace("_", "-").lower()
    base = tag.split("-")[0]
    if base == "ja":
        return "JP"
    if base == "ko":
        return "KR"
    if base == "zh" or base == "yue":
        if "hk" in tag.split("-") or base == "yue":
            return "HK"
        if any(part in ("tw", "hant", "mo") for part in tag.split("-")):
            return "TC"
    return "SC"


def split_clusters(text: str) -> list[str]:
    """Split into units a line may never break inside: a base with its marks, conjuncts, Thai
    leading vowels with their consonant. (A cheap approximation of grapheme clusters.)"""
    out: list[str] = []
    for ch in text:
        glue = bool(out) and not ch.isspace() and (
            unicodedata.category(ch).startswith("M")
            or ch in _JOINING
            or ch in _TRAILING_VOWELS
            or 0xFE00 <= ord(ch) <= 0xFE0F
            or out[-1][-1] in _JOINING
            or out[-1][-1] in _LEADING_VOWELS
        )
        if glue:
            out[-1] += ch
        else:
            out.append(ch)
    return out


def _break_between(prev: str, nxt: str, before_prev: str) -> bool:
    """May a line break between clusters `prev` and `nxt`?"""
    if prev.isspace():
        return not nxt.isspace()  # after a run of spaces (the spaces stay on the old line)
    if nxt.isspace():
        return False
    if prev == "-" and before_prev[-1:].isalnum() and nxt[0].isalpha():
        return True  # "self-|harm", as textwrap (and so FigStep) does
    if any(ch in _NEEDS_FINAL for ch in prev) and char_script(nxt[0]) == "thai":
        return False  # a short vowel (ั, ็) is always closed by the next consonant: "ปั|ง" is wrong
    if any(char_script(c[0]) in _UNSPACED_SCRIPTS or _is_cjk_punct(c[0]) for c in (prev, nxt)):
        return nxt[0] not in _NO_BREAK_BEFORE and prev[-1] not in _NO_BREAK_AFTER
    return False


def _is_cjk_punct(ch: str) -> bool:
    return 0x3000 <= ord(ch) <= 0x303F or 0xFF00 <= ord(ch) <= 0xFFEF


@functools.lru_cache(maxsize=1)
def _libthai() -> tuple[ctypes.CDLL, int] | None:
    """libthai (Debian libthai0, a Pango dependency) and a word breaker with its dictionary."""
    name = ctypes.util.find_library("thai") or "libthai.so.0"
    try:
        lib = ctypes.CDLL(name)
        lib.th_brk_new.restype = ctypes.c_void_p
        lib.th_brk_new.argtypes = [ctypes.c_char_p]
        lib.th_brk_find_breaks.restype = ctypes.c_int
        lib.th_brk_find_breaks.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_size_t,
        ]
    except (OSError, AttributeError):
        return None
    breaker = lib.th_brk_new(None)
    return (lib, breaker) if breaker else None


@functools.lru_cache(maxsize=4096)
def _thai_word_breaks(run: str) -> frozenset[int] | None:
    """Offsets inside a run of Thai letters where words end (None without libthai)."""
    found = _libthai()
    if found is None:
        return None
    try:
        data = run.encode("tis-620")  # one byte per character: byte offsets are char offsets
    except UnicodeEncodeError:
        return None
    lib, breaker = found
    positions = (ctypes.c_int * (len(data) + 1))()
    count = lib.th_brk_find_breaks(breaker, data, positions, len(data) + 1)
    return frozenset(positions[i] for i in range(max(count, 0)))


def _thai_breaks(paragraph: str) -> dict[int, bool]:
    """Offset -> may break there, for every offset strictly inside a run of Thai letters, when
    libthai can segment the run into words. Offsets not in the dict follow the generic rules."""
    allowed: dict[int, bool] = {}
    for match in re.finditer(r"[\u0e01-\u0e4e]+", paragraph):
        breaks = _thai_word_breaks(match.group())
        if breaks is None:
            continue
        for offset in range(1, len(match.group())):
            allowed[match.start() + offset] = offset in breaks
    return allowed


def break_atoms(paragraph: str) -> list[str]:
    """Split a paragraph at its break opportunities; each atom keeps its trailing spaces.

    Thai breaks at word boundaries from libthai's dictionary when available, else between
    clusters."""
    clusters = split_clusters(paragraph)
    thai = _thai_breaks(paragraph) if any("\u0e01" <= ch <= "\u0e4e" for ch in paragraph) else {}
    atoms: list[str] = []
    current = ""
    offset = 0
    for i, cluster in enumerate(clusters):
        if current:
            before = clusters[i - 2] if i > 1 else ""
            may_break = thai.get(offset)
            if may_break is None:
                may_break = _break_between(clusters[i - 1], cluster, before)
            if may_break:
                atoms.append(current)
                current = ""
        current += cluster
        offset += len(cluster)
    if current:
        atoms.append(current)
    return atoms
