"""The run folder: one function per stage, each reading the previous stage's files and writing its own.

``run(config)`` is every stage in order; ``gross run`` and the other subcommands of
:mod:`gross.cli` call these functions and print what they return. A notebook can too::

    from gross.config import resolve_config
    from gross import pipeline

    result = pipeline.run(resolve_config(overrides=["train.epochs=3"]))
    result.export["latency_ms"], result.report

or one stage at a time on a :class:`Context` (``pipeline.context(cfg)``). The run folder
(``RUNS/NAME``)::

    config.yaml                     the resolved configuration (every section)
    base/         model.safetensors arch.json metrics.jsonl     gross train
    decompose/    model.safetensors arch.json                   gross decompose
    reconstruct/  model.safetensors arch.json metrics.jsonl     gross reconstruct
    gross/        model.safetensors arch.json metrics.jsonl     gross finetune (the trained space)
    search/       results.csv best.json uniform.csv source.json gross search
    latency/      table.json                                    gross latency (or export --fuse auto), on latency.runtime
    latency/search/  latency/export/                            gross latency: the choice by measured latency
    export/       net.safetensors net.json net.pt2 net.onnx summary.json  gross export
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
architecture, a diverging loss, bad settings or configurations) are raised as one of
``USER_ERRORS`` with a one-line message that says what to do.

Several processes (``torchrun --nproc_per_node=2 -m gross.cli run``; gloo on CPU, NCCL on CUDA):
every process calls the same stages; training is data parallel, the search's configurations are
split across the processes, and decomposition, latency, export and report run on process 0.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import __version__
from .btd import conditioning
from .checkpoint import (
    CheckpointError,
    atomic_write,
    describe_arch,
    load_model,
    make_arch,
    python_arch_name,
    read_meta,
    save_model,
)
from .config import Config, ConfigError, config_to_dict, dump_config
from .data import DataError, Splits
from .export import export_onnx, export_program
from .export import load as load_export
from .export import save as save_export
from .latency import DENSE, LatencyTable, compare_latency, describe_setup, latency_setup, latency_table
from .macs import count_macs, macs_table
from .model import (
    batchnorm_state,
    decompose,
    format_config,
    get_config,
    gross_layers,
    load_batchnorm_state,
    plan_decomposition,
    recalibrate_batchnorm,
    sample_config,
    search_space,
    set_config,
)
from .models import build_model, canonical_name, load_weights
from .report import read_results, write_report
from .runtime import RuntimeMissing, check_runtime
from .search import FUSED_LATENCY, AdditiveCost, feasible_configs, macs_cost, resolve_budget, uniform_config
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
    "run",
    "run_stages",
    "RunResult",
    "context",
    "Context",
    "StageError",
    "USER_ERRORS",
    "stage_train",
    "stage_decompose",
    "stage_reconstruct",
    "stage_finetune",
    "stage_fixed",
    "stage_search",
    "stage_latency",
    "stage_export",
    "stage_report",
    "measured_networks",
    "slower_note",
    "select_configurations",
    "score_configurations",
    "search_results",
]

MODEL = "model.safetensors"
ARCH = "arch.json"
STAGES = ("train", "decompose", "reconstruct", "finetune")
STAGE_DIRS = {"train": "base", "decompose": "decompose", "reconstruct": "reconstruct", "finetune": "gross"}
DATA_CACHE = "data-cache"  # decoded in-memory image folders (data.cache: "")
# Configuration sections each stage's output depends on (checked when a finished stage is reused).
STAGE_SECTIONS = {
    "train": ("data", "model", "train"),
    "decompose": ("decompose",),
    "reconstruct": ("reconstruct",),
    "finetune": ("finetune",),
}


class StageError(RuntimeError):
    """A stage cannot run (its input is missing, its output exists); the message says what to do."""


USER_ERRORS = (StageError, ConfigError, DataError, CheckpointError, TrainingError, ValueError, RuntimeMissing)


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
    model: torch.nn.Module | None = field(default=None, repr=False)  # the user's network with its weights (pipeline.run(cfg, model=...)), on the CPU
    _splits: Splits | None = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def splits(self) -> Splits:
        if self._splits is None:
            # Decoded image folders are cached in the run folder unless data.cache names another.
            splits = load_splits(self.cfg.data, cache=self.run_dir / DATA_CACHE, progress=self.progress, log=self.log)
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
            "augmentation": augmentation_for(self.cfg.data, self.splits().train.shape),
            "channels_last": self.cfg.channels_last,
            "eval_batch_size": self.cfg.data.eval_batch_size,
        }


def base_arch(ctx: Context) -> dict:
    """The architecture record of the run's base network: the given module's, or the configured one's."""
    cfg = ctx.cfg
    if ctx.model is not None:
        return make_arch(python_arch_name(ctx.model), {})
    try:
        kwargs = model_kwargs(cfg.model.name, cfg.model.kwargs, ctx.splits().train)
        return make_arch(canonical_name(cfg.model.name), kwargs)
    except ValueError as err:
        raise ConfigError(f"model.name: {err}") from None


def _given_base(ctx: Context, arch: dict) -> tuple[torch.nn.Module, str] | None:
    """The trained network the run starts from instead of training one, and where it came from.

    The module handed to :func:`run`, or the configured model with ``model.weights`` loaded;
    None when the base stage trains.
    """
    if ctx.model is not None:
        return copy.deepcopy(ctx.model).cpu(), "the module given in Python"
    if ctx.cfg.model.weights is None:
        return None
    model = build_model(arch["model"], **arch["kwargs"])
    try:
        load_weights(model, ctx.cfg.model.weights)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return model, str(Path(ctx.cfg.model.weights).resolve())


def check_settings(ctx: Context) -> None:
    """Fail before anything is written when the configured model cannot be built or its weights do not fit it."""
    if ctx.model is not None:  # a module handed over in Python is built already
        return
    arch = base_arch(ctx)
    if _given_base(ctx, arch) is None:
        try:
            build_model(arch["model"], **arch["kwargs"])
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None


def _stage_info(ctx: Context, stage: str, history: list | None = None) -> dict:
    info: dict[str, Any] = {"stage": stage, "config": config_to_dict(ctx.cfg), "gross_version": __version__}
    if history:
        info["final"] = history[-1]
    return info


def _differs(saved: Any, now: Any, default: Any) -> bool:
    """Whether settings differ; a key the saved ones lack (added to gross since) counts only when not at its default."""
    if isinstance(saved, dict) and isinstance(now, dict) and isinstance(default, dict):
        return any(_differs(saved[k], v, default.get(k)) if k in saved else v != default.get(k) for k, v in now.items())
    return saved != now


def _check_reused(ctx: Context, sections: Sequence[str], path: Path) -> None:
    """Warn when a finished stage was made with other settings than the configuration's now."""
    saved = read_meta(path).get("config") or {}
    now, default = config_to_dict(ctx.cfg), config_to_dict(Config())
    changed = [s for s in sections if s in saved and _differs(saved[s], now[s], default[s])]
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
    return load_model(path, ctx.device, expect=expect, template=ctx.model)


# ---------------------------------------------------------------------------------------------
# Stages


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def stage_train(ctx: Context, skip_done: bool = False) -> None:
    """The base network: trained from scratch, or adopted as given (a module, or ``model.weights``).

    An adopted network is saved as it is, bit for bit, with its val and test accuracy and MACs;
    a run continued with other given weights than its base's is refused.
    """
    out = ctx.run_dir / STAGE_DIRS["train"]
    cfg = ctx.cfg
    arch = base_arch(ctx)
    given = _given_base(ctx, arch)
    if given is not None and (out / MODEL).is_file() and not ctx.force:
        saved, _ = _load(ctx, out / MODEL, "train", arch)
        if not _same_weights(saved, given[0]):
            raise StageError(
                f"{out / MODEL} holds other weights than {given[1]}; continue this run with the weights it started "
                f"from, or start another (--name) or pass --force to start over from these"
            )
    if not _start(ctx, "train", out, skip_done):
        return
    if given is not None:
        _adopt(ctx, out, arch, *given)
        return
    torch.manual_seed(cfg.train.seed)
    model = build_model(arch["model"], **arch["kwargs"]).to(ctx.device)
    ctx.log(f"[train] {out}: {cfg.model.name} on {cfg.data.dataset}, {_epochs(cfg.train.epochs)}")
    history = train_base(model, ctx.splits(), cfg.train, arch=arch, **ctx.loop_options(out))
    _finish(ctx, out, model, arch, _stage_info(ctx, "train", history))


def _adopt(ctx: Context, out: Path, arch: dict, model: torch.nn.Module, source: str) -> None:
    """Save a trained network as the run's base, with what a trained base records, training nothing."""
    ctx.log(f"[train] {out}: adopting {source} ({describe_arch(arch)}); nothing is trained")
    if ctx.lead:
        splits = ctx.splits()
        model = model.to(ctx.device)
        classes = len(splits.train.classes)
        with torch.inference_mode():
            outputs = model.eval()(torch.zeros(1, *_input_shape(ctx), device=ctx.device)).shape[-1]
        if outputs != classes:
            raise ConfigError(f"{source} gives {outputs} outputs but the data has {classes} classes; "
                              f"build it for {classes} classes (model.kwargs) or use data of its classes")
        bs, cl = ctx.cfg.data.eval_batch_size, ctx.cfg.channels_last
        final: dict[str, Any] = {"epoch": 0}
        for split in ("val", "test"):
            data = getattr(splits, split)
            if len(data):
                result = evaluate(model, data, batch_size=bs, channels_last=cl)
                final[f"{split}_acc"], final[f"{split}_loss"] = result.accuracy, result.loss
        final["macs"] = count_macs(model, _input_shape(ctx)).total
        info = _stage_info(ctx, "train")
        info["final"] = final
        info["adopted"] = source
        accuracy = ", ".join(f"{k[:-4]} acc {100 * v:.2f}%" for k, v in final.items() if k.endswith("_acc"))
        ctx.log(f"[train] adopted: {accuracy}; {final['macs'] / 1e6:.3f} M MACs per image")
        _finish(ctx, out, model, arch, info)
    else:
        ctx.barrier()


class _LayerBar:
    """A progress bar over the fits of the layers being decomposed (``gross.decompose``'s progress callback).

    The bar counts estimated work (see ``gross.decompose``), so tqdm's time left is an estimate
    for the whole stage; the text names the layer and group size being fitted.
    """

    def __init__(self, ctx: Context, desc: str = "decompose") -> None:
        self.bar = tqdm(desc=desc, disable=not (ctx.progress and ctx.lead), dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}")

    def __call__(self, name: str, index: int, total: int, group_size: int, done: float, work: float) -> None:
        self.bar.total = work
        self.bar.n = done
        self.bar.set_postfix_str(f"layer {index + 1}/{total} {name}, group size {group_size}")

    def close(self) -> None:
        if self.bar.total is not None:
            self.bar.n = self.bar.total
            self.bar.refresh()
        self.bar.close()


def _fit_device(ctx: Context) -> torch.device:
    """Where the decompositions run (gross.btd fits each weight on the device it is on): decompose.device, else the run's."""
    d = ctx.cfg.decompose.device
    return resolve_device(d) if d else ctx.device


def stage_decompose(ctx: Context, skip_done: bool = False) -> None:
    out = ctx.run_dir / STAGE_DIRS["decompose"]
    if not _start(ctx, "decompose", out, skip_done):
        return
    arch = base_arch(ctx)
    base, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", arch)
    if ctx.lead:
        d = ctx.cfg.decompose
        try:
            plan = plan_decomposition(base, d.group_sizes, d.skip, d.only, d.btd.get("width"))
        except ValueError as err:
            raise ConfigError(f"decompose: {err}") from None
        for p in plan:
            ctx.log(f"[decompose] {p.name}: " + (f"group sizes {list(p.sizes)}" if p.sizes else f"left dense ({p.reason})"))
        start = time.perf_counter()
        bar = _LayerBar(ctx)
        try:
            model = decompose(base.to(_fit_device(ctx)), group_sizes=d.group_sizes, skip=d.skip, only=d.only, nested=d.nested,
                              progress=bar, workers=d.workers, **d.btd)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        # Large cancelling blocks (kappa >> 1) make the series diverge in training: say so here.
        kappa = {f"{n}/{s}": conditioning(layer.decomposition(s)) for n, layer in gross_layers(model) for s in layer.group_sizes}
        worst = max(kappa, key=kappa.get)
        ctx.log(f"[decompose] {len(gross_layers(model))} layers in {seconds:.1f}s; space {search_space(model)}; "
                f"largest kappa {kappa[worst]:.2f} ({worst})")
        info = _stage_info(ctx, "decompose")
        info["seconds"] = round(seconds, 3)
        info["kappa"] = {k: round(v, 4) for k, v in kappa.items()}
        save_model(out / MODEL, model, make_arch(arch["model"], arch["kwargs"], model), info, sidecar=out / ARCH)
    ctx.barrier()


def stage_reconstruct(ctx: Context, skip_done: bool = False, root: Path | None = None, fixed: bool = False) -> None:
    root = root or ctx.run_dir
    out = root / STAGE_DIRS["reconstruct"]
    if not _start(ctx, "reconstruct", out, skip_done, ("fixed",) if fixed else None):
        return
    arch = base_arch(ctx)
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
    arch = base_arch(ctx)
    model, meta = _load(ctx, root / STAGE_DIRS["reconstruct"] / MODEL, "reconstruct", arch)
    cfg = ctx.cfg.fixed.finetune if fixed else ctx.cfg.finetune
    teacher = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", arch)[0] if cfg.distill else None
    extras = (f", distilled from the original (weight {cfg.distill:g}, T {cfg.temperature:g})" if cfg.distill else "") + (
        ", sandwich (largest and smallest configuration every step)" if cfg.sandwich else "")
    ctx.log(f"[finetune] {out}: {_epochs(cfg.epochs)}, alpha {cfg.alpha:g}{extras}")
    history = finetune(model, ctx.splits(), cfg, teacher=teacher, arch=meta["arch"], **ctx.loop_options(out))
    _finish(ctx, out, model, meta["arch"], _stage_info(ctx, "finetune", history))


def decomposed_layers(ctx: Context, needed_by: str) -> list[str]:
    """Names of the GroSS layers, from ``decompose/`` (without loading the model)."""
    path = ctx.run_dir / STAGE_DIRS["decompose"] / MODEL
    if not path.is_file():
        raise StageError(f"{needed_by} needs the layer names from {path}; run `gross decompose` first")
    return [spec["name"] for spec in read_meta(path)["arch"]["layers"]]


def _named_config(ctx: Context, config: tuple[int, ...] | dict[str, int]) -> dict[str, int]:
    if isinstance(config, dict):
        return config
    names = decomposed_layers(ctx, f"--config {format_config(config)} (sizes by position; or name the layers: conv2=2,...)")
    if len(names) != len(config):
        raise StageError(f"--config {format_config(config)} has {len(config)} sizes but the decomposed network has {len(names)} layers ({', '.join(names)})")
    return dict(zip(names, config))


def stage_fixed(ctx: Context, config: tuple[int, ...] | dict[str, int], skip_done: bool = True) -> Path:
    """Decompose at one configuration, reconstruct and finetune it, in ``fixed/<config>/``."""
    named = _named_config(ctx, config)
    root = ctx.run_dir / "fixed" / format_config(named.values())
    out = root / STAGE_DIRS["decompose"]
    if _start(ctx, "decompose", out, skip_done=True):
        arch = base_arch(ctx)
        base, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", arch)
        if ctx.lead:
            ctx.log(f"[fixed] {root}: {named}")
            d = ctx.cfg.decompose
            start = time.perf_counter()
            bar = _LayerBar(ctx)
            try:
                model = decompose_fixed(base.to(_fit_device(ctx)), named, progress=bar, workers=d.workers, **d.btd)
            finally:
                bar.close()
            info = _stage_info(ctx, "decompose")
            info["seconds"] = round(time.perf_counter() - start, 3)
            save_model(out / MODEL, model, make_arch(arch["model"], arch["kwargs"], model), info, sidecar=out / ARCH)
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
    """The configurations ``gross evaluate`` scores: explicit ones, the uniform ones, and a seeded random sample."""
    ev = ctx.cfg.evaluate
    uniform = ev.uniform if uniform is None else uniform
    samples = ev.samples if samples is None else samples
    names, space = [n for n, _ in gross_layers(model)], search_space(model)
    chosen = [("given", _named_choices(names, space, config, "--config")) for config in explicit]
    if uniform:
        chosen += _uniform_configs(space)
    if samples:
        chosen += [("random", c) for c in _random_configs(model, samples, ev.seed, {c for _, c in chosen})]
    return chosen


def score_configurations(ctx: Context, model: torch.nn.Module, configs: Sequence[tuple[str, tuple[int, ...]]], split: str) -> list[Row]:
    data = getattr(ctx.splits(), split)
    if len(data) == 0:
        raise StageError(f"the {split} split is empty; set data.val_size to cut a validation split")
    batches = prepare_batches(data, ctx.cfg.data.eval_batch_size, ctx.device, ctx.cfg.channels_last)
    shape = data.shape
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


# ---------------------------------------------------------------------------------------------
# Search, latency, export, report

SEARCH_DIR = "search"
EXPORT_DIR = "export"
LATENCY_DIR = "latency"  # the table, and the search and export by measured latency (gross latency)
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
            box[0] = ("error", one_line(err))
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
    return _load(ctx, ctx.run_dir / STAGE_DIRS["finetune"] / MODEL, "finetune", base_arch(ctx))


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
    return tuple(int(d) for d in data.shape)


def latency_path(ctx: Context) -> Path:
    path = Path(ctx.cfg.search.latency_table)
    return path if path.is_absolute() else ctx.run_dir / path


def _load_latency(path: Path, layers: Sequence[str], needed_by: str, setup: dict | None = None) -> LatencyTable:
    """The stored table; with ``setup``, refused unless it was measured there (another runtime,
    batch size, thread count or device predicts the wrong network)."""
    if not path.is_file():
        raise StageError(f"{path} is missing; run `gross latency` first ({needed_by} needs it)")
    try:
        table = LatencyTable.load(path)
    except (ValueError, OSError) as err:
        raise StageError(f"{path}: {one_line(err)}; delete it and run `gross latency` again") from None
    if list(table.layers) != list(layers):
        raise StageError(f"{path} was measured for layers {list(table.layers)}, but the GroSS network has {list(layers)}; run `gross latency --force`")
    why = table.mismatch(setup) if setup is not None else None
    if why:
        raise StageError(f"{path} does not fit {needed_by}: {why} (latency.runtime, latency.batch_size, threads, device); "
                         f"run `gross latency --runtime {setup['runtime']} --batch-size {setup['batch_size']}` to measure it there, "
                         "or set those to the table's")
    return table


def _fingerprint(ctx: Context) -> dict:
    """What the scores in search/ depend on: the GroSS weights and the validation split."""
    digest = hashlib.sha256()
    with open(ctx.run_dir / STAGE_DIRS["finetune"] / MODEL, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    d = ctx.cfg.data
    data = {"dataset": d.dataset, "val_size": d.val_size, "split_seed": d.split_seed, "limit": d.limit, "mean": d.mean, "std": d.std}
    # Only when set, so that searches made before these settings existed stay valid.
    data.update({k: getattr(d, k) for k, default in (("image_size", None), ("channels", 3)) if getattr(d, k) != default})
    fingerprint = {"model_sha256": digest.hexdigest(), "data": data}
    if ctx.cfg.search.recalibrate:  # absent otherwise, so that searches made before the setting existed stay valid
        fingerprint["recalibrate"] = ctx.cfg.search.recalibrate
    return fingerprint


def _calibration(ctx: Context, count: int) -> list[torch.Tensor] | None:
    if count <= 0:
        return None
    d = ctx.cfg.data
    train = ctx.splits().train
    return calibration_batches(train, count, d.split_seed, d.eval_batch_size, ctx.device, ctx.cfg.channels_last, augmentation_for(d, train.shape))


def _uniform_configs(space: Sequence[Sequence[int]]) -> list[tuple[str, tuple[int, ...]]]:
    """``("uniform G", config)`` for every group size G: each layer at its largest size <= G (the paper's rule)."""
    out: dict[tuple[int, ...], str] = {}
    for g in sorted(set().union(*map(set, space))):
        out.setdefault(uniform_config(space, g), f"uniform {g}")
    return [(label, config) for config, label in out.items()]


def parse_budget(budget: str | float | None) -> str | float | None:
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


def stage_search(ctx: Context, skip_done: bool = False, folder: str = SEARCH_DIR) -> bool:
    """Search the finetuned space on the validation split into ``search/``; every process takes part.

    Returns whether it searched (False: skipped as done). ``results.csv`` is appended as
    configurations are scored, so running it again continues an interrupted search, and a
    finished one with other settings (another budget) reuses every score already there.
    """
    out = ctx.run_dir / folder
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
    table = _on_lead(ctx, lambda: _load_latency(latency_path(ctx), names, "search.cost: latency", _latency_setup(ctx))) if s.cost == "latency" else None
    # The export fuses a bottleneck into one dense conv (same outputs) where that is cheaper, so
    # the dense conv is a per-layer choice under MACs and latency alike (see _export's fuse).
    cost = AdditiveCost.from_latency_table(table, fuse=table.has_dense) if table is not None else macs_cost(model, shape)
    budget = parse_budget(s.budget)
    limit = resolve_budget(budget, space, cost)
    strategy, options = _strategy(ctx, space, cost, limit)
    unit = "ms" if table is not None else "M MACs"
    shown = limit if table is not None else limit / 1e6
    limit_text = f"budget {budget} = {shown:.4g} {unit}" if isinstance(budget, str) else f"budget {shown:.4g} {unit}"
    if budget is None:
        limit_text = f"no budget ({'ms' if table is not None else 'MACs'})"
    if table is not None:
        limit_text += f" (latency table measured with {describe_setup(table.setup)})"
    if cost.dense is not None:
        limit_text += f", each layer at the {'faster' if table is not None else 'cheaper'} of its bottleneck and the dense conv"
    ctx.log(f"[search] {out}: {strategy} over {math.prod(len(x) for x in space)} configurations of {', '.join(names)}; "
            f"{limit_text}; scored on the val split{' (and test, reported only)' if s.test else ''}")
    if ctx.lead:
        out.mkdir(parents=True, exist_ok=True)
        source = {"fingerprint": _fingerprint(ctx), "settings": settings, "strategy": strategy, "options": options}
        if table is not None:
            source["latency_setup"] = table.setup
        _write_json(out / "source.json", source)
    ctx.barrier()
    # The uniform configurations (the paper's baselines) are scored whether or not they fit the
    # budget, and chosen when one fits and beats the strategy's pick.
    uniform = _uniform_configs(space)
    result = run_search(
        model, val, strategy=strategy, budget=budget, cost=cost, test_data=test, out_dir=out,
        input_shape=shape, calibration=_calibration(ctx, s.recalibrate), progress=ctx.progress and ctx.lead,
        extra=[c for _, c in uniform], **options,
    )
    if ctx.lead:
        records = {r.config: r for r in result.records}
        bottlenecks = macs_cost(model, shape, dense=False)
        rows = [
            {
                "config": format_config(c), "label": label, "cost": repr(records[c].cost), "macs": records[c].macs,
                "params": records[c].params, "val_accuracy": repr(records[c].val_accuracy), "val_loss": repr(records[c].val_loss),
                "test_accuracy": "" if records[c].test_accuracy is None else repr(records[c].test_accuracy),
                "dense": " ".join(records[c].dense),
                # What the budget uniform:G stands for: every layer its bottleneck (the report's budget lines).
                "bottleneck_macs": int(bottlenecks.of(c)),
            }
            for label, c in uniform
        ]
        columns = ["config", "label", "cost", "macs", "params", "val_accuracy", "val_loss", "test_accuracy", "dense", "bottleneck_macs"]
        atomic_write(out / "uniform.csv", _csv_text(rows, columns))
        dense = f" with {', '.join(result.best.dense)} dense (one conv, cheaper than the bottleneck)" if result.best.dense else ""
        ctx.log(f"[search] {result.evaluations} configurations ({result.evaluated_now} scored now) in {result.seconds:.1f}s; "
                f"best {format_config(result.best.config)}{dense}: val acc {100 * result.best.val_accuracy:.2f}%, {result.best.macs / 1e6:.3f} M MACs")
    ctx.barrier()
    return True


def _timing(ctx: Context) -> dict:
    """How every latency of a run is measured: the latency.* settings on the run's device and threads."""
    lat = ctx.cfg.latency
    return {"batch_size": lat.batch_size, "repeats": lat.repeats, "device": ctx.device, "runtime": lat.runtime}


def _latency_setup(ctx: Context) -> dict:
    """Where this run's latencies are measured (what a stored table must have been measured on)."""
    lat = ctx.cfg.latency
    return latency_setup(lat.runtime, lat.batch_size, device=ctx.device)


def _measure_latency(ctx: Context, path: Path, model: torch.nn.Module) -> LatencyTable:
    graphs = ", each as its own ONNX graph" if ctx.cfg.latency.runtime == "onnxruntime" else ""
    ctx.log(f"[latency] {path}: timing {len(gross_layers(model))} layers at every group size and as the dense conv{graphs}, "
            f"with {describe_setup(_latency_setup(ctx))}")
    table = latency_table(model, _input_shape(ctx), **_timing(ctx))
    atomic_write(path, json.dumps(table.to_dict(), indent=1) + "\n")
    return table


def stage_latency(ctx: Context, path: Path | None = None, budget_ms: float | None = None) -> dict | None:
    """Choose by measured latency on this runtime and device, beside the choice by MACs (``gross latency``).

    Times every GroSS layer at every group size and as the dense conv, on ``latency.runtime`` at
    ``latency.batch_size``, into ``latency/table.json`` (kept when it exists and was measured on
    the same runtime, batch size, threads and device, unless ``ctx.force``; else measured
    again), searches the finetuned space under a latency budget with the dense conv as a
    per-layer choice into ``latency/search/`` (reusing the scores of an earlier one), and exports
    the pick with ``fuse: auto`` into ``latency/export/``, measured against the original network.
    ``budget_ms`` defaults to the original network's predicted latency (which the table measured
    whole, as its anchor), so the pick is the most accurate configuration predicted to run no
    slower than the original. Returns the export's summary (process 0; None elsewhere).
    """
    path = path or latency_path(ctx)
    names = [spec["name"] for spec in _gross_arch(ctx)["layers"]]
    check_runtime(ctx.cfg.latency.runtime, ctx.device)
    setup = _latency_setup(ctx)

    def measured() -> LatencyTable:
        if path.is_file() and not ctx.force:
            table = _load_latency(path, names, "gross latency")
            why = table.mismatch(setup)
            if why is None:
                ctx.log(f"[latency] using {path}, measured with {describe_setup(setup)} (--force measures it again)")
                return table
            ctx.log(f"[latency] {path}: {why}; measuring it again")
        return _measure_latency(ctx, path, _gross_model(ctx)[0])

    table = _on_lead(ctx, measured)
    cfg = copy.deepcopy(ctx.cfg)
    cfg.search.cost, cfg.search.latency_table = "latency", str(path.resolve())  # relative, it would be read inside the run folder
    # Summed as the search's cost sums (float addition in the same order), so that a configuration
    # fused into dense convs everywhere fits exactly.
    cfg.search.budget = AdditiveCost.from_latency_table(table)([DENSE] * len(names)) if budget_ms is None else budget_ms
    cfg.export.fuse, cfg.export.config = "auto", None
    search = f"{LATENCY_DIR}/{SEARCH_DIR}"
    stage_search(dataclasses.replace(ctx, cfg=cfg), folder=search)
    return stage_export(dataclasses.replace(ctx, cfg=cfg, force=True), best=True, folder=f"{LATENCY_DIR}/{EXPORT_DIR}", search=search)


def measured_networks(ctx: Context) -> list[dict]:
    """The original network and the exported choices (by MACs: ``export/``; by latency:
    ``latency/export/``) with val accuracy, MACs, parameters and ms measured end to end, each
    with the runtime, batch size, threads and device it was measured with (``setup``), for
    printing and the report. The original appears once per setup, as it was timed beside each."""
    rows: list[dict] = []
    originals: set[str] = set()
    for label, folder in (("chosen by MACs", EXPORT_DIR), ("chosen by latency", f"{LATENCY_DIR}/{EXPORT_DIR}")):
        summary = _read_json(ctx.run_dir / folder / "summary.json")
        if summary is None:
            continue
        ms, setup = summary["latency_ms"], describe_setup(summary["latency_setup"])
        if setup not in originals:
            originals.add(setup)
            rows.append({"network": "original", "config": ("-",), "val_acc": summary["val_accuracy"]["original"],
                         "macs": summary["macs"]["original"], "params": summary["params"]["original"], "ms": ms["original"],
                         "setup": setup, "versus": ""})
        fused = f", fused: {', '.join(summary['fused'])}" if summary["fused"] else ""
        rows.append({"network": f"{label}{fused}", "config": tuple(summary["config"]), "val_acc": summary["val_accuracy"]["exported"],
                     "macs": summary["macs"]["exported"], "params": summary["params"]["exported"], "ms": ms["exported"], "setup": setup,
                     "versus": ratio(ms["original"], ms["exported"], "faster", "slower") + " (timed together)"})
    return rows


def slower_note(ctx: Context, summary: dict) -> str | None:
    """A plain sentence when the exported network is slower than the original where it was timed."""
    ms, macs, setup = summary["latency_ms"], summary["macs"], summary["latency_setup"]
    if ms["exported"] <= ms["original"]:
        return None
    text = (f"The exported network {format_config(summary['config'])} is {ratio(ms['original'], ms['exported'], 'faster', 'slower')} "
            f"than the original with {describe_setup(setup)}")
    if summary["fuse"] == "auto":  # chosen by the latency table already: the measurement disagrees with it
        return text + " (the latency table predicted otherwise; `gross latency --force` measures it again)."
    fewer = f", although it has {ratio(macs['original'], macs['exported'], 'fewer', 'more')} MACs" if macs["exported"] < macs["original"] else ""
    return (f"{text}{fewer}: here its bottlenecks are slower than the dense convs they replace. `gross latency --name "
            f"{ctx.cfg.name}` chooses by measured latency instead, with the dense conv as a per-layer choice, and compares both.")


def ratio(original: float, exported: float, better: str, worse: str) -> str:
    """``"1.94x fewer"``: how ``exported`` compares with ``original`` (lower is ``better``)."""
    if not original or not exported:
        return ""
    return f"{original / exported:.2f}x {better}" if original >= exported else f"{exported / original:.2f}x {worse}"


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


def _search_best(ctx: Context, names: Sequence[str], folder: str = SEARCH_DIR) -> dict:
    """``best.json`` of a finished search of this network."""
    path = ctx.run_dir / folder / "best.json"
    best = _read_json(path)
    if best is None:
        raise StageError(f"{path} is missing; run `gross search --name {ctx.cfg.name}` first or pass --config")
    if not best.get("finished") or not best.get("best"):
        raise StageError(f"the search in {path.parent} has not finished; run `gross search --name {ctx.cfg.name}` to finish it or pass --config")
    if list(best.get("layers", [])) != list(names):
        raise StageError(f"{path} is for layers {best.get('layers')}, but the GroSS network has {list(names)}; run `gross search --force`")
    return best


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


def _program_check(exported: torch.nn.Module, path: Path, x: torch.Tensor) -> dict:
    """Write net.pt2 (torch.export) and compare the reloaded program's outputs with torch's.

    The program is traced on the CPU, so that it loads on any machine; a network torch.export
    cannot trace is one note, and the rest of the export stands.
    """
    exported = copy.deepcopy(exported).to("cpu").eval()
    x = x.detach().to("cpu")
    try:
        export_program(exported, path, tuple(x.shape[1:]))
    except Exception as err:  # torch.export raises many kinds
        path.unlink(missing_ok=True)
        return {"written": False, "note": f"net.pt2 skipped: torch.export could not trace the network ({type(err).__name__}: {one_line(err)[:200]})"}
    program = torch.export.load(str(path)).module()
    with torch.inference_mode():
        diff, tol = _max_diff(program(x), exported(x))
    if not diff <= tol:
        raise StageError(f"net.pt2 gives outputs up to {diff:.3g} away from the exported network's (tolerance {tol:.3g}); this is a bug in gross.export")
    return {"written": True, "file": path.name, "checked": True, "max_abs_diff": diff,
            "note": f"net.pt2 checked: torch.export.load(path).module() runs it without gross or the network's code, max |diff| {diff:.2g}"}


def _onnx_check(exported: torch.nn.Module, path: Path, x: torch.Tensor, opset: int) -> dict:
    """Write net.onnx and compare onnxruntime's output with torch's; skipped without the extras."""
    missing = [m for m in ("onnx", "onnxscript") if not _installed(m)]
    if missing:
        return {"written": False, "note": f"net.onnx skipped: {' and '.join(missing)} not installed (pip install 'gross[export]')"}
    exported = copy.deepcopy(exported).to("cpu").float().eval()  # ONNX is device-free; onnxruntime checks on the CPU
    x = x.detach().to("cpu", torch.float32).contiguous()
    try:
        export_onnx(exported, path, tuple(x.shape[1:]), opset=opset)
    except Exception as err:  # the exporter raises many kinds
        raise StageError(f"ONNX export failed ({type(err).__name__}: {one_line(err)[:300]}); pass --no-onnx to export without it") from None
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


def stage_export(
    ctx: Context, config: tuple[int, ...] | dict[str, int] | None = None, best: bool = False, skip_done: bool = False,
    folder: str = EXPORT_DIR, search: str = SEARCH_DIR,
) -> dict | None:
    """The plain network at one configuration into ``export/`` (process 0); returns its summary.

    ``config`` (else ``export.config``, else the best of the search in ``search``) is exported
    into ``folder``.
    """
    out = ctx.run_dir / folder
    summary_path = out / "summary.json"
    if config is not None:  # a bad --config is the first thing to hear about
        layers = _gross_arch(ctx)["layers"]
        config = _named_choices([spec["name"] for spec in layers], [spec["group_sizes"] for spec in layers], config, "--config")
    if summary_path.is_file() and not ctx.force:
        if skip_done:
            summary = _read_json(summary_path)
            ctx.log(f"[export] done already: {out}")
            if summary and summary.get("source") == "search" and (ctx.run_dir / search / "best.json").is_file():
                names = summary.get("layers", [])
                try:
                    chosen = tuple(_search_best(ctx, names, search)["best"]["config"])
                except StageError:
                    chosen = None
                if chosen is not None and list(chosen) != summary.get("config"):
                    ctx.log(f"warning: {out} holds {format_config(summary['config'])} but the search now chose {format_config(chosen)}; "
                            f"it is kept (run `gross export --name {ctx.cfg.name} --best --force` to replace it)")
            return summary
        raise StageError(f"{out} exists; pass --force to replace it")
    check_runtime(ctx.cfg.latency.runtime, ctx.device)  # before anything is written
    summary = None
    if ctx.lead:
        summary = _export(ctx, config, best, out, search)
    ctx.barrier()
    return summary


def _export_into(ctx: Context, tmp: Path, model: torch.nn.Module, arch: dict, base: torch.nn.Module, chosen: tuple[int, ...],
                 source: str, fuse: str, table: LatencyTable | None, shape: tuple[int, ...], val: list,
                 dense: Sequence[str] = ()) -> dict:
    """Write, reload, check, measure and summarise the exported network in ``tmp``.

    ``fuse`` is export.fuse (``auto``, ``none``, ``all``) or ``search``: fuse the layers ``dense``,
    those the search counted as their dense conv.
    """
    cfg = ctx.cfg.export
    names = [name for name, _ in gross_layers(model)]
    save_export(model, tmp, arch={"name": arch["model"], "kwargs": arch["kwargs"]}, config=chosen,
                fuse={"auto": "auto", "none": False, "all": True, "search": dense}[fuse], latency=table, original=base)
    recorded = json.loads((tmp / "net.json").read_text())["arch"]  # where the architecture comes from
    # Reloaded as a user will: by its name, or into a fresh base network where it was given in Python.
    exported = load_export(tmp, model=copy.deepcopy(base) if recorded["source"] == "python" else None).to(ctx.device)
    record = {name: info for name, info in exported.gross_export.items()}
    fused = [name for name, info in record.items() if info["fused"]]
    # Why each layer was fused or not: the table's times (fuse auto).
    fuse_times = {
        name: {"size": size, "bottleneck_ms": options[size], "dense_ms": options[DENSE]}
        for name, size, options in zip(names, chosen, table.options) if size != 0
    } if table is not None else None
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
    setup = _latency_setup(ctx)
    ctx.log(f"[export] timing the original and the exported network with {describe_setup(setup)}")
    ms = compare_latency({"original": base, "exported": exported}, shape, **_timing(ctx))
    onnx_info = _onnx_check(exported, tmp / "net.onnx", x, cfg.opset) if cfg.onnx else {"written": False, "note": "net.onnx not written (export.onnx: false)"}
    program_info = _program_check(exported, tmp / "net.pt2", x)
    summary = {
        "config": list(chosen),
        "layers": names,
        "source": source,
        "fuse": fuse,
        "fused": fused,
        "fuse_times": fuse_times,
        "input_shape": list(shape),
        "macs": {"original": count_macs(base, shape).total, "exported": count_macs(exported, shape).total},
        "params": {"original": sum(p.numel() for p in base.parameters()), "exported": sum(p.numel() for p in exported.parameters())},
        "val_accuracy": {"original": original_eval.accuracy, "exported": exported_eval.accuracy},
        "test_accuracy": test_accuracy,
        "latency_ms": {"original": ms["original"], "exported": ms["exported"]},
        "latency_setup": {**setup, "repeats": ctx.cfg.latency.repeats},
        **check,
        "onnx": onnx_info,
        "pt2": program_info,
        "arch": recorded,
        "files": sorted(p.name for p in tmp.iterdir()) + ["summary.json"],
    }
    _write_json(tmp / "summary.json", summary)
    return summary


def _export(ctx: Context, config: tuple[int, ...] | dict[str, int] | None, best: bool, out: Path, search: str) -> dict:
    cfg = ctx.cfg.export
    fuse_setting = cfg.fuse
    dense: list[str] = []  # the layers to fuse with fuse_setting "search"
    model, meta = _gross_model(ctx)
    base, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", base_arch(ctx))
    names = [name for name, _ in gross_layers(model)]
    space = search_space(model)
    if config is not None:
        chosen, source = _named_choices(names, space, config, "--config"), "given"
    elif best or cfg.config is None:
        found = _search_best(ctx, names, search)
        chosen, source = tuple(int(s) for s in found["best"]["config"]), "search"
        if found.get("cost") == FUSED_LATENCY and fuse_setting == "none":
            # The search counted each layer at the faster of bottleneck and dense conv: only
            # fusing where the table says so gives the network it chose.
            ctx.log("[export] the search chose by latency with fused layers where faster: exporting with fuse auto")
            fuse_setting = "auto"
        elif found["best"].get("dense") and fuse_setting == "none":
            # The search counted these layers as their dense conv (cheaper than the bottleneck):
            # fusing them builds the network it costed, with the same outputs.
            dense = list(found["best"]["dense"])
            ctx.log(f"[export] the search counted {', '.join(dense)} as one dense conv each: exporting them fused")
            fuse_setting = "search"
    else:
        chosen, source = _named_choices(names, space, tuple(cfg.config), "export.config"), "export.config"
    table = None
    if fuse_setting == "auto":
        path = latency_path(ctx)
        if path.is_file():
            table = _load_latency(path, names, "export.fuse: auto", _latency_setup(ctx))
        else:
            table = _measure_latency(ctx, path, model)
    shape = _input_shape(ctx)
    val = _split_batches(ctx, "val")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _export_into(ctx, tmp, model, meta["arch"], base, chosen, source, fuse_setting, table, shape, val, dense)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_exists := out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if out_exists:
        shutil.rmtree(old, ignore_errors=True)
    return summary


def _read_rows(path: Path) -> list[dict]:
    try:
        rows = read_results(path)
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: {one_line(err)}") from None
    for row in rows:
        for key in [k for k, v in row.items() if v == ""]:
            del row[key]  # an empty test_accuracy: not measured
    return rows


def search_results(ctx: Context) -> tuple[list[dict], dict[tuple, str], dict]:
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
            elif "bottleneck_macs" in row:  # the budget uniform:G stands for
                by_config[row["config"]]["bottleneck_macs"] = row["bottleneck_macs"]
    return rows, labels, _read_json(folder / "best.json") or {}


def predicted_latency(ctx: Context, layers: Sequence[str]) -> LatencyTable | None:
    path = latency_path(ctx)
    if not path.is_file():
        return None
    try:
        table = LatencyTable.load(path)
    except (ValueError, OSError):
        return None
    return table if list(table.layers) == list(layers) else None


def stage_report(ctx: Context, skip_done: bool = False) -> Path | None:
    """``report.md`` and its plots in the run folder, from ``search/`` (and ``export/``) (process 0)."""
    path = ctx.run_dir / REPORT
    inputs = [ctx.run_dir / SEARCH_DIR / n for n in ("results.csv", "best.json", "uniform.csv")]
    inputs += [ctx.run_dir / folder / "summary.json" for folder in (EXPORT_DIR, f"{LATENCY_DIR}/{EXPORT_DIR}")]
    if skip_done and path.is_file() and all(path.stat().st_mtime_ns >= p.stat().st_mtime_ns for p in inputs if p.is_file()):
        ctx.log(f"[report] done already: {path}")
        return path
    if ctx.lead:
        rows, labels, best = search_results(ctx)
        arch = _gross_arch(ctx)
        names = [spec["name"] for spec in arch["layers"]]
        space = [tuple(spec["group_sizes"]) for spec in arch["layers"]]
        table = predicted_latency(ctx, names)
        for row in rows:
            if table is not None:
                row["latency_ms"] = table.cost(row["config"])
        by_config = {r["config"]: r for r in rows}
        budgets = {}
        for g in (4, 16):
            config = uniform_config(space, g)
            if config in by_config:
                # uniform:G is every layer's bottleneck at G, also where the search may keep a layer dense.
                budgets[f"uniform:{g}"] = by_config[config].get("bottleneck_macs", by_config[config]["macs"])
        summary = _read_json(ctx.run_dir / EXPORT_DIR / "summary.json")
        notes = [slower_note(ctx, summary)] if summary else []
        chosen = best.get("best") or {}
        if chosen.get("dense"):
            what = {"macs": "fewer MACs", FUSED_LATENCY: "a lower predicted latency"}.get(best.get("cost"), f"a lower {best.get('cost')}")
            notes.append(f"The search's choice {format_config(chosen['config'])} keeps {', '.join(chosen['dense'])} dense: one conv per layer, "
                         f"its bottleneck fused back (same outputs), because there the dense conv has {what} than the bottleneck.")
        if table is not None:
            notes.append(f"latency (ms): predicted by the latency table {latency_path(ctx)}, measured with {describe_setup(table.setup)}.")
        title = f"GroSS search: {ctx.cfg.name} ({arch['model']} on {Path(str(ctx.cfg.data.dataset)).name})"
        write_report(rows, ctx.run_dir, uniform={label: c for c, label in labels.items()}, budgets=budgets or None,
                     networks=measured_networks(ctx), notes=[n for n in notes if n], layer_names=names, title=title)
        ctx.log(f"[report] wrote {path} and its plots")
    ctx.barrier()
    return path


def write_config(ctx: Context) -> None:
    """The resolved configuration into the run folder's ``config.yaml`` (process 0)."""
    if ctx.lead:
        atomic_write(ctx.run_dir / "config.yaml", dump_config(ctx.cfg))


# ---------------------------------------------------------------------------------------------
# The whole pipeline


def context(
    cfg: Config,
    *,
    model: torch.nn.Module | None = None,
    resume: bool = False,
    restart: bool = False,
    force: bool = False,
    progress: bool = False,
) -> Context:
    """A :class:`Context` for ``cfg``: its device, threads and (under torchrun) process group.

    Parameters
    ----------
    model : nn.Module, optional
        The user's trained network, weights loaded: the base stage adopts it instead of training.
    resume : bool
        Continue an interrupted training stage from its ``checkpoint.safetensors``.
    restart : bool
        Start an interrupted training stage over, discarding its checkpoint.
    force : bool
        Redo a stage whose output exists (replaced only on success).
    progress : bool
        Draw progress bars on stderr.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model is not None:
        model = copy.deepcopy(model).cpu().eval()
    return Context(cfg, device, rank, world, resume=resume, restart=restart, force=force, progress=progress, model=model)


@dataclass(frozen=True)
class RunResult:
    """What :func:`run` made: the run folder, the export summary (``export/summary.json``), ``report.md``."""

    run_dir: Path
    export: dict
    report: Path


def run_stages(ctx: Context) -> RunResult:
    """Every stage in order, each skipped when its output exists (so a killed run continues)."""
    check_settings(ctx)
    write_config(ctx)
    stage_train(ctx, skip_done=True)
    stage_decompose(ctx, skip_done=True)
    stage_reconstruct(ctx, skip_done=True)
    stage_finetune(ctx, skip_done=True)
    stage_search(ctx, skip_done=True)
    summary = stage_export(ctx, skip_done=True)
    return RunResult(ctx.run_dir, summary, stage_report(ctx, skip_done=True))


def run(cfg: Config, *, model: torch.nn.Module | None = None, resume: bool = False, progress: bool = False) -> RunResult:
    """The whole pipeline for a configuration (``gross run``), in ``cfg.run_dir``.

    Parameters
    ----------
    cfg : Config
        From :func:`gross.config.resolve_config`.
    model : nn.Module, optional
        Your trained network with its weights loaded; the run starts from it (``cfg.model`` is
        then not used). Continuing the run needs the same module again.
    resume : bool
        Continue an interrupted training stage from its checkpoint; without it an interrupted
        stage is an error that says so.
    progress : bool
        Draw progress bars on stderr.
    """
    return run_stages(context(cfg, model=model, resume=resume, progress=progress))


def one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
