"""Loaders of poissonflow.experiments.data, on small files written here in the official formats."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from poissonflow.experiments import data

N_PER_BATCH = 6  # images in each tiny CIFAR-10 batch file


def _cifar_rows(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return rows, labels


def _write_batch(path, rows, labels, *, numpy1_names: bool = False) -> None:
    """A batch as the official files hold it: dict with bytes keys, uint8 (n, 3072) data, labels
    as a list of ints. Protocol 2 (what the official files use) writes globals as text lines, so
    the numpy 1 module name of the official files can be substituted byte for byte."""
    batch = {
        b"batch_label": b"tiny batch",
        b"labels": labels,
        b"data": rows,
        b"filenames": [f"img{i}.png".encode() for i in range(len(labels))],
    }
    blob = pickle.dumps(batch, protocol=2)
    if numpy1_names:
        assert b"numpy._core.multiarray" in blob
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


@pytest.fixture
def cifar_dir(tmp_path):
    """A tiny `cifar-10-batches-py` folder; returns (folder, train rows, train labels, test rows,
    test labels)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows, labels = _cifar_rows(N_PER_BATCH, seed=i)
        # Batch 1 as numpy 1 pickled it (the official files), the others as numpy 2 does.
        _write_batch(folder / f"data_batch_{i}", rows, labels, numpy1_names=(i == 1))
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = _cifar_rows(N_PER_BATCH, seed=99)
    _write_batch(folder / "test_batch", test_rows, test_labels)
    names = [n.encode() for n in data.CIFAR10_CLASSES]
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": names, b"num_cases_per_batch": N_PER_BATCH}, protocol=2)
    )
    return (
        folder,
        np.concatenate(train_rows),
        np.array(train_labels),
        test_rows,
        np.array(test_labels),
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 official batches


def test_cifar10_reads_official_batches(cifar_dir):
    folder, train_rows, train_labels, test_rows, test_labels = cifar_dir
    ds = data.load_cifar10(folder)
    assert ds.name == "cifar10"
    assert ds.x_train.shape == (5 * N_PER_BATCH, 3, 32, 32) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (N_PER_BATCH, 3, 32, 32)
    assert ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, train_labels)  # batches 1..5 in order
    np.testing.assert_array_equal(ds.y_test, test_labels)
    # Row layout: 1024 R values, then G, then B, each 32x32 row-major.
    i, r, c = 7, 3, 29
    for ch in range(3):
        assert ds.x_train[i, ch, r, c] == np.float32(train_rows[i, ch * 1024 + r * 32 + c]) / 255
    np.testing.assert_array_equal(ds.x_test * np.float32(255), test_rows.reshape(-1, 3, 32, 32))
    assert ds.class_names == data.CIFAR10_CLASSES
    assert ds.source == str(folder)
    assert (
        ds.file_sha256["test_batch"]
        == hashlib.sha256((folder / "test_batch").read_bytes()).hexdigest()
    )
    assert set(ds.file_sha256) == {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"}


def test_cifar10_accepts_the_parent_folder(cifar_dir):
    folder = cifar_dir[0]
    a, b = data.load_cifar10(folder.parent), data.load_dataset("cifar10", folder)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.source == str(folder)


def test_cifar10_missing_folder_and_files(tmp_path, cifar_dir):
    with pytest.raises(data.DataNotFoundError, match="does not exist"):
        data.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # DataNotFoundError is also a FileNotFoundError
        data.load_cifar10(tmp_path / "nowhere")
    folder = cifar_dir[0]
    (folder / "data_batch_3").unlink()
    with pytest.raises(data.DataNotFoundError, match="data_batch_3"):
        data.load_cifar10(folder)
    with pytest.raises(data.DataNotFoundError, match="needs data_dir"):
        data.load_dataset("cifar10")


def _expect_data_error(folder, match):
    with pytest.raises(data.DataError, match=match) as info:
        data.load_cifar10(folder)
    # A clear message, not a chained traceback from pickle.
    assert info.value.__cause__ is None
    return info.value


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_cifar10_corrupt_pickle_names_the_file(cifar_dir, damage):
    folder = cifar_dir[0]
    path = folder / "data_batch_2"
    blob = path.read_bytes()
    path.write_bytes(
        {"truncated": blob[: len(blob) // 2], "garbage": b"\x00not a pickle" * 50, "empty": b""}[
            damage
        ]
    )
    err = _expect_data_error(folder, "data_batch_2")
    assert "corrupt" in str(err)


def test_cifar10_refuses_code_in_a_pickle(cifar_dir, tmp_path):
    folder = cifar_dir[0]
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    _expect_data_error(folder, "test_batch.*refusing")
    assert not marker.exists()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({b"labels": [0] * 3}, "lacks the key"),
        ({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0] * 3}, r"shape \(n, 3072\)"),
        ({b"data": np.zeros((3, 3072), np.float32), b"labels": [0] * 3}, "uint8"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0] * 2}, "3 images"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 10, 1]}, r"0\.\.9"),
        ([1, 2, 3], "not a dict"),
    ],
)
def test_cifar10_malformed_batch(cifar_dir, bad, match):
    folder = cifar_dir[0]
    (folder / "data_batch_4").write_bytes(pickle.dumps(bad, protocol=2))
    err = _expect_data_error(folder, match)
    assert "data_batch_4" in str(err)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 subset (.npz)


def _write_subset(path, n_train=20, n_test=10, **override):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_subset_reads_npz(tmp_path):
    path = tmp_path / "cifar10_subset.npz"
    arrays = _write_subset(path)
    ds = data.load_cifar10_subset(path)
    assert ds.name == "cifar10-subset" and ds.image_shape == (3, 32, 32) and ds.n_classes == 10
    np.testing.assert_array_equal(ds.x_train * np.float32(255), arrays["x_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.y_train.dtype == np.int64 and ds.x_test.dtype == np.float32
    assert ds.file_sha256 == {"cifar10_subset.npz": hashlib.sha256(path.read_bytes()).hexdigest()}
    # The front door takes the file or its folder.
    for where in (path, tmp_path):
        np.testing.assert_array_equal(data.load_dataset("cifar10-subset", where).x_test, ds.x_test)


def test_subset_truncated_npz_names_the_file(tmp_path):
    path = tmp_path / "cifar10_subset.npz"
    _write_subset(path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.DataError, match="cifar10_subset.npz.*(corrupt|truncated)") as info:
        data.load_cifar10_subset(path)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    "override, match",
    [
        ({"y_test": None}, r"lacks the array\(s\) \['y_test'\]"),
        ({"x_train": np.zeros((20, 32, 32, 3), np.uint8)}, r"x_train must be uint8 of shape"),
        ({"x_test": np.zeros((10, 3, 32, 32), np.float32)}, r"x_test must be uint8"),
        ({"y_train": np.zeros(19, np.uint8)}, r"y_train must be integer labels of shape \(20,\)"),
        ({"y_train": np.full(20, 12, np.uint8)}, r"y_train must lie in 0\.\.9"),
    ],
)
def test_subset_malformed(tmp_path, override, match):
    path = tmp_path / "sub.npz"
    _write_subset(path, **override)
    with pytest.raises(data.DataError, match=match):
        data.load_cifar10_subset(path)


def test_subset_missing(tmp_path, monkeypatch):
    with pytest.raises(data.DataNotFoundError, match="nope.npz"):
        data.load_cifar10_subset(tmp_path / "nope.npz")
    with pytest.raises(data.DataNotFoundError, match="nope.npz"):
        data.find_cifar10_subset(tmp_path / "nope.npz")
    # The default location is <repo>/../shared/...: absent -> None, present -> its path.
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setattr(data, "_repo_root", lambda: repo)
    monkeypatch.chdir(repo)  # the other default candidate, <cwd>/../shared, is the same place
    assert data.find_cifar10_subset() is None
    with pytest.raises(data.DataNotFoundError, match="default location"):
        data.load_dataset("cifar10-subset")
    shared = tmp_path / "shared" / "data" / "cifar10-subset"
    shared.mkdir(parents=True)
    _write_subset(shared / "cifar10_subset.npz")
    assert data.find_cifar10_subset() == (shared / "cifar10_subset.npz").resolve()
    assert data.find_cifar10_subset(shared) == (shared / "cifar10_subset.npz").resolve()
    assert data.load_dataset("cifar10-subset").x_train.shape == (20, 3, 32, 32)


def test_subset_found_from_the_current_directory(tmp_path, monkeypatch):
    """An installed package (site-packages) finds the shared copy from the repository root,
    i.e. through the current directory."""
    monkeypatch.setattr(data, "_repo_root", lambda: tmp_path / "site-packages")
    repo = tmp_path / "checkout"
    repo.mkdir()
    shared = tmp_path / "shared" / "data" / "cifar10-subset"
    shared.mkdir(parents=True)
    _write_subset(shared / "cifar10_subset.npz")
    monkeypatch.chdir(repo)
    assert data.find_cifar10_subset() == (shared / "cifar10_subset.npz").resolve()


def test_shared_subset_when_present():
    """The real shared file, only where ../shared exists (never on a user's machine)."""
    path = data.find_cifar10_subset()
    if path is None:
        pytest.skip("no ../shared/data/cifar10-subset next to the repository")
    ds = data.load_cifar10_subset(path)
    assert ds.x_train.shape == (5085, 3, 32, 32) and ds.x_test.shape == (1017, 3, 32, 32)
    assert ds.file_sha256[path.name] == data.CIFAR10_SUBSET_SHA256
    # README: 83 to 120 images a class in each split.
    for y in (ds.y_train, ds.y_test):
        counts = np.bincount(y, minlength=10)
        assert counts.min() >= 83 and counts.max() <= 120 * 5


# ---------------------------------------------------------------------------------------------
# digits and the front door


def test_digits_split():
    ds = data.load_dataset("digits")
    assert ds.x_train.shape == (1347, 1, 8, 8) and ds.x_test.shape == (450, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.class_names == tuple(str(i) for i in range(10))
    # Stratified: each class's share of the test set is within one image of its overall share.
    all_counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    test_counts = np.bincount(ds.y_test, minlength=10)
    assert np.all(np.abs(test_counts - all_counts * 450 / 1797) <= 1)
    # Pixels are the sklearn counts 0..16 divided by 16, so 16 x is integral.
    assert np.all(ds.x_train * 16 == np.round(ds.x_train * 16))


def test_digits_seeded():
    a, b, c = data.load_digits(seed=0), data.load_digits(seed=0), data.load_digits(seed=1)
    assert a.fingerprint() == b.fingerprint()
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.fingerprint() != c.fingerprint()
    assert not np.array_equal(a.y_test, c.y_test)


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_dataset("mnist")


def test_digits_argument_checks():
    with pytest.raises(ValueError, match="test_size"):
        data.load_digits(test_size=1.5)
    with pytest.raises(TypeError, match="seed"):
        data.load_digits(seed=0.5)
