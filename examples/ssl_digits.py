"""Self-supervised training on scikit-learn's digits with the Riesz loss and its memory bank,
logging the streaming metrics.

    python examples/ssl_digits.py [--quick] [--epochs E] [--s S] [--bank-size K]

An MLP encoder sees two augmented views of each image (shifts of one pixel and Gaussian noise)
and is trained without labels on alignment (the views' normalised features should agree) plus
`RieszLoss`, the log Riesz s-energy of the batch against itself and a FIFO bank of past
batches that the module owns (uniformity: the features should spread over the sphere). Each
epoch the streaming metrics (`update` per batch, `compute` at the end, then `reset`) report
alignment, uniformity, Wasserstein uniformity and effective rank over the whole epoch without
keeping an N x N matrix; at the end a linear probe scores the features with the labels.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from poissonflow.experiments.probes import linear_probe
from poissonflow.losses import RieszLoss
from poissonflow.metrics import Alignment, EffectiveRank, Uniformity, WassersteinUniformity


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random shift of up to one pixel in each direction, plus Gaussian noise (8 x 8 images)."""
    img = x.view(-1, 1, 8, 8)
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
    out = padded[:, :, dy : dy + 8, dx : dx + 8].reshape(len(x), 64)
    return out + 0.05 * torch.randn(out.shape, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run for CI (seconds)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--s", type=float, default=0.5, help="the Riesz exponent")
    parser.add_argument("--bank-size", type=int, default=1024, help="rows of the memory bank")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 2
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)

    encoder = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32)
    )
    riesz = RieszLoss(s=args.s, bank_size=args.bank_size)
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    metrics = {
        "alignment": Alignment(),
        "uniformity": Uniformity(),
        "W2 uniformity": WassersteinUniformity(),
        "effective rank": EffectiveRank(),
    }

    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_tr), generator=g)
        for start in range(0, len(order), args.batch_size):
            batch = x_tr[order[start : start + args.batch_size]]
            z1 = torch.nn.functional.normalize(encoder(augment(batch, g)), dim=1)
            z2 = torch.nn.functional.normalize(encoder(augment(batch, g)), dim=1)
            align = (z1 - z2).pow(2).sum(dim=1).mean()
            loss = align + riesz(z1)  # the bank is the module's: no push to write
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics["alignment"].update(z1.detach(), z2.detach())
            for name in ("uniformity", "W2 uniformity", "effective rank"):
                metrics[name].update(z1.detach())
        report = ", ".join(f"{name} {float(m.compute()):.3f}" for name, m in metrics.items())
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}, {report} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        for m in metrics.values():
            m.reset()

    with torch.no_grad():
        f_tr = torch.nn.functional.normalize(encoder(x_tr), dim=1).numpy()
        f_te = torch.nn.functional.normalize(encoder(x_te), dim=1).numpy()
    probe = linear_probe(f_tr, np.asarray(y_tr), f_te, np.asarray(y_te))
    print(f"linear probe on the self-supervised features: {probe.test_accuracy:.3f}")


if __name__ == "__main__":
    main()
