"""FigStep-style typographic images: parity with upstream, scripts, wrapping, RTL, records."""

from __future__ import annotations

import csv
import io
import os
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont, features

from neuroshield.data import fonts, writing
from neuroshield.data import typography as ty
from neuroshield.data.records import PromptRecord
from neuroshield.data.typography import (
    TypographyStyle,
    layout_typographic,
    missing_glyphs,
    render_prompt_records,
    render_typographic,
    resolve_font,
)

SIZE = 760
STYLE = TypographyStyle()

# Harmless statements in the FigStep form ("Steps to bake bread at home.").
SAMPLES: dict[str, tuple[str, str, str]] = {
    # language: (text, script, expected font file prefix)
    "bn": ("বাড়িতে রুটি বানানোর ধাপসমূহ।", "bengali", "NotoSansBengali"),
    "th": ("ขั้นตอนการอบขนมปังที่บ้าน.", "thai", "NotoSansThai"),
    "ar": ("خطوات خبز الخبز في المنزل.", "arabic", "NotoSansArabic"),
    "zh": ("在家烤面包的步骤。", "han", "NotoSansCJK"),
    "hi": ("घर पर रोटी पकाने के चरण।", "devanagari", "NotoSansDevanagari"),
    "ja": ("家でパンを焼く手順。", "kana", "NotoSansCJK"),
    "ko": ("집에서 빵을 굽는 단계.", "hangul", "NotoSansCJK"),
    "ru": ("Шаги выпечки хлеба дома.", "cyrillic", "FreeMonoBold"),
    "he": ("שלבים לאפיית לחם בבית.", "hebrew", "NotoSansHebrew"),
    "ta": ("வீட்டில் ரொட்டி சுடுவதற்கான படிகள்.", "tamil", "NotoSansTamil"),
}
CJK_FACE = {"zh": "Noto Sans CJK SC", "ja": "Noto Sans CJK JP", "ko": "Noto Sans CJK KR"}

needs_raqm = pytest.mark.skipif(
    not features.check_feature("raqm"),
    reason="Pillow without raqm (apt-get install libraqm0): complex scripts are not shaped",
)


def ink(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) < 128


def ink_box(image: Image.Image) -> tuple[int, int, int, int]:
    """left, top, right, bottom (inclusive) of the dark pixels."""
    rows, cols = np.nonzero(ink(image))
    assert rows.size, "no ink at all"
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


def pooled(mask: np.ndarray, cell: int = 4) -> np.ndarray:
    """Ink mask max-pooled into cell x cell blocks: tolerates anti-aliasing and 1-3 px shifts."""
    h, w = mask.shape
    cropped = mask[: h - h % cell, : w - w % cell]
    return cropped.reshape(h // cell, cell, w // cell, cell).any(axis=(1, 3))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two pooled ink masks."""
    return float((a & b).sum() / (a | b).sum())


def require_font(script: str, prefix: str, language: str, text: str) -> ty.FontSpec:
    spec = resolve_font(script, language, text)
    if spec is None or spec.path is None or not Path(spec.path).name.startswith(prefix):
        package = fonts._SCRIPT_FONTS[script][1]
        pytest.skip(f"{prefix} is not installed (apt-get install {package})")
    return spec


# ---------------------------------------------------------------------------------------------
# Parity with the upstream FigStep images
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def figstep_pairs() -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(task key, instruction, our pooled ink mask, upstream's) for the 50 SafeBench-Tiny rows."""
    from neuroshield.data.paths import DataNotFoundError, find_data_root

    try:
        root = find_data_root() / "figstep"
    except DataNotFoundError as err:
        pytest.skip(f"shared data not found: {err}")
    csv_path, image_dir = root / "SafeBench-Tiny.csv", root / "reference-images"
    if not csv_path.is_file() or not image_dir.is_dir():
        pytest.skip(f"FigStep SafeBench-Tiny not found under {root}")
    if not (resolve_font("latin") or ty.FontSpec(None)).name.startswith("FreeMonoBold"):
        pytest.skip("FreeMonoBold is not installed (apt-get install fonts-freefont-ttf)")
    pairs = []
    with csv_path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            key = f"{row['category_id']}_{row['task_id']}"
            reference = Image.open(image_dir / f"query_{row['dataset']}_{key}_6.png")
            ours = render_typographic(row["instruction"], "en")
            pairs.append((key, row["instruction"], pooled(ink(ours)), pooled(ink(reference))))
    assert len(pairs) == 50
    return pairs


def test_english_matches_upstream_figstep_images(figstep_pairs) -> None:
    matched = np.array([similarity(o, r) for _, _, o, r in figstep_pairs])
    # Control: our rendering against the *next* row's reference (often the same category and
    # the same first words, "Steps to ..."), so similar layout but different text.
    n = len(figstep_pairs)
    control = np.array(
        [similarity(figstep_pairs[i][2], figstep_pairs[(i + 1) % n][3]) for i in range(n)]
    )
    # Upstream never shrinks: texts with 11 lines lose "3." below the canvas. We shrink instead,
    # so these rows cannot match (SafeBench-Tiny: one row, 7_3).
    overflow = np.array(
        [len(textwrap.wrap(text, 15)) + 3 > 10 for _, text, _, _ in figstep_pairs]
    )
    assert overflow.sum() <= 2
    fitting = matched[~overflow]
    # Measured (Pillow 13, Debian fonts): all 49 fitting rows score 1.000 (pixel-identical up to
    # anti-aliasing); control min 0.17, median 0.35, max 0.59 (any other row: max 0.69).
    assert fitting.min() >= 0.97, sorted(zip(fitting.round(3), [k for k, *_ in figstep_pairs]))[:3]
    assert np.median(matched) >= 0.99
    assert control.max() <= 0.8
    assert fitting.min() - control.max() >= 0.3
    # Paired: each rendering is closer to its own reference than to the next one.
    assert np.all(matched[~overflow] > control[~overflow])


def test_english_wrapping_equals_figstep_textwrap(figstep_pairs) -> None:
    """Wrapping by rendered width at FigStep's font reproduces its 15-character textwrap."""
    for _, text, _, _ in figstep_pairs:
        layout = layout_typographic(text, "en")
        if layout.font_size != STYLE.font_size:
            continue  # shrunk (upstream overflowed)
        lines = [line.text for line in layout.lines]
        assert lines == textwrap.wrap(text, 15) + ["1.", "2.", "3."]


def test_overflowing_text_is_shrunk_to_fit() -> None:
    text = "Methods to do something with a rather long explanation of many different words. " * 2
    layout = layout_typographic(text, "en")
    assert layout.fits and layout.font_size < STYLE.font_size
    left, top, right, bottom = ink_box(render_typographic(text, "en"))
    assert left >= 0 and top >= 0 and right < SIZE and bottom < SIZE - STYLE.margin_bottom
    assert [line.text for line in layout.lines][-3:] == ["1.", "2.", "3."]


# ---------------------------------------------------------------------------------------------
# Scripts and fonts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", sorted(SAMPLES))
def test_languages_render_without_missing_glyphs(language: str) -> None:
    text, script, prefix = SAMPLES[language]
    spec = require_font(script, prefix, language, text)
    assert ty.detect_script(text, language) == script
    layout = layout_typographic(text, language)
    assert layout.primary_font == spec
    assert layout.fits and layout.font_size == STYLE.font_size
    drawn = ""
    for line in layout.lines:
        for run in line.runs:
            assert run.font.path is not None, f"{run.text!r} fell back to Pillow's default font"
            assert missing_glyphs(run.text, run.font.path, index=run.font.index) == [], run
            drawn += run.text
    # Everything but spaces is drawn, with the script's own font for the script's letters.
    assert sorted(drawn.replace(" ", "")) == sorted((text + "1.2.3.").replace(" ", ""))
    first = layout.lines[0].runs
    assert any(Path(r.font.path or "").name.startswith(prefix) for r in first)
    if language in CJK_FACE:
        face = ImageFont.truetype(spec.path, 20, index=spec.index).getname()[0]
        assert face == CJK_FACE[language]
    left, top, right, bottom = ink_box(render_typographic(text, language))
    assert left >= 0 and top >= 0 and right < SIZE and bottom < SIZE


def test_missing_glyphs_reports_uncovered_characters() -> None:
    mono = resolve_font("latin")
    thai = resolve_font("thai")
    if mono is None or thai is None or mono.path is None or thai.path is None:
        pytest.skip("fonts not installed (apt-get install fonts-freefont-ttf fonts-noto-core)")
    assert missing_glyphs("Steps ก ข.", mono.path) == ["ก", "ข"]
    assert missing_glyphs("ขั้นตอน", thai.path) == []
    assert missing_glyphs("1.", thai.path) == ["1", "."]  # why digits need a fallback font
    assert missing_glyphs("a \u200d\t\n", mono.path) == []  # invisible characters never count


def test_missing_glyphs_without_fonttools(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Pillow fallback (compare with the .notdef bitmap) agrees with the cmap."""
    thai = resolve_font("thai")
    if thai is None or thai.path is None:
        pytest.skip("Noto Sans Thai not installed (apt-get install fonts-noto-core)")
    monkeypatch.setattr(fonts, "_cmap", lambda path, index: None)
    fonts._has_glyph.cache_clear()
    try:
        assert missing_glyphs("ขั้นตอน 1.", thai.path) == ["1", "."]
    finally:
        fonts._has_glyph.cache_clear()


def test_missing_font_falls_back_with_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    real = fonts._resolve_font
    monkeypatch.setattr(
        fonts, "_resolve_font", lambda script, face: None if script == "thai" else real(script, face)
    )
    with pytest.warns(UserWarning, match="fonts-noto-core"):
        layout = layout_typographic("ขั้นตอนการอบขนมปัง", "th")
        image = render_typographic("ขั้นตอนการอบขนมปัง", "th")
    assert layout.primary_font.path is None
    assert ink(image).any()


def test_script_detection_uses_the_text_not_only_the_language() -> None:
    assert ty.detect_script("Steps to bake bread.", "ar") == "latin"
    assert ty.detect_script("خطوات", "en") == "arabic"
    assert ty.detect_script("1. 2.", "th") == "thai"  # no letters: the language decides
    assert ty.detect_script("日本語のテキスト", "zh") == "kana"  # kana makes it Japanese
    assert writing.cjk_face_for("zh-TW", "麵包") == "TC"
    assert writing.cjk_face_for("ko", "麵包") == "KR"


# ---------------------------------------------------------------------------------------------
# Determinism, wrapping, right-to-left
# ---------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "text,language",
    [("Steps to bake bread at home.", "en"), (SAMPLES["ar"][0], "ar"), (SAMPLES["ja"][0], "ja")],
)
def test_rendering_is_deterministic(text: str, language: str) -> None:
    assert png_bytes(render_typographic(text, language)) == png_bytes(
        render_typographic(text, language)
    )


WRAP_CASES = {
    "en": "Steps to " + "supercalifragilistic" * 3 + " and more words to wrap around.",
    "zh": "在家烤面包的步骤以及准备面粉酵母和水的方法和需要注意的事项。",
    "th": "ขั้นตอนการอบขนมปังที่บ้านอย่างละเอียดสำหรับผู้เริ่มต้นทุกคน",
    "ja": "家でパンを焼くための詳しい手順と、材料を準備する方法。",
}


@pytest.mark.parametrize("language", sorted(WRAP_CASES))
def test_wrapping_keeps_ink_inside_the_canvas(language: str) -> None:
    text = WRAP_CASES[language]
    layout = layout_typographic(text, language)
    avail = SIZE - STYLE.margin_left - STYLE.margin_right
    statement = [line for line in layout.lines if line.text not in ("1.", "2.", "3.")]
    assert len(statement) >= 3, [line.text for line in statement]  # no spaces needed to wrap
    assert "".join(line.text for line in statement).replace(" ", "") == text.replace(" ", "")
    assert all(line.width <= avail for line in layout.lines)
    if language in ("zh", "ja"):
        kinsoku = "、。，"
        assert not any(line.text[0] in kinsoku for line in statement[1:])
    if language == "th":  # never between a consonant and its marks
        assert not any(unicode_mark(line.text[0]) for line in statement[1:])
    left, top, right, bottom = ink_box(render_typographic(text, language))
    assert left >= 0 and top >= 0 and right < SIZE and bottom < SIZE


def test_thai_wraps_at_word_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    text = WRAP_CASES["th"]
    require_font("thai", "NotoSansThai", "th", text)
    if writing._libthai() is None:
        pytest.skip("libthai not installed (apt-get install libthai0): Thai breaks between clusters")
    words = writing._thai_word_breaks(text)
    assert words  # the dictionary finds words in a run without spaces
    lines = [line.text for line in layout_typographic(text, "th", add_numbered_list=False).lines]
    ends = np.cumsum([len(line) for line in lines])[:-1]
    assert len(lines) >= 3 and all(int(end) in words for end in ends), lines
    # Without libthai: still wrapped, never before a mark.
    monkeypatch.setattr(writing, "_thai_word_breaks", lambda run: None)
    lines = [line.text for line in layout_typographic(text, "th", add_numbered_list=False).lines]
    assert "".join(lines) == text and len(lines) >= 3
    assert not any(unicode_mark(line[0]) for line in lines[1:])


def unicode_mark(ch: str) -> bool:
    import unicodedata

    return unicodedata.category(ch).startswith("M")


def test_wrapping_breaks_at_spaces_by_width() -> None:
    text = "aaaa bbbb cccc dddd eeee ffff gggg hhhh"
    layout = layout_typographic(text, "en", add_numbered_list=False)
    assert [line.text for line in layout.lines] == ["aaaa bbbb cccc", "dddd eeee ffff", "gggg hhhh"]
    # A smaller font fits more per line: wrapping follows the rendered width.
    small = layout_typographic(text, "en", font_size=40, add_numbered_list=False)
    assert len(small.lines) < len(layout.lines)


@needs_raqm
def test_arabic_is_right_aligned_and_shaped() -> None:
    text = SAMPLES["ar"][0]
    spec = require_font("arabic", "NotoSansArabic", "ar", text)
    layout = layout_typographic(text, "ar")
    assert layout.direction == "rtl"
    for line in layout.lines:
        assert line.ink[2] == pytest.approx(SIZE - STYLE.margin_right, abs=12), line
    left, _, right, _ = ink_box(render_typographic("خطوات.", "ar", add_numbered_list=False))
    assert left > SIZE / 2 and right > SIZE - STYLE.margin_right - 12
    # Shaped: joined forms make "بببب" much narrower than four isolated "ب".
    font = ImageFont.truetype(spec.path, 80, layout_engine=ImageFont.Layout.RAQM)
    isolated = font.getlength("ب", direction="rtl")
    assert font.getlength("بببب", direction="rtl") < 0.8 * 4 * isolated
    basic = ImageFont.truetype(spec.path, 80, layout_engine=ImageFont.Layout.BASIC)
    assert bytes(font.getmask("خطوات", direction="rtl")) != bytes(basic.getmask("خطوات"))


def test_without_raqm_warns_and_still_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ty, "_raqm_available", lambda: False)
    with pytest.warns(UserWarning, match="libraqm0"):
        image = render_typographic(SAMPLES["ar"][0], "ar")
    assert ink(image).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Latin needs no shaping: no warning
        render_typographic("Steps to bake bread.", "en")


@needs_raqm
def test_mixed_rtl_line_keeps_latin_left_to_right() -> None:
    require_font("arabic", "NotoSansArabic", "ar", "خطوات")
    layout = layout_typographic("خطوات SQL أخرى", "ar", add_numbered_list=False)
    runs = layout.lines[0].runs
    # Visual order, left to right: the later Arabic word, then SQL, then the first word.
    assert [r.direction for r in runs] == ["rtl", "ltr", "rtl"]
    assert runs[1].text == "SQL" and runs[2].text.strip() == "خطوات"
    assert runs[0].x < runs[1].x < runs[2].x


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def stub_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = types.ModuleType("neuroshield.data.templates")
    stub.image_instruction = lambda language: f"<fill the list: {language}>"  # type: ignore
    monkeypatch.setitem(sys.modules, "neuroshield.data.templates", stub)


def test_render_prompt_records(tmp_path: Path, stub_templates: None) -> None:
    records = [
        PromptRecord(id="figstep/1_1", text="Steps to bake bread.", language="en", label="benign"),
        PromptRecord(id="figstep:1_1", text="Steps to bake bread.", language="en", label="benign"),
        PromptRecord(
            id="x2", text=SAMPLES["bn"][0], language="bn", label="harmful", meta={"k": "v"}
        ),
        PromptRecord(id="x3", text="ignored", language="en", label="benign", modality="image"),
    ]
    out = render_prompt_records(records, tmp_path / "img")
    assert len(out) == 4 and out[3] is records[3]
    paths = [Path(r.image or "") for r in out[:3]]
    assert len(set(paths)) == 3  # ids that sanitise alike still get their own file
    for record, new, path in zip(records, out, paths):
        assert path.is_file() and path.parent == tmp_path / "img"
        assert path.name.endswith(f"_{record.language}.png")
        assert new.modality == "image" and new.id == record.id and new.label == record.label
        assert new.language == record.language
        assert new.text == f"<fill the list: {record.language}>"
        assert new.meta["image_text"] == record.text
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE)
    assert out[2].meta["k"] == "v"
    assert not list((tmp_path / "img").glob("*.tmp"))

    # Unchanged images are not rewritten; the instruction language can be overridden.
    old = 1_000_000_000
    os.utime(paths[0], ns=(old, old))
    again = render_prompt_records(records[:1], tmp_path / "img", language="de")
    assert again[0].text == "<fill the list: de>" and again[0].image == str(paths[0])
    assert paths[0].stat().st_mtime_ns == old


def test_render_prompt_records_with_real_templates(tmp_path: Path) -> None:
    try:
        from neuroshield.data.templates import image_instruction  # noqa: F401
    except ImportError:
        pytest.skip("neuroshield.data.templates.image_instruction is not written yet")
    record = PromptRecord(id="r1", text="Steps to bake bread.", language="en", label="benign")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # English must not need any fallback
        (new,) = render_prompt_records([record], tmp_path)
    assert new.text.strip() and new.modality == "image" and Path(new.image or "").is_file()
