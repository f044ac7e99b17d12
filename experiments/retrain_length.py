"""Table 3's margins against the retraining length: configurations trained alone at the short protocol and at the paper's.

    python experiments/retrain_length.py                                   # uniform 16, 2-32-64, 8-16-64; short, then full
    python experiments/retrain_length.py --configs 4-4-4 1-8-16 --seeds 0 1

Every configuration is trained alone (``gross fixed``) from one base network and its
decomposition, taken from the finished GroSS run ``--source`` (default: the configuration's own
run folder), at two lengths:

- ``short``: the configuration's ``fixed`` section as it is (the short protocol: reconstruction
  2 epochs at 0.01, finetuning 8 epochs at 1e-3);
- ``full``: the paper's finetuning, 100 epochs at 1e-3 with x0.1 after epoch 80, after
  ``--reconstruct-epochs`` of reconstruction at 0.01 (the paper: 30, x0.1 after two thirds).

Run folders ``NAME-retrain-LENGTH`` (seed k > 0: ``NAME-retrain-LENGTH-seedk``), each trained
configuration in its ``fixed/<config>/``; a finished configuration is skipped, so a killed call
continues where it stopped. After every configuration: ``--out``/summary.json (val and test of
each network, the margin of each configuration over the first one, the per-epoch curves),
tables.md and curves.png (validation accuracy against epoch, and the reconstruction loss, which
shows whether fewer reconstruction epochs than the paper's cost anything).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from paper_cifar10 import PAPER_TABLE3, gross, scorer, seed_run

from gross.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent
PAPER_MARGIN = {row[0]: round(row[2] - PAPER_TABLE3["uniform:16"]["uniform"], 2) for row in PAPER_TABLE3["uniform:16"]["rows"]}


def lengths(reconstruct_epochs: int) -> dict[str, list[str]]:
    """The ``--set`` overrides of each retraining length (none: the configuration's own fixed section)."""
    return {
        "short": [],
        "full": [f"fixed.reconstruct.epochs={reconstruct_epochs}", "fixed.reconstruct.milestones=[0.67]",
                 "fixed.finetune.epochs=100", "fixed.finetune.lr=1e-3", "fixed.finetune.milestones=[80]"],
    }  # fmt: skip


def curves(root: Path) -> dict[str, list[float]]:
    """Per-epoch figures of one fixed network: reconstruction loss, finetuning val accuracy (%), seconds."""
    def rows(stage: str) -> list[dict]:
        path = root / stage / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    rec, fine = rows("reconstruct"), rows("gross")
    acc_key = next((k for k in (fine[0] if fine else {}) if k.startswith("val_acc")), None)
    return {
        "reconstruct_loss": [round(r["loss"], 5) for r in rec],
        "val_acc": [round(100 * r[acc_key], 2) for r in fine] if acc_key else [],
        "seconds": round(sum(r["seconds"] for r in rec + fine), 1),
    }


def tables(s: dict) -> str:
    first = s["configs"][0]
    lines = [
        "# Table 3's margins against the retraining length (CIFAR-10 paper network, test %)",
        "",
        f"One base network ({s['base']['test']:.2f}% test) and one decomposition; seeds {', '.join(map(str, s['seeds']))}. "
        f"short: reconstruction 2 + finetuning 8 epochs (the short protocol); full: reconstruction {s['reconstruct_epochs']} "
        "+ finetuning 100 epochs at 1e-3, x0.1 after 80 (the paper's finetuning). Margin: the configuration minus "
        f"{first}, same length and seed, averaged over seeds.",
        "",
        "| configuration | MACs | " + " | ".join(f"test, {n}" for n in s["lengths"]) + " | "
        + " | ".join(f"margin, {n}" for n in s["lengths"]) + " | the paper's margin |",
        "| --- | --- |" + " --- |" * (2 * len(s["lengths"]) + 1),
    ]
    done = [c for c in s["configs"] if "macs" in s["results"][c]]
    for c in done:
        row = s["results"][c]
        tests = [fmt([r["test"] for r in row[n].values()]) if row.get(n) else "not run" for n in s["lengths"]]
        margins = [fmt(s["margins"][n][c], sign="+") if c in s["margins"].get(n, {}) else "" for n in s["lengths"]]
        paper = f"{PAPER_MARGIN[c]:+.2f}" if c in PAPER_MARGIN else ""
        lines.append(f"| {c} | {row['macs'] / 1e6:.2f} M | " + " | ".join(tests) + " | " + " | ".join(margins) + f" | {paper} |")
    lines += ["", "Seconds per network (reconstruction and finetuning):", "", "| configuration | "
              + " | ".join(s["lengths"]) + " |", "| --- |" + " --- |" * len(s["lengths"])]
    for c in done:
        row = s["results"][c]
        lines.append(f"| {c} | " + " | ".join(fmt([r["seconds"] for r in row[n].values()], 0) if row.get(n) else "" for n in s["lengths"]) + " |")
    return "\n".join(lines) + "\n"


def fmt(values: list[float], digits: int = 2, sign: str = "") -> str:
    """Mean, and the sample standard deviation where there are several values."""
    mean = f"{statistics.fmean(values):{sign}.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c in s["configs"]:
        for seed, r in s["results"][c].get("full", {}).items():
            ax.plot(range(1, len(r["val_acc"]) + 1), r["val_acc"], lw=1, label=f"{c} (seed {seed}): {r['test']:.2f} test")
            bx.plot(range(1, len(r["reconstruct_loss"]) + 1), r["reconstruct_loss"], marker="o", ms=3, label=f"{c} (seed {seed})")
    ax.set_xlabel("finetuning epoch (full length)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title("Trained alone at the paper's length")
    ax.legend(fontsize=8)
    bx.set_xlabel("reconstruction epoch")
    bx.set_ylabel("training loss (per-layer MSE sum)")
    bx.set_title("Reconstruction: has its loss stopped falling?")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default="experiments/paper-cifar10-short.yaml")
    parser.add_argument("--source", default=None, help="run folder with base/ and decompose/ (default: runs/NAME)")
    parser.add_argument("--configs", nargs="+", default=["16-16-16", "2-32-64", "8-16-64"],
                        help="group sizes, the first one the reference of the margins")
    parser.add_argument("--lengths", nargs="+", default=["short", "full"], choices=["short", "full"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reconstruct-epochs", type=int, default=30, help="reconstruction epochs of the full length (the paper: 30)")
    parser.add_argument("--out", default="experiments/results/retrain-length")
    parser.add_argument("--set", action="append", default=[], help="passed to every gross call")
    args = parser.parse_args()

    cfg = resolve_config([ROOT / args.config], args.set)
    runs, name = ROOT / cfg.runs, cfg.name
    source = Path(args.source) if args.source else runs / name
    if not (source / "decompose" / "model.safetensors").is_file():
        sys.exit(f"{source}: no finished base and decompose stages (run `gross run -c {args.config}` first, or pass --source)")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["-c", args.config, "-q", *[a for s in args.set for a in ("--set", s)]]
    overrides = lengths(args.reconstruct_epochs)

    score = scorer(cfg)

    summary: dict = {
        "config": args.config, "overrides": args.set, "source": str(source), "base": score(source / "base" / "model.safetensors"),
        "configs": args.configs, "lengths": args.lengths, "seeds": args.seeds, "reconstruct_epochs": args.reconstruct_epochs,
        "length_overrides": {n: overrides[n] for n in args.lengths}, "results": {c: {} for c in args.configs}, "margins": {},
    }  # fmt: skip
    started = time.time()
    # Configuration by configuration, so that the first finished pairs already give a margin.
    for c in args.configs:
        for length in args.lengths:
            for k in args.seeds:
                run = runs / (f"{name}-retrain-{length}" + (f"-seed{k}" if k else ""))
                seed_run(source, run, ("base", "decompose"))
                gross("fixed", *common, "--name", run.name, "--config", c.replace("-", ","),
                      "--set", f"fixed.reconstruct.seed={k}", "--set", f"fixed.finetune.seed={k}",
                      *[a for s in overrides[length] for a in ("--set", s)])
                root = run / "fixed" / c
                row = score(root / "gross" / "model.safetensors")
                summary["results"][c]["macs"] = row.pop("macs")
                summary["results"][c].setdefault(length, {})[str(k)] = {**row, **curves(root)}
                ref = summary["results"][args.configs[0]].get(length, {})
                summary["margins"][length] = {
                    d: [summary["results"][d][length][sk]["test"] - ref[sk]["test"] for sk in summary["results"][d][length] if sk in ref]
                    for d in args.configs if summary["results"][d].get(length)
                }
                summary["seconds_this_call"] = round(time.time() - started, 1)
                (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
                (out / "tables.md").write_text(tables(summary))
                plot(summary, out / "curves.png")
                print(f"[{c} {length} seed {k}] test {row['test']:.2f}, wrote {out}/summary.json", flush=True)


if __name__ == "__main__":
    sys.exit(main())
