"""Largest learning rate at which a decomposed network still trains, for two BTD settings.

A fit can be accurate and still useless: blocks that are large and cancel turn a small step on
the factors into a large step on the weight, and SGD diverges. This benchmark measures what the
user of a decomposition needs. For each ``--penalty`` (``0``: plain least squares, the library
before the block-norm penalty; ``0.1``: the default), on the trained paper network:

* the whole GroSS space (every conv but ``conv1``, every power-of-two group size, independent fits,
  sizes sampled at ``--alpha``) and the fixed uniform-4 network are decomposed;
* for each stage (response reconstruction, finetuning) and each learning rate of ``--lrs``,
  largest first, the project's own trainer (``gross.train.reconstruct`` / ``finetune``) runs
  ``--epochs`` epochs on ``--train-images`` training images from the decomposition;
* a run is stable when every loss stays finite and it ends better than it started: a lower
  reconstruction loss on held-out validation images (reconstruction) or a higher validation
  accuracy (finetuning; for the GroSS space the mean over its uniform configurations);
* the first stable rate is reported, and smaller rates are not run (a rate that trains is taken
  to imply that the smaller ones train too).

The optimiser recipe is that of ``--config`` (default ``experiments/paper-cifar10-short.yaml``:
momentum 0.9, weight decay 1e-3, batch 256, the authors' augmentation). The paper's rates are
1e-4 for the GroSS space (both stages) and 0.01 / 1e-3 for fixed networks.

    python benchmarks/trainability.py --weights runs/paper-cifar10-short/base/model.safetensors

Writes ``benchmarks/results/trainability.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from gross import conditioning, decompose, gross_layers, search_space, set_config
from gross.checkpoint import load_model
from gross.config import resolve_config
from gross.train import (
    TrainingError,
    decompose_fixed,
    evaluate,
    finetune,
    load_splits,
    prepare_batches,
    reconstruct,
    reconstruction_loss,
)

ROOT = Path(__file__).resolve().parent.parent
LRS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def uniform_configs(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """Every group size that all GroSS layers share, as a uniform configuration."""
    shared = sorted(set.intersection(*(set(s) for s in search_space(model))))
    return [tuple([s] * len(search_space(model))) for s in shared]


def score(model, original, kind: str, stage: str, val_batches) -> dict[str, float]:
    """Per uniform configuration (one entry for a fixed network), higher is better: minus the
    mean reconstruction loss on ``val_batches``, or the validation accuracy."""
    configs = uniform_configs(model) if kind != "fixed" else [None]
    out = {}
    for config in configs:
        label = "fixed" if config is None else "-".join(map(str, config))
        if stage == "reconstruct":
            model.eval()
            original.eval()
            if config is not None:
                set_config(model, config)
            with torch.no_grad():
                out[label] = -sum(float(reconstruction_loss(model, original, x)) for x, _ in val_batches) / len(val_batches)
        else:
            out[label] = evaluate(model, val_batches, config).accuracy
    return out


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def decomposition(original, kind: str, penalty: float, btd_options: dict) -> tuple[torch.nn.Module, dict]:
    start = time.perf_counter()
    model = copy.deepcopy(original)
    options = {**btd_options, "penalty": penalty}
    if kind != "fixed":
        decompose(model, skip=["conv1"], nested=kind == "gross-nested", **options)
    else:
        decompose_fixed(model, {name: 4 for name in ("conv2", "conv3", "conv4")}, **options)
    seconds = time.perf_counter() - start
    kappas = {}
    for name, layer in gross_layers(model):
        for s in layer.group_sizes:
            kappas[f"{name}/{s}"] = conditioning(layer.decomposition(s))
    return model, {"seconds": seconds, "kappa": kappas, "kappa_max": max(kappas.values())}


def trial(model, original, kind, stage, lr, cfg, data, val_batches, epochs) -> dict:
    model = copy.deepcopy(model)
    before = score(model, original, kind, stage, val_batches)
    stage_cfg = copy.deepcopy(cfg.reconstruct if stage == "reconstruct" else cfg.finetune)
    stage_cfg.lr, stage_cfg.epochs, stage_cfg.eval_every = lr, epochs, 0
    stage_cfg.milestones = []
    if kind == "fixed":
        stage_cfg.alpha = 0.0  # one size per layer: nothing to sample
    start = time.perf_counter()
    try:
        if stage == "reconstruct":
            reconstruct(model, original, data, stage_cfg)
        else:
            finetune(model, data, stage_cfg)
    except TrainingError as err:
        return {"lr": lr, "stable": False, "before": mean(before), "after": None, "diverged": str(err),
                "before_per_config": before, "seconds": time.perf_counter() - start}
    after = score(model, original, kind, stage, val_batches)
    stable = math.isfinite(mean(after)) and mean(after) > mean(before)
    return {"lr": lr, "stable": stable, "before": mean(before), "after": mean(after), "before_per_config": before,
            "after_per_config": after, "all_configs_improved": all(after[c] > before[c] for c in before),
            "seconds": time.perf_counter() - start}


def write(out: Path, settings: dict, rows: list[dict], epochs: int) -> str:
    """The JSON and Markdown files, rewritten after every row so that a stopped run keeps its rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    paper = {("gross", "reconstruct"): 1e-4, ("gross", "finetune"): 1e-4, ("fixed", "reconstruct"): 1e-2, ("fixed", "finetune"): 1e-3}
    paper.update({("gross-nested", stage): 1e-4 for stage in ("reconstruct", "finetune")})
    lines = ["| penalty | network | stage | largest kappa | largest stable lr | the paper's lr |", "|" + " --- |" * 6]
    for r in rows:
        lr = "none" if r["largest_stable_lr"] is None else f"{r['largest_stable_lr']:g}"
        name = {"gross": "GroSS space", "gross-nested": "nested GroSS space", "fixed": "fixed uniform 4"}[r["kind"]]
        lines.append(f"| {r['penalty']:g} | {name} | {r['stage']} | {r['kappa_max']:.1f} | {lr} | {paper[(r['kind'], r['stage'])]:g} |")
    table = "\n".join(lines)
    notes = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    out.with_suffix(".md").write_text(f"# Largest stable learning rate, {epochs} epochs\n\n{notes}\n\n{table}\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="base/model.safetensors of a trained paper network")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "paper-cifar10-short.yaml"),
                        help="optimiser recipe and data (run from the repository root: its data path is relative)")
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--kinds", nargs="+", default=["gross", "fixed"], choices=["gross", "gross-nested", "fixed"],
                        help="gross: the GroSS space of independent fits (the paper); gross-nested: warm-started fits")
    parser.add_argument("--stages", nargs="+", default=["reconstruct", "finetune"], choices=["reconstruct", "finetune"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=4.0, help="sampling temperature of the GroSS space")
    parser.add_argument("--tol", type=float, default=1e-5, help="gross.btd tol")
    parser.add_argument("--max-iter", type=int, default=2000, help="gross.btd max_iter")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trainability"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = resolve_config([args.config], [f"data.limit={args.train_images}"])
    cfg.reconstruct.alpha = cfg.finetune.alpha = args.alpha
    data = load_splits(cfg.data)
    val = data.val
    val_batches = prepare_batches(type(val)(val.images[: args.val_images], val.labels[: args.val_images], val.classes, val.mean, val.std),
                                  500, torch.device("cpu"), True)
    original, _ = load_model(args.weights)
    original.to(memory_format=torch.channels_last)
    btd_options = {"tol": args.tol, "max_iter": args.max_iter}

    settings = {
        "weights": args.weights, "config": args.config, "epochs": args.epochs, "train_images": len(data.train),
        "val_images": args.val_images, "alpha": args.alpha, "sampling": cfg.finetune.sampling, "btd": btd_options, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "optimiser": {"momentum": cfg.finetune.momentum, "weight_decay": cfg.finetune.weight_decay,
                      "batch_size": cfg.finetune.batch_size},
    }
    rows = []
    for penalty in args.penalties:
        for kind in args.kinds:
            model, fit = decomposition(original, kind, penalty, btd_options)
            print(f"penalty {penalty:g} {kind}: decomposed in {fit['seconds']:.1f} s, largest kappa {fit['kappa_max']:.1f}",
                  flush=True)
            for stage in args.stages:
                tried = []
                for lr in sorted(args.lrs, reverse=True):
                    result = trial(model, original, kind, stage, lr, cfg, data, val_batches, args.epochs)
                    tried.append(result)
                    after = "diverged" if result["after"] is None else f"{result['after']:.4f}"
                    worst = "" if result["after"] is None or kind == "fixed" else \
                        f", every uniform configuration better: {result['all_configs_improved']}"
                    print(f"  {stage:11s} lr {lr:g}: {'stable' if result['stable'] else 'unstable'} "
                          f"({result['before']:.4f} -> {after}{worst}, {result['seconds']:.0f} s)", flush=True)
                    if result["stable"]:
                        break
                best = next((t["lr"] for t in tried if t["stable"]), None)
                rows.append({"penalty": penalty, "kind": kind, "stage": stage, "largest_stable_lr": best,
                             "kappa_max": fit["kappa_max"], "decompose_seconds": fit["seconds"], "kappa": fit["kappa"],
                             "trials": tried})
                table = write(Path(args.out), settings, rows, args.epochs)
    print("\n" + table)


if __name__ == "__main__":
    main()
