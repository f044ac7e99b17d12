"""Choosing by onnxruntime latency at batch 64 on the CIFAR-10 paper network, against MACs.

    python experiments/latency_onnxruntime.py --run runs/paper-cifar10-short   # -> experiments/results/latency_onnxruntime/

A search that trusts torch-eager batch-1 latency optimises the wrong thing when the network is
deployed with onnxruntime at a larger batch. This takes a finished GroSS run (``--run``: its
finetuned space and its search, which scored every configuration on val and test), sets the
latency budget to the original network's end-to-end latency measured on onnxruntime at batch 64,
chooses the most accurate configuration predicted to fit it, and measures that choice against
the original and against the choice under a MACs budget. Nothing is trained and no
configuration is scored again: the search's ``results.csv`` is reused.

1. A new run folder (``--work``, default ``runs/latency-<runtime>-<run name>``) with copies of
   the run's settings, base and finetuned networks and search scores; ``--run`` is only read.
2. ``gross latency`` in the work folder: the per-layer table on ``--runtime`` at
   ``--batch-size`` with ``--threads`` threads (``latency/table.json``). The table times the
   original network whole, round robin with every layer, as its anchor: that measurement is the
   budget (a separate measurement at another moment would carry other machine load, and on
   shared cores a budget off by 20% decides what fits). Then the most accurate configuration
   whose predicted latency fits, each layer at the faster of its bottleneck and the dense conv
   (``latency/search/``), exported with those layers fused (``latency/export/``).
3. The MACs choice: ``gross search --budget uniform:16`` (``--macs-budget``; the paper's budget
   rule) and its export (``search/``, ``export/``). Then step 2's search again within the MACs
   choice's predicted latency: at equal latency, is choosing by latency more accurate? The two
   latency choices are kept as ``latency/export-original-budget`` and ``latency/export-equal-budget``.
4. The original and the three choices timed together, round robin, on each runtime at batch 1 and
   ``--batch-size``.

Written after every step to ``--out``: ``summary.json``, ``summary.md`` and ``latency.png`` (val
accuracy against the table's predicted latency of every configuration, with the
four networks, and both budgets). A few minutes on 2 cores; a smoke test with ``--repeats 3 --threads 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from gross import pipeline  # before torch: it sets OMP_WAIT_POLICY=PASSIVE, which only takes effect before torch loads OpenMP

# isort: split
import torch

from gross.checkpoint import atomic_write, load_model
from gross.config import resolve_config
from gross.export import load as load_export
from gross.latency import RUNTIMES, LatencyTable, compare_latency, describe_setup, latency_setup
from gross.model import format_config
from gross.report import read_results
from gross.runtime import check_runtime
from gross.search import AdditiveCost

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("base/model.safetensors", "base/arch.json", "gross/model.safetensors", "gross/arch.json")
SCORES = ("results.csv", "source.json", "uniform.csv")  # every configuration's val and test accuracy


def prepare(run: Path, work: Path) -> None:
    """The work folder: the run's networks, and its search scores for both searches to reuse."""
    missing = [name for name in (*COPIED, "config.yaml", *(f"search/{n}" for n in SCORES)) if not (run / name).is_file()]
    if missing:
        sys.exit(f"{run} is not a finished GroSS run with a search: missing {', '.join(missing)}")
    for name in COPIED:
        if not (work / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / name, work / name)
    for folder in ("search", "latency/search"):
        if not (work / folder / "results.csv").is_file():
            (work / folder).mkdir(parents=True, exist_ok=True)
            for name in SCORES:
                shutil.copy2(run / "search" / name, work / folder / name)


def _keep(work: Path, name: str) -> None:
    """A copy of latency/export as latency/export-NAME: the next ``stage_latency`` replaces the folder."""
    shutil.copytree(work / "latency" / "export", work / "latency" / f"export-{name}", dirs_exist_ok=True)


def network_row(summary: dict, which: str) -> dict:
    """One network of an export summary: its configuration, accuracies, size and fused layers."""
    return {
        "config": "-" if which == "original" else format_config(summary["config"]),
        "fused": [] if which == "original" else summary["fused"],
        "val_accuracy": summary["val_accuracy"][which],
        "test_accuracy": (summary.get("test_accuracy") or {}).get(which),
        "macs": summary["macs"][which],
        "params": summary["params"][which],
    }


def markdown(summary: dict) -> str:
    main = describe_setup(summary["setup"])
    lines = [
        f"# Choosing by {summary['setup']['runtime']} latency at batch {summary['setup']['batch_size']}: {summary['run']}",
        "",
        f"`{summary['command']}`. Budget: the original network's latency measured end to end with {main}, "
        f"{summary['budget_ms']:.3f} ms (timed whole as the latency table's anchor, round robin with its layers); the latency choice is the most accurate configuration (val) whose latency "
        f"predicted by the per-layer table fits it, each layer at the faster of its bottleneck and the dense conv; the MACs "
        f"choice the most accurate within the MACs of {summary['macs_budget']}. Accuracies from the run's search (val chose, "
        f"test reported only); no configuration was scored again. {summary['configurations_within_budget']} of "
        f"{summary['configurations']} configurations are predicted to fit the budget (with the dense conv as a per-layer "
        "choice every one does: fusing a layer gives it the original's time). The last row is the same search within "
        f"the MACs choice's predicted latency, {summary['equal_budget_ms']:.3f} ms: at equal latency, which is more accurate.",
        "",
    ]
    setups = list(summary.get("measured", {}))
    head = ["network", "config", "fused", "val acc %", "test acc %", "MACs (M)", "params (k)", "predicted ms"] + [f"ms, {s}" for s in setups]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, row in summary["networks"].items():
        cells = [name, row["config"], ", ".join(row["fused"]) or "-", f"{100 * row['val_accuracy']:.2f}",
                 f"{100 * row['test_accuracy']:.2f}" if row["test_accuracy"] is not None else "",
                 f"{row['macs'] / 1e6:.3f}", f"{row['params'] / 1e3:.1f}", f"{row['predicted_ms']:.3f}"]
        for setup in setups:
            ms = summary["measured"][setup]
            original = ms["original"]
            ratio = "" if name == "original" else f" ({original / ms[name]:.2f}x faster)" if ms[name] <= original else f" ({ms[name] / original:.2f}x slower)"
            cells.append(f"{ms[name]:.3f}{ratio}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "The last columns are timed together, round robin, in one process; predicted ms is the table's "
        f"({main}). Machine: {summary['machine']['device_name']}, {summary['machine']['cpu_count']} cores, load average "
        f"{summary['machine']['load_average_before'][0]:.2f} before and {summary['machine']['load_average_after'][0]:.2f} after.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter([r["predicted_ms"] for r in rows], [100 * r["val_accuracy"] for r in rows], s=10, color="0.65", label="every configuration")
    ax.axvline(summary["budget_ms"], color="tab:red", lw=1, ls="--", label="budget: the original, measured")
    ax.axvline(summary["equal_budget_ms"], color="tab:orange", lw=1, ls=":", label="budget: the MACs choice, predicted")
    for (name, row), color in zip(summary["networks"].items(), ("k", "tab:green", "tab:blue", "tab:orange")):
        label = name if row["config"] == "-" else f"{name} {row['config']}"
        ax.scatter([row["predicted_ms"]], [100 * row["val_accuracy"]], s=60, marker="D", color=color, label=label, zorder=3)
    ax.set_xlabel(f"predicted ms ({describe_setup(summary['setup'])})")
    ax.set_ylabel("val accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished GroSS run with its search (read only)")
    parser.add_argument("--work", type=Path, help="the new run folder (default runs/latency-RUNTIME-RUNNAME)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of either runtime")
    parser.add_argument("--repeats", type=int, default=100, help="timed samples per table entry and per network")
    parser.add_argument("--macs-budget", default="uniform:16", help="budget of the MACs choice (default the paper's uniform:16)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "latency_onnxruntime")
    args = parser.parse_args()
    check_runtime(args.runtime)  # say what to install before anything runs
    run = args.run.resolve()
    work = (args.work or ROOT / "runs" / f"latency-{args.runtime}-{run.name}").resolve()
    if work == run:
        sys.exit("--work must be a new folder: --run is only read")
    os.chdir(ROOT)  # the run's settings name the data relative to the repository root
    torch.set_num_threads(args.threads)
    prepare(run, work)
    settings = [f"name={work.name}", f"runs={work.parent}", "device=cpu", f"threads={args.threads}",
                f"latency.runtime={args.runtime}", f"latency.batch_size={args.batch_size}", f"latency.repeats={args.repeats}"]
    cfg = resolve_config([run / "config.yaml"], settings)
    ctx = pipeline.context(cfg)
    pipeline.write_config(ctx)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = latency_setup(args.runtime, args.batch_size, args.threads, "cpu")
    summary: dict = {
        "command": " ".join(["python experiments/latency_onnxruntime.py", *sys.argv[1:]]),
        "run": str(args.run),
        "work": str(work),
        "setup": setup,
        "macs_budget": args.macs_budget,
        "machine": {"cpu_count": os.cpu_count(), "load_average_before": list(os.getloadavg())},
    }

    def write() -> None:
        summary["machine"]["load_average_after"] = list(os.getloadavg())
        atomic_write(args.out / "summary.json", json.dumps(summary, indent=1) + "\n")
        if "networks" in summary:
            atomic_write(args.out / "summary.md", markdown(summary))

    start = time.perf_counter()
    print(f"[latency] the table with {describe_setup(setup)}, and the choice within the original's latency", flush=True)
    pipeline.latency_path(ctx).unlink(missing_ok=True)  # measured afresh, never an older table
    latency_summary = pipeline.stage_latency(ctx)  # default budget: the original, as the table measured it
    table = LatencyTable.load(pipeline.latency_path(ctx))
    summary["budget_ms"] = json.loads((work / "latency" / "search" / "best.json").read_text())["limit"]
    summary["anchor_ms"] = table.meta["anchor"]["ms"]  # the same up to rounding: the original, timed whole
    summary["machine"]["device_name"] = table.meta["device_name"]
    summary["table_setup"] = table.setup
    write()

    print(f"[macs] choosing under the MACs of {args.macs_budget}", flush=True)
    macs_cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, cost="macs", budget=args.macs_budget))
    macs_ctx = dataclasses.replace(ctx, cfg=macs_cfg)
    pipeline.stage_search(macs_ctx)  # takes every score in search/results.csv
    macs_summary = pipeline.stage_export(dataclasses.replace(macs_ctx, force=True), best=True)

    # The same search again at the MACs choice's predicted latency: at equal latency, which is more accurate?
    summary["equal_budget_ms"] = table.cost(macs_summary["config"])  # exported unfused, so no layer at its faster choice
    print(f"[latency] the choice within the MACs choice's predicted latency, {summary['equal_budget_ms']:.3f} ms", flush=True)
    _keep(work, "original-budget")
    equal_summary = pipeline.stage_latency(ctx, budget_ms=summary["equal_budget_ms"])
    _keep(work, "equal-budget")

    predict = AdditiveCost.from_latency_table(table, fuse=True)
    summary["networks"] = {
        "original": {**network_row(latency_summary, "original"), "predicted_ms": summary["budget_ms"]},
        "chosen by latency": {**network_row(latency_summary, "exported"), "predicted_ms": predict(latency_summary["config"])},
        "chosen by MACs": {**network_row(macs_summary, "exported"), "predicted_ms": summary["equal_budget_ms"]},
        "chosen by latency, within the MACs choice's": {
            **network_row(equal_summary, "exported"), "predicted_ms": predict(equal_summary["config"])
        },
    }
    rows = read_results(work / "latency" / "search" / "results.csv")
    for row in rows:
        row["predicted_ms"] = predict(row["config"])
    summary["configurations"] = len(rows)
    summary["configurations_within_budget"] = sum(r["predicted_ms"] <= summary["budget_ms"] for r in rows)
    plot(rows, summary, args.out / "latency.png")
    write()

    networks = {
        "original": load_model(work / "base" / "model.safetensors")[0],
        "chosen by latency": load_export(work / "latency" / "export-original-budget"),
        "chosen by MACs": load_export(work / "export"),
        "chosen by latency, within the MACs choice's": load_export(work / "latency" / "export-equal-budget"),
    }
    summary["measured"] = {}
    runtimes = [args.runtime] + [r for r in RUNTIMES if r != args.runtime]
    shape = tuple(ctx.splits().val.images.shape[1:])
    for batch in dict.fromkeys((args.batch_size, 1)):
        for runtime in runtimes:
            where = latency_setup(runtime, batch, args.threads, "cpu")
            print(f"[measure] the four networks together, with {describe_setup(where)}", flush=True)
            summary["measured"][describe_setup(where)] = compare_latency(
                networks, shape, runtime=runtime, batch_size=batch, threads=args.threads, repeats=args.repeats
            )
            write()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write()
    print(markdown(summary))
    print(f"wrote {args.out}/summary.{{json,md}} and latency.png; the run folder is {work}")


if __name__ == "__main__":
    main()
