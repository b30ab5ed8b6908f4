"""Shared helpers of the benchmark scripts: machine info, interleaved timing, prompts, memory, results.

Every benchmark writes `benchmarks/results/<name>.json` and refreshes its own section of
`benchmarks/RESULTS.md` (between `<!-- BEGIN <name> -->` and `<!-- END <name> -->`), so the scripts
can run in any order and any one can be rerun alone.

Timing on a shared machine: absolute times are noisy, so every comparison is measured as A,B,A,B,...
in one run and reported as the median of the per-pair ratios B/A (each pair is seconds apart, so a
load spike hits both sides of a pair more or less equally). `os.getloadavg()` is recorded with every
measurement.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
REPO = BENCH_DIR.parent

# Sections of RESULTS.md, in display order (a section not yet measured shows as "not run yet").
SECTIONS = ("stats_overhead", "stats_memory", "plnd_vs_ablation", "train_step", "generation", "train_gpu", "dtype", "memory",
            "generation_plain", "demo_dtype")

MD_HEADER = """# Benchmark results

Every figure below was produced by the script named in its section, with the exact command shown;
rerun it to refresh the section (see `benchmarks/README.md`). Each section records the machine it ran
on (CPU model from `/proc/cpuinfo`, cores, torch version), the load average while it ran, and the
date (UTC). The machines are shared: absolute times are noisy, so comparisons are measured
interleaved (A, B, A, B, ...) in one run and reported as the median of the per-pair ratios.
"""


# --------------------------------------------------------------------------------------------------
# Machine / environment
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text()
        m = re.search(r"MemTotal:\s+(\d+) kB", mem)
        if m:
            info["mem_total_gb"] = round(int(m.group(1)) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The command that ran this script, as one would retype it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    return " ".join(["python", shlex.quote(script_s), *(shlex.quote(a) for a in sys.argv[1:])])


def quiet() -> None:
    """Less log noise from transformers / tqdm in benchmark output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------------
# Memory (Linux /proc)
# --------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else float("nan")


def hwm_mb() -> float:
    """Peak RSS since the process started or since `reset_peak_rss()`."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return kb / 1024.0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Fallback peak-RSS sampler (a thread reading VmRSS every `interval` s), for kernels without clear_refs."""

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        self.interval = interval
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed2(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result). With one torch thread the CPU time is the
    work itself: on a shared, oversubscribed machine it leaves out the time spent waiting for a core,
    which is most of the noise of the wall time."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
               on_round: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, Any]]:
    """Run every function once per round, in the given order (A, B, C, A, B, C, ...), after `warmup`
    untimed rounds; returns one record per round: {name: wall seconds, name_cpu: CPU seconds, ...,
    "loadavg": [...]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rows: list[dict[str, Any]] = []
    for r in range(rounds):
        row: dict[str, Any] = {"round": r, "loadavg_before": loadavg()}
        # alternate the order inside a round (ABC, CBA, ...) so that no side is always first
        names = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for name in names:
            row[name], row[f"{name}_cpu"], _ = timed2(fns[name])
        row["loadavg"] = loadavg()
        rows.append(row)
        if on_round is not None:
            on_round(r, row)
    return rows


def pair_ratios(rows: Sequence[dict[str, Any]], num: str, den: str) -> list[float]:
    return [row[num] / row[den] for row in rows if row.get(den)]


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> list[float]:
    """[min, max] of a list (shown next to medians)."""
    return [float(min(xs)), float(max(xs))] if xs else []


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def bench_records(n: int, *, short: bool = False, languages: Sequence[str] | None = None) -> list[Any]:
    """`n` PromptRecords cycled from the bundled parallel benign set (16 languages x 48 items), with
    half of them labelled harmful so that collection keeps two groups per language (the label only
    decides the group; the text does not matter for timing). Ids are made unique per copy.

    `short`: the first word of each text, at most 12 characters (the memory benchmark runs 5,000 prompts)."""
    from neuroshield.data.records import PromptRecord
    from neuroshield.data.templates import load_parallel_benign

    base = load_parallel_benign(languages)
    base = sorted(base, key=lambda r: (r.id, r.language))
    out = []
    for i in range(n):
        r = base[i % len(base)]
        text = (r.text.split() or [r.text])[0][:12] if short else r.text
        label = "harmful" if (i // len(base) + i) % 2 else "benign"
        out.append(PromptRecord(id=f"{r.id}#{i}", text=text, language=r.language, label=label,
                                source="benchmark"))
    return out


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def write_json(name: str, obj: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


def _section_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)


NOTES_DIR = BENCH_DIR / "notes"


def update_results_md(name: str, body: str) -> Path:
    """Replace (or add) the section `name` of RESULTS.md; keeps the other sections as they are.

    Hand-written findings (profiles, causes, fixes) live in `benchmarks/notes/<name>.md` and are
    appended to the section, so a rerun refreshes the numbers without losing them; a note should say
    which run it describes."""
    note = NOTES_DIR / f"{name}.md"
    if note.is_file():
        body = body.rstrip() + "\n\n" + note.read_text().strip()
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n<!-- END {name} -->"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else MD_HEADER
    sections = {}
    for s in SECTIONS:
        m = _section_re(s).search(text)
        if m:
            sections[s] = m.group(0)
    sections[name] = block
    # rebuild in canonical order; anything before the first section (the header) is kept
    first = min((m.start() for s in SECTIONS if (m := _section_re(s).search(text))), default=None)
    head = text[:first].rstrip() if first is not None else text.rstrip()
    ordered = [sections[s] for s in SECTIONS if s in sections]
    extra = [v for k, v in sections.items() if k not in SECTIONS]
    out = head + "\n\n" + "\n\n".join(ordered + extra) + "\n"
    tmp = RESULTS_MD.with_name(RESULTS_MD.name + ".tmp")
    tmp.write_text(out)
    os.replace(tmp, RESULTS_MD)
    return RESULTS_MD


def machine_md(info: dict[str, Any], load: Sequence[Sequence[float]] | None = None, date: str | None = None) -> str:
    """The machine/date lines of a RESULTS.md section."""
    lines = [
        f"- Machine: {info.get('cpu_model')}, {info.get('logical_cores')} logical cores "
        f"(torch threads {info.get('torch_threads')}), {info.get('mem_total_gb', '?')} GB RAM; "
        f"torch {info.get('torch')}, transformers {info.get('transformers', '?')}, Python {info.get('python')}"
        + (f"; GPU {info['gpu']}" if info.get("gpu") else ""),
        f"- Code: git {info.get('git_commit')} (+ uncommitted work in progress); date {date or now_utc()}",
    ]
    if load:
        one = [l[0] for l in load]
        lines.append(f"- Load average (1 min) during the run: {min(one):.2f} to {max(one):.2f} "
                     f"(median {med(one):.2f}) on {info.get('logical_cores')} cores")
    return "\n".join(lines)


def fmt(x: float, digits: int = 2) -> str:
    if x != x:  # nan
        return "n/a"
    return f"{x:.{digits}f}"
