"""poissonflow: empirical Poisson fields, Poisson flows and uniformity metrics, with fused CPU
(C++) and GPU (Triton, CUDA) kernels.

    >>> import torch, poissonflow
    >>> v, log_scale = poissonflow.poisson_field(torch.randn(5, 3), torch.randn(100, 3))
"""


def _refuse_unbuilt_source_tree() -> None:
    """Stop with a clear message when this is the repository's unbuilt source folder.

    numpy, scipy and torch do the same: the source folder holds no compiled extension, and
    Python puts the working directory first on sys.path for `python -c`, `python -m` and an
    interactive shell, so from the repository root `./poissonflow` shadows the installed
    package. An install (`pip install .`) or an in-place build has `_C` beside this file; an
    editable install (`pip install -e .`) provides it through its own import hook. The choice
    against a hand-over to the installed copy: docs/DESIGN.md, "Importing from the source tree".
    """
    import importlib.machinery
    import importlib.util
    import os

    if importlib.machinery.PathFinder.find_spec("_C", __path__) is not None:
        return
    if importlib.util.find_spec(__name__ + "._C") is not None:
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    raise ImportError(
        f"poissonflow is being imported from its source folder {here}, which holds no "
        "compiled extension. Use the installed command (`poissonflow ...`), or run Python from "
        "another directory; to work on the source, build it in place with "
        "`pip install --no-build-isolation -e .`."
    )


_refuse_unbuilt_source_tree()

from typing import TYPE_CHECKING  # noqa: E402

from .field import poisson_field  # noqa: E402
from .kernels.reference import poisson_field_reference  # noqa: E402
from .registry import backends  # noqa: E402
from .transform import transform  # noqa: E402

if TYPE_CHECKING:  # loaded on first use (below); imported here for type checkers and docs
    from . import losses, metrics
    from .estimator import PoissonFlow
    from .learned import LearnedField

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
    "__version__",
]


def __getattr__(name: str):
    # scikit-learn, the network code, the losses and the metrics load on first use: `import
    # poissonflow` stays light (the losses and metrics packages alone were 18 ms of its 26).
    if name in ("losses", "metrics"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "PoissonFlow":
        from .estimator import PoissonFlow

        return PoissonFlow
    if name == "LearnedField":
        from .learned import LearnedField

        return LearnedField
    raise AttributeError(f"module 'poissonflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"PoissonFlow", "LearnedField", "losses", "metrics"})
