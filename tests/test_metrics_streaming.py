"""The streaming metrics (update / compute / reset) against the one-shot metrics on the
concatenated batches, one process (the sync over ranks: tests/test_distributed_losses.py)."""

import numpy as np
import pytest
import torch

from poissonflow import metrics as M

F64 = torch.float64


def data(n=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return x, x + 0.3 * torch.randn(n, d, generator=g, dtype=F64)


PARTS = [slice(0, 7), slice(7, 7), slice(7, 150), slice(150, 300)]  # an empty batch too


def stream(metric, *tensors):
    for p in PARTS:
        metric.update(*(t[p] for t in tensors))
    return float(metric.compute())


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_effective_rank_and_rankme(center, normalize):
    x, _ = data()
    kw = {"center": center, "normalize": normalize}
    assert stream(M.EffectiveRank(**kw), x) == pytest.approx(M.effective_rank(x, **kw), rel=1e-12)
    assert stream(M.RankMe(**kw), x) == pytest.approx(M.rankme(x, **kw), rel=1e-12)
    assert stream(M.EffectiveRank(eps=1e-7, **kw), x) == pytest.approx(M.rankme(x, **kw), rel=1e-12)


def test_rank_deficient_and_fewer_rows_than_columns():
    """N < D and rank 3 of 16: min(N, D) values are kept, zero eigenvalues count as 0 (RankMe
    adds eps to each of the min(N, D) values, as the SVD form does)."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(40, 3, generator=g, dtype=F64) @ torch.randn(3, 16, generator=g, dtype=F64)
    for x in (low, low[:9]):
        for cls, fn in ((M.EffectiveRank, M.effective_rank), (M.RankMe, M.rankme)):
            m = cls()
            m.update(x[:4])
            m.update(x[4:])
            assert float(m.compute()) == pytest.approx(fn(x), rel=1e-7)


def test_wasserstein_alignment_uniformity():
    x, y = data()
    assert stream(M.WassersteinUniformity(), x) == pytest.approx(
        float(M.wasserstein_uniformity(x)), rel=1e-10
    )
    assert stream(M.Alignment(), x, y) == pytest.approx(float(M.align_loss(x, y)), rel=1e-12)
    assert stream(M.Alignment(1.5), x, y) == pytest.approx(
        float(M.align_loss(x, y, 1.5)), rel=1e-12
    )
    u, v = (t / t.norm(dim=1, keepdim=True) for t in (x, y))
    assert stream(M.Alignment(normalize=True), x, y) == pytest.approx(
        float(M.align_loss(u, v)), rel=1e-12
    )
    assert stream(M.Uniformity(), u) == float(M.uniform_loss(u))
    assert stream(M.Uniformity(t=3.0, normalize=True), x) == float(M.uniform_loss(u, 3.0))


def test_float32_numpy_and_gradients_are_detached():
    x, _ = data()
    x32 = x.float().requires_grad_()
    m = M.WassersteinUniformity()
    m.update(x32[:100])
    m.update(x32[100:].detach().numpy())
    assert float(m.compute()) == pytest.approx(float(M.wasserstein_uniformity(x.float())), rel=1e-5)
    u = M.Uniformity(normalize=True)
    u.update(x32)
    assert float(u.compute()) == float(M.uniform_loss(torch.nn.functional.normalize(x32.detach())))


def test_reset_and_errors():
    x, y = data()
    for m, args in (
        (M.EffectiveRank(), (x,)),
        (M.WassersteinUniformity(), (x,)),
        (M.Uniformity(), (x,)),
        (M.Alignment(), (x, y)),
    ):
        with pytest.raises(ValueError, match="at least"):
            m.compute()
        m.update(*(a[:50] for a in args))
        first = float(m.compute())
        m.update(*(a[50:] for a in args))
        assert float(m.compute()) != first
        m.reset()
        m.update(*(a[:50] for a in args))
        assert float(m.compute()) == first
    m = M.EffectiveRank()
    m.update(x)
    with pytest.raises(ValueError, match="columns"):
        m.update(x[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        M.Uniformity().update(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="same shape"):
        M.Alignment().update(x, y[:3])
    with pytest.raises(TypeError, match="sync"):
        M.RankMe(sync=1)
    with pytest.raises(ValueError, match="alpha"):
        M.Alignment(alpha=-1.0)
    with pytest.raises(TypeError, match="numpy"):
        M.Uniformity().update([[1.0, 2.0]])
    assert "eps=1e-07" in repr(M.RankMe())


def test_memory_of_the_gram_metrics_does_not_grow():
    x, _ = data(n=2000, d=8)
    m = M.EffectiveRank()
    for i in range(0, 2000, 100):
        m.update(x[i : i + 100])
    sizes = [t.numel() for t in (m._sum, m._gram)]
    assert sizes == [8, 64]
    assert float(m.compute()) == pytest.approx(M.effective_rank(x), rel=1e-12)
    assert np.isfinite(float(m.compute()))
    assert m.compute().dtype == torch.float64 and m.compute().ndim == 0
