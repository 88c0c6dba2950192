"""The CPU kernels share torch's OpenMP runtime, and importing poissonflow leaves the
environment alone (poissonflow/_ext.py, cpu_module)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import poissonflow
from poissonflow import _ext


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_kernels_run_on_torchs_openmp_runtime():
    x = torch.randn(300, 8)
    poissonflow.poisson_field(x, x)  # loads the extension and runs a region
    used = _ext.cpu_module().openmp_library()
    if not used:
        pytest.skip("built without OpenMP")
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    torch_runtimes = [
        p for p in _ext.openmp_runtimes() if os.path.realpath(p).startswith(torch_lib)
    ]
    if not torch_runtimes:
        pytest.skip("this torch build links no OpenMP runtime of its own")
    # the extension's libgomp references resolved into torch's copy, not a second runtime
    # (other packages may load their own, e.g. scikit-learn's vendored libgomp)
    assert os.path.realpath(used) == os.path.realpath(torch_runtimes[0]), (used, torch_runtimes)


def test_import_does_not_touch_the_environment(tmp_path):
    code = (
        "import os, json; before = dict(os.environ); import poissonflow, torch; "
        "poissonflow.poisson_field(torch.randn(50, 3), torch.randn(60, 3)); "
        "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == "[]", out.stdout
