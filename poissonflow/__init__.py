"""poissonflow: empirical Poisson fields, Poisson flows and uniformity metrics, with fused CPU
(C++) and GPU (Triton, CUDA) kernels.

    >>> import torch, poissonflow
    >>> v, log_scale = poissonflow.poisson_field(torch.randn(5, 3), torch.randn(100, 3))
"""


def _installed_copy():
    """The installed poissonflow package directory, when this one is an unbuilt source tree.

    `pip install .` puts the package, with its compiled extension, in site-packages; but
    `python -m poissonflow ...` (and `python -c`) run from the repository root put the root first
    on sys.path, so the source tree `./poissonflow`, which holds no compiled extension, would
    shadow the install. The source tree then hands over to the install as a whole, Python files
    included, so that what runs is exactly what `pip install .` built (mixing this tree's Python
    with an extension built from another revision could break the kernels' protocol). An
    editable install (`pip install -e .`) finds its extension through its own import hook and
    is left alone.
    """
    import importlib.machinery
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if importlib.machinery.PathFinder.find_spec("_C", __path__) is not None:
        return None  # the extension is here (an install, or an in-place build)
    import importlib.util

    if importlib.util.find_spec(__name__ + "._C") is not None:
        return None  # an editable install's hook provides it
    for entry in sys.path:
        cand = os.path.join(os.path.abspath(entry or os.curdir), __name__)
        if os.path.normcase(cand) == os.path.normcase(here) or not os.path.isfile(
            os.path.join(cand, "__init__.py")
        ):
            continue
        if importlib.machinery.PathFinder.find_spec("_C", [cand]) is not None:
            return cand
    return None


_INSTALLED = _installed_copy()
if _INSTALLED is not None:
    # Run the installed package's own __init__ in this module; its submodules load from there.
    __path__[:] = [_INSTALLED]
    __file__ = __path__[0] + "/__init__.py"
    with open(__file__, encoding="utf-8") as _init:
        exec(compile(_init.read(), __file__, "exec"))
else:
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
