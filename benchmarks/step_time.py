"""Training-step time of the GroSS network at a configuration vs. the exported fixed network.

A GroSS layer at group size s runs a real grouped conv with D / s groups, after summing its
difference terms; this measures what that costs on top of the plain network of the same
configuration. Paper network (METHOD.md section 8), conv2-conv4 decomposed, batch 128, SGD step
on all parameters, CPU.

    python benchmarks/step_time.py            # writes benchmarks/results/step_time.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gross
from gross.models import PaperNet

CONFIGS = [(1, 1, 1), (4, 4, 4), (16, 16, 16), (32, 32, 64), (2, 32, 64), (8, 16, 64), (2, 4, 8)]


def step_times(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = gross.decompose(PaperNet(), skip=["conv1"])
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    rows = []
    for config in CONFIGS:
        exported = gross.export(model, config)
        # Interleave the two so that drift in machine load hits both alike.
        t_gross, t_plain = [], []
        for _ in range(2):
            gross.set_config(model, config)
            t_gross += step_times(model, x, y, args.warmup, args.steps // 2)
            t_plain += step_times(exported, x, y, args.warmup, args.steps // 2)
        g, p = statistics.median(t_gross), statistics.median(t_plain)
        rows.append({"config": list(config), "gross_ms": 1e3 * g, "exported_ms": 1e3 * p, "ratio": g / p})
        print(f"{str(config):>14}  gross {1e3 * g:7.1f} ms  exported {1e3 * p:7.1f} ms  ratio {g / p:.3f}", flush=True)
    result = {
        "what": "median training-step time, GroSS model at a configuration vs. its exported plain network",
        "model": "PaperNet, conv2-conv4 decomposed, all powers of two",
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
        "max_ratio": max(r["ratio"] for r in rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_time.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| config | GroSS step (ms) | exported step (ms) | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {' '.join(map(str, r['config']))} | {r['gross_ms']:.1f} | {r['exported_ms']:.1f} | {r['ratio']:.3f} |" for r in rows]
    (args.out / "step_time.md").write_text("\n".join(lines) + "\n")
    print(f"max ratio {result['max_ratio']:.3f}")


if __name__ == "__main__":
    main()
