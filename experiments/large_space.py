"""Large-space search of a trained GroSS network under uniform budgets, with and without BatchNorm
recalibration per configuration.

    gross run -c experiments/resnet20-cifar10-short.yaml          # base, GroSS training (and one search)
    python experiments/large_space.py -c experiments/resnet20-cifar10-short.yaml

For each number of calibration images (``--recalibrate``, default 0 and 500) and each budget
(``--budgets``, default the MACs of uniform group size 4 and 16) it runs the configured search
strategy (beam or evolution) on ``--val-images`` images of the validation split (a seeded draw;
the whole split costs too much CPU time for a ResNet) into ``runs/NAME/search-uniformB-recalN/``
(resumable), scores the found and the uniform configuration on the same images and on the whole
test split, and writes
``experiments/results/NAME/large_space.json``: per budget the configuration found, its val and
test accuracy and MACs, the uniform one's, and how many configurations were scored.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from gross.checkpoint import load_model
from gross.config import resolve_config
from gross.model import search_space
from gross.search import (
    evaluate_configs,
    format_config,
    macs_cost,
    search,
    uniform_config,
)
from gross.train import (
    augmentation_for,
    calibration_batches,
    load_splits,
    prepare_batches,
)

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 16], help="uniform group sizes whose MACs are the budgets")
    parser.add_argument("--recalibrate", type=int, nargs="+", default=[0, 500], help="calibration images (0: trained statistics)")
    parser.add_argument("--clean-calibration", action="store_true",
                        help="calibrate on unaugmented images (default: augmented as in training); suffix -clean on folders and output")
    parser.add_argument("--val-images", type=int, default=2000, help="validation images the search scores on (0: all)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of the configuration")
    parser.add_argument("--out", default=None, help="default experiments/results/NAME/large_space.json")
    args = parser.parse_args()

    cfg = resolve_config([ROOT / args.config], args.set)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = ROOT / cfg.runs / cfg.name
    model, _ = load_model(run / "gross" / "model.safetensors", "cpu")
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    splits = load_splits(cfg.data)
    d = cfg.data
    val_set = splits.val
    if args.val_images:
        val_set = val_set.subset(torch.randperm(len(val_set), generator=torch.Generator().manual_seed(d.split_seed))[: args.val_images])
    val = prepare_batches(val_set, d.eval_batch_size, "cpu", cfg.channels_last)
    test = prepare_batches(splits.test, d.eval_batch_size, "cpu", cfg.channels_last)
    shape = tuple(splits.val.images.shape[1:])
    space = search_space(model)
    macs = macs_cost(model, shape)
    s = cfg.search
    options = {"beam": {"width": s.beam_width}, "evolution": {"population": s.population, "max_evaluations": s.max_evaluations, "seed": s.seed}}
    if s.strategy not in options:
        raise SystemExit(f"search.strategy must be beam or evolution for a large space, got {s.strategy}")

    suffix = "-clean" if args.clean_calibration else ""
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / cfg.name / f"large_space{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": args.config, "overrides": args.set, "val_images": len(val_set), "calibration": "clean" if suffix else "augmented", "space": [list(x) for x in space],
              "space_size": math.prod(len(x) for x in space), "strategy": s.strategy, "options": options[s.strategy], "runs": []}
    for count in args.recalibrate:
        calibration = (
            calibration_batches(splits.train, count, d.split_seed, d.eval_batch_size, "cpu", cfg.channels_last, None if args.clean_calibration else augmentation_for(d))
            if count else None
        )
        for b in args.budgets:
            started = time.perf_counter()
            result = search(
                model, val, strategy=s.strategy, budget=f"uniform:{b}", input_shape=shape,
                out_dir=run / f"search-uniform{b}-recal{count}{suffix if count else ''}", calibration=calibration, progress=True, **options[s.strategy],
            )
            uniform = uniform_config(space, b)
            best = result.best
            pair = [best.config, uniform]
            (fv, uv), (ft, ut) = (evaluate_configs(model, pair, data, calibration=calibration) for data in (val, test))
            row = {
                "recalibrate": count, "budget": f"uniform:{b}", "limit_macs": result.limit,
                "found": format_config(best.config), "found_val": round(100 * fv.accuracy, 2),
                "found_test": round(100 * ft.accuracy, 2), "found_macs": best.macs,
                "uniform": format_config(uniform), "uniform_val": round(100 * uv.accuracy, 2),
                "uniform_test": round(100 * ut.accuracy, 2), "uniform_macs": int(macs(uniform)),
                "evaluations": result.evaluations, "seconds": round(time.perf_counter() - started, 1),
            }
            print(json.dumps(row), flush=True)
            report["runs"].append(row)
            out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
