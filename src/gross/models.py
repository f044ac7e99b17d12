"""Networks: the built-in ones, and a user's own by reference with its trained weights.

The built-in networks are the paper's 4-layer CIFAR net, CIFAR ResNets, a CIFAR VGG-16 and the
ImageNet ResNet-18 in torchvision's layout (``resnet18_imagenet``). A
user's network is named the way Hydra and Lightning name a class: ``package.module:callable`` (an
importable module) or ``path/to/file.py:callable`` (a file, relative to the current folder); its
weights come from a ``.safetensors`` file or a PyTorch checkpoint read without unpickling code
(:func:`load_weights`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PaperNet",
    "CifarResNet",
    "VGG",
    "resnet20",
    "resnet18",
    "ImageNetResNet",
    "resnet18_imagenet",
    "vgg16_bn",
    "MODELS",
    "build_model",
    "resolve_model",
    "canonical_name",
    "accepted_kwargs",
    "read_state_dict",
    "load_weights",
    "WEIGHT_SUFFIXES",
]


class PaperNet(nn.Module):
    """The GroSS paper's CIFAR-10 network (METHOD.md section 8).

    Four 3x3 convs (``widths``; stride 1, padding 1, bias), each followed by ReLU and 2x2
    max-pooling, then FC -> 256, ReLU, dropout 0.5, FC -> classes. Input: (N, 3, 32, 32).

    Parameters
    ----------
    num_classes : int
    in_channels : int
    widths : 4 ints
        Channels of conv1..conv4.
    fc_std : float
        Standard deviation of the FC weights' normal init: 0.01 in the authors' code (the
        default, which trains), 0.1 in the paper's text (variance 0.01).
    image_size : int
        Input height and width; four poolings divide it by 16.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 32, 64, 64),
        fc_std: float = 0.01,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"PaperNet has four convs, got widths {list(widths)}")
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four 2x2 poolings), got {image_size}")
        c = [in_channels, *widths]
        self.conv1 = nn.Conv2d(c[0], c[1], 3, padding=1)
        self.conv2 = nn.Conv2d(c[1], c[2], 3, padding=1)
        self.conv3 = nn.Conv2d(c[2], c[3], 3, padding=1)
        self.conv4 = nn.Conv2d(c[3], c[4], 3, padding=1)
        self.fc1 = nn.Linear(c[4] * (image_size // 16) ** 2, 256)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(256, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, fc_std)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        x = self.dropout(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual; a strided 1x1 conv-BN shortcut on a shape change."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet for 32x32 inputs: a 3x3 stem, stages of basic blocks, global pooling, FC.

    Parameters
    ----------
    blocks : sequence of int
        Blocks per stage; every stage after the first halves the resolution with stride 2.
    widths : sequence of int
        Channels per stage.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"need one width per stage, got blocks={list(blocks)}, widths={list(widths)}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        c = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c, w, stride=2 if i > 0 and j == 0 else 1))
                c = w
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ImageNetResNet(nn.Module):
    """The ImageNet ResNet of He et al. (2016) with basic blocks, in torchvision's layout.

    A 7x7 stride-2 stem and a 3x3 stride-2 max-pool, four stages (``layer1`` .. ``layer4``) of
    basic blocks whose first block of stages 2-4 halves the resolution through a 1x1 conv-BN
    ``downsample`` shortcut, global average pooling and ``fc``. Parameter and buffer names are
    torchvision's (``conv1``, ``bn1``, ``layer2.0.downsample.0``, ``fc``, ...), so a state dict
    saved from ``torchvision.models.resnet18`` loads unchanged.
    """

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c = 64
        for i, (n, w) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stage = []
            for j in range(n):
                stage.append(_TorchvisionBlock(c, w, stride=2 if i > 0 and j == 0 else 1))
                c = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _TorchvisionBlock(nn.Module):
    """:class:`BasicBlock` under torchvision's names: the shortcut is ``downsample``, absent when the identity."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """A CIFAR VGG: 3x3 conv-BN-ReLU layers and 2x2 max-pools (``"M"``), then one FC layer."""

    def __init__(self, layout: Sequence[int | str] = _VGG16, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in layout:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 of He et al. (2016) for CIFAR: 3 stages of 3 blocks, 16/32/64 channels."""
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-18 with a 3x3 stem for CIFAR: 4 stages of 2 blocks, 64/128/256/512 channels."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


def resnet18_imagenet(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-18 for ImageNet-sized inputs (224 px): torchvision's ``resnet18``, parameter for parameter."""
    return ImageNetResNet((2, 2, 2, 2), num_classes, in_channels)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm for 32x32 inputs (13 convs, one FC layer)."""
    return VGG(_VGG16, num_classes, in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "paper": PaperNet,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet18_imagenet": resnet18_imagenet,
    "vgg16_bn": vgg16_bn,
}


# ---------------------------------------------------------------------------------------------
# A network by reference


def _split_reference(name: str) -> tuple[str, str]:
    target, sep, attr = name.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(
            f"unknown model {name!r}; give a built-in name ({', '.join(sorted(MODELS))}), "
            "package.module:callable, or path/to/file.py:callable"
        )
    return target, attr


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def canonical_name(name: str) -> str:
    """``name`` with a file reference made absolute, so that it names the same file from any folder."""
    if name in MODELS:
        return name
    target, attr = _split_reference(name)
    if _is_file(target):
        return f"{Path(target).expanduser().resolve()}:{attr}"
    return name


# Modules loaded from files, by absolute path: the same file gives the same classes every time.
_FILE_MODULES: dict[Path, Any] = {}


def _import_file(path: Path) -> Any:
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    # A unique module name per file keeps two users' model.py files apart in sys.modules.
    module_name = f"gross_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # The file's folder is importable while it runs, so its own imports (helpers beside it) work.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ValueError(f"importing {path} failed: {type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(str(path.parent))
    _FILE_MODULES[path] = module
    return module


def resolve_model(name: str) -> Callable[..., nn.Module]:
    """The constructor a model name refers to.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`; ``package.module:callable`` (imported); or
        ``path/to/file.py:callable`` (relative to the current folder; the file's folder is on
        ``sys.path`` while it is imported). ``callable`` may be dotted (``Outer.build``).

    Raises
    ------
    ValueError
        When the module or file cannot be imported or has no such callable; the message says which.
    """
    if name in MODELS:
        return MODELS[name]
    target, attr = _split_reference(name)
    if _is_file(target):
        module = _import_file(Path(target).expanduser().resolve())
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"cannot import {target!r} for model {name!r}: {err}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {name!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {name!r}: {attr} is a {type(obj).__name__}, not a class or function")
    return obj


def accepted_kwargs(name: str) -> set[str]:
    """Keyword arguments the constructor of ``name`` declares by name (``**kwargs`` does not count)."""
    factory = resolve_model(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without an inspectable signature: nothing is filled in
        return set()
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params.values() if p.kind in keyword}


def build_model(name: str, **kwargs) -> nn.Module:
    """A network by name or reference (:func:`resolve_model`) with keyword arguments of its constructor."""
    factory = resolve_model(name)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {name!r} with {kwargs}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model


# ---------------------------------------------------------------------------------------------
# The user's weights

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Where training scripts commonly nest the state dict inside a checkpoint, in the order tried.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes that wrappers add to every key: DDP / DataParallel, and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a weights file, unwrapped.

    ``.safetensors`` files are read as they are; ``.pt``, ``.pth`` and ``.bin`` with
    ``torch.load(weights_only=True)``, which refuses any pickle that would run code. A state dict
    nested under ``state_dict``, ``model_state_dict`` or ``model`` is found, and a prefix that
    every key shares from a wrapper (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``) is
    removed.

    Raises
    ------
    ValueError
        For a missing file, another suffix, a pickle with code, or a file holding no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.weights: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"model.weights: {path} is not a weights file; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"model.weights: {path} is not a readable safetensors file ({err})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"model.weights: {path} cannot be read as weights only ({first}); it holds more than tensors "
                "(a pickled module or object); save model.state_dict() with torch.save or safetensors instead"
            ) from None
    for key in _NESTED_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        kinds = sorted({type(v).__name__ for v in state.values()}) if isinstance(state, Mapping) else [type(state).__name__]
        raise ValueError(
            f"model.weights: {path} holds no state dict of tensors (found {', '.join(kinds) or 'nothing'}); "
            f"expected a state dict, or one under {', '.join(_NESTED_KEYS)}"
        )
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _few(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weights file (:func:`read_state_dict`) into ``model``, strictly; returns ``model``.

    Raises
    ------
    ValueError
        One message with the counts and the first few missing, unexpected and shape-mismatched keys.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (file vs model: {_few(shapes)})")
        raise ValueError(f"model.weights: {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
