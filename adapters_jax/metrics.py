"""Evaluation metrics from predictions and labels (numpy, host side), weighted by 'weights'."""
from __future__ import annotations

import numpy as np

CLASSIFICATION = ("accuracy", "macro_f1", "mcc")
REGRESSION = ("pearson", "spearman")
LM = ("perplexity", "loss")
LOWER_IS_BETTER = ("perplexity", "loss")


def better(metric: str, new: float, old) -> bool:
    """Whether `new` beats `old` (None: nothing yet) for `metric`; perplexity and loss go down."""
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


def _confusion(pred: np.ndarray, label: np.ndarray, num_labels: int) -> np.ndarray:
    cm = np.zeros((num_labels, num_labels), np.float64)  # [true, pred]
    np.add.at(cm, (label, pred), 1.0)
    return cm


def accuracy(pred, label) -> float:
    return float(np.mean(pred == label)) if len(label) else 0.0


def macro_f1(pred, label, num_labels: int) -> float:
    cm = _confusion(pred, label, num_labels)
    tp = np.diag(cm)
    precision = tp / np.maximum(cm.sum(0), 1e-12)
    recall = tp / np.maximum(cm.sum(1), 1e-12)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    present = (cm.sum(0) + cm.sum(1)) > 0  # classes seen in labels or predictions (as sklearn does)
    return float(f1[present].mean()) if present.any() else 0.0


def mcc(pred, label, num_labels: int) -> float:
    """Matthews correlation, multi-class (Gorodkin's R_K), as sklearn computes it."""
    cm = _confusion(pred, label, num_labels)
    t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return ranks


def pearson(pred, label) -> float:
    pred, label = np.asarray(pred, np.float64), np.asarray(label, np.float64)
    if pred.std() == 0 or label.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, label)[0, 1])


def spearman(pred, label) -> float:
    return pearson(_rank(np.asarray(pred, np.float64)), _rank(np.asarray(label, np.float64)))


def compute(pred: np.ndarray, label: np.ndarray, weights: np.ndarray, task: str, num_labels: int) -> dict:
    """Metrics over the rows with weight > 0 (eval filler rows have weight 0)."""
    keep = np.asarray(weights) > 0
    pred, label = np.asarray(pred)[keep], np.asarray(label)[keep]
    if task == "lm":  # pred [N, 2]: summed token NLL and token count per row
        loss = float(pred[:, 0].sum() / max(pred[:, 1].sum(), 1.0))
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "tokens": float(pred[:, 1].sum())}
    if task == "regression":
        return {"pearson": pearson(pred, label), "spearman": spearman(pred, label)}
    pred, label = pred.astype(np.int64), label.astype(np.int64)
    return {"accuracy": accuracy(pred, label), "macro_f1": macro_f1(pred, label, num_labels),
            "mcc": mcc(pred, label, num_labels)}
