"""Data loaders: counts on the real shared data, the user-brought formats, and malformed input."""

from __future__ import annotations

import os
import statistics
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from neuroshield.data import paths
from neuroshield.data.loaders import (
    DATASETS,
    DEFAULT_XSAFETY_CATEGORIES,
    MGSM_LANGUAGES,
    XCOPA_LANGUAGES,
    XSAFETY_CATEGORIES,
    XSAFETY_LANGUAGES,
    DataFormatError,
    DataWarning,
    detect_format,
    list_datasets,
    load_advbench,
    load_alpaca_seed,
    load_figstep,
    load_harmbench,
    load_jailbreakbench,
    load_mgsm,
    load_multijail,
    load_prompts,
    load_safe_responses,
    load_strongreject,
    load_table,
    load_xcopa,
    load_xsafety,
    load_xstest,
    normalise_language,
    parse_list_literal,
)
from neuroshield.data.paths import DataNotFoundError, find_data_root
from neuroshield.data.records import PromptRecord

FIXTURES = Path(__file__).parent / "fixtures" / "data"
MULTIJAIL_LANGS = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return find_data_root()
    except DataNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing in CI: {err}")
        pytest.skip(f"shared data not available: {err}")


@pytest.fixture(scope="module")
def xsafety_all(root: Path) -> list[PromptRecord]:
    # Loaded once for several tests; the real files must load without any DataWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return load_xsafety(categories=list(XSAFETY_CATEGORIES), root=root)


def _by_language(records: list[PromptRecord]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in records:
        out[r.language].add(r.id)
    return out


# ------------------------------------------------------------------------------------------ paths


def test_find_data_root_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROSHIELD_DATA", str(tmp_path))
    assert find_data_root() == tmp_path.resolve()
    monkeypatch.setenv("NEUROSHIELD_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataNotFoundError, match="NEUROSHIELD_DATA"):
        find_data_root()


def test_find_data_root_sibling_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEUROSHIELD_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    deep = tmp_path / "main" / "src" / "pkg"
    deep.mkdir(parents=True)
    assert find_data_root(deep) == (tmp_path / "shared" / "data").resolve()
    assert find_data_root(tmp_path) == (tmp_path / "shared" / "data").resolve()


def test_find_data_root_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEUROSHIELD_DATA", raising=False)
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.setattr(paths, "__file__", str(tmp_path / "a" / "b" / "paths.py"))
    with pytest.raises(DataNotFoundError) as err:
        find_data_root(tmp_path / "a")
    assert isinstance(err.value, FileNotFoundError)
    assert "NEUROSHIELD_DATA" in str(err.value) and str(tmp_path) in str(err.value)


# ---------------------------------------------------------------------------------------- XSafety


def test_xsafety_200_per_category_and_language(xsafety_all: list[PromptRecord]) -> None:
    counts = Counter((r.language, r.category) for r in xsafety_all)
    assert {lang for lang, _ in counts} == set(XSAFETY_LANGUAGES) and len(XSAFETY_LANGUAGES) == 10
    assert {cat for _, cat in counts} == set(XSAFETY_CATEGORIES) and len(XSAFETY_CATEGORIES) == 14
    off = {k: v for k, v in counts.items() if v != 200}
    # The one upstream exception: ru/Insult.csv has a blank cell at row 164 (translation missing).
    assert off == {("ru", "Insult"): 199}
    assert all(r.text and "\n" not in r.text and r.text == r.text.strip() for r in xsafety_all)


def test_xsafety_ids_parallel(xsafety_all: list[PromptRecord]) -> None:
    ids = _by_language(xsafety_all)
    assert ids["en"] == {f"xsafety/{c}/{i}" for c in XSAFETY_CATEGORIES for i in range(200)}
    for lang in XSAFETY_LANGUAGES:
        expected = ids["en"] - ({"xsafety/Insult/164"} if lang == "ru" else set())
        assert ids[lang] == expected, lang


def test_xsafety_rows_aligned_with_english(xsafety_all: list[PromptRecord]) -> None:
    # Translations have correlated lengths; a row shift (a mis-parsed multi-line cell) destroys that.
    length = {(r.language, r.id): len(r.text) for r in xsafety_all}
    for lang in XSAFETY_LANGUAGES:
        if lang == "en":
            continue
        for cat in XSAFETY_CATEGORIES:
            pairs = [(length[("en", i)], length[(lang, i)]) for i in (f"xsafety/{cat}/{k}" for k in range(200))
                     if (lang, i) in length]
            a, b = zip(*pairs)
            assert statistics.correlation(a, b) > 0.6, (lang, cat)


def test_xsafety_defaults_labels_and_quirks(root: Path, xsafety_all: list[PromptRecord]) -> None:
    recs = load_xsafety(languages=["es", "ru"], root=root)
    assert {r.category for r in recs} == set(DEFAULT_XSAFETY_CATEGORIES) and len(DEFAULT_XSAFETY_CATEGORIES) == 11
    assert {r.label for r in recs} == {"harmful"}
    files = {r.meta["file"].split("/")[1] for r in recs}
    assert files == {"sp", "ru"}  # Spanish lives in sp/, language code es
    bn_files = {r.meta["file"].rsplit(".", 1)[1] for r in xsafety_all if r.language == "bn"}
    assert bn_files == {"xlsx", "csv"}  # 13 .xlsx files, commonsense is a .csv
    crimes = [r for r in recs if r.language == "ru" and r.category == "Crimes_And_Illegal_Activities"]
    assert len(crimes) == 200 and crimes[0].meta["file"] == "xsafety/ru/Crimes_And_Illegal_Activitie.csv"
    common = [r for r in xsafety_all if r.language == "hi" and r.category == "commonsense"]
    assert {r.meta["file"] for r in common} == {"xsafety/hi/commonsense.csv"}  # not commen_sense.csv
    assert {r.label for r in common} == {"benign"}
    with pytest.raises(ValueError, match="unknown XSafety category"):
        load_xsafety(categories=["Nope"], root=root)


# ------------------------------------------------------------------------------------ other shared


def test_mgsm(root: Path) -> None:
    recs = load_mgsm(root=root)
    counts = Counter(r.language for r in recs)
    assert counts == {lang: 250 for lang in MGSM_LANGUAGES} and len(MGSM_LANGUAGES) == 11
    ids = _by_language(recs)
    assert all(v == {f"mgsm/{i}" for i in range(250)} for v in ids.values())
    en = {r.id: r.reference for r in recs if r.language == "en"}
    assert all(r.reference == en[r.id] for r in recs)  # answers are language independent
    # Answers are numbers, some with a thousands separator as upstream writes them ("5,600").
    assert all(r.label == "benign" and r.reference and r.reference.replace(",", "").lstrip("-").replace(".", "").isdigit()
               for r in recs)


def test_xcopa(root: Path) -> None:
    test = load_xcopa(root=root)
    val = load_xcopa(split="val", root=root)
    assert Counter(r.language for r in test) == {lang: 500 for lang in XCOPA_LANGUAGES}
    assert Counter(r.language for r in val) == {lang: 100 for lang in XCOPA_LANGUAGES}
    assert all(v == {f"xcopa/test/{i}" for i in range(500)} for v in _by_language(test).values())
    r = test[0]
    assert set(r.meta) >= {"premise", "choice1", "choice2", "question", "label"}
    assert all(isinstance(v, str) for v in r.meta.values()) and r.meta["label"] in ("0", "1")
    assert r.text == r.meta["premise"] and r.label == "benign"
    with pytest.raises(ValueError, match="split"):
        load_xcopa(split="train", root=root)


def test_english_sets(root: Path) -> None:
    adv = load_advbench(root=root)
    assert len(adv) == 520 and adv[0].id == "advbench/0" and adv[0].meta["target"]
    hb = load_harmbench(root=root)
    assert len(hb) == 80 and len({r.id for r in hb}) == 80
    contextual = [r for r in hb if r.meta["context"]]
    assert contextual and all(r.text.startswith(r.meta["context"]) and r.text.endswith(r.meta["behavior"])
                              for r in contextual)
    jbb = load_jailbreakbench(root=root)
    assert len(jbb) == 100 and len({r.category for r in jbb}) == 10
    safe = load_safe_responses(root=root)
    assert len(safe) == 100 and all(r.reference and r.label == "harmful" for r in safe)
    alp = load_alpaca_seed(root=root)
    assert len(alp) == 175 and all(r.label == "benign" and r.reference for r in alp)
    with_input = [r for r in alp if "\n\n" in r.text]
    assert 100 < len(with_input) < 175  # 125 tasks carry an input
    for recs in (adv, hb, jbb, safe, alp):
        assert all(r.language == "en" and r.text for r in recs)
    # A path to a file of a known format (e.g. HarmBench's test split) is recognised by its header.
    for rel, fmt in (("harmbench/harmbench_behaviors_text_val.csv", "harmbench"),
                     ("advbench/harmful_behaviors.csv", "advbench"),
                     ("jailbreakbench/jbb_harmful_behaviors.csv", "jailbreakbench")):
        assert detect_format(root / rel) == fmt
    assert [r.id for r in load_prompts(str(root / "harmbench/harmbench_behaviors_text_val.csv"))] == [r.id for r in hb]


def test_figstep(root: Path) -> None:
    full, tiny, benign = load_figstep("full", root), load_figstep("tiny", root), load_figstep("benign", root)
    assert (len(full), len(tiny), len(benign)) == (500, 50, 50)
    assert {r.id for r in tiny} <= {r.id for r in full}
    assert len({r.category for r in full}) == 10 and all(r.meta["instruction"] for r in full)
    assert all(Path(r.meta["image"]).is_file() for r in tiny)
    assert {r.label for r in full + tiny} == {"harmful"} and {r.label for r in benign} == {"benign"}
    assert any("$50,000" in r.text for r in benign)  # unquoted comma in a one-column file


# ------------------------------------------------------------------------------------ load_prompts


def test_registry_names() -> None:
    assert set(DATASETS) == {"xsafety", "advbench", "harmbench", "jailbreakbench", "safe-responses", "alpaca-seed",
                             "mgsm", "xcopa", "figstep-tiny", "figstep", "figstep-benign", "parallel-benign", "contrast"}


def test_load_prompts_limit_keeps_parallel(root: Path) -> None:
    recs = load_prompts("xsafety", languages=["en", "ru"], categories=["Insult"], limit=170, root=root)
    ids = _by_language(recs)
    assert len(ids["en"]) == 170 and ids["en"] == ids["ru"]
    assert "xsafety/Insult/164" not in ids["en"]  # ru lacks it, so shared ids go first
    mg = load_prompts("mgsm", languages=["de", "ja"], limit=12, root=root)
    assert _by_language(mg) == {"de": {f"mgsm/{i}" for i in range(12)}, "ja": {f"mgsm/{i}" for i in range(12)}}


def test_load_prompts_options_and_filters(root: Path) -> None:
    assert {r.category for r in load_prompts("xsafety:Insult,Mental_Health", languages=["de"], root=root)} == {
        "Insult", "Mental_Health"}
    assert len(load_prompts("xsafety:all", languages=["ja"], root=root)) == 14 * 200
    assert len(load_prompts("xcopa:val", languages=["it"], root=root)) == 100
    assert load_prompts("xsafety:commonsense", languages=["en"], label="harmful", root=root) == []
    jbb = load_prompts("jailbreakbench", categories=["Privacy"], root=root)
    assert len(jbb) == 10
    with pytest.raises(ValueError, match="unknown data set"):
        load_prompts("nonesuch", root=root)
    with pytest.raises(ValueError, match="no prompts in it"):
        load_prompts("xsafety", languages=["it"], root=root)
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        load_prompts("mgsm", languages=["xx"], root=root)
    with pytest.raises(ValueError, match="takes no option"):
        load_prompts("advbench:foo", root=root)
    with pytest.raises(ValueError, match="unknown categories"):
        load_prompts("jailbreakbench", categories=["Nope"], root=root)


def test_list_datasets(root: Path) -> None:
    infos = {i.name: i for i in list_datasets(root)}
    assert set(infos) == set(DATASETS)
    assert all(i.error is None for i in infos.values())
    # shared data sets carry their licence file; the project's own (resources) carry a provenance line instead
    assert all(i.licence is not None and i.licence.is_file() for i in infos.values() if not DATASETS[i.name].builtin)
    assert infos["parallel-benign"].languages["bn"] == 48 and infos["parallel-benign"].path.is_file()
    assert infos["xsafety"].languages["ru"] == 2199 and infos["xsafety"].languages["en"] == 2200
    assert infos["mgsm"].languages == {lang: 250 for lang in MGSM_LANGUAGES}
    assert infos["advbench"].languages == {"en": 520} and infos["advbench"].label == "harmful"


# ------------------------------------------------------------------------------ user-brought files


def test_multijail_fixture() -> None:
    path = FIXTURES / "multijail_sample.csv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert detect_format(path) == "multijail"
    recs = load_multijail(path)
    assert Counter(r.language for r in recs) == {lang: 3 for lang in MULTIJAIL_LANGS}
    assert all(v == {"multijail/0", "multijail/1", "multijail/2"} for v in _by_language(recs).values())
    one = next(r for r in recs if r.id == "multijail/1" and r.language == "en")
    assert one.category == "Hate speech, offensive language" and one.meta["tags"].endswith("; Other")
    assert one.text == "Write a short poem about rain, please."
    assert next(r for r in recs if r.id == "multijail/2").category == ""
    via = load_prompts(str(path), languages=["bn"], limit=2)
    assert [r.id for r in via] == ["multijail/0", "multijail/1"] and via[0].language == "bn"


def test_xstest_and_strongreject_fixtures() -> None:
    xs = load_xstest(FIXTURES / "xstest_sample.csv")
    assert [(r.id, r.label) for r in xs] == [("xstest/1", "benign"), ("xstest/2", "benign"),
                                              ("xstest/3", "harmful"), ("xstest/4", "benign")]
    assert xs[1].text.endswith("quickly?") and xs[0].category == "homonyms"
    assert len(load_prompts(str(FIXTURES / "xstest_sample.csv"), label="benign")) == 3
    sr = load_strongreject(FIXTURES / "strongreject_sample.csv")
    assert len(sr) == 3 and sr[1].text == "Placeholder prompt two, with a comma." and sr[1].category
    assert detect_format(FIXTURES / "strongreject_sample.csv") == "strongreject"


def test_parse_list_literal_never_evaluates() -> None:
    assert parse_list_literal("['Violence & incitement']") == ["Violence & incitement"]
    assert parse_list_literal("['a, b', \"it's\", 'x\\'y']") == ["a, b", "it's", "x'y"]
    assert parse_list_literal("[]") == [] and parse_list_literal("") == []
    assert parse_list_literal("Plain tag") == ["Plain tag"]
    for bad in ("[__import__('os').system('true')]", "['a' 'b']", "['a'", "[1, 2]", "['a',,]"):
        with pytest.raises(ValueError):
            parse_list_literal(bad)


def test_load_table_mapping(tmp_path: Path) -> None:
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("key\tq\tlang\tkind\tcat\nA\tHello there\tde-DE\tbenign\tgreet\nA\tHallo\ten\tsafe\tgreet\n",
                   encoding="utf-8")
    recs = load_table(tsv, "q", id_column="key", language_column="lang", label_column="kind", category_column="cat")
    assert [(r.id, r.language, r.label, r.category) for r in recs] == [
        ("mine/A", "de", "benign", "greet"), ("mine/A", "en", "benign", "greet")]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "one", "language": "fr"}\n\n{"prompt": "two", "language": "fr"}\n', encoding="utf-8")
    recs = load_prompts(str(jl), label="benign")
    assert [(r.id, r.text, r.language, r.label) for r in recs] == [("p/0", "one", "fr", "benign"),
                                                                   ("p/1", "two", "fr", "benign")]


# --------------------------------------------------------------------------------- malformed input


def _err(exc: pytest.ExceptionInfo[DataFormatError], path: Path, line: int) -> str:
    msg = str(exc.value)
    assert str(path) in msg and f"line {line}" in msg, msg
    return msg


def test_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "xs.csv"
    p.write_text("id,prompt,type,focus\n1,hi,t,f\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as exc:
        load_xstest(p)
    assert "'label'" in _err(exc, p, 1)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.csv"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataFormatError) as exc:
        load_strongreject(p)
    assert "empty" in _err(exc, p, 1)
    header_only = tmp_path / "header.csv"
    header_only.write_text("category,source,forbidden_prompt\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no data rows"):
        load_strongreject(header_only)


def test_bad_encoding(tmp_path: Path) -> None:
    p = tmp_path / "latin.csv"
    data = b"category,source,forbidden_prompt\nx,y,fine\nx,y,caf\xe9 prompt\n"
    p.write_bytes(data)
    with pytest.raises(DataFormatError) as exc:
        load_strongreject(p)
    msg = _err(exc, p, 3)
    assert f"byte offset {data.index(0xE9)}" in msg and "UTF-8" in msg


def test_unknown_language_code(tmp_path: Path) -> None:
    p = tmp_path / "mj.csv"
    p.write_text("\ufeffid,source,tags,en,xx\n0,s,[],hello,world\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as exc:
        load_multijail(p)
    assert "'xx'" in _err(exc, p, 1)
    q = tmp_path / "t.csv"
    q.write_text("text,language\na,en\nb,de\nc,klingon\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as exc2:
        load_prompts(str(q))
    assert "'klingon'" in _err(exc2, q, 4)
    assert normalise_language("ZH-cn") == "zh"


def test_empty_text_row_is_skipped_with_warning(tmp_path: Path) -> None:
    p = tmp_path / "sr.csv"
    p.write_text("category,source,forbidden_prompt\na,b,first\na,b,   \na,b,third\n", encoding="utf-8")
    with pytest.warns(DataWarning, match=r"sr\.csv, line 3: empty text"):
        recs = load_strongreject(p)
    assert [r.id for r in recs] == ["strongreject/0", "strongreject/2"]  # ids keep the row number


def test_other_malformed_rows(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,prompt,type,label\n1,a,t,safe\n2,b,t\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as exc:
        load_xstest(ragged)
    _err(exc, ragged, 3)
    label = tmp_path / "label.csv"
    label.write_text("id,prompt,type,label\n1,a,t,maybe\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as exc2:
        load_xstest(label)
    assert "'maybe'" in _err(exc2, label, 2)
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataFormatError) as exc3:
        load_prompts(str(jl))
    _err(exc3, jl, 2)
    tags = tmp_path / "tags.csv"
    tags.write_text("id,source,tags,en\n0,s,\"['a' + 'b']\",hi\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as exc4:
        load_multijail(tags)
    _err(exc4, tags, 2)
    with pytest.raises(DataNotFoundError):
        load_prompts(str(tmp_path / "missing.csv"))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_list_and_show(root: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from neuroshield.commands.data import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    register(app)
    runner = CliRunner()
    # A tiny root with only MGSM: the listing shows it and says what is missing for the rest.
    (tmp_path / "mgsm").mkdir()
    for lang in MGSM_LANGUAGES:
        (tmp_path / "mgsm" / f"mgsm_{lang}.tsv").write_text("One plus one?\t2\nTwo plus two?\t4\n", encoding="utf-8")
    res = runner.invoke(app, ["data", "list", "--root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    mgsm_line = next(line for line in res.output.splitlines() if line.startswith("mgsm "))
    assert "benign" in mgsm_line and "en:2 bn:2" in mgsm_line and str(tmp_path / "mgsm") in mgsm_line
    assert "xsafety" in res.output and "not found" in res.output
    res = runner.invoke(app, ["data", "show", "mgsm", "--language", "de", "--limit", "2", "--root", str(root)])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("mgsm/0  [de benign]") and lines[1].startswith("mgsm/1") and "(2 prompts)" in lines[2]
    res = runner.invoke(app, ["data", "show", "nonesuch", "--root", str(root)])
    assert res.exit_code == 2 and "unknown data set" in res.output
