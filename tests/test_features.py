"""Precomputed activations: the head on the stored float16 rows predicts what the full model predicts."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kagglecls.device import StepSettings
from kagglecls.features import FeatureBatches, write_features
from kagglecls.fitting import make_optimizer
from kagglecls.models import Classifier, build_classifier, make_head

CPU = StepSettings(device=torch.device("cpu"))
# float16 keeps an 11-bit significand: rounding to nearest moves a normal number by at most 2^-11 of its
# size, and a subnormal one (below 2^-14) by at most half the subnormal spacing, 2^-25.
FLOAT16_RELATIVE = 2.0**-11
FLOAT16_SUBNORMAL = 2.0**-25
# Tolerance in "standard deviations" of the summed rounding errors (see _logit_tolerance).
SIGMAS = 6.0


def _logit_tolerance(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Per row and class, how far the eval-mode head's logits may move when its inputs are rounded to float16.

    The head (BatchNorm in eval, Linear, ReLU, Dropout off) is piecewise linear, so a logit moves by
    sum_i J_i d_i, with J the Jacobian at the float32 features and d_i the rounding error of feature i:
    independent, zero-mean, |d_i| <= c_i. Hoeffding's inequality bounds P(|sum_i J_i d_i| >= 6 s), with
    s^2 = sum_i (J_i c_i)^2, by 2 exp(-18) = 3e-8. (The worst case, sum_i |J_i| c_i, is about 300x looser:
    it assumes all 2560 errors conspire.)
    """
    rounding = torch.clamp(features.abs() * FLOAT16_RELATIVE, min=FLOAT16_SUBNORMAL)
    tolerances = []
    for row, row_rounding in zip(features, rounding, strict=True):
        jacobian = torch.autograd.functional.jacobian(lambda item: head(item[None])[0], row)
        tolerances.append(SIGMAS * torch.sqrt(((jacobian * row_rounding) ** 2).sum(dim=1)))
    return torch.stack(tolerances)


def _train_head_on(path, labels: np.ndarray, head: nn.Module) -> None:
    """A few epochs on the stored rows, as train_head does, so the head's predictions are not flat."""
    loader = FeatureBatches(path, labels, batch_size=3, shuffle=True, seed=0)
    optimizer = make_optimizer([list(head.parameters())], [1e-2], kind="adam", weight_decay=0.01)
    head.train()
    for epoch in range(10):
        loader.set_epoch(epoch)
        for inputs, targets in loader:
            loss = nn.functional.cross_entropy(head(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_head_on_stored_features_predicts_as_the_full_model(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", n_classes=4, pretrained=True)
    images = torch.rand(6, 3, 64, 64) * 2 - 1  # the [-1, 1] range of Lite's normalisation
    labels = np.array([0, 1, 2, 3, 0, 1])
    loader = DataLoader(TensorDataset(images, torch.from_numpy(labels)), batch_size=4)
    path = tmp_path / "train.npy"
    pixels = tmp_path / "train_pixels.npy"
    write_features(
        model, loader, n_items=6, path=path, settings=CPU, description="precompute", pixels_path=pixels
    )
    stored = np.load(path)
    assert (stored.dtype, stored.shape) == (np.float16, (6, 2 * 1280))
    assert sorted(item.name for item in tmp_path.iterdir()) == ["train.npy", "train_pixels.npy"]
    # the mirror check's view: each image's pixels averaged over 4 x 4 blocks (64 px to a 16 x 16 grid)
    blocks = images.reshape(6, 3, 16, 4, 16, 4).mean(dim=(3, 5)).flatten(1)
    np.testing.assert_allclose(np.load(pixels), blocks.numpy(), atol=2e-3)
    with torch.no_grad():  # same batches as write_features: the same float32 sums
        exact_features = torch.cat([model.features(inputs) for inputs, _targets in loader])
    assert np.array_equal(stored, exact_features.numpy().astype(np.float16))  # rows in order, eval mode

    _train_head_on(path, labels, model.head)
    model.eval()
    with torch.inference_mode():
        full_logits = torch.cat([model(inputs) for inputs, _targets in loader])
        stored_logits = model.head(torch.from_numpy(stored.astype(np.float32)))
    logit_tolerance = _logit_tolerance(model.head, exact_features)
    assert float(logit_tolerance.max()) < 0.01
    assert torch.all((full_logits - stored_logits).abs() <= logit_tolerance)
    # Softmax moves any probability by at most half the largest change of a logit (the rows of its Jacobian
    # sum to 2 p (1 - p) <= 1/2 in absolute value).
    probability_tolerance = logit_tolerance.max(dim=1).values / 2
    full, from_stored = torch.softmax(full_logits, dim=1), torch.softmax(stored_logits, dim=1)
    assert torch.all((full - from_stored).abs().max(dim=1).values <= probability_tolerance)
    assert torch.equal(full.argmax(dim=1), from_stored.argmax(dim=1))
    top_two = full.topk(2, dim=1).values
    assert torch.all(top_two[:, 0] - top_two[:, 1] > 2 * probability_tolerance)  # so argmax cannot flip
    assert full.argmax(dim=1).tolist() == labels.tolist()  # the head learnt its 6 rows


def _tiny_classifier() -> Classifier:
    torch.manual_seed(0)
    stem = [nn.Conv2d(3, 2, 3, padding=1), nn.ReLU()]
    body = nn.Sequential(*stem)
    head = make_head(in_features=4, n_classes=2, hidden=[], dropout=[0.0])
    return Classifier(body=body, head=head, body_groups=[stem])


def test_write_features_rows_in_loader_order(tmp_path):
    model = _tiny_classifier().eval()
    images = torch.randn(5, 3, 4, 4)
    path = tmp_path / "valid.npy"
    loader = DataLoader(TensorDataset(images, torch.zeros(5, dtype=torch.long)), batch_size=2)
    write_features(model, loader, n_items=5, path=path, settings=CPU, description="valid")
    with torch.inference_mode():
        expected = model.features(images).numpy()
    np.testing.assert_allclose(np.load(path).astype(np.float32), expected, rtol=FLOAT16_RELATIVE, atol=1e-6)


def test_write_features_refuses_empty_or_short_loaders(tmp_path):
    model = _tiny_classifier()
    path = tmp_path / "test.npy"
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="test.npy: nothing to precompute"):
        write_features(model, empty, n_items=0, path=path, settings=CPU, description="test")
    three = DataLoader(TensorDataset(torch.zeros(3, 3, 4, 4), torch.zeros(3, dtype=torch.long)), batch_size=2)
    with pytest.raises(AssertionError, match="wrote 3 rows, expected 4"):
        write_features(model, three, n_items=4, path=path, settings=CPU, description="test")
    assert not path.exists()


def _row_numbered(tmp_path, n_rows: int):
    """A features file whose row i holds the value i everywhere, so batches show which rows they hold."""
    path = tmp_path / "rows.npy"
    np.save(path, np.repeat(np.arange(n_rows, dtype=np.float16)[:, None], 3, axis=1))
    return path


def _rows_of(batches) -> list[list[int]]:
    return [inputs[:, 0].int().tolist() for inputs, _targets in batches]


def test_feature_batches_in_order_without_shuffle(tmp_path):
    labels = np.array([1, 0, 1, 0, 1, 0, 1])
    batches = FeatureBatches(_row_numbered(tmp_path, 7), labels, batch_size=3, shuffle=False, seed=0)
    assert len(batches) == 3
    assert _rows_of(batches) == [[0, 1, 2], [3, 4, 5], [6]]
    assert [targets.tolist() for _inputs, targets in batches] == [[1, 0, 1], [0, 1, 0], [1]]
    assert next(iter(batches))[0].dtype == torch.float32


def test_feature_batches_shuffle_per_epoch_deterministically(tmp_path):
    path = _row_numbered(tmp_path, 10)
    batches = FeatureBatches(path, None, batch_size=4, shuffle=True, seed=3)
    assert batches.sampler is batches  # fit() calls loader.sampler.set_epoch(epoch)
    first = _rows_of(batches)
    assert _rows_of(batches) == first
    assert sorted(row for batch in first for row in batch) == list(range(10))
    assert all(batch == sorted(batch) for batch in first)  # sorted within a batch: cheaper memory-map reads
    batches.set_epoch(1)
    second = _rows_of(batches)
    assert second != first
    assert sorted(row for batch in second for row in batch) == list(range(10))
    same_seed = FeatureBatches(path, None, batch_size=4, shuffle=True, seed=3)
    same_seed.set_epoch(1)
    assert _rows_of(same_seed) == second


def test_feature_loader_drops_a_last_training_batch_of_one(tmp_path):
    path = _row_numbered(tmp_path, 7)
    training = FeatureBatches(path, np.zeros(7, dtype=np.int64), batch_size=3, shuffle=True, seed=0)
    assert len(training) == 2 and sum(len(batch) for batch in _rows_of(training)) == 6
    evaluation = FeatureBatches(path, np.zeros(7, dtype=np.int64), batch_size=3, shuffle=False, seed=0)
    assert len(evaluation) == 3 and sum(len(batch) for batch in _rows_of(evaluation)) == 7
    unlabelled = FeatureBatches(path, None, batch_size=4, shuffle=False, seed=0)
    assert [targets.tolist() for _inputs, targets in unlabelled] == [[-1] * 4, [-1] * 3]


def test_feature_labels_must_match_rows(tmp_path):
    with pytest.raises(ValueError, match="rows.npy: 7 rows but 6 labels"):
        FeatureBatches(
            _row_numbered(tmp_path, 7), np.zeros(6, dtype=np.int64), batch_size=3, shuffle=False, seed=0
        )
