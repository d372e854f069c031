"""The head on precomputed activations: a logistic regression fitted full batch, checked against
scikit-learn's, its L2 penalty chosen by stratified cross-validation."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from kagglecls.fitting import fit_linear_head
from kagglecls.logistic import Standardisation, choose_and_fit, fit_logistic, stratified_folds
from kagglecls.models import make_head
from kagglecls.params import HeadParams


def _blobs(n_per_class: int, *, n_classes: int = 3, dims: int = 6, spread: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(n_classes, dims))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = centres[labels] + rng.normal(0, spread, size=(len(labels), dims))
    return features.astype(np.float32), labels


def test_a_separable_problem_is_fitted_perfectly():
    features, labels = _blobs(20, spread=0.1)
    inputs = torch.from_numpy(features)
    weight, bias = fit_logistic(inputs, torch.from_numpy(labels), n_classes=3, l2=1e-3)
    predictions = (inputs @ weight.T + bias).argmax(dim=1).numpy()
    assert np.mean(predictions == labels) == 1.0


def test_the_fit_matches_scikit_learns_logistic_regression():
    features, labels = _blobs(30, spread=2.0, seed=1)  # overlapping classes: the penalty matters
    l2 = 0.05
    weight, bias = fit_logistic(torch.from_numpy(features), torch.from_numpy(labels), n_classes=3, l2=l2)
    ours = torch.softmax(torch.from_numpy(features) @ weight.T + bias, dim=1).numpy()
    # scikit-learn minimises C x sum of losses + |W|^2 / 2, i.e. mean loss + |W|^2 / (2 C n).
    reference = LogisticRegression(C=1 / (l2 * len(labels)), tol=1e-10, max_iter=10_000).fit(features, labels)
    np.testing.assert_allclose(ours, reference.predict_proba(features), atol=1e-3)  # float32 L-BFGS


def test_stratified_folds_spread_every_class_evenly():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(labels, n_folds=3, seed=0)
    for label in range(3):
        counts = np.bincount(folds[labels == label], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(folds, stratified_folds(labels, n_folds=3, seed=0))


def test_choose_and_fit_picks_the_l2_with_the_lowest_cross_validated_loss():
    features, labels = _blobs(15, spread=2.0, seed=2)
    inputs, targets = torch.from_numpy(features), torch.from_numpy(labels)
    grid = (1.0, 0.1, 0.01)
    chosen = choose_and_fit(inputs, targets, n_classes=3, l2=None, n_folds=3, seed=0, grid=grid)
    assert chosen.l2 in grid
    assert chosen.cv_log_loss > 0
    given = choose_and_fit(inputs, targets, n_classes=3, l2=0.1, n_folds=3, seed=0)
    assert (given.l2, given.cv_log_loss) == (0.1, None)


def test_choose_and_fit_copes_with_a_class_of_one_row():
    features, labels = _blobs(6, seed=3)
    labels[0] = 3  # a fourth class with a single training row
    chosen = choose_and_fit(
        torch.from_numpy(features), torch.from_numpy(labels), n_classes=4, l2=None, n_folds=3, seed=0
    )
    assert np.isfinite(chosen.cv_log_loss)


def test_the_head_in_eval_mode_computes_the_fitted_model():
    features, labels = _blobs(20, dims=8, spread=1.5, seed=4)
    features = features * 5 + 2  # far from standardised: the head's BatchNorm must standardise
    head = make_head(in_features=8, n_classes=3, hidden=[], dropout=[0.25])
    summary = fit_linear_head(head, features, labels, n_classes=3, fit_params=HeadParams(l2=0.01), seed=0)
    head.eval()
    inputs = torch.from_numpy(features)
    standardised = Standardisation.of(inputs).apply(inputs)
    weight, bias = fit_logistic(standardised, torch.from_numpy(labels), n_classes=3, l2=0.01)
    with torch.no_grad():
        np.testing.assert_allclose(head(inputs).numpy(), (standardised @ weight.T + bias).numpy(), atol=1e-4)
    assert summary["l2_used"] == 0.01
    assert summary["train_loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(head(inputs), torch.from_numpy(labels)).item(), rel=1e-4
    )
