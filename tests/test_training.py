"""The training loop: metrics against scikit-learn, lr_find and its suggestions, determinism, resume."""

import math

import numpy as np
import pytest
import sklearn.metrics
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kagglecls.checkpoints import fingerprint_of, save_atomic, save_checkpoint
from kagglecls.device import StepSettings, compiled, unwrapped
from kagglecls.fitting import make_optimizer
from kagglecls.lr_find import (
    LrFindResult,
    lr_find,
    suggest_lr,
    suggest_minimum,
    suggest_steep,
    suggest_valley,
    why_no_suggestion,
)
from kagglecls.schedule import Schedule, make_schedule
from kagglecls.training import (
    FitPlan,
    accuracy,
    evaluate,
    fit,
    log_loss,
    predict_probabilities,
    train_one_epoch,
)

CPU = StepSettings(device=torch.device("cpu"))
N_CLASSES = 3


def _tiny_model(seed: int = 0, *, batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 16)]
    layers += [nn.BatchNorm1d(16)] if batch_norm else []
    layers += [nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, N_CLASSES)]
    return nn.Sequential(*layers)


def _tensors(n_items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes a linear layer can learn: the class shifts the mean of the first two inputs."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, N_CLASSES, (n_items,), generator=generator)
    inputs = torch.randn(n_items, 4, generator=generator)
    inputs[:, 0] += targets.float()
    inputs[:, 1] -= targets.float()
    return inputs, targets


def _batches(n_batches: int, batch_size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    inputs, targets = _tensors(n_batches * batch_size, seed)
    return list(zip(inputs.split(batch_size), targets.split(batch_size), strict=True))


def _clone(state: object) -> object:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _clone(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_clone(value) for value in state]
    return state


def _assert_same_state(first: object, second: object) -> None:
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    elif isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            _assert_same_state(first[key], second[key])
    elif isinstance(first, list):
        assert len(first) == len(second)
        for one, other in zip(first, second, strict=True):
            _assert_same_state(one, other)
    else:
        assert first == second


# ---------------------------------------------------------------- metrics


def test_log_loss_equals_scikit_learn():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(5), size=200)
    targets = rng.integers(0, 5, size=200)
    expected = sklearn.metrics.log_loss(targets, y_proba=probabilities, labels=range(5))
    assert log_loss(probabilities, targets) == pytest.approx(expected, rel=1e-12)


def test_log_loss_clipping_equals_scikit_learn_at_its_eps():
    # scikit-learn clips at the dtype's machine epsilon; Kaggle (and our default) at 1e-15.
    probabilities = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    targets = np.array([0, 0, 2, 2])
    epsilon = np.finfo(np.float64).eps
    expected = sklearn.metrics.log_loss(targets, y_proba=probabilities, labels=range(3))
    assert log_loss(probabilities, targets, eps=epsilon) == pytest.approx(expected, rel=1e-12)
    # Kaggle's clipping by hand: the confident miss costs -log(1e-15) = 34.5388, the rest -log(1) and -log(0.5).
    kaggle = (-math.log(1 - 1e-15) + -math.log(1e-15) + -math.log(0.5) + -math.log(1 - 1e-15)) / 4
    assert log_loss(probabilities, targets) == pytest.approx(kaggle, rel=1e-12)
    assert log_loss(probabilities, targets) == pytest.approx(8.80798, abs=1e-5)


def test_log_loss_renormalises_rows():
    unnormalised = np.array([[2.0, 2.0], [1.0, 3.0]])
    assert log_loss(unnormalised, np.array([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)


def test_accuracy():
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    assert accuracy(probabilities, np.array([0, 1, 1, 0])) == 0.5
    assert accuracy(probabilities, np.array([0, 1, 0, 1])) == 1.0


def test_evaluate_matches_the_metrics_of_the_softmax():
    model = _tiny_model().eval()
    batches = _batches(3)
    inputs = torch.cat([batch[0] for batch in batches])
    targets = torch.cat([batch[1] for batch in batches]).numpy()
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs), dim=1).numpy()
    metrics = evaluate(model, batches, settings=CPU)
    assert metrics["valid_log_loss"] == pytest.approx(log_loss(probabilities, targets), rel=1e-6)
    assert metrics["valid_accuracy"] == accuracy(probabilities, targets)


# ---------------------------------------------------------------- one epoch


def test_predict_probabilities_of_several_views_per_item():
    model = _tiny_model().eval()
    inputs, targets = _tensors(10, seed=3)
    views = torch.stack([inputs, inputs.flip(-1), inputs * 0.5], dim=1)  # (items, views, features...)
    loader = DataLoader(TensorDataset(views, targets), batch_size=4)
    probabilities, got_targets = predict_probabilities(model, loader, settings=CPU, views=True)
    assert probabilities.shape == (10, 3, N_CLASSES) and got_targets.tolist() == targets.tolist()
    for view in range(3):
        one_view = DataLoader(TensorDataset(views[:, view], targets), batch_size=4)
        expected, _ = predict_probabilities(model, one_view, settings=CPU)
        np.testing.assert_allclose(probabilities[:, view], expected, rtol=1e-5, atol=1e-6)


def test_train_one_epoch_sets_each_groups_lr_from_the_schedule():
    model = _tiny_model()
    groups = [list(model[0].parameters()), list(model[-1].parameters())]
    optimizer = make_optimizer(groups, [1e-2, 1e-1], kind="sgd", weight_decay=0.0)
    halving = Schedule(total_steps=10, factor_at=lambda step: 0.5**step)
    record = train_one_epoch(model, _batches(3), optimizer, schedule=halving, first_step=2, settings=CPU)
    assert record["steps"] == 3
    assert record["train_loss"] > 0
    # The last step was global step 4: factor 0.5^4, each group keeping its own peak lr.
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-2 / 16, 1e-1 / 16])


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_train_one_epoch_smooths_the_training_targets(smoothing):
    torch.manual_seed(0)
    model = nn.Linear(4, N_CLASSES)
    ((inputs, targets),) = _batches(1)
    expected = nn.functional.cross_entropy(model(inputs), targets, label_smoothing=smoothing).item()
    optimizer = make_optimizer([list(model.parameters())], [1e-2], kind="sgd", weight_decay=0.0)
    record = train_one_epoch(
        model, [(inputs, targets)], optimizer, schedule=Schedule(1, lambda step: 1.0), first_step=0,
        settings=CPU, label_smoothing=smoothing,
    )  # fmt: skip
    assert record["train_loss"] == pytest.approx(expected, rel=1e-6)  # the loss of the step, before it


def test_train_one_epoch_with_mixup_mixes_images_and_losses_alike():
    model = nn.Linear(4, N_CLASSES)
    ((inputs, targets),) = _batches(1)
    torch.manual_seed(5)  # what train_one_epoch will draw: lam, then the partner of each item
    lam = max(float(torch.distributions.Beta(0.4, 0.4).sample()), 0.5)
    other = torch.randperm(len(targets))
    outputs = model(lam * inputs + (1 - lam) * inputs[other])
    cross_entropy = nn.functional.cross_entropy
    expected = (
        lam * cross_entropy(outputs, targets) + (1 - lam) * cross_entropy(outputs, targets[other])
    ).item()
    assert 0.5 <= lam < 1 and not torch.equal(other, torch.arange(len(targets)))
    optimizer = make_optimizer([list(model.parameters())], [1e-2], kind="sgd", weight_decay=0.0)
    torch.manual_seed(5)
    record = train_one_epoch(
        model, [(inputs, targets)], optimizer, schedule=Schedule(1, lambda step: 1.0), first_step=0,
        settings=CPU, mixup=0.4,
    )  # fmt: skip
    assert record["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_make_optimizer_drops_empty_groups_and_keeps_peaks():
    model = _tiny_model()
    optimizer = make_optimizer([[], list(model.parameters())], [1e-4, 1e-3], kind="adam", weight_decay=0.01)
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["initial_lr"] == 1e-3
    with pytest.raises(ValueError, match="'rmsprop': expected adam or sgd"):
        make_optimizer([list(model.parameters())], [1e-3], kind="rmsprop", weight_decay=0.0)


# ---------------------------------------------------------------- lr_find


def _trained_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """An SGD optimizer with momentum buffers already in its state, as after some training."""
    optimizer = make_optimizer([list(model.parameters())], [1e-2], kind="sgd", weight_decay=1e-4)
    schedule = Schedule(total_steps=2, factor_at=lambda step: 1.0)
    train_one_epoch(model, _batches(2, seed=5), optimizer, schedule=schedule, first_step=0, settings=CPU)
    return optimizer


def test_lr_find_stops_on_divergence_and_restores_model_and_optimizer():
    model = _tiny_model()
    optimizer = _trained_optimizer(model)
    model_before = _clone(model.state_dict())
    optimizer_before = _clone(optimizer.state_dict())
    assert optimizer_before["state"], "the optimizer should hold momentum buffers"
    start_lr, end_lr, num_steps = 1e-4, 1e8, 100
    result = lr_find(
        model, optimizer, _batches(4), start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, settings=CPU
    )
    assert 10 < len(result.lrs) < num_steps
    assert len(result.losses) == len(result.lrs)
    last = result.losses[-1]
    assert not math.isfinite(last) or last > 4 * min(result.losses)
    assert all(
        math.isfinite(loss) and loss <= 4 * min(result.losses[: i + 1])
        for i, loss in enumerate(result.losses[:-1])
    )
    expected_lrs = [start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)) for i in range(len(result.lrs))]
    assert result.lrs == pytest.approx(expected_lrs, rel=1e-12)
    _assert_same_state(model_before, model.state_dict())
    _assert_same_state(optimizer_before, optimizer.state_dict())


def test_lr_find_averages_the_loss_over_ranks_through_torch_compiles_wrapper(tmp_path, monkeypatch):
    """Under DDP the sweep's losses are all-reduced, also when base.compile wraps the DDP model."""
    import torch.distributed as dist

    from kagglecls import lr_find as lr_find_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(_tiny_model(batch_norm=False))
        reduced = []
        monkeypatch.setattr(lr_find_module.dist, "all_reduce", lambda tensor: reduced.append(float(tensor)))
        optimizer = make_optimizer([list(model.parameters())], [1e-2], kind="sgd", weight_decay=0.0)
        result = lr_find(
            torch.compile(model, backend="eager"),
            optimizer,
            _batches(3),
            start_lr=1e-4,
            end_lr=1e-2,
            num_steps=5,
            settings=CPU,
        )
    finally:
        dist.destroy_process_group()
    assert len(result.lrs) == 5 and len(reduced) == 5


def test_lr_find_full_sweep_smoothing_and_lr_ratios():
    model = _tiny_model(batch_norm=False)
    model.eval()  # dropout off, so the first loss can be computed by hand
    groups = [list(model[0].parameters()), list(model[-1].parameters())]
    optimizer = make_optimizer(groups, [1e-3, 1e-2], kind="sgd", weight_decay=0.0)
    batches = _batches(3)
    with torch.no_grad():
        first_loss = nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).item()
    settings = StepSettings(device=torch.device("cpu"), train_mode=lambda module: module.eval())
    result = lr_find(model, optimizer, batches, start_lr=1e-6, end_lr=1e-3, num_steps=12, settings=settings)
    assert len(result.lrs) == 12  # no divergence: the whole sweep, cycling over the 3 batches
    assert result.lrs[0] == 1e-6
    assert result.lrs[-1] == pytest.approx(1e-3, rel=1e-12)
    assert result.losses[0] == pytest.approx(first_loss, rel=1e-6)  # debiased: 0.02 x loss / (1 - 0.98)
    # After the sweep each group is back at its own lr; during it the top group ran at the swept lr.
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-2]


# A hand-made curve over lrs 1e-6 x 2^i (20 points). suggest_lr looks at indices 2..14 only (fastai drops
# the first 10% and the last 5): the low tail at 15..19 must be ignored.
CURVE_LRS = [1e-6 * 2**i for i in range(20)]
CURVE_LOSSES = [9, 9, 8, 7, 6, 5, 3, 2.5, 2, 1.8, 1.6, 1.7, 2, 2.5, 3, 0.1, 0.1, 0.1, 0.1, 0.1]


def test_suggest_minimum_is_a_tenth_of_the_lowest_point():
    assert suggest_minimum([1e-4, 1e-3, 1e-2, 1e-1, 1.0], [3, 2, 1, 2, 5]) == pytest.approx(1e-3)
    assert suggest_minimum([1e-4, 1e-3, 1e-2], [3, float("nan"), 2]) == pytest.approx(1e-3)


def test_suggest_steep_is_the_steepest_fall_against_log_lr():
    # Equal log steps: falls of 0.5, 1.5, 0.2, then a rise; the steepest starts at 1e-3.
    assert suggest_steep([1e-4, 1e-3, 1e-2, 1e-1, 1.0], [3, 2.5, 1, 0.8, 2]) == 1e-3
    # Unequal log steps: a fall of 1 over one decade beats a fall of 1.5 over three.
    assert suggest_steep([1e-6, 1e-3, 1e-2, 1e-1], [5, 3.5, 2.5, 2.4]) == 1e-3


def test_suggest_valley_on_a_v_shaped_curve():
    # Decreasing over indices 0..9 (10 points), then rising. fastai's valley: start = 9 - 10 = -1,
    # sections = 10 / 3, index = -1 + int(3.33) + int(1.67) = 3.
    lrs = [10.0**exponent for exponent in range(-12, 1)]
    losses = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3, 4]
    assert suggest_valley(lrs, losses) == lrs[3]


def test_suggest_valley_longest_decreasing_run_after_a_bump():
    # Longest decreasing run is 5 > 4 > 3 > 2 > 1.5 > 1.2 (indices 1..6): end 6, start 6 - 6 = 0,
    # sections 2, index 0 + 2 + 1 = 3.
    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    assert suggest_valley(lrs, [1, 5, 4, 3, 2, 1.5, 1.2, 6]) == 1e-2


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("minimum", CURVE_LRS[10] / 10),  # lowest point in the window is index 10 (1.6)
        ("steep", CURVE_LRS[5]),  # steepest fall in the window: 5 -> 3 from index 5
        # Window indices 2..14 are positions 0..12; decreasing over positions 0..8: start -1, sections 3,
        # position -1 + 3 + 1 = 3, which is index 5.
        ("valley", CURVE_LRS[5]),
    ],
)
def test_suggest_lr_looks_inside_fastais_window(method, expected):
    result = LrFindResult(lrs=CURVE_LRS, losses=CURVE_LOSSES)
    assert suggest_lr(result, method) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", ["valley", "minimum", "steep"])
def test_suggest_lr_gives_none_for_a_sweep_too_short(method):
    short = LrFindResult(lrs=CURVE_LRS[:6], losses=CURVE_LOSSES[:6])
    assert suggest_lr(short, method) is None
    assert why_no_suggestion(short) == "the sweep stopped after 6 steps, too few to read"


@pytest.mark.parametrize(
    "losses",
    [
        [2.0] * 20,  # flat
        [2.0 + 0.001 * i for i in range(20)],  # only rising: a model already at its minimum
        [2.0 - 0.0005 * i for i in range(20)],  # falls, but by 0.3% over the window: noise
    ],
)
def test_suggest_lr_gives_none_where_the_loss_never_fell(losses):
    result = LrFindResult(lrs=CURVE_LRS, losses=losses)
    assert suggest_lr(result, "valley") is None
    assert why_no_suggestion(result) == "the loss never fell by 1% over 20 steps"


# ---------------------------------------------------------------- fit: determinism and resume


class CountingLoader:
    """A DataLoader that counts its epochs and can raise once after the first batch of a given epoch."""

    def __init__(self, loader: DataLoader, *, fail_on_epoch: int | None = None) -> None:
        self.loader, self.fail_on_epoch = loader, fail_on_epoch
        self.epochs_started = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.epochs_started += 1
        for index, batch in enumerate(self.loader):
            if self.epochs_started == self.fail_on_epoch and index == 1:
                self.fail_on_epoch = None
                raise KeyboardInterrupt("simulated interruption")
            yield batch


def _train_loader(fail_on_epoch: int | None = None) -> CountingLoader:
    inputs, targets = _tensors(48, seed=1)
    # Shuffled by torch's global generator, which fit() reseeds at each epoch.
    return CountingLoader(
        DataLoader(TensorDataset(inputs, targets), batch_size=8, shuffle=True), fail_on_epoch=fail_on_epoch
    )


def _run_fit(
    *,
    train_loader: CountingLoader | None = None,
    checkpoint=None,
    fingerprint: str = "",
    model_seed: int = 0,
    epochs: int = 3,
    snapshot_epochs: tuple[int, ...] = (),
    valid_epochs: tuple[int, ...] | None = None,
    compile: bool = False,
    batch_norm: bool = True,
):
    model = _tiny_model(model_seed, batch_norm=batch_norm)
    optimizer = make_optimizer([list(model.parameters())], [1e-2], kind="adam", weight_decay=0.01)
    train_loader = train_loader or _train_loader()
    steps = len(train_loader)
    plan = FitPlan(
        epochs=epochs,
        snapshot_epochs=snapshot_epochs,
        valid_epochs=valid_epochs,
        steps_per_epoch=steps,
        schedule=make_schedule(
            "sgdr", steps_per_epoch=steps, n_cycle=2, cycle_len=1, cycle_mult=2, warmup=False
        ),
        seed=7,
    )
    valid_inputs, valid_targets = _tensors(24, seed=2)
    result = fit(
        compiled(model, compile),
        optimizer,
        plan=plan,
        train_loader=train_loader,
        valid_loader=DataLoader(TensorDataset(valid_inputs, valid_targets), batch_size=10),
        settings=CPU,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
    )
    return model, optimizer, result.history


def test_fit_twice_from_the_same_seed_is_identical():
    first_model, first_optimizer, first_history = _run_fit()
    second_model, second_optimizer, second_history = _run_fit()
    assert [record["epoch"] for record in first_history] == [1, 2, 3]
    assert first_history == second_history
    _assert_same_state(first_model.state_dict(), second_model.state_dict())
    _assert_same_state(first_optimizer.state_dict(), second_optimizer.state_dict())
    assert first_history[-1]["valid_accuracy"] > 0.6  # it learns: chance is 1/3


def test_fit_resumes_after_an_interruption_with_identical_weights(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "fit.pt"
    reference_model, _, reference_history = _run_fit()

    interrupted_loader = _train_loader(fail_on_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        _run_fit(train_loader=interrupted_loader, checkpoint=checkpoint, fingerprint="a")
    assert interrupted_loader.epochs_started == 2
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 1 and saved["fingerprint"] == "a"

    resumed_loader = _train_loader()
    resumed_model, _, resumed_history = _run_fit(
        train_loader=resumed_loader, checkpoint=checkpoint, fingerprint="a", model_seed=99
    )
    assert resumed_loader.epochs_started == 2  # epochs 2 and 3 only
    assert resumed_history == reference_history
    _assert_same_state(reference_model.state_dict(), resumed_model.state_dict())
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 3
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == ["fit.pt"]  # no temporaries left


def test_fit_under_torch_compile_trains_as_eager_and_checkpoints_the_plain_keys(tmp_path, monkeypatch):
    # Inductor draws dropout masks from its own generator unless told to use eager's.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    # Without BatchNorm: the bias before one gets a gradient of rounding noise only, which Adam scales up to
    # full steps, so eager and compiled runs would part there.
    eager_model, _, eager_history = _run_fit(batch_norm=False)
    checkpoint = tmp_path / "fit.pt"
    compiled_model, _, compiled_history = _run_fit(
        compile=True, batch_norm=False, checkpoint=checkpoint, fingerprint="a"
    )
    assert [record["epoch"] for record in compiled_history] == [1, 2, 3]
    for eager, other in zip(eager_history, compiled_history, strict=True):
        assert other["valid_log_loss"] == pytest.approx(eager["valid_log_loss"], abs=2e-3)
    torch.testing.assert_close(compiled_model.state_dict(), eager_model.state_dict(), atol=2e-3, rtol=2e-3)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert list(saved) == list(eager_model.state_dict())  # no "_orig_mod." prefix
    wrapper = compiled(compiled_model, True)
    assert wrapper is not compiled_model and unwrapped(wrapper) is compiled_model


def test_fit_with_another_fingerprint_starts_over(tmp_path):
    checkpoint = tmp_path / "fit.pt"
    reference_model, _, reference_history = _run_fit()
    _run_fit(checkpoint=checkpoint, fingerprint="a", model_seed=99)  # a finished run of other inputs
    restarted_loader = _train_loader()
    restarted_model, _, restarted_history = _run_fit(
        train_loader=restarted_loader, checkpoint=checkpoint, fingerprint="b"
    )
    assert restarted_loader.epochs_started == 3
    assert restarted_history == reference_history
    _assert_same_state(reference_model.state_dict(), restarted_model.state_dict())
    assert torch.load(checkpoint, weights_only=True)["fingerprint"] == "b"


def test_save_checkpoint_round_trip(tmp_path):
    model = _tiny_model()
    optimizer = make_optimizer([list(model.parameters())], [1e-3], kind="adam", weight_decay=0.0)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, epoch=2, history=[{"epoch": 1}], fingerprint="f")
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["fingerprint"], state["history_json"]) == (2, "f", '[{"epoch": 1}]')
    _assert_same_state(model.state_dict(), state["model"])
    assert [path.name for path in tmp_path.iterdir()] == ["model.pt"]


def test_fingerprint_of():
    assert fingerprint_of("a", 1) == fingerprint_of("a", 1)
    assert fingerprint_of("a", 1) != fingerprint_of("a", 2)
    assert len(fingerprint_of("a")) == 16


def test_fingerprint_of_covers_the_running_script(tmp_path, monkeypatch):
    """A checkpoint left by other code is not resumed: the stage script (and the package) are hashed."""
    script = tmp_path / "finetune.py"
    script.write_text("SEED = 1\n")
    monkeypatch.setattr("sys.argv", [str(script)])
    before = fingerprint_of("finetune", 64)
    script.write_text("SEED = 2\n")
    assert fingerprint_of("finetune", 64) != before


def _evaluations(monkeypatch, losses: list[float]) -> None:
    """evaluate() gives these valid log losses, one per call in order: a hand-made history."""
    calls = iter(losses)
    monkeypatch.setattr(
        "kagglecls.training.evaluate",
        lambda *arguments, **options: {"valid_log_loss": next(calls), "valid_accuracy": 0.5},
    )


def test_fit_keeps_the_best_cycle_end(monkeypatch):
    # start 0.9; epochs 1, 2, 3: 0.5, 0.2, 0.6. Epoch 2 is no cycle end (cycles end at 1 and 3): epoch 1 wins.
    _evaluations(monkeypatch, [0.9, 0.5, 0.2, 0.6])
    kept_model, _, history = _run_fit(snapshot_epochs=(0, 1, 3))
    assert [record["valid_log_loss"] for record in history] == [0.5, 0.2, 0.6]
    _evaluations(monkeypatch, [0.5])
    one_epoch_model, _, _ = _run_fit(epochs=1)  # the same first epoch: each epoch reseeds from the plan
    _assert_same_state(one_epoch_model.state_dict(), kept_model.state_dict())


def test_fit_validates_only_the_epochs_of_its_plan_and_keeps_the_best_of_them(monkeypatch):
    # start 0.9; epochs 1 and 3 (the cycle ends): 0.5, 0.4. Epoch 2 trains without a valid pass.
    _evaluations(monkeypatch, [0.9, 0.5, 0.4])
    kept_model, _, history = _run_fit(snapshot_epochs=(0, 1, 3), valid_epochs=(1, 3))
    assert [record.get("valid_log_loss") for record in history] == [0.5, None, 0.4]
    assert set(history[1]) == {"epoch", "train_loss", "lr"}
    _evaluations(monkeypatch, [0.9, 0.5, 0.2, 0.4])
    every_model, _, every_history = _run_fit(snapshot_epochs=(0, 1, 3))  # the same evaluations, none skipped
    assert [record["train_loss"] for record in history] == [record["train_loss"] for record in every_history]
    _assert_same_state(every_model.state_dict(), kept_model.state_dict())  # epoch 3 in both
    # The last epoch is always validated, whatever the plan says.
    _evaluations(monkeypatch, [0.7])
    _, _, last_only = _run_fit(valid_epochs=())
    assert [record.get("valid_log_loss") for record in last_only] == [None, None, 0.7]


def test_fit_keeps_the_weights_it_started_from_when_no_cycle_end_beats_them(monkeypatch):
    _evaluations(monkeypatch, [0.4, 0.5, 0.3, 0.6])
    kept_model, _, _ = _run_fit(snapshot_epochs=(0, 1, 3))
    _assert_same_state(_tiny_model().state_dict(), kept_model.state_dict())


def test_fit_without_snapshots_ends_with_the_last_epoch(monkeypatch):
    _evaluations(monkeypatch, [0.5, 0.2, 0.6])
    last_model, _, _ = _run_fit()
    _evaluations(monkeypatch, [0.5, 0.2, 0.6])
    again, _, _ = _run_fit(snapshot_epochs=(3,))
    _assert_same_state(last_model.state_dict(), again.state_dict())


def test_save_atomic_gives_the_same_bytes_for_the_same_weights_wherever_it_writes(tmp_path):
    """DVC hashes the model files: the same weights must give the same bytes, whatever the file's name."""
    state = {"model": nn.Linear(3, 2).state_dict(), "classes": ["a", "b"]}
    save_atomic(state, tmp_path / "head.pt")
    save_atomic(state, tmp_path / "other" / "augmented.pt")
    assert (tmp_path / "head.pt").read_bytes() == (tmp_path / "other" / "augmented.pt").read_bytes()
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["augmented.pt", "head.pt", "other"]
    loaded = torch.load(tmp_path / "head.pt", weights_only=True)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
