"""`poissonflow transform` under torchrun (`torchrun --nproc-per-node R -m poissonflow transform
FEATURES -o OUT`): each rank reads its slice of the rows of FEATURES (and of --charges), runs
`poissonflow.distributed.transform`, and rank 0 gathers the result and writes OUT and its
.info.json (docs/DESIGN.md, "Sharding the field over processes"). Called by poissonflow.__main__
when torchrun's
environment (WORLD_SIZE, RANK) is set.

--field learned trains the field with poissonflow.distributed.fit_learned_field (or loads
--load-field) and flows each rank's rows through it. Rows are split as numpy.array_split does (the
first N mod R ranks get one more). A .npy file is
memory-mapped, so each rank reads only its rows; .npz and .pt files are read whole by every
rank and sliced (their formats have no row-wise access).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import files
from ._comm import end_process_group

__all__ = ["launched_by_torchrun", "transform_main"]


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _read_slice(path, key, rank, world):
    """(array name, this rank's rows as a numpy array, total rows)."""
    p = Path(path)
    if files._format(p, "FEATURES") == ".npy" and p.is_file():
        try:
            mm = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"FEATURES {p}: cannot be read as .npy ({err})") from None
        name, a = files._pick({None: mm}, key, p)
    else:
        name, a = files.read_named_features(p, key)
    sizes = [len(s) for s in np.array_split(np.arange(a.shape[0]), world)]
    bounds = np.cumsum([0] + sizes)
    return name, np.array(a[bounds[rank] : bounds[rank + 1]]), int(a.shape[0])


def _learned(args, feats, charges, device, rank):
    """--field learned: train on the union of the ranks' slices (fit_learned_field: DDP over
    the small batches, rank 0 saves --save-field) or load --load-field on every rank, then
    flow each rank's slice through it; a learned field is one function of each point, so the
    flow itself needs no communication."""
    from ..learned import LearnedField
    from ..transform import transform as transform_one
    from .learned import fit_learned_field

    data = feats if charges is None else charges
    if args.load_field:
        if not Path(args.load_field).is_file():
            raise ValueError(f"--load-field: no such file: {args.load_field}")
        field = LearnedField.load(args.load_field, n_features=feats.shape[1], device=device)
        extra = {"learned_field": str(args.load_field)}
    else:
        kwargs = {
            "preset": None if args.preset == "default" else args.preset,
            "seed": args.seed,
            "device": device,
            "backend": args.backend,
        }
        if args.field_epochs is not None:
            kwargs["epochs"] = args.field_epochs
        field = fit_learned_field(data.float(), checkpoint=args.save_field, **kwargs)
        extra = {
            "learned_field_epochs": len(field.loss_history_),
            "learned_field_final_loss": float(field.loss_history_[-1]),
            "learned_field_seconds": float(field.fit_seconds_),
        }
    if not len(feats):
        u = feats.new_zeros((0, feats.shape[1] + 1))
        return u, {"field": "learned", "world_size": dist.get_world_size(), **extra}
    u, info = transform_one(
        feats,
        field=field,
        **files.flow_options(args),
        progress=False,
        return_info=True,
    )
    info.update(extra)
    info["world_size"] = dist.get_world_size()
    info.pop("seconds", None)
    return u, info


def transform_main(args) -> int:
    from . import transform

    if args.field == "empirical" and (
        args.load_field
        or args.save_field
        or args.field_epochs is not None
        or args.preset != "default"
    ):
        raise ValueError(
            "--preset, --field-epochs, --load-field and --save-field go with --field learned"
        )
    device = torch.device(args.device)
    if not dist.is_initialized():
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ended = False
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        t0 = time.perf_counter()
        out = Path(args.out)
        files._format(out, "OUT")
        key, x, n_total = _read_slice(args.features, args.key, rank, world)
        charges = None
        if args.charges is not None:
            _, c, _ = _read_slice(args.charges, args.charges_key, rank, world)
            charges = torch.from_numpy(np.ascontiguousarray(c)).to(device)
        feats = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        if args.field == "learned":
            u, info = _learned(args, feats, charges, device, rank)
        else:
            u, info = transform(
                feats,
                charges=charges,
                **files.flow_options(args),
                return_info=True,
                mode=args.distributed_mode,
            )
        rows = [None] * world
        dist.all_gather_object(rows, int(u.shape[0]))
        pad = u.new_zeros((max(rows), u.shape[1]))
        pad[: u.shape[0]] = u
        parts = [torch.empty_like(pad) for _ in range(world)] if rank == 0 else None
        dist.gather(pad, parts, dst=0)
        if rank == 0:
            full = torch.cat([p[:k] for p, k in zip(parts, rows)]).cpu().numpy()
            files.write_features(out, full, key=key or "features")
            info.update(
                {
                    "features": str(args.features),
                    "n_samples": n_total,
                    "n_features": int(x.shape[1]),
                    "out": str(out),
                    "total_seconds": time.perf_counter() - t0,
                    "rows_per_rank": rows,
                }
            )
            info_path = out.with_name(out.stem + ".info.json")
            files.write_json(info_path, info)
            print(
                f"wrote {out} ({full.shape[0]} x {full.shape[1]}) and {info_path} "
                f"({world} processes)"
            )
        end_process_group()
        ended = True
    finally:
        if not ended:  # a rank failed: no barrier, the others may never reach it
            dist.destroy_process_group()
    return 0
