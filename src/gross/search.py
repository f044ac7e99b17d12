"""Search the trained GroSS space: score configurations, cost them, and pick the best under a budget.

Three parts, kept apart so that each can be swapped (as in Once-for-All):

- **Scoring**: :class:`ConfigEvaluator` / :func:`evaluate_configs` measure validation accuracy of
  many configurations at once. The network is traced with ``torch.fx`` (GroSS layers kept as
  leaves) and cut into stages at the GroSS layers; configurations are visited depth-first as a
  prefix tree, so configurations that agree on their first layers share the computation up to
  the first layer where they differ. Results equal a plain ``set_config`` + forward per
  configuration bit for bit (same operations on the same inputs); a network that cannot be traced
  is evaluated that plain way, with a warning.
- **Costs and budgets**: any ``cost(config) -> float``; :class:`AdditiveCost` (MACs, parameters,
  latency tables: a constant plus one term per layer) also gives lower bounds, which lets the
  exhaustive search prune without enumerating the whole product. A layer may stay one dense conv
  (its bottleneck fused back: the same outputs, the original conv's cost) where that is cheaper
  than its bottleneck at the chosen size, so no configuration pays more than the original for a
  layer; the scores do not change, only the cost. :func:`resolve_budget` turns ``1.5e6`` or
  ``"uniform:16"`` into a cost limit.
- **Strategies** see only an :class:`Objective` (space, cost, limit, cached scorer):
  :func:`exhaustive`, :func:`beam` and :func:`evolution`.

:func:`search` ties them together for a model and a validation set, writes every evaluated
configuration to ``results.csv`` as it goes (an interrupted search resumes from it) and a summary
to ``best.json``, and splits evaluation across processes when ``torch.distributed`` is
initialised.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import ImageSet, batches
from .latency import DENSE, LatencyTable
from .macs import macs_table
from .model import (
    batchnorm_state,
    format_config,
    get_config,
    gross_layers,
    load_batchnorm_state,
    parse_config,
    recalibrate_batchnorm,
    search_space,
    set_config,
)
from .series import GroSSConv2d

__all__ = [
    "Configuration",
    "CostFn",
    "Score",
    "ConfigEvaluator",
    "evaluate_configs",
    "AdditiveCost",
    "FUSED_LATENCY",
    "macs_cost",
    "params_cost",
    "uniform_config",
    "resolve_budget",
    "Objective",
    "feasible_configs",
    "exhaustive",
    "beam",
    "evolution",
    "STRATEGIES",
    "Record",
    "SearchResult",
    "format_config",
    "parse_config",
    "search",
]

log = logging.getLogger("gross")

FUSED_LATENCY = "latency_ms_fused"  # the name of a latency cost with the dense conv as a per-layer choice
Configuration = tuple[int, ...]  # one group size per GroSS layer, in module order
CostFn = Callable[[Configuration], float]
Batches = Sequence[tuple[Tensor, Tensor]]
Data = ImageSet | Batches | Callable[[], Iterable[tuple[Tensor, Tensor]]]


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Score:
    accuracy: float  # fraction of correct top-1 predictions
    loss: float  # mean cross-entropy


class _NotTraceable(Exception):
    """The network cannot be evaluated as a tree; the message says why."""


class _InPlaceMutation(Exception):
    """A stage modified a value that sibling branches of the tree still need."""


class _GroSSLeafTracer(torch.fx.Tracer):
    # Keeping GroSS layers opaque makes every choice of group size one graph node to cut at.
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, GroSSConv2d) or super().is_leaf_module(m, module_qualified_name)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _StagePlan:
    """The traced network cut into stages at the first call of each GroSS layer.

    Stage 0 runs everything before the first GroSS layer; stage ``k`` starts at the ``k``-th
    GroSS layer in execution order and runs up to the next one; the last stage ends at the
    output. A stage needs the group sizes of the layers called so far and nothing else, so the
    values it hands on (those still used by later nodes) depend only on a prefix of the
    configuration in execution order.
    """

    def __init__(self, model: nn.Module) -> None:
        try:
            graph = _GroSSLeafTracer().trace(model)
        except Exception as e:  # tracing raises many types (TraceError, TypeError, ...)
            raise _NotTraceable(f"torch.fx could not trace the model: {e}") from e
        layers = gross_layers(model)
        index = {name: i for i, (name, _) in enumerate(layers)}
        self.nodes: list[torch.fx.Node] = list(graph.nodes)
        self.order: list[int] = []  # module-order index of each stage's GroSS layer
        starts: list[int] = []
        for i, node in enumerate(self.nodes):
            if node.op == "call_module" and node.target in index and index[node.target] not in self.order:
                self.order.append(index[node.target])
                starts.append(i)
        if len(self.order) != len(layers):
            missing = [name for name, i in index.items() if i not in self.order]
            raise _NotTraceable(f"GroSS layers {missing} are not called in the traced graph")
        self.modules = [layers[i][1] for i in self.order]
        bounds = [0, *starts, len(self.nodes)]
        self.stages = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        position = {node: i for i, node in enumerate(self.nodes)}
        # Drop each value right after its last use, so a stage hands on only live values and
        # the tree holds no more than one set of them per depth.
        self.release: list[list[torch.fx.Node]] = [[] for _ in self.nodes]
        for node in self.nodes:
            if node.op == "output":
                continue
            last = max((position[u] for u in node.users), default=position[node])
            self.release[last].append(node)
        placeholders = [i for i, node in enumerate(self.nodes) if node.op == "placeholder"]
        if any(not self.nodes[i].args for i in placeholders[1:]):
            raise _NotTraceable("the model's forward takes more than one required input")
        self.input = placeholders[0] if placeholders else -1
        self.calls = [self._callable(model, node) for node in self.nodes]

    def _callable(self, model: nn.Module, node: torch.fx.Node) -> Callable[..., Any]:
        if node.op == "call_module":
            return model.get_submodule(node.target)
        if node.op == "call_function":
            return node.target
        if node.op == "call_method":
            name = node.target
            return lambda obj, *args, **kwargs: getattr(obj, name)(*args, **kwargs)
        if node.op == "get_attr":
            value = model
            for part in node.target.split("."):
                value = getattr(value, part)
            return lambda: value
        if node.op == "placeholder":
            default = node.args[0] if node.args else None  # an optional argument of forward
            return lambda: default
        if node.op == "output":
            return lambda value: value
        raise _NotTraceable(f"unsupported graph node {node.op!r}")

    def key(self, config: Configuration) -> Configuration:
        """``config`` reordered into execution order: the prefix-tree path."""
        return tuple(config[i] for i in self.order)

    def run(self, stage: int, parent: Mapping[torch.fx.Node, Any], x: Tensor) -> Any:
        """Run one stage on the values handed on by its parent; the output at the last stage."""
        env = dict(parent)
        inherited = [(t, t._version) for t in _tensors(list(parent.values()))]
        for i in self.stages[stage]:
            node = self.nodes[i]
            if i == self.input:
                value = x
            else:
                args = torch.fx.node.map_arg(node.args, env.__getitem__)
                kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                value = self.calls[i](*args, **kwargs)
                if node.op == "output":
                    self._check(inherited)
                    return value
            env[node] = value
            for dead in self.release[i]:
                del env[dead]
        self._check(inherited)
        return env

    @staticmethod
    def _check(inherited: list[tuple[Tensor, int]]) -> None:
        # Siblings reuse the parent's values; an in-place op on one of them would leak one
        # branch's result into the next, so it is caught here (before any sibling runs).
        for t, version in inherited:
            if t._version != version:
                raise _InPlaceMutation("a stage modified an earlier stage's value in place")


def _bytes_held(envs: Sequence[Mapping[torch.fx.Node, Any]]) -> int:
    seen: set[int] = set()
    total = 0
    for env in envs:
        for t in _tensors(list(env.values())):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _world(distributed: bool | None) -> tuple[int, int]:
    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batch_source(data: Data, batch_size: int, device: torch.device) -> Callable[[], Iterable[tuple[Tensor, Tensor]]]:
    """Any accepted data as a callable that yields one pass of ``(images, labels)`` batches."""
    if isinstance(data, ImageSet):
        if len(data) == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        if not data.in_memory:  # streamed: decoded again on every pass
            return lambda: batches(data, batch_size, device=device)
        # Normalised once: a search scores the same images many times.
        prepared = list(batches(data, batch_size, device=device))
        return lambda: prepared
    if callable(data):
        return data
    if isinstance(data, Sequence):
        return lambda: data
    raise TypeError(
        f"data must be a gross.data.ImageSet (Dataset or ImageFiles), a sequence of (images, labels) batches or a callable "
        f"returning an iterable of them, got {type(data).__name__}"
    )


def _accumulate(sums: dict, key: Configuration, logits: Any, y: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model must return a logits tensor, got {type(logits).__name__}")
    # Kept on the device as tensors, so that a GPU never waits for a host read per batch.
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    correct = (logits.argmax(1) == y).sum()
    old = sums.get(key)
    sums[key] = (loss, correct) if old is None else (old[0] + loss, old[1] + correct)


class ConfigEvaluator:
    """Scores many configurations of one GroSS model on the same data, sharing common prefixes.

    Parameters
    ----------
    model : nn.Module
        A model with GroSS layers. Evaluated in eval mode under ``torch.no_grad``; its mode and
        active configuration are restored after every call.
    method : {"auto", "tree", "plain"}
        ``"tree"``: prefix-tree evaluation (raises if the model cannot be traced); ``"plain"``:
        ``set_config`` and a full forward pass per configuration; ``"auto"``: the tree, or plain
        with a logged warning when tracing fails or a stage modifies an earlier value in place.
    max_cache_bytes : int, optional
        Bound on the activations the tree holds for sharing (one set of live values per depth of
        the tree). Batches whose held values would exceed it are cut into smaller sub-batches;
        on some backends that changes results in the last bits. Default: no bound (memory is
        about the number of GroSS layers times one batch's activations).
    distributed : bool, optional
        Split configurations across the processes of the default ``torch.distributed`` group and
        gather the scores; default: when it is initialised. Every process must call with the
        same configurations and data.
    calibration : sequence of Tensor, optional
        Image batches (B, C, H, W) on which every configuration's BatchNorm statistics are
        recalibrated (:func:`gross.recalibrate_batchnorm`) before it is scored; the model's own
        statistics are put back afterwards. The tree still shares prefixes: statistics after a
        GroSS layer depend only on the sizes up to it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str = "auto",
        max_cache_bytes: int | None = None,
        distributed: bool | None = None,
        calibration: Sequence[Tensor] | None = None,
    ) -> None:
        if method not in ("auto", "tree", "plain"):
            raise ValueError(f"method must be 'auto', 'tree' or 'plain', got {method!r}")
        if max_cache_bytes is not None and max_cache_bytes <= 0:
            raise ValueError(f"max_cache_bytes must be positive, got {max_cache_bytes}")
        self.model = model
        self.space = search_space(model)
        self._requested = method
        self.method = method
        self.max_cache_bytes = max_cache_bytes
        self.distributed = distributed
        self.calibration = list(calibration) if calibration is not None else None
        if self.calibration is not None and not self.calibration:
            raise ValueError("calibration needs at least one batch of images")
        self._bn: dict[Configuration, list] = {}
        self._plan: _StagePlan | None = None
        self._rows_per_batch: int | None = None
        if method != "plain":
            try:
                self._plan = _StagePlan(model)
            except _NotTraceable as e:
                if method == "tree":
                    raise ValueError(f"tree evaluation is impossible: {e}") from e
                log.warning("search: %s; evaluating every configuration separately", e)
                self.method = "plain"
            else:
                self.method = "tree"

    def order(self, configs: Iterable[Configuration]) -> list[Configuration]:
        """``configs`` (deduplicated) in prefix-tree order: neighbours share the longest prefixes."""
        unique = list(dict.fromkeys(configs))
        if self._plan is None:
            return unique
        return sorted(unique, key=self._plan.key)

    def __call__(
        self,
        configs: Sequence[Configuration],
        data: Callable[[], Iterable[tuple[Tensor, Tensor]]] | Batches,
        *,
        progress: bool = False,
    ) -> list[Score]:
        """Scores of ``configs`` (tuples in module order), in their order.

        ``data`` is one pass of ``(images, labels)`` batches (a sequence, or a callable returning
        an iterable); it is iterated once per call, every configuration scored on every batch.
        """
        configs = [self._validate(c) for c in configs]
        source = data if callable(data) else (lambda: data)
        rank, world = _world(self.distributed)
        ordered = self.order(configs)
        if world == 1:
            scores = self._evaluate(ordered, source, progress)
        else:
            # Contiguous slices of the tree order keep most of the sharing on every process.
            n = len(ordered)
            mine = ordered[rank * n // world : (rank + 1) * n // world]
            gathered: list[list[Score] | None] = [None] * world
            dist.all_gather_object(gathered, self._evaluate(mine, source, progress and rank == 0))
            scores = list(itertools.chain.from_iterable(gathered))
        by_config = dict(zip(ordered, scores))
        return [by_config[c] for c in configs]

    def _validate(self, config: Sequence[int]) -> Configuration:
        config = tuple(int(s) for s in config)
        if len(config) != len(self.space):
            raise ValueError(f"config {config} has {len(config)} entries, the model has {len(self.space)} GroSS layers")
        for i, (s, sizes) in enumerate(zip(config, self.space)):
            if s not in sizes:
                raise ValueError(
                    f"config {config}: group size {s} is invalid for GroSS layer {i}; valid: {list(sizes)}"
                )
        return config

    def _evaluate(self, configs: list[Configuration], source: Callable, progress: bool) -> list[Score]:
        if not configs:
            return []
        model = self.model
        active, was_training = get_config(model), model.training
        saved_bn = batchnorm_state(model) if self.calibration is not None else None
        model.eval()
        try:
            with torch.no_grad():
                self._calibrate(configs)
                if self.method == "tree":
                    try:
                        return self._run(configs, source, progress, tree=True)
                    except _InPlaceMutation as e:
                        if self._requested == "tree":
                            raise ValueError(f"tree evaluation is impossible: {e}") from e
                        log.warning("search: %s; evaluating every configuration separately", e)
                        self.method, self._plan = "plain", None
                return self._run(configs, source, progress, tree=False)
        finally:
            set_config(model, active)
            if saved_bn is not None:
                load_batchnorm_state(model, saved_bn)
                self._bn.clear()
            model.train(was_training)

    def _calibrate(self, configs: list[Configuration]) -> None:
        if self.calibration is None:
            return
        device = _model_device(self.model)
        images = [x.to(device) for x in self.calibration]
        for c in configs:
            set_config(self.model, c)
            if not recalibrate_batchnorm(self.model, images):
                self.calibration = None  # no BatchNorm: nothing differs per configuration
                return
            self._bn[c] = batchnorm_state(self.model)

    def _use(self, config: Configuration) -> None:
        if self._bn:
            load_batchnorm_state(self.model, self._bn[config])

    def _run(self, configs: list[Configuration], source: Callable, progress: bool, tree: bool) -> list[Score]:
        device = _model_device(self.model)
        sums: dict[Configuration, tuple[Tensor, Tensor]] = {}
        count = 0
        for x, y in tqdm(source(), desc="batches", unit="batch", disable=not progress, leave=False):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for xs, ys in self._split(x, y, configs, tree):
                count += len(ys)
                if tree:
                    self._tree_batch(xs, ys, configs, sums)
                else:
                    for c in configs:
                        set_config(self.model, c)
                        self._use(c)
                        _accumulate(sums, c, self.model(xs), ys)
        if count == 0:
            raise ValueError("cannot evaluate on empty data")
        return [Score(accuracy=float(sums[c][1]) / count, loss=float(sums[c][0]) / count) for c in configs]

    def _split(self, x: Tensor, y: Tensor, configs: list[Configuration], tree: bool) -> Iterator[tuple[Tensor, Tensor]]:
        if not tree or self.max_cache_bytes is None:
            yield x, y
            return
        if self._rows_per_batch is None:
            # Every configuration's path holds tensors of the same shapes (a group size changes a
            # layer's weights, not its output), so one image along one path measures them all.
            self._rows_per_batch = max(1, self.max_cache_bytes // max(1, self._path_bytes(x[:1], configs[0])))
        for start in range(0, len(y), self._rows_per_batch):
            yield x[start : start + self._rows_per_batch], y[start : start + self._rows_per_batch]

    def _path_bytes(self, x: Tensor, config: Configuration) -> int:
        plan = self._plan
        envs = [plan.run(0, {}, x)]
        for depth, s in enumerate(plan.key(config)[:-1]):
            plan.modules[depth].group_size = s
            envs.append(plan.run(depth + 1, envs[-1], x))
        return _bytes_held(envs)

    def _tree_batch(self, x: Tensor, y: Tensor, configs: list[Configuration], sums: dict) -> None:
        plan = self._plan
        paths = [(plan.key(c), c) for c in configs]  # already in tree order
        depth_last = len(plan.modules) - 1

        def descend(depth: int, env: Mapping, lo: int, hi: int) -> None:
            i = lo
            while i < hi:
                size = paths[i][0][depth]
                j = i + 1
                while j < hi and paths[j][0][depth] == size:
                    j += 1
                plan.modules[depth].group_size = size
                self._use(paths[i][1])
                out = plan.run(depth + 1, env, x)
                if depth == depth_last:
                    _accumulate(sums, paths[i][1], out, y)
                else:
                    descend(depth + 1, out, i, j)
                i = j

        self._use(paths[0][1])
        descend(0, plan.run(0, {}, x), 0, len(paths))


def evaluate_configs(
    model: nn.Module,
    configs: Sequence[Sequence[int]],
    data: Data,
    *,
    batch_size: int = 1000,
    method: str = "auto",
    max_cache_bytes: int | None = None,
    distributed: bool | None = None,
    calibration: Sequence[Tensor] | None = None,
    progress: bool = False,
) -> list[Score]:
    """Validation accuracy and loss of many configurations, sharing work across common prefixes.

    Parameters
    ----------
    model : nn.Module
        A model with GroSS layers.
    configs : sequence of tuples
        Group sizes in module order (as :func:`gross.get_config` returns them).
    data : ImageSet, sequence of (images, labels), or callable
        A dataset (normalised once and cut into batches of ``batch_size`` on the model's
        device), ready batches, or a callable that returns one pass of batches.
    batch_size : int
        For a dataset only.
    method, max_cache_bytes, distributed, calibration
        See :class:`ConfigEvaluator`.
    progress : bool
        Show a progress bar over the batches.

    Returns
    -------
    list of Score
        One per configuration, in the given order; equal to setting each configuration and
        running the model on every batch.
    """
    evaluator = ConfigEvaluator(model, method=method, max_cache_bytes=max_cache_bytes, distributed=distributed, calibration=calibration)
    return evaluator(configs, _batch_source(data, batch_size, _model_device(model)), progress=progress)


# ---------------------------------------------------------------------------------------------
# Costs and budgets


@dataclass(frozen=True)
class AdditiveCost:
    """A cost that is a constant plus one term per GroSS layer: MACs, parameters, latency tables.

    Being additive, the cheapest completion of any partial configuration is known exactly, which
    lets :func:`feasible_configs` skip every subtree that cannot fit a budget.

    A layer may also have a *dense* term: its cost as one dense conv, the bottleneck fused back
    (:meth:`GroSSConv2d.dense_conv`; same outputs, the original conv's shape). Then the layer
    costs the cheaper of its bottleneck at the chosen size and that dense conv, and
    :meth:`dense_layers` says where the dense conv is the cheaper one: that is where
    ``gross.export(model, config, fuse=...)`` must fuse to build the network this cost counts.
    The accuracy of a configuration does not change with fusing, so a search scores the group
    sizes as they are and ranks by this cost alone.

    Attributes
    ----------
    base : float
        Cost of everything that is not a GroSS layer.
    terms : tuple of dict
        Per GroSS layer, in module order: group size -> cost of its bottleneck.
    name : str
        What it measures (``"macs"``, ``"params"``, ``"latency_ms"``, ...), for reports.
    dense : tuple of float, optional
        Per GroSS layer: cost as one dense conv. ``None``: no dense choice, every layer is its
        bottleneck.
    """

    base: float
    terms: tuple[Mapping[int, float], ...]
    name: str = "cost"
    dense: tuple[float, ...] | None = None

    def term(self, layer: int, size: int) -> float:
        """Cost of GroSS layer ``layer`` at group size ``size``: the cheaper of bottleneck and dense conv."""
        terms = self.terms[layer]
        if size not in terms:
            raise ValueError(f"group size {size} of layer {layer} has no {self.name} term; known: {list(terms)}")
        return terms[size] if self.dense is None else min(terms[size], self.dense[layer])

    def __call__(self, config: Sequence[int]) -> float:
        if len(config) != len(self.terms):
            raise ValueError(f"config has {len(config)} entries, the cost has {len(self.terms)} layers")
        total = self.base
        for i, s in enumerate(config):
            total += self.term(i, s)
        return total

    def dense_layers(self, config: Sequence[int]) -> tuple[int, ...]:
        """Indices of the layers whose dense conv is cheaper than their bottleneck at ``config``.

        On a tie the bottleneck is kept (as :meth:`gross.latency.LatencyTable.fused_faster`).
        """
        if self.dense is None:
            return ()
        return tuple(i for i, s in enumerate(config) if self.dense[i] < self.terms[i][s])

    def of(self, config: Sequence[int], dense: Collection[int] = ()) -> float:
        """Cost of ``config`` with exactly the layers ``dense`` (indices) as their dense conv.

        ``of(config)`` is the cost with every layer as its bottleneck (how ``uniform:G`` budgets
        are defined); ``of(config, c.dense_layers(config))`` of another cost ``c`` costs the
        network that ``c`` chose, e.g. its MACs after a search by latency.
        """
        if len(config) != len(self.terms):
            raise ValueError(f"config has {len(config)} entries, the cost has {len(self.terms)} layers")
        if dense and self.dense is None:
            raise ValueError(f"the {self.name} cost has no dense terms")
        total = self.base
        for i, (terms, s) in enumerate(zip(self.terms, config)):
            if s not in terms:
                raise ValueError(f"group size {s} of layer {i} has no {self.name} term; known: {list(terms)}")
            total += self.dense[i] if i in dense else terms[s]
        return total

    @classmethod
    def from_latency_table(cls, table: LatencyTable, fuse: bool = False) -> AdditiveCost:
        """Predicted latency (ms) of the exported network, from :func:`gross.latency.latency_table`.

        With ``fuse`` the dense conv is a per-layer choice: a layer costs the faster of its
        bottleneck and the one dense conv with the same outputs, which is what
        ``gross.export(..., fuse="auto")`` builds (the table needs its dense column).
        """
        if not fuse:
            return cls(base=table.rest, terms=table.options, name="latency_ms")
        if not table.has_dense:
            raise ValueError("fuse=True needs the table's dense timings; build it with include_dense=True")
        terms = tuple({k: ms for k, ms in options.items() if k != DENSE} for options in table.options)
        return cls(base=table.rest, terms=terms, name=FUSED_LATENCY, dense=tuple(o[DENSE] for o in table.options))


def macs_cost(model: nn.Module, input_shape: Sequence[int], dense: bool = True) -> AdditiveCost:
    """MACs of one input of shape ``(C, H, W)`` (or of a batch ``(N, C, H, W)``) per configuration.

    With ``dense`` (the default) each layer may stay one dense conv with the original conv's MACs
    where that is cheaper than its bottleneck (see :class:`AdditiveCost`), so no configuration
    pays more than the original network for a layer.
    """
    table = macs_table(model, input_shape)
    return AdditiveCost(base=sum(table.fixed.values()), terms=table.options, name="macs", dense=table.dense if dense else None)


def params_cost(model: nn.Module, dense: bool = True) -> AdditiveCost:
    """Parameters of the network exported at a configuration (:func:`gross.export`).

    A GroSS layer at group size ``s`` exports to pointwise ``(D, C_in)``, grouped ``(D, s, kh, kw)``
    and pointwise ``(C_out, D)`` weights plus its bias, or, as its dense conv (with ``dense``),
    to one ``(C_out, C_in, kh, kw)`` weight plus its bias; everything else is counted as it is.
    """
    layers = gross_layers(model)
    if not layers:
        raise ValueError("the model has no GroSS layers; call gross.decompose(model) first")
    in_layers = {id(p) for _, m in layers for p in m.parameters()}
    base = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    terms = []
    for _, m in layers:
        kh, kw = m.kernel_size
        base += m.bias.numel() if m.bias is not None else 0
        pointwise = m.width * (m.in_channels + m.out_channels)
        terms.append({s: pointwise + m.width * s * kh * kw for s in m.group_sizes})
    full = tuple(m.out_channels * m.in_channels * math.prod(m.kernel_size) for _, m in layers)
    return AdditiveCost(base=base, terms=tuple(terms), name="params", dense=full if dense else None)


def uniform_config(space: Sequence[Sequence[int]], group_size: int) -> Configuration:
    """Every layer at ``group_size``, or at its largest size below it where that is not valid.

    A layer whose sizes all exceed ``group_size`` takes its smallest. So ``uniform:16`` on a layer
    with sizes (1, 2, 4, 8) is 8: the paper's uniform networks put each layer at the size asked
    for, or as close below it as the layer allows.
    """
    return tuple(max((s for s in sizes if s <= group_size), default=min(sizes)) for sizes in space)


def _min_cost(space: Sequence[Sequence[int]], cost: CostFn) -> tuple[float, Configuration]:
    if isinstance(cost, AdditiveCost):
        cheapest = tuple(min(sizes, key=lambda s: cost.term(i, s)) for i, sizes in enumerate(space))
    else:
        # Without structure, the all-smallest configuration stands in for the cheapest: it is,
        # for any cost that grows with the group size.
        cheapest = tuple(min(sizes) for sizes in space)
    return cost(cheapest), cheapest


def resolve_budget(budget: int | float | str | None, space: Sequence[Sequence[int]], cost: CostFn) -> float:
    """The cost limit a budget stands for.

    Parameters
    ----------
    budget : int, float, str or None
        A number (or numeric string such as ``"1.5e6"``): the largest allowed cost, in the cost's
        units (MACs by default). ``"uniform:G"``: the cost of the configuration with every layer at
        group size ``G`` (see :func:`uniform_config` for layers where ``G`` is not valid), every
        layer as its bottleneck (the paper's uniform networks; :meth:`AdditiveCost.of`), also
        where the cost offers the dense conv. ``"P%"``: P percent of the original network's
        cost (every GroSS layer as its dense conv; needs an :class:`AdditiveCost` with ``dense``).
        ``None``: no limit.
    space : sequence of sequences of int
        The candidate sizes of every layer.
    cost : callable
        ``cost(config) -> float``.

    Raises
    ------
    ValueError
        For an unknown budget string, or a limit below the cheapest configuration.
    """
    _check_space(space)
    if budget is None:
        return math.inf
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text.startswith("uniform:"):
            try:
                size = int(text.split(":", 1)[1])
            except ValueError:
                size = 0
            if size < 1:
                raise ValueError(f"budget {budget!r}: 'uniform:G' needs a positive integer group size G")
            uniform = uniform_config(space, size)
            limit = float(cost.of(uniform) if isinstance(cost, AdditiveCost) else cost(uniform))
        elif text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = -1.0
            if not percent > 0:
                raise ValueError(f"budget {budget!r}: 'P%' needs a positive percentage of the original network's cost")
            if not isinstance(cost, AdditiveCost) or cost.dense is None:
                raise ValueError(f"budget {budget!r}: a percentage needs the original network's cost, which this cost does not know "
                                 "(MACs and parameters do, and latency tables with dense timings)")
            limit = percent / 100 * (cost.base + sum(cost.dense))
        else:
            try:
                limit = float(text)
            except ValueError:
                raise ValueError(
                    f"unknown budget {budget!r}: use a number (the largest cost allowed, e.g. MACs), "
                    f"'uniform:G' (the cost of every layer at group size G) or 'P%' (of the original network's cost)"
                ) from None
    elif isinstance(budget, (int, float)) and not isinstance(budget, bool):
        limit = float(budget)
    else:
        raise TypeError(f"budget must be a number, a string or None, got {type(budget).__name__}")
    if math.isnan(limit):
        raise ValueError("the budget is NaN")
    cheapest, config = _min_cost(space, cost)
    if limit < cheapest:
        raise ValueError(
            f"budget {budget!r} (limit {limit:g}) is below the cheapest configuration "
            f"{format_config(config)} (cost {cheapest:g}): no configuration fits"
        )
    return limit


def _check_space(space: Sequence[Sequence[int]]) -> None:
    if len(space) == 0:
        raise ValueError("the search space is empty: there are no GroSS layers to choose sizes for")
    for i, sizes in enumerate(space):
        if len(sizes) == 0:
            raise ValueError(f"the search space is empty: layer {i} has no group sizes")


# ---------------------------------------------------------------------------------------------
# Strategies


class Objective:
    """What a strategy sees: the space, the cost and its limit, and a cached scorer.

    Strategies submit whole sets of configurations at once, so that a tree scorer can share
    their prefixes. Every distinct configuration is scored once; ``known`` scores (a resumed
    search) are returned without scoring but still count as evaluations, so that a resumed
    strategy takes exactly the path of an uninterrupted one.

    Parameters
    ----------
    space : sequence of sequences of int
        Candidate group sizes of every layer, in module order.
    score : callable
        ``score(configs) -> scores`` (higher is better), one per configuration, in order.
    cost : callable
        ``cost(config) -> float``.
    limit : float
        Largest allowed cost (see :func:`resolve_budget`).
    known : dict, optional
        Scores already measured, by configuration.
    """

    def __init__(
        self,
        space: Sequence[Sequence[int]],
        score: Callable[[list[Configuration]], Sequence[float]],
        cost: CostFn,
        limit: float,
        *,
        known: Mapping[Configuration, float] | None = None,
    ) -> None:
        _check_space(space)
        self.space = tuple(tuple(sorted(set(int(s) for s in sizes))) for sizes in space)
        self.cost = cost
        self.limit = limit
        self._score = score
        self._known = dict(known or {})
        self.scores: dict[Configuration, float] = {}  # every configuration asked for, in order

    @property
    def evaluations(self) -> int:
        """Distinct configurations asked for so far."""
        return len(self.scores)

    @property
    def size(self) -> int:
        """Number of configurations in the space, within the budget or not."""
        return math.prod(len(sizes) for sizes in self.space)

    def fits(self, config: Configuration) -> bool:
        return self.cost(config) <= self.limit

    def __call__(self, configs: Iterable[Sequence[int]]) -> list[float]:
        """Scores of ``configs``; every one must be in the space and within the budget."""
        configs = [tuple(int(s) for s in c) for c in configs]
        for c in configs:
            if len(c) != len(self.space) or any(s not in sizes for s, sizes in zip(c, self.space)):
                raise ValueError(f"configuration {c} is not in the search space {self.space}")
            if not self.fits(c):
                raise ValueError(f"configuration {c} costs {self.cost(c):g}, above the limit {self.limit:g}")
        new = [c for c in dict.fromkeys(configs) if c not in self.scores]
        unknown = [c for c in new if c not in self._known]
        if unknown:
            scores = list(self._score(unknown))
            if len(scores) != len(unknown):
                raise ValueError(f"the scorer returned {len(scores)} scores for {len(unknown)} configurations")
            self._known.update(zip(unknown, (float(s) for s in scores)))
        for c in new:
            self.scores[c] = self._known[c]
        return [self.scores[c] for c in configs]

    def best(self) -> tuple[Configuration, float]:
        """The highest-scoring configuration asked for; ties go to the cheaper, then the earlier."""
        if not self.scores:
            raise ValueError("no configuration within the budget was evaluated")
        config = max(self.scores, key=lambda c: (self.scores[c], -self.cost(c)))
        return config, self.scores[config]


def feasible_configs(space: Sequence[Sequence[int]], cost: CostFn, limit: float) -> Iterator[Configuration]:
    """Every configuration of ``space`` whose cost is within ``limit``, in lexicographic order.

    With an :class:`AdditiveCost` this is a depth-first search that leaves out every prefix whose
    cheapest completion is already over the limit, so the work follows the number of feasible
    configurations, not the size of the product; any other cost is checked on the whole product.
    """
    _check_space(space)
    space = [sorted(sizes) for sizes in space]
    if not isinstance(cost, AdditiveCost):
        yield from (c for c in itertools.product(*space) if cost(c) <= limit)
        return
    n = len(space)
    rest = [0.0] * (n + 1)  # cheapest cost of layers i.. onwards
    for i in reversed(range(n)):
        rest[i] = rest[i + 1] + min(cost.term(i, s) for s in space[i])
    # Rounding differs between the bound and the exact sum; the slack keeps pruning safe, and
    # every complete configuration is still checked with the exact cost.
    slack = 1e-9 * max(1.0, abs(limit))

    def descend(prefix: Configuration, spent: float) -> Iterator[Configuration]:
        i = len(prefix)
        if i == n:
            if cost(prefix) <= limit:
                yield prefix
            return
        for s in space[i]:
            total = spent + cost.term(i, s)
            if total + rest[i + 1] <= limit + slack:
                yield from descend(prefix + (s,), total)

    yield from descend((), float(cost.base))


def exhaustive(objective: Objective, *, max_configs: int = 100_000) -> tuple[Configuration, float]:
    """Score every configuration within the budget (the paper's search).

    Parameters
    ----------
    objective : Objective
    max_configs : int
        Refuse (ValueError) when more configurations than this fit the budget: use :func:`beam`
        or :func:`evolution` for spaces that large.

    Returns
    -------
    (configuration, score)
        The best.
    """
    feasible = feasible_configs(objective.space, objective.cost, objective.limit)
    configs = list(itertools.islice(feasible, max_configs + 1))
    if len(configs) > max_configs:
        raise ValueError(
            f"more than {max_configs} configurations fit the budget; raise max_configs or use beam or evolution"
        )
    if not configs:
        raise ValueError(f"no configuration fits the limit {objective.limit:g}")
    objective(configs)
    return objective.best()


def _complete(objective: Objective, prefix: Configuration) -> Configuration | None:
    """``prefix`` with the remaining layers filled as large and uniform as the budget allows.

    Tries every size ``v`` of the remaining layers, largest first, as :func:`uniform_config`
    (each layer at its largest size not above ``v``); ``None`` when not even the smallest fits.
    A completion that uses the budget left over scores a prefix by what it leaves room for.
    """
    rest = objective.space[len(prefix) :]
    if not rest:
        return prefix if objective.fits(prefix) else None
    for v in sorted({s for sizes in rest for s in sizes}, reverse=True):
        config = prefix + uniform_config(rest, v)
        if objective.fits(config):
            return config
    return None


def beam(objective: Objective, *, width: int = 4) -> tuple[Configuration, float]:
    """Breadth-first beam search over the layers, in module order.

    At layer ``i`` every configuration kept so far is extended with every size of layer ``i``;
    each extension is completed (:func:`_complete`: the later layers as large as the budget
    allows) and scored, and the ``width`` best extensions are kept. The last layer's extensions
    are complete configurations. Scores at most ``|S_1| + width * (|S_2| + ... + |S_L|)``
    configurations.

    Returns
    -------
    (configuration, score)
        The best configuration scored along the way.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    kept: list[Configuration] = [()]
    for _i, sizes in enumerate(objective.space):
        completed: dict[Configuration, Configuration] = {}
        for prefix in kept:
            for s in sizes:
                config = _complete(objective, prefix + (s,))
                if config is not None:
                    completed[prefix + (s,)] = config
        if not completed:
            raise ValueError(f"no configuration fits the limit {objective.limit:g}")
        scores = objective(list(completed.values()))
        # A stable sort: among equal scores the earlier (smaller) sizes stay, for determinism.
        ranked = sorted(zip(completed, scores), key=lambda item: -item[1])
        kept = [prefix for prefix, _ in ranked[:width]]
    return objective.best()


def _sample(objective: Objective, rng: random.Random, tries: int) -> Configuration:
    """A random configuration within the budget: rejection sampling, then shrinking.

    When ``tries`` uniform draws all miss a tight budget, the last draw is shrunk one layer at a
    time (a random layer not yet at its smallest size steps down) until it fits.
    """
    config: Configuration = ()
    for _ in range(tries):
        config = tuple(rng.choice(sizes) for sizes in objective.space)
        if objective.fits(config):
            return config
    current = list(config)
    while not objective.fits(tuple(current)):
        larger = [i for i, sizes in enumerate(objective.space) if current[i] != sizes[0]]
        if not larger:
            raise ValueError(f"could not sample a configuration within the limit {objective.limit:g}")
        i = rng.choice(larger)
        sizes = objective.space[i]
        current[i] = sizes[sizes.index(current[i]) - 1]
    return tuple(current)


def evolution(
    objective: Objective,
    *,
    population: int = 16,
    parent_ratio: float = 0.25,
    mutation_ratio: float = 0.5,
    mutate_prob: float = 0.3,
    max_evaluations: int = 100,
    seed: int = 0,
    tries: int = 200,
) -> tuple[Configuration, float]:
    """Evolutionary search under the budget (as in Once-for-All), seeded and deterministic.

    A population of random configurations within the budget is scored; each generation keeps the
    best ``parent_ratio`` of it and fills the rest with children never scored before: a fraction
    ``mutation_ratio`` mutated from a random parent (every layer resampled with probability
    ``mutate_prob``, at least one changed), the others uniform crossovers of two random parents.
    Children over the budget are discarded and drawn again.

    Parameters
    ----------
    objective : Objective
    population : int
    parent_ratio, mutation_ratio, mutate_prob : float
    max_evaluations : int
        Stop once this many distinct configurations were scored.
    seed : int
    tries : int
        Draws in a row that bring no new configuration within the budget before giving up.

    Returns
    -------
    (configuration, score)
        The best configuration scored.
    """
    if population < 2 or max_evaluations < 1:
        raise ValueError(f"need population >= 2 and max_evaluations >= 1, got {population} and {max_evaluations}")
    if not (0 < parent_ratio < 1 and 0 <= mutation_ratio <= 1 and 0 < mutate_prob <= 1):
        raise ValueError("need 0 < parent_ratio < 1, 0 <= mutation_ratio <= 1 and 0 < mutate_prob <= 1")
    rng = random.Random(seed)
    space = objective.space
    start = objective.evaluations

    def room() -> int:
        return max_evaluations - (objective.evaluations - start)

    def draw_new(count: int, draw: Callable[[], Configuration]) -> list[Configuration]:
        # Gives up after `tries` draws in a row that bring nothing new: near a tight budget the
        # unscored configurations run out.
        found: list[Configuration] = []
        misses = 0
        while len(found) < count and misses < tries:
            config = draw()
            if config in objective.scores or config in found or not objective.fits(config):
                misses += 1
            else:
                found.append(config)
                misses = 0
        return found

    members = draw_new(min(population, room()), lambda: _sample(objective, rng, tries))
    scores = dict(zip(members, objective(members)))
    n_parents = max(1, round(population * parent_ratio))

    def mutate(parent: Configuration) -> Configuration:
        child = list(parent)
        changed = [i for i in range(len(space)) if rng.random() < mutate_prob] or [rng.randrange(len(space))]
        for i in changed:
            child[i] = rng.choice([s for s in space[i] if s != parent[i]] or [parent[i]])
        return tuple(child)

    def child_of(parents: list[Configuration]) -> Configuration:
        if rng.random() < mutation_ratio:
            return mutate(rng.choice(parents))
        a, b = rng.choice(parents), rng.choice(parents)
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

    while room() > 0:
        parents = sorted(scores, key=lambda c: -scores[c])[:n_parents]
        children = draw_new(min(population - len(parents), room()), functools.partial(child_of, parents))
        if not children:
            break  # every configuration within reach of the parents is scored
        scores = {c: scores[c] for c in parents}
        scores.update(zip(children, objective(children)))
    return objective.best()


STRATEGIES: dict[str, Callable[..., tuple[Configuration, float]]] = {
    "exhaustive": exhaustive,
    "beam": beam,
    "evolution": evolution,
}


# ---------------------------------------------------------------------------------------------
# Searching a model, with results on disk


@dataclass(frozen=True)
class Record:
    """One evaluated configuration. The test accuracy is only measured on request, never selected on."""

    config: Configuration
    cost: float
    macs: int
    params: int
    val_accuracy: float
    val_loss: float
    test_accuracy: float | None = None
    # GroSS layers that stay one dense conv (their bottleneck fused: same outputs, fewer of the
    # cost's units); cost, MACs and parameters count them so.
    dense: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "config": list(self.config), "dense": list(self.dense)}


_COLUMNS = ("config", "cost", "macs", "params", "val_accuracy", "val_loss", "test_accuracy", "dense")


@dataclass(frozen=True)
class SearchResult:
    """What a search found and everything it scored.

    Attributes
    ----------
    strategy : str
    limit : float
        The cost limit the budget resolved to.
    cost_name : str
        What the cost measures (``"macs"`` unless another cost was given).
    layers : tuple of str
        GroSS layer names: the order of every configuration.
    records : list of Record
        Every configuration the strategy asked for, in the order it first asked, then the extra
        ones.
    best : Record
        Highest validation accuracy within the limit among everything scored, including the
        scores taken from results.csv (ties: lower cost, then the smaller sizes).
    evaluated_now : int
        Configurations scored by this call; the others came from an earlier run's results.csv.
    space_size : int
        Configurations in the space, within the budget or not.
    seconds : float
    """

    strategy: str
    limit: float
    cost_name: str
    layers: tuple[str, ...]
    records: list[Record]
    best: Record
    evaluated_now: int
    space_size: int
    seconds: float

    @property
    def evaluations(self) -> int:
        """Distinct configurations scored, including those taken from results.csv."""
        return len(self.records)


def _write_json(path: Path, data: Mapping) -> None:
    # Written whole and renamed, so an interrupted write never leaves half a file behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _csv_row(record: Record) -> dict[str, str]:
    # repr of a float reads back exactly, so a resumed search sees the very same scores.
    return {
        "config": format_config(record.config),
        "cost": repr(float(record.cost)),
        "macs": str(record.macs),
        "params": str(record.params),
        "val_accuracy": repr(record.val_accuracy),
        "val_loss": repr(record.val_loss),
        "test_accuracy": "" if record.test_accuracy is None else repr(record.test_accuracy),
        "dense": " ".join(record.dense),  # layer names, space-separated
    }


def _write_csv(path: Path, records: Iterable[Record], append: bool) -> None:
    new = not append or not path.exists() or path.stat().st_size == 0
    tmp = path if append else path.with_name(path.name + ".tmp")
    with open(tmp, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(_csv_row(r) for r in records)
    if not append:
        os.replace(tmp, path)


def _read_csv(path: Path, space: Sequence[Sequence[int]]) -> tuple[dict[Configuration, dict[str, str]], bool]:
    """Rows of an earlier run's results.csv by configuration (the last row wins).

    Returns the rows and whether the file must be written again: an incomplete row (a write cut
    short) was left out, or it lacks the ``dense`` column (written before the dense choice; its
    scores stand, costs are recomputed anyway).
    """
    if not path.exists():
        return {}, False
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and tuple(reader.fieldnames) not in (_COLUMNS, _COLUMNS[:-1]):
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(_COLUMNS)}; move it away")
        rows = {}
        cut = reader.fieldnames is not None and tuple(reader.fieldnames) == _COLUMNS[:-1]
        for row in reader:
            if None in row.values() or not row["val_loss"]:
                log.warning("search: %s line %d is incomplete; scoring it again", path, reader.line_num)
                cut = True
                continue
            config = parse_config(row["config"])
            if len(config) != len(space) or any(s not in sizes for s, sizes in zip(config, space)):
                raise ValueError(
                    f"{path} holds configuration {row['config']}, which is not in this model's search "
                    f"space: it belongs to another search; use another output folder"
                )
            rows[config] = row
    return rows, cut


def _best_within(records: Mapping[Configuration, Record], limit: float) -> Configuration | None:
    """Highest validation accuracy within ``limit``; ties: lower cost, then the smaller sizes."""
    within = [c for c, r in records.items() if r.cost <= limit]
    return min(within, key=lambda c: (-records[c].val_accuracy, records[c].cost, c), default=None)


def search(
    model: nn.Module,
    data: Data,
    *,
    strategy: str = "exhaustive",
    budget: int | float | str | None = "uniform:16",
    cost: CostFn | LatencyTable | None = None,
    test_data: Data | None = None,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 1000,
    input_shape: Sequence[int] | None = None,
    method: str = "auto",
    max_cache_bytes: int | None = None,
    chunk_size: int = 64,
    distributed: bool | None = None,
    calibration: Sequence[Tensor] | None = None,
    progress: bool = True,
    extra: Sequence[Sequence[int]] = (),
    **options: Any,
) -> SearchResult:
    """Find the configuration with the best validation accuracy within a budget.

    The answer is the best within the budget among everything scored: the strategy's
    configurations, the ``extra`` ones and every score taken from ``results.csv``, so a
    configuration a report shows as fitting and better is never passed over.

    Parameters
    ----------
    model : nn.Module
        A trained model with GroSS layers.
    data : ImageSet, sequence of (images, labels), or callable
        The validation split (see :func:`evaluate_configs`).
    strategy : {"exhaustive", "beam", "evolution"}
        See :func:`exhaustive`, :func:`beam`, :func:`evolution`; ``options`` go to it
        (``width=``, ``seed=``, ``max_evaluations=``, ...).
    budget : int, float, str or None
        See :func:`resolve_budget`; ``"uniform:16"`` is the paper's larger budget.
    cost : callable, LatencyTable, optional
        ``cost(config) -> float``; default the MACs of one input (:func:`macs_cost`), with every
        layer at the cheaper of its bottleneck and its dense conv. Pass an :class:`AdditiveCost`
        to let the exhaustive search prune; a latency table is turned into one, with the dense
        conv as a per-layer choice where the table timed it. Each record's ``dense`` lists the
        layers the cost counts as dense convs: export with ``fuse=result.best.dense`` to build
        the network that was costed (its outputs are the same).
    test_data : same types as data, optional
        Also measure the test accuracy of every evaluated configuration. Reported only; the
        search never sees it.
    out_dir : path, optional
        Where ``results.csv`` (one row per configuration, appended as they are scored) and
        ``best.json`` (the summary, rewritten as the search goes) are written. A search started
        again in the same folder takes every configuration already in ``results.csv`` from it
        instead of scoring it again; it must be the same model and validation data.
    batch_size : int
        For datasets.
    input_shape : (C, H, W), optional
        For the MACs; default the shape of the first validation batch.
    method, max_cache_bytes, distributed, calibration
        See :class:`ConfigEvaluator`. Under ``torch.distributed`` every process must call this
        with the same arguments; only rank 0 writes files. With ``calibration`` every
        configuration is scored with BatchNorm statistics recalibrated on those images.
    chunk_size : int
        Configurations scored per pass over the data: each pass shares work within it, and its
        results are written when it ends.
    progress : bool
        Show a progress bar over the configurations scored.
    extra : sequence of configurations
        Scored besides the strategy's, within the budget or not (the uniform baselines a report
        compares against); recorded like the others, and chosen when one fits and scores best.

    Returns
    -------
    SearchResult
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    started = time.perf_counter()
    space = search_space(model)
    layers = tuple(name for name, _ in gross_layers(model))
    device = _model_device(model)
    val = _batch_source(data, batch_size, device)
    test = None if test_data is None else _batch_source(test_data, batch_size, device)
    if input_shape is None:
        first = next(iter(val()), None)
        if first is None:
            raise ValueError("the validation data is empty")
        input_shape = tuple(first[0].shape[1:])
    macs, params = macs_cost(model, input_shape), params_cost(model)
    if isinstance(cost, LatencyTable):
        cost = AdditiveCost.from_latency_table(cost, fuse=cost.has_dense)
    cost = macs if cost is None else cost
    cost_name = cost.name if isinstance(cost, AdditiveCost) else getattr(cost, "__name__", "cost")
    limit = resolve_budget(budget, space, cost)
    evaluator = ConfigEvaluator(
        model, method=method, max_cache_bytes=max_cache_bytes, distributed=distributed, calibration=calibration
    )
    _, world = _world(distributed)
    # One process writes, also when every process evaluates everything (distributed=False).
    main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    writer = main_process and out_dir is not None
    folder = Path(out_dir) if out_dir is not None else None
    csv_path = folder / "results.csv" if folder is not None else None

    def record(config: Configuration, val_score: Score, test_accuracy: float | None) -> Record:
        # MACs and parameters of the network the cost counts: its dense layers as dense convs.
        dense = cost.dense_layers(config) if isinstance(cost, AdditiveCost) else ()
        return Record(
            config=config,
            cost=float(cost(config)),
            macs=int(macs.of(config, dense)),
            params=int(params.of(config, dense)),
            val_accuracy=val_score.accuracy,
            val_loss=val_score.loss,
            test_accuracy=test_accuracy,
            dense=tuple(layers[i] for i in dense),
        )

    rows: dict[Configuration, dict[str, str]] = {}
    cut = False
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        rows, cut = _read_csv(csv_path, space)
    if world > 1:
        box = [rows]
        dist.broadcast_object_list(box, src=0)
        rows = box[0]
    records: dict[Configuration, Record] = {
        config: record(
            config,
            Score(float(row["val_accuracy"]), float(row["val_loss"])),
            float(row["test_accuracy"]) if row["test_accuracy"] else None,
        )
        for config, row in rows.items()
    }
    if records:
        log.info("search: %d configurations taken from %s", len(records), csv_path)
    if test is not None:
        missing = evaluator.order(c for c, r in records.items() if r.test_accuracy is None)
        for config, score in zip(missing, evaluator(missing, test)):
            records[config] = replace(records[config], test_accuracy=score.accuracy)
        cut = cut or bool(missing)
    if writer and cut:
        _write_csv(csv_path, records.values(), append=False)
    bar = tqdm(desc=f"search ({strategy})", unit="config", total=0, disable=not progress or not main_process)
    scored_now = 0

    def summary(best: Configuration | None, evaluations: int, finished: bool) -> dict:
        return {
            "finished": finished,
            "strategy": strategy,
            "options": options,
            "budget": budget,
            "limit": limit,
            "cost": cost_name,
            "method": evaluator.method,
            "layers": list(layers),
            "space": [list(s) for s in space],
            "space_size": math.prod(len(s) for s in space),
            "evaluations": evaluations,
            "evaluated_now": scored_now,
            "best": None if best is None else records[best].to_dict(),
            "best_config": None if best is None else format_config(best),
            "dense_choice": isinstance(cost, AdditiveCost) and cost.dense is not None,
            "seconds": time.perf_counter() - started,
        }

    def score(configs: list[Configuration]) -> list[float]:
        nonlocal scored_now
        bar.total += len(configs)
        bar.refresh()
        ordered = evaluator.order(configs)
        for start in range(0, len(ordered), chunk_size):
            chunk = ordered[start : start + chunk_size]
            val_scores = evaluator(chunk, val)
            test_scores = evaluator(chunk, test) if test is not None else [None] * len(chunk)
            new = [record(c, v, t and t.accuracy) for c, v, t in zip(chunk, val_scores, test_scores)]
            records.update((r.config, r) for r in new)
            scored_now += len(new)
            if writer:
                _write_csv(csv_path, new, append=True)
                # The summary of an interrupted search: the best of what is on disk so far.
                _write_json(folder / "best.json", summary(_best_within(records, limit), len(records), finished=False))
            bar.update(len(chunk))
        return [records[c].val_accuracy for c in configs]

    objective = Objective(space, score, cost, limit, known={c: r.val_accuracy for c, r in records.items()})
    extra = [evaluator._validate(c) for c in extra]
    try:
        STRATEGIES[strategy](objective, **options)
        unscored = [c for c in dict.fromkeys(extra) if c not in records]
        if unscored:
            score(unscored)
    finally:
        bar.close()
    # A strategy only sees what it asked for; scores from results.csv and the extra
    # configurations may hold a better one within the budget.
    best_config = _best_within(records, limit)
    result = SearchResult(
        strategy=strategy,
        limit=limit,
        cost_name=cost_name,
        layers=layers,
        records=[records[c] for c in dict.fromkeys([*objective.scores, *extra])],
        best=records[best_config],
        evaluated_now=scored_now,
        space_size=objective.size,
        seconds=time.perf_counter() - started,
    )
    if writer:
        _write_json(folder / "best.json", summary(best_config, objective.evaluations, finished=True))
    log.info(
        "search: %s best %s (val accuracy %.4f, %s %g%s) after %d evaluations",
        strategy,
        format_config(best_config),
        result.best.val_accuracy,
        cost_name,
        result.best.cost,
        f"; dense: {', '.join(result.best.dense)}" if result.best.dense else "",
        result.evaluations,
    )
    return result
