"""Command line: `python -m poissonflow <command>` (also installed as `poissonflow`).

Commands:
    experiment   the end-to-end experiment (default data: scikit-learn's digits); see
                 poissonflow/experiments/experiment.py and `python -m poissonflow experiment --help`
    ssl-experiment  self-supervised encoders (poissonflow/experiments/ssl_experiment.py) under the
                 experiment's post-hoc rows and probes
    transform    flow the features of a .npy/.npz/.pt file (exact or learned field)
    report       render results.md and the plot again from an experiment's results.json
    demo         compute a field on scikit-learn's digits and print a summary; with --plot,
                 draw a flow in 3-D (charges, trajectories, end points on the hemisphere)

A wrong argument, an unreadable file or bad data ends the command with one line on stderr and
exit status 2 (set POISSONFLOW_TRACEBACK=1 to see the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2
# what the `study` extra adds (pyproject.toml): the study's commands need them, the library not
_STUDY_DEPENDENCIES = ("scipy", "matplotlib")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


# --------------------------------------------------------------------------- demo


def _demo(args) -> int:
    import time

    import torch
    from sklearn.datasets import load_digits

    import poissonflow

    x = torch.tensor(load_digits().data, dtype=torch.float32)
    x = x / x.norm(dim=1, keepdim=True)  # unit-normalised 64-d pixels
    charges, queries = x[:1500], x[1500:]  # held-out queries: no query sits on its own charge
    print("backends:", {k: v["available"] for k, v in poissonflow.backends().items()})
    t0 = time.perf_counter()
    poissonflow.poisson_field(queries, charges, eps=args.eps)
    first = time.perf_counter() - t0
    # the first call loads the extension and wakes its threads: time warm calls, best of 5
    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        v, log_scale = poissonflow.poisson_field(queries, charges, eps=args.eps)
        warm.append(time.perf_counter() - t0)
    (n, d), b = queries.shape, charges.shape[0]
    print(
        f"field of {b} charges at {n} queries in {d} dimensions: {min(warm) * 1e3:.2f} ms "
        f"(warm, best of 5; the first call, with start-up, took {first * 1e3:.0f} ms)"
    )
    print(f"|v| mean {v.norm(dim=1).mean():.4f}, log_scale mean {log_scale.mean():.3f}")
    ref_v, _ = poissonflow.poisson_field(
        queries.double(), charges.double(), eps=args.eps, backend="reference"
    )
    err = ((v.double() - ref_v).norm(dim=1) / ref_v.norm(dim=1)).max()
    if args.plot:
        from .experiments.plotting import demo_charges, flow_picture

        t0 = time.perf_counter()
        fig = flow_picture(*demo_charges(seed=0))
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(
            f"wrote {args.plot} (a 2-D charge distribution flowed through its exact field, "
            f"{time.perf_counter() - t0:.1f} s)"
        )
    # last line: scripts (and the tests) read the number from it
    print(f"max relative error of v against the float64 reference: {err:.2e}")
    return 0


# --------------------------------------------------------------------------- transform


def _z_value(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**32 - 1, got {text!r}")
    return value


def _add_transform_arguments(p) -> None:
    p.add_argument(
        "features", metavar="FEATURES", help="a .npy, .npz or .pt file holding an (N, d) array"
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        metavar="OUT",
        help="output file (.npy, .npz or .pt); the run's settings and timing go to "
        "OUT's name with .info.json",
    )
    p.add_argument(
        "--key", default=None, help="the array to read from an .npz, or from a .pt holding a dict"
    )
    p.add_argument(
        "--charges",
        default=None,
        metavar="FILE",
        help="charges (B, d) from another file (default: the features themselves)",
    )
    p.add_argument("--charges-key", default=None, help="the array to read from --charges")
    p.add_argument(
        "--field",
        choices=["empirical", "learned"],
        default="empirical",
        help="the exact field of the charges (default) or a network trained on them "
        "with PFGM's objective (poissonflow.LearnedField)",
    )
    p.add_argument(
        "--preset",
        choices=["default", "blog", "blog-faithful", "pfgm"],
        default="default",
        help="learned field's preset (with --field learned; "
        "blog-faithful: the blog code's loss and unshuffled batches)",
    )
    p.add_argument(
        "--field-epochs",
        type=int,
        default=None,
        help="learned field's training epochs (default: the preset's)",
    )
    p.add_argument(
        "--load-field",
        default=None,
        metavar="FILE",
        help="use a learned field saved with LearnedField.save instead of training",
    )
    p.add_argument(
        "--save-field", default=None, metavar="FILE", help="save the trained learned field here"
    )
    p.add_argument(
        "--start",
        choices=["plane", "flux"],
        default="plane",
        help="plane: each point at (x, z_min); flux: next to its own charge "
        "(exactly uniform end points)",
    )
    p.add_argument(
        "--solver",
        choices=["rk4", "euler"],
        default=None,
        help="ODE solver (default rk4, or the learned preset's)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="solver steps per point (default 32 RK4, 256 Euler, or the preset's)",
    )
    p.add_argument(
        "--z-min",
        type=_z_value,
        default="auto",
        help="start height, or 'auto' (0.5 x median nearest-neighbour distance)",
    )
    p.add_argument(
        "--z-max",
        type=_z_value,
        default="auto",
        help="end height, or 'auto' (1e3 x the data scale)",
    )
    p.add_argument(
        "--parameterization",
        choices=["logz", "radial"],
        default=None,
        help="logz (PFGM) or radial (the blog's update); default: the field's",
    )
    p.add_argument(
        "--output",
        choices=["sphere", "raw"],
        default=None,
        help="sphere: directions on the upper hemisphere of S^d; raw: end points",
    )
    p.add_argument(
        "--no-exclude-self",
        action="store_true",
        help="let a feature that is a charge feel its own charge",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of flux starts and of the learned field's training",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cpu", "cuda", "triton", "reference"],
        help="field kernels (default: the fastest for the device)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the computation")
    p.add_argument("--batch-size", type=int, default=16384, help="queries per kernel call")
    p.add_argument(
        "--distributed-mode",
        default="auto",
        choices=["auto", "allgather", "ring"],
        help="under torchrun: gather the charges once (allgather) or pass them "
        "around the ring at every field evaluation (ring); default: by size "
        "(poissonflow.distributed)",
    )
    bar = p.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="always show progress bars (default: only for long runs when stderr is a terminal)",
    )
    bar.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="never show progress bars",
    )


def _transform(args) -> int:
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from . import files
    from .transform import transform

    out = Path(args.out)
    # everything that can be checked before the flow is checked now, not after minutes of work
    files._format(out, "OUT")
    files.check_output_folder(out, "-o/--out")
    if args.save_field:
        files.check_output_folder(Path(args.save_field), "--save-field")
    if args.field == "empirical" and (
        args.load_field
        or args.save_field
        or args.field_epochs is not None
        or args.preset != "default"
    ):
        raise UsageError(
            "--preset, --field-epochs, --load-field and --save-field go with --field learned"
        )
    device = _device(args.device)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        # launched by torchrun: each rank flows its slice, rank 0 writes (docs/DESIGN.md
        # "Sharding the field over processes"); poissonflow.distributed is imported only on this
        # path
        from .distributed._cli import transform_main

        return transform_main(args)
    key, x = files.read_named_features(args.features, args.key, what="FEATURES", key_option="--key")
    charges = (
        None
        if args.charges is None
        else files.read_features(
            args.charges, args.charges_key, what="--charges", key_option="--charges-key"
        )
    )
    t0 = time.perf_counter()
    field, field_info = "empirical", {}
    if args.field == "learned":
        field, field_info = _learned_field(args, x if charges is None else charges, device)
    feats = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    ch = None if charges is None else torch.from_numpy(np.ascontiguousarray(charges)).to(device)
    u, info = transform(
        feats,
        charges=ch,
        field=field,
        **files.flow_options(args),
        progress=args.progress,
        return_info=True,
    )
    files.write_features(out, u.cpu().numpy(), key=key or "features")
    info.update(field_info)
    info.update(
        {
            "features": str(args.features),
            "n_samples": int(x.shape[0]),
            "n_features": int(x.shape[1]),
            "out": str(out),
            "total_seconds": time.perf_counter() - t0,
        }
    )
    info_path = out.with_name(out.stem + ".info.json")
    files.write_json(info_path, info)
    print(f"wrote {out} ({u.shape[0]} x {u.shape[1]}) and {info_path}")
    return 0


def _device(text: str):
    """The torch device of --device, refused in one line unless this machine can compute on it."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device: not a torch device: {text!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device: poissonflow computes on 'cpu' or 'cuda' devices, got {text!r}")
    if not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA device is visible"
        )
        raise UsageError(f"--device {text}: {why} (use --device cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {text}: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), numbered from 0"
        )
    return device


def _learned_field(args, data, device):
    from pathlib import Path

    from .learned import LearnedField

    if args.load_field:
        if not Path(args.load_field).is_file():
            raise UsageError(f"--load-field: no such file: {args.load_field}")
        try:
            field = LearnedField.load(args.load_field, n_features=data.shape[1], device=device)
        except (ValueError, KeyError, TypeError, EOFError, RuntimeError, _pickle_error()) as err:
            message = " ".join(str(err).split()) or type(err).__name__
            message = message.split(". ")[0]  # torch.load's advice runs to several sentences
            raise UsageError(
                f"--load-field {args.load_field}: not a field saved by "
                f"LearnedField.save ({message})"
            ) from None
        return field, {"learned_field": str(args.load_field)}
    kwargs = {
        "preset": None if args.preset == "default" else args.preset,
        "seed": args.seed,
        "device": device,
        "backend": args.backend,
    }
    if args.field_epochs is not None:
        kwargs["epochs"] = args.field_epochs
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    field = LearnedField(**kwargs).fit(data, progress=show)
    if args.save_field:
        field.save(args.save_field)
    return field, {
        "learned_field_epochs": len(field.loss_history_),
        "learned_field_final_loss": float(field.loss_history_[-1]),
        "learned_field_seconds": float(field.fit_seconds_),
    }


def _pickle_error():
    import pickle

    return pickle.UnpicklingError


# --------------------------------------------------------------------------- main


def _report(args) -> int:
    from .experiments.report import rerender

    rerender(args.results_json)
    print(f"wrote results.md and its plot beside {args.results_json}")
    return 0


def _experiment(args) -> int:
    from .experiments.experiment import main as experiment_main

    return experiment_main(args)


def _ssl_experiment(args) -> int:
    from .experiments.ssl_experiment import main as ssl_main

    return ssl_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="poissonflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    exp = sub.add_parser("experiment", help="does Poisson-flow uniformity help a linear probe?")
    from .experiments.experiment import add_arguments

    add_arguments(exp)
    exp.set_defaults(run=_experiment)
    sx = sub.add_parser(
        "ssl-experiment", help="self-supervised encoders under the experiment's rows and probes"
    )
    from .experiments.ssl_experiment import add_arguments as ssl_arguments

    ssl_arguments(sx)
    sx.set_defaults(run=_ssl_experiment)
    tr = sub.add_parser("transform", help="flow the features of a .npy/.npz/.pt file")
    _add_transform_arguments(tr)
    tr.set_defaults(run=_transform)
    rep = sub.add_parser("report", help="render results.md and the plot from a results.json")
    rep.add_argument("results_json", help="an experiment's results.json (outputs go beside it)")
    rep.set_defaults(run=_report)
    demo = sub.add_parser("demo", help="compute a field on the digits data set")
    demo.add_argument("--eps", type=float, default=0.1, help="softening of the demo field")
    demo.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="also draw a 3-D flow picture (charges, trajectories, hemisphere)",
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.run(args)
    except ModuleNotFoundError as err:
        if err.name not in _STUDY_DEPENDENCIES:
            raise
        print(
            f"poissonflow {args.command}: error: this command needs {err.name}, which the "
            "study extra installs: pip install 'poissonflow[study]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except (UsageError, ValueError, TypeError, OSError) as err:
        if os.environ.get("POISSONFLOW_TRACEBACK") == "1":
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"poissonflow {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
