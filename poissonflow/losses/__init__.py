"""Training losses of the papers whose metrics `poissonflow.metrics` reports, so encoders can be
trained the ways the literature compares (docs/DESIGN.md, "Metrics and probes"). Each function
takes features (N, D) and returns a 0-dim tensor with gradients; lower is better for all of them.
Each has an `torch.nn.Module` form with its hyperparameters in `__init__`:

| function | module | source |
|---|---|---|
| `align_uniform_loss` | `AlignUniformLoss` | Wang & Isola (ICML 2020) |
| `wasserstein_uniformity_loss` | `WassersteinUniformityLoss` | Fang et al. (ICLR 2024) |
| `contrastive_l2_loss` | | the blog's closing proposal |
| `noise_injected_infonce` | `NoiseInjectedInfoNCELoss` | Butakov et al. (2024) |
| `riesz_uniformity_loss` | `RieszLoss` | Riesz s-energy through the field kernel |

(The Riesz loss: docs/DESIGN.md, "The field as a Riesz-energy loss".)

`RieszLoss` owns its memory bank (a `FeatureBank`, checkpointed in its `state_dict`) and, with
`gather_distributed=True`, scores the global batch against the union of every rank's bank
without gathering the banks (`poissonflow.distributed.riesz_uniformity_loss`).
"""

from __future__ import annotations

from ..bank import FeatureBank
from .functions import CRITICS as CRITICS  # the noise-injected loss's choices
from .functions import NOISE_TARGETS as NOISE_TARGETS
from .functions import (
    align_uniform_loss,
    contrastive_l2_loss,
    noise_injected_infonce,
    riesz_uniformity_loss,
    wasserstein_uniformity_loss,
)
from .modules import (
    AlignUniformLoss,
    NoiseInjectedInfoNCELoss,
    RieszLoss,
    WassersteinUniformityLoss,
)

__all__ = [
    "align_uniform_loss",
    "wasserstein_uniformity_loss",
    "contrastive_l2_loss",
    "noise_injected_infonce",
    "riesz_uniformity_loss",
    "AlignUniformLoss",
    "WassersteinUniformityLoss",
    "NoiseInjectedInfoNCELoss",
    "RieszLoss",
    "FeatureBank",
]
