"""The documentation says what the code does: the README and docs/cli.md list exactly the
options of `poissonflow transform`, the API reference lists exactly `poissonflow.__all__`, every
public name has a docstring, and the README's quick start runs as pasted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import poissonflow
from poissonflow.__main__ import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text("utf-8")


def _cli_options() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = set()
    for action in sub.choices["transform"]._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest != "help":
            names.add(longs[0])
    return names


def test_readme_lists_exactly_the_transform_options():
    paragraph = README.split("Options of `poissonflow transform`:", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`(?:-o/)?(--[a-z][a-z-]*)`", paragraph.split(".", 1)[0]))
    assert listed == _cli_options()
    # and nothing the command line lacks is offered anywhere in the README
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", README))
    others = {"--nproc-per-node", "--no-build-isolation", "--strict", "--quick"}
    assert mentioned - others <= _cli_options(), mentioned - others - _cli_options()


def test_cli_page_table_lists_exactly_the_transform_options():
    page = (ROOT / "docs" / "cli.md").read_text("utf-8")
    table = page.split("## `poissonflow transform`", 1)[1].split("\n\n")[2]
    rows = set(re.findall(r"^\| `(?:-o/)?(--[a-z-]+)`", table, re.M))
    rows |= set(re.findall(r"/ `(--[a-z-]+)`", table))
    assert rows == _cli_options()


def test_reference_lists_exactly_the_top_level_public_names():
    page = (ROOT / "docs" / "reference.md").read_text("utf-8")
    table = page.split("## `poissonflow`", 1)[1].split("## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w]+)` \|", table, re.M))
    assert listed == set(poissonflow.__all__)
    assert set(dir(poissonflow)) >= set(poissonflow.__all__)


def test_every_public_name_resolves_and_has_a_docstring():
    for name in poissonflow.__all__:
        obj = getattr(poissonflow, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), name


def test_documented_modules_keep_their_other_names_private():
    """In each module the reference renders, a name defined there (not imported) and not in
    its __all__ starts with an underscore."""
    import importlib
    import inspect

    for modname in ("poissonflow.bank", "poissonflow.learned.targets"):
        mod = importlib.import_module(modname)
        for name, obj in vars(mod).items():
            if name.startswith("_") or name in mod.__all__ or inspect.ismodule(obj):
                continue
            defined_here = getattr(obj, "__module__", modname) == modname
            if defined_here and (inspect.isfunction(obj) or inspect.isclass(obj)):
                pytest.fail(f"{modname}.{name} is public by name but not in __all__")


def test_package_ships_its_type_information():
    assert (Path(poissonflow.__file__).parent / "py.typed").is_file()


def test_readme_quick_start_runs_as_pasted(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        out = subprocess.run(
            [sys.executable, "-c", block],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, block + out.stderr
    # the flow block wrote feats.npy: the shell line after it runs too
    line = re.search(r"^poissonflow transform feats\.npy -o flowed\.npy", README, re.M)
    assert line is not None
    cmd = [
        str(Path(sys.executable).with_name("poissonflow")),
        "transform",
        "feats.npy",
        "-o",
        "flowed.npy",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "flowed.info.json").is_file()
