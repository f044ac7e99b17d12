"""Does an earlier stop of gross.btd cost the user anything? Fit error and time against accuracy after training.

    python experiments/btd_stopping.py                                  # rtol 0, 1e-3, 5e-3; uniform 4 and 16
    python experiments/btd_stopping.py --rtol 0 2e-3 --configs 16-16-16

``gross.btd`` stops when the last ten steps lowered its objective by less than ``rtol`` of
itself (and at ``tol``); a larger ``rtol`` fits faster and less closely. What a user gets from
the fit is not its error but the network after reconstruction and finetuning, so this trains
each configuration alone (``gross fixed``, the configuration's ``fixed`` section: the short
protocol) from fits made at each ``rtol``, from one base network (``--source``, default the
configuration's run folder), and reports per rtol and configuration: seconds and steps of the
fits, their relative errors, val accuracy right after the decomposition, after reconstruction
and after finetuning, and test accuracy at the end. Run folders ``NAME-rtolX``; finished ones are
skipped. Output: ``--out``.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from paper_cifar10 import gross, scorer, seed_run

from gross.checkpoint import load_model
from gross.config import resolve_config
from gross.model import gross_layers, plan_decomposition
from gross.train import decompose_fixed

ROOT = Path(__file__).resolve().parent.parent


def fit_figures(base: torch.nn.Module, config: dict[str, int], btd_options: dict) -> tuple[torch.nn.Module, dict]:
    """Decompose a copy of ``base`` at ``config``: the network, seconds, and per layer steps and relative error."""
    start = time.perf_counter()
    model = decompose_fixed(copy.deepcopy(base), config, **btd_options)
    seconds = time.perf_counter() - start
    weights = dict(base.named_modules())
    errors = {}
    for name, layer in gross_layers(model):
        (size,) = layer.group_sizes
        w = weights[name].weight.detach().double()
        errors[name] = round(float((layer.dense_weight(size).detach().double() - w).norm() / w.norm()), 5)
    return model, {"seconds": round(seconds, 2), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default="experiments/paper-cifar10-short.yaml")
    parser.add_argument("--source", default=None, help="run folder with a trained base/ (default: runs/NAME)")
    parser.add_argument("--rtol", type=float, nargs="+", default=[0.0, 1e-3, 5e-3])
    parser.add_argument("--configs", nargs="+", default=["4-4-4", "16-16-16"])
    parser.add_argument("--out", default="benchmarks/results/btd_stopping")
    parser.add_argument("--set", action="append", default=[], help="passed to every gross call")
    args = parser.parse_args()

    cfg = resolve_config([ROOT / args.config], args.set)
    runs, name = ROOT / cfg.runs, cfg.name
    source = Path(args.source) if args.source else runs / name
    if not (source / "base" / "model.safetensors").is_file():
        sys.exit(f"{source}: no trained base network (run `gross train -c {args.config}` first, or pass --source)")
    score = scorer(cfg)
    base, _ = load_model(source / "base" / "model.safetensors", "cpu")

    d = cfg.decompose
    layers = [p.name for p in plan_decomposition(base, d.group_sizes, d.skip, d.only, d.btd.get("width")) if p.sizes]
    rows = []
    for c in args.configs:
        config = dict(zip(layers, map(int, c.split("-")), strict=True))
        for rtol in args.rtol:
            model, fit = fit_figures(base, config, {**d.btd, "rtol": rtol})
            run = runs / f"{name}-rtol{rtol:g}"
            seed_run(source, run, ("base",))
            gross("fixed", "-c", args.config, "-q", "--name", run.name, "--config", ",".join(f"{k}={v}" for k, v in config.items()),
                  "--set", f"decompose.btd.rtol={rtol!r}", *[a for s in args.set for a in ("--set", s)])
            root = run / "fixed" / c
            rec = [json.loads(line) for line in (root / "reconstruct" / "metrics.jsonl").read_text().splitlines() if line]
            trained = score(root / "gross" / "model.safetensors")
            rows.append({
                "config": c, "rtol": rtol, **fit, "val_decomposed": score(model)["val"],
                "val_reconstructed": round(100 * rec[-1]["val_acc"], 2), "val": trained["val"], "test": trained["test"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            write(rows, args, source)


def write(rows: list[dict], args: argparse.Namespace, source: Path) -> None:
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": args.config, "source": str(source), "overrides": args.set, "rows": rows}, indent=1) + "\n")
    lines = [
        "# gross.btd's stopping rule against what the user gets (CIFAR-10 paper network, trained alone, short protocol)",
        "",
        f"From `python experiments/btd_stopping.py` ({args.config}; base network {source}). rtol 0 is tol alone.",
        "",
        "| configuration | rtol | fit seconds | largest error | mean error | val decomposed | val reconstructed | val trained | test trained |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        e = list(r["errors"].values())
        lines.append(f"| {r['config']} | {r['rtol']:g} | {r['seconds']:.2f} | {max(e):.4f} | {sum(e) / len(e):.4f} | "
                     f"{r['val_decomposed']:.2f} | {r['val_reconstructed']:.2f} | {r['val']:.2f} | {r['test']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
