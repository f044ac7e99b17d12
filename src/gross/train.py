"""Training loops: base training, response reconstruction, finetuning, fixed configurations.

Every loop is a plain function that takes a model, the data (:class:`gross.data.Splits`) and a
stage configuration (:mod:`gross.config`) and trains the model in place:

- :func:`train_base`: cross-entropy, every parameter (the original network);
- :func:`reconstruct`: response reconstruction (METHOD.md section 5), only the GroSS terms;
- :func:`finetune`: cross-entropy with sampled group sizes, only the GroSS terms;
- :func:`train_fixed`: one configuration on its own: decompose at one size per layer,
  reconstruct, finetune (the paper's baselines, and re-training a searched configuration);
- :func:`evaluate`: accuracy and loss at one configuration; the one evaluation function.

Group sizes are drawn every step with :func:`gross.sample_config` from a seeded
``torch.Generator``. Optimisation is SGD with momentum and a step schedule; gradients are
cleared with ``set_to_none``, so a difference term above the step's group size has no gradient
and is left alone by that step (no momentum, no weight decay): a term trains only on steps that
use it.

Data parallel: when ``torch.distributed`` is initialised (``torchrun``), every process draws the
same permutation, augmentation and configuration from identically seeded generators, takes its
share of each global batch, and trains through ``DistributedDataParallel``, whose bucketed
all-reduce overlaps the backward pass. The set of parameters that get a gradient changes every
step with the sampled configuration; it is the same on every process (same configuration), and
DDP finds it with ``find_unused_parameters``. Each process weighs its loss by its share of the
global batch, so the averaged gradient times the number of processes is the global batch's mean
gradient, as in one process (response reconstruction's loss is a norm over each process's
images, so there it is the mean of the processes' losses). Parameters stay identical on every
process; BatchNorm running statistics are averaged at the end of each epoch.

Checkpoints (``out_dir/checkpoint.safetensors``, see :mod:`gross.checkpoint`) are written every
``checkpoint_every`` epochs by process 0 and hold the model, the optimizer, the epoch and the
generator states; ``resume=True`` continues from one. Per-epoch metrics are appended to
``out_dir/metrics.jsonl``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import CheckpointError, atomic_write, load_training_state, read_meta, save_training_state
from .config import (
    DataConfig,
    FinetuneConfig,
    OptimConfig,
    ReconstructConfig,
    TrainConfig,
    config_to_dict,
    milestone_epochs,
)
from .data import (
    Augmentation,
    Dataset,
    ImageSet,
    ResizedCrop,
    Splits,
    StreamedBatches,
    batches,
    center_crop,
    epoch_order,
    load_dataset,
    normalize,
    num_batches,
    resolve_augment,
)
from .model import Config, decompose, format_config, get_config, gross_layers, sample_config, search_space, set_config
from .sampling import DEFAULT_FORM
from .series import GroSSConv2d

__all__ = [
    "TrainingError",
    "EvalResult",
    "resolve_device",
    "init_distributed",
    "load_splits",
    "augmentation_for",
    "model_kwargs",
    "gross_parameters",
    "train_base",
    "reconstruct",
    "reconstruction_loss",
    "finetune",
    "decompose_fixed",
    "train_fixed",
    "evaluate",
    "prepare_batches",
    "calibration_batches",
    "CHECKPOINT",
    "METRICS",
]

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
DEFAULT_AUGMENTATION = Augmentation()  # pad 4, random crop, flip (frozen dataclass)

# Settings that do not change the trajectory of a run and may differ when it is resumed.
_RESUME_FREE = {"eval_every", "checkpoint_every"}


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, no device); the message says what to do."""


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # fraction of correct top-1 predictions
    loss: float  # mean cross-entropy
    count: int  # images evaluated


# ---------------------------------------------------------------------------------------------
# Devices, processes, data, models


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Under ``torchrun`` a bare ``"cuda"`` means this process's ``LOCAL_RANK`` device.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = spec or "auto"
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise TrainingError(f"unknown device {spec!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("no CUDA device is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA).

    Returns ``(rank, world_size)``; ``(0, 1)`` outside ``torchrun``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_splits(
    cfg: DataConfig, *, cache: str | Path | None = None, progress: bool = True, log: Callable[[str], None] | None = None
) -> Splits:
    """Train, validation and test sets as :class:`gross.data.Splits` for a data configuration.

    ``cache`` is the folder for decoded image folders when ``cfg.cache`` is ``""`` (the
    pipeline passes the run folder's); ``log`` receives the image folder's one-line facts.
    """
    val: int | float = cfg.val_size if cfg.val_size < 1 else int(cfg.val_size)
    splits = load_dataset(
        cfg.dataset, val_size=val, seed=cfg.split_seed, download=cfg.download, root=cfg.root, mean=cfg.mean, std=cfg.std,
        image_size=cfg.image_size, channels=cfg.channels, augment=cfg.augment, memory_gb=cfg.memory_gb,
        cache=(cache if cfg.cache == "" else cfg.cache), workers=cfg.workers, skip_bad=cfg.skip_bad, progress=progress, log=log,
    )
    if cfg.limit:
        keep = torch.arange(min(cfg.limit, len(splits.train)))
        splits = Splits(splits.train.subset(keep), splits.val, splits.test)
    return splits


def augmentation_for(cfg: DataConfig, shape: Sequence[int] | None = None) -> Augmentation | ResizedCrop | None:
    """The training augmentation of a data configuration (``None`` when it does nothing).

    ``shape`` (``(C, H, W)`` of the network's input, :attr:`gross.data.ImageSet.shape`) resolves
    ``data.augment: auto``; without it ``auto`` is ``pad_crop``.
    """
    kind = resolve_augment(cfg.augment, shape[-2:]) if shape is not None else ("pad_crop" if cfg.augment == "auto" else cfg.augment)
    if kind == "random_resized_crop":
        return ResizedCrop(flip=cfg.flip)
    if kind == "none" or (cfg.pad == 0 and not cfg.flip):
        return None
    return Augmentation(pad=cfg.pad, flip=cfg.flip)


def model_kwargs(name: str, kwargs: Mapping[str, Any], dataset: Dataset) -> dict:
    """Constructor arguments with ``num_classes``, ``in_channels`` and ``image_size`` from the data.

    ``name`` is a built-in name or a reference (:func:`gross.models.resolve_model`). Only the
    arguments the constructor declares by name are added, and given ones are kept.
    """
    from .models import accepted_kwargs

    accepted = accepted_kwargs(name)
    derived = {
        "num_classes": len(dataset.classes),
        "in_channels": int(dataset.shape[0]),
        "image_size": int(dataset.shape[-1]),
    }
    out = dict(kwargs)
    for key, value in derived.items():
        if key in accepted and key not in out:
            out[key] = value
    return out


def gross_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable difference terms (``first``, ``core``, ``last``) of every GroSS layer."""
    params: list[nn.Parameter] = []
    for _, m in gross_layers(model):
        params += list(m.first) + list(m.core) + list(m.last)
    return params


@contextmanager
def _trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` require gradients; the flags are restored after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-d weights were converted to channels-last memory format."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] * p.shape[2] * p.shape[3] > 1 and (p.shape[2] > 1 or p.shape[3] > 1):
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Batches


def _train_batches(
    dataset: ImageSet,
    batch_size: int,
    *,
    augmentation: Augmentation | ResizedCrop | None,
    generator: torch.Generator,
    device: torch.device,
    channels_last: bool,
    rank: int,
    world: int,
) -> Iterator[tuple[Tensor, Tensor, int]]:
    """One shuffled, augmented epoch; this process's share of every global batch.

    Draws exactly what :func:`gross.data.batches` draws (a permutation, then per batch the crop
    offsets and flips of the whole global batch), so one process sees the same batches as
    ``data.batches(..., shuffle=True)`` and every process of a group stays in step. Yields
    ``(images, labels, global_batch_size)``. With several processes a final batch too small to
    give every process an image is skipped.

    The index batches are known before any image is read, so a streamed dataset's workers decode
    this process's share of each global batch ahead of use; the augmentation is drawn batch by
    batch, in the same order as in memory, since it needs only the batch's size.
    """
    n = len(dataset)
    _, h, w = dataset.stored_shape
    order = epoch_order(n, True, generator)
    plan: list[tuple[int, int, int, Tensor | None]] = []  # (global size, share's start, end, share's rows)
    for b in range(num_batches(n, batch_size)):
        index = order[b * batch_size : (b + 1) * batch_size]
        m = len(index)
        lo, hi = m * rank // world, m * (rank + 1) // world
        plan.append((m, lo, hi, index[lo:hi] if m >= world else None))
    images = dataset.load([rows for *_, rows in plan if rows is not None], device)
    for m, lo, hi, rows in plan:
        drawn = augmentation.draw(m, h, w, generator) if augmentation is not None else None
        if rows is None:
            continue  # too small to give every process an image (drawn all the same, as in one process)
        x = next(images)
        y = dataset.labels[rows.to(dataset.labels.device)].to(device, non_blocking=True)
        x = augmentation.apply(x, tuple(t[lo:hi] for t in drawn), dataset.size) if drawn is not None else center_crop(x, dataset.size)
        yield normalize(x, dataset.mean, dataset.std, channels_last=channels_last), y, m


def prepare_batches(
    dataset: ImageSet,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> Sequence[tuple[Tensor, Tensor]]:
    """Normalised ``(images, labels)`` batches of a dataset, in order, ready to evaluate many times.

    A search that scores thousands of configurations on the same split passes these to
    :func:`evaluate` instead of the dataset. In memory they are a list, cut and normalised once;
    a streamed dataset gives a :class:`gross.data.StreamedBatches`, decoded again on every pass
    (its normalised images would not fit in memory).
    """
    if not dataset.in_memory:
        return StreamedBatches(dataset, batch_size, device, channels_last)
    return list(batches(dataset, batch_size, device=device, channels_last=channels_last))


# ---------------------------------------------------------------------------------------------
# Evaluation


@contextmanager
def _at_config(model: nn.Module, config: Config | None) -> Iterator[None]:
    if config is None or not gross_layers(model):
        if config is not None:
            raise ValueError("a configuration was given but the model has no GroSS layers")
        yield
        return
    saved = get_config(model)
    set_config(model, config)
    try:
        yield
    finally:
        set_config(model, saved)


def _eval_sums(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]] | Iterator[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor, int]:
    loss = correct = None
    count = 0
    for x, y in batches:
        logits = model(x)
        batch_loss = F.cross_entropy(logits.float(), y, reduction="sum")
        batch_correct = (logits.argmax(1) == y).sum()
        loss = batch_loss if loss is None else loss + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        count += len(y)
    if loss is None:
        zero = torch.zeros((), device=_model_device(model))
        return zero, zero, 0
    return loss, correct, count


def calibration_batches(
    dataset: ImageSet,
    count: int,
    seed: int = 0,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    augmentation: Augmentation | ResizedCrop | None = None,
) -> list[Tensor]:
    """``count`` images drawn from ``dataset`` with ``seed``, augmented as in training, normalised.

    The images on which :func:`gross.recalibrate_batchnorm` re-estimates each configuration's
    BatchNorm statistics (a few hundred training images suffice). Pass the training
    augmentation: the network learnt to work with the batch statistics of augmented images, and
    statistics of clean images (no zero-padded crops) cost accuracy (measured in
    experiments/RESULTS.md).

    Returns
    -------
    list of Tensor, each (B, C, H, W)
    """
    if not 0 < count <= len(dataset):
        raise ValueError(f"cannot draw {count} calibration images from {len(dataset)}")
    generator = torch.Generator().manual_seed(seed)
    chosen = dataset.subset(torch.randperm(len(dataset), generator=generator)[:count])
    # A few hundred images: read at once (decoded, when streamed) and augmented as one batch.
    (images,) = chosen.load([torch.arange(count)])
    _, h, w = chosen.stored_shape
    if augmentation is not None:
        images = augmentation.apply(images, augmentation.draw(count, h, w, generator), chosen.size)
    else:
        images = center_crop(images, chosen.size)
    chosen = Dataset(images.contiguous(), chosen.labels.to(images.device), chosen.classes, chosen.mean, chosen.std)
    return [x for x, _ in prepare_batches(chosen, batch_size, device, channels_last)]


def evaluate(
    model: nn.Module,
    data: ImageSet | Sequence[tuple[Tensor, Tensor]],
    config: Config | None = None,
    *,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    channels_last: bool | None = None,
) -> EvalResult:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` at a configuration.

    Runs in eval mode under ``torch.inference_mode``; the model's mode and configuration are
    restored afterwards.

    Parameters
    ----------
    model : nn.Module
        Any classifier; ``config`` needs GroSS layers.
    data : Dataset or list of (images, labels)
        A dataset (cut into batches of ``batch_size`` and normalised on ``device``), or batches
        from :func:`prepare_batches` (used as they are; the fast path for many configurations).
    config : tuple or dict, optional
        Group sizes to evaluate at (see :func:`gross.set_config`); default the active ones.
    device : optional
        Where a dataset's batches go; default the model's device.
    channels_last : bool, optional
        Memory format of a dataset's batches; default that of the model's conv weights.
    """
    if isinstance(data, ImageSet):
        if len(data) == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        device = _model_device(model) if device is None else torch.device(device)
        if channels_last is None:
            channels_last = _is_channels_last(model)
        data = prepare_batches(data, batch_size, device, channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _at_config(model, config):
            loss, correct, count = _eval_sums(model, data)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return EvalResult(accuracy=float(correct) / count, loss=float(loss) / count, count=count)


def _evaluate_shared(
    model: nn.Module, dataset: ImageSet, config: Config | None, batch_size: int, device: torch.device, channels_last: bool
) -> dict[str, float]:
    """:func:`evaluate` with the images split over the processes of a group, results summed."""
    rank, world = _world()
    n = len(dataset)
    part = dataset.subset(torch.arange(n * rank // world, n * (rank + 1) // world))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _at_config(model, config):
            loss, correct, count = _eval_sums(model, prepare_batches(part, batch_size, device, channels_last))
            sums = torch.stack([loss.float(), correct.float(), torch.tensor(float(count), device=loss.device)])
    finally:
        model.train(was_training)
    if world > 1:
        sums = sums.clone()
        dist.all_reduce(sums)
    loss_sum, correct_sum, total = sums.tolist()
    return {"loss": loss_sum / max(total, 1), "acc": correct_sum / max(total, 1)}


# ---------------------------------------------------------------------------------------------
# The loop


def _lr_at(cfg: OptimConfig, epoch: int) -> float:
    drops = sum(epoch >= m for m in milestone_epochs(cfg.milestones, cfg.epochs))
    return cfg.lr * cfg.gamma**drops


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64), so nearby seeds give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


_STAGE_IDS = {"train": 1, "reconstruct": 2, "finetune": 3}


def _data_parallel(model: nn.Module, device: torch.device, sampled: bool) -> DistributedDataParallel:
    """``model`` wrapped for data-parallel training, starting from process 0's weights everywhere.

    With ``sampled`` configurations every process sets the same one before each step, so the
    GroSS terms of the sizes not drawn are unused alike on all of them; DDP finds them
    (``find_unused_parameters``) and reduces the others in buckets that overlap the backward
    pass. BatchNorm statistics are averaged once per epoch (:func:`_sync_buffers`) rather than
    broadcast at every forward.
    """
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        find_unused_parameters=sampled,
    )


def _sync_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm statistics) over the process group."""
    _, world = _world()
    if world == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)


def _config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - _RESUME_FREE)
    return [f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


# step(net, images, labels, global batch size) -> (loss to backpropagate, summed loss, correct or None);
# ``net`` runs the model: the model itself, or its DistributedDataParallel wrapper.
StepFn = Callable[[nn.Module, Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor | None]]


def _fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    data: Splits,
    cfg: OptimConfig,
    *,
    stage: str,
    step: StepFn,
    alpha: float | None,
    sampling: str = DEFAULT_FORM,
    mode: Callable[[], None],
    eval_configs: Mapping[str, Config | None],
    device: torch.device,
    out_dir: Path | None,
    resume: bool,
    progress: bool,
    augmentation: Augmentation | ResizedCrop | None,
    channels_last: bool,
    eval_batch_size: int,
    arch: Mapping[str, Any] | None,
    validate: bool = True,
) -> list[dict]:
    rank, world = _world()
    lead = rank == 0
    if not params:
        raise ValueError(f"{stage}: nothing to train")
    data_gen = torch.Generator().manual_seed(_seed(cfg.seed, _STAGE_IDS[stage], 1))
    sample_gen = torch.Generator().manual_seed(_seed(cfg.seed, _STAGE_IDS[stage], 2))
    generators = {"data": data_gen, "sample": sample_gen}
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cfg_dict = config_to_dict(cfg)
    ckpt = out_dir / CHECKPOINT if out_dir is not None else None
    metrics = out_dir / METRICS if out_dir is not None else None
    start = 0
    if ckpt is not None and resume and ckpt.is_file():
        saved = read_meta(ckpt)
        if saved.get("stage") != stage:
            raise CheckpointError(f"{ckpt} was written by the {saved.get('stage')} stage, not {stage}; delete it to restart")
        diff = _config_diff(saved.get("config", {}), cfg_dict)
        if diff:
            raise CheckpointError(
                f"{ckpt} was written with {stage}.{', '.join(diff)}; resume with the same settings or delete it to restart"
            )
        meta = load_training_state(ckpt, model, optimizer, generators, expect=arch)
        start = int(meta["epoch"])
    elif lead and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    history = [r for r in _read_metrics(metrics) if r.get("epoch", 0) <= start] if metrics and start else []
    if lead and metrics is not None:
        atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in history))
    if start >= cfg.epochs:
        return history
    saved_epoch = start
    net = _data_parallel(model, device, sampled=alpha is not None) if world > 1 else model

    epochs = tqdm(range(start, cfg.epochs), desc=stage, initial=start, total=cfg.epochs, disable=not (progress and lead), dynamic_ncols=True)
    for epoch in epochs:
        lr = _lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout draws from the global generator: seed it per epoch and process, so that a
        # resumed run draws what the uninterrupted one drew.
        torch.manual_seed(_seed(cfg.seed, _STAGE_IDS[stage], 3, epoch, rank))
        mode()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        tick = time.perf_counter()
        batches = _train_batches(
            data.train, cfg.batch_size, augmentation=augmentation, generator=data_gen, device=device,
            channels_last=channels_last, rank=rank, world=world,
        )
        total = num_batches(len(data.train), cfg.batch_size)
        bar = tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not (progress and lead), dynamic_ncols=True)
        for i, (x, y, global_n) in enumerate(bar):
            if alpha is not None:
                set_config(model, sample_config(model, alpha, sample_gen, sampling))
            optimizer.zero_grad(set_to_none=True)
            loss, batch_loss_sum, batch_correct = step(net, x, y, global_n)
            # DDP averages the gradients over the processes; each loss is this process's share
            # of the global batch's, so the average times the world is the global gradient.
            (loss * world if world > 1 else loss).backward()
            stats = torch.stack([batch_loss_sum.detach().double(), (batch_correct if batch_correct is not None else torch.zeros((), device=device)).double()])
            if world > 1:
                dist.all_reduce(stats)
            # Checking the loss syncs with the device: every step on the CPU, every 25 on a GPU.
            # After an all-reduce every process sees the same loss and stops at the same step.
            if device.type == "cpu" or i % 25 == 0:
                value = float(stats[0]) / global_n
                if not math.isfinite(value):
                    raise _diverged(stage, value, epoch, i, lr, ckpt, saved_epoch)
                if progress and lead:
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            optimizer.step()
            loss_sum += stats[0]
            correct_sum += stats[1]
            seen += global_n
        bar.close()
        if not math.isfinite(float(loss_sum)):
            raise _diverged(stage, float(loss_sum), epoch, None, lr, ckpt, saved_epoch)
        _sync_buffers(model)
        record: dict[str, Any] = {"stage": stage, "epoch": epoch + 1, "lr": lr, "loss": float(loss_sum) / max(seen, 1)}
        if stage != "reconstruct":
            record["acc"] = float(correct_sum) / max(seen, 1)
        last = epoch + 1 == cfg.epochs
        if validate and len(data.val) and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            for label, config in eval_configs.items():
                result = _evaluate_shared(model, data.val, config, eval_batch_size, device, channels_last)
                record[f"val_loss{label}"] = result["loss"]
                record[f"val_acc{label}"] = result["acc"]
        record["seconds"] = round(time.perf_counter() - tick, 3)
        history.append(record)
        if progress and lead:
            shown = {k: f"{v:.4f}" for k, v in record.items() if k.startswith(("loss", "acc", "val_acc"))}
            epochs.set_postfix(shown, refresh=False)
        if lead and metrics is not None:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        if lead and ckpt is not None and cfg.checkpoint_every and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
            save_training_state(
                ckpt, model, optimizer, generators,
                {"stage": stage, "epoch": epoch + 1, "config": cfg_dict, "arch": dict(arch) if arch else None,
                 "schedule": {"milestones": milestone_epochs(cfg.milestones, cfg.epochs), "gamma": cfg.gamma, "lr": lr},
                 "world_size": world},
            )
            saved_epoch = epoch + 1
    epochs.close()
    return history


def _diverged(
    stage: str, value: float, epoch: int, step: int | None, lr: float, ckpt: Path | None, saved_epoch: int
) -> TrainingError:
    where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
    kept = f"; {ckpt} still holds epoch {saved_epoch}" if ckpt is not None and saved_epoch else ""
    return TrainingError(
        f"{stage}: the loss became {value} in {where}; lower {stage}.lr (now {lr:g}) or check the data "
        f"(nothing of this epoch was saved{kept})"
    )


def _loop_options(kw: dict) -> dict:
    out_dir = kw.pop("out_dir", None)
    return {
        "device": kw.pop("device", None),
        "out_dir": Path(out_dir) if out_dir is not None else None,
        "resume": kw.pop("resume", False),
        "progress": kw.pop("progress", False),
        "augmentation": kw.pop("augmentation", DEFAULT_AUGMENTATION),
        "channels_last": kw.pop("channels_last", True),
        "eval_batch_size": kw.pop("eval_batch_size", 1000),
        "arch": kw.pop("arch", None),
    }


def _prepare(model: nn.Module, device: torch.device | str | None, channels_last: bool) -> torch.device:
    device = _model_device(model) if device is None else resolve_device(device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return device


def _max_config(model: nn.Module) -> tuple[int, ...]:
    return tuple(s[-1] for s in search_space(model))


def _min_config(model: nn.Module) -> tuple[int, ...]:
    return tuple(s[0] for s in search_space(model))


def _gross_eval_configs(model: nn.Module) -> dict[str, Config]:
    space = search_space(model)
    if all(len(s) == 1 for s in space):
        return {"": _max_config(model)}
    # Named by configuration ("val_acc_32-32-64"): a smaller network may score higher.
    return {f"_{format_config(c)}": c for c in (_max_config(model), _min_config(model))}


# ---------------------------------------------------------------------------------------------
# Stages


def train_base(
    model: nn.Module,
    data: Splits,
    cfg: TrainConfig | None = None,
    *,
    device: torch.device | str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    augmentation: Augmentation | ResizedCrop | None = DEFAULT_AUGMENTATION,
    channels_last: bool = True,
    eval_batch_size: int = 1000,
    arch: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Train every parameter of ``model`` with cross-entropy, in place.

    Parameters
    ----------
    model : nn.Module
        The original network (GroSS layers train too if it has any).
    data : Splits
        ``train`` is trained on; ``val`` is scored every ``cfg.eval_every`` epochs.
    cfg : TrainConfig
        Epochs, batch, SGD, schedule and seed; default :class:`gross.config.TrainConfig`.
    device : optional
        Default the model's device; ``"auto"`` picks CUDA when available.
    out_dir : path, optional
        Folder for ``checkpoint.safetensors`` and ``metrics.jsonl`` (nothing written without it).
    resume : bool
        Continue from ``out_dir/checkpoint.safetensors`` when it exists.
    progress : bool
        Show progress bars (epochs, and batches within an epoch).
    augmentation : Augmentation, ResizedCrop or None
        Batched random crop (padded, or resized) and flip of the training images.
    channels_last : bool
        Convert the model and the batches to channels-last memory format (about 1.5x faster
        convolutions on CPU, see benchmarks/epoch_time.py).
    arch : dict, optional
        Architecture record (:func:`gross.checkpoint.make_arch`) stored in checkpoints and
        required of the checkpoint on resume.

    Returns
    -------
    list of dict
        One record per epoch (``loss``, ``acc``, ``val_loss``, ``val_acc``, ``lr``, ``seconds``).
    """
    cfg = cfg or TrainConfig()
    dev = _prepare(model, device, channels_last)

    def step(net: nn.Module, x: Tensor, y: Tensor, global_n: int) -> tuple[Tensor, Tensor, Tensor]:
        logits = net(x)
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        return loss_sum / global_n, loss_sum, (logits.argmax(1) == y).sum()

    return _fit(
        model, [p for p in model.parameters()], data, cfg, stage="train", step=step, alpha=None, mode=model.train,
        eval_configs={"": None}, device=dev, out_dir=Path(out_dir) if out_dir is not None else None, resume=resume,
        progress=progress, augmentation=augmentation, channels_last=channels_last, eval_batch_size=eval_batch_size,
        arch=arch,
    )


class _Stop(Exception):
    """Raised by a hook after the last layer of interest: the rest of the network is not needed."""


@contextmanager
def _capture(model: nn.Module, names: Sequence[str], out: dict[str, Tensor], stop: bool = True) -> Iterator[None]:
    """Record the outputs of the named modules into ``out``; with ``stop``, end the forward after the last one."""
    last = names[-1]

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            out[name] = output
            if stop and name == last:
                raise _Stop

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_to(model: nn.Module, x: Tensor) -> None:
    try:
        model(x)
    except _Stop:
        pass


def reconstruction_loss(
    model: nn.Module, original: nn.Module, x: Tensor, names: Sequence[str] | None = None, *, run: nn.Module | None = None
) -> Tensor:
    """``sum_l ||A'_l - A_l||_F / ||A_l||_F`` over the GroSS layers ``l`` (METHOD.md section 5).

    ``A_l`` is the output of the original network's layer of the same name and ``A'_l`` that of
    the GroSS layer, both networks run on the same images ``x`` (each on its own activations).
    The original runs without gradients; the forwards stop after the last such layer. ``run``
    (a DistributedDataParallel wrapper of ``model``) runs ``model`` to its output instead, which
    DDP needs to see.
    """
    names = list(names) if names is not None else [n for n, _ in gross_layers(model)]
    target: dict[str, Tensor] = {}
    actual: dict[str, Tensor] = {}
    with torch.no_grad(), _capture(original, names, target):
        _run_to(original, x)
    if run is None or run is model:
        with _capture(model, names, actual):
            _run_to(model, x)
    else:
        with _capture(model, names, actual, stop=False):
            run(x)
    terms = [
        torch.linalg.vector_norm(actual[n] - target[n]) / torch.linalg.vector_norm(target[n]).clamp_min(1e-12)
        for n in names
    ]
    return torch.stack(terms).sum()


def _check_pair(model: nn.Module, original: nn.Module) -> list[str]:
    names = [n for n, _ in gross_layers(model)]
    if not names:
        raise ValueError("the model has no GroSS layers; call gross.decompose(model) first")
    for n in names:
        try:
            m = original.get_submodule(n)
        except AttributeError:
            raise ValueError(f"the original network has no layer {n!r}; is it the network that was decomposed?") from None
        if isinstance(m, GroSSConv2d):
            raise ValueError(f"the original network's layer {n!r} is a GroSS layer; pass the undecomposed network")
    return names


def reconstruct(
    model: nn.Module,
    original: nn.Module,
    data: Splits,
    cfg: ReconstructConfig | None = None,
    **options: Any,
) -> list[dict]:
    """Response reconstruction: train the GroSS terms to reproduce the original layers' outputs.

    Each step draws a configuration (temperature ``cfg.alpha``), runs ``original`` and ``model`` on
    the same augmented images and minimises :func:`reconstruction_loss`. Only the ``first``,
    ``core`` and ``last`` terms of the GroSS layers train; every other parameter, the GroSS
    biases and ``original`` are frozen. With ``cfg.bn_eval`` (default) both networks run in eval
    mode: BatchNorm uses its running statistics and does not update them, and dropout is off, so
    the target is a fixed function of the image.

    Keyword options are those of :func:`train_base`. The model is left at its largest
    configuration. Returns the per-epoch records (``loss`` is the reconstruction loss;
    ``val_acc_32-32-64`` and the like: the validation accuracy at the largest and smallest
    configurations).
    """
    cfg = cfg or ReconstructConfig()
    opts = _loop_options(options)
    if options:
        raise TypeError(f"unexpected options {sorted(options)}")
    names = _check_pair(model, original)
    dev = _prepare(model, opts.pop("device"), opts["channels_last"])
    original.to(dev)
    if opts["channels_last"]:
        original.to(memory_format=torch.channels_last)
    original_mode = original.training
    params = gross_parameters(model)

    def mode() -> None:
        model.train(not cfg.bn_eval)
        original.train(not cfg.bn_eval)

    def step(net: nn.Module, x: Tensor, y: Tensor, global_n: int) -> tuple[Tensor, Tensor, None]:
        loss = reconstruction_loss(model, original, x, names, run=net)
        share = len(x) / global_n
        return loss * share, loss.detach() * len(x), None

    try:
        with _trainable(model, params), _trainable(original, []):
            return _fit(
                model, params, data, cfg, stage="reconstruct", step=step, alpha=cfg.alpha, sampling=cfg.sampling, mode=mode,
                eval_configs=_gross_eval_configs(model), device=dev, **opts,
            )
    finally:
        original.train(original_mode)
        set_config(model, _max_config(model))


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Summed ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over a batch of logits (N, classes).

    The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015).
    """
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="sum", log_target=True) * t * t


def finetune(
    model: nn.Module, data: Splits, cfg: FinetuneConfig | None = None, *, teacher: nn.Module | None = None, **options: Any
) -> list[dict]:
    """Finetune the GroSS terms with cross-entropy, a configuration drawn every step.

    Only the ``first``, ``core`` and ``last`` terms train. ``cfg.alpha`` is the sampling
    temperature (METHOD.md section 4). With ``cfg.bn_eval`` BatchNorm keeps its running
    statistics (dropout stays on). ``cfg.distill`` mixes in distillation from ``teacher`` (the
    original network, in eval mode, on the same augmented batch): ``(1 - w) CE + w T^2 KL``.
    ``cfg.sandwich`` trains the largest and the smallest configuration beside the sampled one
    every step and averages the three gradients. Keyword options are those of
    :func:`train_base`. The model is left at its largest configuration.
    """
    cfg = cfg or FinetuneConfig()
    opts = _loop_options(options)
    if options:
        raise TypeError(f"unexpected options {sorted(options)}")
    if not gross_layers(model):
        raise ValueError("the model has no GroSS layers; call gross.decompose(model) first")
    if cfg.distill and teacher is None:
        raise ValueError("finetune.distill needs the teacher: finetune(..., teacher=original network)")
    dev = _prepare(model, opts.pop("device"), opts["channels_last"])
    if cfg.distill:
        # A copy: the caller's network (train_fixed's original) keeps its device, format and mode.
        teacher = copy.deepcopy(teacher)
        _prepare(teacher, dev, opts["channels_last"])
        teacher.eval()
    params = gross_parameters(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if cfg.bn_eval else []
    extra = [_max_config(model), _min_config(model)] if cfg.sandwich else []
    share = 1.0 / (1 + len(extra))

    def mode() -> None:
        model.train()
        for bn in norms:
            bn.eval()

    def loss_of(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        ce = F.cross_entropy(logits, y, reduction="sum")
        if target is None:
            return ce
        return (1 - cfg.distill) * ce + cfg.distill * distillation_loss(logits, target, cfg.temperature)

    def step(net: nn.Module, x: Tensor, y: Tensor, global_n: int) -> tuple[Tensor, Tensor, Tensor]:
        target = None
        if cfg.distill:
            with torch.no_grad():
                target = teacher(x)
        if extra:
            # The largest and smallest configurations' gradients accumulate locally (no_sync) and
            # travel with the sampled one's, which _fit backpropagates; under DDP the world factor
            # is _fit's too.
            _, world = _world()
            sampled = get_config(model)
            with net.no_sync() if isinstance(net, DistributedDataParallel) else nullcontext():
                for config in extra:
                    set_config(model, config)
                    (loss_of(net(x), y, target) * (share * world / global_n)).backward()
            set_config(model, sampled)
        logits = net(x)
        loss_sum = loss_of(logits, y, target)
        return loss_sum * (share / global_n), loss_sum, (logits.argmax(1) == y).sum()

    try:
        with _trainable(model, params):
            return _fit(
                model, params, data, cfg, stage="finetune", step=step, alpha=cfg.alpha, sampling=cfg.sampling, mode=mode,
                eval_configs=_gross_eval_configs(model), device=dev, **opts,
            )
    finally:
        set_config(model, _max_config(model))


def decompose_fixed(
    model: nn.Module,
    config: Mapping[str, int],
    *,
    progress: Callable[[str, int, int, int, float, float], None] | None = None,
    **btd_options: Any,
) -> nn.Module:
    """Replace each named conv by a GroSS layer with that single group size, in place.

    ``btd_options`` go to :func:`gross.btd`.
    """
    if not config:
        raise ValueError("the fixed configuration names no layers")
    sizes = {name: [int(size)] for name, size in config.items()}
    return decompose(model, sizes, nested=False, progress=progress, **btd_options)


def train_fixed(
    original: nn.Module,
    config: Mapping[str, int],
    data: Splits,
    reconstruct_cfg: ReconstructConfig | None = None,
    finetune_cfg: FinetuneConfig | None = None,
    *,
    btd_options: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    **options: Any,
) -> tuple[nn.Module, dict[str, list[dict]]]:
    """The fixed-configuration pipeline: decompose at one size per layer, reconstruct, finetune.

    ``original`` is not modified. With ``out_dir``, the two loops keep their checkpoints and
    metrics in ``out_dir/reconstruct`` and ``out_dir/finetune``. Other keyword options are those
    of :func:`train_base`.

    Returns
    -------
    model : nn.Module
        A copy of ``original`` with a single-size GroSS layer per entry of ``config``.
    history : dict
        ``{"reconstruct": [...], "finetune": [...]}`` per-epoch records.
    """
    model = decompose_fixed(copy.deepcopy(original), config, **dict(btd_options or {}))
    base = Path(out_dir) if out_dir is not None else None
    history = {
        "reconstruct": reconstruct(model, original, data, reconstruct_cfg, out_dir=base / "reconstruct" if base else None, **options),
        "finetune": finetune(model, data, finetune_cfg, teacher=original, out_dir=base / "finetune" if base else None, **options),
    }
    return model, history
