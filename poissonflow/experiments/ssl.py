"""Self-supervised encoders: the blog's SmallAlexNet (`poissonflow.experiments.encoder`) trained
without
labels on two augmented views (`poissonflow.experiments.augment`), with one of six objectives, and
its
features cached like the supervised encoder's (`poissonflow.experiments.cache`).

Every objective is a small frozen dataclass: `loss(z1, z2, generator)` of the two views' unit
features (N, 128) (SmallAlexNet's output is L2-normalised), `after_step(z1, z2)` for state kept
between steps (the memory bank), `config()` for cache keys. `OBJECTIVES` names the presets.

| name | objective | paper setting kept | differences (all presets: SmallAlexNet's 128-d output as the loss's input, no projection head; Adam lr 1e-3, no weight decay, the run's epochs and batch) |
|---|---|---|---|
| `infonce` | SimCLR's NT-Xent: 2N views, each anchor against its positive and the 2N - 2 other views, cosine / tau | tau = 0.5 (SimCLR's CIFAR-10 setting, appendix B.9) | SimCLR: ResNet + 2-layer MLP head, LARS, batch 512-4096, 100-1000 epochs |
| `align_uniform` | Wang & Isola: align(alpha = 2) + (unif(z1, t = 2) + unif(z2, t = 2)) / 2, weights 1 / 1 (`losses.align_uniform_loss`) | alpha, t, weights, SmallAlexNet with 128-d normalised output (their STL-10 code's encoder) | their code: SGD lr 0.12, momentum 0.9, wd 1e-4, batch 768, 200 epochs, lr steps |
| `align_uniform_w2` | the above + w * W2 of both views stacked (`losses.wasserstein_uniformity_loss`) | w = 1 (their MoCo v2 CIFAR-10 script: lambd 1.0), W2 of the stacked views | Fang et al. add W2 to MoCo v2 / BYOL / BarlowTwins, not to align + uniform; their covariance adds 1e-4 I, ours floors eigenvalues (`metrics.wasserstein_uniformity`) |
| `noise_infonce` | Butakov et al.'s noise-injected InfoNCE (`losses.noise_injected_infonce`): normalise to the target, add noise, InfoNCE with the sqdist critic at the matched temperature 4 sigma^2 | the objective and its Bayes-critic temperature | target "sphere" (the package's extension; the paper's targets are Gaussian and uniform); sigma = 0.05 per coordinate (a noise norm of about 0.57 in 128-d, against sqrt 2 between random unit vectors): the paper's noise is relative to a per-coordinate-standardised output, which unit 128-d vectors (coordinates about 0.09) are not |
| `noise_infonce_gaussian` | the same with the Gaussian target: per-coordinate batch standardisation of each view (BatchNorm1d without affine), N(0, sigma^2) noise, sigma = 0.3 | the paper's Gaussian target and its InfoNCE | sigma = 0.3 is our choice (the paper sweeps the noise); the standardised output feeds only the loss, the features kept are the L2-normalised fc8 output like every other objective's |
| `contrastive_l2` | the blog's closing proposal ||x - x+||^alpha - lam sum_k ||x - x_k-||^beta (`losses.contrastive_l2_loss`), in-batch negatives, on unit vectors, averaged over both directions | alpha = 2, beta = 1 (`losses.py` defaults) | the blog states no lam: lam = 1 / (N - 1), so the negative term is the mean distance to the other views |
| `align_riesz` | ours: align(alpha = 2) + (R_s(z1) + R_s(z2)) / 2, weights 1 / 1, R_s the Riesz s-energy against the batch and a FIFO bank of past view-1 features (`losses.riesz_uniformity_loss`, `bank.FeatureBank`) | - | s chosen by validation on digits (`poissonflow.experiments.ssl_experiment`); the bank holds detached features of earlier steps (no momentum encoder), pushed after the step (MoCo's order); bank rows of the batch's own images are left out (`AlignRiesz` docstring) |

Determinism: the weights are initialised under the seed (the global RNG is restored), batches,
augmentations and loss noise come from one seeded CPU generator, so on the CPU two runs with
equal settings and thread count give bitwise identical features.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .. import losses
from ..bank import FeatureBank
from .augment import CifarAugment, CropFlip, DigitsAugment, check_images

__all__ = [
    "InfoNCE",
    "AlignUniform",
    "AlignUniformW2",
    "NoiseInfoNCE",
    "NoiseInfoNCEGaussian",
    "ContrastiveL2",
    "AlignRiesz",
    "OBJECTIVES",
    "make_objective",
    "nt_xent_loss",
    "SSLSettings",
    "SSLHistory",
    "train_ssl",
    "extract",
    "SSLFeatures",
    "encode_ssl",
    "SSL_VERSION",
]

# Part of every cache key: bump it whenever a change here changes trained features.
SSL_VERSION = 1


def _positive(value, name: str, *, allow_zero: bool = False) -> float:
    """The package's one positive-number check (_checks.check_positive)."""
    from .._checks import check_positive

    return check_positive(value, name, allow_zero=allow_zero)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N rows [z1; z2]: row k's positive is its other view, its
    negatives the other 2N - 2 rows; scores are cosine similarities / temperature; the mean over
    the 2N anchors of -log softmax(positive)."""
    from ..metrics import as_features, check_pairs

    z1 = as_features(z1, "z1", min_rows=2)
    z2 = as_features(z2, "z2", min_rows=2)
    check_pairs(z1, z2, "z1", "z2")
    tau = _positive(temperature, "temperature")
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    scores = (z @ z.T) / tau
    scores = scores.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -math.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(scores, target)


class _Objective:
    """Shared by the presets: no state between steps unless after_step says otherwise."""

    name = ""

    def config(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    def start(self, dim: int, dtype: torch.dtype, device) -> None:  # noqa: B027
        """Called once before training (allocates state such as a bank)."""

    def after_step(self, z1: torch.Tensor, z2: torch.Tensor, index=None) -> None:  # noqa: B027
        """Called after each optimiser step with the step's (detached) features and the
        images' indices in the training set (`index`, or None)."""


@dataclasses.dataclass
class InfoNCE(_Objective):
    temperature: float = 0.5
    name = "infonce"

    def __post_init__(self):
        _positive(self.temperature, "temperature")

    def loss(self, z1, z2, generator=None, index=None):
        return nt_xent_loss(z1, z2, self.temperature)


@dataclasses.dataclass
class AlignUniform(_Objective):
    alpha: float = 2.0
    t: float = 2.0
    align_weight: float = 1.0
    uniform_weight: float = 1.0
    name = "align_uniform"

    def __post_init__(self):
        _positive(self.alpha, "alpha")
        _positive(self.t, "t")
        _positive(self.align_weight, "align_weight", allow_zero=True)
        _positive(self.uniform_weight, "uniform_weight", allow_zero=True)

    def loss(self, z1, z2, generator=None, index=None):
        return losses.align_uniform_loss(
            z1,
            z2,
            alpha=self.alpha,
            t=self.t,
            align_weight=self.align_weight,
            uniform_weight=self.uniform_weight,
        )


@dataclasses.dataclass
class AlignUniformW2(AlignUniform):
    w2_weight: float = 1.0
    name = "align_uniform_w2"

    def __post_init__(self):
        super().__post_init__()
        _positive(self.w2_weight, "w2_weight", allow_zero=True)

    def loss(self, z1, z2, generator=None, index=None):
        return super().loss(z1, z2) + losses.wasserstein_uniformity_loss(
            z1, z2, weight=self.w2_weight
        )


@dataclasses.dataclass
class NoiseInfoNCE(_Objective):
    target: str = "sphere"
    sigma: float = 0.05
    name = "noise_infonce"

    def __post_init__(self):
        if self.target not in losses.NOISE_TARGETS:
            raise ValueError(f"target must be one of {losses.NOISE_TARGETS}, got {self.target!r}")
        _positive(self.sigma, "sigma")

    def loss(self, z1, z2, generator=None, index=None):
        return losses.noise_injected_infonce(
            z1, z2, target=self.target, sigma=self.sigma, generator=generator
        )


@dataclasses.dataclass
class NoiseInfoNCEGaussian(NoiseInfoNCE):
    """The same objective with the paper's Gaussian target: per-coordinate batch
    standardisation, then N(0, sigma^2) noise, sigma = 0.3 (`tests/test_losses.py`'s setting)."""

    target: str = "gaussian"
    sigma: float = 0.3
    name = "noise_infonce_gaussian"


@dataclasses.dataclass
class ContrastiveL2(_Objective):
    alpha: float = 2.0
    beta: float = 1.0
    lam: float | None = None  # None: 1 / (N - 1)
    name = "contrastive_l2"

    def __post_init__(self):
        _positive(self.alpha, "alpha")
        _positive(self.beta, "beta")
        if self.lam is not None:
            _positive(self.lam, "lam", allow_zero=True)

    def loss(self, z1, z2, generator=None, index=None):
        lam = 1.0 / (z1.shape[0] - 1) if self.lam is None else self.lam
        kw = dict(alpha=self.alpha, beta=self.beta, lam=lam, normalize=True)
        return 0.5 * (
            losses.contrastive_l2_loss(z1, z2, **kw) + losses.contrastive_l2_loss(z2, z1, **kw)
        )


@dataclasses.dataclass
class AlignRiesz(_Objective):
    """align + Riesz uniformity against the batch and a FIFO bank of past view-1 features.

    exclude_own=True (default): bank rows of the images in the current batch (earlier views
    of the same images, pushed in an earlier epoch) are left out of the step's energy. With a
    bank about as large as the training set (digits: 1024 rows for 1347 images) nearly every
    image otherwise meets its own previous-epoch feature in the bank, and the energy, which
    grows without bound as a pair closes, pushes each feature away from its own earlier
    position: against the alignment term. MoCo's queue (65536 keys for 1.28M ImageNet images)
    rarely holds the query's own image, so its code has no such rule."""

    s: float = 2.0
    bank_size: int = 1024
    alpha: float = 2.0
    align_weight: float = 1.0
    uniform_weight: float = 1.0
    exclude_own: bool = True
    name = "align_riesz"

    def __post_init__(self):
        _positive(self.s, "s")
        _positive(self.alpha, "alpha")
        _positive(self.align_weight, "align_weight", allow_zero=True)
        _positive(self.uniform_weight, "uniform_weight", allow_zero=True)
        if (
            isinstance(self.bank_size, bool)
            or not isinstance(self.bank_size, int)
            or self.bank_size < 0
        ):
            raise ValueError(f"bank_size must be a non-negative int, got {self.bank_size!r}")
        if not isinstance(self.exclude_own, bool):
            raise TypeError(f"exclude_own must be a bool, got {type(self.exclude_own).__name__}")
        self._bank: FeatureBank | None = None
        self._ids: FeatureBank | None = None  # the bank rows' image indices (-1: unknown)

    def config(self) -> dict:
        out = {
            "name": self.name,
            "s": self.s,
            "bank_size": self.bank_size,
            "alpha": self.alpha,
            "align_weight": self.align_weight,
            "uniform_weight": self.uniform_weight,
        }
        if self.exclude_own:  # (absent: the key of the first runs, which had no exclusion)
            out["exclude_own"] = True
        return out

    def start(self, dim, dtype, device):
        self._bank = self._ids = None
        if self.bank_size:
            self._bank = FeatureBank(self.bank_size, dim, dtype=dtype, device=device)
            # same FIFO rule, so row k of both banks belongs to one image
            self._ids = FeatureBank(self.bank_size, 1, dtype=torch.float64, device=device)

    def bank_rows(self, index=None):
        """The bank's features the step sees: all of them, or (exclude_own, index given)
        those of images not in `index`."""
        if self._bank is None or len(self._bank) == 0:
            return None
        rows = self._bank.features()
        if self.exclude_own and index is not None:
            ids = self._ids.features()[:, 0]
            own = torch.as_tensor(index, device=ids.device).to(torch.float64)
            rows = rows[~torch.isin(ids, own)]
        return rows

    def loss(self, z1, z2, generator=None, index=None):
        from ..metrics import align_loss

        bank = self.bank_rows(index)
        unif = 0.5 * (
            losses.riesz_uniformity_loss(z1, self.s, bank=bank)
            + losses.riesz_uniformity_loss(z2, self.s, bank=bank)
        )
        return self.align_weight * align_loss(z1, z2, self.alpha) + self.uniform_weight * unif

    def after_step(self, z1, z2, index=None):
        if self._bank is not None:
            self._bank.push(z1.detach())
            ids = (
                torch.full((z1.shape[0], 1), -1.0, dtype=torch.float64, device=z1.device)
                if index is None
                else torch.as_tensor(index).to(z1.device, torch.float64)[:, None]
            )
            self._ids.push(ids)


OBJECTIVES = {
    "infonce": InfoNCE,
    "align_uniform": AlignUniform,
    "align_uniform_w2": AlignUniformW2,
    "noise_infonce": NoiseInfoNCE,
    "noise_infonce_gaussian": NoiseInfoNCEGaussian,
    "contrastive_l2": ContrastiveL2,
    "align_riesz": AlignRiesz,
}


def make_objective(name: str, **params):
    """The preset `name` of OBJECTIVES, with `params` overriding its settings."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](**params)


# --------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class SSLSettings:
    """Everything of a run except the objective, the augmentation and the data."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    arch: str = "digits"  # "digits": encoder.DIGITS_ALEXNET, "blog": encoder.BLOG_ALEXNET

    def __post_init__(self):
        for name, lo in (("epochs", 0), ("batch_size", 2), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        _positive(self.lr, "lr")
        if self.arch not in ("digits", "blog"):
            raise ValueError(f"arch must be 'digits' or 'blog', got {self.arch!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def alexnet(self):
        from .encoder import BLOG_ALEXNET, DIGITS_ALEXNET

        return DIGITS_ALEXNET if self.arch == "digits" else BLOG_ALEXNET


@dataclasses.dataclass
class SSLHistory:
    epoch_loss: list[float]
    epoch_seconds: list[float]

    @property
    def seconds(self) -> float:
        return float(sum(self.epoch_seconds))


def _check_augmentation(aug):
    if not isinstance(aug, (DigitsAugment, CifarAugment, CropFlip)):
        raise TypeError(
            f"augmentation must be a DigitsAugment, CifarAugment or CropFlip "
            f"(poissonflow.experiments.augment), got {type(aug).__name__}"
        )
    return aug


def _check_objective(objective):
    if not isinstance(objective, _Objective):
        raise TypeError(
            f"objective must be one of the presets {sorted(OBJECTIVES)} "
            f"(poissonflow.experiments.ssl), got {type(objective).__name__}"
        )
    return objective


def train_ssl(
    x_train, objective, augmentation, settings: SSLSettings, *, device="cpu", progress: bool = False
):
    """Trains SmallAlexNet on two augmented views of each image of x_train ([0, 1] images
    (N, C, H, W), numpy or torch) with `objective`; Adam, a fresh permutation every epoch, the
    last batch dropped when it has fewer than 2 images. Returns (encoder in eval mode,
    SSLHistory)."""
    from .encoder import SmallAlexNet, _resolve_device

    _check_objective(objective)
    _check_augmentation(augmentation)
    if not isinstance(settings, SSLSettings):
        raise TypeError(f"settings must be an SSLSettings, got {type(settings).__name__}")
    dev = _resolve_device(device)
    x = torch.as_tensor(
        np.asarray(x_train, dtype=np.float32) if not isinstance(x_train, torch.Tensor) else x_train
    )
    x = check_images(x, "x_train").float().contiguous()
    n, c, h, w = x.shape
    if n < 2:
        raise ValueError(f"x_train must hold at least 2 images, got {n}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = SmallAlexNet(c, (h, w), settings.alexnet())
    count = n * h * w
    mean = x.sum(dim=(0, 2, 3), dtype=torch.float64) / count
    var = (x * x).sum(dim=(0, 2, 3), dtype=torch.float64) / count - mean * mean
    model.set_input_stats(mean.float(), var.clamp_min(0).sqrt().clamp_min(1e-6).float())
    model.to(dev)
    gen = torch.Generator().manual_seed(settings.seed)
    loss_gen = torch.Generator(device=dev).manual_seed(settings.seed + 7919)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    objective.start(model.feat_dim, torch.float32, dev)
    history = SSLHistory([], [])
    from tqdm import tqdm

    steps = math.ceil(n / settings.batch_size)
    bar = tqdm(
        total=settings.epochs * steps,
        disable=not progress,
        unit="step",
        desc=f"ssl {objective.name}",
        leave=False,
    )
    from .training import train_loop

    class SelfSupervised:  # two augmented views of each image, the objective's loss
        def start_epoch(self):
            self.total, self.seen = 0.0, 0

        def loss(self, idx):
            xb = x[idx]
            v1 = augmentation(xb, gen).to(dev)
            v2 = augmentation(xb, gen).to(dev)
            z = model(torch.cat([v1, v2]))  # one BatchNorm batch for both views
            self.z1, self.z2 = z[: idx.numel()], z[idx.numel() :]
            loss = objective.loss(self.z1, self.z2, loss_gen, index=idx)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"{objective.name}: the loss became {float(loss)}")
            return loss

        def after_step(self, idx, loss):
            objective.after_step(self.z1.detach(), self.z2.detach(), index=idx)
            self.total += float(loss.detach()) * idx.numel()
            self.seen += idx.numel()

        def end_epoch(self, seconds):
            history.epoch_loss.append(self.total / max(1, self.seen))
            history.epoch_seconds.append(seconds)
            bar.set_postfix(loss=f"{history.epoch_loss[-1]:.3f}")

    try:
        train_loop(
            model,
            SelfSupervised(),
            n=n,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            generator=gen,
            optimizer=opt,
            bar=bar,
        )
    finally:
        bar.close()
    model.eval()
    return model, history


@torch.no_grad()
def extract(model, x, *, augmentation=None, seed: int = 0, batch_size: int = 1024) -> np.ndarray:
    """Unit features (N, 128) float32 of images x in eval mode; with `augmentation`, of one
    seeded augmented pass."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    x = check_images(x, "x").float()
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    model.eval()
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        if augmentation is not None:
            xb = augmentation(xb, gen)
        out.append(model(xb.to(dev)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.feat_dim), np.float32)


@dataclasses.dataclass
class SSLFeatures:
    """Features of a data set from one self-supervised encoder: train, test, and two
    independently augmented passes over the test images (positive pairs)."""

    features_train: np.ndarray
    features_test: np.ndarray
    views_test: tuple[np.ndarray, np.ndarray]
    history: SSLHistory
    key: str
    from_cache: bool
    train_seconds: float
    features_val: np.ndarray | None = None  # of encode_ssl's x_val (held out from training)


def encode_ssl(
    x_train,
    x_test,
    fingerprint: str,
    objective,
    augmentation,
    settings: SSLSettings,
    *,
    device="cpu",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    x_val=None,
) -> SSLFeatures:
    """Trains (unless cached) and extracts the features. The cache key covers the objective's,
    the augmentation's and the run's settings, SSL_VERSION, the torch version, the device type
    and `fingerprint` (of the images: Dataset.fingerprint() or cache.arrays_sha256)."""
    from . import cache as _cache

    _check_objective(objective)
    _check_augmentation(augmentation)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError("fingerprint must be a non-empty string identifying the images")
    dev = torch.device(device)
    key = _cache.cache_key(
        {
            "what": "ssl-features",
            "ssl_version": SSL_VERSION,
            "torch": torch.__version__,
            "device": dev.type,
            "settings": settings.to_dict(),
            "objective": objective.config(),
            "augmentation": augmentation.config(),
        },
        fingerprint,
    )

    def compute():
        model, history = train_ssl(
            x_train, objective, augmentation, settings, device=dev, progress=progress
        )
        arrays = {
            "features_train": extract(model, x_train),
            "features_test": extract(model, x_test),
            "view_a_test": extract(
                model, x_test, augmentation=augmentation, seed=settings.seed + 2
            ),
            "view_b_test": extract(
                model, x_test, augmentation=augmentation, seed=settings.seed + 3
            ),
        }
        if x_val is not None:  # images the encoder never trained on (the fingerprint's part)
            arrays["features_val"] = extract(model, x_val)
        return arrays, {"epoch_loss": history.epoch_loss, "epoch_seconds": history.epoch_seconds}

    if cache_dir is None:
        arrays, meta = compute()
        hit = False
    else:
        arrays, meta, hit = _cache.ArrayCache(cache_dir).get_or_compute(key, compute)
    hist = SSLHistory(list(meta["epoch_loss"]), list(meta["epoch_seconds"]))
    return SSLFeatures(
        arrays["features_train"],
        arrays["features_test"],
        (arrays["view_a_test"], arrays["view_b_test"]),
        hist,
        key,
        hit,
        hist.seconds,
        arrays.get("features_val"),
    )


def describe(objective) -> dict[str, Any]:
    """The objective's settings (what results.json records)."""
    return _check_objective(objective).config()
