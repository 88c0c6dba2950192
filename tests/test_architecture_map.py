"""docs/ARCHITECTURE.md maps every module of the package, library and study, and names none that
is gone: read from the tree at test time, so a module added, moved or removed without its line
in the map fails here.

A module is named when the map holds its path from the repository root
(`poissonflow/learned/training.py`), or, below the top folder, when one line holds its folder's
path in backticks and its file name (a package's row: `poissonflow/kernels/triton/` ... `_flow.py`).
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAP = ROOT / "docs" / "ARCHITECTURE.md"


def _modules() -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "poissonflow").rglob("*.py")
        if "__pycache__" not in p.parts
    )


def _named(path: str, lines: list[str]) -> bool:
    folder, _, name = path.rpartition("/")
    file_name = re.compile(rf"(?<![\w/]){re.escape(name)}")
    return any(
        path in line
        or (folder != "poissonflow" and f"`{folder}/`" in line and file_name.search(line))
        for line in lines
    )


def test_every_module_is_in_the_map():
    lines = MAP.read_text(encoding="utf-8").splitlines()
    missing = [m for m in _modules() if not _named(m, lines)]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"


def test_the_map_names_no_module_that_is_gone():
    text = MAP.read_text(encoding="utf-8")
    named = set(re.findall(r"poissonflow/[\w/]*\.py", text))
    gone = sorted(n for n in named if not (ROOT / n).is_file())
    assert not gone, f"docs/ARCHITECTURE.md names modules that do not exist: {gone}"
