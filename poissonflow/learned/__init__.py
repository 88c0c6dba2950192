"""The learned field: a small network trained on PFGM's objective, whose flow is the transform
(docs/DESIGN.md, "The learned field").

    field = poissonflow.LearnedField(preset="blog").fit(features)
    z = field.transform(features)

Four modules, each importing only those listed before it:

    targets    PFGM's perturbation, the field targets (one fused kernel call) and the M / z_max rule
    network    the MLP, the presets (table and reasons) and the settings of one fit
    training   the epoch loop with its step object, the plateau rule, the weights' average
    estimator  `LearnedField` (scikit-learn conventions), its save / load format (FILE_FORMAT)

poissonflow.distributed.learned trains the same network data-parallel through `training`.
"""

from .estimator import FILE_FORMAT, LearnedField
from .network import PRESETS
from .targets import data_norm, field_targets, pfgm_M, pfgm_perturb, pfgm_z_max

__all__ = [
    "LearnedField",
    "PRESETS",
    "FILE_FORMAT",
    "data_norm",
    "field_targets",
    "pfgm_M",
    "pfgm_perturb",
    "pfgm_z_max",
]
