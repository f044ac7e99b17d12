"""Size of the series' difference terms, nested (warm-started) vs. independent decompositions.

A nested series should store small corrections; cancelling blocks show up as difference-term cores
far larger than the weight. He-initialised 3x3 layers of the paper network's shapes, float32.

    python benchmarks/nested_conditioning.py   # writes benchmarks/results/nested_conditioning.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from gross import GroSSConv2d

LAYERS = {"conv2": (32, 32), "conv4": (64, 64)}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, (c_in, c_out) in LAYERS.items():
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        w_norm = float(conv.weight.detach().norm())
        for nested in (True, False):
            start = time.perf_counter()
            layer = GroSSConv2d.from_conv(conv, nested=nested)
            seconds = time.perf_counter() - start
            for i, s in enumerate(layer.group_sizes):
                error = float((layer.dense_weight(s) - conv.weight).detach().norm()) / w_norm
                row = {
                    "layer": name,
                    "nested": nested,
                    "group_size": s,
                    "relative_error": error,
                    "term_core_norm_over_weight_norm": float(layer.core[i].detach().norm()) / w_norm,
                    "decompose_seconds": seconds,
                }
                rows.append(row)
                print(f"{name} {'nested' if nested else 'independent':>11} g={s:3d} error {error:.4f} "
                      f"|r_i|/|W| {row['term_core_norm_over_weight_norm']:8.2f}", flush=True)
    out = Path(__file__).parent / "results" / "nested_conditioning.json"
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
