"""Builds and loads the host emulator of the CUDA kernels (csrc/cuda/emulate/field_emulate.cpp).

The emulator runs the kernels' own block program (csrc/cuda/field_block.cuh) on the CPU, one
"thread" after another within each phase, so poissonflow.kernels.cuda can be exercised end to end
on CPU tensors: `EmulatorRunner` has the interface of the backend's device runner, with addresses
of host memory. See the emulator's header comment for what this does and does not validate.

The shared library is compiled once per source version with the host C++ compiler into the
temporary directory (about 20 s on 2 cores) and reused by later runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
CUDA_SRC = CSRC / "cuda"
# Everything the emulator's translation unit includes: a change to any of them rebuilds it.
SOURCES = [
    CUDA_SRC / "emulate" / "field_emulate.cpp",
    CUDA_SRC / "field_block.cuh",
    CUDA_SRC / "field_math.cuh",
    CUDA_SRC / "block_plan.h",
    CUDA_SRC / "instances.h",
    CSRC / "common" / "field_args.h",
    CSRC / "common" / "field_numerics.h",
]
# -O1: the emulator's speed hardly matters, its compile time does.
# -ffp-contract=off: the kernels write every fused multiply-add explicitly (fma()); nothing else
# may be contracted, as nvcc would not contract across them either.
FLAGS = ["-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off"]

# Largest dynamic shared memory per block on an A100 (the smaller of the two targets).
A100_SMEM_OPTIN = 166912

_CTYPES = {
    ("u", 8): ctypes.c_uint64,
    ("i", 8): ctypes.c_int64,
    ("i", 4): ctypes.c_int32,
    ("f", 8): ctypes.c_double,
}


def launch_args_type(lib: ctypes.CDLL) -> type[ctypes.Structure]:
    """A ctypes mirror of poissonflow::cuda::LaunchArgs built from the compiled struct's own
    field table (csrc/common/field_args.h), checked offset by offset."""
    lib.pf_emu_launch_arg.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_char),
    ]
    lib.pf_emu_sizeof_launch_args.restype = ctypes.c_int64
    fields, offsets = [], []
    name, offset, size = ctypes.c_char_p(), ctypes.c_int64(), ctypes.c_int64()
    kind = ctypes.c_char()
    ref = ctypes.byref
    while lib.pf_emu_launch_arg(len(fields), ref(name), ref(offset), ref(size), ref(kind)) == 0:
        fields.append((name.value.decode(), _CTYPES[(kind.value.decode(), size.value)]))
        offsets.append(offset.value)
    struct = type("LaunchArgs", (ctypes.Structure,), {"_fields_": fields})
    for (fname, _), off in zip(fields, offsets):
        if getattr(struct, fname).offset != off:
            raise RuntimeError(f"LaunchArgs.{fname}: ctypes offset differs from the C++ struct")
    if ctypes.sizeof(struct) != lib.pf_emu_sizeof_launch_args():
        raise RuntimeError("LaunchArgs: ctypes size differs from the C++ struct")
    return struct


def _numerics(lib: ctypes.CDLL) -> dict:
    lib.pf_emu_numeric.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_double),
        ctypes.POINTER(ctypes.c_int),
    ]
    out, name, value, is_int = {}, ctypes.c_char_p(), ctypes.c_double(), ctypes.c_int()
    ref = ctypes.byref
    while lib.pf_emu_numeric(len(out), ref(name), ref(value), ref(is_int)) == 0:
        out[name.value.decode()] = int(value.value) if is_int.value else value.value
    return out


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(cxx: str | None = None) -> Path:
    """Compiles the emulator if this source version is not built yet; returns the library."""
    cxx = cxx or compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX) to build the CUDA kernel emulator")
    digest = hashlib.sha256()
    for path in SOURCES:
        digest.update(path.read_bytes())
    digest.update(" ".join([cxx, *FLAGS]).encode())
    out_dir = Path(tempfile.gettempdir()) / f"poissonflow-cuda-emu-{digest.hexdigest()[:16]}"
    lib = out_dir / "libpf_cuda_emu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"build-{os.getpid()}.so"
    cmd = [cxx, *FLAGS, f"-I{CUDA_SRC}", f"-I{CSRC}", str(SOURCES[0]), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, lib)  # atomic: concurrent builds leave one complete library
    return lib


class Emulator:
    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.pf_emu_plan.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self.LaunchArgs = launch_args_type(self.lib)
        self.lib.pf_emu_launch.argtypes = [
            ctypes.POINTER(self.LaunchArgs),
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_uint64,
            ctypes.c_char_p,
            ctypes.c_int,
        ]

    def arg_names(self) -> list[str]:
        """The launch arguments (LaunchArgs fields) in declaration order."""
        return [name for name, _ in self.LaunchArgs._fields_]

    def numerics(self) -> dict:
        """The kernels' numerical constants by name, as poissonflow._C.numerics() gives them."""
        return _numerics(self.lib)

    def plan(self, mode, is_double, D, smem_limit=A100_SMEM_OPTIN, max_window=0) -> dict:
        out = (ctypes.c_int64 * 5)()
        err = ctypes.create_string_buffer(512)
        if self.lib.pf_emu_plan(mode, int(is_double), D, smem_limit, max_window, out, err, 512):
            raise ValueError(err.value.decode())
        keys = ("upt", "window", "splits", "packs", "smem_bytes")
        return dict(zip(keys, list(out)))

    def launch(self, args: dict, *, smem_limit=A100_SMEM_OPTIN, order=0, seed=0) -> None:
        a = self.LaunchArgs()
        names = set(self.arg_names())
        for key, value in args.items():
            if key not in names:
                raise KeyError(f"unknown launch argument {key!r}")
            setattr(a, key, value)
        err = ctypes.create_string_buffer(512)
        if self.lib.pf_emu_launch(ctypes.byref(a), smem_limit, order, seed, err, 512):
            raise RuntimeError(err.value.decode())


class EmulatorRunner:
    """Runs poissonflow.kernels.cuda on CPU tensors through the emulator.

    order: 0 threads ascending, 1 descending, 2 shuffled per phase. max_window > 0 narrows the
    dimension window, forcing splits in the field kernels and the unfused flow fallback.
    """

    def __init__(self, emu: Emulator, *, order=0, seed=0, max_window=0, smem_limit=A100_SMEM_OPTIN):
        self.emu, self.order, self.seed = emu, order, seed
        self.max_window, self.smem_limit = max_window, smem_limit
        self.launches: list[dict] = []

    def plan(self, mode, is_double, D) -> dict:
        return self.emu.plan(mode, is_double, D, self.smem_limit, self.max_window)

    def launch(self, **args) -> None:
        args["max_window"] = self.max_window
        self.launches.append(dict(args))
        self.emu.launch(args, smem_limit=self.smem_limit, order=self.order, seed=self.seed)


@functools.cache
def _default_emulator() -> Emulator:
    return Emulator(build())


def __getattr__(name: str):
    # `LaunchArgs` stays importable from this module as before; it is now built from the compiled
    # struct's field table (so importing it builds the emulator if needed).
    if name == "LaunchArgs":
        return _default_emulator().LaunchArgs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
