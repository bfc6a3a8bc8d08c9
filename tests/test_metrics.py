"""Evaluation metrics against their textbook formulas on hand-countable cases."""
import math

import numpy as np

from adapters_jax import metrics


def test_binary_case_against_confusion_matrix_formulas():
    label = np.array([1, 1, 1, 1, 0, 0, 0, 1, 0, 1])
    pred = np.array([1, 1, 0, 1, 0, 1, 0, 1, 0, 0])
    tp, tn, fp, fn = 4, 3, 1, 2  # counted by hand from the arrays above
    got = metrics.compute(pred, label, np.ones(10), "classification", 2)
    assert math.isclose(got["accuracy"], (tp + tn) / 10)
    f1_pos = 2 * tp / (2 * tp + fp + fn)
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    assert math.isclose(got["macro_f1"], (f1_pos + f1_neg) / 2)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert math.isclose(got["mcc"], mcc)


def test_zero_weight_rows_are_ignored():
    label = np.array([0, 1, 1, 0])
    pred = np.array([0, 1, 0, 1])
    got = metrics.compute(pred, label, np.array([1.0, 1.0, 0.0, 0.0]), "classification", 2)
    assert got["accuracy"] == 1.0 and math.isclose(got["mcc"], 1.0)


def test_multiclass_mcc_perfect_and_chance():
    label = np.array([0, 1, 2, 0, 1, 2])
    assert math.isclose(metrics.mcc(label, label, 3), 1.0)
    assert metrics.mcc(np.zeros(6, int), label, 3) == 0.0  # constant prediction


def test_pearson_and_spearman():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 2 * x + rng.normal(size=50) * 0.1
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc))
    got = metrics.compute(y, x, np.ones(50), "regression", 1)
    assert math.isclose(got["pearson"], r, rel_tol=1e-12)
    # Spearman = 1 - 6 sum d^2 / (n (n^2 - 1)) when there are no ties.
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    rho = 1 - 6 * np.sum((rx - ry) ** 2) / (50 * (50 ** 2 - 1))
    assert math.isclose(got["spearman"], rho, rel_tol=1e-12)
    # monotone but non-linear: Spearman 1, Pearson below 1
    assert math.isclose(metrics.spearman(np.exp(x), x), 1.0) and metrics.pearson(np.exp(x), x) < 0.99
    assert metrics.spearman(np.array([1, 1, 2]), np.array([1, 2, 3])) > 0.8  # ties get average ranks
