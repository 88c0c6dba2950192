"""poissonflow.experiments.cache: keys, verified reads, atomic writes under interruption."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from poissonflow.experiments import cache
from poissonflow.experiments.cache import ArrayCache, cache_key


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((50, 8)).astype(np.float32),
        "labels": rng.integers(0, 10, 50),
        "empty": np.zeros((0, 3)),
    }


def test_key_is_canonical():
    a = cache_key({"epochs": 3, "arch": {"widths": (8, 16), "fc": 32}}, "fp")
    b = cache_key({"arch": {"fc": 32, "widths": [8, 16]}, "epochs": 3}, "fp")
    assert a == b and len(a) == 64
    assert cache_key({"epochs": 4, "arch": {"widths": (8, 16), "fc": 32}}, "fp") != a
    assert cache_key({"epochs": 3, "arch": {"widths": (8, 16), "fc": 32}}, "other") != a
    assert cache_key({"lr": np.float32(0.5)}) == cache_key({"lr": 0.5})
    with pytest.raises(TypeError, match="cannot be part of a cache key"):
        cache_key({"f": object()})
    with pytest.raises(TypeError, match="settings must be a mapping"):
        cache_key([1, 2])


def test_roundtrip_exact(tmp_path):
    store = ArrayCache(tmp_path / "c")
    arrays = _arrays()
    key = cache_key({"x": 1})
    assert store.get(key) is None
    path = store.put(key, arrays, {"acc": 0.75, "hist": [1, 2]})
    assert path == tmp_path / "c" / f"{key}.npz"
    got, meta = store.get(key)
    assert set(got) == set(arrays)
    for k in arrays:
        assert got[k].dtype == arrays[k].dtype
        np.testing.assert_array_equal(got[k], arrays[k])
    assert meta == {"acc": 0.75, "hist": [1, 2]}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f"{key}.npz"]  # no temp left


def test_get_or_compute(tmp_path):
    store = ArrayCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return _arrays(1)

    a, meta, hit = store.get_or_compute("k1", compute, {"n": 1})
    b, meta2, hit2 = store.get_or_compute("k1", compute, {"n": 1})
    assert (hit, hit2) == (False, True) and len(calls) == 1
    assert meta == meta2 == {"n": 1}
    np.testing.assert_array_equal(a["features"], b["features"])


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage", "missing_checksum"])
def test_corrupt_entry_is_never_returned(tmp_path, damage):
    store = ArrayCache(tmp_path)
    arrays = _arrays()
    path = store.put("k", arrays)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip_byte":
        # Inside the stored float data of "features" (npz members are stored uncompressed):
        # zip's own CRC or our sha256 must catch it.
        i = bytes(blob).find(arrays["features"].tobytes()[:16])
        assert i > 0
        blob[i + 5] ^= 0x40
    elif damage == "garbage":
        blob = b"\x00" * 100
    elif damage == "missing_checksum":
        np.savez(path, **arrays)  # a complete npz, but not written by ArrayCache
        blob = path.read_bytes()
    path.write_bytes(bytes(blob))
    with pytest.warns(RuntimeWarning, match="recomputed"):
        assert store.get("k") is None
    assert not path.exists()  # removed so the next put starts clean
    got, _, hit = store.get_or_compute("k", lambda: arrays)
    assert not hit
    np.testing.assert_array_equal(store.get("k")[0]["features"], arrays["features"])


def test_tampered_array_with_valid_zip_fails_checksum(tmp_path):
    """An npz rewritten consistently (valid zip, valid CRC) but with other data: sha256 catches
    it."""
    store = ArrayCache(tmp_path)
    path = store.put("k", _arrays())
    with np.load(path) as npz:
        stored = {k: npz[k] for k in npz.files}
    stored["features"] = stored["features"] + 1
    np.savez(path, **stored)
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        assert store.get("k") is None


@pytest.mark.parametrize("where", ["savez", "replace"])
def test_interrupt_during_put_keeps_the_old_entry(tmp_path, monkeypatch, where):
    store = ArrayCache(tmp_path)
    old = _arrays(0)
    store.put("k", old)

    if where == "savez":

        def broken_savez(f, **arrays):
            f.write(b"PK\x03\x04 partial")  # some bytes, then Ctrl-C
            raise KeyboardInterrupt

        monkeypatch.setattr(cache.np, "savez", broken_savez)
    else:

        def broken_replace(src, dst):
            raise KeyboardInterrupt

        monkeypatch.setattr(cache.os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        store.put("k", _arrays(1))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["k.npz"]  # the temp file was removed
    np.testing.assert_array_equal(store.get("k")[0]["features"], old["features"])


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from poissonflow.experiments.cache import ArrayCache
    store = ArrayCache(sys.argv[1])
    big = {"a": np.random.default_rng(0).standard_normal((4_000_000,))}  # 32 MB an entry
    store.put("k0", big, {"i": 0})
    print("ready", flush=True)  # one complete entry exists
    i = 1
    while True:
        store.put(f"k{i % 3}", big, {"i": i})
        i += 1
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_writer_never_leaves_a_corrupt_entry(tmp_path, sig):
    """A real process writing 32 MB entries in a loop, interrupted (Ctrl-C) or killed at an
    arbitrary moment: every entry present afterwards is complete and verifies."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.7)  # some puts complete, one is in flight
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = ArrayCache(tmp_path)
    entries = sorted(tmp_path.glob("k*.npz"))
    assert entries
    for p in entries:
        got = store.get(p.stem)  # a corrupt entry would warn and come back None
        assert got is not None, f"{p.name} is corrupt"
        assert got[0]["a"].shape == (4_000_000,)
    temps = list(tmp_path.glob(".tmp-*"))
    if sig == signal.SIGINT:
        assert temps == []  # KeyboardInterrupt cleans up its temporary file
    assert store.clear_temporaries() == len(temps)
    assert list(tmp_path.glob(".tmp-*")) == []


def test_bad_arguments(tmp_path):
    store = ArrayCache(tmp_path)
    for key in ("../escape", "", "a/b", 3):
        with pytest.raises(ValueError, match="key must be"):
            store.put(key, _arrays())
    with pytest.raises(ValueError, match="reserved"):
        store.put("k", {"__sha256__": np.zeros(1)})
    with pytest.raises(TypeError, match="dtype object"):
        store.put("k", {"a": np.array([{"x": 1}], dtype=object)})
    assert not any(tmp_path.iterdir())
    with pytest.raises(TypeError, match="cannot be part of a cache key"):
        store.put("k", _arrays(), {"bad": object()})
    assert not any(p.name == "k.npz" for p in tmp_path.iterdir())
    assert os.listdir(tmp_path) == []


def test_get_or_compute_with_metadata_known_after_the_work(tmp_path):
    """compute() may return (arrays, meta): a training history is only known afterwards."""
    store = ArrayCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return _arrays(2), {"history": [0.5, 0.25]}

    a, meta, hit = store.get_or_compute("k", compute)
    b, meta2, hit2 = store.get_or_compute("k", compute)
    assert (hit, hit2) == (False, True) and len(calls) == 1
    assert meta == meta2 == {"history": [0.5, 0.25]}
    np.testing.assert_array_equal(a["features"], b["features"])
    with pytest.raises(ValueError, match="meta was also given"):
        store.get_or_compute("k2", compute, {"n": 1})


class _Saved:
    """A stand-in for an object with its own file format (like LearnedField.save / load)."""

    def __init__(self, values):
        self.values = list(values)

    def save(self, path):
        path.write_text(json.dumps({"format": 1, "values": self.values}))

    @classmethod
    def load(cls, path):
        blob = json.loads(path.read_text())
        if blob.get("format") != 1:
            raise ValueError(f"{path} is not a format-1 file")
        return cls(blob["values"])


def test_objects_round_trip_through_their_own_save_and_load(tmp_path):
    store = ArrayCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return _Saved([1.5, 2.5])

    kw = {"save": _Saved.save, "load": _Saved.load, "meta": lambda o: {"n": len(o.values)}}
    obj, meta, hit = store.get_or_compute_object("obj", compute, **kw)
    again, meta2, hit2 = store.get_or_compute_object("obj", compute, **kw)
    assert (hit, hit2) == (False, True) and len(calls) == 1
    assert again.values == obj.values == [1.5, 2.5] and meta == meta2 == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj.npz"]  # one verified entry


def test_object_entry_its_loader_refuses_is_recomputed(tmp_path):
    store = ArrayCache(tmp_path)
    store.put_object("obj", _Saved([1]), lambda o, p: p.write_text('{"format": 0}'))
    with pytest.warns(RuntimeWarning, match="refused by its loader"):
        assert store.get_object("obj", _Saved.load) is None
    assert not (tmp_path / "obj.npz").exists()
    store.put("arrays", _arrays())  # an array entry is not an object entry
    with pytest.warns(RuntimeWarning, match="not an object entry"):
        assert store.get_object("arrays", _Saved.load) is None


def test_entries_are_written_with_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = ArrayCache(tmp_path).put("k", _arrays())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
