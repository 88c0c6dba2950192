"""The experiment's encoder: the blog's SmallAlexNet, trained through a linear head.

(Over 600 lines, kept whole: the network, its training loop, its augmentation, the feature
extraction and the cached features are one unit whose bits tests/test_encoder.py pins.)

Architecture (docs/DESIGN.md, "The learned field"), for 32x32 RGB input (`BLOG_ALEXNET`):

    5 blocks  conv3x3(pad 1, no bias) - BatchNorm2d - ReLU, widths 96, 192, 384, 384, 192,
              MaxPool2d(3, stride 2) after blocks 1, 2 and 5       (32 -> 15 -> 7 -> 3)
    fc6       Flatten - Linear(192*3*3, 4096, no bias) - BatchNorm1d - ReLU
    fc7       Linear(4096, 4096, no bias) - BatchNorm1d - ReLU
    fc8       Linear(4096, 128) then f = z / ||z||          (the 128-d features)
    head      Linear(128, n_classes), trained with cross-entropy (Adam), used for accuracy only

What is adapted to the input, and why:
- fc6's input size follows from the image size and the pools (the blog's code is written for
  one size); in_channels follows the data (1 for digits).
- Inputs are standardised per channel with the training set's mean and std, stored in the
  model (buffers), so features of any [0, 1] image use the same statistics.

The blog's code where it differs (`EncoderSettings(init="blog", standardize=False,
shuffle=False)`, `default_settings(name, faithful=True)`, docs/BLOG_FAITHFULNESS.md): every
Conv2d and Linear of SmallAlexNet initialised N(0, 0.02) with zero biases (BatchNorm weight 1,
bias 0; the head keeps PyTorch's default, as the blog's `nn.Linear(128, 10)` does), raw [0, 1]
pixels (no standardisation), and the training images in their fixed order every epoch (an
unshuffled DataLoader).
- 8x8 digits (`DIGITS_ALEXNET`): the three 3x3/2 pools would shrink 8 -> 3 -> 1 -> (none), so
  only the pool after block 2 is kept (8 -> 3: blocks 3-5 and fc6 see 3x3 maps, as blocks 3-5
  see 7x7 and fc6 3x3 in the blog), and widths are scaled down (32, 64, 128, 128, 64; fc6/fc7
  512) so that an epoch takes about half a second on a 2-core CPU; the 128-d L2-normalised
  fc8 and the head are unchanged. Keeping the pool after block 5 instead was measured 2.7x
  slower per step and no better (head test accuracy 98.0% against 99.3%).

Augmentation (training only; features are extracted without it): random crop (zero-pad by
`pad` pixels in [0, 1] pixel space, crop back at a random offset) and horizontal flip, drawn
from a seeded generator and applied with one gather. The blog uses crop + flip on CIFAR-10
(pad 4, flip). Digits use pad 1 (a one-pixel shift of an 8x8 image, about the relative shift of
pad 4 on 32x32) and no flip: a mirrored 2, 3, 4, 7 or 9 is not that digit any more, so flipping
would teach the encoder that different shapes share a label.

Determinism: the weights are initialised under `seed` (the global RNG state is restored
afterwards), batches and augmentation come from a CPU generator seeded the same way, so on CPU
two runs with equal settings and the same number of torch threads give bitwise identical
features (other thread counts round differently, so training trajectories drift apart). On
CUDA, cuDNN kernels may differ in the last bits between runs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .augment import CropFlip
from .training import train_loop

__all__ = [
    "AlexNetConfig",
    "Augmentation",
    "EncoderSettings",
    "BLOG_ALEXNET",
    "DIGITS_ALEXNET",
    "SmallAlexNet",
    "EncoderClassifier",
    "TrainResult",
    "EncodedDataset",
    "default_settings",
    "augment",
    "train_encoder",
    "extract_features",
    "encode_dataset",
    "ENCODER_VERSION",
    "MIN_FEATURE_DIM",
    "MAX_FEATURE_DIM",
]

# Part of every cache key: bump it whenever a change here changes trained features.
# 2: two augmented views of the test set (positive pairs); 3: the features of a held-out
# validation set (x_val) beside train and test
ENCODER_VERSION = 3
INITS = ("torch", "blog")
BLOG_INIT_STD = 0.02  # the blog's SmallAlexNet.init_weights_: normal_(weight, 0, 0.02)
# default_settings(feature_dim=...): the L2-normalised features lie on S^(d-1), at least a
# circle (d = 1 would leave the two points +-1); 4096 is the width of the blog's fc7.
MIN_FEATURE_DIM, MAX_FEATURE_DIM = 2, 4096


@dataclasses.dataclass(frozen=True)
class AlexNetConfig:
    """Widths and pooling of `SmallAlexNet`.

    conv_widths: output channels of the five conv blocks.
    pool_after: 0-based indices of the blocks followed by MaxPool2d(3, stride 2).
    fc_width: width of fc6 and fc7. feat_dim: size of the L2-normalised fc8 output.
    """

    conv_widths: tuple[int, ...] = (96, 192, 384, 384, 192)
    pool_after: tuple[int, ...] = (0, 1, 4)
    fc_width: int = 4096
    feat_dim: int = 128

    def __post_init__(self):
        widths = tuple(self.conv_widths)
        if len(widths) != 5 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"conv_widths must be 5 positive ints, got {self.conv_widths!r}")
        pools = tuple(self.pool_after)
        if any(not isinstance(i, int) or not 0 <= i < 5 for i in pools) or len(set(pools)) != len(
            pools
        ):
            raise ValueError(
                f"pool_after must be distinct block indices in 0..4, got {self.pool_after!r}"
            )
        for name in ("fc_width", "feat_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        object.__setattr__(self, "conv_widths", widths)
        object.__setattr__(self, "pool_after", tuple(sorted(pools)))


BLOG_ALEXNET = AlexNetConfig()
DIGITS_ALEXNET = AlexNetConfig(conv_widths=(32, 64, 128, 128, 64), pool_after=(1,), fc_width=512)


# The supervised encoder's augmentation: the study's one augmentation system (augment.py).
Augmentation = CropFlip


@dataclasses.dataclass(frozen=True)
class EncoderSettings:
    """Everything that determines a trained encoder (and so its cache key), except the data
    and the device. The blog: 20 epochs, batch 256, Adam lr 1e-3, crop + flip."""

    arch: AlexNetConfig = BLOG_ALEXNET
    augmentation: Augmentation = Augmentation()
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    init: str = "torch"  # "torch": PyTorch's defaults; "blog": N(0, 0.02) conv/linear weights
    standardize: bool = True  # per-channel standardisation (False: raw [0, 1] pixels)
    shuffle: bool = True  # a fresh permutation every epoch (False: the data's order)

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("standardize", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2:
            # BatchNorm needs two samples per training batch.
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
                or (name == "lr" and v == 0)
            ):
                bound = "> 0" if name == "lr" else ">= 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {v!r}")
        if not isinstance(self.arch, AlexNetConfig):
            raise TypeError(f"arch must be an AlexNetConfig, got {type(self.arch).__name__}")
        if not isinstance(self.augmentation, Augmentation):
            raise TypeError(
                f"augmentation must be an Augmentation, got {type(self.augmentation).__name__}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> EncoderSettings:
        return dataclasses.replace(self, **changes)


def default_settings(
    dataset_name: str, faithful: bool = False, feature_dim: int | None = None
) -> EncoderSettings:
    """Defaults per data set: the blog's settings for CIFAR-10 (and its subset). Digits keep the
    blog's 20 epochs of Adam at lr 1e-3 but use the scaled-down network, pad-1 crop without
    flip, and batch 64: with 1347 training images, batch 256 would give only 6 updates an epoch
    (measured on this 2-core CPU: 20 epochs take 11-25 s, head test accuracy about 98%).
    faithful=True: also the blog's initialisation, raw pixels and fixed order (module doc).
    feature_dim: the width of fc8, the L2-normalised features (None: the blog's 128), from
    MIN_FEATURE_DIM to MAX_FEATURE_DIM; the rest of the network is unchanged."""
    if feature_dim is not None and (
        isinstance(feature_dim, bool)
        or not isinstance(feature_dim, (int, np.integer))
        or not MIN_FEATURE_DIM <= feature_dim <= MAX_FEATURE_DIM
    ):
        raise ValueError(
            f"feature_dim must be None or an integer from {MIN_FEATURE_DIM} to "
            f"{MAX_FEATURE_DIM}, got {feature_dim!r}"
        )
    blog = dict(init="blog", standardize=False, shuffle=False) if faithful else {}
    if dataset_name == "digits":
        settings = EncoderSettings(
            arch=DIGITS_ALEXNET,
            augmentation=Augmentation(pad=1, flip=False),
            epochs=20,
            batch_size=64,
            **blog,
        )
    elif dataset_name in ("cifar10", "cifar10-subset"):
        settings = EncoderSettings(**blog)
    else:
        raise ValueError(
            f"dataset_name must be 'digits', 'cifar10' or 'cifar10-subset', got {dataset_name!r}"
        )
    if feature_dim is not None:
        settings = settings.replace(
            arch=dataclasses.replace(settings.arch, feat_dim=int(feature_dim))
        )
    return settings


# ---------------------------------------------------------------------------------------------
# network


def _pooled(size: int) -> int:
    return (size - 3) // 2 + 1  # MaxPool2d(3, stride 2), no padding


class SmallAlexNet(nn.Module):
    """[0, 1] images (N, C, H, W) -> L2-normalised features (N, feat_dim)."""

    def __init__(
        self, in_channels: int, image_size: tuple[int, int], arch: AlexNetConfig = BLOG_ALEXNET
    ):
        super().__init__()
        height, width = image_size
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))
        blocks, prev = [], in_channels
        for i, w in enumerate(arch.conv_widths):
            layers = [
                nn.Conv2d(prev, w, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            if i in arch.pool_after:
                if min(height, width) < 3:
                    raise ValueError(
                        f"image_size {tuple(image_size)} is too small for pools after blocks "
                        f"{arch.pool_after}: the map is {height}x{width} before the pool after "
                        f"block {i} (MaxPool2d(3, 2) needs >= 3)"
                    )
                height, width = _pooled(height), _pooled(width)
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            blocks.append(nn.Sequential(*layers))
            prev = w
        self.conv = nn.Sequential(*blocks)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(prev * height * width, arch.fc_width, bias=False),  # fc6
            nn.BatchNorm1d(arch.fc_width),
            nn.ReLU(inplace=True),
            nn.Linear(arch.fc_width, arch.fc_width, bias=False),  # fc7
            nn.BatchNorm1d(arch.fc_width),
            nn.ReLU(inplace=True),
            nn.Linear(arch.fc_width, arch.feat_dim),  # fc8
        )
        self.feat_dim = arch.feat_dim

    def init_blog_(self, std: float = BLOG_INIT_STD) -> None:
        """The blog's init_weights_: Conv2d and Linear weights N(0, std), biases 0, BatchNorm
        weight 1 and bias 0, drawn from the global RNG in module order."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean[:, None, None]) / self.input_std[:, None, None]
        return F.normalize(self.fc(self.conv(x)), dim=1)


class EncoderClassifier(nn.Module):
    """SmallAlexNet plus the linear head Linear(feat_dim, n_classes) it is trained through."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        n_classes: int,
        arch: AlexNetConfig = BLOG_ALEXNET,
    ):
        super().__init__()
        self.encoder = SmallAlexNet(in_channels, image_size, arch)
        self.head = nn.Linear(arch.feat_dim, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits)."""
        f = self.encoder(x)
        return f, self.head(f)


# ---------------------------------------------------------------------------------------------
# augmentation


def augment(x: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """aug(x, generator): random crop and optional flip of a batch (augment.CropFlip)."""
    return aug(x, generator)


# ---------------------------------------------------------------------------------------------
# training and extraction


@dataclasses.dataclass
class TrainResult:
    """Per-epoch history of a training run. epoch_loss / epoch_acc: mean cross-entropy and head
    accuracy over the epoch's (augmented) batches in train mode, as the blog measures it."""

    epoch_loss: list[float]
    epoch_acc: list[float]
    epoch_seconds: list[float]

    @property
    def seconds(self) -> float:
        return float(sum(self.epoch_seconds))


def _resolve_device(device) -> torch.device:
    """The package's device resolution (_checks.resolve_device), limited to cpu and cuda."""
    from .._checks import resolve_device

    return resolve_device(device, types=("cpu", "cuda"))


def _as_images(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point images in [0, 1], got {t.dtype}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t.float().contiguous()


def _as_labels(y, n: int, n_classes: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if t.shape != (n,) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"{name} must be integer labels of shape ({n},), got {t.dtype} {tuple(t.shape)}"
        )
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(
            f"{name} must lie in 0..{n_classes - 1}, got {int(t.min())}..{int(t.max())}"
        )
    return t


def train_encoder(
    x_train,
    y_train,
    n_classes: int,
    settings: EncoderSettings,
    *,
    device="cpu",
    progress: bool = True,
) -> tuple[EncoderClassifier, TrainResult]:
    """Trains SmallAlexNet + Linear(feat_dim, n_classes) with Adam on cross-entropy.

    x_train: (N, C, H, W) float images in [0, 1] (numpy or torch); y_train: (N,) ints.
    Each epoch visits a fresh permutation in batches of settings.batch_size, augmented; a last
    batch of one image is dropped (BatchNorm needs two). Returns the model in eval mode on
    `device` and the per-epoch history.
    """
    if not isinstance(settings, EncoderSettings):
        raise TypeError(f"settings must be an EncoderSettings, got {type(settings).__name__}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    dev = _resolve_device(device)
    x = _as_images(x_train, "x_train")
    y = _as_labels(y_train, x.shape[0], n_classes, "y_train")
    n, c, h, w = x.shape
    if n < 2:
        raise ValueError(f"x_train must hold at least 2 images, got {n}")

    # Initialise under the seed without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = EncoderClassifier(c, (h, w), n_classes, settings.arch)
        if settings.init == "blog":
            model.encoder.init_blog_()
    # Per-channel mean and (biased) std over all training pixels, accumulated in float64 so
    # that 50000 x 1024 terms a channel lose nothing; E[x^2] - E[x]^2 does not cancel
    # badly for pixels in [0, 1].
    count = n * h * w
    mean = x.sum(dim=(0, 2, 3), dtype=torch.float64) / count
    var = (x * x).sum(dim=(0, 2, 3), dtype=torch.float64) / count - mean * mean
    std = var.clamp_min(0).sqrt().clamp_min(1e-6)
    if settings.standardize:  # otherwise the buffers stay 0 and 1: raw [0, 1] pixels
        model.encoder.set_input_stats(mean.float(), std.float())
    model.to(dev)
    x, y = x.to(dev), y.to(dev)

    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    history = TrainResult([], [], [])
    from tqdm import tqdm

    bar = tqdm(
        total=settings.epochs * steps_per_epoch,
        disable=not progress,
        unit="batch",
        desc=f"encoder {c}x{h}x{w}",
        leave=False,
    )
    aug = settings.augmentation

    class Supervised:  # cross-entropy through the head; sums stay on the device (no sync)
        def start_epoch(self):
            self.loss_sum = torch.zeros((), device=dev)
            self.correct = torch.zeros((), dtype=torch.long, device=dev)
            self.seen = 0

        def loss(self, idx):
            xb = augment(x[idx], aug, gen)
            _, self.logits = model(xb)
            return F.cross_entropy(self.logits, y[idx])

        def after_step(self, idx, loss):
            with torch.no_grad():
                self.loss_sum += loss.detach() * idx.numel()
                self.correct += (self.logits.argmax(1) == y[idx]).sum()
            self.seen += idx.numel()

        def end_epoch(self, seconds):
            history.epoch_loss.append(float(self.loss_sum) / self.seen)
            history.epoch_acc.append(int(self.correct) / self.seen)
            history.epoch_seconds.append(seconds)
            bar.set_postfix(
                epoch=len(history.epoch_loss),
                loss=f"{history.epoch_loss[-1]:.3f}",
                acc=f"{history.epoch_acc[-1]:.3f}",
            )

    try:
        train_loop(
            model,
            Supervised(),
            n=n,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            generator=gen,
            optimizer=opt,
            shuffle=settings.shuffle,
            order_device=dev,
            bar=bar,
        )
    finally:
        bar.close()
    model.eval()
    return model, history


@torch.no_grad()
def extract_features(
    model: EncoderClassifier,
    x,
    *,
    batch_size: int = 1024,
    augmentation: Augmentation | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, feat_dim), logits (N, n_classes)) as float32 numpy, in eval mode.

    No augmentation by default (the features the experiment uses); `augmentation` with `seed`
    gives one seeded augmented pass (used to report the head's accuracy on augmented images).
    """
    if not isinstance(model, EncoderClassifier):
        raise TypeError(f"model must be an EncoderClassifier, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    x = _as_images(x, "x")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    feats, logits = [], []
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(dev)
            if augmentation is not None:
                xb = augment(xb, augmentation, gen)
            f, lg = model(xb)
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
    finally:
        model.train(was_training)
    if not feats:
        return (
            np.zeros((0, model.encoder.feat_dim), np.float32),
            np.zeros((0, model.head.out_features), np.float32),
        )
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


# ---------------------------------------------------------------------------------------------
# the experiment's entry point: train once, cache the features


@dataclasses.dataclass
class EncodedDataset:
    """Features of a data set from a trained encoder (train and test, no augmentation).

    train_acc / test_acc: the head's accuracy on clean images (eval mode).
    train_acc_augmented: the head's accuracy on one seeded augmented pass over the train images
    (eval mode); history.epoch_acc[-1] is the blog's number (train mode, last epoch's batches).
    views_test: features of two independently augmented passes over the test images (positive
    pairs for the alignment metric); equal to features_test when augmentation is off.
    """

    features_train: np.ndarray
    features_test: np.ndarray
    views_test: tuple[np.ndarray, np.ndarray]
    logits_train: np.ndarray
    logits_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    train_acc: float
    train_acc_augmented: float
    test_acc: float
    history: TrainResult
    settings: EncoderSettings
    device: str
    key: str
    from_cache: bool
    features_val: np.ndarray | None = None  # of encode_dataset's x_val (held out from training)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else float("nan")


def encode_dataset(
    dataset,
    settings: EncoderSettings | None = None,
    *,
    device="cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    x_val=None,
) -> EncodedDataset:
    """Trains the encoder on dataset.x_train (unless cached) and returns the features of the
    train and test images, and of x_val when given (images the encoder never trains on: the
    study's validation split).

    dataset: a poissonflow.experiments.data.Dataset. settings: default_settings(dataset.name) when
    None.
    cache_dir: when given, results are stored there keyed by sha256 of (settings, device type,
    ENCODER_VERSION, torch version, dataset.fingerprint()); a later call with the same key
    returns them without training.
    """
    from . import cache as _cache

    if settings is None:
        settings = default_settings(dataset.name)
    dev = _resolve_device(device)
    fingerprint = dataset.fingerprint()
    if x_val is not None:
        x_val = np.ascontiguousarray(x_val, dtype=np.float32)
        fingerprint += "|val:" + _cache.arrays_sha256({"x_val": x_val})
    key = _cache.cache_key(
        {
            "what": "encoder-features",
            "encoder_version": ENCODER_VERSION,
            "torch": torch.__version__,
            "device": dev.type,
            "settings": settings.to_dict(),
        },
        fingerprint,
    )

    def compute():
        model, history = train_encoder(
            dataset.x_train,
            dataset.y_train,
            dataset.n_classes,
            settings,
            device=dev,
            progress=progress,
        )
        f_train, lg_train = extract_features(model, dataset.x_train)
        f_test, lg_test = extract_features(model, dataset.x_test)
        _, lg_aug = extract_features(
            model, dataset.x_train, augmentation=settings.augmentation, seed=settings.seed + 1
        )
        aug = settings.augmentation if settings.augmentation.active else None
        view_a, _ = extract_features(
            model, dataset.x_test, augmentation=aug, seed=settings.seed + 2
        )
        view_b, _ = extract_features(
            model, dataset.x_test, augmentation=aug, seed=settings.seed + 3
        )
        arrays = {
            "features_train": f_train,
            "features_test": f_test,
            "logits_train": lg_train,
            "logits_test": lg_test,
            "view_a_test": view_a,
            "view_b_test": view_b,
        }
        if x_val is not None:  # after every other pass: the same model, the same bits
            arrays["features_val"] = extract_features(model, x_val)[0]
        meta = {
            "train_acc_augmented": _accuracy(lg_aug, dataset.y_train),
            "epoch_loss": history.epoch_loss,
            "epoch_acc": history.epoch_acc,
            "epoch_seconds": history.epoch_seconds,
        }
        return arrays, meta

    if cache_dir is None:
        arrays, meta = compute()
        hit = False
    else:
        arrays, meta, hit = _cache.ArrayCache(cache_dir).get_or_compute(key, compute)
    return _encoded_from_arrays(arrays, meta, dataset, settings, dev.type, key, from_cache=hit)


def _encoded_from_arrays(arrays, meta, dataset, settings, device, key, from_cache):
    history = TrainResult(
        list(meta["epoch_loss"]), list(meta["epoch_acc"]), list(meta["epoch_seconds"])
    )
    return EncodedDataset(
        features_train=arrays["features_train"],
        features_test=arrays["features_test"],
        views_test=(arrays["view_a_test"], arrays["view_b_test"]),
        logits_train=arrays["logits_train"],
        logits_test=arrays["logits_test"],
        y_train=dataset.y_train,
        y_test=dataset.y_test,
        train_acc=_accuracy(arrays["logits_train"], dataset.y_train),
        train_acc_augmented=float(meta["train_acc_augmented"]),
        test_acc=_accuracy(arrays["logits_test"], dataset.y_test),
        history=history,
        settings=settings,
        device=device,
        key=key,
        from_cache=from_cache,
        features_val=arrays.get("features_val"),
    )
