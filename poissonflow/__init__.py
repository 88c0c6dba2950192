"""poissonflow: empirical Poisson fields, Poisson flows and uniformity metrics, with fused CPU
(C++) and GPU (Triton, CUDA) kernels.

    >>> import torch, poissonflow
    >>> v, log_scale = poissonflow.poisson_field(torch.randn(5, 3), torch.randn(100, 3))
"""

from . import losses, metrics, probes
from ._ext import backends
from .field import poisson_field
from .reference import poisson_field_reference
from .transform import transform

__version__ = "0.1.0"

__all__ = [
    "poisson_field",
    "poisson_field_reference",
    "transform",
    "PoissonFlow",
    "LearnedField",
    "backends",
    "metrics",
    "losses",
    "probes",
    "__version__",
]


def __getattr__(name):
    # scikit-learn and the network code load on first use: `import poissonflow` stays light.
    if name == "PoissonFlow":
        from .estimator import PoissonFlow

        return PoissonFlow
    if name == "LearnedField":
        from .learned import LearnedField

        return LearnedField
    raise AttributeError(f"module 'poissonflow' has no attribute {name!r}")
