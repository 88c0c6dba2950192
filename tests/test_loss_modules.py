"""The nn.Module forms of the losses against their functions, and RieszLoss's bank: pushed after
the loss, saved in the state_dict (round trip), moved with the module."""

import io

import pytest
import torch

from poissonflow import losses as L

F64 = torch.float64


def feats(n=12, d=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64).to(dtype)


def value_and_grad(fn, *xs):
    xs = [x.clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out.backward()
    return out.detach(), [x.grad for x in xs]


@pytest.mark.parametrize(
    "kw",
    [{}, {"alpha": 1.5, "t": 3.0, "align_weight": 0.5, "uniform_weight": 2.0, "normalize": False}],
)
def test_align_uniform_module_equals_function(kw):
    x, y = feats(seed=1), feats(seed=2)
    a = value_and_grad(L.AlignUniformLoss(**kw), x, y)
    b = value_and_grad(lambda p, q: L.align_uniform_loss(p, q, **kw), x, y)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


@pytest.mark.parametrize("with_y", [False, True])
def test_wasserstein_module_equals_function(with_y):
    x, y = feats(seed=3), feats(seed=4)
    args = (x, y) if with_y else (x,)
    a = value_and_grad(L.WassersteinUniformityLoss(weight=0.7), *args)
    b = value_and_grad(lambda *p: L.wasserstein_uniformity_loss(*p, weight=0.7), *args)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


@pytest.mark.parametrize("target", L.NOISE_TARGETS)
@pytest.mark.parametrize("critic", L.CRITICS)
def test_noise_injected_module_equals_function(target, critic):
    z1, z2 = feats(seed=5), feats(seed=6)
    mod = L.NoiseInjectedInfoNCELoss(
        target=target, sigma=0.2, critic=critic, generator=torch.Generator().manual_seed(0)
    )
    a = value_and_grad(mod, z1, z2)
    b = value_and_grad(
        lambda p, q: L.noise_injected_infonce(
            p,
            q,
            target=target,
            sigma=0.2,
            critic=critic,
            generator=torch.Generator().manual_seed(0),
        ),
        z1,
        z2,
    )
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


def test_module_hyperparameters_are_checked_in_init():
    with pytest.raises(ValueError, match="alpha"):
        L.AlignUniformLoss(alpha=0.0)
    with pytest.raises(ValueError, match="target"):
        L.NoiseInjectedInfoNCELoss(target="cube")
    with pytest.raises(ValueError, match="temperature"):
        L.NoiseInjectedInfoNCELoss(sigma=0.0)
    with pytest.raises(ValueError, match="s"):
        L.RieszLoss(s=-1.0)
    with pytest.raises(ValueError, match="bank_size"):
        L.RieszLoss(s=1.0, bank_size=-3)
    with pytest.raises(ValueError, match="coincident"):
        L.RieszLoss(s=1.0, coincident="keep")
    with pytest.raises(ValueError, match="mode"):
        L.RieszLoss(s=1.0, mode="tree")
    with pytest.raises(TypeError, match="normalize"):
        L.RieszLoss(s=1.0, normalize=1)


@pytest.mark.parametrize("normalize", [True, False])
def test_riesz_module_equals_function_with_its_bank(normalize):
    """Three steps: each loss is the function's against the rows pushed before it, the batch is
    pushed after its loss, and the backward runs after the push (the graph holds a copy)."""
    mod = L.RieszLoss(s=2.0, bank_size=30, normalize=normalize)
    seen = []
    for step in range(3):
        x = feats(n=12, seed=10 + step)
        if not normalize:
            x = x / x.norm(dim=1, keepdim=True)
        bank = torch.cat(seen) if seen else None
        a = value_and_grad(mod, x)
        b = value_and_grad(
            lambda p, bank=bank: L.riesz_uniformity_loss(p, 2.0, bank=bank, normalize=normalize), x
        )
        assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
        seen.append(x)
        assert len(mod.bank) == min(30, 12 * (step + 1))
    assert torch.equal(mod.bank.features()[:6], seen[2][6:])  # wrapped around: FIFO


def test_riesz_module_without_bank_and_update_bank_false():
    x = feats()
    assert L.RieszLoss(s=1.0).bank is None
    assert torch.equal(L.RieszLoss(s=1.0)(x), L.riesz_uniformity_loss(x, 1.0))
    mod = L.RieszLoss(s=1.0, bank_size=8)
    mod(x, update_bank=False)
    assert len(mod.bank) == 0
    with pytest.raises(ValueError, match="does not match this loss's bank"):
        mod(feats(d=4))  # checked before any kernel runs, the bank empty or not


def test_riesz_bank_state_dict_round_trip():
    """The bank is in the state_dict (extra state): a fresh module loaded from it holds the same
    rows, write position and fill level, and computes the same next loss; torch.save works."""
    mod = L.RieszLoss(s=2.0, bank_size=20)
    for step in range(3):
        mod(feats(n=8, seed=step))
    state = mod.state_dict()
    assert set(state) == {"_extra_state"}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = L.RieszLoss(s=2.0, bank_size=20)
    assert fresh.bank is None
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.equal(fresh.bank.features(), mod.bank.features())
    assert fresh.bank.state_dict()["ptr"] == mod.bank.state_dict()["ptr"] == 4
    x = feats(n=8, seed=9)
    assert torch.equal(fresh(x), mod(x))
    # before the first forward the bank is None, and so is its saved state
    empty = L.RieszLoss(s=2.0, bank_size=20).state_dict()
    assert empty["_extra_state"] == {"bank": None}
    with pytest.raises(ValueError, match="bank_size=10"):
        L.RieszLoss(s=2.0, bank_size=10).load_state_dict(state)
    # nested in a model, under its prefix
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), mod)
    assert "1._extra_state" in model.state_dict()


def test_riesz_bank_moves_with_the_module():
    mod = L.RieszLoss(s=2.0, bank_size=10)
    mod(feats(n=4, dtype=torch.float32))
    mod.double()
    assert mod.bank.dtype == F64 and len(mod.bank) == 4
    mod(feats(n=4, dtype=F64))
    assert len(mod.bank) == 8


def test_riesz_module_excludes_a_batch_seen_twice():
    """A batch fed twice without a step: the second loss meets its copies in the bank and, as
    documented, counts them as one point each (the function's coincident='exclude')."""
    x = feats(n=10, seed=4)
    mod = L.RieszLoss(s=2.0, bank_size=50)
    mod(x)
    again, grad = value_and_grad(mod, x)
    ref = L.riesz_uniformity_loss(x, 2.0, bank=x.clone())
    assert torch.equal(again, ref) and float(grad[0].abs().max()) > 1e-3
    strict = L.RieszLoss(s=2.0, bank_size=50, coincident="raise")
    strict.load_state_dict(mod.state_dict())
    with pytest.raises(ValueError, match=r"x row (\d) and bank row \1"):
        strict(x)


def test_riesz_module_over_processes_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        L.RieszLoss(s=2.0, gather_distributed=True)(feats())
