"""Features of any torch model -> .npy -> `poissonflow transform` -> a linear probe.

    python examples/model_features_transform.py [--quick] [--workdir DIR]

1. A small torch model (here an MLP trained for a few epochs on scikit-learn's digits; any
   `nn.Module` works) gives penultimate-layer features, saved as .npy files, one for the
   training images and one for the test images.
2. The command line flows them: the training features through their own field (each feature
   ignores its own charge), the test features through the *training* features' field
   (`--charges train.npy`), as a transformer fitted on the training set would.
3. A tuned linear probe (poissonflow.experiments.probes.linear_probe) scores the raw and the
   flowed features. Expect the flow not to help the probe (see the README's study verdict).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from poissonflow.experiments.probes import linear_probe


def features_of(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The model's penultimate activations, L2-normalised, as a float32 numpy array."""
    body = model[:-1]  # everything but the classification layer
    with torch.no_grad():
        f = body(x)
    return torch.nn.functional.normalize(f, dim=1).numpy().astype(np.float32)


def poissonflow_command() -> list[str]:
    """The installed console script (next to this Python), as a user would type it."""
    script = Path(sys.executable).with_name("poissonflow")
    return [str(script)] if script.exists() else [shutil.which("poissonflow") or "poissonflow"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run for CI (seconds)")
    parser.add_argument(
        "--workdir", default=None, help="where the .npy files go (default: a temporary folder)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    if args.quick:
        x, y = x[:600], y[:600]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)

    # 1. any torch model: an MLP with a 32-d penultimate layer, trained briefly with labels
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    for _ in range(20 if args.quick else 100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        run(args, model, xt, x_te, y_tr, y_te, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="poissonflow-example-") as tmp:
            run(args, model, xt, x_te, y_tr, y_te, Path(tmp))


def run(args, model, xt, x_te, y_tr, y_te, work: Path) -> None:
    f_tr, f_te = features_of(model, xt), features_of(model, torch.from_numpy(x_te))
    np.save(work / "train.npy", f_tr)
    np.save(work / "test.npy", f_te)
    print(f"features: train {f_tr.shape}, test {f_te.shape} in {work}")

    # 2. the command line, exactly as in a shell
    steps = ["--steps", "16"] if args.quick else []
    t0 = time.perf_counter()
    for cmd in (
        ["transform", str(work / "train.npy"), "-o", str(work / "train_flowed.npy"), *steps],
        [
            "transform",
            str(work / "test.npy"),
            "--charges",
            str(work / "train.npy"),
            "-o",
            str(work / "test_flowed.npy"),
            *steps,
        ],
    ):
        print("$ poissonflow " + " ".join(cmd))
        subprocess.run(poissonflow_command() + cmd, check=True)
    print(f"both flows took {time.perf_counter() - t0:.1f} s")
    u_tr, u_te = np.load(work / "train_flowed.npy"), np.load(work / "test_flowed.npy")

    # 3. the probe, on the raw and on the flowed features
    raw = linear_probe(f_tr, y_tr, f_te, y_te)
    flowed = linear_probe(u_tr, y_tr, u_te, y_te)
    print(
        f"tuned linear probe: raw features {raw.test_accuracy:.3f}, "
        f"flowed features {flowed.test_accuracy:.3f}"
    )
    print(raw)


if __name__ == "__main__":
    main()
