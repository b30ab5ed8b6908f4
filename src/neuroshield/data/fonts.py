"""Fonts for the typographic images: the installed font per script (Noto from Debian `fonts-noto-core` and
`fonts-noto-cjk`, FreeMonoBold for Latin as FigStep), which glyphs a font has, and a text split into runs of
one font each (per-character fallback where the main font lacks a glyph)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

from neuroshield.data.writing import (
    CJK_SCRIPTS,
    RTL_SCRIPTS,
    Direction,
    char_script,
    cjk_face_for,
    detect_script,
    split_clusters,
)

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
        if script in CJK_SCRIPTS:
            family = ("Noto Serif CJK " if "Serif" in file_name else "Noto Sans CJK ") + cjk_face
            index = _collection_index(path, family)
        return FontSpec(path=path, index=index, package=package)
    return None


def resolve_font(script: str, language: str = "", text: str = "") -> FontSpec | None:
    """The installed font for `script` (None when none of its candidates is installed).

    For Chinese/Japanese/Korean the face of the Noto CJK collection follows the language and the
    text (kana -> JP, hangul -> KR, zh-TW -> TC, zh -> SC).
    """
    face = cjk_face_for(language, text) if script in CJK_SCRIPTS else ""
    return _resolve_font(script, face)


def font_or_default(script: str, language: str, text: str) -> FontSpec:
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


@dataclass(frozen=True)
class FontRun:
    text: str
    font: FontSpec
    direction: Direction


@dataclass(frozen=True)
class FontPlan:
    """How to pick fonts for one text: the main font and a per-script resolver for the rest."""

    primary: FontSpec
    primary_script: str
    language: str
    cjk_face: str
    rtl: bool

    def script_font(self, script: str) -> FontSpec | None:
        if script == self.primary_script:
            return self.primary
        return _resolve_font(script, self.cjk_face if script in CJK_SCRIPTS else "")

    def font_for(self, ch: str, current: FontSpec | None) -> FontSpec:
        script = char_script(ch)
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
            return font_or_default(script, self.language, ch)  # warns: the font is missing
        return self.primary  # nothing has it: draw the main font's .notdef box

    def runs(self, line: str) -> list[FontRun]:
        """Split a line into same-font runs, in logical order."""
        pieces: list[tuple[str, FontSpec]] = []
        for cluster in split_clusters(line):
            current = pieces[-1][1] if pieces else None
            spec = self.font_for(cluster[0], current)
            # A cluster's marks must stay in its base's font: if that one lacks them, move the
            # whole cluster to a font that has all of it.
            if not all(_covers(spec, ch) for ch in cluster[1:]):
                spec = next(
                    (
                        s
                        for s in (self.script_font(char_script(cluster[0])), self.primary)
                        if s is not None and all(_covers(s, ch) for ch in cluster)
                    ),
                    spec,
                )
            if pieces and pieces[-1][1] == spec:
                pieces[-1] = (pieces[-1][0] + cluster, spec)
            else:
                pieces.append((cluster, spec))
        return [FontRun(text, spec, self._direction(text)) for text, spec in pieces]

    def _direction(self, text: str) -> Direction:
        scripts = {char_script(ch) for ch in text}
        if scripts & RTL_SCRIPTS:
            return "rtl"
        strong_ltr = scripts - RTL_SCRIPTS - {"common", "inherited"}
        return "rtl" if self.rtl and not strong_ltr else "ltr"


def font_plan(text: str, language: str) -> FontPlan:
    script = detect_script(text, language)
    face = cjk_face_for(language, text)
    primary = font_or_default(script, language, text)
    return FontPlan(
        primary=primary,
        primary_script=script,
        language=language,
        cjk_face=face,
        rtl=script in RTL_SCRIPTS,
    )


def visual_order(runs: list[FontRun], rtl_paragraph: bool) -> list[FontRun]:
    """Order runs left to right: consecutive runs against the paragraph direction keep their
    order among themselves; the groups are reversed in a right-to-left paragraph. (A shortcut for
    the full bidi algorithm that is right for one level of embedding.)"""
    groups: list[list[FontRun]] = []
    for run in runs:
        if groups and groups[-1][0].direction == run.direction:
            groups[-1].append(run)
        else:
            groups.append([run])
    if rtl_paragraph:
        groups.reverse()
    ordered: list[FontRun] = []
    for group in groups:
        ordered += reversed(group) if group[0].direction == "rtl" else group
    return ordered
