"""Where a network runs when it is timed: torch eager, or onnxruntime on its ONNX graph.

People deploy exported CNNs with an inference runtime, where the picture can differ from torch
eager: on the paper network onnxruntime is several times faster, and at a large batch a
bottleneck that torch runs slower than the dense conv can run faster. :mod:`gross.latency`
therefore times on either runtime through :func:`forward_fn`, which turns a module and its
inputs into one callable forward pass:

* ``"torch"``: the module itself, eager, with torch's intra-op threads;
* ``"onnxruntime"``: the module traced to an ONNX graph at exactly these input shapes
  (:func:`onnx_program`, the same exporter as :func:`gross.export.export_onnx`) and run in an
  ``onnxruntime.InferenceSession`` on the CPU with the given number of intra-op threads and
  onnxruntime's full graph optimisation (what a deployment gets by default).

onnxruntime, onnx and onnxscript are the optional extra ``gross[export]``; without them asking
for the onnxruntime runtime raises :class:`RuntimeMissing`, which says what to install.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch
from torch import Tensor, nn

__all__ = ["RUNTIMES", "RuntimeMissing", "check_runtime", "require_onnxruntime", "onnx_program", "forward_fn"]

RUNTIMES = ("torch", "onnxruntime")
_ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")  # onnx and onnxscript: torch's ONNX exporter


class RuntimeMissing(ImportError):
    """A runtime's optional packages are not installed; the message says what to install."""


def require_onnxruntime() -> ModuleType:
    """``onnxruntime``, once it and the exporter's packages import; else :class:`RuntimeMissing`."""
    missing = []
    for name in _ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeMissing(
            f"the onnxruntime runtime needs {', '.join(_ONNX_PACKAGES)} and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'gross[export]' "
            "(or time with runtime torch)"
        )
    import onnxruntime

    return onnxruntime


def check_runtime(runtime: str, device: torch.device | str = "cpu") -> None:
    """Raise unless ``runtime`` is known, installed and can time on ``device``.

    Raises
    ------
    ValueError
        For an unknown runtime, or onnxruntime on another device than the CPU.
    RuntimeMissing
        When onnxruntime's packages are not installed.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown latency runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        if torch.device(device).type != "cpu":
            raise ValueError(f"the onnxruntime runtime times on the CPU (CPUExecutionProvider), not {device}; use device cpu")
        require_onnxruntime()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs every op set it skips (e.g. "torchvision is not installed") and warns
    # about deprecations in its own dependencies: nothing the user can act on.
    noisy = logging.getLogger("torch.onnx")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        noisy.setLevel(level)


def onnx_program(
    module: nn.Module,
    inputs: Sequence[Tensor],
    *,
    opset: int = 18,
    dynamic_batch: bool = False,
    input_names: Sequence[str] | None = None,
) -> torch.onnx.ONNXProgram:
    """``module`` traced in eval mode on ``inputs`` as one self-contained ONNX program.

    Uses torch's ``torch.export``-based exporter (``dynamo=True``); an ``opset`` below 18 is
    reached by the ONNX version converter. The module is copied, not changed.

    Parameters
    ----------
    module : nn.Module
    inputs : sequence of Tensor
        Example inputs; their shapes are the graph's, except a free batch with ``dynamic_batch``.
    opset : int
    dynamic_batch : bool
        Leave dimension 0 of every input free (traced as given: torch.export fixes a size-1
        dimension, so trace a batch of 2 or more).
    input_names : sequence of str, optional
        Default: ``input`` for the first input, ``input_1``, ... for the others. The (first)
        output is named ``output``.
    """
    names = list(input_names) if input_names is not None else ["input"] + [f"input_{i}" for i in range(1, len(inputs))]
    if len(names) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(names)} input names")
    net = copy.deepcopy(module).eval()
    batch = torch.export.Dim("batch") if dynamic_batch else None
    with _quiet_exporter():
        return torch.onnx.export(
            net,
            tuple(inputs),
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=["output"],
            dynamic_shapes=tuple({0: batch} for _ in inputs) if dynamic_batch else None,
            external_data=False,
            verbose=False,
        )


def _session(program: torch.onnx.ONNXProgram, threads: int):
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One op at a time, as the networks here are chains: no second pool of threads.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads would otherwise spin after every run; with one session per table entry,
    # timed in turns, the spinning pools of the others steal the cores from the one being timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def forward_fn(module: nn.Module, inputs: Sequence[Tensor], runtime: str, threads: int) -> Callable[[], object]:
    """One forward pass of ``module`` on ``inputs`` (fixed shapes) on ``runtime``, as a callable.

    ``"torch"`` calls the module (the caller sets torch's threads and ``inference_mode``);
    ``"onnxruntime"`` runs its float32 ONNX graph in an ``InferenceSession`` with ``threads``
    intra-op threads on the CPU and returns onnxruntime's list of output arrays.
    """
    if runtime == "torch":
        return lambda: module(*inputs)
    check_runtime(runtime)
    net = copy.deepcopy(module).to("cpu", torch.float32)  # ONNX graphs are deployed in float32
    feeds = [x.detach().to("cpu", torch.float32).contiguous() for x in inputs]
    session = _session(onnx_program(net, feeds), threads)
    arrays = {node.name: x.numpy() for node, x in zip(session.get_inputs(), feeds)}
    return lambda: session.run(None, arrays)
