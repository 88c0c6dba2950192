"""The study's protocol: the validation split every choice is made on, and the seed-aware
comparisons against the raw features (docs/DESIGN.md, "Metrics and probes").

Validation split. Per seed, a stratified share (VAL_FRACTION) of the data set's training images
is held out before anything trains: the encoder, the learned fields and the exact field's
charges see only the rest (the "fit" images). Every choice is made on the held-out images' own
features: the probe's C, k of k-NN, the self-supervised study's Riesz exponent and uniformity
weight. The test set is scored once, with the choices made. Its size and indices are recorded
in results.json ("validation" of every seed).

Statistics. `_compare` is the one place the drivers call the statistics module
(reanalyse.run_statistics, stats.paired_summary): every row x probe against the raw features
under the same probe, a two-level bootstrap over seeds and test images, the paired t-test over
the per-seed differences, McNemar per seed; the primary comparison declared in docs/DESIGN.md
("Statistics of the study") alone, the rest Benjamini-Hochberg corrected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["VAL_FRACTION", "run_name", "split_record", "validation_split"]

# A fifth of the training images: 270 of the 1347 digits, 1017 of the 5085 CIFAR-10-subset
# images (about 27 and 100 a class), enough to rank seven values of C.
VAL_FRACTION = 0.2


def validation_split(y_train, seed: int, fraction: float = VAL_FRACTION):
    """(fit indices, validation indices) into the training set: a stratified draw of
    ceil(fraction * N) images with `seed`, each sorted. The same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(y_train)
    idx = np.arange(len(y))
    fit, val = train_test_split(idx, test_size=fraction, stratify=y, random_state=int(seed))
    return np.sort(fit), np.sort(val)


def split_record(fit_idx, val_idx, fraction: float = VAL_FRACTION) -> dict[str, Any]:
    """What results.json records of a seed's validation split."""
    return {
        "fraction": fraction,
        "n_val": len(val_idx),
        "n_fit": len(fit_idx),
        "indices": [int(i) for i in val_idx],
        "held_out_from": ["encoder", "learned fields", "exact field charges", "probe fits"],
    }


def _compare(predictions: dict, run: str | None) -> dict[str, Any]:
    """The seed-aware statistics of one run from its per-image test predictions ({seed:
    ({row: {probe: labels}}, y_test)}): every row x probe against the raw features and the
    blog's comparisons, each a two-level bootstrap interval over seeds and test images and a
    paired t-test over the seeds, McNemar per seed, the primary comparison tested alone and the
    rest Benjamini-Hochberg corrected (stats.py; results.json's "seed_aware")."""
    from .reanalyse import run_statistics

    return run_statistics(predictions, run=run)


def run_name(out_dir) -> str:
    """The run's name as the statistics and the verdict know it: its folder under
    docs/results (e.g. "digits/faithful"), else the folder's name."""
    from pathlib import Path

    parts = Path(out_dir).resolve().parts
    if "results" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("results") :])
    return Path(out_dir).name
