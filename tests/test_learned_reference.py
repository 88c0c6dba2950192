"""LearnedField training pinned to the bits: tiny fits whose weights (sha256 of the state_dict)
and histories (loss and validation loss as float.hex, wrong-sign counts, iterations) were
recorded with the code before `_train_epoch` took its step object (poissonflow.learned.
_SingleProcess, shared with poissonflow.distributed.learned), so that refactoring the loop
cannot change what one process trains by a single bit. The cases cover the default preset
(ema, shuffled, last batch dropped), "blog-faithful" (mean loss, fixed batches, last batch
kept), "pfgm" (restrict_M, grad_clip, ema 0.9999), the plateau rule, and a data set smaller than
one large batch.

Recorded on the CPU (x86-64, torch 2.13.0+cpu, float32; 1 thread and the
default gave the same bits). Another CPU family or torch release may round a matrix product
differently; if every case fails at once after such a change, and not after an edit of
poissonflow/learned.py, re-record the reference rather than look for a bug in the loop.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from poissonflow.learned import LearnedField

CASES = {
    "default": (40, dict(epochs=3, large_batch=16, small_batch=8, seed=3)),
    "faithful": (40, dict(preset="blog-faithful", epochs=3, large_batch=16, small_batch=8,
                          seed=1)),
    "pfgm_clip": (40, dict(preset="pfgm", epochs=3, large_batch=16, small_batch=8, seed=2,
                           lr=1e-2)),
    "plateau": (40, dict(epochs=6, large_batch=16, small_batch=8, seed=4, patience=1,
                         eval_every=1)),
    "one_batch": (10, dict(epochs=3, large_batch=16, small_batch=8, seed=5, grad_clip=0.5,
                           loss="mean")),
}

REFERENCE = {
    "default": {
        "weights": "ee7d24064b560ae8c425eb043c39bd12f39fdb568410c04c345d1fc0369bd773",
        "loss": ["0x1.008db40000000p+1", "0x1.5a06b20000000p+1", "0x1.0c74980000000p+1"],
        "wrong": [7, 6, 5], "iters": 6, "val": [], "plateau": None,
    },
    "faithful": {
        "weights": "de227b408a62614a10005eb0bc05d8e135c92b51a07de8a2483cc5bb7e8124ba",
        "loss": ["0x1.ad6ebaaaaaaabp-3", "0x1.896442aaaaaabp-3", "0x1.86a3580000000p-3"],
        "wrong": [0, 0, 0], "iters": 9, "val": [], "plateau": None,
    },
    "pfgm_clip": {
        "weights": "85bb3c57d692ea39571e9c9a2a278a6cf43919e2ba01f34a03f0e56407452024",
        "loss": ["0x1.d03e080000000p-3", "0x1.3cef6e0000000p-3", "0x1.fff6d80000000p-4"],
        "wrong": [0, 0, 0], "iters": 6, "val": [], "plateau": None,
    },
    "plateau": {
        "weights": "c7b4c442fc4617ad8301eec3bf9e3596b8fd4df5c08e02b1b3352e01d7985b69",
        "loss": ["0x1.476ff80000000p+0", "0x1.c3f6ac0000000p+0", "0x1.5f3b980000000p+0",
                 "0x1.0399d40000000p+0", "0x1.70bc7c0000000p+0", "0x1.3e1bba0000000p+0"],
        "wrong": [0, 1, 0, 0, 0, 0], "iters": 12,
        "val": [[1, "0x1.e38fb60000000p+0"], [2, "0x1.e036800000000p+0"],
                [3, "0x1.dcdc660000000p+0"], [4, "0x1.d9b6a60000000p+0"],
                [5, "0x1.d687340000000p+0"], [6, "0x1.d368fa0000000p+0"]],
        "plateau": None,
    },
    "one_batch": {
        "weights": "d6d438009f2ee2217dab6bff1f991ae0cc3dfed75372d208ce36c915c9ae43db",
        "loss": ["0x1.3b240e0000000p-1", "0x1.00d2060000000p-1", "0x1.0662340000000p-1"],
        "wrong": [3, 6, 7], "iters": 3, "val": [], "plateau": None,
    },
}


def weights_sha256(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_matches_the_recorded_bits(case):
    n, params = CASES[case]
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(11))
    f = LearnedField(device="cpu", backend="cpu", progress=False, **params).fit(x)
    got = {
        "weights": weights_sha256(f.net_),
        "loss": [float(v).hex() for v in f.loss_history_],
        "wrong": list(f.wrong_sign_history_),
        "iters": int(f.n_iterations_),
        "val": [[e, float(v).hex()] for e, v in f.val_loss_history_],
        "plateau": f.plateau_epoch_,
    }
    assert got == REFERENCE[case]
