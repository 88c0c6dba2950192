"""Downstream probes of a representation: a tuned linear probe, the blog's default logistic
regression, and k-nearest-neighbour accuracy (docs/DESIGN.md, "Metrics and probes").

scikit-learn is imported inside the functions, so `import poissonflow` stays light. Features
may be numpy arrays or torch tensors (detached and copied to the CPU); labels are 1-D arrays of
class labels (ints or strings).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CONVERGED_MAX_ITER",
    "DEFAULT_CS",
    "KNN_GRID",
    "ProbeResult",
    "knn_accuracy",
    "knn_predict",
    "knn_tuned",
    "labels_per_class_probe",
    "linear_probe",
    "low_label_probe",
]

# The regularisation grid of the tuned probe: logistic regression's inverse strength C from
# 1e-3 to 1e3, a decade apart.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 3, 7))

# k of k-NN tried on the validation split (capped at the smallest training class).
KNN_GRID = (1, 3, 5, 10, 20, 50, 100, 200)

# The blog's classifier run to convergence: scikit-learn's LogisticRegression() with C = 1 and
# this iteration cap instead of 100 (lbfgs stops at its own tolerance long before on the
# study's features; the iterations used are recorded).
CONVERGED_MAX_ITER = 100_000


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of `linear_probe`.

    train_accuracy / test_accuracy: of the final model, fit on the whole training set.
    val_accuracy: of the chosen C on the validation split (None in blog mode).
    C: the chosen (or, in blog mode, default 1.0) inverse regularisation strength.
    val_accuracies: validation accuracy of every C tried, in grid order (empty in blog mode).
    convergence_warnings: every ConvergenceWarning raised by any fit, prefixed by the fit it
        came from; an empty list means every fit converged.
    mode: "tuned", "blog" or "low-label".
    test_predictions: the final model's predicted label of every test row, in order (for
        paired comparisons between representations of the same test images).
    n_train_used: training rows the final model was fit on (all but in low-label mode).
    """

    train_accuracy: float
    val_accuracy: float | None
    test_accuracy: float
    C: float
    mode: str
    val_accuracies: dict[float, float] = field(default_factory=dict)
    convergence_warnings: list[str] = field(default_factory=list)
    # an array: left out of ==, which compares the scores (an array has no single truth value)
    test_predictions: np.ndarray | None = field(default=None, compare=False)
    n_train_used: int | None = None
    n_iter: int | None = None  # lbfgs iterations of the final fit

    def __repr__(self) -> str:
        # the scores in full; the predictions and warnings by their size only (a repr that
        # printed every test prediction filled the screen)
        preds = self.test_predictions
        preds = "None" if preds is None else f"<{len(preds)} labels>"
        val = "None" if self.val_accuracy is None else f"{self.val_accuracy:.4f}"
        return (
            f"ProbeResult(mode={self.mode!r}, test_accuracy={self.test_accuracy:.4f}, "
            f"train_accuracy={self.train_accuracy:.4f}, val_accuracy={val}, C={self.C:g}, "
            f"n_train_used={self.n_train_used}, val_accuracies=<{len(self.val_accuracies)} Cs>, "
            f"convergence_warnings=<{len(self.convergence_warnings)}>, "
            f"test_predictions={preds})"
        )


def _features(x, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero columns")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(x)).sum())} NaN or infinite value(s)")
    return x


def _labels(y, n: int, name: str, xname: str) -> np.ndarray:
    if hasattr(y, "detach") and hasattr(y, "cpu"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per sample), got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but {xname} has {n} samples")
    return y


def _check_probe_inputs(train_x, train_y, test_x, test_y, min_train: int):
    xtr = _features(train_x, "train_x")
    xte = _features(test_x, "test_x")
    if xtr.shape[0] < min_train:
        raise ValueError(f"train_x needs at least {min_train} samples, got {xtr.shape[0]}")
    if xte.shape[0] < 1:
        raise ValueError("test_x needs at least 1 sample")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(
            f"train_x and test_x must have the same number of features: "
            f"{xtr.shape[1]} and {xte.shape[1]}"
        )
    ytr = _labels(train_y, xtr.shape[0], "train_y", "train_x")
    yte = _labels(test_y, xte.shape[0], "test_y", "test_x")
    if np.unique(ytr).size < 2:
        raise ValueError("train_y must contain at least 2 classes")
    return xtr, ytr, xte, yte


class _WarningLog:
    """Collects ConvergenceWarnings of each fit under a label; other warnings pass through."""

    def __init__(self):
        self.messages: list[str] = []

    def fit(self, label: str, model, x, y):
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y)
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                self.messages.append(f"{label}: {' '.join(str(w.message).split())}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return model


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    Cs=DEFAULT_CS,
    val_size: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    blog: bool = False,
    converged: bool = False,
    val_x=None,
    val_y=None,
    scaler: str = "standard",
) -> ProbeResult:
    """Linear-probe accuracy of a representation.

    Tuned mode (default): a StandardScaler is fit once on the whole training set's features
    (no labels; the test set is never seen). A stratified validation split of `val_size` of the
    training set is drawn with `seed`; for each C in `Cs` a LogisticRegression(C, lbfgs,
    max_iter) is fit on the rest of the scaled rows and scored on the split. The C with the
    best validation accuracy wins (ties: the smallest C, the strongest regularisation). The
    model is then refit on the whole scaled training set with that C and scored once on the
    test set. lbfgs fits the multinomial (softmax) model for three or more classes, the binary
    logistic model for two.

    Why one scaler: C's strength is relative to the scaled features, so the C chosen on the
    validation fits must meet the same scaling in the final fit. A scaler refit per subset
    changes it wherever a few training rows are far out: one flowed point at 360 times the
    median norm, drawn into the validation split, left the fitting rows' standard deviations
    about 10 times smaller than the whole set's, so the chosen C = 1e-3 (97.4% on validation)
    became a 10 times stronger penalty in the refit and the probe fell to 59% (docs/DESIGN.md
    "Metrics and probes").

    blog=True: scikit-learn's default `LogisticRegression()` (C = 1, lbfgs, max_iter = 100) on
    the unscaled features, fit on the whole training set, as the blog did; `Cs`, `val_size`,
    `seed` and `max_iter` are not used. With C fixed, its regularisation depends on the
    features' scale (docs/DESIGN.md, "The learned field"), so compare it with the tuned mode.

    converged=True (with blog=True): the same classifier, C = 1 on unscaled features, with
    max_iter = CONVERGED_MAX_ITER; the iterations lbfgs used are in n_iter.

    val_x, val_y (the study's protocol): a held-out validation set that no model trained on.
    The scaler is fit on the training features, each C is fit on every training row and scored
    on the validation set, and the model of the chosen C is scored once on the test set (no
    refit); `val_size` is then not used.

    scaler: "standard" (StandardScaler) or "robust" (RobustScaler: median and interquartile
    range, so that a few far points do not set the scale).

    Every ConvergenceWarning is recorded in the result, never silenced without trace.
    """
    xtr, ytr, xte, yte = _check_probe_inputs(train_x, train_y, test_x, test_y, min_train=2)
    from sklearn.linear_model import LogisticRegression

    log = _WarningLog()
    if blog:
        label = "blog LogisticRegression()"
        model = LogisticRegression()
        if converged:
            label = f"blog LogisticRegression(max_iter={CONVERGED_MAX_ITER})"
            model = LogisticRegression(max_iter=CONVERGED_MAX_ITER)
        model = log.fit(label, model, xtr, ytr)
        return ProbeResult(
            train_accuracy=float(model.score(xtr, ytr)),
            val_accuracy=None,
            test_accuracy=float(model.score(xte, yte)),
            C=float(model.C),
            mode="blog-converged" if converged else "blog",
            convergence_warnings=log.messages,
            test_predictions=model.predict(xte),
            n_train_used=int(xtr.shape[0]),
            n_iter=int(np.max(model.n_iter_)),
        )

    grid = _check_grid(Cs)
    if not (isinstance(val_size, float) and 0.0 < val_size < 1.0):
        raise ValueError(f"val_size must be a float in (0, 1), got {val_size!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if val_x is not None:
        return _tuned_on_validation(xtr, ytr, xte, yte, val_x, val_y, grid, max_iter, scaler, log)
    scaled_tr, scaled_te = _standardise(xtr, xte)
    x_fit, x_val, y_fit, y_val = _stratified_split(scaled_tr, ytr, val_size, seed)

    val_acc: dict[float, float] = {}
    for c in grid:
        model = log.fit(f"C={c:g} (validation fit)", _logreg(c, max_iter), x_fit, y_fit)
        val_acc[c] = float(model.score(x_val, y_val))
    best = max(val_acc.values())
    chosen = min(c for c in grid if val_acc[c] == best)
    final = log.fit(f"C={chosen:g} (final fit)", _logreg(chosen, max_iter), scaled_tr, ytr)
    return ProbeResult(
        train_accuracy=float(final.score(scaled_tr, ytr)),
        val_accuracy=val_acc[chosen],
        test_accuracy=float(final.score(scaled_te, yte)),
        C=chosen,
        mode="tuned",
        val_accuracies=val_acc,
        convergence_warnings=log.messages,
        test_predictions=final.predict(scaled_te),
        n_train_used=int(xtr.shape[0]),
    )


def _tuned_on_validation(
    xtr, ytr, xte, yte, val_x, val_y, grid, max_iter, scaler, log, mode="tuned", rows=None
):
    """C chosen on a held-out validation set; the chosen model scored once on test. rows:
    the training rows to fit on (all by default; the scaler always sees every row)."""
    xva = _features(val_x, "val_x")
    yva = _labels(val_y, xva.shape[0], "val_y", "val_x")
    if xva.shape[1] != xtr.shape[1]:
        raise ValueError(f"val_x has {xva.shape[1]} features, train_x {xtr.shape[1]}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    scaled_tr, scaled_te, scaled_va = _standardise(xtr, xte, xva, kind=scaler)
    fit_x, fit_y = (scaled_tr, ytr) if rows is None else (scaled_tr[rows], ytr[rows])
    val_acc: dict[float, float] = {}
    models = {}
    for c in grid:
        models[c] = log.fit(f"C={c:g} ({mode})", _logreg(c, max_iter), fit_x, fit_y)
        val_acc[c] = float(models[c].score(scaled_va, yva))
    best = max(val_acc.values())
    chosen = min(c for c in grid if val_acc[c] == best)
    final = models[chosen]
    return ProbeResult(
        train_accuracy=float(final.score(fit_x, fit_y)),
        val_accuracy=val_acc[chosen],
        test_accuracy=float(final.score(scaled_te, yte)),
        C=chosen,
        mode=mode,
        val_accuracies=val_acc,
        convergence_warnings=log.messages,
        test_predictions=final.predict(scaled_te),
        n_train_used=len(fit_y),
        n_iter=int(np.max(final.n_iter_)),
    )


def knn_tuned(train_x, train_y, val_x, val_y, test_x, *, grid=KNN_GRID):
    """Cosine k-NN with k chosen on the validation set from `grid`, capped at the smallest
    training class (a larger k outvotes that class wherever it is). Returns (test predictions,
    chosen k, {k: validation accuracy}); ties go to the smallest k."""
    ytr = np.asarray(train_y)
    cap = int(np.unique(ytr, return_counts=True)[1].min())
    ks = [k for k in grid if k <= cap] or [1]
    yva = np.asarray(val_y)
    acc = {k: float((knn_predict(train_x, ytr, val_x, k=k) == yva).mean()) for k in ks}
    best = max(acc.values())
    k = min(k for k in ks if acc[k] == best)
    return knn_predict(train_x, ytr, test_x, k=k), k, acc


def labels_per_class_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    val_x,
    val_y,
    *,
    per_class: int,
    seed: int = 0,
    Cs=DEFAULT_CS,
    max_iter: int = 1000,
) -> ProbeResult:
    """A probe of the features: a linear classifier fit on `per_class` labelled training rows
    of each class (a seeded draw), C chosen on the validation set, scored once on test. The
    scaler is fit on every training row's features (no labels). The encoder saw every training
    label, so this measures how few labels the features need, not a low-label setting."""
    xtr, ytr, xte, yte = _check_probe_inputs(train_x, train_y, test_x, test_y, min_train=2)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    classes, inverse = np.unique(ytr, return_inverse=True)
    rng = np.random.default_rng(seed)
    rows = np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(inverse == c))[:per_class] for c in range(classes.size)]
        )
    )
    return _tuned_on_validation(
        xtr,
        ytr,
        xte,
        yte,
        val_x,
        val_y,
        _check_grid(Cs),
        max_iter,
        "standard",
        _WarningLog(),
        mode="labels-per-class",
        rows=rows,
    )


def low_label_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    fraction: float,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
) -> ProbeResult:
    """A linear probe that sees only `fraction` of the training labels: a stratified draw
    (with `seed`) of round(fraction * N) training rows, at least one per class, then
    LogisticRegression(C, lbfgs) fit on them and scored on the whole test set. The features are
    standardised by a StandardScaler fit on every training row (features need no labels, and
    13 rows would give a scale as noisy as the fit; the same scaling as `linear_probe`).

    C is fixed, not tuned: at 1% of the 1347 digits (13 labels, about one a class) no
    validation split is possible, and the same rule is used at every fraction so that the
    rows compare. train_accuracy is on the labelled rows the model was fit on."""
    xtr, ytr, xte, yte = _check_probe_inputs(train_x, train_y, test_x, test_y, min_train=2)
    if not (isinstance(fraction, float) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be a float in (0, 1], got {fraction!r}")
    classes, inverse = np.unique(ytr, return_inverse=True)
    n = max(classes.size, int(round(fraction * len(ytr))))
    idx = _stratified_subset(inverse, classes.size, n, seed)
    log = _WarningLog()
    scaled_tr, scaled_te = _standardise(xtr, xte)
    model = log.fit(
        f"low-label {fraction:g} (C={C:g})", _logreg(C, max_iter), scaled_tr[idx], ytr[idx]
    )
    return ProbeResult(
        train_accuracy=float(model.score(scaled_tr[idx], ytr[idx])),
        val_accuracy=None,
        test_accuracy=float(model.score(scaled_te, yte)),
        C=float(C),
        mode="low-label",
        convergence_warnings=log.messages,
        test_predictions=model.predict(scaled_te),
        n_train_used=len(idx),
    )


def _stratified_subset(inverse: np.ndarray, n_classes: int, n: int, seed: int) -> np.ndarray:
    """n row indices: one of every class first, the rest drawn without replacement in
    proportion to the class counts (largest remainders), each class's rows in a seeded order."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(n_classes)]
    counts = np.array([len(r) for r in per_class], dtype=np.float64)
    take = np.ones(n_classes, dtype=np.int64)
    extra = n - n_classes
    if extra > 0:
        share = (counts - 1) / (counts - 1).sum() * extra
        take += np.floor(share).astype(np.int64)
        left = extra - int(np.floor(share).sum())
        take[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1
        take = np.minimum(take, counts.astype(np.int64))
    return np.sort(np.concatenate([r[:k] for r, k in zip(per_class, take)]))


def _check_grid(Cs) -> list[float]:
    try:
        grid = [float(c) for c in Cs]
    except (TypeError, ValueError) as err:
        raise TypeError(f"Cs must be an iterable of positive numbers, got {Cs!r}") from err
    if not grid or not all(np.isfinite(c) and c > 0 for c in grid):
        raise ValueError(f"Cs must be a non-empty list of positive finite numbers, got {Cs!r}")
    return grid


def _stratified_split(x, y, val_size: float, seed: int):
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        rare = classes[counts.argmin()].item()  # a python scalar prints plainly
        raise ValueError(
            f"train_y class {rare!r} has {counts.min()} sample: a stratified validation split "
            f"needs at least 2 per class"
        )
    n_val = int(np.ceil(val_size * len(y)))
    if n_val < classes.size or len(y) - n_val < classes.size:
        raise ValueError(
            f"val_size={val_size} gives {n_val} validation and {len(y) - n_val} fitting samples; "
            f"each must hold at least one per class ({classes.size} classes)"
        )
    return train_test_split(x, y, test_size=val_size, stratify=y, random_state=seed)


def _standardise(xtr: np.ndarray, *others: np.ndarray, kind: str = "standard"):
    """Train and other features scaled by a scaler fit on the training features: "standard"
    (StandardScaler) or "robust" (RobustScaler, median and interquartile range)."""
    from sklearn.preprocessing import RobustScaler, StandardScaler

    if kind not in ("standard", "robust"):
        raise ValueError(f"scaler must be 'standard' or 'robust', got {kind!r}")
    scaler = (StandardScaler() if kind == "standard" else RobustScaler()).fit(xtr)
    return (scaler.transform(xtr), *(scaler.transform(x) for x in others))


def _logreg(c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter)


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 5) -> float:
    """Accuracy of a k-nearest-neighbour classifier under cosine similarity: each test point
    gets the majority label of its k most cosine-similar training points (uniform votes; a tie
    between classes goes to the smallest label, scikit-learn's rule). Brute-force search
    (scikit-learn's KNeighborsClassifier, metric="cosine"). Zero rows have no direction and are
    an error. Returns a float in [0, 1]."""
    xtr, ytr, xte, yte = _check_probe_inputs(train_x, train_y, test_x, test_y, min_train=1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= xtr.shape[0]:
        raise ValueError(f"k must be an int in [1, {xtr.shape[0]}] (training samples), got {k!r}")
    for x, name in ((xtr, "train_x"), (xte, "test_x")):
        zero = int((np.linalg.norm(x, axis=1) == 0).sum())
        if zero:
            raise ValueError(f"{name} has {zero} zero row(s): cosine similarity is undefined")
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    return float(clf.fit(xtr, ytr).score(xte, yte))


def knn_predict(train_x, train_y, test_x, *, k: int) -> np.ndarray:
    """The predictions behind knn_accuracy (cosine, uniform votes, brute force); k is clamped
    to the number of training rows."""
    xtr = _features(train_x, "train_x")
    xte = _features(test_x, "test_x")
    ytr = _labels(train_y, xtr.shape[0], "train_y", "train_x")
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(
        n_neighbors=min(int(k), xtr.shape[0]), metric="cosine", algorithm="brute"
    )
    return clf.fit(xtr, ytr).predict(xte)


# --------------------------------------------------------------------------- paired comparison


def paired_comparison(
    correct_a, correct_b, *, strata=None, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """B's accuracy minus A's on the same test items, with a bootstrap interval and an exact
    McNemar test (docs/DESIGN.md, "Metrics and probes").

    correct_a, correct_b: per item, whether A and B classified it correctly (same items, same
    order). strata: an optional group label per item (the seed): the bootstrap resamples items
    within each group, so each group keeps its size (the pooled comparison over seeds).

    Returns diff (B - A, a fraction), ci (the percentile bootstrap interval of diff, n_boot
    resamples of the items with `seed`), n01 (A right, B wrong), n10 (A wrong, B right),
    p_mcnemar (two-sided exact binomial test of n10 against n01 + n10 at 1/2; 1.0 without
    discordant items) and n (items). Pooling seeds treats every (seed, image) as an item; the
    same test images recur in every seed, so the pooled test is optimistic where the seeds'
    errors fall on the same images, and the per-seed tests are the conservative ones."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"correct_a and correct_b must be 1-D of one non-zero length, got "
            f"{a.shape} and {b.shape}"
        )
    d = b.astype(np.int64) - a.astype(np.int64)
    groups = (
        np.zeros(a.size, dtype=np.int64)
        if strata is None
        else np.unique(np.asarray(strata), return_inverse=True)[1]
    )
    if groups.shape != a.shape:
        raise ValueError(f"strata must hold one label per item, got shape {groups.shape}")
    rng = np.random.default_rng(seed)
    totals = np.zeros(int(n_boot), dtype=np.int64)
    for g in np.unique(groups):
        dg = d[groups == g]
        totals += dg[rng.integers(0, dg.size, size=(int(n_boot), dg.size))].sum(1)
    boot = totals / a.size
    n01 = int((a & ~b).sum())
    n10 = int((~a & b).sum())
    p = float(binomtest(n10, n01 + n10, 0.5).pvalue) if n01 + n10 else 1.0
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {
        "diff": float(d.mean()),
        "ci": [float(lo), float(hi)],
        "n01": n01,
        "n10": n10,
        "p_mcnemar": p,
        "n": int(a.size),
    }
