"""Export a GroSS model at one configuration as a plain network; save, load, ONNX and torch.export.

:func:`export` replaces every GroSS layer by standard ``nn.Conv2d`` layers: its bottleneck at the
chosen group size (three convs), or one dense conv. A bottleneck has no nonlinearity inside, so
it *is* one conv with weight :meth:`GroSSConv2d.dense_weight` (up to rounding); that fused conv
has more MACs than a small bottleneck but can be faster (see :mod:`gross.latency`), so export
fuses where asked or where a latency table says so. A configuration entry may also be
``"dense"`` (or ``0``): the original convolution, taken from the undecomposed model when given.

:func:`save` writes ``net.safetensors`` (the state dict) and ``net.json`` (where the base
architecture comes from, and the convs that replace each decomposed layer); :func:`load` rebuilds
the network from those two files with standard layers only, without ``gross`` layers and without
unpickling anything. The architecture is a built-in name of :data:`gross.models.MODELS`, an import
reference (``package.module:callable`` or ``/abs/path/file.py:callable``, see
:func:`gross.models.resolve_model`) with its keyword arguments, both rebuilt by
:func:`gross.models.build_model`, or a network given in Python (``python:module.QualName``), into a
fresh instance of which :func:`load` must be handed the weights.

:func:`export_program` writes the same network as a ``torch.export`` program (``net.pt2``) that
``torch.export.load(path).module()`` runs without ``gross`` or the network's own code.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import PYTHON_PREFIX, python_arch_name
from .latency import DENSE, Choice, LatencyTable, normalize_choice
from .model import Config, _replace, gross_layers
from .models import MODELS, build_model, canonical_name
from .runtime import onnx_program
from .series import GroSSConv2d

__all__ = ["export", "save", "load", "export_onnx", "export_program", "ARCH_ATTR", "EXPORT_ATTR"]

ARCH_ATTR = "gross_arch"  # optional model attribute {"name": model name or reference, "kwargs": {...}}
EXPORT_ATTR = "gross_export"  # set by export(): {layer name: {"choice": size or "dense", "fused": bool}}

Fuse = bool | Literal["auto"] | Collection[str]

_FORMAT = "gross-export"
_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _choices(layers: list[tuple[str, GroSSConv2d]], config: Config | None) -> dict[str, Choice]:
    """Each layer's choice: the active group size unless ``config`` says otherwise."""
    chosen: dict[str, Choice] = {name: m.group_size for name, m in layers}
    if config is None:
        return chosen
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(chosen))
        if unknown:
            raise ValueError(f"config names layers that are not GroSS layers: {unknown}; GroSS layers: {list(chosen)}")
        chosen.update({name: normalize_choice(s) for name, s in config.items()})
    else:
        config = tuple(config)
        if len(config) != len(layers):
            raise ValueError(f"config has {len(config)} entries but the model has {len(layers)} GroSS layers")
        chosen = {name: normalize_choice(s) for (name, _), s in zip(layers, config)}
    for name, m in layers:
        if chosen[name] != DENSE and chosen[name] not in m.group_sizes:
            raise ValueError(
                f"group size {chosen[name]} is invalid for layer {name}; valid: {list(m.group_sizes)} or {DENSE!r}"
            )
    return chosen


def _fused(
    layers: list[tuple[str, GroSSConv2d]], chosen: dict[str, Choice], fuse: Fuse, latency: LatencyTable | None
) -> set[str]:
    names = [name for name, _ in layers]
    if fuse is False or fuse is None:
        return set()
    if fuse is True:
        return set(names)
    if isinstance(fuse, str):
        if fuse != "auto":
            raise ValueError(f"fuse is False, True, 'auto' or a collection of layer names, got {fuse!r}")
        if latency is None:
            raise ValueError("fuse='auto' needs a latency table (gross.latency.latency_table)")
        if list(latency.layers) != names:
            raise ValueError(f"the latency table is for layers {list(latency.layers)}, the model has {names}")
        return latency.fused_faster([chosen[n] for n in names])
    wanted = set(fuse)
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"fuse names layers that are not GroSS layers: {unknown}; GroSS layers: {names}")
    return wanted


def _original_conv(original: nn.Module, name: str, layer: GroSSConv2d) -> nn.Conv2d:
    try:
        conv = original.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the original model has no module {name!r}") from None
    if not isinstance(conv, nn.Conv2d) or conv.weight.shape != (
        layer.out_channels,
        layer.in_channels,
        *layer.kernel_size,
    ):
        raise ValueError(f"original module {name!r} ({conv}) is not the conv that GroSS layer {name!r} replaced")
    like = layer.first[0]
    return copy.deepcopy(conv).to(device=like.device, dtype=like.dtype)


def export(
    model: nn.Module,
    config: Config | None = None,
    fuse: Fuse = False,
    latency: LatencyTable | None = None,
    original: nn.Module | None = None,
) -> nn.Module:
    """A copy of ``model`` with every GroSS layer replaced by standard convs at ``config``.

    Each GroSS layer becomes, under the same module name, either an ``nn.Sequential`` of three
    ``nn.Conv2d`` (first pointwise, grouped, last pointwise), or a single ``nn.Conv2d`` when it
    is fused or its choice is ``"dense"``. The result has the same outputs as the GroSS model at
    that configuration (a fused layer up to rounding), holds only that configuration's weights,
    and needs nothing from ``gross`` to run. ``model`` itself is left unchanged. The copy carries
    the attribute ``gross_export`` (``{name: {"choice", "fused"}}``) that :func:`save` records.

    Parameters
    ----------
    model : nn.Module
        A model with GroSS layers (see :func:`gross.decompose`).
    config : tuple in module order, or dict name -> choice, optional
        Default: the active configuration; a dict may name a subset of the layers. A choice is
        a group size of the layer or ``"dense"`` / ``0`` (the original convolution).
    fuse : False, True, "auto" or collection of layer names
        Layers whose bottleneck to export as one dense conv of the same map: none, all, those
        where ``latency`` says the dense conv is faster, or the named ones.
    latency : LatencyTable, optional
        Needed by ``fuse="auto"``; measured on the device and batch size the network will run at.
    original : nn.Module, optional
        The model before decomposition: ``"dense"`` layers copy their conv from it. Without it a
        ``"dense"`` layer is the fused bottleneck at its largest group size, which equals the
        original conv only where that size is exact (one group, ``C_out <= D``) and untrained.
    """
    layers = gross_layers(model)
    if not layers:
        raise ValueError("the model has no GroSS layers; call gross.decompose(model) first")
    chosen = _choices(layers, config)
    fused = _fused(layers, chosen, fuse, latency)
    out = copy.deepcopy(model)
    record = {}
    for name, m in gross_layers(out):
        choice = chosen[name]
        if choice == DENSE:
            new = _original_conv(original, name, m) if original is not None else m.dense_conv(m.group_sizes[-1])
        elif name in fused:
            new = m.dense_conv(choice)
        else:
            new = m.bottleneck(choice)
        new.train(m.training)
        _replace(out, name, new)
        record[name] = {"choice": choice, "fused": choice != DENSE and name in fused}
    setattr(out, EXPORT_ATTR, record)
    return out


def _conv_spec(conv: nn.Conv2d) -> dict:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _conv_from_spec(spec: Mapping) -> nn.Conv2d:
    padding = spec["padding"]
    return nn.Conv2d(
        int(spec["in_channels"]),
        int(spec["out_channels"]),
        tuple(spec["kernel_size"]),
        stride=tuple(spec["stride"]),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(spec["dilation"]),
        groups=int(spec["groups"]),
        bias=bool(spec["bias"]),
        padding_mode=spec["padding_mode"],
    )


def _layer_entry(name: str, module: nn.Module, info: Mapping) -> dict:
    convs = list(module) if isinstance(module, nn.Sequential) else [module]
    if len(convs) not in (1, 3) or not all(type(c) is nn.Conv2d for c in convs):
        raise ValueError(f"exported layer {name!r} is neither one nn.Conv2d nor three in an nn.Sequential: {module}")
    return {
        "name": name,
        "choice": info["choice"],
        "fused": bool(info["fused"]),
        "convs": [_conv_spec(c) for c in convs],
    }


def _arch_source(name: str) -> str:
    """Where an architecture comes from, for readers of net.json: built-in, import or python."""
    return "built-in" if name in MODELS else "python" if name.startswith(PYTHON_PREFIX) else "import"


def _arch(model: nn.Module, arch: str | Mapping | None) -> dict:
    """The record of the base architecture: ``{"name", "kwargs", "source"}``, JSON-ready.

    Without ``arch`` or ``model.gross_arch`` the network was given in Python: its class is
    recorded (``python:module.QualName``), and :func:`load` needs a fresh instance of it.
    """
    arch = getattr(model, ARCH_ATTR, None) if arch is None else arch
    if arch is None:
        arch = python_arch_name(model)
    if isinstance(arch, str):
        arch = {"name": arch, "kwargs": {}}
    if not isinstance(arch, Mapping) or set(arch) - {"name", "kwargs", "source"} or not isinstance(arch.get("name"), str):
        raise ValueError(f"arch must be a model name or {{'name': ..., 'kwargs': {{...}}}}, got {arch!r}")
    name = arch["name"]
    # A file reference is made absolute, so that the export loads from any folder.
    name = name if name.startswith(PYTHON_PREFIX) else canonical_name(name)
    out = {"name": name, "kwargs": dict(arch.get("kwargs") or {}), "source": _arch_source(name)}
    try:
        # Round-trip through JSON now so that load sees exactly what was checked here (tuples -> lists).
        return json.loads(json.dumps(out))
    except TypeError as e:
        raise ValueError(f"the architecture's keyword arguments must be JSON values: {e}") from None


def _base(arch: Mapping, template: nn.Module | None) -> nn.Module:
    """A fresh base network: a copy of ``template`` when given, else rebuilt from the record's name."""
    if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs"), Mapping):
        raise ValueError(f"malformed architecture record {arch!r}; expected {{'name': ..., 'kwargs': {{...}}}}")
    name = arch["name"]
    if name.startswith(PYTHON_PREFIX):
        cls = name[len(PYTHON_PREFIX):]
        if template is None:
            raise ValueError(
                f"the network ({cls}) was given in Python, so no name rebuilds it: pass a freshly built one, "
                f"gross.load(path, model={cls.rpartition('.')[2]}(...))"
            )
        if python_arch_name(template) != name:
            raise ValueError(f"the network was a {cls}, but model= is a {python_arch_name(template)[len(PYTHON_PREFIX):]}")
    if template is not None:
        if gross_layers(template):
            raise ValueError("model= must be the base network as built, without GroSS layers")
        return copy.deepcopy(template)
    try:
        return build_model(name, **arch["kwargs"])
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"cannot rebuild the architecture {name!r} with {dict(arch['kwargs'])}: {e}; "
            f"make it importable, or pass model= a freshly built base network"
        ) from None


def _rebuild(arch: Mapping, layers: Sequence[Mapping], dtype: torch.dtype, template: nn.Module | None = None) -> nn.Module:
    """The base architecture with each named conv replaced per ``layers``; ValueError on any mismatch."""
    model = _base(arch, template)
    for entry in layers:
        try:
            name, specs = entry["name"], entry["convs"]
            convs = [_conv_from_spec(spec) for spec in specs]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed layer entry {entry!r}: {e!r}") from None
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} does not exist in {arch['name']!r}") from None
        if type(base) is not nn.Conv2d:
            raise ValueError(f"layer {name!r} of {arch['name']!r} is {type(base).__name__}, not nn.Conv2d")
        _check_replacement(name, base, convs)
        _replace(model, name, convs[0] if len(convs) == 1 else nn.Sequential(*convs))
    return model.to(dtype)


def _check_replacement(name: str, base: nn.Conv2d, convs: list[nn.Conv2d]) -> None:
    """The convs must map the base conv's input to its output shape: same spatial conv, 1x1 around it."""
    if len(convs) not in (1, 3):
        raise ValueError(f"layer {name!r} must be replaced by 1 conv or a 3-conv bottleneck, got {len(convs)}")
    spatial = convs[len(convs) // 2]
    pointwise = [c for c in convs if c is not spatial]
    problems = []
    if convs[0].in_channels != base.in_channels or convs[-1].out_channels != base.out_channels:
        problems.append(
            f"maps {convs[0].in_channels} -> {convs[-1].out_channels} channels, "
            f"the base conv {base.in_channels} -> {base.out_channels}"
        )
    if any(a.out_channels != b.in_channels for a, b in zip(convs, convs[1:])):
        problems.append("consecutive convs disagree on channels")
    geometry = ("kernel_size", "stride", "padding", "dilation", "padding_mode")
    if any(getattr(spatial, k) != getattr(base, k) for k in geometry):
        problems.append(
            "its spatial conv has " + ", ".join(f"{k}={getattr(spatial, k)}" for k in geometry)
            + "; the base conv " + ", ".join(f"{k}={getattr(base, k)}" for k in geometry)
        )
    if any(c.kernel_size != (1, 1) or c.stride != (1, 1) or c.padding != (0, 0) or c.dilation != (1, 1)
           or c.groups != 1 for c in pointwise):
        problems.append("its first and last convs must be plain 1x1 convs")
    if len(convs) == 3 and (convs[0].bias is not None or spatial.bias is not None):
        problems.append("only the last conv of a bottleneck may have a bias")
    if problems:
        raise ValueError(f"layer {name!r} does not fit the base architecture: " + "; ".join(problems))


def _dtype_name(model: nn.Module) -> str:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    names = {v: k for k, v in _DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"unsupported parameter dtype {dtype}")
    return names[dtype]


def save(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    arch: str | Mapping | None = None,
    config: Config | None = None,
    fuse: Fuse = False,
    latency: LatencyTable | None = None,
    original: nn.Module | None = None,
) -> Path:
    """Write the compact network to ``folder/net.safetensors`` and ``folder/net.json``.

    Parameters
    ----------
    model : nn.Module
        A GroSS model (exported here with ``config``, ``fuse``, ``latency``, ``original``, see
        :func:`export`) or the result of :func:`export`.
    folder : path
        Created if missing; existing files of the same names are replaced.
    arch : str or dict, optional
        The base architecture: a name :func:`gross.models.build_model` takes (a key of
        :data:`gross.models.MODELS`, ``package.module:callable`` or ``path/to/file.py:callable``,
        made absolute), or ``{"name": ..., "kwargs": {...}}`` with its constructor's keyword
        arguments (JSON values). Default: the model's ``gross_arch`` attribute, else the network
        counts as given in Python: its class is recorded and :func:`load` needs a fresh one.
    config, fuse, latency, original
        See :func:`export`. ``original``, the base network, also checks the record of a network
        given in Python (which nothing else rebuilds here).

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    ValueError
        When the architecture cannot be imported or does not rebuild into a network with exactly
        this state dict (checked before anything is written), or when export options are passed
        for a model that is already exported.
    """
    if gross_layers(model):
        exported = export(model, config, fuse=fuse, latency=latency, original=original)
    elif config is not None or fuse is not False or latency is not None or original is not None:
        raise ValueError("the model is already exported; config, fuse, latency and original apply to GroSS models")
    else:
        exported = model
    record = getattr(exported, EXPORT_ATTR, None)
    if not isinstance(record, Mapping):
        raise ValueError("the model has neither GroSS layers nor the record of gross.export; nothing to save")
    arch_dict = _arch(model, arch)
    layers = [_layer_entry(name, exported.get_submodule(name), info) for name, info in record.items()]
    dtype = _dtype_name(exported)
    state = {k: v.detach().to("cpu").contiguous() for k, v in exported.state_dict().items()}
    python = arch_dict["source"] == "python"
    # A network given in Python is rebuilt only from a fresh instance: checked here against
    # `original` when given, else when it is loaded.
    if not python or original is not None:
        rebuilt = _rebuild(arch_dict, layers, _DTYPES[dtype], original if python else None).state_dict()
        mismatch = sorted(
            k for k in set(state) | set(rebuilt) if k not in state or k not in rebuilt or state[k].shape != rebuilt[k].shape
        )
        if mismatch:
            raise ValueError(f"architecture {arch_dict} does not rebuild this network; differing entries: {mismatch[:10]}")
    header = {
        "format": _FORMAT,
        "version": _VERSION,
        "arch": arch_dict,
        "dtype": dtype,
        "config": [layer["choice"] for layer in layers],
        "parameters": sum(p.numel() for p in exported.parameters()),
        "layers": layers,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "net.safetensors"), metadata={"format": "pt"})
    (folder / "net.json").write_text(json.dumps(header, indent=1) + "\n")
    return folder


def load(folder: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a network written by :func:`save`, with standard torch layers only, in eval mode.

    Builds the base architecture (:func:`gross.models.build_model` on the recorded name, which
    imports the user's module or file), or copies ``model``; replaces each recorded conv by its
    plain ``nn.Conv2d`` / ``nn.Sequential``, and loads ``net.safetensors`` strictly. The result
    carries ``gross_arch`` and ``gross_export`` so that it can be saved again.

    Parameters
    ----------
    folder : path
        Holding ``net.json`` and ``net.safetensors``.
    model : nn.Module, optional
        A freshly built base network (its weights are not used; it is copied, not changed).
        Needed for a network given in Python (``net.json``'s ``arch.source`` is ``python``),
        which must be of the recorded class; elsewhere it stands in for a name that cannot be
        imported here.

    Raises
    ------
    FileNotFoundError
        When ``net.json`` or ``net.safetensors`` is missing.
    ValueError
        When ``net.json`` is malformed, its architecture cannot be imported or needs ``model``,
        ``net.safetensors`` is unreadable, or the two disagree.
    """
    folder = Path(folder)
    try:
        header = json.loads((folder / "net.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'net.json'} is not valid JSON: {e}") from None
    if not isinstance(header, Mapping) or header.get("format") != _FORMAT:
        raise ValueError(f"{folder / 'net.json'} is not a gross export (format {_FORMAT!r})")
    if header.get("version") != _VERSION:
        raise ValueError(f"unsupported export version {header.get('version')!r}, expected {_VERSION}")
    if header.get("dtype") not in _DTYPES or not isinstance(header.get("layers"), list):
        raise ValueError(f"{folder / 'net.json'} needs a dtype in {sorted(_DTYPES)} and a list of layers")
    try:
        model = _rebuild(header.get("arch"), header["layers"], _DTYPES[header["dtype"]], model)
    except ValueError as e:
        raise ValueError(f"{folder / 'net.json'}: {e}") from None
    try:
        state = load_file(str(folder / "net.safetensors"))
    except SafetensorError as e:
        raise ValueError(f"{folder / 'net.safetensors'} is not a readable safetensors file: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"net.safetensors does not match the architecture in net.json: {e}") from None
    setattr(model, ARCH_ATTR, header["arch"])
    setattr(
        model,
        EXPORT_ATTR,
        {entry["name"]: {"choice": entry.get("choice"), "fused": bool(entry.get("fused"))} for entry in header["layers"]},
    )
    return model.eval()


def export_onnx(
    exported: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
) -> Path:
    """Write an exported (plain) network as one self-contained ONNX file, traced in eval mode.

    Uses torch's ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9;
    the TorchScript one is deprecated) through :func:`gross.runtime.onnx_program`, as the
    onnxruntime latency runtime does. It implements opset 18; an older ``opset`` (>= 17) is
    reached by the ONNX version converter. Weights are stored inside the file, so models over
    2 GB are out of reach.

    Parameters
    ----------
    exported : nn.Module
        The result of :func:`export` or :func:`load` (no GroSS layers).
    path : path
        The ``.onnx`` file to write.
    input_shape : (C, H, W) or (N, C, H, W)
        One sample's shape (or a batch's); the graph's input is named ``input``, its output
        ``output``.
    opset : int
        ONNX opset, 17 or later.
    dynamic_batch : bool
        Leave the batch dimension free; otherwise it is fixed to ``N`` (default 1).
    """
    if opset < 17:
        raise ValueError(f"opset must be 17 or later, got {opset}")
    example = _example_input("export_onnx", exported, input_shape, dynamic_batch)
    program = onnx_program(exported, (example,), opset=opset, dynamic_batch=dynamic_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    return path


def _example_input(what: str, exported: nn.Module, input_shape: Sequence[int], dynamic_batch: bool) -> torch.Tensor:
    """A random input of ``input_shape`` on the network's device and dtype, to trace it with.

    Returns
    -------
    Tensor, shape (N, C, H, W)
        ``N`` is 1 for a ``(C, H, W)`` shape, and at least 2 with ``dynamic_batch``:
        torch.export specialises a size-1 dimension to a constant.
    """
    if gross_layers(exported):
        raise ValueError(f"{what} takes a plain network: call gross.export(model, config) first")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")
    if dynamic_batch and shape[0] == 1:
        shape = (2,) + shape[1:]
    param = next(exported.parameters(), None)
    factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    return torch.randn(shape, **factory)


def export_program(
    exported: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], *, dynamic_batch: bool = True
) -> Path:
    """Write an exported (plain) network as a ``torch.export`` program (``.pt2``), traced in eval mode.

    ``torch.export.load(path).module()`` runs it with torch alone: neither ``gross`` nor the
    network's own code is imported, and nothing is unpickled but tensors. Weights are stored
    inside the file, on the network's device.

    Parameters
    ----------
    exported : nn.Module
        The result of :func:`export` or :func:`load` (no GroSS layers); copied, not changed.
    path : path
        The ``.pt2`` file to write.
    input_shape : (C, H, W) or (N, C, H, W)
        One sample's shape (or a batch's).
    dynamic_batch : bool
        Leave the batch dimension free; otherwise it is fixed to ``N`` (default 1).

    Raises
    ------
    Exception
        Whatever ``torch.export.export`` raises where it cannot trace the network (data-dependent
        control flow, unsupported operations, ...).
    """
    example = _example_input("export_program", exported, input_shape, dynamic_batch)
    net = copy.deepcopy(exported).eval()
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.export.export(net, (example,), dynamic_shapes=dynamic)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path
