"""Checkpoints: tensors in safetensors, metadata as JSON inside the same file, written atomically.

One file holds everything a stage needs, so a checkpoint can never be half new and half old:
the tensors (model state dict, optimizer state, generator states) are safetensors entries and
the metadata (architecture, configuration, epoch, optimizer hyper-parameters) is JSON stored in
the safetensors header under the key ``"gross"``. Nothing is ever unpickled.

Writes go to a temporary file in the target's folder, are flushed and fsync'ed, then
``os.replace``'d over the target: a write killed at any point leaves the previous file intact.

An *architecture* (``arch``) is a JSON-ready dict ``{"model": name, "kwargs": {...}, "layers":
[...]}``: the network's name and constructor arguments (see :func:`gross.models.build_model`; a
file reference is made absolute, and a network handed over in Python is ``python:`` and its class)
and the GroSS layers' specs (:func:`gross.layer_specs`, empty for an undecomposed network).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _safetensors_bytes
from torch import Tensor, nn

from .model import layer_specs, restore_layers
from .models import build_model

__all__ = [
    "CheckpointError",
    "atomic_write",
    "save_tensors",
    "load_tensors",
    "make_arch",
    "same_architecture",
    "describe_arch",
    "build_from_arch",
    "python_arch_name",
    "PYTHON_PREFIX",
    "save_model",
    "load_model",
    "save_training_state",
    "load_training_state",
    "read_meta",
]

META_KEY = "gross"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or from another architecture; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Atomic files


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one.

    The bytes go to a temporary file beside ``path``, are fsync'ed, and the temporary file is
    renamed over ``path``. On any error (or exception raised inside the write) the temporary file
    is removed and ``path`` is untouched. Stale temporaries of ``path`` left by a killed process
    are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode any other file gets here.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# Tensors + metadata


def save_tensors(path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors and JSON metadata to one safetensors file, atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {META_KEY: json.dumps({"format": FORMAT, **meta})}
    atomic_write(path, _safetensors_bytes(flat, metadata=header))


def _open_error(path: Path, err: BaseException) -> CheckpointError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CheckpointError(
        f"{path} is corrupt or not a gross checkpoint ({reason}); delete it and rerun the stage that writes it"
    )


def read_meta(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; run the stage that writes it first")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _open_error(path, err) from None
    return _parse_meta(path, header)


def _parse_meta(path: Path, header: Mapping[str, str]) -> dict:
    if META_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file but not a gross checkpoint (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as err:
        raise _open_error(path, err) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def load_tensors(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a checkpoint written by :func:`save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; run the stage that writes it first")
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _open_error(path, err) from None
    return tensors, _parse_meta(path, header)


# ---------------------------------------------------------------------------------------------
# Architectures


def make_arch(name: str, kwargs: Mapping[str, Any], model: nn.Module | None = None) -> dict:
    """The architecture record of a network built by ``build_model(name, **kwargs)``."""
    return {"model": name, "kwargs": json.loads(json.dumps(dict(kwargs))), "layers": layer_specs(model) if model is not None else []}


def describe_arch(arch: Mapping[str, Any]) -> str:
    """One line: ``paper(widths=[4, 4, 8, 8], num_classes=10), 3 GroSS layers``."""
    args = ", ".join(f"{k}={v}" for k, v in sorted(arch.get("kwargs", {}).items()))
    layers = len(arch.get("layers") or [])
    return f"{arch.get('model')}({args})" + (f" with {layers} GroSS layers" if layers else "")


def same_architecture(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two records describe the same base network (GroSS layers are not compared)."""
    return a.get("model") == b.get("model") and a.get("kwargs", {}) == b.get("kwargs", {})


PYTHON_PREFIX = "python:"  # arch["model"] of a network handed over in Python: no name rebuilds it


def python_arch_name(model: nn.Module) -> str:
    """The record's name of a network given as a module: ``python:`` and its class's import path."""
    cls = type(model)
    return f"{PYTHON_PREFIX}{cls.__module__}.{cls.__qualname__}"


def build_from_arch(arch: Mapping[str, Any], template: nn.Module | None = None) -> nn.Module:
    """An uninitialised network of that architecture, GroSS layers included (zeros until loaded).

    ``template`` is the base network for an architecture given in Python (``python:...``), which
    no name rebuilds: a copy of it is used.
    """
    name = str(arch.get("model"))
    if name.startswith(PYTHON_PREFIX):
        if template is None or python_arch_name(template) != name:
            given = f"a {python_arch_name(template)[len(PYTHON_PREFIX):]}" if template is not None else "none"
            raise CheckpointError(
                f"this network ({name[len(PYTHON_PREFIX):]}) was given in Python, so no name rebuilds it; "
                f"pass the same module again (gross.pipeline.run(cfg, model=...)); given: {given}"
            )
        model = copy.deepcopy(template)
    else:
        try:
            model = build_model(name, **arch.get("kwargs", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"cannot build the architecture {describe_arch(arch)}: {err}") from None
    if arch.get("layers"):
        try:
            restore_layers(model, arch["layers"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"cannot restore the GroSS layers of {describe_arch(arch)}: {err}") from None
    return model


def _check_arch(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any] | None) -> None:
    if expected is None or same_architecture(found, expected):
        return
    if str(found.get("model")).startswith(PYTHON_PREFIX):
        raise CheckpointError(
            f"{path} holds {describe_arch(found)}, which was given in Python, so no name rebuilds it; "
            f"pass the same module again (gross.pipeline.run(cfg, model=...) or gross.pipeline.context(cfg, model=...))"
        )
    raise CheckpointError(
        f"{path} holds {describe_arch(found)} but this run's model is {describe_arch(expected)}; "
        f"use the run folder it belongs to, or change model: in the configuration"
    )


def _load_state(path: Path, model: nn.Module, state: Mapping[str, Tensor]) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{path} does not fit the model ({first}); it comes from another architecture") from None


def save_model(
    path: str | Path,
    model: nn.Module,
    arch: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
    sidecar: str | Path | None = None,
) -> None:
    """Save a model's state dict with its architecture (and ``info``) in the metadata.

    ``sidecar``, when given, gets the same metadata as a readable JSON file; it is written first,
    so that ``path`` appearing means both are complete.
    """
    meta = {"kind": "model", "arch": dict(arch), **(info or {})}
    if sidecar is not None:
        atomic_write(sidecar, json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")
    save_tensors(path, model.state_dict(), meta)


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    expect: Mapping[str, Any] | None = None,
    template: nn.Module | None = None,
) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model`; ``expect`` is the architecture it must have.

    ``template``: the base network, for an architecture given in Python (:func:`build_from_arch`).

    Returns
    -------
    model : nn.Module
        On ``device``, in eval mode.
    meta : dict
        The metadata (``arch`` and whatever ``info`` held).
    """
    path = Path(path)
    tensors, meta = load_tensors(path)
    if "arch" not in meta:
        raise CheckpointError(f"{path} holds no architecture; it was not written by gross.save_model")
    _check_arch(path, meta["arch"], expect)
    model = build_from_arch(meta["arch"], template)
    _load_state(path, model, tensors)
    return model.to(device).eval(), meta


# ---------------------------------------------------------------------------------------------
# Resumable training state


def _split_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for pid, entries in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: Mapping[str, torch.Generator],
    meta: Mapping[str, Any],
) -> None:
    """One resumable checkpoint: model, optimizer state, generator states and ``meta``."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    for name, gen in generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    save_tensors(path, tensors, {"kind": "training", **meta, "optimizer": opt_meta})


def load_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: Mapping[str, torch.Generator],
    expect: Mapping[str, Any] | None = None,
) -> dict:
    """Restore what :func:`save_training_state` wrote into ``model``, ``optimizer``, ``generators``.

    ``expect`` is the architecture the checkpoint must have. Returns the metadata.
    """
    path = Path(path)
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "training":
        raise CheckpointError(f"{path} is not a training checkpoint")
    if "arch" in meta:
        _check_arch(path, meta["arch"], expect)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _load_state(path, model, state)
    try:
        optimizer.load_state_dict(_join_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the optimizer state does not fit ({err}); delete it to restart the stage") from None
    for name, gen in generators.items():
        if f"rng.{name}" not in tensors:
            raise CheckpointError(f"{path} has no state for the {name} generator; delete it to restart the stage")
        gen.set_state(tensors[f"rng.{name}"])
    return meta
