"""The verification metrics against values computed by hand on a small pairs set."""

from __future__ import annotations

import numpy as np
import pytest

from engines.evaluate.metrics import (
    best_threshold,
    bootstrap_delta,
    eer,
    kfold_accuracy,
    rates,
    roc_auc,
    tar_at_far,
)

# Six pairs, sorted by score: genuine at 0.9, 0.8, 0.6; impostor at 0.7, 0.5, 0.4.
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
SAME = np.array([True, True, False, True, False, False])


def test_roc_auc_is_the_share_of_genuine_above_impostor_pairs():
    # genuine > impostor: 0.9 beats 3, 0.8 beats 3, 0.6 beats 2 -> 8 of 9 comparisons
    assert roc_auc(SCORES, SAME) == pytest.approx(8 / 9)
    # ties count one half
    assert roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)


def test_rates_at_a_threshold():
    assert rates(SCORES, SAME, 0.6) == (pytest.approx(1 / 3), pytest.approx(1.0))
    assert rates(SCORES, SAME, 0.8) == (0.0, pytest.approx(2 / 3))


def test_tar_at_far_takes_the_lowest_threshold_within_the_target():
    half = tar_at_far(SCORES, SAME, 0.5)
    assert (half.threshold, half.far, half.tar, half.resolvable) == (0.6, pytest.approx(1 / 3), 1.0, True)
    strict = tar_at_far(SCORES, SAME, 0.01)  # 3 impostor pairs cannot resolve a 1% FAR
    assert (strict.threshold, strict.far, strict.tar, strict.resolvable) == (0.8, 0.0, pytest.approx(2 / 3),
                                                                             False)


def test_eer_is_where_far_meets_frr():
    # thresholds 0.4 .. 0.9, above: FAR 1, 2/3, 1/3, 1/3, 0, 0, 0; FRR 0, 0, 0, 1/3, 1/3, 2/3, 1
    rate, threshold = eer(SCORES, SAME)
    assert threshold == 0.7 and rate == pytest.approx(1 / 3)


def test_best_threshold_accuracy_prefers_the_lowest_of_equals():
    # t=0.6 and t=0.8 both classify 5 of 6 correctly
    assert best_threshold(SCORES, SAME) == (pytest.approx(5 / 6), 0.6)


def test_kfold_accuracy_follows_the_lfw_protocol():
    # 3 contiguous folds of 2 pairs; each fold's threshold is chosen on the other four:
    # fold {0.9 T, 0.8 T}: t=0.6 -> 1.0; fold {0.7 F, 0.6 T}: t=0.8 -> 0.5; fold {0.5 F, 0.4 F}: t=0.6 -> 1.0
    result = kfold_accuracy(SCORES, SAME, folds=3)
    assert result.thresholds == [0.6, 0.8, 0.6]
    assert result.folds == [1.0, 0.5, 1.0]
    assert result.mean == pytest.approx(2.5 / 3) and result.std == pytest.approx(np.std([1, 0.5, 1]))


def test_bootstrap_delta_is_zero_for_identical_scores_and_brackets_a_real_difference():
    same = bootstrap_delta("auc", roc_auc, SCORES, SCORES, SAME, resamples=200)
    assert same.delta == 0 and same.low == 0 and same.high == 0
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.5
    good = np.where(labels, 0.6, 0.2) + rng.normal(0, 0.1, 400)
    worse = good + rng.normal(0, 0.25, 400)
    delta = bootstrap_delta("auc", roc_auc, good, worse, labels, resamples=300, seed=1)
    assert delta.delta < 0 and delta.low <= delta.delta <= delta.high < 0
    again = bootstrap_delta("auc", roc_auc, good, worse, labels, resamples=300, seed=1)
    assert (again.low, again.high) == (delta.low, delta.high)  # seeded: exactly reproducible


@pytest.mark.parametrize(("scores", "same", "message"), [
    (np.array([0.1, 0.2]), np.array([True, True]), "both genuine and impostor"),
    (np.array([0.1, np.nan]), np.array([True, False]), "finite"),
    (np.array([0.1, 0.2, 0.3]), np.array([True, False]), "one length"),
])
def test_bad_input_is_a_clear_error(scores, same, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(scores, same)
