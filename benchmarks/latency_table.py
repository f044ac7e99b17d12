"""How well does a per-layer latency table predict whole exported networks?

Paper network (METHOD.md section 8), conv2-conv4 decomposed, CPU. For each batch size: build the
latency table (every layer at every group size, and the dense conv, plus the rest of the
network), export random configurations (drawn uniformly, the dense choice included), time each
whole exported network, and compare with the table's sum: Spearman rank correlation, Pearson
correlation and relative error. For contrast, the rank correlation of analytic MACs with the
measured latency. Each configuration is also exported with ``fuse="auto"`` (bottlenecks that
the table finds slower than their dense conv are fused) and timed the same way.

The networks are timed round-robin, so drift in machine load hits all alike; the machine's load
average is recorded because other processes share the cores. On such oversubscribed cores a
50 ms network is preempted in most runs, so the table and the networks keep the fastest sample
(``--quantile 0``; the library's default is the median): with the 20% quantile the table still
ranked batch-1 networks well (Spearman 0.97) but missed batch-64 networks by a 40% offset.

    python benchmarks/latency_table.py   # writes benchmarks/results/latency_table.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

import gross
from gross.export import export
from gross.latency import DENSE, compare_latency, latency_table
from gross.models import PaperNet

SHAPE = (3, 32, 32)


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


def run_batch(model: torch.nn.Module, batch: int, configs: list[tuple], args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    timing = dict(warmup=args.warmup, quantile=args.quantile)
    table = latency_table(model, SHAPE, batch_size=batch, repeats=args.repeats, **timing)
    table_s = time.perf_counter() - start
    macs = gross.macs_table(model, SHAPE)
    networks = {}
    for i, config in enumerate(configs):
        networks[("plain", i)] = export(model, config)
        networks[("auto", i)] = export(model, config, fuse="auto", latency=table)
    start = time.perf_counter()
    measured = compare_latency(networks, SHAPE, batch_size=batch, repeats=args.net_repeats, **timing)
    measure_s = time.perf_counter() - start
    dense_macs = {name: _dense_macs(model, name) for name in macs.layers}
    rows = []
    for i, config in enumerate(configs):
        fused = sorted(table.fused_faster(config))
        # Fused layers run as the dense conv: predict them with its time.
        fused_config = tuple(DENSE if name in fused else c for name, c in zip(table.layers, config))
        layer_macs = [dense_macs[n] if c == DENSE else opts[c] for n, opts, c in zip(macs.layers, macs.options, config)]
        rows.append(
            {
                "config": list(config),
                "macs": sum(macs.fixed.values()) + sum(layer_macs),
                "predicted_ms": table.cost(config),
                "measured_ms": measured[("plain", i)],
                "fused": fused,
                "auto_predicted_ms": table.cost(fused_config),
                "auto_measured_ms": measured[("auto", i)],
            }
        )
    pred = np.array([r["predicted_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    auto = np.array([r["auto_measured_ms"] for r in rows])
    return {
        "batch_size": batch,
        "table": table.to_dict(),
        "seconds": {"table": round(table_s, 1), "networks": round(measure_s, 1)},
        "spearman_table": spearman(pred, meas),
        "pearson_table": pearson(pred, meas),
        "spearman_macs": spearman([r["macs"] for r in rows], meas),
        "median_relative_error": float(np.median(np.abs(pred - meas) / meas)),
        "mean_predicted_over_measured": float(np.mean(pred / meas)),
        "auto_fuse_median_speedup": float(np.median(meas / auto)),
        "auto_fuse_configs_changed": sum(bool(r["fused"]) for r in rows),
        "rows": rows,
    }


def _dense_macs(model: torch.nn.Module, name: str) -> int:
    """MACs of one layer exported as its dense conv."""
    return gross.count_macs(export(model, {name: DENSE}), SHAPE).per_layer[name]


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(results), 4.4), layout="constrained")
    for k, res in enumerate(results):
        ax = fig.add_subplot(1, len(results), k + 1)
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
            f"batch {res['batch_size']}: Spearman {res['spearman_table']:.2f} (MACs {res['spearman_macs']:.2f})",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--configs", type=int, default=24, help="random configurations per batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=31, help="timed samples per table entry")
    parser.add_argument("--net-repeats", type=int, default=21, help="timed samples per whole network")
    parser.add_argument(
        "--quantile", type=float, default=0.0,
        help="quantile of the samples kept: 0, the fastest, because other processes preempt many samples",
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="intra-op threads; on shared, oversubscribed cores more than 1 stalls at every barrier",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    load_before = os.getloadavg()
    # Latency does not depend on how well the weights fit, so a short decomposition will do.
    model = gross.decompose(PaperNet(), skip=["conv1"], max_iter=5).eval()
    choices = tuple(tuple(sizes) + (DENSE,) for sizes in gross.search_space(model))
    configs = random_configs(choices, args.configs, args.seed)
    results = []
    for batch in args.batches:
        res = run_batch(model, batch, configs, args)
        results.append(res)
        print(
            f"batch {batch:4d}: Spearman(table, measured) {res['spearman_table']:.3f}  "
            f"Pearson {res['pearson_table']:.3f}  Spearman(MACs, measured) {res['spearman_macs']:.3f}  "
            f"median |rel. error| {res['median_relative_error']:.1%}  "
            f"fuse=auto changed {res['auto_fuse_configs_changed']}/{len(configs)} configs, "
            f"median speed-up {res['auto_fuse_median_speedup']:.2f}x  ({res['seconds']})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "script": "benchmarks/latency_table.py",
        "model": "PaperNet, conv2-conv4 decomposed (all power-of-two group sizes + dense)",
        "input_shape": list(SHAPE),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "seconds": round(time.perf_counter() - start, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    (args.out / "latency_table.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, args.out / "latency_table.png")
    print(f"wrote {args.out / 'latency_table.json'} and latency_table.png in {summary['seconds']} s")


if __name__ == "__main__":
    main()
