"""poissonflow over torch.distributed: the field, the flow and the pairwise losses of data
sharded across processes (docs/DESIGN.md, "Sharding the field over processes").

    import torch.distributed as dist, poissonflow.distributed as pfd
    dist.init_process_group("gloo")                     # or "nccl"; e.g. under torchrun
    v, log_scale = pfd.poisson_field(x_local, charges_local)   # field of all ranks' charges
    u_local = pfd.transform(features_local)                     # flow of the union of features
    loss = pfd.riesz_uniformity_loss(z_local, s=2.0)            # global-batch uniformity
    # the same as a module with a memory bank per rank, scored as one bank (never gathered):
    # poissonflow.losses.RieszLoss(s=2.0, bank_size=65536, gather_distributed=True)
    field = pfd.fit_learned_field(features_local, checkpoint="field.pt")  # DDP training

Every function is collective (all ranks of the group call it, in the same order) and needs an
initialised process group. `import poissonflow` does not import this package.
"""

from ._comm import end_process_group
from .field import AUTO_ALLGATHER_BYTES, MODES, poisson_field
from .flow import transform
from .learned import fit_learned_field
from .losses import riesz_uniformity_loss, uniform_loss

__all__ = [
    "poisson_field",
    "transform",
    "riesz_uniformity_loss",
    "uniform_loss",
    "fit_learned_field",
    "MODES",
    "AUTO_ALLGATHER_BYTES",
    "end_process_group",
]
