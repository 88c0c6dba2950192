"""The scripts of examples/ run, at their --quick size, as a user would run them, and print what
they promise. Each runs in a fresh process from a temporary folder (not the repository root,
whose source folder would shadow the install)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_every_example_has_a_test():
    tested = {
        "model_features_transform.py",
        "pfgm_targets.py",
        "ssl_digits.py",
        "distributed_riesz.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_model_features_transform(tmp_path):
    out = _run(
        [
            sys.executable,
            str(EXAMPLES / "model_features_transform.py"),
            "--quick",
            "--workdir",
            str(tmp_path / "work"),
        ],
        tmp_path,
    )
    assert "$ poissonflow transform" in out and "tuned linear probe: raw features" in out
    assert (tmp_path / "work" / "test_flowed.npy").is_file()
    assert "test_predictions=<" in out  # the ProbeResult's short repr


def test_pfgm_targets(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "pfgm_targets.py"), "--quick"], tmp_path)
    assert "poissonflow field_targets:" in out and "PFGM's dense recipe:" in out
    assert "one training step of a field network" in out


def test_ssl_digits(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "ssl_digits.py"), "--quick"], tmp_path)
    assert "effective rank" in out and "linear probe" in out


def _free_port() -> int:
    # torchrun's --master-port 0 waits forever here; a port the system just handed out is free
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_distributed_riesz_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun) if torchrun.exists() else shutil.which("torchrun"),
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(EXAMPLES / "distributed_riesz.py"),
        "--quick",
    ]
    out = _run(cmd, tmp_path)
    assert "equal to one process" in out
