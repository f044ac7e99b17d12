"""How well does a per-layer latency table predict whole exported networks, on torch and onnxruntime?

Paper network (METHOD.md section 8), conv2-conv4 decomposed, CPU. For each runtime (torch eager;
onnxruntime, each candidate and each whole network as its own ONNX graph in an
``InferenceSession``) and each batch size: build the latency table on that runtime (every layer
at every group size, and the dense conv, plus the rest of the network), export random
configurations (drawn uniformly, the dense choice included), time each whole exported network
on the same runtime at the same batch size, and compare with the table's sum: Spearman rank
correlation (goal: at least 0.9 for every runtime and batch size), Pearson correlation, and the
mean (and median) absolute relative error. For contrast, the rank correlation of analytic MACs
with the measured latency. Each configuration that the table says to fuse somewhere is also
exported with ``fuse="auto"`` (bottlenecks slower than their dense conv fused) and timed the
same way.

The networks are timed round-robin, so drift in machine load hits all alike; the machine's load
average is recorded because other processes may share the cores. On oversubscribed cores a
50 ms network is preempted in most runs, so the table and the networks keep the fastest sample
(``--quantile 0``; the library's default is the median).

Results are written after every runtime and batch size (``latency_table.json`` with every row,
``latency_table.md`` with the summary, ``latency_table.png`` with predicted against measured),
so an interrupted run keeps what it finished. The timed run, some 5-10 minutes on 2 cores
(onnxruntime exports up to 72 ONNX graphs per batch size, about a second each)::

    python benchmarks/latency_table.py --threads 2   # -> benchmarks/results/latency_table.{json,md,png}

A smoke test in a minute: ``--configs 4 --repeats 3 --net-repeats 3 --batches 1 8 --out /tmp/lt``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import sys
import time
from pathlib import Path

import gross  # before torch: it sets OMP_WAIT_POLICY=PASSIVE, which only takes effect before torch loads OpenMP

import numpy as np
import torch

from gross.checkpoint import atomic_write
from gross.export import export
from gross.latency import DENSE, RUNTIMES, compare_latency, describe_setup, latency_table
from gross.models import PaperNet
from gross.runtime import require_onnxruntime

SHAPE = (3, 32, 32)
GOAL = 0.9  # Spearman rank correlation of prediction and measurement, every runtime and batch size


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (as Spearman's rho needs)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    out = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        out[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=float) - np.mean(a)
    b = np.asarray(b, dtype=float) - np.mean(b)
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(ranks(a), ranks(b))


def random_configs(choices: tuple[tuple, ...], n: int, seed: int) -> list[tuple]:
    space = int(np.prod([len(c) for c in choices]))
    if n > space:
        raise ValueError(f"asked for {n} distinct configurations of a space of {space}")
    rng = random.Random(seed)
    found: dict[tuple, None] = {}
    while len(found) < n:
        found[tuple(rng.choice(c) for c in choices)] = None
    return list(found)


def run_setup(model: torch.nn.Module, runtime: str, batch: int, configs: list[tuple], args: argparse.Namespace) -> dict:
    """Table, whole networks and their comparison for one runtime and batch size."""
    timing = dict(batch_size=batch, runtime=runtime, warmup=args.warmup, quantile=args.quantile)
    where = f"[{runtime}, batch {batch}]"
    print(f"{where} latency table", flush=True)
    start = time.perf_counter()
    table = latency_table(model, SHAPE, repeats=args.repeats, **timing)
    table_s = time.perf_counter() - start
    macs = gross.macs_table(model, SHAPE)
    networks = {}
    fused = {}
    for i, config in enumerate(configs):
        networks[("plain", i)] = export(model, config)
        fused[i] = sorted(table.fused_faster(config))
        if fused[i]:  # otherwise the same network as the plain one
            networks[("auto", i)] = export(model, config, fuse="auto", latency=table)
    print(f"{where} timing {len(networks)} whole networks", flush=True)
    start = time.perf_counter()
    measured = compare_latency(networks, SHAPE, repeats=args.net_repeats, **timing)
    measure_s = time.perf_counter() - start
    dense_macs = {name: _dense_macs(model, name) for name in macs.layers}
    rows = []
    for i, config in enumerate(configs):
        # Fused layers run as the dense conv: predict them with its time.
        fused_config = tuple(DENSE if name in fused[i] else c for name, c in zip(table.layers, config))
        layer_macs = [dense_macs[n] if c == DENSE else opts[c] for n, opts, c in zip(macs.layers, macs.options, config)]
        rows.append(
            {
                "config": list(config),
                "macs": sum(macs.fixed.values()) + sum(layer_macs),
                "predicted_ms": table.cost(config),
                "measured_ms": measured[("plain", i)],
                "fused": fused[i],
                "auto_predicted_ms": table.cost(fused_config),
                "auto_measured_ms": measured[("auto", i) if fused[i] else ("plain", i)],
            }
        )
    pred = np.array([r["predicted_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    auto = np.array([r["auto_measured_ms"] for r in rows])
    relative = np.abs(pred - meas) / meas
    return {
        "runtime": runtime,
        "batch_size": batch,
        "setup": table.setup,
        "table": table.to_dict(),
        "seconds": {"table": round(table_s, 1), "networks": round(measure_s, 1)},
        "spearman_table": spearman(pred, meas),
        "pearson_table": pearson(pred, meas),
        "spearman_macs": spearman([r["macs"] for r in rows], meas),
        "mean_abs_relative_error": float(np.mean(relative)),
        "median_abs_relative_error": float(np.median(relative)),
        "mean_predicted_over_measured": float(np.mean(pred / meas)),
        "auto_fuse_configs_changed": sum(bool(r["fused"]) for r in rows),
        "auto_fuse_median_speedup": float(np.median(meas / auto)),
        "rows": rows,
    }


def _dense_macs(model: torch.nn.Module, name: str) -> int:
    """MACs of one layer exported as its dense conv."""
    return gross.count_macs(export(model, {name: DENSE}), SHAPE).per_layer[name]


def markdown(summary: dict) -> str:
    lines = [
        "# Latency table against measured whole networks",
        "",
        f"`{summary['command']}`: {summary['model']}, {summary['settings']['configs']} random configurations "
        f"(the dense choice included), {summary['threads']} thread(s) on {summary['results'][0]['table']['meta']['device_name']} "
        f"({summary['cpu_count']} cores); "
        f"torch {summary['torch']}, onnxruntime {summary['onnxruntime']}. Load average before: "
        f"{summary['load_average_before'][0]:.2f}. Goal: Spearman >= {GOAL} for every runtime and batch size.",
        "",
        "| runtime | batch | Spearman (table) | goal met | Pearson | mean abs. rel. error | median abs. rel. error "
        "| mean pred./meas. | Spearman (MACs) | fuse auto: configs changed, median speed-up |",
        "|" + " --- |" * 10,
    ]
    for r in summary["results"]:
        lines.append(
            f"| {r['runtime']} | {r['batch_size']} | {r['spearman_table']:.3f} | {'yes' if r['spearman_table'] >= GOAL else 'no'} "
            f"| {r['pearson_table']:.3f} | {r['mean_abs_relative_error']:.1%} | {r['median_abs_relative_error']:.1%} "
            f"| {r['mean_predicted_over_measured']:.3f} | {r['spearman_macs']:.3f} "
            f"| {r['auto_fuse_configs_changed']}/{len(r['rows'])}, {r['auto_fuse_median_speedup']:.2f}x |"
        )
    lines += ["", "Measured whole networks, ms (median over configurations):", ""]
    lines += ["| runtime | batch | min | median | max |", "|" + " --- |" * 5]
    for r in summary["results"]:
        meas = [row["measured_ms"] for row in r["rows"]]
        lines.append(f"| {r['runtime']} | {r['batch_size']} | {min(meas):.3f} | {float(np.median(meas)):.3f} | {max(meas):.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    runtimes = list(dict.fromkeys(r["runtime"] for r in results))
    batches = list(dict.fromkeys(r["batch_size"] for r in results))
    fig = Figure(figsize=(4.6 * len(batches), 4.2 * len(runtimes)), layout="constrained")
    for res in results:
        k = runtimes.index(res["runtime"]) * len(batches) + batches.index(res["batch_size"])
        ax = fig.add_subplot(len(runtimes), len(batches), k + 1)
        pred = [r["predicted_ms"] for r in res["rows"]]
        meas = [r["measured_ms"] for r in res["rows"]]
        has_dense = [DENSE in r["config"] for r in res["rows"]]
        for flag, marker, label in ((False, "o", "group sizes only"), (True, "s", "with a dense layer")):
            pts = [(p, m) for p, m, d in zip(pred, meas, has_dense) if d == flag]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=22, label=label)
        lo, hi = min(pred + meas), max(pred + meas)
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="y = x")
        ax.set_xlabel("table sum (ms)")
        ax.set_ylabel("measured whole network (ms)")
        ax.set_title(
            f"{describe_setup(res['setup'])}\nSpearman {res['spearman_table']:.2f} (MACs {res['spearman_macs']:.2f}), "
            f"mean |rel. err.| {res['mean_abs_relative_error']:.0%}",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--configs", type=int, default=24, help="random configurations (the same for every runtime and batch)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=31, help="timed samples per table entry")
    parser.add_argument("--net-repeats", type=int, default=21, help="timed samples per whole network")
    parser.add_argument(
        "--quantile", type=float, default=0.0,
        help="quantile of the samples kept: 0, the fastest, because other processes preempt many samples",
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of either runtime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if "onnxruntime" in args.runtimes:
        require_onnxruntime()  # say what to install before anything runs
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # Latency does not depend on how well the weights fit, so a short decomposition will do.
    model = gross.decompose(PaperNet(), skip=["conv1"], max_iter=5).eval()
    choices = tuple(tuple(sizes) + (DENSE,) for sizes in gross.search_space(model))
    configs = random_configs(choices, args.configs, args.seed)
    summary = {
        "script": "benchmarks/latency_table.py",
        "command": " ".join(["python benchmarks/latency_table.py", *sys.argv[1:]]),
        "model": "PaperNet, conv2-conv4 decomposed (all power-of-two group sizes + dense)",
        "input_shape": list(SHAPE),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "cpu_count": os.cpu_count(),
        "load_average_before": list(os.getloadavg()),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "goal_spearman": GOAL,
        "results": [],
    }
    for runtime in args.runtimes:
        for batch in args.batches:
            res = run_setup(model, runtime, batch, configs, args)
            summary["results"].append(res)
            summary["load_average_after"] = list(os.getloadavg())
            summary["seconds"] = round(time.perf_counter() - start, 1)
            atomic_write(args.out / "latency_table.json", json.dumps(summary, indent=1) + "\n")
            atomic_write(args.out / "latency_table.md", markdown(summary))
            plot(summary["results"], args.out / "latency_table.png")
            print(
                f"[{runtime}, batch {batch}] Spearman(table, measured) {res['spearman_table']:.3f} "
                f"({'meets' if res['spearman_table'] >= GOAL else 'misses'} {GOAL})  Pearson {res['pearson_table']:.3f}  "
                f"mean |rel. error| {res['mean_abs_relative_error']:.1%}  Spearman(MACs, measured) {res['spearman_macs']:.3f}  "
                f"fuse=auto changed {res['auto_fuse_configs_changed']}/{len(configs)} configs, "
                f"median speed-up {res['auto_fuse_median_speedup']:.2f}x  ({res['seconds']})",
                flush=True,
            )
    print(f"wrote {args.out}/latency_table.{{json,md,png}} in {summary['seconds']} s")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
