"""Search speed and quality on the paper network's 252 configurations.

1. Speed: validation accuracy of all 252 configurations (METHOD.md section 7) with the prefix-tree
   evaluation of :mod:`gross.search` vs. one ``set_config`` + forward pass per configuration, on
   the same batches; both must give identical scores.
2. Quality: beam search and evolution under the paper's two budgets (the MACs of uniform group
   size 16 and 4), against the exhaustive optimum: the gap in accuracy points and the number of
   configurations each one scored (goal for beam: within 0.2 points using at most 25% of the space).

For an accuracy landscape worth searching, the paper network is first trained briefly on the
digits data (scikit-learn's 1,797 8x8 digits, upsampled to 32x32, no augmentation), then conv2-conv4
are decomposed at every power of two (6 x 6 x 7 = 252 configurations). There is no GroSS
finetuning: configurations differ by how well their BTD approximates the trained convs, which
makes small group sizes lose accuracy, as they do in the paper.

    python benchmarks/search_speed.py        # writes benchmarks/results/search_speed.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gross
from gross import search as S
from gross.data import batches, load_dataset
from gross.models import PaperNet


def train_base(model: torch.nn.Module, train, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=epochs * -(-len(train) // 64), pct_start=0.25
    )
    model.train()
    for _ in range(epochs):
        for x, y in batches(train, 64, shuffle=True, generator=gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()


def time_evaluation(model, configs, data, method: str) -> tuple[float, list[S.Score]]:
    start = time.perf_counter()
    scores = S.evaluate_configs(model, configs, data, method=method)
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="base training epochs on digits")
    parser.add_argument("--val-size", type=float, default=0.3, help="fraction of digits train held out for validation")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evolution-seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    splits = load_dataset("digits", val_size=args.val_size, seed=args.seed)
    val = list(batches(splits.val, len(splits.val)))  # one batch: the whole validation split
    start = time.perf_counter()
    model = PaperNet()
    train_base(model, splits.train, args.epochs, args.seed)
    train_s = time.perf_counter() - start
    with torch.no_grad():
        base_acc = float((model(val[0][0]).argmax(1) == val[0][1]).float().mean())
    print(f"base PaperNet: {args.epochs} epochs in {train_s:.1f}s, val accuracy {100 * base_acc:.2f}%", flush=True)
    start = time.perf_counter()
    gross.decompose(model, skip=["conv1"])
    decompose_s = time.perf_counter() - start
    space = gross.search_space(model)
    configs = list(itertools.product(*space))
    print(f"decomposed conv2-conv4 in {decompose_s:.1f}s: space {[list(s) for s in space]} = {len(configs)} configs")

    # Interleaved, so that drift in machine load hits both methods alike.
    times: dict[str, list[float]] = {"tree": [], "plain": []}
    results = {}
    for _ in range(args.repeats):
        for method in ("tree", "plain"):
            seconds, results[method] = time_evaluation(model, configs, val, method)
            times[method].append(seconds)
    identical = results["tree"] == results["plain"]
    tree_s, plain_s = statistics.median(times["tree"]), statistics.median(times["plain"])
    accuracies = [s.accuracy for s in results["tree"]]
    print(
        f"all {len(configs)} configs on {len(splits.val)} val images: tree {tree_s:.2f}s, "
        f"one pass per config {plain_s:.2f}s, speed-up {plain_s / tree_s:.1f}x, identical scores: {identical}"
    )
    print(f"val accuracy over the space: {100 * min(accuracies):.2f}% to {100 * max(accuracies):.2f}%")

    budgets = {}
    quarter = len(configs) // 4
    for budget in ("uniform:16", "uniform:4"):
        exhaustive = S.search(model, val, strategy="exhaustive", budget=budget, progress=False)
        optimum = exhaustive.best.val_accuracy
        uniform = S.uniform_config(space, int(budget.split(":")[1]))
        uniform_acc = next(r.val_accuracy for r in exhaustive.records if r.config == uniform)
        beam = S.search(model, val, strategy="beam", budget=budget, progress=False)
        evolutions = [
            S.search(
                model, val, strategy="evolution", budget=budget, max_evaluations=quarter, seed=seed, progress=False
            )
            for seed in range(args.evolution_seeds)
        ]

        def found(result: S.SearchResult, optimum: float = optimum) -> dict:  # this budget's optimum, bound now
            return {
                "config": S.format_config(result.best.config),
                "val_accuracy": result.best.val_accuracy,
                "gap_points": 100 * (optimum - result.best.val_accuracy),
                "evaluations": result.evaluations,
                "fraction_of_space": result.evaluations / len(configs),
                "seconds": result.seconds,
            }

        budgets[budget] = {
            "limit_macs": exhaustive.limit,
            "within_budget": exhaustive.evaluations,
            "uniform": {"config": S.format_config(uniform), "val_accuracy": uniform_acc},
            "exhaustive": found(exhaustive),
            "beam": found(beam),
            "evolution": [found(r) | {"seed": seed} for seed, r in enumerate(evolutions)],
        }
        b = budgets[budget]
        print(
            f"budget {budget} ({exhaustive.limit / 1e6:.3f} M MACs, {exhaustive.evaluations} configs fit): "
            f"optimum {b['exhaustive']['config']} {100 * optimum:.2f}% "
            f"(uniform {b['uniform']['config']} {100 * uniform_acc:.2f}%)"
        )
        print(
            f"  beam {b['beam']['config']} gap {b['beam']['gap_points']:.2f} pts "
            f"with {beam.evaluations} evaluations ({100 * beam.evaluations / len(configs):.0f}% of the space)"
        )
        gaps = [e["gap_points"] for e in b["evolution"]]
        print(
            f"  evolution ({quarter} evaluations, {args.evolution_seeds} seeds): gap mean {statistics.mean(gaps):.2f}, "
            f"worst {max(gaps):.2f} pts"
        )

    result = {
        "what": "validation accuracy of every configuration: prefix tree vs. one forward pass per configuration; "
        "beam and evolution vs. the exhaustive optimum",
        "model": "PaperNet trained on digits, conv2-conv4 decomposed at all powers of two, no GroSS finetuning",
        "base": {"epochs": args.epochs, "seconds": train_s, "val_accuracy": base_acc},
        "decompose_seconds": decompose_s,
        "val_images": len(splits.val),
        "configs": len(configs),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "tree_seconds": times["tree"],
        "plain_seconds": times["plain"],
        "speedup": plain_s / tree_s,
        "identical_scores": identical,
        "val_accuracy_range": [min(accuracies), max(accuracies)],
        "budgets": budgets,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_speed.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
