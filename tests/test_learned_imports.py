"""The learned field's package: its public names where they always were, its four modules in one
order (each imports only those before it), and the distributed package free of scikit-learn
until it trains."""

from __future__ import annotations

import subprocess
import sys

import poissonflow
import poissonflow.learned as learned
from poissonflow.learned import FILE_FORMAT, PRESETS, LearnedField

# targets < network < training < estimator (poissonflow/learned/__init__.py)
ORDER = ("targets", "network", "training", "estimator")


def test_public_names():
    assert poissonflow.LearnedField is LearnedField is learned.estimator.LearnedField
    assert isinstance(FILE_FORMAT, int) and PRESETS == learned.network.PRESETS
    for name in learned.__all__:
        assert getattr(learned, name) is not None
    from poissonflow.learned import (
        data_norm,
        field_targets,
        pfgm_M,
        pfgm_perturb,
        pfgm_z_max,
        targets,
    )

    assert (data_norm, field_targets, pfgm_M, pfgm_perturb, pfgm_z_max) == (
        targets.data_norm,
        targets.field_targets,
        targets.pfgm_M,
        targets.pfgm_perturb,
        targets.pfgm_z_max,
    )


def test_modules_import_only_those_before_them():
    import ast
    import pathlib

    folder = pathlib.Path(learned.__file__).parent
    for i, name in enumerate(ORDER):
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        siblings = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1
        }
        assert siblings <= set(ORDER[:i]), (name, siblings - set(ORDER[:i]))


def test_distributed_does_not_import_scikit_learn(tmp_path):
    """poissonflow.distributed imports the learned package only when it trains (a fresh
    interpreter, from outside the repository)."""
    code = (
        "import sys, poissonflow.distributed; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'sklearn']; "
        "assert not bad, bad[:3]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
