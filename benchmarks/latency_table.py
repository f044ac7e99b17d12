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
average is recorded because other processes may share the cores. Each time is the median of
its samples (``--quantile``, the library's default): on this 2-core virtual machine the fastest
sample (``--quantile 0``) is no stable statistic at batch 1, as the same 24 networks timed in two
passes ranked with Spearman 0.18 by their fastest samples and 0.97 by their medians
(``--runtimes torch --batches 1 --repeats 101 --net-repeats 101 --quantile 0``, then ``0.5``).
On oversubscribed cores, where most samples are preempted, a low quantile may serve better.

Results are written after every runtime and batch size (``latency_table.json`` with every row,
``latency_table.md`` with the summary, ``latency_table.png`` with predicted against measured),
so an interrupted run keeps what it finished. The timed run, some 15 minutes on 2 cores
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
import resource
import sys
import time
from pathlib import Path

import gross  # before torch: it sets OMP_WAIT_POLICY=PASSIVE, which only takes effect before torch loads OpenMP

# isort: split
import numpy as np
import torch

from gross.checkpoint import atomic_write
from gross.export import export
from gross.latency import DENSE, RUNTIMES, _bench, _timed, compare_latency, describe_setup, latency_table, steady_allocator
from gross.models import PaperNet
from gross.runtime import forward_fn, require_onnxruntime

SHAPE = (3, 32, 32)
GOAL = 0.9  # Spearman rank correlation of prediction and measurement, every runtime and batch size
ALLOCATOR_REPEATS = 21  # samples per network in the allocator check: a 30% difference shows with fewer than --net-repeats


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


def pair_agreement(predicted: np.ndarray, measured: np.ndarray, margin: float) -> dict:
    """How often ``predicted`` orders a pair as ``measured`` does, over the pairs measured apart.

    A rank correlation counts every pair, also those whose measured latencies differ by less than
    the measurement's own noise, whose order is a coin toss; here only pairs whose measured times
    differ by more than ``margin`` (relative to the faster) count.
    """
    agree = total = 0
    for i in range(len(measured)):
        for j in range(i + 1, len(measured)):
            lo, hi = sorted((measured[i], measured[j]))
            if hi / lo - 1 > margin:
                total += 1
                agree += int((predicted[i] - predicted[j]) * (measured[i] - measured[j]) > 0)
    return {"margin": margin, "pairs": total, "agree": agree, "fraction": agree / total if total else float("nan")}


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
    anchor = tuple(table.meta["anchor"]["config"])
    networks[("anchor",)] = export(model, anchor)
    print(f"{where} timing {len(networks)} whole networks, twice", flush=True)
    start = time.perf_counter()
    passes = [compare_latency(networks, SHAPE, repeats=args.net_repeats, **timing) for _ in range(2)]
    measure_s = time.perf_counter() - start
    measured = {key: (passes[0][key] + passes[1][key]) / 2 for key in networks}
    pieces = pieces_check(networks[("anchor",)], runtime, batch, args)
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
                "measured_passes_ms": [one[("plain", i)] for one in passes],
                "fused": fused[i],
                "auto_predicted_ms": table.cost(fused_config),
                "auto_measured_ms": measured[("auto", i) if fused[i] else ("plain", i)],
            }
        )
    result = {
        "runtime": runtime,
        "batch_size": batch,
        "setup": table.setup,
        "table": table.to_dict(),
        "seconds": {"table": round(table_s, 1), "networks": round(measure_s, 1)},
        "anchor_ms": {"table": table.meta["anchor"]["ms"], "networks_pass": measured[("anchor",)]},
        "pieces": pieces,
        "rows": rows,
    }
    return {**result, **scores(result)}


def scores(result: dict) -> dict:
    """Every figure that compares the table with the measured networks, from ``result``'s rows."""
    rows = result["rows"]
    pred = np.array([r["predicted_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    auto = np.array([r["auto_measured_ms"] for r in rows])
    macs = np.array([r["macs"] for r in rows])
    relative = np.abs(pred - meas) / meas
    a, b = (np.array(one) for one in zip(*[row["measured_passes_ms"] for row in rows]))
    # The measurement's own noise: how far the same network moves between two passes, once the
    # machine's speed change between them (one factor for all, as the networks take turns) is out.
    drift = float(np.median(a / b))
    noise = float(np.median(np.abs(a - drift * b) / meas))
    # The machine's drift between the table's pass and the networks' pass, taken out: the anchor
    # network was timed in both, so shifting every prediction by its difference leaves the table's own error.
    shift = result["anchor_ms"]["networks_pass"] - result["anchor_ms"]["table"]
    reanchored = np.abs(pred + shift - meas) / meas
    return {
        "spearman_table": spearman(pred, meas),
        "pearson_table": pearson(pred, meas),
        "spearman_macs": spearman(macs, meas),
        "mean_abs_relative_error": float(np.mean(relative)),
        "median_abs_relative_error": float(np.median(relative)),
        "mean_predicted_over_measured": float(np.mean(pred / meas)),
        "mean_abs_relative_error_reanchored": float(np.mean(reanchored)),
        "spearman_pass_to_pass": spearman(a, b),
        "pass_to_pass_speed_ratio": drift,
        "median_pass_to_pass_relative_difference": noise,
        "pairs_table": pair_agreement(pred, meas, 2 * noise),
        "pairs_macs": pair_agreement(macs, meas, 2 * noise),
        "auto_fuse_configs_changed": sum(bool(r["fused"]) for r in rows),
        "auto_fuse_median_speedup": float(np.median(meas / auto)),
    }


def _faults_per_forward(fn, calls: int = 10) -> float:
    """Minor page faults per call of ``fn`` (after one untimed call)."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def allocator_check(model: torch.nn.Module, configs: list[tuple], args: argparse.Namespace) -> list[dict]:
    """torch eager whole networks with glibc's default allocator, then settled (``steady_allocator``).

    Must run before anything settles the allocator (the table and ``compare_latency`` do). Per
    batch size: the dense network's ms and page faults per forward pass, and how far the same
    networks move between two round-robin passes, in either state.
    """
    dense = export(model, (DENSE,) * len(configs[0]))
    networks = {i: export(model, config) for i, config in enumerate(configs)}
    out = []
    for state in ("default", "settled"):
        allocator = steady_allocator() if state == "settled" else "glibc default (or this platform's)"
        for batch in args.batches:
            print(f"[allocator {state}, torch, batch {batch}] timing {len(networks) + 1} whole networks, twice", flush=True)
            x = torch.randn(batch, *SHAPE)
            fns = {"dense": forward_fn(dense, (x,), "torch", args.threads)}
            fns.update({i: forward_fn(net, (x,), "torch", args.threads) for i, net in networks.items()})
            with torch.inference_mode():
                faults = _faults_per_forward(fns["dense"])
                a, b = (
                    _bench(fns, warmup=args.warmup, repeats=ALLOCATOR_REPEATS, block_ms=1.0, quantile=args.quantile, sync=lambda: None)
                    for _ in range(2)
                )
            nets_a, nets_b = np.array([a[i] for i in networks]), np.array([b[i] for i in networks])
            out.append(
                {
                    "state": state,
                    "allocator": allocator,
                    "batch_size": batch,
                    "dense_ms": [a["dense"], b["dense"]],
                    "dense_page_faults_per_forward": faults,
                    "median_network_ms": float(np.median((nets_a + nets_b) / 2)),
                    "median_pass_to_pass_relative_difference": float(np.median(np.abs(nets_a - nets_b) / ((nets_a + nets_b) / 2))),
                    "spearman_pass_to_pass": spearman(nets_a, nets_b),
                }
            )
    return out


class _Block(torch.nn.Module):
    """One of PaperNet's conv steps: conv, ReLU, 2x2 max-pooling."""

    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.max_pool2d(torch.nn.functional.relu(self.conv(x)), 2)


class _Head(torch.nn.Module):
    """PaperNet's classifier in eval mode: FC, ReLU, FC."""

    def __init__(self, net: PaperNet) -> None:
        super().__init__()
        self.fc1, self.fc2 = net.fc1, net.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.relu(self.fc1(x.flatten(1))))


def pieces_check(net: PaperNet, runtime: str, batch: int, args: argparse.Namespace) -> dict:
    """The network timed whole and as its five pieces apart (each conv step, the head), in one pass.

    Why the table's rest is anchored to a whole network: what the pieces' sum exceeds the whole
    by (a call per piece, layout conversions at the boundaries) is time no per-layer entry sees.
    """
    pieces = [_Block(net.conv1), _Block(net.conv2), _Block(net.conv3), _Block(net.conv4), _Head(net)]
    x = torch.randn(batch, *SHAPE)
    fns = {"whole": forward_fn(net, (x,), runtime, args.threads)}
    with torch.no_grad():
        for i, piece in enumerate(pieces):
            fns[i] = forward_fn(piece, (x,), runtime, args.threads)
            x = piece(x)
    times = _timed(fns, torch.device("cpu"), args.threads, warmup=args.warmup, repeats=args.repeats, block_ms=1.0, quantile=args.quantile)
    total = sum(times[i] for i in range(len(pieces)))
    return {"whole_ms": times["whole"], "pieces_ms": [times[i] for i in range(len(pieces))], "pieces_over_whole": total / times["whole"]}


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
    lines += [
        "",
        "The measurement's own noise, and the table judged only where the measurement can tell networks apart. "
        "Every network was timed in two round-robin passes (the figures above use their mean); the anchor network "
        "(every layer dense) was timed once inside the table and once beside the networks; \"pairs apart\" are the "
        "pairs whose measured times differ by more than twice the median pass-to-pass difference (after scaling the "
        "second pass by the speed ratio, the median of first over second, as the machine's speed changes between passes); \"pieces / whole\" "
        "is the anchor network timed as its five pieces apart (four conv steps and the head) over it timed whole, "
        "the time no per-layer entry sees and the anchored rest holds; \"re-anchored\" shifts every prediction by the "
        "anchor's difference between the two passes, taking out the machine's drift between them.",
        "",
        "| runtime | batch | pass-to-pass: Spearman, speed ratio, median difference | anchor: in table, beside networks (ms) "
        "| mean abs. rel. error, re-anchored | pairs apart | table orders them right | MACs orders them right | pieces / whole |",
        "|" + " --- |" * 9,
    ]
    for r in summary["results"]:
        pt, pm = r["pairs_table"], r["pairs_macs"]
        lines.append(
            f"| {r['runtime']} | {r['batch_size']} | {r['spearman_pass_to_pass']:.3f}, {r['pass_to_pass_speed_ratio']:.2f}, "
            f"{r['median_pass_to_pass_relative_difference']:.1%} "
            f"| {r['anchor_ms']['table']:.3f}, {r['anchor_ms']['networks_pass']:.3f} | {r['mean_abs_relative_error_reanchored']:.1%} "
            f"| {pt['pairs']} of {len(r['rows']) * (len(r['rows']) - 1) // 2} (> {pt['margin']:.1%}) "
            f"| {pt['fraction']:.1%} | {pm['fraction']:.1%} | {r['pieces']['pieces_over_whole']:.2f} |"
        )
    if summary.get("allocator"):
        lines += [
            "",
            "torch eager with glibc's default allocator, then settled (`gross.latency.steady_allocator`), timed "
            "before anything else in the run: the dense network, and the same random networks in two passes.",
            "",
            "| allocator | batch | dense network, two passes (ms) | page faults per forward | median network (ms) "
            "| pass-to-pass: Spearman, median difference |",
            "|" + " --- |" * 6,
        ]
        for a in summary["allocator"]:
            lines.append(
                f"| {a['state']} | {a['batch_size']} | {a['dense_ms'][0]:.2f}, {a['dense_ms'][1]:.2f} "
                f"| {a['dense_page_faults_per_forward']:.0f} | {a['median_network_ms']:.2f} "
                f"| {a['spearman_pass_to_pass']:.3f}, {a['median_pass_to_pass_relative_difference']:.1%} |"
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
    parser.add_argument("--repeats", type=int, default=101, help="timed samples per table entry")
    parser.add_argument("--net-repeats", type=int, default=61, help="timed samples per whole network and pass")
    parser.add_argument(
        "--quantile", type=float, default=0.5,
        help="quantile of the samples kept: 0.5, the median, as the library (0 keeps the fastest)",
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of either runtime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-allocator-check", action="store_true",
        help="skip timing torch with glibc's default allocator before settling it (about a minute)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--rescore", action="store_true",
        help="time nothing: recompute every score of OUT/latency_table.json from its rows, and rewrite its .md and .png",
    )
    args = parser.parse_args()
    if args.rescore:
        rescore(args.out)
        return
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
    if "torch" in args.runtimes and not args.no_allocator_check:
        summary["allocator"] = allocator_check(model, configs, args)
    for runtime in args.runtimes:
        for batch in args.batches:
            res = run_setup(model, runtime, batch, configs, args)
            summary["results"].append(res)
            summary["load_average_after"] = list(os.getloadavg())
            summary["seconds"] = round(time.perf_counter() - start, 1)
            write(summary, args.out)
            print(
                f"[{runtime}, batch {batch}] Spearman(table, measured) {res['spearman_table']:.3f} "
                f"({'meets' if res['spearman_table'] >= GOAL else 'misses'} {GOAL})  Pearson {res['pearson_table']:.3f}  "
                f"mean |rel. error| {res['mean_abs_relative_error']:.1%}  Spearman(MACs, measured) {res['spearman_macs']:.3f}  "
                f"fuse=auto changed {res['auto_fuse_configs_changed']}/{len(configs)} configs, "
                f"median speed-up {res['auto_fuse_median_speedup']:.2f}x  ({res['seconds']})",
                flush=True,
            )
    print(f"wrote {args.out}/latency_table.{{json,md,png}} in {summary['seconds']} s")


def write(summary: dict, out: Path) -> None:
    atomic_write(out / "latency_table.json", json.dumps(summary, indent=1) + "\n")
    atomic_write(out / "latency_table.md", markdown(summary))
    plot(summary["results"], out / "latency_table.png")


def rescore(out: Path) -> None:
    """The scores of a finished run derived again from its rows: how they are computed may change, the timings do not."""
    summary = json.loads((out / "latency_table.json").read_text())
    summary["results"] = [{**res, **scores(res)} for res in summary["results"]]
    write(summary, out)
    print(f"rescored {out}/latency_table.{{json,md,png}}")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
