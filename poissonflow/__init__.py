"""poissonflow: empirical Poisson fields, Poisson flows and uniformity metrics, with fused CPU
(C++) and GPU (Triton, CUDA) kernels.

    >>> import torch, poissonflow
    >>> v, log_scale = poissonflow.poisson_field(torch.randn(5, 3), torch.randn(100, 3))
"""

from . import losses, metrics, probes
from ._ext import backends
from .field import poisson_field
from .reference import poisson_field_reference

__version__ = "0.1.0"

__all__ = [
    "poisson_field",
    "poisson_field_reference",
    "backends",
    "metrics",
    "losses",
    "probes",
    "__version__",
]
