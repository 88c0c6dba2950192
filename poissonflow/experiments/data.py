"""Image data sets of the end-to-end experiment: digits, CIFAR-10, and the shared CIFAR-10 subset.

Every loader returns a `Dataset`: images as float32 arrays in [0, 1], channels first
(N, C, H, W), labels as int64 in 0..n_classes-1, plus where the data came from.

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, one channel, pixel values 0..16
  divided by 16), split once into train and test, stratified by class, with a seed.
- ``cifar10``: the official python batches (folder ``cifar-10-batches-py``: ``data_batch_1`` ..
  ``data_batch_5`` and ``test_batch``, each a pickled dict with ``b'data'`` (10000 x 3072 uint8
  rows, the 1024 R values, then G, then B, each plane row-major) and ``b'labels'``).
- ``cifar10-subset``: one ``.npz`` holding ``x_train``/``x_test`` (N, 3, 32, 32) uint8 and
  ``y_train``/``y_test`` (N,) labels; the project's shared copy lives in
  ``../shared/data/cifar10-subset/`` next to the repository.

A missing, truncated or malformed file raises `DataError` (or `DataNotFoundError`) naming the
file, never a bare traceback from pickle or zipfile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pickle
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "Dataset",
    "DataError",
    "DataNotFoundError",
    "DATASETS",
    "CIFAR10_CLASSES",
    "CIFAR10_SUBSET_SHA256",
    "DEFAULT_SUBSET_RELPATH",
    "load_dataset",
    "load_digits",
    "load_cifar10",
    "load_cifar10_subset",
    "find_cifar10_subset",
    "file_sha256",
]

DATASETS = ("digits", "cifar10", "cifar10-subset")

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# The sha256 published with the shared subset file; a loaded subset whose file hash differs is
# still accepted (tests write tiny files in the same format), the caller can compare.
CIFAR10_SUBSET_SHA256 = "7021bfe0a9bb6270aa0744b7f68907010f37120d36b5b3d6f130c32193530d59"

# Relative to the repository root (the folder holding the `poissonflow` package).
DEFAULT_SUBSET_RELPATH = Path("..", "shared", "data", "cifar10-subset", "cifar10_subset.npz")

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_FOLDER = "cifar-10-batches-py"


class DataError(ValueError):
    """A data file is unreadable or does not hold what its format promises."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data folder or file does not exist."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test images of one data set.

    x_train, x_test: float32 (N, C, H, W) in [0, 1]. y_train, y_test: int64 (N,).
    source: where it was read from (a path, or the scikit-learn function).
    file_sha256: sha256 of each file read, by file name (empty for digits).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    file_sha256: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """sha256 of the arrays' contents (names, dtypes, shapes, bytes): a cache key part that
        changes whenever the data does, whatever file it came from."""
        h = hashlib.sha256()
        for field in ("x_train", "y_train", "x_test", "y_test"):
            a = np.ascontiguousarray(getattr(self, field))
            h.update(f"{field}|{a.dtype.str}|{a.shape}|".encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()

    def summary(self) -> str:
        c, hgt, wid = self.image_shape
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images, "
            f"{c}x{hgt}x{wid}, {self.n_classes} classes, from {self.source}"
        )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_dataset(name: str, data_dir: str | Path | None = None, *, seed: int = 0) -> Dataset:
    """The experiment's front door.

    name: "digits" (data_dir ignored), "cifar10" (data_dir: the ``cifar-10-batches-py`` folder
    or its parent; required) or "cifar10-subset" (data_dir: the ``.npz`` or a folder holding
    ``cifar10_subset.npz``; default: the shared copy next to the repository).
    seed: only used by digits (its train/test split).
    """
    if name == "digits":
        return load_digits(seed=seed)
    if name == "cifar10":
        if data_dir is None:
            raise DataNotFoundError(
                "dataset 'cifar10' needs data_dir: the official 'cifar-10-batches-py' folder "
                "(from https://www.cs.toronto.edu/~kriz/cifar.html) or the folder holding it"
            )
        return load_cifar10(data_dir)
    if name == "cifar10-subset":
        path = find_cifar10_subset(data_dir)
        if path is None:
            raise DataNotFoundError(
                f"dataset 'cifar10-subset': no file at the default location "
                f"{' or '.join(str(c) for c in _default_subset_candidates())}; pass data_dir "
                f"(the .npz or its folder)"
            )
        return load_cifar10_subset(path)
    raise ValueError(f"name must be one of {DATASETS}, got {name!r}")


# ---------------------------------------------------------------------------------------------
# digits


def load_digits(*, test_size: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) float32 in [0, 1] (pixel / 16).

    The split is stratified by class and fixed by `seed`; test_size is a fraction of the 1797
    images (0.25 gives 1347 train / 450 test).
    """
    if not isinstance(test_size, float) or not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a float in (0, 1), got {test_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    import sklearn
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    # Pixel values are integer counts 0..16 (4x4 blocks of a 32x32 bitmap).
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    return Dataset(
        name="digits",
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
        class_names=tuple(str(int(c)) for c in bunch.target_names),
        source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}), "
        f"stratified split test_size={test_size} seed={seed}",
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10, official python batches

# A pickle can run arbitrary code when loaded. The official batches only need numpy's array
# reconstruction (and `_codecs.encode`, which Python 3 pickles of bytes use), so nothing else is
# allowed: a tampered or wrong file fails with a DataError instead of executing anything.
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def _numpy_multiarray():
    try:  # numpy >= 2
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            # Files written by numpy 1 name numpy.core, by numpy 2 numpy._core: map both to
            # whichever this numpy has, without touching the deprecated alias.
            return getattr(_numpy_multiarray(), name)
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file -> (uint8 (n, 3, 32, 32), int64 (n,))."""
    if not path.is_file():
        raise DataNotFoundError(f"CIFAR-10 batch file {path} does not exist")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files were pickled by Python 2; their str keys
            # come back as bytes (b'data', b'labels').
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        MemoryError,
        OSError,
    ) as exc:
        raise DataError(
            f"CIFAR-10 batch file {path} is corrupt or not a CIFAR-10 python batch "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 batch file {path} holds a {type(batch).__name__}, not a dict")
    missing = [k for k in (b"data", b"labels") if k not in batch]
    if missing:
        raise DataError(f"CIFAR-10 batch file {path} lacks the key(s) {missing}")
    data, labels = batch[b"data"], batch[b"labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(
            f"CIFAR-10 batch file {path}: b'data' must be a uint8 array of shape (n, 3072), "
            f"got {desc}"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"CIFAR-10 batch file {path}: b'labels' is not a list of ints ({exc})"
        ) from None
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"CIFAR-10 batch file {path}: {data.shape[0]} images but b'labels' has shape "
            f"{labels.shape}"
        )
    _check_labels(labels, 10, f"CIFAR-10 batch file {path}: b'labels'")
    # Each row is the R plane, then G, then B, each 32x32 row-major: exactly C-order (3, 32, 32).
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_label_names(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return CIFAR10_CLASSES
    try:
        with open(meta, "rb") as f:
            names = _BatchUnpickler(f, encoding="bytes").load()[b"label_names"]
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not what it claims
        raise DataError(
            f"CIFAR-10 metadata file {meta} is corrupt ({type(exc).__name__}: {exc})"
        ) from None
    if len(names) != 10:
        raise DataError(f"CIFAR-10 metadata file {meta} lists {len(names)} label names, not 10")
    return names


def _resolve_cifar_folder(data_dir: str | Path) -> Path:
    folder = Path(data_dir).expanduser()
    if not folder.exists():
        raise DataNotFoundError(f"CIFAR-10 data_dir {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"CIFAR-10 data_dir {folder} is not a folder")
    if not (folder / CIFAR10_TEST_FILE).exists() and (folder / CIFAR10_FOLDER).is_dir():
        folder = folder / CIFAR10_FOLDER
    missing = [n for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (folder / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 folder {folder} lacks {', '.join(missing)}: expected the official "
            f"'{CIFAR10_FOLDER}' folder (data_batch_1..5 and test_batch)"
        )
    return folder


def load_cifar10(data_dir: str | Path) -> Dataset:
    """The official CIFAR-10 python batches: 50000 train (data_batch_1..5 in order) and 10000
    test images (test_batch), as (N, 3, 32, 32) float32 in [0, 1].

    data_dir: the ``cifar-10-batches-py`` folder, or a folder that contains it.
    """
    folder = _resolve_cifar_folder(data_dir)
    xs, ys = [], []
    for name in CIFAR10_TRAIN_FILES:
        x, y = _read_cifar_batch(folder / name)
        xs.append(x)
        ys.append(y)
    x_test, y_test = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    hashes = {n: file_sha256(folder / n) for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)}
    return Dataset(
        name="cifar10",
        x_train=_to_unit_float(np.concatenate(xs)),
        y_train=np.concatenate(ys),
        x_test=_to_unit_float(x_test),
        y_test=y_test,
        class_names=_read_cifar_label_names(folder),
        source=str(folder),
        file_sha256=hashes,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 subset (.npz)

_SUBSET_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _default_subset_candidates() -> list[Path]:
    """Where the shared copy may be: next to the repository this package was imported from
    (editable installs), or next to the current directory when the command runs from the
    repository root (a `pip install .` puts the package in site-packages)."""
    return [_repo_root() / DEFAULT_SUBSET_RELPATH, Path.cwd() / DEFAULT_SUBSET_RELPATH]


def find_cifar10_subset(path: str | Path | None = None) -> Path | None:
    """Where the CIFAR-10 subset is.

    path None: the shared copy at ``<repo>/../shared/data/cifar10-subset/cifar10_subset.npz``
    (the repository of this package, or the current directory), or None when it is absent (a user's
    machine has no ../shared). An explicit path (the .npz,
    or a folder holding ``cifar10_subset.npz``) must exist: a mistyped path raises
    DataNotFoundError rather than silently skipping the data set.
    """
    if path is None:
        for default in _default_subset_candidates():
            if default.is_file():
                return default.resolve()
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / DEFAULT_SUBSET_RELPATH.name
    if not p.is_file():
        raise DataNotFoundError(f"CIFAR-10 subset file {p} does not exist")
    return p.resolve()


def load_cifar10_subset(path: str | Path) -> Dataset:
    """The CIFAR-10 subset .npz: x_train/x_test uint8 (N, 3, 32, 32) channels first, y_train/
    y_test integer labels 0..9 (the shared file stores them as uint8). Returned as float32 in
    [0, 1] and int64 labels."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"CIFAR-10 subset file {path} does not exist")
    arrays = {}
    try:
        # allow_pickle=False: an npz of plain arrays never needs pickle; refusing it means a
        # tampered file cannot run code.
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _SUBSET_ARRAYS if k not in npz.files]
            if missing:
                raise DataError(
                    f"CIFAR-10 subset file {path} lacks the array(s) {missing} "
                    f"(has {sorted(npz.files)})"
                )
            for k in _SUBSET_ARRAYS:
                arrays[k] = npz[k]
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
        raise DataError(
            f"CIFAR-10 subset file {path} is corrupt or truncated ({type(exc).__name__}: {exc})"
        ) from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise DataError(
                f"CIFAR-10 subset file {path}: x_{split} must be uint8 of shape (N, 3, 32, 32), "
                f"got {x.dtype} {x.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
            raise DataError(
                f"CIFAR-10 subset file {path}: y_{split} must be integer labels of shape "
                f"({x.shape[0]},), got {y.dtype} {y.shape}"
            )
        _check_labels(y, 10, f"CIFAR-10 subset file {path}: y_{split}")
    return Dataset(
        name="cifar10-subset",
        x_train=_to_unit_float(arrays["x_train"]),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=_to_unit_float(arrays["x_test"]),
        y_test=arrays["y_test"].astype(np.int64),
        class_names=CIFAR10_CLASSES,
        source=str(path.resolve()),
        file_sha256={path.name: file_sha256(path)},
    )


# ---------------------------------------------------------------------------------------------
# shared helpers


def _to_unit_float(x_uint8: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x_uint8, dtype=np.float32) / np.float32(255.0)


def _check_labels(y: np.ndarray, n_classes: int, what: str) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise DataError(
            f"{what} must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}"
        )
