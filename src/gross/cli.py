"""The ``gross`` command: one subcommand per stage, and ``gross run`` for the whole pipeline.

Every subcommand only resolves the configuration, loads the previous stage's files from the run
folder, calls the library function and writes its output. The run folder (``RUNS/NAME``)::

    config.yaml                     the resolved configuration (every section)
    base/         model.safetensors arch.json metrics.jsonl     gross train
    decompose/    model.safetensors arch.json                   gross decompose
    reconstruct/  model.safetensors arch.json metrics.jsonl     gross reconstruct
    gross/        model.safetensors arch.json metrics.jsonl     gross finetune (the trained space)
    evaluate/     results.csv                                   gross run's table (until search)
    fixed/2-32-64/{decompose,reconstruct,gross}/                gross fixed --config 2,32,64

A stage whose ``model.safetensors`` exists is done: ``gross run`` skips it (so running it again
continues a killed pipeline), and the single-stage commands refuse to replace it without
``--force``. While a loop runs, ``checkpoint.safetensors`` in its folder holds the last finished
epoch; ``--resume`` continues from it. Errors the user can fix (missing or corrupt files, a
checkpoint of another architecture, a diverging loss, bad settings) end with one line on stderr
and exit status 1; set ``GROSS_DEBUG=1`` for the traceback.

Several processes: ``torchrun --nproc_per_node=2 -m gross.cli run`` (gloo on CPU, NCCL on CUDA)
trains data parallel; decomposition and evaluation run on process 0.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
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
from .macs import count_macs, macs_table
from .model import decompose, gross_layers, sample_config, search_space
from .models import build_model
from .train import (
    CHECKPOINT,
    TrainingError,
    augmentation_for,
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

__all__ = ["main", "StageError", "Context", "select_configurations", "parse_config_arg"]

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
    if ckpt.is_file() and not ctx.resume:
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


def stage_train(ctx: Context, skip_done: bool = False) -> None:
    out = ctx.run_dir / STAGE_DIRS["train"]
    if not _start(ctx, "train", out, skip_done):
        return
    cfg = ctx.cfg
    arch = _base_arch(ctx)
    torch.manual_seed(cfg.train.seed)
    model = build_model(arch["model"], **arch["kwargs"]).to(ctx.device)
    ctx.log(f"[train] {out}: {cfg.model.name} on {cfg.data.dataset}, {cfg.train.epochs} epochs")
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
    ctx.log(f"[reconstruct] {out}: {cfg.epochs} epochs")
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
    ctx.log(f"[finetune] {out}: {cfg.epochs} epochs, alpha {cfg.alpha:g}")
    history = finetune(model, ctx.splits(), cfg, arch=meta["arch"], **ctx.loop_options(out))
    _finish(ctx, out, model, meta["arch"], _stage_info(ctx, "finetune", history))


def format_config(config: Sequence[int]) -> str:
    return ",".join(str(s) for s in config)


def parse_config_arg(text: str) -> tuple[int, ...] | dict[str, int]:
    """``"2,32,64"`` (or ``2-32-64``) -> ``(2, 32, 64)``; ``"conv2=2,conv3=32"`` -> a dict."""
    parts = [p.strip() for p in text.replace("-", ",").split(",") if p.strip()] if "=" not in text else [
        p.strip() for p in text.split(",") if p.strip()
    ]
    try:
        if "=" in text:
            return {k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)}
        return tuple(int(p) for p in parts)
    except ValueError:
        raise StageError(f"--config {text!r}: expected group sizes like 2,32,64 or conv2=2,conv3=32") from None


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
    root = ctx.run_dir / "fixed" / "-".join(str(s) for s in named.values())
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
    for label, config in tqdm(configs, desc=f"evaluate ({split})", unit="config", leave=False,
                              disable=not (ctx.progress and ctx.lead), dynamic_ncols=True):
        if len(config) != len(space):
            raise StageError(f"configuration {format_config(config)} has {len(config)} sizes; the network has {len(space)} GroSS layers")
        for size, sizes, (name, _) in zip(config, space, gross_layers(model)):
            if size not in sizes:
                raise StageError(f"group size {size} is not valid for {name}; choose from {list(sizes)}")
        r = evaluate(model, batches, config)
        rows.append(Row(label, config, r.accuracy, r.loss, table.cost(config)))
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
        writer.writerow(["-".join(map(str, r.config)) if r.config else "", r.label, f"{r.accuracy:.6f}", f"{r.loss:.6f}", r.macs])
    return buf.getvalue()


def stage_table(ctx: Context) -> str | None:
    """Score the uniform and sampled configurations of the trained GroSS network (process 0)."""
    out = ctx.run_dir / "evaluate" / "results.csv"
    split = ctx.cfg.evaluate.split
    table = None
    if ctx.lead:
        arch = _base_arch(ctx)
        model, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["finetune"] / MODEL, "finetune", arch)
        base, _ = _load(ctx, ctx.run_dir / STAGE_DIRS["train"] / MODEL, "train", arch)
        rows = score_configurations(ctx, base, [], split)
        rows[0].label = "original network"
        rows += score_configurations(ctx, model, select_configurations(ctx, model), split)
        atomic_write(out, _rows_csv(rows))
        table = format_table(rows, split)
    ctx.barrier()
    return table


# ---------------------------------------------------------------------------------------------
# Command line


def _common(parser: argparse.ArgumentParser, stage: bool = True, force: bool = True) -> None:
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
        g.add_argument("--force", action="store_true", help="redo the stage even if its output exists (replaced only on success)")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gross", description="GroSS: group-size series decomposition, whole search-space training.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gross {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("run", help="the whole pipeline: train, decompose, reconstruct, finetune, score",
                       description="Run every stage in order, skipping those whose output exists (so a killed run continues "
                       "where it stopped), then score the uniform configurations and a random sample of the trained space "
                       "and print configuration / accuracy / MACs. With no arguments: the quick run on the embedded digits "
                       "dataset (a few minutes on two CPU cores).", epilog=SET_HELP, formatter_class=fmt)
    _common(p, force=False)
    for name, helptext in [
        ("train", "base training of the original network (-> base/)"),
        ("decompose", "decompose the trained network into GroSS layers (-> decompose/)"),
        ("reconstruct", "response reconstruction of the GroSS layers (-> reconstruct/)"),
        ("finetune", "finetune the whole space with sampled group sizes (-> gross/)"),
    ]:
        p = sub.add_parser(name, help=helptext, description=helptext, epilog=SET_HELP, formatter_class=fmt)
        _common(p)
    p = sub.add_parser("fixed", help="train one configuration on its own (decompose, reconstruct, finetune)",
                       description="Decompose the base network at one group size per layer, reconstruct and finetune it "
                       "with the fixed.* settings, into fixed/<config>/.", epilog=SET_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("--config", action="append", default=[], metavar="SIZES", help="2,32,64 (by position) or conv2=2,conv3=32,... (repeatable; default fixed.configs)")
    p.add_argument("--uniform", action="append", type=int, default=[], metavar="SIZE", help="the same group size in every layer (repeatable)")
    p = sub.add_parser("evaluate", help="accuracy and MACs of configurations of a trained model",
                       description="Evaluate a stage's model (default the finetuned GroSS network) at configurations.",
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


def _resolve(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for key in ("name", "runs", "device"):
        if getattr(args, key, None):
            overrides.append(f"{key}={getattr(args, key)}")
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
        progress=not args.quiet,
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
    table = stage_table(ctx)
    ctx.log("[search] not part of this version: scored the uniform configurations and a random sample instead")
    ctx.log("[export, report] not part of this version: skipped")
    if table is not None:
        print(table, flush=True)
        ctx.log(f"[run] {ctx.run_dir} in {time.perf_counter() - start:.0f}s; rows in {ctx.run_dir / 'evaluate' / 'results.csv'}")


def _cmd_fixed(ctx: Context, args: argparse.Namespace) -> None:
    configs: list[Any] = [parse_config_arg(c) for c in args.config]
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
        explicit = [parse_config_arg(c) for c in args.config]
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


def _reexec_with_passive_openmp() -> None:
    """Run this command again with ``OMP_WAIT_POLICY=PASSIVE`` unless a policy was chosen.

    PyTorch's OpenMP threads spin while they wait for work; when other processes share the
    cores, every parallel region then waits for a descheduled spinner, and on a loaded 2-core
    machine `gross run` took 3m57s instead of 67s. OpenMP reads the policy once, when torch is
    imported, so the only way to set it from here is to start again (about 2 s). Set
    ``OMP_WAIT_POLICY`` yourself (any value) to skip this.
    """
    if os.environ.get("OMP_WAIT_POLICY") or not sys.platform.startswith("linux") or torch.get_num_threads() < 2:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "gross.cli", *sys.argv[1:]], env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if argv is None and not args.print_config:
        _reexec_with_passive_openmp()
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
        print("gross: interrupted; run the same command with --resume to continue", file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
