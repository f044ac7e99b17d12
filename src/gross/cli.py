"""The ``gross`` command: one subcommand per stage, and ``gross run`` for the whole pipeline.

Every subcommand only resolves the configuration, loads the previous stage's files from the run
folder, calls the library function and writes its output. The run folder (``RUNS/NAME``)::

    config.yaml                     the resolved configuration (every section)
    base/         model.safetensors arch.json metrics.jsonl     gross train
    decompose/    model.safetensors arch.json                   gross decompose
    reconstruct/  model.safetensors arch.json metrics.jsonl     gross reconstruct
    gross/        model.safetensors arch.json metrics.jsonl     gross finetune (the trained space)
    search/       results.csv best.json uniform.csv source.json gross search
    latency/      table.json                                    gross latency (or export --fuse auto)
    export/       net.safetensors net.json net.onnx summary.json  gross export
    report.md     pareto.png front_group_sizes.png [latency.png]  gross report
    fixed/2-32-64/{decompose,reconstruct,gross}/                gross fixed --config 2,32,64

A training stage whose ``model.safetensors`` exists is done: ``gross run`` skips it (so running it
again continues a killed pipeline), and the single-stage commands refuse to replace it without
``--force``. While a loop runs, ``checkpoint.safetensors`` in its folder holds the last finished
epoch; ``--resume`` continues from it. After the training stages ``gross run`` skips the search
when ``search/best.json`` says it finished, the export when ``export/summary.json`` exists and the
report when ``report.md`` is newer than both. ``gross search`` itself always runs, taking every
score already in ``search/results.csv`` (so it continues an interrupted search); ``source.json``
records the GroSS weights and validation split the scores belong to, and a search of other ones
is refused without ``--force``. ``export/`` is written in a temporary folder and renamed when
complete. Errors the user can fix (missing or corrupt files, a checkpoint of another
architecture, a diverging loss, bad settings or configurations) end with one line on stderr and
exit status 1; set ``GROSS_DEBUG=1`` for the traceback.

Several processes: ``torchrun --nproc_per_node=2 -m gross.cli run`` (gloo on CPU, NCCL on CUDA)
trains data parallel and splits the search's configurations across the processes; decomposition,
latency, export and report run on process 0.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import shutil
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import __version__
from .checkpoint import CheckpointError, atomic_write, load_model, make_arch, read_meta, save_model
from .config import Config, ConfigError, config_to_dict, dump_config, resolve_config
from .data import DataError, Splits
from .export import export_onnx
from .export import load as load_export
from .export import save as save_export
from .latency import DENSE, LatencyTable, compare_latency, latency_table
from .macs import count_macs, macs_table
from .model import (
    batchnorm_state,
    decompose,
    format_config,
    get_config,
    gross_layers,
    load_batchnorm_state,
    parse_config,
    recalibrate_batchnorm,
    sample_config,
    search_space,
    set_config,
)
from .models import build_model
from .report import pareto_front, read_results, write_report
from .search import (
    AdditiveCost,
    feasible_configs,
    macs_cost,
    resolve_budget,
    uniform_config,
)
from .search import search as run_search
from .train import (
    CHECKPOINT,
    TrainingError,
    augmentation_for,
    calibration_batches,
    decompose_fixed,
    evaluate,
    finetune,
    init_distributed,
    load_splits,
    model_kwargs,
    prepare_batches,
    reconstruct,
    resolve_device,
    train_base,
)

__all__ = [
    "main",
    "StageError",
    "Context",
    "select_configurations",
    "stage_search",
    "stage_latency",
    "stage_export",
    "stage_report",
]

MODEL = "model.safetensors"
ARCH = "arch.json"
STAGES = ("train", "decompose", "reconstruct", "finetune")
STAGE_DIRS = {"train": "base", "decompose": "decompose", "reconstruct": "reconstruct", "finetune": "gross"}
# Configuration sections each stage's output depends on (checked when a finished stage is reused).
STAGE_SECTIONS = {
    "train": ("data", "model", "train"),
    "decompose": ("decompose",),
    "reconstruct": ("reconstruct",),
    "finetune": ("finetune",),
}


class StageError(RuntimeError):
    """A stage cannot run (its input is missing, its output exists); the message says what to do."""


USER_ERRORS = (StageError, ConfigError, DataError, CheckpointError, TrainingError, ValueError)


# ---------------------------------------------------------------------------------------------
# Context


@dataclass
class Context:
    """What every stage needs besides the configuration."""

    cfg: Config
    device: torch.device
    rank: int = 0
    world: int = 1
    resume: bool = False
    restart: bool = False
    force: bool = False
    progress: bool = True
    _splits: Splits | None = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def splits(self) -> Splits:
        if self._splits is None:
            splits = load_splits(self.cfg.data)
            if self.device.type == "cuda":
                splits = Splits(splits.train.to(self.device), splits.val.to(self.device), splits.test.to(self.device))
            self._splits = splits
        return self._splits

    def log(self, message: str) -> None:
        if self.lead:
            print(message, file=sys.stderr, flush=True)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def loop_options(self, out_dir: Path) -> dict:
        return {
            "device": self.device,
            "out_dir": out_dir,
            "resume": self.resume,
            "progress": self.progress,
            "augmentation": augmentation_for(self.cfg.data),
            "channels_last": self.cfg.channels_last,
            "eval_batch_size": self.cfg.data.eval_batch_size,
        }


def _base_arch(ctx: Context) -> dict:
    cfg = ctx.cfg
    try:
        kwargs = model_kwargs(cfg.model.name, cfg.model.kwargs, ctx.splits().train)
    except ValueError as err:
        raise ConfigError(f"model.name: {err}") from None
    return make_arch(cfg.model.name, kwargs)


def _stage_info(ctx: Context, stage: str, history: list | None = None) -> dict:
    info: dict[str, Any] = {"stage": stage, "config": config_to_dict(ctx.cfg), "gross_version": __version__}
    if history:
        info["final"] = history[-1]
    return info


def _check_reused(ctx: Context, sections: Sequence[str], path: Path) -> None:
    """Warn when a finished stage was made with other settings than the configuration's now."""
    saved = read_meta(path).get("config") or {}
    now = config_to_dict(ctx.cfg)
    changed = [s for s in sections if s in saved and saved[s] != now[s]]
    if changed:
        ctx.log(
            f"warning: {path} was made with other {', '.join(changed)} settings than the configuration "
            f"now has; it is reused as it is (delete {path.parent} to redo the stage)"
        )


def _start(ctx: Context, stage: str, out_dir: Path, skip_done: bool, sections: Sequence[str] | None = None) -> bool:
    """Whether the stage must run; raises when its output exists and neither skip nor force."""
    target = out_dir / MODEL
    if target.is_file() and not ctx.force:
        if skip_done:
            ctx.log(f"[{stage}] done already: {target}")
            _check_reused(ctx, sections or STAGE_SECTIONS[stage], target)
            return False
        raise StageError(f"{target} exists; pass --force to redo the {stage} stage (it is replaced only on success) or use another --name")
    ckpt = out_dir / CHECKPOINT
    if ckpt.is_file() and ctx.resume:
        ctx.log(f"[{stage}] resuming from epoch {read_meta(ckpt).get('epoch')} ({ckpt})")
    elif ckpt.is_file():
        if not (ctx.restart or ctx.force):
            try:
                epoch = f"epoch {read_meta(ckpt).get('epoch')} of "
            except CheckpointError:
                epoch = ""
            raise StageError(f"{ckpt} holds {epoch}an interrupted {stage} stage; pass --resume to continue it or --restart to start the stage over")
        ctx.log(f"[{stage}] starting over: discarding {ckpt}")
        ctx.barrier()
        if ctx.lead:
            ckpt.unlink()
    return True


def _finish(ctx: Context, out_dir: Path, model: torch.nn.Module, arch: dict, info: dict) -> None:
    if ctx.lead:
        save_model(out_dir / MODEL, model, arch, info, sidecar=out_dir / ARCH)
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
    ctx.barrier()


def _load(ctx: Context, path: Path, stage_needed: str, expect: dict | None) -> tuple[torch.nn.Module, dict]:
    if not path.is_file():
        raise StageError(f"{path} is missing; run `gross {stage_needed} --name {ctx.cfg.name}` (or `gross run`) first")
    return load_model(path, ctx.device, expect=expect)


# ---------------------------------------------------------------------------------------------
# Stages


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def stage_train(ctx: Context, skip_done: bool = False) -> None:
    out = ctx.run_dir / STAGE_DIRS["train"]
    if not _start(ctx, "train", out, skip_done):
        return
    cfg = ctx.cfg
    arch = _base_arch(ctx)
    torch.manual_seed(cfg.train.seed)
    model = build_model(arch["model"], **arch["kwargs"]).to(ctx.device)
    ctx.log(f"[train] {out}: {cfg.model.name} on {cfg.data.dataset}, {_epochs(cfg.train.epochs)}")
    history = train_base(model, ctx.splits(), cfg.train, arch=arch, **ctx.loop_options(out))
    _finish(ctx, out, model, arch, _stage_info(ctx, "train", history))


class _LayerBar:
    """A progress bar over the layers being decomposed (``gross.decompose``'s progress callback)."""

    def __init__(self, ctx: Context, desc: str = "decompose") -> None:
        self.bar = tqdm(desc=desc, unit="layer", disable=not (ctx.progress and ctx.lead), dynamic_ncols=True)

    def __call__(self, name: str, index: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = index
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        if self.bar.total is not None:
            self.bar.n = self.bar.total
            self.bar.refresh()
        self.bar.close()


def stage_decompose(ctx: Context, skip_done: bool = False) -> None:
    out = ctx.run_dir / STAGE_DIRS["decompose"]
    if not _start(ctx, "decompose", out, skip_done):
        return
    arch = _base_arch(ctx)
    base, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", arch)
    if ctx.lead:
        d = ctx.cfg.decompose
        start = time.perf_counter()
        bar = _LayerBar(ctx)
        try:
            model = decompose(base, group_sizes=d.group_sizes, skip=d.skip, nested=d.nested, progress=bar, **d.btd)
        finally:
            bar.close()
        ctx.log(f"[decompose] {len(gross_layers(model))} layers in {time.perf_counter() - start:.1f}s; space {search_space(model)}")
        info = _stage_info(ctx, "decompose")
        info["seconds"] = round(time.perf_counter() - start, 3)
        save_model(out / MODEL, model, make_arch(arch["model"], arch["kwargs"], model), info, sidecar=out / ARCH)
    ctx.barrier()


def stage_reconstruct(ctx: Context, skip_done: bool = False, root: Path | None = None, fixed: bool = False) -> None:
    root = root or ctx.run_dir
    out = root / STAGE_DIRS["reconstruct"]
    if not _start(ctx, "reconstruct", out, skip_done, ("fixed",) if fixed else None):
        return
    arch = _base_arch(ctx)
    original, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", arch)
    model, meta = _load(ctx, root / STAGE_DIRS["decompose"] / MODEL, "decompose", arch)
    cfg = ctx.cfg.fixed.reconstruct if fixed else ctx.cfg.reconstruct
    ctx.log(f"[reconstruct] {out}: {_epochs(cfg.epochs)}")
    history = reconstruct(model, original, ctx.splits(), cfg, arch=meta["arch"], **ctx.loop_options(out))
    _finish(ctx, out, model, meta["arch"], _stage_info(ctx, "reconstruct", history))


def stage_finetune(ctx: Context, skip_done: bool = False, root: Path | None = None, fixed: bool = False) -> None:
    root = root or ctx.run_dir
    out = root / STAGE_DIRS["finetune"]
    if not _start(ctx, "finetune", out, skip_done, ("fixed",) if fixed else None):
        return
    arch = _base_arch(ctx)
    model, meta = _load(ctx, root / STAGE_DIRS["reconstruct"] / MODEL, "reconstruct", arch)
    cfg = ctx.cfg.fixed.finetune if fixed else ctx.cfg.finetune
    ctx.log(f"[finetune] {out}: {_epochs(cfg.epochs)}, alpha {cfg.alpha:g}")
    history = finetune(model, ctx.splits(), cfg, arch=meta["arch"], **ctx.loop_options(out))
    _finish(ctx, out, model, meta["arch"], _stage_info(ctx, "finetune", history))


def _named_config(ctx: Context, config: tuple[int, ...] | dict[str, int]) -> dict[str, int]:
    if isinstance(config, dict):
        return config
    path = ctx.run_dir / STAGE_DIRS["decompose"] / MODEL
    if not path.is_file():
        raise StageError(f"--config {format_config(config)} gives sizes by position, which needs {path}; run `gross decompose` first or name the layers (conv2=2,...)")
    names = [spec["name"] for spec in read_meta(path)["arch"]["layers"]]
    if len(names) != len(config):
        raise StageError(f"--config {format_config(config)} has {len(config)} sizes but the decomposed network has {len(names)} layers ({', '.join(names)})")
    return dict(zip(names, config))


def stage_fixed(ctx: Context, config: tuple[int, ...] | dict[str, int], skip_done: bool = True) -> Path:
    """Decompose at one configuration, reconstruct and finetune it, in ``fixed/<config>/``."""
    named = _named_config(ctx, config)
    root = ctx.run_dir / "fixed" / format_config(named.values())
    out = root / STAGE_DIRS["decompose"]
    if _start(ctx, "decompose", out, skip_done=True):
        arch = _base_arch(ctx)
        base, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", arch)
        if ctx.lead:
            ctx.log(f"[fixed] {root}: {named}")
            bar = _LayerBar(ctx)
            try:
                model = decompose_fixed(base, named, progress=bar, **ctx.cfg.decompose.btd)
            finally:
                bar.close()
            save_model(out / MODEL, model, make_arch(arch["model"], arch["kwargs"], model), _stage_info(ctx, "decompose"), sidecar=out / ARCH)
        ctx.barrier()
    stage_reconstruct(ctx, skip_done=skip_done, root=root, fixed=True)
    stage_finetune(ctx, skip_done=skip_done, root=root, fixed=True)
    return root


# ---------------------------------------------------------------------------------------------
# Scoring configurations (stands in for the search)


@dataclass
class Row:
    label: str
    config: tuple[int, ...] | None
    accuracy: float
    loss: float
    macs: int


def _uniform_configs(space: Sequence[Sequence[int]]) -> list[tuple[str, tuple[int, ...]]]:
    common = sorted(set(space[0]).intersection(*space[1:]))
    out = [(f"uniform {s}", tuple(s for _ in space)) for s in common]
    largest = tuple(sizes[-1] for sizes in space)
    if largest not in [c for _, c in out]:
        out.append(("largest", largest))
    return out


def _random_configs(model: torch.nn.Module, count: int, seed: int, exclude: set) -> list[tuple[int, ...]]:
    space = search_space(model)
    total = 1
    for sizes in space:
        total *= len(sizes)
    count = min(count, total - len(exclude))
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[int, ...]] = []
    seen = set(exclude)
    tries = 0
    while len(out) < count and tries < 100 * max(count, 1):
        tries += 1
        config = sample_config(model, 0.0, gen)
        if config not in seen:
            seen.add(config)
            out.append(config)
    return out


def select_configurations(
    ctx: Context,
    model: torch.nn.Module,
    explicit: Sequence[tuple[int, ...] | dict[str, int]] = (),
    uniform: bool | None = None,
    samples: int | None = None,
) -> list[tuple[str, tuple[int, ...]]]:
    """The configurations to score: explicit ones, the uniform ones, and a seeded random sample.

    This is where the search plugs in: until then ``gross run`` scores these and prints them.
    """
    ev = ctx.cfg.evaluate
    uniform = ev.uniform if uniform is None else uniform
    samples = ev.samples if samples is None else samples
    names = [n for n, _ in gross_layers(model)]
    chosen: list[tuple[str, tuple[int, ...]]] = []
    for config in explicit:
        if isinstance(config, dict):
            unknown = sorted(set(config) - set(names))
            if unknown:
                raise StageError(f"--config names {unknown}, which are not GroSS layers; they are {names}")
            current = dict(zip(names, (sizes[-1] for sizes in search_space(model))))
            current.update(config)
            config = tuple(current[n] for n in names)
        chosen.append(("given", tuple(config)))
    if uniform:
        chosen += _uniform_configs(search_space(model))
    if samples:
        chosen += [("random", c) for c in _random_configs(model, samples, ev.seed, {c for _, c in chosen})]
    return chosen


def score_configurations(ctx: Context, model: torch.nn.Module, configs: Sequence[tuple[str, tuple[int, ...]]], split: str) -> list[Row]:
    data = getattr(ctx.splits(), split)
    if len(data) == 0:
        raise StageError(f"the {split} split is empty; set data.val_size to cut a validation split")
    batches = prepare_batches(data, ctx.cfg.data.eval_batch_size, ctx.device, ctx.cfg.channels_last)
    shape = tuple(data.images.shape[1:])
    rows = []
    if not gross_layers(model):
        r = evaluate(model, batches)
        return [Row("network", None, r.accuracy, r.loss, count_macs(model, shape).total)]
    table = macs_table(model, shape)
    space = search_space(model)
    calibration = _calibration(ctx, ctx.cfg.evaluate.recalibrate)
    saved_bn = batchnorm_state(model)
    for label, config in tqdm(configs, desc=f"evaluate ({split})", unit="config", leave=False,
                              disable=not (ctx.progress and ctx.lead), dynamic_ncols=True):
        if len(config) != len(space):
            raise StageError(f"configuration {format_config(config)} has {len(config)} sizes; the network has {len(space)} GroSS layers")
        for size, sizes, (name, _) in zip(config, space, gross_layers(model)):
            if size not in sizes:
                raise StageError(f"group size {size} is not valid for {name}; choose from {list(sizes)}")
        if calibration is not None:
            set_config(model, config)
            recalibrate_batchnorm(model, calibration)
        r = evaluate(model, batches, config)
        rows.append(Row(label, config, r.accuracy, r.loss, table.cost(config)))
    load_batchnorm_state(model, saved_bn)
    return rows


def format_table(rows: Sequence[Row], split: str) -> str:
    head = ("configuration", f"{split} acc %", f"{split} loss", "MACs (M)", "")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r.macs, -r.accuracy)):
        config = format_config(r.config) if r.config is not None else "-"
        lines.append((config, f"{100 * r.accuracy:.2f}", f"{r.loss:.4f}", f"{r.macs / 1e6:.3f}", r.label))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:4], widths[1:4])] + [line[4]]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths[:4]))
    return "\n".join(out)


def _rows_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["config", "label", "accuracy", "loss", "macs"])
    for r in rows:
        writer.writerow([format_config(r.config) if r.config else "", r.label, f"{r.accuracy:.6f}", f"{r.loss:.6f}", r.macs])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Search, latency, export, report

SEARCH_DIR = "search"
EXPORT_DIR = "export"
REPORT = "report.md"


def _on_lead(ctx: Context, fn: Any) -> Any:
    """``fn()`` on process 0, its result (or its error, as a StageError) handed to every process."""
    if ctx.world == 1:
        return fn()
    box: list[Any] = [None]
    if ctx.lead:
        try:
            box[0] = ("ok", fn())
        except USER_ERRORS as err:
            box[0] = ("error", _one_line(err))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise StageError(value)
    return value


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise StageError(f"{path} is not valid JSON; delete it and rerun") from None
    if not isinstance(data, dict):
        raise StageError(f"{path} is not a JSON object; delete it and rerun")
    return data


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def _gross_model(ctx: Context) -> tuple[torch.nn.Module, dict]:
    """The finetuned GroSS network (``gross/model.safetensors``) on the context's device."""
    return _load(ctx, ctx.run_dir / STAGE_DIRS["finetune"] / MODEL, "finetune", _base_arch(ctx))


def _gross_arch(ctx: Context) -> dict:
    """The GroSS network's architecture record, read without loading the model or the data."""
    path = ctx.run_dir / STAGE_DIRS["finetune"] / MODEL
    if not path.is_file():
        raise StageError(f"{path} is missing; run `gross finetune --name {ctx.cfg.name}` (or `gross run`) first")
    return read_meta(path)["arch"]


def _split_batches(ctx: Context, split: str) -> list:
    data = getattr(ctx.splits(), split)
    if len(data) == 0:
        hint = "set data.val_size to cut a validation split" if split == "val" else "the dataset has no test images"
        raise StageError(f"the {split} split is empty; {hint}")
    return prepare_batches(data, ctx.cfg.data.eval_batch_size, ctx.device, ctx.cfg.channels_last)


def _input_shape(ctx: Context) -> tuple[int, ...]:
    splits = ctx.splits()
    data = splits.val if len(splits.val) else splits.train
    return tuple(int(d) for d in data.images.shape[1:])


def _latency_path(ctx: Context) -> Path:
    path = Path(ctx.cfg.search.latency_table)
    return path if path.is_absolute() else ctx.run_dir / path


def _load_latency(path: Path, layers: Sequence[str], needed_by: str) -> LatencyTable:
    if not path.is_file():
        raise StageError(f"{path} is missing; run `gross latency` first ({needed_by} needs it)")
    try:
        table = LatencyTable.load(path)
    except (ValueError, OSError) as err:
        raise StageError(f"{path}: {_one_line(err)}; delete it and run `gross latency` again") from None
    if list(table.layers) != list(layers):
        raise StageError(f"{path} was measured for layers {list(table.layers)}, but the GroSS network has {list(layers)}; run `gross latency --force`")
    return table


def _fingerprint(ctx: Context) -> dict:
    """What the scores in search/ depend on: the GroSS weights and the validation split."""
    digest = hashlib.sha256()
    with open(ctx.run_dir / STAGE_DIRS["finetune"] / MODEL, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    d = ctx.cfg.data
    data = {"dataset": d.dataset, "val_size": d.val_size, "split_seed": d.split_seed, "limit": d.limit, "mean": d.mean, "std": d.std}
    fingerprint = {"model_sha256": digest.hexdigest(), "data": data}
    if ctx.cfg.search.recalibrate:  # absent otherwise, so that searches made before the setting existed stay valid
        fingerprint["recalibrate"] = ctx.cfg.search.recalibrate
    return fingerprint


def _calibration(ctx: Context, count: int) -> list[torch.Tensor] | None:
    if count <= 0:
        return None
    d = ctx.cfg.data
    return calibration_batches(ctx.splits().train, count, d.split_seed, d.eval_batch_size, ctx.device, ctx.cfg.channels_last, augmentation_for(d))


def _uniform_configs_of(space: Sequence[Sequence[int]]) -> list[tuple[str, tuple[int, ...]]]:
    """``("uniform G", config)`` for every group size G: each layer at its largest size <= G (the paper's rule)."""
    out: dict[tuple[int, ...], str] = {}
    for g in sorted(set().union(*map(set, space))):
        out.setdefault(uniform_config(space, g), f"uniform {g}")
    return [(label, config) for config, label in out.items()]


def _budget(budget: str | float | None) -> str | float | None:
    """search.budget as gross.search takes it: "none" (any case) means no limit."""
    if isinstance(budget, str) and budget.strip().lower() in ("none", "null", "inf", ""):
        return None
    return budget


def _strategy(ctx: Context, space: Sequence[Sequence[int]], cost: Any, limit: float) -> tuple[str, dict]:
    s = ctx.cfg.search
    strategy = s.strategy
    if strategy == "auto":
        fitting = sum(1 for _ in itertools.islice(feasible_configs(space, cost, limit), s.max_configs + 1))
        strategy = "exhaustive" if fitting <= s.max_configs else "beam"
        ctx.log(f"[search] {'at most' if strategy == 'exhaustive' else 'more than'} {s.max_configs} configurations fit the budget: {strategy} search")
    options = {
        "exhaustive": {"max_configs": s.max_configs},
        "beam": {"width": s.beam_width},
        "evolution": {"population": s.population, "max_evaluations": s.max_evaluations, "seed": s.seed},
    }[strategy]
    return strategy, options


def _csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def stage_search(ctx: Context, skip_done: bool = False) -> bool:
    """Search the finetuned space on the validation split into ``search/``; every process takes part.

    Returns whether it searched (False: skipped as done). ``results.csv`` is appended as
    configurations are scored, so running it again continues an interrupted search, and a
    finished one with other settings (another budget) reuses every score already there.
    """
    out = ctx.run_dir / SEARCH_DIR
    s = ctx.cfg.search
    settings = config_to_dict(s)
    model, _ = _gross_model(ctx)

    def check() -> bool:
        source = _read_json(out / "source.json")
        fingerprint = _fingerprint(ctx)
        stale = (source or {}).get("fingerprint") != fingerprint and (out / "results.csv").is_file()
        if stale and not ctx.force:
            raise StageError(f"{out} holds the search of another GroSS model, validation split or BatchNorm recalibration; pass --force to start the search over (or delete {out})")
        if stale or ctx.force:
            for name in ("results.csv", "best.json", "uniform.csv", "source.json"):
                (out / name).unlink(missing_ok=True)
            return True
        best = _read_json(out / "best.json")
        if skip_done and best and best.get("finished") and (out / "uniform.csv").is_file():
            ctx.log(f"[search] done already: {out / 'best.json'}")
            if source and source.get("settings") != settings:
                changed = sorted(k for k in settings if source["settings"].get(k) != settings[k])
                ctx.log(f"warning: {out} was made with other search settings ({', '.join(changed)}); it is reused as it is "
                        f"(run `gross search --name {ctx.cfg.name}` to search again; scores already there are reused)")
            return False
        return True

    if not _on_lead(ctx, check):
        return False
    space = search_space(model)
    names = [name for name, _ in gross_layers(model)]
    shape = _input_shape(ctx)
    val = _split_batches(ctx, "val")
    test = _split_batches(ctx, "test") if s.test else None
    table = _on_lead(ctx, lambda: _load_latency(_latency_path(ctx), names, "search.cost: latency")) if s.cost == "latency" else None
    cost = AdditiveCost.from_latency_table(table) if table is not None else macs_cost(model, shape)
    budget = _budget(s.budget)
    limit = resolve_budget(budget, space, cost)
    strategy, options = _strategy(ctx, space, cost, limit)
    unit = "ms" if table is not None else "M MACs"
    shown = limit if table is not None else limit / 1e6
    limit_text = f"budget {budget} = {shown:.4g} {unit}" if budget is not None else f"no budget ({'ms' if table is not None else 'MACs'})"
    ctx.log(f"[search] {out}: {strategy} over {math.prod(len(x) for x in space)} configurations of {', '.join(names)}; "
            f"{limit_text}; scored on the val split{' (and test, reported only)' if s.test else ''}")
    if ctx.lead:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "source.json", {"fingerprint": _fingerprint(ctx), "settings": settings, "strategy": strategy, "options": options})
    ctx.barrier()
    # The uniform configurations (the paper's baselines) are scored whether or not they fit the
    # budget, and chosen when one fits and beats the strategy's pick.
    uniform = _uniform_configs_of(space)
    result = run_search(
        model, val, strategy=strategy, budget=budget, cost=table, test_data=test, out_dir=out,
        input_shape=shape, calibration=_calibration(ctx, s.recalibrate), progress=ctx.progress and ctx.lead,
        extra=[c for _, c in uniform], **options,
    )
    if ctx.lead:
        records = {r.config: r for r in result.records}
        rows = [
            {
                "config": format_config(c), "label": label, "cost": repr(records[c].cost), "macs": records[c].macs,
                "params": records[c].params, "val_accuracy": repr(records[c].val_accuracy), "val_loss": repr(records[c].val_loss),
                "test_accuracy": "" if records[c].test_accuracy is None else repr(records[c].test_accuracy),
            }
            for label, c in uniform
        ]
        atomic_write(out / "uniform.csv", _csv_text(rows, ["config", "label", "cost", "macs", "params", "val_accuracy", "val_loss", "test_accuracy"]))
        ctx.log(f"[search] {result.evaluations} configurations ({result.evaluated_now} scored now) in {result.seconds:.1f}s; "
                f"best {format_config(result.best.config)}: val acc {100 * result.best.val_accuracy:.2f}%, {result.best.macs / 1e6:.3f} M MACs")
    ctx.barrier()
    return True


def format_latency(table: LatencyTable) -> str:
    choices = sorted({k for options in table.options for k in options if k != DENSE}) + ([DENSE] if table.has_dense else [])
    head = ["layer", *[str(c) for c in choices]]
    lines = [[name, *[f"{options[c]:.4f}" if c in options else "" for c in choices]] for name, options in zip(table.layers, table.options)]
    lines.append(["rest", f"{table.rest:.4f}"] + [""] * (len(choices) - 1))
    meta = table.meta
    title = f"ms per layer and group size on {meta.get('device_name', meta.get('device', '?'))}, batch {meta.get('batch_size', '?')}:"
    return title + "\n" + _text_table(head, lines)


def _measure_latency(ctx: Context, path: Path, model: torch.nn.Module) -> LatencyTable:
    lat = ctx.cfg.latency
    ctx.log(f"[latency] {path}: timing {len(gross_layers(model))} layers at every group size on {ctx.device}, batch {lat.batch_size}")
    table = latency_table(model, _input_shape(ctx), batch_size=lat.batch_size, device=ctx.device, repeats=lat.repeats)
    atomic_write(path, json.dumps(table.to_dict(), indent=1) + "\n")
    return table


def stage_latency(ctx: Context, path: Path | None = None) -> LatencyTable | None:
    """Time every GroSS layer at every group size (and dense) on this device, into ``latency/table.json``."""
    path = path or _latency_path(ctx)
    if path.is_file() and not ctx.force:
        raise StageError(f"{path} exists; pass --force to measure it again")
    table = None
    if ctx.lead:
        table = _measure_latency(ctx, path, _gross_model(ctx)[0])
    ctx.barrier()
    return table


def _named_choices(names: Sequence[str], space: Sequence[Sequence[int]], config: tuple[int, ...] | dict[str, int], what: str) -> tuple[int, ...]:
    """A configuration for export as a tuple in module order (0: dense); a dict fills the rest with the largest sizes."""
    if isinstance(config, dict):
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise StageError(f"{what} names {', '.join(unknown)}, which are not GroSS layers; they are {', '.join(names)}")
        config = tuple(config.get(n, sizes[-1]) for n, sizes in zip(names, space))
    if len(config) != len(names):
        raise StageError(f"{what} {format_config(config)} has {len(config)} sizes; the network has {len(names)} GroSS layers ({', '.join(names)})")
    for size, sizes, name in zip(config, space, names):
        if size != 0 and size not in sizes:
            raise StageError(f"{what} {format_config(config)}: group size {size} is not valid for {name}; choose from {list(sizes)} or 0 (the original dense conv)")
    return tuple(config)


def _best_config(ctx: Context, names: Sequence[str]) -> tuple[int, ...]:
    path = ctx.run_dir / SEARCH_DIR / "best.json"
    best = _read_json(path)
    if best is None:
        raise StageError(f"{path} is missing; run `gross search --name {ctx.cfg.name}` first or pass --config")
    if not best.get("finished") or not best.get("best"):
        raise StageError(f"the search in {path.parent} has not finished; run `gross search --name {ctx.cfg.name}` to finish it or pass --config")
    if list(best.get("layers", [])) != list(names):
        raise StageError(f"{path} is for layers {best.get('layers')}, but the GroSS network has {list(names)}; run `gross search --force`")
    return tuple(int(s) for s in best["best"]["config"])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference, and the tolerance it is held to (relative to the outputs' scale)."""
    diff = float((a.float() - b.float()).abs().max())
    return diff, 1e-3 * max(1.0, float(b.float().abs().max()))


def _installed(module: str) -> bool:
    """Whether an optional dependency can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _onnx_check(exported: torch.nn.Module, path: Path, x: torch.Tensor, opset: int) -> dict:
    """Write net.onnx and compare onnxruntime's output with torch's; skipped without the extras."""
    missing = [m for m in ("onnx", "onnxscript") if not _installed(m)]
    if missing:
        return {"written": False, "note": f"net.onnx skipped: {' and '.join(missing)} not installed (pip install 'gross[export]')"}
    exported = copy.deepcopy(exported).to("cpu").float().eval()  # ONNX is device-free; onnxruntime checks on the CPU
    x = x.detach().to("cpu", torch.float32).contiguous()
    noisy = logging.getLogger("torch.onnx")
    level = noisy.level
    noisy.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(exported, path, tuple(x.shape[1:]), opset=opset)
    except Exception as err:  # the exporter raises many kinds
        raise StageError(f"ONNX export failed ({type(err).__name__}: {_one_line(err)[:300]}); pass --no-onnx to export without it") from None
    finally:
        noisy.setLevel(level)
    info: dict[str, Any] = {"written": True, "file": path.name, "opset": opset}
    if not _installed("onnxruntime"):
        info["note"] = "net.onnx not checked: onnxruntime not installed (pip install 'gross[export]')"
        return info
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = exported(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    diff, tol = _max_diff(got, ref)
    if not diff <= tol:
        raise StageError(f"net.onnx gives outputs up to {diff:.3g} away from torch's (tolerance {tol:.3g}); pass --no-onnx to export without it")
    info.update(checked=True, max_abs_diff=diff, note=f"net.onnx checked with onnxruntime {onnxruntime.__version__}: max |diff| {diff:.2g}")
    return info


def stage_export(ctx: Context, config: tuple[int, ...] | dict[str, int] | None = None, best: bool = False, skip_done: bool = False) -> dict | None:
    """The plain network at one configuration into ``export/`` (process 0); returns its summary."""
    out = ctx.run_dir / EXPORT_DIR
    summary_path = out / "summary.json"
    if config is not None:  # a bad --config is the first thing to hear about
        layers = _gross_arch(ctx)["layers"]
        config = _named_choices([spec["name"] for spec in layers], [spec["group_sizes"] for spec in layers], config, "--config")
    if summary_path.is_file() and not ctx.force:
        if skip_done:
            summary = _read_json(summary_path)
            ctx.log(f"[export] done already: {out}")
            if summary and summary.get("source") == "search" and (ctx.run_dir / SEARCH_DIR / "best.json").is_file():
                names = summary.get("layers", [])
                try:
                    chosen = _best_config(ctx, names)
                except StageError:
                    chosen = None
                if chosen is not None and list(chosen) != summary.get("config"):
                    ctx.log(f"warning: {out} holds {format_config(summary['config'])} but the search now chose {format_config(chosen)}; "
                            f"it is kept (run `gross export --name {ctx.cfg.name} --best --force` to replace it)")
            return summary
        raise StageError(f"{out} exists; pass --force to replace it")
    summary = None
    if ctx.lead:
        summary = _export(ctx, config, best)
    ctx.barrier()
    return summary


def _export_into(ctx: Context, tmp: Path, model: torch.nn.Module, arch: dict, base: torch.nn.Module, chosen: tuple[int, ...],
                 source: str, fuse: Any, table: LatencyTable | None, shape: tuple[int, ...], val: list) -> dict:
    """Write, reload, check, measure and summarise the exported network in ``tmp``."""
    cfg = ctx.cfg.export
    names = [name for name, _ in gross_layers(model)]
    save_export(model, tmp, arch={"name": arch["model"], "kwargs": arch["kwargs"]}, config=chosen, fuse=fuse, latency=table, original=base)
    exported = load_export(tmp).to(ctx.device)
    record = {name: info for name, info in getattr(exported, "gross_export").items()}
    fused = [name for name, info in record.items() if info["fused"]]
    x = val[0][0][:64]
    check: dict[str, Any] = {}
    if 0 not in chosen:
        with torch.inference_mode():
            saved = get_config(model)
            set_config(model, chosen)
            try:
                ref = model(x)
            finally:
                set_config(model, saved)
            diff, tol = _max_diff(exported(x), ref)
        if not diff <= tol:
            raise StageError(f"the exported network's outputs differ from the GroSS network's at {format_config(chosen)} by {diff:.3g} (tolerance {tol:.3g}); this is a bug in gross.export")
        check = {"max_abs_diff_vs_gross": diff}
    original_eval, exported_eval = evaluate(base, val), evaluate(exported, val)
    # Reported only: the configuration was chosen on val before the test split was looked at.
    test = _split_batches(ctx, "test") if len(ctx.splits().test) else None
    test_accuracy = {"original": evaluate(base, test).accuracy, "exported": evaluate(exported, test).accuracy} if test else None
    lat = ctx.cfg.latency
    ctx.log(f"[export] timing the original and the exported network on {ctx.device}, batch {lat.batch_size}")
    ms = compare_latency({"original": base, "exported": exported}, shape, batch_size=lat.batch_size, device=ctx.device, repeats=lat.repeats)
    onnx_info = _onnx_check(exported, tmp / "net.onnx", x, cfg.opset) if cfg.onnx else {"written": False, "note": "net.onnx not written (export.onnx: false)"}
    summary = {
        "config": list(chosen),
        "layers": names,
        "source": source,
        "fuse": cfg.fuse,
        "fused": fused,
        "input_shape": list(shape),
        "macs": {"original": count_macs(base, shape).total, "exported": count_macs(exported, shape).total},
        "params": {"original": sum(p.numel() for p in base.parameters()), "exported": sum(p.numel() for p in exported.parameters())},
        "val_accuracy": {"original": original_eval.accuracy, "exported": exported_eval.accuracy},
        "test_accuracy": test_accuracy,
        "latency_ms": {"original": ms["original"], "exported": ms["exported"]},
        "latency_setup": {"device": str(ctx.device), "batch_size": lat.batch_size, "repeats": lat.repeats},
        **check,
        "onnx": onnx_info,
        "files": sorted(p.name for p in tmp.iterdir()) + ["summary.json"],
    }
    _write_json(tmp / "summary.json", summary)
    return summary


def _export(ctx: Context, config: tuple[int, ...] | dict[str, int] | None, best: bool) -> dict:
    cfg = ctx.cfg.export
    model, meta = _gross_model(ctx)
    base, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", _base_arch(ctx))
    names = [name for name, _ in gross_layers(model)]
    space = search_space(model)
    if config is not None:
        chosen, source = _named_choices(names, space, config, "--config"), "given"
    elif best or cfg.config is None:
        chosen, source = _best_config(ctx, names), "search"
    else:
        chosen, source = _named_choices(names, space, tuple(cfg.config), "export.config"), "export.config"
    table = None
    if cfg.fuse == "auto":
        path = _latency_path(ctx)
        if path.is_file():
            table = _load_latency(path, names, "export.fuse: auto")
            if table.meta.get("batch_size") != ctx.cfg.latency.batch_size or table.meta.get("device") != str(ctx.device):
                ctx.log(f"warning: {path} was measured on {table.meta.get('device')} at batch {table.meta.get('batch_size')}; "
                        f"fusing by it for {ctx.device} at batch {ctx.cfg.latency.batch_size} (run `gross latency --force` to measure again)")
        else:
            table = _measure_latency(ctx, path, model)
    fuse: Any = {"auto": "auto", "none": False, "all": True}[cfg.fuse]
    shape = _input_shape(ctx)
    val = _split_batches(ctx, "val")
    tmp = ctx.run_dir / f".{EXPORT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _export_into(ctx, tmp, model, meta["arch"], base, chosen, source, fuse, table, shape, val)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = ctx.run_dir / f".{EXPORT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out_exists := (ctx.run_dir / EXPORT_DIR).exists():
        os.replace(ctx.run_dir / EXPORT_DIR, old)
    os.replace(tmp, ctx.run_dir / EXPORT_DIR)
    if out_exists:
        shutil.rmtree(old, ignore_errors=True)
    return summary


def _ratio(original: float, exported: float, better: str, worse: str) -> str:
    if not original or not exported:
        return ""
    return f"{original / exported:.2f}x {better}" if original >= exported else f"{exported / original:.2f}x {worse}"


def format_export(ctx: Context, summary: dict) -> str:
    out = ctx.run_dir / EXPORT_DIR
    setup = summary["latency_setup"]
    m, p, a, ms = summary["macs"], summary["params"], summary["val_accuracy"], summary["latency_ms"]
    fused = f"; fused into one dense conv: {', '.join(summary['fused'])}" if summary["fused"] else ""
    source = {"search": "the search's best", "given": "--config", "export.config": "export.config"}.get(summary["source"], summary["source"])
    lines = [["val acc %", f"{100 * a['original']:.2f}", f"{100 * a['exported']:.2f}", ""]]
    if summary.get("test_accuracy"):
        t = summary["test_accuracy"]
        lines.append(["test acc %", f"{100 * t['original']:.2f}", f"{100 * t['exported']:.2f}", "(reported only)"])
    lines += [
        ["MACs (M)", f"{m['original'] / 1e6:.3f}", f"{m['exported'] / 1e6:.3f}", _ratio(m["original"], m["exported"], "fewer", "more")],
        ["params (k)", f"{p['original'] / 1e3:.1f}", f"{p['exported'] / 1e3:.1f}", _ratio(p["original"], p["exported"], "fewer", "more")],
        [f"latency (ms, {setup['device']}, batch {setup['batch_size']})", f"{ms['original']:.3f}", f"{ms['exported']:.3f}",
         _ratio(ms["original"], ms["exported"], "faster", "slower")],
    ]
    text = [f"exported {format_config(summary['config'])} ({source}{fused}) -> {out}",
            _text_table(["", "original", "exported", ""], lines, left={0, 3})]
    files = ", ".join(f for f in summary["files"] if f != "summary.json")
    text.append(f"files: {out}/{{{files}}}")
    if summary["onnx"].get("note"):
        text.append(summary["onnx"]["note"])
    if summary["fuse"] == "none" and ms["exported"] > ms["original"]:
        text.append(f"tip: on {setup['device']} some bottlenecks are slower than the dense conv they replace; "
                    f"`gross export --name {ctx.cfg.name} --force --fuse auto` fuses those (same outputs, more MACs)")
    return "\n".join(text)


def _read_rows(path: Path) -> list[dict]:
    try:
        rows = read_results(path)
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: {_one_line(err)}") from None
    for row in rows:
        for key in [k for k, v in row.items() if v == ""]:
            del row[key]  # an empty test_accuracy: not measured
    return rows


def _search_results(ctx: Context) -> tuple[list[dict], dict[tuple, str], dict]:
    """Every scored configuration (results.csv, then the uniform ones), uniform labels, best.json."""
    folder = ctx.run_dir / SEARCH_DIR
    results = folder / "results.csv"
    if not results.is_file():
        raise StageError(f"{results} is missing; run `gross search --name {ctx.cfg.name}` (or `gross run`) first")
    rows = _read_rows(results)
    by_config = {r["config"]: r for r in rows}
    labels: dict[tuple, str] = {}
    if (folder / "uniform.csv").is_file():
        for row in _read_rows(folder / "uniform.csv"):
            labels[row["config"]] = str(row.pop("label"))
            if row["config"] not in by_config:
                by_config[row["config"]] = row
                rows.append(row)
    return rows, labels, _read_json(folder / "best.json") or {}


def _predicted_ms(ctx: Context, layers: Sequence[str]) -> LatencyTable | None:
    path = _latency_path(ctx)
    if not path.is_file():
        return None
    try:
        table = LatencyTable.load(path)
    except (ValueError, OSError):
        return None
    return table if list(table.layers) == list(layers) else None


def format_results(ctx: Context, export_summary: dict | None = None) -> str:
    """The Pareto front of val accuracy against MACs, the uniform configurations and the chosen one."""
    rows, labels, best = _search_results(ctx)
    chosen = tuple(best["best"]["config"]) if best.get("best") else None
    front = {r["config"] for r in pareto_front(rows, "macs", "val_accuracy")}
    shown = [r for r in rows if r["config"] in front or r["config"] in labels or r["config"] == chosen]
    table = _predicted_ms(ctx, best.get("layers", []))
    test = any("test_accuracy" in r for r in shown)
    head = ["configuration", "val acc %"] + (["test acc %"] if test else []) + ["MACs (M)", "params (k)"] + (["pred. ms"] if table else []) + [""]
    lines = []
    for r in sorted(shown, key=lambda r: (r["macs"], -r["val_accuracy"])):
        notes = []
        if r["config"] == chosen:
            budget = best.get("budget")
            notes.append(f"chosen ({best.get('strategy')}, {'no budget' if budget is None else f'budget {budget}'})")
        if r["config"] in front:
            notes.append("pareto")
        if r["config"] in labels:
            notes.append(labels[r["config"]])
        line = [format_config(r["config"]), f"{100 * r['val_accuracy']:.2f}"]
        if test:
            line.append(f"{100 * r['test_accuracy']:.2f}" if "test_accuracy" in r else "")
        line += [f"{r['macs'] / 1e6:.3f}", f"{r['params'] / 1e3:.1f}" if "params" in r else ""]
        if table:
            line.append(f"{table.cost(r['config']):.3f}")
        lines.append(line + [", ".join(notes)])
    if export_summary:
        e = export_summary
        line = ["original", f"{100 * e['val_accuracy']['original']:.2f}"] + ([""] if test else [])
        line += [f"{e['macs']['original'] / 1e6:.3f}", f"{e['params']['original'] / 1e3:.1f}"] + ([""] if table else [])
        lines.append(line + ["the network before decomposition"])
    title = (f"{len(rows)} configurations scored on the val split; {len(front)} on the Pareto front of val accuracy "
             f"against MACs{'; pred. ms: the latency table' + chr(39) + 's prediction' if table else ''}:")
    return title + "\n" + _text_table(head, lines, left={0, len(head) - 1})


def stage_report(ctx: Context, skip_done: bool = False) -> Path | None:
    """``report.md`` and its plots in the run folder, from ``search/`` (and ``export/``) (process 0)."""
    path = ctx.run_dir / REPORT
    inputs = [ctx.run_dir / SEARCH_DIR / n for n in ("results.csv", "best.json", "uniform.csv")] + [ctx.run_dir / EXPORT_DIR / "summary.json"]
    if skip_done and path.is_file() and all(path.stat().st_mtime_ns >= p.stat().st_mtime_ns for p in inputs if p.is_file()):
        ctx.log(f"[report] done already: {path}")
        return path
    if ctx.lead:
        rows, labels, best = _search_results(ctx)
        arch = _gross_arch(ctx)
        names = [spec["name"] for spec in arch["layers"]]
        space = [tuple(spec["group_sizes"]) for spec in arch["layers"]]
        table = _predicted_ms(ctx, names)
        for row in rows:
            if table is not None:
                row["latency_ms"] = table.cost(row["config"])
        by_config = {r["config"]: r for r in rows}
        budgets = {}
        for g in (4, 16):
            config = uniform_config(space, g)
            if config in by_config:
                budgets[f"uniform:{g}"] = by_config[config]["macs"]
        summary = _read_json(ctx.run_dir / EXPORT_DIR / "summary.json")
        latency = None
        if summary:
            latency = {"original": summary["latency_ms"]["original"], f"exported {format_config(summary['config'])}": summary["latency_ms"]["exported"]}
        title = f"GroSS search: {ctx.cfg.name} ({arch['model']} on {Path(str(ctx.cfg.data.dataset)).name})"
        write_report(rows, ctx.run_dir, uniform={label: c for c, label in labels.items()}, budgets=budgets or None,
                     latency=latency, layer_names=names, title=title)
        ctx.log(f"[report] wrote {path} and its plots")
    ctx.barrier()
    return path


def _text_table(head: Sequence[str], lines: Sequence[Sequence[str]], left: set[int] = frozenset({0})) -> str:
    """Columns padded to their widest cell: those in ``left`` left-aligned, the others right-aligned."""
    rows = [list(head), *[list(line) for line in lines]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]

    def cells(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join(("-" if h else " ") * w for h, w in zip(head, widths)).rstrip()
    return "\n".join([cells(rows[0]), rule, *map(cells, rows[1:])])


# ---------------------------------------------------------------------------------------------
# Command line


def _common(parser: argparse.ArgumentParser, stage: bool = True, force: bool = True, force_help: str | None = None) -> None:
    g = parser.add_argument_group("configuration")
    g.add_argument("--config-file", "-c", metavar="YAML", help="configuration file (default: the run folder's config.yaml when it exists)")
    g.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. train.epochs=3 or decompose.skip=[conv1] (repeatable; values are YAML)")
    g.add_argument("--name", "-n", help="run name: the run folder is RUNS/NAME (same as --set name=NAME)")
    g.add_argument("--runs", help="parent folder of run folders (default runs)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    g.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    if stage:
        g.add_argument("--resume", action="store_true", help="continue an interrupted stage from its checkpoint.safetensors")
        g.add_argument("--restart", action="store_true", help="start an interrupted stage over, discarding its checkpoint")
    if force:
        g.add_argument("--force", action="store_true", help=force_help or "redo the stage even if its output exists (replaced only on success)")


def _fields_help() -> str:
    import dataclasses

    lines = []
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            names = ", ".join(g.name for g in dataclasses.fields(value))
            lines.append(f"    {f.name}: {names}")
    top = ", ".join(f.name for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(Config(), f.name)))
    return f"    (top level): {top}\n" + "\n".join(lines)


SET_HELP = f"""\
settings:
  Resolved from the defaults (the quick run on digits), then the recipe (recipe=authors: the
  released code's CIFAR recipe; recipe=paper: the paper's literal text), then the YAML file, then
  --set KEY=VALUE overrides (values are YAML), e.g.

    gross run --set train.epochs=3 --set decompose.skip=[conv1]
    gross run -c experiments/paper-cifar10.yaml --set recipe=paper --name paper-text
    gross run --print-config                  # the resolved settings, with every key

  Keys (each commented in gross/config.py; unknown keys are errors):
{_fields_help()}

  A killed run continues with the same command plus --resume (finished stages are skipped).
"""

SEARCH_HELP = """search:
  The finetuned GroSS network (gross/) is scored at many configurations on the validation
  split; the best within the budget is chosen (the test split is never used to choose; --test
  only adds its accuracy to the table). Every scored configuration is appended to
  search/results.csv as it goes, so running the command again continues an interrupted search,
  and a search with other settings (another budget or strategy) takes the scores already there.
  search/best.json is the summary (its "finished" says whether the search ended), and
  search/uniform.csv scores the uniform configurations (each layer at the largest group size
  <= G), the paper's baselines, whether or not they fit the budget.

  Strategies: exhaustive scores every configuration within the budget (the paper's search);
  beam extends the best --beam-width partial configurations layer by layer; evolution breeds
  --max-evaluations configurations from a population (seeded by --seed). auto (the default)
  counts the configurations that fit the budget first: exhaustive when at most
  search.max_configs (5000) fit, else beam.

  Cost: MACs of one image, or with --latency the predicted ms of a latency table measured by
  `gross latency` on the device the network will run on.
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gross", description="GroSS: group-size series decomposition, whole search-space training, search and export.",
        epilog="Run `gross COMMAND --help` for a command's options and settings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gross {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("run", help="the whole pipeline: train, decompose, reconstruct, finetune, search, export, report",
                       description=_wrap("Run every stage in order, skipping those whose output exists (so a killed run continues "
                       "where it stopped): train (base/), decompose, reconstruct, finetune (gross/), search (search/: the "
                       "search.* settings; by default every configuration within the MACs of uniform group size 16 when at most "
                       "5000 fit, else a beam search), export of the chosen configuration (export/: the export.* settings, with "
                       "ONNX), report (report.md and plots). Prints the Pareto front, the uniform configurations and the chosen "
                       "one with their val accuracy and MACs, then where the exported files are. With no arguments: the quick run "
                       "on the embedded digits dataset."), epilog=SET_HELP, formatter_class=fmt)
    _common(p, force=False)
    for name, helptext in [
        ("train", "base training of the original network (-> base/)"),
        ("decompose", "decompose the trained network into GroSS layers (-> decompose/)"),
        ("reconstruct", "response reconstruction of the GroSS layers (-> reconstruct/)"),
        ("finetune", "finetune the whole space with sampled group sizes (-> gross/)"),
    ]:
        p = sub.add_parser(name, help=helptext, description=helptext, epilog=SET_HELP, formatter_class=fmt)
        _common(p)

    p = sub.add_parser("search", help="find the best configuration within a budget (-> search/)",
                       description=_wrap("Search the finetuned GroSS network's configurations for the best val accuracy within a "
                       "budget; writes search/results.csv, best.json and uniform.csv and prints the Pareto front."),
                       epilog=SEARCH_HELP + "\n" + SET_HELP, formatter_class=fmt)
    _common(p, stage=False, force_help="start the search over, discarding the scores in search/")
    g = p.add_argument_group("search")
    g.add_argument("--strategy", choices=["auto", "exhaustive", "beam", "evolution"], help="default search.strategy (auto)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--budget", metavar="B", help="largest cost: uniform:G (the cost of every layer at group size G; default "
                        "uniform:16), a number in the cost's units, or none")
    budget.add_argument("--max-macs", type=float, metavar="N", help="largest MACs of one image (cost MACs)")
    budget.add_argument("--max-ms", type=float, metavar="X", help="largest predicted latency in ms (cost latency; needs the table)")
    g.add_argument("--latency", nargs="?", const="", metavar="TABLE.json", help="cost: predicted ms of a latency table "
                   "(default RUN/latency/table.json, written by `gross latency`) instead of MACs")
    g.add_argument("--test", action="store_true", help="also measure test accuracy (reported only; never used to choose)")
    g.add_argument("--beam-width", type=int, metavar="K", help="beam: configurations kept per layer (default 4)")
    g.add_argument("--max-evaluations", type=int, metavar="N", help="evolution: configurations scored (default 100)")
    g.add_argument("--seed", type=int, metavar="S", help="evolution: seed (default 0)")
    g.add_argument("--max-configs", type=int, metavar="N", help="exhaustive: most configurations scored (default 5000; auto: beam above it)")

    p = sub.add_parser("latency", help="latency table of the GroSS layers on this device (-> latency/table.json)",
                       description=_wrap("Time every GroSS layer of the finetuned network at every group size, as the three convs it "
                       "exports to, and as the original dense conv, plus the rest of the network, on the run's device (--device). "
                       "`gross search --latency` then searches under predicted latency, and export fuses by it."),
                       epilog=SET_HELP, formatter_class=fmt)
    _common(p, stage=False)
    p.add_argument("--batch-size", type=int, metavar="B", help="images per timed forward pass (default latency.batch_size, 1)")
    p.add_argument("--repeats", type=int, metavar="N", help="timed samples per candidate (default latency.repeats, 25)")
    p.add_argument("--out", type=Path, metavar="TABLE.json", help="write here (default search.latency_table: RUN/latency/table.json)")

    p = sub.add_parser("export", help="the plain network at one configuration (-> export/)",
                       description=_wrap("Export the finetuned GroSS network at one configuration as standard convs: "
                       "export/net.safetensors + net.json (load with gross.load), net.onnx (checked against torch with "
                       "onnxruntime when installed), summary.json. Prints MACs, parameters, val accuracy and measured latency of "
                       "the exported network against the original one."), epilog=SET_HELP, formatter_class=fmt)
    _common(p, stage=False)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", metavar="SIZES", help="2,32,64 (by position; 0: the original dense conv) or conv2=2,... "
                       "(other layers at their largest size)")
    which.add_argument("--best", action="store_true", help="the search's best, from search/best.json (the default unless export.config is set)")
    p.add_argument("--fuse", choices=["auto", "none", "all"], help="bottlenecks exported as one dense conv of the same outputs: none "
                   "(default export.fuse), auto (where the latency table says the dense conv is faster on this device; measured when "
                   "missing) or all")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=None, help="write net.onnx (default export.onnx, yes)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default export.opset, 18)")
    p.add_argument("--batch-size", type=int, metavar="B", help="batch size of the latency comparison (default latency.batch_size, 1)")

    p = sub.add_parser("report", help="report.md and plots of the search (and export)",
                       description=_wrap("Write RUN/report.md with pareto.png and front_group_sizes.png (latency.png with a latency "
                       "table): the Pareto front, the uniform configurations, the best within the MACs of uniform:4 and "
                       "uniform:16, and the exported network's measured latency against the original's when export/ exists."),
                       epilog=SET_HELP, formatter_class=fmt)
    _common(p, stage=False, force=False)

    p = sub.add_parser("fixed", help="train one configuration on its own (decompose, reconstruct, finetune)",
                       description=_wrap("Decompose the base network at one group size per layer, reconstruct and finetune it "
                       "with the fixed.* settings, into fixed/<config>/."), epilog=SET_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("--config", action="append", default=[], metavar="SIZES", help="2,32,64 (by position) or conv2=2,conv3=32,... (repeatable; default fixed.configs)")
    p.add_argument("--uniform", action="append", type=int, default=[], metavar="SIZE", help="the same group size in every layer (repeatable)")
    p = sub.add_parser("evaluate", help="accuracy and MACs of configurations of a trained model",
                       description=_wrap("Evaluate a stage's model (default the finetuned GroSS network) at configurations."),
                       epilog=SET_HELP, formatter_class=fmt)
    _common(p, stage=False, force=False)
    p.add_argument("--stage", default="finetune", choices=["train", "decompose", "reconstruct", "finetune"], help="whose model.safetensors to evaluate (default finetune)")
    p.add_argument("--checkpoint", type=Path, help="evaluate this model.safetensors instead")
    p.add_argument("--config", action="append", default=[], metavar="SIZES", help="2,32,64 or conv2=2,... (repeatable)")
    p.add_argument("--uniform", action="store_true", help="every uniform configuration")
    p.add_argument("--samples", type=int, help="this many random configurations")
    p.add_argument("--split", choices=["val", "test"], help="default evaluate.split (val)")
    p.add_argument("--out", type=Path, help="also write the rows to this CSV file")
    return parser


def _flag_overrides(args: argparse.Namespace) -> list[dict]:
    """The command's own flags as settings, applied after --set.

    Only ``gross run`` and the training stages write config.yaml; search, latency and export
    record the settings they used in their own output (search/source.json, the latency table's
    meta, export/summary.json), so a flag given to one of them applies to that call only.
    """
    out: list[dict] = []
    if args.command == "search":
        search: dict[str, Any] = {}
        if args.strategy:
            search["strategy"] = args.strategy
        if args.budget is not None:
            search["budget"] = _budget(args.budget)
        if args.max_macs is not None:
            if args.latency is not None:
                raise StageError("--max-macs is a MACs budget; drop --latency or use --max-ms")
            search.update(budget=args.max_macs, cost="macs")
        if args.max_ms is not None:
            search.update(budget=args.max_ms, cost="latency")
        if args.latency is not None:
            search["cost"] = "latency"
            if args.latency:
                search["latency_table"] = str(Path(args.latency).resolve())
        for key in ("beam_width", "max_evaluations", "seed", "max_configs"):
            if getattr(args, key) is not None:
                search[key] = getattr(args, key)
        if args.test:
            search["test"] = True
        out.append({"search": search})
    elif args.command == "latency":
        latency = {k: getattr(args, k) for k in ("batch_size", "repeats") if getattr(args, k) is not None}
        out.append({"latency": latency})
    elif args.command == "export":
        export = {k: getattr(args, k) for k in ("fuse", "onnx", "opset") if getattr(args, k) is not None}
        out.append({"export": export})
        if args.batch_size is not None:
            out.append({"latency": {"batch_size": args.batch_size}})
    return out


def _resolve(args: argparse.Namespace) -> Config:
    overrides: list[Any] = list(args.overrides)
    for key in ("name", "runs", "device"):
        if getattr(args, key, None):
            overrides.append(f"{key}={getattr(args, key)}")
    overrides += _flag_overrides(args)
    files = [args.config_file] if args.config_file else []
    cfg = resolve_config(files, overrides)
    existing = cfg.run_dir / "config.yaml"
    if not args.config_file and existing.is_file():
        cfg = resolve_config([existing], overrides)
    return cfg


def _context(args: argparse.Namespace, cfg: Config) -> Context:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    return Context(
        cfg, device, rank, world,
        resume=getattr(args, "resume", False), restart=getattr(args, "restart", False), force=getattr(args, "force", False),
        progress=not args.quiet and sys.stderr.isatty(),  # redirected, bars would only fill the file with \r
    )


def _write_config(ctx: Context) -> None:
    if ctx.lead:
        atomic_write(ctx.run_dir / "config.yaml", dump_config(ctx.cfg))


def _cmd_run(ctx: Context) -> None:
    start = time.perf_counter()
    _write_config(ctx)
    stage_train(ctx, skip_done=True)
    stage_decompose(ctx, skip_done=True)
    stage_reconstruct(ctx, skip_done=True)
    stage_finetune(ctx, skip_done=True)
    stage_search(ctx, skip_done=True)
    summary = stage_export(ctx, skip_done=True)
    report = stage_report(ctx, skip_done=True)
    if ctx.lead:
        print(format_results(ctx, summary), flush=True)
        print("", flush=True)
        print(format_export(ctx, summary), flush=True)
        print(f"report: {report}", flush=True)
        ctx.log(f"[run] {ctx.run_dir} in {time.perf_counter() - start:.0f}s")


def _cmd_search(ctx: Context) -> None:
    stage_search(ctx)
    if ctx.lead:
        print(format_results(ctx), flush=True)
        ctx.log(f"[search] rows in {ctx.run_dir / SEARCH_DIR / 'results.csv'}, summary in {ctx.run_dir / SEARCH_DIR / 'best.json'}")


def _cmd_latency(ctx: Context, args: argparse.Namespace) -> None:
    path = args.out.resolve() if args.out else None
    table = stage_latency(ctx, path)
    if ctx.lead and table is not None:
        print(format_latency(table), flush=True)
        ctx.log(f"[latency] wrote {path or _latency_path(ctx)}; search under it with `gross search --latency"
                f"{' ' + str(path) if path else ''}`")


def _cmd_export(ctx: Context, args: argparse.Namespace) -> None:
    config = parse_config(args.config) if args.config else None
    summary = stage_export(ctx, config, best=args.best)
    if ctx.lead and summary is not None:
        print(format_export(ctx, summary), flush=True)


def _cmd_report(ctx: Context) -> None:
    path = stage_report(ctx)
    if ctx.lead:
        print(f"report: {path}", flush=True)


def _cmd_fixed(ctx: Context, args: argparse.Namespace) -> None:
    configs: list[Any] = [parse_config(c) for c in args.config]
    if args.uniform:
        path = ctx.run_dir / STAGE_DIRS["decompose"] / MODEL
        if not path.is_file():
            raise StageError(f"--uniform needs the layer names from {path}; run `gross decompose` first")
        names = [spec["name"] for spec in read_meta(path)["arch"]["layers"]]
        configs += [{n: s for n in names} for s in args.uniform]
    if not configs:
        configs = [tuple(c) for c in ctx.cfg.fixed.configs]
    if not configs:
        raise StageError("no configuration given: pass --config 2,32,64, --uniform 4 or set fixed.configs")
    _write_config(ctx)
    for config in configs:
        root = stage_fixed(ctx, config)
        if ctx.lead:
            model, _ = load_model(root / STAGE_DIRS["finetune"] / MODEL, ctx.device)
            rows = score_configurations(ctx, model, [("fixed", tuple(m.group_size for _, m in gross_layers(model)))], ctx.cfg.evaluate.split)
            print(format_table(rows, ctx.cfg.evaluate.split), flush=True)


def _cmd_evaluate(ctx: Context, args: argparse.Namespace) -> None:
    if not ctx.lead:
        return
    split = args.split or ctx.cfg.evaluate.split
    path = args.checkpoint or ctx.run_dir / STAGE_DIRS[args.stage] / MODEL
    if not path.is_file():
        raise StageError(f"{path} is missing; run `gross {args.stage}` first or pass --checkpoint")
    model, _ = load_model(path, ctx.device, expect=None if args.checkpoint else _base_arch(ctx))
    if gross_layers(model):
        explicit = [parse_config(c) for c in args.config]
        if explicit or args.uniform or args.samples is not None:
            configs = select_configurations(ctx, model, explicit, uniform=args.uniform, samples=args.samples or 0)
        else:
            configs = select_configurations(ctx, model)
        rows = score_configurations(ctx, model, configs, split)
    else:
        if args.config or args.uniform or args.samples:
            raise StageError(f"{path} has no GroSS layers, so it has no configurations to choose")
        rows = score_configurations(ctx, model, [], split)
    print(format_table(rows, split), flush=True)
    if args.out:
        atomic_write(args.out, _rows_csv(rows))


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        cfg = _resolve(args)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        ctx = _context(args, cfg)
        if args.command == "run":
            _cmd_run(ctx)
        elif args.command in STAGES:
            {"train": stage_train, "decompose": stage_decompose, "reconstruct": stage_reconstruct, "finetune": stage_finetune}[args.command](ctx)
            _write_config(ctx)
            ctx.log(f"[{args.command}] wrote {ctx.run_dir / STAGE_DIRS[args.command] / MODEL}")
        elif args.command == "search":
            _cmd_search(ctx)
        elif args.command == "latency":
            _cmd_latency(ctx, args)
        elif args.command == "export":
            _cmd_export(ctx, args)
        elif args.command == "report":
            _cmd_report(ctx)
        elif args.command == "fixed":
            _cmd_fixed(ctx, args)
        elif args.command == "evaluate":
            _cmd_evaluate(ctx, args)
    except USER_ERRORS as err:
        if os.environ.get("GROSS_DEBUG"):
            raise
        print(f"gross: error: {_one_line(err)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        again = "again" if args.command == "search" else "with --resume"
        print(f"gross: interrupted; run the same command {again} to continue", file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
