"""Feature files for the command line: read (N, d) arrays from .npy, .npz and .pt files, write
results back in the same formats, atomically.

    x = read_features("feats.npz", key="train")       # numpy array, dtype as stored
    write_features("flowed.npy", u)

A file that cannot be read, holds no 2-D real array, or (for .npz/.pt) holds several arrays
without `key` raises a ValueError whose message names the file, so that the command line can
print it as one line. NaN/inf values are left to poissonflow.transform, which names them.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from ._io import atomic_write_bytes

__all__ = [
    "FORMATS",
    "check_output_folder",
    "flow_options",
    "jsonable",
    "read_features",
    "read_named_features",
    "write_features",
    "write_json",
]

FORMATS = (".npy", ".npz", ".pt")


def _format(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{what} {path}: unknown format {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(FORMATS)}"
        )
    return suffix


def check_output_folder(path: Path, what: str = "OUT") -> None:
    """Refuses an output whose folder does not exist (ValueError naming it and `what`).

    The command line does not create folders: a mistyped folder fails at once, before a flow
    that may take minutes, instead of leaving the result somewhere unexpected.
    """
    folder = Path(path).parent
    if not folder.is_dir():
        kind = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{what} {path}: the folder {folder} {kind} (create it first)")


def read_features(
    path, key: str | None = None, *, what: str = "FEATURES", key_option: str = "--key"
) -> np.ndarray:
    """The (N, d) array stored in `path`; `key` picks one array of an .npz or of a .pt dict.

    `what` and `key_option` name the file and the key in error messages.
    """
    return read_named_features(path, key, what=what, key_option=key_option)[1]


def read_named_features(
    path, key: str | None = None, *, what: str = "FEATURES", key_option: str = "--key"
) -> tuple[str | None, np.ndarray]:
    """(name, array): as read_features, with the name the array had in an .npz or .pt dict
    (None for a bare .npy or tensor), so that an output can keep it."""
    path = Path(path)
    fmt = _format(path, what)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        if fmt == ".npy":
            arrays = {None: np.load(path, allow_pickle=False)}
        elif fmt == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = _read_pt(path)
    except (
        OSError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        RuntimeError,
        _pickle_error(),
    ) as err:
        raise ValueError(f"{what} {path}: cannot be read as {fmt} ({_one_line(err)})") from None
    return _pick(arrays, key, path, what, key_option)


def _read_pt(path: Path) -> dict[Any, np.ndarray]:
    import torch

    # weights_only: a .pt of features must not run code when it is loaded
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {None: _tensor_to_numpy(obj)}
    if isinstance(obj, dict):
        return {k: _tensor_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"holds a {type(obj).__name__}, not a tensor or a dict of tensors")


def _tensor_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.is_complex():
        raise ValueError(f"holds a complex tensor ({t.dtype}); features must be real")
    if t.dtype in (torch.bfloat16,):  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _pick(
    arrays: dict[Any, np.ndarray],
    key: str | None,
    path: Path,
    what: str = "FEATURES",
    key_option: str = "--key",
):
    if key is not None:
        if list(arrays) == [None]:
            raise ValueError(
                f"{what} {path}: holds one unnamed array; {key_option} picks an "
                "array of an .npz file or of a .pt dict"
            )
        if key not in arrays:
            names = ", ".join(repr(k) for k in arrays if k is not None) or "none"
            raise ValueError(f"{what} {path}: no array named {key!r} (arrays: {names})")
        a = arrays[key]
    elif len(arrays) == 1:
        key, a = next(iter(arrays.items()))
    elif not arrays:
        raise ValueError(f"{what} {path}: holds no array")
    else:
        names = ", ".join(repr(k) for k in arrays)
        raise ValueError(
            f"{what} {path}: holds several arrays ({names}); choose one with {key_option}"
        )
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(
            f"{what} {path}: must hold a 2-D (n_samples, n_features) array, got shape {a.shape}"
        )
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{what} {path}: must hold real numbers, got dtype {a.dtype}")
    return key, a


def write_features(path, array: np.ndarray, key: str = "features") -> None:
    """Writes `array` to `path` in the format of its suffix (.npz and .pt under `key`), through
    a temporary file in the same folder renamed into place: an interrupted run leaves no
    half-written output."""
    path = Path(path)
    fmt = _format(path, "OUT")
    buf = io.BytesIO()
    if fmt == ".npy":
        np.save(buf, array, allow_pickle=False)
    elif fmt == ".npz":
        np.savez(buf, **{key: array})
    else:
        import torch

        torch.save({key: torch.from_numpy(np.ascontiguousarray(array))}, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path, obj: dict[str, Any]) -> None:
    """`obj` made JSON's (jsonable) written to `path` atomically, indented, with a newline."""
    text = json.dumps(jsonable(obj), indent=1) + "\n"
    atomic_write_bytes(Path(path), text.encode())


def jsonable(obj, default: Callable[[Any], Any] = str):
    """`obj` with what JSON cannot hold made plain, recursively: the package's one converter
    for results and info files.

    Mappings become dicts with str keys, lists and tuples lists, numpy arrays nested lists,
    numpy scalars Python ones, floats that are not finite None (JSON has no NaN or infinity;
    json.dumps would write the invalid token NaN), paths str. str, int, bool and None stay;
    anything else goes to `default` (str; pass a function that raises to refuse it)."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):  # numpy's float64 too (a float subclass)
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, default) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), default)
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), default)
    if isinstance(obj, PurePath):
        return str(obj)
    return default(obj)


def _pickle_error():
    import pickle

    return pickle.UnpicklingError


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def flow_options(args) -> dict[str, Any]:
    """The flow's options of `poissonflow transform` (parsed arguments) as keyword arguments of
    `poissonflow.transform`: one mapping for the single-process command and each torchrun rank
    (the learned and the exact field alike)."""
    return {
        "start": args.start,
        "solver": args.solver,
        "steps": args.steps,
        "z_min": args.z_min,
        "z_max": args.z_max,
        "parameterization": args.parameterization,
        "output": args.output,
        "exclude_self": not args.no_exclude_self,
        "seed": args.seed,
        "backend": args.backend,
        "batch_size": args.batch_size,
    }
