"""LearnedField training pinned to the bits: tiny fits whose weights (sha256 of the state_dict)
and histories (loss and validation loss as float.hex, wrong-sign counts, iterations) were
recorded with the code before the epoch loop took its step object (now
poissonflow.learned.training.SingleProcess, shared with poissonflow.distributed.learned), and
kept through the loop's move into poissonflow.learned.training, so that refactoring the loop
cannot change what one process trains by a single bit. The cases cover the default preset
(ema, shuffled, last batch dropped), "blog-faithful" (mean loss, fixed batches, last batch
kept), "pfgm" (restrict_M, grad_clip, ema 0.9999), the plateau rule, and a data set smaller than
one large batch.

The field targets come from the float64 reference backend (cast to float32), so the pinned bits
do not depend on the CPU kernels' rounding (which their own conformance suite bounds, and which
changes when a kernel is made faster); what is pinned is the training loop: batching,
perturbation, loss, optimiser, weight averaging, the plateau rule. The references were
re-recorded so when the kernels' power-form weights landed; the loop's identity across the
refactor was shown before that, with the cpu backend (the commit that introduced this file).

Recorded with torch 2.13.0+cpu on an x86-64 CPU whose torch capability is AVX512, float32, 1 thread
and the default giving the same bits. torch may round a matrix product differently on another
CPU capability or release, so the bits are compared only there; elsewhere the test checks that
two identical fits agree bit for bit.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

RECORDED_ON = ("2.13.0+cpu", "AVX512")

from poissonflow.learned import LearnedField

CASES = {
    "default": (40, dict(epochs=3, large_batch=16, small_batch=8, seed=3)),
    "faithful": (40, dict(preset="blog-faithful", epochs=3, large_batch=16, small_batch=8, seed=1)),
    "pfgm_clip": (
        40,
        dict(preset="pfgm", epochs=3, large_batch=16, small_batch=8, seed=2, lr=1e-2),
    ),
    "plateau": (
        40,
        dict(epochs=6, large_batch=16, small_batch=8, seed=4, patience=1, eval_every=1),
    ),
    "one_batch": (
        10,
        dict(epochs=3, large_batch=16, small_batch=8, seed=5, grad_clip=0.5, loss="mean"),
    ),
}

REFERENCE = {
    "default": {
        "weights": "ee7d24064b560ae8c425eb043c39bd12f39fdb568410c04c345d1fc0369bd773",
        "loss": ["0x1.008db40000000p+1", "0x1.5a06b20000000p+1", "0x1.0c74980000000p+1"],
        "wrong": [7, 6, 5],
        "iters": 6,
        "val": [],
        "plateau": None,
    },
    "faithful": {
        "weights": "de227b408a62614a10005eb0bc05d8e135c92b51a07de8a2483cc5bb7e8124ba",
        "loss": ["0x1.ad6ebaaaaaaabp-3", "0x1.896442aaaaaabp-3", "0x1.86a3580000000p-3"],
        "wrong": [0, 0, 0],
        "iters": 9,
        "val": [],
        "plateau": None,
    },
    "pfgm_clip": {
        "weights": "5089b4f6a379bddd59ee3d2475945c26cff451018c2809c90d688ff1b314e71d",
        "loss": ["0x1.d03e080000000p-3", "0x1.3cef6e0000000p-3", "0x1.fff6d80000000p-4"],
        "wrong": [0, 0, 0],
        "iters": 6,
        "val": [],
        "plateau": None,
    },
    "plateau": {
        "weights": "c7b4c442fc4617ad8301eec3bf9e3596b8fd4df5c08e02b1b3352e01d7985b69",
        "loss": [
            "0x1.476ff80000000p+0",
            "0x1.c3f6ac0000000p+0",
            "0x1.5f3b980000000p+0",
            "0x1.0399d40000000p+0",
            "0x1.70bc7c0000000p+0",
            "0x1.3e1bba0000000p+0",
        ],
        "wrong": [0, 1, 0, 0, 0, 0],
        "iters": 12,
        "val": [
            [1, "0x1.e38fb60000000p+0"],
            [2, "0x1.e036800000000p+0"],
            [3, "0x1.dcdc660000000p+0"],
            [4, "0x1.d9b6a40000000p+0"],
            [5, "0x1.d687340000000p+0"],
            [6, "0x1.d368fa0000000p+0"],
        ],
        "plateau": None,
    },
    "one_batch": {
        "weights": "d6d438009f2ee2217dab6bff1f991ae0cc3dfed75372d208ce36c915c9ae43db",
        "loss": ["0x1.3b240e0000000p-1", "0x1.00d2060000000p-1", "0x1.0662360000000p-1"],
        "wrong": [3, 6, 7],
        "iters": 3,
        "val": [],
        "plateau": None,
    },
}


def weights_sha256(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fit(case):
    n, params = CASES[case]
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(11))
    f = LearnedField(device="cpu", backend="reference", progress=False, **params).fit(x)
    return {
        "weights": weights_sha256(f.net_),
        "loss": [float(v).hex() for v in f.loss_history_],
        "wrong": list(f.wrong_sign_history_),
        "iters": int(f.n_iterations_),
        "val": [[e, float(v).hex()] for e, v in f.val_loss_history_],
        "plateau": f.plateau_epoch_,
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_matches_the_recorded_bits(case):
    got = _fit(case)
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    if here != RECORDED_ON:
        assert got == _fit(case)  # still deterministic, whatever the rounding here
        pytest.skip(
            f"bits recorded on torch {RECORDED_ON[0]} / CPU capability "
            f"{RECORDED_ON[1]}, this is {here[0]} / {here[1]}"
        )
    assert got == REFERENCE[case]
