"""Analytic multiply-accumulates (MACs) of conv and linear layers, per configuration.

Counted: every ``nn.Conv1d/2d/3d``, ``nn.Linear`` and GroSS layer, multiply-accumulates only
(no bias adds, activations or pooling), for the whole input batch. One forward pass records each
layer's input and output shapes; the MACs of every group size of every GroSS layer then follow
without running the network again, so a search can cost millions of configurations cheaply.
Each GroSS layer is also costed as one dense conv (its bottleneck fused back, with the original
conv's shape and MACs), the choice a search has where that is cheaper than every bottleneck.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .latency import DENSE, Choice, normalize_choice
from .model import Config, get_config, gross_layers, set_config
from .series import GroSSConv2d

__all__ = ["MACs", "MACsTable", "macs_table", "count_macs"]


@dataclass(frozen=True)
class MACs:
    total: int  # MACs of the whole network at the configuration
    per_layer: dict[str, int]  # module name -> MACs, for every counted layer


@dataclass(frozen=True)
class MACsTable:
    fixed: dict[str, int]  # MACs of every counted layer that is not a GroSS layer
    layers: tuple[str, ...]  # GroSS layer names, in module order
    options: tuple[dict[int, int], ...]  # per GroSS layer: group size -> MACs
    # Per GroSS layer: MACs as one dense conv, the original's (its bottleneck fused, or the conv
    # it replaced: both have the original's shape).
    dense: tuple[int, ...] = ()

    def per_layer(self, config: Sequence[Choice]) -> dict[str, int]:
        """MACs of every counted layer at ``config``; an entry ``"dense"`` (or ``0``) is the dense conv."""
        if len(config) != len(self.layers):
            raise ValueError(f"config has {len(config)} entries, the table has {len(self.layers)} layers")
        out = dict(self.fixed)
        for i, (name, options, s) in enumerate(zip(self.layers, self.options, config)):
            s = normalize_choice(s)
            if s == DENSE and self.dense:
                out[name] = self.dense[i]
            elif s in options:
                out[name] = options[s]
            else:
                raise ValueError(f"group size {s} is invalid for layer {name}; valid: {sorted(options)}")
        return out

    def cost(self, config: Sequence[Choice]) -> int:
        """Total MACs of a configuration (a tuple in module order; ``"dense"``/``0``: the dense conv)."""
        return sum(self.per_layer(config).values())


def _conv_macs(m: nn.modules.conv._ConvNd, out: torch.Tensor) -> int:
    return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _gross_macs(m: GroSSConv2d, x: torch.Tensor, out: torch.Tensor, s: int) -> int:
    kh, kw = m.kernel_size
    pixels_in = x.numel() // m.in_channels
    pixels_out = out.numel() // m.out_channels
    first = pixels_in * m.width * m.in_channels
    core = pixels_out * m.width * s * kh * kw
    last = pixels_out * m.out_channels * m.width
    return first + core + last


def _dense_macs(m: GroSSConv2d, out: torch.Tensor) -> int:
    # The conv the bottleneck stands for: (C_out, C_in, kh, kw) at every output pixel.
    return out.numel() * m.in_channels * math.prod(m.kernel_size)


def macs_table(model: nn.Module, input_shape: Sequence[int]) -> MACsTable:
    """Record layer shapes with one forward pass and tabulate MACs for every group size.

    Parameters
    ----------
    model : nn.Module
        Any network; GroSS layers are optional.
    input_shape : (C, H, W) or (N, C, H, W)
        Shape of one input (or of a batch, to count the whole batch).
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")
    fixed: dict[str, int] = {}
    gross: dict[str, dict[int, int]] = {}
    dense: dict[str, int] = {}
    hooks = []

    def record(name: str):
        def hook(m: nn.Module, inputs, out):
            if isinstance(m, GroSSConv2d):
                gross[name] = {s: _gross_macs(m, inputs[0], out, s) for s in m.group_sizes}
                dense[name] = _dense_macs(m, out)
            elif isinstance(m, nn.Linear):
                fixed[name] = out.numel() * m.in_features
            else:
                fixed[name] = _conv_macs(m, out)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (GroSSConv2d, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(record(name)))
    was_training = model.training
    param = next(model.parameters(), None)
    factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, **factory))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    names = tuple(name for name, _ in gross_layers(model))
    return MACsTable(fixed=fixed, layers=names, options=tuple(gross[n] for n in names), dense=tuple(dense[n] for n in names))


def count_macs(model: nn.Module, input_shape: Sequence[int], config: Config | None = None) -> MACs:
    """MACs of ``model`` at a configuration (default: the active one), in total and per layer.

    ``config`` is applied for the count only; the model's active configuration is restored.
    """
    table = macs_table(model, input_shape)
    if not table.layers:
        if config is not None:
            raise ValueError("a config was given but the model has no GroSS layers")
        per_layer = dict(table.fixed)
    else:
        active = get_config(model)
        if config is not None:
            set_config(model, config)
        try:
            per_layer = table.per_layer(get_config(model))
        finally:
            set_config(model, active)
    return MACs(total=sum(per_layer.values()), per_layer=per_layer)
