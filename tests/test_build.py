"""The installed package: the C++ extension is built and importing needs no GPU."""

import subprocess
import sys

import poissonflow


def test_cpu_backend_is_built_and_listed():
    b = poissonflow.backends()
    assert b["cpu"]["available"], b["cpu"]["detail"]
    assert b["reference"]["available"]
    isas = poissonflow._ext.cpu_isas()
    assert isas[-1] == "generic"  # the portable copy is always compiled and usable


def test_import_needs_no_gpu_and_does_no_work(tmp_path):
    """Importing poissonflow with CUDA hidden must work and must not load the CUDA module; the
    losses and metrics load on first use, as attributes or as imports."""
    code = (
        "import os, sys; os.environ['CUDA_VISIBLE_DEVICES'] = '';"
        "import poissonflow; assert 'poissonflow._cuda' not in sys.modules;"
        "assert 'triton' not in sys.modules; assert 'sklearn' not in sys.modules;"
        "assert 'poissonflow.losses' not in sys.modules;"
        "assert 'poissonflow.metrics' not in sys.modules;"
        "assert poissonflow.losses.RieszLoss.__module__ == 'poissonflow.losses.modules';"
        "from poissonflow import metrics; assert metrics is sys.modules['poissonflow.metrics'];"
        "print('ok')"
    )
    # cwd outside the repository: from its root, `python -c` would import the source tree
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cli_demo_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "poissonflow", "demo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "max relative error of v against the float64 reference" in out.stdout
    err = float(out.stdout.strip().splitlines()[-1].split()[-1])
    assert err < 1e-4


def test_unbuilt_source_folder_refuses_with_a_message(tmp_path):
    """A copy of the source folder without its extension, imported from its parent directory
    (as from the repository root), stops with an ImportError that says what to run. `-S` keeps
    site-packages, and with it an editable install's import hook, out of the way."""
    import pathlib

    pkg = tmp_path / "poissonflow"
    pkg.mkdir()
    init = pathlib.Path(poissonflow.__file__).read_text(encoding="utf-8")
    (pkg / "__init__.py").write_text(init, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-S", "-c", "import poissonflow"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: poissonflow is being imported from its source folder")
    assert "pip install --no-build-isolation -e ." in last and "`poissonflow ...`" in last
