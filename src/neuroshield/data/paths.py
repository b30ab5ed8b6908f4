"""Where the shared data sets live.

The layout this project is developed in is `<somewhere>/main` (the repository) beside
`<somewhere>/shared/data` (the data sets, kept out of the repository because of their size and
their licences). Users elsewhere point `NEUROSHIELD_DATA` at their copy.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "NEUROSHIELD_DATA"


class DataNotFoundError(FileNotFoundError):
    """The data root (or a file in it) could not be found."""


def _candidates(start: Path) -> list[Path]:
    """`<ancestor>/../shared/data` and `<ancestor>/shared/data` for `start` and each ancestor."""
    out: list[Path] = []
    for ancestor in (start, *start.parents):
        out.append(ancestor.parent / "shared" / "data")
        out.append(ancestor / "shared" / "data")
    return out


def find_data_root(start: Path | None = None) -> Path:
    """Return the directory holding the shared data sets.

    Order: the environment variable `NEUROSHIELD_DATA` if set (it must then exist); else the first
    `shared/data` directory found searching upward from `start` (default: the current working
    directory) and then from this package's own location.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(
                f"{ENV_VAR} is set to {env!r}, but that is not a directory. "
                f"Point {ENV_VAR} at the folder that holds xsafety/, advbench/, mgsm/ ..."
            )
        return path.resolve()

    starts = [Path(start) if start is not None else Path.cwd(), Path(__file__).resolve().parent]
    looked: list[Path] = []
    for s in starts:
        for cand in _candidates(s.resolve()):
            if cand in looked:
                continue
            looked.append(cand)
            if cand.is_dir():
                return cand.resolve()

    shown = ", ".join(str(p) for p in looked[:6])
    more = f" and {len(looked) - 6} more" if len(looked) > 6 else ""
    raise DataNotFoundError(
        f"Could not find the shared data directory (shared/data). Looked in: {shown}{more}. "
        f"Set the environment variable {ENV_VAR} to the folder that holds the data sets "
        f"(xsafety/, advbench/, mgsm/ ...)."
    )
