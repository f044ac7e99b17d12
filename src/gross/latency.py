"""Measured latency per layer and group size, on one runtime and device: a cost for the search.

Fewer MACs is not faster everywhere: a depthwise bottleneck (group size 1) can be several times
slower than the dense conv it replaces on a CPU at a large batch, while a wide layer at batch 1
gets faster. :func:`latency_table` therefore times, with the layer's real input shape, every
GroSS layer at every group size as the three plain convs it exports to, and optionally the
original dense conv (``"dense"``), plus everything else in the network once. The sum over a
configuration (:meth:`LatencyTable.cost`) then predicts the exported network's latency without
building or timing it, so a search can rank millions of configurations by it.

The remainder ("rest") is anchored to one whole network: the network with every layer at one
choice (dense, or the largest group size) is timed whole, and the rest is its time less its
layers' entries. It holds every conv, norm, activation, pooling and linear layer that the
configuration does not change, and also what timing the layers apart cannot see but is the
same whatever the choices: calling each layer on its own (a Python call, an onnxruntime
session run) and converting between layouts at every layer boundary, which onnxruntime avoids
in a whole graph (at its default ``ORT_ENABLE_ALL`` it keeps a chain of convs in a blocked
layout). On the paper network, its five pieces timed apart summed to 1.58-1.77x the whole
network on onnxruntime at batch 1 and 1.17-1.21x at batch 64, and to 0.93-0.98x on torch, in two
runs of ``python benchmarks/latency_table.py`` ("pieces / whole"). So the table predicts the anchor
network exactly, and the rest may be negative. It also holds the timing noise of several
measurements, but as one constant shared by every configuration: it shifts every prediction
alike, never their order or the choice between a bottleneck and its dense conv.

Latency depends on where the network runs (:mod:`gross.runtime`): ``runtime="torch"`` times
torch eager, ``runtime="onnxruntime"`` each candidate (and the anchor) as its own ONNX graph in
an onnxruntime ``InferenceSession``, as exported networks are deployed. A table records its
runtime, batch size, thread count and device (:attr:`LatencyTable.setup`); one measured on
another setup predicts the wrong thing, so :meth:`LatencyTable.mismatch` says how it differs
and its users refuse or remeasure it.

On the CPU, timing first settles the memory allocator (:func:`steady_allocator`). torch eager
allocates every activation anew; glibc's malloc hands a large block back to the kernel when it is
freed, so the next forward pass faults its pages in again, and how many depends on thresholds
that glibc moves with the process's history. At batch 64 on the paper network that was
3,700-5,500 page faults per forward pass. What they cost varied between runs of
``python benchmarks/latency_table.py`` (32 ms against 24 ms settled in one, no difference in the
next), and with them the table once predicted 0.66 of the measured time (1.03 settled, the same
benchmark otherwise). Settled, a block up to 32 MiB is reused instead (activations larger than
that still fault, every time alike).

What the table cannot see: interactions between layers that depend on the choices (caches
warmed by the previous layer, a layer whose kernels leave the blocked layout that the anchor's
kept). Timing each candidate
alone on a hot cache favours small layers a little; ``benchmarks/latency_table.py`` measures how
well the table's sum ranks whole exported networks.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import math
import os
import platform
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from .model import _replace, gross_layers
from .runtime import RUNTIMES, check_runtime, forward_fn, require_onnxruntime

__all__ = [
    "DENSE",
    "RUNTIMES",
    "Choice",
    "LatencyTable",
    "latency_setup",
    "describe_setup",
    "latency_table",
    "measure_latency",
    "compare_latency",
    "normalize_choice",
    "steady_allocator",
]

DENSE = "dense"
Choice = int | str  # a group size, or DENSE for the original (dense) convolution
K = TypeVar("K", bound=Hashable)

_FORMAT = "gross-latency-table"
_VERSION = 1
SETUP_KEYS = ("runtime", "batch_size", "threads", "device")  # what a latency depends on besides the network


def latency_setup(
    runtime: str = "torch", batch_size: int = 1, threads: int | None = None, device: torch.device | str = "cpu"
) -> dict:
    """Where a latency is measured: ``{"runtime", "batch_size", "threads", "device"}``.

    ``threads`` defaults to torch's current intra-op thread count (``torch.get_num_threads``),
    which the onnxruntime runtime then uses too, so that both runtimes get the same cores.
    """
    return {"runtime": runtime, "batch_size": int(batch_size), "threads": _threads(threads), "device": str(torch.device(device))}


def _threads(threads: int | None) -> int:
    return int(threads) if threads is not None else torch.get_num_threads()


def describe_setup(setup: Mapping) -> str:
    """``"onnxruntime, batch 64, 2 threads, cpu"``; a setup from before runtimes were recorded is torch."""
    threads = setup.get("threads")
    text = f"{setup.get('runtime', 'torch')}, batch {setup.get('batch_size', '?')}"
    if threads is not None:
        text += f", {threads} thread{'' if threads == 1 else 's'}"
    return f"{text}, {setup.get('device', '?')}"


def normalize_choice(entry: object) -> Choice:
    """One configuration entry as a group size (int) or ``"dense"``; ``0`` also means dense.

    Raises
    ------
    ValueError
        For anything else (negative numbers, other strings, non-integral floats).
    """
    if isinstance(entry, str):
        if entry.lower() == DENSE:
            return DENSE
        raise ValueError(f"a configuration entry is a group size or {DENSE!r}, got {entry!r}")
    try:
        size = int(entry)  # numpy and torch integers too
    except (TypeError, ValueError):
        raise ValueError(f"a configuration entry is a group size or {DENSE!r}, got {entry!r}") from None
    if size != entry or size < 0:
        raise ValueError(f"a group size is a non-negative integer (0 = {DENSE!r}), got {entry!r}")
    return DENSE if size == 0 else size


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds per GroSS layer and choice, plus the rest of the network, on one device.

    Attributes
    ----------
    layers : tuple of str
        GroSS layer names, in module order (the order of a configuration tuple).
    options : tuple of dict
        Per layer: choice (group size, or ``"dense"`` for the original conv) -> ms.
    rest : float
        ms of everything that is not a GroSS layer, and of what timing the layers apart misses;
        may be negative (see the module docstring).
    input_shapes : tuple of tuple of int
        Per layer: the ``(N, C, H, W)`` input it was timed with.
    meta : dict
        Runtime and its version, device, batch size, threads, torch version, timing settings,
        the allocator's state (:func:`steady_allocator`) (JSON-ready).
    """

    layers: tuple[str, ...]
    options: tuple[dict[Choice, float], ...]
    rest: float
    input_shapes: tuple[tuple[int, ...], ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.layers)
        if len(self.options) != n or len(self.input_shapes) != n:
            raise ValueError(
                f"a latency table needs one options dict and one input shape per layer: {n} layers, "
                f"{len(self.options)} options, {len(self.input_shapes)} shapes"
            )
        for name, options in zip(self.layers, self.options):
            if not options or any(not (math.isfinite(v) and v >= 0) for v in options.values()):
                raise ValueError(f"layer {name!r} needs finite non-negative times, got {options}")
        if not math.isfinite(self.rest):
            raise ValueError(f"rest must be a finite time, got {self.rest}")

    @property
    def setup(self) -> dict:
        """Runtime, batch size, threads and device it was measured on (see :func:`latency_setup`).

        Tables written before the runtime was recorded were measured with torch.
        """
        return {key: self.meta.get(key, "torch" if key == "runtime" else None) for key in SETUP_KEYS}

    def mismatch(self, setup: Mapping) -> str | None:
        """None when the table was measured on ``setup``; else a sentence saying how they differ.

        Parameters
        ----------
        setup : dict
            From :func:`latency_setup`: where the table's predictions are about to be used.
        """
        mine = self.setup
        if all(mine[key] == setup.get(key) for key in SETUP_KEYS):
            return None
        return f"it was measured with {describe_setup(mine)}, not {describe_setup(setup)}"

    @property
    def has_dense(self) -> bool:
        """Whether every layer offers the original dense conv as a choice."""
        return all(DENSE in options for options in self.options)

    def choices(self) -> tuple[tuple[Choice, ...], ...]:
        """Per layer, its choices: the group sizes ascending, then ``"dense"`` if timed."""
        return tuple(
            tuple(sorted(k for k in options if k != DENSE)) + ((DENSE,) if DENSE in options else ())
            for options in self.options
        )

    def _entries(self, config: Sequence[object] | Mapping[str, object]) -> list[Choice]:
        if isinstance(config, Mapping):
            missing = [n for n in self.layers if n not in config]
            unknown = sorted(set(config) - set(self.layers))
            if missing or unknown:
                raise ValueError(f"config must name every table layer; missing {missing}, unknown {unknown}")
            config = [config[n] for n in self.layers]
        config = list(config)
        if len(config) != len(self.layers):
            raise ValueError(f"config has {len(config)} entries, the table has {len(self.layers)} layers")
        return [normalize_choice(e) for e in config]

    def per_layer(self, config: Sequence[object] | Mapping[str, object]) -> dict[str, float]:
        """ms of each GroSS layer at ``config``, in module order (``rest`` not included).

        Parameters
        ----------
        config : tuple in module order, or dict naming every layer
            Entries: a group size, or ``"dense"`` / ``0`` for the original conv.
        """
        out = {}
        for name, options, choice in zip(self.layers, self.options, self._entries(config)):
            if choice not in options:
                raise ValueError(
                    f"{choice!r} is not a timed choice of layer {name!r}; timed: {sorted(map(str, options))}"
                )
            out[name] = options[choice]
        return out

    def cost(self, config: Sequence[object] | Mapping[str, object]) -> float:
        """Predicted latency (ms) of the exported network at ``config``: the layers plus ``rest``."""
        return self.rest + sum(self.per_layer(config).values())

    __call__ = cost

    def fused_faster(self, config: Sequence[object] | Mapping[str, object]) -> set[str]:
        """The layers whose bottleneck at ``config`` is slower than the same map as one dense conv.

        Those are the layers :func:`gross.export.export` fuses with ``fuse="auto"``: the fused
        conv computes the bottleneck's outputs exactly, in the dense conv's time.
        """
        if not self.has_dense:
            raise ValueError("the table has no dense timings; build it with include_dense=True")
        return {
            name
            for name, options, choice in zip(self.layers, self.options, self._entries(config))
            if choice != DENSE and options[DENSE] < options[choice]
        }

    def to_dict(self) -> dict:
        """JSON-ready form; choices become string keys (``"1"``, ``"dense"``)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "unit": "ms",
            "meta": self.meta,
            "rest_ms": self.rest,
            "layers": [
                {"name": name, "input_shape": list(shape), "ms": {str(k): v for k, v in options.items()}}
                for name, options, shape in zip(self.layers, self.options, self.input_shapes)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LatencyTable:
        """Inverse of :meth:`to_dict`; a malformed dict raises ValueError."""
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(f"not a latency table (expected format {_FORMAT!r})")
        if data.get("version") != _VERSION:
            raise ValueError(f"unsupported latency table version {data.get('version')!r}, expected {_VERSION}")
        try:
            layers = data["layers"]
            return cls(
                layers=tuple(str(entry["name"]) for entry in layers),
                options=tuple(
                    {normalize_choice(k if k == DENSE else int(k)): float(v) for k, v in entry["ms"].items()}
                    for entry in layers
                ),
                rest=float(data["rest_ms"]),
                input_shapes=tuple(tuple(int(d) for d in entry["input_shape"]) for entry in layers),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed latency table: {e!r}") from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)


_STEADY = "glibc malloc: mmap threshold 32 MiB, trim threshold 64 MiB"
_steady: str | None = None


def steady_allocator() -> str:
    """Settle glibc's malloc so that freed activations are reused, not faulted in again; returns what was done.

    Sets ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to 64 MiB, the largest values
    glibc's own dynamic tuning can reach, for the rest of the process (``mallopt`` cannot hand
    the tuning back). A serving process gets the same with ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=67108864`` in its environment, or with jemalloc or tcmalloc. The price
    is memory: freed blocks below 32 MiB stay with the process. Elsewhere than glibc (macOS,
    musl) nothing is done and the return value says so. :func:`latency_table` and
    :func:`compare_latency` call it before timing on the CPU; the table records its return
    value as ``meta["allocator"]``.
    """
    global _steady
    if _steady is None:
        _steady = "unchanged (not glibc)"
        if platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
            except OSError:
                libc = None
            # M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3 (malloc.h); 32 MiB is glibc's ceiling.
            if libc is not None and libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 64 << 20) == 1:
                _steady = _STEADY
            else:
                _steady = "unchanged (mallopt refused)"
    return _steady


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def _bench(
    fns: Mapping[K, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    block_ms: float,
    quantile: float,
    sync: Callable[[], None],
) -> dict[K, float]:
    """The ``quantile`` of the ms per call of every callable, timed round-robin.

    Each sample runs one callable enough times to last about ``block_ms``, so that sub-ms
    layers are not dominated by timer and dispatch jitter; the callables take turns sample by
    sample, so that drift in machine load (other processes, clock boost) hits them all alike.
    """
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup and repeats must be >= 1, got {warmup} and {repeats}")
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    number: dict[K, int] = {}
    for key, fn in fns.items():
        first = []
        for _ in range(warmup):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            first.append(time.perf_counter() - start)
        one = max(min(first), 1e-7)
        number[key] = max(1, min(10_000, math.ceil(block_ms * 1e-3 / one)))
    samples: dict[K, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            n = number[key]
            sync()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples[key].append((time.perf_counter() - start) / n)
    return {key: 1e3 * float(np.quantile(values, quantile)) for key, values in samples.items()}


def _allocator(device: torch.device) -> str:
    """The allocator that timing on ``device`` runs under: settled on the CPU (:func:`steady_allocator`)."""
    return steady_allocator() if device.type == "cpu" else "unchanged (not the CPU)"


def _timed(
    fns: Mapping[K, Callable[[], object]], device: torch.device, threads: int, **bench: float
) -> dict[K, float]:
    """:func:`_bench` under the conditions every latency here is measured in: the allocator
    settled on the CPU, torch's intra-op threads set to ``threads``, ``torch.inference_mode``."""
    _allocator(device)
    with _torch_threads(threads), torch.inference_mode():
        return _bench(fns, sync=_synchronizer(device), **bench)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(setup: Mapping, warmup: int, repeats: int, block_ms: float, quantile: float) -> dict:
    version = require_onnxruntime().__version__ if setup["runtime"] == "onnxruntime" else torch.__version__
    return {
        **setup,
        "runtime_version": version,
        "device_name": _device_name(torch.device(setup["device"])),
        "torch": torch.__version__,
        "interop_threads": torch.get_num_interop_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "block_ms": block_ms,
        "quantile": quantile,
    }


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block, then restored."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _placement(model: nn.Module, device: torch.device | str | None) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    default = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    return torch.device(device) if device is not None else default, dtype


def _sample_shape(input_shape: Sequence[int], batch_size: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1 or batch_size < 1:
        raise ValueError(
            f"input_shape is one sample's (C, H, W) and batch_size >= 1, got {tuple(input_shape)} and {batch_size}"
        )
    return (batch_size,) + shape


def latency_table(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    runtime: str = "torch",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 100,
    block_ms: float = 1.0,
    quantile: float = 0.5,
    include_dense: bool = True,
) -> LatencyTable:
    """Time every GroSS layer at every group size (and dense), and the rest, on one runtime and device.

    Each layer is timed as its exported bottleneck (:meth:`GroSSConv2d.bottleneck`: three plain
    convs, not the GroSS forward, which also sums the difference terms) on the input it received
    in one forward pass of the whole network; the dense choice is :meth:`GroSSConv2d.dense_conv` at the
    largest group size. With ``runtime="onnxruntime"`` each of these modules, and the rest, is
    exported as its own small ONNX graph and timed in an ``InferenceSession``. The rest is the
    anchor network (every layer dense, or at its largest group size without ``include_dense``)
    timed whole, less its layers' entries (see the module docstring). Timing runs in
    eval mode (under ``torch.inference_mode`` for torch) on a copy of ``model``, on the CPU
    after :func:`steady_allocator`.

    Parameters
    ----------
    model : nn.Module
        A model with GroSS layers.
    input_shape : (C, H, W)
        One sample's shape.
    batch_size : int
    device : torch.device or str, optional
        Default: the device of the model's parameters. onnxruntime times on the CPU only.
    runtime : {"torch", "onnxruntime"}
        Where the network will run (:mod:`gross.runtime`); onnxruntime needs ``gross[export]``.
    threads : int, optional
        Intra-op threads of either runtime (torch's are set for the timing and restored).
        Default: torch's current ``torch.get_num_threads()``.
    warmup : int
        Untimed calls per candidate, before timing (also used to size the timed blocks).
    repeats : int
        Timed samples per candidate.
    block_ms : float
        Each sample repeats the call until it lasts about this long.
    quantile : float
        Which quantile of the samples the table holds: 0.5, the median, by default. The
        fastest sample (0) looks cleaner but is the less reproducible on shared virtual
        machines, whose speed changes for seconds at a time (see ``benchmarks/latency_table.py``);
        on oversubscribed cores, where most samples are preempted, a low quantile may serve better.
    include_dense : bool
        Also time the original dense conv of every layer (choice ``"dense"``).

    Returns
    -------
    LatencyTable
        Its ``meta`` records the runtime, batch size, threads and device (:attr:`LatencyTable.setup`),
        and the anchor's configuration and measured ms (``meta["anchor"]``).

    Raises
    ------
    gross.runtime.RuntimeMissing
        For ``runtime="onnxruntime"`` without onnxruntime, onnx and onnxscript installed.
    """
    shape = _sample_shape(input_shape, batch_size)
    device, dtype = _placement(model, device)
    check_runtime(runtime, device)
    setup = latency_setup(runtime, batch_size, threads, device)
    net = copy.deepcopy(model).to(device).eval()
    layers = gross_layers(net)
    if not layers:
        raise ValueError("the model has no GroSS layers; call gross.decompose(model) first")
    if layers[0][0] == "":
        raise ValueError("the model is a bare GroSS layer; time it inside its network (or an nn.Sequential)")
    recorded: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name: str):
        def hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            recorded[name] = (inputs[0].detach(), out.detach())
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in layers]
    try:
        with torch.no_grad():
            net(torch.randn(shape, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    unused = [name for name, _ in layers if name not in recorded]
    if unused:
        raise ValueError(f"GroSS layers {unused} were not called in the forward pass; cannot time them")
    # The anchor: the network with every layer at one choice, timed whole; the rest is what it
    # takes beyond its layers' entries (see the module docstring).
    anchor = {name: DENSE if include_dense else layer.group_sizes[-1] for name, layer in layers}
    whole = ("whole",)
    fns: dict[tuple, Callable[[], object]] = {}
    for name, layer in layers:
        x = (recorded[name][0],)
        for choice in (*layer.group_sizes, *((DENSE,) if include_dense else ())):
            fns[("layer", name, choice)] = forward_fn(_candidate(layer, choice), x, runtime, setup["threads"])
    for name, layer in layers:
        # Only now that every candidate is built: the copy loses its GroSS layers here.
        _replace(net, name, _candidate(layer, anchor[name]))
    fns[whole] = forward_fn(net, (torch.randn(shape, device=device, dtype=dtype),), runtime, setup["threads"])
    meta = _meta(setup, warmup, repeats, block_ms, quantile)
    meta["allocator"] = _allocator(device)
    times = _timed(fns, device, setup["threads"], warmup=warmup, repeats=repeats, block_ms=block_ms, quantile=quantile)
    names = tuple(name for name, _ in layers)
    meta["anchor"] = {"config": [str(anchor[name]) for name in names], "ms": times[whole]}
    return LatencyTable(
        layers=names,
        options=tuple({key[2]: t for key, t in times.items() if key[1:2] == (name,)} for name in names),
        rest=times[whole] - sum(times[("layer", name, anchor[name])] for name in names),
        input_shapes=tuple(tuple(recorded[name][0].shape) for name in names),
        meta=meta,
    )


def _candidate(layer: nn.Module, choice: Choice) -> nn.Module:
    """What a GroSS layer exports to at one choice: its bottleneck, or the dense conv of the same outputs."""
    module = layer.dense_conv(layer.group_sizes[-1]) if choice == DENSE else layer.bottleneck(choice)
    return module.eval()


def compare_latency(
    models: Mapping[K, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    runtime: str = "torch",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 100,
    block_ms: float = 1.0,
    quantile: float = 0.5,
) -> dict[K, float]:
    """ms per forward pass (median by default) of several whole networks, timed round-robin.

    Timing the networks in turns, not one after the other, keeps drift in machine load from
    favouring whichever ran first. On the CPU the allocator is settled first
    (:func:`steady_allocator`), as for :func:`latency_table`. Runs in eval mode on copies: torch under
    ``torch.inference_mode``, onnxruntime on each network's ONNX graph at this batch size.

    Parameters
    ----------
    models : dict key -> nn.Module
    input_shape : (C, H, W)
    batch_size, device, runtime, threads, warmup, repeats, block_ms, quantile
        As in :func:`latency_table`; ``device`` defaults to each model's parameter device.
    """
    shape = _sample_shape(input_shape, batch_size)
    threads = _threads(threads)
    fns: dict[K, Callable[[], object]] = {}
    devices = set()
    for key, model in models.items():
        dev, dtype = _placement(model, device)
        devices.add(dev)
        if len(devices) > 1:
            raise ValueError(f"the models sit on several devices {sorted(map(str, devices))}; pass device=")
        check_runtime(runtime, dev)
        net = copy.deepcopy(model).to(dev).eval()
        fns[key] = forward_fn(net, (torch.randn(shape, device=dev, dtype=dtype),), runtime, threads)
    dev = devices.pop() if devices else torch.device("cpu")
    return _timed(fns, dev, threads, warmup=warmup, repeats=repeats, block_ms=block_ms, quantile=quantile)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    runtime: str = "torch",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 100,
    block_ms: float = 1.0,
    quantile: float = 0.5,
) -> float:
    """ms per forward pass (median by default) of one network; see :func:`compare_latency`."""
    return compare_latency(
        {"model": model},
        input_shape,
        batch_size=batch_size,
        device=device,
        runtime=runtime,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        block_ms=block_ms,
        quantile=quantile,
    )["model"]
