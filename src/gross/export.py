"""Export a GroSS model at one configuration as a plain network of standard torch layers."""

from __future__ import annotations

import copy

from torch import nn

from .model import Config, _replace, gross_layers, set_config

__all__ = ["export"]


def export(model: nn.Module, config: Config | None = None) -> nn.Module:
    """A copy of ``model`` with every GroSS layer replaced by its bottleneck at ``config``.

    Each GroSS layer becomes an ``nn.Sequential`` of three ``nn.Conv2d`` (first pointwise,
    grouped, last pointwise) under the same module name, so the result has the same outputs as
    the GroSS model at that configuration, holds only that configuration's weights, and needs
    nothing from ``gross`` to run. ``model`` itself is left unchanged.

    Parameters
    ----------
    model : nn.Module
        A model with GroSS layers (see :func:`gross.decompose`).
    config : tuple or dict, optional
        Default: the active configuration.
    """
    layers = gross_layers(model)
    if not layers:
        raise ValueError("the model has no GroSS layers; call gross.decompose(model) first")
    sizes = {name: m.group_size for name, m in layers}
    if config is not None:
        probe = {name: m.group_size for name, m in layers}
        set_config(model, config)
        sizes = {name: m.group_size for name, m in layers}
        set_config(model, probe)
    out = copy.deepcopy(model)
    for name, m in gross_layers(out):
        _replace(out, name, m.bottleneck(sizes[name]))
    return out
