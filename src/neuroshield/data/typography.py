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

Here: the style, the layout and drawing, and the records. Scripts and line breaking are in `writing`, fonts and
glyph coverage in `fonts`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from neuroshield.data.fonts import FontPlan, FontRun, FontSpec, font_plan, missing_glyphs, resolve_font, visual_order
from neuroshield.data.records import PromptRecord
from neuroshield.data.writing import Direction, break_atoms, char_script, detect_script, split_clusters
from neuroshield.io import atomic_write_bytes

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
# Pillow fonts and raqm
# ---------------------------------------------------------------------------------------------


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

    def __init__(self, plan: FontPlan, font_size: int, raqm: bool) -> None:
        self.plan = plan
        self.font_size = font_size
        self.raqm = raqm
        self._widths: dict[str, float] = {}

    def font(self, spec: FontSpec) -> AnyFont:
        return _load_font(spec.path, spec.index, self.font_size, self.raqm)

    def shaping_kwargs(self, run: FontRun) -> dict[str, str]:
        return _shaping_kwargs(self.font(run.font), run.direction, self.plan.language)

    def run_width(self, run: FontRun) -> float:
        return float(self.font(run.font).getlength(run.text, **self.shaping_kwargs(run)))

    def width(self, line: str) -> float:
        if line not in self._widths:
            self._widths[line] = sum(self.run_width(r) for r in self.plan.runs(line))
        return self._widths[line]

    def run_ink(self, run: FontRun) -> tuple[float, float, float, float]:
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
    for atom in break_atoms(paragraph):
        if measure((current + atom).rstrip()) <= width:
            current += atom
            continue
        if measure(atom.rstrip()) <= width:
            if current.strip():
                lines.append(current.rstrip())
            current = atom
            continue
        for cluster in split_clusters(atom):
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
    plan: FontPlan,
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
    placed: list[tuple[str, list[tuple[FontRun, float, float]], float, _Box]] = []
    for text in logical:
        runs = visual_order(plan.runs(text), plan.rtl)
        widths = [measurer.run_width(r) for r in runs]
        line_width = sum(widths)
        x = size - style.margin_right - line_width if plan.rtl else float(style.margin_left)
        items: list[tuple[FontRun, float, float]] = []
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
    plan = font_plan(text, language)
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
    return any(char_script(ch) not in simple | {"common", "inherited"} for ch in text)


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
