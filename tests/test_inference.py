"""TTA weighting and interpretation (confusion matrix, most confused pairs, top losses) on hand-made arrays."""

import math

import numpy as np
import pytest

from kagglecls.predict import (
    ConfusedPair,
    combine_tta,
    confusion_matrix,
    most_confused,
    top_losses,
)

PLAIN = np.array([[0.2, 0.8], [0.5, 0.5]])
AUGMENTED = [np.array([[0.6, 0.4], [0.1, 0.9]]), np.array([[1.0, 0.0], [0.3, 0.7]])]


def test_combine_tta_with_beta_a_quarter():
    # Mean of the augmented passes: [[0.8, 0.2], [0.2, 0.8]]; then 0.75 x that + 0.25 x plain.
    expected = np.array([[0.75 * 0.8 + 0.25 * 0.2, 0.75 * 0.2 + 0.25 * 0.8], [0.275, 0.725]])
    combined = combine_tta(PLAIN, AUGMENTED, beta=0.25)
    np.testing.assert_allclose(combined, [[0.65, 0.35], [0.275, 0.725]], atol=1e-15)
    np.testing.assert_allclose(combined, expected, atol=1e-15)
    np.testing.assert_allclose(combined.sum(axis=1), [1.0, 1.0], atol=1e-15)


def test_combine_tta_beta_extremes():
    np.testing.assert_allclose(combine_tta(PLAIN, AUGMENTED, beta=1.0), PLAIN)
    np.testing.assert_allclose(combine_tta(PLAIN, AUGMENTED, beta=0.0), [[0.8, 0.2], [0.2, 0.8]])


def test_no_augmented_pass_returns_the_plain_probabilities():
    assert combine_tta(PLAIN, [], beta=0.25) is PLAIN


def test_confusion_matrix_counts_true_by_predicted():
    targets = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 0, 0])
    counts = confusion_matrix(targets, predictions, n_classes=4)
    expected = [[1, 1, 0, 0], [0, 1, 0, 0], [2, 0, 1, 0], [0, 0, 0, 0]]
    assert counts.tolist() == expected
    assert counts.dtype == np.int64


def test_most_confused_largest_first_ties_in_class_order():
    counts = np.array([[5, 1, 3], [3, 4, 0], [1, 2, 6]])
    pairs = most_confused(counts, ["cat", "dog", "fox"])
    assert pairs == [
        ConfusedPair("cat", "fox", 3),
        ConfusedPair("dog", "cat", 3),
        ConfusedPair("fox", "dog", 2),
        ConfusedPair("cat", "dog", 1),
        ConfusedPair("fox", "cat", 1),
    ]
    assert most_confused(counts, ["cat", "dog", "fox"], min_count=3) == pairs[:2]
    assert most_confused(np.eye(3, dtype=np.int64) * 4, ["a", "b", "c"]) == []


def test_top_losses_order_and_values():
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],  # true 0: loss -log 0.9
            [0.7, 0.1, 0.2],  # true 1: loss -log 0.1, predicted 0 at 0.7
            [0.25, 0.5, 0.25],  # true 1: loss -log 0.5
            [0.0, 1.0, 0.0],  # true 0: probability 0 clipped to 1e-15
            [0.6, 0.3, 0.1],  # true 2: loss -log 0.1, ties with row 1: the earlier row first
        ]
    )
    targets = np.array([0, 1, 1, 0, 2])
    losses = top_losses(probabilities, targets, k=4)
    assert [item.index for item in losses] == [3, 1, 4, 2]
    assert [item.loss for item in losses] == pytest.approx(
        [-math.log(1e-15), -math.log(0.1), -math.log(0.1), -math.log(0.5)], rel=1e-12
    )
    assert [item.actual for item in losses] == [0, 1, 2, 1]
    assert [item.predicted for item in losses] == [1, 0, 0, 1]
    assert [item.probability_of_predicted for item in losses] == [1.0, 0.7, 0.6, 0.5]
    assert len(top_losses(probabilities, targets, k=10)) == 5
    assert top_losses(probabilities, targets, k=0) == []
