"""Command line: `python -m poissonflow <command>` (also installed as `poissonflow`).

Commands:
    experiment   the end-to-end experiment (default data: scikit-learn's digits); see
                 poissonflow/experiment.py and `python -m poissonflow experiment --help`
    report       render results.md and the plot again from an experiment's results.json
    demo         compute a field on scikit-learn's digits and print a summary
"""

from __future__ import annotations

import argparse
import sys


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
    v, log_scale = poissonflow.poisson_field(queries, charges, eps=args.eps)
    dt = time.perf_counter() - t0
    (n, d), b = queries.shape, charges.shape[0]
    print(f"field of {b} charges at {n} queries in {d} dimensions: {dt * 1e3:.1f} ms")
    print(f"|v| mean {v.norm(dim=1).mean():.4f}, log_scale mean {log_scale.mean():.3f}")
    ref_v, _ = poissonflow.poisson_field(
        queries.double(), charges.double(), eps=args.eps, backend="reference"
    )
    err = ((v.double() - ref_v).norm(dim=1) / ref_v.norm(dim=1)).max()
    print(f"max relative error of v against the float64 reference: {err:.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poissonflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    exp = sub.add_parser("experiment", help="does Poisson-flow uniformity help a linear probe?")
    from .experiment import add_arguments

    add_arguments(exp)
    rep = sub.add_parser("report", help="render results.md and the plot from a results.json")
    rep.add_argument("results_json", help="an experiment's results.json (outputs go beside it)")
    demo = sub.add_parser("demo", help="compute a field on the digits data set")
    demo.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.command == "experiment":
        from .experiment import main as experiment_main

        return experiment_main(args)
    if args.command == "report":
        from pathlib import Path

        from .report import rewrite_outputs

        path = Path(args.results_json)
        if not path.is_file():
            parser.error(f"results_json: no such file: {path}")
        rewrite_outputs(path)
        print(f"wrote {path.parent / 'results.md'} and its plot")
        return 0
    if args.command == "demo":
        return _demo(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
