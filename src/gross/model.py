"""Whole-model conversion and the configuration API.

A *configuration* is one group size per GroSS layer, in module order (``named_modules``), either
as a tuple or as a dict ``name -> size``.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import functools
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .sampling import DEFAULT_FORM, sample_index
from .series import GroSSConv2d, default_group_sizes, fit_series

__all__ = [
    "Config",
    "decompose",
    "plan_decomposition",
    "PlannedConv",
    "gross_layers",
    "get_config",
    "set_config",
    "format_config",
    "parse_config",
    "search_space",
    "sample_config",
    "layer_specs",
    "restore_layers",
    "batchnorm_state",
    "load_batchnorm_state",
    "recalibrate_batchnorm",
]

log = logging.getLogger("gross")

Config = Sequence[int] | Mapping[str, int]
GroupSizes = None | Sequence[int] | Mapping[str, Sequence[int]]


def gross_layers(model: nn.Module) -> list[tuple[str, GroSSConv2d]]:
    """The GroSS layers of a model as ``(name, module)``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GroSSConv2d)]


def _require_layers(model: nn.Module) -> list[tuple[str, GroSSConv2d]]:
    layers = gross_layers(model)
    if not layers:
        raise ValueError("the model has no GroSS layers; call gross.decompose(model) first")
    return layers


def _sizes_for(name: str, width: int, group_sizes: GroupSizes) -> tuple[int, ...]:
    if group_sizes is None:
        return default_group_sizes(width)
    wanted = group_sizes.get(name) if isinstance(group_sizes, Mapping) else group_sizes
    if wanted is None:
        return ()
    return tuple(sorted({int(s) for s in wanted if width % int(s) == 0}))


@dataclass(frozen=True)
class PlannedConv:
    """What :func:`decompose` does with one ``nn.Conv2d``: its group sizes, or why it is left alone."""

    name: str  # module name, as in named_modules
    sizes: tuple[int, ...]  # candidate group sizes; () when the conv is left alone
    reason: str  # why it is left alone ("" when decomposed)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a pattern matches the module or one of the modules it sits in (``layer1`` covers ``layer1.0.conv1``)."""
    parts = name.split(".")
    scopes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(scope, p) for p in patterns for scope in scopes)


def plan_decomposition(
    model: nn.Module,
    group_sizes: GroupSizes = None,
    skip: Iterable[str] = (),
    only: Iterable[str] = (),
    width: int | None = None,
) -> list[PlannedConv]:
    """Every conv of ``model`` with the group sizes :func:`decompose` gives it, or why it is left alone.

    The arguments are :func:`decompose`'s; ``width`` is the bottleneck width (default: each
    conv's input channels). Raises ``ValueError`` for a ``skip`` or ``only`` entry that matches
    no module, and for a ``group_sizes`` dict that names a module that is not a conv or gives a
    size that does not divide its width.
    """
    skip, only = list(skip), list(only)
    names = [name for name, _ in model.named_modules()]
    for key, patterns in (("skip", skip), ("only", only)):
        unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unknown:
            raise ValueError(f"{key} names or patterns that match no module: {unknown}")
    explicit = isinstance(group_sizes, Mapping)
    if explicit:
        missing = sorted(set(group_sizes) - set(names))
        if missing:
            raise ValueError(f"group_sizes names modules that do not exist: {missing}")
        for name, wanted in group_sizes.items():
            m = model.get_submodule(name)
            if type(m) is not nn.Conv2d:
                raise ValueError(f"group_sizes names {name!r}, a {type(m).__name__}, not an nn.Conv2d")
            w = width or m.in_channels
            bad = [int(s) for s in wanted if int(s) < 1 or w % int(s)]
            if bad or not wanted:
                raise ValueError(f"group sizes {list(wanted)} for {name!r} must be divisors of its width {w}")
    plan: list[PlannedConv] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or isinstance(m, GroSSConv2d):
            continue
        sizes = _sizes_for(name, width or m.in_channels, group_sizes)
        named = explicit and name in group_sizes
        if type(m) is not nn.Conv2d:
            reason = f"a {type(m).__name__}, a subclass of nn.Conv2d whose forward may differ"
        elif _matches(name, skip):
            reason = "skipped by skip"
        elif only and not _matches(name, only):
            reason = "not matched by only"
        elif m.groups != 1:
            reason = "depthwise conv" if m.groups == m.in_channels else f"grouped conv (groups={m.groups})"
        elif m.kernel_size == (1, 1) and not (named or name in only):
            reason = "1x1 kernel: its bottleneck costs more MACs than the conv at every group size"
        elif len(sizes) < 2 and not (named and sizes):
            reason = f"group sizes {list(sizes)}: nothing to choose"
        else:
            reason = ""
        plan.append(PlannedConv(name, sizes if not reason else (), reason))
    return plan


def decompose(
    model: nn.Module,
    group_sizes: GroupSizes = None,
    skip: Iterable[str] = (),
    nested: bool = False,
    only: Iterable[str] = (),
    progress: Callable[[str, int, int, int, float, float], None] | None = None,
    workers: int = 1,
    **btd_options,
) -> nn.Module:
    """Replace every eligible ``nn.Conv2d`` of ``model`` by a :class:`GroSSConv2d`, in place.

    Eligible (:func:`plan_decomposition`): an ``nn.Conv2d`` (not a subclass) with ``groups == 1``,
    a kernel larger than 1x1 (a 1x1 conv's bottleneck costs more than the conv at every group
    size), not matched by ``skip``, matched by ``only`` when it is given, and with at least two
    candidate group sizes (a layer with a single choice adds nothing to the search space, e.g. a
    3-channel input conv) unless ``group_sizes`` is a dict that names the layer: that is how a
    fixed configuration (one size per layer) is built.

    Parameters
    ----------
    model : nn.Module
    group_sizes : sequence of int, or dict name -> sequence of int, optional
        Candidate sizes; for each layer the ones that divide its width are kept. A dict leaves
        layers it does not name alone, and a size in it that does not divide the named layer's
        width is an error. Default: :func:`gross.default_group_sizes` of each layer's width.
    skip : iterable of str
        Module names (as in ``named_modules``) or shell-style patterns (``layer1.*.conv2``) to
        leave alone; a name covers the convs inside that module (``layer1``, ``stem``).
    only : iterable of str
        If given, only convs matching (or inside a module matching) one of these names or
        patterns are decomposed; a 1x1 conv is decomposed when named here exactly.
    nested : bool
        See :meth:`GroSSConv2d.from_conv`.
    progress : callable(name, index, total, group_size, done, work), optional
        Called before each fit: layer ``name`` (``index`` of ``total`` layers) at ``group_size``.
        ``done`` of ``work`` is the estimated cost of the fits finished of all fits, counted as
        ``weight.numel() * D`` per fit (the arithmetic of a step's products with the weight,
        which dominates on large layers), so that ``elapsed * (work - done) / done`` estimates
        the time left. With ``workers``, called as each fit finishes (``group_size``: the
        one that finished).
    workers : int
        Processes fitting at once, each with ``torch.get_num_threads() // workers`` threads
        (at least one): the fits of every layer and size (of every layer, when ``nested``) are
        shared out, largest first. A fit's many small products use threads poorly: on this
        project's quiet 2-core machine two workers of one thread decomposed every 3x3 conv of an
        ImageNet ResNet-18 at every power-of-two size in 364 s against 479 s for one process of
        two threads (``benchmarks/btd_speed.py --series resnet18 --workers 1 2 --threads 2
        --every-conv``); more cores should gain more (not measured). Each process starts by
        importing torch, which costs a few seconds. Weights on a GPU are fitted one at a time.
    **btd_options
        Passed to :func:`gross.btd`.

    Returns
    -------
    nn.Module
        ``model`` itself, modified.
    """
    plan = plan_decomposition(model, group_sizes, skip, only, btd_options.get("width"))
    chosen = [(p.name, p.sizes) for p in plan if p.sizes]
    if not chosen:
        left = "; ".join(f"{p.name} ({p.reason})" for p in plan)
        raise ValueError("nothing to decompose: no conv is eligible" + (f"; left alone: {left}" if left else ""))
    if len(chosen) < len(plan):
        log.info("decompose: left alone %s", ", ".join(f"{p.name} ({p.reason})" for p in plan if not p.sizes))

    # The cost of one fit, for the progress callback's time estimate (see its description).
    costs = []
    for name, _ in chosen:
        conv = model.get_submodule(name)
        costs.append(float(conv.weight.numel() * (btd_options.get("width") or conv.in_channels)))
    work, done = sum(c * len(sizes) for c, (_, sizes) in zip(costs, chosen)), 0.0

    def report(name: str, index: int, sizes: Sequence[int], before: float, size: int) -> None:
        if progress is not None:
            progress(name, index, len(chosen), size, before + sorted(sizes).index(size) * costs[index], work)

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    on_cpu = all(model.get_submodule(name).weight.device.type == "cpu" for name, _ in chosen)
    fits = _fit_concurrently(model, chosen, costs, work, nested, workers, progress, btd_options) if workers > 1 and on_cpu else {}
    for i, (name, sizes) in enumerate(chosen):
        conv = model.get_submodule(name)
        start = time.perf_counter()
        layer = GroSSConv2d.from_conv(
            conv, group_sizes=sizes, nested=nested, progress=functools.partial(report, name, i, sizes, done),
            fits=fits.get(name), **btd_options,
        )  # fmt: skip
        done += costs[i] * len(sizes)
        layer.train(conv.training)
        _replace(model, name, layer)
        if name not in fits:
            log.info("decompose: %s %s in %.2fs", name, sizes, time.perf_counter() - start)
    return model


def _fit_job(weight: torch.Tensor, sizes: Sequence[int], width: int, nested: bool, threads: int, options: dict) -> list:
    """One worker's job: the fits of one layer at ``sizes`` (module level, so that it pickles)."""
    torch.set_num_threads(threads)
    return fit_series(weight, sizes, width, nested, **options)


def _fit_concurrently(
    model: nn.Module,
    chosen: Sequence[tuple[str, Sequence[int]]],
    costs: Sequence[float],
    work: float,
    nested: bool,
    workers: int,
    progress: Callable[[str, int, int, int, float, float], None] | None,
    options: dict,
) -> dict[str, list]:
    """Every layer's fits (smallest size first) made by ``workers`` processes: ``{name: [BTD, ...]}``."""
    width = options.get("width")
    options = {k: v for k, v in options.items() if k != "width"}
    jobs = []  # (estimated cost, layer index, sizes): one per layer when nested (a chain), else one per fit
    for i, (_, sizes) in enumerate(chosen):
        # A fit's steps cost about weight.numel() * D * (1 + g / 32) (the data products, then the core's operators).
        per_size = {s: costs[i] * (1 + s / 32) for s in sizes}
        jobs += [(sum(per_size.values()), i, tuple(sorted(sizes)))] if nested else [(per_size[s], i, (s,)) for s in sizes]
    jobs.sort(key=lambda job: -job[0])
    threads = max(1, torch.get_num_threads() // workers)
    results: dict[int, dict[int, object]] = {i: {} for i in range(len(chosen))}
    done = 0.0
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        futures = {}
        for _, i, sizes in jobs:
            name = chosen[i][0]
            conv = model.get_submodule(name)
            futures[pool.submit(_fit_job, conv.weight.detach(), sizes, width or conv.in_channels, nested, threads, options)] = (i, sizes)
        for future in concurrent.futures.as_completed(futures):
            i, sizes = futures[future]
            for s, fit in zip(sizes, future.result()):
                results[i][s] = fit
            done += costs[i] * len(sizes)
            if progress is not None:
                progress(chosen[i][0], i, len(chosen), sizes[-1], done, work)
    return {chosen[i][0]: [fits[s] for s in sorted(fits)] for i, fits in results.items()}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def get_config(model: nn.Module) -> tuple[int, ...]:
    """The active group size of every GroSS layer, in module order."""
    return tuple(m.group_size for _, m in _require_layers(model))


def set_config(model: nn.Module, config: Config) -> None:
    """Set the active group sizes: a tuple in module order, or a dict ``name -> size``.

    A dict may name a subset of the layers; the others keep their size. Nothing changes when
    any entry is invalid.
    """
    layers = _require_layers(model)
    if isinstance(config, Mapping):
        by_name = dict(layers)
        unknown = sorted(set(config) - set(by_name))
        if unknown:
            raise ValueError(f"config names layers that are not GroSS layers: {unknown}; "
                             f"GroSS layers: {list(by_name)}")
        pairs = [(name, by_name[name], int(s)) for name, s in config.items()]
    else:
        config = tuple(config)
        if len(config) != len(layers):
            raise ValueError(f"config has {len(config)} entries but the model has {len(layers)} GroSS layers")
        pairs = [(name, m, int(s)) for (name, m), s in zip(layers, config)]
    for name, m, s in pairs:
        if s not in m.group_sizes:
            raise ValueError(f"group size {s} is invalid for layer {name}; valid: {list(m.group_sizes)}")
    for _, m, s in pairs:
        m.group_size = s


def format_config(config: Sequence[int]) -> str:
    """``(2, 32, 64)`` -> ``"2-32-64"``: a configuration as printed, stored in CSV files and named in folders."""
    return "-".join(str(int(s)) for s in config)


def parse_config(text: str) -> tuple[int, ...] | dict[str, int]:
    """A configuration from text, as :func:`set_config` takes it.

    ``"2-32-64"`` or ``"2,32,64"`` -> ``(2, 32, 64)`` (one size per GroSS layer, in module order);
    ``"conv2=2,conv3=32"`` -> ``{"conv2": 2, "conv3": 32}`` (named layers).
    """
    try:
        if "=" in text:
            pairs = (part.split("=", 1) for part in text.split(",") if part.strip())
            return {name.strip(): int(size) for name, size in pairs}
        return tuple(int(part) for part in text.replace(",", "-").split("-") if part.strip())
    except ValueError:
        raise ValueError(f"not a configuration: {text!r} (expected group sizes like 2-32-64, 2,32,64 or conv2=2,conv3=32)") from None


def search_space(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    """The candidate group sizes of every GroSS layer, in module order."""
    return tuple(m.group_sizes for _, m in _require_layers(model))


def sample_config(
    model: nn.Module, alpha: float = 0.0, generator: torch.Generator | None = None, form: str = DEFAULT_FORM
) -> tuple[int, ...]:
    """Draw a configuration: each layer independently from the temperature distribution.

    ``form`` is that of :func:`gross.group_size_probs`.

    Returns the configuration without setting it (``set_config`` does that). Every process
    of a data-parallel job must pass a generator seeded alike to draw the same configuration.
    """
    return tuple(sizes[sample_index(len(sizes), alpha, generator, form)] for sizes in search_space(model))


def layer_specs(model: nn.Module) -> list[dict]:
    """JSON-ready description of every GroSS layer, enough to rebuild them without decomposing.

    Together with the base architecture and a state dict this restores a trained GroSS model
    (see :func:`restore_layers`).
    """
    specs = []
    for name, m in gross_layers(model):
        specs.append(
            {
                "name": name,
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size),
                "stride": list(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation),
                "bias": m.bias is not None,
                "padding_mode": m.padding_mode,
                "width": m.width,
                "group_sizes": list(m.group_sizes),
                "group_size": m.group_size,
            }
        )
    return specs


def restore_layers(model: nn.Module, specs: Sequence[Mapping]) -> nn.Module:
    """Replace the convs named in ``specs`` by empty GroSS layers of that shape, in place.

    The new layers hold zeros until a state dict is loaded. A spec that does not match the
    conv it replaces (another architecture) raises ValueError.
    """
    for spec in specs:
        name = spec["name"]
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"GroSS layer {name!r} does not exist in this architecture") from None
        if not isinstance(conv, nn.Conv2d) or (conv.in_channels, conv.out_channels) != (
            spec["in_channels"],
            spec["out_channels"],
        ):
            raise ValueError(f"GroSS layer {name!r} does not match the module it replaces ({conv})")
        param = conv.weight
        layer = GroSSConv2d(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            stride=tuple(spec["stride"]),
            padding=spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"]),
            dilation=tuple(spec["dilation"]),
            bias=spec["bias"],
            padding_mode=spec["padding_mode"],
            group_sizes=spec["group_sizes"],
            width=spec["width"],
            device=param.device,
            dtype=param.dtype,
        )
        layer.group_size = spec["group_size"]
        layer.train(conv.training)
        _replace(model, name, layer)
    return model


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics per configuration


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batchnorm_state(model: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """Copies of every BatchNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked``."""
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in _batchnorms(model)]


def load_batchnorm_state(model: nn.Module, state: Sequence[tuple[torch.Tensor, ...]]) -> None:
    """Put back the statistics :func:`batchnorm_state` took (of the same model)."""
    bns = _batchnorms(model)
    if len(bns) != len(state):
        raise ValueError(f"the state holds {len(state)} BatchNorm layers, the model has {len(bns)}")
    with torch.no_grad():
        for m, (mean, var, count) in zip(bns, state):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)


def recalibrate_batchnorm(model: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics at the active configuration.

    The statistics a GroSS network learnt while training are an average over the sampled
    configurations; each configuration's own are those of its activations. They are reset and
    replaced by the equally weighted average of the batch statistics over ``images`` (one pass,
    no gradients; every other module stays in eval mode, so dropout is off). Each BatchNorm's
    momentum and every module's mode are restored afterwards.

    Parameters
    ----------
    images : iterable of Tensor, each (B, C, H, W)
        Normalised input batches on the model's device, e.g. a few hundred training images.

    Returns
    -------
    int
        The number of BatchNorm layers recalibrated (0: nothing to do, the model is unchanged).
    """
    bns = _batchnorms(model)
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    seen = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
            m.train()
        with torch.no_grad():
            for x in images:
                model(x)
                seen += len(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    if seen == 0:
        raise ValueError("cannot recalibrate BatchNorm statistics on no images")
    return len(bns)
