"""Verification metrics on cosine scores of labelled pairs, each exactly reproducible.

Every function takes ``scores`` (cosine of the two embeddings of a pair) and
``same`` (True for a genuine pair, False for an impostor pair) and decides a
pair "same person" when ``score >= threshold``. Thresholds are chosen among the
scores themselves (or just above the largest), never on a grid, so a result
depends on the data alone and is the same on every machine:

- ``roc_auc``: the Mann-Whitney statistic, P(genuine score > impostor score),
  ties counted one half;
- ``tar_at_far``: the lowest threshold whose false accept rate is <= the target,
  and the true accept rate there; a target below ``1 / n_impostors`` cannot be
  resolved by the data (``resolvable`` False) and is reported at FAR 0;
- ``eer``: the threshold where |FAR - FRR| is smallest (ties: the lower one),
  and the mean of the two rates there;
- ``kfold_accuracy``: LFW's protocol: the pairs in ``folds`` contiguous folds;
  for each, the threshold that maximises accuracy on the other folds is applied
  to it; the mean and standard deviation of the fold accuracies;
- ``bootstrap_delta``: a paired bootstrap over pairs of a metric's difference
  between two score sets of the same pairs (two backends or precisions), with a
  percentile confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _check(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if scores.ndim != 1 or scores.shape != same.shape:
        raise ValueError(f"need 1-d scores and labels of one length, got {scores.shape} and {same.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if same.all() or not same.any():
        raise ValueError("need both genuine and impostor pairs")
    return scores, same


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve = P(genuine > impostor) + P(genuine == impostor) / 2."""
    scores, same = _check(scores, same)
    genuine, impostor = np.sort(scores[same]), np.sort(scores[~same])
    below = np.searchsorted(impostor, genuine, side="left")  # impostors strictly below each genuine
    equal = np.searchsorted(impostor, genuine, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (genuine.size * impostor.size))


def rates(scores: np.ndarray, same: np.ndarray, threshold: float) -> tuple[float, float]:
    """``(FAR, TAR)`` when pairs with ``score >= threshold`` are accepted."""
    scores, same = _check(scores, same)
    accepted = scores >= threshold
    return float(accepted[~same].mean()), float(accepted[same].mean())


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Every threshold that changes a decision: the distinct scores, and one above them all."""
    unique = np.unique(scores)
    return np.append(unique, np.nextafter(unique[-1], np.inf))


@dataclass(frozen=True)
class TarAtFar:
    far_target: float
    tar: float
    far: float
    threshold: float
    resolvable: bool  # n_impostors >= 1 / far_target: the data can measure this FAR

    def to_dict(self) -> dict:
        return {"far_target": self.far_target, "tar": self.tar, "far": self.far,
                "threshold": self.threshold, "resolvable": self.resolvable}


def tar_at_far(scores: np.ndarray, same: np.ndarray, far_target: float) -> TarAtFar:
    """The lowest threshold with FAR <= ``far_target`` and the TAR it gives."""
    scores, same = _check(scores, same)
    candidates = _candidates(scores)
    impostor = np.sort(scores[~same])
    genuine = np.sort(scores[same])
    # FAR(t) = share of impostors >= t; non-increasing in t: the first candidate that fits
    far = 1.0 - np.searchsorted(impostor, candidates, side="left") / impostor.size
    index = int(np.argmax(far <= far_target))
    threshold = float(candidates[index])
    tar = 1.0 - np.searchsorted(genuine, threshold, side="left") / genuine.size
    return TarAtFar(far_target, float(tar), float(far[index]), threshold,
                    resolvable=impostor.size * far_target >= 1.0)


def eer(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """``(equal error rate, threshold)``: where FAR and FRR (= 1 - TAR) meet, on the candidates."""
    scores, same = _check(scores, same)
    candidates = _candidates(scores)
    impostor, genuine = np.sort(scores[~same]), np.sort(scores[same])
    far = 1.0 - np.searchsorted(impostor, candidates, side="left") / impostor.size
    frr = np.searchsorted(genuine, candidates, side="left") / genuine.size
    index = int(np.argmin(np.abs(far - frr)))
    return float((far[index] + frr[index]) / 2.0), float(candidates[index])


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """``(accuracy, threshold)`` maximising accuracy on these pairs (ties: the lowest threshold)."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)  # a fold may hold one class
    candidates = _candidates(scores)
    order = np.sort(scores[same]), np.sort(scores[~same])
    genuine_accepted = order[0].size - np.searchsorted(order[0], candidates, side="left")
    impostor_rejected = np.searchsorted(order[1], candidates, side="left")
    accuracy = (genuine_accepted + impostor_rejected) / scores.size
    index = int(np.argmax(accuracy))
    return float(accuracy[index]), float(candidates[index])


@dataclass(frozen=True)
class FoldAccuracy:
    mean: float
    std: float
    folds: list[float]
    thresholds: list[float]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "folds": self.folds, "thresholds": self.thresholds}


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: int = 10) -> FoldAccuracy:
    """LFW's 10-fold protocol on contiguous folds (shuffle the pairs first if they are sorted)."""
    scores, same = _check(scores, same)
    if not 2 <= folds <= scores.size:
        raise ValueError(f"folds must be between 2 and the number of pairs ({scores.size}), got {folds}")
    parts = np.array_split(np.arange(scores.size), folds)
    accuracies, thresholds = [], []
    for test in parts:
        train = np.setdiff1d(np.arange(scores.size), test, assume_unique=True)
        _, threshold = best_threshold(scores[train], same[train])
        accuracies.append(float(((scores[test] >= threshold) == same[test]).mean()))
        thresholds.append(threshold)
    values = np.asarray(accuracies)
    return FoldAccuracy(float(values.mean()), float(values.std()), accuracies, thresholds)


@dataclass(frozen=True)
class Delta:
    """``b - a`` of one metric on the same pairs (``a``, ``b``: the metric's values), with a
    bootstrap percentile interval."""

    metric: str
    a: float
    b: float
    delta: float
    low: float
    high: float
    confidence: float
    resamples: int

    def to_dict(self) -> dict:
        return {"metric": self.metric, "a": self.a, "b": self.b, "delta": self.delta,
                "ci_low": self.low, "ci_high": self.high, "confidence": self.confidence,
                "resamples": self.resamples}


def bootstrap_delta(
    metric: str,
    fn: Callable[[np.ndarray, np.ndarray], float],
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    same: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Delta:
    """Paired bootstrap: the same resampled pairs score both ``a`` and ``b`` each time, so the
    interval measures the difference, not the pairs' own spread. Resamples that lose every
    genuine or every impostor pair are drawn again."""
    scores_a, same = _check(scores_a, same)
    scores_b, _ = _check(scores_b, same)
    rng = np.random.default_rng(seed)
    n = same.size
    deltas = []
    while len(deltas) < resamples:
        pick = rng.integers(0, n, n)
        if same[pick].all() or not same[pick].any():
            continue
        deltas.append(fn(scores_b[pick], same[pick]) - fn(scores_a[pick], same[pick]))
    a, b = fn(scores_a, same), fn(scores_b, same)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(deltas, [tail, 100.0 - tail])
    return Delta(metric, a, b, b - a, float(low), float(high), confidence, resamples)
