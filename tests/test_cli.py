"""The command line: `poissonflow transform` on files, one-line errors with exit status 2, the
demo's picture, and the source tree handing over to the install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import poissonflow
from poissonflow.__main__ import main


def _features(n=60, d=5, seed=0, dtype=np.float64):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _one_line_error(capsys, argv, *needles):
    """Runs the CLI in process; asserts exit status 2 and one stderr line naming `needles`."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# --------------------------------------------------------------------------- transform


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
def test_transform_round_trips_each_format_bit_for_bit(tmp_path, suffix, capsys):
    x = _features()
    src = tmp_path / f"feats{suffix}"
    if suffix == ".npy":
        np.save(src, x)
    elif suffix == ".npz":
        np.savez(src, feats=x)
    else:
        torch.save(torch.from_numpy(x), src)
    out = tmp_path / f"flowed{suffix}"
    assert main(["transform", str(src), "-o", str(out), "--steps", "8"]) == 0
    expected = poissonflow.transform(x, steps=8)
    if suffix == ".npy":
        got = np.load(out)
    elif suffix == ".npz":
        with np.load(out) as z:
            assert z.files == ["feats"]  # the input's key is kept
            got = z["feats"]
    else:
        got = torch.load(out, weights_only=True)["features"].numpy()
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    info = json.loads((tmp_path / "flowed.info.json").read_text())
    assert info["steps"] == 8 and info["n_samples"] == 60 and info["excluded"] == 60
    assert "wrote" in capsys.readouterr().out


def test_transform_options_reach_the_flow(tmp_path):
    x = _features(seed=1, dtype=np.float32)
    charges = _features(n=80, seed=2, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "c.npz", a=charges, b=charges[:3])
    argv = [
        "transform",
        str(tmp_path / "x.npy"),
        "-o",
        str(tmp_path / "u.npy"),
        "--charges",
        str(tmp_path / "c.npz"),
        "--charges-key",
        "a",
        "--solver",
        "euler",
        "--steps",
        "20",
        "--z-min",
        "0.05",
        "--z-max",
        "30",
        "--output",
        "raw",
        "--no-progress",
    ]
    assert main(argv) == 0
    expected = poissonflow.transform(
        x, charges=charges, solver="euler", steps=20, z_min=0.05, z_max=30.0, output="raw"
    )
    got = np.load(tmp_path / "u.npy")
    assert got.dtype == np.float32 and np.array_equal(got, expected)


def test_transform_learned_field_saves_and_reloads(tmp_path):
    x = _features(n=200, d=3, seed=3)
    np.save(tmp_path / "x.npy", x)
    common = ["--field", "learned", "--preset", "blog", "--steps", "10", "--no-progress"]
    assert (
        main(
            [
                "transform",
                str(tmp_path / "x.npy"),
                "-o",
                str(tmp_path / "a.npy"),
                "--field-epochs",
                "2",
                "--save-field",
                str(tmp_path / "f.pt"),
            ]
            + common
        )
        == 0
    )
    assert (
        main(
            [
                "transform",
                str(tmp_path / "x.npy"),
                "-o",
                str(tmp_path / "b.npy"),
                "--load-field",
                str(tmp_path / "f.pt"),
            ]
            + common
        )
        == 0
    )
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (200, 4) and np.array_equal(a, b)
    info = json.loads((tmp_path / "a.info.json").read_text())
    assert info["field"] == "learned" and info["learned_field_epochs"] == 2


def test_transform_bad_files_give_one_line(tmp_path, capsys):
    np.save(tmp_path / "one_d.npy", np.zeros(5))
    nan = _features()
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    np.savez(tmp_path / "two.npz", a=_features(), b=_features())
    torch.save({"x": torch.zeros(3, 2, dtype=torch.complex64)}, tmp_path / "complex.pt")
    out = str(tmp_path / "o.npy")
    _one_line_error(
        capsys, ["transform", str(tmp_path / "one_d.npy"), "-o", out], "one_d.npy", "2-D"
    )
    _one_line_error(capsys, ["transform", str(tmp_path / "nan.npy"), "-o", out], "features", "NaN")
    _one_line_error(
        capsys, ["transform", str(tmp_path / "junk.npy"), "-o", out], "junk.npy", "cannot be read"
    )
    _one_line_error(capsys, ["transform", str(tmp_path / "two.npz"), "-o", out], "two.npz", "--key")
    _one_line_error(
        capsys, ["transform", str(tmp_path / "complex.pt"), "-o", out], "complex.pt", "complex"
    )
    _one_line_error(
        capsys,
        ["transform", str(tmp_path / "missing.npy"), "-o", out],
        "missing.npy",
        "no such file",
    )
    _one_line_error(
        capsys,
        ["transform", str(tmp_path / "nan.npy"), "-o", str(tmp_path / "o.csv")],
        "OUT",
        ".csv",
    )
    np.save(tmp_path / "ok.npy", _features())
    _one_line_error(
        capsys, ["transform", str(tmp_path / "ok.npy"), "-o", out, "--steps", "0"], "steps"
    )
    _one_line_error(
        capsys,
        ["transform", str(tmp_path / "ok.npy"), "-o", out, "--batch-size", "-5"],
        "batch_size",
    )
    _one_line_error(
        capsys, ["transform", str(tmp_path / "ok.npy"), "-o", out, "--z-min", "x"], "--z-min"
    )
    _one_line_error(
        capsys,
        ["transform", str(tmp_path / "ok.npy"), "-o", out, "--preset", "blog"],
        "--field learned",
    )
    assert not (tmp_path / "o.npy").exists()  # nothing half-written by a failed run


# --------------------------------------------------------------------------- other commands


def test_experiment_and_report_errors_are_one_line(tmp_path, capsys):
    _one_line_error(capsys, ["experiment", "--limit", "-5"], "--limit")
    _one_line_error(capsys, ["experiment", "--limit", "0"], "--limit")
    _one_line_error(capsys, ["experiment", "--encoder-epochs", "0"], "--encoder-epochs")
    _one_line_error(capsys, ["experiment", "--limit", "abc"], "--limit")
    _one_line_error(
        capsys,
        [
            "experiment",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "r"),
        ],
        "nowhere",
    )
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_error(
        capsys,
        ["report", str(tmp_path / "notes.txt")],
        "notes.txt",
        "not an experiment results.json",
    )
    _one_line_error(capsys, ["report", str(tmp_path / "absent.json")], "absent.json")


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    np.save(tmp_path / "one_d.npy", np.zeros(5))
    out = subprocess.run(
        [sys.executable, "-m", "poissonflow", "transform", "one_d.npy", "-o", "o.npy"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


def test_demo_plot_writes_a_png(tmp_path):
    png = tmp_path / "pics" / "flow.png"
    out = subprocess.run(
        [sys.executable, "-m", "poissonflow", "demo", "--plot", str(png)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "(warm, best of 5" in out.stdout
    err = float(out.stdout.strip().splitlines()[-1].split()[-1])
    assert err < 1e-4


def test_flow_picture_paths_follow_the_transform():
    from poissonflow.experiments.plotting import demo_charges, flow_trajectories

    charges, queries = demo_charges(n_charges=300, n_queries=10, seed=1)
    paths = flow_trajectories(charges, queries, heights=6)
    assert paths.shape == (6, 10, 3)
    assert np.all(np.diff(paths[:, :, 2], axis=0) > 0)  # every path rises
    end = poissonflow.transform(queries, charges=charges, output="raw")
    assert np.array_equal(paths[-1], end)  # the last height is the transform's own end


# --------------------------------------------------------------------------- the source tree


def test_the_command_runs_the_install_from_a_folder_of_sources(tmp_path):
    """From a folder holding the package's sources but no compiled extension (the repository
    root after `pip install .`), the installed `poissonflow` command runs the install: a console
    script does not put the working directory on sys.path. (`python -c "import poissonflow"`
    there refuses with a message instead: tests/test_build.py.)"""
    src = Path(poissonflow.__file__).resolve().parent
    shutil.copytree(
        src, tmp_path / "poissonflow", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__")
    )
    command = Path(sys.executable).with_name("poissonflow")
    demo = subprocess.run(
        [str(command), "demo"], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert demo.returncode == 0, demo.stderr
    assert "max relative error of v against the float64 reference" in demo.stdout


# --------------------------------------------------------------------------- every option


def _transform_options() -> set[str]:
    """The long name (or the metavar of a positional) of every option of `transform`."""
    from poissonflow.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = set()
    for action in sub.choices["transform"]._actions:
        if action.dest == "help":
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        names.add(longs[0] if longs else action.metavar)
    return names


# option -> (arguments after `transform FEATURES -o OUT`, or a full replacement; needles)
_BAD = {
    "FEATURES": (None, ["missing.npy", "no such file"]),
    "--out": (None, ["-o/--out", "absent-folder", "does not exist"]),
    "--key": (["--key", "x"], ["--key", "unnamed"]),
    "--charges": (["--charges", "nowhere.npy"], ["--charges", "no such file"]),
    "--charges-key": (["--charges", "{ok}", "--charges-key", "y"], ["--charges-key"]),
    "--field": (["--field", "magic"], ["--field", "invalid choice"]),
    "--preset": (["--preset", "blog"], ["--field learned"]),
    "--field-epochs": (["--field", "learned", "--field-epochs", "0"], ["epochs"]),
    "--load-field": (["--field", "learned", "--load-field", "{ok}"], ["--load-field"]),
    "--save-field": (
        ["--field", "learned", "--save-field", "{tmp}/absent-folder/f.pt"],
        ["--save-field", "absent-folder", "does not exist"],
    ),
    "--start": (["--start", "moon"], ["--start", "invalid choice"]),
    "--solver": (["--solver", "heun"], ["--solver", "invalid choice"]),
    "--steps": (["--steps", "0"], ["steps"]),
    "--z-min": (["--z-min", "-1"], ["z_min"]),
    "--z-max": (["--z-max", "1e30"], ["z_max"]),
    "--parameterization": (["--parameterization", "polar"], ["--parameterization"]),
    "--output": (["--output", "cube"], ["--output", "invalid choice"]),
    "--no-exclude-self": (["--no-exclude-self=yes"], ["--no-exclude-self"]),
    "--seed": (["--seed", "-1"], ["--seed"]),
    "--backend": (["--backend", "cuda"], ["backend='cuda'"]),
    "--device": (["--device", "cuda:99"], ["--device cuda:99"]),
    "--batch-size": (["--batch-size", "-5"], ["batch_size"]),
    "--distributed-mode": (["--distributed-mode", "star"], ["--distributed-mode"]),
    "--progress": (["--progress", "--no-progress"], ["not allowed with"]),
    "--no-progress": (["--no-progress=1"], ["--no-progress"]),
}


def test_every_transform_option_has_a_bad_value_case():
    """A new option of `transform` must come with its one-line error case in _BAD."""
    assert _transform_options() == set(_BAD)


@pytest.mark.parametrize("option", sorted(_BAD))
def test_a_bad_value_of_any_transform_option_is_one_line_and_exit_2(option, tmp_path, capsys):
    ok = tmp_path / "ok.npy"
    np.save(ok, _features())
    out = tmp_path / "o.npy"
    extra, needles = _BAD[option]
    if option == "FEATURES":
        argv = ["transform", str(tmp_path / "missing.npy"), "-o", str(out)]
    elif option == "--out":
        argv = ["transform", str(ok), "-o", str(tmp_path / "absent-folder" / "o.npy")]
    else:
        extra = [a.format(ok=ok, tmp=tmp_path) for a in extra]
        argv = ["transform", str(ok), "-o", str(out)] + extra
    _one_line_error(capsys, argv, *needles)
    assert not out.exists() and not (tmp_path / "absent-folder").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_in_a_real_process(tmp_path):
    np.save(tmp_path / "x.npy", _features())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "poissonflow",
            "transform",
            "x.npy",
            "-o",
            "o.npy",
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "--device cuda" in out.stderr, out.stderr


def test_pt_output_layout_is_a_dict_of_one_named_tensor(tmp_path):
    """docs/cli.md: a .pt output is {name: float tensor (N, d + 1)}, the name the input's key
    or "features"; the .info.json beside it holds the settings."""
    x = _features(n=30, d=4)
    torch.save({"train": torch.from_numpy(x), "labels": torch.arange(30)}, tmp_path / "in.pt")
    assert (
        main(
            [
                "transform",
                str(tmp_path / "in.pt"),
                "--key",
                "train",
                "-o",
                str(tmp_path / "out.pt"),
                "--steps",
                "4",
            ]
        )
        == 0
    )
    blob = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(blob) == ["train"] and blob["train"].shape == (30, 5)
    assert blob["train"].dtype == torch.float64
    info = json.loads((tmp_path / "out.info.json").read_text())
    assert info["out"] == str(tmp_path / "out.pt") and info["steps"] == 4
