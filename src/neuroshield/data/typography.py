"""FigStep-style typographic images: a prompt rendered as large black text on a white square.

FigStep (ThuCCSLab/FigStep) turns a request into a statement ("Steps to do X."), draws it in
FreeMonoBold 80 at (20, 10) on a 760x760 white image, wrapped at 15 characters, with 11 px between
lines, followed by "1.", "2.", "3." on their own lines. The text prompt is then a neutral
instruction asking the model to fill in the list. For English this module reproduces the upstream
images pixel for pixel (except where upstream cut the list off at the bottom: we shrink the font).

For other languages it picks a font per script (Noto fonts from Debian `fonts-noto-core` and
`fonts-noto-cjk`), falls back per character to another font when the main one lacks a glyph
(e.g. Thai and Hebrew fonts have no ASCII digits), shapes complex scripts with raqm, right-aligns
right-to-left text, wraps by rendered width (at spaces; between characters for Chinese and
Japanese; at words from libthai's dictionary for Thai, else between characters) and shrinks the
font until everything fits inside the canvas.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import hashlib
import io
import os
import re
import shutil
import subprocess
import unicodedata
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, features

from neuroshield.data.records import PromptRecord
from neuroshield.io import atomic_write_bytes

Direction = Literal["ltr", "rtl"]
_Box = tuple[float, float, float, float]  # left, top, right, bottom
AnyFont = ImageFont.FreeTypeFont | ImageFont.TransposedFont | ImageFont.ImageFont

__all__ = [
    "FontSpec",
    "TypographyStyle",
    "TextRun",
    "TextLine",
    "TypographicLayout",
    "detect_script",
    "resolve_font",
    "missing_glyphs",
    "layout_typographic",
    "draw_layout",
    "render_typographic",
    "render_prompt_records",
]


# ---------------------------------------------------------------------------------------------
# Style
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TypographyStyle:
    """Layout constants. The defaults are FigStep's (measured against its published images)."""

    font_size: int = 80  # starting size; shrunk when the text does not fit
    min_font_size: int = 10
    margin_left: int = 20  # FigStep draws at x=20 ...
    margin_right: int = 20  # ... and wraps at 15 FreeMono cells = 720 px, so 20 px stay free
    margin_top: int = 10  # FigStep draws at y=10 (top of the ascender)
    margin_bottom: int = 5  # ink must end this far above the bottom edge
    ascent: float = 0.8  # nominal ascent / font size (FreeMono's), puts the first baseline at y=74
    line_spacing: float = 11 / 80  # extra space between lines / font size (FigStep: 11 px at 80)
    # Least blank space between the ink of two lines / font size. 3 px at 80 keeps any ASCII text
    # in FreeMonoBold (ink from -56 to +16) at exactly FigStep's pitch.
    min_line_gap: float = 0.04
    steps: int = 3  # "1.", "2.", "3." appended after the statement
    background: str = "#FFFFFF"
    foreground: str = "#000000"


# ---------------------------------------------------------------------------------------------
# Scripts
# ---------------------------------------------------------------------------------------------

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

_RTL_SCRIPTS = frozenset({"arabic", "hebrew", "syriac", "thaana"})
_CJK_SCRIPTS = frozenset({"han", "kana", "hangul"})
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
def _char_script(ch: str) -> str:
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
        script = _char_script(ch)
        if script not in ("common", "inherited"):
            counts[script] = counts.get(script, 0) + 1
    if not counts:
        return _LANGUAGE_SCRIPT.get(_language_base(language), "latin")
    if "kana" in counts and "han" in counts:
        counts["kana"] += counts.pop("han")
    return max(counts, key=lambda s: counts[s])  # max keeps the first of equal counts


def _cjk_face(language: str, text: str) -> str:
    """Which face of the Noto CJK collection to use: SC, TC, HK, JP or KR."""
    scripts = {_char_script(ch) for ch in text}
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


# ---------------------------------------------------------------------------------------------
# Fonts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FontSpec:
    """One font face: a file (and face index in a .ttc collection). `path` None = Pillow default."""

    path: str | None
    index: int = 0
    package: str = ""  # the Debian package that ships it (for messages)

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "Pillow default"


def _noto(name: str) -> tuple[str, ...]:
    return (
        f"NotoSans{name}-Bold.ttf",
        f"NotoSans{name}-Regular.ttf",
        f"NotoSerif{name}-Bold.ttf",
        f"NotoSerif{name}-Regular.ttf",
    )


_MONO_FILES = (
    "FreeMonoBold.ttf",  # FigStep's font
    "NotoSansMono-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "NotoSansMono-Regular.ttf",
    "DejaVuSansMono.ttf",
    "FreeMono.ttf",
)
_CJK_FILES = ("NotoSansCJK-Bold.ttc", "NotoSansCJK-Regular.ttc", "NotoSerifCJK-Bold.ttc")

# Script -> (font files in order of preference, Debian package of the first one). Bold first:
# FigStep's text is bold.
_SCRIPT_FONTS: dict[str, tuple[tuple[str, ...], str]] = {
    "latin": (_MONO_FILES, "fonts-freefont-ttf"),
    "greek": (_MONO_FILES, "fonts-freefont-ttf"),
    "cyrillic": (_MONO_FILES, "fonts-freefont-ttf"),
    "arabic": (
        (
            "NotoSansArabic-Bold.ttf",
            "NotoNaskhArabic-Bold.ttf",
            "NotoSansArabic-Regular.ttf",
            "NotoNaskhArabic-Regular.ttf",
        ),
        "fonts-noto-core",
    ),
    "han": (_CJK_FILES, "fonts-noto-cjk"),
    "kana": (_CJK_FILES, "fonts-noto-cjk"),
    "hangul": (_CJK_FILES, "fonts-noto-cjk"),
    **{
        script: (_noto(noto_name), "fonts-noto-core")
        for script, noto_name in {
            "armenian": "Armenian",
            "hebrew": "Hebrew",
            "syriac": "Syriac",
            "thaana": "Thaana",
            "devanagari": "Devanagari",
            "bengali": "Bengali",
            "gurmukhi": "Gurmukhi",
            "gujarati": "Gujarati",
            "oriya": "Oriya",
            "tamil": "Tamil",
            "telugu": "Telugu",
            "kannada": "Kannada",
            "malayalam": "Malayalam",
            "sinhala": "Sinhala",
            "thai": "Thai",
            "lao": "Lao",
            "tibetan": "Tibetan",
            "myanmar": "Myanmar",
            "georgian": "Georgian",
            "ethiopic": "Ethiopic",
            "khmer": "Khmer",
        }.items()
    },
}

_FONT_DIRS = (
    "/usr/share/fonts/truetype/freefont",
    "/usr/share/fonts/truetype/noto",
    "/usr/share/fonts/opentype/noto",
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/opentype/freefont",
)


@functools.lru_cache(maxsize=1)
def _fc_list_files() -> dict[str, str]:
    """File name -> path for every font fontconfig knows (empty without fc-list)."""
    exe = shutil.which("fc-list")
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, ":", "file"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    files: dict[str, str] = {}
    for line in sorted(out.splitlines()):  # sorted: the same choice on every run
        path = line.strip().rstrip(":").strip()
        if path:
            files.setdefault(Path(path).name, path)
    return files


@functools.lru_cache(maxsize=None)
def _find_font_file(file_name: str) -> str | None:
    """Path of a font file: the known Debian directories first, then fontconfig."""
    for directory in _FONT_DIRS:
        path = os.path.join(directory, file_name)
        if os.path.isfile(path):
            return path
    return _fc_list_files().get(file_name)


@functools.lru_cache(maxsize=None)
def _collection_index(path: str, family: str) -> int:
    """Index of the face named `family` in a .ttc collection (0 when not found)."""
    if not path.lower().endswith((".ttc", ".otc")):
        return 0
    for index in range(64):
        try:
            name = ImageFont.truetype(path, 12, index=index).getname()[0]
        except OSError:
            break
        if name == family:
            return index
    return 0


@functools.lru_cache(maxsize=None)
def _resolve_font(script: str, cjk_face: str) -> FontSpec | None:
    files, package = _SCRIPT_FONTS.get(script, _SCRIPT_FONTS["latin"])
    for file_name in files:
        path = _find_font_file(file_name)
        if path is None:
            continue
        index = 0
        if script in _CJK_SCRIPTS:
            family = ("Noto Serif CJK " if "Serif" in file_name else "Noto Sans CJK ") + cjk_face
            index = _collection_index(path, family)
        return FontSpec(path=path, index=index, package=package)
    return None


def resolve_font(script: str, language: str = "", text: str = "") -> FontSpec | None:
    """The installed font for `script` (None when none of its candidates is installed).

    For Chinese/Japanese/Korean the face of the Noto CJK collection follows the language and the
    text (kana -> JP, hangul -> KR, zh-TW -> TC, zh -> SC).
    """
    face = _cjk_face(language, text) if script in _CJK_SCRIPTS else ""
    return _resolve_font(script, face)


def _font_or_default(script: str, language: str, text: str) -> FontSpec:
    spec = resolve_font(script, language, text)
    if spec is not None:
        return spec
    files, package = _SCRIPT_FONTS.get(script, _SCRIPT_FONTS["latin"])
    warnings.warn(
        f"No font for {script} text (looked for {', '.join(files[:2])}); install the Debian "
        f"package {package} (apt-get install {package}). Falling back to Pillow's default font, "
        f"which lacks most non-Latin glyphs.",
        stacklevel=3,
    )
    return FontSpec(path=None, package=package)


@functools.lru_cache(maxsize=1)
def _raqm_available() -> bool:
    return bool(features.check_feature("raqm"))


def _warn_no_raqm() -> None:
    warnings.warn(
        "Pillow has no raqm text layout (install the Debian package libraqm0); Arabic, Hebrew and "
        "Indic scripts will render unshaped and right-to-left text in the wrong order.",
        stacklevel=3,
    )


@functools.lru_cache(maxsize=256)
def _load_font(path: str | None, index: int, size: int, raqm: bool) -> AnyFont:
    if path is None:
        return ImageFont.load_default(size=size)
    engine = ImageFont.Layout.RAQM if raqm else ImageFont.Layout.BASIC
    return ImageFont.truetype(path, size, index=index, layout_engine=engine)


# ----- glyph coverage -----


def _is_invisible(ch: str) -> bool:
    """Characters that need no glyph of their own: spaces, controls, joiners, selectors."""
    cp = ord(ch)
    return (
        ch.isspace()
        or unicodedata.category(ch) in ("Cc", "Cf")
        or 0xFE00 <= cp <= 0xFE0F
        or 0xE0100 <= cp <= 0xE01EF
    )


@functools.lru_cache(maxsize=64)
def _cmap(path: str, index: int) -> frozenset[int] | None:
    """Code points mapped by the font's cmap (None when fontTools is not installed)."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError:
        return None
    font = TTFont(path, fontNumber=index, lazy=True)
    try:
        cmap = font.getBestCmap() or {}
        return frozenset(cmap)
    finally:
        font.close()


@functools.lru_cache(maxsize=64)
def _notdef_mask(path: str, index: int) -> tuple[tuple[int, int], bytes]:
    font = ImageFont.truetype(path, 32, index=index, layout_engine=ImageFont.Layout.BASIC)
    mask = font.getmask(chr(0x10FFFD))  # private use, plane 16: no font maps it -> .notdef
    return mask.size, bytes(mask)


@functools.lru_cache(maxsize=65536)
def _has_glyph(path: str, index: int, ch: str) -> bool:
    cmap = _cmap(path, index)
    if cmap is not None:
        return ord(ch) in cmap
    # Without fontTools: a character the font lacks renders as .notdef, i.e. the same bitmap.
    font = ImageFont.truetype(path, 32, index=index, layout_engine=ImageFont.Layout.BASIC)
    mask = font.getmask(ch)
    return (mask.size, bytes(mask)) != _notdef_mask(path, index)


def _covers(spec: FontSpec, ch: str) -> bool:
    return spec.path is None or _is_invisible(ch) or _has_glyph(spec.path, spec.index, ch)


def missing_glyphs(text: str, font_path: str | os.PathLike[str], *, index: int = 0) -> list[str]:
    """Characters of `text` that the font cannot draw, in order of first appearance.

    Reads the font's cmap with fontTools when installed; otherwise compares each character's
    bitmap with the font's .notdef box. Spaces, control and format characters (ZWJ, ZWNJ, bidi
    marks) and variation selectors need no glyph and are never reported.
    """
    path = os.fspath(font_path)
    seen: list[str] = []
    for ch in text:
        if ch not in seen and not _is_invisible(ch) and not _has_glyph(path, index, ch):
            seen.append(ch)
    return seen


# ---------------------------------------------------------------------------------------------
# Clusters, break opportunities and font runs
# ---------------------------------------------------------------------------------------------


def _clusters(text: str) -> list[str]:
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
    if any(ch in _NEEDS_FINAL for ch in prev) and _char_script(nxt[0]) == "thai":
        return False  # a short vowel (ั, ็) is always closed by the next consonant: "ปั|ง" is wrong
    if any(_char_script(c[0]) in _UNSPACED_SCRIPTS or _is_cjk_punct(c[0]) for c in (prev, nxt)):
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


def _atoms(paragraph: str) -> list[str]:
    """Split a paragraph at its break opportunities; each atom keeps its trailing spaces.

    Thai breaks at word boundaries from libthai's dictionary when available, else between
    clusters."""
    clusters = _clusters(paragraph)
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


@dataclass(frozen=True)
class _Run:
    text: str
    font: FontSpec
    direction: Direction


@dataclass(frozen=True)
class _FontPlan:
    """How to pick fonts for one text: the main font and a per-script resolver for the rest."""

    primary: FontSpec
    primary_script: str
    language: str
    cjk_face: str
    rtl: bool

    def script_font(self, script: str) -> FontSpec | None:
        if script == self.primary_script:
            return self.primary
        return _resolve_font(script, self.cjk_face if script in _CJK_SCRIPTS else "")

    def font_for(self, ch: str, current: FontSpec | None) -> FontSpec:
        script = _char_script(ch)
        if script in ("common", "inherited"):
            # Spaces, digits and punctuation go with the main font so that they follow the
            # paragraph's direction; a Latin word's font keeps them only if the main one lacks them.
            first = (self.primary, current)
        else:
            first = (self.script_font(script), self.primary)
        for spec in first:
            if spec is not None and _covers(spec, ch):
                return spec
        for fallback in ("latin", "han"):  # resolved lazily: only texts that need them warn
            spec = self.script_font(fallback)
            if spec is not None and _covers(spec, ch):
                return spec
        if script not in ("common", "inherited") and self.script_font(script) is None:
            return _font_or_default(script, self.language, ch)  # warns: the font is missing
        return self.primary  # nothing has it: draw the main font's .notdef box

    def runs(self, line: str) -> list[_Run]:
        """Split a line into same-font runs, in logical order."""
        pieces: list[tuple[str, FontSpec]] = []
        for cluster in _clusters(line):
            current = pieces[-1][1] if pieces else None
            spec = self.font_for(cluster[0], current)
            # A cluster's marks must stay in its base's font: if that one lacks them, move the
            # whole cluster to a font that has all of it.
            if not all(_covers(spec, ch) for ch in cluster[1:]):
                spec = next(
                    (
                        s
                        for s in (self.script_font(_char_script(cluster[0])), self.primary)
                        if s is not None and all(_covers(s, ch) for ch in cluster)
                    ),
                    spec,
                )
            if pieces and pieces[-1][1] == spec:
                pieces[-1] = (pieces[-1][0] + cluster, spec)
            else:
                pieces.append((cluster, spec))
        return [_Run(text, spec, self._direction(text)) for text, spec in pieces]

    def _direction(self, text: str) -> Direction:
        scripts = {_char_script(ch) for ch in text}
        if scripts & _RTL_SCRIPTS:
            return "rtl"
        strong_ltr = scripts - _RTL_SCRIPTS - {"common", "inherited"}
        return "rtl" if self.rtl and not strong_ltr else "ltr"


def _make_plan(text: str, language: str) -> _FontPlan:
    script = detect_script(text, language)
    face = _cjk_face(language, text)
    primary = _font_or_default(script, language, text)
    return _FontPlan(
        primary=primary,
        primary_script=script,
        language=language,
        cjk_face=face,
        rtl=script in _RTL_SCRIPTS,
    )


def _visual_order(runs: list[_Run], rtl_paragraph: bool) -> list[_Run]:
    """Order runs left to right: consecutive runs against the paragraph direction keep their
    order among themselves; the groups are reversed in a right-to-left paragraph. (A shortcut for
    the full bidi algorithm that is right for one level of embedding.)"""
    groups: list[list[_Run]] = []
    for run in runs:
        if groups and groups[-1][0].direction == run.direction:
            groups[-1].append(run)
        else:
            groups.append([run])
    if rtl_paragraph:
        groups.reverse()
    ordered: list[_Run] = []
    for group in groups:
        ordered += reversed(group) if group[0].direction == "rtl" else group
    return ordered


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextRun:
    """A piece of one line drawn with one font. `x` is the left end of its advance box."""

    text: str
    font: FontSpec
    direction: Direction
    x: float
    width: float


@dataclass(frozen=True)
class TextLine:
    """One line: runs in visual (left-to-right) order on a common baseline."""

    text: str  # logical order
    runs: tuple[TextRun, ...]
    baseline: float
    width: float
    ink: tuple[float, float, float, float]  # left, top, right, bottom in image pixels


@dataclass(frozen=True)
class TypographicLayout:
    """Where every run goes. `fits` is False only when even `min_font_size` overflows."""

    size: int
    font_size: int
    language: str
    direction: Direction
    lines: tuple[TextLine, ...]
    fits: bool
    primary_font: FontSpec
    style: TypographyStyle = field(default_factory=TypographyStyle)


class _Measurer:
    """Widths and ink boxes at one font size; memoised for the duration of one layout."""

    def __init__(self, plan: _FontPlan, font_size: int, raqm: bool) -> None:
        self.plan = plan
        self.font_size = font_size
        self.raqm = raqm
        self._widths: dict[str, float] = {}

    def font(self, spec: FontSpec) -> AnyFont:
        return _load_font(spec.path, spec.index, self.font_size, self.raqm)

    def shaping_kwargs(self, run: _Run) -> dict[str, str]:
        return _shaping_kwargs(self.font(run.font), run.direction, self.plan.language)

    def run_width(self, run: _Run) -> float:
        return float(self.font(run.font).getlength(run.text, **self.shaping_kwargs(run)))

    def width(self, line: str) -> float:
        if line not in self._widths:
            self._widths[line] = sum(self.run_width(r) for r in self.plan.runs(line))
        return self._widths[line]

    def run_ink(self, run: _Run) -> tuple[float, float, float, float]:
        """Ink box of a run relative to (left of advance box, baseline)."""
        if not run.text.strip():
            return (0.0, 0.0, 0.0, 0.0)
        box = self.font(run.font).getbbox(run.text, anchor="ls", **self.shaping_kwargs(run))
        return tuple(float(v) for v in box)  # type: ignore[return-value]


def _wrap_paragraph(paragraph: str, width: float, measure: Callable[[str], float]) -> list[str]:
    """Greedy fill by rendered width. An atom wider than a whole line is cut at cluster
    boundaries, starting on the current line (as textwrap does with long words)."""
    lines: list[str] = []
    current = ""
    for atom in _atoms(paragraph):
        if measure((current + atom).rstrip()) <= width:
            current += atom
            continue
        if measure(atom.rstrip()) <= width:
            if current.strip():
                lines.append(current.rstrip())
            current = atom
            continue
        for cluster in _clusters(atom):
            if not current.strip() or measure((current + cluster).rstrip()) <= width:
                current = current + cluster if current.strip() else cluster.lstrip()
            else:
                lines.append(current.rstrip())
                current = cluster.lstrip()
    if current.strip() or not lines:
        lines.append(current.rstrip())
    return lines


def _paragraphs(text: str, steps: int, add_numbered_list: bool) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ").strip()
    paragraphs = [p.strip() for p in text.split("\n")] if text else []
    if add_numbered_list:
        paragraphs += [f"{i}." for i in range(1, steps + 1)]
    return paragraphs


def _layout_at(
    paragraphs: list[str],
    plan: _FontPlan,
    size: int,
    font_size: int,
    style: TypographyStyle,
    raqm: bool,
) -> tuple[tuple[TextLine, ...], bool]:
    measurer = _Measurer(plan, font_size, raqm)
    avail = size - style.margin_left - style.margin_right
    logical: list[str] = []
    for paragraph in paragraphs:
        logical += _wrap_paragraph(paragraph, avail, measurer.width) if paragraph else [""]

    ascent = round(style.ascent * font_size)
    pitch = ascent + round(style.line_spacing * font_size)
    placed: list[tuple[str, list[tuple[_Run, float, float]], float, _Box]] = []
    for text in logical:
        runs = _visual_order(plan.runs(text), plan.rtl)
        widths = [measurer.run_width(r) for r in runs]
        line_width = sum(widths)
        x = size - style.margin_right - line_width if plan.rtl else float(style.margin_left)
        items: list[tuple[_Run, float, float]] = []
        left, top, right, bottom = float("inf"), 0.0, float("-inf"), 0.0
        for run, w in zip(runs, widths):
            items.append((run, x, w))
            if run.text.strip():
                l, t, r, b = measurer.run_ink(run)
                left, right = min(left, x + l), max(right, x + r)
                top, bottom = min(top, t), max(bottom, b)
            x += w
        if left == float("inf"):
            left = right = float(style.margin_left)
        placed.append((text, items, line_width, (left, top, right, bottom)))

    # One pitch for the whole image: FigStep's, or more when the tallest ink of the text (Thai
    # stacked marks, Arabic, CJK) would otherwise come closer than `min_line_gap` to the next line.
    gap = round(style.min_line_gap * font_size)
    inked = [ink for text, _, _, ink in placed if text.strip()]
    if inked:
        pitch = max(pitch, max(ink[3] for ink in inked) - min(ink[1] for ink in inked) + gap)
    lines: list[TextLine] = []
    baseline = 0.0
    for i, (text, items, line_width, (left, top, right, bottom)) in enumerate(placed):
        # FigStep puts the top of the ascender at margin_top; taller ink pushes the text down.
        baseline = style.margin_top + max(ascent, -top) if i == 0 else baseline + pitch
        runs = tuple(
            TextRun(text=run.text, font=run.font, direction=run.direction, x=x, width=w)
            for run, x, w in items
        )
        ink = (left, baseline + top, right, baseline + bottom)
        lines.append(TextLine(text=text, runs=runs, baseline=baseline, width=line_width, ink=ink))

    fits = all(
        line.ink[0] >= 0
        and line.ink[2] <= size
        and line.ink[1] >= 0
        and line.ink[3] <= size - style.margin_bottom
        and line.width <= avail + 1e-6
        for line in lines
    )
    return tuple(lines), fits


def layout_typographic(
    text: str,
    language: str,
    *,
    size: int = 760,
    font_size: int | None = None,
    add_numbered_list: bool = True,
    style: TypographyStyle | None = None,
) -> TypographicLayout:
    """Plan a FigStep-style image: wrap, pick fonts and shrink the font until the text fits.

    The font starts at `font_size` (default `style.font_size`); when the text would overflow the
    `size` x `size` canvas, the largest smaller size that fits is found by bisection.
    """
    style = style or TypographyStyle()
    start = int(font_size or style.font_size)
    plan = _make_plan(text, language)
    raqm = _raqm_available()
    if not raqm and _needs_shaping(text):
        _warn_no_raqm()
    paragraphs = _paragraphs(text, style.steps, add_numbered_list)

    def attempt(fs: int) -> tuple[tuple[TextLine, ...], bool]:
        return _layout_at(paragraphs, plan, size, fs, style, raqm)

    chosen = start
    lines, fits = attempt(start)
    floor = min(style.min_font_size, start)
    if not fits and start > floor:
        low_lines, low_fits = attempt(floor)
        if not low_fits:
            chosen, lines, fits = floor, low_lines, False
        else:
            low, high = floor, start  # low fits, high does not
            best = low_lines
            while high - low > 1:
                mid = (low + high) // 2
                mid_lines, mid_fits = attempt(mid)
                if mid_fits:
                    low, best = mid, mid_lines
                else:
                    high = mid
            chosen, lines, fits = low, best, True
    if not fits:
        warnings.warn(
            f"Text does not fit a {size}x{size} image even at font size {chosen}; it is clipped.",
            stacklevel=2,
        )
    return TypographicLayout(
        size=size,
        font_size=chosen,
        language=language,
        direction="rtl" if plan.rtl else "ltr",
        lines=lines,
        fits=fits,
        primary_font=plan.primary,
        style=style,
    )


def _shaping_kwargs(font: AnyFont, direction: Direction, language: str) -> dict[str, str]:
    """Direction and language for raqm; Pillow refuses them for fonts laid out without raqm
    (also Pillow's default font)."""
    if getattr(font, "layout_engine", None) != ImageFont.Layout.RAQM:
        return {}
    kwargs = {"direction": direction}
    if language:
        kwargs["language"] = language
    return kwargs


def _needs_shaping(text: str) -> bool:
    simple = {"latin", "greek", "cyrillic", "armenian", "georgian", "han", "kana", "hangul"}
    return any(_char_script(ch) not in simple | {"common", "inherited"} for ch in text)


def draw_layout(layout: TypographicLayout) -> Image.Image:
    """Draw a layout onto a new RGB image."""
    style = layout.style
    image = Image.new("RGB", (layout.size, layout.size), style.background)
    draw = ImageDraw.Draw(image)
    raqm = _raqm_available()
    for line in layout.lines:
        for run in line.runs:
            if not run.text.strip():
                continue
            font = _load_font(run.font.path, run.font.index, layout.font_size, raqm)
            kwargs = _shaping_kwargs(font, run.direction, layout.language)
            draw.text(
                (run.x, line.baseline),
                run.text,
                font=font,
                fill=style.foreground,
                anchor="ls",
                **kwargs,
            )
    return image


def render_typographic(
    text: str,
    language: str,
    *,
    size: int = 760,
    font_size: int | None = None,
    add_numbered_list: bool = True,
    style: TypographyStyle | None = None,
) -> Image.Image:
    """Render `text` FigStep-style into a `size` x `size` RGB image.

    Deterministic: the same arguments (and the same fonts and Pillow) give the same pixels.
    `language` is an ISO 639-1 code (optionally with a region, e.g. "zh-TW"); it picks the CJK
    face and is passed to the shaper, while the fonts follow the scripts found in the text.
    With `add_numbered_list`, "1.", "2.", "3." (`style.steps`) follow on their own lines.
    """
    layout = layout_typographic(
        text,
        language,
        size=size,
        font_size=font_size,
        add_numbered_list=add_numbered_list,
        style=style,
    )
    return draw_layout(layout)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def _safe_name(record_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._")[:80] or "record"
    if safe != record_id:  # sanitising may map two ids to one name: keep them apart
        safe += "-" + hashlib.sha1(record_id.encode("utf-8")).hexdigest()[:8]
    return safe


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a
    file; leave an identical existing file untouched (its mtime too)."""
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def render_prompt_records(
    records: Iterable[PromptRecord],
    out_dir: str | os.PathLike[str],
    language: str | None = None,
    *,
    size: int = 760,
    style: TypographyStyle | None = None,
) -> list[PromptRecord]:
    """Turn text records into FigStep-style image records.

    Each text record's `text` is rendered into `out_dir/<safe id>_<record language>.png`; the new
    record has modality "image", `image` set to that path, `text` set to the neutral instruction
    `neuroshield.data.templates.image_instruction(language or record.language)`, and the
    rendered text kept in `meta["image_text"]`. Its `language` stays the record's (the language of
    the request). Records that are already images pass through unchanged. Files are rewritten only
    when their bytes would change.
    """
    from neuroshield.data.templates import image_instruction  # written in parallel; import late

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: list[PromptRecord] = []
    for record in records:
        if record.modality != "text":
            result.append(record)
            continue
        image = render_typographic(record.text, record.language, size=size, style=style)
        path = out / f"{_safe_name(record.id)}_{_safe_name(record.language)}.png"
        _write_atomic(path, _png_bytes(image))
        result.append(
            replace(
                record,
                modality="image",
                image=str(path),
                text=image_instruction(language or record.language),
                meta={**record.meta, "image_text": record.text},
            )
        )
    return result
