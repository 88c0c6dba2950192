"""An on-disk cache keyed by settings, safe against interruption: numpy arrays (the encoder's
features) and whole objects that save themselves to a file (a trained LearnedField).

An entry is one ``<key>.npz`` file holding the arrays, a JSON metadata string and a sha256 of
the arrays. An object is stored as the bytes of the file its `save` writes, one uint8 array of
an ordinary entry, so objects get the same guarantees:

- Atomic: an entry is written through `poissonflow._io.atomic_write` (temporary file in the same
  folder, fsync, `os.replace`). A Ctrl-C or crash at any moment leaves either no entry or a
  complete one; a hard kill can leave a ``.tmp-*`` file, which is never read and is removed by
  `ArrayCache.clear_temporaries`.
- Verified: `get` recomputes the checksum; an unreadable, truncated or mismatching entry is
  deleted and reported as a miss, never returned. An object entry that its `load` refuses is
  treated the same way.

    key = cache_key({"epochs": 20, ...}, dataset.fingerprint())
    arrays = cache.get_or_compute(key, lambda: {"features": f}, meta={...})
    field, meta, hit = cache.get_or_compute_object(key, lambda: LearnedField().fit(f),
                                                   save=LearnedField.save, load=LearnedField.load)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .._io import TMP_PREFIX, atomic_write

__all__ = ["ArrayCache", "cache_key", "arrays_sha256", "CACHE_FORMAT_VERSION"]

# Bumped whenever the entry layout changes, so old entries become misses instead of errors.
CACHE_FORMAT_VERSION = 1

_META = "__meta__"
_CHECKSUM = "__sha256__"
_RESERVED = (_META, _CHECKSUM)
_TMP_PREFIX = TMP_PREFIX
_OBJECT = "object_file"  # the array holding an object entry's file bytes

T = TypeVar("T")


def _canonical(obj):
    """JSON-able canonical form: tuples as lists, numpy scalars as Python numbers, dict keys as
    sorted strings; anything else is refused so a key never depends on a repr."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"settings value {obj!r} of type {type(obj).__name__} cannot be part of a "
        "cache key (use str, int, float, bool, None, lists/tuples or dicts)"
    )


def cache_key(settings: Mapping, fingerprint: str = "") -> str:
    """sha256 (hex) of the canonical JSON of `settings` and the data `fingerprint`.

    Equal settings in any dict order give the same key; any changed value gives another.
    """
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping, got {type(settings).__name__}")
    if not isinstance(fingerprint, str):
        raise TypeError(f"fingerprint must be a str, got {type(fingerprint).__name__}")
    payload = json.dumps(
        {
            "format": CACHE_FORMAT_VERSION,
            "settings": _canonical(settings),
            "fingerprint": fingerprint,
        },
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def arrays_sha256(arrays: Mapping[str, np.ndarray], meta_json: str = "") -> str:
    """sha256 over the arrays in name order (name, dtype, shape, bytes) and the metadata."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    h.update(meta_json.encode())
    return h.hexdigest()


class ArrayCache:
    """A folder of verified ``<key>.npz`` entries (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not key or not all(c.isalnum() or c in "-_" for c in key):
            raise ValueError(
                f"key must be a non-empty string of letters, digits, '-' or '_', got {key!r}"
            )
        return self.root / f"{key}.npz"

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """(arrays, meta) of a complete, verified entry, or None. A corrupt entry is deleted."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored = {name: npz[name] for name in npz.files}
            meta_json = str(stored.pop(_META)[()])
            checksum = str(stored.pop(_CHECKSUM)[()])
            meta = json.loads(meta_json)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
            self._discard(path, f"unreadable ({type(exc).__name__})")
            return None
        if arrays_sha256(stored, meta_json) != checksum:
            self._discard(path, "checksum mismatch")
            return None
        return stored, meta

    def put(self, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping | None = None) -> Path:
        """Writes an entry atomically; returns its path. meta must be JSON-serialisable."""
        path = self.path(key)
        arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
        clash = [k for k in arrays if k in _RESERVED]
        if clash:
            raise ValueError(f"arrays may not use the reserved name(s) {clash}")
        for k, v in arrays.items():
            if v.dtype.hasobject:
                raise TypeError(
                    f"arrays[{k!r}] has dtype object; only plain numeric or string "
                    "arrays can be cached (no pickle)"
                )
        meta_json = json.dumps(_canonical(dict(meta or {})), sort_keys=True, allow_nan=False)
        checksum = arrays_sha256(arrays, meta_json)
        self.root.mkdir(parents=True, exist_ok=True)
        return atomic_write(
            path,
            lambda f: np.savez(
                f, **arrays, **{_META: np.array(meta_json), _CHECKSUM: np.array(checksum)}
            ),
        )

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], Mapping[str, np.ndarray] | tuple[Mapping[str, np.ndarray], Mapping]],
        meta: Mapping | None = None,
    ) -> tuple[dict[str, np.ndarray], dict, bool]:
        """(arrays, meta, hit): the cached entry, or compute(), store it and return it.

        compute() returns the arrays, or (arrays, meta) when the metadata is only known once
        the work is done (a training history); then `meta` must be None.
        """
        found = self.get(key)
        if found is not None:
            return found[0], found[1], True
        result = compute()
        if isinstance(result, tuple):
            if meta is not None:
                raise ValueError("compute() returned (arrays, meta) but meta was also given")
            result, meta = result
        arrays = {str(k): np.asarray(v) for k, v in result.items()}
        self.put(key, arrays, meta)
        return arrays, _canonical(dict(meta or {})), False

    # ------------------------------------------------------------------ objects
    def put_object(
        self, key: str, obj: Any, save: Callable[[Any, Path], None], meta: Mapping | None = None
    ) -> Path:
        """Stores `obj` as the file save(obj, path) writes; returns the entry's path."""
        with tempfile.TemporaryDirectory(prefix="poissonflow-cache-") as folder:
            file = Path(folder) / "object"
            save(obj, file)
            data = np.frombuffer(file.read_bytes(), dtype=np.uint8)
        return self.put(key, {_OBJECT: data}, meta)

    def get_object(self, key: str, load: Callable[[Path], T]) -> tuple[T, dict] | None:
        """(load(path of the stored file), meta) of a verified object entry, or None. An entry
        that is not an object entry, or whose file `load` refuses (ValueError, KeyError,
        RuntimeError, OSError: written by an incompatible version), is deleted: a miss."""
        found = self.get(key)
        if found is None:
            return None
        arrays, meta = found
        path = self.path(key)
        if set(arrays) != {_OBJECT} or arrays[_OBJECT].dtype != np.uint8:
            self._discard(path, "not an object entry")
            return None
        with tempfile.TemporaryDirectory(prefix="poissonflow-cache-") as folder:
            file = Path(folder) / "object"
            file.write_bytes(arrays[_OBJECT].tobytes())
            try:
                obj = load(file)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                self._discard(path, f"refused by its loader ({type(exc).__name__}: {exc})")
                return None
        return obj, meta

    def get_or_compute_object(
        self,
        key: str,
        compute: Callable[[], T],
        *,
        save: Callable[[T, Path], None],
        load: Callable[[Path], T],
        meta: Mapping | Callable[[T], Mapping] | None = None,
    ) -> tuple[T, dict, bool]:
        """(object, meta, hit): the cached object, or compute(), store it and return it.
        `meta` may be a function of the computed object (its training time, say)."""
        found = self.get_object(key, load)
        if found is not None:
            return found[0], found[1], True
        obj = compute()
        meta = meta(obj) if callable(meta) else meta
        self.put_object(key, obj, save, meta)
        return obj, _canonical(dict(meta or {})), False

    def clear_temporaries(self) -> int:
        """Removes temporary files left by killed writers; returns how many. Only call it when
        no other process is writing to this folder."""
        n = 0
        if self.root.is_dir():
            for p in self.root.glob(f"{_TMP_PREFIX}*"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def _discard(self, path: Path, why: str) -> None:
        import warnings

        warnings.warn(
            f"cache entry {path} is {why}; it is removed and will be recomputed",
            RuntimeWarning,
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
